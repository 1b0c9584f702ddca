"""Named published checkpoints: `openood:NAME` resolves OpenOOD v1.5's ResNet-18s (three training runs each).

`openood:cifar10_res18_s1` names one run; `openood:cifar10_res18` the run of the seed it is loaded with (s0, s1,
s2 for seeds 0, 1, 2), so a bench over seeds [0, 1, 2] averages the three published checkpoints.

Each entry names the `oodbench data fetch` archive that holds it (data/catalog.py), the file inside it, the
architecture and the preprocessing. OpenOOD publishes no digest of its checkpoints, so the digest checked at load is
the SHA-256 that the archive's manifest recorded when it was fetched (trust on first use): a checkpoint changed or
truncated since is refused before `torch.load` (which reads it with weights_only=True in any case).

Where the facts come from: the archive ids and its unpacking into results/ are OpenOOD's
scripts/download/download.py; the run folders <benchmark>_resnet18_<size>_base_e<epochs>_lr0.1_default with s0, s1,
s2 sub-folders holding best.ckpt are what its scripts/ood/*.sh and scripts/eval_ood.py read.
"""
from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

from oodbench.data import catalog, fetch, sources
from oodbench.errors import OODBenchError


class ModelEntry(NamedTuple):
    archive: str        # the catalogue entry (oodbench data fetch ARCHIVE)
    file: str           # the checkpoint, relative to the archive's install folder
    arch: str           # openood:ARCH:PATH architecture
    dataset: str        # oodbench's name of its in-distribution set
    preprocessing: str


_PREP = {"resnet18_32x32": "32x32, OpenOOD's CIFAR mean/std",
         "resnet18_224x224": "resize 256, centre crop 224, ImageNet mean/std"}
_BENCH = {"cifar10": ("cifar10_res18_v1.5", "resnet18_32x32"), "cifar100": ("cifar100_res18_v1.5", "resnet18_32x32"),
          "imagenet200": ("imagenet200_res18_v1.5", "resnet18_224x224")}
REGISTRY = {f"{bench}_res18_s{seed}": ModelEntry(archive, f"s{seed}/best.ckpt", arch, bench, _PREP[arch])
            for bench, (archive, arch) in _BENCH.items() for seed in range(3)}


def seeded(name: str, seed: int) -> str:
    """`name`, or for a name without its run (`cifar10_res18`) the run of this seed (`cifar10_res18_s1`): a bench
    with seeds [0, 1, 2] and model openood:cifar10_res18 averages OpenOOD's three checkpoints, as its leaderboard
    does."""
    if name not in REGISTRY and f"{name}_s{seed}" in REGISTRY:
        return f"{name}_s{seed}"
    return name


def source_url(entry: ModelEntry) -> str:
    url = catalog.ENTRIES[entry.archive].url
    return fetch.gdrive_url(url.removeprefix("gdrive:")) if url.startswith("gdrive:") else url


def local_path(name: str, root=None) -> Path:
    entry = REGISTRY[name]
    return sources.data_root(root) / catalog.ENTRIES[entry.archive].folder / entry.file


def status(name: str, root=None) -> str:
    """"verified", "missing" or "corrupt (...)" (a digest check; no download)."""
    try:
        resolve(name, root)
        return "verified"
    except OODBenchError as e:
        return "missing" if "not installed" in str(e) else "corrupt"


def resolve(name: str, root=None) -> tuple[str, Path]:
    """(architecture, checkpoint path) of registry entry `name`, its SHA-256 checked against the manifest."""
    if name not in REGISTRY:
        raise OODBenchError(f"openood:{name}: no such published checkpoint; `oodbench models list` names them "
                            f"(or give a file: openood:resnet18_32x32:PATH)")
    entry = REGISTRY[name]
    root = sources.data_root(root)
    path = local_path(name, root)
    man = fetch.load_manifest(root, entry.archive)
    if man is None or not path.is_file():
        raise OODBenchError(f"openood:{name} is not installed ({path}); run `oodbench data fetch {entry.archive}` "
                            f"(data root {root}: --data-root or $OODBENCH_DATA)")
    recorded = man["files"].get(entry.file)
    if recorded is None:
        raise OODBenchError(f"openood:{name}: the archive {entry.archive} held no {entry.file}; `oodbench data "
                            f"fetch {entry.archive}` lists what it holds in its manifest {fetch.manifest_path(root, entry.archive)}")
    if path.stat().st_size != recorded[0] or fetch.sha256_file(path) != recorded[1]:
        raise OODBenchError(f"openood:{name}: {path} does not match the SHA-256 recorded when it was fetched "
                            f"(corrupt or changed); `oodbench data fetch {entry.archive}` fetches it again")
    return entry.arch, path


def rows(root=None) -> list:
    """One dict per entry: name, architecture, dataset, preprocessing, source, local status."""
    return [{"name": f"openood:{n}", "arch": e.arch, "dataset": e.dataset, "preprocessing": e.preprocessing,
             "source": source_url(e), "fetch": e.archive, "status": status(n, root), "path": str(local_path(n, root))}
            for n, e in REGISTRY.items()]
