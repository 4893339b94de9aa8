"""EDM2 edm_sampler with autoguidance / CFG / churn vs NVlabs/edm2 (edm2_guidance.npz)."""

import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from edm_jax.guidance import autoguidance, cfg_guide, check_guide
from edm_jax.nets.convert import from_state_dict, model_from_reference_config
from edm_jax.samplers.edm2 import edm2_time_steps, sample_edm2


def rel(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def nhwc(a):
    return np.asarray(a).transpose(0, 2, 3, 1)


@pytest.fixture(scope="module")
def ref(fixtures_dir):
    """Fixture data and (model, params) of the main, guide and uncond_guide nets."""
    d = dict(np.load(fixtures_dir / "edm2_guidance.npz"))
    config = json.loads(str(d["config_json"]))
    nets = {}
    for name, spec in config["nets"].items():
        model = model_from_reference_config({"precond": "Precond", **spec["config"]})
        sd = {k[len(name) + 7 :]: v for k, v in d.items() if k.startswith(f"{name}/param/")}
        nets[name] = model, from_state_dict(sd, model)
    return d, config, nets


@functools.partial(jax.jit, static_argnums=(0, 1))
def _run(main, guide, pm, pg, noise, labels, scale, s_tmin, randn, t_steps):
    """EDM2 sampler guided by `guide` with a traced scale; churn where s_tmin <= t <= 50."""

    def D(model, params):
        return lambda x, t: model.denoise(params, x, t, labels=labels)

    def noise_sampler(t_cur, t_next):  # the recorded randn_like draws of the churned steps
        k = jnp.sum(t_steps[:-1] > t_cur) - jnp.sum(t_steps[:-1] > 50.0)  # churned steps before
        return randn[jnp.clip(k, 0, randn.shape[0] - 1)]

    denoise = autoguidance(D(main, pm), D(guide, pg), scale)
    return sample_edm2(
        denoise, noise * t_steps[0], t_steps, noise_sampler=noise_sampler, s_churn=2.0,
        s_tmin=s_tmin, s_tmax=50.0, s_noise=1.007,
    )  # fmt: skip


CASES = {  # case -> (guide net, scale, churn from s_tmin); churn is off with s_tmin = inf
    "noguide": ("guide", 1.0, np.inf),
    "auto_1.4": ("guide", 1.4, np.inf),
    "auto_2.0": ("guide", 2.0, np.inf),
    "auto_2.0_churn": ("guide", 2.0, 0.05),
    "cfg_1.4": ("uncond_guide", 1.4, np.inf),
}


@pytest.fixture(scope="module")
def errors(ref) -> dict:
    """Relative error of every sampler case vs the reference output (one run per guide net)."""
    d, _, nets = ref
    randn = d["auto_2.0_churn/randn"].transpose(0, 1, 3, 4, 2)  # [5, B, H, W, C]
    t = jnp.asarray(d["t_steps_float32"])
    out = {}
    for case, (guide, scale, s_tmin) in CASES.items():  # compiled once per guide network
        (main, pm), (gm, pg) = nets["main"], nets[guide]
        args = (jnp.float32(scale), jnp.float32(s_tmin), randn, t)
        res = _run(main, gm, pm, pg, nhwc(d["noise"]), d["class_labels"], *args)
        out[case] = rel(np.asarray(res).transpose(0, 3, 1, 2), d[f"{case}/out"])
    return out


def test_time_steps_are_edm2s_float32_discretisation(ref, x64):
    d = ref[0]
    np.testing.assert_array_equal(edm2_time_steps(8, dtype=np.float32), d["t_steps_float32"])
    assert edm2_time_steps(8, dtype=np.float32)[0] == np.float32(79.999985)
    np.testing.assert_allclose(
        edm2_time_steps(8, dtype=np.float64), d["t_steps_float64"], rtol=1e-15
    )


@pytest.mark.parametrize("case", sorted(CASES))
def test_guided_sampler_matches_reference(errors, case):
    """Autoguidance, CFG with an unconditional net, churn with the recorded draws."""
    assert errors[case] < 1e-5, errors


def _toy(c):
    return lambda x, sigma: x * c


def test_guide_is_not_called_at_scale_one_and_interval_limits_guidance():
    calls = []

    def guide(x, sigma):
        calls.append(1)
        return x * 0.5

    assert autoguidance(_toy(1.0), guide, 1.0) is not None and not calls
    x, s = jnp.ones((2, 1, 1, 1)), jnp.asarray([0.5, 5.0])
    out = autoguidance(_toy(1.0), _toy(0.5), 3.0, interval=(1.0, 10.0))(x, s)
    np.testing.assert_allclose(out[:, 0, 0, 0], [1.0, 0.5 + 3.0 * 0.5])
    out = cfg_guide(_toy(1.0), _toy(0.5), 3.0, interval=(0.0, 1.0))(x, s)
    np.testing.assert_allclose(out[:, 0, 0, 0], [2.0, 1.0])
    with pytest.raises(ValueError, match="guidance interval"):
        autoguidance(_toy(1.0), _toy(0.5), 2.0, interval=(5.0, 1.0))


def test_float64_sampler_path(x64):
    x = jnp.ones((1, 2, 2, 1), jnp.float64) * 80
    out = sample_edm2(lambda x, t: x * 0.0 + 0.25, x, edm2_time_steps(4, dtype=np.float64))
    assert out.dtype == jnp.float64
    np.testing.assert_allclose(out, 0.25, rtol=1e-12)  # constant D: Euler lands on it


def test_guide_of_another_geometry_or_label_count_is_refused(ref):
    _, _, nets = ref
    main, guide, uncond = nets["main"][0], nets["guide"][0], nets["uncond_guide"][0]
    check_guide(main, guide)
    check_guide(main, uncond, conditional_guide=False)
    with pytest.raises(ValueError, match="guide label_dim 0 != main model's 10"):
        check_guide(main, uncond)
    other = model_from_reference_config(
        {"precond": "Precond", "img_resolution": 8, "img_channels": 4, "label_dim": 10,
         "model_channels": 16, "channel_mult": [1, 2], "attn_resolutions": []}
    )  # fmt: skip
    with pytest.raises(ValueError, match="guide img_resolution 8 != main model's 16"):
        check_guide(main, other)
