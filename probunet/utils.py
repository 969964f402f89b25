"""Small shared helpers: atomic writes, devices, seeding."""

from __future__ import annotations

import logging
import os
import random
import re
import tempfile
from pathlib import Path
from typing import Any, Callable, Optional

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
    from .guards import write_failure

    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".probunet-{path.stem}.", suffix=".tmp" + suffix, dir=path.parent)
    except OSError as exc:
        failure = write_failure(path, exc)
        if failure is None:
            raise
        raise failure from None
    os.close(fd)
    try:
        writer(tmp)
        os.chmod(tmp, _umask_mode())  # mkstemp creates 0600; give the file normal permissions
        os.replace(tmp, path)
    except BaseException as exc:
        if os.path.exists(tmp):
            os.unlink(tmp)
        failure = write_failure(path, exc)  # a full or read-only disk: one line naming the file
        if failure is None:
            raise
        raise failure from None
    return path


def resolve_device(name="auto", *, local_rank: Optional[int] = None, option: Optional[str] = None) -> torch.device:
    """The device a run uses: the one place probunet turns a device name into a :class:`torch.device`.

    ``name``: ``auto`` (CUDA when present, else CPU), ``cpu``, ``cuda``, ``cuda:N``, ``mps`` or a
    torch.device. ``local_rank``: the process's GPU in a multi-process run (torchrun's
    ``LOCAL_RANK``): an unindexed CUDA device becomes ``cuda:<local_rank>``, and the CUDA device is
    made current. ``option``: the command-line option the name came from (``--device``); errors
    then name it: ``--device cuda: CUDA is not available ...``. Called at run time, never at import.

    On CPU it also turns on flushing of denormal floats: trained weights produce
    them, and they slow x86 convolutions by up to 10x (measured here).
    """
    name = name or "auto"
    if name == "auto":
        dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        try:
            dev = torch.device(name)
        except Exception as exc:  # a malformed device string
            if option is None:
                raise
            raise ValueError(f"{option} {name}: not a device ({exc.__class__.__name__}); use auto, cpu, cuda "
                             f"or cuda:N") from None
        if dev.type == "cuda" and not torch.cuda.is_available():
            if option is not None:
                raise ValueError(f"{option} {name}: CUDA is not available on this machine; use {option} auto "
                                 f"or {option} cpu")
            raise ValueError(f"device {name!r} requested but CUDA is not available on this machine; "
                             f"use 'auto' or 'cpu'")
    if dev.type == "cuda" and local_rank is not None:
        if dev.index is None:
            dev = torch.device("cuda", int(local_rank))
        torch.cuda.set_device(dev)
    if dev.type == "cpu":
        torch.set_flush_denormal(True)
    return dev


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


# ----------------------------------------------------------------------------- folders shared with other runs

# atomic_call's temporary files: ".probunet-<stem>.<8 random chars>.tmp[<suffix>]" (".<stem>..." in earlier versions)
_TEMP_NAME = re.compile(r"^\..+\.[A-Za-z0-9_]{8}\.tmp(\.[A-Za-z0-9.]+)?$")


def unlink_files(paths) -> list[Path]:
    """Delete each of ``paths`` that is a regular file (never a link or a folder); returns those deleted.
    A file already gone is skipped."""
    removed = []
    for p in paths:
        if p.is_file() and not p.is_symlink():
            try:
                p.unlink()
                removed.append(p)
            except FileNotFoundError:
                pass
    return removed


def remove_stale_temps(folder: str | Path, *, recursive: bool = False) -> list[Path]:
    """Delete the temporary files an interrupted :func:`atomic_call` left in ``folder``.

    Only names of the form atomic_call gives its temp files are touched. Call it
    while holding the folder's :class:`FolderLock`, so no live writer owns them.
    """
    folder = Path(folder)
    if not folder.is_dir():
        return []
    found = folder.rglob(".*") if recursive else folder.glob(".*")
    removed = unlink_files(p for p in found if _TEMP_NAME.match(p.name))
    if removed:
        logger.info("removed %d temporary file(s) left by an interrupted run in %s", len(removed), folder)
    return removed


def open_lock_file(path: str | Path, what: str = "folder") -> int:
    """Open (create) the lock file ``path`` for reading and writing, never through a symbolic link
    (a planted link would create a file outside the folder); the descriptor, or PermissionError in one
    line naming the lock file's folder (``what``) and the cause: a link, a read-only or full disk."""
    path = Path(path)
    try:
        return os.open(path, os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0), 0o644)
    except OSError as exc:
        if path.is_symlink():
            raise PermissionError(f"{what} {path.parent}: its lock file {path} is a symbolic link; probunet does "
                                  f"not follow it (remove the link)") from None
        from .guards import CAUSES

        cause = CAUSES.get(exc.errno, exc.strerror or exc.__class__.__name__)
        raise PermissionError(f"{what} {path.parent}: cannot create its lock file {path.name}: {cause}") from None


class FolderBusyError(RuntimeError):
    """Another process holds the folder's lock."""


class FolderLock:
    """An OS file lock (``fcntl.flock``) on ``folder/.probunet.lock``.

    ``shared=False``: this process alone uses the folder; ``shared=True``: several
    cooperating processes may (prediction shards), but no exclusive holder. The OS
    releases the lock when the process exits in any way (kill -9 included), so a
    crashed run never leaves the folder locked; the lock file itself stays.
    """

    NAME = ".probunet.lock"

    def __init__(self, folder: str | Path, *, shared: bool = False, what: str = "folder", name: str = NAME):
        self.folder, self.shared, self.what = Path(folder), shared, what
        self.path = self.folder / name
        self._fd = None

    def acquire(self) -> "FolderLock":
        import fcntl

        fd = open_lock_file(self.path, self.what)
        try:
            fcntl.flock(fd, (fcntl.LOCK_SH if self.shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise FolderBusyError(f"{self.what} {self.folder} is in use by another probunet process (it holds "
                                  f"{self.path}); wait for it to finish or choose another folder") from None
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the descriptor drops the flock
            self._fd = None

    def __enter__(self) -> "FolderLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
