"""``ensemble``: deep ensembles (Lakshminarayanan et al. 2017).

M networks f_1 .. f_M of the same architecture (here U-Nets,
:class:`probunet.models.UNet` with a 1x1 head), each with its own random
initialisation and its own view of the data, trained independently in one run:
the loss is (1/M) sum_m CE(f_m(x_{pi_m}), y_{pi_m}), whose gradient for member m
is that of its own cross-entropy only. The predictive distribution is the
uniform mixture (1/M) sum_m p(y | x, f_m); sample s is member s mod M's
prediction (its logits), so S = M samples give every member once. s is the
sample's index among all samples of the image, also when they are drawn in
chunks (``sample(..., start=)``): the chunk size never changes which member a
sample comes from.

Own batch order (``ensemble_batch``): ``bootstrap`` (default) gives each member
B images drawn with replacement from the batch and its own rater draw;
``shuffle`` a random permutation of the batch and its own rater draw (with a
per-image mean loss this only changes the rater draws); ``same`` the batch as is
(members then differ only by their initialisation).
"""

from __future__ import annotations

import dataclasses
from typing import Dict, List, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..base import SegmentationModel, loss_settings_from, pick_raters
from ..registry import register_model
from ..scripted import ScriptSampler, UNetPort
from ..spec import ModelKey, ModelSpec, choice, int_range, key_defaults
from .member_ensemble import members_of
from ..unet import UNet
from ._common import DEFAULTS as D, SOFT_TARGET_KEY, common_args, member_batch, option

BATCH_MODES = ("bootstrap", "shuffle", "same")


# model.* keys of the deep ensemble
KEYS = (
    ModelKey("ensemble_size", int, 4, "members M", int_range(1, 64)),
    ModelKey("ensemble_batch", str, "bootstrap", "bootstrap | shuffle | same (each member's batch)",
             choice(*BATCH_MODES)),
    ModelKey("member", Optional[str], None, "the member model (null or unet: U-Nets; e.g. prob_unet)", card=False),
    dataclasses.replace(SOFT_TARGET_KEY, card=False),
)
K = key_defaults(KEYS)


class DeepEnsemble(SegmentationModel):
    """M independently initialised U-Nets; sample s is member s mod M."""

    def __init__(self, spatial_dims: int = D.spatial_dims, in_channels: int = D.in_channels,
                 num_classes: int = D.num_classes, features: Sequence[int] = D.features,
                 convs_per_level: int = D.convs_per_level, norm: Optional[str] = D.norm, init: str = D.init,
                 members: int = K.ensemble_size,
                 batch_mode: str = K.ensemble_batch):
        super().__init__()
        self.init_interface(spatial_dims, in_channels, num_classes, features)
        if members < 1:
            raise ValueError(f"ensemble_size must be >= 1, got {members}")
        if batch_mode not in BATCH_MODES:
            raise ValueError(f"ensemble_batch must be one of {', '.join(BATCH_MODES)}, got {batch_mode!r}")
        self.batch_mode = batch_mode
        # each UNet draws its own He-normal initialisation from the global RNG
        self.members = nn.ModuleList(UNet(spatial_dims, in_channels, features, convs_per_level, norm=norm,
                                          num_classes=num_classes, init=init) for _ in range(int(members)))

    @property
    def num_members(self) -> int:
        return len(self.members)

    def forward(self, image: Tensor) -> Tensor:
        """image (B, C_in, *spatial) -> every member's logits (B, M, C, *spatial)."""
        self.check_input(image)
        return torch.stack([m(image) for m in self.members], dim=1)

    def training_loss(self, image: Tensor, labels: Tensor, *, step: int, num_raters: Optional[Tensor] = None,
                      generator: Optional[torch.Generator] = None) -> Dict[str, Tensor]:
        """The members' mean per-pixel CE, each on its own resampled batch and rater draw."""
        self.check_input(image)
        terms = []
        for member in self.members:
            img, lab, counts = member_batch(self.batch_mode, image, labels, num_raters, generator)
            img, target = pick_raters(img, lab, self.loss_settings.rater, num_raters=counts, generator=generator)
            terms.append(F.cross_entropy(member(img).float(), target.long(), reduction="none").flatten(1))
        ce_mean = torch.stack([t.mean() for t in terms])  # (M,)
        ce_sum = torch.stack([t.sum(dim=1).mean() for t in terms])
        return {"loss": ce_mean.mean(), "ce_mean": ce_mean.mean(), "ce_sum": ce_sum.mean(),
                "ce_member_spread": (ce_mean.max() - ce_mean.min()).detach()}

    def sample(self, image: Tensor, num_samples: int, *, generator: Optional[torch.Generator] = None,
               noise: Optional[Tensor] = None, context=None, start: int = 0) -> Tensor:
        """image (B, C_in, *spatial) -> logits (B, S, C, *spatial) of samples ``start .. start+S-1``;
        sample s (its index among all of the image's samples) from member s mod M, so a chunked draw
        equals one draw of all samples (deterministic: ``generator`` is not used). Members needed by
        no sample are not run."""
        self.check_sample_args(num_samples, noise, context, start=start)
        with self.sampling_context():
            self.check_input(image)
            index = member_of_samples(int(start), int(num_samples), self.num_members)
            used = sorted(set(index))
            logits = torch.stack([self.members[m](image) for m in used], dim=1)  # (B, used, C, ...)
            where = {m: i for i, m in enumerate(used)}
            return logits[:, torch.tensor([where[m] for m in index], device=logits.device)]


def member_of_samples(start: int, num_samples: int, members: int) -> list:
    """The member of each of samples ``start .. start+num_samples-1``: sample s comes from member s mod M."""
    return [(start + j) % members for j in range(num_samples)]


def build_ensemble(model_cfg, train_cfg=None) -> DeepEnsemble:
    """``model.name: ensemble``; options ``model.ensemble_size`` (4), ``model.ensemble_batch`` (bootstrap),
    ``model.member`` (null or ``unet``: these U-Nets; any other model: :mod:`.member_ensemble`)."""
    member = option(model_cfg, "member", str)
    if member not in (None, "unet"):
        from .member_ensemble import build_member_ensemble

        return build_member_ensemble(model_cfg, train_cfg, member)
    model = DeepEnsemble(**common_args(model_cfg), members=option(model_cfg, "ensemble_size", int),
                         batch_mode=option(model_cfg, "ensemble_batch", str))
    return model.configure_loss(loss_settings_from(train_cfg))


# ----------------------------------------------------------------------------- the exported sampler and the spec


class EnsembleSampler(ScriptSampler):
    """``ensemble``: sample s is member s mod M (deterministic); members no sample needs are not run."""

    def __init__(self, model: nn.Module, **kw):
        super().__init__(model, **kw)
        self.members = nn.ModuleList([UNetPort(m) for m in model.members])
        self.num_members: int = len(model.members)

    def _sample(self, x: Tensor, num_samples: int, noise: Optional[Tensor], g: Optional[torch.Generator],
                context: Optional[Tensor]) -> Tensor:
        used = min(num_samples, self.num_members)
        outs: List[Tensor] = []
        m = 0
        for member in self.members:
            if m < used:
                outs.append(member(x))
            m += 1
        logits = torch.stack(outs, dim=1)  # (B, used, C, *sp)
        index = torch.arange(num_samples, device=x.device) % used
        return logits.index_select(1, index)


register_model(ModelSpec(
    name="ensemble", model_class=DeepEnsemble, build=build_ensemble, keys=KEYS, samples=members_of,
    sampler=EnsembleSampler, size_factor=lambda model_cfg: int(model_cfg.ensemble_size),
    doc="a deep ensemble of U-Nets (model.member: an ensemble of another model)"))
