"""DPM-Solver (Lu et al. 2022) fast and adaptive, as k-diffusion's sample_dpm_fast/adaptive.

Time is t = -log sigma; eps = (x - D(x; sigma)) / sigma. The adaptive solver's PID step-size
controller runs in a lax.while_loop.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from edm_jax.samplers.core import ancestral_step, call, is_zero, prepare, resolve_noise

Array = jax.Array


def _sigma(t):
    return jnp.exp(-t)


def _t(sigma):
    return -jnp.log(sigma)


def _eps(denoise, x, t):
    return (x - call(denoise, x, _sigma(t))) / _sigma(t)


def _step1(denoise, x, t, t_next, eps):
    h = t_next - t
    return x - _sigma(t_next) * jnp.expm1(h) * eps


def _step2(denoise, x, t, t_next, eps, r1=0.5):
    h = t_next - t
    s1 = t + r1 * h
    u1 = x - _sigma(s1) * jnp.expm1(r1 * h) * eps
    eps_r1 = _eps(denoise, u1, s1)
    return (
        x
        - _sigma(t_next) * jnp.expm1(h) * eps
        - _sigma(t_next) / (2 * r1) * jnp.expm1(h) * (eps_r1 - eps)
    )


def _step3(denoise, x, t, t_next, eps, r1=1 / 3, r2=2 / 3):
    h = t_next - t
    s1, s2 = t + r1 * h, t + r2 * h
    u1 = x - _sigma(s1) * jnp.expm1(r1 * h) * eps
    eps_r1 = _eps(denoise, u1, s1)
    u2 = (
        x
        - _sigma(s2) * jnp.expm1(r2 * h) * eps
        - _sigma(s2) * (r2 / r1) * (jnp.expm1(r2 * h) / (r2 * h) - 1) * (eps_r1 - eps)
    )
    eps_r2 = _eps(denoise, u2, s2)
    return (
        x
        - _sigma(t_next) * jnp.expm1(h) * eps
        - _sigma(t_next) / r2 * (jnp.expm1(h) / h - 1) * (eps_r2 - eps)
    )


_STEPS = {1: _step1, 2: _step2, 3: _step3}


def _check_range(sigma_min, sigma_max):
    for name, v in (("sigma_min", sigma_min), ("sigma_max", sigma_max)):
        try:
            bad = float(v) <= 0
        except (TypeError, jax.errors.ConcretizationTypeError):
            bad = False
        if bad:
            raise ValueError(f"{name} must be > 0 for DPM-Solver, got {v!r}")


def _noisy_target(t, t_next, t_end, eta):
    """Ancestral split in t: (t_next_, su) as DPM-Solver with eta > 0."""
    sd, su = ancestral_step(_sigma(t), _sigma(t_next), eta)
    t_next_ = jnp.minimum(t_end, _t(sd))
    return t_next_, jnp.sqrt(jnp.maximum(_sigma(t_next) ** 2 - _sigma(t_next_) ** 2, 0.0))


def sample_dpm_fast(
    denoise, x, sigma_min, sigma_max, n, *, rng=None, noise_sampler=None, eta=0.0, s_noise=1.0
):
    """DPM-Solver-Fast: n evaluations as 3rd-order steps then a 2nd/1st-order tail, t uniform."""
    _check_range(sigma_min, sigma_max)
    if not isinstance(n, int) or n < 1:
        raise ValueError(f"n (number of evaluations) must be an int >= 1, got {n!r}")
    x, _ = prepare(x, jnp.array([1.0, 0.0]))
    noise = None if is_zero(eta) else resolve_noise(noise_sampler, rng, x, "dpm_fast")
    t_start, t_end = _t(jnp.asarray(sigma_max, x.dtype)), _t(jnp.asarray(sigma_min, x.dtype))
    m = n // 3 + 1
    ts = jnp.linspace(t_start, t_end, m + 1)
    orders = [3] * (m - 2) + [2, 1] if n % 3 == 0 else [3] * (m - 1) + [n % 3]
    n3 = sum(1 for o in orders if o == 3)  # the leading run of 3rd-order steps

    def one(x, i, order):
        t, t_next = ts[i], ts[i + 1]
        if noise is not None:
            t_next_, su = _noisy_target(t, t_next, t_end, eta)
        else:
            t_next_, su = t_next, 0.0
        x = _STEPS[order](denoise, x, t, t_next_, _eps(denoise, x, t))
        if noise is not None:
            x = x + su * s_noise * noise(_sigma(t), _sigma(t_next))
        return x

    x, _ = jax.lax.scan(lambda x, i: (one(x, i, 3), None), x, jnp.arange(n3))
    for k, order in enumerate(orders[n3:]):  # at most two tail steps of lower order
        x = one(x, n3 + k, order)
    return x


def sample_dpm_adaptive(
    denoise,
    x,
    sigma_min,
    sigma_max,
    *,
    rng=None,
    noise_sampler=None,
    order=3,
    rtol=0.05,
    atol=0.0078,
    h_init=0.05,
    pcoeff=0.0,
    icoeff=1.0,
    dcoeff=0.0,
    accept_safety=0.81,
    eta=0.0,
    s_noise=1.0,
    max_steps=10_000,
    return_info=False,
):
    """DPM-Solver-12/23 with PID step-size control (Lu et al. 2022), one lax.while_loop."""
    _check_range(sigma_min, sigma_max)
    if order not in (2, 3):
        raise ValueError(f"order must be 2 or 3, got {order!r}")
    x, _ = prepare(x, jnp.array([1.0, 0.0]))
    noise = None if is_zero(eta) else resolve_noise(noise_sampler, rng, x, "dpm_adaptive")
    dt = x.dtype
    t_start, t_end = _t(jnp.asarray(sigma_max, dt)), _t(jnp.asarray(sigma_min, dt))
    ctrl_order = 1.5 if noise is not None else order
    b1 = (pcoeff + icoeff + dcoeff) / ctrl_order
    b2 = -(pcoeff + 2 * dcoeff) / ctrl_order
    b3 = dcoeff / ctrl_order

    def attempt(state):
        x, x_prev, s, h = state["x"], state["x_prev"], state["s"], state["h"]
        t = jnp.minimum(t_end, s + h)
        t_, su = _noisy_target(s, t, t_end, eta) if noise is not None else (t, 0.0)
        eps = _eps(denoise, x, s)
        if order == 2:
            x_low, x_high = _step1(denoise, x, s, t_, eps), _step2(denoise, x, s, t_, eps)
        else:
            x_low, x_high = _step2(denoise, x, s, t_, eps, r1=1 / 3), _step3(denoise, x, s, t_, eps)
        delta = jnp.maximum(atol, rtol * jnp.maximum(jnp.abs(x_low), jnp.abs(x_prev)))
        error = jnp.linalg.norm(((x_low - x_high) / delta).ravel()) / math.sqrt(x.size)
        return t, su, x_low, x_high, error

    def body(state):
        t, su, x_low, x_high, error = attempt(state)
        inv = 1 / (error + 1e-8)
        errs = jnp.where(state["first"], jnp.full(3, inv), state["errs"]).at[0].set(inv)
        factor = errs[0] ** b1 * errs[1] ** b2 * errs[2] ** b3
        factor = 1 + jnp.arctan(factor - 1)
        accept = factor >= accept_safety
        x_new = x_high
        if noise is not None:
            x_new = x_new + su * s_noise * noise(_sigma(state["s"]), _sigma(t))
        keep = lambda a, b: jnp.where(accept, a, b)  # noqa: E731
        return {
            "x": keep(x_new, state["x"]),
            "x_prev": keep(x_low, state["x_prev"]),
            "s": keep(t, state["s"]),
            "h": state["h"] * factor,
            "errs": keep(jnp.stack([errs[0], errs[0], errs[1]]), errs),
            "first": jnp.array(False),
            "n_accept": state["n_accept"] + accept,
            "n_reject": state["n_reject"] + (1 - accept),
            "steps": state["steps"] + 1,
        }

    state = {
        "x": x,
        "x_prev": x,
        "s": t_start,
        "h": jnp.asarray(abs(h_init), dt),
        "errs": jnp.ones(3, dt),
        "first": jnp.array(True),
        "n_accept": jnp.array(0),
        "n_reject": jnp.array(0),
        "steps": jnp.array(0),
    }
    cond = lambda st: (st["s"] < t_end - 1e-5) & (st["steps"] < max_steps)  # noqa: E731
    state = jax.lax.while_loop(cond, body, state)
    if not return_info:
        return state["x"]
    info = {k: state[k] for k in ("steps", "n_accept", "n_reject")}
    info["nfe"] = state["steps"] * order
    return state["x"], info
