"""OpenAI guided-diffusion networks (``guided_diffusion/unet.py``) on the ADM U-Net, NHWC.

``UNetModel`` is the network NVlabs ported as ``DhariwalUNet``, so ``openai_unet`` returns a
``DhariwalUNet`` with guided-diffusion's options (GroupNorm32, qkv layout, fixed heads, conv
resampling); ``EncoderUNet`` is the noisy-image classifier (``EncoderUNetModel``, attention
pool). ``create_model`` / ``create_classifier`` take ``script_util.py``'s arguments, and
``GUIDED_DIFFUSION_MODELS`` / ``GUIDED_DIFFUSION_CLASSIFIERS`` are the released models'
README flags. Apply: ``net.apply({'params': p}, x [B,H,W,3], t [B] float, y [B] int | None)``
-> [B,H,W,6] (eps, then the variance interpolation, with learned sigma) and
``classifier.apply({'params': p}, x, t)`` -> logits [B, 1000].
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from edm_jax.nets.dhariwal_unet import INIT, DhariwalUNet, dhariwal_unet_plan
from edm_jax.nets.layers import GroupNorm, Linear, split_qkv

Array = jax.Array

# create_model / create_classifier channel_mult when the flag is empty (script_util.py:151,221).
DEFAULT_CHANNEL_MULT: dict[int, tuple[float, ...]] = {
    512: (0.5, 1, 1, 2, 2, 4, 4),
    256: (1, 1, 2, 2, 4, 4),
    128: (1, 1, 2, 3, 4),
    64: (1, 2, 3, 4),
}


def _channel_mult(image_size: int, channel_mult: str | tuple = "") -> tuple[float, ...]:
    """script_util's channel_mult: the flag's integers, or the default by image size."""
    if isinstance(channel_mult, tuple | list):
        return tuple(channel_mult)
    if channel_mult:
        return tuple(int(m) for m in channel_mult.split(","))
    if image_size not in DEFAULT_CHANNEL_MULT:
        raise ValueError(
            f"no default channel_mult for image_size {image_size}; "
            f"valid: {sorted(DEFAULT_CHANNEL_MULT)} (or pass channel_mult)"
        )
    return DEFAULT_CHANNEL_MULT[image_size]


def _heads(num_heads: int, num_head_channels: int, num_heads_upsample: int = -1) -> dict:
    """UNetBlock head fields from guided-diffusion's num_heads / num_head_channels."""
    if num_heads_upsample not in (-1, num_heads) and num_head_channels == -1:
        raise ValueError(
            f"num_heads_upsample {num_heads_upsample} != num_heads {num_heads} is not supported"
        )
    if num_head_channels == -1:
        return dict(num_heads=num_heads, channels_per_head=64)
    return dict(num_heads=None, channels_per_head=num_head_channels)


def openai_unet(
    image_size: int,
    in_channels: int,
    model_channels: int,
    out_channels: int,
    num_res_blocks: int,
    attention_resolutions: tuple[int, ...],
    dropout: float = 0.0,
    channel_mult: tuple[float, ...] = (1, 2, 4, 8),
    num_classes: int | None = None,
    num_heads: int = 1,
    num_head_channels: int = -1,
    num_heads_upsample: int = -1,
    use_scale_shift_norm: bool = False,
    resblock_updown: bool = False,
    use_new_attention_order: bool = False,
    dtype: Any = jnp.float32,
) -> DhariwalUNet:
    """guided-diffusion ``UNetModel(...)`` (attention_resolutions are downsample rates)."""
    return DhariwalUNet(
        img_resolution=image_size,
        in_channels=in_channels,
        out_channels=out_channels,
        label_dim=num_classes or 0,
        model_channels=model_channels,
        channel_mult=tuple(channel_mult),
        num_blocks=num_res_blocks,
        attn_resolutions=tuple(image_size // ds for ds in attention_resolutions),
        dropout=dropout,
        adaptive_scale=use_scale_shift_norm,
        resblock_updown=resblock_updown,
        min_channels_per_group=1,  # GroupNorm32 (nn.py:17)
        qkv_layout="new" if use_new_attention_order else "legacy",
        dtype=dtype,
        **_heads(num_heads, num_head_channels, num_heads_upsample),
    )


def create_model(
    image_size: int,
    num_channels: int,
    num_res_blocks: int,
    channel_mult: str | tuple = "",
    learn_sigma: bool = False,
    class_cond: bool = False,
    attention_resolutions: str = "16",
    num_heads: int = 1,
    num_head_channels: int = -1,
    num_heads_upsample: int = -1,
    use_scale_shift_norm: bool = False,
    dropout: float = 0.0,
    resblock_updown: bool = False,
    use_new_attention_order: bool = False,
    use_checkpoint: bool = False,
    use_fp16: bool = False,
    dtype: Any = jnp.float32,
) -> DhariwalUNet:
    """guided-diffusion ``script_util.create_model`` (same arguments).

    use_checkpoint and use_fp16 are accepted and ignored: ``dtype`` sets the compute type.
    """
    return openai_unet(
        image_size,
        in_channels=3,
        model_channels=num_channels,
        out_channels=6 if learn_sigma else 3,
        num_res_blocks=num_res_blocks,
        attention_resolutions=tuple(image_size // int(r) for r in attention_resolutions.split(",")),
        dropout=dropout,
        channel_mult=_channel_mult(image_size, channel_mult),
        num_classes=1000 if class_cond else None,
        num_heads=num_heads,
        num_head_channels=num_head_channels,
        num_heads_upsample=num_heads_upsample,
        use_scale_shift_norm=use_scale_shift_norm,
        resblock_updown=resblock_updown,
        use_new_attention_order=use_new_attention_order,
        dtype=dtype,
    )


class AttentionPool2d(nn.Module):
    """CLIP-style attention pooling (unet.py:22): mean token first, QKVAttention (new order)."""

    spacial_dim: int
    embed_dim: int
    num_heads_channels: int
    output_dim: int

    @nn.compact
    def __call__(self, x: Array) -> Array:
        """x [B,H,W,C] (H = W = spacial_dim) -> [B, output_dim] (the mean token's output)."""
        B, H, W, C = x.shape
        if H != self.spacial_dim or W != self.spacial_dim:
            raise ValueError(f"AttentionPool2d expects {self.spacial_dim}^2 inputs; got {H}x{W}")
        tokens = x.reshape(B, H * W, C).astype(jnp.float32)
        tokens = jnp.concatenate([tokens.mean(axis=1, keepdims=True), tokens], axis=1)
        init = lambda key, shape: jax.random.normal(key, shape) / C**0.5  # noqa: E731
        tokens = tokens + self.param("positional_embedding", init, (H * W + 1, C))[None]
        qkv = Linear(C, 3 * C, winit=INIT, name="qkv_proj")(tokens)  # [B, T, 3C]
        q, k, v = split_qkv(qkv, C // self.num_heads_channels, "new")  # [B, T, N, d]
        a = jax.nn.dot_product_attention(q, k, v)  # softmax(q k^T / sqrt(d)) v
        out = Linear(C, self.output_dim, winit=INIT, name="c_proj")(a.reshape(B, H * W + 1, C))
        return out[:, 0]


class EncoderUNet(DhariwalUNet):
    """guided-diffusion ``EncoderUNetModel`` with pool='attention': the noisy-image classifier.

    The encoder and middle block are DhariwalUNet's; out_channels is the number of classes.
    """

    @nn.compact
    def __call__(self, x, noise_labels, class_labels=None, augment_labels=None, *, train=False):
        """Logits of x [B,H,W,C] at timesteps noise_labels [B] -> float32 [B, out_channels]."""
        if class_labels is not None or augment_labels is not None:
            raise ValueError("the classifier takes (x, t) only: it predicts the class labels")
        if x.shape[1] != self.img_resolution:
            raise ValueError(
                f"classifier for {self.img_resolution}x{self.img_resolution} images got "
                f"{x.shape[1]}x{x.shape[2]}"
            )
        emb = self._embedding(noise_labels, None, None, train)
        enc, dec = dhariwal_unet_plan(self)
        x = x.astype(self.dtype)
        for s in enc:  # input_blocks
            x = self._layer("enc", s, x, emb, train)
        for s in dec[:2]:  # middle_block
            x = self._layer("dec", s, x, emb, train)
        C = dec[1].kwargs["out_channels"]
        mcpg = self.min_channels_per_group
        x = nn.silu(GroupNorm(C, min_channels_per_group=mcpg, name="out_norm")(x))
        side = self.img_resolution >> (len(self.channel_mult) - 1)
        heads_ch = C // self.num_heads if self.num_heads else self.channels_per_head
        return AttentionPool2d(side, C, heads_ch, self.out_channels, name="pool")(x)


def create_classifier(
    image_size: int,
    classifier_width: int,
    classifier_depth: int,
    classifier_attention_resolutions: str,
    classifier_use_scale_shift_norm: bool = True,
    classifier_resblock_updown: bool = True,
    classifier_pool: str = "attention",
    dtype: Any = jnp.float32,
) -> EncoderUNet:
    """guided-diffusion ``script_util.create_classifier`` (pool 'attention' only)."""
    if classifier_pool != "attention":
        raise ValueError(
            f"classifier_pool {classifier_pool!r} is not supported; valid: ['attention']"
        )
    res = tuple(int(r) for r in classifier_attention_resolutions.split(","))
    return EncoderUNet(
        img_resolution=image_size,
        in_channels=3,
        out_channels=1000,
        model_channels=classifier_width,
        channel_mult=_channel_mult(image_size),
        num_blocks=classifier_depth,
        attn_resolutions=res,
        dropout=0.0,
        adaptive_scale=classifier_use_scale_shift_norm,
        resblock_updown=classifier_resblock_updown,
        min_channels_per_group=1,
        qkv_layout="legacy",
        num_heads=None,
        channels_per_head=64,
        dtype=dtype,
    )


# Released guided-diffusion models: README MODEL_FLAGS as create_model arguments (noise
# schedule: 64x64 cosine, the rest linear; all learn sigma).
_COMMON = dict(
    attention_resolutions="32,16,8",
    learn_sigma=True,
    resblock_updown=True,
    use_scale_shift_norm=True,
)
GUIDED_DIFFUSION_MODELS: dict[str, dict[str, Any]] = {
    "64x64_diffusion": dict(
        _COMMON,
        image_size=64,
        class_cond=True,
        dropout=0.1,
        num_channels=192,
        num_head_channels=64,
        num_res_blocks=3,
        use_new_attention_order=True,
    ),
    "128x128_diffusion": dict(
        _COMMON, image_size=128, class_cond=True, num_channels=256, num_heads=4, num_res_blocks=2
    ),
    "256x256_diffusion": dict(
        _COMMON,
        image_size=256,
        class_cond=True,
        num_channels=256,
        num_head_channels=64,
        num_res_blocks=2,
    ),
    "256x256_diffusion_uncond": dict(
        _COMMON,
        image_size=256,
        class_cond=False,
        num_channels=256,
        num_head_channels=64,
        num_res_blocks=2,
    ),
    "512x512_diffusion": dict(
        _COMMON,
        image_size=512,
        class_cond=True,
        num_channels=256,
        num_head_channels=64,
        num_res_blocks=2,
    ),
}
NOISE_SCHEDULES: dict[str, str] = {
    "64x64_diffusion": "cosine",
    "128x128_diffusion": "linear",
    "256x256_diffusion": "linear",
    "256x256_diffusion_uncond": "linear",
    "512x512_diffusion": "linear",
}
_CLASSIFIER = dict(classifier_width=128, classifier_attention_resolutions="32,16,8")
GUIDED_DIFFUSION_CLASSIFIERS: dict[str, dict[str, Any]] = {
    "64x64_classifier": dict(_CLASSIFIER, image_size=64, classifier_depth=4),
    "128x128_classifier": dict(_CLASSIFIER, image_size=128, classifier_depth=2),
    "256x256_classifier": dict(_CLASSIFIER, image_size=256, classifier_depth=2),
    "512x512_classifier": dict(_CLASSIFIER, image_size=512, classifier_depth=2),
}


def released_model(name: str, dtype: Any = jnp.float32) -> DhariwalUNet:
    """The network of a released guided-diffusion model or classifier, by its file stem."""
    if name in GUIDED_DIFFUSION_MODELS:
        return create_model(**GUIDED_DIFFUSION_MODELS[name], dtype=dtype)
    if name in GUIDED_DIFFUSION_CLASSIFIERS:
        return create_classifier(**GUIDED_DIFFUSION_CLASSIFIERS[name], dtype=dtype)
    valid = sorted(GUIDED_DIFFUSION_MODELS) + sorted(GUIDED_DIFFUSION_CLASSIFIERS)
    raise ValueError(f"unknown guided-diffusion model {name!r}; valid: {valid}")
