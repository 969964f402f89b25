"""The files an evaluation writes, written atomically, the summary last.

Next to ``summary.json`` (mean and standard error of every metric, the
conventions, the data config): ``per_case.csv``, ``reliability.png`` and, for
data with a known true rater distribution, ``lesions.csv`` and ``lesions.png``
(see :func:`output_paths`). Each is recognisably probunet's (the summary's
``kind``, the CSV headers, the PNG "Software" text), so a rerun may replace its
own files, and ``probunet evaluate`` refuses any other file at those paths unless
``--overwrite`` (:func:`check_owned`). The scores come from :mod:`probunet.evaluation.scoring`, the
figures from :mod:`probunet.evaluation.viz`.
"""

from __future__ import annotations

import csv
import io
import json
import math
from pathlib import Path

import numpy as np

from ..utils import atomic_write_text
from .viz import PNG_SOFTWARE, lesion_scatter, reliability_diagram

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


def is_own_output(path: Path, key: str, summary_kind: str) -> bool:
    """Whether the file at ``path`` (output ``key`` of :func:`output_paths`) was written by a probunet
    evaluation: a summary JSON of kind ``summary_kind``, a CSV starting with the per-case or lesion
    header, a PNG whose "Software" text is probunet's."""
    try:
        if not path.is_file() or path.is_symlink():
            return False
        with open(path, "rb") as fh:
            head = fh.read(1 << 16)
    except OSError:
        return False
    if key in ("reliability", "lesions_plot"):
        return b"Software\x00" + PNG_SOFTWARE.encode() in head
    if key in ("per_case", "lesions"):
        first = head.split(b"\n", 1)[0].decode("utf-8", "replace")
        return first.startswith("case_id,index,num_raters,ged,") if key == "per_case" else \
            first == ",".join(LESION_COLUMNS)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, UnicodeDecodeError):
        return False
    return isinstance(data, dict) and data.get("kind") == summary_kind


def check_owned(paths: dict[str, Path], summary_kind: str) -> None:
    """FileExistsError naming the first of ``paths`` (from :func:`output_paths`) that exists and is
    not probunet's own (:func:`is_own_output`)."""
    summary = paths["summary"]
    for key, p in paths.items():
        if (p.exists() or p.is_symlink()) and not is_own_output(p, key, summary_kind):
            what = "is not a probunet evaluation summary" if key == "summary" else "was not written by probunet"
            raise FileExistsError(f"--out {summary}: {p} exists and {what}; refusing to overwrite it "
                                  f"(--overwrite replaces it)")


def write_outputs(summary: dict, rows: list[dict], lesion_rows: list[dict], pooled, files: dict, *,
                  columns: list[str], has_truth: bool) -> None:
    """Write the per-case CSV (``columns`` of ``rows``), the reliability diagram of ``pooled``
    (a :class:`probunet.metrics.Calibration`), with truth the lesion CSV and scatter, then the
    summary JSON, to the paths in ``files`` (from :func:`output_paths`)."""
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


__all__ = ["LESION_COLUMNS", "check_owned", "is_own_output", "output_paths", "write_outputs"]
