"""Reliability of runs and output folders (issue 30): a run's split is fixed at its start, evaluate
never replaces a user's files, a full or read-only disk is one line naming the path, output folders
remember their shard settings, and the lock file is never followed through a symlink."""

from __future__ import annotations

import csv
import json
import logging
import shutil
from pathlib import Path

import pytest

from probunet.cli import main
from probunet.config import load_config
from probunet.train import fit

ROOT = Path(__file__).resolve().parents[1]
DEBUG = ROOT / "configs" / "debug.yaml"
FAST = ["train.steps=2", "train.val_every=2", "train.val_cases=2", "train.val_samples=2", "train.device=cpu"]


def _cases(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.is_dir())


@pytest.fixture(scope="module")
def full_data(tmp_path_factory) -> Path:
    """40 synthetic cases (32x32, 4 raters) in the QUBIQ layout with truth.json."""
    from probunet.data import synthetic

    out = tmp_path_factory.mktemp("full") / "data"
    synthetic.write_qubiq(synthetic.generate(num_cases=40, size=32), out)
    return out


@pytest.fixture
def trained(tmp_path, full_data):
    """A run trained on the first 24 of the 40 cases; returns (run_dir, data_dir, the 16 held back)."""
    data = tmp_path / "data"
    shutil.copytree(full_data, data)
    later = _cases(data)[24:]
    for name in later:
        shutil.rmtree(data / name)
    run = tmp_path / "run"
    fit(load_config(DEBUG, [f"data.path={data}", *FAST]), run)
    return run, data, later


def _add_back(data: Path, full_data: Path, names: list[str]) -> None:
    for name in names:
        shutil.copytree(full_data / name, data / name)


def _recorded(run: Path) -> dict[str, list[str]]:
    record = json.loads((run / "splits.json").read_text())
    return {k: [e["case_id"] for e in v] for k, v in record.items()}


def _evaluated_ids(per_case: Path) -> list[str]:
    with open(per_case, newline="") as fh:
        return sorted(r["case_id"] for r in csv.DictReader(fh))


def _one_line_error(capsys, command, *needles):
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err, err
    lines = [l for l in err.splitlines() if l.startswith(f"probunet {command}: error:")]
    assert len(lines) == 1, err
    for n in needles:
        assert n in lines[0], lines[0]
    return lines[0]


# ----------------------------------------------------------------------------- row 1: the split is fixed


def test_evaluate_keeps_the_runs_split_after_cases_are_added(trained, full_data, tmp_path, caplog):
    run, data, later = trained
    recorded = _recorded(run)
    assert recorded["test"] and not set(later) & {c for v in recorded.values() for c in v}
    _add_back(data, full_data, later)
    with caplog.at_level(logging.WARNING, logger="probunet"):
        assert main(["--quiet", "evaluate", str(run), "--num-samples", "2", "--no-progress", "--device", "cpu",
                     "--out", str(tmp_path / "ev") + "/"]) == 0
    assert _evaluated_ids(tmp_path / "ev" / "per_case.csv") == sorted(recorded["test"])
    said = [r.getMessage() for r in caplog.records if "new since the run's split was fixed" in r.getMessage()]
    assert len(said) == 1 and "16 case(s)" in said[0] and "left out" in said[0], said
    assert "\n" not in said[0]
    # asked for: the new cases (all of new patients here) join the test split, train/val never grow
    assert main(["--quiet", "evaluate", str(run), "--num-samples", "2", "--no-progress", "--device", "cpu",
                 "--include-new-cases", "--out", str(tmp_path / "ev_new") + "/"]) == 0
    assert _evaluated_ids(tmp_path / "ev_new" / "per_case.csv") == sorted(recorded["test"] + later)
    assert main(["--quiet", "evaluate", str(run), "--num-samples", "2", "--no-progress", "--device", "cpu",
                 "eval.split=val", "--out", str(tmp_path / "ev_val") + "/"]) == 0
    assert _evaluated_ids(tmp_path / "ev_val" / "per_case.csv") == sorted(recorded["val"])


def test_a_new_case_of_a_training_patient_never_joins_the_test_split(caplog):
    """A new case whose patient/series is in the recorded train or val split stays out even when asked for."""
    from probunet.data import DataError
    from probunet.data.recorded_split import apply_recorded_split

    def item(case, group):
        return {"case_id": case, "meta": {"group": group}}

    record = {"train": [("a", "P1")], "val": [("b", "P2")], "test": [("c", "P3")]}
    items = [item("a", "P1"), item("b", "P2"), item("c", "P3"), item("d", "P1"), item("e", "P9"), item("f", "P2")]
    ids = lambda s: {k: [i["case_id"] for i in v] for k, v in s.items()}  # noqa: E731
    with caplog.at_level(logging.WARNING, logger="probunet"):
        assert ids(apply_recorded_split(items, record, "R")) == {"train": ["a"], "val": ["b"], "test": ["c"]}
        assert ids(apply_recorded_split(items, record, "R", include_new=True)) == \
            {"train": ["a"], "val": ["b"], "test": ["c", "e"]}
    said = [r.getMessage() for r in caplog.records]
    assert len(said) == 2 and "3 case(s) are new" in said[1] and "1 joined the test split" in said[1]
    assert "2 left out for good" in said[1]
    with pytest.raises(DataError, match="R: 1 case.*missing.*[(]b[)]"):
        apply_recorded_split([items[0], items[2]], record, "R")


def test_cases_gone_missing_are_an_error_naming_them(trained, tmp_path, capsys):
    run, data, _ = trained
    gone = _recorded(run)["train"][0]
    shutil.rmtree(data / gone)
    assert main(["evaluate", str(run), "--num-samples", "2", "--no-progress", "--device", "cpu",
                 "--out", str(tmp_path / "ev") + "/"]) == 2
    _one_line_error(capsys, "evaluate", gone, "missing", "splits")
    assert not (tmp_path / "ev").exists()
    assert main(["train", str(run / "config.yaml"), "--out", str(run), "--resume", "train.steps=3",
                 "--no-progress"]) == 2
    _one_line_error(capsys, "train", gone, "missing")


def test_resume_keeps_the_split_and_never_rewrites_splits_json(trained, full_data, caplog):
    run, data, later = trained
    before = (run / "splits.json").read_bytes()
    _add_back(data, full_data, later)
    with caplog.at_level(logging.WARNING, logger="probunet"):
        assert main(["--quiet", "train", str(run / "config.yaml"), "--out", str(run), "--resume",
                     "train.steps=4", "--no-progress"]) == 0
    assert (run / "splits.json").read_bytes() == before
    from probunet.checkpoint import load_checkpoint

    stored = json.loads(load_checkpoint(run / "checkpoints" / "last.pt")["split"])
    assert stored == json.loads(before)  # the resumed run trained on the recorded cases alone
    assert int(load_checkpoint(run / "checkpoints" / "last.pt")["step"]) == 4
    said = [r.getMessage() for r in caplog.records if "new since the run's split was fixed" in r.getMessage()]
    assert len(said) == 1 and "16 case(s)" in said[0]


def test_the_checkpoints_own_split_serves_a_copied_checkpoint(trained, full_data, tmp_path):
    run, data, later = trained
    recorded = _recorded(run)
    loose = tmp_path / "loose.pt"
    shutil.copy(run / "checkpoints" / "last.pt", loose)
    _add_back(data, full_data, later)
    assert main(["--quiet", "evaluate", str(loose), "--num-samples", "2", "--no-progress", "--device", "cpu",
                 "--out", str(tmp_path / "ev") + "/"]) == 0
    assert _evaluated_ids(tmp_path / "ev" / "per_case.csv") == sorted(recorded["test"])


def test_an_edited_splits_json_or_a_new_split_on_the_runs_data_is_refused(trained, tmp_path, capsys):
    run, _, _ = trained
    assert main(["evaluate", str(run), "data.split.seed=7", "--no-progress", "--device", "cpu",
                 "--out", str(tmp_path / "ev") + "/"]) == 2
    _one_line_error(capsys, "evaluate", "data.split.seed", "fixed")
    record = json.loads((run / "splits.json").read_text())
    record["test"].append(record["train"].pop())
    (run / "splits.json").write_text(json.dumps(record))
    assert main(["evaluate", str(run), "--no-progress", "--device", "cpu", "--out", str(tmp_path / "ev") + "/"]) == 2
    _one_line_error(capsys, "evaluate", "splits.json", "differs")
