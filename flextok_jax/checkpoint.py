"""Save and load converted models: an orbax checkpoint of the parameters plus our config.

Layout of a converted directory:
  flextok_config.json   FlexTokConfig fields and the format version
  hydra_config.json     the reference's hydra tree, kept for conversion back to PyTorch
  params/               orbax StandardCheckpointer output
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp
from flax import nnx

from flextok_jax.config import ConfigError, FlexTokConfig
from flextok_jax.files import make_public_dir
from flextok_jax.model import FlexTokModel

logger = logging.getLogger("flextok_jax.checkpoint")

CONFIG_FILE = "flextok_config.json"
HYDRA_FILE = "hydra_config.json"
PARAMS_DIR = "params"
FORMAT_VERSION = 1


def is_converted_dir(path: Path) -> bool:
    return path.is_dir() and (path / CONFIG_FILE).is_file()


def check_output_dir(out_dir: Path, overwrite: bool) -> None:
    """Raise unless `out_dir` is new, empty, or a converted directory that may be replaced."""
    if not out_dir.exists():
        return
    if is_converted_dir(out_dir):
        if not overwrite:
            raise FileExistsError(f"{out_dir} already contains a converted model; pass --overwrite (overwrite=True) to replace it")
        return
    if out_dir.is_dir() and not any(out_dir.iterdir()):
        return
    raise FileExistsError(f"{out_dir} exists and is not a flextok-jax model directory; choose a new output path")


def save_converted(model: FlexTokModel, hydra_tree: dict[str, Any] | None, out_dir: str | Path, *, overwrite: bool = False) -> Path:
    """Write `model` to `out_dir`, replacing it only once the new copy is complete.

    An existing `out_dir` must be empty, or a converted directory with `overwrite` set:
    nothing else is ever deleted.
    """
    out_dir = Path(out_dir).absolute()
    check_output_dir(out_dir, overwrite)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}."))
    make_public_dir(staging)
    try:
        params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
        checkpointer = ocp.StandardCheckpointer()
        checkpointer.save(staging / PARAMS_DIR, params)
        checkpointer.wait_until_finished()
        config = {"format_version": FORMAT_VERSION, **model.cfg.to_dict()}
        (staging / CONFIG_FILE).write_text(json.dumps(config, indent=2))
        if hydra_tree is not None:
            (staging / HYDRA_FILE).write_text(json.dumps(hydra_tree, indent=2))
        if out_dir.exists():
            # check_output_dir allowed this: an empty or a converted directory.
            # A fresh empty directory as the rename target, so no other path is touched.
            backup = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}.old."))
            os.replace(out_dir, backup)
            os.replace(staging, out_dir)
            shutil.rmtree(backup, ignore_errors=True)
        else:
            os.replace(staging, out_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    logger.info("saved converted model to %s", out_dir)
    return out_dir


def load_converted(path: str | Path, *, compute_dtype=None) -> tuple[FlexTokModel, dict[str, Any] | None]:
    """Load a directory written by `save_converted`; returns (model, hydra tree or None)."""
    path = Path(path).absolute()
    try:
        raw = json.loads((path / CONFIG_FILE).read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise ConfigError(f"cannot read {path / CONFIG_FILE}: {err}") from err
    version = raw.pop("format_version", None)
    if version != FORMAT_VERSION:
        raise ConfigError(f"{path} has format version {version}; this flextok-jax reads version {FORMAT_VERSION}")
    config = FlexTokConfig.from_dict(raw)
    hydra_file = path / HYDRA_FILE
    hydra_tree = json.loads(hydra_file.read_text()) if hydra_file.is_file() else None

    abstract = nnx.eval_shape(lambda: FlexTokModel(config, rngs=nnx.Rngs(0), dtype=compute_dtype))
    graphdef, params, rest = nnx.split(abstract, nnx.Param, ...)
    target = jax.tree.map(lambda leaf: leaf, nnx.to_pure_dict(params))
    restored = ocp.StandardCheckpointer().restore(path / PARAMS_DIR, target)
    nnx.replace_by_pure_dict(params, restored)
    return nnx.merge(graphdef, params, rest), hydra_tree
