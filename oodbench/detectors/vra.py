"""VRA: variational rectified activation (Xu et al., NeurIPS 2023), as OpenOOD v1.5's `vra` postprocessor
(`openood/postprocessors/vra_postprocessor.py`, `configs/postprocessors/vra.yml`).

The penultimate features are clipped from below and above, h' = min(max(h, α), β), and the model's own head scores
them with the energy −logsumexp(W·h' + b). α and β are the `percentile_low`-th and `percentile_high`-th percentiles
of the ID activations: as OpenOOD, one pair over every activation of the **validation** features (the default); as
pytorch-ood 0.4.0's `VRA`, one pair per feature over the training features (`thresholds=per_feature`,
`fit_split=train`). The paper's VRA-P also sets activations below α to 0 and adds γ to those in [α, β]; neither
reference does, nor does oodbench. Cost: the shared features-and-logits pass; scores come from stored features.
"""
from __future__ import annotations

import numpy as np
import torch

from oodbench.detectors.base import Option, register
from oodbench.detectors.posthoc import PostHoc, chosen_split, energy
from oodbench.errors import OODBenchError


@register("vra")
class VRA(PostHoc):
    summary = "energy after clipping features between two percentiles of the ID activations (Xu et al. 2023)"
    OPTIONS = {
        "percentile_high": Option(90, "clip from above at this percentile of the ID activations, in % (vra.yml)",
                                  grid=(85, 90, 95, 99)),
        "percentile_low": Option(10, "clip from below at this percentile of the ID activations, in % (vra.yml)",
                                 grid=(1, 5, 10, 15)),
        "thresholds": Option("global", "global: one pair over all activations (OpenOOD); per_feature: one pair per "
                                       "feature (pytorch-ood VRA)"),
        "fit_split": Option("val", "the ID split the thresholds come from: val (OpenOOD's vra postprocessor) or "
                                   "train (pytorch-ood)"),
    }

    @property
    def fit_on(self) -> str:
        return chosen_split(self)

    def check(self) -> tuple:
        low, high = float(self.options["percentile_low"]), float(self.options["percentile_high"])
        if not 0.0 <= low <= high <= 100.0:
            raise OODBenchError(f"vra needs 0 <= percentile_low <= percentile_high <= 100 (in %), got "
                                f"percentile_low={low:g}, percentile_high={high:g}")
        if self.options["thresholds"] not in ("global", "per_feature"):
            raise OODBenchError(f"vra.thresholds is 'global' or 'per_feature', got {self.options['thresholds']!r}")
        return low, high

    def reference_pass(self):
        self.check()   # bad options: a one-line error before the pass
        return super().reference_pass()

    def fit_outputs(self, ref):
        low, high = self.check()
        h = ref["features"].cpu().numpy()
        if self.options["thresholds"] == "global":
            h, axis = h.ravel(), None
        else:
            axis = 0
        bounds = np.percentile(h, [low, high], axis=axis).astype(np.float32)
        device = ref["features"].device
        return {"low": torch.as_tensor(bounds[0], device=device), "high": torch.as_tensor(bounds[1], device=device)}

    def shaped(self, features: torch.Tensor) -> torch.Tensor:
        self.check()
        return features.clamp(min=self.stats_["low"], max=self.stats_["high"])

    def score_outputs(self, out):
        return -energy(self.head_logits(self.shaped(out["features"])))
