"""Benchmark: all OOD metrics for 2 million scores, oodbench.metrics.evaluate vs scikit-learn.

The scikit-learn side computes the same six numbers the way a user would without oodbench: roc_auc_score, two
average_precision_score calls (AUPR-In, AUPR-Out) and roc_curve for both FPR@95 variants and the detection error.
Scores are rounded to 4 decimals so there are ties, as real detector scores (e.g. softmax) have. Goal: >= 3x.

    python scripts/perf/bench_metrics.py [--n 1000000] [--repeats 3]
"""

import argparse
import sys
from pathlib import Path

import numpy as np
from timing import best_time

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))   # the repository root: tests.references

from oodbench.metrics import METRIC_NAMES, evaluate  # noqa: E402
from tests.references import sklearn_reference  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=1_000_000, help="scores per set (ID and OOD each)")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per side; the best is reported")
    parser.add_argument("--decimals", type=int, default=4, help="round scores to this many decimals (ties)")
    args = parser.parse_args()

    rng = np.random.default_rng(0)
    id_scores = np.round(rng.normal(0.0, 1.0, args.n), args.decimals)
    ood_scores = np.round(rng.normal(1.5, 1.0, args.n), args.decimals)

    ours_s, ours = best_time(lambda: evaluate(id_scores, ood_scores), args.repeats)
    ref_s, ref = best_time(lambda: sklearn_reference(id_scores, ood_scores), args.repeats)

    worst = max(abs(ours[name] - ref[name]) for name in METRIC_NAMES)
    print(f"scores: {args.n:,} ID + {args.n:,} OOD, best of {args.repeats}")
    print(f"oodbench.metrics.evaluate: {ours_s:.3f} s")
    print(f"scikit-learn (same metrics): {ref_s:.3f} s")
    print(f"speed-up: {ref_s / ours_s:.2f}x (goal >= 3x)")
    print("values: " + ", ".join(f"{name}={ours[name]:.6f}" for name in METRIC_NAMES))
    print(f"max |ours - sklearn| = {worst:.2e} ({'agree' if worst <= 1e-12 else 'DISAGREE'})")
    if worst > 1e-12:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
