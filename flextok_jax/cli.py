"""The `flextok-jax` command line: tokenize, detokenize, reconstruct and convert."""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Sequence

import numpy as np

logger = logging.getLogger("flextok_jax.cli")

PARTS_SUFFIX = ".parts"


class CommandError(Exception):
    """A failure to report as one line, with exit status 1."""


# --- Shared helpers ----------------------------------------------------------------------


def _load_model(name: str, dtype: str):
    from flextok_jax import FlexTok

    logger.info("loading model %s", name)
    return FlexTok.from_pretrained(name, dtype=dtype)


def _progress(total: int, desc: str, initial: int = 0):
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, desc=desc, unit="img", file=sys.stderr, disable=None)


def _atomic_savez(path: Path, **arrays: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            np.savez(handle, **arrays)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _guidance_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--steps", type=int, default=20, help="Euler steps of the flow sampler (default 20)")
    parser.add_argument(
        "--guidance", type=float, default=7.5, help="guidance scale; 1 disables guidance and halves the cost (default 7.5)"
    )
    parser.add_argument(
        "--no-apg", action="store_true", help="use classifier-free guidance instead of adaptive projected guidance"
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the starting noise; row i uses fold_in(seed, i) (default 0)")


def _row_noise(seed: int, rows: Sequence[int], shape: tuple[int, int, int]) -> np.ndarray:
    """Starting noise per output row, independent of batching and of resumed runs."""
    import jax

    base = jax.random.PRNGKey(seed)
    keys = jax.vmap(lambda i: jax.random.fold_in(base, i))(np.asarray(rows, np.uint32))
    return np.asarray(jax.vmap(lambda key: jax.random.normal(key, shape))(keys))


# --- tokenize ------------------------------------------------------------------------------


def _read_parts(parts_dir: Path) -> tuple[dict[str, np.ndarray], str | None]:
    done: dict[str, np.ndarray] = {}
    model = None
    for part in sorted(parts_dir.glob("part-*.npz")):
        with np.load(part) as data:
            model = str(data["model"])
            for path, row in zip(data["paths"], data["tokens"]):
                done[str(path)] = row
    return done, model


def cmd_tokenize(args: argparse.Namespace) -> int:
    from flextok_jax.images import ImageReadError, find_images, load_image

    out = Path(args.out)
    parts_dir = out.with_name(out.name + PARTS_SUFFIX)
    if args.batch_size < 1:
        raise CommandError(f"--batch-size {args.batch_size} is invalid; pass a positive number of images")
    if args.limit is not None and args.limit < 1:
        raise CommandError(f"--limit {args.limit} is invalid; pass a positive number of images")
    try:
        paths = [str(p) for p in find_images(args.paths)]
    except FileNotFoundError as err:
        raise CommandError(str(err)) from err
    if not paths:
        raise CommandError(f"no images found in {' '.join(args.paths)}")

    if args.overwrite:
        shutil.rmtree(parts_dir, ignore_errors=True)
        out.unlink(missing_ok=True)

    # Resume: rows already in the output file or in finished batch files are kept.
    done: dict[str, np.ndarray] = {}
    if out.exists():
        with np.load(out) as data:
            done.update({str(p): row for p, row in zip(data["paths"], data["tokens"])})
            previous_model = str(data["model"])
        if previous_model != args.model:
            raise CommandError(f"{out} contains tokens of model {previous_model}, not {args.model}; pass --overwrite or another --out")
    if parts_dir.is_dir():
        parts, parts_model = _read_parts(parts_dir)
        if parts_model is not None and parts_model != args.model:
            raise CommandError(f"{parts_dir} contains tokens of model {parts_model}, not {args.model}; pass --overwrite")
        done.update(parts)
    todo = [p for p in paths if p not in done]
    if done:
        logger.info("resuming: %d of %d images already tokenized", len(paths) - len(todo), len(paths))
    if args.limit is not None:
        todo = todo[: args.limit]

    failed: list[tuple[str, str]] = []
    if todo:
        model = _load_model(args.model, args.dtype)
        size = args.image_size or model.image_size
        parts_dir.mkdir(parents=True, exist_ok=True)
        next_part = len(list(parts_dir.glob("part-*.npz")))
        progress = _progress(len(paths), "tokenize", initial=len(paths) - len(todo) - 0)

        def read(path: str):
            try:
                return load_image(path, size), None
            except ImageReadError as err:
                return None, str(err)

        with ThreadPoolExecutor(max_workers=4) as pool:
            for start in range(0, len(todo), args.batch_size):
                batch_paths = todo[start : start + args.batch_size]
                images, kept = [], []
                for path, (image, error) in zip(batch_paths, pool.map(read, batch_paths)):
                    if error is not None:
                        failed.append((path, error))
                        logger.warning("skipping %s", error)
                        continue
                    images.append(image)
                    kept.append(path)
                if images:
                    tokens = np.asarray(model.tokenize(np.stack(images)), np.int32)
                    _atomic_savez(
                        parts_dir / f"part-{next_part:06d}.npz",
                        tokens=tokens,
                        paths=np.asarray(kept),
                        model=np.asarray(args.model),
                    )
                    next_part += 1
                    done.update(zip(kept, tokens))
                progress.update(len(batch_paths))
        progress.close()

    remaining = [p for p in paths if p not in done and p not in {f for f, _ in failed}]
    finished = [p for p in paths if p in done]
    if finished and not remaining:
        _atomic_savez(
            out,
            tokens=np.stack([done[p] for p in finished]).astype(np.int32),
            paths=np.asarray(finished),
            model=np.asarray(args.model),
        )
        shutil.rmtree(parts_dir, ignore_errors=True)
        print(f"wrote {len(finished)} token rows to {out}")
    elif remaining:
        print(f"stopped with {len(remaining)} images left; run the same command again to continue", file=sys.stderr)

    if failed:
        print(f"{len(failed)} file(s) could not be read and were skipped:", file=sys.stderr)
        for _, error in failed:
            print(f"  {error}", file=sys.stderr)
        return 1
    return 0


# --- detokenize ----------------------------------------------------------------------------


def cmd_detokenize(args: argparse.Namespace) -> int:
    from flextok_jax.images import save_png

    if args.batch_size < 1:
        raise CommandError(f"--batch-size {args.batch_size} is invalid; pass a positive number of rows")
    try:
        with np.load(args.tokens) as data:
            tokens = np.asarray(data["tokens"])
            sources = [str(p) for p in data["paths"]] if "paths" in data.files else None
    except (OSError, ValueError, KeyError) as err:
        raise CommandError(f"cannot read token file {args.tokens}: {err}; pass a .npz written by 'flextok-jax tokenize'") from err
    if tokens.ndim != 2:
        raise CommandError(f"{args.tokens} contains tokens of shape {tokens.shape}; expected [N, R]")

    model = _load_model(args.model, args.dtype)
    k = args.k if args.k is not None else tokens.shape[1]
    if not 1 <= k <= min(tokens.shape[1], model.num_registers):
        raise CommandError(f"--k {k} is invalid; pass a token count in [1, {min(tokens.shape[1], model.num_registers)}]")
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)

    def name(i: int) -> Path:
        stem = Path(sources[i]).stem if sources else "image"
        return out_dir / f"{i:06d}-{stem}.png"

    todo = [i for i in range(len(tokens)) if not name(i).exists()]
    latent_side = model.image_size // model.config.vae.downsample_factor
    shape = (latent_side, latent_side, model.config.vae.latent_channels)
    progress = _progress(len(tokens), "detokenize", initial=len(tokens) - len(todo))
    for start in range(0, len(todo), args.batch_size):
        rows = todo[start : start + args.batch_size]
        try:
            images = model.detokenize(
                tokens[rows, :k],
                steps=args.steps,
                guidance_scale=args.guidance,
                apg=not args.no_apg,
                noise=_row_noise(args.seed, rows, shape),
            )
        except ValueError as err:
            raise CommandError(f"rows {rows[0]}..{rows[-1]} of {args.tokens}: {err}") from err
        for row, image in zip(rows, np.asarray(images)):
            save_png(image, name(row))
        progress.update(len(rows))
    progress.close()
    print(f"wrote {len(tokens)} images to {out_dir}")
    return 0


# --- reconstruct ---------------------------------------------------------------------------


def cmd_reconstruct(args: argparse.Namespace) -> int:
    from flextok_jax.images import ImageReadError, load_image, make_grid, save_png

    model = _load_model(args.model, args.dtype)
    registers = model.num_registers
    ks = args.k or [k for k in (1, 2, 4, 8, 16, 32, 64, 128, 256) if k <= registers]
    for k in ks:
        if not 1 <= k <= registers:
            raise CommandError(f"--k {k} is invalid; this model has {registers} tokens per image")
    size = args.image_size or model.image_size
    try:
        image = load_image(args.image, size)
    except ImageReadError as err:
        raise CommandError(str(err)) from err

    tokens = np.asarray(model.tokenize(image[None]))
    latent_side = size // model.config.vae.downsample_factor
    noise = _row_noise(args.seed, [0], (latent_side, latent_side, model.config.vae.latent_channels))
    # One batch: the same tokens and noise for every row, only the kept length differs.
    recon = model.detokenize(
        np.repeat(tokens, len(ks), axis=0),
        lengths=np.asarray(ks),
        steps=args.steps,
        guidance_scale=args.guidance,
        apg=not args.no_apg,
        noise=np.repeat(noise, len(ks), axis=0),
    )
    grid = make_grid([image, *np.asarray(recon)], ["original", *[f"k={k}" for k in ks]])
    save_png(grid, Path(args.out))
    print(f"wrote {args.out}: the original and reconstructions from the first {', '.join(map(str, ks))} tokens")
    return 0


# --- convert -------------------------------------------------------------------------------


def cmd_convert(args: argparse.Namespace) -> int:
    from convert.command import run_convert

    return run_convert(args.src, args.out, to_pytorch=args.to_pytorch, dtype=args.param_dtype)


# --- Parser --------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="flextok-jax", description="Tokenize images into ordered 1-D FlexTok tokens and decode them back."
    )
    parser.add_argument("--verbose", action="store_true", help="log progress details and show tracebacks on errors")
    sub = parser.add_subparsers(dest="command", required=True)

    def model_args(p: argparse.ArgumentParser) -> None:
        p.add_argument(
            "--model",
            required=True,
            help="hub repo id (e.g. EPFL-VILAB/flextok_d18_d18_in1k), hub-style directory, .safetensors file, or converted directory",
        )
        p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32", help="compute dtype (default float32)")
        p.add_argument("--verbose", action="store_true", default=argparse.SUPPRESS, help="log details and show tracebacks")

    p = sub.add_parser("tokenize", help="tokenize image files and folders into a .npz of token ids")
    p.add_argument("paths", nargs="+", help="image files and folders (searched recursively)")
    model_args(p)
    p.add_argument("--out", required=True, help="output .npz with int32 tokens [N, R] and the source paths")
    p.add_argument("--batch-size", type=int, default=32, help="images per device call (default 32)")
    p.add_argument("--image-size", type=int, default=None, help="side in pixels after resize and center crop, a multiple of 16 (default: the model's)")
    p.add_argument("--limit", type=int, default=None, help="tokenize at most this many new images, then stop; rerun to continue")
    p.add_argument("--overwrite", action="store_true", help="discard an existing output and finished batches instead of resuming")
    p.set_defaults(func=cmd_tokenize)

    p = sub.add_parser("detokenize", help="decode a token .npz into one PNG per row")
    p.add_argument("tokens", help=".npz file written by 'flextok-jax tokenize'")
    model_args(p)
    p.add_argument("--out", required=True, help="output folder for the PNGs; existing PNGs are kept and skipped")
    p.add_argument("--k", type=int, default=None, help="decode from the first K tokens of each row (default: all)")
    p.add_argument("--batch-size", type=int, default=16, help="rows per device call (default 16)")
    _guidance_args(p)
    p.set_defaults(func=cmd_detokenize)

    p = sub.add_parser("reconstruct", help="save an image beside its reconstructions from the first k tokens")
    p.add_argument("image", help="input image file")
    model_args(p)
    p.add_argument("--k", type=int, nargs="+", default=None, help="token counts to decode from (default 1 2 4 ... up to all)")
    p.add_argument("--out", required=True, help="output PNG of the labelled grid")
    p.add_argument("--image-size", type=int, default=None, help="side in pixels, a multiple of 16 (default: the model's)")
    _guidance_args(p)
    p.set_defaults(func=cmd_reconstruct)

    p = sub.add_parser("convert", help="convert a PyTorch checkpoint to a flextok-jax directory, or back")
    add_convert_args(p)
    p.set_defaults(func=cmd_convert)
    return parser


def add_convert_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("src", help="PyTorch checkpoint (hub directory or .safetensors), or with --to-pytorch a converted directory")
    p.add_argument("out", help="output directory; with --to-pytorch a .safetensors file or a hub-style directory")
    p.add_argument("--to-pytorch", action="store_true", help="write PyTorch-layout safetensors with the config in metadata")
    p.add_argument(
        "--param-dtype", choices=("float32", "float16", "bfloat16"), default=None, help="cast parameters (default: keep the source dtype)"
    )
    p.add_argument("--verbose", action="store_true", default=argparse.SUPPRESS, help="log details and show tracebacks")


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    verbose = getattr(args, "verbose", False)
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, format="%(name)s: %(message)s")
    if not verbose:
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    try:
        return args.func(args)
    except KeyboardInterrupt:
        print("flextok-jax: interrupted; finished batches are kept, run the same command to continue", file=sys.stderr)
        return 130
    except (CommandError, ValueError, OSError) as err:
        if verbose:
            raise
        print(f"flextok-jax {args.command}: error: {err}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
