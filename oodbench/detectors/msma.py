"""MSMA — multiscale score matching (Mahmood, Oliva, Styner, ICLR 2021). See docs/msma.md.

A noise-conditional score network s(x, i) is trained by sigma^2-weighted denoising score matching at L noise levels.
Each image is described by its weighted score norms v_i(x) = ||sigma_i s(x, i)||_2 (clean input, all L levels in one
batched forward), and auxiliary models fitted on the in-distribution training vectors turn v into an OOD score:
GMM (-log-likelihood), kNN (distance to the k-th neighbour) and a MAF flow (-log p). One scoring pass gives all rows.
"""
from __future__ import annotations

import math

import torch

from oodbench.aux_models import AUX_MODELS
from oodbench.data import transforms
from oodbench.detectors.base import Detector, register
from oodbench.errors import OODBenchError
from oodbench.nets.score_nets import SCORE_NETS, build_score_net

SIGMA_SEQUENCES = ("geometric", "linear")


def sigma_schedule(sigma_low: float, sigma_high: float, num_L: int, sequence: str = "geometric") -> torch.Tensor:
    """L noise levels from sigma_high down to sigma_low (float32), geometric or linear spacing."""
    if sequence == "geometric":
        return torch.exp(torch.linspace(math.log(sigma_high), math.log(sigma_low), num_L, dtype=torch.float64)).float()
    if sequence == "linear":
        return torch.linspace(sigma_high, sigma_low, num_L, dtype=torch.float64).float()
    raise OODBenchError(f"unknown sigma_sequence {sequence!r}; set model.sigma_sequence to geometric or linear")


def model_sigmas(model_cfg: dict) -> torch.Tensor:
    """The noise levels of a configured model; `baseline` is the single level sigma_low."""
    check_model_config(model_cfg)
    if model_cfg["model"] == "baseline":
        return torch.tensor([float(model_cfg["sigma_low"])])
    return sigma_schedule(float(model_cfg["sigma_low"]), float(model_cfg["sigma_high"]), int(model_cfg["num_L"]),
                          model_cfg["sigma_sequence"])


def check_model_config(mc: dict) -> None:
    """Errors for settings that cannot train (raised before any training starts)."""
    if mc["model"] not in SCORE_NETS:
        raise OODBenchError(f"unknown score model {mc['model']!r}; set model.model to one of {', '.join(SCORE_NETS)}")
    if mc["sigma_sequence"] not in SIGMA_SEQUENCES:
        raise OODBenchError(f"unknown sigma_sequence {mc['sigma_sequence']!r}; set model.sigma_sequence to "
                            f"{' or '.join(SIGMA_SEQUENCES)}")
    if int(mc["num_L"]) < 1:
        raise OODBenchError(f"model.num_L must be >= 1 (the number of noise levels), got {mc['num_L']}")
    if not 0 < float(mc["sigma_low"]) < float(mc["sigma_high"]):
        raise OODBenchError(f"need 0 < model.sigma_low < model.sigma_high, got sigma_low={mc['sigma_low']} "
                            f"sigma_high={mc['sigma_high']}")
    if int(mc["filters"]) < 1:
        raise OODBenchError(f"model.filters must be >= 1, got {mc['filters']}")


def dsm_loss(net, x: torch.Tensor, sigmas: torch.Tensor, level: torch.Tensor | None = None,
             noise: torch.Tensor | None = None) -> torch.Tensor:
    """sigma^2-weighted denoising score matching: mean over the batch of 1/2 ||sigma_i s(x + sigma_i z, i) + z||^2,
    summed over all non-batch dims. `level` (B,) and `noise` (like x) are drawn when not given."""
    b = x.shape[0]
    if level is None:
        level = torch.randint(0, len(sigmas), (b,), device=x.device)
    if noise is None:
        noise = torch.randn_like(x)
    sigma = sigmas.to(x.device, x.dtype)[level].view(b, *([1] * (x.dim() - 1)))
    s = net(x + sigma * noise, level)
    return 0.5 * (sigma * s.float() + noise).pow(2).flatten(1).sum(1).mean()


@torch.no_grad()
def score_norms(net, x: torch.Tensor, sigmas: torch.Tensor, chunk: int = 1024) -> torch.Tensor:
    """(B, L) weighted score norms ||sigma_i s(x, i)||_2 of a float batch x, all levels batched together.

    The B*L (image, level) pairs run through the network in forwards of at most `chunk` pairs (bounds memory)."""
    b, n_levels = x.shape[0], len(sigmas)
    sigmas = sigmas.to(x.device, torch.float32)
    total = b * n_levels
    out = torch.empty(total, device=x.device, dtype=torch.float32)
    chunk = max(1, int(chunk))
    for start in range(0, total, chunk):
        pair = torch.arange(start, min(start + chunk, total), device=x.device)
        level = pair // b                                  # level-major: pair = level * B + image
        s = net(x[pair % b], level).float()
        out[start:start + len(pair)] = s.flatten(1).norm(dim=1) * sigmas[level]
    return out.view(n_levels, b).t()


@register("msma")
class MSMA(Detector):
    """Rows msma-gmm, msma-knn, msma-flow (and the (B, L) score norms) from one pass; `score` = the default row."""

    kind = "msma"
    summary = "multiscale score matching: score norms at L noise levels + GMM / kNN / flow (Mahmood et al. 2021)"

    # ------------------------------------------------------------------------------------------------- options
    def aux_names(self) -> list:
        names = list(self.options.get("aux_models", list(AUX_MODELS)))
        unknown = [n for n in names if n not in AUX_MODELS]
        if unknown or not names:
            raise OODBenchError(f"msma.aux_models {names}: use a non-empty subset of {', '.join(AUX_MODELS)}")
        default = self.options.get("default", "gmm")
        if default not in names:
            raise OODBenchError(f"msma.default {default!r} must be one of msma.aux_models {names}")
        return names

    def make_aux(self, name: str, seed: int):
        o = self.options
        if name == "gmm":
            return AUX_MODELS["gmm"](o["gmm_components"], o["gmm_cv_folds"], o["gmm_reg_covar"], seed,
                                     o.get("gmm_cv", "shuffled"))
        if name == "knn":
            return AUX_MODELS["knn"](o["knn_k"])
        return AUX_MODELS["flow"](o.get("flow", "original"), o["flow_hidden"], o.get("flow_epochs", 1000),
                                  o["flow_batch_size"], o["flow_lr"], o["flow_layers"], o["flow_steps"],
                                  o["flow_holdout"], seed)

    def n_train_vectors(self, n_train: int) -> int:
        cap = self.options.get("max_train_vectors")
        return n_train if cap is None else min(n_train, int(cap))

    def check(self, n_train: int) -> None:
        """Every user-fixable problem, before training starts."""
        mc = self.cfg["model"]
        check_model_config(mc)
        self.hflip()
        dim = len(model_sigmas(mc))
        n = self.n_train_vectors(n_train)
        for name in self.aux_names():
            self.make_aux(name, 0).check(n, dim)

    # ------------------------------------------------------------------------------------------------- fit
    def train(self, train, val, engine) -> None:
        from oodbench.engine import TrainSpec

        self.check(len(train))
        mc = self.cfg["model"]
        spec = TrainSpec.from_cfg(self.cfg["train"])
        self.sigmas = model_sigmas(mc).to(self.device)
        self.arch = {"model": mc["model"], "channels": train.shape[0], "filters": int(mc["filters"]),
                     "num_L": len(self.sigmas)}
        net = build_score_net(**self.arch).to(self.device)
        flip = self.hflip()

        def loss_fn(model, batch):
            x = batch[0]
            if flip:
                x = transforms.random_hflip(x)
            return dsm_loss(model, transforms.to_unit(x), self.sigmas)

        self.net = engine.fit("score_net", net, loss_fn, train, spec).eval()
        g = torch.Generator().manual_seed(engine.seed)
        n = self.n_train_vectors(len(train))
        pick = torch.randperm(len(train), generator=g)[:n].sort().values.to(train.images.device)
        self.train_norms = self.norms_of(train.images[pick])
        self.fit_aux(engine.seed)

    def hflip(self) -> bool:
        flip = str(self.cfg["data"].get("hflip", "auto")).lower()   # the config keeps "true" / "false" as text
        if flip == "auto":
            return str(self.cfg["data"]["in"]).startswith("cifar")
        if flip not in ("true", "false"):
            raise OODBenchError(f"data.hflip must be auto, true or false, got {flip!r}")
        return flip == "true"

    def fit_aux(self, seed: int) -> None:
        """Fit every auxiliary model on the stored in-distribution training score norms."""
        self.seed = int(seed)
        self.aux = {name: self.make_aux(name, seed).fit(self.train_norms) for name in self.aux_names()}

    def norms_of(self, images: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
        """(N, L) score norms of a uint8 image tensor, in batches."""
        return torch.cat([self.score_norms(images[i:i + batch_size]) for i in range(0, len(images), batch_size)])

    # ------------------------------------------------------------------------------------------------- score
    def score_norms(self, x: torch.Tensor) -> torch.Tensor:
        x = transforms.to_unit(x.to(self.device))
        return score_norms(self.net, x, self.sigmas, self.options.get("score_chunk", 1024))

    def score_rows(self, x: torch.Tensor) -> dict:
        norms = self.score_norms(x)
        rows = {f"msma-{name}": model.score(norms) for name, model in self.aux.items()}
        rows["_score_norms"] = norms
        return rows

    def score(self, x: torch.Tensor) -> torch.Tensor:
        return self.score_rows(x)[f"msma-{self.options.get('default', 'gmm')}"]

    # ------------------------------------------------------------------------------------------------- state
    def state_dict(self) -> dict:
        return {"arch": dict(self.arch), "sigmas": self.sigmas.cpu(), "seed": self.seed,
                "net": {k: v.detach().cpu() for k, v in self.net.state_dict().items()},
                "train_norms": self.train_norms.cpu(),
                "aux": {name: model.state_dict() for name, model in self.aux.items()}}

    def load_state_dict(self, state: dict) -> None:
        """Restore the network and auxiliary models; an auxiliary model whose options were changed (e.g.
        `--set msma.knn_k=10`) is refitted on the stored training score norms, without the network."""
        self.arch, self.seed = dict(state["arch"]), int(state["seed"])
        self.sigmas = state["sigmas"].to(self.device)
        self.net = build_score_net(**self.arch).to(self.device)
        self.net.load_state_dict(state["net"])
        self.net.eval()
        self.train_norms = state["train_norms"].to(self.device)
        self.aux = {}
        for name in self.aux_names():
            stored = state["aux"].get(name)
            model = AUX_MODELS[name].from_state(stored) if stored is not None else None
            if model is None or aux_options(model) != aux_options(self.make_aux(name, self.seed)):
                model = self.make_aux(name, self.seed).fit(self.train_norms)
            self.aux[name] = model.to(self.device) if hasattr(model, "to") else model


def aux_options(model) -> dict:
    """The constructor options of an auxiliary model (to tell whether a stored fit matches the config)."""
    state_keys = {"components", "cv_folds", "cv", "reg_covar", "seed", "k", "variant", "layers", "hidden", "epochs",
                  "steps", "batch_size", "lr", "holdout"}
    return {k: getattr(model, k) for k in sorted(state_keys) if hasattr(model, k)}
