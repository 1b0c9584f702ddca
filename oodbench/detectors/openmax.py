"""OpenMax (Bendale & Boult 2016): the probability of an "unknown" class after Weibull recalibration of the logits.

Per in-distribution class: the mean logit vector (MAV) of the training images it classifies correctly and a Weibull
model of the largest `tailsize` Euclidean distances to it. The Weibull fit is libMR's `FitHigh` done with scipy:
the tail is shifted so that its minimum sits at `translation` and a two-parameter Weibull (scipy's `exponweib` with
a = 1, loc = 0) is fitted by maximum likelihood. libMR's Python `MR()` (libmr 0.1.9, what OpenOOD calls) translates by
1, the default here; pytorch-ood's `LibNotMR` by 10000 (`translation=10000`). Defaults are OpenOOD v1.5's
(`openmax_postprocessor.py`: tail 20, α 3, Euclidean distance).
"""
from __future__ import annotations

import numpy as np
import torch
from scipy.stats import exponweib

from oodbench.detectors.base import Option, register
from oodbench.detectors.posthoc import LogitScore
from oodbench.errors import OODBenchError


def fit_weibull(distances: np.ndarray, tailsize: int, translation: float) -> tuple[float, float, float]:
    """(shift, shape c, scale) of a Weibull fitted to the `tailsize` largest distances, shifted by `shift` so that
    the smallest of them sits at `translation` (libMR's translate_amount)."""
    tail = np.sort(distances)[-tailsize:]
    shift = translation - float(tail.min())
    _, c, _, scale = exponweib.fit(tail + shift, f0=1, floc=0)
    return shift, float(c), float(scale)


def positive_int(det, key: str) -> int:
    value = det.options[key]
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise OODBenchError(f"{det.name}.{key} must be a positive integer, got {value!r}")
    return value


@register("openmax")
class OpenMax(LogitScore):
    summary = "probability of the unknown class after Weibull recalibration of the top-alpha logits " \
              "(Bendale & Boult 2016)"
    fit_on = "train"
    needs_labels = True
    OPTIONS = {"tailsize": Option(20, "largest distances per class the Weibull is fitted to (OpenOOD "
                                      "openmax_postprocessor.py)"),
               "alpha": Option(3, "top classes whose logits are revised (OpenOOD weibull_alpha)"),
               "translation": Option(1.0, "where the tail's smallest distance is shifted to before the Weibull fit "
                                          "(libMR translate_amount: libmr's MR() default 1, as OpenOOD; pytorch-ood "
                                          "10000)")}

    def fit_outputs(self, ref):
        tailsize = positive_int(self, "tailsize")
        translation = self.options["translation"]
        if isinstance(translation, bool) or not isinstance(translation, (int, float)) or not translation > 0:
            raise OODBenchError(f"openmax.translation must be a positive number, got {translation!r}")
        classes, index = ref["labels"].long().unique(return_inverse=True)
        logits = ref["logits"][:, classes].double()
        correct = logits.argmax(1) == index
        centres = torch.zeros(len(classes), len(classes), dtype=torch.float64, device=logits.device)
        weibull = torch.full((len(classes), 3), float("nan"), dtype=torch.float64, device=logits.device)
        for k in range(len(classes)):
            own = logits[correct & (index == k)]
            if len(own):            # a class no training image is correctly classified as has no model: w = 1
                centres[k] = own.mean(0)
                distances = (own - centres[k]).norm(dim=1).cpu().numpy()
                weibull[k] = torch.tensor(fit_weibull(distances, tailsize, float(translation)), dtype=torch.float64)
        return classes, centres, weibull

    def score_logits(self, logits):
        classes, centres, weibull = self.stats_
        alpha = min(positive_int(self, "alpha"), len(classes))
        x = logits[:, classes].double()
        shift, c, scale = (weibull[:, i] for i in range(3))
        d = (torch.cdist(x, centres) + shift).clamp_min(0)
        w = torch.where(torch.isnan(c), torch.ones_like(d), -torch.expm1(-(d / scale) ** c))   # Weibull CDF
        ranks = torch.arange(alpha, 0, -1, dtype=x.dtype, device=x.device) / alpha              # 1, (α-1)/α, …
        omega = torch.zeros_like(x).scatter_(1, x.topk(alpha, dim=1).indices, ranks.expand(len(x), -1))
        revised = x * (1 - w * omega)
        unknown = (x - revised).sum(1, keepdim=True)
        return torch.cat([unknown, revised], 1).softmax(1)[:, 0].float()
