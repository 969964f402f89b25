"""Whole scans: preprocessing cache, resampling, patch sampling, resume, sliding-window prediction."""

import json
import logging
import os
import pickle

import nibabel as nib
import numpy as np
import pytest
import torch

from probunet.models.checkpoint import load_checkpoint
from probunet.cli import main
from probunet.config import ConfigError, load_config
from probunet.data import io
from probunet.data.patches import PatchStream
from probunet.data.preprocess import cache_dir, cached_items, preprocess, read_index, resample_labels
from probunet.runtime.distributed import DistInfo
from probunet.train.trainer import fit

TINY3D = ["model.spatial_dims=3", "train.batch_size=2", "train.val_every=1000", "train.log_every=2",
          "eval.batch_size=1"]


def write_case(root, name, image, masks, affine):
    """A QUBIQ case folder: image (x, y, z) float and masks [(x, y, z)] with one affine."""
    d = root / name
    d.mkdir(parents=True)
    nib.save(nib.Nifti1Image(image.astype(np.float32), affine), str(d / "image.nii.gz"))
    for r, m in enumerate(masks):
        nib.save(nib.Nifti1Image(m.astype(np.uint8), affine), str(d / f"task01_seg{r + 1:02d}.nii.gz"))


def cube_cases(root, n=3, shape=(24, 24, 24), lo=10, hi=12):
    """Cases whose only foreground is a small cube [lo, hi)^3 marked by 2 raters."""
    rng = np.random.default_rng(0)
    for i in range(n):
        image = rng.normal(size=shape)
        mask = np.zeros(shape, np.uint8)
        mask[lo:hi, lo:hi, lo:hi] = 1
        image[mask > 0] += 3
        write_case(root, f"c{i}", image, [mask, mask], np.eye(4))
    return root


def qubiq_cfg(path, tmp_path, *extra):
    return load_config("configs/debug.yaml", ["data.format=qubiq", f"data.path={path}", "model.spatial_dims=3",
                                              f"data.cache_dir={tmp_path / 'cache'}", *extra])


def stream_of(cfg, tmp_path, patch, oversample, batch_size=2):
    items = cached_items(preprocess(cfg), cfg)
    return PatchStream(items, patch, batch_size, seed=0, dist=DistInfo(), foreground_oversample=oversample)


@pytest.mark.parametrize("share", [0.0, 1 / 3, 1.0])
def test_foreground_oversampling_share_matches_the_setting(tmp_path, share):
    cfg = qubiq_cfg(cube_cases(tmp_path / "data"), tmp_path)
    stream = stream_of(cfg, tmp_path, 8, share)
    centred = []
    for step in range(300):  # 600 patches; a uniform patch's centre is foreground with p ~ 8/24^3
        _, labels, _ = stream.batch(step)
        centred += (labels[:, :, 4, 4, 4] > 0).any(dim=1).tolist()
    observed = float(np.mean(centred))
    assert abs(observed - share) < 0.06, observed  # 3 standard errors at 600 draws


def test_patches_are_a_function_of_seed_step_rank_and_survive_pickling(tmp_path):
    cfg = qubiq_cfg(cube_cases(tmp_path / "data"), tmp_path)
    stream = stream_of(cfg, tmp_path, 8, 0.5)
    again = pickle.loads(pickle.dumps(stream))  # what a DataLoader worker gets
    for step in (0, 7, 3):
        a, b = stream.batch(step), again.batch(step)
        assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not torch.equal(stream.batch(1)[0], stream.batch(2)[0])
    other = PatchStream(cached_items(preprocess(cfg), cfg), 8, 2, seed=0, dist=DistInfo(rank=1, world_size=2))
    assert [d[1] for d in other.draw(0)] != [d[1] for d in stream.draw(0)] or \
        [d[0] for d in other.draw(0)] != [d[0] for d in stream.draw(0)]
    image_map, _ = stream._arrays(0)
    assert isinstance(image_map, np.memmap)  # patches come from memory maps, not loaded volumes


def test_resampling_keeps_geometry_and_a_spheres_volume(tmp_path):
    shape, spacing, radius = (48, 48, 24), (0.5, 0.5, 1.0), 6.0  # mm
    affine = np.diag([*spacing, 1.0])
    affine[:3, 3] = [10.0, -5.0, 3.0]
    affine[0, 0] = -0.5  # a flipped axis: the direction must survive
    idx = np.stack(np.meshgrid(*[np.arange(s) for s in shape], indexing="ij"), -1)
    centre = np.array([24, 24, 12])
    dist = np.linalg.norm((idx - centre) * np.array(spacing), axis=-1)
    sphere = (dist <= radius).astype(np.uint8)
    write_case(tmp_path / "data", "s", sphere * 2.0, [sphere], affine)
    _, read_meta = io.read_image(tmp_path / "data" / "s" / "image.nii.gz")
    cfg = qubiq_cfg(tmp_path / "data", tmp_path, "data.spacing=[1.0, 1.0, 1.0]")
    folder = preprocess(cfg)
    case = read_index(folder)["cases"]["s"]
    assert case["spacing"] == [1.0, 1.0, 1.0] and case["shape"] == [24, 24, 24]
    assert np.allclose(case["origin"], read_meta["origin"]) and np.allclose(case["direction"], read_meta["direction"])
    raters = np.load(folder / case["raters"])
    true_volume = 4 / 3 * np.pi * radius ** 3  # 904.8 mm^3
    assert abs(raters[0].sum() * 1.0 - true_volume) / true_volume < 0.05
    # the sphere's centre is where it was: voxel (24, 24, 12) at 0.5 mm -> (12, 12, 12) at 1 mm
    assert np.allclose(np.argwhere(raters[0]).mean(0), [12, 12, 12], atol=0.3)
    # and back to the original spacing: the original shape and mask
    back = resample_labels(raters, (1.0, 1.0, 1.0), spacing, 2)[0]
    assert back.shape == shape
    dice = 2 * (back & sphere).sum() / (back.sum() + sphere.sum())
    assert dice > 0.9, dice


def test_median_spacing_is_the_cases_median(tmp_path):
    for i, sz in enumerate((1.0, 2.0, 2.0)):
        write_case(tmp_path / "data", f"c{i}", np.ones((8, 8, 8)), [np.zeros((8, 8, 8))], np.diag([sz, sz, 1, 1]))
    folder = preprocess(qubiq_cfg(tmp_path / "data", tmp_path, "data.spacing=median"))
    index = read_index(folder)
    assert index["spacing"] == [2.0, 2.0, 1.0]
    assert index["cases"]["c0"]["shape"] == [4, 4, 8] and index["cases"]["c1"]["shape"] == [8, 8, 8]


def test_cache_is_reused_and_a_changed_file_or_section_invalidates_it(tmp_path, caplog):
    data = cube_cases(tmp_path / "data", n=2)
    cfg = qubiq_cfg(data, tmp_path)
    first = preprocess(cfg)
    stamp = os.stat(first / "index.json").st_mtime_ns
    with caplog.at_level(logging.INFO, logger="probunet.data.preprocess"):
        assert preprocess(qubiq_cfg(data, tmp_path)) == first
    assert "reused" in caplog.text and os.stat(first / "index.json").st_mtime_ns == stamp
    # the data section changes: a new cache
    assert preprocess(qubiq_cfg(data, tmp_path, "data.normalize=zscore")) != first
    # a mask file changes: a new cache, with the new mask
    mask = np.zeros((24, 24, 24), np.uint8)
    mask[0:3, 0:3, 0:3] = 1
    nib.save(nib.Nifti1Image(mask, np.eye(4)), str(data / "c0" / "task01_seg02.nii.gz"))
    changed = preprocess(qubiq_cfg(data, tmp_path))
    assert changed != first and (changed / "index.json").is_file()
    assert np.load(changed / read_index(changed)["cases"]["c0"]["raters"])[1, 0, 0, 0] == 1
    assert not [p for p in (tmp_path / "cache").iterdir() if p.name.startswith(".")]  # no temp folder left


def test_preprocess_cli_and_training_keys(tmp_path, capsys):
    data = cube_cases(tmp_path / "data", n=2)
    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text(f"model: {{spatial_dims: 3, features: [4, 8], latent_dim: 2}}\n"
                        f"data: {{format: qubiq, path: {data}, patch_size: 16}}\n")
    assert main(["--quiet", "preprocess", str(cfg_file), "--out", str(tmp_path / "c"), "--no-progress"]) == 0
    out = capsys.readouterr().out
    cfg = load_config(str(cfg_file), [f"data.cache_dir={tmp_path / 'c'}"])
    assert str(cache_dir(cfg)) in out and (cache_dir(cfg) / "index.json").is_file()
    assert cfg.data.patch_size == 16 and abs(cfg.data.foreground_oversample - 1 / 3) < 1e-9
    for bad in ("data.foreground_oversample=1.5", "data.patch_size=0", "data.spacing=[1, -1, 1]"):
        with pytest.raises(ConfigError, match=bad.split("=")[0]):
            load_config(str(cfg_file), [bad])
    assert main(["--quiet", "preprocess", str(tmp_path / "missing.yaml")]) == 2


def test_a_case_smaller_than_the_patch_is_padded_with_a_note(tmp_path, caplog):
    rng = np.random.default_rng(1)
    mask = np.zeros((10, 12, 10), np.uint8)
    mask[4:6, 4:6, 4:6] = 1
    write_case(tmp_path / "data", "small", rng.normal(size=(10, 12, 10)) + 5, [mask], np.eye(4))
    cfg = qubiq_cfg(tmp_path / "data", tmp_path)
    with caplog.at_level(logging.INFO, logger="probunet.data.patches"):
        stream = stream_of(cfg, tmp_path, 16, 1.0)
    assert "smaller than data.patch_size" in caplog.text and "small" in caplog.text
    image, labels, num = stream.batch(0)
    assert image.shape == (2, 1, 16, 16, 16) and labels.shape == (2, 1, 16, 16, 16)
    # padded evenly: (16 - 10) // 2 = 3 voxels before on x; the pad holds the image minimum and background
    folder = preprocess(cfg)
    original = np.load(folder / read_index(folder)["cases"]["small"]["image"])
    assert torch.equal(image[0, 0, 3:13, 2:14, 3:13], torch.from_numpy(original[0]))
    assert float(image[0, 0, 0, 0, 0]) == pytest.approx(float(original.min()))
    assert int(labels[0, 0, :3].sum()) == 0 and int(labels[0].sum()) == 8


def test_resume_is_exact_with_patches(tmp_path):
    rng = np.random.default_rng(2)
    for i in range(5):
        mask = np.zeros((20, 20, 20), np.uint8)
        c = rng.integers(3, 15, size=3)
        mask[c[0]:c[0] + 3, c[1]:c[1] + 3, c[2]:c[2] + 3] = 1
        write_case(tmp_path / "data", f"c{i}", rng.normal(size=(20, 20, 20)) + 2 * mask, [mask, mask * 0],
                   np.eye(4))
    common = ["data.format=qubiq", f"data.path={tmp_path / 'data'}", "data.patch_size=8",
              f"data.cache_dir={tmp_path / 'cache'}", "data.augment.enabled=true", *TINY3D]
    base = ["train.steps=6", "train.checkpoint_every=3", *common]
    fit(load_config("configs/debug.yaml", base), tmp_path / "full")
    fit(load_config("configs/debug.yaml", ["train.steps=3", "train.checkpoint_every=3", *common]), tmp_path / "res")
    fit(load_config("configs/debug.yaml", base), tmp_path / "res", resume=True)
    a = load_checkpoint(tmp_path / "full" / "checkpoints" / "last.pt")
    b = load_checkpoint(tmp_path / "res" / "checkpoints" / "last.pt")
    assert a["step"] == b["step"] == 6
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    splits = json.loads((tmp_path / "full" / "splits.json").read_text())
    assert sum(len(v) for v in splits.values()) == 5
    # evaluate reads the same cache and samples whole cases in sliding windows of the patch
    assert main(["--quiet", "evaluate", str(tmp_path / "full"), "--num-samples", "2", "--no-progress"]) == 0
    summary = json.loads((tmp_path / "full" / "eval" / "summary.json").read_text())
    assert summary["num_cases"] == len(splits["test"]) and summary["metrics"]["ged"]["mean"] is not None


class IntensityModel(torch.nn.Module):
    """A test double meeting the sampling interface: foreground where the image is above 1.
    (Only the sliding-window assembly is under test here, not learning.)"""

    spatial_dims, in_channels, num_classes, divisor = 3, 1, 2, 1

    def sample(self, image, num_samples, *, generator=None):
        fg = (image[:, :1] > 1).float() * 20 - 10  # (B, 1, *sp)
        logits = torch.cat([torch.zeros_like(fg), fg], dim=1)  # (B, 2, *sp)
        return logits[:, None].expand(-1, num_samples, -1, -1, -1, -1)


def test_prediction_on_a_whole_volume_puts_lesions_where_they_are():
    from probunet.data import synthetic
    from probunet.inference.sampler import Sampler

    item = synthetic.generate(1, 48, 3, 3, seed=3, lesion_offcentre=True)[0]
    truth = item["meta"]["truth"]
    # a clean image: 2 inside the lesions that the tightest rater draws, 0 elsewhere
    lesions = synthetic.masks_from(truth, [0.5], np.ones((1, len(truth["lesions"])), bool))[0]
    image = torch.from_numpy(lesions[None, None] * 2.0).float()
    for lesion in truth["lesions"]:  # the lesions are off-centre
        assert np.abs(np.asarray(lesion["center"]) / 48 - 0.5).max() > 0.15
    sampler = Sampler(IntensityModel(), roi_size=16, overlap=0.25, batch_size=4)
    assert sampler.uses_window((48, 48, 48))
    summary = sampler.sample(["case"], image, 2)
    predicted = summary.labels[0, 0].numpy()
    assert predicted.shape == lesions.shape and np.array_equal(predicted, lesions)


def test_synthetic_default_cases_are_unchanged_by_the_new_option():
    from probunet.data import synthetic

    a = synthetic.generate(2, 16, 3, 2, seed=5)
    b = synthetic.generate(2, 16, 3, 2, seed=5, lesion_offcentre=False)
    c = synthetic.generate(2, 16, 3, 2, seed=5, lesion_offcentre=True)
    assert all(np.array_equal(x["image"], y["image"]) for x, y in zip(a, b))
    assert not np.array_equal(a[0]["image"], c[0]["image"])
    for lesion in c[0]["meta"]["truth"]["lesions"]:
        assert max(lesion["radii"]) <= 0.08 * 16


def test_prepare_lidc_3d_from_dicom_and_with_synthetic_images(tmp_path):
    from test_data_lidc_prepare import _fake_archive, _script

    vol = _fake_archive(tmp_path)  # 64x64x4 CT; reader 1 box rows 20..30 cols 30..40 on slices 1-2, reader 2 on 2
    mod = _script()
    out = tmp_path / "v"
    assert mod.main(["--3d", "--db", str(tmp_path / "fake.sqlite"), "--dicom-root", str(tmp_path / "dicom"),
                     "--out", str(out), "--crop-size", "16"]) == 0
    cfg = load_config(None, ["data.format=qubiq", f"data.path={out}", "model.spatial_dims=3"])
    from probunet.data import read_cases

    (item,) = read_cases(cfg.data)
    assert item["case_id"] == "LIDC-IDRI-9001_s0001_n00"
    assert item["image"].shape == (1, 16, 16, 16) and item["labels"].shape == (4, 16, 16, 16)
    assert np.allclose(item["meta"]["spacing"], [0.7, 0.7, 2.5])
    # centre of the union (rows 21..31, cols 31..39, slices 1-2) -> crop starts: rows 18, cols 27, slice 0
    i0, j0 = 18, 27
    window = (np.clip(vol[i0:i0 + 16, j0:j0 + 16, :].astype(np.float32), -1000, 400) + 1000) / 1400
    x = np.transpose(item["image"][0], (1, 0, 2))  # back to (row, column, slice)
    np.testing.assert_allclose(x[:, :, :4], window, atol=1e-6)
    assert np.allclose(x[:, :, 4:], 0.0)  # past the scan's last slice: the window's low end
    labels = np.transpose(item["labels"], (0, 2, 1, 3))
    expected = np.zeros((4, 64, 64, 16), np.int64)
    expected[0, 21:30, 31:40, 1:3] = 1
    expected[1, 23:32, 31:40, 2] = 1
    np.testing.assert_array_equal(labels, expected[:, i0:i0 + 16, j0:j0 + 16])
    # the synthesised-image mode writes the same masks with a CT-like volume
    out2 = tmp_path / "s"
    assert mod.main(["--3d", "--synthetic-images", "--db", str(tmp_path / "fake.sqlite"), "--out", str(out2),
                     "--crop-size", "16"]) == 0
    (syn,) = read_cases(load_config(None, ["data.format=qubiq", f"data.path={out2}", "model.spatial_dims=3"]).data)
    assert syn["image"].shape == (1, 16, 16, 16) and 0 <= syn["image"].min() and syn["image"].max() <= 1
    fg, bg = syn["labels"].max(0) > 0, syn["labels"].max(0) == 0
    assert syn["image"][0][fg].mean() > syn["image"][0][bg].mean() + 0.05  # the nodule is denser than the lung
    assert (tmp_path / "s" / "cases.csv").read_text().splitlines()[0].startswith("key,patient")
