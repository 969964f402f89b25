"""Precision: amp resolution per CPU capability, bf16 numerics of every model, channels-last training
and layout-independent checkpoints."""

import copy
import json
import logging
import math
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from probunet import precision
from probunet.models.checkpoint import load_checkpoint
from probunet.config import load_config
from probunet.models import build_model
from probunet.precision import (Precision, amp_dtype, bf16_conv_hazards, guard_bf16_convs, resolve_amp,
                                uses_channels_last)
from probunet.train.trainer import fit, match_param_layout

BF16, FP16 = torch.bfloat16, torch.float16
FAST = ["train.val_every=1000", "train.log_every=2"]


# ----------------------------------------------------------------------------- resolution


@pytest.mark.parametrize("amp,device,capability,cuda_bf16,want", [
    ("auto", "cpu", "amx_bf16", False, BF16),
    ("auto", "cpu", "avx512_bf16", False, BF16),
    ("auto", "cpu", "none", False, None),
    ("auto", "cuda", "none", True, BF16),
    ("auto", "cuda", "none", False, FP16),
    ("bf16", "cpu", "none", False, BF16),  # allowed, with a warning (below)
    ("bf16", "cpu", "amx_bf16", False, BF16),
    ("fp16", "cpu", "amx_bf16", False, FP16),
    ("off", "cpu", "amx_bf16", False, None),
    ("off", "cuda", "none", True, None),
])
def test_amp_resolves_per_device_and_cpu_capability(amp, device, capability, cuda_bf16, want):
    dtype, warning = resolve_amp(amp, device, capability, cuda_bf16)
    assert dtype == want
    slow = amp == "bf16" and device == "cpu" and capability == "none"
    assert (warning is not None) == slow
    if slow:
        assert "slower than fp32" in warning


def test_amp_dtype_asks_torch_for_the_capability(monkeypatch):
    monkeypatch.setattr(precision, "cpu_capability", lambda: "amx_bf16")
    assert amp_dtype("auto", torch.device("cpu")) == BF16
    monkeypatch.setattr(precision, "cpu_capability", lambda: "avx512_bf16")
    assert amp_dtype("auto", torch.device("cpu")) == BF16
    monkeypatch.setattr(precision, "cpu_capability", lambda: "none")
    assert amp_dtype("auto", torch.device("cpu")) is None
    with pytest.raises(ValueError, match="amp must be one of"):
        amp_dtype("fp8", torch.device("cpu"))
    assert precision.cpu_capability.__module__  # the real probe names one of three answers:
    monkeypatch.undo()
    assert precision.cpu_capability() in ("amx_bf16", "avx512_bf16", "none")


def test_bf16_on_a_cpu_without_bf16_units_warns_in_one_line(monkeypatch, caplog):
    monkeypatch.setattr(precision, "cpu_capability", lambda: "none")
    monkeypatch.setattr(precision, "_WARNED", set())
    with caplog.at_level(logging.WARNING, logger="probunet.precision"):
        assert amp_dtype("bf16", torch.device("cpu")) == BF16
        assert amp_dtype("bf16", torch.device("cpu")) == BF16
    lines = [r.getMessage() for r in caplog.records if r.name == "probunet.precision"]
    assert len(lines) == 1 and "\n" not in lines[0] and "slower" in lines[0]


def test_channels_last_goes_with_bf16():
    assert uses_channels_last(BF16) and uses_channels_last(BF16, spatial_dims=3)
    assert not uses_channels_last(None) and not uses_channels_last(FP16)
    assert uses_channels_last(None, device_type="cuda") and not uses_channels_last(None, device_type="cuda",
                                                                                   spatial_dims=3)
    assert not uses_channels_last(BF16, False) and uses_channels_last(None, True)
    assert Precision(BF16, True).label == "bf16+channels_last"
    assert Precision(None, False).label == "fp32" and Precision(BF16, False).label == "bf16"


@pytest.mark.parametrize("capability,want", [("avx512_bf16", "bf16+channels_last"), ("none", "fp32")])
def test_training_resolves_logs_and_records_its_precision(tmp_path, monkeypatch, caplog, capability, want):
    """train.amp=auto: bf16 + channels-last on a CPU with bf16 units (model weights and batch), fp32 elsewhere;
    the precision is logged at the start and written to train_summary.json."""
    from probunet.models import ProbabilisticUNet

    monkeypatch.setattr(precision, "cpu_capability", lambda: capability)
    seen = []
    real = ProbabilisticUNet.training_loss

    def training_loss(self, image, labels, **kw):
        w = self.unet.encoder.levels[1][0].conv.weight
        seen.append((torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else None,
                     image.stride(1) == 1,  # channels-last strides (one channel: both layouts are dense)
                     w.is_contiguous(memory_format=torch.channels_last) and not w.is_contiguous()))
        return real(self, image, labels, **kw)

    monkeypatch.setattr(ProbabilisticUNet, "training_loss", training_loss)
    with caplog.at_level(logging.INFO, logger="probunet.train.trainer"):
        summary = fit(load_config("configs/debug.yaml", ["train.steps=1", *FAST]), tmp_path / "run")
    bf16 = want != "fp32"
    # every forward (the batch-memory probe's included) runs in the resolved precision and layout
    assert seen and set(seen) == {(BF16 if bf16 else None, bf16, bf16)}
    assert summary["precision"] == want
    assert capability in summary["cpu_capability"]
    assert json.loads((tmp_path / "run" / "train_summary.json").read_text())["precision"] == want
    assert any(r.getMessage().startswith(f"precision: {want} ") for r in caplog.records)


def test_3d_training_under_bf16_runs_channels_last_3d(tmp_path, monkeypatch):
    from probunet.models import ProbabilisticUNet

    seen = []
    real = ProbabilisticUNet.training_loss

    def training_loss(self, image, labels, **kw):
        w = self.unet.encoder.levels[1][0].conv.weight
        seen.append((image.stride(1) == 1,
                     w.is_contiguous(memory_format=torch.channels_last_3d) and not w.is_contiguous()))
        return real(self, image, labels, **kw)

    monkeypatch.setattr(ProbabilisticUNet, "training_loss", training_loss)
    cfg = load_config("configs/debug.yaml", ["train.steps=1", "train.amp=bf16", "model.spatial_dims=3",
                                             "data.synthetic.spatial_dims=3", "data.synthetic.size=16",
                                             "train.batch_size=2", "eval.batch_size=1", *FAST])
    summary = fit(cfg, tmp_path / "run")
    assert summary["precision"] == "bf16+channels_last" and seen == [(True, True)]


# ----------------------------------------------------------------------------- numerics of every model

# bf16 keeps 8 significant bits: each rounding has a relative error of at most u = 2^-8. A convolution
# under autocast rounds its input and its weights (products are summed in fp32) and its output: about
# 2u of relative error per layer, independent from layer to layer, so over a path of D layers the
# relative (L2) error of the logits grows like 2u * sqrt(D). These tiny models (features (4, 8), one
# convolution per level) have at most D = 8 layers on a path (the hierarchical ones: encoder, decoder,
# latent heads, likelihood heads), so TOL = 2 * 2^-8 * sqrt(8) ~ 0.022. Measured: 0.003 to 0.009.
# A layer computed wrongly in bf16 (a miscompiled kernel) gives errors of order 1.
U_BF16 = 2.0 ** -8
TOL = 2 * U_BF16 * math.sqrt(8)

ZOO = {"prob_unet": dict(latent_dim=2, fcomb_layers=2, prior="conditional"),
       "unet": dict(sampling="argmax"),  # its logits themselves (pixelwise draws would flip at random)
       "mc_dropout": {}, "ensemble": dict(ensemble_size=2), "ssn": dict(rank=3, mc_samples=4),
       "hpu_net": dict(latent_levels=2), "phiseg": dict(latent_levels=2),
       "ensemble_of_prob_unet": dict(name="ensemble", member="prob_unet", ensemble_size=2, latent_dim=2,
                                     fcomb_layers=2, prior="conditional")}


def zoo_model(key, spatial_dims, norm=None):
    opts = dict(ZOO[key])
    name = opts.pop("name", key)
    torch.manual_seed(0)
    return build_model(SimpleNamespace(name=name, spatial_dims=spatial_dims, in_channels=1, num_classes=2,
                                       features=(4, 8), convs_per_level=1, norm=norm, init="he_normal", **opts),
                       None)


def batch(spatial_dims):
    g = torch.Generator().manual_seed(0)
    size = (32, 32) if spatial_dims == 2 else (8, 8, 8)
    return torch.randn(2, 1, *size, generator=g), torch.randint(0, 2, (2, 3, *size), generator=g)


def rel_err(a, b):
    return float((a.float() - b.float()).norm() / b.float().norm())


@pytest.mark.parametrize("key,norm", [(k, None) for k in ZOO] + [("prob_unet", "instance"), ("prob_unet", "batch")])
@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_bf16_logits_match_fp32_and_loss_terms_stay_fp32(key, norm, spatial_dims):
    model = zoo_model(key, spatial_dims, norm)
    image, labels = batch(spatial_dims)
    model.eval()
    ref = model.sample(image, 3, generator=torch.Generator().manual_seed(1))
    with torch.autocast("cpu", dtype=BF16):
        out = model.sample(image, 3, generator=torch.Generator().manual_seed(1))
    assert out.shape == ref.shape and torch.isfinite(out).all()
    assert rel_err(out, ref) < TOL, (key, rel_err(out, ref))

    model.train()
    torch.manual_seed(5)  # the same posterior draws and dropout masks in both
    terms32 = model.training_loss(image, labels, step=0, generator=torch.Generator().manual_seed(2))
    torch.manual_seed(5)
    with torch.autocast("cpu", dtype=BF16):
        terms = model.training_loss(image, labels, step=0, generator=torch.Generator().manual_seed(2))
    assert set(terms) == set(terms32)
    for k, v in terms.items():
        assert v.dtype == torch.float32, (key, k, v.dtype)  # CE, KL, its floor, the loss: fp32
        got, want = float(v.detach()), float(terms32[k].detach())
        assert abs(got - want) <= TOL * max(abs(want), 1e-3), (key, k)
    terms["loss"].backward()


def test_latent_heads_stay_fp32_under_autocast():
    """The Gaussian heads' mu / log-sigma / sigma and the KL (with its free-bits floor) are fp32."""
    from probunet.models.losses import kl_objective

    model = zoo_model("prob_unet", 2)
    image, labels = batch(2)
    with torch.autocast("cpu", dtype=BF16):
        out = model(image, seg=labels[:, 0])
        floor = kl_objective(out.kl, out.kl_dims, free_bits=0.5)
    for t in (out.prior.base_dist.loc, out.prior.base_dist.scale, out.posterior.base_dist.loc,
              out.posterior.base_dist.scale, out.kl, out.kl_dims, out.z, floor):
        assert t.dtype == torch.float32
    from probunet.models.zoo._common import latent_level

    head = nn.Conv2d(4, 4, 1)
    with torch.autocast("cpu", dtype=BF16):
        mu, sigma, z = latent_level(head, torch.randn(1, 4, 4, 4), None, False, None)
    assert mu.dtype == sigma.dtype == z.dtype == torch.float32


# ----------------------------------------------------------------------------- known torch bf16 conv bugs


@pytest.mark.parametrize("key", list(ZOO))
@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_no_model_has_a_convolution_torch_gets_wrong_in_bf16(key, spatial_dims):
    """Stride-3 convolutions (pytorch#169688) and strided 3D convolutions (AMX with an output axis 1
    wide, pytorch#188426) give wrong bf16 results: probunet's models use stride 1 and pool down."""
    model = zoo_model(key, spatial_dims)
    convs = [m for m in model.modules() if isinstance(m, nn.modules.conv._ConvNd)]
    assert convs and all(tuple(m.stride) == (1,) * spatial_dims for m in convs)
    assert bf16_conv_hazards(model) == []


def test_a_model_with_such_a_convolution_is_guarded(caplog):
    model = nn.Sequential(nn.Conv2d(1, 2, 3, stride=3), nn.Conv3d(2, 2, 3, stride=(1, 2, 1)), nn.Conv2d(2, 2, 3))
    assert bf16_conv_hazards(model) == ["0", "1"]
    cpu = torch.device("cpu")
    with caplog.at_level(logging.INFO, logger="probunet.precision"):
        assert guard_bf16_convs(model, BF16, "auto", cpu, "train.amp") is None
    assert "running in fp32" in caplog.text
    with pytest.raises(ValueError, match="train.amp=bf16: convolution"):
        guard_bf16_convs(model, BF16, "bf16", cpu, "train.amp")
    assert guard_bf16_convs(model, None, "off", cpu) is None
    assert guard_bf16_convs(nn.Conv2d(1, 1, 3), BF16, "bf16", cpu) == BF16


# ----------------------------------------------------------------------------- checkpoints and resume


def _state_equal(a, b):
    return all(torch.equal(a[k], b[k]) for k in a) and set(a) == set(b)


def test_exact_resume_under_bf16_channels_last(tmp_path):
    """train N steps straight == train k, resume to N, under bf16 + channels-last: bit-identical weights
    and Adam moments; the checkpoint holds the standard layout."""
    base = ["train.amp=bf16", "train.checkpoint_every=3", *FAST]
    full = fit(load_config("configs/debug.yaml", ["train.steps=6", *base]), tmp_path / "full")
    assert full["precision"] == "bf16+channels_last"
    fit(load_config("configs/debug.yaml", ["train.steps=3", *base]), tmp_path / "resumed")
    mid = load_checkpoint(tmp_path / "resumed" / "checkpoints" / "last.pt")
    tensors = list(mid["model"].values()) + [v for s in mid["optimizer"]["state"].values() for v in s.values()]
    assert any(t.dim() == 4 for t in tensors) and all(t.is_contiguous() for t in tensors)
    fit(load_config("configs/debug.yaml", ["train.steps=6", *base]), tmp_path / "resumed", resume=True)
    a = load_checkpoint(tmp_path / "full" / "checkpoints" / "last.pt")
    b = load_checkpoint(tmp_path / "resumed" / "checkpoints" / "last.pt")
    assert a["step"] == b["step"] == 6
    assert _state_equal(a["model"], b["model"])
    for i, s in a["optimizer"]["state"].items():
        assert _state_equal(s, b["optimizer"]["state"][i])


@pytest.mark.parametrize("first,then", [(["train.amp=bf16"], ["train.amp=bf16", "train.channels_last=false"]),
                                        (["train.amp=off"], ["train.amp=bf16"]),
                                        (["train.amp=bf16"], ["train.amp=off"])])
def test_a_checkpoint_resumes_under_the_other_layout(tmp_path, monkeypatch, first, then):
    """Saved under one layout, resumed under the other: the weights and Adam's state load bit for bit."""
    from probunet.train import trainer as train_mod

    loaded = {}
    real = train_mod.Trainer._resume_from

    def resume_from(self, ckpt):
        real(self, ckpt)
        loaded["model"] = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
        loaded["opt"] = copy.deepcopy(self.optimizer.state_dict())  # training goes on in place
        loaded["layouts_match"] = all(v.stride() == p.stride() for p in self.params
                                      for v in self.optimizer.state[p].values() if v.shape == p.shape)

    monkeypatch.setattr(train_mod.Trainer, "_resume_from", resume_from)
    fit(load_config("configs/debug.yaml", ["train.steps=2", "train.checkpoint_every=2", *first, *FAST]),
        tmp_path / "run")
    saved = load_checkpoint(tmp_path / "run" / "checkpoints" / "last.pt")
    summary = fit(load_config("configs/debug.yaml", ["train.steps=4", *then, *FAST]), tmp_path / "run",
                  resume=True)
    assert _state_equal(saved["model"], loaded["model"]) and loaded["layouts_match"]
    for i, s in saved["optimizer"]["state"].items():
        assert _state_equal(s, loaded["opt"]["state"][i])
    assert summary["steps"] == 4
    after = load_checkpoint(tmp_path / "run" / "checkpoints" / "last.pt")
    assert all(torch.isfinite(v).all() for v in after["model"].values() if v.is_floating_point())


def test_adam_moments_take_their_parameter_layout():
    """The fused Adam kernel reads a parameter and its moments as flat memory: moments loaded in the
    standard layout for a channels-last parameter must be given the parameter's layout."""
    torch.manual_seed(0)
    w = torch.randn(4, 3, 3, 3).contiguous(memory_format=torch.channels_last)
    g1, g2 = torch.randn(4, 3, 3, 3), torch.randn(4, 3, 3, 3)

    def run(reload):
        p = nn.Parameter(w.clone())
        opt = torch.optim.Adam([p], lr=0.1, fused=True)
        p.grad = g1.contiguous(memory_format=torch.channels_last)
        opt.step()
        if reload:  # what a checkpoint written in the standard layout gives back
            for k, v in opt.state[p].items():
                opt.state[p][k] = v.contiguous()
            match_param_layout(opt)
        p.grad = g2.contiguous(memory_format=torch.channels_last)
        opt.step()
        return p.detach()

    assert torch.equal(run(False), run(True))


# ----------------------------------------------------------------------------- sampling


def test_evaluation_samples_in_fp32_unless_eval_amp_asks(monkeypatch):
    from probunet.config import EvalConfig
    from probunet.inference.sampler import evaluation_sampler, sampling_precision

    monkeypatch.setattr(precision, "cpu_capability", lambda: "amx_bf16")
    model = zoo_model("prob_unet", 3)
    assert EvalConfig().amp == "off"
    assert evaluation_sampler(model, EvalConfig(), "cpu").dtype is None
    assert sampling_precision("off", "cpu") == "float32 (no autocast)"
    sampler = evaluation_sampler(model, EvalConfig(amp="auto"), "cpu")
    assert sampler.dtype == BF16 and sampling_precision("auto", "cpu").startswith("bfloat16 autocast")
    seen = []
    model.unet.register_forward_hook(lambda m, i, o: seen.append((i[0].stride(1) == 1, o.dtype)))
    image = batch(3)[0]
    sampler.sample(["a", "b"], image, 2)
    assert seen[0] == (True, BF16)  # the volumes go in channels-last-3d, the convolutions run in bf16
    w = model.unet.encoder.levels[1][0].conv.weight
    assert w.is_contiguous()  # the sampler leaves the model's own layout alone


def test_benchmark_precision_table(monkeypatch, capsys):
    """scripts/benchmark.py --precisions: the three precisions per section, 2D and 3D, ratios against fp32,
    and the end-to-end rows of two `probunet train` runs."""
    import importlib.util
    from pathlib import Path

    monkeypatch.setattr(precision, "cpu_capability", lambda: "avx512_bf16")
    path = Path(__file__).resolve().parents[2] / "scripts" / "benchmark.py"
    spec = importlib.util.spec_from_file_location("benchmark_under_test", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    args = bench.parse_args(["--device", "cpu", "--precisions", "--features", "4,8", "--size", "16",
                             "--batch-size", "2", "--num-samples", "2", "--latent-dim", "2", "--fcomb-layers", "2",
                             "--size-3d", "8", "--batch-3d", "1", "--repeats", "1", "--warmup", "0",
                             "--e2e-config", "configs/debug.yaml", "--e2e-steps", "2"])
    res = bench.run_precisions(args)
    rows = res["rows"]
    for section in ("train", "sample"):
        got = [r for r in rows if r["section"] == section]
        assert [r["name"].split(", ")[-1] for r in got] == list(bench.PRECISIONS) * 2
        assert [r["note"][:2] for r in got] == ["2D"] * 3 + ["3D"] * 3
        assert all(r["seconds"] > 0 for r in got) and got[0]["value"] == got[3]["value"] == 1.0
    e2e = [r for r in rows if r["section"] == "e2e"]
    assert e2e[0]["name"] == "probunet train, train.amp=off (fp32)"
    assert e2e[1]["name"] in ("probunet train, train.amp=auto (bf16+channels_last)",  # a CPU with bf16 units
                              "probunet train, train.amp=auto (fp32)")  # (the runs are subprocesses)
    assert all(r["images_per_s"] > 0 for r in e2e) and e2e[1]["value"] > 0
    bench.print_report(res)
    assert "bf16+channels_last" in capsys.readouterr().out
