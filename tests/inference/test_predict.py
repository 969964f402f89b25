"""probunet.inference and ``probunet predict``: folders of scans in, samples /
probability / entropy / consensus out, in the input's own geometry."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk
import torch
from torch import nn

from probunet import inference as P
from probunet.cli import main
from probunet.config import load_config
from probunet.data import synthetic
from probunet.data.transforms import normalize_image
from probunet.models.losses import elbo_loss
from probunet.models import build_model
from probunet.utils import atomic_save

REPO = Path(__file__).resolve().parents[2]
DEBUG = REPO / "configs" / "debug.yaml"


# ----------------------------------------------------------------------------- fixtures


def make_checkpoint(path: Path, overrides: list[str], steps: int = 2) -> Path:
    """A tiny model trained for a few steps on synthetic data, saved as train.py saves it."""
    cfg = load_config(DEBUG, overrides)
    torch.manual_seed(0)
    model = build_model(cfg.model)
    size = 16 if cfg.model.spatial_dims == 2 else 8  # 3D convolutions are slow on a shared CPU
    items = synthetic.generate(4, size, cfg.model.spatial_dims, 2, seed=0)
    c_in = cfg.model.in_channels
    image = torch.stack([torch.as_tensor(normalize_image(np.repeat(i["image"], c_in, 0), cfg.data)) for i in items])
    seg = torch.stack([torch.as_tensor(i["labels"][0]).clamp(max=cfg.model.num_classes - 1) for i in items])
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(steps):
        out = model(image, seg=seg)
        loss = elbo_loss(out.logits, seg, out.kl)["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
    atomic_save({"format": 1, "model": model.state_dict(), "config": cfg.to_dict(), "step": steps}, path)
    return path


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    root = tmp_path_factory.mktemp("ckpt")
    norm = "data.normalize=zscore"
    return {
        "3d": make_checkpoint(root / "m3.pt", ["model.spatial_dims=3", "data.crop_size=16", norm]),
        "2d": make_checkpoint(root / "m2.pt", ["data.crop_size=16", norm]),
        "2d_3class": make_checkpoint(root / "m2c3.pt", ["model.num_classes=3", "data.crop_size=16", norm]),
    }


OBLIQUE = 0.4  # radians about z


def write_nifti(path: Path, shape=(16, 12, 10), seed=0, dtype=np.float32) -> np.ndarray:
    """An oblique, anisotropic NIfTI; returns its affine."""
    c, s = np.cos(OBLIQUE), np.sin(OBLIQUE)
    affine = np.array([[0.8 * c, -1.1 * s, 0.0, 12.5], [0.8 * s, 1.1 * c, 0.0, -7.0],
                       [0.0, 0.0, 2.5, 30.0], [0.0, 0.0, 0.0, 1.0]])
    data = np.random.default_rng(seed).normal(100, 20, size=shape).astype(dtype)
    nib.save(nib.Nifti1Image(data, affine), str(path))
    return affine


def write_nrrd(path: Path, size=(20, 14, 8), seed=1) -> sitk.Image:
    """An NRRD with an oblique direction, anisotropic spacing and an origin; size is (x, y, z)."""
    arr = np.random.default_rng(seed).normal(size=size[::-1]).astype(np.float32)
    img = sitk.GetImageFromArray(arr)
    img.SetSpacing((0.7, 1.3, 3.0))
    img.SetOrigin((-5.0, 12.0, 40.0))
    c, s = np.cos(0.3), np.sin(0.3)
    img.SetDirection((c, 0.0, s, 0.0, 1.0, 0.0, -s, 0.0, c))
    sitk.WriteImage(img, str(path))
    return img


def rows_of(path: Path) -> dict[str, dict]:
    with open(path, newline="") as fh:
        return {r["case"]: r for r in csv.DictReader(fh)}


def listing(folder: Path) -> dict[str, float]:
    return {str(p.relative_to(folder)): p.stat().st_mtime_ns for p in sorted(folder.rglob("*"))}


# ----------------------------------------------------------------------------- geometry


def test_nifti_and_nrrd_outputs_keep_geometry(ckpts, tmp_path):
    inp, out = tmp_path / "in", tmp_path / "out"
    inp.mkdir()
    affine = write_nifti(inp / "scan_a.nii.gz")
    ref = write_nrrd(inp / "scan_b.nrrd")
    before = listing(inp)
    rc = main(["predict", str(ckpts["3d"]), str(inp), str(out), "--num-samples", "3", "--roi", "0",
               "--no-progress"])
    assert rc == 0
    assert listing(inp) == before  # the input folder is never written to

    names = ["sample_000", "sample_001", "sample_002", "probability", "entropy", "consensus"]
    a = out / "scan_a"
    assert sorted(p.name for p in a.iterdir()) == sorted([f"{n}.nii.gz" for n in names] + ["case.json"])
    ref_itk = sitk.ReadImage(str(inp / "scan_a.nii.gz"))
    for n in names:
        img = nib.load(str(a / f"{n}.nii.gz"))
        assert img.shape == (16, 12, 10)
        np.testing.assert_allclose(img.affine, affine, atol=1e-5)  # nibabel's view
        itk = sitk.ReadImage(str(a / f"{n}.nii.gz"))  # and SimpleITK's
        np.testing.assert_allclose(itk.GetSpacing(), ref_itk.GetSpacing(), atol=1e-5)
        np.testing.assert_allclose(itk.GetOrigin(), ref_itk.GetOrigin(), atol=1e-5)
        np.testing.assert_allclose(itk.GetDirection(), ref_itk.GetDirection(), atol=1e-5)

    b = out / "scan_b"
    for n in names:
        itk = sitk.ReadImage(str(b / f"{n}.nrrd"))
        assert itk.GetSize() == ref.GetSize()
        np.testing.assert_allclose(itk.GetSpacing(), ref.GetSpacing(), atol=1e-6)
        np.testing.assert_allclose(itk.GetOrigin(), ref.GetOrigin(), atol=1e-6)
        np.testing.assert_allclose(itk.GetDirection(), ref.GetDirection(), atol=1e-6)

    # the maps are what they say
    samples = np.stack([nib.load(str(a / f"sample_00{i}.nii.gz")).get_fdata() for i in range(3)])
    cons = nib.load(str(a / "consensus.nii.gz")).get_fdata()
    np.testing.assert_array_equal(cons, (samples != 0).sum(0) >= 2)
    prob = nib.load(str(a / "probability.nii.gz")).get_fdata()
    ent = nib.load(str(a / "entropy.nii.gz")).get_fdata()
    assert prob.min() >= 0 and prob.max() <= 1 and ent.min() >= -1e-6 and ent.max() <= np.log(2) + 1e-5
    assert nib.load(str(a / "sample_000.nii.gz")).get_data_dtype() == np.uint8

    rows = rows_of(out / "summary.csv")
    assert list(rows) == ["scan_a", "scan_b"]
    ra, rb = rows["scan_a"], rows["scan_b"]
    assert ra["status"] == rb["status"] == "ok" and ra["volume_unit"] == "mm3"
    assert ra["spacing"] == "0.8x1.1x2.5" and rb["spacing"] == "0.7x1.3x3" and rb["shape"] == "20x14x8"
    voxel = 0.8 * 1.1 * 2.5
    assert float(ra["consensus_volume"]) == pytest.approx(cons.sum() * voxel, rel=1e-6)
    vols = sorted((samples != 0).reshape(3, -1).sum(1) * voxel)
    assert [float(ra[k]) for k in ("sample_volume_min", "sample_volume_median", "sample_volume_max")] == \
        pytest.approx(vols, rel=1e-6)
    assert 0.0 <= float(ra["sample_diversity"]) <= 1.0


def test_output_format_option_and_4d_channels(ckpts, tmp_path):
    """--output-format nrrd from a NIfTI keeps the geometry; a 4D (x, y, z, C) NIfTI with the
    wrong channel count is an error row."""
    inp, out = tmp_path / "in", tmp_path / "out"
    inp.mkdir()
    write_nifti(inp / "a.nii.gz")
    nib.save(nib.Nifti1Image(np.zeros((8, 8, 4, 2), np.float32), np.eye(4)), str(inp / "two_channels.nii.gz"))
    s = P.predict_folder(ckpts["3d"], inp, out, num_samples=2, output_format="nrrd")
    rows = {r["case"]: r for r in s.rows}
    assert rows["a"]["status"] == "ok"
    assert rows["two_channels"]["status"] == "error" and "2 channel(s)" in rows["two_channels"]["error"]
    ref = sitk.ReadImage(str(inp / "a.nii.gz"))
    out_img = sitk.ReadImage(str(out / "a" / "probability.nrrd"))
    np.testing.assert_allclose(out_img.GetDirection(), ref.GetDirection(), atol=1e-5)
    np.testing.assert_allclose(out_img.GetOrigin(), ref.GetOrigin(), atol=1e-4)


# ----------------------------------------------------------------------------- robustness


def test_corrupt_file_among_good_ones(ckpts, tmp_path, capsys):
    inp, out = tmp_path / "in", tmp_path / "out"
    inp.mkdir()
    write_nifti(inp / "good1.nii.gz", seed=1)
    (inp / "broken.nii.gz").write_bytes(b"not an image at all")
    write_nrrd(inp / "good2.nrrd")
    (inp / "notes.txt").write_text("ignored: not an image extension")
    rc = main(["predict", str(ckpts["3d"]), str(inp), str(out), "--num-samples", "2", "--no-progress"])
    assert rc == 1
    err = capsys.readouterr().err
    assert "broken" in err and "Traceback" not in err
    rows = rows_of(out / "summary.csv")
    assert set(rows) == {"good1", "broken", "good2"}
    assert rows["broken"]["status"] == "error" and "cannot read" in rows["broken"]["error"]
    assert rows["broken"]["consensus_volume"] == ""
    assert rows["good1"]["status"] == rows["good2"]["status"] == "ok"
    assert (out / "good1" / "consensus.nii.gz").is_file() and (out / "good2" / "consensus.nrrd").is_file()
    assert not (out / "broken").exists()


def test_no_overwrite_without_flag(ckpts, tmp_path, capsys):
    inp, out = tmp_path / "in", tmp_path / "out"
    inp.mkdir()
    write_nifti(inp / "a.nii.gz")
    args = ["predict", str(ckpts["3d"]), str(inp), str(out), "--no-progress"]
    assert main(args + ["--num-samples", "3"]) == 0
    first = listing(out / "a")
    first_row = rows_of(out / "summary.csv")["a"]

    assert main(args + ["--num-samples", "3", "--seed", "7"]) == 0  # complete case: skipped
    assert listing(out / "a") == first
    row = rows_of(out / "summary.csv")["a"]
    assert row["status"] == "skipped" and row["consensus_volume"] == first_row["consensus_volume"]
    assert "skipped" in capsys.readouterr().out

    # --overwrite recomputes and removes stale files of the earlier run
    assert main(args + ["--num-samples", "2", "--overwrite"]) == 0
    names = sorted(p.name for p in (out / "a").iterdir())
    assert "sample_002.nii.gz" not in names and "sample_001.nii.gz" in names
    assert rows_of(out / "summary.csv")["a"]["status"] == "ok"

    # a folder without case.json (an interrupted run) is not touched without --overwrite
    (out / "a" / "case.json").unlink()
    before = listing(out / "a")
    assert main(args) == 1
    assert listing(out / "a") == before
    assert "--overwrite" in rows_of(out / "summary.csv")["a"]["error"]


@pytest.mark.parametrize("where", ["inside", "same"])
def test_output_inside_input_is_refused(ckpts, tmp_path, capsys, where):
    inp = tmp_path / "in"
    inp.mkdir()
    write_nifti(inp / "a.nii.gz")
    out = inp / "pred" if where == "inside" else inp
    before = listing(inp)
    assert main(["predict", str(ckpts["3d"]), str(inp), str(out), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "INPUT_DIR" in err[0]
    assert listing(inp) == before


def test_user_errors_exit_2(ckpts, tmp_path, capsys):
    inp = tmp_path / "in"
    inp.mkdir()
    assert main(["predict", str(tmp_path / "missing.pt"), str(inp), str(tmp_path / "o")]) == 2
    assert "checkpoint not found" in capsys.readouterr().err
    assert main(["predict", str(ckpts["3d"]), str(inp), str(tmp_path / "o")]) == 2  # empty folder
    assert "no input images" in capsys.readouterr().err
    write_nifti(inp / "a.nii.gz")
    assert main(["predict", str(ckpts["3d"]), str(inp), str(tmp_path / "o"), "--roi", "abc"]) == 2


# ----------------------------------------------------------------------------- 2D models


def test_2d_model_on_3d_volume_slice_by_slice(ckpts, tmp_path):
    inp, out = tmp_path / "in", tmp_path / "out"
    inp.mkdir()
    affine = write_nifti(inp / "vol.nii.gz", shape=(16, 12, 5))  # z spacing 2.5 is the coarsest
    s = P.predict_folder(ckpts["2d"], inp, out, num_samples=3, batch_size=2)
    row = s.rows[0]
    assert row["status"] == "ok" and row["mode"] == "slices(axis=2)"
    for n in ("sample_000", "probability", "entropy", "consensus"):
        img = nib.load(str(out / "vol" / f"{n}.nii.gz"))
        assert img.shape == (16, 12, 5)
        np.testing.assert_allclose(img.affine, affine, atol=1e-5)

    # slice k of the volume equals the 2D prediction of slice k with the same latents
    pred = P.Predictor.from_checkpoint(ckpts["2d"], num_samples=3)
    data = nib.load(str(inp / "vol.nii.gz")).get_fdata().astype(np.float32)
    written = np.stack([nib.load(str(out / "vol" / f"sample_00{i}.nii.gz")).get_fdata() for i in range(3)])
    for k in (0, 3):
        p2 = pred(data[:, :, k], case_id="vol")
        np.testing.assert_array_equal(p2.samples, written[:, :, :, k])
    # another axis on request
    p_axis0 = pred(data, case_id="vol", spacing=[0.8, 1.1, 2.5])
    assert p_axis0.mode == "slices(axis=2)" and p_axis0.samples.shape == (3, 16, 12, 5)
    pred0 = P.Predictor.from_checkpoint(ckpts["2d"], num_samples=3, axis=0)
    p0 = pred0(data, case_id="vol")
    assert p0.mode == "slices(axis=0)" and p0.samples.shape == (3, 16, 12, 5)
    np.testing.assert_array_equal(p0.samples[:, 4], pred0(data[4], case_id="vol").samples)


def test_png_inputs_for_a_2d_model(ckpts, tmp_path):
    from PIL import Image

    inp, out = tmp_path / "in", tmp_path / "out"
    inp.mkdir()
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (16, 24), dtype=np.uint8)).save(inp / "crop.png")  # 24 wide, 16 high
    Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(inp / "rgb.png")
    s = P.predict_folder(ckpts["2d"], inp, out, num_samples=2)
    rows = {r["case"]: r for r in s.rows}
    assert rows["crop"]["status"] == "ok" and rows["crop"]["volume_unit"] == "pixels"
    assert rows["crop"]["spacing"] == ""
    assert rows["rgb"]["status"] == "error" and "3 channel(s)" in rows["rgb"]["error"]
    assert np.asarray(Image.open(out / "crop" / "consensus.png")).shape == (16, 24)
    prob = sitk.GetArrayFromImage(sitk.ReadImage(str(out / "crop" / "probability.tif")))
    assert prob.shape == (16, 24) and prob.dtype == np.float32


def test_multiclass_outputs(ckpts, tmp_path):
    inp, out = tmp_path / "in", tmp_path / "out"
    inp.mkdir()
    write_nifti(inp / "v.nii.gz", shape=(16, 16, 3))
    s = P.predict_folder(ckpts["2d_3class"], inp, out, num_samples=5)
    row = s.rows[0]
    assert row["status"] == "ok"
    assert {"probability_class1.nii.gz", "probability_class2.nii.gz"} <= {p.name for p in (out / "v").iterdir()}
    cols = rows_of(out / "summary.csv")["v"]
    assert "consensus_volume_class1" in cols and "consensus_volume_class2" in cols
    samples = np.stack([nib.load(str(out / "v" / f"sample_00{i}.nii.gz")).get_fdata() for i in range(5)])
    cons = nib.load(str(out / "v" / "consensus.nii.gz")).get_fdata()
    counts = np.stack([(samples == k).sum(0) for k in range(3)])
    np.testing.assert_array_equal(cons, counts.argmax(0))
    p1 = nib.load(str(out / "v" / "probability_class1.nii.gz")).get_fdata()
    p2 = nib.load(str(out / "v" / "probability_class2.nii.gz")).get_fdata()
    fg = nib.load(str(out / "v" / "probability.nii.gz")).get_fdata()
    np.testing.assert_allclose(fg, p1 + p2, atol=1e-5)


# ----------------------------------------------------------------------------- sliding window


class PointwiseUNet(nn.Module):
    """A U-Net stand-in without spatial context: sliding windows must then be exact."""

    def __init__(self, in_channels: int, out_channels: int, divisor: int):
        super().__init__()
        self.out_channels, self.divisor = out_channels, divisor
        self.conv = nn.Conv3d(in_channels, out_channels, 1)

    def forward(self, x):
        return torch.tanh(self.conv(x) * 3.0)


def test_sliding_window_on_image_larger_than_patch(ckpts, tmp_path):
    inp, out = tmp_path / "in", tmp_path / "out"
    inp.mkdir()
    affine = write_nifti(inp / "big.nii.gz", shape=(30, 20, 9))  # the training patch is 16
    s = P.predict_folder(ckpts["3d"], inp, out, num_samples=3)
    assert s.rows[0]["status"] == "ok" and s.rows[0]["mode"] == "sliding_window"
    img = nib.load(str(out / "big" / "probability.nii.gz"))
    assert img.shape == (30, 20, 9)
    np.testing.assert_allclose(img.affine, affine, atol=1e-5)

    # with a context-free U-Net, windows with a shared z per sample reproduce the whole image
    whole = P.Predictor.from_checkpoint(ckpts["3d"], num_samples=4, roi_size=0)
    windowed = P.Predictor.from_checkpoint(ckpts["3d"], num_samples=4, roi_size=16, batch_size=3, sample_chunk=3,
                                           blend="gaussian")
    fake = PointwiseUNet(1, whole.model.unet.out_channels, whole.model.divisor)
    windowed.model.unet = whole.model.unet = fake  # the same module object: same weights
    data = nib.load(str(inp / "big.nii.gz")).get_fdata().astype(np.float32)
    a, b = whole(data, case_id="big"), windowed(data, case_id="big")
    assert a.mode == "whole" and b.mode == "sliding_window"
    np.testing.assert_allclose(a.probability, b.probability, atol=1e-5)
    assert (a.samples != b.samples).mean() < 1e-3  # argmax ties aside
    assert len({tuple(s.reshape(-1)[:200]) for s in b.samples}) > 1  # samples differ from each other


def test_padding_to_divisor_is_cropped_back(ckpts):
    pred = P.Predictor.from_checkpoint(ckpts["2d"], num_samples=2, roi_size=0)
    p = pred(np.random.default_rng(0).normal(size=(15, 11)).astype(np.float32))
    assert p.samples.shape == (2, 15, 11) and p.probability.shape == (2, 15, 11) and p.entropy.shape == (15, 11)
    # padding as training pads crops: each channel's minimum, split evenly, extra voxel after
    x = torch.arange(2 * 2 * 3, dtype=torch.float32).reshape(1, 2, 2, 3) + 5
    from probunet.inference.sampler import pad_to_multiple  # the padding predict uses

    padded, crop = pad_to_multiple(x, 4)
    assert padded.shape == (1, 2, 4, 4)
    torch.testing.assert_close(padded[crop], x)
    assert padded[0, 0, 0, 0] == 5 and padded[0, 1, 3, 3] == 11 and padded[0, 0, 1, 3] == 5


# ----------------------------------------------------------------------------- sampling


def test_seeded_and_batch_independent(ckpts, tmp_path):
    inp = tmp_path / "in"
    inp.mkdir()
    for i in range(3):
        write_nifti(inp / f"c{i}.nii.gz", shape=(16, 16, 4), seed=i)
    p1 = P.predict_folder(ckpts["2d"], inp, tmp_path / "o1", num_samples=4, seed=5, batch_size=1)
    p2 = P.predict_folder(ckpts["2d"], inp, tmp_path / "o2", num_samples=4, seed=5, batch_size=12, workers=1)
    p3 = P.predict_folder(ckpts["2d"], inp, tmp_path / "o3", num_samples=4, seed=6)
    for i in range(3):
        a = nib.load(str(tmp_path / "o1" / f"c{i}" / "probability.nii.gz")).get_fdata()
        b = nib.load(str(tmp_path / "o2" / f"c{i}" / "probability.nii.gz")).get_fdata()
        np.testing.assert_allclose(a, b, atol=1e-5)
    c = nib.load(str(tmp_path / "o3" / "c0" / "probability.nii.gz")).get_fdata()
    assert not np.allclose(c, nib.load(str(tmp_path / "o1" / "c0" / "probability.nii.gz")).get_fdata())
    assert [r["status"] for r in p1.rows + p2.rows + p3.rows] == ["ok"] * 9
    # more samples extend the first ones
    p8 = P.predict_folder(ckpts["2d"], inp, tmp_path / "o8", num_samples=8, seed=5)
    assert p8.rows[0]["status"] == "ok"
    for s in range(4):
        first = nib.load(str(tmp_path / "o1" / "c0" / f"sample_00{s}.nii.gz")).get_fdata()
        np.testing.assert_array_equal(nib.load(str(tmp_path / "o8" / "c0" / f"sample_00{s}.nii.gz")).get_fdata(),
                                      first)


# ----------------------------------------------------------------------------- inputs


def test_recursive_and_file_list(ckpts, tmp_path):
    inp, out = tmp_path / "in", tmp_path / "out"
    (inp / "site1" / "p01").mkdir(parents=True)
    (inp / ".hidden").mkdir()
    write_nifti(inp / "top.nii.gz")
    write_nifti(inp / "site1" / "p01" / "t1.nii.gz")
    write_nrrd(inp / "site1" / "p01" / "t1.nrrd")  # same stem as the NIfTI: both kept
    write_nifti(inp / ".hidden" / "x.nii.gz")
    assert [c.case_id for c in P.find_inputs(inp)] == ["top"]
    ids = [c.case_id for c in P.find_inputs(inp, recursive=True)]
    assert ids == ["site1/p01/t1_nii_gz", "site1/p01/t1_nrrd", "top"]

    listing_file = tmp_path / "list.txt"
    listing_file.write_text("# cases\nsite1/p01/t1.nrrd\n\nmissing.nii.gz\n")
    s = P.predict_folder(ckpts["3d"], inp, out, file_list=listing_file, num_samples=2)
    rows = {r["case"]: r for r in s.rows}
    assert rows["site1/p01/t1"]["status"] == "ok" and (out / "site1" / "p01" / "t1" / "consensus.nrrd").is_file()
    assert rows["missing"]["status"] == "error" and "not found" in rows["missing"]["error"]


def test_shards_and_merge(ckpts, tmp_path):
    inp, out = tmp_path / "in", tmp_path / "out"
    inp.mkdir()
    for i in range(3):
        write_nifti(inp / f"c{i}.nii.gz", shape=(8, 8, 4), seed=i)
    for k in range(2):
        s = P.predict_folder(ckpts["3d"], inp, out, num_samples=2, shard=f"{k}/2")
        assert s.summary_path.name == f"summary.shard-{k}-of-2.csv"
    assert len(P.predict_folder(ckpts["3d"], inp, out, num_samples=2, shard="5/6").rows) == 0
    path, rows = P.merge_summaries(out)
    assert [r["case"] for r in rows] == ["c0", "c1", "c2"] and all(r["status"] == "ok" for r in rows)
    with pytest.raises(ValueError, match="K/N"):
        P.predict_folder(ckpts["3d"], inp, out, shard="2/2")


def test_merge_shards_command(ckpts, tmp_path, capsys):
    """``probunet merge-shards OUTPUT_DIR``: summary.csv from the shards; exit 1 with a failed case, 2 (one
    line) with nothing to merge or shards of two counts."""
    inp, out = tmp_path / "in", tmp_path / "out"
    inp.mkdir()
    for i in range(2):
        write_nifti(inp / f"c{i}.nii.gz", shape=(8, 8, 4), seed=i)
    (inp / "c2.nii.gz").write_bytes(b"broken")
    for k in range(2):
        P.predict_folder(ckpts["3d"], inp, out, num_samples=2, shard=f"{k}/2")
    capsys.readouterr()
    assert main(["merge-shards", str(out)]) == 1  # c2 failed
    assert capsys.readouterr().out.strip() == f"merged 3 rows into {out / 'summary.csv'}"
    assert {r["case"]: r["status"] for r in csv.DictReader(open(out / "summary.csv"))} == \
        {"c0": "ok", "c1": "ok", "c2": "error"}
    (out / "summary.shard-0-of-3.csv").write_bytes((out / "summary.shard-0-of-2.csv").read_bytes())
    assert main(["merge-shards", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("probunet merge-shards: error:") and "different shard counts" in err
    assert len(err.strip().splitlines()) == 1
    (tmp_path / "empty").mkdir()
    assert main(["merge-shards", str(tmp_path / "empty")]) == 2
    assert "no shard summaries" in capsys.readouterr().err


def test_predict_batch_script(ckpts, tmp_path):
    inp, out = tmp_path / "in", tmp_path / "out"
    inp.mkdir()
    write_nifti(inp / "a.nii.gz", shape=(8, 8, 4))
    write_nrrd(inp / "b.nrrd", size=(8, 8, 4))
    (inp / "c.nii.gz").write_bytes(b"broken")
    env = dict(os.environ, PYTHONPATH=str(REPO))
    res = subprocess.run([sys.executable, str(REPO / "scripts" / "predict_batch.py"), str(ckpts["3d"]), str(inp),
                          str(out), "--workers", "2", "--num-samples", "2", "--device", "cpu"],
                         capture_output=True, text=True, env=env, timeout=300)
    assert res.returncode == 1, res.stdout + res.stderr
    rows = rows_of(out / "summary.csv")
    assert {k: r["status"] for k, r in rows.items()} == {"a": "ok", "b": "ok", "c": "error"}
    assert "[worker" in res.stdout
