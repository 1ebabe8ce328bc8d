"""The compression registry: ``compress_(model, configs)`` and ``register_method``.

A method is one module in this package holding a frozen config dataclass (subclass of
``CompressionConfig``) and an apply function registered with ``@register_method(name, ConfigClass)``.
Modules are discovered on import, so adding a method edits nothing central.
"""

from __future__ import annotations

import dataclasses
import importlib
import pkgutil
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from torch import nn

from poft_autotune.compression.base import (
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


_METHODS: dict[str, MethodSpec] = {}


def register_method(name: str, config_cls: type[CompressionConfig]) -> Callable[[ApplyFn], ApplyFn]:
    """Register ``apply(model, layers, config)`` as compression method ``name``.

    Example::

        @register_method("quantize", QuantizeConfig)
        def quantize_(model, layers, config): ...
    """

    def decorator(fn: ApplyFn) -> ApplyFn:
        if name in _METHODS and _METHODS[name].apply is not fn:
            raise InvalidConfigError(f"Compression method {name!r} is already registered.")
        if config_cls.method != name:
            raise InvalidConfigError(f"{config_cls.__name__}.method is {config_cls.method!r}, expected {name!r}.")
        _METHODS[name] = MethodSpec(name, config_cls, fn)
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


def compress_(
    model: nn.Module, configs: Iterable[CompressionConfig | Mapping[str, Any]] | CompressionConfig
) -> CompressedModel:
    """Apply compression configs to ``model`` in place, in order (e.g. prune then quantize).

    Every config is checked against the model before any weight changes. Example::

        compress_(model, [PruneConfig(sparsity=0.5), QuantizeConfig(bits=4, group_size=32)])
    """
    if isinstance(configs, (CompressionConfig, Mapping)):
        configs = [configs]
    resolved = tuple(_as_config(c) for c in configs)
    selections = []
    for config in resolved:
        layers = select_layers(model, config.targets)
        if not layers:
            where = (
                "the Linear layers of the transformer blocks" if config.targets is None else f"targets={config.targets}"
            )
            raise InvalidConfigError(
                f"Method {config.method!r} found no layer to compress in {type(model).__name__} ({where}). "
                "Pass `targets` (regular expressions over module names) that match nn.Linear layers."
            )
        config.check_layers(layers)
        selections.append(layers)
    for config, layers in zip(resolved, selections, strict=True):
        get_method(config.method).apply(model, layers, config)
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
    "compress_",
    "config_from_dict",
    "get_mask",
    "get_method",
    "get_quant",
    "register_method",
    "select_layers",
]
