"""Test-only reference implementations: the straightforward (slow) ways that the fast code in oodbench must equal.

Used by tests/test_gradients.py, tests/test_metrics.py and scripts/perf/bench_gradients.py / bench_metrics.py (which
put the repository root on sys.path and import `tests.references`). Not part of the package.
"""
from __future__ import annotations

from typing import Dict

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F


# ---- per-image autograd references for oodbench/detectors/gradients.py ------------------------------------------
def gradnorm_per_sample(net, x: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """GradNorm as the original repository computes it: per image (batch of 1), forward and backward of the whole
    network for KL(u || softmax(z/T)), L1 norm of the head's weight gradient. Slow; `gradnorm_scores` must equal it.
    (The original code's targets are ones instead of 1/C, which multiplies every score by C; rankings are the same.)"""
    scores = []
    for i in range(len(x)):
        net.zero_grad()
        logits = net(x[i:i + 1])
        targets = torch.full_like(logits, 1.0 / logits.shape[1])
        loss = torch.mean(torch.sum(-targets * F.log_softmax(logits / temperature, dim=-1), dim=-1))
        loss.backward()
        scores.append(net.head.weight.grad.abs().sum())
    return torch.stack(scores)


def gradnorm_openood(net, x: torch.Tensor, temperature: float = 1.0, batch_size: int = 256) -> torch.Tensor:
    """GradNorm as OpenOOD's postprocessor computes it: batched penultimate features without gradients, then per
    image a backward through a copy of the head alone (rebuilt from NumPy arrays for every batch, as OpenOOD does),
    L1 norm of its weight gradient, one host copy per image. Targets are ones as there (score = C x ours); divided
    by C here so that it equals `gradnorm_scores`."""
    weight, bias = net.head.weight.detach().cpu().numpy(), net.head.bias.detach().cpu().numpy()
    num_classes = weight.shape[0]
    scores = []
    for start in range(0, len(x), batch_size):
        with torch.no_grad():
            features = net.features(x[start:start + batch_size]).cpu().numpy()
        fc = nn.Linear(weight.shape[1], num_classes).to(x.device)
        fc.weight.data[...] = torch.from_numpy(weight)
        fc.bias.data[...] = torch.from_numpy(bias)
        for h in torch.from_numpy(features).float().to(x.device):
            targets = torch.ones((1, num_classes), device=x.device)
            fc.zero_grad()
            loss = torch.mean(torch.sum(-targets * F.log_softmax(fc(h[None]) / temperature, dim=-1), dim=-1))
            loss.backward()
            scores.append(float(fc.weight.grad.abs().sum().cpu().numpy()))
    return torch.tensor(scores, dtype=torch.float32) / num_classes


def layer_norms_per_sample(net, x: torch.Tensor, names) -> Dict[str, torch.Tensor]:
    """Per image alone: CE(f(x), argmax) backward, L2 norm of each named weight's gradient. Slow; `per_layer_grad_norms`
    must equal it."""
    params = dict(net.named_parameters())
    rows = {name: [] for name in names}
    for i in range(len(x)):
        net.zero_grad()
        logits = net(x[i:i + 1])
        F.cross_entropy(logits, logits.argmax(1)).backward()
        for name in names:
            rows[name].append(params[name].grad.norm())
    return {name: torch.stack(v) for name, v in rows.items()}


# ---- scikit-learn reference for oodbench/metrics.py -------------------------------------------------------------
def sklearn_reference(id_scores, ood_scores) -> dict:
    """The metrics of oodbench.metrics.evaluate built only from scikit-learn (several sorts; slow). `evaluate` must
    equal it; tests and scripts/perf/bench_metrics.py compare against it."""
    from sklearn.metrics import average_precision_score, roc_auc_score, roc_curve

    scores = np.concatenate([np.asarray(id_scores, np.float64), np.asarray(ood_scores, np.float64)])
    is_ood = np.r_[np.zeros(len(id_scores)), np.ones(len(ood_scores))]
    fpr, tpr, _ = roc_curve(is_ood, scores, drop_intermediate=False)
    fpr_in, tpr_in, _ = roc_curve(1 - is_ood, -scores, drop_intermediate=False)
    return {
        "auroc": roc_auc_score(is_ood, scores),
        "aupr_in": average_precision_score(1 - is_ood, -scores),
        "aupr_out": average_precision_score(is_ood, scores),
        "fpr95": fpr_in[np.argmax(tpr_in >= 0.95)],
        "fpr95_openood": fpr[np.argmax(tpr >= 0.95)],
        "detection_error": np.min(0.5 * (1 - tpr) + 0.5 * fpr),
    }
