"""Speed-ups of issue #7 keep results: length-grouped evaluation, teacher-logit cache, per-trial caches, threads."""

import datasets
import numpy as np
import pytest
import torch

from poft_autotune import PruneConfig, QuantizeConfig, RecoveryConfig, TrialPlan, run_trial
from poft_autotune.data import (
    CAUSAL_LM,
    CLASSIFICATION,
    PadCollator,
    eval_batches,
    evaluate_model,
    resolve_metric,
)
from poft_autotune.errors import InvalidConfigError
from poft_autotune.recovery import RecoveryTrainer, TeacherCache
from poft_autotune.search.objective import TrialContext
from poft_autotune.testing import classification_dataset, lm_dataset, tiny_bert, tiny_llama, tiny_training_args
from poft_autotune.threads import THREADS_ENV, available_cores, resolve_threads, torch_threads


def _ragged(dataset, seed=0, low=4):
    """Rows cut to random lengths, so batches need padding and length grouping changes them."""
    rng = np.random.default_rng(seed)
    columns = {c: dataset[c] for c in dataset.column_names}
    cut = [int(rng.integers(low, len(ids) + 1)) for ids in columns["input_ids"]]
    columns["input_ids"] = [ids[:n] for ids, n in zip(columns["input_ids"], cut, strict=True)]
    return datasets.Dataset.from_dict(columns)


def test_grouped_evaluation_equals_dataset_order():
    data = _ragged(classification_dataset(40, length=16).rename_column("label", "labels"))
    collator = PadCollator(0, CLASSIFICATION)
    ordered = eval_batches(data, collator, 8, group_by_length=False)
    grouped = eval_batches(data, collator, 8)
    assert sum(b["input_ids"].numel() for b in grouped.batches) < sum(b["input_ids"].numel() for b in ordered.batches)
    model = tiny_bert()
    seen = []

    def first_ten(pred, ref):  # order-sensitive on purpose: it must see dataset order
        seen.append(ref.copy())
        return float((pred[:10] == ref[:10]).mean())

    for metric in (resolve_metric("accuracy", CLASSIFICATION), resolve_metric(first_ten, CLASSIFICATION)):
        assert evaluate_model(model, grouped, metric) == evaluate_model(model, ordered, metric)
    assert np.array_equal(seen[0], np.asarray(data["labels"]))

    lm = _ragged(lm_dataset(24, length=20))
    llama, lm_collator = tiny_llama(), PadCollator(0, CAUSAL_LM)
    ppl = resolve_metric("perplexity", CAUSAL_LM)
    assert evaluate_model(llama, lm, ppl, lm_collator, 5) == pytest.approx(
        evaluate_model(llama, eval_batches(lm, lm_collator, 5, group_by_length=False), ppl), rel=1e-5
    )
    token_accuracy = resolve_metric("accuracy", CAUSAL_LM)
    assert evaluate_model(llama, lm, token_accuracy, lm_collator, 5) == evaluate_model(
        llama, eval_batches(lm, lm_collator, 5, group_by_length=False), token_accuracy
    )
    with pytest.raises(InvalidConfigError, match="eval_batch_size"):
        eval_batches(lm, lm_collator, 0)


@pytest.mark.parametrize("task", [CLASSIFICATION, CAUSAL_LM])
def test_teacher_cache_serves_repeated_rows_without_a_forward(task):
    if task == CLASSIFICATION:
        teacher, data = tiny_bert().eval(), _ragged(classification_dataset(12, length=10))
    else:
        teacher, data = tiny_llama().eval(), _ragged(lm_dataset(12, length=10))
    collator = PadCollator(0, task)
    rows = [{"input_ids": ids} for ids in data["input_ids"]]
    batches = [collator(rows[:6]), collator(rows[6:])]
    reshuffled = collator(rows[3:9])  # the same rows in other batches, padded to another length
    calls = []
    teacher.register_forward_hook(lambda *args: calls.append(1))
    cache = TeacherCache()
    inputs = [{k: v for k, v in b.items() if k != "labels"} for b in [*batches, reshuffled]]
    with torch.no_grad():
        for batch in inputs[:2]:
            cache.logits(teacher, batch)
        assert len(calls) == 2 and len(cache) == 12 and cache.misses == 12
        cached = cache.logits(teacher, inputs[2])
        assert len(calls) == 2 and cache.hits == 6
        fresh = teacher(**inputs[2]).logits
    keep = inputs[2]["attention_mask"].bool()
    if task == CAUSAL_LM:
        torch.testing.assert_close(cached[keep], fresh[keep], rtol=1e-5, atol=1e-5)
        assert torch.all(cached[~keep] == 0)
    else:
        torch.testing.assert_close(cached, fresh, rtol=1e-5, atol=1e-5)
    empty = TeacherCache(max_bytes=0)
    with torch.no_grad():
        empty.logits(teacher, inputs[0])
    assert len(empty) == 0 and empty.nbytes == 0
    with pytest.raises(InvalidConfigError, match="max_bytes"):
        TeacherCache(max_bytes=-1)


def test_distillation_with_teacher_cache_trains_like_without(tmp_path):
    data = classification_dataset(32).rename_column("label", "labels")
    losses = {}
    for cached in (False, True):
        torch.manual_seed(0)
        student, teacher = tiny_bert(seed=1), tiny_bert(seed=2)
        cache = TeacherCache() if cached else None
        args = tiny_training_args(str(tmp_path / str(cached)), max_steps=8, logging_strategy="steps", logging_steps=1)
        trainer = RecoveryTrainer(
            model=student,
            args=args,
            train_dataset=data,
            data_collator=PadCollator(0, CLASSIFICATION),
            teacher=teacher,
            distill_weight=0.5,
            temperature=2.0,
            teacher_cache=cache,
        )
        trainer.train()
        losses[cached] = [log["loss"] for log in trainer.state.log_history if "loss" in log]
        if cache is not None:
            assert cache.hits > 0  # 8 steps of 8 rows over 32 rows: later epochs hit
    np.testing.assert_allclose(losses[True], losses[False], rtol=1e-5)


def _context(tmp_path, **overrides):
    model = tiny_llama()
    data = lm_dataset(32, length=12)
    metric = resolve_metric("perplexity", CAUSAL_LM)
    collator = PadCollator(0, CAUSAL_LM)
    dense = evaluate_model(model, data, metric, collator)
    args = tiny_training_args(str(tmp_path))
    return TrialContext(model, data, data, metric, collator, args, dense, 16, **overrides)


def test_repeated_compression_reuses_its_metric_and_threads_apply(tmp_path):
    seen_threads = []

    from transformers import TrainerCallback

    class Threads(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            seen_threads.append(torch.get_num_threads())

    context = _context(tmp_path, threads=1, callbacks=(Threads(),))
    compression = (PruneConfig(sparsity=0.5), QuantizeConfig(bits=4, group_size=None))
    before = torch.get_num_threads()
    first = run_trial(TrialPlan(compression, RecoveryConfig(steps=2, learning_rate=1e-3)), context)
    second = run_trial(TrialPlan(compression, RecoveryConfig(steps=3, learning_rate=1e-4)), context)
    assert torch.get_num_threads() == before and set(seen_threads) == {1}
    assert second.compressed_metric == first.compressed_metric
    assert second.timings["eval_compressed_s"] == 0.0 < first.timings["eval_compressed_s"]
    # A fresh context measures the same number itself.
    fresh = run_trial(TrialPlan(compression, RecoveryConfig(steps=1)), _context(tmp_path))
    assert fresh.compressed_metric == pytest.approx(first.compressed_metric, rel=1e-6)


def test_resolve_threads(monkeypatch):
    monkeypatch.delenv(THREADS_ENV, raising=False)
    cores = available_cores()
    assert resolve_threads() == cores and resolve_threads(3) == 3
    assert resolve_threads(workers=cores + 1) == 1 and resolve_threads(workers=2) == max(1, cores // 2)
    monkeypatch.setenv(THREADS_ENV, "1")
    assert resolve_threads() == 1 and resolve_threads(2) == 2
    monkeypatch.setenv(THREADS_ENV, "many")
    with pytest.raises(InvalidConfigError, match=THREADS_ENV):
        resolve_threads()
    for bad in (0, -1, 1.5, True):
        with pytest.raises(InvalidConfigError, match="threads"):
            resolve_threads(bad)
    before = torch.get_num_threads()
    with torch_threads(1):
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == before
