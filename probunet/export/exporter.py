"""Export a trained model's sampler for use without probunet: TorchScript, ONNX, or a MONAI Bundle.

``probunet export RUN_OR_CHECKPOINT --format torchscript|onnx|bundle --out FILE_OR_DIR
[--num-samples S]`` and, in Python, :func:`export_model`.

The exported sampler (TorchScript: ``torch.jit.load(FILE)``, nothing else needed)::

    logits = sampler(image, noise=None, generator=None, num_samples=0, context=None)
    image   (B, C_in, *spatial) float32, after the checkpoint's ``data.normalize``
            (``sampler.normalize(raw)`` applies it: none, zscore per image and
            channel, or ct_window), any spatial size (padded inside to a multiple
            of ``sampler.divisor`` with the per-channel minimum, cropped back)
    noise   a latent model's draws eps (B or 1, S, latent_dim) where its sampler takes them
            (the Probabilistic U-Net: z = mu + sigma * eps); other models: None
    generator  a CPU torch.Generator (torch.Generator().manual_seed(seed)): every random
            number drawn from it in the order of the model's own ``sample(generator=...)``;
            None: torch's global RNG
    logits  (B, S, C, *spatial) float32 sample logits

For the Probabilistic U-Net the fast path is kept: the U-Net and the prior net run
once per image and only f_comb runs per sample (all S in one batched call).
``sampler.sample_context(image)`` gives the prior's mean and scale of an image
(B, 2, latent_dim), for sliding windows that share the whole image's prior.

The samples equal those of :class:`probunet.inference.predictor.Predictor` for the same
noise: ``probunet predict`` (seed K, case id ID) draws sample s of a
Probabilistic U-Net from ``eps = probunet.inference.case_noise(K, ID, S, (latent_dim,))``,
and for the zoo's models from ``torch.Generator().manual_seed(probunet.inference.case_seed(K, ID))``
(the ``generator`` argument here).

ONNX (``--format onnx``, needs the ``onnx`` extra): a model whose sampler takes noise rows as
``logits = f(image, noise)`` (inputs named ``image`` and ``noise``; batch, samples and spatial
axes dynamic; the spatial sizes must be multiples of ``divisor``, since the graph does not pad),
and models without random draws as ``f(image)`` with S fixed at export. A model that draws
random numbers inside the network, which ONNX cannot seed to match torch, is refused with the
reason its spec gives (``onnx_refusal``; export TorchScript instead).

Each model states how it exports in its spec (:class:`probunet.models.spec.ModelSpec`): its own
TorchScript-ready sampler, kept beside the model, or the reason it has none.

The bundle (``--format bundle``) is written by :mod:`probunet.export.bundle`.

Every file is written atomically; an existing output is replaced only with
``overwrite``; the checkpoint is never overwritten.
"""

from __future__ import annotations

import io
import json
import logging
import os
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch

from .. import __version__
from ..models.checkpoint import load_model, resolve_checkpoint_path
from ..utils import atomic_call

logger = logging.getLogger(__name__)

EXPORT_FORMATS = ("torchscript", "onnx", "bundle")
METADATA_FILE = "probunet.json"  # the TorchScript file's extra file with the export's metadata


class ExportError(ValueError):
    """A model or option the exporter cannot serve (a user error: one line)."""


@dataclass
class ExportResult:
    """What :func:`export_model` wrote: ``path`` (file or bundle folder) and every file with its size in bytes."""

    path: Path
    format: str
    files: dict = field(default_factory=dict)

    @property
    def size(self) -> int:
        return sum(self.files.values())


# ----------------------------------------------------------------------------- building the sampler


def spec_of_model(model):
    """The registered spec of ``model`` (:class:`probunet.models.spec.ModelSpec`); ExportError naming the
    model's class when it has none."""
    from ..models.registry import spec_of

    try:
        return spec_of(model)
    except ValueError:
        raise ExportError(f"model {type(model).__name__}: the exporter has no sampler for it (no registered model "
                          f"spec has this class; register one with probunet.models.register_model)") from None


def _check_num_samples(num_samples) -> None:
    """The sampler's default S: 1 .. :data:`probunet.guards.MAX_SAMPLES`, as evaluate and predict."""
    from ..guards import MAX_SAMPLES

    if not 1 <= int(num_samples) <= MAX_SAMPLES:
        raise ExportError(f"--num-samples must be in 1..{MAX_SAMPLES}, got {num_samples}")


def build_sampler(model, cfg=None, *, num_samples: int = 16) -> torch.nn.Module:
    """The exported sampler of ``model`` as an eager module (see the module docstring for its call).

    ``cfg`` (the checkpoint's :class:`probunet.config.Config`) gives ``data.normalize`` for
    :meth:`normalize`; without it, ``none``.
    """
    _check_num_samples(num_samples)
    spec = spec_of_model(model)
    refusal = spec.export_refusal_of(model)
    if refusal:
        raise ExportError(f"model {spec.name} cannot be exported: {refusal}")
    normalize, window = "none", (0.0, 1.0)
    if cfg is not None:
        normalize = str(cfg.data.normalize)
        if normalize == "ct_window":
            window = tuple(float(v) for v in cfg.data.ct_window)
    model = model.cpu().eval()
    sampler = spec.sampler(model, num_samples=int(num_samples), normalize=normalize, ct_window=window,
                           model_name=spec.name)
    return sampler.eval()


def script_sampler(model, cfg=None, *, num_samples: int = 16) -> torch.jit.ScriptModule:
    """:func:`build_sampler`, compiled with ``torch.jit.script`` (frozen parameters, eval mode)."""
    sampler = build_sampler(model, cfg, num_samples=num_samples)
    for p in sampler.parameters():
        p.requires_grad_(False)
    with _quiet_jit():
        return torch.jit.script(sampler)


@contextmanager
def _quiet_jit():
    """TorchScript still compiles, saves and loads in torch 2.x but warns that it is deprecated; the
    files are what MONAI Bundles and C++ (libtorch) load, so that warning is silenced here."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=DeprecationWarning, message=r".*torch\.jit.*")
        yield


def onnx_refusal(model) -> Optional[str]:
    """Why ``model`` cannot be exported to ONNX (None: it can), as its spec says."""
    return spec_of_model(model).onnx_refusal_of(model)


def export_metadata(model, cfg, ckpt: Optional[dict], *, num_samples: int, fmt: str) -> dict:
    """The facts an exported file carries about itself (the TorchScript extra file ``probunet.json``)."""
    spec = spec_of_model(model)
    name, noise_dim = spec.name, spec.noise_dim_of(model)
    data = cfg.data if cfg is not None else None
    meta = {
        "kind": "probunet-export",
        "format": fmt,
        "probunet_version": __version__,
        "torch_version": torch.__version__,
        "model": name,
        "spatial_dims": int(model.spatial_dims),
        "in_channels": int(model.in_channels),
        "num_classes": int(model.num_classes),
        "divisor": int(model.divisor),
        "num_samples": int(num_samples),
        "latent_dim": noise_dim,
        "normalize": str(data.normalize) if data is not None else "none",
        "ct_window": list(data.ct_window) if data is not None and data.normalize == "ct_window" else None,
        "training_patch": _training_patch(cfg),
        "input": "image (B, C_in, *spatial) float32 after data.normalize (sampler.normalize(raw) applies it); "
                 "any spatial size (padded to a multiple of divisor with the per-channel minimum, cropped back)",
        "output": "logits (B, S, C, *spatial) float32; argmax over C gives sample label maps, "
                  "mean over S of softmax over C the mean probability",
        "noise": ("eps (B or 1, S, latent_dim) standard normal, z = mu + sigma * eps" if noise_dim
                  else "none: a torch.Generator (generator=) is drawn from in the model's own order"),
        "checkpoint": str(ckpt.get("path")) if ckpt else None,
        "checkpoint_digest": ckpt.get("digest") if ckpt else None,
        "step": ckpt.get("step") if ckpt else None,
        "config": cfg.to_dict() if cfg is not None else None,
    }
    return meta


def _training_patch(cfg) -> Optional[list]:
    """The training patch size per axis (``data.crop_size``, or the synthetic image size), None if unknown."""
    if cfg is None:
        return None
    from ..inference.predictor import config_roi

    roi = config_roi("config", cfg)
    if roi is None:
        return None
    nd = int(cfg.model.spatial_dims)
    sizes = [int(roi)] * nd if isinstance(roi, int) else [int(r) for r in roi]
    return sizes * nd if len(sizes) == 1 else sizes


# ----------------------------------------------------------------------------- writers


def _check_out(out: Path, ckpt_path: Optional[Path], overwrite: bool, *, folder: bool) -> None:
    if ckpt_path is not None and out.exists() and out.resolve() == ckpt_path.resolve():
        raise ExportError(f"--out {out}: would overwrite the checkpoint")
    if ckpt_path is not None and folder and ckpt_path.resolve().is_relative_to(out.resolve()):
        raise ExportError(f"--out {out}: the checkpoint {ckpt_path} lies inside it; choose another folder")
    if folder:
        if out.exists() and not out.is_dir():
            raise ExportError(f"--out {out}: exists and is not a folder")
        if out.is_dir() and any(out.iterdir()) and not overwrite:
            raise ExportError(f"--out {out}: folder exists and is not empty; pass --overwrite or choose another")
    else:
        if out.is_dir():
            raise ExportError(f"--out {out}: is a folder; name the file to write")
        if out.exists() and not overwrite:
            raise ExportError(f"--out {out}: exists; pass --overwrite to replace it")
    parent = out if folder else out.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ExportError(f"--out {out}: cannot create {parent} ({exc.strerror or exc.__class__.__name__})") from None


def save_torchscript(scripted: torch.jit.ScriptModule, path: str | Path, metadata: dict) -> Path:
    """``torch.jit.save`` with ``probunet.json`` as an extra file, atomically.

    The file is serialised in memory first and then written through :func:`probunet.utils.atomic_call`:
    TorchScript's own file writer aborts the process on a short write (a full disk), so it never
    touches the disk; a failed write is one :class:`probunet.guards.WriteError` and leaves no temp file."""
    extra = {METADATA_FILE: json.dumps(metadata, indent=1, default=str)}
    buffer = io.BytesIO()
    with _quiet_jit():
        torch.jit.save(scripted, buffer, _extra_files=extra)
    data = buffer.getbuffer()

    def write(tmp: str) -> None:
        with open(tmp, "wb") as fh:
            fh.write(data)

    try:
        return atomic_call(path, write, suffix=Path(path).suffix or ".ts")
    finally:
        data.release()


def read_torchscript_metadata(path: str | Path) -> dict:
    """The ``probunet.json`` a TorchScript export carries."""
    extra = {METADATA_FILE: ""}
    with _quiet_jit():
        torch.jit.load(str(path), map_location="cpu", _extra_files=extra)
    return json.loads(extra[METADATA_FILE])


class _OnnxNoise(torch.nn.Module):
    """ONNX wrapper of a noise-driven sampler: (image, noise) -> logits, no padding."""

    def __init__(self, sampler):
        super().__init__()
        self.sampler = sampler

    def forward(self, image, noise):
        return self.sampler._sample(image, noise.shape[1], noise, None, None)


class _OnnxFixed(torch.nn.Module):
    """ONNX wrapper of a sampler without random draws: image -> logits (S fixed), no padding."""

    def __init__(self, sampler, num_samples: int):
        super().__init__()
        self.sampler = sampler
        self.num_samples = int(num_samples)

    def forward(self, image):
        return self.sampler._sample(image, self.num_samples, None, None, None)


def save_onnx(model, path: str | Path, *, num_samples: int, opset: int = 17) -> Path:
    """Write ``model``'s sampler as ONNX (see the module docstring); ExportError where it cannot."""
    reason = onnx_refusal(model)
    if reason:
        raise ExportError(reason)
    try:
        import onnx  # noqa: F401
    except ImportError:
        raise ExportError("--format onnx needs the onnx package: pip install 'probunet[onnx]'") from None
    sampler = build_sampler(model, num_samples=num_samples)
    d = sampler.divisor
    nd = sampler.spatial_dims
    image = torch.zeros(2, sampler.in_channels, *([2 * d] * nd))
    spatial = {2 + i: f"spatial{i}" for i in range(nd)}
    if sampler.latent_dim:
        wrapper, args = _OnnxNoise(sampler), (image, torch.zeros(2, 3, sampler.latent_dim))
        names = ["image", "noise"]
        axes = {"image": {0: "batch", **spatial}, "noise": {0: "batch", 1: "samples"},
                "logits": {0: "batch", 1: "samples", **{k + 1: v for k, v in spatial.items()}}}
    else:
        wrapper, args = _OnnxFixed(sampler, num_samples), (image,)
        names = ["image"]
        axes = {"image": {0: "batch", **spatial}, "logits": {0: "batch", **{k + 1: v for k, v in spatial.items()}}}
    wrapper.eval()

    def write(tmp):
        with torch.no_grad():
            torch.onnx.export(wrapper, args, str(tmp), input_names=names, output_names=["logits"],
                              dynamic_axes=axes, opset_version=opset, dynamo=False)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the tracer's notes on shape arithmetic
        return atomic_call(path, write, suffix=".onnx")


# ----------------------------------------------------------------------------- entry point


def export_model(source, fmt: str, out: str | Path, *, num_samples: int = 16, overwrite: bool = False,
                 seed: int = 0, roi_size="config", overlap: float = 0.25, blend: str = "gaussian",
                 evaluation: Optional[str | Path] = None) -> ExportResult:
    """Export a checkpoint or run directory ``source`` as ``fmt`` (one of :data:`EXPORT_FORMATS`) to ``out``.

    torchscript / onnx: ``out`` is the file; bundle: ``out`` is the bundle folder, and ``seed``,
    ``roi_size`` (``"config"``: the training patch), ``overlap``, ``blend`` are the bundle's
    inference settings, ``evaluation`` an evaluation ``summary.json`` for the model card (default:
    ``RUN/eval/summary.json`` when it exists). Returns the files written with their sizes.
    """
    from ..options import check_seed, parse_roi

    if fmt not in EXPORT_FORMATS:
        raise ExportError(f"--format must be one of {', '.join(EXPORT_FORMATS)}, got {fmt!r}")
    _check_num_samples(num_samples)
    check_seed(seed)
    parse_roi(roi_size)  # a negative --roi is refused before anything is written
    ckpt_path = resolve_checkpoint_path(source)
    out = Path(out)
    _check_out(out, ckpt_path, overwrite, folder=fmt == "bundle")
    model, cfg, ckpt = load_model(ckpt_path)
    spec = spec_of_model(model)
    name = spec.name
    refusal = spec.export_refusal_of(model)
    if refusal:  # before anything is written
        raise ExportError(f"model {name} cannot be exported: {refusal}")
    meta = export_metadata(model, cfg, ckpt, num_samples=int(num_samples), fmt=fmt)
    from ..inference.regions import export_record, load_calibration, run_dir_of_checkpoint

    meta["calibration"] = export_record(load_calibration(run_dir_of_checkpoint(source), ckpt))  # None: none
    if fmt == "bundle":
        from .bundle import write_bundle

        files = write_bundle(model, cfg, ckpt, out, meta, num_samples=int(num_samples), seed=int(seed),
                             roi_size=roi_size, overlap=overlap, blend=blend, source=Path(source),
                             evaluation=evaluation)  # checks the settings before model.ts is written
        ts = save_torchscript(script_sampler(model, cfg, num_samples=int(num_samples)), out / "models" / "model.ts",
                              meta)
        logger.info("exported %s (%s) as a MONAI Bundle to %s", ckpt_path, name, out)
        return ExportResult(out, fmt, {str(ts): ts.stat().st_size, **files})
    if fmt == "torchscript":
        save_torchscript(script_sampler(model, cfg, num_samples=int(num_samples)), out, meta)
    else:
        save_onnx(model, out, num_samples=int(num_samples))
    logger.info("exported %s (%s) as %s to %s", ckpt_path, name, fmt, out)
    return ExportResult(out, fmt, {str(out): os.path.getsize(out)})


__all__ = ["EXPORT_FORMATS", "ExportError", "ExportResult", "build_sampler", "export_metadata", "export_model",
           "onnx_refusal", "read_torchscript_metadata", "save_onnx", "save_torchscript", "script_sampler"]
