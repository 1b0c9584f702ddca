"""Checkpoint files: written atomically, read with `weights_only=True` (never unpickled as code)."""
from __future__ import annotations

import contextlib
import os
import re
import tempfile
from pathlib import Path

import torch

from oodbench.errors import OODBenchError

_STEP_FILE = re.compile(r"step_(\d+)\.pt$")


@contextlib.contextmanager
def atomic_file(path: Path, mode: str = "wb"):
    """Open a temporary file beside `path`; on success it replaces `path` (fsynced), on failure it is removed.
    A crash half-way never leaves a half-written or missing file where the old one was."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def save_atomic(obj, path: Path) -> None:
    """torch.save through `atomic_file`."""
    with atomic_file(path) as f:
        torch.save(obj, f)


def load(path: Path, map_location="cpu"):
    """Load a checkpoint safely; a corrupt, truncated or foreign file is a clear error."""
    path = Path(path)
    if not path.is_file():
        raise OODBenchError(f"checkpoint {path} does not exist; train first (oodbench train ...) or check --run")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # torch raises several types for bad files
        raise OODBenchError(
            f"checkpoint {path} is corrupt, truncated or not an oodbench checkpoint ({type(e).__name__}: "
            f"{str(e).splitlines()[0][:120]}); delete it to resume from an earlier checkpoint, or retrain") from e


def step_checkpoints(folder: Path) -> list[tuple[int, Path]]:
    """(step, path) of the periodic checkpoints in `folder`, oldest first."""
    found = []
    for p in Path(folder).glob("step_*.pt"):
        m = _STEP_FILE.search(p.name)
        if m:
            found.append((int(m.group(1)), p))
    return sorted(found)


def prune(folder: Path, max_to_keep: int) -> None:
    """Delete all but the newest `max_to_keep` periodic checkpoints."""
    for _, p in step_checkpoints(folder)[:-max_to_keep] if max_to_keep > 0 else []:
        p.unlink(missing_ok=True)
