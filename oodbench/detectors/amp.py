"""AMP: OOD detection with neural network anchoring (Anirudh & Thiagarajan, 2022). See docs/amp.md.

Training: an anchored classifier sees cat([c, x - c]) with anchors c drawn from the shuffled minibatch; every
`corrupt_every`-th step the reference half c is corrupted (the residual keeps the clean anchor). Scoring: K anchors
from the training images (`amp.anchors`: fresh per test batch as in the original, or a fixed pool) give logits
(K, B, C); mu = mean over anchors, sigma_c = std over anchors of sigmoid(logits_c),
T(x) = 1 + exp(mean_c sigma_c), z = mu / T; a score of z (higher = in-distribution) is negated into an OOD score.
"""
from __future__ import annotations

import hashlib
from typing import Dict

import torch
import torch.nn.functional as F

from oodbench.data import transforms
from oodbench.detectors.base import Detector, register
from oodbench.data.transforms import augment as augment_batch
from oodbench.engine import TrainSpec, seed_everything
from oodbench.errors import OODBenchError
from oodbench.nets.anchoring import anchor_corruption, build_anchored

SCORE_TYPES = ("xent", "energy", "entropy", "msp")
CPU_PAIRS_PER_FORWARD = 128  # on a CPU, cache-sized forwards beat one K*B batch by up to 2x
ANCHOR_SAMPLING = ("per_batch", "per_sample")
ANCHOR_MODES = ("shared", "per_image", "fixed")


# ---- the scoring math (pure functions of the logits) ------------------------------------------------------------

def calibrate(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits (K, B, C) over K anchors -> (z (B, C), T (B,)): z = mean_k logits / T, T = 1 + exp(mean_c sigma_c),
    sigma_c the (unbiased) std over anchors of sigmoid(logits_c)."""
    sigma = torch.sigmoid(logits).std(dim=0)
    temperature = 1 + torch.exp(sigma.mean(dim=1))
    return logits.mean(dim=0) / temperature[:, None], temperature


def ood_scores(z: torch.Tensor) -> Dict[str, torch.Tensor]:
    """Every score type of calibrated logits z (B, C) as an OOD score (higher = more OOD):
    xent = -(logsumexp(z) - mean(z)), energy = -logsumexp(z), entropy = H(softmax(z)), msp = -max softmax(z)."""
    lse = torch.logsumexp(z, dim=1)
    logp = F.log_softmax(z, dim=1)
    return {
        "xent": z.mean(dim=1) - lse,
        "energy": -lse,
        "entropy": -(logp.exp() * logp).sum(dim=1),
        "msp": -logp.max(dim=1).values.exp(),
    }


# ---- training ---------------------------------------------------------------------------------------------------

def anchored_loss(mean, std, anchor_sampling: str = "per_batch", corrupt_every: int = 5,
                  augment: str = "crop_flip", crop_padding: int = 4):
    """`loss_fn(model, (x_uint8, y))` for `engine.fit`: augmentation on the device (`augment` as in the classifier
    config), normalisation, anchors from the shuffled batch (one shared anchor for `per_batch`, one per image for
    `per_sample`), cross-entropy. On every `corrupt_every`-th step (0 = never) the reference half is corrupted
    (`anchor_corruption`, one draw per batch, on normalised tensors) and the residual x - c keeps the uncorrupted
    anchor, as in the original's `process_batch`. The step count lives in the model (`Anchored.train_steps`), so a
    resumed run corrupts on the same steps."""
    _check_choice("anchor_sampling", anchor_sampling, ANCHOR_SAMPLING)

    def loss_fn(model, batch):
        x, y = batch
        core = getattr(model, "module", model)  # the Anchored module under DistributedDataParallel
        step = int(core.train_steps)
        core.train_steps += 1
        xn = transforms.normalize(transforms.to_unit(augment_batch(x, augment, crop_padding)), mean, std)
        n = xn.shape[0]
        pick = (torch.randint(n, (1,), device=xn.device) if anchor_sampling == "per_batch"
                else torch.randperm(n, device=xn.device))
        anchors = xn[pick]
        refs = anchors
        if corrupt_every and step % corrupt_every == 0:
            refs = anchor_corruption(*xn.shape[-2:])(anchors)
        logits = model(xn, refs, anchors)
        loss = F.cross_entropy(logits.float(), y)
        return loss, {"acc": float((logits.argmax(1) == y).float().mean())}

    return loss_fn


def channel_stats(images: torch.Tensor, n: int = 10000) -> tuple[list, list]:
    """Per-channel mean and std (in [0, 1] units) of the first n uint8 images: the input normalisation."""
    unit = transforms.to_unit(images[:n])
    return unit.mean(dim=(0, 2, 3)).tolist(), unit.std(dim=(0, 2, 3)).clamp_min(1e-3).tolist()


def _check_choice(key: str, value, choices) -> None:
    if value not in choices:
        raise OODBenchError(f"amp.{key} {value!r} is not known; choose one of {', '.join(choices)} "
                            f"(--set amp.{key}=...)")


# ---- the detector -----------------------------------------------------------------------------------------------

@register("amp")
class AMP(Detector):
    kind = "amp"
    needs_training_images = True   # anchors="shared"/"per_image" draw fresh pools from the training split
    summary = "neural network anchoring: K anchors give a heteroscedastic temperature (rows xent/energy/entropy/msp)"

    def __init__(self, cfg: dict, device="cpu"):
        super().__init__(cfg, device)
        self.model = None
        self.state: dict = {}
        self._anchors = None  # the K normalised anchors, cached

    # options ------------------------------------------------------------------------------------------------
    def _k(self, pool_size: int) -> int:
        k = int(self.options.get("k", 5))
        if k < 2:
            raise OODBenchError(f"amp.k={k}: AMP needs at least 2 anchors (sigma is a std over anchors); "
                                f"--set amp.k=5")
        if k > pool_size:
            raise OODBenchError(f"amp.k={k} is larger than the anchor pool ({pool_size} training images); "
                                f"lower amp.k or train a run with a larger train.pool_size")
        return k

    def _score_type(self) -> str:
        score = self.options.get("score", "xent")
        _check_choice("score", score, SCORE_TYPES)
        return score

    # fit ----------------------------------------------------------------------------------------------------
    def train(self, train, val, engine) -> None:
        tc = self.cfg["train"]
        self._score_type()
        self._anchor_mode()
        pool_size = int(tc["pool_size"])
        self._k(min(pool_size, len(train)))
        model_kw = {k: v for k, v in self.cfg["model"].items() if k != "arch"}
        mean, std = channel_stats(train.images)
        seed_everything(engine.seed)  # the initial weights depend on the run's seed only
        model = build_anchored(self.cfg["model"]["arch"], train.shape[0], train.num_classes, **model_kw)
        loss_fn = anchored_loss(mean, std, tc["anchor_sampling"], int(tc["corrupt_every"]), tc["augment"],
                                int(tc["crop_padding"]))
        model = engine.fit("anchored", model, loss_fn, train, TrainSpec.from_cfg(tc))
        g = torch.Generator().manual_seed(engine.seed)
        pick = torch.randperm(len(train), generator=g)[:pool_size]
        self.state = {"arch": self.cfg["model"]["arch"], "model_kw": model_kw, "shape": list(train.shape),
                      "num_classes": train.num_classes, "mean": mean, "std": std,
                      "pool": train.images[pick.to(train.device)].cpu()}
        self.model = model.to(self.device).eval()
        self._anchors = None

    # state --------------------------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {**self.state, "net": {k: v.detach().cpu() for k, v in self.model.state_dict().items()}}

    def load_state_dict(self, state: dict) -> None:
        self.state = {k: v for k, v in state.items() if k != "net"}
        model = build_anchored(state["arch"], state["shape"][0], state["num_classes"], **state["model_kw"])
        model.load_state_dict(state["net"])
        self.model = model.to(self.device).eval()
        self._anchors = None

    # scoring ------------------------------------------------------------------------------------------------
    def _normalise(self, x: torch.Tensor) -> torch.Tensor:
        return transforms.normalize(transforms.to_unit(x), self.state["mean"], self.state["std"])

    def _anchor_mode(self) -> str:
        mode = self.options.get("anchors", "shared")
        _check_choice("anchors", mode, ANCHOR_MODES)
        return mode

    def _batch_generator(self, x: torch.Tensor) -> torch.Generator:
        """A generator seeded by the run's seed and the batch's pixels: the fresh anchors of a batch are drawn at
        random as in the original, yet the same batch always gets the same anchors (scores are reproducible)."""
        digest = hashlib.sha1(f"{self.cfg.get('seed', 0)}:{tuple(x.shape)}".encode())
        digest.update(x.detach().cpu().contiguous().numpy().tobytes())
        return torch.Generator().manual_seed(int.from_bytes(digest.digest()[:8], "little") >> 1)

    def anchors_for(self, x: torch.Tensor) -> torch.Tensor:
        """The normalised anchors of a uint8 batch, by `amp.anchors`:
        - `shared` (default; the paper-era code): a fresh pool of `train.pool_size` training images per batch and
          K distinct anchors from it, shared by every image of the batch -> (K, C, H, W);
        - `per_image` (the code at HEAD): a fresh pool per batch and, for every image, K anchors drawn from it with
          replacement -> (K, B, C, H, W);
        - `fixed`: the first K of the pool stored in the run, for every image (scores independent of batching).
        The fresh pools come from the in-distribution training split (`use_training_images`, from the workflow),
        drawn by `_batch_generator`."""
        mode = self._anchor_mode()
        if mode == "fixed":
            pool = self.state["pool"]
            k = self._k(len(pool))
            if self._anchors is None or len(self._anchors) != k or self._anchors.device != x.device:
                self._anchors = self._normalise(pool[:k].to(x.device))
            return self._anchors
        if self.training_images is None:
            raise OODBenchError(f"amp.anchors={mode} draws anchors from the ID training split; score through a run "
                                f"(the workflow hands it over), or call use_training_images(train) first")
        train = self.training_images.images
        pool_size = min(int(self.cfg["train"]["pool_size"]), len(train))
        k = self._k(pool_size)
        g = self._batch_generator(x)
        pool = torch.randperm(len(train), generator=g)[:pool_size]
        if mode == "shared":
            pick = pool[torch.randperm(pool_size, generator=g)[:k]]
        else:
            pick = pool[torch.randint(pool_size, (k, x.shape[0]), generator=g)]
        return self._normalise(train[pick.to(train.device)].to(x.device))

    def anchor_logits(self, x: torch.Tensor) -> torch.Tensor:
        """Logits (K, B, C) of a uint8 batch with its K anchors (`anchors_for`)."""
        if self.model is None:
            raise OODBenchError("amp: the detector is not fitted; train it first (oodbench train --method amp)")
        anchors = self.anchors_for(x)
        max_batch = int(self.options.get("max_batch", 0))
        if max_batch <= 0:
            max_batch = CPU_PAIRS_PER_FORWARD if x.device.type == "cpu" else 0
        with torch.no_grad():
            return self.model.logits_per_anchor(self._normalise(x), anchors, max_batch).float()

    def score_rows(self, x: torch.Tensor) -> Dict[str, torch.Tensor]:
        """Row `amp` is the configured score type (amp.score); `amp-<type>` the other three; `_temperature` T(x)."""
        z, temperature = calibrate(self.anchor_logits(x))
        scores = ood_scores(z)
        default = self._score_type()
        rows = {"amp": scores[default]}
        rows.update({f"amp-{t}": s for t, s in scores.items() if t != default})
        rows["_temperature"] = temperature
        return rows

    def score(self, x: torch.Tensor) -> torch.Tensor:
        return ood_scores(calibrate(self.anchor_logits(x))[0])[self._score_type()]

    def accuracy(self, imageset, batch_size: int = 256) -> float:
        """Top-1 accuracy of the anchored classifier (argmax of the anchor-averaged logits) on a labelled set."""
        if imageset.labels is None:
            raise OODBenchError(f"amp accuracy: dataset {imageset.name!r} has no labels")
        correct = 0
        for x, y in imageset.batches(batch_size):
            x = x.to(self.device)
            correct += int((self.anchor_logits(x).mean(0).argmax(1) == y.to(self.device)).sum())
        return correct / max(1, len(imageset))
