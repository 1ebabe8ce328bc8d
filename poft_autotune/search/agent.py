"""The agent-style policy: works a study the way an expert would, and writes down why.

Each call reads the whole study from storage (so concurrent workers and resumed runs share its memory)
and takes the first move that applies:

1. **probe**: compress without recovery (cheap: compression + one evaluation) along each method's ladder,
   mild to aggressive, round-robin over methods, to map where accuracy falls off. A ladder stops at its
   cliff (retained below ``cliff`` after compression), and a combination stops where a milder one fell.
2. **recover**: for each probed level not yet recovered, estimate the metric after recovery as
   ``compressed + r * (dense - compressed)``, where ``r`` is the share of the gap recovery closed so far
   for that method (a prior of ``recovery_prior`` shrunk toward what the study observed), and recover the
   level whose estimate adds the most hypervolume to the current front, with a short recovery.
3. **push**: where recovery succeeded at a ladder's cliff (closed at least ``success`` of the gap), probe
   past it: the cliff moves.
4. **tune**: around front points, try recovery variations (learning rate x3 and /3, distillation on/off,
   LoRA instead of full fine-tuning) on the front point with the largest gap to dense.
5. otherwise leave the trial to Optuna's sampler.

Promotion of short-recovery front points to the full budget and early stopping are done by ``autotune``
for every policy (:mod:`poft_autotune.search.stopping`). Deterministic: no randomness apart from the
fallback sampler (seeded) and ladders of user-registered methods (drawn with a seeded sampler).
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import optuna

from poft_autotune.compression import CompressionConfig, get_method
from poft_autotune.compression.prune import CRITERIA, NMConfig, PruneConfig
from poft_autotune.compression.quantize import QuantizeConfig
from poft_autotune.compression.structured import StructuredConfig
from poft_autotune.errors import InvalidConfigError
from poft_autotune.search.policy import Proposal, StudyView, TrialRecord, register_policy
from poft_autotune.search.space import RecoveryConfig, SearchSpace, TrialPlan, check_plan

Level = tuple[CompressionConfig, ...]


def _within(values: Sequence[float], bounds: Sequence[float]) -> list[float]:
    low, high = bounds
    return [v for v in values if low <= v <= high]


def _ladder_one(method: str, choices: Mapping[str, Any], seed: int) -> list[CompressionConfig]:
    """One method's levels, mild to aggressive (the checkpoint gets smaller along the list)."""
    if method == "quantize":
        groups = list(choices.get("group_size", [None, 128]))
        fine = min((g for g in groups if g is not None), default=None)
        symmetric = True if True in list(choices.get("symmetric", [True, False])) else False
        out: list[CompressionConfig] = []
        for bits in _within([8, 6, 5, 4, 3, 2], choices.get("bits", (2, 8))):
            # Per-channel where it is enough (>= 5 bits); below, the finest group first, then per-channel.
            options = [g for g in dict.fromkeys([None] if bits >= 5 else [fine, None]) if g in groups] or groups[:1]
            out += [QuantizeConfig(bits=int(bits), group_size=g, symmetric=symmetric) for g in options]
        return out
    if method == "prune":
        criteria = list(choices.get("criterion", CRITERIA))
        criterion = "wanda" if "wanda" in criteria else criteria[0]
        return [
            PruneConfig(sparsity=s, criterion=criterion)
            for s in _within([0.3, 0.5, 0.6, 0.7, 0.8, 0.9], choices.get("sparsity", (0.1, 0.9)))
        ]
    if method == "nm":
        criteria = list(choices.get("criterion", CRITERIA))
        criterion = "wanda" if "wanda" in criteria else criteria[0]
        patterns = sorted(choices.get("pattern", ["2:4", "4:8"]), key=lambda p: -int(str(p).split(":")[1]))
        return [NMConfig(n=int(p.split(":")[0]), m=int(p.split(":")[1]), criterion=criterion) for p in patterns]
    if method == "structured":
        heads_high = choices.get("heads", (0.0, 0.5))[1]
        levels = [
            StructuredConfig(ffn=f, heads=min(h, heads_high))
            for f, h in ((0.25, 0.0), (0.25, 0.25), (0.5, 0.25), (0.5, 0.5))
            if f <= choices.get("ffn", (0.0, 0.5))[1]
        ]
        return list(dict.fromkeys(levels))
    # A user-registered method: the agent has no knowledge of its knobs; draw a few configs (seeded).
    sampler = optuna.samplers.RandomSampler(seed=seed)
    study = optuna.create_study(sampler=sampler)
    config_cls = get_method(method).config_cls
    configs = [config_cls.suggest(study.ask(), choices) for _ in range(4)]
    return list(dict.fromkeys(configs))


@dataclasses.dataclass(frozen=True)
class _Rung:
    """A ladder entry: the configs of a method combination and their per-method ladder indices."""

    combo: str
    index: tuple[int, ...]
    configs: Level


def ladders(space: SearchSpace, seed: int = 0) -> dict[str, list[_Rung]]:
    """Every method combination's ladder. Combinations walk the product of their methods' ladders by
    total depth (mildest first), up to 12 rungs."""
    out: dict[str, list[_Rung]] = {}
    for combo in space.methods:
        parts = [_ladder_one(m, space.choices.get(m, {}), seed) for m in combo.split("+")]
        grid = sorted(itertools.product(*(range(len(p)) for p in parts)), key=lambda ix: (sum(ix), ix))
        if len(parts) > 1:
            grid = [ix for ix in grid if all(i > 0 for i in ix)][:12]  # the mildest of a part is its own ladder's
        out[combo] = [_Rung(combo, ix, tuple(p[i] for p, i in zip(parts, ix, strict=True))) for ix in grid]
    return out


def _clip(value: float, bounds: Sequence[float]) -> float:
    return min(max(value, bounds[0]), bounds[1])


class AgentPolicy:
    """The built-in agent (``policy="agent"``). See the module docstring for its moves.

    ``probe_share``: at most this share of the trial budget goes to probes before recovery starts
    (pushes past a cliff are extra). ``cliff``: retained fraction below which a probe marks its ladder's
    cliff. ``success``: share of the compression gap a recovery must close to count as a success.
    ``recovery_prior``: the share of the gap recovery is expected to close before any is measured.
    ``explore_steps``: recovery steps of exploratory trials (default: a third of the space's maximum,
    at least its minimum); promotion re-runs front points at the space's maximum.
    """

    name = "agent"

    def __init__(
        self,
        *,
        probe_share: float = 0.35,
        cliff: float = 0.6,
        success: float = 0.7,
        recovery_prior: float = 0.7,
        explore_steps: int | None = None,
    ) -> None:
        for field, value in (("probe_share", probe_share), ("cliff", cliff), ("success", success)):
            if not 0 < value <= 1:
                raise InvalidConfigError(f"`{field}` must be in (0, 1], got {value!r}.")
        if not 0 <= recovery_prior <= 1:
            raise InvalidConfigError(f"`recovery_prior` must be in [0, 1], got {recovery_prior!r}.")
        self.probe_share = probe_share
        self.cliff = cliff
        self.success = success
        self.recovery_prior = recovery_prior
        self.explore_steps = explore_steps

    def sampler(self, seed: int) -> optuna.samplers.BaseSampler:
        return optuna.samplers.RandomSampler(seed=seed)

    # -- helpers -------------------------------------------------------------------------------------
    def recovery(self, space: SearchSpace) -> RecoveryConfig:
        """The default recovery of exploratory trials, inside the space's ranges."""
        low, high = space.steps
        steps = self.explore_steps if self.explore_steps is not None else max(low, high // 3)
        lr_low, lr_high = space.learning_rate
        return RecoveryConfig(
            steps=int(_clip(max(1, steps), space.steps)) if high > 0 else 0,
            learning_rate=math.sqrt(lr_low * lr_high),
            distill_weight=_clip(0.5, space.distill_weight),
            temperature=_clip(2.0, space.temperature),
            lora_rank=0 if 0 in space.lora_rank else space.lora_rank[0],
        )

    def _gap_share(self, view: StudyView, combo: str) -> tuple[float, int]:
        """Share of the compression gap recovery closed for ``combo`` so far (shrunk to the prior)."""
        shares = []
        for r in view.records:
            if _combo(r.plan) != combo or r.plan.recovery.steps == 0 or r.compressed is None:
                continue
            final = r.recovered if r.recovered is not None else (r.curve[-1][1] if len(r.curve) > 1 else None)
            if final is None or not r.finished:
                continue
            gap = view.dense_metric - r.compressed
            if abs(gap) > 1e-9 * max(1.0, abs(view.dense_metric)):
                shares.append(min(1.5, max(-0.5, (final - r.compressed) / gap)))
        return (self.recovery_prior + sum(shares)) / (1 + len(shares)), len(shares)

    def _point(self, view: StudyView, size: int, metric: float) -> tuple[float, float]:
        return size / view.dense_size, view.retained(metric)

    # -- moves ---------------------------------------------------------------------------------------
    def propose(self, view: StudyView) -> Proposal | None:
        rungs = ladders(view.space, view.seed)
        probes = {
            _key(r.plan.compression): r for r in view.records if r.plan.recovery.steps == 0 and r.plan.compression
        }
        budget = max(2, round(self.probe_share * view.budget_total))
        moves = (
            lambda: self._probe(view, rungs, probes) if len(probes) < budget else None,
            lambda: self._recover(view, probes),
            lambda: self._probe(view, rungs, probes),  # probes are cheap: map more before tuning
            lambda: self._tune(view),
        )
        for move in moves:
            proposal = move()
            if proposal is not None and not view.tried(proposal.plan):
                return proposal
        return None

    def _fell(self, view: StudyView, record: TrialRecord) -> bool:
        """Whether a finished probe fell off the cliff (or failed) and no recovery of it succeeded."""
        if record.compressed is None:
            if record.state == optuna.trial.TrialState.PRUNED:  # stopped for size: not an accuracy fall
                return False
        elif view.retained(record.compressed) >= self.cliff:
            return False
        return not self._recovered_ok(view, record.plan.compression)

    def _recovered_ok(self, view: StudyView, configs: Level) -> bool:
        for r in view.records:
            if r.plan.compression == configs and r.plan.recovery.steps > 0 and r.recovered is not None:
                gap = view.dense_metric - (r.compressed if r.compressed is not None else view.dense_metric)
                if gap and (r.recovered - (r.compressed or 0.0)) / gap >= self.success:
                    return True
        return False

    def _next_rung(self, view: StudyView, ladder: list[_Rung], probes: dict[str, TrialRecord]) -> int | None:
        """Bisect for the ladder's cliff: between the deepest rung that held and the mildest that fell
        (a fall that recovery fixed does not count: the cliff moves past it). Starts in the middle."""
        held, fell = [-1], [len(ladder)]
        for i, rung in enumerate(ladder):
            record = probes.get(_key(rung.configs))
            if record is None or not record.finished:
                continue
            (fell if self._fell(view, record) else held).append(i)
        low = max(held)
        high = min([f for f in fell if f > low], default=len(ladder))
        if high - low <= 1:
            # Cliff found. Milder rungs are bigger: they can add a front point only between the deepest
            # near-lossless rung (>= 99 % kept) and the deepest that held; fill those in, deepest first.
            lossless = -1
            for i, rung in enumerate(ladder):
                record = probes.get(_key(rung.configs))
                if record is not None and record.compressed is not None and view.retained(record.compressed) >= 0.99:
                    lossless = i
            gaps = [i for i in range(low - 1, lossless, -1) if _key(ladder[i].configs) not in probes]
            return gaps[0] if gaps else None
        if low == -1 and high == len(ladder):
            index = len(ladder) // 2
        else:
            index = (low + high) // 2 if high < len(ladder) else max(low + 1, (low + high) // 2)
        pending = {_key(r.plan.compression) for r in view.records if not r.finished}
        if _key(ladder[index].configs) in probes and _key(ladder[index].configs) not in pending:
            return None
        return index

    def _probe(self, view: StudyView, rungs: dict[str, list[_Rung]], probes: dict[str, TrialRecord]) -> Proposal | None:
        # Round robin: the ladder with the fewest probes so far first.
        order = sorted(rungs, key=lambda c: (sum(_key(r.configs) in probes for r in rungs[c]), list(rungs).index(c)))
        for combo in order:
            ladder = rungs[combo]
            index = self._next_rung(view, ladder, probes)
            if index is None or _key(ladder[index].configs) in probes:
                continue
            rung = ladder[index]
            done = [(i, probes[_key(r.configs)]) for i, r in enumerate(ladder) if _key(r.configs) in probes]
            known = ", ".join(
                f"{r.plan.label} {100 * view.retained(r.compressed):.1f} %" for _, r in done if r.compressed is not None
            )
            fixed = [r for _, r in done if r.compressed is not None and view.retained(r.compressed) < self.cliff]
            fixed = [r for r in fixed if self._recovered_ok(view, r.plan.compression)]
            why = f"push: recovery fixed {fixed[-1].plan.label}, so the cliff moves; " if fixed else "probe: "
            plan = TrialPlan(rung.configs, dataclasses.replace(self.recovery(view.space), steps=0), view.seed)
            return Proposal(
                plan,
                f"{why}{plan.label} without recovery (compression + one evaluation) to find where {combo} accuracy "
                f"falls below {100 * self.cliff:.0f} % of dense: rung {index + 1}/{len(ladder)}, bisecting"
                + (f" (so far after compression: {known})." if known else " from the middle of the ladder."),
                kind="push" if fixed else "probe",
            )
        return None

    def _recover(self, view: StudyView, probes: dict[str, TrialRecord]) -> Proposal | None:
        recovery = self.recovery(view.space)
        if recovery.steps == 0:
            return None
        base_hv = view.hypervolume()
        best: tuple[float, TrialRecord, float, float, int] | None = None
        for probe in sorted(probes.values(), key=lambda r: r.number):
            if probe.compressed is None or probe.size_bytes is None or not probe.finished:
                continue
            if any(r.plan.compression == probe.plan.compression and r.plan.recovery.steps > 0 for r in view.records):
                continue
            limit = view.constraints.max_size_bytes
            if limit is not None and probe.size_bytes > limit:
                continue
            share, n = self._gap_share(view, _combo(probe.plan))
            estimate = probe.compressed + share * (view.dense_metric - probe.compressed)
            kept = view.retained(estimate)
            if view.constraints.min_retained is not None and kept < view.constraints.min_retained:
                continue
            gain = view.hypervolume([self._point(view, probe.size_bytes, estimate)]) - base_hv
            if gain > 1e-12 and (best is None or gain > best[0]):
                best = (gain, probe, estimate, share, n)
        if best is None:
            return None
        gain, probe, estimate, share, n = best
        compressed = probe.compressed if probe.compressed is not None else math.nan
        plan = TrialPlan(probe.plan.compression, recovery, view.seed)
        evidence = f"measured on {n} trial(s)" if n else "a prior; nothing measured yet"
        return Proposal(
            plan,
            f"recover: {probe.plan.label} kept {100 * view.retained(compressed):.1f} % after compression "
            f"(trial {probe.number}, {probe.size_bytes:,} bytes); {_combo(probe.plan)} recovery closes "
            f"~{100 * share:.0f} % of the gap ({evidence}), so expect ~{100 * view.retained(estimate):.1f} %: the "
            f"largest hypervolume gain (+{gain:.4f}) among the probed levels. {recovery.steps} steps, "
            f"lr {recovery.learning_rate:.2g}, distillation {recovery.distill_weight:g}.",
            kind="recover",
            parent=probe.number,
        )

    @staticmethod
    def _variation(parent: RecoveryConfig, child: RecoveryConfig) -> str:
        """Which knob a tune trial turned, as a stable name: ``lr up``, ``lr down``, ``distill``, ``lora``."""
        if child.learning_rate != parent.learning_rate:
            return "lr up" if child.learning_rate > parent.learning_rate else "lr down"
        if child.distill_weight != parent.distill_weight:
            return "distill"
        return "lora"

    def _tune(self, view: StudyView) -> Proposal | None:
        space = view.space
        by_number = {r.number: r for r in view.records}
        # What each knob did so far: a knob that failed twice more often than it helped is dropped.
        score: dict[str, int] = {}
        for r in view.records:
            parent = by_number.get(r.parent) if r.kind == "tune" and r.parent is not None else None
            if parent is None or not r.finished or parent.recovered is None:
                continue
            sign = 1.0 if view.greater_is_better else -1.0
            helped = r.recovered is not None and sign * r.recovered > sign * parent.recovered
            knob = self._variation(parent.plan.recovery, r.plan.recovery)
            score[knob] = score.get(knob, 0) + (1 if helped else -1)
        candidates = [r for r in view.front() if r.plan.recovery.steps > 0 and r.recovered is not None]
        candidates.sort(key=lambda r: (view.retained(r.recovered or math.nan), r.number))  # largest gap first
        for record in candidates:
            rec = record.plan.recovery
            variations: list[tuple[str, RecoveryConfig]] = []
            for factor, text in ((3.0, "x3"), (1 / 3, "/3")):
                lr = _clip(rec.learning_rate * factor, space.learning_rate)
                if not math.isclose(lr, rec.learning_rate):
                    variations.append((f"learning rate {lr:.2g} ({text})", dataclasses.replace(rec, learning_rate=lr)))
            weight = _clip(0.0 if rec.distill_weight > 0 else 0.5, space.distill_weight)
            if weight != rec.distill_weight:
                variations.append((f"distillation weight {weight:g}", dataclasses.replace(rec, distill_weight=weight)))
            ranks = [k for k in space.lora_rank if k != rec.lora_rank]
            if ranks:
                rank = ranks[0]
                label = "full fine-tuning" if rank == 0 else f"LoRA rank {rank}"
                variations.append((label, dataclasses.replace(rec, lora_rank=rank)))
            for text, recovery in variations:
                plan = TrialPlan(record.plan.compression, recovery, view.seed)
                knob = self._variation(rec, recovery)
                if view.tried(plan) or score.get(knob, 0) <= -2:
                    continue
                history = f" (so far this knob: {score[knob]:+d})" if knob in score else ""
                return Proposal(
                    plan,
                    f"tune: trial {record.number} ({record.plan.label}) is on the front at "
                    f"{100 * view.retained(record.recovered or math.nan):.1f} % retained, the largest gap to dense "
                    f"among front points with untried variations; try {text}{history}.",
                    kind="tune",
                    parent=record.number,
                )
        return None


def _combo(plan: TrialPlan) -> str:
    return "+".join(c.method for c in plan.compression)


def _key(configs: Level) -> str:
    return json.dumps([c.to_dict() for c in configs], sort_keys=True)


class CallablePolicy(AgentPolicy):
    """A language-model-backed policy: ``ask(prompt) -> reply`` proposes, the agent checks and falls back.

    The prompt describes the space, the dense model and every trial so far, and asks for one JSON object
    ``{"plan": <TrialPlan.to_dict()>, "rationale": "..."}``. A reply that does not parse, names an unknown
    method, has invalid values or repeats a tried plan is rejected; the built-in agent's move is used
    instead and the rationale says so. No network access is needed by anything else.
    """

    name = "callable"

    def __init__(self, ask: Callable[[str], str], **kwargs: Any) -> None:
        if not callable(ask):
            raise InvalidConfigError(f"`ask` must be callable (prompt -> reply), got {type(ask).__name__}.")
        super().__init__(**kwargs)
        self.ask = ask

    def prompt(self, view: StudyView) -> str:
        lines = [
            "You choose the next trial of a model-compression search (size in bytes vs metric).",
            f"Dense model: metric {view.dense_metric:.4g} ({'higher' if view.greater_is_better else 'lower'} is "
            f"better), {view.dense_size:,} bytes. Trials left: {view.budget_left}.",
            f"Methods: {list(view.space.methods)}; recovery steps {view.space.steps}, learning rate "
            f"{view.space.learning_rate}, LoRA ranks {list(view.space.lora_rank)}.",
            "Trials so far (number, state, plan, size, after compression, after recovery):",
        ]
        for r in view.records:
            lines.append(
                f"- {r.number} {r.state.name} {json.dumps(r.plan.to_dict())} {r.size_bytes} {r.compressed} {r.recovered}"
            )
        lines.append(
            'Reply with one JSON object: {"plan": {"compression": [...], "recovery": {...}}, "rationale": "..."}'
        )
        return "\n".join(lines)

    def propose(self, view: StudyView) -> Proposal | None:
        reply = self.ask(self.prompt(view))
        try:
            data = json.loads(reply)
            plan = TrialPlan.from_dict({**data["plan"], "seed": view.seed})
            check_plan(plan, view.space)
            if view.tried(plan):
                raise InvalidConfigError("that plan was already tried")
            rationale = str(data.get("rationale", "")).strip() or "(no rationale given)"
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            fallback = super().propose(view)
            if fallback is None:
                return None
            return dataclasses.replace(
                fallback, rationale=f"model reply rejected ({exc}); agent instead: {fallback.rationale}"
            )
        return Proposal(plan, f"language model: {rationale}", kind="callable")


@register_policy("agent")
def _agent() -> AgentPolicy:
    return AgentPolicy()
