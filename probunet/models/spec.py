"""A model's spec: everything the rest of probunet needs to know about a model, stated beside it.

Each model module registers one :class:`ModelSpec` with
:func:`probunet.models.registry.register_model`. The spec says

- ``name``: the ``model.name`` that selects it, and ``build(model_cfg, train_cfg_or_None)``;
- ``model_class``: the class ``build`` returns (how a built model finds its spec);
- ``keys``: its own ``model.*`` config keys (:class:`ModelKey`: type, default, range check);
- ``samples``: what its samples are, which decides its uncertainty maps
  (:mod:`probunet.inference.uncertainty`): one of :data:`SAMPLE_KINDS`, or a function of the
  built model returning one (or a :class:`Samples` with its reason);
- ``sampler``: how it exports: a function ``sampler(model, **settings)`` returning its own
  TorchScript-ready sampler (a :class:`probunet.models.scripted.ScriptSampler`; the class itself
  is such a function), or ``export_refusal``, the reason it has none (with a sampler, a function
  of the built model giving the reason for the configurations it cannot export, else None);
- ``onnx_refusal``: why ONNX cannot hold it (a text or a function of the built model returning
  one, None where it can); None: ONNX works.

A spec whose model is built by another model's builder (an ensemble of other models) gives
``built_by`` (that model's name) instead of ``build``; it is not a ``model.name`` of its own.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional, Union

from torch import nn

from ..config import check_int, shown
from ..errors import ConfigError

# What a model's samples are (see probunet.inference.uncertainty for the maps each gives):
SAMPLE_KINDS = {
    "latent": "draws of a latent of one trained model (its spread is the data's ambiguity)",
    "members": "members of an ensemble (sample s from member s mod M)",
    "dropout": "dropout draws of the weights (each sample its own model draw)",
    "softmax": "draws from one deterministic softmax (the model's own softmax gives its maps)",
}


@dataclass(frozen=True)
class Samples:
    """What the samples of one built model are: ``kind`` (a :data:`SAMPLE_KINDS` key), the reason in one
    phrase (``why``; empty: the kind's own), ``groups`` (members: M) and ``label`` (the model's name
    as the uncertainty maps show it; empty: the spec's name)."""

    kind: str
    why: str = ""
    groups: Optional[int] = None
    label: str = ""


@dataclass(frozen=True)
class ModelKey:
    """One ``model.<name>`` config key of a model: its type (int, float, str, bool, tuple or
    Optional[...]), default, and ``check("model.<name>", value, model_cfg)`` raising ConfigError
    naming the key (None: any value of the type). ``card``: shown on the exported model card."""

    name: str
    kind: Any
    default: Any
    doc: str = ""
    check: Optional[Callable[[str, Any, Any], None]] = None
    card: bool = True


def choice(*allowed) -> Callable[[str, Any, Any], None]:
    """A key check: the value is one of ``allowed``."""
    def check(key: str, value, model_cfg) -> None:
        if value not in allowed:
            raise ConfigError(f"config key '{key}': {shown(value)} is not one of: "
                              f"{', '.join(str(a) for a in allowed)}")

    return check


def int_range(lo: int, hi: int) -> Callable[[str, Any, Any], None]:
    """A key check: an integer in [lo, hi]."""
    def check(key: str, value, model_cfg) -> None:
        check_int(key, value, lo)
        if value > hi:
            raise ConfigError(f"config key '{key}': must be <= {hi}, got {shown(value)}")

    return check


def run_check(key: "ModelKey", model_cfg) -> None:
    """``key``'s check of ``model_cfg``'s value of it."""
    if key.check is not None:
        key.check(f"model.{key.name}", getattr(model_cfg, key.name), model_cfg)


Sampler = Callable[..., nn.Module]


@dataclass(frozen=True)
class ModelSpec:
    """A model's spec (see the module notes). Required: ``name``, ``model_class``, ``samples``,
    ``build`` or ``built_by``, and ``sampler`` or ``export_refusal``."""

    name: str
    model_class: Optional[type] = None
    samples: Union[str, Callable[[nn.Module], Union[str, Samples]], None] = None
    build: Optional[Callable[[Any, Any], nn.Module]] = None
    built_by: Optional[str] = None
    keys: tuple = ()
    sampler: Optional[Sampler] = None
    export_refusal: Union[str, Callable[[nn.Module], Optional[str]], None] = None
    onnx_refusal: Union[str, Callable[[nn.Module], Optional[str]], None] = None
    noise_dim: Optional[Callable[[nn.Module], int]] = None  # > 0: the exported sampler takes noise rows
    size_factor: Optional[Callable[[Any], int]] = None  # the config's model counts this many networks
    doc: str = ""

    def check(self) -> "ModelSpec":
        """The spec itself, or ValueError naming the model and what it lacks."""
        who = f"model spec {self.name!r}" if isinstance(self.name, str) and self.name else "a model spec"
        missing = []
        if not isinstance(self.name, str) or not self.name.isidentifier():
            missing.append("name (an identifier, the model.name that selects it)")
        if not isinstance(self.model_class, type):
            missing.append("model_class (the class its builder returns)")
        if self.samples is None:
            missing.append(f"samples (one of {', '.join(SAMPLE_KINDS)}, or a function of the model)")
        elif isinstance(self.samples, str) and self.samples not in SAMPLE_KINDS:
            missing.append(f"samples: {self.samples!r} is not one of {', '.join(SAMPLE_KINDS)}")
        if (self.build is None) == (self.built_by is None):
            missing.append("build (the builder) or built_by (the model whose builder makes it), one of them")
        if self.sampler is None and not (isinstance(self.export_refusal, str) and self.export_refusal):
            missing.append("sampler (its TorchScript-ready sampler) or export_refusal (the reason it has none)")
        elif self.sampler is not None and isinstance(self.export_refusal, str):
            missing.append("export_refusal: with a sampler, a function of the model (the configurations it refuses)")
        for key in self.keys:
            if not isinstance(key, ModelKey):
                missing.append(f"keys: {key!r} is not a ModelKey")
        if missing:
            raise ValueError(f"{who}: missing or invalid: {'; '.join(missing)}")
        return self

    def samples_of(self, model: nn.Module) -> Samples:
        """What ``model``'s samples are (a built model of this spec)."""
        s = self.samples(model) if callable(self.samples) else self.samples
        s = s if isinstance(s, Samples) else Samples(str(s))
        if s.kind not in SAMPLE_KINDS:
            raise ValueError(f"model {self.name}: its samples are {s.kind!r}, not one of {', '.join(SAMPLE_KINDS)}")
        return s

    def export_refusal_of(self, model: nn.Module) -> Optional[str]:
        """Why ``model`` has no exported sampler (None: it has one)."""
        if self.sampler is None:
            return str(self.export_refusal)
        return self.export_refusal(model) if callable(self.export_refusal) else None

    def onnx_refusal_of(self, model: nn.Module) -> Optional[str]:
        """Why ``model`` has no ONNX export (None: it has one)."""
        refused = self.export_refusal_of(model)
        if refused:
            return refused
        return self.onnx_refusal(model) if callable(self.onnx_refusal) else self.onnx_refusal

    def noise_dim_of(self, model: nn.Module) -> int:
        """The size of one sample's noise row of the exported sampler (0: it takes a generator instead)."""
        return int(self.noise_dim(model)) if self.noise_dim is not None else 0


def seeded_refusal(name: str, what: str) -> str:
    """The ONNX refusal of a model that draws its random numbers inside the network."""
    return (f"model {name} {what}, which ONNX cannot seed to match torch; export --format torchscript "
            f"(seeded) instead")


def key_defaults(keys) -> Any:
    """The defaults of ``keys`` (:class:`ModelKey`) as attributes: ``key_defaults(KEYS).rank``."""
    from types import SimpleNamespace

    return SimpleNamespace(**{k.name: k.default for k in keys})


__all__ = ["ModelKey", "ModelSpec", "SAMPLE_KINDS", "Samples", "choice", "int_range", "key_defaults", "run_check",
           "seeded_refusal"]
