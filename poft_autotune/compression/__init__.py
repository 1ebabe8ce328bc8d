"""The compression registry: ``compress_(model, configs)`` and ``register_method``.

A method is one module in this package holding a frozen config dataclass (subclass of
``CompressionConfig``) and an apply function registered with ``@register_method(name, ConfigClass)``.
Modules are discovered on import, so adding a method edits nothing central.
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import pkgutil
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, cast

import torch
from torch import nn

from poft_autotune.compression.base import (
    Calibration,
    CompressionConfig,
    compressed_layers,
    get_mask,
    get_quant,
    select_layers,
    strip_,
)
from poft_autotune.errors import InvalidConfigError

ApplyFn = Callable[[nn.Module, Mapping[str, nn.Linear], Any], None]


@dataclasses.dataclass(frozen=True)
class MethodSpec:
    name: str
    config_cls: type[CompressionConfig]
    apply: ApplyFn
    takes_calibration: bool = False  # apply declares a ``calibration`` keyword parameter


_METHODS: dict[str, MethodSpec] = {}


def register_method(name: str, config_cls: type[CompressionConfig]) -> Callable[[ApplyFn], ApplyFn]:
    """Register ``apply(model, layers, config)`` as compression method ``name``.

    An apply function that declares a ``calibration`` keyword parameter receives the calibration
    batches given to ``compress_`` (a list of model-input dicts, or None). Example::

        @register_method("quantize", QuantizeConfig)
        def quantize_(model, layers, config): ...

        @register_method("prune", PruneConfig)
        def prune_(model, layers, config, *, calibration=None): ...
    """

    def decorator(fn: ApplyFn) -> ApplyFn:
        if name in _METHODS and _METHODS[name].apply is not fn:
            raise InvalidConfigError(f"Compression method {name!r} is already registered.")
        if config_cls.method != name:
            raise InvalidConfigError(f"{config_cls.__name__}.method is {config_cls.method!r}, expected {name!r}.")
        _METHODS[name] = MethodSpec(name, config_cls, fn, "calibration" in inspect.signature(fn).parameters)
        return fn

    return decorator


def available_methods() -> list[str]:
    """Names of the registered compression methods, sorted."""
    return sorted(_METHODS)


def get_method(name: str) -> MethodSpec:
    """The registered method ``name``; unknown names raise an error listing what exists."""
    try:
        return _METHODS[name]
    except KeyError:
        raise InvalidConfigError(
            f"Unknown compression method {name!r}; available methods: {available_methods()}."
        ) from None


def config_from_dict(data: Mapping[str, Any]) -> CompressionConfig:
    """Rebuild a config from ``CompressionConfig.to_dict()`` output."""
    if "method" not in data:
        raise InvalidConfigError(f"A compression config dict needs a 'method' key, got {dict(data)!r}.")
    return get_method(str(data["method"])).config_cls.from_dict(data)


def _as_config(config: CompressionConfig | Mapping[str, Any]) -> CompressionConfig:
    if isinstance(config, CompressionConfig):
        get_method(config.method)
        return config
    if isinstance(config, Mapping):
        return config_from_dict(config)
    raise InvalidConfigError(
        f"A compression config must be a CompressionConfig or a dict, got {type(config).__name__}."
    )


@dataclasses.dataclass
class CompressedModel:
    """A model after ``compress_``: the model itself plus the configs applied, in order."""

    model: nn.Module
    configs: tuple[CompressionConfig, ...]

    def layers(self) -> dict[str, nn.Linear]:
        return compressed_layers(self.model)

    def size(self) -> Any:
        """Size breakdown of the exported checkpoint (see ``poft_autotune.size``)."""
        from poft_autotune.size import checkpoint_size

        return checkpoint_size(self.model)

    def strip_(self) -> nn.Module:
        """Drop masks, latents and hooks; the shipped weights stay."""
        return strip_(self.model)


def _planned(layers: dict[str, nn.Linear], shapes: Mapping[str, tuple[int, int]]) -> dict[str, nn.Linear]:
    """``layers`` with those a shape-changing method will resize replaced by meta-device stand-ins."""
    out = dict(layers)
    for name, (rows, cols) in shapes.items():
        if name in out:
            out[name] = nn.Linear(cols, rows, bias=False, device="meta")
    return out


def check_configs(model: nn.Module, configs: Sequence[CompressionConfig], *, calibration: bool = False) -> None:
    """Check that ``configs`` can be applied to ``model`` in this order, changing nothing.

    ``compress_`` runs this before touching a weight; ``autotune`` runs it on every plan its search space
    can propose, before any work. ``calibration``: whether calibration batches will be given. Raises
    InvalidConfigError naming the method, the field and the value. Example::

        check_configs(model, [NMConfig(n=2, m=4), QuantizeConfig(bits=4, group_size=32)])
    """
    shapes: dict[str, tuple[int, int]] = {}
    for i, config in enumerate(configs):
        if config.changes_shapes and i > 0:
            raise InvalidConfigError(
                f"Method {config.method!r} removes structure (tensor shapes change), so it must come first in "
                f"the plan, got it at position {i} of {[c.method for c in configs]}. Move it to the front."
            )
        if config.needs_calibration and not calibration:
            raise InvalidConfigError(
                f"{config.short()!r} ({config.method}) is data-aware and needs calibration batches, got "
                "calibration=None. Pass compress_(model, configs, calibration=[batch, ...]) with model-input "
                "dicts (input_ids, attention_mask), or use a weight-only criterion."
            )
        config.check_model(model)  # the architecture first: its error says more than "no layer found"
        layers = select_layers(model, config.targets)
        if not layers:
            where = (
                "the Linear layers of the transformer blocks" if config.targets is None else f"targets={config.targets}"
            )
            raise InvalidConfigError(
                f"Method {config.method!r} found no layer to compress in {type(model).__name__} ({where}). "
                "Pass `targets` (regular expressions over module names) that match nn.Linear layers."
            )
        config.check_layers(_planned(layers, shapes))
        if config.changes_shapes:
            shapes = config.planned_shapes(model)


def compress_(
    model: nn.Module,
    configs: Iterable[CompressionConfig | Mapping[str, Any]] | CompressionConfig,
    calibration: Iterable[Mapping[str, torch.Tensor]] | None = None,
) -> CompressedModel:
    """Apply compression configs to ``model`` in place, in order (e.g. prune then quantize).

    Every config is checked against the model before any weight changes. ``calibration``: model-input
    dicts (``input_ids``, ``attention_mask``), needed by data-aware configs such as
    ``PruneConfig(criterion="wanda")``; it is read once into a list, and ``labels`` are ignored. Example::

        compress_(model, [PruneConfig(sparsity=0.5), QuantizeConfig(bits=4, group_size=32)])
        compress_(model, [PruneConfig(sparsity=0.5, criterion="wanda")], calibration=[collator(rows)])
    """
    if isinstance(configs, (CompressionConfig, Mapping)):
        configs = [configs]
    resolved = tuple(_as_config(c) for c in configs)
    batches: Calibration | None = None
    if calibration is not None:
        if isinstance(calibration, Mapping):  # one batch given bare
            calibration = [calibration]
        batches = [dict(b) for b in calibration]
        if not batches:
            raise InvalidConfigError("`calibration` is empty; pass at least one batch of model inputs, or None.")
    check_configs(model, resolved, calibration=batches is not None)
    for config in resolved:
        spec = get_method(config.method)
        # Selected afresh: after a shape-changing method, whole blocks may be gone.
        layers = select_layers(model, config.targets)
        if spec.takes_calibration:
            cast(Callable[..., None], spec.apply)(model, layers, config, calibration=batches)
        else:
            spec.apply(model, layers, config)
    return CompressedModel(model, resolved)


def _discover() -> None:
    for info in pkgutil.iter_modules(__path__):
        if info.name != "base" and not info.name.startswith("_"):
            importlib.import_module(f"{__name__}.{info.name}")


_discover()

__all__ = [
    "CompressedModel",
    "CompressionConfig",
    "available_methods",
    "check_configs",
    "compress_",
    "config_from_dict",
    "get_mask",
    "get_method",
    "get_quant",
    "register_method",
    "select_layers",
]
