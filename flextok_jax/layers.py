"""Transformer building blocks shared by the FlexTok encoder and flow decoder.

Axis legend: B batch, T tokens, H heads, K head dim, D width, F MLP hidden width.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from flextok_jax.config import TransformerConfig


def layer_norm(x: jax.Array, eps: float = 1e-5) -> jax.Array:
    """LayerNorm over the last axis with no scale or bias, computed in float32.

    Every LayerNorm in the reference transformer is of this kind (`Fp32LayerNorm`
    with `elementwise_affine=False`).
    """
    x32 = x.astype(jnp.float32)
    mean = jnp.mean(x32, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
    return ((x32 - mean) * jax.lax.rsqrt(var + eps)).astype(x.dtype)


def modulate(x: jax.Array, shift: jax.Array, scale: jax.Array) -> jax.Array:
    return x * (1.0 + scale) + shift


def linear(in_features: int, out_features: int, *, bias: bool, rngs: nnx.Rngs, dtype=None, param_dtype=jnp.float32) -> nnx.Linear:
    return nnx.Linear(in_features, out_features, use_bias=bias, dtype=dtype, param_dtype=param_dtype, rngs=rngs)


class Attention(nnx.Module):
    """Multi-head self-attention with QK-norm and the reference's `8 / head_dim` scale."""

    def __init__(self, cfg: TransformerConfig, *, rngs: nnx.Rngs, dtype=None):
        dim = cfg.dim
        self.num_heads = cfg.num_heads
        self.head_dim = cfg.head_dim
        self.qk_norm = cfg.qk_norm
        self.wq = linear(dim, dim, bias=False, rngs=rngs, dtype=dtype)
        self.wk = linear(dim, dim, bias=False, rngs=rngs, dtype=dtype)
        self.wv = linear(dim, dim, bias=False, rngs=rngs, dtype=dtype)
        self.proj = linear(dim, dim, bias=False, rngs=rngs, dtype=dtype)

    def __call__(self, x: jax.Array, mask: jax.Array | None) -> jax.Array:
        """x [B, T, D]; mask [T, T] bool (True where attention is allowed) or None."""
        batch, tokens, _ = x.shape

        # [B, T, H, K]
        q = self.wq(x).reshape(batch, tokens, self.num_heads, self.head_dim)
        k = self.wk(x).reshape(batch, tokens, self.num_heads, self.head_dim)
        v = self.wv(x).reshape(batch, tokens, self.num_heads, self.head_dim)
        if self.qk_norm:
            q = layer_norm(q)
            k = layer_norm(k)

        # muP scaling: 8 / K equals the usual 1 / sqrt(K) only at K = 64.
        # jax.nn.dot_product_attention picks a fused kernel where the backend has one.
        out = jax.nn.dot_product_attention(
            q, k, v, mask=None if mask is None else mask[None, None], scale=8.0 / self.head_dim
        )
        return self.proj(out.reshape(batch, tokens, -1))


class Mlp(nnx.Module):
    """SwiGLU `fc2(silu(fc1(x)) * fc3(x))`, or plain `fc2(silu(fc1(x)))`, without biases."""

    def __init__(self, cfg: TransformerConfig, *, rngs: nnx.Rngs, dtype=None):
        hidden = cfg.mlp_hidden
        self.fc1 = linear(cfg.dim, hidden, bias=False, rngs=rngs, dtype=dtype)
        self.fc2 = linear(hidden, cfg.dim, bias=False, rngs=rngs, dtype=dtype)
        self.fc3 = linear(cfg.dim, hidden, bias=False, rngs=rngs, dtype=dtype) if cfg.gated_mlp else None

    def __call__(self, x: jax.Array) -> jax.Array:
        hidden = jax.nn.silu(self.fc1(x))
        if self.fc3 is not None:
            hidden = hidden * self.fc3(x)
        return self.fc2(hidden)


class Block(nnx.Module):
    """Pre-norm transformer block, optionally adaLN-zero modulated by a time embedding."""

    def __init__(self, cfg: TransformerConfig, *, rngs: nnx.Rngs, dtype=None):
        self.expansion = cfg.adaln_expansion
        self.attn = Attention(cfg, rngs=rngs, dtype=dtype)
        self.mlp = Mlp(cfg, rngs=rngs, dtype=dtype)
        if self.expansion:
            self.adaLN_modulation = linear(cfg.dim, self.expansion * 6 * cfg.dim, bias=True, rngs=rngs, dtype=dtype)
        else:
            self.adaLN_modulation = None

    def __call__(
        self,
        x: jax.Array,
        mask: jax.Array | None,
        temb: jax.Array | None = None,
        num_patches: int = 0,
    ) -> jax.Array:
        """x [B, T, D]; temb [B, D] for adaLN blocks, whose first `num_patches` tokens are patches."""
        if self.adaLN_modulation is None:
            x = x + self.attn(layer_norm(x), mask)
            return x + self.mlp(layer_norm(x))

        mod = self.adaLN_modulation(jax.nn.silu(temb))  # [B, E * 6D]
        if self.expansion == 2:
            # The first 6D modulate patch tokens, the second 6D register tokens.
            patch_mod, register_mod = jnp.split(mod, 2, axis=-1)
            is_patch = (jnp.arange(x.shape[1]) < num_patches)[None, :, None]
            mod = jnp.where(is_patch, patch_mod[:, None, :], register_mod[:, None, :])  # [B, T, 6D]
        else:
            mod = mod[:, None, :]  # [B, 1, 6D]
        gate_attn, gate_mlp, shift_attn, scale_attn, shift_mlp, scale_mlp = jnp.split(mod, 6, axis=-1)

        x = x + gate_attn * self.attn(modulate(layer_norm(x), shift_attn, scale_attn), mask)
        return x + gate_mlp * self.mlp(modulate(layer_norm(x), shift_mlp, scale_mlp))


class Transformer(nnx.Module):
    def __init__(self, cfg: TransformerConfig, *, rngs: nnx.Rngs, dtype=None):
        self.blocks = nnx.List([Block(cfg, rngs=rngs, dtype=dtype) for _ in range(cfg.depth)])

    def __call__(self, x: jax.Array, mask: jax.Array | None, temb: jax.Array | None = None, num_patches: int = 0) -> jax.Array:
        for block in self.blocks:
            x = block(x, mask, temb, num_patches)
        return x
