"""Data preparation and metrics: raw text through a tokenizer loaded with the model, offline metrics."""

import textwrap

import datasets
import numpy as np
import optuna
import pytest

from poft_autotune import SearchSpace, autotune
from poft_autotune.data import CLASSIFICATION, resolve_metric
from poft_autotune.testing import REVIEW_WORDS, save_tiny_text_classifier, tiny_training_args

WORDS = REVIEW_WORDS


def _reviews(n, seed):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, n)
    texts = [" ".join(["the", "film", "was", "very", *rng.choice(WORDS[:4] if y else WORDS[4:8], 3)]) for y in labels]
    return datasets.Dataset.from_dict({"review": texts, "sentiment": labels.tolist()})


def test_model_path_with_raw_text_and_local_evaluate_module(tmp_path):
    model_dir = tmp_path / "model"
    save_tiny_text_classifier(model_dir)
    module = tmp_path / "my_accuracy.py"
    module.write_text(
        textwrap.dedent(
            """
            import datasets
            import evaluate

            class MyAccuracy(evaluate.Metric):
                def _info(self):
                    return evaluate.MetricInfo(
                        description="accuracy", citation="", inputs_description="",
                        features=datasets.Features({"predictions": datasets.Value("int64"),
                                                    "references": datasets.Value("int64")}),
                    )

                def _compute(self, predictions, references):
                    return {"my_accuracy": sum(p == r for p, r in zip(predictions, references)) / len(references)}
            """
        )
    )
    front = autotune(
        str(model_dir),
        _reviews(48, 0),
        _reviews(24, 1),
        metric=str(module),
        text_column="review",
        label_column="sentiment",
        n_trials=2,
        space=SearchSpace(methods=("quantize",), steps=(2, 3)),
        training_args=tiny_training_args(str(tmp_path / "args")),
        output_dir=tmp_path / "studies",
        show_progress=False,
    )
    study = optuna.load_study(study_name="poft", storage=f"sqlite:///{tmp_path}/studies/poft.db")
    assert study.metric_names == ["size_bytes", "my_accuracy"]
    assert len(study.trials) == 3 and all(t.state == optuna.trial.TrialState.COMPLETE for t in study.trials)
    assert front.metric_name == "my_accuracy" and len(front) >= 1


@pytest.mark.parametrize(
    "name,pred,ref,expected",
    [
        ("accuracy", [1, 0, 1, 1], [1, 1, 1, 0], 0.5),
        ("f1", [1, 0, 1, 1], [1, 1, 1, 0], 2 * 2 / (2 * 2 + 1 + 1)),
        ("matthews_correlation", [1, 0, 1, 0], [1, 0, 1, 0], 1.0),
        ("matthews_correlation", [1, 0, 1, 0], [0, 1, 0, 1], -1.0),
    ],
)
def test_builtin_metrics_offline(name, pred, ref, expected):
    metric = resolve_metric(name, CLASSIFICATION)
    assert metric.greater_is_better and metric.name == name
    assert metric.compute(np.array(pred), np.array(ref)) == pytest.approx(expected)


def test_callable_metric_and_direction():
    def error_rate(p, r):
        return {"error_rate": float(np.mean(p != r))}

    metric = resolve_metric(error_rate, CLASSIFICATION, greater_is_better=False)
    assert metric.name == "error_rate" and not metric.greater_is_better
    assert metric.compute(np.array([1, 0]), np.array([1, 1])) == 0.5
