"""The spine on a real model: MiniLM-L6 sentiment classifier, 12-trial autotune, front as markdown.

    python studies/minilm_sentiment.py [--trials 12] [--base-steps 150] [--steps 20 80]

The same study as ``poft-autotune demo`` (``poft_autotune.demo.demo_config``), with a bigger budget:

1. fine-tune all-MiniLM-L6-v2 (fresh 2-label head) briefly on movie-review snippets -> the dense base
   (``poft_autotune.demo.finetuned_minilm``, cached under $POFT_CACHE, so reruns skip it);
2. autotune it (compression + recovery searched together) on a disjoint train split, evaluating on
   500 held-out snippets; the study lands in studies/minilm_sentiment.db and the front in
   studies/minilm_sentiment/{front.json,report.md,front.png}.
"""

from __future__ import annotations

import argparse
import logging
import time

from poft_autotune.demo import demo_config
from poft_autotune.study_config import run_study


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trials", type=int, default=12)
    parser.add_argument("--base-steps", type=int, default=150)
    parser.add_argument("--steps", type=int, nargs=2, default=[20, 80], metavar=("LOW", "HIGH"))
    parser.add_argument("--study", default="minilm_sentiment")
    parser.add_argument("--out", default="studies")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")

    config = demo_config(args.trials, tuple(args.steps), args.out, study_name=args.study, base_steps=args.base_steps)
    start = time.perf_counter()
    front = run_study(config)
    logging.info("base + %d trials in %.0f s", args.trials, time.perf_counter() - start)
    print(front.to_markdown())


if __name__ == "__main__":
    main()
