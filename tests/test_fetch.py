"""Downloads, archives and manifests (oodbench/data/fetch.py, data/catalog.py) against a local HTTP server on the
loopback address, started and stopped by each test: nothing leaves this machine."""
from __future__ import annotations

import hashlib
import http.server
import io
import os
import socket
import tarfile
import threading
import time
import urllib.parse
import zipfile

import numpy as np
import pytest
from PIL import Image

from oodbench.data import catalog, fetch
from oodbench.errors import OODBenchError
from conftest import fails


class Server:
    """A threaded HTTP server on 127.0.0.1. `routes[path]` is bytes (served with Range support) or a callable
    (handler) -> None; `drop[path] = n` makes the next full answer to path stop after n bytes; `requests` records
    (path, Range header) of every GET."""

    def __init__(self):
        self.routes, self.drop, self.requests = {}, {}, []
        owner = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):
                path = urllib.parse.urlsplit(self.path).path
                owner.requests.append((self.path, self.headers.get("Range")))
                route = owner.routes.get(path)
                if route is None:
                    self.send_error(404, "Not Found")
                elif callable(route):
                    route(self)
                else:
                    owner.serve_bytes(self, path, route)

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()
        self.base = f"http://127.0.0.1:{self.httpd.server_address[1]}"

    def serve_bytes(self, h, path, data):
        start, status = 0, 200
        rng = h.headers.get("Range")
        if rng and rng.startswith("bytes="):
            start, status = int(rng[6:].split("-")[0]), 206
        h.send_response(status)
        h.send_header("Content-Type", "application/octet-stream")
        h.send_header("Content-Length", str(len(data) - start))
        if status == 206:
            h.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        h.end_headers()
        cut = self.drop.pop(path, None)
        h.wfile.write(data[start:] if cut is None else data[start:start + cut])
        if cut is not None:   # the connection drops mid-body
            h.wfile.flush()
            h.connection.shutdown(socket.SHUT_RDWR)
            h.close_connection = True

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server(monkeypatch):
    monkeypatch.setattr(fetch, "sleep", lambda s: None)   # no real back-off waits
    s = Server()
    yield s
    s.close()


def payload(n: int, seed: int = 0) -> bytes:
    return np.random.default_rng(seed).integers(0, 256, n, dtype=np.uint8).tobytes()


def png_bytes(value: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.full((8, 8, 3), value, np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def tar_bytes(members: dict, links: dict = None) -> bytes:
    """A .tar.gz holding {name: bytes} files and {name: target} symbolic links."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tf:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
        for name, target in (links or {}).items():
            info = tarfile.TarInfo(name)
            info.type, info.linkname = tarfile.SYMTYPE, target
            tf.addfile(info)
    return buf.getvalue()


def leftovers(folder) -> list:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())


# ------------------------------------------------------------------------------------------------------ download

def test_dropped_connection_resumes_with_a_range_request_to_the_same_bytes(server, tmp_path):
    data = payload(300_000)
    server.routes["/big.bin"] = data
    server.drop["/big.bin"] = 120_000
    out = fetch.download(f"{server.base}/big.bin", tmp_path / "big.bin",
                         sha256=hashlib.sha256(data).hexdigest())
    assert out.read_bytes() == data
    assert [r for _, r in server.requests] == [None, "bytes=120000-"]   # the second try asked for the rest only
    assert leftovers(tmp_path) == ["big.bin"]                            # no .part left


def test_a_part_file_left_by_an_earlier_run_is_resumed(server, tmp_path):
    data = payload(50_000, seed=1)
    server.routes["/f.bin"] = data
    (tmp_path / "f.bin.part").write_bytes(data[:20_000])
    assert fetch.download(f"{server.base}/f.bin", tmp_path / "f.bin").read_bytes() == data
    assert server.requests[-1][1] == "bytes=20000-"


def test_checksum_mismatch_is_refused_and_nothing_is_left(server, tmp_path):
    server.routes["/f.bin"] = payload(10_000)
    with pytest.raises(OODBenchError, match="SHA-256 .* expected 0+ .*deleted") as e:
        fetch.download(f"{server.base}/f.bin", tmp_path / "f.bin", sha256="0" * 64)
    assert "\n" not in str(e.value) and f"{server.base}/f.bin" in str(e.value)
    assert leftovers(tmp_path) == []


def test_md5_of_a_host_that_publishes_only_md5_is_checked(server, tmp_path):
    data = payload(5_000, seed=2)
    server.routes["/f.tar"] = data
    good = hashlib.md5(data).hexdigest()
    assert fetch.download(f"{server.base}/f.tar", tmp_path / "a", md5=good).read_bytes() == data
    with pytest.raises(OODBenchError, match="MD5"):
        fetch.download(f"{server.base}/f.tar", tmp_path / "b", md5="f" * 32)
    assert not (tmp_path / "b").exists() and not (tmp_path / "b.part").exists()


@pytest.mark.parametrize("code, tries", [(404, 1), (500, 3)])
def test_http_errors_are_one_line_naming_the_url_and_leave_nothing(server, tmp_path, code, tries):
    server.routes["/x"] = lambda h: h.send_error(code)
    with pytest.raises(OODBenchError) as e:
        fetch.download(f"{server.base}/x", tmp_path / "x", retries=2)
    text = str(e.value)
    assert "\n" not in text and f"{server.base}/x" in text and f"HTTP {code}" in text and "by hand" in text
    assert len(server.requests) == tries          # 4xx is not retried, 5xx is
    assert leftovers(tmp_path) == []


def test_a_timeout_is_retried_then_one_line(server, tmp_path):
    def slow(h):
        time.sleep(1.0)
        server.serve_bytes(h, "/slow", b"late")

    server.routes["/slow"] = slow
    with pytest.raises(OODBenchError, match="after 2 tries") as e:
        fetch.download(f"{server.base}/slow", tmp_path / "s", retries=1, timeout=0.2)
    assert "\n" not in str(e.value)
    assert leftovers(tmp_path) == []


def test_offline_is_one_line_without_retries(tmp_path):
    with socket.socket() as s:                    # a port nobody listens on: connection refused, like no network
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    started = time.monotonic()
    with pytest.raises(OODBenchError, match="cannot reach 127.0.0.1") as e:
        fetch.download(f"http://127.0.0.1:{port}/f.zip", tmp_path / "f.zip")
    assert time.monotonic() - started < 5 and "\n" not in str(e.value)
    assert leftovers(tmp_path) == []


# ------------------------------------------------------------------------------------------------ Google Drive

def drive_routes(server, data, page):
    """/uc answers Drive's large-file warning page; /download (the form's action) answers the bytes once the form's
    fields came with it."""
    def warning(h):
        body = page.encode()
        h.send_response(200)
        h.send_header("Content-Type", "text/html; charset=utf-8")
        h.send_header("Content-Length", str(len(body)))
        h.end_headers()
        h.wfile.write(body)

    def confirmed(h):
        query = urllib.parse.parse_qs(urllib.parse.urlsplit(h.path).query)
        if query.get("confirm") == ["t"] and query.get("uuid") == ["u-123"] and query.get("id") == ["FILEID"]:
            server.serve_bytes(h, "/download", data)
        else:
            h.send_error(403)

    server.routes["/uc"], server.routes["/download"] = warning, confirmed


FORM = """<html><body><p>Google Drive can't scan this file for viruses.</p>
<form id="download-form" action="{base}/download" method="get">
<input type="submit" value="Download anyway"/><input type="hidden" name="id" value="FILEID">
<input type="hidden" name="export" value="download"><input type="hidden" name="confirm" value="t">
<input type="hidden" name="uuid" value="u-123"></form></body></html>"""


def test_google_drive_warning_form_is_submitted(server, tmp_path):
    data = payload(40_000, seed=3)
    drive_routes(server, data, FORM.format(base=server.base))
    url = fetch.gdrive_url("FILEID", base=f"{server.base}/uc")
    assert fetch.download(url, tmp_path / "a.zip", drive=True).read_bytes() == data
    assert [urllib.parse.urlsplit(p).path for p, _ in server.requests] == ["/uc", "/download"]


def test_google_drive_page_without_a_form_is_a_quota_error(server, tmp_path):
    drive_routes(server, b"", "<html><body>Too many users have viewed or downloaded this file recently.</body></html>")
    with pytest.raises(OODBenchError, match="quota") as e:
        fetch.download(fetch.gdrive_url("FILEID", base=f"{server.base}/uc"), tmp_path / "a.zip", drive=True)
    assert "\n" not in str(e.value)
    assert leftovers(tmp_path) == []


def test_drive_confirm_url_reads_the_older_confirm_link():
    page = '<a id="uc-download-link" href="/uc?export=download&amp;confirm=AbC_1&amp;id=X">Download anyway</a>'
    assert fetch.drive_confirm_url(page, "https://drive.google.com/uc?export=download&id=X") == \
        "https://drive.google.com/uc?export=download&confirm=AbC_1&id=X"


# --------------------------------------------------------------------------------------------------- archives

@pytest.mark.parametrize("members, links", [
    ({"set/a.png": b"1", "../evil.txt": b"x"}, {}),
    ({"set/a.png": b"1", "/tmp/evil.txt": b"x"}, {}),
    ({"set/a.png": b"1"}, {"set/out": "../../outside"}),
    ({"set/a.png": b"1"}, {"set/abs": "/etc/passwd"}),
])
def test_unsafe_tar_members_are_refused_before_anything_is_written(tmp_path, members, links):
    archive = tmp_path / "a.tar.gz"
    archive.write_bytes(tar_bytes(members, links))
    with pytest.raises(OODBenchError, match="refusing to extract"):
        fetch.extract(archive, tmp_path / "root" / "set", "set")
    assert not (tmp_path / "root").exists() or leftovers(tmp_path / "root") == []
    assert not (tmp_path / "evil.txt").exists()


def test_unsafe_zip_member_is_refused(tmp_path):
    archive = tmp_path / "a.zip"
    with zipfile.ZipFile(archive, "w") as z:
        z.writestr("ok/a.png", b"1")
        z.writestr("ok/../../evil.txt", b"x")
    with pytest.raises(OODBenchError, match="unsafe path"):
        fetch.extract(archive, tmp_path / "t")
    assert not (tmp_path / "t").exists() and not (tmp_path / "evil.txt").exists()


def test_extract_takes_the_named_folder_and_a_missing_one_leaves_nothing(tmp_path):
    archive = tmp_path / "a.tar.gz"
    archive.write_bytes(tar_bytes({"set/a.png": b"1", "set/sub/b.png": b"2", "README": b"r"}))
    fetch.extract(archive, tmp_path / "root" / "mine", "set")
    assert leftovers(tmp_path / "root") == ["mine/a.png", "mine/sub/b.png"]
    with pytest.raises(OODBenchError, match="no folder 'other'"):
        fetch.extract(archive, tmp_path / "root2" / "x", "other")
    assert list((tmp_path / "root2").iterdir()) == []     # the temporary folder is gone too


# ------------------------------------------------------------------------------------ install, verify, the CLI

@pytest.fixture
def toy_set(server, monkeypatch):
    """A catalogue entry `toyset` served from the loopback server: a .tar.gz whose toy/ folder holds 3 PNGs."""
    data = tar_bytes({f"toy/c{i}/{i}.png": png_bytes(40 * i) for i in range(3)} | {"toy/labels.txt": b"0\n1\n2\n"})
    server.routes["/toy.tar.gz"] = data
    entry = catalog.Entry("archive", "toy_images", f"{server.base}/toy.tar.gz", "toy.tar.gz", "toy",
                          hashlib.md5(data).hexdigest(), source="test server")
    monkeypatch.setitem(catalog.ENTRIES, "toyset", entry)
    return server


def test_fetch_verify_detects_corruption_and_fetch_again_repairs(toy_set, tmp_path, capsys):
    from oodbench.cli import main

    root = tmp_path / "data"
    assert main(["data", "fetch", "toyset", "--data-root", str(root)]) == 0
    out = capsys.readouterr().out
    assert "installed at" in out and "4 files, 3 images" in out and "trust on first use" in out
    assert leftovers(root / "toy_images") == ["c0/0.png", "c1/1.png", "c2/2.png", "labels.txt"]
    assert not any((root / catalog.DOWNLOADS).iterdir())          # the archive is deleted once installed
    assert main(["data", "verify", "--data-root", str(root)]) == 0
    assert "toyset: ok: 4 files, 3 images" in capsys.readouterr().out

    (root / "toy_images" / "c1" / "1.png").write_bytes(png_bytes(7))      # corrupt one file, delete another
    (root / "toy_images" / "labels.txt").unlink()
    line = fails(capsys, ["data", "verify", "toyset", "--data-root", str(root)])
    assert "toyset did not verify" in line
    assert main(["data", "verify", "toyset", "--data-root", str(root)]) == 2
    out = capsys.readouterr().out
    assert f"corrupt: {root / 'toy_images' / 'c1' / '1.png'}" in out and f"missing: {root / 'toy_images'}" in out

    requests = len(toy_set.requests)
    assert main(["data", "fetch", "toyset", "--data-root", str(root)]) == 0
    assert "fetching it again" in capsys.readouterr().out and len(toy_set.requests) == requests + 1
    assert main(["data", "verify", "toyset", "--data-root", str(root)]) == 0
    assert main(["data", "fetch", "toyset", "--data-root", str(root)]) == 0      # intact: no download at all
    assert "already installed and verified" in capsys.readouterr().out and len(toy_set.requests) == requests + 1


def test_fetch_of_a_refused_set_leaves_no_folder(toy_set, tmp_path, capsys):
    toy_set.routes["/toy.tar.gz"] = lambda h: h.send_error(404)
    root = tmp_path / "data"
    line = fails(capsys, ["data", "fetch", "toyset", "--data-root", str(root)])
    assert "HTTP 404" in line and "toy.tar.gz" in line
    assert not (root / "toy_images").exists() and fetch.manifest_names(root) == []
    assert leftovers(root) == []


def test_fetch_offline_is_one_line(monkeypatch, tmp_path, capsys):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setitem(catalog.ENTRIES, "toyset", catalog.Entry("archive", "toy", f"http://127.0.0.1:{port}/t.tar",
                                                                 "t.tar", "toy"))
    line = fails(capsys, ["data", "fetch", "toyset", "--data-root", str(tmp_path)])
    assert "cannot reach" in line and f"http://127.0.0.1:{port}/t.tar" in line and "by hand" in line


def test_fetch_names_are_checked(tmp_path, capsys):
    assert "no source known for 'nosuchset'" in fails(capsys, ["data", "fetch", "nosuchset", "--data-root",
                                                               str(tmp_path)])
    assert "needs names" in fails(capsys, ["data", "fetch", "--data-root", str(tmp_path)])
    assert "no set under" in fails(capsys, ["data", "verify", "--data-root", str(tmp_path)])
    assert "no manifest for digits" in fails(capsys, ["data", "verify", "digits", "--data-root", str(tmp_path)])


def test_a_folder_placed_by_hand_is_not_overwritten(toy_set, tmp_path, capsys):
    (tmp_path / "toy_images").mkdir()
    (tmp_path / "toy_images" / "mine.png").write_bytes(b"x")
    assert "not installed by `oodbench data fetch`" in fails(capsys, ["data", "fetch", "toyset", "--data-root",
                                                                      str(tmp_path)])
    assert (tmp_path / "toy_images" / "mine.png").read_bytes() == b"x"


def test_protocols_expand_to_their_sets_and_name_what_must_be_placed_by_hand(tmp_path):
    wanted, manual = catalog.expand(["imagenet200"], tmp_path)
    assert wanted[0] == "benchmark_imglist"
    assert {"ssb_hard", "ninco", "inaturalist", "openimage_o", "imagenet_textures"} <= set(wanted)
    assert "imagenet200_res18_v1.5" in wanted           # the protocol's OpenOOD checkpoint (openood:imagenet200_res18)
    assert {"imagenet_v2", "imagenet_c", "imagenet_r"} <= set(wanted)   # its csID sets' images (imagenet200_v2, ...)
    assert [name for name, _ in manual] == ["imagenet200"]   # ImageNet itself needs registration
    wanted, manual = catalog.expand(["cifar10"], tmp_path)
    assert {"cifar10", "cifar100", "mnist", "svhn", "textures", "places365", "tinyimagenet", "benchmark_imglist",
            "cifar10c"} == set(wanted) and manual == []


def test_catalogue_ids_are_openood_download_script_ids():
    """Every OpenOOD entry is one of the ids transcribed from OpenOOD's download script, unpacked where it is."""
    for name, e in catalog.ENTRIES.items():
        if e.url.startswith("gdrive:"):
            key = e.filename.removesuffix(".zip")
            assert fetch.OPENOOD_GDRIVE[key][0] == e.url.removeprefix("gdrive:")
            assert not os.path.isabs(e.folder) and ".." not in e.folder


# ------------------------------------------------------------------------------------------- the model registry

def test_openood_checkpoint_by_name_is_fetched_verified_and_loaded(server, tmp_path, monkeypatch, capsys):
    import torch

    from oodbench import model_registry
    from oodbench.cli import main
    from oodbench.models import load_model, openood_resnet18_32x32

    torch.manual_seed(0)
    net = openood_resnet18_32x32(10).eval()
    buf = io.BytesIO()
    torch.save(net.state_dict(), buf)
    folder = catalog.CHECKPOINT_FOLDERS["cifar10_res18_v1.5"]
    archive = io.BytesIO()
    with zipfile.ZipFile(archive, "w") as z:                 # the layout OpenOOD's scripts read: <run>/s0/best.ckpt
        z.writestr(f"{folder}/s0/best.ckpt", buf.getvalue())
    server.routes["/ckpt.zip"] = archive.getvalue()
    monkeypatch.setitem(catalog.ENTRIES, "cifar10_res18_v1.5",
                        catalog.ENTRIES["cifar10_res18_v1.5"]._replace(url=f"{server.base}/ckpt.zip"))
    root = tmp_path / "data"
    monkeypatch.setenv("OODBENCH_DATA", str(root))

    assert "is not installed" in fails(capsys, ["eval", "--model", "openood:cifar10_res18_s0", "--in", "digits",
                                                "--out", "noise:gaussian", "--method", "msp"])
    assert main(["data", "fetch", "cifar10_res18_v1.5"]) == 0
    assert main(["models", "list"]) == 0
    listing = {line.split()[0]: line.split()[1] for line in capsys.readouterr().out.splitlines()
               if line.startswith("openood:")}
    assert set(listing) == {f"openood:{n}" for n in model_registry.REGISTRY}
    assert listing["openood:cifar10_res18_s0"] == "verified" and listing["openood:cifar10_res18_s1"] == "missing"

    model = load_model("openood:cifar10_res18_s0")
    x = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8)
    with torch.no_grad():
        assert torch.equal(model.logits(x), net(model.prepare(x)))
    assert model.mean == [0.4914, 0.4822, 0.4465]             # OpenOOD's CIFAR-10 normalisation
    seeded = load_model("openood:cifar10_res18", seed=0)      # the run of the seed: s0
    with torch.no_grad():
        assert torch.equal(seeded.logits(x), net(model.prepare(x)))
    with pytest.raises(OODBenchError, match="openood:cifar10_res18_s1 is not installed"):
        load_model("openood:cifar10_res18", seed=1)

    path = model_registry.local_path("cifar10_res18_s0")
    raw = bytearray(path.read_bytes())
    raw[-100] ^= 0xFF                                          # one flipped byte: refused before torch.load
    path.write_bytes(bytes(raw))
    with pytest.raises(OODBenchError, match="does not match the SHA-256"):
        load_model("openood:cifar10_res18_s0")
    assert model_registry.status("cifar10_res18_s0") == "corrupt"
    assert "no such published checkpoint" in fails(capsys, ["eval", "--model", "openood:cifar10_res18_s9", "--in",
                                                            "digits", "--out", "noise:gaussian", "--method", "msp"])


@pytest.mark.skipif(not os.path.isdir("/work/.mirror/Jingkang50+OpenOOD/repo"),
                    reason="needs a local clone of Jingkang50/OpenOOD")
def test_drive_ids_are_those_of_openoods_download_script_at_the_cited_commit():
    import re
    import subprocess

    text = subprocess.run(["git", "-C", "/work/.mirror/Jingkang50+OpenOOD/repo", "show",
                           f"{fetch.OPENOOD_COMMIT}:scripts/download/download.py"], capture_output=True, text=True,
                          check=True).stdout
    ids = dict(re.findall(r"'([\w.\-]+)': '([\w\-]+)'", text))
    assert {k: v[0] for k, v in fetch.OPENOOD_GDRIVE.items()} == {k: ids[k] for k in fetch.OPENOOD_GDRIVE}
    for name, (_, group) in fetch.OPENOOD_GDRIVE.items():   # unpacked where its dir_dict puts it
        assert not group.startswith("images") or re.search(rf"'{group}/': \[[^\]]*'{name}'", text), name


def test_a_full_disk_is_not_retried_and_keeps_what_arrived(server, tmp_path, monkeypatch, capsys):
    import builtins
    import errno

    data = payload(3 << 20, seed=4)                     # three blocks: the second write fails
    server.routes["/f.bin"] = data
    real_open, writes = builtins.open, []

    class Full:
        def __init__(self, f):
            self.f = f

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

        def write(self, block):
            writes.append(len(block))
            if len(writes) == 2:
                raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "f.bin.part"))
            return self.f.write(block)

    monkeypatch.setattr(builtins, "open", lambda p, mode="r", *a, **k:
                        Full(real_open(p, mode, *a, **k)) if str(p).endswith(".part") else real_open(p, mode, *a, **k))
    with pytest.raises(OSError) as e:
        fetch.download(f"{server.base}/f.bin", tmp_path / "f.bin")
    assert e.value.errno == errno.ENOSPC and len(server.requests) == 1      # not retried
    monkeypatch.undo()
    assert (tmp_path / "f.bin.part").stat().st_size == fetch.CHUNK          # the first block is kept ...
    monkeypatch.setattr(fetch, "sleep", lambda s: None)
    assert fetch.download(f"{server.base}/f.bin", tmp_path / "f.bin").read_bytes() == data   # ... and resumed
    assert server.requests[-1][1] == f"bytes={fetch.CHUNK}-"
