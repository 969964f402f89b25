"""Checkpoint files: atomic writes, a SHA-256 digest checked on every load, and no
non-finite tensor ever written.

A checkpoint is a ``torch.save`` dict (model, optimizer, scaler, geco, config,
step, rng, ...) plus ``digest``: SHA-256 over every entry, tensors by name, dtype,
shape and bytes, other values by type and value (:func:`state_digest`). Loading
(:func:`load_checkpoint`) uses ``torch.load(weights_only=True)`` (no code from
the file runs), recomputes the digest and refuses a file whose digest differs
(a flipped byte, a truncated or spliced file) with one line naming it. Files
written before digests existed (format 1) load with a logged warning.

:func:`save_checkpoint` refuses, before anything touches the disk, a state
holding a NaN or Inf in any floating tensor (model, optimizer moments, scaler,
GECO), so a broken model never replaces the last good checkpoint.
"""

from __future__ import annotations

import hashlib
import logging
import re
import struct
from pathlib import Path
from typing import Iterator

import torch

from .utils import atomic_save

logger = logging.getLogger(__name__)

CHECKPOINT_FORMAT = 2  # 2: with "digest"; 1: without
DIGEST_KEY = "digest"
_NOT_HASHED = (DIGEST_KEY, "path")  # "path" is added by load_checkpoint


class CheckpointError(ValueError):
    """A checkpoint cannot be written or read; the message names the file."""


# ----------------------------------------------------------------------------- walking a state


def _walk(obj, name: str = "") -> Iterator[tuple[str, object]]:
    """(dotted name, leaf) for every leaf of nested dicts / lists / tuples, in a fixed order."""
    if isinstance(obj, dict):
        for k in sorted(obj, key=lambda k: (type(k).__name__, str(k))):
            if not name and k in _NOT_HASHED:
                continue
            yield from _walk(obj[k], f"{name}.{k}" if name else str(k))
    elif isinstance(obj, (list, tuple)):
        yield name, f"<{type(obj).__name__}:{len(obj)}>"
        for i, v in enumerate(obj):
            yield from _walk(v, f"{name}[{i}]")
    else:
        yield name, obj


def state_digest(state: dict) -> str:
    """SHA-256 of a checkpoint dict (all entries but ``digest`` and ``path``).

    Tensors count by name, dtype, shape and their bytes in logical (C) order, so
    the memory format does not matter; scalars, strings and None by type and value.
    """
    h = hashlib.sha256()
    for name, v in _walk(state):
        if isinstance(v, torch.Tensor):
            t = v.detach().cpu().contiguous().reshape(-1)
            h.update(f"T|{name}|{t.dtype}|{tuple(v.shape)}|".encode())
            if t.numel():
                h.update(t.view(torch.uint8).numpy().tobytes())
        elif isinstance(v, float):
            h.update(f"F|{name}|".encode() + struct.pack("<d", v))
        else:
            h.update(f"V|{name}|{type(v).__name__}|{v!r}|".encode())
    return h.hexdigest()


def non_finite(state, prefix: str = "") -> list[str]:
    """Names of the floating-point tensors (and floats) of ``state`` holding NaN or Inf.

    ``best_metric`` and similar bookkeeping floats may be Inf by design; only
    tensors are checked.
    """
    bad = []
    for name, v in _walk(state, prefix):
        if isinstance(v, torch.Tensor) and (v.is_floating_point() or v.is_complex()) and v.numel():
            if not bool(torch.isfinite(v).all()):
                bad.append(name)
    return bad


# ----------------------------------------------------------------------------- save


_CHECKED_SECTIONS = ("model", "optimizer", "scaler", "geco")


def save_checkpoint(state: dict, path: str | Path) -> Path:
    """Write ``state`` plus its digest to ``path`` atomically (temp file + rename).

    Raises CheckpointError (nothing written, the previous file untouched) when a
    tensor of the model, optimizer, scaler or GECO state is not finite.
    """
    path = Path(path)
    bad = non_finite({k: state.get(k) for k in _CHECKED_SECTIONS if state.get(k) is not None})
    if bad:
        shown = ", ".join(bad[:3]) + (f" and {len(bad) - 3} more" if len(bad) > 3 else "")
        raise CheckpointError(f"{path}: not written: non-finite values (NaN/Inf) in {shown}")
    state = {k: v for k, v in state.items() if k not in _NOT_HASHED}
    state["format"] = CHECKPOINT_FORMAT
    state[DIGEST_KEY] = state_digest(state)
    return atomic_save(state, path)


# ----------------------------------------------------------------------------- load


_UNSUPPORTED = re.compile(r"Unsupported global: GLOBAL (\S+)|Unsupported operand (\S+)|"
                          r"(Trying to [^.\n]*)", re.IGNORECASE)


def _load_failure(path: Path, exc: BaseException) -> CheckpointError:
    text = str(exc)
    if "Weights only load failed" in text or exc.__class__.__name__ == "UnpicklingError":
        m = _UNSUPPORTED.search(text)
        what = next((g for g in m.groups() if g), "") if m else ""
        what = f" ({what})" if what else ""
        return CheckpointError(f"{path}: refused: the file asks to build objects a checkpoint never holds{what}; "
                               f"nothing was executed. It is not a probunet checkpoint, or it may be malicious")
    first = text.strip().splitlines()[0][:200] if text.strip() else ""
    if isinstance(exc, EOFError) or (not first and path.stat().st_size == 0):
        return CheckpointError(f"{path}: empty or truncated checkpoint file ({path.stat().st_size} bytes)")
    return CheckpointError(f"{path}: not a loadable probunet checkpoint ({exc.__class__.__name__}"
                           f"{': ' + first if first else ''})")


def resolve_checkpoint_path(path: str | Path) -> Path:
    """A checkpoint file, or for a run directory its ``checkpoints/best.pt`` (else ``last.pt``)."""
    path = Path(path)
    if path.is_dir():
        cand = path / "checkpoints" / "best.pt"
        path = cand if cand.is_file() else path / "checkpoints" / "last.pt"
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    return path


def load_checkpoint(path: str | Path, map_location="cpu") -> dict:
    """Load a probunet checkpoint with ``weights_only=True`` (no code runs from the file)
    and check its digest and that its tensors are finite.

    Raises FileNotFoundError / CheckpointError (a ValueError) naming the file.
    """
    path = resolve_checkpoint_path(path)
    if path.stat().st_size == 0:
        raise CheckpointError(f"{path}: empty checkpoint file (0 bytes)")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except MemoryError:
        raise CheckpointError(f"{path}: not a loadable probunet checkpoint (it asks for more memory than "
                              f"there is)") from None
    except Exception as exc:  # unpickling errors, truncated files, foreign formats
        raise _load_failure(path, exc) from None
    if not isinstance(ckpt, dict) or not isinstance(ckpt.get("model"), dict) or not isinstance(
            ckpt.get("config"), dict):
        raise CheckpointError(f"{path}: not a probunet checkpoint (no model weights and config)")
    stored = ckpt.get(DIGEST_KEY)
    if stored is None:
        logger.warning("%s: checkpoint without a digest (written by probunet before 0.2 or by hand): its "
                       "integrity cannot be verified", path)
    else:
        try:
            actual = state_digest(ckpt)
        except Exception as exc:  # exotic leaves a damaged file may hold
            raise CheckpointError(f"{path}: damaged checkpoint: its content cannot be hashed "
                                  f"({exc.__class__.__name__})") from None
        if not isinstance(stored, str) or actual != stored:
            raise CheckpointError(f"{path}: damaged checkpoint: the SHA-256 digest of its content does not match "
                                  f"the one stored when it was written (a changed byte, truncation or edit)")
    bad = non_finite({k: ckpt.get(k) for k in _CHECKED_SECTIONS if ckpt.get(k) is not None})
    if bad:
        raise CheckpointError(f"{path}: damaged checkpoint: non-finite values (NaN/Inf) in {bad[0]}"
                              + (f" and {len(bad) - 1} more tensor(s)" if len(bad) > 1 else ""))
    ckpt["path"] = str(path)
    return ckpt


def load_model(path: str | Path, map_location="cpu"):
    """Model (eval mode) and its resolved config from a checkpoint or run directory.

    A stored config that fails validation, or weights that do not fit the model
    the config describes, are a CheckpointError naming the file.
    """
    from .config import ConfigError, from_dict
    from .models import build_model

    ckpt = load_checkpoint(path, map_location)
    where = ckpt["path"]
    try:
        cfg = from_dict(ckpt["config"])
    except (ConfigError, TypeError, ValueError, KeyError) as exc:
        msg = str(exc).strip().splitlines()[0] if str(exc).strip() else exc.__class__.__name__
        raise CheckpointError(f"{where}: the config stored in the checkpoint is invalid: {msg}") from None
    try:
        model = build_model(cfg.model)
    except MemoryError:
        raise CheckpointError(f"{where}: the model its config describes does not fit in memory") from None
    try:
        model.load_state_dict(ckpt["model"])
    except (RuntimeError, KeyError, TypeError, ValueError) as exc:
        text = str(exc)
        detail = "missing or unexpected tensors" if ("Missing key" in text or "Unexpected key" in text) else \
            "tensor shapes differ" if "size mismatch" in text else exc.__class__.__name__
        raise CheckpointError(f"{where}: the weights do not match the model its stored config describes "
                              f"({detail})") from None
    model.eval()
    return model, cfg, ckpt
