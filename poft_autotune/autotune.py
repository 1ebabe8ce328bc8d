"""``autotune(...)``: search compression settings and recovery together; return the Pareto front."""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Literal

import optuna
from torch import nn
from transformers import TrainingArguments

from poft_autotune.dashboard import failure_note, save_study_note, save_trial_note, trial_note
from poft_autotune.data import (
    CAUSAL_LM,
    Metric,
    PadCollator,
    detect_task,
    evaluate_model,
    prepare_dataset,
    resolve_metric,
)
from poft_autotune.errors import InvalidConfigError, PoftError
from poft_autotune.export import export_model
from poft_autotune.pareto import CHECKPOINT_ATTR, PLAN_ATTR, RESULT_ATTR, ParetoFront
from poft_autotune.search.objective import TrialContext, TrialResult, run_trial
from poft_autotune.search.policy import (
    RATIONALE_ATTR,
    Constraints,
    Policy,
    StudyView,
    ask_next,
    get_policy,
)
from poft_autotune.search.space import RecoveryConfig, SearchSpace, TrialPlan
from poft_autotune.search.stopping import DominanceMonitor, EarlyStopping
from poft_autotune.size import checkpoint_size
from poft_autotune.validate import check_arguments, check_setup, check_study_space, shown_storage
from poft_autotune.workers import claim, is_dense_trial, open_storage, requeue, trials_done, trials_left

logger = logging.getLogger("poft_autotune")

DENSE_ATTR = "dense"
ERROR_ATTR = "error"
CONSTRAINTS_ATTR = "constraints"
DEFAULT_STOPPING = EarlyStopping()


def _prune_checkpoints(study: optuna.Study, root: Path) -> None:
    """Delete kept checkpoints of finished trials that are not on the front (keep_checkpoints='front').

    Only finished trials' checkpoints: another worker may have exported its running trial's checkpoint and
    not yet told the study (a dense checkpoint, ``trial-dense``, is finished once the study has DENSE_ATTR).
    """
    front = {str(Path(t.user_attrs.get(CHECKPOINT_ATTR, ""))) for t in study.best_trials}
    if not root.is_dir():
        return
    finished = {f"trial-{t.number}" for t in study.get_trials(deepcopy=False) if t.state.is_finished()}
    if DENSE_ATTR in study.user_attrs:
        finished.add("trial-dense")
    for path in root.iterdir():
        if path.is_dir() and path.name in finished and str(path.resolve()) not in front:
            shutil.rmtree(path, ignore_errors=True)


def load_model(
    model: str | os.PathLike[str] | nn.Module, num_labels: int | None = None, *, trust_remote_code: bool = False
) -> tuple[nn.Module, Any]:
    """A model and its tokenizer (None for a given model object) from a Hub id, a local path or a model.

    Loads safetensors weights only (pickle-based ``.bin`` files can run code when loaded) and runs no
    code shipped with the model unless ``trust_remote_code=True`` (review that code first). Example::

        model, tokenizer = load_model("path/to/classifier", num_labels=2)
    """
    if isinstance(model, nn.Module):
        return model, None
    if not isinstance(model, (str, os.PathLike)):
        raise InvalidConfigError(
            f"`model` must be a Hub id, a local path or a PreTrainedModel, got {type(model).__name__}."
        )
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    text = os.fspath(model)
    if text.startswith(("/", "./", "../", "~")) and not Path(text).expanduser().is_dir():
        raise InvalidConfigError(
            f"`model` {text!r} looks like a local path, but there is no such directory. Pass the folder that holds "
            "config.json and model.safetensors, a Hub id (namespace/name) or a PreTrainedModel."
        )
    remote = {"trust_remote_code": trust_remote_code}
    try:
        config = AutoConfig.from_pretrained(model, **remote)
    except (OSError, ValueError) as exc:
        if "trust_remote_code" in str(exc):
            raise InvalidConfigError(
                f"{str(model)!r} needs Python code shipped with the model to load (a custom architecture: "
                "`auto_map` in its config.json), and `trust_remote_code` is False. Review that code, then pass "
                "trust_remote_code=True (YAML: `trust_remote_code: true`), or use a built-in architecture."
            ) from exc
        raise InvalidConfigError(
            f"Could not load a model config from {str(model)!r} ({exc}). Pass an existing local directory, a Hub id "
            "reachable from this machine, or a PreTrainedModel."
        ) from exc
    causal = any(a.endswith("ForCausalLM") for a in (config.architectures or []))
    kwargs: dict[str, Any] = {"use_safetensors": True, **remote}
    try:
        if causal:
            loaded = AutoModelForCausalLM.from_pretrained(model, **kwargs)
        else:
            if num_labels is not None:
                kwargs["num_labels"] = num_labels
            loaded = AutoModelForSequenceClassification.from_pretrained(model, **kwargs)
    except OSError as exc:
        if "safetensors" not in str(exc):
            raise InvalidConfigError(f"Could not load the model weights from {str(model)!r}: {exc}") from exc
        raise InvalidConfigError(
            f"`model` {str(model)!r} has no safetensors weights (model.safetensors) to load ({exc}). poft_autotune "
            "loads safetensors only: pickle-based .bin files can run code when loaded. Convert the checkpoint "
            "once where you trust it (load it, then save_pretrained) and pass that directory."
        ) from exc
    try:
        tokenizer = AutoTokenizer.from_pretrained(model, **remote)
    except (OSError, ValueError) as exc:  # pre-tokenized data needs none; raw text then fails with a clear error
        logger.info("no tokenizer loaded from %s: %s", model, exc)
        return loaded, None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return loaded, tokenizer


def _default_args(training_args: TrainingArguments | None) -> TrainingArguments:
    if training_args is not None:
        if not isinstance(training_args, TrainingArguments):
            raise InvalidConfigError(
                f"`training_args` must be a TrainingArguments, got {type(training_args).__name__}."
            )
        return training_args
    import tempfile

    return TrainingArguments(
        output_dir=tempfile.gettempdir(),
        per_device_train_batch_size=16,
        weight_decay=0.0,
        warmup_steps=0,
        lr_scheduler_type="constant",
        report_to="none",
        disable_tqdm=True,
        save_strategy="no",
    )


def _study(
    storage: str | optuna.storages.BaseStorage | None,
    study_name: str,
    metric: Metric,
    sampler: optuna.samplers.BaseSampler,
    output_dir: Path,
) -> optuna.Study:
    given = storage
    storage = open_storage(storage, default_path=output_dir / f"{study_name}.db")
    directions: list[Literal["minimize", "maximize"]] = [
        "minimize",
        "maximize" if metric.greater_is_better else "minimize",
    ]
    from sqlalchemy.exc import SQLAlchemyError  # optuna's RDB storage raises these for unreachable databases

    try:
        study = optuna.create_study(
            study_name=study_name,
            storage=storage,
            directions=directions,
            sampler=sampler,
            load_if_exists=True,
        )
    except (ValueError, ImportError, RuntimeError, optuna.exceptions.OptunaError, SQLAlchemyError) as exc:
        # RuntimeError: e.g. a PostgreSQL study written by another Optuna version, a storage problem too
        raise InvalidConfigError(f"Could not open the study storage {shown_storage(given)}: {exc}") from exc
    expected = [optuna.study.StudyDirection.MINIMIZE, optuna.study.StudyDirection[directions[1].upper()]]
    if study.directions != expected:
        raise InvalidConfigError(
            f"Study {study_name!r} in this storage has directions {[d.name for d in study.directions]}, but this "
            f"run needs {directions} (size, {metric.name}). Use another study_name."
        )
    if study.metric_names is None:
        study.set_metric_names(["size_bytes", metric.name])
    elif study.metric_names[1] != metric.name:
        raise InvalidConfigError(
            f"Study {study_name!r} measures {study.metric_names[1]!r}, not {metric.name!r}. Use another study_name."
        )
    return study


def _record(trial: optuna.trial.BaseTrial, plan: TrialPlan, result: TrialResult) -> None:
    trial.set_user_attr(PLAN_ATTR, plan.to_dict())
    trial.set_user_attr(RESULT_ATTR, result.to_dict())


def _with_rationale(note: str, rationale: str) -> str:
    if not rationale:
        return note
    title, _, rest = note.partition("\n")
    return f"{title}\n\n**Why this trial**: {rationale}\n{rest}"


def _pruned_note(plan: TrialPlan, reason: str, number: int, rationale: str, curve: Any) -> str:
    lines = [f"## Trial {number}: {plan.label} (stopped early)", "", f"**Why stopped**: {reason}", ""]
    if curve:
        lines += ["| step | metric |", "|---|---|"] + [f"| {s} | {v:.4f} |" for s, v in curve]
    return _with_rationale("\n".join(lines) + "\n", rationale)


def _say(progress: Any, message: str) -> None:
    if progress is not None:
        progress.write(message)  # above the bar; logging too would print it twice
    else:
        logger.info(message)


def autotune(
    model: str | os.PathLike[str] | nn.Module,
    train_dataset: Any,
    eval_dataset: Any,
    *,
    metric: str | Callable[..., Any] | None = None,
    greater_is_better: bool | None = None,
    n_trials: int = 12,
    methods: Sequence[str] | None = None,
    space: SearchSpace | None = None,
    storage: str | optuna.storages.BaseStorage | None = None,
    study_name: str | None = None,
    seed: int = 0,
    training_args: TrainingArguments | None = None,
    tokenizer: Any = None,
    text_column: str = "text",
    label_column: str = "label",
    max_length: int = 128,
    eval_batch_size: int = 32,
    output_dir: str | os.PathLike[str] = "studies",
    keep_checkpoints: str = "front",
    show_progress: bool = True,
    policy: str | Policy = "agent",
    early_stopping: EarlyStopping | None = DEFAULT_STOPPING,
    promote: bool = True,
    max_size_bytes: int | None = None,
    min_retained: float | None = None,
    trust_remote_code: bool = False,
    allow_space_change: bool = False,
    threads: int | None = None,
) -> ParetoFront:
    """Search compression settings and recovery fine-tuning; return the size/metric Pareto front.

    Every trial's plan and result are stored on the Optuna study (``storage``, default
    ``sqlite:///<output_dir>/<study_name>.db``), so a rerun with the same name resumes it. The dense
    model is the first trial. Each trial's shipped checkpoint is exported to
    ``<output_dir>/<study_name>/checkpoints/trial-<n>`` (its bytes on disk are the size on the front);
    ``keep_checkpoints``: ``"front"`` keeps those of front points, ``"all"`` every one, ``"none"`` none.
    ``show_progress=True`` shows a progress bar over the trials and prints one line per trial above it;
    ``False`` is quiet (nothing on stdout; the per-trial lines go to the ``poft_autotune`` logger at INFO).
    ``threads``: CPU threads per trial (default ``$POFT_THREADS``, else the cores this process is given).
    Each trial also gets a markdown note for optuna-dashboard (:mod:`poft_autotune.dashboard`), and
    ``<output_dir>/<study_name>/`` receives ``front.json``, ``front.png`` and ``report.md``.

    ``policy``: who proposes trials: ``"agent"`` (probes, recovers, pushes and tunes like an expert and
    records why on each trial; :mod:`poft_autotune.search.agent`), ``"tpe"``, ``"nsga2"``, ``"random"``
    (Optuna samplers) or a :class:`~poft_autotune.search.policy.Policy` object. ``early_stopping``: stop a
    recovery whose projected metric is dominated by the front at its size (``None`` turns it off).
    ``promote``: the budget's last trials re-run short-recovery front points with ``space.steps[1]`` steps.
    ``max_size_bytes`` / ``min_retained`` (fraction of the dense metric): constraints; trials that miss them
    stay in the study, off the front (a plan over the size limit is stopped right after compression).
    Bad input raises one InvalidConfigError before any work (:mod:`poft_autotune.validate`); a study is
    continued only with the search space it was created with, unless ``allow_space_change=True``.
    ``trust_remote_code=True`` lets a model path load the Python code shipped with it (off by default).
    Example::

        front = autotune("path/to/model", train_ds, eval_ds, metric="accuracy", n_trials=12)
        print(front.to_markdown())
        front.export(front[0], "ship/smallest")
    """
    check_arguments(locals())  # before anything is loaded: one clear error, nothing written
    constraints = Constraints(max_size_bytes, min_retained)
    chosen = get_policy(policy)
    if early_stopping is not None and not isinstance(early_stopping, EarlyStopping):
        raise InvalidConfigError(
            f"`early_stopping` must be an EarlyStopping or None, got {type(early_stopping).__name__}."
        )
    if space is None:
        space = SearchSpace() if methods is None else SearchSpace(methods=tuple(methods))
    args = _default_args(training_args)
    num_labels = None
    if not isinstance(model, nn.Module) and "labels" not in getattr(train_dataset, "column_names", []):
        column = label_column if label_column in getattr(train_dataset, "column_names", []) else None
        # Class ids are 0..k-1: the largest id, not the number of distinct ones, sizes the head.
        labels = list(train_dataset[column]) if column else []
        ints = labels and all(isinstance(v, int) and not isinstance(v, bool) for v in labels)
        num_labels = max(labels) + 1 if ints else None  # non-integer labels are rejected by prepare_dataset
    base, loaded_tokenizer = load_model(model, num_labels, trust_remote_code=trust_remote_code)
    tokenizer = tokenizer if tokenizer is not None else loaded_tokenizer
    task = detect_task(base)
    resolved = resolve_metric(metric, task, greater_is_better)
    head = getattr(getattr(base, "config", None), "num_labels", None) if task != CAUSAL_LM else None
    common = {
        "tokenizer": tokenizer,
        "text_column": text_column,
        "label_column": label_column,
        "max_length": max_length,
        "num_labels": head,
    }
    train = prepare_dataset(train_dataset, task, split="train_dataset", **common)
    evaluation = prepare_dataset(eval_dataset, task, split="eval_dataset", **common)
    space = space.fitted_to(base)
    check_setup(base, space, train, evaluation, resolved, task)
    model_config: Any = getattr(base, "config", None)
    pad_id = getattr(model_config, "pad_token_id", None)
    if pad_id is None and tokenizer is not None:
        pad_id = tokenizer.pad_token_id
    collator = PadCollator(int(pad_id or 0), task)
    name = study_name or "poft"
    out = Path(output_dir)
    study = _study(storage, name, resolved, chosen.sampler(seed), out)
    # Optuna samplers are seeded per process. A resumed run must not redraw its first draws, and workers
    # sharing a study must not draw in lockstep (the same plans twice): offset the seed by the trials
    # already stored, and by the process id on storages built for several processes (journal, RDB
    # servers). A single process on SQLite stays reproducible for a given seed and history.
    if storage is None or isinstance(storage, (str, os.PathLike)):
        text = "" if storage is None else str(storage)
        shared = bool(text) and not (text.startswith("sqlite:") or text.endswith(".db"))
    else:
        shared = True  # a storage object: the caller may share it
    offset = len(study.get_trials(deepcopy=False)) + (os.getpid() if shared else 0)
    if offset:
        study.sampler = chosen.sampler(seed + offset)
    stored_constraints = study.user_attrs.get(CONSTRAINTS_ATTR)
    wanted = dataclasses.asdict(constraints)
    if stored_constraints is not None and stored_constraints != wanted:
        raise InvalidConfigError(
            f"Study {name!r} was run with constraints {stored_constraints}, this run asks for {wanted}; "
            "feasibility is part of a study's definition. Use another study_name."
        )
    check_study_space(study, space, allow_change=allow_space_change)
    checkpoints = out / name / "checkpoints"

    base.to(args.device).eval()
    dense = study.user_attrs.get(DENSE_ATTR)
    if dense is None:
        dense_metric = evaluate_model(base, evaluation, resolved, collator, eval_batch_size)
    # Workers starting together on a new study all measure the dense model; one of them records it.
    if dense is None and claim(study, "dense") and DENSE_ATTR not in study.user_attrs:
        size = checkpoint_size(base)
        plan = TrialPlan(compression=(), recovery=RecoveryConfig(steps=0), seed=seed)
        attrs: dict[str, Any] = {}
        if keep_checkpoints != "none":
            dense_dir = export_model(base, checkpoints / "trial-dense", tokenizer=tokenizer, overwrite=True)
            attrs[CHECKPOINT_ATTR] = str(dense_dir.resolve())
        result = TrialResult(
            size.total,
            size.as_dict(),
            resolved.name,
            resolved.greater_is_better,
            dense_metric,
            dense_metric,
            dense_metric,
            0,
            {},
        )
        # The key format is the one Trial.set_constraint writes; the dense model must be judged like any trial.
        system_attrs = {f"constraints:{k}": v for k, v in constraints.values(size.total, 1.0).items()}
        attrs[RATIONALE_ATTR] = "the dense model as given: the reference point"
        study.add_trial(
            optuna.trial.create_trial(
                values=[size.total, dense_metric],
                user_attrs={PLAN_ATTR: plan.to_dict(), RESULT_ATTR: result.to_dict(), **attrs},
                system_attrs=system_attrs,
            )
        )
        dense_trial = [t for t in study.get_trials(deepcopy=False) if is_dense_trial(t)][-1]
        note = trial_note(plan, result, trial_number=dense_trial.number, checkpoint=attrs.get(CHECKPOINT_ATTR))
        save_trial_note(study, dense_trial, note)
        study.set_user_attr(DENSE_ATTR, {"metric": dense_metric, "size_bytes": size.total})
        study.set_user_attr(CONSTRAINTS_ATTR, wanted)
        logger.info("dense baseline: %s=%.4g, %d bytes", resolved.name, dense_metric, size.total)
    elif dense is not None:
        dense_metric = float(dense["metric"])
    recorded = study.user_attrs.get(DENSE_ATTR)  # None while another worker is still recording it
    dense_size = int(recorded["size_bytes"]) if recorded else checkpoint_size(base).total
    context = TrialContext(
        base, train, evaluation, resolved, collator, args, dense_metric, eval_batch_size, tokenizer=tokenizer
    )
    context.threads = threads

    progress = None
    if show_progress:
        from tqdm.auto import tqdm

        progress = tqdm(total=n_trials, initial=min(n_trials, trials_done(study)[0]), desc="poft trials", unit="trial")
    try:
        # n_trials is the study's total: a rerun resumes; several workers share it (poft_autotune.workers).
        while (left := trials_left(study, n_trials)) > 0:

            def view(left: int = left) -> StudyView:
                return StudyView.read(
                    study,
                    space,
                    dense_metric=dense_metric,
                    dense_size=dense_size,
                    greater_is_better=resolved.greater_is_better,
                    budget_left=left,
                    budget_total=n_trials,
                    constraints=constraints,
                    seed=seed,
                )

            trial, plan = ask_next(study, space, chosen, view, promote=promote, seed=seed)
            export_dir = None if keep_checkpoints == "none" else checkpoints / f"trial-{trial.number}"
            monitor = DominanceMonitor(trial, early_stopping or EarlyStopping(checks=0), view, constraints)
            rationale = trial.user_attrs.get(RATIONALE_ATTR, "")
            try:
                result = run_trial(plan, context, export_dir, monitor=monitor)
            except optuna.TrialPruned as exc:
                if export_dir is not None:
                    shutil.rmtree(export_dir, ignore_errors=True)
                study.tell(trial, state=optuna.trial.TrialState.PRUNED)
                save_trial_note(study, trial, _pruned_note(plan, str(exc), trial.number, rationale, monitor.curve))
                _say(progress, f"trial {trial.number} {plan.label}: stopped early: {exc}")
            except PoftError as exc:
                if export_dir is not None:
                    shutil.rmtree(export_dir, ignore_errors=True)
                trial.set_user_attr(ERROR_ATTR, f"{type(exc).__name__}: {exc}")
                study.tell(trial, state=optuna.trial.TrialState.FAIL)
                error = f"{type(exc).__name__}: {exc}"
                save_trial_note(
                    study, trial, _with_rationale(failure_note(plan, error, trial_number=trial.number), rationale)
                )
                logger.warning("trial %d (%s) failed: %s", trial.number, plan.label, exc)
            except BaseException as exc:
                trial.set_user_attr(ERROR_ATTR, f"{type(exc).__name__}: {exc}")
                study.tell(trial, state=optuna.trial.TrialState.FAIL)
                if not isinstance(exc, Exception):  # Ctrl-C, SystemExit: the plan is run again on resume
                    requeue(study, trial, f"stopped by {type(exc).__name__}")
                raise
            else:
                try:
                    _record(trial, plan, result)
                    for key, value in constraints.values(result.size_bytes, result.retained).items():
                        trial.set_constraint(key, value)
                    if export_dir is not None:
                        trial.set_user_attr(CHECKPOINT_ATTR, str(export_dir.resolve()))
                    study.tell(trial, [result.size_bytes, result.recovered_metric])
                except optuna.exceptions.UpdateFinishedTrialError:
                    # This worker's heartbeat stalled past the grace period: another process declared the
                    # trial lost and queued its plan again. Drop this result; the retry records it.
                    if export_dir is not None:
                        shutil.rmtree(export_dir, ignore_errors=True)
                    logger.warning("trial %d was declared lost while it ran; its result is dropped", trial.number)
                    continue
                if keep_checkpoints == "front":
                    _prune_checkpoints(study, checkpoints)
                kept = export_dir is not None and export_dir.is_dir()  # "front" may have just deleted it
                checkpoint = str(export_dir.resolve()) if kept and export_dir is not None else None
                note = trial_note(
                    plan, result, trial_number=trial.number, checkpoint=checkpoint, keep_checkpoints=keep_checkpoints
                )
                save_trial_note(study, trial, _with_rationale(note, rationale))
                _say(
                    progress,
                    f"trial {trial.number} {plan.label}: {result.size_bytes} B, {resolved.name} dense "
                    f"{result.dense_metric:.4g} -> compressed {result.compressed_metric:.4g} -> recovered "
                    f"{result.recovered_metric:.4g} ({100 * result.retained:.1f} % retained, {plan.recovery.steps} steps)",
                )
            if progress is not None:
                progress.update(1)
    finally:
        if progress is not None:
            progress.close()
    front = ParetoFront.from_study(study)
    report_dir = out / name
    report_dir.mkdir(parents=True, exist_ok=True)
    front.to_json(report_dir / "front.json")
    figure = ""
    try:
        front.plot(report_dir / "front.png")
        figure = "![front](front.png)\n\n"
    except PoftError as exc:  # e.g. matplotlib missing: the report still has the table
        logger.warning("no front.png: %s", exc)
    summary = (
        f"Size: bytes of the exported checkpoint. Metric: {front.metric_name} "
        f"({'higher' if front.greater_is_better else 'lower'} is better); dense {dense_metric:.4g}.\n\n"
    )
    (report_dir / "report.md").write_text(
        f"# Pareto front of study `{name}`\n\n{summary}{figure}{front.to_markdown()}\n"
    )
    save_study_note(study, f"## Pareto front\n\n{summary}{front.to_markdown()}\n")
    if not math.isfinite(dense_metric):
        logger.warning("the dense model's %s is not finite: %s", resolved.name, dense_metric)
    return front
