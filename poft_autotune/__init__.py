"""poft_autotune: search compression and recovery fine-tuning together; get the size/accuracy front."""

from poft_autotune.autotune import autotune
from poft_autotune.compression import (
    CompressedModel,
    CompressionConfig,
    available_methods,
    compress_,
    register_method,
)
from poft_autotune.compression.prune import NMConfig, PruneConfig
from poft_autotune.compression.quantize import QuantizeConfig
from poft_autotune.errors import InvalidConfigError, MissingDependencyError, PoftError, TrialFailedError
from poft_autotune.export import export_model, load_pretrained
from poft_autotune.pareto import ParetoFront, ParetoPoint
from poft_autotune.recovery import CompressionCallback, RecoveryTrainer
from poft_autotune.search import RecoveryConfig, SearchSpace, TrialPlan, TrialResult, run_trial
from poft_autotune.search.agent import AgentPolicy, CallablePolicy
from poft_autotune.search.policy import Constraints, Policy, Proposal, available_policies, register_policy
from poft_autotune.search.stopping import EarlyStopping
from poft_autotune.size import checkpoint_size

__all__ = [
    "AgentPolicy",
    "CallablePolicy",
    "CompressedModel",
    "CompressionCallback",
    "CompressionConfig",
    "Constraints",
    "EarlyStopping",
    "InvalidConfigError",
    "MissingDependencyError",
    "NMConfig",
    "ParetoFront",
    "ParetoPoint",
    "PoftError",
    "Policy",
    "Proposal",
    "PruneConfig",
    "QuantizeConfig",
    "RecoveryConfig",
    "RecoveryTrainer",
    "SearchSpace",
    "TrialFailedError",
    "TrialPlan",
    "TrialResult",
    "autotune",
    "available_methods",
    "available_policies",
    "checkpoint_size",
    "compress_",
    "export_model",
    "load_pretrained",
    "register_method",
    "register_policy",
    "run_trial",
]
