"""Compile time and steady time of one detokenize call, against an unjitted step loop.

Usage: python benchmarks/detokenize_speed.py [--devices N] [--batch B] [--steps S] [--model PATH]

Prints, from one run, the first call (trace + compile + run) and the median steady call.
It then times the same sampling structured as the reference does it: a Python loop with
separate conditional and unconditional decoder calls per step, each call jitted on its
own. The last line is the ratio between the two. --devices sets the number of host CPU devices
and must be given before JAX starts, so this script sets XLA_FLAGS itself.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--devices", type=int, default=1, help="host CPU devices to shard the batch over")
    parser.add_argument("--batch", type=int, default=8, help="images per call")
    parser.add_argument("--steps", type=int, default=20, help="Euler steps")
    parser.add_argument("--repeats", type=int, default=5, help="steady calls to time")
    parser.add_argument("--model", default=str(Path(__file__).parent.parent / "tests" / "fixtures" / "golden" / "tiny"))
    args = parser.parse_args()
    os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={args.devices}"

    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    from flextok_jax import FlexTok
    from flextok_jax.sampler import apg_update

    model = FlexTok.from_pretrained(args.model)
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, model.codebook_size, size=(args.batch, model.num_registers))
    lengths = rng.integers(1, model.num_registers + 1, size=args.batch)
    kwargs = dict(steps=args.steps, guidance_scale=7.5, apg=True)

    start = time.perf_counter()
    model.detokenize_latents(tokens, lengths, **kwargs).block_until_ready()
    first = time.perf_counter() - start

    steady = []
    for i in range(args.repeats):
        start = time.perf_counter()
        model.detokenize_latents(tokens, lengths, rng=jax.random.PRNGKey(i), **kwargs).block_until_ready()
        steady.append(time.perf_counter() - start)
    steady_s = statistics.median(steady)

    # Reference-style loop: one jitted decoder call per pass, two passes per step, in Python.
    decoder = model.model.decoder
    graphdef, state = nnx.split(decoder)
    call = jax.jit(lambda state, *a: nnx.merge(graphdef, state)(*a))
    codes, keep = model._check_tokens(tokens, lengths)
    shape = (args.batch, *model._default_latent_size(), model.config.vae.latent_channels)
    x = jax.random.normal(jax.random.PRNGKey(0), shape)
    cond_flags, uncond_flags = jnp.zeros(args.batch, bool), jnp.ones(args.batch, bool)

    def loop(x):
        buffer = jnp.zeros_like(x)
        for i in range(args.steps, 0, -1):
            t = jnp.full((args.batch,), i / args.steps)
            cond = call(state, x, t, codes, keep, cond_flags)
            uncond = call(state, x, t, codes, keep, uncond_flags)
            velocity, buffer = apg_update(cond, uncond, 7.5, buffer)
            x = x - velocity / args.steps
        return x.block_until_ready()

    loop(x)  # compile
    loop_times = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        loop(x)
        loop_times.append(time.perf_counter() - start)
    loop_s = statistics.median(loop_times)

    print(f"machine: {jax.devices()[0].platform}, {len(jax.devices())} device(s), python {sys.version.split()[0]}, jax {jax.__version__}")
    print(f"model: {args.model}, batch {args.batch}, steps {args.steps}, APG 7.5")
    print(f"first call (compile + run): {first:.2f} s")
    print(f"steady call (median of {args.repeats}): {steady_s * 1000:.1f} ms")
    print(f"compiles of the sampler: {model.trace_counts['sample']}")
    print(f"reference-style Python step loop (median): {loop_s * 1000:.1f} ms")
    print(f"speedup of the single-jit sampler over the step loop: {loop_s / steady_s:.2f}x")


if __name__ == "__main__":
    main()
