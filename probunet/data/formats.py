"""The image file formats, in one registry.

Each format declares, in one :func:`register` call, its file endings, whether it keeps the
geometry (voxel spacing, origin, direction), whether it stores float pixels, how it is read and
written, and what ``probunet predict`` writes for an input of it. Everything that asks "is this
an image?" or "what is written for it?" reads this registry:

- :func:`probunet.data.io.read_image` and :func:`~probunet.data.io.write_image` pick the reader
  and writer by the file's ending (a folder: by the folder formats, a DICOM series);
- the folder scan of ``probunet predict`` takes the files whose ending a format declares with
  ``scan=True`` and the folders a folder format claims, and writes each case's maps in the
  endings :func:`output_endings` gives;
- ``predict --output-format`` offers ``same`` and the endings of the formats declared with
  ``output_choice=True`` (:func:`output_choices`);
- the MONAI bundle reads and writes the endings of the ``nifti`` format.

The built-in formats are registered by :mod:`probunet.data.io`, beside their readers and
writers: NIfTI, NRRD (and its detached header ``.nhdr``), MetaImage (``.mha``, and ``.mhd``),
TIFF, PNG, JPEG, BMP, VTK and DICOM (single files and series folders).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

from ..options import OUTPUT_FORMATS

# what predict writes for an input whose ending no format declares (given through --file-list)
FALLBACK_OUTPUT = ".nii.gz"


@dataclass(frozen=True)
class ImageFormat:
    """One image file format.

    Attributes:
        name: a short name (``"nifti"``), unique in the registry.
        endings: the lower-case file endings it takes, each with its dot (``".nii.gz"`` is one
            ending); the first is the one written for it. Empty for a folder-only format.
        geometry: the file keeps the voxel spacing (and, where the format has them, the origin
            and direction); without it the reader's spacing is a default and is not used.
        floats: the file can store float pixels (probability and entropy maps).
        read: ``read(path, max_voxels=..., allow_external_data_files=...) -> (array, meta)`` in
            the conventions of :func:`probunet.data.io.read_image`; None: not read.
        write: ``write(array, meta, path, ndim)``: writes atomically (temporary file + rename);
            None: read-only.
        outputs: the (label maps, float maps) endings ``probunet predict`` writes for an input
            of this format; None: its own ending for both (it must then be writable with floats).
        scan: predict's folder scan takes files with these endings as images.
        output_choice: its endings are offered by ``predict --output-format``.
        folder: ``folder(path) -> bool``: the folder ``path`` holds one image of this format (a
            DICOM series); the scan then takes the folder as one case, ``read`` reads it.
    """

    name: str
    endings: tuple[str, ...]
    geometry: bool
    floats: bool
    read: Optional[Callable] = None
    write: Optional[Callable] = None
    outputs: Optional[tuple[str, str]] = None
    scan: bool = True
    output_choice: bool = False
    folder: Optional[Callable[[Path], bool]] = None

    def check(self) -> "ImageFormat":
        """ValueError naming the format for a declaration that cannot work; returns self."""
        if not self.name or not isinstance(self.name, str):
            raise ValueError(f"image format {self.name!r}: needs a name")
        for ending in self.endings:
            if not (isinstance(ending, str) and ending.startswith(".") and len(ending) > 1
                    and ending == ending.lower()):
                raise ValueError(f"image format {self.name!r}: ending {ending!r} must be lower case and start "
                                 f"with a dot")
        if not self.endings and self.folder is None:
            raise ValueError(f"image format {self.name!r}: declares neither file endings nor a folder test")
        if self.read is None and (self.scan and self.endings or self.folder is not None):
            raise ValueError(f"image format {self.name!r}: found by the scan but has no reader")
        if self.output_choice and (self.write is None or not self.floats):
            raise ValueError(f"image format {self.name!r}: an --output-format choice must be writable with "
                             f"float pixels")
        if self.outputs is None and self.read is not None and (self.write is None or not self.floats):
            raise ValueError(f"image format {self.name!r}: its own ending cannot hold predict's maps; "
                             f"declare outputs=(label ending, float ending)")
        if self.outputs is not None and not (len(self.outputs) == 2 and all(isinstance(e, str) and
                                                                            e.startswith(".") for e in self.outputs)):
            raise ValueError(f"image format {self.name!r}: outputs must be two endings, got {self.outputs!r}")
        return self


_FORMATS: dict[str, ImageFormat] = {}  # name -> format, in registration order


def register(fmt: ImageFormat, *, replace: bool = False) -> ImageFormat:
    """Add ``fmt`` to the registry (``replace``: over a format of the same name); returns it.
    ValueError when the declaration is incomplete or an ending belongs to another format."""
    fmt.check()
    if fmt.name in _FORMATS and not replace:
        raise ValueError(f"image format {fmt.name!r} is already registered (pass replace=True to redefine it)")
    for other in _FORMATS.values():
        taken = set(other.endings) & set(fmt.endings)
        if other.name != fmt.name and taken:
            raise ValueError(f"image format {fmt.name!r}: ending {sorted(taken)[0]!r} belongs to {other.name!r}")
    _FORMATS[fmt.name] = fmt
    return fmt


def unregister(name: str) -> Optional[ImageFormat]:
    """Remove the format ``name``; returns it (None when it was not registered)."""
    return _FORMATS.pop(name, None)


def registered() -> list[ImageFormat]:
    """The registered formats, in registration order."""
    return list(_FORMATS.values())


def get(name: str) -> ImageFormat:
    """The format ``name``; KeyError listing the known ones otherwise."""
    try:
        return _FORMATS[name]
    except KeyError:
        raise KeyError(f"no image format {name!r}; known: {', '.join(_FORMATS)}") from None


# ----------------------------------------------------------------------------- endings


def _endings() -> list[str]:
    return sorted({e for f in _FORMATS.values() for e in f.endings}, key=len, reverse=True)


def full_suffix(path: str | Path) -> str:
    """The file's ending, lower case: the longest registered ending it has (``.nii.gz`` counted
    as one), else its last suffix: ``a/b.nii.gz`` -> ``.nii.gz``, ``x.NRRD`` -> ``.nrrd``."""
    name = Path(path).name.lower()
    for ending in _endings():
        if name.endswith(ending) and len(name) > len(ending):
            return ending
    return Path(name).suffix


def strip_suffix(path: str | Path) -> str:
    """The file name without its ending (:func:`full_suffix`): ``case1.nii.gz`` -> ``case1``."""
    name = Path(path).name
    suffix = full_suffix(name)
    return name[: len(name) - len(suffix)] if suffix else name


def for_ending(ending: str) -> Optional[ImageFormat]:
    """The format that declares ``ending`` (``".nrrd"``), or None."""
    ending = ending.lower()
    return next((f for f in _FORMATS.values() if ending in f.endings), None)


def folder_format(path: str | Path) -> Optional[ImageFormat]:
    """The first folder format that claims the folder ``path``, or None."""
    return next((f for f in _FORMATS.values() if f.folder is not None and f.folder(Path(path))), None)


def format_of(path: str | Path) -> Optional[ImageFormat]:
    """The format of the file or folder ``path`` (by its ending; a folder by the folder formats), or
    None: a file of an unknown ending (SimpleITK then reads it by its content)."""
    path = Path(path)
    if path.is_dir():
        return folder_format(path)
    return for_ending(full_suffix(path))


def reader_of_folder(path: str | Path) -> Optional[ImageFormat]:
    """The format that reads the folder ``path``: the one that claims it, else the first folder
    format registered (whose reader then says what the folder lacks); None without folder formats."""
    return folder_format(path) or next((f for f in _FORMATS.values() if f.folder is not None), None)


def scan_endings() -> tuple[str, ...]:
    """The endings predict's folder scan takes as images."""
    return tuple(e for f in _FORMATS.values() if f.scan and f.read is not None for e in f.endings)


def is_scanned_file(path: str | Path) -> bool:
    """Whether predict's folder scan takes the file ``path`` as an image (by its ending)."""
    fmt = for_ending(full_suffix(path))
    return fmt is not None and fmt.scan and fmt.read is not None


def keeps_geometry(path: str | Path) -> bool:
    """Whether an image at ``path`` holds a real spacing: False only for a format declared without
    geometry (PNG, JPEG, BMP), whose reader's spacing of 1 is a default."""
    fmt = format_of(path)
    return True if fmt is None else fmt.geometry


def output_choices() -> tuple[str, ...]:
    """``predict --output-format`` values: ``same`` (each input's own format), then the endings
    without their dot of the formats declared with ``output_choice`` (``nii.gz``, ``nii``, ...)."""
    return ("same",) + tuple(e[1:] for f in _FORMATS.values() if f.output_choice for e in f.endings)


def output_endings(input_path: str | Path, output_format: str = "same") -> tuple[str, str]:
    """(label maps, float maps) endings predict writes for the input ``input_path``.

    ``output_format`` ``same``: the input format's ``outputs``, or its own ending where it can
    hold both (an ending no format declares: :data:`FALLBACK_OUTPUT`); else one of
    :func:`output_choices` for both. ValueError for another ``output_format``.
    """
    if output_format != "same":
        choices = output_choices()
        if output_format not in choices:
            raise ValueError(f"output format must be one of {', '.join(choices)}, got {output_format!r}")
        return "." + output_format, "." + output_format
    path = Path(input_path)
    fmt = reader_of_folder(path) if path.is_dir() else for_ending(full_suffix(path))
    if fmt is None:
        return FALLBACK_OUTPUT, FALLBACK_OUTPUT
    if fmt.outputs is not None:
        return fmt.outputs
    ending = full_suffix(path)
    return ending, ending


OUTPUT_FORMATS.provide(output_choices)  # predict's --output-format reads the registry

__all__ = ["FALLBACK_OUTPUT", "ImageFormat", "folder_format", "for_ending", "format_of", "full_suffix", "get",
           "is_scanned_file", "keeps_geometry", "output_choices", "output_endings", "reader_of_folder", "register",
           "registered", "scan_endings", "strip_suffix", "unregister"]
