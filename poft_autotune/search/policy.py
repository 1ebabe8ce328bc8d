"""Who proposes the next trial: the Policy protocol, its registry, and the Optuna-sampler built-ins.

A policy observes the study (read from storage, so a second worker or a resumed run sees the same) and
either proposes a plan with a rationale, which ``autotune`` enqueues on the study
(``study.enqueue_trial(plan.to_params(), user_attrs=...)``), or returns ``None`` and lets its Optuna sampler
draw the next trial. Built-ins: ``tpe`` (multi-objective TPE), ``nsga2``, ``random`` (samplers only) and
``agent`` (:mod:`poft_autotune.search.agent`). Register your own with ``@register_policy("name")``.

Example::

    front = autotune(model, train, evaluation, policy="nsga2")
    front = autotune(model, train, evaluation, policy=AgentPolicy(probe_share=0.5))
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from collections.abc import Callable, Iterable
from typing import Any, Protocol, runtime_checkable

import optuna

from poft_autotune.errors import InvalidConfigError
from poft_autotune.pareto import PLAN_ATTR, RESULT_ATTR
from poft_autotune.search.space import SearchSpace, TrialPlan, check_plan, suggest_plan
from poft_autotune.workers import ask, plan_seed

RATIONALE_ATTR = "rationale"  # why the trial was run (shown in the dashboard note)
KIND_ATTR = "proposal"  # probe | recover | push | tune | promote | sampler
PARENT_ATTR = "parent"  # trial number a promoted or tuned trial derives from
POLICY_ATTR = "policy"
CURVE_ATTR = "intermediate"  # [[step, metric], ...] measured during recovery (step 0: after compression)
PRUNED_ATTR = "pruned_reason"
ERROR_ATTR = "error"


@dataclasses.dataclass(frozen=True)
class Constraints:
    """Limits a shipped model must meet; trials that miss them stay in the study but not on the front.

    ``max_size_bytes``: the exported checkpoint's bytes. ``min_retained``: fraction of the dense metric
    kept (``recovered / dense``, or ``dense / recovered`` for lower-is-better metrics such as perplexity).
    """

    max_size_bytes: int | None = None
    min_retained: float | None = None

    def __post_init__(self) -> None:
        size = self.max_size_bytes
        if size is not None and (not isinstance(size, int) or isinstance(size, bool) or size <= 0):
            raise InvalidConfigError(f"`max_size_bytes` must be a positive integer or None, got {size!r}.")
        kept = self.min_retained
        if kept is not None and not (isinstance(kept, (int, float)) and 0 < kept <= 2):
            raise InvalidConfigError(
                f"`min_retained` must be a fraction of the dense metric in (0, 2] (e.g. 0.99), got {kept!r}."
            )

    @property
    def active(self) -> bool:
        return self.max_size_bytes is not None or self.min_retained is not None

    def values(self, size_bytes: float, retained: float) -> dict[str, float]:
        """Optuna constraint values (feasible when <= 0), by name, for ``trial.set_constraint``."""
        out = {}
        if self.max_size_bytes is not None:
            out["max_size_bytes"] = float(size_bytes - self.max_size_bytes)
        if self.min_retained is not None:
            out["min_retained"] = float(self.min_retained - retained) if math.isfinite(retained) else 1.0
        return out

    def feasible(self, size_bytes: float, retained: float) -> bool:
        return all(v <= 0 for v in self.values(size_bytes, retained).values())


@dataclasses.dataclass(frozen=True)
class Proposal:
    """A plan a policy wants run next, and why. ``parent``: the trial it refines or promotes."""

    plan: TrialPlan
    rationale: str
    kind: str = "explore"
    parent: int | None = None

    def user_attrs(self, policy: str) -> dict[str, Any]:
        attrs: dict[str, Any] = {
            PLAN_ATTR: self.plan.to_dict(),
            RATIONALE_ATTR: self.rationale,
            KIND_ATTR: self.kind,
            POLICY_ATTR: policy,
        }
        if self.parent is not None:
            attrs[PARENT_ATTR] = self.parent
        return attrs


@dataclasses.dataclass(frozen=True)
class TrialRecord:
    """One trial as a policy sees it: plan, state, measured numbers, learning curve."""

    number: int
    state: optuna.trial.TrialState
    plan: TrialPlan
    size_bytes: int | None = None  # known for complete trials and for pruned ones (measured before training)
    compressed: float | None = None
    recovered: float | None = None
    curve: tuple[tuple[int, float], ...] = ()
    kind: str | None = None
    parent: int | None = None
    feasible: bool = True

    @property
    def finished(self) -> bool:
        return self.state.is_finished()


@dataclasses.dataclass
class StudyView:
    """What a policy observes: the study's trials from storage, the dense reference, budget and constraints."""

    study: optuna.Study
    space: SearchSpace
    dense_metric: float
    dense_size: int
    greater_is_better: bool
    budget_left: int
    budget_total: int
    constraints: Constraints = dataclasses.field(default_factory=Constraints)
    seed: int = 0
    records: list[TrialRecord] = dataclasses.field(default_factory=list)

    @classmethod
    def read(cls, study: optuna.Study, space: SearchSpace, **kwargs: Any) -> StudyView:
        view = cls(study, space, **kwargs)
        view.records = [r for r in (_record(t, view.constraints) for t in study.get_trials(deepcopy=False)) if r]
        return view

    def retained(self, metric: float) -> float:
        """Fraction of the dense metric kept by ``metric`` (>1 is better than dense)."""
        if self.greater_is_better:
            return metric / self.dense_metric if self.dense_metric else math.nan
        return self.dense_metric / metric if metric else math.nan

    def completed(self) -> list[TrialRecord]:
        return [r for r in self.records if r.state == optuna.trial.TrialState.COMPLETE and r.recovered is not None]

    def front(self) -> list[TrialRecord]:
        """Non-dominated feasible completed trials (size down, metric up), sorted by size."""
        sign = 1.0 if self.greater_is_better else -1.0
        points = [r for r in self.completed() if r.feasible and r.size_bytes is not None]
        return sorted(
            [p for p in points if not any(_dominates(q, p, sign) for q in points if q is not p)],
            key=lambda r: (r.size_bytes, -sign * (r.recovered or 0.0)),
        )

    def tried(self, plan: TrialPlan) -> bool:
        """Whether any trial (finished, running or waiting: no duplicate proposals) ran or runs ``plan``."""
        return any(r.plan.same_as(plan) for r in self.records)

    def hypervolume(self, extra: Iterable[tuple[float, float]] = ()) -> float:
        """Area dominated by the front in (size / dense size, retained), reference point (1, 0)."""
        points = [((r.size_bytes or 0) / self.dense_size, self.retained(r.recovered or math.nan)) for r in self.front()]
        return hypervolume([*points, *extra])


def _dominates(a: TrialRecord, b: TrialRecord, sign: float) -> bool:
    assert a.size_bytes is not None and b.size_bytes is not None and a.recovered is not None
    assert b.recovered is not None
    no_worse = a.size_bytes <= b.size_bytes and sign * a.recovered >= sign * b.recovered
    return no_worse and (a.size_bytes < b.size_bytes or sign * a.recovered > sign * b.recovered)


def hypervolume(points: Iterable[tuple[float, float]], reference: tuple[float, float] = (1.0, 0.0)) -> float:
    """2-D hypervolume of ``(size_fraction, retained)`` points (size minimized, retained maximized).

    The area of the region dominated by the points and bounded by ``reference`` (default: the dense
    model's size, zero retained). Example: ``hypervolume([(0.25, 0.98), (0.5, 1.0)]) == 0.75 * 0.98 + 0.5 * 0.02``.
    """
    ref_x, ref_y = reference
    area, top = 0.0, ref_y
    # Sorted by size, each point that raises the best metric so far adds the strip [x, ref_x] x [top, y].
    for x, y in sorted(((x, -y) for x, y in points if x < ref_x and math.isfinite(y)), key=lambda p: p):
        if -y > top:
            area += (ref_x - x) * (-y - top)
            top = -y
    return area


def _record(trial: optuna.trial.FrozenTrial, constraints: Constraints) -> TrialRecord | None:
    attrs = trial.user_attrs
    if PLAN_ATTR not in attrs:
        return None
    plan = TrialPlan.from_dict(attrs[PLAN_ATTR])
    result = attrs.get(RESULT_ATTR) or {}
    curve = tuple((int(s), float(v)) for s, v in attrs.get(CURVE_ATTR, []))
    size = result.get("size_bytes", attrs.get("size_bytes"))
    recovered = result.get("recovered_metric")
    feasible = True
    if size is not None and recovered is not None and result.get("retained") is not None:
        feasible = constraints.feasible(size, float(result["retained"]))
    elif size is not None and constraints.max_size_bytes is not None:
        feasible = size <= constraints.max_size_bytes
    return TrialRecord(
        number=trial.number,
        state=trial.state,
        plan=plan,
        size_bytes=None if size is None else int(size),
        compressed=result.get("compressed_metric", curve[0][1] if curve else None),
        recovered=None if recovered is None else float(recovered),
        curve=curve,
        kind=attrs.get(KIND_ATTR),
        parent=attrs.get(PARENT_ATTR),
        feasible=feasible,
    )


@runtime_checkable
class Policy(Protocol):
    """Proposes trials. ``sampler`` draws whatever ``propose`` leaves to Optuna (when it returns None)."""

    name: str

    def sampler(self, seed: int) -> optuna.samplers.BaseSampler: ...

    def propose(self, view: StudyView) -> Proposal | None: ...


class SamplerPolicy:
    """A policy that leaves every proposal to an Optuna sampler (``propose`` returns None)."""

    def __init__(self, name: str, factory: Callable[[int], optuna.samplers.BaseSampler]) -> None:
        self.name = name
        self._factory = factory

    def sampler(self, seed: int) -> optuna.samplers.BaseSampler:
        return self._factory(seed)

    def propose(self, view: StudyView) -> Proposal | None:
        return None

    def __repr__(self) -> str:
        return f"SamplerPolicy({self.name!r})"


_POLICIES: dict[str, Callable[[], Policy]] = {}


def register_policy(name: str) -> Callable[[Callable[[], Policy]], Callable[[], Policy]]:
    """Register a policy factory under ``name`` (then ``autotune(..., policy=name)`` uses it)."""

    def decorate(factory: Callable[[], Policy]) -> Callable[[], Policy]:
        _POLICIES[name] = factory
        return factory

    return decorate


def available_policies() -> list[str]:
    _load_builtins()
    return sorted(_POLICIES)


def get_policy(policy: str | Policy) -> Policy:
    """The policy registered as ``policy``, or ``policy`` itself when it implements the protocol."""
    _load_builtins()
    if isinstance(policy, str):
        if policy not in _POLICIES:
            raise InvalidConfigError(f"Unknown policy {policy!r}; available: {sorted(_POLICIES)}.")
        return _POLICIES[policy]()
    if not isinstance(policy, Policy):
        raise InvalidConfigError(
            f"`policy` must be a registered name ({sorted(_POLICIES)}) or an object with `name`, "
            f"`sampler(seed)` and `propose(view)`, got {type(policy).__name__}."
        )
    return policy


def _load_builtins() -> None:
    import poft_autotune.search.agent  # noqa: F401  (registers "agent")


def _sampled_space(study: optuna.Study) -> dict[str, optuna.distributions.BaseDistribution]:
    """The parameters every sampled trial shares. Optuna intersects over all completed trials, and the
    dense baseline (a trial without parameters) would empty the intersection: NSGA-II would then never
    leave random sampling and multivariate TPE would fall back to univariate."""
    space: dict[str, optuna.distributions.BaseDistribution] | None = None
    states = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)
    for trial in study.get_trials(deepcopy=False, states=states):
        if not trial.distributions:
            continue
        if space is None:
            space = dict(trial.distributions)
        else:
            space = {k: d for k, d in space.items() if trial.distributions.get(k) == d}
    return {k: d for k, d in (space or {}).items() if not d.single()}


class _TPE(optuna.samplers.TPESampler):
    def infer_relative_search_space(
        self, study: optuna.Study, trial: optuna.trial.FrozenTrial
    ) -> dict[str, optuna.distributions.BaseDistribution]:
        return _sampled_space(study)


class _NSGAII(optuna.samplers.NSGAIISampler):
    def infer_relative_search_space(
        self, study: optuna.Study, trial: optuna.trial.FrozenTrial
    ) -> dict[str, optuna.distributions.BaseDistribution]:
        return _sampled_space(study)


@register_policy("tpe")
def _tpe() -> Policy:
    return SamplerPolicy("tpe", lambda seed: _TPE(seed=seed, multivariate=True))


@register_policy("nsga2")
def _nsga2() -> Policy:
    # A population of 50 (the default) never gets past its first generation in a budget of tens of trials.
    return SamplerPolicy("nsga2", lambda seed: _NSGAII(seed=seed, population_size=8))


@register_policy("random")
def _random() -> Policy:
    return SamplerPolicy("random", lambda seed: optuna.samplers.RandomSampler(seed=seed))


def ask_next(
    study: optuna.Study,
    space: SearchSpace,
    policy: Policy,
    view: Callable[[], StudyView],
    *,
    promote: bool = True,
    seed: int = 0,
) -> tuple[optuna.Trial, TrialPlan]:
    """Ask the study for the next trial: a promotion when the budget's tail is reserved for them, else the
    policy's proposal (enqueued with its rationale, so the storage holds it), else the sampler's draw.

    ``view`` reads the study afresh. Workers sharing a study may propose the same plan at the same moment;
    the later trial of such a pair is closed as PRUNED ("duplicate of trial N") and the next one is asked
    for, so a plan runs once.
    """
    for _ in range(8):
        trial, plan = _ask_once(study, space, policy, view(), promote, seed)
        if trial.user_attrs.get(KIND_ATTR) == "sampler":
            return trial, plan
        twin = _earlier_twin(study, trial.number, plan)
        if twin is None:
            return trial, plan
        reason = f"duplicate of trial {twin} (proposed by two workers at once); skipped"
        trial.set_user_attr(PRUNED_ATTR, reason)
        study.tell(trial, state=optuna.trial.TrialState.PRUNED)
    return trial, plan


def _earlier_twin(study: optuna.Study, number: int, plan: TrialPlan) -> int | None:
    """An earlier running or finished (not failed: a failed plan may be retried) trial of the same plan."""
    states = (optuna.trial.TrialState.RUNNING, optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)
    for other in study.get_trials(deepcopy=False, states=states):
        skipped = str(other.user_attrs.get(PRUNED_ATTR, "")).startswith("duplicate of")
        if other.number < number and PLAN_ATTR in other.user_attrs and not skipped:
            if TrialPlan.from_dict(other.user_attrs[PLAN_ATTR]).same_as(plan):
                return other.number
    return None


def _ask_once(
    study: optuna.Study, space: SearchSpace, policy: Policy, view: StudyView, promote: bool, seed: int
) -> tuple[optuna.Trial, TrialPlan]:
    from poft_autotune.search.stopping import pending_promotions, promotion  # stopping imports this module

    proposal = None
    if promote and pending_promotions(view, space.steps[1]) >= view.budget_left:
        proposal = promotion(view, space.steps[1])
    if proposal is None:
        proposal = policy.propose(view)
    if proposal is not None:
        try:
            check_plan(proposal.plan, space)
        except InvalidConfigError as exc:
            raise InvalidConfigError(f"Policy {policy.name!r} proposed a plan outside the search space: {exc}") from exc
        study.enqueue_trial(proposal.plan.to_params(), user_attrs=proposal.user_attrs(policy.name))
    trial = ask(study)  # with a heartbeat, so a worker that dies on it has the trial retried
    with warnings.catch_warnings():
        # A proposal may leave the sampler's ranges on purpose (a probe has 0 recovery steps).
        warnings.filterwarnings("ignore", message="Fixed parameter .* is out of range")
        drawn = suggest_plan(trial, space, seed=plan_seed(trial, seed))
    stored = trial.user_attrs.get(PLAN_ATTR)
    if stored is None:  # the sampler's draw
        trial.set_user_attr(KIND_ATTR, "sampler")
        trial.set_user_attr(POLICY_ATTR, policy.name)
        trial.set_user_attr(
            RATIONALE_ATTR, f"{policy.name}: drawn by Optuna's {type(study.sampler).__name__} from the search space."
        )
        plan = drawn
    else:  # enqueued by a policy (ours or another worker's): the stored plan is the one to run
        plan = dataclasses.replace(TrialPlan.from_dict(stored), seed=plan_seed(trial, seed))
    trial.set_user_attr(PLAN_ATTR, plan.to_dict())
    return trial, plan
