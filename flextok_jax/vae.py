"""AutoencoderKL (the diffusers VAE that FlexTok tokenizes in), in Flax NNX, NHWC.

Attribute names follow diffusers' state-dict paths (`down_blocks.0.resnets.1.conv2`)
so the converter only renames leaves and transposes kernels.
Axis legend: B batch, H x W pixels or feature grid, C channels.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
from flax import nnx

from flextok_jax.config import VAEConfig

GROUP_NORM_EPS = 1e-6  # diffusers' VAE blocks use 1e-6, not torch's default 1e-5.


class GroupNorm(nnx.Module):
    """GroupNorm over NHWC features, computed in float32 like torch's."""

    def __init__(self, num_groups: int, channels: int, *, eps: float = GROUP_NORM_EPS):
        self.num_groups = num_groups
        self.eps = eps
        self.scale = nnx.Param(jnp.ones((channels,), jnp.float32))
        self.bias = nnx.Param(jnp.zeros((channels,), jnp.float32))

    def __call__(self, x: jax.Array) -> jax.Array:
        batch, height, width, channels = x.shape
        x32 = x.astype(jnp.float32).reshape(batch, height, width, self.num_groups, channels // self.num_groups)
        mean = jnp.mean(x32, axis=(1, 2, 4), keepdims=True)
        var = jnp.mean(jnp.square(x32 - mean), axis=(1, 2, 4), keepdims=True)
        x32 = ((x32 - mean) * jax.lax.rsqrt(var + self.eps)).reshape(batch, height, width, channels)
        out = x32 * self.scale[...].astype(jnp.float32) + self.bias[...].astype(jnp.float32)
        return out.astype(x.dtype)


def conv(in_ch: int, out_ch: int, kernel: int, *, rngs: nnx.Rngs, dtype=None, stride: int = 1, padding="SAME") -> nnx.Conv:
    if kernel == 3 and padding == "SAME":
        padding = ((1, 1), (1, 1))  # torch's padding=1, explicit so stride never changes it
    return nnx.Conv(in_ch, out_ch, (kernel, kernel), strides=(stride, stride), padding=padding, dtype=dtype, rngs=rngs)


class ResnetBlock2D(nnx.Module):
    def __init__(self, in_ch: int, out_ch: int, groups: int, *, rngs: nnx.Rngs, dtype=None):
        self.norm1 = GroupNorm(groups, in_ch)
        self.conv1 = conv(in_ch, out_ch, 3, rngs=rngs, dtype=dtype)
        self.norm2 = GroupNorm(groups, out_ch)
        self.conv2 = conv(out_ch, out_ch, 3, rngs=rngs, dtype=dtype)
        self.conv_shortcut = conv(in_ch, out_ch, 1, rngs=rngs, dtype=dtype, padding="VALID") if in_ch != out_ch else None

    def __call__(self, x: jax.Array) -> jax.Array:
        h = self.conv1(jax.nn.silu(self.norm1(x)))
        h = self.conv2(jax.nn.silu(self.norm2(h)))
        if self.conv_shortcut is not None:
            x = self.conv_shortcut(x)
        return x + h


class Downsample2D(nnx.Module):
    """3x3 stride-2 convolution after padding one row and column at the bottom and right."""

    def __init__(self, channels: int, *, rngs: nnx.Rngs, dtype=None):
        self.conv = conv(channels, channels, 3, rngs=rngs, dtype=dtype, stride=2, padding="VALID")

    def __call__(self, x: jax.Array) -> jax.Array:
        x = jnp.pad(x, ((0, 0), (0, 1), (0, 1), (0, 0)))
        return self.conv(x)


class Upsample2D(nnx.Module):
    """Nearest-neighbour 2x upsampling, then a 3x3 convolution."""

    def __init__(self, channels: int, *, rngs: nnx.Rngs, dtype=None):
        self.conv = conv(channels, channels, 3, rngs=rngs, dtype=dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
        return self.conv(x)


class SpatialAttention(nnx.Module):
    """Single-head self-attention over all pixels with a residual (diffusers `Attention`)."""

    def __init__(self, channels: int, groups: int, *, rngs: nnx.Rngs, dtype=None):
        self.group_norm = GroupNorm(groups, channels)
        self.to_q = nnx.Linear(channels, channels, dtype=dtype, rngs=rngs)
        self.to_k = nnx.Linear(channels, channels, dtype=dtype, rngs=rngs)
        self.to_v = nnx.Linear(channels, channels, dtype=dtype, rngs=rngs)
        # A list to keep diffusers' `to_out.0` path; its index 1 is a parameter-free dropout.
        self.to_out = nnx.List([nnx.Linear(channels, channels, dtype=dtype, rngs=rngs)])

    def __call__(self, x: jax.Array) -> jax.Array:
        batch, height, width, channels = x.shape
        h = self.group_norm(x).reshape(batch, height * width, channels)
        q, k, v = self.to_q(h), self.to_k(h), self.to_v(h)
        logits = jnp.einsum("bqc,bkc->bqk", q, k) / jnp.sqrt(jnp.asarray(channels, jnp.float32)).astype(q.dtype)
        probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1).astype(v.dtype)
        out = self.to_out[0](jnp.einsum("bqk,bkc->bqc", probs, v))
        return x + out.reshape(batch, height, width, channels)


class MidBlock(nnx.Module):
    def __init__(self, channels: int, groups: int, add_attention: bool, *, rngs: nnx.Rngs, dtype=None):
        self.resnets = nnx.List([ResnetBlock2D(channels, channels, groups, rngs=rngs, dtype=dtype) for _ in range(2)])
        self.attentions = nnx.List([SpatialAttention(channels, groups, rngs=rngs, dtype=dtype)] if add_attention else [])

    def __call__(self, x: jax.Array) -> jax.Array:
        x = self.resnets[0](x)
        for attention in self.attentions:
            x = attention(x)
        return self.resnets[1](x)


class DownBlock(nnx.Module):
    def __init__(self, in_ch: int, out_ch: int, layers: int, groups: int, downsample: bool, *, rngs: nnx.Rngs, dtype=None):
        self.resnets = nnx.List(
            [ResnetBlock2D(in_ch if i == 0 else out_ch, out_ch, groups, rngs=rngs, dtype=dtype) for i in range(layers)]
        )
        self.downsamplers = nnx.List([Downsample2D(out_ch, rngs=rngs, dtype=dtype)] if downsample else [])

    def __call__(self, x: jax.Array) -> jax.Array:
        for resnet in self.resnets:
            x = resnet(x)
        for downsampler in self.downsamplers:
            x = downsampler(x)
        return x


class UpBlock(nnx.Module):
    def __init__(self, in_ch: int, out_ch: int, layers: int, groups: int, upsample: bool, *, rngs: nnx.Rngs, dtype=None):
        self.resnets = nnx.List(
            [ResnetBlock2D(in_ch if i == 0 else out_ch, out_ch, groups, rngs=rngs, dtype=dtype) for i in range(layers)]
        )
        self.upsamplers = nnx.List([Upsample2D(out_ch, rngs=rngs, dtype=dtype)] if upsample else [])

    def __call__(self, x: jax.Array) -> jax.Array:
        for resnet in self.resnets:
            x = resnet(x)
        for upsampler in self.upsamplers:
            x = upsampler(x)
        return x


class VAEEncoder(nnx.Module):
    def __init__(self, cfg: VAEConfig, *, rngs: nnx.Rngs, dtype=None):
        widths = cfg.block_out_channels
        groups = cfg.norm_num_groups
        self.conv_in = conv(cfg.in_channels, widths[0], 3, rngs=rngs, dtype=dtype)
        blocks = []
        for i, width in enumerate(widths):
            previous = widths[max(i - 1, 0)]
            last = i == len(widths) - 1
            blocks.append(DownBlock(previous, width, cfg.layers_per_block, groups, not last, rngs=rngs, dtype=dtype))
        self.down_blocks = nnx.List(blocks)
        self.mid_block = MidBlock(widths[-1], groups, cfg.mid_block_add_attention, rngs=rngs, dtype=dtype)
        self.conv_norm_out = GroupNorm(groups, widths[-1])
        self.conv_out = conv(widths[-1], 2 * cfg.latent_channels, 3, rngs=rngs, dtype=dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = self.conv_in(x)
        for block in self.down_blocks:
            x = block(x)
        x = self.mid_block(x)
        return self.conv_out(jax.nn.silu(self.conv_norm_out(x)))


class VAEDecoder(nnx.Module):
    def __init__(self, cfg: VAEConfig, *, rngs: nnx.Rngs, dtype=None):
        widths = tuple(reversed(cfg.block_out_channels))
        groups = cfg.norm_num_groups
        self.conv_in = conv(cfg.latent_channels, widths[0], 3, rngs=rngs, dtype=dtype)
        self.mid_block = MidBlock(widths[0], groups, cfg.mid_block_add_attention, rngs=rngs, dtype=dtype)
        blocks = []
        for i, width in enumerate(widths):
            previous = widths[max(i - 1, 0)]
            last = i == len(widths) - 1
            blocks.append(UpBlock(previous, width, cfg.layers_per_block + 1, groups, not last, rngs=rngs, dtype=dtype))
        self.up_blocks = nnx.List(blocks)
        self.conv_norm_out = GroupNorm(groups, widths[-1])
        self.conv_out = conv(widths[-1], cfg.out_channels, 3, rngs=rngs, dtype=dtype)

    def __call__(self, z: jax.Array) -> jax.Array:
        x = self.conv_in(z)
        x = self.mid_block(x)
        for block in self.up_blocks:
            x = block(x)
        return self.conv_out(jax.nn.silu(self.conv_norm_out(x)))


class AutoencoderKL(nnx.Module):
    """The VAE. `encode` returns scaled latents, `decode` takes them back to pixels."""

    def __init__(self, cfg: VAEConfig, *, rngs: nnx.Rngs, dtype=None):
        self.cfg = cfg
        self.encoder = VAEEncoder(cfg, rngs=rngs, dtype=dtype)
        self.decoder = VAEDecoder(cfg, rngs=rngs, dtype=dtype)
        moments = 2 * cfg.latent_channels
        self.quant_conv = conv(moments, moments, 1, rngs=rngs, dtype=dtype, padding="VALID") if cfg.use_quant_conv else None
        latents = cfg.latent_channels
        self.post_quant_conv = conv(latents, latents, 1, rngs=rngs, dtype=dtype, padding="VALID") if cfg.use_post_quant_conv else None

    def posterior(self, images: jax.Array) -> tuple[jax.Array, jax.Array]:
        """Images [B, H, W, 3] in [-1, 1] -> posterior (mean, logvar), each [B, H/f, W/f, C]."""
        moments = self.encoder(images)
        if self.quant_conv is not None:
            moments = self.quant_conv(moments)
        mean, logvar = jnp.split(moments, 2, axis=-1)
        return mean, jnp.clip(logvar, -30.0, 20.0)

    def encode(
        self,
        images: jax.Array,
        rng: jax.Array | None = None,
        noise_fn: Callable[[tuple[int, ...]], jax.Array] | None = None,
    ) -> jax.Array:
        """Images [B, H, W, 3] -> latents [B, H/f, W/f, C] times `scaling_factor`.

        Returns the posterior mean, or a sample when the config sets `sample_posterior`:
        its noise comes from `noise_fn(shape)` if given, else from the PRNG key `rng`.
        """
        mean, logvar = self.posterior(images)
        latents = mean
        if self.cfg.sample_posterior:
            if noise_fn is not None:
                noise = noise_fn(mean.shape)
            elif rng is not None:
                noise = jax.random.normal(rng, mean.shape, jnp.float32)
            else:
                raise ValueError("this VAE samples its posterior (sample_posterior=True); pass a PRNG key as rng")
            latents = mean + jnp.exp(0.5 * logvar) * noise.astype(mean.dtype)
        return latents * self.cfg.scaling_factor

    def decode(self, latents: jax.Array) -> jax.Array:
        """Scaled latents [B, h, w, C] -> images [B, h*f, w*f, 3], roughly in [-1, 1]."""
        z = latents / self.cfg.scaling_factor
        if self.post_quant_conv is not None:
            z = self.post_quant_conv(z)
        return self.decoder(z)
