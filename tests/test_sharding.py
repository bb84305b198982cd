"""The same results on 1 and 8 (host) devices, with one compile for mixed kept lengths."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import golden_path, rel_error

SCRIPT = Path(__file__).parent / "scripts" / "run_devices.py"


def _run(devices: int, out: Path) -> dict:
    env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}", JAX_PLATFORMS="cpu")
    result = subprocess.run(
        [sys.executable, str(SCRIPT), str(golden_path("tiny")), str(golden_path("tiny") / "golden.npz"), str(out)],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, f"{devices}-device run failed:\n{result.stderr[-3000:]}"
    with np.load(out) as data:
        return {key: data[key] for key in data.files}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("devices")
    return _run(1, tmp / "single.npz"), _run(8, tmp / "sharded.npz")


def test_device_counts(runs):
    single, sharded = runs
    assert int(single["devices"]) == 1, f"single run saw {single['devices']} devices"
    assert int(sharded["devices"]) == 8, f"sharded run saw {sharded['devices']} devices"


def test_batch_sharded_over_devices(runs):
    _, sharded = runs
    assert "data" in str(sharded["latents_sharding"]), f"output sharding is {sharded['latents_sharding']}"


def test_tokens_match_across_devices(runs):
    single, sharded = runs
    assert np.array_equal(single["tokens"], sharded["tokens"]), "tokens differ between 1 and 8 devices"


@pytest.mark.parametrize("key", ["latents", "other", "images"])
def test_outputs_match_across_devices(runs, key):
    single, sharded = runs
    err = rel_error(sharded[key], single[key])
    print(f"{key}: 1 vs 8 devices rel_err={err:.2e}")
    assert err <= 1e-5, f"{key} differ between 1 and 8 devices: rel_err={err:.2e}"


def test_one_compile_for_mixed_lengths(runs):
    for run in runs:
        traces = int(run["sample_traces"])
        assert traces == 1, f"sampler compiled {traces} times for two batches of mixed lengths on {int(run['devices'])} devices"
