"""Routed experts over token chunks, recomputed chunk by chunk in the backward: torch_impl/tiled_experts.py's twin
(its docstring has the why and the memory arithmetic).

`tiled_split_lora_experts(..., chunk=C)` pads the tokens to a multiple of C (padding rows: x = 0, routing weight 0,
expert 0, so they add nothing and get no gradient), runs `moe.split_lora_experts` on each chunk with `lax.map`, and
checkpoints the chunk body with `nothing_saveable`: reverse mode then keeps only each chunk's inputs (slices of
arrays that exist anyway) and recomputes one chunk's residuals at a time in the backward scan. Measured by XLA on
the CPU (tests/jax/test_tiled_experts.py): the backward's temporaries at 2048 tokens, 256 a chunk, 6.1 MB against
40.4 MB untiled. Inside a checkpointed decoder layer the layer recompute's forward of the map is never traced: its
output feeds nothing the backward needs, and JAX's partial evaluation of the layer's remat drops it, so the
gradient holds the untiled number of expert products (6 forward, 16 in the recomputing backward, per MoE layer with
LoRA on both expert tensors; tests/jax/test_tiled_experts.py counts them), the backward's inside the chunk scan.
On a device mesh without an expert axis each device tiles its own tokens
(`jax_impl.parallel.split_lora_experts_sharded(..., chunk=)`; tests/jax/test_parallel.py checks it on 4 devices).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jax_impl.moe import LoraPair, split_lora_experts

__all__ = ["tiled_split_lora_experts"]


def tiled_split_lora_experts(x: jax.Array, expert_ids: jax.Array, expert_weights: jax.Array, w_gate_up: jax.Array,
                             w_down: jax.Array, lora_gate_up: LoraPair | None = None,
                             lora_down: LoraPair | None = None, *, chunk: int, **options) -> jax.Array:
    """`moe.split_lora_experts` (same arguments, y [T, H] and gradients) over token chunks of `chunk` rows, each
    recomputed on its own in the backward (module docstring). `options`: split_lora_experts' keywords (scale,
    biases, activation, swiglu_limit, swiglu_alpha, backend)."""
    if isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1:
        raise ValueError(f"chunk must be a positive number of tokens, got {chunk!r}")
    T, H = x.shape
    n = -(-T // chunk)
    pad = n * chunk - T

    def padded(a: jax.Array) -> jax.Array:
        return jnp.pad(a, [(0, pad)] + [(0, 0)] * (a.ndim - 1)).reshape(n, chunk, *a.shape[1:])

    @jax.checkpoint  # default policy: nothing saved but the body's inputs
    def body(xs):
        x_c, ids_c, w_c = xs
        return split_lora_experts(x_c, ids_c, w_c, w_gate_up, w_down, lora_gate_up, lora_down, **options)

    y = jax.lax.map(body, (padded(x), padded(expert_ids), padded(expert_weights)))
    return y.reshape(n * chunk, H)[:T]
