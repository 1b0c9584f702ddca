"""Per-image hashes, the fit/test overlap guard, and the explicit train/test splits of npz files and folders that let
users comply with it; has_split."""
import time

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader, TensorDataset

from oodbench import data
from oodbench.data import as_imageset, check_overlap, count_overlap, has_split, image_hashes, overlap
from oodbench.data.stream import StreamedImageSet
from oodbench.errors import OODBenchError


@pytest.fixture(autouse=True)
def offline(monkeypatch, tmp_path):
    monkeypatch.setenv("OODBENCH_DATA", str(tmp_path / "data_root"))
    monkeypatch.setenv("OODBENCH_DOWNLOAD", "0")
    monkeypatch.setenv("OODBENCH_WORKERS", "0")


def random_images(n, shape=(1, 8, 8), seed=0):
    return torch.from_numpy(np.random.default_rng(seed).integers(0, 256, (n, *shape), dtype=np.uint8))


def save_pngs(folder, images):
    folder.mkdir(parents=True, exist_ok=True)
    for i, image in enumerate(images):
        Image.fromarray(image.permute(1, 2, 0).numpy().squeeze(-1) if image.shape[0] == 1 else
                        image.permute(1, 2, 0).numpy()).save(folder / f"{i:03d}.png")


# ---------------------------------------------------------------- hashes

def test_hashes_equal_for_equal_images_only():
    x = random_images(50)
    x[7] = x[3]
    h = image_hashes(data.ImageSet(x))
    assert h.dtype == np.uint64 and h.shape == (50,)
    assert h[7] == h[3] and len(np.unique(h)) == 49
    y = x.clone()
    y[0, 0, 0, 0] ^= 1                                   # one bit
    assert image_hashes(data.ImageSet(y))[0] != h[0]
    assert (image_hashes(data.ImageSet(y))[1:] == h[1:]).all()
    assert (image_hashes(data.ImageSet(x), batch_size=7) == h).all()


def test_hashes_same_in_memory_streamed_and_from_a_loader(tmp_path):
    x = random_images(12, (3, 6, 5))
    save_pngs(tmp_path / "pngs", x)
    in_memory = data.load(f"folder:{tmp_path / 'pngs'}", stream=False)
    streamed = data.load(f"folder:{tmp_path / 'pngs'}", stream=True)
    assert isinstance(streamed, StreamedImageSet) and torch.equal(in_memory.images, x)
    h = image_hashes(data.ImageSet(x))
    assert (image_hashes(in_memory) == h).all() and (image_hashes(streamed, batch_size=5) == h).all()
    loader = as_imageset(DataLoader(TensorDataset(x.float() / 255), batch_size=5))
    assert (image_hashes(loader) == h).all()


def test_image_hashes_of_60000_mnist_sized_images_are_fast():
    s = data.ImageSet(random_images(60000, (1, 28, 28)))
    overlap._CACHE.clear()
    start = time.perf_counter()
    h = image_hashes(s)
    elapsed = time.perf_counter() - start
    assert len(np.unique(h)) == 60000
    assert elapsed < 1.5, f"image_hashes took {elapsed:.2f} s for 60,000 28x28 images"   # ~0.15 s unloaded


# ---------------------------------------------------------------- the guard

def test_count_overlap():
    fit, test = random_images(100, seed=1), random_images(30, seed=2)
    test[[0, 5, 9]] = fit[[10, 20, 30]]
    assert count_overlap(data.ImageSet(fit), data.ImageSet(test)) == 3
    assert count_overlap(data.ImageSet(fit), data.ImageSet(random_images(30, seed=3))) == 0
    assert count_overlap(data.ImageSet(fit), data.ImageSet(fit[:10, :, :4])) == 0       # another shape


def test_check_overlap_raises_at_one_percent_or_more():
    fit = random_images(1000, seed=4)
    test = torch.cat([fit[:270], random_images(30, seed=5)])
    with pytest.raises(OODBenchError) as e:
        check_overlap(data.ImageSet(fit, name="mine[train]"), data.ImageSet(test, name="mine"))
    message = str(e.value)
    assert "\n" not in message and message.startswith("270 of 300 in-distribution test images")
    assert "'mine[train]'" in message and "npz file with train/test keys" in message
    assert "train/ and test/ subfolders" in message and "--fit-data SPEC" in message and "fit=" in message
    exactly = torch.cat([fit[:3], random_images(297, seed=6)])                  # 1% exactly
    with pytest.raises(OODBenchError, match="3 of 300"):
        check_overlap(data.ImageSet(fit), data.ImageSet(exactly), "fit", "test")


def test_check_overlap_warns_once_below_one_percent_and_is_silent_at_zero():
    fit = random_images(1000, seed=7)
    test = data.ImageSet(torch.cat([fit[:2], random_images(298, seed=8)]))
    lines = []
    assert check_overlap(data.ImageSet(fit), test, "fit set", "test set", warn=lines.append) == 2
    assert check_overlap(data.ImageSet(fit), test, "fit set", "test set", warn=lines.append) == 2
    assert len(lines) == 1 and "2 of 300 in-distribution test images" in lines[0] and "\n" not in lines[0]
    clean = data.ImageSet(random_images(300, seed=9))
    assert check_overlap(data.ImageSet(fit), clean, warn=lines.append) == 0 and len(lines) == 1


def test_check_overlap_warns_on_stderr_by_default(capsys):
    fit = random_images(500, seed=10)
    test = data.ImageSet(torch.cat([fit[:1], random_images(199, seed=11)]))
    check_overlap(data.ImageSet(fit), test)
    check_overlap(data.ImageSet(fit), test)
    assert capsys.readouterr().err.count("1 of 200 in-distribution test images") == 1


# ---------------------------------------------------------------- explicit splits: npz

def test_npz_split_loads_each_half(tmp_path):
    train, test = random_images(8, (3, 4, 4), seed=12), random_images(5, (3, 4, 4), seed=13)
    path = tmp_path / "split.npz"
    np.savez(path, train=train.permute(0, 2, 3, 1).numpy(), test=test.numpy(),
             train_labels=np.arange(8) % 2, test_labels=np.arange(5) % 3)
    a, b = data.load(f"npz:{path}", split="train"), data.load(f"npz:{path}", split="test")
    assert torch.equal(a.images, train) and a.labels.tolist() == [0, 1] * 4
    assert torch.equal(b.images, test) and b.labels.tolist() == [0, 1, 2, 0, 1]
    assert count_overlap(a, b) == 0 and data.load(f"npz:{path}").fingerprint == b.fingerprint
    assert torch.equal(as_imageset(f"npz:{path}", split="train").images, train)
    with pytest.raises(OODBenchError, match="no 'val' split"):
        data.load(f"npz:{path}", split="val")
    unlabelled = tmp_path / "unlabelled.npz"
    np.savez(unlabelled, train=train.numpy(), test=test.numpy())
    assert data.load(f"npz:{unlabelled}", split="train").labels is None


def test_npz_with_images_gives_them_for_both_splits(tmp_path):
    x = random_images(6, seed=14)
    path = tmp_path / "whole.npz"
    np.savez(path, images=x.numpy())
    assert torch.equal(data.load(f"npz:{path}", split="train").images, data.load(f"npz:{path}").images)
    with pytest.raises(OODBenchError, match="6 of 6 in-distribution test images"):
        check_overlap(data.load(f"npz:{path}", split="train"), data.load(f"npz:{path}"))


@pytest.mark.parametrize("arrays,message", [
    (dict(train=np.zeros((2, 4, 4), np.uint8)), r"has a 'train' array but no 'test' array \(found: train\)"),
    (dict(test=np.zeros((2, 4, 4), np.uint8), test_labels=np.zeros(2, np.int64)),
     r"no 'train' array \(found: test, test_labels\)"),
    (dict(images=np.zeros((2, 4, 4), np.uint8), train=np.zeros((2, 4, 4), np.uint8)), "keep either images"),
    (dict(train=np.zeros((2, 4, 4), np.uint8), test=np.zeros((2, 4, 4), np.uint8), labels=np.zeros(2, np.int64)),
     "name the labels train_labels and test_labels"),
    (dict(train=np.zeros((2, 4, 4), np.uint8), test=np.zeros((2, 4, 4), np.float32)),
     "'test' is float32, must be uint8"),
    (dict(train=np.zeros((2, 4, 4, 4), np.uint8), test=np.zeros((2, 4, 4), np.uint8)), "'train' has shape"),
    (dict(train=np.zeros((2, 4, 4), np.uint8), test=np.zeros((2, 4, 4), np.uint8), test_labels=np.zeros(3, int)),
     "'test_labels' must be 2 non-negative integers"),
    (dict(pixels=np.zeros((2, 4, 4), np.uint8)), "no 'images' array nor 'train' and 'test' arrays"),
])
def test_bad_split_npz(tmp_path, arrays, message):
    path = tmp_path / "bad.npz"
    np.savez(path, **arrays)
    with pytest.raises(OODBenchError, match=message):
        data.load(f"npz:{path}", split="test")


def test_half_a_split_is_refused_by_check_spec(tmp_path):
    path = tmp_path / "half.npz"
    np.savez(path, train=np.zeros((2, 4, 4), np.uint8))
    with pytest.raises(OODBenchError, match="no 'test' array"):
        data.check_spec(f"npz:{path}")


# ---------------------------------------------------------------- explicit splits: folders

@pytest.fixture
def split_folder(tmp_path):
    root = tmp_path / "mine"
    train = {"cat": random_images(3, (3, 6, 6), seed=15), "dog": random_images(2, (3, 6, 6), seed=16)}
    test = {"dog": random_images(2, (3, 6, 6), seed=17), "eel": random_images(1, (3, 6, 6), seed=18)}
    for split, classes in (("train", train), ("test", test)):
        for name, images in classes.items():
            save_pngs(root / split / name, images)
    (root / "README.txt").write_text("other things may sit next to train/ and test/")
    save_pngs(root / "extra", random_images(1, (3, 6, 6), seed=19))
    return root, train, test


@pytest.mark.parametrize("stream", [False, True])
def test_folder_split_loads_each_half(split_folder, stream):
    root, train, test = split_folder
    a = data.load(f"folder:{root}", split="train", stream=stream)
    b = data.load(f"folder:{root}", split="test", stream=stream)
    assert isinstance(b, StreamedImageSet) == stream
    assert len(a) == 5 and len(b) == 3
    images_a = torch.cat([x for x, _ in a.batches(4)])
    images_b = torch.cat([x for x, _ in b.batches(4)])
    assert torch.equal(images_a, torch.cat([train["cat"], train["dog"]]))
    assert torch.equal(images_b, torch.cat([test["dog"], test["eel"]]))
    # classes are numbered over both halves: cat 0, dog 1, eel 2 (dog is 1 in both)
    assert a.labels.tolist() == [0, 0, 0, 1, 1] and b.labels.tolist() == [1, 1, 2]
    assert count_overlap(a, b) == 0
    with pytest.raises(OODBenchError, match="no 'val' sub-folder; load it with split='train' or split='test'"):
        data.load(f"folder:{root}", split="val", stream=stream)


def test_folder_without_split_is_read_whole(tmp_path):
    x = random_images(4, (3, 6, 6), seed=20)
    save_pngs(tmp_path / "plain" / "train", x)      # a train/ without test/ is just a class folder
    for split in ("train", "test"):
        s = data.load(f"folder:{tmp_path / 'plain'}", split=split)
        assert torch.equal(s.images, x)


# ---------------------------------------------------------------- has_split

def test_has_split(tmp_path, split_folder):
    root, _, _ = split_folder
    whole, halves = tmp_path / "whole.npz", tmp_path / "halves.npz"
    np.savez(whole, images=np.zeros((2, 4, 4), np.uint8))
    np.savez(halves, train=np.zeros((2, 4, 4), np.uint8), test=np.zeros((1, 4, 4), np.uint8))
    (tmp_path / "flat").mkdir()
    answers = {
        "fashion_mnist": True, "cifar10": True, "svhn": True, "digits": True, "imagenet": True, "openimage_o": True,
        "ssb_hard": False, "lsun": False, "textures": False,
        "noise:gaussian": True, "constant:10": True, "glyphs": True,
        f"npz:{whole}": False, f"npz:{halves}": True, f"folder:{root}": True, f"folder:{tmp_path / 'flat'}": False,
        f"vflip:npz:{halves}": True, f"gray:npz:{whole}": False, "classes:0,1:cifar10": True,
        "resize:bicubic:lsun": False, "mnistlike:digits": True,
    }
    assert {spec: has_split(spec) for spec in answers} == answers
    with pytest.raises(OODBenchError, match="unknown dataset"):
        has_split("cifar11")
