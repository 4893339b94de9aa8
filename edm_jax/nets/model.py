"""A network wrapped in preconditioning: D(x; sigma) = c_skip x + c_out F(c_in x; c_noise).

``DiffusionModel.denoise(params, x, sigma, labels=None, ...)`` is the denoiser that the
losses and samplers use; ``init`` makes the float32 parameters. Opt-in extras:
self-conditioning (Chen et al. 2022, Analog Bits: the previous x0 estimate as extra input
channels) and patching (Luhman & Luhman 2022: p x p patches folded into channels).
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from edm_jax.precond import Precond, make_denoiser

Array = jax.Array

# Leaves kept in params but neither trained nor counted (reference buffers).
BUFFER_NAMES = ("freqs", "phases")


def patchify(x: Array, p: int) -> Array:
    """[B, H, W, C] -> [B, H/p, W/p, p*p*C], each p x p patch folded into channels."""
    if p == 1:
        return x
    B, H, W, C = x.shape
    x = x.reshape(B, H // p, p, W // p, p, C).transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(B, H // p, W // p, p * p * C)


def unpatchify(x: Array, p: int) -> Array:
    """Inverse of patchify: [B, h, w, p*p*C] -> [B, h*p, w*p, C]."""
    if p == 1:
        return x
    B, h, w, PC = x.shape
    x = x.reshape(B, h, w, p, p, PC // (p * p)).transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(B, h * p, w * p, PC // (p * p))


def is_buffer(path: tuple) -> bool:
    """Whether a params leaf (by its key path) is a fixed buffer, not a trained parameter."""
    return str(path[-1]) in BUFFER_NAMES


def trainable_mask(params: Any) -> Any:
    """Pytree of bools like params: False for buffers (e.g. NCSN++ Fourier frequencies)."""
    flat = traverse_util.flatten_dict(params)
    return traverse_util.unflatten_dict({k: not is_buffer(k) for k in flat})


def count_params(params: Any) -> int:
    """Number of trained parameters (buffers excluded), as the reference counts them."""
    flat = traverse_util.flatten_dict(params)
    return int(sum(np.prod(v.shape) for k, v in flat.items() if not is_buffer(k)))


def dummy_net_inputs(net: nn.Module, batch: int = 1) -> tuple[Array | None, ...]:
    """Zeros (x, noise_labels, class_labels, augment_labels) that create every parameter."""
    r, c = net.img_resolution, net.in_channels
    x = jnp.zeros((batch, r, r, c), jnp.float32)
    labels = jnp.zeros((batch, net.label_dim), jnp.float32) if net.label_dim else None
    aug = jnp.zeros((batch, net.augment_dim), jnp.float32) if net.augment_dim else None
    return x, jnp.zeros((batch,), jnp.float32), labels, aug


def init_net(net: nn.Module, rng: Array) -> dict:
    """Float32 parameters of a bare network (batch-1 dummy input)."""
    return net.init({"params": rng}, *dummy_net_inputs(net))["params"]


class LatentEncoder(NamedTuple):
    """The VAE of a latent model, one object as EDM2's ``encoder``: a preset name or diffusers
    config.json and its .npz weights; the codec loads on first use (``data.latents``)."""

    name: str
    weights: str

    def codec(self) -> Any:
        """The ``data.latents.LatentCodec`` (EDM2 normalisation), loaded once per process."""
        from edm_jax.data.latents import load_codec

        return load_codec(self.name, self.weights)

    def decode(self, latents) -> Array:
        """Final latents [B, h, w, C] -> images [B, H, W, 3] in [-1, 1]."""
        return jnp.clip(self.codec().decode_float(latents), 0, 1) * 2 - 1


@dataclasses.dataclass(frozen=True)
class DiffusionModel:
    """A Flax network with its preconditioning, image geometry and conditioning options."""

    net: nn.Module
    precond: Precond
    img_resolution: int
    img_channels: int
    label_dim: int = 0
    augment_dim: int = 0
    self_cond: bool = False
    patch_size: int = 1
    encoder: LatentEncoder | None = None  # latent model: its VAE
    class_names: tuple[str, ...] = ()  # names of the label_dim classes (folder datasets)

    takes_key = False  # types.SampleableModel: its denoiser is deterministic

    # ---- types.SampleableModel: what edm_jax.sample reads

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """(H, W, C) of the sampled images (latents for a latent model)."""
        return self.img_resolution, self.img_resolution, self.img_channels

    @property
    def sigma_min(self) -> float:
        """The preconditioning's lowest noise level."""
        return float(self.precond.sigma_min)

    @property
    def sigma_max(self) -> float:
        """The preconditioning's highest noise level."""
        return float(self.precond.sigma_max)

    @property
    def clip_output(self) -> bool:
        """Pixel models clip their samples to [-1, 1]; latent models (an encoder) do not."""
        return self.encoder is None

    @property
    def null_label(self) -> str:
        """The network's unconditional label for classifier-free guidance ('zero', 'learned')."""
        return str(getattr(self.net, "null_label", "zero"))  # EDM2's U-Net has no choice

    def round_sigma(self, sigma) -> Array:
        """The preconditioning's nearest noise level (iDDPM's discrete levels; else identity)."""
        return self.precond.round_sigma(sigma)

    def init(self, rng: Array) -> dict:
        """Float32 parameters pytree, from a batch-1 dummy input."""
        return init_net(self.net, rng)

    def num_params(self, params: Any) -> int:
        """Number of trained parameters (as the reference's sum of numel over parameters)."""
        return count_params(params)

    def prepare_params(self, params: Any) -> Any:
        """The parameters a training step differentiates: the network's own preparation where
        it has one (EDM2: forced weight normalisation), else params as they are."""
        prepare = getattr(type(self.net), "prepare_params", None)
        return prepare(params) if prepare is not None else params

    def apply_net(
        self,
        params,
        x_in,
        c_noise,
        labels=None,
        augment_labels=None,
        *,
        self_cond=None,
        train=False,
        rng=None,
    ) -> Array:
        """The raw network F(x_in; c_noise) at image geometry: [B,H,W,C] -> float32 [B,H,W,C']."""
        if train and rng is None and (self.net.dropout or self.net.label_dropout):
            raise ValueError("train=True with dropout needs rng (the dropout key); got None")
        if self.self_cond:
            sc = jnp.zeros_like(x_in) if self_cond is None else jnp.asarray(self_cond, x_in.dtype)
            x_in = jnp.concatenate([x_in, sc], axis=-1)  # Analog Bits: previous x0 estimate
        elif self_cond is not None:
            raise ValueError("self_cond given but this model was built with self_cond=False")
        rngs = {"dropout": rng} if (train and rng is not None) else {}
        F_x = self.net.apply(
            {"params": params},
            patchify(x_in, self.patch_size),
            c_noise,
            labels if self.label_dim else None,
            augment_labels if self.augment_dim else None,
            train=train,
            rngs=rngs,
        )
        return unpatchify(jnp.asarray(F_x), self.patch_size).astype(jnp.float32)

    def denoise(
        self,
        params,
        x,
        sigma,
        labels=None,
        augment_labels=None,
        *,
        self_cond=None,
        train=False,
        rng=None,
    ) -> Array:
        """D(x; sigma) (EDM eq. 7), float32 [B,H,W,C]; labels int [B], one-hot or None."""
        self._check_input(x)
        denoise = make_denoiser(self.apply_net, self.precond)
        return denoise(
            params,
            x,
            sigma,
            labels=labels,
            augment_labels=augment_labels,
            self_cond=self_cond,
            train=train,
            rng=rng,
        )

    def _check_input(self, x) -> None:
        """Raise ValueError unless x is [B, res, res, img_channels]."""
        want = (self.img_resolution, self.img_resolution, self.img_channels)
        if len(x.shape) != 4 or tuple(x.shape[1:]) != want:
            raise ValueError(
                f"x must be [B, {want[0]}, {want[1]}, {want[2]}] (NHWC); got {x.shape}"
            )
