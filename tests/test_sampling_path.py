"""edm_jax.sample is the one sampling path: training grids go through it in bounded batches,
and repeated calls reuse their compiled programs."""

import types

import jax
import numpy as np
from test_api import MODEL, PARAMS, RNG
from train_testlib import ROOT

from edm_jax import api
from edm_jax.train import grid


def test_imagenet64_grid_is_bounded_per_device():
    """The imagenet64 config's grid (1000 classes) plans bounded batches, not 10,000 images."""
    from edm_jax.nets.spec import build_model_from_config
    from edm_jax.train import loop
    from edm_jax.train.config_io import load_config

    config = load_config(str(ROOT / "configs" / "imagenet64.py"))
    source = types.SimpleNamespace(num_classes=1000, resolution=64, channels=3)
    model = build_model_from_config(config, source)  # a module definition: no parameters
    run = types.SimpleNamespace(config=config, model=model)
    sampler = loop._make_sampler(run)  # what the training loop samples its grids with
    assert model.label_dim == 1000
    rows, cols = grid.grid_shape(1000, config.log.sample_grid)
    assert (rows, cols) == (config.log.sample_grid, grid.MAX_GRID_COLS)
    assert sampler.n == rows * cols <= 32 * config.log.sample_grid
    assert sampler.per_device <= grid.MAX_BATCH_PER_DEVICE
    assert sampler.batch_size <= grid.MAX_BATCH_PER_DEVICE * jax.local_device_count()


def test_grid_images_equal_edm_jax_sample_and_repeat_without_compiling(compile_counter):
    """A grid image is edm_jax.sample's image of the same seed and class; a second grid
    and a second sample() call compile nothing (labels drawn at random included)."""
    sampler = grid.make_grid_sampler(MODEL, n=6, steps=4, sampler="euler")
    images = sampler(RNG, PARAMS)  # seed i, class i % 2
    assert images.shape == (6, 2, 2, 1)
    same = api.sample(RNG, PARAMS, MODEL, seeds=[4, 1], labels=[0, 1], sampler="euler",
                      num_steps=4)  # fmt: skip
    np.testing.assert_allclose(images[[4, 1]], same, atol=1e-6)
    kw = dict(seeds=range(5), sampler="euler_ancestral", num_steps=3)
    first = api.sample(RNG, PARAMS, MODEL, **kw)  # random labels: class_labels() runs
    before = compile_counter()
    assert before > 0  # the counter sees the first calls' compilations
    np.testing.assert_array_equal(api.sample(RNG, PARAMS, MODEL, **kw), first)
    np.testing.assert_array_equal(sampler(RNG, PARAMS), images)
    assert compile_counter() - before == 0


def test_tile_images_quantises_as_to_uint8():
    x = np.linspace(-1.2, 1.2, 2 * 4 * 4).reshape(2, 4, 4, 1).astype(np.float32)
    tiled = grid.tile_images(x, cols=2, min_tile=4)
    np.testing.assert_array_equal(tiled[:, :4, 0], api.to_uint8(x[0])[..., 0])
    # NVlabs: floor(x * 127.5 + 128) clipped, so 0 -> 128 and -0.5 -> 64
    assert grid.tile_images(np.array([0.0, -0.5]).reshape(2, 1, 1, 1), 2, 1).ravel().tolist() == [
        128, 64,
    ]  # fmt: skip
