"""Tiny models and synthetic data for tests and examples: built from configs, nothing downloaded."""

from __future__ import annotations

from typing import Any

import torch
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    LlamaConfig,
    LlamaForCausalLM,
    TrainingArguments,
)


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
