"""The wall-clock timer the perf scripts share (imported as a sibling: `python scripts/perf/X.py` puts this folder on
sys.path)."""
import time

import torch


def timed(fn):
    """(seconds, fn()) with the GPU's queued work counted: CUDA is synchronised before and after when present."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    start = time.perf_counter()
    out = fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - start, out


def best_time(fn, repeats):
    """(the fastest of `repeats` timed calls, the last call's result)."""
    best, out = float("inf"), None
    for _ in range(repeats):
        seconds, out = timed(fn)
        best = min(best, seconds)
    return best, out
