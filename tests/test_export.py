"""The exported checkpoint: its bytes are checkpoint_size exactly, and it reloads to the evaluated logits."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import poft_autotune.export as export
from poft_autotune import compress_
from poft_autotune.compression.base import compressed_layers, get_mask, get_quant
from poft_autotune.compression.prune import NMConfig, PruneConfig
from poft_autotune.compression.quantize import QuantizeConfig
from poft_autotune.errors import InvalidConfigError
from poft_autotune.export import COMPRESSED_TENSORS, POFT_SPARSE, STANDARD, export_model, load_pretrained, weight_bytes
from poft_autotune.size import checkpoint_size
from poft_autotune.testing import tiny_bert, tiny_llama

IDS = torch.arange(1, 20)[None]


@torch.no_grad()
def _logits(model) -> torch.Tensor:
    return model.eval()(IDS).logits


def _roundtrip(model, directory, kind: str, plain_class=None) -> None:
    """Export, compare bytes with the size formula, reload (ours and, if given, plain) and compare logits."""
    reference = _logits(model)
    out = export_model(model, directory)
    assert weight_bytes(out) == checkpoint_size(model).total
    assert json.loads((out / "poft_format.json").read_text())["kind"] == kind
    torch.testing.assert_close(_logits(load_pretrained(out)), reference, atol=1e-5, rtol=0)
    if plain_class is not None:  # a standard checkpoint: no poft_autotune needed to load it
        torch.testing.assert_close(_logits(plain_class.from_pretrained(out)), reference, atol=1e-5, rtol=0)


# (compression plan, kind of checkpoint written, whether a plain from_pretrained reloads it)
CASES = [
    pytest.param([], STANDARD, True, id="dense"),
    pytest.param([QuantizeConfig(bits=4, group_size=16)], COMPRESSED_TENSORS, True, id="int4-g16"),
    # compressed-tensors 0.20.1 cannot reload asymmetric pack-quantized without dequantize=True
    pytest.param(
        [QuantizeConfig(bits=4, group_size=None, symmetric=False)], COMPRESSED_TENSORS, False, id="int4-ch-asym"
    ),
    pytest.param([QuantizeConfig(bits=8, group_size=None)], COMPRESSED_TENSORS, True, id="int8"),
    pytest.param([QuantizeConfig(bits=3, group_size=32)], COMPRESSED_TENSORS, True, id="int3-g32"),
    pytest.param([PruneConfig(sparsity=0.5)], POFT_SPARSE, False, id="prune50"),
    pytest.param([NMConfig(n=2, m=4)], POFT_SPARSE, False, id="2:4"),
    pytest.param(
        [PruneConfig(sparsity=0.6), QuantizeConfig(bits=8, group_size=None)], POFT_SPARSE, False, id="prune60-int8"
    ),
    pytest.param(
        [PruneConfig(sparsity=0.5), QuantizeConfig(bits=3, group_size=16, symmetric=False)],
        POFT_SPARSE,
        False,
        id="prune50-int3-g16-asym",
    ),
    # 2-bit codes of half the weights + a 1-bit mask are not smaller than 2 dense bits: packed layout
    pytest.param(
        [NMConfig(n=4, m=8), QuantizeConfig(bits=2, group_size=16)], COMPRESSED_TENSORS, True, id="4:8-int2-g16"
    ),
    # one compressed-tensors config group per grid, and two formats (int-quantized + pack-quantized)
    pytest.param(
        [
            QuantizeConfig(bits=8, group_size=None, targets=("mlp",)),
            QuantizeConfig(bits=4, group_size=16, targets=("self_attn",)),
        ],
        COMPRESSED_TENSORS,
        True,
        id="mixed-int8-int4",
    ),
]


@pytest.mark.parametrize(("configs", "kind", "plain"), CASES)
def test_export_size_is_exact_and_reload_reproduces_logits(configs, kind, plain, tmp_path):
    model = tiny_llama()
    if configs:
        compress_(model, configs)
    _roundtrip(model, tmp_path / "ckpt", kind, AutoModelForCausalLM if plain else None)


def test_sparse_layout_with_tied_embeddings_in_bfloat16(tmp_path):
    model = tiny_llama(tie_word_embeddings=True).to(torch.bfloat16)
    compress_(model, [PruneConfig(sparsity=0.5), QuantizeConfig(bits=4, group_size=16, symmetric=False)])
    out = export_model(model, tmp_path / "ckpt")
    assert weight_bytes(out) == checkpoint_size(model).total
    reloaded = load_pretrained(out)
    assert reloaded.dtype == torch.bfloat16
    # Weights bit for bit. (Logits differ slightly, as after save_pretrained/from_pretrained too: `.to(bf16)`
    # cast the rotary inv_freq buffer, which a freshly built bf16 model keeps in float32.)
    expected = model.state_dict()
    assert all(torch.equal(t, expected[k]) for k, t in reloaded.state_dict().items())
    assert reloaded.lm_head.weight is reloaded.model.embed_tokens.weight


@pytest.mark.parametrize(
    ("configs", "kind"),
    [
        ([QuantizeConfig(bits=4, group_size=16, symmetric=False)], COMPRESSED_TENSORS),
        ([PruneConfig(sparsity=0.5), QuantizeConfig(bits=4, group_size=16, symmetric=False)], POFT_SPARSE),
    ],
    ids=["int4-g16-asym", "prune50-int4-g16-asym"],
)
def test_bert_classifier_roundtrip(configs, kind, tmp_path):
    model = tiny_bert()
    compress_(model, configs)
    _roundtrip(model, tmp_path / "ckpt", kind)


def test_bitmask_bit_order_is_row_major_lsb_first():
    mask = torch.tensor([[1, 0, 0, 0, 0, 0, 0, 0, 0, 1], [0, 1, 1, 0, 0, 0, 0, 1, 1, 0]], dtype=torch.bool)
    packed = export._pack_bitmask(mask)
    assert packed.dtype == torch.uint8 and packed.tolist() == [[1, 2], [0b10000110, 1]]
    assert torch.equal(export._unpack_bitmask(packed, mask.shape), mask)


def _tiny_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.WordLevel({"[UNK]": 0, "good": 1, "bad": 2}, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]")


def test_tokenizer_recipe_written_and_caller_model_untouched(tmp_path):
    model = tiny_llama()
    compress_(model, [PruneConfig(sparsity=0.5), QuantizeConfig(bits=4, group_size=16)])
    state = {k: v.clone() for k, v in model.state_dict().items()}
    layers = compressed_layers(model)
    recipe = {"compression": [{"method": "prune", "sparsity": 0.5}], "recovery": {"steps": 0}}

    out = export_model(model, tmp_path / "ckpt", tokenizer=_tiny_tokenizer(), recipe=recipe)

    written = json.loads((out / "poft_recipe.json").read_text())
    assert written["recipe"] == recipe
    assert set(written["versions"]) == {"torch", "transformers", "compressed-tensors", "poft-autotune"}
    assert AutoTokenizer.from_pretrained(out)("good bad")["input_ids"] == [1, 2]
    assert model.config.architectures is None  # its config was not stamped either
    assert compressed_layers(model).keys() == layers.keys()
    assert all(get_mask(m) is not None and get_quant(m) is not None for m in layers.values())
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())


def test_failure_mid_write_leaves_no_directory(tmp_path, monkeypatch):
    model = tiny_llama()
    compress_(model, [QuantizeConfig(bits=4, group_size=16)])

    def fail(*args, **kwargs):
        raise OSError("disk full")

    # The weights are on disk by the time the config is written: fail there.
    monkeypatch.setattr(export, "_write_config", fail)
    with pytest.raises(OSError, match="disk full"):
        export_model(model, tmp_path / "ckpt")
    assert list(tmp_path.iterdir()) == []  # neither the target nor a temporary sibling

    # With overwrite=True, a failure keeps the previous export intact.
    previous = tmp_path / "previous"
    previous.mkdir()
    (previous / "model.safetensors").write_bytes(b"old")
    with pytest.raises(OSError, match="disk full"):
        export_model(model, previous, overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["previous"]
    assert (previous / "model.safetensors").read_bytes() == b"old"


def test_refuses_to_overwrite_unless_asked(tmp_path):
    model = tiny_llama()
    target = tmp_path / "ckpt"
    target.mkdir()
    (target / "notes.txt").write_text("keep me")
    with pytest.raises(InvalidConfigError, match="overwrite=True"):
        export_model(model, target)
    assert (target / "notes.txt").read_text() == "keep me"

    export_model(model, target, overwrite=True)
    assert not (target / "notes.txt").exists() and (target / "model.safetensors").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]  # the old copy was deleted
    empty = tmp_path / "empty"
    empty.mkdir()
    export_model(model, empty)  # an empty directory is fine without overwrite


def test_bad_inputs_are_rejected_with_the_rule(tmp_path):
    model = tiny_llama()
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    with pytest.raises(InvalidConfigError, match="existing file"):
        export_model(model, a_file)
    with pytest.raises(InvalidConfigError, match="writable"):
        export_model(model, a_file / "ckpt")
    with pytest.raises(InvalidConfigError, match="JSON-serializable"):
        export_model(model, tmp_path / "ckpt", recipe={"model": model})
    with pytest.raises(InvalidConfigError, match="PreTrainedModel"):
        export_model(torch.nn.Linear(2, 2), tmp_path / "ckpt")
    with pytest.raises(InvalidConfigError, match="existing directory"):
        weight_bytes(tmp_path / "missing")
    with pytest.raises(InvalidConfigError, match="config.json"):
        load_pretrained(tmp_path)

    compress_(model, [QuantizeConfig(bits=4, group_size=16)])
    layer = model.model.layers[0].mlp.up_proj
    with torch.no_grad():
        layer.weight.add_(1e-3)  # edited behind the quantizer's back: off the grid
    with pytest.raises(InvalidConfigError, match="not on its quantization grid"):
        export_model(model, tmp_path / "ckpt")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a_file"]
