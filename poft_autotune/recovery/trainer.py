"""RecoveryTrainer: the Hugging Face Trainer with a distillation term in ``compute_loss``, nothing else.

Everything that must happen around optimizer steps (masks, quantization grid) goes through callbacks
(``recovery/callbacks.py``); the Trainer's own loop is never copied or overridden.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import Trainer

from poft_autotune.errors import InvalidConfigError


def distillation_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    temperature: float,
    attention_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """``T^2 * KL(softmax(teacher / T) || softmax(student / T))``, averaged over positions.

    Logits are ``[batch, classes]`` or ``[batch, seq, vocab]``; for the latter, positions where
    ``attention_mask`` is 0 (padding) are left out of the average. The ``T^2`` factor keeps gradient
    magnitudes comparable across temperatures (Hinton et al., 2015).
    """
    vocab = student_logits.shape[-1]
    s = F.log_softmax(student_logits.float().reshape(-1, vocab) / temperature, dim=-1)
    t = F.log_softmax(teacher_logits.float().reshape(-1, vocab) / temperature, dim=-1)
    per_position = (t.exp() * (t - s)).sum(dim=-1)
    if attention_mask is not None and student_logits.dim() == 3:
        keep = attention_mask.reshape(-1).to(per_position.dtype)
        per_position = per_position * keep
        return temperature**2 * per_position.sum() / keep.sum().clamp_min(1)
    return temperature**2 * per_position.mean()


_CACHEABLE_INPUTS = {"input_ids", "attention_mask"}


class TeacherCache:
    """Teacher logits of training rows, kept across the trials of a worker: a row seen again costs no
    teacher forward.

    Rows are keyed by their tokens (the ``input_ids`` where ``attention_mask`` is 1), so no row index is
    needed and the Trainer's shuffling does not matter. Valid while the teacher and the data stay fixed,
    which holds for one worker's base model (the teacher is never trained). Logits are kept unpadded, in
    the teacher's dtype, up to ``max_bytes``; beyond that new rows are not stored. A batch whose rows are
    all cached skips the teacher; any other batch runs it and stores its new rows.

    Cached logits come from the batch a row was first seen in, so they differ from a fresh forward only
    by the float rounding of another padded length (measured: equal to ~1e-6 relative). Batches must be
    right-padded (``PadCollator``) and hold only ``input_ids``/``attention_mask`` besides labels; others
    bypass the cache. Example::

        cache = TeacherCache(max_bytes=256 * 2**20)
        trainer = RecoveryTrainer(..., teacher=dense, distill_weight=0.5, teacher_cache=cache)
    """

    def __init__(self, max_bytes: int = 512 * 2**20) -> None:
        if not isinstance(max_bytes, int) or isinstance(max_bytes, bool) or max_bytes < 0:
            raise InvalidConfigError(f"`max_bytes` must be an integer >= 0, got {max_bytes!r}.")
        self.max_bytes = max_bytes
        self.nbytes = 0
        self.hits = 0  # rows served from the cache
        self.misses = 0  # rows the teacher computed
        self._rows: dict[bytes, torch.Tensor] = {}

    def __len__(self) -> int:
        return len(self._rows)

    def logits(self, teacher: nn.Module, inputs: dict[str, Any]) -> torch.Tensor:
        """The teacher's logits for the batch ``inputs`` (model inputs, no labels), from the cache if it can."""
        ids = inputs["input_ids"]
        if set(inputs) - _CACHEABLE_INPUTS or ids.dim() != 2:
            return teacher(**inputs).logits
        mask = inputs.get("attention_mask")
        keep = torch.ones_like(ids, dtype=torch.bool) if mask is None else mask.bool()
        ids_cpu, keep_cpu = ids.cpu(), keep.cpu()
        keys = [row[k].numpy().tobytes() for row, k in zip(ids_cpu, keep_cpu, strict=True)]
        cached = [self._rows.get(key) for key in keys]
        if all(c is not None for c in cached):
            self.hits += len(keys)
            return self._assemble(cached, keep)  # type: ignore[arg-type]
        logits = teacher(**inputs).logits
        self.misses += len(keys)
        for i, (key, hit) in enumerate(zip(keys, cached, strict=True)):
            if hit is None:
                row = logits[i][keep[i]] if logits.dim() == 3 else logits[i]
                size = row.numel() * row.element_size()
                if self.nbytes + size <= self.max_bytes:
                    self._rows[key] = row.detach().clone()
                    self.nbytes += size
        return logits

    @staticmethod
    def _assemble(rows: list[torch.Tensor], keep: torch.Tensor) -> torch.Tensor:
        if rows[0].dim() == 1:  # sequence classification: one row of logits per example
            return torch.stack(rows).to(keep.device)
        # Causal LM: per-token logits back at their positions; padding positions get zeros, which the
        # distillation loss leaves out (it averages over attention_mask == 1 only).
        out = rows[0].new_zeros((*keep.shape, rows[0].shape[-1]), device=keep.device)
        for i, row in enumerate(rows):
            out[i][keep[i]] = row.to(keep.device)
        return out


class RecoveryTrainer(Trainer):
    """Trainer whose loss is ``(1 - w) * task + w * distillation`` when a teacher is given.

    The convex combination keeps the loss scale (and so the useful learning rate) about the same for
    every distillation weight ``w``, which matters because the search tunes both at once. With a
    ``teacher_cache`` (:class:`TeacherCache`) rows seen before by this worker skip the teacher forward.

    Example::

        trainer = RecoveryTrainer(model=student, args=args, train_dataset=ds, teacher=dense,
                                  distill_weight=0.5, temperature=2.0, callbacks=[CompressionCallback(student)])
    """

    def __init__(
        self,
        *args: Any,
        teacher: nn.Module | None = None,
        distill_weight: float = 0.0,
        temperature: float = 1.0,
        teacher_cache: TeacherCache | None = None,
        **kwargs: Any,
    ) -> None:
        if not 0.0 <= distill_weight <= 1.0:
            raise InvalidConfigError(f"`distill_weight` must be in [0, 1], got {distill_weight!r}.")
        if temperature <= 0:
            raise InvalidConfigError(f"`temperature` must be > 0, got {temperature!r}.")
        if distill_weight > 0 and teacher is None:
            raise InvalidConfigError("`distill_weight` > 0 needs a `teacher` model (the uncompressed model).")
        super().__init__(*args, **kwargs)
        self.teacher = teacher if distill_weight > 0 else None
        self.distill_weight = distill_weight
        self.temperature = temperature
        self.teacher_cache = teacher_cache
        if self.teacher is not None:
            # Its forward runs under no_grad; its requires_grad flags are left as the caller set them.
            self.teacher.eval()
            self.teacher.to(self.args.device)

    def compute_loss(
        self,
        model: nn.Module,
        inputs: dict[str, Any],
        return_outputs: bool = False,
        num_items_in_batch: torch.Tensor | int | None = None,
    ) -> torch.Tensor | tuple[torch.Tensor, Any]:
        if self.teacher is None:
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        task_loss, outputs = super().compute_loss(model, inputs, True, num_items_in_batch)
        model_inputs = {k: v for k, v in inputs.items() if k != "labels"}
        with torch.no_grad():
            if self.teacher_cache is not None:
                teacher_logits = self.teacher_cache.logits(self.teacher, model_inputs)
            else:
                teacher_logits = self.teacher(**model_inputs).logits
        kd = distillation_loss(outputs.logits, teacher_logits, self.temperature, inputs.get("attention_mask"))
        # The task loss may already be normalised over the whole accumulated batch (then the Trainer
        # won't divide by the accumulation steps); the KD term is a per-batch mean, so scale it the same way.
        task_is_scaled = (
            self.loss_is_scaled_for_ga
            if self.loss_is_scaled_for_ga is not None
            else (self.model_accepts_loss_kwargs and num_items_in_batch is not None)
            or self.compute_loss_func is not None
        )
        if task_is_scaled:
            kd = kd / self.current_gradient_accumulation_steps
        loss = (1.0 - self.distill_weight) * task_loss + self.distill_weight * kd
        return (loss, outputs) if return_outputs else loss
