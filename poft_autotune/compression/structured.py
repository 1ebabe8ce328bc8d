"""Structured pruning that physically removes attention heads, FFN channels and whole blocks.

The result is a smaller dense model of the same class: the Linear layers are resliced, the blocks
renumbered and the model config updated, so ``save_pretrained`` + ``from_pretrained`` reload it as is.
Removal is uniform (the same count in every block), because the config holds one number per kind.

Importance (the lowest-scoring units go):

* ``magnitude`` (weights only): a KV group of heads scores the L2 norm of its slices of q, k, v (rows)
  and of the output projection (columns); an FFN channel the norm of its rows of the input
  projection(s) and its column of the output projection; a block the norm of its two output
  projections (what it writes into the residual stream).
* ``activation`` (needs calibration): a head group or channel scores ``||X_j|| * ||W_out[:, j]||``
  over the input features ``j`` of the output projection it feeds (Wanda's score, per unit); a block
  scores its Block Influence ``1 - cos(h_in, h_out)`` averaged over tokens (Men et al. 2024, ShortGPT).

Shapes change, so this method must come first in a plan (``compress_`` enforces it).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from poft_autotune.compression import register_method
from poft_autotune.compression.base import (
    Calibration,
    CompressionConfig,
    _require,
    compressed_layers,
    forward_calibration,
    input_norms,
    valid_tokens,
)
from poft_autotune.errors import InvalidConfigError

if TYPE_CHECKING:
    import optuna

IMPORTANCES = ("magnitude", "activation")


@dataclasses.dataclass(frozen=True)
class _Arch:
    """Where an architecture keeps its blocks and which Linear plays which role in a block."""

    blocks: str  # attribute path of the ModuleList of blocks, from ``model.base_model``
    q: str
    k: str
    v: str
    o: str
    ffn_in: tuple[str, ...]  # channels are their rows
    ffn_out: str  # channels are its columns
    heads_supported: bool


_LLAMA = _Arch(
    "layers",
    "self_attn.q_proj",
    "self_attn.k_proj",
    "self_attn.v_proj",
    "self_attn.o_proj",
    ("mlp.gate_proj", "mlp.up_proj"),
    "mlp.down_proj",
    True,
)
# transformers >= 5 BERT derives the head size as hidden_size / num_attention_heads and has no
# `pruned_heads` / `prune_heads` any more, so a BERT with fewer heads cannot be described by its config.
_BERT = _Arch(
    "encoder.layer",
    "attention.self.query",
    "attention.self.key",
    "attention.self.value",
    "attention.output.dense",
    ("intermediate.dense",),
    "output.dense",
    False,
)
ARCHITECTURES = {"llama": _LLAMA, "bert": _BERT}
SUPPORTED = tuple(sorted(ARCHITECTURES))


def _arch(model: nn.Module) -> _Arch:
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    arch = ARCHITECTURES.get(str(model_type))
    if arch is None or not hasattr(model, "base_model"):
        raise InvalidConfigError(
            f"Structured pruning does not support model type {model_type!r} ({type(model).__name__}); "
            f"supported model types: {list(SUPPORTED)}. Use 'prune', 'nm' or 'quantize' for other models."
        )
    return arch


def _config(model: nn.Module) -> Any:
    return getattr(model, "config", None)


def _base(model: nn.Module) -> nn.Module:
    base: nn.Module = getattr(model, "base_model", model)
    return base


def _linear(block: nn.Module, name: str) -> nn.Linear:
    layer = block.get_submodule(name)
    if not isinstance(layer, nn.Linear):
        raise InvalidConfigError(f"Expected an nn.Linear at {name!r} in {type(block).__name__}, got {type(layer)}.")
    return layer


def _blocks(model: nn.Module, arch: _Arch) -> tuple[str, nn.ModuleList]:
    """Qualified name prefix of the block list and the list itself."""
    base = _base(model)
    blocks = base.get_submodule(arch.blocks)
    if not isinstance(blocks, nn.ModuleList):
        raise InvalidConfigError(f"Expected a ModuleList of blocks at {arch.blocks!r} in {type(base).__name__}.")
    base_name = next(name for name, module in model.named_modules() if module is base)
    return (f"{base_name}.{arch.blocks}" if base_name else arch.blocks), blocks


@dataclasses.dataclass(frozen=True)
class _Geometry:
    heads: int  # query heads
    kv_heads: int  # key/value heads; a unit of head pruning is one KV group (heads // kv_heads query heads)
    head_dim: int
    intermediate: int
    layers: int

    @property
    def group(self) -> int:
        return self.heads // self.kv_heads


def _geometry(model: nn.Module) -> _Geometry:
    config = _config(model)
    heads = int(config.num_attention_heads)
    kv_heads = int(getattr(config, "num_key_value_heads", None) or heads)
    head_dim = int(getattr(config, "head_dim", None) or config.hidden_size // heads)
    return _Geometry(heads, kv_heads, head_dim, int(config.intermediate_size), int(config.num_hidden_layers))


def _count(fraction: float, total: int) -> int:
    return round(fraction * total)


@dataclasses.dataclass(frozen=True, kw_only=True)
class StructuredConfig(CompressionConfig):
    """Remove ``heads`` (fraction of attention heads, in whole KV groups), ``ffn`` (fraction of FFN
    channels), both uniform per block, and ``layers`` (number of whole blocks); the model shrinks.

    Supported: Llama (heads, ffn, layers) and BERT (ffn, layers). Must come first in a plan.
    Example: ``StructuredConfig(heads=0.25, ffn=0.5, layers=1)``.
    """

    method = "structured"
    changes_shapes = True
    invalid = {
        "heads": (-0.1, 1.0, "half", True),
        "ffn": (-0.5, 1.0, None),
        "layers": (-1, 1.5, True),
        "importance": ("random", None),
        "targets": (("mlp",),),
    }
    heads: float = 0.0
    ffn: float = 0.0
    layers: int = 0
    importance: str = "magnitude"

    def validate(self) -> None:
        _require(
            self.targets is None,
            f"`targets` must be None for structured pruning (it removes whole heads, channels and blocks of "
            f"the transformer), got {self.targets!r}.",
        )
        for field in ("heads", "ffn"):
            value = getattr(self, field)
            _require(
                isinstance(value, (int, float)) and not isinstance(value, bool) and 0 <= value < 1,
                f"`{field}` must be a fraction in [0, 1), got {value!r}. Use e.g. {field}=0.25 to remove a quarter.",
            )
        _require(
            isinstance(self.layers, int) and not isinstance(self.layers, bool) and self.layers >= 0,
            f"`layers` must be an integer >= 0 (whole blocks removed), got {self.layers!r}.",
        )
        _require(
            self.importance in IMPORTANCES,
            f"`importance` must be one of {IMPORTANCES}, got {self.importance!r}. 'activation' needs calibration.",
        )

    @property
    def needs_calibration(self) -> bool:
        return self.importance == "activation"

    def check_model(self, model: nn.Module) -> None:
        arch = _arch(model)
        _blocks(model, arch)
        if compressed_layers(model):
            raise InvalidConfigError(
                "Structured pruning must run on a model without compression state (masks, quantizers): put "
                "'structured' first in the plan and apply it to the dense model."
            )
        geo = _geometry(model)
        if self.heads > 0:
            _require(
                arch.heads_supported,
                f"`heads` must be 0 for model type {_config(model).model_type!r}: transformers derives its head size "
                "from hidden_size / num_attention_heads, so fewer heads could not be reloaded. Head pruning is "
                "supported for: "
                f"{[name for name, a in ARCHITECTURES.items() if a.heads_supported]}; use `ffn` or `layers` here.",
            )
            removed = _count(self.heads, geo.kv_heads)
            _require(
                removed < geo.kv_heads,
                f"`heads` must leave at least one KV group of heads: heads={self.heads} removes {removed} of "
                f"{geo.kv_heads} groups ({geo.group} query heads each). Use a smaller fraction.",
            )
        _require(
            _count(self.ffn, geo.intermediate) < geo.intermediate,
            f"`ffn` must leave at least one FFN channel, got ffn={self.ffn} of {geo.intermediate} channels.",
        )
        _require(
            self.layers < geo.layers,
            f"`layers` must leave at least one block, got layers={self.layers} of {geo.layers} blocks.",
        )

    def planned_shapes(self, model: nn.Module) -> dict[str, tuple[int, int]]:
        arch = _arch(model)
        prefix, blocks = _blocks(model, arch)
        geo = _geometry(model)
        hidden = int(_config(model).hidden_size)
        kv = geo.kv_heads - _count(self.heads, geo.kv_heads)
        channels = geo.intermediate - _count(self.ffn, geo.intermediate)
        shapes: dict[str, tuple[int, int]] = {}
        for i in range(len(blocks)):
            at = f"{prefix}.{i}"
            if self.heads > 0:
                shapes[f"{at}.{arch.q}"] = (kv * geo.group * geo.head_dim, hidden)
                shapes[f"{at}.{arch.k}"] = shapes[f"{at}.{arch.v}"] = (kv * geo.head_dim, hidden)
                shapes[f"{at}.{arch.o}"] = (hidden, kv * geo.group * geo.head_dim)
            if self.ffn > 0:
                for name in arch.ffn_in:
                    shapes[f"{at}.{name}"] = (channels, hidden)
                shapes[f"{at}.{arch.ffn_out}"] = (hidden, channels)
        return shapes

    @classmethod
    def suggest(cls, trial: optuna.Trial, choices: Mapping[str, Any]) -> StructuredConfig:
        heads = choices.get("heads", (0.0, 0.5))
        ffn = choices.get("ffn", (0.0, 0.5))
        layers = choices.get("layers", (0, 0))
        return cls(
            heads=trial.suggest_float("structured.heads", *heads),
            ffn=trial.suggest_float("structured.ffn", *ffn),
            layers=trial.suggest_int("structured.layers", *layers),
            importance=trial.suggest_categorical("structured.importance", list(choices.get("importance", IMPORTANCES))),
        )

    def short(self) -> str:
        parts = [f"h{round(100 * self.heads)}"] if self.heads else []
        parts += [f"f{round(100 * self.ffn)}"] if self.ffn else []
        parts += [f"l{self.layers}"] if self.layers else []
        return "-".join(["struct", *parts] + (["act"] if self.importance == "activation" else []))


def _required(calibration: Calibration | None) -> Calibration:
    if calibration is None:  # compress_ checks this first; this guards direct calls of the apply function
        raise InvalidConfigError(
            "`importance` 'activation' needs calibration batches, got none. Pass "
            "compress_(model, configs, calibration=[batch, ...]) or use importance='magnitude'."
        )
    return calibration


def _slice_(layer: nn.Linear, index: torch.Tensor, dim: int) -> None:
    """Keep ``index`` along ``dim`` (0: output rows with their bias, 1: input columns), in place."""
    with torch.no_grad():
        weight = layer.weight.index_select(dim, index.to(layer.weight.device)).clone()
        layer.weight = nn.Parameter(weight, requires_grad=layer.weight.requires_grad)
        if dim == 0:
            if layer.bias is not None:
                bias = layer.bias.index_select(0, index.to(layer.bias.device)).clone()
                layer.bias = nn.Parameter(bias, requires_grad=layer.bias.requires_grad)
            layer.out_features = len(index)
        else:
            layer.in_features = len(index)


def _sq_rows(layer: nn.Linear) -> torch.Tensor:
    return layer.weight.detach().float().square().sum(1)


def _sq_cols(layer: nn.Linear) -> torch.Tensor:
    return layer.weight.detach().float().square().sum(0)


def _keep(score: torch.Tensor, n_keep: int) -> torch.Tensor:
    """Indices of the ``n_keep`` highest scores, in their original order (ties: the earlier unit)."""
    order = torch.sort(score.cpu(), descending=True, stable=True).indices
    return torch.sort(order[:n_keep]).values


@torch.no_grad()
def _block_influence(model: nn.Module, blocks: nn.ModuleList, calibration: Calibration) -> torch.Tensor:
    """``1 - cos(input, output)`` of each block, averaged over non-padding tokens (ShortGPT)."""
    totals = torch.zeros(len(blocks), dtype=torch.float64)
    tokens = torch.zeros(len(blocks), dtype=torch.float64)
    token_mask: list[torch.Tensor | None] = [None]

    def hook_for(i: int) -> Any:
        def hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> None:
            x = args[0] if args else kwargs["hidden_states"]
            y = output[0] if isinstance(output, tuple) else output
            cos = nn.functional.cosine_similarity(x.float(), y.float(), dim=-1)
            kept = valid_tokens(cos.unsqueeze(-1), token_mask[0], f"block {i}")
            totals[i] += float((1 - kept).sum())
            tokens[i] += kept.shape[0]

        return hook

    handles = [block.register_forward_hook(hook_for(i), with_kwargs=True) for i, block in enumerate(blocks)]
    try:
        forward_calibration(model, calibration, lambda mask: token_mask.__setitem__(0, mask))
    finally:
        for handle in handles:
            handle.remove()
    return (totals / tokens.clamp_min(1)).float()


def _drop_blocks_(model: nn.Module, arch: _Arch, config: StructuredConfig, calibration: Calibration | None) -> None:
    _, blocks = _blocks(model, arch)
    if config.importance == "activation":
        score = _block_influence(model, blocks, _required(calibration))
    else:
        score = torch.stack(
            [(_sq_rows(_linear(b, arch.o)).sum() + _sq_rows(_linear(b, arch.ffn_out)).sum()).sqrt() for b in blocks]
        )
    kept = _keep(score, len(blocks) - config.layers).tolist()
    new = nn.ModuleList([blocks[i] for i in kept])
    for i, block in enumerate(new):
        for module in block.modules():  # the KV cache is indexed by layer_idx
            if isinstance(getattr(module, "layer_idx", None), int):
                setattr(module, "layer_idx", i)  # noqa: B010 (typed nn.Module has no such attribute)
    parent_path, _, attr = arch.blocks.rpartition(".")
    parent = _base(model).get_submodule(parent_path) if parent_path else _base(model)
    setattr(parent, attr, new)
    cfg = _config(model)
    cfg.num_hidden_layers = len(new)
    layer_types = getattr(cfg, "layer_types", None)
    if isinstance(layer_types, list) and len(layer_types) == len(blocks):
        cfg.layer_types = [layer_types[i] for i in kept]


def _prune_heads_(model: nn.Module, arch: _Arch, config: StructuredConfig, norms: Mapping[str, torch.Tensor]) -> None:
    prefix, blocks = _blocks(model, arch)
    geo = _geometry(model)
    kv_keep = geo.kv_heads - _count(config.heads, geo.kv_heads)
    for i, block in enumerate(blocks):
        q, k, v, o = (_linear(block, name) for name in (arch.q, arch.k, arch.v, arch.o))
        q_units = geo.group * geo.head_dim  # rows of q (columns of o) per KV group
        if config.importance == "activation":
            per_col = _sq_cols(o).cpu() * norms[f"{prefix}.{i}.{arch.o}"].square()
            score = per_col.view(geo.kv_heads, q_units).sum(1)
        else:
            score = (
                _sq_rows(q).view(geo.kv_heads, q_units).sum(1)
                + _sq_rows(k).view(geo.kv_heads, geo.head_dim).sum(1)
                + _sq_rows(v).view(geo.kv_heads, geo.head_dim).sum(1)
                + _sq_cols(o).view(geo.kv_heads, q_units).sum(1)
            )
        groups = _keep(score, kv_keep)
        q_index = (groups[:, None] * q_units + torch.arange(q_units)).flatten()
        kv_index = (groups[:, None] * geo.head_dim + torch.arange(geo.head_dim)).flatten()
        _slice_(q, q_index, 0)
        _slice_(k, kv_index, 0)
        _slice_(v, kv_index, 0)
        _slice_(o, q_index, 1)
    cfg = _config(model)
    cfg.head_dim = geo.head_dim  # explicit: hidden_size // num_attention_heads no longer gives it
    cfg.num_attention_heads = kv_keep * geo.group
    cfg.num_key_value_heads = kv_keep


def _prune_ffn_(model: nn.Module, arch: _Arch, config: StructuredConfig, norms: Mapping[str, torch.Tensor]) -> None:
    prefix, blocks = _blocks(model, arch)
    geo = _geometry(model)
    keep = geo.intermediate - _count(config.ffn, geo.intermediate)
    for i, block in enumerate(blocks):
        ins = [_linear(block, name) for name in arch.ffn_in]
        out = _linear(block, arch.ffn_out)
        if config.importance == "activation":
            score = _sq_cols(out).cpu() * norms[f"{prefix}.{i}.{arch.ffn_out}"].square()
        else:
            score = sum((_sq_rows(layer) for layer in ins), start=_sq_cols(out))
        channels = _keep(score, keep)
        for layer in ins:
            _slice_(layer, channels, 0)
        _slice_(out, channels, 1)
    cfg = _config(model)
    cfg.intermediate_size = keep


@register_method("structured", StructuredConfig)
def structured_(
    model: nn.Module,
    layers: Mapping[str, nn.Linear],
    config: StructuredConfig,
    *,
    calibration: Calibration | None = None,
) -> None:
    """Drop blocks first, then score heads and channels on the blocks that remain."""
    del layers  # whole heads, channels and blocks, not a selection of Linears
    arch = _arch(model)
    if config.layers:
        _drop_blocks_(model, arch, config, calibration)
    if not (config.heads or config.ffn):
        return
    norms: dict[str, torch.Tensor] = {}
    if config.importance == "activation":
        calibration = _required(calibration)
        prefix, blocks = _blocks(model, arch)
        outs = {
            f"{prefix}.{i}.{name}": _linear(block, name)
            for i, block in enumerate(blocks)
            for name, wanted in ((arch.o, config.heads), (arch.ffn_out, config.ffn))
            if wanted
        }
        norms = input_norms(model, outs, calibration)
    if config.heads:
        _prune_heads_(model, arch, config, norms)
    if config.ffn:
        _prune_ffn_(model, arch, config, norms)
