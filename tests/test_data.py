"""Data layer: dataset specs, derived sets, shape conversion, user data, split, device-side transforms."""
import urllib.error
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from oodbench import data
from oodbench.data import transforms
from oodbench.data.folders import FOLDER_SETS
from oodbench.data.registry import RESIZE_DEFAULT
from oodbench.data.sources import DEBIAN_FASHION_MNIST
from oodbench.errors import OODBenchError

HAVE_FMNIST = (DEBIAN_FASHION_MNIST / "t10k-images-idx3-ubyte.gz").is_file()


@pytest.fixture(autouse=True)
def offline(monkeypatch, tmp_path):
    """No test may download: an empty data root and downloads off unless a test says otherwise."""
    monkeypatch.setenv("OODBENCH_DATA", str(tmp_path / "data_root"))
    monkeypatch.setenv("OODBENCH_DOWNLOAD", "0")


@pytest.fixture(scope="module")
def fmnist_train():
    return data.load("fashion_mnist", split="train", download=False)


def pil_l(rgb_chw: np.ndarray) -> np.ndarray:
    return np.asarray(Image.fromarray(rgb_chw.transpose(1, 2, 0), "RGB").convert("L"))


def save_png(path: Path, array_hwc_or_hw: np.ndarray):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array_hwc_or_hw).save(path)


def rgb_npz(tmp_path, n=6, h=20, w=24, seed=0, layout="nhwc", labels=True) -> Path:
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, (n, h, w, 3), dtype=np.uint8)
    if layout == "nchw":
        images = images.transpose(0, 3, 1, 2)
    path = tmp_path / f"set_{layout}_{seed}.npz"
    arrays = dict(images=images)
    if labels:
        arrays["labels"] = np.arange(n) % 3
    np.savez(path, **arrays)
    return path


# ---------------------------------------------------------------- real and offline sets

def test_fashion_mnist_from_debian_package(fmnist_train):
    test = data.load("fashion_mnist", split="test")
    for s, n in ((fmnist_train, 60000), (test, 10000)):
        assert len(s) == n and s.shape == (1, 28, 28) and s.images.dtype == torch.uint8
        assert s.labels.dtype == torch.int64 and set(s.labels.unique().tolist()) == set(range(10))
    assert fmnist_train.images.float().mean() > 50          # real pixels, not zeros
    assert fmnist_train.fingerprint != test.fingerprint


def test_repeated_load_is_cached_and_isolated():
    a = data.load("fashion_mnist")
    a.images[0].fill_(7)                                    # a caller's in-place edit must not leak into the cache
    b = data.load("fashion_mnist")
    assert not torch.equal(a.images[0], b.images[0])
    assert b.fingerprint == data.load("fashion_mnist").fingerprint


def test_digits_split_is_a_partition():
    train, test = data.load("digits", split="train"), data.load("digits", split="test")
    assert (len(train), len(test)) == (899, 898)
    assert train.shape == (1, 8, 8) and train.images.dtype == torch.uint8
    assert int(train.images.max()) == 255 and int(train.images.min()) == 0
    from sklearn.datasets import load_digits
    ref = np.rint(load_digits().images[899:] * 255 / 16).astype(np.uint8)
    assert np.array_equal(test.images[:, 0].numpy(), ref)


@pytest.mark.parametrize("spec,n", [("noise:gaussian", 2000), ("noise:uniform", 2000), ("constant", 2000),
                                    ("noise:gaussian:17", 17), ("constant:5", 5), ("glyphs:40", 40)])
@pytest.mark.parametrize("like", [None, (3, 32, 32)])
def test_synthetic_shapes_and_determinism(spec, n, like):
    s = data.load(spec, like=like)
    assert len(s) == n and s.images.dtype == torch.uint8
    assert s.shape == (like or (1, 28, 28))
    assert torch.equal(s.images, data.load(spec, like=like).images)
    assert not torch.equal(s.images, data.load(spec, split="train", like=like).images)


def test_synthetic_content():
    g = data.load("noise:gaussian").images.float() / 255
    assert abs(g.mean().item() - 0.5) < 0.01 and 0.22 < g.std().item() < 0.25   # std 0.25 shrunk a bit by clipping
    c = data.load("constant:50", like=(3, 8, 8)).images
    flat = c.flatten(2)
    assert torch.equal(flat, flat[:, :, :1].expand_as(flat))                       # one colour per image
    assert len({tuple(v) for v in flat[:, :, 0].tolist()}) > 40


def test_glyphs_are_frame_filling_letters_of_many_faces():
    from oodbench.data import glyphs

    images, labels = glyphs.glyphs(300, (28, 28), "test")
    assert images.shape == (300, 1, 28, 28) and set(labels.tolist()) == set(range(10))   # every letter A-J
    assert len(glyphs.font_files()) >= 20
    ink = images[:, 0] > 0
    rows, cols = ink.any(2), ink.any(1)
    extent = np.maximum(rows.sum(1), cols.sum(1))                      # bounding box's longer side
    assert (images.reshape(300, -1).max(1) == 255).mean() > 0.9 and extent.min() >= 23
    assert 0.3 < (images == 0).mean() < 0.8                           # black background, like notMNIST
    assert len({img.tobytes() for img in images}) == 300
    assert data.load("glyphs:300").images.numpy().tobytes() == images.tobytes()


def test_mnistlike_fits_a_20x20_box_on_a_black_28x28_canvas():
    from oodbench.data.convert import mnist_layout, resize_torch

    d = data.load("digits")
    m = data.load("mnistlike:digits")
    assert m.shape == (1, 28, 28) and len(m) == len(d)
    assert torch.equal(m.images[:, :, 4:24, 4:24], resize_torch(d.images, (20, 20)))
    border = m.images.clone()
    border[:, :, 4:24, 4:24] = 0
    assert int(border.max()) == 0
    wide = mnist_layout(torch.full((2, 3, 10, 20), 200, dtype=torch.uint8))   # keeps the aspect ratio
    assert wide.shape == (2, 3, 28, 28) and int(wide.sum(1).gt(0).sum()) == 2 * 10 * 20
    assert data.load("mnistlike:digits", like=(3, 32, 32)).shape == (3, 32, 32)


def test_unknown_spec_suggests_a_name():
    with pytest.raises(OODBenchError, match="did you mean 'cifar10'"):
        data.load("cifar01")
    with pytest.raises(OODBenchError, match="unknown resize method"):
        data.load("resize:area:digits")
    with pytest.raises(OODBenchError, match="no split 'val'"):
        data.load("digits", split="val")


# ---------------------------------------------------------------- missing data

def test_missing_torchvision_set_names_paths_searched(tmp_path):
    root = tmp_path / "empty"
    with pytest.raises(OODBenchError) as e:
        data.load("cifar10", root=root, download=False)
    msg = str(e.value)
    assert str(root / "cifar-10-batches-py") in msg and "cifar-10-python.tar.gz" in msg and "\n" not in msg


def test_missing_fashion_mnist_lists_debian_path_too(tmp_path, monkeypatch):
    monkeypatch.setattr("oodbench.data.sources.DEBIAN_FASHION_MNIST", tmp_path / "no_debian")
    with pytest.raises(OODBenchError) as e:
        data.load("fashion_mnist", root=tmp_path / "r", download=False)
    assert str(tmp_path / "r" / "FashionMNIST" / "raw") in str(e.value)
    assert str(tmp_path / "no_debian") in str(e.value) and "apt-get install dataset-fashion-mnist" in str(e.value)


def test_failed_download_is_a_clear_error(tmp_path, monkeypatch):
    import torchvision.datasets

    def offline_cifar(root, train=True, download=False):
        if download:
            raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")
        raise RuntimeError("Dataset not found or corrupted.")

    monkeypatch.setattr(torchvision.datasets, "CIFAR10", offline_cifar)
    with pytest.raises(OODBenchError, match="download failed .*name resolution.*cifar-10-python.tar.gz") as e:
        data.load("cifar10", root=tmp_path, download=True)
    assert str(tmp_path / "cifar-10-batches-py") in str(e.value)


def test_missing_folder_set_names_expected_folder(tmp_path):
    with pytest.raises(OODBenchError) as e:
        data.load("textures", root=tmp_path)
    assert str(tmp_path / "dtd" / "images") in str(e.value) and "dtd-r1.0.1.tar.gz" in str(e.value)


def test_dataset_status_reports_without_downloading(tmp_path):
    (tmp_path / "LSUN" / "test").mkdir(parents=True)
    rows = {r["name"]: r for r in data.dataset_status(tmp_path)}
    assert set(rows) >= {"mnist", "fashion_mnist", "cifar10", "cifar100", "svhn", "digits", "lsun", "lsun_resize",
                         "isun", "textures", "places365", "tinyimagenet", "notmnist"}
    assert rows["cifar10"]["found"] is None and "cifar-10-python.tar.gz" in rows["cifar10"]["how_to_get"]
    assert rows["lsun"]["found"] == str(tmp_path / "LSUN")
    assert rows["digits"]["found"] is not None
    assert (rows["fashion_mnist"]["found"] is not None) == HAVE_FMNIST
    assert not (tmp_path / "cifar-10-batches-py").exists()


# ---------------------------------------------------------------- derived sets

def test_flips_are_exact(tmp_path):
    src = data.load(f"npz:{rgb_npz(tmp_path)}")
    assert torch.equal(data.load(f"vflip:npz:{rgb_npz(tmp_path)}").images, src.images.flip(-2))
    assert torch.equal(data.load(f"hflip:npz:{rgb_npz(tmp_path)}").images, src.images.flip(-1))
    assert torch.equal(data.load(f"vflip:npz:{rgb_npz(tmp_path)}").labels, src.labels)


def test_vflip_of_fashion_mnist_is_exact():
    src = data.load("fashion_mnist")
    flipped = data.load("vflip:fashion_mnist")
    assert torch.equal(flipped.images, src.images.flip(-2)) and flipped.fingerprint != src.fingerprint


def test_gray_is_pil_luminance_replicated(tmp_path):
    src = data.load(f"npz:{rgb_npz(tmp_path)}").images.numpy()
    g = data.load(f"gray:npz:{rgb_npz(tmp_path)}").images.numpy()
    assert g.shape == src.shape
    for i in range(len(src)):
        for c in range(3):
            assert np.array_equal(g[i, c], pil_l(src[i]))
    assert torch.equal(data.load("gray:digits").images, data.load("digits").images)   # 1 channel: unchanged


def test_nested_derivation(tmp_path):
    p = rgb_npz(tmp_path)
    nested = data.load(f"vflip:gray:npz:{p}").images
    assert torch.equal(nested, data.load(f"gray:npz:{p}").images.flip(-2))


def test_class_subset_selects_and_renumbers():
    src = data.load("digits")
    sub = data.load("classes:7,2:digits")
    keep = (src.labels == 7) | (src.labels == 2)
    assert torch.equal(sub.images, src.images[keep])
    assert torch.equal(sub.labels, torch.where(src.labels[keep] == 7, 0, 1))       # position in the given list
    with pytest.raises(OODBenchError, match="no labels"):
        data.load("classes:0:noise:uniform")
    with pytest.raises(OODBenchError, match="no images with these classes"):
        data.load("classes:42:digits")


@pytest.mark.parametrize("method", ["nearest", "bilinear", "bicubic", "lanczos"])
def test_resize_equals_pil(tmp_path, method):
    p = rgb_npz(tmp_path, n=3)
    src = data.load(f"npz:{p}").images.numpy()
    out = data.load(f"resize:{method}:npz:{p}").images.numpy()
    assert out.shape == (3, 3, *RESIZE_DEFAULT)
    resample = getattr(Image.Resampling, method.upper())
    for i in range(3):
        ref = Image.fromarray(src[i].transpose(1, 2, 0)).resize(RESIZE_DEFAULT[::-1], resample=resample)
        assert np.array_equal(out[i].transpose(1, 2, 0), np.asarray(ref))
    assert data.load(f"resize:{method}:npz:{p}", like=(3, 16, 12)).shape == (3, 16, 12)


def test_resize_of_a_folder_resamples_the_originals(tmp_path):
    rng = np.random.default_rng(1)
    big = rng.integers(0, 256, (64, 48, 3), dtype=np.uint8)
    save_png(tmp_path / "imgs" / "a.png", big)
    out = data.load(f"resize:nearest:folder:{tmp_path / 'imgs'}", like=(3, 16, 16)).images[0].numpy()
    ref = np.asarray(Image.fromarray(big).resize((16, 16), Image.Resampling.NEAREST))
    assert np.array_equal(out.transpose(1, 2, 0), ref)


# ---------------------------------------------------------------- like conversion

def test_like_replicates_and_resizes(capsys):
    src = data.load("digits")
    out = data.load("digits", like=(3, 16, 16))
    assert out.shape == (3, 16, 16)
    assert torch.equal(out.images[:, 0], out.images[:, 1]) and torch.equal(out.images[:, 0], out.images[:, 2])
    ref = F.interpolate(src.images.float(), size=(16, 16), mode="bilinear", antialias=True, align_corners=False)
    assert torch.equal(out.images[:, :1], ref.round().clamp(0, 255).to(torch.uint8))
    err = capsys.readouterr().err
    assert err.count("1->3 channels by replication") == 1
    data.load("digits", like=(3, 16, 16))
    assert "replication" not in capsys.readouterr().err                  # logged once per (set, rule)


def test_like_luminance(tmp_path):
    p = rgb_npz(tmp_path)
    src = data.load(f"npz:{p}").images.numpy()
    out = data.load(f"npz:{p}", like=(1, 20, 24)).images.numpy()
    assert out.shape == (6, 1, 20, 24)
    assert all(np.array_equal(out[i, 0], pil_l(src[i])) for i in range(6))


def test_like_same_shape_keeps_fingerprint():
    a = data.load("digits")
    assert data.load("digits", like=(1, 8, 8)).fingerprint == a.fingerprint
    with pytest.raises(OODBenchError, match="like must be"):
        data.load("digits", like=(2, 8, 8))


# ---------------------------------------------------------------- user data

def test_folder_nested_labels_and_sizes(tmp_path):
    rng = np.random.default_rng(0)
    for cls, n in (("cat", 2), ("dog", 3)):
        for i in range(n):
            save_png(tmp_path / "set" / cls / "deeper" / f"{i}.png", rng.integers(0, 256, (10, 12, 3), dtype=np.uint8))
    save_png(tmp_path / "set" / "dog" / "odd.png", rng.integers(0, 256, (30, 30, 3), dtype=np.uint8))
    (tmp_path / "set" / "notes.txt").write_text("not an image, ignored")
    s = data.load(f"folder:{tmp_path / 'set'}")
    assert len(s) == 6 and s.shape == (3, 10, 12)                             # the first image's size
    assert s.labels.tolist() == [0, 0, 1, 1, 1, 1]
    gray = tmp_path / "gray"
    save_png(gray / "x.png", rng.integers(0, 256, (5, 5), dtype=np.uint8))
    assert data.load(f"folder:{gray}").shape == (1, 5, 5) and data.load(f"folder:{gray}").labels is None


def test_folder_corrupt_image_is_reported(tmp_path):
    save_png(tmp_path / "set" / "good.png", np.zeros((4, 4, 3), np.uint8))
    bad = tmp_path / "set" / "sub" / "broken.jpg"
    bad.parent.mkdir()
    bad.write_bytes(b"\xff\xd8\xff\xe0 definitely not a jpeg")
    with pytest.raises(OODBenchError, match="corrupt") as e:
        data.load(f"folder:{tmp_path / 'set'}")
    assert str(bad) in str(e.value) and "good.png" not in str(e.value)


def test_folder_empty_or_missing(tmp_path):
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    (tmp_path / "empty" / "readme.txt").write_text("x")
    with pytest.raises(OODBenchError, match="holds no images"):
        data.load(f"folder:{tmp_path / 'empty'}")
    with pytest.raises(OODBenchError, match="does not exist"):
        data.load(f"folder:{tmp_path / 'nowhere'}")


def test_notmnist_skips_only_the_known_broken_files(tmp_path):
    base = tmp_path / "notMNIST_small"
    save_png(base / "A" / "ok.png", np.full((28, 28), 9, np.uint8))
    save_png(base / "B" / "ok.png", np.full((28, 28), 9, np.uint8))
    for rel in FOLDER_SETS["notmnist"].exclude:
        (base / rel).parent.mkdir(parents=True, exist_ok=True)
        (base / rel).write_bytes(b"")
    s = data.load("notmnist", root=tmp_path, like=(1, 28, 28))
    assert len(s) == 2 and s.labels.tolist() == [0, 1]
    (base / "C").mkdir()
    (base / "C" / "other.png").write_bytes(b"")
    with pytest.raises(OODBenchError, match="other.png"):
        data.load("notmnist", root=tmp_path)


def test_npz_layouts_agree(tmp_path):
    a = data.load(f"npz:{rgb_npz(tmp_path, layout='nhwc')}")
    b = data.load(f"npz:{rgb_npz(tmp_path, layout='nchw')}")
    assert a.shape == (3, 20, 24) and torch.equal(a.images, b.images) and a.labels.tolist() == [0, 1, 2, 0, 1, 2]


@pytest.mark.parametrize("arrays,message", [
    (dict(images=np.zeros((2, 8, 8, 3), np.float32)), "must be uint8"),
    (dict(images=np.zeros((2, 8, 8, 4), np.uint8)), "expected .N, H, W."),
    (dict(images=np.zeros((8, 8), np.uint8)), "expected .N, H, W."),
    (dict(pixels=np.zeros((2, 8, 8), np.uint8)), "no 'images' array"),
    (dict(images=np.zeros((2, 8, 8), np.uint8), labels=np.zeros(3, np.int64)), "'labels' must be 2"),
])
def test_bad_npz(tmp_path, arrays, message):
    path = tmp_path / "bad.npz"
    np.savez(path, **arrays)
    with pytest.raises(OODBenchError, match=message):
        data.load(f"npz:{path}")


def test_not_an_npz(tmp_path):
    path = tmp_path / "x.npz"
    path.write_bytes(b"garbage")
    with pytest.raises(OODBenchError, match="not a readable .npz"):
        data.load(f"npz:{path}")


# ---------------------------------------------------------------- resize benchmark

def test_resize_benchmark_writes_four_loadable_folders(tmp_path):
    src = rgb_npz(tmp_path, n=4, h=40, w=36)
    out = data.write_resize_benchmark(f"npz:{src}", 16, tmp_path / "bench")
    assert set(out) == {"nearest", "bilinear", "bicubic", "lanczos"}
    loaded = {m: data.load(f"folder:{folder}") for m, folder in out.items()}
    for m, s in loaded.items():
        assert s.shape == (3, 16, 16) and len(s) == 4
        assert torch.equal(s.images, data.load(f"resize:{m}:npz:{src}", like=(3, 16, 16)).images)
    assert not torch.equal(loaded["nearest"].images, loaded["lanczos"].images)
    with pytest.raises(OODBenchError, match="not empty"):
        data.write_resize_benchmark(f"npz:{src}", 16, tmp_path / "bench")


# ---------------------------------------------------------------- split

def test_train_val_split_is_deterministic_partition():
    s = data.load("digits", split="train")
    train, val = data.train_val_split(s, 0.2, seed=3)
    assert (len(train), len(val)) == (719, 180)
    again = data.train_val_split(s, 0.2, seed=3)
    assert torch.equal(val.images, again[1].images) and torch.equal(train.labels, again[0].labels)
    other = data.train_val_split(s, 0.2, seed=4)[1]
    assert not torch.equal(val.images, other.images)
    rows = {r.tobytes() for r in s.images.numpy()}
    assert {r.tobytes() for r in train.images.numpy()} | {r.tobytes() for r in val.images.numpy()} <= rows
    assert sorted(train.labels.tolist() + val.labels.tolist()) == sorted(s.labels.tolist())
    t0, v0 = data.train_val_split(s, 0.0, seed=3)
    assert len(v0) == 0 and torch.equal(t0.images, s.images)
    with pytest.raises(OODBenchError):
        data.train_val_split(s, 1.0, seed=0)


def test_split_full_train_set(fmnist_train):
    train, val = data.train_val_split(fmnist_train, 0.1, seed=0)
    assert (len(train), len(val)) == (54000, 6000)


# ---------------------------------------------------------------- transforms

def test_to_unit_and_normalize():
    x = torch.tensor([0, 51, 255], dtype=torch.uint8).view(1, 3, 1, 1)
    u = transforms.to_unit(x)
    assert u.dtype == torch.float32 and torch.allclose(u.flatten(), torch.tensor([0.0, 0.2, 1.0]))
    n = transforms.normalize(u, (0.0, 0.2, 0.5), (1.0, 0.5, 0.25))
    assert torch.allclose(n.flatten(), torch.tensor([0.0, 0.0, 2.0]), atol=1e-6)
    assert torch.allclose(transforms.normalize(u, 0.5, 0.5).flatten(), torch.tensor([-1.0, -0.6, 1.0]))


@pytest.mark.parametrize("mode,torch_mode", [("constant", "constant"), ("reflect", "reflect")])
def test_random_crop_is_a_crop_of_the_padded_image(mode, torch_mode):
    p, n = 2, 400
    x = torch.randint(1, 256, (n, 2, 7, 9), dtype=torch.uint8)
    out = transforms.random_crop(x, p, generator=torch.Generator().manual_seed(0), padding_mode=mode)
    assert out.shape == x.shape and out.dtype == x.dtype
    padded = F.pad(x.float(), (p, p, p, p), mode=torch_mode)
    seen = set()
    for i in range(n):
        match = [(dy, dx) for dy in range(2 * p + 1) for dx in range(2 * p + 1)
                 if torch.equal(padded[i, :, dy:dy + 7, dx:dx + 9], out[i].float())]
        assert match, f"image {i} is not a crop of its padded source"
        seen.add(match[0])
    assert len(seen) == (2 * p + 1) ** 2                                   # every offset occurs
    again = transforms.random_crop(x, p, generator=torch.Generator().manual_seed(0), padding_mode=mode)
    assert torch.equal(out, again)


def test_random_hflip():
    x = torch.randint(0, 256, (1000, 1, 3, 5), dtype=torch.uint8)
    out = transforms.random_hflip(x, 0.3, generator=torch.Generator().manual_seed(0))
    same = (out == x).flatten(1).all(1)
    flipped = (out == x.flip(-1)).flatten(1).all(1)
    assert bool((same | flipped).all())
    assert 0.25 < flipped.float().mean().item() < 0.35
    assert torch.equal(transforms.random_hflip(x, 0.0), x) and torch.equal(transforms.random_hflip(x, 1.0), x.flip(-1))


def test_failed_download_leaves_no_empty_folders(tmp_path, monkeypatch):
    import torchvision.datasets

    def offline_svhn(root, split="train", download=False):
        if download:
            Path(root).mkdir(parents=True, exist_ok=True)          # what torchvision does before fetching
            raise urllib.error.URLError("network unreachable")
        raise RuntimeError("Dataset not found or corrupted.")

    monkeypatch.setattr(torchvision.datasets, "SVHN", offline_svhn)
    with pytest.raises(OODBenchError, match="download failed"):
        data.load("svhn", root=tmp_path / "fresh", download=True)
    assert not (tmp_path / "fresh").exists()


@pytest.mark.parametrize("name,cls", [("cifar10", "CIFAR10"), ("cifar100", "CIFAR100"), ("svhn", "SVHN")])
def test_torchvision_arrays_become_nchw(tmp_path, monkeypatch, name, cls):
    import torchvision.datasets

    rng = np.random.default_rng(0)
    nhwc = rng.integers(0, 256, (4, 32, 32, 3), dtype=np.uint8)

    class Fake:                                   # torchvision's in-memory layout: CIFAR NHWC + list, SVHN NCHW + array
        def __init__(self, root, train=True, split=None, download=False):
            if name == "svhn":
                self.data, self.labels = nhwc.transpose(0, 3, 1, 2).copy(), np.array([1, 2, 3, 4])
            else:
                self.data, self.targets = nhwc, [1, 2, 3, 4]

    monkeypatch.setattr(torchvision.datasets, cls, Fake)
    s = data.load(name, root=tmp_path / name, download=False)
    assert s.shape == (3, 32, 32) and torch.equal(s.images, torch.from_numpy(nhwc).permute(0, 3, 1, 2))
    assert s.labels.tolist() == [1, 2, 3, 4]


# ---------------------------------------------------------------- what a new user sees

def test_default_data_root_does_not_follow_the_working_directory(tmp_path, monkeypatch):
    from oodbench.data.sources import data_root

    monkeypatch.delenv("OODBENCH_DATA")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    assert data_root() == tmp_path / "cache" / "oodbench" / "data"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert data_root() == Path.home() / ".cache" / "oodbench" / "data"
    monkeypatch.setenv("OODBENCH_DATA", str(tmp_path / "mine"))
    assert data_root() == tmp_path / "mine" and data_root(tmp_path / "given") == tmp_path / "given"
    with pytest.raises(OODBenchError, match=str(tmp_path / "mine" / "svhn")):   # the root searched is named
        data.load("svhn")


def test_imageset_repr_is_short():
    s = data.load("digits")
    text = repr(s)
    assert text == f"ImageSet('digits', 898 images of (1, 8, 8), labelled, cpu, fingerprint {s.fingerprint})"
    assert repr(s.subset(slice(0, 0))).startswith("ImageSet('digits', 0 images")


def test_folder_decode_note_says_colour_became_gray(tmp_path, capsys):
    save_png(tmp_path / "rgb" / "a.png", np.full((6, 6, 3), 200, dtype=np.uint8))
    data.load(f"folder:{tmp_path / 'rgb'}", like=(1, 4, 4))
    assert "decoded at 4x4 with PIL bilinear; colour images became grayscale (PIL luminance)" in \
        capsys.readouterr().err
