"""data.format: qubiq, written with nibabel (and probunet's synthetic writer) and read back exactly."""

import nibabel as nib
import numpy as np
import pytest

from probunet.config import load_config
from probunet.data import load_splits, read_cases, synthetic
from probunet.data.validate import DataError


def _cfg(path, *over):
    return load_config(None, ["data.format=qubiq", f"data.path={path}", *over])


def _save(path, array, affine=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(array, np.eye(4) if affine is None else affine), str(path))


def _case(root, name, image, masks, task=1):
    _save(root / name / "image.nii.gz", image)
    for r, m in enumerate(masks):
        _save(root / name / f"task{task:02d}_seg{r + 1:02d}.nii.gz", m)


@pytest.mark.parametrize("spatial_dims,size", [(2, 32), (3, 12)])
def test_synthetic_writer_round_trip_is_exact(tmp_path, spatial_dims, size):
    items = synthetic.generate(4, size, spatial_dims, 3, seed=1)
    synthetic.write_qubiq(items, tmp_path / "d")
    got = read_cases(_cfg(tmp_path / "d").data)
    assert [g["case_id"] for g in got] == [i["case_id"] for i in items]
    for a, b in zip(items, got):
        assert b["image"].dtype == np.float32 and b["labels"].dtype == np.int64
        assert b["image"].shape == (1, *(size,) * spatial_dims)
        np.testing.assert_array_equal(a["image"], b["image"])
        np.testing.assert_array_equal(a["labels"], b["labels"])
        assert b["meta"]["group"] == a["case_id"]
        assert b["meta"]["image_path"].endswith("image.nii.gz")
        assert b["meta"]["spacing"] == [1.0] * spatial_dims


def test_synthetic_format_with_path_uses_qubiq_reader_and_truth(tmp_path):
    items = synthetic.generate(3, 16, 2, 2, seed=0)
    synthetic.write_qubiq(items, tmp_path / "s")
    cfg = load_config(None, ["data.format=synthetic", f"data.path={tmp_path / 's'}"])
    got = read_cases(cfg.data)
    assert got[0]["meta"]["truth"] == items[0]["meta"]["truth"]
    np.testing.assert_array_equal(got[2]["labels"], items[2]["labels"])


def test_task_selection_and_raters_counted_per_case(tmp_path, caplog):
    img = np.random.default_rng(0).random((8, 8)).astype(np.float32)
    m = (np.arange(64).reshape(8, 8) % 2).astype(np.uint8)
    _case(tmp_path, "case01", img, [m, m, 1 - m], task=1)
    _case(tmp_path, "case01", img, [m, 1 - m], task=2)
    _case(tmp_path, "case02", img, [m, m], task=1)  # one rater fewer
    _case(tmp_path, "case02", img, [m], task=2)
    got = read_cases(_cfg(tmp_path).data)
    assert [g["labels"].shape[0] for g in got] == [3, 2]
    np.testing.assert_array_equal(got[0]["labels"][2], 1 - m)
    got2 = read_cases(_cfg(tmp_path, "data.task=2").data)
    assert [g["labels"].shape[0] for g in got2] == [2, 1]
    # Training needs one A: pad (default) marks the padded raters ...
    splits = load_splits(_cfg(tmp_path, "data.split.test_fraction=0", "data.split.val_fraction=0"))
    case02 = [i for i in splits["train"] if i["case_id"] == "case02"][0]
    assert case02["labels"].shape[0] == 3 and case02["meta"]["rater_present"] == [True, True, False]
    assert case02["labels"][2].sum() == 0
    # ... or refuses, naming the file.
    with pytest.raises(DataError, match=r"case02.*image\.nii\.gz.*2 rater masks, expected 3"):
        load_splits(_cfg(tmp_path, "data.missing_raters=error"))


def test_missing_task_names_the_tasks_there(tmp_path):
    img = np.zeros((4, 4), np.float32)
    _case(tmp_path, "c1", img, [np.zeros((4, 4), np.uint8)], task=2)
    with pytest.raises(DataError, match=r"c1: no rater masks task01_seg.*tasks here: 02"):
        read_cases(_cfg(tmp_path).data)


def test_multichannel_image_channels_last(tmp_path):
    img = np.random.default_rng(0).random((6, 5, 4)).astype(np.float32)  # brain-tumor: (x, y, 4)
    _case(tmp_path, "c1", img, [np.ones((6, 5), np.uint8)])
    (item,) = read_cases(_cfg(tmp_path).data)
    assert item["image"].shape == (4, 6, 5)
    np.testing.assert_array_equal(item["image"][2], img[..., 2])
    assert len(item["meta"]["spacing"]) == 2


def test_float_masks_with_integer_values_are_accepted(tmp_path):
    _case(tmp_path, "c1", np.zeros((4, 4), np.float32), [np.eye(4, dtype=np.float32)])
    (item,) = read_cases(_cfg(tmp_path).data)
    np.testing.assert_array_equal(item["labels"][0], np.eye(4, dtype=np.int64))


@pytest.mark.parametrize("kind", ["shape", "geometry", "noninteger", "nan", "range", "unreadable", "empty",
                                  "no_image"])
def test_bad_data_raises_naming_the_file(tmp_path, kind):
    img = np.random.default_rng(0).random((8, 8)).astype(np.float32)
    m = np.zeros((8, 8), np.uint8)
    m[2:5, 2:5] = 1
    _case(tmp_path, "ok", img, [m, m])
    bad = tmp_path / "bad"
    if kind == "shape":
        _case(tmp_path, "bad", img, [m, np.zeros((8, 7), np.uint8)])
        match = r"bad/task01_seg02\.nii\.gz: rater mask shape \(8, 7\) does not match"
    elif kind == "geometry":
        _case(tmp_path, "bad", img, [m])
        _save(bad / "task01_seg02.nii.gz", m, affine=np.diag([2.0, 1.0, 1.0, 1.0]))
        match = r"bad/task01_seg02\.nii\.gz: rater mask geometry does not match.*spacing"
    elif kind == "noninteger":
        _case(tmp_path, "bad", img, [m, m.astype(np.float32) * 0.5])
        match = r"bad/task01_seg02\.nii\.gz: rater mask holds non-integer values"
    elif kind == "nan":
        img2 = img.copy()
        img2[3, 3] = np.nan
        _case(tmp_path, "bad", img2, [m])
        match = r"bad/image\.nii\.gz: image contains NaN or Inf"
    elif kind == "range":
        _case(tmp_path, "bad", img, [m * 255])
        match = r"bad/image\.nii\.gz: labels range 0\.\.255 is outside 0\.\.1.*binarize"
    elif kind == "unreadable":
        _case(tmp_path, "bad", img, [m])
        (bad / "task01_seg02.nii.gz").write_bytes(b"garbage")
        match = r"bad/task01_seg02\.nii\.gz: cannot read this image"
    elif kind == "empty":
        for p in (tmp_path / "ok").iterdir():
            p.unlink()
        (tmp_path / "ok").rmdir()
        match = "the dataset is empty"
    else:
        bad.mkdir()
        _save(bad / "task01_seg01.nii.gz", m)
        match = r"bad: no image\.nii\.gz"
    with pytest.raises(DataError, match=match):
        load_splits(_cfg(tmp_path))


def test_binarize_option_accepts_0_255_masks(tmp_path):
    m = np.zeros((4, 4), np.uint8)
    m[1, 1] = 255
    _case(tmp_path, "c", np.zeros((4, 4), np.float32), [m])
    cfg = _cfg(tmp_path, "data.binarize=true", "data.split.test_fraction=0", "data.split.val_fraction=0")
    (item,) = load_splits(cfg)["train"]
    assert item["labels"].max() == 1 and item["labels"].sum() == 1


def test_different_sizes_need_crop_size(tmp_path):
    _case(tmp_path, "a", np.zeros((8, 8), np.float32), [np.zeros((8, 8), np.uint8)])
    _case(tmp_path, "b", np.ones((10, 6), np.float32), [np.ones((10, 6), np.uint8)])
    with pytest.raises(DataError, match=r"case b has spatial shape \(10, 6\).*data\.crop_size"):
        load_splits(_cfg(tmp_path))
    cfg = _cfg(tmp_path, "data.crop_size=8", "data.split.test_fraction=0", "data.split.val_fraction=0")
    items = load_splits(cfg)["train"]
    assert all(i["image"].shape == (1, 8, 8) and i["labels"].shape == (1, 8, 8) for i in items)
    b = [i for i in items if i["case_id"] == "b"][0]
    # (10, 6) -> rows 1..8 of x, y padded by one column each side with the image minimum / label 0
    np.testing.assert_array_equal(b["labels"][0, :, 0], 0)
    np.testing.assert_array_equal(b["labels"][0, :, 1:7], 1)
    assert b["meta"]["crop"]["start"] == [1, -1]


def test_2d_slices_stored_with_depth_one(tmp_path):
    img = np.random.default_rng(0).random((6, 5, 1)).astype(np.float32)
    m = np.zeros((6, 5, 1), np.uint8)
    m[1:3, 1:3] = 1
    _case(tmp_path, "c1", img, [m, m])
    cfg = _cfg(tmp_path, "data.split.test_fraction=0", "data.split.val_fraction=0")
    (item,) = load_splits(cfg)["train"]
    assert item["image"].shape == (1, 6, 5) and item["labels"].shape == (2, 6, 5)
    np.testing.assert_array_equal(item["image"][0], img[..., 0])
    assert len(item["meta"]["spacing"]) == 2
