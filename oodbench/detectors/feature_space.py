"""Post-hoc scores in the penultimate feature space: ViM, Residual, SHE, NNGuide, fDBD, NCI (RMDS is beside
Mahalanobis in features.py).

Each fits on the ID training split's features (never a test set) and follows OpenOOD v1.5's postprocessor of the same
name for its defaults; docs/baselines.md gives each formula and where pytorch-ood's convention differs.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from oodbench.detectors.base import Option, register
from oodbench.detectors.posthoc import PostHoc, chosen_split, energy, subspace_dim


def principal_residual(features: torch.Tensor, origin: torch.Tensor, dim: int) -> torch.Tensor:
    """Basis (D, D − dim) of the space orthogonal to the top-`dim` principal directions of features − origin
    (uncentred covariance, as ViM's code)."""
    centred = (features - origin).double()
    _, vectors = torch.linalg.eigh(centred.T @ centred / len(centred))       # ascending eigenvalues
    return vectors[:, : features.shape[1] - dim].float()


class HeadOrigin(PostHoc):
    """ViM/Residual: the origin u = −pinv(W) b, where the head's logits are all zero."""

    def origin(self) -> torch.Tensor:
        weight, bias = self.head_weights()
        return -(torch.linalg.pinv(weight.double()) @ bias.double()).float()


@register("vim")
class ViM(HeadOrigin):
    summary = "virtual logit from the residual of the principal subspace, against the energy (Wang et al. 2022)"
    OPTIONS = {"dim": Option(256, "principal-subspace size (vim.yml; D//2 when the features have <= dim dimensions)",
                             grid=(256, 1000))}

    def fit_outputs(self, ref):
        feats = ref["features"]
        u = self.origin()
        basis = principal_residual(feats, u, subspace_dim(self.name, int(self.options["dim"]), feats.shape[1]))
        alpha = ref["logits"].amax(1).mean() / ((feats - u) @ basis).norm(dim=1).mean()
        return u, basis, alpha

    def score_outputs(self, out):
        u, basis, alpha = self.stats_
        virtual = ((out["features"] - u) @ basis).norm(dim=1) * alpha
        return virtual - energy(self.head_logits(out["features"]))


@register("residual")
class Residual(HeadOrigin):
    summary = "norm of the feature residual outside the principal subspace (ViM's residual alone; Wang et al. 2022)"
    OPTIONS = {"dim": Option(512, "principal-subspace size (residual.yml; D//2 when the features have <= dim "
                                  "dimensions)", grid=(512,)),
               "fit_split": Option("train", "the ID split the subspace is fitted on: train (ViM's code, pytorch-ood) "
                                            "or val (OpenOOD's residual postprocessor)")}

    @property
    def fit_on(self) -> str:
        return chosen_split(self)

    def fit_outputs(self, ref):
        feats = ref["features"]
        u = self.origin()
        return u, principal_residual(feats, u, subspace_dim(self.name, int(self.options["dim"]), feats.shape[1]))

    def score_outputs(self, out):
        u, basis = self.stats_
        return ((out["features"] - u) @ basis).norm(dim=1)


@register("she")
class SHE(PostHoc):
    summary = "inner product with the mean feature of correctly classified training images of the predicted class " \
              "(Zhang et al. 2023)"
    needs_labels = True

    def fit_outputs(self, ref):
        feats, labels, predicted = ref["features"], ref["labels"].long(), ref["logits"].argmax(1)
        patterns = torch.zeros(ref["logits"].shape[1], feats.shape[1], device=feats.device)
        for k in labels.unique():
            correct = (labels == k) & (predicted == k)
            if correct.any():
                patterns[k] = feats[correct].mean(0)
        return patterns

    def score_outputs(self, out):
        return -(out["features"] * self.stats_[out["logits"].argmax(1)]).sum(1)


@register("nnguide")
class NNGuide(PostHoc):
    summary = "energy times the mean cosine similarity to the k nearest energy-scaled training features " \
              "(Park et al. 2023)"
    OPTIONS = {"k": Option(100, "nearest neighbours in the energy-scaled training bank (nnguide.yml K)", grid=(100,))}

    def fit_outputs(self, ref):
        return F.normalize(ref["features"], dim=1) * energy(ref["logits"])[:, None]

    def score_outputs(self, out):
        k = min(int(self.options["k"]), len(self.stats_))
        guidance = chunked_topk(F.normalize(out["features"], dim=1), self.stats_, k).mean(1)
        return -(guidance * energy(out["logits"]))


def chunked_topk(queries: torch.Tensor, bank: torch.Tensor, k: int, budget: int = 1 << 25) -> torch.Tensor:
    """The k largest inner products of each query with the bank rows (B, k), descending. Queries go in chunks of at
    most `budget` similarities (128 MiB of float32), so memory stays bounded for any bank size."""
    step = max(1, budget // max(1, len(bank)))
    return torch.cat([(queries[i:i + step] @ bank.T).topk(k, dim=1).values for i in range(0, len(queries), step)])


@register("fdbd")
class FDBD(PostHoc):
    summary = "mean distance to the decision boundaries over the distance to the training mean (Liu & Qin 2024)"
    OPTIONS = {"distance_as_normalizer": Option(True, "divide by |f - training mean| (else |f|), fdbd.yml",
                                                grid=(True, False))}

    def fit_outputs(self, ref):
        weight, _ = self.head_weights()
        gaps = (weight[:, None, :] - weight[None]).norm(dim=2)
        gaps.fill_diagonal_(1.0)
        return ref["features"].mean(0), gaps

    def score_outputs(self, out):
        mean, gaps = self.stats_
        f, logits = out["features"], out["logits"]
        top, predicted = logits.max(1)
        boundary = ((top[:, None] - logits).abs() / gaps[predicted]).sum(1) / (logits.shape[1] - 1)
        norm = (f - mean).norm(dim=1) if bool(self.options["distance_as_normalizer"]) else f.norm(dim=1)
        return -boundary / norm.clamp_min(1e-8)


@register("nci")
class NCI(PostHoc):
    summary = "alignment of the centred feature with the predicted class's head weight, plus alpha × L1 norm " \
              "(Liu & Qin 2025)"
    OPTIONS = {"alpha": Option(0.0001, "weight of the L1 feature norm (nci.yml)", grid=(0.0001, 0.001, 0.01, 0.1))}

    def fit_outputs(self, ref):
        return ref["features"].mean(0)

    def score_outputs(self, out):
        weight, _ = self.head_weights()
        f = out["features"]
        centred = f - self.stats_
        w = weight[out["logits"].argmax(1)]
        alignment = (w * centred).sum(1) / centred.norm(dim=1).clamp_min(1e-12)
        return -(alignment + float(self.options["alpha"]) * f.abs().sum(1))
