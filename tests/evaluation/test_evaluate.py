"""Evaluation: ``probunet evaluate`` files, reruns, the synthetic truth block, user errors,
and a hand check of the summary against probunet.metrics."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from probunet.metrics import segmentation as metrics
from probunet.cli import main
from probunet.config import load_config
from probunet.data import load_splits
from probunet.evaluation.report import LESION_COLUMNS, output_paths
from probunet.evaluation.scoring import CASE_METRICS, TRUTH_METRICS, by_empty_raters, evaluate
from probunet.models import build_model
from probunet.models.checkpoint import load_model
from probunet.inference.sampler import case_noise
from probunet.train.trainer import fit

ROOT = Path(__file__).resolve().parents[2]
NUM_SAMPLES = 6  # with 4 raters: HM-IoU tiles both sets to lcm(6, 4) = 12


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """One tiny trained run (configs/debug.yaml: 32x32, features [4, 8], 3 steps)."""
    run_dir = tmp_path_factory.mktemp("evaluate") / "run"
    fit(load_config(ROOT / "configs" / "debug.yaml", ["train.steps=3", "train.device=cpu"]),
        run_dir)  # validates at step 3
    return run_dir


@pytest.fixture(scope="module")
def evaluated(run):
    """``probunet evaluate RUN --num-samples 6`` into the default RUN/eval folder (on the CPU, so that
    the hand check below recomputes the very same numbers on any machine)."""
    rc = main(["--quiet", "evaluate", str(run), "--num-samples", str(NUM_SAMPLES), "--no-progress",
               "--device", "cpu"])
    assert rc == 0
    return run / "eval"


def _read_csv(path):
    with open(path, newline="") as fh:
        reader = csv.DictReader(fh)
        return reader.fieldnames, list(reader)


def _one_line_error(capsys, *needles):
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err
    lines = [l for l in err.splitlines() if l.startswith("probunet evaluate: error:")]
    assert len(lines) == 1, err
    for n in needles:
        assert n in lines[0], lines[0]
    return lines[0]


def _hand_samples(model, items, num_samples, seed):
    """The samples of each item drawn by hand: the per-case noise of probunet.inference and
    ``model.sample(noise=...)`` in fp32 -> (B, S, *spatial) label maps."""
    images = torch.stack([torch.as_tensor(i["image"]) for i in items]).float()
    noise = torch.stack([case_noise(seed, i["case_id"], num_samples, model.noise_shape) for i in items])
    with torch.inference_mode():
        return model.eval().sample(images, num_samples, noise=noise).argmax(dim=2)


def test_validation_during_training_uses_the_metrics_api(run):
    """The logged val_ged at the last step is metrics.generalized_energy_distance of the final
    weights' samples (drawn as evaluate draws them) against each case's real raters."""
    from probunet.data import real_raters

    records = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]
    val = [r for r in records if "val_ged" in r]
    assert val and val[-1]["step"] == 3 and all(math.isfinite(r["val_ged"]) for r in val)
    assert (run / "checkpoints" / "best.pt").is_file()
    model, cfg, _ = load_model(run / "checkpoints" / "last.pt")  # the weights validated at step 3
    items = load_splits(cfg)["val"][: cfg.train.val_cases]
    ged, div = [], []
    for item in items:
        samples = _hand_samples(model, [item], cfg.train.val_samples, cfg.eval.seed)
        refs = torch.as_tensor(real_raters(item))[None]
        ged.append(float(metrics.generalized_energy_distance(samples, refs, num_classes=2)[0]))
        div.append(float(metrics.sample_diversity(samples, num_classes=2)[0]))
    assert val[-1]["val_ged"] == pytest.approx(np.nanmean(ged), rel=1e-6, abs=1e-9)
    assert val[-1]["val_sample_diversity"] == pytest.approx(np.nanmean(div), rel=1e-6, abs=1e-9)


def test_cli_writes_summary_csv_and_figures(evaluated, run):
    summary = json.loads((evaluated / "summary.json").read_text())
    assert summary["kind"] == "probunet-evaluation"
    assert summary["checkpoint"] == str(run / "checkpoints" / "best.pt")
    assert summary["split"] == "test" and summary["num_samples"] == NUM_SAMPLES
    assert summary["num_cases"] == 5  # debug.yaml: 24 cases, 20% test
    assert summary["data"]["format"] == "synthetic"
    conv = summary["conventions"]
    assert conv["empty_iou"] == 1.0 and "i == j" in conv["ged_pairs"] and "lcm" in conv["hm_iou"]
    assert set(summary["metrics"]) == set(CASE_METRICS)
    for name, stat in summary["metrics"].items():
        assert set(stat) == {"mean", "sem", "std", "n", "num_nan"}
        assert stat["n"] + stat["num_nan"] == 5
        if name != "s_ncc":  # S_NCC is NaN where a model is certain everywhere
            assert stat["n"] == 5 and math.isfinite(stat["mean"]) and math.isfinite(stat["sem"]), name
    assert 0.0 <= summary["metrics"]["hm_iou"]["mean"] <= 1.0
    cal = summary["calibration"]
    assert len(cal["bin_edges"]) == cal["num_bins"] + 1 == 11
    assert sum(cal["counts"]) == 5 * 32 * 32 and 0.0 <= cal["ece"] <= 1.0

    columns, rows = _read_csv(evaluated / "per_case.csv")
    assert columns == ["case_id", "index", "num_raters", *CASE_METRICS, *TRUTH_METRICS]
    assert len(rows) == 5 and {r["num_raters"] for r in rows} == {"4"}
    for r in rows:
        assert all(math.isfinite(float(r[c])) for c in CASE_METRICS if c != "s_ncc")
    for png in ("reliability.png", "lesions.png"):
        assert (evaluated / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert set(summary["files"]) == {"summary", "per_case", "reliability", "lesions", "lesions_plot"}


def test_synthetic_truth_block_and_lesion_rows(evaluated):
    summary = json.loads((evaluated / "summary.json").read_text())
    truth = summary["truth"]
    assert truth["num_references"] == 32
    assert set(truth["metrics"]) == set(TRUTH_METRICS)
    assert all(truth["metrics"][k]["n"] == 5 for k in ("ged_true", "hm_iou_true"))
    columns, rows = _read_csv(evaluated / "lesions.csv")
    assert columns == LESION_COLUMNS
    assert len(rows) == truth["lesions"]["num_lesions"] >= 5  # 1 to 3 lesions per case
    true_p = np.array([float(r["true_p"]) for r in rows])
    sampled = np.array([float(r["sampled_freq"]) for r in rows])
    raters = np.array([float(r["rater_freq"]) for r in rows])
    assert ((0 <= true_p) & (true_p <= 1)).all() and ((0 <= sampled) & (sampled <= 1)).all()
    # frequencies are counts over 6 samples and 4 raters
    assert np.allclose(sampled * NUM_SAMPLES, np.round(sampled * NUM_SAMPLES))
    assert np.allclose(raters * 4, np.round(raters * 4))
    assert truth["lesions"]["mae_sampled_vs_true"] == pytest.approx(np.abs(sampled - true_p).mean())
    assert truth["lesions"]["mae_raters_vs_true"] == pytest.approx(np.abs(raters - true_p).mean())


def test_summary_matches_metrics_on_the_same_samples(evaluated, run):
    """Redraw the samples by hand and score them with probunet.metrics; aggregate the CSV by hand."""
    model, cfg, _ = load_model(run / "checkpoints" / "best.pt")
    items = load_splits(cfg)["test"]
    refs = torch.stack([torch.as_tensor(i["labels"]) for i in items])
    samples = _hand_samples(model, items, NUM_SAMPLES, cfg.eval.seed)  # (B, S, *spatial)
    ged = metrics.generalized_energy_distance(samples, refs, num_classes=2).numpy()
    hm = metrics.hungarian_matched_iou(samples, refs, num_classes=2).numpy()

    _, rows = _read_csv(evaluated / "per_case.csv")
    assert [r["case_id"] for r in rows] == [i["case_id"] for i in items]
    csv_ged = np.array([float(r["ged"]) for r in rows])
    np.testing.assert_allclose(csv_ged, ged, rtol=0, atol=1e-6)
    np.testing.assert_allclose([float(r["hm_iou"]) for r in rows], hm, rtol=0, atol=1e-6)
    summary = json.loads((evaluated / "summary.json").read_text())
    stat = summary["metrics"]["ged"]
    assert stat["mean"] == pytest.approx(sum(csv_ged) / len(csv_ged), abs=1e-12)
    sd = math.sqrt(sum((x - stat["mean"]) ** 2 for x in csv_ged) / (len(csv_ged) - 1))
    assert stat["sem"] == pytest.approx(sd / math.sqrt(len(csv_ged)), abs=1e-12)
    comp = [float(r["ged_cross"]) * 2 - float(r["sample_diversity"]) - float(r["reference_diversity"])
            for r in rows]
    np.testing.assert_allclose(comp, csv_ged, atol=1e-6)
    # empty masks counted by hand: a map is empty when no pixel is foreground
    for r, s, y in zip(rows, samples, refs):
        e_s = sum(int(m.max()) == 0 for m in s) / len(s)
        e_y = sum(int(m.max()) == 0 for m in y) / len(y)
        assert float(r["empty_samples"]) == pytest.approx(e_s)
        assert float(r["empty_raters"]) == pytest.approx(e_y)
        assert float(r["empty_gap"]) == pytest.approx(abs(e_s - e_y))
    groups = summary["by_empty_raters"]
    assert sum(g["num_cases"] for g in groups) == len(rows)
    assert sum(g["ged_share"] for g in groups) == pytest.approx(1.0)


def test_ged_grouped_by_raters_with_an_empty_mask():
    rows = [{"num_raters": 4, "empty_raters": 0.25, "ged": 0.2, "empty_samples": 0.5},
            {"num_raters": 4, "empty_raters": 0.0, "ged": 0.1, "empty_samples": 0.0},
            {"num_raters": 4, "empty_raters": 0.25, "ged": 0.4, "empty_samples": 0.0},
            {"num_raters": 3, "empty_raters": 1 / 3, "ged": 0.3, "empty_samples": 0.25}]
    groups = by_empty_raters(rows)
    assert [(g["empty_raters"], g["num_raters"], g["num_cases"]) for g in groups] == [(0, 4, 1), (1, 3, 1),
                                                                                      (1, 4, 2)]
    one_of_four = groups[2]
    assert one_of_four["ged"]["mean"] == pytest.approx(0.3)
    assert one_of_four["ged"]["sem"] == pytest.approx(math.sqrt(0.02) / math.sqrt(2))
    assert one_of_four["empty_samples"]["mean"] == pytest.approx(0.25)
    assert one_of_four["ged_share"] == pytest.approx(0.6 / 1.0)
    assert groups[0]["ged_share"] == pytest.approx(0.1)


def test_rerun_gives_identical_numbers(evaluated, run, tmp_path):
    out = tmp_path / "again.json"
    assert main(["--quiet", "evaluate", str(run), "--num-samples", str(NUM_SAMPLES), "--no-progress",
                 "--device", "cpu", "--out", str(out)]) == 0
    paths = output_paths(out)
    assert paths["per_case"].name == "again_per_case.csv"
    first = json.loads((evaluated / "summary.json").read_text())
    second = json.loads(out.read_text())
    first.pop("files"), second.pop("files")
    assert first == second
    assert paths["per_case"].read_text() == (evaluated / "per_case.csv").read_text()
    assert paths["lesions"].read_text() == (evaluated / "lesions.csv").read_text()


def test_library_call_without_truth(run, tmp_path):
    model, cfg, _ = load_model(run)
    items = load_splits(cfg)["val"][:2]
    for item in items:
        item["meta"].pop("truth")
    result = evaluate(model, cfg, items, num_samples=3, seed=1, device="cpu", out_dir=tmp_path / "e")
    assert "truth" not in result and result["lesions"] == [] and len(result["per_case"]) == 2
    assert sorted(p.name for p in (tmp_path / "e").iterdir()) == ["per_case.csv", "reliability.png",
                                                                   "summary.json"]
    columns, _ = _read_csv(tmp_path / "e" / "per_case.csv")
    assert not set(TRUTH_METRICS) & set(columns)
    assert not model.training  # the mode load_model gave is restored


def test_library_call_3d():
    """3D volumes (untrained model, 2 cases of 16^3) through evaluate() without writing files."""
    from probunet.data import prepare_items, synthetic

    cfg = load_config(ROOT / "configs" / "debug.yaml", ["model.spatial_dims=3", "eval.batch_size=1"])
    items = prepare_items(synthetic.generate(num_cases=2, size=16, spatial_dims=3), cfg)
    model = build_model(cfg.model)
    result = evaluate(model, cfg, items, num_samples=3, seed=0, device="cpu")
    assert result["files"] == {} and result["num_cases"] == 2
    assert sum(result["calibration"]["counts"]) == 2 * 16**3
    assert all(math.isfinite(r["ged"]) and math.isfinite(r["ged_true"]) for r in result["per_case"])
    assert model.training  # build_model gives train mode; evaluate restores it


def test_missing_checkpoint_is_a_one_line_error(tmp_path, capsys):
    rc = main(["evaluate", str(tmp_path / "nope" / "best.pt"), "--no-progress"])
    assert rc == 2
    _one_line_error(capsys, "not found", "nope")


def test_checkpoint_with_other_in_channels_is_a_one_line_error(run, tmp_path, capsys):
    """A checkpoint of a 2-channel model evaluated on the 1-channel synthetic data."""
    cfg = load_config(run / "config.yaml", ["model.in_channels=2"])
    model = build_model(cfg.model)
    path = tmp_path / "two_channels.pt"
    torch.save({"model": model.state_dict(), "config": cfg.to_dict(), "step": 0}, path)
    rc = main(["evaluate", str(path), "--no-progress"])
    assert rc == 2
    _one_line_error(capsys, "does not match the checkpoint", "1 channels", "model.in_channels")
    assert not (tmp_path / "eval").exists()


@pytest.mark.parametrize("overrides, needles", [
    (["data.synthetic.spatial_dims=3", "data.synthetic.num_cases=3", "data.synthetic.size=16"],
     ["does not match the checkpoint", "3 spatial dims", "model.spatial_dims"]),
    (["model.num_classes=3"], ["model.num_classes=3", "defined by the checkpoint"]),
    (["eval.nope=1"], ["eval.nope"]),
])
def test_config_overrides_not_matching_the_checkpoint(run, capsys, overrides, needles):
    rc = main(["evaluate", str(run), *overrides, "--no-progress"])
    assert rc == 2
    _one_line_error(capsys, *needles)


def test_labels_outside_the_models_classes(run, tmp_path, capsys):
    """A synthetic folder whose masks use label 2, for a 2-class checkpoint."""
    from probunet.data import synthetic

    items = synthetic.generate(num_cases=3, size=32)
    for item in items:
        item["labels"] = item["labels"] * 2
    synthetic.write_qubiq(items, tmp_path / "data")
    rc = main(["evaluate", str(run), f"data.path={tmp_path / 'data'}", "--no-progress"])
    assert rc == 2
    _one_line_error(capsys, "does not match the checkpoint", "0..2", "model.num_classes=2")


def test_never_overwrites_the_checkpoint_or_foreign_files(run, tmp_path, capsys):
    ckpt = run / "checkpoints" / "last.pt"
    before = ckpt.read_bytes()
    assert main(["evaluate", str(ckpt), "--out", str(ckpt), "--no-progress"]) == 2
    _one_line_error(capsys, "checkpoint")
    assert ckpt.read_bytes() == before
    foreign = tmp_path / "notes.json"
    foreign.write_text('{"mine": true}')
    assert main(["evaluate", str(ckpt), "--out", str(foreign), "--no-progress"]) == 2
    _one_line_error(capsys, "refusing to overwrite")
    assert foreign.read_text() == '{"mine": true}'
