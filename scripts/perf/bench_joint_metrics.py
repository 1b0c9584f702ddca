"""Benchmark: the joint and full-spectrum metrics on 1e6 ID + 1e6 OOD scores, next to the detection metrics alone.

Times, best of --repeats on the same tied scores (rounded to 4 decimals, as softmax-like scores are):
  - oodbench.metrics.evaluate: the detection metrics (today's one-sort core);
  - joint_metrics.evaluate_joint without predictions: the same plus AUTC;
  - joint_metrics.evaluate_joint with per-image correctness and confidence: every joint metric (OSCR, CCR@FPR x4,
    AURC, AUGRC, Risk@80%Cov, Cov@5%Risk, ECE, MCE) from the same one sort;
  - the FS-OOD rows of one OOD set: detection + joint metrics of ID ∪ csID (--csid more ID-side scores) against OOD,
    i.e. what `eval --joint --csid` adds per row (workflow.evaluation.metric_rows).

    python scripts/perf/bench_joint_metrics.py [--n 1000000] [--csid 1000000] [--repeats 3]
"""
import argparse
import sys
from pathlib import Path

import numpy as np
from timing import best_time

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from oodbench import joint_metrics, metrics  # noqa: E402
from oodbench.workflow.evaluation import metric_rows  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=1_000_000, help="scores per set (ID and OOD each)")
    parser.add_argument("--csid", type=int, default=1_000_000, help="csID scores for the FS-OOD row")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--decimals", type=int, default=4)
    args = parser.parse_args()

    rng = np.random.default_rng(0)
    id_scores = np.round(rng.normal(0.0, 1.0, args.n), args.decimals)
    ood_scores = np.round(rng.normal(1.5, 1.0, args.n), args.decimals)
    correct = rng.random(args.n) < 0.9
    confidence = rng.random(args.n).astype(np.float32)
    n_cs = args.csid
    id_side = {"s": id_scores, "_pred": np.where(correct, 1, 0), "_label": np.ones(args.n, dtype=np.int64),
               "_conf": confidence}
    cs_scores = np.round(rng.normal(0.5, 1.0, n_cs), args.decimals)
    fs_side = {"s": np.concatenate([id_scores, cs_scores]),
               "_pred": np.concatenate([id_side["_pred"], (rng.random(n_cs) < 0.7).astype(np.int64)]),
               "_label": np.ones(args.n + n_cs, dtype=np.int64),
               "_conf": np.concatenate([confidence, rng.random(n_cs).astype(np.float32)])}

    cases = [
        ("metrics.evaluate (detection only, today's core)", lambda: metrics.evaluate(id_scores, ood_scores)),
        ("evaluate_joint, scores only (+ AUTC)", lambda: joint_metrics.evaluate_joint(id_scores, ood_scores)),
        ("evaluate_joint, all joint metrics", lambda: joint_metrics.evaluate_joint(
            id_scores, ood_scores, correct, confidence)),
        (f"one row with --joint --csid ({n_cs:,} csID): standard + FS-OOD",
         lambda: metric_rows(id_side, {"s": ood_scores}, "id", "ood", joint=True, fs_scores=fs_side)),
    ]
    print(f"scores: {args.n:,} ID + {args.n:,} OOD (rounded to {args.decimals} decimals), best of {args.repeats}")
    base = None
    for name, fn in cases:
        seconds, _ = best_time(fn, args.repeats)
        base = base or seconds
        print(f"{name}: {seconds:.3f} s ({seconds / base:.2f}x the detection metrics)")


if __name__ == "__main__":
    main()
