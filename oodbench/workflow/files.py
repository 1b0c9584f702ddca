"""Files of runs and caches: names, atomic writes, keyed npz caches, digests, metrics.json."""
from __future__ import annotations

import hashlib
import json
import re
import sys
import zipfile
from pathlib import Path
from typing import Optional

import numpy as np

from oodbench.config import read_meta  # noqa: F401  (re-exported: the workflow's run files)
from oodbench.engine import checkpoint
from oodbench.errors import OODBenchError, check_allocation
from oodbench.tables import rows_to_csv


def safe_name(spec: str) -> str:
    """A spec or name as a file/folder name, injective: a name that is already safe stays as it is; any other gets
    a short hash of the original (`vflip:fashion_mnist` → `vflip_fashion_mnist-1c2d3e`), so `x y` and `x_y` never
    share a file."""
    spec = str(spec)
    safe = re.sub(r"[^A-Za-z0-9_.-]+", "_", spec).strip("_.") or "data"
    return safe if safe == spec else f"{safe}-{hashlib.sha1(spec.encode()).hexdigest()[:6]}"


def write_atomic(path: Path, text: str) -> None:
    with checkpoint.atomic_file(path, "w") as f:
        f.write(text)


DIGEST = "__sha256__"     # the array of an npz file oodbench wrote that holds the sha256 of the others


def arrays_digest(arrays: dict) -> str:
    """sha256 over the names, dtypes, shapes and bytes of `arrays` (in name order)."""
    h = hashlib.sha256()
    for name in sorted(arrays):
        a = np.ascontiguousarray(arrays[name])
        h.update(f"{name}|{a.dtype.str}|{a.shape}|".encode())
        h.update(a.tobytes())
    return h.hexdigest()


def save_npz(path: Path, arrays: dict) -> None:
    """Arrays written atomically with their digest (verified by `load_npz`)."""
    with checkpoint.atomic_file(path) as f:
        np.savez(f, **arrays, **{DIGEST: np.array(arrays_digest(arrays))})


def load_npz(path: Path) -> dict:
    """The arrays of an npz file `save_npz` wrote, verified: its array headers must fit in memory (checked before
    anything is read) and its digest must match. Raises ValueError when the file is damaged or has no digest."""
    with zipfile.ZipFile(path) as z:
        for info in z.infolist():
            with z.open(info) as f:
                version = np.lib.format.read_magic(f)
                read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
                shape, _, dtype = read(f)
                try:
                    check_allocation(float(np.prod(shape, dtype=np.float64)) * dtype.itemsize, f"array {shape}")
                except OODBenchError as e:
                    raise ValueError(f"{info.filename}: {e}") from None
    with np.load(path, allow_pickle=False) as f:
        arrays = {k: f[k] for k in f.files}
    digest = arrays.pop(DIGEST, None)
    if digest is None or str(digest) != arrays_digest(arrays):
        raise ValueError("its digest does not match its contents" if digest is not None else "it has no digest")
    return arrays


def read_npz(path: Path, key_name: str, key: str) -> Optional[dict]:
    """The arrays of a cache file whose `key_name` array equals `key`, without it; None when the file is missing or
    stale, and None with one warning line when it is unreadable (truncated, garbled, keyless, changed after it was
    written, declaring arrays larger than memory): then it is recomputed."""
    if not path.is_file():
        return None
    try:
        arrays = load_npz(path)
        if str(arrays.get(key_name)) != key:
            return None
        return {k: v for k, v in arrays.items() if k != key_name}
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile, MemoryError) as e:
        reason = (str(e).splitlines() or [type(e).__name__])[0][:100]
        print(f"oodbench: warning: cache file {path} is unreadable ({reason}); recomputing it", file=sys.stderr)
        return None


def read_metrics(path: Path) -> list:
    """The rows saved in metrics.json ([] when absent); an unreadable file is replaced, with one warning line."""
    if not path.is_file():
        return []
    try:
        rows = json.loads(path.read_text())
        if isinstance(rows, list) and all(isinstance(r, dict) and {"method", "in", "out"} <= set(r) for r in rows):
            return rows
    except (ValueError, UnicodeDecodeError):
        pass
    print(f"oodbench: warning: {path} is unreadable; rewriting it with this evaluation's rows only", file=sys.stderr)
    return []


def merge_metrics(folder: Path, rows: list) -> None:
    """Merge rows into metrics.json / metrics.csv (a row replaces the one with the same method, in and out)."""
    path = folder / "metrics.json"
    keyed = {(r["method"], r["in"], r["out"]): r for r in read_metrics(path)}
    keyed.update({(r["method"], r["in"], r["out"]): r for r in rows})
    merged = list(keyed.values())
    write_atomic(path, json.dumps(merged, indent=2) + "\n")
    write_atomic(folder / "metrics.csv", rows_to_csv(merged))


def file_digest(path: Path) -> str:
    h = hashlib.sha1()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def check_limit(limit, what: str = "--limit") -> None:
    """`limit` (images per set) is None or a positive integer."""
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise OODBenchError(f"{what} must be a positive number of images, got {limit!r}")
