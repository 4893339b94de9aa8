"""Pieces of the sharded step: micro-batch accumulation, FSDP shardings, non-finite grads."""

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from edm_jax.train import step as step_lib


def _loss(rng, params, batch):
    """A deterministic per-example-mean loss (ignores rng), so accumulation must be exact."""
    err = batch["image"].reshape(batch["image"].shape[0], -1) @ params["w"] - batch["label"]
    return jnp.mean(err**2), {}


def test_accumulated_gradient_equals_full_batch_gradient():
    mesh = step_lib.make_mesh()
    x = jax.random.normal(jax.random.key(0), (32, 2, 2, 1))
    batch = {"image": x, "label": jnp.arange(32.0)}
    batch = jax.device_put(batch, step_lib.batch_sharding(mesh))
    params = {"w": jnp.linspace(-1.0, 1.0, 4)}
    rng = jax.random.key(1)

    @jax.jit
    def grads(params, batch):
        one = step_lib._accumulate_grads(_loss, params, batch, rng, 1, mesh)
        four = step_lib._accumulate_grads(_loss, params, batch, rng, 4, mesh)
        return one, four

    (l1, g1, _), (l4, g4, _) = grads(params, batch)  # (loss, grads, micro-batch sq norm)
    np.testing.assert_allclose(l4, l1, rtol=1e-6)
    np.testing.assert_allclose(g4["w"], g1["w"], rtol=1e-5)
    micro = jax.jit(lambda b: step_lib._micro_batches(b, 4, mesh))(batch)
    assert micro["image"].shape == (4, 8, 2, 2, 1)
    np.testing.assert_array_equal(micro["label"][1], np.arange(1.0, 32.0, 4))  # rows a, a+A, ...


def test_fsdp_shards_large_arrays_over_data_axis():
    mesh = step_lib.make_mesh()
    shapes = {
        "big": jax.ShapeDtypeStruct((3, 3, 64, 128), jnp.float32),
        "odd": jax.ShapeDtypeStruct((3, 5, 7, 9), jnp.float32),
        "small": jax.ShapeDtypeStruct((8,), jnp.float32),
        "step": jax.ShapeDtypeStruct((), jnp.int32),
    }
    sh = step_lib.state_sharding(shapes, mesh, fsdp=True, min_size=64)
    assert sh["big"].spec == PartitionSpec(None, None, None, "data")  # largest axis / 8
    assert sh["odd"].spec == PartitionSpec()  # nothing divisible by 8
    assert sh["small"].spec == PartitionSpec() and sh["step"].spec == PartitionSpec()
    rep = step_lib.state_sharding(shapes, mesh, fsdp=False)
    assert all(s == NamedSharding(mesh, PartitionSpec()) for s in jax.tree.leaves(rep))


class _FakeModel:
    """A one-parameter 'network' recording what the loss passes to it."""

    def __init__(self, self_cond=False, label_dim=0):
        self.self_cond, self.label_dim, self.calls = self_cond, label_dim, []

    def init(self, rng):
        return {"a": jnp.asarray(0.5)}

    def prepare_params(self, params):  # the trainable model's hook: nothing to prepare
        return params

    def denoise(self, params, x, sigma, labels=None, augment_labels=None, *, self_cond=None,
                train=False, rng=None):  # fmt: skip
        self.calls.append({"labels": labels, "augment_labels": augment_labels,
                           "self_cond": self_cond, "train": train, "rng": rng})  # fmt: skip
        out = params["a"] * x
        return out if self_cond is None else out + self_cond


def _hp(**train):
    """The step settings of configs/tiny.py with train.* updates."""
    from train_testlib import tiny_config

    config = tiny_config(**{f"train.{k}": v for k, v in train.items()})
    return step_lib.StepConfig.from_config(config)


def test_loss_passes_augment_labels_labels_and_dropout_key():
    model = _FakeModel(label_dim=10)
    loss_fn = step_lib.make_loss_fn(model, _hp(augment_p=0.5))
    batch = {"image": jnp.zeros((4, 8, 8, 1)), "label": jnp.arange(4)}
    loss_fn(jax.random.key(0), {"a": jnp.ones([])}, batch)
    (call,) = model.calls
    assert call["augment_labels"].shape == (4, 9) and call["train"] and call["rng"] is not None
    np.testing.assert_array_equal(call["labels"], np.arange(4))


def test_self_conditioning_feeds_the_first_estimate_on_a_fraction_of_steps():
    params, batch = {"a": jnp.asarray(0.5)}, {"image": jnp.ones((2, 8, 8, 1)), "label": None}
    for prob in (0.0, 1.0):
        model = _FakeModel(self_cond=True)
        step_lib.make_loss_fn(model, _hp(self_cond_prob=prob))(jax.random.key(0), params, batch)
        sc = np.asarray(model.calls[-1]["self_cond"])  # what the trained call saw
        assert sc.shape == (2, 8, 8, 1) and bool(np.all(sc == 0)) == (prob == 0.0)


def test_remat_gives_the_same_gradient():
    model = _FakeModel()
    x, sigma = jnp.linspace(-1, 1, 8).reshape(1, 2, 2, 2), jnp.ones([1])
    grads = []
    for remat in ("none", "dots", "full"):
        denoise = step_lib._denoiser(model, jax.random.key(0), remat)
        f = jax.jit(jax.grad(lambda p: jnp.sum(jnp.sin(denoise(p, x, sigma)) ** 2)))
        grads.append(float(f({"a": jnp.asarray(0.3)})["a"]))
    np.testing.assert_allclose(grads, grads[0], rtol=1e-6)


def test_non_finite_gradients_are_zeroed_like_edm():
    from train_testlib import tiny_config

    config = tiny_config()
    model = _FakeModel()
    mesh = step_lib.make_mesh(jax.devices()[:1])
    from edm_jax.train.state import TrainState, make_optimizer

    params = {"a": jnp.asarray(1.0)}
    tx = make_optimizer(config.optim, 16)
    state = TrainState(jnp.asarray(5, jnp.int32), params, params, (), tx.init(params),
                       jax.random.key_data(jax.random.key(0)))  # fmt: skip
    batch = {"image": jnp.full((16, 8, 8, 1), jnp.nan), "label": jnp.zeros(16, jnp.int32)}
    hp = step_lib.StepConfig.from_config(config)
    new, metrics = jax.jit(step_lib.train_step_fn(model, hp, tx, mesh))(state, batch)
    assert np.isnan(metrics["loss"]) and float(metrics["grad_norm"]) == 0.0
    assert float(new.params["a"]) == 1.0 and int(new.step) == 6


def test_one_optimizer_serves_init_and_step_without_a_config():
    """Trainer's tx makes the state and updates it: plain SGD gives a - lr * grad exactly."""
    import optax

    from edm_jax.losses import LossSpec

    model = _FakeModel()
    hp = step_lib.StepConfig(batch_size=8, loss=LossSpec(weighting="snr"))  # no ConfigDict
    trainer = step_lib.Trainer(model, optax.sgd(0.25), hp)
    state = trainer.init(jax.random.key(0))
    assert jax.tree.structure(state.opt_state) == jax.tree.structure(trainer.tx.init(state.params))
    batch = {"image": jnp.linspace(-1, 1, 8 * 4).reshape(8, 2, 2, 1), "label": None}
    mesh = step_lib.make_mesh(jax.devices()[:1])
    new, metrics = jax.jit(trainer.step_fn(mesh))(state, batch)
    rng = jax.random.fold_in(jax.random.wrap_key_data(state.rng), 0)
    loss_fn = step_lib.make_loss_fn(model, hp)
    grad = jax.grad(lambda p: loss_fn(jax.random.split(rng, 1)[0], p, batch)[0])(state.params)
    np.testing.assert_allclose(new.params["a"], 0.5 - 0.25 * grad["a"], rtol=1e-6)
    assert int(new.step) == 1 and np.isfinite(float(metrics["loss"]))


def test_adam_freezes_buffers():
    """make_optimizer labels buffers by their parameter path, so one tx fits any params tree."""
    from train_testlib import tiny_config

    from edm_jax.nets.model import BUFFER_NAMES
    from edm_jax.train.state import make_optimizer

    buffer = sorted(BUFFER_NAMES)[0]
    tx = make_optimizer(tiny_config().optim, 16)
    params = {"a": jnp.asarray(0.5), "emb": {buffer: jnp.ones(2)}}
    grads = jax.tree.map(jnp.ones_like, params)
    opt = tx.init(params)
    for _ in range(2):  # the lr ramp-up gives lr 0 at count 0
        updates, opt = tx.update(grads, opt, params)
    assert float(updates["a"]) < 0 and not np.any(np.asarray(updates["emb"][buffer]))
