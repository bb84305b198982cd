"""The whole FlexTok network: VAE, encoder, FSQ and flow decoder in one NNX module.

Axis legend: B batch, H x W pixels, h x w latent grid, C latent channels,
R registers, L code dimension.
"""

from __future__ import annotations

import jax
from flax import nnx

from flextok_jax.config import FlexTokConfig
from flextok_jax.decoder import FlowDecoder
from flextok_jax.encoder import FlexTokEncoder
from flextok_jax.fsq import FSQ
from flextok_jax.vae import AutoencoderKL


class FlexTokModel(nnx.Module):
    """Parameters and forward functions; sampling and input checks live in `FlexTok`."""

    def __init__(self, cfg: FlexTokConfig, *, rngs: nnx.Rngs, dtype=None):
        self.cfg = cfg
        self.vae = AutoencoderKL(cfg.vae, rngs=rngs, dtype=dtype)
        self.encoder = FlexTokEncoder(cfg.encoder, rngs=rngs, dtype=dtype)
        self.decoder = FlowDecoder(cfg.decoder, rngs=rngs, dtype=dtype)

    @property
    def fsq(self) -> FSQ:
        return FSQ(self.cfg.fsq.levels)

    def encode_registers(self, latents: jax.Array) -> jax.Array:
        """Scaled VAE latents [B, h, w, C] -> unquantized registers [B, R, L]."""
        return self.encoder(latents)

    def tokenize_latents(self, latents: jax.Array) -> tuple[jax.Array, jax.Array]:
        """Scaled VAE latents [B, h, w, C] -> (FSQ codes [B, R, L], int32 ids [B, R])."""
        codes = self.fsq.quantize(self.encoder(latents))
        return codes, self.fsq.codes_to_ids(codes)
