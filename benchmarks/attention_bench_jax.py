"""gpt-oss-20b's attention in JAX, forward + backward, the ways jax_impl can run it (GPU, bf16, one command): where
the JAX gpt-oss step loses to torch_impl's at 16K (1.36x in session 10, against 1.29x at 4K).

Shape: 64 query heads, 8 kv heads, head dim 64, a learned sink per head; full layers and 128-token sliding layers.
- `sink_lse`: `jax_impl.models.attention.sink_attention` under "cudnn" as jax_impl runs it since 2026-12-06: the
  log-sum-exp rescale on JAX's cuDNN rules (`jax_impl.models.lse_attention`), a sliding layer as cuDNN's own window;
- `sink_padded`: the same call with that path off (`SPLITMOE_JAX_SINK_LSE=0`): the sink as an extra key, sliding
  layers in query blocks of one window (`_sliding_blocks`);
- `plain_cudnn`: `jax.nn.dot_product_attention(implementation="cudnn")` without a sink, causal, with
  `local_window_size` on sliding layers: whether cuDNN's window skips the key blocks outside it shows as a sliding
  row much faster than the full one at 16K (torch's flash kernel: 3.3 against 18.3 ms, session 10);
- `plain_tokamax`, `plain_tokamax_triton`: the same plain problem on `tokamax.dot_product_attention` (Google's
  Pallas kernels: its Mosaic-GPU flash attention, or its Triton one), the alternative to cuDNN issue 17 asks to
  measure (no sink: tokamax's public call returns no log-sum-exp to rescale by).
On a CPU (`--device cpu`, for tests) the cuDNN rows are replaced by `sink_reference` (the rescale on its jnp
reference kernels) and `sink_xla` (the padded path through XLA). Each row: median ms of forward + backward, TFLOP/s
over the causal (or windowed) FLOPs, peak extra device memory.

    python3 benchmarks/attention_bench_jax.py --seq 4096,16384 --out results/attention_jax.jsonl
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

N, K, D, WINDOW = 64, 8, 64, 128
GPU_IMPLS = ("sink_lse", "sink_padded", "plain_cudnn", "plain_tokamax", "plain_tokamax_triton")
CPU_IMPLS = ("sink_reference", "sink_xla")


def flops(S: int, window: int | None) -> float:
    """fwd + bwd matmul FLOPs of causal attention (3.5x the forward's 2 x 2·S·keys·D per head)."""
    keys = S * (S + 1) / 2 if window is None else sum(min(i + 1, window) for i in range(S))
    return 3.5 * 4 * N * D * keys


def run(impl: str, S: int, window: int | None, iters: int) -> dict:
    import jax
    import jax.numpy as jnp

    from jax_impl.models import attention, lse_attention

    key = jax.random.split(jax.random.PRNGKey(0), 5)
    bf = jnp.bfloat16 if jax.default_backend() == "gpu" else jnp.float32
    q = jax.random.normal(key[0], (1, S, N, D), bf)
    k, v = (jax.random.normal(kk, (1, S, K, D), bf) for kk in key[1:3])
    sinks = jax.random.normal(key[3], (N,), jnp.float32).astype(bf)
    dy = jax.random.normal(key[4], (1, S, N, D), bf)
    scale = D ** -0.5

    if impl == "plain_cudnn":
        lws = None if window is None else (window - 1, 0)

        def attn(q, k, v, sinks):
            return jax.nn.dot_product_attention(q, k, v, scale=scale, is_causal=True, local_window_size=lws,
                                                implementation="cudnn")
    elif impl.startswith("plain_tokamax"):
        import tokamax

        from jax_impl.backends.tokamax_ragged_dot import mark_absl_flags_parsed

        mark_absl_flags_parsed()
        lws = None if window is None else (window - 1, 0)
        which = "triton" if impl.endswith("_triton") else "mosaic"

        def attn(q, k, v, sinks):
            return tokamax.dot_product_attention(q, k, v, scale=scale, is_causal=True, local_window_size=lws,
                                                 implementation=which)
    elif impl == "sink_reference":
        def attn(q, k, v, sinks):
            return lse_attention.sink_attention_lse(q, k, v, sinks, scale, window, kernels="reference")
    else:
        implementation = "xla" if impl == "sink_xla" else "cudnn"

        def attn(q, k, v, sinks):
            return attention.sink_attention(q, k, v, sinks, None, scale, window, implementation=implementation)

    # the path is chosen while tracing: set the switch for this row's trace only
    lse_attention.ENABLED = impl != "sink_padded"
    step = jax.jit(jax.grad(lambda *a: jnp.vdot(attn(*a).astype(jnp.float32), dy.astype(jnp.float32)),
                            argnums=(0, 1, 2, 3)))
    dev = jax.devices()[0]
    jax.block_until_ready(step(q, k, v, sinks))  # compile
    before = (dev.memory_stats() or {}).get("bytes_in_use", 0)
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        jax.block_until_ready(step(q, k, v, sinks))
        times.append((time.perf_counter() - t0) * 1e3)
    stats = dev.memory_stats() or {}
    ms = statistics.median(times)
    return {"ms": round(ms, 4), "tflops": round(flops(S, window) / ms / 1e9, 2),
            "peak_extra_gib": round((stats.get("peak_bytes_in_use", 0) - before) / 2**30, 4)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seq", default="4096,16384", help="comma-separated sequence lengths")
    p.add_argument("--impls", default=None, help=f"comma-separated, of {', '.join(GPU_IMPLS + CPU_IMPLS)}")
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--device", choices=("gpu", "cpu"), default="gpu")
    p.add_argument("--out", type=Path, default=None, help="append one JSON line per row")
    a = p.parse_args(argv)
    if a.device == "cpu":
        os.environ["JAX_PLATFORMS"] = "cpu"
    import jax

    impls = a.impls.split(",") if a.impls else list(GPU_IMPLS if a.device == "gpu" else CPU_IMPLS)
    bad = [i for i in impls if i not in GPU_IMPLS + CPU_IMPLS]
    if bad:
        p.error(f"unknown --impls {bad}; choose from {', '.join(GPU_IMPLS + CPU_IMPLS)}")
    for S in (int(s) for s in a.seq.split(",")):
        for layer, window in (("full", None), ("sliding", WINDOW)):
            for impl in impls:
                row = {"model": f"gpt_oss_20b_{layer}", "impl": impl, "seq": S, "jax": jax.__version__,
                       "backend": jax.default_backend()}
                try:
                    row.update(run(impl, S, window, a.iters))
                except Exception as e:  # noqa: BLE001 - a row that fails is recorded, not dropped
                    row["error"] = f"{type(e).__name__}: {str(e)[:300]}"
                print(json.dumps(row), flush=True)
                if a.out is not None:
                    with a.out.open("a") as f:
                        f.write(json.dumps(row) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
