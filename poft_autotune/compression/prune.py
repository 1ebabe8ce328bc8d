"""Pruning by weight magnitude: unstructured (per layer or global) and N:M semi-structured.

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
from poft_autotune.compression.base import CompressionConfig, _require, get_mask, master_weight, set_mask_

if TYPE_CHECKING:
    import optuna

SCOPES = ("layer", "global")


def _importance(layer: nn.Linear) -> torch.Tensor:
    # Already-pruned entries get importance 0 so that a second pruning pass prunes them first.
    score = master_weight(layer).detach().abs().float()
    mask = get_mask(layer)
    return score * mask if mask is not None else score


def _keep_largest(score: torch.Tensor, n_prune: int) -> torch.Tensor:
    """Mask keeping all but the ``n_prune`` smallest entries (exact count, ties broken by position)."""
    mask = torch.ones(score.numel(), dtype=torch.bool, device=score.device)
    if n_prune > 0:
        mask[torch.topk(score.flatten(), n_prune, largest=False).indices] = False
    return mask.view_as(score)


@dataclasses.dataclass(frozen=True, kw_only=True)
class PruneConfig(CompressionConfig):
    """Unstructured magnitude pruning to ``sparsity`` (fraction of weights set to zero).

    ``scope="layer"`` prunes each layer to the same sparsity; ``"global"`` ranks all target weights
    together, so layers with small weights lose more. Example: ``PruneConfig(sparsity=0.5)``.
    """

    method = "prune"
    invalid = {"sparsity": (-0.1, 1.0, 1.5, "half"), "scope": ("row",)}
    sparsity: float = 0.5
    scope: str = "layer"

    def validate(self) -> None:
        _require(
            isinstance(self.sparsity, (int, float)) and not isinstance(self.sparsity, bool) and 0 <= self.sparsity < 1,
            f"`sparsity` must be in [0, 1), got {self.sparsity!r}. Use e.g. sparsity=0.5 for half the weights.",
        )
        _require(self.scope in SCOPES, f"`scope` must be one of {SCOPES}, got {self.scope!r}.")

    @classmethod
    def suggest(cls, trial: optuna.Trial, choices: Mapping[str, Any]) -> PruneConfig:
        low, high = choices.get("sparsity", (0.1, 0.9))
        return cls(
            sparsity=trial.suggest_float("prune.sparsity", low, high),
            scope=trial.suggest_categorical("prune.scope", list(choices.get("scope", SCOPES))),
        )

    def short(self) -> str:
        return f"sparse{round(100 * self.sparsity)}" + ("-global" if self.scope == "global" else "")


@register_method("prune", PruneConfig)
def prune_(model: nn.Module, layers: Mapping[str, nn.Linear], config: PruneConfig) -> None:
    del model
    scores = {name: _importance(layer) for name, layer in layers.items()}
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

    2:4 is the pattern sparse tensor cores accelerate. Example: ``NMConfig(n=2, m=4)``.
    """

    method = "nm"
    invalid = {"n": (0, 4, -1), "m": (0, 1, 2.0)}
    n: int = 2
    m: int = 4

    def validate(self) -> None:
        for field, value in (("n", self.n), ("m", self.m)):
            _require(
                isinstance(value, int) and not isinstance(value, bool) and value > 0,
                f"`{field}` must be a positive integer, got {value!r}.",
            )
        _require(self.n < self.m, f"`n` must be smaller than `m` (keep n of every m), got n={self.n}, m={self.m}.")

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
        return cls(n=n, m=m)

    def short(self) -> str:
        return f"{self.n}:{self.m}"


@register_method("nm", NMConfig)
def nm_prune_(model: nn.Module, layers: Mapping[str, nn.Linear], config: NMConfig) -> None:
    del model
    for layer in layers.values():
        score = _importance(layer)
        blocks = score.reshape(score.shape[0], -1, config.m)
        keep = torch.topk(blocks, config.n, dim=-1).indices
        mask = torch.zeros_like(blocks, dtype=torch.bool).scatter_(-1, keep, True)
        set_mask_(layer, mask.reshape(score.shape))
