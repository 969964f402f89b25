"""Reading pickles that cannot run code: a restricted unpickler for plain data.

Pickle can run arbitrary code while loading. :func:`safe_load` reads a file with
:class:`RestrictedUnpickler`, which admits only builtin containers/scalars and
numpy arrays and scalars of plain numeric/bool dtypes; a file that asks for
anything else (``os.system``, ``subprocess.Popen``, ``builtins.eval``, an object
or structured dtype, dtype flags of its own, ...) is refused with a
:class:`~probunet.data.errors.DataError` before anything is called or built.
Files over 2 GB are read in chunks (a single read of more than 2**31 - 1 bytes
fails on some systems). Nothing here knows a dataset: :mod:`probunet.data.lidc_pickle`
reads the LIDC crops with it.
"""

from __future__ import annotations

import io as _io
import os
import pickle
import re
from pathlib import Path

import numpy as np

from .errors import DataError

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


def _short_repr():
    import reprlib

    r = reprlib.Repr()
    r.maxlevel, r.maxdict, r.maxlist, r.maxtuple, r.maxset = 3, 6, 8, 8, 6
    r.maxstring, r.maxother, r.maxlong = 60, 60, 40
    return r


_REPR = _short_repr()


def _short(obj) -> str:
    """A short prefix of ``repr(obj)``, in bounded time: nested or shared containers from a file are
    cut at a few levels and items (a full repr of ``x = [x] * 10`` nested eight times never ends)."""
    if isinstance(obj, (tuple, list, str, bytes, int, float, bool, type(None))):
        try:
            text = _REPR.repr(obj)
        except ValueError:  # an int past Python's digit limit
            text = f"<{type(obj).__name__}>"
    else:
        text = type(obj).__name__
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


class ChunkedFile(_io.RawIOBase):
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


def _check_regular(path: Path) -> None:
    """DataError unless ``path`` is a regular file outside /proc and /sys (checked with os.stat:
    a FIFO is never opened, its open would block; /proc/self/mem never reads)."""
    import stat

    try:
        st = os.stat(path)
    except (OSError, ValueError):
        raise DataError(f"{path}: file not found") from None
    if not stat.S_ISREG(st.st_mode) or os.path.realpath(path).startswith(("/proc/", "/sys/")):
        raise DataError(f"{path}: not a regular file (a folder, FIFO, device or /proc file); only regular files "
                        f"are read")


def safe_load(path: str | Path, *, layout: str = "the layout expected here"):
    """Unpickle ``path`` with :class:`RestrictedUnpickler`. Raises DataError naming the file when
    it asks for anything but builtin containers and numpy arrays/scalars of plain numeric/bool
    dtypes (refused before it is built), or is not a readable pickle; ``layout`` names what the
    file should have been in that message."""
    path = Path(path)
    _check_regular(path)  # never a FIFO, device or /proc file
    try:
        with open(path, "rb") as fh:
            return RestrictedUnpickler(ChunkedFile(fh), encoding="latin1").load()
    except RefusedPickle as exc:
        raise DataError(f"{path}: refused to load this pickle: it asks for {exc}, which is not a builtin container "
                        f"or a numpy array of a plain numeric/bool dtype; nothing was executed. The file is not "
                        f"{layout}, or it may be malicious") from None
    except MemoryError:
        raise DataError(f"{path}: not a readable pickle (it asks for more memory than there is)") from None
    except Exception as exc:  # noqa: BLE001 - any failure of the file's opcodes means a bad file
        reason = " ".join(str(exc).split())[:200]
        raise DataError(f"{path}: not a readable pickle ({exc.__class__.__name__}: {reason})") from None


__all__ = ["MAX_READ", "RefusedPickle", "RestrictedUnpickler", "safe_load"]
