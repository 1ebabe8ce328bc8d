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
from poft_autotune.size import checkpoint_size

__all__ = [
    "CompressedModel",
    "CompressionCallback",
    "CompressionConfig",
    "InvalidConfigError",
    "MissingDependencyError",
    "NMConfig",
    "ParetoFront",
    "ParetoPoint",
    "PoftError",
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
    "checkpoint_size",
    "compress_",
    "export_model",
    "load_pretrained",
    "register_method",
    "run_trial",
]
