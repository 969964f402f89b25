"""Configuration: dataclasses, YAML loading and dotted command-line overrides.

A config is plain data (YAML). Sections: ``model``, ``data``, ``train``, ``eval``.
Unknown keys are errors that name the key, so a typo never silently falls back
to a default.

This module imports no model: the ``model`` section's checks (its keys' ranges,
the model's name and its size, estimated before anything is built) belong to
the model registry, :mod:`probunet.models.registry`, which adds them to
:func:`validate` with :func:`register_validator` when :mod:`probunet.models` is
imported (importing any part of probunet imports it).
"""

from __future__ import annotations

import copy
import dataclasses
import math
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import yaml

from .errors import ConfigError  # noqa: F401  (re-exported: ``from probunet.config import ConfigError``)


@dataclass(init=False, eq=False, repr=False)
class ModelConfig:
    """The ``model`` section: the keys every model reads, declared here, and each model's own keys,
    declared by its spec (:class:`probunet.models.spec.ModelSpec`) and added with :func:`add_model_key`
    when the model is registered. The section is flat: every registered key is valid whatever
    ``model.name`` is (a model reads its own keys and ignores the others)."""

    name: str = "prob_unet"  # a registered model (probunet.models.model_names())
    spatial_dims: int = 2
    in_channels: int = 1
    num_classes: int = 2
    features: tuple = (32, 64, 128, 192)
    convs_per_level: int = 3
    norm: Optional[str] = None  # None (reference code) | batch | instance | group
    init: str = "he_normal"  # he_normal (reference code) | torch (PyTorch's default init)

    def __init__(self, **values):
        for f in dataclasses.fields(self):
            if f.name in values:
                value = values.pop(f.name)
            elif f.default_factory is not dataclasses.MISSING:
                value = f.default_factory()
            else:
                value = f.default
            setattr(self, f.name, value)
        if values:
            raise TypeError(f"ModelConfig: unknown model key(s) {', '.join(sorted(values))}; registered: "
                            f"{', '.join(f.name for f in dataclasses.fields(self))}")

    def __eq__(self, other) -> bool:
        if other.__class__ is not self.__class__:
            return NotImplemented
        return all(getattr(self, f.name) == getattr(other, f.name) for f in dataclasses.fields(self))

    def __repr__(self) -> str:
        return "ModelConfig(" + ", ".join(f"{f.name}={getattr(self, f.name)!r}" for f in dataclasses.fields(self)) + ")"


_SHARED_MODEL_KEYS = frozenset(f.name for f in dataclasses.fields(ModelConfig))


def add_model_key(name: str, kind: Any, default: Any) -> None:
    """Declare the ``model.<name>`` key of type ``kind`` (int, float, str, bool, tuple or Optional[...])
    with ``default``: a field of :class:`ModelConfig` from now on. Declaring a key again with the same
    type and default is a no-op (two models may read one key); with another is a ValueError."""
    fields = ModelConfig.__dataclass_fields__
    if name in fields:
        old = fields[name]
        if name in _SHARED_MODEL_KEYS or old.type != kind or old.default != default:
            raise ValueError(f"model key {name!r} is already declared (type {old.type!r}, default "
                             f"{old.default!r}); cannot declare it as type {kind!r}, default {default!r}")
        return
    if not name.isidentifier() or name.startswith("_"):
        raise ValueError(f"model key {name!r}: not a valid key name")
    declared = dataclasses.make_dataclass("_Key", [(name, kind, field(default=default))])
    fields[name] = declared.__dataclass_fields__[name]
    ModelConfig.__annotations__[name] = kind


def remove_model_key(name: str) -> None:
    """Withdraw a key declared with :func:`add_model_key` (the shared keys stay)."""
    if name in _SHARED_MODEL_KEYS:
        raise ValueError(f"model key {name!r} is shared by every model; it cannot be removed")
    ModelConfig.__dataclass_fields__.pop(name, None)
    ModelConfig.__annotations__.pop(name, None)


def model_key_default(name: str) -> Any:
    """The default of the ``model.<name>`` key (KeyError: no such key is declared)."""
    return ModelConfig.__dataclass_fields__[name].default


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
            raise ConfigError(f"config key 'data.split.protocol': {shown(self.protocol)} is not one of: "
                              f"fractions, file, release")
        if self.unlisted not in ("error", "ignore"):
            raise ConfigError(f"config key 'data.split.unlisted': {shown(self.unlisted)} is not one of: error, ignore")
        if self.file and self.protocol == "fractions":
            self.protocol = "file"
        if self.protocol == "file" and not self.file:
            raise ConfigError("config key 'data.split.file': required for data.split.protocol=file")
        for key in ("test_fraction", "val_fraction"):
            v = getattr(self, key)
            if not 0.0 <= v < 1.0:
                raise ConfigError(f"config key 'data.split.{key}': must be in [0, 1), got {shown(v)}")


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
    format: str = "synthetic"  # a dataset layout of probunet.data.readers (synthetic, folder, ...)
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
    max_voxels: int = 2**28  # the largest image (voxels x components) a header may claim; checked before reading
    allow_external_data_files: bool = False  # .mhd/.nhdr data files outside the header's folder
    group_pattern: Optional[str] = None  # regex on the case id whose first group is the patient id
    num_workers: int = 0
    # Whole scans (see docs/volumes.md): train on random patches of this size (int or one per
    # axis) read from a preprocessed, memory-mapped cache; None: whole (cropped) cases in memory.
    patch_size: Any = None
    foreground_oversample: float = 1 / 3  # share of patches centred on a voxel some rater marked
    spacing: Any = None  # resample to this voxel spacing (list per axis) or "median" of the cases; None: as read
    cache_dir: Optional[str] = None  # the preprocessed cache's root (None: $PROBUNET_CACHE or ~/.cache/probunet)
    synthetic: SyntheticConfig = field(default_factory=SyntheticConfig)
    split: SplitConfig = field(default_factory=SplitConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)

    def __post_init__(self):
        self.crop_size = _crop_size(self.crop_size)
        self.patch_size = _crop_size(self.patch_size, "data.patch_size")
        self.spacing = _spacing(self.spacing)
        try:
            window = [float(v) for v in self.ct_window]
        except (TypeError, ValueError, OverflowError):
            window = None
        if window is None or len(window) != 2 or not all(math.isfinite(v) for v in window) or window[0] >= window[1]:
            raise ConfigError(f"config key 'data.ct_window': expected [low, high] with low < high, "
                              f"got {shown(self.ct_window)}")
        if self.num_raters is not None and self.num_raters < 1:
            raise ConfigError("config key 'data.num_raters': must be >= 1 (or null to infer)")
        if self.group_pattern:
            import re

            try:
                re.compile(self.group_pattern)
            except re.error as exc:
                raise ConfigError(f"config key 'data.group_pattern': not a valid regular expression ({exc})") \
                    from None


def _spacing(value):
    """``data.spacing``: None, ``"median"`` or a tuple of positive numbers (one per spatial axis)."""
    if value is None or (isinstance(value, str) and value.lower() in ("null", "none", "~", "")):
        return None
    if isinstance(value, str) and value.strip().lower() != "median":
        try:
            value = yaml.safe_load(value)
        except yaml.YAMLError:
            pass
    if isinstance(value, str) and value.strip().lower() == "median":
        return "median"
    values = value if isinstance(value, (list, tuple)) else [value]
    try:
        out = tuple(float(v) for v in values if not isinstance(v, bool))
    except (TypeError, ValueError):
        out = ()
    if len(out) != len(values) or not 1 <= len(out) <= 3 or not all(math.isfinite(v) and v > 0 for v in out):
        raise ConfigError(f"config key 'data.spacing': expected \"median\" or 1 to 3 positive numbers "
                          f"(one per spatial axis), got {value!r}")
    return out


def _crop_size(value, key: str = "data.crop_size"):
    """None, a positive int, or a tuple of positive ints (one per spatial axis)."""
    if value is None or (isinstance(value, str) and value.lower() in ("null", "none", "~", "")):
        return None
    if isinstance(value, str):
        try:
            value = yaml_load(value)
        except (yaml.YAMLError, ValueError, RecursionError):
            pass
    values = value if isinstance(value, (list, tuple)) else [value]
    out = []
    for v in values:
        if isinstance(v, bool) or not isinstance(v, (int, float)) or v != int(v) or int(v) < 1:
            raise ConfigError(f"config key '{key}': expected a positive integer or a list of them "
                              f"(one per spatial axis), got {shown(value)}")
        out.append(int(v))
    if not 1 <= len(out) <= 3:
        raise ConfigError(f"config key '{key}': expected 1 to 3 sizes, got {shown(value)}")
    return out[0] if not isinstance(value, (list, tuple)) else tuple(out)


@dataclass
class GecoConfig:
    enabled: bool = False
    # target per-pixel mean CE (the constraint kappa): a number, or "auto": goal_scale x the mean
    # per-pixel entropy of the raters' label frequency over the training cases, resolved by
    # probunet train when the run starts (probunet.models.losses.rater_entropy) and written into its config
    goal: Any = 0.5
    goal_scale: float = 0.5  # goal "auto": the goal as a multiple of that entropy
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
    lr_schedule: str = "constant"  # constant | cosine (from train.lr down to lr * lr_final_fraction at train.steps)
    lr_final_fraction: float = 0.0  # cosine: the learning rate of the last step, as a fraction of train.lr
    weight_decay: float = 0.0
    amp: str = "auto"  # auto (bf16 on a GPU or a CPU with bf16 units, else fp16 / fp32) | bf16 | fp16 | off
    seed: int = 0
    beta: float = 1.0
    kl_warmup_steps: int = 0
    free_bits: float = 0.0  # KL floor in nats per latent dimension (batch mean); 0: off
    kl_balance: Optional[float] = None  # KL balancing: the prior's share in [0, 1]; None: off
    ema_decay: Optional[float] = None  # average of the weights, sampled and saved as "model"; None: off
    rater: str = "random"  # random | all
    grad_clip: Optional[float] = None
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    channels_last: Optional[bool] = None  # None: on with bf16 (CPU and GPU) and for 2D models on a GPU
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
            raise ConfigError(f"config key 'train.compile_mode': {shown(self.compile_mode)} is not one of: {', '.join(modes)}")


@dataclass
class EvalConfig:
    num_samples: int = 100
    split: str = "test"
    seed: int = 0
    batch_size: int = 8
    sample_chunk: int = 32
    amp: str = "off"  # autocast of validation and evaluation sampling: off (fp32) | auto | bf16 | fp16
    empty_iou: float = 1.0  # IoU of two empty masks: 1.0 (PHiSeg/SSN) or nan (Kohl 2018)
    num_true_references: int = 32  # synthetic data only: fresh raters from the truth


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def to_dict(self) -> dict:
        return to_plain(dataclasses.asdict(self))


def to_plain(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: to_plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_plain(v) for v in obj]
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
        raise ConfigError(f"config key '{key}': expected true/false, got {shown(value)}")
    if tp is int:
        return _to_int(value, key)
    if tp is float:
        if isinstance(value, bool):
            raise ConfigError(f"config key '{key}': expected a number, got {shown(value)}")
        try:
            return float(value)
        except (TypeError, ValueError, OverflowError):
            raise ConfigError(f"config key '{key}': expected a number, got {shown(value)}") from None
    if tp is str:
        if isinstance(value, bool):  # YAML 1.1 reads off/no/false as False
            return "off" if not value else "on"
        if isinstance(value, (dict, list)):
            raise ConfigError(f"config key '{key}': expected a string, got {shown(value)}")
        return str(value)
    if tp is tuple:
        if isinstance(value, str):
            try:
                value = yaml_load(value)
            except (yaml.YAMLError, ValueError, RecursionError):
                raise ConfigError(f"config key '{key}': expected a list, got {shown(value)}") from None
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"config key '{key}': expected a list, got {shown(value)}")
        return tuple(value)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"config section '{key}': expected a mapping, got {shown(value)}")
        return _build(tp, value, key)
    return value


def _to_int(value: Any, key: str) -> int:
    """An integer from an int, an integral finite float, or their text; else ConfigError naming ``key``."""
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise ConfigError(f"config key '{key}': expected an integer, got {shown(value)}")
    if isinstance(value, int):
        return value
    if isinstance(value, str):
        try:
            return int(value.strip())
        except ValueError:
            pass
        try:
            value = float(value)
        except (ValueError, OverflowError):
            raise ConfigError(f"config key '{key}': expected an integer, got {shown(value)}") from None
    if not math.isfinite(value) or value != int(value):
        raise ConfigError(f"config key '{key}': expected an integer, got {shown(value)}")
    return int(value)


def _short_repr():
    import reprlib

    r = reprlib.Repr()
    r.maxlevel, r.maxdict, r.maxlist, r.maxtuple, r.maxset = 3, 6, 8, 8, 6
    r.maxstring, r.maxother, r.maxlong = 60, 60, 40
    return r


_REPR = _short_repr()


def shown(value: Any) -> str:
    """A short prefix of ``repr(value)``: bounded work and length whatever the value (nested or
    shared containers are cut at a few levels and items, long text and numbers at 80 characters)."""
    try:
        text = _REPR.repr(value)
    except ValueError:  # an int past Python's digit limit
        text = f"<{type(value).__name__} too long to show>"
    return text if len(text) <= 80 else text[:77] + "..."


_shown = shown  # the former name


def _build(cls, data: dict, prefix: str = ""):
    types = _field_types(cls)
    kwargs = {}
    for k, v in data.items():
        full = f"{prefix}.{k}" if prefix else str(k)
        if k not in types:
            known = ", ".join(sorted(types))
            raise ConfigError(f"unknown config key '{shown(full)[1:-1]}' (known keys here: {known})")
        kwargs[k] = _coerce(v, types[k], full)
    return cls(**kwargs)


class LiveChoices:
    """Choices that a registry of a later stage provides, read each time they are used: argparse's
    ``choices=`` and :func:`validate` take it like a tuple, and the earlier stage lists no values
    (the dataset layouts of :mod:`probunet.data.readers`, the output formats of
    :mod:`probunet.data.formats`)."""

    def __init__(self, what: str):
        self.what = what
        self._source: Optional[Callable[[], Any]] = None

    def provide(self, source: Callable[[], Any]) -> None:
        """Read the choices from ``source()`` (an iterable of values) from now on."""
        self._source = source

    def values(self) -> tuple:
        if self._source is None:
            raise RuntimeError(f"the choices of {self.what} are read from a registry that is not loaded")
        return tuple(self._source())

    def __iter__(self):
        return iter(self.values())

    def __contains__(self, value) -> bool:
        return value in self.values()

    def __len__(self) -> int:
        return len(self.values())

    def __repr__(self) -> str:
        return repr(self.values()) if self._source is not None else f"LiveChoices({self.what!r})"


# ``data.format``: the dataset layouts registered in probunet.data.readers (READERS)
DATA_FORMATS = LiveChoices("data.format")

_CHOICES = {
    "model.norm": (None, "batch", "instance", "group"),
    "model.init": ("he_normal", "torch"),
    "data.format": DATA_FORMATS,
    "data.missing_raters": ("pad", "error"),
    "data.normalize": ("none", "zscore", "ct_window"),
    "train.amp": ("auto", "bf16", "fp16", "off"),
    "eval.amp": ("auto", "bf16", "fp16", "off"),
    "train.rater": ("random", "all"),
    "train.lr_schedule": ("constant", "cosine"),
    "eval.split": ("train", "val", "test"),
}


_DEVICE = re.compile(r"auto|cpu|mps|cuda(:\d+)?")

# Checks run by validate() after the choices, each given the whole Config: the model registry adds
# the model section's (probunet.models.registry), so this module never imports a model.
_VALIDATORS: list[Callable[["Config"], None]] = []


def register_validator(check: Callable[["Config"], None]) -> Callable[["Config"], None]:
    """Add ``check(cfg)`` to :func:`validate` (it raises :class:`ConfigError` naming the key); returns it."""
    if check not in _VALIDATORS:
        _VALIDATORS.append(check)
    return check


def check_number(key: str, value, *, lo=None, lo_open=False, hi=None, hi_open=False, optional=False) -> None:
    """A finite number within [lo, hi] (lo / hi excluded with lo_open / hi_open); None allowed with optional."""
    if value is None and optional:
        return
    ok = value is not None and math.isfinite(value)
    if ok and lo is not None:
        ok = value > lo if lo_open else value >= lo
    if ok and hi is not None:
        ok = value < hi if hi_open else value <= hi
    if not ok:
        bound = " and ".join(b for b in ((f"> {lo}" if lo_open else f">= {lo}") if lo is not None else "",
                                         (f"< {hi}" if hi_open else f"<= {hi}") if hi is not None else "") if b)
        raise ConfigError(f"config key '{key}': must be a finite number{' ' + bound if bound else ''}, got {shown(value)}")


def geco_goal(value) -> Any:
    """``train.geco.goal`` checked: ``"auto"``, or a finite number >= 0 (also given as text); else ConfigError."""
    if isinstance(value, str) and value.strip().lower() == "auto":
        return "auto"
    number = None
    if not isinstance(value, bool) and isinstance(value, (int, float, str)):
        try:
            number = float(value)
        except ValueError:
            pass
    if number is None or not math.isfinite(number) or number < 0:
        raise ConfigError(f"config key 'train.geco.goal': expected auto or a finite number >= 0, got {shown(value)}")
    return number


def check_int(key: str, value: int, lo: int) -> None:
    if value < lo:
        raise ConfigError(f"config key '{key}': must be >= {lo}, got {shown(value)}")


def validate(cfg: Config) -> Config:
    """Check value ranges and choices (and the model's size, estimated before anything is built);
    raise ConfigError naming the key."""
    for key, choices in _CHOICES.items():
        section, name = key.split(".")
        value = getattr(getattr(cfg, section), name)
        if value not in choices:
            listed = ", ".join(str(c) for c in choices)
            raise ConfigError(f"config key '{key}': {shown(value)} is not one of: {listed}")
    for check in _VALIDATORS:  # the model section's checks (probunet.models.registry)
        check(cfg)
    t = cfg.train
    for key in ("steps", "batch_size", "log_every", "val_every", "checkpoint_every", "val_samples",
                "max_bad_steps"):
        check_int(f"train.{key}", getattr(t, key), 1)
    for key in ("val_cases", "kl_warmup_steps"):
        check_int(f"train.{key}", getattr(t, key), 0)
    if not _DEVICE.fullmatch(str(t.device)):
        raise ConfigError(f"config key 'train.device': {shown(t.device)} is not one of: auto, cpu, cuda, cuda:N, mps")
    check_number("train.lr", t.lr, lo=0, lo_open=True)
    check_number("train.lr_final_fraction", t.lr_final_fraction, lo=0, hi=1)
    check_number("train.weight_decay", t.weight_decay, lo=0)
    check_number("train.beta", t.beta, lo=0)
    check_number("train.free_bits", t.free_bits, lo=0)
    check_number("train.kl_balance", t.kl_balance, lo=0, hi=1, optional=True)
    check_number("train.ema_decay", t.ema_decay, lo=0, hi=1, hi_open=True, optional=True)
    check_number("train.grad_clip", t.grad_clip, lo=0, lo_open=True, optional=True)
    g = t.geco
    g.goal = geco_goal(g.goal)
    check_number("train.geco.goal_scale", g.goal_scale, lo=0, lo_open=True)
    check_number("train.geco.alpha", g.alpha, lo=0, hi=1)
    check_number("train.geco.step_size", g.step_size, lo=0)
    for key in ("lambda_init", "lambda_min", "lambda_max"):
        check_number(f"train.geco.{key}", getattr(g, key), lo=0)
    e = cfg.eval
    for key in ("num_samples", "batch_size", "sample_chunk", "num_true_references"):
        check_int(f"eval.{key}", getattr(e, key), 1)
    d = cfg.data
    check_int("data.num_workers", d.num_workers, 0)
    check_number("data.foreground_oversample", d.foreground_oversample, lo=0, hi=1)
    for key in ("num_cases", "size", "num_raters"):
        check_int(f"data.synthetic.{key}", getattr(d.synthetic, key), 1)
    a = d.augment
    check_number("data.augment.prob", a.prob, lo=0, hi=1)
    for key in ("affine_rotate_deg", "affine_scale", "intensity_shift", "intensity_scale"):
        check_number(f"data.augment.{key}", getattr(a, key))
    if d.format != "synthetic" and not d.path:
        raise ConfigError(f"config key 'data.path': required for data.format={d.format}")
    _check_counts(cfg)
    _check_upper_bounds(cfg)
    return cfg


MAX_SYNTHETIC_VOXELS = 1 << 24  # 4096^2 or 256^3 per synthetic image
MAX_SYNTHETIC_CASES = 1_000_000


def _check_counts(cfg: Config) -> None:
    """Upper bounds of sample counts and synthetic sizes (each error names its key)."""
    from .guards import MAX_SAMPLES

    for key, value in (("eval.num_samples", cfg.eval.num_samples), ("train.val_samples", cfg.train.val_samples)):
        if value > MAX_SAMPLES:
            raise ConfigError(f"config key '{key}': at most {MAX_SAMPLES} samples per image, got {value}")
    s = cfg.data.synthetic
    if s.num_cases > MAX_SYNTHETIC_CASES:
        raise ConfigError(f"config key 'data.synthetic.num_cases': at most {MAX_SYNTHETIC_CASES}, got {s.num_cases}")
    if s.num_raters > MAX_RATERS:
        raise ConfigError(f"config key 'data.synthetic.num_raters': at most {MAX_RATERS}, got {s.num_raters}")
    if s.spatial_dims in (2, 3) and s.size ** s.spatial_dims > MAX_SYNTHETIC_VOXELS:
        raise ConfigError(f"config key 'data.synthetic.size': {s.size}^{s.spatial_dims} voxels per image, at most "
                          f"{MAX_SYNTHETIC_VOXELS} (4096 in 2D, 256 in 3D)")


MAX_SEED = 2**63 - 1
MAX_BATCH = 65536
MAX_WORKERS = 256
MAX_RATERS = 64  # as probunet.data.guards.MAX_RATERS
MAX_VOXELS_LIMIT = 2**40


def _check_range(key: str, value, lo: int, hi: int) -> None:
    if not lo <= value <= hi:
        raise ConfigError(f"config key '{key}': must be in [{lo}, {hi}], got {shown(value)}")


def _check_upper_bounds(cfg: Config) -> None:
    """Upper bounds of the keys whose huge values would hang or exhaust memory before any other
    check (a batch of 1e21 cases, a seed past 64 bits, a crop larger than data.max_voxels)."""
    for key, value in (("train.seed", cfg.train.seed), ("eval.seed", cfg.eval.seed),
                       ("data.split.seed", cfg.data.split.seed), ("data.synthetic.seed", cfg.data.synthetic.seed)):
        _check_range(key, value, 0, MAX_SEED)
    _check_range("train.batch_size", cfg.train.batch_size, 1, MAX_BATCH)
    _check_range("eval.batch_size", cfg.eval.batch_size, 1, MAX_BATCH)
    _check_range("data.num_workers", cfg.data.num_workers, 0, MAX_WORKERS)
    if cfg.data.num_raters is not None:
        _check_range("data.num_raters", cfg.data.num_raters, 1, MAX_RATERS)
    _check_range("data.max_voxels", cfg.data.max_voxels, 1, MAX_VOXELS_LIMIT)
    crop = cfg.data.crop_size
    if crop is not None:
        n = math.prod(crop) if isinstance(crop, tuple) else crop ** max(2, int(cfg.model.spatial_dims))
        if n > cfg.data.max_voxels:
            raise ConfigError(f"config key 'data.crop_size': {shown(crop)} is {n:,} voxels, over "
                              f"data.max_voxels = {cfg.data.max_voxels:,}")


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
        value = yaml_load(raw) if raw.strip() else None
    except _YamlRefused as exc:
        raise ConfigError(f"override '{shown(key)[1:-1]}': refused: {exc.what}") from None
    except (yaml.YAMLError, ValueError, RecursionError):
        value = raw
    return key.split("."), value


def check_overrides(overrides: list[str]) -> None:
    """ConfigError naming the key when one is given twice among ``overrides``, or with a section that
    holds it (``train={...}`` and ``train.steps=...``): :func:`apply_overrides` lets the last win,
    which on a command line is a typo more often than an intent."""
    given: dict = {}
    for text in overrides:
        key = tuple(parse_override(text)[0])
        for other, first in given.items():
            n = min(len(key), len(other))
            if key[:n] != other[:n]:
                continue
            if len(key) == len(other):
                raise ConfigError(f"override '{shown('.'.join(key))[1:-1]}' given twice ({shown(first)[1:-1]} and "
                                  f"{shown(text)[1:-1]}): the last would silently win; give each key once")
            inner, outer = (key, other) if len(key) > len(other) else (other, key)
            raise ConfigError(f"override '{shown('.'.join(inner))[1:-1]}' is given and so is its section "
                              f"'{shown('.'.join(outer))[1:-1]}' ({shown(first)[1:-1]} and {shown(text)[1:-1]}): "
                              f"one would silently win; give each key once")
        given[key] = text


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """Apply ``section.key=value`` overrides to a raw config dict (values parsed as YAML), in order: a
    key given again wins (the command line refuses that: :func:`check_overrides`)."""
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


# ----------------------------------------------------------------------------- YAML

MAX_CONFIG_BYTES = 1 << 20  # a config file is text of at most this size


class _YamlRefused(yaml.YAMLError):
    """A YAML construct configs never need: an anchor or alias, a duplicate key."""

    def __init__(self, what: str, mark=None):
        super().__init__(what)
        self.what = what + (f" (line {mark.line + 1})" if mark is not None else "")


class ConfigLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` without anchors and aliases (``&a`` / ``*a``): a chain of aliases (a
    "billion laughs" of a few hundred bytes) would build a structure whose every walk, copy or
    repr never ends, so the first anchor or alias is refused before anything is built."""

    def compose_node(self, parent, index):
        event = self.peek_event()
        if isinstance(event, yaml.AliasEvent):
            raise _YamlRefused(f"an alias (*{event.anchor[:40]}); anchors and aliases are not allowed in configs",
                               event.start_mark)
        if getattr(event, "anchor", None) is not None:
            raise _YamlRefused(f"an anchor (&{event.anchor[:40]}); anchors and aliases are not allowed in configs",
                               event.start_mark)
        return super().compose_node(parent, index)


_MERGE_TAG = "tag:yaml.org,2002:merge"


def _duplicate_keys(node, prefix: str = "") -> None:
    """Raise _YamlRefused naming the first key given twice in one mapping (its dotted path), or the
    first YAML merge key (``<<:``, which would copy keys in from another mapping without a word)."""
    stack = [(node, prefix)]
    while stack:
        node, prefix = stack.pop()
        if isinstance(node, yaml.MappingNode):
            seen: dict = {}
            for k, v in node.value:
                key = k.value if isinstance(k, yaml.ScalarNode) else None
                full = f"{prefix}.{key}" if prefix else str(key)
                if k.tag == _MERGE_TAG:
                    raise _YamlRefused(f"a merge key '<<' in '{shown(prefix or '(top level)')[1:-1]}'; merge keys "
                                       f"are not supported in configs: write the keys out", k.start_mark)
                if key is not None:
                    if key in seen:
                        raise _YamlRefused(f"duplicate key '{shown(full)[1:-1]}' (lines {seen[key]} and "
                                           f"{k.start_mark.line + 1}): the second would silently win")
                    seen[key] = k.start_mark.line + 1
                stack.append((v, full))
        elif isinstance(node, yaml.SequenceNode):
            stack.extend((v, prefix) for v in node.value)


def yaml_load(text):
    """``yaml.safe_load`` for configs and override values: anchors, aliases, merge keys and duplicate
    keys are refused (:class:`yaml.YAMLError`, the message in ``.what``)."""
    loader = ConfigLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        _duplicate_keys(node)
        return loader.construct_document(node)
    finally:
        loader.dispose()


def load_yaml(path: str | Path) -> dict:
    import os
    import stat

    path = Path(path)
    try:
        st = os.stat(path)
    except (OSError, ValueError):
        raise ConfigError(f"config file not found: {path}") from None
    if not stat.S_ISREG(st.st_mode) or str(path.resolve()).startswith(("/proc/", "/sys/")):
        raise ConfigError(f"config file {path}: not a regular file (a folder, FIFO, device or /proc file)")
    if st.st_size > MAX_CONFIG_BYTES:
        raise ConfigError(f"config file {path}: {st.st_size:,} bytes; a config is at most {MAX_CONFIG_BYTES:,}")
    try:
        with open(path, encoding="utf-8") as fh:
            data = yaml_load(fh.read(MAX_CONFIG_BYTES + 1))
    except UnicodeDecodeError as exc:
        raise ConfigError(f"config file {path}: not a YAML text file (byte {exc.start} is not UTF-8 text; "
                          f"is it a binary file?)") from None
    except _YamlRefused as exc:
        raise ConfigError(f"config file {path}: refused: {exc.what}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {path}: not valid YAML ({exc.__class__.__name__})") from None
    except RecursionError:
        raise ConfigError(f"config file {path}: not valid YAML (nested too deeply)") from None
    except ValueError as exc:  # e.g. an integer past Python's digit limit
        raise ConfigError(f"config file {path}: a value cannot be read ({shown(str(exc))[1:-1]})") from None
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


def save_config(cfg: Config, path: str | Path, *, comment: str = "") -> None:
    """Write ``cfg`` as YAML (atomically); ``comment`` lines go first, as ``#`` comments."""
    from .utils import atomic_write_text

    class _NoAliases(yaml.SafeDumper):  # a value used twice is written twice: configs never hold aliases
        def ignore_aliases(self, data):
            return True

    head = "".join(f"# {line}\n" for line in comment.splitlines())
    atomic_write_text(path, head + yaml.dump(cfg.to_dict(), Dumper=_NoAliases, sort_keys=False))
