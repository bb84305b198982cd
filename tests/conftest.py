"""Shared fixtures: golden checkpoints, a tiny config factory and the parity metric."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import jax
import numpy as np
import pytest

from flextok_jax.config import FlexTokConfig, config_from_hydra, vae_config_from_diffusers

# Parity with the float32 PyTorch reference needs full-precision matmuls on every backend.
jax.config.update("jax_default_matmul_precision", "highest")

GOLDEN_DIR = Path(__file__).parent / "fixtures" / "golden"
GOLDEN_MODELS = ("tiny", "tiny_alt")
LAYOUTS = sorted((GOLDEN_DIR / "layouts").glob("*.layout.json"))
PARITY_RTOL = 1e-4  # relative L2 error allowed on every golden float array


def rel_error(actual, expected) -> float:
    """||actual - expected|| / ||expected||, in float64."""
    actual = np.asarray(actual, np.float64)
    expected = np.asarray(expected, np.float64)
    return float(np.linalg.norm(actual - expected) / np.linalg.norm(expected))


def assert_same_arrays(actual: dict[str, np.ndarray], expected: dict[str, np.ndarray], label: str) -> None:
    """Assert equal key sets, and equal dtype, shape and bytes for every array."""
    assert sorted(actual) == sorted(expected), (
        f"{label}: keys differ; only in actual {sorted(set(actual) - set(expected))[:5]}, "
        f"only in expected {sorted(set(expected) - set(actual))[:5]}"
    )
    for key, want in expected.items():
        got = actual[key]
        assert got.dtype == want.dtype, f"{label}: {key} has dtype {got.dtype}, expected {want.dtype}"
        assert got.shape == want.shape, f"{label}: {key} has shape {got.shape}, expected {want.shape}"
        assert got.tobytes() == want.tobytes(), f"{label}: {key} differs in value"


def nchw_to_nhwc(array: np.ndarray) -> np.ndarray:
    """The reference stores images and latents NCHW; the package works NHWC."""
    return np.ascontiguousarray(np.asarray(array).transpose(0, 2, 3, 1))


def golden_path(name: str) -> Path:
    return GOLDEN_DIR / name


def load_golden(name: str) -> dict[str, np.ndarray]:
    with np.load(GOLDEN_DIR / name / "golden.npz") as data:
        return {key: data[key] for key in data.files}


def tiny_config(**overrides) -> FlexTokConfig:
    """Build the `tiny` golden model's FlexTokConfig, with top-level fields replaced."""
    tree = json.loads((GOLDEN_DIR / "tiny" / "config.json").read_text())
    vae = vae_config_from_diffusers(json.loads((GOLDEN_DIR / "tiny" / "vae" / "config.json").read_text()))
    config = config_from_hydra(tree, vae=vae)
    return dataclasses.replace(config, **overrides) if overrides else config


@pytest.fixture(scope="session", params=GOLDEN_MODELS)
def golden_name(request) -> str:
    return request.param
