"""Benchmark: `--tune` over 10 values of react.percentile vs one plain react evaluation, each from a fresh runs folder.

Both sides score `--model` (default torchvision's ResNet-18, random weights) on Fashion-MNIST: fit on a class-balanced
`--fit-limit` training sample, score the ID test set and one OOD set (`--limit` images each). The tuned side also
runs the model once over the ID validation split and tune.val_ood's training split (`--val-size` images each; glyphs,
generated on the fly: about 0.4 s, a fixed cost that dominates small settings) and scores the 10 grid points from the
stored features. Goal: <= 1.5x the plain evaluation.

    python scripts/perf/bench_tune.py [--model torchvision:resnet18:none] [--limit 5000] [--fit-limit 10000]
                                      [--val-size 1000] [--repeats 2]
"""
import argparse
import shutil
import tempfile
import time
from pathlib import Path

import oodbench
from oodbench import workflow as runs
from oodbench.detectors.posthoc import SET_OUTPUTS

GRID = "tune.grid={react.percentile: [50, 60, 70, 80, 85, 90, 95, 97, 99, 99.9]}"


def timed_eval(model, tune: bool, args) -> tuple[float, list]:
    folder = Path(tempfile.mkdtemp())
    SET_OUTPUTS.items.clear()   # no network outputs kept from an earlier evaluation in this process
    start = time.perf_counter()
    run = runs.ModelRun(model, "fashion_mnist", fit_limit=args.fit_limit, runs_dir=folder)
    rows = runs.evaluate(run, ["react"], [args.out], args.limit, [GRID, f"tune.val_size={args.val_size}"], "cpu",
                         tune=tune)
    seconds = time.perf_counter() - start
    shutil.rmtree(folder)
    return seconds, rows


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="torchvision:resnet18:none")
    parser.add_argument("--limit", type=int, default=5000, help="test images per set")
    parser.add_argument("--fit-limit", type=int, default=10000)
    parser.add_argument("--val-size", type=int, default=1000)
    parser.add_argument("--out", default="noise:gaussian")
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    model = oodbench.load_model(args.model)
    plain = tuned = float("inf")
    for _ in range(args.repeats):   # alternate the two sides; best of each
        plain = min(plain, timed_eval(model, False, args)[0])
        seconds, rows = timed_eval(model, True, args)
        tuned = min(tuned, seconds)
    print(f"{args.model}: one react evaluation {plain:.1f} s; with --tune over 10 percentiles {tuned:.1f} s "
          f"→ {tuned / plain:.2f}x (goal <= 1.5x); chosen {rows[0]['tuned']}")


if __name__ == "__main__":
    main()
