"""Several workers on one study: shared storage, heartbeats, retries of lost trials, and the study's budget.

A *worker* is a process that loads the model and data once, then runs trials of a study until the study's
budget is met. Workers coordinate only through the Optuna storage (the single source of truth):

* ``open_storage(...)`` turns what the user passed into a storage with heartbeats: an RDB URL
  (``sqlite:///x.db`` for one process, ``postgresql://...`` for many machines) becomes an
  ``RDBStorage`` with Optuna's heartbeat; a file path that is not SQLite becomes a
  :class:`HeartbeatJournalStorage` (Optuna's JournalStorage on a file, plus the heartbeat Optuna 5.1
  lacks there) for several processes on one machine. A storage object is used as it is.
* While a trial runs, a daemon thread records its heartbeat every ``heartbeat_interval`` seconds.
  Before each new trial, a worker fails the running trials whose heartbeat is older than
  ``grace_period`` (their worker died: ``kill -9``, a lost machine, the OOM killer) and
  :class:`RetryLostTrial` queues each one again as a WAITING trial with the same parameters, which
  the next ``ask`` picks up; the plan is rebuilt from those parameters with the original trial's seed
  (:func:`plan_seed`), so a retry runs the same plan.
* ``n_trials`` is the study's total, not a per-call count (:func:`trials_done`): a rerun of the same
  command resumes the study and stops once the budget is met. With heartbeats, trials other workers
  are running count as taken, and a worker with nothing left to start waits for them (a lost one is
  retried by whoever is waiting), so several workers do not overshoot the budget (except when two
  ask at the same instant: at most one extra trial per other worker). Without heartbeats (a storage
  object without them) running trials are not counted, as with Optuna's ``MaxTrialsCallback``: up
  to ``workers - 1`` extra trials.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import optuna
from optuna.storages import BaseStorage, JournalStorage, RDBStorage
from optuna.storages._heartbeat import BaseHeartbeat  # the interface Optuna's fail_stale_trials reads
from optuna.storages.journal import BaseJournalBackend, JournalFileBackend
from optuna.trial import FrozenTrial, TrialState

from poft_autotune.errors import InvalidConfigError, MissingDependencyError

logger = logging.getLogger("poft_autotune")

HEARTBEAT_INTERVAL = 10  # seconds between heartbeats of a running trial
GRACE_PERIOD = 60  # seconds without a heartbeat after which a running trial is lost
MAX_RETRY = 3  # a lost plan is run again at most this many times (a plan that kills its worker stops there)
HEARTBEAT_ATTR = "poft:heartbeat"  # journal heartbeats: epoch seconds, a trial system attr
# The keys Optuna's RetryHeartbeatStaleTrialCallback uses, so its static helpers read our retries too.
FAILED_TRIAL_ATTR = "failed_trial"
RETRY_HISTORY_ATTR = "retry_history"
WORKER_ATTR = "worker"  # host:pid of the worker that ran the trial
PLAN_ATTR = "plan"  # = poft_autotune.pareto.PLAN_ATTR (not imported: pareto imports plotting)
# = poft_autotune.search.policy.PRUNED_ATTR: a trial closed at once as a duplicate of another worker's plan
PRUNED_ATTR, DUPLICATE_PREFIX = "pruned_reason", "duplicate of"
SQLITE_SUFFIXES = (".db", ".sqlite", ".sqlite3")
JOURNAL_SUFFIXES = (".journal", ".log", ".jsonl")
_SQLITE_HEADER = b"SQLite format 3\x00"


class RetryLostTrial:
    """Heartbeat-stale trial callback: queue the lost trial again (WAITING, same params) and note why.

    Like Optuna's ``RetryHeartbeatStaleTrialCallback`` (same ``failed_trial`` / ``retry_history`` system
    attrs), but the retry does not inherit the dead trial's last heartbeat (it would look stale the moment
    it starts), and the lost trial gets a dashboard note with the reason. ``max_retry=None`` retries forever.
    Example: ``RDBStorage(url, heartbeat_interval=10, heartbeat_stale_trial_callback=RetryLostTrial(3))``.
    """

    def __init__(self, max_retry: int | None = MAX_RETRY, grace_period: float | None = None) -> None:
        if max_retry is not None and (not isinstance(max_retry, int) or max_retry < 0):
            raise InvalidConfigError(f"`max_retry` must be an integer >= 0 or None, got {max_retry!r}.")
        self.max_retry = max_retry
        self.grace_period = grace_period

    def __call__(self, study: optuna.Study, trial: FrozenTrial) -> None:
        after = f" for more than {self.grace_period:g} s" if self.grace_period else ""
        queue_again(study, trial, f"worker lost: no heartbeat{after}", self.max_retry)


def queue_again(study: optuna.Study, trial: FrozenTrial, reason: str, max_retry: int | None = MAX_RETRY) -> bool:
    """Queue a failed trial's parameters again as a WAITING trial (unless retried ``max_retry`` times);
    note ``reason`` on the failed trial. Returns whether it was queued."""
    history = [*trial.system_attrs.get(RETRY_HISTORY_ATTR, []), trial.number]
    retry = max_retry is None or len(history) <= max_retry
    reason += "; its plan is queued again" if retry else f"; not retried again (max_retry={max_retry})"
    logger.warning("trial %d: %s", trial.number, reason)
    _note_lost(study, trial, reason)
    if not retry:
        return False
    system_attrs = {k: v for k, v in trial.system_attrs.items() if k != HEARTBEAT_ATTR}
    system_attrs[FAILED_TRIAL_ATTR] = trial.system_attrs.get(FAILED_TRIAL_ATTR, trial.number)
    system_attrs[RETRY_HISTORY_ATTR] = history
    study.add_trial(
        optuna.trial.create_trial(
            state=TrialState.WAITING,
            params=trial.params,
            distributions=trial.distributions,
            user_attrs={k: v for k, v in trial.user_attrs.items() if k != "error"},
            system_attrs=system_attrs,
        )
    )
    return True


def _note_lost(study: optuna.Study, trial: FrozenTrial, reason: str) -> None:
    from poft_autotune.dashboard import failure_note, save_trial_note
    from poft_autotune.search.space import TrialPlan

    plan = trial.user_attrs.get(PLAN_ATTR)
    try:
        text = failure_note(TrialPlan.from_dict(plan), reason, trial_number=trial.number) if plan else None
    except Exception:  # a plan of a method that is not registered here: the reason alone still helps
        text = None
    save_trial_note(study, trial, text or f"## Trial {trial.number} (failed)\n\n**Error**: {reason}\n")


class HeartbeatJournalStorage(JournalStorage, BaseHeartbeat):
    """Optuna's JournalStorage plus heartbeats, which Optuna 5.1 implements only for RDBStorage.

    A heartbeat is the wall-clock time written as the trial's ``poft:heartbeat`` system attr; staleness
    compares it with this machine's clock, so use it where the workers share a clock (one machine; for
    several machines use PostgreSQL, whose heartbeats use the server's clock). Optuna's
    ``fail_stale_trials`` and ``study.optimize`` use it like an RDBStorage heartbeat. Example::

        storage = HeartbeatJournalStorage(JournalFileBackend("studies/poft.journal"), heartbeat_interval=10)
    """

    def __init__(
        self,
        backend: BaseJournalBackend,
        *,
        heartbeat_interval: int = HEARTBEAT_INTERVAL,
        grace_period: int | None = None,
        heartbeat_stale_trial_callback: Callable[[optuna.Study, FrozenTrial], None] | None = None,
    ) -> None:
        _check_heartbeat(heartbeat_interval, grace_period)
        super().__init__(backend)
        self.heartbeat_interval = heartbeat_interval
        self.grace_period = grace_period
        self.heartbeat_stale_trial_callback = heartbeat_stale_trial_callback

    def record_heartbeat(self, trial_id: int) -> None:
        self.set_trial_system_attr(trial_id, HEARTBEAT_ATTR, time.time())

    def _get_stale_trial_ids(self, study_id: int) -> list[int]:
        grace = self.grace_period if self.grace_period is not None else 2 * self.heartbeat_interval
        now = time.time()
        return [
            t._trial_id
            for t in self.get_all_trials(study_id, deepcopy=False, states=(TrialState.RUNNING,))
            if HEARTBEAT_ATTR in t.system_attrs and now - float(t.system_attrs[HEARTBEAT_ATTR]) > grace
        ]

    def get_heartbeat_interval(self) -> int | None:
        return self.heartbeat_interval

    def get_heartbeat_stale_trial_callback(self) -> Callable[[optuna.Study, FrozenTrial], None] | None:
        return self.heartbeat_stale_trial_callback


def _check_heartbeat(interval: Any, grace: Any) -> None:
    if not isinstance(interval, int) or isinstance(interval, bool) or interval <= 0:
        raise InvalidConfigError(f"`heartbeat_interval` must be a positive integer (seconds), got {interval!r}.")
    if grace is not None and (not isinstance(grace, int) or isinstance(grace, bool) or grace <= interval):
        raise InvalidConfigError(
            f"`grace_period` must be an integer number of seconds > heartbeat_interval ({interval}), got {grace!r}; "
            "a few heartbeats' worth (e.g. 6x) keeps a slow but live worker from being declared lost."
        )


def open_storage(
    storage: str | os.PathLike[str] | BaseStorage | None,
    *,
    default_path: str | os.PathLike[str] | None = None,
    heartbeat_interval: int = HEARTBEAT_INTERVAL,
    grace_period: int = GRACE_PERIOD,
    max_retry: int | None = MAX_RETRY,
) -> BaseStorage:
    """The study storage for ``storage``, with heartbeats and retries of lost trials.

    * ``None``: SQLite at ``default_path`` (one process).
    * a URL (``sqlite:///...``, ``postgresql://user@host/db``, any SQLAlchemy URL): ``RDBStorage`` with
      Optuna's heartbeat. PostgreSQL needs ``pip install "poft-autotune[postgres]"`` (psycopg 3).
    * a path: an existing SQLite file or a name ending in .db/.sqlite/.sqlite3 -> SQLite; any other file
      (e.g. ``studies/poft.journal``) -> :class:`HeartbeatJournalStorage` (several processes on one machine).
    * a storage object: returned as it is (its own heartbeat settings, if any, apply).

    Example: ``autotune(..., storage=open_storage("studies/poft.journal", grace_period=30))``.
    """
    if isinstance(storage, BaseStorage):
        return storage
    _check_heartbeat(heartbeat_interval, grace_period)
    retry = RetryLostTrial(max_retry, grace_period)
    if storage is None:
        if default_path is None:
            raise InvalidConfigError("`storage` is None and no default path was given; pass a storage URL or path.")
        storage = Path(default_path)
    if not isinstance(storage, (str, os.PathLike)):
        raise InvalidConfigError(
            f"`storage` must be a URL, a file path or an Optuna storage object, got {type(storage).__name__}."
        )
    text = os.fspath(storage)
    if "://" not in text:
        path = Path(text).expanduser()
        kind = storage_file_kind(path)
        if kind is None:
            raise InvalidConfigError(
                "`storage` must be a database URL such as 'sqlite:///studies/poft.db' or "
                "'postgresql://user:password@host/db', or a file ending in .db (SQLite) or .journal (several "
                f"workers on one machine), got {text!r}."
            )
        path.parent.mkdir(parents=True, exist_ok=True)
        if kind == "sqlite":
            text = f"sqlite:///{path.resolve()}"
        else:
            try:
                backend = JournalFileBackend(str(path))
            except OSError as exc:
                raise InvalidConfigError(f"Could not open the journal file {text!r}: {exc}") from exc
            return HeartbeatJournalStorage(
                backend,
                heartbeat_interval=heartbeat_interval,
                grace_period=grace_period,
                heartbeat_stale_trial_callback=retry,
            )
    shown, text = _masked(text), _with_driver(text)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            return RDBStorage(
                text,
                heartbeat_interval=heartbeat_interval,
                grace_period=grace_period,
                heartbeat_stale_trial_callback=retry,
            )
    except ImportError as exc:
        raise MissingDependencyError(
            f"The storage {shown} needs a database driver that is not installed ({exc}). For PostgreSQL: "
            'pip install "poft-autotune[postgres]".'
        ) from exc
    except Exception as exc:  # sqlalchemy raises many types for bad URLs and unreachable servers
        raise InvalidConfigError(f"Could not open the study storage {shown}: {exc}") from exc


def _masked(url: str) -> str:
    """The URL for messages, its password masked."""
    from sqlalchemy.engine import make_url

    try:
        return repr(make_url(url).render_as_string(hide_password=True))
    except Exception:
        return repr(url)


def _with_driver(url: str) -> str:
    """``postgresql://`` -> ``postgresql+psycopg://`` when only psycopg 3 (our ``postgres`` extra) is installed:
    SQLAlchemy 2.0 would otherwise look for psycopg2 (2.1 already defaults to psycopg 3)."""
    scheme, sep, rest = url.partition("://")
    if scheme not in ("postgresql", "postgres"):
        return url
    import importlib.util

    if importlib.util.find_spec("psycopg2") is None and importlib.util.find_spec("psycopg") is not None:
        return f"postgresql+psycopg{sep}{rest}"
    return url


def storage_file_kind(path: Path) -> str | None:
    """``"sqlite"``, ``"journal"`` or None (not a storage file) for a path given as ``storage``: by its
    suffix, or by its content when the file exists (an existing non-SQLite file is taken as a journal)."""
    path = path.expanduser()
    if path.is_dir():
        return None
    if path.suffix.lower() in SQLITE_SUFFIXES or _is_sqlite(path):
        return "sqlite"
    if path.suffix.lower() in JOURNAL_SUFFIXES or path.is_file():
        return "journal"
    return None


def _is_sqlite(path: Path) -> bool:
    if not path.is_file():
        return False
    with path.open("rb") as f:
        return f.read(len(_SQLITE_HEADER)) == _SQLITE_HEADER


def heartbeat_enabled(study: optuna.Study) -> bool:
    """Whether the study's storage records heartbeats (then lost trials are detected and retried)."""
    storage = study._storage
    return isinstance(storage, BaseHeartbeat) and storage.get_heartbeat_interval() is not None


def is_dense_trial(trial: FrozenTrial) -> bool:
    """The dense baseline autotune records (no parameters, an empty compression plan): not a search trial."""
    plan = trial.user_attrs.get(PLAN_ATTR)
    return not trial.params and isinstance(plan, dict) and not plan.get("compression")


def trials_done(study: optuna.Study) -> tuple[int, int]:
    """``(finished, running)`` search trials of the study; ``finished`` is what the budget counts.

    Finished = COMPLETE, PRUNED or FAIL (a failed or early-stopped plan is an answer too), excluding the dense
    baseline, lost trials that were queued again (their retry counts instead) and trials closed at once as
    duplicates of another worker's plan. WAITING trials are not counted.
    """
    trials = study.get_trials(deepcopy=False)
    retried = {n for t in trials for n in t.system_attrs.get(RETRY_HISTORY_ATTR, [])}
    finished = running = 0
    for t in trials:
        if is_dense_trial(t) or str(t.user_attrs.get(PRUNED_ATTR, "")).startswith(DUPLICATE_PREFIX):
            continue
        if t.state == TrialState.RUNNING:
            running += 1
        elif t.state.is_finished() and t.number not in retried:
            finished += 1
    return finished, running


def fail_lost_trials(study: optuna.Study) -> None:
    """Fail the running trials whose heartbeat stopped; the storage's callback queues them again."""
    if heartbeat_enabled(study):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            optuna.storages.fail_stale_trials(study)


def trials_left(study: optuna.Study, n_trials: int, *, poll_s: float | None = None) -> int:
    """How many of the study's ``n_trials`` are still to be started (0: the budget is met; stop).

    Fails lost trials first (their retries are then the next ``ask``). With heartbeats, trials running
    elsewhere count as taken, and while they run and nothing is left this waits (polling every ``poll_s``,
    default the heartbeat interval) in case one is lost; without heartbeats only finished trials count.
    Example: ``while trials_left(study, 30): trial = ask(study); ...``.
    """
    beats = heartbeat_enabled(study)
    said = False
    while True:
        fail_lost_trials(study)
        finished, running = trials_done(study)
        left = n_trials - finished - (running if beats else 0)
        if left > 0:
            return left
        if not beats or running == 0:
            return 0
        if not said:
            logger.info("budget taken: waiting for %d trial(s) running elsewhere (a lost one is retried)", running)
            said = True
        interval = study._storage.get_heartbeat_interval()  # type: ignore[attr-defined]
        time.sleep(poll_s if poll_s is not None else float(interval))


def ask(study: optuna.Study) -> optuna.Trial:
    """``study.ask()`` for a worker: the trial's heartbeat is recorded by a daemon thread until it finishes,
    and ``user_attrs["worker"]`` says which process ran it (``host:pid``)."""
    with warnings.catch_warnings():
        # Optuna warns that heartbeats are meant for study.optimize; ask/tell is fine with our thread.
        warnings.filterwarnings("ignore", message="Heartbeat of storage")
        trial = study.ask()
    if heartbeat_enabled(study):
        _HeartbeatThread(study, trial._trial_id).start()
    trial.set_user_attr(WORKER_ATTR, f"{socket.gethostname()}:{os.getpid()}")
    return trial


def next_trial(study: optuna.Study, n_trials: int, *, poll_s: float | None = None) -> optuna.Trial | None:
    """The next trial this worker should run (:func:`ask`), or None once the study's budget is met
    (:func:`trials_left`). Example::

        while (trial := next_trial(study, 30)) is not None:
            study.tell(trial, objective(trial))
    """
    return ask(study) if trials_left(study, n_trials, poll_s=poll_s) > 0 else None


class _HeartbeatThread(threading.Thread):
    """Records a trial's heartbeat every interval until the trial is finished (or the process ends)."""

    def __init__(self, study: optuna.Study, trial_id: int) -> None:
        super().__init__(name=f"poft-heartbeat-{trial_id}", daemon=True)
        self._storage = study._storage
        self._trial_id = trial_id

    def run(self) -> None:
        interval = float(self._storage.get_heartbeat_interval())  # type: ignore[attr-defined]
        while True:
            try:
                if self._storage.get_trial(self._trial_id).state.is_finished():
                    return
                self._storage.record_heartbeat(self._trial_id)  # type: ignore[attr-defined]
            except optuna.exceptions.UpdateFinishedTrialError:
                return
            except Exception as exc:  # a storage hiccup: try again next beat (staleness takes several misses)
                logger.debug("heartbeat of trial id %d failed: %s", self._trial_id, exc)
            time.sleep(interval)


def claim(study: optuna.Study, key: str, *, settle_s: float = 0.3, expire_s: float = 600.0) -> bool:
    """Whether this process wins the one-time job ``key`` (e.g. recording the dense baseline) among the
    workers that ask at about the same time.

    Optuna storages have no compare-and-set, so this is last-writer-wins: each contender writes its id to
    the study system attr ``poft:claim:<key>``, waits ``settle_s`` (far longer than a storage write takes)
    and wins if its id is still there. A claim younger than ``expire_s`` makes later contenders lose at
    once; an older one (its worker died before finishing the job) is void.
    """
    storage, name = study._storage, f"poft:claim:{key}"
    current = storage.get_study_system_attrs(study._study_id).get(name)
    if isinstance(current, dict) and time.time() - float(current.get("at", 0)) < expire_s:
        return False
    me = f"{socket.gethostname()}:{os.getpid()}:{threading.get_ident()}:{time.monotonic_ns()}"
    storage.set_study_system_attr(study._study_id, name, {"by": me, "at": time.time()})
    time.sleep(settle_s)
    final = storage.get_study_system_attrs(study._study_id).get(name)
    return isinstance(final, dict) and final.get("by") == me


def plan_seed(trial: optuna.trial.BaseTrial, seed: int) -> int:
    """The seed of a trial's plan: ``seed`` + the number of the trial it retries (else its own number),
    so a retried plan trains exactly as the lost one would have."""
    if isinstance(trial, optuna.Trial):
        system_attrs = trial.storage.get_trial_system_attrs(trial._trial_id)
    else:
        system_attrs = getattr(trial, "system_attrs", {})
    return seed + int(system_attrs.get(FAILED_TRIAL_ATTR, trial.number))


def requeue(study: optuna.Study, trial: optuna.Trial, reason: str) -> None:
    """Queue a trial that its own worker stopped (e.g. Ctrl-C) again, once it is told FAIL."""
    queue_again(study, study._storage.get_trial(trial._trial_id), reason, max_retry=None)
