"""k-diffusion's samplers (same signatures, option names and semantics), each one lax.scan.

Each is a step builder ``(denoise, x, sigmas, noise, **options) -> (step, carry)`` that
``@declare`` (name, option defaults, noise) makes into ``sample_<name>(denoise, x, sigmas,
*, rng=None, noise_sampler=None, **options) -> x``, as in k-diffusion.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from edm_jax.samplers.core import ancestral_step, call, to_d
from edm_jax.samplers.declare import declare

Array = jax.Array
INF = float("inf")
CHURN = {"s_churn": 0.0, "s_tmin": 0.0, "s_tmax": INF, "s_noise": 1.0}
ANCESTRAL = {"eta": 1.0, "s_noise": 1.0}


def _churn(x, sigma, n, noise, s_churn, s_tmin, s_tmax, s_noise):
    """EDM Algorithm 2 lines 4-6: raise sigma to sigma_hat = sigma (1 + gamma), add noise."""
    if noise is None:
        return x, sigma
    gamma_max = jnp.minimum(s_churn / n, math.sqrt(2) - 1)
    gamma = jnp.where((s_tmin <= sigma) & (sigma <= s_tmax), gamma_max, 0.0)
    sigma_hat = sigma * (gamma + 1)
    eps = noise(sigma, sigma_hat) * s_noise
    # sqrt(sigma_hat^2 - sigma^2) = sigma sqrt(gamma (gamma + 2)): exactly 0 without churn
    # (an FMA in sigma_hat^2 - sigma^2 would leave ~1e-8 sigma of noise there)
    gamma = jax.lax.stop_gradient(gamma)  # piecewise constant in sigma; keeps grads finite
    return x + eps * sigma * jnp.sqrt(gamma * (gamma + 2)), sigma_hat


def _noise_if(pred, noise, sigma, sigma_next, scale):
    """noise(sigma, sigma_next) * scale where pred holds, else 0 (noise is not called at 0).

    No noise sampler (eta = 0): 0, the noise's scale sigma_up being 0 then.
    """
    if noise is None:
        return 0.0
    return jnp.where(pred, noise(sigma, jnp.where(pred, sigma_next, sigma)) * scale, 0.0)


def _churn_steps(second_order):
    """Euler / Heun / DPM-2 with EDM churn: they differ only in the correction step."""

    def build(denoise, x, sigmas, noise, *, s_churn, s_tmin, s_tmax, s_noise):
        n = sigmas.shape[0] - 1

        def step(x, i):
            sigma, sigma_next = sigmas[i], sigmas[i + 1]
            x, sigma_hat = _churn(x, sigma, n, noise, s_churn, s_tmin, s_tmax, s_noise)
            denoised = call(denoise, x, sigma_hat)
            d = to_d(x, sigma_hat, denoised)
            if second_order is None:
                return x + d * (sigma_next - sigma_hat), (x, denoised, sigma_hat)
            x_new = jax.lax.cond(
                sigma_next > 0,
                lambda: second_order(denoise, x, d, sigma_hat, sigma_next),
                lambda: x + d * (sigma_next - sigma_hat),
            )
            return x_new, (x, denoised, sigma_hat)

        return step, x

    return build


def heun_correction(denoise, x, d, sigma_hat, sigma_next):
    """Heun's 2nd-order step (EDM Algorithm 1 lines 6-7)."""
    dt = sigma_next - sigma_hat
    x_2 = x + d * dt
    d_2 = to_d(x_2, sigma_next, call(denoise, x_2, sigma_next))
    return x + (d + d_2) / 2 * dt


def _dpm2_correction(denoise, x, d, sigma_hat, sigma_next):
    """DPM-Solver-2: midpoint in log sigma."""
    sigma_mid = jnp.exp((jnp.log(sigma_hat) + jnp.log(sigma_next)) / 2)
    x_2 = x + d * (sigma_mid - sigma_hat)
    d_2 = to_d(x_2, sigma_mid, call(denoise, x_2, sigma_mid))
    return x + d_2 * (sigma_next - sigma_hat)


def churned(name: str, doc: str, second_order, options=CHURN):
    """A churn sampler (EDM's s_churn, s_tmin, s_tmax, s_noise) with this correction step."""
    declaration = declare(name, options, noise="gaussian", noise_option="s_churn", doc=doc)
    return declaration(_churn_steps(second_order))


sample_euler = churned("euler", "Euler steps with optional churn (EDM Algorithm 2, Euler).", None)
sample_heun = churned(
    "heun", "Heun steps with optional churn (EDM Algorithms 1 and 2).", heun_correction
)
sample_dpm_2 = churned(
    "dpm_2", "DPM-Solver-2-inspired steps with optional churn (k-diffusion).", _dpm2_correction
)


def _ancestral_steps(second_order):
    """Euler / DPM-2 ancestral: a deterministic step to sigma_down, then noise sigma_up."""

    def build(denoise, x, sigmas, noise, *, eta, s_noise):
        def step(x, i):
            sigma, sigma_next = sigmas[i], sigmas[i + 1]
            denoised = call(denoise, x, sigma)
            sigma_down, sigma_up = ancestral_step(sigma, sigma_next, eta)
            d = to_d(x, sigma, denoised)
            euler = lambda: x + d * (sigma_down - sigma)  # noqa: E731
            if second_order is None:
                x_new = euler()
            else:
                x_new = jax.lax.cond(
                    sigma_down > 0, lambda: second_order(denoise, x, d, sigma, sigma_down), euler
                )
            x_new = x_new + _noise_if(sigma_next > 0, noise, sigma, sigma_next, s_noise * sigma_up)
            return x_new, (x, denoised)

        return step, x

    return build


def _ancestral(name, noise="gaussian", check=None, doc=None, **extra):
    """``declare`` for an eta sampler: eta, s_noise and its own options."""
    return declare(name, ANCESTRAL | extra, noise=noise, noise_option="eta", check=check, doc=doc)


sample_euler_ancestral = _ancestral("euler_ancestral", doc="Ancestral sampling with Euler steps.")(
    _ancestral_steps(None)
)
sample_dpm_2_ancestral = _ancestral(
    "dpm_2_ancestral", doc="Ancestral sampling with DPM-Solver-2 steps."
)(_ancestral_steps(_dpm2_correction))


# --------------------------------------------------------------------------- LMS

_GL_NODES = 8  # Gauss-Legendre points: exact for the Lagrange basis up to order 16


def lms_coefficients(sigmas: Array, i, order: int) -> Array:
    """[order] integrals over [s_i, s_{i+1}] of the Lagrange basis on s_i, ..., s_{i-cur+1}.

    cur = min(i + 1, order); coefficients past cur are 0. Computed by Gauss-Legendre
    quadrature (exact for these polynomials), so sigmas and i may be traced.
    """
    nodes, weights = np.polynomial.legendre.leggauss(max(_GL_NODES, order))
    a, b = sigmas[i], sigmas[i + 1]
    tau = (b - a) / 2 * jnp.asarray(nodes, sigmas.dtype) + (a + b) / 2  # [G]
    cur = jnp.minimum(i + 1, order)
    hist = sigmas[jnp.maximum(i - jnp.arange(order), 0)]  # [order] s_{i-k}
    coeffs = []
    for j in range(order):  # static loop over the method's order, not over steps
        prod = jnp.ones_like(tau)
        for k in range(order):
            if k == j:
                continue
            use = k < cur
            den = jnp.where(use, hist[j] - hist[k], 1.0)
            prod = prod * jnp.where(use, (tau - hist[k]) / den, 1.0)
        integral = (b - a) / 2 * jnp.sum(jnp.asarray(weights, sigmas.dtype) * prod)
        coeffs.append(jnp.where(j < cur, integral, 0.0))
    return jnp.stack(coeffs)


def _check_lms(options) -> None:
    order = options["order"]
    if not isinstance(order, int) or order < 1:
        raise ValueError(f"lms order must be an int >= 1, got {order!r}")


@declare("lms", {"order": 4}, check=_check_lms)
def sample_lms(denoise, x, sigmas, noise, *, order):
    """Linear multistep (Adams-Bashforth in sigma) of any order, history in the scan carry."""
    ds = jnp.zeros((order,) + x.shape, x.dtype)  # ds[0] newest

    def step(carry, i):
        x, ds = carry
        denoised = call(denoise, x, sigmas[i])
        ds = jnp.concatenate([to_d(x, sigmas[i], denoised)[None], ds[:-1]])
        coeffs = lms_coefficients(sigmas, i, order)
        x_new = x + jnp.tensordot(coeffs, ds, axes=1)
        return (x_new, ds), (x, denoised)

    return step, (x, ds)


# --------------------------------------------------------------------------- DPM-Solver++


def _t(sigma):
    return -jnp.log(sigma)


def _sigma(t):
    return jnp.exp(-t)


@_ancestral("dpmpp_2s_ancestral")
def sample_dpmpp_2s_ancestral(denoise, x, sigmas, noise, *, eta, s_noise):
    """Ancestral sampling with DPM-Solver++(2S) second-order steps."""

    def second(x, sigma, sigma_down, denoised):
        t, t_next = _t(sigma), _t(sigma_down)
        h = t_next - t
        s = t + h / 2
        x_2 = (_sigma(s) / _sigma(t)) * x - jnp.expm1(-h / 2) * denoised
        denoised_2 = call(denoise, x_2, _sigma(s))
        return (_sigma(t_next) / _sigma(t)) * x - jnp.expm1(-h) * denoised_2

    def step(x, i):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = call(denoise, x, sigma)
        sigma_down, sigma_up = ancestral_step(sigma, sigma_next, eta)
        euler = lambda: x + to_d(x, sigma, denoised) * (sigma_down - sigma)  # noqa: E731
        x_new = jax.lax.cond(sigma_down > 0, lambda: second(x, sigma, sigma_down, denoised), euler)
        x_new = x_new + _noise_if(sigma_next > 0, noise, sigma, sigma_next, s_noise * sigma_up)
        return x_new, (x, denoised)

    return step, x


@_ancestral("dpmpp_sde", "brownian", r=0.5)
def sample_dpmpp_sde(denoise, x, sigmas, noise, *, eta, s_noise, r):
    """DPM-Solver++ (stochastic, two stages per step), Brownian-tree noise by default."""
    fac = 1 / (2 * r)

    def sde_step(x, sigma, sigma_next, denoised):
        t, t_next = _t(sigma), _t(sigma_next)
        h = t_next - t
        s = t + h * r
        sd, su = ancestral_step(_sigma(t), _sigma(s), eta)
        s_ = _t(sd)
        x_2 = (_sigma(s_) / _sigma(t)) * x - jnp.expm1(t - s_) * denoised
        if noise is not None:  # eta = 0: su = 0
            x_2 = x_2 + noise(_sigma(t), _sigma(s)) * s_noise * su
        denoised_2 = call(denoise, x_2, _sigma(s))
        sd, su = ancestral_step(_sigma(t), _sigma(t_next), eta)
        t_next_ = _t(sd)
        denoised_d = (1 - fac) * denoised + fac * denoised_2
        x = (_sigma(t_next_) / _sigma(t)) * x - jnp.expm1(t - t_next_) * denoised_d
        return x if noise is None else x + noise(_sigma(t), _sigma(t_next)) * s_noise * su

    def step(x, i):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = call(denoise, x, sigma)
        euler = lambda: x + to_d(x, sigma, denoised) * (sigma_next - sigma)  # noqa: E731
        x_new = jax.lax.cond(
            sigma_next > 0, lambda: sde_step(x, sigma, sigma_next, denoised), euler
        )
        return x_new, (x, denoised)

    return step, x


@declare("dpmpp_2m")
def sample_dpmpp_2m(denoise, x, sigmas, noise):
    """DPM-Solver++(2M): second-order multistep in log sigma."""

    def step(carry, i):
        x, old_denoised = carry
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = call(denoise, x, sigma)
        t, t_next = _t(sigma), _t(sigma_next)
        h = t_next - t
        h_last = t - _t(sigmas[jnp.maximum(i - 1, 0)])
        first = (i == 0) | (sigma_next == 0)
        r = jnp.where(first, 1.0, h_last / jnp.where(first, 1.0, h))
        denoised_d = jnp.where(
            first, denoised, (1 + 1 / (2 * r)) * denoised - (1 / (2 * r)) * old_denoised
        )
        x_new = (sigma_next / sigma) * x - jnp.expm1(-h) * denoised_d
        return (x_new, denoised), (x, denoised)

    return step, (x, jnp.zeros_like(x))


def _sde_noise(noise, sigma, sigma_next, eta_h, s_noise):
    """The SDE's fresh noise over a step: sigma_next sqrt(1 - e^(-2 eta h)) s_noise z."""
    if noise is None:
        return 0.0
    return noise(sigma, sigma_next) * sigma_next * jnp.sqrt(-jnp.expm1(-2 * eta_h)) * s_noise


def _check_solver_type(options) -> None:
    solver_type = options["solver_type"]
    if solver_type not in ("heun", "midpoint"):
        raise ValueError(f"solver_type must be 'heun' or 'midpoint', got {solver_type!r}")


@_ancestral("dpmpp_2m_sde", "brownian", _check_solver_type, solver_type="midpoint")
def sample_dpmpp_2m_sde(denoise, x, sigmas, noise, *, eta, s_noise, solver_type):
    """DPM-Solver++(2M) SDE with the 'midpoint' or 'heun' correction; Brownian-tree noise."""

    def sde_step(x, i, sigma, sigma_next, denoised, old_denoised, h_last):
        h = _t(sigma_next) - _t(sigma)
        eta_h = eta * h
        x = sigma_next / sigma * jnp.exp(-eta_h) * x - jnp.expm1(-h - eta_h) * denoised
        phi = -jnp.expm1(-h - eta_h)
        corr = (phi / (-h - eta_h) + 1) if solver_type == "heun" else 0.5 * phi
        x = x + jnp.where(i > 0, corr * h / h_last, 0.0) * (denoised - old_denoised)
        return x + _sde_noise(noise, sigma, sigma_next, eta_h, s_noise), h

    def step(carry, i):
        x, old_denoised, h_last = carry
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = call(denoise, x, sigma)
        x_new, h = jax.lax.cond(
            sigma_next > 0,
            lambda: sde_step(x, i, sigma, sigma_next, denoised, old_denoised, h_last),
            lambda: (denoised, h_last),
        )
        return (x_new, denoised, h), (x, denoised)

    return step, (x, jnp.zeros_like(x), jnp.ones([], x.dtype))


def _dpmpp_3m_update(x, i, h, h_eta, denoised, d_1, d_2, h_1, h_2):
    """DPM-Solver++(3M) data-prediction update, warming up through orders 1 and 2."""
    x = jnp.exp(-h_eta) * x - jnp.expm1(-h_eta) * denoised
    phi_2 = jnp.expm1(-h_eta) / h_eta + 1
    phi_3 = phi_2 / h_eta - 0.5
    r0, r1 = h_1 / h, h_2 / h
    d1_0 = (denoised - d_1) / r0
    d1_1 = (d_1 - d_2) / r1
    d1 = d1_0 + (d1_0 - d1_1) * r0 / (r0 + r1)
    d2 = (d1_0 - d1_1) / (r0 + r1)
    third = x + phi_2 * d1 - phi_3 * d2
    second = x + phi_2 * d1_0
    return jnp.where(i >= 2, third, jnp.where(i == 1, second, x))


@_ancestral("dpmpp_3m_sde", "brownian")
def sample_dpmpp_3m_sde(denoise, x, sigmas, noise, *, eta, s_noise):
    """DPM-Solver++(3M) SDE: third-order multistep with Brownian-tree noise."""

    def sde_step(x, i, sigma, sigma_next, denoised, d_1, d_2, h_1, h_2):
        h = _t(sigma_next) - _t(sigma)
        x = _dpmpp_3m_update(x, i, h, h * (eta + 1), denoised, d_1, d_2, h_1, h_2)
        return x + _sde_noise(noise, sigma, sigma_next, h * eta, s_noise), h

    def step(carry, i):
        x, d_1, d_2, h_1, h_2 = carry
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = call(denoise, x, sigma)
        x_new, h = jax.lax.cond(
            sigma_next > 0,
            lambda: sde_step(x, i, sigma, sigma_next, denoised, d_1, d_2, h_1, h_2),
            lambda: (denoised, h_1),
        )
        return (x_new, denoised, d_1, h, h_1), (x, denoised)

    one = jnp.ones([], x.dtype)
    return step, (x, jnp.zeros_like(x), jnp.zeros_like(x), one, one)
