"""EDM2 U-Net parity with NVlabs/edm2 (net_edm2_*.npz), forced weight normalisation, presets."""

import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

import edm_jax
from edm_jax.nets.convert import from_state_dict, load_reference_npz, to_state_dict
from edm_jax.nets.edm2_unet import edm2_logvar, forced_normalize, normalize
from edm_jax.nets.model import count_params
from edm_jax.nets.presets import EDM2_TRAINING, build_model


def rel(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


@functools.partial(jax.jit, static_argnums=0)
def _forward(model, params, x, sigma, labels):
    """(D [B,C,H,W], logvar [B]) for NCHW input, as the reference Precond returns them."""
    D = model.denoise(params, x.transpose(0, 2, 3, 1), sigma, labels=labels)
    return D.transpose(0, 3, 1, 2), edm2_logvar(model, params, sigma)


_LOADED: dict = {}


def load_net(fixtures_dir, name: str):
    """(model, params, fixture data) of an EDM2 reference network, loaded once per module."""
    if name not in _LOADED:
        model, params, _ = edm_jax.load(str(fixtures_dir / name))
        _LOADED[name] = model, params, dict(np.load(fixtures_dir / name))
    return _LOADED[name]


@pytest.fixture(params=["net_edm2_cond.npz", "net_edm2_uncond.npz"])
def ref(request, fixtures_dir):
    """(model, params, fixture data) of one EDM2 reference network."""
    return load_net(fixtures_dir, request.param)


def test_denoiser_and_logvar_match_reference(ref):
    model, params, d = ref
    D, logvar = _forward(model, params, d["x"], d["sigma"], d.get("class_labels"))
    assert rel(D, d["D_x"]) < 1e-4
    assert rel(logvar, d["logvar"].reshape(-1)) < 1e-4
    assert model.num_params(params) == json.loads(str(d["config_json"]))["num_params"]


def test_state_dict_round_trip_is_exact(ref, fixtures_dir):
    model, params, d = ref
    sd = to_state_dict(params, model)
    want = {k[len("param/") :]: v for k, v in d.items() if k.startswith("param/")}
    assert sorted(sd) == sorted(want)
    for k in want:
        np.testing.assert_array_equal(sd[k], want[k], err_msg=k)


def test_forced_normalize_is_the_training_forward(fixtures_dir):
    """params <- forced_normalize(params); eval forward == the reference's train-mode call."""
    model, params, d = load_net(fixtures_dir, "net_edm2_cond.npz")
    after = traverse_util.flatten_dict(jax.jit(forced_normalize)(params))
    pre = "param_after_train_forward/"
    want = {k[len(pre) :]: v for k, v in d.items() if k.startswith(pre)}
    got = to_state_dict(traverse_util.unflatten_dict(after), model)
    assert sorted(got) == sorted(want)
    for k in want:
        np.testing.assert_allclose(got[k], want[k], rtol=2e-6, atol=1e-7, err_msg=k)
    D, logvar = _forward(
        model, traverse_util.unflatten_dict(after), d["x"], d["sigma"], d["class_labels"]
    )
    assert rel(D, d["D_x_train"]) < 1e-4
    assert rel(logvar, d["logvar_train"].reshape(-1)) < 1e-4
    assert rel(D, d["D_x"]) > 1e-4  # the normalisation changed the output (4.9e-4 in torch)


def test_normalize_adds_eps_to_the_rms_norm():
    w = jnp.arange(1.0, 7.0).reshape(2, 3)
    rms = np.sqrt(np.mean(np.asarray(w) ** 2, axis=1, keepdims=True))
    np.testing.assert_allclose(normalize(w), np.asarray(w) / (1e-4 + rms), rtol=1e-6)


def test_state_dict_of_another_net_names_the_mismatching_key(fixtures_dir):
    cond = load_net(fixtures_dir, "net_edm2_cond.npz")[0]
    _, sd_uncond = load_reference_npz(fixtures_dir / "net_edm2_uncond.npz")
    with pytest.raises(ValueError, match=r"missing keys: unet\.dec\.4x4_block0\.conv_res0\.weight"):
        from_state_dict(sd_uncond, cond)


PRESET_COUNTS = {  # ../shared/fixtures/README.md, "EDM2 preset parameter counts"
    "edm2-img512-xxs": (31_309_029, 31_053_029),
    "edm2-img512-xs": (124_713_253, 124_201_253),
    "edm2-img512-s": (280_212_837, 279_444_837),
    "edm2-img512-m": (497_807_781, 496_783_781),
    "edm2-img512-l": (777_498_085, 776_218_085),
    "edm2-img512-xl": (1_119_283_749, 1_117_747_749),
    "edm2-img512-xxl": (1_523_164_773, 1_521_372_773),
    "edm2-img64-xs": (124_710_949, 124_198_949),
    "edm2-img64-s": (280_209_381, 279_441_381),
    "edm2-img64-m": (497_803_173, 496_779_173),
    "edm2-img64-l": (777_492_325, 776_212_325),
    "edm2-img64-xl": (1_119_276_837, 1_117_740_837),
}


def _count(name: str, label_dim: int) -> int:
    t = EDM2_TRAINING[name]
    model = build_model(
        name,
        img_resolution=t["img_resolution"],
        img_channels=t["img_channels"],
        label_dim=label_dim,
    )
    return count_params(jax.eval_shape(model.init, jax.random.key(0)))


def test_preset_parameter_counts():
    assert sorted(PRESET_COUNTS) == sorted(EDM2_TRAINING)
    for name, (cond, _) in PRESET_COUNTS.items():
        assert _count(name, 1000) == cond, name
    for name in ("edm2-img512-xxs", "edm2-img64-xl"):  # a sample, for test time
        assert _count(name, 0) == PRESET_COUNTS[name][1], name  # -uncond = label_dim 0
