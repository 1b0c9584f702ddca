"""pNML regret (Bibas et al., NeurIPS 2021): the predictive normalised maximum likelihood of the last layer.

With L2-normalised training features X (N, D), G = (X^T X)^+ and a test feature z (normalised):
κ = zᵀGz / (1 + zᵀGz), p = softmax(head(z)) (the head on the *normalised* feature, with its bias, as the authors'
`LitBaseline.forward` computes it), and the regret R = log Σ_c p_c / (p_c + (1 − p_c) p_c^κ) / log C ∈ [0, 1];
higher = OOD. Equal to the authors' code (kobybibas/pnml_ood_detection) and pytorch-ood's `PNML`; computed in log
space (no clamping of p, which pytorch-ood does at 1e-12). The Gram matrix is accumulated in float64 chunk by chunk:
memory D × D, not N × D.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from oodbench.detectors.base import register
from oodbench.detectors.posthoc import PostHoc

CHUNK = 65536


def normalised_gram_pinv(features: torch.Tensor) -> torch.Tensor:
    """(X^T X)^+ of the row-normalised features, float64, from chunks of rows."""
    gram = features.new_zeros((features.shape[1],) * 2, dtype=torch.float64)
    for start in range(0, len(features), CHUNK):
        x = F.normalize(features[start:start + CHUNK].double(), dim=1)
        gram += x.T @ x
    return torch.linalg.pinv(gram, hermitian=True)


def pnml_regret(z: torch.Tensor, logits: torch.Tensor, gram_pinv: torch.Tensor) -> torch.Tensor:
    """Normalised regret (B,) of normalised features z and the logits of head(z), in log space."""
    z = z.double()
    proj = ((z @ gram_pinv) * z).sum(1, keepdim=True)
    kappa = proj / (1 + proj)
    log_p = logits.double().log_softmax(1)
    # p / (p + (1-p) p^κ) = 1 / (1 + (1-p) p^(κ-1)): its log is −softplus(log(1-p) + (κ-1) log p)
    log_terms = -F.softplus(torch.log1p(-log_p.exp()) + (kappa - 1) * log_p)
    return (torch.logsumexp(log_terms, 1) / math.log(logits.shape[1])).float()


@register("pnml")
class PNML(PostHoc):
    summary = "pNML regret of the last layer on L2-normalised features (Bibas et al. 2021)"

    def fit_outputs(self, ref):
        return normalised_gram_pinv(ref["features"])

    def score_outputs(self, out):
        z = F.normalize(out["features"], dim=1)
        return pnml_regret(z, self.head_logits(z), self.stats_)
