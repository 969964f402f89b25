"""OUTPUT_DIR of ``probunet predict``: whose folder it is, which temporary files are its own,
and what its sharded run was.

- A folder probunet did not create is refused, as ``train --out`` refuses one: it must be
  empty, marked (:data:`MARKER`, written by every run), or hold nothing but what predict
  writes (output folders from before the marker, interrupted runs). An existing
  ``summary.csv`` that is not a probunet summary is never replaced.
- Stale temporary files are removed only where predict writes (OUTPUT_DIR itself and the
  case folders of the run's cases, not below) and only under the names its writes use
  (``.probunet-<stem>.XXXXXXXX.tmp...``, or ``.<stem>.XXXXXXXX.tmp...`` with a stem predict
  writes).
- The marker remembers the shard count and the settings of a ``--shard K/N`` run: a shard
  with another N or other settings is refused with one line (``--overwrite`` starts over),
  and :func:`check_mergeable` refuses shard summaries of different runs.
"""

from __future__ import annotations

import csv
import fcntl
import json
import logging
import os
import re
from contextlib import contextmanager
from pathlib import Path
from typing import Optional

from .. import __version__
from ..utils import atomic_write_text, open_lock_file, unlink_files

logger = logging.getLogger(__name__)

MARKER = ".probunet-predict.json"
KIND = "probunet-predict-output"
_SETTINGS_LOCK = ".probunet.settings.lock"
_STEMS = r"(?:sample_\d+|probability(?:_class\d+)?|entropy|consensus|region|case|summary(?:\.shard-\d+-of-\d+)?)"
_RAND = r"[A-Za-z0-9_]{8}\.tmp(?:\.[A-Za-z0-9.]+)?"
_OWN_TEMP = re.compile(rf"^\.(?:probunet-.+|{_STEMS})\.{_RAND}$")
_OWN_OUTPUT = re.compile(r"^(?:sample_\d+|probability(?:_class\d+)?|entropy|consensus|region)\.[A-Za-z0-9.]+$"
                         r"|^case\.json$")
_SHARD_SUMMARY = re.compile(r"^summary\.shard-(\d+)-of-(\d+)\.csv$")


def is_own_temp(name: str) -> bool:
    """Whether ``name`` is a temporary file name of predict's writes."""
    return bool(_OWN_TEMP.match(name))


def is_probunet_summary(path: Path, columns) -> bool:
    """A CSV whose header starts with predict's summary columns."""
    try:
        with open(path, newline="", encoding="utf-8", errors="replace") as fh:
            header = next(csv.reader([fh.readline()]), [])
    except OSError:
        return False
    return header[:len(columns)] == list(columns)


def _shown(names: list[str]) -> str:
    return ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")


def foreign_entries(output_dir: Path, columns) -> list[str]:
    """Entries of an unmarked OUTPUT_DIR that predict does not write (relative paths)."""
    foreign = []
    for p in sorted(output_dir.iterdir()):
        name = p.name
        if name.startswith(".probunet") or is_own_temp(name):
            continue
        if name == "summary.csv" or _SHARD_SUMMARY.match(name):
            if p.is_file() and not p.is_symlink() and is_probunet_summary(p, columns):
                continue
            foreign.append(name)
        elif p.is_dir() and not p.is_symlink():
            for root, dirs, files in os.walk(p):  # a case folder (or a folder of them, with --recursive)
                bad = [f for f in files if not (_OWN_OUTPUT.match(f) or is_own_temp(f))]
                if bad:
                    foreign.append(str(Path(root, bad[0]).relative_to(output_dir)))
                    break
        else:
            foreign.append(name)
    return foreign


def check_output_dir(output_dir: Path, columns, summary_names) -> None:
    """Refuse (FileExistsError, one line) an OUTPUT_DIR probunet did not create, and a summary
    file of these names that is not a probunet summary. Nothing is written."""
    if not output_dir.is_dir():
        return
    marker = output_dir / MARKER
    if marker.exists() or marker.is_symlink():
        read_marker(output_dir)  # refused when it is not probunet's
    else:
        foreign = foreign_entries(output_dir, columns)
        if foreign:
            raise FileExistsError(f"OUTPUT_DIR {output_dir} holds files probunet did not write ({_shown(foreign)}); "
                                  f"predict into a new or empty folder")
    for name in summary_names:
        path = output_dir / name
        if (path.exists() or path.is_symlink()) and not (path.is_file() and not path.is_symlink()
                                                          and is_probunet_summary(path, columns)):
            raise FileExistsError(f"OUTPUT_DIR {output_dir}: {name} exists and is not a probunet summary; "
                                  f"refusing to replace it (move it away or choose another folder)")


def read_json_marker(marker: Path) -> tuple[bool, object]:
    """(whether ``marker`` exists, its parsed JSON or None when it is no readable JSON file);
    a symbolic link is never followed."""
    if not (marker.exists() or marker.is_symlink()):
        return False, None
    try:
        return True, (json.loads(marker.read_text(encoding="utf-8")) if marker.is_file() and not marker.is_symlink()
                      else None)
    except (OSError, ValueError, UnicodeDecodeError):
        return True, None


def read_marker(output_dir: Path) -> Optional[dict]:
    exists, data = read_json_marker(output_dir / MARKER)
    if not exists:
        return None
    if not isinstance(data, dict) or data.get("kind") != KIND:
        raise FileExistsError(f"OUTPUT_DIR {output_dir}: {MARKER} is not probunet's; predict into another folder")
    return data


@contextmanager
def _settings_lock(output_dir: Path):
    """An exclusive lock held while the marker is read and written (shards start at once)."""
    fd = open_lock_file(output_dir / _SETTINGS_LOCK, "OUTPUT_DIR")  # a planted link: one line, not followed
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _describe(shards: Optional[int], settings: Optional[dict]) -> str:
    return f"--shard K/{shards}" + (f" with {json.dumps(settings, sort_keys=True)}" if settings else "")


def claim_output_dir(output_dir: Path, *, shard: Optional[tuple[int, int]], settings: dict,
                     overwrite: bool) -> None:
    """Mark OUTPUT_DIR as predict's; for a shard, check (or record) the folder's shard count and
    settings. Call it holding the folder lock."""
    with _settings_lock(output_dir):
        record = read_marker(output_dir) or {"kind": KIND, "probunet_version": __version__, "shards": None,
                                             "settings": None}
        changed = "shards" not in record or not (output_dir / MARKER).is_file()
        if shard is not None:
            n = shard[1]
            old_n, old_settings = record.get("shards"), record.get("settings")
            if (old_n is not None and old_n != n) or (old_settings is not None and old_settings != settings):
                what = (f"another shard count ({n}, the folder's is {old_n})" if old_n not in (None, n)
                        else "other settings: " + ", ".join(
                            f"{k} {old_settings.get(k)!r} -> {settings.get(k)!r}" for k in sorted(settings)
                            if old_settings.get(k) != settings.get(k)))
                if not overwrite:
                    raise ValueError(f"--shard {shard[0]}/{n}: OUTPUT_DIR {output_dir} holds a run of "
                                     f"{_describe(old_n, None)} and this one has {what}; run the same N and "
                                     f"options, or pass --overwrite to start over")
                for p in output_dir.glob("summary.shard-*-of-*.csv"):  # the earlier run's: ours, replaced
                    m = _SHARD_SUMMARY.match(p.name)
                    if m and int(m.group(2)) != n:
                        p.unlink()
            if old_n != n or old_settings != settings:
                record.update(shards=n, settings=settings)
                changed = True
        if changed:
            atomic_write_text(output_dir / MARKER, json.dumps(record, indent=1, sort_keys=True) + "\n")


def remove_own_temps(folders) -> list[Path]:
    """Delete predict's stale temporary files directly in each of ``folders`` (not below)."""
    removed = []
    for folder in folders:
        try:
            entries = list(Path(folder).iterdir())
        except OSError:
            continue
        removed += unlink_files(p for p in entries if is_own_temp(p.name))
    if removed:
        logger.info("removed %d temporary file(s) left by an interrupted run", len(removed))
    return removed


def check_mergeable(output_dir: Path, parts: list[Path], rows_of) -> None:
    """ValueError (one line) when the shard summaries ``parts`` come from different runs: other
    shard counts, a case in two summaries, or other sample counts / seeds."""
    counts = sorted({int(_SHARD_SUMMARY.match(p.name).group(2)) for p in parts})
    if len(counts) > 1:
        raise ValueError(f"{output_dir}: shard summaries of runs with different shard counts ("
                         f"{', '.join(f'of {n}' for n in counts)}); remove the stale ones or rerun the shards")
    record = read_marker(output_dir)
    if record and record.get("shards") not in (None, counts[0]):
        raise ValueError(f"{output_dir}: the shard summaries are of {counts[0]} shards, the folder's run has "
                         f"{record['shards']}; rerun the shards")
    seen: dict[str, str] = {}
    values: dict[str, set] = {"num_samples": set()}
    for p in parts:
        for r in rows_of(p):
            if r["case"] in seen:
                raise ValueError(f"{output_dir}: case {r['case']} is in two shard summaries ({seen[r['case']]}, "
                                 f"{p.name}); remove the stale ones or rerun the shards")
            seen[r["case"]] = p.name
            if r.get("status") in ("ok", "skipped") and r.get("num_samples"):
                values["num_samples"].add(r["num_samples"])
    if len(values["num_samples"]) > 1:
        shown = ", ".join(sorted(values["num_samples"]))
        raise ValueError(f"{output_dir}: the shard summaries mix sample counts ({shown}); rerun the shards with "
                         f"one --num-samples (--overwrite)")


__all__ = ["MARKER", "check_mergeable", "check_output_dir", "claim_output_dir", "foreign_entries", "is_own_temp",
           "read_json_marker", "read_marker", "remove_own_temps"]
