"""TorchScript-ready samplers of the trained models (private; used by :mod:`probunet.export`).

Each class below wraps the trained network's own submodules (its weights, not
copies of the code that built them) and re-states the model's ``sample`` in the
subset of Python TorchScript compiles: no thread pools, no tiling, no
registries. The result loads with ``torch.jit.load`` alone.

Every sampler has one signature::

    forward(image (B, C_in, *spatial), noise=None, generator=None, num_samples=0, context=None)
        -> logits (B, S, C, *spatial)

- ``image``: after the checkpoint's preprocessing (``data.normalize``; see
  :meth:`_Sampler.normalize`), any spatial size: it is padded to a multiple of
  ``divisor`` with its per-channel minimum (split evenly, the extra voxel after),
  as ``probunet predict`` pads, and the logits are cropped back.
- ``noise``: the Probabilistic U-Net's standard-normal latent draws ``eps``
  ``(B or 1, S, latent_dim)`` (``z = mu + sigma * eps``; for an ensemble of
  Probabilistic U-Nets row s goes to sample s's member); other models take none.
- ``generator``: a CPU ``torch.Generator`` (``torch.Generator().manual_seed(seed)``):
  every random number is drawn from it in the order the model's own
  ``sample(..., generator=g)`` draws them (so the samples equal probunet's for
  that generator); None uses torch's global RNG. (The generator is made by the
  caller: a ``torch.Generator`` created inside TorchScript is a constant that
  serialisation may duplicate, so that the seeded one is not the one drawn from.)
- ``num_samples``: S (0: the number fixed at export; ignored when ``noise`` is given).
- ``context``: the Probabilistic U-Net's image-level prior ``(B or 1, 2, latent_dim)``
  (:meth:`sample_context` of the whole image) for sliding windows; None: the
  prior of ``image`` itself. An ensemble's is its members' stacked on axis 1:
  ``(B or 1, M, 2, latent_dim)``.

The draws are made on the CPU and moved to the image's device, as the models do.
"""

from typing import List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def _chunk_of(model) -> int:
    """The samples per chunk that ``model.sample`` draws by default (its ``chunk_size``): the exported
    sampler draws its random numbers in the same blocks, so it gives the same samples."""
    import inspect

    p = inspect.signature(type(model).sample).parameters.get("chunk_size")
    return max(1, int(p.default)) if p is not None and p.default else 1 << 30


# log-sigma is clamped to [-10, 10], as probunet.models.gaussian (LOG_SIGMA_MIN, LOG_SIGMA_MAX)


def _randn(shape: List[int], g: Optional[torch.Generator], device: torch.device) -> Tensor:
    if g is None:
        return torch.randn(shape, device=device)
    return torch.randn(shape, generator=g).to(device)


def _rand(shape: List[int], g: Optional[torch.Generator], device: torch.device) -> Tensor:
    if g is None:
        return torch.rand(shape, device=device)
    return torch.rand(shape, generator=g).to(device)


def _pad_min(x: Tensor, sizes: List[int]) -> Tuple[Tensor, List[int]]:
    """x (N, C, *sp) padded to at least ``sizes`` with each image's per-channel minimum, split evenly
    (the extra voxel after); returns it and the start of the original on each spatial axis."""
    nd = x.dim() - 2
    target: List[int] = []
    starts: List[int] = []
    same = True
    for d in range(nd):
        s = x.shape[2 + d]
        t = max(s, sizes[d])
        target.append(t)
        starts.append((t - s) // 2)
        if t != s:
            same = False
    if same:
        return x, starts
    fill = x.flatten(2).amin(dim=2)  # (N, C)
    shape = [x.shape[0], x.shape[1]] + target
    view_shape = [x.shape[0], x.shape[1]] + [1] * nd
    out = fill.reshape(view_shape).expand(shape).clone()
    inner = out
    for d in range(nd):
        inner = inner.narrow(2 + d, starts[d], x.shape[2 + d])
    inner.copy_(x)
    return out, starts


def _crop(x: Tensor, first: int, starts: List[int], sizes: List[int]) -> Tensor:
    """The window ``starts``/``sizes`` of the spatial axes of ``x``, which begin at axis ``first``."""
    for d in range(len(sizes)):
        x = x.narrow(first + d, starts[d], sizes[d])
    return x


def _upsample(x: Tensor, size: List[int]) -> Tensor:
    if x.dim() == 4:
        return F.interpolate(x, size=size, mode="bilinear", align_corners=False)
    return F.interpolate(x, size=size, mode="trilinear", align_corners=False)


class _Sampler(nn.Module):
    """What every exported sampler shares: padding, input checks, normalisation, metadata."""

    def __init__(self, model: nn.Module, *, num_samples: int, normalize: str = "none",
                 ct_window: Tuple[float, float] = (0.0, 1.0), model_name: str = ""):
        super().__init__()
        self.spatial_dims: int = int(model.spatial_dims)
        self.in_channels: int = int(model.in_channels)
        self.num_classes: int = int(model.num_classes)
        self.divisor: int = int(model.divisor)
        self.num_samples: int = int(num_samples)
        self.normalize_mode: str = str(normalize)
        self.ct_low: float = float(ct_window[0])
        self.ct_high: float = float(ct_window[1])
        self.model_name: str = model_name
        self.latent_dim: int = 0  # > 0: the model takes ``noise`` (B, S, latent_dim)

    @torch.jit.export
    def normalize(self, image: Tensor) -> Tensor:
        """``data.normalize`` of the checkpoint on raw intensities image (B, C_in, *spatial), per image
        and channel: ``none``; ``zscore`` (x - mean) / max(std, 1e-6), std with ddof 0; ``ct_window``
        clip to [low, high] and scale to [0, 1]."""
        x = image.float()
        if self.normalize_mode == "zscore":
            flat = x.flatten(2)
            mean = flat.mean(dim=2)
            std = flat.std(dim=2, unbiased=False).clamp(min=1e-6)
            shape = [x.shape[0], x.shape[1]] + [1] * (x.dim() - 2)
            return (x - mean.reshape(shape)) / std.reshape(shape)
        if self.normalize_mode == "ct_window":
            return (x.clamp(self.ct_low, self.ct_high) - self.ct_low) / (self.ct_high - self.ct_low)
        return x

    @torch.jit.export
    def pad_min(self, image: Tensor, sizes: List[int]) -> Tensor:
        """image (B, C, *spatial) padded to at least ``sizes`` with its per-channel minimum, split evenly."""
        return _pad_min(image, sizes)[0]

    def _check(self, image: Tensor) -> None:
        if image.dim() != self.spatial_dims + 2:
            raise ValueError("image must be (B, C_in, *spatial) with " + str(self.spatial_dims) + " spatial dims")
        if image.shape[1] != self.in_channels:
            raise ValueError("image must have " + str(self.in_channels) + " channels")

    def _padded(self, image: Tensor) -> Tuple[Tensor, List[int]]:
        self._check(image)
        sizes: List[int] = []
        for s in image.shape[2:]:
            sizes.append(-(-s // self.divisor) * self.divisor)
        return _pad_min(image.float(), sizes)

    @torch.jit.export
    def sample_context(self, image: Tensor) -> Tensor:
        """The image-level conditioning (B, 2, latent_dim): the prior's mean and scale of the whole image
        (padded as :meth:`forward` pads); an empty (B, 2, 0) for models without one."""
        x, _ = self._padded(image)
        return self._context(x)

    def _context(self, x: Tensor) -> Tensor:
        return torch.zeros([x.shape[0], 2, 0], device=x.device)

    def forward(self, image: Tensor, noise: Optional[Tensor] = None, generator: Optional[torch.Generator] = None,
                num_samples: int = 0, context: Optional[Tensor] = None) -> Tensor:
        x, starts = self._padded(image)
        n = num_samples if num_samples > 0 else self.num_samples
        if noise is not None:
            if self.latent_dim == 0:
                raise ValueError("noise: this model has no fixed-size per-sample draw; pass a generator instead")
            if noise.dim() != 3 or noise.shape[2] != self.latent_dim:
                raise ValueError("noise must be (B, S, latent_dim) with latent_dim " + str(self.latent_dim))
            n = noise.shape[1]
        if n < 1:
            raise ValueError("num_samples must be >= 1")
        logits = self._sample(x, n, noise, generator, context)
        return _crop(logits, 3, starts, image.shape[2:])

    def _sample(self, x: Tensor, num_samples: int, noise: Optional[Tensor], g: Optional[torch.Generator],
                context: Optional[Tensor]) -> Tensor:
        raise NotImplementedError("subclass")


def _rows(t: Tensor, b: int) -> Tensor:
    """A per-image tensor (1 or B, ...) for B images: a single row is shared by all."""
    if t.shape[0] == 1 and b != 1:
        return t.expand([b] + list(t.shape[1:]))
    return t


# ----------------------------------------------------------------------------- U-Net bodies


class UNetPort(nn.Module):
    """:class:`probunet.models.unet.UNet`'s forward: image -> features (B, features[0], *sp) or logits."""

    def __init__(self, unet: nn.Module):
        super().__init__()
        self.encoder = EncoderPort(unet.encoder)
        self.decoder = unet.decoder
        self.has_head: bool = unet.head is not None
        self.head = unet.head if unet.head is not None else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        skips = self.encoder(x)
        h = skips[-1]
        n = len(skips)
        j = 0
        for block in self.decoder:
            skip = skips[n - 2 - j]
            h = block(torch.cat([_upsample(h, skip.shape[2:]), skip], dim=1))
            j += 1
        if self.has_head:
            h = self.head(h)
        return h


class EncoderPort(nn.Module):
    """:class:`probunet.models.unet.Encoder`: x -> the per-level features."""

    def __init__(self, encoder: nn.Module):
        super().__init__()
        self.pool = encoder.pool
        self.levels = encoder.levels

    def forward(self, x: Tensor) -> List[Tensor]:
        outs: List[Tensor] = []
        i = 0
        for level in self.levels:
            if i > 0:
                x = self.pool(x)
            x = level(x)
            outs.append(x)
            i += 1
        return outs


# ----------------------------------------------------------------------------- prob_unet


class ProbUNetSampler(_Sampler):
    """The Probabilistic U-Net: U-Net and prior once per image, f_comb once per sample (all S in one
    batched call: ``W_f * features`` once, ``W_z * z + b`` per sample, then the 1x1 layers)."""

    def __init__(self, model: nn.Module, **kw):
        super().__init__(model, **kw)
        self.latent_dim = int(model.latent_dim)
        self.unet = UNetPort(model.unet)
        self.has_prior: bool = model.prior_net is not None
        if model.prior_net is not None:
            self.prior_encoder = EncoderPort(model.prior_net.encoder)
            self.prior_proj = model.prior_net.head.proj
        else:
            self.prior_encoder = EncoderPort(model.posterior_net.encoder)  # unused; keeps the type fixed
            self.prior_proj = nn.Linear(1, 2 * self.latent_dim)
        fc = model.fcomb
        f = int(fc.feature_channels)
        w = fc.first.weight.detach()
        # the first 1x1 conv of f_comb over [features; z], split as in probunet.models.fcomb
        self.w_feat = nn.Parameter(w[:, :f].reshape(w.shape[0], f, *([1] * self.spatial_dims)).clone(),
                                   requires_grad=False)
        self.w_z = nn.Parameter(w[:, f:].clone(), requires_grad=False)
        self.b_z = nn.Parameter(fc.first.bias.detach().clone(), requires_grad=False)
        self.rest = nn.Sequential(*list(fc.rest))  # ReLU, 1x1 conv, ..., 1x1 conv to logits

    def _context(self, x: Tensor) -> Tensor:
        b = x.shape[0]
        if not self.has_prior:
            loc = torch.zeros([b, self.latent_dim], device=x.device)
            return torch.stack([loc, torch.ones_like(loc)], dim=1)
        feats = self.prior_encoder(x)[-1]
        pooled = feats.flatten(2).float().mean(dim=2)  # (B, F): spatial mean
        params = self.prior_proj(pooled)
        mu = params[:, : self.latent_dim]
        log_sigma = params[:, self.latent_dim:].clamp(-10.0, 10.0)
        return torch.stack([mu, torch.exp(log_sigma)], dim=1)  # (B, 2, D)

    def _sample(self, x: Tensor, num_samples: int, noise: Optional[Tensor], g: Optional[torch.Generator],
                context: Optional[Tensor]) -> Tensor:
        b = x.shape[0]
        if noise is not None:
            eps = _rows(noise.to(x.device, torch.float32), b)
        else:
            eps = _randn([b, num_samples, self.latent_dim], g, x.device)
        features = self.unet(x)
        ctx = self._context(x) if context is None else _rows(context.to(x.device, torch.float32), b)
        z = ctx[:, 0].unsqueeze(1) + ctx[:, 1].unsqueeze(1) * eps  # (B, S, D)
        if self.spatial_dims == 2:
            feat_term = F.conv2d(features, self.w_feat)
        else:
            feat_term = F.conv3d(features, self.w_feat)
        bias = F.linear(z, self.w_z, self.b_z)  # (B, S, F_out)
        bias = bias.reshape([b, num_samples, bias.shape[2]] + [1] * self.spatial_dims)
        h = (feat_term.unsqueeze(1) + bias).flatten(0, 1)  # (B*S, F_out, *sp)
        out = self.rest(h)  # (B*S, C, *sp)
        return out.reshape([b, num_samples] + list(out.shape[1:]))


# ----------------------------------------------------------------------------- zoo


class UNetBaselineSampler(_Sampler):
    """``unet``: logits once; ``pixelwise`` draws u ~ U[0, 1) (B, S, 1, *sp), ``argmax`` repeats them."""

    def __init__(self, model: nn.Module, **kw):
        super().__init__(model, **kw)
        self.net = UNetPort(model.net)
        self.pixelwise: bool = model.sampling == "pixelwise"
        from ..models.zoo.unet_baseline import DRAWN_LOGIT_GAP

        self.gap: float = float(DRAWN_LOGIT_GAP)

    def _sample(self, x: Tensor, num_samples: int, noise: Optional[Tensor], g: Optional[torch.Generator],
                context: Optional[Tensor]) -> Tensor:
        logits = self.net(x)
        b, c = logits.shape[0], logits.shape[1]
        if not self.pixelwise:
            return logits.unsqueeze(1).expand([b, num_samples] + list(logits.shape[1:])).clone()
        probs = torch.softmax(logits.float(), dim=1)
        cum = probs.cumsum(dim=1).unsqueeze(1)  # (B, 1, C, *sp)
        u = _rand([b, num_samples, 1] + list(logits.shape[2:]), g, x.device)
        cls = (u >= cum).sum(dim=2, keepdim=True).clamp(max=c - 1)  # (B, S, 1, *sp)
        classes = torch.arange(c, device=x.device).reshape([1, 1, c] + [1] * (logits.dim() - 2))
        zero = torch.zeros([1], device=x.device)
        return torch.where(cls == classes, zero, zero - self.gap)


class EnsembleSampler(_Sampler):
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


class MCDropoutSampler(_Sampler):
    """``mc_dropout``: encoder once; decoder per sample with channel dropout masks u >= p, drawn
    ``chunk_size`` samples at a time, block after block (as the model draws them)."""

    def __init__(self, model: nn.Module, **kw):
        super().__init__(model, **kw)
        self.encoder = EncoderPort(model.encoder)
        self.decoder = model.decoder
        self.head = model.head
        self.p: float = float(model.dropout)
        self.mc: bool = bool(model.mc_sampling)
        self.chunk: int = _chunk_of(model)

    def _drop(self, x: Tensor, active: bool, g: Optional[torch.Generator]) -> Tensor:
        if not active or self.p == 0.0:
            return x
        shape = [x.shape[0], x.shape[1]] + [1] * self.spatial_dims
        keep = (_rand(shape, g, x.device) >= self.p).to(x.dtype)
        return x * (keep / (1.0 - self.p))

    def _decode(self, skips: List[Tensor], repeats: int, active: bool, g: Optional[torch.Generator]) -> Tensor:
        h = skips[-1].repeat_interleave(repeats, dim=0)
        if len(self.decoder) == 0:
            h = self._drop(h, active, g)
        n = len(skips)
        j = 0
        for block in self.decoder:
            skip = skips[n - 2 - j]
            h = _upsample(h, skip.shape[2:])
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


class SSNSampler(_Sampler):
    """``ssn``: mean, low-rank factor P and diagonal d once; eta = mu + P eps_R + sqrt(d) eps_N per sample,
    eps_R (B, n, R) then eps_N (B, n, C, *sp) drawn ``chunk_size`` samples at a time."""

    def __init__(self, model: nn.Module, **kw):
        super().__init__(model, **kw)
        self.body = UNetPort(model.body)
        self.mean_head, self.diag_head, self.factor_head = model.mean_head, model.diag_head, model.factor_head
        self.rank: int = int(model.rank)
        self.diag_eps: float = float(model.diag_eps)
        self.roi_image: bool = model.roi == "image"
        self.roi_dilation: int = int(model.roi_dilation)
        self.roi_threshold: float = float(model.roi_threshold)
        self.chunk: int = _chunk_of(model)

    def _roi_mask(self, image: Tensor) -> Tensor:
        fg = (image.float().abs() > self.roi_threshold).any(dim=1, keepdim=True).float()
        if self.roi_dilation == 0:
            return fg
        k = 2 * self.roi_dilation + 1
        if self.spatial_dims == 2:
            return F.max_pool2d(fg, kernel_size=k, stride=1, padding=self.roi_dilation)
        return F.max_pool3d(fg, kernel_size=k, stride=1, padding=self.roi_dilation)

    def _sample(self, x: Tensor, num_samples: int, noise: Optional[Tensor], g: Optional[torch.Generator],
                context: Optional[Tensor]) -> Tensor:
        f = self.body(x).float()
        b = f.shape[0]
        mean = self.mean_head(f)
        diag = F.softplus(self.diag_head(f))
        factor = self.factor_head(f).reshape([b, self.rank, self.num_classes] + list(f.shape[2:]))
        if self.roi_image:
            mask = self._roi_mask(x)
            diag = diag * mask
            factor = factor * mask.unsqueeze(1)
        diag = diag + self.diag_eps
        flat = factor.flatten(2)  # (B, R, C*prod(sp))
        sd = diag.sqrt().unsqueeze(1)
        chunks: List[Tensor] = []
        for start in range(0, num_samples, self.chunk):
            n = min(self.chunk, num_samples - start)
            eps_rank = _randn([b, n, self.rank], g, x.device)
            eps_diag = _randn([b, n] + list(mean.shape[1:]), g, x.device)
            low = torch.einsum("bsr,brn->bsn", eps_rank, flat).reshape(eps_diag.shape)
            chunks.append(mean.unsqueeze(1) + low + sd * eps_diag)
        return torch.cat(chunks, dim=1)


def _latent(params: Tensor, g: Optional[torch.Generator]) -> Tensor:
    """z = mu + sigma * eps of one latent level from its head's output (B, 2K, *sp) on fp32 features,
    as probunet.models.zoo._common.latent_level."""
    params = params.float()
    k = params.shape[1] // 2
    mu = params[:, :k]
    sigma = params[:, k:].clamp(-10.0, 10.0).exp()
    return mu + sigma * _randn(list(mu.shape), g, mu.device)


class _HpuStage(nn.Module):
    """Step j of the hierarchical U-Net's decoder: [up block], [latent head, [merge block]]."""

    def __init__(self, up: Optional[nn.Module], head: Optional[nn.Module], merge: Optional[nn.Module]):
        super().__init__()
        self.has_up: bool = up is not None
        self.has_latent: bool = head is not None
        self.has_merge: bool = merge is not None
        self.up = up if up is not None else nn.Identity()
        self.head = head if head is not None else nn.Identity()
        self.merge = merge if merge is not None else nn.Identity()


class HPUNetSampler(_Sampler):
    """``hpu_net``: the prior net's encoder once; per chunk of ``chunk_size`` samples the decoder with
    z_l drawn level after level (coarsest first)."""

    def __init__(self, model: nn.Module, **kw):
        super().__init__(model, **kw)
        net = model.prior_net
        self.pool = net.pool
        self.encoder = net.encoder
        stages = []
        for j in range(len(net.up) + 1):
            latent = j < net.latent_levels
            stages.append(_HpuStage(net.up[j - 1] if j > 0 else None, net.latent_heads[j] if latent else None,
                                    net.merge[j] if latent and j < len(net.merge) else None))
        self.stages = nn.ModuleList(stages)
        self.head = net.head
        self.chunk: int = _chunk_of(model)

    def _sample(self, x: Tensor, num_samples: int, noise: Optional[Tensor], g: Optional[torch.Generator],
                context: Optional[Tensor]) -> Tensor:
        skips: List[Tensor] = []
        i = 0
        h = x
        for level in self.encoder:
            h = level(self.pool(h) if i > 0 else h)
            skips.append(h)
            i += 1
        b = x.shape[0]
        chunks: List[Tensor] = []
        for start in range(0, num_samples, self.chunk):
            n = min(self.chunk, num_samples - start)
            h = skips[-1].repeat_interleave(n, dim=0)
            j = 0
            for stage in self.stages:
                if stage.has_up:
                    skip = skips[len(skips) - 1 - j].repeat_interleave(n, dim=0)
                    h = stage.up(torch.cat([_upsample(h, skip.shape[2:]), skip], dim=1))
                if stage.has_latent:
                    z = _latent(stage.head(h.float()), g)
                    if stage.has_merge:
                        h = stage.merge(torch.cat([h, z.to(h.dtype)], dim=1))
                j += 1
            logits = self.head(h)
            chunks.append(logits.reshape([b, n] + list(logits.shape[1:])))
        return torch.cat(chunks, dim=1)


class _PhisegStage(nn.Module):
    """Latent level j of PHiSeg: the prior's [z_in, combine] and head, the likelihood's z_in, [merge], head."""

    def __init__(self, z_in: Optional[nn.Module], combine: Optional[nn.Module], head: nn.Module,
                 lik_in: nn.Module, lik_merge: Optional[nn.Module], lik_head: nn.Module):
        super().__init__()
        self.conditioned: bool = z_in is not None
        self.z_in = z_in if z_in is not None else nn.Identity()
        self.combine = combine if combine is not None else nn.Identity()
        self.head = head
        self.lik_in = lik_in
        self.has_merge: bool = lik_merge is not None
        self.lik_merge = lik_merge if lik_merge is not None else nn.Identity()
        self.lik_head = lik_head


class PHiSegSampler(_Sampler):
    """``phiseg``: the prior hierarchy's encoder once; per chunk, z_L .. z_1 drawn coarsest first, then the
    likelihood net's finest logits."""

    def __init__(self, model: nn.Module, **kw):
        super().__init__(model, **kw)
        prior, lik = model.prior_net, model.likelihood
        self.encoder = EncoderPort(prior.encoder)
        self.context_blocks = prior.context
        self.latent_levels: int = int(prior.latent_levels)
        stages = []
        for j in range(self.latent_levels):
            stages.append(_PhisegStage(prior.z_in[j - 1] if j > 0 else None, prior.combine[j - 1] if j > 0 else None,
                                       prior.heads[j], lik.z_in[j], lik.merge[j - 1] if j > 0 else None,
                                       lik.heads[j]))
        self.stages = nn.ModuleList(stages)
        self.chunk: int = _chunk_of(model)

    def _features(self, x: Tensor) -> List[Tensor]:
        skips = self.encoder(x)
        h = skips[-1]
        k = 0
        for block in self.context_blocks:
            skip = skips[len(skips) - 2 - k]
            h = block(torch.cat([_upsample(h, skip.shape[2:]), skip], dim=1))
            k += 1
        feats: List[Tensor] = []
        for i in range(self.latent_levels - 1):
            feats.append(skips[i])
        feats.append(h)
        return feats

    def _sample(self, x: Tensor, num_samples: int, noise: Optional[Tensor], g: Optional[torch.Generator],
                context: Optional[Tensor]) -> Tensor:
        feats = self._features(x)
        b = x.shape[0]
        chunks: List[Tensor] = []
        for start in range(0, num_samples, self.chunk):
            n = min(self.chunk, num_samples - start)
            zs: List[Tensor] = []
            j = 0
            for stage in self.stages:  # the prior hierarchy, coarsest first
                skip = feats[self.latent_levels - 1 - j].repeat_interleave(n, dim=0)
                if stage.conditioned:
                    above = zs[j - 1]
                    h = stage.combine(torch.cat([skip, stage.z_in(_upsample(above.to(skip.dtype),
                                                                             skip.shape[2:]))], dim=1))
                else:
                    h = skip
                zs.append(_latent(stage.head(h.float()), g))
                j += 1
            out = torch.zeros([1])
            gl = torch.zeros([1])
            j = 0
            for stage in self.stages:  # the likelihood, coarsest first; the finest logits are the sample
                hl = stage.lik_in(zs[j].to(x.dtype))
                if stage.has_merge:
                    gl = stage.lik_merge(torch.cat([_upsample(gl, hl.shape[2:]), hl], dim=1))
                else:
                    gl = hl
                out = stage.lik_head(gl)
                j += 1
            chunks.append(out.reshape([b, n] + list(out.shape[1:])))
        return torch.cat(chunks, dim=1)


class MemberEnsembleSampler(_Sampler):
    """``ensemble`` of any member model (``model.member``): sample s from member s mod M, each member
    the exported sampler of its own model. With ``noise`` member m takes the rows of its samples;
    without, member after member (in member order) draws its samples from the generator, as
    :class:`probunet.models.zoo.member_ensemble.MemberEnsemble` does."""

    def __init__(self, model: nn.Module, **kw):
        super().__init__(model, **kw)
        member_cls = SAMPLERS[model.member_name]
        self.members = nn.ModuleList([member_cls(m, **kw) for m in model.members])
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


SAMPLERS = {
    "prob_unet": ProbUNetSampler,
    "unet": UNetBaselineSampler,
    "ensemble": EnsembleSampler,
    "mc_dropout": MCDropoutSampler,
    "ssn": SSNSampler,
    "hpu_net": HPUNetSampler,
    "phiseg": PHiSegSampler,
    "member_ensemble": MemberEnsembleSampler,
}

__all__ = ["SAMPLERS"]
