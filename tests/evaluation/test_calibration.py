"""probunet calibrate: conformal risk control of the sampled regions (formulas by hand, refusals,
predict's region, evaluate's report, export, every zoo model, validity over resplits)."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from probunet.evaluation import calibration as C
from probunet.inference import regions
from probunet.cli import main

REPO = Path(__file__).resolve().parents[2]
DEBUG = REPO / "configs" / "debug.yaml"
FAST = ["train.steps=2", "train.val_every=2", "train.checkpoint_every=2", "train.log_every=1"]


def labels_from_votes(votes, s):
    """Sample label maps (S, *spatial): sample i marks pixel p iff i < votes[p]."""
    v = np.asarray(votes)
    return (np.arange(s).reshape(-1, *([1] * v.ndim)) < v[None]).astype(np.uint8)


def fabricated():
    """Three cases of S = 4 samples, 1x4 pixels (see the hand computations in the tests)."""
    s = 4
    a = C.case_counts("a", labels_from_votes([[4, 3, 1, 0]], s), np.array([[[1, 1, 0, 0]], [[0, 0, 1, 0]]]))
    b = C.case_counts("b", labels_from_votes([[2, 0, 4, 4]], s), np.array([[[1, 1, 0, 0]]]))
    c = C.case_counts("c", labels_from_votes([[1, 2, 3, 4]], s), np.zeros((2, 1, 4), dtype=np.uint8))
    return [a, b, c]


# ----------------------------------------------------------------------------- formulas by hand


def test_counts_curves_and_scores_by_hand():
    a, b, c = fabricated()
    assert a.union_hist.tolist() == [0, 1, 0, 1, 1] and a.all_hist.tolist() == [1, 1, 0, 1, 1]
    assert b.union_hist.tolist() == [1, 0, 1, 0, 0] and c.union_size == 0
    # a: U = {votes 4, 3, 1}; C_{j/4} = {votes >= 4 - j}
    assert np.allclose(C.fnr_curve(a), [2 / 3, 1 / 3, 1 / 3, 0, 0])
    assert np.allclose(C.fnr_curve(b), [1, 1, 1 / 2, 1 / 2, 0])
    assert C.fnr_curve(c) is None
    assert C.coverage_score(a) == 0.75 and C.coverage_score(b) == 1.0 and C.coverage_score(c) == 0.0
    assert C.region_sizes(a).tolist() == [1, 2, 2, 3, 4]


def test_multi_class_counts_use_the_union_of_the_foreground_classes():
    samples = np.array([[[0, 1, 2, 2]], [[0, 2, 0, 1]], [[1, 2, 0, 0]]])  # S = 3, classes 0..2
    raters = np.array([[[0, 0, 2, 0]], [[0, 1, 0, 0]]])
    c = C.case_counts("m", samples, raters)
    assert C.votes(samples).tolist() == [[1, 3, 1, 2]]
    assert c.union_hist.tolist() == [0, 1, 0, 1] and c.all_hist.tolist() == [0, 2, 1, 1]


def test_fnr_lambda_hat_by_hand():
    cases = fabricated()
    # n = 2 non-empty cases, R(j) = [5/6, 2/3, 5/12, 1/4, 0]; rule: 2 R + 1 <= 3 alpha
    r = C.calibrate_counts(cases, 0.5, "fnr")  # R <= 0.25: j = 3
    assert (r["lambda"], r["lambda_index"], r["min_votes"], r["n"], r["n_empty"]) == (0.75, 3, 1, 2, 1)
    assert r["calibration_risk"] == pytest.approx(0.25)
    r = C.calibrate_counts(cases, 0.4, "fnr")  # R <= 0.1: only j = 4
    assert (r["lambda"], r["min_votes"]) == (1.0, 0)
    r = C.calibrate_counts(cases, 0.7, "fnr")  # R <= 0.55: j = 2
    assert r["lambda"] == 0.5
    with pytest.raises(C.CalibrationError, match=r"2 calibration cases are too few for alpha 0.3.*1/alpha - 1 = 3"):
        C.calibrate_counts(cases, 0.3, "fnr")  # (n + 1) alpha = 0.9 < 1


def test_coverage_quantile_by_hand():
    cases = fabricated()  # scores [0.75, 1, 0] (the empty union scores 0 and counts): n = 3
    r = C.calibrate_counts(cases, 0.5, "coverage")  # ceil(4 * 0.5) = 2nd smallest = 0.75
    assert (r["lambda"], r["min_votes"], r["n"], r["n_empty"]) == (0.75, 1, 3, 1)
    assert r["calibration_risk"] == pytest.approx(2 / 3)  # a and c covered at lambda 0.75
    assert C.calibrate_counts(cases, 0.25, "coverage")["lambda"] == 1.0  # ceil(4 * 0.75) = 3rd
    assert C.conformal_quantile([0.1, 0.2, 0.3, 0.4], 0.4) == 0.3  # ceil(5 * 0.6) = 3rd
    with pytest.raises(C.CalibrationError, match="3 calibration cases are too few for alpha 0.2"):
        C.calibrate_counts(cases, 0.2, "coverage")  # ceil(4 * 0.8) = 4 > n


def test_region_threshold_is_exact_at_the_grid():
    # 1 - 0.3 = 0.7000000000000001 in floating point: the 7-of-10 pixel must still be inside C_0.3
    lab = labels_from_votes([7, 6, 10, 0], 10)
    assert C.min_votes(0.3, 10) == 7
    assert C.region(lab, 0.3).tolist() == [True, False, True, False]
    assert C.region(lab, 1.0).all() and C.region(lab, 0.0).tolist() == [False, False, True, False]
    assert C.min_votes(0.35, 10) == 7  # between grid points: the region of the lower one
    # at grid values where floating point rounds across k/S: 2/3 < 1 - 1/3 and 10 * (1 - 0.7) > 3
    assert 2 / 3 < 1 - 1 / 3 and 10 * (1 - 0.7) > 3
    assert C.min_votes(1 / 3, 3) == 2 and C.min_votes(0.7, 10) == 3
    assert C.region(labels_from_votes([2, 1, 3], 3), 1 / 3).tolist() == [True, False, True]
    assert C.region(lab, 0.7).tolist() == [True, True, True, False]  # >= 3 of 10


@pytest.mark.parametrize("alpha", [0, 1, -0.1, 1.5, float("nan")])
def test_alpha_outside_the_open_interval_is_refused(alpha):
    with pytest.raises(C.CalibrationError, match="alpha"):
        C.check_alpha(alpha)


# ----------------------------------------------------------------------------- validity over resplits


def synthetic_pool(n, s=20, seed=0):
    """Fabricated cases from a known distribution: per case a union of 30-300 pixels whose votes are
    Binomial(S, p) with p ~ Beta(4, 1.5) per case (models of varying quality), plus 50 background pixels;
    one case in ten has an empty union."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        m = 0 if i % 10 == 9 else int(rng.integers(30, 300))
        k = rng.binomial(s, rng.beta(4.0, 1.5), size=m)
        bg = rng.binomial(s, 0.1, size=50)
        union = np.bincount(k, minlength=s + 1)
        out.append(C.CaseCounts(f"c{i}", union, union + np.bincount(bg, minlength=s + 1)))
    return out


@pytest.mark.parametrize("risk", ["fnr", "coverage"])
@pytest.mark.parametrize("alpha", [0.1, 0.2])
def test_mean_test_risk_over_resplits_is_at_most_alpha(risk, alpha):
    """For a uniformly random split of a fixed pool, calibration and test cases are exchangeable, so the
    expected test risk is <= alpha exactly. The mean over R = 200 resplits estimates it with Monte Carlo
    error std/sqrt(R): the tolerance is 3 standard errors (a 0.13% one-sided false alarm rate for a valid
    procedure). Calibration sets of 20 cases make the finite-sample correction (the B/(n+1) term) matter:
    without it the FNR would come out near alpha + 1/(n+1) or more."""
    pool = synthetic_pool(40)
    r = C.resplit(pool, alpha, risk, resplits=200, calibration_fraction=0.5, seed=1)
    assert r["resplits"] == 200 and r["num_calibration"] == 20
    assert r["mean"] <= alpha + 3 * r["sem"], r
    # not a trivial region (the whole image has risk 0): it uses most of the allowed risk
    assert r["mean"] >= alpha - 2 / 21 - 0.1, r
    assert r["lambda_mean"] < 1.0


def test_resplit_check_catches_an_off_by_one_quantile(monkeypatch):
    """The check above can fail: the coverage quantile taken one rank too low (the (ceil((n+1)(1-alpha)) - 1)-th
    smallest score, a 0-/1-based slip) misses the union in more than alpha + 3 standard errors of the resplits."""
    pool = synthetic_pool(40)

    def one_rank_low(scores, alpha):
        s = np.sort(np.asarray(scores, dtype=np.float64))
        return float(s[max(math.ceil((s.size + 1) * (1 - alpha)) - 2, 0)])

    monkeypatch.setattr(regions, "conformal_quantile", one_rank_low)  # resplit lives there
    r = C.resplit(pool, 0.1, "coverage", resplits=200, calibration_fraction=0.5, seed=1)
    assert r["mean"] > 0.1 + 3 * r["sem"], r


# ----------------------------------------------------------------------------- the command


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    base = tmp_path_factory.mktemp("cal")
    run = base / "run"
    assert main(["train", str(DEBUG), *FAST, "--out", str(run), "--no-progress"]) == 0
    return run


@pytest.fixture
def run(trained, tmp_path):
    dst = tmp_path / "run"
    shutil.copytree(trained, dst)
    return dst


def _refused(argv, capsys, needle):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and needle in err[0], err


def test_calibrate_writes_the_file(run, capsys):
    assert main(["calibrate", str(run), "--alpha", "0.25", "--risk", "coverage", "--no-progress"]) == 0
    out = capsys.readouterr().out
    cal = json.loads((run / "calibration.json").read_text())
    for key in ("alpha", "risk", "lambda", "n", "n_empty", "split", "cases_digest", "num_samples", "seed"):
        assert key in cal, key
    splits = json.loads((run / "splits.json").read_text())
    val_ids = [e["case_id"] for e in splits["val"]]
    assert cal["split"] == "val" and cal["n"] == len(val_ids) == 4 and cal["num_samples"] == 8
    assert cal["cases_digest"] == C.cases_digest(val_ids)
    assert cal["alpha"] == 0.25 and cal["risk"] == "coverage" and "lambda" in out
    assert cal["min_votes"] == C.min_votes(cal["lambda"], 8)
    ckpt = __import__("torch").load(run / "checkpoints" / "best.pt", weights_only=True)
    assert cal["checkpoint_digest"] == ckpt["digest"]


@pytest.mark.parametrize("args, needle", [
    (["--alpha", "0"], "--alpha must be in (0, 1)"),
    (["--alpha", "1"], "--alpha must be in (0, 1)"),
    (["--alpha", "1.2"], "--alpha must be in (0, 1)"),
    (["--alpha", "0.1"], "4 val cases are too few for alpha 0.1"),
    (["--alpha", "0.5", "--split", "train"], "must not overlap"),
    # other data with the same case ids, split otherwise: its val split holds cases the run trained on
    (["--alpha", "0.5", "data.synthetic.seed=3", "data.split.seed=11"], "the run's training cases"),
])
def test_refusals_write_nothing(run, capsys, args, needle):
    before = sorted(p.relative_to(run) for p in run.rglob("*"))
    _refused(["calibrate", str(run), *args, "--no-progress"], capsys, needle)
    assert sorted(p.relative_to(run) for p in run.rglob("*")) == before


def test_a_run_without_validation_cases_is_refused(tmp_path, capsys):
    run = tmp_path / "noval"
    assert main(["train", str(DEBUG), *FAST, "data.split.val_fraction=0", "--out", str(run), "--no-progress"]) == 0
    capsys.readouterr()
    _refused(["calibrate", str(run), "--alpha", "0.5", "--no-progress"], capsys, "no val cases")
    assert not (run / "calibration.json").exists()


def _image_dir(tmp_path):
    inp = tmp_path / "in"
    inp.mkdir()
    rng = np.random.default_rng(0)
    for name in ("c1", "c2"):
        nib.save(nib.Nifti1Image(rng.random((32, 32)).astype(np.float32), np.eye(4)), str(inp / f"{name}.nii.gz"))
    return inp


def test_predict_writes_the_region(run, tmp_path, capsys):
    assert main(["calibrate", str(run), "--alpha", "0.5", "--no-progress"]) == 0
    cal = json.loads((run / "calibration.json").read_text())
    inp, out = _image_dir(tmp_path), tmp_path / "out"
    assert main(["predict", str(run), str(inp), str(out), "--num-samples", "8", "--no-progress"]) == 0
    for case in ("c1", "c2"):
        region = np.asarray(nib.load(str(out / case / "region.nii.gz")).dataobj)
        samples = np.stack([np.asarray(nib.load(str(out / case / f"sample_{s:03d}.nii.gz")).dataobj)
                            for s in range(8)])
        assert np.array_equal(region.astype(bool), (samples != 0).sum(0) >= cal["min_votes"])
        record = json.loads((out / case / "case.json").read_text())
        assert "region.nii.gz" in record["outputs"] and record["region"]["lambda"] == cal["lambda"]
    # a folder without predict's marker (written before it existed) holding a region is still predict's own
    (out / ".probunet-predict.json").unlink()
    assert main(["predict", str(run), str(inp), str(out), "--num-samples", "8", "--no-progress"]) == 0
    # another number of samples than calibrated: no region
    out2 = tmp_path / "out2"
    assert main(["predict", str(run), str(inp), str(out2), "--num-samples", "4", "--no-progress"]) == 0
    assert not (out2 / "c1" / "region.nii.gz").exists() and (out2 / "c1" / "consensus.nii.gz").exists()


def test_predict_ignores_a_calibration_of_another_checkpoint(run, tmp_path, caplog):
    assert main(["calibrate", str(run), "--alpha", "0.5", "--no-progress"]) == 0
    cal = json.loads((run / "calibration.json").read_text())
    cal["checkpoint_digest"] = "0" * 64
    (run / "calibration.json").write_text(json.dumps(cal))
    inp, out = _image_dir(tmp_path), tmp_path / "out"
    assert main(["predict", str(run), str(inp), str(out), "--num-samples", "8", "--no-progress"]) == 0
    assert not (out / "c1" / "region.nii.gz").exists()
    assert "another checkpoint" in caplog.text


def test_evaluate_reports_the_coverage_of_the_region(run, capsys):
    assert main(["calibrate", str(run), "--alpha", "0.25", "--risk", "coverage", "--no-progress"]) == 0
    capsys.readouterr()
    assert main(["evaluate", str(run), "--no-progress"]) == 0
    out = capsys.readouterr().out
    summary = json.loads((run / "eval" / "summary.json").read_text())
    reg = summary["calibrated_region"]
    assert reg["risk"] == "coverage" and reg["bound"] == 0.75 and "P(readers' union inside" in reg["guarantee"]
    import csv

    rows = list(csv.DictReader(open(run / "eval" / "per_case.csv")))
    covered = [float(r["region_covered"]) for r in rows]
    assert len(rows) == 5 and reg["num_cases"] == 5
    assert reg["empirical"]["mean"] == pytest.approx(np.mean(covered))
    sem = np.std(covered, ddof=1) / math.sqrt(len(covered))
    assert reg["empirical"]["sem"] == pytest.approx(sem)
    sizes = np.array([float(r["region_size"]) for r in rows]), np.array([float(r["union_size"]) for r in rows])
    assert reg["mean_region_size"] == pytest.approx(sizes[0].mean())
    assert reg["region_to_union"] == pytest.approx(sizes[0].sum() / sizes[1].sum())
    assert "calibrated region" in out and "coverage" in out and ">= 0.75" in out


def test_export_carries_lambda_and_alpha(run, tmp_path):
    from probunet.export.exporter import read_torchscript_metadata

    assert main(["calibrate", str(run), "--alpha", "0.5", "--no-progress"]) == 0
    cal = json.loads((run / "calibration.json").read_text())
    bundle = tmp_path / "bundle"
    assert main(["export", str(run), "--format", "bundle", "--out", str(bundle), "--num-samples", "8"]) == 0
    meta = read_torchscript_metadata(bundle / "models" / "model.ts")
    assert meta["calibration"]["lambda"] == cal["lambda"] and meta["calibration"]["alpha"] == 0.5
    md = json.loads((bundle / "configs" / "metadata.json").read_text())
    assert md["probunet"]["calibration"]["lambda"] == cal["lambda"]
    card = (bundle / "docs" / "README.md").read_text()
    assert "## Calibrated region" in card and "exchangeable" in card and "not a promise for any single case" in card


ZOO = sorted((REPO / "configs" / "zoo").glob("*.yaml"))
TINY = ["model.features=[4,8]", "model.latent_levels=null", "data.synthetic.num_cases=20", "data.synthetic.size=16",
        "train.steps=1", "train.batch_size=4", "train.log_every=1", "train.val_every=1", "train.val_cases=2",
        "train.val_samples=2", "train.checkpoint_every=1", "eval.num_samples=4"]


@pytest.mark.parametrize("config", ZOO, ids=lambda p: p.stem)
def test_calibrate_works_for_every_zoo_model(config, tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", str(config), *TINY, "--out", str(run), "--no-progress"]) == 0
    assert main(["calibrate", str(run), "--alpha", "0.5", "--risk", "coverage", "--no-progress"]) == 0
    cal = json.loads((run / "calibration.json").read_text())
    assert cal["num_samples"] == 4 and cal["n"] >= 1 and 0.0 <= cal["lambda"] <= 1.0
    assert cal["lambda"] * 4 == round(cal["lambda"] * 4)  # on the grid k/S


def test_benchmark_script_resplits_the_cached_counts(trained, tmp_path, capsys):
    import importlib.util

    spec = importlib.util.spec_from_file_location("benchmark_calibration", REPO / "scripts" /
                                                  "benchmark_calibration.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "bench"
    argv = [str(trained), "--out", str(out), "--resplits", "20", "--alphas", "0.5", "--device", "cpu"]
    assert bench.main(argv) in (0, 1)
    result = json.loads((out / "calibration_benchmark.json").read_text())
    assert [(r["risk"], r["alpha"], r["resplits"]) for r in result["rows"]] == [("fnr", 0.5, 20), ("coverage", 0.5, 20)]
    assert result["runs"][0]["num_cases"] == 9 and result["rows"][0]["num_test"] == 5  # val 4 + test 5: 4 + 5
    assert "| fnr | 0.5 |" in (out / "calibration_benchmark.md").read_text()
    cached = list((out / "counts").glob("*.npz"))
    assert len(cached) == 1
    bench.main(argv)  # the second run reads the cache: same rows
    again = json.loads((out / "calibration_benchmark.json").read_text())
    assert again["rows"] == result["rows"]


def test_evaluate_notes_the_calibration_split_and_skips_another_sample_count(run, capsys):
    assert main(["calibrate", str(run), "--alpha", "0.5", "--no-progress"]) == 0
    assert main(["evaluate", str(run), "eval.split=val", "--out", str(run / "ev_val.json"), "--no-progress"]) == 0
    reg = json.loads((run / "ev_val.json").read_text())["calibrated_region"]
    assert reg["risk"] == "fnr" and "not an independent check" in reg["note"]
    assert main(["evaluate", str(run), "--num-samples", "4", "--out", str(run / "ev4.json"), "--no-progress"]) == 0
    assert "calibrated_region" not in json.loads((run / "ev4.json").read_text())
