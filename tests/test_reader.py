"""The torch-free checkpoint reader against files torch wrote (tests/data, see make_torch_files.py)."""

import io
import json
import pickle
import zipfile
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest

from edm_jax.nets import reader
from edm_jax.nets.reader import CheckpointError

DATA = Path(__file__).resolve().parent / "data"


@pytest.fixture(scope="module")
def expected() -> dict[str, np.ndarray]:
    """torch's own .numpy() of every tensor, keyed '<file stem>/<name>' (bfloat16 as float32)."""
    with np.load(DATA / "torch_expected.npz") as f:
        return dict(f)


def _check(got: dict, expected: dict, stem: str) -> None:
    """got equals torch's arrays for stem exactly: names, dtypes (bf16 kept), values."""
    want = {k.split("/", 1)[1]: v for k, v in expected.items() if k.startswith(stem + "/")}
    assert sorted(got) == sorted(want)
    for name, w in want.items():
        g = got[name]
        assert g.shape == w.shape and g.flags.c_contiguous, name
        if g.dtype == ml_dtypes.bfloat16:
            g = g.astype(np.float32)
        assert g.dtype == w.dtype, name
        np.testing.assert_array_equal(g, w, err_msg=name)


def test_state_dict_every_dtype_view_and_shared_storage(expected):
    sd = reader.read_state_dict(DATA / "torch_state_dict.pt")
    _check(sd, expected, "torch_state_dict")
    assert sd["dtype.bfloat16"].dtype == ml_dtypes.bfloat16 and sd["dtype.bool"].dtype == np.bool_
    assert all(v.flags.writeable for v in sd.values())
    sd["shared.first"][0, 0] = 123.0  # views become independent copies
    assert sd["shared.second"].min() != 123.0 and sd["view.transposed"][0, 0] != 123.0


def test_training_checkpoint(expected):
    ckpt = reader.read_checkpoint(DATA / "torch_training.ckpt")
    assert ckpt["step"] == 3
    assert ckpt["config"] == {
        "lr": 1e-3,
        "name": "tiny",
        "widths": [1, 2],
        "ema": True,
        "seed": None,
    }
    with pytest.raises(
        CheckpointError, match=r"several state dicts \['model', 'model_ema'\]: pass key="
    ):
        reader.read_state_dict(DATA / "torch_training.ckpt")
    ema = reader.read_state_dict(DATA / "torch_training.ckpt", key="model_ema")
    ema_expected = {k: v for k, v in expected.items() if k.startswith("torch_training/model_ema.")}
    _check({f"model_ema.{k}": v for k, v in ema.items()}, ema_expected, "torch_training")
    with pytest.raises(
        CheckpointError, match=r"no key 'ema'; it has \['config', 'model', 'model_ema', 'step'\]"
    ):
        reader.read_state_dict(DATA / "torch_training.ckpt", key="ema")


def test_prefix_selects_and_strips(expected):
    sd = reader.read_state_dict(DATA / "torch_state_dict.pt", prefix="view.")
    assert sorted(sd) == ["columns", "transposed"]
    np.testing.assert_array_equal(sd["columns"], expected["torch_state_dict/view.columns"])
    with pytest.raises(CheckpointError, match="holds no tensors under prefix 'nope.'"):
        reader.read_state_dict(DATA / "torch_state_dict.pt", prefix="nope.")


def test_legacy_format(expected):
    _check(reader.read_state_dict(DATA / "torch_legacy.pt"), expected, "torch_legacy")


def test_torchscript_archive(expected):
    module, constants = reader.read_torchscript(DATA / "torch_script.pt")
    sd = reader.read_state_dict(DATA / "torch_script.pt")
    io = ("torch_script/input", "torch_script/output")
    _check(sd, {k: v for k, v in expected.items() if k not in io}, "torch_script")
    assert module["training"] is True and {"bias", "training", "weight"} <= set(module["proj"])
    np.testing.assert_array_equal(constants[0], expected["torch_script_constant"])
    # the weights and the constant reproduce torch's forward: GroupNorm(1)(Linear(x)) * scale + c
    x = expected["torch_script/input"].astype(np.float64)
    y = x @ sd["proj.weight"].T + sd["proj.bias"]
    y = (y - y.mean(1, keepdims=True)) / np.sqrt(y.var(1, keepdims=True) + 1e-5)
    y = (y * sd["norm.weight"] + sd["norm.bias"]) * sd["scale"] + constants[0]
    np.testing.assert_allclose(y, expected["torch_script/output"], rtol=1e-5, atol=1e-6)


class _TorchStubUnpickler(pickle.Unpickler):
    """The standard unpickler with torch's names stubbed: shows the payload is live."""

    def find_class(self, module, name):
        return (lambda *a: None) if module.startswith("torch") else super().find_class(module, name)

    def persistent_load(self, pid):
        return None


def test_malicious_torch_zip_refused(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    marker = tmp_path / "pwned_by_torch_zip"
    data = zipfile.ZipFile(DATA / "torch_malicious.pt").read("torch_malicious/data.pkl")
    _TorchStubUnpickler(io.BytesIO(data)).load()
    assert marker.exists(), "the payload should be live for the standard pickle"
    marker.unlink()
    for read in (reader.read_checkpoint, reader.read_state_dict, reader.read_torchscript):
        with pytest.raises(
            CheckpointError, match=r"torch_malicious.pt:data.pkl: refusing to load posix.system"
        ):
            read(DATA / "torch_malicious.pt")
        assert not marker.exists()


def _zip_with(tmp_path, pkl: bytes, storage: bytes, byteorder: str = "little") -> Path:
    """A torch-layout zip holding data.pkl and one storage data/0."""
    path = tmp_path / "x.pt"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("x/data.pkl", pkl)
        z.writestr("x/byteorder", byteorder)
        z.writestr("x/data/0", storage)
    return path


def _tensor_pickle(numel: int, offset: int, size: tuple, stride: tuple) -> bytes:
    """A protocol-2 pickle of one tensor over storage '0' (torch's layout, written by hand)."""
    pid = b"(X\x07\x00\x00\x00storagectorch\nFloatStorage\nX\x01\x00\x00\x000X\x03\x00\x00\x00cpu"
    pid += b"J" + numel.to_bytes(4, "little") + b"tQ"
    tup = lambda xs: b"(" + b"".join(b"K" + bytes([v]) for v in xs) + b"t"  # noqa: E731
    args = (
        pid
        + b"K"
        + bytes([offset])
        + tup(size)
        + tup(stride)
        + b"\x89ccollections\nOrderedDict\n)R"
    )
    return b"\x80\x02ctorch._utils\n_rebuild_tensor_v2\n(" + args + b"tR."


def test_hand_made_zip_and_its_bounds(tmp_path):
    raw = np.arange(6, dtype="<f4").tobytes()
    ok = reader.read_checkpoint(_zip_with(tmp_path, _tensor_pickle(6, 1, (2, 2), (1, 3)), raw))
    np.testing.assert_array_equal(ok, [[1, 4], [2, 5]])
    big = np.arange(6, dtype=">f4").tobytes()  # torch on a big-endian machine
    ok = reader.read_checkpoint(_zip_with(tmp_path, _tensor_pickle(6, 0, (6,), (1,)), big, "big"))
    assert ok.dtype == np.float32 and ok.dtype.isnative
    np.testing.assert_array_equal(ok, np.arange(6))
    with pytest.raises(CheckpointError, match=r"reads past its storage of 6"):
        reader.read_checkpoint(_zip_with(tmp_path, _tensor_pickle(6, 2, (2, 2), (1, 3)), raw))
    with pytest.raises(CheckpointError, match=r"storage 0 holds 20 bytes, expected 6 x 4"):
        reader.read_checkpoint(_zip_with(tmp_path, _tensor_pickle(6, 0, (6,), (1,)), raw[:20]))


def test_truncated_and_foreign_files(tmp_path):
    blob = (DATA / "torch_state_dict.pt").read_bytes()
    (tmp_path / "cut.pt").write_bytes(blob[: len(blob) // 2])
    (tmp_path / "text.pt").write_text("not a checkpoint\n")
    (tmp_path / "cut.pkl").write_bytes(pickle.dumps({"a": np.ones(3)})[:-9])
    (tmp_path / "cut_legacy.pt").write_bytes((DATA / "torch_legacy.pt").read_bytes()[:-10])
    for name, msg in [("cut.pt", "not a readable zip"), ("text.pt", "unknown format"),
                      ("cut.pkl", "truncated"), ("cut_legacy.pt", "storage .* holds 22 bytes, expected 4 x 8")]:  # fmt: skip
        with pytest.raises(CheckpointError, match=rf"^{tmp_path / name}: .*{msg}") as info:
            reader.read_checkpoint(tmp_path / name)
        assert "\n" not in str(info.value)


def test_kdiff_safetensors_fixture(fixtures_dir):
    """k-diffusion's convert_for_inference output: model_ema in fp16, the config in metadata."""
    tensors, meta = reader.read_safetensors(
        fixtures_dir / "kdiff_inference_image_v1_tiny.safetensors"
    )
    with np.load(fixtures_dir / "kdiff_checkpoint.npz") as f:
        run = json.loads(str(f["config_json"]))["runs"]["image_v1"]
    described = run["checkpoint"]["items"]["model_ema"]["items"]
    assert sorted(tensors) == sorted(described)
    for name, d in described.items():
        assert tensors[name].shape == tuple(d["shape"]) and tensors[name].dtype == np.float16, name
    config = json.loads(meta["config"])
    assert {k: config["model"][k] for k in run["config_file"]["model"]} == run["config_file"][
        "model"
    ]
    assert all(np.isfinite(t).all() for t in tensors.values())


def test_safetensors_round_trip_every_dtype(tmp_path):
    rng = np.random.default_rng(0)
    tensors = {
        code: (rng.normal(size=(2, 3)) * 3).astype(dt)
        for code, dt in reader.SAFETENSORS_DTYPES.items()
    }
    tensors["big_endian"] = np.arange(4, dtype=">i4")
    tensors["scalar"], tensors["empty"] = np.float32(1.5).reshape(()), np.zeros((0, 2), np.float16)
    path = reader.write_safetensors(tmp_path / "t.safetensors", tensors, {"config": '{"a": 1}'})
    assert [p.name for p in tmp_path.iterdir()] == ["t.safetensors"]
    back, meta = reader.read_safetensors(path)
    assert meta == {"config": '{"a": 1}'} and sorted(back) == sorted(tensors)
    for k, v in tensors.items():
        assert back[k].dtype == v.dtype.newbyteorder("=") and back[k].shape == v.shape, k
        np.testing.assert_array_equal(back[k].astype(np.float64), v.astype(np.float64), err_msg=k)
    n = int.from_bytes(path.read_bytes()[:8], "little")  # the format, read by hand
    header = json.loads(path.read_bytes()[8 : 8 + n])
    assert (
        n % 8 == 0
        and header["BF16"]["dtype"] == "BF16"
        and header["big_endian"]["data_offsets"][1] - header["big_endian"]["data_offsets"][0] == 16
    )
    assert reader.read_state_dict(path)["F32"].dtype == np.float32


def test_safetensors_bad_header(tmp_path):
    good = reader.write_safetensors(
        tmp_path / "a.safetensors", {"w": np.ones(4, np.float32)}
    ).read_bytes()
    n = int.from_bytes(good[:8], "little")
    bad = (
        good[:8]
        + good[8 : 8 + n].replace(b'"data_offsets":[0,16]', b'"data_offsets":[0,99]')
        + good[8 + n :]
    )
    (tmp_path / "b.safetensors").write_bytes(bad)
    with pytest.raises(
        CheckpointError, match=r"tensor 'w' F32\[4\] at \[0, 99\] does not fit the 16 data bytes"
    ):
        reader.read_safetensors(tmp_path / "b.safetensors")
    (tmp_path / "c.safetensors").write_bytes(good[:-4])
    with pytest.raises(CheckpointError, match="does not fit the 12 data bytes"):
        reader.read_checkpoint(tmp_path / "c.safetensors")
    with pytest.raises(CheckpointError, match=r"dtype complex128; safetensors holds \['F64'"):
        reader.write_safetensors(tmp_path / "d.safetensors", {"z": np.zeros(2, np.complex128)})


def test_converters_read_torch_files_without_torch(expected):
    """metrics.convert_weights and nets.vae read .pth / .ckpt through this reader (float32)."""
    from edm_jax.metrics import convert_weights
    from edm_jax.nets import vae

    want = {
        k.split("/", 1)[1]: v.astype(np.float32)
        for k, v in expected.items()
        if k.startswith("torch_state_dict/")
    }
    for read in (convert_weights.read_state_dict, lambda p: vae.read_torch_weights(str(p))):
        got = read(DATA / "torch_state_dict.pt")
        assert sorted(got) == sorted(want) and all(v.dtype == np.float32 for v in got.values())
        for k, v in want.items():
            np.testing.assert_array_equal(got[k], v, err_msg=k)
    with pytest.raises(CheckpointError, match="refusing to load posix.system"):
        convert_weights.read_state_dict(DATA / "torch_malicious.pt")


def test_denial_of_service_bounds(tmp_path, monkeypatch):
    """Shared sub-dicts cannot make flattening exponential; stride-0 views cannot blow up."""
    d: dict = {"w": np.ones(1)}
    for _ in range(60):
        d = {"a": d, "b": d}
    (tmp_path / "laughs.pkl").write_bytes(pickle.dumps(d, protocol=4))
    tree = reader.read_checkpoint(tmp_path / "laughs.pkl")
    assert tree["a"] is tree["b"]
    for _ in range(60):
        tree = tree["b"]
    assert tree["w"].shape == (1,)
    monkeypatch.setattr(reader, "_MAX_NODES", 1000)
    with pytest.raises(CheckpointError, match="more than 1000 entries"):
        reader.read_state_dict(tmp_path / "laughs.pkl")
    raw = np.arange(6, dtype="<f4").tobytes()
    with pytest.raises(CheckpointError, match="expands its storage of 6 too far"):
        reader.read_checkpoint(
            _zip_with(tmp_path, _tensor_pickle(6, 0, (255, 255, 255, 255), (0, 0, 0, 0)), raw)
        )


def _lightning_pickle(cls: tuple[str, str]) -> bytes:
    """A CompVis/Lightning-style checkpoint: callback state keyed by the callback class, an
    instance of it (NEWOBJ + BUILD), and the weights under 'state_dict'."""
    g = f"c{cls[0]}\n{cls[1]}\n".encode()
    inst = g + b")\x81}X\x07\x00\x00\x00monitorX\x04\x00\x00\x00losssb"
    state = b"}X\x01\x00\x00\x00w" + pickle.dumps(np.arange(3.0), protocol=2)[2:-1] + b"s"
    return (b"\x80\x02}(X\t\x00\x00\x00callbacks}" + g + b"}X\x04\x00\x00\x00bestK\x07ssX\x08\x00\x00\x00instance"
            + inst + b"X\n\x00\x00\x00state_dict" + state + b"u.")  # fmt: skip


def test_lightning_bookkeeping_classes_are_inert(tmp_path):
    pl = ("pytorch_lightning.callbacks.model_checkpoint", "ModelCheckpoint")
    pickle.loads(_lightning_pickle(("collections", "OrderedDict")))  # well-formed for pickle itself
    (tmp_path / "sd.ckpt").write_bytes(_lightning_pickle(pl))
    ckpt = reader.read_checkpoint(tmp_path / "sd.ckpt")
    assert ckpt["callbacks"] == {".".join(pl): {"best": 7}} and ckpt["instance"] == {
        "monitor": "loss"
    }
    np.testing.assert_array_equal(reader.read_state_dict(tmp_path / "sd.ckpt")["w"], np.arange(3.0))
    with pytest.raises(CheckpointError, match=r"refusing to load pytorch_lightning\.callbacks"):
        reader.read_checkpoint(tmp_path / "sd.ckpt", inert=())
    (tmp_path / "other.ckpt").write_bytes(_lightning_pickle(("os", "system")))
    with pytest.raises(CheckpointError, match=r"refusing to load os\.system"):
        reader.read_checkpoint(tmp_path / "other.ckpt")


def test_allow_list_is_exact_pairs(tmp_path):
    """No dotted name can be looked up; a persistent id must name a storage class."""
    from edm_jax.nets.torch_pickle import TORCH_GLOBALS

    assert all(
        name.isidentifier() and module.replace(".", "_").isidentifier()
        for module, name in TORCH_GLOBALS
    )
    raw = np.arange(6, dtype="<f4").tobytes()
    bad = _tensor_pickle(6, 0, (6,), (1,)).replace(
        b"ctorch\nFloatStorage\n", b"ccollections\nOrderedDict\n"
    )
    with pytest.raises(CheckpointError, match=r"expected \(storage class, str key, int numel\)"):
        reader.read_checkpoint(_zip_with(tmp_path, bad, raw))
