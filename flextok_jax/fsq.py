"""Finite scalar quantization (Mentzer et al., 2023) as FlexTok configures it.

Axis legend: B batch, R registers, L number of levels (the code dimension).
"""

from __future__ import annotations

import numpy as np
import jax
import jax.numpy as jnp


class FSQ:
    """Quantize [..., L] vectors to the grid given by `levels`, and convert codes <-> ids."""

    def __init__(self, levels: tuple[int, ...]):
        self.levels = tuple(int(level) for level in levels)
        levels_np = np.asarray(self.levels, dtype=np.int64)
        self.codebook_size = int(np.prod(levels_np))
        # basis[i] = prod(levels[:i]): the first dimension is the least significant digit.
        self._basis = np.concatenate([[1], np.cumprod(levels_np[:-1])]).astype(np.int64)
        self._half_width = levels_np // 2

    def bound(self, z: jax.Array) -> jax.Array:
        """Squash z [..., L] into each level's range; even levels are shifted by 0.5."""
        levels = jnp.asarray(self.levels, jnp.float32)
        half_l = (levels - 1) * (1 + 1e-3) / 2
        offset = jnp.where(levels % 2 == 0, 0.5, 0.0)
        shift = jnp.arctanh(offset / half_l)
        return jnp.tanh(z.astype(jnp.float32) + shift) * half_l - offset

    def quantize(self, z: jax.Array) -> jax.Array:
        """z [..., L] -> codes [..., L], each coordinate in [-1, 1] (round half to even)."""
        half_width = jnp.asarray(self._half_width, jnp.float32)
        return jnp.round(self.bound(z)) / half_width

    def codes_to_ids(self, codes: jax.Array) -> jax.Array:
        """codes [..., L] -> int32 ids [...] in [0, codebook_size)."""
        half_width = jnp.asarray(self._half_width, jnp.float32)
        digits = jnp.round(codes * half_width + half_width).astype(jnp.int32)
        return jnp.sum(digits * jnp.asarray(self._basis, jnp.int32), axis=-1)

    def ids_to_codes(self, ids: jax.Array) -> jax.Array:
        """ids [...] -> codes [..., L] in float32.

        Like the reference, ids outside [0, codebook_size) wrap around modulo each
        level (codebook_size decodes like 0, -1 like codebook_size - 1) with no error;
        the public API validates ids before they get here.
        """
        ids = jnp.asarray(ids).astype(jnp.int32)[..., None]
        basis = jnp.asarray(self._basis, jnp.int32)
        levels = jnp.asarray(self.levels, jnp.int32)
        half_width = jnp.asarray(self._half_width, jnp.int32)
        digits = jnp.mod(jnp.floor_divide(ids, basis), levels)
        return (digits - half_width).astype(jnp.float32) / half_width.astype(jnp.float32)
