"""`fractals`: an offline stand-in for PixMix's mixing set — random iterated-function-system (IFS) fractals.

PixMix (Hendrycks et al., CVPR 2022) mixes training images with a downloaded set of fractal pictures and feature
visualisations (OpenOOD: `data/images_classic/`, listed in `aug_fractals_and_fvis.txt`). That set cannot be fetched
here, so this renders the same *kind* of picture procedurally; it is not the paper's set. Each image is the
attractor of a random IFS of 2-4 contractive affine maps of the plane (each map R(a) diag(s1, s2) R(b) + t, singular
values 0.25-0.85, a random reflection, the maps drawn with probability proportional to their |determinant|),
traced by the chaos game (512 walkers, 60 steps, the first 10 dropped), fitted to the frame by the 1-99% range of
its points, coloured by a running mean of the random colours of the maps that placed each point, brightness
log(1 + hits) / log(1 + max hits), on black. One channel: the luminance (ITU-R 601-2).
Deterministic for a given (count, size, split), the gray images the luminance of the colour ones; `train` and `test`
use different seeds.
"""
from __future__ import annotations

import zlib

import numpy as np

from oodbench.errors import OODBenchError

WALKERS, STEPS, BURN_IN = 512, 60, 10
SINGULAR = (0.25, 0.85)


def _maps(rng: np.random.Generator):
    """(A (M, 2, 2), t (M, 2), colours (M, 3), probabilities (M,)) of a random contractive IFS."""
    m = int(rng.integers(2, 5))

    def rotation(angle):
        c, s = np.cos(angle), np.sin(angle)
        return np.stack([np.stack([c, -s], -1), np.stack([s, c], -1)], -2)

    a, b = rotation(rng.uniform(0, 2 * np.pi, m)), rotation(rng.uniform(0, 2 * np.pi, m))
    scales = rng.uniform(*SINGULAR, (m, 2)) * np.stack([rng.choice([-1.0, 1.0], m), np.ones(m)], -1)
    maps = a @ (scales[:, :, None] * np.eye(2)) @ b
    det = np.abs(np.linalg.det(maps)) + 1e-3
    return maps, rng.uniform(-1, 1, (m, 2)), rng.uniform(0.2, 1.0, (m, 3)), det / det.sum()


def render(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """One fractal as float RGB (3, h, w) in [0, 1]."""
    maps, shift, colours, prob = _maps(rng)
    x = rng.uniform(-1, 1, (WALKERS, 2))
    colour = np.full((WALKERS, 3), 0.5)
    points, tints = [], []
    for step in range(STEPS):
        pick = rng.choice(len(maps), WALKERS, p=prob)
        x = np.einsum("pij,pj->pi", maps[pick], x) + shift[pick]
        colour = (colour + colours[pick]) / 2
        if step >= BURN_IN:
            points.append(x)
            tints.append(colour)
    points, tints = np.concatenate(points), np.concatenate(tints)
    lo, hi = np.percentile(points, 1, axis=0), np.percentile(points, 99, axis=0)
    span = np.maximum(hi - lo, 1e-6)
    col = np.floor((points[:, 0] - lo[0]) / span[0] * (w - 1) + 0.5).astype(np.int64)
    row = np.floor((points[:, 1] - lo[1]) / span[1] * (h - 1) + 0.5).astype(np.int64)
    inside = (col >= 0) & (col < w) & (row >= 0) & (row < h)
    cell = row[inside] * w + col[inside]
    hits = np.bincount(cell, minlength=h * w).astype(np.float64)
    sums = np.stack([np.bincount(cell, tints[inside, c], minlength=h * w) for c in range(3)])
    bright = np.log1p(hits) / np.log1p(max(hits.max(), 1.0))
    image = sums / np.maximum(hits, 1.0) * bright
    return image.reshape(3, h, w).clip(0, 1)


def fractals(count: int, shape: tuple, split: str = "test") -> np.ndarray:
    """uint8 (count, C, H, W) fractal images, C = 1 (luminance) or 3; the same on every machine for the arguments."""
    if count < 1:
        raise OODBenchError(f"fractals: the image count must be at least 1, got {count}")
    c, h, w = (int(s) for s in shape)
    rng = np.random.default_rng(zlib.crc32(f"fractals|{split}|{count}|{h}x{w}".encode()))
    images = np.empty((count, c, h, w), dtype=np.uint8)
    for i in range(count):
        rgb = render(rng, h, w)
        if c == 1:
            rgb = (0.299 * rgb[0] + 0.587 * rgb[1] + 0.114 * rgb[2])[None]
        images[i] = np.round(rgb * 255).astype(np.uint8)
    return images
