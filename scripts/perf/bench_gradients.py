"""Gradient-score benchmark: ours vs the straightforward per-sample autograd loop, same model, same images.

1. GradNorm: our closed form (one batched forward, no backward) against the two per-sample autograd loops in use:
   OpenOOD's postprocessor (batched features, then one backward per image through the head alone, one host copy per
   image) and the original repository's (one forward+backward of the whole network per image, batch of 1). Scores
   must agree (max relative error).
2. Per-layer gradient norms: torch.func vmap(grad) in micro-batches vs one forward+backward per image (batch of 1).
   Also the micro-batch chosen from --memory-mb and the measured peak memory of that run
   (torch.cuda.max_memory_allocated on GPU; on CPU the growth of the process's peak RSS, which the vmap part runs first
   to isolate).

The slow loops run on the first --loop-n images only; every speed is images/s, so the ratio is fair.
The network is randomly initialised (speed does not depend on training); its head is scaled so softmax is not flat.

    python scripts/perf/bench_gradients.py [--arch resnet18] [--n 512] [--loop-n 64] [--batch 256] [--device auto]
"""
from __future__ import annotations

import argparse
import resource
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))   # the repository root: tests.references

from oodbench.detectors.gradients import (auto_micro_batch, gradnorm_scores, memory_budget_mb,  # noqa: E402
                                         per_layer_grad_norms, weight_names)
from oodbench.engine import resolve_device  # noqa: E402
from oodbench.nets.classifiers import build_classifier  # noqa: E402
from tests.references import gradnorm_openood, gradnorm_per_sample, layer_norms_per_sample  # noqa: E402
from timing import timed  # noqa: E402


def gradnorm_closed(net, x, batch, temperature):
    with torch.no_grad():
        parts = []
        for i in range(0, len(x), batch):
            h = net.features(x[i:i + batch])
            parts.append(gradnorm_scores(h, net.head(h), temperature))
        return torch.cat(parts)


def layers_vmap(net, x, batch, micro_batch):
    parts = [per_layer_grad_norms(net, x[i:i + batch], micro_batch=micro_batch) for i in range(0, len(x), batch)]
    return {k: torch.cat([p[k] for p in parts]) for k in parts[0]}


def max_rel(a, b):
    """Largest difference relative to the scale of the reference scores (per-image relative error is meaningless for
    the near-zero gradients of confidently classified images, where float32 cancellation in p - e_y dominates)."""
    return ((a - b).abs().max() / b.abs().max()).item()


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--arch", default="resnet18")
    p.add_argument("--channels", type=int, default=3)
    p.add_argument("--size", type=int, default=32)
    p.add_argument("--classes", type=int, default=10)
    p.add_argument("--n", type=int, default=512, help="images for our batched paths")
    p.add_argument("--loop-n", type=int, default=64, help="images for the per-sample loops")
    p.add_argument("--batch", type=int, default=256, help="scoring batch size")
    p.add_argument("--memory-mb", default="auto", help="gradlayer.memory_mb: MiB or auto (micro-batch budget)")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--skip-layers", action="store_true", help="GradNorm only")
    p.add_argument("--device", default="auto")
    args = p.parse_args(argv)

    device = resolve_device(args.device)
    torch.manual_seed(0)
    net = build_classifier(args.arch, args.channels, args.classes).to(device).eval()
    with torch.no_grad():
        net.head.weight.mul_(20.0)
    x = torch.randn(args.n, args.channels, args.size, args.size, device=device)
    xl = x[:args.loop_n]
    print(f"device {device} ({torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu'}), "
          f"torch {torch.__version__}, threads {torch.get_num_threads()}, {args.arch} "
          f"{args.channels}x{args.size}x{args.size}, {sum(p.numel() for p in net.parameters()):,} parameters")

    if not args.skip_layers:
        names = weight_names(net)
        budget = memory_budget_mb(args.memory_mb, device)
        micro = auto_micro_batch(net, x, names, budget)
        layers_vmap(net, x[:min(micro, 4)], args.batch, micro)          # warm-up
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
            base = torch.cuda.memory_allocated(device)
        else:
            base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        t_fast, fast = timed(lambda: layers_vmap(net, x, args.batch, micro))
        if device.type == "cuda":
            peak = torch.cuda.max_memory_allocated(device) - base
            how = "torch.cuda.max_memory_allocated above the resident model and data"
        else:
            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base
            how = "growth of the process peak RSS (0 if an earlier step already reached it)"
        layer_norms_per_sample(net, xl[:2], names)                                  # warm-up
        t_slow, slow = timed(lambda: layer_norms_per_sample(net, xl, names))
        err = max(max_rel(fast[k][:len(xl)], slow[k]) for k in names)
        r_fast, r_slow = args.n / t_fast, len(xl) / t_slow
        print(f"per-layer norms ({len(names)} weight tensors): vmap {r_fast:,.1f} img/s (micro-batch {micro} from "
              f"{budget:,.0f} MiB), per-sample loop {r_slow:,.1f} img/s, speed-up {r_fast / r_slow:,.1f}x, "
              f"max rel diff {err:.2e}")
        print(f"  peak memory of the vmap run: {peak / 2**20:,.1f} MiB ({how})")

    gradnorm_closed(net, x[:8], args.batch, args.temperature)            # warm-up
    gradnorm_openood(net, x[:8], args.temperature, args.batch)
    gradnorm_per_sample(net, xl[:2], args.temperature)
    t_closed, closed = timed(lambda: gradnorm_closed(net, x, args.batch, args.temperature))
    t_openood, openood = timed(lambda: gradnorm_openood(net, x, args.temperature, args.batch))
    t_loop, loop = timed(lambda: gradnorm_per_sample(net, xl, args.temperature))
    r_closed, r_openood, r_loop = args.n / t_closed, args.n / t_openood, len(xl) / t_loop
    print(f"GradNorm: closed form {r_closed:,.1f} img/s; OpenOOD's head-only loop {r_openood:,.1f} img/s, speed-up "
          f"{r_closed / r_openood:,.2f}x, max rel diff {max_rel(closed, openood.to(closed.device)):.2e}; "
          f"original per-image forward+backward {r_loop:,.1f} img/s, speed-up {r_closed / r_loop:,.1f}x, "
          f"max rel diff {max_rel(closed[:len(xl)], loop):.2e}")


if __name__ == "__main__":
    main()
