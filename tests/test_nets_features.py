"""Network features: layers against the reference maths, bf16, dropout, labels, self-cond, patches."""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from edm_jax.nets import (
    build_model,
    from_state_dict,
    load_reference_npz,
    to_state_dict,
    trainable_mask,
)
from edm_jax.nets.conditioning import LabelMap
from edm_jax.nets.layers import (
    FourierEmbedding,
    Init,
    _depthwise,
    downsample,
    resample_kernel,
    self_attention,
    upsample,
    weight_init,
)
from edm_jax.nets.model import patchify, unpatchify


@functools.cache
def _tiny(arch="ddpmpp", **kw):
    """A small model (8x8, 16 channels, two levels) for fast tests, built once per options."""
    base = dict(img_resolution=8, img_channels=3, model_channels=16, channel_mult=(1, 2))
    base.update(num_blocks=1, attn_resolutions=(4,), dropout=0.0)
    return build_model(arch, **{**base, **kw})


def _params(model, seed=1):
    """Non-trivial random float32 params of the model's shapes (numpy: no per-shape compiles)."""
    shapes = jax.eval_shape(model.init, jax.random.key(0))
    rng = np.random.default_rng(seed)
    draw = lambda v: (0.2 * rng.standard_normal(v.shape) + (v.ndim == 1)).astype(np.float32)  # noqa: E731
    return jax.tree.map(draw, shapes)


def _flat(arch="ddpmpp", **kw):
    """A one-level tiny model (fastest to compile) for conditioning and dropout tests."""
    return _tiny(arch, channel_mult=(1,), attn_resolutions=(8,), **kw)


@functools.cache
def _denoise(model):
    """model.denoise compiled once per model (train static)."""
    return jax.jit(model.denoise, static_argnames="train")


def _inputs(model, batch=2, seed=0):
    """Random x [B,H,W,C] and sigma [B]."""
    r, c = model.img_resolution, model.img_channels
    x = np.random.default_rng(seed).standard_normal((batch, r, r, c)).astype(np.float32)
    return jnp.asarray(x), jnp.linspace(0.1, 5.0, batch)


def test_attention_matches_reference_head_layout():
    """Multi-head attention splits fused qkv channels as the reference (head, channel, q/k/v)."""
    B, H, W, C, heads = 2, 3, 4, 8, 2
    qkv = np.random.default_rng(0).normal(size=(B, H, W, 3 * C)).astype(np.float32)
    t = qkv.transpose(0, 3, 1, 2).reshape(B * heads, C // heads, 3, H * W)  # torch NCHW code
    q, k, v = t[:, :, 0], t[:, :, 1], t[:, :, 2]
    logits = np.einsum("ncq,nck->nqk", q, k / np.sqrt(C // heads))
    w = np.exp(logits - logits.max(2, keepdims=True))
    w /= w.sum(2, keepdims=True)
    ref = np.einsum("nqk,nck->ncq", w, v).reshape(B, C, H, W).transpose(0, 2, 3, 1)
    np.testing.assert_allclose(self_attention(jnp.asarray(qkv), heads), ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("f", [(1, 1), (1, 3, 3, 1)])
def test_resampling_is_the_reference_filter(f):
    """Fast paths (box filter) equal the general filter; both preserve constants."""
    x = jnp.asarray(np.random.default_rng(0).standard_normal((2, 8, 8, 3)), jnp.float32)
    k, pad = resample_kernel(f), (len(f) - 1) // 2
    np.testing.assert_allclose(
        downsample(x, f, pad), _depthwise(x, k, pad=pad, stride=2, dilation=1), atol=1e-6
    )
    up_ref = _depthwise(x, 4 * k, pad=k.shape[0] - 1 - pad, stride=1, dilation=2)
    np.testing.assert_allclose(upsample(x, f, pad), up_ref, atol=1e-6)
    ones = jnp.ones((1, 8, 8, 1))
    np.testing.assert_allclose(downsample(ones, f, pad)[0, 2:-2, 2:-2], 1.0, atol=1e-6)
    np.testing.assert_allclose(upsample(ones, f, pad)[0, 2:-2, 2:-2], 1.0, atol=1e-6)


@pytest.mark.parametrize("arch", ["ddpmpp", "adm"])
def test_bf16_agrees_with_float32(arch):
    """bf16 compute (float32 params and output) agrees with float32 to bf16 tolerance."""
    m32, m16 = _tiny(arch), _tiny(arch, dtype="bfloat16")
    shapes = jax.eval_shape(m16.init, jax.random.key(0))
    assert all(v.dtype == jnp.float32 for v in jax.tree.leaves(shapes))
    params = _params(m32)
    x, sigma = _inputs(m32)
    F32, F16 = (jax.jit(m.apply_net)(params, x, jnp.log(sigma) / 4) for m in (m32, m16))
    assert F16.dtype == jnp.float32
    assert float(jnp.linalg.norm(F16 - F32) / jnp.linalg.norm(F32)) < 3e-2
    assert float(jnp.linalg.norm(F16 - F32) / jnp.linalg.norm(F32)) > 0  # really ran in bf16


def test_dropout_only_in_training():
    """Eval ignores rng; training draws dropout from the rng; dropout needs an rng."""
    model = _flat(dropout=0.5)
    params, (x, sigma) = _params(model), _inputs(model)
    f = _denoise(model)
    ev = f(params, x, sigma)
    np.testing.assert_array_equal(f(params, x, sigma, rng=jax.random.key(3)), ev)
    t1 = f(params, x, sigma, train=True, rng=jax.random.key(1))
    t1b = f(params, x, sigma, train=True, rng=jax.random.key(1))
    t2 = f(params, x, sigma, train=True, rng=jax.random.key(2))
    np.testing.assert_array_equal(t1, t1b)
    assert not np.allclose(t1, t2) and not np.allclose(t1, ev)
    with pytest.raises(ValueError, match="rng"):
        model.denoise(params, x, sigma, train=True)


@pytest.mark.parametrize("null", ["zero", "learned"])
def test_label_dropout_fraction_and_null(null):
    """Training drops the stated fraction of labels, replacing them by the null embedding."""
    B, L, p = 20000, 10, 0.25
    lm = LabelMap(L, 6, label_dropout=p, null=null)
    labels = jnp.arange(B) % L
    shapes = jax.eval_shape(lambda: lm.init(jax.random.key(0), labels, B))
    params = jax.tree.map(lambda v: np.random.default_rng(0).normal(size=v.shape), shapes)
    y = lm.apply(params, labels, B, train=True, rngs={"dropout": jax.random.key(5)})
    kept = lm.apply(params, labels, B)
    null_row = lm.apply(params, None, 1)[0]
    dropped = np.all(np.isclose(y, null_row, atol=1e-6), axis=1)
    np.testing.assert_allclose(y[~dropped], kept[~dropped], atol=1e-6)
    assert abs(dropped.mean() - p) < 4 * math.sqrt(p * (1 - p) / B)
    if null == "zero":  # the reference: the all-zero one-hot vector, i.e. the bias
        np.testing.assert_allclose(null_row, params["params"]["bias"], atol=1e-6)
    else:
        np.testing.assert_allclose(null_row, params["params"]["null"], atol=1e-6)


def test_label_dropout_in_model_and_integer_labels():
    """label_dropout=1 in training is unconditional; integer labels equal their one-hot."""
    model = _flat("adm", label_dim=5, label_dropout=1.0)
    params, (x, sigma) = _params(model), _inputs(model)
    f = _denoise(model)
    labels = jnp.array([1, 3])
    trained = f(params, x, sigma, labels, train=True, rng=jax.random.key(0))
    np.testing.assert_allclose(trained, f(params, x, sigma, None), atol=1e-5)
    cond = f(params, x, sigma, labels)
    assert not np.allclose(trained, cond, atol=1e-4)
    np.testing.assert_allclose(f(params, x, sigma, jax.nn.one_hot(labels, 5)), cond, atol=1e-5)
    with pytest.raises(ValueError, match="one-hot"):
        model.denoise(params, x, sigma, jnp.zeros((2, 4)))


def test_self_conditioning():
    """Self-conditioning doubles the input channels; None means a zero previous estimate."""
    model = _flat(self_cond=True)
    assert model.net.in_channels == 6
    params, (x, sigma) = _params(model), _inputs(model)
    f = _denoise(model)
    prev = jnp.asarray(np.random.default_rng(9).standard_normal(x.shape), jnp.float32)
    none = f(params, x, sigma)
    np.testing.assert_array_equal(none, f(params, x, sigma, self_cond=jnp.zeros_like(x)))
    assert not np.allclose(none, f(params, x, sigma, self_cond=prev), atol=1e-4)
    plain = _flat()
    with pytest.raises(ValueError, match="self_cond"):
        plain.denoise(_params(plain), x, sigma, self_cond=prev)


def test_patching_round_trip_and_model():
    """Patches fold p x p pixels into channels and back exactly; a patched model keeps shapes."""
    x = jnp.asarray(np.random.default_rng(0).standard_normal((2, 8, 8, 3)), jnp.float32)
    p = patchify(x, 2)
    assert p.shape == (2, 4, 4, 12)
    np.testing.assert_array_equal(p[0, 1, 2, :3], x[0, 2, 4])
    np.testing.assert_array_equal(p[0, 1, 2, 3:6], x[0, 2, 5])
    np.testing.assert_array_equal(unpatchify(p, 2), x)
    model = _tiny("adm", precond="iddpm", img_resolution=16, patch_size=2)
    assert (model.net.img_resolution, model.net.in_channels, model.net.out_channels) == (8, 12, 24)
    xs, sigma = _inputs(model)
    out = jax.eval_shape(model.denoise, _params(model), xs, sigma)
    assert out.shape == xs.shape and out.dtype == jnp.float32
    with pytest.raises(ValueError, match="patch_size"):
        _tiny(patch_size=3)
    with pytest.raises(ValueError, match="NHWC"):
        model.denoise(_params(model), jnp.zeros((2, 3, 16, 16)), sigma)


def test_fourier_frequencies_are_buffers():
    """NCSN++ Fourier frequencies get no gradient, are masked from training and not counted."""
    model = _tiny("ncsnpp")
    params = _params(model)
    mask = trainable_mask(params)
    assert mask["map_noise"]["freqs"] is False and mask["map_layer0"]["kernel"] is True
    n_all = sum(v.size for v in jax.tree.leaves(params))
    assert model.num_params(params) == n_all - params["map_noise"]["freqs"].size
    emb = FourierEmbedding(8)
    p = {"params": {"freqs": jnp.linspace(-3.0, 3.0, 4)}}
    g = jax.grad(lambda p: jnp.sum(emb.apply(p, jnp.array([0.3, -1.2])) ** 2))(p)
    assert float(jnp.abs(g["params"]["freqs"]).max()) == 0.0


def test_reference_initialisation():
    """Init gains follow the reference: bounds of xavier/kaiming uniform, zero-init layers."""
    key = jax.random.key(0)
    w = weight_init("xavier_uniform", 64, 32, 1.0)(key, (64, 32))
    assert float(jnp.abs(w).max()) <= math.sqrt(6 / 96) and float(jnp.std(w)) > 0.1
    w = weight_init("kaiming_uniform", 64, 32, math.sqrt(1 / 3))(key, (64, 32))
    assert float(jnp.abs(w).max()) <= math.sqrt(1 / 64) + 1e-7 and float(jnp.std(w)) > 0.05
    np.testing.assert_array_equal(weight_init("kaiming_uniform", 9, 9, 0.0)(key, (3, 3)), 0.0)
    with pytest.raises(ValueError, match="xavier_uniform"):
        Init("glorot")


def test_from_state_dict_names_missing_extra_and_misshaped():
    """Conversion errors name every missing, unexpected and mis-shaped key."""
    model = _tiny(label_dim=4)
    sd = to_state_dict(_params(model), model)
    del sd["model.map_layer0.bias"]
    sd["model.bogus.weight"] = np.zeros(3, np.float32)
    sd["model.enc.8x8_conv.weight"] = np.zeros((16, 3, 1, 1), np.float32)
    with pytest.raises(ValueError) as e:
        from_state_dict(sd, model)
    msg = str(e.value)
    assert "missing keys: model.map_layer0.bias" in msg
    assert "model.bogus.weight" in msg
    assert "model.enc.8x8_conv.weight (16, 3, 1, 1) != (16, 3, 3, 3)" in msg


def test_from_state_dict_rejects_wrong_resample_filter():
    """A buffer that contradicts the configuration (other resample filter) is an error."""
    model = _tiny()
    sd = to_state_dict(_params(model), model)
    name = "model.enc.4x4_down.conv0.resample_filter"
    sd[name] = np.full((1, 1, 2, 2), 0.3, np.float32)
    with pytest.raises(ValueError, match=name):
        from_state_dict(sd, model)


def test_bare_network_conversion_has_no_prefix():
    """A bare network converts with unprefixed names; wrong object types are rejected."""
    model = _tiny("adm")
    params = _params(model)
    sd = to_state_dict(params, model.net)
    assert "enc.8x8_conv.weight" in sd and "enc.4x4_down.skip.resample_filter" in sd
    jax.tree.map(np.testing.assert_array_equal, from_state_dict(sd, model.net), params)
    with pytest.raises(ValueError, match="DiffusionModel or a Flax network"):
        from_state_dict(sd, object())


def test_unknown_names_raise():
    """Unknown architecture, field, dtype and options raise ValueError listing the valid ones."""
    with pytest.raises(ValueError, match="ddpmpp_cifar10"):
        build_model("ddpm", img_resolution=32, img_channels=3)
    with pytest.raises(ValueError, match="model_channels"):
        build_model("adm", img_resolution=32, img_channels=3, model_chanels=64)
    with pytest.raises(ValueError, match="bfloat16"):
        build_model("adm", img_resolution=32, img_channels=3, dtype="fp8")
    with pytest.raises(ValueError, match="residual"):
        build_model("ncsnpp", img_resolution=32, img_channels=3, encoder_type="resid")
    with pytest.raises(ValueError, match="divisible"):
        build_model("ddpmpp", img_resolution=10, img_channels=3)
    with pytest.raises(ValueError, match="'vp'"):
        build_model("ddpmpp", precond="edm2", img_resolution=32, img_channels=3)
    with pytest.raises(ValueError, match="learned"):
        build_model("adm", img_resolution=32, img_channels=3, null_label="random")
    with pytest.raises(FileNotFoundError):
        load_reference_npz("/nonexistent/net.npz")


def test_skip_encoder_and_decoder_structure():
    """encoder/decoder 'skip' add the reference's aux layers (counted by hand) and run."""
    std, skip = _tiny(), _tiny(encoder_type="skip", decoder_type="skip")
    n_std = std.num_params(jax.eval_shape(std.init, jax.random.key(0)))
    params = _params(skip)
    # enc 4x4_aux_skip 1x1 conv 3->16; dec 4x4_aux_norm (32 ch) and 4x4_aux_conv 3x3 32->3.
    assert skip.num_params(params) - n_std == (3 * 16 + 16) + 2 * 32 + (32 * 3 * 9 + 3)
    sd = to_state_dict(params, skip)
    for name in ("enc.4x4_aux_down.resample_filter", "enc.4x4_aux_skip.weight"):
        assert "model." + name in sd
    assert "model.dec.8x8_aux_up.resample_filter" in sd
    assert not any("4x4_aux_up" in k for k in sd)
    x, sigma = _inputs(skip)
    out = jax.eval_shape(skip.denoise, params, x, sigma)
    assert out.shape == x.shape
