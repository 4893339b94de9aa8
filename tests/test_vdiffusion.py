"""v-diffusion networks against v-diffusion-pytorch (foreign_vd_*.npz) and sampling them.

Parity: the scaled reference copies (cc12m_1 with its CLIP mapping and modulated blocks,
wikiart_256) converted from their state_dicts reproduce ``out``, the Fourier features, the
mapping output and k-diffusion's ``VDenoiser`` output at 5e-5 maxrel (fixtures README
"v-diffusion"). Every released model's parameter count and key->shape set are checked by
``jax.eval_shape`` only.
"""

import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import edm_jax
from edm_jax.guidance import ClassifierGuidedModel
from edm_jax.nets import vdiffusion as vd
from edm_jax.wrappers import VDenoiser, atan_sigma_to_t

TOL = 5e-5  # fixtures README: v-diffusion outputs
# The scaled copies' constructor edits (config_json.scaled_copy_edits) as network fields.
CASES = {
    "cc12m": dict(
        vd.VD_PRESETS["cc12m_1"].net,
        channels=(4, 8, 8, 16, 16, 32, 32), mapping_width=64, head_channels=8,
    ),
    "wikiart": dict(
        vd.VD_PRESETS["wikiart_256"].net, channels=(4, 8, 16, 16, 32, 32, 32), head_channels=16
    ),
}  # fmt: skip
BATCH = 4  # out (3 rows, padded) and den_out (4 rows) share one compiled program


def maxrel(a, ref) -> float:
    return float(np.max(np.abs(np.asarray(a, np.float64) - ref)) / np.max(np.abs(ref)))


def nhwc(a: np.ndarray) -> jax.Array:
    return jnp.asarray(a.transpose(0, 2, 3, 1))


def _pad(a: np.ndarray) -> np.ndarray:
    return np.concatenate([a, a[-1:].repeat(BATCH - len(a), 0)])


@pytest.fixture(scope="module", params=sorted(CASES))
def case(request, fixtures_dir):
    """(fixture arrays, net, params, compiled forward) of one scaled reference model."""
    z = dict(np.load(fixtures_dir / f"foreign_vd_{request.param}.npz"))
    net = vd.VDiffusionUNet(**CASES[request.param])
    state_dict = {k[len("param/") :]: v for k, v in z.items() if k.startswith("param/")}
    params = vd.from_vd_state_dict(state_dict, net)
    clip = jnp.zeros((BATCH, 512)) if net.mapping_width else None

    def forward(params, x, t, clip):
        return net.apply({"params": params}, x, t, clip, mutable=["intermediates"])

    x, t = jnp.zeros((BATCH, 128, 128, 3)), jnp.zeros((BATCH,))
    # Optimisation level 0 halves XLA:CPU's compile time of this 140-block net.
    compiled = (
        jax.jit(forward).lower(params, x, t, clip).compile({"xla_backend_optimization_level": 0})
    )
    return request.param, z, net, params, state_dict, compiled


def test_forward_matches_reference(case):
    name, z, net, params, _, compiled = case
    clip = jnp.asarray(_pad(z["clip_embed"])) if net.mapping_width else None
    out, inter = compiled(params, nhwc(_pad(z["x"])), jnp.asarray(_pad(z["t"])), clip)
    inter = inter["intermediates"]
    assert maxrel(np.asarray(out)[:3].transpose(0, 3, 1, 2), z["out"]) < TOL
    assert maxrel(inter["timestep_features"][0][:3], z["timestep_features"]) < TOL
    if name == "cc12m":  # the Modulation2d input; row 1 is a zero CLIP embedding (cfg)
        assert np.all(z["clip_embed"][1] == 0)
        assert maxrel(inter["mapping_cond"][0][:3], z["mapping_cond"]) < TOL
    else:
        assert maxrel(net.timestep_input_of(z["t"]), z["log_snr"]) < TOL


def test_vdenoiser_matches_k_diffusion(case):
    name, z, net, params, _, compiled = case
    seen_t = []

    def model(x_in, t, clip_embed=None):
        seen_t.append(np.asarray(t))
        return compiled(params, x_in, t, clip_embed)[0]

    cond = {"clip_embed": jnp.asarray(z["den_clip_embed"])} if name == "cc12m" else {}
    D = VDenoiser(model)(nhwc(z["den_x"]), jnp.asarray(z["den_sigma"]), **cond)
    assert maxrel(seen_t[0], z["den_t"]) < 2e-5
    assert maxrel(np.asarray(D).transpose(0, 3, 1, 2), z["den_out"]) < TOL
    np.testing.assert_allclose(atan_sigma_to_t(z["den_sigma"]), z["den_t"], rtol=2e-6)


def test_state_dict_round_trip(case):
    _, _, _, params, state_dict, _ = case
    back = vd.to_vd_state_dict(params)
    assert sorted(back) == sorted(state_dict)
    for k, v in state_dict.items():
        np.testing.assert_array_equal(back[k], v, err_msg=k)


def test_other_models_state_dict_is_refused(case, fixtures_dir):
    name, _, net, _, state_dict, _ = case
    other = "wikiart" if name == "cc12m" else "cc12m"
    z = np.load(fixtures_dir / f"foreign_vd_{other}.npz")
    foreign = {k[len("param/") :]: z[k] for k in z.files if k.startswith("param/")}
    with pytest.raises(ValueError, match="missing 'mapping_timestep_embed.weight'|unexpected"):
        vd.from_vd_state_dict(foreign, net)
    bad = dict(state_dict, **{"net.0.main.0.bias": np.zeros(5, np.float32)})
    with pytest.raises(ValueError, match=r"net.0.main.0.bias: shape \(5,\)"):
        vd.from_vd_state_dict(bad, net)


def test_released_models_parameter_counts_and_keys(fixtures_dir):
    z = np.load(fixtures_dir / "foreign_vd_released.npz")
    models = json.loads(str(z["models_json"]))
    assert sorted(models) == sorted(vd.VD_PRESETS)
    assert vd.VD_PRESETS["cc12m_1_cfg"] == vd.VD_PRESETS["cc12m_1"]  # same network
    for name in sorted(set(vd.VD_PRESETS) - {"cc12m_1_cfg"}):
        ref, preset = models[name], vd.VD_PRESETS[name]
        shapes = vd.torch_shapes(vd.build_vd_net(name))
        assert shapes == {k: tuple(s) for k, s in ref["keys"]}, name
        assert sum(int(np.prod(s)) for s in shapes.values()) == ref["num_params"], name
        assert len(shapes) == ref["num_tensors"]
        assert (preset.size, preset.size) == tuple(ref["shape"][1:]), name
        assert preset.t_range == (ref["min_t"], ref["max_t"]), name
        assert preset.clip_model == ref["clip_model"], name


def test_unknown_preset_and_missing_clip_embed():
    with pytest.raises(ValueError, match="unknown v-diffusion model 'cc12m'; valid:.*cc12m_1"):
        vd.build_vd_net("cc12m")
    net = vd.VDiffusionUNet(channels=(4,), num_blocks=1, mapping_width=8)
    with pytest.raises(ValueError, match="clip_embed"):
        vd.vd_sampling_model(net, 8)
    with pytest.raises(ValueError, match="unknown upsample_mode 'linear'"):
        vd.VDiffusionUNet(channels=(4,), num_blocks=1, upsample_mode="linear")


def test_bilinear_upsampling_is_torchs():
    """align_corners=False: source index (i + 0.5) / 2 - 0.5, clamped at 0 (torch)."""

    def ref_axis(a, axis):
        n = a.shape[axis]
        src = np.clip((np.arange(2 * n) + 0.5) / 2 - 0.5, 0, None)
        lo = np.floor(src).astype(int)
        hi, w = np.minimum(lo + 1, n - 1), src - lo
        shape = [1] * a.ndim
        shape[axis] = 2 * n
        w = w.reshape(shape)
        return np.take(a, lo, axis) * (1 - w) + np.take(a, hi, axis) * w

    for shape in [(1, 3, 5, 2), (2, 1, 2, 1)]:  # 1x1 -> 2x2 at the deepest level of 64x64 inputs
        x = np.random.default_rng(0).normal(size=shape).astype(np.float32)
        ref = ref_axis(ref_axis(x.astype(np.float64), 1), 2)
        np.testing.assert_allclose(vd.upsample_bilinear(jnp.asarray(x)), ref, rtol=1e-6, atol=1e-6)


# --------------------------------------------------------------------------- sampling end to end

# Attention is left out here (the parity tests cover it): each copy of it in a sampler program
# costs ~1 s of XLA:CPU compile time.
TINY = dict(channels=(4, 8), num_blocks=1, mapping_width=16)
RNG = jax.random.key(7)


def random_state_dict(net: vd.VDiffusionUNet, seed: int) -> dict[str, np.ndarray]:
    """Random torch-layout weights (N(0, 1/fan_in), biases 0.1 N) drawn with numpy: cheaper
    than compiling jax.random for every parameter shape, and it exercises the converter."""
    rng = np.random.default_rng(seed)
    return {
        k: (
            rng.normal(size=s) / np.sqrt(np.prod(s[1:])) if len(s) > 1 else 0.1 * rng.normal(size=s)
        ).astype(np.float32)
        for k, s in vd.torch_shapes(net).items()
    }


@pytest.fixture(scope="module")
def tiny():
    """A random-weight cc12m_1-like model (CLIP mapping, modulated blocks, 2 levels) at 8x8."""
    net = vd.VDiffusionUNet(**TINY)
    clip = np.random.default_rng(1).normal(size=(1, 512))
    params = vd.from_vd_state_dict(random_state_dict(net, 0), net)
    return vd.vd_sampling_model(net, 8, clip_embed=clip), params


@pytest.mark.parametrize("sampler", ["heun", "dpmpp_2m"])
def test_tiny_model_samples(tiny, sampler):
    model, params = tiny
    out = edm_jax.sample(RNG, params, model, seeds=[0, 1], sampler=sampler, num_steps=4)
    assert out.shape == (2, 8, 8, 3) and np.all(np.isfinite(out))
    assert not np.allclose(out[0], out[1])


def test_released_loader_sigma_range():
    """Group B models sample within tan(t pi/2) of their min_t / max_t (0.01 ... 148)."""
    net = vd.build_vd_net("wikiart_128")
    preset = vd.VD_PRESETS["wikiart_128"]
    model = vd.vd_sampling_model(net, preset.size, t_range=preset.t_range)
    np.testing.assert_allclose([model.sigma_min, model.sigma_max], [0.0100005, 148.41], rtol=1e-4)
    assert model.image_shape == (128, 128, 3) and not model.clip_output
    group_a = vd.vd_sampling_model(vd.VDiffusionUNet(channels=(4,), num_blocks=1), 8)
    assert (group_a.sigma_min, group_a.sigma_max) == (0.0, float("inf"))


class TinyClassifier(nn.Module):
    """A noisy-image classifier logits(x_in [B,H,W,3], t [B]) with random weights."""

    num_classes: int = 3

    @nn.compact
    def __call__(self, x: jax.Array, t: jax.Array) -> jax.Array:
        h = nn.Conv(8, (3, 3))(x) + nn.Dense(8)(t[:, None])[:, None, None, :]
        return nn.Dense(self.num_classes)(jnp.tanh(h).mean(axis=(1, 2)))


def test_classifier_guided_sde_sampling_is_batch_invariant_per_seed(tiny):
    """dpmpp_2m_sde with classifier guidance: a seed's image is the same in any batch."""
    model, params = tiny
    clf = TinyClassifier()
    shapes = jax.eval_shape(clf.init, jax.random.key(0), jnp.zeros((1, 8, 8, 3)), jnp.zeros(1))
    rng = np.random.default_rng(3)
    clf_params = jax.tree.map(lambda s: rng.normal(size=s.shape).astype(np.float32), shapes)

    def classifier(x_in, t, p):
        return clf.apply(p, x_in, t)

    guided = ClassifierGuidedModel(model, classifier, 3, 0.5, sigma_to_t=atan_sigma_to_t)
    kw = dict(sampler="dpmpp_2m_sde", num_steps=4, batch_size=3)
    both = (params, clf_params)
    out = edm_jax.sample(RNG, both, guided, seeds=[0, 1, 2], labels=[0, 1, 2], **kw)
    again = edm_jax.sample(RNG, both, guided, seeds=[2, 7, 0, 1], labels=[2, 0, 0, 1], **kw)
    np.testing.assert_allclose(again[[0, 2, 3]], out[[2, 0, 1]], atol=1e-5)
    other_class = edm_jax.sample(RNG, both, guided, seeds=[1], labels=[2], **kw)
    assert np.all(np.isfinite(out)) and not np.allclose(out[0], out[1])
    assert not np.allclose(other_class[0], out[1], atol=1e-3)  # the label steers the sample


def test_cc12m_cfg_combines_v_with_the_zero_embedding(tiny):
    """cfg_sample.py: v = v_0 + w (v_c - v_0); D is affine in v, so D combines the same way."""
    model, params = tiny
    net = vd.VDiffusionUNet(**TINY)
    clip = np.random.default_rng(1).normal(size=(1, 512))
    cfg = vd.vd_sampling_model(net, 8, clip_embed=clip, cfg_scale=3.0)
    uncond = vd.vd_sampling_model(net, 8, clip_embed=np.zeros((1, 512)))
    x = jnp.asarray(np.random.default_rng(2).normal(size=(2, 8, 8, 3)), jnp.float32)
    sigma = jnp.asarray([0.5, 4.0])

    @jax.jit
    def run(p):
        return cfg.denoise(p, x, sigma), model.denoise(p, x, sigma), uncond.denoise(p, x, sigma)

    D, D_c, D_0 = run(params)
    np.testing.assert_allclose(D, D_0 + 3.0 * (D_c - D_0), rtol=1e-4, atol=1e-5)
    assert not np.allclose(D_c, D_0, atol=1e-3)
    with pytest.raises(ValueError, match="cfg_scale 2.0 needs a CLIP-conditioned model"):
        vd.vd_sampling_model(vd.VDiffusionUNet(channels=(4,), num_blocks=1), 8, cfg_scale=2.0)
