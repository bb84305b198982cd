"""Key names and tensor layouts: PyTorch state dict <-> Flax NNX state.

The Flax modules mirror the reference's module tree, so a key changes only by the
renames below plus a leaf rename (`weight` -> `kernel` or `scale`). Tensors change
only by a transpose or by dropping size-1 axes: every transform is a view, so it can
also be applied to a zero-stride stand-in array to learn the output shape without
allocating the weights.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

# (PyTorch, Flax) key prefixes for a FlexTok checkpoint.
FLEXTOK_PREFIXES = (
    ("vae.vae.", "vae."),  # the reference wraps diffusers' AutoencoderKL in StableDiffusionVAE
    ("encoder.module_dict.", "encoder."),  # SequentialModuleDictWrapper has no parameters
    ("decoder.module_dict.", "decoder."),
)
# A stand-alone diffusers AutoencoderKL maps onto the Flax VAE module as it is.
VAE_PREFIXES = (("", ""),)

# (PyTorch, Flax) infixes, applied after the prefixes.
INFIXES = (
    # nn.Sequential(SiLU, Linear): index 0 has no parameters.
    (".adaLN_modulation.1.", ".adaLN_modulation."),
    # nn.Sequential(Linear, SiLU, Linear) in TimestepEmbedder.
    (".dec_time_embedder.mlp.0.", ".dec_time_embedder.fc1."),
    (".dec_time_embedder.mlp.2.", ".dec_time_embedder.fc2."),
)


@dataclass(frozen=True)
class Transform:
    """One tensor layout change, with its inverse."""

    name: str
    to_flax: Callable[[np.ndarray], np.ndarray]
    to_torch: Callable[[np.ndarray], np.ndarray]


IDENTITY = Transform("identity", lambda a: a, lambda a: a)
# torch Linear [out, in] <-> Flax [in, out].
LINEAR = Transform("linear", lambda a: a.T, lambda a: a.T)
# torch Conv2d [out, in, kh, kw] <-> Flax [kh, kw, in, out].
CONV = Transform("conv", lambda a: a.transpose(2, 3, 1, 0), lambda a: a.transpose(3, 2, 0, 1))
# Stored 2-D position table [1, D, H, W] <-> [H, W, D].
GRID_TABLE = Transform("grid_table", lambda a: a[0].transpose(1, 2, 0), lambda a: a.transpose(2, 0, 1)[None])
# Stored 1-D position table [1, 1, D, R] <-> [R, D].
SEQUENCE_TABLE = Transform("sequence_table", lambda a: a[0, 0].T, lambda a: a.T[None, None])


def _swap(key: str, pairs, forward: bool) -> str:
    for torch_part, flax_part in pairs:
        src, dst = (torch_part, flax_part) if forward else (flax_part, torch_part)
        if key.startswith(src):
            return dst + key[len(src) :]
    return key


def _infixes(key: str, forward: bool) -> str:
    padded = "." + key
    for torch_part, flax_part in INFIXES:
        src, dst = (torch_part, flax_part) if forward else (flax_part, torch_part)
        padded = padded.replace(src, dst)
    return padded[1:]


def torch_to_flax(key: str, ndim: int, prefixes) -> tuple[str, Transform]:
    """Map a PyTorch key and its rank to the Flax path and the layout transform."""
    path = _infixes(_swap(key, prefixes, forward=True), forward=True)
    head, _, leaf = path.rpartition(".")
    if leaf == "weight":
        if ndim == 2:
            return f"{head}.kernel", LINEAR
        if ndim == 4:
            return f"{head}.kernel", CONV
        if ndim == 1:
            return f"{head}.scale", IDENTITY  # GroupNorm affine weight
    if leaf == "posembs":
        if ndim == 4 and key.endswith("dec_registers_posemb_module.posembs"):
            return path, SEQUENCE_TABLE
        if ndim == 4:
            return path, GRID_TABLE
    return path, IDENTITY


def flax_to_torch(path: str, ndim: int, prefixes) -> tuple[str, Transform]:
    """Inverse of `torch_to_flax`: Flax path and rank -> PyTorch key and transform."""
    head, _, leaf = path.rpartition(".")
    transform = IDENTITY
    if leaf == "kernel":
        leaf, transform = "weight", (LINEAR if ndim == 2 else CONV)
    elif leaf == "scale":
        leaf = "weight"
    elif leaf == "posembs":
        transform = SEQUENCE_TABLE if ndim == 2 else GRID_TABLE
    key = f"{head}.{leaf}" if head else leaf
    key = _infixes(key, forward=False)
    return _swap(key, prefixes, forward=False), transform


def shape_after(transform: Transform, shape: tuple[int, ...], to_flax: bool = True) -> tuple[int, ...]:
    """Output shape of a transform, computed on a zero-stride view (no allocation)."""
    stand_in = np.broadcast_to(np.zeros((), np.float32), tuple(shape))
    fn = transform.to_flax if to_flax else transform.to_torch
    try:
        return tuple(fn(stand_in).shape)
    except (IndexError, ValueError):
        return (-1,)  # the source rank does not fit this layout
