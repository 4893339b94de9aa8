"""Inference grids against k-diffusion's outputs and exact maths; training densities by moments."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from edm_jax import schedules as S


def _args(sampler_fixture):
    a = sampler_fixture["schedule_args"]
    return a["n"], a["sigma_min"], a["sigma_max"], a


def _exact(name, n, smin, smax, a):
    """The grids written out with Python floats (float64), independently of edm_jax."""
    ramp = [i / (n - 1) for i in range(n)]
    if name == "karras":
        lo, hi = smin ** (1 / a["rho"]), smax ** (1 / a["rho"])
        out = [(hi + r * (lo - hi)) ** a["rho"] for r in ramp]
    elif name == "exponential":
        out = [math.exp(math.log(smax) + r * (math.log(smin) - math.log(smax))) for r in ramp]
    elif name == "polyexponential":
        p = a["polyexponential_rho"]
        lmin, lmax = math.log(smin), math.log(smax)
        out = [math.exp((1 - r) ** p * (lmax - lmin) + lmin) for r in ramp]
    else:  # vp, k-diffusion defaults
        ts = [1 + r * (1e-3 - 1) for r in ramp]
        out = [math.sqrt(math.exp(19.9 * t * t / 2 + 0.1 * t) - 1) for t in ts]
    return np.array(out + [0.0])


def _ours(name, n, smin, smax, a):
    if name == "karras":
        return S.karras(n, smin, smax, a["rho"])
    if name == "exponential":
        return S.exponential(n, smin, smax)
    if name == "polyexponential":
        return S.polyexponential(n, smin, smax, a["polyexponential_rho"])
    return S.vp(n)


NAMES = ["karras", "exponential", "polyexponential", "vp"]


@pytest.mark.parametrize("name", NAMES)
def test_float64_grid_is_exact(name, sampler_fixture, x64):
    n, smin, smax, a = _args(sampler_fixture)
    ours = np.asarray(_ours(name, n, smin, smax, a))
    assert ours.dtype == np.float64 and ours.shape == (n + 1,) and ours[-1] == 0
    np.testing.assert_allclose(ours, _exact(name, n, smin, smax, a), rtol=1e-8, atol=0)


@pytest.mark.parametrize("name", NAMES)
def test_grid_matches_kdiffusion_fixture(name, sampler_fixture, x64):
    """k-diffusion computed these in torch's default float32, so they carry float32 rounding.

    Float64 agrees to 1e-8 with the float64 value of each float32 reference up to that
    rounding: the residual is bounded by float32 epsilon times the conditioning of the
    formula (vp loses digits to exp(.) - 1 near t = eps_s).
    """
    n, smin, smax, a = _args(sampler_fixture)
    ref = np.asarray(sampler_fixture["schedules"][name])
    ours = np.asarray(_ours(name, n, smin, smax, a))
    exact = _exact(name, n, smin, smax, a)
    # the reference is the float32 evaluation of the exact grid: check we sit on the exact one
    # and the reference is within float32 rounding of it
    np.testing.assert_allclose(ours, exact, rtol=1e-8)
    eps32 = np.finfo(np.float32).eps
    cond = 1.0 if name != "vp" else 1 / (1 - np.exp(-np.maximum(np.log1p(exact[:-1] ** 2), 1e-30)))
    np.testing.assert_array_less(np.abs(ref[:-1] - ours[:-1]) / ours[:-1], 16 * eps32 * cond * 10)
    assert ref[-1] == ours[-1] == 0


@pytest.mark.parametrize("name", NAMES)
def test_float32_grid_matches_fixture(name, sampler_fixture):
    n, smin, smax, a = _args(sampler_fixture)
    ours = np.asarray(_ours(name, n, smin, smax, a))
    assert ours.dtype == np.float32
    rtol = 2e-6 if name != "vp" else 2e-3
    np.testing.assert_allclose(ours, sampler_fixture["schedules"][name], rtol=rtol)


def test_edm_discretizations(x64):
    """EDM Table 1 time steps: ve geometric in sigma^2, vp with derived betas, edm = karras."""
    ve = np.asarray(S.ve(5, 0.02, 100.0))
    np.testing.assert_allclose(
        ve[:-1] ** 2, 100.0**2 * (0.02**2 / 100**2) ** (np.arange(5) / 4), rtol=1e-12
    )
    vp = np.asarray(S.vp(6, sigma_min=0.002, sigma_max=80.0))
    np.testing.assert_allclose([vp[0], vp[-2]], [80.0, 0.002], rtol=1e-10)
    np.testing.assert_allclose(S.edm(7), S.karras(7, 0.002, 80.0, 7.0), rtol=0)
    lin = np.asarray(S.linear(5, 1.0, 5.0))
    np.testing.assert_allclose(lin, [5, 4, 3, 2, 1, 0])


def test_iddpm_u_table_recursion():
    """u_M = 0 and each u_{j-1} solves the defining recursion; u decreases."""
    M, C_1, C_2 = 1000, 0.001, 0.008
    u = S.iddpm_u_table(M, C_1, C_2)
    alpha_bar = lambda j: math.sin(0.5 * math.pi * j / M / (C_2 + 1)) ** 2  # noqa: E731
    assert u.shape == (M + 1,) and u[M] == 0
    for j in (1, 2, 10, 500, 999, 1000):
        ratio = max(alpha_bar(j - 1) / alpha_bar(j), C_1)
        assert math.isclose((u[j - 1] ** 2 + 1) * 1, (u[j] ** 2 + 1) / ratio, rel_tol=1e-12)
    assert np.all(np.diff(u) < 0)
    assert u[0] > 81 and 0.001 < u[M - 1] < 0.01  # the range covers EDM's [0.002, 81]


def test_iddpm_grid_picks_table_entries(x64):
    u = S.iddpm_u_table()
    grid = np.asarray(S.iddpm(8, 0.002, 81.0))
    kept = u[(u >= 0.002) & (u <= 81.0)]
    idx = np.round((len(kept) - 1) / 7 * np.arange(8)).astype(int)
    np.testing.assert_array_equal(grid[:-1], kept[idx])
    assert grid[-1] == 0


def test_grids_jit_with_traced_range():
    f = jax.jit(lambda lo, hi: S.karras(10, lo, hi))
    np.testing.assert_allclose(f(0.1, 10.0), S.karras(10, 0.1, 10.0), rtol=1e-6)
    assert S.karras(1, 0.1, 10.0).tolist() == pytest.approx([10.0, 0.0])


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda: S.karras(0, 0.1, 10), "n"),
        (lambda: S.karras(5, -0.1, 10), "sigma_min"),
        (lambda: S.karras(5, 0.1, 10, rho=0), "rho"),
        (lambda: S.karras(5, 0.1, 10, rho=-1), "rho"),
        (lambda: S.exponential(5, 10, 0.1), "sigma_min"),
        (lambda: S.get_sigmas("cosine", 5), "karras"),
        (lambda: S.sample_sigmas("normal", jax.random.key(0), (3,)), "lognormal"),
        (lambda: S.karras(2.5, 0.1, 10), "n"),
    ],
)
def test_bad_input(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_unknown_names_list_choices():
    with pytest.raises(ValueError) as e:
        S.get_sigmas("nope", 5)
    assert "'nope'" in str(e.value) and "exponential" in str(e.value)


# --------------------------------------------------------------------------- densities

N = 200_000


def _draw(name, **kw):
    return np.asarray(S.sample_sigmas(name, jax.random.key(1), (N,), **kw), np.float64)


def _close(value, expected, scale):
    """Within 5 standard errors of a mean over N samples with spread `scale`."""
    assert abs(value - expected) < 5 * scale / math.sqrt(N), (value, expected)


def test_lognormal_moments():
    ls = np.log(_draw("lognormal", P_mean=-1.2, P_std=1.2))
    _close(ls.mean(), -1.2, 1.2)
    assert abs(ls.std() - 1.2) < 0.01


def test_loglogistic_moments():
    ls = np.log(_draw("loglogistic", loc=0.5, scale=0.7))
    _close(np.median(ls), 0.5, 0.7 * 2)
    assert abs(ls.std() - 0.7 * math.pi / math.sqrt(3)) < 0.02
    tr = _draw("loglogistic", loc=0.0, scale=1.0, min_value=0.1, max_value=2.0)
    assert tr.min() >= 0.1 * (1 - 1e-5) and tr.max() <= 2.0 * (1 + 1e-5)


def test_loguniform_moments():
    ls = np.log(_draw("loguniform", min_value=0.01, max_value=100.0))
    span = math.log(1e4)
    _close(ls.mean(), 0.0, span / math.sqrt(12))
    assert abs(ls.std() - span / math.sqrt(12)) < 0.02


def test_v_diffusion_is_uniform_in_angle():
    s = _draw("v_diffusion", sigma_data=0.5)
    a = np.arctan(s / 0.5) * 2 / math.pi
    _close(a.mean(), 0.5, 1 / math.sqrt(12))
    assert abs(a.var() - 1 / 12) < 0.002


def test_split_lognormal_moments():
    ls = np.log(_draw("split_lognormal", loc=0.3, scale_1=0.5, scale_2=1.5))
    assert abs(np.mean(ls < 0.3) - 0.25) < 0.005
    _close(ls[ls < 0.3].mean(), 0.3 - 0.5 * math.sqrt(2 / math.pi), 0.5)
    _close(ls[ls >= 0.3].mean(), 0.3 + 1.5 * math.sqrt(2 / math.pi), 1.5 * 2)


def test_cosine_interpolated_unshifted_is_uniform_angle():
    """With image_d = noise_d the log-SNR is cosine: atan(sigma/sd) uniform on its range."""
    s = _draw("cosine_interpolated", image_d=32, noise_d_low=32, noise_d_high=32, sigma_data=1.0)
    lo, hi = math.atan(1e-3), math.atan(1e3)
    a = (np.arctan(s) - lo) / (hi - lo)
    _close(a.mean(), 0.5, 1 / math.sqrt(12))
    assert abs(a.var() - 1 / 12) < 0.002


def test_vp_and_ve_uniform_t(x64):
    s = _draw("ve_uniform", sigma_min=0.02, sigma_max=100.0)
    u = np.log(s / 0.02) / math.log(100 / 0.02)
    _close(u.mean(), 0.5, 1 / math.sqrt(12))
    s = _draw("vp_uniform", beta_d=19.9, beta_min=0.1, epsilon_t=1e-5)
    t = (np.sqrt(0.1**2 + 2 * 19.9 * np.log1p(s**2)) - 0.1) / 19.9
    _close(t.mean(), (1 + 1e-5) / 2, 1 / math.sqrt(12))
    assert t.min() >= 1e-5 - 1e-9 and t.max() <= 1 + 1e-9


def test_densities_jit():
    f = jax.jit(lambda k: S.lognormal(k, (4,)))
    assert f(jax.random.key(0)).shape == (4,)
    assert jnp.all(f(jax.random.key(0)) > 0)


# --------------------------------------------------------------------------- the VP schedule


def test_vp_schedule_inverse_derivative_and_range(x64):
    vp = S.VPSchedule()
    t = np.array([1e-5, 1e-3, 0.1, 0.5, 1.0])
    sigma = np.sqrt(np.expm1(0.5 * 19.9 * t**2 + 0.1 * t))
    np.testing.assert_allclose(vp.sigma(t), sigma, rtol=1e-9)  # exp(.) - 1 as NVlabs/edm
    np.testing.assert_allclose(vp.sigma_inv(sigma), t, rtol=1e-9)
    f = lambda t: np.sqrt(np.expm1(0.5 * 19.9 * t**2 + 0.1 * t))  # noqa: E731
    h = 1e-4 * t
    np.testing.assert_allclose(vp.sigma_deriv(t), (f(t + h) - f(t - h)) / (2 * h), rtol=1e-6)
    fit = S.VPSchedule.from_range(0.002, 80.0, 1e-3)
    np.testing.assert_allclose([fit.sigma(1e-3), fit.sigma(1.0)], [0.002, 80.0], rtol=1e-10)


def test_vp_constants_live_in_schedules_only():
    """19.9 / 0.1 (the VP SDE's betas) are written once, in schedules.py."""
    import pathlib
    import re

    root = pathlib.Path(S.__file__).parent
    for path in root.rglob("*.py"):
        if path.name != "schedules.py":
            assert not re.search(r"\b19\.9\b", path.read_text()), path
