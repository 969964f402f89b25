"""Checks run on every item before training starts; errors name the file or case.

Each check raises :class:`DataError` (a ``ValueError``) whose message starts with
the offending file (``meta["image_path"]``, or the mask file) and says what is
wrong and how to fix it. ``data/README.md`` lists every message.
"""

from __future__ import annotations

import logging
from typing import Optional, Sequence

import numpy as np

from .errors import DataError  # re-exported: `from probunet.data.validate import DataError` keeps working

logger = logging.getLogger(__name__)


def where(item: dict) -> str:
    """The file (or case) an item came from, for error messages."""
    meta = item.get("meta", {})
    return str(meta.get("image_path") or meta.get("source") or f"case {item['case_id']}")


_where = where  # old private name


# ---------------------------------------------------------------- conversions used by the readers


def to_labels(array, where: str, *, binarize: bool = False) -> np.ndarray:
    """A rater mask as int64 labels; float masks must hold whole numbers.

    ``binarize``: every value > 0 becomes 1 (for masks stored as 0/255 or with
    several foreground values). Raises DataError naming ``where`` otherwise.
    """
    array = np.asarray(array)
    if array.dtype == bool:
        return array.astype(np.int64)
    if np.issubdtype(array.dtype, np.floating):
        if not np.all(np.isfinite(array)):
            raise DataError(f"{where}: rater mask contains NaN or Inf values")
        if binarize:
            return (array > 0).astype(np.int64)
        if not np.array_equal(array, np.round(array)):
            bad = array[array != np.round(array)]
            raise DataError(f"{where}: rater mask holds non-integer values (for example {float(bad.flat[0]):g}); "
                            f"masks must be label maps (0 = background, 1.. = classes), not probabilities")
        return array.astype(np.int64)
    if not np.issubdtype(array.dtype, np.integer):
        raise DataError(f"{where}: rater mask has unsupported dtype {array.dtype}")
    if binarize:
        return (array > 0).astype(np.int64)
    return array.astype(np.int64)


def to_image(array, where: str, spatial_ndim: int) -> np.ndarray:
    """An image array ``(*spatial)`` or ``(*spatial, C)`` (channels last, as
    :func:`probunet.data.io.read_image` gives them) as float32 ``(C, *spatial)``."""
    array = np.asarray(array)
    if not (np.issubdtype(array.dtype, np.number) or array.dtype == bool):
        raise DataError(f"{where}: image has unsupported dtype {array.dtype}")
    if array.ndim == spatial_ndim:
        array = array[None]
    elif array.ndim == spatial_ndim + 1:
        array = np.moveaxis(array, -1, 0)
    else:
        raise DataError(f"{where}: image of shape {array.shape} does not fit {spatial_ndim}D rater masks "
                        f"(expected {spatial_ndim} spatial axes, optionally followed by channels)")
    return np.ascontiguousarray(array, dtype=np.float32)


def check_same_geometry(image_meta: dict, mask_meta: dict, mask_path: str, image_path: str,
                        *, atol: float = 1e-3) -> None:
    """Image and mask must share shape, spacing, origin and direction (within ``atol`` mm)."""
    if list(image_meta.get("shape", [])) != list(mask_meta.get("shape", [])):
        raise DataError(f"{mask_path}: rater mask shape {tuple(mask_meta.get('shape', []))} does not match the "
                        f"image shape {tuple(image_meta.get('shape', []))} of {image_path}")
    for key in ("spacing", "origin", "direction"):
        a, b = image_meta.get(key), mask_meta.get(key)
        if a is None or b is None:
            continue
        if np.shape(a) != np.shape(b) or not np.allclose(a, b, rtol=1e-5, atol=atol):
            raise DataError(f"{mask_path}: rater mask geometry does not match the image {image_path}: {key} "
                            f"{np.round(b, 4).tolist()} vs {np.round(a, 4).tolist()} (resample the mask onto the "
                            f"image, or set data.check_geometry=false if the headers alone are wrong)")


# ---------------------------------------------------------------- item checks


def validate_item(item: dict, *, num_classes: int | None = None, in_channels: int | None = None,
                  spatial_dims: int | None = None) -> None:
    """Raise :class:`DataError` naming the file when ``item`` is unusable."""
    w = where(item)
    image, labels = np.asarray(item["image"]), np.asarray(item["labels"])
    if image.ndim < 3:
        raise DataError(f"{w}: image must be (C, *spatial), got shape {tuple(image.shape)}")
    if spatial_dims is not None and image.ndim - 1 != spatial_dims:
        raise DataError(f"{w}: image has {image.ndim - 1} spatial dims, the model expects {spatial_dims} "
                        f"(model.spatial_dims)")
    if in_channels is not None and image.shape[0] != in_channels:
        raise DataError(f"{w}: image has {image.shape[0]} channels, the model expects {in_channels} "
                        f"(model.in_channels)")
    if not np.issubdtype(image.dtype, np.floating):
        raise DataError(f"{w}: image must be float, got {image.dtype}")
    if not np.all(np.isfinite(image)):
        n = int(np.size(image) - np.isfinite(image).sum())
        raise DataError(f"{w}: image contains NaN or Inf values ({n} voxels)")
    if labels.ndim != image.ndim or labels.shape[1:] != image.shape[1:]:
        raise DataError(f"{w}: rater masks {tuple(labels.shape[1:])} do not match the image shape "
                        f"{tuple(image.shape[1:])}")
    if labels.shape[0] < 1:
        raise DataError(f"{w}: no rater masks")
    if not np.issubdtype(labels.dtype, np.integer):
        raise DataError(f"{w}: rater masks must hold integer labels, got {labels.dtype}")
    if labels.size and (labels.min() < 0 or (num_classes is not None and labels.max() >= num_classes)):
        raise DataError(f"{w}: labels range {int(labels.min())}..{int(labels.max())} is outside "
                        f"0..{(num_classes or 0) - 1} (model.num_classes={num_classes}; masks stored as 0/255 "
                        f"need data.binarize=true)")


def check_same_shapes(items: list[dict]) -> None:
    """All items must share one spatial shape (a training batch is one tensor)."""
    if not items:
        return
    ref = tuple(np.shape(items[0]["image"])[1:])
    for item in items[1:]:
        shape = tuple(np.shape(item["image"])[1:])
        if shape != ref:
            raise DataError(f"{where(item)}: case {item['case_id']} has spatial shape {shape}, but case "
                            f"{items[0]['case_id']} has {ref}; cases of different sizes need a common size: set "
                            f"data.crop_size (centre crop, zero-padded where smaller), e.g. data.crop_size="
                            f"{max(ref)} or data.crop_size=[{', '.join(str(s) for s in ref)}]")


def harmonize_raters(items: list[dict], num_raters: Optional[int], missing_raters: str = "pad") -> int:
    """Give every item the same number of rater masks ``A``.

    ``A`` is ``num_raters`` or, when None, the largest count found. An item with
    fewer masks is padded with empty (all-background) masks when
    ``missing_raters == "pad"`` (``meta["rater_present"]`` marks the real ones) and
    refused with a DataError naming its file when ``"error"``. An item with more
    than ``num_raters`` masks is always an error. Returns ``A``.
    """
    if not items:
        return num_raters or 0
    counts = [int(np.shape(i["labels"])[0]) for i in items]
    target = int(num_raters) if num_raters else max(counts)
    padded = 0
    for item, count in zip(items, counts):
        meta = item.setdefault("meta", {})
        present = list(meta.get("rater_present", [True] * count))
        if count > target:
            raise DataError(f"{where(item)}: {count} rater masks, more than data.num_raters={target}")
        if count < target:
            if missing_raters != "pad":
                raise DataError(f"{where(item)}: {count} rater masks, expected {target} (data.num_raters); set "
                                f"data.missing_raters=pad to pad missing raters with empty masks")
            labels = np.asarray(item["labels"])
            pad = np.zeros((target - count, *labels.shape[1:]), dtype=labels.dtype)
            item["labels"] = np.concatenate([labels, pad], axis=0)
            present = present + [False] * (target - count)
            padded += 1
        meta["rater_present"] = present
    if padded:
        logger.warning("%d of %d cases have fewer than %d raters; padded with empty masks "
                       "(data.missing_raters=pad)", padded, len(items), target)
    return target


def validate_items(items: list[dict], **kwargs) -> None:
    """Every item valid, at least one item. kwargs: see :func:`validate_item`."""
    if not items:
        raise DataError("the dataset is empty: no cases were found (check data.path and data.format)")
    for item in items:
        validate_item(item, **kwargs)


def require_items(items: Sequence, root, what: str) -> None:
    """Empty dataset error naming the folder and what was looked for."""
    if not items:
        raise DataError(f"{root}: the dataset is empty: no {what} found")


def read_rater_masks(mask_paths, image, image_meta: dict, image_path, *, binarize: bool = False,
                     check_geometry: bool = True, read_kw: Optional[dict] = None) -> list:
    """Read each rater's mask for an image already read with ``io.read_image``.

    Every mask must be a single label map with the image's spatial shape (the
    image may have a trailing channel axis), the same shape as the other raters'
    and, with ``check_geometry``, the image's geometry. Returns the label arrays;
    errors name the mask file.
    """
    from . import io

    labels = []
    for mask_path in mask_paths:
        mask, mask_meta = io.read_image(mask_path, **(read_kw or {}))
        if mask_meta.get("num_components"):
            raise DataError(f"{mask_path}: rater mask has {mask_meta['num_components']} components; expected a "
                            f"single label map")
        spatial = mask.ndim
        if image.ndim not in (spatial, spatial + 1) or tuple(mask.shape) != tuple(image.shape[:spatial]) or \
                (labels and mask.shape != labels[0].shape):
            raise DataError(f"{mask_path}: rater mask shape {tuple(mask.shape)} does not match the image shape "
                            f"{tuple(image.shape)} of {image_path}")
        if check_geometry:
            check_same_geometry(io.trim_geometry(image_meta, spatial), io.trim_geometry(mask_meta, spatial),
                                str(mask_path), str(image_path))
        labels.append(to_labels(mask, str(mask_path), binarize=binarize))
    return labels
