"""LoRA recovery on a compressed base: adapters train, the merge is re-compressed, nothing is lost."""

import pytest
import torch

from poft_autotune import NMConfig, QuantizeConfig, compress_
from poft_autotune.compression.base import get_mask, get_quant, select_layers
from poft_autotune.data import CAUSAL_LM, PadCollator
from poft_autotune.recovery import CompressionCallback, RecoveryTrainer
from poft_autotune.recovery.lora import attach_lora, merge_lora_
from poft_autotune.testing import lm_dataset, tiny_llama, tiny_training_args


@pytest.mark.parametrize(
    "configs",
    [[QuantizeConfig(bits=4, group_size=16)], [NMConfig(n=2, m=4), QuantizeConfig(bits=8, group_size=None)]],
    ids=["int4", "2:4+int8"],
)
def test_lora_trains_merges_and_recompresses(configs, tmp_path):
    model = tiny_llama()
    compress_(model, configs)
    layers = select_layers(model, None)  # the same module objects become peft's base_layer, then come back
    frozen = {n: layer.weight.detach().clone() for n, layer in layers.items()}
    peft_model = attach_lora(model, CAUSAL_LM, rank=4)
    trainable = [n for n, p in peft_model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    args = tiny_training_args(str(tmp_path), max_steps=10, learning_rate=1e-2)
    RecoveryTrainer(
        model=peft_model,
        args=args,
        train_dataset=lm_dataset(64),
        data_collator=PadCollator(0, CAUSAL_LM),
        callbacks=[CompressionCallback(peft_model)],
    ).train()
    # The compressed base did not move while the adapters trained.
    for name, layer in layers.items():
        assert torch.equal(layer.weight, frozen[name]), name
    ids = torch.arange(1, 17)[None]
    peft_model.eval()
    with torch.no_grad():
        adapted = peft_model(input_ids=ids).logits
    merged = merge_lora_(peft_model)
    assert not any("lora_" in n for n, _ in merged.named_parameters())
    changed = False
    assert select_layers(merged, None) == layers
    for name, layer in layers.items():
        grid, mask = get_quant(layer), get_mask(layer)
        q, scale, zero = grid.quantize(layer.weight)
        on_grid = grid.dequantize(q, scale, zero, layer.weight.dtype)
        assert torch.equal(layer.weight, on_grid), f"{name} is off its grid after the merge"
        if mask is not None:
            assert torch.count_nonzero(layer.weight[~mask]) == 0, name
        changed |= not torch.equal(layer.weight, frozen[name])
    assert changed, "the merge did not change any weight"
    with torch.no_grad():
        shipped = merged(input_ids=ids).logits
    # Re-quantization moves the merged model only slightly away from the adapted one.
    assert torch.allclose(shipped, adapted, atol=0.5)


def test_lora_rank_must_be_positive():
    from poft_autotune import InvalidConfigError

    with pytest.raises(InvalidConfigError, match="`recovery.lora_rank`"):
        attach_lora(tiny_llama(), CAUSAL_LM, rank=0)
