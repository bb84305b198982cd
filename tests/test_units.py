"""Unit and property tests: masks, FSQ, patching, embeddings, batch buckets and the public API."""

from __future__ import annotations

import math
import re

import jax
import numpy as np
import pytest
from flax import nnx

from flextok_jax.api import FlexTok, bucket_size
from flextok_jax.embeddings import crop_grid_table, patchify, timestep_embedding, unpatchify
from flextok_jax.fsq import FSQ
from flextok_jax.masks import causal_last_mask, full_mask
from tests.conftest import golden_path, load_golden, nchw_to_nhwc, rel_error, tiny_config

LEVELS = (8, 8, 8, 5, 5, 5)


# --- Masks -----------------------------------------------------------------------------


def test_causal_mask_shape():
    mask = np.asarray(causal_last_mask(6, 4))
    assert mask.shape == (10, 10), f"mask shape {mask.shape} != (10, 10)"
    assert mask.dtype == bool, f"mask dtype {mask.dtype} != bool"


def test_causal_mask_patches():
    patches, registers = 6, 4
    mask = np.asarray(causal_last_mask(patches, registers))
    for q in range(patches):
        assert mask[q, :patches].all(), f"patch {q} does not see every patch: {mask[q, :patches].tolist()}"
        assert not mask[q, patches:].any(), f"patch {q} sees registers: {mask[q, patches:].tolist()}"


def test_causal_mask_registers():
    patches, registers = 6, 4
    mask = np.asarray(causal_last_mask(patches, registers))
    for i in range(registers):
        row = mask[patches + i]
        assert row[:patches].all(), f"register {i} does not see every patch: {row[:patches].tolist()}"
        assert row[patches : patches + i + 1].all(), f"register {i} misses one of registers 0..{i}: {row[patches:].tolist()}"
        if i + 1 < registers:
            assert not row[patches + i + 1], f"register {i} sees register {i + 1}"
        assert not row[patches + i + 1 :].any(), f"register {i} sees a later register: {row[patches:].tolist()}"


def test_full_mask():
    mask = np.asarray(full_mask(7))
    assert mask.shape == (7, 7), f"mask shape {mask.shape} != (7, 7)"
    assert mask.all(), f"full mask has {int((~mask).sum())} False entries"


# --- FSQ -------------------------------------------------------------------------------


def test_fsq_codebook_size():
    size = FSQ(LEVELS).codebook_size
    assert size == 64000, f"codebook_size {size} != 64000"


def test_fsq_ids_round_trip():
    fsq = FSQ(LEVELS)
    ids = np.arange(fsq.codebook_size)
    back = np.asarray(fsq.codes_to_ids(fsq.ids_to_codes(ids)))
    wrong = np.flatnonzero(back != ids)
    assert wrong.size == 0, f"{wrong.size} ids do not round-trip; first: id {int(wrong[0])} -> {int(back[wrong[0]])}"


def test_fsq_codes_distinct():
    fsq = FSQ(LEVELS)
    codes = np.asarray(fsq.ids_to_codes(np.arange(fsq.codebook_size)))
    unique = np.unique(codes, axis=0).shape[0]
    assert unique == fsq.codebook_size, f"{unique} distinct codes for {fsq.codebook_size} ids"


def test_fsq_quantize_on_grid():
    fsq = FSQ(LEVELS)
    z = np.random.default_rng(0).normal(scale=3.0, size=(512, len(LEVELS))).astype(np.float32)
    codes = np.asarray(fsq.quantize(z))
    for dim, level in enumerate(LEVELS):
        half = level // 2
        grid = (np.arange(level) - half) / half
        values = np.unique(codes[:, dim])
        off_grid = [float(v) for v in values if not np.any(np.isclose(v, grid, rtol=0, atol=1e-6))]
        assert not off_grid, f"dimension {dim} (level {level}) has off-grid values {off_grid}"


def test_fsq_quantize_covers_levels():
    """Large inputs reach every level, including both ends."""
    fsq = FSQ(LEVELS)
    z = np.random.default_rng(1).normal(scale=3.0, size=(4096, len(LEVELS))).astype(np.float32)
    codes = np.asarray(fsq.quantize(z))
    for dim, level in enumerate(LEVELS):
        count = np.unique(codes[:, dim]).size
        assert count == level, f"dimension {dim} reaches {count} of its {level} levels"


@pytest.mark.parametrize("wrapped, expected", [(64000, 0), (-1, 63999)])
def test_fsq_ids_wrap(wrapped, expected):
    fsq = FSQ(LEVELS)
    got = np.asarray(fsq.ids_to_codes(np.asarray([wrapped])))
    want = np.asarray(fsq.ids_to_codes(np.asarray([expected])))
    assert np.array_equal(got, want), f"id {wrapped} decodes to {got.tolist()}, id {expected} to {want.tolist()}"


# --- Patching and position tables ------------------------------------------------------


def test_patchify_inverse():
    latents = np.random.default_rng(0).normal(size=(2, 8, 12, 5)).astype(np.float32)
    patches = np.asarray(patchify(latents, 2))
    assert patches.shape == (2, 4, 6, 20), f"patches shape {patches.shape} != (2, 4, 6, 20)"
    back = np.asarray(unpatchify(patches, 2, 5))
    assert np.array_equal(back, latents), f"unpatchify(patchify(x)) differs by up to {np.max(np.abs(back - latents)):.2e}"


def test_patchify_feature_order():
    """Features run over (row in patch, column in patch, channel), channel fastest."""
    # Entry (y, x, c) contains 100 * y + 10 * x + c.
    y, x, c = np.meshgrid(np.arange(4), np.arange(4), np.arange(3), indexing="ij")
    latents = (100 * y + 10 * x + c)[None].astype(np.float32)
    patches = np.asarray(patchify(latents, 2))
    # The patch at grid row 1, grid column 0 covers pixel rows 2..3, columns 0..1.
    expected = [200, 201, 202, 210, 211, 212, 300, 301, 302, 310, 311, 312]
    assert patches[0, 1, 0].tolist() == expected, f"patch (1, 0) is {patches[0, 1, 0].tolist()}, expected {expected}"


def test_patchify_rejects_grid():
    with pytest.raises(ValueError, match="5x4"):
        patchify(np.zeros((1, 5, 4, 3), np.float32), 2)


def test_crop_grid_table():
    table = np.arange(4 * 5 * 3, dtype=np.float32).reshape(4, 5, 3)
    cropped = np.asarray(crop_grid_table(table, 2, 3))
    expected = table[:2, :3].reshape(6, 3)
    assert cropped.shape == (6, 3), f"cropped shape {cropped.shape} != (6, 3)"
    assert np.array_equal(cropped, expected), f"crop is {cropped.tolist()}, expected the top-left {expected.tolist()}"


@pytest.mark.parametrize("grid", [(5, 1), (1, 6)])
def test_crop_grid_too_large(grid):
    table = np.zeros((4, 5, 3), np.float32)
    with pytest.raises(ValueError, match=f"{grid[0]}x{grid[1]}"):
        crop_grid_table(table, *grid)


# --- Timestep embedding ----------------------------------------------------------------


def test_timestep_embedding_values():
    t = np.asarray([0.0, 0.25, 0.7, 1.0], np.float32)
    dim, max_timestep = 16, 1.0
    half = dim // 2
    freqs = (1000.0 / max_timestep) * np.exp(-math.log(256.0) * np.arange(half) / half)
    args = t[:, None].astype(np.float64) * freqs[None, :]
    expected = np.concatenate([np.cos(args), np.sin(args)], axis=-1)
    got = np.asarray(timestep_embedding(t, max_timestep, dim))
    max_diff = float(np.max(np.abs(got - expected)))
    assert got.shape == (4, dim), f"embedding shape {got.shape} != (4, {dim})"
    assert max_diff < 1e-3, f"embedding differs from numpy by up to {max_diff:.2e}"


def test_timestep_embedding_cos_first():
    got = np.asarray(timestep_embedding(np.zeros((1,), np.float32), 1.0, 8))
    assert np.array_equal(got[0, :4], np.ones(4)), f"cos half at t=0 is {got[0, :4].tolist()}, expected ones"
    assert np.array_equal(got[0, 4:], np.zeros(4)), f"sin half at t=0 is {got[0, 4:].tolist()}, expected zeros"


def test_timestep_embedding_max_timestep():
    """t is scaled by 1000 / max_timestep, so (t, max) and (2t, 2max) embed alike."""
    t = np.asarray([0.3], np.float32)
    base = np.asarray(timestep_embedding(t, 1.0, 16))
    doubled = np.asarray(timestep_embedding(2 * t, 2.0, 16))
    max_diff = float(np.max(np.abs(base - doubled)))
    assert max_diff < 1e-4, f"embeddings differ by up to {max_diff:.2e}"


# --- Batch buckets ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "devices, expected",
    [
        (1, [1, 2, 4, 4, 8, 8, 8, 8, 16]),
        (8, [8, 8, 8, 8, 8, 8, 8, 8, 16]),
    ],
)
def test_bucket_size(devices, expected):
    for batch, want in zip(range(1, 10), expected):
        got = bucket_size(batch, devices)
        assert got == want, f"bucket_size({batch}, {devices}) = {got}, expected {want}"


# --- Public API ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def flextok() -> FlexTok:
    return FlexTok.from_pretrained(golden_path("tiny"))


def assert_names(err: pytest.ExceptionInfo, value: str) -> None:
    """The error message contains `value` as a whole token, not inside a longer number."""
    message = str(err.value)
    pattern = rf"(?<![\w.]){re.escape(value)}(?![\w])"
    assert re.search(pattern, message), f"message {message!r} does not name {value!r}"


def valid_tokens(flextok: FlexTok, batch: int = 1) -> np.ndarray:
    return np.zeros((batch, flextok.num_registers), np.int64)


def images(shape, low=-1.0, high=1.0, dtype=np.float32) -> np.ndarray:
    return np.random.default_rng(0).uniform(low, high, size=shape).astype(dtype)


@pytest.mark.parametrize("bad_id", [64000, -1])
def test_rejects_token_id(flextok, bad_id):
    tokens = valid_tokens(flextok)
    tokens[0, 3] = bad_id
    with pytest.raises(ValueError) as err:
        flextok.detokenize_latents(tokens, steps=1)
    assert_names(err, str(bad_id))


@pytest.mark.parametrize("length", ["zero", "registers_plus_one"])
def test_rejects_length(flextok, length):
    value = 0 if length == "zero" else flextok.num_registers + 1
    with pytest.raises(ValueError) as err:
        flextok.detokenize_latents(valid_tokens(flextok), lengths=[value], steps=1)
    assert_names(err, str(value))


def test_rejects_length_past_row(flextok):
    tokens = np.zeros((1, 4), np.int64)
    with pytest.raises(ValueError) as err:
        flextok.detokenize_latents(tokens, lengths=[7], steps=1)
    assert_names(err, "7")


def test_rejects_length_past_list_row(flextok):
    rows = [np.zeros(4, np.int64), np.zeros(9, np.int64)]
    with pytest.raises(ValueError) as err:
        flextok.detokenize_latents(rows, lengths=[7, 9], steps=1)
    assert_names(err, "7")


def test_rejects_float_list_row(flextok):
    with pytest.raises(ValueError) as err:
        flextok.detokenize_latents([np.asarray([1.7, 3.2])], steps=1, guidance_scale=1.0)
    assert_names(err, "float64")


def test_rejects_3d_images(flextok):
    with pytest.raises(ValueError) as err:
        flextok.tokenize(images((128, 128, 3)))
    assert_names(err, "(128, 128, 3)")


def test_rejects_4_channels(flextok):
    with pytest.raises(ValueError) as err:
        flextok.tokenize(images((1, 128, 128, 4)))
    assert_names(err, "(1, 128, 128, 4)")


def test_rejects_image_size(flextok):
    with pytest.raises(ValueError) as err:
        flextok.tokenize(images((1, 120, 120, 3)))
    assert_names(err, "120x120")


def test_rejects_uint8_images(flextok):
    with pytest.raises(ValueError) as err:
        flextok.tokenize(images((1, 128, 128, 3), 0, 255, np.uint8))
    assert_names(err, "uint8")


def test_rejects_0_255_images(flextok):
    pixels = images((1, 128, 128, 3), 0.0, 255.0)
    pixels[0, 0, 0, 0] = 255.0
    with pytest.raises(ValueError) as err:
        flextok.tokenize(pixels)
    assert_names(err, "255")


def test_rejects_zero_steps(flextok):
    with pytest.raises(ValueError) as err:
        flextok.detokenize_latents(valid_tokens(flextok), steps=0)
    assert_names(err, "steps=0")


def test_rejects_noise_batch(flextok):
    noise = np.zeros((3, 16, 16, flextok.config.vae.latent_channels), np.float32)
    with pytest.raises(ValueError) as err:
        flextok.detokenize_latents(valid_tokens(flextok, batch=2), steps=1, noise=noise)
    assert_names(err, "3")


def random_tokens(flextok: FlexTok, batch: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, flextok.codebook_size, size=(batch, flextok.num_registers))


def test_same_rng_repeats(flextok):
    tokens = random_tokens(flextok, 2)
    first = np.asarray(flextok.detokenize_latents(tokens, steps=1, guidance_scale=1.0, rng=jax.random.PRNGKey(5)))
    second = np.asarray(flextok.detokenize_latents(tokens, steps=1, guidance_scale=1.0, rng=jax.random.PRNGKey(5)))
    max_diff = float(np.max(np.abs(first - second)))
    assert max_diff == 0.0, f"two runs with PRNGKey(5) differ by up to {max_diff:.2e}"


def test_rngs_differ(flextok):
    tokens = random_tokens(flextok, 2)
    first = np.asarray(flextok.detokenize_latents(tokens, steps=1, guidance_scale=1.0, rng=jax.random.PRNGKey(5)))
    second = np.asarray(flextok.detokenize_latents(tokens, steps=1, guidance_scale=1.0, rng=jax.random.PRNGKey(6)))
    max_diff = float(np.max(np.abs(first - second)))
    assert max_diff > 0.1, f"PRNGKey(5) and PRNGKey(6) differ by only {max_diff:.2e}"


def test_ignores_ids_past_length(flextok):
    lengths = np.asarray([1, 5, flextok.num_registers])
    garbage = random_tokens(flextok, 3, seed=1)
    zeroed = np.where(np.arange(flextok.num_registers)[None, :] < lengths[:, None], garbage, 0)
    kwargs = dict(lengths=lengths, steps=1, guidance_scale=1.0, rng=jax.random.PRNGKey(0))
    with_garbage = np.asarray(flextok.detokenize_latents(garbage, **kwargs))
    with_zeros = np.asarray(flextok.detokenize_latents(zeroed, **kwargs))
    max_diff = float(np.max(np.abs(with_garbage - with_zeros)))
    assert max_diff == 0.0, f"ids past the lengths change the latents by up to {max_diff:.2e}"


def test_sample_traced_once(flextok):
    fresh = FlexTok(flextok.model)  # its own compile cache and trace counts
    tokens = random_tokens(fresh, 3)
    for lengths in ([1, 16, 32], [32, 2, 5]):
        fresh.detokenize_latents(tokens, lengths=lengths, steps=2, guidance_scale=1.0)
    count = fresh.trace_counts["sample"]
    assert count == 1, f"'sample' was traced {count} times for two length sets"


def test_integer_seed_matches_key(flextok):
    tokens = random_tokens(flextok, 2)
    from_seed = flextok.detokenize_latents(tokens, steps=2, rng=3)
    from_key = flextok.detokenize_latents(tokens, steps=2, rng=jax.random.PRNGKey(3))
    assert np.array_equal(np.asarray(from_seed), np.asarray(from_key)), "rng=3 and PRNGKey(3) gave different latents"


def test_rejects_non_key_rng(flextok):
    with pytest.raises(ValueError) as err:
        flextok.detokenize_latents(random_tokens(flextok, 1), steps=1, rng="seed")
    assert_names(err, "'seed'")


def test_rejects_nan_guidance_function(flextok):
    with pytest.raises(ValueError) as err:
        flextok.detokenize_latents(random_tokens(flextok, 1), steps=2, guidance_scale=lambda t: float("nan"))
    assert_names(err, "nan")


def test_rejects_infinite_guidance(flextok):
    with pytest.raises(ValueError) as err:
        flextok.detokenize_latents(random_tokens(flextok, 1), steps=2, guidance_scale=float("inf"))
    assert_names(err, "inf")


def test_rejects_nan_noise(flextok):
    noise = np.full((1, 16, 16, 16), np.nan, np.float32)
    with pytest.raises(ValueError) as err:
        flextok.detokenize_latents(random_tokens(flextok, 1), steps=1, noise=noise)
    assert_names(err, "NaN")


def test_rejects_nan_time(flextok):
    latents = np.zeros((1, 16, 16, 16), np.float32)
    with pytest.raises(ValueError) as err:
        flextok.velocity(latents, [float("nan")], random_tokens(flextok, 1))
    assert_names(err, "nan")


def test_rejects_empty_image_batch(flextok):
    with pytest.raises(ValueError) as err:
        flextok.tokenize(np.zeros((0, 128, 128, 3), np.float32))
    assert_names(err, "empty")


def test_accepts_bfloat16_images(flextok):
    pixels = images((1, 128, 128, 3), low=-0.5, high=0.5)
    from_bf16 = np.asarray(flextok.tokenize(pixels.astype(jax.numpy.bfloat16)))
    from_f32 = np.asarray(flextok.tokenize(pixels.astype(jax.numpy.bfloat16).astype(np.float32)))
    assert np.array_equal(from_bf16, from_f32), "bfloat16 images tokenize differently from their float32 copy"


def test_rejects_batched_keys(flextok):
    keys = jax.random.split(jax.random.key(0), 2)
    with pytest.raises(ValueError) as err:
        flextok.detokenize_latents(random_tokens(flextok, 2), steps=1, rng=keys)
    assert "single PRNG key" in str(err.value), f"message {str(err.value)!r} does not explain the key shape"


def test_bfloat16_compute_close():
    golden = load_golden("tiny")
    model = FlexTok.from_pretrained(golden_path("tiny"), dtype="bfloat16")
    latents = model.detokenize_latents(
        golden["tokens"], golden["detok_lengths"], steps=4, guidance_scale=7.5, apg=True, noise=nchw_to_nhwc(golden["init_noise"])
    )
    err = rel_error(latents, nchw_to_nhwc(golden["detok_steps4_apg7.5_latents"]))
    print(f"bfloat16 compute: detok_steps4_apg7.5_latents rel_err={err:.2e}")
    # bfloat16 keeps 8 mantissa bits, so about 1e-2 is the expected scale of the error.
    assert err <= 5e-2, f"bfloat16 latents are {err:.2e} from the float32 reference"


def test_save_refuses_foreign_folder(flextok, tmp_path):
    (tmp_path / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError) as err:
        flextok.save(tmp_path)
    assert str(tmp_path) in str(err.value), f"message does not name the folder: {err.value}"
    assert (tmp_path / "notes.txt").read_text() == "keep me", "save changed a file in a foreign folder"


def test_save_overwrite_replaces_model(flextok, tmp_path):
    out = tmp_path / "converted"
    flextok.save(out)
    with pytest.raises(FileExistsError):
        flextok.save(out)
    flextok.save(out, overwrite=True)
    reloaded = FlexTok.from_pretrained(out)
    pixels = images((2, 128, 128, 3))
    assert np.array_equal(np.asarray(reloaded.tokenize(pixels)), np.asarray(flextok.tokenize(pixels))), "reloaded model tokenizes differently"


def test_sampled_posterior_uses_rng():
    import dataclasses

    from flextok_jax.model import FlexTokModel

    base = FlexTok.from_pretrained(golden_path("tiny")).model
    config = tiny_config(vae=dataclasses.replace(tiny_config().vae, sample_posterior=True))
    sampling = FlexTokModel(config, rngs=nnx.Rngs(0))
    nnx.update(sampling, nnx.state(base))
    model = FlexTok(sampling)
    pixels = images((2, 128, 128, 3))
    first = np.asarray(model.encode_latents(pixels, rng=jax.random.PRNGKey(1)))
    again = np.asarray(model.encode_latents(pixels, rng=jax.random.PRNGKey(1)))
    other = np.asarray(model.encode_latents(pixels, rng=jax.random.PRNGKey(2)))
    assert np.array_equal(first, again), "the same key sampled different latents"
    assert not np.array_equal(first, other), "different keys sampled the same latents"


def test_rejects_huge_integer_seed(flextok):
    with pytest.raises(ValueError) as err:
        flextok.detokenize_latents(random_tokens(flextok, 1), steps=1, rng=2**70)
    assert_names(err, str(2**70))
