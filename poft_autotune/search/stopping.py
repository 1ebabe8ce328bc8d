"""Dominance-based early stopping and multi-fidelity promotion, for every policy.

Optuna's pruners need ``trial.report``, which multi-objective studies refuse. Here a trial's size is
known before it trains (its compressed checkpoint), so at a few evaluation points during recovery we
ask: can this trial still reach the front? Its final metric is projected optimistically (best value so
far plus the latest gain rate continued to the last step, plus a margin); if a completed front point is
no larger and better than that projection, the trial stops with ``optuna.TrialPruned``. The curve and
the reason are stored on the trial (user_attrs ``intermediate`` and ``pruned_reason``).

Promotion: front points found with a short recovery are re-run with the full budget (a new trial whose
``parent`` is the short one), so the front a user reads is measured at full budget.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence

import optuna

from poft_autotune.errors import InvalidConfigError
from poft_autotune.search.policy import (
    CURVE_ATTR,
    PRUNED_ATTR,
    Constraints,
    Proposal,
    StudyView,
    TrialRecord,
)


@dataclasses.dataclass(frozen=True)
class EarlyStopping:
    """When and how eagerly recovery trials are stopped. ``EarlyStopping(checks=0)`` turns it off.

    ``checks``: evaluations during recovery, evenly spaced (3 -> at 1/4, 1/2 and 3/4 of the steps); each
    costs one evaluation of the eval set. ``min_steps``: no check before this step. ``margin``: optimism
    added to the projection, as a fraction of the dense metric (0.005 = half a point of a 0.9 accuracy
    is ~0.0045), against evaluation noise.
    """

    checks: int = 3
    min_steps: int = 10
    margin: float = 0.005

    def __post_init__(self) -> None:
        if not isinstance(self.checks, int) or isinstance(self.checks, bool) or self.checks < 0:
            raise InvalidConfigError(f"`EarlyStopping.checks` must be an integer >= 0, got {self.checks!r}.")
        if not isinstance(self.min_steps, int) or self.min_steps < 1:
            raise InvalidConfigError(f"`EarlyStopping.min_steps` must be an integer >= 1, got {self.min_steps!r}.")
        if not (isinstance(self.margin, (int, float)) and self.margin >= 0):
            raise InvalidConfigError(f"`EarlyStopping.margin` must be >= 0, got {self.margin!r}.")

    def eval_steps(self, max_steps: int) -> list[int]:
        """The optimizer steps after which the trial is evaluated (never the last: that is the final eval)."""
        steps = {round(max_steps * k / (self.checks + 1)) for k in range(1, self.checks + 1)}
        return sorted(s for s in steps if self.min_steps <= s < max_steps)

    def projection(self, curve: Sequence[tuple[int, float]], max_steps: int, greater_is_better: bool) -> float:
        """Optimistic final metric: the best so far plus the latest gain rate carried to ``max_steps``."""
        sign = 1.0 if greater_is_better else -1.0
        best = max(sign * v for _, v in curve)
        rate = 0.0
        if len(curve) >= 2:
            (s0, v0), (s1, v1) = curve[-2], curve[-1]
            rate = max(0.0, sign * (v1 - v0) / max(1, s1 - s0))
        return sign * (best + rate * max(0, max_steps - curve[-1][0]))

    def dominated_by(
        self,
        size_bytes: int,
        curve: Sequence[tuple[int, float]],
        max_steps: int,
        front: Sequence[TrialRecord],
        greater_is_better: bool,
        dense_metric: float,
    ) -> tuple[TrialRecord, float] | None:
        """The front point that beats this trial's optimistic projection at no larger size, if any."""
        sign = 1.0 if greater_is_better else -1.0
        projected = self.projection(curve, max_steps, greater_is_better) + sign * self.margin * abs(dense_metric)
        beaters = [
            p
            for p in front
            if p.size_bytes is not None
            and p.recovered is not None
            and p.size_bytes <= size_bytes
            and sign * p.recovered > sign * projected
        ]
        if not beaters:
            return None
        return max(beaters, key=lambda p: sign * (p.recovered or 0.0)), projected


class DominanceMonitor:
    """Run by ``run_trial`` (its ``monitor``): records the learning curve on the Optuna trial and stops
    the trial when the current front (read from storage at each check) dominates its projection or it
    cannot reach ``constraints.min_retained``; refuses plans over ``constraints.max_size_bytes`` before
    any evaluation."""

    def __init__(
        self,
        trial: optuna.Trial,
        rule: EarlyStopping,
        view: Callable[[], StudyView],
        constraints: Constraints,
    ) -> None:
        self.trial = trial
        self.rule = rule
        self.view = view
        self.constraints = constraints
        self.curve: list[tuple[int, float]] = []
        self.size_bytes: int | None = None
        self.max_steps = 0

    def eval_steps(self, max_steps: int) -> list[int]:
        self.max_steps = max_steps
        return self.rule.eval_steps(max_steps)

    def start(self, size_bytes: int) -> None:
        self.size_bytes = size_bytes
        self.trial.set_user_attr("size_bytes", size_bytes)
        limit = self.constraints.max_size_bytes
        if limit is not None and size_bytes > limit:
            self._prune(f"its checkpoint is {size_bytes:,} bytes, over max_size_bytes={limit:,}")

    def report(self, step: int, metric: float) -> None:
        self.curve.append((step, float(metric)))
        self.trial.set_user_attr(CURVE_ATTR, [list(p) for p in self.curve])
        if step == 0 or self.size_bytes is None or not math.isfinite(metric):
            return
        view = self.view()
        projected = self.rule.projection(self.curve, self.max_steps, view.greater_is_better)
        if self.constraints.min_retained is not None:
            margin = self.rule.margin * abs(view.dense_metric)
            best_case = view.retained(projected + (margin if view.greater_is_better else -margin))
            if best_case < self.constraints.min_retained:
                self._prune(
                    f"at step {step} its {metric:.4g} projects to at most {100 * best_case:.1f} % of dense, "
                    f"below min_retained={self.constraints.min_retained}"
                )
        hit = self.rule.dominated_by(
            self.size_bytes, self.curve, self.max_steps, view.front(), view.greater_is_better, view.dense_metric
        )
        if hit is not None:
            point, bound = hit
            self._prune(
                f"at step {step}/{self.max_steps} its metric {metric:.4g} projects to at most {bound:.4g}, and front "
                f"trial {point.number} is smaller or equal ({point.size_bytes:,} <= {self.size_bytes:,} bytes) and "
                f"better ({point.recovered:.4g})"
            )

    def _prune(self, reason: str) -> None:
        self.trial.set_user_attr(PRUNED_ATTR, reason)
        raise optuna.TrialPruned(reason)


def promotion(view: StudyView, full_steps: int) -> Proposal | None:
    """Re-run the smallest front point that was recovered with fewer than ``full_steps``, with ``full_steps``.

    ``None`` when every front point is a probe (no recovery), already at full budget or already promoted.
    """
    promoted = {r.parent for r in view.records if r.kind == "promote"}
    for record in view.front():
        steps = record.plan.recovery.steps
        if 0 < steps < full_steps and record.number not in promoted:
            recovery = dataclasses.replace(record.plan.recovery, steps=full_steps)
            plan = dataclasses.replace(record.plan, recovery=recovery)
            if view.tried(plan):
                continue
            kept = 100 * view.retained(record.recovered or math.nan)
            return Proposal(
                plan,
                f"promote: trial {record.number} ({record.plan.label}) is on the front with {kept:.1f} % retained "
                f"after a short recovery of {steps} steps; re-run with the full {full_steps} steps so the front is "
                "measured at full budget.",
                kind="promote",
                parent=record.number,
            )
    return None


def pending_promotions(view: StudyView, full_steps: int) -> int:
    """How many front points still await promotion (what the budget's tail is reserved for)."""
    promoted = {r.parent for r in view.records if r.kind == "promote"}
    return sum(1 for r in view.front() if 0 < r.plan.recovery.steps < full_steps and r.number not in promoted)


__all__ = ["DominanceMonitor", "EarlyStopping", "pending_promotions", "promotion"]
