"""Data: readers for each format, validation, splits, transforms, the synthetic set.

Every reader returns items of one shape::

    {"image": (C, *spatial) float32, "labels": (A, *spatial) int64,
     "case_id": str, "meta": {"group": patient/series id, ...geometry...}}
"""

from __future__ import annotations

import importlib
import logging
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from torch.utils.data import Dataset

from .splits import split_items, write_split
from .transforms import normalize_image, train_transform
from .validate import DataError, validate_items

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
        module = importlib.import_module(f".{READERS[data_cfg.format]}", __name__)
    except KeyError:
        raise DataError(f"data.format: unknown format {data_cfg.format!r}") from None
    return module.read_cases(data_cfg)


def prepare_items(items: list[dict], cfg) -> list[dict]:
    """Normalise intensities and check every item against the model config."""
    for item in items:
        item["image"] = normalize_image(item["image"], cfg.data)
        item["labels"] = np.asarray(item["labels"]).astype(np.int64, copy=False)
    validate_items(items, num_classes=cfg.model.num_classes, in_channels=cfg.model.in_channels,
                   spatial_dims=cfg.model.spatial_dims)
    return items


def load_splits(cfg, run_dir: Optional[str | Path] = None) -> dict[str, list[dict]]:
    """Read, normalise, validate and split the dataset of ``cfg.data``.

    Writes ``RUN_DIR/splits.json`` (the case lists) when ``run_dir`` is given.
    """
    items = prepare_items(read_cases(cfg.data), cfg)
    splits = split_items(items, cfg.data.split)
    if run_dir is not None:
        write_split(splits, Path(run_dir) / "splits.json")
    logger.info("data: %s", ", ".join(f"{k} {len(v)}" for k, v in splits.items()))
    return splits


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
           "read_cases", "split_items", "train_transform", "validate_items", "write_split"]
