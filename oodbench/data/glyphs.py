"""`glyphs`: an offline stand-in for notMNIST — the letters A-J rendered in many typefaces, white on black.

notMNIST (the validation OOD set of Ren et al. 2019 for Fashion-MNIST) is letters A-J cut from font files, scaled
to fill the frame. It cannot be downloaded here, so we render the same kind of image from the TrueType fonts that
matplotlib bundles (DejaVu Sans / Sans Mono / Serif in four styles, STIX General in four, seven Computer Modern
faces): each image is one random letter in one random face, turned by up to +-8 degrees, its bounding box scaled
to fill the frame less a 0-2 pixel margin, centred with a +-1 pixel jitter, antialiased.
Deterministic for a given (count, size, split); `train` and `test` use different seeds.
"""
from __future__ import annotations

import functools
import zlib
from pathlib import Path

import numpy as np

from oodbench.errors import OODBenchError

LETTERS = "ABCDEFGHIJ"
FACES = ("DejaVuSans.ttf", "DejaVuSans-Bold.ttf", "DejaVuSans-Oblique.ttf", "DejaVuSans-BoldOblique.ttf",
         "DejaVuSansMono.ttf", "DejaVuSansMono-Bold.ttf", "DejaVuSansMono-Oblique.ttf",
         "DejaVuSansMono-BoldOblique.ttf", "DejaVuSerif.ttf", "DejaVuSerif-Bold.ttf", "DejaVuSerif-Italic.ttf",
         "DejaVuSerif-BoldItalic.ttf", "STIXGeneral.ttf", "STIXGeneralBol.ttf", "STIXGeneralItalic.ttf",
         "STIXGeneralBolIta.ttf", "cmr10.ttf", "cmb10.ttf", "cmss10.ttf", "cmti10.ttf", "cmtt10.ttf", "cmmi10.ttf",
         "cmsy10.ttf")   # cmsy10 draws A-J as calligraphic capitals
RENDER_PX = 96           # glyphs are drawn at this point size, then cropped and resized
MAX_TURN = 8.0           # degrees


@functools.lru_cache(maxsize=1)
def font_files() -> tuple:
    """Paths of the bundled faces (matplotlib's mpl-data/fonts/ttf)."""
    import matplotlib

    folder = Path(matplotlib.get_data_path()) / "fonts" / "ttf"
    found = tuple(folder / name for name in FACES if (folder / name).is_file())
    if not found:
        raise OODBenchError(f"no fonts found in {folder}; reinstall matplotlib")
    return found


@functools.lru_cache(maxsize=None)
def _letter(face: Path, letter: str):
    """The letter's antialiased bitmap cropped to its bounding box (a PIL image)."""
    from PIL import Image, ImageDraw, ImageFont

    font = ImageFont.truetype(str(face), RENDER_PX)
    canvas = Image.new("L", (2 * RENDER_PX, 2 * RENDER_PX))
    ImageDraw.Draw(canvas).text((RENDER_PX // 4, RENDER_PX // 8), letter, fill=255, font=font)
    return canvas.crop(canvas.getbbox())


def glyphs(count: int, size: tuple, split: str = "test"):
    """uint8 (count, 1, H, W) images and their letters as int64 (count,) labels (A=0 .. J=9); the same on every
    machine for the arguments."""
    from PIL import Image

    if count < 1:
        raise OODBenchError(f"glyphs: the image count must be at least 1, got {count}")
    h, w = (int(s) for s in size)
    faces = font_files()
    rng = np.random.default_rng(zlib.crc32(f"glyphs|{split}|{count}|{h}x{w}".encode()))
    images = np.zeros((count, 1, h, w), dtype=np.uint8)
    labels = rng.integers(0, len(LETTERS), count)
    for i, label in enumerate(labels):
        glyph = _letter(faces[rng.integers(len(faces))], LETTERS[label])
        glyph = glyph.rotate(float(rng.uniform(-MAX_TURN, MAX_TURN)), Image.Resampling.BICUBIC, expand=True)
        glyph = glyph.crop(glyph.getbbox())
        margin = int(rng.integers(0, 3))
        scale = min((h - 2 * margin) / glyph.height, (w - 2 * margin) / glyph.width)
        gw, gh = max(1, round(glyph.width * scale)), max(1, round(glyph.height * scale))
        small = np.asarray(glyph.resize((gw, gh), Image.Resampling.LANCZOS))
        top = min(max(0, (h - gh) // 2 + int(rng.integers(-1, 2))), h - gh)
        left = min(max(0, (w - gw) // 2 + int(rng.integers(-1, 2))), w - gw)
        images[i, 0, top:top + gh, left:left + gw] = small
    return images, labels.astype(np.int64)
