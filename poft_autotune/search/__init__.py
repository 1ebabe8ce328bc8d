"""The search: plans, the search space, and running one trial."""

from poft_autotune.search.objective import TrialContext, TrialResult, run_trial
from poft_autotune.search.space import RecoveryConfig, SearchSpace, TrialPlan, suggest_plan

__all__ = ["RecoveryConfig", "SearchSpace", "TrialContext", "TrialPlan", "TrialResult", "run_trial", "suggest_plan"]
