"""DPM-Solver (Lu et al. 2022) fast and adaptive, as k-diffusion's sample_dpm_fast/adaptive.

Time is t = -log sigma; eps = (x - D(x; sigma)) / sigma. As in k-diffusion (which builds its
times from ``torch.tensor(sigma)``), the time grid and every step coefficient are float32
scalars whatever x's dtype, so float64 runs agree with it to rounding. Float32 exp/log/expm1
are rounded from float64 when x64 is on (correctly rounded, as glibc's). The adaptive
solver's PID step-size controller runs in one lax.while_loop.
Both take a sigma range, not a grid, so they keep k-diffusion's own signatures rather than
``declare``'s (``SAMPLER_INFO`` reads their options from those signatures).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from edm_jax.checks import check_range
from edm_jax.samplers.core import ancestral_step, call, emit, is_zero, prepare, with_extra_args
from edm_jax.samplers.noise import resolve_noise

Array = jax.Array
F32 = jnp.float32


def _round32(fn, v) -> Array:
    """fn(v) as a float32 scalar, computed in float64 when x64 is on.

    reduce_precision rounds to float32 where XLA would otherwise fold the conversions away
    and fuse a product into the next addition (an FMA, which k-diffusion's torch does not do).
    """
    wide = jax.dtypes.canonicalize_dtype(jnp.float64)
    y = fn(jnp.asarray(v, F32).astype(wide))
    return jax.lax.reduce_precision(y, exponent_bits=8, mantissa_bits=23).astype(F32)


def _div32(a, b) -> Array:
    """a / b rounded to float32 (XLA turns division by a constant into an inexact product)."""
    return _round32(lambda u: u / jnp.asarray(b, F32).astype(u.dtype), a)


def _mul32(a, b) -> Array:
    """a * b rounded to float32 on its own, so XLA cannot fuse it into a following add (FMA)."""
    return _round32(lambda u: u * jnp.asarray(b, F32).astype(u.dtype), a)


def _sigma(t) -> Array:
    return _round32(lambda u: jnp.exp(-u), t)


def _t(sigma) -> Array:
    return _round32(lambda s: -jnp.log(s), sigma)


def _expm1(v) -> Array:
    return _round32(jnp.expm1, v)


def _eps(denoise, x, t) -> Array:
    """eps(x; t) = (x - D(x; sigma(t))) / sigma(t) (DPM-Solver's noise prediction)."""
    sigma = _sigma(t)
    return (x - call(denoise, x, sigma)) / sigma.astype(x.dtype)


def _step1(denoise, x, t, t_next, eps) -> Array:
    """DPM-Solver-1 (Lu et al. eq. 3.6): a DDIM step in t."""
    h = t_next - t
    return x - (_sigma(t_next) * _expm1(h)) * eps


def _eps_r1(denoise, x, t, h, eps, r1) -> Array:
    """eps at s1 = t + r1 h after a first-order step there (the inner stage of Algs. 4-5)."""
    r1h = _mul32(h, r1)
    s1 = t + r1h
    return _eps(denoise, x - (_sigma(s1) * _expm1(r1h)) * eps, s1)


def _eps_r2(denoise, x, t, h, eps, eps_r1, r1=1 / 3, r2=2 / 3) -> Array:
    """eps at s2 = t + r2 h after DPM-Solver-3's second stage (Lu et al. Algorithm 5)."""
    r2h = _mul32(h, r2)
    s2 = t + r2h
    c2 = (_sigma(s2) * F32(r2 / r1)) * (_expm1(r2h) / r2h - 1)
    u2 = x - (_sigma(s2) * _expm1(r2h)) * eps - c2 * (eps_r1 - eps)
    return _eps(denoise, u2, s2)


def _corr2(t_next, h, r1) -> Array:
    """DPM-Solver-2's coefficient of (eps_r1 - eps)."""
    return _div32(_sigma(t_next), 2 * r1) * _expm1(h)


def _corr3(t_next, h, r2=2 / 3) -> Array:
    """DPM-Solver-3's coefficient of (eps_r2 - eps)."""
    return _div32(_sigma(t_next), r2) * (_expm1(h) / h - 1)


def _step2(denoise, x, t, t_next, eps, r1=0.5) -> Array:
    """DPM-Solver-2 (Lu et al. Algorithm 4) with intermediate time t + r1 h."""
    h = t_next - t
    eps_r1 = _eps_r1(denoise, x, t, h, eps, r1)
    return _step1(denoise, x, t, t_next, eps) - _corr2(t_next, h, r1) * (eps_r1 - eps)


def _step3(denoise, x, t, t_next, eps) -> Array:
    """DPM-Solver-3 (Lu et al. Algorithm 5) with intermediate times t + h/3, t + 2h/3."""
    h = t_next - t
    eps_r1 = _eps_r1(denoise, x, t, h, eps, 1 / 3)
    eps_r2 = _eps_r2(denoise, x, t, h, eps, eps_r1)
    return _step1(denoise, x, t, t_next, eps) - _corr3(t_next, h) * (eps_r2 - eps)


_STEPS = {1: _step1, 2: _step2, 3: _step3}


def _time_range(sigma_min, sigma_max) -> tuple[Array, Array]:
    """(t_start, t_end) = (-log sigma_max, -log sigma_min) as float32 scalars."""
    return _t(jnp.asarray(sigma_max, F32)), _t(jnp.asarray(sigma_min, F32))


def _linspace32(start: Array, end: Array, num: int) -> Array:
    """torch.linspace in float32: start + step i on the first half, end - step (num-1-i) after."""
    step = _div32(end - start, num - 1)
    idx = jnp.arange(num)
    head = start + _mul32(step, idx)
    tail = end - _mul32(step, num - 1 - idx)
    return jnp.where(idx < num // 2, head, tail)


def _noisy_target(t, t_next, t_end, eta) -> tuple[Array, Array]:
    """Ancestral split in t: (t_next_, su) as DPM-Solver with eta > 0."""
    sd, _ = ancestral_step(_sigma(t), _sigma(t_next), eta)
    t_next_ = jnp.minimum(t_end, _t(sd))
    return t_next_, jnp.sqrt(jnp.maximum(_sigma(t_next) ** 2 - _sigma(t_next_) ** 2, 0.0))


def _fast_orders(n: int) -> list[int]:
    """DPM-Solver-Fast's order per step for n evaluations (Lu et al. Sec. 3.4)."""
    m = n // 3 + 1
    return [3] * (m - 2) + [2, 1] if n % 3 == 0 else [3] * (m - 1) + [n % 3]


def sample_dpm_fast(
    denoise,
    x,
    sigma_min,
    sigma_max,
    n,
    *,
    rng=None,
    noise_sampler=None,
    eta=0.0,
    s_noise=1.0,
    extra_args=None,
    callback=None,
    disable=None,
):
    """DPM-Solver-Fast: n evaluations as 3rd-order steps then a 2nd/1st-order tail, t uniform."""
    check_range(sigma_min, sigma_max)
    if not isinstance(n, int) or n < 1:
        raise ValueError(f"n (number of evaluations) must be an int >= 1, got {n!r}")
    x, _ = prepare(x, jnp.array([1.0, 0.0]))
    denoise = with_extra_args(denoise, extra_args)
    noise = None if is_zero(eta) else resolve_noise(noise_sampler, rng, x, "dpm_fast")
    t_start, t_end = _time_range(sigma_min, sigma_max)
    orders = _fast_orders(n)
    ts = _linspace32(t_start, t_end, len(orders) + 1)
    n3 = sum(1 for o in orders if o == 3)  # the leading run of 3rd-order steps

    def one(x, i, order):
        t, t_next = ts[i], ts[i + 1]
        t_next_, su = _noisy_target(t, t_next, t_end, eta) if noise else (t_next, 0.0)
        eps = _eps(denoise, x, t)
        if callback is not None:  # k-diffusion's info: sigma_hat = sigma(t)
            sigma = _sigma(t)
            denoised = x - sigma.astype(x.dtype) * eps
            emit(
                callback, {"x": x, "i": i, "sigma": sigma, "sigma_hat": sigma, "denoised": denoised}
            )
        x = _STEPS[order](denoise, x, t, t_next_, eps)
        if noise is not None:
            x = x + (su * s_noise) * noise(_sigma(t), _sigma(t_next))
        return x

    x, _ = jax.lax.scan(lambda x, i: (one(x, i, 3), None), x, jnp.arange(n3))
    for k, order in enumerate(orders[n3:]):  # at most two tail steps of lower order
        x = one(x, n3 + k, order)
    return x


# --------------------------------------------------------------------------- adaptive


def _pid_factor(errs: Array, b: tuple[float, float, float]) -> Array:
    """PID step-size factor with k-diffusion's arctan limiter (Söderlind 2003)."""
    factor = errs[0] ** b[0] * errs[1] ** b[1] * errs[2] ** b[2]
    return 1 + jnp.arctan(factor - 1)


def _embedded_pair(denoise, x, s, t_, order, eps) -> tuple[Array, Array, Array]:
    """(x_low, x_high, x_low - x_high): DPM-Solver-12 or -23 from s to t_, eps = eps(x; s).

    The pair shares its evaluations as k-diffusion's eps cache does; the difference is
    formed from the correction terms, free of the cancellation of x_low - x_high.
    """
    h = t_ - s
    base = _step1(denoise, x, s, t_, eps)
    r1 = 0.5 if order == 2 else 1 / 3
    eps_r1 = _eps_r1(denoise, x, s, h, eps, r1)
    corr_low = _corr2(t_, h, r1) * (eps_r1 - eps)
    if order == 2:
        return base, base - corr_low, corr_low
    corr_high = _corr3(t_, h) * (_eps_r2(denoise, x, s, h, eps, eps_r1) - eps)
    return base - corr_low, base - corr_high, corr_high - corr_low


def _scaled_error(x_low, diff, x_prev, rtol, atol) -> Array:
    """RMS of (x_low - x_high) / max(atol, rtol max(|x_low|, |x_prev|))."""
    delta = jnp.maximum(atol, rtol * jnp.maximum(jnp.abs(x_low), jnp.abs(x_prev)))
    return jnp.linalg.norm((diff / delta).ravel()) / math.sqrt(x_low.size)


def _adaptive_body(denoise, noise, opts: dict, callback=None):
    """One attempted step of the adaptive solver: propose, estimate, accept or reject."""
    order, t_end, eta = opts["order"], opts["t_end"], opts["eta"]

    def body(st: dict) -> dict:
        s = st["s"]
        t = jnp.minimum(t_end, s + st["h"].astype(F32))
        t_, su = _noisy_target(s, t, t_end, eta) if noise else (t, 0.0)
        eps = _eps(denoise, st["x"], s)
        x_low, x_high, diff = _embedded_pair(denoise, st["x"], s, t_, order, eps)
        error = _scaled_error(x_low, diff, st["x_prev"], opts["rtol"], opts["atol"])
        inv = 1 / (error.astype(st["h"].dtype) + 1e-8)
        errs = jnp.where(st["first"], jnp.full(3, inv), st["errs"]).at[0].set(inv)
        factor = _pid_factor(errs, opts["b"])
        accept = factor >= opts["accept_safety"]
        if noise is not None:
            x_high = x_high + (su * opts["s_noise"]) * noise(_sigma(s), _sigma(t))
        keep = lambda a, b: jnp.where(accept, a, b)  # noqa: E731
        if callback is not None:  # k-diffusion's info after each attempted step
            sigma = _sigma(s)
            denoised = st["x"] - sigma.astype(eps.dtype) * eps
            info = {"x": keep(x_high, st["x"]), "i": st["steps"], "sigma": sigma}
            emit(callback, info | {"sigma_hat": sigma, "denoised": denoised, "error": error})
        return {
            "x": keep(x_high, st["x"]),
            "x_prev": keep(x_low, st["x_prev"]),
            "s": keep(t, s),
            "h": st["h"] * factor,
            "errs": keep(jnp.stack([errs[0], errs[0], errs[1]]), errs),
            "first": jnp.array(False),
            "n_accept": st["n_accept"] + accept,
            "n_reject": st["n_reject"] + (1 - accept),
            "steps": st["steps"] + 1,
        }

    return body


def _adaptive_init(x, t_start, h_init) -> dict:
    """The while_loop state: x, x_prev, time s, step h, PID error history and counters."""
    zero = jnp.array(0)
    return {
        "x": x,
        "x_prev": x,
        "s": t_start,
        "h": jnp.asarray(abs(h_init), x.dtype),
        "errs": jnp.ones(3, x.dtype),
        "first": jnp.array(True),
        **{"n_accept": zero, "n_reject": zero, "steps": zero},
    }


def _controller_gains(pcoeff, icoeff, dcoeff, ctrl_order) -> tuple[float, float, float]:
    b1 = (pcoeff + icoeff + dcoeff) / ctrl_order
    return b1, -(pcoeff + 2 * dcoeff) / ctrl_order, dcoeff / ctrl_order


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
    extra_args=None,
    callback=None,
    disable=None,
):
    """DPM-Solver-12/23 with PID step-size control (Lu et al. 2022), one lax.while_loop."""
    check_range(sigma_min, sigma_max)
    if order not in (2, 3):
        raise ValueError(f"order must be 2 or 3, got {order!r}")
    x, _ = prepare(x, jnp.array([1.0, 0.0]))
    denoise = with_extra_args(denoise, extra_args)
    noise = None if is_zero(eta) else resolve_noise(noise_sampler, rng, x, "dpm_adaptive")
    t_start, t_end = _time_range(sigma_min, sigma_max)
    opts = {
        "order": order,
        "t_end": t_end,
        "eta": eta,
        "s_noise": s_noise,
        "accept_safety": accept_safety,
        "rtol": jnp.asarray(rtol, F32).astype(x.dtype),  # k-diffusion: torch.tensor(rtol)
        "atol": jnp.asarray(atol, F32).astype(x.dtype),
        "b": _controller_gains(pcoeff, icoeff, dcoeff, 1.5 if noise is not None else order),
    }
    state = _adaptive_init(x, t_start, h_init)
    cond = lambda st: (st["s"] < t_end - F32(1e-5)) & (st["steps"] < max_steps)  # noqa: E731
    state = jax.lax.while_loop(cond, _adaptive_body(denoise, noise, opts, callback), state)
    if not return_info:
        return state["x"]
    info = {k: state[k] for k in ("steps", "n_accept", "n_reject")}
    info["nfe"] = state["steps"] * order
    return state["x"], info
