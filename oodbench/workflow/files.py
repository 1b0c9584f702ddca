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
from oodbench.errors import OODBenchError
from oodbench.tables import rows_to_csv


def safe_name(spec: str) -> str:
    """A dataset spec as a file/folder name: `vflip:fashion_mnist` → `vflip_fashion_mnist`."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", str(spec)).strip("_") or "data"


def write_atomic(path: Path, text: str) -> None:
    with checkpoint.atomic_file(path, "w") as f:
        f.write(text)


def save_npz(path: Path, arrays: dict) -> None:
    with checkpoint.atomic_file(path) as f:
        np.savez(f, **arrays)


def read_npz(path: Path, key_name: str, key: str) -> Optional[dict]:
    """The arrays of a cache file whose `key_name` array equals `key`, without it; None when the file is missing or
    stale, and None with one warning line when it is unreadable (truncated, garbled, keyless): then it is recomputed."""
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as f:
            if str(f[key_name]) != key:
                return None
            return {k: f[k] for k in f.files if k != key_name}
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as e:
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
