"""Feature-space baselines on the shared classifier: Mahalanobis (MDS) and deep nearest neighbours (KNN).

Both fit statistics of the penultimate features of the in-distribution training split (`fit_data`, given by the
workflow; never a test set) the first time they score; scikit-learn does the covariance and the neighbour search. The
features are kept in the workflow's cache (<run>/cache/train_features.npz), keyed by the model and the training
images, so a new process (a new `eval` or `score`) loads them instead of running the network over the split again.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.covariance import EmpiricalCovariance
from sklearn.neighbors import NearestNeighbors

from oodbench.detectors.base import register
from oodbench.detectors.classifier import ClassifierDetector


class FeatureDetector(ClassifierDetector):
    """Scores penultimate features against statistics of the training features."""

    _fitted = None

    @torch.no_grad()
    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.features(x)

    def training_features(self) -> tuple[np.ndarray, np.ndarray]:
        """float64 penultimate features (N, D) and labels (N,) of the run's training split, cached in the run."""
        train, _ = self.require_fit_data().split()
        key = self.cache_key(train.fingerprint)
        saved = self.cache.load_npz("train_features.npz", key) if self.cache is not None else None
        if saved is not None:
            return saved["features"].astype(np.float64), saved["labels"]
        feats = torch.cat([self.features(x) for x, _ in train.batches(500)]).cpu().numpy()
        labels = train.labels.cpu().numpy()
        if self.cache is not None:
            self.cache.save_npz("train_features.npz", key, {"features": feats, "labels": labels})
        return feats.astype(np.float64), labels

    def score(self, x):
        if self._fitted is None:
            self._fitted = self.fit_statistics(*self.training_features())
        return torch.as_tensor(self.distance(self.features(x).cpu().numpy().astype(np.float64)),
                               dtype=torch.float32, device=x.device)


@register("mahalanobis")
class Mahalanobis(FeatureDetector):
    summary = "min Mahalanobis distance to class means, tied covariance, penultimate features (Lee et al. 2018)"

    def fit_statistics(self, feats, labels):
        classes, index = np.unique(labels, return_inverse=True)  # the in-distribution classes, not the model's
        self.means = np.stack([feats[labels == c].mean(0) for c in classes])
        centred = feats - self.means[index]
        self.precision = EmpiricalCovariance(assume_centered=True).fit(centred).precision_
        return True

    def distance(self, f):
        diff = f[:, None, :] - self.means[None]                   # (B, C, D)
        d2 = np.einsum("bcd,de,bce->bc", diff, self.precision, diff)
        return d2.min(1)


@register("knn")
class KNN(FeatureDetector):
    summary = "distance to the k-th nearest training feature, L2-normalised (Sun et al. 2022)"

    def fit_statistics(self, feats, labels):
        k = int(self.options["k"])
        self.index = NearestNeighbors(n_neighbors=k).fit(_unit(feats))
        return True

    def distance(self, f):
        dist, _ = self.index.kneighbors(_unit(f))
        return dist[:, -1]


def _unit(f: np.ndarray) -> np.ndarray:
    return F.normalize(torch.from_numpy(f), dim=1).numpy()
