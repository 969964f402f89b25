"""``data.format: qubiq``: the QUBIQ challenge layout.

::

    <data.path>/<case>/image.nii.gz
    <data.path>/<case>/task01_seg01.nii.gz   # task TT (data.task), rater RR
    <data.path>/<case>/task01_seg02.nii.gz
    ...

Raters are counted per case (``task<TT>_seg*.nii.gz`` sorted by rater number).
Images of shape ``(x, y[, z])`` get a channel axis; an image with one axis more
than its masks (e.g. QUBIQ brain-tumor, ``(x, y, 4)``) has its channels last.
Sub-folders with neither ``image.nii*`` nor task files are skipped (logged).
"""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Optional

from . import io
from .errors import DataError
from .guards import read_limits
from .validate import read_rater_masks, require_items, to_image

logger = logging.getLogger(__name__)

_SEG = re.compile(r"^task(\d+)_seg(\d+)\.nii(\.gz)?$", re.IGNORECASE)


def _find_image(case_dir: Path):
    for name in ("image.nii.gz", "image.nii"):
        if (case_dir / name).is_file():
            return case_dir / name
    return None


def _rater_files(case_dir: Path, task: int) -> list[tuple[int, Path]]:
    found = []
    for p in case_dir.iterdir():
        m = _SEG.match(p.name)
        if m and int(m.group(1)) == task:
            found.append((int(m.group(2)), p))
    found.sort()
    numbers = [n for n, _ in found]
    if len(set(numbers)) != len(numbers):
        raise DataError(f"{case_dir}: two files for the same rater of task {task:02d} "
                        f"({', '.join(p.name for _, p in found)})")
    return found


def read_case(case_dir: Path, task: int, *, binarize: bool = False, check_geometry: bool = True,
              read_kw: Optional[dict] = None) -> dict:
    """One QUBIQ case folder -> item (see probunet.data)."""
    import numpy as np

    image_path = _find_image(case_dir)
    if image_path is None:
        raise DataError(f"{case_dir}: no image.nii.gz in this case folder")
    raters = _rater_files(case_dir, task)
    if not raters:
        tasks = sorted({int(m.group(1)) for p in case_dir.iterdir() if (m := _SEG.match(p.name))})
        hint = f" (tasks here: {', '.join(f'{t:02d}' for t in tasks)}; set data.task)" if tasks else ""
        raise DataError(f"{case_dir}: no rater masks task{task:02d}_seg*.nii.gz{hint}")
    image, image_meta = io.read_image(image_path, **(read_kw or {}))
    labels = read_rater_masks([m for _, m in raters], image, image_meta, image_path, binarize=binarize,
                              check_geometry=check_geometry, read_kw=read_kw)
    spatial_ndim = labels[0].ndim
    image_meta = io.trim_geometry(image_meta, spatial_ndim)  # channels last: geometry of the spatial axes
    case_id = case_dir.name
    meta = {
        "group": case_id,
        "image_path": str(image_path),
        "mask_paths": [str(p) for _, p in raters],
        "raters": [n for n, _ in raters],
        **{k: image_meta[k] for k in ("spacing", "origin", "direction", "affine", "shape") if k in image_meta},
    }
    return {"image": to_image(image, str(image_path), spatial_ndim),
            "labels": np.stack(labels).astype(np.int64, copy=False), "case_id": case_id, "meta": meta}


def iter_cases(data_cfg):
    """The cases under ``data_cfg.path`` one at a time (for preprocessing sets larger than memory)."""
    root = Path(data_cfg.path)
    if not root.is_dir():
        raise DataError(f"{root}: data.path is not a folder (expected <root>/<case>/image.nii.gz and "
                        f"task{int(data_cfg.task):02d}_seg<RR>.nii.gz)")
    task = int(data_cfg.task)
    binarize = bool(getattr(data_cfg, "binarize", False))
    check_geometry = bool(getattr(data_cfg, "check_geometry", True))
    for case_dir in sorted(p for p in root.iterdir() if p.is_dir()):
        has_image = _find_image(case_dir) is not None
        has_segs = any(_SEG.match(p.name) for p in case_dir.iterdir())
        if not has_image and not has_segs:
            logger.debug("qubiq: skipping %s (no image.nii.gz, no task files)", case_dir)
            continue
        yield read_case(case_dir, task, binarize=binarize, check_geometry=check_geometry,
                        read_kw=read_limits(data_cfg))


def read_cases(data_cfg) -> list[dict]:
    """Every case under ``data_cfg.path`` for task ``data_cfg.task``, sorted by folder name."""
    items = list(iter_cases(data_cfg))
    root, task = Path(data_cfg.path), int(data_cfg.task)
    require_items(items, root, f"case folders with image.nii.gz and task{task:02d}_seg*.nii.gz")
    logger.info("qubiq: %d cases, task %02d, from %s", len(items), task, root)
    return items
