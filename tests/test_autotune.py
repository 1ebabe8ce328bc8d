"""End-to-end: autotune on a tiny Llama and a tiny BERT; the front is honest and rebuildable."""

import optuna
import pytest
from transformers import Trainer

from poft_autotune import ParetoFront, SearchSpace, TrialPlan, autotune, run_trial
from poft_autotune.autotune import DENSE_ATTR
from poft_autotune.data import CAUSAL_LM, CLASSIFICATION, PadCollator, prepare_dataset, resolve_metric
from poft_autotune.pareto import PLAN_ATTR, RESULT_ATTR
from poft_autotune.search.objective import TrialContext
from poft_autotune.size import checkpoint_size
from poft_autotune.testing import classification_dataset, lm_dataset, tiny_bert, tiny_llama, tiny_training_args

SPACE = SearchSpace(methods=("quantize", "prune", "nm", "prune+quantize"), steps=(2, 6), learning_rate=(1e-4, 3e-3))


def _pretrained(model, data, task, tmp_path, steps=40):
    """Train the tiny model a little first, so that compression has something to lose."""
    args = tiny_training_args(str(tmp_path / "pre"), max_steps=steps, learning_rate=3e-3)
    Trainer(model=model, args=args, train_dataset=data, data_collator=PadCollator(0, task)).train()
    return model.eval()


@pytest.fixture(scope="module")
def llama_study(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("llama")
    train, evaluation = lm_dataset(64), lm_dataset(32, seed=1)
    model = _pretrained(tiny_llama(), train, CAUSAL_LM, tmp)
    storage = f"sqlite:///{tmp}/study.db"
    front = autotune(
        model,
        train,
        evaluation,
        n_trials=5,
        space=SPACE,
        storage=storage,
        study_name="llama",
        training_args=tiny_training_args(str(tmp / "out")),
        output_dir=tmp,
        show_progress=False,
    )
    return model, train, evaluation, storage, front, tmp


def _non_dominated(points, greater):
    def better_or_equal(a, b):
        ma, mb = (a[1], b[1]) if greater else (-a[1], -b[1])
        return a[0] <= b[0] and ma >= mb

    return [p for p in points if not any(better_or_equal(q, p) and q != p for q in points)]


def _check_front(front, study):
    complete = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    values = [(t.values[0], t.values[1]) for t in complete]
    expected = sorted(set(_non_dominated(values, front.greater_is_better)))
    assert sorted(set((p.size_bytes, p.metric) for p in front)) == expected
    assert [p.size_bytes for p in front] == sorted(p.size_bytes for p in front)
    for trial in complete:
        assert PLAN_ATTR in trial.user_attrs and RESULT_ATTR in trial.user_attrs
        result = trial.user_attrs[RESULT_ATTR]
        assert trial.values[0] == result["size_bytes"] and trial.values[1] == result["recovered_metric"]


def test_llama_front_is_non_dominated_and_rebuilt_from_storage(llama_study):
    model, _, _, storage, front, tmp = llama_study
    study = optuna.load_study(study_name="llama", storage=storage)
    assert len(study.trials) == 6  # dense + 5
    assert study.metric_names == ["size_bytes", "perplexity"]
    assert study.directions[1] == optuna.study.StudyDirection.MINIMIZE
    _check_front(front, study)
    rebuilt = ParetoFront.from_study(study)
    assert rebuilt.to_json() == front.to_json()
    assert (tmp / "llama" / "front.json").exists() and "| trial |" in (tmp / "llama" / "report.md").read_text()
    dense = study.trials[0]
    assert dense.user_attrs[PLAN_ATTR]["compression"] == []
    assert dense.values[0] == checkpoint_size(model).total
    assert study.user_attrs[DENSE_ATTR]["metric"] == dense.values[1]
    assert any(p.size_bytes < dense.values[0] for p in front), "no compressed point reached the front"


def test_llama_numbers_match_rerunning_the_stored_plan(llama_study, tmp_path):
    model, train, evaluation, storage, front, _ = llama_study
    study = optuna.load_study(study_name="llama", storage=storage)
    metric = resolve_metric(None, CAUSAL_LM)
    context = TrialContext(
        base_model=model,
        train_dataset=prepare_dataset(train, CAUSAL_LM),
        eval_dataset=prepare_dataset(evaluation, CAUSAL_LM),
        metric=metric,
        collator=PadCollator(0, CAUSAL_LM),
        training_args=tiny_training_args(str(tmp_path)),
        dense_metric=study.user_attrs[DENSE_ATTR]["metric"],
    )
    point = next(p for p in front if not p.is_dense)
    again = run_trial(TrialPlan.from_dict(point.plan), context)
    assert again.size_bytes == point.size_bytes
    assert again.compressed_metric == pytest.approx(point.result["compressed_metric"], rel=1e-5)
    assert again.recovered_metric == pytest.approx(point.metric, rel=1e-4)
    # The stored params replay to the same plan through the search space.
    from poft_autotune.search.space import suggest_plan

    trial = study.trials[point.trial_number]
    replay = suggest_plan(optuna.trial.FixedTrial(trial.params), SPACE.fitted_to(model), seed=point.plan["seed"])
    assert replay.to_dict() == point.plan


def test_resume_adds_trials_without_reevaluating_dense(llama_study, monkeypatch):
    """n_trials is the study's total: a rerun with a larger budget adds the difference, the same budget nothing."""
    model, train, evaluation, storage, _, tmp = llama_study
    import sys

    module = sys.modules["poft_autotune.autotune"]  # the package attribute of that name is the function
    calls = []
    real = module.evaluate_model
    monkeypatch.setattr(module, "evaluate_model", lambda *a, **k: calls.append(1) or real(*a, **k))
    for _ in range(2):
        autotune(
            model,
            train,
            evaluation,
            n_trials=6,
            space=SPACE,
            storage=storage,
            study_name="llama",
            training_args=tiny_training_args(str(tmp / "out")),
            output_dir=tmp,
            show_progress=False,
        )
    study = optuna.load_study(study_name="llama", storage=storage)
    assert len(study.trials) == 7 and calls == []
    assert sum(1 for t in study.trials if not t.user_attrs[PLAN_ATTR]["compression"]) == 1


def test_bert_classifier_end_to_end(tmp_path):
    train, evaluation = classification_dataset(96), classification_dataset(48, seed=1)
    model = _pretrained(tiny_bert(), prepare_dataset(train, CLASSIFICATION), CLASSIFICATION, tmp_path, steps=60)
    front = autotune(
        model,
        train,
        evaluation,
        metric="accuracy",
        n_trials=4,
        space=SPACE,
        study_name="bert",
        training_args=tiny_training_args(str(tmp_path / "out")),
        output_dir=tmp_path,
        show_progress=False,
    )
    study = optuna.load_study(study_name="bert", storage=f"sqlite:///{tmp_path}/bert.db")
    assert study.directions[1] == optuna.study.StudyDirection.MAXIMIZE
    _check_front(front, study)
    dense_acc = study.user_attrs[DENSE_ATTR]["metric"]
    assert dense_acc > 0.7, "the pretrained tiny classifier should beat chance clearly"
    for trial in study.get_trials(states=[optuna.trial.TrialState.COMPLETE])[1:]:
        result = trial.user_attrs[RESULT_ATTR]
        assert 0 <= result["recovered_metric"] <= 1
        assert result["retained"] == pytest.approx(result["recovered_metric"] / dense_acc)
        assert result["size_bytes"] < study.trials[0].values[0]
        timed = {"compress_s", "eval_compressed_s"} | ({"eval_recovered_s"} if result["recovery_steps"] else set())
        assert set(result["timings"]) >= timed


def test_front_checkpoints_are_the_shipped_models(llama_study, tmp_path):
    """Bytes on disk == the front's size; the reloaded checkpoint reproduces the front's metric."""
    from poft_autotune.data import evaluate_model
    from poft_autotune.export import load_pretrained, weight_bytes
    from poft_autotune.pareto import CHECKPOINT_ATTR, export_trial

    _, _, evaluation, storage, _, tmp = llama_study
    study = optuna.load_study(study_name="llama", storage=storage)
    front = ParetoFront.from_study(study)
    metric = resolve_metric(None, CAUSAL_LM)
    data = prepare_dataset(evaluation, CAUSAL_LM)
    for point in front:
        assert point.checkpoint is not None
        assert weight_bytes(point.checkpoint) == point.size_bytes
        reloaded = load_pretrained(point.checkpoint)
        assert evaluate_model(reloaded, data, metric, PadCollator(0, CAUSAL_LM)) == pytest.approx(
            point.metric, rel=1e-4
        )
    # Only the front's checkpoints are kept (keep_checkpoints="front").
    kept = {p.name for p in (tmp / "llama" / "checkpoints").iterdir()}
    expected = {"trial-dense" if p.is_dense else f"trial-{p.trial_number}" for p in front}
    assert kept == expected
    target = front.export(front[0], tmp_path / "ship")
    assert weight_bytes(target) == front[0].size_bytes
    off_front = next(t for t in study.trials if t.number not in {p.trial_number for p in front})
    with pytest.raises(Exception, match="no kept checkpoint"):
        export_trial(study, off_front.number, tmp_path / "nope")
    with pytest.raises(Exception, match="has no trial 999"):
        export_trial(study, 999, tmp_path / "nope")
    assert all(CHECKPOINT_ATTR in t.user_attrs for t in study.trials if t.state.name == "COMPLETE")


def test_lora_plan_runs_and_ships_merged(llama_study, tmp_path):
    from poft_autotune import QuantizeConfig, RecoveryConfig
    from poft_autotune.export import load_pretrained, weight_bytes

    model, train, evaluation, storage, _, _ = llama_study
    study = optuna.load_study(study_name="llama", storage=storage)
    context = TrialContext(
        base_model=model,
        train_dataset=prepare_dataset(train, CAUSAL_LM),
        eval_dataset=prepare_dataset(evaluation, CAUSAL_LM),
        metric=resolve_metric(None, CAUSAL_LM),
        collator=PadCollator(0, CAUSAL_LM),
        training_args=tiny_training_args(str(tmp_path)),
        dense_metric=study.user_attrs[DENSE_ATTR]["metric"],
    )
    config = QuantizeConfig(bits=4, group_size=16)
    full = run_trial(TrialPlan((config,), RecoveryConfig(steps=4, learning_rate=1e-3)), context)
    lora = run_trial(
        TrialPlan((config,), RecoveryConfig(steps=4, learning_rate=1e-3, lora_rank=4)), context, tmp_path / "ck"
    )
    assert lora.size_bytes == full.size_bytes == weight_bytes(tmp_path / "ck")
    assert lora.recovered_metric != lora.compressed_metric  # the merged adapter changed the shipped model
    assert lora.unmerged_metric is not None and full.unmerged_metric is None
    assert not any("lora" in name for name in load_pretrained(tmp_path / "ck").state_dict())


def test_diverging_recovery_fails_the_trial_with_its_reason(tmp_path):
    from poft_autotune import QuantizeConfig, RecoveryConfig, TrialFailedError

    model = tiny_llama()
    model.model.embed_tokens.weight.data[5] = float("nan")  # every sequence of lm_dataset passes token 5
    train = prepare_dataset(lm_dataset(32), CAUSAL_LM)
    context = TrialContext(
        base_model=model,
        train_dataset=train,
        eval_dataset=train,
        metric=resolve_metric(None, CAUSAL_LM),
        collator=PadCollator(0, CAUSAL_LM),
        training_args=tiny_training_args(str(tmp_path)),
        dense_metric=10.0,
    )
    plan = TrialPlan((QuantizeConfig(bits=4, group_size=16),), RecoveryConfig(steps=3))
    with pytest.raises(TrialFailedError, match="recovery diverged"):
        run_trial(plan, context, tmp_path / "ck")
