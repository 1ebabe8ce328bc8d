"""The search space and the plan a trial runs: ``suggest_plan(trial, space) -> TrialPlan``.

Optuna parameter names are stable and namespaced (``method``, ``<method>.<field>``,
``recovery.<field>``), so a stored trial can be replayed with ``optuna.trial.FixedTrial(params)``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any, cast

import optuna
from torch import nn

from poft_autotune.compression import available_methods, config_from_dict, get_method
from poft_autotune.compression.base import CompressionConfig, select_layers
from poft_autotune.compression.structured import ARCHITECTURES
from poft_autotune.errors import InvalidConfigError


@dataclasses.dataclass(frozen=True, kw_only=True)
class RecoveryConfig:
    """How a compressed model is fine-tuned back. ``steps=0`` ships it as compressed.

    ``distill_weight`` w mixes the loss as ``(1 - w) * task + w * KD`` with temperature ``temperature``.
    ``lora_rank`` 0 fine-tunes every weight; > 0 trains LoRA adapters of that rank (alpha ``lora_alpha``,
    default ``2 * rank``) on the frozen compressed layers, merged and re-compressed before evaluation.
    ``lora_merge=False`` ships the adapters unmerged instead: the compressed base plus the adapter in full
    precision (peft's ``adapter_model.safetensors``); the trial evaluates that pair and its size counts
    the adapter's bytes. A LoRA update smaller than half a grid step is rounded away by the merge, so on
    a coarse grid (int4/int3) the unmerged form keeps what recovery learned, at the adapter's cost.
    """

    steps: int = 50
    learning_rate: float = 5e-5
    distill_weight: float = 0.0
    temperature: float = 2.0
    lora_rank: int = 0
    lora_alpha: int | None = None
    lora_dropout: float = 0.0
    lora_merge: bool = True

    def __post_init__(self) -> None:
        if not isinstance(self.steps, int) or isinstance(self.steps, bool) or self.steps < 0:
            raise InvalidConfigError(f"`recovery.steps` must be an integer >= 0, got {self.steps!r}.")
        if not (isinstance(self.learning_rate, (int, float)) and self.learning_rate > 0):
            raise InvalidConfigError(f"`recovery.learning_rate` must be > 0, got {self.learning_rate!r}.")
        if not 0 <= self.distill_weight <= 1:
            raise InvalidConfigError(f"`recovery.distill_weight` must be in [0, 1], got {self.distill_weight!r}.")
        if not self.temperature > 0:
            raise InvalidConfigError(f"`recovery.temperature` must be > 0, got {self.temperature!r}.")
        if not isinstance(self.lora_rank, int) or isinstance(self.lora_rank, bool) or self.lora_rank < 0:
            raise InvalidConfigError(
                f"`recovery.lora_rank` must be an integer >= 0 (0 = full fine-tune), got {self.lora_rank!r}."
            )
        if self.lora_alpha is not None and (not isinstance(self.lora_alpha, int) or self.lora_alpha <= 0):
            raise InvalidConfigError(
                f"`recovery.lora_alpha` must be a positive integer or None, got {self.lora_alpha!r}."
            )
        if not 0 <= self.lora_dropout < 1:
            raise InvalidConfigError(f"`recovery.lora_dropout` must be in [0, 1), got {self.lora_dropout!r}.")
        if not isinstance(self.lora_merge, bool):
            raise InvalidConfigError(
                f"`recovery.lora_merge` must be True (merge and re-compress) or False (ship the adapter "
                f"separately), got {self.lora_merge!r}."
            )

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


_SUGGESTED_RECOVERY = ("steps", "learning_rate", "distill_weight", "temperature", "lora_rank")


@dataclasses.dataclass(frozen=True)
class TrialPlan:
    """What one trial does: compression configs (applied in order), recovery, and the seed."""

    compression: tuple[CompressionConfig, ...]
    recovery: RecoveryConfig
    seed: int = 0

    @property
    def label(self) -> str:
        return "+".join(c.short() for c in self.compression) or "dense"

    def to_dict(self) -> dict[str, Any]:
        return {
            "compression": [c.to_dict() for c in self.compression],
            "recovery": self.recovery.to_dict(),
            "seed": self.seed,
        }

    def to_params(self) -> dict[str, Any]:
        """The Optuna parameters that make ``suggest_plan`` draw this plan, for ``study.enqueue_trial``."""
        params: dict[str, Any] = {"method": "+".join(c.method for c in self.compression)}
        for config in self.compression:
            params.update(config.to_params())
        params.update({f"recovery.{k}": v for k, v in self.recovery.to_dict().items() if k in _SUGGESTED_RECOVERY})
        return params

    def same_as(self, other: TrialPlan) -> bool:
        """Equal apart from the seed (two trials of the same plan)."""
        return self.compression == other.compression and self.recovery == other.recovery

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> TrialPlan:
        return cls(
            compression=tuple(config_from_dict(c) for c in data.get("compression", [])),
            recovery=RecoveryConfig(**data.get("recovery", {})),
            seed=int(data.get("seed", 0)),
        )


@dataclasses.dataclass(frozen=True)
class SearchSpace:
    """Which plans a search may propose.

    ``methods``: method combinations, each a ``+``-joined sequence applied in order (``"prune+quantize"``).
    ``choices``: per method, overrides of its suggest ranges (e.g. ``{"quantize": {"bits": (3, 8)}}``).
    Recovery ranges: ``steps`` (int, low..high), ``learning_rate`` (log-uniform), ``distill_weight``,
    ``temperature``; a range with low == high fixes the value. ``lora_rank``: ranks to choose from (0 = full
    fine-tune; ``(0,)`` never uses LoRA). ``lora_merge``: for LoRA trials, whether the adapters are merged
    and re-compressed (``True``) or shipped beside the compressed base (``False``); ``(True, False)`` lets
    the search choose (parameter ``recovery.lora_merge``).
    """

    methods: tuple[str, ...] = ("quantize", "prune", "nm", "prune+quantize")
    choices: Mapping[str, Mapping[str, Any]] = dataclasses.field(default_factory=dict)
    steps: tuple[int, int] = (20, 100)
    learning_rate: tuple[float, float] = (1e-5, 5e-4)
    distill_weight: tuple[float, float] = (0.0, 1.0)
    temperature: tuple[float, float] = (1.0, 4.0)
    lora_rank: tuple[int, ...] = (0, 8, 16)  # 0 = full fine-tune; the search chooses
    lora_merge: tuple[bool, ...] = (True,)

    def __post_init__(self) -> None:
        if isinstance(self.methods, str):
            object.__setattr__(self, "methods", (self.methods,))
        object.__setattr__(self, "methods", tuple(self.methods))
        if not self.methods:
            raise InvalidConfigError(f"`methods` must name at least one method; available: {available_methods()}.")
        for combo in self.methods:
            for name in combo.split("+"):
                get_method(name)  # unknown names raise, listing what exists
        for name in self.choices:
            get_method(name)
        for field in ("steps", "learning_rate", "distill_weight", "temperature"):
            low, high = getattr(self, field)
            if low > high:
                raise InvalidConfigError(f"`{field}` range must have low <= high, got {(low, high)!r}.")
        object.__setattr__(self, "lora_rank", tuple(self.lora_rank))
        if not self.lora_rank or any(not isinstance(r, int) or r < 0 for r in self.lora_rank):
            raise InvalidConfigError(
                f"`lora_rank` must list integers >= 0 (0 = full fine-tune), got {self.lora_rank!r}."
            )
        object.__setattr__(self, "lora_merge", tuple(self.lora_merge))
        if not self.lora_merge or any(not isinstance(m, bool) for m in self.lora_merge):
            raise InvalidConfigError(
                f"`lora_merge` must list True and/or False (e.g. (True, False) to let the search choose), "
                f"got {self.lora_merge!r}."
            )
        if self.steps[0] < 0 or self.learning_rate[0] <= 0:
            raise InvalidConfigError(
                f"`steps` must be >= 0 and `learning_rate` > 0, got steps={self.steps!r}, "
                f"learning_rate={self.learning_rate!r}."
            )
        if self.distill_weight[0] < 0 or self.distill_weight[1] > 1:
            raise InvalidConfigError(f"`distill_weight` range must lie in [0, 1], got {self.distill_weight!r}.")
        if self.temperature[0] <= 0:
            raise InvalidConfigError(f"`temperature` range must be > 0, got {self.temperature!r}.")

    def fitted_to(self, model: nn.Module) -> SearchSpace:
        """Restrict default choices to what the model's layers allow (e.g. group sizes dividing them)."""
        choices = {k: dict(v) for k, v in self.choices.items()}
        quantize = choices.setdefault("quantize", {})
        if "group_size" not in quantize:
            dims = {layer.in_features for layer in select_layers(model, None).values()}
            quantize["group_size"] = [None] + [g for g in (32, 64, 128) if dims and all(d % g == 0 for d in dims)]
        nm = choices.setdefault("nm", {})
        if "pattern" not in nm:
            dims = {layer.in_features for layer in select_layers(model, None).values()}
            nm["pattern"] = [p for p in ("2:4", "4:8") if all(d % int(p.split(":")[1]) == 0 for d in dims)] or ["2:4"]
        # prune/nm `criterion` defaults to both ("magnitude", "wanda"): run_trial passes calibration batches.
        config: Any = getattr(model, "config", None)
        arch = ARCHITECTURES.get(str(getattr(config, "model_type", None)))
        if arch is not None:
            structured = choices.setdefault("structured", {})
            if not arch.heads_supported:
                structured.setdefault("heads", (0.0, 0.0))  # e.g. BERT: fewer heads would not reload
            structured.setdefault("layers", (0, int(config.num_hidden_layers) // 4))  # up to a quarter of the blocks
        return dataclasses.replace(self, choices=choices)


def _suggest_range(trial: optuna.Trial, name: str, bounds: Sequence[float], log: bool = False) -> float:
    low, high = bounds
    if low == high:
        return low
    return trial.suggest_float(name, low, high, log=log)


def suggest_plan(trial: optuna.Trial, space: SearchSpace, seed: int = 0) -> TrialPlan:
    """Draw a plan from ``trial``. Replay a stored trial with ``suggest_plan(FixedTrial(params), space)``."""
    combo = trial.suggest_categorical("method", list(space.methods))
    configs = tuple(
        get_method(name).config_cls.suggest(trial, space.choices.get(name, {})) for name in combo.split("+")
    )
    low, high = space.steps
    steps = low if low == high else trial.suggest_int("recovery.steps", low, high)
    lora_rank = int(
        space.lora_rank[0]
        if len(space.lora_rank) == 1
        else trial.suggest_categorical("recovery.lora_rank", list(space.lora_rank))
    )
    merge = space.lora_merge[0] if lora_rank > 0 else True  # only LoRA trials have a merge choice
    if lora_rank > 0 and len(set(space.lora_merge)) > 1:
        merge = bool(trial.suggest_categorical("recovery.lora_merge", list(dict.fromkeys(space.lora_merge))))
    recovery = RecoveryConfig(
        steps=int(steps),
        learning_rate=_suggest_range(trial, "recovery.learning_rate", space.learning_rate, log=True),
        distill_weight=_suggest_range(trial, "recovery.distill_weight", space.distill_weight),
        temperature=_suggest_range(trial, "recovery.temperature", space.temperature),
        lora_rank=lora_rank,
        lora_merge=merge,
    )
    return TrialPlan(compression=configs, recovery=recovery, seed=seed)


def check_plan(plan: TrialPlan, space: SearchSpace) -> None:
    """Raise InvalidConfigError unless ``space`` can express ``plan`` (its method combination and every
    categorical choice; numbers may leave the ranges, e.g. a probe's 0 recovery steps)."""
    combo = "+".join(c.method for c in plan.compression)
    if combo not in space.methods:
        raise InvalidConfigError(f"Method combination {combo!r} is not in the search space {list(space.methods)}.")
    import warnings

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            suggest_plan(cast(optuna.Trial, optuna.trial.FixedTrial(plan.to_params())), space)  # same suggest API
    except ValueError as exc:
        raise InvalidConfigError(f"Plan {plan.label!r} is outside the search space: {exc}") from exc
