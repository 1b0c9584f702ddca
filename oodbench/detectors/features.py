"""Feature-space baselines: Mahalanobis (MDS) and deep nearest neighbours (KNN), on the ID training features.

Mahalanobis uses class means and one tied covariance (scikit-learn's EmpiricalCovariance, in float64, once per fit).
KNN searches exactly: with faiss installed (`oodbench[faiss]`, an `IndexFlatL2` on the CPU) or, without it, a chunked
matrix product and top-k on the device; `knn.backend` forces one.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.covariance import EmpiricalCovariance

from oodbench.detectors.base import register
from oodbench.detectors.feature_space import chunked_topk
from oodbench.detectors.posthoc import PostHoc
from oodbench.errors import OODBenchError


@register("mahalanobis")
class Mahalanobis(PostHoc):
    summary = "min Mahalanobis distance to class means, tied covariance, penultimate features (Lee et al. 2018)"

    def fit_outputs(self, ref):
        feats, labels = ref["features"].cpu().double().numpy(), ref["labels"].cpu().numpy()
        classes, index = np.unique(labels, return_inverse=True)  # the in-distribution classes, not the model's
        means = np.stack([feats[labels == c].mean(0) for c in classes])
        precision = EmpiricalCovariance(assume_centered=True).fit(feats - means[index]).precision_
        return means, precision

    def score_outputs(self, out):
        means, precision = self.stats
        f = out["features"].cpu().double().numpy()
        diff = f[:, None, :] - means[None]                         # (B, C, D)
        d2 = np.einsum("bcd,de,bce->bc", diff, precision, diff)
        return torch.as_tensor(d2.min(1), dtype=torch.float32, device=out["features"].device)


@register("knn")
class KNN(PostHoc):
    summary = "distance to the k-th nearest training feature, L2-normalised (Sun et al. 2022)"
    sweep = {"k": [50, 100, 200, 500, 1000]}

    def fit_outputs(self, ref):
        bank = F.normalize(ref["features"], dim=1)
        if self.backend() == "faiss":
            import faiss

            index = faiss.IndexFlatL2(bank.shape[1])
            index.add(np.ascontiguousarray(bank.cpu().numpy()))
            return index
        return bank

    def backend(self) -> str:
        choice = self.options.get("backend", "auto")
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

    def score_outputs(self, out):
        k = int(self.options["k"])
        queries = F.normalize(out["features"], dim=1)
        if isinstance(self.stats, torch.Tensor):
            if k > len(self.stats):
                raise OODBenchError(f"knn.k={k} is more than the {len(self.stats)} training features")
            cos = chunked_topk(queries, self.stats, k)[:, -1]
            return (2 - 2 * cos).clamp_min(0).sqrt()
        if k > self.stats.ntotal:
            raise OODBenchError(f"knn.k={k} is more than the {self.stats.ntotal} training features")
        squared, _ = self.stats.search(np.ascontiguousarray(queries.cpu().numpy()), k)
        return torch.as_tensor(np.sqrt(np.maximum(squared[:, -1], 0)), device=queries.device)
