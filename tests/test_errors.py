"""Bad input fails early with one clear error (rule, value, fix) and writes nothing."""

import datasets
import pytest

from poft_autotune import InvalidConfigError, SearchSpace, autotune
from poft_autotune.data import CLASSIFICATION, resolve_metric
from poft_autotune.search.space import RecoveryConfig
from poft_autotune.testing import classification_dataset, lm_dataset, tiny_bert, tiny_llama, tiny_training_args


def _run(tmp_path, model=None, train=None, evaluation=None, **kwargs):
    kwargs.setdefault("n_trials", 1)
    return autotune(
        model if model is not None else tiny_bert(),
        train if train is not None else classification_dataset(16),
        evaluation if evaluation is not None else classification_dataset(8, seed=1),
        training_args=tiny_training_args(str(tmp_path / "args")),
        output_dir=tmp_path / "studies",
        show_progress=False,
        **kwargs,
    )


CASES = {
    "n_trials zero": (dict(n_trials=0), "`n_trials` must be a positive integer, got 0"),
    "n_trials float": (dict(n_trials=2.5), "`n_trials` must be a positive integer"),
    "unknown method": (dict(methods=["lowrank"]), "Unknown compression method 'lowrank'; available methods"),
    "empty train": (dict(train=classification_dataset(16).select([])), "`train_dataset` is empty"),
    "no label column": (
        dict(train=classification_dataset(16).remove_columns("label")),
        "has no label column 'label'",
    ),
    "label beyond head": (
        dict(train=classification_dataset(16).map(lambda r: {"label": 5})),
        r"labels must be class ids in \[0, 1\]",
    ),
    "string labels": (
        dict(train=classification_dataset(16).map(lambda r: {"label": "pos"}, remove_columns=["label"])),
        "labels must be integer class ids",
    ),
    "raw text without tokenizer": (
        dict(train=datasets.Dataset.from_dict({"text": ["a", "b"], "label": [0, 1]})),
        "no tokenizer is available",
    ),
    "neither ids nor text": (
        dict(train=datasets.Dataset.from_dict({"words": ["a"], "label": [0]})),
        "has neither 'input_ids' nor the text column 'text'",
    ),
    "unknown metric": (dict(metric="no_such_metric_xyz"), "Metric 'no_such_metric_xyz' is not built in"),
    "perplexity on classifier": (dict(metric="perplexity"), "needs a causal LM"),
    "model path missing": (dict(model="/nonexistent/model/dir"), "Could not load a model config"),
    "model wrong type": (dict(model=42), "`model` must be a Hub id, a local path or a PreTrainedModel"),
    "not a dataset": (dict(train=[{"input_ids": [1, 2]}]), "`train_dataset` must be a datasets.Dataset"),
    "methods and space": (dict(methods=["prune"], space=SearchSpace()), "either `methods` or `space`"),
    "bad training args": (dict(training_args_override={"x": 1}), "`training_args` must be a TrainingArguments"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_input_is_one_clear_error_and_writes_nothing(case, tmp_path):
    kwargs, match = CASES[case]
    kwargs = dict(kwargs)
    if "training_args_override" in kwargs:
        with pytest.raises(InvalidConfigError, match=match):
            autotune(
                tiny_bert(),
                classification_dataset(16),
                classification_dataset(8),
                n_trials=1,
                training_args=kwargs["training_args_override"],
                output_dir=tmp_path / "studies",
            )
    else:
        with pytest.raises(InvalidConfigError, match=match):
            _run(tmp_path, **kwargs)
    assert not (tmp_path / "studies").exists() or not any((tmp_path / "studies").iterdir())


def test_study_name_clash_with_other_metric(tmp_path):
    storage = f"sqlite:///{tmp_path}/clash.db"
    _run(tmp_path, storage=storage, study_name="s", space=SearchSpace(methods=("prune",), steps=(0, 0)))
    with pytest.raises(InvalidConfigError, match="Use another study_name"):
        autotune(
            tiny_llama(),
            lm_dataset(8),
            lm_dataset(8, seed=1),
            n_trials=1,
            storage=storage,
            study_name="s",
            training_args=tiny_training_args(str(tmp_path)),
            show_progress=False,
        )


@pytest.mark.parametrize(
    "make,match",
    [
        (lambda: SearchSpace(steps=(10, 5)), "`steps` range must have low <= high"),
        (lambda: SearchSpace(methods=()), "`methods` must name at least one method"),
        (lambda: SearchSpace(methods=("prune+bogus",)), "Unknown compression method 'bogus'"),
        (lambda: RecoveryConfig(steps=-1), "`recovery.steps` must be an integer >= 0, got -1"),
        (lambda: RecoveryConfig(distill_weight=2.0), "`recovery.distill_weight` must be in"),
        (lambda: RecoveryConfig(learning_rate=0), "`recovery.learning_rate` must be > 0"),
    ],
)
def test_space_and_recovery_validation(make, match):
    with pytest.raises(InvalidConfigError, match=match):
        make()


def test_callable_metric_must_return_a_number():
    metric = resolve_metric(lambda p, r: "high", CLASSIFICATION)
    with pytest.raises(InvalidConfigError, match="must return a number"):
        metric.compute([1], [1])
