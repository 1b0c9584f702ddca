"""as_imageset: every accepted input gives the pixels and labels of the equivalent uint8 tensor; bad inputs are
one-line OODBenchErrors; Datasets and DataLoaders are streamed (LoaderSet), never read whole."""
import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, IterableDataset, TensorDataset

from oodbench import data
from oodbench.data import LoaderSet, as_imageset, convert
from oodbench.data.stream import StreamedImageSet
from oodbench.errors import OODBenchError

N, C, H, W = 10, 3, 5, 7


@pytest.fixture(autouse=True)
def offline(monkeypatch, tmp_path):
    monkeypatch.setenv("OODBENCH_DATA", str(tmp_path / "data_root"))
    monkeypatch.setenv("OODBENCH_DOWNLOAD", "0")
    monkeypatch.setenv("OODBENCH_WORKERS", "0")


@pytest.fixture
def x():
    return torch.from_numpy(np.random.default_rng(0).integers(0, 256, (N, C, H, W), dtype=np.uint8))


@pytest.fixture
def y():
    return torch.arange(N) % 4


def pixels_and_labels(s):
    """(uint8 images, labels) of any set, read through its batches as a scorer would."""
    parts = list(s.batches(3))
    images = torch.cat([b for b, _ in parts])
    labels = None if parts[0][1] is None else torch.cat([lab for _, lab in parts])
    return images, labels


class Items(Dataset):
    """items from a function of the index; counts reads."""

    def __init__(self, n, make):
        self.n, self.make, self.reads = n, make, 0

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        if not 0 <= i < self.n:
            raise IndexError(i)
        self.reads += 1
        return self.make(i)


# ---------------------------------------------------------------- same pixels and labels, whatever the input

def inputs(x, y):
    xf = x.float() / 255
    hwc = x.permute(0, 2, 3, 1)
    return {
        "uint8 tensor + labels": lambda: as_imageset(x, labels=y),
        "(images, labels) tuple": lambda: as_imageset((x, y)),
        "numpy NCHW + list labels": lambda: as_imageset(x.numpy(), labels=y.tolist()),
        "numpy NHWC + numpy labels": lambda: as_imageset(hwc.numpy().copy(), labels=y.numpy()),
        "tensor NHWC": lambda: as_imageset(hwc, labels=y),
        "float32 k/255": lambda: as_imageset(xf, labels=y),
        "float64 numpy NHWC": lambda: as_imageset((hwc.numpy() / 255.0), labels=y.numpy()),
        "read-only numpy": lambda: as_imageset(_readonly(x.numpy()), labels=y),
        "TensorDataset of floats": lambda: as_imageset(TensorDataset(xf, y), batch_size=4),
        "Dataset of HWC numpy + numpy ints": lambda: as_imageset(
            Items(N, lambda i: (hwc[i].numpy(), np.int64(y[i]), "extra")), batch_size=4),
        "Dataset of PIL images": lambda: as_imageset(
            Items(N, lambda i: (Image.fromarray(hwc[i].numpy(), "RGB"), int(y[i]))), batch_size=3),
        "Dataset of 0-d label tensors": lambda: as_imageset(Items(N, lambda i: (x[i], y[i])), batch_size=16),
        "DataLoader of floats": lambda: as_imageset(DataLoader(TensorDataset(xf, y), batch_size=4)),
        "DataLoader of NHWC uint8": lambda: as_imageset(DataLoader(TensorDataset(hwc, y), batch_size=6)),
        "DataLoader without batching": lambda: as_imageset(DataLoader(TensorDataset(x, y), batch_size=None)),
        "ImageSet": lambda: as_imageset(data.ImageSet(x, y)),
    }


def _readonly(a):
    a = a.copy()
    a.setflags(write=False)
    return a


@pytest.mark.parametrize("kind", list(inputs(torch.zeros(1, 1, 1, 1), None)))
def test_every_input_gives_the_same_pixels_and_labels(kind, x, y):
    s = inputs(x, y)[kind]()
    images, labels = pixels_and_labels(s)
    assert len(s) == N and s.shape == (C, H, W) and images.dtype == torch.uint8
    assert torch.equal(images, x) and torch.equal(labels, y)
    assert torch.equal(s.labels.cpu(), y)
    assert s.fingerprint


def test_one_channel_layouts(x):
    g = x[:, :1]
    for given in (g[:, 0], g[:, 0].numpy(), g.permute(0, 2, 3, 1), g.float() / 255):
        s = as_imageset(given)
        assert s.shape == (1, H, W) and torch.equal(s.images, g) and s.labels is None
    ds = as_imageset(Items(N, lambda i: g[i, 0].numpy()))            # (H, W) items, no labels
    assert ds.labels is None and torch.equal(pixels_and_labels(ds)[0], g)
    pil = as_imageset(Items(N, lambda i: Image.fromarray(g[i, 0].numpy(), "L")))
    assert pil.shape == (1, H, W) and torch.equal(pixels_and_labels(pil)[0], g)


def test_float_round_trip_is_exact_for_every_level():
    levels = torch.arange(256, dtype=torch.uint8).reshape(1, 1, 16, 16)
    for dtype in (torch.float32, torch.float64):
        assert torch.equal(as_imageset(levels.to(dtype) / 255).images, levels)


def test_a_set_is_returned_as_is_unless_asked(x, y):
    s = data.ImageSet(x, y, "mine")
    assert as_imageset(s) is s
    renamed = as_imageset(s, name="other")
    assert renamed.name == "other" and renamed.fingerprint == s.fingerprint and torch.equal(renamed.images, x)
    converted = as_imageset(s, like=(1, 10, 14))
    expected, _ = convert.convert_like(x, (1, 10, 14))
    assert converted.shape == (1, 10, 14) and torch.equal(converted.images, expected)
    loader = as_imageset(TensorDataset(x, y))
    assert as_imageset(loader) is loader


def test_tensor_input_is_copied(x):
    given = x.clone()
    s = as_imageset(given)
    given.zero_()
    assert torch.equal(s.images, x)


def test_like_converts_tensors_and_loaders_alike(x, y):
    expected, _ = convert.convert_like(x, (1, 8, 8))
    assert torch.equal(as_imageset(x, like=(1, 8, 8)).images, expected)
    s = as_imageset(TensorDataset(x, y), like=(1, 8, 8))
    assert s.shape == (1, 8, 8) and torch.equal(pixels_and_labels(s)[0], expected)


def test_spec_strings_load_through_the_registry(tmp_path, x, y):
    path = tmp_path / "set.npz"
    np.savez(path, images=x.numpy(), labels=y.numpy())
    s = as_imageset(f"npz:{path}", name="mine")
    assert s.name == "mine" and torch.equal(s.images, x) and torch.equal(s.labels, y)
    assert s.fingerprint == data.load(f"npz:{path}").fingerprint


# ---------------------------------------------------------------- bad input

@pytest.mark.parametrize("make,message", [
    (lambda x, y: as_imageset(x.long()), r"uint8 0\.\.255 or floats in \[0, 1\], got torch.int64"),
    (lambda x, y: as_imageset(x.numpy().astype(np.int32)), "got int32"),
    (lambda x, y: as_imageset(x.bool()), "got torch.bool"),
    (lambda x, y: as_imageset(x[None]), r"expected \(N, C, H, W\), \(N, H, W, C\) or \(N, H, W\)"),
    (lambda x, y: as_imageset(x[0, 0]), r"shape \(5, 7\); expected \(N, C, H, W\)"),
    (lambda x, y: as_imageset(torch.zeros(2, 4, 5, 5, dtype=torch.uint8)), r"shape \(2, 4, 5, 5\)"),
    (lambda x, y: as_imageset(x[:0]), "holds no images"),
    (lambda x, y: as_imageset(x.float()), r"floats in \[0, 1\] before normalisation .*got torch.float32 values in "
                                          r"\[0, 255\]"),
    (lambda x, y: as_imageset((x.float() / 255 - 0.5) / 0.25), r"before normalisation.*\[-2, 2\]"),
    (lambda x, y: as_imageset(torch.full((1, 1, 2, 2), float("nan"))), "before normalisation"),
    (lambda x, y: as_imageset(x, labels=y[:3]), "labels must be 10 integers, one per image, got shape .3,."),
    (lambda x, y: as_imageset(x, labels=y.float()), "labels must be integers"),
    (lambda x, y: as_imageset(x, labels=[0.5] * N), "labels must be integers"),
    (lambda x, y: as_imageset(x, labels=y - 1), "non-negative"),
    (lambda x, y: as_imageset(x, labels="abc"), "labels must be a tensor, array or list"),
    (lambda x, y: as_imageset((x, y), labels=y), "labels given twice"),
    (lambda x, y: as_imageset({"images": x}), "cannot use a builtins.dict as images; give a dataset spec string"),
    (lambda x, y: as_imageset([x, x, x]), "torch.utils.data.DataLoader"),
    (lambda x, y: as_imageset(TensorDataset(x), labels=y), "labels= applies to image tensors and arrays only"),
    (lambda x, y: as_imageset(x, batch_size=0), "batch_size must be a positive integer"),
    (lambda x, y: as_imageset(x, like=(2, 4, 4)), "like must be"),
    (lambda x, y: as_imageset(DataLoader(TensorDataset(x, y), shuffle=True)), "shuffle=False"),
    (lambda x, y: as_imageset(DataLoader(TensorDataset(x, y), batch_size=4, drop_last=True)), "drop_last=False"),
    (lambda x, y: as_imageset(TensorDataset(x[:0])), "empty"),
    (lambda x, y: as_imageset(Items(N, lambda i: (x[i], "cat"))), "integer class label"),
    (lambda x, y: as_imageset(Items(N, lambda i: {"image": x[i]})), "must be a tensor, a numpy array or a PIL"),
    (lambda x, y: as_imageset(Items(N, lambda i: x[i, :2])), r"an image has shape \(2, 5, 7\)"),
])
def test_bad_input_is_a_one_line_error(make, message, x, y):
    with pytest.raises(OODBenchError, match=message) as e:
        make(x, y)
    assert "\n" not in str(e.value)


def test_a_normalised_dataset_is_refused_after_one_item(x):
    ds = Items(N, lambda i: (x[i].float() / 255 - 0.5) / 0.5)
    with pytest.raises(OODBenchError, match=r"before normalisation \(the model's wrapper normalises them\)"):
        as_imageset(ds)
    assert ds.reads == 1


def test_mixed_shapes_in_a_dataset_are_an_error(x):
    ds = Items(N, lambda i: x[i] if i < 5 else x[i, :, :4])
    s = as_imageset(ds, batch_size=4)
    with pytest.raises(OODBenchError, match="same shape"):
        list(s.batches(4))


# ---------------------------------------------------------------- LoaderSet: streamed, never whole

def test_a_dataset_is_read_one_batch_at_a_time(x, y):
    ds = Items(1000, lambda i: (x[i % N], i % 7))
    s = as_imageset(ds, batch_size=16)
    assert isinstance(s, LoaderSet) and len(s) == 1000 and s.name == "Items"
    assert ds.reads == 1                                 # the probe: type, layout and range checked up front
    first, labels = next(iter(s.batches(16)))
    assert first.shape == (16, C, H, W) and labels.tolist() == [i % 7 for i in range(16)]
    assert ds.reads == 1 + 16
    ds.reads = 0
    head = s.head(5)
    assert len(head) == 5 and sum(len(b) for b, _ in head.batches(16)) == 5 and ds.reads == 5
    with pytest.raises(OODBenchError, match="never held in memory"):
        s.images


def test_a_dataloader_is_read_one_batch_at_a_time(x):
    ds = Items(1000, lambda i: x[i % N])
    s = as_imageset(DataLoader(ds, batch_size=10))
    assert ds.reads == 10 and s.labels is None and s.name == "Items"     # the probe: one batch, no labels
    ds.reads = 0
    batches = s.batches(4)                               # re-cut to the size asked for
    assert [len(next(batches)[0]) for _ in range(3)] == [4, 4, 4] and ds.reads == 20


def test_labels_come_from_one_pass_or_from_a_full_batches_pass(x):
    ds = Items(20, lambda i: (x[i % N], i % 3))
    s = as_imageset(ds, batch_size=8)
    assert s.labelled and ds.reads == 1
    assert s.labels.tolist() == [i % 3 for i in range(20)] and ds.reads == 21     # one pass
    s.fingerprint
    assert ds.reads == 21                                # the same pass gave the hashes
    t = as_imageset(Items(20, lambda i: (x[i % N], i % 3)), batch_size=8)
    list(t.batches(5))
    reads = t.dataset.reads
    assert torch.equal(t.labels, s.labels) and t.all_labels() is t.labels and t.dataset.reads == reads
    assert t.num_classes == 3
    unlabelled = Items(20, lambda i: x[i % N])
    assert as_imageset(unlabelled).labels is None and unlabelled.reads == 1


def test_loader_fingerprint_follows_the_content(x, y):
    a = as_imageset(TensorDataset(x, y))
    b = as_imageset(DataLoader(TensorDataset(x.float() / 255, y), batch_size=3))
    c = as_imageset(TensorDataset(x.flip(-1), y))
    assert a.fingerprint == b.fingerprint != c.fingerprint
    assert as_imageset(TensorDataset(x, y + 1)).fingerprint != a.fingerprint
    moved = a.to("cpu")
    assert moved.fingerprint == a.fingerprint and moved._state is a._state


def test_iterable_dataset_is_counted_by_one_pass(x):
    class Stream(IterableDataset):
        def __iter__(self):
            return iter([(x[i], 1) for i in range(N)])

    s = as_imageset(Stream(), batch_size=4)
    assert len(s) == N and s.labels.tolist() == [1] * N
    assert torch.equal(pixels_and_labels(s)[0], x) and len(s.head(3)) == 3
    with pytest.raises(OODBenchError, match="IterableDataset"):
        s.subset(slice(0, 2))


def test_subset_and_materialize(x, y):
    s = as_imageset(DataLoader(TensorDataset(x, y), batch_size=4))
    sub = s.subset(torch.tensor([1, 3, 8]))
    images, labels = pixels_and_labels(sub)
    assert torch.equal(images, x[[1, 3, 8]]) and labels.tolist() == y[[1, 3, 8]].tolist()
    whole = s.materialize()
    assert isinstance(whole, data.ImageSet) and torch.equal(whole.images, x) and torch.equal(whole.labels, y)


def test_streamed_sets_pass_through(tmp_path, monkeypatch, x):
    folder = tmp_path / "pngs"
    folder.mkdir()
    for i in range(4):
        Image.fromarray(x[i].permute(1, 2, 0).numpy(), "RGB").save(folder / f"{i}.png")
    s = data.load(f"folder:{folder}", stream=True)
    assert isinstance(s, StreamedImageSet) and as_imageset(s) is s
    renamed = as_imageset(s, name="pngs")
    assert isinstance(renamed, StreamedImageSet) and renamed.name == "pngs" and renamed.fingerprint == s.fingerprint
    small = as_imageset(s, like=(1, 4, 4))
    assert small.shape == (1, 4, 4) and next(iter(small.batches(4)))[0].shape == (4, 1, 4, 4)
