"""Parity of every golden.npz array with the PyTorch reference, for both checkpoint formats.

The golden files store images and latents NCHW; the package works NHWC. Each float
comparison prints its relative L2 error (run pytest with -s to see them) and must stay
within PARITY_RTOL. Token ids and FSQ codes must match exactly.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
from flax import nnx

from convert import load_vae
from flextok_jax.api import FlexTok
from flextok_jax.fsq import FSQ
from tests.conftest import GOLDEN_MODELS, PARITY_RTOL, golden_path, load_golden, nchw_to_nhwc, rel_error

FORMATS = ("hub_dir", "safetensors")

# name -> (guidance_scale, apg) of the reference's 4-step detokenization runs.
SCHEDULES = {
    "steps4_g1": (1.0, True),
    "steps4_cfg3": (3.0, False),
    "steps4_apg7.5": (7.5, True),
}
STEPS = 4


def checkpoint_path(name: str, fmt: str) -> Path:
    """Return the hub-style directory, or the single .safetensors file that stores the config in its metadata."""
    if fmt == "hub_dir":
        return golden_path(name)
    return golden_path(name) / "model.safetensors"


def assert_close(actual, expected, label: str) -> None:
    err = rel_error(actual, expected)
    print(f"{label} rel_err={err:.2e}")
    assert err <= PARITY_RTOL, f"{label}: rel_err {err:.2e} exceeds {PARITY_RTOL:.0e}"


def assert_tokens_equal(actual, expected, label: str) -> None:
    actual = np.asarray(actual)
    expected = np.asarray(expected)
    assert actual.shape == expected.shape, f"{label}: shape {actual.shape} != expected {expected.shape}"
    differs = np.argwhere(actual != expected)
    if differs.size:
        row, col = map(int, differs[0])
        pytest.fail(
            f"{label}: {len(differs)} token(s) differ; first at row {row}, position {col}: "
            f"{int(actual[row, col])} != expected {int(expected[row, col])}"
        )


@dataclass
class Case:
    """One golden model loaded from one checkpoint format, with detokenization results cached."""

    name: str
    fmt: str
    flextok: FlexTok
    golden: dict[str, np.ndarray]
    detok_latents: dict[str, np.ndarray] = field(default_factory=dict)

    @property
    def label(self) -> str:
        return f"{self.name} {self.fmt}"

    def nhwc(self, key: str) -> np.ndarray:
        return nchw_to_nhwc(self.golden[key])

    def detokenize(self, schedule: str) -> np.ndarray:
        if schedule not in self.detok_latents:
            guidance, apg = SCHEDULES[schedule]
            self.detok_latents[schedule] = np.asarray(
                self.flextok.detokenize_latents(
                    self.golden["tokens"],
                    self.golden["detok_lengths"],
                    steps=STEPS,
                    guidance_scale=guidance,
                    apg=apg,
                    noise=self.nhwc("init_noise"),
                )
            )
        return self.detok_latents[schedule]


@pytest.fixture(
    scope="module",
    params=[(name, fmt) for name in GOLDEN_MODELS for fmt in FORMATS],
    ids=lambda param: f"{param[0]}-{param[1]}",
)
def case(request) -> Case:
    name, fmt = request.param
    flextok = FlexTok.from_pretrained(checkpoint_path(name, fmt))
    return Case(name=name, fmt=fmt, flextok=flextok, golden=load_golden(name))


# --- VAE -------------------------------------------------------------------------------


def test_vae_latents(case):
    latents = case.flextok.encode_latents(case.nhwc("images"))
    assert_close(latents, case.nhwc("vae_latents"), f"{case.label} vae_latents")


def test_vae_decoded(case):
    images = case.flextok.decode_latents(case.nhwc("vae_latents"))
    assert_close(images, case.nhwc("vae_decoded"), f"{case.label} vae_decoded")


@pytest.mark.parametrize("name", GOLDEN_MODELS)
def test_standalone_vae_latents(name):
    golden = load_golden(name)
    vae = load_vae(golden_path(name) / "vae").model
    latents = nnx.jit(lambda model, images: model.encode(images))(vae, nchw_to_nhwc(golden["images"]))
    assert_close(latents, nchw_to_nhwc(golden["vae_latents"]), f"{name} diffusers_vae vae_latents")


# --- Encoder, FSQ and tokens -----------------------------------------------------------


def test_enc_registers(case):
    registers = case.flextok.model.encode_registers(case.nhwc("vae_latents"))
    assert_close(registers, case.golden["enc_registers"], f"{case.label} enc_registers")


def test_quants(case):
    # Quantize the reference's registers so that this checks FSQ alone.
    quants = case.flextok.model.fsq.quantize(case.golden["enc_registers"])
    assert_close(quants, case.golden["quants"], f"{case.label} quants")


def test_tokens(case):
    tokens = case.flextok.tokenize(case.nhwc("images"))
    assert_tokens_equal(tokens, case.golden["tokens"], f"{case.label} tokens")


def test_fsq_probe_codes(case):
    fsq = FSQ(case.flextok.config.fsq.levels)
    ids = case.golden["fsq_probe_ids"]
    codes = np.asarray(fsq.ids_to_codes(ids))
    expected = case.golden["fsq_probe_codes"]
    assert codes.shape == expected.shape, f"{case.label} fsq_probe_codes: shape {codes.shape} != {expected.shape}"
    for i, probe in enumerate(ids[0]):
        assert np.array_equal(codes[0, i], expected[0, i]), (
            f"{case.label} fsq_probe_codes: id {int(probe)} decodes to {codes[0, i].tolist()}, "
            f"expected {expected[0, i].tolist()}"
        )


# --- Decoder ---------------------------------------------------------------------------


@pytest.mark.parametrize("unconditional", [False, True], ids=["cond", "uncond"])
def test_step_velocity(case, unconditional):
    key = "step_velocity_uncond" if unconditional else "step_velocity"
    velocity = case.flextok.velocity(
        case.nhwc("step_noise"),
        case.golden["step_t"],
        case.golden["tokens"],
        lengths=case.golden["step_keep_k"],
        unconditional=unconditional,
    )
    assert_close(velocity, case.nhwc(key), f"{case.label} {key}")


@pytest.mark.parametrize("schedule", list(SCHEDULES))
def test_detok_latents(case, schedule):
    key = f"detok_{schedule}_latents"
    assert_close(case.detokenize(schedule), case.nhwc(key), f"{case.label} {key}")


@pytest.mark.parametrize("schedule", list(SCHEDULES))
def test_detok_images(case, schedule):
    key = f"detok_{schedule}_images"
    images = case.flextok.decode_latents(case.detokenize(schedule))
    assert_close(images, case.nhwc(key), f"{case.label} {key}")


@pytest.mark.parametrize("schedule", list(SCHEDULES))
def test_detok_token_list(case, schedule):
    """Rows given as a list of 1-D arrays cut to their lengths match the padded array."""
    tokens = case.golden["tokens"]
    lengths = case.golden["detok_lengths"]
    rows = [tokens[i, : int(length)] for i, length in enumerate(lengths)]
    guidance, apg = SCHEDULES[schedule]
    latents = np.asarray(
        case.flextok.detokenize_latents(rows, steps=STEPS, guidance_scale=guidance, apg=apg, noise=case.nhwc("init_noise"))
    )
    label = f"{case.label} detok_{schedule}_latents from token list"
    assert_close(latents, case.nhwc(f"detok_{schedule}_latents"), label)
    max_diff = float(np.max(np.abs(latents - case.detokenize(schedule))))
    assert max_diff == 0.0, f"{label}: differs from the padded-array result by up to {max_diff:.2e}"


def test_callable_guidance(case):
    """A constant function of t runs the same classifier-free guidance as the float."""
    latents = case.flextok.detokenize_latents(
        case.golden["tokens"],
        case.golden["detok_lengths"],
        steps=STEPS,
        guidance_scale=lambda t: 3.0,
        apg=False,
        noise=case.nhwc("init_noise"),
    )
    assert_close(latents, case.nhwc("detok_steps4_cfg3_latents"), f"{case.label} detok_steps4_cfg3_latents from lambda t: 3.0")
