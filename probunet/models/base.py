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
- ``sample(image, num_samples, *, generator=None, noise=None, context=None, start=0)``
  -> logits ``(B, S, C, *spatial)``. ``start`` is the index of the first of these
  samples among all samples of the image (the inference module draws a case's
  samples in chunks and passes each chunk's offset): a model whose samples are
  not exchangeable (an ensemble: sample s comes from member s mod M) uses it, so
  that a sample is the same whatever the chunking; the others ignore it.
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

:class:`SegmentationModel` is the base class of every model here (the
Probabilistic U-Net and the zoo): the interface attributes and their checks,
``divisor``, the input check, the loss settings (:class:`LossSettings`, one type
for every model) and the chunked sampling loop (:func:`chunked_samples`).

Models are built by name (``model.name`` in the config, ``prob_unet`` when the
config has no such key) with :func:`probunet.models.registry.build_model`; a
model registers its spec (:class:`probunet.models.spec.ModelSpec`: builder, config keys,
what its samples are, how it exports) with :func:`~probunet.models.registry.register_model`
(both also importable from here).
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any, Callable, Dict, Optional, Protocol, Sequence, runtime_checkable

import torch
from torch import Tensor, nn

from ..config import ModelConfig, TrainConfig
from .losses import Geco, beta_schedule, build_geco
from .registry import DEFAULT_MODEL, build_model, model_name, model_names, register_model  # noqa: F401

RATER_MODES = ("random", "all")
DEFAULTS = ModelConfig()  # the shared model keys' defaults (each model's own keys: its spec's ModelKey)
CHUNK_SIZE = 16  # samples per chunk of SegmentationModel.sample (the Probabilistic U-Net's own: 32)


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


# ----------------------------------------------------------------------------- loss settings


@dataclass
class LossSettings:
    """How a model's ``training_loss`` picks its targets and weighs its terms (from ``train.*``).

    beta, kl_warmup_steps: the KL weight of the latent-variable models and its
    linear warm-up (:func:`probunet.models.losses.beta_schedule`); rater: ``random`` (one
    rater per image) or ``all``; geco: a :class:`probunet.models.losses.Geco` to train
    with the GECO constraint instead of the ELBO, or None; free_bits: the KL floor
    per latent dimension (:func:`probunet.models.losses.kl_objective`); kl_balance: None
    (the plain KL, or free bits on both nets) or the prior's share of KL balancing
    (:func:`probunet.models.losses.balanced_kl_objective`; free bits then spare the
    posterior only). A model uses the fields its objective has (the zoo's: rater,
    beta and warm-up, GECO where it trains with it).

    The Geco module is held here, not registered as a submodule: its buffers
    (lambda, the constraint's moving average) stay out of the model's state dict,
    so checkpoint keys are those of the bare network, old checkpoints load, and
    the trainer keeps saving the Geco state on its own (``checkpoint["geco"]``)
    and moves it to the device (``model.to`` does not).
    """

    beta: float = TrainConfig.beta  # each default as train.* states it
    kl_warmup_steps: int = TrainConfig.kl_warmup_steps
    rater: str = TrainConfig.rater
    geco: Optional[Geco] = None
    free_bits: float = TrainConfig.free_bits
    kl_balance: Optional[float] = TrainConfig.kl_balance

    def __post_init__(self):
        self.check()
        self.beta, self.kl_warmup_steps, self.free_bits = float(self.beta), int(self.kl_warmup_steps), \
            float(self.free_bits)
        self.kl_balance = None if self.kl_balance is None else float(self.kl_balance)

    def check(self) -> None:
        """Raise ValueError for a value out of range."""
        if self.rater not in RATER_MODES:
            raise ValueError(f"rater must be 'random' or 'all', got {self.rater!r}")
        if self.kl_warmup_steps < 0:
            raise ValueError(f"kl_warmup_steps must be >= 0, got {self.kl_warmup_steps}")
        if not self.free_bits >= 0:
            raise ValueError(f"free_bits must be >= 0, got {self.free_bits}")
        if self.kl_balance is not None and not 0.0 <= self.kl_balance <= 1.0:
            raise ValueError(f"kl_balance must be in [0, 1] or None, got {self.kl_balance}")


def loss_settings_from(train_cfg) -> LossSettings:
    """:class:`LossSettings` of a :class:`probunet.config.TrainConfig` (the defaults for None; a key the
    object lacks takes its default)."""
    default = LossSettings()
    if train_cfg is None:
        return default
    rater = getattr(train_cfg, "rater", default.rater)
    if rater not in RATER_MODES:
        raise ValueError(f"train.rater must be 'random' or 'all', got {rater!r}")
    geco_cfg = getattr(train_cfg, "geco", None)
    return LossSettings(beta=getattr(train_cfg, "beta", default.beta), rater=rater,
                        kl_warmup_steps=getattr(train_cfg, "kl_warmup_steps", default.kl_warmup_steps),
                        geco=build_geco(geco_cfg) if geco_cfg is not None else None,
                        free_bits=getattr(train_cfg, "free_bits", default.free_bits),
                        kl_balance=getattr(train_cfg, "kl_balance", default.kl_balance))


# ----------------------------------------------------------------------------- the base class

DrawChunk = Callable[[int, int, Optional[Tensor]], Tensor]


def chunked_samples(num_samples: int, chunk_size: Optional[int], draw: DrawChunk) -> Tensor:
    """The chunked sampling loop: ``draw(start, n, out)`` -> logits (B, n, C, *spatial) of samples
    ``start .. start+n-1``, chunk after chunk of ``chunk_size`` samples (None or 0: all at once).

    The first chunk is drawn with ``out=None``; when more follow, one output (B, S, C, *spatial) is
    allocated and every later chunk is handed its slice ``out`` (a model may write into it; what
    it returns is copied there otherwise), so memory is the output plus one chunk's intermediates.
    Chunks are drawn in order, so draws from a generator come chunk after chunk.
    """
    step = num_samples if not chunk_size else max(1, int(chunk_size))
    first = draw(0, min(step, num_samples), None)
    if step >= num_samples:
        return first
    out = first.new_empty((first.shape[0], num_samples, *first.shape[2:]))
    out[:, :step] = first
    del first
    for start in range(step, num_samples, step):
        view = out[:, start:start + step]
        chunk = draw(start, view.shape[1], view)
        if chunk is not view:
            view.copy_(chunk)
    return out


class SegmentationModel(nn.Module):
    """Base class of probunet's models (the Probabilistic U-Net and the zoo).

    A subclass calls :meth:`init_interface` in its constructor and implements
    ``training_loss`` and either :meth:`prepare_samples` (then :meth:`sample` is
    the chunked loop, ``chunk_size`` samples at a time) or ``sample`` itself.
    """

    noise_shape = None  # no fixed-size per-sample draw (see the module notes); a tuple where there is one
    has_mean_sample = False  # whether sample(mean=True) exists (a deterministic mean segmentation)
    spatial_dims: int
    in_channels: int
    num_classes: int
    _divisor: int = 1

    def init_interface(self, spatial_dims: int, in_channels: int, num_classes: int,
                       features: Sequence[int]) -> tuple:
        """Check and set ``spatial_dims``, ``in_channels``, ``num_classes``; ``divisor`` 2**(levels-1)
        for ``features`` (channels per level); the default :class:`LossSettings`. Returns ``features``
        as a tuple of ints."""
        if spatial_dims not in (2, 3):
            raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims}")
        if num_classes < 2:
            raise ValueError(f"num_classes must be >= 2, got {num_classes}")
        if in_channels < 1:
            raise ValueError(f"in_channels must be >= 1, got {in_channels}")
        if len(features) < 1:
            raise ValueError("features must name at least one level")
        self.spatial_dims, self.in_channels, self.num_classes = spatial_dims, in_channels, num_classes
        self._divisor = 2 ** (len(features) - 1)
        self.loss_settings = LossSettings()  # a plain object: nothing in the state dict
        return tuple(int(f) for f in features)

    @property
    def divisor(self) -> int:
        """Spatial sizes must be multiples of this."""
        return self._divisor

    def configure_loss(self, settings: Optional[LossSettings] = None, **fields):
        """Set the :class:`LossSettings` used by ``training_loss`` (a settings object, or its fields as
        keywords, the others at their defaults); returns the model."""
        if settings is None:
            settings = LossSettings(**fields)
        elif fields:
            raise TypeError("configure_loss: pass a LossSettings or its fields, not both")
        settings.check()
        self.loss_settings = settings
        return self

    def beta_at(self, step: int) -> float:
        """The KL weight of step ``step`` (with the warm-up)."""
        ls = self.loss_settings
        return beta_schedule(ls.beta, step, ls.kl_warmup_steps)

    def check_input(self, image: Tensor) -> None:
        """Raise ValueError unless ``image`` is (B, in_channels, *spatial) with sizes multiples of ``divisor``."""
        if image.dim() != self.spatial_dims + 2:
            raise ValueError(f"image must be (B, C, *spatial) with {self.spatial_dims} spatial dims, "
                             f"got shape {tuple(image.shape)}")
        if image.shape[1] != self.in_channels:
            raise ValueError(f"image has {image.shape[1]} channels, the model expects {self.in_channels}")
        if any(s % self.divisor for s in image.shape[2:]):
            raise ValueError(f"spatial size {tuple(image.shape[2:])} must be divisible by {self.divisor} "
                             f"(2**(levels-1)); pad or crop the image")

    def sampling_context(self):
        """``torch.inference_mode`` when nothing needs gradients (eval mode or grad disabled)."""
        return torch.inference_mode() if (not self.training or not torch.is_grad_enabled()) else nullcontext()

    def check_sample_args(self, num_samples: int, noise=None, context=None, mean: bool = False,
                          start: int = 0) -> None:
        """``num_samples`` >= 1; ``start`` >= 0; ``noise`` only for a model with a ``noise_shape``, ``context``
        only for one with ``sample_context``, ``mean`` only for one with a mean sample."""
        if int(num_samples) < 1:
            raise ValueError(f"num_samples must be >= 1, got {num_samples}")
        if int(start) < 0:
            raise ValueError(f"start must be >= 0, got {start}")
        if noise is not None and self.noise_shape is None:
            raise ValueError("noise: this model has no fixed-size per-sample draw (noise_shape is None); "
                             "pass a generator instead")
        if context is not None and not hasattr(self, "sample_context"):
            raise ValueError("context: this model has no image-level sampling context (no sample_context)")
        if mean and not self.has_mean_sample:
            raise ValueError("mean: this model has no mean sample")

    def prepare_samples(self, image: Tensor, num_samples: int, *, generator: Optional[torch.Generator],
                        noise: Optional[Tensor], context: Any, mean: bool) -> DrawChunk:
        """What runs once per image (``image`` checked, under :meth:`sampling_context`); returns
        ``draw(start, n, out)`` -> logits (B, n, C, *spatial) of samples ``start .. start+n-1``
        (see :func:`chunked_samples`)."""
        raise NotImplementedError

    def sample(self, image: Tensor, num_samples: int, *, chunk_size: Optional[int] = CHUNK_SIZE,
               generator: Optional[torch.Generator] = None, noise: Optional[Tensor] = None, context=None,
               mean: bool = False, start: int = 0) -> Tensor:
        """image (B, C_in, *spatial) -> logits (B, S, C, *spatial): :meth:`prepare_samples` once, then its
        draws ``chunk_size`` samples at a time (None: all at once). Runs under
        ``torch.inference_mode`` when gradients are disabled or the model is in eval mode. ``start``
        (the global index of the first sample, see the module notes) is checked and otherwise unused:
        these models' samples are exchangeable."""
        self.check_sample_args(num_samples, noise, context, mean, start)
        with self.sampling_context():
            self.check_input(image)
            draw = self.prepare_samples(image, num_samples, generator=generator, noise=noise, context=context,
                                        mean=mean)
            return chunked_samples(num_samples, chunk_size, draw)
