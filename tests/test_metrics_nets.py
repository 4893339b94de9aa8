"""Feature networks of the metrics: parity with the reference fixtures, preprocessing, weights.

The fixtures (../shared/fixtures/README.md) are outputs of pytorch-fid's FID Inception with
NVIDIA's detector preprocessing, and of facebookresearch/dinov2 with edm2's preprocessing.
"""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from edm_jax.metrics import preprocess
from edm_jax.metrics.convert_weights import main as convert_main
from edm_jax.metrics.convert_weights import params_from_state_dict, read_state_dict
from edm_jax.metrics.detectors import (
    DETECTORS,
    load_detector,
    param_template,
    random_detector,
)
from edm_jax.metrics.dinov2 import (
    DINOV2_PRESETS,
    DinoVisionTransformer,
    interpolate_pos_embed,
)
from edm_jax.metrics.inception import InceptionV3


def nhwc(a: np.ndarray) -> np.ndarray:
    """NCHW fixture array -> NHWC."""
    return np.ascontiguousarray(np.asarray(a).transpose(0, 2, 3, 1))


def maxrel(a, ref) -> float:
    """max|a - ref| / max|ref|."""
    return float(np.abs(np.asarray(a, np.float64) - ref).max() / np.abs(ref).max())


# ---------------------------------------------------------------- fixtures (module-scoped)


@pytest.fixture(scope="module")
def inc_z(fixtures_dir):
    """inception_fid.npz without its weights (images and reference outputs)."""
    with np.load(fixtures_dir / "inception_fid.npz") as z:
        return {k: z[k] for k in z.files if not k.startswith("param/")}


@pytest.fixture(scope="module")
def inc_det(fixtures_dir):
    """The FID Inception with the fixture's weights, loaded through the public loader."""
    return load_detector("inception", fixtures_dir / "inception_fid.npz")


@pytest.fixture(scope="module")
def inc_blocks(inc_z, inc_det):
    """Detector.forward (the compiled net, batch 4 as in the API test) on 32 and on 64 + 512."""
    assert inc_det.preprocess is not None and inc_det.forward is not None
    x = {S: inc_det.preprocess(jnp.asarray(nhwc(inc_z[f"images_{S}"]))) for S in (32, 64, 512)}
    out = {}
    for sizes, batch in (((32,), x[32]), ((64, 512), jnp.concatenate([x[64], x[512]]))):
        feats, logits, (p64, p192, p768) = inc_det.forward(inc_det.params, batch)
        i = 0
        for S in sizes:
            B = inc_z[f"images_{S}"].shape[0]
            for key, a in (
                ("features", feats),
                ("logits", logits),
                ("pool64", p64),
                ("pool192", p192),
                ("pool768", p768),
            ):
                out[f"{key}_{S}"] = np.asarray(a[i : i + B])
            i += B
    return out


@pytest.fixture(scope="module")
def dino_z(fixtures_dir):
    """dinov2_small.npz, all keys."""
    with np.load(fixtures_dir / "dinov2_small.npz") as z:
        return {k: z[k] for k in z.files}


@pytest.fixture(scope="module")
def dino_det(fixtures_dir):
    """The small DINOv2 with the fixture's weights, built from its config_json."""
    return load_detector("dinov2", fixtures_dir / "dinov2_small.npz")


# ---------------------------------------------------------------- preprocessing


def test_nvidia_resize_matches_detector(fixtures_dir):
    """TF1-style bilinear (sample i*W/299, border clamp) equals the TorchScript grid_sample."""
    with np.load(fixtures_dir / "resize_nvidia.npz") as z:
        cases = sorted(k[3:] for k in z.files if k.startswith("in_"))
        assert len(cases) == 5
        for case in cases:
            x = jnp.asarray(nhwc(z[f"in_{case}"]))
            out = np.asarray(preprocess.nvidia_resize(x))
            np.testing.assert_allclose(out, nhwc(z[f"out_{case}"]), rtol=0, atol=0.02, err_msg=case)
        # contrast: the half-pixel resize is far off, so the test can tell them apart
        x = jnp.asarray(nhwc(z["in_32x32"]))
        half = jax.image.resize(x, (1, 299, 299, 1), "linear")
        assert np.abs(np.asarray(half) - nhwc(z["out_32x32"])).max() > 1


def test_inception_input_matches_x299(inc_z):
    """uint8 NHWC -> resize -> (x - 128)/128 equals the detector's input (atol 1e-4)."""
    for S in (32, 512):
        x = preprocess.inception_input(jnp.asarray(nhwc(inc_z[f"images_{S}"][:1])))
        np.testing.assert_allclose(np.asarray(x), nhwc(inc_z[f"x299_{S}"]), rtol=0, atol=1e-4)


def test_quantize_as_nvlabs():
    """(x*127.5 + 128).clip(0, 255) truncated to uint8, as NVlabs/edm saves images."""
    x = np.array([-1.5, -1.0, -0.999, -0.5, 0.0, 0.001, 0.5, 0.996, 1.0, 2.0], np.float32)
    want = np.clip(x.astype(np.float64) * 127.5 + 128, 0, 255).astype(np.uint8)
    got = np.asarray(preprocess.quantize(jnp.asarray(x)))
    np.testing.assert_array_equal(got, want)
    assert got.tolist() == [0, 0, 0, 64, 128, 128, 191, 254, 255, 255]


def test_layouts_dtypes_and_grayscale():
    """NCHW is moved to NHWC, floats quantised, grayscale repeated; bad input is one clear error."""
    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, (2, 5, 7, 3), dtype=np.uint8)
    base = np.asarray(preprocess.to_nhwc_uint8(jnp.asarray(img)))
    np.testing.assert_array_equal(base, img)
    nchw = np.asarray(preprocess.to_nhwc_uint8(jnp.asarray(img.transpose(0, 3, 1, 2))))
    np.testing.assert_array_equal(nchw, img)
    as_float = (img.astype(np.float32) - 127.75) / 127.5  # quantises back to img
    np.testing.assert_array_equal(np.asarray(preprocess.to_nhwc_uint8(jnp.asarray(as_float))), img)
    gray = np.asarray(preprocess.to_nhwc_uint8(jnp.asarray(img[..., :1])))
    np.testing.assert_array_equal(gray, np.repeat(img[..., :1], 3, axis=-1))
    with pytest.raises(ValueError, match="dtype int32"):
        preprocess.to_nhwc_uint8(jnp.zeros((1, 8, 8, 3), jnp.int32))
    with pytest.raises(ValueError, match=r"\(1, 8, 8, 4\)"):
        preprocess.to_nhwc_uint8(jnp.zeros((1, 8, 8, 4), jnp.uint8))
    with pytest.raises(ValueError, match="4-D"):
        preprocess.to_nhwc_uint8(jnp.zeros((8, 8, 3), jnp.uint8))


# ---------------------------------------------------------------- Inception parity


def test_inception_features_and_logits_through_detector(inc_z, inc_det):
    """Detector.features / .logits on uint8 NHWC images: 1e-4 of max|ref| (float32)."""
    assert inc_det.feature_dim == 2048
    img = jnp.asarray(nhwc(inc_z["images_32"]))
    feats, logits = inc_det.features(img), inc_det.logits(img)
    assert feats.shape == (4, 2048) and feats.dtype == jnp.float32 and logits.shape == (4, 1008)
    assert maxrel(feats, inc_z["features_32"]) <= 1e-4
    assert maxrel(logits, inc_z["logits_32"]) <= 1e-4
    # NVIDIA's protocol is not pytorch-fid's own preprocessing
    assert maxrel(feats, inc_z["features_pytorchfid_32"]) > 1e-2


@pytest.mark.parametrize("S", [32, 64, 512])
@pytest.mark.parametrize("key", ["features", "logits", "pool64", "pool192", "pool768"])
def test_inception_parity(inc_z, inc_blocks, S, key):
    """32, 64 and 512 (downsampling) inputs: every block 1e-4 of max|ref| (float32)."""
    assert maxrel(inc_blocks[f"{key}_{S}"], inc_z[f"{key}_{S}"]) <= 1e-4


def test_inception_full_size(inc_det):
    """The full network: 472 tensors, 23,885,392 values (with BN statistics), fc 2048 -> 1008."""
    leaves = jax.tree.leaves(inc_det.params)
    assert len(leaves) == 472 and sum(x.size for x in leaves) == 23_885_392
    assert inc_det.params["fc"]["kernel"].shape == (2048, 1008)


# ---------------------------------------------------------------- DINOv2 parity


def test_dinov2_config_and_full_size(dino_z):
    """Built from config_json; dinov2_vitl14 has 304,368,640 parameters in 343 tensors."""
    config = json.loads(str(dino_z["config_json"]))
    full = param_template(DinoVisionTransformer(DINOV2_PRESETS["dinov2_vitl14"]), 224)
    leaves = jax.tree.leaves(full)
    assert sum(x.size for x in leaves) == config["full_size"]["num_params"] == 304_368_640
    assert len(leaves) == 343
    assert full["pos_embed"].shape == (1, 1370, 1024)


def test_dinov2_pos_embed_and_input(dino_z, dino_det):
    """pos_embed for 224 (torch bicubic a=-0.75, scale 16.1/37) and the resized input, atol 1e-4."""
    pos = interpolate_pos_embed(dino_det.params["pos_embed"], 16, 16, 0.1)
    np.testing.assert_allclose(np.asarray(pos), dino_z["pos_embed_224"], rtol=0, atol=1e-4)
    for S in (32, 512):
        x = preprocess.dinov2_input(jnp.asarray(nhwc(dino_z[f"images_{S}"][:1])))
        np.testing.assert_allclose(np.asarray(x), nhwc(dino_z[f"x224_{S}"]), rtol=0, atol=1e-4)


def test_dinov2_features_parity(dino_z, dino_det):
    """cls features and the cls token after every block: 2e-5 of max|ref| (float32)."""
    assert dino_det.preprocess is not None and dino_det.forward is not None
    for S in (32, 512):
        x = dino_det.preprocess(jnp.asarray(nhwc(dino_z[f"images_{S}"])))
        B = x.shape[0]
        x = jnp.concatenate([x, jnp.repeat(x[:1], 4 - B, axis=0)])  # batch 4: one compile
        feats, blocks = dino_det.forward(dino_det.params, x)
        assert maxrel(feats[:B], dino_z[f"features_{S}"]) <= 2e-5
        assert maxrel(blocks[:, :B], dino_z[f"cls_per_block_{S}"]) <= 2e-5


def test_dinov2_detector_api(dino_z, dino_det):
    """Detector.features on uint8 NHWC equals the fixture; dinov2 has no logits."""
    assert dino_det.feature_dim == 192
    feats = dino_det.features(jnp.asarray(nhwc(dino_z["images_32"])))
    assert feats.shape == (4, 192) and maxrel(feats, dino_z["features_32"]) <= 2e-5
    with pytest.raises(ValueError, match="only 'inception'"):
        dino_det.logits(jnp.asarray(nhwc(dino_z["images_32"])))


# ---------------------------------------------------------------- weights and errors


def test_wrong_keys_are_named(fixtures_dir, inc_det):
    """A missing, renamed or mis-shaped state_dict key is named in one line."""
    sd = read_state_dict(fixtures_dir / "inception_fid.npz")
    template = param_template(InceptionV3(), 299)
    bad = dict(sd)
    bad["Mixed_7c.branch_pool.conv.weigth"] = bad.pop("Mixed_7c.branch_pool.conv.weight")
    with pytest.raises(
        ValueError,
        match=r"missing key 'Mixed_7c\.branch_pool\.conv\.weight'.*unexpected key 'Mixed_7c\.branch_pool\.conv\.weigth'",
    ):
        params_from_state_dict(bad, template)
    bad = {**sd, "fc.weight": sd["fc.weight"][:1000]}
    with pytest.raises(
        ValueError, match=r"'fc\.weight' has shape \(1000, 2048\), expected \(1008, 2048\)"
    ):
        params_from_state_dict(bad, template)
    bad = {**sd, "Conv2d_1a_3x3.bn.num_batches_tracked": np.array(0)}
    params = params_from_state_dict(bad, template)  # torch's BN counter is ignored
    np.testing.assert_array_equal(params["fc"]["bias"], inc_det.params["fc"]["bias"])


def test_bad_weights_file_and_name(tmp_path, dino_z):
    """Missing file: where to download and the exact file name; wrong keys; unknown detector."""
    for name in DETECTORS:
        with pytest.raises(FileNotFoundError, match=DETECTORS[name].filename) as err:
            load_detector(name, tmp_path / "nothing.npz")
        assert DETECTORS[name].url in str(err.value) and "\n" not in str(err.value)
        assert ("convert_weights" in str(err.value)) == (name != "clip")  # CLIP's .pt is read as is
    with pytest.raises(
        ValueError, match=r"unknown detector 'dino'; valid: \['clip', 'dinov2', 'inception'\]"
    ):
        load_detector("dino", None)
    sd = {k[6:]: v for k, v in dino_z.items() if k.startswith("param/")}
    sd["blocks.2.ls1.scale"] = sd.pop("blocks.2.ls1.gamma")
    np.savez(tmp_path / "bad.npz", **sd)
    with pytest.raises(ValueError, match=r"missing key 'blocks\.2\.ls1\.gamma'"):
        load_detector("dinov2", tmp_path / "bad.npz")


def test_converter_npz_to_params(tmp_path, fixtures_dir, dino_det):
    """convert_weights writes the checked state_dict (torch names); it loads to the same params."""
    out = tmp_path / "dinov2_small.npz"
    assert convert_main(["dinov2", str(fixtures_dir / "dinov2_small.npz"), str(out)]) == 0
    with np.load(out) as z:
        assert len(z.files) == 91 and all(z[k].dtype == np.float32 for k in z.files)
        np.testing.assert_array_equal(z["blocks.0.attn.qkv.weight"].shape, (576, 192))
    converted = load_detector("dinov2", out)  # no config_json: sizes read from the shapes
    assert converted.feature_dim == 192
    jax.tree.map(np.testing.assert_array_equal, converted.params, dino_det.params)
    with pytest.raises(SystemExit):
        convert_main(["dinov2", str(tmp_path / "missing.pth"), str(out)])


def test_random_detectors():
    """Small random detectors for tests: the right shapes, finite, per-image."""
    rng = np.random.default_rng(1)
    img = jnp.asarray(rng.integers(0, 256, (3, 16, 16, 3), dtype=np.uint8))
    inc = random_detector("inception", jax.random.key(0), width=1 / 16, size=75)
    assert inc.feature_dim == 128  # 2048 / 16; compiled and run by the metrics tests
    out = jax.eval_shape(inc.apply_logits, inc.params, img)
    assert out.shape == (3, 1008) and out.dtype == jnp.float32
    det = random_detector("dinov2", jax.random.key(0))
    feats = det.features(img)
    assert feats.shape == (3, det.feature_dim) and bool(jnp.all(jnp.isfinite(feats)))
    flipped = det.features(img[::-1])  # same shape: no new compile
    np.testing.assert_allclose(flipped[::-1], feats, rtol=1e-5, atol=1e-5)
    assert float(jnp.std(feats, axis=0).min()) > 0
