"""probunet.data.io: read_image / write_image round trips, 2D and 3D, NIfTI / NRRD / MHA / PNG."""

import json
import os

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk

from probunet.data import io
from probunet.data.validate import DataError

DIRECTION3 = np.array([[0.0, -1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 1.0]])  # rotated about z


def _itk_image(array_xyz, spacing, origin, direction):
    nd = array_xyz.ndim
    img = sitk.GetImageFromArray(np.transpose(array_xyz, list(range(nd))[::-1]))
    img.SetSpacing(spacing)
    img.SetOrigin(origin)
    img.SetDirection(np.asarray(direction, float).ravel().tolist())
    return img


@pytest.mark.parametrize("suffix", [".nrrd", ".mha"])
@pytest.mark.parametrize("nd", [2, 3])
def test_itk_read_axis_order_and_geometry(tmp_path, suffix, nd):
    rng = np.random.default_rng(0)
    shape = (5, 7, 3)[:nd]
    array = rng.integers(-500, 500, size=shape).astype(np.int16)
    spacing = [0.7, 0.9, 2.5][:nd]
    origin = [-10.5, 3.25, 100.0][:nd]
    direction = DIRECTION3[:nd, :nd]
    path = tmp_path / f"img{suffix}"
    sitk.WriteImage(_itk_image(array, spacing, origin, direction), str(path))
    got, meta = io.read_image(path)
    assert got.shape == shape and got.dtype == np.int16  # (x, y[, z]) as ITK indexes
    np.testing.assert_array_equal(got, array)
    assert meta["spacing"] == pytest.approx(spacing, abs=0, rel=1e-12)
    assert meta["origin"] == pytest.approx(origin, rel=1e-12)
    np.testing.assert_allclose(meta["direction"], direction, atol=1e-12)
    json.dumps(meta)  # plain types only


@pytest.mark.parametrize("src,dst", [(".nrrd", ".nrrd"), (".mha", ".mha"), (".nrrd", ".nii.gz"),
                                     (".mha", ".nrrd"), (".nii.gz", ".nii.gz"), (".nii.gz", ".mha")])
@pytest.mark.parametrize("nd", [2, 3])
def test_round_trip_keeps_array_and_geometry(tmp_path, src, dst, nd):
    rng = np.random.default_rng(1)
    shape = (6, 4, 3)[:nd]
    array = rng.random(shape).astype(np.float32)
    spacing, origin = [0.5, 0.75, 3.0][:nd], [12.0, -7.5, 40.25][:nd]
    first = tmp_path / f"a{src}"
    if src == ".nii.gz":
        aff = np.diag([0.5, 0.75, 3.0, 1.0])
        aff[:3, 3] = [12.0, -7.5, 40.25]
        nib.save(nib.Nifti1Image(array, aff), str(first))
    else:
        sitk.WriteImage(_itk_image(array, spacing, origin, DIRECTION3[:nd, :nd]), str(first))
    a, meta_a = io.read_image(first)
    second = tmp_path / f"b{dst}"
    assert io.write_image(a, meta_a, second) == second
    b, meta_b = io.read_image(second)
    np.testing.assert_array_equal(a, b)
    assert b.dtype == a.dtype
    for key in ("spacing", "origin", "direction"):
        np.testing.assert_allclose(meta_b[key], meta_a[key], rtol=1e-6, atol=1e-5, err_msg=key)
    if src == dst:  # same format: exact
        for key in ("spacing", "origin", "direction", "affine"):
            assert meta_b[key] == meta_a[key], key
    rows = [0, 1, 2] if nd == 3 else [0, 1]  # a 2D ITK image has no z: compare the in-plane part
    cols = rows + [3]
    np.testing.assert_allclose(np.asarray(meta_b["affine"])[np.ix_(rows, cols)],
                               np.asarray(meta_a["affine"])[np.ix_(rows, cols)], atol=1e-5)


def test_nifti_matches_itk_world_coordinates(tmp_path):
    """The same file read by nibabel (here) and by SimpleITK gives the same LPS geometry."""
    aff = np.array([[0.0, -0.8, 0.0, 10.0], [0.9, 0.0, 0.0, -4.0], [0.0, 0.0, 2.0, 30.0], [0, 0, 0, 1.0]])
    path = tmp_path / "x.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((4, 5, 6), np.float32), aff), str(path))
    _, meta = io.read_image(path)
    ref = sitk.ReadImage(str(path))
    np.testing.assert_allclose(meta["spacing"], ref.GetSpacing(), rtol=1e-6)
    np.testing.assert_allclose(meta["origin"], ref.GetOrigin(), atol=1e-5)
    np.testing.assert_allclose(np.ravel(meta["direction"]), ref.GetDirection(), atol=1e-6)
    assert meta["shape"] == list(ref.GetSize())


def test_nifti_exact_affine_and_codes(tmp_path):
    aff = np.array([[-0.7, 0.01, 0.0, 91.3], [0.0, 0.7, 0.02, -120.7], [0.0, 0.0, 1.25, -70.1], [0, 0, 0, 1.0]])
    img = nib.Nifti1Image(np.arange(60, dtype=np.int16).reshape(3, 4, 5), aff)
    img.set_qform(aff, code=1)
    img.set_sform(aff, code=2)
    path = tmp_path / "x.nii"
    nib.save(img, str(path))
    a, meta = io.read_image(path)
    io.write_image(a, meta, tmp_path / "y.nii")
    back = nib.load(str(tmp_path / "y.nii"))
    np.testing.assert_array_equal(back.affine, nib.load(str(path)).affine)
    assert int(back.header["sform_code"]) == 2 and int(back.header["qform_code"]) == 1
    assert np.asarray(back.dataobj).dtype == np.int16


def test_png_round_trip_and_axis_order(tmp_path):
    from PIL import Image

    rows_cols = np.arange(12, dtype=np.uint8).reshape(3, 4) * 10  # 3 rows, 4 columns
    Image.fromarray(rows_cols).save(tmp_path / "a.png")
    arr, meta = io.read_image(tmp_path / "a.png")
    assert arr.shape == (4, 3)  # (x, y): columns first
    np.testing.assert_array_equal(arr, rows_cols.T)
    io.write_image(arr, meta, tmp_path / "b.png")
    np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "b.png")), rows_cols)


def test_rgb_png_has_components_last(tmp_path):
    from PIL import Image

    rgb = np.random.default_rng(0).integers(0, 255, size=(3, 5, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(tmp_path / "c.png")
    arr, meta = io.read_image(tmp_path / "c.png")
    assert arr.shape == (5, 3, 3) and meta["num_components"] == 3
    np.testing.assert_array_equal(arr, np.transpose(rgb, (1, 0, 2)))


def test_four_d_nifti_channels_last(tmp_path):
    data = np.random.default_rng(0).random((4, 5, 6, 2)).astype(np.float32)
    nib.save(nib.Nifti1Image(data, np.eye(4)), str(tmp_path / "m.nii.gz"))
    arr, meta = io.read_image(tmp_path / "m.nii.gz")
    assert arr.shape == (4, 5, 6, 2) and meta["num_components"] == 2 and len(meta["spacing"]) == 3
    io.write_image(arr, meta, tmp_path / "n.nii.gz")
    np.testing.assert_array_equal(io.read_image(tmp_path / "n.nii.gz")[0], data)


def test_dicom_series_folder(tmp_path):
    vol = np.random.default_rng(0).integers(0, 1000, size=(6, 5, 4)).astype(np.int16)  # (x, y, z)
    folder = tmp_path / "series"
    folder.mkdir()
    spacing = (0.8, 0.8, 2.0)
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    series_uid = "1.2.826.0.1.3680043.2.1125.1.42"
    for z in range(vol.shape[2]):
        sl = sitk.GetImageFromArray(vol[:, :, z].T[None])  # one (1, y, x) slice
        sl.SetSpacing(spacing)
        sl.SetOrigin((0.0, 0.0, z * spacing[2]))
        for tag, value in [("0020|000e", series_uid), ("0020|0032", f"0\\0\\{z * spacing[2]}"),
                           ("0020|0037", "1\\0\\0\\0\\1\\0"), ("0020|0013", str(z + 1)), ("0008|0060", "CT"),
                           ("0028|0030", "0.8\\0.8"), ("0018|0050", "2.0")]:
            sl.SetMetaData(tag, value)
        writer.SetFileName(str(folder / f"s{z:03d}.dcm"))
        writer.Execute(sl)
    arr, meta = io.read_image(folder)
    assert meta["format"] == "dicom" and arr.shape == vol.shape
    np.testing.assert_array_equal(arr, vol)
    np.testing.assert_allclose(meta["spacing"], spacing, rtol=1e-5)
    with pytest.raises(DataError, match="read-only"):
        io.write_image(arr, meta, tmp_path / "out.dcm")


def test_atomic_write_leaves_no_temp_files(tmp_path):
    io.write_image(np.zeros((4, 4), np.uint8), None, tmp_path / "z.nrrd")
    io.write_image(np.zeros((4, 4), np.uint8), None, tmp_path / "z.nii.gz")
    assert sorted(os.listdir(tmp_path)) == ["z.nii.gz", "z.nrrd"]


@pytest.mark.parametrize("content", [b"", b"not an image at all"])
def test_unreadable_file_names_the_file(tmp_path, content):
    for name in ("bad.nii.gz", "bad.nrrd"):
        p = tmp_path / name
        p.write_bytes(content)
        with pytest.raises(DataError, match=name):
            io.read_image(p)
    with pytest.raises(DataError, match="not found"):
        io.read_image(tmp_path / "missing.nii.gz")


def test_write_rejects_mismatched_meta_and_unknown_extension(tmp_path):
    meta = {"spacing": [1.0, 1.0, 1.0], "origin": [0.0, 0.0, 0.0], "direction": np.eye(3).tolist()}
    with pytest.raises(DataError, match="axes"):
        io.write_image(np.zeros((4, 4)), meta, tmp_path / "a.nii.gz")
    with pytest.raises(DataError, match="extension"):
        io.write_image(np.zeros((4, 4)), None, tmp_path / "a.xyz")


def test_suffix_helpers():
    assert io.full_suffix("a/b.nii.gz") == ".nii.gz" and io.strip_suffix("case1.nii.gz") == "case1"
    assert io.full_suffix("x.NRRD") == ".nrrd" and io.strip_suffix("y.mha") == "y"


@pytest.mark.parametrize("dtype", [np.int64, np.uint8, np.int16, np.float32, np.float64, bool])
@pytest.mark.parametrize("suffix", [".nii.gz", ".nrrd", ".mha"])
def test_dtypes_are_kept(tmp_path, dtype, suffix):
    a = (np.arange(24).reshape(4, 3, 2) % 2).astype(dtype)
    io.write_image(a, None, tmp_path / f"a{suffix}")
    b, _ = io.read_image(tmp_path / f"a{suffix}")
    assert b.dtype == (np.uint8 if dtype is bool else dtype)
    np.testing.assert_array_equal(a, b)
