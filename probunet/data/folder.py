"""``data.format: folder``: images and rater masks found by patterns, 2D or 3D.

``data.image_pattern`` and ``data.mask_pattern`` are globs relative to
``data.path`` with a ``{case}`` placeholder; the mask pattern may also hold
``{rater}``. Example::

    data:
      format: folder
      path: /data/study
      image_pattern: "images/{case}.nii.gz"          # or "{case}/ct.nrrd", "dicom/{case}" (a DICOM series folder)
      mask_pattern: "labels/{case}_rater{rater}.nii.gz"

Cases are the ``{case}`` values matched by the image pattern. Each case's masks
are the files matching the mask pattern with that case filled in, ordered by the
``{rater}`` value (numerically when it is a number) or by path. Files are read
with :func:`probunet.data.io.read_image` (nibabel for NIfTI, SimpleITK for NRRD,
MHA/MHD, PNG, DICOM, ...); arrays are in (x, y[, z]) order. The masks fix the
number of spatial axes; an image with one more axis has its channels last.
Masks must share the image's shape and (unless ``data.check_geometry: false``)
its spacing, origin and direction.
"""

from __future__ import annotations

import glob
import logging
import re
from pathlib import Path
from typing import Optional

import numpy as np

from . import io
from .errors import DataError
from .guards import read_limits
from .validate import read_rater_masks, require_items, to_image

logger = logging.getLogger(__name__)


def _pattern_regex(pattern: str) -> re.Pattern:
    """Regex for a glob pattern with {case}/{rater} placeholders (captured)."""
    out = []
    i = 0
    seen = set()
    while i < len(pattern):
        for name in ("case", "rater"):
            token = "{" + name + "}"
            if pattern.startswith(token, i):
                if name in seen:
                    out.append(f"(?P={name})")
                else:
                    out.append(f"(?P<{name}>[^/]+?)")
                    seen.add(name)
                i += len(token)
                break
        else:
            ch = pattern[i]
            if pattern.startswith("**/", i):
                out.append("(?:.*/)?")
                i += 3
                continue
            if ch == "*":
                out.append("[^/]*")
            elif ch == "?":
                out.append("[^/]")
            elif ch == "[":
                j = pattern.find("]", i)
                if j == -1:
                    out.append(re.escape(ch))
                else:
                    out.append(pattern[i:j + 1].replace("[!", "[^"))
                    i = j
            else:
                out.append(re.escape(ch))
            i += 1
    return re.compile("^" + "".join(out) + "$")


def _glob(root: Path, pattern: str) -> list[str]:
    """Relative paths (with '/') under root that match a glob (placeholders already filled)."""
    hits = glob.glob(pattern, root_dir=str(root), recursive=True)
    return sorted(h.replace("\\", "/") for h in hits)


def _natural_key(text: str):
    return [(0, int(t), "") if t.isdigit() else (1, 0, t) for t in re.split(r"(\d+)", text)]


def find_cases(root: Path, image_pattern: str, mask_pattern: str) -> list[tuple[str, Path, list[tuple[str, Path]]]]:
    """``[(case, image_path, [(rater, mask_path), ...]), ...]`` sorted by case."""
    if "{case}" not in image_pattern:
        raise DataError(f"data.image_pattern {image_pattern!r}: needs a {{case}} placeholder, e.g. "
                        f"'images/{{case}}.nii.gz'")
    if "{case}" not in mask_pattern:
        raise DataError(f"data.mask_pattern {mask_pattern!r}: needs a {{case}} placeholder, e.g. "
                        f"'labels/{{case}}_rater{{rater}}.nii.gz'")
    img_glob = image_pattern.replace("{case}", "*")
    img_re = _pattern_regex(image_pattern)
    cases: dict[str, Path] = {}
    for rel in _glob(root, img_glob):
        m = img_re.match(rel)
        if not m:
            continue
        case = m.group("case")
        if case in cases:
            raise DataError(f"{root / rel}: case {case!r} matches data.image_pattern twice (also {cases[case]}); "
                            f"make the pattern more specific")
        cases[case] = root / rel
    out = []
    for case in sorted(cases, key=_natural_key):
        filled = mask_pattern.replace("{case}", glob.escape(case))
        mask_re = _pattern_regex(mask_pattern)
        masks = []
        for rel in _glob(root, filled.replace("{rater}", "*")):
            m = mask_re.match(rel)
            if not m or m.group("case") != case:
                continue
            if (root / rel) == cases[case]:
                continue  # the image itself matched a loose mask pattern
            rater = m.group("rater") if "rater" in m.groupdict() else rel
            masks.append((rater, root / rel))
        masks.sort(key=lambda rp: _natural_key(rp[0]))
        out.append((case, cases[case], masks))
    return out


def read_case(case: str, image_path: Path, masks: list[tuple[str, Path]], *, binarize: bool = False,
              check_geometry: bool = True, read_kw: Optional[dict] = None) -> dict:
    if not masks:
        raise DataError(f"{image_path}: no rater masks found for case {case!r} (check data.mask_pattern)")
    image, image_meta = io.read_image(image_path, **(read_kw or {}))
    labels = read_rater_masks([m for _, m in masks], image, image_meta, image_path, binarize=binarize,
                              check_geometry=check_geometry, read_kw=read_kw)
    spatial = labels[0].ndim
    geometry = io.trim_geometry(image_meta, spatial)
    meta = {
        "group": case,
        "image_path": str(image_path),
        "mask_paths": [str(p) for _, p in masks],
        "raters": [r for r, _ in masks],
        **{k: geometry[k] for k in ("spacing", "origin", "direction", "affine", "format", "shape") if k in geometry},
    }
    return {"image": to_image(image, str(image_path), spatial), "labels": np.stack(labels), "case_id": case,
            "meta": meta}


def read_cases(data_cfg) -> list[dict]:
    root = Path(data_cfg.path)
    if not root.is_dir():
        raise DataError(f"{root}: data.path is not a folder")
    if not data_cfg.image_pattern or not data_cfg.mask_pattern:
        raise DataError("data.format=folder needs data.image_pattern and data.mask_pattern (globs relative to "
                        "data.path with a {case} placeholder, e.g. 'images/{case}.nii.gz' and "
                        "'labels/{case}_r{rater}.nii.gz')")
    binarize = bool(getattr(data_cfg, "binarize", False))
    check_geometry = bool(getattr(data_cfg, "check_geometry", True))
    found = find_cases(root, data_cfg.image_pattern, data_cfg.mask_pattern)
    require_items(found, root, f"images matching data.image_pattern={data_cfg.image_pattern!r}")
    read_kw = read_limits(data_cfg)
    items = [read_case(case, img, masks, binarize=binarize, check_geometry=check_geometry, read_kw=read_kw)
             for case, img, masks in found]
    logger.info("folder: %d cases from %s", len(items), root)
    return items
