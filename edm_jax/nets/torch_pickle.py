"""Torch pickles as data: torch's tensor rebuilders as checked functions for restricted_pickle.

``torch.save`` pickles a tensor as ``torch._utils._rebuild_tensor_v2(storage, offset, size,
stride, requires_grad, hooks)`` with the storage as a persistent id ``('storage', <storage
class>, key, location, numel)`` (torch/_utils.py, torch/serialization.py). Here those names
are exact allow-list entries that return ``TensorRef`` (a checked strided view); ``materialize``
turns them into NumPy arrays once the storages' bytes are known. Nothing of torch is imported.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Collection, Mapping
from typing import Any

import ml_dtypes
import numpy as np

from edm_jax import restricted_pickle as rp

__all__ = ["INERT_CLASSES", "TORCH_GLOBALS", "Storage", "TensorRef", "materialize", "unpickle"]

_MAX_EXPAND = 2**30  # bytes a stride-0 (expanded) tensor may grow to beyond 16x its storage


class Storage:
    """A torch storage named in a pickle: its key, element dtype and length in elements."""

    def __init__(self, key: str, dtype: np.dtype, numel: int):
        self.key, self.dtype, self.numel = key, dtype, numel
        self.views = 0  # tensors made from it: one whole-storage tensor may take its array


class TensorRef:
    """A strided view of a storage; read once every storage is known (see _materialize)."""

    def __init__(
        self, storage: Storage, offset: int, size: tuple[int, ...], stride: tuple[int, ...]
    ):
        self.storage, self.offset, self.size, self.stride = storage, offset, size, stride


# ---- torch's rebuild functions (torch/_utils.py), argument-checked ----


def _tensor_ref(storage: Any, offset: Any, size: Any, stride: Any) -> TensorRef:
    """A checked strided view: non-negative ints, inside the storage."""
    if not isinstance(storage, Storage) or type(offset) is not int or offset < 0:
        rp.refuse(f"tensor of {storage!r:.60} at offset {offset!r:.20}: expected a storage")
    size, stride = (
        rp.nonneg_ints(tuple(size), "tensor size"),
        rp.nonneg_ints(tuple(stride), "tensor stride"),
    )
    if len(size) != len(stride):
        rp.refuse(f"tensor size {size} and stride {stride} differ in length")
    last = offset + sum((n - 1) * s for n, s in zip(size, stride, strict=True))
    if 0 not in size and last >= storage.numel:
        rp.refuse(f"tensor {size} / {stride} at {offset} reads past its storage of {storage.numel}")
    if math.prod(size) * storage.dtype.itemsize > max(
        16 * storage.numel * storage.dtype.itemsize, _MAX_EXPAND
    ):
        rp.refuse(f"tensor {size} / {stride} expands its storage of {storage.numel} too far")
    storage.views += 1
    return TensorRef(storage, offset, size, stride)


def _rebuild_tensor_v2(storage: Any, offset: Any, size: Any, stride: Any, requires_grad: Any = False,
                       hooks: Any = None, metadata: Any = None) -> TensorRef:  # fmt: skip
    """torch._utils._rebuild_tensor_v2 (no backward hooks)."""
    if hooks or not isinstance(requires_grad, bool):
        rp.refuse(f"tensor with requires_grad={requires_grad!r:.20}, hooks {hooks!r:.40} refused")
    return _tensor_ref(storage, offset, size, stride)


def _rebuild_parameter(data: Any, requires_grad: Any, hooks: Any, state: Any = None) -> TensorRef:
    """torch._utils._rebuild_parameter(_with_state): the tensor itself."""
    if not isinstance(data, TensorRef) or hooks or not isinstance(requires_grad, bool):
        rp.refuse(f"Parameter of {type(data).__name__} with hooks {hooks!r:.40} refused")
    return data


def _rebuild_from_type_v2(func: Any, new_type: Any, args: Any, state: Any) -> TensorRef:
    """torch._tensor._rebuild_from_type_v2 for plain tensors and Parameters."""
    if (
        func is not TORCH_GLOBALS["torch._utils", "_rebuild_tensor_v2"]
        or new_type not in _TENSOR_TYPES
    ):
        rp.refuse(f"_rebuild_from_type_v2({func!r:.40}, {new_type!r:.40}) refused")
    if state or not isinstance(args, tuple):
        rp.refuse("_rebuild_from_type_v2 with tensor state refused")
    return _rebuild_tensor_v2(*args)


def _torch_size(dims: Any = ()) -> tuple[int, ...]:
    """torch.Size(dims) as a tuple of ints."""
    return rp.nonneg_ints(tuple(dims) if isinstance(dims, (tuple, list)) else dims, "torch.Size")


def _storage(name: str, dtype: Any) -> rp.Allowed:
    """A torch storage class (only named in persistent ids): its value is the element dtype."""
    return rp.Allowed(f"torch.{name}", value=np.dtype(dtype))


_TENSOR_TYPES = (rp.Allowed("torch.Tensor"), rp.Allowed("torch.nn.parameter.Parameter"))
_UNTYPED = _storage("UntypedStorage", "u1")
TORCH_GLOBALS: dict[tuple[str, str], rp.Allowed] = {
    **rp.NUMPY_GLOBALS,
    ("torch._utils", "_rebuild_tensor_v2"): rp.Allowed("torch._rebuild_tensor_v2", _rebuild_tensor_v2),
    ("torch._utils", "_rebuild_tensor"): rp.Allowed("torch._rebuild_tensor", _tensor_ref),
    ("torch._utils", "_rebuild_parameter"): rp.Allowed("torch._rebuild_parameter", _rebuild_parameter),
    ("torch._utils", "_rebuild_parameter_with_state"): rp.Allowed("torch._rebuild_parameter", _rebuild_parameter),
    ("torch._tensor", "_rebuild_from_type_v2"): rp.Allowed("torch._rebuild_from_type_v2", _rebuild_from_type_v2),
    ("torch", "Tensor"): _TENSOR_TYPES[0],
    ("torch.nn.parameter", "Parameter"): _TENSOR_TYPES[1],
    ("torch", "Size"): rp.Allowed("torch.Size", _torch_size),
    # storage classes: torch/storage.py _dtype_to_storage_type_map
    ("torch", "DoubleStorage"): _storage("DoubleStorage", "f8"),
    ("torch", "FloatStorage"): _storage("FloatStorage", "f4"),
    ("torch", "HalfStorage"): _storage("HalfStorage", "f2"),
    ("torch", "BFloat16Storage"): _storage("BFloat16Storage", ml_dtypes.bfloat16),
    ("torch", "LongStorage"): _storage("LongStorage", "i8"),
    ("torch", "IntStorage"): _storage("IntStorage", "i4"),
    ("torch", "ShortStorage"): _storage("ShortStorage", "i2"),
    ("torch", "CharStorage"): _storage("CharStorage", "i1"),
    ("torch", "ByteStorage"): _storage("ByteStorage", "u1"),
    ("torch", "BoolStorage"): _storage("BoolStorage", "?"),
    ("torch", "UntypedStorage"): _UNTYPED,
    ("torch.storage", "UntypedStorage"): _UNTYPED,
}  # fmt: skip
_STORAGE_TYPES = {id(a) for a in TORCH_GLOBALS.values() if a.qualname.endswith("Storage")}


# Bookkeeping classes that checkpoints from elsewhere carry beside the weights (CompVis Stable
# Diffusion .ckpt files key their callback state by Lightning's ModelCheckpoint class). Nothing
# is imported: a bare class reads as its dotted name, an instance as a record of its attributes.
INERT_CLASSES: tuple[tuple[str, str], ...] = (
    ("pytorch_lightning.callbacks.model_checkpoint", "ModelCheckpoint"),
    ("lightning.pytorch.callbacks.model_checkpoint", "ModelCheckpoint"),
)


def _record_class(qualname: str) -> rp.Allowed:
    """An inert class: its instances become attribute records; it is never imported."""

    def new(*args: Any) -> rp.Record:
        if args:
            rp.refuse(
                f"{qualname} with arguments {args!r:.40} refused: only its attributes are data"
            )
        return rp.Record(qualname)

    return rp.Allowed(qualname, new, value=qualname, newobj=True)


def _resolver(
    script: bool, inert: Collection[tuple[str, str]]
) -> Callable[[str, str], rp.Allowed | None]:
    """Globals beyond TORCH_GLOBALS: the inert classes, and TorchScript's ``__torch__.*``."""

    def resolve(module: str, name: str) -> rp.Allowed | None:
        is_script = module == "__torch__" or module.startswith("__torch__.")
        if (module, name) in inert or (script and is_script and name.isidentifier()):
            return _record_class(f"{module}.{name}")
        return None

    return resolve


# ---- pickles with storages ----


def _persistent_storage(storages: dict[str, Storage]) -> Callable[[Any], Storage]:
    """torch's persistent_load: ('storage', storage class, key, location, numel[, view])."""

    def load(pid: Any) -> Storage:
        if not isinstance(pid, tuple) or len(pid) not in (5, 6) or pid[0] != "storage":
            rp.refuse(f"persistent id {pid!r:.80} is not a torch storage")
        _, kind, key, _location, numel = pid[:5]
        if (
            id(kind) not in _STORAGE_TYPES
            or not isinstance(key, str)
            or type(numel) is not int
            or numel < 0
        ):
            rp.refuse(f"storage {pid!r:.80}: expected (storage class, str key, int numel)")
        if len(pid) == 6 and pid[5] is not None:
            rp.refuse(f"storage {key!r} is a legacy storage view (not supported)")
        old = storages.setdefault(key, Storage(key, kind.value, numel))
        if old.dtype != kind.value or old.numel != numel:
            rp.refuse(f"storage {key!r} is named with two dtypes or sizes")
        return old

    return load


def unpickle(data: bytes | memoryview, source: str, storages: dict[str, Storage] | None,
              script: bool = False, pos: int = 0,
              inert: Collection[tuple[str, str]] = INERT_CLASSES) -> tuple[Any, int]:  # fmt: skip
    """One restricted pickle of torch data: (its value, the byte after it)."""
    u = rp.Unpickler(
        data, pos=pos, source=source, allowed=TORCH_GLOBALS, leaf_types=(TensorRef,),
        resolve=_resolver(script, inert),
        persistent_load=None if storages is None else _persistent_storage(storages),
    )  # fmt: skip
    return u.load(), u.pos


def _owns_whole(x: TensorRef, base: np.ndarray) -> bool:
    """Whether x is its storage's only tensor and covers it C-contiguously (base is writable)."""
    if x.storage.views != 1 or x.offset != 0 or math.prod(x.size) != base.size:
        return False
    expect = 1
    for n, s in zip(reversed(x.size), reversed(x.stride), strict=True):
        if n > 1 and s != expect:
            return False
        expect *= n
    return base.dtype.isnative and base.flags.writeable


def materialize(
    x: Any, arrays: Mapping[str, np.ndarray], seen: dict[int, Any] | None = None
) -> Any:
    """x with every tensor view read from its storage (a contiguous native-endian copy)."""
    seen = {} if seen is None else seen
    if id(x) in seen:  # shared objects (and views of them) are read once
        return seen[id(x)]
    if isinstance(x, TensorRef):
        base = arrays[x.storage.key]
        if 0 in x.size:
            return np.zeros(x.size, base.dtype.newbyteorder("="))
        strides = tuple(s * base.itemsize for s in x.stride)
        if _owns_whole(x, base):
            out: Any = base.reshape(x.size)  # no copy: the only tensor of this storage
        else:
            view = np.lib.stride_tricks.as_strided(
                base[x.offset :], x.size, strides, writeable=False
            )
            out = np.array(view, base.dtype.newbyteorder("="), order="C")  # [*size], a copy
    elif isinstance(x, dict):
        out = {k: materialize(v, arrays, seen) for k, v in x.items()}
    elif isinstance(x, (list, tuple)):
        out = type(x)(materialize(v, arrays, seen) for v in x)
    else:
        return x
    return seen.setdefault(id(x), out)
