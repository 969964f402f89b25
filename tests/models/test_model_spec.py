"""A model is its module with its spec: a small model registered inside this file (its spec, its own
config key, its own exported sampler) goes through train, evaluate, the study and export without any
change to the package. Incomplete specs and unknown models are refused, naming what is missing."""

import json
from pathlib import Path
from typing import List, Optional

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from probunet.cli import main
from probunet.config import ConfigError, ModelConfig, load_config
from probunet.models import (ModelKey, ModelSpec, SegmentationModel, build_model, model_names, pick_raters,
                             register_model, spec_of, unregister_model)
from probunet.models.checkpoint import load_model
from probunet.models.registry import model_specs
from probunet.models.scripted import ScriptSampler, chunk_of, randn_from
from probunet.models.spec import seeded_refusal

REPO = Path(__file__).resolve().parents[2]
DEBUG = str(REPO / "configs" / "debug.yaml")
NAME = "noisy_test"


class NoisySegmenter(SegmentationModel):
    """One 3x3 conv gives logits; sample s adds ``noise_scale`` times standard-normal noise to them."""

    def __init__(self, spatial_dims: int, in_channels: int, num_classes: int, noise_scale: float):
        super().__init__()
        self.init_interface(spatial_dims, in_channels, num_classes, (1,))  # divisor 1
        conv = nn.Conv2d if spatial_dims == 2 else nn.Conv3d
        self.conv = conv(in_channels, num_classes, 3, padding=1)
        self.noise_scale = float(noise_scale)

    def forward(self, image: Tensor) -> Tensor:
        self.check_input(image)
        return self.conv(image)

    def training_loss(self, image, labels, *, step, num_raters=None, generator=None):
        image, target = pick_raters(image, labels, self.loss_settings.rater, num_raters=num_raters,
                                    generator=generator)
        ce = F.cross_entropy(self(image).float(), target.long())
        return {"loss": ce, "ce_mean": ce}

    def prepare_samples(self, image, num_samples, *, generator, noise, context, mean):
        logits = self(image).float()

        def draw_chunk(start, n, out):
            shape = (logits.shape[0], n, *logits.shape[1:])
            eps = torch.randn(shape, generator=generator) if generator is not None else torch.randn(shape)
            return logits.unsqueeze(1) + self.noise_scale * eps.to(logits.device)

        return draw_chunk


class NoisySampler(ScriptSampler):
    """The exported sampler: the same draws, chunk after chunk, from the caller's generator."""

    def __init__(self, model: nn.Module, **kw):
        super().__init__(model, **kw)
        self.conv = model.conv
        self.scale: float = float(model.noise_scale)
        self.chunk: int = chunk_of(model)

    def _sample(self, x: Tensor, num_samples: int, noise: Optional[Tensor], g: Optional[torch.Generator],
                context: Optional[Tensor]) -> Tensor:
        logits = self.conv(x).float()
        chunks: List[Tensor] = []
        for start in range(0, num_samples, self.chunk):
            n = min(self.chunk, num_samples - start)
            eps = randn_from([logits.shape[0], n] + list(logits.shape[1:]), g, x.device)
            chunks.append(logits.unsqueeze(1) + self.scale * eps)
        return torch.cat(chunks, dim=1)


def _check_scale(key: str, value, model_cfg) -> None:
    if not value > 0:
        raise ConfigError(f"config key '{key}': must be > 0, got {value}")


def build_noisy(model_cfg, train_cfg=None) -> NoisySegmenter:
    return NoisySegmenter(int(model_cfg.spatial_dims), int(model_cfg.in_channels), int(model_cfg.num_classes),
                          float(model_cfg.noise_scale))


SPEC = ModelSpec(name=NAME, model_class=NoisySegmenter, build=build_noisy,
                 keys=(ModelKey("noise_scale", float, 1.0, "standard deviation of the logit noise", _check_scale),),
                 samples="latent", sampler=NoisySampler,
                 onnx_refusal=seeded_refusal(NAME, "draws its logit noise inside the network"))


@pytest.fixture
def registered():
    register_model(SPEC)
    try:
        yield SPEC
    finally:
        unregister_model(NAME)
    assert NAME not in model_names() and "noise_scale" not in {f for f in ModelConfig.__dataclass_fields__}


def test_a_model_registered_here_trains_evaluates_studies_and_exports(registered, tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", DEBUG, f"model.name={NAME}", "model.noise_scale=0.5", "train.steps=2", "--out", str(run),
                 "--no-progress"]) == 0
    model, cfg, _ = load_model(run)
    assert isinstance(model, NoisySegmenter) and model.noise_scale == 0.5 and cfg.model.noise_scale == 0.5

    assert main(["evaluate", str(run), "--num-samples", "4", "--no-progress"]) == 0
    summary = json.loads((run / "eval" / "summary.json").read_text())
    assert np.isfinite(summary["metrics"]["ged"]["mean"])

    study = tmp_path / "study"
    assert main(["study", str(run), "--out", str(study), "--num-samples", "4", "--no-progress"]) == 0
    result = json.loads((study / "study.json").read_text())
    (record,) = result["settings"]["models"]
    assert record["model_name"] == NAME
    assert record["kind"] == "latent" and record["maps"] == ["total", "aleatoric"]  # its spec: latent draws
    case = next(iter(result["cases"].values()))
    assert set(case) == {"total", "aleatoric"}

    out = tmp_path / "noisy.ts"
    assert main(["--quiet", "export", str(run), "--format", "torchscript", "--out", str(out)]) == 0
    scripted = torch.jit.load(str(out))
    x = torch.randn(2, 1, 20, 20)
    want = model.sample(x, 5, generator=torch.Generator().manual_seed(3))
    got = scripted(x, generator=torch.Generator().manual_seed(3), num_samples=5)
    assert torch.equal(got, want)  # the model's own sampler, bit for bit

    capsys.readouterr()
    assert main(["export", str(run), "--format", "onnx", "--out", str(tmp_path / "noisy.onnx")]) != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and NAME in err[0] and "draws its logit noise" in err[0]
    assert not (tmp_path / "noisy.onnx").exists()


def test_a_registered_models_key_is_checked_by_its_spec(registered):
    with pytest.raises(ConfigError, match=r"model\.noise_scale.*-1"):
        load_config(DEBUG, [f"model.name={NAME}", "model.noise_scale=-1"])
    assert load_config(DEBUG, [f"model.name={NAME}"]).model.noise_scale == 1.0  # the spec's default


def test_a_model_without_a_sampler_is_refused_by_export_with_its_reason(tmp_path, capsys):
    spec = ModelSpec(name="unexportable_test", model_class=NoisySegmenter, build=build_noisy, samples="latent",
                     keys=SPEC.keys, export_refusal="it is only a test model")
    register_model(spec)
    try:
        from probunet.export.exporter import ExportError, build_sampler, onnx_refusal
        from probunet.models.checkpoint import save_checkpoint

        cfg = load_config(DEBUG, ["model.name=unexportable_test"])
        model = build_model(cfg.model)
        with pytest.raises(ExportError, match="unexportable_test.*only a test model"):
            build_sampler(model)
        assert onnx_refusal(model) == "it is only a test model"
        ckpt = tmp_path / "model.pt"
        save_checkpoint({"model": model.state_dict(), "config": cfg.to_dict(), "step": 0}, ckpt)
        for fmt in ("torchscript", "bundle"):
            capsys.readouterr()
            out = tmp_path / f"out_{fmt}"
            assert main(["export", str(ckpt), "--format", fmt, "--out", str(out)]) != 0
            err = capsys.readouterr().err.strip().splitlines()
            assert len(err) == 1 and "only a test model" in err[0], err
            assert not out.exists() or not any(out.iterdir())  # refused before anything is written
    finally:
        unregister_model("unexportable_test")


@pytest.mark.parametrize("drop, missing", [("samples", "samples"), ("build", "build"),
                                           ("sampler", "sampler"), ("model_class", "model_class")])
def test_an_incomplete_spec_is_refused_naming_the_model_and_the_field(drop, missing):
    fields = dict(name="half_test", model_class=NoisySegmenter, build=build_noisy, samples="latent",
                  sampler=NoisySampler)
    fields[drop] = None
    try:
        with pytest.raises(ValueError, match=rf"'half_test'.*{missing}"):
            register_model(ModelSpec(**fields))
        assert "half_test" not in model_names()
    finally:
        if "half_test" in {s.name for s in model_specs()}:
            unregister_model("half_test")  # a spec wrongly accepted does not leak into the other tests


def test_a_spec_with_an_unknown_kind_of_samples_is_refused():
    with pytest.raises(ValueError, match=r"'odd_test'.*samples: 'guesses'"):
        register_model(ModelSpec(name="odd_test", model_class=NoisySegmenter, build=build_noisy, samples="guesses",
                                 sampler=NoisySampler))


def test_an_unknown_model_is_refused_by_name():
    with pytest.raises(ConfigError, match=r"model\.name.*'no_such_model'"):
        load_config(DEBUG, ["model.name=no_such_model"])
    from probunet.export.exporter import ExportError, build_sampler
    from probunet.inference.uncertainty import model_maps

    stranger = NoisySegmenter(2, 1, 2, 1.0)  # a model whose spec is not registered
    with pytest.raises(ValueError, match="NoisySegmenter.*no registered model spec"):
        spec_of(stranger)
    with pytest.raises(ValueError, match="NoisySegmenter"):
        model_maps(stranger)  # no longer read silently as a latent model
    with pytest.raises(ExportError, match="NoisySegmenter"):
        build_sampler(stranger)


def test_every_shipped_model_has_a_complete_spec():
    names = {s.name for s in model_specs()}
    assert {"prob_unet", "unet", "ensemble", "mc_dropout", "ssn", "hpu_net", "phiseg", "member_ensemble"} <= names
    for spec in model_specs():
        assert spec.check() is spec
    assert "member_ensemble" not in model_names()  # built by the ensemble's builder, not a model.name of its own


def test_a_new_module_in_the_zoo_folder_is_registered_without_an_import_line(tmp_path):
    """The zoo imports every module of its folder: a model module dropped there registers itself."""
    import sys

    import probunet.models.zoo as zoo

    (tmp_path / "dropped_in_test.py").write_text(
        "from probunet.models.spec import ModelSpec\n"
        "from probunet.models.registry import register_model\n"
        "from probunet.models.zoo.unet_baseline import UNetBaseline\n"
        "register_model(ModelSpec(name='dropped_in_test', model_class=UNetBaseline,\n"
        "                         build=lambda m, t=None: UNetBaseline(m), samples='softmax',\n"
        "                         export_refusal='a test model', onnx_refusal='a test model'))\n")
    zoo.__path__.append(str(tmp_path))
    try:
        assert "dropped_in_test" in zoo.import_all()
        assert "dropped_in_test" in model_names()
    finally:
        zoo.__path__.remove(str(tmp_path))
        sys.modules.pop("probunet.models.zoo.dropped_in_test", None)
        if "dropped_in_test" in model_names():
            unregister_model("dropped_in_test")
