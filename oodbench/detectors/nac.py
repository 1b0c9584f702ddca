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
repository has no `nac` postprocessor) differs: it sums the map z and its gradient over space separately and takes
σ(α·Σz·Σg), bins with its own log-spaced edges, averages (not sums) the layers, and tunes α, M, O* per layer (ImageNet
ResNet-50: the avgpool output alone, O* 10, M 50, α 3000). Here one value serves every layer (pytorch-ood's defaults;
per-layer lists are accepted) and there is no `--tune` grid.
"""
from __future__ import annotations

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


@register("nac")
class NAC(PostHoc):
    summary = "neuron activation coverage of z·dKL(softmax||uniform)/dz over the model's layers (Liu et al. 2024)"
    OPTIONS = {
        "alpha": Option(100.0, "sigmoid steepness α: a number, or one per layer (pytorch-ood NACUE)", any_type=True),
        "m_bins": Option(50, "histogram bins M per neuron: a number, or one per layer (pytorch-ood NACUE)",
                         any_type=True),
        "o_star": Option(50, "count O* of a bin that means full coverage: a number, or one per layer (pytorch-ood "
                             "NACUE)", any_type=True),
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

    def settings(self) -> list:
        return list(zip(self.require_model().layer_names(), self.per_layer("alpha", float, 0.0),
                        self.per_layer("m_bins", int, 2), self.per_layer("o_star", int, 1)))

    def outputs(self, x):
        self.settings()   # bad options: a one-line error before the pass
        model = self.require_model()
        layers = model.layer_names()
        with torch.enable_grad():
            maps, logits = model.forward_maps(model.prepare(x), layers)
            p = logits.float().softmax(1)
            loss = -torch.log(p + 1e-12).mean(1).sum()
            grads = torch.autograd.grad(loss, [maps[n] for n in layers])
        out = {}
        for name, g in zip(layers, grads):
            prod = (maps[name] * g).detach().float()
            out[f"nac/{name}"] = prod.mean((2, 3)) if prod.dim() == 4 else prod.flatten(1)
        return out

    def outputs_key(self):
        return ("nac", *self.require_model().layer_names())

    def reference_pass(self):
        return "nac", self.outputs, self.outputs_key()

    def fit_outputs(self, ref):
        counts = {}
        for name, alpha, m, _ in self.settings():
            states = ref[f"nac/{name}"]                                                  # (N, neurons)
            n = states.shape[1]
            offsets = torch.arange(n, device=states.device) * m
            table = torch.zeros(n * m, dtype=torch.long, device=states.device)
            step = max(1, FIT_BLOCK // max(1, n))    # rows at a time: no (N × neurons) int64 temporaries
            for start in range(0, len(states), step):
                idx = geometric_bins(torch.sigmoid(alpha * states[start:start + step]), m)
                table += torch.bincount((idx + offsets).flatten(), minlength=n * m)
            counts[name] = table.view(n, m)
        return counts

    def score_outputs(self, out):
        total = 0
        for name, alpha, m, o_star in self.settings():
            counts = self.stats_[name]
            if counts.shape[1] != m:
                raise OODBenchError(f"nac: fitted with {counts.shape[1]} bins on {name}, scored with m_bins={m}: fit "
                                    f"again")
            idx = geometric_bins(torch.sigmoid(alpha * out[f"nac/{name}"]), m)
            hits = counts.gather(1, idx.T).T.float()                                     # (B, neurons)
            total = total + (hits / o_star).clamp(max=1.0).mean(1)
        return -total
