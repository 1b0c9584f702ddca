"""Benchmark: `--tune` over 10 values of react.percentile vs one plain react evaluation, each from a fresh run cache.

Both sides score the committed tiny run (tests/fixtures/tiny_run, a small CNN on Fashion-MNIST): fit on its training
split, score the ID test set and one OOD set (`--limit` images each). The tuned side also runs the model once over
the ID validation split and tune.val_ood (`--val-size` images each) and scores the 10 grid points from the stored
features. Goal: <= 1.5x the plain evaluation.

    python scripts/perf/bench_tune.py [--limit 5000] [--val-size 1000] [--repeats 3]
"""
import argparse
import shutil
import tempfile
import time
from pathlib import Path

from oodbench import runs

FIXTURE = Path(__file__).resolve().parents[2] / "tests" / "fixtures" / "tiny_run"
GRID = "tune.grid={react.percentile: [50, 60, 70, 80, 85, 90, 95, 97, 99, 99.9]}"


def timed_eval(tune: bool, limit: int, val_size: int, out: str) -> tuple[float, list]:
    folder = Path(tempfile.mkdtemp()) / "classifier-fashion_mnist-s0"
    shutil.copytree(FIXTURE, folder)
    overrides = [GRID, f"tune.val_size={val_size}"]
    start = time.perf_counter()
    rows = runs.evaluate(runs.Run(folder), ["react"], [out], limit, overrides, "cpu", tune=tune)
    seconds = time.perf_counter() - start
    shutil.rmtree(folder.parent)
    return seconds, rows


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--limit", type=int, default=5000, help="test images per set")
    parser.add_argument("--val-size", type=int, default=1000)
    parser.add_argument("--out", default="noise:gaussian")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    timed_eval(False, 100, args.val_size, args.out)          # warm-up: imports, dataset files in the page cache
    plain = tuned = float("inf")
    for _ in range(args.repeats):   # alternate the two sides; best of each
        plain = min(plain, timed_eval(False, args.limit, args.val_size, args.out)[0])
        seconds, rows = timed_eval(True, args.limit, args.val_size, args.out)
        tuned = min(tuned, seconds)
    print(f"one react evaluation: {plain:.2f} s; with --tune over 10 percentiles: {tuned:.2f} s "
          f"→ {tuned / plain:.2f}x (goal <= 1.5x); chosen {rows[0]['tuned']}")


if __name__ == "__main__":
    main()
