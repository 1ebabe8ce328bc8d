"""Quality benchmark, encoder half: what each compression setting costs MiniLM and what recovery wins back.

    python studies/quality_minilm.py [--steps 300] [--base-steps 400] [--out studies/quality_minilm.md]

all-MiniLM-L6-v2 with a 2-label head is fine-tuned on movie-review snippets (``--base-steps``), then
each fixed plan below runs through ``run_trial`` exactly as a search trial would (fresh copy, compress,
evaluate, recover for ``--steps`` steps with full fine-tuning at lr 5e-5, export the shipped checkpoint,
evaluate it). A "dense + recovery" row gives the same extra steps to the uncompressed model: the fair
reference for what recovery training alone adds.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from poft_autotune import NMConfig, PruneConfig, QuantizeConfig, RecoveryConfig, TrialPlan, run_trial
from poft_autotune.compression.structured import StructuredConfig
from poft_autotune.demo import minilm_trial_context
from poft_autotune.export import weight_bytes

PLANS = {
    "dense + recovery": (),
    "int8 (per-channel)": (QuantizeConfig(bits=8, group_size=None),),
    "int4 g128": (QuantizeConfig(bits=4, group_size=128),),
    "int3 g128": (QuantizeConfig(bits=3, group_size=128),),
    "50 % unstructured (magnitude)": (PruneConfig(sparsity=0.5),),
    "2:4 (magnitude)": (NMConfig(n=2, m=4),),
    "int4 g128 + 50 % unstructured": (PruneConfig(sparsity=0.5), QuantizeConfig(bits=4, group_size=128)),
    "structured: 50 % FFN channels": (StructuredConfig(ffn=0.5),),
}
TARGETS = {
    "int4 g128": 0.995,
    "50 % unstructured (magnitude)": 0.99,
    "2:4 (magnitude)": 0.98,
    "int4 g128 + 50 % unstructured": 0.98,
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--base-steps", type=int, default=400)
    parser.add_argument("--lr", type=float, default=5e-5)
    parser.add_argument("--out", default="studies/quality_minilm.md")
    args = parser.parse_args()

    context = minilm_trial_context(args.base_steps)
    dense = context.dense_metric
    rows = []
    for label, configs in PLANS.items():
        start = time.perf_counter()
        with tempfile.TemporaryDirectory() as checkpoint:
            plan = TrialPlan(configs, RecoveryConfig(steps=args.steps, learning_rate=args.lr), seed=0)
            result = run_trial(plan, context, Path(checkpoint) / "ckpt")
            assert weight_bytes(Path(checkpoint) / "ckpt") == result.size_bytes
        rows.append((label, result, time.perf_counter() - start))
        print(
            f"{label}: {json.dumps({k: result.to_dict()[k] for k in ('size_bytes', 'compressed_metric', 'recovered_metric', 'retained')})}",
            flush=True,
        )

    lines = [
        "# Quality benchmark: MiniLM-L6 sentiment classifier",
        "",
        f"Command: `python studies/quality_minilm.py --steps {args.steps} --base-steps {args.base_steps} --lr {args.lr}`. "
        f"Base: all-MiniLM-L6-v2 + 2-label head fine-tuned {args.base_steps} steps (batch 16, 64 tokens) on 2,400 "
        f"movie-review snippets; recovery on 2,000 other snippets; accuracy on 500 held-out snippets. Size: bytes of "
        "the exported checkpoint (asserted equal to the files written). Retained = recovered / dense.",
        "",
        f"Dense accuracy: **{dense:.4f}**, {rows[0][1].size_bytes / 2**20:.2f} MiB.",
        "",
        "| plan | size (MiB) | after compression | after recovery | retained | recovered fraction | steps | target | wall (s) |",
        "|---|---:|---:|---:|---:|---:|---:|---|---:|",
    ]
    for label, r, wall in rows:
        # Only meaningful when compression cost something: a gap under one point makes the ratio noise.
        gap = r.dense_metric - r.compressed_metric
        frac = f"{100 * r.recovered_fraction:.0f} %" if r.recovered_fraction is not None and gap >= 0.01 else "—"
        target = TARGETS.get(label)
        verdict = (
            "" if target is None else (f">= {100 * target:.1f} %: " + ("met" if r.retained >= target else "missed"))
        )
        lines.append(
            f"| {label} | {r.size_bytes / 2**20:.2f} | {r.compressed_metric:.4f} | {r.recovered_metric:.4f} | "
            f"{100 * r.retained:.1f} % | {frac} | {r.recovery_steps} | {verdict} | {wall:.0f} |"
        )
    Path(args.out).write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
