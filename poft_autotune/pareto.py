"""The Pareto front of size versus metric, rebuilt from the Optuna study alone; tables and plots of it."""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, overload

import optuna

from poft_autotune.errors import InvalidConfigError, MissingDependencyError

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
        header, rows = self._rows()
        align = ["---:", "---"] + ["---:"] * (len(header) - 2)
        lines = ["| " + " | ".join(header) + " |", "|" + "|".join(align) + "|"]
        return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows])

    def _rows(self) -> tuple[list[str], list[list[str]]]:
        m = self.metric_name
        header = ["trial", "plan", "size", "size (bytes)", f"dense {m}", f"compressed {m}", f"recovered {m}"]
        header += ["retained", "steps"]
        rows = []
        for p in self.points:
            r = p.result
            rows.append(
                [
                    str(p.trial_number),
                    p.label,
                    _fmt_bytes(p.size_bytes),
                    str(p.size_bytes),
                    f"{r['dense_metric']:.4g}",
                    f"{r['compressed_metric']:.4g}",
                    f"{r['recovered_metric']:.4g}",
                    f"{100 * p.retained:.1f} %",
                    str(r["recovery_steps"]),
                ]
            )
        return header, rows

    def to_table(self) -> str:
        """The same columns as :meth:`to_markdown`, aligned as plain text for a terminal."""
        header, rows = self._rows()
        widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]

        def line(cells: list[str]) -> str:
            # the plan (column 1) reads left-aligned, numbers right-aligned
            return "  ".join(
                c.ljust(w) if i == 1 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths, strict=True))
            )

        return "\n".join([line(header), "  ".join("-" * w for w in widths), *map(line, rows)])

    def _all_trials(self) -> list[tuple[float, float, bool]]:
        """(size MiB, metric, is dense) of every completed trial with a poft result (the front's own if no study)."""
        if self.study is None:
            return [(p.size_bytes / 2**20, p.metric, p.is_dense) for p in self.points]
        out = []
        for t in self.study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,)):
            if t.values is not None and RESULT_ATTR in t.user_attrs:
                dense = not t.user_attrs.get(PLAN_ATTR, {}).get("compression")
                out.append((t.values[0] / 2**20, float(t.values[1]), dense))
        return out

    def plot(self, path: str | Path) -> Path:
        """Draw size (MiB) against the metric: every completed trial in grey, the front, the dense model.

        ``.png`` (or any matplotlib format) is drawn with matplotlib's Agg canvas, without touching
        pyplot's global state; ``.html`` is an interactive plotly figure (needs ``pip install plotly``).
        The size axis is logarithmic when sizes span more than 10x. Example: ``front.plot("front.png")``.
        """
        path = Path(path)
        trials = self._all_trials()
        front = [(p.size_bytes / 2**20, p.metric, p.label, p.trial_number) for p in self.points]
        sizes = [s for s, _, _ in trials] + [s for s, *_ in front]
        log_x = bool(sizes) and min(sizes) > 0 and max(sizes) / min(sizes) > 10
        direction = "higher" if self.greater_is_better else "lower"
        y_label = f"{self.metric_name} ({direction} is better)"
        x_label = "size of the exported checkpoint (MiB)"
        name = self.study.study_name if self.study is not None else "poft"
        title = f"Pareto front of study {name!r}: {len(front)} of {len(trials)} trials"
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.suffix.lower() in (".html", ".htm"):
            return self._plot_html(path, trials, front, log_x, x_label, y_label, title)
        try:
            from matplotlib.figure import Figure
        except ImportError as exc:
            raise MissingDependencyError("ParetoFront.plot needs matplotlib: pip install matplotlib") from exc
        fig = Figure(figsize=(8, 5), layout="constrained")
        ax = fig.add_subplot()
        others = [(s, m) for s, m, dense in trials if not dense]
        if others:
            xs, ys = [s for s, _ in others], [m for _, m in others]
            ax.scatter(xs, ys, color="0.7", s=22, label=f"all trials ({len(trials)})", zorder=1)
        if front:
            xs, ys = [f[0] for f in front], [f[1] for f in front]
            ax.plot(xs, ys, "-o", color="tab:blue", markersize=6, label="Pareto front", zorder=2)
            for x, y, label, number in front:
                ax.annotate(f"#{number} {label}", (x, y), textcoords="offset points", xytext=(5, 4), fontsize=7)
        dense_points = [(s, m) for s, m, dense in trials if dense]
        if dense_points:
            xs, ys = [s for s, _ in dense_points], [m for _, m in dense_points]
            ax.scatter(xs, ys, marker="*", s=220, color="tab:red", label="dense", zorder=3)
        if log_x:
            from matplotlib.ticker import FuncFormatter

            ax.set_xscale("log")
            plain = FuncFormatter(lambda v, _: f"{v:g}")  # 3, 10, 40 rather than 3x10^0
            ax.xaxis.set_major_formatter(plain)
            ax.xaxis.set_minor_formatter(plain)
        ax.margins(x=0.08, y=0.08)
        ax.set_xlabel(x_label)
        ax.set_ylabel(y_label)
        ax.set_title(title, fontsize=10)
        ax.grid(True, alpha=0.3)
        ax.legend(loc="best", fontsize=8)
        fig.savefig(path, dpi=120)
        return path

    def _plot_html(
        self,
        path: Path,
        trials: list[tuple[float, float, bool]],
        front: list[tuple[float, float, str, int]],
        log_x: bool,
        x_label: str,
        y_label: str,
        title: str,
    ) -> Path:
        try:
            import plotly.graph_objects as go
        except ImportError as exc:
            raise MissingDependencyError(
                "ParetoFront.plot to .html needs plotly: pip install plotly (or plot to .png with matplotlib)."
            ) from exc
        fig = go.Figure()
        others = [(s, m) for s, m, dense in trials if not dense]
        if others:
            xs, ys = [s for s, _ in others], [m for _, m in others]
            fig.add_scatter(x=xs, y=ys, mode="markers", name="all trials", marker={"color": "lightgrey"})
        if front:
            fig.add_scatter(
                x=[f[0] for f in front],
                y=[f[1] for f in front],
                mode="lines+markers",
                name="Pareto front",
                text=[f"#{f[3]} {f[2]}" for f in front],
                hovertemplate="%{text}<br>%{x:.2f} MiB<br>%{y:.4g}<extra></extra>",
            )
        dense_points = [(s, m) for s, m, dense in trials if dense]
        if dense_points:
            xs, ys = [s for s, _ in dense_points], [m for _, m in dense_points]
            fig.add_scatter(x=xs, y=ys, mode="markers", name="dense", marker={"symbol": "star", "size": 14})
        fig.update_layout(title=title, xaxis_title=x_label, yaxis_title=y_label)
        if log_x:
            fig.update_xaxes(type="log")
        fig.write_html(str(path), include_plotlyjs=True)  # self-contained: opens offline
        return path
