"""Checks made before a file is opened or decoded: what it is, and what its header claims.

* :func:`check_regular_file`: only regular files are opened. A FIFO (whose open
  blocks until a writer appears), a device (``/dev/zero`` never ends), a socket,
  and anything under ``/proc`` or ``/sys`` (``/proc/self/mem`` is a "regular"
  file of size 0 whose reads fail or never end) are refused with a
  DataError naming the file, found with ``os.stat`` before any ``open``.
* :func:`detached_data_files`: the data files a MetaImage (``.mhd``/``.mha``:
  ``ElementDataFile``) or NRRD (``.nhdr``/``.nrrd``: ``data file``) header names.
  :func:`check_data_files` requires each to be a regular file and, unless
  allowed (``data.allow_external_data_files``, ``predict --allow-external-data-files``),
  inside the header's folder: a header naming ``../secret.bin`` or ``/dev/zero``
  is refused before the reader sees it.
* :func:`check_voxels`: the size a header claims, against ``data.max_voxels``,
  before anything that size is allocated.
"""

from __future__ import annotations

import os
import re
import stat
from pathlib import Path
from typing import Optional, Sequence

from .errors import DataError

# 2**28 voxels: 1 GiB as float32 per component; a 512 x 512 x 1024 CT volume fits.
DEFAULT_MAX_VOXELS = 2**28
_SPECIAL_ROOTS = ("/proc", "/sys")  # devices under /dev are refused by their type
_HEADER_BYTES = 1 << 16  # a header is read up to this much (the data that follows is not read)
_MAX_LISTED_FILES = 100_000
MAX_RATERS = 64  # rater masks per image, in every reader


def _kind(mode: int) -> str:
    if stat.S_ISFIFO(mode):
        return "a FIFO (named pipe)"
    if stat.S_ISCHR(mode):
        return "a character device"
    if stat.S_ISBLK(mode):
        return "a block device"
    if stat.S_ISSOCK(mode):
        return "a socket"
    if stat.S_ISDIR(mode):
        return "a folder"
    return "not a regular file"


def _special(path: Path) -> bool:
    try:
        real = os.path.realpath(path)
    except (OSError, ValueError):
        return False
    return any(real == root or real.startswith(root + os.sep) for root in _SPECIAL_ROOTS)


def check_regular_file(path: str | Path, what: str = "", *, allow_dir: bool = False) -> os.stat_result:
    """``os.stat(path)`` (symlinks followed) if ``path`` is a regular file (or, with ``allow_dir``,
    a folder) outside /proc and /sys; else DataError naming it. Nothing is opened."""
    path = Path(path)
    label = f"{what}: " if what else ""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise DataError(f"{label}{path}: file not found") from None
    except (OSError, ValueError) as exc:  # ValueError: a NUL byte in the name
        raise DataError(f"{label}{path}: cannot be read ({getattr(exc, 'strerror', None) or exc})") from None
    if _special(path):
        raise DataError(f"{label}{path}: a special system file (under /proc or /sys); "
                        f"only regular files are read")
    if stat.S_ISDIR(st.st_mode) and allow_dir:
        return st
    if not stat.S_ISREG(st.st_mode):
        raise DataError(f"{label}{path}: {_kind(st.st_mode)}, not a regular file; only regular files are read")
    return st


def check_folder_entries(folder: str | Path) -> None:
    """Every entry of ``folder`` (not recursive) that a reader scanning it would open is a regular
    file or a folder; a FIFO or device in it is a DataError naming the entry."""
    folder = Path(folder)
    for entry in os.scandir(folder):
        try:
            st = entry.stat()  # follows symlinks
        except OSError:
            continue  # a dangling link: readers skip it
        if not (stat.S_ISREG(st.st_mode) or stat.S_ISDIR(st.st_mode)):
            raise DataError(f"{folder}: holds {os.fsdecode(entry.name)!r}, {_kind(st.st_mode)}; "
                            f"only regular files are read")


# ----------------------------------------------------------------------------- detached data files

_MHD_FIELD = re.compile(rb"^\s*ElementDataFile\s*[:=]\s*(.*?)\s*$", re.MULTILINE)
_NRRD_FIELD = re.compile(rb"^\s*data ?file\s*:\s*(.*?)\s*$", re.MULTILINE | re.IGNORECASE)


def _read_header(path: Path) -> bytes:
    with open(path, "rb") as fh:
        return fh.read(_HEADER_BYTES)


def _pattern_files(folder: Path, spec: str, path: Path) -> list[Path]:
    """``name%03d.raw MIN MAX STEP`` (MetaImage and NRRD file patterns)."""
    parts = spec.split()
    try:
        lo, hi = int(parts[1]), int(parts[2])
        step = int(parts[3]) if len(parts) > 3 else 1
    except (IndexError, ValueError):
        raise DataError(f"{path}: cannot read its data file pattern {spec[:80]!r}") from None
    if step == 0 or (hi - lo) // step + 1 > _MAX_LISTED_FILES or (hi - lo) * step < 0:
        raise DataError(f"{path}: its data file pattern {spec[:80]!r} names too many files "
                        f"(at most {_MAX_LISTED_FILES})")
    try:
        return [folder / (parts[0] % i) for i in range(lo, hi + (1 if step > 0 else -1), step)]
    except (TypeError, ValueError):
        raise DataError(f"{path}: cannot read its data file pattern {spec[:80]!r}") from None


def detached_data_files(path: str | Path) -> list[Path]:
    """The data files a ``.mhd``/``.mha``/``.nhdr``/``.nrrd`` header names (relative ones joined to
    its folder); empty for attached data (``LOCAL``, or no such field) and other formats."""
    path = Path(path)
    suffix = path.name.lower().rsplit(".", 1)[-1]
    if suffix not in ("mhd", "mha", "nhdr", "nrrd"):
        return []
    head = _read_header(path)
    if suffix in ("mhd", "mha"):
        m = _MHD_FIELD.search(head)
    else:
        m = _NRRD_FIELD.search(head.split(b"\n\n", 1)[0])  # the header ends at the first blank line
    if not m:
        return []
    spec = m.group(1).decode("utf-8", "surrogateescape").strip()
    folder = path.parent
    if suffix in ("mhd", "mha") and spec.upper() == "LOCAL":
        return []
    if spec.upper() == "LIST" or spec.upper().startswith("LIST "):
        rest = head[m.end():].decode("utf-8", "surrogateescape").splitlines()
        names = [n.strip() for n in rest if n.strip()]
        if suffix in ("nhdr", "nrrd"):  # NRRD: the list ends the header
            names = [n for n in names if not n.startswith("#")]
        return [folder / n for n in names[:_MAX_LISTED_FILES]]
    if "%" in spec and len(spec.split()) >= 3:
        return _pattern_files(folder, spec, path)
    return [folder / spec]


def check_data_files(path: str | Path, *, allow_external: bool = False) -> list[Path]:
    """The detached data files of the header ``path`` (see :func:`detached_data_files`), each a
    regular file and, unless ``allow_external``, inside the header's folder; else DataError
    naming the header and the data file."""
    path = Path(path)
    files = detached_data_files(path)
    root = path.parent.resolve()
    for f in files:
        shown = os.fsdecode(f)
        if not allow_external:
            try:
                inside = f.resolve().is_relative_to(root)
            except (OSError, RuntimeError):
                inside = False
            if not inside:
                raise DataError(f"{path}: its data file {shown!r} lies outside the header's folder {path.parent}; "
                                f"refused (allow with data.allow_external_data_files: true, or predict "
                                f"--allow-external-data-files)")
        try:
            check_regular_file(f)
        except DataError as exc:
            raise DataError(f"{path}: its data file is refused: {exc}") from None
    return files


# ----------------------------------------------------------------------------- claimed sizes


def check_voxels(path: str | Path, shape: Sequence[int], max_voxels: Optional[int],
                 components: int = 1) -> int:
    """``prod(shape) * components`` if within ``max_voxels`` (None: :data:`DEFAULT_MAX_VOXELS`);
    else DataError naming the file, the claimed size and ``data.max_voxels``."""
    limit = DEFAULT_MAX_VOXELS if max_voxels is None else int(max_voxels)
    n = max(1, int(components))
    for s in shape:
        n *= max(0, int(s))
    if n > limit:
        dims = "x".join(str(int(s)) for s in shape) + (f" x {components} components" if components > 1 else "")
        raise DataError(f"{path}: its header claims {dims} = {n:,} voxels, over data.max_voxels = {limit:,}; "
                        f"not read (raise data.max_voxels, or predict --max-voxels, if this is a real image)")
    return n


def read_limits(data_cfg) -> dict:
    """The keyword arguments of :func:`probunet.data.io.read_image` from a ``data`` config section
    (``max_voxels``, ``allow_external_data_files``; defaults where the section lacks them)."""
    return {"max_voxels": getattr(data_cfg, "max_voxels", None),
            "allow_external_data_files": bool(getattr(data_cfg, "allow_external_data_files", False))}


__all__ = ["DEFAULT_MAX_VOXELS", "MAX_RATERS", "check_data_files", "check_folder_entries", "check_regular_file", "check_voxels",
           "detached_data_files", "read_limits"]
