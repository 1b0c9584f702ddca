"""Paper-fidelity smoke check per family: does bf16 autocast change what the paper-size networks learn and score?

For each family (msma, llr, ddpm, amp, gradients) the network of its `--preset paper` config is built at that size
and trained twice with `Engine.fit`, from the same seed (so the same initial weights, batches and noise draws): once
in fp32 (train.amp=off), once under bf16 autocast (train.amp=bf16), with the preset's optimiser, schedule and batch
size, on seeded synthetic images of the paper's input shape (smooth random blobs; 3x32x32 CIFAR-like, 1x28x28 for
llr; for the classifiers ten classes set by the blobs' colour). A held-out ID set of the same kind and an OOD set
(the ID images inverted, 255 - x, or uniform noise with --ood noise) are then scored with the family's own formula:
- msma: L2 norm of the (B, L) weighted score-norm vector (`score_norms`, all noise levels);
- llr: -log p under the foreground PixelCNN++ (the likelihood row; no background model). PixelCNN++ turns autocast
  off in its `distribution`, so both its trainings and scorings run in fp32: its row should show identical numbers;
- ddpm: reconstruction MSE averaged over two starting points (t = 10 and 170, the preset's sampler);
- amp: the preset's anchored score (amp.score with amp.k anchors drawn as amp.anchors says);
- gradients: GradNorm (closed form) of the classifier the gradient family scores (the classifier's paper preset).
Printed per family: parameters, batch (the preset's), training steps and steps/s of each precision (the timed `fit`
call less the per-call overhead, optimiser setup and checkpoint saves, that probe fits of 2 and 6 steps measure;
without probes, the whole call), final loss (mean of the losses logged in the last 20% of steps), AUROC ID vs OOD of
the fp32- and the bf16-trained model (both scored in fp32), the Spearman correlation of their scores (ID and OOD
together), and max |s_bf16 - s_fp32| / |s_fp32| of the fp32-trained model scored under bf16 autocast vs fp32.
`--budget-s` caps each family's two trainings together (the probe's steps/s sets the step count; the table shows the
steps run). At the paper sizes the ddpm UNet (17.7M parameters, batch 512) and the msma RefineNet (28.1M, batch 128)
are the ones expected to be cut on one H100 (an estimate; not yet measured).

    python scripts/perf/paper_smoke.py [--device auto|cpu|cuda] [--steps 300] [--families msma,llr,ddpm,amp,gradients]
                                       [--budget-s 20] [--eval-images 256] [--ood invert|noise] [--tiny]

--tiny: tiny networks and 64 training images (a CPU check of the script itself, well under a minute). bf16 autocast
runs on the CPU too, slowly; the numbers that matter come from a GPU (scripts/perf/gpu_checks.sh runs this).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from scipy.stats import spearmanr

from oodbench.config import load_config
from oodbench.data import transforms
from oodbench.data.imageset import ImageSet
from oodbench.detectors.amp import AMP, anchored_loss, channel_stats
from oodbench.detectors.classifier import classification_loss, input_stats
from oodbench.detectors.ddpm import DDPM, minmax_unit, pad_to_multiple
from oodbench.detectors.gradients import gradnorm_scores
from oodbench.detectors.llr import LikelihoodRatioRun, likelihood_loss
from oodbench.detectors.msma import MSMA, dsm_loss, model_sigmas, score_norms
from oodbench.engine import Engine, TrainSpec, resolve_device, seed_everything
from oodbench.metrics import evaluate
from oodbench.nets.anchoring import build_anchored
from oodbench.nets.classifiers import build_classifier
from oodbench.nets.pixelcnnpp import PixelCNNpp
from oodbench.nets.score_nets import build_score_net
from timing import timed

FAMILIES = ("msma", "llr", "ddpm", "amp", "gradients")
CONFIG_KIND = {"msma": "msma", "llr": "llr", "ddpm": "ddpm", "amp": "amp", "gradients": "classifier"}
TINY = {   # --tiny: network sizes for a CPU run of seconds
    "msma": ["model.filters=4", "model.num_L=4"],
    "llr": ["model.num_filters=8", "model.num_resnet=1"],
    "ddpm": ["model.size=custom", "model.base=8", "model.mults=[1,2]", "model.attn_levels=[1]"],
    "amp": ["model.arch=small_cnn", "model.width=8", "train.pool_size=16"],
    "gradients": ["model.arch=small_cnn", "model.width=8"],
}
CLASSES = 10
PROBE_STEPS = (2, 6)    # the probe fits' lengths (only when --steps is longer and --budget-s > 0)
SEED = 0


@dataclass
class Family:
    """What one family trains and how it scores: `score(net, x_uint8)` -> (B,) OOD scores (higher = more OOD)."""

    cfg: dict
    build: Callable[[], torch.nn.Module]
    loss: Callable
    train: ImageSet
    score: Callable[[torch.nn.Module, torch.Tensor], torch.Tensor]


# --- synthetic images ------------------------------------------------------------------------------------------
def blobs(n: int, channels: int, size: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(uint8 images (n, C, size, size), labels (n,)): three Gaussian blobs per image on a dark background, random
    centres and widths; the class (0..9) sets the blobs' colour (a fixed palette), plus mild pixel noise."""
    g = torch.Generator().manual_seed(seed)
    palette = 0.3 + 0.7 * torch.rand(CLASSES, channels, generator=torch.Generator().manual_seed(12345))
    labels = torch.randint(0, CLASSES, (n,), generator=g)
    coords = torch.arange(size, dtype=torch.float32)
    yy, xx = coords.view(1, size, 1), coords.view(1, 1, size)
    img = torch.zeros(n, channels, size, size)
    for _ in range(3):
        cy, cx = (torch.rand(n, 1, 1, generator=g) * size for _ in range(2))
        width = size * (0.06 + 0.14 * torch.rand(n, 1, 1, generator=g))
        bump = torch.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * width ** 2))
        strength = palette[labels] * (0.6 + 0.4 * torch.rand(n, 1, generator=g))
        img += strength[:, :, None, None] * bump[:, None]
    img = img.clamp(0, 1) + 0.02 * torch.randn(img.shape, generator=g)
    return (img.clamp(0, 1) * 255).round().to(torch.uint8), labels


def ood_of(images: torch.Tensor, how: str, seed: int) -> torch.Tensor:
    if how == "invert":
        return 255 - images
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, images.shape, generator=g, dtype=torch.uint8)


# --- the families ----------------------------------------------------------------------------------------------
def family_config(name: str, tiny: bool) -> dict:
    kind = CONFIG_KIND[name]
    return load_config(kind, preset="paper", overrides=TINY[name] if tiny else ())


def make_family(name: str, cfg: dict, train: ImageSet, device: torch.device) -> Family:
    tc, mc = cfg["train"], cfg["model"]
    c = train.shape[0]
    if name == "msma":
        cfg["data"]["in"] = "cifar10"           # the CIFAR-like images: random flips as the detector does
        flip = MSMA(cfg, device).hflip()
        sigmas = model_sigmas(mc).to(device)
        chunk = int(cfg["msma"]["score_chunk"])

        def loss(model, batch):
            x = transforms.random_hflip(batch[0]) if flip else batch[0]
            return dsm_loss(model, transforms.to_unit(x), sigmas)

        return Family(cfg, lambda: build_score_net(mc["model"], c, int(mc["filters"]), len(sigmas)), loss, train,
                      lambda net, x: score_norms(net, transforms.to_unit(x), sigmas, chunk).norm(dim=1))
    if name == "llr":
        net_cfg = LikelihoodRatioRun(cfg, device).net_config(c)
        return Family(cfg, lambda: PixelCNNpp(**net_cfg), likelihood_loss(0.0, 0.0), train,
                      lambda net, x: -net(x).float())
    if name == "ddpm":
        # two starting points (t = 10, 170 of the 100-step schedule), MSE only, autocast from the caller
        cfg["ddpm"].update(inference_skip_factor=16, max_t=300, metrics=["mse"], amp="off")
        det = DDPM(cfg, device)
        net_cfg = {**mc, "in_channels": c}
        multiple = det._build(net_cfg).multiple

        def loss(model, batch):
            return det.diffusion.loss(model, pad_to_multiple(minmax_unit(batch[0]), multiple))

        def score(net, x):
            det.net = net
            return det.errors(x)[0]["mse"].mean(dim=1)

        return Family(cfg, lambda: det._build(net_cfg), loss, train, score)
    if name == "amp":
        mean, std = channel_stats(train.images)
        kw = {k: v for k, v in mc.items() if k != "arch"}
        loss = anchored_loss(mean, std, tc["anchor_sampling"], int(tc["corrupt_every"]), tc["augment"],
                             int(tc["crop_padding"]))
        det = AMP(cfg, device)
        det.use_training_images(train)
        det.state = {"mean": mean, "std": std}

        def score(net, x):
            det.model = net
            return det.score(x)

        return Family(cfg, lambda: build_anchored(mc["arch"], c, CLASSES, **kw), loss, train, score)
    # gradients: the classifier of the gradient family, trained as ClassifierTrainer's plain recipe
    mean, std = input_stats(train.images, tc["normalize"])
    criterion = classification_loss(tc["loss"])

    def prepare(x):
        return transforms.normalize(transforms.to_unit(x), mean, std)

    def loss(model, batch):
        x, y = batch
        logits = model(prepare(transforms.augment(x, tc["augment"], int(tc["crop_padding"]))))
        return criterion(logits, y)

    def score(net, x):
        features = net.features(prepare(x))
        return -gradnorm_scores(features, net.head(features))

    build = lambda: build_classifier(mc["arch"], c, CLASSES, dropout=mc["dropout"], width=mc["width"])  # noqa: E731
    return Family(cfg, build, loss, train, score)


# --- training and scoring --------------------------------------------------------------------------------------
def train_once(family: Family, amp: str, steps: int, device) -> tuple[float, float, torch.nn.Module]:
    """(seconds of the whole `fit`, final loss, trained network) of `steps` steps under train.amp=`amp`."""
    spec = TrainSpec.from_cfg({**family.cfg["train"], "steps": steps, "amp": amp, "ckpt_every": steps,
                               "eval_every": steps, "log_every": max(1, steps // 50)})
    with tempfile.TemporaryDirectory() as run_dir:
        engine = Engine(run_dir, device=device, seed=SEED)      # seeds the initial weights built next
        net = family.build()
        seconds, net = timed(lambda: engine.fit("net", net, family.loss, family.train, spec))
        records = [json.loads(line) for line in (Path(run_dir) / "log.jsonl").read_text().splitlines()]
    losses = [r for r in records if "loss" in r]
    tail = [r["loss"] for r in losses if r["step"] > 0.8 * steps] or [losses[-1]["loss"]]
    return seconds, sum(tail) / len(tail), net.eval()


def scores(family: Family, net, sets, bf16: bool, device, batch: int = 256) -> list:
    """OOD scores (float64 on the CPU) of each uint8 set, under bf16 autocast or in fp32."""
    ctx = torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()
    out = []
    with ctx, torch.no_grad():
        for images in sets:
            parts = [family.score(net, images[i:i + batch].to(device)) for i in range(0, len(images), batch)]
            out.append(torch.cat(parts).double().cpu())
    return out


def probe(family: Family, amp: str, device) -> tuple[float, float]:
    """(seconds per step, seconds of a `fit` call's own overhead: optimiser, checkpoint saves) under train.amp=`amp`,
    from the warm best of two short fits and one longer one."""
    short = min(train_once(family, amp, PROBE_STEPS[0], device)[0] for _ in range(2))
    long = train_once(family, amp, PROBE_STEPS[1], device)[0]
    per_step = max(1e-6, (long - short) / (PROBE_STEPS[1] - PROBE_STEPS[0]))
    return per_step, max(0.0, short - PROBE_STEPS[0] * per_step)


def run_family(name: str, args, device) -> dict:
    cfg = family_config(name, args.tiny)
    channels, size = (1, 28) if name == "llr" else (3, 32)
    n_train, n_eval = (64, 32) if args.tiny else (4096, args.eval_images)
    if args.tiny:
        cfg["train"]["batch_size"] = min(int(cfg["train"]["batch_size"]), 16)
    images, labels = blobs(n_train, channels, size, seed=1)
    train = ImageSet(images.to(device), labels.to(device), name="blobs")
    held_out = blobs(n_eval, channels, size, seed=2)[0]
    family = make_family(name, cfg, train, device)
    steps, overhead = args.steps, {"off": 0.0, "bf16": 0.0}
    if args.budget_s > 0 and steps > PROBE_STEPS[1]:
        probes = {amp: probe(family, amp, device) for amp in overhead}
        overhead = {amp: o for amp, (_, o) in probes.items()}
        steps = max(PROBE_STEPS[1], min(steps, int(args.budget_s / sum(p for p, _ in probes.values()))))
    t32, loss32, net32 = train_once(family, "off", steps, device)
    t16, loss16, net16 = train_once(family, "bf16", steps, device)
    rate32, rate16 = (steps / max(t - overhead[amp], 0.5 * t) for t, amp in ((t32, "off"), (t16, "bf16")))
    sets = (held_out, ood_of(held_out, args.ood, seed=3))
    id32, ood32 = scores(family, net32, sets, False, device)
    id16, ood16 = scores(family, net16, sets, False, device)
    id32b, ood32b = scores(family, net32, sets, True, device)
    exact, autocast = torch.cat([id32, ood32]), torch.cat([id32b, ood32b])
    return {"family": name, "params_m": sum(p.numel() for p in net32.parameters()) / 1e6, "steps": steps,
            "batch": int(cfg["train"]["batch_size"]), "steps_s_fp32": rate32, "steps_s_bf16": rate16,
            "loss_fp32": loss32, "loss_bf16": loss16,
            "auroc_fp32": evaluate(id32.numpy(), ood32.numpy())["auroc"],
            "auroc_bf16": evaluate(id16.numpy(), ood16.numpy())["auroc"],
            "spearman": float(spearmanr(exact.numpy(), torch.cat([id16, ood16]).numpy())[0]),
            "max_rel_diff_bf16_scoring": float(((autocast - exact).abs() / exact.abs().clamp_min(1e-12)).max())}


COLUMNS = (("family", "{:<9}"), ("params_m", "{:>8.2f}"), ("batch", "{:>5}"), ("steps", "{:>5}"),
           ("steps_s_fp32", "{:>8.2f}"), ("steps_s_bf16", "{:>8.2f}"), ("loss_fp32", "{:>10.4g}"),
           ("loss_bf16", "{:>10.4g}"), ("auroc_fp32", "{:>7.4f}"), ("auroc_bf16", "{:>7.4f}"),
           ("spearman", "{:>8.4f}"), ("max_rel_diff_bf16_scoring", "{:>9.2e}"))
HEADER = ("family    params M batch steps  step/s32 step/s16   loss fp32  loss bf16  AUC32   AUC16  spearman  "
          "relΔ bf16")


def format_row(row: dict) -> str:
    return "  ".join(fmt.format(row[key]) for key, fmt in COLUMNS)


def main(argv=None) -> list:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="auto")
    p.add_argument("--steps", type=int, default=300, help="training steps per precision (default 300)")
    p.add_argument("--families", default=",".join(FAMILIES), help=f"comma-separated subset of {','.join(FAMILIES)}")
    p.add_argument("--budget-s", type=float, default=20.0,
                   help="seconds for a family's two trainings together; fewer steps when the probe says so (0 = off)")
    p.add_argument("--eval-images", type=int, default=256, help="held-out ID images (and as many OOD) per family")
    p.add_argument("--ood", default="invert", choices=["invert", "noise"])
    p.add_argument("--tiny", action="store_true", help="tiny networks and few images (a CPU check of the script)")
    args = p.parse_args(argv)
    families = [f.strip() for f in args.families.split(",") if f.strip()]
    unknown = [f for f in families if f not in FAMILIES]
    if unknown or not families:
        p.error(f"--families {args.families!r}: use a comma-separated subset of {','.join(FAMILIES)}")
    if args.steps < 1 or args.eval_images < 2:
        p.error("--steps must be >= 1 and --eval-images >= 2")
    os.environ.setdefault("OODBENCH_PROGRESS", "0")
    device = resolve_device(args.device)
    print(f"device {device}{' (tiny networks)' if args.tiny else ''}, torch {torch.__version__}, threads "
          f"{torch.get_num_threads()}; OOD = {args.ood}; both models scored in fp32 for AUROC and Spearman; relΔ = "
          f"max |s_bf16 - s_fp32| / |s_fp32| of the fp32 model scored under bf16 autocast")
    print(HEADER, flush=True)
    rows = []
    for name in families:
        rows.append(run_family(name, args, device))
        print(format_row(rows[-1]), flush=True)
    cut = [r["family"] for r in rows if r["steps"] < args.steps]
    if cut:
        print(f"steps cut to fit --budget-s {args.budget_s:g} for: {', '.join(cut)}")
    return rows


if __name__ == "__main__":
    main()
