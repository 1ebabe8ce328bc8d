"""The spine on a real model: MiniLM-L6 sentiment classifier, 12-trial autotune, front as markdown.

    python studies/minilm_sentiment.py [--trials 12] [--base-steps 150]

1. fine-tune all-MiniLM-L6-v2 (fresh 2-label head) briefly on movie-review snippets -> the dense base
   (cached under $POFT_CACHE/minilm-sentiment-base, so reruns skip it);
2. autotune it (compression + recovery searched together) on a disjoint train split, evaluating on
   500 held-out snippets; the study lands in studies/minilm_sentiment.db and the front in
   studies/minilm_sentiment/{front.json,report.md}.
"""

from __future__ import annotations

import argparse
import logging
import tempfile
import time
from pathlib import Path

from transformers import AutoModelForSequenceClassification, AutoTokenizer, Trainer, TrainingArguments

from poft_autotune import SearchSpace, autotune
from poft_autotune.data import CLASSIFICATION, PadCollator, prepare_dataset
from poft_autotune.demo import cache_dir, minilm_dir, sentiment_splits

MAX_LENGTH = 64


def finetuned_base(train, steps: int) -> Path:
    """MiniLM with a 2-label head fine-tuned for ``steps`` steps; saved once and reused."""
    out = cache_dir() / f"minilm-sentiment-base-{steps}"
    if (out / "config.json").exists():
        return out
    tokenizer = AutoTokenizer.from_pretrained(minilm_dir())
    model = AutoModelForSequenceClassification.from_pretrained(minilm_dir(), num_labels=2)
    data = prepare_dataset(train, CLASSIFICATION, tokenizer=tokenizer, max_length=MAX_LENGTH, num_labels=2)
    args = TrainingArguments(
        output_dir=tempfile.mkdtemp(),
        max_steps=steps,
        per_device_train_batch_size=16,
        learning_rate=5e-5,
        report_to="none",
        save_strategy="no",
        disable_tqdm=True,
        seed=0,
    )
    Trainer(
        model=model, args=args, train_dataset=data, data_collator=PadCollator(tokenizer.pad_token_id, CLASSIFICATION)
    ).train()
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trials", type=int, default=12)
    parser.add_argument("--base-steps", type=int, default=150)
    parser.add_argument("--study", default="minilm_sentiment")
    parser.add_argument("--out", default="studies")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")

    base_train, rest = sentiment_splits(2400 + 2000, 500, seed=0)
    base_train, search_train = base_train.select(range(2400)), base_train.select(range(2400, 4400))
    start = time.perf_counter()
    base = finetuned_base(base_train, args.base_steps)
    logging.info("dense base ready in %.0f s: %s", time.perf_counter() - start, base)

    training_args = TrainingArguments(
        output_dir=tempfile.mkdtemp(),
        per_device_train_batch_size=16,
        lr_scheduler_type="constant",
        weight_decay=0.0,
        report_to="none",
        save_strategy="no",
        disable_tqdm=True,
    )
    space = SearchSpace(
        methods=("quantize", "prune", "nm", "prune+quantize"),
        steps=(20, 80),
        learning_rate=(1e-5, 2e-4),
    )
    start = time.perf_counter()
    front = autotune(
        str(base),
        search_train,
        rest,
        metric="accuracy",
        n_trials=args.trials,
        space=space,
        study_name=args.study,
        output_dir=args.out,
        training_args=training_args,
        max_length=MAX_LENGTH,
        eval_batch_size=64,
    )
    logging.info("autotune: %d trials in %.0f s", args.trials, time.perf_counter() - start)
    print(front.to_markdown())


if __name__ == "__main__":
    main()
