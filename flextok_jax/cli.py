"""The `flextok-jax` command line: tokenize, detokenize, reconstruct and convert."""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import shutil
import sys
import zipfile
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
    from flextok_jax.files import atomic_write

    with atomic_write(path) as handle:
        np.savez(handle, **arrays)


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


def _model_id(name: str) -> str:
    """Normalize the model argument for output files: resolve local paths, keep hub ids as given."""
    path = Path(name).expanduser()
    return str(path.resolve()) if path.exists() else name


def _check_image_size(size: int | None) -> None:
    if size is not None and (size < 16 or size % 16):
        raise CommandError(f"--image-size {size} is invalid; pass a positive multiple of 16 pixels")


def _check_writable(path: Path, label: str) -> None:
    """Fail before any model work when `path` cannot be created, without creating anything."""
    ancestor = path.absolute().parent
    while not ancestor.exists():
        ancestor = ancestor.parent
    if not ancestor.is_dir() or not os.access(ancestor, os.W_OK):
        raise CommandError(f"{label} {path} cannot be created because {ancestor} is not a writable folder")
    if path.is_dir():
        raise CommandError(f"{label} {path} is a folder; pass a file path")


def _load_token_file(path: Path, label: str) -> dict[str, np.ndarray]:
    """Read a .npz written by `tokenize` (a finished output or one batch file)."""
    if not zipfile.is_zipfile(path):
        raise CommandError(f"{label} {path} is not an .npz file written by 'flextok-jax tokenize'")
    try:
        with np.load(path, allow_pickle=False) as data:
            arrays = {key: np.asarray(data[key]) for key in data.files}
    except (OSError, ValueError, zipfile.BadZipFile) as err:
        raise CommandError(f"cannot read {label} {path}: {err}") from err
    missing = [key for key in ("tokens", "paths", "model") if key not in arrays]
    if missing:
        raise CommandError(f"{label} {path} has no {', '.join(missing)} entry; it was not written by 'flextok-jax tokenize'")
    tokens, paths = arrays["tokens"], arrays["paths"]
    if tokens.ndim != 2 or not np.issubdtype(tokens.dtype, np.integer):
        raise CommandError(f"{label} {path} has tokens of shape {tokens.shape} and dtype {tokens.dtype}; expected int [N, R]")
    if paths.shape != (tokens.shape[0],):
        raise CommandError(f"{label} {path} has {paths.size} paths for {tokens.shape[0]} token rows")
    return arrays


def _resume_rows(out: Path, parts_dir: Path, settings: dict[str, str]) -> tuple[dict[str, np.ndarray], set[str]]:
    """Load the rows already tokenized into `out` or into finished batch files, checking `settings`.

    Returns the rows by source path and the image sizes the files record. A setting
    missing from `settings` is not checked: `image_size` is left out when the command
    line does not give one, and is then checked against the model's size later.
    """
    files = []
    if out.exists():
        files.append(out)
    if parts_dir.is_dir():
        files.extend(sorted(parts_dir.glob("part-*.npz")))
    done: dict[str, np.ndarray] = {}
    sizes: set[str] = set()
    for path in files:
        data = _load_token_file(path, "existing output")
        if "image_size" in data:
            sizes.add(str(data["image_size"]))
        for key, expected in settings.items():
            found = str(data[key]) if key in data else "unknown"
            if found != expected:
                raise CommandError(
                    f"{path} was tokenized with {key} {found}, not {expected}; pass --overwrite to start over, or use another --out"
                )
        done.update({str(p): row for p, row in zip(data["paths"], data["tokens"])})
    return done, sizes


def cmd_tokenize(args: argparse.Namespace) -> int:
    from flextok_jax.images import ImageReadError, find_images, load_image

    out = Path(args.out)
    parts_dir = out.with_name(out.name + PARTS_SUFFIX)
    if args.batch_size < 1:
        raise CommandError(f"--batch-size {args.batch_size} is invalid; pass a positive number of images")
    if args.limit is not None and args.limit < 1:
        raise CommandError(f"--limit {args.limit} is invalid; pass a positive number of images")
    _check_image_size(args.image_size)
    _check_writable(out, "output")
    try:
        paths = [str(p) for p in find_images(args.paths)]
    except (FileNotFoundError, NotADirectoryError, PermissionError) as err:
        raise CommandError(str(err)) from err
    if not paths:
        raise CommandError(f"no images found in {' '.join(args.paths)}")

    if args.overwrite:
        shutil.rmtree(parts_dir, ignore_errors=True)
        out.unlink(missing_ok=True)

    # Resume: rows already in the output file or in finished batch files are kept,
    # provided they come from the same inputs and settings.
    settings = {"model": _model_id(args.model), "dtype": args.dtype}
    if args.image_size is not None:
        settings["image_size"] = str(args.image_size)
    done, stored_sizes = _resume_rows(out, parts_dir, settings)
    resumed = len(done)
    if len(stored_sizes) > 1:
        raise CommandError(f"{out} mixes tokens of image sizes {sorted(stored_sizes)}; pass --overwrite to start over")
    foreign = [p for p in done if p not in set(paths)]
    if foreign:
        raise CommandError(
            f"{out} already contains tokens of {len(foreign)} file(s) that are not among the inputs, such as {foreign[0]}; "
            "pass --overwrite to replace it, or use another --out"
        )
    todo = [p for p in paths if p not in done]
    if done:
        logger.info("resuming: %d of %d images already tokenized", len(paths) - len(todo), len(paths))
    initial = len(paths) - len(todo)
    if args.limit is not None:
        todo = todo[: args.limit]

    failed: list[tuple[str, str]] = []
    if todo:
        model = _load_model(args.model, args.dtype)
        size = args.image_size or model.image_size
        if size > model.image_size:
            raise CommandError(f"--image-size {size} exceeds this model's maximum of {model.image_size} pixels")
        if stored_sizes and stored_sizes != {str(size)}:
            raise CommandError(
                f"{out} was tokenized with image_size {stored_sizes.pop()}, not {size}; pass --overwrite to start over, or use another --out"
            )
        settings["image_size"] = str(size)
        next_part = len(list(parts_dir.glob("part-*.npz"))) if parts_dir.is_dir() else 0
        progress = _progress(len(paths), "tokenize", initial=initial)

        def read(path: str):
            try:
                return load_image(path, size), None
            except ImageReadError as err:
                return None, str(err)

        batches = [todo[start : start + args.batch_size] for start in range(0, len(todo), args.batch_size)]
        with ThreadPoolExecutor(max_workers=4) as pool:
            # Decode the next batch's files while the device tokenizes the current one.
            pending = [pool.submit(read, path) for path in batches[0]]
            for index, batch_paths in enumerate(batches):
                results = [future.result() for future in pending]
                if index + 1 < len(batches):
                    pending = [pool.submit(read, path) for path in batches[index + 1]]
                images, readable = [], []
                for path, (image, error) in zip(batch_paths, results):
                    if error is not None:
                        failed.append((path, error))
                        logger.info("skipping %s", error)
                        continue
                    images.append(image)
                    readable.append(path)
                if images:
                    tokens = np.asarray(model.tokenize(np.stack(images)), np.int32)
                    _atomic_savez(
                        parts_dir / f"part-{next_part:06d}.npz",
                        tokens=tokens,
                        paths=np.asarray(readable),
                        **{key: np.asarray(value) for key, value in settings.items()},
                    )
                    next_part += 1
                    done.update(zip(readable, tokens))
                progress.update(len(batch_paths))
        progress.close()

    failed_paths = {path for path, _ in failed}
    remaining = [p for p in paths if p not in done and p not in failed_paths]
    finished = [p for p in paths if p in done]
    if finished and not remaining:
        if "image_size" not in settings:
            settings["image_size"] = stored_sizes.pop()  # nothing was tokenized in this run
        _atomic_savez(
            out,
            tokens=np.stack([done[p] for p in finished]).astype(np.int32),
            paths=np.asarray(finished),
            **{key: np.asarray(value) for key, value in settings.items()},
        )
        shutil.rmtree(parts_dir, ignore_errors=True)
        print(f"wrote {len(finished)} token rows to {out}" + (f" ({resumed} from earlier runs)" if resumed else ""))
    elif remaining:
        print(f"stopped with {len(remaining)} image(s) left; run the same command again to continue", file=sys.stderr)
    else:
        print(f"no image could be read, so {out} was not written", file=sys.stderr)

    if failed:
        print(f"{len(failed)} file(s) could not be read and were skipped:", file=sys.stderr)
        for _, error in failed:
            print(f"  {error}", file=sys.stderr)
        return 1
    return 0


# --- detokenize ----------------------------------------------------------------------------

SETTINGS_FILE = ".flextok-detokenize.json"


def _check_sampler_args(args: argparse.Namespace) -> None:
    if args.steps < 1:
        raise CommandError(f"--steps {args.steps} is invalid; pass a positive number of Euler steps")
    if not math.isfinite(args.guidance):
        raise CommandError(f"--guidance {args.guidance} is invalid; pass a finite scale such as 7.5")
    if not 0 <= args.seed < 2**32:
        raise CommandError(f"--seed {args.seed} is invalid; pass an integer in [0, 2^32)")


def _save_image(image: np.ndarray, path: Path) -> None:
    from flextok_jax.images import save_png

    try:
        save_png(image, path)
    except OSError as err:
        raise CommandError(f"cannot write {path}: {err.strerror or err}") from err


def cmd_detokenize(args: argparse.Namespace) -> int:
    if args.batch_size < 1:
        raise CommandError(f"--batch-size {args.batch_size} is invalid; pass a positive number of rows")
    _check_sampler_args(args)
    data = _load_token_file(Path(args.tokens), "token file")
    tokens = data["tokens"]
    sources = [str(p) for p in data["paths"]]
    if tokens.shape[1] == 0 or tokens.shape[0] == 0:
        raise CommandError(f"token file {args.tokens} has shape {tokens.shape}; it contains no tokens")
    k = args.k if args.k is not None else tokens.shape[1]
    if not 1 <= k <= tokens.shape[1]:
        raise CommandError(f"--k {k} is invalid; the token file has {tokens.shape[1]} tokens per row")

    out_dir = Path(args.out)
    _check_writable(out_dir / "x", "output folder")
    settings = {
        "tokens": str(Path(args.tokens).resolve()),
        "model": _model_id(args.model),
        "k": k,
        "steps": args.steps,
        "guidance": args.guidance,
        "apg": not args.no_apg,
        "seed": args.seed,
    }
    settings_file = out_dir / SETTINGS_FILE

    def name(i: int) -> Path:
        return out_dir / f"{i:06d}-{Path(sources[i]).stem}.png"

    if settings_file.exists() and not args.overwrite:
        try:
            previous = json.loads(settings_file.read_text())
        except (OSError, json.JSONDecodeError):
            previous = None
        if previous != settings:
            changed = sorted(key for key in settings if not isinstance(previous, dict) or previous.get(key) != settings[key])
            raise CommandError(
                f"{out_dir} contains images decoded with another {', '.join(changed)} (see {settings_file}); "
                "pass --overwrite to decode them again, or choose another --out"
            )
    elif not args.overwrite and any(name(i).exists() for i in range(len(tokens))):
        raise CommandError(
            f"{out_dir} contains PNGs with the output names but no {SETTINGS_FILE}; "
            "pass --overwrite to replace them, or choose another --out"
        )

    stored_model = str(data["model"])
    if stored_model != settings["model"]:
        logger.warning("%s was tokenized with model %s, not %s", args.tokens, stored_model, settings["model"])
    model = _load_model(args.model, args.dtype)
    if tokens.shape[1] > model.num_registers:
        raise CommandError(f"token file {args.tokens} has {tokens.shape[1]} tokens per row, but this model has {model.num_registers}")
    used = tokens[:, :k]
    invalid = np.argwhere((used < 0) | (used >= model.codebook_size))
    if invalid.size:
        row, column = map(int, invalid[0])
        raise CommandError(
            f"token file {args.tokens} has id {int(used[row, column])} at row {row}, position {column}, "
            f"outside the codebook [0, {model.codebook_size}); {len(invalid)} id(s) are invalid"
        )

    from flextok_jax.files import atomic_write_text

    atomic_write_text(settings_file, json.dumps(settings, indent=2))

    todo = [i for i in range(len(tokens)) if args.overwrite or not name(i).exists()]
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
            raise CommandError(f"token rows {rows[0]}..{rows[-1]} of {args.tokens}: {err}") from err
        for row, image in zip(rows, np.asarray(images)):
            _save_image(image, name(row))
        progress.update(len(rows))
    progress.close()
    existing = len(tokens) - len(todo)
    print(f"wrote {len(todo)} images to {out_dir}" + (f" (kept {existing} existing)" if existing else ""))
    return 0


# --- reconstruct ---------------------------------------------------------------------------


def cmd_reconstruct(args: argparse.Namespace) -> int:
    from flextok_jax.images import ImageReadError, load_image, make_grid

    _check_sampler_args(args)
    _check_image_size(args.image_size)
    for k in args.k or []:
        if k < 1:
            raise CommandError(f"--k {k} is invalid; pass token counts of at least 1")
    out = Path(args.out)
    if out.suffix.lower() != ".png":
        raise CommandError(f"--out {out} must end in .png; the grid is written as a PNG")
    _check_writable(out, "output")
    if not Path(args.image).is_file():
        raise CommandError(f"image file {args.image} not found")

    model = _load_model(args.model, args.dtype)
    registers = model.num_registers
    ks = args.k or [k for k in (1, 2, 4, 8, 16, 32, 64, 128, 256) if k <= registers]
    for k in ks:
        if k > registers:
            raise CommandError(f"--k {k} is invalid; this model has {registers} tokens per image")
    size = args.image_size or model.image_size
    if size > model.image_size:
        raise CommandError(f"--image-size {size} exceeds this model's maximum of {model.image_size} pixels")
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
    _save_image(grid, out)
    print(f"wrote {args.out}: the original and reconstructions from the first {', '.join(map(str, ks))} tokens")
    return 0


# --- convert -------------------------------------------------------------------------------


def cmd_convert(args: argparse.Namespace) -> int:
    from convert.command import run_convert

    return run_convert(args.src, args.out, to_pytorch=args.to_pytorch, dtype=args.param_dtype, overwrite=args.overwrite)


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
    p.add_argument("--overwrite", action="store_true", help="decode every row again, replacing PNGs made with other settings")
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
    p.add_argument("--overwrite", action="store_true", help="replace an existing converted model or PyTorch file at OUT")
    p.add_argument(
        "--param-dtype", choices=("float32", "float16", "bfloat16"), default=None, help="cast parameters (default: keep the source dtype)"
    )
    p.add_argument("--verbose", action="store_true", default=argparse.SUPPRESS, help="log details and show tracebacks")


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    verbose = getattr(args, "verbose", False)
    # force: importing orbax configures the root logger through absl first.
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, format="%(name)s: %(message)s", force=True)
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
