"""Contract tests run over every registered compression method, plus method-specific checks."""

import dataclasses

import pytest
import torch

from poft_autotune import InvalidConfigError, available_methods, compress_
from poft_autotune.compression import config_from_dict, get_method, select_layers
from poft_autotune.compression.base import get_mask, get_quant
from poft_autotune.compression.prune import NMConfig, PruneConfig
from poft_autotune.compression.quantize import QuantizeConfig
from poft_autotune.compression.structured import StructuredConfig
from poft_autotune.data import CAUSAL_LM, PadCollator
from poft_autotune.recovery import CompressionCallback, RecoveryTrainer
from poft_autotune.size import checkpoint_size
from poft_autotune.testing import lm_dataset, tiny_llama, tiny_training_args

# A config per method that compresses the tiny Llama (hidden 32, intermediate 64) noticeably.
EXAMPLES = {
    "quantize": [QuantizeConfig(bits=4, group_size=16), QuantizeConfig(bits=3, group_size=None, symmetric=False)],
    "prune": [
        PruneConfig(sparsity=0.5),
        PruneConfig(sparsity=0.7, scope="global"),
        PruneConfig(sparsity=0.5, criterion="wanda"),
    ],
    "nm": [NMConfig(n=2, m=4), NMConfig(n=4, m=8), NMConfig(n=2, m=4, criterion="wanda")],
    "structured": [
        StructuredConfig(heads=0.5, ffn=0.5),
        StructuredConfig(ffn=0.25, layers=1, importance="activation"),
    ],
}
# Calibration for data-aware configs (Wanda, activation importance); the others ignore it.
_IDS = torch.randint(1, 64, (4, 12), generator=torch.Generator().manual_seed(0))
CALIBRATION = [{"input_ids": _IDS, "attention_mask": torch.ones_like(_IDS)}]


def test_every_method_has_examples():
    assert sorted(EXAMPLES) == available_methods()


def _configs():
    return [pytest.param(c, id=f"{c.method}-{c.short()}") for m in available_methods() for c in EXAMPLES[m]]


@pytest.mark.parametrize("config", _configs())
def test_config_round_trip(config):
    data = config.to_dict()
    assert data["method"] == config.method
    assert config_from_dict(data) == config
    assert get_method(config.method).config_cls.from_dict(data) == config
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.targets = ("x",)


@pytest.mark.parametrize("method", available_methods())
def test_bad_values_rejected_with_field_named(method):
    cls = get_method(method).config_cls
    assert cls.invalid, f"{method} declares no invalid values to test"
    for field, values in cls.invalid.items():
        for value in values:
            with pytest.raises(InvalidConfigError, match=f"`{field}`"):
                cls(**{field: value})


@pytest.mark.parametrize("config", _configs())
def test_forward_finite_and_smaller(config):
    model = tiny_llama()
    dense = checkpoint_size(model).total
    compressed = compress_(model, [config], calibration=CALIBRATION)
    # Structured pruning leaves no per-layer state: the layers themselves shrank.
    assert compressed.layers() or config.changes_shapes, "no layer was compressed"
    logits = model(torch.randint(1, 64, (2, 10))).logits
    assert torch.isfinite(logits).all()
    assert checkpoint_size(model).total < dense


def _adam_state(trainer, param):
    return trainer.optimizer.state[param]


@pytest.mark.parametrize("config", _configs())
def test_invariant_survives_training(config, tmp_path):
    """20 AdamW steps with weight decay and gradient accumulation: pruned weights and their moments stay
    exactly 0; quantized weights are exactly the grid projection of the latent weights."""
    model = tiny_llama()
    compress_(model, [config], calibration=CALIBRATION)
    layers = {n: layer for n, layer in select_layers(model, None).items()}
    before = {n: layer.weight.detach().clone() for n, layer in layers.items()}
    args = tiny_training_args(
        str(tmp_path),
        max_steps=20,
        gradient_accumulation_steps=2,
        weight_decay=0.1,
        learning_rate=1e-2,
        per_device_train_batch_size=4,
        max_grad_norm=1.0,
    )
    trainer = RecoveryTrainer(
        model=model,
        args=args,
        train_dataset=lm_dataset(64),
        data_collator=PadCollator(0, CAUSAL_LM),
        callbacks=[CompressionCallback(model)],
    )
    trainer.train()
    moved = False
    for name, layer in layers.items():
        w = layer.weight.detach()
        moved |= not torch.equal(w, before[name])
        mask = get_mask(layer)
        if mask is not None:
            assert mask.float().mean() < 0.95
            assert torch.count_nonzero(w[~mask]) == 0, name
            state = _adam_state(trainer, layer.weight)
            assert torch.count_nonzero(state["exp_avg"][~mask]) == 0, name
            assert torch.count_nonzero(state["exp_avg_sq"][~mask]) == 0, name
            assert torch.count_nonzero(state["exp_avg"][mask]) > 0, name
        grid = get_quant(layer)
        if grid is not None:
            q, scale, zero = grid.quantize(layer.poft_latent)
            assert torch.equal(w, grid.dequantize(q, scale, zero, w.dtype) * (mask if mask is not None else 1)), name
            assert not torch.equal(layer.poft_latent, w), "latent should keep sub-grid precision"
            lo, hi = (-(2 ** (grid.bits - 1)), 2 ** (grid.bits - 1) - 1) if grid.symmetric else (0, 2**grid.bits - 1)
            assert lo <= int(q.min()) and int(q.max()) <= hi
    assert moved, "training did not change any compressed weight"


def test_prune_then_quantize_keeps_zeros_on_grid():
    model = tiny_llama()
    compress_(model, [PruneConfig(sparsity=0.5), QuantizeConfig(bits=4, group_size=16, symmetric=False)])
    for layer in select_layers(model, None).values():
        mask = get_mask(layer)
        assert torch.count_nonzero(layer.weight[~mask]) == 0
        assert get_quant(layer) is not None
        values_per_group = layer.weight.reshape(layer.out_features, -1, 16)
        assert max(len(torch.unique(g)) for g in values_per_group.reshape(-1, 16)) <= 16


def test_magnitude_sparsity_exact_and_prunes_smallest():
    model = tiny_llama()
    originals = {n: layer.weight.detach().clone() for n, layer in select_layers(model, None).items()}
    compress_(model, [PruneConfig(sparsity=0.5)])
    for name, layer in select_layers(model, None).items():
        mask = get_mask(layer)
        assert int((~mask).sum()) == round(0.5 * mask.numel())
        assert originals[name].abs()[~mask].max() <= originals[name].abs()[mask].min()


def test_global_scope_differs_from_layer_scope():
    model = tiny_llama()
    # Make one layer's weights tiny: global pruning must take most of them.
    small = "model.layers.0.mlp.down_proj"
    dict(model.named_modules())[small].weight.data.mul_(0.01)
    compress_(model, [PruneConfig(sparsity=0.5, scope="global")])
    layers = select_layers(model, None)
    total = sum(get_mask(layer).numel() for layer in layers.values())
    kept = sum(int(get_mask(layer).sum()) for layer in layers.values())
    assert abs((total - kept) / total - 0.5) < 1e-3
    assert get_mask(layers[small]).float().mean() < 0.05


@pytest.mark.parametrize("n,m", [(2, 4), (4, 8)])
def test_nm_pattern(n, m):
    model = tiny_llama()
    compress_(model, [NMConfig(n=n, m=m)])
    for layer in select_layers(model, None).values():
        blocks = get_mask(layer).reshape(layer.out_features, -1, m)
        assert torch.all(blocks.sum(-1) == n)


def test_default_targets_leave_embeddings_and_head_alone():
    model = tiny_llama()
    names = set(select_layers(model, None))
    assert "lm_head" not in names and all(".layers." in n for n in names)
    assert len(names) == 2 * 7
    compress_(model, [QuantizeConfig(bits=4, group_size=16, targets=("lm_head",))])
    assert get_quant(model.lm_head) is not None
    assert get_quant(model.model.layers[0].mlp.up_proj) is None


def test_quantization_grid_values():
    w = torch.tensor([[-1.0, -0.5, 0.0, 0.25, 0.5, 0.75, 1.0, 0.1]])
    grid = QuantizeConfig(bits=2, group_size=None, symmetric=True).grid
    q, scale, zero = grid.quantize(w)
    assert zero is None and torch.allclose(scale, torch.tensor([1.0]))
    assert q.tolist() == [[-1, 0, 0, 0, 0, 1, 1, 0]]
    asym = QuantizeConfig(bits=2, group_size=4, symmetric=False).grid
    q, scale, zero = asym.quantize(w)
    assert q.min() >= 0 and q.max() <= 3
    # 0 is exactly representable on an asymmetric grid (integer zero point).
    assert asym.fake_quantize(torch.tensor([[0.0, 3.0, 1.0, 2.0]]))[0, 0] == 0


def test_unknown_method_lists_available():
    with pytest.raises(InvalidConfigError, match="available methods"):
        compress_(tiny_llama(), [{"method": "lowrank"}])


@pytest.mark.parametrize(
    "config,match",
    [
        (QuantizeConfig(bits=4, group_size=48), "group_size"),
        (NMConfig(n=2, m=3), "`m` must divide"),
        (PruneConfig(sparsity=0.5, targets=("nothing_matches",)), "found no layer"),
    ],
)
def test_layer_checks_before_any_change(config, match):
    model = tiny_llama()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(InvalidConfigError, match=match):
        compress_(model, [PruneConfig(sparsity=0.5), config])
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before), "a failed compress_ changed the model"


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("group_size", [None, 8])
@pytest.mark.parametrize("symmetric", [True, False])
def test_fake_quantize_is_bit_identical_to_quantize_dequantize(bits, group_size, symmetric):
    grid = QuantizeConfig(bits=bits, group_size=group_size, symmetric=symmetric).grid
    w = torch.randn(16, 32) * torch.rand(16, 1) + 0.3 * (not symmetric)
    w[0] = 0.0  # an all-zero row must not divide by zero
    q, scale, zero = grid.quantize(w)
    expected = grid.dequantize(q, scale, zero, w.dtype)
    assert torch.equal(grid.fake_quantize(w), expected)
    out = torch.empty_like(w)
    assert grid.fake_quantize(w, out=out) is out and torch.equal(out, expected)
    assert torch.equal(expected[0], torch.zeros(32))
