"""A run's split is fixed when the run starts.

Training writes the case lists to ``RUN_DIR/splits.json`` and stores the same
lists in every checkpoint (``"split"``, JSON text). ``probunet evaluate`` and
``train --resume`` read that record instead of splitting the data again, so a
data folder that gained cases can never move training or validation cases into
the test set:

- a recorded case keeps its split;
- a recorded case the data no longer holds is an error naming it;
- a case the record does not know (a new case) is reported in one line and left
  out; with ``include_new`` (``evaluate --include-new-cases``) the new cases of
  *new* patients/series join the test split. A new case whose patient/series is
  in the recorded train or val split never joins any split.

The record applies when the data source is the run's (same ``data.format`` and
``data.path``); another folder is another dataset and is split by its config.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Optional

from .errors import DataError
from .splits import SPLITS, check_disjoint, group_of

logger = logging.getLogger(__name__)

SPLIT_FILE = "splits.json"
CHECKPOINT_KEY = "split"  # the checkpoint entry holding the split's JSON text


def split_record(splits: dict[str, list[dict]]) -> dict[str, list[dict]]:
    """``{"train": [{"case_id", "group"}, ...], "val": ..., "test": ...}`` of split items."""
    return {name: [{"case_id": str(i["case_id"]), "group": group_of(i)} for i in splits.get(name, [])]
            for name in SPLITS}


def split_record_text(splits: dict[str, list[dict]]) -> str:
    """The record as the JSON text ``splits.json`` holds (and checkpoints store)."""
    return json.dumps(split_record(splits), indent=1)


def parse_split_record(text, where: str) -> dict[str, list[tuple[str, str]]]:
    """``{split: [(case_id, group), ...]}`` from a record's JSON text; DataError naming ``where``."""
    try:
        data = json.loads(text) if isinstance(text, (str, bytes)) else None
    except ValueError as exc:
        raise DataError(f"{where}: the run's split record is not valid JSON ({exc})") from None
    if not isinstance(data, dict) or not set(data) - {"meta"} <= set(SPLITS):
        raise DataError(f"{where}: not a split record (expected a JSON object with keys train, val, test)")
    out: dict[str, list[tuple[str, str]]] = {s: [] for s in SPLITS}
    seen: dict[str, str] = {}
    for name in SPLITS:
        entries = data.get(name, [])
        if not isinstance(entries, list):
            raise DataError(f"{where}: split '{name}' must be a list")
        for entry in entries:
            if isinstance(entry, dict) and isinstance(entry.get("case_id"), str):
                case_id, group = entry["case_id"], entry.get("group", entry["case_id"])
            elif isinstance(entry, str):
                case_id, group = entry, entry
            else:
                raise DataError(f"{where}: split '{name}': entries must be case ids or "
                                f"{{\"case_id\": ...}} objects")
            if seen.setdefault(case_id, name) != name:
                raise DataError(f"{where}: case '{case_id}' is recorded in both {seen[case_id]} and {name}")
            out[name].append((case_id, str(group)))
    return out


def read_recorded_split(run_dir: Optional[Path], checkpoint: Optional[dict]) -> tuple[Optional[dict], str]:
    """The run's recorded split and where it came from (``(None, "")`` when there is none).

    The checkpoint's own record (digest-protected) comes first; ``RUN_DIR/splits.json``
    otherwise (runs written before checkpoints held it). Both present and different is
    an error naming the file.
    """
    from_ckpt = from_file = None
    ckpt_where = str((checkpoint or {}).get("path", "the checkpoint"))
    if checkpoint is not None and checkpoint.get(CHECKPOINT_KEY) is not None:
        from_ckpt = parse_split_record(checkpoint[CHECKPOINT_KEY], f"{ckpt_where} (its stored split)")
    path = Path(run_dir) / SPLIT_FILE if run_dir is not None else None
    if path is not None and (path.exists() or path.is_symlink()):
        if not path.is_file():
            raise DataError(f"{path}: the run's split record is not a regular file")
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise DataError(f"{path}: the run's split record cannot be read ({exc.__class__.__name__})") from None
        from_file = parse_split_record(text, str(path))
    if from_ckpt is not None:
        if from_file is not None and _ids(from_file) != _ids(from_ckpt):
            raise DataError(f"{path}: differs from the split stored in {ckpt_where} (edited after training?); "
                            f"restore it or remove it to use the checkpoint's")
        return from_ckpt, str(path) if from_file is not None else f"{ckpt_where} (its stored split)"
    if from_file is not None:
        return from_file, str(path)
    return None, ""


def _ids(record: dict) -> dict[str, list[str]]:
    return {name: sorted(c for c, _ in entries) for name, entries in record.items()}


def _shown(ids: list[str], n: int = 5) -> str:
    return ", ".join(ids[:n]) + (f" and {len(ids) - n} more" if len(ids) > n else "")


def apply_recorded_split(items: list[dict], record: dict[str, list[tuple[str, str]]], where: str, *,
                         include_new: bool = False, hint: bool = True) -> dict[str, list[dict]]:
    """Split ``items`` as ``record`` says (see the module doc); DataError naming missing cases.
    ``hint``: name the evaluate option in the report of new cases."""
    split_of = {c: name for name, entries in record.items() for c, _ in entries}
    fixed_groups = {g for name in ("train", "val") for _, g in record.get(name, [])}
    out: dict[str, list[dict]] = {s: [] for s in SPLITS}
    new, new_of_known = [], []
    present = set()
    for item in items:
        case_id = str(item["case_id"])
        name = split_of.get(case_id)
        if name is not None:
            present.add(case_id)
            out[name].append(item)
        elif group_of(item) in fixed_groups:
            new_of_known.append(item)
        else:
            new.append(item)
    missing = sorted(set(split_of) - present)
    if missing:
        raise DataError(f"{where}: {len(missing)} case(s) of the run's split are missing from the data "
                        f"({_shown(missing)}); the data changed since training: restore them, or point "
                        f"data.path at another folder to evaluate other cases")
    if new or new_of_known:
        ids = [str(i["case_id"]) for i in new + new_of_known]
        parts = []
        if include_new and new:
            out["test"].extend(new)
            parts.append(f"{len(new)} joined the test split (--include-new-cases)")
        elif new:
            parts.append(f"{len(new)} left out" + (" (evaluate --include-new-cases adds those of new "
                                                   "patients/series to the test split)" if hint else ""))
        if new_of_known:
            parts.append(f"{len(new_of_known)} left out for good (their patient/series is in the recorded "
                         f"train/val split)")
        logger.warning("%s: %d case(s) are new since the run's split was fixed (%s): %s", where, len(ids),
                       _shown(ids), "; ".join(parts))
    check_disjoint(out)
    return out


def same_data_source(cfg_data: dict, trained_data: dict) -> bool:
    """Whether the evaluated data is the run's own: same ``format`` and ``path`` (the same
    folder however it is spelled); for synthetic data generated in memory, also the same
    generator settings but the number of cases (more cases: the run's cases plus new ones)."""
    if cfg_data.get("format") != trained_data.get("format"):
        return False
    a, b = cfg_data.get("path") or "", trained_data.get("path") or ""
    if not a and not b and cfg_data.get("format") == "synthetic":
        drop = lambda d: {k: v for k, v in (d.get("synthetic") or {}).items() if k != "num_cases"}  # noqa: E731
        return drop(cfg_data) == drop(trained_data)
    if a == b:
        return True
    if not a or not b:
        return False
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


__all__ = ["CHECKPOINT_KEY", "SPLIT_FILE", "apply_recorded_split", "parse_split_record", "read_recorded_split",
           "same_data_source", "split_record", "split_record_text"]
