"""User-facing sampling: ``sample(rng, params, model, ...)`` and ``load(workdir_or_checkpoint)``.

``sample`` is the one sampling path: sample.py, the training grids (``train/grid.py``) and the
metrics call it. Every seed gets its own keys, ``fold_in(rng, seed)``, for its initial noise,
its class label (when drawn at random) and every stochastic step, so a seed's image does not
depend on the batch it is drawn in (as NVlabs/edm ``generate.py``). Batches are padded to one
shape, compiled once per model and settings, and split over the local devices.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from edm_jax import guidance, schedules, sharding
from edm_jax.checks import check_range, check_scalar, check_seeds
from edm_jax.samplers import SAMPLER_INFO, SamplerInfo, canonical_name, sampler_info
from edm_jax.types import Array, SampleableModel

__all__ = [
    "check_sample_args", "class_labels", "image_grid", "load", "sample", "sampler_names", "to_uint8",
]  # fmt: skip

# Options that change what a sampler returns or where its noise and conditioning come from:
# sample() sets them itself (per-seed noise, labels, images out).
_UNSUPPORTED_OPTIONS = (
    "return_trajectory", "return_info", "rng", "noise_sampler", "extra_args", "callback", "disable",
)  # fmt: skip
_KEY_INIT, _KEY_LABEL, _KEY_NOISE, _KEY_GUIDE = 0, 1, 2, 3
Seeds = Sequence[int] | np.ndarray  # 1-D ints >= 0


def sampler_names() -> list[str]:
    """Names accepted by ``sample(..., sampler=name)``."""
    return sorted(SAMPLER_INFO)


def _check_sampler(name: str, options: dict) -> SamplerInfo:
    """The sampler's registry entry, after checking its name and option names."""
    info = sampler_info(name)
    fixed = sorted(set(options) & set(_UNSUPPORTED_OPTIONS))
    if fixed:
        raise ValueError(f"sample() sets {fixed} itself (per-seed noise, images out); drop them")
    bad = sorted(set(options) - set(info.options))
    if bad:
        raise ValueError(f"sampler {name!r} has no options {bad}; valid: {sorted(info.options)}")
    return info


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
    return check_seeds(seeds)


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


@functools.partial(jax.jit, static_argnames="label_dim")
def _draw_labels(rng: Array, seeds: Array, label_dim: int) -> Array:
    """A random class [N] per seed from fold_in(fold_in(rng, seed), _KEY_LABEL); jitted once."""

    def draw(seed):
        key = jax.random.fold_in(jax.random.fold_in(rng, seed), _KEY_LABEL)
        return jax.random.randint(key, (), 0, label_dim)

    return jax.vmap(draw)(seeds)


def class_labels(
    rng: Array, model: SampleableModel, seeds: Seeds, labels=None
) -> np.ndarray | None:
    """The class index [N] of each seed (drawn from ``fold_in(rng, seed)`` where not given).

    None for unconditional models. ``labels`` as in ``sample``; raises ValueError on a class
    out of range.
    """
    seed_arr = _resolve_seeds(None, seeds)
    label_dim = int(model.label_dim)
    classes = _resolve_labels(labels, len(seed_arr), label_dim, 1.0)
    if classes is None or np.all(classes >= 0):
        return classes
    drawn = np.asarray(_draw_labels(rng, jnp.asarray(seed_arr % 2**32, jnp.uint32), label_dim))
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
    clip: bool  # clip the output to [-1, 1] (pixel models)
    options: tuple  # sorted (name, value) pairs of sampler options


def _solve(spec: _Spec, denoise: Callable, x: Array, key: Array, round_sigma: Callable) -> Array:
    """Run the sampler on one seed's x [1, H, W, C]; its randomness comes from ``key`` only."""
    info = SAMPLER_INFO[spec.sampler]
    lo, hi, n = spec.sigma_min, spec.sigma_max, spec.num_steps
    options = dict(spec.options)
    if info.takes == "range":  # fn(denoise, x, sigma_min, sigma_max[, n], ...)
        args = (lo, hi, n) if info.takes_n else (lo, hi)
        return info.fn(denoise, x, *args, rng=key, **options)
    sigmas = schedules.karras(n, lo, hi, spec.rho)  # EDM eq. 5
    sigmas = round_sigma(sigmas).astype(sigmas.dtype)  # discrete models (iDDPM): their levels
    return info.fn(denoise, x, sigmas, rng=key, **options)


def _conditioned(
    model: SampleableModel, params, onehot, guided: bool, cfg_scale, key: Array
) -> Callable:
    """denoise(x, sigma) with the labels (and classifier-free guidance) closed over; a model
    whose guidance is random (``takes_key``, e.g. CLIP's augmentations) gets the seed's key."""
    denoise = functools.partial(model.denoise, params)
    if model.takes_key:
        denoise = functools.partial(denoise, key=jax.random.fold_in(key, _KEY_GUIDE))
    if onehot is None:
        return denoise
    if not guided:
        return functools.partial(denoise, labels=onehot)
    # A zero one-hot is the null label unless the network learned its own (then labels=None).
    return guidance.cfg(denoise, cfg_scale, onehot, batched=model.null_label == "zero")


_PROGRAMS: dict[tuple, tuple[Any, Callable]] = {}


def _cached_program(model: SampleableModel, spec: _Spec) -> Callable:
    """One jitted program per (model object, spec); the model is held so its id stays valid."""
    entry = _PROGRAMS.get((id(model), spec))
    if entry is None:
        if len(_PROGRAMS) >= 32:
            _PROGRAMS.pop(next(iter(_PROGRAMS)))
        entry = _PROGRAMS[(id(model), spec)] = (model, _program(model, spec))
    return entry[1]


def _program(model: SampleableModel, spec: _Spec) -> Callable:
    """Jitted (params, seed keys [B], class idx [B] | None) -> images [B, H, W, C].

    The sampler is vmapped over seeds: each sees a batch of one with its own key, so its
    noise (and dpm_adaptive's step sizes) cannot depend on the other seeds, while the
    network still runs on the whole batch.
    """
    round_sigma = model.round_sigma

    def one(params, key, cls, cfg_scale):
        x = jax.random.normal(jax.random.fold_in(key, _KEY_INIT), (1,) + spec.shape)
        x = x * spec.sigma_max  # x_0 ~ N(0, sigma_max^2 I)  (EDM Algorithm 1, line 1)
        onehot = None if cls is None else jax.nn.one_hot(cls[None], spec.label_dim)
        denoise = _conditioned(model, params, onehot, spec.guided, cfg_scale, key)
        key = jax.random.fold_in(key, _KEY_NOISE)
        return _solve(spec, denoise, x, key, round_sigma)[0]

    def run(params, keys, classes, cfg_scale):
        out = jax.vmap(one, in_axes=(None, 0, 0, None))(params, keys, classes, cfg_scale)
        return jnp.clip(out, -1.0, 1.0) if spec.clip else out

    return jax.jit(run)


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
    """[-1, 1] floats -> uint8 pixels, rounding as NVlabs/edm (x * 127.5 + 128, clipped).

    The one quantisation of the package: sample.py, the training grids and the metrics use it.
    """
    return np.clip(np.asarray(images, np.float32) * 127.5 + 128, 0, 255).astype(np.uint8)


def image_grid(pixels: np.ndarray, cols: int | None = None, min_tile: int = 1) -> np.ndarray:
    """[N, H, W, C] -> one [rows*H*s, cols*W*s, C] image (missing cells black).

    Each tile is repeated s = ceil(min_tile / H) times per axis (nearest), so that small
    images (8x8 digits) are visible; the training grids use min_tile=32.
    """
    n, h, w, c = pixels.shape
    cols = cols or math.ceil(math.sqrt(n))
    rows = math.ceil(n / cols)
    s = max(1, -(-min_tile // h))
    full = np.zeros([rows * cols, h, w, c], pixels.dtype)
    full[:n] = pixels
    full = full.repeat(s, axis=1).repeat(s, axis=2)
    h, w = h * s, w * s
    return full.reshape(rows, cols, h, w, c).transpose(0, 2, 1, 3, 4).reshape(rows * h, cols * w, c)


def _sigma_range(model: SampleableModel, sigma_min, sigma_max) -> tuple[float, float]:
    """(sigma_min, sigma_max) clipped to the model's range, as NVlabs/edm ``edm_sampler``."""
    check_range(sigma_min, sigma_max)  # finite, 0 < sigma_min < sigma_max
    lo = max(float(sigma_min), float(model.sigma_min))
    hi = min(float(sigma_max), float(model.sigma_max))
    if lo >= hi:
        raise ValueError(f"need sigma_min < sigma_max within the model's range; got {lo}, {hi}")
    return lo, hi


def sample(
    rng: Array,
    params: Any,
    model: SampleableModel,
    *,
    num_samples: int | None = None,
    seeds: Seeds | None = None,
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
    """Images [N, H, W, C] (numpy float32), one per seed.

    ``model`` (a ``types.SampleableModel``): ``model.denoise(params, x, sigma, labels=one_hot)``
    is sampled with ``sampler`` (a name in ``sampler_names()``) on the Karras schedule (EDM
    eq. 5), rounded by ``model.round_sigma``, within the model's own sigma range. ``labels``: None (random class per seed for conditional models), a class index, N
    indices or [N, label_dim] one-hot. ``cfg_scale`` != 1 applies classifier-free guidance.
    Seed s draws from ``fold_in(rng, s)`` only, whatever the batch. Outputs are clipped to
    [-1, 1] unless ``model.clip_output`` is False (latent models, wrapped models).
    """
    check_sample_args(sampler, num_steps, batch_size, **sampler_options)
    sampler = canonical_name(sampler)  # k-diffusion's 'sample_euler' spelling too
    check_scalar("cfg_scale", cfg_scale)
    check_scalar("rho", rho, positive=True, allow_zero=False)
    seed_arr = _resolve_seeds(num_samples, seeds)
    label_dim = int(model.label_dim)
    _resolve_labels(labels, len(seed_arr), label_dim, cfg_scale)  # validate before compute
    classes = class_labels(rng, model, seed_arr, labels)
    shape = tuple(int(s) for s in model.image_shape)
    bs = _batch_size(batch_size, len(seed_arr))
    lo, hi = _sigma_range(model, sigma_min, sigma_max)
    spec = _Spec(
        sampler, shape, label_dim, num_steps, lo, hi, float(rho),
        guided=classes is not None and float(cfg_scale) != 1.0,
        clip=bool(model.clip_output),
        options=tuple(sorted(sampler_options.items())),
    )  # fmt: skip
    program = _cached_program(model, spec)
    out = _run_batches(program, rng, params, seed_arr, classes, bs, progress, cfg_scale)
    if model.encoder is not None:  # latent model: decode the latents to images
        decode = model.encoder.decode
        out = np.concatenate([np.asarray(decode(out[i : i + bs])) for i in range(0, len(out), bs)])
    return out


@jax.jit
def _seed_keys(rng: Array, seeds: Array) -> Array:
    """fold_in(rng, seed) [B] for seeds [B] (uint32)."""
    return jax.vmap(jax.random.fold_in, (None, 0))(rng, seeds)


def _run_batches(program, rng, params, seeds, classes, bs, progress, cfg_scale) -> np.ndarray:
    """Call the program on padded batches of seeds; concatenate the real images."""
    starts: Any = range(0, len(seeds), bs)
    if progress:
        import tqdm

        starts = tqdm.tqdm(starts, unit="batch", desc="sampling")
    mesh = sharding.batch_mesh(bs)
    params = sharding.place(params, mesh, sharding.REPLICATED)
    out = []
    for start in starts:
        chunk = _pad(seeds[start : start + bs], bs)  # [bs]
        keys = _seed_keys(rng, jnp.asarray(chunk % 2**32, jnp.uint32))
        cls = (
            None
            if classes is None
            else jnp.asarray(_pad(classes[start : start + bs], bs), jnp.int32)
        )
        keys, cls = sharding.place((keys, cls), mesh, sharding.BATCH)
        images = program(params, keys, cls, jnp.float32(cfg_scale))
        out.append(np.asarray(jax.device_get(images))[: len(seeds[start : start + bs])])
    return np.concatenate(out).astype(np.float32)


def _pad(a: np.ndarray, n: int) -> np.ndarray:
    """a [k <= n] padded to [n] by repeating its last entry."""
    return np.concatenate([a, np.repeat(a[-1:], n - len(a))])


def _is_kdiff_file(path: str) -> bool:
    """A k-diffusion .pth / inference .safetensors (not one of the released families' names)."""
    from edm_jax import pretrained as pt
    from edm_jax.nets.kdiff_files import is_kdiff_file

    return pt.infer_family(path) is None and is_kdiff_file(path)


def load(path, family=None, **pretrained) -> tuple[Any, Any, dict]:
    """(model, params, config) from a training workdir, one checkpoint, or a reference .npz.

    A guided-diffusion / v-diffusion checkpoint (.pt/.pth/.safetensors, or its converted .npz)
    loads through ``edm_jax.pretrained.load_pretrained(path, family, **pretrained)``; a
    k-diffusion training .pth or inference .safetensors through ``nets.kdiff_files.load``.

    A workdir gives its newest committed checkpoint's EMA parameters, read without writing
    to the workdir (safe while training runs); a ``.npz`` holding an NVlabs/edm state_dict
    (``config_json`` + ``param/<name>``) is converted. Raises FileNotFoundError if ``path``
    does not exist and ValueError if it holds neither.
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"no such workdir, checkpoint or .npz: {path}")
    from edm_jax import pretrained as pt

    if family is None and not pretrained and _is_kdiff_file(path):
        from edm_jax.nets import kdiff_files

        return kdiff_files.load(path)
    if family is not None or pretrained or pt.is_pretrained_file(path):
        return pt.load_pretrained(path, family, **pretrained)
    if os.path.isfile(path):
        if not path.endswith(".npz"):
            raise ValueError(
                f"{path} is a file but not a reference .npz; give a workdir or checkpoint"
            )
        from edm_jax.nets.convert import load_reference, load_reference_npz

        model, params = load_reference(path)
        return model, params, load_reference_npz(path)[0]
    from edm_jax.checkpoint_reader import load_checkpoint

    return load_checkpoint(path)
