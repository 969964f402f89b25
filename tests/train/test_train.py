"""End-to-end training: the CLI on configs/debug.yaml, checkpoints, exact resume."""

import json

import pytest
import torch

from probunet.cli import main
from probunet.config import load_config
from probunet.models.checkpoint import load_checkpoint, load_model
from probunet.train.trainer import fit

FAST = ["train.val_every=1000", "train.log_every=2"]


def test_train_cli_end_to_end(tmp_path, debug_config_path, capsys):
    run = tmp_path / "run"
    rc = main(["--quiet", "train", debug_config_path, "--out", str(run), "--no-progress"])
    assert rc == 0
    out = capsys.readouterr().out
    assert str(run) in out
    for rel in ("config.yaml", "splits.json", "metrics.jsonl", "samples.png", "checkpoints/last.pt",
                "checkpoints/best.pt", "train_summary.json"):
        assert (run / rel).is_file(), rel
    records = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]
    train_rec = [r for r in records if "train_loss" in r]
    assert train_rec and all(k in train_rec[0] for k in ("train_ce_sum", "train_ce_mean", "train_kl",
                                                         "train_sample_diversity"))
    assert any("val_ged" in r for r in records)
    ckpt = torch.load(run / "checkpoints" / "last.pt", weights_only=True)
    assert ckpt["step"] == 6
    assert {"model", "config", "optimizer", "scaler", "rng", "step"} <= set(ckpt)
    assert ckpt["config"]["model"]["features"] == [4, 8]
    splits = json.loads((run / "splits.json").read_text())
    groups = [{c["group"] for c in splits[k]} for k in ("train", "val", "test")]
    assert not (groups[0] & groups[1]) and not (groups[0] & groups[2]) and not (groups[1] & groups[2])


def test_training_reduces_the_loss(tmp_path):
    cfg = load_config("configs/debug.yaml", ["train.steps=40", "train.lr=0.01", "train.log_every=10", *FAST[:1]])
    fit(cfg, tmp_path / "run")
    recs = [json.loads(l) for l in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    losses = [r["train_loss"] for r in recs if "train_loss" in r]
    assert losses[-1] < 0.8 * losses[0]


def test_resume_equals_uninterrupted(tmp_path):
    base = ["train.steps=6", "train.checkpoint_every=3", *FAST]
    fit(load_config("configs/debug.yaml", base), tmp_path / "full")
    # A "killed" run: stops after step 3 (its last checkpoint), then resumes to 6.
    fit(load_config("configs/debug.yaml", ["train.steps=3", "train.checkpoint_every=3", *FAST]),
        tmp_path / "resumed")
    fit(load_config("configs/debug.yaml", base), tmp_path / "resumed", resume=True)
    a = load_checkpoint(tmp_path / "full" / "checkpoints" / "last.pt")
    b = load_checkpoint(tmp_path / "resumed" / "checkpoints" / "last.pt")
    assert a["step"] == b["step"] == 6
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k


def test_refuses_to_clobber_a_run_and_resume_needs_a_checkpoint(tmp_path):
    cfg = load_config("configs/debug.yaml", ["train.steps=1", *FAST])
    fit(cfg, tmp_path / "run")
    with pytest.raises(FileExistsError, match="--resume"):
        fit(cfg, tmp_path / "run")
    with pytest.raises(FileNotFoundError, match="resume"):
        fit(cfg, tmp_path / "other", resume=True)


def test_load_model_and_bad_checkpoints(tmp_path):
    cfg = load_config("configs/debug.yaml", ["train.steps=1", *FAST])
    fit(cfg, tmp_path / "run")
    model, cfg2, _ = load_model(tmp_path / "run")
    assert cfg2.model == cfg.model and not model.training
    with pytest.raises(FileNotFoundError):
        load_checkpoint(tmp_path / "missing.pt")
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="bad.pt"):
        load_checkpoint(bad)


def test_checkpoint_with_code_is_refused(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("owned",))

    path = tmp_path / "evil.pt"
    torch.save({"model": {}, "config": {}, "x": Evil()}, path)
    with pytest.raises(ValueError, match="evil.pt"):
        load_checkpoint(path)


def test_repeated_nan_stops_training_naming_the_step(tmp_path, monkeypatch):
    from probunet.models import prob_unet
    from probunet.train.nonfinite import TrainingError

    def nan_loss(logits, target, kl, beta=1.0, **kwargs):
        v = logits.float().mean() * float("nan")
        return {"loss": v, "ce_sum": v, "ce_mean": v, "kl": v}

    monkeypatch.setattr(prob_unet, "elbo_loss", nan_loss)  # the loss the model's training_loss computes
    cfg = load_config("configs/debug.yaml", ["train.steps=20", "train.max_bad_steps=3", *FAST])
    with pytest.raises(TrainingError, match="step 2"):
        fit(cfg, tmp_path / "run")


def test_amp_bf16_on_cpu_when_asked(tmp_path, monkeypatch):
    """train.amp=bf16 on a CPU: every training forward runs under CPU autocast with bfloat16
    (the logits come out in bf16); train.amp=off: none does."""
    from probunet.models import ProbabilisticUNet

    seen = []
    real_forward = ProbabilisticUNet.forward

    def forward(self, image, **kw):
        out = real_forward(self, image, **kw)
        if kw.get("seg") is not None:  # the training forward (with the posterior)
            seen.append((torch.is_autocast_enabled("cpu"), torch.get_autocast_dtype("cpu"), out.logits.dtype))
        return out

    monkeypatch.setattr(ProbabilisticUNet, "forward", forward)
    cfg = load_config("configs/debug.yaml", ["train.steps=2", "train.amp=bf16", *FAST])
    summary = fit(cfg, tmp_path / "run")
    assert summary["amp"] == "bfloat16"
    assert seen == [(True, torch.bfloat16, torch.bfloat16)] * 3  # the batch-memory probe's forward, 2 steps
    seen.clear()
    fit(load_config("configs/debug.yaml", ["train.steps=1", "train.amp=off", *FAST]), tmp_path / "off")
    assert len(seen) == 2 and all(s[0] is False and s[2] == torch.float32 for s in seen)


@pytest.mark.parametrize("extra", [["train.rater=all"], ["train.geco.enabled=true"], ["train.kl_warmup_steps=4"],
                                   ["model.prior=standard"]])
def test_training_options_run(tmp_path, extra):
    cfg = load_config("configs/debug.yaml", ["train.steps=2", *FAST, *extra])
    fit(cfg, tmp_path / "run")
    assert (tmp_path / "run" / "checkpoints" / "last.pt").is_file()


def test_auto_geco_goal_is_resolved_from_the_training_split_and_recorded(tmp_path):
    import numpy as np
    import yaml

    from probunet.data import load_splits, real_raters

    cfg = load_config("configs/debug.yaml", ["train.steps=1", *FAST, "train.geco.enabled=true",
                                              "train.geco.goal=auto", "train.geco.goal_scale=0.5"])
    summary = fit(cfg, tmp_path / "run")
    train = load_splits(cfg)["train"]
    labels = [np.asarray(real_raters(i)) for i in train]
    freq = [np.stack([(l == c).mean(0) for c in range(2)]) for l in labels]
    entropy = float(np.mean([np.where(f > 0, -f * np.log(np.where(f > 0, f, 1)), 0).sum(0).mean() for f in freq]))
    assert entropy > 0.01
    goal = summary["geco_goal"]
    assert goal["rater_entropy"] == pytest.approx(entropy, rel=1e-9)
    assert goal["goal"] == pytest.approx(0.5 * entropy, rel=1e-9) and goal["train_cases"] == len(train)
    text = (tmp_path / "run" / "config.yaml").read_text()
    assert yaml.safe_load(text)["train"]["geco"]["goal"] == pytest.approx(0.5 * entropy, rel=1e-9)
    assert 'train.geco.goal was "auto"' in text
    ckpt = load_checkpoint(tmp_path / "run" / "checkpoints" / "last.pt")
    assert ckpt["config"]["train"]["geco"]["goal"] == pytest.approx(0.5 * entropy, rel=1e-9)
    # resumed with the original config: the same goal, and the run goes on
    fit(load_config("configs/debug.yaml", ["train.steps=2", *FAST, "train.geco.enabled=true",
                                           "train.geco.goal=auto"]), tmp_path / "run", resume=True)
    assert load_checkpoint(tmp_path / "run" / "checkpoints" / "last.pt")["step"] == 2


def test_padded_raters_are_never_training_targets():
    import numpy as np

    from probunet.data import MultiRaterDataset
    from probunet.data.stream import BatchStream
    from probunet.runtime.distributed import DistInfo
    from probunet.models import pick_raters

    image = np.zeros((1, 8, 8), np.float32)
    real = np.ones((1, 8, 8), np.int64)
    pad = np.zeros((3, 8, 8), np.int64)
    items = [{"image": image, "labels": np.concatenate([real, pad]), "case_id": f"c{i}",
              "meta": {"rater_present": [True, False, False, False]}} for i in range(4)]
    items += [{"image": image, "labels": np.ones((4, 8, 8), np.int64), "case_id": f"full{i}",  # 4 real raters
               "meta": {}} for i in range(2)]
    stream = BatchStream(MultiRaterDataset(items), 4, 0, DistInfo())
    for step in range(10):
        image, labels, num_raters = stream.batch(step)
        assert labels.shape[1] == 4 and set(num_raters.tolist()) <= {1, 4}
        for mode in ("random", "all"):
            _, target = pick_raters(image, labels, mode, num_raters=num_raters,
                                    generator=stream.rater_generator(step))
            assert target.shape[0] == (4 if mode == "random" else int(num_raters.sum()))
            assert torch.all(target == 1)  # only real raters (all ones) are ever targets
