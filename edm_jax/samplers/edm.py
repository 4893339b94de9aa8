"""NVlabs/edm's samplers: ``edm_sampler`` (EDM Algorithms 1 and 2) and ``ablation_sampler``.

These keep NVlabs/edm's calling convention: ``latents`` are unit-variance noise and the
grid is built inside from ``num_steps, sigma_min, sigma_max, rho``. ``round_sigma`` and
``net_sigma_min``/``net_sigma_max`` stand for the network's (``precond.round_sigma`` etc.).
``sample_heun_sde`` is Algorithm 2 with EDM's stochastic settings, k-diffusion signature.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from edm_jax import schedules
from edm_jax.samplers.core import call, finish, is_zero, prepare, resolve_noise, scan_steps
from edm_jax.samplers.kdiffusion import sample_heun

Array = jax.Array
INF = float("inf")


def _identity(sigma):
    return sigma


def edm_sampler(
    denoise,
    latents,
    *,
    num_steps=18,
    sigma_min=0.002,
    sigma_max=80.0,
    rho=7.0,
    S_churn=0.0,
    S_min=0.0,
    S_max=INF,
    S_noise=1.0,
    rng=None,
    noise_sampler=None,
    round_sigma=_identity,
    return_trajectory=False,
):
    """EDM Algorithm 2 (Algorithm 1 when S_churn = 0): Heun with churn on the EDM grid."""
    schedules.check_steps(num_steps)
    x0 = jnp.asarray(latents)
    steps = schedules.edm(num_steps, sigma_min, sigma_max, rho).astype(x0.dtype)[:-1]
    t_steps = jnp.concatenate([round_sigma(steps), jnp.zeros([1], x0.dtype)])
    x, t_steps = prepare(x0 * t_steps[0], t_steps)
    noise = (
        None
        if is_zero(S_churn) and noise_sampler is None
        else resolve_noise(noise_sampler, rng, x, "edm")
    )

    def step(x, i):
        t_cur, t_next = t_steps[i], t_steps[i + 1]
        if noise is not None:
            gamma = jnp.where(
                (S_min <= t_cur) & (t_cur <= S_max), min(S_churn / num_steps, math.sqrt(2) - 1), 0.0
            )
            t_hat = round_sigma(t_cur + gamma * t_cur)
            eps = noise(t_cur, t_hat) * S_noise
            x_hat = x + jnp.sqrt(jnp.maximum(t_hat**2 - t_cur**2, 0.0)) * eps
        else:
            t_hat, x_hat = t_cur, x
        denoised = call(denoise, x_hat, t_hat)
        d_cur = (x_hat - denoised) / t_hat
        x_next = x_hat + (t_next - t_hat) * d_cur

        def correct():
            d_prime = (x_next - call(denoise, x_next, t_next)) / t_next
            return x_hat + (t_next - t_hat) * (0.5 * d_cur + 0.5 * d_prime)

        x_next = jax.lax.cond(i < num_steps - 1, correct, lambda: x_next)
        return x_next, (x_hat, denoised)

    x, traj = scan_steps(step, x, num_steps, return_trajectory)
    return finish(x, traj, return_trajectory)


def sample_heun_sde(
    denoise,
    x,
    sigmas,
    *,
    rng=None,
    noise_sampler=None,
    s_churn=40.0,
    s_tmin=0.05,
    s_tmax=50.0,
    s_noise=1.003,
    return_trajectory=False,
):
    """EDM Algorithm 2 (stochastic Heun) with EDM's ImageNet-64 settings as defaults."""
    return sample_heun(
        denoise,
        x,
        sigmas,
        rng=rng,
        noise_sampler=noise_sampler,
        s_churn=s_churn,
        s_tmin=s_tmin,
        s_tmax=s_tmax,
        s_noise=s_noise,
        return_trajectory=return_trajectory,
    )


# --------------------------------------------------------------------------- ablation sampler

SOLVERS = ("euler", "heun")
DISCRETIZATIONS = ("vp", "ve", "iddpm", "edm")
SCHEDULES = ("vp", "ve", "linear")
SCALINGS = ("vp", "none")


def _check_choice(name, value, valid):
    if value not in valid:
        raise ValueError(f"unknown {name} {value!r}; valid: {list(valid)}")


def _vp_fns(beta_d, beta_min):
    sigma = lambda t: jnp.sqrt(jnp.exp(0.5 * beta_d * t**2 + beta_min * t) - 1)  # noqa: E731
    deriv = lambda t: 0.5 * (beta_min + beta_d * t) * (sigma(t) + 1 / sigma(t))  # noqa: E731
    inv = lambda s: (jnp.sqrt(beta_min**2 + 2 * beta_d * jnp.log(s**2 + 1)) - beta_min) / beta_d  # noqa: E731
    return sigma, deriv, inv


def _schedule_fns(schedule, beta_d, beta_min):
    """sigma(t), sigma'(t), t(sigma) for the VP, VE or linear schedule (EDM Table 1)."""
    if schedule == "vp":
        return _vp_fns(beta_d, beta_min)
    if schedule == "ve":
        return jnp.sqrt, lambda t: 0.5 / jnp.sqrt(t), lambda s: s**2
    return (lambda t: t), (lambda t: jnp.ones_like(t)), (lambda s: s)


def _scaling_fns(scaling, sigma, sigma_deriv):
    """s(t), s'(t) for VP scaling or none."""
    if scaling == "vp":
        s = lambda t: 1 / jnp.sqrt(1 + sigma(t) ** 2)  # noqa: E731
        return s, lambda t: -sigma(t) * sigma_deriv(t) * s(t) ** 3
    return (lambda t: jnp.ones_like(t)), (lambda t: jnp.zeros_like(t))


def _ablation_grid(discretization, num_steps, sigma_min, sigma_max, rho, epsilon_s, C_1, C_2, M):
    """Noise levels of EDM Table 1's time discretizations (before round_sigma)."""
    if discretization == "vp":
        return schedules.vp(num_steps, eps_s=epsilon_s, sigma_min=sigma_min, sigma_max=sigma_max)[
            :-1
        ]
    if discretization == "ve":
        return schedules.ve(num_steps, sigma_min, sigma_max)[:-1]
    if discretization == "iddpm":
        return schedules.iddpm(num_steps, sigma_min, sigma_max, C_1, C_2, M)[:-1]
    return schedules.karras(num_steps, sigma_min, sigma_max, rho)[:-1]


def _default_range(discretization, epsilon_s):
    vp_sigma = lambda t: math.sqrt(math.exp(0.5 * 19.9 * t**2 + 0.1 * t) - 1)  # noqa: E731
    lo = {"vp": vp_sigma(epsilon_s), "ve": 0.02, "iddpm": 0.002, "edm": 0.002}[discretization]
    hi = {"vp": vp_sigma(1.0), "ve": 100.0, "iddpm": 81.0, "edm": 80.0}[discretization]
    return lo, hi


def ablation_sampler(
    denoise,
    latents,
    *,
    num_steps=18,
    sigma_min=None,
    sigma_max=None,
    rho=7.0,
    solver="heun",
    discretization="edm",
    schedule="linear",
    scaling="none",
    epsilon_s=1e-3,
    C_1=0.001,
    C_2=0.008,
    M=1000,
    alpha=1.0,
    S_churn=0.0,
    S_min=0.0,
    S_max=INF,
    S_noise=1.0,
    rng=None,
    noise_sampler=None,
    round_sigma=_identity,
    net_sigma_min=0.0,
    net_sigma_max=INF,
):
    """NVlabs/edm's generalized sampler: solver x discretization x schedule x scaling."""
    for name, value, valid in (
        ("solver", solver, SOLVERS),
        ("discretization", discretization, DISCRETIZATIONS),
        ("schedule", schedule, SCHEDULES),
        ("scaling", scaling, SCALINGS),
    ):
        _check_choice(name, value, valid)
    schedules.check_steps(num_steps)
    lo, hi = _default_range(discretization, epsilon_s)
    sigma_min = max(lo if sigma_min is None else sigma_min, net_sigma_min)
    sigma_max = min(hi if sigma_max is None else sigma_max, net_sigma_max)
    vp_beta_d = (
        2 * (np.log(sigma_min**2 + 1) / epsilon_s - np.log(sigma_max**2 + 1)) / (epsilon_s - 1)
    )
    vp_beta_min = np.log(sigma_max**2 + 1) - 0.5 * vp_beta_d

    x0 = jnp.asarray(latents)
    x0, _ = prepare(x0, jnp.array([1.0, 0.0]))
    sigma_steps = _ablation_grid(
        discretization, num_steps, sigma_min, sigma_max, rho, epsilon_s, C_1, C_2, M
    )
    sigma, sigma_deriv, sigma_inv = _schedule_fns(schedule, vp_beta_d, vp_beta_min)
    s, s_deriv = _scaling_fns(scaling, sigma, sigma_deriv)
    t_steps = sigma_inv(round_sigma(sigma_steps.astype(x0.dtype)))
    t_steps = jnp.concatenate([t_steps, jnp.zeros([1], x0.dtype)])
    noise = (
        None
        if is_zero(S_churn) and noise_sampler is None
        else resolve_noise(noise_sampler, rng, x0, "ablation")
    )

    def deriv(x, t):
        denoised = call(denoise, x / s(t), sigma(t))
        return (sigma_deriv(t) / sigma(t) + s_deriv(t) / s(t)) * x - sigma_deriv(t) * s(t) / sigma(
            t
        ) * denoised

    def step(x, i):
        t_cur, t_next = t_steps[i], t_steps[i + 1]
        if noise is not None:
            in_range = (S_min <= sigma(t_cur)) & (sigma(t_cur) <= S_max)
            gamma = jnp.where(in_range, min(S_churn / num_steps, math.sqrt(2) - 1), 0.0)
            t_hat = sigma_inv(round_sigma(sigma(t_cur) + gamma * sigma(t_cur)))
            spread = jnp.sqrt(jnp.maximum(sigma(t_hat) ** 2 - sigma(t_cur) ** 2, 0.0))
            x_hat = s(t_hat) / s(t_cur) * x + spread * s(t_hat) * S_noise * noise(
                sigma(t_cur), sigma(t_hat)
            )
        else:
            t_hat, x_hat = t_cur, x
        h = t_next - t_hat
        d_cur = deriv(x_hat, t_hat)
        euler = lambda: x_hat + h * d_cur  # noqa: E731
        if solver == "euler":
            return euler(), None

        def heun():
            x_prime, t_prime = x_hat + alpha * h * d_cur, t_hat + alpha * h
            d_prime = deriv(x_prime, t_prime)
            return x_hat + h * ((1 - 1 / (2 * alpha)) * d_cur + 1 / (2 * alpha) * d_prime)

        return jax.lax.cond(i < num_steps - 1, heun, euler), None

    x = x0 * (sigma(t_steps[0]) * s(t_steps[0]))
    x, _ = jax.lax.scan(step, x, jnp.arange(num_steps))
    return x
