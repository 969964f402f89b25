"""The average of the weights (train.ema_decay): its arithmetic, what the trainer
validates and saves with it, and exact resume."""

import pytest
import torch
from torch import nn

from probunet.models.checkpoint import load_checkpoint, load_model
from probunet.config import ConfigError, load_config
from probunet.train.ema import WeightAverage, decay_at
from probunet.train.trainer import fit

FAST = ["train.val_every=1000", "train.log_every=2"]


def test_decay_ramp_hand_computed():
    assert decay_at(0.99, 0) == pytest.approx(1 / 10)
    assert decay_at(0.99, 8) == pytest.approx(9 / 18)
    assert decay_at(0.99, 10_000) == pytest.approx(0.99)


def test_average_hand_computed_and_integer_buffers_copied():
    m = nn.BatchNorm1d(1)
    with torch.no_grad():
        m.weight.fill_(1.0)
    ema = WeightAverage(m, decay=0.9)
    with torch.no_grad():
        m.weight.fill_(3.0)
    m.num_batches_tracked.fill_(7)
    ema.update(m)  # update 0 decays by 0.1: 0.1 * 1 + 0.9 * 3 = 2.8
    assert float(ema.shadow["weight"]) == pytest.approx(2.8)
    with torch.no_grad():
        m.weight.fill_(5.0)
    ema.update(m)  # update 1 decays by 2/11: 2/11 * 2.8 + 9/11 * 5 = 4.6
    assert float(ema.shadow["weight"]) == pytest.approx(2 / 11 * 2.8 + 9 / 11 * 5.0)
    assert int(ema.shadow["num_batches_tracked"]) == 7
    with ema.applied(m):
        assert float(m.weight.detach()) == pytest.approx(4.6)
    assert float(m.weight.detach()) == 5.0  # the trained weights come back
    with pytest.raises(ValueError, match="decay"):
        WeightAverage(m, 1.0)


def test_config_range():
    with pytest.raises(ConfigError, match="train.ema_decay"):
        load_config("configs/debug.yaml", ["train.ema_decay=1.0"])
    assert load_config("configs/debug.yaml", ["train.ema_decay=0.9"]).train.ema_decay == 0.9


def test_checkpoint_holds_the_average_as_model_and_the_trained_weights(tmp_path):
    fit(load_config("configs/debug.yaml", ["train.steps=4", "train.lr=0.01", "train.ema_decay=0.5", *FAST]),
        tmp_path / "run")
    ckpt = load_checkpoint(tmp_path / "run" / "checkpoints" / "last.pt")
    assert ckpt["ema_updates"] == 4
    differ = [k for k in ckpt["model"] if ckpt["model"][k].is_floating_point()
              and not torch.equal(ckpt["model"][k], ckpt["model_train"][k])]
    assert differ  # the average lags the trained weights
    model, _, _ = load_model(tmp_path / "run" / "checkpoints" / "last.pt")  # what evaluate / predict use
    for k, v in model.state_dict().items():
        assert torch.equal(v, ckpt["model"][k]), k


def test_resume_with_average_equals_uninterrupted(tmp_path):
    base = ["train.steps=6", "train.checkpoint_every=3", "train.ema_decay=0.8", *FAST]
    fit(load_config("configs/debug.yaml", base), tmp_path / "full")
    fit(load_config("configs/debug.yaml", ["train.steps=3", "train.checkpoint_every=3", "train.ema_decay=0.8",
                                           *FAST]), tmp_path / "resumed")
    fit(load_config("configs/debug.yaml", base), tmp_path / "resumed", resume=True)
    a = load_checkpoint(tmp_path / "full" / "checkpoints" / "last.pt")
    b = load_checkpoint(tmp_path / "resumed" / "checkpoints" / "last.pt")
    assert a["ema_updates"] == b["ema_updates"] == 6
    for part in ("model", "model_train"):
        for k in a[part]:
            assert torch.equal(a[part][k], b[part][k]), (part, k)
