"""Patching, stored position tables and the timestep embedding.

Axis legend: B batch, h x w latent grid, C latent channels, p patch size,
N patches, D width.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp


def patchify(latents: jax.Array, patch: int) -> jax.Array:
    """Cut [B, h, w, C] into p x p patches, [B, h/p, w/p, p*p*C].

    A patch's features are ordered (row in patch, column in patch, channel), as in the
    reference's PatchEmbedder.
    """
    batch, height, width, channels = latents.shape
    if height % patch or width % patch:
        raise ValueError(f"latent grid {height}x{width} is not divisible by the patch size {patch}")
    # [B, h/p, p, w/p, p, C] -> [B, h/p, w/p, p, p, C]
    x = latents.reshape(batch, height // patch, patch, width // patch, patch, channels)
    x = x.transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(batch, height // patch, width // patch, patch * patch * channels)


def unpatchify(patches: jax.Array, patch: int, channels: int) -> jax.Array:
    """Inverse of `patchify`: [B, gh, gw, p*p*C] -> [B, gh*p, gw*p, C]."""
    batch, grid_h, grid_w, _ = patches.shape
    x = patches.reshape(batch, grid_h, grid_w, patch, patch, channels)
    x = x.transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(batch, grid_h * patch, grid_w * patch, channels)


def crop_grid_table(table: jax.Array, grid_h: int, grid_w: int) -> jax.Array:
    """Top-left crop of a stored [Hmax, Wmax, D] position table, flattened to [N, D].

    The reference crops rather than interpolates, so larger grids than stored fail.
    """
    max_h, max_w, dim = table.shape
    if grid_h > max_h or grid_w > max_w:
        raise ValueError(
            f"patch grid {grid_h}x{grid_w} exceeds the stored position table {max_h}x{max_w}; "
            "use a smaller image"
        )
    return table[:grid_h, :grid_w].reshape(grid_h * grid_w, dim)


def timestep_embedding(t: jax.Array, max_timestep: float, dim: int = 256) -> jax.Array:
    """Sinusoidal embedding of t [B] -> [B, dim], cos half first.

    The reference uses a max period of 256 (not the usual 10000) and scales t by
    1000 / max_timestep.
    """
    half = dim // 2
    freqs = (1000.0 / max_timestep) * jnp.exp(-math.log(256.0) * jnp.arange(half, dtype=jnp.float32) / half)
    args = t.astype(jnp.float32)[:, None] * freqs[None, :]
    return jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)
