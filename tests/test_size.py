"""The one size definition: bytes of the exported checkpoint, checked against real files on disk."""

import os

import pytest
import torch

from poft_autotune import compress_
from poft_autotune.compression import select_layers
from poft_autotune.compression.base import get_quant, strip_
from poft_autotune.compression.prune import NMConfig, PruneConfig
from poft_autotune.compression.quantize import QuantizeConfig
from poft_autotune.size import checkpoint_size
from poft_autotune.testing import tiny_bert, tiny_llama


def _weight_bytes(directory) -> int:
    return sum(os.path.getsize(os.path.join(directory, f)) for f in os.listdir(directory) if f.endswith(".safetensors"))


@pytest.mark.parametrize(
    "make",
    [tiny_llama, lambda: tiny_llama(tie_word_embeddings=True), tiny_bert],
    ids=["llama", "llama-tied", "bert"],
)
def test_dense_size_equals_save_pretrained(make, tmp_path):
    model = make()
    model.save_pretrained(tmp_path)
    assert checkpoint_size(model).total == _weight_bytes(tmp_path)


def _save_compressed_tensors(model, config: QuantizeConfig, directory) -> None:
    """Save our quantized weights through compressed-tensors (our ints and scales, its packing)."""
    from compressed_tensors.compressors import ModelCompressor
    from compressed_tensors.quantization import (
        QuantizationArgs,
        QuantizationConfig,
        QuantizationScheme,
        apply_quantization_config,
    )

    layers = {name: layer for name, layer in select_layers(model, None).items()}
    codes = {name: get_quant(layer).quantize(layer.poft_latent) for name, layer in layers.items()}
    strip_(model)
    args = QuantizationArgs(
        num_bits=config.bits,
        type="int",
        symmetric=config.symmetric,
        strategy="channel" if config.group_size is None else "group",
        group_size=config.group_size,
    )
    scheme = QuantizationScheme(targets=[f"re:^{name}$" for name in layers], weights=args)
    apply_quantization_config(model, QuantizationConfig(config_groups={"group_0": scheme}))
    offset = 0 if config.symmetric else 2 ** (config.bits - 1)  # compressed-tensors stores signed codes
    for name, layer in layers.items():
        _, scale, zero = codes[name]
        layer.weight_scale.data = scale.to(layer.weight_scale.dtype).reshape(layer.weight_scale.shape)
        if zero is not None:
            layer.weight_zero_point.data = (zero - offset).to(torch.int8).reshape(layer.weight_zero_point.shape)
    fmt = "int-quantized" if config.bits == 8 else "pack-quantized"
    compressor = ModelCompressor.from_pretrained_model(model, quantization_format=fmt)
    compressor.compress_model(model)
    model.save_pretrained(directory)
    compressor.update_config(directory)


@pytest.mark.parametrize(
    "config",
    [
        QuantizeConfig(bits=4, group_size=16),
        QuantizeConfig(bits=4, group_size=None, symmetric=False),
        QuantizeConfig(bits=3, group_size=32),
        QuantizeConfig(bits=8, group_size=None),
        QuantizeConfig(bits=2, group_size=16, symmetric=False),
    ],
    ids=lambda c: c.short(),
)
def test_quantized_size_matches_compressed_tensors_save(config, tmp_path):
    model = tiny_llama(hidden_size=64, intermediate_size=128)
    compress_(model, [config])
    predicted = checkpoint_size(model)
    reference = model(torch.arange(1, 20)[None]).logits
    _save_compressed_tensors(model, config, tmp_path)
    actual = _weight_bytes(tmp_path)
    assert abs(predicted.total - actual) / actual < 0.01, (predicted, actual)
    assert predicted.packed > 0 and predicted.scales > 0 and predicted.dense > 0

    # The checkpoint holds exactly our grid: it reloads to the logits we evaluated.
    from transformers import AutoModelForCausalLM, CompressedTensorsConfig

    reloaded = AutoModelForCausalLM.from_pretrained(
        tmp_path, quantization_config=CompressedTensorsConfig(dequantize=True)
    )
    assert torch.allclose(reloaded(torch.arange(1, 20)[None]).logits, reference, atol=1e-5)


def test_breakdown_adds_up_and_sparse_layout_is_chosen_only_when_smaller():
    model = tiny_llama()
    dense = checkpoint_size(model)
    assert dense.total == dense.dense + dense.header and dense.bits_per_weight is None
    compress_(model, [PruneConfig(sparsity=0.6)])
    sparse = checkpoint_size(model)
    assert sparse.total == sparse.packed + sparse.scales + sparse.sparse_meta + sparse.dense + sparse.header
    # 40 % of fp32 values + a 1-bit mask: 0.4 * 32 + 1 = 13.8 bits per weight.
    assert sparse.bits_per_weight == pytest.approx(13.8, abs=0.1)

    light = tiny_llama()
    compress_(light, [PruneConfig(sparsity=0.6), QuantizeConfig(bits=8, group_size=None)])
    # int8 + 60 % sparse: bitmask + 40 % of 8-bit codes (1 + 3.2 bits) beats 8 dense bits.
    assert checkpoint_size(light).sparse_meta > 0
    nm = tiny_llama()
    compress_(nm, [NMConfig(n=4, m=8), QuantizeConfig(bits=2, group_size=16)])
    # 2-bit codes of half the weights (1 bit) + a 1-bit mask is not smaller than 2 dense bits: dense layout.
    assert checkpoint_size(nm).sparse_meta == 0
