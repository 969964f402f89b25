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


def crop_sizes(crop_size, spatial_dims: int) -> tuple[int, ...]:
    """``data.crop_size`` (int or one size per axis) as a tuple of ``spatial_dims`` sizes."""
    if isinstance(crop_size, (list, tuple)):
        if len(crop_size) == 1:
            return (int(crop_size[0]),) * spatial_dims
        if len(crop_size) != spatial_dims:
            raise ValueError(f"data.crop_size {list(crop_size)} has {len(crop_size)} sizes, the data has "
                             f"{spatial_dims} spatial axes")
        return tuple(int(c) for c in crop_size)
    return (int(crop_size),) * spatial_dims


def center_crop_or_pad(array: np.ndarray, size: tuple[int, ...], fill=0) -> np.ndarray:
    """Centre crop the trailing ``len(size)`` axes of ``array`` (leading axes kept), padding
    with ``fill`` where an axis is shorter; ``fill`` may be an array broadcast over the
    leading axes (e.g. a per-channel value of shape (C, 1, ..., 1)). The crop starts
    at ``(n - s) // 2`` (for 180 -> 128: pixels 26..153), the padding is split
    evenly with the extra pixel after."""
    array = np.asarray(array)
    nd = len(size)
    lead = array.ndim - nd
    src, dst = [slice(None)] * array.ndim, [slice(None)] * array.ndim
    out_shape = list(array.shape[:lead]) + list(size)
    for ax, s in enumerate(size):
        n = array.shape[lead + ax]
        if n >= s:
            start = (n - s) // 2
            src[lead + ax] = slice(start, start + s)
            dst[lead + ax] = slice(0, s)
        else:
            before = (s - n) // 2
            src[lead + ax] = slice(0, n)
            dst[lead + ax] = slice(before, before + n)
    out = np.empty(out_shape, dtype=array.dtype)
    out[...] = fill
    out[tuple(dst)] = array[tuple(src)]
    return out


def crop_item(item: dict, crop_size) -> dict:
    """Centre crop / pad ``image`` (C, *spatial) and ``labels`` (A, *spatial) to ``crop_size``.

    The image is padded with each channel's minimum (background in CT, MR and
    normalised images), the masks with 0. The crop offset is recorded in
    ``meta["crop"]`` (start index per axis; negative where padded) so that
    predictions can be placed back."""
    image = np.asarray(item["image"])
    nd = image.ndim - 1
    size = crop_sizes(crop_size, nd)
    if tuple(image.shape[1:]) == size:
        return item
    fill = image.reshape(image.shape[0], -1).min(axis=1).reshape(-1, *([1] * nd)) if image.size else 0
    item["image"] = center_crop_or_pad(image, size, fill)
    item["labels"] = center_crop_or_pad(np.asarray(item["labels"]), size, 0)
    item.setdefault("meta", {})["crop"] = {"size": list(size), "original_shape": list(image.shape[1:]),
                                           "start": [(n - s) // 2 if n >= s else -((s - n) // 2)
                                                     for n, s in zip(image.shape[1:], size)]}
    return item


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
    p = float(getattr(aug, "prob", 0.5))
    if aug.flip:
        for axis in range(spatial_dims):
            ts.append(mt.RandFlipd(keys=keys, prob=p, spatial_axis=axis))
    if aug.rot90:
        # In-plane (the first two spatial axes); needs a square plane (else batch shapes differ).
        ts.append(mt.RandRotate90d(keys=keys, prob=p, spatial_axes=(0, 1)))
    if aug.affine:
        angle = np.deg2rad(aug.affine_rotate_deg)
        ts.append(mt.RandAffined(keys=keys, prob=p, rotate_range=[angle] * (1 if spatial_dims == 2 else 3),
                                 scale_range=[aug.affine_scale] * spatial_dims, mode=("bilinear", "nearest"),
                                 padding_mode=("border", "zeros")))  # image: replicate edge; masks: background
    if aug.intensity:
        ts.append(mt.RandShiftIntensityd(keys=["image"], offsets=aug.intensity_shift, prob=p))
        ts.append(mt.RandScaleIntensityd(keys=["image"], factors=aug.intensity_scale, prob=p))
    ts.append(mt.EnsureTyped(keys=keys, track_meta=False))
    return mt.Compose(ts)
