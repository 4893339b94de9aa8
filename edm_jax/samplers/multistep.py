"""Few-step multistep solvers past k-diffusion: iPNDM and UniPC-bh2.

iPNDM (Zhang & Chen 2023; Zhou et al. 2024): Adams-Bashforth on dx/dsigma with the fixed
coefficients of orders 1-4, warming up from order 1. UniPC (Zhao et al. 2023): the unified
predictor-corrector in data-prediction form with B(h) = e^h - 1 ('bh2'); the corrector's
model evaluation is reused by the next step, so N steps cost N evaluations.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from edm_jax.samplers.core import call, to_d
from edm_jax.samplers.declare import declare

Array = jax.Array

_AB = (
    (1.0,),
    (3 / 2, -1 / 2),
    (23 / 12, -16 / 12, 5 / 12),
    (55 / 24, -59 / 24, 37 / 24, -9 / 24),
)


def _check_order(name):
    def check(options) -> None:
        if options["order"] not in (1, 2, 3, 4):
            raise ValueError(f"{name} order must be 1, 2, 3 or 4, got {options['order']!r}")

    return check


@declare("ipndm", {"order": 4}, check=_check_order("ipndm"))
def sample_ipndm(denoise, x, sigmas, noise, *, order):
    """Improved PNDM: Adams-Bashforth of order min(i + 1, order) on the EDM ODE (order <= 4)."""
    table = jnp.zeros((4, 4), x.dtype)
    for k, row in enumerate(_AB):
        table = table.at[k, : len(row)].set(jnp.asarray(row, x.dtype))

    def step(carry, i):
        x, ds = carry
        denoised = call(denoise, x, sigmas[i])
        ds = jnp.concatenate([to_d(x, sigmas[i], denoised)[None], ds[:-1]])  # newest first
        coeffs = table[jnp.minimum(i, order - 1), :order]
        x_new = x + (sigmas[i + 1] - sigmas[i]) * jnp.tensordot(coeffs, ds, axes=1)
        return (x_new, ds), (x, denoised)

    return step, (x, jnp.zeros((order,) + x.shape, x.dtype))


def _unipc_coefficients(h, rks, k):
    """R [k,k] and b [k] of UniPC-bh2 for order k (rks[-1] = 1), data prediction."""
    hh = -h
    h_phi_1 = jnp.expm1(hh)
    h_phi_k = h_phi_1 / hh - 1
    B_h = jnp.expm1(hh)
    rows, b, fact = [], [], 1.0
    for i in range(1, k + 1):
        rows.append(rks ** (i - 1))
        b.append(h_phi_k * fact / B_h)
        fact *= i + 1
        h_phi_k = h_phi_k / hh - 1 / fact
    return jnp.stack(rows), jnp.stack(b), h_phi_1, B_h


def _unipc_update(denoise, x, models, lams, sigma, sigma_next, k):
    """One UniPC step of order k from sigma to sigma_next: predictor, evaluation, corrector."""
    lam_t = -jnp.log(sigma_next)
    h = lam_t - lams[0]
    rks = jnp.concatenate([(lams[1:k] - lams[0]) / h, jnp.ones([1], h.dtype)])  # [k]
    D1s = [(models[j] - models[0]) / rks[j - 1] for j in range(1, k)]
    R, b, h_phi_1, B_h = _unipc_coefficients(h, rks, k)
    x_t_ = sigma_next / sigma * x - h_phi_1 * models[0]
    if k == 1:
        pred_res = 0.0
    else:
        rhos_p = jnp.array([0.5], h.dtype) if k == 2 else jnp.linalg.solve(R[:-1, :-1], b[:-1])
        pred_res = sum(rhos_p[j] * D1s[j] for j in range(k - 1))
    x_t = x_t_ - B_h * pred_res
    model_t = call(denoise, x_t, sigma_next)
    rhos_c = jnp.array([0.5], h.dtype) if k == 1 else jnp.linalg.solve(R, b)
    corr_res = sum((rhos_c[j] * D1s[j] for j in range(k - 1)), start=jnp.zeros_like(x))
    x_t = x_t_ - B_h * (corr_res + rhos_c[-1] * (model_t - models[0]))
    return x_t, model_t


@declare("unipc", {"order": 3, "lower_order_final": True}, check=_check_order("unipc"))
def sample_unipc(denoise, x, sigmas, noise, *, order, lower_order_final):
    """UniPC-bh2 multistep predictor-corrector (data prediction), order warm-up, N NFE.

    ``lower_order_final`` lowers the order of the last steps (to 1 at the last positive
    step) only on grids of fewer than 10 positive steps, as DPM-Solver's reference does.
    The UniPC reference and diffusers' UniPCMultistepScheduler lower it at any step count,
    so at 10+ steps their last steps are of lower order than ours (ours keeps ``order``).
    """
    n = sigmas.shape[0] - 1
    models = jnp.zeros((order,) + x.shape, x.dtype).at[0].set(call(denoise, x, sigmas[0]))
    lams = jnp.zeros([order], x.dtype).at[0].set(-jnp.log(sigmas[0]))

    def positive_step(x, models, lams, i):
        k = jnp.minimum(order, i + 1)
        if lower_order_final and n - 1 < 10:
            k = jnp.maximum(jnp.minimum(k, n - 1 - i), 1)
        branches = [
            (
                lambda kk: (
                    lambda: _unipc_update(denoise, x, models, lams, sigmas[i], sigmas[i + 1], kk)
                )
            )(kk)
            for kk in range(1, order + 1)
        ]
        x_new, model_new = jax.lax.switch(k - 1, branches)
        models = jnp.concatenate([model_new[None], models[:-1]])
        lams = jnp.concatenate([-jnp.log(sigmas[i + 1])[None], lams[:-1]])
        return x_new, models, lams

    def step(carry, i):
        x, models, lams = carry
        denoised = models[0]
        new = jax.lax.cond(
            sigmas[i + 1] > 0,
            lambda: positive_step(x, models, lams, i),
            lambda: (denoised, models, lams),
        )
        return new, (x, denoised)

    return step, (x, models, lams)
