"""Autocast settings shared by training (`train.amp`) and scoring options (e.g. `ddpm.amp`)."""
from __future__ import annotations

import contextlib

import torch

AMP_MODES = ("auto", "off", "bf16", "fp16")


def autocast(device: torch.device, amp: str = "auto"):
    """The autocast context of an `amp` setting on `device`.

    auto: bf16 on CUDA, fp32 elsewhere. off: fp32. bf16: bf16 on any device (CPUs with AMX gain from it).
    fp16: fp16 on CUDA (the Engine adds a GradScaler), fp32 elsewhere, as `torch.cuda.amp.autocast` in the
    originals that train this way (ddpm-ood), which does nothing off CUDA.
    """
    on_cuda = device.type == "cuda"
    if amp == "off" or (amp in ("auto", "fp16") and not on_cuda):
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.float16 if amp == "fp16" else torch.bfloat16)
