"""Image file input and output for the tokenizer.

Loading decodes, resizes and center-crops files into model input, and writing
covers PNGs and labelled comparison grids. Arrays are NHWC (HWC for one image)
float32 in [-1, 1], the range the VAE encodes and decodes. Functions that write
images also accept uint8 0..255.
"""

from __future__ import annotations

import functools
import os
import struct
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont, ImageOps, UnidentifiedImageError

from flextok_jax.files import atomic_write

# Lower-case file suffixes that `find_images` picks up inside directories.
IMAGE_EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp"})

# The VAE downsamples by 8 and the encoder cuts latents into 2 x 2 patches,
# so an image side must be a multiple of 8 * 2 pixels.
SIZE_MULTIPLE = 16

# Errors that Pillow raises for unreadable data. Image.open converts header errors
# into UnidentifiedImageError (an OSError), but plugin code that runs in load()
# and EXIF parsing can still raise the other types on damaged data (Pillow 13).
_DECODE_ERRORS = (
    UnidentifiedImageError,
    OSError,
    Image.DecompressionBombError,
    SyntaxError,
    ValueError,
    EOFError,
    struct.error,
)

_WHITE = 255


class ImageReadError(ValueError):
    """Error for an image file that is missing, unreadable or not decodable by Pillow."""


def _check_size(size: int) -> None:
    if isinstance(size, bool) or not isinstance(size, int) or size <= 0 or size % SIZE_MULTIPLE:
        raise ValueError(f"Invalid image size {size!r}. Pass a positive multiple of {SIZE_MULTIPLE} pixels, such as 256.")


def _to_rgb(img: Image.Image) -> Image.Image:
    """Convert any Pillow mode to 8-bit RGB, compositing transparency onto white."""
    mode = img.mode
    if mode.startswith("I;16") or mode == "I":
        # Pillow's convert("L") clips these modes at 255, so rescale 0..65535 to
        # 0..255 here. 65535 / 257 == 255 exactly.
        # NOTE: mode I is assumed to hold 16-bit values, which is what 16-bit PNG
        # and TIFF files decode to. A 32-bit image with another range is clipped.
        values = np.asarray(img).astype(np.float64)
        gray = np.round(np.clip(values, 0, 65535) / 257.0).astype(np.uint8)
        return Image.fromarray(gray).convert("RGB")
    if mode == "F":
        # NOTE: float images follow Pillow's own convention of 0..255 values,
        # so a float image scaled to 0..1 comes out nearly black.
        values = np.asarray(img, dtype=np.float64)
        gray = np.round(np.clip(np.nan_to_num(values), 0, 255)).astype(np.uint8)
        return Image.fromarray(gray).convert("RGB")

    has_alpha = mode in ("RGBA", "RGBa", "LA", "La", "PA") or "transparency" in img.info
    if has_alpha or mode == "P":
        # Palette images go through RGBA so a transparent palette entry or a
        # tRNS chunk becomes alpha instead of the colour stored behind it.
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (_WHITE, _WHITE, _WHITE, _WHITE))
        return Image.alpha_composite(background, rgba).convert("RGB")

    # Covers RGB, L, 1, CMYK and YCbCr. CMYK uses Pillow's plain formula and
    # ignores any embedded ICC profile.
    return img.convert("RGB")


def _resize_center_crop(img: Image.Image, size: int) -> Image.Image:
    """Resize so the shorter side is `size` (bicubic), then crop the central size x size square.

    Only the cropped region is resampled (Pillow's `box`), which gives the pixels of a
    full resize followed by a crop without building the full resized image, so a very
    wide panorama costs no more memory than a square one.
    """
    width, height = img.size
    scale = size / min(width, height)
    new_width = max(size, round(width * scale))
    new_height = max(size, round(height * scale))
    left = (new_width - size) // 2
    top = (new_height - size) // 2
    if (new_width, new_height) == (width, height):
        return img.crop((left, top, left + size, top + size))

    # The crop window in source pixel coordinates.
    scale_x = new_width / width
    scale_y = new_height / height
    box = (left / scale_x, top / scale_y, (left + size) / scale_x, (top + size) / scale_y)
    return img.resize((size, size), Image.Resampling.BICUBIC, box=box)


def load_image(path: str | Path, size: int = 256) -> np.ndarray:
    """Read an image file as float32 [size, size, 3] in [-1, 1].

    The image is turned upright by its EXIF orientation, converted to RGB with
    transparency composited onto white, resized so the shorter side is `size`
    with bicubic resampling, and center-cropped. For an odd excess the crop
    keeps one more column on the right (one more row at the bottom).
    Multi-frame files (GIF, TIFF, WebP) contribute their first frame.

    Raises:
        ValueError: `size` is not a positive multiple of 16.
        ImageReadError: the file is missing, truncated, corrupt or not an image.
    """
    _check_size(size)
    path = Path(path)
    try:
        with Image.open(path) as img:
            # Decode every pixel here so that truncated data fails inside this try.
            img.load()
            img = ImageOps.exif_transpose(img)
            rgb = _to_rgb(img)
            rgb = _resize_center_crop(rgb, size)
            pixels = np.asarray(rgb, dtype=np.float32)
    except FileNotFoundError as err:
        raise ImageReadError(f"Image file not found: {path}. Check the path and that the file still exists.") from err
    except Image.DecompressionBombError as err:
        raise ImageReadError(
            f"Failed to read image {path}: {err}. If you trust the file, raise PIL.Image.MAX_IMAGE_PIXELS before loading it."
        ) from err
    except _DECODE_ERRORS as err:
        raise ImageReadError(
            f"Failed to read image {path} ({type(err).__name__}: {err}). "
            "Re-export or re-download the file, or leave it out of the inputs."
        ) from err
    return pixels / 127.5 - 1.0


def load_images(paths: Sequence[str | Path], size: int = 256) -> np.ndarray:
    """Read image files with `load_image` and stack them into float32 [N, size, size, 3]."""
    _check_size(size)
    if not paths:
        return np.zeros((0, size, size, 3), np.float32)
    return np.stack([load_image(path, size) for path in paths])


def _raise_walk_error(err: OSError) -> None:
    # os.walk skips unreadable directories silently by default, which would hide
    # missing inputs.
    raise err


def _walk_images(root: Path) -> list[Path]:
    found = []
    for dirpath, dirnames, filenames in os.walk(root, onerror=_raise_walk_error):
        # Pruning dirnames in place stops os.walk from descending into hidden directories.
        dirnames[:] = [name for name in dirnames if not name.startswith(".")]
        for name in filenames:
            if name.startswith(".") or Path(name).suffix.lower() not in IMAGE_EXTENSIONS:
                continue
            file_path = Path(dirpath) / name
            if file_path.is_file():  # skips broken symlinks, sockets and FIFOs
                found.append(file_path)
    return sorted(found)


def find_images(inputs: Sequence[str | Path]) -> list[Path]:
    """Expand files and directories into a list of image files.

    A file named directly is kept as given, whatever its suffix. A directory is
    walked recursively for files whose lower-cased suffix is in
    IMAGE_EXTENSIONS, skipping names that start with "." and not following
    directory symlinks, and its files are listed in sorted path order.
    Duplicates (same absolute path after normalizing "." and "..") are dropped,
    and the first occurrence keeps its place.

    Raises:
        FileNotFoundError: an input path does not exist.
    """
    if isinstance(inputs, (str, os.PathLike)):
        inputs = [inputs]

    result: list[Path] = []
    seen: set[str] = set()
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            candidates = _walk_images(path)
        elif path.exists():
            candidates = [path]
        else:
            raise FileNotFoundError(f"Input path not found: {path}. Pass an existing image file or directory.")

        for candidate in candidates:
            key = os.path.abspath(candidate)
            if key not in seen:
                seen.add(key)
                result.append(candidate)
    return result


def to_uint8(images: np.ndarray) -> np.ndarray:
    """Convert float images in [-1, 1] to uint8 0..255, rounding and clipping.

    Works on any shape. uint8 input is returned unchanged. Other integer and
    bool dtypes raise TypeError, since their value range is ambiguous.
    """
    array = np.asarray(images)
    if array.dtype == np.uint8:
        return array
    if array.dtype.kind in "biu":
        raise TypeError(f"to_uint8 expected float images in [-1, 1] or uint8, got dtype {array.dtype}.")
    values = (array.astype(np.float32) + 1.0) * 127.5
    return np.round(np.clip(values, 0, 255)).astype(np.uint8)


def _check_hwc(image: np.ndarray, name: str) -> None:
    if image.ndim != 3 or image.shape[-1] != 3:
        raise ValueError(f"Invalid {name} shape {image.shape}. Expected [H, W, 3] RGB.")


def save_png(image: np.ndarray, path: str | Path) -> None:
    """Write one [H, W, 3] image (float in [-1, 1] or uint8) to `path` as PNG, atomically.

    Readers never see a partial file, and missing parent directories are created.
    """
    pixels = to_uint8(image)
    _check_hwc(pixels, "image")
    with atomic_write(path) as handle:
        Image.fromarray(pixels).save(handle, format="PNG")


@functools.cache
def _label_font() -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    return ImageFont.load_default()


def _render_label(text: str, width: int, height: int) -> Image.Image:
    """Draw `text` in black, centered on a white width x height strip that clips any overflow."""
    strip = Image.new("RGB", (width, height), (_WHITE, _WHITE, _WHITE))
    if not text or height == 0:
        return strip
    draw = ImageDraw.Draw(strip)
    font = _label_font()
    left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
    # textbbox includes the font's offset from the anchor, so subtract it to center the ink.
    x = (width - (right - left)) / 2 - left
    y = (height - (bottom - top)) / 2 - top
    draw.text((x, y), text, fill=(0, 0, 0), font=font)
    return strip


def make_grid(panels: list[np.ndarray], labels: list[str], pad: int = 4, label_height: int = 20) -> np.ndarray:
    """Lay out same-sized panels in one row, each with a text label under it, as uint8 [rows, cols, 3].

    Each panel is [H, W, 3], float in [-1, 1] or uint8. With n panels the grid is
    [H + label_height + 2 * pad, n * W + (n + 1) * pad, 3] and white except for:
      - panel i at rows [pad, pad + H) and columns [x_i, x_i + W), where x_i = pad + i * (W + pad);
      - its label at rows [pad + H, pad + H + label_height) and the same columns,
        in black with Pillow's default font, centered, and clipped to that strip.
    """
    if not panels:
        raise ValueError("make_grid got no panels. Pass at least one panel.")
    if len(labels) != len(panels):
        raise ValueError(f"make_grid got {len(panels)} panels but {len(labels)} labels. Pass one label per panel.")
    if pad < 0 or label_height < 0:
        raise ValueError(f"Invalid pad={pad} or label_height={label_height}. Both must be >= 0.")

    tiles = [to_uint8(panel) for panel in panels]
    for index, tile in enumerate(tiles):
        _check_hwc(tile, f"panel {index}")
    height, width = tiles[0].shape[:2]
    for index, tile in enumerate(tiles):
        if tile.shape != tiles[0].shape:
            raise ValueError(
                f"Panel {index} has shape {tile.shape}, but panel 0 has {tiles[0].shape}. Resize the panels to one size."
            )

    count = len(tiles)
    grid = np.full((height + label_height + 2 * pad, count * width + (count + 1) * pad, 3), _WHITE, np.uint8)
    for index, (tile, label) in enumerate(zip(tiles, labels)):
        x = pad + index * (width + pad)
        grid[pad : pad + height, x : x + width] = tile
        grid[pad + height : pad + height + label_height, x : x + width] = np.asarray(_render_label(label, width, label_height))
    return grid
