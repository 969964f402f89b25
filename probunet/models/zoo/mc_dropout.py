"""``mc_dropout``: a U-Net with dropout kept on at sampling time (Gal & Ghahramani 2016; Kendall et al. 2017).

Dropout as approximate Bayesian inference: training with dropout of rate p
minimises (up to constants) KL(q(W) || p(W | D)) for the variational family q
of weights whose feature maps are zeroed with probability p; the predictive
distribution p(y | x, D) = E_{W ~ q}[p(y | x, W)] is then approximated by
Monte Carlo: each sample s uses its own dropout masks W_s ~ q and gives logits
f_{W_s}(x).

Here the U-Net's encoder is deterministic and every decoder block is followed
by spatial dropout (whole channels zeroed with probability ``dropout``, the
kept ones scaled by 1 / (1 - p)), as Bayesian SegNet puts dropout next to the
deepest encoder/decoder units. The encoder runs once per image; the decoder
runs once per sample, with masks drawn from the ``generator``. Training: the
per-pixel cross-entropy against one random rater (``train.rater``), dropout on.
With ``mc_sampling: false`` sampling uses the deterministic network instead
(dropout off: every sample equal, standard dropout inference).
"""

from __future__ import annotations

import dataclasses
from typing import Dict, List, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ...config import check_number
from ...errors import ConfigError
from ..base import SegmentationModel, loss_settings_from, pick_raters
from ..registry import register_model
from ..scripted import EncoderPort, ScriptSampler, chunk_of, rand_from, upsample as script_upsample
from ..spec import ModelKey, ModelSpec, Samples, key_defaults, seeded_refusal
from ..init import init_weights
from ..unet import Encoder, conv_block
from ._common import DEFAULTS as D, SOFT_TARGET_KEY, common_args, conv1x1, draw, option, upsample


def _check_dropout(key: str, value, model_cfg) -> None:
    check_number(key, value, lo=0)
    if value >= 1:
        raise ConfigError(f"config key '{key}': must be in [0, 1), got {value}")


# model.* keys of MC dropout
KEYS = (
    ModelKey("dropout", float, 0.5, "spatial dropout rate in the decoder, in [0, 1)", _check_dropout),
    ModelKey("mc_sampling", bool, True, "dropout kept on at sampling time"),
    dataclasses.replace(SOFT_TARGET_KEY, card=False),
)
K = key_defaults(KEYS)


class MCDropoutUNet(SegmentationModel):
    """U-Net with channel dropout after each decoder block, active when training and when sampling."""

    def __init__(self, spatial_dims: int = D.spatial_dims, in_channels: int = D.in_channels,
                 num_classes: int = D.num_classes, features: Sequence[int] = D.features,
                 convs_per_level: int = D.convs_per_level, norm: Optional[str] = D.norm, init: str = D.init,
                 dropout: float = K.dropout,
                 mc_sampling: bool = K.mc_sampling):
        super().__init__()
        feats = self.init_interface(spatial_dims, in_channels, num_classes, features)
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        self.dropout, self.mc_sampling = float(dropout), bool(mc_sampling)
        self.encoder = Encoder(spatial_dims, in_channels, feats, convs_per_level, norm=norm)
        self.decoder = nn.ModuleList(conv_block(spatial_dims, feats[i + 1] + feats[i], feats[i], convs_per_level,
                                                norm=norm) for i in range(len(feats) - 2, -1, -1))
        self.head = conv1x1(spatial_dims, feats[0], num_classes)
        init_weights(self, init)

    def _drop(self, x: Tensor, active: bool, generator: Optional[torch.Generator]) -> Tensor:
        """Spatial dropout: each (sample, channel) map kept with probability 1 - p, scaled by 1 / (1 - p)."""
        if not active or self.dropout == 0.0:
            return x
        shape = (*x.shape[:2], *([1] * self.spatial_dims))
        keep = (draw(shape, generator, x.device, kind="uniform") >= self.dropout).to(x.dtype)
        return x * (keep / (1.0 - self.dropout))

    def _decode(self, skips: list, repeats: int, active: bool, generator: Optional[torch.Generator]) -> Tensor:
        """Decoder features of ``repeats`` copies of each image -> logits (B * repeats, C, *spatial)."""
        x = skips[-1].repeat_interleave(repeats, dim=0)
        if not self.decoder:  # a single level: dropout on the encoder's output
            x = self._drop(x, active, generator)
        for block, skip in zip(self.decoder, reversed(skips[:-1])):
            x = upsample(x, skip.shape[2:])
            x = block(torch.cat([x, skip.repeat_interleave(repeats, dim=0)], dim=1))
            x = self._drop(x, active, generator)
        return self.head(x)

    def forward(self, image: Tensor, *, dropout: Optional[bool] = None) -> Tensor:
        """image (B, C_in, *spatial) -> logits (B, C, *spatial); dropout on in training mode unless told."""
        self.check_input(image)
        return self._decode(self.encoder(image), 1, self.training if dropout is None else dropout, None)

    def training_loss(self, image: Tensor, labels: Tensor, *, step: int, num_raters: Optional[Tensor] = None,
                      generator: Optional[torch.Generator] = None) -> Dict[str, Tensor]:
        """Mean per-pixel CE against the picked rater(s), dropout on (masks from the global RNG)."""
        image, target = pick_raters(image, labels, self.loss_settings.rater, num_raters=num_raters,
                                    generator=generator)
        ce = F.cross_entropy(self(image, dropout=True).float(), target.long(), reduction="none").flatten(1)
        return {"loss": ce.mean(), "ce_mean": ce.mean(), "ce_sum": ce.sum(dim=1).mean()}

    def prepare_samples(self, image: Tensor, num_samples: int, *, generator: Optional[torch.Generator],
                        noise=None, context=None, mean: bool = False):
        """The encoder once per image; each chunk of :meth:`sample` runs the decoder on ``n`` copies of
        each image, every copy with its own dropout masks from ``generator`` (with ``mc_sampling``
        off: the deterministic network once, every sample equal)."""
        skips = self.encoder(image)
        b = image.shape[0]
        if not self.mc_sampling:
            fixed = self._decode(skips, 1, False, None).unsqueeze(1)  # (B, 1, C, *spatial)
            return lambda start, n, out: fixed.expand(-1, n, *fixed.shape[2:]).clone()

        def draw_chunk(start: int, n: int, out: Optional[Tensor]) -> Tensor:
            logits = self._decode(skips, n, True, generator)
            return logits.view(b, n, *logits.shape[1:])

        return draw_chunk


def build_mc_dropout(model_cfg, train_cfg=None) -> MCDropoutUNet:
    """``model.name: mc_dropout``; options ``model.dropout`` and ``model.mc_sampling``."""
    model = MCDropoutUNet(**common_args(model_cfg), dropout=option(model_cfg, "dropout", float),
                          mc_sampling=option(model_cfg, "mc_sampling", bool))
    return model.configure_loss(loss_settings_from(train_cfg))


# ----------------------------------------------------------------------------- the exported sampler and the spec


class MCDropoutSampler(ScriptSampler):
    """``mc_dropout``: encoder once; decoder per sample with channel dropout masks u >= p, drawn
    ``chunk_size`` samples at a time, block after block (as the model draws them)."""

    def __init__(self, model: nn.Module, **kw):
        super().__init__(model, **kw)
        self.encoder = EncoderPort(model.encoder)
        self.decoder = model.decoder
        self.head = model.head
        self.p: float = float(model.dropout)
        self.mc: bool = bool(model.mc_sampling)
        self.chunk: int = chunk_of(model)

    def _drop(self, x: Tensor, active: bool, g: Optional[torch.Generator]) -> Tensor:
        if not active or self.p == 0.0:
            return x
        shape = [x.shape[0], x.shape[1]] + [1] * self.spatial_dims
        keep = (rand_from(shape, g, x.device) >= self.p).to(x.dtype)
        return x * (keep / (1.0 - self.p))

    def _decode(self, skips: List[Tensor], repeats: int, active: bool, g: Optional[torch.Generator]) -> Tensor:
        h = skips[-1].repeat_interleave(repeats, dim=0)
        if len(self.decoder) == 0:
            h = self._drop(h, active, g)
        n = len(skips)
        j = 0
        for block in self.decoder:
            skip = skips[n - 2 - j]
            h = script_upsample(h, skip.shape[2:])
            h = block(torch.cat([h, skip.repeat_interleave(repeats, dim=0)], dim=1))
            h = self._drop(h, active, g)
            j += 1
        return self.head(h)

    def _sample(self, x: Tensor, num_samples: int, noise: Optional[Tensor], g: Optional[torch.Generator],
                context: Optional[Tensor]) -> Tensor:
        skips = self.encoder(x)
        b = x.shape[0]
        if not self.mc:
            logits = self._decode(skips, 1, False, g)
            return logits.unsqueeze(1).expand([b, num_samples] + list(logits.shape[1:])).clone()
        chunks: List[Tensor] = []
        for start in range(0, num_samples, self.chunk):
            n = min(self.chunk, num_samples - start)
            out = self._decode(skips, n, True, g)
            chunks.append(out.reshape([b, n] + list(out.shape[1:])))
        return torch.cat(chunks, dim=1)


def _samples(model) -> "str | Samples":
    if model.mc_sampling:
        return "dropout"
    return Samples("latent", why="dropout is off at sampling (mc_sampling: false), so there is one model")


def _onnx(model) -> "str | None":
    return seeded_refusal("mc_dropout", "draws dropout masks inside the decoder") if model.mc_sampling else None


register_model(ModelSpec(
    name="mc_dropout", model_class=MCDropoutUNet, build=build_mc_dropout, keys=KEYS, samples=_samples,
    sampler=MCDropoutSampler, onnx_refusal=_onnx, doc="MC dropout (Gal and Ghahramani 2016)"))
