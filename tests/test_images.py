"""Tests for flextok_jax.images on scikit-image's bundled photos saved through Pillow."""

from __future__ import annotations

import functools
import os
from pathlib import Path

import numpy as np
import pytest
import skimage.data
from PIL import Image

from flextok_jax.images import (
    IMAGE_EXTENSIONS,
    ImageReadError,
    find_images,
    load_image,
    load_images,
    make_grid,
    save_png,
    to_uint8,
)

ONE_STEP = 1 / 127.5  # one uint8 step in the [-1, 1] range


@functools.cache
def photo(name: str) -> np.ndarray:
    """Return a bundled scikit-image photo as uint8 (RGB [H, W, 3] or grayscale [H, W])."""
    return getattr(skimage.data, name)()


def save(image: Image.Image, path: Path, **params) -> Path:
    image.save(path, **params)
    return path


def max_diff(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.max(np.abs(a.astype(np.float64) - b.astype(np.float64))))


def expected_pipeline(rgb: Image.Image, size: int) -> np.ndarray:
    """Resize the shorter side to `size` with bicubic, crop the center, scale to [-1, 1], spelled out step by step."""
    width, height = rgb.size
    scale = size / min(width, height)
    new_width, new_height = round(width * scale), round(height * scale)
    resized = rgb.resize((new_width, new_height), Image.Resampling.BICUBIC)
    left, top = (new_width - size) // 2, (new_height - size) // 2
    cropped = resized.crop((left, top, left + size, top + size))
    return np.asarray(cropped, dtype=np.float32) / 127.5 - 1.0


# --- load_image: modes and formats ---------------------------------------------------------------


def test_load_rgb_png_shape_dtype_range(tmp_path):
    path = save(Image.fromarray(photo("astronaut")), tmp_path / "astronaut.png")
    image = load_image(path, size=256)
    assert image.shape == (256, 256, 3), f"shape {image.shape}"
    assert image.dtype == np.float32, f"dtype {image.dtype}"
    assert image.min() >= -1.0, f"min {image.min()}"
    assert image.max() <= 1.0, f"max {image.max()}"


def test_load_rgb_png_matches_bicubic_resize(tmp_path):
    path = save(Image.fromarray(photo("astronaut")), tmp_path / "astronaut.png")
    expected = expected_pipeline(Image.fromarray(photo("astronaut")), 256)
    diff = max_diff(load_image(path, 256), expected)
    assert diff == 0.0, f"max abs diff {diff}"


def test_load_non_square_photo_center_crop(tmp_path):
    # chelsea is 451 x 300, so the width is resized to 385 and 64 columns are cut on the left.
    path = save(Image.fromarray(photo("chelsea")), tmp_path / "chelsea.png")
    image = load_image(path, 256)
    assert image.shape == (256, 256, 3), f"shape {image.shape}"
    diff = max_diff(image, expected_pipeline(Image.fromarray(photo("chelsea")), 256))
    # Resampling only the crop window rounds the filter positions differently from a
    # full resize, by at most one uint8 level.
    assert diff <= 1.0 / 127.5 + 1e-6, f"max abs diff {diff}"


def test_load_center_crop_picks_middle_third(tmp_path):
    pixels = np.zeros((32, 96, 3), np.uint8)
    pixels[:, :32] = (255, 0, 0)
    pixels[:, 32:64] = (0, 0, 255)
    pixels[:, 64:] = (255, 0, 0)
    path = save(Image.fromarray(pixels), tmp_path / "thirds.png")
    image = load_image(path, 32)
    blue = np.array([-1.0, -1.0, 1.0], np.float32)
    assert np.array_equal(image, np.broadcast_to(blue, image.shape)), f"unique colours {np.unique(image.reshape(-1, 3), axis=0)}"


def test_load_odd_excess_crops_floor_offset(tmp_path):
    # Width 33 at size 32 leaves one extra column, and the offset floor(1 / 2) = 0 drops the last one.
    pixels = np.zeros((32, 33, 3), np.uint8)
    pixels[:, :32] = (0, 0, 255)
    pixels[:, 32] = (255, 0, 0)
    path = save(Image.fromarray(pixels), tmp_path / "odd.png")
    image = load_image(path, 32)
    red_pixels = int(np.sum(image[..., 0] > 0))
    assert red_pixels == 0, f"{red_pixels} pixels have red > 0"


def test_load_jpeg_close_to_png(tmp_path):
    rgb = Image.fromarray(photo("coffee"))
    from_png = load_image(save(rgb, tmp_path / "coffee.png"), 256)
    from_jpeg = load_image(save(rgb, tmp_path / "coffee.jpg", quality=95), 256)
    mean_diff = float(np.mean(np.abs(from_png - from_jpeg)))
    assert mean_diff < 0.02, f"mean abs diff {mean_diff}"


def test_load_rgba_transparent_region_becomes_white(tmp_path):
    rgba = Image.fromarray(photo("astronaut")).convert("RGBA")
    alpha = np.full((512, 512), 255, np.uint8)
    alpha[:256, :256] = 0  # top-left quadrant, which is dark in the photo
    rgba.putalpha(Image.fromarray(alpha))
    image = load_image(save(rgba, tmp_path / "rgba.png"), 256)
    # Stay 4 pixels clear of the alpha edge, where bicubic resampling mixes in opaque pixels.
    corner = image[:124, :124]
    assert np.all(corner == 1.0), f"min in transparent corner {corner.min()}"


def test_load_rgba_opaque_region_unchanged(tmp_path):
    rgb = Image.fromarray(photo("astronaut"))
    rgba = rgb.convert("RGBA")
    alpha = np.full((512, 512), 255, np.uint8)
    alpha[:256, :256] = 0
    rgba.putalpha(Image.fromarray(alpha))
    image = load_image(save(rgba, tmp_path / "rgba.png"), 256)
    opaque = load_image(save(rgb, tmp_path / "rgb.png"), 256)
    diff = max_diff(image[132:, 132:], opaque[132:, 132:])
    assert diff == 0.0, f"max abs diff in opaque quadrant {diff}"


def test_load_la_transparent_region_becomes_white(tmp_path):
    gray = Image.fromarray(photo("camera"))
    alpha = np.full((512, 512), 255, np.uint8)
    alpha[256:, 256:] = 0
    la = Image.merge("LA", (gray, Image.fromarray(alpha)))
    image = load_image(save(la, tmp_path / "la.png"), 256)
    corner = image[132:, 132:]
    assert np.all(corner == 1.0), f"min in transparent corner {corner.min()}"


def test_load_grayscale_l_repeats_channels(tmp_path):
    path = save(Image.fromarray(photo("camera")), tmp_path / "camera.png")
    image = load_image(path, 256)
    assert image.shape == (256, 256, 3), f"shape {image.shape}"
    assert np.array_equal(image[..., 0], image[..., 1]), f"red vs green max abs diff {max_diff(image[..., 0], image[..., 1])}"
    assert np.array_equal(image[..., 0], image[..., 2]), f"red vs blue max abs diff {max_diff(image[..., 0], image[..., 2])}"


def test_load_palette_matches_rgb(tmp_path):
    palette = Image.fromarray(photo("chelsea")).quantize(colors=64)
    assert palette.mode == "P", f"quantize returned mode {palette.mode}"
    image = load_image(save(palette, tmp_path / "palette.png"), 256)
    expected = load_image(save(palette.convert("RGB"), tmp_path / "expanded.png"), 256)
    diff = max_diff(image, expected)
    assert diff == 0.0, f"max abs diff {diff}"


def test_load_palette_transparency_becomes_white(tmp_path):
    palette = Image.fromarray(photo("chelsea")).quantize(colors=16)
    transparent_index = palette.getpixel((0, 0))
    path = save(palette, tmp_path / "palette_trns.png", transparency=transparent_index)

    indices = np.asarray(palette)
    rgb = np.asarray(palette.convert("RGB")).copy()
    rgb[indices == transparent_index] = 255
    expected = load_image(save(Image.fromarray(rgb), tmp_path / "whitened.png"), 256)

    diff = max_diff(load_image(path, 256), expected)
    assert diff == 0.0, f"max abs diff {diff}"


def test_load_16bit_matches_8bit(tmp_path):
    gray8 = photo("camera")
    gray16 = Image.fromarray(gray8.astype(np.uint16) * 257)
    path = save(gray16, tmp_path / "camera16.png")
    with Image.open(path) as reopened:
        assert reopened.mode in ("I;16", "I"), f"16-bit PNG opened as mode {reopened.mode}"

    image = load_image(path, 256)
    expected = load_image(save(Image.fromarray(gray8), tmp_path / "camera8.png"), 256)
    diff = max_diff(image, expected)
    assert diff <= ONE_STEP, f"max abs diff {diff}"


def test_load_16bit_mid_gray_not_clipped(tmp_path):
    # Mid-gray 32768 would read as white if 16-bit values were clipped at 255.
    gray16 = Image.fromarray(np.full((64, 64), 32768, np.uint16))
    image = load_image(save(gray16, tmp_path / "mid16.png"), 64)
    assert abs(float(image.mean())) <= ONE_STEP, f"mean {image.mean()}"


def test_load_32bit_int_tiff_uses_16bit_range(tmp_path):
    gray8 = photo("camera")
    gray32 = Image.fromarray(gray8.astype(np.int32) * 257)
    assert gray32.mode == "I", f"fromarray returned mode {gray32.mode}"
    image = load_image(save(gray32, tmp_path / "camera32.tif"), 256)
    expected = load_image(save(Image.fromarray(gray8), tmp_path / "camera8.png"), 256)
    diff = max_diff(image, expected)
    assert diff <= ONE_STEP, f"max abs diff {diff}"


def test_load_float_tiff_uses_0_255_range(tmp_path):
    gray8 = photo("camera")
    gray_float = Image.fromarray(gray8.astype(np.float32))
    assert gray_float.mode == "F", f"fromarray returned mode {gray_float.mode}"
    image = load_image(save(gray_float, tmp_path / "camera_float.tif"), 256)
    expected = load_image(save(Image.fromarray(gray8), tmp_path / "camera8.png"), 256)
    diff = max_diff(image, expected)
    assert diff == 0.0, f"max abs diff {diff}"


@pytest.mark.parametrize("suffix, params", [(".bmp", {}), (".tif", {}), (".webp", {"lossless": True})])
def test_load_lossless_formats_match_png(tmp_path, suffix, params):
    rgb = Image.fromarray(photo("coffee"))
    image = load_image(save(rgb, tmp_path / f"coffee{suffix}", **params), 256)
    expected = load_image(save(rgb, tmp_path / "coffee.png"), 256)
    diff = max_diff(image, expected)
    assert diff == 0.0, f"max abs diff {diff}"


def test_load_gif_shape(tmp_path):
    image = load_image(save(Image.fromarray(photo("coffee")), tmp_path / "coffee.gif"), 256)
    assert image.shape == (256, 256, 3), f"shape {image.shape}"


def test_load_one_bit(tmp_path):
    bilevel = Image.fromarray(photo("camera")).convert("1")
    image = load_image(save(bilevel, tmp_path / "bilevel.png"), 512)
    values = np.unique(image)
    assert set(values.tolist()) <= {-1.0, 1.0}, f"values {values}"


def test_load_cmyk_jpeg_close_to_rgb(tmp_path):
    rgb = Image.fromarray(photo("coffee"))
    image = load_image(save(rgb.convert("CMYK"), tmp_path / "cmyk.jpg", quality=95), 256)
    expected = load_image(save(rgb, tmp_path / "coffee.png"), 256)
    mean_diff = float(np.mean(np.abs(image - expected)))
    assert mean_diff < 0.03, f"mean abs diff {mean_diff}"


def test_load_applies_exif_orientation(tmp_path):
    upright = Image.fromarray(photo("chelsea"))
    # Orientation 6 means viewers display the stored pixels rotated 90 degrees clockwise,
    # so store the photo turned counter-clockwise.
    stored = upright.transpose(Image.Transpose.ROTATE_90)
    exif = Image.Exif()
    exif[0x0112] = 6
    path = save(stored, tmp_path / "rotated.png", exif=exif)
    expected = load_image(save(upright, tmp_path / "upright.png"), 256)
    diff = max_diff(load_image(path, 256), expected)
    assert diff == 0.0, f"max abs diff {diff}"


def test_load_images_stacks(tmp_path):
    paths = [
        save(Image.fromarray(photo("astronaut")), tmp_path / "a.png"),
        save(Image.fromarray(photo("coffee")), tmp_path / "b.png"),
    ]
    batch = load_images(paths, 64)
    assert batch.shape == (2, 64, 64, 3), f"shape {batch.shape}"
    diff = max_diff(batch[1], load_image(paths[1], 64))
    assert diff == 0.0, f"max abs diff of second image {diff}"


def test_load_images_empty_list():
    batch = load_images([], 64)
    assert batch.shape == (0, 64, 64, 3), f"shape {batch.shape}"


# --- load_image: errors --------------------------------------------------------------------------


def test_load_truncated_jpeg_raises(tmp_path):
    full = save(Image.fromarray(photo("astronaut")), tmp_path / "full.jpg", quality=90)
    truncated = tmp_path / "truncated.jpg"
    data = full.read_bytes()
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageReadError) as excinfo:
        load_image(truncated)
    assert "truncated.jpg" in str(excinfo.value), f"message: {excinfo.value}"


def test_load_text_file_named_png_raises(tmp_path):
    path = tmp_path / "notes.png"
    path.write_text("not an image\n")
    with pytest.raises(ImageReadError) as excinfo:
        load_image(path)
    assert "notes.png" in str(excinfo.value), f"message: {excinfo.value}"


def test_load_missing_file_raises(tmp_path):
    path = tmp_path / "missing.png"
    with pytest.raises(ImageReadError) as excinfo:
        load_image(path)
    assert "missing.png" in str(excinfo.value), f"message: {excinfo.value}"


def test_load_directory_raises(tmp_path):
    with pytest.raises(ImageReadError):
        load_image(tmp_path)


def test_image_read_error_is_value_error():
    assert issubclass(ImageReadError, ValueError), f"bases {ImageReadError.__mro__}"


@pytest.mark.parametrize("size", [100, 0, -16, 24])
def test_load_rejects_invalid_size(tmp_path, size):
    path = save(Image.fromarray(photo("astronaut")), tmp_path / "astronaut.png")
    with pytest.raises(ValueError) as excinfo:
        load_image(path, size)
    assert str(size) in str(excinfo.value), f"message: {excinfo.value}"


# --- find_images ---------------------------------------------------------------------------------


@pytest.fixture
def image_tree(tmp_path) -> Path:
    """Build a folder tree of small photo crops, hidden entries and a text file."""
    root = tmp_path / "root"
    tile = Image.fromarray(photo("astronaut")[:32, :32])
    (root / "sub" / "deep").mkdir(parents=True)
    (root / ".git").mkdir()
    save(tile, root / "b.png")
    save(tile, root / "a.JPG", format="JPEG")
    save(tile, root / "sub" / "c.webp")
    save(tile, root / "sub" / "deep" / "e.tiff")
    save(tile, root / ".hidden.png")
    save(tile, root / ".git" / "d.png")
    (root / "notes.txt").write_text("not an image\n")
    return root


def test_find_images_walks_sorted_and_filters(image_tree):
    found = find_images([image_tree])
    expected = [
        image_tree / "a.JPG",
        image_tree / "b.png",
        image_tree / "sub" / "c.webp",
        image_tree / "sub" / "deep" / "e.tiff",
    ]
    assert found == expected, f"found {found}"


def test_find_images_keeps_direct_file_any_suffix(image_tree):
    notes = image_tree / "notes.txt"
    found = find_images([notes])
    assert found == [notes], f"found {found}"


def test_find_images_keeps_direct_hidden_file(image_tree):
    hidden = image_tree / ".hidden.png"
    found = find_images([str(hidden)])
    assert found == [hidden], f"found {found}"


def test_find_images_removes_duplicates_first_wins(image_tree):
    b_png = image_tree / "b.png"
    found = find_images([b_png, image_tree, b_png])
    expected = [b_png, image_tree / "a.JPG", image_tree / "sub" / "c.webp", image_tree / "sub" / "deep" / "e.tiff"]
    assert found == expected, f"found {found}"


def test_find_images_missing_path_raises(tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(FileNotFoundError) as excinfo:
        find_images([missing])
    assert "nowhere" in str(excinfo.value), f"message: {excinfo.value}"


def test_image_extensions_lower_case():
    upper = sorted(ext for ext in IMAGE_EXTENSIONS if ext != ext.lower())
    assert not upper, f"upper-case suffixes {upper}"


# --- to_uint8 and save_png -----------------------------------------------------------------------


def test_to_uint8_round_trip():
    pixels = photo("astronaut")
    restored = to_uint8(pixels.astype(np.float32) / 127.5 - 1.0)
    assert restored.dtype == np.uint8, f"dtype {restored.dtype}"
    assert np.array_equal(restored, pixels), f"max abs diff {max_diff(restored, pixels)}"


def test_to_uint8_clips_out_of_range():
    result = to_uint8(np.array([-3.0, -1.0, 1.0, 3.0], np.float32))
    assert result.tolist() == [0, 0, 255, 255], f"result {result.tolist()}"


def test_to_uint8_rejects_integer_input():
    with pytest.raises(TypeError):
        to_uint8(np.zeros((2, 2, 3), np.int32))


def test_save_png_float_readable(tmp_path):
    image = photo("coffee").astype(np.float32) / 127.5 - 1.0
    path = tmp_path / "out" / "nested" / "coffee.png"
    save_png(image, path)
    with Image.open(path) as reopened:
        assert reopened.format == "PNG", f"format {reopened.format}"
        pixels = np.asarray(reopened)
    assert np.array_equal(pixels, photo("coffee")), f"max abs diff {max_diff(pixels, photo('coffee'))}"


def test_save_png_uint8_leaves_no_temp_files(tmp_path):
    path = tmp_path / "astronaut.png"
    save_png(photo("astronaut"), path)
    save_png(photo("astronaut"), path)  # overwrite an existing file
    entries = sorted(os.listdir(tmp_path))
    assert entries == ["astronaut.png"], f"directory contains {entries}"


def test_save_png_failure_removes_temp_file(tmp_path):
    # A directory in the target's place makes os.replace fail after the PNG is written.
    (tmp_path / "taken.png").mkdir()
    with pytest.raises(OSError):
        save_png(photo("astronaut"), tmp_path / "taken.png")
    entries = sorted(os.listdir(tmp_path))
    assert entries == ["taken.png"], f"directory contains {entries}"


def test_save_png_rejects_grayscale_shape(tmp_path):
    with pytest.raises(ValueError):
        save_png(photo("camera"), tmp_path / "camera.png")


# --- make_grid -----------------------------------------------------------------------------------

PANEL_HEIGHT, PANEL_WIDTH = 48, 64


def grid_panels() -> list[np.ndarray]:
    """Return three 48 x 64 photo crops: two uint8 and one float in [-1, 1]."""
    float_panel = photo("chelsea")[100:148, 200:264].astype(np.float32) / 127.5 - 1.0
    return [photo("astronaut")[:PANEL_HEIGHT, :PANEL_WIDTH], float_panel, photo("coffee")[:PANEL_HEIGHT, :PANEL_WIDTH]]


def test_make_grid_shape():
    grid = make_grid(grid_panels(), ["original", "8 tokens", "256"], pad=4, label_height=20)
    expected = (PANEL_HEIGHT + 20 + 2 * 4, 3 * PANEL_WIDTH + 4 * 4, 3)
    assert grid.shape == expected, f"shape {grid.shape}"
    assert grid.dtype == np.uint8, f"dtype {grid.dtype}"


@pytest.mark.parametrize("index", [0, 1, 2])
def test_make_grid_panel_placement(index):
    pad = 5
    panels = grid_panels()
    grid = make_grid(panels, ["a", "b", "c"], pad=pad, label_height=16)
    left = pad + index * (PANEL_WIDTH + pad)
    placed = grid[pad : pad + PANEL_HEIGHT, left : left + PANEL_WIDTH]
    expected = to_uint8(panels[index])
    assert np.array_equal(placed, expected), f"panel {index} max abs diff {max_diff(placed, expected)}"


def test_make_grid_pad_is_white():
    pad, label_height = 4, 20
    grid = make_grid(grid_panels(), ["a", "b", "c"], pad=pad, label_height=label_height)
    mask = np.ones(grid.shape[:2], bool)
    for index in range(3):
        left = pad + index * (PANEL_WIDTH + pad)
        mask[pad : pad + PANEL_HEIGHT + label_height, left : left + PANEL_WIDTH] = False
    pad_pixels = grid[mask]
    assert np.all(pad_pixels == 255), f"min in pad area {pad_pixels.min()}"


def test_make_grid_label_drawn_dark():
    pad, label_height = 4, 20
    grid = make_grid(grid_panels(), ["original", "", "x"], pad=pad, label_height=label_height)
    strip = grid[pad + PANEL_HEIGHT : pad + PANEL_HEIGHT + label_height, pad : pad + PANEL_WIDTH]
    assert strip.min() < 128, f"darkest label pixel {strip.min()}"


def test_make_grid_empty_label_strip_is_white():
    pad, label_height = 4, 20
    grid = make_grid(grid_panels(), ["original", "", "x"], pad=pad, label_height=label_height)
    left = pad + PANEL_WIDTH + pad
    strip = grid[pad + PANEL_HEIGHT : pad + PANEL_HEIGHT + label_height, left : left + PANEL_WIDTH]
    assert np.all(strip == 255), f"darkest pixel in empty label strip {strip.min()}"


def test_make_grid_label_is_centered():
    pad, label_height = 4, 20
    grid = make_grid(grid_panels(), ["x", "x", "x"], pad=pad, label_height=label_height)
    strip = grid[pad + PANEL_HEIGHT : pad + PANEL_HEIGHT + label_height, pad : pad + PANEL_WIDTH].min(axis=2)
    columns = np.nonzero(strip.min(axis=0) < 255)[0]
    ink_center = (columns[0] + columns[-1] + 1) / 2
    assert abs(ink_center - PANEL_WIDTH / 2) <= 1.5, f"ink centered at column {ink_center}"


def test_make_grid_label_count_mismatch_raises():
    with pytest.raises(ValueError):
        make_grid(grid_panels(), ["only one"])


def test_make_grid_panel_shape_mismatch_raises():
    panels = grid_panels()
    panels[1] = panels[1][:, :-1]
    with pytest.raises(ValueError):
        make_grid(panels, ["a", "b", "c"])
