"""The format readers by name, and the per-case steps shared by whole-set loading
(:func:`probunet.data.prepare_items`) and the whole-scan cache (:mod:`probunet.data.preprocess`)."""

from __future__ import annotations

import importlib
import logging

import numpy as np

from .errors import DataError

logger = logging.getLogger(__name__)

# format name -> module in probunet.data with ``read_cases(data_cfg) -> list[dict]``
READERS = {
    "synthetic": "synthetic_reader",
    "lidc_pickle": "lidc_pickle",
    "lidc_crops": "lidc_crops",
    "qubiq": "qubiq",
    "folder": "folder",
}


def read_cases(data_cfg) -> list[dict]:
    """Read every case of ``data_cfg.format`` from ``data_cfg.path``."""
    try:
        module = importlib.import_module(f".{READERS[data_cfg.format]}", __package__)
    except KeyError:
        raise DataError(f"data.format: unknown format {data_cfg.format!r}") from None
    return module.read_cases(data_cfg)


def squeeze_singleton_depth(items: list[dict]) -> None:
    """2D slices stored as 3D volumes of depth 1 ``(x, y, 1)`` become 2D ``(x, y)``."""
    from .io import trim_geometry

    for item in items:
        image, labels = np.asarray(item["image"]), np.asarray(item["labels"])
        if image.ndim == 4 and labels.ndim == 4 and image.shape[-1] == 1 and labels.shape[-1] == 1:
            item["image"], item["labels"] = image[..., 0], labels[..., 0]
            item["meta"] = trim_geometry(item.get("meta", {}), 2)
            logger.debug("%s: 3D of depth 1 read as 2D", item["case_id"])


def apply_group_pattern(items: list[dict], pattern: str) -> None:
    """``meta["group"]`` from the case id: the regex's first group (or whole match)."""
    import re

    rx = re.compile(pattern)
    for item in items:
        m = rx.search(item["case_id"])
        if m is None:
            raise DataError(f"{item.get('meta', {}).get('image_path', item['case_id'])}: case id "
                            f"{item['case_id']!r} does not match data.group_pattern {pattern!r}")
        item.setdefault("meta", {})["group"] = m.group(1) if rx.groups else m.group(0)
