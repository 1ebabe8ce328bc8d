"""LoRA recovery on a compressed base (QLoRA-style when the base is quantized), then the shipped form.

The adapters train on top of the frozen compressed weights (on their grid, masked). To ship, the
update is merged into the base and the result is projected back onto the compression: masks applied
again and weights re-quantized (scales recomputed from the merged weights). The trial evaluates that
merged, re-compressed model, never the adapter-augmented one.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from poft_autotune.compression.base import compressed_layers, refresh_, select_layers
from poft_autotune.data import CAUSAL_LM
from poft_autotune.errors import InvalidConfigError, MissingDependencyError


def attach_lora(model: nn.Module, task: str, rank: int, alpha: int | None = None, dropout: float = 0.0) -> nn.Module:
    """Wrap ``model`` with LoRA adapters of ``rank`` on its compressed Linear layers (peft).

    Targets the compressed layers, or the transformer-block Linear layers when nothing is compressed.
    The base weights are frozen; for classifiers the head stays trainable. Example::

        peft_model = attach_lora(model, "classification", rank=8)
    """
    try:
        from peft import LoraConfig, TaskType, get_peft_model
    except ImportError as exc:  # peft is a core dependency; this guards broken installs
        raise MissingDependencyError("LoRA recovery needs peft: pip install peft") from exc
    if not isinstance(rank, int) or rank <= 0:
        raise InvalidConfigError(f"`recovery.lora_rank` must be a positive integer for LoRA, got {rank!r}.")
    targets = sorted(compressed_layers(model)) or sorted(select_layers(model, None))
    if not targets:
        raise InvalidConfigError("LoRA found no Linear layer to adapt; pass a model with transformer blocks.")
    config = LoraConfig(
        r=rank,
        lora_alpha=alpha if alpha is not None else 2 * rank,
        lora_dropout=dropout,
        target_modules=targets,
        task_type=TaskType.CAUSAL_LM if task == CAUSAL_LM else TaskType.SEQ_CLS,
    )
    return get_peft_model(model, config)


def merge_lora_(peft_model: Any) -> nn.Module:
    """Merge the adapters into the base and re-apply its compression; returns the plain model.

    peft adds ``B @ A * scale`` to each base weight. For a compressed layer that sum becomes the new
    master weight, which is then masked and projected onto the grid again, so the shipped weights obey
    the compression exactly.
    """
    base = peft_model.merge_and_unload()
    with torch.no_grad():
        for layer in compressed_layers(base).values():
            latent = getattr(layer, "poft_latent", None)
            if latent is not None:
                latent.copy_(layer.weight.data)
            refresh_(layer)
    return base
