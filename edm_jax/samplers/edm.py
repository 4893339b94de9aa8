"""NVlabs/edm's samplers: ``edm_sampler`` (EDM Algorithms 1 and 2) and ``ablation_sampler``.

These keep NVlabs/edm's calling convention: ``latents`` are unit-variance noise and the
grid is built inside from ``num_steps, sigma_min, sigma_max, rho``. ``round_sigma`` and
``net_sigma_min``/``net_sigma_max`` stand for the network's (``precond.round_sigma`` etc.).
``sample_heun_sde`` is Algorithm 2 with EDM's stochastic settings, k-diffusion signature.
``edm_sampler`` and ``ablation_sampler`` are exact ports of NVlabs' functions (their grid built
inside from latents), so they keep NVlabs' signature rather than ``declare``'s.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from edm_jax import schedules
from edm_jax.checks import check_choice
from edm_jax.samplers.core import call, finish, is_zero, prepare, scan_steps
from edm_jax.samplers.kdiffusion import churned, heun_correction
from edm_jax.samplers.noise import resolve_noise

Array = jax.Array
INF = float("inf")


def _identity(sigma):
    return sigma


def _spread(gamma, sigma_hat, sigma):
    """sqrt(sigma_hat^2 - sigma^2), exactly 0 when gamma = 0 (no FMA residue there)."""
    var = jnp.where(gamma > 0, jnp.maximum(sigma_hat**2 - sigma**2, 0.0), 1.0)
    return jnp.where(gamma > 0, jnp.sqrt(var), 0.0)


def _edm_step(denoise, t_steps, noise, churn: dict, num_steps, round_sigma):
    """EDM Algorithm 2, one step: churn (lines 4-6), Euler (7-8), Heun correction (9-11)."""
    gamma_max = min(churn["S_churn"] / num_steps, math.sqrt(2) - 1)

    def step(x, i):
        t_cur, t_next = t_steps[i], t_steps[i + 1]
        t_hat, x_hat = t_cur, x
        if noise is not None:
            in_range = (churn["S_min"] <= t_cur) & (t_cur <= churn["S_max"])
            gamma = jnp.where(in_range, gamma_max, 0.0)
            t_hat = round_sigma(t_cur + gamma * t_cur)
            eps = noise(t_cur, t_hat) * churn["S_noise"]
            x_hat = x + _spread(gamma, t_hat, t_cur) * eps
        denoised = call(denoise, x_hat, t_hat)
        d_cur = (x_hat - denoised) / t_hat
        x_next = x_hat + (t_next - t_hat) * d_cur

        def correct():
            d_prime = (x_next - call(denoise, x_next, t_next)) / t_next
            return x_hat + (t_next - t_hat) * (0.5 * d_cur + 0.5 * d_prime)

        return jax.lax.cond(i < num_steps - 1, correct, lambda: x_next), (x_hat, denoised)

    return step


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
    t_steps = jnp.concatenate([round_sigma(steps), jnp.zeros([1], x0.dtype)])  # EDM eq. 5
    x, t_steps = prepare(x0 * t_steps[0], t_steps)
    use_noise = not is_zero(S_churn) or noise_sampler is not None
    noise = resolve_noise(noise_sampler, rng, x, "edm") if use_noise else None
    churn = {"S_churn": S_churn, "S_min": S_min, "S_max": S_max, "S_noise": S_noise}
    step = _edm_step(denoise, t_steps, noise, churn, num_steps, round_sigma)
    x, traj = scan_steps(step, x, num_steps, return_trajectory)
    return finish(x, traj, return_trajectory)


_HEUN_SDE = {"s_churn": 40.0, "s_tmin": 0.05, "s_tmax": 50.0, "s_noise": 1.003}
sample_heun_sde = churned(
    "heun_sde",
    "EDM Algorithm 2 (stochastic Heun) with EDM's ImageNet-64 settings as defaults.",
    heun_correction,
    _HEUN_SDE,
)


# --------------------------------------------------------------------------- ablation sampler

SOLVERS = ("euler", "heun")
DISCRETIZATIONS = ("vp", "ve", "iddpm", "edm")
ABLATION_SCHEDULES = ("vp", "ve", "linear")  # sigma(t) of EDM Table 1 (not edm_jax.SCHEDULES)
SCALINGS = ("vp", "none")


def _schedule_fns(schedule, vp: schedules.VPSchedule):
    """sigma(t), sigma'(t), t(sigma) for the VP, VE or linear schedule (EDM Table 1)."""
    if schedule == "vp":
        return vp.sigma, vp.sigma_deriv, vp.sigma_inv
    if schedule == "ve":
        return jnp.sqrt, lambda t: 0.5 / jnp.sqrt(t), lambda s: s**2
    return (lambda t: t), (lambda t: jnp.ones_like(t)), (lambda s: s)


def _scaling_fns(scaling, sigma, sigma_deriv):
    """s(t), s'(t) for VP scaling or none."""
    if scaling == "vp":
        s = lambda t: 1 / jnp.sqrt(1 + sigma(t) ** 2)  # noqa: E731
        return s, lambda t: -sigma(t) * sigma_deriv(t) * s(t) ** 3
    return (lambda t: jnp.ones_like(t)), (lambda t: jnp.zeros_like(t))


@functools.lru_cache(maxsize=8)
def _nvlabs_iddpm_table(M: int, C_1: float, C_2: float) -> np.ndarray:
    """EDM's iDDPM levels u_j (App. C.3.4) as NVlabs/edm computes them.

    Its alpha_bar(j) = sin(pi/2 j / M / (C_2 + 1))^2 comes out in float32 (an int64 tensor
    times a Python float), so the ratio is rounded to float32 here too; u stays float64.
    """
    f32 = np.float32
    arg = f32(0.5 * np.pi) * np.arange(M + 1, dtype=f32) / f32(M) / f32(C_2 + 1)
    sin = np.sin(arg.astype(np.float64)).astype(f32)  # correctly rounded float32 sin
    ratio = np.maximum((sin * sin)[:-1] / (sin * sin)[1:], f32(C_1)).astype(np.float64)
    u = np.zeros(M + 1)
    for j in range(M, 0, -1):  # the table's recursion, run once at trace time
        u[j - 1] = math.sqrt((u[j] ** 2 + 1) / ratio[j - 1] - 1)
    return u


def _nvlabs_iddpm_grid(num_steps, sigma_min, sigma_max, C_1, C_2, M) -> np.ndarray:
    """num_steps of the u_j inside [sigma_min, sigma_max], evenly by index (EDM Table 1)."""
    u = _nvlabs_iddpm_table(int(M), float(C_1), float(C_2))
    kept = u[(u >= sigma_min) & (u <= sigma_max)]
    if kept.size == 0:
        raise ValueError(f"no iDDPM level lies in [{sigma_min}, {sigma_max}]")
    idx = np.round((kept.size - 1) / max(num_steps - 1, 1) * np.arange(num_steps))
    return kept[idx.astype(np.int64)]


def _ablation_grid(discretization, num_steps, sigma_min, sigma_max, rho, epsilon_s, C_1, C_2, M):
    """Noise levels of EDM Table 1's time discretizations (before round_sigma)."""
    if discretization == "vp":
        return schedules.vp(num_steps, eps_s=epsilon_s, sigma_min=sigma_min, sigma_max=sigma_max)[
            :-1
        ]
    if discretization == "ve":
        return schedules.ve(num_steps, sigma_min, sigma_max)[:-1]
    if discretization == "iddpm":
        return jnp.asarray(_nvlabs_iddpm_grid(num_steps, sigma_min, sigma_max, C_1, C_2, M))
    return schedules.karras(num_steps, sigma_min, sigma_max, rho)[:-1]


def _default_range(discretization, epsilon_s):
    vp_sigma = schedules.VP.sigma_float  # the VP SDE's default beta_d, beta_min
    lo = {"vp": vp_sigma(epsilon_s), "ve": 0.02, "iddpm": 0.002, "edm": 0.002}[discretization]
    hi = {"vp": vp_sigma(1.0), "ve": 100.0, "iddpm": 81.0, "edm": 80.0}[discretization]
    return lo, hi


def _ablation_odes(schedule, scaling, sigma_min, sigma_max, epsilon_s):
    """sigma, sigma', sigma^-1, s, s' of the chosen schedule and scaling (EDM Table 1)."""
    # VP's beta_d, beta_min fitted to the [sigma_min, sigma_max] range (NVlabs/edm).
    vp = schedules.VPSchedule.from_range(sigma_min, sigma_max, epsilon_s)
    sigma, sigma_deriv, sigma_inv = _schedule_fns(schedule, vp)
    s, s_deriv = _scaling_fns(scaling, sigma, sigma_deriv)
    return sigma, sigma_deriv, sigma_inv, s, s_deriv


def _ablation_deriv(denoise, odes):
    """(dx/dt, D) of EDM eq. 4: dx/dt = (sigma'/sigma + s'/s) x - sigma' s / sigma D(x/s; sigma)."""
    sigma, sigma_deriv, _, s, s_deriv = odes

    def deriv(x, t):
        denoised = call(denoise, x / s(t), sigma(t))
        coef_x = sigma_deriv(t) / sigma(t) + s_deriv(t) / s(t)
        return coef_x * x - sigma_deriv(t) * s(t) / sigma(t) * denoised, denoised

    return deriv


def _ablation_churn(odes, noise, churn: dict, num_steps, round_sigma):
    """EDM Algorithm 2 lines 4-6 in (t, s) form: raise t to t_hat and add the matching noise."""
    sigma, _, sigma_inv, s, _ = odes
    gamma_max = min(churn["S_churn"] / num_steps, math.sqrt(2) - 1)

    def apply(x, t_cur):
        if noise is None:
            return x, t_cur
        in_range = (churn["S_min"] <= sigma(t_cur)) & (sigma(t_cur) <= churn["S_max"])
        gamma = jnp.where(in_range, gamma_max, 0.0)
        t_hat = sigma_inv(round_sigma(sigma(t_cur) + gamma * sigma(t_cur)))
        spread = _spread(gamma, sigma(t_hat), sigma(t_cur))
        eps = noise(sigma(t_cur), sigma(t_hat)) * churn["S_noise"]
        return s(t_hat) / s(t_cur) * x + spread * s(t_hat) * eps, t_hat

    return apply


def _ablation_step(deriv, churn, t_steps, solver, alpha, num_steps):
    """One step of the ablation sampler: churn, Euler, and Heun's correction (EDM Alg. 2)."""

    def step(x, i):
        x_hat, t_hat = churn(x, t_steps[i])
        h = t_steps[i + 1] - t_hat
        d_cur, denoised = deriv(x_hat, t_hat)
        euler = lambda: x_hat + h * d_cur  # noqa: E731
        if solver == "euler":
            return euler(), (x_hat, denoised)

        def heun():  # 2nd order with the intermediate point at t_hat + alpha h
            d_prime, _ = deriv(x_hat + alpha * h * d_cur, t_hat + alpha * h)
            return x_hat + h * ((1 - 1 / (2 * alpha)) * d_cur + 1 / (2 * alpha) * d_prime)

        return jax.lax.cond(i < num_steps - 1, heun, euler), (x_hat, denoised)

    return step


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
    return_trajectory=False,
):
    """NVlabs/edm's generalized sampler: solver x discretization x schedule x scaling.

    ``return_trajectory`` gives per step {'x': x_hat (scaled by s), 'denoised': D(x_hat / s)}.
    """
    choices = zip(
        ("solver", "discretization", "schedule", "scaling"),
        (solver, discretization, schedule, scaling),
        (SOLVERS, DISCRETIZATIONS, ABLATION_SCHEDULES, SCALINGS),
        strict=True,
    )
    for name, value, valid in choices:
        check_choice(name, value, valid)
    schedules.check_steps(num_steps)
    lo, hi = _default_range(discretization, epsilon_s)
    sigma_min = max(lo if sigma_min is None else sigma_min, net_sigma_min)
    sigma_max = min(hi if sigma_max is None else sigma_max, net_sigma_max)
    x0, _ = prepare(jnp.asarray(latents), jnp.array([1.0, 0.0]))
    odes = _ablation_odes(schedule, scaling, sigma_min, sigma_max, epsilon_s)
    sigma_steps = _ablation_grid(
        discretization, num_steps, sigma_min, sigma_max, rho, epsilon_s, C_1, C_2, M
    )
    t_steps = odes[2](round_sigma(jnp.asarray(sigma_steps, x0.dtype)))  # t_i = sigma^-1(sigma_i)
    t_steps = jnp.concatenate([t_steps, jnp.zeros([1], x0.dtype)])
    use_noise = not is_zero(S_churn) or noise_sampler is not None
    noise = resolve_noise(noise_sampler, rng, x0, "ablation") if use_noise else None
    churn = {"S_churn": S_churn, "S_min": S_min, "S_max": S_max, "S_noise": S_noise}
    churn_fn = _ablation_churn(odes, noise, churn, num_steps, round_sigma)
    step = _ablation_step(
        _ablation_deriv(denoise, odes), churn_fn, t_steps, solver, alpha, num_steps
    )
    x = x0 * (odes[0](t_steps[0]) * odes[3](t_steps[0]))  # x_0 = latents sigma(t_0) s(t_0)
    x, traj = scan_steps(step, x, num_steps, return_trajectory)
    return finish(x, traj, return_trajectory)
