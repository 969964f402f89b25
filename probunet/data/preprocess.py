"""Preprocessing whole scans once, into a memory-mappable cache (``data.patch_size`` runs).

``preprocess(cfg)`` reads the cases of ``cfg.data`` one at a time, checks each
as training does, resamples it to ``data.spacing``, normalises its intensities
(``data.normalize``) and writes it to a cache folder::

    <cache root>/<key>/
        index.json                  # shapes, geometry, foreground locations, the data section
        cases/<case>.image.npy      # image (C, *spatial) float32
        cases/<case>.raters.npy     # raters' masks (A, *spatial) uint8, stacked on axis 0

``<key>`` is a hash of the data section (and the model keys the checks use)
and of every source file's size, modification time and content digest
(:func:`file_digest`: the whole file up to 4 MiB, sampled blocks above): a
changed data section or a changed file gives a new folder, a second run with the
same inputs reuses the folder. :func:`cached_items` checks the cached files before
use and refuses a damaged one, naming it (delete the folder to rebuild it). The
folder is built under a temporary name and renamed when complete, and each file
is written to a temporary name and renamed, so a crash never leaves a cache that
looks complete.

Resampling (to ``data.spacing``, a spacing per axis, or ``"median"``: the
per-axis median of the cases' spacings): the image by linear interpolation;
each rater's mask by linear interpolation of its one-hot class maps followed by
the most likely class (for a binary mask: linear interpolation then the
threshold 0.5), so that a resampled mask keeps its volume better than nearest
neighbour. The first voxel's centre (``origin``) and the axis directions are
kept; the new spacing is exactly the target; the new size per axis is
``round(size * spacing / target)``.

:func:`probunet.data.load_splits` gives the splits (through :func:`load_cached_items`) as
items whose ``image`` and ``labels`` are read-only memory maps (nothing is read until used), and
:class:`probunet.data.patches.PatchStream` reads training patches from them.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import os
import shutil
import stat
import tempfile
from pathlib import Path
from typing import Iterable, Iterator, Optional

import numpy as np

from .errors import DataError

logger = logging.getLogger(__name__)

CACHE_FORMAT = 1
MAX_FOREGROUND = 2000  # foreground locations kept per case in index.json (a seeded subsample of larger sets)
# keys of the data section that do not change what is cached
_NOT_CACHED = ("num_workers", "split", "augment", "patch_size", "foreground_oversample", "cache_dir")


# ----------------------------------------------------------------------------- the key


def cache_root(data_cfg) -> Path:
    """``data.cache_dir``, else ``$PROBUNET_CACHE``, else ``~/.cache/probunet/preprocessed``."""
    if getattr(data_cfg, "cache_dir", None):
        return Path(data_cfg.cache_dir).expanduser()
    if os.environ.get("PROBUNET_CACHE"):
        return Path(os.environ["PROBUNET_CACHE"]).expanduser()
    return Path.home() / ".cache" / "probunet" / "preprocessed"


def cached_section(cfg) -> dict:
    """What the cache depends on: the data section (less the keys that only affect training)
    and the model keys the checks use."""
    from ..config import to_plain

    data = {k: v for k, v in to_plain(vars(cfg.data)).items() if k not in _NOT_CACHED}
    data = json.loads(json.dumps(data, default=_plain))
    if data.get("path"):
        data["path"] = str(Path(data["path"]).expanduser().resolve())
    m = cfg.model
    return {"data": data, "model": {"spatial_dims": m.spatial_dims, "in_channels": m.in_channels,
                                    "num_classes": m.num_classes}}


def _plain(obj):
    if hasattr(obj, "__dict__"):
        return vars(obj)
    return str(obj)


# The content digest of a source file (part of the cache key, beside its size and mtime): the whole
# file up to WHOLE_FILE_BYTES; above that its first and last BLOCK_BYTES and SAMPLED_BLOCKS blocks
# of BLOCK_BYTES spread evenly between them (what docs/volumes.md says it detects).
WHOLE_FILE_BYTES = 4 << 20
BLOCK_BYTES = 64 << 10
SAMPLED_BLOCKS = 32
_digests: dict = {}  # (path, device, inode, size, mtime_ns, ctime_ns) -> digest, within one process


def digest_offsets(size: int) -> list[int]:
    """Where :func:`file_digest` reads blocks of :data:`BLOCK_BYTES` in a file of ``size`` bytes above
    :data:`WHOLE_FILE_BYTES`: the first block, the last, and :data:`SAMPLED_BLOCKS` evenly spaced
    between (block ``k`` of ``SAMPLED_BLOCKS + 2`` at ``k * (size - BLOCK_BYTES) // (SAMPLED_BLOCKS + 1)``)."""
    span = size - BLOCK_BYTES
    return [k * span // (SAMPLED_BLOCKS + 1) for k in range(SAMPLED_BLOCKS + 2)]


def file_digest(path: str | Path, st: Optional[os.stat_result] = None) -> str:
    """A fast digest of a file's content (blake2b, 16 bytes, hex): the whole file up to
    :data:`WHOLE_FILE_BYTES`, else the blocks at :func:`digest_offsets` (about 2.1 MB whatever the size).

    A change anywhere in a small file changes it; in a larger file, a change inside a sampled block
    (the first and last 64 KiB included) does, a change confined to the bytes between them does not.
    """
    path = Path(path)
    st = st if st is not None else path.stat()
    if not stat.S_ISREG(st.st_mode):  # a FIFO or device is never opened here (the readers refuse it)
        return ""
    memo = (str(path), st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
    if memo in _digests:
        return _digests[memo]
    h = hashlib.blake2b(digest_size=16)
    try:
        with open(path, "rb") as fh:
            if st.st_size <= WHOLE_FILE_BYTES:
                for chunk in iter(lambda: fh.read(1 << 20), b""):
                    h.update(chunk)
            else:
                for offset in digest_offsets(st.st_size):
                    fh.seek(offset)
                    h.update(fh.read(BLOCK_BYTES))
    except OSError as exc:
        raise DataError(f"{path}: cannot be read ({exc.strerror or exc.__class__.__name__})") from None
    _digests[memo] = h.hexdigest()
    return _digests[memo]


def source_files(data_cfg) -> list[list]:
    """``[relative path, size, mtime_ns, content digest]`` of every file under ``data.path`` (sorted);
    the digest is :func:`file_digest`'s."""
    if not data_cfg.path:
        return []
    root = Path(data_cfg.path).expanduser()
    if root.is_file():
        st = root.stat()
        return [[root.name, st.st_size, st.st_mtime_ns, file_digest(root, st)]]
    if not root.is_dir():
        raise DataError(f"{root}: data.path not found")
    out = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in sorted(filenames):
            if name.startswith("."):
                continue
            p = Path(dirpath) / name
            st = p.stat()
            out.append([str(p.relative_to(root)), st.st_size, st.st_mtime_ns, file_digest(p, st)])
    return out


def cache_key(cfg) -> str:
    """The cache folder's name: a hash of :func:`cached_section` and :func:`source_files`."""
    blob = json.dumps({"format": CACHE_FORMAT, **cached_section(cfg), "files": source_files(cfg.data)},
                      sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def cache_dir(cfg, root: Optional[str | Path] = None) -> Path:
    return Path(root).expanduser() / cache_key(cfg) if root is not None else cache_root(cfg.data) / cache_key(cfg)


# ----------------------------------------------------------------------------- resampling


def resampled_shape(shape, spacing, target) -> tuple[int, ...]:
    """The grid size at ``target`` spacing of a grid of ``shape`` voxels at ``spacing``:
    ``round(size * spacing / target)`` per axis (at least 1)."""
    return tuple(max(1, int(round(n * s / t))) for n, s, t in zip(shape, spacing, target))


def zoom(volume: np.ndarray, spacing, target, out_shape, order: int) -> np.ndarray:
    """``volume`` (*spatial) at ``spacing`` -> (*out_shape) at ``target``, spline ``order`` (0 nearest,
    1 linear). Both grids share the first voxel's centre: voxel ``i`` of the new grid is sampled at
    old index ``i * target / spacing`` (beyond the last voxel: the edge value). Mapping back is the
    same call with ``spacing`` and ``target`` swapped and the old shape as ``out_shape``."""
    from scipy.ndimage import affine_transform

    scale = np.asarray(target, float) / np.asarray(spacing, float)
    return affine_transform(volume, scale, offset=0.0, output_shape=tuple(out_shape), order=order,
                            mode="nearest", prefilter=False)


def resample_image(image: np.ndarray, spacing, target, out_shape=None) -> np.ndarray:
    """image (C, *spatial) float32 at ``spacing`` -> (C, *new_spatial) at ``target`` by linear
    interpolation; ``new_spatial`` is ``out_shape``, default :func:`resampled_shape`."""
    out_shape = tuple(out_shape) if out_shape is not None else resampled_shape(image.shape[1:], spacing, target)
    return np.stack([zoom(c.astype(np.float32, copy=False), spacing, target, out_shape, 1)
                     for c in image]).astype(np.float32)


def resample_labels(labels: np.ndarray, spacing, target, num_classes: int, out_shape=None) -> np.ndarray:
    """labels (A, *spatial) integer -> (A, *new_spatial) uint8: per rater, linear interpolation of
    each class's one-hot map, then the most likely class (binary: threshold 0.5); ``new_spatial`` is
    ``out_shape``, default :func:`resampled_shape`."""
    out_shape = tuple(out_shape) if out_shape is not None else resampled_shape(labels.shape[1:], spacing, target)
    out = np.zeros((labels.shape[0], *out_shape), dtype=np.uint8)
    for a, mask in enumerate(labels):
        if num_classes <= 2:
            soft = zoom((mask > 0).astype(np.float32), spacing, target, out_shape, 1)
            out[a] = soft >= 0.5
            continue
        best = np.zeros(out_shape, np.float32)
        for c in range(num_classes):
            soft = zoom((mask == c).astype(np.float32), spacing, target, out_shape, 1)
            better = soft > best
            out[a][better] = c
            best = np.maximum(best, soft)
    return out


# ----------------------------------------------------------------------------- reading cases one at a time


def iter_cases(data_cfg) -> Iterator[dict]:
    """The dataset's cases one at a time where its reader can (``iter_cases``), else all read at once."""
    from .readers import layout_module

    module = layout_module(data_cfg.format)
    if hasattr(module, "iter_cases"):
        yield from module.iter_cases(data_cfg)
    else:
        yield from module.read_cases(data_cfg)


def _checked(item: dict, cfg) -> dict:
    """One case through the checks :func:`probunet.data.prepare_items` runs (no crop, no common shape)."""
    from .readers import apply_group_pattern, squeeze_singleton_depth
    from .validate import validate_items

    d = cfg.data
    item["labels"] = np.asarray(item["labels"]).astype(np.int64, copy=False)
    count = item["labels"].shape[0]
    if d.num_raters and count > int(d.num_raters):
        from .validate import where

        raise DataError(f"{where(item)}: {count} rater masks, more than data.num_raters={d.num_raters}")
    if cfg.model.spatial_dims == 2:
        squeeze_singleton_depth([item])
    if getattr(d, "group_pattern", None):
        apply_group_pattern([item], d.group_pattern)
    validate_items([item], num_classes=cfg.model.num_classes, in_channels=cfg.model.in_channels,
                   spatial_dims=cfg.model.spatial_dims)
    return item


def _spacing_of(item: dict, ndim: int) -> list[float]:
    sp = item.get("meta", {}).get("spacing")
    return [float(s) for s in sp][:ndim] if sp and len(sp) >= ndim else [1.0] * ndim


class _Writes:
    """A file seen by ``np.save`` only through its ``write`` method."""

    def __init__(self, fh):
        self.write = fh.write


def _save_npy(path: Path, array: np.ndarray) -> None:
    """``np.save`` to a temporary name in the same folder, renamed when complete; a full or read-only
    disk is a :class:`probunet.guards.WriteError` naming ``path``."""
    from ..guards import writing

    with writing(path):
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        try:
            with os.fdopen(fd, "wb") as fh:  # np.save through .write(): a failed write keeps its errno
                np.save(_Writes(fh), np.ascontiguousarray(array))  # (ndarray.tofile's short write has none)
            os.replace(tmp, path)
        except BaseException:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise


def _safe_name(case_id: str, used: set) -> str:
    name = "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in case_id).lstrip(".") or "case"
    base, k = name, 1
    while name in used:
        k += 1
        name = f"{base}_{k}"
    used.add(name)
    return name


def foreground_locations(labels: np.ndarray, seed: int, limit: int = MAX_FOREGROUND) -> tuple[list, int]:
    """Voxels (index per axis) that at least one rater marked: at most ``limit`` of them (a seeded
    subsample of larger sets), and their total count."""
    fg = np.argwhere(np.any(labels > 0, axis=0))  # (N, nd)
    n = len(fg)
    if n > limit:
        fg = fg[np.sort(np.random.default_rng(seed).choice(n, size=limit, replace=False))]
    return fg.astype(int).tolist(), int(n)


def _json_meta(meta: dict) -> dict:
    out = {}
    for k, v in meta.items():
        try:
            json.dumps(v)
        except (TypeError, ValueError):
            continue
        out[k] = v
    return out


def preprocess(cfg, root: Optional[str | Path] = None, *, progress: bool = False) -> Path:
    """The cache folder of ``cfg.data`` under ``root`` (default :func:`cache_root`), built if absent.

    Returns the folder (holding ``index.json``). A folder already complete is reused as is.
    """
    out = cache_dir(cfg, root)
    if (out / "index.json").is_file():
        logger.info("preprocessed cache reused: %s", out)
        return out
    median = _median_cache(cfg, root)
    if median is not None:
        logger.info("preprocessed cache reused: %s (built with data.spacing: median, resolved to %s)", median,
                    list(cfg.data.spacing))
        return median
    from ..guards import WriteError, ensure_writable_dir, write_failure, writing

    ensure_writable_dir(out.parent, _root_label(cfg.data, root))  # read-only or not a folder: one line
    with writing(out.parent):
        work = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    try:
        try:
            _build(cfg, work, progress)
        except WriteError as exc:  # name the file of the cache, not of its temporary folder
            inside = Path(exc.path).relative_to(work) if Path(exc.path).is_relative_to(work) else None
            if inside is None:
                raise
            raise WriteError(out / inside, exc.cause, exc.errno) from None
        try:
            os.replace(work, out)
        except OSError as exc:  # another process finished the same cache first: theirs is as good
            if not (out / "index.json").is_file():
                raise write_failure(out, exc) or exc from None
            shutil.rmtree(work, ignore_errors=True)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    logger.info("preprocessed cache written: %s", out)
    return out


def _root_label(data_cfg, root) -> str:
    """What names the cache root in an error: the option or variable it came from."""
    if root is not None:
        return "cache folder"
    if getattr(data_cfg, "cache_dir", None):
        return "data.cache_dir"
    return "$PROBUNET_CACHE" if os.environ.get("PROBUNET_CACHE") else "cache folder"


def _median_cache(cfg, root: Optional[str | Path]) -> Optional[Path]:
    """The cache built with ``data.spacing: median`` when it resolved to ``cfg``'s numeric spacing, else None.

    ``probunet train`` writes the resolved numbers into the run's config; the evaluation or a
    resumed run of that config then finds the cache its training built (the same cases, the
    same resampling) instead of building a second one.
    """
    spacing = cfg.data.spacing
    if spacing is None or isinstance(spacing, str):
        return None
    alt = copy.copy(cfg)
    alt.data = copy.copy(cfg.data)
    alt.data.spacing = "median"
    folder = cache_dir(alt, root)
    if not (folder / "index.json").is_file():
        return None
    try:
        resolved = read_index(folder).get("spacing")
        wanted = target_spacing(spacing, [], cfg.model.spatial_dims)
    except DataError:
        return None
    if not resolved or len(resolved) != len(wanted) or not np.allclose(resolved, wanted, rtol=1e-9, atol=0):
        return None
    return folder


def resolved_spacing(cfg, root: Optional[str | Path] = None) -> Optional[tuple[float, ...]]:
    """``data.spacing`` of ``cfg`` as one number per axis: ``"median"`` is read from the ``index.json``
    of the cache :func:`preprocess` built (which must exist), None stays None."""
    if cfg.data.spacing != "median":
        return target_spacing(cfg.data.spacing, [], cfg.model.spatial_dims)
    folder = preprocess(cfg, root)
    values = read_index(folder).get("spacing")
    return None if values is None else tuple(float(v) for v in values)


def _build(cfg, work: Path, progress: bool) -> None:
    d, nd = cfg.data, cfg.model.spatial_dims
    cases_dir = work / "cases"
    from ..guards import writing

    with writing(cases_dir):
        cases_dir.mkdir()
    cases: dict[str, dict] = {}
    used: set = set()
    items: Iterable = iter_cases(d)
    if progress:
        from tqdm import tqdm

        items = tqdm(items, desc="preprocess: read", unit="case", dynamic_ncols=True)
    # pass 1: read and check each case, store it as read (a case at a time in memory)
    for item in items:
        item = _checked(item, cfg)
        cid = str(item["case_id"])
        if cid in cases:
            raise DataError(f"case id {cid!r} appears twice in {d.path}")
        name = _safe_name(cid, used)
        image = np.asarray(item["image"], dtype=np.float32)
        _save_npy(cases_dir / f"{name}.image.npy", image)
        _save_npy(cases_dir / f"{name}.raters.npy", item["labels"].astype(np.uint8))
        cases[cid] = {"name": name, "read_shape": list(image.shape[1:]), "read_spacing": _spacing_of(item, nd),
                      "meta": _json_meta(item.get("meta", {}))}
    if not cases:
        raise DataError(f"{d.path}: the dataset is empty: no cases were found")
    target = target_spacing(d.spacing, [c["read_spacing"] for c in cases.values()], nd)
    # pass 2: resample, normalise, write; index the foreground
    from .transforms import crop_item, normalize_image

    names = list(cases)
    if progress:
        from tqdm import tqdm

        names = tqdm(names, desc="preprocess: resample", unit="case", dynamic_ncols=True)
    for k, cid in enumerate(names):
        entry = cases[cid]
        ip, rp = cases_dir / f"{entry['name']}.image.npy", cases_dir / f"{entry['name']}.raters.npy"
        image, labels = np.load(ip), np.load(rp)
        spacing = entry["read_spacing"]
        meta = entry["meta"]
        if target is not None and not np.allclose(spacing, target, rtol=1e-6, atol=0):
            image = resample_image(image, spacing, target)
            labels = resample_labels(labels, spacing, target, cfg.model.num_classes)
            spacing = list(target)
            if "truth" in meta:  # the synthetic truth is in the grid as read
                meta.pop("truth")
        image = normalize_image(image, d)
        if d.crop_size is not None:
            item = crop_item({"image": image, "labels": labels, "meta": meta}, d.crop_size)
            image, labels = item["image"], item["labels"]
            if "truth" in meta and list(meta["truth"].get("shape", [])) != list(image.shape[1:]):
                meta.pop("truth")
        _save_npy(ip, image.astype(np.float32))
        _save_npy(rp, labels.astype(np.uint8))
        fg, count = foreground_locations(labels, seed=k)
        origin = meta.get("origin", [0.0] * nd)
        direction = meta.get("direction", np.eye(nd).tolist())
        meta = {key: v for key, v in meta.items() if key not in ("spacing", "origin", "direction", "affine", "shape")}
        cases[cid] = {"image": f"cases/{ip.name}", "raters": f"cases/{rp.name}", "shape": list(image.shape[1:]),
                      "channels": int(image.shape[0]), "num_raters": int(labels.shape[0]),
                      "spacing": [float(s) for s in spacing], "origin": [float(o) for o in origin][:nd],
                      "direction": [list(map(float, r))[:nd] for r in direction][:nd],
                      "read_shape": entry["read_shape"], "read_spacing": entry["read_spacing"],
                      "image_min": [float(image[c].min()) for c in range(image.shape[0])],
                      "foreground": fg, "foreground_count": count, "meta": meta}
    index = {"format": CACHE_FORMAT, "spacing": None if target is None else list(target),
             "resampling": {"image": "linear", "masks": "linear per rater and class, then most likely class"},
             **cached_section(cfg), "cases": cases}
    from ..utils import atomic_write_text

    atomic_write_text(work / "index.json", json.dumps(index))


def target_spacing(spacing, spacings: list[list[float]], nd: int) -> Optional[tuple[float, ...]]:
    """``data.spacing`` as one value per axis: None stays None, ``"median"`` is the per-axis median
    of ``spacings`` (the cases' spacings as read), one value is repeated ``nd`` times."""
    if spacing is None:
        return None
    if spacing == "median":
        return tuple(float(v) for v in np.median(np.asarray(spacings, float), axis=0))
    values = tuple(float(v) for v in spacing)
    if len(values) == 1:
        values = values * nd
    if len(values) != nd:
        raise DataError(f"data.spacing {list(spacing)} has {len(values)} values, the data has {nd} spatial axes")
    return values


# ----------------------------------------------------------------------------- reading the cache


def read_index(folder: str | Path) -> dict:
    path = Path(folder) / "index.json"
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise DataError(f"{path}: not a readable preprocessed index ({exc.__class__.__name__}); delete the "
                        f"folder to rebuild it") from None


def _damaged(path: Path, folder: Path, what: str) -> DataError:
    return DataError(f"{path}: damaged preprocessed cache ({what}); delete the folder {folder} and run again "
                     f"(probunet preprocess, train or evaluate rebuilds it)")


def _cached_array(folder: Path, rel, shape: tuple, dtype: np.dtype) -> np.memmap:
    """The ``.npy`` file ``folder/rel`` as a read-only memory map, after checking that its header is
    readable and holds ``shape`` and ``dtype`` (from ``index.json``) and that the file holds all the data
    the header claims; otherwise DataError naming the file."""
    if not isinstance(rel, str) or Path(rel).is_absolute() or ".." in Path(rel).parts:
        raise _damaged(folder / "index.json", folder, f"a case file named {rel!r}, not a file in the folder")
    path = folder / rel
    try:
        with open(path, "rb") as fh:
            version = np.lib.format.read_magic(fh)
            read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else \
                np.lib.format.read_array_header_2_0
            got_shape, _, got_dtype = read_header(fh)
            offset, size = fh.tell(), os.fstat(fh.fileno()).st_size
    except FileNotFoundError:
        raise _damaged(path, folder, "the file is missing") from None
    except Exception as exc:  # a truncated or garbled header (numpy parses it with the tokenizer)
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else exc.__class__.__name__
        raise _damaged(path, folder, f"unreadable header: {reason}") from None
    if tuple(got_shape) != tuple(shape) or np.dtype(got_dtype) != np.dtype(dtype):
        raise _damaged(path, folder, f"holds {np.dtype(got_dtype)} {list(got_shape)}, index.json says "
                                     f"{np.dtype(dtype)} {list(shape)}")
    need = offset + int(np.prod(shape)) * np.dtype(dtype).itemsize
    if size != need:
        raise _damaged(path, folder, f"{size} bytes, its header needs {need}")
    try:
        return np.load(path, mmap_mode="r")
    except (OSError, ValueError) as exc:
        raise _damaged(path, folder, str(exc).strip().splitlines()[0] or exc.__class__.__name__) from None


def cached_items(folder: str | Path, cfg) -> list[dict]:
    """The cached cases as items whose ``image`` (C, *spatial) float32 and ``labels`` (A_i, *spatial)
    uint8 are read-only memory maps; ``meta["cache"]`` names the files and the foreground locations.

    Each file is checked first: a readable ``.npy`` header, the shape and dtype ``index.json`` records,
    the full length of the data, and raters' labels below ``model.num_classes``. A damaged file is
    refused (DataError naming it: delete the folder to rebuild it), never rebuilt silently.

    Raters: a case with fewer than ``data.num_raters`` (or the most of any case) is refused with
    ``data.missing_raters: error``; with ``pad`` its ``meta["rater_present"]`` marks the real ones
    (the patches pad it with empty masks).
    """
    folder = Path(folder)
    index = read_index(folder)
    num_classes = int(cfg.model.num_classes)
    try:
        entries = list(index["cases"].items())
        counts = [int(c["num_raters"]) for _, c in entries]
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise _damaged(folder / "index.json", folder, f"no case list ({exc.__class__.__name__}: {exc})") from None
    target = int(cfg.data.num_raters) if cfg.data.num_raters else max(counts, default=0)
    items = []
    for cid, c in entries:
        try:
            n, shape = int(c["num_raters"]), tuple(int(s) for s in c["shape"])
            image = _cached_array(folder, c["image"], (int(c["channels"]), *shape), np.float32)
            labels = _cached_array(folder, c["raters"], (n, *shape), np.uint8)
            meta = dict(c.get("meta", {}))
            meta.update(spacing=c["spacing"], origin=c["origin"], direction=c["direction"], shape=c["shape"])
            nd = len(shape)  # foreground as a compact array, not JSON's lists of ints (~0.2 MB per case)
            foreground = np.asarray(c["foreground"], np.int32).reshape(-1, nd)
            image_min = [float(v) for v in c["image_min"]]
            if len(foreground) and (foreground.min() < 0 or np.any(foreground.max(axis=0) >= shape)):
                raise ValueError(f"foreground locations outside the shape {list(shape)}")
            if len(image_min) != image.shape[0]:
                raise ValueError(f"{len(image_min)} image_min values for {image.shape[0]} channels")
        except DataError:
            raise
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise _damaged(folder / "index.json", folder, f"case {cid}: {exc.__class__.__name__}: {exc}") from None
        top = int(labels.max()) if labels.size else 0  # reads the masks once (uint8: 1 byte per voxel and rater)
        if top >= num_classes:
            raise _damaged(folder / c["raters"], folder, f"case {cid}: label {top} in the raters' masks, "
                                                         f"model.num_classes={num_classes} allows 0..{num_classes - 1}")
        if n < target and cfg.data.missing_raters != "pad":
            raise DataError(f"case {cid}: {n} rater masks, expected {target} (data.num_raters); set "
                            f"data.missing_raters=pad to pad missing raters with empty masks")
        meta["rater_present"] = [True] * n + [False] * (target - n)
        meta["cache"] = {"image": str(folder / c["image"]), "raters": str(folder / c["raters"]),
                         "foreground": foreground, "image_min": image_min}
        items.append({"image": image, "labels": labels, "case_id": cid, "meta": meta})
    return items


def load_cached_items(cfg, *, progress: bool = False) -> list[dict]:
    """:func:`preprocess` (or reuse) the data of ``cfg`` and return its cached items (memory maps);
    :func:`probunet.data.load_splits` splits them (or applies a run's recorded split)."""
    folder = preprocess(cfg, progress=progress)
    logger.info("data: preprocessed cache %s", folder)
    return cached_items(folder, cfg)


def preprocess_command(options, *, progress: bool = False) -> tuple[Path, dict]:
    """``probunet preprocess``: :func:`preprocess` of the data section of ``options.config`` (with
    ``options.overrides``) under ``options.out`` (a :class:`probunet.options.PreprocessOptions`);
    returns the cache folder and its index."""
    from ..config import load_config

    cfg = load_config(options.config, list(options.overrides or []))
    folder = preprocess(cfg, options.out, progress=progress)
    return folder, read_index(folder)


__all__ = ["CACHE_FORMAT", "cache_dir", "cache_key", "cache_root", "cached_items", "digest_offsets", "file_digest",
           "foreground_locations", "iter_cases", "load_cached_items", "preprocess", "preprocess_command", "read_index",
           "resample_image", "resample_labels", "resampled_shape", "resolved_spacing", "source_files", "target_spacing",
           "zoom"]
