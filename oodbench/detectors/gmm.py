"""Gaussian mixtures on the penultimate features of the ID training split.

- `gmm`: OpenOOD v1.5's `gmm` postprocessor (`openood/postprocessors/gmm_postprocessor.py`, `gmm.yml`) on the
  penultimate features: an optional PCA projection (the features times the first `pca` principal axes, not centred,
  as OpenOOD's `reduce_feature_dim`), then scikit-learn's `GaussianMixture(n_components, covariance_type="tied",
  random_state=seed)`. OpenOOD's confidence is log Σ_k w_k exp(−½ d_k) + 1e-45 with d_k the squared Mahalanobis
  distance to component k under the tied precision (no normalising constants: they are shared by the components);
  ours is its negation computed as −logsumexp(log w_k − ½ d_k), without the 1e-45 floor (which ties every image
  whose densities underflow in float32). OpenOOD's config also lists two earlier layers with weight 0, so only the
  penultimate layer counts, as here.
- `gmm_class`: pytorch-ood 0.4.0's `GMM`: one Gaussian per class (full covariance + reg·I, weights = class
  frequencies), score = −log Σ_k π_k N(z | μ_k, Σ_k). It keeps C precision matrices of D × D (float64): for 1000
  classes of 2048 features that is 33 GB, so it suits small label sets.
"""
from __future__ import annotations

import math

import numpy as np
import torch

from oodbench.detectors.base import Option, register
from oodbench.detectors.posthoc import PostHoc
from oodbench.errors import OODBenchError


def _int_option(det, key: str, low: int) -> int:
    value = det.options[key]
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise OODBenchError(f"{det.name}.{key} must be an integer >= {low}, got {value!r}")
    return value


@register("gmm")
class GMM(PostHoc):
    summary = "-log-likelihood under a tied-covariance Gaussian mixture of the (PCA-projected) training features " \
              "(OpenOOD gmm)"
    OPTIONS = {
        "components": Option(50, "mixture components (gmm.yml num_clusters_list, penultimate layer)"),
        "pca": Option(50, "principal axes the features are projected on, 0 = none (gmm.yml reduce_dim pca_50)"),
        "reg": Option(1e-6, "added to the covariance diagonal (scikit-learn reg_covar, its default)"),
        "seed": Option(0, "random_state of the mixture's k-means initialisation (OpenOOD: 0)"),
    }

    def check(self, n: int, d: int) -> tuple:
        components, pca = _int_option(self, "components", 1), _int_option(self, "pca", 0)
        if pca > min(n, d):
            raise OODBenchError(f"gmm.pca={pca} is more than min(images, features) = {min(n, d)} (0 = no projection)")
        if components > n:
            raise OODBenchError(f"gmm.components={components} is more than the {n} fit images")
        if not float(self.options["reg"]) >= 0:
            raise OODBenchError(f"gmm.reg must be >= 0, got {self.options['reg']}")
        return components, pca

    def fit_outputs(self, ref):
        from sklearn.decomposition import PCA
        from sklearn.mixture import GaussianMixture

        z = ref["features"].cpu().numpy()
        components, pca = self.check(*z.shape)
        transform = None
        if pca:
            transform = PCA(n_components=pca).fit(z).components_.T.astype(np.float32)     # (D, p)
            z = z @ transform
        gm = GaussianMixture(n_components=components, covariance_type="tied", reg_covar=float(self.options["reg"]),
                             random_state=int(self.options["seed"])).fit(z)
        dev = self.device
        as_t = lambda a: torch.as_tensor(np.asarray(a), dtype=torch.float64, device=dev)   # noqa: E731
        return {"transform": None if transform is None else as_t(transform), "means": as_t(gm.means_),
                "precision": as_t(gm.precisions_), "log_weights": as_t(np.log(gm.weights_))}

    def score_outputs(self, out):
        s = self.stats_
        z = out["features"].double()
        if s["transform"] is not None:
            z = z @ s["transform"]
        zp = z @ s["precision"]
        d = (zp * z).sum(1, keepdim=True) - 2 * zp @ s["means"].T + ((s["means"] @ s["precision"]) * s["means"]).sum(1)
        return -torch.logsumexp(s["log_weights"] - 0.5 * d, dim=1).float()


@register("gmm_class")
class ClassGMM(PostHoc):
    summary = "-log-likelihood under one full-covariance Gaussian per class, weighted by class frequency " \
              "(pytorch-ood GMM)"
    OPTIONS = {"reg": Option(1e-6, "added to each class covariance's diagonal (pytorch-ood GMM reg)")}
    needs_labels = True

    def fit_outputs(self, ref):
        reg = float(self.options["reg"])
        if not reg >= 0:
            raise OODBenchError(f"gmm_class.reg must be >= 0, got {self.options['reg']}")
        z, y = ref["features"], ref["labels"].long()
        eye = torch.eye(z.shape[1], dtype=torch.float64, device=z.device)
        means, precisions, log_dets, log_weights = [], [], [], []
        for c in y.unique():
            zc = z[y == c].double()     # one class in float64 at a time: never an N x D float64 copy
            mu = zc.mean(0)
            chol, info = torch.linalg.cholesky_ex((zc - mu).T @ (zc - mu) / len(zc) + reg * eye)
            if info != 0:
                raise OODBenchError(f"gmm_class: the covariance of class {int(c)} is not positive definite; raise "
                                    f"gmm_class.reg (now {reg})")
            means.append(mu)
            precisions.append(torch.cholesky_inverse(chol))
            log_dets.append(2 * chol.diagonal().log().sum())
            log_weights.append(math.log(len(zc) / len(z)))
        return {"means": torch.stack(means), "precisions": torch.stack(precisions), "log_dets": torch.stack(log_dets),
                "log_weights": torch.tensor(log_weights, dtype=torch.float64, device=z.device)}

    def score_outputs(self, out):
        s = self.stats_
        z = out["features"].double()
        d = torch.stack([(((z - m) @ p) * (z - m)).sum(1) for m, p in zip(s["means"], s["precisions"])], 1)
        ll = s["log_weights"] - 0.5 * (d + s["log_dets"] + z.shape[1] * math.log(2 * math.pi))
        return -torch.logsumexp(ll, dim=1).float()
