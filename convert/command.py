"""`python -m convert` and `flextok-jax convert`: PyTorch checkpoints <-> converted directories."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Sequence

logger = logging.getLogger("flextok_jax.convert")


def run_convert(src: str, out: str, *, to_pytorch: bool = False, dtype: str | None = None, overwrite: bool = False) -> int:
    """Convert `src` to `out` and print one line saying what was written.

    Existing outputs are replaced only with `overwrite`, and never when `out` is `src`.
    """
    from convert.converter import CheckpointError, load_flextok, save_flextok_safetensors
    from flextok_jax.checkpoint import check_output_dir, is_converted_dir, load_converted, save_converted

    src_path = Path(src)
    out_path = Path(out)
    if out_path.exists() and out_path.resolve() == src_path.resolve():
        raise CheckpointError(f"output {out} is the source checkpoint; choose a new output path")
    if to_pytorch:
        targets = [out_path] if out_path.suffix == ".safetensors" else [out_path / "model.safetensors", out_path / "config.json"]
        existing = [str(t) for t in targets if t.exists()]
        if existing and not overwrite:
            raise FileExistsError(f"{', '.join(existing)} already exists; pass --overwrite to replace it")
    else:
        check_output_dir(out_path.absolute(), overwrite)
    if to_pytorch:
        if not is_converted_dir(src_path):
            raise CheckpointError(f"{src} is not a converted flextok-jax directory (no flextok_config.json)")
        model, tree = load_converted(src_path)
        if tree is None:
            raise CheckpointError(f"{src} has no hydra_config.json, so the PyTorch config cannot be written")
        written = save_flextok_safetensors(model, tree, out)
        print(f"wrote PyTorch checkpoint {written}")
        return 0

    loaded = load_flextok(src_path, dtype=dtype)
    written = save_converted(loaded.model, loaded.source_config, out, overwrite=overwrite)
    print(f"wrote converted model {written} ({', '.join(loaded.source_dtypes)} source tensors)")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    from flextok_jax.cli import add_convert_args

    parser = argparse.ArgumentParser(prog="python -m convert", description="Convert FlexTok checkpoints between PyTorch and flextok-jax.")
    add_convert_args(parser)
    args = parser.parse_args(argv)
    verbose = getattr(args, "verbose", False)
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, format="%(name)s: %(message)s")
    try:
        return run_convert(args.src, args.out, to_pytorch=args.to_pytorch, dtype=args.param_dtype, overwrite=args.overwrite)
    except (ValueError, OSError) as err:
        if verbose:
            raise
        print(f"convert: error: {err}", file=sys.stderr)
        return 1
