"""Reading and writing medical images with their geometry.

``read_image(path) -> (array, meta)`` and ``write_image(array, meta, path)``.

Readers and writers
    Each file format is registered here in :mod:`probunet.data.formats` with its
    endings, whether it keeps geometry and floats, and its reader and writer:
    NIfTI (``.nii``, ``.nii.gz``) is read with nibabel; NRRD, MHA/MHD,
    PNG/JPEG/TIFF/BMP, VTK, single DICOM files and a *folder* holding one DICOM
    series with SimpleITK, as is a file of an ending no format declares (SimpleITK
    then goes by its content).

Axis order (one convention for every format)
    Arrays are indexed ``(i, j[, k])`` = ``(x, y[, z])``: the order of the voxel
    indices that the NIfTI affine and the ITK direction matrix act on. This is
    nibabel's order as stored and MONAI's ``LoadImage`` order; SimpleITK's
    ``GetArrayFromImage`` gives the reverse ``(z, y, x)``, so those arrays are
    transposed here (and back on writing). For a 2D PNG this means the array is
    ``(width, height)``: ``array[x, y]``. Multi-component images (RGB, or a 4D
    NIfTI) put the components last: ``(x, y[, z], C)`` with
    ``meta["num_components"] = C``.

Geometry in ``meta`` (plain lists, so that it can go into JSON and checkpoints)
    ``spacing`` (n,), ``origin`` (n,), ``direction`` (n x n, columns are the axis
    directions) in ITK's LPS world convention, with n the number of spatial
    axes; ``affine`` (4 x 4) voxel index -> RAS world in nibabel's convention
    (for 2D images the third axis is a unit z axis). Both describe the same
    geometry and either can be written to either format. NIfTI files also keep
    ``qform_code``/``sform_code``; ``format`` is ``"nifti"`` or ``"itk"``.

Writing
    ``write_image`` chooses the format from the file's ending, restores the
    geometry exactly (a NIfTI read and written again has a bit-identical affine;
    ITK spacing/origin/direction are written as read) and writes atomically: a
    temporary file with the same extension in the same folder, renamed over the
    target, so a crash never leaves half an image. DICOM and the two-file
    ``.mhd``/``.nhdr`` are read-only.
"""

from __future__ import annotations

import logging
import os
from functools import partial
from pathlib import Path
from typing import Optional

import numpy as np

from ..utils import atomic_call
from . import formats
from .errors import DataError
from .native_output import native_output_to_log
from .guards import check_data_files, check_folder_entries, check_regular_file, check_voxels

logger = logging.getLogger(__name__)

_LPS = np.diag([-1.0, -1.0, 1.0])  # RAS <-> LPS flip (its own inverse)

full_suffix = formats.full_suffix  # the ending, ``.nii.gz`` counted as one: ``a/b.nii.gz`` -> ``.nii.gz``
strip_suffix = formats.strip_suffix  # the file name without its ending: ``case1.nii.gz`` -> ``case1``


def is_nifti(path: str | Path) -> bool:
    return formats.format_of(path) is formats.get("nifti")


# ---------------------------------------------------------------- geometry


def affine_from_itk(spacing, origin, direction) -> np.ndarray:
    """RAS affine (4, 4) from ITK LPS ``spacing`` (n,), ``origin`` (n,), ``direction`` (n, n); n = 2 or 3."""
    n = len(spacing)
    lin = np.eye(3)
    off = np.zeros(3)
    lin[:n, :n] = np.asarray(direction, dtype=np.float64).reshape(n, n) @ np.diag(np.asarray(spacing, float))
    off[:n] = np.asarray(origin, dtype=np.float64)
    aff = np.eye(4)
    aff[:3, :3] = _LPS @ lin
    aff[:3, 3] = _LPS @ off
    return aff


def itk_from_affine(affine, ndim: int) -> tuple[list, list, list]:
    """``(spacing, origin, direction)`` (ITK LPS, ``ndim`` axes) of a RAS affine (4, 4)."""
    aff = np.asarray(affine, dtype=np.float64)
    lin = _LPS @ aff[:3, :3]
    off = _LPS @ aff[:3, 3]
    lin, off = lin[:ndim, :ndim], off[:ndim]
    spacing = np.linalg.norm(lin, axis=0)
    safe = np.where(spacing > 0, spacing, 1.0)
    direction = lin / safe
    return spacing.tolist(), off.tolist(), direction.tolist()


def _geometry_meta(ndim: int, spacing, origin, direction, affine) -> dict:
    return {
        "spacing": [float(s) for s in spacing],
        "origin": [float(o) for o in origin],
        "direction": [[float(v) for v in row] for row in np.asarray(direction, float).reshape(ndim, ndim)],
        "affine": [[float(v) for v in row] for row in np.asarray(affine, float)],
    }


def trim_geometry(meta: dict, spatial: int) -> dict:
    """The geometry of the first ``spatial`` axes (an image (x, y, C) stored as a 3D
    NIfTI has a 3-axis geometry; its masks have 2)."""
    meta = dict(meta)
    if "shape" in meta:
        meta["shape"] = list(meta["shape"])[:spatial]
    if "spacing" in meta and len(meta["spacing"]) > spatial:
        meta["spacing"] = list(meta["spacing"])[:spatial]
        meta["origin"] = list(meta["origin"])[:spatial]
        meta["direction"] = [list(r)[:spatial] for r in meta["direction"][:spatial]]
    return meta


# ---------------------------------------------------------------- reading


def read_image(path: str | Path, *, max_voxels: Optional[int] = None,
               allow_external_data_files: bool = False) -> tuple[np.ndarray, dict]:
    """Read an image and its geometry: ``array`` ``(x, y[, z])`` (``(..., C)`` for
    multi-component images) in its stored dtype, and ``meta`` (see module doc).

    Before anything is decoded: the path must be a regular file (or a DICOM series
    folder), never a FIFO, device or /proc file; a two-file header's data file must be
    a regular file inside the header's folder (unless ``allow_external_data_files``);
    and the size the header claims (voxels x components) must be at most ``max_voxels``
    (None: :data:`probunet.data.guards.DEFAULT_MAX_VOXELS`, the default of ``data.max_voxels``).

    Raises :class:`DataError` naming the file when it is missing, refused by those checks
    or unreadable, or holds a complex-valued image (refused rather than cast to real).
    """
    path = Path(path)
    check_regular_file(path, allow_dir=True)
    fmt = formats.reader_of_folder(path) if path.is_dir() else formats.format_of(path)
    read = fmt.read if fmt is not None and fmt.read is not None else _read_itk_file
    try:
        array, meta = read(path, max_voxels=max_voxels, allow_external_data_files=allow_external_data_files)
    except DataError:
        raise
    except Exception as exc:  # a reader's own error: name the file, keep the reason
        reason = str(exc).strip().splitlines()
        reason = reason[-1] if reason else exc.__class__.__name__
        raise DataError(f"{path}: cannot read this image ({exc.__class__.__name__}: {reason[:300]})") from exc
    check_spacing(path, meta)
    if np.iscomplexobj(array):
        raise DataError(f"{path}: the image is complex-valued ({array.dtype}); expected real intensities "
                        f"(casting would silently drop the imaginary part): save its magnitude or real part")
    return array, meta


def check_spacing(path, meta: dict) -> None:
    """DataError naming ``path`` when the voxel spacing read from its header is not finite or not positive
    (a NaN pixdim, an affine with a zero column): no resampling or geometry check can use it."""
    spacing = meta.get("spacing")
    if spacing is None:
        return
    values = np.asarray(spacing, dtype=np.float64)
    shown = "[" + ", ".join(f"{v:g}" for v in values) + "]"
    if not np.all(np.isfinite(values)):
        raise DataError(f"{path}: the voxel spacing in its header is not finite ({shown}); fix the header's "
                        f"spacing (pixdim / affine) and read it again")
    if not np.all(values > 0):
        raise DataError(f"{path}: the voxel spacing in its header is not positive ({shown}); fix the header's "
                        f"spacing (pixdim / affine) and read it again")


def _read_nifti(path: Path, max_voxels: Optional[int] = None, **_) -> tuple[np.ndarray, dict]:
    import nibabel as nib

    img = nib.load(str(path))
    check_voxels(path, img.shape, max_voxels)  # the header's claim, before the data is read
    array = np.asanyarray(img.dataobj)  # applies scl_slope/inter only when set
    if array.ndim > 4 or array.ndim < 2:
        raise DataError(f"{path}: expected a 2D or 3D image (or 4D with channels last), got shape {array.shape}")
    ndim = array.ndim if array.ndim <= 3 else 3
    affine = np.asarray(img.affine, dtype=np.float64)
    spacing, origin, direction = itk_from_affine(affine, min(ndim, 3))
    meta = {"format": "nifti", "shape": list(array.shape[:ndim]), "dtype": str(array.dtype),
            **_geometry_meta(ndim, spacing, origin, direction, affine)}
    hdr = img.header
    meta["qform_code"] = int(hdr["qform_code"])
    meta["sform_code"] = int(hdr["sform_code"])
    if array.ndim == 4:
        meta["num_components"] = int(array.shape[3])
    return np.asarray(array), meta


def _itk_meta(img) -> dict:
    ndim = img.GetDimension()
    spacing, origin = img.GetSpacing(), img.GetOrigin()
    direction = np.asarray(img.GetDirection(), dtype=np.float64).reshape(ndim, ndim)
    affine = affine_from_itk(spacing, origin, direction) if ndim in (2, 3) else np.eye(4)
    meta = {"format": "itk", "shape": list(img.GetSize()), **_geometry_meta(ndim, spacing, origin, direction, affine)}
    if img.GetNumberOfComponentsPerPixel() > 1:
        meta["num_components"] = int(img.GetNumberOfComponentsPerPixel())
    return meta


def _itk_to_array(img) -> np.ndarray:
    import SimpleITK as sitk

    array = sitk.GetArrayFromImage(img)  # (z, y, x) [+ components]
    ndim = img.GetDimension()
    order = list(range(ndim))[::-1] + list(range(ndim, array.ndim))
    return np.ascontiguousarray(np.transpose(array, order))


def _read_itk(path: Path, max_voxels: Optional[int] = None) -> tuple[np.ndarray, dict]:
    import SimpleITK as sitk

    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    reader.ReadImageInformation()  # the header only: the claimed size is checked before decoding
    check_voxels(path, reader.GetSize(), max_voxels, reader.GetNumberOfComponents())
    img = reader.Execute()
    if img.GetDimension() not in (2, 3):
        raise DataError(f"{path}: expected a 2D or 3D image, got {img.GetDimension()} dimensions")
    array = _itk_to_array(img)
    meta = _itk_meta(img)
    meta["dtype"] = str(array.dtype)
    return array, meta


def _read_itk_file(path: Path, max_voxels: Optional[int] = None, allow_external_data_files: bool = False
                   ) -> tuple[np.ndarray, dict]:
    """A file SimpleITK reads, after the checks of its header's data files."""
    check_data_files(path, allow_external=allow_external_data_files)
    with native_output_to_log(str(path)):  # ITK / GDCM / HDF5 diagnostics go to the log
        return _read_itk(path, max_voxels)


def _read_dicom(path: Path, max_voxels: Optional[int] = None, allow_external_data_files: bool = False
                ) -> tuple[np.ndarray, dict]:
    """A single DICOM file, or a folder holding one DICOM series."""
    if not path.is_dir():
        return _read_itk_file(path, max_voxels, allow_external_data_files)
    check_folder_entries(path)
    with native_output_to_log(str(path)):
        return _read_dicom_series(path, max_voxels)


DICOM_MAGIC = b"DICM"  # at byte 128 of a DICOM file (after the preamble)


def is_dicom_file(path: str | Path) -> bool:
    """A regular file ending in ``.dcm`` or holding the DICOM magic ``DICM`` at byte 128."""
    path = Path(path)
    try:
        check_regular_file(path)
    except DataError:
        return False
    if path.name.lower().endswith(".dcm"):
        return True
    try:
        with open(path, "rb") as fh:
            head = fh.read(132)
    except OSError:
        return False
    return head[128:132] == DICOM_MAGIC


def is_dicom_series(folder: str | Path) -> bool:
    """Whether the folder holds a DICOM series: at least one DICOM file (:func:`is_dicom_file`) among
    its own files (hidden ones and sub-folders aside) and no file of another image format's ending."""
    folder = Path(folder)
    try:
        names = sorted(e.name for e in os.scandir(folder) if not e.name.startswith(".") and not e.is_dir())
    except OSError:
        return False
    dicom = formats.get("dicom")
    if any(formats.for_ending(formats.full_suffix(n)) not in (None, dicom) for n in names):
        return False
    return any(is_dicom_file(folder / n) for n in names)


def _read_dicom_series(path: Path, max_voxels: Optional[int] = None) -> tuple[np.ndarray, dict]:
    import SimpleITK as sitk

    series = sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(path))
    if not series:
        raise DataError(f"{path}: a folder was given as an image, but it holds no DICOM series")
    if len(series) > 1:
        raise DataError(f"{path}: holds {len(series)} DICOM series ({', '.join(series[:5])}); "
                        f"give a folder with exactly one series")
    files = sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(path), series[0])
    first = sitk.ImageFileReader()
    first.SetFileName(files[0])
    first.ReadImageInformation()
    size = list(first.GetSize())[:2] + [len(files)]
    check_voxels(path, size, max_voxels, first.GetNumberOfComponents())
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(files)
    img = reader.Execute()
    array = _itk_to_array(img)
    meta = _itk_meta(img)
    meta.update({"format": "dicom", "dtype": str(array.dtype), "series_uid": series[0]})
    return array, meta


# ---------------------------------------------------------------- writing


def _spatial_ndim(array: np.ndarray, meta: dict) -> int:
    if meta.get("num_components"):
        return array.ndim - 1
    if "spacing" in meta:
        return len(meta["spacing"])
    return array.ndim


def write_image(array: np.ndarray, meta: Optional[dict], path: str | Path) -> Path:
    """Write ``array`` (``(x, y[, z])``, as returned by :func:`read_image`) with the
    geometry in ``meta`` to ``path``; the format follows the extension.

    ``meta`` may be None or lack geometry (identity geometry is written). A meta
    from a NIfTI file can be written as NRRD/MHA and vice versa. The dtype is kept
    (bool is written as uint8, float16 as float32; PNG holds only uint8/uint16).
    Written atomically (temp file + rename).
    """
    path = Path(path)
    meta = dict(meta or {})
    array = np.asarray(array)
    if array.dtype == bool:
        array = array.astype(np.uint8)
    elif array.dtype == np.float16:
        array = array.astype(np.float32)
    suffix = full_suffix(path)
    ndim = _spatial_ndim(array, meta)
    if ndim not in (2, 3) or array.ndim not in (ndim, ndim + 1):
        raise DataError(f"{path}: cannot write an array of shape {array.shape} with {ndim} spatial axes")
    if "spacing" in meta and len(meta["spacing"]) != ndim:
        raise DataError(f"{path}: the geometry in meta has {len(meta['spacing'])} axes, the array {ndim}")
    fmt = formats.for_ending(suffix)
    if fmt is None or fmt.write is None:
        writable = ", ".join(e for f in formats.registered() if f.write is not None for e in f.endings)
        raise DataError(f"{path}: cannot write extension '{suffix or '(none)'}'"
                        f"{f' ({fmt.name} is read-only here)' if fmt is not None else ''}; writable: {writable}")
    fmt.write(array, meta, path, ndim)
    return path


def _affine_of(meta: dict, ndim: int) -> np.ndarray:
    if "affine" in meta:
        return np.asarray(meta["affine"], dtype=np.float64)
    if "spacing" in meta:
        return affine_from_itk(meta["spacing"], meta.get("origin", [0.0] * ndim),
                               meta.get("direction", np.eye(ndim).tolist()))
    return np.eye(4)


def _itk_geometry_of(meta: dict, ndim: int) -> tuple[list, list, list]:
    if "spacing" in meta:
        return (list(meta["spacing"]), list(meta.get("origin", [0.0] * ndim)),
                list(meta.get("direction", np.eye(ndim).tolist())))
    if "affine" in meta:
        return itk_from_affine(meta["affine"], ndim)
    return [1.0] * ndim, [0.0] * ndim, np.eye(ndim).tolist()


def _write_nifti(array, meta, path: Path, ndim: int) -> Path:
    import nibabel as nib

    affine = _affine_of(meta, ndim)
    # int64 is kept as asked (nibabel wants that said explicitly)
    img = nib.Nifti1Image(array, affine, dtype=array.dtype if array.dtype in (np.int64, np.uint64) else None)
    # Keep the codes as read; a geometry that came from ITK is scanner space (1).
    img.set_qform(affine, code=int(meta.get("qform_code", 1)))
    img.set_sform(affine, code=int(meta.get("sform_code", 1)))
    atomic_call(path, lambda tmp: nib.save(img, tmp), suffix=full_suffix(path))
    return path


def _write_itk(array, meta, path: Path, ndim: int, *, geometry: bool = True, compress: bool = True) -> Path:
    """With SimpleITK; ``geometry``: the format holds spacing/origin/direction (else they are dropped,
    with a warning when they are not the identity); ``compress``: SimpleITK's compression."""
    import SimpleITK as sitk

    suffix = full_suffix(path)
    vector = array.ndim == ndim + 1
    order = list(range(ndim))[::-1] + ([ndim] if vector else [])
    try:
        img = sitk.GetImageFromArray(np.ascontiguousarray(np.transpose(array, order)), isVector=vector)
    except Exception as exc:
        raise DataError(f"{path}: SimpleITK cannot hold an array of dtype {array.dtype} ({exc})") from exc
    spacing, origin, direction = _itk_geometry_of(meta, ndim)
    if not geometry:
        if not np.allclose(spacing, 1.0) or not np.allclose(origin, 0.0):
            logger.warning("%s: %s files hold no spacing/origin/direction; the geometry is not written", path,
                           suffix)
    else:
        img.SetSpacing([float(s) for s in spacing])
        img.SetOrigin([float(o) for o in origin])
        img.SetDirection([float(v) for v in np.asarray(direction, dtype=np.float64).reshape(-1)])

    def write(tmp: str) -> None:
        try:
            with native_output_to_log(str(path)):
                sitk.WriteImage(img, tmp, useCompression=compress)
        except RuntimeError as exc:
            raise DataError(f"{path}: SimpleITK cannot write this image ({str(exc).strip().splitlines()[-1]})") \
                from exc

    atomic_call(path, write, suffix=suffix)
    return path


# ---------------------------------------------------------------- the formats (probunet.data.formats)

formats.register(formats.ImageFormat(
    "nifti", (".nii.gz", ".nii"), geometry=True, floats=True, read=_read_nifti, write=_write_nifti,
    output_choice=True))
formats.register(formats.ImageFormat(
    "nrrd", (".nrrd",), geometry=True, floats=True, read=_read_itk_file, write=_write_itk, output_choice=True))
formats.register(formats.ImageFormat(
    "metaimage", (".mha",), geometry=True, floats=True, read=_read_itk_file, write=_write_itk, output_choice=True))
# two-file formats: read, never written (a header and its data file cannot be renamed into place as one)
formats.register(formats.ImageFormat(
    "nrrd-detached", (".nhdr",), geometry=True, floats=True, read=_read_itk_file, outputs=(".nrrd", ".nrrd")))
formats.register(formats.ImageFormat(
    "metaimage-detached", (".mhd",), geometry=True, floats=True, read=_read_itk_file, outputs=(".mha", ".mha")))
# ITK's TIFF keeps the in-plane spacing (not the origin): its spacing is used
formats.register(formats.ImageFormat(
    "tiff", (".tif", ".tiff"), geometry=True, floats=True, read=_read_itk_file, write=_write_itk))
# 8/16-bit formats without geometry: predict writes the label maps as PNG, the float maps as TIFF
_PLAIN = dict(geometry=False, floats=False, read=_read_itk_file, outputs=(".png", ".tif"))
formats.register(formats.ImageFormat(
    "png", (".png",), write=partial(_write_itk, geometry=False, compress=False), **_PLAIN))
formats.register(formats.ImageFormat(
    "jpeg", (".jpg", ".jpeg"), write=partial(_write_itk, geometry=False, compress=False), **_PLAIN))
formats.register(formats.ImageFormat(
    "bmp", (".bmp",), write=partial(_write_itk, geometry=False, compress=False), **_PLAIN))
# written on request (``write_image(..., "x.vtk")``); a folder scan does not take .vtk files (often meshes)
formats.register(formats.ImageFormat(
    "vtk", (".vtk",), geometry=True, floats=True, read=_read_itk_file, write=_write_itk, scan=False))
# single DICOM files and series folders: read-only, predicted into NIfTI
formats.register(formats.ImageFormat(
    "dicom", (".dcm",), geometry=True, floats=True, read=_read_dicom, outputs=(".nii.gz", ".nii.gz"),
    folder=is_dicom_series))


__all__ = ["affine_from_itk", "full_suffix", "is_dicom_file", "is_dicom_series", "is_nifti", "itk_from_affine",
           "read_image", "strip_suffix", "trim_geometry", "write_image"]
