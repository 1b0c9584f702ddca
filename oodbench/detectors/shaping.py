"""Activation shaping of the penultimate features, then the model's own head and the energy score: ReAct, ASH-P/B/S,
SCALE, DICE.

Shaping acts on the pooled penultimate features (B, D), which works for any model with a features/head split: so do
the ASH authors' code (andrijazz/ash: `apply_ash` right after the average pool, on (B, C, 1, 1)), the SCALE authors'
(kai422/SCALE `scale_net.py`) and OpenOOD v1.5 (`ash_net.py`, `scale_net.py`). pytorch-ood shapes whatever its
backbone returns, typically the last feature map before pooling: ASH/SCALE's `placement=map` does that (the map of
`model.layers`' last entry, else the last ResNet stage), at the cost of one more network pass per method.
Percentiles are in percent (0–100), as in OpenOOD's configs.
"""
from __future__ import annotations

import numpy as np
import torch

from oodbench.detectors.base import Option, register
from oodbench.detectors.posthoc import PostHoc, chosen_split, energy
from oodbench.errors import OODBenchError
from oodbench.models import auto_layers


def percentile_option(det, key: str = "percentile") -> float:
    value = float(det.options[key])
    if not 0.0 <= value <= 100.0:
        raise OODBenchError(f"{det.name}.{key} is a percentage in [0, 100], got {value}")
    return value


def keep_count(width: int, percentile: float) -> int:
    """Activations kept per sample when the lowest `percentile` % are pruned (OpenOOD's rounding)."""
    return max(1, width - int(np.round(width * percentile / 100.0)))


class Shaping(PostHoc):
    """Shape the features, re-run the head, score −logsumexp (energy)."""

    fit_on = None

    def shaped(self, features: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def score_outputs(self, out):
        return -energy(self.head_logits(self.shaped(out["features"])))


@register("react")
class ReAct(Shaping):
    summary = "energy after clipping features at a percentile of the ID training activations (Sun et al. 2021)"
    OPTIONS = {"percentile": Option(90, "clip at this percentile of the ID training activations (react.yml)",
                                    grid=(85, 90, 95, 99)),
               "fit_split": Option("train", "the ID split the threshold comes from: train (the ReAct paper, "
                                            "pytorch-ood) or val (OpenOOD's react postprocessor)")}

    @property
    def fit_on(self) -> str:
        return chosen_split(self)

    def fit_outputs(self, ref):
        return float(np.percentile(ref["features"].cpu().numpy().ravel(), percentile_option(self)))

    def shaped(self, features):
        return features.clamp(max=self.stats_)


PLACEMENT = Option("pooled", "pooled = shape the pooled penultimate features (the ASH and SCALE authors' code, "
                             "OpenOOD) | map = shape the last feature map before pooling (pytorch-ood's usual split; "
                             "the layer is model.layers' last, else the last ResNet stage)")


def placement(det) -> str:
    value = det.options["placement"]
    if value not in ("pooled", "map"):
        raise OODBenchError(f"{det.name}.placement is 'pooled' or 'map', got {value!r}")
    return value


def _top(features: torch.Tensor, percentile: float):
    k = keep_count(features.shape[1], percentile)
    return features.topk(k, dim=1), k


@register("ash_p")
class AshP(Shaping):
    summary = "ASH-P: prune all but the top activations, then energy (Djurisic et al. 2023)"
    OPTIONS = {"percentile": Option(90, "% of activations pruned per sample (ash.yml)",
                                    grid=(65, 70, 75, 80, 85, 90, 95)),
               "placement": PLACEMENT}

    def shaped(self, features):
        (values, index), _ = _top(features, percentile_option(self))
        return torch.zeros_like(features).scatter_(1, index, values)

    # -- placement=map: the last feature map before pooling, flattened per image as the authors' 4-D code does ----
    @property
    def array_level(self) -> bool:
        return placement(self) == "pooled"

    def map_layer(self) -> str:
        names, _ = auto_layers(self.require_model().net)
        names = self.model.layers or names
        if not names:
            raise OODBenchError(f"{self.name}.placement=map needs the feature map before pooling: name its layer "
                                f"with --set model.layers=[LAYER] (e.g. layer4)")
        return names[-1]

    @torch.no_grad()
    def outputs(self, x):
        if self.array_level:
            return super().outputs(x)
        edit = {self.map_layer(): lambda m: self.shaped(m.flatten(1)).view_as(m)}
        _, logits = self.require_model().forward_maps(self.prepare(x), [], edit=edit)
        return {"shaped_logits": logits.float()}

    def outputs_key(self):
        if self.array_level:
            return super().outputs_key()
        return ("shaped-map", self.name, float(self.options["percentile"]), self.map_layer())

    def score_outputs(self, out):
        if "shaped_logits" in out:
            return -energy(out["shaped_logits"])
        return super().score_outputs(out)


@register("ash_b")
class AshB(AshP):
    summary = "ASH-B: keep the top activations, binarised to the sample's mean total, then energy (Djurisic et al. 2023)"

    def shaped(self, features):
        (_, index), k = _top(features, percentile_option(self))
        fill = (features.sum(1, keepdim=True) / k).expand(-1, k)
        return torch.zeros_like(features).scatter_(1, index, fill)


@register("ash_s")
class AshS(AshP):
    summary = "ASH-S: prune, rescale the kept activations by exp(total/kept sum), then energy (Djurisic et al. 2023)"

    def shaped(self, features):
        pruned = super().shaped(features)
        return pruned * torch.exp(features.sum(1, keepdim=True) / pruned.sum(1, keepdim=True))


@register("scale")
class Scale(AshP):
    summary = "SCALE: rescale all activations by exp(total/top sum), no pruning, then energy (Xu et al. 2024)"
    OPTIONS = {"percentile": Option(85, "% of activations below the top ones (scale.yml)",
                                    grid=(65, 70, 75, 80, 85, 90, 95)),
               "placement": PLACEMENT}

    def shaped(self, features):
        (values, _), _ = _top(features, percentile_option(self))
        return features * torch.exp(features.sum(1, keepdim=True) / values.sum(1, keepdim=True))


@register("dice")
class DICE(Shaping):
    summary = "energy of a head whose weights are sparsified by their mean ID contribution (Sun & Li 2022)"
    fit_on = "train"
    OPTIONS = {"p": Option(90, "% of head weights masked by mean contribution (dice.yml)", grid=(90,))}

    def fit_outputs(self, ref):
        weight, _ = self.head_weights()
        contribution = ref["features"].mean(0)[None, :] * weight                    # (K, D)
        threshold = np.percentile(contribution.cpu().numpy(), percentile_option(self, "p"))
        return torch.where(contribution > float(threshold), weight, torch.zeros_like(weight))

    def score_outputs(self, out):
        _, bias = self.head_weights()
        return -energy(out["features"] @ self.stats_.T + bias)
