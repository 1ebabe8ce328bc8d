"""Recovery fine-tuning: the Trainer subclass and the callbacks that keep compression invariants."""

from poft_autotune.recovery.callbacks import CompressionCallback, EvaluationCallback, NonFiniteLossCallback
from poft_autotune.recovery.trainer import RecoveryTrainer, TeacherCache, distillation_loss

__all__ = [
    "CompressionCallback",
    "EvaluationCallback",
    "NonFiniteLossCallback",
    "RecoveryTrainer",
    "TeacherCache",
    "distillation_loss",
]
