"""Input bounds: shift severities, --severity without --shift, duplicate overrides, YAML merge keys,
non-finite or non-positive spacings, and the training batch's memory estimate."""

import os
import subprocess
import sys
import time

import nibabel as nib
import numpy as np
import pytest
import torch

from probunet import guards
from probunet.cli import main
from probunet.config import ConfigError, check_overrides, load_config
from probunet.data.errors import DataError
from probunet.data.io import read_image
from probunet.study.shift import MAX_SEVERITY, check_shift, shift_image, shift_item

from conftest import DEBUG_CONFIG, REPO


def _err(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert err, "no error line"
    return err[-1]


# ----------------------------------------------------------------------------- shift severity


def test_blur_severity_bounded_by_image_size():
    image = np.random.default_rng(0).random((1, 64, 64)).astype(np.float32)
    shift_image(image, "blur", 64)  # the largest side: allowed
    with pytest.raises(ValueError, match=r"--severity 64\.5: --shift blur takes a severity in 0\.\.64 "):
        shift_image(image, "blur", 64.5)
    with pytest.raises(ValueError, match=r"0\.\.1024"):  # before the image is known
        check_shift("blur", 2000)


def test_huge_blur_refused_fast(tmp_path):
    """Two 64x64 images blurred at sigma 1e6 took minutes: refused at once (a subprocess, so that a
    regression fails on the timeout instead of hanging the suite)."""
    argv = [sys.executable, "-m", "probunet", "synth", str(tmp_path / "b"), "--num-cases", "2", "--size", "64",
            "--shift", "blur", "--severity", "1e6"]
    env = {**os.environ, "PYTHONPATH": REPO, "OMP_NUM_THREADS": "1"}
    t0 = time.perf_counter()
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=60, env=env)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1] == (
        "probunet synth: error: --severity 1e+06: --shift blur takes a severity in 0..64 (a blur sigma in voxels, "
        "at most the image's largest side, 64 here)")
    assert time.perf_counter() - t0 < 30
    assert not (tmp_path / "b").exists()


@pytest.mark.parametrize("kind", ["intensity", "noise", "texture", "lesion_contrast"])
def test_severity_bounded_per_kind(kind):
    image = np.random.default_rng(0).random((1, 16, 16)).astype(np.float32)
    labels = np.zeros((2, 16, 16), np.int64)
    labels[:, 4:10, 4:10] = 1
    top = MAX_SEVERITY[kind]
    out = shift_image(image, kind, top, labels=labels)  # the maximum itself is allowed
    assert np.all(np.isfinite(out))
    with pytest.raises(ValueError, match=rf"--severity .*: --shift {kind} takes a severity in 0\.\.{top:g}"):
        shift_image(image, kind, top * 1.01 + 0.01, labels=labels)


def test_noise_1e308_refused():
    image = np.zeros((1, 8, 8), np.float32)
    with pytest.raises(ValueError, match=r"--severity 1e\+308: --shift noise takes a severity in 0\.\.1000"):
        shift_image(image, "noise", 1e308)


def test_non_finite_shifted_image_names_the_case():
    item = {"case_id": "c7", "image": np.full((1, 8, 8), np.inf, np.float32), "labels": np.zeros((2, 8, 8), np.int64),
            "meta": {}}
    with pytest.raises(ValueError, match=r"shifted image of case c7 is not finite \(64 voxels"):
        shift_item(item, "intensity", 1.0)


def test_synth_severity_checks(tmp_path, capsys):
    assert main(["synth", str(tmp_path / "a"), "--num-cases", "2", "--size", "16", "--severity", "5"]) == 2
    assert "--severity 5 needs --shift" in _err(capsys)
    assert not (tmp_path / "a").exists()
    assert main(["synth", str(tmp_path / "b"), "--num-cases", "2", "--size", "16", "--shift", "blur",
                 "--severity", "17"]) == 2
    assert "--shift blur takes a severity in 0..16" in _err(capsys)
    assert main(["synth", str(tmp_path / "c"), "--num-cases", "2", "--size", "16", "--shift", "noise",
                 "--severity", "1e308"]) == 2
    assert "0..1000" in _err(capsys)
    assert main(["synth", str(tmp_path / "d"), "--num-cases", "2", "--size", "16", "--shift", "blur"]) == 0


def test_study_severity_needs_shift(tmp_path, capsys):
    assert main(["study", "no-such.yaml", "--out", str(tmp_path / "s"), "--severity", "2"]) == 2
    assert "--severity 2 needs --shift" in _err(capsys)


# ----------------------------------------------------------------------------- overrides and YAML


@pytest.mark.parametrize("command", [["train", "no-such.yaml"], ["preprocess", "no-such.yaml"],
                                     ["evaluate", "no-such-run"], ["demo", "--config", "no-such.yaml"]])
def test_duplicate_override_refused_in_every_command(tmp_path, capsys, command):
    """Refused before anything else is looked at (the missing files would be the next error)."""
    out = tmp_path / "out"
    argv = [*command, "train.steps=2", "--out", str(out), "train.steps=3"]
    assert main(argv) == 2
    assert "override 'train.steps' given twice (train.steps=2 and train.steps=3)" in _err(capsys)
    assert not out.exists()


def test_override_and_its_section_refused():
    with pytest.raises(ConfigError, match=r"override 'train.steps' is given and so is its section 'train'"):
        check_overrides(["train.steps=2", "train={lr: 0.1}"])
    check_overrides(["train.steps=2", "train.lr=0.1", "data.path=x"])  # different keys: fine


def test_yaml_merge_key_refused(tmp_path, capsys):
    path = tmp_path / "merge.yaml"
    path.write_text("train:\n  <<: {steps: 5}\n  lr: 0.001\n")
    with pytest.raises(ConfigError, match=rf"{path}: refused: a merge key '<<' in 'train'; merge keys are not "
                                          rf"supported"):
        load_config(path)
    assert main(["train", str(path), "--out", str(tmp_path / "r")]) == 2
    assert "merge keys are not supported" in _err(capsys)
    quoted = tmp_path / "quoted.yaml"  # a quoted "<<" is an ordinary (unknown) key, not a merge
    quoted.write_text('train:\n  "<<": 1\n')
    with pytest.raises(ConfigError) as info:
        load_config(quoted)
    assert "merge key" not in str(info.value)


# ----------------------------------------------------------------------------- spacing


def _nifti(path, pixdim_x=None, sform=None):
    h = nib.Nifti1Header()
    h.set_data_shape((8, 6))
    h.set_data_dtype(np.float32)
    if sform is not None:
        h.set_sform(sform, code=1)
        h["qform_code"] = 0
    else:
        h["pixdim"] = [1, pixdim_x, 1, 1, 1, 1, 1, 1]
        h["qform_code"], h["sform_code"] = 1, 0
    nib.save(nib.Nifti1Image(np.zeros((8, 6), np.float32), None, header=h), str(path))
    return path


def test_nan_spacing_named(tmp_path):
    path = _nifti(tmp_path / "nan.nii", np.nan)
    with pytest.raises(DataError, match=rf"^{path}: the voxel spacing in its header is not finite \(\[nan, 1\]\)"):
        read_image(path)
    aff = np.eye(4)
    aff[0, 0] = 0.0
    zero = _nifti(tmp_path / "zero.nii", sform=aff)
    with pytest.raises(DataError, match=rf"^{zero}: the voxel spacing in its header is not positive \(\[0, 1\]\)"):
        read_image(zero)
    assert read_image(_nifti(tmp_path / "ok.nii", 0.7))[1]["spacing"] == pytest.approx([0.7, 1.0])


def test_nan_spacing_in_a_folder_set_names_the_image(tmp_path):
    from probunet.data import read_cases

    (tmp_path / "images").mkdir()
    (tmp_path / "labels").mkdir()
    for case in ("a", "b"):
        _nifti(tmp_path / "images" / f"{case}.nii", np.nan)
        _nifti(tmp_path / "labels" / f"{case}_rater1.nii", np.nan)
    cfg = load_config(None, ["data.format=folder", f"data.path={tmp_path}", "data.image_pattern=images/{case}.nii",
                             "data.mask_pattern=labels/{case}_rater{rater}.nii"])
    with pytest.raises(DataError, match=r"images/a\.nii: the voxel spacing in its header is not finite"):
        read_cases(cfg.data)


# ----------------------------------------------------------------------------- training batch memory


def test_batch_size_refused_before_a_batch_is_gathered(tmp_path, capsys, monkeypatch):
    from probunet.data import stream

    def no_batch(self, step):
        raise AssertionError("a batch was gathered")

    monkeypatch.setattr(stream.BatchStream, "batch", no_batch)
    monkeypatch.setattr(guards, "available_memory", lambda device=None: 1 << 20)  # 1 MB
    run = tmp_path / "r"
    assert main(["train", DEBUG_CONFIG, "--out", str(run), "train.batch_size=64", "--no-progress"]) == 2
    line = _err(capsys)
    assert line.startswith("probunet train: error: train.batch_size 64 needs about ")
    assert "per 32x32 item" in line and "1.0 MB are available; lower train.batch_size (at most " in line
    # the largest batch it names fits the memory by its own per-item figure, and one more would not
    import re

    per_item = float(re.search(r"\(([\d.]+) KB per 32x32 item", line).group(1)) * 1024
    fits = int(re.search(r"at most (\d+) fits", line).group(1))
    assert fits * per_item <= 1 << 20 < (fits + 1) * per_item * 1.01
    assert not (run / "checkpoints" / "last.pt").exists() and not (run / "metrics.jsonl").exists()


def test_batch_memory_estimate_scales_with_the_batch():
    from probunet.models import LossForward, build_model
    from probunet.train.trainer import batch_memory_bytes

    cfg = load_config(DEBUG_CONFIG)
    lf = LossForward(build_model(cfg.model, cfg.train))
    need_8, per_item = batch_memory_bytes(lf, (1, 32, 32), 4, 8, torch.device("cpu"), None)
    need_64, per_item_64 = batch_memory_bytes(lf, (1, 32, 32), 4, 64, torch.device("cpu"), None)
    assert per_item == per_item_64 and need_8 == 8 * per_item and need_64 == 64 * per_item
    # at least the first level's feature maps (4 channels x 32 x 32 float32, saved by several layers) and
    # the data held twice; far below a megabyte per item for this tiny model
    assert 4 * 32 * 32 * 4 * 2 + 2 * (32 * 32 * 4 + 4 * 32 * 32) < per_item < 4 << 20


def test_memory_probe_leaves_training_unchanged(tmp_path, monkeypatch):
    """The probe runs a forward on a copy: the trained weights and the batch-norm statistics are the same
    with and without it."""
    from probunet.train.trainer import Trainer, fit

    over = ["train.steps=2", "train.val_every=100", "train.checkpoint_every=2", "train.batch_size=4",
            "model.norm=batch"]
    fit(load_config(DEBUG_CONFIG, over), tmp_path / "with")
    monkeypatch.setattr(Trainer, "_check_batch_memory", lambda self: None)
    fit(load_config(DEBUG_CONFIG, over), tmp_path / "without")
    a = torch.load(tmp_path / "with" / "checkpoints" / "last.pt", weights_only=True)["model"]
    b = torch.load(tmp_path / "without" / "checkpoints" / "last.pt", weights_only=True)["model"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
