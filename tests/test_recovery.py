"""RecoveryTrainer's loss and the straight-through update of quantized weights."""

import math

import pytest
import torch
from torch.nn.utils import parametrize
from transformers import Trainer

from poft_autotune import InvalidConfigError, compress_
from poft_autotune.compression import select_layers
from poft_autotune.compression.quantize import QuantizeConfig, fake_quantize_ste
from poft_autotune.data import CAUSAL_LM, CLASSIFICATION, PadCollator
from poft_autotune.recovery import CompressionCallback, RecoveryTrainer, distillation_loss
from poft_autotune.testing import classification_dataset, lm_dataset, tiny_bert, tiny_llama, tiny_training_args


def test_distillation_loss_matches_hand_computed_kl():
    student = torch.tensor([[1.0, 0.0, -1.0], [0.5, 0.5, 0.0]])
    teacher = torch.tensor([[0.0, 1.0, 0.0], [2.0, 0.0, 0.0]])
    temperature = 2.0
    expected = 0.0
    for s_row, t_row in zip(student.tolist(), teacher.tolist(), strict=True):
        zs = sum(math.exp(x / temperature) for x in s_row)
        zt = sum(math.exp(x / temperature) for x in t_row)
        p = [math.exp(x / temperature) / zt for x in t_row]
        q = [math.exp(x / temperature) / zs for x in s_row]
        expected += sum(pi * math.log(pi / qi) for pi, qi in zip(p, q, strict=True))
    expected = temperature**2 * expected / 2
    assert distillation_loss(student, teacher, temperature).item() == pytest.approx(expected, rel=1e-6)


def test_distillation_loss_ignores_padding_positions():
    student = torch.randn(2, 3, 5)
    teacher = torch.randn(2, 3, 5)
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    changed = student.clone()
    changed[mask == 0] = 100.0  # padding positions must not matter
    assert torch.allclose(
        distillation_loss(student, teacher, 1.5, mask), distillation_loss(changed, teacher, 1.5, mask)
    )
    per_pos = [distillation_loss(student[b, t][None], teacher[b, t][None], 1.5) for b, t in [(0, 0), (0, 1), (1, 0)]]
    assert distillation_loss(student, teacher, 1.5, mask).item() == pytest.approx(sum(per_pos).item() / 3, rel=1e-5)


@pytest.mark.parametrize("task", [CLASSIFICATION, CAUSAL_LM])
def test_compute_loss_mixes_task_and_distillation(task, tmp_path):
    torch.manual_seed(0)
    if task == CAUSAL_LM:
        student, teacher, data = tiny_llama(seed=1), tiny_llama(seed=2), lm_dataset(8)
    else:
        student, teacher = tiny_bert(seed=1), tiny_bert(seed=2)
        data = classification_dataset(8).rename_column("label", "labels")
    student.eval()  # no dropout, so the forward passes below are comparable
    collator = PadCollator(0, task)
    batch = collator([data[i] for i in range(4)])
    trainer = RecoveryTrainer(
        model=student, args=tiny_training_args(str(tmp_path)), teacher=teacher, distill_weight=0.3, temperature=2.0
    )
    loss = trainer.compute_loss(student, dict(batch))
    with torch.no_grad():
        out = student(**batch)
        t_logits = teacher(**{k: v for k, v in batch.items() if k != "labels"}).logits
    kd = distillation_loss(out.logits, t_logits, 2.0, batch["attention_mask"])
    assert loss.item() == pytest.approx((0.7 * out.loss + 0.3 * kd).item(), rel=1e-5)


def test_recovery_trainer_rejects_bad_distillation_settings(tmp_path):
    args = tiny_training_args(str(tmp_path))
    with pytest.raises(InvalidConfigError, match="`distill_weight`"):
        RecoveryTrainer(model=tiny_llama(), args=args, teacher=tiny_llama(), distill_weight=1.5)
    with pytest.raises(InvalidConfigError, match="needs a `teacher`"):
        RecoveryTrainer(model=tiny_llama(), args=args, distill_weight=0.5)
    with pytest.raises(InvalidConfigError, match="`temperature`"):
        RecoveryTrainer(model=tiny_llama(), args=args, teacher=tiny_llama(), distill_weight=0.5, temperature=0)


def test_ste_passes_gradient_straight_through():
    w = torch.randn(4, 8, requires_grad=True)
    grid = QuantizeConfig(bits=3, group_size=4).grid
    out = fake_quantize_ste(w, grid)
    assert torch.equal(out.detach(), grid.fake_quantize(w.detach()))
    upstream = torch.randn(4, 8)
    out.backward(upstream)
    assert torch.equal(w.grad, upstream)


class _FakeQuant(torch.nn.Module):
    def __init__(self, grid):
        super().__init__()
        self.grid = grid

    def forward(self, weight):
        return fake_quantize_ste(weight, self.grid)


def test_callback_update_equals_parametrized_ste_training(tmp_path):
    """Our once-per-step update is the STE: same latent weights as fake-quant-every-forward training."""
    config = QuantizeConfig(bits=4, group_size=16)
    args = tiny_training_args(
        str(tmp_path),
        max_steps=6,
        weight_decay=0.1,
        learning_rate=5e-3,
        gradient_accumulation_steps=2,
        per_device_train_batch_size=4,
        seed=0,
    )
    data, collator = lm_dataset(48), PadCollator(0, CAUSAL_LM)

    ours = tiny_llama(seed=3)
    compress_(ours, [config])
    RecoveryTrainer(
        model=ours, args=args, train_dataset=data, data_collator=collator, callbacks=[CompressionCallback(ours)]
    ).train()

    reference = tiny_llama(seed=3)
    for layer in select_layers(reference, None).values():
        parametrize.register_parametrization(layer, "weight", _FakeQuant(config.grid))
    Trainer(model=reference, args=args, train_dataset=data, data_collator=collator).train()

    ref_layers = select_layers(reference, None)
    for name, layer in select_layers(ours, None).items():
        ref_latent = ref_layers[name].parametrizations.weight.original
        assert torch.allclose(layer.poft_latent, ref_latent, atol=1e-6), name
        assert torch.allclose(layer.weight, ref_layers[name].weight, atol=1e-6), name
