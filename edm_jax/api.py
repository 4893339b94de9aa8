"""User-facing sampling: ``sample(rng, params, model, ...)`` and ``load(workdir_or_checkpoint)``.

Every seed gets its own keys, ``fold_in(rng, seed)``, for its initial noise, its class
label (when drawn at random) and every stochastic step, so a seed's image does not depend
on the batch it is drawn in (as NVlabs/edm ``generate.py``). Batches are padded to one
shape, compiled once, and split over the local devices along the batch axis.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import math
import os
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from edm_jax import guidance, schedules

Array = jax.Array

__all__ = [
    "check_sample_args", "class_labels", "image_grid", "load", "sample", "sampler_names", "to_uint8",
]  # fmt: skip

# Options that change what a sampler returns: sample() returns images only.
_UNSUPPORTED_OPTIONS = ("return_trajectory", "return_info", "rng", "noise_sampler")
_KEY_INIT, _KEY_LABEL, _KEY_NOISE = 0, 1, 2


def _samplers() -> dict[str, Callable]:
    from edm_jax.samplers import SAMPLERS  # imported late: the samplers package is heavy

    return SAMPLERS


def sampler_names() -> list[str]:
    """Names accepted by ``sample(..., sampler=name)``."""
    return sorted(_samplers())


def _check_sampler(name: str, options: dict) -> Callable:
    """The sampler function, after checking its name and option names."""
    table = _samplers()
    if name not in table:
        raise ValueError(f"unknown sampler {name!r}; valid: {sorted(table)}")
    fn = table[name]
    fixed = sorted(set(options) & set(_UNSUPPORTED_OPTIONS))
    if fixed:
        raise ValueError(f"sample() sets {fixed} itself (per-seed noise, images out); drop them")
    params = inspect.signature(fn).parameters
    if not any(p.kind is p.VAR_KEYWORD for p in params.values()):
        valid = [k for k, p in params.items() if p.kind is p.KEYWORD_ONLY]
        bad = sorted(set(options) - set(valid))
        if bad:
            raise ValueError(f"sampler {name!r} has no options {bad}; valid: {sorted(valid)}")
    return fn


def _resolve_seeds(num_samples: int | None, seeds) -> np.ndarray:
    """The seeds [N] (int64): ``seeds`` as given, or 0..num_samples-1."""
    if (num_samples is None) == (seeds is None):
        raise ValueError("give exactly one of num_samples or seeds")
    if seeds is None:
        if (
            isinstance(num_samples, bool)
            or not isinstance(num_samples, (int, np.integer))
            or num_samples < 1
        ):
            raise ValueError(f"num_samples must be an int >= 1, got {num_samples!r}")
        return np.arange(num_samples, dtype=np.int64)
    seeds = np.asarray(seeds)
    if seeds.ndim != 1 or seeds.size == 0 or seeds.dtype.kind not in "iu" or np.any(seeds < 0):
        raise ValueError(f"seeds must be a non-empty 1-D list of ints >= 0, got {seeds!r}")
    return seeds.astype(np.int64)


def _resolve_labels(labels, n: int, label_dim: int, cfg_scale: float) -> np.ndarray | None:
    """Class indices [N] (-1: draw at random per seed), or None for unconditional models."""
    if label_dim == 0:
        if labels is not None or cfg_scale != 1.0:
            raise ValueError("the model is unconditional (label_dim=0): labels/cfg_scale unused")
        return None
    if labels is None:
        return np.full([n], -1, np.int64)
    idx = np.asarray(labels)
    if idx.ndim == 2:  # one-hot [N, label_dim]
        if idx.shape != (n, label_dim):
            raise ValueError(f"one-hot labels must be [{n}, {label_dim}], got {idx.shape}")
        return idx.argmax(-1).astype(np.int64)
    if idx.dtype.kind not in "iu" or idx.ndim > 1:
        raise ValueError(f"labels must be an int, N ints or [N, {label_dim}] one-hot, got {idx!r}")
    if idx.ndim == 1 and len(idx) != n:
        raise ValueError(f"got {len(idx)} labels for {n} seeds")
    idx = np.broadcast_to(idx, [n]).astype(np.int64)
    bad = idx[(idx < 0) | (idx >= label_dim)]
    if bad.size:
        raise ValueError(f"class {int(bad[0])} out of range; valid: 0..{label_dim - 1}")
    return idx


def class_labels(rng: Array, model: Any, seeds: Sequence[int], labels=None) -> np.ndarray | None:
    """The class index [N] of each seed (drawn from ``fold_in(rng, seed)`` where not given).

    None for unconditional models. ``labels`` as in ``sample``; raises ValueError on a class
    out of range.
    """
    seeds = _resolve_seeds(None, seeds)
    label_dim = int(getattr(model, "label_dim", 0) or 0)
    classes = _resolve_labels(labels, len(seeds), label_dim, 1.0)
    if classes is None or np.all(classes >= 0):
        return classes

    def draw(seed):
        key = jax.random.fold_in(jax.random.fold_in(rng, seed), _KEY_LABEL)
        return jax.random.randint(key, (), 0, label_dim)

    drawn = np.asarray(jax.jit(jax.vmap(draw))(jnp.asarray(seeds, jnp.uint32)))
    return np.where(classes < 0, drawn, classes)


@dataclasses.dataclass(frozen=True)
class _Spec:
    """Everything that fixes the compiled sampling program besides the model."""

    sampler: str
    shape: tuple[int, ...]  # (H, W, C)
    label_dim: int
    num_steps: int
    sigma_min: float
    sigma_max: float
    rho: float
    guided: bool  # classifier-free guidance on (its scale is a traced argument)
    options: tuple  # sorted (name, value) pairs of sampler options


def _solve(spec: _Spec, fn: Callable, denoise: Callable, x: Array, key: Array, precond) -> Array:
    """Run the sampler on one seed's x [1, H, W, C]; its randomness comes from ``key`` only."""
    from edm_jax.samplers import RANGE_SAMPLERS  # fn(denoise, x, sigma_min, sigma_max, ...)

    extra = {"rng": key} if "rng" in inspect.signature(fn).parameters else {}
    lo, hi, n = spec.sigma_min, spec.sigma_max, spec.num_steps
    options = dict(spec.options)
    if spec.sampler in RANGE_SAMPLERS:
        args = (lo, hi) if spec.sampler == "dpm_adaptive" else (lo, hi, n)
        return fn(denoise, x, *args, **extra, **options)
    sigmas = schedules.karras(n, lo, hi, spec.rho)  # EDM eq. 5
    if precond is not None:  # discrete models (iDDPM) sample at their own levels
        sigmas = precond.round_sigma(sigmas).astype(sigmas.dtype)
    return fn(denoise, x, sigmas, **extra, **options)


def _conditioned(model, params, onehot, guided: bool, cfg_scale) -> Callable:
    """denoise(x, sigma) with the labels (and classifier-free guidance) closed over."""
    denoise = functools.partial(model.denoise, params)
    if onehot is None:
        return denoise
    if not guided:
        return functools.partial(denoise, labels=onehot)
    # A zero one-hot is the null label unless the network learned its own (then labels=None).
    batched = getattr(getattr(model, "net", None), "null_label", "zero") == "zero"
    return guidance.cfg(denoise, cfg_scale, onehot, batched=batched)


_PROGRAMS: dict[tuple, tuple[Any, Callable]] = {}


def _cached_program(model, spec: _Spec) -> Callable:
    """One jitted program per (model object, spec); the model is held so its id stays valid."""
    entry = _PROGRAMS.get((id(model), spec))
    if entry is None:
        if len(_PROGRAMS) >= 32:
            _PROGRAMS.pop(next(iter(_PROGRAMS)))
        entry = _PROGRAMS[(id(model), spec)] = (model, _program(model, spec))
    return entry[1]


def _program(model, spec: _Spec) -> Callable:
    """Jitted (params, seed keys [B], class idx [B] | None) -> images [B, H, W, C].

    The sampler is vmapped over seeds: each sees a batch of one with its own key, so its
    noise (and dpm_adaptive's step sizes) cannot depend on the other seeds, while the
    network still runs on the whole batch.
    """
    fn, precond = _samplers()[spec.sampler], getattr(model, "precond", None)

    def one(params, key, cls, cfg_scale):
        x = jax.random.normal(jax.random.fold_in(key, _KEY_INIT), (1,) + spec.shape)
        x = x * spec.sigma_max  # x_0 ~ N(0, sigma_max^2 I)  (EDM Algorithm 1, line 1)
        onehot = None if cls is None else jax.nn.one_hot(cls[None], spec.label_dim)
        denoise = _conditioned(model, params, onehot, spec.guided, cfg_scale)
        key = jax.random.fold_in(key, _KEY_NOISE)
        return _solve(spec, fn, denoise, x, key, precond)[0]

    def run(params, keys, classes, cfg_scale):
        out = jax.vmap(one, in_axes=(None, 0, 0, None))(params, keys, classes, cfg_scale)
        return jnp.clip(out, -1.0, 1.0)

    return jax.jit(run)


def _mesh(batch: int) -> Mesh | None:
    """A 1-D mesh over the local devices when the batch splits evenly over them, else None."""
    devices = jax.local_devices()
    if len(devices) < 2 or batch % len(devices):
        return None
    return Mesh(np.array(devices), ("batch",))


def _shard(tree, mesh: Mesh | None, spec: PartitionSpec):
    """tree placed on the mesh with spec (batch-split or replicated); as is without a mesh."""
    return tree if mesh is None else jax.device_put(tree, NamedSharding(mesh, spec))


def _batch_size(batch_size: int | None, n: int) -> int:
    """Batch size, rounded up to a multiple of the local device count when larger than it."""
    if batch_size is None:
        batch_size = min(n, 64)
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")
    ndev = jax.local_device_count()
    return math.ceil(batch_size / ndev) * ndev if batch_size >= ndev else batch_size


def check_sample_args(sampler: str, num_steps: int, batch_size: int | None, **options) -> None:
    """Raise ValueError on an unknown sampler or option, bad step count or batch size."""
    _check_sampler(sampler, options)
    schedules.check_steps(num_steps)
    _batch_size(batch_size, 1)


def to_uint8(images) -> np.ndarray:
    """[-1, 1] floats -> uint8 pixels, rounding as NVlabs/edm (x * 127.5 + 128, clipped)."""
    return np.clip(np.asarray(images, np.float32) * 127.5 + 128, 0, 255).astype(np.uint8)


def image_grid(pixels: np.ndarray, cols: int | None = None) -> np.ndarray:
    """[N, H, W, C] -> one [rows*H, cols*W, C] image (missing cells black)."""
    n, h, w, c = pixels.shape
    cols = cols or math.ceil(math.sqrt(n))
    rows = math.ceil(n / cols)
    full = np.zeros([rows * cols, h, w, c], pixels.dtype)
    full[:n] = pixels
    return full.reshape(rows, cols, h, w, c).transpose(0, 2, 1, 3, 4).reshape(rows * h, cols * w, c)


def _sigma_range(model, sigma_min, sigma_max) -> tuple[float, float]:
    """(sigma_min, sigma_max) clipped to the model's range, as NVlabs/edm ``edm_sampler``."""
    schedules.check_positive("sigma_min", sigma_min)
    schedules.check_positive("sigma_max", sigma_max)
    precond = getattr(model, "precond", None)
    lo, hi = float(sigma_min), float(sigma_max)
    if precond is not None:
        lo, hi = max(lo, float(precond.sigma_min)), min(hi, float(precond.sigma_max))
    if lo >= hi:
        raise ValueError(f"need sigma_min < sigma_max within the model's range; got {lo}, {hi}")
    return lo, hi


def _image_shape(model) -> tuple[int, int, int]:
    """(H, W, C) of the model's images."""
    shape = getattr(model, "image_shape", None)
    if shape is None:
        res, ch = getattr(model, "img_resolution", None), getattr(model, "img_channels", None)
        if res is None or ch is None:
            raise ValueError("model has no image_shape (or img_resolution/img_channels)")
        shape = (res, res, ch)
    return tuple(int(s) for s in shape)


def sample(
    rng: Array,
    params: Any,
    model: Any,
    *,
    num_samples: int | None = None,
    seeds: Sequence[int] | None = None,
    sampler: str = "heun",
    num_steps: int = 18,
    sigma_min: float = 0.002,
    sigma_max: float = 80.0,
    rho: float = 7.0,
    labels=None,
    cfg_scale: float = 1.0,
    batch_size: int | None = None,
    progress: bool = False,
    **sampler_options,
) -> np.ndarray:
    """Images [N, H, W, C] in [-1, 1] (numpy float32), one per seed.

    ``model.denoise(params, x, sigma, labels=one_hot)`` is sampled with ``sampler`` (a name
    in ``sampler_names()``) on the Karras schedule (EDM eq. 5). ``labels``: None (random
    class per seed for conditional models), a class index, N indices or [N, label_dim]
    one-hot. ``cfg_scale`` != 1 applies classifier-free guidance. Seed s draws from
    ``fold_in(rng, s)`` only, whatever the batch.
    """
    check_sample_args(sampler, num_steps, batch_size, **sampler_options)
    seeds = _resolve_seeds(num_samples, seeds)
    label_dim = int(getattr(model, "label_dim", 0) or 0)
    _resolve_labels(labels, len(seeds), label_dim, cfg_scale)  # validate before compute
    classes = class_labels(rng, model, seeds, labels)
    shape, bs = _image_shape(model), _batch_size(batch_size, len(seeds))
    opts = tuple(sorted(sampler_options.items()))
    sigma_min, sigma_max = _sigma_range(model, sigma_min, sigma_max)
    guided = classes is not None and float(cfg_scale) != 1.0
    spec = _Spec(
        sampler, shape, label_dim, num_steps, sigma_min, sigma_max, float(rho), guided, opts
    )
    program = _cached_program(model, spec)
    return _run_batches(program, rng, params, seeds, classes, bs, progress, cfg_scale)


def _run_batches(program, rng, params, seeds, classes, bs, progress, cfg_scale) -> np.ndarray:
    """Call the program on padded batches of seeds; concatenate the real images."""
    starts = range(0, len(seeds), bs)
    if progress:
        import tqdm

        starts = tqdm.tqdm(starts, unit="batch", desc="sampling")
    mesh = _mesh(bs)
    params = _shard(params, mesh, PartitionSpec())  # replicated
    out = []
    for start in starts:
        chunk = _pad(seeds[start : start + bs], bs)  # [bs]
        keys = jax.vmap(jax.random.fold_in, (None, 0))(rng, jnp.asarray(chunk % 2**32, jnp.uint32))
        cls = (
            None
            if classes is None
            else jnp.asarray(_pad(classes[start : start + bs], bs), jnp.int32)
        )
        keys, cls = _shard((keys, cls), mesh, PartitionSpec("batch"))
        images = program(params, keys, cls, jnp.float32(cfg_scale))
        out.append(np.asarray(jax.device_get(images))[: len(seeds[start : start + bs])])
    return np.concatenate(out).astype(np.float32)


def _pad(a: np.ndarray, n: int) -> np.ndarray:
    """a [k <= n] padded to [n] by repeating its last entry."""
    return np.concatenate([a, np.repeat(a[-1:], n - len(a))])


def load(path) -> tuple[Any, Any, dict]:
    """(model, params, config) from a training workdir, one checkpoint, or a reference .npz.

    A workdir gives its latest checkpoint's EMA parameters; a ``.npz`` holding an NVlabs/edm
    state_dict (``config_json`` + ``param/<name>``) is converted. Raises FileNotFoundError if
    ``path`` does not exist and ValueError if it holds neither.
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"no such workdir, checkpoint or .npz: {path}")
    if os.path.isfile(path):
        if not path.endswith(".npz"):
            raise ValueError(
                f"{path} is a file but not a reference .npz; give a workdir or checkpoint"
            )
        from edm_jax.nets.convert import load_reference, load_reference_npz

        model, params = load_reference(path)
        return model, params, load_reference_npz(path)[0]
    return _load_training_checkpoint(path)


def _locate_checkpoint(path: str) -> tuple[str, int | None]:
    """(workdir, step) for a workdir (step None: the newest) or a checkpoints/<step> folder."""
    if os.path.isdir(os.path.join(path, "checkpoints")):
        return path, None
    parent, name = os.path.split(os.path.normpath(path))
    is_step = name.isdigit() and os.path.basename(parent) == "checkpoints"
    if is_step and os.path.isdir(os.path.join(path, "state")):
        return os.path.dirname(parent), int(name)
    raise ValueError(
        f"no checkpoint found in {path}: expected a training workdir (holding checkpoints/), "
        "one checkpoint folder (checkpoints/<step>) or a reference .npz"
    )


def _load_training_checkpoint(path: str) -> tuple[Any, Any, Any]:
    """(model, EMA params, config) restored through edm_jax.train's Checkpointer."""
    import ml_collections

    from edm_jax.train import Checkpointer, init_state
    from edm_jax.train.checkpoint import abstract_state

    workdir, step = _locate_checkpoint(path)
    ckpt = Checkpointer(workdir, use_async=False)
    try:
        steps = ckpt.all_steps()
        if not steps or (step is not None and step not in steps):
            raise ValueError(f"no committed checkpoint in {path} (steps found: {steps})")
        config = ml_collections.ConfigDict(ckpt.read_config(steps[-1] if step is None else step))
        model = _model_from_config(
            config, ckpt.directory / str(steps[-1] if step is None else step)
        )
        init = functools.partial(init_state, model=model, config=config)
        shape = jax.eval_shape(init, jax.random.key(0))
        device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
        target = abstract_state(shape, jax.tree.map(lambda _: device, shape))
        if step is None:
            _, state, _ = ckpt.restore_latest(target)
        else:
            state = ckpt.manager.restore(step, args=_state_args(target))["state"]
    finally:
        ckpt.close()
    return model, state.ema, config


def _state_args(target):
    """orbax arguments restoring only the 'state' item of a checkpoint into target."""
    import orbax.checkpoint as ocp

    return ocp.args.Composite(state=ocp.args.StandardRestore(target))


def _model_from_config(config, step_dir) -> Any:
    """The run's DiffusionModel; label_dim read from the checkpoint's map_label shape."""
    import types

    from edm_jax.train import build_model_from_config

    label_dim = 0
    if config.data.use_labels:
        import orbax.checkpoint as ocp

        tree = ocp.StandardCheckpointer().metadata(os.fspath(step_dir / "state")).item_metadata
        ema = tree.tree["ema"]
        if "unet" in ema:  # EDM2: emb_label weight [emb, label_dim] (torch layout)
            label_dim = int(ema["unet"]["emb_label"]["weight"].shape[1])
        else:
            label_dim = int(ema["map_label"]["kernel"].shape[0])
    resolution = config.model.get("img_resolution", 0) or config.data.resolution
    source = types.SimpleNamespace(
        num_classes=label_dim, resolution=resolution, channels=config.data.channels
    )
    return build_model_from_config(config, source)
