"""poft_autotune.validate: what valid input passes, and how a study keeps its search space."""

import optuna
import pytest

from poft_autotune import InvalidConfigError, SearchSpace
from poft_autotune.testing import tiny_bert, tiny_llama
from poft_autotune.validate import SPACE_ATTR, check_space, check_study_space, describe_space


@pytest.mark.parametrize("make", [tiny_llama, tiny_bert])
def test_default_and_full_spaces_pass_on_tiny_models(make):
    model = make()
    assert check_space(SearchSpace().fitted_to(model), model) > 50  # every combination of choice ends
    everything = SearchSpace(methods=("structured+prune+quantize", "nm", "structured+nm")).fitted_to(model)
    assert check_space(everything, model) > 50


def test_check_space_names_the_first_plan_that_cannot_run():
    model = tiny_llama()  # Linear inputs of 32 and 64 features
    space = SearchSpace(methods=("prune", "nm+quantize"), choices={"quantize": {"group_size": [None, 24]}}).fitted_to(
        model
    )
    with pytest.raises(InvalidConfigError, match=r"method='nm\+quantize'.*quantize.group_size=24.*got group_size=24"):
        check_space(space, model)


def test_a_study_keeps_the_space_it_was_created_with():
    study = optuna.create_study(directions=["minimize", "maximize"])
    first = SearchSpace(methods=("prune",), steps=(2, 4))
    check_study_space(study, first)  # a new study records its space
    assert study.user_attrs[SPACE_ATTR] == describe_space(first)
    check_study_space(study, SearchSpace(methods=("prune",), steps=(2, 4)))  # the same space: resumes

    other = SearchSpace(methods=("prune",), steps=(2, 8))
    with pytest.raises(
        InvalidConfigError, match=r"another search space \(steps: \[2, 4\] -> \[2, 8\]\).*allow_space_change"
    ):
        check_study_space(study, other)
    assert study.user_attrs[SPACE_ATTR] == describe_space(first)  # refused: nothing recorded

    check_study_space(study, other, allow_change=True)
    assert study.user_attrs[SPACE_ATTR] == describe_space(other)


def test_a_study_from_before_spaces_were_recorded_adopts_the_current_one():
    study = optuna.create_study(directions=["minimize", "maximize"])
    study.add_trial(optuna.trial.create_trial(values=[1.0, 0.5]))
    check_study_space(study, SearchSpace())
    assert study.user_attrs[SPACE_ATTR] == describe_space(SearchSpace())
