"""Bad input: one clear error (rule, value, fix), raised before any work, with nothing written.

One table of bad inputs and one test over it. Each row gives the call, a regular expression its message
must match (it names the offending field and value) and, where needed, a setup run before the snapshot
(an existing study, a file in the way, a model directory). The test checks the exception type
(InvalidConfigError or a subclass), that no module ran a forward pass (no evaluation, no training), and
that the files under tmp_path are byte for byte what they were. README "Troubleshooting" lists the same
classes.
"""

from __future__ import annotations

import dataclasses
import hashlib
import pathlib
import re
import types
from collections.abc import Callable
from typing import Any

import datasets
import optuna
import pytest
import torch
from transformers import BertConfig, BertModel
from unsafe_models import CODE_MARKER, PICKLE_MARKER, save_pickle_only_model, save_remote_code_model

from poft_autotune import InvalidConfigError, SearchSpace, autotune
from poft_autotune.pareto import CHECKPOINT_ATTR, export_trial
from poft_autotune.testing import classification_dataset, tiny_bert, tiny_training_args
from poft_autotune.validate import SPACE_ATTR, describe_space


def _autotune(tmp: pathlib.Path, model: Any = None, train: Any = None, evaluation: Any = None, **kwargs: Any) -> Any:
    kwargs.setdefault("n_trials", 1)
    kwargs.setdefault("training_args", tiny_training_args(str(tmp / "args")))
    kwargs.setdefault("output_dir", tmp / "studies")
    return autotune(
        model if model is not None else tiny_bert(),
        train if train is not None else classification_dataset(16),
        evaluation if evaluation is not None else classification_dataset(8, seed=1),
        show_progress=False,
        **kwargs,
    )


def bad(**kwargs: Any) -> Callable[[pathlib.Path], Any]:
    """``autotune`` on a tiny BERT and valid data, with ``kwargs`` changed (a callable value gets tmp_path)."""
    return lambda tmp: _autotune(tmp, **{k: v(tmp) if _deferred(k, v) else v for k, v in kwargs.items()})


def _deferred(key: str, value: Any) -> bool:
    return isinstance(value, types.FunctionType) and key != "metric"


def space(**choices: Any) -> SearchSpace:
    return SearchSpace(methods=tuple(choices), choices=choices, steps=(1, 2))


# --- setups: what must exist before the bad call (part of the snapshot) -----------------------------------


def _file_in_the_way(tmp: pathlib.Path) -> None:
    (tmp / "taken").write_text("a file, not a folder\n")


def _remote_code_model(tmp: pathlib.Path) -> None:
    save_remote_code_model(tmp / "custom", tmp / CODE_MARKER)  # the marker would change the snapshot


def _pickle_model(tmp: pathlib.Path) -> None:
    save_pickle_only_model(tmp / "pickled", tmp / PICKLE_MARKER)


def _study(tmp: pathlib.Path, directions: list[str], metric: str, attrs: dict[str, Any] | None = None) -> None:
    study = optuna.create_study(study_name="s", storage=f"sqlite:///{tmp}/clash.db", directions=directions)
    study.set_metric_names(["size_bytes", metric])
    for key, value in (attrs or {}).items():
        study.set_user_attr(key, value)


def _other_metric_study(tmp: pathlib.Path) -> None:
    _study(tmp, ["minimize", "minimize"], "perplexity")


def _other_space_study(tmp: pathlib.Path) -> None:
    described = describe_space(SearchSpace(methods=("prune",)).fitted_to(tiny_bert()))
    _study(tmp, ["minimize", "maximize"], "accuracy", {SPACE_ATTR: described})


def _export_study(tmp: pathlib.Path) -> None:
    """Trial 0 complete with a checkpoint, 1 failed, 2 complete without a kept checkpoint."""
    checkpoint = tmp / "checkpoint"
    checkpoint.mkdir()
    (checkpoint / "config.json").write_text("{}")
    (tmp / "target").mkdir()
    (tmp / "target" / "keep.txt").write_text("the user's file\n")
    _file_in_the_way(tmp)
    study = optuna.create_study(
        study_name="exp", storage=f"sqlite:///{tmp}/exp.db", directions=["minimize", "maximize"]
    )
    study.add_trial(optuna.trial.create_trial(values=[1.0, 0.5], user_attrs={CHECKPOINT_ATTR: str(checkpoint)}))
    study.add_trial(optuna.trial.create_trial(state=optuna.trial.TrialState.FAIL, user_attrs={"error": "diverged"}))
    study.add_trial(optuna.trial.create_trial(values=[2.0, 0.6]))


def export(trial: int, target: str) -> Callable[[pathlib.Path], Any]:
    def call(tmp: pathlib.Path) -> Any:
        study = optuna.load_study(study_name="exp", storage=f"sqlite:///{tmp}/exp.db")
        return export_trial(study, trial, tmp / target)

    return call


@dataclasses.dataclass(frozen=True)
class Case:
    call: Callable[[pathlib.Path], Any]
    match: str  # searched in the message: names the field and the value received
    setup: Callable[[pathlib.Path], None] | None = None
    error: type[Exception] = InvalidConfigError


TINY_BERT_NO_HEAD = lambda tmp: BertModel(  # noqa: E731
    BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=64, vocab_size=100)
)
STRING_LABELS = lambda tmp: classification_dataset(16).map(lambda r: {"label": "pos"}, remove_columns=["label"])  # noqa: E731

CASES: dict[str, Case] = {
    # the model
    "model: wrong type": Case(bad(model=42), r"`model` must be a Hub id, a local path or a PreTrainedModel, got int"),
    "model: path does not exist": Case(
        bad(model="/nonexistent/model/dir"),
        r"`model` '/nonexistent/model/dir' looks like a local path, but there is no such",
    ),
    "model: neither causal LM nor classifier": Case(
        bad(model=TINY_BERT_NO_HEAD), r"Model class BertModel is neither a causal LM nor a sequence classifier"
    ),
    "model: no compressible layer": Case(
        bad(model=tiny_bert(num_hidden_layers=0)),
        r"method='quantize'.*Method 'quantize' found no layer to compress in BertForSequenceClassification",
    ),
    "model: needs its own code, not allowed": Case(
        bad(model=lambda tmp: str(tmp / "custom")),
        r"'.*custom' needs Python code shipped with the model .* `trust_remote_code` is False",
        setup=_remote_code_model,
    ),
    "model: pickle weights only": Case(
        bad(model=lambda tmp: str(tmp / "pickled")),
        r"`model` '.*pickled' has no safetensors weights",
        setup=_pickle_model,
    ),
    "trust_remote_code: not a bool": Case(
        bad(trust_remote_code="yes"), r"`trust_remote_code` must be True or False, got 'yes'"
    ),
    # the search space
    "methods: unknown method": Case(
        bad(methods=["lowrank"]), r"Unknown compression method 'lowrank'; available methods"
    ),
    "methods: given with space": Case(bad(methods=["prune"], space=SearchSpace()), r"either `methods` or `space`"),
    "space: not a SearchSpace": Case(
        bad(space={"methods": ["prune"]}), r"`space` must be a poft_autotune.SearchSpace, got dict"
    ),
    "space: bits outside 2..8": Case(
        bad(space=space(quantize={"bits": (1, 8)})), r"quantize.bits=1.*`bits` must be an integer in \[2, 8\], got 1"
    ),
    "space: group size does not divide the input dim": Case(
        bad(space=space(quantize={"group_size": [48]})),
        r"`group_size` must divide the input dimension .* got group_size=48 for '.*' with in_features=32",
    ),
    "space: sparsity outside [0, 1)": Case(
        bad(space=space(prune={"sparsity": (0.5, 1.0)})), r"`sparsity` must be in \[0, 1\), got 1.0"
    ),
    "space: N:M does not divide the layer": Case(
        bad(space=space(nm={"pattern": ["3:5"]})),
        r"`m` must divide the input dimension .* got m=5 for '.*' with in_features=32",
    ),
    "space: range low > high": Case(
        bad(space=space(prune={"sparsity": (0.9, 0.1)})), r"`prune.sparsity` must have low <= high, got \(0.9, 0.1\)"
    ),
    "space: no values to choose from": Case(
        bad(space=space(quantize={"symmetric": []})), r"`quantize.symmetric` has no values to choose from"
    ),
    "space: steps range reversed": Case(
        lambda tmp: SearchSpace(steps=(10, 5)), r"`steps` range must have low <= high, got \(10, 5\)"
    ),
    "space: distill_weight outside [0, 1]": Case(
        lambda tmp: SearchSpace(distill_weight=(0.0, 1.5)),
        r"`distill_weight` range must lie in \[0, 1\], got \(0.0, 1.5\)",
    ),
    "space: learning rate <= 0": Case(
        lambda tmp: SearchSpace(learning_rate=(0.0, 1e-3)), r"`learning_rate` > 0, got .*learning_rate=\(0.0, 0.001\)"
    ),
    "space: negative LoRA rank": Case(
        lambda tmp: SearchSpace(lora_rank=(0, -8)), r"`lora_rank` must list integers >= 0.*-8"
    ),
    # budget and run settings
    "n_trials: zero": Case(bad(n_trials=0), r"`n_trials` must be a positive integer, got 0"),
    "n_trials: not an integer": Case(bad(n_trials=2.5), r"`n_trials` must be a positive integer, got 2.5"),
    "keep_checkpoints: unknown": Case(
        bad(keep_checkpoints="some"), r"`keep_checkpoints` must be one of .*, got 'some'"
    ),
    "seed: not an integer": Case(bad(seed="0"), r"`seed` must be an integer, got '0'"),
    "policy: unknown name": Case(bad(policy="bogus"), r"Unknown policy 'bogus'; available"),
    "max_size_bytes: zero": Case(bad(max_size_bytes=0), r"`max_size_bytes` must be a positive integer or None, got 0"),
    "min_retained: out of range": Case(bad(min_retained=5), r"`min_retained` must be a fraction .*, got 5"),
    "early_stopping: wrong type": Case(bad(early_stopping=3), r"`early_stopping` must be an EarlyStopping or None"),
    "max_length: zero": Case(bad(max_length=0), r"`max_length` must be a positive integer, got 0"),
    "eval_batch_size: negative": Case(bad(eval_batch_size=-1), r"`eval_batch_size` must be a positive integer, got -1"),
    "training_args: wrong type": Case(
        bad(training_args={"x": 1}), r"`training_args` must be a TrainingArguments, got dict"
    ),
    "training_args: FSDP": Case(
        bad(training_args=lambda tmp: tiny_training_args(str(tmp / "args"), fsdp=True)),
        r"`training_args` must not enable FSDP or DeepSpeed \(got fsdp=True",
    ),
    # the data
    "data: not a Dataset": Case(
        bad(train=[{"input_ids": [1, 2]}]), r"`train_dataset` must be a datasets.Dataset, got list"
    ),
    "data: train empty": Case(bad(train=classification_dataset(16).select([])), r"`train_dataset` is empty"),
    "data: eval empty": Case(bad(evaluation=classification_dataset(8).select([])), r"`eval_dataset` is empty"),
    "data: no text column": Case(
        bad(train=datasets.Dataset.from_dict({"words": ["a"], "label": [0]})),
        r"`train_dataset` has neither 'input_ids' nor the text column 'text' \(columns: \['label', 'words'\]\)",
    ),
    "data: raw text without tokenizer": Case(
        bad(train=datasets.Dataset.from_dict({"text": ["a", "b"], "label": [0, 1]})),
        r"`train_dataset` holds raw text \('text'\) but no tokenizer is available",
    ),
    "data: no label column": Case(
        bad(train=classification_dataset(16).remove_columns("label")), r"`train_dataset` has no label column 'label'"
    ),
    "data: labels not integers": Case(
        bad(train=STRING_LABELS), r"`train_dataset` labels must be integer class ids, got values like \['pos'"
    ),
    "data: label ids beyond the head": Case(
        bad(train=classification_dataset(16).map(lambda r: {"label": 5})),
        r"`train_dataset` labels must be class ids in \[0, 1\] .* got values in \[5, 5\]",
    ),
    "data: eval label ids beyond the head": Case(
        bad(evaluation=classification_dataset(8).map(lambda r: {"label": 3})),
        r"`eval_dataset` labels must be class ids in \[0, 1\] .* got values in \[3, 3\]",
    ),
    "data: token ids beyond the vocabulary": Case(
        bad(train=classification_dataset(16, vocab_size=500)),
        r"`train_dataset` has token ids in \[\d+, \d{3}\], but the model's vocabulary has 100 tokens",
    ),
    "data: rows longer than the position embeddings": Case(
        bad(evaluation=classification_dataset(8, length=80)),
        r"`eval_dataset` has rows of up to 80 tokens, but the model has 64 position embeddings",
    ),
    # the metric
    "metric: unknown name": Case(bad(metric="no_such_metric_xyz"), r"Metric 'no_such_metric_xyz' is not built in"),
    "metric: perplexity on a classifier": Case(bad(metric="perplexity"), r"Metric 'perplexity' needs a causal LM"),
    "metric: returns no number": Case(
        bad(metric=lambda p, r: "high"), r"Metric '<lambda>' must return a number, got 'high'"
    ),
    "metric: wrong signature": Case(
        bad(metric=lambda p: 1.0), r"Metric '<lambda>' failed on a sample of the eval labels \(TypeError"
    ),
    # storage, study, output
    "storage: malformed URL": Case(bad(storage="not a url"), r"`storage` must be a database URL .* got 'not a url'"),
    "storage: SQLite folder missing": Case(
        bad(storage=lambda tmp: f"sqlite:///{tmp}/missing/s.db"),
        r"`storage` 'sqlite:///.*/missing/s.db' names a SQLite file",
    ),
    "storage: database unreachable": Case(
        bad(storage="postgresql://poft:secret@127.0.0.1:9/poft"),
        r"Could not open the study storage 'postgresql://poft:\*\*\*@127.0.0.1:9/poft'",
    ),
    "study: name clash, other metric": Case(
        bad(storage=lambda tmp: f"sqlite:///{tmp}/clash.db", study_name="s"),
        r"Study 's' in this storage has directions \['MINIMIZE', 'MINIMIZE'\]",
        setup=_other_metric_study,
    ),
    "study: name clash, other search space": Case(
        bad(storage=lambda tmp: f"sqlite:///{tmp}/clash.db", study_name="s", space=SearchSpace(methods=("quantize",))),
        r"Study 's' in this storage was created with another search space \(.*methods: \['prune'\] -> \['quantize'\]",
        setup=_other_space_study,
    ),
    "study_name: path separator": Case(
        bad(study_name="../escape"), r"`study_name` must not contain a path separator .* got '../escape'"
    ),
    "output_dir: an existing file": Case(
        bad(output_dir=lambda tmp: tmp / "taken"),
        r"`output_dir` must be a folder, got '.*taken', which is an existing file",
        setup=_file_in_the_way,
    ),
    "output_dir: cannot be created": Case(
        bad(output_dir=lambda tmp: tmp / "taken" / "sub"),
        r"`output_dir` cannot be created: got '.*taken/sub', but '.*taken' is a file",
        setup=_file_in_the_way,
    ),
    # export
    "export: trial does not exist": Case(export(99, "out"), r"Study 'exp' has no trial 99", setup=_export_study),
    "export: trial failed": Case(export(1, "out"), r"Trial 1 is FAIL, not COMPLETE.*diverged", setup=_export_study),
    "export: no kept checkpoint": Case(export(2, "out"), r"Trial 2 has no kept checkpoint", setup=_export_study),
    "export: target not empty": Case(
        export(0, "target"), r"`directory` must be empty or new, got '.*target'", setup=_export_study
    ),
    "export: target is a file": Case(
        export(0, "taken"), r"`directory` must be a directory path, got '.*taken'", setup=_export_study
    ),
}


def _tree(root: pathlib.Path) -> dict[str, str]:
    """Every file and folder under ``root``: folders as 'dir', files by the hash of their bytes."""
    return {
        str(p.relative_to(root)): "dir" if p.is_dir() else hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
    }


@pytest.mark.parametrize("name", sorted(CASES))
def test_bad_input_fails_before_any_work_and_writes_nothing(name, tmp_path):
    case = CASES[name]
    if case.setup is not None:
        case.setup(tmp_path)
    before = _tree(tmp_path)
    forwards: list[str] = []  # any module's forward pass, anywhere: evaluation, calibration or training
    hook = torch.nn.modules.module.register_module_forward_pre_hook(lambda m, args: forwards.append(type(m).__name__))
    try:
        with pytest.raises(case.error) as raised:
            case.call(tmp_path)
    finally:
        hook.remove()
    assert isinstance(raised.value, InvalidConfigError)
    assert re.search(case.match, str(raised.value), re.DOTALL), str(raised.value)
    assert forwards == []
    assert _tree(tmp_path) == before


def test_the_table_covers_every_documented_class():
    """Each row of README's troubleshooting table has a row here and the other way round."""
    readme = (pathlib.Path(__file__).parent.parent / "README.md").read_text()
    section = readme.split("## Troubleshooting", 1)[1].split("\n## ", 1)[0]
    documented = set(re.findall(r"^\| ([a-z_]+: [^|]+?) \|", section, re.MULTILINE))
    assert documented == set(CASES), documented ^ set(CASES)
