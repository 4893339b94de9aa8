"""k-diffusion's ``K.config.make_model`` for a loaded config, and its Denoiser as an EDM denoiser.

``make_model(config)`` takes the dict ``K.config.load_config`` returns (defaults filled) and
builds the Flax network of ``config['model']['type']``; ``make_denoiser(model, config)`` is
``K.layers.Denoiser``'s forward: D = c_skip x + c_out F(c_in x; ln(sigma)/4) with the config's
sigma_data (``edm_jax.precond.EDMPrecond`` has exactly k-diffusion's scalings).
``from_inference`` / ``to_inference`` map the contents of ``convert_for_inference.py``'s
.safetensors (fp16 state_dict + the config JSON in its metadata) to and from our params.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from typing import Any

import jax
import numpy as np

from edm_jax.checks import check_choice
from edm_jax.nets import convert_kdiff
from edm_jax.nets.kdiff_hdit import AttnSpec, HDiT, LevelSpec, MappingSpec
from edm_jax.nets.kdiff_image_v1 import ImageDenoiserV1
from edm_jax.nets.kdiff_transformer_v1 import ImageTransformerV1
from edm_jax.nets.model import count_params
from edm_jax.precond import EDMPrecond
from edm_jax.precond import make_denoiser as _make_denoiser

Array = jax.Array


def _attn_spec(self_attn: dict) -> AttnSpec:
    """AttnSpec of one ``self_attns`` entry (k-diffusion's defaults: d_head 64, kernel 7)."""
    kind = str(self_attn.get("type"))
    check_choice("self-attention type", kind, ("global", "neighborhood", "shifted-window", "none"))
    if kind == "shifted-window" and "window_size" not in self_attn:
        raise ValueError(f"shifted-window self_attn needs 'window_size'; got {self_attn}")
    return AttnSpec(
        kind,
        self_attn.get("d_head", 64),
        self_attn.get("kernel_size", 7),
        self_attn.get("window_size", 8),
    )


def make_hdit(config: dict) -> HDiT:
    """HDiT of a loaded image_transformer_v2 config (``K.config.make_model``)."""
    m, num_classes = config["model"], config["dataset"]["num_classes"]
    lists = [m[k] for k in ("depths", "widths", "d_ffs", "self_attns", "dropout_rate")]
    if len({len(v) for v in lists}) != 1:
        raise ValueError(
            f"depths, widths, d_ffs, self_attns and dropout_rate differ in length: {lists}"
        )
    levels = tuple(
        LevelSpec(depth, width, d_ff, _attn_spec(sa), float(dr))
        for depth, width, d_ff, sa, dr in zip(*lists, strict=True)
    )
    mapping = MappingSpec(
        m["mapping_depth"], m["mapping_width"], m["mapping_d_ff"], m["mapping_dropout_rate"]
    )
    return HDiT(
        levels,
        mapping,
        m["input_channels"],
        m["input_channels"],
        tuple(m["patch_size"]),
        num_classes,
        m["mapping_cond_dim"],
    )


def make_image_v1(config: dict) -> ImageDenoiserV1:
    """image_v1 of a loaded config: ``KarrasAugmentWrapper(ImageDenoiserModelV1)`` if augment_wrapper."""
    m = config["model"]
    if m.get("cross_cond_dim", 0):
        raise ValueError(
            f"image_v1 cross-attention (cross_cond_dim={m['cross_cond_dim']}) is not supported; valid: 0"
        )
    return ImageDenoiserV1(
        c_in=m["input_channels"],
        mapping_out=m["mapping_out"],
        depths=tuple(m["depths"]),
        channels=tuple(m["channels"]),
        self_attn_depths=tuple(bool(a) for a in m["self_attn_depths"]),
        mapping_cond_dim=m["mapping_cond_dim"],
        unet_cond_dim=m["unet_cond_dim"],
        dropout=float(m["dropout_rate"]),
        patch_size=m["patch_size"],
        skip_stages=m["skip_stages"],
        has_variance=m["has_variance"],
        augment_wrapper=m["augment_wrapper"],
    )


def make_transformer_v1(config: dict) -> ImageTransformerV1:
    """image_transformer_v1 of a loaded config (d_ff already filled by load_config)."""
    m = config["model"]
    return ImageTransformerV1(
        n_layers=m["depth"],
        d_model=m["width"],
        d_ff=m["d_ff"],
        in_features=m["input_channels"],
        out_features=m["input_channels"],
        patch_size=tuple(m["patch_size"]),
        num_classes=config["dataset"]["num_classes"],
        dropout=float(m["dropout_rate"]),
    )


MODEL_TYPES: dict[str, Callable[[dict], Any]] = {
    "image_v1": make_image_v1,
    "image_transformer_v1": make_transformer_v1,
    "image_transformer_v2": make_hdit,
}


def make_model(config: dict):
    """The Flax network of a loaded k-diffusion config; one clear error for an unknown type."""
    kind = config["model"].get("type")
    check_choice("k-diffusion model type", kind, MODEL_TYPES)
    return MODEL_TYPES[kind](config)


def state_dict_prefix(config: dict) -> str:
    """'inner_model.' where the reference wraps the network in KarrasAugmentWrapper, else ''."""
    m = config["model"]
    return "inner_model." if m["type"] == "image_v1" and m.get("augment_wrapper", True) else ""


def make_denoiser(
    model, config: dict, train: bool = False, rng: Array | None = None
) -> Callable[..., Array]:
    """denoise(params, x, sigma, **cond) = c_skip x + c_out F(c_in x; ln(sigma)/4) (K.layers.Denoiser);
    ``train`` runs dropout with the key ``rng``."""
    sigma_data = config["model"].get("sigma_data", 1.0)
    rngs = {"dropout": rng} if train and rng is not None else {}

    def apply_fn(params, x_in, c_noise, **cond):
        return model.apply({"params": params}, x_in, c_noise, **cond, train=train, rngs=rngs)

    return _make_denoiser(apply_fn, EDMPrecond(sigma_data=sigma_data))


def class_cond_dropout(labels: Array, u: Array, rate: float, num_classes: int) -> Array:
    """``labels`` with those whose ``u < rate`` set to the null class ``num_classes`` (train.py)."""
    return jax.numpy.where(u < rate, num_classes, labels)


def from_inference(
    tensors: dict[str, np.ndarray], metadata: dict[str, str]
) -> tuple[dict, Any, dict]:
    """(config, model, float32 params) of a ``convert_for_inference.py`` .safetensors' contents.

    `tensors` / `metadata` are what a safetensors reader returns (edm_jax.nets.reader); the
    metadata 'config' is the json.dumps of the loaded (defaults-filled) k-diffusion config.
    """
    if "config" not in metadata:
        raise ValueError(f"no 'config' in the safetensors metadata; keys: {sorted(metadata)}")
    config = json.loads(metadata["config"])
    model = make_model(config)
    params = convert_kdiff.from_state_dict(tensors, model, prefix=state_dict_prefix(config))
    return config, model, params


def to_inference(
    params: Any, model, config: dict, dtype=np.float16
) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """(tensors, metadata) as ``convert_for_inference.py`` writes them: the state_dict in fp16, config JSON."""
    sd = convert_kdiff.to_state_dict(params, model, prefix=state_dict_prefix(config))
    tensors = {k: np.ascontiguousarray(v.astype(dtype)) for k, v in sorted(sd.items())}
    return tensors, {"config": json.dumps(config, indent=4)}


@dataclasses.dataclass(frozen=True, eq=False)
class KDiffusionModel:
    """A k-diffusion network with its Denoiser, in the interface ``edm_jax.sample`` reads.

    ``denoise(params, x, sigma, labels=None, augment_labels=None)``: labels are class indices
    [B] or one-hot [B, num_classes] where an all-zero row is the null class (index
    num_classes, k-diffusion's dropped label, so classifier-free guidance works unchanged);
    augment_labels are the 9-dim aug_cond. ``precond`` carries sigma_data and the config's
    sigma range.
    """

    net: Any
    config: dict
    self_cond = False  # the training step's interface: no self-conditioning, no latent encoder
    encoder = None
    class_names: tuple = ()
    # types.SampleableModel: pixel outputs clipped; an all-zero one-hot row is the null class
    clip_output = True
    null_label = "zero"
    takes_key = False

    @property
    def precond(self) -> EDMPrecond:
        """EDM scalings with the config's sigma_data; sigma range from the config."""
        m = self.config["model"]
        return EDMPrecond(
            m.get("sigma_data", 1.0), m.get("sigma_min", 0.0), m.get("sigma_max", float("inf"))
        )

    @property
    def sigma_min(self) -> float:
        """The config's lowest noise level (0.0 when not given)."""
        return float(self.precond.sigma_min)

    @property
    def sigma_max(self) -> float:
        """The config's highest noise level (inf when not given)."""
        return float(self.precond.sigma_max)

    def round_sigma(self, sigma) -> Array:
        """Identity: k-diffusion's models take continuous sigma."""
        return self.precond.round_sigma(sigma)

    @property
    def label_dim(self) -> int:
        """Number of classes (0: unconditional)."""
        return int(self.config["dataset"].get("num_classes", 0))

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """(H, W, C) of the config's images."""
        h, w = self.config["model"]["input_size"]
        return int(h), int(w), int(self.config["model"]["input_channels"])

    def init(self, rng: Array) -> dict:
        """Float32 parameters as the reference initialises them."""
        return self.net.init_params(rng)

    def class_index(self, labels: Any) -> Array:
        """Class indices [B] from indices or one-hot rows (all-zero row -> null class num_classes)."""
        labels = jax.numpy.asarray(labels)
        if labels.ndim == 1:
            return labels.astype(jax.numpy.int32)
        idx = jax.numpy.argmax(labels, axis=-1).astype(jax.numpy.int32)
        return jax.numpy.where(jax.numpy.any(labels != 0, axis=-1), idx, self.label_dim)

    @property
    def cond_dropout_rate(self) -> float:
        """Training: the fraction of class labels replaced by the null class (dataset section)."""
        return (
            float(self.config["dataset"].get("cond_dropout_rate", 0.1)) if self.label_dim else 0.0
        )

    def num_params(self, params: Any) -> int:
        """Trainable parameters (k-diffusion's count: buffers excluded)."""
        return count_params(params)

    def prepare_params(self, params: Any) -> Any:
        """The parameters a training step differentiates: as they are."""
        return params

    def denoise(self, params, x, sigma, labels=None, augment_labels=None, *, train: bool = False,
                rng: Array | None = None, **cond) -> Array:  # fmt: skip
        """D(x; sigma) = c_skip x + c_out F(c_in x; ln(sigma)/4), float32 NHWC.

        ``train``: dropout, and class labels dropped to the null class at cond_dropout_rate
        (k-diffusion's train.py), with the key ``rng``.
        """
        if self.label_dim and labels is None:
            raise ValueError(f"labels are required: the model has {self.label_dim} classes")
        if train and rng is None:
            raise ValueError("training needs a dropout key: denoise(..., train=True, rng=key)")
        if train and rng is not None:
            rng, k_drop = jax.random.split(rng)
        if self.label_dim:
            cond["class_cond"] = self.class_index(labels)
            if train and self.cond_dropout_rate > 0:
                u = jax.random.uniform(k_drop, cond["class_cond"].shape)
                cond["class_cond"] = class_cond_dropout(
                    cond["class_cond"], u, self.cond_dropout_rate, self.label_dim
                )
        if augment_labels is not None:
            cond["aug_cond"] = augment_labels
        return make_denoiser(self.net, self.config, train, rng)(params, x, sigma, **cond)


def from_config(config: dict) -> KDiffusionModel:
    """KDiffusionModel of a loaded (defaults-filled) k-diffusion config."""
    return KDiffusionModel(make_model(config), config)
