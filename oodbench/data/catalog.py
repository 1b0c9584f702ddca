"""What `oodbench data fetch` can install, from where, and into which folder of the data root.

Sources, and where each fact comes from:
- torchvision's own sets (mnist, fashion_mnist, cifar10, cifar100, svhn): torchvision's download, which checks the
  MD5 sums torchvision publishes in its source.
- textures (DTD) and places365: the primary hosts with the URL and MD5 that torchvision's `datasets.DTD` and
  `datasets.Places365` record (places365 is the full 328,500-image test_256 set, 2.3 GB packed).
- lsun, lsun_resize, isun, tinyimagenet: the ODIN release archives on Dropbox named in data/folders.py.
- OpenOOD v1.5's image lists, its ImageNet OOD sets and its ResNet-18 checkpoints: the Google Drive ids of its
  scripts/download/download.py (fetch.OPENOOD_GDRIVE), unpacked where that script unpacks them.
No host here publishes SHA-256 digests of the extracted files, so every set's manifest is written after its first
complete download ("trust on first use"); `verify` says so.

A set is installed as: archive downloaded to `<root>/.oodbench_downloads/` (resumable), extracted to a temporary
folder beside its final place (path checks first), renamed into place, manifest written, archive deleted. So a set's
folder exists only complete; a set whose manifest no longer matches is deleted and fetched again by `fetch`.
"""
from __future__ import annotations

import shutil
from pathlib import Path
from typing import Callable, NamedTuple, Optional

from oodbench.data import fetch, folders, imglists, sources
from oodbench.errors import OODBenchError

DOWNLOADS = ".oodbench_downloads"


class Entry(NamedTuple):
    kind: str                   # "torchvision" or "archive"
    folder: str                 # install folder, relative to the data root
    url: str = ""               # archive address (Google Drive: gdrive:ID)
    filename: str = ""          # archive file name
    member: str = ""            # folder of the archive that becomes `folder` ("": the whole archive)
    md5: Optional[str] = None   # published digest of the archive, where there is one
    needs: tuple = ()           # other entries the set needs (OpenOOD's image lists)
    source: str = ""            # who records the address (for the manifest and `data list`)


def _openood(name: str, group: str, member: str = "") -> Entry:
    file_id = fetch.OPENOOD_GDRIVE[name][0]
    return Entry("archive", f"{group}/{name}" if not member else f"{group}/{member}", f"gdrive:{file_id}",
                 f"{name}.zip", member, None, ("benchmark_imglist",) if group.startswith("images") else (),
                 f"OpenOOD scripts/download/download.py @ {fetch.OPENOOD_COMMIT[:10]}")


def _odin(name: str, url: str, folder: str) -> Entry:
    return Entry("archive", folder, url.replace("?dl=0", "") + "?dl=1", Path(url).name.split("?")[0], folder,
                 source="ODIN release (data/folders.py)")


CHECKPOINT_FOLDERS = {"cifar10_res18_v1.5": "cifar10_resnet18_32x32_base_e100_lr0.1_default",
                      "cifar100_res18_v1.5": "cifar100_resnet18_32x32_base_e100_lr0.1_default",
                      "imagenet200_res18_v1.5": "imagenet200_resnet18_224x224_base_e90_lr0.1_default"}

ENTRIES = {
    **{name: Entry("torchvision", sources.TORCHVISION[name].folder, source="torchvision (its own MD5 checks)")
       for name in sources.TORCHVISION},
    "textures": Entry("archive", "dtd", "https://www.robots.ox.ac.uk/~vgg/data/dtd/download/dtd-r1.0.1.tar.gz",
                      "dtd-r1.0.1.tar.gz", "dtd", "fff73e5086ae6bdbea199a49dfb8a4c1",
                      source="torchvision.datasets.DTD"),
    "places365": Entry("archive", "places365", "http://data.csail.mit.edu/places/places365/test_256.tar",
                       "test_256.tar", "test_256", "f532f6ad7b582262a2ec8009075e186b",
                       source="torchvision.datasets.Places365"),
    "lsun": _odin("lsun", "https://www.dropbox.com/s/fhtsw1m3qxlwj6h/LSUN.tar.gz", "LSUN"),
    "lsun_resize": _odin("lsun_resize", "https://www.dropbox.com/s/moqh2wh8696c3yl/LSUN_resize.tar.gz",
                         "LSUN_resize"),
    "isun": _odin("isun", "https://www.dropbox.com/s/ssz7qxfqae0cca5/iSUN.tar.gz", "iSUN"),
    "tinyimagenet": _odin("tinyimagenet", "https://www.dropbox.com/s/kp3my3412u5k9rl/Imagenet_resize.tar.gz",
                          "Imagenet_resize"),
    # OpenOOD's script unpacks benchmark_imglist.zip into the data folder and then finds benchmark_imglist/ there
    "benchmark_imglist": _openood("benchmark_imglist", "", "benchmark_imglist")._replace(folder="benchmark_imglist"),
    **{name: _openood(name, "images_largescale") for name in ("ssb_hard", "ninco", "inaturalist", "openimage_o",
                                                              "imagenet_v2", "imagenet_c", "imagenet_r")},
    "imagenet_textures": _openood("texture", "images_classic"),
    "cifar10c": _openood("cifar10c", "images_classic"),
    # checkpoints: unpacked into results/ by OpenOOD's script; its scripts/ood/*.sh read
    # results/<folder>/s{0,1,2}/best.ckpt
    **{name: _openood(name, "checkpoints", folder) for name, folder in CHECKPOINT_FOLDERS.items()},
}


# sets read through another list of the same images (data/imglists.py): fetched as that archive
ALIASES = {"imagenet200_v2": "imagenet_v2", "imagenet200_c": "imagenet_c", "imagenet200_r": "imagenet_r"}


def entry(name: str) -> Entry:
    if name not in ENTRIES:
        raise OODBenchError(f"oodbench data fetch: no source known for {name!r}; fetchable: "
                            f"{', '.join(sorted(ENTRIES))}, or a shipped protocol (cifar10, imagenet200, ...)")
    return ENTRIES[name]


def how_to_get(name: str, root: Path) -> str:
    """The manual fix for a set that cannot be fetched."""
    if name in folders.FOLDER_SETS:
        return folders.FOLDER_SETS[name].how
    if name in imglists.IMGLIST_SETS:
        return imglists.IMGLIST_SETS[name].how
    if name in sources.TORCHVISION:
        return sources.how_to_get(name, root)
    return "see docs/data.md"


def expand(names, root: Path) -> tuple[list, list]:
    """(fetchable entry names in install order, [(name, how to get it by hand)]) for sets and protocol names."""
    from oodbench import protocols
    from oodbench.config import read_yaml

    wanted, manual = [], []
    for name in names:
        if name in protocols.names():
            cfg = read_yaml(protocols.bench_path(name))
            out = cfg.get("out") or {}
            sets = list(cfg.get("in") or []) + [s for group in (out.values() if isinstance(out, dict) else [out])
                                                for s in group] + list(cfg.get("csid") or [])
            models = {m.get("model") for m in cfg.get("methods") or [] if isinstance(m, dict)}
            sets += [n for n, folder in CHECKPOINT_FOLDERS.items()   # a path into it, or openood:NAME (registry)
                     if any(folder in str(m) or str(m).startswith(f"openood:{n.removesuffix('_v1.5')}")
                            for m in models)]
        else:
            sets = [name]
        for s in sets:
            s = ALIASES.get(s, s)
            if s in ENTRIES:
                wanted += [*ENTRIES[s].needs, s]
            elif name in protocols.names():
                manual.append((s, how_to_get(s, root)))
            else:
                entry(s)
    return list(dict.fromkeys(wanted)), list(dict.fromkeys(manual))


def installed(name: str, root: Path) -> bool:
    return fetch.load_manifest(root, name) is not None and (root / ENTRIES[name].folder).is_dir()


def fetch_set(name: str, root: Path, say: Callable[[str], None] = print, **download_options) -> Path:
    """Install entry `name` under the data root (module docstring); returns its folder. An installed set whose files
    verify is left as it is; one that does not verify is deleted and fetched again."""
    e = entry(name)
    folder = root / e.folder
    if fetch.load_manifest(root, name) is not None and folder.is_dir():
        problems = fetch.verify(root, name)
        if not problems:
            say(f"{name}: already installed and verified ({folder})")
            return folder
        say(f"{name}: {len(problems)} file(s) do not match the manifest (first: {problems[0]}); fetching it again")
        shutil.rmtree(folder)
    elif folder.exists() and e.kind == "archive":
        raise OODBenchError(f"{folder} exists but was not installed by `oodbench data fetch` (no manifest); move it "
                            f"away to fetch {name}, or keep using it as it is")
    if e.kind == "torchvision":
        for split in ("train", "test"):
            sources.load_torchvision(name, split, root, download=True)
    else:
        url = fetch.gdrive_url(e.url[len("gdrive:"):]) if e.url.startswith("gdrive:") else e.url
        archive = fetch.download(url, root / DOWNLOADS / e.filename, md5=e.md5, drive=e.url.startswith("gdrive:"),
                                 desc=name, **download_options)
        try:
            fetch.extract(archive, folder, e.member)
        except OODBenchError:
            archive.unlink()     # a bad archive is not kept: the next run downloads it again
            raise
        archive.unlink()
    checked = " (archive checked against its published MD5)" if e.md5 or e.kind == "torchvision" else ""
    fetch.write_manifest(root, name, folder, source=f"{e.source}{checked}", trust="first-use")
    man = fetch.load_manifest(root, name)
    say(f"{name}: installed at {folder} ({len(man['files'])} files, {man['images']} images); manifest "
        f"{fetch.manifest_path(root, name)}: {fetch.trust_note(man)}")
    return folder
