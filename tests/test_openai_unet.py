"""guided-diffusion UNetModel and classifier vs the reference (foreign_gd_*.npz), conversion."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from edm_jax.nets import convert_openai as co
from edm_jax.nets import openai_unet as ou
from edm_jax.nets.model import count_params

# Tiny nets compile 3-4x faster without LLVM's expensive passes (same values).
FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}


def fast_jit(fn, *args):
    """fn(*args) through a jit compiled with FAST_COMPILE."""
    return jax.jit(fn).lower(*args).compile(compiler_options=FAST_COMPILE)(*args)


def maxrel(a, ref) -> float:
    """max|a - ref| / max|ref| (the fixtures README's measure)."""
    return float(np.abs(np.asarray(a, np.float64) - ref).max() / np.abs(ref).max())


def nhwc(a: np.ndarray) -> jax.Array:
    """NCHW fixture array -> NHWC."""
    return jnp.asarray(np.asarray(a).transpose(0, 2, 3, 1))


def load(fixtures_dir, case: str) -> tuple[dict, dict, dict]:
    """(arrays, config, state_dict) of foreign_<case>.npz."""
    with np.load(fixtures_dir / f"foreign_{case}.npz") as d:
        arrays = {k: d[k] for k in d.files}
    config = json.loads(str(arrays.pop("config_json")))
    sd = {k[len("param/") :]: arrays.pop(k) for k in list(arrays) if k.startswith("param/")}
    return arrays, config, sd


def gd_net(config: dict):
    """Our network for a fixture's reference call (create_model_and_diffusion or UNetModel)."""
    call = config["call"]
    if "UNetModel" in call:
        kw = {k: v for k, v in call["UNetModel"].items() if k not in ("use_checkpoint", "use_fp16")}
        kw["attention_resolutions"] = tuple(kw["attention_resolutions"])
        return ou.openai_unet(**kw)
    args = ou.create_model.__code__.co_varnames[: ou.create_model.__code__.co_argcount]
    return ou.create_model(
        **{k: v for k, v in call["create_model_and_diffusion"].items() if k in args}
    )


@pytest.fixture(scope="module", params=["gd_legacy", "gd_newattn", "gd_halfmult"])
def gd_case(request, fixtures_dir):
    """(arrays, config, state_dict, net, params) of one guided-diffusion U-Net fixture."""
    arrays, config, sd = load(fixtures_dir, request.param)
    net = gd_net(config)
    config["case"] = request.param
    return arrays, config, sd, net, co.from_openai_state_dict(sd, net)


def test_unet_parity(gd_case):
    """model(x, t, y) at fractional t, learned-sigma output whole, within 3e-5 maxrel."""
    arrays, config, _, net, params = gd_case
    y = jnp.asarray(arrays["y"]) if "y" in arrays else None
    out = fast_jit(net.apply, {"params": params}, nhwc(arrays["x"]), jnp.asarray(arrays["t"]), y)
    assert out.shape[-1] == arrays["out"].shape[1]
    assert maxrel(np.asarray(out).transpose(0, 3, 1, 2), arrays["out"]) <= 3e-5
    assert count_params(params) == config["num_params"]


def test_state_dict_round_trip(gd_case):
    """Flax params -> reference names and layouts gives back the checkpoint exactly."""
    _, _, sd, net, params = gd_case
    back = co.to_openai_state_dict(params, net)
    assert set(back) == set(sd)
    for k, v in sd.items():
        np.testing.assert_array_equal(back[k], v, err_msg=k)


@pytest.fixture(scope="module")
def classifier(fixtures_dir):
    """(arrays, config, net, params) of the EncoderUNetModel fixture."""
    arrays, config, sd = load(fixtures_dir, "gd_classifier")
    kw = config["call"]["EncoderUNetModel"]
    assert kw["pool"] == "attention"
    net = ou.EncoderUNet(
        img_resolution=kw["image_size"],
        in_channels=kw["in_channels"],
        out_channels=kw["out_channels"],
        model_channels=kw["model_channels"],
        channel_mult=tuple(kw["channel_mult"]),
        num_blocks=kw["num_res_blocks"],
        attn_resolutions=tuple(kw["image_size"] // ds for ds in kw["attention_resolutions"]),
        dropout=0.0,
        adaptive_scale=kw["use_scale_shift_norm"],
        resblock_updown=kw["resblock_updown"],
        min_channels_per_group=1,
        qkv_layout="legacy",
        channels_per_head=kw["num_head_channels"],
    )
    params = co.from_openai_state_dict(sd, net)
    assert count_params(params) == config["num_params"]
    return arrays, config, net, params


def test_classifier_logits_and_gradient(classifier):
    """Logits within 3e-5; d(sum of selected log-probs)/dx (classifier_sample.py cond_fn) and
    k-diffusion's gradient through x * c_in at t(sigma) within 5e-5."""
    arrays, _, net, params = classifier

    def selected(x, t, y):
        logits = net.apply({"params": params}, x, t)
        logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
        return jnp.take_along_axis(logp, y[:, None], axis=1).sum(), logits

    args = (nhwc(arrays["x"]), jnp.asarray(arrays["t"]), jnp.asarray(arrays["y"]))
    fn = jax.jit(jax.value_and_grad(selected, has_aux=True))
    fn = fn.lower(*args).compile(compiler_options=FAST_COMPILE)
    (_, logits), grad = fn(*args)
    assert maxrel(logits, arrays["logits"]) <= 3e-5
    assert maxrel(np.asarray(grad).transpose(0, 3, 1, 2), arrays["grad"]) <= 5e-5
    c_in = jnp.asarray(arrays["kd_c_in"])[:, None, None, None]
    _, kd_grad = fn(nhwc(arrays["kd_x"]) * c_in, jnp.asarray(arrays["kd_t"]), args[2])
    assert maxrel(np.asarray(kd_grad * c_in).transpose(0, 3, 1, 2), arrays["kd_grad"]) <= 5e-5


def test_classifier_wrong_resolution(classifier):
    """A 16x16 classifier refuses 32x32 images before compute, naming both sizes."""
    _, _, net, params = classifier
    with pytest.raises(ValueError, match="16x16 images got 32x32"):
        net.apply({"params": params}, jnp.zeros((1, 32, 32, 3)), jnp.zeros((1,)))


@pytest.fixture(scope="module")
def released(fixtures_dir):
    """models_json and classifiers_json of foreign_gd_released.npz."""
    with np.load(fixtures_dir / "foreign_gd_released.npz") as d:
        return {**json.loads(str(d["models_json"])), **json.loads(str(d["classifiers_json"]))}


@pytest.mark.parametrize("name", [*ou.GUIDED_DIFFUSION_MODELS, *ou.GUIDED_DIFFUSION_CLASSIFIERS])
def test_released_configurations(released, name):
    """Exact key -> shape set and parameter count of each released model (eval_shape only)."""
    ref = released[name]
    shapes = co.reference_shapes(ou.released_model(name))
    assert shapes == {k: tuple(s) for k, s in ref["keys"]}
    assert sum(int(np.prod(s)) for s in shapes.values()) == ref["num_params"]


def test_released_preset_flags(released):
    """The presets are the README flags the fixture parsed (create_model arguments)."""
    for name, kw in ou.GUIDED_DIFFUSION_MODELS.items():
        ref = released[name]["create_model_and_diffusion"]
        assert {k: ref[k] for k in kw} == kw, name
        assert ou.NOISE_SCHEDULES[name] == ref["noise_schedule"]


def test_wrong_family_names_first_mismatching_key(fixtures_dir, gd_case):
    """Another size, another family, a missing label table: the first bad key is named."""
    _, _, sd, net, _ = gd_case
    _, _, sd1 = load(fixtures_dir, "sd1")
    with pytest.raises(
        ValueError, match=r"first mismatching key '(time_embed\.0|input_blocks\.0\.0)\.weight'"
    ):
        co.from_openai_state_dict(sd1, net)  # 4 latent channels: the first conv differs
    other = {"gd_legacy": "gd_halfmult", "gd_newattn": "gd_legacy", "gd_halfmult": "gd_legacy"}
    _, config, _ = load(fixtures_dir, other[gd_case[1]["case"]])
    with pytest.raises(ValueError, match="first m"):
        co.from_openai_state_dict(sd, gd_net(config))
    with pytest.raises(ValueError, match="no state_dict key starts with 'model.diffusion_model.'"):
        co.from_openai_state_dict(sd, net, prefix=co.SD_UNET_PREFIX)


def test_bad_options():
    """Unknown qkv layout and image size without a default channel_mult: one clear error."""
    with pytest.raises(ValueError, match="qkv_layout"):
        ou.DhariwalUNet(16, 3, 3, qkv_layout="old")
    with pytest.raises(ValueError, match="no default channel_mult for image_size 96"):
        ou.create_model(96, 64, 1)
    with pytest.raises(ValueError, match="unknown guided-diffusion model"):
        ou.released_model("256x256_diffusion_cond")
