"""`--preset paper` of the generative families reproduces the released code (issue 30, items 1-3)."""
from __future__ import annotations

import torch

from oodbench.config import load_config
from oodbench.detectors.ddpm import DDPM, combine, minmax_unit
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
