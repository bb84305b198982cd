"""The public FlexTok API: tokenize images into ordered token ids and decode any prefix.

Every call checks its inputs on the host, pads the batch to a bucket size that the
devices divide, shards it along the `data` mesh axis, runs one jitted function with
replicated parameters, and drops the padding.

Axis legend: B batch, H x W pixels, h x w latent grid (H/8 x W/8), C latent
channels, R registers (token slots), L code dimension.
"""

from __future__ import annotations

import collections
import logging
from pathlib import Path
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from flextok_jax.checkpoint import is_converted_dir, load_converted, save_converted
from flextok_jax.config import FlexTokConfig
from flextok_jax.model import FlexTokModel
from flextok_jax.sampler import SamplerOptions, guidance_schedule, sample

logger = logging.getLogger("flextok_jax")

DEFAULT_SEED = 0
HUB_FILES = ("config.json", "model.safetensors")
_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def bucket_size(batch: int, num_devices: int) -> int:
    """Padded batch size: the next power of two >= batch, rounded up to a multiple of the devices.

    Buckets bound the number of compiled shapes to about log2 of the largest batch.
    """
    size = 1
    while size < batch:
        size *= 2
    return -(-size // num_devices) * num_devices


class FlexTok:
    """A loaded FlexTok model. Build it with `FlexTok.from_pretrained`."""

    def __init__(
        self,
        model: FlexTokModel,
        *,
        hydra_tree: dict[str, Any] | None = None,
        devices: Sequence[jax.Device] | None = None,
    ):
        self.config: FlexTokConfig = model.cfg
        self.hydra_tree = hydra_tree
        self._fsq = model.fsq
        devices = list(devices) if devices is not None else jax.devices()
        self.mesh = Mesh(np.asarray(devices), ("data",))
        self._batch_sharding = NamedSharding(self.mesh, PartitionSpec("data"))
        replicated = NamedSharding(self.mesh, PartitionSpec())
        self._graphdef, state = nnx.split(model)
        self._state = jax.device_put(state, replicated)
        self._compiled: dict[Any, Callable] = {}
        # Number of times each jitted function was traced; each trace is one compilation.
        self.trace_counts: collections.Counter[str] = collections.Counter()

    # --- Loading ---------------------------------------------------------------------

    @classmethod
    def from_pretrained(
        cls,
        name_or_path: str | Path,
        *,
        revision: str | None = None,
        cache_dir: str | Path | None = None,
        local_files_only: bool = False,
        dtype: str = "float32",
        devices: Sequence[jax.Device] | None = None,
    ) -> "FlexTok":
        """Load a model from a hub repo id, a hub-style directory, a .safetensors file,
        or a directory written by `FlexTok.save`.

        `dtype` is the compute dtype, "float32" or "bfloat16"; parameters stay in the
        checkpoint's dtype. Hub downloads honour `revision`, `cache_dir`,
        `local_files_only` and the HF_HUB_OFFLINE environment variable.
        """
        from convert import load_flextok  # deferred: convert imports this package

        if dtype not in _DTYPES:
            raise ValueError(f"dtype {dtype!r} is not supported; use 'float32' or 'bfloat16'")
        compute_dtype = None if dtype == "float32" else _DTYPES[dtype]

        path = Path(name_or_path).expanduser()
        if is_converted_dir(path):
            model, tree = load_converted(path, compute_dtype=compute_dtype)
            return cls(model, hydra_tree=tree, devices=devices)
        if not path.exists():
            path = _download(str(name_or_path), revision=revision, cache_dir=cache_dir, local_files_only=local_files_only)
        loaded = load_flextok(path, compute_dtype=compute_dtype)
        return cls(loaded.model, hydra_tree=loaded.source_config, devices=devices)

    def save(self, out_dir: str | Path, *, overwrite: bool = False) -> Path:
        """Write the model as an orbax checkpoint plus config, loadable by `from_pretrained`.

        An existing `out_dir` must be empty, or a converted model with `overwrite` set.
        """
        return save_converted(self.model, self.hydra_tree, out_dir, overwrite=overwrite)

    @property
    def model(self) -> FlexTokModel:
        return nnx.merge(self._graphdef, self._state)

    @property
    def num_registers(self) -> int:
        return self.config.num_registers

    @property
    def codebook_size(self) -> int:
        return self._fsq.codebook_size

    @property
    def image_size(self) -> int:
        return self.config.image_size

    @property
    def num_devices(self) -> int:
        return self.mesh.devices.size

    # --- Public calls ----------------------------------------------------------------

    def tokenize(self, images: Any, *, rng: jax.Array | None = None) -> jax.Array:
        """Images [B, H, W, 3] in [-1, 1] -> int32 token ids [B, R].

        `rng` is needed only for VAEs that sample their posterior.
        """
        images = self._check_images(images)
        return self._run("tokenize", images, self._image_keys(rng, images.shape[0]))

    def encode_latents(self, images: Any, *, rng: jax.Array | None = None) -> jax.Array:
        """Images [B, H, W, 3] in [-1, 1] -> scaled VAE latents [B, H/8, W/8, C]."""
        images = self._check_images(images)
        return self._run("encode", images, self._image_keys(rng, images.shape[0]))

    def decode_latents(self, latents: Any) -> jax.Array:
        """Scaled VAE latents [B, h, w, C] -> images [B, 8h, 8w, 3], roughly in [-1, 1]."""
        latents = self._check_latents(latents, "latents")
        return self._run("decode", latents)

    def detokenize_latents(
        self,
        tokens: Any,
        lengths: Any = None,
        steps: int = 20,
        guidance_scale: float | Callable[[float], float] = 7.5,
        apg: bool = True,
        rng: jax.Array | None = None,
        noise: Any = None,
        latent_size: tuple[int, int] | None = None,
    ) -> jax.Array:
        """Token ids -> VAE latents [B, h, w, C] by Euler sampling of the flow decoder.

        tokens: int array [B, R'] with R' <= R (with `lengths` [B], entries past a row's
        length are ignored), or a list of 1-D id arrays of different lengths.
        guidance_scale: a float or a function of t in (0, 1]; 1 runs no unconditional
        pass. apg: adaptive projected guidance instead of classifier-free guidance.
        noise: starting noise [B, h, w, C]; otherwise drawn from `rng`, a PRNG key or an
        integer seed (default PRNGKey(0)). latent_size: (h, w) when no noise is given; default the model's.
        """
        return self._sample("sample", tokens, lengths, steps, guidance_scale, apg, rng, noise, latent_size)

    def detokenize(
        self,
        tokens: Any,
        lengths: Any = None,
        steps: int = 20,
        guidance_scale: float | Callable[[float], float] = 7.5,
        apg: bool = True,
        rng: jax.Array | None = None,
        noise: Any = None,
        latent_size: tuple[int, int] | None = None,
    ) -> jax.Array:
        """Token ids -> images [B, H, W, 3]; the arguments are those of `detokenize_latents`.

        Sampling and VAE decoding run in one jitted call, so latents never leave the devices.
        """
        return self._sample("detokenize", tokens, lengths, steps, guidance_scale, apg, rng, noise, latent_size)

    def _sample(self, kind, tokens, lengths, steps, guidance_scale, apg, rng, noise, latent_size) -> jax.Array:
        codes, keep = self._check_tokens(tokens, lengths)
        if not isinstance(steps, (int, np.integer)) or isinstance(steps, bool) or steps < 1:
            raise ValueError(f"steps={steps!r} is invalid; pass a positive integer number of Euler steps")
        batch = codes.shape[0]
        if noise is None:
            h, w = latent_size or self._default_latent_size()
            noise = jax.random.normal(_as_key(rng), (batch, h, w, self.config.vae.latent_channels), jnp.float32)
        noise = self._check_latents(noise, "noise")
        if noise.shape[0] != batch:
            raise ValueError(f"noise has batch size {noise.shape[0]} but tokens have {batch}; pass one noise map per token row")
        scales, guided = guidance_schedule(guidance_scale, int(steps))
        options = SamplerOptions(steps=int(steps), guided=guided, apg=bool(apg))
        return self._run((kind, options), codes, keep, noise, replicated=(np.asarray(scales),))

    def velocity(self, noised_latents: Any, t: Any, tokens: Any, lengths: Any = None, unconditional: Any = None) -> jax.Array:
        """Run one decoder call: the velocity [B, h, w, C] for noised latents at times t [B] in [0, 1]."""
        codes, keep = self._check_tokens(tokens, lengths)
        noised = self._check_latents(noised_latents, "noised_latents")
        batch = codes.shape[0]
        t = np.broadcast_to(np.asarray(t, np.float32), (batch,)).copy()
        if not np.all(np.isfinite(t)) or np.any(t < 0) or np.any(t > self.config.decoder.max_timestep):
            raise ValueError(f"t={t.tolist()} is outside [0, {self.config.decoder.max_timestep}]")
        flags = np.zeros((batch,), bool) if unconditional is None else np.broadcast_to(np.asarray(unconditional, bool), (batch,)).copy()
        if noised.shape[0] != batch:
            raise ValueError(f"noised_latents has batch size {noised.shape[0]} but tokens have {batch}")
        return self._run("velocity", noised, t, codes, keep, flags)

    # --- Input checks ----------------------------------------------------------------

    def _check_images(self, images: Any) -> np.ndarray:
        array = np.asarray(images)
        if array.dtype == jnp.bfloat16:
            array = array.astype(np.float32)
        if array.ndim == 3:
            raise ValueError(f"images have shape {array.shape}; pass a batch [B, H, W, 3] (add a leading axis)")
        if array.ndim != 4 or array.shape[-1] != 3:
            raise ValueError(f"images have shape {array.shape}; expected [B, H, W, 3] with 3 RGB channels, channels last")
        if not np.issubdtype(array.dtype, np.floating):
            raise ValueError(f"images have dtype {array.dtype}; pass floats in [-1, 1] (for uint8, use x / 127.5 - 1)")
        if array.shape[0] == 0:
            raise ValueError(f"images have shape {array.shape}, an empty batch; pass at least one image")
        multiple = self.config.vae.downsample_factor * self.config.encoder.patch_size
        height, width = array.shape[1:3]
        if height % multiple or width % multiple or height == 0 or width == 0:
            raise ValueError(f"image size {height}x{width} is not a multiple of {multiple} pixels; resize or crop it")
        max_side = self.image_size
        if height > max_side or width > max_side:
            raise ValueError(f"image size {height}x{width} exceeds the model's {max_side}x{max_side} position table; resize it")
        low, high = float(array.min()), float(array.max())
        if low < -1.01 or high > 1.01 or not np.isfinite(low + high):
            raise ValueError(f"image values span [{low:.3g}, {high:.3g}]; scale them to [-1, 1]")
        return array.astype(np.float32)

    def _check_latents(self, latents: Any, name: str) -> np.ndarray:
        array = np.asarray(latents, dtype=np.float32)
        channels = self.config.vae.latent_channels
        if array.ndim != 4 or array.shape[-1] != channels:
            raise ValueError(f"{name} have shape {array.shape}; expected [B, h, w, {channels}], channels last")
        patch = self.config.decoder.patch_size
        grid = self.config.decoder.posemb_grid
        if array.shape[1] % patch or array.shape[2] % patch:
            raise ValueError(f"{name} grid {array.shape[1]}x{array.shape[2]} is not a multiple of the patch size {patch}")
        if array.shape[1] > grid[0] * patch or array.shape[2] > grid[1] * patch:
            raise ValueError(f"{name} grid {array.shape[1]}x{array.shape[2]} exceeds the model's {grid[0] * patch}x{grid[1] * patch}")
        if not np.all(np.isfinite(array)):
            raise ValueError(f"{name}: {int(np.sum(~np.isfinite(array)))} values are NaN or infinite")
        return array

    def _check_tokens(self, tokens: Any, lengths: Any) -> tuple[np.ndarray, np.ndarray]:
        """Validate ids and lengths; return (codes [B, R, L] float32, kept lengths [B] int32)."""
        registers = self.num_registers
        if isinstance(tokens, (list, tuple)):
            rows = [np.asarray(row) for row in tokens]
            if not rows:
                raise ValueError("tokens is an empty list; pass at least one token sequence")
            for i, row in enumerate(rows):
                if row.ndim != 1:
                    raise ValueError(f"token row {i} has shape {row.shape}; each list entry must be a 1-D id array")
                if row.size and not np.issubdtype(row.dtype, np.integer):
                    raise ValueError(f"token row {i} has dtype {row.dtype}; token ids must be integers")
            row_sizes = np.asarray([len(row) for row in rows], np.int64)
            if lengths is None:
                lengths = [len(row) for row in rows]
            width = max(max(len(row) for row in rows), 1)
            ids = np.zeros((len(rows), width), np.int64)
            for i, row in enumerate(rows):
                ids[i, : len(row)] = row
        else:
            ids = np.asarray(tokens)
            if ids.ndim == 1:
                raise ValueError(f"tokens have shape {ids.shape}; pass [B, R'] or a list of 1-D arrays")
            if ids.ndim != 2:
                raise ValueError(f"tokens have shape {ids.shape}; expected [B, R'] token ids")
            row_sizes = np.full((ids.shape[0],), ids.shape[1], np.int64)
        if not np.issubdtype(ids.dtype, np.integer):
            raise ValueError(f"tokens have dtype {ids.dtype}; token ids must be integers")
        batch, width = ids.shape
        if width > registers:
            raise ValueError(f"tokens have {width} columns but the model has {registers} token slots")

        lengths = np.full((batch,), width, np.int64) if lengths is None else np.asarray(lengths).reshape(-1)
        if lengths.shape[0] != batch:
            raise ValueError(f"lengths has {lengths.shape[0]} entries for {batch} token rows")
        if not np.issubdtype(lengths.dtype, np.integer):
            raise ValueError(f"lengths have dtype {lengths.dtype}; pass integers")
        for i, length in enumerate(lengths):
            if length < 1 or length > registers:
                raise ValueError(f"lengths[{i}]={int(length)} is invalid; each length must be in [1, {registers}]")
            if length > row_sizes[i]:
                raise ValueError(f"lengths[{i}]={int(length)} exceeds the {int(row_sizes[i])} token ids given for that row")

        used = np.arange(width)[None, :] < lengths[:, None]
        bad = used & ((ids < 0) | (ids >= self.codebook_size))
        if bad.any():
            row, col = map(int, np.argwhere(bad)[0])
            raise ValueError(
                f"token id {int(ids[row, col])} at row {row}, position {col} is outside the codebook "
                f"[0, {self.codebook_size}); {int(bad.sum())} id(s) are invalid"
            )
        padded = np.zeros((batch, registers), np.int32)
        padded[:, :width] = np.where(used, ids, 0)
        codes = np.asarray(self._fsq.ids_to_codes(padded))
        return codes, lengths.astype(np.int32)

    def _default_latent_size(self) -> tuple[int, int]:
        side = self.image_size // self.config.vae.downsample_factor
        return side, side

    def _image_keys(self, rng: jax.Array | None, batch: int) -> np.ndarray:
        """Split `rng` into one raw PRNG key per image, uint32 [B, 2], so a sample does not depend on padding."""
        return np.asarray(jax.random.key_data(jax.random.split(_as_key(rng), batch)))

    # --- Execution -------------------------------------------------------------------

    def _function(self, name: Any) -> Callable:
        if name in self._compiled:
            return self._compiled[name]
        graphdef = self._graphdef
        counts = self.trace_counts
        label = name if isinstance(name, str) else name[0]

        def body(state, *args):
            counts[label] += 1
            model = nnx.merge(graphdef, state)
            if name in ("tokenize", "encode"):
                images, keys = args
                latents = model.vae.encode(images, noise_fn=lambda shape: _image_noise(keys, shape))
                return model.tokenize_latents(latents)[1] if name == "tokenize" else latents
            if name == "decode":
                (latents,) = args
                return model.vae.decode(latents)
            if name == "velocity":
                return model.decoder(*args)
            kind, options = name
            codes, keep, noise, scales = args
            latents = sample(model.decoder, codes, keep, noise, scales, options)
            return latents if kind == "sample" else model.vae.decode(latents)

        fn = jax.jit(body, out_shardings=self._batch_sharding)
        self._compiled[name] = fn
        return fn

    def _run(self, name: Any, *batched: Any, replicated: tuple = ()) -> jax.Array:
        """Pad the batched args to the bucket size, shard them over the mesh, run, unpad.

        Every array in `batched` has the batch on axis 0; `replicated` args go to every
        device whole.
        """
        arrays = [np.asarray(array) for array in batched]
        batch = arrays[0].shape[0]
        size = bucket_size(batch, self.num_devices)
        args = []
        for array in arrays:
            pad = [(0, size - batch)] + [(0, 0)] * (array.ndim - 1)
            args.append(jax.device_put(np.pad(array, pad), self._batch_sharding))
        out = self._function(name)(self._state, *args, *replicated)
        return out[:batch]


def _as_key(rng: jax.Array | int | None) -> jax.Array:
    """Convert a key, an integer seed, or None (the default seed) to a PRNG key."""
    if rng is None:
        return jax.random.PRNGKey(DEFAULT_SEED)
    if isinstance(rng, (int, np.integer)) and not isinstance(rng, bool):
        if not -(2**63) <= int(rng) < 2**63:
            raise ValueError(f"rng={rng} is outside the 64-bit range of a PRNG seed")
        return jax.random.PRNGKey(int(rng))
    if isinstance(rng, jax.Array):
        typed_key = jnp.issubdtype(rng.dtype, jax.dtypes.prng_key) and rng.shape == ()
        raw_key = rng.dtype == jnp.uint32 and rng.shape == (2,)
        if typed_key or raw_key:
            return rng
    raise ValueError(f"rng={rng!r} is not a single PRNG key; pass jax.random.PRNGKey(seed) or an integer seed")


def _image_noise(keys: jax.Array, shape: tuple[int, ...]) -> jax.Array:
    """Standard normal noise [B, ...] drawn per image from raw keys [B, 2]."""
    typed = jax.random.wrap_key_data(keys)
    return jax.vmap(lambda key: jax.random.normal(key, shape[1:], jnp.float32))(typed)


def _download(repo_id: str, *, revision, cache_dir, local_files_only: bool) -> Path:
    """Fetch config.json and model.safetensors of a hub repo; return the snapshot directory."""
    if repo_id.count("/") != 1 or repo_id.startswith((".", "/", "~")) or repo_id.endswith((".safetensors", ".json")):
        raise FileNotFoundError(f"{repo_id} is not an existing path or a hub repo id of the form owner/name")
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    try:
        folder = snapshot_download(
            repo_id=repo_id,
            revision=revision,
            cache_dir=cache_dir,
            local_files_only=local_files_only,
            allow_patterns=list(HUB_FILES),
        )
    except LocalEntryNotFoundError as err:
        raise OSError(
            f"model {repo_id} is not in the local hub cache and downloads are off; "
            "download it once with network access, or pass a local checkpoint path"
        ) from err
    except HfHubHTTPError as err:
        raise OSError(f"cannot download model {repo_id} (revision {revision or 'main'}): {err}") from err
    return Path(folder)
