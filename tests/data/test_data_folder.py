"""data.format: folder: images and rater masks by patterns, NIfTI (nibabel) and NRRD/MHA/DICOM (SimpleITK)."""

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk

from probunet.config import load_config
from probunet.data import load_splits, read_cases
from probunet.data.validate import DataError


def _sitk_write(array_xyz, path, spacing=None, origin=None):
    nd = array_xyz.ndim
    img = sitk.GetImageFromArray(np.transpose(array_xyz, list(range(nd))[::-1]))
    img.SetSpacing(spacing or [1.0] * nd)
    img.SetOrigin(origin or [0.0] * nd)
    path.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(img, str(path))


def _nib_write(array, path, affine=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(array, np.eye(4) if affine is None else affine), str(path))


def _dataset(root, ext, nd, cases=("p01", "p02", "p10"), raters=3, seed=0):
    rng = np.random.default_rng(seed)
    shape = (10, 8, 6)[:nd]
    truth = {}
    for case in cases:
        img = rng.normal(size=shape).astype(np.float32)
        masks = (rng.random((raters, *shape)) > 0.6).astype(np.uint8)
        if ext == ".nii.gz":
            aff = np.diag([0.8, 0.8, 2.0, 1.0])
            _nib_write(img, root / "images" / f"{case}{ext}", aff)
            for r in range(raters):
                _nib_write(masks[r], root / "labels" / f"{case}_rater{r + 1}{ext}", aff)
        else:
            sp = [0.8, 0.8, 2.0][:nd]
            _sitk_write(img, root / "images" / f"{case}{ext}", sp)
            for r in range(raters):
                _sitk_write(masks[r], root / "labels" / f"{case}_rater{r + 1}{ext}", sp)
        truth[case] = (img, masks)
    return truth


def _cfg(root, ext, *over):
    return load_config(None, ["data.format=folder", f"data.path={root}", f"data.image_pattern=images/{{case}}{ext}",
                              f"data.mask_pattern=labels/{{case}}_rater{{rater}}{ext}", *over])


@pytest.mark.parametrize("ext", [".nii.gz", ".nrrd", ".mha"])
@pytest.mark.parametrize("nd", [2, 3])
def test_read_back_exact(tmp_path, ext, nd):
    truth = _dataset(tmp_path, ext, nd)
    items = read_cases(_cfg(tmp_path, ext).data)
    assert [i["case_id"] for i in items] == ["p01", "p02", "p10"]
    for item in items:
        img, masks = truth[item["case_id"]]
        assert item["image"].shape == (1, *img.shape) and item["labels"].dtype == np.int64
        np.testing.assert_array_equal(item["image"][0], img)
        np.testing.assert_array_equal(item["labels"], masks)
        assert item["meta"]["raters"] == ["1", "2", "3"]
        np.testing.assert_allclose(item["meta"]["spacing"], [0.8, 0.8, 2.0][:nd], rtol=1e-6)
        assert item["meta"]["group"] == item["case_id"]


def test_raters_in_numeric_order_and_per_case_folders(tmp_path):
    m = [np.full((4, 4), v, np.uint8) for v in (0, 1)]
    _nib_write(np.zeros((4, 4), np.float32), tmp_path / "c1" / "img.nii.gz")
    for r in (1, 2, 10):  # "10" sorts after "2"
        _nib_write(m[r == 10], tmp_path / "c1" / f"seg_{r}.nii.gz")
    cfg = load_config(None, ["data.format=folder", f"data.path={tmp_path}", "data.image_pattern={case}/img.nii.gz",
                             "data.mask_pattern={case}/seg_*.nii.gz"])
    (item,) = read_cases(cfg.data)
    assert [p.rsplit("/", 1)[1] for p in item["meta"]["mask_paths"]] == ["seg_1.nii.gz", "seg_2.nii.gz",
                                                                          "seg_10.nii.gz"]
    assert item["labels"][:, 0, 0].tolist() == [0, 0, 1]


def test_dicom_series_folder_as_image(tmp_path):
    vol = np.random.default_rng(0).integers(0, 500, size=(6, 5, 3)).astype(np.int16)
    folder = tmp_path / "dicom" / "pat1"
    folder.mkdir(parents=True)
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    for z in range(vol.shape[2]):
        sl = sitk.GetImageFromArray(vol[:, :, z].T[None])
        for tag, value in [("0020|000e", "1.2.3.4.5"), ("0020|0032", f"0\\0\\{2.0 * z}"),
                           ("0020|0037", "1\\0\\0\\0\\1\\0"), ("0020|0013", str(z + 1)), ("0028|0030", "1\\1")]:
            sl.SetMetaData(tag, value)
        writer.SetFileName(str(folder / f"{z}.dcm"))
        writer.Execute(sl)
    mask = (vol > 250).astype(np.uint8)
    _sitk_write(mask, tmp_path / "labels" / "pat1_r1.nrrd", [1.0, 1.0, 2.0])
    cfg = load_config(None, ["data.format=folder", f"data.path={tmp_path}", "data.image_pattern=dicom/{case}",
                             "data.mask_pattern=labels/{case}_r{rater}.nrrd"])
    (item,) = read_cases(cfg.data)
    np.testing.assert_array_equal(item["image"][0], vol.astype(np.float32))
    np.testing.assert_array_equal(item["labels"][0], mask)


def test_multichannel_4d_nifti(tmp_path):
    img = np.random.default_rng(0).random((5, 4, 3, 2)).astype(np.float32)
    _nib_write(img, tmp_path / "images" / "a.nii.gz")
    _nib_write(np.ones((5, 4, 3), np.uint8), tmp_path / "labels" / "a_rater1.nii.gz")
    (item,) = read_cases(_cfg(tmp_path, ".nii.gz").data)
    assert item["image"].shape == (2, 5, 4, 3)
    np.testing.assert_array_equal(item["image"][1], img[..., 1])


def test_3d_crop_and_group_pattern(tmp_path):
    _dataset(tmp_path, ".nii.gz", 3, cases=("pA_s1", "pA_s2", "pB_s1", "pC_s1", "pD_s1"))
    cfg = _cfg(tmp_path, ".nii.gz", "data.crop_size=[8,8,8]", "model.spatial_dims=3", "data.group_pattern=^(p.)_",
               "data.split.test_fraction=0.25", "data.split.val_fraction=0.34")
    splits = load_splits(cfg)
    for items in splits.values():
        for item in items:
            assert item["image"].shape == (1, 8, 8, 8) and item["labels"].shape == (3, 8, 8, 8)
    where = {i["case_id"]: name for name, items in splits.items() for i in items}
    assert where["pA_s1"] == where["pA_s2"]


@pytest.mark.parametrize("kind,match", [
    ("geometry", r"labels/p02_rater2\.nii\.gz: rater mask geometry does not match the image .*images/p02\.nii\.gz"),
    ("shape", r"labels/p02_rater2\.nii\.gz: rater mask shape \(10, 8, 5\) does not match"),
    ("nomask", r"images/p02\.nii\.gz: no rater masks found for case 'p02'"),
    ("nocase", r"needs a \{case\} placeholder"),
    ("empty", r"the dataset is empty: no images matching"),
    ("inf", r"images/p02\.nii\.gz: image contains NaN or Inf"),
])
def test_bad_data_names_the_file(tmp_path, kind, match):
    _dataset(tmp_path, ".nii.gz", 3)
    over = ["model.spatial_dims=3"]
    if kind == "geometry":
        _nib_write(np.zeros((10, 8, 6), np.uint8), tmp_path / "labels" / "p02_rater2.nii.gz", np.eye(4))
    elif kind == "shape":
        _nib_write(np.zeros((10, 8, 5), np.uint8), tmp_path / "labels" / "p02_rater2.nii.gz",
                   np.diag([0.8, 0.8, 2.0, 1.0]))
    elif kind == "nomask":
        for p in (tmp_path / "labels").glob("p02_*"):
            p.unlink()
    elif kind == "nocase":
        over.append("data.image_pattern=images/*.nii.gz")
    elif kind == "empty":
        over.append("data.image_pattern=nothing/{case}.nii.gz")
    else:
        img = np.zeros((10, 8, 6), np.float32)
        img[1, 2, 3] = np.inf
        _nib_write(img, tmp_path / "images" / "p02.nii.gz", np.diag([0.8, 0.8, 2.0, 1.0]))
    with pytest.raises(DataError, match=match):
        load_splits(_cfg(tmp_path, ".nii.gz", *over))
    if kind == "geometry":  # headers alone wrong: the check can be switched off
        load_splits(_cfg(tmp_path, ".nii.gz", *over, "data.check_geometry=false"))
