"""Streamed image folders: the same pixels and scores as in memory, bounded memory, corrupt files reported, a
class-balanced --fit-limit, and the OpenOOD image-list sets."""
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from oodbench import data
from oodbench import workflow as runs
from oodbench.data.stream import StreamedImageSet
from oodbench.errors import OODBenchError


def make_folder(root: Path, per_class: int, classes=3, seed=0) -> Path:
    rng = np.random.RandomState(seed)
    for c in range(classes):
        (root / f"class{c}").mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            h, w = (40, 52) if i % 2 else (48, 48)
            base = rng.randint(0, 256, (1, 1, 3)) * (c + 1) // classes
            pixels = np.clip(base + rng.randint(-30, 31, (h, w, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(root / f"class{c}" / f"{i:04d}.jpg", quality=90)
    return root


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return make_folder(tmp_path_factory.mktemp("jpegs") / "set", per_class=70)


@pytest.fixture(scope="module")
def split_folder(tmp_path_factory):
    """An ID set with its own train/ and test/ halves (test/ holds the same images as `folder`): fitting and
    testing on one folder without a split is refused by the overlap guard (docs/data.md)."""
    root = tmp_path_factory.mktemp("jpegs_split") / "set"
    make_folder(root / "train", per_class=40, seed=1)
    make_folder(root / "test", per_class=70, seed=0)
    return root


def all_images(imageset):
    return torch.cat([x for x, _ in imageset.batches(37)])


@pytest.mark.parametrize("decode", [dict(), dict(like=(3, 32, 32)), dict(decode_to=(3, 32, 32), crop_resize=36)])
def test_streamed_and_in_memory_give_the_same_pixels_and_labels(folder, decode):
    streamed = data.load(f"folder:{folder}", stream=True, **decode)
    whole = data.load(f"folder:{folder}", stream=False, **decode)
    assert isinstance(streamed, StreamedImageSet) and not isinstance(whole, StreamedImageSet)
    assert len(streamed) == len(whole) == 210 and streamed.shape == whole.shape
    assert torch.equal(all_images(streamed), whole.images)
    assert torch.equal(streamed.labels, whole.labels) and set(whole.labels.tolist()) == {0, 1, 2}
    assert torch.equal(all_images(streamed.head(50)), whole.images[:50])
    with pytest.raises(OODBenchError, match="streamed"):
        streamed.images


def test_the_crop_recipe_is_torchvisions_on_pil_images(folder):
    from torchvision.transforms import v2

    streamed = data.load(f"folder:{folder}", stream=True, decode_to=(3, 32, 32), crop_resize=36)
    recipe = v2.Compose([v2.Resize(36), v2.CenterCrop(32), v2.PILToTensor()])
    path = sorted(folder.rglob("*.jpg"))[1]
    with Image.open(path) as im:
        expected = recipe(im.convert("RGB"))
    assert torch.equal(all_images(streamed)[1], expected)


def test_auto_streams_above_the_threshold_and_fingerprint_follows_the_files(folder, tmp_path, monkeypatch):
    assert not isinstance(data.load(f"folder:{folder}"), StreamedImageSet)        # 210 small images: in memory
    monkeypatch.setenv("OODBENCH_STREAM_ABOVE_MB", "0.5")
    copy = make_folder(tmp_path / "copy", per_class=70)
    streamed = data.load(f"folder:{copy}")
    assert isinstance(streamed, StreamedImageSet)
    before = streamed.fingerprint
    assert data.load(f"folder:{copy}").fingerprint == before                        # stable
    victim = sorted(copy.rglob("*.jpg"))[5]
    Image.new("RGB", (48, 48), (9, 9, 9)).save(victim, quality=90)
    assert data.load(f"folder:{copy}").fingerprint != before                        # a replaced file is seen
    with pytest.raises(OODBenchError, match="data.stream must be"):
        data.load(f"folder:{copy}", stream="sometimes")


def test_a_corrupt_jpeg_is_reported_by_name(tmp_path):
    bad_folder = make_folder(tmp_path / "bad", per_class=5)
    bad = sorted(bad_folder.rglob("*.jpg"))[3]
    bad.write_bytes(b"\xff\xd8\xff not really a jpeg")
    streamed = data.load(f"folder:{bad_folder}", stream=True, like=(3, 16, 16))
    with pytest.raises(OODBenchError, match=f"1 corrupt or unreadable image file.*{bad.name}"):
        list(streamed.batches(4))
    with pytest.raises(OODBenchError, match=bad.name):
        data.load(f"folder:{bad_folder}", stream=False, like=(3, 16, 16))


def test_scores_streamed_equal_in_memory_through_a_model_run(split_folder, tmp_path, monkeypatch):
    import oodbench

    folder = split_folder   # fitted on its train/ half, its test/ half scored

    model = oodbench.load_model("torchvision:resnet18:none")
    rows = {}
    for mode, threshold in (("memory", "100000"), ("streamed", "0")):
        monkeypatch.setenv("OODBENCH_STREAM_ABOVE_MB", threshold)
        run = runs.ModelRun(model, f"folder:{folder}", fit_limit=90, runs_dir=tmp_path / mode)
        if mode == "streamed":
            assert isinstance(run.load_set(f"folder:{folder}"), StreamedImageSet)
        rows[mode] = runs.evaluate(run, ["msp", "knn", "vim"], ["noise:gaussian"], limit=120, device="cpu",
                                   overrides=["knn.k=5"])
        scores = {m: np.load(run.path / "scores" / m / f"{runs.safe_name(f'folder:{folder}')}.npz")[m]
                  for m in ("msp", "knn", "vim")}
        rows[mode + "_scores"] = scores
    for m in ("msp", "knn", "vim"):
        np.testing.assert_allclose(rows["memory_scores"][m], rows["streamed_scores"][m], rtol=1e-5, atol=1e-6)
    assert [r["auroc"] for r in rows["memory"]] == pytest.approx([r["auroc"] for r in rows["streamed"]], abs=1e-9)


PEAK = """
import resource, sys
import torch
from oodbench import data
s = data.load("folder:" + sys.argv[1], stream=True, like=(3, 64, 64))
total = 0
for x, _ in s.batches(32):
    total += int(x.float().mean() > -1)
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, total)
"""


def test_peak_memory_does_not_grow_with_the_set(tmp_path):
    small = make_folder(tmp_path / "small", per_class=40)
    large = make_folder(tmp_path / "large", per_class=160, seed=1)
    env = {"OODBENCH_WORKERS": "0", "PATH": "/usr/bin:/bin"}
    peaks = {}
    for name, f in (("small", small), ("large", large)):
        out = subprocess.run([sys.executable, "-c", PEAK, str(f)], capture_output=True, text=True, env={
            **env, "PYTHONPATH": str(Path(__file__).parent.parent)}, check=True).stdout.split()
        peaks[name] = int(out[0])
    # 4x the images (64x64x3 uint8: 4.7 MB more in memory) must not raise the peak by more than a few MB
    assert peaks["large"] - peaks["small"] < 20_000, peaks      # KiB


def test_fit_limit_samples_per_class():
    from oodbench.data.split import per_class_sample

    labels = torch.tensor([0] * 50 + [1] * 30 + [2] * 20)
    imageset = data.ImageSet(torch.zeros(100, 1, 2, 2, dtype=torch.uint8), labels, "toy")
    sample = per_class_sample(imageset, 30, seed=0)
    assert torch.bincount(sample.labels).tolist() == [10, 10, 10]
    assert per_class_sample(imageset, 30, seed=0).fingerprint == sample.fingerprint        # seeded
    assert per_class_sample(imageset, 70, seed=0).labels.bincount().tolist() == [25, 25, 20]
    assert per_class_sample(imageset, 200, seed=0) is imageset


def write_openood(root: Path) -> None:
    """A miniature OpenOOD data folder: image lists + images for imagenet and ssb_hard."""
    images = root / "images_largescale"
    lists = root / "benchmark_imglist" / "imagenet"
    lists.mkdir(parents=True)
    for name, split, n, labelled in (("imagenet_1k/train", "train_imagenet", 12, True),
                                     ("imagenet_1k/val", "test_imagenet", 6, True),
                                     ("ssb_hard", "test_ssb_hard", 5, False)):
        (images / name).mkdir(parents=True)
        lines = []
        for i in range(n):
            Image.new("RGB", (30 + i, 24), (10 * i, 80, 160)).save(images / name / f"{i}.jpg")
            lines.append(f"{name}/{i}.jpg {i % 3 if labelled else -1}")
        (lists / f"{split}.txt").write_text("\n".join(lines) + "\n")


def test_openood_image_lists_stream_from_the_data_root(tmp_path):
    write_openood(tmp_path)
    test = data.load("imagenet", root=tmp_path, like=(3, 16, 16))
    assert isinstance(test, StreamedImageSet) and len(test) == 6 and test.labels.tolist() == [0, 1, 2, 0, 1, 2]
    assert all_images(test).shape == (6, 3, 16, 16)
    ood = data.load("ssb_hard", root=tmp_path, like=(3, 16, 16))
    assert ood.labels is None and len(ood) == 5
    assert len(data.load("imagenet", split="train", root=tmp_path, like=(3, 16, 16))) == 12
    with pytest.raises(OODBenchError, match="no 'train' split"):
        data.load("ssb_hard", split="train", root=tmp_path)
    with pytest.raises(OODBenchError, match="ninco.*not found.*benchmark_imglist"):
        data.load("ninco", root=tmp_path)
    names = {row["name"]: row for row in data.dataset_status(tmp_path)}
    assert names["imagenet"]["found"] and not names["ninco"]["found"] and "download.py" in names["ninco"]["how_to_get"]


def test_imagenet_protocol_validates_and_names_missing_sets_offline(tmp_path, capsys, monkeypatch):
    from oodbench import bench

    grid = bench.load_bench("imagenet")
    assert grid.ins == ["imagenet"] and {"ssb_hard", "ninco", "inaturalist", "imagenet_textures",
                                         "openimage_o"} <= set(grid.outs)
    models = {e.model for e in grid.entries}
    assert models == {"torchvision:resnet50:IMAGENET1K_V1", "open_clip:ViT-B-16:openai"}
    clip = [e for e in grid.entries if e.model.startswith("open_clip:")]
    assert {e.method for e in clip} >= {"mcm", "glmcm"} and all(not e.tune for e in clip if e.method in ("mcm", "glmcm"))
    # OpenOOD's parameter search: tuned on OpenImage-O's validation list (our openimage_o train split)
    for name in ("imagenet", "imagenet200"):
        entries = [e for e in bench.load_bench(name).entries if not e.model.startswith("open_clip:")]
        assert entries and all(e.tune and "tune.val_ood=openimage_o" in e.score_overrides for e in entries)
    assert bench.load_bench("imagenet200").ins == ["imagenet200"]
    monkeypatch.setenv("OODBENCH_DOWNLOAD", "0")
    from oodbench.cli import main

    assert main(["bench", "imagenet", "--data-root", str(tmp_path), "--runs-dir", str(tmp_path / "runs"),
                 "--out", str(tmp_path / "report")]) == 0
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("oodbench: not available")]
    for name in ("imagenet", "ssb_hard", "ninco", "inaturalist", "imagenet_textures", "openimage_o"):
        line = next(line for line in lines if line.startswith(f"oodbench: not available, skipped: {name}: "))
        assert str(tmp_path / "benchmark_imglist") in line and ("download.py" in line or "image-net.org" in line)


def test_reference_features_can_be_cached_in_float16(tmp_path):
    import shutil

    folder = tmp_path / "classifier-fashion_mnist-s0"
    shutil.copytree(Path(__file__).parent / "fixtures" / "tiny_run", folder)
    run = runs.Run(folder)
    from oodbench.workflow import fitting

    full, half = (fitting.reference(run, s.det, s.cfg) for s in
                  (run.prepare("knn", device="cpu"), run.prepare("knn", ["features.float16=true"], device="cpu")))
    with np.load(folder / "cache" / "train_outputs.npz") as f:
        assert f["features"].dtype == np.float16 and half["labels"].dtype == torch.int64
    assert half["features"].dtype == torch.float32
    torch.testing.assert_close(half["features"], full["features"], rtol=1e-3, atol=1e-3)


def test_set_data_stream_at_eval_time_streams_the_sets_it_scores(folder, tmp_path, monkeypatch):
    import oodbench

    streamed = []
    real = StreamedImageSet.batches
    monkeypatch.setattr(StreamedImageSet, "batches", lambda self, n: streamed.append(self.name) or real(self, n))
    run = runs.ModelRun(oodbench.load_model("torchvision:resnet18:none"), "digits", fit_limit=30,
                        runs_dir=tmp_path)
    runs.evaluate(run, ["msp"], [f"folder:{folder}"], limit=20, device="cpu")
    assert streamed == []                                                   # small: in memory
    runs.evaluate(run, ["energy"], [f"folder:{folder}"], limit=20, device="cpu", overrides=["data.stream=true"])
    assert streamed == [f"folder:{folder}[:20]"]


def test_a_bad_data_stream_value_is_a_one_line_error_before_any_work(tmp_path, capsys):
    from oodbench.cli import main

    code = main(["eval", "--model", "torchvision:resnet18:none", "--in", "digits", "--out", "noise:gaussian",
                 "--method", "msp", "--fit-limit", "30", "--set", "data.stream=maybe",
                 "--runs-dir", str(tmp_path / "runs")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err == "oodbench: error: data.stream must be auto, true or false, got 'maybe'"
    assert not (tmp_path / "runs").exists()


# -- decoding on the device (data.decode): the torchvision.io path, run here on the CPU ---------------------------
def on_device(streamed: StreamedImageSet) -> StreamedImageSet:
    """The same set decoded by torchvision.io on its own device (what data.decode=gpu does on CUDA)."""
    return StreamedImageSet(streamed.paths, streamed.labels, streamed.name, streamed.channels, streamed.size,
                            crop_resize=streamed.crop_resize, root=streamed.root, decode="torchvision")


@pytest.mark.parametrize("decode", [dict(), dict(like=(3, 32, 32)), dict(decode_to=(3, 32, 32), crop_resize=36),
                                    dict(like=(1, 24, 24))])
def test_decoding_on_the_device_gives_the_weights_transforms_on_tensors(folder, decode):
    from torchvision.io import ImageReadMode, decode_image
    from torchvision.transforms.v2 import functional as F

    pil = data.load(f"folder:{folder}", stream=True, **decode)
    tv = on_device(pil)
    got, ref = all_images(tv), all_images(pil)
    assert got.shape == ref.shape and got.dtype == torch.uint8 and torch.equal(tv.labels, pil.labels)
    # the pixels are torchvision's tensor decode + transforms, file by file
    mode = ImageReadMode.GRAY if pil.channels == 1 else ImageReadMode.RGB
    for k in (0, 1, 77):
        image = decode_image(pil.paths[k], mode=mode)
        if pil.crop_resize:
            image = F.center_crop(F.resize(image, [36], antialias=True), [32, 32])
        elif tuple(image.shape[-2:]) != pil.size:
            image = F.resize(image, list(pil.size), antialias=True)
        assert torch.equal(got[k], image)
    # and PIL's within rounding (same libjpeg; resize and luminance round differently)
    assert (got.float() - ref.float()).abs().mean() < 1.5
    assert tv.fingerprint != pil.fingerprint                # different pixels, never the same score cache


def test_decoding_on_the_device_handles_png_and_names_corrupt_files(tmp_path):
    folder = make_folder(tmp_path / "mixed", per_class=4)
    for k, suffix in ((2, ".png"), (7, ".bmp")):          # decode_image reads PNG; BMP falls back to PIL
        other = sorted(folder.rglob("*.jpg"))[k]
        with Image.open(other) as im:
            im.save(other.with_suffix(suffix))
        other.unlink()
    streamed = on_device(data.load(f"folder:{folder}", stream=True, like=(3, 16, 16)))
    images = all_images(streamed)
    whole = data.load(f"folder:{folder}", stream=False, like=(3, 16, 16)).images
    assert images.shape == (12, 3, 16, 16) and (images.float() - whole.float()).abs().mean() < 1.5
    bad = sorted(folder.rglob("*.jpg"))[4]
    bad.write_bytes(b"\xff\xd8\xff not really a jpeg")
    with pytest.raises(OODBenchError, match=f"1 corrupt or unreadable image file.*{bad.name}"):
        list(on_device(data.load(f"folder:{folder}", stream=True, like=(3, 16, 16))).batches(4))


def test_data_decode_auto_uses_pil_off_cuda_and_gpu_off_cuda_is_an_error(folder, tmp_path, capsys):
    from oodbench.cli import main

    assert data.load(f"folder:{folder}", stream=True).decoder == "pil"
    assert data.load(f"folder:{folder}", stream=True, decode="auto").decoder == "pil"     # no CUDA here
    with pytest.raises(OODBenchError, match="data.decode=gpu: cannot decode JPEGs on cpu"):
        list(data.load(f"folder:{folder}", stream=True, decode="gpu").batches(8))
    with pytest.raises(OODBenchError, match="data.decode must be"):
        data.load(f"folder:{folder}", stream=True, decode="nvjpeg")
    code = main(["eval", "--model", "torchvision:resnet18:none", "--in", "digits", "--out", "noise:gaussian",
                 "--method", "msp", "--fit-limit", "30", "--set", "data.decode=nvjpeg",
                 "--runs-dir", str(tmp_path / "runs")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.startswith("oodbench: error: data.decode must be auto") and "\n" not in err
    assert not (tmp_path / "runs").exists()
    code = main(["eval", "--model", "torchvision:resnet18:none", "--in", "digits", "--out", f"folder:{folder}",
                 "--method", "msp", "--fit-limit", "30", "--set", "data.decode=gpu", "--set", "data.stream=true",
                 "--runs-dir", str(tmp_path / "runs")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and err[-1].startswith("oodbench: error: data.decode=gpu: cannot decode JPEGs on cpu")
    assert not any(line.startswith("oodbench: error") for line in err[:-1])
    assert not list((tmp_path / "runs").rglob("*.npz"))                 # found before any scoring


def test_gpu_decoding_is_probed_once_per_device(monkeypatch):
    from oodbench.data import stream

    stream.gpu_decode_problem.cache_clear()
    assert "not a CUDA device" in stream.gpu_decode_problem("cpu")
    if not torch.cuda.is_available():
        assert stream.gpu_decode_problem("cuda")                 # a reason, never an exception
    stream.gpu_decode_problem.cache_clear()


def test_streamed_batches_are_contiguous_nchw(folder):
    for streamed in (data.load(f"folder:{folder}", stream=True), on_device(data.load(f"folder:{folder}",
                                                                                     stream=True))):
        x, _ = next(iter(streamed.batches(16)))
        assert x.is_contiguous() and x.shape == (16, 3, 48, 48)


def test_tuning_on_openimage_o_reads_openoods_validation_list(tmp_path, capsys):
    from oodbench.cli import main

    write_openood(tmp_path)
    images, lists = tmp_path / "images_largescale" / "openimage_o", tmp_path / "benchmark_imglist" / "imagenet"
    images.mkdir(parents=True)
    for i in range(4):
        Image.new("RGB", (28, 30 + i), (200, 20 * i, 40)).save(images / f"v{i}.jpg")
    (lists / "val_openimage_o.txt").write_text("".join(f"openimage_o/v{i}.jpg -1\n" for i in range(4)))
    code = main(["eval", "--model", "torchvision:resnet18:none", "--in", "imagenet", "--out", "ssb_hard",
                 "--method", "react", "--tune", "--set", "tune.val_ood=openimage_o", "--set", "tune.val_size=4",
                 "--set", "tune.grid={react.percentile: [80, 90]}",
                 "--fit-limit", "12", "--data-root", str(tmp_path), "--runs-dir", str(tmp_path / "runs")])
    out = capsys.readouterr()
    assert code == 0, out.err
    assert "tuned on validation data: react.percentile=" in out.out
    assert "openimage_o: streamed from" in out.err and "(4 files," in out.err     # the val list, not the test one


def test_set_data_stream_at_eval_time_applies_to_the_in_distribution_set_too(split_folder, tmp_path, monkeypatch):
    import oodbench

    folder = split_folder   # fitted on its train/ half, its test/ half scored

    streamed = []
    real = StreamedImageSet.batches
    monkeypatch.setattr(StreamedImageSet, "batches", lambda self, n: streamed.append(self.name) or real(self, n))
    run = runs.ModelRun(oodbench.load_model("torchvision:resnet18:none"), f"folder:{folder}", fit_limit=30,
                        runs_dir=tmp_path)
    assert not isinstance(run.load_set(f"folder:{folder}"), StreamedImageSet)       # small: in memory
    assert isinstance(run.load_set(f"folder:{folder}", stream="true"), StreamedImageSet)
    runs.evaluate(run, ["energy"], ["noise:gaussian"], limit=20, device="cpu", overrides=["data.stream=true"])
    assert f"folder:{folder}[:20]" in streamed                              # the ID test set was streamed
