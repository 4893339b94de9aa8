"""k-diffusion's networks (HDiT, image_v1, image_transformer_v1) against the reference fixtures.

kdiff_*.npz hold k-diffusion 4601bf0 outputs with random weights (fixtures README, section
"k-diffusion models"): inner_out / D / logvar and mid-layer values must agree to 5e-6
relative L2, parameter counts exactly. One compilation per case (module-scoped cache).
"""

import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from edm_jax.nets import convert_kdiff
from edm_jax.nets.kdiff_hdit import downscale_pos
from edm_jax.nets.kdiff_image_v1 import grow_params
from edm_jax.nets.kdiff_layers import make_axial_pos
from edm_jax.nets.kdiff_models import (
    KDiffusionModel,
    from_inference,
    make_model,
    state_dict_prefix,
    to_inference,
)
from edm_jax.nets.kdiff_transformer_v1 import patch, project_params
from edm_jax.nets.model import count_params
from edm_jax.precond import EDMPrecond, make_denoiser

TOL = 5e-6
# Each case compiles once; LLVM's slow optimisations cost 3x the compile time here and do not
# change the maths (edm_jax.train.loop compiles its state initialisation the same way).
FAST_COMPILE = {"xla_backend_optimization_level": 0}


def rel_l2(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def nhwc(a):
    return jnp.asarray(a).transpose(0, 2, 3, 1)


def nchw(a):
    return np.asarray(a).transpose(0, 3, 1, 2)


def jit_forward(model, sigma_data, capture, **static):
    """jit of (params, x, sigma, cond) -> (D, inner_out, logvar or None, intermediates)."""

    def forward(params, x, sigma, cond):
        seen = {}

        def apply_fn(p, x_in, c_noise, **kw):
            out, state = model.apply(
                {"params": p},
                x_in,
                c_noise,
                **kw,
                **static,
                capture_intermediates=lambda m, _: "/".join(m.scope.path) in capture,
                mutable=["intermediates"],
            )
            out, logvar = out if isinstance(out, tuple) else (out, None)
            seen.update(out=out, logvar=logvar, mids=state["intermediates"])
            return out

        D = make_denoiser(apply_fn, EDMPrecond(sigma_data=sigma_data))(params, x, sigma, **cond)
        return D, seen["out"], seen["logvar"], seen["mids"]

    return jax.jit(forward, compiler_options=FAST_COMPILE)


def mid(mids, path):
    node = mids
    for p in path.split("/"):
        node = node[p]
    return np.asarray(node["__call__"][0])


# ---------------------------------------------------------------- HDiT (image_transformer_v2)

HDIT_CASES = ["swin", "natten", "global", "natten_rect", "uncond_global"]
HDIT_MIDS = {  # fixture mid name -> Flax module path whose output it is (depths [2, 1, 1])
    "patch_in": "patch_in",
    "time_emb": "time_in_proj",
    "aug_emb": "aug_in_proj",
    "class_emb": "class_emb",
    "mapping_cond_emb": "mapping_cond_in_proj",
    "cond": "mapping",
    "down0": "down_levels_0_1",
    "merge0": "merges_0",
    "down1": "down_levels_1_0",
    "merge1": "merges_1",
    "mid": "mid_level_0",
    "split1": "splits_1",
    "up1": "up_levels_1_0",
    "split0": "splits_0",
    "up0": "up_levels_0_1",
    "out_norm": "out_norm",
}
HDIT_MIDS_B0 = {
    "down_levels.0.0.self_attn": "down_levels_0_0/self_attn",
    "down_levels.0.1.self_attn": "down_levels_0_1/self_attn",
    "mid_level.0.self_attn": "mid_level_0/self_attn",
}


@pytest.fixture(scope="module")
def hdit(fixtures_dir):
    data = np.load(fixtures_dir / "kdiff_hdit.npz")
    config = json.loads(str(data["config_json"]))
    sd = {k[len("param/") :]: data[k] for k in data.files if k.startswith("param/")}

    @functools.cache
    def case(name):
        c = config["cases"][name]
        model = make_model(c["config"])
        params = convert_kdiff.from_state_dict({k: sd[k] for k, *_ in c["state_dict"]}, model)
        pre = f"case/{name}/"
        cond = {"aug_cond": data[pre + "aug_cond"]}
        if pre + "class_cond" in data.files:
            cond["class_cond"] = data[pre + "class_cond"].astype(np.int32)
        if pre + "mapping_cond" in data.files:
            cond["mapping_cond"] = data[pre + "mapping_cond"]
        capture = set(HDIT_MIDS.values()) | set(HDIT_MIDS_B0.values())
        fwd = jit_forward(model, c["config"]["model"]["sigma_data"], capture)
        out = fwd(params, nhwc(data[pre + "x"]), data[pre + "sigma"], cond)
        return c, model, params, out

    return data, config, sd, case


@pytest.mark.parametrize("name", HDIT_CASES)
def test_hdit_matches_reference(hdit, name):
    data, _, _, case = hdit
    c, model, params, (D, inner_out, _, mids) = case(name)
    pre = f"case/{name}/"
    assert count_params(params) == c["num_params"]
    assert rel_l2(nchw(inner_out), data[pre + "inner_out"]) < TOL
    assert rel_l2(nchw(D), data[pre + "D"]) < TOL
    for key, path in HDIT_MIDS.items():
        if pre + "mid/" + key in data.files:
            got = mid(mids, path)
            got = got[:2] if got.ndim == 4 else got
            assert rel_l2(got, data[pre + "mid/" + key]) < TOL, key
    for key, path in HDIT_MIDS_B0.items():
        if pre + "mid_b0/" + key in data.files:
            assert rel_l2(mid(mids, path)[:1], data[pre + "mid_b0/" + key]) < TOL, key


@pytest.mark.parametrize("name", ["natten", "natten_rect"])
def test_hdit_positions(hdit, name):
    data = hdit[0]
    pre = f"case/{name}/mid/"
    pos = make_axial_pos(*data[pre + "pos0"].shape[:2])
    for i in range(3):
        np.testing.assert_allclose(pos, data[pre + f"pos{i}"], rtol=0, atol=1e-7)
        pos = downscale_pos(pos)


def test_hdit_state_dict_round_trip(hdit):
    _, config, sd, case = hdit
    c, model, params, _ = case("swin")
    back = convert_kdiff.to_state_dict(params, model)
    assert sorted(back) == sorted(k for k, *_ in c["state_dict"])
    for k, v in back.items():
        np.testing.assert_allclose(v, sd[k], rtol=1e-6, atol=1e-7, err_msg=k)


def test_hdit_converter_names_the_bad_key(hdit):
    _, config, sd, case = hdit
    c, model, _, _ = case("swin")
    bad = dict(sd)
    del bad["mid_level.0.ff.up_proj.weight"]
    bad["merges.0.proj.weight"] = sd["merges.0.proj.weight"][:, :-1]
    with pytest.raises(
        ValueError, match=r"missing: mid_level\.0\.ff\.up_proj\.weight.*merges\.0\.proj\.weight"
    ):
        convert_kdiff.from_state_dict(bad, model)


def test_hdit_bad_attention_type_is_one_clear_error(hdit):
    config = json.loads(json.dumps(hdit[1]["cases"]["swin"]["config"]))
    config["model"]["self_attns"][0]["type"] = "neighbourhood"
    with pytest.raises(
        ValueError,
        match=r"unknown self-attention type 'neighbourhood' \(did you mean 'neighborhood'\?\)",
    ):
        make_model(config)


def test_unknown_model_type_is_one_clear_error(hdit):
    config = json.loads(json.dumps(hdit[1]["cases"]["swin"]["config"]))
    config["model"]["type"] = "image_transformer_v3"
    with pytest.raises(
        ValueError, match=r"unknown k-diffusion model type 'image_transformer_v3'.*valid"
    ):
        make_model(config)


# ---------------------------------------------------------------- image_v1

V1_CASES = ["s0_p1", "s1_p1", "s0_p2", "s1_p2"]


@pytest.fixture(scope="module")
def image_v1(fixtures_dir):
    data = np.load(fixtures_dir / "kdiff_image_v1.npz")
    config = json.loads(str(data["config_json"]))
    sd = {k[len("param/") :]: data[k] for k in data.files if k.startswith("param/")}

    @functools.cache
    def case(name):
        c = config["cases"][name]
        model = make_model(c["config"])
        pre = f"case/{name}/"
        own = set(c["own_params"])
        csd = {k: data[pre + "param/" + k] if k in own else sd[k] for k, *_ in c["state_dict"]}
        params = convert_kdiff.from_state_dict(csd, model, prefix="inner_model.")
        n = len(c["config"]["model"]["depths"])
        capture = {"mapping", "proj_in", "proj_out"}
        capture |= {f"u_net/d_blocks_{i}" for i in range(n)} | {
            f"u_net/u_blocks_{j}" for j in range(n)
        }
        fwd = jit_forward(model, c["config"]["model"]["sigma_data"], capture, return_variance=True)
        cond = {k: data[pre + k] for k in ("aug_cond", "mapping_cond")}
        inputs = (nhwc(data[pre + "x"]), data[pre + "sigma"], cond)
        return c, model, params, fwd, inputs, csd

    return data, config, case


@pytest.mark.parametrize("name", V1_CASES)
def test_image_v1_matches_reference(image_v1, name):
    data, _, case = image_v1
    c, model, params, fwd, inputs, _ = case(name)
    D, inner_out, logvar, mids = fwd(params, *inputs)
    pre = f"case/{name}/"
    assert count_params(params) == c["num_params"]
    assert rel_l2(nchw(inner_out), data[pre + "inner_out"]) < TOL
    assert rel_l2(logvar, data[pre + "logvar"]) < TOL
    assert rel_l2(nchw(D), data[pre + "D"]) < TOL
    assert rel_l2(mid(mids, "mapping"), data[pre + "mid/mapping_out"]) < TOL
    for key, path in [("proj_in_out", "proj_in"), ("proj_out_out", "proj_out")]:
        assert rel_l2(nchw(mid(mids, path)), data[pre + "mid/" + key]) < TOL, key
    executed = c["executed_d_blocks"]
    for i in executed:
        got = nchw(mid(mids, f"u_net/d_blocks_{i}"))
        assert rel_l2(got, data[pre + f"mid/d_block{i}_out"]) < TOL, i
    for j in range(len(executed)):
        got = nchw(mid(mids, f"u_net/u_blocks_{j}"))
        assert rel_l2(got, data[pre + f"mid/u_blocks.{j}_out"]) < TOL, j


def test_image_v1_state_dict_round_trip(image_v1):
    _, _, case = image_v1
    c, model, params, _, _, csd = case("s1_p2")
    back = convert_kdiff.to_state_dict(params, model, prefix="inner_model.")
    assert sorted(back) == sorted(csd)  # unused levels (< skip_stages) kept, buffers written
    for k, v in back.items():
        np.testing.assert_array_equal(v, csd[k], err_msg=k)


@pytest.mark.parametrize("step", [0, 1, 2])
def test_image_v1_growth(image_v1, step):
    data, config, case = image_v1
    g = config["growth"][step]
    src, dst = case(g["src"]), case(g["dst"])
    grown = grow_params(src[2], dst[1], jax.random.key(step))
    sd = convert_kdiff.to_state_dict(grown, dst[1], prefix="inner_model.")
    assert sorted(sd) == sorted(dst[5])  # the destination's keys, resampler buffers added
    init = f"grow/{step}/init/"
    for k in g["added_keys"]:
        np.testing.assert_array_equal(sd[k], data[init + k])
    src_sd = convert_kdiff.to_state_dict(src[2], src[1], prefix="inner_model.")
    for k, v in sd.items():
        if k in g["reinitialised_keys"]:
            assert v.shape == data[init + k].shape, k
            continue
        if k not in g["added_keys"]:
            np.testing.assert_array_equal(v, src_sd[k], err_msg=k)
    w = sd["inner_model.proj_in.weight"]
    bound = 1 / np.sqrt(np.prod(w.shape[1:]))  # torch Conv2d default init
    assert np.abs(w).max() <= bound and np.abs(w).std() > bound / 4
    assert not sd["inner_model.proj_out.weight"].any() and not sd["inner_model.proj_out.bias"].any()
    D, inner_out, logvar, _ = dst[3](grown, *dst[4])
    x, sigma = dst[4][0], dst[4][1]
    assert not np.asarray(inner_out).any() and not np.asarray(logvar).any()
    c_skip = 0.25 / (sigma**2 + 0.25)
    np.testing.assert_allclose(
        np.asarray(D), c_skip[:, None, None, None] * np.asarray(x), rtol=1e-6
    )


# ---------------------------------------------------------------- image_transformer_v1


@pytest.fixture(scope="module")
def transformer_v1(fixtures_dir):
    data = np.load(fixtures_dir / "kdiff_transformer_v1.npz")
    config = json.loads(str(data["config_json"]))
    sd = {k[len("param/") :]: data[k] for k in data.files if k.startswith("param/")}
    model = make_model(config["config"])
    params = convert_kdiff.from_state_dict(sd, model)
    capture = {"in_proj", "mapping", "out_norm", "time_in_proj", "aug_in_proj", "class_emb"}
    capture |= {f"blocks_{i}" for i in range(config["config"]["model"]["depth"])}
    fwd = jit_forward(model, config["config"]["model"]["sigma_data"], capture)
    return data, config, sd, model, params, fwd


@pytest.mark.parametrize("name", ["square", "rect"])
def test_transformer_v1_matches_reference(transformer_v1, name):
    data, config, _, model, params, fwd = transformer_v1
    pre = f"case/{name}/"
    cond = {
        "aug_cond": data[pre + "aug_cond"],
        "class_cond": data[pre + "class_cond"].astype(np.int32),
    }
    D, inner_out, _, mids = fwd(params, nhwc(data[pre + "x"]), data[pre + "sigma"], cond)
    assert count_params(params) == config["num_params"]
    assert rel_l2(nchw(inner_out), data[pre + "inner_out"]) < TOL
    assert rel_l2(nchw(D), data[pre + "D"]) < TOL
    ph, pw = config["config"]["model"]["patch_size"]
    patches = patch(nhwc(data[pre + "inner_in"]), ph, pw)
    np.testing.assert_array_equal(np.asarray(patches), data[pre + "mid/patches"])
    h, w = data[pre + "x"].shape[2] // ph, data[pre + "x"].shape[3] // pw
    np.testing.assert_allclose(
        make_axial_pos(h, w, ph / pw).reshape(-1, 2), data[pre + "mid/pos"], atol=1e-7
    )
    mapping_in = sum(mid(mids, k) for k in ("time_in_proj", "aug_in_proj", "class_emb"))
    assert rel_l2(mapping_in, data[pre + "mid/mapping_in"]) < TOL
    for key, path in [("in_proj", "in_proj"), ("cond", "mapping"), ("out_norm", "out_norm")]:
        assert rel_l2(mid(mids, path), data[pre + "mid/" + key]) < TOL, key
    for i in range(config["config"]["model"]["depth"]):
        assert rel_l2(mid(mids, f"blocks_{i}"), data[pre + f"mid/block{i}"]) < TOL, i


def test_transformer_v1_qk_scale_clamp(transformer_v1):
    data, _, sd, model, params, _ = transformer_v1
    assert sd["blocks.0.self_attn.qk_norm.scale"][0] > np.log(100)  # the fixture exceeds the clamp
    projected = convert_kdiff.to_state_dict(project_params(params), model)
    for k in sd:
        want = (
            data["param_after_forward/" + k] if "param_after_forward/" + k in data.files else sd[k]
        )
        np.testing.assert_allclose(projected[k], want, rtol=1e-7, err_msg=k)


# ---------------------------------------------------------------- shipped configs (no compute)


SHIPPED = [
    "config_32x32_small.json",
    "config_32x32_small_butterflies.json",
    "config_cifar10.json",
    "config_cifar10_transformer.json",
    "config_mnist.json",
    "config_mnist_transformer.json",
    "config_oxford_flowers.json",
    "config_oxford_flowers_shifted_window.json",
]
EDGE_CASES = ["v2_minimal", "v2_float_dropout", "v1_transformer_minimal", "image_v1_minimal"]


@pytest.fixture(scope="module")
def kdiff_configs(fixtures_dir):
    return json.loads((fixtures_dir / "kdiff_configs.json").read_text())


@pytest.mark.parametrize("name", SHIPPED + EDGE_CASES)
def test_shipped_config_parameter_counts(kdiff_configs, name):
    entry = kdiff_configs["configs" if name in SHIPPED else "load_config_edge_cases"][name]
    loaded = entry["loaded"]
    model = make_model(loaded)
    template = convert_kdiff.param_template(model)  # jax.eval_shape: nothing runs at full size
    assert count_params(traverse_util.unflatten_dict(template)) == entry["num_params"]
    if "state_dict" not in entry:
        return
    prefix = state_dict_prefix(loaded)
    ours = {
        prefix + convert_kdiff.torch_name(p): convert_kdiff.to_torch_layout(
            p, np.zeros(v.shape, np.int8)
        ).shape
        for p, v in template.items()
    }
    ours.update({prefix + k: v.shape for k, v in model.reference_buffers().items()})
    assert ours == {k: tuple(shape) for k, shape, *_ in entry["state_dict"]}


# ---------------------------------------------------------------- inference .safetensors


def read_safetensors(path):
    """Minimal numpy reader (8-byte header length, JSON header, raw little-endian data)."""
    raw = path.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8 : 8 + n])
    meta = header.pop("__metadata__", {})
    dtypes = {"F16": np.float16, "F32": np.float32}
    tensors = {}
    for k, e in header.items():
        a, b = e["data_offsets"]
        tensors[k] = np.frombuffer(raw[8 + n + a : 8 + n + b], dtypes[e["dtype"]]).reshape(
            e["shape"]
        )
    return tensors, meta


@pytest.mark.parametrize("run", ["hdit", "image_v1"])
def test_inference_safetensors_forward_and_round_trip(fixtures_dir, run):
    tensors, meta = read_safetensors(fixtures_dir / f"kdiff_inference_{run}_tiny.safetensors")
    config, net, params = from_inference(tensors, meta)
    model = KDiffusionModel(net, config)  # the interface edm_jax.sample reads
    ref = np.load(fixtures_dir / "kdiff_checkpoint.npz")
    labels = None
    if run == "hdit":  # one-hot rows; the null class (index num_classes = 2) is an all-zero row
        labels = np.eye(model.label_dim + 1, dtype=np.float32)[ref["hdit/class_cond"]][:, :-1]
        assert ref["hdit/class_cond"].tolist() == [0, 2]
    denoise = jax.jit(model.denoise, compiler_options=FAST_COMPILE)
    D = denoise(params, nhwc(ref[f"{run}/x"]), ref[f"{run}/sigma"], labels)
    assert rel_l2(nchw(D), ref[f"{run}/D"]) < TOL
    back, back_meta = to_inference(params, net, config)
    assert back_meta == meta  # json.dumps(config, indent=4), as convert_for_inference.py
    assert sorted(back) == sorted(tensors)
    for k, v in back.items():
        assert v.dtype == np.float16
        np.testing.assert_array_equal(v, tensors[k], err_msg=k)


# ---------------------------------------------------------------- HDiT gradients (train.py step 0)


def test_hdit_loss_gradients_match_reference(fixtures_dir):
    """d mean(Denoiser.loss)/d params of a tiny HDiT (swin + global) equals torch's, per tensor."""
    data = np.load(fixtures_dir / "kdiff_train_step.npz")
    config = json.loads(str(data["config_json"]))["config"]
    model = make_model(config)
    sd = {k[len("param/") :]: data[k] for k in data.files if k.startswith("param/")}
    params = convert_kdiff.from_state_dict(sd, model)
    sigma_data = config["model"]["sigma_data"]

    def losses(p, reals, noise, sigma, aug_cond, class_cond):  # K.layers.Denoiser.loss, karras
        s = sigma[:, None, None, None]
        c_skip, c_out = (
            sigma_data**2 / (s**2 + sigma_data**2),
            s * sigma_data / jnp.sqrt(s**2 + sigma_data**2),
        )
        noised = reals + noise * s
        out = model.apply(
            {"params": p},
            noised / jnp.sqrt(s**2 + sigma_data**2),
            jnp.log(sigma) / 4,
            aug_cond=aug_cond,
            class_cond=class_cond,
        )
        return jnp.mean((out - (reals - c_skip * noised) / c_out) ** 2, axis=(1, 2, 3))

    args = (
        nhwc(data["step0/reals"]),
        nhwc(data["step0/noise"]),
        data["step0/sigma"],
        data["step0/aug_cond"],
        data["step0/class_cond"].astype(np.int32),
    )
    step = jax.jit(
        jax.value_and_grad(lambda p, *a: losses(p, *a).mean()), compiler_options=FAST_COMPILE
    )
    loss, grads = step(params, *args)
    np.testing.assert_allclose(float(loss), data["step0/losses"].mean(), rtol=1e-6)
    grad_sd = convert_kdiff.to_state_dict(grads, model)
    names = [k[len("step0/grad/") :] for k in data.files if k.startswith("step0/grad/")]
    assert len(names) == config_num_trained(grads)
    for k in names:
        assert rel_l2(grad_sd[k], data["step0/grad/" + k]) < 2e-5, k


def config_num_trained(params) -> int:
    """Number of trained leaves (the Fourier buffers, leaf 'freqs', are not)."""
    return sum(1 for p in traverse_util.flatten_dict(params) if p[-1] != "freqs")


def test_qk_norm_clamp_passes_the_gradient_straight_through():
    """As torch's in-place clamp before the forward: value and gradient are those at ln(100)."""
    from edm_jax.nets.kdiff_transformer_v1 import QK_MAX_SCALE, QKNorm

    x = jax.random.normal(jax.random.key(0), (1, 2, 5, 8))
    norm = QKNorm(2)

    @jax.jit
    def f(s):
        return jnp.sum(norm.apply({"params": {"scale": s}}, x) * x)

    scales = jnp.array([[4.9, 1.0], [QK_MAX_SCALE, 1.0]])
    (v_above, v_at), (g_above, g_at) = jax.jit(jax.vmap(jax.value_and_grad(f)))(scales)
    np.testing.assert_allclose(v_above, v_at, rtol=1e-6)
    np.testing.assert_allclose(g_above, g_at, rtol=1e-6)
    assert abs(float(g_above[0])) > 0  # not stuck at zero gradient above the clamp
