"""DDPM reconstruction cost vs the UNet's own compute, measured in one run.

    python scripts/perf/bench_ddpm.py [--size custom --base 32] [--batch 16] [--steps 100 --skip 16]
                                      [--sampler plms] [--device auto] [--amp auto]

"ours" is `Diffusion.reconstruct`: all starting points of a batch as one trajectory set (one network call per schedule
step on every active trajectory, plus PLMS's first-step correction), i.e. noising, the sampler updates and the PLMS
history. Baselines, with inputs prepared beforehand:
- "same calls": bare UNet forwards with exactly the batch sizes and timesteps that reconstruction uses (goal: ours
  <= 1.15x this, the overhead of everything that is not the network);
- "full batches": the same number of network evaluations in batches of the largest trajectory set (the floor when
  bigger batches help the device).
Also printed: network evaluations per image and images/s, and the full detector path (`DDPM.errors` with MSE).
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from oodbench.detectors.ddpm import DDPM
from oodbench.diffusion import Diffusion
from oodbench.engine import resolve_device


def timed(fn, device, reps: int) -> float:
    """Median seconds of fn() over reps runs (after one warm-up run)."""
    fn()
    times = []
    for _ in range(reps):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", default="custom", help="small | paper | custom")
    p.add_argument("--base", type=int, default=32, help="custom only")
    p.add_argument("--mults", default="1,2,2", help="custom only")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--shape", default="1,28,28", help="C,H,W")
    p.add_argument("--steps", type=int, default=100, help="num_inference_steps")
    p.add_argument("--skip", type=int, default=16, help="inference_skip_factor")
    p.add_argument("--sampler", default="plms")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--device", default="auto")
    p.add_argument("--amp", default="auto", help="auto (bf16 on CUDA) | off | bf16")
    p.add_argument("--threads", type=int, default=0, help="CPU intra-op threads (0 = torch's default)")
    a = p.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    device = resolve_device(a.device)
    c, h, w = (int(v) for v in a.shape.split(","))
    torch.manual_seed(0)

    mults = tuple(int(m) for m in a.mults.split(","))
    model_cfg = {"size": a.size, "base": a.base, "mults": list(mults), "blocks": 1, "attn_levels": [len(mults) - 1]}
    det = DDPM({"seed": 0, "model": model_cfg, "ddpm": {"num_inference_steps": a.steps, "inference_skip_factor": a.skip,
                                                         "sampler": a.sampler, "metrics": ["mse"], "amp": a.amp}},
               device)
    det.net_cfg = {**model_cfg, "in_channels": c}
    det.net = det._build(det.net_cfg).eval()
    for prm in det.net.parameters():            # non-zero output layers, so ε is not trivially 0
        prm.data.normal_(0, 0.02)
    model = det._model_fn()
    diffusion = Diffusion()
    x_u8 = torch.randint(0, 256, (a.batch, c, h, w), dtype=torch.uint8, device=device)
    x0 = det._prepare(x_u8)
    starts = diffusion.starting_points(a.steps, a.skip)

    calls = []

    def recording(x, t):
        calls.append((x.shape[0], int(t[0])))
        return model(x, t)

    with torch.no_grad():
        diffusion.reconstruct(recording, x0, starts, a.steps, a.sampler)
        inputs = [(torch.randn(n, *x0.shape[1:], device=device), torch.full((n,), t, device=device))
                  for n, t in calls]
        peak = max(n for n, _ in calls)
        total = sum(n for n, _ in calls)
        full = [(torch.randn(min(peak, total - i), *x0.shape[1:], device=device),
                 torch.full((min(peak, total - i),), 500, device=device)) for i in range(0, total, peak)]
        g = torch.Generator(device=device)

        def ours():
            g.manual_seed(0)
            diffusion.reconstruct(model, x0, starts, a.steps, a.sampler, generator=g)

        def same_calls():
            for x, t in inputs:
                model(x, t)

        def full_batches():
            for x, t in full:
                model(x, t)

        t_ours = timed(ours, device, a.reps)
        t_same = timed(same_calls, device, a.reps)
        t_full = timed(full_batches, device, a.reps)
        t_det = timed(lambda: det.errors(x_u8), device, a.reps)

    evals = diffusion.network_evaluations(starts, a.sampler)
    params = sum(q.numel() for q in det.net.parameters()) / 1e6
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({torch.get_num_threads()} threads)"
    print(f"device: {name}; UNet {a.size} (base {det.net.base}, {params:.2f}M params), input {tuple(x0.shape[1:])}, "
          f"batch {a.batch}, amp {a.amp}")
    print(f"schedule: {a.steps} steps, skip {a.skip} -> {len(starts)} starting points, sampler {a.sampler}; "
          f"{evals} network evaluations per image in {len(calls)} calls (largest {peak} rows)")
    print(f"reconstruction (ours)          {t_ours * 1e3:9.1f} ms  {a.batch / t_ours:8.2f} images/s")
    print(f"bare UNet, same calls          {t_same * 1e3:9.1f} ms  ratio ours/bare = {t_ours / t_same:.3f} (goal <= 1.15)")
    print(f"bare UNet, full batches        {t_full * 1e3:9.1f} ms  ratio ours/bare = {t_ours / t_full:.3f}")
    print(f"detector errors() incl. MSE    {t_det * 1e3:9.1f} ms  {a.batch / t_det:8.2f} images/s "
          f"({a.batch * evals / t_det:.0f} network evaluations/s)")


if __name__ == "__main__":
    main()
