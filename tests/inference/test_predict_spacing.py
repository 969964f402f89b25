"""Prediction of whole scans at the training spacing, outputs on the scan's own grid; median spacing
written into a run's config."""

import csv
import json
import logging

import nibabel as nib
import numpy as np
import pytest
import torch
import yaml

from probunet.inference.folder import predict_folder
from probunet.models.checkpoint import load_checkpoint
from probunet.config import load_config
from probunet.data.preprocess import preprocess, read_index
from probunet.models.base import SegmentationModel
from probunet.inference.predictor import Predictor
from probunet.train.trainer import fit
from test_volumes import TINY3D, write_case


class ThresholdModel(SegmentationModel):
    """A test double for the geometry path (not learning): every sample is foreground where the
    image is above 1. Records the spatial shape of every image it is given."""

    def __init__(self):
        super().__init__()
        self.init_interface(3, 1, 2, [4])
        self.seen = []

    def sample(self, image, num_samples, *, generator=None, **kw):
        self.seen.append(tuple(image.shape[2:]))
        fg = (image[:, :1] > 1).float() * 20 - 10  # (B, 1, *sp)
        logits = torch.cat([torch.zeros_like(fg), fg], dim=1)  # (B, 2, *sp)
        return logits[:, None].expand(-1, num_samples, *logits.shape[1:]).clone()


@pytest.fixture(autouse=True)
def _threshold_model_registered():
    """Predictor reads a model's spec (what its samples are): the test double has one while a test runs."""
    from probunet.models import ModelSpec, register_model, unregister_model

    register_model(ModelSpec(name="_threshold_test", model_class=ThresholdModel,
                             build=lambda model_cfg, train_cfg=None: ThresholdModel(), samples="latent",
                             export_refusal="a test double", onnx_refusal="a test double"))
    try:
        yield
    finally:
        unregister_model("_threshold_test")


def predictor(spacing="[2.0, 2.0, 2.0]", roi=0, samples=2):
    cfg = load_config("configs/debug.yaml", ["model.spatial_dims=3", "data.patch_size=8",
                                             f"data.spacing={spacing}"])
    return Predictor(ThresholdModel(), cfg, num_samples=samples, roi_size=roi)


def sphere(shape, spacing, centre, radius):
    """(*shape) float32: 2 inside a sphere of ``radius`` mm around voxel ``centre``, 0 outside."""
    idx = np.stack(np.meshgrid(*[np.arange(s) for s in shape], indexing="ij"), -1)
    dist = np.linalg.norm((idx - np.asarray(centre)) * np.asarray(spacing), axis=-1)
    return (dist <= radius).astype(np.float32) * 2.0


def affine_of(spacing, origin=(12.0, -7.0, 30.0)):
    a = np.diag([*spacing, 1.0])
    a[0, 0] = -spacing[0]  # a flipped axis: the direction must come back
    a[:3, 3] = origin
    return a


def test_the_model_sees_the_scan_at_the_training_spacing_and_outputs_keep_its_geometry(tmp_path, caplog):
    shape, spacing = (20, 18, 16), (1.0, 1.0, 1.0)
    inp, out = tmp_path / "in", tmp_path / "out"
    inp.mkdir()
    affine = affine_of(spacing)
    nib.save(nib.Nifti1Image(sphere(shape, spacing, (9, 8, 7), 4.0), affine), str(inp / "scan.nii.gz"))
    p = predictor()
    with caplog.at_level(logging.INFO, logger="probunet.inference.predictor"):
        summary = predict_folder(p, inp, out)
    assert summary.rows[0]["status"] == "ok", summary.rows[0]
    assert p.model.seen == [(10, 9, 8)]  # half the size: 2 mm voxels
    assert "resampled from spacing [1.0, 1.0, 1.0] to [2.0, 2.0, 2.0]" in caplog.text
    files = sorted((out / "scan").glob("*.nii.gz"))
    assert {f.name for f in files} == {"sample_000.nii.gz", "sample_001.nii.gz", "probability.nii.gz",
                                       "entropy.nii.gz", "consensus.nii.gz"}
    for f in files:
        img = nib.load(str(f))
        assert img.shape == shape, f.name
        np.testing.assert_allclose(img.affine, affine, atol=1e-5, err_msg=f.name)  # spacing, origin, direction
    record = json.loads((out / "scan" / "case.json").read_text())
    assert record["resampling"] == {"spacing": [1.0, 1.0, 1.0], "model_spacing": [2.0, 2.0, 2.0],
                                    "model_shape": [10, 9, 8]}


@pytest.mark.parametrize("spacing, target, centre", [
    ((1.0, 1.0, 1.0), "[2.0, 2.0, 2.0]", (13, 8, 10)),  # the model's grid is coarser
    ((1.0, 1.5, 2.0), "[2.0, 1.0, 1.0]", (7, 9, 5)),  # coarser on one axis, finer on two
])
def test_a_lesion_stays_where_it_is_and_volumes_are_the_scans_mm3(tmp_path, spacing, target, centre):
    shape, radius = (22, 20, 12), 4.0
    inp, out = tmp_path / "in", tmp_path / "out"
    inp.mkdir()
    image = sphere(shape, spacing, centre, radius)
    nib.save(nib.Nifti1Image(image, affine_of(spacing)), str(inp / "scan.nii.gz"))
    p = predictor(target, roi=8)  # and in sliding windows of the training patch
    summary = predict_folder(p, inp, out)
    row = summary.rows[0]
    assert row["status"] == "ok" and row["mode"] == "sliding_window", row
    want = tuple(int(round(n * s / t)) for n, s, t in zip(shape, spacing, yaml.safe_load(target)))
    assert p.model.seen and set(p.model.seen) == {(8, 8, 8)}  # windows over the model's grid
    assert json.loads((out / "scan" / "case.json").read_text())["resampling"]["model_shape"] == list(want)
    consensus = nib.load(str(out / "scan" / "consensus.nii.gz")).get_fdata()
    assert consensus.shape == shape
    centroid = np.argwhere(consensus > 0).mean(axis=0)
    assert np.abs(centroid - np.asarray(centre)).max() <= 1.0, centroid
    # the summary's volume is in the scan's mm3: the sphere's 268 mm3, within the resampling error
    true_volume = float((image > 0).sum() * np.prod(spacing))
    assert row["volume_unit"] == "mm3" and row["spacing"] == "x".join(f"{v:.6g}" for v in spacing)
    assert abs(row["consensus_volume"] - true_volume) / true_volume < 0.25, (row["consensus_volume"], true_volume)
    with open(out / "summary.csv", newline="") as fh:
        (written,) = list(csv.DictReader(fh))
    assert float(written["consensus_volume"]) == pytest.approx(row["consensus_volume"])
    # the in-memory API gives the same maps on the same grid
    pred = p(image, case_id="scan", spacing=spacing)
    assert pred.samples.shape == (2, *shape) and pred.probability.shape == (2, *shape)
    assert pred.entropy.shape == shape and pred.consensus.shape == shape
    assert pred.resampling["model_shape"] == list(want)
    np.testing.assert_array_equal(pred.consensus, consensus)
    np.testing.assert_allclose(pred.probability.sum(0), 1.0, atol=1e-5)  # still a distribution


def test_the_model_grid_shape_follows_preprocessing():
    p = predictor("[2.0, 2.0, 2.0]")
    p(np.zeros((17, 20, 9), np.float32), spacing=(1.0, 1.0, 1.0))
    assert p.model.seen == [(8, 10, 4)]  # round(17 / 2) = 8 (round half to even), 10, round(4.5) = 4
    pred = p(np.zeros((17, 20, 9), np.float32), spacing=(1.0, 1.0, 1.0))
    assert pred.consensus.shape == (17, 20, 9)


def test_no_resampling_at_the_training_spacing_or_without_a_spacing(caplog):
    image = sphere((12, 12, 12), (2.0, 2.0, 2.0), (6, 6, 6), 5.0)
    p = predictor("[2.0, 2.0, 2.0]")
    with caplog.at_level(logging.INFO, logger="probunet.inference.predictor"):
        a = p(image, case_id="a", spacing=(2.0005, 1.9995, 2.0))  # within the tolerance (0.1%)
        assert "resampled" not in caplog.text and a.resampling is None
        b = p(image, case_id="b")  # no spacing: predicted as it is, with a note
    assert p.model.seen == [(12, 12, 12), (12, 12, 12)]
    assert "b: spacing unknown; predicted at its own voxel size" in caplog.text
    assert "resampled" not in caplog.text
    np.testing.assert_array_equal(a.consensus, image > 1)
    np.testing.assert_array_equal(b.consensus, image > 1)
    # a run without data.spacing (or without patch_size) never resamples
    for cfg in (load_config("configs/debug.yaml", ["model.spatial_dims=3", "data.patch_size=8"]),
                load_config("configs/debug.yaml", ["model.spatial_dims=3", "data.spacing=[1, 1, 1]"])):
        q = Predictor(ThresholdModel(), cfg, num_samples=1, roi_size=0)
        q(image, spacing=(2.0, 2.0, 2.0))
        assert q.model.seen == [(12, 12, 12)] and q.target_spacing is None


def test_median_spacing_is_written_into_the_runs_config(tmp_path):
    rng = np.random.default_rng(0)
    for i, sz in enumerate((1.0, 2.0, 2.0, 2.0)):
        mask = np.zeros((12, 12, 12), np.uint8)
        mask[4:8, 4:8, 4:8] = 1
        write_case(tmp_path / "data", f"c{i}", rng.normal(size=(12, 12, 12)) + 3 * mask, [mask, mask],
                   np.diag([sz, sz, 1.0, 1.0]))
    common = ["data.format=qubiq", f"data.path={tmp_path / 'data'}", "data.patch_size=8", "data.spacing=median",
              f"data.cache_dir={tmp_path / 'cache'}", "train.steps=2", "train.checkpoint_every=2", *TINY3D]
    cfg = load_config("configs/debug.yaml", common)
    fit(cfg, tmp_path / "run")
    assert cfg.data.spacing == "median"  # the caller's config is left as it was
    text = (tmp_path / "run" / "config.yaml").read_text()
    assert yaml.safe_load(text)["data"]["spacing"] == [2.0, 2.0, 1.0]
    assert text.startswith("# data.spacing was \"median\"")  # the original setting, as a comment
    ckpt = load_checkpoint(tmp_path / "run" / "checkpoints" / "last.pt")
    assert list(ckpt["config"]["data"]["spacing"]) == [2.0, 2.0, 1.0]
    (cache,) = [p for p in (tmp_path / "cache").iterdir()]
    assert read_index(cache)["spacing"] == [2.0, 2.0, 1.0]
    # the run's config finds the cache its training built (no second one)
    run_cfg = load_config(str(tmp_path / "run" / "config.yaml"))
    assert run_cfg.data.spacing == (2.0, 2.0, 1.0)
    assert preprocess(run_cfg) == cache and len(list((tmp_path / "cache").iterdir())) == 1
    # resumed from the run's own config.yaml: the numbers and the note of the original setting stay
    fit(load_config(str(tmp_path / "run" / "config.yaml"), ["train.steps=3"]), tmp_path / "run", resume=True)
    again = (tmp_path / "run" / "config.yaml").read_text()
    assert again.startswith("# data.spacing was \"median\"") and yaml.safe_load(again)["data"]["spacing"] == \
        [2.0, 2.0, 1.0] and yaml.safe_load(again)["train"]["steps"] == 3
    assert len(list((tmp_path / "cache").iterdir())) == 1
    # and predict of the run resamples to it
    p = Predictor.from_checkpoint(tmp_path / "run", num_samples=1)
    assert p.target_spacing == (2.0, 2.0, 1.0)
    pred = p(rng.normal(size=(16, 16, 8)).astype(np.float32), spacing=(1.0, 1.0, 1.0))
    assert pred.resampling["model_shape"] == [8, 8, 8] and pred.consensus.shape == (16, 16, 8)
