"""Auxiliary models on low-dimensional feature vectors (MSMA's score-norm vectors): GMM, kNN distance, MAF flow.

The flow's default (`variant="original"`) is the original's `train_flow` (ahsanMah/msma `ood_detection_helper.py`):
one TensorFlow Probability `MaskedAutoregressiveFlow` over a standard normal, its `AutoregressiveNetwork(params=2,
hidden_units=[128, 128], activation="elu")`, on the unscaled vectors, Keras' Adadelta (lr 0.01), batch 128, 1000
epochs of n // 128 shuffled batches, final weights. It is hand-written (`TFPMade`): zuko's and nflows' MAFs bound the
log-scale (a soft clamp, a sigmoid) and assign hidden degrees differently from TFP, so neither expresses it exactly.
`variant="stabilised"` is oodbench's earlier flow (standardisation, stacked MADEs with a soft-clamped log-scale, Adam,
best held-out weights).

Each model is fitted on in-distribution training vectors only and scores new vectors with **higher = more OOD**.
Every model's `state_dict()` holds tensors / numbers / lists only (loadable with `torch.load(weights_only=True)`);
`AUX_MODELS[name].from_state(state)` rebuilds it.
"""
from __future__ import annotations

import copy
import math

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from oodbench.errors import OODBenchError


def _as_numpy(v) -> np.ndarray:
    if isinstance(v, torch.Tensor):
        v = v.detach().cpu().double().numpy()
    v = np.asarray(v, dtype=np.float64)
    if v.ndim != 2:
        raise OODBenchError(f"feature vectors must be a 2-D array (N, D), got shape {v.shape}")
    if not np.isfinite(v).all():
        raise OODBenchError(f"{int((~np.isfinite(v)).sum())} feature values are NaN or infinite; "
                            "the score network may have diverged — retrain with a lower learning rate")
    return v


def _like(scores: np.ndarray, ref) -> torch.Tensor:
    device = ref.device if isinstance(ref, torch.Tensor) else "cpu"
    return torch.as_tensor(scores, dtype=torch.float32, device=device)


def gmm_min_vectors(components, cv_folds: int, dim: int) -> int:
    """Fewest vectors for which every CV training fold has (dim + 1) vectors per component of the largest GMM."""
    need_per_fold = max(components) * (dim + 1)
    return math.ceil(need_per_fold * cv_folds / (cv_folds - 1))


class GMM:
    """StandardScaler + full-covariance GaussianMixture; n_components picked by k-fold CV log-likelihood.

    Score = -log-likelihood of the standardised vector."""

    name = "gmm"

    def __init__(self, components=tuple(range(2, 21, 2)), cv_folds: int = 10, reg_covar: float = 1e-6,
                 seed: int = 0, cv: str = "shuffled"):
        self.components = [int(c) for c in components]
        self.cv = str(cv)   # shuffled: seeded shuffled KFold on vectors standardised once | original: the released
        #                     train_gmm's GridSearchCV(Pipeline(StandardScaler, GMM), cv=k): unshuffled KFold, the
        #                     scaler refitted on each training fold
        self.cv_folds = int(cv_folds)
        self.reg_covar = float(reg_covar)
        self.seed = int(seed)
        self.mean = self.scale = self.gmm = None
        self.cv_loglik: list = []

    def check(self, n: int, dim: int) -> None:
        if not self.components or min(self.components) < 1:
            raise OODBenchError(f"msma.gmm_components must be a non-empty list of positive ints, got {self.components}")
        if self.cv_folds < 2:
            raise OODBenchError(f"msma.gmm_cv_folds must be >= 2, got {self.cv_folds}")
        if self.cv not in ("shuffled", "original"):
            raise OODBenchError(f"msma.gmm_cv must be shuffled or original, got {self.cv!r}")
        need = gmm_min_vectors(self.components, self.cv_folds, dim)
        if n < need:
            raise OODBenchError(
                f"GMM grid up to {max(self.components)} components with {self.cv_folds}-fold CV on {dim}-dim vectors "
                f"needs at least {need} training vectors, got {n}; use more training images or lower "
                f"msma.gmm_components / msma.gmm_cv_folds")

    def fit(self, vectors) -> "GMM":
        from sklearn.mixture import GaussianMixture
        from sklearn.model_selection import KFold, cross_val_score

        v = _as_numpy(vectors)
        self.check(*v.shape)
        self.mean, self.scale = v.mean(0), v.std(0)
        self.scale[self.scale == 0] = 1.0
        z = (v - self.mean) / self.scale

        def make(k):
            return GaussianMixture(k, covariance_type="full", reg_covar=self.reg_covar, random_state=self.seed)

        # GaussianMixture.score is the mean log-likelihood, so this is the CV log-likelihood per component count.
        if self.cv == "original":
            from sklearn.pipeline import Pipeline
            from sklearn.preprocessing import StandardScaler
            folds, data = KFold(self.cv_folds), v

            def est(k):
                return Pipeline([("scaler", StandardScaler()), ("GMM", make(k))])
        else:
            folds, data, est = KFold(self.cv_folds, shuffle=True, random_state=self.seed), z, make
        self.cv_loglik = [float(cross_val_score(est(k), data, cv=folds).mean()) for k in self.components]
        best = self.components[int(np.argmax(self.cv_loglik))]
        self.gmm = make(best).fit(z)
        return self

    def score(self, vectors) -> torch.Tensor:
        z = (_as_numpy(vectors) - self.mean) / self.scale
        return _like(-self.gmm.score_samples(z), vectors)

    @property
    def n_components(self) -> int:
        return int(self.gmm.n_components)

    def state_dict(self) -> dict:
        g = self.gmm
        t = lambda a: torch.as_tensor(np.asarray(a), dtype=torch.float64)  # noqa: E731
        return {"components": self.components, "cv_folds": self.cv_folds, "reg_covar": self.reg_covar,
                "seed": self.seed, "cv": self.cv, "cv_loglik": self.cv_loglik, "mean": t(self.mean), "scale": t(self.scale),
                "weights": t(g.weights_), "means": t(g.means_), "covariances": t(g.covariances_),
                "precisions_cholesky": t(g.precisions_cholesky_)}

    @classmethod
    def from_state(cls, state: dict) -> "GMM":
        from sklearn.mixture import GaussianMixture

        model = cls(state["components"], state["cv_folds"], state["reg_covar"], state["seed"],
                    state.get("cv", "shuffled"))
        model.cv_loglik = list(state["cv_loglik"])
        model.mean, model.scale = state["mean"].numpy(), state["scale"].numpy()
        g = GaussianMixture(len(state["weights"]), covariance_type="full", reg_covar=model.reg_covar)
        g.weights_ = state["weights"].numpy()
        g.means_ = state["means"].numpy()
        g.covariances_ = state["covariances"].numpy()
        g.precisions_cholesky_ = state["precisions_cholesky"].numpy()
        g.precisions_ = np.einsum("kij,klj->kil", g.precisions_cholesky_, g.precisions_cholesky_)
        g.converged_, g.n_iter_, g.lower_bound_ = True, 0, 0.0
        g.n_features_in_ = g.means_.shape[1]
        model.gmm = g
        return model


class KNN:
    """Euclidean distance to the k-th nearest training vector (KD-tree, unscaled vectors)."""

    name = "knn"

    def __init__(self, k: int = 5):
        self.k = int(k)
        self.train = self.tree = None

    def check(self, n: int, dim: int) -> None:
        if self.k < 1:
            raise OODBenchError(f"msma.knn_k must be >= 1, got {self.k}")
        if n < self.k:
            raise OODBenchError(f"kNN with k={self.k} needs at least {self.k} training vectors, got {n}")

    def fit(self, vectors) -> "KNN":
        from sklearn.neighbors import KDTree

        self.train = _as_numpy(vectors)
        self.check(*self.train.shape)
        self.tree = KDTree(self.train)
        return self

    def score(self, vectors) -> torch.Tensor:
        dist, _ = self.tree.query(_as_numpy(vectors), k=self.k)
        return _like(dist[:, -1], vectors)

    def state_dict(self) -> dict:
        return {"k": self.k, "train": torch.as_tensor(self.train)}

    @classmethod
    def from_state(cls, state: dict) -> "KNN":
        return cls(state["k"]).fit(state["train"])


class TFPMade(nn.Module):
    """TFP's `AutoregressiveNetwork(params=2, hidden_units, activation="elu")` with its default left-to-right input
    order and "equal" hidden degrees; Glorot-uniform kernels (masked), zero biases. forward(x) -> (shift, log_scale),
    each (N, dim), dimension i depending on dimensions < i only; the log-scale is unbounded, as in TFP."""

    def __init__(self, dim: int, hidden=(128, 128)):
        super().__init__()
        self.dim = dim
        degrees = [np.arange(1, dim + 1)]
        for units in hidden:
            low = min(int(degrees[-1].min()), dim - 1)
            degrees.append(np.maximum(low, np.ceil(np.arange(1, units + 1) * (dim - 1) / (units + 1)).astype(int)))
        masks = [d_in[:, None] <= d_out[None, :] for d_in, d_out in zip(degrees[:-1], degrees[1:])]
        masks.append(np.repeat(degrees[-1][:, None] < degrees[0][None, :], 2, axis=1))  # columns (dim i, param p)
        sizes = [dim, *hidden, 2 * dim]
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(sizes[:-1], sizes[1:]))
        for i, (layer, mask) in enumerate(zip(self.layers, masks)):
            self.register_buffer(f"mask{i}", torch.as_tensor(mask.T, dtype=torch.float32))
            nn.init.xavier_uniform_(layer.weight)
            nn.init.zeros_(layer.bias)
            with torch.no_grad():
                layer.weight.mul_(getattr(self, f"mask{i}"))

    def forward(self, x: torch.Tensor):
        h = x
        for i, layer in enumerate(self.layers):
            h = F.linear(h, layer.weight * getattr(self, f"mask{i}"), layer.bias)
            if i < len(self.layers) - 1:
                h = F.elu(h)
        params = h.view(x.shape[0], -1, 2)
        return params[..., 0], params[..., 1]

    def log_prob(self, x: torch.Tensor) -> torch.Tensor:
        """log p(x) under the MAF x = shift(x) + exp(log_scale(x)) * u, u ~ N(0, I)."""
        shift, log_scale = self(x)
        u = (x - shift) * torch.exp(-log_scale)
        return -0.5 * (u.pow(2).sum(1) + x.shape[1] * math.log(2 * math.pi)) - log_scale.sum(1)


class MADE(nn.Module):
    """Masked autoencoder: outputs (shift, log-scale) for each dimension from the dimensions before it."""

    def __init__(self, dim: int, hidden: int = 128, depth: int = 2):
        super().__init__()
        in_deg = torch.arange(dim)
        hid_deg = [torch.arange(hidden) % max(dim - 1, 1) for _ in range(depth)]
        degrees = [in_deg] + hid_deg
        sizes = [dim] + [hidden] * depth
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(sizes[:-1], sizes[1:]))
        self.out = nn.Linear(hidden, 2 * dim)
        for i, layer in enumerate(self.layers):
            self.register_buffer(f"mask{i}", (degrees[i + 1][:, None] >= degrees[i][None, :]).float())
        out_mask = (in_deg[:, None] > degrees[-1][None, :]).float()
        self.register_buffer("mask_out", torch.cat([out_mask, out_mask]))
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def forward(self, x: torch.Tensor):
        h = x
        for i, layer in enumerate(self.layers):
            h = F.elu(F.linear(h, layer.weight * getattr(self, f"mask{i}"), layer.bias))
        shift, raw = F.linear(h, self.out.weight * self.mask_out, self.out.bias).chunk(2, dim=1)
        return shift, 4.0 * torch.tanh(raw / 4.0)  # soft-clamped log-scale keeps early training stable


class MAF(nn.Module):
    """Masked autoregressive flow: fixed standardisation, then `layers` MADE affine layers (order reversed between
    layers), base N(0, I). `log_prob` is the exact log-density of the unscaled vectors."""

    def __init__(self, dim: int, layers: int = 4, hidden: int = 128):
        super().__init__()
        self.dim = dim
        self.mades = nn.ModuleList(MADE(dim, hidden) for _ in range(layers))
        self.register_buffer("loc", torch.zeros(dim))
        self.register_buffer("log_scale", torch.zeros(dim))

    def log_prob(self, x: torch.Tensor) -> torch.Tensor:
        u = (x - self.loc) * torch.exp(-self.log_scale)
        log_det = -self.log_scale.sum().expand(x.shape[0])
        for made in self.mades:
            shift, log_s = made(u)
            u = ((u - shift) * torch.exp(-log_s)).flip(1)
            log_det = log_det - log_s.sum(1)
        base = -0.5 * (u.pow(2).sum(1) + u.shape[1] * math.log(2 * math.pi))
        return base + log_det


class Flow:
    """A MAF trained by maximum likelihood; score = -log p(vector).

    - `original` (default): `TFPMade` on the unscaled vectors; Adadelta (Keras' rho 0.95, epsilon 1e-7) at `lr`
      (0.01); `epochs` (1000) of n // `batch_size` (128) batches of a fresh permutation; the final weights.
    - `stabilised`: a fixed standardisation, `layers` MADEs with a soft-clamped log-scale, Adam at `lr` for `steps`
      random batches, the weights with the best log-likelihood on a held-out `holdout` fraction.
    """

    name = "flow"
    VARIANTS = ("original", "stabilised")

    def __init__(self, variant: str = "original", hidden: int = 128, epochs: int = 1000, batch_size: int = 128,
                 lr: float = 0.01, layers: int = 4, steps: int = 2000, holdout: float = 0.1, seed: int = 0,
                 eval_every: int = 100):
        self.variant, self.hidden, self.epochs, self.batch_size = str(variant), int(hidden), int(epochs), int(batch_size)
        self.lr, self.layers, self.steps, self.holdout = float(lr), int(layers), int(steps), float(holdout)
        self.seed, self.eval_every = int(seed), int(eval_every)
        self.maf = None

    def check(self, n: int, dim: int) -> None:
        if self.variant not in self.VARIANTS:
            raise OODBenchError(f"msma.flow {self.variant!r} is not known; use one of {', '.join(self.VARIANTS)}")
        if not 0.0 <= self.holdout < 1.0:
            raise OODBenchError(f"msma.flow_holdout must be in [0, 1), got {self.holdout}")
        if n < 10:
            raise OODBenchError(f"the flow needs at least 10 training vectors, got {n}")
        if min(self.layers, self.hidden, self.steps, self.epochs, self.batch_size) < 1 or self.lr <= 0:
            raise OODBenchError("msma.flow_layers, flow_hidden, flow_steps, flow_epochs and flow_batch_size must be "
                                ">= 1 and msma.flow_lr > 0")

    def build(self, dim: int) -> nn.Module:
        return TFPMade(dim, (self.hidden, self.hidden)) if self.variant == "original" else MAF(dim, self.layers,
                                                                                               self.hidden)

    def fit(self, vectors) -> "Flow":
        x = torch.as_tensor(_as_numpy(vectors), dtype=torch.float32)
        self.check(*x.shape)
        device = vectors.device if isinstance(vectors, torch.Tensor) else torch.device("cpu")
        x = x.to(device)
        gen = torch.Generator().manual_seed(self.seed)
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            torch.manual_seed(self.seed)
            maf = self.build(x.shape[1]).to(device)
            fit = self._fit_original if self.variant == "original" else self._fit_stabilised
            fit(maf, x, gen, device)
        self.maf = maf.eval()
        return self

    def _fit_original(self, maf, x, gen, device) -> None:
        opt = torch.optim.Adadelta(maf.parameters(), lr=self.lr, rho=0.95, eps=1e-7)
        batch = min(self.batch_size, len(x))
        for _ in range(self.epochs):
            order = torch.randperm(len(x), generator=gen).to(device)
            for i in range(len(x) // batch):
                loss = -maf.log_prob(x[order[i * batch:(i + 1) * batch]]).mean()
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()

    def _fit_stabilised(self, maf, x, gen, device) -> None:
        perm = torch.randperm(len(x), generator=gen).to(device)
        n_held = int(round(self.holdout * len(x)))
        held, fit = x[perm[:n_held]], x[perm[n_held:]]
        maf.loc.copy_(fit.mean(0))
        maf.log_scale.copy_(fit.std(0).clamp_min(1e-8).log())
        opt = torch.optim.Adam(maf.parameters(), lr=self.lr)
        best, best_state = -math.inf, copy.deepcopy(maf.state_dict())
        for step in range(1, self.steps + 1):
            idx = torch.randint(0, len(fit), (min(self.batch_size, len(fit)),), generator=gen).to(device)
            loss = -maf.log_prob(fit[idx]).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if n_held and (step % self.eval_every == 0 or step == self.steps):
                with torch.no_grad():
                    ll = maf.log_prob(held).mean().item()
                if math.isfinite(ll) and ll > best:
                    best, best_state = ll, copy.deepcopy(maf.state_dict())
        if n_held:
            maf.load_state_dict(best_state)

    def score(self, vectors) -> torch.Tensor:
        param = next(self.maf.parameters())
        x = torch.as_tensor(vectors).to(param.device, torch.float32)
        with torch.no_grad():
            return (-self.maf.log_prob(x)).to(vectors.device if isinstance(vectors, torch.Tensor) else "cpu")

    def state_dict(self) -> dict:
        opts = {k: getattr(self, k) for k in ("variant", "hidden", "epochs", "batch_size", "lr", "layers", "steps",
                                               "holdout", "seed", "eval_every")}
        weights = {k: v.detach().cpu() for k, v in self.maf.state_dict().items()}
        return {"options": opts, "dim": int(self.maf.dim), "weights": weights}

    @classmethod
    def from_state(cls, state: dict) -> "Flow":
        model = cls(**state["options"])
        maf = model.build(state["dim"])
        maf.load_state_dict(state["weights"])
        model.maf = maf.eval()
        return model

    def to(self, device) -> "Flow":
        self.maf.to(device)
        return self


AUX_MODELS = {"gmm": GMM, "knn": KNN, "flow": Flow}
