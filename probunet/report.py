"""The files an evaluation writes, written atomically, the summary last.

Next to ``summary.json`` (mean and standard error of every metric, the
conventions, the data config): ``per_case.csv``, ``reliability.png`` and, for
data with a known true rater distribution, ``lesions.csv`` and ``lesions.png``
(see :func:`output_paths`). The names of the files go first into the folder's record
``.probunet-evaluation.json``: files it lists (or a probunet summary lists) are
probunet's own and may be replaced; others are refused unless ``--overwrite``
(:func:`check_owned`). The scores come from :mod:`probunet.scoring`, the
figures from :mod:`probunet.viz`.
"""

from __future__ import annotations

import csv
import io
import json
import math
from pathlib import Path
from typing import Optional

import numpy as np

from .utils import atomic_write_text
from .viz import lesion_scatter, reliability_diagram

LESION_COLUMNS = ["case", "lesion", "contrast", "true_p", "sampled_freq", "rater_freq"]


def _finite_or_none(x):
    """JSON-safe value: NaN / Inf -> None, numpy scalars -> Python."""
    if isinstance(x, dict):
        return {k: _finite_or_none(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_finite_or_none(v) for v in x]
    if isinstance(x, (np.floating, float)):
        return float(x) if math.isfinite(float(x)) else None
    if isinstance(x, np.integer):
        return int(x)
    return x



def _csv_text(rows: list[dict], columns: list[str]) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(columns)
    for row in rows:
        writer.writerow([repr(float(row[c])) if isinstance(row[c], (float, np.floating)) else row[c]
                         for c in columns])
    return buf.getvalue()


def output_paths(summary_path: str | Path) -> dict[str, Path]:
    """The files written next to the summary JSON.

    ``summary.json`` gets ``per_case.csv``, ``reliability.png``, ``lesions.csv`` and
    ``lesions.png`` beside it; any other name ``NAME.json`` gets ``NAME_per_case.csv`` etc.
    """
    summary_path = Path(summary_path)
    prefix = "" if summary_path.stem == "summary" else summary_path.stem + "_"
    folder = summary_path.parent
    return {"summary": summary_path, "per_case": folder / f"{prefix}per_case.csv",
            "reliability": folder / f"{prefix}reliability.png", "lesions": folder / f"{prefix}lesions.csv",
            "lesions_plot": folder / f"{prefix}lesions.png"}


OUTPUTS_RECORD = ".probunet-evaluation.json"  # names of the files evaluations wrote into a folder
_RECORD_KIND = "probunet-evaluation-files"


def _recorded_outputs(folder: Path) -> Optional[set]:
    """Names the record in ``folder`` lists (empty when there is none); None when a file of that
    name exists but is not probunet's."""
    path = folder / OUTPUTS_RECORD
    if not (path.exists() or path.is_symlink()):
        return set()
    try:
        data = json.loads(path.read_text(encoding="utf-8")) if path.is_file() and not path.is_symlink() else None
    except (OSError, ValueError, UnicodeDecodeError):
        data = None
    if not isinstance(data, dict) or data.get("kind") != _RECORD_KIND or not isinstance(data.get("files"), list):
        return None
    return {str(n) for n in data["files"]}


def record_outputs(folder: Path, names) -> None:
    """Add ``names`` to the folder's record before they are written (an interrupted evaluation's
    files stay probunet's own)."""
    known = _recorded_outputs(folder) or set()
    if set(names) <= known:
        return
    atomic_write_text(folder / OUTPUTS_RECORD, json.dumps({"kind": _RECORD_KIND, "files": sorted(known | set(names))},
                                                          indent=1) + "\n")


def own_outputs(summary: Path, summary_kind: str) -> set:
    """Names in the summary's folder that probunet's evaluations wrote: those of the folder's record,
    and those a probunet summary (``"kind": summary_kind``) at ``summary`` lists (all beside it)."""
    names = set(_recorded_outputs(summary.parent) or ())
    if summary.is_file():
        try:
            data = json.loads(summary.read_text(encoding="utf-8"))
        except (OSError, ValueError, UnicodeDecodeError):
            data = None
        if isinstance(data, dict) and data.get("kind") == summary_kind:
            names.add(summary.name)
            files = data.get("files")
            names.update(Path(str(f)).name for f in (files.values() if isinstance(files, dict) else ()))
    return names


def check_owned(paths: dict[str, Path], summary_kind: str) -> None:
    """FileExistsError naming the first of ``paths`` (from :func:`output_paths`) that exists and was
    not written by probunet's evaluations: the folder's record lists it, or the probunet summary at
    ``paths["summary"]`` does. The record itself is checked too."""
    summary = paths["summary"]
    if _recorded_outputs(summary.parent) is None:
        raise FileExistsError(f"--out {summary}: {summary.parent / OUTPUTS_RECORD} exists and probunet did not "
                              f"write it; refusing to overwrite it (--overwrite replaces it)")
    own = own_outputs(summary, summary_kind)
    for key, p in paths.items():
        if (p.exists() or p.is_symlink()) and p.name not in own:
            what = "is not a probunet evaluation summary" if key == "summary" else "was not written by probunet"
            raise FileExistsError(f"--out {summary}: {p} exists and {what}; refusing to overwrite it "
                                  f"(--overwrite replaces it)")


def write_outputs(summary: dict, rows: list[dict], lesion_rows: list[dict], pooled, files: dict, *,
                  columns: list[str], has_truth: bool) -> None:
    """Write the per-case CSV (``columns`` of ``rows``), the reliability diagram of ``pooled``
    (a :class:`probunet.metrics.Calibration`), with truth the lesion CSV and scatter, then the
    summary JSON, to the paths in ``files`` (from :func:`output_paths`)."""
    folder = Path(files["summary"]).parent
    folder.mkdir(parents=True, exist_ok=True)
    # the names go into the folder's record first: an interrupted evaluation's files stay probunet's own
    record_outputs(folder, [Path(f).name for f in files.values() if Path(f).parent == folder])
    atomic_write_text(files["per_case"], _csv_text(rows, columns))
    ece = float(pooled.ece)
    reliability_diagram(files["reliability"], pooled.bin_edges.numpy(), pooled.mean_predicted.numpy(),
                        pooled.mean_observed.numpy(), pooled.counts.numpy(),
                        ece=ece if math.isfinite(ece) else None,
                        title=f"{summary['split']} split, {summary['num_cases']} cases, "
                              f"{summary['num_samples']} samples")
    if has_truth:
        atomic_write_text(files["lesions"], _csv_text(lesion_rows, LESION_COLUMNS))
        lesion_scatter(files["lesions_plot"], lesion_rows,
                       title=f"lesion presence, {summary['split']} split")
    # the summary last: its presence means the others are complete
    atomic_write_text(files["summary"], json.dumps(_finite_or_none(summary), indent=1) + "\n")


__all__ = ["LESION_COLUMNS", "OUTPUTS_RECORD", "check_owned", "output_paths", "own_outputs", "record_outputs",
           "write_outputs"]
