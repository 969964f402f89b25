"""Normalisation, centre crop / pad, and MONAI augmentation applied jointly to image and all raters."""

import numpy as np
import pytest
import torch

from probunet.config import ConfigError, load_config
from probunet.data import MultiRaterDataset
from probunet.data.transforms import center_crop_or_pad, crop_item, normalize_image, train_transform


def _cfg(*over):
    return load_config(None, list(over)).data


def test_normalize_modes():
    img = np.array([[[-2000.0, -1000.0, 0.0, 400.0, 3000.0]]], dtype=np.float32)
    assert normalize_image(img, _cfg()) is not None
    np.testing.assert_array_equal(normalize_image(img, _cfg()), img)
    np.testing.assert_allclose(normalize_image(img, _cfg("data.normalize=ct_window")),
                               [[[0.0, 0.0, 1000 / 1400, 1.0, 1.0]]], rtol=1e-6)
    z = normalize_image(img, _cfg("data.normalize=zscore"))
    assert abs(z.mean()) < 1e-5 and abs(z.std() - 1) < 1e-4
    flat = normalize_image(np.ones((1, 3, 3), np.float32), _cfg("data.normalize=zscore"))
    assert np.all(np.isfinite(flat))
    with pytest.raises(ConfigError, match="data.ct_window"):
        _cfg("data.ct_window=[400, -1000]")


def test_center_crop_or_pad():
    a = np.arange(180 * 180).reshape(1, 180, 180)
    c = center_crop_or_pad(a, (128, 128))
    np.testing.assert_array_equal(c, a[:, 26:154, 26:154])  # the papers' 180 -> 128 centre crop
    p = center_crop_or_pad(np.ones((2, 3, 4)), (5, 4), fill=0)
    assert p.shape == (2, 5, 4) and p[:, 1:4].all() and not p[:, 0].any() and not p[:, 4].any()


@pytest.mark.parametrize("value,expected", [("16", 16), ("[16, 8]", (16, 8)), ("null", None)])
def test_crop_size_config(value, expected):
    assert _cfg(f"data.crop_size={value}").crop_size == expected


@pytest.mark.parametrize("value", ["0", "[8, -1]", "abc", "1.5"])
def test_crop_size_config_errors(value):
    with pytest.raises(ConfigError, match="data.crop_size"):
        _cfg(f"data.crop_size={value}")


def test_crop_item_pads_image_with_channel_min():
    item = {"image": np.full((2, 4, 4), 5.0, np.float32), "labels": np.ones((3, 4, 4), np.int64), "case_id": "a",
            "meta": {}}
    item["image"][1] = -3
    crop_item(item, (6, 2))
    assert item["image"].shape == (2, 6, 2) and item["labels"].shape == (3, 6, 2)
    assert item["image"][0, 0, 0] == 5.0 and item["image"][1, 0, 0] == -3.0
    assert item["labels"][:, 0].sum() == 0 and item["labels"][:, 1:5].all()


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_augmentation_is_joint_and_keeps_labels_integer(spatial_dims):
    """Every rater's mask moves with the image: with image == stacked masks, they stay equal."""
    torch.manual_seed(0)
    from monai.utils import set_determinism

    set_determinism(seed=0)
    cfg = _cfg("data.augment.enabled=true", "data.augment.affine=true", "data.augment.prob=1.0")
    tf = train_transform(cfg, spatial_dims)
    shape = (16,) * spatial_dims
    labels = np.zeros((3, *shape), np.int64)
    for r in range(3):  # distinct asymmetric blobs per rater
        sl = tuple([slice(2 + r, 9 + 2 * r)] + [slice(1, 5 + r)] * (spatial_dims - 1))
        labels[(r, *sl)] = 1
    ds = MultiRaterDataset([{"image": labels.astype(np.float32), "labels": labels, "case_id": "x", "meta": {}}],
                           transform=tf)
    for _ in range(5):
        out = ds[0]
        img, lab = out["image"], out["labels"]
        assert lab.dtype == torch.int64 and set(lab.unique().tolist()) <= {0, 1}
        assert img.shape == lab.shape
        # nearest for masks, bilinear for the image: they agree where the image is clearly 0 or 1
        sure = (img < 0.05) | (img > 0.95)
        assert torch.equal((img[sure] > 0.5).long(), lab[sure])
        assert sure.float().mean() > 0.7


def test_flip_and_rot90_are_exact():
    from monai.utils import set_determinism

    set_determinism(seed=1)
    cfg = _cfg("data.augment.enabled=true", "data.augment.prob=1.0")
    tf = train_transform(cfg, 2)
    img = np.random.default_rng(0).random((1, 8, 8)).astype(np.float32)
    lab = (img > 0.5).astype(np.int64).repeat(2, axis=0)
    out = MultiRaterDataset([{"image": img, "labels": lab, "case_id": "x", "meta": {}}], transform=tf)[0]
    assert torch.equal((out["image"] > 0.5).long().expand(2, -1, -1), out["labels"])
    dihedral = [np.rot90(f, k, axes=(1, 2)) for f in (img, img[:, ::-1]) for k in range(4)]
    assert any(np.array_equal(out["image"].numpy(), d) for d in dihedral)  # exact: no interpolation


def test_intensity_jitter_touches_image_only():
    from monai.utils import set_determinism

    set_determinism(seed=2)
    cfg = _cfg("data.augment.enabled=true", "data.augment.flip=false", "data.augment.rot90=false",
               "data.augment.intensity=true", "data.augment.prob=1.0")
    img = np.ones((1, 4, 4), np.float32)
    lab = np.ones((2, 4, 4), np.int64)
    out = MultiRaterDataset([{"image": img, "labels": lab, "case_id": "x", "meta": {}}],
                            transform=train_transform(cfg, 2))[0]
    assert not torch.allclose(out["image"], torch.ones(1, 4, 4))
    assert torch.equal(out["labels"], torch.ones(2, 4, 4, dtype=torch.int64))


def test_disabled_augmentation_is_none():
    assert train_transform(_cfg(), 2) is None
