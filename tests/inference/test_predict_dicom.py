"""``probunet predict`` on a folder of scans holding DICOM series: each series folder is one case
(its id the folder's name), read with SimpleITK's series reader and predicted in its geometry."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk

from probunet.cli import main
from probunet.data import io
from probunet.inference import find_inputs, predict_folder
from test_predict import make_checkpoint, write_nifti

SPACING = (0.8, 0.9, 2.0)
ORIGIN = (-12.0, 30.0, 5.0)


def write_series(folder: Path, shape=(12, 10, 6), *, ending: str = ".dcm", seed: int = 0) -> np.ndarray:
    """A DICOM series of int16 slices in ``folder`` (one file per z); returns the (x, y, z) volume."""
    vol = np.random.default_rng(seed).integers(0, 1000, size=shape).astype(np.int16)
    folder.mkdir(parents=True)
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    uid = f"1.2.826.0.1.3680043.2.1125.1.{seed + 7}"
    for z in range(shape[2]):
        sl = sitk.GetImageFromArray(vol[:, :, z].T[None])  # one (1, y, x) slice
        position = (ORIGIN[0], ORIGIN[1], ORIGIN[2] + z * SPACING[2])
        sl.SetSpacing(SPACING)
        sl.SetOrigin(position)
        for tag, value in [("0020|000e", uid), ("0020|0032", "\\".join(str(v) for v in position)),
                           ("0020|0037", "1\\0\\0\\0\\1\\0"), ("0020|0013", str(z + 1)), ("0008|0060", "CT"),
                           ("0028|0030", f"{SPACING[1]}\\{SPACING[0]}"), ("0018|0050", str(SPACING[2]))]:
            sl.SetMetaData(tag, value)
        writer.SetFileName(str(folder / f"IM{z:04d}.dcm"))  # SimpleITK picks its writer by the ending
        writer.Execute(sl)
        (folder / f"IM{z:04d}.dcm").rename(folder / f"IM{z:04d}{ending}")
    return vol


@pytest.fixture(scope="module")
def ckpt3d(tmp_path_factory):
    root = tmp_path_factory.mktemp("ckpt")
    return make_checkpoint(root / "m3.pt", ["model.spatial_dims=3", "data.crop_size=16", "data.normalize=zscore"])


@pytest.fixture
def scans(tmp_path):
    """scans/: a NIfTI, a series with .dcm files, a series named by its DICOM magic only (files
    without an ending, a dot in the folder's name), a folder of notes and a folder of NIfTI images."""
    inp = tmp_path / "scans"
    inp.mkdir()
    write_nifti(inp / "top.nii.gz", shape=(8, 8, 6))
    write_series(inp / "ct1")
    write_series(inp / "ct.v2", ending="", seed=1)
    (inp / "notes").mkdir()
    (inp / "notes" / "readme.txt").write_text("not DICOM")
    (inp / "notes" / "data.bin").write_bytes(b"\0" * 200)
    (inp / "site").mkdir()
    write_nifti(inp / "site" / "a.nii.gz", shape=(8, 8, 6))
    return inp


def test_the_scan_finds_a_series_folder_as_one_case(scans):
    assert io.is_dicom_series(scans / "ct1") and io.is_dicom_series(scans / "ct.v2")
    assert not io.is_dicom_series(scans / "notes") and not io.is_dicom_series(scans / "site")
    assert [(c.case_id, c.path.name) for c in find_inputs(scans)] == [("ct.v2", "ct.v2"), ("ct1", "ct1"),
                                                                     ("top", "top.nii.gz")]
    # recursive: the series is still one case (its slices are not cases), other folders are entered
    assert [c.case_id for c in find_inputs(scans, recursive=True)] == ["ct.v2", "ct1", "site/a", "top"]
    # a folder with a DICOM file beside an image of another format is no series
    write_nifti(scans / "ct1" / "extra.nii.gz", shape=(4, 4, 4))
    assert not io.is_dicom_series(scans / "ct1")
    assert "ct1" not in [c.case_id for c in find_inputs(scans)]


def test_a_series_found_by_the_scan_is_predicted_in_its_geometry(ckpt3d, scans, tmp_path):
    out = tmp_path / "out"
    summary = predict_folder(ckpt3d, scans, out, num_samples=2)
    rows = {r["case"]: r for r in summary.rows}
    assert {k: r["status"] for k, r in rows.items()} == {"ct.v2": "ok", "ct1": "ok", "top": "ok"}
    for case in ("ct1", "ct.v2"):
        series, smeta = io.read_image(scans / case)
        assert smeta["format"] == "dicom"
        consensus, meta = io.read_image(out / case / "consensus.nii.gz")
        assert consensus.shape == series.shape == (12, 10, 6)
        np.testing.assert_allclose(meta["spacing"], SPACING, rtol=1e-5)
        np.testing.assert_allclose(meta["origin"], ORIGIN, atol=1e-4)
        np.testing.assert_allclose(nib.load(out / case / "consensus.nii.gz").affine, smeta["affine"], atol=1e-4)
        assert (out / case / "probability.nii.gz").is_file()
        assert rows[case]["volume_unit"] == "mm3" and rows[case]["spacing"] == "0.8x0.9x2"
    assert not (out / "notes").exists() and not (out / "ct1" / "IM0000").exists()


def test_the_cli_predicts_a_series_folder(ckpt3d, tmp_path, capsys):
    inp, out = tmp_path / "scans", tmp_path / "out"
    write_series(inp / "patient7")
    rc = main(["predict", str(ckpt3d), str(inp), str(out), "--num-samples", "2", "--no-progress"])
    assert rc == 0, capsys.readouterr().err
    assert (out / "patient7" / "case.json").is_file() and (out / "patient7" / "sample_000.nii.gz").is_file()


def test_an_output_dir_that_is_a_file_is_one_line_before_the_model_loads(ckpt3d, tmp_path, capsys):
    inp, out = tmp_path / "scans", tmp_path / "out"
    inp.mkdir()
    write_nifti(inp / "a.nii.gz", shape=(8, 8, 6))
    out.write_text("a file")
    rc = main(["predict", str(ckpt3d), str(inp), str(out), "--num-samples", "2", "--no-progress"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and f"OUTPUT_DIR {out} is a file, not a folder" in err[0], err
