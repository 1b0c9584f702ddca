"""The one training loop every method uses (see docs/architecture.md)."""
from __future__ import annotations

import json
import os
import random
import sys
import time
from pathlib import Path
from typing import Callable, Optional, Union

import numpy as np
import torch
import torch.nn as nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from oodbench import progress
from oodbench.errors import OODBenchError
from oodbench.data.imageset import ImageSet
from oodbench.engine import checkpoint as ckpt
from oodbench.engine import distributed, precision
from oodbench.engine.spec import TrainSpec


def resolve_device(device: Union[str, torch.device] = "auto") -> torch.device:
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError):
        raise OODBenchError(f"--device {device}: not a device; use auto, cpu, cuda or cuda:N") from None
    if device.type not in ("cpu", "cuda"):
        raise OODBenchError(f"--device {device}: oodbench runs on auto, cpu, cuda or cuda:N")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise OODBenchError("--device cuda was asked for but no CUDA GPU is visible; use --device cpu or auto")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise OODBenchError(f"--device {device}: only {torch.cuda.device_count()} CUDA GPU(s) are visible "
                            f"(cuda:0..cuda:{torch.cuda.device_count() - 1})")
    return device


def setup_device(device: Union[str, torch.device] = "auto") -> torch.device:
    """The device of this process; joins the process group first when launched by torchrun."""
    return distributed.init_from_env(resolve_device(device))[2]


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


class EpochSampler:
    """Batch `step` of a seeded per-epoch permutation: the batch sequence depends only on (seed, step)."""

    def __init__(self, n: int, batch_size: int, seed: int, rank: int = 0, world: int = 1):
        if n == 0:
            raise OODBenchError("the training set is empty; check the dataset and data.val_fraction")
        self.n, self.batch, self.seed, self.rank, self.world = n, batch_size, seed, rank, world
        self.per_epoch = max(1, n // batch_size)
        self._epoch, self._perm = -1, None

    def indices(self, step: int) -> torch.Tensor:
        epoch, pos = divmod(step, self.per_epoch)
        if epoch != self._epoch:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._epoch, self._perm = epoch, torch.randperm(self.n, generator=g)
        idx = self._perm[pos * self.batch:(pos + 1) * self.batch]
        return idx[self.rank::self.world]


class Engine:
    """Trains networks for a run directory: checkpoints, resume, EMA, autocast, logs, DDP."""

    def __init__(self, run_dir, device="auto", seed: int = 0, resume: bool = False, config: Optional[dict] = None,
                 begin: Optional[Callable[[], None]] = None):
        """`begin` is called once (main process), before the engine writes anything in `run_dir`: the workflow
        writes the run's config there, so a run that fails validation in a detector's `fit` leaves no files."""
        self.run_dir = Path(run_dir)
        self._begin = begin
        self.seed = int(seed)
        self.resume = resume
        self.config = config or {}
        self.rank, self.world_size, self.device = distributed.init_from_env(resolve_device(device))
        self.is_main = self.rank == 0
        if (self.run_dir / "log.jsonl").is_symlink():   # never write through a link out of the run folder
            raise OODBenchError(f"{self.run_dir / 'log.jsonl'} is a symbolic link; oodbench writes only files inside "
                                "the run folder: replace it by a plain file (or remove it) and run again")
        seed_everything(self.seed + self.rank)  # networks built before `fit` get seeded initial weights

    # ----------------------------------------------------------------------------------------------------------
    def begin(self) -> None:
        """Run the `begin` callback once (main process)."""
        if self.is_main and self._begin is not None:
            begin, self._begin = self._begin, None
            begin()

    def log(self, record: dict) -> None:
        """Append one JSON line to the run's log.jsonl (main process only)."""
        if not self.is_main:
            return
        self.begin()
        self.run_dir.mkdir(parents=True, exist_ok=True)
        line = (json.dumps({"time": round(time.time(), 3), **record}) + "\n").encode()
        fd = os.open(self.run_dir / "log.jsonl", os.O_WRONLY | os.O_APPEND | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0), 0o666)
        try:                         # one write(2) of the whole line in append mode: lines never interleave or
            os.write(fd, line)       # tear across processes (a crash mid-line is the only torn line possible)
        finally:
            os.close(fd)

    def autocast(self, amp: str = "auto"):
        """The autocast context of a `train.amp` setting on this engine's device (`precision.autocast`)."""
        return precision.autocast(self.device, amp)

    # ----------------------------------------------------------------------------------------------------------
    def fit(self, name: str, model: nn.Module, loss_fn: Callable, data, spec: TrainSpec,
            val_fn: Optional[Callable[[nn.Module], float]] = None) -> nn.Module:
        """Train `model` for `spec.steps` steps and return it (EMA or best-validation weights) in eval mode.

        `data` is an ImageSet (batches of a seeded per-epoch permutation) or a callable `step -> batch`.
        A network whose `checkpoints/<name>/final.pt` exists is loaded instead of retrained.
        """
        folder = self.run_dir / "checkpoints" / name
        self.begin()
        model.to(self.device)
        final = folder / "final.pt"
        if final.exists():
            model.load_state_dict(ckpt.load(final, self.device)["model"])
            return model.eval()

        # per-group settings (e.g. ISH's last-layer decay; a group's "lr_scale" multiplies its learning rate)
        groups = getattr(model, "optimizer_groups", None)
        opt = spec.optimizer_for(groups(spec.weight_decay) if groups else model.parameters())
        ema = (AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(spec.ema), use_buffers=True)
               if spec.ema > 0 else None)
        best = {"value": float("inf"), "step": -1}
        start = self._restore(folder, model, opt, ema, best)

        train_model = model
        if self.world_size > 1:
            train_model = nn.parallel.DistributedDataParallel(
                model, device_ids=[self.device] if self.device.type == "cuda" else None)
        next_batch = self._batches(data, spec)
        scaler = torch.amp.GradScaler(self.device.type, enabled=spec.amp == "fp16" and self.device.type == "cuda")

        model.train()
        bar = progress.bar(total=spec.steps, initial=start, desc=f"train {name}", unit="step", enabled=self.is_main)
        for step in range(start, spec.steps):
            for group in opt.param_groups:
                group["lr"] = spec.lr * spec.lr_factor(step) * group.get("lr_scale", 1.0)   # NPOS's MLP: 0.1
            batch = next_batch(step)
            with self.autocast(spec.amp):
                out = loss_fn(train_model, batch)
            loss, extra = out if isinstance(out, tuple) else (out, {})
            opt.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            if spec.grad_clip > 0:
                scaler.unscale_(opt)
                nn.utils.clip_grad_norm_(model.parameters(), spec.grad_clip)
            scaler.step(opt)
            scaler.update()
            if ema is not None:
                ema.update_parameters(model)
            done = step + 1
            if done % spec.log_every == 0 or done == spec.steps:
                value = float(distributed.mean_across_ranks(loss.detach(), self.world_size))
                if not np.isfinite(value):
                    raise OODBenchError(f"training {name}: the loss became {value} at step {done}; lower train.lr "
                                        f"or set train.grad_clip, then --resume from the last good checkpoint")
                self.log({"model": name, "step": done, "loss": value, "lr": opt.param_groups[0]["lr"],
                          **{k: float(v) for k, v in extra.items()}})
                bar.set_postfix(loss=f"{value:.4g}")
            if val_fn is not None and (done % spec.eval_every == 0 or done == spec.steps):
                self._validate(name, val_fn, ema.module if ema is not None else model, done, best, folder)
                model.train()
            if done % spec.ckpt_every == 0 or done == spec.steps:
                self._save(folder, done, model, opt, ema, best, spec.max_to_keep)
            bar.update(1)
        bar.close()

        result = ema.module if ema is not None else model
        if val_fn is not None and (folder / "best.pt").exists():
            result.load_state_dict(ckpt.load(folder / "best.pt", self.device)["model"])
        if self.is_main:
            ckpt.save_atomic({"model": result.state_dict(), "step": spec.steps, "best": best,
                              "config": self.config}, final)
        distributed.barrier(self.world_size)
        return result.eval()

    # ----------------------------------------------------------------------------------------------------------
    def _batches(self, data, spec: TrainSpec) -> Callable[[int], tuple]:
        if callable(data) and not isinstance(data, ImageSet):
            return data
        data = data.to(self.device)
        sampler = EpochSampler(len(data), spec.batch_size, self.seed, self.rank, self.world_size)

        def batch(step: int):
            idx = sampler.indices(step).to(self.device)
            return data.images.index_select(0, idx), None if data.labels is None else data.labels.index_select(0, idx)

        return batch

    def _validate(self, name, val_fn, model, step, best, folder) -> None:
        model.eval()
        with torch.no_grad():
            value = float(val_fn(model))
        self.log({"model": name, "step": step, "val_loss": value})
        if value < best["value"]:
            best.update(value=value, step=step)
            if self.is_main:
                ckpt.save_atomic({"model": model.state_dict(), "step": step, "best": dict(best)}, folder / "best.pt")

    def _save(self, folder, step, model, opt, ema, best, max_to_keep) -> None:
        if not self.is_main:
            return
        state = {
            "model": model.state_dict(), "optimizer": opt.state_dict(),
            "ema": None if ema is None else ema.state_dict(), "step": step, "best": dict(best),
            "rng": {"torch": torch.get_rng_state(),
                    "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []},
            "config": self.config,
        }
        ckpt.save_atomic(state, folder / f"step_{step:08d}.pt")
        ckpt.prune(folder, max_to_keep)

    def _restore(self, folder, model, opt, ema, best) -> int:
        """Load the newest periodic checkpoint when resuming; returns the step to start from."""
        found = ckpt.step_checkpoints(folder)
        if not found:
            seed_everything(self.seed + self.rank)
            return 0
        if not self.resume:
            raise OODBenchError(f"{folder} already holds checkpoints of an unfinished training (step "
                                f"{found[-1][0]}); pass --resume to continue it, or choose another --run-name")
        step, state = self._newest_good(found)
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        if ema is not None and state.get("ema") is not None:
            ema.load_state_dict(state["ema"])
        best.update(state.get("best", {}))
        torch.set_rng_state(state["rng"]["torch"].cpu())
        if state["rng"]["cuda"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all([s.cpu() for s in state["rng"]["cuda"]])
        self.log({"model": folder.name, "resumed_from": step})
        return step

    def _newest_good(self, found: list) -> tuple[int, dict]:
        """(step, state) of the newest checkpoint that verifies; corrupt newer ones are skipped, and said so."""
        for step, path in reversed(found):
            try:
                return step, ckpt.load(path, self.device)
            except OODBenchError:
                print(f"oodbench: warning: checkpoint {path} is corrupt or truncated (its digest or format does not "
                      f"verify); resuming from the one before it", file=sys.stderr)
                self.log({"model": path.parent.name, "corrupt_checkpoint": str(path)})
        raise OODBenchError(f"every checkpoint in {found[-1][1].parent} is corrupt; delete that folder to train "
                            f"that network from the start")

