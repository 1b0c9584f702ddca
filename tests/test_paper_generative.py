"""`--preset paper` of the generative families reproduces the released code (issue 30, items 1-3)."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from oodbench.config import load_config
from oodbench.data.imageset import ImageSet
from oodbench.detectors import llr
from oodbench.detectors.ddpm import DDPM, combine, minmax_unit
from oodbench.detectors.llr import background_l2, l2_penalty, likelihood_loss
from oodbench.errors import OODBenchError
from oodbench.nets.pixelcnnpp import PixelCNNpp
from oodbench.nets.unet import build_unet

TINY = ["model.size=custom", "model.base=8", "model.mults=[1, 2]", "model.blocks=1", "model.attn_levels=[1]",
        "ddpm.num_inference_steps=10", "ddpm.inference_skip_factor=4"]


def test_ddpm_paper_preset_is_the_released_procedure():
    cfg = load_config("ddpm", preset="paper")
    assert cfg["ddpm"]["sampler"] == "plms_stale" and cfg["ddpm"]["metrics"] == "mse"
    assert DDPM(cfg).metrics() == ["mse"]                          # no LPIPS loaded or combined
    default = load_config("ddpm")
    assert load_config("ddpm", preset="paper-improved") == default
    assert (default["ddpm"]["sampler"], default["ddpm"]["metrics"]) == ("plms", "auto")


def test_ddpm_paper_score_is_stale_plms_mse_zscore():
    """Formula level: the paper preset's score = mean_t z(MSE(x, plms_stale reconstruction)), nothing else."""
    det = DDPM(load_config("ddpm", preset="paper", overrides=TINY))
    torch.manual_seed(0)
    net = build_unet("custom", 1, base=8, mults=(1, 2), blocks=1, attn_levels=(1,))
    for p in net.parameters():
        torch.nn.init.normal_(p, std=0.1)
    t = [100, 500, 900]
    g = torch.Generator().manual_seed(1)
    det.load_state_dict({"net_cfg": {**det.cfg["model"], "in_channels": 1}, "net": net.state_dict(), "val_t": t,
                         "val_errors": {"mse": torch.rand(6, 3, generator=g) * 0.1,
                                        "lpips": torch.rand(6, 3, generator=g)}})
    x = torch.randint(0, 256, (3, 1, 8, 8), generator=g, dtype=torch.uint8)
    rows = det.score_rows(x)
    assert set(rows) == {"ddpm-mse", "_mse", "_t"}
    # the reconstruction, written out: the detector's seeded noise, the stale sampler, per-image [0, 1] inputs
    d, x0 = det.diffusion, minmax_unit(x)
    starts = d.starting_points(10, 4)
    seeded = torch.Generator().manual_seed(0)
    with torch.no_grad():
        recon = d.reconstruct(det.net.eval(), x0, starts, 10, "plms_stale", generator=seeded).clamp(0, 1)
        fresh = d.reconstruct(det.net, x0, starts, 10, "plms", generator=torch.Generator().manual_seed(0))
    mse = (recon.transpose(0, 1) - x0[:, None]).pow(2).mean(dim=(2, 3, 4))
    assert torch.allclose(rows["_mse"], mse, atol=1e-6)
    assert not torch.allclose(fresh.clamp(0, 1), recon, atol=1e-6)   # the sampler matters, so the test would see it
    val = det.val_errors["mse"]
    z = ((mse - val.mean(0)) / val.std(0)).mean(1)
    assert torch.allclose(det.score(x), z, atol=1e-5) and torch.allclose(rows["ddpm-mse"], z, atol=1e-5)
    assert torch.allclose(z, combine({"mse": mse}, t, det.val_errors, t, ["mse"]), atol=1e-6)


def test_llr_paper_preset_background_l2_has_no_effect():
    """LLR (item 3): the released code's background L2 weight never reaches the loss; the paper preset keeps that."""
    paper, default = load_config("llr", preset="paper"), load_config("llr")
    assert background_l2(paper["llr"]) == "released" and background_l2(default["llr"]) == "applied"
    assert load_config("llr", preset="paper-improved") == default
    assert paper["llr"]["reg_weights"] == [0.0, 10.0, 100.0]           # the grid itself is the original's
    torch.manual_seed(0)
    net = PixelCNNpp(in_channels=1, num_filters=4, num_resnet=1, num_hierarchies=1, num_logistic_mix=1)
    x = torch.randint(0, 256, (2, 1, 4, 4), dtype=torch.uint8)
    nll = -net(x).mean()
    weights = sum(p.pow(2).sum() for p in net.parameters() if p.ndim > 1)
    assert torch.allclose(l2_penalty(net), weights)
    released, _ = likelihood_loss(0.0, 10.0, paper["llr"]["background_l2"])(net, (x,))
    applied, logs = likelihood_loss(0.0, 10.0, default["llr"]["background_l2"])(net, (x,))
    assert torch.allclose(released, nll)                                   # lambda = 10 contributes 0
    assert torch.allclose(applied - nll, 10.0 * weights) and float(weights.detach()) > 0
    assert torch.allclose(logs["l2"], weights)
    with pytest.raises(OODBenchError, match="background_l2"):
        background_l2({"background_l2": "ignored"})


@pytest.mark.parametrize("mode", ["released", "applied"])
def test_llr_train_passes_background_l2_to_every_background_loss(mode):
    """The run's background models get the chosen L2 behaviour; the foreground never has a penalty."""
    class OneStep:                    # runs each loss once on the first batch, records (name, loss - nll)
        device, run_dir, is_main, seed = torch.device("cpu"), Path("."), True, 0
        extra = {}

        def fit(self, name, model, loss_fn, train, spec, val_fn=None):
            loss, logs = loss_fn(model, (train.images[:4],))
            self.extra[name] = float((loss - logs["nll"]).detach())
            return model

    cfg = load_config("llr", preset="paper" if mode == "released" else None,
                      overrides=["model.num_filters=4", "model.num_resnet=1", "llr.mutation_rates=[0.0]",
                                 "llr.reg_weights=[100.0]", "llr.val_ood=null"])
    engine = OneStep()
    llr.LikelihoodRatio(cfg, "cpu").train(ImageSet(torch.randint(0, 256, (8, 1, 4, 4), dtype=torch.uint8)), None,
                                          engine)
    assert engine.extra["fg"] == 0.0
    assert (engine.extra["bg-mu0-l100"] == 0.0) == (mode == "released")
