"""``probunet export --format bundle``: a MONAI Bundle that ``python -m monai.bundle run`` runs and whose
outputs equal ``probunet predict``'s on the same images and seed."""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from probunet.export.bundle import METADATA_SCHEMA, model_card
from probunet.models.checkpoint import load_model, save_checkpoint
from probunet.cli import main
from probunet.data import prepare_items, synthetic
from probunet.evaluation.scoring import evaluate
from probunet.export.exporter import export_metadata

from test_export import _model  # noqa: E402

S = 4
SEED = 2
ROI = 16
# one image the size of the window (sampled whole), one larger (sliding windows), one smaller (whole, padded)
IMAGES = {"equal": (16, 16), "larger": (30, 21), "smaller": (12, 14)}

# The keys MONAI's published bundle metadata schema requires, read from the schema itself
# (meta_schema_20240725.json, MONAI-extra-test-data release 0.8.1, the schema the bundle declares):
# "required" at the top level, in "$defs/network_io" and in "$defs/tensor".
SCHEMA_REQUIRED = ("schema", "version", "monai_version", "pytorch_version", "numpy_version",
                   "required_packages_version", "task", "description", "authors", "copyright", "network_data_format")
SCHEMA_STRINGS = ("schema", "version", "monai_version", "pytorch_version", "numpy_version", "task", "description",
                  "authors", "copyright")
TENSOR_REQUIRED = ("type", "format", "num_channels", "spatial_shape", "dtype", "value_range")


def _needs_bundle_runner():
    missing = [m for m in ("fire", "ignite") if importlib.util.find_spec(m) is None]
    if missing:
        pytest.skip(f"python -m monai.bundle run needs {' and '.join(missing)} (pip install 'probunet[bundle]')")


def _bundle(tmp, name, extra):
    model, cfg = _model(name, extra, 2)
    ckpt = tmp / "model.pt"
    save_checkpoint({"model": model.state_dict(), "config": cfg.to_dict(), "step": 7}, ckpt)
    rc = main(["--quiet", "export", str(ckpt), "--format", "bundle", "--out", str(tmp / "bundle"),
               "--num-samples", str(S), "--seed", str(SEED), "--roi", str(ROI)])
    assert rc == 0
    images = tmp / "images"
    images.mkdir()
    rng = np.random.default_rng(0)
    for cid, shape in IMAGES.items():
        array = rng.normal(3.0, 2.0, size=shape).astype(np.float32)
        nib.save(nib.Nifti1Image(array, np.diag([0.7, 0.8, 1.0, 1.0])), str(images / f"{cid}.nii.gz"))
    return ckpt, images


@pytest.mark.parametrize("name,extra", [("prob_unet", ["data.normalize=zscore"]), ("ssn", [])])
def test_monai_bundle_run_equals_probunet_predict(tmp_path, name, extra):
    _needs_bundle_runner()
    ckpt, images = _bundle(tmp_path, name, extra)
    bundle = tmp_path / "bundle"
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # the bundle needs MONAI only
    proc = subprocess.run([sys.executable, "-m", "monai.bundle", "run", "--config_file",
                           str(bundle / "configs" / "inference.json"), "--bundle_root", str(bundle),
                           "--dataset_dir", str(images), "--output_dir", str(tmp_path / "bundle_out")],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert main(["--quiet", "predict", str(ckpt), str(images), str(tmp_path / "predict_out"), "--seed", str(SEED),
                 "--num-samples", str(S), "--roi", str(ROI), "--no-progress"]) == 0
    spread = []
    for cid, shape in IMAGES.items():
        out, ref = tmp_path / "bundle_out" / cid, tmp_path / "predict_out" / cid
        samples = nib.load(str(out / f"{cid}_samples.nii.gz"))
        prob = nib.load(str(out / f"{cid}_probability.nii.gz"))
        entropy = nib.load(str(out / f"{cid}_entropy.nii.gz"))
        got = np.moveaxis(np.asarray(samples.dataobj).reshape(*shape, S), -1, 0)  # (S, *spatial)
        want = np.stack([np.asarray(nib.load(str(ref / f"sample_{s:03d}.nii.gz")).dataobj) for s in range(S)])
        np.testing.assert_array_equal(got, want)
        np.testing.assert_allclose(np.asarray(prob.dataobj).reshape(shape),
                                   nib.load(str(ref / "probability.nii.gz")).get_fdata(), atol=1e-5)
        np.testing.assert_allclose(np.asarray(entropy.dataobj).reshape(shape),
                                   nib.load(str(ref / "entropy.nii.gz")).get_fdata(), atol=1e-5)
        np.testing.assert_allclose(prob.affine, np.diag([0.7, 0.8, 1.0, 1.0]), atol=1e-6)  # the input's geometry
        spread.append(len({tuple(s.ravel()) for s in got}) > 1)
    assert any(spread)  # the samples differ (so that equal outputs say something)


def test_metadata_has_every_key_the_schema_requires(tmp_path):
    _bundle(tmp_path, "prob_unet", [])
    bundle = tmp_path / "bundle"
    for rel in ("configs/metadata.json", "configs/inference.json", "models/model.ts", "docs/README.md"):
        assert (bundle / rel).is_file(), rel
    meta = json.loads((bundle / "configs" / "metadata.json").read_text())
    assert meta["schema"] == METADATA_SCHEMA and "meta_schema_20240725" in meta["schema"]
    missing = [k for k in SCHEMA_REQUIRED if k not in meta]
    assert not missing, missing
    for key in SCHEMA_STRINGS:
        assert isinstance(meta[key], str) and meta[key], key
    assert isinstance(meta["required_packages_version"], dict)
    io = meta["network_data_format"]
    assert set(io) >= {"inputs", "outputs"}
    tensors = [*io["inputs"].values(), *io["outputs"].values(), *io["post_processed_outputs"].values()]
    for t in tensors:
        assert not [k for k in TENSOR_REQUIRED if k not in t], t
        assert isinstance(t["num_channels"], int) and isinstance(t["spatial_shape"], list)
        assert all(isinstance(v, (int, float)) for v in t["value_range"])
    assert io["outputs"]["pred"]["num_channels"] == S * 2
    assert meta["probunet"]["model"] == "prob_unet" and meta["probunet"]["sliding_window"] == [ROI, ROI]
    inference = json.loads((bundle / "configs" / "inference.json").read_text())
    assert inference["num_samples"] == S and inference["seed"] == SEED and inference["roi_size"] == [ROI, ROI]
    # a non-empty bundle folder is not overwritten
    rc = main(["export", str(tmp_path / "model.pt"), "--format", "bundle", "--out", str(bundle)])
    assert rc == 2


def test_model_card_carries_the_evaluation(tmp_path):
    model, cfg = _model("prob_unet", [], 2)
    items = prepare_items(synthetic.generate(num_cases=2, size=32, spatial_dims=2, num_raters=4, seed=3), cfg)
    summary = evaluate(model, cfg, items, num_samples=4, seed=0, device="cpu", out_dir=tmp_path / "eval")
    saved = json.loads((tmp_path / "eval" / "summary.json").read_text())
    saved["_path"] = "eval/summary.json"
    ckpt = {"path": "run/checkpoints/best.pt", "step": 7, "digest": "ab" * 32}
    meta = export_metadata(model, cfg, ckpt, num_samples=S, fmt="bundle")
    card = model_card(model, cfg, ckpt, meta, num_samples=S, seed=0, roi=[32, 32], summary=saved)
    ged = summary["metrics"]["ged"]["mean"]
    assert f"| ged | {ged:.4f}" in card
    assert "HM-IoU" in card or "hm_iou" in card
    assert saved["conventions"]["distance"] in card  # the metric conventions travel with the numbers
    assert "Limitations" in card and "synthetic" in card and "steps planned" in card
    import re

    for line in card.splitlines():  # every table row has three cells (a bar inside a cell is escaped)
        if line.startswith("| "):
            assert len(re.findall(r"(?<!\\)\|", line)) == 4, line
    assert "latent_dim 2" in card and "dropout" not in card  # the model's own keys, not every model's
    bare = model_card(model, cfg, ckpt, meta, num_samples=S, seed=0, roi=None, summary=None)
    assert "No evaluation summary" in bare


def test_bundle_picks_up_the_runs_evaluation(tmp_path):
    """RUN/eval/summary.json (what ``probunet evaluate RUN`` writes) lands in metadata and model card."""
    model, cfg = _model("prob_unet", [], 2)
    run = tmp_path / "run"
    save_checkpoint({"model": model.state_dict(), "config": cfg.to_dict(), "step": 3},
                    run / "checkpoints" / "last.pt")
    items = prepare_items(synthetic.generate(num_cases=2, size=32, spatial_dims=2, num_raters=4, seed=3), cfg)
    evaluate(*load_model(run)[:2], items, num_samples=4, seed=0, device="cpu", out_dir=run / "eval")
    assert main(["--quiet", "export", str(run), "--format", "bundle", "--out", str(tmp_path / "b")]) == 0
    meta = json.loads((tmp_path / "b" / "configs" / "metadata.json").read_text())
    assert set(meta["eval_metrics"]) >= {"ged", "hm_iou", "empty_gap"}
    assert "| hm_iou |" in (tmp_path / "b" / "docs" / "README.md").read_text()
    assert torch.jit.load(str(tmp_path / "b" / "models" / "model.ts")) is not None
