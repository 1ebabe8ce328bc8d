"""Several workers on one study, lost workers, resume, and faults that end a trial but not the study.

The kill -9 and PostgreSQL tests run real worker processes (``poft-autotune worker``) on a tiny saved
classifier. The PostgreSQL test needs a server (``bash .ci/postgres`` starts one on 127.0.0.1 and prints
its URL, read from POFT_TEST_POSTGRES_URL): outside CI it is skipped when none answers; in CI (CI=true)
a missing server fails it.
"""

from __future__ import annotations

import dataclasses
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from typing import Any, ClassVar

import optuna
import pytest
import torch
import yaml
from optuna.storages import RDBStorage
from optuna.trial import TrialState

from poft_autotune import autotune
from poft_autotune.compression import _METHODS, MethodSpec
from poft_autotune.compression.base import CompressionConfig
from poft_autotune.errors import InvalidConfigError
from poft_autotune.pareto import PLAN_ATTR
from poft_autotune.search.space import SearchSpace
from poft_autotune.testing import csv_study, lm_dataset, tiny_llama, tiny_training_args
from poft_autotune.workers import (
    FAILED_TRIAL_ATTR,
    HEARTBEAT_ATTR,
    RETRY_HISTORY_ATTR,
    WORKER_ATTR,
    HeartbeatJournalStorage,
    RetryLostTrial,
    claim,
    fail_lost_trials,
    next_trial,
    open_storage,
    plan_seed,
    trials_done,
)

# --------------------------------------------------------------------------------------------- storage


def test_open_storage_picks_the_backend_and_checks_settings(tmp_path):
    default = open_storage(None, default_path=tmp_path / "a" / "s.db")
    assert isinstance(default, RDBStorage) and default.heartbeat_interval == 10
    assert isinstance(default.heartbeat_stale_trial_callback, RetryLostTrial)
    assert isinstance(open_storage(tmp_path / "x.sqlite3", heartbeat_interval=2, grace_period=5), RDBStorage)
    journal = open_storage(str(tmp_path / "x.journal"), heartbeat_interval=1, grace_period=3)
    assert isinstance(journal, HeartbeatJournalStorage) and journal.get_heartbeat_interval() == 1
    given = optuna.storages.InMemoryStorage()
    assert open_storage(given) is given
    with pytest.raises(InvalidConfigError, match="`grace_period` must be"):
        open_storage(tmp_path / "y.journal", heartbeat_interval=5, grace_period=5)
    with pytest.raises(InvalidConfigError, match="`heartbeat_interval` must be a positive integer"):
        open_storage(tmp_path / "y.journal", heartbeat_interval=0)
    with pytest.raises(InvalidConfigError, match="must be a database URL .* or a file ending in .db"):
        open_storage(tmp_path)  # a directory
    with pytest.raises(InvalidConfigError, match="must be a database URL"):
        open_storage("studies/x")  # neither a URL nor a storage file
    with pytest.raises(InvalidConfigError, match="Could not open the study storage"):
        open_storage("nosuchdialect://x")


def _toy_study(storage):
    study = optuna.create_study(storage=storage, study_name="toy", directions=["minimize", "maximize"])
    study.add_trial(optuna.trial.create_trial(values=[10.0, 1.0], user_attrs={PLAN_ATTR: {"compression": []}}))
    return study


def test_lost_trial_is_failed_and_retried_with_its_params_and_seed(tmp_path):
    """A running trial whose heartbeat stopped is failed, queued again with the same params, and the
    retry is what the next ask returns; the budget counts the retry, not the lost trial."""
    storage = open_storage(tmp_path / "s.journal", heartbeat_interval=1, grace_period=2, max_retry=1)
    study = _toy_study(storage)
    first = next_trial(study, 3)
    assert first is not None
    x = first.suggest_float("x", 0, 1)
    study.tell(first, [1.0, x])
    lost = next_trial(study, 3)
    assert lost is not None and lost.user_attrs[WORKER_ATTR].endswith(f":{os.getpid()}")
    y = lost.suggest_float("x", 0, 1)
    time.sleep(1.2)  # its heartbeat thread has written a heartbeat by now
    assert HEARTBEAT_ATTR in storage.get_trial(lost._trial_id).system_attrs
    assert trials_done(study) == (1, 1)
    # The worker "dies": no more heartbeats, and its last one is 10 s old.
    storage.record_heartbeat = lambda trial_id: None  # type: ignore[method-assign]
    storage.set_trial_system_attr(lost._trial_id, HEARTBEAT_ATTR, time.time() - 10)
    fail_lost_trials(study)
    trials = study.get_trials(deepcopy=False)
    assert trials[lost.number].state == TrialState.FAIL
    retry = trials[-1]
    assert retry.state == TrialState.WAITING and retry.params == {"x": y}
    assert retry.system_attrs[FAILED_TRIAL_ATTR] == lost.number and HEARTBEAT_ATTR not in retry.system_attrs
    assert trials_done(study) == (1, 0)  # the lost trial does not count; its retry will
    again = next_trial(study, 3)
    assert again is not None and again.number == retry.number
    assert again.suggest_float("x", 0, 1) == y
    assert plan_seed(again, 100) == 100 + lost.number  # the retried plan trains with the lost one's seed
    # Lost again: max_retry=1 means no third run; the second loss then counts as a finished (failed) trial.
    storage.set_trial_system_attr(again._trial_id, HEARTBEAT_ATTR, time.time() - 10)
    fail_lost_trials(study)
    assert study.get_trials(deepcopy=False)[-1].number == again.number  # nothing queued
    assert study.get_trials(deepcopy=False)[-1].system_attrs[RETRY_HISTORY_ATTR] == [lost.number]
    assert trials_done(study) == (2, 0)


def test_budget_is_the_study_total_and_waits_for_running_trials(tmp_path):
    storage = open_storage(tmp_path / "s.journal", heartbeat_interval=1, grace_period=3)
    study = _toy_study(storage)
    for _ in range(2):
        trial = next_trial(study, 2)
        assert trial is not None
        study.tell(trial, [1.0, trial.suggest_float("x", 0, 1)])
    assert next_trial(study, 2) is None  # the budget is met: a rerun does nothing
    running = next_trial(study, 3)
    assert running is not None
    # Another worker asking now finds the budget taken by the running trial: it waits for it to finish.
    start = time.monotonic()
    finisher = threading.Timer(1.5, lambda: study.tell(running, [1.0, 0.5]))
    finisher.start()
    assert next_trial(study, 3, poll_s=0.2) is None
    assert time.monotonic() - start >= 1.4
    assert trials_done(study) == (3, 0)


def test_claim_has_exactly_one_winner_among_simultaneous_contenders(tmp_path):
    """Recording the dense baseline is claimed: of workers claiming at once, one wins; later ones lose."""
    study = _toy_study(open_storage(tmp_path / "s.journal", heartbeat_interval=1, grace_period=3))
    barrier, wins = threading.Barrier(4), []

    def contend():
        barrier.wait()
        wins.append(claim(study, "dense"))

    threads = [threading.Thread(target=contend) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(wins) == [False, False, False, True]
    assert claim(study, "dense") is False  # a fresh claim blocks latecomers
    assert claim(study, "dense", expire_s=0.0) is True  # an expired one (its worker died) does not


# ------------------------------------------------------------------------------------- worker processes


def _study_file(tmp_path, *, n_trials, steps, name="w"):
    """A YAML study on a tiny saved classifier and CSV files; quantize only, full fine-tune."""
    definition = csv_study(
        tmp_path,
        space={"steps": list(steps), "learning_rate": [1e-4, 1e-4], "lora_rank": [0], "distill_weight": [0, 0]},
        n_trials=n_trials,
        policy="random",  # no policy proposals in the queue: the test's own plans and retries run in order
        early_stopping=False,
        promote=False,
        study_name=name,
        keep_checkpoints="all",
    )
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(definition))
    return path


def _worker(study_file, storage, grace=3):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    command = [sys.executable, "-m", "poft_autotune.cli", "worker", str(study_file), "--storage", storage]
    command += ["--heartbeat-interval", "1", "--grace-period", str(grace), "--quiet"]
    return subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _wait(proc, timeout=240):
    out, _ = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, out
    return out


def _search_trials(study):
    return [t for t in study.get_trials(deepcopy=False) if t.params]


def test_kill_9_mid_trial_loses_nothing_and_resume_completes_the_budget(tmp_path):
    study_file = _study_file(tmp_path, n_trials=3, steps=(60, 60))
    storage_path = str(tmp_path / "w.journal")
    proc = _worker(study_file, storage_path)
    storage = optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(storage_path))
    deadline = time.monotonic() + 180
    victim = None
    while time.monotonic() < deadline and proc.poll() is None:  # wait for trial 2 to be running
        try:
            study = optuna.load_study(study_name="w", storage=storage)
        except KeyError:
            study = None
        trials = _search_trials(study) if study else []
        complete = [t for t in trials if t.state == TrialState.COMPLETE]
        running = [t for t in trials if t.state == TrialState.RUNNING and PLAN_ATTR in t.user_attrs]
        if complete and running:
            victim = running[0]
            break
        time.sleep(0.05)
    assert victim is not None, proc.communicate()[0] if proc.poll() is not None else "no trial ran in time"
    finished_before = {t.number: t.values for t in complete}
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    study = optuna.load_study(study_name="w", storage=storage)
    after = {t.number: t for t in study.get_trials(deepcopy=False)}
    assert {n: after[n].values for n in finished_before} == finished_before  # no finished trial lost
    assert after[victim.number].state == TrialState.RUNNING
    time.sleep(3.5)  # past the grace period: the resumed worker finds the trial lost
    out = _wait(_worker(study_file, storage_path))
    study = optuna.load_study(study_name="w", storage=storage)
    trials = {t.number: t for t in study.get_trials(deepcopy=False)}
    assert trials[victim.number].state == TrialState.FAIL
    retries = [t for t in trials.values() if t.system_attrs.get(FAILED_TRIAL_ATTR) == victim.number]
    assert len(retries) == 1 and retries[0].state == TrialState.COMPLETE, out
    assert retries[0].params == victim.params
    assert retries[0].user_attrs[PLAN_ATTR] == victim.user_attrs[PLAN_ATTR]  # same plan, same seed
    assert trials_done(study) == (3, 0)
    assert sum(t.state == TrialState.COMPLETE for t in trials.values()) == 4  # dense + 3
    checkpoints = tmp_path / "out" / "w" / "checkpoints"
    assert (checkpoints / f"trial-{retries[0].number}" / "config.json").is_file()


def _postgres_url():
    in_ci = os.environ.get("CI", "").lower() in ("1", "true", "yes")
    url = os.environ.get("POFT_TEST_POSTGRES_URL")
    problem = None
    if url is None:
        problem = "POFT_TEST_POSTGRES_URL is not set (export POFT_TEST_POSTGRES_URL=$(bash .ci/postgres))"
        url = "postgresql://poft@127.0.0.1:55432/poft_test"  # where .ci/postgres puts it
    try:
        import psycopg

        psycopg.connect(url, connect_timeout=3).close()
        return url
    except Exception as exc:  # no driver, no server
        problem = f"{problem}; " if problem else ""
        problem += f"no PostgreSQL at {url}: {type(exc).__name__}: {exc}".strip()
    if in_ci:
        pytest.fail(f"CI=true but the PostgreSQL test cannot run: {problem}. .ci/run must start the server.")
    pytest.skip(f"{problem} (start one with `bash .ci/postgres`)")


def test_two_workers_on_postgres_run_every_planned_trial_exactly_once(tmp_path):
    url = _postgres_url()
    name = f"pg-{uuid.uuid4().hex[:8]}"
    study_file = _study_file(tmp_path, n_trials=6, steps=(30, 30), name=name)
    study = optuna.create_study(study_name=name, storage=url, directions=["minimize", "maximize"])
    try:
        planned = [{"method": "quantize", "quantize.bits": b, "quantize.group_size": None} for b in range(3, 9)]
        for params in planned:
            study.enqueue_trial(params)
        # A long grace period: nobody dies here, and a loaded machine must not make a live trial look lost.
        workers = [_worker(study_file, url, grace=30) for _ in range(2)]
        outputs = [_wait(w) for w in workers]
        trials = study.get_trials(deepcopy=False)
        search = [t for t in trials if t.params]
        assert [t.state for t in trials if not t.params] == [TrialState.COMPLETE]  # one dense baseline
        assert all(t.state == TrialState.COMPLETE for t in search), outputs
        bits = sorted(t.params["quantize.bits"] for t in search)
        # Every plan ran exactly once; an extra sampled trial is allowed only if two workers asked at the
        # same instant (documented), and it would be a 7th, not a duplicate.
        assert sorted(set(bits)) == list(range(3, 9)) and len(search) in (6, 7), bits
        assert all(bits.count(b) == 1 for b in range(3, 9)), bits
        assert len({t.user_attrs[WORKER_ATTR] for t in search}) == 2, "both workers should have run trials"
    finally:
        optuna.delete_study(study_name=name, storage=url)


# --------------------------------------------------------------------------------------------- faults


@dataclasses.dataclass(frozen=True)
class FaultConfig(CompressionConfig):
    """A compression method that misbehaves on purpose: NaN weights, an exception, or a real failed allocation."""

    method: ClassVar[str] = "fault"
    mode: str = "raise"

    @classmethod
    def suggest(cls, trial: optuna.Trial, choices: Any) -> FaultConfig:
        return cls(mode=trial.suggest_categorical("fault.mode", ["nan", "raise", "oom"]))

    def short(self) -> str:
        return f"fault-{self.mode}"


def _fault_(model, layers, config):
    if config.mode == "nan":
        for layer in layers.values():
            layer.weight.data.fill_(float("nan"))  # the recovery loss is NaN from the first step
    elif config.mode == "raise":
        raise KeyError("a bug inside a compression method")
    else:
        torch.empty(1 << 50, dtype=torch.uint8)  # a real allocation of 1 PiB: the allocator refuses it


@pytest.fixture
def fault_method(monkeypatch):
    monkeypatch.setitem(_METHODS, "fault", MethodSpec("fault", FaultConfig, _fault_))


def test_nan_loss_exception_and_out_of_memory_fail_their_trial_and_the_study_goes_on(tmp_path, fault_method):
    storage = f"sqlite:///{tmp_path}/f.db"
    study = optuna.create_study(study_name="f", storage=storage, directions=["minimize", "minimize"])
    for mode in ("nan", "raise", "oom"):
        study.enqueue_trial({"method": "fault", "fault.mode": mode})
    study.enqueue_trial({"method": "quantize", "quantize.bits": 8})
    train = lm_dataset(32)
    autotune(
        tiny_llama(),
        train,
        lm_dataset(16, seed=1),
        n_trials=4,
        space=SearchSpace(methods=("fault", "quantize"), steps=(2, 2), lora_rank=(0,), distill_weight=(0.0, 0.0)),
        storage=storage,
        study_name="f",
        policy="random",
        early_stopping=None,
        training_args=tiny_training_args(str(tmp_path / "out")),
        output_dir=tmp_path,
        show_progress=False,
    )
    trials = [t for t in optuna.load_study(study_name="f", storage=storage).trials if t.params]
    errors = {t.params.get("fault.mode", "ok"): (t.state, t.user_attrs.get("error", "")) for t in trials}
    assert errors["nan"][0] == TrialState.FAIL and "recovery diverged: training loss became nan" in errors["nan"][1]
    assert errors["raise"][0] == TrialState.FAIL and "compression failed: KeyError" in errors["raise"][1]
    assert errors["oom"][0] == TrialState.FAIL and "out of memory" in errors["oom"][1]
    assert "can't allocate memory" in errors["oom"][1]
    assert errors["ok"][0] == TrialState.COMPLETE  # the study went on after three failures


def test_ctrl_c_fails_the_trial_and_queues_its_plan_for_the_resume(tmp_path, fault_method, monkeypatch):
    storage = f"sqlite:///{tmp_path}/c.db"
    study = optuna.create_study(study_name="c", storage=storage, directions=["minimize", "minimize"])
    study.enqueue_trial({"method": "fault", "fault.mode": "raise"})
    interrupt = {"on": True}

    def apply(model, layers, config):
        if interrupt["on"]:
            raise KeyboardInterrupt
        return None

    monkeypatch.setitem(_METHODS, "fault", MethodSpec("fault", FaultConfig, apply))
    kwargs: dict[str, Any] = {
        "n_trials": 1,
        "space": SearchSpace(methods=("fault",), steps=(0, 0)),
        "storage": storage,
        "study_name": "c",
        "training_args": tiny_training_args(str(tmp_path / "out")),
        "output_dir": tmp_path,
        "show_progress": False,
        "policy": "random",
        "early_stopping": None,
    }
    model, train, evaluation = tiny_llama(), lm_dataset(16), lm_dataset(8, seed=1)
    with pytest.raises(KeyboardInterrupt):
        autotune(model, train, evaluation, **kwargs)
    interrupt["on"] = False
    autotune(model, train, evaluation, **kwargs)  # resume
    trials = [t for t in optuna.load_study(study_name="c", storage=storage).trials if t.params]
    assert [t.state for t in trials] == [TrialState.FAIL, TrialState.COMPLETE]
    assert trials[0].user_attrs["error"].startswith("KeyboardInterrupt")
    assert trials[1].params == trials[0].params and trials[1].system_attrs[FAILED_TRIAL_ATTR] == trials[0].number


# ---------------------------------------------------------------------------------------------- export


def test_kill_9_mid_export_leaves_no_directory_that_looks_complete(tmp_path):
    """A process killed while writing a checkpoint leaves only a hidden temporary sibling, never the target."""
    script = f"""
import sys, time
import poft_autotune.export as export
from poft_autotune.testing import tiny_llama
real = export._write_model
def slow(model, directory):
    kind = real(model, directory)  # weights and config written into the temporary directory
    print("written", flush=True)
    time.sleep(60)
    return kind
export._write_model = slow
export.export_model(tiny_llama(), {str(tmp_path / "ckpt")!r})
"""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    proc = subprocess.Popen([sys.executable, "-c", script], env=env, stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None and proc.stdout.readline().strip() == "written"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    names = [p.name for p in tmp_path.iterdir()]
    assert "ckpt" not in names
    assert len(names) == 1 and names[0].startswith(".ckpt.poft-tmp-")  # hidden, and named as unfinished
    assert (tmp_path / names[0] / "model.safetensors").is_file()  # it really was killed mid-export
