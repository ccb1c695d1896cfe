"""JAX rows of the MoE block benchmark, one case per process (moe_block.py starts it with preallocation off).

Times `jax.grad` of the split-LoRA expert block (w.r.t. x and the LoRA weights; fp32 LoRA master weights cast to
bf16 inside, as the torch rows do), lowered and compiled ahead of time by `jax.jit(...).lower(...).compile()`, median
of timed runs after one warm-up run. Each stage is announced on stderr as it ends. Prints one JSON line: ms, the
compile time and peak extra device memory.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def say(msg: str) -> None:
    print(f"    [{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--case", required=True)
    p.add_argument("--backend", default="ragged_dot")
    p.add_argument("--iters", type=int, default=10)
    args = p.parse_args()

    import jax
    import jax.numpy as jnp
    import numpy as np

    from jax_impl.moe import split_lora_experts as moe_split_lora_experts
    from shared_math.cases import get_case

    if args.backend.endswith("_fused"):
        # a Pallas backend's own entry (pallas_fused, pallas_triton_fused, pallas_mosaic_fused): gather, weighting
        # and un-permute inside its kernels (jax_impl.moe's generic path builds x[perm] and weights outside them)
        import importlib

        fused = importlib.import_module(f"jax_impl.backends.{args.backend.removesuffix('_fused')}").split_lora_experts

        def split_lora_experts(*a, backend, **kw):
            return fused(*a, **kw)
    else:
        split_lora_experts = moe_split_lora_experts
    c = get_case(args.case)
    bf = jnp.bfloat16
    key = iter(jax.random.split(jax.random.PRNGKey(0), 16))

    def rnd(shape, fan_in=1.0, dtype=bf):
        return (jax.random.normal(next(key), shape, jnp.float32) / np.sqrt(fan_in)).astype(dtype)

    logits = jax.random.normal(next(key), (c.T, c.E))
    w, ids = jax.lax.top_k(jax.nn.softmax(logits, -1), c.K)
    w = (w / w.sum(-1, keepdims=True)).astype(bf)
    x, dy = rnd((c.T, c.H)), rnd((c.T, c.H))
    wgu, wd = rnd((c.E, c.H, 2 * c.I), c.H), rnd((c.E, c.I, c.H), c.I)
    lora = (rnd((c.E, c.H, c.R), c.H, jnp.float32), rnd((c.E, c.R, 2 * c.I), c.R, jnp.float32),
            rnd((c.E, c.I, c.R), c.I, jnp.float32), rnd((c.E, c.R, c.H), c.R, jnp.float32))
    biases = (rnd((c.E, 2 * c.I)), rnd((c.E, c.H))) if c.biases else None

    def loss(x, lora):
        a1, b1, a2, b2 = (t.astype(bf) for t in lora)
        y = split_lora_experts(x, ids, w, wgu, wd, (a1, b1), (a2, b2), scale=2.0, biases=biases,
                               activation=c.activation, swiglu_limit=c.swiglu_limit, backend=args.backend)
        return jnp.vdot(y.astype(jnp.float32), dy.astype(jnp.float32))

    # each stage is announced on stderr (moe_block.py passes it through), so a row cut by a time limit says which
    # stage it was in: session 26's tokamax row at T=16384 outlasted 240 s and left no trace of where
    t0 = time.perf_counter()
    lowered = jax.jit(jax.grad(loss, argnums=(0, 1))).lower(x, lora)
    say(f"{args.backend}: lowered in {time.perf_counter() - t0:.1f} s")
    t0 = time.perf_counter()
    grad = lowered.compile()
    compile_s = time.perf_counter() - t0
    say(f"{args.backend}: compiled in {compile_s:.1f} s")
    dev = jax.devices()[0]
    t0 = time.perf_counter()
    jax.block_until_ready(grad(x, lora))
    say(f"{args.backend}: first run {time.perf_counter() - t0:.2f} s")
    before = (dev.memory_stats() or {}).get("bytes_in_use", 0)  # None on a CPU
    times = []
    for _ in range(args.iters):
        t0 = time.perf_counter()
        jax.block_until_ready(grad(x, lora))
        times.append((time.perf_counter() - t0) * 1e3)
    stats = dev.memory_stats() or {}
    row = {"ms": statistics.median(times), "peak_extra_gib": (stats.get("peak_bytes_in_use", 0) - before) / 2**30,
           "compile_s": compile_s, "jax": jax.__version__}
    if args.backend == "tokamax":  # which of tokamax's implementations the dots asked for, and its version
        import tokamax

        from jax_impl.backends.tokamax_ragged_dot import implementation

        row.update(tokamax=getattr(tokamax, "__version__", "?"), tokamax_impl=implementation(bf))
    print(json.dumps(row))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
