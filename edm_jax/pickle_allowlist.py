"""What the restricted unpickler may rebuild: exact (module, name) pairs and their checks.

Each allowed global is an ``Allowed`` entry whose function rebuilds a plain value from plain,
checked arguments (NumPy arrays, scalars and dtypes; plain containers; protocol-2 bytes).
``set_array_state`` / ``set_dtype_state`` are the only BUILD targets besides attribute
records. ``edm_jax.restricted_pickle`` is the interpreter that uses them.
"""

from __future__ import annotations

import math
import pickle
from collections import OrderedDict
from collections.abc import Callable
from typing import Any, NoReturn

import numpy as np

__all__ = [
    "NUMPY_GLOBALS",
    "Allowed",
    "Record",
    "UnsafePickleError",
    "nonneg_ints",
    "refuse",
    "set_array_state",
    "set_dtype_state",
]


class UnsafePickleError(pickle.UnpicklingError, ValueError):
    """A pickle that asks for more than plain data, or is malformed."""


class Record(dict):
    """The attributes of a pickled object of an allowed record class (e.g. a TorchScript module)."""

    def __init__(self, qualname: str):
        super().__init__()
        self.qualname = qualname


class Allowed:
    """One allowed global: ``call`` rebuilds a value from checked arguments; ``value`` if bare."""

    __slots__ = ("call", "newobj", "qualname", "value")

    def __init__(self, qualname: str, call: Callable[..., Any] | None = None,
                 value: Any = None, newobj: bool = False):  # fmt: skip
        self.qualname, self.call, self.value, self.newobj = qualname, call, value, newobj

    def __repr__(self) -> str:
        return f"<allowed {self.qualname}>"


def refuse(msg: str) -> NoReturn:
    """Raise UnsafePickleError(msg)."""
    raise UnsafePickleError(msg)


# ---- NumPy rebuilders (argument-checked; numpy/_core/multiarray.py, numeric.py) ----

_DTYPE_SPECS = ("b1", "i1", "i2", "i4", "i8", "u1", "u2", "u4", "u8", "f2", "f4", "f8", "c8", "c16")


def nonneg_ints(x: Any, what: str) -> tuple[int, ...]:
    """x as a tuple of non-negative ints, else UnsafePickleError."""
    if not isinstance(x, tuple) or not all(type(i) is int and i >= 0 for i in x):
        refuse(f"{what} must be a tuple of non-negative ints, got {x!r:.80}")
    return x


def _plain_dtype(dt: Any, what: str) -> np.dtype:
    """dt if it is a numeric or bool NumPy dtype without fields, else UnsafePickleError."""
    if not isinstance(dt, np.dtype) or dt.kind not in "biufc" or dt.fields or dt.subdtype:
        refuse(f"{what}: only numeric/bool NumPy dtypes are allowed, got {dt!r:.80}")
    return dt


def _as_bytes(raw: Any, what: str) -> bytes | bytearray:
    """raw as bytes (a Python-2 str is latin-1 bytes), else UnsafePickleError."""
    if isinstance(raw, str):
        return raw.encode("latin-1")
    if not isinstance(raw, (bytes, bytearray)):
        refuse(f"{what} must be bytes, got {type(raw).__name__}")
    return raw


def _np_dtype(spec: Any, align: Any = False, copy: Any = True) -> np.dtype:
    """numpy.dtype(spec, align, copy) for a plain numeric spec only (a fresh copy)."""
    if spec not in _DTYPE_SPECS or not isinstance(align, bool) or not isinstance(copy, bool):
        refuse(f"numpy.dtype{(spec, align, copy)!r:.80}: spec must be one of {list(_DTYPE_SPECS)}")
    return np.dtype(spec, False, True)


def _np_reconstruct(cls: Any, shape: Any, dtype: Any) -> np.ndarray:
    """numpy's _reconstruct(ndarray, (0,), b'b'): an empty array that BUILD will fill."""
    if cls is not NUMPY_GLOBALS["numpy", "ndarray"] or nonneg_ints(shape, "shape") != (0,):
        refuse(f"_reconstruct may only make a plain numpy.ndarray, got {cls!r:.60}, {shape!r:.40}")
    _as_bytes(dtype, "_reconstruct dtype")
    return np.empty((0,), np.uint8)


def _np_scalar(dtype: Any, raw: Any) -> np.generic:
    """numpy's scalar(dtype, raw): one numeric value from its bytes."""
    dtype = _plain_dtype(dtype, "numpy scalar")
    raw = _as_bytes(raw, "numpy scalar data")
    if len(raw) != dtype.itemsize:
        refuse(f"numpy scalar of {dtype} needs {dtype.itemsize} bytes, got {len(raw)}")
    return np.frombuffer(raw, dtype)[0]


def _np_frombuffer(buf: Any, dtype: Any, shape: Any, order: Any) -> np.ndarray:
    """numpy's _frombuffer(buf, dtype, shape, order) (protocol 5 in-band): a copied array."""
    buf, dtype = _as_bytes(buf, "_frombuffer data"), _plain_dtype(dtype, "_frombuffer")
    shape = nonneg_ints(shape, "_frombuffer shape")
    if order not in ("C", "F") or len(buf) != dtype.itemsize * math.prod(shape):
        refuse(f"_frombuffer: {len(buf)} bytes, order {order!r:.10} do not make {dtype}{shape}")
    return np.frombuffer(buf, dtype).reshape(shape, order=order).copy(order="K")


def set_array_state(arr: np.ndarray, state: Any) -> None:
    """ndarray.__setstate__ after checking (version, shape, dtype, is_fortran, raw bytes)."""
    if not isinstance(state, tuple) or len(state) not in (4, 5):
        refuse(
            f"ndarray state must be (version, shape, dtype, is_fortran, data), got {state!r:.80}"
        )
    version, shape, dtype, fortran, raw = state if len(state) == 5 else (1, *state)
    shape, dtype = nonneg_ints(shape, "ndarray shape"), _plain_dtype(dtype, "ndarray")
    raw = _as_bytes(raw, "ndarray data")
    if version != 1 or not isinstance(fortran, bool) or arr.shape != (0,):
        refuse(f"ndarray state version {version!r:.10}, is_fortran {fortran!r:.10} refused")
    if len(raw) != dtype.itemsize * math.prod(shape):
        refuse(f"ndarray of {dtype}{shape} needs {dtype.itemsize * math.prod(shape)} bytes")
    arr.__setstate__((1, shape, dtype, fortran, bytes(raw)))  # type: ignore[arg-type]


def set_dtype_state(dt: np.dtype, state: Any) -> None:
    """dtype.__setstate__ for the plain form (3, byteorder, None, None, None, -1, -1, 0) only."""
    plain = isinstance(state, tuple) and len(state) == 8 and state[0] == 3
    if not plain or state[1] not in ("<", ">", "|", "=") or state[2:] != (None,) * 3 + (-1, -1, 0):
        refuse(f"dtype state {state!r:.80} is not a plain numeric dtype's")
    dt.__setstate__(state)  # type: ignore[attr-defined]


# ---- builtins for plain containers (protocol-2 spellings included) ----


def _container(kind: type) -> Callable[..., Any]:
    """kind() or kind(items) for list / set / frozenset / dict / OrderedDict of plain items."""

    def make(*args: Any) -> Any:
        if len(args) > 1 or (args and not isinstance(args[0], (list, tuple, dict))):
            refuse(f"{kind.__name__}{args!r:.60}: expected () or one list/tuple")
        return kind(*args)

    return make


def _encode(text: Any, encoding: Any = "utf-8") -> bytes:
    """_codecs.encode(str, 'latin1'): how protocol 2 stores bytes."""
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
        refuse(f"_codecs.encode{(text, encoding)!r:.60}: only (str, 'latin1') is allowed")
    return text.encode("latin-1")


def _bytes_like(kind: type) -> Callable[..., Any]:
    """bytes() / bytearray() of nothing, of bytes, or of (str, 'latin-1')."""

    def make(*args: Any) -> Any:
        return kind(
            _encode(*args) if len(args) == 2 else _as_bytes(args[0] if args else b"", kind.__name__)
        )

    return make


def _dtype_class(name: str, spec: str) -> Allowed:
    """numpy.dtypes.<name>: the DType class itself; calling it with () gives the dtype."""

    def make(*args: Any) -> np.dtype:
        if args:
            refuse(f"numpy.dtypes.{name}{args!r:.40}: takes no arguments here")
        return np.dtype(spec, False, True)  # a copy: BUILD may set its byte order

    return Allowed(f"numpy.dtypes.{name}", make, value=type(np.dtype(spec)))


_ndarray = Allowed("numpy.ndarray", value=np.ndarray)
_reconstruct = Allowed("numpy._reconstruct", _np_reconstruct)
_scalar = Allowed("numpy.scalar", _np_scalar)
_frombuffer = Allowed("numpy._frombuffer", _np_frombuffer)
_dtype = Allowed("numpy.dtype", _np_dtype)
_list = Allowed("builtins.list", _container(list))
_dict = Allowed("builtins.dict", _container(dict))
_set = Allowed("builtins.set", _container(set))
_frozenset = Allowed("builtins.frozenset", _container(frozenset))
_bytes = Allowed("builtins.bytes", _bytes_like(bytes))
_bytearray = Allowed("builtins.bytearray", _bytes_like(bytearray))

NUMPY_GLOBALS: dict[tuple[str, str], Allowed] = {
    ("numpy", "ndarray"): _ndarray,
    ("numpy", "dtype"): _dtype,
    ("numpy.core.multiarray", "_reconstruct"): _reconstruct,
    ("numpy._core.multiarray", "_reconstruct"): _reconstruct,
    ("numpy.core.multiarray", "scalar"): _scalar,
    ("numpy._core.multiarray", "scalar"): _scalar,
    ("numpy.core.numeric", "_frombuffer"): _frombuffer,
    ("numpy._core.numeric", "_frombuffer"): _frombuffer,
    ("numpy.dtypes", "BoolDType"): _dtype_class("BoolDType", "b1"),
    ("numpy.dtypes", "Int8DType"): _dtype_class("Int8DType", "i1"),
    ("numpy.dtypes", "Int16DType"): _dtype_class("Int16DType", "i2"),
    ("numpy.dtypes", "Int32DType"): _dtype_class("Int32DType", "i4"),
    ("numpy.dtypes", "Int64DType"): _dtype_class("Int64DType", "i8"),
    ("numpy.dtypes", "UInt8DType"): _dtype_class("UInt8DType", "u1"),
    ("numpy.dtypes", "UInt16DType"): _dtype_class("UInt16DType", "u2"),
    ("numpy.dtypes", "UInt32DType"): _dtype_class("UInt32DType", "u4"),
    ("numpy.dtypes", "UInt64DType"): _dtype_class("UInt64DType", "u8"),
    ("numpy.dtypes", "Float16DType"): _dtype_class("Float16DType", "f2"),
    ("numpy.dtypes", "Float32DType"): _dtype_class("Float32DType", "f4"),
    ("numpy.dtypes", "Float64DType"): _dtype_class("Float64DType", "f8"),
    ("numpy.dtypes", "Complex64DType"): _dtype_class("Complex64DType", "c8"),
    ("numpy.dtypes", "Complex128DType"): _dtype_class("Complex128DType", "c16"),
    ("collections", "OrderedDict"): Allowed("collections.OrderedDict", _container(OrderedDict)),
    ("_codecs", "encode"): Allowed("_codecs.encode", _encode),
    ("builtins", "list"): _list,
    ("builtins", "dict"): _dict,
    ("builtins", "set"): _set,
    ("builtins", "frozenset"): _frozenset,
    ("builtins", "bytes"): _bytes,
    ("builtins", "bytearray"): _bytearray,
    ("__builtin__", "list"): _list,  # protocol <= 2 spells builtins '__builtin__'
    ("__builtin__", "dict"): _dict,
    ("__builtin__", "set"): _set,
    ("__builtin__", "frozenset"): _frozenset,
    ("__builtin__", "bytes"): _bytes,
    ("__builtin__", "bytearray"): _bytearray,
}
