"""Strict converter between the PyTorch FlexTok checkpoints and flextok-jax's Flax state."""

from convert.converter import (
    CheckpointError,
    LoadedCheckpoint,
    load_flextok,
    load_vae,
    plan_conversion,
    save_flextok_safetensors,
    save_vae_safetensors,
)

__all__ = [
    "CheckpointError",
    "LoadedCheckpoint",
    "load_flextok",
    "load_vae",
    "plan_conversion",
    "save_flextok_safetensors",
    "save_vae_safetensors",
]
