"""DDPM reconstruction detector: schedule, samplers, batching, PLMS history, z-scores, LPIPS/SSIM, errors, end to end."""
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from oodbench.detectors.ddpm import (DDPM, LPIPS, combine, load_lpips, minmax_unit, row_combinations, ssim,
                                     val_statistics)
from oodbench.diffusion import Diffusion, _ddim_step
from oodbench.errors import OODBenchError
from oodbench.nets.unet import build_unet

REPO = Path(__file__).resolve().parents[1]
FMNIST = Path("/usr/share/datasets/fashion-mnist")



def oracle(diffusion, x0):
    """The exact ε for every row of a trajectory batch whose rows cycle through the images of x0."""
    def eps(x, t):
        a = diffusion.alphas_cumprod[t].to(x).view(-1, *([1] * (x.dim() - 1)))
        ref = x0.repeat(x.shape[0] // x0.shape[0], *([1] * (x0.dim() - 1)))
        return (x - a.sqrt() * ref) / (1 - a).sqrt()
    return eps


def tiny_unet(seed=0):
    torch.manual_seed(seed)
    net = build_unet("custom", 1, base=8, mults=(1, 2), blocks=1, attn_levels=(1,)).double().eval()
    for p in net.parameters():      # the zero-initialised output layers would make ε ≡ 0; randomise them
        torch.nn.init.normal_(p, std=0.1)
    return net


# --- schedule ----------------------------------------------------------------------------------------------------
def test_schedule_closed_form():
    d = Diffusion()
    a, b = math.sqrt(0.0015), math.sqrt(0.0195)
    betas = [(a + i * (b - a) / 999) ** 2 for i in range(1000)]
    assert math.isclose(float(d.betas[0]), 0.0015, rel_tol=1e-12)
    assert math.isclose(float(d.betas[-1]), 0.0195, rel_tol=1e-12)
    assert math.isclose(float(d.alphas_cumprod[-1]), math.exp(sum(math.log1p(-x) for x in betas)), rel_tol=1e-9)
    assert d.inference_timesteps(100).tolist() == list(range(0, 1000, 10))   # MONAI PNDM, offset 0


def test_starting_points_are_the_originals_slicing():
    """ddpm-ood reconstruct.py: reversed(timesteps)[1::skip]; its README's table says 100 and 34 for skip 1 and 3,
    the code gives 99 and 33 (t = 0 is never a start); we follow the code."""
    d = Diffusion()
    pndm_timesteps = d.inference_timesteps(100).flip(0).tolist()          # the scheduler's order: 990, ..., 0
    for k in (1, 2, 3, 4, 5, 8, 16, 32, 64):
        assert d.inference_timesteps(100)[d.starting_points(100, k)].tolist() == list(reversed(pndm_timesteps))[1::k]
    table = {1: 99, 2: 50, 3: 33, 4: 25, 5: 20, 8: 13, 16: 7, 32: 4, 64: 2}
    assert {k: len(d.starting_points(100, k)) for k in table} == table
    starts = d.starting_points(100, 16)
    assert d.inference_timesteps(100)[starts].tolist() == [10, 170, 330, 490, 650, 810, 970]
    assert d.network_evaluations(starts, "ddim") == 350          # the paper's "≈350 evaluations per image"


def test_defaults_and_paper_unet_are_the_originals():
    """ddpm-ood: README skip 4 (argparse 1), training batch 512; the "big" UNet has attention at all three levels
    with 256 channels per head (1, 2, 3 heads), the "small" one at the lowest level."""
    import yaml

    from oodbench.nets.unet import SIZES, Attention

    cfg = yaml.safe_load((REPO / "configs" / "ddpm.yaml").read_text())
    assert cfg["ddpm"]["inference_skip_factor"] == 4 and cfg["train"]["batch_size"] == 512
    assert SIZES["paper"]["attn_levels"] == (0, 1, 2) and SIZES["paper"]["head_channels"] == 256
    assert SIZES["small"]["attn_levels"] == (2,) and SIZES["small"]["head_channels"] == 256
    net = build_unet("custom", 1, base=4, mults=(1, 2, 3), blocks=1, attn_levels=(0, 1, 2), head_channels=4)
    heads = sorted({(m.heads, m.qkv.in_channels) for m in net.modules() if isinstance(m, Attention)})
    assert heads == [(1, 4), (2, 8), (3, 12)]


def test_bad_schedule_options():
    d = Diffusion()
    for n in (0, 30, 1001):
        with pytest.raises(OODBenchError, match="num_inference_steps"):
            d.inference_timesteps(n)
    for k in (0, -1, 100):
        with pytest.raises(OODBenchError, match="inference_skip_factor"):
            d.starting_points(100, k)
    with pytest.raises(OODBenchError, match="min_t"):
        d.starting_points(100, 16, min_t=971)


# --- samplers ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("sampler", ["ddim", "plms"])
def test_exact_eps_reconstructs_x0(sampler):
    d = Diffusion()
    x0 = torch.rand(3, 1, 6, 6, dtype=torch.float64)
    starts = d.starting_points(100, 16)
    recon = d.reconstruct(oracle(d, x0), x0, starts, 100, sampler, generator=torch.Generator().manual_seed(0))
    assert recon.shape == (7, 3, 1, 6, 6)
    assert torch.allclose(recon, x0.expand_as(recon), atol=1e-10)


def test_oracle_catches_off_by_one_timestep():
    """The oracle test can fail: a model told t+1 instead of t no longer reconstructs x0."""
    d = Diffusion()
    x0 = torch.rand(2, 1, 4, 4, dtype=torch.float64)
    exact = oracle(d, x0)
    recon = d.reconstruct(lambda x, t: exact(x, t + 1), x0, d.starting_points(100, 32), 100, "ddim")
    assert (recon - x0).abs().max() > 1e-4


def reference_trajectory(d, model, x0, start, num_steps, sampler, noise, history=None):
    """Straightforward single-start sampler (LDM-style PLMS loop); `history` lets a test inject stale ε's."""
    ts = d.inference_timesteps(num_steps).tolist()
    abar = d.alphas_cumprod.tolist()
    x = d.q_sample(x0, torch.full((x0.shape[0],), ts[start]), noise)
    old = [] if history is None else history
    for j in range(start, -1, -1):
        a_t, a_prev = abar[ts[j]], (abar[ts[j - 1]] if j > 0 else 1.0)
        e = model(x, torch.full((x.shape[0],), ts[j]))
        if sampler == "ddim":
            x = _ddim_step(x, e, a_t, a_prev)
            continue
        if not old:
            mix = e
            if j > 0:
                mix = (e + model(_ddim_step(x, e, a_t, a_prev), torch.full((x.shape[0],), ts[j - 1]))) / 2
        elif len(old) == 1:
            mix = (3 * e - old[-1]) / 2
        elif len(old) == 2:
            mix = (23 * e - 16 * old[-1] + 5 * old[-2]) / 12
        else:
            mix = (55 * e - 59 * old[-1] + 37 * old[-2] - 9 * old[-3]) / 24
        old.append(e)
        x = _ddim_step(x, mix, a_t, a_prev)
    return x


@pytest.mark.parametrize("sampler", ["ddim", "plms"])
def test_batched_equals_per_start(sampler):
    d, net = Diffusion(), tiny_unet()
    x0 = torch.rand(2, 1, 8, 8, dtype=torch.float64)
    starts = d.starting_points(20, 4)                                     # 5 starts, indices 1, 5, 9, 13, 17
    noise = torch.randn(len(starts), *x0.shape, dtype=torch.float64)
    calls = []

    def model(x, t):
        calls.append(x.shape[0])
        return net(x, t)

    batched = d.reconstruct(model, x0, starts, 20, sampler, noise=noise)
    expected = 2 * d.network_evaluations(starts, sampler)
    assert sum(calls) == expected                                         # no wasted network evaluations
    assert len(calls) == 18 + (5 if sampler == "plms" else 0)             # one call per step (+ Heun for new sets)
    for s, start in enumerate(starts.tolist()):
        single = reference_trajectory(d, net, x0, start, 20, sampler, noise[s])
        assert torch.allclose(batched[s], single, atol=1e-10), f"start {start}"


def test_plms_history_restarts_per_starting_point():
    """Fails for the stale-history bug: carrying the ε history of one starting point into the next."""
    d, net = Diffusion(), tiny_unet(1)
    x0 = torch.rand(2, 1, 8, 8, dtype=torch.float64)
    starts = d.starting_points(20, 4)
    noise = torch.randn(len(starts), *x0.shape, dtype=torch.float64)
    batched = d.reconstruct(net, x0, starts, 20, "plms", noise=noise)
    shared, stale = [], []
    for s, start in enumerate(starts.tolist()):
        fresh = reference_trajectory(d, net, x0, start, 20, "plms", noise[s])
        stale.append(reference_trajectory(d, net, x0, start, 20, "plms", noise[s], history=shared))
        assert torch.allclose(batched[s], fresh, atol=1e-10)
    # the buggy variant (history shared across starting points) differs from ours for every start after the first
    for s in range(1, len(starts)):
        assert (stale[s] - batched[s]).abs().max() > 1e-6


class MonaiPLMS:
    """What ddpm-ood's reconstruct.py does with MONAI's PNDMScheduler(skip_prk_steps=True), step by step: one
    scheduler per batch, `step(eps, t, x)` for t in the schedule down from each start, starts in ascending order."""

    def __init__(self, d, stride):
        self.abar, self.stride, self.ets, self.counter, self.held = d.alphas_cumprod.tolist(), stride, [], 0, None

    def step(self, eps, t, x):
        prev = t - self.stride
        if self.counter == 1:                               # the scheduler's second call redoes its first step
            prev, t = t, t + self.stride
            e, x = (eps + self.ets[-1]) / 2, self.held
        else:
            self.ets = self.ets[-3:] + [eps]
            n = len(self.ets)
            if n == 1:
                e, self.held = eps, x
            elif n == 2:
                e = (3 * self.ets[-1] - self.ets[-2]) / 2
            elif n == 3:
                e = (23 * self.ets[-1] - 16 * self.ets[-2] + 5 * self.ets[-3]) / 12
            else:
                e = (55 * self.ets[-1] - 59 * self.ets[-2] + 37 * self.ets[-3] - 9 * self.ets[-4]) / 24
        self.counter += 1
        a_t, a_prev = self.abar[t], self.abar[prev] if prev >= 0 else self.abar[0]   # final ᾱ = ᾱ_0
        # MONAI's formula (9) of the PNDM paper, written as it is there
        coeff = a_t * (1 - a_prev) ** 0.5 + (a_t * (1 - a_t) * a_prev) ** 0.5
        return (a_prev / a_t) ** 0.5 * x - (a_prev - a_t) * e / coeff


def test_plms_stale_is_the_originals_procedure():
    d, net = Diffusion(), tiny_unet(2)
    x0 = torch.rand(2, 1, 8, 8, dtype=torch.float64)
    starts = d.starting_points(20, 4)
    noise = torch.randn(len(starts), *x0.shape, dtype=torch.float64)
    ours = d.reconstruct(net, x0, starts, 20, "plms_stale", noise=noise)
    ts = d.inference_timesteps(20)
    sched = MonaiPLMS(d, 50)
    for s, start in enumerate(starts.tolist()):
        x = d.q_sample(x0, torch.full((2,), int(ts[start])), noise[s])
        for step in ts[ts <= ts[start]].flip(0).tolist():
            x = sched.step(net(x, torch.full((2,), step)), step, x)
        assert torch.allclose(ours[s], x, atol=1e-10), f"start {start}"
    fresh = d.reconstruct(net, x0, starts, 20, "plms", noise=noise)
    assert (ours[1:] - fresh[1:]).abs().amax(dim=(1, 2, 3, 4)).min() > 1e-6   # the stale history changes every later start
    alone = d.reconstruct(net, x0, starts[1:2], 20, "plms_stale", noise=noise[1:2])
    assert (alone[0] - ours[1]).abs().max() > 1e-6                          # a start depends on the ones before it
    # the original's last step keeps ᾱ_0: even the exact ε does not give x0 back, while our PLMS does
    exact = oracle(d, x0)
    assert (d.reconstruct(exact, x0, starts, 20, "plms_stale", noise=noise) - x0).abs().max() > 1e-3
    assert torch.allclose(d.reconstruct(exact, x0, starts, 20, "plms", noise=noise), x0.expand(5, *x0.shape), atol=1e-10)


# --- combination -------------------------------------------------------------------------------------------------
def test_zscore_combination_hand_numbers():
    val = {"mse": torch.tensor([[1.0, 10.0], [3.0, 20.0]]), "lpips": torch.tensor([[0.0, 2.0], [2.0, 4.0]])}
    # per t: mse mean (2, 15), std (√2, √50); lpips mean (1, 3), std (√2, √2)
    errors = {"mse": torch.tensor([[2.0, 15.0 + math.sqrt(50)]]), "lpips": torch.tensor([[1.0 + math.sqrt(2), 3.0]])}
    mse_only = combine(errors, [1, 161], val, [1, 161], ["mse"])
    both = combine(errors, [1, 161], val, [1, 161], ["mse", "lpips"])
    assert torch.allclose(mse_only, torch.tensor([0.5]))                 # mean(0, 1)
    assert torch.allclose(both, torch.tensor([1.0]))                     # mean(0 + 1, 1 + 0)
    assert torch.allclose(combine(errors, [1, 161], val, [1, 161], ["mse"], max_t=100), torch.tensor([0.0]))
    # columns are matched by t, not by position
    assert torch.allclose(combine(errors, [1, 161], {m: v.flip(1) for m, v in val.items()}, [161, 1], ["mse"]),
                          mse_only)
    with pytest.raises(OODBenchError, match="t=\\[321\\]"):
        combine(errors, [1, 321], val, [1, 161], ["mse"])
    assert row_combinations(["mse", "lpips", "ssim"]) == [("mse",), ("mse", "lpips"), ("mse", "ssim"),
                                                          ("mse", "lpips", "ssim")]


def test_val_statistics_too_small():
    with pytest.raises(OODBenchError, match="at least 2"):
        val_statistics({"mse": torch.ones(1, 3)})


# --- image distances ---------------------------------------------------------------------------------------------
def test_ssim_properties():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(4, 1, 28, 28, generator=g)
    assert torch.allclose(ssim(x, x), torch.ones(4))
    y = (x + 0.2 * torch.randn(4, 1, 28, 28, generator=g)).clamp(0, 1)
    z = (x + 0.5 * torch.randn(4, 1, 28, 28, generator=g)).clamp(0, 1)
    assert (ssim(x, z) < ssim(x, y)).all() and (ssim(x, y) < 1).all()


def fake_lpips_files(tmp_path):
    from torchvision.models import alexnet
    torch.manual_seed(0)
    alex = tmp_path / "alexnet.pth"
    torch.save(alexnet(weights=None).state_dict(), alex)
    lin = tmp_path / "alex.pth"
    torch.save({f"lin{i}.model.1.weight": torch.rand(1, c, 1, 1) for i, c in enumerate(LPIPS.CHANNELS)}, lin)
    return {"alexnet_weights": str(alex), "lpips_weights": str(lin)}


def test_lpips_from_local_files(tmp_path):
    net, message = load_lpips(fake_lpips_files(tmp_path))
    assert message == ""
    x = torch.rand(3, 1, 28, 28)
    assert torch.allclose(net(x, x), torch.zeros(3))
    d = net(x, x.flip(-1))
    assert d.shape == (3,) and (d > 0).all()


def test_lpips_equals_the_lpips_package_with_its_shipped_linear_weights():
    """With the lpips package (oodbench[lpips]) installed its v0.1 linear layers are found, and our LPIPS equals
    lpips.LPIPS(net="alex", normalize=True) on a shared (random, offline) AlexNet backbone."""
    lpips = pytest.importorskip("lpips")
    from torchvision.models import alexnet

    from oodbench.detectors.ddpm import lpips_weight_paths

    _, lin = lpips_weight_paths({})
    assert lin == Path(lpips.__file__).parent / "weights" / "v0.1" / "alex.pth" and lin.is_file()
    torch.manual_seed(0)
    theirs = lpips.LPIPS(net="alex", pnet_rand=True, verbose=False).eval()        # random backbone: no download
    backbone = alexnet(weights=None).state_dict()
    for name, value in theirs.net.state_dict().items():                          # slice<k>.<index>.<param>
        backbone[f"features.{name.split('.', 1)[1]}"] = value
    ours = LPIPS(backbone, torch.load(lin, map_location="cpu", weights_only=True))
    x, y = torch.rand(4, 3, 32, 32), torch.rand(4, 3, 32, 32)
    with torch.no_grad():
        expected = theirs(x, y, normalize=True).flatten()
    torch.testing.assert_close(ours(x, y), expected, rtol=1e-5, atol=1e-7)


def test_lpips_missing_weights(tmp_path):
    net, message = load_lpips({"alexnet_weights": str(tmp_path / "nope.pth"), "lpips_weights": str(tmp_path / "x")})
    assert net is None and "nope.pth" in message and "oodbench[lpips]" in message and "alexnet(" in message
    cfg = {"ddpm": {"metrics": ["mse", "lpips"], "alexnet_weights": str(tmp_path / "nope.pth"),
                    "lpips_weights": str(tmp_path / "x")}}
    with pytest.raises(OODBenchError, match="nope.pth"):
        DDPM(cfg).metrics()
    cfg["ddpm"]["metrics"] = "auto"
    assert DDPM(cfg).metrics() == ["mse"]                                 # default: falls back to MSE with a message


def test_the_missing_lpips_message_is_logged_once_per_process(tmp_path, caplog):
    cfg = {"ddpm": {"metrics": "auto", "alexnet_weights": str(tmp_path / "gone.pth"),
                    "lpips_weights": str(tmp_path / "x")}}
    with caplog.at_level("WARNING"):
        for _ in range(3):                                                # e.g. training, then scoring
            assert DDPM(cfg).metrics() == ["mse"]
    assert sum("gone.pth" in r.getMessage() for r in caplog.records) == 1


def test_bad_detector_options():
    for opts, match in [({"inference_skip_factor": 0}, "skip"), ({"num_inference_steps": 33}, "num_inference_steps"),
                        ({"metrics": ["psnr"]}, "metrics"), ({"sampler": "euler"}, "sampler")]:
        with pytest.raises(OODBenchError, match=match):
            DDPM({"ddpm": opts})


def test_minmax_unit():
    x = torch.tensor([[[[10, 20], [30, 50]]], [[[7, 7], [7, 7]]]], dtype=torch.uint8)
    u = minmax_unit(x)
    assert torch.allclose(u[0].flatten(), torch.tensor([0.0, 0.25, 0.5, 1.0])) and (u[1] == 0).all()


# --- detector through the engine ---------------------------------------------------------------------------------
def tiny_cfg(**ddpm):
    return {
        "seed": 0,
        "model": {"size": "custom", "base": 8, "mults": [1, 2], "blocks": 1, "attn_levels": [1], "timesteps": 1000,
                  "beta_start": 0.0015, "beta_end": 0.0195},
        "train": {"steps": 4, "batch_size": 8, "optimizer": "adam", "lr": 1e-3, "ckpt_every": 2, "eval_every": 2,
                  "log_every": 1},
        "ddpm": {"num_inference_steps": 10, "inference_skip_factor": 4, "sampler": "plms", "metrics": ["mse", "ssim"],
                 "first_n_val": 6, "val_loss_images": 8, "batch_size": 4, **ddpm},
    }


def test_detector_fit_score_state(tmp_path):
    from oodbench.data.imageset import ImageSet
    from oodbench.engine import Engine

    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (40, 1, 14, 14), generator=g, dtype=torch.uint8)
    det = DDPM(tiny_cfg())
    det.train(ImageSet(images[:30]), ImageSet(images[30:]), Engine(run_dir=tmp_path, device="cpu", seed=0))
    log = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert any("val_loss" in r for r in log) and any("loss" in r for r in log)
    assert det.val_t == [100, 500, 900] and det.val_errors["mse"].shape == (6, 3)
    rows = det.score_rows(images[:5])
    assert set(rows) == {"ddpm-mse", "ddpm-mse+ssim", "_mse", "_ssim", "_t"}
    assert rows["_mse"].shape == (5, 3) and rows["_t"][0].tolist() == [100, 500, 900]
    # the rows are the z-score combination of the saved per-(image, t) errors
    again = combine({"mse": rows["_mse"], "ssim": rows["_ssim"]}, [100, 500, 900], det.val_errors, det.val_t,
                    ["mse", "ssim"])
    assert torch.allclose(rows["ddpm-mse+ssim"], again)
    assert torch.allclose(det.score(images[:5]), rows["ddpm-mse+ssim"])           # deterministic
    # a state round trip through torch.save(weights_only) scores the same
    torch.save(det.state_dict(), tmp_path / "state.pt")
    other = DDPM(tiny_cfg())
    other.load_state_dict(torch.load(tmp_path / "state.pt", weights_only=True))
    assert torch.allclose(other.score(images[:5]), rows["ddpm-mse+ssim"])
    # a larger skip factor reuses a subset of the fitted starting points; a new one is an error
    coarse = DDPM(tiny_cfg(inference_skip_factor=8))
    coarse.load_state_dict(det.state_dict())
    assert coarse.score_rows(images[:2])["_t"][0].tolist() == [100, 900]
    odd = DDPM(tiny_cfg(inference_skip_factor=3))
    odd.load_state_dict(det.state_dict())
    with pytest.raises(OODBenchError, match="no validation statistics"):
        odd.score(images[:2])


def test_fit_needs_validation_images(tmp_path):
    from oodbench.data.imageset import ImageSet
    from oodbench.engine import Engine

    images = torch.randint(0, 256, (20, 1, 8, 8), dtype=torch.uint8)
    det = DDPM(tiny_cfg(first_n_val=1))
    with pytest.raises(OODBenchError, match="at least 2"):
        det.train(ImageSet(images[:16]), ImageSet(images[16:]), Engine(run_dir=tmp_path, device="cpu", seed=0))


# --- end to end --------------------------------------------------------------------------------------------------
def test_cli_end_to_end(tmp_path):
    """Train the quick preset on a Fashion-MNIST subset, evaluate against Gaussian noise through the CLI."""
    launcher = "import sys, oodbench.detectors.ddpm; from oodbench.cli import main; sys.exit(main(sys.argv[1:]))"
    common = ["--method", "ddpm", "--in", "fashion_mnist", "--runs-dir", str(tmp_path / "runs"), "--device", "cpu"]

    def run(*args):
        env = {**os.environ, "OODBENCH_DATA": str(tmp_path / "data"), "OMP_NUM_THREADS": "1"}  # shared 2-core box
        return subprocess.run([sys.executable, "-c", launcher, *args], cwd=REPO, capture_output=True, text=True,
                              timeout=1800, env=env)

    trained = run("train", *common, "--preset", "quick", "--set", "data.limit=1000", "--set", "train.steps=250",
                  "--set", "ddpm.first_n_val=30")
    assert trained.returncode == 0, trained.stderr[-3000:]
    run_dir = tmp_path / "runs" / "ddpm-fashion_mnist-s0"
    assert (run_dir / "detector.pt").is_file() and (run_dir / "checkpoints" / "unet" / "best.pt").is_file()
    evaluated = run("eval", *common, "--out", "noise:gaussian,vflip:fashion_mnist", "--limit", "40", "--format", "json")
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    rows = {(r["method"], r["out"]): r for r in json.loads(evaluated.stdout)}
    assert ("ddpm-mse", "vflip:fashion_mnist") in rows
    assert rows[("ddpm-mse", "noise:gaussian")]["auroc"] > 0.9
    scores = np.load(run_dir / "scores" / "ddpm" / "fashion_mnist.npz")
    assert scores["_mse"].shape == (40, 5) and scores["_t"][0].tolist() == [100, 300, 500, 700, 900]
