"""Callbacks that keep compression invariants while the Trainer runs its own loop.

Order per optimizer step in the Trainer: backward (pruned gradients already masked by tensor hooks)
-> gradient clipping -> ``on_pre_optimizer_step`` -> ``optimizer.step`` -> ``on_optimizer_step``.

Data parallel (``torchrun`` / ``accelerate launch``, DDP): every rank runs these callbacks on its own
replica. The mask hook is a post-accumulate-grad hook, which runs before DDP's reducer copies the
gradient into its all-reduce bucket, so each rank contributes masked gradients and the average is
masked too; after the step every rank re-quantizes the same latent from the same averaged gradient.
Masks and latents are the callback's own state: they are synchronised from rank 0 once at the start of
training and then left out of DDP's per-forward buffer broadcast (which would otherwise send a
full-precision copy of every compressed weight before each forward pass).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from poft_autotune.compression.base import (
    compressed_layers,
    ensure_mask_hook_,
    get_mask,
    get_quant,
    master_weight,
    refresh_,
)

_OWN_BUFFERS = ("poft_mask", "poft_latent")


def _swap(layer: nn.Module) -> None:
    latent = master_weight(layer)  # type: ignore[arg-type]
    layer.poft_latent = layer.weight.data
    layer.weight.data = latent


class CompressionCallback(TrainerCallback):
    """Keep pruned weights at zero and quantized weights on their grid, with a straight-through update.

    Quantized layers: just before ``optimizer.step`` the latent full-precision weight is swapped into
    the parameter, so AdamW (weight decay included) updates the latent using the gradient taken at the
    quantized weight; right after, the parameter is re-projected onto the grid. One quantization per
    optimizer step, none per forward. Pruned layers: gradients are masked at backward time by the hook
    ``set_mask_`` installed, so the pruned entries and their AdamW moments stay exactly 0; the mask is
    re-applied after the step regardless, as a guard against optimizers that move zero-gradient weights.
    """

    def __init__(self, model: nn.Module) -> None:
        self._layers = list(compressed_layers(model).values())
        self._quantized = [layer for layer in self._layers if get_quant(layer) is not None]
        self._masked_only = [
            layer for layer in self._layers if get_quant(layer) is None and get_mask(layer) is not None
        ]
        # Read by DDP when the Trainer wraps ``model`` (names relative to it), ignored otherwise.
        own = [f"{name}.{buffer}" for name, layer in compressed_layers(model).items() for buffer in _OWN_BUFFERS]
        ignored = set(getattr(model, "_ddp_params_and_buffers_to_ignore", ()))
        names = dict(model.named_buffers())
        ignored |= {name for name in own if name in names}
        torch.nn.parallel.DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, sorted(ignored))

    def on_train_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        if args.world_size > 1 and dist.is_available() and dist.is_initialized():
            self._sync_from_rank0()
        for layer in self._layers:  # weights made trainable after compression still get their hooks
            ensure_mask_hook_(layer)

    def _sync_from_rank0(self) -> None:
        """Make every rank's masks and latents rank 0's (DDP synchronised the weights themselves).

        Ranks compress identical copies, but a data-aware method (e.g. Wanda's calibration forward passes)
        may round differently on different devices; one broadcast rules that out for the whole run.
        """
        with torch.no_grad():
            for layer in self._layers:
                for buffer in _OWN_BUFFERS:
                    tensor = layer._buffers.get(buffer)
                    if tensor is not None:
                        dist.broadcast(tensor, src=0)
                refresh_(layer)

    def on_pre_optimizer_step(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        # Swap storage instead of copying: the parameter now holds the latent, the buffer the grid copy.
        for layer in self._quantized:
            if layer.weight.requires_grad:
                _swap(layer)

    def on_optimizer_step(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        with torch.no_grad():
            for layer in self._quantized:
                if layer.weight.requires_grad:
                    _swap(layer)  # the updated latent goes back to the buffer ...
                    refresh_(layer)  # ... and its projection onto the grid into the parameter
            for layer in self._masked_only:
                mask = get_mask(layer)
                if mask is not None:
                    layer.weight.data.mul_(mask)


class NonFiniteLossCallback(TrainerCallback):
    """Stop training as soon as a logged loss is NaN or infinite; the trial is then recorded as failed."""

    def __init__(self) -> None:
        self.bad_loss: float | None = None

    def on_log(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        logs: dict[str, float] | None = None,
        **kwargs: Any,
    ) -> None:
        loss = (logs or {}).get("loss")
        if loss is not None and not torch.isfinite(torch.tensor(float(loss))):
            self.bad_loss = float(loss)
            control.should_training_stop = True


class EvaluationCallback(TrainerCallback):
    """Evaluate the model after the given optimizer steps and hand the number to ``report``.

    ``report`` may raise (``optuna.TrialPruned`` from early stopping): the exception ends ``train()``.
    The weights evaluated are the shipped values (``.weight`` always holds them), so the curve is of the
    model as it would ship at that step (LoRA adapters unmerged).
    """

    def __init__(
        self, steps: Sequence[int], evaluate: Callable[[nn.Module], float], report: Callable[[int, float], None]
    ) -> None:
        self.steps = set(steps)
        self.evaluate = evaluate
        self.report = report

    def on_step_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any) -> None:
        if state.global_step in self.steps:
            self.report(state.global_step, self.evaluate(kwargs["model"]))
