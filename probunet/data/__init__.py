"""Data: readers for each format, validation, splits, transforms, the synthetic set.

Every reader returns items of one shape::

    {"image": (C, *spatial) float32, "labels": (A, *spatial) int64,
     "case_id": str, "meta": {"group": patient/series id, ...geometry...}}
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from torch.utils.data import Dataset

from .splits import split_items, write_split
from .transforms import crop_item, normalize_image, train_transform
from .errors import DataError
from .validate import check_same_shapes, harmonize_raters, validate_items
from .readers import READERS, apply_group_pattern, read_cases, squeeze_singleton_depth

logger = logging.getLogger(__name__)


def prepare_items(items: list[dict], cfg) -> list[dict]:
    """Make read items trainable, checking each before training starts.

    In order: the same number of raters for every case (``data.num_raters``,
    ``data.missing_raters``), patient groups from ``data.group_pattern``, checks
    of every item (shapes, NaN/Inf, integer labels within ``model.num_classes``,
    channels and spatial dims as the model expects), intensity normalisation
    (``data.normalize``), the centre crop / pad to ``data.crop_size``, and a
    common spatial shape across cases. Errors are :class:`DataError` naming the file.
    """
    data_cfg = cfg.data
    if not items:
        raise DataError(f"{data_cfg.path}: the dataset is empty: no cases were found")
    for item in items:
        item["labels"] = np.asarray(item["labels"]).astype(np.int64, copy=False)
    harmonize_raters(items, data_cfg.num_raters, data_cfg.missing_raters)
    if cfg.model.spatial_dims == 2:
        squeeze_singleton_depth(items)
    if getattr(data_cfg, "group_pattern", None):
        apply_group_pattern(items, data_cfg.group_pattern)
    kwargs = dict(num_classes=cfg.model.num_classes, in_channels=cfg.model.in_channels,
                  spatial_dims=cfg.model.spatial_dims)
    validate_items(items, **kwargs)
    for item in items:
        item["image"] = normalize_image(item["image"], data_cfg)
        if data_cfg.crop_size is not None:
            crop_item(item, data_cfg.crop_size)
    validate_items(items, **kwargs)
    check_same_shapes(items)
    return items


def load_splits(cfg, run_dir: Optional[str | Path] = None, *, recorded: Optional[dict] = None,
                recorded_from: str = "", include_new: bool = False, hint: bool = True, by_case_ids: bool = False,
                fixed_split: Optional[str] = None) -> dict[str, list[dict]]:
    """Read, normalise, validate and split the dataset of ``cfg.data``.

    ``recorded`` (a run's split record, :mod:`probunet.data.recorded_split`): the cases
    keep the splits recorded when the run started (``recorded_from`` names the record in
    messages); new cases are left out unless ``include_new``, missing ones are an error.
    Otherwise the data is split by ``cfg.data.split`` and, when ``run_dir`` is given,
    the case lists are written to ``RUN_DIR/splits.json``.
    ``by_case_ids``: the data is read from another path than the run's; the record applies when
    the data holds any of its case ids, else the data is another dataset
    (:func:`probunet.data.recorded_split.resolve_by_case_ids`); ``fixed_split``: the message of
    the DataError raised when the record applies (``data.split`` was changed: the split is fixed).
    With ``data.patch_size`` the cases come from the preprocessed cache, as memory maps
    (:func:`probunet.data.preprocess.load_cached_items`), under the same rules.
    """
    if getattr(cfg.data, "patch_size", None) is not None:
        from .preprocess import load_cached_items

        items = load_cached_items(cfg)
    else:
        items = prepare_items(read_cases(cfg.data), cfg)
    if recorded is not None and by_case_ids:
        from .recorded_split import resolve_by_case_ids

        recorded = resolve_by_case_ids(items, recorded, recorded_from or "the run's split", str(cfg.data.path))
    if recorded is not None and fixed_split:
        raise DataError(fixed_split)
    if recorded is not None:
        from .recorded_split import apply_recorded_split

        splits = apply_recorded_split(items, recorded, recorded_from or "the run's split", include_new=include_new,
                                      hint=hint, moved=by_case_ids)
    else:
        splits = split_items(items, cfg.data.split)
        if run_dir is not None:
            write_split(splits, Path(run_dir) / "splits.json")
    logger.info("data: %s", ", ".join(f"{k} {len(v)}" for k, v in splits.items()))
    return splits


def real_raters(item: dict) -> np.ndarray:
    """The case's real rater masks ``(A', *spatial)``: raters a reader padded in
    (``meta["rater_present"]`` false, with ``data.missing_raters: pad``) are left out."""
    labels = np.asarray(item["labels"])
    present = item.get("meta", {}).get("rater_present")
    if present is not None and len(present) == labels.shape[0] and any(present) and not all(present):
        labels = labels[np.asarray(present, dtype=bool)]
    return labels


class MultiRaterDataset(Dataset):
    """Items as tensors: ``image`` (C, *spatial) float32, ``labels`` (A, *spatial) int64.

    The whole set is held in memory (cached) and the optional ``transform`` (MONAI
    dictionary transforms) applies jointly to the image and all raters' masks.
    """

    def __init__(self, items: list[dict], transform=None):
        self.items = items
        self.transform = transform

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict:
        item = self.items[index]
        out = {"image": torch.as_tensor(item["image"]), "labels": torch.as_tensor(item["labels"])}
        if self.transform is not None:
            out = self.transform(out)
            out["image"] = torch.as_tensor(out["image"]).float()
            out["labels"] = torch.as_tensor(out["labels"]).round().long()
        out["index"] = index
        return out


__all__ = ["DataError", "MultiRaterDataset", "READERS", "load_splits", "normalize_image", "prepare_items",
           "read_cases", "real_raters", "split_items", "train_transform", "validate_items", "write_split"]
