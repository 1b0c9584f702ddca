"""Post-hoc scores of the logits alone: Entropy, GEN, temperature scaling, KL matching.

Defaults follow OpenOOD v1.5 (`configs/postprocessors/<name>.yml`); see docs/baselines.md for the formulas.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from scipy.optimize import minimize_scalar

from oodbench.detectors.base import Option, register
from oodbench.detectors.posthoc import LogitScore


@register("entropy")
class Entropy(LogitScore):
    summary = "entropy of the softmax (Shannon; OpenOOD/pytorch-ood baseline)"

    def score_logits(self, logits):
        p = logits.softmax(1).clamp_min(1e-7)
        return -(p * p.log()).sum(1)


@register("gen")
class GEN(LogitScore):
    summary = "generalized entropy of the top-M softmax probabilities, exponent gamma (Liu et al. 2023)"
    OPTIONS = {"gamma": Option(0.1, "exponent of p^gamma (1-p)^gamma (gen.yml)", grid=(0.01, 0.1, 0.5, 1, 2, 5, 10)),
               "m": Option(100, "top-M probabilities (all classes when fewer)", grid=(10, 50, 100, 200, 500, 1000)),
               "clamp": Option(False, "clamp p to [1e-7, 1 - 1e-7] first, as pytorch-ood does (the paper's code and "
                                      "OpenOOD do not)")}

    def score_logits(self, logits):
        gamma, m = float(self.options["gamma"]), int(self.options["m"])
        if self.options["clamp"]:
            p = logits.softmax(1).clamp(1e-7, 1 - 1e-7)
            top = p.sort(1, descending=True).values[:, :m]
            return (top.pow(gamma) * (1 - top).pow(gamma)).sum(1)
        # no clamp: p^g (1-p)^g = exp(g (log p + log(1-p))) in float64, exact where 1 - p underflows in float32
        log_p = logits.double().log_softmax(1).sort(1, descending=True).values[:, :m]
        log_q = torch.where(log_p > -math.log(2), torch.log(-torch.expm1(log_p)), torch.log1p(-torch.exp(log_p)))
        return (gamma * (log_p + log_q)).exp().sum(1).to(logits.dtype)


@register("tempscale")
class TempScale(LogitScore):
    summary = "MSP after temperature scaling, T fitted by NLL on the ID validation split (Guo et al. 2017)"
    fit_on = "val"
    needs_labels = True

    def fit_outputs(self, ref):
        logits, labels = ref["logits"].double(), ref["labels"].long()

        def nll(log_t):
            return F.cross_entropy(logits / math.exp(log_t), labels).item()

        # One-dimensional and convex in 1/T: a bounded scalar search finds the optimum itself (no LBFGS tuning).
        return math.exp(minimize_scalar(nll, bounds=(-5.0, 5.0), method="bounded",
                                        options={"xatol": 1e-6}).x)

    def score_outputs(self, out):
        return -(out["logits"] / self.stats_).softmax(1).amax(1)


@register("klm")
class KLMatching(LogitScore):
    summary = "min KL divergence to class-mean softmax templates of the ID validation split (Hendrycks et al. 2022)"
    fit_on = "val"

    def fit_outputs(self, ref):
        p = ref["logits"].softmax(1)
        predicted = p.argmax(1)
        return torch.stack([p[predicted == k].mean(0) for k in predicted.unique()])

    def score_outputs(self, out):
        p = out["logits"].softmax(1)
        p_log_p = torch.where(p > 0, p * p.log(), torch.zeros_like(p)).sum(1, keepdim=True)
        log_d = self.stats_.log().nan_to_num(neginf=torch.finfo(p.dtype).min)
        return (p_log_p - p @ log_d.T).amin(1)
