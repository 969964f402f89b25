"""The model registry: every model's builder by ``model.name``, and the checks of the config's ``model`` section.

A model registers its :class:`probunet.models.spec.ModelSpec` (its builder, config keys, what its
samples are, how it exports) with :func:`register_model`; :func:`build_model` builds the one a
config names (``prob_unet`` when the config has no ``model.name``), :func:`spec_of` finds a built
model's spec. Importing :mod:`probunet.models` registers the Probabilistic U-Net and the zoo.

The ``model`` section of a config is checked here, not in :mod:`probunet.config`
(which imports no model): the shared keys' ranges, each registered model's keys (by the checks
of its spec), the name (one of the registered models) and the model's size, estimated from the config alone
(:func:`estimate_model_parameters`) so that an impossible model is refused before
anything is built. :func:`check_model_config` is added to
:func:`probunet.config.validate` when this module is imported.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Dict, Optional

from torch import nn

from ..config import ModelConfig, add_model_key, register_validator, remove_model_key, shown
from ..errors import ConfigError
from .spec import ModelSpec, run_check

DEFAULT_MODEL = "prob_unet"

# ----------------------------------------------------------------------------- registry

Builder = Callable[[Any, Any], nn.Module]
_REGISTRY: Dict[str, ModelSpec] = {}


def register_model(spec: ModelSpec) -> ModelSpec:
    """Register ``spec`` (a :class:`probunet.models.spec.ModelSpec`): its name selects it as ``model.name``,
    its keys become ``model.*`` config keys. ValueError naming the model and what is missing when the
    spec is incomplete, or when another spec has the name."""
    if not isinstance(spec, ModelSpec):
        raise ValueError(f"register_model takes a ModelSpec (probunet.models.spec), got {type(spec).__name__}")
    spec.check()
    old = _REGISTRY.get(spec.name)
    if old is not None and old is not spec:
        raise ValueError(f"a model named {spec.name!r} is already registered")
    for key in spec.keys:
        add_model_key(key.name, key.kind, key.default)
    _REGISTRY[spec.name] = spec
    return spec


def unregister_model(name: str) -> None:
    """Withdraw the spec registered as ``name`` and the config keys no other spec declares (a model
    registered for a while, as in a test)."""
    spec = _REGISTRY.pop(name, None)
    if spec is None:
        raise ValueError(f"no model named {name!r} is registered")
    still = {key.name for other in _REGISTRY.values() for key in other.keys}
    for key in spec.keys:
        if key.name not in still:
            remove_model_key(key.name)


def model_names() -> list[str]:
    """The registered ``model.name`` values (the models with a builder of their own)."""
    return sorted(name for name, spec in _REGISTRY.items() if spec.build is not None)


def model_specs() -> list[ModelSpec]:
    """Every registered spec, by name."""
    return [_REGISTRY[name] for name in sorted(_REGISTRY)]


def model_name(model_cfg) -> str:
    """``model_cfg.name`` (``prob_unet`` for configs without the key)."""
    name = getattr(model_cfg, "name", None)
    return DEFAULT_MODEL if name is None else str(name)


def model_spec(name: str) -> ModelSpec:
    """The spec registered as ``name``; ConfigError naming it when none is."""
    spec = _REGISTRY.get(name)
    if spec is None:
        raise ConfigError(f"model.name: unknown model {name!r}; known: {', '.join(model_names())}")
    return spec


def spec_of(model: nn.Module) -> ModelSpec:
    """The spec of a built ``model`` (found by its class); ValueError naming the class when none is."""
    for spec in _REGISTRY.values():
        if type(model) is spec.model_class:
            return spec
    raise ValueError(f"model {type(model).__name__}: no registered model spec has this class; register one "
                     f"with probunet.models.register_model(ModelSpec(...))")


def build_model(model_cfg, train_cfg=None) -> nn.Module:
    """Build the model named by ``model_cfg.name`` from a :class:`probunet.config.ModelConfig`.

    With ``train_cfg`` (a :class:`probunet.config.TrainConfig`) the model also
    takes its loss settings from it (KL weight and warm-up, rater choice, GECO);
    without, the defaults (enough for sampling and evaluation).
    """
    name = model_name(model_cfg)
    spec = _REGISTRY.get(name)
    if spec is None or spec.build is None:
        raise ConfigError(f"model.name: unknown model {name!r}; known: {', '.join(model_names())}")
    return spec.build(model_cfg, train_cfg)


# ----------------------------------------------------------------------------- the config's model section

# Model size limits: each key's range, and the whole model (estimated from the config, before
# anything is built or allocated).
MODEL_LIMITS = {
    "in_channels": (1, 1024),
    "num_classes": (2, 1000),
    "latent_dim": (1, 4096),
    "fcomb_layers": (1, 64),
    "convs_per_level": (1, 32),
    "levels": (1, 10),  # len(model.features)
    "channels": (1, 8192),  # each entry of model.features
}
MAX_MODEL_PARAMETERS = 2_000_000_000


def _norm_parameters(norm: Optional[str], channels: int) -> int:
    """Learnable parameters of MONAI's norm layer after a conv (batch/group: affine; instance: none)."""
    return 2 * channels if norm in ("batch", "group") else 0


def estimate_model_parameters(model_cfg) -> int:
    """The number of parameters :func:`probunet.models.build_model` would create for ``model_cfg``,
    computed from the config alone (nothing is built). Exact for the Probabilistic U-Net of
    :mod:`probunet.models`: U-Net, prior net (conditional prior), posterior net and f_comb."""
    d = int(model_cfg.spatial_dims)
    k = 3 ** d
    feats = [int(f) for f in model_cfg.features]
    cpl = int(model_cfg.convs_per_level)
    latent, classes, cin = int(model_cfg.latent_dim), int(model_cfg.num_classes), int(model_cfg.in_channels)
    norm = model_cfg.norm

    def conv(a: int, b: int) -> int:  # 3x3(x3) conv with bias, then the norm
        return a * b * k + b + _norm_parameters(norm, b)

    def block(a: int, b: int) -> int:
        return conv(a, b) + (cpl - 1) * conv(b, b)

    def encoder(c: int) -> int:
        total, prev = 0, c
        for f in feats:
            total += block(prev, f)
            prev = f
        return total

    def latent_encoder(c: int) -> int:
        return encoder(c) + feats[-1] * 2 * latent + 2 * latent  # + the Gaussian head (linear)

    unet = encoder(cin) + sum(block(feats[i + 1] + feats[i], feats[i]) for i in range(len(feats) - 1))
    prior = latent_encoder(cin) if model_cfg.prior == "conditional" else 0
    posterior = latent_encoder(cin + classes)
    layers = int(model_cfg.fcomb_layers)
    first_out = feats[0] if layers > 1 else classes
    fcomb = (feats[0] + latent) * first_out + first_out
    for i in range(1, layers):
        out = classes if i == layers - 1 else feats[0]
        fcomb += feats[0] * out + out
    return unet + prior + posterior + fcomb


def _check_model_name(m) -> None:
    known = model_names()
    if not isinstance(m.name, str) or m.name not in known:
        raise ConfigError(f"config key 'model.name': unknown model {shown(m.name)}; known: {', '.join(known)}")


def _check_model(m) -> None:
    _check_model_name(m)
    if m.spatial_dims not in (2, 3):
        raise ConfigError(f"config key 'model.spatial_dims': must be 2 or 3, got {m.spatial_dims}")
    for key in ("in_channels", "num_classes", "convs_per_level"):
        lo, hi = MODEL_LIMITS[key]
        v = getattr(m, key)
        if not lo <= v <= hi:
            what = " (background + foreground)" if key == "num_classes" and v < lo else ""
            raise ConfigError(f"config key 'model.{key}': must be in [{lo}, {hi}]{what}, got {v}")
    feats = []
    for f in m.features:
        if isinstance(f, bool) or not isinstance(f, (int, float)) or not math.isfinite(f) or f != int(f):
            feats = None
            break
        feats.append(int(f))
    lo, hi = MODEL_LIMITS["channels"]
    if not feats or any(not lo <= f <= hi for f in feats):
        raise ConfigError(f"config key 'model.features': expected a list of channel counts in [{lo}, {hi}] "
                          f"(one per level), got {shown(list(m.features))}")
    if len(feats) > MODEL_LIMITS["levels"][1]:
        raise ConfigError(f"config key 'model.features': at most {MODEL_LIMITS['levels'][1]} levels, "
                          f"got {len(feats)}")
    m.features = tuple(feats)
    _check_model_keys(m)
    n = estimate_model_parameters(m)
    spec = _REGISTRY[m.name]
    if spec.size_factor is not None:
        n *= int(spec.size_factor(m))  # e.g. M networks (the estimate of one Probabilistic U-Net bounds one)
    if n > MAX_MODEL_PARAMETERS:
        # Name the key whose default value shrinks the model most.
        default = ModelConfig()
        culprit = min(("features", "convs_per_level", "latent_dim", "num_classes", "in_channels", "fcomb_layers"),
                      key=lambda key: estimate_model_parameters(dataclasses.replace(m, **{key: getattr(default, key)})))
        raise ConfigError(f"config key 'model.{culprit}': the model would have {n:.3g} parameters "
                          f"(~{4 * n / 1e9:.3g} GB of fp32 weights, ~{16 * n / 1e9:.3g} GB to train with Adam), "
                          f"over the limit of {MAX_MODEL_PARAMETERS:.0e}")


def _check_model_keys(m) -> None:
    """Every registered model's keys, by its spec's checks (whatever model.name is: a bad value is a bad
    value), each key once."""
    seen = set()
    for spec in model_specs():
        for key in spec.keys:
            if key.name not in seen:
                seen.add(key.name)
                run_check(key, m)


@register_validator
def check_model_config(cfg) -> None:
    """The checks of ``cfg.model`` (a :class:`probunet.config.Config`): raise ConfigError naming the key."""
    _check_model(cfg.model)


__all__ = ["DEFAULT_MODEL", "MAX_MODEL_PARAMETERS", "MODEL_LIMITS", "build_model", "check_model_config",
           "estimate_model_parameters", "model_name", "model_names", "model_spec", "model_specs", "register_model",
           "spec_of", "unregister_model"]
