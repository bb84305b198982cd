"""Boolean attention masks, True where a query token may attend to a key token.

Each image is its own sequence here, so no mask needs to separate images or hide
padding, unlike the reference's packed FlexAttention sequences.
"""

from __future__ import annotations

import jax.numpy as jnp


def causal_last_mask(num_patches: int, num_registers: int) -> jnp.ndarray:
    """Encoder mask over [patches, registers], shape [T, T] with T = N + R.

    Patches attend to every patch and no register. Register i attends to every
    patch and to registers 0..i, which is what orders the 1-D token sequence.
    """
    total = num_patches + num_registers
    query = jnp.arange(total)[:, None]
    key = jnp.arange(total)[None, :]
    key_is_patch = key < num_patches
    query_is_register = query >= num_patches
    causal_register = query_is_register & (key >= num_patches) & (key <= query)
    return key_is_patch | causal_register


def full_mask(num_tokens: int) -> jnp.ndarray:
    """Decoder mask: every token attends to every token of its image, shape [T, T]."""
    return jnp.ones((num_tokens, num_tokens), dtype=bool)
