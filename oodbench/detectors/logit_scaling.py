"""Logit scaling (LTS, Djurisic et al. 2025): the logits times a per-sample factor of the penultimate features, then
the energy score.

S(z) = (sum_i relu(z)_i / sum of the top-k relu(z)_i)^2 with k = D − round(D · percentile / 100) (at least 1), as in
the authors' code (github.com/andrijazz/lts, `lts.py`) and pytorch-ood's `LTS` (p = 1 − percentile / 100). The
ReLU is the authors' (the paper omits it); the logits themselves are the model's own, unshaped.
"""
from __future__ import annotations

import torch

from oodbench.detectors.base import Option, register
from oodbench.detectors.posthoc import PostHoc, energy
from oodbench.detectors.shaping import keep_count, percentile_option


def lts_factor(features: torch.Tensor, percentile: float) -> torch.Tensor:
    """S(z) (B,): (total activation / top-k activation)^2 of the rectified features."""
    z = features.relu()
    top = z.topk(keep_count(z.shape[1], percentile), dim=1).values.sum(1)
    return (z.sum(1) / top).square()


@register("lts")
class LTS(PostHoc):
    summary = "LTS: energy of the logits scaled by (total / top-k feature mass)^2 (Djurisic et al. 2025)"
    OPTIONS = {"percentile": Option(95, "% of activations below the top-k ones (pytorch-ood p=0.05; the authors "
                                        "sweep 65-95)", grid=(65, 70, 75, 80, 85, 90, 95))}
    fit_on = None

    def score_outputs(self, out):
        factor = lts_factor(out["features"], percentile_option(self))
        return -energy(out["logits"] * factor[:, None])
