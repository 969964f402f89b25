"""data.format: lidc_crops: a tiny PNG release written with Pillow and read back exactly."""

import numpy as np
import pytest
from PIL import Image

from probunet.config import load_config
from probunet.data import load_splits, read_cases
from probunet.data.validate import DataError

SIZE = 40  # the release is 180x180; tiny here


def _write(root, layout, readers=4, seed=0, size=SIZE):
    """layout: {split: {patient: [names]}} -> {case_id: (image uint8, masks (readers, H, W) 0/1)}"""
    rng = np.random.default_rng(seed)
    truth = {}
    for split, patients in layout.items():
        for patient, names in patients.items():
            (root / split / "images" / patient).mkdir(parents=True, exist_ok=True)
            (root / split / "gt" / patient).mkdir(parents=True, exist_ok=True)
            for name in names:
                img = rng.integers(0, 256, size=(size, size), dtype=np.uint8)
                Image.fromarray(img).save(root / split / "images" / patient / f"{name}.png")
                masks = (rng.random((readers, size, size)) > 0.8).astype(np.uint8)
                for k in range(readers):
                    Image.fromarray(masks[k] * 255).save(root / split / "gt" / patient / f"{name}_l{k}.png")
                truth[f"{split}/{patient}/{name}"] = (img, masks)
    return truth


LAYOUT = {"train": {"LIDC-IDRI-0001": ["z-105.0_c0", "z-106.0_c0"], "LIDC-IDRI-0002": ["z-55.5_c1"]},
          "val": {"LIDC-IDRI-0003": ["z-10.0_c0"]},
          "test": {"LIDC-IDRI-0004": ["z-1.0_c0", "z-2.0_c0"]}}


def _cfg(path, *over):
    return load_config(None, ["data.format=lidc_crops", f"data.path={path}", *over])


def test_read_back_exact(tmp_path):
    truth = _write(tmp_path, LAYOUT)
    items = read_cases(_cfg(tmp_path).data)
    assert sorted(i["case_id"] for i in items) == sorted(truth)
    for item in items:
        img, masks = truth[item["case_id"]]
        assert item["image"].dtype == np.float32 and item["image"].shape == (1, SIZE, SIZE)
        np.testing.assert_array_equal(item["image"][0], img.astype(np.float32) / 255)  # (H, W) as stored
        np.testing.assert_array_equal(item["labels"], masks.astype(np.int64))
        assert item["meta"]["group"] == item["case_id"].split("/")[1]
        assert item["meta"]["release_split"] == item["case_id"].split("/")[0]


def test_one_split_folder_and_0_1_masks(tmp_path):
    truth = _write(tmp_path, {"train": {"P1": ["a"]}})
    # rewrite the masks as 0/1 PNGs
    _, masks = truth["train/P1/a"]
    for k in range(4):
        Image.fromarray(masks[k]).save(tmp_path / "train" / "gt" / "P1" / f"a_l{k}.png")
    (item,) = read_cases(_cfg(tmp_path / "train").data)
    np.testing.assert_array_equal(item["labels"], masks)


def test_centre_crop_to_128_style(tmp_path):
    truth = _write(tmp_path, LAYOUT)
    cfg = _cfg(tmp_path, "data.crop_size=32", "data.split.protocol=release")
    splits = load_splits(cfg)
    assert [len(splits[s]) for s in ("train", "val", "test")] == [3, 1, 2]
    for item in splits["train"]:
        img, masks = truth[item["case_id"]]
        s = (SIZE - 32) // 2  # 180 -> 128 starts at 26; 40 -> 32 at 4
        assert item["image"].shape == (1, 32, 32) and item["labels"].shape == (4, 32, 32)
        np.testing.assert_array_equal(item["image"][0], img[s:s + 32, s:s + 32].astype(np.float32) / 255)
        np.testing.assert_array_equal(item["labels"], masks[:, s:s + 32, s:s + 32])


def test_missing_reader_is_padded_or_refused(tmp_path):
    _write(tmp_path, {"train": {"P1": ["a", "b"]}})
    (tmp_path / "train" / "gt" / "P1" / "b_l3.png").unlink()
    cfg = _cfg(tmp_path, "data.split.test_fraction=0", "data.split.val_fraction=0")
    b = [i for i in load_splits(cfg)["train"] if i["case_id"].endswith("/b")][0]
    assert b["labels"].shape[0] == 4 and b["labels"][3].sum() == 0
    assert b["meta"]["rater_present"] == [True, True, True, False]
    with pytest.raises(DataError, match=r"P1/b\.png: 3 rater masks, expected 4"):
        load_splits(_cfg(tmp_path, "data.missing_raters=error"))


@pytest.mark.parametrize("kind,match", [
    ("nonbinary", r"gt/P1/a_l1\.png: mask values \[0, 7\] are not binary"),
    ("shape", r"gt/P1/a_l2\.png: mask shape \(8, 8\) does not match"),
    ("nogt", r"images/P1/a\.png: no reader masks"),
    ("unreadable", r"images/P1/a\.png: cannot read this PNG"),
    ("noimages", r"no images/ folder"),
])
def test_bad_release_names_the_file(tmp_path, kind, match):
    _write(tmp_path, {"train": {"P1": ["a"]}})
    gt = tmp_path / "train" / "gt" / "P1"
    if kind == "nonbinary":
        Image.fromarray(np.full((SIZE, SIZE), 7, np.uint8) * (np.eye(SIZE, dtype=np.uint8))).save(gt / "a_l1.png")
    elif kind == "shape":
        Image.fromarray(np.zeros((8, 8), np.uint8)).save(gt / "a_l2.png")
    elif kind == "nogt":
        for p in gt.iterdir():
            p.unlink()
    elif kind == "unreadable":
        (tmp_path / "train" / "images" / "P1" / "a.png").write_bytes(b"not a png")
    else:
        import shutil

        shutil.rmtree(tmp_path / "train")
        (tmp_path / "other").mkdir()
    with pytest.raises(DataError, match=match):
        read_cases(_cfg(tmp_path).data)


def test_sixteen_bit_images_scale_to_unit_range(tmp_path):
    _write(tmp_path, {"train": {"P1": ["a"]}})
    img16 = (np.arange(SIZE * SIZE).reshape(SIZE, SIZE) * 40).astype(np.uint16)
    Image.fromarray(img16).save(tmp_path / "train" / "images" / "P1" / "a.png")
    (item,) = read_cases(_cfg(tmp_path).data)
    np.testing.assert_allclose(item["image"][0], img16 / 65535.0, rtol=1e-6)
