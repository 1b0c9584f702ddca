"""The classifier of kind "classifier": its trainer, the post-hoc base, and the classic baselines MSP, MaxLogit,
Energy, ODIN.

`ClassifierTrainer` trains a run's classifier once; every post-hoc method (here, in gradients.py, features.py,
posthoc.py and the modules built on it) subclasses `ClassifierDetector`, which scores a ClassifierModel and never
trains.
"""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from oodbench import data
from oodbench.data import transforms
from oodbench.data.transforms import augment
from oodbench.detectors.base import Detector, register, register_trainer
from oodbench.detectors.outlier_exposure import bce_onehot_loss, finetune_with_outliers
from oodbench.engine import TrainSpec, checkpoint
from oodbench.errors import OODBenchError
from oodbench.nets.classifiers import build_classifier


def classification_loss(kind: str):
    """`ce` (cross-entropy) or `bce` (binary cross-entropy on one-hot targets, the seed's resnet_bce)."""
    if kind == "ce":
        return F.cross_entropy
    if kind == "bce":
        return bce_onehot_loss
    raise OODBenchError(f"unknown train.loss {kind!r}; use ce or bce")


@register_trainer("classifier")
class ClassifierTrainer(Detector):
    """Trains the run's classifier (kind "classifier"); `model()` is what every post-hoc method of the run scores.

    It is not a method: `oodbench train --method msp` (or any classifier method) trains it, and its state is the
    run's detector.pt.
    """

    kind = "classifier"

    def fit(self, train, val, engine) -> None:
        tc = self.cfg["train"]
        self.shape, self.num_classes = list(train.shape), train.num_classes
        unit = transforms.to_unit(train.images[:10000])
        self.mean = unit.mean(dim=(0, 2, 3)).tolist()
        self.std = unit.std(dim=(0, 2, 3)).clamp_min(1e-3).tolist()
        net = self.build()
        criterion = classification_loss(tc["loss"])
        prepare = self.normalize

        def loss_fn(model, batch):
            x, y = batch
            logits = model(prepare(augment(x, tc["augment"], tc["crop_padding"])))
            loss = criterion(logits, y)
            return loss, {"acc": (logits.argmax(1) == y).float().mean()}

        oe = self.cfg["oe"]
        if oe["outliers"] and oe["from_run"]:
            self.load_state_dict(checkpoint.load(Path(oe["from_run"]) / "detector.pt", self.device))
        else:
            self.net = engine.fit("classifier", net, loss_fn, train, TrainSpec.from_cfg(tc))
        if oe["outliers"]:
            outliers = data.load(oe["outliers"], split="train", root=self.cfg["data"]["root"], device=engine.device,
                                 like=train.shape)
            self.net = finetune_with_outliers(engine, self.net, prepare, train, outliers, self.cfg)
        self.net.eval()

    def model(self):
        """The trained classifier with its input normalisation, as a ClassifierModel."""
        from oodbench.models import ClassifierModel

        return ClassifierModel(self.net, self.mean, self.std, channels=self.shape[0], head=self.net.head,
                               name="run")

    def build(self):
        mc = self.cfg["model"]
        return build_classifier(mc["arch"], self.shape[0], self.num_classes, dropout=mc["dropout"],
                                width=mc["width"]).to(self.device)

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        """uint8 batch → the classifier's training input (the model layer does the same at scoring)."""
        return transforms.normalize(transforms.to_unit(x), self.mean, self.std)

    def state_dict(self) -> dict:
        return {"shape": self.shape, "num_classes": self.num_classes, "mean": self.mean, "std": self.std,
                "net": self.net.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.shape, self.num_classes = list(state["shape"]), int(state["num_classes"])
        self.mean, self.std = list(state["mean"]), list(state["std"])
        self.net = self.build()
        self.net.load_state_dict(state["net"])
        self.net.eval()


class ClassifierDetector(Detector):
    """A post-hoc method: scores a ClassifierModel (`use_model`) and trains nothing.

    The model comes from a run (its ClassifierTrainer), from `--model SPEC` or from `oodbench.wrap`. Data to fit
    statistics on comes from the workflow (`fit_data`), never from files the method reads itself.
    """

    kind = "classifier"
    model = None

    def __init__(self, cfg: dict | None = None, device="cpu"):
        """`cfg` defaults to configs/classifier.yaml, so that `get("energy")()` scores tensors on its own."""
        if cfg is None:
            from oodbench.config import load_config

            cfg = load_config(self.kind)
        super().__init__(cfg, device)

    def fit(self, train, val, engine) -> None:
        raise OODBenchError(f"{self.name} is a post-hoc method: it trains nothing (the run's classifier is trained "
                            f"by `oodbench train`, or give a model with --model)")

    def use_model(self, model) -> None:
        """Score `model` (a ClassifierModel: network, preprocessing, features/head split)."""
        self.model, self.net, self.mean, self.std = model, model.net, model.mean, model.std
        self.num_classes = model.num_classes

    def prepare(self, x: torch.Tensor) -> torch.Tensor:
        """uint8 batch → normalised float input of the scored model."""
        return self.model.prepare(x)

    @torch.no_grad()
    def logits(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.logits(x)

    @torch.no_grad()
    def accuracy(self, imageset, batch_size: int = 500):
        """Test accuracy, or None when the model's classes are not the set's (e.g. an ImageNet model)."""
        if imageset.labels is None or self.model.num_classes != imageset.num_classes:
            return None
        correct = sum((self.logits(x).argmax(1) == y).sum().item() for x, y in imageset.batches(batch_size))
        return correct / max(1, len(imageset))


@register("msp")
class MSP(ClassifierDetector):
    summary = "maximum softmax probability (Hendrycks & Gimpel 2017)"

    def score(self, x):
        return self.score_logits(self.logits(x))

    def score_logits(self, logits: torch.Tensor) -> torch.Tensor:
        return -logits.softmax(1).amax(1)


@register("maxlogit")
class MaxLogit(ClassifierDetector):
    summary = "maximum logit (Hendrycks et al. 2022)"

    def score(self, x):
        return self.score_logits(self.logits(x))

    def score_logits(self, logits: torch.Tensor) -> torch.Tensor:
        return -logits.amax(1)


@register("energy")
class Energy(ClassifierDetector):
    summary = "free energy -T*logsumexp(logits/T) (Liu et al. 2020)"

    def score(self, x):
        return self.score_logits(self.logits(x))

    def score_logits(self, logits: torch.Tensor) -> torch.Tensor:
        t = float(self.options.get("temperature", 1.0))
        return -t * torch.logsumexp(logits / t, dim=1)


@register("odin")
class ODIN(ClassifierDetector):
    summary = "temperature-scaled MSP on an input perturbed against the gradient (Liang et al. 2018)"

    def score(self, x):
        t, eps = float(self.options["temperature"]), float(self.options["epsilon"])
        std = torch.tensor(self.std, device=x.device).view(1, -1, 1, 1)
        with torch.enable_grad():
            inp = self.prepare(x).requires_grad_(True)
            logits = self.net(inp).float() / t
            # Raise the top-class softmax: step against the gradient of its negative log-probability.
            loss = F.cross_entropy(logits, logits.argmax(1), reduction="sum")
            (grad,) = torch.autograd.grad(loss, inp)
        perturbed = inp.detach() - eps * grad.sign() / std
        with torch.no_grad():
            return -(self.net(perturbed).float() / t).softmax(1).amax(1)
