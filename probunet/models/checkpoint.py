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
import math
import logging
import re
import struct
from pathlib import Path
from typing import Iterator

import torch

from ..utils import atomic_save

logger = logging.getLogger(__name__)

CHECKPOINT_FORMAT = 2  # 2: with "digest"; 1: without
DIGEST_KEY = "digest"
_NOT_HASHED = (DIGEST_KEY, "path")  # "path" is added by load_checkpoint


class CheckpointError(ValueError):
    """A checkpoint cannot be written or read; the message names the file."""


# ----------------------------------------------------------------------------- walking a state
#
# A loaded pickle may share references: ``x = [x] * 10`` nested eight times is a few hundred bytes
# on disk and 10**8 entries to walk. So before any walk, :func:`measure` visits every container
# once (by id) and computes, for the walk as it would unfold, the number of entries, the depth and
# the work (characters of the names it builds, bytes it hashes); a structure over the limits is
# refused (StructureTooLarge) in time linear in the number of distinct objects. The walk itself
# is unchanged, so digests of existing checkpoints stay valid.

MAX_DEPTH = 64  # nesting of dicts / lists / tuples
MAX_ENTRIES = 1_000_000  # entries of the unfolded walk (containers and leaves)


class StructureTooLarge(ValueError):
    """A nested structure whose walk would be too deep, too long or refer to itself."""


def _leaf_work(v) -> int:
    if isinstance(v, torch.Tensor):
        return v.numel() * v.element_size()  # what hashing it reads (a stride-0 view counts in full)
    if isinstance(v, (str, bytes, bytearray)):
        return len(v)
    return 16


def measure(obj, max_depth: int = MAX_DEPTH, max_entries: int = MAX_ENTRIES) -> tuple[int, int, int]:
    """(entries, depth, work) of :func:`_walk` over ``obj`` without walking it: each container is
    visited once (by id). Raises StructureTooLarge past ``max_depth`` or ``max_entries``, or for
    a container that contains itself."""
    memo: dict[int, tuple[int, int, int]] = {}
    active: set[int] = set()

    def key_cost(k) -> int:
        if isinstance(k, (str, int, float, bool, type(None))):
            return len(str(k)) + 2 if not isinstance(k, str) else len(k) + 2
        return visit(k, 1)[2] + 2  # a tuple key: str(k) unfolds it

    def visit(o, depth: int) -> tuple[int, int, int]:
        if not isinstance(o, (dict, list, tuple)):
            return 1, 0, _leaf_work(o)
        if depth > max_depth:
            raise StructureTooLarge(f"nested more than {max_depth} levels deep")
        oid = id(o)
        if oid in memo:
            return memo[oid]
        if oid in active:
            raise StructureTooLarge("a container that contains itself")
        active.add(oid)
        n, d, w = (0, 0, 0) if isinstance(o, dict) else (1, 0, 16)
        children = o.items() if isinstance(o, dict) else enumerate(o)
        for k, v in children:
            cn, cd, cw = visit(v, depth + 1)
            suffix = key_cost(k) if isinstance(o, dict) else len(str(k)) + 2
            n, d, w = n + cn, max(d, cd + 1), w + cw + cn * suffix  # every entry below carries the name
            if n > max_entries:
                raise StructureTooLarge(f"more than {max_entries:,} entries (shared references unfolded)")
        active.discard(oid)
        memo[oid] = (n, d, w)
        return n, d, w

    return visit(obj, 0)


def _walk(obj, name: str = "", *, checked: bool = False) -> Iterator[tuple[str, object]]:
    """(dotted name, leaf) for every leaf of nested dicts / lists / tuples, in a fixed order.

    The structure is measured first (:func:`measure`; StructureTooLarge when over the limits)."""
    if not checked:
        measure(obj)
    yield from _unfold(obj, name)


def _unfold(obj, name: str = "") -> Iterator[tuple[str, object]]:
    if isinstance(obj, dict):
        for k in sorted(obj, key=lambda k: (type(k).__name__, str(k))):
            if not name and k in _NOT_HASHED:
                continue
            yield from _unfold(obj[k], f"{name}.{k}" if name else str(k))
    elif isinstance(obj, (list, tuple)):
        yield name, f"<{type(obj).__name__}:{len(obj)}>"
        for i, v in enumerate(obj):
            yield from _unfold(v, f"{name}[{i}]")
    else:
        yield name, obj


def check_structure(obj, path, file_size: int) -> None:
    """Refuse (CheckpointError naming ``path``) a loaded object whose walk would be too deep, too
    long, self-referential, or do more work than a few times the file's size (shared references
    or stride-0 tensors that unfold into far more than the file holds)."""
    try:
        entries, depth, work = measure(obj)
    except StructureTooLarge as exc:
        raise CheckpointError(f"{path}: refused: its content is an over-large structure ({exc}); "
                              f"not a probunet checkpoint") from None
    budget = 4 * int(file_size) + (64 << 20)
    if work > budget:
        raise CheckpointError(f"{path}: refused: its content unfolds into {work:,} bytes to read, far more than "
                              f"the file's {file_size:,} bytes (shared references or stride-0 tensors); "
                              f"not a probunet checkpoint")


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


def standard_layout(obj):
    """``obj`` with every tensor in it (through dicts, lists and tuples) in the standard contiguous
    layout: a model trained channels-last is saved as one trained in the standard layout, so its
    checkpoint loads and resumes under either layout."""
    if isinstance(obj, torch.Tensor):
        return obj.contiguous()
    if isinstance(obj, dict):
        return {k: standard_layout(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(standard_layout(v) for v in obj)
    return obj


def save_checkpoint(state: dict, path: str | Path) -> Path:
    """Write ``state`` plus its digest to ``path`` atomically (temp file + rename), every tensor in
    the standard layout (:func:`standard_layout`).

    Raises CheckpointError (nothing written, the previous file untouched) when a
    tensor of the model, optimizer, scaler or GECO state is not finite.
    """
    path = Path(path)
    bad = non_finite({k: state.get(k) for k in _CHECKED_SECTIONS if state.get(k) is not None})
    if bad:
        shown = ", ".join(bad[:3]) + (f" and {len(bad) - 3} more" if len(bad) > 3 else "")
        raise CheckpointError(f"{path}: not written: non-finite values (NaN/Inf) in {shown}")
    state = {k: standard_layout(v) for k, v in state.items() if k not in _NOT_HASHED}
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
    check_structure(ckpt, path, path.stat().st_size)
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


class _NoRandomInit(torch.overrides.TorchFunctionMode):
    """Random in-place initialisation is skipped (on the meta device it computes nothing, but its
    first call imports PyTorch's decompositions: seconds)."""

    _SKIPPED = frozenset({"normal_", "uniform_", "trunc_normal_", "erfinv_", "random_", "bernoulli_",
                          "log_normal_", "exponential_", "cauchy_", "geometric_"})

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if getattr(func, "__name__", "") in self._SKIPPED:
            target = args[0] if args else kwargs.get("tensor", kwargs.get("self"))
            if isinstance(target, torch.Tensor):
                return target
        return func(*args, **kwargs)


def _check_weights_fit(cfg, weights: dict, where) -> None:
    """Compare the model the config describes (built on PyTorch's ``meta`` device: shapes only,
    nothing allocated) with the stored weights, before the real model is built: a config that
    claims a far larger model than the file holds (``features=[4096]`` over 150 KB of weights)
    is refused without allocating it."""
    from . import build_model

    try:
        with torch.device("meta"), _NoRandomInit():
            ghost = build_model(cfg.model)
        expected = {k: tuple(v.shape) for k, v in ghost.state_dict().items()}
    except Exception as exc:  # noqa: BLE001 - a model that cannot be built on meta is checked after building
        logger.debug("%s: shape check on the meta device skipped (%s)", where, exc)
        return
    stored = {k: tuple(v.shape) for k, v in weights.items() if isinstance(v, torch.Tensor)}
    n_expected = sum(math.prod(s) for s in expected.values())
    n_stored = sum(math.prod(s) for s in stored.values())
    if expected == stored:
        return
    if set(expected) != set(stored):
        detail = "missing or unexpected tensors"
    else:
        detail = "tensor shapes differ"
    raise CheckpointError(f"{where}: the weights do not match the model its stored config describes ({detail}: "
                          f"the config implies {n_expected:,} values, the file holds {n_stored:,}); "
                          f"nothing was built")


def load_model(path: str | Path, map_location="cpu"):
    """Model (eval mode) and its resolved config from a checkpoint or run directory.

    A stored config that fails validation, or weights that do not fit the model
    the config describes, are a CheckpointError naming the file.
    """
    from ..config import ConfigError, from_dict
    from . import build_model

    ckpt = load_checkpoint(path, map_location)
    where = ckpt["path"]
    try:
        cfg = from_dict(ckpt["config"])
    except (ConfigError, TypeError, ValueError, KeyError) as exc:
        msg = str(exc).strip().splitlines()[0] if str(exc).strip() else exc.__class__.__name__
        raise CheckpointError(f"{where}: the config stored in the checkpoint is invalid: {msg}") from None
    _check_weights_fit(cfg, ckpt["model"], where)
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
