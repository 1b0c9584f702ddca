"""Dataset specs -> ImageSet. The grammar is documented in docs/data.md.

    name                      torchvision set, image-folder OOD set or `digits`
    noise:gaussian[:N]  noise:uniform[:N]  constant[:N]  glyphs[:N]  fractals[:N]
    vflip:S  hflip:S  gray:S  classes:0,1,2:S  resize:METHOD:S  mnistlike:S  corrupt:TYPE:SEVERITY:S
    folder:PATH  npz:PATH          (a train/ + test/ folder or a train/test npz file is split by `split`)
"""
from __future__ import annotations

import difflib
import sys
import zlib
from pathlib import Path
from typing import NamedTuple, Optional

import torch

from oodbench.data import convert, corrupt, folders, imglists, sources, stream as streaming, synthetic
from oodbench.data.imageset import ImageSet
from oodbench.errors import OODBenchError

RESIZE_DEFAULT = (32, 32)
DERIVED = ("vflip", "hflip", "gray", "classes", "resize", "mnistlike", "corrupt")
NAMES = tuple(sources.TORCHVISION) + ("digits",) + tuple(folders.FOLDER_SETS) + tuple(imglists.IMGLIST_SETS)


class Hint(NamedTuple):
    """What the final shape will be, for sources that are generated or decoded at a chosen size."""
    channels: Optional[int] = None
    size: Optional[tuple] = None
    resample: str = "bilinear"
    crop_resize: Optional[int] = None   # decoded files: shorter side to this, then a centre crop of `size`


class Resolved(NamedTuple):
    images: torch.Tensor               # uint8 (N, C, H, W), CPU, owned by the caller
    labels: Optional[torch.Tensor]
    fingerprint: str                   # "" when the pixels were changed (ImageSet recomputes it)
    notes: tuple                       # conversion rules applied while resolving


def load(spec: str, split: str = "test", root=None, device="cpu", like=None,
         download: Optional[bool] = None, stream=None, decode_to=None, crop_resize: Optional[int] = None,
         decode=None):
    """The dataset `spec` as an ImageSet on `device` (a StreamedImageSet for large image folders).

    root: data root (default $OODBENCH_DATA, else ~/.cache/oodbench/data). like: (C, H, W) to convert to (channels
    by replication or luminance, size by antialiased bilinear resize on the device); the rule is logged once per
    (set, rule).
    download: allow torchvision downloads (default: $OODBENCH_DOWNLOAD, on unless 0).
    stream: True/False forces streaming of a file-backed set (folders, image lists); None/"auto" streams it when an
    in-memory copy would pass stream.stream_threshold(). OpenOOD image-list sets always stream unless False.
    decode_to (C, H, W) and crop_resize R: file-backed sets are decoded straight to the model's input (shorter side R,
    centre crop) instead of to `like`; other sets keep `like`.
    decode: how a streamed set is decoded, "auto" (None), "pil" or "gpu" (see data/stream.py).
    split: "train" or "test" (some sets have others); a folder:PATH with train/ and test/ sub-folders and an npz file
    with train and test arrays are split by it too, other user data gives all its images for every split.
    """
    spec = check_spec(spec)
    like = _check_like(like)
    files = _file_source(spec, split, sources.data_root(root))
    hint_crop = None
    if files is not None:
        if decode_to is not None:   # decoded straight to the model's input
            like, hint_crop = _check_like(decode_to), crop_resize
        if _should_stream(stream, files, like, spec):
            return _streamed(spec, files, like, hint_crop, device, decode)
    hint = Hint() if like is None else Hint(like[0], (like[1], like[2]), crop_resize=hint_crop)
    r = _resolve(spec, split, sources.data_root(root), sources.download_allowed(download), hint)
    images = r.images.to(device)
    labels = None if r.labels is None else r.labels.to(device)
    fingerprint, notes = r.fingerprint, list(r.notes)
    if like is not None:
        images, rule = convert.convert_like(images, like)
        if rule:
            fingerprint = ""
            notes.append(rule)
    for note in notes:
        log_once(spec, note)
    return ImageSet(images, labels, spec, fingerprint)


def check_spec(spec: str) -> str:
    """`spec` stripped, or the error `load` would give for its grammar, an unknown name, a bad synthetic count or
    resize method, or a missing folder:/npz: path — found without reading any images, so a command can check every
    spec before its work starts."""
    if not isinstance(spec, str) or not spec.strip():
        raise OODBenchError(f"dataset spec must be a non-empty string, got {spec!r}")
    spec = spec.strip()
    head, _, rest = spec.partition(":")
    if head in ("folder", "npz"):
        if not rest:
            example = "/data/my_images.npz" if head == "npz" else "/data/my_images"
            raise OODBenchError(f"{head}: needs a path, e.g. {head}:{example}")
        if not Path(rest).expanduser().exists():
            raise OODBenchError(f"folder {rest} does not exist; give an existing directory of images"
                                if head == "folder" else f"npz file {rest} does not exist")
        if head == "npz":
            folders.npz_has_split(rest)   # raises for an unreadable file, neither layout or a bad array header
    elif head in synthetic.HEADS:
        kind, n = _synthetic_parts(spec)
        if kind not in synthetic.KINDS or n < 1:
            synthetic.synthetic(kind, n, (1, 1, 1))   # raises its own message for these
    elif head in DERIVED:
        arg, inner = _derived_parts(head, rest)
        if head == "resize":
            convert.check_method(arg)
        if head == "corrupt":
            corrupt.check(*arg, spec)
        check_spec(inner)
    elif rest or head not in NAMES:
        close = difflib.get_close_matches(spec, NAMES + synthetic.KINDS, n=1)
        suggestion = f"did you mean {close[0]!r}? " if close else ""
        raise OODBenchError(f"unknown dataset {spec!r}; {suggestion}run `oodbench data list` or see docs/data.md")
    return spec


_LOGGED: set = set()


def log_once(name: str, rule: str) -> None:
    """Print a conversion rule to stderr, once per (set, rule) and process."""
    if (name, rule) not in _LOGGED:
        _LOGGED.add((name, rule))
        print(f"oodbench: {name}: {rule}", file=sys.stderr)


def _check_like(like):
    if like is None:
        return None
    try:
        c, h, w = (int(v) for v in like)
    except (TypeError, ValueError):
        raise OODBenchError(f"like must be (C, H, W), got {like!r}") from None
    if c not in (1, 3) or h < 1 or w < 1:
        raise OODBenchError(f"like must be (C, H, W) with C = 1 or 3 and positive sizes, got {like!r}")
    return c, h, w


def _tensor(raw: sources.Raw, notes=()) -> Resolved:
    labels = None if raw.labels is None else torch.tensor(raw.labels)
    return Resolved(torch.tensor(raw.images), labels, raw.fingerprint, tuple(notes))


_SAME = object()


def _changed(r: Resolved, images, labels=_SAME, note=None) -> Resolved:
    labels = r.labels if labels is _SAME else labels
    return Resolved(images, labels, "", r.notes + ((note,) if note else ()))


def _resolve(spec: str, split: str, root: Path, download: bool, hint: Hint) -> Resolved:
    head, _, rest = spec.partition(":")
    if head == "folder":
        return _folder(rest, split, hint)
    if head == "npz":
        if not rest:
            raise OODBenchError("npz: needs a path, e.g. npz:/data/my_images.npz")
        return _tensor(folders.read_npz(rest, split))
    if head in synthetic.HEADS:
        return _synthetic(spec, split, hint)
    if head in DERIVED:
        return _derived(head, rest, split, root, download, hint)
    if rest or head not in NAMES:
        check_spec(spec)   # raises: unknown dataset
    if head in sources.TORCHVISION:
        return _tensor(sources.cached_torchvision(head, split, root, download))
    if head == "digits":
        return _tensor(sources.load_digits(split))
    if head in imglists.IMGLIST_SETS:   # forced in memory (data.stream=false): streamed, then held whole
        paths, labels, images = imglists.read_list(head, split, root)
        whole = _streamed(spec, (paths, labels, images), hint_shape(hint), hint.crop_resize, "cpu").materialize()
        return Resolved(whole.images, whole.labels, "", _decode_notes(hint))
    raw = folders.load_folder_set(head, root, hint.size, hint.channels, hint.resample, crop_resize=hint.crop_resize)
    return _tensor(raw, _decode_notes(hint))


def _file_source(spec: str, split: str, root: Path):
    """(paths, labels, folder) of a file-backed spec (folder:PATH, a named image folder, an OpenOOD image list), or
    None for every other spec. A folder:PATH with train/ and test/ sub-folders gives the `split` sub-folder."""
    head, _, rest = spec.partition(":")
    if head == "folder":
        folder = Path(rest).expanduser().resolve()
        if not folder.is_dir():
            return None                  # the in-memory path gives its error
        folder, classes = folders.split_folder(folder, split)
        paths = folders.list_images(folder)
        return (paths, folders.folder_labels(folder, paths, classes), folder) if paths else None
    if rest:
        return None
    if head in folders.FOLDER_SETS:
        folder = folders.folder_set_found(head, root)
        if folder is None:
            return None
        paths = folders.list_images(folder, folders.FOLDER_SETS[head].exclude)
        return (paths, folders.folder_labels(folder, paths), folder) if paths else None
    if head in imglists.IMGLIST_SETS:
        return imglists.read_list(head, split, root)
    return None


def stream_choice(stream) -> str:
    """data.stream as "auto", "true" or "false" (--set gives True/False, a config string "True"), or an error."""
    choice = "auto" if stream is None else str(stream).lower()
    if choice not in ("auto", "true", "false"):
        raise OODBenchError(f"data.stream must be auto, true or false, got {stream!r}")
    return choice


def _should_stream(stream, files, target, spec: str) -> bool:
    choice = stream_choice(stream)
    if choice != "auto":
        return choice == "true"
    if spec.partition(":")[0] in imglists.IMGLIST_SETS:
        return True
    shape = target or _probe(files[0])[0]
    return streaming.decoded_bytes(len(files[0]), shape) > streaming.stream_threshold()


def _probe(paths) -> tuple[tuple, bool]:
    """((C, H, W) of the first image, C = 1 when the first 16 are all grayscale), from the file headers only."""
    from PIL import Image

    modes = []
    for p in paths[:16]:
        try:
            with Image.open(p) as im:
                modes.append(im.mode)
                if p is paths[0]:
                    size = (im.height, im.width)
        except (OSError, SyntaxError, ValueError) as e:
            raise folders.corrupt_error(Path(p).parent, [p]) from e
    gray = all(m in folders.GRAY_MODES for m in modes)
    return (1 if gray else 3, *size), gray


def _streamed(spec: str, files, target, crop_resize, device, decode="pil"):
    paths, labels, folder = files
    shape = target or _probe(paths)[0]
    streamed = streaming.StreamedImageSet(paths, labels, spec, shape[0], shape[1:], "bilinear", crop_resize, device,
                                          root=folder, decode=decode)
    decoder = "PIL in workers" if streamed.decoder == "pil" else f"torchvision.io on {streamed.device}"
    if streamed.decode == "auto" and streamed.device.type == "cuda" and streamed.decoder == "pil":
        decoder += f" (no GPU decoding: {streaming.gpu_decode_problem(str(streamed.device))})"
    how = f"shorter side {crop_resize}, centre crop {shape[1]}x{shape[2]}" if crop_resize else \
        f"{shape[1]}x{shape[2]} (bilinear)"
    log_once(spec, f"streamed from {folder} ({len(paths)} files, decoded per batch by {decoder}: {how})")
    return streamed


def hint_shape(hint: Hint):
    return None if hint.size is None else (hint.channels or 3, *hint.size)


def _decode_notes(hint: Hint):
    if not hint.size:
        return ()
    mode = {1: "; colour images became grayscale (PIL luminance)",
            3: "; grayscale images became RGB (replicated)"}.get(hint.channels, "")
    return (f"decoded at {hint.size[0]}x{hint.size[1]} with PIL {hint.resample}{mode}",)


def _folder(path: str, split: str, hint: Hint) -> Resolved:
    if not path:
        raise OODBenchError("folder: needs a path, e.g. folder:/data/my_images")
    folder, classes = folders.split_folder(path, split)
    return _tensor(folders.read_folder(folder, hint.size, hint.channels, hint.resample, crop_resize=hint.crop_resize,
                                       classes=classes), _decode_notes(hint))


def _synthetic_parts(spec: str) -> tuple[str, int]:
    parts = spec.split(":")
    n_kind = 1 if parts[0] in synthetic.SINGLE else 2
    kind, count = ":".join(parts[:n_kind]), parts[n_kind:]
    if len(count) > 1 or (count and not count[0].isdigit()):
        raise OODBenchError(f"bad synthetic spec {spec!r}; use {kind}[:N] with N a positive count")
    return kind, int(count[0]) if count else synthetic.DEFAULT_COUNT


def _synthetic(spec: str, split: str, hint: Hint) -> Resolved:
    kind, n = _synthetic_parts(spec)
    c = hint.channels or synthetic.DEFAULT_SHAPE[0]
    h, w = hint.size or synthetic.DEFAULT_SHAPE[1:]
    return Resolved(synthetic.synthetic(kind, n, (c, h, w), split), None, "", ())


def _derived_parts(op: str, rest: str) -> tuple[Optional[str], str]:
    if op == "corrupt":   # corrupt:TYPE:SEVERITY:<spec>
        kind, _, tail = rest.partition(":")
        severity, _, inner = tail.partition(":")
        if not kind or not severity or not inner:
            raise OODBenchError(f"bad spec corrupt:{rest}; use corrupt:TYPE:SEVERITY:<spec>, e.g. "
                                f"corrupt:gaussian_noise:3:cifar10 (types: {', '.join(corrupt.TYPES)}; severity 1-5)")
        return (kind, severity), inner
    if op in ("classes", "resize"):
        arg, _, inner = rest.partition(":")
        if not arg or not inner:
            raise OODBenchError(f"bad spec {op}:{rest!r}; use " +
                                ("classes:0,1,2:<spec>" if op == "classes" else "resize:<method>:<spec>"))
    else:
        arg, inner = None, rest
    if not inner:
        raise OODBenchError(f"{op}: needs a dataset after it, e.g. {op}:fashion_mnist")
    return arg, inner


def _derived(op: str, rest: str, split: str, root: Path, download: bool, hint: Hint) -> Resolved:
    arg, inner = _derived_parts(op, rest)
    if op == "resize":
        convert.check_method(arg)
        size = hint.size or RESIZE_DEFAULT
        r = _resolve(inner, split, root, download, Hint(hint.channels, size, arg))
        images = convert.resize_pil(r.images, size, arg)
        if images is r.images:
            return r
        return _changed(r, images, note=f"resized to {size[0]}x{size[1]} with PIL {arg}")
    r = _resolve(inner, split, root, download, hint)
    if op == "corrupt":   # each split its own draw, as the synthetic sets; the same pixels on every call
        kind, severity = arg
        severity = corrupt.check(kind, severity, f"corrupt:{kind}:{severity}:{inner}")
        key = (r.fingerprint, tuple(r.images.shape), kind, severity, split)
        images = _CORRUPTED.get(key) if r.fingerprint else None
        if images is None:
            images = corrupt.corrupt(r.images, kind, severity, seed=zlib.crc32(split.encode()))
            if r.fingerprint:   # a few recent results: a command loads a csID set more than once
                _CORRUPTED[key] = images
                while len(_CORRUPTED) > 4:
                    _CORRUPTED.pop(next(iter(_CORRUPTED)))
        return _changed(r, images.clone(), note=f"corrupted: {kind} at severity {severity} (ImageNet-C constants)")
    if op == "vflip":
        return _changed(r, r.images.flip(-2))
    if op == "hflip":
        return _changed(r, r.images.flip(-1))
    if op == "gray":
        return _changed(r, convert.gray(r.images))
    if op == "mnistlike":
        return _changed(r, convert.mnist_layout(r.images), note="fitted into a 20x20 box on a black 28x28 canvas")
    return _class_subset(arg, inner, r)


_CORRUPTED: dict = {}


def _class_subset(arg: str, inner: str, r: Resolved) -> Resolved:
    try:
        wanted = [int(c) for c in arg.split(",")]
    except ValueError:
        raise OODBenchError(f"classes:{arg}: class ids must be integers separated by commas, e.g. classes:0,1,2:cifar10")
    if len(set(wanted)) != len(wanted) or min(wanted) < 0:
        raise OODBenchError(f"classes:{arg}: class ids must be distinct and non-negative")
    if r.labels is None:
        raise OODBenchError(f"classes:{arg}:{inner}: {inner!r} has no labels to select classes by")
    top = int(r.labels.max())
    table = torch.full((top + 1,), -1, dtype=torch.int64)   # ids above the set's largest label select nothing
    present = [(i, c) for i, c in enumerate(wanted) if c <= top]
    if present:
        table[torch.tensor([c for _, c in present])] = torch.tensor([i for i, _ in present])
    new = table[r.labels]
    keep = new >= 0
    if not bool(keep.any()):
        raise OODBenchError(f"classes:{arg}:{inner}: no images with these classes; "
                            f"{inner!r} has classes 0..{int(r.labels.max())}")
    return _changed(r, r.images[keep], new[keep])


# ---------------------------------------------------------------- splits

def has_split(spec: str, root=None) -> bool:
    """Whether `spec`'s train and test splits are distinct images, so that fitting on one and testing on the other
    is sound. Reads no images (an npz file's index at most).

    True: the torchvision sets, `digits`, OpenOOD image lists with both a train and a test list (imagenet,
    imagenet200, openimage_o), synthetic sets (noise, constant, glyphs, fractals: each split is drawn with its own
    seed), an npz file with train/test arrays and a folder with train/ and test/ sub-folders. False: the named image-folder
    OOD sets and test-only image lists (every split is the same images), an npz file with `images` and any other
    folder. A derived spec (vflip:, gray:, classes:, resize:, ...) answers as the set it derives from, since both
    splits go through the same change. `root` is unused today (kept for specs whose answer may depend on the
    files found). Bad specs raise as `check_spec` does."""
    spec = check_spec(spec)
    head, _, rest = spec.partition(":")
    if head == "npz":
        return folders.npz_has_split(rest)
    if head == "folder":
        return folders.has_split_folder(rest)
    if head in synthetic.HEADS:
        return True
    if head in DERIVED:
        return has_split(_derived_parts(head, rest)[1], root)
    if head in sources.TORCHVISION or head == "digits":
        return True
    if head in imglists.IMGLIST_SETS:
        return all(s in imglists.IMGLIST_SETS[head].lists for s in ("train", "test"))
    return False


# ---------------------------------------------------------------- status

def dataset_status(root=None) -> list[dict]:
    """For each named dataset: name, found (path or None), how_to_get. Looks at files only; downloads nothing."""
    root = sources.data_root(root)
    rows = []
    for name in sources.TORCHVISION:
        found = sources.torchvision_found(name, root)
        rows.append(dict(name=name, found=None if found is None else str(found),
                         how_to_get=sources.how_to_get(name, root)))
    rows.append(dict(name="digits", found=str(sources.digits_path()),
                     how_to_get="bundled with scikit-learn (always available)"))
    for name, fs in folders.FOLDER_SETS.items():
        found = folders.folder_set_found(name, root)
        rows.append(dict(name=name, found=None if found is None else str(found), how_to_get=fs.how))
    for name, entry in imglists.IMGLIST_SETS.items():
        found = imglists.found(name, root)
        rows.append(dict(name=name, found=None if found is None else str(found),
                         how_to_get=f"{entry.how}; reads {', '.join(entry.lists.values())} (paths relative to "
                                    f"{entry.images}/)"))
    return rows


# ---------------------------------------------------------------- resize benchmark

def write_resize_benchmark(src_spec: str, size: int, out_dir, root=None) -> dict:
    """Write `src_spec` (test split) resized to size x size with each PIL method as PNG folders.

    Returns {method: folder}; each folder loads back with `folder:<folder>`. Existing non-empty folders are an error.
    """
    size = int(size)
    if size < 1:
        raise OODBenchError(f"resize benchmark size must be positive, got {size}")
    out_dir = Path(out_dir).expanduser().resolve()
    if out_dir.exists() and not out_dir.is_dir():
        raise OODBenchError(f"--out {out_dir} is a file; name a new folder for the resized sets")
    targets = {m: out_dir / m for m in convert.RESIZE_METHODS}
    for folder in targets.values():
        if folder.is_dir() and any(folder.iterdir()):
            raise OODBenchError(f"{folder} already exists and is not empty; choose another output folder or delete it")
    data_root = sources.data_root(root)
    written = {}
    for method, folder in targets.items():
        r = _resolve(f"resize:{method}:{src_spec}", "test", data_root, sources.download_allowed(None),
                     Hint(None, (size, size), method))
        folder.mkdir(parents=True, exist_ok=True)
        images = r.images.numpy()
        digits = max(6, len(str(len(images) - 1)))
        for i, image in enumerate(images):
            convert.to_pil(image).save(folder / f"{i:0{digits}d}.png")
        written[method] = str(folder)
    return written
