"""Samplers describe themselves (SAMPLER_INFO) and take k-diffusion's calling conventions."""

import inspect
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from edm_jax import analytic, samplers, schedules

DENOISE = analytic.gaussian_denoiser(0.3, 0.5)
SIGMAS = schedules.karras(5, 0.01, 10.0)
X = 10.0 * jax.random.normal(jax.random.key(0), (3, 2))
_CONVENTIONS = {"rng", "noise_sampler", "return_trajectory", "return_info", "extra_args",
                "callback", "disable"}  # fmt: skip


@pytest.mark.parametrize("name", sorted(samplers.SAMPLER_INFO))
def test_registry_entry_matches_the_function(name):
    info = samplers.SAMPLER_INFO[name]
    params = inspect.signature(info.fn).parameters
    options = {k: p.default for k, p in params.items() if p.kind is p.KEYWORD_ONLY}
    assert {k: v for k, v in options.items() if k not in _CONVENTIONS} == info.options
    assert {"extra_args", "callback", "disable"} <= set(options)
    positional = [k for k, p in params.items() if p.kind is p.POSITIONAL_OR_KEYWORD]
    expect = {"grid": ["denoise", "x", "sigmas"], "range": ["denoise", "x", "sigma_min",
              "sigma_max"] + (["n"] if info.takes_n else [])}[info.takes]  # fmt: skip
    assert positional == expect


def test_noise_metadata():
    stochastic = {n for n, i in samplers.SAMPLER_INFO.items() if i.stochastic}
    assert stochastic == {"euler_ancestral", "dpm_2_ancestral", "dpmpp_2s_ancestral",
                          "dpmpp_sde", "dpmpp_2m_sde", "dpmpp_3m_sde", "heun_sde"}  # fmt: skip
    info = samplers.SAMPLER_INFO
    assert not info["euler_ancestral"].adds_noise({"eta": 0.0})
    assert info["euler"].adds_noise({"s_churn": 1.0}) and not info["euler"].adds_noise({})
    assert info["dpm_fast"].adds_noise({"eta": 0.5}) and not info["dpm_adaptive"].adds_noise({})


@pytest.mark.parametrize(
    "name,deterministic",
    [("euler_ancestral", "euler"), ("dpm_2_ancestral", "dpm_2"), ("dpmpp_2s_ancestral", None),
     ("dpmpp_sde", None)],
)  # fmt: skip
def test_eta_zero_needs_no_rng(name, deterministic):
    """eta = 0 removes the noise: no rng needed, same result as with one."""
    out = samplers.SAMPLERS[name](DENOISE, X, SIGMAS, eta=0.0)
    with_rng = samplers.SAMPLERS[name](DENOISE, X, SIGMAS, eta=0.0, rng=jax.random.key(1))
    np.testing.assert_allclose(out, with_rng, rtol=1e-6)
    if deterministic:  # sigma_down = sigma_next: the ancestral sampler is its ODE sampler
        ode = samplers.SAMPLERS[deterministic](DENOISE, X, SIGMAS)
        np.testing.assert_allclose(out, ode, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="adds noise: pass rng"):
        samplers.SAMPLERS[name](DENOISE, X, SIGMAS)


def _model(x, sigma, shift):
    """A k-diffusion-style model taking its conditioning through extra_args."""
    return DENOISE(x, sigma) + shift


@pytest.mark.parametrize(
    "name,opts",
    [("euler", {"s_churn": 2.0, "rng": jax.random.key(2)}), ("dpmpp_2m", {}), ("lms", {})],
)  # fmt: skip
def test_kdiffusion_style_call(name, opts):
    """extra_args reach the model, callback gets k-diffusion's dict per step, disable is taken."""
    seen = []
    fn = samplers.SAMPLERS[name]
    out = fn(_model, X, SIGMAS, extra_args={"shift": 0.1}, callback=seen.append, disable=True,
             **opts)  # fmt: skip
    jax.effects_barrier()
    ref = fn(lambda x, s: _model(x, s, 0.1), X, SIGMAS, **opts)
    np.testing.assert_allclose(out, ref, rtol=1e-6)
    assert [int(d["i"]) for d in seen] == list(range(5))
    for d in seen:
        assert set(d) == {"x", "i", "sigma", "sigma_hat", "denoised"}
        assert float(d["sigma"]) == pytest.approx(float(SIGMAS[int(d["i"])]))
        hat = jnp.full([3], d["sigma_hat"])
        np.testing.assert_allclose(d["denoised"], _model(d["x"], hat, 0.1), rtol=1e-5, atol=1e-6)
    if "s_churn" in opts:  # churn raises sigma_hat above sigma
        assert float(seen[0]["sigma_hat"]) > float(seen[0]["sigma"])


@pytest.mark.parametrize("name", ["dpm_fast", "dpm_adaptive"])
def test_range_samplers_callback(name):
    seen = []
    args = (0.01, 10.0, 6) if samplers.SAMPLER_INFO[name].takes_n else (0.01, 10.0)
    samplers.SAMPLERS[name](_model, X, *args, extra_args={"shift": 0.0}, callback=seen.append,
                            disable=False)  # fmt: skip
    jax.effects_barrier()
    assert seen and {"x", "i", "sigma", "sigma_hat", "denoised"} <= set(seen[0])
    np.testing.assert_allclose(seen[0]["sigma"], 10.0, rtol=1e-5)
    hat = jnp.full([3], seen[0]["sigma"])
    np.testing.assert_allclose(seen[0]["denoised"], DENOISE(X, hat), rtol=1e-4, atol=1e-5)


def test_no_callback_no_host_call():
    """Without callback the compiled sampler holds no host callback."""
    without = jax.make_jaxpr(lambda x: samplers.sample_heun(DENOISE, x, SIGMAS))(X)
    withcb = jax.make_jaxpr(
        lambda x: samplers.sample_heun(DENOISE, x, SIGMAS, callback=lambda d: None)
    )(X)
    assert "callback" not in str(without) and "callback" in str(withcb)


def test_bad_extra_args():
    with pytest.raises(ValueError, match="extra_args must be a dict"):
        samplers.sample_euler(DENOISE, X, SIGMAS, extra_args=[1])


def test_declared_signature_lists_the_options():
    """help()/inspect see each declared sampler's options with their defaults."""
    params = inspect.signature(samplers.sample_euler).parameters
    assert list(params) == ["denoise", "x", "sigmas", "rng", "noise_sampler", "s_churn", "s_tmin",
                            "s_tmax", "s_noise", "return_trajectory", "extra_args", "callback",
                            "disable"]  # fmt: skip
    assert params["s_churn"].default == 0.0 and params["s_tmax"].default == float("inf")
    assert inspect.signature(samplers.sample_heun_sde).parameters["s_churn"].default == 40.0
    assert samplers.sample_dpmpp_sde.__name__ == "sample_dpmpp_sde"
    assert "r=0.5" in samplers.sample_dpmpp_sde.__doc__
    info = samplers.SAMPLER_INFO["lms"]  # the registry holds the declaration's own options
    assert info.options is samplers.declaration_of(samplers.sample_lms).options


@pytest.mark.parametrize("name,bad", [("euler", "eta"), ("dpmpp_2m", "order"), ("lms", "s_churn")])
def test_unknown_option_is_a_type_error_naming_the_valid_ones(name, bad):
    fn = samplers.SAMPLERS[name]
    valid = sorted(samplers.SAMPLER_INFO[name].options)
    with pytest.raises(TypeError, match=rf"sample_{name}\(\) got an unexpected keyword argument "
                       rf"'{bad}'; valid options: {re.escape(str(valid))}"):  # fmt: skip
        fn(DENOISE, X, SIGMAS, **{bad: 1.0})
    with pytest.raises(TypeError, match=r"argument 's_chrun' \(did you mean 's_churn'\?\)"):
        samplers.sample_heun(DENOISE, X, SIGMAS, s_chrun=1.0)


def test_option_checks_come_before_compute():
    """lms order and unipc order are checked (one line) before the grid is even looked at."""
    with pytest.raises(ValueError, match="lms order must be an int >= 1, got 0"):
        samplers.sample_lms(DENOISE, X, "not a grid", order=0)
    with pytest.raises(ValueError, match="unipc order must be 1, 2, 3 or 4, got 5"):
        samplers.sample_unipc(DENOISE, X, "not a grid", order=5)
