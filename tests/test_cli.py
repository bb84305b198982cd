"""End-to-end tests of the `flextok-jax` command line on the golden `tiny` checkpoint.

Every command runs in a subprocess (`python -m flextok_jax.cli`, `python -m convert`
or the installed console script) on CPU, on scikit-image's bundled photos saved as
PNG and JPEG files. A subprocess costs about 5-10 s, so module-scoped fixtures run
each command once and several tests read its result. The subprocesses share a JAX
persistent compilation cache in a temporary folder, so later runs skip most of the
XLA compilation.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import skimage.data
from PIL import Image
from safetensors.numpy import load_file

from flextok_jax import FlexTok
from flextok_jax.cli import _row_noise
from flextok_jax.images import load_image, load_images, to_uint8
from tests.conftest import assert_same_arrays, golden_path, load_golden, nchw_to_nhwc

TINY = golden_path("tiny")
SIZE = 128  # image side of the tiny model
REGISTERS = 32  # tokens per image of the tiny model
TIMEOUT_S = 300  # per subprocess, far above the ~10 s a command takes

# The photo folder, in the order `find_images` lists it. The order is sorted by path
# and includes nested folders, while hidden files and non-image suffixes are skipped.
PHOTO_FILES = {
    "astronaut.png": "astronaut",
    "camera.png": "camera",  # grayscale
    "coffee.jpg": "coffee",
    "logo.png": "logo",  # RGBA
    "nested/chelsea.jpg": "chelsea",
    "nested/deeper/rocket.png": "rocket",
}
SKIPPED_FILES = (".hidden.png", "notes.txt")

# make_grid's defaults, which reconstruct uses.
GRID_PAD = 4
GRID_LABEL_HEIGHT = 20


# --- Helpers ---------------------------------------------------------------------------


def cli_env(cache_dir: Path) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        JAX_PLATFORMS="cpu",
        HF_HUB_OFFLINE="1",  # a path mistaken for a hub repo id must not reach the network
        JAX_COMPILATION_CACHE_DIR=str(cache_dir),
        JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
        JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0",
    )
    return env


def run(command: list, env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(part) for part in command], env=env, cwd=cwd, capture_output=True, text=True, timeout=TIMEOUT_S
    )


def describe(proc: subprocess.CompletedProcess) -> str:
    """Exit status and output tail of a finished command, for assertion messages."""
    return f"exit status {proc.returncode}\nstdout:\n{proc.stdout[-1500:]}\nstderr:\n{proc.stderr[-3000:]}"


def read_npz(path: Path) -> dict[str, np.ndarray]:
    with np.load(path) as data:
        return {key: data[key] for key in data.files}


def read_png(path: Path) -> np.ndarray:
    with Image.open(path) as image:
        assert image.mode == "RGB", f"{path.name} has mode {image.mode}, expected RGB"
        return np.asarray(image)


def max_abs_diff(a: np.ndarray, b: np.ndarray) -> int:
    return int(np.max(np.abs(a.astype(np.int64) - b.astype(np.int64))))


def part_files(parts_dir: Path) -> list[str]:
    return sorted(p.name for p in parts_dir.glob("part-*.npz"))


def save_photo(name: str, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(getattr(skimage.data, name)()).save(path)


# --- Shared fixtures -------------------------------------------------------------------


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("cli")


@pytest.fixture(scope="module")
def cli(workdir):
    """Run `python -m flextok_jax.cli ARGS` and return the finished process."""
    env = cli_env(workdir / "jax_cache")

    def invoke(*args) -> subprocess.CompletedProcess:
        return run([sys.executable, "-m", "flextok_jax.cli", *args], env, workdir)

    invoke.env = env
    return invoke


@pytest.fixture(scope="module")
def photos(workdir) -> Path:
    folder = workdir / "photos"
    for relative, name in PHOTO_FILES.items():
        save_photo(name, folder / relative)
    save_photo("chelsea", folder / SKIPPED_FILES[0])
    (folder / SKIPPED_FILES[1]).write_text("not an image\n")
    return folder


@pytest.fixture(scope="module")
def photo_paths(photos) -> list[str]:
    return [str(photos / relative) for relative in PHOTO_FILES]


@pytest.fixture(scope="module")
def api() -> FlexTok:
    return FlexTok.from_pretrained(TINY)


@pytest.fixture(scope="module")
def api_tokens(api, photo_paths) -> np.ndarray:
    return np.asarray(api.tokenize(load_images(photo_paths, SIZE)))


@pytest.fixture(scope="module")
def full_run(cli, photos, workdir):
    out = workdir / "full.npz"
    proc = cli("tokenize", photos, "--model", TINY, "--out", out)
    assert proc.returncode == 0, f"tokenize of {photos} failed: {describe(proc)}"
    return proc, read_npz(out)


# --- tokenize ----------------------------------------------------------------------------


def test_tokenize_folder_output(full_run, photo_paths):
    proc, data = full_run
    assert "wrote 6 token rows" in proc.stdout, f"stdout is {proc.stdout!r}"
    assert data["tokens"].dtype == np.int32, f"tokens have dtype {data['tokens'].dtype}"
    assert data["tokens"].shape == (len(photo_paths), REGISTERS), f"tokens have shape {data['tokens'].shape}"
    assert data["paths"].tolist() == photo_paths, f"paths are {data['paths'].tolist()}"
    assert str(data["model"]) == str(TINY), f"model is {data['model']}"


def test_tokenize_matches_api(full_run, api_tokens):
    _, data = full_run
    mismatched = np.argwhere(data["tokens"] != api_tokens)
    assert mismatched.size == 0, f"CLI and API tokens differ at (row, position) {mismatched[:5].tolist()}"


# --- Golden checkpoint through the CLI ---------------------------------------------------


@pytest.fixture(scope="module")
def golden():
    return load_golden("tiny")


@pytest.fixture(scope="module")
def golden_pngs(golden, workdir) -> list[Path]:
    folder = workdir / "golden"
    folder.mkdir()
    paths = []
    for i, image in enumerate(nchw_to_nhwc(golden["images"])):
        path = folder / f"golden{i}.png"
        Image.fromarray(to_uint8(image)).save(path)
        paths.append(path)
    return paths


def test_golden_tokens(cli, golden, golden_pngs, workdir):
    images = nchw_to_nhwc(golden["images"])
    for path, image in zip(golden_pngs, images):
        if not np.array_equal(load_image(path, SIZE), image):
            pytest.skip(f"the golden images are not uint8 values, so {path.name} does not reproduce them exactly")

    out = workdir / "golden_tokens.npz"
    proc = cli("tokenize", golden_pngs[0].parent, "--model", TINY, "--out", out)
    assert proc.returncode == 0, describe(proc)

    tokens = read_npz(out)["tokens"]
    mismatched = np.argwhere(tokens != golden["tokens"])
    assert mismatched.size == 0, f"CLI tokens differ from golden tokens at (row, position) {mismatched[:5].tolist()}"


@pytest.fixture(scope="module")
def golden_detokenized(cli, golden, golden_pngs, workdir):
    token_file = workdir / "golden_in.npz"
    np.savez(
        token_file,
        tokens=golden["tokens"].astype(np.int32),
        paths=np.asarray([str(p) for p in golden_pngs]),
        model=np.asarray(str(TINY)),
    )
    out = workdir / "golden_decoded"
    args = ("detokenize", token_file, "--model", TINY, "--out", out, "--k", "32", "--steps", "4", "--guidance", "7.5")
    proc = cli(*args)
    assert proc.returncode == 0, describe(proc)
    return out, args


def test_detokenize_files(golden_detokenized, golden):
    out, _ = golden_detokenized
    names = sorted(p.name for p in out.glob("*.png"))
    expected = [f"{i:06d}-golden{i}.png" for i in range(len(golden["tokens"]))]
    assert names == expected, f"output folder contains {names}"
    for name in names:
        shape = read_png(out / name).shape
        assert shape == (SIZE, SIZE, 3), f"{name} has shape {shape}"


def test_detokenize_matches_api(golden_detokenized, golden, api):
    out, _ = golden_detokenized
    rows = list(range(len(golden["tokens"])))
    side = api.image_size // api.config.vae.downsample_factor
    noise = _row_noise(0, rows, (side, side, api.config.vae.latent_channels))
    expected = to_uint8(
        np.asarray(api.detokenize(golden["tokens"][:, :32], steps=4, guidance_scale=7.5, apg=True, noise=noise))
    )
    for row in rows:
        png = read_png(out / f"{row:06d}-golden{row}.png")
        diff = max_abs_diff(png, expected[row])
        assert diff <= 1, f"row {row}: CLI PNG differs from the API image by {diff} uint8 levels"


def test_detokenize_resume(golden_detokenized, cli, workdir):
    source, args = golden_detokenized
    out = workdir / "golden_resumed"
    shutil.copytree(source, out)
    deleted = out / "000001-golden1.png"
    original = read_png(deleted)
    deleted.unlink()
    old_time = 1_000_000_000  # a fixed past mtime, so any rewrite is visible
    existing = sorted(out.glob("*.png"))
    for path in existing:
        os.utime(path, (old_time, old_time))

    out_index = args.index("--out") + 1
    proc = cli(*args[:out_index], out, *args[out_index + 1 :])
    assert proc.returncode == 0, describe(proc)

    assert deleted.exists(), f"{deleted.name} was not recreated"
    diff = max_abs_diff(read_png(deleted), original)
    assert diff <= 1, f"recreated {deleted.name} differs from the first run by {diff} uint8 levels"
    for path in existing:
        assert path.stat().st_mtime == old_time, f"{path.name} was rewritten although it existed"


# --- reconstruct ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def reconstructed(cli, photo_paths, workdir):
    out = workdir / "grid.png"
    proc = cli("reconstruct", photo_paths[0], "--model", TINY, "--k", "1", "4", "32", "--steps", "2", "--out", out)
    assert proc.returncode == 0, describe(proc)
    return read_png(out)


def test_reconstruct_geometry(reconstructed):
    panels = 4  # the original and k = 1, 4, 32
    expected = (SIZE + GRID_LABEL_HEIGHT + 2 * GRID_PAD, panels * SIZE + (panels + 1) * GRID_PAD, 3)
    assert reconstructed.shape == expected, f"grid has shape {reconstructed.shape}, expected {expected}"

    assert (reconstructed[:GRID_PAD] == 255).all(), "top margin is not white"
    for i in range(panels + 1):
        x = i * (SIZE + GRID_PAD)
        gutter = reconstructed[:, x : x + GRID_PAD]
        assert (gutter == 255).all(), f"gutter at columns [{x}, {x + GRID_PAD}) is not white"


def test_reconstruct_original_panel(reconstructed, photo_paths):
    panel = reconstructed[GRID_PAD : GRID_PAD + SIZE, GRID_PAD : GRID_PAD + SIZE]
    expected = to_uint8(load_image(photo_paths[0], SIZE))
    diff = max_abs_diff(panel, expected)
    assert diff == 0, f"first panel differs from the input image by {diff} uint8 levels"


def test_reconstruct_labels(reconstructed):
    top = GRID_PAD + SIZE
    for i, label in enumerate(["original", "k=1", "k=4", "k=32"]):
        x = GRID_PAD + i * (SIZE + GRID_PAD)
        strip = reconstructed[top : top + GRID_LABEL_HEIGHT, x : x + SIZE]
        assert (strip != 255).any(), f"label strip of panel {i} ({label}) is blank"


# --- Resumable tokenize --------------------------------------------------------------------


@pytest.fixture(scope="module")
def limited_run(cli, photos, workdir):
    """One `--limit 1` run and the state it leaves behind, before any later run resumes it."""
    out = workdir / "limited.npz"
    parts_dir = workdir / "limited.npz.parts"
    args = ["tokenize", photos, "--model", TINY, "--out", out, "--batch-size", "1"]
    proc = cli(*args, "--limit", "1")
    return {"proc": proc, "out_exists": out.exists(), "parts": part_files(parts_dir), "args": args, "out": out}


def test_limit_stops_early(limited_run, photo_paths):
    proc = limited_run["proc"]
    assert proc.returncode == 0, describe(proc)
    images_left = len(photo_paths) - 1
    assert f"stopped with {images_left} image(s) left" in proc.stderr, f"stderr is {proc.stderr!r}"
    assert not limited_run["out_exists"], "output file was written although images were left"
    assert limited_run["parts"] == ["part-000000.npz"], f"parts folder contains {limited_run['parts']}"


def test_limit_then_resume(limited_run, cli, full_run):
    proc = cli(*limited_run["args"])
    assert proc.returncode == 0, describe(proc)

    data = read_npz(limited_run["out"])
    _, full = full_run
    assert data["paths"].tolist() == full["paths"].tolist(), f"resumed paths are {data['paths'].tolist()}"
    mismatched = np.argwhere(data["tokens"] != full["tokens"])
    assert mismatched.size == 0, f"resumed tokens differ from a full run at {mismatched[:5].tolist()}"
    parts_dir = limited_run["out"].with_name(limited_run["out"].name + ".parts")
    assert not parts_dir.exists(), f"{parts_dir} was not removed after the output was written"


def kill_after_first_part(command: list[str], env: dict[str, str], cwd: Path, parts_dir: Path) -> tuple[int, str]:
    """Start `command`, SIGKILL it once a part file appears in `parts_dir`, return (status, stderr)."""
    proc = subprocess.Popen(command, env=env, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + TIMEOUT_S
        while not part_files(parts_dir) and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.002)
        proc.send_signal(signal.SIGKILL)
        _, stderr = proc.communicate(timeout=TIMEOUT_S)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return proc.returncode, stderr


def test_kill_then_resume(cli, photos, full_run, workdir):
    out = workdir / "killed.npz"
    parts_dir = workdir / "killed.npz.parts"
    args = ["tokenize", photos, "--model", TINY, "--out", out, "--batch-size", "1"]
    command = [sys.executable, "-m", "flextok_jax.cli", *map(str, args)]

    # After the first part file appears, the command needs about 0.5 s more to finish
    # the other five images and exit (measured on 2 CPU cores), while the polling takes
    # 2 ms. A loaded machine can still lose that race, so a run that ends before the
    # kill is retried from scratch.
    for _ in range(3):
        status, stderr = kill_after_first_part(command, cli.env, workdir, parts_dir)
        if status == -signal.SIGKILL:
            break
        out.unlink(missing_ok=True)
        shutil.rmtree(parts_dir, ignore_errors=True)
    assert status == -signal.SIGKILL, f"tokenize ended with status {status} before every kill: {stderr[-2000:]}"
    assert not out.exists(), "output file exists after the kill"
    parts = part_files(parts_dir)
    assert 1 <= len(parts) < len(PHOTO_FILES), f"parts folder contains {parts} after the kill"

    resumed = cli(*args)
    assert resumed.returncode == 0, describe(resumed)
    data = read_npz(out)
    _, full = full_run
    assert data["paths"].tolist() == full["paths"].tolist(), f"resumed paths are {data['paths'].tolist()}"
    mismatched = np.argwhere(data["tokens"] != full["tokens"])
    assert mismatched.size == 0, f"resumed tokens differ from a full run at {mismatched[:5].tolist()}"


# --- Unreadable files ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def mixed_run(cli, photos, workdir):
    folder = workdir / "mixed"
    (folder / "nested").mkdir(parents=True)
    good = {"astronaut.png": folder / "astronaut.png", "nested/chelsea.jpg": folder / "nested" / "chelsea.jpg"}
    for relative, path in good.items():
        shutil.copyfile(photos / relative, path)
    bad = [folder / "corrupt.png", folder / "nested" / "truncated.jpg"]
    bad[0].write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4)
    jpeg = (photos / "coffee.jpg").read_bytes()
    bad[1].write_bytes(jpeg[: len(jpeg) // 2])

    out = workdir / "mixed.npz"
    proc = cli("tokenize", folder, "--model", TINY, "--out", out)
    return proc, out, good, bad


def test_unreadable_files_skipped(mixed_run, full_run, photos, photo_paths):
    proc, out, good, _ = mixed_run
    assert proc.returncode != 0, "exit status is 0 although two files could not be read"
    assert out.exists(), f"{out.name} was not written for the readable images: {describe(proc)}"

    data = read_npz(out)
    expected_paths = sorted(str(p) for p in good.values())
    assert data["paths"].tolist() == expected_paths, f"paths are {data['paths'].tolist()}"
    _, full = full_run
    for row, relative in enumerate(good):
        full_row = photo_paths.index(str(photos / relative))
        assert (data["tokens"][row] == full["tokens"][full_row]).all(), f"tokens of {relative} differ from the full run"


def test_unreadable_files_listed(mixed_run):
    proc, _, good, bad = mixed_run
    for path in bad:
        assert str(path) in proc.stderr, f"{path.name} is not listed on stderr: {proc.stderr!r}"
    for path in good.values():
        assert str(path) not in proc.stderr, f"readable {path.name} is listed on stderr: {proc.stderr!r}"
    assert "Traceback" not in proc.stderr, f"stderr has a traceback: {proc.stderr!r}"


# --- Errors --------------------------------------------------------------------------------


def error_cases(workdir: Path, photo: str, token_file: Path) -> dict[str, tuple[list, str]]:
    """Case name -> (CLI arguments, text the error line must contain)."""
    missing_model = workdir / "no_such_model"
    missing_input = workdir / "no_such_folder"
    out = workdir / "never_written.npz"
    grid = workdir / "never_written.png"
    return {
        "missing-model": (["tokenize", photo, "--model", missing_model, "--out", out], str(missing_model)),
        "missing-input": (["tokenize", missing_input, "--model", TINY, "--out", out], str(missing_input)),
        "k-zero": (["reconstruct", photo, "--model", TINY, "--k", "0", "--out", grid], "--k 0"),
        "k-too-large": (["reconstruct", photo, "--model", TINY, "--k", "1", "33", "--out", grid], "--k 33"),
        "batch-size-zero": (["tokenize", photo, "--model", TINY, "--out", out, "--batch-size", "0"], "--batch-size 0"),
        "detokenize-batch-size-zero": (
            ["detokenize", token_file, "--model", TINY, "--out", workdir / "never_written", "--batch-size", "0"],
            "--batch-size 0",
        ),
        "limit-negative": (["tokenize", photo, "--model", TINY, "--out", out, "--limit", "-1"], "--limit -1"),
    }


# Only the case names are needed at collection time, so placeholder paths do.
ERROR_CASES = list(error_cases(Path("."), "", Path(".")))


@pytest.mark.parametrize("case", ERROR_CASES)
def test_error_one_line(case, cli, photo_paths, full_run, workdir):
    args, expected_text = error_cases(workdir, photo_paths[0], workdir / "full.npz")[case]
    proc = cli(*args)
    lines = [line for line in proc.stderr.splitlines() if line.strip()]

    assert proc.returncode != 0, f"exit status is 0; stdout {proc.stdout!r}"
    assert "Traceback" not in proc.stderr, f"stderr has a traceback: {proc.stderr[-2000:]}"
    assert len(lines) == 1, f"stderr has {len(lines)} lines: {lines}"
    assert expected_text in lines[0], f"error line {lines[0]!r} does not mention {expected_text!r}"
    assert not (workdir / "never_written.npz").exists(), "a failed command wrote its output"


@pytest.mark.parametrize("placement", ["top-level", "subcommand"])
def test_error_verbose_traceback(placement, cli, workdir):
    args = ["tokenize", workdir / "no_such_folder", "--model", TINY, "--out", workdir / "never_written.npz"]
    args = ["--verbose", *args] if placement == "top-level" else [*args, "--verbose"]
    proc = cli(*args)
    assert proc.returncode != 0, "exit status is 0"
    assert "Traceback" in proc.stderr, f"--verbose ({placement}) shows no traceback: {proc.stderr!r}"


# --- Help ------------------------------------------------------------------------------------

MODEL_OPTIONS = ["--model", "--dtype", "--verbose"]
GUIDANCE_OPTIONS = ["--steps", "--guidance", "--no-apg", "--seed"]
CONVERT_OPTIONS = ["src", "out", "--to-pytorch", "--param-dtype", "--verbose"]
HELP_CASES = {
    "top-level": ([], ["--verbose", "tokenize", "detokenize", "reconstruct", "convert"]),
    "tokenize": (
        ["tokenize"],
        ["paths", *MODEL_OPTIONS, "--out", "--batch-size", "--image-size", "--limit", "--overwrite"],
    ),
    "detokenize": (["detokenize"], ["tokens", *MODEL_OPTIONS, "--out", "--k", "--batch-size", *GUIDANCE_OPTIONS]),
    "reconstruct": (["reconstruct"], ["image", *MODEL_OPTIONS, "--k", "--out", "--image-size", *GUIDANCE_OPTIONS]),
    "convert": (["convert"], CONVERT_OPTIONS),
}


@pytest.mark.parametrize("case", [*HELP_CASES, "python -m convert"])
def test_help(case, cli, workdir):
    if case == "python -m convert":
        proc = run([sys.executable, "-m", "convert", "--help"], cli.env, workdir)
        options = CONVERT_OPTIONS
    else:
        command, options = HELP_CASES[case]
        proc = cli(*command, "--help")
    assert proc.returncode == 0, describe(proc)
    for option in options:
        assert option in proc.stdout, f"{case} --help does not mention {option}"


# --- convert ---------------------------------------------------------------------------------


def console_script() -> list[str]:
    """The installed `flextok-jax` entry point, or the module when it is not installed next to Python."""
    script = Path(sys.executable).parent / "flextok-jax"
    return [str(script)] if script.exists() else [sys.executable, "-m", "flextok_jax.cli"]


@pytest.fixture(scope="module")
def converted(cli, workdir):
    converted_dir = workdir / "converted"
    proc = run([sys.executable, "-m", "convert", TINY, converted_dir], cli.env, workdir)
    assert proc.returncode == 0, describe(proc)

    back = workdir / "back.safetensors"
    proc = run([*console_script(), "convert", "--to-pytorch", converted_dir, back], cli.env, workdir)
    assert proc.returncode == 0, describe(proc)
    return converted_dir, back


def test_convert_round_trip(converted):
    _, back = converted
    original = load_file(str(TINY / "model.safetensors"))
    restored = load_file(str(back))
    assert_same_arrays(restored, original, "PyTorch round trip")


def test_convert_same_tokens(converted, api_tokens, photo_paths):
    converted_dir, _ = converted
    tokens = np.asarray(FlexTok.from_pretrained(converted_dir).tokenize(load_images(photo_paths, SIZE)))
    mismatched = np.argwhere(tokens != api_tokens)
    assert mismatched.size == 0, f"converted model's tokens differ at (row, position) {mismatched[:5].tolist()}"



def test_detokenize_rejects_other_settings(golden_detokenized, cli, workdir):
    out, args = golden_detokenized
    copy = workdir / "settings_copy"
    shutil.copytree(out, copy)
    before = {path.name: path.read_bytes() for path in copy.glob("*.png")}
    proc = cli("detokenize", args[1], "--model", TINY, "--out", copy, "--k", "4", "--steps", "1")
    assert proc.returncode != 0, "detokenize with other settings into a used folder exited 0"
    assert "--overwrite" in proc.stderr, f"error does not mention --overwrite: {describe(proc)}"
    after = {path.name: path.read_bytes() for path in copy.glob("*.png")}
    assert after == before, "existing PNGs changed although the run was rejected"


def test_tokenize_rejects_other_inputs(cli, full_run, workdir):
    out = workdir / "other_inputs.npz"
    shutil.copy(workdir / "full.npz", out)
    photo = workdir / "single" / "astronaut.png"
    save_photo("astronaut", photo)
    proc = cli("tokenize", photo, "--model", TINY, "--out", out)
    assert proc.returncode != 0, "tokenize into a file of other inputs exited 0"
    assert "--overwrite" in proc.stderr, f"error does not mention --overwrite: {describe(proc)}"
    after, before = read_npz(out), full_run[1]
    assert np.array_equal(after["tokens"], before["tokens"]), "the rejected run changed the existing tokens"


def test_convert_keeps_existing_folder(cli, workdir):
    target = workdir / "precious"
    target.mkdir()
    (target / "notes.txt").write_text("keep me")
    proc = cli("convert", TINY, target)
    assert proc.returncode != 0, "convert into a non-empty folder exited 0"
    assert (target / "notes.txt").read_text() == "keep me", "convert changed a file in the existing folder"


def test_detokenize_rejects_foreign_pngs(golden_detokenized, cli, workdir):
    _, args = golden_detokenized
    out = workdir / "foreign_pngs"
    out.mkdir()
    foreign = out / "000000-golden0.png"
    save_photo("astronaut", foreign)
    before = foreign.read_bytes()
    proc = cli("detokenize", args[1], "--model", TINY, "--out", out, "--steps", "1")
    assert proc.returncode != 0, "detokenize over PNGs it did not write exited 0"
    assert "--overwrite" in proc.stderr, f"error does not mention --overwrite: {describe(proc)}"
    assert foreign.read_bytes() == before, "a PNG the command did not write was changed"


def test_detokenize_invalid_ids_write_nothing(cli, workdir):
    token_file = workdir / "invalid_ids.npz"
    np.savez(token_file, tokens=np.full((2, 4), 64000, np.int32), paths=np.asarray(["a.png", "b.png"]), model=np.asarray(str(TINY)))
    out = workdir / "invalid_ids_out"
    proc = cli("detokenize", token_file, "--model", TINY, "--out", out, "--steps", "1")
    assert proc.returncode != 0, "detokenize of out-of-codebook ids exited 0"
    assert "64000" in proc.stderr, f"error does not name the id: {describe(proc)}"
    assert not out.exists(), f"a failed detokenize left {out} behind"


def test_reconstruct_rejects_non_png(cli, photo_paths, workdir):
    proc = cli("reconstruct", photo_paths[0], "--model", TINY, "--out", workdir / "grid.jpg", "--steps", "1")
    assert proc.returncode != 0, "reconstruct to a .jpg path exited 0"
    assert "grid.jpg" in proc.stderr, f"error does not name the path: {describe(proc)}"


def test_resume_default_size_matches_explicit(cli, photos, workdir):
    out = workdir / "explicit_size.npz"
    first = cli("tokenize", photos, "--model", TINY, "--out", out, "--limit", "1")
    assert first.returncode == 0, describe(first)
    second = cli("tokenize", photos, "--model", TINY, "--out", out, "--image-size", str(SIZE))
    assert second.returncode == 0, f"resuming with --image-size {SIZE} (the model's own) failed: {describe(second)}"
    third = cli("tokenize", photos, "--model", TINY, "--out", out, "--image-size", "64")
    assert third.returncode != 0, "resuming with another --image-size exited 0"
