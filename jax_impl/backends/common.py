"""What every jax expert backend shares (the twin of torch_impl/backends/common.py): the sort of routed rows by
expert (`ExpertSort`, built once per layer by `jax_impl.moe.sort_by_expert`) and the expert activations on the
fused gate_up output, forward and explicit VJP (functions here, where torch_impl has an `Activation` class).

`swiglu`:     h = silu(gate) * up, gate in columns 0:I and up in I:2I.
`swiglu_oai`: gpt-oss's clamped form, h = (clip(up, ±limit) + 1) * g * sigmoid(alpha * g), g = min(gate, limit).

The forward rounds where HF's PyTorch code rounds (each torch elementwise op computes in fp32 and rounds once to the
storage dtype), so bf16 outputs track HF's. The VJPs are written out rather than autodiffed so that a clamp lets the
gradient through at exactly the limit, as torch.clamp's backward does (autodiff of jnp.minimum would halve it).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

_F32 = jnp.float32


class ExpertSort(NamedTuple):
    """Routed row m = t·K + k lands at sorted position `inverse_M[m]`; sorted row j is routed row `order_M[j]`
    (token `token_M[j]`, slot `slot_M[j]`, expert `expert_M[j]`); expert e owns `group_sizes_E[e]` consecutive
    sorted rows (possibly zero), ending at `offsets_E[e]`."""

    order_M: jax.Array
    inverse_M: jax.Array
    token_M: jax.Array
    slot_M: jax.Array
    expert_M: jax.Array
    group_sizes_E: jax.Array
    offsets_E: jax.Array
    num_tokens: int
    top_k: int


def _split(gu_M2I: jax.Array) -> tuple[jax.Array, jax.Array]:
    I = gu_M2I.shape[-1] // 2
    return gu_M2I[..., :I], gu_M2I[..., I:]


def activation_fwd(gu_M2I: jax.Array, activation: str, limit: float, alpha: float) -> jax.Array:
    """act(gu) -> h [M, I] in gu's dtype."""
    cd = gu_M2I.dtype
    gate, up = _split(gu_M2I)
    if activation == "swiglu":
        g = gate.astype(_F32)
        return (g * jax.nn.sigmoid(g)).astype(cd) * up
    if activation == "swiglu_oai":
        g = jnp.minimum(gate, limit)
        u = jnp.clip(up, -limit, limit)
        glu = g * jax.nn.sigmoid((g * alpha).astype(cd).astype(_F32)).astype(cd)
        return (u + 1) * glu
    raise ValueError(f"unknown activation {activation!r}; expected 'swiglu' or 'swiglu_oai'")


def activation_vjp(gu_M2I: jax.Array, dh_MI: jax.Array, activation: str, limit: float, alpha: float) -> jax.Array:
    """d act / d gu applied to dh -> dgu [M, 2I], computed in fp32 and returned in gu's dtype."""
    gate, up = (a.astype(_F32) for a in _split(gu_M2I))
    dh = dh_MI.astype(_F32)
    if activation == "swiglu":
        sg = jax.nn.sigmoid(gate)
        dgate = dh * up * sg * (1.0 + gate * (1.0 - sg))  # silu'(g) = sig(g)·(1 + g·(1 - sig(g)))
        dup = dh * gate * sg
    elif activation == "swiglu_oai":
        g = jnp.minimum(gate, limit)
        u = jnp.clip(up, -limit, limit)
        sa = jax.nn.sigmoid(alpha * g)
        dgate = jnp.where(gate <= limit, dh * (u + 1.0) * sa * (1.0 + alpha * g * (1.0 - sa)), 0.0)
        dup = jnp.where(jnp.abs(up) <= limit, dh * g * sa, 0.0)
    else:
        raise ValueError(f"unknown activation {activation!r}; expected 'swiglu' or 'swiglu_oai'")
    return jnp.concatenate([dgate, dup], axis=-1).astype(gu_M2I.dtype)
