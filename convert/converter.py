"""Load PyTorch FlexTok and diffusers VAE checkpoints into Flax, and write them back.

Loading is strict: every source tensor must land on a Flax parameter of the same
shape, and every Flax parameter must be filled, or a CheckpointError lists all
offenders. Tensors are read one at a time from the memory-mapped safetensors file,
so conversion never keeps two full copies of the weights.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save_file

from convert.layout import FLEXTOK_PREFIXES, VAE_PREFIXES, Transform, flax_to_torch, shape_after, torch_to_flax
from flextok_jax.config import (
    ConfigError,
    FlexTokConfig,
    VAEConfig,
    check_targets,
    config_from_hydra,
    parse_metadata_tree,
    vae_config_from_diffusers,
    vae_config_from_shapes,
)
from flextok_jax.files import atomic_path, atomic_write_text
from flextok_jax.model import FlexTokModel
from flextok_jax.vae import AutoencoderKL

logger = logging.getLogger("flextok_jax.convert")

SUPPORTED_DTYPES = ("float32", "float16", "bfloat16")
_MAX_LISTED = 20


class CheckpointError(ValueError):
    """A checkpoint file or directory that cannot be converted."""


@dataclass
class LoadedCheckpoint:
    """A converted model and the configs it was built from."""

    model: Any  # FlexTokModel or AutoencoderKL
    config: Any  # FlexTokConfig or VAEConfig
    source_config: dict  # the hydra tree, or the diffusers VAE config
    source_dtypes: tuple[str, ...]


# --- Reading ---------------------------------------------------------------------------


def _open(path: Path):
    if not path.is_file():
        raise CheckpointError(f"checkpoint file {path} not found")
    try:
        return safe_open(str(path), framework="numpy")
    except (SafetensorError, OSError, ValueError) as err:
        raise CheckpointError(
            f"{path} is not a readable safetensors file ({err}); it may be truncated or in "
            "another format, so download or export it again"
        ) from err


def _read_shapes(handle) -> dict[str, tuple[int, ...]]:
    return {key: tuple(handle.get_slice(key).get_shape()) for key in handle.keys()}


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise CheckpointError(f"cannot read config {path}: {err}") from err
    if not isinstance(data, dict):
        raise CheckpointError(f"config {path} contains {type(data).__name__}, expected a JSON object")
    return data


def _format_list(items: list[str]) -> str:
    listed = ", ".join(items[:_MAX_LISTED])
    more = f" and {len(items) - _MAX_LISTED} more" if len(items) > _MAX_LISTED else ""
    return listed + more


# --- Planning --------------------------------------------------------------------------


def abstract_params(factory: Callable[[], nnx.Module]) -> dict[str, jax.ShapeDtypeStruct]:
    """Flat `path -> ShapeDtypeStruct` of a module's parameters, built without allocating."""
    module = nnx.eval_shape(factory)
    flat = nnx.to_flat_state(nnx.state(module, nnx.Param))
    return {".".join(str(part) for part in path): var.get_value() for path, var in flat}


def plan_conversion(
    source_shapes: Mapping[str, tuple[int, ...]],
    target: Mapping[str, Any],
    prefixes=FLEXTOK_PREFIXES,
) -> dict[str, tuple[str, Transform]]:
    """Map every source key to (Flax path, transform), checking names and shapes.

    Raises CheckpointError listing missing tensors, unexpected tensors and shape
    mismatches together.
    """
    plan: dict[str, tuple[str, Transform]] = {}
    unexpected, mismatched = [], []
    seen: set[str] = set()
    for key, shape in source_shapes.items():
        path, transform = torch_to_flax(key, len(shape), prefixes)
        if path not in target:
            unexpected.append(key)
            continue
        seen.add(path)
        expected = tuple(target[path].shape)
        converted = shape_after(transform, shape)
        if converted != expected:
            mismatched.append(f"{key} {list(shape)} (expected {list(expected)} after {transform.name})")
            continue
        plan[key] = (path, transform)
    # A key with the wrong shape is reported as mismatched, not also as missing.
    missing = sorted(flax_to_torch(path, len(target[path].shape), prefixes)[0] for path in target if path not in seen)
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing tensor(s): {_format_list(missing)}")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected tensor(s): {_format_list(sorted(unexpected))}")
    if mismatched:
        problems.append(f"{len(mismatched)} shape mismatch(es): {_format_list(sorted(mismatched))}")
    if problems:
        raise CheckpointError("checkpoint does not match the model config: " + "; ".join(problems))
    return plan


def _fill(
    factory: Callable[[], nnx.Module],
    handle,
    plan: Mapping[str, tuple[str, Transform]],
    param_dtype: Any,
) -> nnx.Module:
    """Build the module with converted tensors, reading and placing one tensor at a time."""
    abstract = nnx.eval_shape(factory)
    graphdef, state = nnx.split(abstract)
    values: dict[str, jax.Array] = {}
    for key, (path, transform) in plan.items():
        array = transform.to_flax(handle.get_tensor(key))
        if param_dtype is not None:
            array = array.astype(param_dtype)
        values[path] = jnp.asarray(np.ascontiguousarray(array))
        del array
    flat = []
    for path, var in nnx.to_flat_state(state):
        name = ".".join(str(part) for part in path)
        if name in values:
            flat.append((path, var.replace(values.pop(name))))
        else:
            flat.append((path, var))
    return nnx.merge(graphdef, nnx.from_flat_state(flat))


def _source_dtypes(handle) -> tuple[str, ...]:
    dtypes = sorted({str(handle.get_slice(key).get_dtype()) for key in handle.keys()})
    names = {"F32": "float32", "F16": "float16", "BF16": "bfloat16"}
    unsupported = [d for d in dtypes if d not in names]
    if unsupported:
        raise CheckpointError(f"checkpoint tensors have dtype {unsupported}; only float32, float16 and bfloat16 are supported")
    return tuple(names[d] for d in dtypes)


def _param_dtype(dtype: str | None):
    if dtype is None:
        return None
    if dtype not in SUPPORTED_DTYPES:
        raise CheckpointError(f"parameter dtype {dtype!r} is not supported; use one of {SUPPORTED_DTYPES}")
    return jnp.dtype(dtype)


# --- FlexTok ---------------------------------------------------------------------------


def _flextok_files(source: Path) -> tuple[Path, dict[str, Any] | None]:
    """Return the weights file and, for hub directories, the config tree from config.json."""
    if not source.exists():
        raise CheckpointError(f"checkpoint path {source} not found")
    if source.is_dir():
        weights = source / "model.safetensors"
        config = source / "config.json"
        if not weights.is_file():
            raise CheckpointError(f"{source} has no model.safetensors; pass a FlexTok hub directory or a .safetensors file")
        return weights, (_read_json(config) if config.is_file() else None)
    if source.suffix != ".safetensors":
        raise CheckpointError(f"{source} is not a .safetensors file or a checkpoint directory")
    return source, None


def load_flextok(source: str | Path, *, dtype: str | None = None, compute_dtype=None) -> LoadedCheckpoint:
    """Convert a FlexTok checkpoint (hub directory or single .safetensors) into a FlexTokModel.

    `dtype` casts the stored parameters (None keeps the checkpoint's dtype);
    `compute_dtype` sets the activations' dtype (None follows the inputs).
    """
    source = Path(source)
    weights, tree = _flextok_files(source)
    handle = _open(weights)
    if tree is None:
        metadata = handle.metadata() or {}
        try:
            tree = parse_metadata_tree(metadata)
        except ConfigError as err:
            raise CheckpointError(f"{weights}: {err}") from err
    shapes = _read_shapes(handle)
    try:
        check_targets(tree)
        vae_shape = vae_config_from_shapes(shapes, "vae.vae.", VAEConfig(latent_channels=int(tree.get("vae", {}).get("latent_channels", 16))))
        config = config_from_hydra(tree, vae=vae_shape)
    except ConfigError as err:
        raise CheckpointError(f"{source}: {err}") from err

    def factory():
        return FlexTokModel(config, rngs=nnx.Rngs(0), dtype=compute_dtype)

    param_dtype = _param_dtype(dtype)
    source_dtypes = _source_dtypes(handle)
    plan = plan_conversion(shapes, abstract_params(factory), FLEXTOK_PREFIXES)
    model = _fill(factory, handle, plan, param_dtype)
    logger.info("converted %d tensors (%s) from %s", len(plan), ", ".join(source_dtypes), weights)
    return LoadedCheckpoint(model=model, config=config, source_config=dict(tree), source_dtypes=source_dtypes)


def load_vae(source: str | Path, *, dtype: str | None = None, compute_dtype=None) -> LoadedCheckpoint:
    """Convert a diffusers AutoencoderKL directory (config.json + diffusion_pytorch_model.safetensors)."""
    source = Path(source)
    if not source.exists():
        raise CheckpointError(f"VAE path {source} not found")
    if not source.is_dir():
        raise CheckpointError(f"{source} is not a directory; pass a diffusers VAE directory")
    raw = _read_json(source / "config.json")
    try:
        config = vae_config_from_diffusers(raw)
    except ConfigError as err:
        raise CheckpointError(f"{source / 'config.json'}: {err}") from err
    handle = _open(source / "diffusion_pytorch_model.safetensors")

    def factory():
        return AutoencoderKL(config, rngs=nnx.Rngs(0), dtype=compute_dtype)

    param_dtype = _param_dtype(dtype)
    source_dtypes = _source_dtypes(handle)
    plan = plan_conversion(_read_shapes(handle), abstract_params(factory), VAE_PREFIXES)
    model = _fill(factory, handle, plan, param_dtype)
    logger.info("converted %d VAE tensors (%s) from %s", len(plan), ", ".join(source_dtypes), source)
    return LoadedCheckpoint(model=model, config=config, source_config=raw, source_dtypes=source_dtypes)


# --- Writing ---------------------------------------------------------------------------


def _torch_tensors(module: nnx.Module, prefixes) -> dict[str, np.ndarray]:
    tensors = {}
    for path, var in nnx.to_flat_state(nnx.state(module, nnx.Param)):
        name = ".".join(str(part) for part in path)
        array = np.asarray(var.get_value())
        key, transform = flax_to_torch(name, array.ndim, prefixes)
        tensors[key] = np.ascontiguousarray(transform.to_torch(array))
    return tensors


def _atomic_save(tensors: dict[str, np.ndarray], out: Path, metadata: dict[str, str]) -> None:
    with atomic_path(out) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)


def hydra_metadata(tree: Mapping[str, Any]) -> dict[str, str]:
    """Encode the tree as the reference does: one metadata entry per top-level key, its Python repr."""
    return {key: repr(value) for key, value in tree.items()}


def save_flextok_safetensors(model: FlexTokModel, tree: Mapping[str, Any], out: str | Path) -> Path:
    """Write a FlexTokModel as a PyTorch-layout `model.safetensors` with the hydra tree in metadata.

    When `out` is a directory, `config.json` is written beside the weights, giving the
    hub layout.
    """
    out = Path(out)
    tensors = _torch_tensors(model, FLEXTOK_PREFIXES)
    if out.suffix != ".safetensors":
        _atomic_save(tensors, out / "model.safetensors", hydra_metadata(tree))
        atomic_write_text(out / "config.json", json.dumps(tree, indent=2))
        return out / "model.safetensors"
    _atomic_save(tensors, out, hydra_metadata(tree))
    return out


def save_vae_safetensors(vae: AutoencoderKL, diffusers_config: Mapping[str, Any], out_dir: str | Path) -> Path:
    """Write an AutoencoderKL as a diffusers directory."""
    out_dir = Path(out_dir)
    _atomic_save(_torch_tensors(vae, VAE_PREFIXES), out_dir / "diffusion_pytorch_model.safetensors", {"format": "pt"})
    atomic_write_text(out_dir / "config.json", json.dumps(dict(diffusers_config), indent=2))
    return out_dir
