"""Trial throughput, measured side by side in one run (issue #7). Run under the shared lock:

    flock /tmp/poft-heavy.lock python studies/bench_throughput.py             # both models, all parts (~10 min)
    python studies/bench_throughput.py --models llama --parts steps           # one piece, merged into the JSON
    python studies/bench_throughput.py --report                               # rewrite the .md from the JSON

Results: ``studies/bench_throughput.json`` (raw) and ``studies/bench_throughput.md`` (tables).

Setups. MiniLM: the demo's base (all-MiniLM-L6-v2 + 2-label head fine-tuned 150 steps on movie
snippets), recovery on 2,000 snippets (batch 16, <= 64 tokens), accuracy on 500 held-out snippets
(eval batch 64). Llama: a 5.3M-parameter LlamaForCausalLM from a config, rows of 32-128 tokens
(batch 8), perplexity on 128 rows (eval batch 32). Compression: 50 % magnitude pruning + int4 g32.

Parts (each measured in interleaved rounds, A B C A B C ..., medians):

* ``steps``: one optimizer step (``on_step_begin`` -> ``on_step_end``: data, forward, backward,
  clipping, optimizer, callbacks) of a plain ``transformers.Trainer`` on the dense model vs our
  ``RecoveryTrainer`` + ``CompressionCallback`` after int4 (``quant``), after prune + int4
  (``recovery``), plus distillation (``distill``: a teacher forward every step; ``distill_cached``: the
  worker's ``TeacherCache`` already holds the rows), and one no-grad teacher forward on its own; the
  plain step with 1 thread vs the threads a trial gets; a torch.profiler op table of plain vs recovery.
* ``trials``: our ``run_trial`` vs the same work written with ``Trainer.hyperparameter_search`` and
  ``model_init`` (load the base with ``from_pretrained``, ``compress_``, train with the compression
  callback, evaluate before and after training: ``eval_on_start`` + an eval at the last step). Setup =
  trial wall time - sum of step times. Plans differ per round in sparsity, so no cache is hit by
  accident; one extra trial repeats a compression to show the cached after-compression metric.
* ``profile``: one of our trials under torch.profiler, each phase a ``poft.*`` range and each training
  step a ``poft.step`` range; printed: phase wall times and the top ops outside training steps.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import math
import os
import platform
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.profiler import ProfilerActivity, profile, record_function
from transformers import Trainer, TrainerCallback, TrainingArguments

from poft_autotune import PruneConfig, QuantizeConfig, compress_
from poft_autotune.compression.quantize import QuantGrid
from poft_autotune.data import CAUSAL_LM, CLASSIFICATION, Metric, PadCollator, evaluate_model, resolve_metric
from poft_autotune.recovery import CompressionCallback, RecoveryTrainer, TeacherCache
from poft_autotune.search.objective import TrialContext, run_trial
from poft_autotune.search.space import RecoveryConfig, TrialPlan
from poft_autotune.threads import resolve_threads, torch_threads

HERE = Path(__file__).parent
RESULTS = HERE / "bench_throughput.json"


class StepTimer(TrainerCallback):
    """Wall time of each optimizer step, and the torch threads it ran with."""

    def __init__(self, annotate: bool = False, clock: Any = time.perf_counter) -> None:
        self.clock = clock  # time.thread_time: CPU time of the main thread (robust to other processes)
        self.times: list[float] = []
        self.threads: set[int] = set()
        self.evaluations = 0  # Trainer.evaluate calls (the HF side must evaluate twice per trial, as we do)
        self._start = 0.0
        self._annotate = annotate
        self._range: Any = None

    def on_step_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self._annotate:
            self._range = record_function("poft.step")
            self._range.__enter__()
        self._start = self.clock()

    def on_evaluate(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.evaluations += 1

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.times.append(self.clock() - self._start)
        self.threads.add(torch.get_num_threads())
        if self._range is not None:
            self._range.__exit__(None, None, None)
            self._range = None


@dataclasses.dataclass
class Setup:
    name: str
    dense: torch.nn.Module
    model_dir: str  # what a user's model_init would load from
    train: Any
    evaluation: Any
    metric: Metric
    collator: PadCollator
    batch: int
    eval_batch: int
    steps: int  # recovery steps of a typical trial

    @property
    def task(self) -> str:
        return self.collator.task


def minilm_setup(scratch: Path) -> Setup:
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from poft_autotune.data import prepare_dataset
    from poft_autotune.demo import MAX_LENGTH, finetuned_minilm, minilm_splits

    base_train, train, evaluation = minilm_splits(2000, 500)
    path = finetuned_minilm(base_train, 150, show_progress=False)
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForSequenceClassification.from_pretrained(path, use_safetensors=True)

    def prep(ds: Any) -> Any:
        return prepare_dataset(ds, CLASSIFICATION, tokenizer=tokenizer, max_length=MAX_LENGTH, num_labels=2)

    return Setup(
        "minilm",
        model,
        str(path),
        prep(train),
        prep(evaluation),
        resolve_metric("accuracy", CLASSIFICATION),
        PadCollator(tokenizer.pad_token_id, CLASSIFICATION),
        batch=16,
        eval_batch=64,
        steps=30,
    )


def llama_setup(scratch: Path) -> Setup:
    import datasets

    from poft_autotune.testing import lm_dataset, tiny_llama

    model = tiny_llama(
        hidden_size=256,
        intermediate_size=704,
        num_hidden_layers=4,
        num_attention_heads=8,
        num_key_value_heads=8,
        vocab_size=4096,
        max_position_embeddings=256,
    )
    path = scratch / "llama"
    model.save_pretrained(path)
    rng = np.random.default_rng(0)

    def rows(n: int, seed: int) -> Any:
        ids = lm_dataset(n, length=128, vocab_size=4096, seed=seed)["input_ids"]
        return datasets.Dataset.from_dict({"input_ids": [r[: rng.integers(32, 129)] for r in ids]})

    return Setup(
        "llama",
        model,
        str(path),
        rows(512, 0),
        rows(128, 1),
        resolve_metric("perplexity", CAUSAL_LM),
        PadCollator(0, CAUSAL_LM),
        batch=8,
        eval_batch=32,
        steps=50,
    )


def tiny_setup(scratch: Path) -> Setup:
    """A seconds-long smoke setup for checking the script itself (``--models tiny``)."""
    from poft_autotune.testing import classification_dataset, tiny_bert

    model = tiny_bert(hidden_size=64, intermediate_size=128)
    path = scratch / "tiny"
    model.save_pretrained(path)
    return Setup(
        "tiny",
        model,
        str(path),
        classification_dataset(128, length=24).rename_column("label", "labels"),
        classification_dataset(64, length=24, seed=1).rename_column("label", "labels"),
        resolve_metric("accuracy", CLASSIFICATION),
        PadCollator(0, CLASSIFICATION),
        batch=8,
        eval_batch=16,
        steps=6,
    )


SETUPS = {"minilm": minilm_setup, "llama": llama_setup, "tiny": tiny_setup}


def compression(sparsity: float = 0.5) -> list[Any]:
    return [PruneConfig(sparsity=sparsity), QuantizeConfig(bits=4, group_size=32)]


def training_args(setup: Setup, steps: int, output_dir: str, **overrides: Any) -> TrainingArguments:
    kwargs: dict[str, Any] = dict(
        output_dir=output_dir,
        max_steps=steps,
        per_device_train_batch_size=setup.batch,
        per_device_eval_batch_size=setup.eval_batch,
        learning_rate=2e-5,
        lr_scheduler_type="constant",
        weight_decay=0.0,
        report_to="none",
        disable_tqdm=True,
        save_strategy="no",
        logging_strategy="no",
        use_cpu=True,
    )
    kwargs.update(overrides)
    return TrainingArguments(**kwargs)


def median_ms(values: list[float]) -> float:
    return 1e3 * statistics.median(values)


# --------------------------------------------------------------------------------------------- steps
def bench_steps(setup: Setup, rounds: int, steps: int, scratch: Path, cpu_time: bool = False) -> dict[str, Any]:
    """Median step time per variant. ``cpu_time``: one thread, CPU time of the main thread (which runs
    forward, backward and optimizer when torch has one thread): the work a step does, unmoved by other
    processes sharing the cores, where wall times on a loaded machine are not."""
    clock = time.thread_time if cpu_time else time.perf_counter
    args = training_args(setup, steps, str(scratch / "steps"), dataloader_drop_last=True, seed=0)
    dense = setup.dense
    teacher = copy.deepcopy(dense).eval()
    models = {"plain": dense}
    for key, configs in (("quant", [QuantizeConfig(bits=4, group_size=32)]), ("recovery", compression())):
        models[key] = copy.deepcopy(dense)
        compress_(models[key], configs)
    models["distill"] = copy.deepcopy(models["recovery"])
    models["distill_cached"] = copy.deepcopy(models["recovery"])
    cache = TeacherCache()
    timers = {key: StepTimer(clock=clock) for key in models}
    trainers: dict[str, Trainer] = {}
    for key, model in models.items():
        common = dict(model=model, args=args, train_dataset=setup.train, data_collator=setup.collator)
        if key == "plain":
            trainers[key] = Trainer(**common, callbacks=[timers[key]])  # type: ignore[arg-type]
            continue
        distill: dict[str, Any] = {}
        if key.startswith("distill"):
            distill = dict(teacher=teacher, distill_weight=0.5, temperature=2.0)
            if key == "distill_cached":
                distill["teacher_cache"] = cache
        trainers[key] = RecoveryTrainer(
            **common,  # type: ignore[arg-type]
            callbacks=[CompressionCallback(model), timers[key]],
            **distill,
        )
    threads = 1 if cpu_time else resolve_threads()
    one_thread = StepTimer()
    single = Trainer(
        model=copy.deepcopy(dense),
        args=args,
        train_dataset=setup.train,
        data_collator=setup.collator,
        callbacks=[one_thread],
    )
    # The Trainer reseeds its sampler from args.seed, so every train() call sees the same batches: one
    # filling pass makes every later distill_cached step a cache hit (as for a worker's later trials).
    trainers["distill_cached"].train()
    timers["distill_cached"].times.clear()
    batch = setup.collator([setup.train[i] for i in range(setup.batch)])
    batch.pop("labels")
    teacher_times: list[float] = []
    with torch_threads(threads):
        for r in range(rounds):
            for key, trainer in trainers.items():
                before = len(timers[key].times)
                trainer.train()
                del timers[key].times[before : before + 2]  # warm-up steps of this round
            with torch.no_grad():
                for i in range(steps):
                    t = clock()
                    teacher(**batch)
                    if i >= 2:
                        teacher_times.append(clock() - t)
            if (
                r < 2 and not cpu_time
            ):  # fewer rounds for the thread-scaling check: it only needs the order of magnitude
                with torch_threads(1):
                    before = len(one_thread.times)
                    single.train()
                    del one_thread.times[before : before + 2]
        ops = [] if cpu_time else profile_steps(trainers["plain"], trainers["recovery"])
    med = {key: median_ms(t.times) for key, t in timers.items()}
    med["teacher_forward"] = median_ms(teacher_times)
    if one_thread.times:
        med["plain_1_thread"] = median_ms(one_thread.times)
    return {
        "median_step_ms": med,
        "timed_steps_per_variant": len(timers["plain"].times),
        "threads": threads,
        "threads_seen_in_steps": sorted(timers["plain"].threads),
        "teacher_cache": {"rows": len(cache), "hits": cache.hits, "misses": cache.misses, "bytes": cache.nbytes},
        "ops_plain_vs_recovery": ops,
    }


def profile_steps(plain: Trainer, recovery: Trainer, top: int = 10) -> list[dict[str, Any]]:
    """Self CPU time per op and step of one train() of each trainer; the ops whose time differs most."""
    per_step: dict[str, dict[str, float]] = {}
    for key, trainer in (("plain", plain), ("recovery", recovery)):
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            trainer.train()
        steps = trainer.args.max_steps
        per_step[key] = {e.key: e.self_cpu_time_total / 1e3 / steps for e in prof.key_averages()}
    names = set(per_step["plain"]) | set(per_step["recovery"])
    rows = [
        {"op": n, "plain_ms": per_step["plain"].get(n, 0.0), "recovery_ms": per_step["recovery"].get(n, 0.0)}
        for n in names
    ]
    for row in rows:
        row["diff_ms"] = row["recovery_ms"] - row["plain_ms"]
    rows.sort(key=lambda r: -abs(r["diff_ms"]))
    total = {k: sum(v.values()) for k, v in per_step.items()}
    return [{"op": "(all ops)", "plain_ms": total["plain"], "recovery_ms": total["recovery"],
             "diff_ms": total["recovery"] - total["plain"]}, *rows[:top]]  # fmt: skip


# -------------------------------------------------------------------------------------------- trials
def context_for(setup: Setup, scratch: Path, timer: StepTimer) -> TrialContext:
    dense_metric = evaluate_model(setup.dense, setup.evaluation, setup.metric, setup.collator, setup.eval_batch)
    args = training_args(setup, setup.steps, str(scratch / "ours"))
    return TrialContext(
        setup.dense,
        setup.train,
        setup.evaluation,
        setup.metric,
        setup.collator,
        args,
        dense_metric,
        setup.eval_batch,
        callbacks=(timer,),
    )


class LazyCompressionCallback(TrainerCallback):
    """What a user of hyperparameter_search writes: the compression callback of the model model_init made."""

    def __init__(self) -> None:
        self.inner: CompressionCallback | None = None

    def on_train_begin(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any) -> None:
        self.inner = CompressionCallback(model)
        self.inner.on_train_begin(args, state, control)

    def on_pre_optimizer_step(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        assert self.inner is not None
        self.inner.on_pre_optimizer_step(args, state, control)

    def on_optimizer_step(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        assert self.inner is not None
        self.inner.on_optimizer_step(args, state, control)


def hf_trainer(setup: Setup, scratch: Path, timer: StepTimer, plan: dict[str, Any]) -> Trainer:
    """``Trainer`` with ``model_init`` doing what a trial does: load, compress; evaluate before and after."""
    auto: Any
    if setup.task == CAUSAL_LM:
        from transformers import AutoModelForCausalLM as auto
    else:
        from transformers import AutoModelForSequenceClassification as auto

    def model_init(trial: Any = None) -> torch.nn.Module:
        model = auto.from_pretrained(setup.model_dir, use_safetensors=True)
        compress_(model, compression(plan["sparsity"]))
        return model

    def accuracy(pred: Any) -> dict[str, float]:
        return {"accuracy": float((np.argmax(pred.predictions, -1) == pred.label_ids).mean())}

    args = training_args(
        setup,
        setup.steps,
        str(scratch / "hf"),
        eval_strategy="steps",
        eval_steps=setup.steps,
        eval_on_start=True,
    )
    return Trainer(
        model_init=model_init,
        args=args,
        train_dataset=setup.train,
        eval_dataset=setup.evaluation,
        data_collator=setup.collator,
        compute_metrics=None if setup.task == CAUSAL_LM else accuracy,
        callbacks=[LazyCompressionCallback(), timer],
    )


def bench_trials(setup: Setup, rounds: int, scratch: Path) -> dict[str, Any]:
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    ours_timer, hf_timer = StepTimer(), StepTimer()
    context = context_for(setup, scratch, ours_timer)
    plan_box = {"sparsity": 0.5}
    hf = hf_trainer(setup, scratch, hf_timer, plan_box)
    objective_name = "eval_accuracy" if setup.task == CLASSIFICATION else "eval_loss"
    ours: list[dict[str, Any]] = []
    theirs: list[dict[str, Any]] = []
    threads = resolve_threads()
    with torch_threads(threads):  # the HF side gets the same threads as our trials
        for r in range(rounds + 1):  # round 0: warm-up (first eval batching, first Trainer), not counted
            sparsity = 0.5 - 0.05 * r
            plan_box["sparsity"] = sparsity
            plan = TrialPlan(tuple(compression(sparsity)), RecoveryConfig(steps=setup.steps, learning_rate=2e-5))
            before = len(ours_timer.times)
            result = run_trial(plan, context)
            step_s = sum(ours_timer.times[before:])
            ours.append({"sparsity": sparsity, "wall_s": result.timings["total_s"], "steps_s": step_s,
                         "timings": result.timings, "compressed": result.compressed_metric,
                         "recovered": result.recovered_metric, "threads": sorted(ours_timer.threads)})  # fmt: skip
            before, evaluations = len(hf_timer.times), hf_timer.evaluations
            t = time.perf_counter()
            best = hf.hyperparameter_search(
                hp_space=lambda trial: {"learning_rate": 2e-5},
                compute_objective=lambda metrics: metrics[objective_name],
                n_trials=1,
                direction="maximize" if setup.task == CLASSIFICATION else "minimize",
                backend="optuna",
            )
            wall = time.perf_counter() - t
            value = float(best.objective)  # type: ignore[union-attr]
            theirs.append({"sparsity": sparsity, "wall_s": wall, "steps_s": sum(hf_timer.times[before:]),
                           "recovered": value if setup.task == CLASSIFICATION else math.exp(value),
                           "evaluations": hf_timer.evaluations - evaluations})  # fmt: skip
        # A plan repeating the last compression with other recovery settings: the after-compression
        # metric comes from the context's cache.
        plan = TrialPlan(tuple(compression(sparsity)), RecoveryConfig(steps=setup.steps, learning_rate=4e-5))
        repeat = run_trial(plan, context)
        export_dir = scratch / "export"
        exported = run_trial(plan, context, export_dir)
    return {
        "threads": threads,
        "ours": ours,
        "hf": theirs,
        "repeat_compression_timings": repeat.timings,
        "export_s": exported.timings.get("export_s"),
    }


# ------------------------------------------------------------------------------------------- profile
def bench_profile(setup: Setup, scratch: Path, top: int = 12) -> dict[str, Any]:
    timer = StepTimer(annotate=True)
    context = context_for(setup, scratch, timer)
    plan = TrialPlan(tuple(compression(0.5)), RecoveryConfig(steps=setup.steps, learning_rate=2e-5))
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        result = run_trial(plan, context)
    events = prof.events()
    phases: dict[str, float] = defaultdict(float)
    outside: dict[tuple[str, str], float] = defaultdict(float)
    for event in events:
        chain = []
        parent = event.cpu_parent
        while parent is not None:
            chain.append(parent.name)
            parent = parent.cpu_parent
        if event.name.startswith("poft."):
            if not any(name.startswith("poft.") for name in chain) or event.name == "poft.step":
                phases[event.name] += event.cpu_time_total / 1e6
            continue
        if "poft.step" in chain:
            continue
        phase = next((name for name in reversed(chain) if name.startswith("poft.")), "(no phase)")
        outside[(phase, event.name)] += event.self_cpu_time_total / 1e6
    ops = sorted(outside.items(), key=lambda kv: -kv[1])[:top]
    by_phase: dict[str, float] = defaultdict(float)
    for (phase, _), value in outside.items():
        by_phase[phase] += value
    return {
        "timings": result.timings,
        "steps": len(timer.times),
        "steps_s": sum(timer.times),
        "phase_wall_s": dict(phases),
        "op_self_s_outside_steps_by_phase": dict(by_phase),
        "top_ops_outside_steps": [{"phase": p, "op": o, "self_s": v} for (p, o), v in ops],
    }


# -------------------------------------------------------------------------------------------- levers
class AminmaxGrid(QuantGrid):
    """The grid's statistics as computed before issue #7 (torch.aminmax), to time against amin + amax."""

    def _scales(self, w: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor | None]:
        lo, hi = torch.aminmax(w, dim=-1, keepdim=True)
        if self.symmetric:
            scale = torch.maximum(-lo, hi) / (2 ** (self.bits - 1) - 1)
        else:
            lo = lo.clamp_max(0)
            scale = (hi.clamp_min(0) - lo) / (2**self.bits - 1)
        scale = scale.clamp_min(1e-12).to(dtype).float()
        zero = None if self.symmetric else torch.clamp(torch.round(-lo / scale), 0, 2**self.bits - 1)
        return scale, zero


def bench_levers(setup: Setup, scratch: Path, repeats: int = 3) -> dict[str, Any]:
    """Before/after of single levers, alternating A B A B: evaluation order, re-quantization, copies."""
    from poft_autotune.compression.base import compressed_layers, get_quant, refresh_
    from poft_autotune.data import eval_batches

    out: dict[str, Any] = {}
    ordered = eval_batches(setup.evaluation, setup.collator, setup.eval_batch, group_by_length=False)
    grouped = eval_batches(setup.evaluation, setup.collator, setup.eval_batch)
    padded = {
        k: sum(int(b["attention_mask"].numel()) for b in v.batches)
        for k, v in (("ordered", ordered), ("grouped", grouped))
    }
    times: dict[str, list[float]] = defaultdict(list)
    metrics = {}
    for _ in range(repeats):
        for key, batches in (("ordered", ordered), ("grouped", grouped)):
            t = time.perf_counter()
            metrics[key] = evaluate_model(setup.dense, batches, setup.metric)
            times[f"eval_{key}"].append(time.perf_counter() - t)
    out["eval"] = {"padded_tokens": padded, "real_tokens": int(sum(len(r) for r in setup.evaluation["input_ids"])),
                   "metric": metrics}  # fmt: skip
    model = copy.deepcopy(setup.dense)
    compress_(model, compression())
    layers = list(compressed_layers(model).values())
    grid = get_quant(layers[0])
    old = AminmaxGrid(grid.bits, grid.group_size, grid.symmetric)
    same = all(torch.equal(old.fake_quantize(layer.poft_latent), layer.weight) for layer in layers)
    for _ in range(repeats):
        for key, g in (("requant_aminmax", old), ("requant_amin_amax", grid)):
            for layer in layers:
                object.__setattr__(layer, "poft_quant", g)
            t = time.perf_counter()
            with torch.no_grad():
                for layer in layers:
                    refresh_(layer)
            times[key].append(time.perf_counter() - t)
        t = time.perf_counter()
        copy.deepcopy(setup.dense)
        times["deepcopy_base"].append(time.perf_counter() - t)
        t = time.perf_counter()
        RecoveryTrainer(model=model, args=training_args(setup, 10, str(scratch / "init")), train_dataset=setup.train,
                        data_collator=setup.collator, callbacks=[CompressionCallback(model)])  # fmt: skip
        times["trainer_init"].append(time.perf_counter() - t)
    out["requant_identical"] = same
    out["weights_requantized"] = sum(layer.weight.numel() for layer in layers)
    out["median_ms"] = {k: median_ms(v) for k, v in times.items()}
    return out


# -------------------------------------------------------------------------------------------- report
def load_results(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text()) if path.exists() else {}


def ratio(a: float, b: float) -> str:
    return f"{a / b:.3f}" if b else "-"


def write_report(results: dict[str, Any]) -> str:
    lines = ["# Trial throughput: a trial should cost its training steps and little else", ""]
    lines += [
        "Generated by `studies/bench_throughput.py` from `bench_throughput.json` (every number below was",
        "measured by the command in each section's header). Machine: 2 CPU cores shared with other agents;",
        "the load average at the start and end of each piece is shown, since it moves wall times.",
        "",
    ]
    models = [m for m in ("minilm", "llama", "tiny") if m in results]
    summary = ["| ratio | target | " + " | ".join(models) + " |", "|---|---|" + "---:|" * len(models)]

    def row(label: str, target: str, fn: Any) -> None:
        cells = []
        for m in models:
            try:
                cells.append(fn(results[m]))
            except (KeyError, ZeroDivisionError, statistics.StatisticsError):
                cells.append("-")
        summary.append(f"| {label} | {target} | " + " | ".join(cells) + " |")

    for part, how in (("steps_cpu", "CPU time, 1 thread"), ("steps", "wall, trial threads")):

        def steps(r: dict[str, Any], part: str = part) -> dict[str, float]:
            return r[part]["median_step_ms"]

        row(f"quant step / plain step ({how})", "<= 1.03", lambda r: ratio(steps(r)["quant"], steps(r)["plain"]))
        row(
            f"prune+quant step / plain step ({how})",
            "<= 1.03",
            lambda r: ratio(steps(r)["recovery"], steps(r)["plain"]),
        )
        row(
            f"distill step / (plain + teacher forward) ({how})",
            "<= 1.0",
            lambda r: ratio(steps(r)["distill"], steps(r)["plain"] + steps(r)["teacher_forward"]),
        )
        row(
            f"distill step, cached teacher / plain ({how})",
            "< distill / plain",
            lambda r: ratio(steps(r)["distill_cached"], steps(r)["plain"]),
        )

    # Trial-level numbers come from the least disturbed counted round (the one with the smallest wall
    # time): on a shared machine other processes only ever add time.
    def best(r: dict[str, Any], who: str) -> dict[str, Any]:
        return min(r["trials"][who][1:], key=lambda t: t["wall_s"])

    def setup_ratio(r: dict[str, Any], who: str) -> str:
        t = best(r, who)
        return f"{(t['wall_s'] - t['steps_s']) / t['wall_s']:.3f}"

    row("setup (all but steps) / trial wall, ours", "<= 0.10", lambda r: setup_ratio(r, "ours"))

    def overhead_ratio(r: dict[str, Any]) -> str:
        t = best(r, "ours")
        evals = t["timings"]["eval_compressed_s"] + t["timings"]["eval_recovered_s"]
        return f"{(t['wall_s'] - t['steps_s'] - evals) / t['wall_s']:.3f}"

    row("setup without the two evaluations / trial wall, ours", "", overhead_ratio)
    row("setup (all but steps) / trial wall, HF hyperparameter_search", "", lambda r: setup_ratio(r, "hf"))
    row(
        "our trial / HF trial (wall, least disturbed round of each)",
        "< 1",
        lambda r: ratio(best(r, "ours")["wall_s"], best(r, "hf")["wall_s"]),
    )
    row(
        "plain step, 1 thread / trial threads (wall)",
        "~threads",
        lambda r: ratio(r["steps"]["median_step_ms"]["plain_1_thread"], r["steps"]["median_step_ms"]["plain"]),
    )
    lines += ["## Summary", "", *summary, ""]
    for m in models:
        r = results[m]
        lines += [f"## {m}", ""]
        if "levers" in r:
            lv = r["levers"]
            ms, ev = lv["median_ms"], lv["eval"]
            lines += [
                f"### Single levers, before / after (medians of alternating repeats; load {lv.get('load', '-')})",
                "",
                f"Command: `{lv.get('command', '-')}`",
                "",
                "| lever | before (ms) | after (ms) | after / before | same result |",
                "|---|---:|---:|---:|---|",
                f"| evaluation: dataset order -> rows grouped by length ({ev['padded_tokens']['ordered']} -> "
                f"{ev['padded_tokens']['grouped']} padded tokens, {ev['real_tokens']} real) | {ms['eval_ordered']:.0f} | "
                f"{ms['eval_grouped']:.0f} | {ratio(ms['eval_grouped'], ms['eval_ordered'])} | "
                f"{ev['metric']['ordered']:.6g} vs {ev['metric']['grouped']:.6g} |",
                f"| re-quantization of {lv['weights_requantized'] / 1e6:.1f}M weights (prune+int4 g32): torch.aminmax "
                f"-> amin + amax | {ms['requant_aminmax']:.1f} | {ms['requant_amin_amax']:.1f} | "
                f"{ratio(ms['requant_amin_amax'], ms['requant_aminmax'])} | bit-identical: {lv['requant_identical']} |",
                "",
                f"Per-trial fixed costs: deepcopy of the base {ms['deepcopy_base']:.0f} ms; RecoveryTrainer construction "
                f"{ms['trainer_init']:.0f} ms.",
                "",
            ]
        for part in ("steps_cpu", "steps"):
            if part not in r:
                continue
            s = r[part]
            clock = "CPU time of the main thread, 1 thread" if part == "steps_cpu" else "wall time"
            lines += [
                f"### Step times, {clock} ({s['timed_steps_per_variant']} timed steps per variant; threads "
                f"{s['threads']}, seen in steps {s['threads_seen_in_steps']}; load {s.get('load', '-')})",
                "",
                f"Command: `{s.get('command', '-')}`",
                "",
                "| variant | median step (ms) | / plain |",
                "|---|---:|---:|",
            ]
            for key, value in s["median_step_ms"].items():
                lines.append(f"| {key} | {value:.1f} | {ratio(value, s['median_step_ms']['plain'])} |")
            c = s["teacher_cache"]
            lines += [
                "",
                f"Teacher cache after the run: {c['rows']} rows, {c['bytes'] / 2**20:.1f} MiB, {c['hits']} row hits, "
                f"{c['misses']} row misses (the misses are the one filling pass).",
                "",
            ]
            if not s["ops_plain_vs_recovery"]:
                continue
            lines += [
                "Profile of one train() per variant (torch.profiler, self CPU ms per step; the ops that differ most):",
                "",
                "| op | plain | prune+quant | difference |",
                "|---|---:|---:|---:|",
            ]
            for op in s["ops_plain_vs_recovery"]:
                lines.append(
                    f"| `{op['op']}` | {op['plain_ms']:.1f} | {op['recovery_ms']:.1f} | {op['diff_ms']:+.1f} |"
                )
            lines.append("")
        if "trials" in r:
            t = r["trials"]
            lines += [
                f"### Trials: ours vs `Trainer.hyperparameter_search` (load {t.get('load', '-')})",
                "",
                f"Command: `{t.get('command', '-')}`",
                "",
                "| round | who | sparsity | wall (s) | steps (s) | setup (s) | setup share | recovered metric |",
                "|---|---|---:|---:|---:|---:|---:|---:|",
            ]
            for i, (a, b) in enumerate(zip(t["ours"], t["hf"], strict=True)):
                tag = f"{i}" + (" (warm-up)" if i == 0 else "")
                for who, x in (("ours", a), ("HF", b)):
                    setup_s = x["wall_s"] - x["steps_s"]
                    lines.append(
                        f"| {tag} | {who} | {x['sparsity']:.2f} | {x['wall_s']:.1f} | {x['steps_s']:.1f} | "
                        f"{setup_s:.1f} | {setup_s / x['wall_s']:.3f} | {x['recovered']:.4g} |"
                    )
            lines += ["", "Our trials' phases (s):", "", "| round | " + " | ".join(t["ours"][0]["timings"]) + " |"]
            lines.append("|---|" + "---:|" * len(t["ours"][0]["timings"]))
            for i, x in enumerate(t["ours"]):
                lines.append(f"| {i} | " + " | ".join(f"{v:.2f}" for v in x["timings"].values()) + " |")
            rep = t["repeat_compression_timings"]
            lines += [
                "",
                f"A trial repeating a compression (other learning rate): eval_compressed_s = "
                f"{rep['eval_compressed_s']:.2f} (cached), total {rep['total_s']:.1f} s. "
                f"Exporting the shipped checkpoint (keep_checkpoints != 'none'): {t['export_s']:.2f} s.",
                "",
            ]
        if "profile" in r:
            p = r["profile"]
            lines += [
                f"### Profile of one of our trials (torch.profiler; load {p.get('load', '-')})",
                "",
                f"Command: `{p.get('command', '-')}`",
                "",
                f"{p['steps']} steps took {p['steps_s']:.1f} s of the trial's {p['timings']['total_s']:.1f} s "
                "(under the profiler, which slows op-heavy code).",
                "",
                "| range | wall (s) | op self time outside steps (s) |",
                "|---|---:|---:|",
            ]
            for name, wall in sorted(p["phase_wall_s"].items(), key=lambda kv: -kv[1]):
                lines.append(f"| {name} | {wall:.2f} | {p['op_self_s_outside_steps_by_phase'].get(name, 0.0):.2f} |")
            lines += ["", "Top ops outside training steps (self CPU time):", "", "| phase | op | s |", "|---|---|---:|"]
            for op in p["top_ops_outside_steps"]:
                lines.append(f"| {op['phase']} | `{op['op']}` | {op['self_s']:.3f} |")
            lines.append("")
    notes = HERE / "bench_throughput_notes.md"
    if notes.exists():
        lines += [notes.read_text().rstrip(), ""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="minilm,llama")
    parser.add_argument("--parts", default="levers,steps,trials,profile")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds of the step benchmark")
    parser.add_argument("--steps", type=int, default=8, help="steps per round of the step benchmark")
    parser.add_argument("--trial-rounds", type=int, default=2, help="trial pairs after the warm-up pair")
    parser.add_argument("--report", action="store_true", help="only rewrite the markdown from the JSON")
    parser.add_argument("--out", type=Path, default=RESULTS, help="JSON results (the .md goes beside it)")
    args = parser.parse_args()
    results_path: Path = args.out
    if not args.report:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        command = "python studies/bench_throughput.py " + " ".join(sys.argv[1:])
        for name in args.models.split(","):
            with tempfile.TemporaryDirectory(prefix="poft-bench-") as tmp:
                setup = SETUPS[name](Path(tmp))
                for part in args.parts.split(","):
                    load = f"{os.getloadavg()[0]:.1f}"
                    start = time.perf_counter()
                    if part == "steps":
                        out = bench_steps(setup, args.rounds, args.steps, Path(tmp))
                    elif part == "steps_cpu":
                        out = bench_steps(setup, args.rounds, args.steps, Path(tmp), cpu_time=True)
                    elif part == "trials":
                        out = bench_trials(setup, args.trial_rounds, Path(tmp))
                    elif part == "profile":
                        out = bench_profile(setup, Path(tmp))
                    elif part == "levers":
                        out = bench_levers(setup, Path(tmp))
                    else:
                        raise SystemExit(f"unknown part {part!r}; use levers, steps, steps_cpu, trials, profile")
                    out["load"] = f"{load} -> {os.getloadavg()[0]:.1f}"
                    out["command"] = command
                    out["seconds"] = time.perf_counter() - start
                    out["torch"] = torch.__version__
                    out["python"] = platform.python_version()
                    results = load_results(results_path)
                    results.setdefault(name, {})[part] = out
                    results_path.write_text(json.dumps(results, indent=1, default=float))
                    print(f"[{name}/{part}] done in {out['seconds']:.0f} s (load {out['load']})", flush=True)
    text = write_report(load_results(results_path))
    results_path.with_suffix(".md").write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
