"""Bad input fails before any work: one :class:`InvalidConfigError` naming the field and the value, nothing written.

``autotune`` calls, in order:

1. :func:`check_arguments`: the plain arguments, before the model is even loaded;
2. :func:`check_setup`: once the model and data are loaded: every plan the search space can propose is
   checked against the model (:func:`check_space`), the token ids and lengths against the model's
   embeddings, and the metric on a sample of the eval labels;
3. :func:`check_study_space`: once the study is open, a study is continued only with the search space
   it was created with (stored in its ``user_attrs``), unless the caller allows a change.

Nothing here trains, runs the model, or writes a file (except :func:`check_study_space` recording the
space of a study that has none yet).
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, cast

import numpy as np
import optuna
from torch import nn
from transformers import TrainingArguments

from poft_autotune.compression import check_configs
from poft_autotune.data import CAUSAL_LM, Metric
from poft_autotune.errors import InvalidConfigError
from poft_autotune.search.space import SearchSpace, suggest_plan

logger = logging.getLogger("poft_autotune")

SPACE_ATTR = "search_space"
KEEP_CHOICES = ("front", "all", "none")
# How many plans of one search space check_space looks at, at most (a space is a product of choices).
PROBE_LIMIT = 2000


def _positive_int(name: str, value: Any) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise InvalidConfigError(f"`{name}` must be a positive integer, got {value!r}.")


def _flag(name: str, value: Any) -> None:
    if not isinstance(value, bool):
        raise InvalidConfigError(f"`{name}` must be True or False, got {value!r}.")


def _name(name: str, value: Any) -> None:
    if not isinstance(value, str) or not value:
        raise InvalidConfigError(f"`{name}` must be a non-empty string, got {value!r}.")


def check_output_dir(output_dir: str | os.PathLike[str]) -> None:
    """``output_dir`` is a folder, or can be created, and this user may write in it; nothing is created."""
    path = Path(output_dir).expanduser().absolute()
    if path.exists() and not path.is_dir():
        raise InvalidConfigError(
            f"`output_dir` must be a folder, got {str(path)!r}, which is an existing file. Pass a folder path "
            "(it is created if missing)."
        )
    existing = path
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise InvalidConfigError(
            f"`output_dir` cannot be created: got {str(path)!r}, but {str(existing)!r} is a file, not a folder."
        )
    if not os.access(existing, os.W_OK | os.X_OK):
        raise InvalidConfigError(
            f"`output_dir` must be writable, got {str(path)!r}: this user cannot write in {str(existing)!r}. "
            "Choose a writable folder."
        )


def shown_storage(storage: Any) -> str:
    """``storage`` for messages: a URL with its password masked, or the storage object's type."""
    if not isinstance(storage, str):
        return type(storage).__name__
    from sqlalchemy.engine import make_url

    try:
        return repr(make_url(storage).render_as_string(hide_password=True))
    except Exception:  # not a URL: shown as given
        return repr(storage)


def check_storage(storage: Any) -> None:
    """A URL that parses, and for SQLite a file whose folder exists; the database is not contacted here."""
    if storage is None or isinstance(storage, optuna.storages.BaseStorage):
        return
    from poft_autotune.workers import storage_file_kind

    if isinstance(storage, os.PathLike) or (isinstance(storage, str) and "://" not in storage):
        # a file: SQLite (.db) or a journal file for several workers (poft_autotune.workers.open_storage)
        if storage_file_kind(Path(storage)) is not None:
            return
        if isinstance(storage, os.PathLike):
            storage = os.fspath(storage)
    if not isinstance(storage, str):
        raise InvalidConfigError(
            f"`storage` must be a database URL, a file path, an optuna storage object or None, got "
            f"{type(storage).__name__}."
        )
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    try:
        url = make_url(storage)
    except (ArgumentError, ValueError):
        raise InvalidConfigError(
            f"`storage` must be a database URL such as 'sqlite:///studies/poft.db' or "
            f"'postgresql://user:password@host/db', or a file ending in .db (SQLite) or .journal (several workers "
            f"on one machine), got {storage!r}."
        ) from None
    if url.get_backend_name() == "sqlite" and url.database not in (None, "", ":memory:"):
        folder = Path(str(url.database)).expanduser().absolute().parent
        if not folder.is_dir():
            raise InvalidConfigError(
                f"`storage` {storage!r} names a SQLite file in {str(folder)!r}, a folder that does not exist. "
                "Create it, or leave `storage` out (default: <output_dir>/<study_name>.db)."
            )


def check_arguments(arguments: Mapping[str, Any]) -> None:
    """``autotune``'s plain arguments, by name (``locals()`` at its top), checked before anything is loaded.

    Example: ``check_arguments({"n_trials": 0, ...})`` raises ``InvalidConfigError: `n_trials` must be a
    positive integer, got 0.``
    """
    a = dict(arguments)
    n_trials, methods, space = a.get("n_trials", 1), a.get("methods"), a.get("space")
    keep_checkpoints, study_name, seed = a.get("keep_checkpoints", "front"), a.get("study_name"), a.get("seed", 0)
    training_args = a.get("training_args")
    _positive_int("n_trials", n_trials)
    if keep_checkpoints not in KEEP_CHOICES:
        raise InvalidConfigError(f"`keep_checkpoints` must be one of {KEEP_CHOICES}, got {keep_checkpoints!r}.")
    if space is not None and methods is not None:
        raise InvalidConfigError("Pass either `methods` or `space` (which has its own methods), not both.")
    if space is not None and not isinstance(space, SearchSpace):
        raise InvalidConfigError(
            f"`space` must be a poft_autotune.SearchSpace, got {type(space).__name__}. "
            "Build one with SearchSpace(methods=..., steps=..., choices=...)."
        )
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise InvalidConfigError(f"`seed` must be an integer, got {seed!r}.")
    for name in ("max_length", "eval_batch_size"):
        _positive_int(name, a.get(name, 1))
    for name in ("text_column", "label_column"):
        _name(name, a.get(name, "x"))
    for name in ("trust_remote_code", "allow_space_change", "show_progress"):
        _flag(name, a.get(name, False))
    if study_name is not None:
        _name("study_name", study_name)
        if study_name in (".", "..") or any(sep in study_name for sep in ("/", "\\", os.sep)):
            raise InvalidConfigError(
                f"`study_name` must not contain a path separator or be '.'/'..' (it names "
                f"<output_dir>/<study_name>.db and <output_dir>/<study_name>/), got {study_name!r}."
            )
    if training_args is not None:
        if not isinstance(training_args, TrainingArguments):
            raise InvalidConfigError(
                f"`training_args` must be a TrainingArguments, got {type(training_args).__name__}."
            )
        if getattr(training_args, "fsdp", None) or getattr(training_args, "deepspeed", None):
            raise InvalidConfigError(
                "`training_args` must not enable FSDP or DeepSpeed (got fsdp="
                f"{training_args.fsdp!r}, deepspeed={training_args.deepspeed!r}): they shard the weights whose "
                "masks and quantization grid recovery keeps. Use data parallel (torchrun / accelerate launch "
                "without FSDP or DeepSpeed) or one device."
            )
    check_output_dir(a.get("output_dir", "studies"))
    check_storage(a.get("storage"))


# --- the search space against the model -------------------------------------------------------------------


class _Unfixed(Exception):
    def __init__(self, name: str, values: list[Any]) -> None:
        super().__init__(name)
        self.name, self.values = name, values


class _ProbeTrial:
    """Answers Optuna's ``suggest_*`` calls from ``fixed``; a compression parameter not fixed yet raises
    ``_Unfixed`` with its candidate values (the ends of a range, every categorical choice) to branch on;
    recovery parameters get their first candidate (their ranges are checked by ``SearchSpace``)."""

    def __init__(self, fixed: Mapping[str, Any]) -> None:
        self.fixed = fixed

    def _answer(self, name: str, values: list[Any]) -> Any:
        if name in self.fixed:
            return self.fixed[name]
        if not name.startswith("recovery."):
            raise _Unfixed(name, values)
        return values[0]

    def _range(self, name: str, low: Any, high: Any, log: bool) -> Any:
        if low > high:
            raise InvalidConfigError(
                f"The search range of `{name}` must have low <= high, got ({low!r}, {high!r}). "
                "Fix it in SearchSpace(choices=...)."
            )
        if log and low <= 0:
            raise InvalidConfigError(f"The log-scale search range of `{name}` must be > 0, got ({low!r}, {high!r}).")
        return self._answer(name, [low] if low == high else [low, high])

    def suggest_int(self, name: str, low: int, high: int, *, step: int = 1, log: bool = False) -> Any:
        return self._range(name, low, high, log)

    def suggest_float(self, name: str, low: float, high: float, *, step: float | None = None, log: bool = False) -> Any:
        return self._range(name, low, high, log)

    def suggest_categorical(self, name: str, choices: Any) -> Any:
        values = list(choices)
        if not values:
            raise InvalidConfigError(
                f"`{name}` has no values to choose from; give at least one in SearchSpace(choices=...)."
            )
        return self._answer(name, values)


def check_space(space: SearchSpace, model: nn.Module, *, calibration: bool = True) -> int:
    """Check every plan ``space`` can propose against ``model``, changing nothing; returns how many were checked.

    Each method combination is expanded over the ends of its ranges and every categorical choice (up to
    ``PROBE_LIMIT`` plans); each plan's configs are built (field validation) and checked against the
    model's layers (``check_configs``: layers found, group sizes and N:M dividing, ...). Values strictly
    inside a float range are not checked, nor are the layer shapes a structured method leaves behind
    (they depend on the fraction drawn): such a plan fails its trial only. Example::

        check_space(SearchSpace(choices={"quantize": {"group_size": [48]}}).fitted_to(model), model)
    """
    checked = 0

    def visit(fixed: dict[str, Any]) -> None:
        nonlocal checked
        try:
            plan = suggest_plan(cast(optuna.Trial, _ProbeTrial(fixed)), space)
        except _Unfixed as unfixed:
            for value in unfixed.values:
                if checked < PROBE_LIMIT:
                    visit({**fixed, unfixed.name: value})
            return
        except InvalidConfigError as exc:
            raise _invalid(fixed, exc) from exc
        checked += 1
        configs = plan.compression
        # After a method that removes structure, later configs meet shapes that depend on the fractions
        # drawn (any value inside the range); those are checked when the trial runs (a bad one fails that
        # trial), so here they are checked against the model's own layers.
        parts = [configs[:1], configs[1:]] if configs and configs[0].changes_shapes else [configs]
        try:
            for part in parts:
                check_configs(model, part, calibration=calibration)
        except InvalidConfigError as exc:
            raise _invalid(fixed, exc) from exc

    visit({})
    return checked


def _invalid(fixed: Mapping[str, Any], exc: InvalidConfigError) -> InvalidConfigError:
    params = ", ".join(f"{k}={v!r}" for k, v in fixed.items())
    return InvalidConfigError(
        f"The search space can propose a plan that cannot run on this model ({params}): {exc} "
        "Narrow `space` (SearchSpace(methods=..., choices=...)) to values that fit."
    )


# --- the data and the metric against the model -----------------------------------------------------------


def check_tokens(dataset: Any, model: nn.Module, split: str) -> None:
    """Token ids inside the model's vocabulary; rows no longer than its absolute position embeddings."""
    import pyarrow.compute as pc

    column = dataset.with_format("arrow")["input_ids"]
    flat = pc.list_flatten(column)
    if len(flat) == 0:
        raise InvalidConfigError(f"`{split}` has only empty rows (no tokens); every row needs at least one token.")
    low, high = pc.min(flat).as_py(), pc.max(flat).as_py()
    get_embeddings = getattr(model, "get_input_embeddings", None)
    vocab = getattr(get_embeddings(), "num_embeddings", None) if callable(get_embeddings) else None
    if vocab is not None and (low < 0 or high >= vocab):
        raise InvalidConfigError(
            f"`{split}` has token ids in [{low}, {high}], but the model's vocabulary has {vocab} tokens (ids 0.."
            f"{vocab - 1}). Tokenize with the model's own tokenizer."
        )
    positions = [
        m.num_embeddings
        for name, m in model.named_modules()
        if isinstance(m, nn.Embedding) and name.endswith("position_embeddings")
    ]
    longest = pc.max(pc.list_value_length(column)).as_py()
    if positions and longest > min(positions):
        raise InvalidConfigError(
            f"`{split}` has rows of up to {longest} tokens, but the model has {min(positions)} position "
            "embeddings. Pass max_length=... (raw text is truncated to it) or truncate the tokenized rows."
        )


def check_metric(metric: Metric, evaluation: Any, task: str) -> None:
    """Compute ``metric`` once on a sample of the eval references (predictions = references): it must run
    and return one finite number. Perplexity comes from the loss and needs no check."""
    if metric.compute is None:
        return
    rows = evaluation[:16]
    if task == CAUSAL_LM:
        refs = np.asarray([t for row in rows["input_ids"] for t in row[1:]])
    else:
        refs = np.asarray(rows["labels"])
    compute: Callable[[np.ndarray, np.ndarray], float] = metric.compute
    try:
        compute(refs.copy(), refs)
    except InvalidConfigError:
        raise
    except Exception as exc:  # the user's function: any error it raises is reported as bad input
        raise InvalidConfigError(
            f"Metric {metric.name!r} failed on a sample of the eval labels ({type(exc).__name__}: {exc}). It must "
            "accept fn(predictions, references) (numpy arrays of class or token ids) and return a number."
        ) from exc


def check_setup(model: nn.Module, space: SearchSpace, train: Any, evaluation: Any, metric: Metric, task: str) -> None:
    """Everything that needs the loaded model and prepared data: space, tokens, metric (see the module doc)."""
    check_space(space, model)
    check_tokens(train, model, "train_dataset")
    check_tokens(evaluation, model, "eval_dataset")
    check_metric(metric, evaluation, task)


# --- a study continues with the space it was created with ------------------------------------------------


def describe_space(space: SearchSpace) -> dict[str, Any]:
    """``space`` as plain JSON data (what ``check_study_space`` stores and compares)."""
    import dataclasses

    return cast(dict[str, Any], json.loads(json.dumps(dataclasses.asdict(space), sort_keys=True, default=list)))


def check_study_space(study: optuna.Study, space: SearchSpace, *, allow_change: bool = False) -> None:
    """Refuse to continue ``study`` with a search space other than the one it was created with.

    The space is stored in the study's user_attrs the first time; later runs must pass the same one (its
    trials were drawn from it, and a policy reads them as such) or ``allow_change=True``, which records
    the new space. Example: ``check_study_space(study, space)``.
    """
    described = describe_space(space)
    stored = study.user_attrs.get(SPACE_ATTR)
    if stored == described:
        return
    if stored is not None and not allow_change:
        changed = sorted(k for k in set(stored) | set(described) if stored.get(k) != described.get(k))
        diff = "; ".join(f"{k}: {stored.get(k)!r} -> {described.get(k)!r}" for k in changed)
        raise InvalidConfigError(
            f"Study {study.study_name!r} in this storage was created with another search space ({diff}). "
            "Use another study_name, or pass allow_space_change=True to continue it with the new space."
        )
    if stored is not None:
        logger.warning("study %r continues with a changed search space (allow_space_change=True)", study.study_name)
    study.set_user_attr(SPACE_ATTR, described)
