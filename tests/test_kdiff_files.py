"""k-diffusion's checkpoint files without torch (edm_jax.nets.kdiff_files): a train.py .pth
rebuilt from the tree ../shared/fixtures/kdiff_checkpoint.npz describes, the inference
.safetensors, sample.py on them, and the export of our runs to the inference format."""

from __future__ import annotations

import json
import struct
import zipfile
from pathlib import Path

import jax
import numpy as np
import pytest

import edm_jax
from edm_jax.nets import kdiff_files
from edm_jax.nets.reader import read_safetensors

TOL = 2e-5  # the inference fixture's forward (fp16 weights in float32), relative L2


def _str(s: str) -> bytes:
    b = s.encode()
    return b"X" + len(b).to_bytes(4, "little") + b


_STORAGES = {"float32": b"FloatStorage", "float16": b"HalfStorage", "uint8": b"ByteStorage"}
_ODICT = b"ccollections\nOrderedDict\n)R"


class _Pickler:
    """Protocol-2 pickles of plain values and torch tensors, as torch.save writes them."""

    def __init__(self):
        self.storages: dict[str, np.ndarray] = {}

    def tensor(self, a: np.ndarray) -> bytes:
        key = str(len(self.storages))
        self.storages[key] = np.ascontiguousarray(a)
        pid = b"(" + _str("storage") + b"ctorch\n" + _STORAGES[str(a.dtype)] + b"\n" + _str(key)
        pid += _str("cpu") + b"J" + a.size.to_bytes(4, "little") + b"tQ"
        ints = lambda v: b"(" + b"".join(b"J" + int(i).to_bytes(4, "little") for i in v) + b"t"  # noqa: E731
        strides = [s // a.itemsize for s in a.strides] if a.ndim else []
        args = pid + b"J\x00\x00\x00\x00" + ints(a.shape) + ints(strides) + b"\x89" + _ODICT
        return b"ctorch._utils\n_rebuild_tensor_v2\n(" + args + b"tR"

    def value(self, v) -> bytes:
        if isinstance(v, np.ndarray):
            return self.tensor(v)
        if isinstance(v, dict):
            head = _ODICT if getattr(v, "ordered", False) else b"}"
            items = b"".join(self.value(k) + self.value(x) for k, x in v.items())
            return head + (b"(" + items + b"u" if v else b"")
        if isinstance(v, (list, tuple)):
            items = b"".join(self.value(x) for x in v)
            return b"]" + (b"(" + items + b"e" if v else b"") if isinstance(v, list) else (
                b"(" + items + b"t")  # fmt: skip
        if v is None or isinstance(v, bool):
            return {None: b"N", True: b"\x88", False: b"\x89"}[v]
        if isinstance(v, int):
            return b"J" + v.to_bytes(4, "little", signed=True)
        if isinstance(v, float):
            return b"G" + struct.pack(">d", v)
        return _str(v)

    def write(self, path: Path, tree) -> Path:
        pkl = b"\x80\x02" + self.value(tree) + b"."
        with zipfile.ZipFile(path, "w") as z:
            z.writestr("archive/data.pkl", pkl)
            z.writestr("archive/byteorder", "little")
            for key, a in self.storages.items():
                z.writestr(f"archive/data/{key}", a.tobytes())
            z.writestr("archive/version", "3\n")
        return path


class _OrderedDict(dict):
    ordered = True


def _rebuild(desc, rng):
    """The value a fixture tree entry describes (tensors: random values of its dtype/shape)."""
    kind = desc["type"]
    if kind in ("dict", "OrderedDict"):
        out = _OrderedDict() if kind == "OrderedDict" else {}
        out.update({k: _rebuild(v, rng) for k, v in desc["items"].items()})
        return out
    if kind in ("list", "tuple"):
        items = desc["values"] if "values" in desc else [_rebuild(v, rng) for v in desc["items"]]
        return list(items) if kind == "list" else tuple(items)
    if kind == "Tensor":
        return rng.normal(size=desc["shape"]).astype(desc["dtype"])
    return desc["value"]


@pytest.fixture(scope="module")
def ref(fixtures_dir):
    z = np.load(fixtures_dir / "kdiff_checkpoint.npz")
    return {k: z[k] for k in z.files if k != "config_json"}, json.loads(str(z["config_json"]))


def _pth(tmp_path, fixtures_dir, ref, run: str) -> tuple[Path, dict]:
    """train.py's checkpoint of `run`: model_ema = the inference weights; model's projections
    1.5x theirs."""
    tensors, _ = read_safetensors(fixtures_dir / f"kdiff_inference_{run}_tiny.safetensors")
    ema = dict(tensors)  # fp16, as the inference file holds them (buffers fp16-rounded too)
    desc = ref[1]["runs"][run]["checkpoint"]
    tree = _rebuild(desc, np.random.default_rng(0))
    tree["model_ema"] = _OrderedDict(ema)
    trained = {k: v * 1.5 if "proj" in k and k.endswith(".weight") else v for k, v in ema.items()}
    tree["model"] = _OrderedDict(trained)  # projections only: buffers must stay as derived
    tree["config"] = ref[1]["runs"][run]["checkpoint_config"]
    return _Pickler().write(tmp_path / f"{run}_00000003.pth", tree), ema


def _forward(model, params, ref, run):
    arrays = ref[0]
    labels = None
    if model.label_dim:
        labels = np.asarray(arrays[f"{run}/class_cond"])
    x = np.asarray(arrays[f"{run}/x"]).transpose(0, 2, 3, 1)
    D = model.denoise(params, x, arrays[f"{run}/sigma"], labels)
    return np.asarray(D).transpose(0, 3, 1, 2)


def _rel(a, b):
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


@pytest.mark.parametrize("run", ["hdit", "image_v1"])
def test_training_checkpoint_loads_without_torch(tmp_path, fixtures_dir, ref, run):
    path, _ = _pth(tmp_path, fixtures_dir, ref, run)
    assert kdiff_files.is_kdiff_file(path)
    model, params, config = edm_jax.load(str(path))  # the EMA, as the reference samples it
    assert config["model"]["type"] == ref[1]["runs"][run]["checkpoint_config"]["model"]["type"]
    assert _rel(_forward(model, params, ref, run), ref[0][f"{run}/D"]) < TOL
    _, trained, _ = kdiff_files.load(path, ema=False)  # train.py's `model`: 1.5x projections
    pairs = list(zip(jax.tree.leaves(trained), jax.tree.leaves(params), strict=True))
    scaled = [bool(np.any(a != b)) for a, b in pairs]
    assert any(scaled) and not all(scaled)
    for a, b in pairs:
        assert np.array_equal(a, b) or np.allclose(a, 1.5 * np.asarray(b), rtol=1e-3, atol=1e-6)


def test_a_pickle_that_would_run_code_is_refused(tmp_path):
    path = tmp_path / "evil.pth"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("archive/data.pkl", b"\x80\x02cos\nsystem\n" + _str("echo hi") + b"\x85R.")
        z.writestr("archive/version", "3\n")
    assert not kdiff_files.is_kdiff_file(path)
    with pytest.raises(ValueError, match="os.system"):
        kdiff_files.load(path)


def test_sample_py_samples_an_inference_file(tmp_path, fixtures_dir):
    import sample

    src = str(fixtures_dir / "kdiff_inference_hdit_tiny.safetensors")
    args = ["--checkpoint", src, "--steps", "3", "--sampler", "euler", "--no-progress"]
    assert (
        sample.main([*args, "--seeds", "0-3", "--class", "1", "--outdir", str(tmp_path / "a")]) == 0
    )
    assert (
        sample.main([*args, "--seeds", "2", "--class", "1", "--outdir", str(tmp_path / "b")]) == 0
    )
    a, b = (np.load(tmp_path / d / "samples.npz") for d in ("a", "b"))
    images = [v for k, v in a.items() if k.startswith("image") or k == "images"]
    one = [v for k, v in b.items() if k.startswith("image") or k == "images"]
    np.testing.assert_array_equal(images[0][2], one[0][0])  # seed 2: the same image in any batch


def test_export_round_trip(tmp_path, fixtures_dir):
    model, params, config = edm_jax.load(
        str(fixtures_dir / "kdiff_inference_image_v1_tiny.safetensors")
    )
    out = kdiff_files.export((model, params), tmp_path / "x.safetensors", "fp32")
    tensors, meta = read_safetensors(out)
    assert meta == {"config": json.dumps(config, indent=4)}  # as convert_for_inference.py
    _, back, _ = kdiff_files.load(out)
    assert jax.tree.all(jax.tree.map(np.array_equal, back, params))
    half, _ = read_safetensors(kdiff_files.export((model, params), tmp_path / "h.safetensors"))
    assert all(v.dtype == np.float16 for v in half.values())
    with pytest.raises(ValueError, match="dtype 'bf16' is not valid; valid: \\['fp16', 'fp32'\\]"):
        kdiff_files.export((model, params), tmp_path / "y.safetensors", "bf16")
