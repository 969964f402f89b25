"""Reference rows (majority vote, all-empty, true sampler) and the spread ratio: hand-computed
values on tiny hand-built cases, and what ``probunet evaluate`` prints and writes."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from probunet.cli import main
from probunet.config import load_config
from probunet.data import synthetic
from probunet.evaluation.reference import (majority_vote, reference_rows, reference_table, spread_ratio, spread_text,
                                true_sampler_samples, fresh_true_references)
from probunet.train.trainer import fit

ROOT = Path(__file__).resolve().parents[2]


def _masks(*pixel_sets, shape=(2, 2)):
    """Label maps (len(pixel_sets), *shape) with 1 on the listed flat pixel indices."""
    out = np.zeros((len(pixel_sets), shape[0] * shape[1]), dtype=np.int64)
    for i, pixels in enumerate(pixel_sets):
        out[i, list(pixels)] = 1
    return out.reshape(len(pixel_sets), *shape)


def _item(labels, truth=None, case_id="c0"):
    meta = {"group": case_id}
    if truth is not None:
        meta["truth"] = truth
    return {"image": np.zeros((1, *labels.shape[1:]), dtype=np.float32), "labels": labels, "case_id": case_id,
            "meta": meta}


def test_majority_vote_is_strict():
    # 4 raters on 4 pixels: pixel 0 marked by 3, pixel 1 by 2 (a tie: background), pixel 3 by 1
    refs = torch.as_tensor(_masks({0, 1}, {0, 1}, {0}, {3}))[None]
    assert majority_vote(refs).tolist() == [[[1, 0], [0, 0]]]
    # three classes: pixel 0 class 2 for 3 of 4 raters, pixel 1 class 1 for 2 of 4
    multi = torch.tensor([[[2, 1]], [[2, 1]], [[2, 0]], [[1, 2]]])[None]  # (1, 4, 1, 2)
    assert majority_vote(multi, num_classes=3).tolist() == [[[2, 0]]]


def test_reference_rows_by_hand():
    """Raters Y1 = Y2 = {p0, p1}, Y3 = {p0}, Y4 = {} (2x2 image, d = 1 - IoU, two empty masks: d 0).

    E[d(Y,Y')] over the 16 ordered pairs: d(Y1,Y3) = d(Y2,Y3) = 0.5, d(Y4, any other) = 1, the rest 0:
    2 * (0.5 + 0.5 + 1 + 1 + 1) / 16 = 0.5.
    all-empty: E[d(S,Y)] = 3/4, GED = 2 * 0.75 - 0 - 0.5 = 1.0; HM-IoU: IoUs 0, 0, 0, 1 -> 0.25.
    majority vote = {p0} (pixel 1 is a 2-of-4 tie): d to the raters 0.5, 0.5, 0, 1 -> E = 0.5,
    GED = 2 * 0.5 - 0 - 0.5 = 0.5; HM-IoU: IoUs 0.5, 0.5, 1, 0 -> 0.5.
    """
    items = [_item(_masks({0, 1}, {0, 1}, {0}, set()))]
    rows = reference_rows(items, num_samples=5)
    assert set(rows) == {"majority vote", "all-empty"}  # no truth: no true sampler
    empty, maj = rows["all-empty"]["metrics"], rows["majority vote"]["metrics"]
    assert empty["ged"]["mean"] == pytest.approx(1.0)
    assert empty["hm_iou"]["mean"] == pytest.approx(0.25)
    assert empty["sample_diversity"]["mean"] == 0.0
    assert maj["ged"]["mean"] == pytest.approx(0.5)
    assert maj["hm_iou"]["mean"] == pytest.approx(0.5)
    assert "ged_true" not in maj

    # two cases: mean and standard error over them. Second case: all raters empty -> all-empty GED 0,
    # majority vote empty too -> GED 0.
    items.append(_item(_masks(set(), set(), set(), set()), case_id="c1"))
    rows = reference_rows(items, num_samples=5)
    ged = rows["all-empty"]["metrics"]["ged"]
    assert ged["mean"] == pytest.approx(0.5) and ged["n"] == 2
    assert ged["sem"] == pytest.approx(np.std([1.0, 0.0], ddof=1) / math.sqrt(2))


def _truth(presence, shape=(16, 16)):
    """A hand-built truth record: lesions of the given presence probabilities, one rater habit."""
    lesions = [{"center": [4.0 + 7.0 * k, 8.0], "radii": [2.5, 3.0], "edge": 0.5, "contrast": 0.5,
                "presence_probability": float(p)} for k, p in enumerate(presence)]
    return {"lesions": lesions, "rater_thresholds": [0.5], "rater_presence": [[1] * len(presence)],
            "shape": list(shape)}


def test_true_sampler_and_truth_scores_on_a_certain_case():
    """Lesion 0 always present, lesion 1 never: the true distribution is one mask M (lesion 0).

    Raters: M twice. true sampler: M every time -> GED 0 vs raters and vs truth, HM-IoU 1,
    presence MAE 0. all-empty: d = 1 to every reference -> GED 2 vs raters and truth, HM-IoU 0,
    presence MAE (|0 - 1| + |0 - 0|) / 2 = 0.5. majority vote = M -> like the true sampler.
    """
    truth = _truth([1.0, 0.0])
    m = synthetic.masks_from(truth, [0.5], np.array([[True, False]]))  # (1, 16, 16)
    assert m.sum() > 0
    items = [_item(np.concatenate([m, m]), truth)]
    rows = reference_rows(items, num_samples=4, num_true_references=6)
    assert set(rows) == {"majority vote", "all-empty", "true sampler"}
    for name in ("true sampler", "majority vote"):
        r = rows[name]["metrics"]
        for key, want in (("ged", 0.0), ("ged_true", 0.0), ("hm_iou", 1.0), ("hm_iou_true", 1.0),
                          ("lesion_presence_mae", 0.0), ("sample_diversity", 0.0)):
            assert r[key]["mean"] == pytest.approx(want), (name, key)
    e = rows["all-empty"]
    for key, want in (("ged", 2.0), ("ged_true", 2.0), ("hm_iou", 0.0), ("hm_iou_true", 0.0),
                      ("lesion_presence_mae", 0.5)):
        assert e["metrics"][key]["mean"] == pytest.approx(want), key
    assert e["lesion_presence_mae_pooled"] == pytest.approx(0.5)


def test_true_sampler_draws_are_seeded_and_apart_from_the_references():
    truth = _truth([0.5, 0.5])
    a = true_sampler_samples(truth, seed=3, index=7, num=40)
    assert a.shape == (40, 16, 16)
    assert np.array_equal(a, true_sampler_samples(truth, seed=3, index=7, num=40))
    refs = fresh_true_references(truth, seed=3, index=7, num=40)
    assert not np.array_equal(a, refs)  # another stream: the floor is not scored against its own draws
    # each lesion present in about half of the draws (40 draws: well inside 5..35)
    present = synthetic.lesion_presence(a, truth).sum(axis=0)
    assert all(5 <= p <= 35 for p in present), present


def test_spread_ratio_verdicts():
    assert spread_ratio(0.6, 0.5)["ratio"] == pytest.approx(1.2)
    assert spread_ratio(0.6, 0.5)["verdict"] == "over-spread"
    assert spread_ratio(0.4, 0.5)["verdict"] == "under-spread"
    assert spread_ratio(0.5, 0.5)["verdict"] == "matched"
    assert spread_ratio(0.57, 0.5)["verdict"] == "matched"  # 1.14
    assert spread_ratio(0.58, 0.5)["verdict"] == "over-spread"  # 1.16
    assert spread_ratio(0.42, 0.5)["verdict"] == "under-spread"  # 0.84
    none = spread_ratio(0.3, 0.0)
    assert none["ratio"] is None and none["verdict"] is None
    assert "n/a" in spread_text(none)
    assert "1.20: over-spread" in spread_text(spread_ratio(0.6, 0.5))


def test_spread_counts_distinct_pairs_by_hand():
    """Raters A = {p0}, B = {p1} (disjoint: d = 1). Samples A, A, B, B.

    Distinct pairs: the raters' one pair has d = 1; the samples' 12 ordered pairs
    (i != j) have 8 with d = 1: E = 2/3, so the ratio is 2/3, under-spread. Over all
    ordered pairs (the GED's convention) both would read 1/2 and the ratio 1.
    """
    from probunet.metrics import segmentation as metrics

    refs = torch.as_tensor(_masks({0}, {1}))[None]
    samples = torch.as_tensor(_masks({0}, {0}, {1}, {1}))[None]
    comp = metrics.ged_components(samples, refs)
    assert float(metrics.distinct_pair_mean(comp.d_yy)[0]) == pytest.approx(1.0)
    assert float(metrics.distinct_pair_mean(comp.d_ss)[0]) == pytest.approx(2 / 3)
    assert float(comp.sample_diversity[0]) == pytest.approx(0.5)
    assert math.isnan(float(metrics.distinct_pair_mean(comp.d_yy[:, :1, :1])[0]))  # one rater: no pair
    with pytest.raises(ValueError, match="d must be"):
        metrics.distinct_pair_mean(comp.d_sy[:, :, :1].squeeze(-1))


def test_a_sampler_drawing_like_the_raters_scores_a_spread_of_one():
    """Four raters and 100 samples drawn i.i.d. from one distribution over three masks
    (two disjoint, one overlapping): over distinct pairs the ratio is 1 up to noise; over
    all pairs it would be 99/100 / (3/4) = 1.32 times that."""
    from probunet.metrics import segmentation as metrics

    masks = _masks({0}, {1}, {0, 2}, shape=(1, 3))
    rng = np.random.default_rng(0)
    ratios, biased = [], []
    for _ in range(200):
        refs = torch.as_tensor(masks[rng.integers(0, 3, 4)])[None]
        samples = torch.as_tensor(masks[rng.integers(0, 3, 100)])[None]
        comp = metrics.ged_components(samples, refs)
        ratios.append((float(metrics.distinct_pair_mean(comp.d_ss)[0]), float(metrics.distinct_pair_mean(comp.d_yy)[0])))
        biased.append((float(comp.sample_diversity[0]), float(comp.reference_diversity[0])))
    unbiased = spread_ratio(np.mean([a for a, _ in ratios]), np.mean([b for _, b in ratios]))
    all_pairs = spread_ratio(np.mean([a for a, _ in biased]), np.mean([b for _, b in biased]))
    assert unbiased["ratio"] == pytest.approx(1.0, abs=0.05) and unbiased["verdict"] == "matched"
    assert all_pairs["ratio"] == pytest.approx(1.32, abs=0.07) and all_pairs["verdict"] == "over-spread"


def test_reference_table_prints_each_rows_spread():
    items = [_item(_masks({0}, {1}))]
    rows = reference_rows(items, num_samples=4)
    assert rows["majority vote"]["metrics"]["sample_diversity_distinct"]["mean"] == 0.0
    summary = {"num_cases": 1, "reference": rows,
               "metrics": {"ged": {"mean": 0.5}, "hm_iou": {"mean": 0.5}, "sample_diversity": {"mean": 0.5},
                           "sample_diversity_distinct": {"mean": 0.75},
                           "reference_diversity_distinct": {"mean": 1.0}}}
    lines = reference_table(summary)
    assert "spread" in lines[1]
    model = next(line for line in lines if line.strip().startswith("this model"))
    assert model.split()[-1] == "0.75"  # 0.75 / 1.0
    majority = next(line for line in lines if line.strip().startswith("majority vote"))
    assert majority.split()[-1] == "0.00"


# ----------------------------------------------------------------------------- probunet evaluate


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("reference") / "run"
    fit(load_config(ROOT / "configs" / "debug.yaml", ["train.steps=3", "train.device=cpu"]), run_dir)
    return run_dir


def test_evaluate_prints_and_writes_the_reference_rows(evaluated, capsys):
    capsys.readouterr()
    assert main(["--quiet", "evaluate", str(evaluated), "--num-samples", "4", "--no-progress",
                 "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    summary = json.loads((evaluated / "eval" / "summary.json").read_text())
    m = summary["metrics"]

    spread = summary["spread"]
    assert spread["ratio"] == pytest.approx(m["sample_diversity_distinct"]["mean"]
                                            / m["reference_diversity_distinct"]["mean"])
    assert spread["verdict"] in ("over-spread", "under-spread", "matched")
    assert f"spread ratio E[d(S,S')] / E[d(Y,Y')] vs the raters {spread['ratio']:.2f}: {spread['verdict']}" in out
    # distinct pairs from the all-pairs means: 4 samples (x 4/3) and 4 raters (x 4/3) per case
    with open(evaluated / "eval" / "per_case.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    for r in rows:
        assert float(r["sample_diversity_distinct"]) == pytest.approx(float(r["sample_diversity"]) * 4 / 3)
        assert float(r["reference_diversity_distinct"]) == pytest.approx(
            float(r["reference_diversity"]) * int(r["num_raters"]) / (int(r["num_raters"]) - 1))
    # the synthetic set knows its truth: a second ratio against the fresh true references
    true_spread = summary["spread_true"]
    assert true_spread["ratio"] == pytest.approx(
        m["sample_diversity_distinct"]["mean"]
        / summary["truth"]["metrics"]["reference_diversity_true_distinct"]["mean"])
    assert f"vs the true distribution {true_spread['ratio']:.2f}" in out

    refs = summary["reference"]
    assert set(refs) == {"majority vote", "all-empty", "true sampler"}
    for name in refs:
        assert any(line.strip().startswith(name) for line in out.splitlines()), name
    assert "this model" in out

    # all-empty, by hand from the model's per-case rows (computed apart from the reference rows):
    # d(empty, Y) = 1 for a non-empty rater, 0 for an empty one, so E[d(S,Y)] = 1 - empty share and
    # GED = 2 (1 - empty_raters) - E[d(Y,Y')]
    with open(evaluated / "eval" / "per_case.csv", newline="") as fh:
        cases = list(csv.DictReader(fh))
    want = np.mean([2 * (1 - float(c["empty_raters"])) - float(c["reference_diversity"]) for c in cases])
    assert refs["all-empty"]["metrics"]["ged"]["mean"] == pytest.approx(want)
    assert refs["all-empty"]["metrics"]["sample_diversity"]["mean"] == 0.0
    # all-empty marks no lesion: its pooled presence MAE is the mean true presence probability
    with open(evaluated / "eval" / "lesions.csv", newline="") as fh:
        true_p = [float(r["true_p"]) for r in csv.DictReader(fh)]
    assert refs["all-empty"]["lesion_presence_mae_pooled"] == pytest.approx(np.mean(true_p))
    assert len(reference_table(summary)) == 2 + 1 + 3  # title, header, the model, three rows


def test_library_call_without_references(evaluated):
    from probunet.models.checkpoint import load_model
    from probunet.data import load_splits
    from probunet.evaluation import evaluate

    model, cfg, _ = load_model(evaluated)
    items = load_splits(cfg)["val"][:2]
    result = evaluate(model, cfg, items, num_samples=2, seed=0, device="cpu", references=False)
    assert "reference" not in result and "spread" in result
    assert reference_table(result) == []


# ----------------------------------------------------------------------------- scripts/benchmark_quality.py


def test_benchmark_tables_gain_the_true_sampler_on_the_synthetic_set():
    import importlib.util

    spec = importlib.util.spec_from_file_location("benchmark_quality", ROOT / "scripts" / "benchmark_quality.py")
    bq = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bq)
    cfg = load_config(ROOT / "configs" / "debug.yaml").to_dict()
    rows, truth_rows = bq.all_reference_rows(cfg)
    assert set(rows) == {"all-empty", "majority vote", "share threshold (oracle)"}
    assert set(truth_rows) == {"true sampler"}
    ts = truth_rows["true sampler"]
    assert ts["num_cases"] == rows["all-empty"]["num_cases"] > 0
    # the floor: closer to the truth than the majority vote or all-empty masks
    assert ts["ged_true"] < rows["majority vote"]["ged_true"] < rows["all-empty"]["ged_true"]
    table = bq.markdown_table("synthetic", [], rows, truth_rows)
    line = next(l for l in table.splitlines() if "*true sampler*" in l)
    assert f"{ts['ged_true']:.3f}" in line and f"{ts['ged']:.3f}" in line
    # without the truth (e.g. the LIDC-style set) there is no true sampler and no truth column
    assert bq.markdown_table("lidc", [], rows).count("true sampler") == 0
