"""scripts/zoo_lidc.py and configs/zoo/lidc: the LIDC-style zoo's recipes and its resumable driver."""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import numpy as np

import pytest
import torch
import yaml

REPO = Path(__file__).resolve().parents[1]
LIDC_ZOO = sorted((REPO / "configs" / "zoo" / "lidc").glob("*.yaml"))


def _load(name):
    spec = importlib.util.spec_from_file_location(f"_t_{name}", REPO / "scripts" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_every_zoo_model_has_a_lidc_recipe_sharing_data_budget_and_evaluation():
    zoo = _load("zoo_lidc")
    assert sorted(p.stem for p in LIDC_ZOO) == sorted(zoo.MODELS)
    raws = {p.stem: yaml.safe_load(p.read_text()) for p in LIDC_ZOO}
    data = zoo.dataset_section("lidc", Path("data/lidc_style"), False)  # the quality benchmark's LIDC section
    for name, raw in raws.items():
        assert raw["data"] == data, name
        assert raw["eval"] == raws["prob_unet"]["eval"] and raw["eval"]["num_samples"] == 16, name
        m, t = raw["model"], raw["train"]
        assert m["features"] == [32, 64, 128, 192] and m["init"] == "he_normal", name
        assert (t["steps"], t["batch_size"], t["lr"], t["ema_decay"]) == (2000, 16, 3e-4, 0.995), name
    assert raws["prob_unet"]["model"]["latent_dim"] == 2 and raws["prob_unet"]["train"]["beta"] == 0.625
    assert raws["hpu_net"]["train"]["geco"]["goal"] == "auto"
    assert raws["ensemble_prob_unet"]["model"]["member"] == "prob_unet"


@pytest.mark.parametrize("path", LIDC_ZOO, ids=lambda p: p.stem)
def test_lidc_recipe_loads_and_builds_its_model(path):
    from probunet.config import load_config
    from probunet.models import build_model

    cfg = load_config(path)
    assert cfg.model.name == yaml.safe_load(path.read_text())["model"]["name"]
    model = build_model(cfg.model, cfg.train)
    image = torch.randn(2, 1, 64, 64)
    assert model.eval().sample(image, 2).shape == (2, 2, 2, 64, 64)


def test_variants_change_only_what_the_table_says():
    zoo = _load("zoo_lidc")
    assert set(zoo.VARIANTS) == set(zoo.MODELS)
    for model, table in zoo.VARIANTS.items():
        assert 1 <= len(table) <= 2, model
        for overrides in table.values():
            assert all(o.split("=")[0] in ("train.beta", "model.latent_dim", "model.latent_channels", "model.rank",
                                           "model.dropout", "model.ensemble_size", "train.geco.goal_scale",
                                           "train.geco.step_size", "model.soft_target") for o in overrides), \
                (model, overrides)
            from probunet.config import load_config

            load_config(REPO / "configs" / "zoo" / "lidc" / f"{model}.yaml", overrides)  # valid


def test_bad_arguments_are_one_line_errors(tmp_path, capsys):
    zoo = _load("zoo_lidc")
    assert zoo.main(["tune", "--out", str(tmp_path / "o"), "--records", str(tmp_path / "r"),
                     "--lidc-data", str(tmp_path / "none")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--lidc-data" in err and "prepare_lidc.py" in err
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "x").write_text("x")
    assert zoo.main(["all", "--quick", "--out", str(tmp_path / "busy")]) == 2
    assert "--resume" in capsys.readouterr().err
    assert zoo.main(["tune", "--quick", "--threads", "0", "--out", str(tmp_path / "t")]) == 2
    assert "--threads" in capsys.readouterr().err
    assert zoo.child_env(2)["OMP_NUM_THREADS"] == "2" and zoo.child_env()["MKL_NUM_THREADS"] == "1"


def test_quick_end_to_end_resumes_an_interrupted_training_and_skips_finished_runs(tmp_path, monkeypatch):
    zoo = _load("zoo_lidc")
    out, doc = tmp_path / "z", tmp_path / "doc" / "zoo.md"
    common = ["--quick", "--models", "unet", "--top", "0", "--out", str(out), "--doc", str(doc)]
    real = zoo.run_logged

    def killed_after_step_3(cmd, env, log):  # the table's training stops after its checkpoint at step 3
        if "train" in cmd and "table" in Path(cmd[cmd.index("--out") + 1]).parts:
            real([*cmd, "train.steps=3"], env, log)
            raise KeyboardInterrupt
        real(cmd, env, log)

    monkeypatch.setattr(zoo, "run_logged", killed_after_step_3)
    assert zoo.main(["all", *common]) == 130
    run = out / "table" / "s0" / "unet"
    assert torch.load(run / "checkpoints" / "last.pt", weights_only=True)["step"] == 3
    records = out / "records"  # --quick: the records live in --out
    assert not (records / "table" / "s0" / "unet.json").exists()
    tuned = json.loads((out / "choices.json").read_text())["unet"]
    assert set(tuned["val_ged"]) == {"base", "v1"}
    assert tuned["variant"] == min(tuned["val_ged"], key=tuned["val_ged"].get)

    calls = []
    monkeypatch.setattr(zoo, "run_logged", lambda cmd, env, log: (calls.append(cmd), real(cmd, env, log)))
    assert zoo.main(["all", "--resume", *common]) == 0
    trains = [c for c in calls if "train" in c]
    assert len(trains) == 1 and "--resume" in trains[0]  # tuning kept, the table's run went on from step 3
    assert torch.load(run / "checkpoints" / "last.pt", weights_only=True)["step"] == 6
    rec = json.loads((records / "table" / "s0" / "unet.json").read_text())
    m = rec["metrics"]
    assert rec["split"] == "test" and rec["variant"] == tuned["variant"] and rec["parameters"] > 0
    assert rec["ms_per_100_samples"] > 0 and rec["train_cpu_s"] > 0 and rec["attempts"] == 2
    assert rec["threads"] == 1
    assert 0 <= m["ged"] and m["by_empty_raters"] and m["empty_gap"] is not None and m["ece"] is not None
    assert rec["reproduce"].startswith("probunet train configs/zoo/lidc/unet.yaml")
    assert "checkpoints/last.pt" in rec["commands"][1]  # the budget's checkpoint, not best.pt
    for kind, _ in zoo.SHIFTS:  # studied right after its evaluation: the model's piece of each study
        piece = json.loads((records / "study" / kind / "unet.json").read_text())
        assert piece["entry"]["name"] == "unet" and f"--shift {kind}" in piece["command"]
        assert 0 <= piece["results"]["performance"]["ged"] and piece["results"]["ood.auroc"]
    # both shifts studied in one folder: the second sampled only its shifted set
    (first, _), (second, _) = zoo.SHIFTS
    assert "its test set read from" not in (out / "study" / first / "unet.log").read_text()
    assert "its test set read from" in (out / "study" / second / "unet.log").read_text()
    with np.load(records / "figure" / "unet.npz") as z:
        assert z["samples"].shape[1:] == (4, 32, 32) and len(z["case_ids"]) == z["samples"].shape[0] > 0
    assert (doc.parent / "zoo.png").stat().st_size > 1000

    monkeypatch.setattr(zoo, "run_logged", lambda *a: pytest.fail(f"ran {a[0]} again"))
    assert zoo.main(["all", "--resume", *common]) == 0  # everything finished: nothing runs
    # the report from what is done: a model not run yet is pending, with the commands that produce it
    assert zoo.main(["report", "--quick", "--models", "unet", "ssn", "--out", str(out), "--doc", str(doc)]) == 0
    text = doc.read_text()
    assert (doc.parent / "zoo.png").is_file() and "](zoo.png)" in text
    assert f"| unet | {zoo.variant_label(tuned['overrides'])} | {m['ged']:.3f} ±" in text
    assert "| ssn | base | model.rank=5" not in text and "| ssn | v1 | model.rank=5 | pending |" in text
    assert "scripts/zoo_lidc.py tune --resume --models ssn" in text
    assert "*majority vote*" in text and "GED by the number of readers who drew nothing" in text
    assert "### Shift: noise" in text and "pending: `python scripts/zoo_lidc.py study" not in text
    assert "#### failure.one_minus_dice.e_aurc" in text and "--shift blur" in text

    # the work space is lost (a new machine), the records kept: nothing is tuned again; the study and the
    # figure train the table's run again, evaluate it again (the record keeps the old numbers), study it
    for lost in ("table", "study", "tune"):
        shutil.rmtree(out / lost)
    for kept in ("study", "figure"):
        shutil.rmtree(records / kept)
    calls.clear()
    monkeypatch.setattr(zoo, "run_logged", lambda cmd, env, log: (calls.append(cmd), real(cmd, env, log)))
    assert zoo.main(["study", "--resume", *common]) == 0
    assert zoo.main(["figure", "--resume", *common]) == 0
    assert [c[c.index("-m") + 2] for c in calls] == ["train", "evaluate", "study", "study"]
    again = json.loads((records / "table" / "s0" / "unet.json").read_text())
    assert again["previous"]["ged"] == m["ged"] and again["previous"]["finished"] == rec["finished"]
    assert all((records / "study" / kind / "unet.json").is_file() for kind, _ in zoo.SHIFTS)
    assert (records / "figure" / "unet.npz").is_file() and (doc.parent / "zoo.png").is_file()


def test_tuning_one_model_keeps_the_other_models_choices(tmp_path, monkeypatch):
    """Two streams tune different models into one --out: choices.json lists every fully tuned model,
    not only the --models of the invocation that wrote it last."""
    zoo = _load("zoo_lidc")
    out = tmp_path / "z"
    (out / "records" / "tune").mkdir(parents=True)
    geds = {"ssn": {"base": 0.30, "v1": 0.33, "v2": 0.26}, "unet": {"base": 0.35, "v1": 0.32}}
    for model, by_variant in geds.items():
        for variant, ged in by_variant.items():
            (out / "records" / "tune" / f"{model}-{variant}.json").write_text(json.dumps({"metrics": {"ged": ged}}))
    monkeypatch.setattr(zoo, "execute_all", lambda runs, failures: None)  # nothing to train here
    monkeypatch.setattr(zoo, "report", lambda args: None)
    assert zoo.main(["tune", "--quick", "--resume", "--models", "unet", "--out", str(out)]) == 0
    chosen = json.loads((out / "choices.json").read_text())
    assert chosen["ssn"]["variant"] == "v2" and chosen["ssn"]["overrides"] == ["model.rank=20"]
    assert chosen["unet"]["variant"] == "v1" and chosen["unet"]["overrides"] == ["model.soft_target=true"]
    assert set(chosen) == {"ssn", "unet"}  # a model whose variants are not all tuned has no choice yet


def test_report_sums_the_cpu_time_of_every_stage(tmp_path):
    """The compute section: per stage the recorded runs and the CPU hours of their processes; a record
    transcribed from an earlier report counts through earlier_compute.json, not twice."""
    zoo = _load("zoo_lidc")
    out = tmp_path / "z"
    records = out / "records"
    for folder, name, rec in [("tune", "unet-base", {"train_cpu_s": 1800.0, "eval_cpu_s": 360.0}),
                              ("tune", "unet-v1", {"train_cpu_s": 900.0, "eval_cpu_s": 0.0, "transcribed": "x"}),
                              ("table/s0", "unet", {"train_cpu_s": 3600.0, "eval_cpu_s": 720.0}),
                              ("table/s1", "unet", {"train_cpu_s": 3240.0, "eval_cpu_s": 0.0}),
                              ("study/noise", "unet", {"cpu_s": 1440.0, "wall_s": 2000.0})]:
        (records / folder).mkdir(parents=True, exist_ok=True)
        (records / folder / f"{name}.json").write_text(json.dumps(rec))
    args = zoo.build_parser().parse_args(["report", "--quick", "--out", str(out)])
    zoo.check_args(args)
    c = zoo.compute(args)
    assert c["tune"] == {"runs": 2, "cpu_s": 2160.0}
    assert c["table"] == {"runs": 2, "cpu_s": 7560.0}
    assert c["study"] == {"runs": 1, "cpu_s": 1440.0}
    lines = zoo.compute_lines(args)
    assert "| tune | 2 | 0.60 |" in lines and "| table | 2 | 2.10 |" in lines and "| study | 1 | 0.40 |" in lines
    assert "| **all** | 5 | **3.10** |" in lines

    (records / "earlier_compute.json").write_text(json.dumps({"note": "before the records.", "tune": {"cpu_s": 900.0}}))
    assert zoo.compute(args)["tune"] == {"runs": 2, "cpu_s": 3060.0}
    lines = zoo.compute_lines(args)
    assert "| **all** | 5 | **3.35** |" in lines
    assert any(line.startswith("These hours include 0.25 CPU h of earlier work: before the records.") for line in lines)


def test_a_record_of_other_settings_is_an_error_naming_it(tmp_path, capsys):
    zoo = _load("zoo_lidc")
    out = tmp_path / "z"
    (out / "records" / "tune").mkdir(parents=True)
    (out / "records" / "tune" / "unet-base.json").write_text(json.dumps({"overrides": ["train.steps=99"],
                                                                        "metrics": {"ged": 0.3}}))
    assert zoo.main(["tune", "--quick", "--resume", "--models", "unet", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "unet-base.json" in err and "train.steps=99" in err and "remove that record" in err
    # records without --resume: the same one-line refusal as a busy --out
    assert zoo.main(["tune", "--quick", "--models", "unet", "--out", str(tmp_path / "new"),
                     "--records", str(out / "records")]) == 2
    assert "--records" in capsys.readouterr().err


def test_readme_table_ranks_finished_rows_by_ged_and_splices_between_the_markers(tmp_path):
    zoo = _load("zoo_lidc")
    out = tmp_path / "z"
    (out / "records" / "table" / "s0").mkdir(parents=True)
    for model, variant, ged, hm, div, cpu in [("unet", "v1", 0.337, 0.374, 0.589, 1332.0),
                                              ("prob_unet", "v2", 0.105, 0.734, 0.419, 2088.0)]:
        rec = {"model": model, "variant": variant, "train_cpu_s": cpu,
               "metrics": {"ged": ged, "hm_iou": hm, "sample_diversity": div, "reference_diversity": 0.391}}
        (out / "records" / "table" / "s0" / f"{model}.json").write_text(json.dumps(rec))
    args = zoo.build_parser().parse_args(["report", "--quick", "--out", str(out), "--models", "unet", "prob_unet",
                                          "ssn"])
    zoo.check_args(args)
    lines = zoo.readme_table(args, {"majority vote": {"ged": 0.257, "hm_iou": 0.676, "diversity": 0.0}})
    assert "readers 0.391" in lines[0]
    assert lines[2] == "| `prob_unet` | model.latent_dim=6 | 0.105 | 0.734 | 0.419 | 0.58 |"  # lowest GED first
    assert lines[3] == "| `unet` | model.soft_target=true | 0.337 | 0.374 | 0.589 | 0.37 |"
    assert lines[4] == "| `ssn` |  | pending | | | |"  # not tuned yet: no change to show
    assert lines[5] == "| *majority vote* | reference | 0.257 | 0.676 | 0.000 | |"

    readme = tmp_path / "README.md"
    readme.write_text(f"# x\n\nbefore\n{zoo.README_BEGIN}\nold row\n{zoo.README_END}\nafter\n")
    assert zoo.splice_readme(readme, ["| a |", "| b |"])
    assert readme.read_text() == f"# x\n\nbefore\n{zoo.README_BEGIN}\n| a |\n| b |\n{zoo.README_END}\nafter\n"
    plain = tmp_path / "PLAIN.md"
    plain.write_text("no markers\n")
    assert not zoo.splice_readme(plain, ["| a |"]) and plain.read_text() == "no markers\n"


def test_the_shipped_readme_has_the_zoo_table_markers_once():
    zoo = _load("zoo_lidc")
    text = (REPO / "README.md").read_text(encoding="utf-8")
    assert text.count(zoo.README_BEGIN) == 1 and text.count(zoo.README_END) == 1
    assert text.index(zoo.README_BEGIN) < text.index(zoo.README_END)


def test_the_shipped_report_names_no_path_of_the_machine_it_was_written_on():
    """docs/zoo_lidc.md is written with the default --out, so every command in it works from a fresh clone."""
    text = (REPO / "docs" / "zoo_lidc.md").read_text(encoding="utf-8")
    assert "--out /" not in text and "](/" not in text
    assert "runs/zoo_lidc/" in text
    import re

    for m in re.finditer(r"(\S*)/table/s\d/", text):  # every run path as a clone has it
        assert m.group(1).endswith("runs/zoo_lidc"), m.group(0)


def test_the_report_writes_study_paths_as_out_was_given(tmp_path):
    """The study ran on runs under a linked --out: the report names them as --out was given."""
    zoo = _load("zoo_lidc")
    real = tmp_path / "elsewhere"
    real.mkdir()
    (tmp_path / "runs").mkdir()
    (tmp_path / "runs" / "zoo").symlink_to(real)
    args = zoo.build_parser().parse_args(["report", "--quick", "--out", str(tmp_path / "runs" / "zoo")])
    zoo.check_args(args)
    args.out_arg = "runs/zoo"
    text = f"probunet study {real}/table/s0/unet/checkpoints/last.pt --out {tmp_path}/runs/zoo/study/noise"
    assert zoo.portable(args, text) == ("probunet study runs/zoo/table/s0/unet/checkpoints/last.pt "
                                        "--out runs/zoo/study/noise")


def test_the_report_names_the_transcribed_records():
    zoo = _load("zoo_lidc")
    recs = [{"name": "unet", "transcribed": "docs/zoo_lidc.md of commit abc"}, None, {"name": "ssn"}]
    (line,) = zoo.transcribed_lines(recs, table=True)
    assert "Transcribed from docs/zoo_lidc.md of commit abc" in line and ": unet." in line and "ssn" not in line
    assert "study --resume" in line and "study --resume" not in zoo.transcribed_lines(recs)[0]
    assert zoo.transcribed_lines([{"name": "ssn"}, None]) == []


def test_the_report_names_the_cpu_of_each_rows_timings():
    zoo = _load("zoo_lidc")
    amx, avx = ({"train_summary": {"cpu_capability": c}} for c in ("AMX, amx_bf16", "AVX512, avx512_bf16"))
    recs = [{"name": "ssn", **amx}, {"name": "phiseg", **avx}, {"name": "unet", **amx}, {"name": "hpu_net"}, None]
    (line,) = zoo.cpu_lines(recs)
    assert "AMX, amx_bf16: ssn, unet; AVX512, avx512_bf16: phiseg; not recorded: hpu_net." in line
    assert zoo.cpu_lines([{"name": "ssn"}, {"name": "unet", **amx}])[0].endswith("amx_bf16: unet; not recorded: ssn.")
    assert zoo.cpu_lines([{"name": "ssn", **amx}, {"name": "unet", **amx}]) == [
        "\nTimings: one CPU for every row (AMX, amx_bf16)."]
    assert zoo.cpu_lines([None]) == []


def test_study_pieces_differ_in_settings_not_in_descriptions():
    zoo = _load("zoo_lidc")
    made = {"num_samples": 16, "seed": 0, "shift": "noise", "severity": 2.0,
            "risks": {"ged": "D^2_GED of the samples against the raters"}, "calibration": "ECE 10 bins"}
    transcribed = {k: v for k, v in made.items() if k not in ("risks", "calibration")}
    assert not zoo.settings_differ(made, transcribed)
    assert zoo.settings_differ(made, {**transcribed, "num_samples": 8})
    assert zoo.settings_differ(made, {**transcribed, "threshold": 0.2})


def test_the_report_names_the_runs_trained_again_with_both_numbers():
    zoo = _load("zoo_lidc")
    again = {"name": "hpu_net", "metrics": {"ged": 0.1428, "hm_iou": 0.6783},
             "previous": {"ged": 0.14, "hm_iou": 0.682, "finished": None}}
    (line,) = zoo.retrained_lines([again, {"name": "ssn", "metrics": {"ged": 0.2}}, None])
    assert "hpu_net 0.143 (before 0.140), 0.678 (before 0.682)." in line and "ssn" not in line
    assert zoo.retrained_lines([{"name": "ssn"}, None]) == []


def test_a_study_piece_of_a_run_trained_again_since_is_named():
    zoo = _load("zoo_lidc")
    assert zoo.studied_an_earlier_run({"table_record": None}, {"finished": "2026-12-08T01:54:29"})
    assert zoo.studied_an_earlier_run({"table_record": "2026-12-07T10:00:00"}, {"finished": "2026-12-08T01:54:29"})
    assert not zoo.studied_an_earlier_run({"table_record": "2026-12-08T01:54:29"}, {"finished": "2026-12-08T01:54:29"})
    assert not zoo.studied_an_earlier_run({"table_record": None}, {"finished": None})  # both transcribed
    assert not zoo.studied_an_earlier_run({"table_record": None}, None)
