"""A run's split is fixed when the run starts.

Training writes the case lists to ``RUN_DIR/splits.json`` and stores the same
lists in every checkpoint (``"split"``, JSON text). ``probunet evaluate`` and
``train --resume`` read that record instead of splitting the data again, so a
data folder that gained cases can never move training or validation cases into
the test set:

- a recorded case keeps its split;
- a recorded case the data no longer holds is an error naming it (a warning for
  data recognised by its case ids at another path);
- a case the record does not know (a new case) is reported in one line and left
  out; with ``include_new`` (``evaluate --include-new-cases``) the new cases of
  *new* patients/series join the test split. A new case whose patient/series is
  in the recorded train or val split never joins any split.

The record applies when the data source is the run's (same ``data.format`` and
``data.path``). Data read from another path is recognised by its case ids
(:func:`run_split_for`): when it holds cases of the run's record (the run's data,
moved or copied, maybe with cases added) the record applies under the same rules;
only data that shares no case id with the record is another dataset, split by its
config. Synthetic data generated in memory is recognised by its generator settings.
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
                         include_new: bool = False, hint: bool = True, moved: bool = False) -> dict[str, list[dict]]:
    """Split ``items`` as ``record`` says (see the module doc); DataError naming missing cases.
    ``hint``: name the evaluate option in the report of new cases. ``moved``: the data was recognised
    by its case ids at another path: recorded cases it lacks are a warning, not an error (the cases it
    holds keep their recorded split; a copy may hold a part of the run's data)."""
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
    if missing and moved:
        logger.warning("%s: %d case(s) of the run's split are not in the data at this path (%s); it shares %d "
                       "case id(s) with the run's split, so those keep their recorded split (a training case is "
                       "never scored as a test case)", where, len(missing), _shown(missing), len(present))
    elif missing:
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


def record_case_ids(record: dict) -> set[str]:
    return {c for entries in record.values() for c, _ in entries}


def run_split_for(run_dir: Optional[Path], checkpoint: dict, now_data: dict, trained_data: dict) \
        -> tuple[Optional[dict], str, bool]:
    """The run's recorded split for evaluating the data ``now_data`` (a ``cfg.data`` as a dict) with a
    run trained on ``trained_data``: ``(record, where, by_case_ids)``.

    - the run's own data source (:func:`same_data_source`): its record (``(None, "", False)`` for a run
      without one, logged as a warning);
    - data at another path, for a run trained on files: the record with ``by_case_ids`` true: it
      applies when the data holds any of its case ids (:func:`resolve_by_case_ids`);
    - otherwise (synthetic data with other generator settings, another format without a path):
      another dataset, ``(None, "", False)``.
    """
    if same_data_source(now_data, trained_data):
        record, where = read_recorded_split(run_dir, checkpoint)
        if record is None:
            logger.warning("%s: no recorded split (a run from before probunet kept one); the data is split again "
                           "by data.split, which matches training only if the data did not change",
                           checkpoint.get("path", "the checkpoint"))
        return record, where, False
    if now_data.get("path") and trained_data.get("path"):
        record, where = read_recorded_split(run_dir, checkpoint)
        if record is not None:
            return record, where, True
    logger.info("the data (format, path or synthetic settings) differs from the run's: another dataset, "
                "split by its data.split")
    return None, "", False


def resolve_by_case_ids(items: list[dict], record: dict, where: str, path: str) -> Optional[dict]:
    """``record`` when ``items`` (read from ``path``, not the run's data path) hold any of its case ids,
    else None (another dataset); logged either way."""
    known = record_case_ids(record)
    shared = known & {str(i["case_id"]) for i in items}
    if not shared:
        logger.info("%s: none of its %d case ids is in the run's split (%s): another dataset, split by its "
                    "data.split", path, len(items), where)
        return None
    logger.info("%s: %d of the run's %d recorded case ids are there: the run's data at another path; the "
                "recorded split (%s) applies", path, len(shared), len(known), where)
    return record


__all__ = ["CHECKPOINT_KEY", "SPLIT_FILE", "apply_recorded_split", "recorded_split_of", "parse_split_record", "read_recorded_split",
           "record_case_ids", "resolve_by_case_ids", "run_split_for", "same_data_source", "split_record",
           "split_record_text"]


def recorded_split_of(given: Path, ckpt_path: Path, ckpt: dict, cfg) -> dict:
    """The keyword arguments of :func:`probunet.data.load_splits` that keep the split the run fixed
    when it started (its checkpoint's record, else ``RUN_DIR/splits.json``): on the run's own data,
    and on data at another path that holds any of the record's case ids (the run's data, moved);
    another dataset is split by its config (:func:`probunet.data.recorded_split.run_split_for`).
    Overriding ``data.split`` on the run's data is refused: it would move training cases into the
    test set."""
    from ..config import ConfigError, from_dict

    now = cfg.to_dict()["data"]
    trained = from_dict(ckpt["config"]).to_dict()["data"]
    run_dir = given if given.is_dir() else ckpt_path.parent.parent if ckpt_path.parent.name == "checkpoints" \
        else None
    record, where, by_case_ids = run_split_for(run_dir, ckpt, now, trained)
    fixed = None
    if record is not None and now["split"] != trained["split"]:
        changed = sorted(k for k in set(now["split"]) | set(trained["split"])
                         if now["split"].get(k) != trained["split"].get(k))
        fixed = (f"data.split.{changed[0]}: the run's split is fixed ({where}) and cannot be changed "
                 f"on its own data; point data.path at another folder to evaluate other cases")
        if not by_case_ids:
            raise ConfigError(fixed)
    return {"recorded": record, "recorded_from": where, "by_case_ids": by_case_ids, "fixed_split": fixed}
