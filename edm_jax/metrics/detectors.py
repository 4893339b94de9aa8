"""Feature detectors for the metrics: NVIDIA's FID Inception-v3 and edm2's DINOv2-L/14.

``load_detector(name, weights)`` reads the weights a user downloaded (``DETECTORS[name]`` says
from where); ``random_detector(name, rng, ...)`` builds a small random one for tests. A
``Detector`` maps uint8 (or [-1, 1] float) NHWC images to float32 features, jit-able and pure.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from edm_jax.metrics import preprocess
from edm_jax.metrics.dinov2 import DINOV2_PRESETS, DinoConfig, DinoVisionTransformer
from edm_jax.metrics.inception import InceptionV3
from edm_jax.metrics.state_dict import params_from_state_dict, read_state_dict

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class DetectorSpec:
    """Where a detector's weights come from and what it is."""

    description: str
    url: str
    filename: str
    npz_name: str


DETECTORS = {
    "inception": DetectorSpec(
        "FID Inception-v3 (pytorch-fid's port of the TF 2015-12-05 graph), NVIDIA preprocessing",
        "https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/"
        "pt_inception-2015-12-05-6726825d.pth",
        "pt_inception-2015-12-05-6726825d.pth",
        "pt_inception-2015-12-05-6726825d.npz",
    ),
    "dinov2": DetectorSpec(
        "DINOv2 ViT-L/14 (facebookresearch/dinov2 dinov2_vitl14), edm2's FD-DINOv2 preprocessing",
        "https://dl.fbaipublicfiles.com/dinov2/dinov2_vitl14/dinov2_vitl14_pretrain.pth",
        "dinov2_vitl14_pretrain.pth",
        "dinov2_vitl14_pretrain.npz",
    ),
    "clip": DetectorSpec(
        "OpenAI CLIP image features as k-diffusion's --evaluate-with clip (l2-normalised, "
        "x sqrt(dim); any OpenAI CLIP, ViT-B/16 by default)",
        "https://openaipublic.azureedge.net/clip/models/"
        "5806e77cd80f8b59890b7e101eabd078d9fb84e6937f9e85e4ecb61988df416f/ViT-B-16.pt",
        "ViT-B-16.pt",
        "ViT-B-16.safetensors",
    ),
}
WEIGHTS_DIR_ENV = "EDM_JAX_WEIGHTS"


@dataclasses.dataclass(frozen=True, eq=False)
class Detector:
    """Images -> features. ``apply_features(params, images)`` is pure (jit / shard it freely).

    ``preprocess`` (images -> network input, one compile per input shape) and ``forward``
    (params, input -> (features, logits, block means) for inception, (features, cls per
    block) for dinov2; one compile per batch size) are the two jitted halves, when known.
    """

    name: str
    feature_dim: int
    params: Any = dataclasses.field(repr=False)
    apply_features: Callable[[Any, Array], Array] = dataclasses.field(repr=False)
    apply_logits: Callable[[Any, Array], Array] | None = dataclasses.field(default=None, repr=False)
    preprocess: Callable[[Array], Array] | None = dataclasses.field(default=None, repr=False)
    forward: Callable[[Any, Array], tuple] | None = dataclasses.field(default=None, repr=False)

    def features(self, images_uint8_nhwc: Array) -> Array:
        """[B,H,W,C] uint8 (or float in [-1, 1]) images -> [B, feature_dim] float32."""
        return self.apply_features(self.params, images_uint8_nhwc)

    def logits(self, images_uint8_nhwc: Array) -> Array:
        """[B,H,W,C] images -> class logits before the softmax (Inception Score); inception only."""
        if self.apply_logits is None:
            raise ValueError(f"detector {self.name!r} has no logits; only 'inception' does")
        return self.apply_logits(self.params, images_uint8_nhwc)


def _net(module: Any, params: Any, x: Array) -> tuple:
    """The network on preprocessed input, with its per-block outputs."""
    return module.apply({"params": params}, x, return_blocks=True)


def _apply(prep: Callable, forward: Callable, index: int, params: Any, images: Array) -> Array:
    """Output ``index`` of forward(params, prep(images)): features and logits share one compile."""
    return forward(params, prep(images))[index]


def _make(name: str, module: Any, params: Any, size: int) -> Detector:
    """Detector around a module, its params and its input size."""
    if name == "inception":
        prep = jax.jit(functools.partial(preprocess.inception_input, size=size))
        dim = params["fc"]["kernel"].shape[0]
    else:
        prep = jax.jit(functools.partial(preprocess.dinov2_input, size=size))
        dim = params["cls_token"].shape[-1]
    forward = jax.jit(functools.partial(_net, module))
    feats = functools.partial(_apply, prep, forward, 0)
    logits = functools.partial(_apply, prep, forward, 1) if name == "inception" else None
    return Detector(name, int(dim), params, feats, logits, prep, forward)


# ---- building ----


def _check_name(name: str) -> DetectorSpec:
    """The spec of a detector name, or a ValueError listing the valid names."""
    if name not in DETECTORS:
        raise ValueError(f"unknown detector {name!r}; valid: {sorted(DETECTORS)}")
    return DETECTORS[name]


def _module(name: str, dtype: Any, **config: Any) -> tuple[Any, int]:
    """(Flax module, input size) of a detector with the given configuration."""
    if name == "inception":
        size = config.pop("size", preprocess.INCEPTION_SIZE)
        return InceptionV3(dtype=dtype, **config), size
    size = config.pop("size", preprocess.DINOV2_SIZE)
    return DinoVisionTransformer(DinoConfig(**config), dtype=dtype), size


@functools.lru_cache(maxsize=8)
def param_template(module: Any, size: int) -> Any:
    """Shapes of a module's params (jax.eval_shape, no compute)."""
    x = jnp.zeros((1, size, size, 3), jnp.float32)
    return jax.eval_shape(lambda: module.init(jax.random.key(0), x))["params"]


def random_detector(name: str, rng: Array, **small_config: Any) -> Detector:
    """A detector with random weights; inception: width=1/16, size=299; dinov2: tiny ViT.

    inception options: ``width`` (channel multiplier), ``size`` (resize target, >= 75),
    ``num_classes``. dinov2 options: DinoConfig fields (``embed_dim``, ``depth``,
    ``num_heads``, ``patch_size``, ``img_size``) and ``size`` (resize target).
    """
    _check_name(name)
    if name == "clip":
        from edm_jax.clip import model as clip_model

        clip_config = clip_model.CLIPConfig.openai(**small_config)
        shapes = clip_model.param_shapes(clip_config)
        return clip_detector(_random_params(rng, shapes), clip_config)
    if name == "inception":
        config = {"width": 1 / 16, **small_config}
    else:
        config = {"embed_dim": 32, "depth": 2, "num_heads": 2, "img_size": 224, "size": 56}
        config.update(small_config)
    module, size = _module(name, jnp.float32, **config)
    params = _random_params(rng, param_template(module, size))
    return _make(name, module, params, size)


def clip_detector(params: Any, config: Any) -> Detector:
    """k-diffusion's CLIPFeatureExtractor as a Detector (uint8 or [-1, 1] images; grey as RGB)."""
    from edm_jax.clip import features

    run = features.feature_fn(config)

    def apply(p: Any, images: Array) -> Array:
        x = images.astype(jnp.float32) / 127.5 - 1 if images.dtype == jnp.uint8 else images
        return run(p, jnp.repeat(x, 3, axis=-1) if x.shape[-1] == 1 else x)

    return Detector("clip", int(config.embed_dim), params, jax.jit(apply))


def _random_params(rng: Array, template: Any) -> Any:
    """Random weights shaped as template, drawn with NumPy (a jitted init compiles for minutes).

    Kernels ~ N(0, 2/fan_in), position/cls embeddings ~ 0.02 N, norms and BN variances 1,
    biases and means 0.
    """
    key = jax.random.key_data(rng) if jnp.issubdtype(rng.dtype, jax.dtypes.prng_key) else rng
    gen = np.random.default_rng(np.asarray(key, np.uint32).ravel())
    flat = traverse_util.flatten_dict(template)
    out = {}
    for path, leaf in flat.items():
        shape, leaf_name = tuple(leaf.shape), path[-1]
        if leaf_name == "kernel":
            a = gen.normal(size=shape) * np.sqrt(2 / np.prod(shape[:-1]))
        elif leaf_name in ("pos_embed", "cls_token", "mask_token", "embedding", "class_embedding",
                           "positional_embedding"):  # fmt: skip
            a = 0.02 * gen.normal(size=shape)
        elif leaf_name in ("proj", "text_projection"):  # CLIP's x @ P projections
            a = gen.normal(size=shape) / np.sqrt(shape[0])
        elif leaf_name in ("scale", "var", "gamma"):
            a = np.ones(shape)
        else:
            a = np.zeros(shape)
        out[path] = a.astype(np.float32)
    return jax.device_put(traverse_util.unflatten_dict(out))


def _missing_message(name: str, weights: Any) -> str:
    """One line: the file is missing, where to download it and how to convert it."""
    spec = DETECTORS[name]
    where = f"weights file not found: {weights}" if weights else f"no weights file for {name!r}"
    if name == "clip":  # read as it is (TorchScript .pt or .safetensors)
        how = "(read as data, without torch"
    else:
        how = (
            f"and convert it with `python -m edm_jax.metrics.convert_weights {name} {spec.filename} "
            f"{spec.npz_name}` (or pass the .pth itself, read as data without torch"
        )
    return f"{where}; download {spec.filename} from {spec.url} {how}; default folder ${WEIGHTS_DIR_ENV} or ~/.cache/edm_jax)"


def default_weights(name: str) -> Path | None:
    """The first existing default weights file of a detector ($EDM_JAX_WEIGHTS, ~/.cache/edm_jax)."""
    spec = DETECTORS[name]
    folders = [os.environ.get(WEIGHTS_DIR_ENV), str(Path.home() / ".cache" / "edm_jax")]
    for folder in filter(None, folders):
        for fname in (spec.npz_name, spec.filename):
            if (Path(folder) / fname).is_file():
                return Path(folder) / fname
    return None


def _dinov2_config(sd: dict[str, np.ndarray], config_json: dict | None) -> dict:
    """DinoConfig fields of a DINOv2 state_dict (head_dim 64, as every released DINOv2)."""
    if config_json is not None:
        kw = config_json.get("kwargs", config_json)
        keys = ("embed_dim", "depth", "num_heads", "patch_size", "img_size", "mlp_ratio")
        return {k: kw[k] for k in keys if k in kw}
    if "cls_token" not in sd or "patch_embed.proj.weight" not in sd or "pos_embed" not in sd:
        return dataclasses.asdict(DINOV2_PRESETS["dinov2_vitl14"])
    D, p = int(sd["cls_token"].shape[-1]), int(sd["patch_embed.proj.weight"].shape[-1])
    M = round((sd["pos_embed"].shape[1] - 1) ** 0.5)
    depth = len({k.split(".")[1] for k in sd if k.startswith("blocks.")})
    return {
        "embed_dim": D,
        "depth": depth,
        "num_heads": max(1, D // 64),
        "patch_size": p,
        "img_size": M * p,
    }


def _config_json(path: str) -> dict | None:
    """The ``config_json`` entry of an .npz (the fixtures carry one), else None."""
    if not path.endswith(".npz"):
        return None
    with np.load(path, allow_pickle=False) as z:
        return json.loads(str(z["config_json"])) if "config_json" in z.files else None


def load_detector(
    name: str, weights: str | os.PathLike | None, *, dtype: Any = jnp.float32
) -> Detector:
    """Detector ``name`` with weights from a .npz (torch names) or .pth (read without torch).

    weights=None looks in $EDM_JAX_WEIGHTS and ~/.cache/edm_jax. Raises one clear line for an
    unknown name, a missing file (where to download it) or wrong keys (the first one named).
    """
    _check_name(name)
    path = default_weights(name) if weights is None else Path(weights)
    if path is None or not path.is_file():
        raise FileNotFoundError(_missing_message(name, weights))
    if name == "clip":
        from edm_jax.clip import convert

        return clip_detector(*convert.load_any(path))
    sd = read_state_dict(path)
    config: dict = {}
    if name == "dinov2":
        config = _dinov2_config(sd, _config_json(str(path)))
    module, size = _module(name, jnp.dtype(dtype), **config)
    params = params_from_state_dict(sd, param_template(module, size), source=f"weights {path}")
    return _make(name, module, params, size)
