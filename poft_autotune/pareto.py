"""The Pareto front of size versus metric, rebuilt from the Optuna study alone."""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, overload

import optuna

from poft_autotune.errors import InvalidConfigError

PLAN_ATTR = "plan"
RESULT_ATTR = "result"
CHECKPOINT_ATTR = "checkpoint"  # directory of the trial's exported checkpoint, when kept


@dataclasses.dataclass(frozen=True)
class ParetoPoint:
    """One non-dominated trial: its size (bytes of the exported checkpoint), metric and plan."""

    trial_number: int
    size_bytes: int
    metric: float
    retained: float
    label: str
    plan: dict[str, Any]
    result: dict[str, Any]
    checkpoint: str | None = None

    @property
    def is_dense(self) -> bool:
        return not self.plan.get("compression")


def export_trial(study: optuna.Study, trial_number: int, directory: str | Path, *, overwrite: bool = False) -> Path:
    """Copy the kept checkpoint of any completed trial of ``study`` to ``directory``.

    Example: ``export_trial(optuna.load_study(study_name="poft", storage=url), 7, "ship/int4")``.
    """
    from poft_autotune.export import copy_checkpoint

    trials = {t.number: t for t in study.get_trials(deepcopy=False)}
    if trial_number not in trials:
        raise InvalidConfigError(
            f"Study {study.study_name!r} has no trial {trial_number!r}; its trials are 0..{len(trials) - 1}."
        )
    trial = trials[trial_number]
    if trial.state != optuna.trial.TrialState.COMPLETE:
        reason = trial.user_attrs.get("error", "")
        raise InvalidConfigError(
            f"Trial {trial_number} is {trial.state.name}, not COMPLETE, so it has no model to export. {reason}".strip()
        )
    checkpoint = trial.user_attrs.get(CHECKPOINT_ATTR)
    if not checkpoint or not Path(checkpoint).is_dir():
        raise InvalidConfigError(
            f"Trial {trial_number} has no kept checkpoint (got {checkpoint!r}); autotune keeps the front's by "
            "default (keep_checkpoints='front'). Rerun its plan with run_trial(..., export_dir=...) or run the "
            "study with keep_checkpoints='all'."
        )
    return copy_checkpoint(checkpoint, directory, overwrite=overwrite)


def _label(plan: dict[str, Any]) -> str:
    from poft_autotune.search.space import TrialPlan

    return TrialPlan.from_dict(plan).label


def _fmt_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return str(n)


class ParetoFront(Sequence[ParetoPoint]):
    """Non-dominated trials sorted by size. Build with ``ParetoFront.from_study(study)``.

    Example::

        front = ParetoFront.from_study(optuna.load_study(study_name="poft", storage="sqlite:///studies/poft.db"))
        for point in front:
            print(point.size_bytes, point.metric, point.label)
    """

    def __init__(self, points: Sequence[ParetoPoint], metric_name: str, greater_is_better: bool) -> None:
        self.points = sorted(points, key=lambda p: (p.size_bytes, -p.metric if greater_is_better else p.metric))
        self.metric_name = metric_name
        self.greater_is_better = greater_is_better
        self.study: optuna.Study | None = None

    def export(self, point: ParetoPoint | int, directory: str | Path, *, overwrite: bool = False) -> Path:
        """Copy the shipped checkpoint of a front point (or of any trial, by number) to ``directory``.

        Example: ``front.export(front[0], "ship/smallest")``; reload with ``poft_autotune.load_pretrained``.
        """
        number = point.trial_number if isinstance(point, ParetoPoint) else point
        if self.study is None:
            raise InvalidConfigError("This front was not built from a study; use ParetoFront.from_study(study).")
        return export_trial(self.study, number, directory, overwrite=overwrite)

    @classmethod
    def from_study(cls, study: optuna.Study) -> ParetoFront:
        """The front of every completed trial that carries a poft result."""
        if len(study.directions) != 2:
            raise InvalidConfigError(
                f"Study {study.study_name!r} has {len(study.directions)} objective(s); a poft study has 2 (size, metric)."
            )
        greater = study.directions[1] == optuna.study.StudyDirection.MAXIMIZE
        names = study.metric_names or ["size_bytes", "metric"]
        points = []
        for trial in study.best_trials:
            if RESULT_ATTR not in trial.user_attrs or trial.values is None:
                continue
            result = trial.user_attrs[RESULT_ATTR]
            plan = trial.user_attrs.get(PLAN_ATTR, {})
            points.append(
                ParetoPoint(
                    trial_number=trial.number,
                    size_bytes=int(trial.values[0]),
                    metric=float(trial.values[1]),
                    retained=float(result.get("retained", math.nan)),
                    label=_label(plan),
                    plan=plan,
                    result=result,
                    checkpoint=trial.user_attrs.get(CHECKPOINT_ATTR),
                )
            )
        front = cls(points, names[1], greater)
        front.study = study
        return front

    def __iter__(self) -> Iterator[ParetoPoint]:
        return iter(self.points)

    def __len__(self) -> int:
        return len(self.points)

    @overload
    def __getitem__(self, index: int) -> ParetoPoint: ...
    @overload
    def __getitem__(self, index: slice) -> Sequence[ParetoPoint]: ...
    def __getitem__(self, index: int | slice) -> ParetoPoint | Sequence[ParetoPoint]:
        return self.points[index]

    def to_json(self, path: str | Path | None = None) -> str:
        """The front as JSON (written to ``path`` too when given)."""
        text = json.dumps(
            {
                "metric": self.metric_name,
                "greater_is_better": self.greater_is_better,
                "size_definition": "bytes of the exported checkpoint's weight files (poft_autotune.size)",
                "points": [dataclasses.asdict(p) for p in self.points],
            },
            indent=2,
        )
        if path is not None:
            Path(path).write_text(text + "\n")
        return text

    def to_markdown(self) -> str:
        """A table: trial, plan, size, the three metric numbers, retained and recovery steps."""
        m = self.metric_name
        lines = [
            f"| trial | plan | size | size (bytes) | dense {m} | compressed {m} | recovered {m} | retained | steps |",
            "|---:|---|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for p in self.points:
            r = p.result
            lines.append(
                f"| {p.trial_number} | {p.label} | {_fmt_bytes(p.size_bytes)} | {p.size_bytes} | "
                f"{r['dense_metric']:.4g} | {r['compressed_metric']:.4g} | {r['recovered_metric']:.4g} | "
                f"{100 * p.retained:.1f} % | {r['recovery_steps']} |"
            )
        return "\n".join(lines)
