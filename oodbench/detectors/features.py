"""Feature-space baselines: Mahalanobis (MDS), relative Mahalanobis (RMDS), their Mahalanobis++ forms on L2-normalised
features (MDS++, RMDS++) and deep nearest neighbours (KNN), on the ID training features.

Mahalanobis and RMDS use class means and one tied covariance, in float64 on the device, inverted as scikit-learn's
`EmpiricalCovariance` does (`tied_gaussian`, `squared_distances`; mds_ensemble uses them per layer too). KNN searches
exactly: with faiss installed (`oodbench[faiss]`, an `IndexFlatL2` on the CPU) or, without it, a chunked matrix
product and top-k on the device; `knn.backend` forces one.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from oodbench.detectors.base import Option, register
from oodbench.detectors.feature_space import chunked_topk
from oodbench.detectors.posthoc import PostHoc
from oodbench.errors import OODBenchError


def precision_of(centred: torch.Tensor) -> torch.Tensor:
    """Inverse of the (biased) covariance of centred rows, as scikit-learn's EmpiricalCovariance(assume_centered)."""
    return torch.linalg.pinv(centred.T @ centred / len(centred), hermitian=True)


def tied_gaussian(feats: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(class means (C, D), tied precision (D, D)) in float64, over the classes present in `labels` (the
    in-distribution classes, not the model's)."""
    feats = feats.double()
    classes, index = labels.long().unique(return_inverse=True)
    means = torch.stack([feats[index == i].mean(0) for i in range(len(classes))])
    return means, precision_of(feats - means[index])


def squared_distances(f: torch.Tensor, means: torch.Tensor, precision: torch.Tensor) -> torch.Tensor:
    """Squared Mahalanobis distances (B, C) of rows f to the class means under one precision matrix (float64;
    expanded, so memory is B·D + B·C, not B·C·D)."""
    f = f.double()
    fp = f @ precision
    return (fp * f).sum(1, keepdim=True) - 2 * fp @ means.T + ((means @ precision) * means).sum(1)


@register("mahalanobis")
class Mahalanobis(PostHoc):
    summary = "min Mahalanobis distance to class means, tied covariance, penultimate features (Lee et al. 2018)"
    needs_labels = True

    def fit_outputs(self, ref):
        return tied_gaussian(ref["features"], ref["labels"])

    def score_outputs(self, out):
        return squared_distances(out["features"], *self.stats_).amin(1).float()


@register("rmds")
class RMDS(PostHoc):
    summary = "relative Mahalanobis: class distance minus the distance to one background Gaussian (Ren et al. 2021)"
    needs_labels = True

    def fit_outputs(self, ref):
        feats = ref["features"].double()
        mean0 = feats.mean(0)
        return (*tied_gaussian(feats, ref["labels"]), mean0[None], precision_of(feats - mean0))

    def score_outputs(self, out):
        means, precision, mean0, precision0 = self.stats_
        background = squared_distances(out["features"], mean0, precision0)          # (B, 1)
        return (squared_distances(out["features"], means, precision) - background).amin(1).float()


def _unit(arrays: dict) -> dict:
    """The arrays with each feature row scaled to unit L2 norm (float64), as Mahalanobis++ does before fit and score."""
    return dict(arrays, features=F.normalize(arrays["features"].double(), dim=1))


@register("mahalanobis_pp")
class MahalanobisPP(Mahalanobis):
    summary = "Mahalanobis++: mahalanobis on L2-normalised penultimate features (Mueller & Hein 2025, MDS++)"

    def fit_outputs(self, ref):
        return super().fit_outputs(_unit(ref))

    def score_outputs(self, out):
        return super().score_outputs(_unit(out))


@register("rmds_pp")
class RMDSPP(RMDS):
    summary = "relative Mahalanobis++: rmds on L2-normalised penultimate features (Mueller & Hein 2025, RMDS++)"

    def fit_outputs(self, ref):
        return super().fit_outputs(_unit(ref))

    def score_outputs(self, out):
        return super().score_outputs(_unit(out))


@register("knn")
class KNN(PostHoc):
    """The fitted state is the normalised training bank (`stats_`); a faiss index over it is built on first use."""

    summary = "distance to the k-th nearest training feature, L2-normalised (Sun et al. 2022)"
    OPTIONS = {"k": Option(50, "neighbour whose distance is the score (50 for CIFAR-10 in the paper)",
                           grid=(50, 100, 200, 500, 1000)),
               "backend": Option("auto", "auto (faiss if installed and on a CPU, else torch) | faiss | torch; both "
                                         "exact")}
    _index = None   # (bank, faiss index) built from stats_

    def fit_outputs(self, ref):
        return F.normalize(ref["features"], dim=1)

    def backend(self) -> str:
        choice = self.options["backend"]
        if choice not in ("auto", "faiss", "torch"):
            raise OODBenchError(f"knn.backend must be auto, faiss or torch, got {choice!r}")
        if choice == "torch" or (choice == "auto" and self.device.type == "cuda"):
            return "torch"
        try:
            import faiss  # noqa: F401
        except ImportError:
            if choice == "faiss":
                raise OODBenchError("knn.backend=faiss needs faiss: pip install 'oodbench[faiss]'") from None
            return "torch"
        return "faiss"

    def faiss_index(self):
        if self._index is None or self._index[0] is not self.stats_:
            import faiss

            index = faiss.IndexFlatL2(self.stats_.shape[1])
            index.add(np.ascontiguousarray(self.stats_.cpu().numpy()))
            self._index = (self.stats_, index)
        return self._index[1]

    def score_outputs(self, out):
        k = int(self.options["k"])
        if k > len(self.stats_):
            raise OODBenchError(f"knn.k={k} is more than the {len(self.stats_)} training features")
        queries = F.normalize(out["features"], dim=1)
        if self.backend() == "torch":
            cos = chunked_topk(queries, self.stats_, k)[:, -1]
            return (2 - 2 * cos).clamp_min(0).sqrt()
        squared, _ = self.faiss_index().search(np.ascontiguousarray(queries.cpu().numpy()), k)
        return torch.as_tensor(np.sqrt(np.maximum(squared[:, -1], 0)), device=queries.device)
