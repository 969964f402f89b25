"""``probunet study`` follows evaluate's rules: the run's recorded split, an output folder whose
files are the study's own, a trained run reused only for the settings asked for, a cache keyed by
everything that changes the scores; evaluate recognises a moved data folder by its case ids."""

from __future__ import annotations

import csv
import json
import logging
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from probunet.cli import main
from probunet.config import load_config
from probunet.train.trainer import fit

from test_reliability_runs import FAST, _cases, _one_line_error, full_data, read_only  # noqa: F401  (fixtures)

ROOT = Path(__file__).resolve().parents[2]
DEBUG = ROOT / "configs" / "debug.yaml"
STUDY = ["--num-samples", "2", "--device", "cpu", "--no-progress"]


def _train_on_first_24(root: Path, full_data: Path) -> tuple[Path, Path, list[str]]:
    data = root / "data"
    shutil.copytree(full_data, data)
    later = _cases(data)[24:]
    for name in later:
        shutil.rmtree(data / name)
    run = root / "run"
    fit(load_config(DEBUG, [f"data.path={data}", *FAST]), run)
    return run, data, later


@pytest.fixture(scope="module")
def shared_run(tmp_path_factory, full_data):
    """A run trained on the first 24 of the 40 cases (its data folder is never changed)."""
    return _train_on_first_24(tmp_path_factory.mktemp("shared"), full_data)


@pytest.fixture
def own_run(tmp_path, full_data):
    """The same, for a test that changes the run's data folder."""
    return _train_on_first_24(tmp_path, full_data)


def _recorded(run: Path) -> dict[str, list[str]]:
    record = json.loads((run / "splits.json").read_text())
    return {k: [e["case_id"] for e in v] for k, v in record.items()}


def _studied(out: Path, model: str, set_name: str = "test") -> list[str]:
    study = json.loads((out / "study.json").read_text())
    return sorted(k.split("/", 2)[2] for k in study["cases"] if k.startswith(f"{model}/{set_name}/"))


# ----------------------------------------------------------------------------- the recorded split


def test_study_scores_the_runs_recorded_test_split_after_cases_are_added(own_run, full_data, tmp_path, caplog,
                                                                         capsys):
    run, data, later = own_run
    recorded = _recorded(run)
    for name in later:
        shutil.copytree(full_data / name, data / name)
    with caplog.at_level(logging.WARNING, logger="probunet"):
        assert main(["--quiet", "study", str(run), "--out", str(tmp_path / "s"), *STUDY]) == 0
    assert _studied(tmp_path / "s", "run") == sorted(recorded["test"])
    said = [r.getMessage() for r in caplog.records if "new since the run's split was fixed" in r.getMessage()]
    assert len(said) == 1 and "16 case(s)" in said[0] and "left out" in said[0], said
    # a recorded case gone from the data: one line naming it, as evaluate says
    gone = recorded["val"][0]
    shutil.rmtree(data / gone)
    assert main(["study", str(run), "--out", str(tmp_path / "s2"), *STUDY]) == 2
    _one_line_error(capsys, "study", gone, "missing")


# ----------------------------------------------------------------------------- evaluate on a moved data folder


def _evaluated_ids(per_case: Path) -> list[str]:
    with open(per_case, newline="") as fh:
        return sorted(r["case_id"] for r in csv.DictReader(fh))


def _evaluate(run: Path, out: Path, *extra) -> int:
    return main(["--quiet", "evaluate", str(run), "--num-samples", "2", "--no-progress", "--device", "cpu",
                 "--out", str(out) + "/", *extra])


def test_evaluate_recognises_a_moved_grown_data_folder_by_its_case_ids(shared_run, full_data, tmp_path, caplog,
                                                                        capsys):
    run, data, later = shared_run
    recorded = _recorded(run)
    moved = tmp_path / "moved"
    shutil.copytree(data, moved)
    for name in later:
        shutil.copytree(full_data / name, moved / name)
    with caplog.at_level(logging.WARNING, logger="probunet"):
        assert _evaluate(run, tmp_path / "ev", f"data.path={moved}") == 0
    assert _evaluated_ids(tmp_path / "ev" / "per_case.csv") == sorted(recorded["test"])
    said = [r.getMessage() for r in caplog.records if "new since the run's split was fixed" in r.getMessage()]
    assert len(said) == 1 and "16 case(s)" in said[0], said
    # the split stays fixed on the moved data; a copy that lacks recorded cases keeps the split of those it
    # holds (a warning names the missing ones): a training case is never scored as a test case
    assert _evaluate(run, tmp_path / "ev2", f"data.path={moved}", "data.split.seed=7") == 2
    _one_line_error(capsys, "evaluate", "data.split.seed", "fixed")
    gone = [recorded["train"][0], recorded["test"][0]]
    for name in gone:
        shutil.rmtree(moved / name)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="probunet"):
        assert _evaluate(run, tmp_path / "ev3", f"data.path={moved}") == 0
    assert _evaluated_ids(tmp_path / "ev3" / "per_case.csv") == sorted(recorded["test"][1:])
    said = [r.getMessage() for r in caplog.records if "not in the data at this path" in r.getMessage()]
    assert len(said) == 1 and all(g in said[0] for g in gone), said


def test_evaluate_splits_a_dataset_of_other_case_ids_by_its_config(shared_run, tmp_path, caplog):
    from probunet.data import load_splits, synthetic

    run, _, _ = shared_run
    items = synthetic.generate(num_cases=12, size=32, seed=3)
    for it in items:
        it["case_id"] = "other_" + it["case_id"]
    other = tmp_path / "other"
    synthetic.write_qubiq(items, other)
    with caplog.at_level(logging.INFO, logger="probunet"):
        assert _evaluate(run, tmp_path / "ev", f"data.path={other}") == 0
    expected = load_splits(load_config(run / "config.yaml", [f"data.path={other}"]))["test"]
    assert _evaluated_ids(tmp_path / "ev" / "per_case.csv") == sorted(i["case_id"] for i in expected)
    assert any("another dataset" in r.getMessage() for r in caplog.records)


# ----------------------------------------------------------------------------- the output folder is the study's


@pytest.mark.parametrize("name", ["study.csv", "study.md", "study.json", "reliability.png", "risk_coverage.png",
                                  "cache/run.json", "cache/run.test.json"])
def test_study_never_replaces_a_file_it_did_not_write(shared_run, tmp_path, capsys, monkeypatch, name):
    import probunet.study.pipeline as study_mod

    run, _, _ = shared_run
    out = tmp_path / "s"
    (out / name).parent.mkdir(parents=True, exist_ok=True)
    (out / name).write_text("the user's own\n")
    monkeypatch.setattr(study_mod, "score_set", lambda *a, **k: 1 / 0)  # refused before any work
    assert main(["study", str(run), "--out", str(out), *STUDY]) == 2
    _one_line_error(capsys, "study", name, "refusing to overwrite")
    assert (out / name).read_text() == "the user's own\n"
    assert sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file()) == [name]


def test_study_into_a_runs_eval_folder_keeps_evaluates_files(shared_run, tmp_path, capsys):
    run, _, _ = shared_run
    ev = tmp_path / "eval"
    assert _evaluate(run, ev) == 0
    before = {p.name: p.read_bytes() for p in ev.iterdir() if p.is_file()}
    assert "reliability.png" in before
    assert main(["study", str(run), "--out", str(ev), *STUDY]) == 2
    _one_line_error(capsys, "study", "reliability.png", "refusing to overwrite")
    assert {p.name: p.read_bytes() for p in ev.iterdir() if p.is_file()} == before


def test_a_study_replaces_its_own_files_but_not_a_file_changed_since(shared_run, tmp_path, capsys):
    run, _, _ = shared_run
    out = tmp_path / "s"
    assert main(["--quiet", "study", str(run), "--out", str(out), *STUDY]) == 0
    manifest = json.loads((out / ".probunet-study.json").read_text())
    assert {"study.csv", "study.md", "study.json", "reliability.png", "cache/run.json"} <= set(manifest["files"])
    assert main(["--quiet", "study", str(run), "--out", str(out), *STUDY, "--seed", "1"]) == 0  # its own: replaced
    assert json.loads((out / "study.json").read_text())["settings"]["seed"] == 1
    (out / "study.md").write_text("# my notes on the study\n")
    assert main(["study", str(run), "--out", str(out), *STUDY]) == 2
    _one_line_error(capsys, "study", "study.md", "changed since")
    assert (out / "study.md").read_text() == "# my notes on the study\n"


def test_a_study_of_another_shift_scores_only_the_shifted_set_again(shared_run, tmp_path, monkeypatch):
    import probunet.study.pipeline as study_mod

    run, _, _ = shared_run
    scored, real = [], study_mod.score_set

    def counting(*a, desc, **k):
        scored.append(desc)
        return real(*a, desc=desc, **k)

    monkeypatch.setattr(study_mod, "score_set", counting)

    def study(out, *extra):
        assert main(["--quiet", "study", str(run), "--out", str(tmp_path / out), *STUDY, *extra]) == 0
        return json.loads((tmp_path / out / "study.json").read_text())

    def test_cases(s):
        return {k: v for k, v in s["cases"].items() if k.startswith("run/test/")}

    noise = study("s", "--shift", "noise")
    assert scored == ["run test", "run shifted"]
    blur = study("s", "--shift", "blur")
    assert scored[2:] == ["run shifted"]  # the test split's scores read from cache/run.test.json
    assert blur["settings"]["shift"] == "blur" and test_cases(blur) == test_cases(noise)
    fresh = study("fresh", "--shift", "blur")  # a study of its own: the same numbers
    assert scored[3:] == ["run test", "run shifted"]
    assert fresh["cases"] == blur["cases"] and fresh["results"] == blur["results"]
    study("s", "--shift", "blur", "--seed", "1")  # other samples: both sets again
    assert scored[5:] == ["run test", "run shifted"]


def test_a_read_only_out_is_one_line_naming_it(shared_run, read_only, capsys):  # noqa: F811
    run, _, _ = shared_run
    for out in (read_only / "s", read_only):
        assert main(["study", str(run), "--out", str(out), *STUDY]) == 2
        line = _one_line_error(capsys, "study", str(out))
        assert "read-only file system" in line or "permission denied" in line


# ----------------------------------------------------------------------------- the model asked for, never a stale one


def test_other_steps_or_an_edited_config_never_reuse_the_trained_run(tmp_path, capsys):
    import hashlib

    from probunet.models.checkpoint import load_checkpoint, resolve_checkpoint_path

    cfg = tmp_path / "tiny.yaml"
    cfg.write_text(DEBUG.read_text())
    out = tmp_path / "s"
    base = ["study", str(cfg), "--out", str(out), *STUDY]
    assert main(["--quiet", *base, "--steps", "1"]) == 0
    before = (out / "study.json").read_bytes()
    assert main([*base, "--steps", "2"]) == 2
    _one_line_error(capsys, "study", "train.steps 1 -> 2", "--retrain")
    assert (out / "study.json").read_bytes() == before  # nothing scored or written
    assert main(["--quiet", *base, "--steps", "2", "--retrain"]) == 0
    assert int(load_checkpoint(out / "runs" / "tiny" / "checkpoints" / "last.pt")["step"]) == 2
    study = json.loads((out / "study.json").read_text())
    assert study["settings"]["steps"] == 2
    cached = json.loads((out / "cache" / "tiny.json").read_text())
    assert cached["key"]["settings"]["steps"] == 2
    scored = resolve_checkpoint_path(out / "runs" / "tiny")
    assert cached["key"]["checkpoint"]["sha256"] == hashlib.sha256(scored.read_bytes()).hexdigest()
    cfg.write_text(DEBUG.read_text().replace("lr: 0.001", "lr: 0.002"))
    assert main([*base, "--steps", "2"]) == 2
    _one_line_error(capsys, "study", "train.lr 0.001 -> 0.002", "--retrain")


def test_the_cache_key_holds_the_steps():
    from probunet.study.pipeline import StudySettings

    assert StudySettings(steps=1).cache_key() != StudySettings(steps=2).cache_key()


def _count_scoring(monkeypatch) -> list:
    import probunet.study.pipeline as study_mod

    calls, real = [], study_mod.score_set
    monkeypatch.setattr(study_mod, "score_set", lambda *a, **k: calls.append(1) or real(*a, **k))
    return calls


def test_a_cached_result_is_stale_when_the_checkpoint_or_the_data_changed(own_run, tmp_path, monkeypatch):
    import nibabel as nib
    import torch

    from probunet.models.checkpoint import load_checkpoint, resolve_checkpoint_path, save_checkpoint

    run, data, _ = own_run
    out = tmp_path / "s"
    args = ["--quiet", "study", str(run), "--out", str(out), *STUDY]
    assert main(args) == 0
    calls = _count_scoring(monkeypatch)
    assert main(args) == 0 and calls == []  # unchanged: read from the cache
    # other weights in a file of the same size and time stamp (as cp -p or rsync -t leave it)
    path = resolve_checkpoint_path(run)
    st = path.stat()
    state = {k: v for k, v in load_checkpoint(path).items() if k not in ("path", "digest")}
    with torch.no_grad():
        for v in state["model"].values():
            if torch.is_floating_point(v):
                v.add_(0.01)  # in place: the file keeps its layout and size
    save_checkpoint(state, path)
    assert path.stat().st_size == st.st_size
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert main(args) == 0 and calls == [1]
    # a test case's image changed in place
    case = _recorded(run)["test"][0]
    img = data / case / "image.nii.gz"
    arr = nib.load(str(img)).get_fdata().astype(np.float32)
    nib.save(nib.Nifti1Image(arr[::-1].copy(), np.eye(4)), str(img))
    assert main(args) == 0 and calls == [1, 1]


# ----------------------------------------------------------------------------- arguments


@pytest.mark.parametrize("extra, message", [
    (["--threshold", "nan"], "--threshold"),
    (["--threshold", "inf"], "--threshold"),
    (["--fail", "ged=nan"], "--fail ged"),
    (["--fail", "one_minus_dice=-inf"], "--fail one_minus_dice"),
])
def test_non_finite_study_options_are_refused(tmp_path, capsys, extra, message):
    rc = main(["study", str(DEBUG), "--out", str(tmp_path / "s"), *extra])
    line = _one_line_error(capsys, "study", message, "finite")
    assert rc == 2 and line
    assert not (tmp_path / "s").exists()


def test_an_unknown_aggregation_names_the_real_setting():
    from probunet.study.pipeline import StudySettings

    with pytest.raises(ValueError, match="StudySettings.aggregations: 'median'") as info:
        StudySettings(aggregations=("median",)).check()
    assert "--aggregations" not in str(info.value)
