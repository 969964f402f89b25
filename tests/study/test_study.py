"""``probunet study`` end to end on the debug config, the ensemble of Probabilistic U-Nets, and
``probunet synth --shift``."""

import csv
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from probunet.cli import main
from probunet.config import ConfigError, load_config

REPO = Path(__file__).resolve().parents[2]
DEBUG = REPO / "configs" / "debug.yaml"
ENSEMBLE = ["model.name=ensemble", "model.member=prob_unet", "model.ensemble_size=2"]


# ----------------------------------------------------------------------------- ensemble of prob_unet


def test_ensemble_of_prob_unet_trains_samples_and_has_epistemic_where_members_disagree(tmp_path):
    from probunet.models.checkpoint import load_model
    from probunet.models.zoo.member_ensemble import MemberEnsemble
    from probunet.inference.uncertainty import decompose, uncertainty_maps

    run = tmp_path / "run"
    assert main(["train", str(DEBUG), *ENSEMBLE, "train.steps=3", "--out", str(run), "--no-progress"]) == 0
    model, cfg, _ = load_model(run)
    assert isinstance(model, MemberEnsemble) and model.num_members == 2 and model.member_name == "prob_unet"
    x = torch.as_tensor(np.random.default_rng(0).random((2, 1, 32, 32)), dtype=torch.float32)
    logits = model.sample(x, 8, generator=torch.Generator().manual_seed(1))
    assert logits.shape == (2, 8, 2, 32, 32)
    # sample s is member s mod M's draw: the members' own samples from the same generator stream
    g = torch.Generator().manual_seed(1)
    for m in range(2):
        assert torch.allclose(logits[:, m::2], model.members[m].sample(x, 4, generator=g))
    maps = uncertainty_maps(model, x, logits)
    assert set(maps) == {"total", "aleatoric", "epistemic"}
    assert torch.allclose(maps["total"], maps["aleatoric"] + maps["epistemic"], atol=1e-6)
    p = torch.softmax(logits, dim=2)[:, :, 1]  # (B, S, *sp) foreground probability
    disagree = (p[:, 0::2].mean(1) - p[:, 1::2].mean(1)).abs()  # member 0 vs member 1
    assert disagree.max() > 0.05
    assert (maps["epistemic"][disagree > 0.05] > 0).all()
    # identical members: no epistemic, whatever the latent draws
    same = torch.softmax(logits, dim=2)[:, 0::2].repeat_interleave(2, dim=1)  # members 0 and 1 equal
    assert decompose(same, groups=2)["epistemic"].abs().max() < 1e-6


def test_ensemble_member_is_checked():
    with pytest.raises(ConfigError, match="model.member"):
        from probunet.models import build_model

        build_model(load_config(DEBUG, ["model.name=ensemble", "model.member=vae"]).model)


# ----------------------------------------------------------------------------- the study


def test_study_end_to_end_and_resume(tmp_path, capsys, monkeypatch):
    ens = tmp_path / "ens_prob_unet.yaml"
    ens.write_text(DEBUG.read_text().replace("model:\n", "model:\n  name: ensemble\n  member: prob_unet\n"
                                                         "  ensemble_size: 2\n", 1))
    out = tmp_path / "study"
    args = ["study", str(DEBUG), str(ens), "--out", str(out), "--steps", "2", "--shift", "intensity",
            "--num-samples", "4", "--fail", "one_minus_dice=0.5", "--no-progress"]
    assert main(args) == 0
    study = json.loads((out / "study.json").read_text())
    for name in ("study.md", "study.csv", "risk_coverage.png", "reliability.png", "ood.png"):
        assert (out / name).is_file(), name
    models = [m["name"] for m in study["settings"]["models"]]
    assert models == ["debug", "ens_prob_unet"]
    num_test = study["settings"]["num_cases"]["test"]
    assert num_test == study["settings"]["num_cases"]["shifted"] > 0
    # cases: "<model>/<set>/<case>" -> map -> aggregation -> score; epistemic only for the ensemble
    keys = list(study["cases"])
    assert len(keys) == 2 * 2 * num_test
    debug_case = study["cases"][next(k for k in keys if k.startswith("debug/test/"))]
    ens_case = study["cases"][next(k for k in keys if k.startswith("ens_prob_unet/shifted/"))]
    assert set(debug_case) == {"total", "aleatoric"} and set(ens_case) == {"total", "aleatoric", "epistemic"}
    assert set(debug_case["total"]) == {"mean", "sum", "above_threshold", "patch_max"}
    assert set(study["risks"][keys[0]]) == {"one_minus_dice", "ged"}
    res = study["results"]
    for q in ("failure.one_minus_dice.aurc", "failure.one_minus_dice.e_aurc", "failure.one_minus_dice.auroc",
              "failure.ged.aurc", "ood.auroc", "performance", "calibration", "mean_score", "mean_score_shifted"):
        assert set(res[q]) == {"debug", "ens_prob_unet"}, q
    assert "epistemic.mean" in res["ood.auroc"]["ens_prob_unet"] and "epistemic.mean" not in res["ood.auroc"]["debug"]
    for v in res["failure.ged.e_aurc"]["debug"].values():
        assert v >= -1e-12
    # the intensity shift: every mean score is defined on both sets; OOD AUROC in [0, 1]
    assert all(0.0 <= v <= 1.0 for v in res["ood.auroc"]["debug"].values())
    cal = res["calibration"]["debug"]
    assert {"ece", "ace", "brier", "ece_shifted", "ace_shifted", "brier_shifted"} <= set(cal)
    assert study["settings"]["failure"]["one_minus_dice"] == 0.5
    rows = list(csv.DictReader(open(out / "study.csv")))
    assert len(rows) == 2 * 2 * num_test and {r["set"] for r in rows} == {"test", "shifted"}
    assert rows[0]["epistemic.mean"] == "" and rows[-1]["epistemic.mean"] != ""
    md = (out / "study.md").read_text()
    assert "## ood.auroc" in md and "| ens_prob_unet |" in md and "## calibration" in md
    assert "best score" in capsys.readouterr().out
    # a second run reads every model from its cache: no sampling, the same numbers
    import probunet.study.pipeline as study_mod

    def boom(*a, **k):
        raise AssertionError("a cached model was sampled again")

    monkeypatch.setattr(study_mod, "score_set", boom)
    assert main(args) == 0
    assert json.loads((out / "study.json").read_text())["results"] == res


def test_study_refuses_a_map_the_model_cannot_give(tmp_path, capsys):
    rc = main(["study", str(DEBUG), "--out", str(tmp_path / "s"), "--steps", "1", "--num-samples", "2",
               "--maps", "epistemic", "--no-progress"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "prob_unet gives no epistemic map" in err[0]


@pytest.mark.parametrize("extra, message", [
    (["--shift", "noise", "--ood", "."], "not both"),
    (["--shift", "noise", "--severity", "-1"], "--severity"),
    (["--fail", "dice"], "--fail dice"),
    (["--fail", "loss=0.2"], "unknown risk"),
])
def test_study_argument_errors_are_one_line(tmp_path, capsys, extra, message):
    rc = main(["study", str(DEBUG), "--out", str(tmp_path / "s"), *extra])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and message in err[0]


# ----------------------------------------------------------------------------- synth --shift


def test_synth_shift_writes_a_shifted_copy_with_the_same_masks(tmp_path):
    plain, shifted = tmp_path / "plain", tmp_path / "shifted"
    base = ["--num-cases", "3", "--size", "16", "--seed", "4"]
    assert main(["synth", str(plain), *base]) == 0
    assert main(["synth", str(shifted), *base, "--shift", "intensity", "--severity", "0.5"]) == 0
    truth_a = json.loads((plain / "truth.json").read_text())
    truth_b = json.loads((shifted / "truth.json").read_text())
    assert truth_a["cases"] == truth_b["cases"]
    assert truth_b["params"]["shift"] == {"kind": "intensity", "severity": 0.5}
    for case in truth_a["cases"]:
        for f in sorted((plain / case).glob("task*")):
            assert np.array_equal(nib.load(str(f)).get_fdata(), nib.load(str(shifted / case / f.name)).get_fdata())
        a = nib.load(str(plain / case / "image.nii.gz")).get_fdata()
        b = nib.load(str(shifted / case / "image.nii.gz")).get_fdata()
        assert np.allclose(b - a, 0.1, atol=1e-5)


# ----------------------------------------------------------------------------- predict


@pytest.mark.parametrize("overrides, groups, files", [
    (["model.name=mc_dropout"], None, {"aleatoric", "epistemic"}),  # every sample a model draw
    (ENSEMBLE, 2, {"aleatoric", "epistemic"}),  # 2 members of 3 latent draws each
    ([], 1, set()),  # the Probabilistic U-Net: its aleatoric map is its entropy
])
def test_predict_writes_the_maps_the_model_gives(tmp_path, overrides, groups, files):
    from probunet.inference.folder import predict_folder
    from probunet.models.checkpoint import save_checkpoint
    from probunet.inference.sampler import Sampler
    from probunet.models import build_model
    from probunet.options import PredictOptions
    from probunet.inference.predictor import Predictor
    from probunet.inference.uncertainty import decompose

    cfg = load_config(DEBUG, overrides)
    torch.manual_seed(0)
    model = build_model(cfg.model).eval()
    image = np.random.default_rng(1).random((32, 32)).astype(np.float32)
    opts = PredictOptions(num_samples=6, seed=3, device="cpu", roi_size=0)
    pred = Predictor(model, cfg, opts)(image, case_id="c1")
    assert set(pred.maps) == files
    if files:
        logits = Sampler(model, seed=3).sample(["c1"], torch.from_numpy(image)[None, None], 6, keep_logits=True).logits
        ref = decompose(torch.softmax(logits, dim=2), groups=groups)
        assert np.allclose(pred.maps["aleatoric"], ref["aleatoric"][0].numpy(), atol=1e-5)
        assert np.allclose(pred.maps["epistemic"], ref["epistemic"][0].numpy(), atol=1e-5)
        assert np.allclose(pred.entropy, ref["total"][0].numpy(), atol=1e-5)
    ckpt = tmp_path / "m.pt"
    save_checkpoint({"model": model.state_dict(), "config": cfg.to_dict(), "step": 0}, ckpt)
    inp = tmp_path / "in"
    inp.mkdir()
    nib.save(nib.Nifti1Image(image, np.eye(4)), str(inp / "c1.nii.gz"))
    predict_folder(ckpt, inp, tmp_path / "out", opts)
    written = {p.name.split(".")[0] for p in (tmp_path / "out" / "c1").iterdir()}
    assert files <= written and ({"aleatoric", "epistemic"} - files).isdisjoint(written)
    if files:
        stored = nib.load(str(tmp_path / "out" / "c1" / "epistemic.nii.gz")).get_fdata()
        assert np.allclose(stored, pred.maps["epistemic"], atol=1e-6)


def test_study_of_a_run_with_a_folder_as_the_shifted_set(tmp_path):
    run, ood, out = tmp_path / "run", tmp_path / "ood", tmp_path / "study"
    assert main(["train", str(DEBUG), "train.steps=1", "--out", str(run), "--no-progress"]) == 0
    assert main(["synth", str(ood), "--num-cases", "3", "--size", "32", "--seed", "9", "--shift", "blur"]) == 0
    assert main(["study", str(run), "--out", str(out), "--ood", str(ood), "--num-samples", "2", "--no-progress"]) == 0
    study = json.loads((out / "study.json").read_text())
    assert study["settings"]["num_cases"]["shifted"] == 3 and study["settings"]["shifted_set"] == f"folder {ood}"
    assert {k.split("/")[2] for k in study["cases"] if k.startswith("run/shifted/")} == {"case_0000", "case_0001",
                                                                                         "case_0002"}
    assert set(study["results"]["ood.auroc"]["run"]) == {f"{m}.{a}" for m in ("total", "aleatoric")
                                                         for a in ("mean", "sum", "above_threshold", "patch_max")}


def test_a_killed_training_resumes_and_a_finished_one_is_kept(tmp_path):
    from probunet.study.pipeline import StudySettings, resolve_sources, train_if_needed

    calls = []

    def fake_fit(cfg, run_dir, *, resume, progress):
        calls.append((cfg.train.steps, cfg.train.checkpoint_every, resume))

    (sm,) = resolve_sources([str(DEBUG)], tmp_path)
    assert sm.name == "debug" and sm.run_dir == tmp_path / "runs" / "debug" and sm.trained_here
    settings = StudySettings(steps=40)
    train_if_needed(sm, settings, fake_fit, progress=False)  # nothing there: a fresh training
    (sm.run_dir / "checkpoints").mkdir(parents=True)
    (sm.run_dir / "checkpoints" / "last.pt").write_bytes(b"")
    train_if_needed(sm, settings, fake_fit, progress=False)  # a checkpoint, no summary: killed, resume
    (sm.run_dir / "train_summary.json").write_text("{}")
    train_if_needed(sm, settings, fake_fit, progress=False)  # finished: kept
    assert calls == [(40, 3, False), (40, 3, True)]  # debug.yaml checkpoints every 3 steps already
    (zoo,) = resolve_sources([str(REPO / "configs" / "zoo" / "unet.yaml")], tmp_path / "zoo")
    train_if_needed(zoo, settings, fake_fit, progress=False)
    assert calls[-1] == (40, 10, False)  # every 400 steps in the config: every quarter of the budget instead
    with pytest.raises(ValueError, match="must be trained first"):
        train_if_needed(resolve_sources([str(DEBUG)], tmp_path / "other")[0], settings, None, progress=False)
