"""The model interface every trainable probunet model meets, and the model registry.

Training, validation, evaluation and prediction talk to a model only through
:class:`SegmentationSampler`:

- ``training_loss(image, labels, *, step, num_raters=None, generator=None)``
  -> dict of named scalar terms, ``"loss"`` the one to minimise. ``labels`` are
  all raters of each image, ``(B, A, *spatial)`` integer maps; ``num_raters``
  ``(B,)`` says how many of them are real (the rest are padding and never a
  target). The model picks one random rater per image or uses all of them, as
  it was configured (``train.rater``), and holds its own loss settings (KL
  weight and warm-up, ...).
- ``sample(image, num_samples, *, generator=None, noise=None, context=None)``
  -> logits ``(B, S, C, *spatial)``.
- ``spatial_dims``, ``in_channels``, ``num_classes`` and ``divisor`` (spatial
  sizes must be multiples of it): what prediction needs to prepare an image.

Window-coherent sampling (optional, for sliding windows). A model whose
randomness per sample is a fixed-size standard-normal draw (the Probabilistic
U-Net's latent ``eps``) says so with ``noise_shape`` (a tuple; None for models
without one) and accepts ``noise (B, S, *noise_shape)`` in ``sample``: the
inference module then draws ``noise`` per case from ``(seed, case id, s)``, so
sample ``s`` of a case is the same whatever the batch, the chunking or the
window, and every sliding window of an image uses the same draw (sample ``s`` is
one coherent segmentation, not a patchwork). ``context = model.sample_context(image)``
is the image-level conditioning (the prior's mean and scale), computed once on
the whole image and handed to the sampling of each window; its tensors have the
batch first, so a window batch selects rows of it with :func:`index_context`.

:class:`LossForward` lets DistributedDataParallel and ``torch.compile`` wrap the
loss: their hooks run on ``forward``, so the trainer wraps ``LossForward(model)``
instead of calling ``training_loss`` on the bare model.

Models are built by name (``model.name`` in the config, ``prob_unet`` when the
config has no such key) with :func:`build_model`; a model registers its builder
with :func:`register_model`.
"""

from __future__ import annotations

from typing import Any, Callable, Dict, Optional, Protocol, runtime_checkable

import torch
from torch import Tensor, nn

DEFAULT_MODEL = "prob_unet"


@runtime_checkable
class SegmentationSampler(Protocol):
    """What the trainer, the validation, ``evaluate`` and ``predict`` may use of a model."""

    spatial_dims: int
    in_channels: int
    num_classes: int

    @property
    def divisor(self) -> int:
        """Spatial sizes given to the model must be multiples of this."""

    def training_loss(self, image: Tensor, labels: Tensor, *, step: int, num_raters: Optional[Tensor] = None,
                      generator: Optional[torch.Generator] = None) -> Dict[str, Tensor]:
        """image (B, C_in, *spatial), labels (B, A, *spatial) -> named scalar terms; ``loss`` is minimised."""

    def sample(self, image: Tensor, num_samples: int, *, generator: Optional[torch.Generator] = None) -> Tensor:
        """image (B, C_in, *spatial) -> logits (B, S, C, *spatial)."""


def check_labels(labels: Tensor, image: Tensor, num_raters: Optional[Tensor]) -> Tensor:
    """Validate ``labels (B, A, *spatial)`` against ``image (B, C, *spatial)``; returns ``num_raters (B,)``
    on the labels' device (all ``A`` raters real when None)."""
    if labels.dim() != image.dim() or labels.shape[0] != image.shape[0] or labels.shape[2:] != image.shape[2:]:
        raise ValueError(f"labels must be (B, A, *spatial) = ({image.shape[0]}, A, "
                         f"{', '.join(map(str, image.shape[2:]))}) for image {tuple(image.shape)}, "
                         f"got {tuple(labels.shape)}")
    if labels.is_floating_point():
        raise ValueError(f"labels must be integer label maps, got dtype {labels.dtype}")
    b, a = labels.shape[:2]
    if num_raters is None:
        return torch.full((b,), a, dtype=torch.long, device=labels.device)
    num_raters = torch.as_tensor(num_raters).to(labels.device).long()
    if num_raters.shape != (b,):
        raise ValueError(f"num_raters must be (B,) = ({b},), got {tuple(num_raters.shape)}")
    return num_raters


def pick_raters(image: Tensor, labels: Tensor, mode: str, *, num_raters: Optional[Tensor] = None,
                generator: Optional[torch.Generator] = None) -> tuple[Tensor, Tensor]:
    """The training targets among each image's raters.

    ``mode="random"``: one rater per image, uniform among its ``num_raters[b]`` real
    ones, drawn as ``floor(u * num_raters)`` with ``u = torch.rand(B, generator=generator)``
    (on the generator's device; the global RNG without one) -> (image (B, ...),
    target (B, *spatial)). ``mode="all"``: every real rater of every image, the
    image repeated for each -> (B', ...), (B', *spatial), image-major, B' = sum of
    ``num_raters``. Padded raters (index >= num_raters[b]) are never targets.
    """
    counts = check_labels(labels, image, num_raters)
    b, a = labels.shape[:2]
    if mode == "random":
        dev = generator.device if generator is not None else counts.device
        u = torch.rand(b, generator=generator, device=dev).to(counts.device)
        choice = (u * counts).long()
        return image, labels[torch.arange(b, device=labels.device), choice.to(labels.device)]
    if mode == "all":
        keep = (torch.arange(a, device=counts.device).repeat(b) < counts.repeat_interleave(a)).to(labels.device)
        images = image.repeat_interleave(a, dim=0)[keep.to(image.device)]
        return images, labels.flatten(0, 1)[keep]
    raise ValueError(f"rater mode must be 'random' or 'all', got {mode!r}")


def index_context(context: Any, index: Tensor) -> Any:
    """Rows ``index`` of every tensor in ``context`` (a tensor, or a dict / tuple / list of them)."""
    if context is None:
        return None
    if isinstance(context, Tensor):
        return context[index.to(context.device)]
    if isinstance(context, dict):
        return {k: index_context(v, index) for k, v in context.items()}
    if isinstance(context, (tuple, list)):
        return type(context)(index_context(v, index) for v in context)
    return context


class LossForward(nn.Module):
    """``forward(...)`` = ``model.training_loss(...)``: the module DDP and torch.compile wrap.

    Holds the model as ``model`` (its state dict keys get a ``model.`` prefix, so
    checkpoints save the bare model's state dict, as before).
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, image: Tensor, labels: Tensor, *, step: int, num_raters: Optional[Tensor] = None,
                generator: Optional[torch.Generator] = None) -> Dict[str, Tensor]:
        return self.model.training_loss(image, labels, step=step, num_raters=num_raters, generator=generator)


# ----------------------------------------------------------------------------- registry

Builder = Callable[[Any, Any], nn.Module]
_REGISTRY: Dict[str, Builder] = {}


def register_model(name: str, builder: Optional[Builder] = None):
    """Register ``builder(model_cfg, train_cfg_or_None) -> model`` under ``name``; usable as a decorator."""
    def add(fn: Builder) -> Builder:
        if name in _REGISTRY and _REGISTRY[name] is not fn:
            raise ValueError(f"a model named {name!r} is already registered")
        _REGISTRY[name] = fn
        return fn

    return add(builder) if builder is not None else add


def model_names() -> list[str]:
    """The registered ``model.name`` values."""
    return sorted(_REGISTRY)


def model_name(model_cfg) -> str:
    """``model_cfg.name`` (``prob_unet`` for configs without the key)."""
    name = getattr(model_cfg, "name", None)
    return DEFAULT_MODEL if name is None else str(name)


def build_model(model_cfg, train_cfg=None) -> nn.Module:
    """Build the model named by ``model_cfg.name`` from a :class:`probunet.config.ModelConfig`.

    With ``train_cfg`` (a :class:`probunet.config.TrainConfig`) the model also
    takes its loss settings from it (KL weight and warm-up, rater choice, GECO);
    without, the defaults (enough for sampling and evaluation).
    """
    name = model_name(model_cfg)
    if name not in _REGISTRY:
        from ..config import ConfigError

        raise ConfigError(f"model.name: unknown model {name!r}; known: {', '.join(model_names())}")
    return _REGISTRY[name](model_cfg, train_cfg)
