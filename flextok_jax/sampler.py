"""Rectified-flow Euler sampler with classifier-free or adaptive projected guidance.

The whole loop runs in one `jax.jit` as a `lax.fori_loop`. With guidance, the
conditional and unconditional passes go through the decoder as one batch of 2B.
Kept lengths and guidance scales are data, so one compiled function serves every
token count and every scale schedule of a given step count.

Axis legend: B batch, h x w latent grid, C latent channels, R registers, L code dim,
S steps.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import jax
import jax.numpy as jnp
from flextok_jax.decoder import FlowDecoder

APG_MOMENTUM = -0.5  # reference: MomentumBuffer(-0.5)
APG_NORM_THRESHOLD = 2.5  # reference: normalized_guidance(norm_threshold=2.5)
APG_ETA = 0.0  # weight of the component parallel to the conditional prediction


@dataclass(frozen=True)
class SamplerOptions:
    """Static sampler settings: each distinct value compiles once."""

    steps: int
    guided: bool  # False: guidance scale 1, no unconditional pass
    apg: bool  # adaptive projected guidance instead of classifier-free guidance


def _norm(x: jax.Array) -> jax.Array:
    """L2 norm per image over (h, w, C), keeping dims: [B, h, w, C] -> [B, 1, 1, 1]."""
    return jnp.sqrt(jnp.sum(jnp.square(x), axis=(1, 2, 3), keepdims=True))


def apg_update(cond: jax.Array, uncond: jax.Array, scale: jax.Array, buffer: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Apply one APG step (Sadat et al., 2024), as the reference's `normalized_guidance`.

    Returns (guided velocity, new momentum buffer); all arrays [B, h, w, C].
    NOTE: the reference projects in float64; this runs in float32, which the golden
    APG fixtures accept at 1e-4 relative error.
    """
    diff = cond - uncond
    buffer = diff + APG_MOMENTUM * buffer
    diff = buffer
    diff = diff * jnp.minimum(1.0, APG_NORM_THRESHOLD / _norm(diff))

    # torch.nn.functional.normalize: v / max(||v||, 1e-12).
    unit = cond / jnp.maximum(_norm(cond), 1e-12)
    parallel = jnp.sum(diff * unit, axis=(1, 2, 3), keepdims=True) * unit
    orthogonal = diff - parallel
    guided = cond + (scale - 1.0) * (orthogonal + APG_ETA * parallel)
    return guided, buffer


def cfg_update(cond: jax.Array, uncond: jax.Array, scale: jax.Array) -> jax.Array:
    return uncond + scale * (cond - uncond)


def sample(
    decoder: FlowDecoder,
    codes: jax.Array,
    keep: jax.Array,
    noise: jax.Array,
    scales: jax.Array,
    options: SamplerOptions,
) -> jax.Array:
    """Integrate from noise at t = 1 to latents at t = 0 with Euler steps.

    codes [B, R, L], keep [B] int, noise [B, h, w, C], scales [S] (the guidance scale
    at t = 1, (S-1)/S, ..., 1/S). Returns latents [B, h, w, C].
    """
    steps = options.steps
    dt = 1.0 / steps
    batch = noise.shape[0]

    if options.guided:
        # [cond; uncond] share the decoder call.
        codes_in = jnp.concatenate([codes, codes], axis=0)
        keep_in = jnp.concatenate([keep, keep], axis=0)
        uncond_in = jnp.concatenate([jnp.zeros((batch,), bool), jnp.ones((batch,), bool)])
    else:
        codes_in, keep_in, uncond_in = codes, keep, jnp.zeros((batch,), bool)

    def step(i, carry):
        x, buffer = carry
        t = (steps - i) / steps
        if options.guided:
            t_in = jnp.full((2 * batch,), t, jnp.float32)
            velocity = decoder(jnp.concatenate([x, x], axis=0), t_in, codes_in, keep_in, uncond_in)
            cond, uncond = jnp.split(velocity, 2, axis=0)
            scale = scales[i]
            if options.apg:
                velocity, buffer = apg_update(cond, uncond, scale, buffer)
            else:
                velocity = cfg_update(cond, uncond, scale)
        else:
            velocity = decoder(x, jnp.full((batch,), t, jnp.float32), codes_in, keep_in, uncond_in)
        return x - dt * velocity.astype(x.dtype), buffer

    x0 = noise.astype(jnp.float32)
    latents, _ = jax.lax.fori_loop(0, steps, step, (x0, jnp.zeros_like(x0)))
    return latents


def guidance_schedule(guidance_scale, steps: int) -> tuple[jax.Array, bool]:
    """Evaluate a constant or callable guidance scale at each step's t.

    Returns (scales [S] float32, guided). As in the reference, a callable always runs
    the unconditional pass and a constant runs it only when it differs from 1.
    """
    times = [(steps - i) / steps for i in range(steps)]
    if callable(guidance_scale):
        values = [float(guidance_scale(t)) for t in times]
        bad = [(t, v) for t, v in zip(times, values) if not math.isfinite(v)]
        if bad:
            raise ValueError(f"guidance_scale({bad[0][0]:g}) returned {bad[0][1]}; the scale must be finite at every step")
        return jnp.asarray(values, jnp.float32), True
    value = float(guidance_scale)
    if not math.isfinite(value):
        raise ValueError(f"guidance_scale={guidance_scale!r} is not finite")
    return jnp.full((steps,), value, jnp.float32), value != 1.0
