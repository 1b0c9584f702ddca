"""The classifier of kind "classifier": its trainer, and the classic baselines MSP, MaxLogit, Energy, ODIN.

`ClassifierTrainer` trains a run's classifier once; every post-hoc method (here and in the modules built on
posthoc.py) scores a ClassifierModel and never trains.
"""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from oodbench import data
from oodbench.data import transforms
from oodbench.data.transforms import augment
from oodbench.detectors.base import Detector, Option, register, register_trainer
from oodbench.detectors.posthoc import LogitScore, PostHoc
from oodbench.detectors.outlier_exposure import OutlierFeed, bce_onehot_loss, finetune_with_outliers
from oodbench.detectors.recipes import RecipeNet, recipe_dataset_keys, recipe_from_config, recipe_sections
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


def input_stats(images: torch.Tensor, normalize: bool) -> tuple[list, list]:
    """(mean, std) per channel of the network's input: of the first 10k training images in [0, 1] when `normalize`,
    else (0, 1) — the images in [0, 1] as they are (train.normalize: false, the GradNorm seed's recipe)."""
    channels = images.shape[1]
    if not normalize:
        return [0.0] * channels, [1.0] * channels
    unit = transforms.to_unit(images[:10000])
    return unit.mean(dim=(0, 2, 3)).tolist(), unit.std(dim=(0, 2, 3)).clamp_min(1e-3).tolist()


@register_trainer("classifier")
class ClassifierTrainer(Detector):
    """Trains the run's classifier (kind "classifier"); `model()` is what every post-hoc method of the run scores.

    It is not a method: `oodbench train --method msp` (or any classifier method) trains it, and its state is the
    run's detector.pt.
    """

    kind = "classifier"
    # outlier-exposure fine-tuning of the classifier; the training recipes' options (train.recipe picks one)
    training_keys = ("oe", *recipe_sections())
    dataset_keys = ("oe.outliers", "tune.val_ood", *recipe_dataset_keys())

    @staticmethod
    def config_sections() -> dict:
        """The config sections this trainer declares in code: one per training recipe with options."""
        return recipe_sections()

    @staticmethod
    def check_config(cfg: dict) -> None:
        """The recipe and its options, checked before any data is loaded (one-line errors)."""
        recipe_from_config(cfg)

    def train(self, train, val, engine) -> None:
        tc = self.cfg["train"]
        self.shape, self.num_classes = list(train.shape), train.num_classes
        self.mean, self.std = input_stats(train.images, tc["normalize"])
        net = self.build()
        criterion = classification_loss(tc["loss"])
        prepare = self.normalize
        recipe = recipe_from_config(self.cfg)

        def loss_fn(model, batch):
            x, y = batch
            logits = model(prepare(augment(x, tc["augment"], tc["crop_padding"])))
            loss = criterion(logits, y)
            return loss, {"acc": (logits.argmax(1) == y).float().mean()}

        def recipe_loss(model, batch):   # ID images first, then the outliers when the recipe uses them
            x, y = batch
            views = [prepare(v) for v in recipe.views_of(x, lambda b: augment(b, tc["augment"], tc["crop_padding"]))]
            return recipe.loss(model, views[0] if len(views) == 1 else torch.cat(views), y)

        oe = self.cfg["oe"]
        if oe["outliers"] and oe["from_run"]:
            self.load_state_dict(checkpoint.load(Path(oe["from_run"]) / "detector.pt", self.device))
        elif recipe.name == "plain":
            self.net = engine.fit("classifier", net, loss_fn, train, TrainSpec.from_cfg(tc))
        else:
            feed = train
            if recipe.uses_outliers:
                outliers = data.load(recipe.options["outliers"], split="train", root=self.cfg["data"]["root"],
                                     device=engine.device, like=train.shape)
                feed = OutlierFeed(train.to(engine.device), outliers.to(engine.device), int(tc["batch_size"]),
                                   int(recipe.options["outlier_batch"]), engine.seed, engine.rank, engine.world_size)
            if recipe.mixing_set_key:
                recipe.use_images(data.load(recipe.options[recipe.mixing_set_key], split="train",
                                            root=self.cfg["data"]["root"], like=train.shape).images)
            recipe.set_epoch_length(len(train) // int(tc["batch_size"]))
            model = RecipeNet(net, recipe).to(engine.device)
            # OpenOOD sets CIDER's prototypes from the ID validation split; the training split when that lacks a class
            if recipe.initialised_from_data:
                source = val if val.labels is not None and len(val.labels.unique()) == self.num_classes else train
                source = source.to(engine.device)
                recipe.initialise(model, source.images, source.labels, prepare)
            trained = engine.fit("classifier", model, recipe_loss, feed, TrainSpec.from_cfg(tc))
            self.net = trained.net
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
        net = build_classifier(mc["arch"], self.shape[0], self.num_classes, dropout=mc["dropout"],
                               width=mc["width"]).to(self.device)
        return recipe_from_config(self.cfg).adapt(net)   # the recipe's changes hold for scoring too (T2FNorm)

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
        if hasattr(self.net, "rot_head") and "rot_head.weight" not in state["net"]:
            del self.net.rot_head        # a rotpred run saved before the rotation head was kept (no rotpred score)
        self.net.load_state_dict(state["net"])
        self.net.eval()


@register("msp")
class MSP(LogitScore):
    summary = "maximum softmax probability (Hendrycks & Gimpel 2017)"

    def score_logits(self, logits: torch.Tensor) -> torch.Tensor:
        return -logits.softmax(1).amax(1)


@register("maxlogit")
class MaxLogit(LogitScore):
    summary = "maximum logit (Hendrycks et al. 2022)"

    def score_logits(self, logits: torch.Tensor) -> torch.Tensor:
        return -logits.amax(1)


@register("energy")
class Energy(LogitScore):
    summary = "free energy -T*logsumexp(logits/T) (Liu et al. 2020)"
    OPTIONS = {"temperature": Option(1.0, "T in -T*logsumexp(logits/T)")}

    def score_logits(self, logits: torch.Tensor) -> torch.Tensor:
        t = float(self.options["temperature"])
        return -t * torch.logsumexp(logits / t, dim=1)


@register("odin")
class ODIN(PostHoc):
    summary = "temperature-scaled MSP on an input perturbed against the gradient (Liang et al. 2018)"
    OPTIONS = {"temperature": Option(1000.0, "softmax temperature T"),
               "epsilon": Option(0.0014, "input perturbation size (in [0,1] pixel units before normalisation)")}
    fit_on = None
    array_level = False   # one extra forward and backward pass per batch: the perturbed input's logits

    def outputs(self, x):
        model, t, eps = self.require_model(), float(self.options["temperature"]), float(self.options["epsilon"])
        std = torch.tensor(model.std, device=x.device).view(1, -1, 1, 1)
        with torch.enable_grad():
            inp = model.prepare(x).requires_grad_(True)
            logits = model.net(inp).float() / t
            # Raise the top-class softmax: step against the gradient of its negative log-probability.
            loss = F.cross_entropy(logits, logits.argmax(1), reduction="sum")
            (grad,) = torch.autograd.grad(loss, inp)
        perturbed = inp.detach() - eps * grad.sign() / std
        with torch.no_grad():
            return {"odin_logits": model.net(perturbed).float()}

    def outputs_key(self):
        return ("odin", float(self.options["temperature"]), float(self.options["epsilon"]))

    def score_outputs(self, out):
        return -(out["odin_logits"] / float(self.options["temperature"])).softmax(1).amax(1)
