"""Frozen model configs and the parser for the reference's hydra config tree.

The reference stores its architecture as a hydra tree of `_target_` entries (in
`config.json` or in the safetensors metadata). We never import or evaluate those
strings: each known `_target_` maps to a role here, and anything else is rejected
with the path where it sits.
"""

from __future__ import annotations

import ast
import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Mapping


class ConfigError(ValueError):
    """Invalid, incomplete or unsupported model configuration."""


@dataclass(frozen=True)
class VAEConfig:
    """diffusers AutoencoderKL hyperparameters (4 down and 4 up blocks in the release)."""

    in_channels: int = 3
    out_channels: int = 3
    latent_channels: int = 16
    block_out_channels: tuple[int, ...] = (128, 256, 512, 512)
    layers_per_block: int = 2
    norm_num_groups: int = 32
    scaling_factor: float = 1.0
    sample_posterior: bool = False
    use_quant_conv: bool = True
    use_post_quant_conv: bool = True
    mid_block_add_attention: bool = True

    def __post_init__(self) -> None:
        object.__setattr__(self, "block_out_channels", tuple(self.block_out_channels))
        if not self.block_out_channels:
            raise ConfigError("VAE block_out_channels is empty; expected one width per block")
        for width in self.block_out_channels:
            if width % self.norm_num_groups:
                raise ConfigError(
                    f"VAE block width {width} is not divisible by norm_num_groups="
                    f"{self.norm_num_groups}"
                )
        if self.layers_per_block < 1:
            raise ConfigError(f"VAE layers_per_block={self.layers_per_block} must be >= 1")

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.block_out_channels) - 1)


@dataclass(frozen=True)
class TransformerConfig:
    """One stack of pre-norm transformer blocks."""

    dim: int
    depth: int
    head_dim: int = 64
    mlp_ratio: float = 4.0
    gated_mlp: bool = True
    qk_norm: bool = True
    # 0: plain blocks (encoder). 1: adaLN-zero shared by all tokens. 2: separate
    # modulation for patch tokens and register tokens.
    adaln_expansion: int = 0

    def __post_init__(self) -> None:
        if self.dim % self.head_dim:
            raise ConfigError(f"transformer dim={self.dim} is not divisible by head_dim={self.head_dim}")
        if self.adaln_expansion not in (0, 1, 2):
            raise ConfigError(f"adaLN expansion {self.adaln_expansion} is not supported; use 1 or 2")

    @property
    def num_heads(self) -> int:
        return self.dim // self.head_dim

    @property
    def mlp_hidden(self) -> int:
        # The reference sizes the gated MLP to 2/3 of the plain one, truncating twice.
        hidden = int(self.dim * self.mlp_ratio)
        return int(2 * hidden / 3) if self.gated_mlp else hidden


@dataclass(frozen=True)
class EncoderConfig:
    latent_channels: int
    patch_size: int
    posemb_grid: tuple[int, int]
    num_registers: int
    code_dim: int
    transformer: TransformerConfig

    def __post_init__(self) -> None:
        object.__setattr__(self, "posemb_grid", tuple(self.posemb_grid))


@dataclass(frozen=True)
class DecoderConfig:
    latent_channels: int
    patch_size: int
    posemb_grid: tuple[int, int]
    num_registers: int
    code_dim: int
    null_cond: Literal["learned", "zero"]
    max_timestep: float
    transformer: TransformerConfig

    def __post_init__(self) -> None:
        object.__setattr__(self, "posemb_grid", tuple(self.posemb_grid))
        if self.null_cond not in ("learned", "zero"):
            raise ConfigError(f"null condition {self.null_cond!r} is not supported; use 'learned' or 'zero'")


@dataclass(frozen=True)
class FSQConfig:
    levels: tuple[int, ...] = (8, 8, 8, 5, 5, 5)

    def __post_init__(self) -> None:
        object.__setattr__(self, "levels", tuple(int(level) for level in self.levels))
        if not self.levels or any(level < 2 for level in self.levels):
            raise ConfigError(f"FSQ levels {self.levels} are invalid; each level must be >= 2")

    @property
    def codebook_size(self) -> int:
        size = 1
        for level in self.levels:
            size *= level
        return size


@dataclass(frozen=True)
class FlexTokConfig:
    vae: VAEConfig
    encoder: EncoderConfig
    fsq: FSQConfig
    decoder: DecoderConfig

    def __post_init__(self) -> None:
        if self.encoder.num_registers != self.decoder.num_registers:
            raise ConfigError(
                f"encoder has {self.encoder.num_registers} registers but decoder has "
                f"{self.decoder.num_registers}; they must match"
            )
        if self.encoder.code_dim != len(self.fsq.levels):
            raise ConfigError(
                f"encoder outputs {self.encoder.code_dim} values per register but FSQ has "
                f"{len(self.fsq.levels)} levels"
            )
        for part in (self.encoder, self.decoder):
            if part.latent_channels != self.vae.latent_channels:
                raise ConfigError(
                    f"VAE has {self.vae.latent_channels} latent channels but a transformer "
                    f"expects {part.latent_channels}"
                )

    @property
    def num_registers(self) -> int:
        return self.encoder.num_registers

    @property
    def image_size(self) -> int:
        """Largest square image side that the stored position tables cover, in pixels."""
        grid = min(self.encoder.posemb_grid)
        return grid * self.encoder.patch_size * self.vae.downsample_factor

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "FlexTokConfig":
        try:
            enc = dict(data["encoder"])
            dec = dict(data["decoder"])
            enc["transformer"] = TransformerConfig(**enc["transformer"])
            dec["transformer"] = TransformerConfig(**dec["transformer"])
            return cls(
                vae=VAEConfig(**data["vae"]),
                encoder=EncoderConfig(**enc),
                fsq=FSQConfig(**data["fsq"]),
                decoder=DecoderConfig(**dec),
            )
        except (KeyError, TypeError) as err:
            raise ConfigError(f"invalid flextok-jax config: {err}") from err

    @classmethod
    def from_json(cls, path: str | Path) -> "FlexTokConfig":
        return cls.from_dict(json.loads(Path(path).read_text()))


# --- The reference's hydra tree -------------------------------------------------------

_P = "flextok.model."
# Every `_target_` the released checkpoints use, with the role it plays here. Modules
# that only move data between dict keys, or exist only for training, are "ignored".
KNOWN_TARGETS: dict[str, str] = {
    "flextok.vae_wrapper.StableDiffusionVAE": "vae",
    _P + "utils.wrappers.SequentialModuleDictWrapper": "sequential",
    _P + "utils.dict_ops.PerSampleOp": "ignored",
    _P + "utils.dict_ops.channels_first_to_last": "ignored",
    _P + "utils.dict_ops.channels_last_to_first": "ignored",
    _P + "preprocessors.patching.PatchEmbedder": "patch_embedder",
    _P + "utils.posembs.PositionalEmbeddingAdder": "posemb",
    _P + "preprocessors.registers.Registers1D": "registers",
    _P + "preprocessors.flex_seq_packing.BlockWiseSequencePacker": "packer",
    _P + "trunks.transformers.FlexTransformer": "transformer",
    _P + "postprocessors.seq_unpacking.SequenceUnpacker": "ignored",
    _P + "postprocessors.heads.LinearHead": "linear_head",
    _P + "postprocessors.heads.ToPatchesLinearHead": "patches_head",
    _P + "preprocessors.linear.LinearLayer": "linear",
    _P + "preprocessors.token_dropout.MaskedNestedDropout": "nested_dropout",
    _P + "preprocessors.nullcond.LearnedNullCond": "null_cond",
    _P + "preprocessors.nullcond.ZeroNullCond": "null_cond",
    _P + "preprocessors.time_embedding.TimestepEmbedder": "time_embedder",
    "flextok.regularizers.quantize_fsq.FSQ": "fsq",
    "flextok.flow_matching.noise_modules.MinRFNoiseModule": "ignored",
    "flextok.flow_matching.pipelines.MinRFPipeline": "ignored",
}

HYDRA_TOP_LEVEL = ("vae", "encoder", "decoder", "regularizer", "flow_matching_noise_module", "pipeline")

# module_dict entries per stack: the ones we compute with, and the ones that only
# reshape, unpack or serve training (REPA features).
_ENCODER_MODULES = {
    "enc_patch_emb": "patch_embedder",
    "enc_posemb_module": "posemb",
    "enc_register_module": "registers",
    "enc_seq_packer": "packer",
    "enc_transformer": "transformer",
    "enc_to_latents": "linear_head",
}
_ENCODER_IGNORED = {"enc_channels_to_last", "enc_unpacker"}
_DECODER_MODULES = {
    "dec_from_latents": "linear",
    "dec_registers_posemb_module": "posemb",
    "dec_nested_dropout": "nested_dropout",
    "dec_latent_dropout": "null_cond",
    "dec_noise_patch_emb": "patch_embedder",
    "dec_patches_posemb_module": "posemb",
    "dec_seq_packer": "packer",
    "dec_time_embedder": "time_embedder",
    "dec_transformer": "transformer",
    "dec_to_patches": "patches_head",
}
_DECODER_IGNORED = {"dec_noise_channels_to_last", "dec_repa_unpacker", "dec_unpacker", "dec_channels_to_first"}


def parse_metadata_tree(metadata: Mapping[str, str]) -> dict[str, Any]:
    """Rebuild the hydra tree from safetensors metadata.

    Each top-level key contains the Python `repr` of a dict. `ast.literal_eval` accepts
    only literals, so a crafted entry cannot run code.
    """
    missing = [key for key in HYDRA_TOP_LEVEL[:4] if key not in metadata]
    if missing:
        raise ConfigError(
            f"safetensors metadata has no config entries {missing}; pass a checkpoint "
            "saved by FlexTok, or a hub directory with config.json"
        )
    tree: dict[str, Any] = {}
    for key in HYDRA_TOP_LEVEL:
        if key not in metadata:
            continue
        try:
            value = ast.literal_eval(metadata[key])
        except (ValueError, SyntaxError) as err:
            raise ConfigError(f"safetensors metadata entry {key!r} is not a Python literal: {err}") from err
        if not isinstance(value, dict):
            raise ConfigError(f"safetensors metadata entry {key!r} is {type(value).__name__}, expected a dict")
        tree[key] = value
    return tree


def check_targets(tree: Any, path: str = "") -> None:
    """Raise on any `_target_` in the tree that is not in KNOWN_TARGETS."""
    if isinstance(tree, Mapping):
        target = tree.get("_target_")
        if target is not None and target not in KNOWN_TARGETS:
            where = path or "<root>"
            raise ConfigError(
                f"unknown _target_ {target!r} at {where}; flextok-jax only builds the modules "
                "of the released FlexTok checkpoints"
            )
        for key, value in tree.items():
            check_targets(value, f"{path}.{key}" if path else str(key))
    elif isinstance(tree, (list, tuple)):
        for index, value in enumerate(tree):
            check_targets(value, f"{path}[{index}]")


def _require(node: Mapping[str, Any], key: str, path: str) -> Any:
    if key not in node:
        raise ConfigError(f"config field {path}.{key} is missing")
    return node[key]


def _role(node: Any, path: str) -> str:
    if not isinstance(node, Mapping) or "_target_" not in node:
        raise ConfigError(f"config entry {path} has no _target_")
    return KNOWN_TARGETS[node["_target_"]]


def _module_dict(tree: Mapping[str, Any], name: str, used: dict[str, str], ignored: set[str]) -> dict[str, Any]:
    stack = _require(tree, name, "<root>")
    if _role(stack, name) != "sequential":
        raise ConfigError(f"config entry {name} must be a SequentialModuleDictWrapper, got {stack['_target_']!r}")
    modules = _require(stack, "module_dict", name)
    for key, node in modules.items():
        path = f"{name}.module_dict.{key}"
        if key in used:
            role = _role(node, path)
            if role != used[key]:
                raise ConfigError(f"config entry {path} has _target_ {node['_target_']!r}, expected a {used[key]} module")
        elif key not in ignored:
            raise ConfigError(f"config entry {path} is not a module flextok-jax implements; remove it or convert a released checkpoint")
    for key in used:
        if key not in modules:
            raise ConfigError(f"config entry {name}.module_dict.{key} is missing")
    return dict(modules)


def _transformer(node: Mapping[str, Any], path: str, adaln: bool) -> TransformerConfig:
    expansion = 0
    if adaln:
        if node.get("adaLN_emb_read_key") is None:
            raise ConfigError(f"config entry {path} has no adaLN_emb_read_key; the flow decoder needs adaLN blocks")
        expansion = int(node.get("adaLN_expansion", 1))
    elif node.get("adaLN_emb_read_key") is not None:
        raise ConfigError(f"config entry {path} uses adaLN, which the encoder does not support")
    return TransformerConfig(
        dim=int(_require(node, "dim", path)),
        depth=int(_require(node, "depth", path)),
        head_dim=int(node.get("head_dim", 64)),
        mlp_ratio=float(node.get("mlp_ratio", 4.0)),
        gated_mlp=bool(node.get("gated_mlp", False)),
        qk_norm=bool(node.get("qk_norm", True)),
        adaln_expansion=expansion,
    )


def _reject_mup(node: Mapping[str, Any], path: str) -> None:
    if node.get("use_mup_readout"):
        raise ConfigError(f"config entry {path} sets use_mup_readout, which flextok-jax does not implement")


def _patch_size(node: Mapping[str, Any], path: str) -> int:
    sizes = list(_require(node, "patch_sizes", path))
    if len(sizes) != 2 or sizes[0] != sizes[1]:
        raise ConfigError(f"{path}.patch_sizes={sizes} is not supported; expected two equal sizes")
    return int(sizes[0])


def config_from_hydra(tree: Mapping[str, Any], vae: VAEConfig | None = None) -> FlexTokConfig:
    """Build a FlexTokConfig from the reference's hydra tree.

    `vae` gives the AutoencoderKL shape when it is known from elsewhere, such as a
    diffusers config or the checkpoint's weight shapes. Without it, the released
    defaults are used with the tree's latent channels and scaling factor.
    """
    if not isinstance(tree, Mapping):
        raise ConfigError(f"config tree is {type(tree).__name__}, expected a dict")
    check_targets(tree)

    vae_node = _require(tree, "vae", "<root>")
    if _role(vae_node, "vae") != "vae":
        raise ConfigError(f"config entry vae has _target_ {vae_node['_target_']!r}, expected StableDiffusionVAE")
    latent_channels = int(vae_node.get("latent_channels", 16))
    scaling = vae_node.get("scaling_factor")
    base = vae or VAEConfig(latent_channels=latent_channels)
    if base.latent_channels != latent_channels:
        raise ConfigError(f"vae.latent_channels={latent_channels} but the VAE weights have {base.latent_channels} channels")
    # Reference: a missing or zero scaling factor falls back to the AutoencoderKL's own.
    vae_cfg = dataclasses.replace(
        base,
        scaling_factor=float(scaling) if scaling else base.scaling_factor,
        sample_posterior=bool(vae_node.get("sample_posterior", True)),
    )

    fsq_node = _require(tree, "regularizer", "<root>")
    if _role(fsq_node, "regularizer") != "fsq":
        raise ConfigError(f"config entry regularizer has _target_ {fsq_node['_target_']!r}, expected FSQ")
    fsq = FSQConfig(levels=tuple(_require(fsq_node, "levels", "regularizer")))

    enc = _module_dict(tree, "encoder", _ENCODER_MODULES, _ENCODER_IGNORED)
    patch = enc["enc_patch_emb"]
    posemb = enc["enc_posemb_module"]
    registers = enc["enc_register_module"]
    packer = enc["enc_seq_packer"]
    head = enc["enc_to_latents"]
    p = "encoder.module_dict."
    if posemb.get("posemb_type") != "sincos":
        raise ConfigError(f"{p}enc_posemb_module.posemb_type={posemb.get('posemb_type')!r} is not supported; expected 'sincos'")
    if packer.get("mask_mode") != "causal_last":
        raise ConfigError(f"{p}enc_seq_packer.mask_mode={packer.get('mask_mode')!r} is not supported; expected 'causal_last'")
    if registers.get("ordering_mode", "nested") != "nested":
        raise ConfigError(f"{p}enc_register_module.ordering_mode={registers.get('ordering_mode')!r} is not supported")
    _reject_mup(head, p + "enc_to_latents")
    encoder = EncoderConfig(
        latent_channels=int(_require(patch, "channels_in", p + "enc_patch_emb")),
        patch_size=_patch_size(patch, p + "enc_patch_emb"),
        posemb_grid=tuple(_require(posemb, "max_sizes", p + "enc_posemb_module")),
        num_registers=int(_require(registers, "n_max", p + "enc_register_module")),
        code_dim=int(_require(head, "dim_out", p + "enc_to_latents")),
        transformer=_transformer(enc["enc_transformer"], p + "enc_transformer", adaln=False),
    )

    dec = _module_dict(tree, "decoder", _DECODER_MODULES, _DECODER_IGNORED)
    p = "decoder.module_dict."
    patch = dec["dec_noise_patch_emb"]
    reg_posemb = dec["dec_registers_posemb_module"]
    posemb = dec["dec_patches_posemb_module"]
    packer = dec["dec_seq_packer"]
    head = dec["dec_to_patches"]
    if posemb.get("posemb_type") != "sincos":
        raise ConfigError(f"{p}dec_patches_posemb_module.posemb_type={posemb.get('posemb_type')!r} is not supported; expected 'sincos'")
    if reg_posemb.get("posemb_type") != "learnable_sum":
        raise ConfigError(f"{p}dec_registers_posemb_module.posemb_type={reg_posemb.get('posemb_type')!r} is not supported; expected 'learnable_sum'")
    if packer.get("mask_mode") != "full":
        raise ConfigError(f"{p}dec_seq_packer.mask_mode={packer.get('mask_mode')!r} is not supported; expected 'full'")
    _reject_mup(head, p + "dec_to_patches")
    transformer = _transformer(dec["dec_transformer"], p + "dec_transformer", adaln=True)
    if (transformer.adaln_expansion == 2) != bool(packer.get("per_subseq_embs", False)):
        raise ConfigError(
            f"{p}dec_transformer.adaLN_expansion={transformer.adaln_expansion} does not match "
            f"{p}dec_seq_packer.per_subseq_embs={packer.get('per_subseq_embs', False)}"
        )
    null_target = dec["dec_latent_dropout"]["_target_"]
    reg_sizes = list(_require(reg_posemb, "max_sizes", p + "dec_registers_posemb_module"))
    decoder = DecoderConfig(
        latent_channels=int(_require(patch, "channels_in", p + "dec_noise_patch_emb")),
        patch_size=_patch_size(patch, p + "dec_noise_patch_emb"),
        posemb_grid=tuple(_require(posemb, "max_sizes", p + "dec_patches_posemb_module")),
        num_registers=int(reg_sizes[0]),
        code_dim=int(_require(dec["dec_from_latents"], "dim_in", p + "dec_from_latents")),
        null_cond="learned" if null_target.endswith("LearnedNullCond") else "zero",
        max_timestep=float(dec["dec_time_embedder"].get("max_timestep", 1.0)),
        transformer=transformer,
    )
    if int(_require(head, "channels_out", p + "dec_to_patches")) != decoder.latent_channels:
        raise ConfigError(f"{p}dec_to_patches.channels_out does not match the decoder's latent channels")

    return FlexTokConfig(vae=vae_cfg, encoder=encoder, fsq=fsq, decoder=decoder)


def vae_config_from_diffusers(data: Mapping[str, Any]) -> VAEConfig:
    """Read the AutoencoderKL fields that change the computation from a diffusers config."""
    if data.get("_class_name", "AutoencoderKL") != "AutoencoderKL":
        raise ConfigError(f"VAE config has _class_name {data.get('_class_name')!r}, expected 'AutoencoderKL'")
    for key in ("down_block_types", "up_block_types"):
        kinds = set(data.get(key, []))
        expected = {"DownEncoderBlock2D"} if key.startswith("down") else {"UpDecoderBlock2D"}
        if kinds - expected:
            raise ConfigError(f"VAE {key}={sorted(kinds)} is not supported; expected only {expected.pop()}")
    if data.get("act_fn", "silu") != "silu":
        raise ConfigError(f"VAE act_fn={data.get('act_fn')!r} is not supported; expected 'silu'")
    for key in ("shift_factor", "latents_mean", "latents_std"):
        if data.get(key) is not None:
            raise ConfigError(f"VAE config sets {key}, which flextok-jax does not apply")
    try:
        return VAEConfig(
            in_channels=int(data.get("in_channels", 3)),
            out_channels=int(data.get("out_channels", 3)),
            latent_channels=int(data["latent_channels"]),
            block_out_channels=tuple(int(c) for c in data["block_out_channels"]),
            layers_per_block=int(data.get("layers_per_block", 2)),
            norm_num_groups=int(data.get("norm_num_groups", 32)),
            scaling_factor=float(data.get("scaling_factor", 1.0)),
            use_quant_conv=bool(data.get("use_quant_conv", True)),
            use_post_quant_conv=bool(data.get("use_post_quant_conv", True)),
            mid_block_add_attention=bool(data.get("mid_block_add_attention", True)),
        )
    except KeyError as err:
        raise ConfigError(f"VAE config field {err.args[0]} is missing") from err


def vae_config_from_shapes(shapes: Mapping[str, tuple[int, ...]], prefix: str, base: VAEConfig) -> VAEConfig:
    """Derive block widths and depth of an AutoencoderKL from its state-dict shapes.

    The FlexTok config does not record the VAE architecture (the reference builds it
    from a fixed base config), so a checkpoint's own tensors are the better source.
    `norm_num_groups` cannot be read from shapes and stays at `base`'s value.
    """
    widths = []
    while f"{prefix}encoder.down_blocks.{len(widths)}.resnets.0.conv2.weight" in shapes:
        widths.append(shapes[f"{prefix}encoder.down_blocks.{len(widths)}.resnets.0.conv2.weight"][0])
    if not widths:
        return base
    layers = 0
    while f"{prefix}encoder.down_blocks.0.resnets.{layers}.conv1.weight" in shapes:
        layers += 1
    conv_in = shapes.get(f"{prefix}encoder.conv_in.weight")
    conv_out = shapes.get(f"{prefix}decoder.conv_out.weight")
    post = shapes.get(f"{prefix}decoder.conv_in.weight")
    return dataclasses.replace(
        base,
        block_out_channels=tuple(int(w) for w in widths),
        layers_per_block=layers,
        in_channels=int(conv_in[1]) if conv_in else base.in_channels,
        out_channels=int(conv_out[0]) if conv_out else base.out_channels,
        latent_channels=int(post[1]) if post else base.latent_channels,
        use_quant_conv=f"{prefix}quant_conv.weight" in shapes,
        use_post_quant_conv=f"{prefix}post_quant_conv.weight" in shapes,
        mid_block_add_attention=f"{prefix}encoder.mid_block.attentions.0.to_q.weight" in shapes,
    )
