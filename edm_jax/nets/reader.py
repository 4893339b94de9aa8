"""Torch-free checkpoint reader: .pt / .pth / .ckpt / .bin, TorchScript, .safetensors, .pkl.

Files from elsewhere are read as data and never executed. Every pickle goes through
``edm_jax.restricted_pickle`` with torch's tensor rebuilders added as checked functions
(``nets/torch_pickle.py``); TorchScript objects become plain attribute dicts and their
``code/`` is never read. The format is found from the file's bytes, not its name:

- torch zip (``torch.save`` since 1.6): ``<root>/data.pkl`` + storages ``<root>/data/<key>``
  (torch/serialization.py ``_save`` / ``_load``), little- or big-endian (``<root>/byteorder``);
- TorchScript zip (``torch.jit.save``): the same, plus ``constants.pkl`` / ``constants/<key>``;
- legacy torch (before 1.6): magic, protocol, sys_info, the object, storage keys, raw storages;
- safetensors: an 8-byte header length, a JSON header, raw little-endian data;
- a plain pickle of NumPy data (e.g. an edm2 ``.pkl`` of arrays).

Tensors come back as writable NumPy arrays (bfloat16 as ``ml_dtypes.bfloat16``), each its
own contiguous array: views and tensors sharing a storage are copied apart. A truncated, foreign or hostile
file raises ``CheckpointError`` with one line naming the file and what was expected.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
import tempfile
import zipfile
import zlib
from collections.abc import Collection, Iterator, Mapping
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np

from edm_jax import restricted_pickle as rp
from edm_jax.nets.torch_pickle import INERT_CLASSES, Storage, materialize, unpickle

__all__ = [
    "CheckpointError",
    "read_checkpoint",
    "read_safetensors",
    "read_state_dict",
    "read_torchscript",
    "write_safetensors",
]


class CheckpointError(ValueError):
    """A checkpoint that is truncated, of an unknown format, or asks to run code."""


# safetensors dtype names (safetensors/src/tensor.rs Dtype) -> NumPy dtype
SAFETENSORS_DTYPES = {
    "F64": np.dtype("<f8"), "F32": np.dtype("<f4"), "F16": np.dtype("<f2"),
    "BF16": np.dtype(ml_dtypes.bfloat16), "I64": np.dtype("<i8"), "I32": np.dtype("<i4"),
    "I16": np.dtype("<i2"), "I8": np.dtype("i1"), "U64": np.dtype("<u8"), "U32": np.dtype("<u4"),
    "U16": np.dtype("<u2"), "U8": np.dtype("u1"), "BOOL": np.dtype("?"),
    "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn), "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2),
}  # fmt: skip
_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C  # torch/serialization.py MAGIC_NUMBER
_MAX_NODES = 10**7  # containers and leaves a checkpoint's tree may have (counted with repeats)
_STATE_KEYS = ("state_dict", "model", "model_ema", "ema", "module", "net", "params")


def _read_storage(storage: Storage, f: Any, size: int, byteorder: str, where: str) -> np.ndarray:
    """A storage's elements [numel] read from the file object f (size bytes available)."""
    dtype = storage.dtype.newbyteorder(">" if byteorder == "big" else "<")
    if size < storage.numel * dtype.itemsize:
        raise CheckpointError(f"{where}: storage {storage.key} holds {size} bytes, "
                              f"expected {storage.numel} x {dtype.itemsize}")  # fmt: skip
    out = np.empty(storage.numel, dtype)  # read straight into a writable array
    if storage.numel and f.readinto(out.view(np.uint8).data) != out.nbytes:
        raise CheckpointError(f"{where}: storage {storage.key} ends early")
    return out


# ---- torch zip archives (torch.save, torch.jit.save) ----


def _zip_root(zf: zipfile.ZipFile, where: str) -> str:
    """The archive's top folder (holding data.pkl): torch names it after the file."""
    roots = [
        n[: -len("data.pkl")] for n in zf.namelist() if n.endswith("data.pkl") and n.count("/") <= 1
    ]
    if len(roots) != 1:
        raise CheckpointError(
            f"{where}: a zip without one <root>/data.pkl is not a torch checkpoint"
        )
    return roots[0]


def _read_zip_pickle(zf: zipfile.ZipFile, root: str, name: str, where: str, script: bool,
                     inert: Collection[tuple[str, str]] = INERT_CLASSES) -> Any:  # fmt: skip
    """``<root>/<name>.pkl`` with its tensors read from ``<root>/<name>/<key>``."""
    storages: dict[str, Storage] = {}
    value, _ = unpickle(
        zf.read(f"{root}{name}.pkl"), f"{where}:{name}.pkl", storages, script, inert=inert
    )
    members = {info.filename: info for info in zf.infolist()}
    order = zf.read(f"{root}byteorder").decode() if f"{root}byteorder" in members else "little"
    if order not in ("little", "big"):
        raise CheckpointError(f"{where}: byteorder {order!r:.20}, expected 'little' or 'big'")
    arrays = {}
    for key, st in storages.items():
        member = f"{root}{name}/{key}"
        if member not in members:
            raise CheckpointError(f"{where}: storage {member} is missing")
        with zf.open(members[member]) as f:
            arrays[key] = _read_storage(st, f, members[member].file_size, order, where)
    return materialize(value, arrays)


def read_torchscript(path: str | os.PathLike) -> tuple[dict, tuple]:
    """A TorchScript archive's (module attributes, constants) as data; its code is never read."""
    where = os.fspath(path)
    with _one_line_errors(where), _open_zip(where) as zf:
        root = _zip_root(zf, where)
        module = _read_zip_pickle(zf, root, "data", where, script=True)
        consts = ()
        if f"{root}constants.pkl" in zf.namelist():
            consts = _read_zip_pickle(zf, root, "constants", where, script=True)
    if not isinstance(module, dict):
        raise CheckpointError(f"{where}: data.pkl holds {type(module).__name__}, expected a module")
    return module, tuple(consts)


def _open_zip(where: str) -> zipfile.ZipFile:
    """The zip file at where, or CheckpointError."""
    try:
        return zipfile.ZipFile(where)
    except (zipfile.BadZipFile, OSError) as e:
        raise CheckpointError(f"{where}: not a readable zip archive ({e})") from None


def _read_torch_zip(where: str, inert: Collection[tuple[str, str]]) -> Any:
    """The object a torch.save zip (or a TorchScript archive's module) holds."""
    with _open_zip(where) as zf:
        root = _zip_root(zf, where)
        script = any(n.startswith(f"{root}code/") for n in zf.namelist())
        return _read_zip_pickle(zf, root, "data", where, script, inert)


# ---- legacy torch files (torch.save with _use_new_zipfile_serialization=False) ----


def _read_legacy(where: str, data: bytes, inert: Collection[tuple[str, str]]) -> Any:
    """torch/serialization.py _legacy_load: header pickles, the object, keys, raw storages."""
    magic, pos = unpickle(data, where, None)
    protocol, pos = unpickle(data, where, None, pos=pos)
    info, pos = unpickle(data, where, None, pos=pos)
    if magic != _LEGACY_MAGIC or protocol != 1001 or not isinstance(info, dict):
        raise CheckpointError(
            f"{where}: not a torch file (magic {magic!r:.30}, protocol {protocol!r:.10})"
        )
    storages: dict[str, Storage] = {}
    value, pos = unpickle(data, where, storages, pos=pos, inert=inert)
    keys, pos = unpickle(data, where, None, pos=pos)
    order = "little" if info.get("little_endian", True) else "big"
    arrays = {}
    for key in keys if isinstance(keys, list) else ():
        st = storages.get(key) if isinstance(key, str) else None
        if st is None or len(data) < pos + 8:
            raise CheckpointError(f"{where}: storage {key!r:.40} is unknown or truncated")
        numel = int.from_bytes(data[pos : pos + 8], "little")  # the size header is little-endian
        raw = data[pos + 8 : pos + 8 + numel * st.dtype.itemsize]
        arrays[key] = _read_storage(st, io.BytesIO(raw), len(raw), order, where)
        pos += 8 + len(raw)
    if set(arrays) != set(storages):
        raise CheckpointError(
            f"{where}: storages {sorted(set(storages) - set(arrays))[:3]} missing"
        )
    return materialize(value, arrays)


# ---- safetensors (github.com/huggingface/safetensors, docs "format") ----


def _safetensors_header(f: Any, where: str, size: int) -> tuple[dict, int]:
    """(the parsed JSON header, the byte where the data starts), checked against size."""
    head = f.read(8)
    n = int.from_bytes(head, "little") if len(head) == 8 else -1
    if not 2 <= n <= min(100_000_000, size - 8):
        raise CheckpointError(
            f"{where}: not a safetensors file (header length {n} of {size} bytes)"
        )
    try:
        header = json.loads(f.read(n))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{where}: safetensors header is not JSON ({e})") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{where}: safetensors header is not a JSON object")
    return header, 8 + n


def _safetensors_entry(
    name: str, entry: Any, data_bytes: int, where: str
) -> tuple[np.dtype, tuple, int, int]:
    """(dtype, shape, begin, end) of one header entry, checked."""
    entry = entry if isinstance(entry, dict) else {}
    shape, offsets = entry.get("shape"), entry.get("data_offsets")
    if (
        entry.get("dtype") not in SAFETENSORS_DTYPES
        or not isinstance(shape, list)
        or not all(type(d) is int and d >= 0 for d in shape)
        or not isinstance(offsets, list)
        or len(offsets) != 2
        or not all(type(o) is int for o in offsets)
    ):
        raise CheckpointError(f"{where}: bad safetensors entry {name!r}: {entry!r:.100} "
                              f"(dtype one of {list(SAFETENSORS_DTYPES)}, shape, data_offsets)")  # fmt: skip
    dtype, (begin, end) = SAFETENSORS_DTYPES[entry["dtype"]], offsets
    if not 0 <= begin <= end <= data_bytes or end - begin != dtype.itemsize * math.prod(shape):
        raise CheckpointError(f"{where}: tensor {name!r} {entry['dtype']}{shape} at {offsets} "
                              f"does not fit the {data_bytes} data bytes")  # fmt: skip
    return dtype, tuple(shape), begin, end


def read_safetensors(path: str | os.PathLike) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """(tensors, metadata) of a .safetensors file; arrays are native-endian copies."""
    where = os.fspath(path)
    size = os.path.getsize(where)
    tensors: dict[str, np.ndarray] = {}
    with open(where, "rb") as f:
        header, start = _safetensors_header(f, where, size)
        meta = header.pop("__metadata__", None) or {}
        if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
            raise CheckpointError(f"{where}: __metadata__ must map strings to strings")
        for name, entry in header.items():
            dtype, shape, begin, end = _safetensors_entry(name, entry, size - start, where)
            f.seek(start + begin)
            arr = np.empty(shape, dtype.newbyteorder("="))
            f.readinto(arr.reshape(-1).view(np.uint8).data)
            tensors[name] = arr if dtype.isnative else arr.byteswap()
    return tensors, dict(meta)


def _safetensors_dtype_name(name: str, a: np.ndarray) -> str:
    """The safetensors dtype name of a's dtype, or CheckpointError listing the valid ones."""
    for code, dt in SAFETENSORS_DTYPES.items():
        if a.dtype.newbyteorder("=") == dt.newbyteorder("="):
            return code
    raise CheckpointError(
        f"tensor {name!r} has dtype {a.dtype}; safetensors holds {list(SAFETENSORS_DTYPES)}"
    )


def write_safetensors(path: str | os.PathLike, tensors: Mapping[str, Any],
                      metadata: Mapping[str, str] | None = None) -> Path:  # fmt: skip
    """Write tensors (+ string metadata) as .safetensors atomically (temp file, os.replace)."""
    path, arrays, offset = Path(os.fspath(path)), [], 0
    header: dict[str, Any] = {}
    if metadata is not None:
        if not all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
            raise CheckpointError(
                f"safetensors metadata must map str to str, got {dict(metadata)!r:.100}"
            )
        header["__metadata__"] = dict(metadata)
    for name in sorted(tensors):
        a = np.asarray(tensors[name])
        code = _safetensors_dtype_name(name, a)
        a = np.asarray(a, a.dtype.newbyteorder("<") if a.dtype.itemsize > 1 else a.dtype, order="C")
        header[name] = {
            "dtype": code,
            "shape": list(a.shape),
            "data_offsets": [offset, offset + a.nbytes],
        }
        arrays.append(a)
        offset += a.nbytes
    head = json.dumps(header, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)  # the data starts 8-byte aligned
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(len(head).to_bytes(8, "little") + head)
            for a in arrays:
                f.write(a.reshape(-1).view(np.uint8).tobytes())
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise
    return path


# ---- the entry points ----


def _sniff(where: str) -> str:
    """The format of the file at where, from its first bytes."""
    with open(where, "rb") as f:
        head = f.read(16)
    if head[:4] == b"PK\x03\x04":
        return "zip"
    if (
        len(head) >= 9
        and head[8:9] == b"{"
        and 2 <= int.from_bytes(head[:8], "little") < 100_000_000
    ):
        return "safetensors"
    if head[:2] == b"\x80\x02" and head[2:3] == b"\x8a":
        return "legacy"
    if head[:1] == b"\x80":
        return "pickle"
    raise CheckpointError(f"{where}: unknown format (first bytes {head[:8]!r}); expected a torch zip, "
                          "legacy torch file, safetensors or pickle")  # fmt: skip


@contextlib.contextmanager
def _one_line_errors(where: str) -> Iterator[None]:
    """Turn a refused or malformed file's errors into one-line CheckpointErrors naming it."""
    try:
        yield
    except (rp.UnsafePickleError, RecursionError, KeyError, zipfile.BadZipFile, EOFError,
            zlib.error, NotImplementedError, MemoryError) as e:  # fmt: skip
        msg = str(e) if str(e).startswith(where) else f"{where}: {type(e).__name__}: {e}"
        raise CheckpointError(msg.replace("\n", " ")) from None


def read_checkpoint(
    path: str | os.PathLike, *, inert: Collection[tuple[str, str]] = INERT_CLASSES
) -> Any:
    """The data a checkpoint file holds (dicts, lists, numbers, strings, NumPy arrays).

    ``inert``: exact (module, name) classes read as attribute records (see INERT_CLASSES).
    """
    where = os.fspath(path)
    if not os.path.isfile(where):
        raise FileNotFoundError(f"checkpoint not found: {where}")
    with _one_line_errors(where):
        kind = _sniff(where)
        if kind == "safetensors":
            return read_safetensors(where)[0]
        if kind == "zip":
            return _read_torch_zip(where, inert)
        data = Path(where).read_bytes()
        if kind == "legacy":
            return _read_legacy(where, data, inert)
        return materialize(unpickle(data, where, None, inert=inert)[0], {})


def _flatten(tree: Any, prefix: str, out: dict[str, np.ndarray], budget: list[int]) -> None:
    """The array leaves of nested dicts as out['a.b.c'] (at most _MAX_NODES visits)."""
    budget[0] -= 1
    if budget[0] < 0:
        raise RecursionError(f"more than {_MAX_NODES} entries (shared sub-dicts nested too often)")
    if isinstance(tree, np.ndarray):
        out[prefix] = tree
    elif isinstance(tree, dict):
        for k, v in tree.items():
            _flatten(v, f"{prefix}.{k}" if prefix else str(k), out, budget)


def _state_tree(tree: Any, key: str | None, where: str) -> Any:
    """The sub-tree holding the weights: tree[key], the one known key present, or tree."""
    if not isinstance(tree, dict):
        raise CheckpointError(f"{where} holds {type(tree).__name__}, expected a dict of tensors")
    if key is not None:
        if key not in tree:
            raise CheckpointError(
                f"{where} has no key {key!r}; it has {sorted(map(str, tree))[:20]}"
            )
        return tree[key]
    if any(isinstance(v, np.ndarray) for v in tree.values()):
        return tree
    found = [k for k in _STATE_KEYS if isinstance(tree.get(k), dict)]
    if len(found) > 1:
        raise CheckpointError(f"{where} holds several state dicts {found}: pass key= one of them")
    return tree[found[0]] if found else tree


def read_state_dict(path: str | os.PathLike, prefix: str | None = None, key: str | None = None,
                    inert: Collection[tuple[str, str]] = INERT_CLASSES) -> dict[str, np.ndarray]:  # fmt: skip
    """Flat ``{name: array}`` of a checkpoint's weights (under key / prefix, prefix stripped)."""
    where = os.fspath(path)
    flat: dict[str, np.ndarray] = {}
    tree = _state_tree(read_checkpoint(where, inert=inert), key, where)
    with _one_line_errors(where):
        _flatten(tree, "", flat, [_MAX_NODES])
    if prefix is not None:
        flat = {k[len(prefix) :]: v for k, v in flat.items() if k.startswith(prefix)}
    if not flat:
        raise CheckpointError(
            f"{where} holds no tensors" + (f" under prefix {prefix!r}" if prefix else "")
        )
    return flat
