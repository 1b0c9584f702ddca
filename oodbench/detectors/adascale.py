"""AdaSCALE (Regmi et al., 2025): SCALE with a per-sample percentile that adapts to how much the top activations move
under a small input perturbation, as OpenOOD v1.5's `adascale_a` / `adascale_l` postprocessors
(`openood/postprocessors/adascale_postprocessor.py`, `openood/networks/adascale_net.py`).

Per image: the gradient of the top logit w.r.t. the (normalised) input; the fraction `o` of input values with the
smallest |gradient| are moved by 0.5·sign(gradient); a second pass gives the perturbed features z'. With the indices
of the top k1 % (k2 %) features of z,
    Q' = Σ_top-k1 relu(z')  +  λ · Σ_top-k2 |z − z'|,
and the percentile is p = p_min + (1 − ECDF_val(Q')) · (p_max − p_min), the ECDF taken over the ID validation
images (at most `num_samples`, drawn with `seed`). The scale s = Σ relu(z) / Σ of the top (D − round(D·p/100))
of relu(z) enters the logits as head(z · exp(s)) (adascale_a, activation scaling) or head(z) · s² (adascale_l, logit
scaling); the score is the energy −logsumexp. Cost: one forward and backward pass plus a second forward pass per
batch (scores need input gradients, so they are not computed from stored features).
"""
from __future__ import annotations

import torch

from oodbench.detectors.base import Option, register
from oodbench.detectors.posthoc import PostHoc, energy
from oodbench.errors import OODBenchError

# OpenOOD's adascale_a.yml / adascale_l.yml sweep: every (p_min, p_max) with p_min < p_max from 60..95 / 65..99.
_EDGES = (60, 65, 70, 75, 80, 85, 90, 95, 99)
PERCENTILE_GRID = tuple([a, b] for i, a in enumerate(_EDGES[:-1]) for b in _EDGES[i + 1:])


def ada_scale(features: torch.Tensor, percentiles: torch.Tensor) -> torch.Tensor:
    """(B, 1) scales Σ relu(z) / Σ top-k relu(z) with k = D − round(D·p/100) per row (OpenOOD's `ada_scale`)."""
    x = features.relu()
    n = x.shape[1]
    ks = (n - torch.round(n * percentiles.double() / 100.0)).long().clamp_min(1)
    values = x.topk(int(ks.max()), dim=1).values
    mask = torch.arange(values.shape[1], device=x.device)[None, :] < ks[:, None]
    return x.sum(1, keepdim=True) / (values * mask).sum(1, keepdim=True)


class AdaScale(PostHoc):
    fit_on = "val"
    array_level = False   # input gradients: one forward+backward and one more forward pass per batch
    logit_scaling = False
    OPTIONS = {
        "percentile": Option([75, 85], "[p_min, p_max] of the adaptive percentile, in % (adascale_*.yml; the "
                                       "authors' ResNet-50 choice is [80, 85])", grid=PERCENTILE_GRID,
                             any_type=True),
        "k1": Option(5.0, "% of the top features whose perturbed activations enter Q' (adascale_*.yml)", grid=(5.0,)),
        "k2": Option(1.0, "% of the top features whose shift |z - z'| enters Q' (adascale_*.yml)", grid=(1.0,)),
        "lmbda": Option(10.0, "weight λ of the shift term of Q' (adascale_*.yml)", grid=(10.0,)),
        "o": Option(0.05, "fraction of input values perturbed, those of smallest |gradient| (adascale_*.yml)",
                    grid=(0.05,)),
        "num_samples": Option(5000, "validation images the ECDF of Q' is taken over (adascale_*.yml)"),
        "seed": Option(0, "seed of the draw of num_samples validation images (when there are more)"),
    }

    def check(self) -> tuple:
        o = self.options
        p = o["percentile"]
        if not (isinstance(p, (list, tuple)) and len(p) == 2 and all(isinstance(v, (int, float)) and
                                                                      not isinstance(v, bool) for v in p)
                and 0 < p[0] <= p[1] < 100):
            raise OODBenchError(f"{self.name}.percentile must be [p_min, p_max] with 0 < p_min <= p_max < 100, "
                                f"got {p!r}")
        for key in ("k1", "k2"):
            if not 0 < float(o[key]) <= 100:
                raise OODBenchError(f"{self.name}.{key} is a percentage in (0, 100], got {o[key]}")
        if not 0 < float(o["o"]) <= 1:
            raise OODBenchError(f"{self.name}.o is a fraction in (0, 1], got {o['o']}")
        if float(o["lmbda"]) < 0:
            raise OODBenchError(f"{self.name}.lmbda must be >= 0, got {o['lmbda']}")
        if int(o["num_samples"]) < 1:
            raise OODBenchError(f"{self.name}.num_samples must be >= 1, got {o['num_samples']}")
        return float(p[0]), float(p[1])

    # -- the perturbed pass -----------------------------------------------------------------------------------------
    def outputs(self, x):
        self.check()
        model, frac = self.require_model(), float(self.options["o"])
        with torch.enable_grad():
            inp = model.prepare(x).detach().requires_grad_(True)
            features, logits = model.forward_split(inp)
            top = logits.gather(1, logits.detach().argmax(1, keepdim=True)).sum()
            (grad,) = torch.autograd.grad(top, inp)
        b = len(inp)
        flat = grad.abs().reshape(b, -1)
        n_pixels = int(flat.shape[1] * frac)
        mask = torch.zeros_like(flat)
        if n_pixels > 0:
            mask.scatter_(1, flat.topk(n_pixels, dim=1, largest=False).indices, 1.0)
        with torch.no_grad():
            perturbed = inp.detach() + grad.sign() * mask.view_as(grad) * 0.5
            features_p, _ = model.forward_split(perturbed)
        return {"features": features.detach().float(), "logits": logits.detach().float(),
                "perturbed": features_p.float()}

    def outputs_key(self):
        return ("adascale", float(self.options["o"]))

    def reference_pass(self):
        return "adascale", self.outputs, self.outputs_key()

    # -- statistics and scores --------------------------------------------------------------------------------------
    def shift_norm(self, features, perturbed) -> torch.Tensor:
        """Q' = Σ_top-k1 relu(z') + λ Σ_top-k2 |z − z'|, the top indices taken on z."""
        d = features.shape[1]
        k1, k2 = int(d * float(self.options["k1"]) / 100), int(d * float(self.options["k2"]) / 100)
        # OpenOOD truncates: with few features a term may keep none (and then adds 0), as there.
        c = perturbed.relu().gather(1, features.topk(k1, dim=1).indices).sum(1)
        q = (features - perturbed).abs().gather(1, features.topk(k2, dim=1).indices).sum(1)
        return c + float(self.options["lmbda"]) * q

    def fit_outputs(self, ref):
        self.check()
        n = len(ref["features"])
        g = torch.Generator().manual_seed(int(self.options["seed"]))
        keep = torch.randperm(n, generator=g)[:int(self.options["num_samples"])].to(ref["features"].device)
        norms = self.shift_norm(ref["features"][keep], ref["perturbed"][keep])
        return norms.double().sort().values

    def percentiles(self, features, perturbed) -> torch.Tensor:
        low, high = self.check()
        sorted_norms = self.stats_
        norms = self.shift_norm(features, perturbed).double()
        ecdf = torch.searchsorted(sorted_norms, norms, right=True).double() / len(sorted_norms)
        return low + (1 - ecdf) * (high - low)

    def score_outputs(self, out):
        features = out["features"]
        scale = ada_scale(features, self.percentiles(features, out["perturbed"])).to(features.dtype)
        if self.logit_scaling:
            logits = self.head_logits(features) * scale ** 2
        else:
            logits = self.head_logits(features * torch.exp(scale))
        return -energy(logits)


@register("adascale_a")
class AdaScaleA(AdaScale):
    summary = "AdaSCALE-A: SCALE with a per-sample percentile set by the features' shift under input perturbation, " \
              "activation scaling (Regmi et al. 2025)"


@register("adascale_l")
class AdaScaleL(AdaScale):
    summary = "AdaSCALE-L: AdaSCALE's adaptive scale applied to the logits, head(z)·s² (Regmi et al. 2025)"
    logit_scaling = True
