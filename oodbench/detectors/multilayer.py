"""Post-hoc scores of intermediate feature maps: Gram matrices, multi-layer Mahalanobis, RankFeat.

The maps are the outputs of the model's named layers (`ClassifierModel.feature_maps`): `--set model.layers=[...]`
with `--model`, otherwise OpenOOD's feature list for a ResNet (the stem output and layer1..layer4) or the stage
outputs of oodbench's own nets (`models.auto_layers`). gram and mds_ensemble keep their per-layer statistics of the
ID training split in the run cache (`train_gram.npz`, `train_mds_ensemble.npz`); docs/posthoc.md gives the formulas
and where OpenOOD and pytorch-ood differ.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from oodbench.detectors.base import Option, register
from oodbench.detectors.features import squared_distances, tied_gaussian
from oodbench.detectors.posthoc import PostHoc
from oodbench.errors import OODBenchError
from oodbench.models import auto_layers

HELD_OUT = 0.1   # gram: the fraction of each class's training images held out to scale each layer's deviation


def gram_rows(maps: torch.Tensor, p: int) -> torch.Tensor:
    """Row sums of the p-th order Gram matrix F^p (F^p)ᵀ of each (C, H·W) map, signed p-th root: (B, C)."""
    f = maps.flatten(2) ** p
    rows = torch.bmm(f, f.sum(1).unsqueeze(2)).squeeze(2)     # Σ_j (F^p F^pᵀ)_ij without forming the C×C matrix
    return rows.sign() * rows.abs() ** (1.0 / p)


def deviation(g: torch.Tensor, low: torch.Tensor, high: torch.Tensor) -> torch.Tensor:
    """Sastry & Oore's δ: the relative excess of each entry of g below `low` or above `high`, summed: (B,)."""
    below = (F.relu(low - g) / (low + 1e-6).abs()).sum(1)
    return below + (F.relu(g - high) / (high + 1e-6).abs()).sum(1)


def id_predictions(logits: torch.Tensor, classes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(max softmax, index into `classes`) of each row, among the in-distribution classes' logits."""
    return logits[:, classes].softmax(1).max(1)


@register("gram")
class Gram(PostHoc):
    summary = "Gram-matrix deviation of intermediate maps from the predicted class's training range, over the " \
              "max softmax (Sastry & Oore 2020)"
    OPTIONS = {"powers": Option([1, 2, 3, 4, 5], "orders p of the Gram matrices (gram.yml powers); layers: "
                                                "model.layers")}
    needs_labels = True
    array_level = False

    def powers(self) -> list:
        powers = self.options["powers"]
        if not isinstance(powers, list) or not powers or \
                not all(isinstance(p, int) and not isinstance(p, bool) and p > 0 for p in powers):
            raise OODBenchError(f"gram.powers must be a list of positive integers, e.g. [1, 2, 3, 4, 5], got "
                                f"{powers!r}")
        return powers

    @torch.no_grad()
    def outputs(self, x):
        maps, logits = self.model.feature_maps(x)
        out = {"logits": logits}
        for name, m in maps.items():
            for p in self.powers():
                out[f"{name}/{p}"] = gram_rows(m, p)
        return out

    def outputs_key(self):
        return ("gram", *self.model.layer_names(), *self.powers())

    def reference_pass(self):
        return "gram", self.outputs, self.outputs_key()

    def rows(self, out: dict, layer: str, p: int) -> torch.Tensor:
        if f"{layer}/{p}" not in out:
            raise OODBenchError(f"gram: no Gram rows of power {p} for layer {layer} (computed with other gram.powers "
                                f"or model.layers)")
        return out[f"{layer}/{p}"]

    def fit_outputs(self, ref):
        labels = ref["labels"].long()
        classes = labels.unique()
        held = torch.zeros(len(labels), dtype=torch.bool)
        generator = torch.Generator().manual_seed(0)
        for c in classes.tolist():
            index = (labels == c).nonzero().squeeze(1).cpu()
            held[index[torch.randperm(len(index), generator=generator)[: int(HELD_OUT * len(index))]]] = True
        held = held.to(labels.device)
        own = torch.searchsorted(classes, labels[held])             # the held-out images' classes
        bounds, scales = {}, {}
        for layer in self.model.layer_names():
            dev = torch.zeros(len(own), device=labels.device)
            for p in self.powers():
                g = self.rows(ref, layer, p)
                low = torch.stack([g[(labels == c) & ~held].amin(0) for c in classes])
                high = torch.stack([g[(labels == c) & ~held].amax(0) for c in classes])
                bounds[layer, p] = low, high
                dev += deviation(g[held], low[own], high[own])
            mean = float(dev.mean()) if len(dev) else 0.0
            scales[layer] = mean if mean > 0 else 1.0      # as pytorch-ood: 1 when nothing deviates
        return classes, bounds, scales

    def score_outputs(self, out):
        classes, bounds, scales = self.stats_
        confidence, predicted = id_predictions(out["logits"], classes)
        total = torch.zeros(len(predicted), device=predicted.device)
        for layer in self.model.layer_names():
            dev = sum(deviation(self.rows(out, layer, p), bounds[layer, p][0][predicted],
                                bounds[layer, p][1][predicted]) for p in self.powers())
            total += dev / scales[layer]
        return total / confidence


@register("mds_ensemble")
class MDSEnsemble(PostHoc):
    summary = "weighted sum over layers of the Mahalanobis distance of each map's channel means, after a noise " \
              "step toward the closest class (Lee et al. 2018)"
    OPTIONS = {"noise": Option(0.0014, "input step toward the closest class, [0,1] pixel units as odin.epsilon "
                                       "(mds_ensemble.yml)"),
               "alpha": Option(1.0, "layer weights: one number for every layer, or a list (mds_ensemble.yml "
                                    "alpha_list: [1])", any_type=True)}
    needs_labels = True
    array_level = False

    def noise(self) -> float:
        noise = float(self.options["noise"])
        if noise < 0:
            raise OODBenchError(f"mds_ensemble.noise must be >= 0, got {noise}")
        return noise

    def alphas(self) -> list:
        layers, alpha = self.model.layer_names(), self.options["alpha"]
        weights = alpha if isinstance(alpha, list) else [alpha] * len(layers)
        if len(weights) != len(layers) or not all(isinstance(w, (int, float)) for w in weights):
            raise OODBenchError(f"mds_ensemble.alpha must be a number or one number per layer ({len(layers)}: "
                                f"{', '.join(layers)}), got {alpha!r}")
        return [float(w) for w in weights]

    @staticmethod
    def key(layer: str, noise: float) -> str:
        return f"{layer}@{noise!r}"

    def means(self, maps: dict, noise: float) -> dict:
        return {self.key(name, noise): m.flatten(2).mean(2) for name, m in maps.items()}

    def clean(self, x):
        return self.means(self.model.feature_maps(x)[0], 0.0)

    def outputs(self, x):
        noise = self.noise()
        if noise == 0:
            return self.clean(x)
        self.require_fitted()
        layers = self.model.layer_names()
        std = torch.tensor(self.model.std, device=x.device).view(1, -1, 1, 1)
        out = {}
        with torch.enable_grad():
            inp = self.model.prepare(x).requires_grad_(True)
            maps, _ = self.model.forward_maps(inp, layers)
            for i, name in enumerate(layers):
                # Lee et al.'s input pre-processing: a step against the gradient of the distance to the closest class
                d = squared_distances(maps[name].flatten(2).mean(2), *self.stats_[name])
                (grad,) = torch.autograd.grad(d.amin(1).sum(), inp, retain_graph=i < len(layers) - 1)
                step = torch.where(grad >= 0, 1.0, -1.0)
                with torch.no_grad():
                    shifted, _ = self.model.forward_maps(inp.detach() - noise * step / std, [name])
                out.update(self.means(shifted, noise))
        return {k: v.detach().float() for k, v in out.items()}

    def outputs_key(self):
        return ("mds_ensemble", *self.model.layer_names(), self.noise())

    def reference_pass(self):
        return "mds_ensemble", self.clean, ("mds_ensemble-clean", *self.model.layer_names())

    def fit_outputs(self, ref):
        return {name: tied_gaussian(ref[self.key(name, 0.0)], ref["labels"]) for name in self.model.layer_names()}

    def score_outputs(self, out):
        noise, total = self.noise(), 0.0
        for name, alpha in zip(self.model.layer_names(), self.alphas()):
            if self.key(name, noise) not in out:
                raise OODBenchError(f"mds_ensemble: no features of layer {name} with noise {noise} in these outputs "
                                    f"(computed with another mds_ensemble.noise or model.layers)")
            total = total + alpha * 0.5 * squared_distances(out[self.key(name, noise)], *self.stats_[name]).amin(1)
        return total.float()


def remove_rank1(maps: torch.Tensor) -> torch.Tensor:
    """Each (C, H·W) map minus its rank-1 part s₁u₁v₁ᵀ (largest singular value)."""
    m = maps.flatten(2)
    u, s, vh = torch.linalg.svd(m, full_matrices=False)
    return (m - s[:, :1, None] * u[:, :, :1] @ vh[:, :1, :]).view_as(maps)


@register("rankfeat")
class RankFeat(PostHoc):
    summary = "energy of the mean logits after removing the rank-1 part of the last block's map, and of the block " \
              "before it (Song et al. 2022)"
    fit_on = None
    array_level = False
    OPTIONS = {"temperature": Option(1.0, "rankfeat.yml")}

    def blocks(self) -> tuple[str, str]:
        """(last block, the block before it): the last two of model.layers, else of the ResNet stages."""
        names, resnet_like = auto_layers(self.model.net)
        names = self.model.layers or (names if resnet_like else None)
        if not names or len(names) < 2:
            raise OODBenchError(f"rankfeat needs a ResNet-like model (torchvision/timm/OpenOOD ResNets, oodbench's "
                                f"resnet18/34/20, wrn40_2); this {type(self.model.net).__name__} has no residual "
                                f"stages (with --model, name its last two blocks: --set model.layers=[BLOCK,LAST])")
        return names[-1], names[-2]

    @torch.no_grad()
    def outputs(self, x):
        last, before = self.blocks()
        inp = self.model.prepare(x)
        _, logits_last = self.model.forward_maps(inp, [], edit={last: remove_rank1})
        _, logits_before = self.model.forward_maps(inp, [], edit={before: remove_rank1})
        return {"rankfeat_logits": ((logits_last + logits_before) / 2).float()}

    def outputs_key(self):
        return ("rankfeat", *self.blocks())

    def score_outputs(self, out):
        t = float(self.options["temperature"])
        if t <= 0:
            raise OODBenchError(f"rankfeat.temperature must be > 0, got {t}")
        return -t * torch.logsumexp(out["rankfeat_logits"] / t, dim=1)
