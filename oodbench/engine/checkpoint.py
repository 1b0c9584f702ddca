"""Checkpoint files: written atomically with a sha256 digest, verified and read with `weights_only=True` (never
unpickled as code).

A checkpoint file is `MAGIC`, the hex sha256 of the payload, a newline, then the payload (a `torch.save` zip).
Files written before digests existed (a bare zip) still load, unverified.
"""
from __future__ import annotations

import contextlib
import hashlib
import io
import os
import re
import socket
import tempfile
import time
from pathlib import Path

import torch

from oodbench.errors import OODBenchError
from oodbench.locks import alive

_STEP_FILE = re.compile(r"step_(\d+)\.pt$")
MAGIC = b"oodbench-checkpoint sha256 "
_DIGEST_LEN = 64
_HOST = re.sub(r"[^A-Za-z0-9]", "_", socket.gethostname()) or "host"
_TEMP = re.compile(r"^\..+?\.(?:(?P<host>[A-Za-z0-9_]+)-(?P<pid>\d+)\.)?[A-Za-z0-9_]+\.tmp$")
STALE_AGE_S = 24 * 3600   # a temporary of another host (or of an old oodbench) older than this is stale
GRACE_S = 60              # a dead writer's temporary is left alone this long (a pid of another pid namespace)


@contextlib.contextmanager
def atomic_file(path: Path, mode: str = "wb"):
    """Open a temporary file beside `path`; on success it replaces `path` (fsynced, mode from the umask), on failure
    it is removed. A crash half-way never leaves a half-written or missing file where the old one was; the
    temporaries a killed process left in that folder are removed by the next write there."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    clean_stale_temporaries(path.parent)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.{_HOST}-{os.getpid()}.", suffix=".tmp")
    try:
        with os.fdopen(fd, mode) as f:
            yield f
            f.flush()
            os.chmod(f.fileno(), 0o666 & ~_umask())
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def clean_stale_temporaries(folder: Path) -> list:
    """Remove the temporaries of `atomic_file` in `folder` whose writer is gone: a dead process of this host (and
    untouched for GRACE_S), or older than STALE_AGE_S. Returns the removed paths."""
    removed = []
    for p in Path(folder).glob(".*.tmp"):
        m = _TEMP.match(p.name)
        if not m:
            continue
        try:
            own_host = m["host"] == _HOST and m["pid"] is not None
            age = time.time() - p.stat().st_mtime
            if (own_host and age > GRACE_S and not alive(int(m["pid"]))) or age > STALE_AGE_S:
                p.unlink()
                removed.append(p)
        except FileNotFoundError:   # another process cleaned it first
            continue
    return removed


def save_atomic(obj, path: Path) -> None:
    """torch.save `obj` through `atomic_file`, with the sha256 of the payload in the header."""
    buf = io.BytesIO()
    torch.save(obj, buf)
    payload = buf.getvalue()
    with atomic_file(path) as f:
        f.write(MAGIC + hashlib.sha256(payload).hexdigest().encode() + b"\n")
        f.write(payload)


def load(path: Path, map_location="cpu"):
    """Load a checkpoint safely; a corrupt, truncated or foreign file (digest mismatch) is a clear error."""
    path = Path(path)
    if not path.is_file():
        raise OODBenchError(f"checkpoint {path} does not exist; train first (oodbench train ...) or check --run")
    raw = path.read_bytes()
    try:
        payload = _payload(raw)
        return torch.load(io.BytesIO(payload), map_location=map_location, weights_only=True)
    except Exception as e:  # torch raises several types for bad files
        raise OODBenchError(
            f"checkpoint {path} is corrupt, truncated or not an oodbench checkpoint ({load_failure(e)}); delete it "
            f"to resume from an earlier checkpoint, or retrain") from e


def load_failure(e: BaseException) -> str:
    """Why torch.load(weights_only=True) failed, in oodbench's words (torch's own message advises retrying with
    weights_only=False, which would run the file's code: never quoted)."""
    if "weights_only" in str(e) or "Weights only" in str(e):
        return "it holds Python objects other than tensors, which oodbench never unpickles"
    text = (str(e).strip().splitlines() or [""])[0][:160]
    return f"{type(e).__name__}" + (f": {text}" if text else "")


def _payload(raw: bytes) -> bytes:
    if raw.startswith(MAGIC):
        head = len(MAGIC) + _DIGEST_LEN
        digest, payload = raw[len(MAGIC):head].decode("ascii", "replace"), raw[head + 1:]
        if raw[head:head + 1] != b"\n" or hashlib.sha256(payload).hexdigest() != digest:
            raise ValueError("sha256 digest mismatch")
        return payload
    if not raw.startswith(b"PK"):    # a bare torch.save zip (written before digests) starts with the zip magic
        raise ValueError("no oodbench checkpoint header" if raw else "empty file")
    return raw


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
