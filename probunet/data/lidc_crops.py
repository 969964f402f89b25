"""``data.format: lidc_crops``: the PNG crop release of the hierarchical Prob U-Net authors.

::

    <data.path>/<split>/images/<patient>/<name>.png       # 180 x 180 uint8 CT crop
    <data.path>/<split>/gt/<patient>/<name>_l<k>.png      # reader k = 0..3, 0/255 (or 0/1)

``<split>`` is ``train``, ``val`` and ``test`` in the release; ``data.path`` may
also be one split folder (holding ``images/`` and ``gt/``). Papers centre-crop
the 180 x 180 crops to 128 x 128: ``data.crop_size: 128``. PNGs are read with
Pillow as rows x columns ``(H, W)``; the image is scaled to [0, 1] by its bit
depth (255 or 65535). Masks must hold two values, 0 and 1 or 0 and 255
(``data.binarize: true`` accepts any value > 0 as foreground). A slice with fewer
than 4 reader files is padded with empty masks or refused (``data.missing_raters``).

Groups: the patient folder. ``meta["release_split"]`` records the release's own
split, which ``data.split.protocol: release`` keeps.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Optional

import numpy as np

from .errors import DataError
from .guards import MAX_RATERS, check_regular_file, check_voxels
from .validate import require_items

logger = logging.getLogger(__name__)

_GT = re.compile(r"^(?P<name>.+)_l(?P<k>\d+)\.png$", re.IGNORECASE)
_SPLIT_NAMES = {"train": "train", "training": "train", "val": "val", "valid": "val", "validation": "val",
                "test": "test", "testing": "test"}


def read_png(path: Path, max_voxels: Optional[int] = None) -> np.ndarray:
    """A PNG as (H, W) array in its stored dtype; an RGB(A) file whose colour channels
    are equal is read as grey, anything else is an error naming the file."""
    from PIL import Image, UnidentifiedImageError

    check_regular_file(path)
    with open(path, "rb") as fh:
        head = fh.read(24)
    if head[:8] == b"\x89PNG\r\n\x1a\n" and head[12:16] == b"IHDR":  # the size, before PIL sees the file
        check_voxels(path, (int.from_bytes(head[16:20], "big"), int.from_bytes(head[20:24], "big")), max_voxels)
    try:
        with Image.open(path) as im:
            check_voxels(path, im.size, max_voxels, len(im.getbands()))  # the header's claim, before decoding
            im.load()
            mode = im.mode
            array = np.asarray(im)
    except (OSError, UnidentifiedImageError, Image.DecompressionBombError) as exc:
        raise DataError(f"{path}: cannot read this PNG ({exc})") from None
    if array.ndim == 3:
        if mode in ("RGB", "RGBA") and np.array_equal(array[..., 0], array[..., 1]) and \
                np.array_equal(array[..., 0], array[..., 2]):
            array = array[..., 0]
        elif mode == "LA":
            array = array[..., 0]
        else:
            raise DataError(f"{path}: expected a grey-scale PNG, got mode {mode} with differing colour channels")
    if array.dtype == bool:
        array = array.astype(np.uint8)
    return array


def _mask_labels(mask: np.ndarray, path: Path, binarize: bool) -> np.ndarray:
    if binarize:
        return (mask > 0).astype(np.int64)
    values = np.unique(mask)
    if set(values.tolist()) <= {0, 1}:
        return mask.astype(np.int64)
    if set(values.tolist()) <= {0, 255}:
        return (mask == 255).astype(np.int64)
    raise DataError(f"{path}: mask values {values[:8].tolist()} are not binary (0/1 or 0/255); set "
                    f"data.binarize=true to take every value > 0 as foreground")


def _split_dirs(root: Path) -> list[tuple[Path, str | None]]:
    if (root / "images").is_dir():
        return [(root, _SPLIT_NAMES.get(root.name.lower()))]
    found = [(d, _SPLIT_NAMES.get(d.name.lower())) for d in sorted(root.iterdir())
             if d.is_dir() and (d / "images").is_dir()]
    if not found:
        raise DataError(f"{root}: no images/ folder here or in any sub-folder (expected "
                        f"<split>/images/<patient>/<name>.png and <split>/gt/<patient>/<name>_l<k>.png)")
    return found


def read_split_dir(split_dir: Path, release_split: str | None, *, binarize: bool = False,
                   max_voxels: Optional[int] = None) -> list[dict]:
    images_dir, gt_dir = split_dir / "images", split_dir / "gt"
    if not gt_dir.is_dir():
        raise DataError(f"{gt_dir}: folder not found (the reader masks of {images_dir})")
    items = []
    for patient_dir in sorted(p for p in images_dir.iterdir() if p.is_dir()):
        patient = patient_dir.name
        gts: dict[str, list[tuple[int, Path]]] = {}
        gt_patient = gt_dir / patient
        if gt_patient.is_dir():
            for p in gt_patient.iterdir():
                m = _GT.match(p.name)
                if m:
                    gts.setdefault(m.group("name"), []).append((int(m.group("k")), p))
        for image_path in sorted(patient_dir.glob("*.png")):
            name = image_path.stem
            raters = sorted(gts.get(name, []))
            if not raters:
                raise DataError(f"{image_path}: no reader masks {gt_patient}/{name}_l<k>.png")
            if max(k for k, _ in raters) >= MAX_RATERS:
                raise DataError(f"{image_path}: reader mask number {max(k for k, _ in raters)} in {gt_patient}; "
                                f"at most {MAX_RATERS} raters per image")
            image = read_png(image_path, max_voxels)
            scale = 65535.0 if image.dtype == np.uint16 else 255.0 if image.dtype == np.uint8 else 1.0
            labels = []
            for k, mask_path in raters:
                mask = read_png(mask_path, max_voxels)
                if mask.shape != image.shape:
                    raise DataError(f"{mask_path}: mask shape {mask.shape} does not match the image shape "
                                    f"{image.shape} of {image_path}")
                labels.append(_mask_labels(mask, mask_path, binarize))
            # Readers by their k: a missing k in the middle stays an empty mask, so reader k is row k.
            num = max(k for k, _ in raters) + 1
            stack = np.zeros((num, *image.shape), dtype=np.int64)
            present = [False] * num
            for (k, _), lab in zip(raters, labels):
                stack[k] = lab
                present[k] = True
            if not all(present) and num > len(raters):
                logger.debug("%s: readers %s missing", image_path, [k for k in range(num) if not present[k]])
            items.append({
                "image": (image.astype(np.float32) / np.float32(scale))[None],
                "labels": stack,
                "case_id": f"{patient}/{name}" if release_split is None else f"{release_split}/{patient}/{name}",
                "meta": {"group": patient, "patient": patient, "image_path": str(image_path),
                         "mask_paths": [str(p) for _, p in raters], "release_split": release_split,
                         "rater_present": present},
            })
    return items


def read_cases(data_cfg) -> list[dict]:
    root = Path(data_cfg.path)
    if not root.is_dir():
        raise DataError(f"{root}: data.path is not a folder (expected the lidc_crops release: "
                        f"<split>/images/<patient>/<name>.png)")
    binarize = bool(getattr(data_cfg, "binarize", False))
    items = []
    for split_dir, release_split in _split_dirs(root):
        new = read_split_dir(split_dir, release_split, binarize=binarize,
                             max_voxels=getattr(data_cfg, "max_voxels", None))
        logger.info("lidc_crops: %d slices from %s", len(new), split_dir)
        items.extend(new)
    require_items(items, root, "PNG crops under <split>/images/<patient>/")
    return items
