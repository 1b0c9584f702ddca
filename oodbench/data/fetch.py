"""Downloading and installing data sets: resumable, atomic, verified; archives extracted with path checks.

Why urllib (the standard library) and not requests/gdown: the project needs only GET with a Range header, a
timeout and a cookie-free Google Drive confirmation step, all of which `urllib.request` does; one more dependency
(and gdown's own Drive scraping, which breaks when Drive changes its page) buys nothing here.

How a download goes (`download`):
- bytes go to `<dest>.part`; `dest` appears only by `os.replace` once every byte arrived (and the SHA-256 matched,
  when one is known), so `dest` is either complete or absent;
- an interrupted download (connection reset, timeout, short read) resumes from the `.part` file's size with an
  HTTP `Range: bytes=N-` request; a server that answers 200 instead of 206 is read again from the start;
- transient failures (timeouts, resets, HTTP 5xx/429) are retried `retries` times with exponential back-off;
  HTTP 4xx is not retried. The final failure is one OODBenchError line naming the URL and the manual fix; a `.part`
  left by a timeout is named there (the next run resumes from it), a 4xx/5xx answer leaves no file at all;
- Google Drive (`gdrive_url`): for files too large for its virus scan Drive answers an HTML page instead of the
  bytes. Its download form (`<form id="download-form" action=...>` with hidden inputs id/export/confirm/uuid) is
  parsed and submitted as a GET; older pages carry a `confirm=TOKEN` link instead, which is followed. A page with
  neither (quota exceeded, file not shared) is an error saying so, with the manual fix.

Extraction (`extract`) refuses, before writing anything, members with absolute paths, `..` components, drive
letters, links (symbolic or hard) whose target leaves the target folder, and device/FIFO members; it extracts into
a temporary folder beside the target and renames it into place, so a set is never half-installed.

Manifests (`write_manifest`, `verify`): per set, the size and SHA-256 of every file and the image count. Where a
host publishes digests they are shipped; otherwise the manifest is written after the first download that was
complete ("trust on first use"), and `verify` says which of the two it checked against.
"""
from __future__ import annotations

import hashlib
import html.parser
import http.client
import json
import os
import re
import shutil
import socket
import stat
import tarfile
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
import zipfile
from pathlib import Path, PurePosixPath
from typing import Callable, Optional

from oodbench import progress
from oodbench.errors import OODBenchError

GDRIVE_BASE = "https://drive.google.com/uc"
CHUNK = 1 << 20
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm"}
MANIFEST_DIR = ".oodbench_manifests"
sleep: Callable[[float], None] = time.sleep     # tests replace it (no real back-off waits)

# OpenOOD v1.5's Google Drive file ids, from the `download_id_dict` of scripts/download/download.py in
# Jingkang50/OpenOOD (commit 2a9d492558c05590ec8f5225b2ee181058be8a08), and the folder each archive is unpacked
# into (its `dir_dict`; checkpoints go to its results/ folder). Each archive is `<name>.zip`. Only the archives that
# data/catalog.py installs are listed (the CIFAR/MNIST/SVHN copies are not: torchvision fetches the originals).
OPENOOD_COMMIT = "2a9d492558c05590ec8f5225b2ee181058be8a08"
OPENOOD_GDRIVE = {
    "benchmark_imglist": ("1lI1j0_fDDvjIt9JlWAw09X8ks-yrR_H1", ""),
    "cifar10c": ("170DU_ficWWmbh6O2wqELxK9jxRiGhlJH", "images_classic"),
    "texture": ("1OSz1m3hHfVWbRdmMwKbUzoU8Hg9UKcam", "images_classic"),
    "ssb_hard": ("1PzkA-WGG8Z18h0ooL_pDdz9cO-DCIouE", "images_largescale"),
    "ninco": ("1Z82cmvIB0eghTehxOGP5VTdLt7OD3nk6", "images_largescale"),
    "inaturalist": ("1zfLfMvoUD0CUlKNnkk7LgxZZBnTBipdj", "images_largescale"),
    "openimage_o": ("1VUFXnB_z70uHfdgJG2E_pjYOcEgqM7tE", "images_largescale"),
    "imagenet_v2": ("1akg2IiE22HcbvTBpwXQoD7tgfPCdkoho", "images_largescale"),
    "imagenet_c": ("1JeXL9YH4BO8gCJ631c5BHbaSsl-lekHt", "images_largescale"),
    "imagenet_r": ("1EzjMN2gq-bVV7lg-MEAdeuBuz-7jbGYU", "images_largescale"),
    "cifar10_res18_v1.5": ("1byGeYxM_PlLjT72wZsMQvP6popJeWBgt", "checkpoints"),
    "cifar100_res18_v1.5": ("1s-1oNrRtmA0pGefxXJOUVRYpaoAML0C-", "checkpoints"),
    "imagenet200_res18_v1.5": ("1ddVmwc8zmzSjdLUO84EuV4Gz1c7vhIAs", "checkpoints"),
}


def gdrive_url(file_id: str, base: str = GDRIVE_BASE) -> str:
    """The direct-download address of a Google Drive file."""
    return f"{base}?export=download&id={urllib.parse.quote(file_id)}"


def _fix(url: str, dest: Path) -> str:
    return (f"download it by hand (a browser, or `curl -L -C - -o {dest}.part '{url}'` then rename it to {dest.name})"
            f" and run the command again")


class _DriveForm(html.parser.HTMLParser):
    """The action and hidden inputs of Google Drive's `download-form` (the large-file warning page)."""

    def __init__(self):
        super().__init__()
        self.action, self.fields, self._in_form = None, {}, False

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "form" and (a.get("id") == "download-form" or self.action is None and "download" in
                              (a.get("action") or "")):
            self.action, self._in_form = a.get("action"), True
        elif tag == "input" and self._in_form and a.get("name"):
            self.fields[a["name"]] = a.get("value") or ""

    def handle_endtag(self, tag):
        if tag == "form":
            self._in_form = False


def drive_confirm_url(page: str, page_url: str) -> Optional[str]:
    """The address that Google Drive's large-file warning page confirms to, or None when the page has none."""
    form = _DriveForm()
    form.feed(page)
    if form.action:
        action = urllib.parse.urljoin(page_url, form.action)
        return action + ("&" if "?" in action else "?") + urllib.parse.urlencode(form.fields)
    m = re.search(r'href="([^"]*confirm=[0-9A-Za-z_-]+[^"]*)"', page)
    if m:
        return urllib.parse.urljoin(page_url, html.unescape(m.group(1)))
    m = re.search(r"confirm=([0-9A-Za-z_-]+)", page)
    if m:
        sep = "&" if "?" in page_url else "?"
        return f"{page_url}{sep}confirm={m.group(1)}"
    return None


class _Transient(Exception):
    """A failure worth retrying (resuming from the .part file)."""


def _open(url: str, offset: int, timeout: float):
    req = urllib.request.Request(url, headers={"User-Agent": "oodbench"})
    if offset:
        req.add_header("Range", f"bytes={offset}-")
    return urllib.request.urlopen(req, timeout=timeout)


def sha256_file(path: Path, algorithm: str = "sha256") -> str:
    h = hashlib.new(algorithm)
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(CHUNK), b""):
            h.update(block)
    return h.hexdigest()


def download(url: str, dest, sha256: Optional[str] = None, size: Optional[int] = None, retries: int = 4,
             backoff: float = 1.0, timeout: float = 60.0, drive: bool = False, desc: str = "",
             md5: Optional[str] = None) -> Path:
    """Download `url` to `dest` (resumable, atomic, verified against `sha256`/`md5`/`size` when given); returns
    `dest`. md5: for hosts that publish only an MD5 (torchvision's records of DTD and Places365).

    drive=True: the address is Google Drive's, whose large-file warning page is confirmed (module docstring)."""
    dest = Path(dest)
    algorithm, expected = ("sha256", sha256) if sha256 is not None or md5 is None else ("md5", md5)
    if dest.exists():
        if expected is None or sha256_file(dest, algorithm) == expected:
            return dest
        dest.unlink()
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    target, last = url, ""
    for attempt in range(retries + 1):
        if attempt:
            sleep(backoff * 2 ** (attempt - 1))
        try:
            target = _fetch_once(target, part, timeout, drive, desc or dest.name, url, dest)
            break
        except _Transient as e:
            last = str(e)
    else:
        kept = (f"; the {part.stat().st_size} bytes received are kept in {part} and the next run resumes from them"
                if part.exists() and part.stat().st_size else "")
        if part.exists() and not part.stat().st_size:
            part.unlink()
        raise OODBenchError(f"could not download {url} after {retries + 1} tries ({last}){kept}; "
                            f"{_fix(url, dest)}")
    got = part.stat().st_size
    if size is not None and got != size:
        part.unlink()
        raise OODBenchError(f"download of {url} has {got} bytes, expected {size}; deleted it; {_fix(url, dest)}")
    if expected is not None:
        digest = sha256_file(part, algorithm)
        if digest != expected:
            part.unlink()
            what = "SHA-256" if algorithm == "sha256" else "MD5"
            raise OODBenchError(f"download of {url} has {what} {digest}, expected {expected} (corrupt or changed "
                                f"upstream); deleted it; {_fix(url, dest)}")
    os.replace(part, dest)
    return dest


def _fetch_once(url: str, part: Path, timeout: float, drive: bool, desc: str, orig: str, dest: Path) -> str:
    """One try: append to `part` from its current size; returns the address that served the bytes."""
    offset = part.stat().st_size if part.exists() else 0
    try:
        resp = _open(url, offset, timeout)
    except urllib.error.HTTPError as e:
        if e.code == 416 and offset:          # the range starts past the end: begin again
            part.unlink()
            raise _Transient(f"HTTP 416 for a resumed range; restarting")
        if e.code >= 500 or e.code == 429:
            raise _Transient(f"HTTP {e.code} {e.reason}")
        if part.exists():
            part.unlink()
        raise OODBenchError(f"could not download {orig}: HTTP {e.code} {e.reason} (the host refused it); "
                            f"{_fix(orig, dest)}") from None
    except (urllib.error.URLError, socket.timeout, ConnectionError, OSError, http.client.HTTPException) as e:
        reason = getattr(e, "reason", e)
        if isinstance(reason, (socket.gaierror, ConnectionRefusedError)):   # offline or host down: not retried
            host = urllib.parse.urlsplit(url).netloc
            raise OODBenchError(f"cannot reach {host} for {orig} ({reason.strerror or reason}: offline, or the host "
                                f"is down); {_fix(orig, dest)}") from None
        raise _Transient(str(reason) or type(e).__name__)
    with resp:
        ctype = resp.headers.get("Content-Type", "")
        if drive and ctype.startswith("text/html"):
            page = resp.read(2 << 20).decode("utf-8", "replace")
            confirm = drive_confirm_url(page, resp.geturl())
            if confirm is None or confirm == url:
                raise OODBenchError(f"Google Drive answered a page instead of the file for {orig} (download quota "
                                    f"exceeded, or the file is not shared); {_fix(orig, dest)}")
            return _fetch_once(confirm, part, timeout, False, desc, orig, dest)
        status = getattr(resp, "status", 200)
        if offset and status != 206:
            offset = 0                        # the server ignored the range: start over
        length = resp.headers.get("Content-Length")
        total = offset + int(length) if length and length.isdigit() else None
        mode = "ab" if offset else "wb"
        got = 0
        with open(part, mode) as f, progress.bar(total=total, desc=f"download {desc}", unit="B",
                                                 initial=offset) as pbar:
            while True:
                try:
                    block = resp.read(CHUNK if total is None else min(CHUNK, total - offset - got) or 1)
                except (socket.timeout, ConnectionError, OSError, http.client.HTTPException) as e:
                    raise _Transient(f"connection lost after {offset + got} bytes: {e or type(e).__name__}")
                if not block:
                    break
                f.write(block)    # a full disk is the CLI's one-line OSError, not a retry; the .part is kept
                got += len(block)
                pbar.update(len(block))
        if total is not None and offset + got < total:
            raise _Transient(f"connection closed after {offset + got} of {total} bytes")
    return url


# ---------------------------------------------------------------------------------------------------- extraction

def _member_ok(name: str) -> bool:
    if not name or name.startswith(("/", "\\")) or re.match(r"^[A-Za-z]:", name):
        return False
    return ".." not in PurePosixPath(name.replace("\\", "/")).parts


def _inside(root: Path, path: Path) -> bool:
    try:
        path.resolve().relative_to(root.resolve())
        return True
    except ValueError:
        return False


def check_archive(archive) -> None:
    """An OODBenchError naming the first unsafe member of a .zip/.tar(.gz/.bz2/.xz) archive, before extracting."""
    archive = Path(archive)
    probe = Path("/__oodbench_probe__")
    if zipfile.is_zipfile(archive):
        with zipfile.ZipFile(archive) as z:
            for info in z.infolist():
                mode = info.external_attr >> 16
                if not _member_ok(info.filename):
                    raise OODBenchError(f"{archive} holds an unsafe path {info.filename!r} (absolute or with '..');"
                                        f" refusing to extract it")
                if stat.S_ISLNK(mode):
                    raise OODBenchError(f"{archive} holds a symbolic link {info.filename!r}; refusing to extract it")
        return
    try:
        tf = tarfile.open(archive)
    except tarfile.TarError as e:
        raise OODBenchError(f"{archive} is neither a zip nor a tar archive ({e}); delete it and fetch again") from None
    with tf:
        for m in tf.getmembers():
            if not _member_ok(m.name):
                raise OODBenchError(f"{archive} holds an unsafe path {m.name!r} (absolute or with '..'); refusing "
                                    f"to extract it")
            if m.issym() or m.islnk():
                base = (probe / m.name).parent if m.issym() else probe
                link = m.linkname
                if link.startswith("/") or not _inside_pure(probe, base / link):
                    raise OODBenchError(f"{archive} holds a link {m.name!r} -> {link!r} out of the target folder; "
                                        f"refusing to extract it")
            elif not (m.isfile() or m.isdir()):
                raise OODBenchError(f"{archive} holds a device or FIFO member {m.name!r}; refusing to extract it")


def _inside_pure(root: Path, path: Path) -> bool:
    parts: list = []
    for p in PurePosixPath(path).parts[1:]:
        if p == "..":
            if not parts:
                return False
            parts.pop()
        elif p != ".":
            parts.append(p)
    return bool(parts) and parts[0] == root.name


def extract(archive, target, member: str = "") -> Path:
    """Extract `archive` so that its members (or, with `member`, that folder of it) end up in `target` (checked
    first; atomic: a temporary folder beside `target`, renamed into place). `target` must not exist yet."""
    archive, target = Path(archive), Path(target)
    check_archive(archive)
    if target.exists():
        raise OODBenchError(f"{target} exists already; delete it to install {archive.name} again")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        if zipfile.is_zipfile(archive):
            with zipfile.ZipFile(archive) as z:
                z.extractall(tmp)
        else:
            with tarfile.open(archive) as tf:
                tf.extractall(tmp, filter="data")
        for p in tmp.rglob("*"):
            if p.is_symlink() and not _inside(tmp, p):
                raise OODBenchError(f"{archive} holds a link {p.relative_to(tmp)} out of the target; refused")
        source = tmp / member if member else tmp
        if not source.is_dir():
            top = ", ".join(sorted(p.name for p in tmp.iterdir())[:5]) or "nothing"
            raise OODBenchError(f"{archive} has no folder {member!r} (its top level: {top}); the host changed the "
                                f"archive: place the set by hand")
        os.replace(source, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


# ----------------------------------------------------------------------------------------------------- manifests

def manifest_path(root, name: str) -> Path:
    return Path(root) / MANIFEST_DIR / f"{name}.json"


def scan(folder) -> dict:
    """{relative path: [size, sha256]} for every file under `folder`, and its image count."""
    folder = Path(folder)
    files = {}
    for p in sorted(folder.rglob("*")):
        if p.is_file() and not p.is_symlink():
            files[p.relative_to(folder).as_posix()] = [p.stat().st_size, sha256_file(p)]
    images = sum(1 for k in files if PurePosixPath(k).suffix.lower() in IMAGE_SUFFIXES)
    return {"files": files, "images": images}


def write_manifest(root, name: str, folder, source: str, trust: str = "first-use") -> Path:
    """Record `folder`'s files as set `name`'s manifest (trust: "first-use" or "published")."""
    data = dict(scan(folder), name=name, folder=str(Path(folder).relative_to(root)) if _inside(Path(root),
                Path(folder)) else str(folder), source=source, trust=trust)
    path = manifest_path(root, name)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=1, sort_keys=True))
    os.replace(tmp, path)
    return path


def manifest_names(root) -> list:
    """The sets with a manifest under `root`."""
    return sorted(p.stem for p in (Path(root) / MANIFEST_DIR).glob("*.json"))


def load_manifest(root, name: str) -> Optional[dict]:
    path = manifest_path(root, name)
    if not path.exists():
        return None
    try:
        return json.loads(path.read_text())
    except ValueError:
        raise OODBenchError(f"manifest {path} is not valid JSON; delete it and run `oodbench data fetch {name}`") \
            from None


def verify(root, name: str) -> list:
    """Problems of set `name` against its manifest: ["missing: rel", "corrupt: rel (...)", ...]; [] when intact."""
    man = load_manifest(root, name)
    if man is None:
        raise OODBenchError(f"no manifest for {name} under {Path(root) / MANIFEST_DIR}; run `oodbench data fetch "
                            f"{name}` (it writes one after a complete download)")
    folder = Path(man["folder"])
    folder = folder if folder.is_absolute() else Path(root) / folder
    problems = []
    for rel, (size, digest) in sorted(man["files"].items()):
        p = folder / rel
        if not p.is_file():
            problems.append(f"missing: {p}")
        elif p.stat().st_size != size:
            problems.append(f"corrupt: {p} ({p.stat().st_size} bytes, expected {size})")
        elif sha256_file(p) != digest:
            problems.append(f"corrupt: {p} (SHA-256 differs)")
    return problems


def trust_note(man: dict) -> str:
    return ("digests published by the host" if man.get("trust") == "published" else
            "trust on first use: the manifest was written after the first complete download, so it proves the "
            "files unchanged since then, not that the download was the original")
