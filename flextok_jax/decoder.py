"""FlexTok rectified-flow decoder: one call maps noised latents and codes to a velocity.

Attribute names follow the reference's module_dict keys (`dec_transformer.blocks.0`).
Axis legend: B batch, h x w latent grid, C latent channels, N patches, R registers,
D width, L code dimension.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from flextok_jax.config import DecoderConfig
from flextok_jax.embeddings import timestep_embedding, unpatchify
from flextok_jax.encoder import GridPositionTable, PatchEmbedder
from flextok_jax.layers import Transformer, layer_norm, linear, modulate


class LinearLayer(nnx.Module):
    def __init__(self, dim_in: int, dim: int, *, rngs: nnx.Rngs, dtype=None):
        self.proj = linear(dim_in, dim, bias=True, rngs=rngs, dtype=dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.proj(x)


class SequencePositionTable(nnx.Module):
    """Learned 1-D table [Rmax, D] added to the register tokens."""

    def __init__(self, length: int, dim: int, *, rngs: nnx.Rngs):
        self.posembs = nnx.Param(jax.random.normal(rngs.params(), (length, dim)) * 0.02)


class MaskToken(nnx.Module):
    """Nested dropout's mask token [D], written over registers at positions >= k."""

    def __init__(self, dim: int, *, rngs: nnx.Rngs):
        self.dropout_mask_token = nnx.Param(jax.random.normal(rngs.params(), (dim,)) * 0.02)


class LearnedNullCond(nnx.Module):
    """Learned null condition [D] that replaces every register in the unconditional pass."""

    def __init__(self, dim: int, *, rngs: nnx.Rngs):
        self.nullcond = nnx.Param(jax.random.normal(rngs.params(), (dim,)) * 0.02)


class TimestepEmbedder(nnx.Module):
    """Sin-cos embedding of t, then Linear -> SiLU -> Linear.

    fc1 and fc2 are the reference's `mlp.0` and `mlp.2` (index 1 is the SiLU).
    """

    def __init__(self, dim: int, max_timestep: float, *, rngs: nnx.Rngs, dtype=None, frequency_dim: int = 256):
        self.max_timestep = max_timestep
        self.frequency_dim = frequency_dim
        self.fc1 = linear(frequency_dim, dim, bias=True, rngs=rngs, dtype=dtype)
        self.fc2 = linear(dim, dim, bias=True, rngs=rngs, dtype=dtype)

    def __call__(self, t: jax.Array) -> jax.Array:
        emb = timestep_embedding(t, self.max_timestep, self.frequency_dim)
        return self.fc2(jax.nn.silu(self.fc1(emb)))


class ToPatchesHead(nnx.Module):
    """adaLN-modulated LayerNorm, Linear to p*p*C, un-patchify."""

    def __init__(self, dim: int, channels: int, patch: int, *, rngs: nnx.Rngs, dtype=None):
        self.channels = channels
        self.patch = patch
        self.adaLN_modulation = linear(dim, 2 * dim, bias=True, rngs=rngs, dtype=dtype)
        self.proj = linear(dim, channels * patch * patch, bias=True, rngs=rngs, dtype=dtype)

    def __call__(self, patches: jax.Array, temb: jax.Array, grid_h: int, grid_w: int) -> jax.Array:
        """patches [B, N, D], temb [B, D] -> latents [B, h, w, C]."""
        shift, scale = jnp.split(self.adaLN_modulation(jax.nn.silu(temb))[:, None, :], 2, axis=-1)
        x = self.proj(modulate(layer_norm(patches), shift, scale))
        return unpatchify(x.reshape(x.shape[0], grid_h, grid_w, -1), self.patch, self.channels)


class FlowDecoder(nnx.Module):
    def __init__(self, cfg: DecoderConfig, *, rngs: nnx.Rngs, dtype=None):
        dim = cfg.transformer.dim
        self.cfg = cfg
        self.dec_from_latents = LinearLayer(cfg.code_dim, dim, rngs=rngs, dtype=dtype)
        self.dec_registers_posemb_module = SequencePositionTable(cfg.num_registers, dim, rngs=rngs)
        self.dec_nested_dropout = MaskToken(dim, rngs=rngs)
        self.dec_latent_dropout = LearnedNullCond(dim, rngs=rngs) if cfg.null_cond == "learned" else None
        self.dec_noise_patch_emb = PatchEmbedder(cfg.latent_channels, cfg.patch_size, dim, rngs=rngs, dtype=dtype)
        self.dec_patches_posemb_module = GridPositionTable(cfg.posemb_grid, dim)
        self.dec_time_embedder = TimestepEmbedder(dim, cfg.max_timestep, rngs=rngs, dtype=dtype)
        self.dec_transformer = Transformer(cfg.transformer, rngs=rngs, dtype=dtype)
        self.dec_to_patches = ToPatchesHead(dim, cfg.latent_channels, cfg.patch_size, rngs=rngs, dtype=dtype)

    def condition(self, codes: jax.Array, keep: jax.Array, unconditional: jax.Array) -> jax.Array:
        """Register tokens [B, R, D] from codes [B, R, L], kept lengths [B] and null flags [B]."""
        num_registers = codes.shape[1]
        registers = self.dec_from_latents(codes)
        registers = registers + self.dec_registers_posemb_module.posembs[...][:num_registers].astype(registers.dtype)

        # Nested dropout: positions >= k carry the mask token, without a position.
        position = jnp.arange(num_registers)[None, :, None]
        mask_token = self.dec_nested_dropout.dropout_mask_token[...].astype(registers.dtype)
        registers = jnp.where(position >= keep[:, None, None], mask_token, registers)

        # Null condition for the unconditional pass of guidance.
        if self.dec_latent_dropout is not None:
            null = self.dec_latent_dropout.nullcond[...].astype(registers.dtype)
        else:
            null = jnp.zeros((), registers.dtype)
        return jnp.where(unconditional[:, None, None], null, registers)

    def __call__(
        self,
        noised: jax.Array,
        t: jax.Array,
        codes: jax.Array,
        keep: jax.Array,
        unconditional: jax.Array,
    ) -> jax.Array:
        """Velocity [B, h, w, C] for noised latents [B, h, w, C] at times t [B].

        codes [B, R, L] are FSQ codes; registers at positions >= keep [B] are masked;
        rows with unconditional [B] set get the null condition instead of their codes.
        """
        registers = self.condition(codes, keep, unconditional)

        patches = self.dec_noise_patch_emb(noised)  # [B, gh, gw, D]
        batch, grid_h, grid_w, dim = patches.shape
        num_patches = grid_h * grid_w
        patches = patches.reshape(batch, num_patches, dim) + self.dec_patches_posemb_module(grid_h, grid_w).astype(patches.dtype)

        temb = self.dec_time_embedder(t)
        tokens = jnp.concatenate([patches, registers.astype(patches.dtype)], axis=1)  # [B, N + R, D]
        tokens = self.dec_transformer(tokens, None, temb, num_patches)
        velocity = self.dec_to_patches(tokens[:, :num_patches], temb, grid_h, grid_w)
        return velocity.astype(jnp.float32)
