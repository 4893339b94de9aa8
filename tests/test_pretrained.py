"""Loading released guided-diffusion / v-diffusion checkpoints (edm_jax.pretrained) end to end.

The test writes small checkpoints itself, in torch's zip format (a hand-made protocol-2
pickle, as ``torch.save`` lays it out) and as safetensors: the fixture weights of
foreign_gd_legacy / foreign_gd_newattn / foreign_gd_classifier (parity through the loader
path, fixtures README "Pretrained models from elsewhere") and tiny random-weight models that
are sampled with several samplers, with and without classifier guidance.
"""

import json
import sys
import zipfile
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import edm_jax
from edm_jax import pretrained as pt
from edm_jax.nets import convert_openai as co
from edm_jax.nets import vdiffusion as vd
from edm_jax.nets.reader import write_safetensors

ROOT = Path(__file__).resolve().parents[1]
RNG = jax.random.key(3)
TOL = 3e-5  # fixtures README: guided-diffusion denoiser outputs
GRAD_TOL = 5e-5  # classifier gradients
# Small nets compile 3-4x faster without LLVM's expensive passes (same values).
FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}


def fast_jit(fn, *args):
    """fn(*args) through a jit compiled with FAST_COMPILE."""
    return jax.jit(fn).lower(*args).compile(compiler_options=FAST_COMPILE)(*args)


def maxrel(a, ref) -> float:
    return float(np.max(np.abs(np.asarray(a, np.float64) - ref)) / np.max(np.abs(ref)))


def nhwc(a: np.ndarray) -> jax.Array:
    return jnp.asarray(np.asarray(a).transpose(0, 2, 3, 1))


# --------------------------------------------------------------------------- torch zip files


def _str(s: str) -> bytes:
    b = s.encode()
    return b"X" + len(b).to_bytes(4, "little") + b  # BINUNICODE


def _ints(values) -> bytes:
    return b"(" + b"".join(b"J" + int(v).to_bytes(4, "little", signed=True) for v in values) + b"t"


_STORAGE = {np.dtype("float32"): b"FloatStorage", np.dtype("float16"): b"HalfStorage"}
_ODICT = b"ccollections\nOrderedDict\n)R"  # OrderedDict()


def _tensor(key: str, a: np.ndarray) -> bytes:
    """torch._utils._rebuild_tensor_v2(storage key, 0, size, stride, False, OrderedDict())."""
    pid = b"(" + _str("storage") + b"ctorch\n" + _STORAGE[a.dtype] + b"\n" + _str(key)
    pid += _str("cpu") + b"J" + a.size.to_bytes(4, "little") + b"tQ"  # BINPERSID
    strides = [s // a.itemsize for s in a.strides]
    args = pid + b"J\x00\x00\x00\x00" + _ints(a.shape) + _ints(strides) + b"\x89" + _ODICT
    return b"ctorch._utils\n_rebuild_tensor_v2\n(" + args + b"tR"


def write_torch_zip(path: Path, state_dict: dict[str, np.ndarray]) -> Path:
    """state_dict as torch.save writes it: archive/data.pkl + one storage per tensor."""
    pkl = b"\x80\x02" + _ODICT + b"("
    arrays = {str(i): np.ascontiguousarray(v) for i, v in enumerate(state_dict.values())}
    for name, key in zip(state_dict, arrays, strict=True):
        pkl += _str(name) + _tensor(key, arrays[key])
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("archive/data.pkl", pkl + b"u.")
        z.writestr("archive/byteorder", "little")
        for key, a in arrays.items():
            z.writestr(f"archive/data/{key}", a.astype(a.dtype.newbyteorder("<")).tobytes())
        z.writestr("archive/version", "3\n")
    return path


def random_state_dict(shapes: dict, seed: int) -> dict[str, np.ndarray]:
    """N(0, 1/fan_in) weights, 0.1 N vectors (the fixtures' draws), float32."""
    rng = np.random.default_rng(seed)
    return {
        k: (
            rng.normal(size=s) / np.sqrt(np.prod(s[1:])) if len(s) > 1 else 0.1 * rng.normal(size=s)
        ).astype(np.float32)
        for k, s in shapes.items()
    }


# --------------------------------------------------------------------------- fixture families


def fixture(fixtures_dir, case: str) -> tuple[dict, dict, dict]:
    """(arrays, config, state_dict) of foreign_<case>.npz."""
    with np.load(fixtures_dir / f"foreign_{case}.npz") as d:
        arrays = {k: d[k] for k in d.files}
    config = json.loads(str(arrays.pop("config_json")))
    sd = {k[len("param/") :]: arrays.pop(k) for k in list(arrays) if k.startswith("param/")}
    return arrays, config, sd


def gd_family(name: str, call: dict) -> pt.Family:
    """A Family of a fixture's create_model_and_diffusion call (openai_unet fields)."""
    size = call["image_size"]
    arch = dict(
        image_size=size, in_channels=3, model_channels=call["num_channels"],
        out_channels=6 if call["learn_sigma"] else 3, num_res_blocks=call["num_res_blocks"],
        attention_resolutions=tuple(size // int(r) for r in call["attention_resolutions"].split(",")),
        channel_mult=tuple(int(m) for m in call["channel_mult"].split(",")),
        num_classes=1000 if call["class_cond"] else None, num_heads=call["num_heads"],
        num_head_channels=call["num_head_channels"],
        use_scale_shift_norm=call["use_scale_shift_norm"], resblock_updown=call["resblock_updown"],
        use_new_attention_order=call["use_new_attention_order"],
    )  # fmt: skip
    return pt.Family(name, "guided-diffusion", arch=arch, schedule=call["noise_schedule"])


def classifier_family(call: dict) -> pt.Family:
    """A Family of the classifier fixture's EncoderUNetModel call (EncoderUNet fields)."""
    size = call["image_size"]
    arch = dict(
        img_resolution=size, in_channels=3, out_channels=call["out_channels"],
        model_channels=call["model_channels"], channel_mult=tuple(call["channel_mult"]),
        num_blocks=call["num_res_blocks"], dropout=0.0,
        attn_resolutions=tuple(size // ds for ds in call["attention_resolutions"]),
        adaptive_scale=call["use_scale_shift_norm"], resblock_updown=call["resblock_updown"],
        min_channels_per_group=1, qkv_layout="legacy", channels_per_head=call["num_head_channels"],
    )  # fmt: skip
    return pt.Family("fixture-classifier", "classifier", arch=arch)


@pytest.fixture(scope="module")
def files(fixtures_dir, tmp_path_factory):
    """Checkpoint files written here: the fixtures' weights (torch zip / safetensors)."""
    d = tmp_path_factory.mktemp("ckpt")
    out = {}
    for case in ("gd_legacy", "gd_newattn"):
        arrays, config, sd = fixture(fixtures_dir, case)
        fam = gd_family(case, config["call"]["create_model_and_diffusion"])
        path = d / (f"{case}.pt" if case == "gd_legacy" else f"{case}.safetensors")
        if case == "gd_legacy":
            write_torch_zip(path, sd)
        else:
            write_safetensors(path, sd)
        out[case] = (path, fam, arrays)
    arrays, config, sd = fixture(fixtures_dir, "gd_classifier")
    path = write_safetensors(d / "classifier.safetensors", sd)
    out["classifier"] = (path, classifier_family(config["call"]["EncoderUNetModel"]), arrays)
    return out


@pytest.mark.parametrize("case", ["gd_legacy", "gd_newattn"])
def test_loaded_denoiser_matches_reference(files, case):
    """The loaded model's denoise = k-diffusion's OpenAIDenoiser on the reference (3e-5)."""
    path, fam, z = files[case]
    model, params, config = pt.load_pretrained(path, fam)
    assert config["family"] == case and model.image_shape == (16, 16, 3)
    labels = None
    if "den_y" in z:
        assert model.label_dim == 1000
        labels = jax.nn.one_hot(z["den_y"], 1000)
    D = fast_jit(model.denoise, params, nhwc(z["den_x"]), jnp.asarray(z["den_sigma"]), labels)
    assert maxrel(np.asarray(D).transpose(0, 3, 1, 2), z["den_out"]) < TOL


def test_loaded_classifier_guidance_matches_reference(files):
    """Guided minus unguided D at kd_sigma = scale sigma^2 kd_grad (k-diffusion scaling)."""
    path, fam, _ = files["gd_legacy"]  # linear schedule, as the classifier fixture's t(sigma)
    cpath, cfam, z = files["classifier"]
    scale = 100.0
    model, params, config = pt.load_pretrained(
        path, fam, classifier=cpath, classifier_family=cfam, classifier_scale=scale
    )
    assert config["classifier_family"] == "fixture-classifier" and model.label_dim == 1000
    np.testing.assert_allclose(model.sigma_to_t(jnp.asarray(z["kd_sigma"])), z["kd_t"], rtol=2e-5)
    x, sigma = nhwc(z["kd_x"]), jnp.asarray(z["kd_sigma"])
    onehot = jax.nn.one_hot(z["y"], 1000)

    def run(params):
        guided = model.denoise(params, x, sigma, labels=onehot)
        return guided, model.model.denoise(params[0], x, sigma)

    guided, plain = fast_jit(run, params)
    grad = (guided - plain) / (scale * sigma[:, None, None, None] ** 2)
    assert maxrel(np.asarray(grad).transpose(0, 3, 1, 2), z["kd_grad"]) < GRAD_TOL


# --------------------------------------------------------------------------- tiny random models

TINY_GD = pt.Family("tiny-gd", "guided-diffusion", arch=dict(
    image_size=8, in_channels=3, model_channels=32, out_channels=6, num_res_blocks=1,
    attention_resolutions=(), channel_mult=(1, 2), num_head_channels=16,
    use_scale_shift_norm=True, resblock_updown=True,
))  # fmt: skip
TINY_CLS = pt.Family("tiny-classifier", "classifier", arch=dict(
    img_resolution=8, in_channels=3, out_channels=10, model_channels=32, channel_mult=(1, 2),
    num_blocks=1, attn_resolutions=(), dropout=0.0, adaptive_scale=True, resblock_updown=True,
    min_channels_per_group=1, qkv_layout="legacy", channels_per_head=32,
))  # fmt: skip
TINY_VD = pt.Family("tiny-vd", "v-diffusion", arch=dict(
    channels=(4, 8), num_blocks=1, mapping_width=16), image_size=8)  # fmt: skip


def _shapes(fam: pt.Family) -> dict:
    net = pt.build_network(fam)
    return vd.torch_shapes(net) if fam.kind == "v-diffusion" else co.reference_shapes(net)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """Random-weight tiny checkpoints (names hold 'tinygd' / 'tinycls') and loaded models."""
    d = tmp_path_factory.mktemp("tiny")
    gd = write_torch_zip(d / "my_tinygd_model.pt", random_state_dict(_shapes(TINY_GD), 0))
    cls = write_safetensors(d / "tinycls.safetensors", random_state_dict(_shapes(TINY_CLS), 1))
    plain = pt.load_pretrained(gd, TINY_GD)
    guided = pt.load_pretrained(
        gd, TINY_GD, classifier=cls, classifier_family=TINY_CLS, classifier_scale=5.0
    )
    return dict(gd=gd, cls=cls, plain=plain, guided=guided)


@pytest.mark.parametrize("sampler", ["euler_ancestral", "dpmpp_2m"])
def test_tiny_model_samples_batch_invariant(tiny, sampler):
    """Load -> sample: finite, clipped, a seed's image the same in any batch."""
    model, params, _ = tiny["plain"]
    kw = dict(sampler=sampler, num_steps=3, batch_size=3)
    out = edm_jax.sample(RNG, params, model, seeds=[0, 1, 2], **kw)
    again = edm_jax.sample(RNG, params, model, seeds=[2, 0], **kw)
    assert out.shape == (3, 8, 8, 3) and np.all(np.isfinite(out)) and np.abs(out).max() <= 1
    np.testing.assert_allclose(again, out[[2, 0]], atol=1e-5)
    assert not np.allclose(out[0], out[1], atol=1e-3)


def test_classifier_guidance_steers_samples(tiny):
    """Guided samples differ from unguided ones and with the class; batch-invariant per seed."""
    model, params, _ = tiny["plain"]
    gmodel, gparams, config = tiny["guided"]
    assert gmodel.label_dim == 10 and config["classifier_scale"] == 5.0
    kw = dict(sampler="dpmpp_2m", num_steps=3, batch_size=3)
    plain = edm_jax.sample(RNG, params, model, seeds=[0, 1, 2], **kw)
    guided = edm_jax.sample(RNG, gparams, gmodel, seeds=[0, 1, 2], labels=[4, 4, 7], **kw)
    again = edm_jax.sample(RNG, gparams, gmodel, seeds=[1, 2], labels=[4, 7], **kw)
    assert np.all(np.isfinite(guided))
    np.testing.assert_allclose(again, guided[[1, 2]], atol=1e-5)
    assert np.abs(guided - plain).max() > 1e-2  # guidance moved every batch
    other = edm_jax.sample(RNG, gparams, gmodel, seeds=[0, 1, 2], labels=[7, 7, 4], **kw)
    assert not np.allclose(other[0], guided[0], atol=1e-3)  # the class steers the sample


def test_vdiffusion_checkpoint_loads_and_samples(tmp_path):
    """A v-diffusion (cc12m_1-like, CLIP-modulated) safetensors file samples through the loader."""
    sd = random_state_dict(_shapes(TINY_VD), 2)
    path = write_safetensors(tmp_path / "vd.safetensors", sd)
    clip = np.random.default_rng(1).normal(size=(1, 512))
    model, params, config = pt.load_pretrained(path, TINY_VD, clip_embed=clip)
    assert config["kind"] == "v-diffusion" and model.clip_output
    ref = vd.from_vd_state_dict(sd, pt.build_network(TINY_VD))
    jax.tree.map(np.testing.assert_array_equal, params, ref)
    out = edm_jax.sample(RNG, params, model, seeds=[0, 1], sampler="heun", num_steps=3)
    assert out.shape == (2, 8, 8, 3) and np.all(np.isfinite(out))
    assert not np.allclose(out[0], out[1], atol=1e-3)


@pytest.fixture
def registered(monkeypatch):
    """The tiny families registered under names, as released ones are (file-name inference)."""
    for fam, stem in ((TINY_GD, "tinygd"), (TINY_CLS, "tinycls")):
        monkeypatch.setitem(pt.FAMILIES, fam.name, fam)
        monkeypatch.setitem(pt.RELEASED_FILES, stem, fam.name)


def test_convert_cli_round_trip(tiny, registered, tmp_path, capsys):
    """python -m edm_jax.convert: the .npz loads (family from the file) to identical params."""
    dst = tmp_path / "tiny.npz"
    assert pt.convert_main([str(tiny["gd"]), "--out", str(dst)]) == 0  # family from the name
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tiny.npz"]  # no temp file left
    model, params, config = edm_jax.load(dst)  # the fast path, through edm_jax.load
    assert config["family"] == "tiny-gd" and model.image_shape == (8, 8, 3)
    jax.tree.map(np.testing.assert_array_equal, params, tiny["plain"][1])
    with pytest.raises(ValueError, match="holds 'tiny-gd' weights, not 'tiny-classifier'"):
        pt.load_pretrained(dst, "tiny-classifier")
    assert pt.convert_main([str(tiny["gd"]), "--out", str(tmp_path / "x.pt")]) == 2
    assert (
        capsys.readouterr().err.strip()
        == "error: --out '" + str(tmp_path / "x.pt") + "' must end in .npz"
    )


def test_family_from_released_file_names():
    assert pt.infer_family("dl/256x256_diffusion_uncond.pt").name == "guided-diffusion-256-uncond"
    assert pt.infer_family("256x256_diffusion.pt").name == "guided-diffusion-256"
    assert pt.infer_family("64x64_classifier.pt").kind == "classifier"
    assert pt.infer_family("cc12m_1_cfg.pth").name == "v-diffusion-cc12m_1_cfg"
    assert pt.infer_family("model.pt") is None
    assert set(pt.RELEASED_FILES) >= {"512x512_diffusion", "wikiart_128", "imagenet_128"}
    assert {pt.FAMILIES[f].released for f in pt.RELEASED_FILES.values()} == set(pt.RELEASED_FILES)


def _one_line(excinfo) -> str:
    msg = str(excinfo.value)
    assert "\n" not in msg
    return msg


def test_bad_inputs_one_line_each(tiny, files, tmp_path):
    gd = tiny["gd"]
    with pytest.raises(ValueError, match=r"unknown family 'guided-diffusion-265' \(did you mean "
                       r"'guided-diffusion-256'\?\); valid: \[") as e:  # fmt: skip
        pt.load_pretrained(gd, "guided-diffusion-265")
    _one_line(e)
    plain = write_torch_zip(tmp_path / "model.pt", {"a": np.zeros(2, np.float32)})
    with pytest.raises(ValueError, match="cannot tell the model family of .*model.pt"):
        pt.load_pretrained(plain)
    with pytest.raises(FileNotFoundError, match="checkpoint not found: .*missing.pt"):
        pt.load_pretrained(tmp_path / "missing.pt", TINY_GD)
    with pytest.raises(
        ValueError, match=r"tiny-vd network: first mismatching key '\w[^']*' is not one of its"
    ):
        pt.load_pretrained(gd, TINY_VD, clip_embed=np.zeros((1, 512)))  # v-diffusion family
    with pytest.raises(ValueError, match=r"first (mismatching|missing) key '[^']+'") as e:
        pt.load_pretrained(gd, files["gd_legacy"][1])  # another size
    _one_line(e)
    with pytest.raises(
        ValueError, match="'fixture-classifier' is for 16x16 images; the model makes 8x8"
    ):
        pt.load_pretrained(gd, TINY_GD, classifier=files["classifier"][0],
                           classifier_family=files["classifier"][1])  # fmt: skip
    with pytest.raises(ValueError, match="is a classifier .* pass it as classifier="):
        pt.load_pretrained(tiny["cls"], TINY_CLS)
    with pytest.raises(
        ValueError, match="holds a guided-diffusion model .'tiny-gd'., not a guided"
    ):
        pt.load_pretrained(gd, TINY_GD, classifier=gd, classifier_family=TINY_GD)
    vd_file = write_safetensors(tmp_path / "vd.safetensors", random_state_dict(_shapes(TINY_VD), 2))
    with pytest.raises(ValueError, match="a classifier guides guided-diffusion models; 'tiny-vd'"):
        pt.load_pretrained(vd_file, TINY_VD, classifier=tiny["cls"], classifier_family=TINY_CLS,
                           clip_embed=np.zeros((1, 512)))  # fmt: skip
    with pytest.raises(ValueError, match="give exactly one of released and arch"):
        pt.Family("x", "guided-diffusion")
    released = tmp_path / "256x256_diffusion_uncond.pt"  # the family from the released name
    released.write_bytes(gd.read_bytes())
    with pytest.raises(ValueError, match=r"guided-diffusion-256-uncond network: first mismatching "
                       r"key '[^']+' has shape \(\d+,?\d*\), expected \(\d+"):  # fmt: skip
        pt.load_pretrained(released)  # a tiny model's weights: another size
    cut = tmp_path / "cut.pt"
    cut.write_bytes(gd.read_bytes()[:-100])
    with pytest.raises(ValueError, match="cut.pt") as e:
        pt.load_pretrained(cut, TINY_GD)
    _one_line(e)


def _sample_py():
    sys.path.insert(0, str(ROOT))
    try:
        import sample
    finally:
        sys.path.remove(str(ROOT))
    return sample


def test_sample_py_foreign_checkpoint(tiny, registered, tmp_path, capsys, monkeypatch):
    """sample.py --checkpoint X.pt --family F --classifier C: the files are loaded and sampled;
    a bad family: one line. The loaded model is swapped for the fixture's equal one so that
    its compiled program is reused (same sampler settings as test_classifier_guidance...)."""
    sample, real = _sample_py(), pt.load_pretrained
    gmodel, gparams, _ = tiny["guided"]

    def load(*args, **kwargs):
        model, params, config = real(*args, **kwargs)
        assert (config["family"], config["classifier_family"]) == ("tiny-gd", "tiny-classifier")
        assert model.scale == gmodel.scale == 5.0 and model.label_dim == 10
        jax.tree.map(np.testing.assert_array_equal, params, gparams)
        return gmodel, params, config

    monkeypatch.setattr(pt, "load_pretrained", load)
    out = tmp_path / "out"
    argv = ["--checkpoint", str(tiny["gd"]), "--family", "tiny-gd", "--classifier",
            str(tiny["cls"]), "--classifier-scale", "5", "--seeds", "0-1", "--steps", "3",
            "--sampler", "dpmpp_2m", "--batch", "3", "--outdir", str(out), "--no-progress",
            "--class", "3"]  # fmt: skip
    assert sample.main(argv) == 0
    ref = edm_jax.sample(jax.random.key(0), gparams, gmodel, seeds=[0, 1], labels=[3, 3],
                         sampler="dpmpp_2m", num_steps=3, batch_size=3)  # fmt: skip
    with np.load(out / "samples.npz") as z:
        np.testing.assert_array_equal(z["images"], edm_jax.api.to_uint8(ref))
        assert list(z["labels"]) == [3, 3]
    capsys.readouterr()
    assert sample.main([*argv[:3], "tiny-gdd", "--outdir", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: unknown family 'tiny-gdd' (did you mean 'tiny-gd'?)")
    assert "\n" not in err
    assert sample.main([*argv[:4], "--cfg-scale", "2", "--outdir", str(out)]) == 2
    assert "use --classifier" in capsys.readouterr().err
