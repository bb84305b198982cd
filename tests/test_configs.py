"""The released sizes in configs/ match the recorded layouts of the released checkpoints."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from flax import nnx

from convert.converter import abstract_params
from flextok_jax.config import FlexTokConfig, VAEConfig, config_from_hydra, vae_config_from_shapes
from flextok_jax.model import FlexTokModel
from flextok_jax.vae import AutoencoderKL
from tests.conftest import LAYOUTS

CONFIG_DIR = Path(__file__).parent.parent / "configs"


def _layout_name(layout: Path) -> str:
    return layout.name.removesuffix(".layout.json")


@pytest.mark.parametrize("layout", LAYOUTS, ids=_layout_name)
def test_config_file_matches_layout(layout):
    data = json.loads(layout.read_text())
    shapes = {key: tuple(entry["shape"]) for key, entry in data["state_dict"].items()}
    derived = config_from_hydra(data["config"], vae=vae_config_from_shapes(shapes, "vae.vae.", VAEConfig()))
    stored = FlexTokConfig.from_json(CONFIG_DIR / f"{_layout_name(layout)}.json")
    assert stored == derived, f"configs/{_layout_name(layout)}.json differs from the layout's config"


@pytest.mark.parametrize("layout", LAYOUTS, ids=_layout_name)
def test_config_parameter_count(layout):
    data = json.loads(layout.read_text())
    config = FlexTokConfig.from_json(CONFIG_DIR / f"{_layout_name(layout)}.json")
    target = abstract_params(lambda: FlexTokModel(config, rngs=nnx.Rngs(0)))
    count = sum(math.prod(leaf.shape) for leaf in target.values())
    print(f"{_layout_name(layout)}: {count:,} parameters")
    assert count == data["parameters"], f"{count} parameters, layout records {data['parameters']}"


@pytest.mark.parametrize("channels", [4, 8, 16])
def test_vae_config_shapes(channels):
    config = VAEConfig(**json.loads((CONFIG_DIR / f"vae_c{channels}.json").read_text()))
    target = abstract_params(lambda: AutoencoderKL(config, rngs=nnx.Rngs(0)))
    assert target["quant_conv.kernel"].shape == (1, 1, 2 * channels, 2 * channels), "quant_conv shape"
    assert target["decoder.conv_in.kernel"].shape == (3, 3, channels, 512), "decoder.conv_in shape"


def test_vae_c16_matches_released_vae():
    data = json.loads(LAYOUTS[0].read_text())
    released = {key: shape["shape"] for key, shape in data["state_dict"].items() if key.startswith("vae.vae.")}
    config = VAEConfig(**json.loads((CONFIG_DIR / "vae_c16.json").read_text()))
    target = abstract_params(lambda: AutoencoderKL(config, rngs=nnx.Rngs(0)))
    count = sum(math.prod(leaf.shape) for leaf in target.values())
    expected = sum(math.prod(shape) for shape in released.values())
    assert count == expected, f"VAE has {count} parameters, the released one {expected}"
