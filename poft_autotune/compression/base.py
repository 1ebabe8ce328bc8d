"""What every compression method shares: the config base class, layer selection, per-layer state.

A compressed ``nn.Linear`` carries its state on the module itself, so it follows the model through
``.to(device)``, ``deepcopy`` and the Trainer's wrapping without a side table:

* ``poft_mask``   (non-persistent bool buffer): True where the weight is kept. Pruned entries are 0 and
  their gradients are masked at backward time, so gradient clipping and AdamW never see them.
* ``poft_latent`` (non-persistent buffer): the full-precision "master" weight of a quantized layer.
* ``poft_quant``  (attribute): an object with ``fake_quantize(w) -> w_on_grid`` (see ``quantize.py``).

Between optimizer steps ``weight`` always holds the *shipped* value (on the grid, masked). The recovery
callback swaps the latent in just for ``optimizer.step`` and re-quantizes once afterwards: that is the
straight-through estimator (the gradient taken at the quantized weight updates the latent), at the
cost of one quantization per optimizer step instead of one per forward.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, ClassVar, Protocol

import torch
from torch import nn

from poft_autotune.errors import InvalidConfigError

if TYPE_CHECKING:
    import optuna

# A Linear whose qualified name has an integer path component sits inside a ModuleList of repeated
# transformer blocks (``model.layers.3.mlp.up_proj``, ``bert.encoder.layer.0.output.dense``). Heads,
# poolers and embeddings do not, and are left alone unless targeted explicitly.
_BLOCK_PATTERN = re.compile(r"(^|\.)\d+\.")

# Calibration data: model-input dicts (``input_ids``, ``attention_mask``, ...), one per batch.
Calibration = Sequence[Mapping[str, torch.Tensor]]


class QuantGrid(Protocol):
    """What a layer needs to know about its quantizer to keep its weight on the grid."""

    def fake_quantize(self, weight: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor: ...


@dataclasses.dataclass(frozen=True, kw_only=True)
class CompressionConfig:
    """Base class of the frozen, validated config of one compression method.

    ``targets``: regular expressions (``re.search``) over module names selecting the ``nn.Linear``
    layers to compress; ``None`` means the Linear layers of the transformer blocks.
    """

    method: ClassVar[str] = ""
    # Values each field must reject; the contract test (tests/test_compression.py) checks every method's.
    invalid: ClassVar[dict[str, tuple[Any, ...]]] = {"targets": ("q_proj", ("[",))}
    targets: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        if self.targets is not None:
            if isinstance(self.targets, str) or not all(isinstance(t, str) for t in self.targets):
                raise InvalidConfigError(
                    f"`targets` must be a tuple of regular expressions, got {self.targets!r}. "
                    "Pass e.g. targets=('q_proj', 'v_proj')."
                )
            object.__setattr__(self, "targets", tuple(self.targets))
            for pattern in self.targets:
                try:
                    re.compile(pattern)
                except re.error as exc:
                    raise InvalidConfigError(
                        f"`targets` entry {pattern!r} is not a valid regular expression: {exc}."
                    ) from exc
        self.validate()

    def validate(self) -> None:
        """Check the fields; raise InvalidConfigError naming the field, the value and the fix."""

    # True for methods that physically remove structure (tensor shapes change): they must run first.
    changes_shapes: ClassVar[bool] = False

    @property
    def needs_calibration(self) -> bool:
        """Whether applying this config needs calibration batches (``compress_(..., calibration=...)``)."""
        return False

    def check_model(self, model: nn.Module) -> None:
        """Check that the config can apply to this model (architecture, sizes), before anything is changed."""

    def check_layers(self, layers: Mapping[str, nn.Linear]) -> None:
        """Check that the config can apply to these layers, before anything is changed."""

    def planned_shapes(self, model: nn.Module) -> dict[str, tuple[int, int]]:
        """For ``changes_shapes`` methods: ``(out_features, in_features)`` of each Linear it resizes, by its
        current name, so the configs after it are checked against the shapes they will meet."""
        return {}

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able dict with a ``method`` key; inverse of ``config_from_dict``."""
        out: dict[str, Any] = {"method": self.method}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            out[f.name] = list(value) if isinstance(value, tuple) else value
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> CompressionConfig:
        """Build from ``to_dict`` output (the ``method`` key, if present, must match)."""
        data = dict(data)
        method = data.pop("method", cls.method)
        if method != cls.method:
            raise InvalidConfigError(f"Config dict is for method {method!r}, not {cls.method!r}.")
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise InvalidConfigError(
                f"Unknown field(s) {unknown} for method {cls.method!r}; valid fields: {sorted(names)}."
            )
        if isinstance(data.get("targets"), list):
            data["targets"] = tuple(data["targets"])
        return cls(**data)

    def to_params(self) -> dict[str, Any]:
        """The Optuna parameters (``<method>.<field>``) that make ``suggest`` return this config; used to
        enqueue a chosen plan. Fields ``suggest`` does not draw are ignored by it (e.g. ``targets``)."""
        return {
            f"{self.method}.{f.name}": getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "targets"
        }

    @classmethod
    def suggest(cls, trial: optuna.Trial, choices: Mapping[str, Any]) -> CompressionConfig:
        """Draw a config from ``trial`` with parameters named ``<method>.<field>``."""
        raise NotImplementedError

    def short(self) -> str:
        """A compact human label, e.g. ``int4-g128``."""
        return self.method


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise InvalidConfigError(message)


def select_layers(model: nn.Module, targets: tuple[str, ...] | None) -> dict[str, nn.Linear]:
    """The Linear layers a config applies to, by qualified name."""
    out = {}
    for name, module in model.named_modules():
        if not isinstance(module, nn.Linear):
            continue
        if targets is None:
            if _BLOCK_PATTERN.search(name):
                out[name] = module
        elif any(re.search(pattern, name) for pattern in targets):
            out[name] = module
    return out


@torch.no_grad()
def forward_calibration(
    model: nn.Module, calibration: Calibration, on_batch: Callable[[torch.Tensor | None], None]
) -> None:
    """Run ``model`` (eval mode, no grad) on every calibration batch; before each forward,
    ``on_batch(token_mask)`` receives the batch's ``attention_mask`` as bools (None without one), so
    hooks can leave padding out. ``labels`` are dropped (no loss is needed)."""
    was_training = model.training
    model.eval()  # no dropout: statistics of the function the model computes
    device = next(model.parameters()).device
    try:
        for batch in calibration:
            inputs = {k: torch.as_tensor(v).to(device) for k, v in batch.items() if k != "labels"}
            mask = inputs.get("attention_mask")
            on_batch(None if mask is None else mask.bool())
            model(**inputs)
    finally:
        model.train(was_training)


def valid_tokens(x: torch.Tensor, token_mask: torch.Tensor | None, where: str) -> torch.Tensor:
    """The rows of ``x`` (``[batch, seq, features]`` or flattened ``[tokens, features]``) at non-padding
    tokens, as ``[tokens, features]``."""
    if token_mask is not None:
        if x.shape[:-1] == token_mask.shape:
            return x[token_mask]
        if x.dim() == 2 and x.shape[0] == token_mask.numel():
            return x[token_mask.flatten()]
        raise InvalidConfigError(
            f"Calibration: the input of {where!r} has shape {tuple(x.shape)}, which does not match the batch's "
            f"attention_mask {tuple(token_mask.shape)}; pass batches whose attention_mask is [batch, seq]."
        )
    return x.reshape(-1, x.shape[-1])


def input_norms(model: nn.Module, layers: Mapping[str, nn.Linear], calibration: Calibration) -> dict[str, torch.Tensor]:
    """L2 norm over calibration tokens of every input feature of each layer: ``{name: [in_features]}``.

    One no-grad forward pass over ``calibration`` with pre-hooks on ``layers``; tokens where the batch's
    ``attention_mask`` is 0 (padding) are left out. Example::

        norms = input_norms(model, select_layers(model, None), [{"input_ids": ids, "attention_mask": am}])
    """
    sums = {name: torch.zeros(layer.in_features, dtype=torch.float64) for name, layer in layers.items()}
    token_mask: list[torch.Tensor | None] = [None]  # the current batch's, read by the hooks

    def hook_for(name: str) -> Any:
        def hook(module: nn.Module, args: tuple[Any, ...]) -> None:
            x = valid_tokens(args[0].detach(), token_mask[0], name)
            sums[name] += x.double().square().sum(0).cpu()

        return hook

    handles = [layer.register_forward_pre_hook(hook_for(name)) for name, layer in layers.items()]
    try:
        forward_calibration(model, calibration, lambda mask: token_mask.__setitem__(0, mask))
    finally:
        for handle in handles:
            handle.remove()
    return {name: total.sqrt().float() for name, total in sums.items()}


def compressed_layers(model: nn.Module) -> dict[str, nn.Linear]:
    """Every Linear layer that carries compression state (a mask, a quantizer, or both)."""
    return {
        name: m
        for name, m in model.named_modules()
        if isinstance(m, nn.Linear) and (get_mask(m) is not None or get_quant(m) is not None)
    }


def get_mask(layer: nn.Module) -> torch.Tensor | None:
    return getattr(layer, "poft_mask", None)


def get_quant(layer: nn.Module) -> Any:
    return getattr(layer, "poft_quant", None)


def master_weight(layer: nn.Linear) -> torch.Tensor:
    """The full-precision weight training updates: the latent of a quantized layer, else the weight."""
    latent = getattr(layer, "poft_latent", None)
    return latent if latent is not None else layer.weight.data


def _mask_grad(layer: nn.Linear) -> Any:
    def hook(param: torch.Tensor) -> None:
        mask = get_mask(layer)
        if mask is not None and param.grad is not None:
            # In place on the accumulated .grad: one pass, no allocation (torch.where(mask, g, 0.0)
            # measured ~7x slower on MiniLM-sized weights).
            param.grad.mul_(mask)

    return hook


def set_mask_(layer: nn.Linear, mask: torch.Tensor) -> None:
    """Give ``layer`` a pruning mask (intersected with any mask it has) and zero the pruned weights."""
    mask = mask.to(device=layer.weight.device, dtype=torch.bool)
    old = get_mask(layer)
    if old is not None:
        mask = mask & old
        layer.poft_mask = mask
    else:
        layer.register_buffer("poft_mask", mask, persistent=False)
    ensure_mask_hook_(layer)
    refresh_(layer)


def ensure_mask_hook_(layer: nn.Linear) -> None:
    """Mask ``layer``'s weight gradient at backward time, if it has a mask and a trainable weight.

    Masking in the backward pass (not only before ``optimizer.step``) keeps pruned entries out of the
    gradient-clipping norm as well as out of the optimizer state.
    """
    if get_mask(layer) is not None and layer.weight.requires_grad and getattr(layer, "_poft_hook", None) is None:
        # Runs after each backward has accumulated into .grad, i.e. before clipping and optimizer.step.
        layer._poft_hook = layer.weight.register_post_accumulate_grad_hook(_mask_grad(layer))


def set_quant_(layer: nn.Linear, grid: QuantGrid) -> None:
    """Put ``layer`` under a quantizer; its current weight becomes the latent master weight."""
    if getattr(layer, "poft_latent", None) is None:
        layer.register_buffer("poft_latent", layer.weight.detach().clone(), persistent=False)
    # A plain attribute, not a submodule or buffer: nn.Module.__setattr__ keeps it in __dict__.
    object.__setattr__(layer, "poft_quant", grid)
    refresh_(layer)


def refresh_(layer: nn.Linear) -> None:
    """Recompute the shipped weight from the master weight: mask, then project onto the grid."""
    mask = get_mask(layer)
    quant = get_quant(layer)
    master = master_weight(layer)
    with torch.no_grad():
        if mask is not None:
            master.mul_(mask)
        if quant is not None:
            # Zero is exactly on every grid (integer zero point), so masked entries stay 0.
            if master.data_ptr() == layer.weight.data.data_ptr():
                layer.weight.data.copy_(quant.fake_quantize(master))
            else:
                quant.fake_quantize(master, out=layer.weight.data)


def strip_(model: nn.Module) -> nn.Module:
    """Remove all compression state, leaving the shipped weights as plain parameters."""
    for layer in compressed_layers(model).values():
        hook = getattr(layer, "_poft_hook", None)
        if hook is not None:
            hook.remove()
            del layer._poft_hook
        for buffer in ("poft_mask", "poft_latent"):
            if buffer in layer._buffers:
                del layer._buffers[buffer]
        if hasattr(layer, "poft_quant"):
            del layer.poft_quant
    return model
