"""Search-efficiency benchmark: policies replayed against a table of REAL MiniLM trials.

    python studies/search_efficiency.py            # record what is missing, then replay and write results
    python studies/search_efficiency.py record [--part I/N]   # record a slice of the grid (resumable)
    python studies/search_efficiency.py replay [--seeds 5] [--trials 30]

Record: every grid cell (a compression x a learning rate) runs once through ``run_trial`` on the MiniLM
sentiment setup (``poft_autotune.demo.minilm_trial_context``), recovering ``MAX_STEPS`` steps with a
constant learning rate and measuring accuracy every ``EVERY`` steps. With a constant learning rate and a
fixed data order, the model after s steps of that run is the model a run of s steps ships, so the curve
gives the result of every step budget. Rows go to ``studies/search_efficiency/table.jsonl``.

Replay (:mod:`poft_autotune.search.replay`): each policy works a fresh in-memory study whose trials are
answered from the table (a proposal snaps to the nearest recorded cell; a trial costs its recovery steps,
and early stopping stops it at the first check where the front dominates its projection). Reported:
hypervolume of (size / dense size, retained) with reference point (1, 0), against cumulative recovery
steps and against trial count, median and spread over seeds.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from poft_autotune import NMConfig, PruneConfig, QuantizeConfig, RecoveryConfig, SearchSpace, TrialPlan, run_trial
from poft_autotune.compression import CompressionConfig

OUT = Path(__file__).with_suffix("")
TABLE = OUT / "table.jsonl"
MAX_STEPS = 40
EVERY = 10
LEARNING_RATES = (5e-5, 1.5e-4)
BASE_STEPS = 400
N_EVAL = 300
COMPRESSIONS: list[tuple[CompressionConfig, ...]] = [
    *[(QuantizeConfig(bits=b, group_size=None),) for b in (8, 5, 4, 3, 2)],
    *[(QuantizeConfig(bits=b, group_size=128),) for b in (4, 3, 2)],
    *[(PruneConfig(sparsity=s, criterion="wanda"),) for s in (0.3, 0.5, 0.7)],
    *[(NMConfig(n=n, m=m, criterion="wanda"),) for n, m in ((4, 8), (2, 4))],
]
SPACE = SearchSpace(
    methods=("quantize", "prune", "nm"),
    choices={
        "quantize": {"group_size": [None, 128], "symmetric": [True]},
        "prune": {"sparsity": (0.3, 0.7), "criterion": ["wanda"]},
        "nm": {"criterion": ["wanda"]},
    },
    steps=(EVERY, MAX_STEPS),
    learning_rate=LEARNING_RATES,
    distill_weight=(0.0, 0.0),
    temperature=(2.0, 2.0),
    lora_rank=(0,),
)


class CurveRecorder:
    """A ``run_trial`` monitor that only records: size, and the metric every ``EVERY`` steps."""

    def __init__(self) -> None:
        self.size_bytes = 0
        self.curve: list[tuple[int, float]] = []

    def eval_steps(self, max_steps: int) -> list[int]:
        return list(range(EVERY, max_steps, EVERY))

    def start(self, size_bytes: int) -> None:
        self.size_bytes = size_bytes

    def report(self, step: int, metric: float) -> None:
        self.curve.append((step, metric))


def _key(compression: tuple[CompressionConfig, ...], lr: float) -> str:
    return json.dumps({"compression": [c.to_dict() for c in compression], "lr": lr}, sort_keys=True)


def record(part: str) -> None:
    from poft_autotune.demo import minilm_trial_context

    index, count = (int(x) for x in part.split("/"))
    cells = [(c, lr) for c in COMPRESSIONS for lr in LEARNING_RATES]
    cells = cells[index - 1 :: count]
    OUT.mkdir(parents=True, exist_ok=True)
    done = {json.loads(line)["key"] for line in TABLE.read_text().splitlines()} if TABLE.exists() else set()
    todo = [(c, lr) for c, lr in cells if _key(c, lr) not in done]
    if not todo:
        return
    context = minilm_trial_context(BASE_STEPS, n_eval=N_EVAL)
    if not done:
        with TABLE.open("a") as f:
            f.write(json.dumps({"key": "dense", "metric": context.dense_metric}) + "\n")
    for compression, lr in todo:
        start = time.perf_counter()
        recorder = CurveRecorder()
        plan = TrialPlan(compression, RecoveryConfig(steps=MAX_STEPS, learning_rate=lr), seed=0)
        result = run_trial(plan, context, monitor=recorder)
        row = {
            "key": _key(compression, lr),
            "plan": plan.to_dict(),
            "size_bytes": result.size_bytes,
            "curve": [*recorder.curve, (MAX_STEPS, result.recovered_metric)],
            "wall_s": time.perf_counter() - start,
            "timings": result.timings,
        }
        with TABLE.open("a") as f:
            f.write(json.dumps(row) + "\n")
        print(f"{plan.label} lr {lr:g}: {json.dumps(row['curve'])} ({row['wall_s']:.0f} s)", flush=True)


def _dense_size() -> int:
    from transformers import AutoModelForSequenceClassification

    from poft_autotune.demo import finetuned_minilm, minilm_splits
    from poft_autotune.size import checkpoint_size

    model = AutoModelForSequenceClassification.from_pretrained(
        finetuned_minilm(minilm_splits()[0], BASE_STEPS), use_safetensors=True
    )
    return checkpoint_size(model).total


POLICIES = ("agent", "tpe", "nsga2", "random")


def replay_report(seeds: int, trials: int) -> None:
    import statistics

    import optuna

    from poft_autotune.search.policy import get_policy
    from poft_autotune.search.replay import TrialTable, curve_at, replay
    from poft_autotune.search.stopping import EarlyStopping

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    table = TrialTable.from_jsonl(TABLE, _dense_size())
    runs: dict[str, list[list]] = {}
    variants = [(name, EarlyStopping()) for name in POLICIES] + [("agent, no early stopping", None)]
    for label, rule in variants:
        name = label.split(",")[0]
        runs[label] = [
            replay(get_policy(name), table, SPACE, trials, seed=seed, early_stopping=rule) for seed in range(seeds)
        ]
    max_steps = max(sum(e.steps for e in events) for r in runs.values() for events in r)
    step_grid = list(range(0, max_steps + 1, 20))
    trial_grid = list(range(1, trials + 1))

    def stats(label: str, grid: list[int], by: str) -> list[tuple[float, float, float]]:
        curves = [curve_at(events, grid, by=by) for events in runs[label]]
        return [(statistics.median(v), min(v), max(v)) for v in zip(*curves, strict=True)]

    by_steps = {label: stats(label, step_grid, "steps") for label in runs}
    by_trials = {label: stats(label, trial_grid, "trials") for label in runs}

    # Target: the agent with budget B reaches what the best Optuna sampler reaches with 2B (medians).
    def target(grid: list[int], table_: dict[str, list[tuple[float, float, float]]]) -> tuple[int, int, list[str]]:
        met, total, misses = 0, 0, []
        for i, budget in enumerate(grid):
            if budget == 0 or 2 * budget not in grid:
                continue
            j = grid.index(2 * budget)
            best = max(table_[p][j][0] for p in POLICIES if p != "agent")
            agent = table_["agent"][i][0]
            total += 1
            if agent >= best - 1e-12:
                met += 1
            else:
                misses.append(f"{budget}: agent {agent:.4f} < {best:.4f}")
        return met, total, misses

    met_s, total_s, miss_s = target(step_grid, by_steps)
    met_t, total_t, miss_t = target(trial_grid, by_trials)
    _plot(step_grid, trial_grid, by_steps, by_trials)
    dense = table.dense_metric
    lines = [
        "# Search efficiency: policies replayed on real MiniLM trials",
        "",
        "Command: `python studies/search_efficiency.py` (records missing grid cells, then replays). "
        f"Table: {len(table.rows)} real trials (13 compressions x {len(LEARNING_RATES)} learning rates), each "
        f"recovered {MAX_STEPS} steps at a constant learning rate, accuracy measured every {EVERY} steps on "
        f"{N_EVAL} held-out snippets; dense accuracy {dense:.3f}, {table.dense_size:,} bytes. Each policy runs "
        f"{trials} trials per seed, seeds 0..{seeds - 1}; a trial costs the recovery steps it ran (probes: 0; "
        "early-stopped trials: up to the check that stopped them). Hypervolume of (size / dense size, "
        "accuracy / dense accuracy), reference point (1, 0); every policy uses the default early stopping "
        "(3 checks, margin 0.5 % of dense) and promotion, except the ablation row.",
        "",
        "![hypervolume](search_efficiency/hypervolume.png)",
        "",
        "## Hypervolume against cumulative recovery steps (median [min, max] over seeds)",
        "",
    ]
    marks = [b for b in (40, 80, 160, 320, 640) if b in step_grid] + [step_grid[-1]]
    lines += ["| policy | " + " | ".join(f"{b} steps" for b in marks) + " |", "|---|" + "---:|" * len(marks)]
    for label, rows in by_steps.items():
        cells = [
            f"{rows[step_grid.index(b)][0]:.4f} [{rows[step_grid.index(b)][1]:.4f}, {rows[step_grid.index(b)][2]:.4f}]"
            for b in marks
        ]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    lines += ["", "## Hypervolume against trial count (median [min, max])", ""]
    tmarks = [t for t in (5, 10, 15, 20, trials) if t <= trials]
    lines += ["| policy | " + " | ".join(f"{t} trials" for t in tmarks) + " |", "|---|" + "---:|" * len(tmarks)]
    for label, rows in by_trials.items():
        cells = [f"{rows[t - 1][0]:.4f} [{rows[t - 1][1]:.4f}, {rows[t - 1][2]:.4f}]" for t in tmarks]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    spent = {label: statistics.median(sum(e.steps for e in ev) for ev in r) for label, r in runs.items()}
    lines += [
        "",
        "Median recovery steps spent in the whole run: "
        + ", ".join(f"{label} {value:.0f}" for label, value in spent.items())
        + ".",
        "",
        "## Target: agent at budget B >= best Optuna sampler at 2B (medians)",
        "",
        f"- by recovery steps: met at {met_s} of {total_s} budgets on the 20-step grid"
        + (f"; missed at {'; '.join(miss_s[:6])}" if miss_s else ""),
        f"- by trial count: met at {met_t} of {total_t} budgets"
        + (f"; missed at {'; '.join(miss_t[:6])}" if miss_t else ""),
        "",
        "## The agent's first run (seed 0), trial by trial",
        "",
        "| # | move | plan | steps run | state | size (MiB) | accuracy | hypervolume |",
        "|---:|---|---|---:|---|---:|---:|---:|",
    ]
    for e in runs["agent"][0]:
        acc = "—" if e.metric is None else f"{e.metric:.3f}"
        lines.append(
            f"| {e.number} | {e.kind} | {e.plan.label} ({e.plan.recovery.steps} steps, lr {e.plan.recovery.learning_rate:.2g}) "
            f"| {e.steps} | {e.state} | {e.size_bytes / 2**20:.1f} | {acc} | {e.hypervolume:.4f} |"
        )
    (OUT.parent / "search_efficiency.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def _plot(step_grid, trial_grid, by_steps, by_trials) -> None:  # type: ignore[no-untyped-def]
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for ax, grid, data, xlabel in (
        (axes[0], step_grid, by_steps, "cumulative recovery steps"),
        (axes[1], trial_grid, by_trials, "trials"),
    ):
        for label, rows in data.items():
            med = [r[0] for r in rows]
            line = ax.plot(grid, med, label=label)[0]
            ax.fill_between(grid, [r[1] for r in rows], [r[2] for r in rows], alpha=0.15, color=line.get_color())
        ax.set_xlabel(xlabel)
        ax.set_ylabel("hypervolume (size/dense, accuracy/dense; ref (1, 0))")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle("Policies replayed on real MiniLM trials (median and range over seeds)")
    fig.tight_layout()
    OUT.mkdir(parents=True, exist_ok=True)
    fig.savefig(OUT / "hypervolume.png", dpi=110)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", nargs="?", default="all", choices=("all", "record", "replay"))
    parser.add_argument("--part", default="1/1", help="record slice I/N of the grid")
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--trials", type=int, default=30)
    args = parser.parse_args(argv)
    if args.command in ("all", "record"):
        record(args.part)
    if args.command in ("all", "replay"):
        replay_report(args.seeds, args.trials)


if __name__ == "__main__":
    sys.exit(main())
