"""Configuration: dataclasses, YAML loading and dotted command-line overrides.

A config is plain data (YAML). Sections: ``model``, ``data``, ``train``, ``eval``.
Unknown keys are errors that name the key, so a typo never silently falls back
to a default.
"""

from __future__ import annotations

import copy
import dataclasses
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import yaml


class ConfigError(ValueError):
    """A config file or override is invalid. The message names the key or file."""


@dataclass
class ModelConfig:
    spatial_dims: int = 2
    in_channels: int = 1
    num_classes: int = 2
    features: tuple = (32, 64, 128, 192)
    latent_dim: int = 6
    fcomb_layers: int = 4
    prior: str = "conditional"  # conditional | standard
    convs_per_level: int = 3
    norm: Optional[str] = None  # None (reference code) | batch | instance | group
    init: str = "he_normal"  # he_normal (reference code) | torch (PyTorch's default init)


@dataclass
class SyntheticConfig:
    num_cases: int = 400
    size: int = 64
    spatial_dims: int = 2
    num_raters: int = 4
    seed: int = 0


@dataclass
class SplitConfig:
    # fractions: test_fraction of all patients/series to test, then val_fraction of the rest
    # to validation (the LIDC papers' protocol, with a fixed seed). file: a user's split.
    protocol: str = "fractions"  # fractions | file | release (lidc_crops: the release's own folders)
    seed: int = 0
    test_fraction: float = 0.2
    val_fraction: float = 0.2
    file: Optional[str] = None  # CSV (case_id,split) or JSON {"train": [...], ...} of case or patient ids
    unlisted: str = "error"  # split file: a case not listed is an error | ignore (dropped, logged)

    def __post_init__(self):
        if self.protocol not in ("fractions", "file", "release"):
            raise ConfigError(f"config key 'data.split.protocol': {self.protocol!r} is not one of: "
                              f"fractions, file, release")
        if self.unlisted not in ("error", "ignore"):
            raise ConfigError(f"config key 'data.split.unlisted': {self.unlisted!r} is not one of: error, ignore")
        if self.file and self.protocol == "fractions":
            self.protocol = "file"
        if self.protocol == "file" and not self.file:
            raise ConfigError("config key 'data.split.file': required for data.split.protocol=file")
        for key in ("test_fraction", "val_fraction"):
            v = getattr(self, key)
            if not 0.0 <= v < 1.0:
                raise ConfigError(f"config key 'data.split.{key}': must be in [0, 1), got {v}")


@dataclass
class AugmentConfig:
    enabled: bool = False
    flip: bool = True
    rot90: bool = True
    affine: bool = False
    affine_rotate_deg: float = 10.0
    affine_scale: float = 0.1
    intensity: bool = False
    intensity_shift: float = 0.1
    intensity_scale: float = 0.1
    prob: float = 0.5  # probability of each random transform


@dataclass
class DataConfig:
    format: str = "synthetic"  # synthetic | lidc_pickle | lidc_crops | qubiq | folder
    path: Optional[str] = None  # lidc_pickle: a .pickle file or a folder of them
    num_raters: Optional[int] = None  # expected raters A; None: the most found in any case
    missing_raters: str = "pad"  # pad (empty masks) | error
    task: int = 1  # qubiq task number
    image_pattern: Optional[str] = None  # folder format: glob with {case}, relative to data.path
    mask_pattern: Optional[str] = None  # folder format: glob with {case} (and optionally {rater})
    # Centre crop (zero-padded where smaller) to a common size: an int for every spatial
    # axis or a list per axis. lidc_crops: 128 as in the papers (the release is 180x180).
    crop_size: Any = None
    normalize: str = "none"  # none | zscore | ct_window
    ct_window: tuple = (-1000.0, 400.0)
    binarize: bool = False  # rater masks: every value > 0 becomes 1 (masks stored as 0/255)
    check_geometry: bool = True  # masks must share the image's spacing/origin/direction
    pickle_files: Optional[tuple] = None  # lidc_pickle: file names under data.path (default: all *.pickle)
    group_pattern: Optional[str] = None  # regex on the case id whose first group is the patient id
    num_workers: int = 0
    synthetic: SyntheticConfig = field(default_factory=SyntheticConfig)
    split: SplitConfig = field(default_factory=SplitConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)

    def __post_init__(self):
        self.crop_size = _crop_size(self.crop_size)
        if len(self.ct_window) != 2 or float(self.ct_window[0]) >= float(self.ct_window[1]):
            raise ConfigError(f"config key 'data.ct_window': expected [low, high] with low < high, "
                              f"got {list(self.ct_window)}")
        if self.num_raters is not None and self.num_raters < 1:
            raise ConfigError("config key 'data.num_raters': must be >= 1 (or null to infer)")
        if self.group_pattern:
            import re

            try:
                re.compile(self.group_pattern)
            except re.error as exc:
                raise ConfigError(f"config key 'data.group_pattern': not a valid regular expression ({exc})") \
                    from None


def _crop_size(value):
    """None, a positive int, or a tuple of positive ints (one per spatial axis)."""
    if value is None or (isinstance(value, str) and value.lower() in ("null", "none", "~", "")):
        return None
    if isinstance(value, str):
        try:
            value = yaml.safe_load(value)
        except yaml.YAMLError:
            pass
    values = value if isinstance(value, (list, tuple)) else [value]
    out = []
    for v in values:
        if isinstance(v, bool) or not isinstance(v, (int, float)) or v != int(v) or int(v) < 1:
            raise ConfigError(f"config key 'data.crop_size': expected a positive integer or a list of them "
                              f"(one per spatial axis), got {value!r}")
        out.append(int(v))
    if not 1 <= len(out) <= 3:
        raise ConfigError(f"config key 'data.crop_size': expected 1 to 3 sizes, got {value!r}")
    return out[0] if not isinstance(value, (list, tuple)) else tuple(out)


@dataclass
class GecoConfig:
    enabled: bool = False
    goal: float = 0.5  # target per-pixel mean CE (the constraint kappa)
    alpha: float = 0.99  # moving-average rate of the constraint
    step_size: float = 0.01  # Lagrange multiplier update rate
    lambda_init: float = 1.0
    lambda_min: float = 1e-3
    lambda_max: float = 1e4


@dataclass
class TrainConfig:
    steps: int = 2000
    batch_size: int = 16
    lr: float = 1e-4
    weight_decay: float = 0.0
    amp: str = "auto"  # auto | bf16 | fp16 | off
    seed: int = 0
    beta: float = 1.0
    kl_warmup_steps: int = 0
    free_bits: float = 0.0  # KL floor in nats per latent dimension (batch mean); 0: off
    rater: str = "random"  # random | all
    grad_clip: Optional[float] = None
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    channels_last: Optional[bool] = None  # None: on for 2D models on a GPU (faster cuDNN convs); 3D: ignored
    compile: bool = False  # torch.compile the training model; falls back to eager with a warning
    compile_mode: str = "default"  # torch.compile mode: default | reduce-overhead (CUDA graphs) | max-autotune
    cudnn_benchmark: bool = True  # CUDA: let cuDNN time its conv algorithms for the (fixed) input shapes
    log_every: int = 25
    val_every: int = 500
    val_cases: int = 32
    val_samples: int = 16
    checkpoint_every: int = 500
    max_bad_steps: int = 10
    geco: GecoConfig = field(default_factory=GecoConfig)

    def __post_init__(self):
        modes = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
        if self.compile_mode not in modes:
            raise ConfigError(f"config key 'train.compile_mode': {self.compile_mode!r} is not one of: {', '.join(modes)}")


@dataclass
class EvalConfig:
    num_samples: int = 100
    split: str = "test"
    seed: int = 0
    batch_size: int = 8
    sample_chunk: int = 32
    empty_iou: float = 1.0  # IoU of two empty masks: 1.0 (PHiSeg/SSN) or nan (Kohl 2018)
    num_true_references: int = 32  # synthetic data only: fresh raters from the truth


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def to_dict(self) -> dict:
        return _to_plain(dataclasses.asdict(self))


def _to_plain(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: _to_plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_to_plain(v) for v in obj]
    return obj


def _field_types(cls) -> dict:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Convert ``value`` to the annotated type ``tp`` or raise ConfigError naming ``key``."""
    origin = typing.get_origin(tp)
    if origin is typing.Union:  # Optional[X]
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None or (isinstance(value, str) and value.lower() in ("null", "none", "~")):
            return None
        return _coerce(value, args[0], key)
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "1", "0"):
            return value.lower() in ("true", "yes", "1")
        raise ConfigError(f"config key '{key}': expected true/false, got {value!r}")
    if tp is int:
        if isinstance(value, bool):
            raise ConfigError(f"config key '{key}': expected an integer, got {value!r}")
        try:
            f = float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"config key '{key}': expected an integer, got {value!r}") from None
        if f != int(f):
            raise ConfigError(f"config key '{key}': expected an integer, got {value!r}")
        return int(f)
    if tp is float:
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"config key '{key}': expected a number, got {value!r}") from None
    if tp is str:
        if isinstance(value, bool):  # YAML 1.1 reads off/no/false as False
            return "off" if not value else "on"
        if isinstance(value, (dict, list)):
            raise ConfigError(f"config key '{key}': expected a string, got {value!r}")
        return str(value)
    if tp is tuple:
        if isinstance(value, str):
            value = yaml.safe_load(value)
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"config key '{key}': expected a list, got {value!r}")
        return tuple(value)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"config section '{key}': expected a mapping, got {value!r}")
        return _build(tp, value, key)
    return value


def _build(cls, data: dict, prefix: str = ""):
    types = _field_types(cls)
    kwargs = {}
    for k, v in data.items():
        full = f"{prefix}.{k}" if prefix else str(k)
        if k not in types:
            known = ", ".join(sorted(types))
            raise ConfigError(f"unknown config key '{full}' (known keys here: {known})")
        kwargs[k] = _coerce(v, types[k], full)
    return cls(**kwargs)


_CHOICES = {
    "model.prior": ("conditional", "standard"),
    "model.norm": (None, "batch", "instance", "group"),
    "model.init": ("he_normal", "torch"),
    "data.format": ("synthetic", "lidc_pickle", "lidc_crops", "qubiq", "folder"),
    "data.missing_raters": ("pad", "error"),
    "data.normalize": ("none", "zscore", "ct_window"),
    "train.amp": ("auto", "bf16", "fp16", "off"),
    "train.rater": ("random", "all"),
    "eval.split": ("train", "val", "test"),
}


def validate(cfg: Config) -> Config:
    """Check value ranges and choices; raise ConfigError naming the key."""
    for key, choices in _CHOICES.items():
        section, name = key.split(".")
        value = getattr(getattr(cfg, section), name)
        if value not in choices:
            shown = ", ".join(str(c) for c in choices)
            raise ConfigError(f"config key '{key}': {value!r} is not one of: {shown}")
    m = cfg.model
    if m.spatial_dims not in (2, 3):
        raise ConfigError(f"config key 'model.spatial_dims': must be 2 or 3, got {m.spatial_dims}")
    if m.num_classes < 2:
        raise ConfigError("config key 'model.num_classes': must be >= 2 (background + foreground)")
    if len(m.features) < 1 or any(int(f) <= 0 for f in m.features):
        raise ConfigError(f"config key 'model.features': expected positive channel counts, got {m.features}")
    m.features = tuple(int(f) for f in m.features)
    if m.latent_dim < 1:
        raise ConfigError("config key 'model.latent_dim': must be >= 1")
    if m.fcomb_layers < 1:
        raise ConfigError("config key 'model.fcomb_layers': must be >= 1")
    t = cfg.train
    for key in ("steps", "batch_size"):
        if getattr(t, key) < 1:
            raise ConfigError(f"config key 'train.{key}': must be >= 1")
    if t.lr <= 0:
        raise ConfigError("config key 'train.lr': must be > 0")
    if t.beta < 0:
        raise ConfigError("config key 'train.beta': must be >= 0")
    if not t.free_bits >= 0:
        raise ConfigError("config key 'train.free_bits': must be >= 0 (nats per latent dimension)")
    if cfg.eval.num_samples < 1:
        raise ConfigError("config key 'eval.num_samples': must be >= 1")
    if cfg.data.format != "synthetic" and not cfg.data.path:
        raise ConfigError(f"config key 'data.path': required for data.format={cfg.data.format}")
    return cfg


def from_dict(data: Optional[dict]) -> Config:
    data = data or {}
    if not isinstance(data, dict):
        raise ConfigError("config: expected a mapping with sections model, data, train, eval")
    return validate(_build(Config, data))


def parse_override(text: str) -> tuple[list[str], Any]:
    if "=" not in text:
        raise ConfigError(f"override '{text}': expected key=value, for example train.steps=100")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigError(f"override '{text}': empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError:
        value = raw
    return key.split("."), value


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """Apply ``section.key=value`` overrides to a raw config dict (values parsed as YAML)."""
    data = copy.deepcopy(data or {})
    for text in overrides:
        path, value = parse_override(text)
        node = data
        for part in path[:-1]:
            nxt = node.get(part)
            if nxt is None:
                nxt = node[part] = {}
            if not isinstance(nxt, dict):
                raise ConfigError(f"override '{text}': '{part}' is not a section")
            node = nxt
        node[path[-1]] = value
    return data


def load_yaml(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        with open(path, encoding="utf-8") as fh:
            data = yaml.safe_load(fh)
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {path}: not valid YAML ({exc.__class__.__name__})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path}: expected a mapping with sections model, data, train, eval")
    return data


def load_config(path: str | Path | None = None, overrides: Optional[list[str]] = None) -> Config:
    """Load a YAML config, apply dotted overrides, validate."""
    data = load_yaml(path) if path is not None else {}
    data = apply_overrides(data, overrides or [])
    try:
        return from_dict(data)
    except ConfigError as exc:
        if path is not None:
            raise ConfigError(f"{path}: {exc}") from None
        raise


def save_config(cfg: Config, path: str | Path) -> None:
    from .utils import atomic_write_text

    atomic_write_text(path, yaml.safe_dump(cfg.to_dict(), sort_keys=False))
