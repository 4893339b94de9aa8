"""CompVis (SD 1.x) and Stability (SD 2.x) U-Nets vs the reference (foreign_sd*.npz)."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from edm_jax.nets import convert_openai as co
from edm_jax.nets import ldm_unet as lu
from edm_jax.nets.model import count_params

FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}


def fast_jit(fn, *args):
    """fn(*args) through a jit compiled without LLVM's expensive passes (same values)."""
    return jax.jit(fn).lower(*args).compile(compiler_options=FAST_COMPILE)(*args)


def maxrel(a, ref) -> float:
    """max|a - ref| / max|ref| (the fixtures README's measure)."""
    return float(np.abs(np.asarray(a, np.float64) - ref).max() / np.abs(ref).max())


def load(fixtures_dir, case: str) -> tuple[dict, dict, dict]:
    """(arrays, config, state_dict) of foreign_<case>.npz."""
    with np.load(fixtures_dir / f"foreign_{case}.npz") as d:
        arrays = {k: d[k] for k in d.files}
    config = json.loads(str(arrays.pop("config_json")))
    sd = {k[len("param/") :]: arrays.pop(k) for k in list(arrays) if k.startswith("param/")}
    return arrays, config, sd


def net_of(config: dict) -> lu.LDMUNet:
    """Our U-Net for a fixture's unet_kwargs."""
    kw = dict(config["unet_kwargs"])
    kw["attention_resolutions"] = tuple(kw["attention_resolutions"])
    kw["channel_mult"] = tuple(kw["channel_mult"])
    return lu.ldm_unet(**kw)


@pytest.fixture(scope="module", params=["sd1", "sd2"])
def sd_case(request, fixtures_dir):
    """(arrays, config, state_dict, net, params) of one SD U-Net fixture."""
    arrays, config, sd = load(fixtures_dir, request.param)
    net = net_of(config)
    return arrays, config, sd, net, co.from_openai_state_dict(sd, net)


def test_unet_parity_with_context(sd_case):
    """unet(x, t, context) on non-square latents within 3e-5 maxrel; exact parameter count."""
    arrays, config, _, net, params = sd_case
    x = jnp.asarray(arrays["x"].transpose(0, 2, 3, 1))
    args = ({"params": params}, x, jnp.asarray(arrays["t"]), jnp.asarray(arrays["context"]))
    out = fast_jit(net.apply, *args)
    assert maxrel(np.asarray(out).transpose(0, 3, 1, 2), arrays["out"]) <= 3e-5
    assert count_params(params) == config["num_params"]


def test_single_file_checkpoint_round_trip(sd_case):
    """Params -> 'model.diffusion_model.' names -> params, other checkpoint parts ignored."""
    _, _, sd, net, params = sd_case
    full = co.to_openai_state_dict(params, net, prefix=co.SD_UNET_PREFIX)
    assert set(full) == {co.SD_UNET_PREFIX + k for k in sd}
    for k, v in sd.items():
        np.testing.assert_array_equal(full[co.SD_UNET_PREFIX + k], v, err_msg=k)
    full["first_stage_model.decoder.conv_in.weight"] = np.zeros((1,), np.float32)
    back = co.from_openai_state_dict(full, net, prefix=co.SD_UNET_PREFIX)
    jax.tree.map(np.testing.assert_array_equal, back, params)


def test_other_version_names_first_mismatching_key(fixtures_dir, sd_case):
    """An SD 2 state_dict with the SD 1 config (and back) fails on its first bad key."""
    _, config, sd, _, _ = sd_case
    _, other_config, _ = load(fixtures_dir, "sd2" if config["case"] == "sd1" else "sd1")
    with pytest.raises(ValueError, match="first mismatching key 'input_blocks"):
        co.from_openai_state_dict(sd, net_of(other_config))


@pytest.fixture(scope="module")
def released(fixtures_dir):
    """unets_json of foreign_sd_released.npz."""
    with np.load(fixtures_dir / "foreign_sd_released.npz") as d:
        return json.loads(str(d["unets_json"]))


@pytest.mark.parametrize("name", ["sd15", "sd21_v"])
def test_released_unets(released, name):
    """Exact key -> shape set and parameter count of SD 1.5 and SD 2.1 (eval_shape only)."""
    ref = released[name]
    shapes = co.reference_shapes(lu.released_unet(name))
    assert shapes == {k: tuple(s) for k, s in ref["keys"]}
    assert sum(int(np.prod(s)) for s in shapes.values()) == ref["num_params"]


def test_released_presets_are_the_yamls(released):
    """SD_UNETS are the yamls' unet_config params; SD 2 base is SD 2.1's network (eps)."""
    for name, kw in lu.SD_UNETS.items():
        ref = released[name]["unet_config_params"]
        got = {k: list(v) if isinstance(v, tuple) else v for k, v in kw.items()}
        assert {k: ref[k] for k in got} == got, name
        assert lu.SD_PREDICTION[name] == released[name]["parameterization"]
    assert released["sd2_base"]["keys"] == released["sd21_v"]["keys"]


def test_bad_context_and_options(sd_case):
    """A context of the wrong width, and unsupported yaml options: one clear error each."""
    arrays, _, _, net, params = sd_case
    x = jnp.zeros((1, 8, 8, 4))
    with pytest.raises(ValueError, match=rf"context must be \[B, S, {net.context_dim}\]"):
        net.apply({"params": params}, x, jnp.zeros((1,)), jnp.zeros((1, 77, 5)))
    with pytest.raises(ValueError, match="legacy=True"):
        lu.ldm_unet(32, 4, 4, 32, (1,), 1, (1, 2), num_heads=4, legacy=True)
    with pytest.raises(ValueError, match="exactly one of num_heads"):
        lu.ldm_unet(32, 4, 4, 32, (1,), 1, (1, 2))
    with pytest.raises(ValueError, match="unknown Stable Diffusion U-Net"):
        lu.released_unet("sd14")


def test_family_checkpoint_errors(sd_case):
    """A tiny SD checkpoint given as SD 1.5 names its first bad key; EMA names are read."""
    _, _, sd, net, params = sd_case
    full = {co.SD_UNET_PREFIX + k: v for k, v in sd.items()}
    with pytest.raises(ValueError, match="sd-1.5 network: first mismatching key 'time_embed"):
        co.convert_checkpoint(full, "sd-1.5")
    with pytest.raises(ValueError, match="unknown network family 'sd-3'"):
        co.convert_checkpoint(full, "sd-3")
    ema = {"model_ema." + f"diffusion_model.{k}".replace(".", ""): v for k, v in sd.items()}
    assert co.sd_ema_state_dict({**full, **ema}, net).keys() == sd.keys()
    with pytest.raises(ValueError, match="no EMA weights"):
        co.sd_ema_state_dict(full, net)
