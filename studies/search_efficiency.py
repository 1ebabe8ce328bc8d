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
        from studies_replay import replay_report  # type: ignore[import-not-found]

        replay_report(TABLE, SPACE, args.seeds, args.trials, OUT)


if __name__ == "__main__":
    sys.exit(main())
