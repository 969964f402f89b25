"""The learning-rate schedule (train.lr_schedule): its values, what the trainer uses and
logs, exact resume, and how the quality benchmark treats a scheduled config."""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from probunet.models.checkpoint import load_checkpoint
from probunet.config import ConfigError, load_config
from probunet.train.step import lr_at
from probunet.train.trainer import Trainer, fit

REPO = Path(__file__).resolve().parents[2]
FAST = ["train.val_every=1000", "train.log_every=1"]


def test_cosine_hand_computed():
    # 5 steps from 1.0 to 0.1: progress 0, 1/4, 1/2, 3/4, 1
    c = math.cos(math.pi / 4)
    expected = [1.0, 0.1 + 0.9 * (1 + c) / 2, 0.55, 0.1 + 0.9 * (1 - c) / 2, 0.1]
    assert [lr_at(s, 5, 1.0, "cosine", 0.1) for s in range(5)] == pytest.approx(expected)
    assert lr_at(99, 5, 1.0, "cosine", 0.1) == pytest.approx(0.1)  # past the end: the last value
    assert lr_at(3, 1, 2e-4, "cosine") == 2e-4  # a one-step run keeps its learning rate
    assert lr_at(7, 10, 3e-4) == 3e-4  # constant
    with pytest.raises(ValueError, match="linear"):
        lr_at(0, 10, 1.0, "linear")


def test_config_keys_checked():
    with pytest.raises(ConfigError, match="train.lr_schedule"):
        load_config("configs/debug.yaml", ["train.lr_schedule=step"])
    with pytest.raises(ConfigError, match="train.lr_final_fraction"):
        load_config("configs/debug.yaml", ["train.lr_final_fraction=1.5"])
    cfg = load_config("configs/debug.yaml", ["train.lr_schedule=cosine", "train.lr_final_fraction=0.2"])
    assert (cfg.train.lr_schedule, cfg.train.lr_final_fraction) == ("cosine", 0.2)
    assert load_config("configs/debug.yaml").train.lr_schedule == "constant"


def _logged_lr(run):
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return {r["step"]: r["lr"] for r in rows if "lr" in r}


def test_trainer_follows_the_schedule_and_resume_continues_it(tmp_path, monkeypatch):
    base = ["train.steps=4", "train.checkpoint_every=2", "train.lr=0.01", "train.lr_schedule=cosine",
            "train.lr_final_fraction=0.5", *FAST]
    fit(load_config("configs/debug.yaml", base), tmp_path / "full")
    # the lr logged at step n is that of the n-th step (index n - 1): 0.01 * (0.5 + 0.25 * (1 + cos(pi k / 3)))
    expected = {n: 0.01 * (0.5 + 0.25 * (1 + math.cos(math.pi * (n - 1) / 3))) for n in range(1, 5)}
    assert _logged_lr(tmp_path / "full") == pytest.approx(expected)
    assert _logged_lr(tmp_path / "full")[4] == pytest.approx(0.005)

    # the same run stopped after its step-2 checkpoint, then resumed
    real_step = Trainer.train_step

    def stop_at_2(self, step, *args):
        if step == 2:
            raise KeyboardInterrupt
        return real_step(self, step, *args)

    with monkeypatch.context() as m:
        m.setattr(Trainer, "train_step", stop_at_2)
        with pytest.raises(KeyboardInterrupt):
            fit(load_config("configs/debug.yaml", base), tmp_path / "resumed")
    assert load_checkpoint(tmp_path / "resumed" / "checkpoints" / "last.pt")["step"] == 2
    fit(load_config("configs/debug.yaml", base), tmp_path / "resumed", resume=True)
    a = load_checkpoint(tmp_path / "full" / "checkpoints" / "last.pt")
    b = load_checkpoint(tmp_path / "resumed" / "checkpoints" / "last.pt")
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    assert b["optimizer"]["param_groups"][0]["lr"] == pytest.approx(0.005)


def test_benchmark_trains_each_budget_of_a_scheduled_config_from_scratch(tmp_path):
    out = tmp_path / "q"
    proc = subprocess.run([sys.executable, str(REPO / "scripts" / "benchmark_quality.py"), "--quick", "--out",
                           str(out), "--configs", "configs/synthetic.yaml@train.lr_schedule=cosine"],
                          capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    (run,) = [p for p in (out / "synthetic").iterdir() if p.is_dir()]
    for budget in (3, 6):
        lrs = _logged_lr(run / f"steps_{budget}")
        assert max(lrs) == budget  # a run of its own, ending at its budget ...
        assert lrs[budget] == pytest.approx(0.0, abs=1e-12)  # ... where its cosine ends
    log = (out / "synthetic" / f"{run.name}.log").read_text()
    assert "--resume" not in log
    row = json.loads((out / "results.json").read_text())["results"][0]
    assert sorted(int(b) for b in row["budgets"]) == [3, 6]
