"""Dominance-based early stopping, constraints and promotion: by construction, and in a real autotune run."""

from __future__ import annotations

import optuna
import pytest
from transformers import Trainer

from poft_autotune import PruneConfig, QuantizeConfig, RecoveryConfig, SearchSpace, TrialPlan, autotune
from poft_autotune.data import CAUSAL_LM, PadCollator
from poft_autotune.errors import InvalidConfigError
from poft_autotune.pareto import PLAN_ATTR, RESULT_ATTR
from poft_autotune.search.objective import TrialResult
from poft_autotune.search.policy import CURVE_ATTR, PRUNED_ATTR, Constraints, Proposal, StudyView
from poft_autotune.search.stopping import DominanceMonitor, EarlyStopping, promotion
from poft_autotune.testing import lm_dataset, tiny_llama, tiny_training_args

optuna.logging.set_verbosity(optuna.logging.WARNING)
SPACE = SearchSpace(methods=("quantize", "prune"), steps=(10, 100), learning_rate=(1e-5, 1e-3))


def _add(study, size, metric, steps=0, compression=()):
    plan = TrialPlan(compression, RecoveryConfig(steps=steps))
    result = TrialResult(size, {}, "accuracy", True, 0.9, metric, metric, steps, {})
    study.add_trial(
        optuna.trial.create_trial(
            values=[size, metric], user_attrs={PLAN_ATTR: plan.to_dict(), RESULT_ATTR: result.to_dict()}
        )
    )


def _study_with_front():
    study = optuna.create_study(directions=["minimize", "maximize"])
    _add(study, 1000, 0.9)  # dense
    _add(study, 100, 0.88, steps=20, compression=(QuantizeConfig(bits=4),))  # the front point to beat
    return study


def _monitor(study, rule, constraints=None):
    constraints = constraints or Constraints()
    trial = study.ask()

    def view():
        return StudyView.read(
            study,
            SPACE,
            dense_metric=0.9,
            dense_size=1000,
            greater_is_better=True,
            budget_left=5,
            budget_total=5,
            constraints=constraints,
        )

    return trial, DominanceMonitor(trial, rule, view, constraints)


RULE = EarlyStopping(checks=3, min_steps=1, margin=0.0)


def test_eval_steps_are_evenly_spaced_and_skip_the_last():
    assert RULE.eval_steps(100) == [25, 50, 75]
    assert EarlyStopping(checks=3, min_steps=30).eval_steps(100) == [50, 75]
    assert EarlyStopping(checks=0).eval_steps(100) == []


def test_dominated_trial_is_stopped_with_its_curve_and_reason():
    study = _study_with_front()
    trial, monitor = _monitor(study, RULE)
    assert monitor.eval_steps(100) == [25, 50, 75]
    monitor.start(150)  # larger than the front point
    monitor.report(0, 0.5)
    with pytest.raises(optuna.TrialPruned, match="front trial 1"):
        monitor.report(25, 0.55)  # +0.002/step -> at most 0.55 + 75 * 0.002 = 0.70 < 0.88
    frozen = study.trials[trial.number]
    assert frozen.user_attrs[CURVE_ATTR] == [[0, 0.5], [25, 0.55]]
    assert "projects to at most 0.7" in frozen.user_attrs[PRUNED_ATTR]


def test_trial_that_can_still_reach_the_front_is_kept():
    study = _study_with_front()
    _, smaller = _monitor(study, RULE)
    smaller.eval_steps(100)
    smaller.start(50)  # smaller than every front point: nothing dominates it, however low it is
    smaller.report(0, 0.3)
    smaller.report(25, 0.31)
    _, steep = _monitor(study, RULE)
    steep.eval_steps(100)
    steep.start(150)
    steep.report(0, 0.5)
    steep.report(25, 0.8)  # +0.012/step: could still pass 0.88
    steep.report(50, 0.87)


def test_margin_protects_against_noise():
    study = _study_with_front()
    _, monitor = _monitor(study, EarlyStopping(checks=3, min_steps=1, margin=0.05))
    monitor.eval_steps(100)
    monitor.start(150)
    monitor.report(0, 0.85)
    monitor.report(25, 0.85)  # flat at 0.85; 0.85 + 0.05 * 0.9 = 0.895 > 0.88: kept


def test_constraints_stop_oversized_plans_and_hopeless_ones():
    study = _study_with_front()
    _, oversized = _monitor(study, RULE, Constraints(max_size_bytes=120))
    with pytest.raises(optuna.TrialPruned, match="over max_size_bytes=120"):
        oversized.start(150)
    _, hopeless = _monitor(study, RULE, Constraints(min_retained=0.95))
    hopeless.eval_steps(100)
    hopeless.start(50)
    hopeless.report(0, 0.5)
    with pytest.raises(optuna.TrialPruned, match="below min_retained=0.95"):
        hopeless.report(25, 0.52)
    with pytest.raises(InvalidConfigError, match="max_size_bytes"):
        Constraints(max_size_bytes=0)
    with pytest.raises(InvalidConfigError, match="min_retained"):
        Constraints(min_retained=-1)


def test_promotion_reruns_short_front_points_at_full_budget():
    study = _study_with_front()
    view = StudyView.read(
        study, SPACE, dense_metric=0.9, dense_size=1000, greater_is_better=True, budget_left=1, budget_total=5
    )
    proposal = promotion(view, 100)
    assert proposal is not None and proposal.kind == "promote" and proposal.parent == 1
    assert proposal.plan.recovery.steps == 100 and proposal.plan.compression == (QuantizeConfig(bits=4),)


class Scripted:
    """A policy object that proposes a fixed list of plans (then leaves trials to its sampler)."""

    name = "scripted"

    def __init__(self, plans):
        self.plans = plans

    def sampler(self, seed):
        return optuna.samplers.RandomSampler(seed=seed)

    def propose(self, view):
        done = len(view.records) - 1  # minus the dense trial
        if done < len(self.plans):
            return Proposal(self.plans[done], f"scripted plan {done}", kind="scripted")
        return None


@pytest.fixture(scope="module")
def pretrained():
    train, evaluation = lm_dataset(64), lm_dataset(32, seed=1)
    model = tiny_llama()
    args = tiny_training_args("/tmp/poft-stopping-pre", max_steps=40, learning_rate=3e-3)
    Trainer(model=model, args=args, train_dataset=train, data_collator=PadCollator(0, CAUSAL_LM)).train()
    return model.eval(), train, evaluation


def test_autotune_stops_a_dominated_recovery_for_real(pretrained, tmp_path):
    model, train, evaluation = pretrained
    int8 = TrialPlan((QuantizeConfig(bits=8, group_size=None),), RecoveryConfig(steps=0))
    # Pruning 30 % costs perplexity, and a learning rate of 1e-12 cannot win it back: its curve stays flat.
    frozen = TrialPlan((PruneConfig(sparsity=0.3),), RecoveryConfig(steps=12, learning_rate=1e-12))
    autotune(
        model,
        train,
        evaluation,
        n_trials=2,
        space=SearchSpace(methods=("quantize", "prune"), steps=(4, 12)),
        policy=Scripted([int8, frozen]),
        early_stopping=EarlyStopping(checks=2, min_steps=1, margin=0.0),
        promote=False,
        study_name="stop",
        output_dir=tmp_path,
        show_progress=False,
        training_args=tiny_training_args(str(tmp_path / "out")),
    )
    study = optuna.load_study(study_name="stop", storage=f"sqlite:///{tmp_path}/stop.db")
    probe, stopped = study.trials[1], study.trials[2]
    assert probe.state == optuna.trial.TrialState.COMPLETE
    curve = stopped.user_attrs[CURVE_ATTR]
    assert probe.values[1] < curve[0][1], "premise: int8 keeps perplexity below 30 % pruning's"
    assert stopped.state == optuna.trial.TrialState.PRUNED
    assert [s for s, _ in curve] == [0, 4], "stopped at the first check (steps 4 of 12), never trained on"
    assert f"front trial {probe.number}" in stopped.user_attrs[PRUNED_ATTR]
    assert stopped.user_attrs["rationale"] == "scripted plan 1"
    assert not (tmp_path / "stop" / "checkpoints" / "trial-2").exists()


def test_autotune_constraints_keep_the_front_feasible(pretrained, tmp_path):
    model, train, evaluation = pretrained
    plans = [
        TrialPlan((QuantizeConfig(bits=8, group_size=None),), RecoveryConfig(steps=0)),
        TrialPlan((PruneConfig(sparsity=0.3),), RecoveryConfig(steps=0)),  # sparse layout: over the limit
        TrialPlan((QuantizeConfig(bits=4, group_size=None),), RecoveryConfig(steps=0)),
    ]
    dense_size = sum(p.numel() * 4 for p in model.state_dict().values())
    front = autotune(
        model,
        train,
        evaluation,
        n_trials=3,
        space=SearchSpace(methods=("quantize", "prune"), steps=(4, 12)),
        policy=Scripted(plans),
        max_size_bytes=dense_size // 2,
        promote=False,
        study_name="limits",
        output_dir=tmp_path,
        show_progress=False,
        training_args=tiny_training_args(str(tmp_path / "out")),
    )
    study = optuna.load_study(study_name="limits", storage=f"sqlite:///{tmp_path}/limits.db")
    assert study.trials[2].state == optuna.trial.TrialState.PRUNED
    assert "over max_size_bytes" in study.trials[2].user_attrs[PRUNED_ATTR]
    assert len(front) >= 1 and all(p.size_bytes <= dense_size // 2 for p in front), "the dense model is infeasible"
    with pytest.raises(InvalidConfigError, match="constraints"):
        autotune(
            model,
            train,
            evaluation,
            n_trials=1,
            space=SearchSpace(methods=("quantize",), steps=(4, 12)),
            max_size_bytes=dense_size,
            study_name="limits",
            output_dir=tmp_path,
            show_progress=False,
            training_args=tiny_training_args(str(tmp_path / "out")),
        )
