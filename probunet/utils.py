"""Small shared helpers: atomic writes, devices, seeding."""

from __future__ import annotations

import logging
import os
import random
import tempfile
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

logger = logging.getLogger("probunet")


def _umask_mode() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


def _atomic_write(path: str | Path, write: Callable[[str], None]) -> Path:
    """Write via a temp file in the same folder, then rename over ``path``."""
    return atomic_call(path, write)


def atomic_write_text(path: str | Path, text: str) -> Path:
    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as fh:
            fh.write(text)

    return _atomic_write(path, write)


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    def write(tmp: str) -> None:
        with open(tmp, "wb") as fh:
            fh.write(data)

    return _atomic_write(path, write)


def atomic_save(obj: Any, path: str | Path) -> Path:
    """``torch.save`` through a temp file + rename, so a crash never leaves half a checkpoint."""
    return _atomic_write(path, lambda tmp: torch.save(obj, tmp))


def atomic_call(path: str | Path, writer: Callable[[str], None], suffix: str = "") -> Path:
    """Run ``writer(tmp_path)`` and rename the result to ``path``.

    ``suffix`` keeps the extension on the temp file for writers that choose the
    format by extension (nibabel, SimpleITK, matplotlib).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=".tmp" + suffix, dir=path.parent)
    os.close(fd)
    try:
        writer(tmp)
        os.chmod(tmp, _umask_mode())  # mkstemp creates 0600; give the file normal permissions
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def resolve_device(name: str = "auto") -> torch.device:
    """``auto`` picks CUDA when present, else CPU. Called at run time, never at import.

    On CPU it also turns on flushing of denormal floats: trained weights produce
    them, and they slow x86 convolutions by up to 10x (measured here).
    """
    if name == "auto":
        dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        dev = torch.device(name)
        if dev.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"device {name!r} requested but CUDA is not available on this machine; "
                             f"use 'auto' or 'cpu'")
    if dev.type == "cpu":
        torch.set_flush_denormal(True)
    return dev


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)
