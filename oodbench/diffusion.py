"""Gaussian diffusion for DDPM-OOD: the noise schedule, the training loss and deterministic DDIM / PLMS
reconstruction from many starting points at once.

Conventions: timesteps are integer indices 0..T-1 into `alphas_cumprod` (ᾱ); the training t is uniform over them.
The inference schedule for n steps is t_i = i * T/n, i = 0..n-1 ({0, 10, ..., 990} for n = 100), as MONAI's
`PNDMScheduler.set_timesteps` with offset 0 in the original (ddpm-ood `src/trainers/reconstruct.py`). Starting
points are the original's `reversed(timesteps)[1::skip]`: schedule indices 1, 1 + skip, ... (skip 16 -> t = 10, 170,
..., 970), ceil((n - 1) / skip) of them. Denoising goes down the schedule and the last step lands on the clean image
(ᾱ_prev = 1), so DDIM with the exact ε returns x0 exactly (the original's last step keeps ᾱ_0: `plms_stale`).

Reconstruction batches **all starting points of an image batch**: trajectories move through the schedule in lockstep,
a trajectory joins the batch when the descent reaches its starting t, and every step is one network call on all
active trajectories (plus, for PLMS, one call on the trajectories that have just joined). PLMS keeps its ε history
per trajectory, so a trajectory's multistep history starts empty at its own starting point.

`plms_stale` is the original's procedure number for number, for comparison: one MONAI PNDM scheduler
(`skip_prk_steps=True`) per image batch, reused across the starting points in ascending order, so each trajectory
inherits the ε history and step counter of the previous one, and the last step (from t = 0) keeps ᾱ_0. It runs the
starting points one after another, as the original does.
"""
from __future__ import annotations

import math
from typing import Callable, Optional

import torch
import torch.nn.functional as F

from oodbench.errors import OODBenchError

SAMPLERS = ("ddim", "plms", "plms_stale")

# Adams–Bashforth coefficients for PLMS by the number of stored ε's (current ε first, then older ones)
_PLMS_COEFFS = torch.tensor([
    [1.0, 0.0, 0.0, 0.0],
    [3 / 2, -1 / 2, 0.0, 0.0],
    [23 / 12, -16 / 12, 5 / 12, 0.0],
    [55 / 24, -59 / 24, 37 / 24, -9 / 24],
], dtype=torch.float64)


def scaled_linear_betas(T: int = 1000, beta_start: float = 0.0015, beta_end: float = 0.0195) -> torch.Tensor:
    """β_t = (linspace(√β_start, √β_end, T))², float64."""
    return torch.linspace(beta_start ** 0.5, beta_end ** 0.5, T, dtype=torch.float64) ** 2


class Diffusion:
    def __init__(self, T: int = 1000, beta_start: float = 0.0015, beta_end: float = 0.0195):
        self.T = T
        self.betas = scaled_linear_betas(T, beta_start, beta_end)
        self.alphas_cumprod = torch.cumprod(1.0 - self.betas, dim=0)       # float64, on the CPU

    # --- training -------------------------------------------------------------------------------------------
    def _abar(self, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        return self.alphas_cumprod.to(like.device)[t].to(like.dtype).view(-1, *([1] * (like.dim() - 1)))

    def q_sample(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """x_t = √ᾱ_t x0 + √(1-ᾱ_t) ε for per-sample timesteps t (B,)."""
        a = self._abar(t, x0)
        return a.sqrt() * x0 + (1 - a).sqrt() * noise

    def loss(self, model: Callable, x0: torch.Tensor, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """ε-prediction MSE with t uniform over 0..T-1 (seeded when a generator is given)."""
        t = torch.randint(0, self.T, (x0.shape[0],), device=x0.device, generator=generator)
        noise = torch.randn(x0.shape, device=x0.device, dtype=x0.dtype, generator=generator)
        return F.mse_loss(model(self.q_sample(x0, t, noise), t).float(), noise.float())

    # --- schedules ------------------------------------------------------------------------------------------
    def inference_timesteps(self, num_steps: int) -> torch.Tensor:
        """The sub-sampled schedule, ascending: {0, 10, ..., 990} for 100 steps of T = 1000."""
        if not isinstance(num_steps, int) or num_steps < 1 or num_steps > self.T or self.T % num_steps:
            divisors = [d for d in (10, 20, 25, 50, 100, 200, 250, 500, 1000) if self.T % d == 0]
            raise OODBenchError(f"ddpm.num_inference_steps={num_steps!r} must divide T={self.T} "
                                f"(e.g. one of {divisors}); 100 is the paper's setting")
        return torch.arange(num_steps) * (self.T // num_steps)

    def starting_points(self, num_steps: int, skip: int, min_t: int = 0, max_t: Optional[int] = None) -> torch.Tensor:
        """Indices into the schedule of the starting points, the original's `reversed(timesteps)[1::skip]`:
        1, 1 + skip, 1 + 2 skip, ... (t = 0 is never a start), with min_t <= t < max_t."""
        ts = self.inference_timesteps(num_steps)
        if not isinstance(skip, int) or skip < 1 or skip > num_steps - 1:
            raise OODBenchError(f"ddpm.inference_skip_factor={skip!r} must be an integer from 1 to "
                                f"num_inference_steps - 1 = {num_steps - 1}")
        idx = torch.arange(1, num_steps, skip)
        t = ts[idx]
        keep = (t >= min_t) & (t < (self.T if max_t is None else max_t))
        if not keep.any():
            raise OODBenchError(f"no starting point t in {t.tolist()} satisfies ddpm.min_t={min_t} <= t < "
                                f"ddpm.max_t={max_t}; widen the range")
        return idx[keep]

    @staticmethod
    def network_evaluations(start_idx: torch.Tensor, sampler: str = "ddim") -> int:
        """Network evaluations per image: start index i needs i+1 steps (+1 for PLMS's first-step correction; the
        original's stale PLMS makes its correction inside its i+1 calls)."""
        n = int((start_idx + 1).sum())
        return n + int((start_idx > 0).sum()) if sampler == "plms" else n

    # --- reconstruction -------------------------------------------------------------------------------------
    def reconstruct(self, model: Callable, x0: torch.Tensor, start_idx: torch.Tensor, num_steps: int,
                    sampler: str = "ddim", noise: Optional[torch.Tensor] = None,
                    generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """Noise x0 (B, ...) to every starting point and denoise back; returns (S, B, ...) in the order of start_idx.

        `noise` (S, B, ...) is the ε used for each starting point (drawn with `generator` when None).
        `model(x, t)` predicts ε; it is called once per schedule step on all active trajectories.
        """
        if sampler not in SAMPLERS:
            raise OODBenchError(f"ddpm.sampler={sampler!r}: use one of {', '.join(SAMPLERS)}")
        ts = self.inference_timesteps(num_steps).tolist()
        S, B = len(start_idx), x0.shape[0]
        if noise is None:
            noise = torch.randn((S, *x0.shape), device=x0.device, dtype=x0.dtype, generator=generator)
        if sampler == "plms_stale":
            return self._reconstruct_stale(model, x0, start_idx, ts, noise)
        order = sorted(range(S), key=lambda s: -int(start_idx[s]))          # highest start first
        starts = [int(start_idx[s]) for s in order]
        if len(set(starts)) != S:
            raise OODBenchError("starting points must be distinct")
        abar = self.alphas_cumprod.tolist()
        plms = sampler == "plms"

        x = x0.new_empty((S * B, *x0.shape[1:]))                            # rows [k*B, (k+1)*B): trajectory set k
        if plms:  # ring buffer: the ε of step j sits in slot j % 3; rows that joined later hold zeros
            history = x0.new_zeros((3, S * B, *x0.shape[1:]))
            counts = torch.zeros(S * B, dtype=torch.long, device=x0.device)  # ε's seen by each row
            coeffs = _PLMS_COEFFS.to(device=x0.device, dtype=x0.dtype)
        active = 0                                                          # active rows: x[:active]
        for j in range(starts[0], -1, -1):
            t, a_t = ts[j], abar[ts[j]]
            a_prev = abar[ts[j - 1]] if j > 0 else 1.0
            joined = active
            while active // B < S and starts[active // B] == j:
                x[active:active + B] = self.q_sample(x0, torch.full((B,), t, device=x0.device), noise[order[active // B]])
                active += B
            xa = x[:active]
            eps = model(xa, torch.full((active,), t, device=x0.device, dtype=torch.long)).to(x0.dtype)
            if not plms:
                x[:active] = _ddim_step(xa, eps, a_t, a_prev)
                continue
            c = coeffs[counts[:active].clamp(max=3)]                        # (active, 4)
            shape = (active,) + (1,) * (x0.dim() - 1)
            eps_mix = c[:, 0].view(shape) * eps
            for age in (1, 2, 3):                                           # ε of step j + age
                eps_mix += c[:, age].view(shape) * history[(j + age) % 3, :active]
            if j > 0 and joined < active:                                   # first step of new trajectories: Heun
                new = slice(joined, active)
                x_euler = _ddim_step(xa[new], eps[new], a_t, a_prev)
                t_prev = torch.full((active - joined,), ts[j - 1], device=x0.device, dtype=torch.long)
                eps_mix[new] = 0.5 * (eps[new] + model(x_euler, t_prev).to(x0.dtype))
            history[j % 3, :active] = eps
            counts[:active] += 1
            x[:active] = _ddim_step(xa, eps_mix, a_t, a_prev)
        out = x.view(S, B, *x0.shape[1:])
        inverse = torch.empty(S, dtype=torch.long)
        inverse[torch.tensor(order)] = torch.arange(S)
        return out[inverse.to(x0.device)]


    def _reconstruct_stale(self, model: Callable, x0: torch.Tensor, start_idx: torch.Tensor, ts: list,
                           noise: torch.Tensor) -> torch.Tensor:
        """The original's PLMS: one scheduler state for the whole batch, carried across the starting points in
        ascending order (see the module docstring). MONAI's PNDM update (its formula 9) is the DDIM step."""
        abar = self.alphas_cumprod.tolist()
        stride = ts[1] - ts[0] if len(ts) > 1 else 1
        out = x0.new_empty((len(start_idx), *x0.shape))
        ets, counter, held = [], 0, None            # the scheduler's ε history, step counter and held sample
        for s in sorted(range(len(start_idx)), key=lambda s: int(start_idx[s])):
            x = self.q_sample(x0, torch.full((x0.shape[0],), ts[int(start_idx[s])], device=x0.device), noise[s])
            for j in range(int(start_idx[s]), -1, -1):
                step = ts[j]
                eps = model(x, torch.full((x0.shape[0],), step, device=x0.device, dtype=torch.long)).to(x0.dtype)
                t, t_prev = step, step - stride
                if counter == 1:                    # the correction of the scheduler's first step
                    t, t_prev = step + stride, step
                    eps_mix, x = (eps + ets[-1]) / 2, held
                else:
                    ets = ets[-3:] + [eps]
                    if len(ets) == 1:
                        eps_mix, held = eps, x
                    else:
                        c = _PLMS_COEFFS[len(ets) - 1].tolist()
                        eps_mix = sum(c[a] * ets[-1 - a] for a in range(len(ets)))
                counter += 1
                x = _ddim_step(x, eps_mix, abar[t], abar[t_prev] if t_prev >= 0 else abar[0])
            out[s] = x
        return out


def _ddim_step(x: torch.Tensor, eps: torch.Tensor, a_t: float, a_prev: float) -> torch.Tensor:
    """Deterministic DDIM (η = 0) from ᾱ_t to ᾱ_prev given the predicted ε."""
    x0_pred = (x - math.sqrt(1 - a_t) * eps) / math.sqrt(a_t)
    return math.sqrt(a_prev) * x0_pred + math.sqrt(1 - a_prev) * eps
