"""flextok-jax: a JAX/Flax NNX port of FlexTok, the ordered 1-D image tokenizer."""

from flextok_jax.api import FlexTok
from flextok_jax.config import ConfigError, FlexTokConfig

__all__ = ["ConfigError", "FlexTok", "FlexTokConfig"]
__version__ = "0.1.0"
