import pytest

from probunet.config import ConfigError, apply_overrides, load_config


def write(tmp_path, text):
    p = tmp_path / "c.yaml"
    p.write_text(text)
    return p


def test_defaults_match_the_paper():
    cfg = load_config()
    assert cfg.model.features == (32, 64, 128, 192)
    assert cfg.model.latent_dim == 6
    assert cfg.model.fcomb_layers == 4
    assert cfg.model.prior == "conditional"
    assert cfg.train.lr == 1e-4


@pytest.mark.parametrize("text, key", [
    ("model:\n  latnt_dim: 3\n", "model.latnt_dim"),
    ("trian:\n  steps: 3\n", "trian"),
    ("train:\n  geco:\n    goall: 1\n", "train.geco.goall"),
])
def test_unknown_key_is_named(tmp_path, text, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config(write(tmp_path, text))


def test_unknown_override_key_is_named():
    with pytest.raises(ConfigError, match=r"train\.stepz"):
        load_config(None, ["train.stepz=3"])


@pytest.mark.parametrize("override, key", [
    ("train.steps=abc", "train.steps"),
    ("model.prior=uniform", "model.prior"),
    ("data.format=dicomdir", "data.format"),
    ("train.amp=fp8", "train.amp"),
    ("model.spatial_dims=4", "model.spatial_dims"),
    ("train.geco.goal=fast", "train.geco.goal"),
    ("train.geco.goal=-0.1", "train.geco.goal"),
    ("train.geco.goal=[1]", "train.geco.goal"),
    ("train.geco.goal_scale=0", "train.geco.goal_scale"),
])
def test_bad_values_name_the_key(override, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config(None, [override])


def test_overrides_are_typed_and_nested(tmp_path):
    cfg = load_config(write(tmp_path, "train:\n  steps: 10\n"),
                      ["train.steps=20", "model.features=[4, 8]", "train.amp=off", "data.synthetic.size=32"])
    assert cfg.train.steps == 20
    assert cfg.model.features == (4, 8)
    assert cfg.train.amp == "off"
    assert cfg.data.synthetic.size == 32


def test_overrides_do_not_mutate_input():
    data = {"train": {"steps": 1}}
    out = apply_overrides(data, ["train.steps=2"])
    assert data["train"]["steps"] == 1 and out["train"]["steps"] == 2


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(write(tmp_path, "model: [unclosed\n"))


def test_real_data_format_needs_path():
    with pytest.raises(ConfigError, match=r"data\.path"):
        load_config(None, ["data.format=qubiq"])


def test_round_trip_through_dict():
    from probunet.config import from_dict

    cfg = load_config(None, ["model.features=[4,8]", "train.geco.enabled=true"])
    again = from_dict(cfg.to_dict())
    assert again == cfg


def test_geco_goal_is_auto_or_a_number():
    assert load_config(None, ["train.geco.goal=auto"]).train.geco.goal == "auto"
    assert load_config(None, ["train.geco.goal=AUTO"]).train.geco.goal == "auto"
    assert load_config(None, ["train.geco.goal=0.2"]).train.geco.goal == 0.2
    assert load_config(None, ["train.geco.goal='0.3'"]).train.geco.goal == 0.3
    assert load_config(None, ["train.geco.goal_scale=0.25"]).train.geco.goal_scale == 0.25


def test_every_shipped_config_loads():
    from pathlib import Path

    root = Path(__file__).resolve().parents[1] / "configs"
    paths = sorted(root.rglob("*.yaml"))
    assert any(p.parent.name == "lidc" for p in paths)  # sub-folders too (configs/zoo/lidc)
    for path in paths:
        load_config(path)
