"""The gradient family's classifier presets: `paper` is the GradNorm seed's training procedure (issue 30, item 4)."""
from __future__ import annotations

import torch

from oodbench import config as configs
from oodbench.cli import main
from oodbench.config import load_config
from oodbench.detectors.classifier import input_stats
from oodbench.engine import checkpoint


def test_paper_preset_is_the_seeds_recipe():
    cfg = load_config("classifier", preset="paper")
    assert cfg["data"]["val_fraction"] == 0.0            # all training images (50k on CIFAR), no hold-out
    assert cfg["train"]["augment"] == "none"
    assert cfg["train"]["normalize"] is False
    assert cfg["train"]["weight_decay"] == 1e-4
    # the seed's schedule is kept: SGD lr 0.1, 100 epochs at batch 128, x0.1 at epochs 50/75/90
    assert (cfg["train"]["optimizer"], cfg["train"]["lr"], cfg["train"]["steps"]) == ("sgd", 0.1, 39100)
    assert cfg["train"]["milestones"] == [19550, 29325, 35190]


def test_paper_improved_preset_is_the_defaults():
    assert load_config("classifier", preset="paper-improved") == load_config("classifier")
    cfg = load_config("classifier")
    assert (cfg["train"]["augment"], cfg["train"]["normalize"], cfg["train"]["weight_decay"]) == \
        ("crop_flip", True, 5e-4)
    assert cfg["data"]["val_fraction"] == 0.1


def test_input_stats_identity_without_normalisation():
    images = torch.randint(0, 256, (20, 3, 4, 4), dtype=torch.uint8)
    assert input_stats(images, False) == ([0.0] * 3, [1.0] * 3)
    mean, std = input_stats(images, True)
    unit = images.float() / 255
    assert torch.allclose(torch.tensor(mean), unit.mean(dim=(0, 2, 3)), atol=1e-6)
    assert torch.allclose(torch.tensor(std), unit.std(dim=(0, 2, 3)), atol=1e-6)


def test_paper_run_trains_on_raw_unit_images(tmp_path):
    runs = tmp_path / "runs"
    assert main(["train", "--method", "gradnorm", "--in", "digits", "--preset", "paper", "--runs-dir", str(runs),
                 "--run-name", "p", "--set", "data.limit=64", "--set", "model.arch=small_cnn",
                 "--set", "model.width=8", "--set", "train.steps=1", "--set", "train.batch_size=16",
                 "--set", "train.milestones=[]", "--set", "train.ckpt_every=100", "--device", "cpu"]) == 0
    run = next(runs.iterdir())
    state = checkpoint.load(run / "detector.pt")
    assert state["mean"] == [0.0] * len(state["mean"]) and state["std"] == [1.0] * len(state["std"])
    cfg = configs.read_yaml(run / "config.yaml")
    assert cfg["train"]["weight_decay"] == 1e-4 and cfg["data"]["val_fraction"] == 0.0


def test_msma_adam_epsilon_is_keras_default():
    """MSMA (issue 30, item 6): the released code builds Keras Adam(learning_rate) only, so epsilon is 1e-7."""
    from oodbench.engine import TrainSpec

    spec = TrainSpec.from_cfg(load_config("msma")["train"])
    opt = spec.optimizer_for([torch.nn.Parameter(torch.zeros(2))])
    assert opt.defaults["eps"] == 1e-7 and opt.defaults["betas"] == (0.9, 0.999) and opt.defaults["lr"] == 1e-3
    assert TrainSpec().optimizer_for([torch.nn.Parameter(torch.zeros(2))]).defaults["eps"] == 1e-8
