"""optuna-dashboard integration: a markdown note per trial, and serving the dashboard on 127.0.0.1.

``autotune`` saves :func:`trial_note` on every trial it tells (the dense trial too), so the dashboard's
trial view shows the plan, the three metric numbers, the size breakdown, timings and the checkpoint path
next to Optuna's own params and values. The objectives are named (``size_bytes`` and the metric) with
``study.set_metric_names``. Browse a study with ``poft-autotune dashboard sqlite:///studies/poft.db``.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, TextIO

import optuna

from poft_autotune.errors import InvalidConfigError

if TYPE_CHECKING:
    from wsgiref.simple_server import WSGIServer

    from poft_autotune.search.objective import TrialResult
    from poft_autotune.search.space import TrialPlan

logger = logging.getLogger("poft_autotune")

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8080
_TIMINGS = (
    ("compress_s", "compress"),
    ("eval_compressed_s", "evaluate compressed"),
    ("recover_s", "recovery fine-tune"),
    ("export_s", "export checkpoint"),
    ("eval_recovered_s", "evaluate recovered"),
    ("total_s", "total"),
)


def _mib(n: float) -> str:
    return f"{n / 2**20:.2f} MiB"


def _value(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, (list, tuple)):
        return ", ".join(map(str, v)) or "-"
    return "-" if v is None else str(v)


def _plan_rows(plan: TrialPlan) -> list[tuple[str, str]]:
    """The plan as (Optuna-style name, value) rows: ``<method>.<field>`` then ``recovery.<field>``."""
    rows = []
    for config in plan.compression:
        data = config.to_dict()
        method = data.pop("method")
        rows += [(f"{method}.{key}", _value(value)) for key, value in data.items()]
    rows += [(f"recovery.{key}", _value(value)) for key, value in plan.recovery.to_dict().items()]
    rows.append(("seed", str(plan.seed)))
    return rows


def _table(header: tuple[str, ...], rows: Sequence[tuple[str, ...]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    return lines + ["| " + " | ".join(row) + " |" for row in rows]


def trial_note(
    plan: TrialPlan,
    result: TrialResult,
    *,
    trial_number: int | None = None,
    checkpoint: str | None = None,
    keep_checkpoints: str = "all",
) -> str:
    """A markdown note for the dashboard: plan, metric before/after compression and recovery, size, timings.

    Example: ``optuna_dashboard.save_note(trial, trial_note(plan, result, checkpoint=str(path)))``.
    """
    m = result.metric_name
    title = f"Trial {trial_number}: " if trial_number is not None else ""
    direction = "higher" if result.greater_is_better else "lower"
    frac = result.recovered_fraction
    lines = [f"## {title}{plan.label}", ""]
    if plan.compression or plan.recovery.steps:
        lines += ["### Plan", ""] + _table(("parameter", "value"), [(f"`{k}`", v) for k, v in _plan_rows(plan)])
    else:
        lines.append("The base model as given (no compression, no recovery): the reference point.")
    lines += ["", f"### {m} ({direction} is better)", ""]
    lines += _table(
        ("dense", "after compression", "after recovery", "retained", "recovered fraction", "recovery steps"),
        [
            (
                f"{result.dense_metric:.4f}",
                f"{result.compressed_metric:.4f}",
                f"**{result.recovered_metric:.4f}**",
                f"{100 * result.retained:.1f} %",
                "-" if frac is None else f"{100 * frac:.0f} %",
                str(result.recovery_steps),
            )
        ],
    )
    total = result.size_bytes
    lines += ["", f"### Size: {_mib(total)} ({total:,} bytes of the exported checkpoint)", ""]
    parts = [(k, v) for k, v in result.size_breakdown.items() if k != "total"]
    lines += _table(
        ("part", "bytes", "share"),
        [(k, f"{v:,}", f"{100 * v / total:.1f} %" if total else "-") for k, v in parts],
    )
    timings = [(label, f"{result.timings[key]:.1f} s") for key, label in _TIMINGS if key in result.timings]
    if timings:
        lines += ["", "### Timings", ""] + _table(("step", "wall time"), timings)
    if checkpoint is None:
        lines += ["", "Checkpoint: not kept."]
    else:
        lines += ["", f"Checkpoint: `{checkpoint}`"]
        if keep_checkpoints == "front":
            lines[-1] += " (deleted when the trial leaves the front: keep_checkpoints='front')"
    return "\n".join(lines) + "\n"


def failure_note(plan: TrialPlan, error: str, *, trial_number: int | None = None) -> str:
    """A markdown note for a failed trial: its plan and the error."""
    title = f"Trial {trial_number}: " if trial_number is not None else ""
    lines = [f"## {title}{plan.label} (failed)", "", f"**Error**: {error}", "", "### Plan", ""]
    lines += _table(("parameter", "value"), [(f"`{k}`", v) for k, v in _plan_rows(plan)])
    return "\n".join(lines) + "\n"


def save_trial_note(study: optuna.Study, trial: optuna.Trial | optuna.trial.FrozenTrial, text: str) -> None:
    """Save ``text`` as the dashboard note of ``trial`` (a live or a finished trial); never raises.

    A note is a convenience: failing to write one (e.g. a storage hiccup) logs a warning and leaves the
    study intact.
    """
    try:
        from optuna_dashboard import save_note

        # save_note takes a live Trial; a FrozenTrial (e.g. the dense trial added with add_trial) is wrapped.
        target = trial if isinstance(trial, optuna.Trial) else optuna.trial.Trial(study, trial._trial_id)
        save_note(target, text)
    except Exception as exc:  # optional feature: never fail a study over its notes
        logger.warning("could not save the dashboard note of trial %d: %s", trial.number, exc)


def save_study_note(study: optuna.Study, text: str) -> None:
    """Save ``text`` as the study's dashboard note (shown on its page); never raises."""
    try:
        from optuna_dashboard import save_note

        save_note(study, text)
    except Exception as exc:
        logger.warning("could not save the dashboard note of study %r: %s", study.study_name, exc)


def dashboard_url(host: str, port: int) -> str:
    shown = f"[{host}]" if ":" in host else host
    return f"http://{shown}:{port}/dashboard/"


def make_server(
    storage: str | optuna.storages.BaseStorage, host: str = DEFAULT_HOST, port: int = DEFAULT_PORT
) -> WSGIServer:
    """A (not yet started) HTTP server for optuna-dashboard's app on ``host:port`` (port 0: any free port).

    Example::

        server = make_server("sqlite:///studies/poft.db", port=0)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        ...
        server.shutdown()
    """
    from wsgiref.simple_server import WSGIRequestHandler, WSGIServer
    from wsgiref.simple_server import make_server as wsgiref_server

    from optuna_dashboard import wsgi

    class _Handler(WSGIRequestHandler):
        def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the base class's name
            logger.debug("dashboard: " + format, *args)

    class _Server(WSGIServer):
        allow_reuse_address = True

    app = wsgi(storage)
    try:
        return wsgiref_server(host, port, app, server_class=_Server, handler_class=_Handler)
    except OSError as exc:
        raise InvalidConfigError(
            f"Could not serve the dashboard on {host}:{port} ({exc}). Pick another port with --port, or stop "
            "what is using it."
        ) from exc


def launch(
    storage: str | optuna.storages.BaseStorage,
    host: str = DEFAULT_HOST,
    port: int = DEFAULT_PORT,
    *,
    stream: TextIO | None = None,
) -> None:
    """Serve optuna-dashboard for ``storage`` on ``host:port`` until Ctrl+C; prints the URL first.

    Binds to 127.0.0.1 by default: the dashboard can edit and delete studies, so exposing it on other
    interfaces (``host="0.0.0.0"``) is a deliberate choice. Example: ``launch("sqlite:///studies/poft.db")``.
    """
    out = stream if stream is not None else sys.stdout
    server = make_server(storage, host, port)
    if host not in ("127.0.0.1", "localhost", "::1"):
        print(f"warning: serving on {host}: anyone who can reach it can edit or delete studies.", file=out)
    print(f"optuna-dashboard: {dashboard_url(host, server.server_port)}  (Ctrl+C to stop)", file=out, flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
