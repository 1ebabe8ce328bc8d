"""One trial: ``run_trial(plan, context) -> TrialResult``. Pure apart from the time it takes.

fresh copy of the base -> compress_ -> evaluate (after compression) -> RecoveryTrainer.train() ->
strip to the shipped form -> evaluate it -> size of its exported checkpoint.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import os
import shutil
import tempfile
import time
from collections.abc import Sequence
from typing import Any, Protocol

import torch
from torch import nn
from torch.profiler import record_function
from transformers import PrinterCallback, TrainerCallback, TrainingArguments, set_seed

from poft_autotune.compression import compress_
from poft_autotune.compression.base import strip_
from poft_autotune.data import EvalBatches, Metric, PadCollator, eval_batches, evaluate_model, rows_of
from poft_autotune.errors import PoftError, TrialFailedError
from poft_autotune.export import export_model, weight_bytes
from poft_autotune.recovery import (
    CompressionCallback,
    EvaluationCallback,
    NonFiniteLossCallback,
    RecoveryTrainer,
    TeacherCache,
)
from poft_autotune.recovery.lora import attach_lora, merge_lora_
from poft_autotune.search.space import TrialPlan
from poft_autotune.size import checkpoint_size
from poft_autotune.threads import resolve_threads, torch_threads


@dataclasses.dataclass
class TrialContext:
    """What every trial of a study shares; built once per worker.

    Besides the inputs it keeps what trials can reuse, built on first use: the evaluation set as padded
    batches grouped by length, the calibration batches, the metric right after each distinct compression
    (compression is deterministic, so a plan that repeats it, e.g. with other recovery settings, skips
    that evaluation), and the teacher's logits for distillation (:class:`TeacherCache`).
    """

    base_model: nn.Module  # dense, never modified; also the distillation teacher
    train_dataset: Any
    eval_dataset: Any
    metric: Metric
    collator: PadCollator
    training_args: TrainingArguments
    dense_metric: float
    eval_batch_size: int = 32
    tokenizer: Any = None  # saved beside exported checkpoints
    calibration_batches: int = 8  # batches of eval_batch_size training rows for data-aware methods (Wanda)
    threads: int | None = None  # CPU threads per trial; None: $POFT_THREADS, else the cores given (threads.py)
    teacher_cache_bytes: int = 512 * 2**20  # teacher logits kept across trials for distillation; 0: none
    callbacks: Sequence[TrainerCallback] = ()  # extra Trainer callbacks for recovery, after ours
    _eval: EvalBatches | None = dataclasses.field(default=None, init=False, repr=False)
    _calibration: list[dict[str, torch.Tensor]] | None = dataclasses.field(default=None, init=False, repr=False)
    _teacher_cache: TeacherCache | None = dataclasses.field(default=None, init=False, repr=False)
    _compressed_metrics: dict[str, float] = dataclasses.field(default_factory=dict, init=False, repr=False)

    def eval_set(self) -> EvalBatches:
        """The evaluation set as padded batches (grouped by length), built once."""
        if self._eval is None:
            self._eval = eval_batches(self.eval_dataset, self.collator, self.eval_batch_size)
        return self._eval

    def calibration(self) -> list[dict[str, torch.Tensor]]:
        """The calibration batches of data-aware methods (the same seeded sample for every trial), built once."""
        if self._calibration is None:
            self._calibration = calibration_batches(
                self.train_dataset, self.collator, self.calibration_batches, self.eval_batch_size
            )
        return self._calibration

    def teacher_cache(self) -> TeacherCache | None:
        """The distillation teacher's logits cache shared by this worker's trials (None when turned off)."""
        if self.teacher_cache_bytes > 0 and self._teacher_cache is None:
            self._teacher_cache = TeacherCache(self.teacher_cache_bytes)
        return self._teacher_cache


@dataclasses.dataclass
class TrialResult:
    """The measured numbers of one trial. Metrics are of the evaluated (shipped) model."""

    size_bytes: int
    size_breakdown: dict[str, int]
    metric_name: str
    greater_is_better: bool
    dense_metric: float
    compressed_metric: float
    recovered_metric: float
    recovery_steps: int
    timings: dict[str, float]
    train_loss: list[float] = dataclasses.field(default_factory=list)
    # LoRA trials: the metric with the adapters still separate (before merge and re-compression; for
    # ``lora_merge=False`` that is the shipped form, so it equals ``recovered_metric``).
    unmerged_metric: float | None = None

    @property
    def retained(self) -> float:
        """Fraction of the dense metric kept (``dense / recovered`` for lower-is-better metrics)."""
        if self.greater_is_better:
            return self.recovered_metric / self.dense_metric if self.dense_metric else math.nan
        return self.dense_metric / self.recovered_metric if self.recovered_metric else math.nan

    @property
    def recovered_fraction(self) -> float | None:
        """``(recovered - compressed) / (dense - compressed)``: the share of the compression loss won back."""
        gap = self.dense_metric - self.compressed_metric
        if gap == 0:
            return None
        return (self.recovered_metric - self.compressed_metric) / gap

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["retained"] = self.retained
        out["recovered_fraction"] = self.recovered_fraction
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrialResult:
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})


class TrialMonitor(Protocol):
    """Watches a trial as it runs (early stopping: :class:`poft_autotune.search.stopping.DominanceMonitor`).

    ``start`` gets the size right after compression; ``report`` gets ``(0, after-compression metric)``
    and then ``(step, metric)`` at each of ``eval_steps(max_steps)`` during recovery. Either may raise
    ``optuna.TrialPruned`` to stop the trial.
    """

    def eval_steps(self, max_steps: int) -> Sequence[int]: ...

    def start(self, size_bytes: int) -> None: ...

    def report(self, step: int, metric: float) -> None: ...


def recovery_arguments(template: TrainingArguments, plan: TrialPlan, output_dir: str) -> TrainingArguments:
    """The user's TrainingArguments with the plan's recovery settings; no checkpoints, no reporting."""
    steps = plan.recovery.steps
    return dataclasses.replace(
        template,
        output_dir=output_dir,
        max_steps=steps,
        learning_rate=plan.recovery.learning_rate,
        seed=plan.seed,
        save_strategy="no",
        eval_strategy="no",
        report_to="none",
        logging_strategy="steps",
        logging_steps=max(1, steps // 10),
        logging_nan_inf_filter=False,  # the divergence guard must see NaN/inf losses, not a running mean
    )


def calibration_batches(
    dataset: Any, collator: PadCollator, n_batches: int, batch_size: int, seed: int = 0
) -> list[dict[str, torch.Tensor]]:
    """``n_batches`` padded batches of model inputs from ``dataset`` (no labels), for data-aware compression.

    Rows are a seeded random sample (the same for every trial of a study, so trials compare on the same
    calibration data; a random sample, since datasets are often sorted by label or length). Example::

        compress_(model, plan.compression, calibration=calibration_batches(train, collator, 8, 32))
    """
    order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed))
    rows = order[: n_batches * batch_size].tolist()
    batches = []
    for start in range(0, len(rows), batch_size):
        batch = collator(rows_of(dataset, rows[start : start + batch_size]))
        batch.pop("labels", None)
        batches.append(batch)
    return batches


def _recover(
    model: nn.Module, plan: TrialPlan, context: TrialContext, monitor: TrialMonitor | None = None
) -> tuple[nn.Module, list[float]]:
    """Fine-tune ``model`` per ``plan.recovery``; returns the trained model (peft-wrapped for LoRA) and the losses."""
    recovery = plan.recovery
    trained = model
    if recovery.lora_rank > 0:
        trained = attach_lora(
            model, context.collator.task, recovery.lora_rank, recovery.lora_alpha, recovery.lora_dropout
        )
    output_dir = tempfile.mkdtemp(prefix="poft-trial-")
    guard = NonFiniteLossCallback()
    callbacks: list[Any] = [CompressionCallback(trained), guard, *context.callbacks]
    if monitor is not None:
        steps = monitor.eval_steps(recovery.steps)
        if steps:
            callbacks.append(EvaluationCallback(steps, lambda m: _evaluate(m, context), monitor.report))
    try:
        trainer = RecoveryTrainer(
            model=trained,
            args=recovery_arguments(context.training_args, plan, output_dir),
            train_dataset=context.train_dataset,
            data_collator=context.collator,
            teacher=context.base_model if recovery.distill_weight > 0 else None,
            distill_weight=recovery.distill_weight,
            temperature=recovery.temperature,
            teacher_cache=context.teacher_cache() if recovery.distill_weight > 0 else None,
            callbacks=callbacks,
        )
        trainer.remove_callback(PrinterCallback)  # we log one line per trial instead of raw dicts
        trainer.train()
        train_loss = [float(log["loss"]) for log in trainer.state.log_history if "loss" in log]
    finally:
        shutil.rmtree(output_dir, ignore_errors=True)
    if guard.bad_loss is not None:
        raise TrialFailedError(f"recovery diverged: training loss became {guard.bad_loss}")
    return trained, train_loss


def _evaluate(model: nn.Module, context: TrialContext) -> float:
    return evaluate_model(model, context.eval_set(), context.metric)


def is_out_of_memory(exc: BaseException) -> bool:
    """Whether ``exc`` is an allocation failure: ``MemoryError``, CUDA's ``torch.OutOfMemoryError``, or the
    ``RuntimeError`` torch's CPU allocator raises ("can't allocate memory")."""
    if isinstance(exc, (MemoryError, torch.OutOfMemoryError)):
        return True
    text = str(exc).lower()
    return isinstance(exc, RuntimeError) and ("can't allocate memory" in text or "out of memory" in text)


def run_trial(
    plan: TrialPlan,
    context: TrialContext,
    export_dir: str | os.PathLike[str] | None = None,
    *,
    monitor: TrialMonitor | None = None,
) -> TrialResult:
    """Run ``plan`` on a fresh copy of the base model and measure the shipped result.

    With ``export_dir`` the shipped checkpoint is written there (``export_model``) and its bytes on
    disk are checked against the size; under data parallel (``torchrun``) only the main process writes
    it (every rank holds the same model). ``monitor`` sees the size and the learning curve and may stop
    the trial (``optuna.TrialPruned``). Raises ``TrialFailedError`` when recovery diverges, when a
    compression method raises, or when the trial runs out of memory (the study records it and goes on).
    Runs with ``resolve_threads(context.threads)`` CPU threads; each phase is a ``torch.profiler`` range
    (``poft.compress``, ``poft.eval_compressed``, ``poft.recover``, ...) for profiling.
    """
    with torch_threads(resolve_threads(context.threads)):
        try:
            return _run_trial(plan, context, export_dir, monitor)
        except Exception as exc:
            if isinstance(exc, PoftError) or not is_out_of_memory(exc):
                raise
            if torch.cuda.is_available():
                torch.cuda.empty_cache()  # what this trial held is garbage now; give it back for the next one
            raise TrialFailedError(f"out of memory: {type(exc).__name__}: {exc}") from exc


def _run_trial(
    plan: TrialPlan, context: TrialContext, export_dir: str | os.PathLike[str] | None, monitor: TrialMonitor | None
) -> TrialResult:
    timings: dict[str, float] = {}
    set_seed(plan.seed)
    start = time.perf_counter()
    with record_function("poft.compress"):
        model = copy.deepcopy(context.base_model)
        model.train()
        if plan.compression:
            calibration = None
            if any(config.needs_calibration for config in plan.compression):
                calibration = context.calibration()
            try:
                compress_(model, plan.compression, calibration=calibration)
            except PoftError:
                raise
            except Exception as exc:  # a method's own failure ends this trial, not the study
                if is_out_of_memory(exc):
                    raise
                raise TrialFailedError(f"compression failed: {type(exc).__name__}: {exc}") from exc
    timings["compress_s"] = time.perf_counter() - start
    if monitor is not None:
        monitor.start(checkpoint_size(model).total)

    def measure(key: str) -> float:
        t = time.perf_counter()
        with record_function(f"poft.{key.removesuffix('_s')}"):
            value = _evaluate(model, context)
        timings[key] = time.perf_counter() - t
        return value

    # The model right after compression depends on the compression configs only (no randomness), so
    # its metric is measured once per distinct compression and reused.
    key = json.dumps([config.to_dict() for config in plan.compression], sort_keys=True, default=str)
    if key in context._compressed_metrics:
        compressed_metric = context._compressed_metrics[key]
        timings["eval_compressed_s"] = 0.0
    else:
        compressed_metric = context._compressed_metrics[key] = measure("eval_compressed_s")
    if monitor is not None:
        monitor.report(0, compressed_metric)
    train_loss: list[float] = []
    t = time.perf_counter()
    unmerged_metric = None
    lora = plan.recovery.steps > 0 and plan.recovery.lora_rank > 0
    if plan.recovery.steps > 0:
        with record_function("poft.recover"):
            model, train_loss = _recover(model, plan, context, monitor)
        if lora and plan.recovery.lora_merge:
            # Measured before merging so the cost of merge + re-compression is visible (with a quantized
            # base, updates smaller than half a grid step are rounded away).
            unmerged_metric = measure("eval_unmerged_s")
            with record_function("poft.merge"):
                model = merge_lora_(model)  # ships merged: update folded in, then masked and re-quantized
        # lora_merge=False: the peft model (compressed base + full-precision adapter) IS the shipped form.
    timings["recover_s"] = time.perf_counter() - t - timings.get("eval_unmerged_s", 0.0)
    with record_function("poft.size"):
        size = checkpoint_size(model)
    if export_dir is not None and context.training_args.process_index == 0:
        t = time.perf_counter()
        with record_function("poft.export"):
            recipe = {"plan": plan.to_dict(), "size_bytes": size.total}
            export_model(model, export_dir, tokenizer=context.tokenizer, recipe=recipe, overwrite=True)
            on_disk = weight_bytes(export_dir)
        if on_disk != size.total:  # the size contract; tests hold it, so this is a bug report, not a state
            raise PoftError(f"exported {on_disk} bytes but the size formula says {size.total}; please report this.")
        timings["export_s"] = time.perf_counter() - t
    strip_(model)  # the shipped form: plain parameters, no masks, latents or hooks
    recovered_metric = measure("eval_recovered_s") if plan.recovery.steps > 0 else compressed_metric
    if lora and not plan.recovery.lora_merge:
        unmerged_metric = recovered_metric  # shipped unmerged: the evaluated model is base + adapter
    timings["total_s"] = time.perf_counter() - start
    if not math.isfinite(recovered_metric):
        raise TrialFailedError(f"the recovered model's {context.metric.name} is {recovered_metric}")
    return TrialResult(
        size_bytes=size.total,
        size_breakdown=size.as_dict(),
        metric_name=context.metric.name,
        greater_is_better=context.metric.greater_is_better,
        dense_metric=context.dense_metric,
        compressed_metric=compressed_metric,
        recovered_metric=recovered_metric,
        recovery_steps=plan.recovery.steps,
        timings=timings,
        train_loss=train_loss,
        unmerged_metric=unmerged_metric,
    )
