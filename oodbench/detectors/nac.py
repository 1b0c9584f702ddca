"""NAC: neuron activation coverage (Liu et al., ICLR 2024), as pytorch-ood 0.4.0's `NACUE`.

Per image and layer l of `model.layers` (default `models.auto_layers`: OpenOOD's feature list on ResNets), the
neuron state is g = reduce(z ⊙ ∂KL/∂z): z the layer's output, KL the divergence of the softmax from the uniform
distribution (up to a constant, −mean_k log(p_k + 1e-12)), reduce the spatial mean of a (B, C, H, W) map (a flatten
otherwise). σ(α·g) is put in one of M bins per neuron, geometric (dense near 0 and 1; pytorch-ood's
`_bin_indices_geometric`). Fit counts, over the ID training images, how often each neuron falls in each bin; a scored
image gets Σ_l mean_neurons min(count of its bin / O*, 1), negated (higher = more OOD).

Cost: one forward and one backward pass per batch, for fit and score alike (no parameter gradients are kept). The
fit keeps the (images × neurons) float32 states of every layer of the fit set in memory (the workflow's shared
reference pass), then bins them in blocks of FIT_BLOCK states into an (neurons × M) int64 count table per layer;
pytorch-ood keeps only the counts.
The authors' code (BierOne/ood_coverage, an OpenOOD fork: `openood/postprocessors/nac/`; OpenOOD v1.5's own
repository has no `nac` postprocessor) differs, and `variant="authors"` follows it: the map z and its gradient are
each summed over space and the state is σ(α·Σz·Σg), its bins are the intervals between its own log-spaced edges
(`authors_edges`; a state in none counts nothing), and the layers are averaged, not summed. Its per-layer tuned
values (ImageNet ResNet-50: the avgpool output alone, O* 10, M 50, α 3000) are per-layer lists here; there is no
`--tune` grid.
"""
from __future__ import annotations

import numpy as np
import torch

from oodbench.detectors.base import Option, register
from oodbench.detectors.posthoc import PostHoc
from oodbench.errors import OODBenchError

FIT_BLOCK = 2 ** 22   # neuron states binned at once while counting


def geometric_bins(z_hat: torch.Tensor, m: int, eps: float = 1e-6) -> torch.Tensor:
    """Bin index in {0..m-1} of values in (0, 1) for m bins whose edges are log-spaced from eps to 0.5 and mirrored
    to 1 − eps (pytorch-ood's `_bin_indices_geometric`)."""
    z = z_hat.clamp(eps, 1 - eps)
    half = m // 2
    left = torch.logspace(torch.log10(torch.tensor(eps)).item(), torch.log10(torch.tensor(0.5)).item(), half + 1,
                          device=z.device, dtype=z.dtype)
    edges = torch.cat([left, (1.0 - left.flip(0))[1:]])
    return (torch.bucketize(z, edges, right=False) - 1).clamp(0, m - 1)


def authors_edges(m: int) -> torch.Tensor:
    """The authors' bin edges (ood_coverage's `logspace(1e3, M)`): log_1000 of m//2 points evenly spaced in
    [1, √1000], i.e. 0 … 0.5, mirrored to 1, the last edge moved to 1.01 and 1.2 appended (float64)."""
    half = np.emath.logn(1e3, np.linspace(1, np.sqrt(1e3), num=m // 2))
    edges = np.concatenate([half[:-1], (1 - half)[::-1]])
    edges[-1] += 1e-2
    return torch.from_numpy(np.append(edges, 1.2))


def bins(z_hat: torch.Tensor, m: int, variant: str) -> tuple:
    """(bin index, whether the value falls in a bin) of each state, and the number of bins: pytorch-ood's M
    geometric bins (every value in one), or the authors' intervals [t_i, t_i+1) between their edges."""
    if variant == "nacue":
        return geometric_bins(z_hat, m), None, m
    edges = authors_edges(m).to(z_hat.device)
    idx = torch.bucketize(z_hat.double(), edges, right=True) - 1
    width = len(edges) - 1
    valid = (idx >= 0) & (idx < width)
    return idx.clamp(0, width - 1), valid, width


@register("nac")
class NAC(PostHoc):
    summary = "neuron activation coverage of z·dKL(softmax||uniform)/dz over the model's layers (Liu et al. 2024)"
    OPTIONS = {
        "alpha": Option(100.0, "sigmoid steepness α: a number, or one per layer (pytorch-ood NACUE)", any_type=True),
        "m_bins": Option(50, "histogram bins M per neuron: a number, or one per layer (pytorch-ood NACUE)",
                         any_type=True),
        "o_star": Option(50, "count O* of a bin that means full coverage: a number, or one per layer (pytorch-ood "
                             "NACUE)", any_type=True),
        "variant": Option("nacue", "nacue: pytorch-ood 0.4.0's NACUE (spatial mean of z·g, geometric bins, layers "
                                   "summed); authors: the authors' ood_coverage code (σ(α·Σz·Σg), its log-spaced "
                                   "bins, layers averaged)"),
    }
    array_level = False   # layer gradients: one forward and backward pass per batch

    def per_layer(self, key: str, cast, low: float) -> list:
        layers, value = self.require_model().layer_names(), self.options[key]
        values = value if isinstance(value, list) else [value] * len(layers)
        if len(values) != len(layers) or not all(isinstance(v, (int, float)) and not isinstance(v, bool)
                                                 and v >= low for v in values):
            raise OODBenchError(f"nac.{key} must be a number >= {low:g} or one per layer ({len(layers)}: "
                                f"{', '.join(layers)}), got {value!r}")
        return [cast(v) for v in values]

    def variant(self) -> str:
        if self.options["variant"] not in ("nacue", "authors"):
            raise OODBenchError(f"nac.variant is 'nacue' or 'authors', got {self.options['variant']!r}")
        return self.options["variant"]

    def sigmoid(self, alpha: float, states: torch.Tensor) -> torch.Tensor:
        if self.variant() == "authors":
            return 1 / (1 + torch.exp(-alpha * states))       # as ood_coverage's utils.sigmoid
        return torch.sigmoid(alpha * states)

    def settings(self) -> list:
        rows = list(zip(self.require_model().layer_names(), self.per_layer("alpha", float, 0.0),
                        self.per_layer("m_bins", int, 2), self.per_layer("o_star", int, 1)))
        if self.variant() == "authors" and any(m % 2 or m < 4 for _, _, m, _ in rows):
            raise OODBenchError(f"nac.variant=authors needs an even nac.m_bins >= 4 (its edges come in two mirrored "
                                f"halves), got {self.options['m_bins']!r}")
        return rows

    def outputs(self, x):
        self.settings()   # bad options: a one-line error before the pass
        model = self.require_model()
        layers = model.layer_names()
        with torch.enable_grad():
            maps, logits = model.forward_maps(model.prepare(x), layers)
            if self.variant() == "authors":   # cross-entropy against the uniform distribution (instr_state.kl_grad)
                loss = -(logits.float().log_softmax(1) / logits.shape[1]).sum()
            else:
                loss = -torch.log(logits.float().softmax(1) + 1e-12).mean(1).sum()
            grads = torch.autograd.grad(loss, [maps[n] for n in layers])
        out = {}
        for name, g in zip(layers, grads):
            z, g = maps[name].detach().float(), g.detach().float()
            if self.variant() == "authors":   # each summed over space, then multiplied (utils.avg_pooling)
                prod = z.sum((2, 3)) * g.sum((2, 3)) if z.dim() == 4 else (z * g).flatten(1)
            else:
                prod = (z * g).mean((2, 3)) if z.dim() == 4 else (z * g).flatten(1)
            out[f"nac/{name}"] = prod
        return out

    def outputs_key(self):
        return ("nac", self.variant(), *self.require_model().layer_names())

    def reference_pass(self):
        return "nac", self.outputs, self.outputs_key()

    def fit_outputs(self, ref):
        counts = {}
        for name, alpha, m, _ in self.settings():
            states = ref[f"nac/{name}"]                                                  # (N, neurons)
            n, width = states.shape[1], bins(states[:1], m, self.variant())[2]
            offsets = torch.arange(n, device=states.device) * width
            table = torch.zeros(n * width, dtype=torch.long, device=states.device)
            step = max(1, FIT_BLOCK // max(1, n))    # rows at a time: no (N × neurons) int64 temporaries
            for start in range(0, len(states), step):
                idx, valid, _ = bins(self.sigmoid(alpha, states[start:start + step]), m, self.variant())
                flat = (idx + offsets).flatten()
                if valid is None:
                    table += torch.bincount(flat, minlength=n * width)
                else:
                    table += torch.bincount(flat, weights=valid.flatten().double(), minlength=n * width).long()
            counts[name] = table.view(n, width)
        return counts

    def score_outputs(self, out):
        total, settings = 0, self.settings()
        for name, alpha, m, o_star in settings:
            counts = self.stats_[name]
            idx, valid, width = bins(self.sigmoid(alpha, out[f"nac/{name}"]), m, self.variant())
            if counts.shape[1] != width:
                raise OODBenchError(f"nac: fitted with {counts.shape[1]} bins on {name}, scored with m_bins={m} "
                                    f"({width} bins): fit again")
            coverage = (counts.gather(1, idx.T).T.float() / o_star).clamp(max=1.0)      # (B, neurons)
            if valid is not None:
                coverage = coverage * valid
            total = total + coverage.mean(1)
        return -(total / len(settings) if self.variant() == "authors" else total)
