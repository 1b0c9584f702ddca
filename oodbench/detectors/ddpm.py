"""DDPM reconstruction OOD detector (Graham et al., CVPR-W 2023): train an ε-prediction DDPM, reconstruct every image
from several noise levels with a deterministic sampler, compare reconstruction and input (MSE, LPIPS, SSIM),
z-score each (t, metric) against the validation set and average over t.

Score = mean over starting points t of Σ_metrics (err_m(x, t) − mean_val[m, t]) / std_val[m, t]; higher = more OOD.
The per-(image, t) errors are returned as extra arrays (`_mse`, `_lpips`, `_ssim`: (B, n_t), `_t`) so the
combination can be redone without reconstructing (`combine`).
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Dict, Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from oodbench.detectors.base import Detector, register
from oodbench.diffusion import SAMPLERS, Diffusion
from oodbench.engine import TrainSpec, precision
from oodbench.engine.checkpoint import load_failure
from oodbench.errors import OODBenchError
from oodbench.nets.unet import build_unet

log = logging.getLogger("oodbench")
METRICS = ("mse", "lpips", "ssim")
CHECKPOINTS = ("val_loss", "train_loss")    # ddpm.checkpoint: what picks the kept weights
_WARNED: set = set()                         # LPIPS-missing messages already logged
ALEXNET_FILE = "alexnet-owt-7be5be79.pth"     # torchvision's ImageNet AlexNet
LPIPS_FILE = "alex.pth"                       # LPIPS v0.1 linear layers for AlexNet (lpips package: weights/v0.1/)


# --- scaling -------------------------------------------------------------------------------------------------------
def minmax_unit(x: torch.Tensor) -> torch.Tensor:
    """Each image min–max scaled to [0, 1] (a constant image becomes zeros)."""
    x = x.float()
    lo = x.amin(dim=(1, 2, 3), keepdim=True)
    span = x.amax(dim=(1, 2, 3), keepdim=True) - lo
    return torch.where(span > 0, (x - lo) / span.clamp_min(1e-12), torch.zeros_like(x))


def pad_to_multiple(x: torch.Tensor, multiple: int) -> torch.Tensor:
    """Zero-pad H and W (centred) up to a multiple of `multiple`."""
    h, w = x.shape[-2:]
    ph, pw = -h % multiple, -w % multiple
    return F.pad(x, (pw // 2, pw - pw // 2, ph // 2, ph - ph // 2)) if ph or pw else x


def center_crop(x: torch.Tensor, h: int, w: int) -> torch.Tensor:
    top, left = (x.shape[-2] - h) // 2, (x.shape[-1] - w) // 2
    return x[..., top:top + h, left:left + w]


# --- image distances -----------------------------------------------------------------------------------------------
def ssim(x: torch.Tensor, y: torch.Tensor, window: int = 11, sigma: float = 1.5) -> torch.Tensor:
    """Per-image SSIM (B,) of images in [0, 1]: Gaussian window, valid positions only, mean over channels."""
    c = x.shape[1]
    g = torch.exp(-((torch.arange(window, device=x.device, dtype=x.dtype) - window // 2) ** 2) / (2 * sigma ** 2))
    g = (g / g.sum())
    win = min(window, x.shape[-2], x.shape[-1])
    g = g[(window - win) // 2:(window - win) // 2 + win]
    g = g / g.sum()
    kh, kw = g.view(1, 1, -1, 1).repeat(c, 1, 1, 1), g.view(1, 1, 1, -1).repeat(c, 1, 1, 1)

    def blur(z):
        return F.conv2d(F.conv2d(z, kh, groups=c), kw, groups=c)

    mx, my = blur(x), blur(y)
    vx, vy, cov = blur(x * x) - mx ** 2, blur(y * y) - my ** 2, blur(x * y) - mx * my
    c1, c2 = 0.01 ** 2, 0.03 ** 2
    s = ((2 * mx * my + c1) * (2 * cov + c2)) / ((mx ** 2 + my ** 2 + c1) * (vx + vy + c2))
    return s.mean(dim=(1, 2, 3))


class LPIPS(nn.Module):
    """LPIPS v0.1 with AlexNet features: Σ_layers mean_hw w_l · (f̂_l(x) − f̂_l(y))², f̂ unit-normalised over channels.

    Inputs are images in [0, 1] (one or three channels); they are mapped to [−1, 1] and ImageNet-scaled as in LPIPS.
    """

    CHANNELS = (64, 192, 384, 256, 256)
    CUTS = (2, 5, 8, 10, 12)          # AlexNet `features` indices after relu1..relu5

    def __init__(self, alexnet_state: dict, lin_state: dict):
        super().__init__()
        from torchvision.models import alexnet

        net = alexnet(weights=None)
        net.load_state_dict(alexnet_state)
        self.features = net.features[:self.CUTS[-1]].eval()
        self.lins = nn.ModuleList(nn.Conv2d(c, 1, 1, bias=False) for c in self.CHANNELS)
        for i, lin in enumerate(self.lins):
            lin.weight.data.copy_(lin_state[f"lin{i}.model.1.weight"])
        self.register_buffer("shift", torch.tensor([-0.030, -0.088, -0.188]).view(1, 3, 1, 1))
        self.register_buffer("scale", torch.tensor([0.458, 0.448, 0.450]).view(1, 3, 1, 1))
        self.requires_grad_(False)

    def _feats(self, x):
        x = x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x
        h, out, start = ((2 * x - 1) - self.shift) / self.scale, [], 0
        for cut in self.CUTS:
            for layer in self.features[start:cut]:
                h = layer(h)
            out.append(h / (h.pow(2).sum(dim=1, keepdim=True).sqrt() + 1e-10))
            start = cut
        return out

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """(B,) distances; images smaller than 32 pixels are zero-padded to 32 (as the paper does for 28×28)."""
        ph, pw = max(0, 32 - x.shape[-2]), max(0, 32 - x.shape[-1])
        pad = (pw // 2, pw - pw // 2, ph // 2, ph - ph // 2)
        fx, fy = self._feats(F.pad(x, pad)), self._feats(F.pad(y, pad))
        return sum(lin((a - b) ** 2).mean(dim=(1, 2, 3)) for lin, a, b in zip(self.lins, fx, fy))


def lpips_weight_paths(options: dict) -> tuple[Path, Path]:
    """Where the AlexNet and LPIPS weights are looked for: the config paths, else torchvision's cache (AlexNet) and the
    installed `lpips` package (`pip install oodbench[lpips]`: its wheel ships the v0.1 linear layers), else the hub
    cache. Our LPIPS equals the package's (tested); we load its weights rather than call `lpips.LPIPS`, whose
    constructor fetches AlexNet itself and cannot be pointed at a local file."""
    alex = options.get("alexnet_weights")
    if not alex:
        alex = Path(torch.hub.get_dir()) / "checkpoints" / ALEXNET_FILE
    lin = options.get("lpips_weights")
    if not lin:
        lin = Path(torch.hub.get_dir()) / "checkpoints" / f"lpips_{LPIPS_FILE}"
        try:
            import lpips  # noqa: F401  (only to find its bundled weights)
            lin = Path(lpips.__file__).parent / "weights" / "v0.1" / LPIPS_FILE
        except ImportError:
            pass
    return Path(alex).expanduser(), Path(lin).expanduser()


def load_lpips(options: dict) -> tuple[Optional[LPIPS], str]:
    """(LPIPS network, "") when both weight files exist, else (None, a message naming the missing files)."""
    paths = lpips_weight_paths(options)
    missing = [f"{what} ({p})" for what, p in zip(("AlexNet weights", "LPIPS linear weights"), paths) if not p.is_file()]
    if missing:
        hints = []
        if not paths[0].is_file():
            hints.append("torchvision's AlexNet: run python -c \"import torchvision; torchvision.models.alexnet("
                         "weights='DEFAULT')\" once where the internet is reachable, or set ddpm.alexnet_weights")
        if not paths[1].is_file():
            hints.append("the linear layers: pip install 'oodbench[lpips]' (the lpips package ships them), or set "
                         "ddpm.lpips_weights")
        return None, f"LPIPS needs pretrained weights that were not found: {', '.join(missing)}; {'; '.join(hints)}"
    try:
        states = [torch.load(p, map_location="cpu", weights_only=True) for p in paths]
        return LPIPS(*states), ""
    except Exception as e:  # noqa: BLE001 - torch raises several types (UnpicklingError, RuntimeError, ...)
        raise OODBenchError(f"LPIPS weights {paths[0]} / {paths[1]} could not be loaded ({load_failure(e)}); "
                            f"point ddpm.alexnet_weights / ddpm.lpips_weights at torchvision's {ALEXNET_FILE} and "
                            f"the lpips package's v0.1 {LPIPS_FILE}") from e


# --- combination ---------------------------------------------------------------------------------------------------
def val_statistics(val_errors: Dict[str, torch.Tensor]) -> Dict[str, tuple]:
    """Per metric: (mean (n_t,), std (n_t,)) over validation images (std with n−1, as pandas does)."""
    stats = {}
    for m, e in val_errors.items():
        if e.shape[0] < 2:
            raise OODBenchError(f"the validation set has {e.shape[0]} image(s); per-t statistics need at least 2 "
                                f"(raise data.val_fraction or ddpm.first_n_val)")
        std = e.std(dim=0)
        if not torch.isfinite(std).all() or (std <= 0).any():
            raise OODBenchError(f"validation {m} errors have zero or non-finite spread at some t; the validation "
                                f"set is degenerate (use more or more varied images: data.val_fraction)")
        stats[m] = (e.mean(dim=0), std)
    return stats


def combine(errors: Dict[str, torch.Tensor], t: Sequence[int], val_errors: Dict[str, torch.Tensor],
            val_t: Sequence[int], metrics: Sequence[str], min_t: int = 0, max_t: Optional[int] = None) -> torch.Tensor:
    """OOD score (B,): mean over the t in [min_t, max_t) of Σ_metrics z-scores against the validation errors.

    errors[m]: (B, n_t) at timesteps t; val_errors[m]: (N_val, n_val_t) at timesteps val_t.
    """
    t, val_t = [int(v) for v in t], [int(v) for v in val_t]
    cols = [i for i, v in enumerate(t) if v >= min_t and (max_t is None or v < max_t)]
    absent = [t[i] for i in cols if t[i] not in val_t]
    if absent:
        raise OODBenchError(f"no validation statistics for starting points t={absent} (the run has t={val_t}); "
                            f"score with the training-time num_inference_steps / a multiple of its skip factor, or "
                            f"retrain")
    if not cols:
        raise OODBenchError(f"no starting point t in {t} satisfies {min_t} <= t < {max_t}; widen ddpm.min_t/max_t")
    val_cols = [val_t.index(t[i]) for i in cols]
    total = 0.0
    for m in metrics:
        if m not in errors or m not in val_errors:
            raise OODBenchError(f"metric {m!r} was not computed for this run; available: {sorted(val_errors)}")
        mean, std = val_statistics({m: val_errors[m][:, val_cols]})[m]
        e = errors[m][:, cols].float()
        total = total + (e - mean.to(e)) / std.to(e)
    return total.mean(dim=1)


def row_combinations(metrics: Sequence[str]) -> list[tuple]:
    """`mse` alone, mse + each other metric, and all chosen metrics together (the default score)."""
    combos = [("mse",)] if "mse" in metrics else []
    combos += [("mse", m) for m in metrics if m != "mse" and "mse" in metrics]
    if tuple(metrics) not in combos:
        combos.append(tuple(metrics))
    return combos


# --- the detector --------------------------------------------------------------------------------------------------
@register("ddpm")
class DDPM(Detector):
    kind = "ddpm"
    training_keys = ("ddpm.first_n_val", "ddpm.val_loss_images", "ddpm.batch_size",   # validation loss, per-t stats
                     "ddpm.checkpoint")
    summary = "DDPM reconstruction error from many noise levels, z-scored on validation (Graham et al. 2023)"

    def __init__(self, cfg: dict, device="cpu"):
        super().__init__(cfg, device)
        m = cfg.get("model", {}) or {}
        self.diffusion = Diffusion(int(m.get("timesteps", 1000)), float(m.get("beta_start", 0.0015)),
                                   float(m.get("beta_end", 0.0195)))
        self.net: Optional[nn.Module] = None
        self.net_cfg: dict = {}
        self.val_t: list = []
        self.val_errors: Dict[str, torch.Tensor] = {}
        self._lpips: Optional[LPIPS] = None
        self._metrics: Optional[list] = None
        self._check_options()

    # --- options ----------------------------------------------------------------------------------------------
    def _opt(self, key, default=None):
        value = self.options.get(key, default)
        return default if value is None else value

    def _check_options(self) -> None:
        o = self.options
        n, skip = o.get("num_inference_steps", 100), o.get("inference_skip_factor", 4)
        self.diffusion.starting_points(n, skip, int(self._opt("min_t", 0)), self._opt("max_t"))
        if self._opt("sampler", "plms") not in SAMPLERS:
            raise OODBenchError(f"ddpm.sampler={o.get('sampler')!r}: use one of {', '.join(SAMPLERS)}")
        if self._opt("checkpoint", "val_loss") not in CHECKPOINTS:
            raise OODBenchError(f"ddpm.checkpoint={o.get('checkpoint')!r}: use one of {', '.join(CHECKPOINTS)}")
        if self._opt("amp", "auto") not in precision.AMP_MODES:
            raise OODBenchError(f"ddpm.amp={o.get('amp')!r}: use one of {', '.join(precision.AMP_MODES)}")
        metrics = self._opt("metrics", "auto")
        if metrics != "auto":
            metrics = [metrics] if isinstance(metrics, str) else list(metrics)
            bad = [m for m in metrics if m not in METRICS]
            if bad or not metrics:
                raise OODBenchError(f"ddpm.metrics={o.get('metrics')!r}: use 'auto' or a list of {', '.join(METRICS)}")

    def metrics(self) -> list:
        """The metrics combined into the default score: 'auto' = mse + lpips when its weights are found, else mse."""
        if self._metrics is not None:
            return self._metrics
        wanted = self._opt("metrics", "auto")
        auto = wanted == "auto"
        wanted = ["mse", "lpips"] if auto else ([wanted] if isinstance(wanted, str) else list(wanted))
        if "lpips" in wanted and self._lpips is None:
            net, message = load_lpips(self.options)
            if net is None:
                if not auto:
                    raise OODBenchError(message + " (or drop lpips from ddpm.metrics)")
                if message not in _WARNED:          # once per process, not once per detector instance
                    _WARNED.add(message)
                    log.warning("%s; using MSE only", message)
                wanted = [m for m in wanted if m != "lpips"]
            else:
                self._lpips = net.to(self.device)
        self._metrics = wanted
        return wanted

    def _autocast(self):
        return precision.autocast(self.device, self._opt("amp", "auto"))

    # --- networks ---------------------------------------------------------------------------------------------
    def _build(self, net_cfg: dict) -> nn.Module:
        size = net_cfg.get("size", "small")
        keys = (("base", "mults", "blocks", "attn_levels", "heads", "head_channels", "dropout") if size == "custom"
                else ("dropout",))
        kw = {k: (tuple(net_cfg[k]) if isinstance(net_cfg[k], list) else net_cfg[k]) for k in keys if k in net_cfg}
        return build_unet(size, int(net_cfg["in_channels"]), **kw).to(self.device)

    def _prepare(self, x: torch.Tensor) -> torch.Tensor:
        """uint8 (B, C, H, W) → per-image [0, 1], zero-padded to what the UNet needs."""
        return pad_to_multiple(minmax_unit(x), self.net.multiple)

    def _model_fn(self):
        chunk = int(self._opt("forward_batch", 0))

        def eps(x, t):
            with self._autocast():
                if chunk <= 0 or x.shape[0] <= chunk:
                    return self.net(x, t).float()
                return torch.cat([self.net(a, b).float() for a, b in zip(x.split(chunk), t.split(chunk))])

        return eps

    # --- fit --------------------------------------------------------------------------------------------------
    def train(self, train, val, engine) -> None:
        if val is None or len(val) == 0:
            raise OODBenchError("DDPM needs a validation split (best checkpoint and per-t statistics); "
                                "set data.val_fraction > 0")
        self.metrics()  # an explicit LPIPS request without weights fails here, before training
        self.net_cfg = {**(self.cfg.get("model", {}) or {}), "in_channels": train.shape[0]}
        self.net = self._build(self.net_cfg)
        spec = TrainSpec.from_cfg(self.cfg["train"])
        diffusion, prepare = self.diffusion, self._prepare

        by_train_loss = self._opt("checkpoint", "val_loss") == "train_loss"   # the original's best training-loss epoch
        window = {"sum": torch.zeros((), device=engine.device), "steps": 0}   # training losses since the last check

        def loss_fn(model, batch):
            loss = diffusion.loss(model, prepare(batch[0]))
            if by_train_loss:
                window["sum"] += loss.detach().float()
                window["steps"] += 1
            return loss

        def train_loss(model):
            mean = float(window["sum"]) / window["steps"] if window["steps"] else float("inf")
            window.update(sum=torch.zeros((), device=engine.device), steps=0)
            return mean

        val_loss_set = val.head(int(self._opt("val_loss_images", 0)) or None).to(engine.device)

        def val_loss(model):
            g = torch.Generator(device=engine.device).manual_seed(engine.seed + 12345)
            total = 0.0
            with engine.autocast(spec.amp):
                for x, _ in val_loss_set.batches(spec.batch_size):
                    total += float(diffusion.loss(model, prepare(x), generator=g)) * x.shape[0]
            return total / len(val_loss_set)

        self.net = engine.fit("unet", self.net, loss_fn, train, spec, val_fn=train_loss if by_train_loss else val_loss)
        self.fit_statistics(val)

    def fit_statistics(self, val) -> None:
        """Reconstruct the validation images (first_n_val) and keep their per-(image, t) errors of every metric."""
        val = val.head(self._opt("first_n_val"))
        if len(val) < 2:
            raise OODBenchError(f"the validation set has {len(val)} image(s); per-t statistics need at least 2 "
                                f"(raise data.val_fraction or ddpm.first_n_val)")
        self.metrics()
        if self._lpips is None:  # keep LPIPS statistics whenever its weights exist, for later re-combination
            net, _ = load_lpips(self.options)
            self._lpips = None if net is None else net.to(self.device)
        parts, t = [], None
        for x, _ in val.to(self.device).batches(int(self._opt("batch_size", 64))):
            errors, t = self.errors(x, all_metrics=True)
            parts.append(errors)
        self.val_t = t
        self.val_errors = {m: torch.cat([p[m] for p in parts]).cpu() for m in parts[0]}
        val_statistics(self.val_errors)

    # --- scoring ----------------------------------------------------------------------------------------------
    @torch.no_grad()
    def errors(self, x: torch.Tensor, all_metrics: bool = False) -> tuple[Dict[str, torch.Tensor], list]:
        """Per-(image, t) errors {metric: (B, n_t)} of uint8 images x, and the starting timesteps t."""
        if self.net is None:
            raise OODBenchError("the DDPM detector has no trained network; run `oodbench train --method ddpm` first")
        self.net.eval()
        n = self.options.get("num_inference_steps", 100)
        starts = self.diffusion.starting_points(n, self.options.get("inference_skip_factor", 4),
                                                int(self._opt("min_t", 0)), self._opt("max_t"))
        x = x.to(self.device)
        h, w = x.shape[-2:]
        x0 = minmax_unit(x)
        g = torch.Generator(device=x.device).manual_seed(int(self.cfg.get("seed", 0)))
        recon = self.diffusion.reconstruct(self._model_fn(), pad_to_multiple(x0, self.net.multiple), starts, n,
                                           self._opt("sampler", "plms"), generator=g)
        recon = center_crop(recon, h, w).clamp(0, 1).transpose(0, 1)      # (B, S, C, H, W)
        B, S = recon.shape[:2]
        flat_r = recon.reshape(B * S, *recon.shape[2:])
        flat_x = x0[:, None].expand_as(recon).reshape_as(flat_r)
        wanted = set(self.metrics()) | ({"mse", "ssim", "lpips"} if all_metrics else set())
        out = {"mse": (flat_x - flat_r).pow(2).mean(dim=(1, 2, 3)).view(B, S)}
        if "ssim" in wanted:
            out["ssim"] = (1 - ssim(flat_x, flat_r)).view(B, S)
        if "lpips" in wanted and self._lpips is not None:
            out["lpips"] = self._lpips(flat_x, flat_r).float().view(B, S)
        t = self.diffusion.inference_timesteps(n)[starts].tolist()
        return out, t

    def score_rows(self, x: torch.Tensor) -> Dict[str, torch.Tensor]:
        errors, t = self.errors(x)
        rows = {}
        for combo in row_combinations(self.metrics()):
            rows["ddpm-" + "+".join(combo)] = combine(errors, t, self.val_errors, self.val_t, combo)
        for m, e in errors.items():
            rows["_" + m] = e
        rows["_t"] = torch.tensor(t, device=x.device).expand(x.shape[0], -1)
        return rows

    def score(self, x: torch.Tensor) -> torch.Tensor:
        errors, t = self.errors(x)
        return combine(errors, t, self.val_errors, self.val_t, self.metrics())

    # --- state ------------------------------------------------------------------------------------------------
    def row_notes(self, id_scores: dict) -> dict:
        """A score made without LPIPS (its weights were not found) says so beside its rows."""
        if "_lpips" in id_scores or (self.options.get("metrics") or "auto") != "auto":
            return {}
        note = "without LPIPS (its weights were not found): reconstruction MSE only; see docs/ddpm.md"
        return {row: [note] for row in id_scores if row.startswith("ddpm-")}

    def state_dict(self) -> dict:
        return {"net_cfg": dict(self.net_cfg), "net": self.net.state_dict(), "val_t": list(self.val_t),
                "val_errors": dict(self.val_errors)}

    def load_state_dict(self, state: dict) -> None:
        self.net_cfg = dict(state["net_cfg"])
        self.net = self._build(self.net_cfg)
        self.net.load_state_dict(state["net"])
        self.net.eval()
        self.val_t = [int(v) for v in state["val_t"]]
        self.val_errors = {m: e.cpu() for m, e in state["val_errors"].items()}
