"""The shipped bench protocols, `oodbench/configs/bench/<name>.yaml` (package data): named, or given by path.

Light on purpose (no torch), so the CLI can list the names in `bench --help`.
"""
from __future__ import annotations

from pathlib import Path

from oodbench.config import CONFIG_DIR
from oodbench.errors import OODBenchError

PROTOCOLS = CONFIG_DIR / "bench"


def names() -> list:
    return sorted(p.stem for p in PROTOCOLS.glob("*.yaml"))


def bench_path(config) -> Path:
    """`config` as a file: the path of a bench YAML, or the name of a shipped protocol (`quick`, `cifar10`, ...)."""
    path = Path(config)
    if path.is_file():
        return path
    shipped = PROTOCOLS / f"{config}.yaml"
    if "/" not in str(config) and shipped.is_file():
        return shipped
    raise OODBenchError(f"bench config {config} not found: no such file, and not a shipped protocol "
                        f"({', '.join(names())}); e.g. oodbench bench quick")
