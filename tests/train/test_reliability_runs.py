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
from probunet.train.trainer import fit

ROOT = Path(__file__).resolve().parents[2]
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
    from probunet.models.checkpoint import load_checkpoint

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


# ----------------------------------------------------------------------------- row 8: evaluate's other files


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("run") / "run"
    fit(load_config(DEBUG, FAST), run_dir)
    return run_dir


def _evaluate(run, out, *extra):
    return main(["--quiet", "evaluate", str(run), "--num-samples", "2", "--no-progress", "--device", "cpu",
                 "--out", str(out), *extra])


@pytest.mark.parametrize("name", ["report_per_case.csv", "report_reliability.png", "report_lesions.csv",
                                  "report_lesions.png"])
def test_evaluate_never_replaces_a_users_file_beside_the_summary(run, tmp_path, capsys, name):
    out = tmp_path / "evout"
    out.mkdir()
    (out / name).write_text("the user's own\n")
    assert _evaluate(run, out / "report") == 2
    _one_line_error(capsys, "evaluate", name, "refusing to overwrite", "--overwrite")
    assert (out / name).read_text() == "the user's own\n"
    assert sorted(p.name for p in out.iterdir()) == [name]  # nothing else was written
    assert _evaluate(run, out / "report", "--overwrite") == 0
    assert (out / name).read_bytes() != b"the user's own\n" and (out / "report").is_file()


@pytest.mark.parametrize("name", ["report.html", "report_files/case.png"])
def test_evaluate_report_never_replaces_a_users_page_or_figure(run, tmp_path, capsys, name):
    out = tmp_path / "evout"
    (out / name).parent.mkdir(parents=True, exist_ok=True)
    (out / name).write_text("the user's own\n")
    assert _evaluate(run, str(out) + "/", "--report") == 2
    _one_line_error(capsys, "evaluate", name.split("/")[-1], "refusing to overwrite", "--overwrite")
    assert (out / name).read_text() == "the user's own\n"
    assert not (out / "summary.json").exists()  # refused before the work
    assert _evaluate(run, str(out) + "/", "--report", "--overwrite") == 0
    assert (out / "report.html").is_file()
    if name != "report.html":  # a figure name the report does not write is left alone, even with --overwrite
        assert (out / name).read_text() == "the user's own\n"
        (out / name).unlink()
    assert _evaluate(run, str(out) + "/", "--report") == 0  # its own page and figures are replaced on a rerun


def test_evaluate_replaces_its_own_files_even_after_an_interruption(run, tmp_path, capsys):
    out = tmp_path / "ev"
    assert _evaluate(run, str(out) + "/") == 0
    names = sorted(p.name for p in out.iterdir())
    assert _evaluate(run, str(out) + "/") == 0  # a rerun replaces its own files
    (out / "summary.json").unlink()  # an evaluation killed before its summary: the rest is still probunet's
    assert _evaluate(run, str(out) + "/") == 0
    assert sorted(p.name for p in out.iterdir()) == names
    # a user's file of the same name (another CSV, a PNG from elsewhere) is not
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def users_png(path):
        fig = plt.figure()
        fig.savefig(path)
        plt.close(fig)

    for name, write in (("reliability.png", users_png), ("per_case.csv", lambda p: p.write_text("case_id,x\n"))):
        write(out / name)
        before = (out / name).read_bytes()
        assert _evaluate(run, str(out) + "/") == 2
        _one_line_error(capsys, "evaluate", name, "refusing to overwrite")
        assert (out / name).read_bytes() == before
        (out / name).unlink()


# ----------------------------------------------------------------------------- row 10: full and read-only disks


def _mount_tmpfs(where: Path, options: str) -> bool:
    """A tmpfs at ``where`` (needs root and a kernel that allows it); False where it cannot be had."""
    import os
    import subprocess

    where.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0 or not shutil.which("mount"):
        return False
    return subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(where)],
                          capture_output=True).returncode == 0


def _umount(where: Path) -> None:
    import subprocess

    subprocess.run(["umount", "-l", str(where)], capture_output=True)


@pytest.fixture
def small_disk(tmp_path):
    """A 2 MB tmpfs (root only; elsewhere these tests are skipped and the patched-write tests below stand in)."""
    where = tmp_path / "disk"
    if not _mount_tmpfs(where, "size=2m"):
        pytest.skip("mounting a tmpfs needs root; the patched-write tests cover ENOSPC instead")
    yield where
    _umount(where)


@pytest.fixture
def read_only(tmp_path):
    """A read-only folder: a read-only tmpfs as root (root ignores permission bits), else mode 0555."""
    import os

    where = tmp_path / "ro"
    if os.geteuid() == 0:
        if not _mount_tmpfs(where, "ro,size=1m"):
            pytest.skip("no read-only folder can be made here (root, and mounting a tmpfs is not allowed)")
        yield where
        _umount(where)
    else:
        where.mkdir()
        where.chmod(0o555)
        yield where
        where.chmod(0o755)


def _fill(disk: Path, leave: int) -> None:
    """Take the disk's free space down to about ``leave`` bytes."""
    free = shutil.disk_usage(disk).free
    name = f"filler{len(list(disk.glob('filler*')))}"
    with open(disk / name, "wb") as fh:
        fh.write(b"\0" * max(0, free - leave))


def _full_disk_line(capsys, command, *needles):
    line = _one_line_error(capsys, command, "cannot write", "no space left on device", *needles)
    return line


def test_train_on_a_full_disk_is_refused_before_the_first_step(small_disk, capsys):
    _fill(small_disk, 100 << 10)
    assert main(["train", str(DEBUG), "--out", str(small_disk / "run"), *FAST, "--no-progress"]) == 2
    _full_disk_line(capsys, "train", str(small_disk / "run" / "checkpoints"), "free")
    assert not (small_disk / "run" / "checkpoints" / "last.pt").exists()
    assert not (small_disk / "run" / "metrics.jsonl").exists()


def test_disk_full_during_train_predict_and_evaluate_is_one_line(small_disk, capsys, monkeypatch, run, tmp_path):
    from probunet.train import trainer as train

    # train: the disk fills up after the first checkpoint
    real_save = train.save_checkpoint
    calls = []

    def save_then_fill(state, path):
        calls.append(path)
        if len(calls) == 2:
            _fill(small_disk, 0)
        return real_save(state, path)

    monkeypatch.setattr(train, "save_checkpoint", save_then_fill)
    out = small_disk / "run"
    assert main(["train", str(DEBUG), "--out", str(out), "train.steps=4", "train.checkpoint_every=1",
                 "train.val_every=100", "train.device=cpu", "--no-progress"]) == 2
    line = _full_disk_line(capsys, "train", "last.pt", "training stopped")
    assert "step 2" in line
    assert int(__import__("probunet.models.checkpoint", fromlist=["x"]).load_checkpoint(out / "checkpoints" / "last.pt")
               ["step"]) == 1  # the last good checkpoint stays
    assert not [p for p in (out / "checkpoints").iterdir() if ".tmp" in p.name]
    monkeypatch.undo()
    for p in small_disk.iterdir():
        shutil.rmtree(p) if p.is_dir() else p.unlink()

    # predict: the cases fail as rows, the summary that cannot be written is one line
    from probunet.data import synthetic

    inputs = tmp_path / "in"
    synthetic.write_qubiq(synthetic.generate(num_cases=2, size=32), tmp_path / "syn")
    inputs.mkdir()
    for case in ("case_0000", "case_0001"):
        shutil.copy(tmp_path / "syn" / case / "image.nii.gz", inputs / f"{case}.nii.gz")
    _fill(small_disk, 8 << 10)
    assert main(["predict", str(run), str(inputs), str(small_disk / "pred"), "--num-samples", "4", "--device",
                 "cpu", "--no-progress"]) == 2
    _full_disk_line(capsys, "predict", str(small_disk / "pred" / "summary.csv"))

    # evaluate: the files, one line
    for p in small_disk.iterdir():
        shutil.rmtree(p) if p.is_dir() else p.unlink()
    _fill(small_disk, 16 << 10)
    assert main(["evaluate", str(run), "--num-samples", "2", "--device", "cpu", "--no-progress",
                 "--out", str(small_disk / "ev") + "/"]) == 2
    _full_disk_line(capsys, "evaluate", str(small_disk / "ev"))


def test_read_only_out_is_refused_before_the_work(read_only, run, capsys, monkeypatch):
    from probunet.evaluation import scoring
    from probunet.train import trainer as train

    started = []
    monkeypatch.setattr(train, "build_model", lambda *a, **k: started.append("train") or 1 / 0)
    monkeypatch.setattr(scoring, "evaluate", lambda *a, **k: started.append("evaluate") or 1 / 0)
    for out in (read_only / "run", read_only):
        assert main(["train", str(DEBUG), "--out", str(out), *FAST, "--no-progress"]) == 2
        line = _one_line_error(capsys, "train", str(out), "cannot write")
        assert "read-only file system" in line or "permission denied" in line
        assert main(["evaluate", str(run), "--no-progress", "--device", "cpu", "--out", str(out) + "/"]) == 2
        line = _one_line_error(capsys, "evaluate", str(out), "cannot write")
        assert "read-only file system" in line or "permission denied" in line
    assert started == []


def test_a_failed_write_is_one_line_and_leaves_the_old_file(tmp_path, monkeypatch):
    """ENOSPC simulated by patching the write (the tmpfs tests above need root)."""
    import errno

    from probunet import guards
    from probunet.guards import WriteError
    from probunet.utils import atomic_call, atomic_save, atomic_write_text

    target = tmp_path / "summary.csv"
    target.write_text("old")

    def no_space(tmp):
        with open(tmp, "w") as fh:
            fh.write("partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(WriteError) as info:
        atomic_call(target, no_space)
    assert str(info.value) == f"{target}: cannot write: no space left on device"
    assert target.read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["summary.csv"]
    # torch.save's zip writer says "unexpected pos" on a short write: the free space names the cause
    import torch

    monkeypatch.setattr(torch, "save", lambda obj, f: (_ for _ in ()).throw(
        RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 79680 vs 79568")))
    monkeypatch.setattr(guards, "free_bytes", lambda folder: 512)
    with pytest.raises(WriteError, match=r"last\.pt: cannot write: no space left on device \(512 bytes free\)"):
        atomic_save({}, tmp_path / "last.pt")
    with pytest.raises(WriteError, match="read-only file system"):
        atomic_call(tmp_path / "x.txt", lambda tmp: (_ for _ in ()).throw(OSError(errno.EROFS, "Read-only")))
    atomic_write_text(tmp_path / "ok.txt", "fine")  # other writes are untouched
    assert (tmp_path / "ok.txt").read_text() == "fine"


# ----------------------------------------------------------------------------- row 10: counts and memory


@pytest.mark.parametrize("argv, needles", [
    (["--num-samples", "1000000000000"], ["--num-samples", "1..1000", "1000000000000"]),
    (["eval.num_samples=1e12"], ["eval.num_samples", "at most 1000"]),
    (["--num-samples", "0"], ["--num-samples"]),
])
def test_sample_counts_are_range_checked(run, capsys, argv, needles, tmp_path):
    assert main(["evaluate", str(run), *argv, "--no-progress", "--device", "cpu",
                 "--out", str(tmp_path / "ev") + "/"]) == 2
    _one_line_error(capsys, "evaluate", *needles)
    assert not (tmp_path / "ev").exists()


@pytest.mark.parametrize("override, needles", [
    ("data.synthetic.size=100000", ["data.synthetic.size", "100000^2", "at most"]),
    ("data.synthetic.num_cases=1e9", ["data.synthetic.num_cases", "at most"]),
    ("data.synthetic.num_raters=1000", ["data.synthetic.num_raters", "at most 64"]),
    ("train.val_samples=100000", ["train.val_samples", "at most 1000"]),
])
def test_synthetic_sizes_are_range_checked(tmp_path, capsys, override, needles):
    assert main(["train", str(DEBUG), override, "--out", str(tmp_path / "run"), "--no-progress"]) == 2
    _one_line_error(capsys, "train", *needles)
    assert not (tmp_path / "run").exists()


def test_memory_estimates_refuse_with_the_figure(run, tmp_path, capsys, monkeypatch):
    from probunet import guards

    monkeypatch.setattr(guards, "available_memory", lambda device=None: 10 << 20)  # a machine with 10 MB free
    assert main(["evaluate", str(run), "--num-samples", "1000", "--no-progress", "--device", "cpu",
                 "--out", str(tmp_path / "ev") + "/"]) == 2
    _one_line_error(capsys, "evaluate", "--num-samples 1000", "needs about", "10.0 MB are available")
    assert main(["train", str(DEBUG), "data.synthetic.num_cases=2000", "data.synthetic.size=256", "--out",
                 str(tmp_path / "run"), "--no-progress"]) == 2
    _one_line_error(capsys, "train", "data.synthetic", "2000 cases", "needs about", "10.0 MB are available")


def test_an_allocation_that_fails_is_one_line_with_its_size(run, tmp_path, capsys, monkeypatch):
    from probunet.evaluation import scoring

    def oom(*a, **k):
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:127] err == 0. DefaultCPUAllocator: can't allocate "
                           "memory: you tried to allocate 5120000000000000 bytes. Error code 12")

    monkeypatch.setattr(scoring, "evaluate", oom)
    assert main(["evaluate", str(run), "--num-samples", "2", "--no-progress", "--device", "cpu",
                 "--out", str(tmp_path / "ev") + "/"]) == 2
    _one_line_error(capsys, "evaluate", "out of memory", "4656.6 TB", "--num-samples")
    monkeypatch.setattr(scoring, "evaluate", lambda *a, **k: 1 / 0)  # other errors still show their traceback
    with pytest.raises(ZeroDivisionError):
        main(["evaluate", str(run), "--num-samples", "2", "--no-progress", "--device", "cpu",
              "--out", str(tmp_path / "ev") + "/"])


# ----------------------------------------------------------------------------- rows 2, 11, 13: predict's output folder


def _scans(folder: Path, names=("c1", "c2", "c3")) -> Path:
    import nibabel as nib
    import numpy as np

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for n in names:
        nib.save(nib.Nifti1Image(rng.normal(size=(32, 32)).astype(np.float32), np.eye(4)), str(folder / f"{n}.nii.gz"))
    return folder


def _predict(run, inp, out, *extra):
    return main(["--quiet", "predict", str(run), str(inp), str(out), "--num-samples", "2", "--device", "cpu",
                 "--no-progress", *extra])


def _tree(folder: Path) -> dict:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_predict_refuses_a_users_folder_and_never_deletes_its_files(run, tmp_path, capsys):
    inp = _scans(tmp_path / "in")
    user = tmp_path / "userdir"
    (user / "notes").mkdir(parents=True)
    (user / "draft.tmp1").write_text("mine")
    (user / "notes" / ".report.abcd1234.tmp").write_text("mine too")  # looks like a temp name, deep down
    (user / "summary.csv").write_text("my,own,table\n")
    before = _tree(user)
    assert _predict(run, inp, user) == 2
    _one_line_error(capsys, "predict", str(user), "probunet did not write", "new or empty folder")
    assert _tree(user) == before and not (user / ".probunet.lock").exists()
    # an empty folder is taken (and marked); a user's summary.csv put there later is never replaced
    out = tmp_path / "out"
    out.mkdir()
    assert _predict(run, inp, out) == 0
    assert (out / ".probunet-predict.json").is_file()
    (out / "summary.csv").write_text("my,own,table\n")
    assert _predict(run, inp, out) == 2
    _one_line_error(capsys, "predict", "summary.csv", "not a probunet summary")
    assert (out / "summary.csv").read_text() == "my,own,table\n"


def test_predict_removes_only_its_own_temps_where_it_writes(run, tmp_path):
    inp = _scans(tmp_path / "in", ("c1",))
    out = tmp_path / "out"
    assert _predict(run, inp, out) == 0
    ours = [out / ".probunet-summary.ab12cd34.tmp", out / "c1" / ".probunet-sample_000.zz99yy88.tmp.nii.gz",
            out / "c1" / ".probability.k3j4h5g6.tmp.nii.gz"]
    kept = [out / "c1" / "deeper" / ".probunet-x.ab12cd34.tmp",  # below the depth predict writes
            out / "c9" / ".probunet-sample_000.zz99yy88.tmp.nii.gz"]  # not a case of this run
    for p in ours + kept:
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(b"half")
    assert _predict(run, inp, out, "--overwrite") == 0
    assert not any(p.exists() for p in ours) and all(p.exists() for p in kept)


def _shards(run, inp, out, n, *extra):
    return [_predict(run, inp, out, "--shard", f"{k}/{n}", *extra) for k in range(n)]


def test_an_output_folder_remembers_its_shard_count_and_options(run, tmp_path, capsys):
    inp = _scans(tmp_path / "in", ("c1", "c2", "c3", "c4", "c5", "c6"))
    out = tmp_path / "out"
    assert _shards(run, inp, out, 3) == [0, 0, 0]
    capsys.readouterr()
    assert _predict(run, inp, out, "--shard", "0/2") == 2
    _one_line_error(capsys, "predict", "--shard 0/2", "another shard count (2, the folder's is 3)")
    assert _predict(run, inp, out, "--shard", "1/3", "--seed", "5") == 2
    _one_line_error(capsys, "predict", "seed 0 -> 5")
    assert sorted(p.name for p in out.glob("summary.shard-*")) == [f"summary.shard-{k}-of-3.csv" for k in range(3)]
    import subprocess
    import sys

    env = {**__import__("os").environ, "PYTHONPATH": str(ROOT)}
    merge = [sys.executable, str(ROOT / "scripts" / "predict_batch.py"), "--merge", str(out)]
    res = subprocess.run(merge, capture_output=True, text=True, env=env, timeout=120)
    assert res.returncode == 0 and "merged 6 rows" in res.stdout, res.stderr
    # --overwrite starts over with the new count; the old run's shard summaries go
    assert _shards(run, inp, out, 2, "--overwrite") == [0, 0]
    assert sorted(p.name for p in out.glob("summary.shard-*")) == [f"summary.shard-{k}-of-2.csv" for k in range(2)]
    # merge refuses mixed summaries: another count, or a case twice
    import shutil as sh

    sh.copy(out / "summary.shard-0-of-2.csv", out / "summary.shard-0-of-3.csv")
    res = subprocess.run(merge, capture_output=True, text=True, env=env, timeout=120)
    assert res.returncode == 2 and "different shard counts" in res.stderr and "Traceback" not in res.stderr
    (out / "summary.shard-0-of-3.csv").unlink()
    sh.copy(out / "summary.shard-0-of-2.csv", out / "summary.shard-1-of-2.csv")
    res = subprocess.run(merge, capture_output=True, text=True, env=env, timeout=120)
    assert res.returncode == 2 and "is in two shard summaries" in res.stderr


def test_shards_of_two_counts_at_once_are_refused(run, tmp_path, capsys):
    """0/2 and 0/3 running at the same time: the second to start is refused (the marker is read and
    written under an exclusive lock)."""
    from probunet.utils import FolderLock

    inp = _scans(tmp_path / "in", ("c1", "c2", "c3", "c4"))
    out = tmp_path / "out"
    out.mkdir()
    with FolderLock(out, shared=True):  # another shard of the first run still holds the folder
        assert _predict(run, inp, out, "--shard", "0/2") == 0
        assert _predict(run, inp, out, "--shard", "0/3") == 2
    _one_line_error(capsys, "predict", "another shard count (3, the folder's is 2)")


def test_a_dangling_lock_symlink_is_never_followed(run, tmp_path, capsys):
    inp = _scans(tmp_path / "in", ("c1",))
    out = tmp_path / "out"
    out.mkdir()
    target = tmp_path / "elsewhere" / "planted"
    target.parent.mkdir()
    (out / ".probunet.lock").symlink_to(target)
    assert _predict(run, inp, out) == 2
    _one_line_error(capsys, "predict", ".probunet.lock", "symbolic link")
    assert not target.exists() and list(target.parent.iterdir()) == []
