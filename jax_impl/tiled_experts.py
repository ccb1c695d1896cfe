"""Routed experts over token chunks, recomputed chunk by chunk in the backward: torch_impl/tiled_experts.py's twin
(its docstring has the why and the memory arithmetic).

`tiled_split_lora_experts(..., chunk=C)` pads the tokens to a multiple of C (padding rows: x = 0, routing weight 0,
expert 0, so they add nothing and get no gradient) and runs `moe.split_lora_experts` on one chunk after another
under a `custom_vjp` (as the torch twin's autograd Function): the forward keeps only its inputs (slices of arrays
that exist anyway), and the backward is one loop over the chunks, last to first, that recomputes a chunk's forward,
takes its gradients (`jax.vjp`) and frees them before the next; as in `jax.checkpoint`, a recompute's inputs pass
an optimization barrier together with the chunk's cotangent, so XLA cannot start it early. Measured by XLA on the CPU
(tests/jax/test_tiled_experts.py): the backward's temporaries at 2048 tokens, 256 a chunk, 5.7 MB against 40.4 MB
untiled.

No loop here starts from a zero buffer. Until 2026-12-06 this was `lax.map` over `jax.checkpoint`-ed chunks with
JAX's own transpose, whose loops do: the map's output and, in the backward, dx [T, H] and the fp32 LoRA gradient
sums all start as zeros, and XLA shares one zero constant among the loops of every layer and copies it per loop
(copy insertion). Those copies depend on nothing, and its scheduler put them all at the start of the step, so at the
backward of the last layer every layer's dx buffer and LoRA gradients were allocated already (gpt-oss-20b at 64K
tokens: 24 x 360 MiB + 2.6 GiB of the 32.5 GiB of temporaries in `benchmarks/jax_memory_plan.py`'s CPU plan, 21.2
GiB after; issue 17). Now y overwrites x chunk by chunk in one buffer, dx overwrites the incoming dy the same way
(chunk c is read before it is replaced), the routing weights' gradient overwrites a copy of the routing weights, and
the last chunk's gradients, taken outside the loop, start the parameter sums, which therefore add up in the order
the transposed map added them (last chunk first), bit for bit. Every one of these buffers depends on its layer's
data, so none can exist before that layer reaches it. Inputs that are not differentiated (`symbolic_zeros`: the
frozen base weights and biases) get no gradient at all; those that are (a test's full fine-tuning) are summed like
the LoRA factors.

Inside a checkpointed decoder layer the layer recompute's forward of the chunk loop is never traced: its output
feeds nothing the backward needs, and JAX's partial evaluation of the layer's remat drops it, so the gradient does
the untiled expert FLOPs (6 expert products forward, 16 in the recomputing backward per MoE layer with LoRA on both
expert tensors); its jaxpr holds the backward's 16 twice, once for the last chunk outside the loop and once in the
loop (tests/jax/test_tiled_experts.py counts them). On a device mesh without an expert axis each device tiles its
own tokens (`jax_impl.parallel.split_lora_experts_sharded(..., chunk=)`; tests/jax/test_parallel.py checks it on 4
devices).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import jax
import jax.numpy as jnp

from jax_impl.moe import LoraPair, split_lora_experts

__all__ = ["tiled_split_lora_experts"]


@jax.tree_util.register_static
@dataclass(frozen=True)
class _Options:
    """`split_lora_experts`' keyword options but `biases` (scale, activation, swiglu_limit, swiglu_alpha, backend),
    as sorted (name, value) pairs: static, hashable."""

    items: tuple


@jax.tree_util.register_static
@dataclass(frozen=True)
class _Perturbed:
    """Which leaves of (x chunks, routing-weight chunks, params) are differentiated (custom_vjp's symbolic zeros)."""

    flags: tuple[bool, ...]


def _chunk(options: _Options, x_CH, ids_CK, w_CK, params):
    """One chunk's routed experts; params = (w_gate_up, w_down, lora_gate_up, lora_down, biases)."""
    w_gate_up, w_down, lora_gate_up, lora_down, biases = params
    return split_lora_experts(x_CH, ids_CK, w_CK, w_gate_up, w_down, lora_gate_up, lora_down, biases=biases,
                              **dict(options.items))


def _put(buf: jax.Array, c, chunk: jax.Array) -> jax.Array:
    """`buf` with chunk `c` replaced (in place in XLA: a loop carry's dynamic-update-slice)."""
    return jax.lax.dynamic_update_index_in_dim(buf, chunk.astype(buf.dtype), c, 0)


@partial(jax.custom_vjp, nondiff_argnums=(0,))
def _tiled(options: _Options, x_nCH, ids_nCK, w_nCK, params):
    # y overwrites x chunk by chunk in one buffer (y[c] and x[c] have one shape and dtype; x[c] is read first): a
    # loop's output buffer would start as zeros, which XLA may allocate for every layer at once (module docstring)
    def body(c, buf):
        return _put(buf, c, _chunk(options, buf[c], ids_nCK[c], w_nCK[c], params))

    return jax.lax.fori_loop(0, x_nCH.shape[0], body, x_nCH)


def _tiled_fwd(options, x_nCH, ids_nCK, w_nCK, params):
    # symbolic_zeros=True: every array argument arrives as CustomVJPPrimal(value, perturbed)
    flags = tuple(bool(p.perturbed) for p in jax.tree.leaves((x_nCH, w_nCK, params)))
    x, ids, w, prm = jax.tree.map(lambda p: p.value, (x_nCH, ids_nCK, w_nCK, params))
    return _tiled(options, x, ids, w, prm), (x, ids, w, prm, _Perturbed(flags))


def _tiled_bwd(options, res, dy_nCH):
    x_nCH, ids_nCK, w_nCK, params, perturbed = res
    n = x_nCH.shape[0]
    if isinstance(dy_nCH, jax.custom_derivatives.SymbolicZero):
        dy_nCH = jnp.zeros(dy_nCH.shape, dy_nCH.dtype)
    leaves, treedef = jax.tree.flatten((x_nCH, w_nCK, params))  # leaf 0: x chunks, leaf 1: routing-weight chunks
    wanted = [i for i, f in enumerate(perturbed.flags) if f]

    def grads(c, dy_CH) -> dict[int, jax.Array]:
        """{leaf: gradient} of chunk c's differentiated inputs, its forward recomputed here."""
        # as jax.checkpoint's recompute: the inputs pass an optimization barrier together with the cotangent, so XLA
        # can neither start the recompute before dy exists (for the last chunk, outside the loop, nothing else would
        # stop it: in a layer that is not checkpointed, it could move into the forward and keep its residuals) nor
        # merge it with the forward's (CSE)
        chunk_leaves, ids_CK, dy_CH = jax.lax.optimization_barrier(
            ([x_nCH[c], w_nCK[c], *leaves[2:]], ids_nCK[c], dy_CH))

        def f(*diff):
            args = list(chunk_leaves)
            for i, d in zip(wanted, diff):
                args[i] = d
            x_CH, w_CK, prm = jax.tree.unflatten(treedef, args)
            return _chunk(options, x_CH, ids_CK, w_CK, prm)

        _, pullback = jax.vjp(f, *(chunk_leaves[i] for i in wanted))
        return dict(zip(wanted, pullback(dy_CH)))

    # the last chunk outside the loop: its gradients start the sums, its dx the dy buffer's overwriting
    g = grads(n - 1, dy_nCH[n - 1])
    dx = _put(dy_nCH, n - 1, g[0]) if 0 in g else None
    dw = _put(w_nCK, n - 1, g[1]) if 1 in g else None  # every chunk of it is overwritten
    sums = {i: s for i, s in g.items() if i > 1}

    def body(k, carry):
        dx, dw, sums = carry
        c = n - 2 - k  # last to first, as the transpose of lax.map
        g = grads(c, dy_nCH[c] if dx is None else dx[c])  # dx[c] still holds dy[c]
        dx = None if dx is None else _put(dx, c, g[0])
        dw = None if dw is None else _put(dw, c, g[1])
        return dx, dw, {i: s + g[i] for i, s in sums.items()}

    dx, dw, sums = jax.lax.fori_loop(0, n - 1, body, (dx, dw, sums))
    out = [None] * len(leaves)
    out[0], out[1] = dx, dw
    for i, s in sums.items():
        out[i] = s
    dx, dw, dparams = jax.tree.unflatten(treedef, out)
    return dx, None, dw, dparams  # None: no gradient (the routing ids, and every input not differentiated)


_tiled.defvjp(_tiled_fwd, _tiled_bwd, symbolic_zeros=True)


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

    biases = options.pop("biases", None)
    params = (w_gate_up, w_down, None if lora_gate_up is None else tuple(lora_gate_up),
              None if lora_down is None else tuple(lora_down), None if biases is None else tuple(biases))
    y = _tiled(_Options(tuple(sorted(options.items()))), padded(x), padded(expert_ids), padded(expert_weights),
               params)
    return y.reshape(n * chunk, H)[:T]
