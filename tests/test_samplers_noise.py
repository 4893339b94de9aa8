"""The Brownian-tree noise contract: one path W(sigma) per seed, whatever the grid and batch."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from edm_jax import analytic, samplers, schedules
from edm_jax.samplers import noise

MEAN, STD = 0.3, 0.5
N = 4000  # samples for the moment checks
TOL = 5 / np.sqrt(N)


def _w_differences(key, n, grid, table=True):
    """W(grid[i+1]) - W(grid[i]) per sample, [n, len(grid) - 1], read from the table or walked."""

    @jax.jit
    def run(grid):
        x = jnp.zeros((n, 1))
        ns = samplers.brownian_noise_sampler(key, x, 0.002, 80.0, grid=grid if table else None)
        steps = jax.vmap(ns, out_axes=1)(grid[:-1], grid[1:])[..., 0]  # [n, K - 1]
        return steps * jnp.sqrt(jnp.abs(jnp.diff(grid)))

    return np.asarray(run(jnp.asarray(grid)))


def test_node_normals_are_standard_and_uncorrelated():
    z = np.asarray(
        noise._node_normals(jnp.array([7, 9], jnp.uint32), jnp.arange(64), (512,), jnp.float32)
    )
    assert abs(z.mean()) < 5 / np.sqrt(z.size) and abs(z.var() - 1) < 10 / np.sqrt(z.size)
    assert abs(np.mean(z**4) - 3) < 0.1  # Gaussian kurtosis
    for a, b in [(z[:-1], z[1:]), (z[:, :-1], z[:, 1:])]:  # neighbouring nodes and elements
        assert abs(np.corrcoef(a.ravel(), b.ravel())[0, 1]) < 5 / np.sqrt(a.size)


def test_table_increments_have_the_right_variance():
    grid = jnp.asarray([80.0, 79.0, 4.0, 1.0, 0.5, 0.4999, 0.0021, 0.002])
    steps = _w_differences(jax.random.key(1), N, grid).T / np.sqrt(-np.diff(grid))[:, None]
    assert np.all(np.abs(steps.mean(1)) < TOL)
    assert np.all(np.abs(steps.var(1) - 1) < 2 * np.sqrt(2) * TOL), steps.var(1)
    corr = np.corrcoef(steps)[np.triu_indices(7, 1)]  # disjoint increments: independent
    assert np.all(np.abs(corr) < TOL)


def test_grids_sharing_points_see_the_same_path():
    """W read from the tables of a 5-step and a 10-step grid, and walked, agree."""
    coarse = schedules.karras(6, 0.002, 80.0)[:-1]
    fine = jnp.sort(jnp.concatenate([coarse, noise.sde_midpoints(coarse, 0.5)]))[::-1]
    key, n = jax.random.key(2), 32
    w_coarse, w_fine = _w_differences(key, n, coarse), _w_differences(key, n, fine)
    np.testing.assert_allclose(w_fine[:, 0::2] + w_fine[:, 1::2], w_coarse, atol=2e-5)
    np.testing.assert_allclose(_w_differences(key, n, fine, table=False), w_fine, atol=2e-5)


@pytest.fixture(scope="module")
def sde_runs():
    """SDE samplers on a batch of 16 and on its first sample alone, default (table) noise."""
    x = 80.0 * jax.random.normal(jax.random.key(4), (16, 2, 2, 1))
    sigmas = schedules.karras(8, 0.002, 80.0)
    denoise = analytic.gaussian_denoiser(MEAN, STD)
    out = {}
    for name in ["dpmpp_sde", "dpmpp_2m_sde"]:
        fn = jax.jit(
            lambda x, name=name: samplers.SAMPLERS[name](denoise, x, sigmas, rng=jax.random.key(5))
        )
        out[name] = (fn(x), fn(x[:1]) if name == "dpmpp_2m_sde" else None)

    @jax.jit
    def walked(x):  # dpmpp_sde walking the tree on every call: the table must read the same W
        walk = samplers.brownian_noise_sampler(jax.random.key(5), x, sigmas[-2], sigmas[0])
        return samplers.sample_dpmpp_sde(denoise, x, sigmas, noise_sampler=walk)

    return out, walked(x)


def test_dpmpp_2m_sde_is_batch_invariant(sde_runs):
    """A seed's path is the same in a batch of 16 and alone (k-diffusion's contract)."""
    big, one = sde_runs[0]["dpmpp_2m_sde"]
    np.testing.assert_allclose(big[:1], one, rtol=1e-5, atol=1e-6)
    assert not np.allclose(big[0], big[1])


def test_dpmpp_sde_reads_its_stage_sigmas_from_the_table(sde_runs):
    np.testing.assert_allclose(sde_runs[0]["dpmpp_sde"][0], sde_runs[1], rtol=1e-4, atol=1e-4)


def test_brownian_path_keeps_float32_under_x64():
    """With jax_enable_x64 on, a float32 tree walk stays float32 (its scan carry once turned
    float64 there and dpmpp_sde / 2m_sde / 3m_sde failed) and gives the x64-off values."""
    args = (jnp.float32(0.7), jnp.float32(0.02), jnp.float32(80.0), 6)
    want = [np.asarray(a) for a in noise._path(*args)]
    previous = jax.config.jax_enable_x64
    jax.config.update("jax_enable_x64", True)
    try:
        heap, coef = noise._path(*args)
    finally:
        jax.config.update("jax_enable_x64", previous)
    assert coef.dtype == jnp.float32
    np.testing.assert_array_equal(np.asarray(heap), want[0])
    np.testing.assert_allclose(np.asarray(coef), want[1], rtol=1e-6)
