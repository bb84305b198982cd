"""Hub repo ids resolve through huggingface_hub's cache, offline, with revisions."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from flextok_jax import FlexTok
from tests.conftest import golden_path, load_golden, nchw_to_nhwc

REPO_ID = "EPFL-VILAB/flextok_test_tiny"
MAIN_COMMIT = "a" * 40
OTHER_COMMIT = "b" * 40


def _add_snapshot(cache: Path, commit: str, source: Path) -> None:
    """Lay out a snapshot as huggingface_hub stores it: models--owner--name/snapshots/<commit>/."""
    snapshot = cache / ("models--" + REPO_ID.replace("/", "--")) / "snapshots" / commit
    snapshot.mkdir(parents=True)
    for name in ("config.json", "model.safetensors"):
        shutil.copy(source / name, snapshot / name)


@pytest.fixture(scope="module")
def hub_cache(tmp_path_factory) -> Path:
    cache = tmp_path_factory.mktemp("hub")
    _add_snapshot(cache, MAIN_COMMIT, golden_path("tiny"))
    _add_snapshot(cache, OTHER_COMMIT, golden_path("tiny_alt"))
    refs = cache / ("models--" + REPO_ID.replace("/", "--")) / "refs"
    refs.mkdir()
    (refs / "main").write_text(MAIN_COMMIT)
    return cache


def test_repo_id_from_cache(hub_cache):
    model = FlexTok.from_pretrained(REPO_ID, cache_dir=hub_cache, local_files_only=True)
    golden = load_golden("tiny")
    tokens = np.asarray(model.tokenize(nchw_to_nhwc(golden["images"])))
    assert np.array_equal(tokens, golden["tokens"]), "tokens from the cached hub snapshot differ from golden"


def test_revision_selects_snapshot(hub_cache):
    model = FlexTok.from_pretrained(REPO_ID, revision=OTHER_COMMIT, cache_dir=hub_cache, local_files_only=True)
    assert model.num_registers == 16, f"revision {OTHER_COMMIT[:7]} loaded a model with {model.num_registers} registers"


def test_missing_repo_offline(hub_cache):
    with pytest.raises(OSError) as err:
        FlexTok.from_pretrained("EPFL-VILAB/not_cached", cache_dir=hub_cache, local_files_only=True)
    assert "EPFL-VILAB/not_cached" in str(err.value), f"message does not name the repo: {err.value}"


def test_not_a_path_or_repo_id():
    with pytest.raises(FileNotFoundError) as err:
        FlexTok.from_pretrained("no/such/local/dir")
    assert "no/such/local/dir" in str(err.value), f"message does not name the path: {err.value}"


def test_cli_honours_hf_hub_offline(hub_cache, tmp_path):
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_HUB_CACHE=str(hub_cache), JAX_PLATFORMS="cpu")
    photo = Path(__file__).parent / "fixtures" / "photos" / "astronaut.jpg"
    result = subprocess.run(
        [sys.executable, "-m", "flextok_jax.cli", "tokenize", str(photo), "--model", REPO_ID, "--out", str(tmp_path / "t.npz")],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, f"offline tokenize from the hub cache failed: {result.stderr[-2000:]}"
    with np.load(tmp_path / "t.npz") as data:
        assert data["tokens"].shape == (1, 32), f"token shape {data['tokens'].shape}"
