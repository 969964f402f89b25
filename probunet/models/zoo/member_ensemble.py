"""``ensemble`` of any member model: ``model.name: ensemble`` with ``model.member: prob_unet`` (or any
registered model but ``ensemble``); ``model.member`` null or ``unet`` is the U-Net ensemble of
:mod:`probunet.models.zoo.ensemble`.

M members (``model.ensemble_size``) of the member model, each built from the same ``model.*``
keys and its own random initialisation, each trained on its own view of the batch
(``model.ensemble_batch``: ``bootstrap`` (default) draws B images with replacement per member,
``shuffle`` permutes them, ``same`` keeps the batch) with its own loss (its KL, its rater draw).
The loss is the members' mean, so member m's gradient is that of its own loss only.

Sampling: sample s comes from member s mod M, s its index among all of the image's samples (also
when they are drawn in chunks: ``sample(..., start=)``); member m draws its K_m = |{s < S : s mod M
= m}| samples with its own latent. Members with a per-sample draw (the Probabilistic U-Net's
``eps``, ``noise_shape``) take sample s's row of ``noise``, so with the inference module's
per-(seed, case, s) noise a sample is the same whatever the chunking and every sliding window
of an image uses the same draw with each member's image-level prior (``sample_context``); otherwise
the members draw from the case's generator, one member after the other. With
S = M x K every member gives K latent draws: the spread within a member is its model of the
raters' ambiguity (aleatoric), the spread between members the model's ignorance (epistemic);
see :mod:`probunet.inference.uncertainty`.

Members whose loss keeps trainer-held state (GECO, ``train.geco.enabled``) are refused: the
trainer moves and saves one GECO state per model, not one per member.
"""

from __future__ import annotations

import dataclasses
from typing import Dict, List, Optional

import torch
from torch import Tensor, nn

from ..base import SegmentationModel
from ..registry import build_model, register_model, spec_of
from ..scripted import ScriptSampler
from ..spec import ModelSpec, Samples
from ._common import member_batch

BATCH_MODES = ("bootstrap", "shuffle", "same")


class MemberEnsemble(SegmentationModel):
    """M independently initialised members of one registered model; sample s from member s mod M."""

    def __init__(self, members: list[nn.Module], member_name: str, batch_mode: str = "bootstrap"):
        super().__init__()
        if not members:
            raise ValueError("ensemble_size must be >= 1")
        if batch_mode not in BATCH_MODES:
            raise ValueError(f"ensemble_batch must be one of {', '.join(BATCH_MODES)}, got {batch_mode!r}")
        first = members[0]
        self.spatial_dims, self.in_channels, self.num_classes = first.spatial_dims, first.in_channels, \
            first.num_classes
        self._divisor = max(int(m.divisor) for m in members)
        self.member_name, self.batch_mode = member_name, batch_mode
        self.members = nn.ModuleList(members)
        self.loss_settings = first.loss_settings  # the members' (one train config built them all)

    def beta_at(self, step: int) -> float:
        """The members' KL weight at ``step``."""
        return self.members[0].beta_at(step)

    @property
    def num_members(self) -> int:
        return len(self.members)

    def training_loss(self, image: Tensor, labels: Tensor, *, step: int, num_raters: Optional[Tensor] = None,
                      generator: Optional[torch.Generator] = None) -> Dict[str, Tensor]:
        """image (B, C_in, *spatial), labels (B, A, *spatial) -> the members' mean of every term they all
        return (``loss`` among them), plus ``loss_member_spread`` (max - min member loss)."""
        self.check_input(image)
        terms = []
        for member in self.members:
            img, lab, counts = member_batch(self.batch_mode, image, labels, num_raters, generator)
            terms.append(member.training_loss(img, lab, step=step, num_raters=counts, generator=generator))
        keys = [k for k in terms[0] if all(k in t for t in terms[1:])]
        out = {k: torch.stack([t[k].float() for t in terms]).mean() for k in keys}
        losses = torch.stack([t["loss"].detach().float() for t in terms])
        out["loss_member_spread"] = losses.max() - losses.min()
        return out

    @property
    def noise_shape(self):
        """The members' per-sample standard-normal draw (a Probabilistic U-Net's latent ``eps``), None when
        they have none: sample s takes row s of ``noise`` whichever member it comes from."""
        return getattr(self.members[0], "noise_shape", None)

    @property
    def sample_context(self):
        """``sample_context(image)`` -> the members' image-level contexts, a list with member m's at
        index m (rows per image, as :func:`probunet.models.base.index_context` expects); absent (an
        AttributeError) when the members have none."""
        if not hasattr(self.members[0], "sample_context"):
            raise AttributeError(f"sample_context: {self.member_name} members have no image-level context")
        return self._sample_context

    def _sample_context(self, image: Tensor) -> list:
        return [member.sample_context(image) for member in self.members]

    def sample(self, image: Tensor, num_samples: int, *, generator: Optional[torch.Generator] = None,
               noise: Optional[Tensor] = None, context=None, start: int = 0) -> Tensor:
        """image (B, C_in, *spatial) -> logits (B, S, C, *spatial) of samples ``start .. start+S-1``; sample s
        (its index among all of the image's samples) from member s mod M, so the chunk size never
        changes which member a sample comes from.

        ``noise`` (B, S, *noise_shape), for members with a per-sample draw: each member gets the rows
        of its samples; without, member after member (in member order) draws its samples from
        ``generator``. ``context`` (:attr:`sample_context`'s list): each member its own entry."""
        self.check_sample_args(num_samples, noise, context, start=start)
        with self.sampling_context():
            self.check_input(image)
            m_count, num_samples, start = self.num_members, int(num_samples), int(start)
            if noise is not None and tuple(noise.shape[:2]) != (image.shape[0], num_samples):
                raise ValueError(f"noise must be (B, S, *noise_shape) = ({image.shape[0]}, {num_samples}, ...), "
                                 f"got {tuple(noise.shape)}")
            if context is not None and len(context) != m_count:
                raise ValueError(f"context must hold one entry per member ({m_count}), got {len(context)}")
            out = None
            for m in range(m_count):
                first = (m - start) % m_count  # the first position in this call of a sample of member m
                if first >= num_samples:
                    continue
                k = len(range(first, num_samples, m_count))
                kw = {"noise": noise[:, first::m_count]} if noise is not None else {"generator": generator}
                if context is not None:
                    kw["context"] = context[m]
                logits = self.members[m].sample(image, k, **kw).float()  # (B, K_m, C, *sp)
                if out is None:
                    out = logits.new_empty(logits.shape[0], num_samples, *logits.shape[2:])
                out[:, first::m_count] = logits
            return out


def build_member_ensemble(model_cfg, train_cfg, member: str) -> MemberEnsemble:
    """The ensemble of ``member`` models described by ``model_cfg`` (``ensemble_size``, ``ensemble_batch``)."""
    from ...errors import ConfigError
    from ..registry import model_names

    if member == "ensemble":
        raise ConfigError("config key 'model.member': an ensemble cannot be the member of an ensemble")
    if member not in model_names():
        raise ConfigError(f"config key 'model.member': unknown model {member!r}; known: {', '.join(model_names())}")
    if train_cfg is not None and getattr(getattr(train_cfg, "geco", None), "enabled", False):
        raise ConfigError("config key 'train.geco.enabled': an ensemble's members cannot use GECO (the trainer "
                          "holds one GECO state per model); set train.geco.enabled=false")
    member_cfg = dataclasses.replace(model_cfg, name=member) if dataclasses.is_dataclass(model_cfg) else \
        _with_name(model_cfg, member)
    size = int(getattr(model_cfg, "ensemble_size", 4) or 4)
    members = [build_model(member_cfg, train_cfg) for _ in range(size)]
    return MemberEnsemble(members, member, str(getattr(model_cfg, "ensemble_batch", "bootstrap") or "bootstrap"))


def _with_name(model_cfg, name: str):
    from types import SimpleNamespace

    return SimpleNamespace(**{**vars(model_cfg), "name": name})


# ----------------------------------------------------------------------------- the exported sampler and the spec


class MemberEnsembleSampler(ScriptSampler):
    """``ensemble`` of any member model (``model.member``): sample s from member s mod M, each member
    the exported sampler of its own model. With ``noise`` member m takes the rows of its samples;
    without, member after member (in member order) draws its samples from the generator, as
    :class:`probunet.models.zoo.member_ensemble.MemberEnsemble` does."""

    def __init__(self, model: nn.Module, **kw):
        super().__init__(model, **kw)
        member_sampler = spec_of(model.members[0]).sampler
        self.members = nn.ModuleList([member_sampler(m, **kw) for m in model.members])
        self.num_members: int = len(model.members)
        self.latent_dim = int(self.members[0].latent_dim)

    def _context(self, x: Tensor) -> Tensor:
        parts: List[Tensor] = []
        for member in self.members:
            parts.append(member._context(x))
        return torch.stack(parts, dim=1)  # (B, M, 2, latent_dim)

    def _sample(self, x: Tensor, num_samples: int, noise: Optional[Tensor], g: Optional[torch.Generator],
                context: Optional[Tensor]) -> Tensor:
        out = torch.zeros([1])
        filled = False
        m = 0
        for member in self.members:
            first = m % self.num_members  # sample s = first + k * M comes from member m
            if first < num_samples:
                idx = torch.arange(first, num_samples, self.num_members, device=x.device)
                k = idx.shape[0]
                member_noise: Optional[Tensor] = None
                member_context: Optional[Tensor] = None
                if noise is not None:
                    member_noise = noise.index_select(1, idx.to(noise.device))
                if context is not None:
                    member_context = context.select(1, m)
                logits = member._sample(x, k, member_noise, g, member_context).float()
                if not filled:
                    out = torch.zeros([logits.shape[0], num_samples] + list(logits.shape[2:]), device=x.device)
                    filled = True
                out = out.index_copy(1, idx, logits)
            m += 1
        return out


def _member_refusal(model) -> "str | None":
    member = model.members[0]
    reason = spec_of(member).export_refusal_of(member)
    return f"its members ({model.member_name}) have no exported sampler: {reason}" if reason else None


def members_of(model) -> Samples:
    """An ensemble's samples (of U-Nets or of another model): sample s from member s mod M."""
    return Samples("members", groups=len(model.members), label=f"ensemble of {getattr(model, 'member_name', 'unet')}")


register_model(ModelSpec(
    name="member_ensemble", model_class=MemberEnsemble, built_by="ensemble", samples=members_of,
    sampler=MemberEnsembleSampler, export_refusal=_member_refusal,
    onnx_refusal=lambda model: (f"an ensemble of {model.member_name} members has no ONNX export; export --format "
                                f"torchscript instead"),
    noise_dim=lambda model: spec_of(model.members[0]).noise_dim_of(model.members[0]),
    doc="an ensemble of any other model (model.name: ensemble, model.member: its name)"))
