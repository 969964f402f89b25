"""Intensity normalisation and training augmentation (MONAI dictionary transforms)."""

from __future__ import annotations

from typing import Callable, Optional

import numpy as np


def normalize_image(image: np.ndarray, data_cfg) -> np.ndarray:
    """Apply ``data.normalize`` to an image (C, *spatial): none, zscore (per image
    and channel) or ct_window (clip to ``data.ct_window`` and scale to [0, 1])."""
    image = np.asarray(image, dtype=np.float32)
    mode = data_cfg.normalize
    if mode == "none":
        return image
    if mode == "zscore":
        axes = tuple(range(1, image.ndim))
        mean = image.mean(axis=axes, keepdims=True)
        std = image.std(axis=axes, keepdims=True)
        return (image - mean) / np.maximum(std, 1e-6)
    if mode == "ct_window":
        lo, hi = (float(v) for v in data_cfg.ct_window)
        return (np.clip(image, lo, hi) - lo) / (hi - lo)
    raise ValueError(f"data.normalize: unknown mode {mode!r}")


def train_transform(data_cfg, spatial_dims: int) -> Optional[Callable[[dict], dict]]:
    """MONAI dictionary transforms applied jointly to ``image`` (C, *spatial) and
    ``labels`` (A, *spatial) (all raters at once, nearest-neighbour for labels).
    None when ``data.augment.enabled`` is false."""
    aug = data_cfg.augment
    if not aug.enabled:
        return None
    from monai import transforms as mt

    keys = ["image", "labels"]
    ts: list = []
    if aug.flip:
        for axis in range(spatial_dims):
            ts.append(mt.RandFlipd(keys=keys, prob=0.5, spatial_axis=axis))
    if aug.rot90:
        ts.append(mt.RandRotate90d(keys=keys, prob=0.5, spatial_axes=(0, 1)))
    if aug.affine:
        angle = np.deg2rad(aug.affine_rotate_deg)
        ts.append(mt.RandAffined(keys=keys, prob=0.5, rotate_range=[angle] * (1 if spatial_dims == 2 else 3),
                                 scale_range=[aug.affine_scale] * spatial_dims, mode=("bilinear", "nearest"),
                                 padding_mode="border"))
    if aug.intensity:
        ts.append(mt.RandShiftIntensityd(keys=["image"], offsets=aug.intensity_shift, prob=0.5))
        ts.append(mt.RandScaleIntensityd(keys=["image"], factors=aug.intensity_scale, prob=0.5))
    ts.append(mt.EnsureTyped(keys=keys, track_meta=False))
    return mt.Compose(ts)
