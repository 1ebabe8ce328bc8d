"""THE size of a model: the bytes of its exported checkpoint's weight file(s).

    size = 8 + header + sum(bytes of every tensor the exporter writes)

where ``header`` is the safetensors JSON header (compact, padded to 8 bytes) and the tensors are:

* an uncompressed tensor: itself (``numel * element_size``), tied copies written once;
* a quantized Linear, no mask (compressed-tensors layout, so ``from_pretrained`` reloads it):
  ``bits < 8`` (``pack-quantized``): ``weight_packed`` int32 ``[out, ceil(in * bits / 32)]``,
  ``weight_scale`` ``[out, groups]`` in the model dtype, ``weight_shape`` int64 ``[2]``, and for
  asymmetric grids ``weight_zero_point`` int32 ``[ceil(out * bits / 32), groups]``;
  ``bits == 8`` (``int-quantized``): ``weight`` int8 ``[out, in]``, ``weight_scale``, and
  ``weight_zero_point`` int8 ``[out, groups]`` when asymmetric;
* a pruned Linear: the smaller of the dense layout above and the sparse one: ``weight_bitmask`` uint8
  ``[out, ceil(in / 8)]`` plus the kept values, ``weight_values`` ``[nnz]`` in the model dtype, or, when
  also quantized, ``weight_packed`` int32 ``[ceil(nnz * bits / 32)]`` with the scales as above and
  ``weight_shape``.

Biases stay dense. A model shipped with unmerged LoRA adapters (a peft model, ``recovery.lora_merge=False``)
is two files: the compressed base as above (peft's ``unload`` of a copy: adapters removed, nothing merged)
plus the adapter file peft writes (``adapter_model.safetensors``: every tensor of
``get_peft_model_state_dict``, full precision), and its size is the sum of both.

The Pareto axis, reports and the exporter all use this function; nominal bits per
weight are reported beside it (``bits_per_weight``), never instead of it.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from poft_autotune.compression.base import compressed_layers, get_mask, get_quant

# safetensors writes tensors sorted by dtype (this rank, descending), then by name.
_ST_DTYPES = {
    torch.uint64: ("U64", 14),
    torch.int64: ("I64", 13),
    torch.float64: ("F64", 12),
    torch.float32: ("F32", 11),
    torch.uint32: ("U32", 10),
    torch.int32: ("I32", 9),
    torch.bfloat16: ("BF16", 8),
    torch.float16: ("F16", 7),
    torch.uint16: ("U16", 6),
    torch.int16: ("I16", 5),
    torch.float8_e4m3fn: ("F8_E4M3", 4),
    torch.float8_e5m2: ("F8_E5M2", 3),
    torch.int8: ("I8", 2),
    torch.uint8: ("U8", 1),
    torch.bool: ("BOOL", 0),
}

PACKED, SCALES, SPARSE_META, DENSE, ADAPTER = "packed", "scales", "sparse_meta", "dense", "adapter"


@dataclasses.dataclass(frozen=True)
class TensorSpec:
    """One tensor of the exported checkpoint."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    kind: str  # PACKED, SCALES, SPARSE_META, DENSE or ADAPTER

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * torch.empty((), dtype=self.dtype).element_size()


@dataclasses.dataclass(frozen=True)
class SizeBreakdown:
    """Bytes of the exported checkpoint, total and by kind; ``bits_per_weight`` of compressed layers.

    ``adapter``: bytes of the unmerged LoRA adapter file (its header included), 0 when there is none.
    """

    total: int
    packed: int
    scales: int
    sparse_meta: int
    dense: int
    header: int
    bits_per_weight: float | None
    adapter: int = 0

    def as_dict(self) -> dict[str, int]:
        out = {k: v for k, v in dataclasses.asdict(self).items() if k != "bits_per_weight"}
        if not self.adapter:
            del out["adapter"]  # most models have none; keep their breakdown as it was
        return out


def _quantized_specs(
    prefix: str, out: int, inp: int, grid: object, dtype: torch.dtype, nnz: int | None
) -> list[TensorSpec]:
    bits: int = grid.bits  # type: ignore[attr-defined]
    groups = 1 if grid.group_size is None else inp // grid.group_size  # type: ignore[attr-defined]
    symmetric: bool = grid.symmetric  # type: ignore[attr-defined]
    specs = [TensorSpec(f"{prefix}.weight_scale", dtype, (out, groups), SCALES)]
    if nnz is not None:  # sparse: codes of the kept weights only, packed in one run
        specs += [
            TensorSpec(f"{prefix}.weight_packed", torch.int32, (math.ceil(nnz * bits / 32),), PACKED),
            TensorSpec(f"{prefix}.weight_shape", torch.int64, (2,), SCALES),
        ]
        if not symmetric:
            specs.append(
                TensorSpec(f"{prefix}.weight_zero_point", torch.int32, (math.ceil(out * bits / 32), groups), SCALES)
            )
    elif bits == 8:
        specs.append(TensorSpec(f"{prefix}.weight", torch.int8, (out, inp), PACKED))
        if not symmetric:
            specs.append(TensorSpec(f"{prefix}.weight_zero_point", torch.int8, (out, groups), SCALES))
    else:
        specs += [
            TensorSpec(f"{prefix}.weight_packed", torch.int32, (out, math.ceil(inp * bits / 32)), PACKED),
            TensorSpec(f"{prefix}.weight_shape", torch.int64, (2,), SCALES),
        ]
        if not symmetric:
            specs.append(
                TensorSpec(f"{prefix}.weight_zero_point", torch.int32, (math.ceil(out * bits / 32), groups), SCALES)
            )
    return specs


def layer_layout(prefix: str, layer: nn.Linear) -> list[TensorSpec]:
    """The tensors the exporter writes for ``layer``'s weight (its bias is written as a dense tensor)."""
    out, inp = layer.weight.shape
    dtype = layer.weight.dtype
    grid = get_quant(layer)
    mask = get_mask(layer)
    dense = (
        _quantized_specs(prefix, out, inp, grid, dtype, None)
        if grid is not None
        else [TensorSpec(f"{prefix}.weight", dtype, (out, inp), DENSE)]
    )
    if mask is None:
        return dense
    nnz = int(mask.sum())
    sparse = [TensorSpec(f"{prefix}.weight_bitmask", torch.uint8, (out, math.ceil(inp / 8)), SPARSE_META)]
    if grid is not None:
        sparse += _quantized_specs(prefix, out, inp, grid, dtype, nnz)
    else:
        sparse.append(TensorSpec(f"{prefix}.weight_values", dtype, (nnz,), PACKED))
    return min(dense, sparse, key=lambda specs: sum(s.nbytes for s in specs))


def _tied_keys(model: nn.Module) -> set[str]:
    tied = getattr(model, "all_tied_weights_keys", None) or {}
    return set(tied)


def checkpoint_layout(model: nn.Module) -> list[TensorSpec]:
    """Every tensor of the exported checkpoint of ``model`` (compression state included)."""
    layers = compressed_layers(model)
    replaced = {f"{name}.weight" for name in layers}
    skip = _tied_keys(model) | replaced
    specs = [
        TensorSpec(name, t.dtype, tuple(t.shape), DENSE) for name, t in model.state_dict().items() if name not in skip
    ]
    for name, layer in layers.items():
        specs += layer_layout(name, layer)
    return specs


def safetensors_bytes(specs: Iterable[TensorSpec], metadata: dict[str, str] | None = None) -> tuple[int, int]:
    """(file bytes, header bytes) of a safetensors file holding ``specs``, computed without writing it."""
    ordered = sorted(specs, key=lambda s: (-_ST_DTYPES[s.dtype][1], s.name))
    header: dict[str, object] = {"__metadata__": metadata or {"format": "pt"}}
    offset = 0
    for spec in ordered:
        header[spec.name] = {
            "dtype": _ST_DTYPES[spec.dtype][0],
            "shape": list(spec.shape),
            "data_offsets": [offset, offset + spec.nbytes],
        }
        offset += spec.nbytes
    header_bytes = 8 + math.ceil(len(json.dumps(header, separators=(",", ":")).encode()) / 8) * 8
    return header_bytes + offset, header_bytes


def is_peft_model(model: Any) -> bool:
    """Whether ``model`` is a peft model (adapters attached, not merged)."""
    try:
        from peft import PeftModel
    except ImportError:  # peft is a core dependency; a broken install simply has no peft models
        return False
    return isinstance(model, PeftModel)


def lora_base(peft_model: Any) -> nn.Module:
    """A copy of ``peft_model``'s compressed base with the adapters removed, not merged (what is exported)."""
    return copy.deepcopy(peft_model).unload()  # unload on a copy: the caller's model keeps its adapters


def adapter_layout(peft_model: Any) -> list[TensorSpec]:
    """The tensors of the adapter file peft's ``save_pretrained`` writes (``get_peft_model_state_dict``)."""
    from peft.utils import get_peft_model_state_dict

    state = get_peft_model_state_dict(peft_model)
    return [TensorSpec(name, t.dtype, tuple(t.shape), ADAPTER) for name, t in state.items()]


def checkpoint_size(model: nn.Module) -> SizeBreakdown:
    """Size of ``model``'s exported checkpoint in bytes, with its breakdown. Example::

    checkpoint_size(model).total  # what `du -b` of the weight file(s) will say

    For a peft model (unmerged LoRA) the total is the compressed base plus the adapter file.
    """
    if is_peft_model(model):
        base = checkpoint_size(lora_base(model))
        adapter, _ = safetensors_bytes(adapter_layout(model))
        return dataclasses.replace(base, total=base.total + adapter, adapter=adapter)
    specs = checkpoint_layout(model)
    total, header = safetensors_bytes(specs)
    by_kind = {kind: sum(s.nbytes for s in specs if s.kind == kind) for kind in (PACKED, SCALES, SPARSE_META, DENSE)}
    layers = compressed_layers(model)
    n_weights = sum(layer.weight.numel() for layer in layers.values())
    compressed_bytes = sum(s.nbytes for name, layer in layers.items() for s in layer_layout(name, layer))
    return SizeBreakdown(
        total=total,
        header=header,
        bits_per_weight=8 * compressed_bytes / n_weights if n_weights else None,
        **by_kind,
    )
