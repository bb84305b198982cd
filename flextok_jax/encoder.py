"""FlexTok encoder: VAE latent patches in, R ordered register vectors out.

Attribute names follow the reference's module_dict keys (`enc_patch_emb.patch_proj`).
Axis legend: B batch, h x w latent grid, C latent channels, N patches, R registers,
D width, L code dimension.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from flextok_jax.config import EncoderConfig
from flextok_jax.embeddings import crop_grid_table, patchify
from flextok_jax.layers import Transformer, layer_norm, linear
from flextok_jax.masks import causal_last_mask


class PatchEmbedder(nnx.Module):
    def __init__(self, channels: int, patch: int, dim: int, *, rngs: nnx.Rngs, dtype=None):
        self.patch = patch
        self.patch_proj = linear(channels * patch * patch, dim, bias=True, rngs=rngs, dtype=dtype)

    def __call__(self, latents: jax.Array) -> jax.Array:
        """[B, h, w, C] -> [B, h/p, w/p, D]."""
        return self.patch_proj(patchify(latents, self.patch))


class GridPositionTable(nnx.Module):
    """Frozen 2-D sin-cos table [Hmax, Wmax, D], loaded from the checkpoint, not recomputed."""

    def __init__(self, grid: tuple[int, int], dim: int):
        self.posembs = nnx.Param(jnp.zeros((*grid, dim), jnp.float32))

    def __call__(self, grid_h: int, grid_w: int) -> jax.Array:
        return crop_grid_table(self.posembs[...], grid_h, grid_w)


class Registers(nnx.Module):
    def __init__(self, num_registers: int, dim: int, *, rngs: nnx.Rngs):
        self.registers = nnx.Param(jax.random.normal(rngs.params(), (num_registers, dim)) * 0.02)


class LinearHead(nnx.Module):
    """Parameter-free LayerNorm, then Linear with bias."""

    def __init__(self, dim: int, dim_out: int, *, rngs: nnx.Rngs, dtype=None):
        self.proj = linear(dim, dim_out, bias=True, rngs=rngs, dtype=dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.proj(layer_norm(x))


class FlexTokEncoder(nnx.Module):
    def __init__(self, cfg: EncoderConfig, *, rngs: nnx.Rngs, dtype=None):
        dim = cfg.transformer.dim
        self.cfg = cfg
        self.dtype = dtype
        self.enc_patch_emb = PatchEmbedder(cfg.latent_channels, cfg.patch_size, dim, rngs=rngs, dtype=dtype)
        self.enc_posemb_module = GridPositionTable(cfg.posemb_grid, dim)
        self.enc_register_module = Registers(cfg.num_registers, dim, rngs=rngs)
        self.enc_transformer = Transformer(cfg.transformer, rngs=rngs, dtype=dtype)
        self.enc_to_latents = LinearHead(dim, cfg.code_dim, rngs=rngs, dtype=dtype)

    def __call__(self, latents: jax.Array) -> jax.Array:
        """Scaled VAE latents [B, h, w, C] -> register outputs before quantization [B, R, L]."""
        patches = self.enc_patch_emb(latents)  # [B, gh, gw, D]
        batch, grid_h, grid_w, dim = patches.shape
        num_patches = grid_h * grid_w
        patches = patches.reshape(batch, num_patches, dim) + self.enc_posemb_module(grid_h, grid_w)

        registers = self.enc_register_module.registers[...]
        registers = jnp.broadcast_to(registers[None].astype(patches.dtype), (batch, *registers.shape))
        tokens = jnp.concatenate([patches, registers], axis=1)  # [B, N + R, D]

        mask = causal_last_mask(num_patches, self.cfg.num_registers)
        tokens = self.enc_transformer(tokens, mask)
        return self.enc_to_latents(tokens[:, num_patches:]).astype(jnp.float32)
