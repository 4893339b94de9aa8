"""Networks against NVlabs/edm: fixture outputs, parameter counts, state_dict conversion."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from edm_jax.nets import (
    build_model,
    from_state_dict,
    load_reference,
    load_reference_npz,
    to_state_dict,
)

FIXTURES = ["net_adm_edm", "net_adm_iddpm", "net_ddpmpp_edm", "net_ddpmpp_vp", "net_ncsnpp_ve"]


@functools.cache
def _load(path: str):
    """(model, params, npz arrays) of one reference fixture, converted once per session."""
    model, params = load_reference(path)
    with np.load(path) as d:
        arrays = {k: d[k] for k in d.files if not k.startswith("param/")}
    return model, params, arrays


def _denoise_fixture(model, params, d):
    """Our D_x on the fixture's inputs, NCHW like the reference."""
    x = jnp.asarray(d["x"].transpose(0, 2, 3, 1))  # NCHW -> NHWC
    out = model.denoise(
        params, x, d["sigma"], labels=d.get("class_labels"), augment_labels=d.get("augment_labels")
    )
    return np.asarray(out).transpose(0, 3, 1, 2)


@pytest.mark.parametrize("name", FIXTURES)
def test_fixture_parity(fixtures_dir, name):
    """Converted reference weights reproduce D_x to 1e-4 relative with the exact param count."""
    path = str(fixtures_dir / f"{name}.npz")
    model, params, d = _load(path)
    config, _ = load_reference_npz(path)
    assert model.num_params(params) == config["num_params"]
    out, ref = _denoise_fixture(model, params, d), d["D_x"]
    assert out.shape == ref.shape and out.dtype == np.float32
    assert np.linalg.norm(out - ref) / np.linalg.norm(ref) < 1e-4
    np.testing.assert_allclose(out, ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())


@pytest.mark.parametrize("name", ["net_ncsnpp_ve", "net_adm_iddpm"])
def test_state_dict_round_trip(fixtures_dir, name):
    """state_dict -> Flax -> state_dict -> Flax is exact (buffers derived from the config)."""
    path = str(fixtures_dir / f"{name}.npz")
    model, params, _ = _load(path)
    _, sd = load_reference_npz(path)
    back = to_state_dict(params, model)
    assert sorted(back) == sorted(sd)
    for k, v in sd.items():
        if k == "u":  # the reference accumulates u in float32; we derive it in float64
            np.testing.assert_allclose(back[k], v, rtol=2e-3)
        else:
            np.testing.assert_array_equal(back[k], v, err_msg=k)
    again = from_state_dict(back, model)
    jax.tree.map(np.testing.assert_array_equal, again, params)


def test_jit_matches_eager(fixtures_dir):
    """The denoiser jit-compiles (the model is hashable) and gives the eager result."""
    model, params, d = _load(str(fixtures_dir / "net_ddpmpp_vp.npz"))
    x = jnp.asarray(d["x"].transpose(0, 2, 3, 1))
    jitted = jax.jit(model.denoise)(params, x, d["sigma"], d["class_labels"])
    eager = model.denoise(params, x, d["sigma"], d["class_labels"])
    np.testing.assert_allclose(jitted, eager, rtol=1e-4, atol=1e-4 * np.abs(eager).max())
    assert hash(model) == hash(model)


def test_integer_labels_and_unconditional(fixtures_dir):
    """Integer labels equal their one-hot; labels=None equals the all-zero (null) label."""
    model, params, d = _load(str(fixtures_dir / "net_ddpmpp_vp.npz"))
    x, s = jnp.asarray(d["x"].transpose(0, 2, 3, 1)), d["sigma"]
    onehot = d["class_labels"]
    ints = jnp.asarray(onehot.argmax(-1), jnp.int32)
    np.testing.assert_allclose(
        model.denoise(params, x, s, ints), model.denoise(params, x, s, onehot), rtol=1e-6, atol=1e-6
    )
    zero = model.denoise(params, x, s, np.zeros_like(onehot))
    np.testing.assert_allclose(model.denoise(params, x, s, None), zero, rtol=1e-6, atol=1e-6)
    assert not np.allclose(zero, model.denoise(params, x, s, onehot), atol=1e-4)


# Reference parameter counts (EDMPrecond; augment_dim 9 where EDM trains with augmentation).
FULL_SIZE = [
    ("ddpmpp_cifar10", 32, 10, 9, 55_735_299),
    ("ddpmpp_cifar10", 32, 0, 9, 55_733_891),
    ("ncsnpp_cifar10", 32, 10, 9, 56_400_643),
    ("ncsnpp_cifar10", 32, 0, 9, 56_397_827),
    ("ddpmpp_64", 64, 0, 9, 61_805_571),
    ("ncsnpp_64", 64, 0, 9, 62_761_091),
    ("adm_imagenet64", 64, 1000, 0, 295_899_267),
]


@pytest.mark.parametrize("arch,res,label_dim,augment_dim,expected", FULL_SIZE)
def test_full_size_param_counts(arch, res, label_dim, augment_dim, expected):
    """Full-size presets have the reference's parameter count exactly (shapes only)."""
    model = build_model(
        arch, img_resolution=res, img_channels=3, label_dim=label_dim, augment_dim=augment_dim
    )
    shapes = jax.eval_shape(model.init, jax.random.key(0))
    assert model.num_params(shapes) == expected
    assert all(v.dtype == jnp.float32 for v in jax.tree.leaves(shapes))
