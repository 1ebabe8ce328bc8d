"""Write the checkpoint a user ships; its weight file is exactly ``checkpoint_size(model).total`` bytes.

Each compressed layer is written in the layout ``size.layer_layout`` chooses for it (the smaller one):

* **standard** (no layer uses a sparse layout): nothing quantized -> plain ``save_pretrained``;
  otherwise a compressed-tensors checkpoint (``pack-quantized`` for bits < 8, ``int-quantized`` for
  8 bits, one config group per distinct grid) holding *our* integer codes and scales, which
  ``from_pretrained`` reloads without poft_autotune installed.
* **poft-sparse** (some layer is smaller as bitmask + values): ``model.safetensors`` with exactly the
  tensors of ``checkpoint_layout``, ``config.json`` and ``poft_format.json`` (per-layer layout and
  grid). ``load_pretrained`` reloads it; a plain ``from_pretrained`` would NOT (unknown tensor names).

Encodings (shared with compressed-tensors wherever it has one):

* codes are stored signed, as compressed-tensors does: symmetric codes as they are, asymmetric
  codes and zero points minus ``2^(bits-1)``; ``pack_to_int32`` packs ``bits`` bits per value into
  int32 words, LSB first, values spilling across word boundaries; zero points packed along dim 0.
* ``weight_bitmask`` uint8 ``[out, ceil(in / 8)]``: bit ``j`` (LSB first) of byte ``k`` of row ``r``
  is ``mask[r, 8 * k + j]``, padding bits 0 (``numpy.packbits(mask, axis=1, bitorder="little")``).
* ``weight_values`` / sparse ``weight_packed``: the kept weights (resp. their codes) in row-major order.

A peft model (LoRA shipped unmerged, ``recovery.lora_merge=False``) is written as its compressed base
(as above) plus peft's own adapter files in the subdirectory ``adapter/`` (``adapter_model.safetensors``,
``adapter_config.json``; a subdirectory, because transformers' ``from_pretrained`` of a directory holding
``adapter_config.json`` would try to fetch the adapter's base model). ``load_pretrained`` rebuilds base +
adapter; ``weight_bytes`` counts both files.

Every directory also gets ``poft_recipe.json`` (the recipe and library versions) and, if given, the
tokenizer. Writing goes to a hidden sibling directory renamed into place at the end, so a failure
never leaves a directory that looks complete.
"""

from __future__ import annotations

import copy
import json
import os
import re
import shutil
import uuid
import warnings
from importlib import metadata
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import AutoConfig, PreTrainedModel

from poft_autotune.compression.base import compressed_layers, get_mask, get_quant, master_weight, strip_
from poft_autotune.compression.quantize import QuantGrid
from poft_autotune.errors import InvalidConfigError, PoftError
from poft_autotune.size import (
    SPARSE_META,
    TensorSpec,
    checkpoint_layout,
    checkpoint_size,
    is_peft_model,
    layer_layout,
    lora_base,
)

WEIGHTS_NAME = "model.safetensors"
FORMAT_NAME = "poft_format.json"
RECIPE_NAME = "poft_recipe.json"
ADAPTER_DIR = "adapter"  # unmerged LoRA adapters: peft's files, beside the compressed base
FORMAT_VERSION = 1
STANDARD, COMPRESSED_TENSORS, POFT_SPARSE = "dense", "compressed-tensors", "poft-sparse"
BITMASK_ORDER = "row-major; bit j (LSB first) of byte k of row r is mask[r, 8k+j]; padding bits 0"


def weight_bytes(directory: str | os.PathLike[str]) -> int:
    """Bytes of the ``*.safetensors`` files in ``directory`` (and its ``adapter/``): what ``checkpoint_size`` predicts.

    Example: ``weight_bytes(export_model(model, "out")) == checkpoint_size(model).total``.
    """
    path = Path(directory)
    if not path.is_dir():
        raise InvalidConfigError(f"`directory` must be an existing directory, got {str(path)!r}. Export a model first.")
    files = [*path.glob("*.safetensors"), *(path / ADAPTER_DIR).glob("*.safetensors")]
    return sum(f.stat().st_size for f in files if f.is_file())


def export_model(
    model: nn.Module,
    directory: str | os.PathLike[str],
    *,
    tokenizer: Any = None,
    recipe: dict[str, Any] | None = None,
    overwrite: bool = False,
) -> Path:
    """Write the shipped form of ``model`` (compression state included) to ``directory``; return its path.

    The caller's model is not modified. A peft model (unmerged LoRA adapters) is written as its compressed
    base plus the adapter in ``adapter/``. Example::

        compress_(model, [QuantizeConfig(bits=4, group_size=128)])
        out = export_model(model, "ship/int4", tokenizer=tok, recipe=plan.to_dict())
        assert weight_bytes(out) == checkpoint_size(model).total
        reloaded = load_pretrained(out)
    """
    adapter: Any = model if is_peft_model(model) else None
    base = lora_base(model) if adapter is not None else model
    if not isinstance(base, PreTrainedModel):
        raise InvalidConfigError(
            f"`model` must be a transformers PreTrainedModel (it needs a config to be reloaded) or a peft model "
            f"of one, got {type(model).__name__}. Export the Hugging Face model itself, not a wrapper."
        )
    if tokenizer is not None and not callable(getattr(tokenizer, "save_pretrained", None)):
        raise InvalidConfigError(
            f"`tokenizer` must have a save_pretrained method (a transformers tokenizer or processor), got "
            f"{type(tokenizer).__name__}. Pass the tokenizer or None."
        )
    recipe_text = _recipe_json(recipe)
    target = _check_target(directory, overwrite)
    tmp = target.with_name(f".{target.name}.poft-tmp-{uuid.uuid4().hex[:12]}")
    try:
        tmp.mkdir()
    except OSError as exc:
        raise InvalidConfigError(
            f"`directory` must be in a writable folder, got {str(target)!r}: cannot create {str(tmp)!r} ({exc}). "
            "Choose a writable location."
        ) from exc
    try:
        kind = _write_model(base, tmp)
        if adapter is not None:
            # peft's own writer and format, so peft (and transformers' adapter support) reloads it as-is.
            adapter.save_pretrained(str(tmp / ADAPTER_DIR), safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        (tmp / RECIPE_NAME).write_text(recipe_text)
        expected, written = checkpoint_size(model).total, weight_bytes(tmp)
        if written != expected:  # the size axis of the study would be wrong: say so loudly
            warnings.warn(
                f"{kind} checkpoint of {type(model).__name__} has {written} weight bytes, checkpoint_size says "
                f"{expected}; the size formula (poft_autotune.size) does not describe this model.",
                stacklevel=2,
            )
        _move_into_place(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def copy_checkpoint(
    source: str | os.PathLike[str], directory: str | os.PathLike[str], *, overwrite: bool = False
) -> Path:
    """Copy an exported checkpoint directory to ``directory``, atomically (temp sibling, then rename).

    Example: ``copy_checkpoint("studies/poft/checkpoints/trial-7", "ship/int4")``.
    """
    src = Path(source)
    if not (src / "config.json").is_file():
        raise InvalidConfigError(f"`source` must be an exported checkpoint (config.json), got {str(src)!r}.")
    target = _check_target(directory, overwrite)
    tmp = target.with_name(f".{target.name}.poft-tmp-{uuid.uuid4().hex[:12]}")
    try:
        shutil.copytree(src, tmp)
        _move_into_place(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def load_pretrained(directory: str | os.PathLike[str]) -> Any:
    """Reload any ``export_model`` directory (weights dequantized to the model dtype), on CPU.

    Reads safetensors weights only and runs no code shipped in the directory. Returns the transformers
    model, or for a checkpoint with unmerged LoRA adapters (``adapter/``) a peft ``PeftModel`` of base +
    adapter, in eval mode. Example: ``model = load_pretrained("ship/int4"); model(input_ids).logits``.
    """
    path = Path(directory)
    base = _load_base(path)
    if not (path / ADAPTER_DIR / "adapter_config.json").is_file():
        return base
    if not (path / ADAPTER_DIR / "adapter_model.safetensors").is_file():
        raise InvalidConfigError(
            f"`directory`'s adapter must be safetensors, got {str(path / ADAPTER_DIR)!r} without "
            "adapter_model.safetensors. load_pretrained reads safetensors only (pickle-based .bin files can run "
            "code when loaded); re-export the model with export_model."
        )
    from peft import PeftModel

    return PeftModel.from_pretrained(base, str(path / ADAPTER_DIR)).eval()


def _load_base(path: Path) -> PreTrainedModel:
    if not (path / "config.json").is_file():
        raise InvalidConfigError(
            f"`directory` must hold a saved model (config.json), got {str(path)!r}. Pass an export_model directory."
        )
    if not any(path.glob("*.safetensors")):
        raise InvalidConfigError(
            f"`directory` must hold safetensors weights, got {str(path)!r} without a *.safetensors file. "
            "load_pretrained reads safetensors only (pickle-based .bin files can run code when loaded)."
        )
    fmt = json.loads((path / FORMAT_NAME).read_text()) if (path / FORMAT_NAME).is_file() else {}
    config = AutoConfig.from_pretrained(path, trust_remote_code=False)
    auto_class = _auto_class(config)
    safe = {"use_safetensors": True, "trust_remote_code": False}
    grids = {(i["bits"], i["group_size"], i["symmetric"]) for i in fmt.get("layers", {}).values() if "bits" in i}
    # transformers 5.25's dequantizing loader decodes every layer with the FIRST config group's scheme,
    # so a compressed-tensors checkpoint with mixed grids only loads dequantized through our decoder.
    if fmt.get("kind") == POFT_SPARSE or (fmt.get("kind") == COMPRESSED_TENSORS and len(grids) > 1):
        if hasattr(config, "quantization_config"):
            del config.quantization_config  # the weights are decoded here: build a plain model
        return _load_poft(path, fmt, auto_class.from_config(config))
    quant = getattr(config, "quantization_config", None)
    method = quant.get("quant_method") if isinstance(quant, dict) else getattr(quant, "quant_method", None)
    if str(method) == "compressed-tensors":
        from transformers import CompressedTensorsConfig

        # The default (compressed) reload of asymmetric pack-quantized weights is broken in
        # compressed-tensors 0.20.1 (zero point not packed on the meta-device path); dequantizing works.
        with warnings.catch_warnings():  # "the quantization_config from the model will be used": intended
            warnings.filterwarnings("ignore", message=".*already has a `quantization_config`", category=UserWarning)
            return auto_class.from_pretrained(
                path, quantization_config=CompressedTensorsConfig(dequantize=True), **safe
            )
    return auto_class.from_pretrained(path, **safe)


# --- writing ---------------------------------------------------------------------------------------


def _recipe_json(recipe: dict[str, Any] | None) -> str:
    if recipe is not None and not isinstance(recipe, dict):
        raise InvalidConfigError(f"`recipe` must be a dict or None, got {type(recipe).__name__}. Pass plan.to_dict().")
    versions = {}
    for dist in ("torch", "transformers", "compressed-tensors", "poft-autotune"):
        try:
            versions[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            versions[dist] = "not installed"
    try:
        return json.dumps({"recipe": recipe or {}, "versions": versions}, indent=2, sort_keys=True) + "\n"
    except (TypeError, ValueError) as exc:
        raise InvalidConfigError(
            f"`recipe` must be JSON-serializable, got {recipe!r} ({exc}). Use plain dicts, lists, str and numbers."
        ) from exc


def _check_target(directory: str | os.PathLike[str], overwrite: bool) -> Path:
    target = Path(directory).expanduser().absolute()
    if target.exists() and not target.is_dir():
        raise InvalidConfigError(f"`directory` must be a directory path, got {str(target)!r}, an existing file.")
    if target.is_dir() and any(target.iterdir()) and not overwrite:
        raise InvalidConfigError(
            f"`directory` must be empty or new, got {str(target)!r}, which has files. "
            "Pass overwrite=True to replace it, or choose another directory."
        )
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise InvalidConfigError(
            f"`directory`'s parent must be a writable folder, got {str(target.parent)!r} ({exc}). "
            "Choose a writable location."
        ) from exc
    return target


def _move_into_place(tmp: Path, target: Path) -> None:
    """Rename ``tmp`` to ``target``; a non-empty ``target`` is renamed away first and deleted last."""
    if target.is_dir() and not any(target.iterdir()):
        target.rmdir()
    if not target.exists():
        os.rename(tmp, target)
        return
    old = target.with_name(f".{target.name}.poft-old-{uuid.uuid4().hex[:12]}")
    os.rename(target, old)
    try:
        os.rename(tmp, target)
    except BaseException:
        os.rename(old, target)  # put the user's directory back before reporting the failure
        raise
    shutil.rmtree(old, ignore_errors=True)


def _write_model(model: PreTrainedModel, directory: Path) -> str:
    """Write config and weights; return the kind of checkpoint written."""
    layers = compressed_layers(model)
    layouts = {name: layer_layout(name, layer) for name, layer in layers.items()}
    sparse = any(s.kind == SPARSE_META for specs in layouts.values() for s in specs)
    kind = POFT_SPARSE if sparse else COMPRESSED_TENSORS if any(map(get_quant, layers.values())) else STANDARD
    info: dict[str, dict[str, Any]] = {}
    if kind == STANDARD:
        # Only masks with the dense layout (plain zeros) or no compression at all: the standard writer
        # does it, on a stripped copy since it records architectures/dtype in the model's config.
        shipped = copy.deepcopy(model)
        strip_(shipped)
        shipped.save_pretrained(directory)
        info = {name: {"layout": "dense", "shape": list(layer.weight.shape)} for name, layer in layers.items()}
    else:
        tensors = _dense_tensors(model, set(layers))
        for name, layer in layers.items():
            layer_tensors, info[name] = _encode_layer(name, layer, layouts[name])
            tensors.update(layer_tensors)
        _check_against_layout(tensors, checkpoint_layout(model))
        from safetensors.torch import save_file

        # {"format": "pt"} is what save_pretrained writes and what the size formula's header assumes.
        save_file(tensors, str(directory / WEIGHTS_NAME), metadata={"format": "pt"})
        _write_config(model, directory)
        if kind == COMPRESSED_TENSORS:
            _add_quantization_config(directory, layers, info)
    fmt = {"format_version": FORMAT_VERSION, "kind": kind, "weights": WEIGHTS_NAME, "bitmask_order": BITMASK_ORDER}
    (directory / FORMAT_NAME).write_text(json.dumps({**fmt, "layers": info}, indent=2) + "\n")
    return kind


def _dense_tensors(model: PreTrainedModel, compressed: set[str]) -> dict[str, torch.Tensor]:
    skip = set(getattr(model, "all_tied_weights_keys", None) or {}) | {f"{name}.weight" for name in compressed}
    return {k: t.detach().cpu().contiguous() for k, t in model.state_dict().items() if k not in skip}


def _codes(name: str, layer: nn.Linear, grid: QuantGrid) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Integer codes, scales and zero points that dequantize to exactly ``layer.weight``."""
    weight = layer.weight.detach()
    # The latent master weight is what the grid's statistics were taken from; re-deriving them from the
    # (already quantized) weight can differ in the last bit of a scale, so it is only the fallback.
    for source in (master_weight(layer).detach(), weight):
        q, scale, zero = grid.quantize(source)
        if torch.equal(grid.dequantize(q, scale, zero, weight.dtype), weight):
            return q.cpu(), scale.cpu(), None if zero is None else zero.cpu()
    raise InvalidConfigError(
        f"Layer {name!r}'s weight is not on its quantization grid ({grid}), so no checkpoint reproduces it. "
        "Re-quantize it after changing weights (poft_autotune.compression.base.refresh_(layer))."
    )


def _encode_layer(
    name: str, layer: nn.Linear, specs: list[TensorSpec]
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The checkpoint tensors of one compressed layer's weight, and its poft_format.json entry."""
    from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32

    suffixes = {s.name.removeprefix(f"{name}.") for s in specs}
    is_sparse = "weight_bitmask" in suffixes
    weight = layer.weight.detach().cpu()
    mask = get_mask(layer)
    grid = get_quant(layer)
    out: dict[str, torch.Tensor] = {}
    info: dict[str, Any] = {"shape": list(weight.shape)}
    if is_sparse:
        assert mask is not None  # layer_layout offers the sparse layout only for masked layers
        mask = mask.cpu()
        out["weight_bitmask"] = _pack_bitmask(mask)
        info["nnz"] = int(mask.sum())
    if grid is None:
        if is_sparse:
            out["weight_values"] = weight[mask]
        else:
            out["weight"] = weight.contiguous()
        info["layout"] = "sparse" if is_sparse else "dense"
        return {f"{name}.{k}": v for k, v in out.items()}, info
    if not isinstance(grid, QuantGrid):
        raise InvalidConfigError(
            f"Layer {name!r} has a quantizer of type {type(grid).__name__}; export supports "
            "poft_autotune.compression.quantize.QuantGrid only."
        )
    bits = grid.bits
    q, scale, zero = _codes(name, layer, grid)
    offset = 0 if grid.symmetric else 2 ** (bits - 1)  # compressed-tensors stores signed codes
    signed = (q - offset).to(torch.int8)
    out["weight_scale"] = scale.to(weight.dtype)
    if is_sparse:
        layout = "sparse-quantized"
        out["weight_packed"] = pack_to_int32(signed[mask].reshape(1, -1), bits).reshape(-1)
    elif bits == 8:
        layout = "int-quantized"
        out["weight"] = signed
    else:
        layout = "pack-quantized"
        out["weight_packed"] = pack_to_int32(signed, bits)
    if layout != "int-quantized":
        out["weight_shape"] = torch.tensor(weight.shape, dtype=torch.int64)
    if zero is not None:
        zp = (zero - offset).to(torch.int8)
        out["weight_zero_point"] = zp if layout == "int-quantized" else pack_to_int32(zp, bits, packed_dim=0)
    info.update(layout=layout, bits=bits, group_size=grid.group_size, symmetric=grid.symmetric)
    return {f"{name}.{k}": v.contiguous() for k, v in out.items()}, info


def _pack_bitmask(mask: torch.Tensor) -> torch.Tensor:
    rows, cols = mask.shape
    padded = torch.nn.functional.pad(mask.to(torch.uint8), (0, (-cols) % 8)).reshape(rows, -1, 8)
    return (padded << torch.arange(8, dtype=torch.uint8)).sum(-1, dtype=torch.uint8)


def _check_against_layout(tensors: dict[str, torch.Tensor], specs: list[TensorSpec]) -> None:
    """The written tensors must be exactly the ones the size formula counts (else the size axis lies)."""
    expected = {s.name: (s.dtype, s.shape) for s in specs}
    actual = {k: (t.dtype, tuple(t.shape)) for k, t in tensors.items()}
    if expected != actual:
        diff = sorted(set(expected.items()) ^ set(actual.items()), key=str)
        raise PoftError(f"Exporter and size formula disagree on these tensors (a bug, please report): {diff}")


def _write_config(model: PreTrainedModel, directory: Path) -> None:
    # What save_pretrained writes, without touching the caller's config.
    config = copy.deepcopy(model.config)
    config.architectures = [type(model).__name__]
    config.dtype = str(model.dtype).removeprefix("torch.")
    if hasattr(config, "quantization_config"):  # a base loaded from a quantized checkpoint
        del config.quantization_config
    config.save_pretrained(directory)
    generation_config: Any = getattr(model, "generation_config", None)
    if model.can_generate() and generation_config is not None:
        generation_config.save_pretrained(directory)


def _add_quantization_config(directory: Path, layers: dict[str, nn.Linear], info: dict[str, dict[str, Any]]) -> None:
    """compressed-tensors' quantization_config in config.json: one config group per distinct grid."""
    from compressed_tensors.compressors import ModelCompressor
    from compressed_tensors.quantization import QuantizationArgs, QuantizationConfig, QuantizationScheme

    by_grid: dict[QuantGrid, list[str]] = {}
    for name, layer in layers.items():
        grid = get_quant(layer)
        if grid is not None:
            by_grid.setdefault(grid, []).append(name)
    groups = {}
    for i, (grid, names) in enumerate(sorted(by_grid.items(), key=lambda item: item[1][0])):
        args = QuantizationArgs(
            num_bits=grid.bits,
            type="int",
            symmetric=grid.symmetric,
            strategy="channel" if grid.group_size is None else "group",
            group_size=grid.group_size,
        )
        groups[f"group_{i}"] = QuantizationScheme(
            targets=[f"re:^{re.escape(name)}$" for name in names],
            weights=args,
            format=info[names[0]]["layout"],
        )
    formats = {scheme.format for scheme in groups.values()}
    config = QuantizationConfig(
        config_groups=groups,
        format=formats.pop() if len(formats) == 1 else "mixed-precision",
        quantization_status="compressed",
    )
    ModelCompressor(quantization_config=config).update_config(str(directory))


# --- reading ---------------------------------------------------------------------------------------

_AUTO_SUFFIXES = (
    ("ForCausalLM", "AutoModelForCausalLM"),
    ("ForSequenceClassification", "AutoModelForSequenceClassification"),
    ("ForTokenClassification", "AutoModelForTokenClassification"),
    ("ForQuestionAnswering", "AutoModelForQuestionAnswering"),
    ("ForMaskedLM", "AutoModelForMaskedLM"),
    ("ForConditionalGeneration", "AutoModelForSeq2SeqLM"),
)


def _auto_class(config: Any) -> Any:
    import transformers

    architectures = getattr(config, "architectures", None) or []
    for arch in architectures:
        for suffix, auto in _AUTO_SUFFIXES:
            if arch.endswith(suffix):
                return getattr(transformers, auto)
    return transformers.AutoModel


def _load_poft(path: Path, fmt: dict[str, Any], model: PreTrainedModel) -> PreTrainedModel:
    from safetensors.torch import load_file

    if fmt.get("format_version") != FORMAT_VERSION:
        raise InvalidConfigError(
            f"{FORMAT_NAME} must have format_version {FORMAT_VERSION}, got {fmt.get('format_version')!r}. "
            "Upgrade poft_autotune to load this checkpoint."
        )
    tensors = load_file(str(path / fmt.get("weights", WEIGHTS_NAME)))
    dtype = model.dtype
    for name, layer in fmt["layers"].items():
        own = {k.removeprefix(f"{name}."): tensors.pop(k) for k in list(tensors) if k.startswith(f"{name}.weight")}
        tensors[f"{name}.weight"] = _decode_layer(own, layer, dtype)
    missing, unexpected = model.load_state_dict(tensors, strict=False)
    tied = set(getattr(model, "all_tied_weights_keys", None) or {})
    if unexpected or set(missing) - tied:
        raise PoftError(
            f"{path} does not match its config: missing {sorted(set(missing) - tied)}, unexpected {unexpected}"
        )
    model.tie_weights()
    return model.eval()


def _decode_layer(t: dict[str, torch.Tensor], info: dict[str, Any], dtype: torch.dtype) -> torch.Tensor:
    from compressed_tensors.compressors.pack_quantized.helpers import unpack_from_int32

    layout = info["layout"]
    shape = torch.Size(info["shape"])
    if layout == "dense":
        return t["weight"]
    if layout == "sparse":
        mask = _unpack_bitmask(t["weight_bitmask"], shape)
        return torch.zeros(shape, dtype=t["weight_values"].dtype).masked_scatter_(mask, t["weight_values"])
    bits, grid = info["bits"], QuantGrid(info["bits"], info["group_size"], info["symmetric"])
    offset = 0 if grid.symmetric else 2 ** (bits - 1)
    scale = t["weight_scale"]
    zero = None
    if not grid.symmetric:
        zp = t["weight_zero_point"]
        if layout != "int-quantized":
            zp = unpack_from_int32(zp, bits, scale.shape, packed_dim=0)
        zero = zp.to(torch.int32) + offset
    if layout == "int-quantized":
        codes = t["weight"]
    elif layout == "pack-quantized":
        codes = unpack_from_int32(t["weight_packed"], bits, shape)
    else:
        nnz = int(info["nnz"])
        kept = unpack_from_int32(t["weight_packed"].reshape(1, -1), bits, torch.Size([1, nnz])).reshape(-1)
        # Pruned entries get the code of 0.0 (the zero point), so they dequantize to exactly 0.
        codes = torch.zeros(shape, dtype=torch.int8)
        if zero is not None:
            codes = (zero - offset).to(torch.int8).repeat_interleave(shape[1] // scale.shape[1], dim=1)
        codes = codes.masked_scatter(_unpack_bitmask(t["weight_bitmask"], shape), kept)
    return grid.dequantize(codes.to(torch.int32) + offset, scale, zero, dtype)


def _unpack_bitmask(packed: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    bits = (packed.unsqueeze(-1) >> torch.arange(8, dtype=torch.uint8)) & 1
    return bits.reshape(shape[0], -1)[:, : shape[1]].bool()
