"""The restricted unpickler: hostile pickles are refused with one error and run nothing.

Every "live" payload below creates a marker file when given to the standard ``pickle``
(checked first, so each test can fail), and must be refused by ``restricted_pickle`` and by
``metrics.refs.load_ref`` without the marker appearing.
"""

import copyreg
import pickle
import struct
from collections import OrderedDict

import numpy as np
import pytest

from edm_jax import restricted_pickle as rp
from edm_jax.metrics import refs


def _str(s: str) -> bytes:
    """BINUNICODE s."""
    b = s.encode()
    return b"X" + struct.pack("<I", len(b)) + b


def _g4(module: str, name: str) -> bytes:
    """Protocol-4 STACK_GLOBAL of (module, name) (dotted names allowed by pickle)."""
    return _str(module) + _str(name) + b"\x93"


def _call(func: bytes, *args: bytes) -> bytes:
    """func(*args) by MARK ... TUPLE REDUCE."""
    return func + b"(" + b"".join(args) + b"tR"


def _touch_code(marker) -> str:
    return f"__import__('pathlib').Path({str(marker)!r}).touch()"


def _wrap(body: bytes) -> bytes:
    """A protocol-4 pickle of body."""
    return b"\x80\x04" + body + b"."


def _payloads(marker) -> dict[str, bytes]:
    """name -> a pickle that creates marker when the standard pickle loads it."""
    code, touch = _touch_code(marker), f"touch {marker}"
    builtins_get = _g4("numpy.dtypes", "__builtins__.get")
    return {
        "numpy.dtypes __builtins__.get -> eval": _wrap(_call(_call(builtins_get, _str("eval")), _str(code))),
        "numpy.dtypes __builtins__.get -> exec": _wrap(_call(_call(builtins_get, _str("exec")), _str(code))),
        "numpy dotted __builtins__.get": _wrap(_call(_call(_g4("numpy", "testing.__builtins__.get"), _str("eval")), _str(code))),
        "numpy.testing runstring": _wrap(_call(_g4("numpy.testing._private.utils", "runstring"), _str(code), b"}")),
        "numpy.savetxt": _wrap(_call(_g4("numpy", "savetxt"), _str(str(marker)), b"]K\x01a")),
        "numpy.lib savetxt": _wrap(_call(_g4("numpy.lib._npyio_impl", "savetxt"), _str(str(marker)), b"]K\x01a")),
        "numpy.f2py os.system": _wrap(_call(_g4("numpy.f2py", "os.system"), _str(touch))),
        "builtins.eval": _wrap(_call(_g4("builtins", "eval"), _str(code))),
        "builtins.exec": _wrap(_call(_g4("builtins", "exec"), _str(code))),
        "builtins getattr(__import__)": _wrap(
            _call(_call(_g4("builtins", "getattr"), _call(_g4("builtins", "__import__"), _str("os")), _str("system")), _str(touch))
        ),
        "os.system": _wrap(_call(_g4("os", "system"), _str(touch))),
        "posix.system": _wrap(_call(_g4("posix", "system"), _str(touch))),
        "subprocess.call": _wrap(_call(_g4("subprocess", "call"), b"](" + _str("touch") + _str(str(marker)) + b"e")),
        "protocol 0 GLOBAL os.system": b"cos\nsystem\n(" + _str(touch) + b"tR.",
        "INST opcode": b"(" + _str(touch) + b"ios\nsystem\n.",
        "OBJ opcode": b"(" + _g4("os", "system") + _str(touch) + b"o.",
    }  # fmt: skip


def _not_live(marker) -> dict[str, bytes]:
    """name -> a hostile use of allowed names (nothing to run, but must still be refused)."""
    rec, nd = _g4("numpy._core.multiarray", "_reconstruct"), _g4("numpy", "ndarray")
    obj_dtype = _call(_g4("numpy", "dtype"), _str("O8"), b"\x89\x88")
    f8 = _call(_g4("numpy", "dtype"), _str("f8"), b"\x89\x88")
    return {
        "_reconstruct of a non-ndarray class": _wrap(_call(rec, _g4("collections", "OrderedDict"), b"K\x00\x85", b"C\x01b")),
        "object dtype": _wrap(obj_dtype),
        "array BUILD with objects as data": _wrap(_call(rec, nd, b"K\x00\x85", b"C\x01b") + b"(K\x01K\x01\x85" + f8 + b"\x89]" + _str(_touch_code(marker)) + b"atb"),
        "array BUILD with too little data": _wrap(_call(rec, nd, b"K\x00\x85", b"C\x01b") + b"(K\x01J\x00\x00\x00\x10\x85" + f8 + b"\x89C\x08" + b"\0" * 8 + b"tb"),
        "huge _frombuffer": _wrap(_call(_g4("numpy._core.numeric", "_frombuffer"), b"C\x00", f8, b"\x8a\x05\x00\x00\x00\x00\x10\x85", _str("C"))),
        "dtype BUILD with fields": _wrap(f8 + b"(K\x03" + _str("<") + b"N" + _str("a") + b"\x85}NJ\xff\xff\xff\xffJ\xff\xff\xff\xffK\x00tb"),
        "OrderedDict of a non-list": _wrap(_call(_g4("collections", "OrderedDict"), b"K\x01")),
        "_codecs.encode other codec": _wrap(_call(_g4("_codecs", "encode"), _str("x"), _str("rot13"))),
        "BUILD on a dict": _wrap(b"}}" + _str("__class__") + _str("x") + b"sb"),
        "BUILD on a list": _wrap(b"]}b"),
        "BUILD on an allowed global": _wrap(_g4("collections", "OrderedDict") + b"}b"),
        "NEWOBJ on an allowed function": _wrap(_g4("collections", "OrderedDict") + b")\x81"),
        "REDUCE on a non-global": _wrap(_str("eval") + b")R"),
        "persistent id without hook": _wrap(_str("storage") + b"Q"),
        "out-of-band buffer": b"\x80\x05\x97.",
        "truncated": _wrap(_str("abc"))[:-4],
        "unknown opcode": b"\x80\x04\xff.",
    }  # fmt: skip


def _ext_payload(marker) -> bytes:
    """EXT1 code 0xF0, registered to os.system by the test (copyreg's extension registry)."""
    return b"\x80\x02\x82\xf0(" + _str(f"touch {marker}") + b"tR."


LIVE = sorted(_payloads("m"))
NOT_LIVE = sorted(_not_live("m"))


@pytest.mark.parametrize("name", LIVE)
def test_payload_is_live_for_standard_pickle(tmp_path, name):
    marker = tmp_path / "marker"
    try:
        pickle.loads(_payloads(marker)[name])
    except Exception:
        pass
    assert marker.exists(), f"{name} should run code with the standard pickle"


@pytest.mark.parametrize("name", LIVE + NOT_LIVE)
def test_payload_refused(tmp_path, name):
    marker = tmp_path / "marker"
    payload = {**_payloads(marker), **_not_live(marker)}[name]
    with pytest.raises(rp.UnsafePickleError) as info:
        rp.loads(payload, source="evil.pkl")
    assert not marker.exists()
    assert str(info.value).startswith("evil.pkl: ") and "\n" not in str(info.value)


@pytest.mark.parametrize("name", LIVE)
def test_load_ref_refuses_payload(tmp_path, name):
    """metrics.refs reads .pkl through the restricted core (the old one ran numpy.dtypes payloads)."""
    marker = tmp_path / "marker"
    (tmp_path / "evil.pkl").write_bytes(_payloads(marker)[name])
    with pytest.raises(ValueError) as info:
        refs.load_ref(tmp_path / "evil.pkl")
    assert not marker.exists(), "the payload ran"
    assert "evil.pkl: " in str(info.value) and "refus" in str(info.value)


def test_ext_registry_code_refused(tmp_path):
    marker = tmp_path / "marker"
    copyreg.add_extension("os", "system", 0xF0)
    try:
        pickle.loads(_ext_payload(tmp_path / "live"))
        assert (tmp_path / "live").exists()
        with pytest.raises(rp.UnsafePickleError, match="EXT1 at byte 2 refused"):
            rp.loads(_ext_payload(marker))
    finally:
        copyreg.remove_extension("os", "system", 0xF0)
    assert not marker.exists()


def test_error_names_the_refused_pair():
    with pytest.raises(
        rp.UnsafePickleError, match=r"module 'numpy.dtypes', name '__builtins__.get'"
    ):
        rp.loads(_wrap(_g4("numpy.dtypes", "__builtins__.get")))
    assert issubclass(rp.UnsafePickleError, ValueError)


@pytest.mark.parametrize("protocol", range(6))
def test_plain_data_round_trips(protocol):
    data = {
        "fid": {"mu": np.arange(3.0), "sigma": np.eye(3)},
        "ints": np.arange(-3, 3, dtype=np.int16),
        "bools": np.array([True, False]),
        "fortran": np.asfortranarray(np.arange(6.0, dtype=np.float32).reshape(2, 3)),
        "empty": np.zeros((0, 2), np.float16),
        "scalar": np.float32(2.5),
        "dtype": np.dtype(">i4"),
        "od": OrderedDict(a=[1, (2, 3.5), None, "x", b"yy", bytearray(b"z")]),
        "sets": [{1, 2}, frozenset([3])],
        "big": 2**100,
    }
    back = rp.loads(pickle.dumps(data, protocol=protocol))
    want = pickle.loads(pickle.dumps(data, protocol=protocol))
    assert back.keys() == data.keys()
    for k in ("ints", "bools", "fortran", "empty"):
        assert (
            back[k].dtype == want[k].dtype
            and back[k].flags.f_contiguous == want[k].flags.f_contiguous
        )
        np.testing.assert_array_equal(back[k], want[k])
    np.testing.assert_array_equal(back["fid"]["sigma"], np.eye(3))
    assert back["scalar"] == np.float32(2.5) and back["scalar"].dtype == np.float32
    assert back["dtype"] == np.dtype(">i4")
    assert back["od"] == {"a": [1, (2, 3.5), None, "x", b"yy", bytearray(b"z")]}
    assert back["sets"] == [{1, 2}, frozenset([3])] and back["big"] == 2**100


def test_numpy_dtype_classes_are_exact_pairs():
    assert rp.loads(pickle.dumps(type(np.dtype("f4")), protocol=4)) is type(np.dtype("f4"))
    assert rp.loads(_wrap(_g4("numpy.dtypes", "Float32DType") + b")R")) == np.dtype("f4")


def test_edm2_reference_pkl_loads(tmp_path):
    """An edm2 dataset-refs file: a protocol-4 pickled dict of dicts of float64 arrays."""
    rng = np.random.default_rng(0)
    ref = {
        m: {"mu": rng.normal(size=8), "sigma": rng.normal(size=(8, 8))}
        for m in ("fid", "fd_dinov2")
    }
    (tmp_path / "ref.pkl").write_bytes(pickle.dumps(ref, protocol=4))
    back = refs.load_ref(tmp_path / "ref.pkl")
    for m in ref:
        for k in ("mu", "sigma"):
            assert back[m][k].dtype == np.float64
            np.testing.assert_array_equal(back[m][k], ref[m][k])


def test_shared_references_are_walked_once():
    """A 'billion laughs' of shared tuples (2**200 paths) loads at once, sharing preserved."""
    x: object = np.arange(2.0)
    for _ in range(200):
        x = (x, [x])
    back = rp.loads(pickle.dumps(x, protocol=4))
    assert back[0] is back[1][0]
