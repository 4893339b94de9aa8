"""Class-label embedding with label dropout for classifier-free guidance (Ho & Salimans 2022)."""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from edm_jax.nets.layers import Init, weight_init

Array = jax.Array

NULL_LABELS = ("zero", "learned")


def one_hot_labels(labels: Array, label_dim: int) -> Array:
    """Integer labels [B] or one-hot/soft labels [B, label_dim] -> float32 [B, label_dim]."""
    labels = jnp.asarray(labels)
    if labels.ndim == 1 and jnp.issubdtype(labels.dtype, jnp.integer):
        return jax.nn.one_hot(labels, label_dim, dtype=jnp.float32)
    if labels.ndim == 2 and labels.shape[-1] == label_dim:
        return labels.astype(jnp.float32)
    raise ValueError(
        f"labels must be integer [B] or one-hot [B, {label_dim}]; got shape {labels.shape} "
        f"dtype {labels.dtype}"
    )


class LabelMap(nn.Module):
    """The reference ``map_label`` Linear, plus label dropout and the null (unconditional) label.

    ``labels=None`` means unconditional for every sample. With ``null='zero'`` a dropped label
    is the all-zero one-hot vector, exactly as the reference; with ``null='learned'`` it is a
    learned embedding ``null`` [out_features] (an extra parameter the reference lacks).
    """

    label_dim: int
    out_features: int
    bias: bool = True
    winit: Init = Init()
    input_scale: float = 1.0
    label_dropout: float = 0.0
    null: str = "zero"

    @nn.compact
    def __call__(self, labels: Array | None, batch: int, train: bool = False) -> Array:
        """labels (int [B], one-hot [B, label_dim] or None) -> float32 [B, out_features]."""
        if self.null not in NULL_LABELS:
            raise ValueError(f"unknown null label {self.null!r}; valid: {list(NULL_LABELS)}")
        fans = (self.label_dim, self.out_features)
        w = self.param("kernel", weight_init(self.winit.mode, *fans, self.winit.weight), fans)
        if labels is None:
            onehot, keep = jnp.zeros((batch, self.label_dim)), jnp.zeros((batch, 1), bool)
        else:
            onehot, keep = one_hot_labels(labels, self.label_dim), jnp.ones((batch, 1), bool)
        if train and self.label_dropout:
            u = jax.random.uniform(self.make_rng("dropout"), (batch, 1))
            keep = keep & (u >= self.label_dropout)  # drop a fraction label_dropout
        if self.null == "zero":
            onehot = onehot * keep
        y = (onehot * self.input_scale) @ w
        if self.bias:
            y = y + self.param(
                "bias", weight_init(self.winit.mode, *fans, self.winit.bias), fans[1:]
            )
        if self.null == "learned":
            null = self.param("null", nn.initializers.zeros, fans[1:])
            y = jnp.where(keep, y, null[None, :])
        return y


def song_label_map(label_dim: int, out_features: int, label_dropout: float, null: str) -> LabelMap:
    """SongUNet's map_label: xavier_uniform Linear with bias on labels * sqrt(label_dim)."""
    return LabelMap(
        label_dim,
        out_features,
        bias=True,
        winit=Init("xavier_uniform"),
        input_scale=math.sqrt(label_dim),
        label_dropout=label_dropout,
        null=null,
        name="map_label",
    )


def dhariwal_label_map(
    label_dim: int, out_features: int, label_dropout: float, null: str
) -> LabelMap:
    """DhariwalUNet's map_label: bias-free Linear, kaiming_normal scaled by sqrt(label_dim)."""
    return LabelMap(
        label_dim,
        out_features,
        bias=False,
        winit=Init("kaiming_normal", weight=math.sqrt(label_dim)),
        label_dropout=label_dropout,
        null=null,
        name="map_label",
    )
