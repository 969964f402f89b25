"""Checks before the work starts, and one-line errors when the machine runs out.

- :func:`ensure_writable_dir`: a folder is created (with its parents) and a file is
  created and removed in it before any long work, so a read-only or missing
  ``--out`` (or predict's ``OUTPUT_DIR``) is refused at once, naming the folder and
  the cause; every command checks its output folder with it.
- :func:`writing`: a block whose disk failures become :class:`WriteError` naming a path.
- :class:`WriteError`: a write that failed for a reason of the disk (no space left,
  quota, read-only file system, permission) as one line naming the file and the
  cause; :func:`probunet.utils.atomic_call` raises it (the temporary file removed,
  the previous file untouched).
- :func:`check_memory`: an estimate of the bytes a step will hold against the memory
  available, refused with the figures before anything is allocated;
  :func:`out_of_memory_message` turns an allocation failure that still happens into
  one line with the number of bytes asked for.
- :data:`MAX_SAMPLES`: the most samples per image ``evaluate`` and ``predict`` draw.
"""

from __future__ import annotations

import errno
import os
import re
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Optional

MAX_SAMPLES = 1000  # samples per image (evaluate, predict, validation); the papers draw 16 to 100

CAUSES = {
    errno.ENOSPC: "no space left on device",
    errno.EDQUOT: "disk quota exceeded",
    errno.EROFS: "read-only file system",
    errno.EACCES: "permission denied",
    errno.EPERM: "operation not permitted",
    errno.EFBIG: "file too large for the file system",
    errno.EIO: "input/output error of the disk",
}
# torch.save's zip writer reports a short write this way (no errno)
_TORCH_SHORT_WRITE = ("unexpected pos", "file write failed", "PytorchStreamWriter failed")


class WriteError(OSError):
    """A file or folder could not be written; ``str()`` is one line naming the path and the cause."""

    def __init__(self, path, cause: str, code: Optional[int] = None):
        super().__init__(code or 0, cause)
        self.path, self.cause = str(path), cause

    def __str__(self) -> str:
        return f"{self.path}: cannot write: {self.cause}"


def free_bytes(folder: str | Path) -> Optional[int]:
    """Bytes free to this user on the file system holding ``folder`` (its nearest existing parent)."""
    folder = Path(folder)
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    try:
        return int(shutil.disk_usage(folder).free)
    except OSError:
        return None


def write_failure(path: str | Path, exc: BaseException) -> Optional[WriteError]:
    """The :class:`WriteError` that ``exc`` (raised while writing ``path``) means, or None when it
    is not a failure of the disk."""
    if isinstance(exc, WriteError):
        return exc
    if isinstance(exc, OSError) and exc.errno in CAUSES:
        return WriteError(path, CAUSES[exc.errno], exc.errno)
    if isinstance(exc, RuntimeError) and any(s in str(exc) for s in _TORCH_SHORT_WRITE):
        free = free_bytes(Path(path).parent)
        if free is not None and free < (1 << 20):
            return WriteError(path, f"no space left on device ({free} bytes free)", errno.ENOSPC)
        first = str(exc).strip().splitlines()[0][:160]
        return WriteError(path, f"the write was cut short ({first})", errno.EIO)
    return None


@contextmanager
def writing(path: str | Path):
    """Turn a failure of the disk inside the block (no space, quota, read-only, permission) into
    :class:`WriteError` naming ``path``; other errors pass unchanged."""
    try:
        yield
    except OSError as exc:
        failure = write_failure(path, exc)
        if failure is None:
            raise
        raise failure from None


def ensure_writable_dir(folder: str | Path, what: str) -> Path:
    """Create ``folder`` (and its parents) and check a file can be created in it; WriteError
    naming ``what`` and the folder otherwise. Call it before the work starts."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise NotADirectoryError(f"{what} {folder} is a file, not a folder")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".probunet-probe.", dir=folder)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        cause = CAUSES.get(exc.errno, exc.strerror or exc.__class__.__name__)
        raise WriteError(f"{what} {folder}", cause, exc.errno) from None
    return folder


def check_free_space(folder: str | Path, need: int, what: str) -> None:
    """WriteError when the file system of ``folder`` has fewer than ``need`` bytes free."""
    free = free_bytes(folder)
    if free is not None and free < need:
        raise WriteError(folder, f"no space left on device: {size_text(free)} free, about {size_text(need)} needed for {what}",
                         errno.ENOSPC)


def size_text(n: float) -> str:
    for unit in ("bytes", "KB", "MB", "GB", "TB"):
        if abs(n) < 1024 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TB"  # pragma: no cover


def available_memory(device=None) -> Optional[int]:
    """Bytes that can still be allocated: free GPU memory for a CUDA device, else the host's
    available memory (``MemAvailable``; None where it cannot be read)."""
    import torch

    dev = torch.device(device) if device is not None else torch.device("cpu")
    if dev.type == "cuda" and torch.cuda.is_available():
        try:
            return int(torch.cuda.mem_get_info(dev)[0])
        except Exception:  # pragma: no cover - a driver that cannot say
            return None
    try:
        with open("/proc/meminfo", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
    except (ValueError, OSError, AttributeError):
        return None


def check_memory(need: int, what: str, device=None) -> None:
    """MemoryError-free refusal: ValueError naming ``what`` (the figure that causes it) when
    ``need`` bytes exceed the memory available."""
    have = available_memory(device)
    if have is not None and need > have:
        raise ValueError(f"{what} needs about {size_text(need)} of memory, {size_text(have)} are available")


_ALLOC = re.compile(r"(?:tried to allocate|allocate)\s+([0-9.]+)\s*(bytes|[KMGT]i?B)", re.IGNORECASE)


def out_of_memory_message(exc: BaseException) -> Optional[str]:
    """One line for an allocation failure (host or GPU) with the size asked for; None for other errors."""
    text = str(exc)
    oom = isinstance(exc, MemoryError) or type(exc).__name__ == "OutOfMemoryError" or (
        isinstance(exc, RuntimeError) and ("can't allocate memory" in text or "out of memory" in text))
    if not oom:
        return None
    m = _ALLOC.search(text)
    asked = ""
    if m:
        value, unit = float(m.group(1)), m.group(2).upper().replace("I", "")
        scale = {"BYTES": 1, "KB": 1024, "MB": 1024 ** 2, "GB": 1024 ** 3, "TB": 1024 ** 4}[unit]
        asked = f": an allocation of {size_text(value * scale)} failed"
    return (f"out of memory{asked}; lower the sample count (--num-samples), the batch size or the image size "
            f"and try again")


__all__ = ["MAX_SAMPLES", "WriteError", "available_memory", "check_free_space", "check_memory",
           "ensure_writable_dir", "free_bytes", "out_of_memory_message", "write_failure", "writing"]
