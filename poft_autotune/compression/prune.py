"""Pruning: unstructured (per layer or global) and N:M semi-structured, by magnitude or by Wanda.

Criteria (the score of weight ``W_ij``; the lowest scores are pruned):

* ``magnitude``: ``|W_ij|``.
* ``wanda`` (Sun et al. 2023, "A Simple and Effective Pruning Approach for Large Language Models"):
  ``|W_ij| * ||X_j||_2``, with ``||X_j||_2`` the L2 norm of input feature ``j`` over the (non-padding)
  tokens of the calibration batches. Unstructured Wanda compares weights within each output row, as in
  the paper; N:M Wanda ranks within each group of ``m``. It needs ``compress_(..., calibration=...)``.

Pruned weights are set to zero and recorded in a boolean mask on the layer (``poft_mask``); the mask
is enforced during recovery (gradients masked at backward time, weights re-masked after each optimizer
step) so pruned entries and their AdamW moments stay exactly zero.
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
    get_mask,
    input_norms,
    master_weight,
    set_mask_,
)
from poft_autotune.errors import InvalidConfigError

if TYPE_CHECKING:
    import optuna

SCOPES = ("layer", "global")
CRITERIA = ("magnitude", "wanda")


_NEEDS_CALIBRATION = (
    "`criterion` 'wanda' needs calibration batches (it weighs each weight by the norm of its input "
    "feature), got none. Pass compress_(model, configs, calibration=[batch, ...]) or use criterion='magnitude'."
)


def _importance(layer: nn.Linear, input_norm: torch.Tensor | None = None) -> torch.Tensor:
    # Already-pruned entries get importance 0 so that a second pruning pass prunes them first.
    score = master_weight(layer).detach().abs().float()
    if input_norm is not None:  # Wanda: |W_ij| * ||X_j||, broadcast over the output rows
        score = score * input_norm.to(score.device)
    mask = get_mask(layer)
    return score * mask if mask is not None else score


def _scores(
    model: nn.Module, layers: Mapping[str, nn.Linear], criterion: str, calibration: Calibration | None
) -> dict[str, torch.Tensor]:
    if criterion != "wanda":
        return {name: _importance(layer) for name, layer in layers.items()}
    if calibration is None:  # compress_ checks this first; this guards direct calls of the apply function
        raise InvalidConfigError(_NEEDS_CALIBRATION)
    norms = input_norms(model, layers, calibration)
    return {name: _importance(layer, norms[name]) for name, layer in layers.items()}


def _validate_criterion(criterion: object) -> None:
    _require(
        criterion in CRITERIA,
        f"`criterion` must be one of {CRITERIA}, got {criterion!r}. 'wanda' needs calibration batches.",
    )


def _keep_largest(score: torch.Tensor, n_prune: int) -> torch.Tensor:
    """Mask keeping all but the ``n_prune`` smallest entries (exact count, ties broken by position).

    The threshold comes from ``kthvalue`` (a selection, not a partial sort like ``topk``: 8 ms instead
    of 34 ms for a 1536 x 384 layer on one core); entries equal to it are pruned first-come.
    """
    flat = score.flatten()
    if n_prune <= 0:
        return torch.ones_like(score, dtype=torch.bool)
    threshold = torch.kthvalue(flat, n_prune).values
    prune = flat < threshold
    ties = torch.nonzero(flat == threshold).flatten()[: n_prune - int(prune.sum())]
    prune[ties] = True
    return (~prune).view_as(score)


def _keep_largest_per_row(score: torch.Tensor, n_prune: int) -> torch.Tensor:
    """Mask keeping all but the ``n_prune`` smallest entries of every row (Wanda's comparison group)."""
    mask = torch.ones_like(score, dtype=torch.bool)
    if n_prune > 0:
        mask.scatter_(1, torch.topk(score, n_prune, dim=1, largest=False).indices, False)
    return mask


@dataclasses.dataclass(frozen=True, kw_only=True)
class PruneConfig(CompressionConfig):
    """Unstructured pruning to ``sparsity`` (fraction of weights set to zero).

    ``criterion="magnitude"``: ``scope="layer"`` prunes each layer to the same sparsity; ``"global"``
    ranks all target weights together, so layers with small weights lose more. ``criterion="wanda"``
    prunes ``sparsity`` of every output row by ``|W| * ||X||`` (needs calibration; scope must be
    ``"layer"``). Example: ``PruneConfig(sparsity=0.5)``, ``PruneConfig(sparsity=0.5, criterion="wanda")``.
    """

    method = "prune"
    invalid = {"sparsity": (-0.1, 1.0, 1.5, "half"), "scope": ("row",), "criterion": ("random", 1)}
    sparsity: float = 0.5
    scope: str = "layer"
    criterion: str = "magnitude"

    def validate(self) -> None:
        _require(
            isinstance(self.sparsity, (int, float)) and not isinstance(self.sparsity, bool) and 0 <= self.sparsity < 1,
            f"`sparsity` must be in [0, 1), got {self.sparsity!r}. Use e.g. sparsity=0.5 for half the weights.",
        )
        _require(self.scope in SCOPES, f"`scope` must be one of {SCOPES}, got {self.scope!r}.")
        _validate_criterion(self.criterion)
        _require(
            self.criterion != "wanda" or self.scope == "layer",
            f"`scope` must be 'layer' when `criterion` is 'wanda' (Wanda compares weights within each output "
            f"row; its scores are not comparable across layers), got scope={self.scope!r}.",
        )

    @property
    def needs_calibration(self) -> bool:
        return self.criterion == "wanda"

    @classmethod
    def suggest(cls, trial: optuna.Trial, choices: Mapping[str, Any]) -> PruneConfig:
        low, high = choices.get("sparsity", (0.1, 0.9))
        sparsity = trial.suggest_float("prune.sparsity", low, high)
        criterion = trial.suggest_categorical("prune.criterion", list(choices.get("criterion", CRITERIA)))
        if criterion == "wanda":  # scope is conditional: Wanda is always per row
            return cls(sparsity=sparsity, criterion="wanda")
        scope = trial.suggest_categorical("prune.scope", list(choices.get("scope", SCOPES)))
        return cls(sparsity=sparsity, scope=scope, criterion=criterion)

    def short(self) -> str:
        return (
            f"sparse{round(100 * self.sparsity)}"
            + ("-global" if self.scope == "global" else "")
            + ("-wanda" if self.criterion == "wanda" else "")
        )


@register_method("prune", PruneConfig)
def prune_(
    model: nn.Module,
    layers: Mapping[str, nn.Linear],
    config: PruneConfig,
    *,
    calibration: Calibration | None = None,
) -> None:
    scores = _scores(model, layers, config.criterion, calibration)
    if config.criterion == "wanda":
        for name, layer in layers.items():
            set_mask_(layer, _keep_largest_per_row(scores[name], round(config.sparsity * layer.in_features)))
        return
    if config.scope == "layer":
        for name, layer in layers.items():
            score = scores[name]
            set_mask_(layer, _keep_largest(score, round(config.sparsity * score.numel())))
        return
    flat = torch.cat([s.flatten().cpu() for s in scores.values()])
    n_prune = round(config.sparsity * flat.numel())
    if n_prune == 0:
        for name, layer in layers.items():
            set_mask_(layer, torch.ones_like(scores[name], dtype=torch.bool))
        return
    global_mask = _keep_largest(flat, n_prune)
    offset = 0
    for name, layer in layers.items():
        count = scores[name].numel()
        set_mask_(layer, global_mask[offset : offset + count].view_as(scores[name]))
        offset += count


@dataclasses.dataclass(frozen=True, kw_only=True)
class NMConfig(CompressionConfig):
    """N:M semi-structured pruning: in every ``m`` consecutive input weights of a row keep ``n``.

    2:4 is the pattern sparse tensor cores accelerate. ``criterion="wanda"`` ranks each group by
    ``|W| * ||X||`` (needs calibration). Example: ``NMConfig(n=2, m=4)``, ``NMConfig(criterion="wanda")``.
    """

    method = "nm"
    invalid = {"n": (0, 4, -1), "m": (0, 1, 2.0), "criterion": ("random", None)}
    n: int = 2
    m: int = 4
    criterion: str = "magnitude"

    def validate(self) -> None:
        for field, value in (("n", self.n), ("m", self.m)):
            _require(
                isinstance(value, int) and not isinstance(value, bool) and value > 0,
                f"`{field}` must be a positive integer, got {value!r}.",
            )
        _require(self.n < self.m, f"`n` must be smaller than `m` (keep n of every m), got n={self.n}, m={self.m}.")
        _validate_criterion(self.criterion)

    @property
    def needs_calibration(self) -> bool:
        return self.criterion == "wanda"

    def check_layers(self, layers: Mapping[str, nn.Linear]) -> None:
        for name, layer in layers.items():
            _require(
                layer.in_features % self.m == 0,
                f"`m` must divide the input dimension of every target layer, got m={self.m} for {name!r} "
                f"with in_features={layer.in_features}. Exclude that layer via `targets` or choose another m.",
            )

    @classmethod
    def suggest(cls, trial: optuna.Trial, choices: Mapping[str, Any]) -> NMConfig:
        pattern = trial.suggest_categorical("nm.pattern", list(choices.get("pattern", ["2:4", "4:8"])))
        n, m = (int(x) for x in str(pattern).split(":"))
        criterion = trial.suggest_categorical("nm.criterion", list(choices.get("criterion", CRITERIA)))
        return cls(n=n, m=m, criterion=criterion)

    def to_params(self) -> dict[str, Any]:
        return {"nm.pattern": f"{self.n}:{self.m}", "nm.criterion": self.criterion}

    def short(self) -> str:
        return f"{self.n}:{self.m}" + ("-wanda" if self.criterion == "wanda" else "")


@register_method("nm", NMConfig)
def nm_prune_(
    model: nn.Module,
    layers: Mapping[str, nn.Linear],
    config: NMConfig,
    *,
    calibration: Calibration | None = None,
) -> None:
    scores = _scores(model, layers, config.criterion, calibration)
    for name, layer in layers.items():
        score = scores[name]
        blocks = score.reshape(score.shape[0], -1, config.m)
        keep = torch.topk(blocks, config.n, dim=-1).indices
        mask = torch.zeros_like(blocks, dtype=torch.bool).scatter_(-1, keep, True)
        set_mask_(layer, mask.reshape(score.shape))
