"""The ``poft-autotune`` command line: demo | run | worker | front | export | dashboard.

    poft-autotune demo [--trials N] [--steps LOW HIGH] [--out DIR] [--quiet]
    poft-autotune run STUDY.yaml [--quiet]
    poft-autotune worker STUDY.yaml [--storage STORAGE] [--heartbeat-interval S] [--grace-period S] [--quiet]
    poft-autotune front STORAGE [--study NAME] [--format table|json|markdown]
    poft-autotune export STORAGE --trial N DIR [--study NAME] [--overwrite]
    poft-autotune dashboard STORAGE [--host 127.0.0.1] [--port 8080]

STORAGE is an Optuna storage URL (``sqlite:///studies/demo.db``) or the path of a SQLite or journal file.
Errors caused by input print one ``error: ...`` line and exit with status 1.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import shlex
import sys
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import optuna

from poft_autotune.errors import InvalidConfigError, PoftError

if TYPE_CHECKING:
    from poft_autotune.pareto import ParetoFront
    from poft_autotune.study_config import StudyConfig

_SQLITE_HEADER = b"SQLite format 3\x00"
_handler: logging.Handler | None = None


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return value


def _nonneg_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be an integer >= 0, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be an integer >= 0, got {value}")
    return value


def open_storage(text: str) -> optuna.storages.BaseStorage:
    """An existing study storage from a URL or the path of a SQLite / journal file (nothing is created)."""
    if "://" not in text:
        path = Path(text).expanduser()
        if not path.is_file():
            raise InvalidConfigError(
                f"No study storage at {text!r}: not a URL (e.g. sqlite:///studies/demo.db) and no such file."
            )
        with path.open("rb") as f:
            is_sqlite = f.read(len(_SQLITE_HEADER)) == _SQLITE_HEADER
        if not is_sqlite:
            from optuna.storages.journal import JournalFileBackend

            return optuna.storages.JournalStorage(JournalFileBackend(str(path)))
        text = f"sqlite:///{path.resolve()}"
    if text.startswith("sqlite:///"):
        file = text[len("sqlite:///") :].split("?", 1)[0]
        if file and file != ":memory:" and not Path(file).is_file():
            raise InvalidConfigError(
                f"No SQLite study storage at {file!r} (from {text!r}): the file does not exist. Studies that "
                "autotune writes are at <output_dir>/<study_name>.db."
            )
    try:
        return optuna.storages.RDBStorage(text)
    except Exception as exc:  # sqlalchemy / optuna raise many types for bad URLs
        raise InvalidConfigError(f"Could not open the study storage {text!r}: {exc}") from exc


def load_study(storage: optuna.storages.BaseStorage, name: str | None) -> optuna.Study:
    """The study ``name`` in ``storage``, or its only study when ``name`` is None."""
    names = sorted(optuna.get_all_study_names(storage))
    if name is None:
        if len(names) != 1:
            raise InvalidConfigError(
                "This storage holds no study."
                if not names
                else f"This storage holds {len(names)} studies; pick one with --study NAME: {names}."
            )
        name = names[0]
    elif name not in names:
        raise InvalidConfigError(f"No study {name!r} in this storage; its studies: {names}.")
    return optuna.load_study(study_name=name, storage=storage)


@contextlib.contextmanager
def _output(quiet: bool) -> Iterator[None]:
    """INFO lines of the ``poft_autotune`` logger on stderr unless quiet; quiet also hushes transformers'
    warnings and datasets' progress bars. Everything is restored afterwards (``main`` may be called in-process).
    """
    import datasets
    import transformers

    global _handler
    logger = logging.getLogger("poft_autotune")
    if _handler is None:
        _handler = logging.StreamHandler()
        _handler.setFormatter(logging.Formatter("%(message)s"))
        logger.addHandler(_handler)
    level, verbosity = logger.level, transformers.logging.get_verbosity()
    optuna_verbosity = optuna.logging.get_verbosity()
    bars = datasets.is_progress_bar_enabled()
    logger.setLevel(logging.WARNING if quiet else logging.INFO)
    if quiet:
        transformers.logging.set_verbosity_error()
        optuna.logging.set_verbosity(optuna.logging.WARNING)
        datasets.disable_progress_bars()
    try:
        with warnings.catch_warnings():
            # set_metric_names is "experimental" in Optuna; the CLI user cannot act on that warning
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            yield
    finally:
        logger.setLevel(level)
        transformers.logging.set_verbosity(verbosity)
        optuna.logging.set_verbosity(optuna_verbosity)
        if bars:
            datasets.enable_progress_bars()


def _summary(front: ParetoFront, config: StudyConfig) -> str:
    report = config.report_dir.resolve()
    table = front.to_table() if len(front) else "(no completed trial: the front is empty)"
    return "\n".join(
        [
            f"Pareto front of study {config.study_name!r} ({front.metric_name}, "
            f"{'higher' if front.greater_is_better else 'lower'} is better; size = bytes of the exported checkpoint):",
            "",
            table,
            "",
            f"report: {report / 'report.md'}",
            f"plot:   {report / 'front.png'}",
            f"front:  {report / 'front.json'}",
            f"study:  {config.storage_url} (study {config.study_name!r})",
            "",
            "Browse every trial (plan, metric before/after recovery, size breakdown) in optuna-dashboard:",
            f"  poft-autotune dashboard {shlex.quote(config.storage_url)}",
        ]
    )


def demo_config_from_args(args: argparse.Namespace) -> StudyConfig:
    """The StudyConfig ``poft-autotune demo`` runs for parsed ``args``."""
    from poft_autotune.demo import demo_config

    return demo_config(trials=args.trials, steps=tuple(args.steps), out=args.out)


def _cmd_demo(args: argparse.Namespace) -> int:
    from poft_autotune.study_config import run_study

    config = demo_config_from_args(args)
    print(
        f"poft-autotune demo: MiniLM sentiment classifier, {config.n_trials} trials of "
        f"{config.space.steps[0]}-{config.space.steps[1]} recovery steps; study in {config.storage_url}",
        flush=True,
    )
    front = run_study(config, show_progress=not args.quiet)
    print(_summary(front, config))
    return 0


def _cmd_run(args: argparse.Namespace) -> int:
    from poft_autotune.study_config import load_study_config, run_study

    config = load_study_config(args.study_file)
    front = run_study(config, show_progress=not args.quiet)
    print(_summary(front, config))
    return 0


def _cmd_worker(args: argparse.Namespace) -> int:
    import dataclasses
    import os
    import signal

    from poft_autotune.study_config import load_study_config, run_study
    from poft_autotune.workers import open_storage

    config = load_study_config(args.study_file)
    if args.storage is not None:
        config = dataclasses.replace(config, storage=args.storage)
    if config.storage is None:  # the default SQLite file: create its folder like autotune would
        config.output_dir.mkdir(parents=True, exist_ok=True)
    storage = open_storage(
        config.storage_url, heartbeat_interval=args.heartbeat_interval, grace_period=args.grace_period
    )

    def stop(signum: int, frame: object) -> None:
        raise SystemExit(128 + signum)  # unwinds like Ctrl-C: the running trial is failed and queued again

    signal.signal(signal.SIGTERM, stop)
    print(
        f"worker {os.getpid()}: study {config.study_name!r} in {config.storage_url}, until "
        f"{config.n_trials} trials are done",
        flush=True,
    )
    front = run_study(config, show_progress=not args.quiet, storage=storage)
    print(_summary(front, config))
    return 0


def _cmd_front(args: argparse.Namespace) -> int:
    from poft_autotune.pareto import ParetoFront

    front = ParetoFront.from_study(load_study(open_storage(args.storage), args.study))
    if args.format == "json":
        print(front.to_json())
    elif args.format == "markdown":
        print(front.to_markdown())
    else:
        print(front.to_table() if len(front) else "(no completed trial: the front is empty)")
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    from poft_autotune.pareto import export_trial

    study = load_study(open_storage(args.storage), args.study)
    target = export_trial(study, args.trial, args.directory, overwrite=args.overwrite)
    print(f"exported trial {args.trial} of study {study.study_name!r} to {target}")
    print(f"load it with: poft_autotune.export.load_pretrained({str(target)!r})")
    return 0


def _cmd_dashboard(args: argparse.Namespace) -> int:
    from poft_autotune.dashboard import launch

    launch(open_storage(args.storage), host=args.host, port=args.port)
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``poft-autotune`` (one subparser per command)."""
    from poft_autotune.dashboard import DEFAULT_HOST, DEFAULT_PORT
    from poft_autotune.demo import DEMO_STEPS, DEMO_TRIALS
    from poft_autotune.workers import GRACE_PERIOD, HEARTBEAT_INTERVAL

    parser = argparse.ArgumentParser(
        prog="poft-autotune",
        description="Search compression settings and recovery fine-tuning together; get the size/metric front.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    storage_help = "Optuna storage URL (sqlite:///studies/demo.db) or path of a SQLite/journal file"

    demo = commands.add_parser(
        "demo",
        help="the offline demo: MiniLM + movie snippets (about 5-10 min on 2 CPU cores)",
        description="Fine-tune all-MiniLM-L6-v2 on movie-review snippets (once, cached), then search compression + "
        "recovery. Model and data come from PyPI packages (no Hub). Writes <out>/demo.db and <out>/demo/.",
    )
    demo.add_argument("--trials", type=_positive_int, default=DEMO_TRIALS, help=f"trials (default {DEMO_TRIALS})")
    demo.add_argument(
        "--steps",
        nargs=2,
        type=_nonneg_int,
        metavar=("LOW", "HIGH"),
        default=list(DEMO_STEPS),
        help=f"recovery steps range searched per trial (default {DEMO_STEPS[0]} {DEMO_STEPS[1]})",
    )
    demo.add_argument("--out", default="studies", help="output directory (default studies)")
    demo.add_argument("--quiet", action="store_true", help="no progress bar or per-trial lines")
    demo.set_defaults(handler=_cmd_demo)

    run = commands.add_parser(
        "run",
        help="run a study defined in a YAML file",
        description="Run the study a YAML file defines (see studies/demo.yaml, studies/example_local_csv.yaml and "
        "poft_autotune.study_config for the keys).",
    )
    run.add_argument("study_file", metavar="STUDY.yaml", help="the study definition")
    run.add_argument("--quiet", action="store_true", help="no progress bar or per-trial lines")
    run.set_defaults(handler=_cmd_run)

    worker = commands.add_parser(
        "worker",
        help="join a study as one of several workers (shared storage)",
        description="Run trials of the study a YAML file defines until the study has n_trials finished trials, "
        "together with any other workers on the same storage: a journal file (several processes on one machine, "
        "e.g. studies/x.journal) or a PostgreSQL URL (several machines). Rerun to resume; a worker that dies "
        "mid-trial has that trial retried by the others after the grace period.",
    )
    worker.add_argument("study_file", metavar="STUDY.yaml", help="the study definition")
    worker.add_argument(
        "--storage", help="storage URL or journal/SQLite file path (default: the study file's `storage`)"
    )
    worker.add_argument(
        "--heartbeat-interval",
        type=_positive_int,
        default=HEARTBEAT_INTERVAL,
        metavar="S",
        help=f"seconds between heartbeats of a running trial (default {HEARTBEAT_INTERVAL})",
    )
    worker.add_argument(
        "--grace-period",
        type=_positive_int,
        default=GRACE_PERIOD,
        metavar="S",
        help=f"seconds without a heartbeat before a trial is declared lost and retried (default {GRACE_PERIOD})",
    )
    worker.add_argument("--quiet", action="store_true", help="no progress bar or per-trial lines")
    worker.set_defaults(handler=_cmd_worker)

    front = commands.add_parser(
        "front",
        help="print the Pareto front stored in a study",
        description="Print the Pareto front of a study, rebuilt from its storage alone.",
    )
    front.add_argument("storage", metavar="STORAGE", help=storage_help)
    front.add_argument("--study", help="study name (default: the storage's only study)")
    front.add_argument("--format", choices=("table", "json", "markdown"), default="table", help="default table")
    front.set_defaults(handler=_cmd_front)

    export = commands.add_parser(
        "export",
        help="copy a trial's shipped checkpoint to a directory",
        description="Copy the kept checkpoint of a completed trial to DIR (load it with "
        "poft_autotune.export.load_pretrained).",
    )
    export.add_argument("storage", metavar="STORAGE", help=storage_help)
    export.add_argument("directory", metavar="DIR", help="target directory")
    export.add_argument("--trial", type=_nonneg_int, required=True, metavar="N", help="trial number")
    export.add_argument("--study", help="study name (default: the storage's only study)")
    export.add_argument("--overwrite", action="store_true", help="replace DIR if it exists")
    export.set_defaults(handler=_cmd_export)

    dashboard = commands.add_parser(
        "dashboard",
        help="browse a study in optuna-dashboard",
        description="Serve optuna-dashboard for STORAGE (each trial carries a note with its plan, numbers and size). "
        "Binds to 127.0.0.1 unless --host says otherwise: the dashboard can edit and delete studies.",
    )
    dashboard.add_argument("storage", metavar="STORAGE", help=storage_help)
    dashboard.add_argument("--host", default=DEFAULT_HOST, help=f"address to bind (default {DEFAULT_HOST})")
    dashboard.add_argument("--port", type=_nonneg_int, default=DEFAULT_PORT, help=f"port (default {DEFAULT_PORT})")
    dashboard.set_defaults(handler=_cmd_dashboard)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``poft-autotune``; returns the exit status. Example: ``main(["front", "studies/demo.db"])``."""
    args = build_parser().parse_args(argv)
    with _output(getattr(args, "quiet", False)):
        try:
            return int(args.handler(args))
        except PoftError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 1


if __name__ == "__main__":
    sys.exit(main())
