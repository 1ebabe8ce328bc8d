"""The policy contract, for every registered policy, and the agent's behaviour, on replayed tables."""

from __future__ import annotations

import copy
import json

import optuna
import pytest
import torch

from poft_autotune.compression import compress_
from poft_autotune.errors import InvalidConfigError
from poft_autotune.search.agent import AgentPolicy, CallablePolicy
from poft_autotune.search.policy import (
    PARENT_ATTR,
    PRUNED_ATTR,
    RATIONALE_ATTR,
    Constraints,
    StudyView,
    ask_next,
    available_policies,
    get_policy,
    hypervolume,
)
from poft_autotune.search.replay import replay
from poft_autotune.search.space import SearchSpace
from poft_autotune.search.stopping import EarlyStopping
from poft_autotune.testing import synthetic_table, tiny_llama

optuna.logging.set_verbosity(optuna.logging.WARNING)

MODEL = tiny_llama()
CALIBRATION = [{"input_ids": torch.randint(1, 64, (4, 16))}]
SPACE = SearchSpace(
    methods=("quantize", "prune", "nm", "prune+quantize"),
    steps=(10, 60),
    learning_rate=(3e-5, 3e-4),
    distill_weight=(0.0, 0.5),
    lora_rank=(0, 4),
).fitted_to(MODEL)
TABLE = synthetic_table(SPACE)


def _plans(events):
    return [(e.plan.to_dict(), e.state) for e in events]


def _study(storage, name, policy):
    return optuna.create_study(
        storage=storage, study_name=name, directions=["minimize", "maximize"], sampler=policy.sampler(0)
    )


@pytest.mark.parametrize("name", available_policies())
def test_policy_proposes_valid_plans_deterministically(name):
    events = replay(get_policy(name), TABLE, SPACE, 16, seed=3, early_stopping=EarlyStopping())
    assert len(events) == 16
    for event in events:
        assert "+".join(c.method for c in event.plan.compression) in SPACE.methods
        compress_(copy.deepcopy(MODEL), event.plan.compression, calibration=CALIBRATION)  # applies to the model
        steps = event.plan.recovery.steps
        assert steps == 0 or SPACE.steps[0] <= steps <= SPACE.steps[1]
    again = replay(get_policy(name), TABLE, SPACE, 16, seed=3, early_stopping=EarlyStopping())
    assert _plans(again) == _plans(events)


@pytest.mark.parametrize("name", available_policies())
def test_policy_resumes_from_a_storage_with_trials(name, tmp_path):
    storage = f"sqlite:///{tmp_path}/s.db"
    first = replay(get_policy(name), TABLE, SPACE, 6, study=_study(storage, "s", get_policy(name)))
    fresh = get_policy(name)  # a new process: nothing but the storage carries over
    resumed = optuna.load_study(study_name="s", storage=storage, sampler=fresh.sampler(0))
    second = replay(fresh, TABLE, SPACE, 6, study=resumed)
    assert [e.number for e in first + second] == list(range(1, 13)), "numbering continues after trial 0 (dense)"
    stored = optuna.load_study(study_name="s", storage=storage)
    assert len(stored.trials) == 13
    if name == "agent":
        plans = [e.plan for e in first + second]
        assert not any(a.same_as(b) for i, a in enumerate(plans) for b in plans[:i]), "no plan proposed twice"


def test_agent_records_a_rationale_on_every_trial_and_works_like_an_expert():
    study = optuna.create_study(directions=["minimize", "maximize"])
    events = replay(AgentPolicy(), TABLE, SPACE, 40, study=study, early_stopping=EarlyStopping())
    kinds = [e.kind for e in events]
    assert kinds[0] == "probe" and events[0].plan.recovery.steps == 0, "cheap probes come first"
    first_combos = {"+".join(c.method for c in e.plan.compression) for e in events[: len(SPACE.methods)]}
    assert first_combos == set(SPACE.methods), "probes go round-robin over the methods"
    assert {"probe", "recover", "promote"} <= set(kinds)
    for trial in study.trials[1:]:
        assert trial.user_attrs[RATIONALE_ATTR], trial.number
    recovered = [t for t in study.trials if t.user_attrs.get("proposal") == "recover"]
    for trial in recovered:  # recovery is spent on a level that was probed first
        parent = study.trials[trial.user_attrs[PARENT_ATTR]]
        assert parent.user_attrs["plan"]["compression"] == trial.user_attrs["plan"]["compression"]
        assert parent.user_attrs["plan"]["recovery"]["steps"] == 0
    promoted = [t for t in study.trials if t.user_attrs.get("proposal") == "promote"]
    for trial in promoted:
        assert trial.user_attrs["plan"]["recovery"]["steps"] == SPACE.steps[1]
        parent = study.trials[trial.user_attrs[PARENT_ATTR]]
        assert 0 < parent.user_attrs["plan"]["recovery"]["steps"] < SPACE.steps[1]


def test_agent_respects_constraints():
    limit = int(0.2 * TABLE.dense_size)
    constraints = Constraints(max_size_bytes=limit, min_retained=0.9)
    study = optuna.create_study(directions=["minimize", "maximize"])
    events = replay(AgentPolicy(), TABLE, SPACE, 30, study=study, constraints=constraints)
    assert all(e.size_bytes <= limit for e in events if e.kind in ("recover", "tune", "promote"))
    over = [e for e in events if e.size_bytes > limit]
    assert over and all(e.state == "PRUNED" for e in over), "plans over the size limit stop before evaluation"
    for trial in study.best_trials:
        result = trial.user_attrs["result"]
        assert result["size_bytes"] <= limit and result["retained"] >= 0.9


def test_callable_policy_uses_valid_replies_and_falls_back_on_bad_ones():
    plan = {"compression": [{"method": "quantize", "bits": 4, "group_size": None}], "recovery": {"steps": 20}}
    outside = {"compression": [{"method": "quantize", "bits": 4, "group_size": 128}], "recovery": {"steps": 20}}
    replies = iter([json.dumps({"plan": plan, "rationale": "int4 is the usual sweet spot"}), "not json"])
    replies = iter([*replies, json.dumps({"plan": outside, "rationale": "group 128 is not offered"})])
    policy = CallablePolicy(lambda prompt: next(replies, "{}"))
    study = optuna.create_study(directions=["minimize", "maximize"])
    events = replay(policy, TABLE, SPACE, 3, study=study, promote=False)
    assert events[0].kind == "callable" and events[0].plan.label == "int4-ch"
    assert "int4 is the usual sweet spot" in study.trials[1].user_attrs[RATIONALE_ATTR]
    assert all(e.kind != "callable" for e in events[1:])
    assert "rejected" in study.trials[2].user_attrs[RATIONALE_ATTR]
    assert "outside the search space" in study.trials[3].user_attrs[RATIONALE_ATTR]


def test_policy_registry_errors():
    with pytest.raises(InvalidConfigError, match="Unknown policy 'bayes'.*agent"):
        get_policy("bayes")
    with pytest.raises(InvalidConfigError, match="`policy` must be"):
        get_policy(42)  # type: ignore[arg-type]
    with pytest.raises(InvalidConfigError, match="probe_share"):
        AgentPolicy(probe_share=0)


def test_hypervolume_by_hand():
    assert hypervolume([(0.25, 0.98), (0.5, 1.0)]) == pytest.approx(0.75 * 0.98 + 0.5 * 0.02)
    assert hypervolume([(0.5, 1.0), (0.25, 0.98), (0.6, 0.9)]) == pytest.approx(0.75 * 0.98 + 0.5 * 0.02)
    assert hypervolume([(1.2, 1.0)]) == 0.0


def test_concurrent_agents_never_run_a_plan_twice(tmp_path):
    """Two workers read the study at the same moment and propose the same plan: it runs once."""
    storage = f"sqlite:///{tmp_path}/shared.db"
    study_a = _study(storage, "shared", AgentPolicy())
    replay(AgentPolicy(), TABLE, SPACE, 2, study=study_a)  # some history
    study_b = optuna.load_study(study_name="shared", storage=storage)

    def view_of(study):
        return lambda: StudyView.read(
            study,
            SPACE,
            dense_metric=TABLE.dense_metric,
            dense_size=TABLE.dense_size,
            greater_is_better=True,
            budget_left=10,
            budget_total=10,
        )

    frozen = view_of(study_a)()  # both workers decide from the same snapshot
    a, b = AgentPolicy(), AgentPolicy()
    assert a.propose(frozen).plan.same_as(b.propose(frozen).plan)
    trial_a, plan_a = ask_next(study_a, SPACE, a, lambda: frozen)
    views = iter([frozen])  # worker b decides from the stale snapshot first, then reads the study again
    trial_b, plan_b = ask_next(study_b, SPACE, b, lambda: next(views, None) or view_of(study_b)())
    assert not plan_a.same_as(plan_b), "the second worker skipped the duplicate and took the next plan"
    skipped = [t for t in study_b.trials if str(t.user_attrs.get(PRUNED_ATTR, "")).startswith("duplicate of")]
    assert len(skipped) == 1 and f"duplicate of trial {trial_a.number}" in skipped[0].user_attrs[PRUNED_ATTR]
