"""Replaying policies against a table of recorded trials: the search-efficiency benchmark's engine.

A :class:`TrialTable` holds real (or, in tests, synthetic) trials: a plan recovered for its full step
budget and its learning curve (metric after compression at step 0, then every few steps). :func:`replay`
runs a policy on a fresh Optuna study through the same code ``autotune`` uses (``ask_next``: promotion,
the policy's proposal, the sampler; ``DominanceMonitor``: constraints and early stopping), answering each
trial from the table instead of training. A proposal snaps to the nearest recorded plan of the same
method combination; a trial costs the recovery steps it ran (an early-stopped one, the steps up to the
check that stopped it).
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Iterable, Sequence
from pathlib import Path

import optuna

from poft_autotune.errors import InvalidConfigError
from poft_autotune.pareto import PLAN_ATTR, RESULT_ATTR
from poft_autotune.search.objective import TrialResult
from poft_autotune.search.policy import Constraints, Policy, StudyView, ask_next
from poft_autotune.search.space import SearchSpace, TrialPlan
from poft_autotune.search.stopping import DominanceMonitor, EarlyStopping


@dataclasses.dataclass(frozen=True)
class TableRow:
    """One recorded trial: its plan (recovered ``curve[-1][0]`` steps), size and learning curve."""

    plan: TrialPlan
    size_bytes: int
    curve: tuple[tuple[int, float], ...]  # (0, after compression), ..., (max steps, final)

    def at(self, steps: int) -> float:
        """The metric after ``steps`` recovery steps: the last recorded point at or before ``steps``."""
        value = self.curve[0][1]
        for step, metric in self.curve:
            if step <= steps:
                value = metric
        return value

    @property
    def max_steps(self) -> int:
        return self.curve[-1][0]


def _distance(a: TrialPlan, b: TrialPlan) -> float:
    pa = {k: v for c in a.compression for k, v in c.to_params().items()}
    pb = {k: v for c in b.compression for k, v in c.to_params().items()}
    total = 0.0
    for key in set(pa) | set(pb):
        x, y = pa.get(key), pb.get(key)
        numeric = isinstance(x, (int, float)) and isinstance(y, (int, float)) and not isinstance(x, bool)
        if numeric:
            total += abs(float(x) - float(y)) / max(abs(float(x)), abs(float(y)), 1e-9)  # type: ignore[arg-type]
        else:
            total += float(x != y)
    ra, rb = a.recovery, b.recovery
    total += abs(math.log(ra.learning_rate / rb.learning_rate)) / math.log(10)
    total += abs(ra.distill_weight - rb.distill_weight) + float(ra.lora_rank != rb.lora_rank)
    return total


class TrialTable:
    """Recorded trials and the dense reference. ``nearest(plan)`` is the row a proposal is answered from."""

    def __init__(
        self, rows: Sequence[TableRow], dense_metric: float, dense_size: int, greater_is_better: bool = True
    ) -> None:
        if not rows:
            raise InvalidConfigError("A TrialTable needs at least one recorded row, got none.")
        self.rows = list(rows)
        self.dense_metric = dense_metric
        self.dense_size = dense_size
        self.greater_is_better = greater_is_better

    @classmethod
    def from_jsonl(cls, path: str | Path, dense_size: int) -> TrialTable:
        """Rows written by ``studies/search_efficiency.py record`` (a ``dense`` line, then one per cell)."""
        dense, rows = math.nan, []
        for line in Path(path).read_text().splitlines():
            data = json.loads(line)
            if data["key"] == "dense":
                dense = float(data["metric"])
                continue
            curve = tuple((int(s), float(v)) for s, v in data["curve"])
            rows.append(TableRow(TrialPlan.from_dict(data["plan"]), int(data["size_bytes"]), curve))
        return cls(rows, dense, dense_size)

    def nearest(self, plan: TrialPlan) -> TableRow:
        combo = [c.method for c in plan.compression]
        same = [r for r in self.rows if [c.method for c in r.plan.compression] == combo]
        if not same:
            raise InvalidConfigError(f"The table has no row for method combination {'+'.join(combo)!r}.")
        return min(same, key=lambda r: _distance(plan, r.plan))


@dataclasses.dataclass(frozen=True)
class ReplayEvent:
    """One replayed trial and the study's state after it."""

    number: int
    plan: TrialPlan
    kind: str
    state: str
    steps: int  # recovery steps this trial cost
    size_bytes: int
    metric: float | None
    hypervolume: float  # of the feasible front after this trial


def replay(
    policy: Policy,
    table: TrialTable,
    space: SearchSpace,
    n_trials: int,
    *,
    seed: int = 0,
    study: optuna.Study | None = None,
    early_stopping: EarlyStopping | None = None,
    promote: bool = True,
    constraints: Constraints | None = None,
) -> list[ReplayEvent]:
    """Run ``n_trials`` trials of ``policy`` answered from ``table``; returns one event per trial.

    ``study``: the study to work (a stored one resumes: its trials are kept); default a new in-memory one.
    An empty study first gets the dense model as trial 0. Example::

        events = replay(get_policy("agent"), table, space, 30, seed=1, early_stopping=EarlyStopping())
        print(events[-1].hypervolume, sum(e.steps for e in events))
    """
    constraints = constraints or Constraints()
    rule = early_stopping or EarlyStopping(checks=0)
    if study is None:
        study = optuna.create_study(directions=["minimize", "maximize"], sampler=policy.sampler(seed))
    if not study.get_trials(deepcopy=False):
        d = table.dense_metric
        dense = TrialResult(table.dense_size, {}, "metric", table.greater_is_better, d, d, d, 0, {})
        dense_plan = TrialPlan.from_dict({"recovery": {"steps": 0}, "seed": seed})
        study.add_trial(
            optuna.trial.create_trial(
                values=[table.dense_size, table.dense_metric],
                user_attrs={PLAN_ATTR: dense_plan.to_dict(), RESULT_ATTR: dense.to_dict()},
                system_attrs={f"constraints:{k}": v for k, v in constraints.values(table.dense_size, 1.0).items()},
            )
        )
    events = []
    for done in range(n_trials):

        def view(left: int = n_trials - done) -> StudyView:
            return StudyView.read(
                study,
                space,
                dense_metric=table.dense_metric,
                dense_size=table.dense_size,
                greater_is_better=table.greater_is_better,
                budget_left=left,
                budget_total=n_trials,
                constraints=constraints,
                seed=seed,
            )

        trial, plan = ask_next(study, space, policy, view, promote=promote, seed=seed)
        row = table.nearest(plan)
        steps = min(plan.recovery.steps, row.max_steps)
        monitor = DominanceMonitor(trial, rule, view, constraints)
        spent, metric, state = 0, None, "COMPLETE"
        try:
            monitor.start(row.size_bytes)
            monitor.report(0, row.at(0))
            for check in monitor.eval_steps(steps):
                spent = check
                monitor.report(check, row.at(check))
        except optuna.TrialPruned:
            study.tell(trial, state=optuna.trial.TrialState.PRUNED)
            state = "PRUNED"
        else:
            spent, metric = steps, row.at(steps)
            compressed = row.at(0)
            result = TrialResult(
                row.size_bytes, {}, "metric", table.greater_is_better, table.dense_metric, compressed, metric, steps, {}
            )
            trial.set_user_attr(RESULT_ATTR, result.to_dict())
            for key, value in constraints.values(row.size_bytes, result.retained).items():
                trial.set_constraint(key, value)
            study.tell(trial, [row.size_bytes, metric])
        events.append(
            ReplayEvent(
                trial.number,
                plan,
                str(trial.user_attrs.get("proposal", "sampler")),
                state,
                spent,
                row.size_bytes,
                metric,
                view().hypervolume(),
            )
        )
    return events


def curve_at(events: Iterable[ReplayEvent], budgets: Sequence[float], by: str = "steps") -> list[float]:
    """Hypervolume reached within each budget (cumulative recovery steps, or trials with ``by="trials"``)."""
    spent, points = 0.0, []
    for event in events:
        spent += event.steps if by == "steps" else 1
        points.append((spent, event.hypervolume))
    return [max((hv for s, hv in points if s <= budget), default=0.0) for budget in budgets]
