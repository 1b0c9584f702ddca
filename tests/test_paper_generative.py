"""`--preset paper` of the generative families reproduces the released code (issue 30, items 1-3)."""
from __future__ import annotations

import json
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


def test_llr_paper_preset_network_input_is_the_released_tfp_networks():
    """LLR (issue 30 item 5): --preset paper has no constant-ones channel; the first layers then equal the released
    TFP network's masked 'same'-padded convolutions (zero padding) of the image itself."""
    import torch.nn.functional as F
    from oodbench.nets.pixelcnnpp import down_shift, right_shift
    paper, default = load_config("llr", preset="paper"), load_config("llr")
    assert paper["model"]["ones_channel"] is False and default["model"]["ones_channel"] is True
    run = llr.LikelihoodRatioRun.__new__(llr.LikelihoodRatioRun)
    run.cfg = paper
    cfg = run.net_config(3)
    assert cfg["ones_channel"] is False
    torch.manual_seed(0)
    net = PixelCNNpp(**{**cfg, "num_filters": 4, "num_resnet": 1, "init": "torch"})   # nonzero biases to see
    assert net.u_init.in_channels == 3 and net.ul_init_left.in_channels == 3
    assert PixelCNNpp(in_channels=3, num_filters=4, num_resnet=1).u_init.in_channels == 4   # default keeps it
    x = torch.randint(0, 256, (2, 3, 6, 5), dtype=torch.uint8)
    h = net.network_input(x)

    def masked_same(conv, size, rows, cols):      # pixel_cnn.py: Conv2D(padding='same') with a kernel mask
        w = torch.zeros(conv.out_channels, conv.in_channels, *size)
        w[:, :, rows[0]:rows[1], cols[0]:cols[1]] = conv.weight
        return F.conv2d(h, w, conv.bias, padding=(size[0] // 2, size[1] // 2))

    r, c = 3, 3                                   # receptive_field_dims (3, 3)
    vertical = masked_same(net.u_init, (2 * r - 1, c), (0, r - 1), (0, c))
    up = masked_same(net.ul_init_up, (3, c), (0, 1), (0, c))
    left = masked_same(net.ul_init_left, (3, c), (0, 2), (0, c // 2))
    with torch.no_grad():
        u = net._shifted(down_shift, net.u_init, h)
        ul = net._shifted(down_shift, net.ul_init_up, h) + net._shifted(right_shift, net.ul_init_left, h)
        assert torch.allclose(u, vertical, atol=1e-4) and torch.allclose(ul, up + left, atol=1e-4)
        assert not torch.allclose(down_shift(net.u_init(h)), vertical, atol=1e-4)   # zero fill would differ (row 0)
        assert torch.isfinite(net(x)).all()
    xf = net.network_input(x).clone().requires_grad_(True)
    net.network_input = lambda _x: xf                  # causality without the ones channel: pixel (2, 2)'s output
    net.raw_output(x)[:, :, 2, 2].sum().backward()     # sees only earlier pixels in raster order
    g = xf.grad.abs().sum((0, 1))
    assert g[2, 2:].sum() == 0 and g[3:].sum() == 0 and g[:2].sum() > 0


def test_msma_paper_preset_is_fp32_and_train_gmms_grid_search():
    """MSMA (issue 30 item 6): paper-era training was fp32; the GMM is the released train_gmm's GridSearchCV."""
    import numpy as np
    from sklearn.mixture import GaussianMixture
    from sklearn.model_selection import GridSearchCV
    from sklearn.pipeline import Pipeline
    from sklearn.preprocessing import StandardScaler
    from oodbench.aux_models import GMM
    paper, default = load_config("msma", preset="paper"), load_config("msma")
    assert paper["train"]["amp"] == "off" and default["train"]["amp"] == "auto"
    assert paper["msma"]["gmm_cv"] == "original" and default["msma"]["gmm_cv"] == "shuffled"
    assert load_config("msma", preset="paper-improved") == default
    assert paper["msma"]["gmm_components"] == list(range(2, 21, 2)) and paper["msma"]["gmm_cv_folds"] == 10
    rng = np.random.default_rng(0)
    v = np.concatenate([rng.normal(0, 1, (60, 3)), rng.normal(4, 0.5, (60, 3))]) * [1.0, 10.0, 0.1]
    grid = GridSearchCV(Pipeline([("scaler", StandardScaler()), ("GMM", GaussianMixture(random_state=0))]),
                        dict(GMM__n_components=[1, 2, 3], GMM__covariance_type=["full"]), cv=5).fit(v)
    ours = GMM([1, 2, 3], 5, 1e-6, seed=0, cv="original").fit(v)
    assert np.allclose(ours.cv_loglik, grid.cv_results_["mean_test_score"])
    assert ours.n_components == grid.best_params_["GMM__n_components"]
    best = grid.best_estimator_
    x = torch.as_tensor(rng.normal(2, 2, (7, 3)) * [1.0, 10.0, 0.1])
    assert np.allclose(ours.score(x).numpy(), -best.score_samples(x.numpy()), atol=1e-8)
    shuffled = GMM([1, 2, 3], 5, 1e-6, seed=0).fit(v)
    assert not np.allclose(shuffled.cv_loglik, ours.cv_loglik)            # the option changes the CV
    assert GMM.from_state(ours.state_dict()).cv == "original"
    with pytest.raises(OODBenchError, match="gmm_cv"):
        GMM(cv="stratified").check(1000, 3)


# The released TFP network's kernel sizes (pixel_cnn.py, receptive_field_dims (3, 3)), written out per oodbench
# layer: each masked layer there is a full-size 'same' Conv2D, so Keras' Glorot fans count the whole kernel.
RELEASED_KERNELS = [("u_init", (5, 3)), ("ul_init_", (3, 3)), ("downsample_", (4, 4)), ("upsample_ul", (2, 2)),
                    ("upsample_u", (2, 4)), (".skip", (1, 1)), ("conv_", (3, 3)), ("out", (1, 1))]


def layer_kind(name: str) -> str:
    return next(key for key, _ in RELEASED_KERNELS if key in name)


def keras_glorot_bound(name: str, cin: int, cout: int) -> float:
    """Keras glorot_uniform: limit = sqrt(6 / (fan_in + fan_out)), fans = receptive field x in / out channels."""
    kh, kw = dict(RELEASED_KERNELS)[layer_kind(name)]
    return (6.0 / (kh * kw * cin + kh * kw * cout)) ** 0.5


def test_llr_paper_preset_initialises_as_the_released_keras_layers():
    """LLR (issue 30 item 5): train.py builds the network without weight norm (use_weight_norm False, as the shipped
    params.json), so every layer is a plain Keras layer: Glorot-uniform kernels over the released kernel size and
    zero biases. --preset paper has model.init=keras; the default keeps PyTorch's initialisation."""
    paper, default = load_config("llr", preset="paper"), load_config("llr")
    assert paper["model"]["init"] == "keras" and default["model"]["init"] == "torch"
    run = llr.LikelihoodRatioRun.__new__(llr.LikelihoodRatioRun)
    run.cfg = paper
    assert run.net_config(1)["init"] == "keras"
    torch.manual_seed(0)
    net = PixelCNNpp(in_channels=3, num_filters=32, num_resnet=1, num_hierarchies=2, init="keras",
                     ones_channel=False)
    seen = set()
    for name, m in net.named_modules():
        if not isinstance(m, (torch.nn.Conv2d, torch.nn.ConvTranspose2d)):
            continue
        w = m.weight.detach()
        cin, cout = (w.shape[0], w.shape[1]) if isinstance(m, torch.nn.ConvTranspose2d) else (w.shape[1], w.shape[0])
        bound = keras_glorot_bound(name, cin, cout)
        assert float(w.abs().max()) <= bound + 1e-7, name
        assert torch.count_nonzero(m.bias) == 0, name
        if w.numel() >= 2000:                         # uniform(-b, b): std b / sqrt(3), max close to b
            assert abs(float(w.std()) / (bound / 3 ** 0.5) - 1) < 0.1, name
            assert float(w.abs().max()) > 0.95 * bound, name
        seen.add(layer_kind(name))
    assert seen == {key for key, _ in RELEASED_KERNELS}           # every kind of layer was checked
    torch_init = PixelCNNpp(in_channels=3, num_filters=32, num_resnet=1, num_hierarchies=2)
    assert torch.count_nonzero(torch_init.u_init.bias) > 0          # the default is PyTorch's (nonzero biases)
    with pytest.raises(ValueError, match="init"):
        PixelCNNpp(init="xavier")


@pytest.mark.parametrize("preset", ["paper", None])
def test_llr_paper_preset_keeps_the_final_foreground(preset):
    """LLR (issue 30 item 5): the original scores the foreground at the last step (eval.py: one --ckpt_step for all
    models); --preset paper trains it without validation selection, the default keeps its best validation bits/dim."""
    class Record:
        device, run_dir, is_main, seed = torch.device("cpu"), Path("."), True, 0
        selected = {}

        def fit(self, name, model, loss_fn, train, spec, val_fn=None):
            self.selected[name] = val_fn is not None
            return model

    cfg = load_config("llr", preset=preset, overrides=["model.num_filters=4", "model.num_resnet=1",
                                                       "llr.mutation_rates=[0.1]", "llr.reg_weights=[0.0]",
                                                       "llr.val_ood=null"])
    assert llr.fg_checkpoint(cfg["llr"]) == ("final" if preset == "paper" else "best")
    images = ImageSet(torch.randint(0, 256, (8, 1, 4, 4), dtype=torch.uint8))
    engine = Record()
    llr.LikelihoodRatio(cfg, "cpu").train(images, images, engine)
    assert engine.selected == {"fg": preset is None, "bg-mu0.1-l0": False}


def test_llr_bad_init_or_checkpoint_is_a_one_line_error(capsys, tmp_path):
    from conftest import fails
    for option, word in [("model.init=xavier", "model.init"), ("llr.fg_checkpoint=last", "fg_checkpoint")]:
        line = fails(capsys, ["train", "--method", "llr", "--in", "fashion_mnist", "--runs-dir", str(tmp_path),
                              "--set", option])
        assert word in line
    assert not any(tmp_path.iterdir())                                  # nothing written


def test_msma_refinenet_initialises_as_keras_defaults():
    """MSMA: the original RefineNet's Keras Conv2D layers start Glorot-uniform (Keras fans: kh * kw * channels)
    with zero biases; oodbench's MSMARefineNet draws from the same distribution."""
    from oodbench.nets.score_nets import MSMARefineNet
    torch.manual_seed(0)
    net = MSMARefineNet(3, filters=16, num_L=4)
    convs = [(n, m) for n, m in net.named_modules() if isinstance(m, torch.nn.Conv2d)]
    assert len(convs) > 10
    for name, m in convs:
        w = m.weight.detach()
        out, cin, kh, kw = w.shape
        bound = (6.0 / (kh * kw * cin + kh * kw * out)) ** 0.5
        assert float(w.abs().max()) <= bound + 1e-7 and torch.count_nonzero(m.bias) == 0, name
        if w.numel() >= 2000:
            assert abs(float(w.std()) / (bound / 3 ** 0.5) - 1) < 0.1, name


def test_llr_selection_set_is_the_offline_notmnist_stand_in_in_both_presets():
    """LLR: the paper chose Fashion-MNIST's background model on notMNIST; offline both presets use `glyphs`, and
    `llr.val_ood=notmnist` (the original set, a folder the user places) is accepted by the same option."""
    from oodbench.data.folders import FOLDER_SETS
    for preset in ("paper", None):
        assert load_config("llr", preset=preset)["llr"]["val_ood"] == "glyphs"
    assert load_config("llr", preset="paper", overrides=["llr.val_ood=notmnist"])["llr"]["val_ood"] == "notmnist"
    assert "notmnist" in FOLDER_SETS


def test_ddpm_paper_checkpoint_is_the_best_training_loss_epoch(tmp_path, monkeypatch):
    """DDPM: trainer.py keeps the epoch with the lowest mean training loss; `--preset paper` (checkpoint=train_loss,
    one check per epoch) keeps the weights at the check whose window of training losses has the lowest mean."""
    from oodbench.diffusion import Diffusion
    from oodbench.engine import Engine, checkpoint

    paper, default = load_config("ddpm", preset="paper"), load_config("ddpm")
    assert (paper["ddpm"]["checkpoint"], paper["train"]["eval_every"]) == ("train_loss", 111)   # 57 000 / 512
    assert (default["ddpm"]["checkpoint"], default["train"]["eval_every"]) == ("val_loss", 1114)
    scripted = iter([5.0, 5.0, 1.0, 2.0, 3.0, 3.0])            # window means 5, 1.5, 3 at steps 2, 4, 6
    real = Diffusion.loss

    def loss(self, model, x, generator=None):
        out = real(self, model, x, generator=generator)
        return out + (next(scripted) - out.detach()) if generator is None else out   # training steps are scripted

    monkeypatch.setattr(Diffusion, "loss", loss)
    cfg = load_config("ddpm", preset="paper", overrides=TINY + [
        "train.steps=6", "train.eval_every=2", "train.ckpt_every=2", "train.max_to_keep=5", "train.batch_size=4",
        "train.amp=off", "ddpm.first_n_val=4", "ddpm.batch_size=4"])
    images = torch.randint(0, 256, (16, 1, 8, 8), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    det = DDPM(cfg)
    det.train(ImageSet(images[:12]), ImageSet(images[12:]), Engine(run_dir=tmp_path, device="cpu", seed=0))
    log = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert [r["val_loss"] for r in log if "val_loss" in r] == pytest.approx([5.0, 1.5, 3.0])
    folder = tmp_path / "checkpoints" / "unet"
    best = checkpoint.load(folder / "best.pt")
    assert best["step"] == 4
    step4 = checkpoint.load(folder / "step_00000004.pt")["model"]
    assert all(torch.equal(v, step4[k]) for k, v in det.net.state_dict().items())     # the kept weights are step 4
    with pytest.raises(OODBenchError, match="ddpm.checkpoint"):
        DDPM(load_config("ddpm", overrides=["ddpm.checkpoint=last"]))
