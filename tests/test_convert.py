"""Converter tests against the real golden checkpoints and the released-size layouts.

Variants of the golden files (other dtypes, missing or extra tensors, edited configs,
damaged files) are written to tmp_path with numpy and safetensors, so no torch is needed.
"""

from __future__ import annotations

import functools
import json
import math
import shutil
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest
from flax import nnx
from safetensors import safe_open
from safetensors.numpy import load_file, save_file

from convert import CheckpointError, LoadedCheckpoint, load_flextok, load_vae, save_flextok_safetensors, save_vae_safetensors
from convert.converter import abstract_params, plan_conversion
from convert.layout import FLEXTOK_PREFIXES, flax_to_torch, shape_after
from flextok_jax.config import VAEConfig, config_from_hydra, parse_metadata_tree, vae_config_from_shapes
from flextok_jax.model import FlexTokModel
from tests.conftest import LAYOUTS, assert_same_arrays, golden_path

MISSING_KEY = "decoder.module_dict.dec_transformer.blocks.1.attn.wq.weight"
EXTRA_KEY = "decoder.module_dict.dec_transformer.blocks.9.attn.wq.weight"
REGISTERS_KEY = "encoder.module_dict.enc_register_module.registers"
NUMPY_DTYPES = {"float16": np.float16, "bfloat16": ml_dtypes.bfloat16}


# --- Helpers ---------------------------------------------------------------------------


def flat_params(module: nnx.Module) -> dict[str, np.ndarray]:
    """Return a module's parameters as `dotted path -> numpy array`."""
    flat = nnx.to_flat_state(nnx.state(module, nnx.Param))
    return {".".join(str(part) for part in path): np.asarray(var.get_value()) for path, var in flat}


def read_safetensors(path: Path) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """Read all tensors and the metadata of a safetensors file."""
    with safe_open(str(path), framework="numpy") as handle:
        metadata = handle.metadata() or {}
    return load_file(str(path)), metadata


def write_variant(
    out: Path,
    source: Path,
    *,
    drop: tuple[str, ...] = (),
    add: dict[str, np.ndarray] | None = None,
    metadata: dict[str, str] | None = None,
    cast=None,
) -> Path:
    """Write a copy of `source` with tensors dropped, added or cast, or new metadata."""
    tensors, original_metadata = read_safetensors(source)
    for key in drop:
        del tensors[key]
    tensors.update(add or {})
    if cast is not None:
        tensors = {key: value.astype(cast) for key, value in tensors.items()}
    save_file(tensors, str(out), metadata=original_metadata if metadata is None else metadata)
    return out


def hub_dir_with_config(out: Path, name: str, tree: dict) -> Path:
    """Create a hub directory with the golden weights of `name` and `tree` as config.json."""
    out.mkdir()
    shutil.copyfile(golden_path(name) / "model.safetensors", out / "model.safetensors")
    (out / "config.json").write_text(json.dumps(tree))
    return out


def golden_tree(name: str) -> dict:
    return json.loads((golden_path(name) / "config.json").read_text())


def load_error(source: Path, **kwargs) -> str:
    """Load `source`, expecting a CheckpointError, and return its message."""
    with pytest.raises(CheckpointError) as info:
        load_flextok(source, **kwargs)
    return str(info.value)


# --- Loaded golden models, shared by the tests of this file ----------------------------
# A load takes about 1 s on 2 CPU cores (measured), so each golden checkpoint is converted once.


@functools.lru_cache(maxsize=None)
def loaded_dir(name: str) -> LoadedCheckpoint:
    return load_flextok(golden_path(name))


@functools.lru_cache(maxsize=None)
def loaded_file(name: str) -> LoadedCheckpoint:
    return load_flextok(golden_path(name) / "model.safetensors")


@functools.lru_cache(maxsize=None)
def loaded_vae(name: str) -> LoadedCheckpoint:
    return load_vae(golden_path(name) / "vae")


# --- Released-size layouts -------------------------------------------------------------


@pytest.mark.parametrize("layout_path", LAYOUTS, ids=lambda path: path.name.split(".")[0])
def test_layout_maps_every_tensor(layout_path):
    layout = json.loads(layout_path.read_text())
    tree = layout["config"]
    shapes = {key: tuple(entry["shape"]) for key, entry in layout["state_dict"].items()}

    # The same derivation as load_flextok.
    vae = vae_config_from_shapes(shapes, "vae.vae.", VAEConfig(latent_channels=int(tree["vae"]["latent_channels"])))
    config = config_from_hydra(tree, vae=vae)
    target = abstract_params(lambda: FlexTokModel(config, rngs=nnx.Rngs(0)))

    plan = plan_conversion(shapes, target, FLEXTOK_PREFIXES)
    assert sorted(plan) == sorted(shapes), f"unplanned keys: {sorted(set(shapes) - set(plan))[:5]}"
    paths = [path for path, _ in plan.values()]
    assert len(set(paths)) == len(paths), "two source keys map to one Flax parameter"
    unfilled = sorted(set(target) - set(paths))
    assert not unfilled, f"Flax parameters left unfilled: {unfilled[:5]}"

    for key, (path, _) in plan.items():
        assert math.prod(shapes[key]) == math.prod(target[path].shape), (
            f"{key} {shapes[key]} -> {path} {target[path].shape}: sizes differ"
        )
        back, inverse = flax_to_torch(path, len(target[path].shape), FLEXTOK_PREFIXES)
        assert back == key, f"{key} -> {path} maps back to {back}"
        written = shape_after(inverse, tuple(target[path].shape), to_flax=False)
        assert written == shapes[key], f"{path} would be written back as {written}, expected {shapes[key]}"

    source_count = sum(math.prod(shape) for shape in shapes.values())
    target_count = sum(math.prod(value.shape) for value in target.values())
    assert source_count == layout["parameters"], f"state dict holds {source_count} values, layout says {layout['parameters']}"
    assert target_count == layout["parameters"], f"Flax model holds {target_count} values, layout says {layout['parameters']}"
    print(f"{layout_path.name}: {len(plan)} tensors, {target_count:,} parameters")


def test_layout_files_present():
    assert len(LAYOUTS) == 3, f"expected the d12-d12, d18-d18 and d18-d28 layouts, found {[p.name for p in LAYOUTS]}"


# --- Both checkpoint formats load ------------------------------------------------------


def test_load_dir_equals_file(golden_name):
    from_dir = loaded_dir(golden_name)
    from_file = loaded_file(golden_name)
    assert from_dir.config == from_file.config, f"{golden_name}: configs differ between config.json and metadata"
    assert_same_arrays(flat_params(from_file.model), flat_params(from_dir.model), f"{golden_name} file vs dir")
    print(f"{golden_name}: {len(flat_params(from_dir.model))} parameters loaded, dtypes {from_dir.source_dtypes}")


def test_load_vae_equals_submodule(golden_name):
    vae = loaded_vae(golden_name)
    flextok = loaded_dir(golden_name)
    assert vae.config == flextok.config.vae, f"{golden_name}: {vae.config} != {flextok.config.vae}"
    assert_same_arrays(flat_params(vae.model), flat_params(flextok.model.vae), f"{golden_name} load_vae vs model.vae")


def test_load_accepts_training_entries(golden_name):
    tree = golden_tree(golden_name)
    modules = tree["decoder"]["module_dict"]
    assert "dec_repa_unpacker" in modules, f"{golden_name}: fixture config has no dec_repa_unpacker"
    assert "dropout_prob" in modules["dec_latent_dropout"], f"{golden_name}: fixture config has no dropout_prob"
    assert loaded_dir(golden_name).model is not None


# --- Round trip back to the PyTorch layout ---------------------------------------------


def test_roundtrip_file(golden_name, tmp_path):
    loaded = loaded_file(golden_name)
    out = save_flextok_safetensors(loaded.model, loaded.source_config, tmp_path / "rt.safetensors")

    tensors, metadata = read_safetensors(out)
    original, original_metadata = read_safetensors(golden_path(golden_name) / "model.safetensors")
    assert_same_arrays(tensors, original, f"{golden_name} round trip")
    assert parse_metadata_tree(metadata) == parse_metadata_tree(original_metadata), f"{golden_name}: metadata tree differs"
    assert metadata == original_metadata, f"{golden_name}: metadata strings differ"
    print(f"{golden_name}: {len(tensors)} tensors written back bit for bit")


def test_roundtrip_dir(golden_name, tmp_path):
    loaded = loaded_dir(golden_name)
    out = save_flextok_safetensors(loaded.model, loaded.source_config, tmp_path / "hub")

    assert out == tmp_path / "hub" / "model.safetensors", f"weights written to {out}"
    tensors, metadata = read_safetensors(out)
    original, original_metadata = read_safetensors(golden_path(golden_name) / "model.safetensors")
    assert_same_arrays(tensors, original, f"{golden_name} round trip to a directory")
    assert parse_metadata_tree(metadata) == parse_metadata_tree(original_metadata), f"{golden_name}: metadata tree differs"
    written = json.loads((tmp_path / "hub" / "config.json").read_text())
    assert written == golden_tree(golden_name), f"{golden_name}: written config.json differs from the original"

    reloaded = load_flextok(tmp_path / "hub")
    assert reloaded.config == loaded.config, f"{golden_name}: config of the saved directory differs"


def test_roundtrip_vae(golden_name, tmp_path):
    loaded = loaded_vae(golden_name)
    out = save_vae_safetensors(loaded.model, loaded.source_config, tmp_path / "vae")

    source = golden_path(golden_name) / "vae"
    tensors, metadata = read_safetensors(out / "diffusion_pytorch_model.safetensors")
    original, original_metadata = read_safetensors(source / "diffusion_pytorch_model.safetensors")
    assert_same_arrays(tensors, original, f"{golden_name} VAE round trip")
    assert metadata == original_metadata, f"{golden_name}: VAE metadata {metadata} != {original_metadata}"
    written = json.loads((out / "config.json").read_text())
    expected = json.loads((source / "config.json").read_text())
    assert written == expected, f"{golden_name}: written VAE config.json differs from the original"


# --- Half-precision checkpoints --------------------------------------------------------


@pytest.fixture(scope="module", params=["float16", "bfloat16"])
def half_checkpoint(request, tmp_path_factory) -> tuple[str, Path, LoadedCheckpoint]:
    """Write tiny cast to half precision and load it as stored.

    Returns the dtype name, the file and the loaded checkpoint.
    """
    dtype = request.param
    path = tmp_path_factory.mktemp(dtype) / "model.safetensors"
    write_variant(path, golden_path("tiny") / "model.safetensors", cast=NUMPY_DTYPES[dtype])
    return dtype, path, load_flextok(path)


def test_half_keeps_source_dtype(half_checkpoint):
    dtype, _, loaded = half_checkpoint
    assert loaded.source_dtypes == (dtype,), f"source dtypes {loaded.source_dtypes}, expected ({dtype},)"

    reference = flat_params(loaded_file("tiny").model)
    expected = {key: value.astype(NUMPY_DTYPES[dtype]) for key, value in reference.items()}
    assert_same_arrays(flat_params(loaded.model), expected, f"{dtype} load")


def test_half_upcast_to_float32(half_checkpoint):
    dtype, path, _ = half_checkpoint
    loaded = load_flextok(path, dtype="float32")

    reference = flat_params(loaded_file("tiny").model)
    expected = {key: value.astype(NUMPY_DTYPES[dtype]).astype(np.float32) for key, value in reference.items()}
    assert_same_arrays(flat_params(loaded.model), expected, f"{dtype} load as float32")


def test_half_roundtrip(half_checkpoint, tmp_path):
    dtype, path, loaded = half_checkpoint
    out = save_flextok_safetensors(loaded.model, loaded.source_config, tmp_path / "rt.safetensors")

    tensors, metadata = read_safetensors(out)
    original, original_metadata = read_safetensors(path)
    assert_same_arrays(tensors, original, f"{dtype} round trip")
    assert parse_metadata_tree(metadata) == parse_metadata_tree(original_metadata), f"{dtype}: metadata tree differs"


def test_load_rejects_unknown_dtype():
    message = load_error(golden_path("tiny"), dtype="int8")
    assert "int8" in message, f"message does not name the dtype: {message}"


# --- Bad checkpoints -------------------------------------------------------------------


def test_error_is_value_error():
    assert issubclass(CheckpointError, ValueError), "CheckpointError must subclass ValueError"


def test_bad_missing_tensor(tmp_path):
    path = write_variant(tmp_path / "model.safetensors", golden_path("tiny") / "model.safetensors", drop=(MISSING_KEY,))
    message = load_error(path)
    assert "missing" in message, f"message does not say missing: {message}"
    assert MISSING_KEY in message, f"message does not name {MISSING_KEY}: {message}"


def test_bad_extra_tensor(tmp_path):
    extra = {EXTRA_KEY: np.zeros((96, 96), np.float32)}
    path = write_variant(tmp_path / "model.safetensors", golden_path("tiny") / "model.safetensors", add=extra)
    message = load_error(path)
    assert "unexpected" in message, f"message does not say unexpected: {message}"
    assert EXTRA_KEY in message, f"message does not name {EXTRA_KEY}: {message}"


def test_bad_shape(tmp_path):
    wrong = {REGISTERS_KEY: np.zeros((31, 64), np.float32)}
    path = write_variant(tmp_path / "model.safetensors", golden_path("tiny") / "model.safetensors", add=wrong)
    message = load_error(path)
    assert REGISTERS_KEY in message, f"message does not name {REGISTERS_KEY}: {message}"
    assert "[31, 64]" in message, f"message does not give the stored shape: {message}"
    assert "[32, 64]" in message, f"message does not give the expected shape: {message}"
    assert "missing" not in message, f"a mismatched tensor is also reported as missing: {message}"


def test_bad_tensor_dtype(tmp_path):
    integer = {REGISTERS_KEY: np.zeros((32, 64), np.int32)}
    path = write_variant(tmp_path / "model.safetensors", golden_path("tiny") / "model.safetensors", add=integer)
    message = load_error(path)
    assert "I32" in message, f"message does not name the dtype: {message}"


@pytest.mark.parametrize(
    ("where", "target"),
    [
        ("decoder.module_dict.dec_noise_channels_to_last.per_sample_op", "os.system"),
        ("decoder.module_dict.dec_transformer", "flextok.model.trunks.transformers.OtherTransformer"),
        ("vae", "builtins.eval"),
    ],
    ids=["os-system", "unknown-class", "builtins-eval"],
)
def test_bad_target_in_config_json(tmp_path, where, target):
    tree = golden_tree("tiny")
    node = tree
    for part in where.split("."):
        node = node[part]
    node["_target_"] = target

    message = load_error(hub_dir_with_config(tmp_path / "hub", "tiny", tree))
    assert repr(target) in message, f"message does not name {target!r}: {message}"
    assert where in message, f"message does not name the path {where}: {message}"


def test_bad_target_in_metadata(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    target = "__import__('os').system('touch PWNED')"
    tree = golden_tree("tiny")
    tree["encoder"]["module_dict"]["enc_transformer"]["_target_"] = target
    metadata = {key: repr(value) for key, value in tree.items()}
    path = write_variant(tmp_path / "model.safetensors", golden_path("tiny") / "model.safetensors", metadata=metadata)

    message = load_error(path)
    assert not (tmp_path / "PWNED").exists(), "loading ran the _target_ string"
    assert repr(target) in message, f"message does not name the target: {message}"
    assert "encoder.module_dict.enc_transformer" in message, f"message does not name the path: {message}"


@pytest.mark.parametrize(
    "entry",
    ["{'a': open('x')}", "__import__('os').system('touch PWNED')"],
    ids=["open-call", "import-call"],
)
def test_bad_metadata_not_literal(tmp_path, monkeypatch, entry):
    monkeypatch.chdir(tmp_path)
    tree = golden_tree("tiny")
    metadata = {key: repr(value) for key, value in tree.items()}
    metadata["encoder"] = entry
    path = write_variant(tmp_path / "model.safetensors", golden_path("tiny") / "model.safetensors", metadata=metadata)

    message = load_error(path)
    assert not (tmp_path / "PWNED").exists(), "loading evaluated the metadata"
    assert not (tmp_path / "x").exists(), "loading evaluated the metadata"
    assert "'encoder'" in message, f"message does not name the metadata entry: {message}"
    assert "not a Python literal" in message, f"message does not say why: {message}"


def test_bad_metadata_missing(tmp_path):
    path = write_variant(tmp_path / "model.safetensors", golden_path("tiny") / "model.safetensors", metadata={"format": "pt"})
    message = load_error(path)
    assert "'vae'" in message, f"message does not name the missing entries: {message}"


@pytest.mark.parametrize("damage", ["truncated", "empty", "png", "text"])
def test_bad_file(tmp_path, damage):
    original = (golden_path("tiny") / "model.safetensors").read_bytes()
    contents = {
        "truncated": original[: len(original) // 2],
        "empty": b"",
        "png": b"\x89PNG\r\n\x1a\n" + bytes(64),
        "text": b"this is a text file, not a checkpoint\n",
    }[damage]
    single = tmp_path / "model.safetensors"
    single.write_bytes(contents)
    hub = hub_dir_with_config(tmp_path / "hub", "tiny", golden_tree("tiny"))
    (hub / "model.safetensors").write_bytes(contents)

    for source in (single, hub):
        message = load_error(source)
        assert str(source) in message, f"message does not name {source}: {message}"
        assert "not a readable safetensors file" in message, f"message does not say why: {message}"


def test_bad_config_missing_field(tmp_path):
    tree = golden_tree("tiny")
    del tree["decoder"]["module_dict"]["dec_transformer"]["depth"]
    message = load_error(hub_dir_with_config(tmp_path / "hub", "tiny", tree))
    field = "decoder.module_dict.dec_transformer.depth"
    assert field in message, f"message does not name {field}: {message}"


def test_bad_dir_without_weights(tmp_path):
    hub = tmp_path / "hub"
    hub.mkdir()
    (hub / "config.json").write_text(json.dumps(golden_tree("tiny")))
    message = load_error(hub)
    assert str(hub) in message, f"message does not name {hub}: {message}"
    assert "model.safetensors" in message, f"message does not name the missing file: {message}"


@pytest.mark.parametrize("missing", ["no_such_dir", "no_such.safetensors"])
def test_bad_path_missing(tmp_path, missing):
    source = tmp_path / missing
    message = load_error(source)
    assert str(source) in message, f"message does not name {source}: {message}"
