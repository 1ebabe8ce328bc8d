"""ParetoFront tables and plots, on a study of recorded results (no training)."""

import sys

import optuna
import pytest

from poft_autotune import MissingDependencyError, ParetoFront, QuantizeConfig, RecoveryConfig, TrialPlan
from poft_autotune.pareto import PLAN_ATTR, RESULT_ATTR


def _study(sizes_metrics):
    study = optuna.create_study(directions=["minimize", "maximize"], study_name="synthetic")
    study.set_metric_names(["size_bytes", "accuracy"])
    for i, (size, metric) in enumerate(sizes_metrics):
        compression = () if i == 0 else (QuantizeConfig(bits=2 + i % 7, group_size=None),)
        plan = TrialPlan(compression, RecoveryConfig(steps=0 if i == 0 else 10))
        result = {
            "size_bytes": size,
            "size_breakdown": {"total": size},
            "metric_name": "accuracy",
            "greater_is_better": True,
            "dense_metric": 0.9,
            "compressed_metric": metric - 0.05,
            "recovered_metric": metric,
            "recovery_steps": plan.recovery.steps,
            "timings": {},
            "retained": metric / 0.9,
        }
        attrs = {PLAN_ATTR: plan.to_dict(), RESULT_ATTR: result}
        study.add_trial(optuna.trial.create_trial(values=[size, metric], user_attrs=attrs))
    return study


def test_plot_png_with_all_trials_front_and_dense(tmp_path):
    # sizes span > 10x: log scale; trials 3 and 4 are dominated (grey only)
    study = _study([(40 << 20, 0.9), (3 << 20, 0.7), (10 << 20, 0.88), (12 << 20, 0.8), (20 << 20, 0.85)])
    front = ParetoFront.from_study(study)
    assert [p.trial_number for p in front] == [1, 2, 0]
    path = front.plot(tmp_path / "out" / "front.png")
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000


def test_plot_html_needs_plotly(tmp_path, monkeypatch):
    front = ParetoFront.from_study(_study([(4096, 0.9), (1024, 0.8)]))
    try:
        import plotly  # noqa: F401
    except ImportError:
        pass
    else:  # plotly installed: the figure is written, self-contained
        assert "plotly" in front.plot(tmp_path / "front.html").read_text()[:100_000].lower()
    monkeypatch.setitem(sys.modules, "plotly", None)
    monkeypatch.setitem(sys.modules, "plotly.graph_objects", None)
    with pytest.raises(MissingDependencyError, match="pip install plotly"):
        front.plot(tmp_path / "front.html")


def test_table_and_markdown_have_the_same_rows():
    front = ParetoFront.from_study(_study([(4096, 0.9), (1024, 0.8)]))
    table, markdown = front.to_table().splitlines(), front.to_markdown().splitlines()
    assert len(table) == len(markdown) == 4
    assert table[0].split()[:2] == ["trial", "plan"] and markdown[0].startswith("| trial | plan |")
    assert "int3-ch" in table[2] and "| 1 | int3-ch | 1.00 KiB | 1024 |" in markdown[2]
    assert all(len(line) == len(table[0]) for line in table)  # aligned columns
