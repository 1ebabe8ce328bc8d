"""Run fixed trials on a tiny Llama, single process or data parallel, and write what each rank saw.

    python -m torch.distributed.run --standalone --nproc_per_node 2 tests/ddp_trial.py OUT GLOBAL_BATCH
    python tests/ddp_trial.py OUT GLOBAL_BATCH

Each rank trains with ``GLOBAL_BATCH / world_size`` rows per device (gradient accumulation 2), so every
world size takes the same optimizer steps on the same rows. Per plan it writes ``OUT/<plan>-rank<r>.json``
(the TrialResult and the InvariantChecker's counts and violations); rank 0 exports the shipped checkpoint
to ``OUT/<plan>/``. Used by tests/test_ddp.py; not collected by pytest itself.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

from poft_autotune.compression.prune import NMConfig, PruneConfig
from poft_autotune.compression.quantize import QuantizeConfig
from poft_autotune.data import CAUSAL_LM, PadCollator, prepare_dataset, resolve_metric
from poft_autotune.search.objective import TrialContext, run_trial
from poft_autotune.search.space import RecoveryConfig, TrialPlan
from poft_autotune.testing import InvariantChecker, lm_dataset, tiny_llama, tiny_training_args

STEPS = 6
ACCUMULATION = 2

PLANS = {
    # Every Linear pruned, the MLP ones also quantized (masked-only and masked + quantized layers), with
    # distillation from the dense model; full fine-tune.
    "prune-quantize-kd": TrialPlan(
        compression=(PruneConfig(sparsity=0.5), QuantizeConfig(bits=4, group_size=16, targets=("mlp",))),
        recovery=RecoveryConfig(steps=STEPS, learning_rate=5e-3, distill_weight=0.5),
        seed=0,
    ),
    # Wanda 2:4 (calibration forward passes on every rank) + 3-bit per channel, LoRA recovery.
    "nm-quantize-lora": TrialPlan(
        compression=(NMConfig(n=2, m=4, criterion="wanda"), QuantizeConfig(bits=3, group_size=None)),
        recovery=RecoveryConfig(steps=STEPS, learning_rate=5e-3, lora_rank=4),
        seed=1,
    ),
}


def run(out: Path, global_batch: int) -> dict[str, dict]:
    """Run every plan; returns ``{plan: {"result": ..., "checks": ..., "violations": ...}}`` of this rank."""
    out.mkdir(parents=True, exist_ok=True)  # every rank writes its report here; only rank 0 exports
    args = tiny_training_args(str(out / "trainer"), weight_decay=0.1, max_grad_norm=1.0, seed=0)
    world = args.world_size
    if global_batch % (world * ACCUMULATION):
        raise SystemExit(f"GLOBAL_BATCH {global_batch} must divide by world size x accumulation {world * ACCUMULATION}")
    args = dataclasses.replace(
        args,
        per_device_train_batch_size=global_batch // world // ACCUMULATION,
        gradient_accumulation_steps=ACCUMULATION,
    )
    base = tiny_llama(seed=3)
    train = prepare_dataset(lm_dataset(STEPS * global_batch), CAUSAL_LM)  # one epoch: no reshuffle
    evaluation = prepare_dataset(lm_dataset(32, seed=1), CAUSAL_LM)
    metric = resolve_metric(None, CAUSAL_LM)
    collator = PadCollator(0, CAUSAL_LM)
    dense = 0.0  # not compared here
    report = {}
    for name, plan in PLANS.items():
        checker = InvariantChecker()
        context = TrialContext(base, train, evaluation, metric, collator, args, dense, 16, callbacks=[checker])
        result = run_trial(plan, context, export_dir=out / name)
        report[name] = {
            "rank": args.process_index,
            "world_size": world,
            "result": result.to_dict(),
            "checks": dict(checker.checks),
            "violations": checker.violations,
        }
        path = out / f"{name}-rank{args.process_index}.json"
        path.write_text(json.dumps(report[name], indent=2))
    return report


if __name__ == "__main__":
    run(Path(sys.argv[1]), int(sys.argv[2]))
