"""Train / validation / test splits by group (patient or series), never by slice."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np


def group_of(item: dict) -> str:
    return str(item.get("meta", {}).get("group", item["case_id"]))


def split_groups(groups: list[str], *, seed: int, test_fraction: float, val_fraction: float) -> dict[str, list[str]]:
    """Deterministic split of unique groups: ``test_fraction`` of all groups to test,
    then ``val_fraction`` of the rest to validation (the LIDC papers' protocol,
    here with a fixed seed). Every split gets at least one group when there are
    at least three groups.
    """
    uniq = sorted(set(groups))
    order = np.random.default_rng(seed).permutation(len(uniq))
    shuffled = [uniq[i] for i in order]
    n = len(shuffled)
    n_test = int(round(test_fraction * n))
    n_val = int(round(val_fraction * (n - n_test)))
    if n >= 3:
        n_test = max(n_test, 1) if test_fraction > 0 else 0
        n_val = max(n_val, 1) if val_fraction > 0 else 0
    test = shuffled[:n_test]
    val = shuffled[n_test:n_test + n_val]
    train = shuffled[n_test + n_val:]
    return {"train": train, "val": val, "test": test}


def read_split_file(path: str | Path) -> dict[str, list[str]]:
    """A user's split: JSON ``{"train": [...], "val": [...], "test": [...]}`` or CSV
    with columns ``case_id,split``. Entries are case ids or group ids."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"split file not found: {path}")
    out: dict[str, list[str]] = {"train": [], "val": [], "test": []}
    if path.suffix.lower() == ".json":
        data = json.loads(path.read_text())
        if not isinstance(data, dict):
            raise ValueError(f"{path}: expected a JSON object with keys train, val, test")
        for key, ids in data.items():
            if key not in out:
                raise ValueError(f"{path}: unknown split '{key}' (expected train, val, test)")
            out[key] = [str(i) for i in ids]
    else:
        with open(path, newline="") as fh:
            reader = csv.DictReader(fh)
            if reader.fieldnames is None or not {"case_id", "split"} <= set(reader.fieldnames):
                raise ValueError(f"{path}: expected CSV columns case_id,split")
            for row in reader:
                if row["split"] not in out:
                    raise ValueError(f"{path}: unknown split '{row['split']}' for case {row['case_id']}")
                out[row["split"]].append(row["case_id"])
    return out


def split_items(items: list[dict], split_cfg) -> dict[str, list[dict]]:
    """Assign items to train / val / test by group; with ``split_cfg.file`` from that file."""
    if split_cfg.file:
        wanted = read_split_file(split_cfg.file)
        lookup = {}
        for name, ids in wanted.items():
            for i in ids:
                lookup[i] = name
        out = {"train": [], "val": [], "test": []}
        for item in items:
            name = lookup.get(item["case_id"], lookup.get(group_of(item)))
            if name is not None:
                out[name].append(item)
        return out
    groups = split_groups([group_of(i) for i in items], seed=split_cfg.seed,
                          test_fraction=split_cfg.test_fraction, val_fraction=split_cfg.val_fraction)
    where = {g: name for name, gs in groups.items() for g in gs}
    out = {"train": [], "val": [], "test": []}
    for item in items:
        out[where[group_of(item)]].append(item)
    return out


def write_split(splits: dict[str, list[dict]], path: str | Path) -> None:
    """Write the case lists (and their groups) as JSON so others can reproduce the split."""
    from ..utils import atomic_write_text

    data = {name: [{"case_id": i["case_id"], "group": group_of(i)} for i in items]
            for name, items in splits.items()}
    atomic_write_text(path, json.dumps(data, indent=1))
