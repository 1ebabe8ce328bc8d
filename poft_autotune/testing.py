"""Tiny models and synthetic data for tests and examples: built from configs, nothing downloaded.

Also :class:`InvariantChecker`, a Trainer callback that checks the compression invariants during any
recovery run (single process or data parallel) and counts what it checked.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import torch
import torch.distributed as dist
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    LlamaConfig,
    LlamaForCausalLM,
    TrainerCallback,
    TrainerControl,
    TrainerState,
    TrainingArguments,
)

from poft_autotune.compression.base import compressed_layers, get_mask, get_quant, master_weight


def tiny_llama(seed: int = 0, **overrides: Any) -> LlamaForCausalLM:
    """A 2-layer Llama with hidden size 32 (about 60k parameters)."""
    torch.manual_seed(seed)
    config: dict[str, Any] = dict(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        vocab_size=64,
        max_position_embeddings=128,
        pad_token_id=0,
    )
    config.update(overrides)
    return LlamaForCausalLM(LlamaConfig(**config))


def tiny_bert(seed: int = 0, num_labels: int = 2, **overrides: Any) -> BertForSequenceClassification:
    """A 2-layer BERT sequence classifier with hidden size 32."""
    torch.manual_seed(seed)
    config: dict[str, Any] = dict(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        vocab_size=100,
        max_position_embeddings=64,
        num_labels=num_labels,
    )
    config.update(overrides)
    return BertForSequenceClassification(BertConfig(**config))


REVIEW_WORDS = ("good", "great", "fine", "fun", "bad", "awful", "dull", "poor", "the", "film", "was", "very")


def save_tiny_text_classifier(directory: Any, words: tuple[str, ...] = REVIEW_WORDS) -> None:
    """Save a tiny BERT classifier and a word-level tokenizer over ``words`` to ``directory``.

    For tests of the "model path + raw text" route: no download, ``from_pretrained(directory)`` works.
    """
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"[PAD]": 0, "[UNK]": 1, **{w: i + 2 for i, w in enumerate(words)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]")
    tiny_bert(vocab_size=len(vocab)).save_pretrained(directory)
    tokenizer.save_pretrained(directory)


def lm_dataset(n: int = 64, length: int = 16, vocab_size: int = 64, seed: int = 0) -> Any:
    """Token sequences with learnable structure: each row counts up from a random start (mod vocab)."""
    import datasets

    g = torch.Generator().manual_seed(seed)
    starts = torch.randint(1, vocab_size, (n, 1), generator=g)
    ids = (starts + torch.arange(length)) % (vocab_size - 1) + 1  # never the pad id 0
    return datasets.Dataset.from_dict({"input_ids": ids.tolist()})


def classification_dataset(n: int = 64, length: int = 12, vocab_size: int = 100, seed: int = 0) -> Any:
    """Rows whose label says whether tokens from the upper half of the vocabulary dominate."""
    import datasets

    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 2, (n,), generator=g)
    half = vocab_size // 2
    low = torch.randint(1, half, (n, length), generator=g)
    high = torch.randint(half, vocab_size, (n, length), generator=g)
    pick_high = torch.rand((n, length), generator=g) < (0.25 + 0.5 * labels[:, None])
    ids = torch.where(pick_high, high, low)
    return datasets.Dataset.from_dict({"input_ids": ids.tolist(), "label": labels.tolist()})


def tiny_training_args(output_dir: str, **overrides: Any) -> TrainingArguments:
    """TrainingArguments for fast CPU tests: small batches, no reporting, no checkpoints."""
    kwargs: dict[str, Any] = dict(
        output_dir=output_dir,
        per_device_train_batch_size=8,
        max_steps=5,
        learning_rate=1e-3,
        report_to="none",
        use_cpu=True,
        disable_tqdm=True,
        save_strategy="no",
        logging_strategy="no",
    )
    kwargs.update(overrides)
    return TrainingArguments(**kwargs)


def synthetic_table(space: Any, *, dense_metric: float = 0.9, dense_size: int = 1_000_000, max_steps: int = 60) -> Any:
    """A :class:`~poft_autotune.search.replay.TrialTable` from a closed-form model of compression and
    recovery, for policy tests (the real benchmark records its table from real trials).

    Covers the agent's ladders of every method combination in ``space`` at three learning rates. Size
    shrinks with fewer bits and more sparsity; the accuracy drop grows steeply past ~4 bits or ~60 %
    sparsity; recovery closes a share of the drop that falls with its depth and is best at the middle
    learning rate, approaching it as ``1 - exp(-steps / 20)``.
    """
    import math

    from poft_autotune.search.agent import ladders
    from poft_autotune.search.replay import TableRow, TrialTable
    from poft_autotune.search.space import RecoveryConfig, TrialPlan

    def effect(config: Any) -> tuple[float, float]:  # (size factor, accuracy drop)
        if config.method == "quantize":
            overhead = 0.0 if config.group_size is None else 16 / config.group_size
            return (config.bits + overhead) / 32, 0.02 * max(0.0, 6 - config.bits) ** 2 * (
                0.6 if config.group_size else 1.0
            )
        if config.method == "prune":
            return 1 - config.sparsity + 1 / 32, 0.5 * config.sparsity**3
        if config.method == "nm":
            return 0.5 + 1 / 16, 0.04 if config.m == 8 else 0.07
        return 0.7, 0.05

    low, high = space.learning_rate
    middle = math.sqrt(low * high)
    rows = []
    for rungs in ladders(space).values():
        for rung in rungs:
            size, drop = 1.0, 0.0
            for config in rung.configs:
                s, d = effect(config)
                size, drop = size * s, drop + d
            drop = min(drop, dense_metric - 0.5)
            for lr in sorted({low, middle, high}):
                share = max(0.0, 0.95 - drop) * (1.0 if lr == middle else 0.7)
                curve = tuple(
                    (s, dense_metric - drop + share * drop * (1 - math.exp(-s / 20)))
                    for s in range(0, max_steps + 1, 10)
                )
                plan = TrialPlan(rung.configs, RecoveryConfig(steps=max_steps, learning_rate=lr))
                rows.append(TableRow(plan, round(dense_size * size), curve))
    return TrialTable(rows, dense_metric, dense_size)


class InvariantChecker(TrainerCallback):
    """Check the compression invariants at every optimizer step, on every rank; record what failed.

    Put it after ``CompressionCallback`` (``TrialContext(callbacks=[checker])`` does). It checks:

    * after backward, all-reduce and clipping (``on_pre_optimizer_step``): pruned gradient entries are 0;
    * after the step (``on_step_end``): pruned entries of the weight, the latent and AdamW's
      ``exp_avg``/``exp_avg_sq`` are 0, and each quantized weight is its latent projected onto the
      grid, bit for bit;
    * at the end of data-parallel training: every rank's weights, masks and latents equal rank 0's.

    ``checks`` counts the checks made by kind (so a test can tell they were not vacuous);
    ``violations`` describes each failure. Example::

        checker = InvariantChecker()
        run_trial(plan, dataclasses.replace(context, callbacks=[checker]))
        assert not checker.violations and checker.checks["grid"] > 0
    """

    def __init__(self) -> None:
        self.checks: Counter[str] = Counter()
        self.violations: list[str] = []

    def _check(self, kind: str, ok: bool, what: str) -> None:
        self.checks[kind] += 1
        if not ok:
            self.violations.append(what)

    def on_pre_optimizer_step(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        for name, layer in compressed_layers(kwargs["model"]).items():
            mask, grad = get_mask(layer), layer.weight.grad
            if mask is not None and grad is not None:
                self._check("grad", not bool(grad[~mask].any()), f"step {state.global_step}: {name} pruned grad != 0")

    def on_step_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any) -> None:
        optimizer = kwargs.get("optimizer")
        optimizer_state = optimizer.state if optimizer is not None else {}
        step = state.global_step
        for name, layer in compressed_layers(kwargs["model"]).items():
            weight = layer.weight.detach()
            mask, grid = get_mask(layer), get_quant(layer)
            if mask is not None:
                tensors = {"weight": weight, "latent": layer._buffers.get("poft_latent")}
                moments = optimizer_state.get(layer.weight, {})
                tensors.update({key: moments[key] for key in ("exp_avg", "exp_avg_sq") if key in moments})
                for kind, tensor in tensors.items():
                    if tensor is not None:
                        self._check(kind, not bool(tensor[~mask].any()), f"step {step}: {name} pruned {kind} != 0")
            if grid is not None:
                on_grid = torch.equal(grid.fake_quantize(master_weight(layer)), weight)
                self._check("grid", on_grid, f"step {step}: {name} weight is not its latent on the grid")

    def on_train_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        if args.world_size <= 1 or not dist.is_initialized():
            return
        for name, layer in compressed_layers(kwargs["model"]).items():
            own = {
                "weight": layer.weight.detach(),
                "mask": get_mask(layer),
                "latent": layer._buffers.get("poft_latent"),
            }
            for kind, tensor in own.items():
                if tensor is not None:
                    reference = tensor.clone()
                    dist.broadcast(reference, src=0)
                    self._check(
                        "ranks", torch.equal(reference, tensor), f"rank {args.process_index}: {name} {kind} != rank 0's"
                    )


def csv_study(root: Any, **overrides: Any) -> dict[str, Any]:
    """Write a tiny saved classifier (``root/model``) and train/eval CSV reviews (``root/data``) and return a
    study definition for them (quantize only, a few steps), updated with ``overrides``; for CLI tests."""
    import random
    from pathlib import Path

    root = Path(root)
    if not (root / "model").exists():
        save_tiny_text_classifier(root / "model")
    (root / "data").mkdir(exist_ok=True)
    for name, n, seed in (("train", 48, 0), ("eval", 24, 1)):
        rng = random.Random(seed)
        lines = ["review,sentiment"]
        for _ in range(n):
            positive = rng.random() < 0.5
            words = rng.choices(REVIEW_WORDS[:4] if positive else REVIEW_WORDS[4:8], k=3)
            lines.append(f"the film was very {' '.join(words)},{'pos' if positive else 'neg'}")
        (root / "data" / f"{name}.csv").write_text("\n".join(lines) + "\n")
    definition: dict[str, Any] = {
        "model": "model",
        "data": {
            "train": "data/train.csv",
            "eval": "data/eval.csv",
            "text_column": "review",
            "label_column": "sentiment",
        },
        "metric": "accuracy",
        "methods": ["quantize"],
        "space": {"steps": [2, 3], "learning_rate": "1e-4", "lora_rank": [0]},
        "n_trials": 2,
        "study_name": "local",
        "output_dir": "out",
        "training": {"batch_size": 8, "max_length": 16, "eval_batch_size": 16, "use_cpu": True},
    }
    definition.update(overrides)
    return definition
