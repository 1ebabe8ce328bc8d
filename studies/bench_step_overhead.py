"""Recovery-step overhead, measured side by side in one run (issue: spine, item 9).

    python studies/bench_step_overhead.py [--rounds 5] [--steps 8] [--models minilm,llama]

For each model and batch, three trainers run in interleaved rounds (A B C A B C ...), each round a
short ``train()`` whose first 2 steps are dropped as warm-up; the step time is read by a callback
(``on_step_begin`` -> ``on_step_end``: data, forward, backward, clipping, optimizer, callbacks):

* plain:     ``transformers.Trainer`` on the dense model;
* quant:     ``RecoveryTrainer`` + ``CompressionCallback`` after int4 g32 quantization (STE latent
             update, one re-quantization per optimizer step);
* recovery:  the same after 50 % magnitude pruning + int4 g32 quantization (masks applied to the
             accumulated gradients as well);
* distill:   "recovery" plus distillation from the dense teacher (w = 0.5, T = 2);
* teacher:   one no-grad forward of the teacher on the batch, timed on its own.

Printed: median step times and the ratios recovery / plain (target <= 1.03) and
distill / (plain + teacher forward) (target <= 1.0: distillation costs at most one teacher forward).
"""

from __future__ import annotations

import argparse
import copy
import statistics
import tempfile
import time
from typing import Any

import torch
from transformers import Trainer, TrainerCallback, TrainingArguments

from poft_autotune import PruneConfig, QuantizeConfig, compress_
from poft_autotune.data import CAUSAL_LM, CLASSIFICATION, PadCollator
from poft_autotune.recovery import CompressionCallback, RecoveryTrainer


class StepTimer(TrainerCallback):
    def __init__(self) -> None:
        self.times: list[float] = []
        self._start = 0.0

    def on_step_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._start = time.perf_counter()

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.times.append(time.perf_counter() - self._start)


def minilm_setup() -> tuple[torch.nn.Module, Any, str]:
    import datasets
    from transformers import AutoModelForSequenceClassification

    from poft_autotune.demo import minilm_dir

    model = AutoModelForSequenceClassification.from_pretrained(minilm_dir(), num_labels=2, use_safetensors=True)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1000, 20000, (256, 64), generator=g)
    data = datasets.Dataset.from_dict({"input_ids": ids.tolist(), "labels": (ids[:, 0] % 2).tolist()})
    return model, data, CLASSIFICATION


def llama_setup() -> tuple[torch.nn.Module, Any, str]:
    from poft_autotune.testing import lm_dataset, tiny_llama

    # ~5M parameters: hidden 256, 4 layers, vocab 4096.
    model = tiny_llama(
        hidden_size=256,
        intermediate_size=704,
        num_hidden_layers=4,
        num_attention_heads=8,
        num_key_value_heads=8,
        vocab_size=4096,
        max_position_embeddings=256,
    )
    return model, lm_dataset(256, length=128, vocab_size=4096), CAUSAL_LM


def bench(name: str, setup: Any, rounds: int, steps: int, batch: int) -> None:
    dense, data, task = setup()
    collator = PadCollator(0, task)
    quantized = copy.deepcopy(dense)
    compress_(quantized, [QuantizeConfig(bits=4, group_size=32)])
    compressed = copy.deepcopy(dense)
    compress_(compressed, [PruneConfig(sparsity=0.5), QuantizeConfig(bits=4, group_size=32)])
    distilled = copy.deepcopy(compressed)
    teacher = copy.deepcopy(dense).eval()
    args = TrainingArguments(
        output_dir=tempfile.mkdtemp(),
        max_steps=steps,
        per_device_train_batch_size=batch,
        learning_rate=1e-5,
        report_to="none",
        disable_tqdm=True,
        save_strategy="no",
        logging_strategy="no",
        use_cpu=True,
        dataloader_drop_last=True,
    )
    timers = {k: StepTimer() for k in ("plain", "quant", "recovery", "distill")}
    trainers = {
        "plain": Trainer(
            model=dense, args=args, train_dataset=data, data_collator=collator, callbacks=[timers["plain"]]
        ),
        "quant": RecoveryTrainer(
            model=quantized,
            args=args,
            train_dataset=data,
            data_collator=collator,
            callbacks=[CompressionCallback(quantized), timers["quant"]],
        ),
        "recovery": RecoveryTrainer(
            model=compressed,
            args=args,
            train_dataset=data,
            data_collator=collator,
            callbacks=[CompressionCallback(compressed), timers["recovery"]],
        ),
        "distill": RecoveryTrainer(
            model=distilled,
            args=args,
            train_dataset=data,
            data_collator=collator,
            teacher=teacher,
            distill_weight=0.5,
            temperature=2.0,
            callbacks=[CompressionCallback(distilled), timers["distill"]],
        ),
    }
    batch_inputs = collator([data[i] for i in range(batch)])
    batch_inputs.pop("labels")
    teacher_times: list[float] = []
    for _ in range(rounds):
        for key, trainer in trainers.items():
            before = len(timers[key].times)
            trainer.train()
            del timers[key].times[before : before + 2]  # warm-up steps of this round
        with torch.no_grad():
            for _ in range(steps):
                t = time.perf_counter()
                teacher(**batch_inputs)
                teacher_times.append(time.perf_counter() - t)
    med = {k: statistics.median(t.times) for k, t in timers.items()}
    med_teacher = statistics.median(teacher_times[2:])
    n = len(timers["plain"].times)
    params = sum(p.numel() for p in dense.parameters()) / 1e6
    print(
        f"\n## {name} ({params:.1f}M params, batch {batch}, {n} timed steps per variant, torch threads {torch.get_num_threads()})"
    )
    print("| variant | median step (s) |\n|---|---:|")
    for key, value in med.items():
        print(f"| {key} | {value:.4f} |")
    print(f"| teacher forward | {med_teacher:.4f} |")
    print(f"\nquant / plain = {med['quant'] / med['plain']:.3f}  (target <= 1.03)")
    print(f"recovery / plain = {med['recovery'] / med['plain']:.3f}  (target <= 1.03)")
    print(f"distill / (plain + teacher forward) = {med['distill'] / (med['plain'] + med_teacher):.3f}  (target <= 1.0)")
    print(f"distill / plain = {med['distill'] / med['plain']:.3f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--models", default="minilm,llama")
    args = parser.parse_args()
    setups = {"minilm": (minilm_setup, 16), "llama": (llama_setup, 8)}
    for name in args.models.split(","):
        setup, batch = setups[name]
        bench(name, setup, args.rounds, args.steps, batch)


if __name__ == "__main__":
    main()
