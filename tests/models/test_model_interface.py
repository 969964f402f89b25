"""The model interface (training_loss, sample, divisor...), the registry, and the small structure items."""

import re
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from probunet.config import Config, ConfigError
from probunet.models.losses import Geco, beta_schedule, elbo_loss
from probunet.models import (GaussianHead, LossForward, ProbabilisticUNet, SegmentationSampler, build_model,
                             model_names, pick_raters, register_model)

ROOT = Path(__file__).resolve().parents[2]


def tiny(**kw):
    torch.manual_seed(0)
    args = dict(spatial_dims=2, in_channels=1, num_classes=2, features=(4, 8), latent_dim=3, fcomb_layers=2,
                convs_per_level=1)
    args.update(kw)
    return ProbabilisticUNet(**args)


def batch(b=3, a=4, size=8, classes=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, 1, size, size, generator=g), torch.randint(0, classes, (b, a, size, size), generator=g)


def test_prob_unet_meets_the_interface():
    model = tiny()
    assert isinstance(model, SegmentationSampler)
    assert (model.spatial_dims, model.in_channels, model.num_classes, model.divisor) == (2, 1, 2, 2)
    assert model.noise_shape == (3,)


def test_training_loss_is_the_elbo_of_the_rater_the_old_batch_stream_picked():
    model = tiny().configure_loss(beta=2.0, kl_warmup_steps=10)
    image, labels = batch()
    num_raters = torch.tensor([4, 2, 3])
    # the trainer's former path: one rater per image from a CPU generator, then forward + elbo_loss
    g = torch.Generator().manual_seed(123)
    choice = (torch.rand(3, generator=g) * num_raters).long()
    target = labels[torch.arange(3), choice]
    torch.manual_seed(5)
    out = model(image, seg=target)
    old = elbo_loss(out.logits, target, out.kl, beta=beta_schedule(2.0, 4, 10))
    torch.manual_seed(5)
    new = model.training_loss(image, labels, step=4, num_raters=num_raters,
                              generator=torch.Generator().manual_seed(123))
    assert set(new) == set(old)
    for k in old:
        assert torch.equal(new[k], old[k]), k
    assert model.beta_at(4) == pytest.approx(2.0 * 5 / 10)
    new["loss"].backward()
    assert model.fcomb.first.weight.grad is not None


def test_padded_raters_are_never_targets():
    image, labels = batch(b=2, a=3, classes=2)
    labels[:, 2] = 7  # the padded rater: a value no real rater has
    num_raters = torch.tensor([2, 2])
    for s in range(50):
        _, target = pick_raters(image, labels, "random", num_raters=num_raters,
                                generator=torch.Generator().manual_seed(s))
        assert (target != 7).all()
    imgs, target = pick_raters(image, labels, "all", num_raters=torch.tensor([3, 1]))
    assert imgs.shape[0] == target.shape[0] == 4
    assert torch.equal(target[3], labels[1, 0]) and torch.equal(imgs[3], image[1])
    assert torch.equal(target[2], labels[0, 2])
    with pytest.raises(ValueError, match="rater mode"):
        pick_raters(image, labels, "mean")
    with pytest.raises(ValueError, match="labels must be"):
        pick_raters(image, labels[:, 0], "random")


def test_training_loss_with_all_raters_and_geco():
    geco = Geco(goal=0.1)
    model = tiny().configure_loss(rater="all", geco=geco)
    keys = set(model.state_dict())
    image, labels = batch(b=2, a=3)
    terms = model.training_loss(image, labels, step=0, num_raters=torch.tensor([3, 1]))
    assert "geco_lambda" in terms and bool(geco.initialised)
    assert set(model.state_dict()) == keys  # Geco's buffers stay out of the model's checkpoint keys
    assert not any(k.startswith("geco") for k in keys)
    with pytest.raises(ValueError, match="rater must be"):
        model.configure_loss(rater="one")


def test_loss_forward_is_what_ddp_wraps():
    model = tiny()
    image, labels = batch()
    torch.manual_seed(1)
    a = LossForward(model)(image, labels, step=0, generator=torch.Generator().manual_seed(0))
    torch.manual_seed(1)
    b = model.training_loss(image, labels, step=0, generator=torch.Generator().manual_seed(0))
    assert torch.equal(a["loss"], b["loss"])


def test_sample_with_noise_and_context():
    model = tiny().eval()
    image, _ = batch(b=2)
    eps = torch.randn(2, 4, 3)
    a = model.sample(image, 4, noise=eps)
    assert torch.equal(a, model.sample(image, 4, noise=eps))
    ctx = model.sample_context(image)
    torch.testing.assert_close(model.sample(image, 4, noise=eps, context=ctx), a)
    # the context decides z: the prior of another image changes the samples
    other = model.sample_context(image.flip(0))
    assert not torch.allclose(model.sample(image, 4, noise=eps, context=other), a)
    with pytest.raises(ValueError, match="noise must be"):
        model.sample(image, 3, noise=eps)


def test_registry_builds_by_name_and_takes_the_train_settings():
    cfg = Config()
    assert "prob_unet" in model_names()
    model = build_model(cfg.model)  # the config has no model.name yet: prob_unet
    assert isinstance(model, ProbabilisticUNet) and model.loss_settings.geco is None
    cfg.train.beta, cfg.train.kl_warmup_steps, cfg.train.rater = 0.5, 7, "all"
    cfg.train.geco.enabled = True
    trained = build_model(cfg.model, cfg.train)
    ls = trained.loss_settings
    assert (ls.beta, ls.kl_warmup_steps, ls.rater) == (0.5, 7, "all") and isinstance(ls.geco, Geco)
    named = SimpleNamespace(**{**cfg.to_dict()["model"], "name": "nope"})
    with pytest.raises(ConfigError, match="model.name: unknown model 'nope'; known: .*prob_unet"):
        build_model(named)


def test_register_model_refuses_a_second_builder_for_a_name():
    def builder(model_cfg, train_cfg=None):
        return tiny()

    from probunet.models import ModelSpec, unregister_model

    def spec(build):
        return ModelSpec(name="_test_toy", model_class=ProbabilisticUNet, build=build, samples="latent",
                         export_refusal="a test")

    register_model(spec(builder))
    try:
        assert isinstance(build_model(SimpleNamespace(name="_test_toy")), ProbabilisticUNet)
        with pytest.raises(ValueError, match="already registered"):
            register_model(spec(lambda m, t=None: None))
        with pytest.raises(ValueError, match="takes a ModelSpec"):
            register_model(builder)  # a builder alone is not a spec
    finally:
        unregister_model("_test_toy")


def test_gaussian_head_takes_pooled_features_and_leaves_validation_alone():
    from torch.distributions import Distribution

    head = GaussianHead(5, 2)
    before = Distribution._validate_args
    dist = head(torch.randn(3, 5))
    assert dist.batch_shape == (3,) and dist.event_shape == (2,)
    assert dist._validate_args is False and dist.base_dist._validate_args is False
    assert Distribution._validate_args == before  # the process-wide default is never flipped
    with pytest.raises(ValueError, match="pooled features"):
        head(torch.randn(3, 5, 4, 4))
    out = tiny()(batch()[0], seg=batch()[1][:, 0])
    assert out.prior.base_dist._validate_args is False and out.posterior.base_dist._validate_args is False


def test_data_error_has_its_own_module_and_old_imports_work():
    from probunet.data import DataError as a
    from probunet.data.errors import DataError as b
    from probunet.data.io import DataError as c
    from probunet.data.validate import DataError as d

    assert a is b is c is d and issubclass(b, ValueError)


def test_cpu_machinery_lives_in_one_private_module():
    from probunet.models import _cpu, fcomb, unet

    assert unet.cpu_parallel_map is _cpu.cpu_parallel_map and unet.to_channels_last is _cpu.to_channels_last
    assert fcomb._Layers._tiled.__code__.co_names.count("run_tiled_layers") == 1
    src = (ROOT / "probunet" / "models" / "unet.py").read_text()
    assert "ThreadPoolExecutor" not in src and "threading" not in src


def test_no_module_cites_files_users_do_not_have():
    for path in sorted((ROOT / "probunet").rglob("*.py")):
        text = path.read_text(encoding="utf-8")
        assert "DESIGN.md" not in text and "../shared/" not in text, path


def test_pyproject_states_the_real_torch_minimum_and_lists_every_package():
    text = (ROOT / "pyproject.toml").read_text()
    m = re.search(r'"torch>=(\d+)\.(\d+)"', text)
    assert m and (int(m.group(1)), int(m.group(2))) >= (2, 6)  # torch.nn.utils.get_total_norm is 2.6
    assert hasattr(torch.nn.utils, "get_total_norm")
    block = re.search(r"packages = \[([^\]]*)\]", text).group(1)
    listed = {name.strip().strip('"') for name in block.split(",") if name.strip()}
    on_disk = {".".join(p.parent.relative_to(ROOT).parts) for p in (ROOT / "probunet").rglob("__init__.py")}
    # folders of package data without an __init__.py are packages to setuptools too
    on_disk |= {".".join(p.parent.relative_to(ROOT).parts) for p in (ROOT / "probunet").rglob("*.csv")}
    on_disk |= {"probunet." + ".".join(p.parent.relative_to(ROOT).parts) for p in (ROOT / "configs").rglob("*.yaml")}
    assert on_disk <= listed, f"packages missing from pyproject.toml: {sorted(on_disk - listed)}"
    assert {"probunet.configs", "probunet.configs.zoo", "probunet.data.manifests"} <= listed


def test_shipped_configs_are_found_from_a_source_checkout(tmp_path, monkeypatch):
    from probunet.runtime.resources import config_dir, config_names, config_path, resolve_config

    assert config_dir() == ROOT / "configs"
    assert "synthetic.yaml" in config_names()
    assert config_path("synthetic") == ROOT / "configs" / "synthetic.yaml"
    monkeypatch.chdir(tmp_path)  # from another folder, the README's relative path still resolves
    assert resolve_config("configs/synthetic.yaml") == ROOT / "configs" / "synthetic.yaml"
    with pytest.raises(FileNotFoundError, match="no shipped config 'nope'.*synthetic.yaml"):
        config_path("nope")
    with pytest.raises(FileNotFoundError, match="config not found: other.yaml"):
        resolve_config("other.yaml")


def test_shipped_configs_are_found_in_an_installed_package(tmp_path, monkeypatch):
    """An installed probunet has probunet/configs/*.yaml (package data) and no repository around it."""
    import probunet.runtime.resources as resources

    pkg = tmp_path / "site-packages" / "probunet"
    (pkg / "configs").mkdir(parents=True)
    (pkg / "configs" / "synthetic.yaml").write_text("model: {}\n")
    monkeypatch.setattr(resources, "_PACKAGE", pkg)
    assert resources.config_path("synthetic.yaml") == pkg / "configs" / "synthetic.yaml"
    (pkg / "configs" / "synthetic.yaml").unlink()
    with pytest.raises(FileNotFoundError, match="shipped configs are missing"):
        resources.config_dir()
