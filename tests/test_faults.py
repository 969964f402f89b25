"""Safety and recovery: damaged and hostile checkpoints, non-finite
training, run directories that are not probunet's, busy and unwritable output
folders, file lists that point outside OUTPUT_DIR, resume bookkeeping."""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from probunet.models import checkpoint as C
from probunet.train import trainer as train_mod
from probunet.cli import main
from probunet.config import load_config
from probunet.utils import FolderLock

REPO = Path(__file__).resolve().parent.parent
DEBUG = str(REPO / "configs" / "debug.yaml")
FAST = ["train.val_every=1000", "train.log_every=1"]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A finished 3-step debug run (checkpoint at step 3)."""
    out = tmp_path_factory.mktemp("faults") / "run"
    train_mod.fit(load_config(DEBUG, ["train.steps=3", "train.checkpoint_every=3", *FAST]), out)
    return out


def _flip_inside(path: Path, tensor: torch.Tensor) -> None:
    """Flip one byte in the middle of ``tensor``'s bytes as stored in the file ``path``."""
    data = bytearray(path.read_bytes())
    raw = tensor.contiguous().numpy().tobytes()
    pos = data.find(raw)
    assert pos >= 0
    data[pos + len(raw) // 2] ^= 0x40
    path.write_bytes(bytes(data))


def _one_line_error(err: str, name: str) -> str:
    lines = [l for l in err.splitlines() if l.strip() and not l.startswith(("INFO", "WARNING"))]
    assert len(lines) == 1, err
    assert "Traceback" not in err and name in lines[0], err
    return lines[0]


# ----------------------------------------------------------------------------- row 4: digests


def test_checkpoint_holds_a_digest_of_everything(run):
    raw = torch.load(run / "checkpoints" / "last.pt", weights_only=True)
    assert raw["format"] == C.CHECKPOINT_FORMAT and len(raw["digest"]) == 64
    assert C.state_digest(raw) == raw["digest"]
    raw["optimizer"]["state"][0]["exp_avg"].view(-1)[0] += 1e-3  # any tensor changes it
    assert C.state_digest(raw) != raw["digest"]


def test_flipped_weight_byte_is_refused_naming_the_file(run, tmp_path, capsys):
    bad = tmp_path / "last.pt"
    shutil.copy(run / "checkpoints" / "last.pt", bad)
    state = torch.load(bad, weights_only=True)
    name = max(state["model"], key=lambda k: state["model"][k].numel())
    _flip_inside(bad, state["model"][name])
    with pytest.raises(C.CheckpointError, match="digest") as info:
        C.load_checkpoint(bad)
    assert str(bad) in str(info.value) and "\n" not in str(info.value)
    assert main(["evaluate", str(bad)]) == 2
    _one_line_error(capsys.readouterr().err, "last.pt")
    inp, out = tmp_path / "in", tmp_path / "out"
    inp.mkdir()
    nib.save(nib.Nifti1Image(np.zeros((32, 32), np.float32), np.eye(4)), str(inp / "a.nii.gz"))
    assert main(["predict", str(bad), str(inp), str(out), "--no-progress"]) == 2
    _one_line_error(capsys.readouterr().err, "last.pt")


def test_flipped_optimizer_byte_stops_resume(run, tmp_path, capsys):
    resumed = tmp_path / "run"
    shutil.copytree(run, resumed)
    last = resumed / "checkpoints" / "last.pt"
    state = torch.load(last, weights_only=True)
    _flip_inside(last, state["optimizer"]["state"][0]["exp_avg_sq"])
    before = last.read_bytes()
    rc = main(["train", DEBUG, "train.steps=6", *FAST, "--out", str(resumed), "--resume", "--no-progress"])
    assert rc == 2
    _one_line_error(capsys.readouterr().err, "last.pt")
    assert last.read_bytes() == before  # nothing saved over it


def test_checkpoint_without_digest_loads_with_a_warning(run, tmp_path, caplog):
    legacy = tmp_path / "old.pt"
    state = torch.load(run / "checkpoints" / "last.pt", weights_only=True)
    del state["digest"]
    state["format"] = 1
    torch.save(state, legacy)
    with caplog.at_level("WARNING", logger="probunet.models.checkpoint"):
        model, cfg, ckpt = C.load_model(legacy)
    assert ckpt["step"] == 3
    assert any("without a digest" in r.getMessage() and "old.pt" in r.getMessage() for r in caplog.records)


def test_train_re_exports_the_checkpoint_api():
    assert train_mod.load_checkpoint is C.load_checkpoint and train_mod.load_model is C.load_model


# ----------------------------------------------------------------------------- row 5: checkpoint parts


def test_zero_byte_checkpoint(tmp_path, capsys):
    empty = tmp_path / "empty.pt"
    empty.write_bytes(b"")
    with pytest.raises(C.CheckpointError, match="empty"):
        C.load_checkpoint(empty)
    assert main(["evaluate", str(empty)]) == 2
    _one_line_error(capsys.readouterr().err, "empty.pt")


def test_weights_that_do_not_match_the_stored_config(run, tmp_path, capsys):
    state = torch.load(run / "checkpoints" / "last.pt", weights_only=True)
    state["config"]["model"]["features"] = [8, 16]  # digest is recomputed: a consistent, wrong file
    C.save_checkpoint(state, tmp_path / "mismatch.pt")
    with pytest.raises(C.CheckpointError, match="do not match") as info:
        C.load_model(tmp_path / "mismatch.pt")
    assert "mismatch.pt" in str(info.value) and "\n" not in str(info.value)
    assert main(["evaluate", str(tmp_path / "mismatch.pt")]) == 2
    _one_line_error(capsys.readouterr().err, "mismatch.pt")


def test_absurd_stored_config_names_the_checkpoint(run, tmp_path):
    state = torch.load(run / "checkpoints" / "last.pt", weights_only=True)
    state["config"]["model"]["latent_dim"] = 0
    C.save_checkpoint(state, tmp_path / "absurd.pt")
    with pytest.raises(C.CheckpointError, match="latent_dim") as info:
        C.load_model(tmp_path / "absurd.pt")
    assert "absurd.pt" in str(info.value)


def test_unsafe_checkpoint_refusal_gives_no_unsafe_advice(tmp_path, capsys):
    class Evil:
        def __reduce__(self):
            return (os.system, ("echo owned > " + str(tmp_path / "owned"),))

    path = tmp_path / "evil.pt"
    torch.save({"model": {}, "config": {}, "x": Evil()}, path)
    with pytest.raises(C.CheckpointError) as info:
        C.load_checkpoint(path)
    msg = str(info.value)
    assert "evil.pt" in msg and "refused" in msg and "\n" not in msg
    assert "weights_only" not in msg and "trust" not in msg
    assert not (tmp_path / "owned").exists()
    assert main(["evaluate", str(path)]) == 2
    assert "weights_only" not in capsys.readouterr().err


# ----------------------------------------------------------------------------- row 3: non-finite weights


def _scan_finite(folder: Path) -> list[Path]:
    """Every .pt under folder, asserting every tensor in it is finite."""
    found = sorted(folder.rglob("*.pt"))
    for p in found:
        state = torch.load(p, weights_only=True)
        assert not C.non_finite({k: state[k] for k in ("model", "optimizer", "scaler")}), p
    return found


def _poison_weights_at(monkeypatch, step_no: int) -> None:
    """After the optimizer step number ``step_no`` (1-based), one weight becomes NaN."""
    real = train_mod.backward_and_step
    calls = {"n": 0}

    def step(loss, optimizer, *a, **kw):
        bad = real(loss, optimizer, *a, **kw)
        calls["n"] += 1
        if calls["n"] == step_no:
            with torch.no_grad():
                optimizer.param_groups[0]["params"][0].view(-1)[0] = float("nan")
        return bad

    monkeypatch.setattr(train_mod, "backward_and_step", step)


@pytest.mark.parametrize("check_every", [1, 1000])  # caught by the weight check, or by the save guard
def test_non_finite_weights_are_never_saved_and_the_last_good_checkpoint_stays(tmp_path, monkeypatch,
                                                                             check_every):
    _poison_weights_at(monkeypatch, 3)
    cfg = load_config(DEBUG, ["train.steps=6", "train.checkpoint_every=2", "train.val_every=1000",
                              f"train.log_every={check_every}", f"train.max_bad_steps={check_every}"])
    with pytest.raises(train_mod.TrainingError, match="not(?: written)?.*finite|no longer finite") as info:
        train_mod.fit(cfg, tmp_path / "run")
    assert "step 2" in str(info.value) and "last.pt" in str(info.value)  # the good one is named
    saved = _scan_finite(tmp_path / "run")
    assert saved and C.load_checkpoint(tmp_path / "run" / "checkpoints" / "last.pt")["step"] == 2


def test_save_checkpoint_refuses_non_finite_optimizer_state(run, tmp_path):
    state = torch.load(run / "checkpoints" / "last.pt", weights_only=True)
    state["optimizer"]["state"][1]["exp_avg"].view(-1)[0] = float("inf")
    with pytest.raises(C.CheckpointError, match="optimizer"):
        C.save_checkpoint(state, tmp_path / "x.pt")
    assert not (tmp_path / "x.pt").exists() and not list(tmp_path.glob(".*tmp*"))


def test_infinite_lr_cli_exits_non_zero_with_one_line(tmp_path, capsys):
    out = tmp_path / "run"
    rc = main(["--quiet", "train", DEBUG, "train.lr=.inf", "train.steps=3", "train.val_every=1000",
               "--out", str(out), "--no-progress"])
    assert rc != 0
    _one_line_error(capsys.readouterr().err, "lr")
    _scan_finite(out) if out.exists() else None


# ----------------------------------------------------------------------------- row 8: run directories


def test_folder_with_foreign_files_is_refused(tmp_path, capsys):
    mine = tmp_path / "project"
    mine.mkdir()
    (mine / "config.yaml").write_text("my own config\n")
    (mine / "splits.json").write_text("{}")
    rc = main(["train", DEBUG, "train.steps=1", *FAST, "--out", str(mine), "--no-progress"])
    assert rc == 2
    line = _one_line_error(capsys.readouterr().err, str(mine))
    assert "did not write" in line and "config.yaml" in line
    assert (mine / "config.yaml").read_text() == "my own config\n" and (mine / "splits.json").read_text() == "{}"
    assert sorted(p.name for p in mine.iterdir()) == ["config.yaml", "splits.json"]  # not even a lock file


def test_marked_run_without_checkpoint_restarts_and_legacy_run_resumes(run, tmp_path):
    cfg = load_config(DEBUG, ["train.steps=1", *FAST])
    fresh = tmp_path / "fresh"
    fresh.mkdir()  # an empty folder is fine
    train_mod.fit(cfg, fresh)
    assert (fresh / train_mod.RUN_MARKER).is_file()
    shutil.rmtree(fresh / "checkpoints")  # killed before its first checkpoint: a new start is allowed
    train_mod.fit(cfg, fresh)
    legacy = tmp_path / "legacy"
    shutil.copytree(run, legacy)
    (legacy / train_mod.RUN_MARKER).unlink()  # a run written before markers existed
    with pytest.raises(FileExistsError):
        train_mod.fit(load_config(DEBUG, ["train.steps=4", *FAST]), legacy)
    train_mod.fit(load_config(DEBUG, ["train.steps=4", *FAST]), legacy, resume=True)
    assert C.load_checkpoint(legacy / "checkpoints" / "last.pt")["step"] == 4


def test_busy_run_directory_is_refused(run, tmp_path):
    other = tmp_path / "run"
    shutil.copytree(run, other)
    with FolderLock(other):
        with pytest.raises(Exception, match="in use by another probunet process"):
            train_mod.fit(load_config(DEBUG, ["train.steps=4", *FAST]), other, resume=True)


# ----------------------------------------------------------------------------- row 9: resume bookkeeping


def test_resume_drops_metric_rows_after_the_checkpoint_and_stale_temps(tmp_path, monkeypatch):
    out = tmp_path / "run"
    real = train_mod.save_checkpoint

    def killed_after_step_3(state, path):
        if state["step"] > 3:
            raise KeyboardInterrupt  # as a kill: rows 4..5 logged, their checkpoint never written
        return real(state, path)

    monkeypatch.setattr(train_mod, "save_checkpoint", killed_after_step_3)
    cfg = load_config(DEBUG, ["train.steps=6", "train.checkpoint_every=3", "train.val_every=1000",
                              "train.log_every=1"])
    with pytest.raises(KeyboardInterrupt):
        train_mod.fit(cfg, out)
    first = [json.loads(l)["step"] for l in (out / "metrics.jsonl").read_text().splitlines()]
    assert first[:6] == [1, 2, 3, 4, 5, 6]  # (+ the validation row at the last step)
    with open(out / "metrics.jsonl", "a") as fh:
        fh.write('{"step": 7, "train_lo')  # a line cut by the kill
    stale = [out / "checkpoints" / ".last.abcd1234.tmp", out / ".train_summary.zz99yy88.tmp"]
    for p in stale:
        p.write_bytes(b"half a file")
    keep = out / "checkpoints" / "notes.tmp"  # not a temp name of ours
    keep.write_text("x")
    monkeypatch.setattr(train_mod, "save_checkpoint", real)
    train_mod.fit(cfg, out, resume=True)
    steps = [json.loads(l)["step"] for l in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == first  # rows 4.. logged once, by the resumed run
    assert not any(p.exists() for p in stale) and keep.exists()


# ----------------------------------------------------------------------------- predict: rows 2, 7, 9


def _inputs(folder: Path, names=("c1", "c2")) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for n in names:
        nib.save(nib.Nifti1Image(rng.normal(size=(32, 32)).astype(np.float32), np.eye(4)),
                 str(folder / f"{n}.nii.gz"))


def _tree(folder: Path) -> dict:
    return {str(p.relative_to(folder)): p.stat().st_mtime_ns for p in folder.rglob("*")}


def test_file_list_entry_escaping_output_dir_is_an_error_row(run, tmp_path, capsys):
    inp, out = tmp_path / "in", tmp_path / "out"
    _inputs(inp)
    before = _tree(inp)
    flist = tmp_path / "list.txt"
    flist.write_text("c1.nii.gz\n../in/c2.nii.gz\n")
    rc = main(["predict", str(run), str(inp), str(out), "--file-list", str(flist), "--num-samples", "2",
               "--no-progress"])
    assert rc == 1
    with open(out / "summary.csv", newline="") as fh:
        rows = {r["case"]: r for r in csv.DictReader(fh)}
    assert rows["c1"]["status"] == "ok"
    bad = rows["../in/c2"]
    assert bad["status"] == "error" and "outside OUTPUT_DIR" in bad["error"] and bad["output"] == ""
    assert _tree(inp) == before  # the input folder is never written
    assert not (tmp_path / "in" / "c2").exists()


def test_second_predict_on_a_busy_output_dir_is_refused(run, tmp_path, capsys):
    inp, out = tmp_path / "in", tmp_path / "out"
    _inputs(inp, ("c1",))
    out.mkdir()
    args = ["predict", str(run), str(inp), str(out), "--num-samples", "2", "--no-progress"]
    with FolderLock(out):  # another run holds it
        assert main(args) == 2
        _one_line_error(capsys.readouterr().err, str(out))
        assert not (out / "c1").exists() and not (out / "summary.csv").exists()
    # a holder killed with SIGKILL releases it
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from probunet.utils import FolderLock; "
                               f"FolderLock({str(out)!r}).acquire(); print('held', flush=True); time.sleep(60)"],
                              stdout=subprocess.PIPE, text=True, cwd=REPO,
                              env={**os.environ, "PYTHONPATH": str(REPO)})
    try:
        assert holder.stdout.readline().strip() == "held"
        assert main(args) == 2
        assert "in use" in capsys.readouterr().err
    finally:
        holder.kill()
        holder.wait()
    assert main(args) == 0
    assert (out / "c1" / "case.json").is_file()


def test_shards_share_the_output_dir_but_not_with_a_full_run(run, tmp_path):
    from probunet.inference import predict_folder
    from probunet.utils import FolderBusyError

    inp, out = tmp_path / "in", tmp_path / "out"
    _inputs(inp, ("c1", "c2"))
    out.mkdir()
    with FolderLock(out, shared=True):  # shard 1/2 running
        predict_folder(run, inp, out, shard="0/2", num_samples=2)
        with pytest.raises(FolderBusyError):
            predict_folder(run, inp, out, num_samples=2)
    with FolderLock(out, name=".probunet.shard-0-of-2.lock"):  # the same shard twice
        with pytest.raises(FolderBusyError):
            predict_folder(run, inp, out, shard="0/2", num_samples=2)


def test_unwritable_output_dir_is_refused_before_any_inference(run, tmp_path, monkeypatch, capsys):
    from probunet import inference as P
    from probunet import utils

    inp, out = tmp_path / "in", tmp_path / "out"
    _inputs(inp, ("c1",))
    out.mkdir()
    loaded = []
    real = P.Predictor.from_checkpoint.__func__
    monkeypatch.setattr(P.Predictor, "from_checkpoint",
                        classmethod(lambda cls, *a, **kw: loaded.append(1) or real(cls, *a, **kw)))
    if os.geteuid() == 0:  # root writes anywhere: make the folder refuse new files
        real_mkstemp = utils.tempfile.mkstemp

        def mkstemp(*a, dir=None, **kw):
            if dir is not None and Path(dir) == out:
                raise PermissionError(13, "Permission denied", str(out))
            return real_mkstemp(*a, dir=dir, **kw)

        monkeypatch.setattr(utils.tempfile, "mkstemp", mkstemp)
    else:
        out.chmod(0o555)
    try:
        rc = main(["predict", str(run), str(inp), str(out), "--num-samples", "2", "--no-progress"])
    finally:
        out.chmod(0o755)
    assert rc == 2 and not loaded
    line = _one_line_error(capsys.readouterr().err, str(out))
    assert "cannot write: permission denied" in line


def test_predict_removes_stale_temps_of_an_interrupted_run(run, tmp_path):
    from probunet.inference import predict_folder

    inp, out = tmp_path / "in", tmp_path / "out"
    _inputs(inp, ("c1",))
    (out / "c1").mkdir(parents=True)
    stale = out / "c1" / ".probability.k3j4h5g6.tmp.nii.gz"
    stale.write_bytes(b"half")
    predict_folder(run, inp, out, num_samples=2, overwrite=True)
    assert not stale.exists() and (out / "c1" / "case.json").is_file()


# ----------------------------------------------------------------------------- scripts/fault_check.py


def test_fault_check_quick(tmp_path):
    """The fault-injection script's small form: a kill during a checkpoint write is
    survived bit-identically, no fuzzed file crashes or hangs a process, no
    non-finite checkpoint is written, every hostile input gets its outcome."""
    r = subprocess.run([sys.executable, str(REPO / "scripts" / "fault_check.py"), "--quick", "--fuzz", "12",
                        "--work", str(tmp_path / "work")], capture_output=True, text=True, cwd=REPO,
                       env={**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    out = r.stdout
    assert "kills survived / tried: 1 / 1  (1 killed during a checkpoint write)" in out
    assert "crashed or hung: 0  [PASS]" in out
    assert "checkpoints with a non-finite tensor: 0" in out
    assert out.count("[PASS]") >= 1 + 1 + 8 + 12 and "[FAIL]" not in out and "ALL PASS" in out
