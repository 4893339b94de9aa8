"""The one restricted unpickler: pickles from elsewhere are read as data, never executed.

A small pickle-opcode interpreter written out here, not ``pickle.Unpickler``: nothing is
ever imported or looked up by name. A global is an exact ``(module, name)`` pair of an
allow-list (``NUMPY_GLOBALS`` of ``pickle_allowlist``, extended by callers such as
``nets/torch_pickle.py`` with torch's tensor rebuilders); it resolves to an ``Allowed`` entry
whose checked function rebuilds a plain value from plain arguments. REDUCE / NEWOBJ run only those functions, BUILD only
restores the state of NumPy arrays and dtypes (validated first) and of attribute records.
Everything else (INST / OBJ / EXT opcodes, out-of-band buffers, any other global or
callable, persistent ids without a hook) raises ``UnsafePickleError`` naming what was refused.

The result is plain nested data: dict / list / tuple / set / str / bytes / int / float /
bool / None / NumPy arrays, scalars and dtypes.
"""

from __future__ import annotations

import codecs
import struct
from collections import OrderedDict
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from edm_jax.pickle_allowlist import (
    NUMPY_GLOBALS,
    Allowed,
    Record,
    UnsafePickleError,
    nonneg_ints,
    refuse,
    set_array_state,
    set_dtype_state,
)

__all__ = [
    "NUMPY_GLOBALS",
    "Allowed",
    "Record",
    "UnsafePickleError",
    "Unpickler",
    "loads",
    "nonneg_ints",
    "refuse",
]


# ---- the interpreter (opcodes as in CPython Lib/pickle.py; protocols 0-5) ----

_REFUSED_OPCODES = {
    ord("i"): "INST", ord("o"): "OBJ", 0x82: "EXT1", 0x83: "EXT2", 0x84: "EXT4",
    0x97: "NEXT_BUFFER", 0x98: "READONLY_BUFFER",
}  # fmt: skip
_STRUCTS = {fmt: struct.Struct(fmt) for fmt in ("<i", "<B", "<H", "<I", "<Q", ">d")}


class Unpickler:
    """Reads one pickle from data[pos:] as plain data; see the module docstring."""

    def __init__(self, data: bytes | memoryview, *, pos: int = 0, source: str = "pickle",
                 allowed: Mapping[tuple[str, str], Allowed] = NUMPY_GLOBALS,
                 resolve: Callable[[str, str], Allowed | None] | None = None,
                 persistent_load: Callable[[Any], Any] | None = None,
                 leaf_types: tuple[type, ...] = ()):  # fmt: skip
        self.data, self.pos, self.source = memoryview(data), pos, source
        self.leaf_types = leaf_types
        self.allowed, self.resolve, self.persistent_load = allowed, resolve, persistent_load
        self.stack: list[Any] = []
        self.marks: list[int] = []
        self.memo: dict[int, Any] = {}

    def load(self) -> Any:
        """The unpickled value (plain data), or UnsafePickleError naming what was refused."""
        start, data, end = self.pos, self.data, len(self.data)
        try:
            while True:
                if self.pos >= end:
                    refuse(f"truncated: no STOP opcode by byte {end}")
                op = data[self.pos]
                self.pos += 1
                if op == 0x2E:  # STOP
                    return _plain(self.stack.pop(), {}, self.leaf_types)
                handler = _DISPATCH.get(op)
                if handler is None:
                    what = _REFUSED_OPCODES.get(op, f"unknown opcode {bytes([op])!r}")
                    refuse(f"{what} at byte {self.pos - 1} refused")
                handler(self)
        except UnsafePickleError as e:
            raise UnsafePickleError(f"{self.source}: {e}") from None
        except (IndexError, KeyError, TypeError, ValueError, AttributeError, struct.error,
                OverflowError, RecursionError, MemoryError) as e:  # fmt: skip
            raise UnsafePickleError(
                f"{self.source}: malformed pickle (from byte {start}, at {self.pos}): "
                f"{type(e).__name__}: {e}"
            ) from None

    # -- reading --
    def read(self, n: int) -> bytes:
        """The next n bytes, or an error if the data ends first."""
        if n < 0 or self.pos + n > len(self.data):
            refuse(f"truncated: {n} bytes wanted at byte {self.pos} of {len(self.data)}")
        out = bytes(self.data[self.pos : self.pos + n])
        self.pos += n
        return out

    def readline(self) -> bytes:
        """The bytes up to the next newline (protocol-0 text arguments)."""
        end = bytes(self.data[self.pos : self.pos + 4096]).find(b"\n")
        if end < 0:
            refuse(f"truncated or overlong text argument at byte {self.pos}")
        return self.read(end + 1)[:-1]

    def unpack(self, fmt: str) -> Any:
        """One struct value of format fmt ('<i', '<B', '<H', '<I', '<Q' or '>d')."""
        st = _STRUCTS[fmt]
        if self.pos + st.size > len(self.data):
            refuse(f"truncated: {st.size} bytes wanted at byte {self.pos} of {len(self.data)}")
        value = st.unpack_from(self.data, self.pos)[0]
        self.pos += st.size
        return value

    def pop_mark(self) -> list[Any]:
        """The items pushed since the last MARK (removed from the stack)."""
        start = self.marks.pop()
        items = self.stack[start:]
        del self.stack[start:]
        return items

    # -- globals and calls --
    def find_global(self, module: str, name: str) -> Allowed:
        """The Allowed entry of the exact pair (module, name), or an error naming it."""
        entry = self.allowed.get((module, name))
        if entry is None and self.resolve is not None:
            entry = self.resolve(module, name)
        if entry is None:
            refuse(f"refusing to load {module}.{name} (module {module!r}, name {name!r}): only NumPy "
                  "arrays, torch tensors and plain containers may be unpickled")  # fmt: skip
        return entry

    def call(self, func: Any, args: Any, opcode: str) -> Any:
        """Run an allowed global's checked function for REDUCE / NEWOBJ."""
        if not isinstance(func, Allowed) or func.call is None or not isinstance(args, tuple):
            refuse(f"{opcode} on {func!r:.60} refused: not an allowed callable")
        if opcode != "REDUCE" and not func.newobj:
            refuse(f"{opcode} on {func.qualname} refused: only REDUCE may call it")
        return func.call(*args)

    def build(self, obj: Any, state: Any) -> None:
        """BUILD: restore validated state into an array, dtype or record; nothing else."""
        if isinstance(obj, np.ndarray):
            set_array_state(obj, state)
        elif isinstance(obj, np.dtype):
            set_dtype_state(obj, state)
        elif isinstance(obj, Record) and isinstance(state, dict):
            obj.update(state)
        elif (
            type(obj) in (dict, OrderedDict)
            and isinstance(state, dict)
            and set(state) <= {"_metadata"}
        ):
            pass  # torch's state_dict._metadata (module versions): not data
        else:
            refuse(f"BUILD on {type(obj).__name__} with {type(state).__name__} state refused")


def _plain(x: Any, seen: dict[int, Any], leaves: tuple[type, ...]) -> Any:
    """x with records as dicts and bare allowed globals as their values; else an error."""
    if x is None or isinstance(x, (bool, int, float, complex, str, bytes, bytearray)):
        return x
    if isinstance(x, (np.ndarray, np.generic, np.dtype, *leaves)):
        return x
    if id(x) in seen:
        return seen[id(x)]
    if isinstance(x, Allowed):
        if x.value is None:
            refuse(f"{x.qualname} may only be called, not stored as data")
        return x.value
    if isinstance(x, dict):
        out: dict = seen.setdefault(id(x), {})
        out.update((_plain(k, seen, leaves), _plain(v, seen, leaves)) for k, v in x.items())
        return out
    if isinstance(x, list):
        items: list = seen.setdefault(id(x), [])
        items.extend(_plain(v, seen, leaves) for v in x)
        return items
    if isinstance(x, (tuple, set, frozenset)):  # memoized too: shared items are walked once
        return seen.setdefault(id(x), type(x)(_plain(v, seen, leaves) for v in x))
    refuse(f"unexpected {type(x).__name__} in the data")


def loads(data: bytes | memoryview, **kwargs: Any) -> Any:
    """Unpickle data (one pickle) as plain data; kwargs as for ``Unpickler``."""
    return Unpickler(data, **kwargs).load()


# ---- opcode handlers ----


def _push(value: Callable[[Unpickler], Any]) -> Callable[[Unpickler], None]:
    """A handler that pushes value(u)."""
    return lambda u: u.stack.append(value(u))


def _text_int(u: Unpickler) -> Any:
    """INT: protocol-0 decimal int, with I01/I00 as True/False."""
    line = u.readline()
    return {b"01": True, b"00": False}[line] if line in (b"01", b"00") else int(line)


def _mark(u: Unpickler) -> None:
    """MARK."""
    u.marks.append(len(u.stack))


def _memo_put(u: Unpickler, key: int) -> None:
    """Memoize the stack top under key."""
    u.memo[key] = u.stack[-1]


def _skip(n: int) -> Callable[[Unpickler], None]:
    """A handler that skips an n-byte argument."""

    def handler(u: Unpickler) -> None:
        u.read(n)

    return handler


def _tuple_n(n: int) -> Callable[[Unpickler], None]:
    """TUPLE2 / TUPLE3: the top n items as one tuple."""

    def handler(u: Unpickler) -> None:
        items = tuple(u.stack[-n:])
        if len(items) != n:
            refuse(f"TUPLE{n} on a stack of {len(items)}")
        u.stack[-n:] = [items]

    return handler


def _pairs(d: dict, items: list[Any]) -> dict:
    """d with d[k] = v for the pairs of items (plain dicts and records only)."""
    if not isinstance(d, dict) or len(items) % 2:
        refuse(f"SETITEM(S) into {type(d).__name__} refused")
    for k, v in zip(items[::2], items[1::2], strict=True):
        d[k] = v
    return d


def _setitems(d: Any, items: list[Any]) -> None:
    """SETITEM(S)."""
    _pairs(d, items)


def _extend(lst: Any, items: list[Any]) -> None:
    """lst += items, only into plain lists."""
    if not isinstance(lst, list):
        refuse(f"APPEND(S) into {type(lst).__name__} refused")
    lst.extend(items)


def _add(s: Any, items: list[Any]) -> None:
    """s |= items, only into plain sets."""
    if type(s) is not set:
        refuse(f"ADDITEMS into {type(s).__name__} refused")
    s.update(items)


def _global(u: Unpickler, module: str, name: str) -> None:
    """GLOBAL / STACK_GLOBAL: push the allowed entry of (module, name)."""
    if not isinstance(module, str) or not isinstance(name, str):
        refuse("STACK_GLOBAL needs two strings")
    u.stack.append(u.find_global(module, name))


def _stack_global(u: Unpickler) -> None:
    """STACK_GLOBAL."""
    name = u.stack.pop()
    _global(u, u.stack.pop(), name)


def _reduce(u: Unpickler) -> None:
    """REDUCE: func(*args) for an allowed func."""
    args = u.stack.pop()
    u.stack[-1] = u.call(u.stack[-1], args, "REDUCE")


def _newobj(u: Unpickler) -> None:
    """NEWOBJ: cls.__new__(cls, *args) for an allowed record class."""
    args = u.stack.pop()
    u.stack[-1] = u.call(u.stack[-1], args, "NEWOBJ")


def _newobj_ex(u: Unpickler) -> None:
    """NEWOBJ_EX with no keyword arguments is NEWOBJ."""
    kwargs, args = u.stack.pop(), u.stack.pop()
    if kwargs:
        refuse("NEWOBJ_EX with keyword arguments refused")
    u.stack[-1] = u.call(u.stack[-1], args, "NEWOBJ")


def _build(u: Unpickler) -> None:
    """BUILD."""
    state = u.stack.pop()
    u.build(u.stack[-1], state)


def _persid(u: Unpickler, pid: Any) -> None:
    """PERSID / BINPERSID: the caller's hook (torch storages), else refused."""
    if u.persistent_load is None:
        refuse(f"persistent id {pid!r:.60} refused: this file may not reference storages")
    u.stack.append(u.persistent_load(pid))


def _string(u: Unpickler) -> str:
    """STRING (protocol 0 Python-2 str): a quoted escaped literal, as latin-1 text."""
    line = u.readline()
    if len(line) < 2 or line[0] != line[-1] or line[:1] not in (b"'", b'"'):
        refuse("STRING opcode argument is not quoted")
    return codecs.escape_decode(line[1:-1])[0].decode("latin-1")


_DISPATCH_BY_NAME: dict[bytes, Callable[[Unpickler], None]] = {
    b"\x80": _skip(1),  # PROTO
    b"\x95": _skip(8),  # FRAME (framing is only a hint)
    b"(": _mark,
    b"0": lambda u: u.stack.__delitem__(-1),  # POP
    b"1": lambda u: u.pop_mark().clear(),  # POP_MARK
    b"2": _push(lambda u: u.stack[-1]),  # DUP
    b"N": _push(lambda u: None),
    b"\x88": _push(lambda u: True),
    b"\x89": _push(lambda u: False),
    b"I": _push(_text_int),
    b"J": _push(lambda u: u.unpack("<i")),
    b"K": _push(lambda u: u.unpack("<B")),
    b"M": _push(lambda u: u.unpack("<H")),
    b"L": _push(lambda u: int(u.readline().rstrip(b"L"))),
    b"\x8a": _push(lambda u: int.from_bytes(u.read(u.unpack("<B")), "little", signed=True)),
    b"\x8b": _push(lambda u: int.from_bytes(u.read(u.unpack("<i")), "little", signed=True)),
    b"F": _push(lambda u: float(u.readline())),
    b"G": _push(lambda u: u.unpack(">d")),
    b"S": _push(_string),
    b"T": _push(lambda u: u.read(u.unpack("<i")).decode("latin-1")),
    b"U": _push(lambda u: u.read(u.unpack("<B")).decode("latin-1")),
    b"V": _push(lambda u: u.readline().decode("raw-unicode-escape")),
    b"X": _push(lambda u: u.read(u.unpack("<I")).decode("utf-8", "surrogatepass")),
    b"\x8c": _push(lambda u: u.read(u.unpack("<B")).decode("utf-8", "surrogatepass")),
    b"\x8d": _push(lambda u: u.read(u.unpack("<Q")).decode("utf-8", "surrogatepass")),
    b"B": _push(lambda u: u.read(u.unpack("<I"))),
    b"C": _push(lambda u: u.read(u.unpack("<B"))),
    b"\x8e": _push(lambda u: u.read(u.unpack("<Q"))),
    b"\x96": _push(lambda u: bytearray(u.read(u.unpack("<Q")))),
    b"}": _push(lambda u: {}),
    b"]": _push(lambda u: []),
    b")": _push(lambda u: ()),
    b"\x8f": _push(lambda u: set()),
    b"d": _push(lambda u: _pairs({}, u.pop_mark())),
    b"l": _push(lambda u: u.pop_mark()),
    b"t": _push(lambda u: tuple(u.pop_mark())),
    b"\x91": _push(lambda u: frozenset(u.pop_mark())),
    b"\x85": lambda u: u.stack.append((u.stack.pop(),)),
    b"\x86": _tuple_n(2),
    b"\x87": _tuple_n(3),
    b"a": lambda u: _extend(u.stack[-2], [u.stack.pop()]),
    b"e": lambda u: _extend(*_after_mark(u)),
    b"s": lambda u: _setitems(u.stack[-3], [u.stack.pop(-2), u.stack.pop()]),
    b"u": lambda u: _setitems(*_after_mark(u)),
    b"\x90": lambda u: _add(*_after_mark(u)),
    b"g": lambda u: u.stack.append(u.memo[int(u.readline())]),
    b"h": lambda u: u.stack.append(u.memo[u.unpack("<B")]),
    b"j": lambda u: u.stack.append(u.memo[u.unpack("<I")]),
    b"p": lambda u: _memo_put(u, int(u.readline())),
    b"q": lambda u: _memo_put(u, u.unpack("<B")),
    b"r": lambda u: _memo_put(u, u.unpack("<I")),
    b"\x94": lambda u: _memo_put(u, len(u.memo)),
    b"c": lambda u: _global(u, u.readline().decode("utf-8"), u.readline().decode("utf-8")),
    b"\x93": _stack_global,
    b"R": _reduce,
    b"\x81": _newobj,
    b"\x92": _newobj_ex,
    b"b": _build,
    b"P": lambda u: _persid(u, u.readline().decode("ascii")),
    b"Q": lambda u: _persid(u, u.stack.pop()),
}


def _after_mark(u: Unpickler) -> tuple[Any, list[Any]]:
    """(the object under the last MARK, the items above it): for APPENDS/SETITEMS/ADDITEMS."""
    items = u.pop_mark()
    return u.stack[-1], items


_DISPATCH = {op[0]: handler for op, handler in _DISPATCH_BY_NAME.items()}  # keyed by opcode byte
