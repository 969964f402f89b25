"""The dataset layouts (``data.format``) by name, and the per-case steps shared by whole-set loading
(:func:`probunet.data.prepare_items`) and the whole-scan cache (:mod:`probunet.data.preprocess`)."""

from __future__ import annotations

import importlib
import logging

import numpy as np

from ..config import DATA_FORMATS
from .errors import DataError

logger = logging.getLogger(__name__)

# The dataset layouts (``data.format``): name -> the module that reads it, with
# ``read_cases(data_cfg) -> list[dict]`` (and optionally ``iter_cases(data_cfg)``, one case at a time).
# A module name starting with a dot is one of probunet.data. The config's data.format choices are these names.
READERS: dict[str, str] = {}


def register_layout(name: str, module: str) -> None:
    """Make ``data.format: name`` read by ``module`` (``".folder"``: probunet.data.folder; or an absolute
    module name); one call adds a layout to the readers and to the config's choices."""
    if not name or not isinstance(name, str) or not isinstance(module, str) or not module:
        raise ValueError(f"a dataset layout needs a name and a module, got {name!r}, {module!r}")
    READERS[name] = module


def unregister_layout(name: str) -> None:
    READERS.pop(name, None)


register_layout("synthetic", ".synthetic_reader")
register_layout("lidc_pickle", ".lidc_pickle")
register_layout("lidc_crops", ".lidc_crops")
register_layout("qubiq", ".qubiq")
register_layout("folder", ".folder")
DATA_FORMATS.provide(lambda: tuple(READERS))


def layout_module(data_format: str):
    """The module that reads ``data.format``; DataError naming the key for an unknown one."""
    try:
        module = READERS[data_format]
    except KeyError:
        raise DataError(f"data.format: unknown format {data_format!r} (known: {', '.join(READERS)})") from None
    return importlib.import_module(module, __package__ if module.startswith(".") else None)


def read_cases(data_cfg) -> list[dict]:
    """Read every case of ``data_cfg.format`` from ``data_cfg.path``."""
    return layout_module(data_cfg.format).read_cases(data_cfg)


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
