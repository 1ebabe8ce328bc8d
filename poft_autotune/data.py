"""Datasets, padding and metrics: turn the user's data and metric into what a trial needs.

Metrics are offline-safe: ``accuracy``, ``f1``, ``matthews_correlation`` and ``perplexity`` are
computed here; any other name or a local module path goes through ``evaluate.load`` (which needs the
Hub for names it has not cached); a callable ``fn(predictions, references) -> float | dict`` works too.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from poft_autotune.errors import InvalidConfigError

CAUSAL_LM = "causal-lm"
CLASSIFICATION = "classification"


def detect_task(model: nn.Module) -> str:
    """``causal-lm`` for models with a causal LM head, ``classification`` for sequence classifiers."""
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
        MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES,
    )

    name = type(model).__name__
    # The class or a base class (models loaded with trust_remote_code subclass or mimic the built-ins).
    for cls in type(model).__mro__:
        if cls.__name__ in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values() or cls.__name__.endswith("ForCausalLM"):
            return CAUSAL_LM
        if cls.__name__ in MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES.values() or cls.__name__.endswith(
            "ForSequenceClassification"
        ):
            return CLASSIFICATION
    raise InvalidConfigError(
        f"Model class {name} is neither a causal LM nor a sequence classifier; poft_autotune supports "
        "AutoModelForCausalLM and AutoModelForSequenceClassification models."
    )


@dataclasses.dataclass(frozen=True)
class Metric:
    """A resolved metric: its name, its direction, and how to compute it from predictions."""

    name: str
    greater_is_better: bool
    compute: Callable[[np.ndarray, np.ndarray], float] | None = None  # None: perplexity from the loss

    @property
    def is_perplexity(self) -> bool:
        return self.compute is None


def _accuracy(pred: np.ndarray, ref: np.ndarray) -> float:
    return float((pred == ref).mean())


def _f1(pred: np.ndarray, ref: np.ndarray) -> float:
    classes = np.union1d(pred, ref)
    scores = []
    for c in classes if len(classes) > 2 else classes[-1:]:
        tp = np.sum((pred == c) & (ref == c))
        fp = np.sum((pred == c) & (ref != c))
        fn = np.sum((pred != c) & (ref == c))
        scores.append(0.0 if tp == 0 else 2 * tp / (2 * tp + fp + fn))
    return float(np.mean(scores))


def _matthews(pred: np.ndarray, ref: np.ndarray) -> float:
    classes = np.union1d(pred, ref)
    conf = np.array([[np.sum((ref == a) & (pred == b)) for b in classes] for a in classes], dtype=np.float64)
    t, p, c, s = conf.sum(1), conf.sum(0), np.trace(conf), conf.sum()
    denom = math.sqrt(max(s**2 - p @ p, 0.0) * max(s**2 - t @ t, 0.0))
    return float((c * s - t @ p) / denom) if denom else 0.0


_BUILTIN: dict[str, Callable[[np.ndarray, np.ndarray], float]] = {
    "accuracy": _accuracy,
    "f1": _f1,
    "matthews_correlation": _matthews,
}


def _from_evaluate(name: str) -> Callable[[np.ndarray, np.ndarray], float]:
    try:
        import evaluate

        module = evaluate.load(name)
    except Exception as exc:  # evaluate raises many types (FileNotFoundError, ConnectionError, ...)
        raise InvalidConfigError(
            f"Metric {name!r} is not built in ({sorted([*_BUILTIN, 'perplexity'])}) and `evaluate.load` "
            f"could not load it ({type(exc).__name__}: {exc}). Pass a built-in name, a local evaluate module "
            "path, or a callable fn(predictions, references) -> float."
        ) from exc

    def compute(pred: np.ndarray, ref: np.ndarray) -> float:
        return _scalar(module.compute(predictions=pred, references=ref), name)

    return compute


def _scalar(value: Any, name: str) -> float:
    if isinstance(value, Mapping):
        if name in value:
            value = value[name]
        elif len(value) == 1:
            value = next(iter(value.values()))
        else:
            raise InvalidConfigError(
                f"Metric {name!r} returned several values {sorted(value)}; return one number or a dict with key {name!r}."
            )
    try:
        out = float(value)
    except (TypeError, ValueError):
        raise InvalidConfigError(f"Metric {name!r} must return a number, got {value!r}.") from None
    if not math.isfinite(out):
        raise InvalidConfigError(f"Metric {name!r} returned a non-finite value {out}.")
    return out


def resolve_metric(
    metric: str | Callable[..., Any] | Metric | None, task: str, greater_is_better: bool | None = None
) -> Metric:
    """Resolve a metric name, module path or callable. ``None`` picks perplexity or accuracy by task."""
    if isinstance(metric, Metric):
        return metric
    if metric is None:
        metric = "perplexity" if task == CAUSAL_LM else "accuracy"
    if callable(metric):
        name = getattr(metric, "__name__", "metric")
        fn = metric
        return Metric(
            name, True if greater_is_better is None else greater_is_better, lambda p, r: _scalar(fn(p, r), name)
        )
    if not isinstance(metric, str) or not metric:
        raise InvalidConfigError(f"`metric` must be a name, a module path or a callable, got {metric!r}.")
    if metric == "perplexity":
        if task != CAUSAL_LM:
            raise InvalidConfigError("Metric 'perplexity' needs a causal LM; use e.g. 'accuracy' for classifiers.")
        return Metric("perplexity", False if greater_is_better is None else greater_is_better, None)
    compute = _BUILTIN.get(metric) or _from_evaluate(metric)
    return Metric(
        metric.rsplit("/", 1)[-1].removesuffix(".py"), True if greater_is_better is None else greater_is_better, compute
    )


class PadCollator:
    """Dynamic padding to the longest row of the batch; ``labels`` of causal LMs padded with -100.

    Works without a tokenizer (tests, pre-tokenized data): only the pad id is needed.
    """

    def __init__(self, pad_token_id: int, task: str) -> None:
        self.pad_token_id = pad_token_id
        self.task = task

    def __call__(self, features: Sequence[Mapping[str, Any]]) -> dict[str, torch.Tensor]:
        ids = [torch.as_tensor(f["input_ids"], dtype=torch.long) for f in features]
        length = max(len(x) for x in ids)
        batch = {
            "input_ids": torch.full((len(ids), length), self.pad_token_id, dtype=torch.long),
            "attention_mask": torch.zeros((len(ids), length), dtype=torch.long),
        }
        for i, (f, x) in enumerate(zip(features, ids, strict=True)):
            batch["input_ids"][i, : len(x)] = x
            if "attention_mask" in f:
                batch["attention_mask"][i, : len(x)] = torch.as_tensor(f["attention_mask"], dtype=torch.long)
            else:
                batch["attention_mask"][i, : len(x)] = 1
        if self.task == CAUSAL_LM:
            labels = batch["input_ids"].clone()
            labels[batch["attention_mask"] == 0] = -100
            batch["labels"] = labels
        elif "labels" in features[0]:
            batch["labels"] = torch.tensor([int(f["labels"]) for f in features], dtype=torch.long)
        return batch


def prepare_dataset(
    dataset: Any,
    task: str,
    *,
    tokenizer: Any = None,
    text_column: str = "text",
    label_column: str = "label",
    max_length: int = 128,
    num_labels: int | None = None,
    split: str = "dataset",
) -> Any:
    """A ``datasets.Dataset`` with ``input_ids`` (and ``attention_mask``, ``labels`` for classifiers).

    Already-tokenized data passes through; raw text is tokenized with ``tokenizer`` (truncated to
    ``max_length``). Checks the columns and, for classifiers, that labels fit the head.
    """
    import datasets

    if not isinstance(dataset, datasets.Dataset):
        raise InvalidConfigError(f"`{split}` must be a datasets.Dataset, got {type(dataset).__name__}.")
    if len(dataset) == 0:
        raise InvalidConfigError(f"`{split}` is empty; it needs at least one row.")
    columns = set(dataset.column_names)
    if "input_ids" not in columns:
        if text_column not in columns:
            raise InvalidConfigError(
                f"`{split}` has neither 'input_ids' nor the text column {text_column!r} (columns: {sorted(columns)}). "
                "Pass text_column=... or a tokenized dataset."
            )
        if tokenizer is None:
            raise InvalidConfigError(
                f"`{split}` holds raw text ({text_column!r}) but no tokenizer is available; pass tokenizer=... "
                "or give the model as a Hub id / local path so its tokenizer can be loaded."
            )

        def tokenize(batch: dict[str, list[Any]]) -> Any:
            return tokenizer(batch[text_column], truncation=True, max_length=max_length)

        dataset = dataset.map(tokenize, batched=True, desc=f"tokenizing {split}")
    if task == CLASSIFICATION:
        label = "labels" if "labels" in dataset.column_names else label_column
        if label not in dataset.column_names:
            raise InvalidConfigError(
                f"`{split}` has no label column {label_column!r} (columns: {sorted(dataset.column_names)}). "
                "Pass label_column=..."
            )
        if label != "labels":
            dataset = dataset.rename_column(label, "labels")
        values = np.asarray(dataset["labels"])
        if not np.issubdtype(values.dtype, np.integer):
            raise InvalidConfigError(
                f"`{split}` labels must be integer class ids, got values like {values[:3].tolist()!r} "
                f"(dtype {values.dtype}). Map them to 0..k-1 first, e.g. with dataset.class_encode_column."
            )
        if num_labels is not None and (values.min() < 0 or values.max() >= num_labels):
            raise InvalidConfigError(
                f"`{split}` labels must be class ids in [0, {num_labels - 1}] for this model's head, got values in "
                f"[{values.min()}, {values.max()}]. Load the model with num_labels={int(values.max()) + 1}."
            )
    keep = [c for c in ("input_ids", "attention_mask", "labels") if c in dataset.column_names]
    if task == CAUSAL_LM:
        keep = [c for c in keep if c != "labels"]  # the collator derives labels from input_ids
    return dataset.select_columns(keep)


def rows_of(dataset: Any, index: slice | list[int]) -> list[dict[str, Any]]:
    """Rows ``dataset[index]`` as a list of dicts, read in one columnar access (not one per row)."""
    columns = dataset[index]
    return [dict(zip(columns, values, strict=True)) for values in zip(*columns.values(), strict=True)]


@dataclasses.dataclass
class EvalBatches:
    """An evaluation set cut once into padded model-input batches, ready to run again and again.

    Rows are grouped by length (longest first) so each batch pads to a similar length: on the MiniLM
    demo's movie snippets (mean 26 tokens, max 64) that halves the tokens a batch of 64 computes. The
    metric still sees predictions in dataset order (``order`` maps batch rows back), so order-sensitive
    metrics are unaffected. Build with :func:`eval_batches`.
    """

    batches: list[dict[str, torch.Tensor]]
    order: np.ndarray  # dataset index of each row, in batch order
    task: str

    def __len__(self) -> int:
        return len(self.order)


def eval_batches(
    dataset: Any, collator: PadCollator, batch_size: int = 32, *, group_by_length: bool = True
) -> EvalBatches:
    """``dataset`` as padded batches of ``batch_size`` rows for :func:`evaluate_model`, built once.

    ``group_by_length`` sorts rows by length first (least padding); ``False`` keeps dataset order. Example::

        batches = eval_batches(eval_ds, PadCollator(0, "classification"), 64)
        accuracy = evaluate_model(model, batches, metric)
    """
    if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size <= 0:
        raise InvalidConfigError(f"`eval_batch_size` must be a positive integer, got {batch_size!r}.")
    n = len(dataset)
    if group_by_length:
        lengths = np.fromiter((len(ids) for ids in dataset["input_ids"]), dtype=np.int64, count=n)
        order = np.argsort(-lengths, kind="stable")  # longest first: a batch that does not fit fails at once
    else:
        order = np.arange(n)
    batches = []
    for start in range(0, n, batch_size):
        rows = order[start : start + batch_size].tolist()
        batches.append(collator(rows_of(dataset, rows)))
    return EvalBatches(batches, order, collator.task)


@torch.no_grad()
def evaluate_model(
    model: nn.Module,
    dataset: Any,
    metric: Metric,
    collator: PadCollator | None = None,
    batch_size: int = 32,
) -> float:
    """The metric of ``model`` on ``dataset`` (a dataset, or :class:`EvalBatches` built once and reused).

    A dataset is batched with dynamic padding, rows grouped by length (:func:`eval_batches`); the
    metric is the same as in dataset order: identical predictions for classifiers (each row's logits
    do not depend on its batch mates beyond float rounding of the padded length), perplexity equal to
    ~1e-6 relative (sums are taken in another order).
    """
    if isinstance(dataset, EvalBatches):
        data = dataset
    else:
        if collator is None:
            raise InvalidConfigError("evaluate_model needs a `collator` to batch a dataset (or pass EvalBatches).")
        data = eval_batches(dataset, collator, batch_size)
    causal = data.task == CAUSAL_LM
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    nll, count = 0.0, 0
    preds: list[np.ndarray] = []  # classifiers: one label per row; causal LM: one array of tokens per row
    refs: list[np.ndarray] = []
    try:
        for batch in data.batches:
            inputs = {k: v.to(device) for k, v in batch.items() if k != "labels"}
            labels = batch["labels"].to(device)
            logits = model(**inputs).logits.float()
            if causal:
                logits, labels = logits[:, :-1], labels[:, 1:]
                valid = labels != -100
                if metric.is_perplexity:
                    losses = torch.nn.functional.cross_entropy(logits[valid], labels[valid], reduction="sum")
                    nll += float(losses)
                    count += int(valid.sum())
                else:
                    tokens, targets = logits.argmax(-1).cpu().numpy(), labels.cpu().numpy()
                    keep = valid.cpu().numpy()
                    preds.extend(row[k] for row, k in zip(tokens, keep, strict=True))
                    refs.extend(row[k] for row, k in zip(targets, keep, strict=True))
            else:
                preds.extend(logits.argmax(-1).cpu().numpy())
                refs.extend(labels.cpu().numpy())
    finally:
        model.train(was_training)
    if metric.is_perplexity:
        mean_nll = nll / max(count, 1)
        return math.exp(mean_nll) if mean_nll < 700 else math.inf  # exp overflows a float past ~709
    assert metric.compute is not None
    # Back to dataset order: metrics that depend on it (or on token order) see what an in-order pass gives.
    position = np.empty_like(data.order)
    position[data.order] = np.arange(len(data.order))
    if causal:
        return metric.compute(np.concatenate([preds[i] for i in position]), np.concatenate([refs[i] for i in position]))
    return metric.compute(np.asarray(preds)[position], np.asarray(refs)[position])
