"""Preconditioning identities (EDM Table 1) and make_denoiser."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from edm_jax import precond as P
from edm_jax.schedules import iddpm_u_table

SIGMAS = np.array([0.002, 0.03, 0.5, 1.0, 7.0, 80.0])


@pytest.mark.parametrize("sigma_data", [0.5, 1.0])
def test_edm_unit_variance(sigma_data, x64):
    c_skip, c_out, c_in, c_noise = map(np.asarray, P.EDMPrecond(sigma_data).scalings(SIGMAS))
    # unit-variance network input: Var[c_in (y + n)] = c_in^2 (sigma^2 + sd^2) = 1
    np.testing.assert_allclose(c_in**2 * (SIGMAS**2 + sigma_data**2), 1, rtol=1e-12)
    # unit-variance training target (EDM eq. 8 / App. B.6)
    target_var = (1 - c_skip) ** 2 * sigma_data**2 + c_skip**2 * SIGMAS**2
    np.testing.assert_allclose(c_out**2, target_var, rtol=1e-12)
    np.testing.assert_allclose(c_noise, np.log(SIGMAS) / 4, rtol=1e-12)


def test_edm_denoiser_tends_to_identity(x64):
    """D(x; sigma -> 0) -> x whatever the network outputs."""
    net = lambda params, x_in, c_noise: jnp.sin(3 * x_in) + params  # noqa: E731
    denoise = P.make_denoiser(net, P.EDMPrecond())
    x = jax.random.normal(jax.random.key(0), (2, 4, 4, 3), jnp.float64)
    for s, tol in [(1e-4, 1e-3), (1e-7, 1e-6), (1e-10, 1e-9)]:
        np.testing.assert_allclose(denoise(1.5, x, s), x, atol=tol)


def test_vp_formulas(x64):
    pre = P.VPPrecond()
    c_skip, c_out, c_in, c_noise = map(np.asarray, pre.scalings(SIGMAS))
    np.testing.assert_array_equal(c_skip, 1)
    np.testing.assert_allclose(c_out, -SIGMAS, rtol=1e-14)
    np.testing.assert_allclose(c_in, 1 / np.sqrt(SIGMAS**2 + 1), rtol=1e-14)
    # c_noise = (M-1) t with sigma(t) = sqrt(exp(beta_d t^2/2 + beta_min t) - 1)
    t = c_noise / 999
    np.testing.assert_allclose(np.sqrt(np.expm1(19.9 * t**2 / 2 + 0.1 * t)), SIGMAS, rtol=1e-10)
    assert math.isclose(pre.sigma_max, math.sqrt(math.exp(19.9 / 2 + 0.1) - 1))
    assert math.isclose(pre.sigma_min, math.sqrt(math.expm1(19.9 * 1e-10 / 2 + 0.1 * 1e-5)))


def test_ve_formulas(x64):
    c_skip, c_out, c_in, c_noise = map(np.asarray, P.VEPrecond().scalings(SIGMAS))
    np.testing.assert_array_equal(c_skip, 1)
    np.testing.assert_array_equal(c_in, 1)
    np.testing.assert_allclose(c_out, SIGMAS, rtol=1e-14)
    np.testing.assert_allclose(c_noise, np.log(SIGMAS / 2), rtol=1e-12)


def test_iddpm_formulas(x64):
    pre = P.IDDPMPrecond()
    u = iddpm_u_table()
    c_skip, c_out, c_in, c_noise = map(np.asarray, pre.scalings(SIGMAS))
    nearest = np.array([np.argmin(np.abs(u - s)) for s in SIGMAS])
    np.testing.assert_array_equal(c_noise, 999 - nearest)
    np.testing.assert_allclose(c_out, -SIGMAS, rtol=1e-14)
    np.testing.assert_allclose(c_in, 1 / np.sqrt(SIGMAS**2 + 1), rtol=1e-14)
    np.testing.assert_array_equal(c_skip, 1)
    np.testing.assert_array_equal(pre.round_sigma(SIGMAS), u[nearest])
    assert pre.sigma_max == pytest.approx(u[0], rel=1e-6)
    assert pre.sigma_min == pytest.approx(u[999], rel=1e-6)
    assert pre.out_channels_factor == 2


@pytest.mark.parametrize("name", ["edm", "vp", "ve", "iddpm"])
def test_make_denoiser_applies_eq7(name, x64):
    """D = c_skip x + c_out F(c_in x; c_noise)[..., :C], per sample sigma."""
    pre = P.get_precond(name)
    seen = {}

    def net(params, x_in, c_noise, labels=None):
        seen["x_in"], seen["c_noise"], seen["labels"] = x_in, c_noise, labels
        out = jnp.cos(x_in) * params
        return jnp.concatenate([out] * pre.out_channels_factor, axis=-1)

    x = jax.random.normal(jax.random.key(1), (3, 2, 2, 3), jnp.float64)
    sigma = jnp.array([0.1, 1.0, 10.0])
    D = np.asarray(P.make_denoiser(net, pre)(2.0, x, sigma, labels="L"))
    c_skip, c_out, c_in, c_noise = (np.asarray(c)[:, None, None, None] for c in pre.scalings(sigma))
    expected = c_skip * np.asarray(x) + c_out * np.cos(c_in * np.asarray(x)) * 2.0
    np.testing.assert_allclose(D, expected, rtol=1e-12)
    np.testing.assert_allclose(seen["c_noise"], c_noise.reshape(-1))
    assert seen["labels"] == "L" and D.shape == x.shape


def test_denoiser_broadcasts_scalar_sigma():
    denoise = P.make_denoiser(lambda p, x, c: x, P.EDMPrecond())
    x = jnp.ones((4, 2, 2, 1))
    np.testing.assert_allclose(denoise(None, x, 1.0), denoise(None, x, jnp.ones(4)))
    assert denoise(None, x.astype(jnp.bfloat16), 1.0).dtype == jnp.float32


def test_bad_precond():
    with pytest.raises(ValueError, match="'edm2'.*edm"):
        P.get_precond("edm2")
    with pytest.raises(ValueError, match="beta"):
        P.get_precond("ve", beta_d=3.0)
    with pytest.raises(ValueError, match="sigma_data"):
        P.EDMPrecond(sigma_data=-1.0)
