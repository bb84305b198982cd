"""Tokenize and detokenize the golden tiny images; write the results to an .npz.

Run in a fresh process so that XLA_FLAGS (the host device count) takes effect.
Usage: run_devices.py CHECKPOINT GOLDEN_NPZ OUT_NPZ
"""

import sys

import jax
import numpy as np

jax.config.update("jax_default_matmul_precision", "highest")

from flextok_jax import FlexTok  # noqa: E402

checkpoint, golden_file, out = sys.argv[1:4]
golden = np.load(golden_file)
images = golden["images"].transpose(0, 2, 3, 1)
model = FlexTok.from_pretrained(checkpoint)

tokens = model.tokenize(images)
# Batch of 3 rows with mixed kept lengths, then a batch with other lengths: one compile.
latents = model.detokenize_latents(tokens, lengths=[32, 4, 1], steps=4, guidance_scale=7.5, apg=True)
other = model.detokenize_latents(tokens, lengths=[2, 16, 8], steps=4, guidance_scale=7.5, apg=True)
images_out = model.decode_latents(latents)

np.savez(
    out,
    devices=len(jax.devices()),
    tokens=np.asarray(tokens),
    latents=np.asarray(latents),
    other=np.asarray(other),
    images=np.asarray(images_out),
    sample_traces=model.trace_counts["sample"],
    latents_sharding=str(latents.sharding),
)
