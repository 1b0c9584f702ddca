"""PyTorch's own distributed runtime: started by `torchrun`, read from its environment variables."""
from __future__ import annotations

import os

import torch
import torch.distributed as dist


def init_from_env(device: torch.device) -> tuple[int, int, torch.device]:
    """Join the process group when launched by torchrun (WORLD_SIZE > 1). Returns (rank, world_size, device)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1, device
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    return dist.get_rank(), dist.get_world_size(), device


def shard(n: int, rank: int, world: int) -> slice:
    """The contiguous part of range(n) that `rank` handles."""
    per = -(-n // world)
    return slice(min(n, rank * per), min(n, (rank + 1) * per))


def gather_concat(arrays: dict, world: int) -> dict:
    """Concatenate each rank's dict of numpy arrays in rank order (all ranks receive the result)."""
    if world <= 1:
        return arrays
    import numpy as np

    parts = [None] * world
    dist.all_gather_object(parts, arrays)
    return {k: np.concatenate([p[k] for p in parts]) for k in arrays}


def barrier(world: int) -> None:
    if world > 1:
        dist.barrier()


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def is_main() -> bool:
    return rank() == 0


def mean_across_ranks(value: torch.Tensor, world: int) -> torch.Tensor:
    """The mean of a scalar over ranks (the full-batch loss under DDP)."""
    if world <= 1:
        return value
    value = value.float().clone()
    dist.all_reduce(value)
    return value / world


def shutdown() -> None:
    """Leave the process group cleanly (all ranks together), so no rank exits while another still talks to it."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
