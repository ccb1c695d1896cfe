"""Attention with a per-head sink logit (gpt-oss) through the log-sum-exp rescale, at the model's own head width:
torch_impl/models/lse_attention.py's twin.

With `o, lse` the plain causal (or sliding-window) attention and its log-sum-exp, the sink only rescales each row,
`out_i = o_i · w_i` with `w_i = sigmoid(lse_i − sink_n)`, and the backward is the plain kernel's own backward with
`grad_out → w · dout` and `out → out` (the rescaled output; a flash-style backward reads `out` only for
D_i = dO_i·out_i), plus `dsink_n = −Σ_i (1 − w_i)(dout_i·out_i)`. The torch module derives it.

JAX's public `jax.nn.dot_product_attention` cannot do this: the cuDNN VJP drops the cotangent of the log-sum-exp it
returns, and the backward cannot be handed another `out`. So the "cudnn" kernels here are the forward and backward
rules of JAX's own cuDNN attention (`jax._src.cudnn.fused_attention_stablehlo`, private; the same signatures in jax
0.10.2 and 0.11.1): the forward keeps its residuals (q, k, v, the softmax statistics), the backward gets them back
with the rescaled output in place of the kernel's. The "reference" kernels are the same two computations written
out in jnp (O(S²) memory): they check the rescale and its gradient on any backend, the CPU included, where cuDNN
does not run.

`jax_impl.models.attention.sink_attention` takes it for causal / sliding layers without a mask under the "cudnn"
implementation. Its gpu test (tests/jax/test_attention.py, bf16 against the literal softmax: full, sliding and an odd
length, q, k, v and sink gradients) passed on an H100 on 2026-12-06, and the gpt-oss-20b step (24 layers) then ran
432.6 / 1709.5 ms at 4K / 16K against 449.3 / 1899.0 ms with the padded sink key in the same call
(benchmarks/results/session10_2026-12-06/call3_*). `SPLITMOE_JAX_SINK_LSE=0` selects the padded path.
"""

from __future__ import annotations

import os
from functools import partial

import jax
import jax.numpy as jnp

_F32 = jnp.float32
# read once, at import (a traced function sees a constant)
ENABLED = os.environ.get("SPLITMOE_JAX_SINK_LSE", "1") != "0"


# ---- kernels: forward (o, lse, residuals) and backward (residuals, out argument, grad out) -> dq, dk, dv -------------

def _reference_fwd(q, k, v, scale: float, window: int | None):
    """Causal attention of q [B, S, N, D], k, v [B, S, K, D] (K divides N), in fp32 with one rounding of o:
    (o [B, S, N, D], lse [B, N, S] fp32, residuals)."""
    B, S, N, D = q.shape
    K = k.shape[2]
    qg = q.reshape(B, S, K, N // K, D).astype(_F32)
    s = jnp.einsum("bqkgd,bckd->bkgqc", qg, k.astype(_F32)) * scale
    i = jnp.arange(S)
    ok = i[None, :] <= i[:, None]
    if window is not None:
        ok = ok & (i[None, :] > i[:, None] - window)
    s = jnp.where(ok, s, -jnp.inf)
    lse = jax.nn.logsumexp(s, axis=-1)  # [B, K, G, S]
    p = jnp.exp(s - lse[..., None])
    o = jnp.einsum("bkgqc,bckd->bqkgd", p, v.astype(_F32)).reshape(B, S, N, D).astype(q.dtype)
    return o, lse.reshape(B, N, S), (q, k, v, lse, ok)


def _reference_bwd(res, scale: float, out, grad_o):
    """The flash-attention backward of `_reference_fwd` given the output argument `out` (read for D only)."""
    q, k, v, lse, ok = res
    B, S, N, D = q.shape
    K = k.shape[2]
    G = N // K
    qg = q.reshape(B, S, K, G, D).astype(_F32)
    k32, v32 = k.astype(_F32), v.astype(_F32)
    s = jnp.where(ok, jnp.einsum("bqkgd,bckd->bkgqc", qg, k32) * scale, -jnp.inf)
    p = jnp.exp(s - lse[..., None])
    do = grad_o.reshape(B, S, K, G, D).astype(_F32)
    d = jnp.einsum("bqkgd,bqkgd->bkgq", do, out.reshape(B, S, K, G, D).astype(_F32))
    dp = jnp.einsum("bqkgd,bckd->bkgqc", do, v32)
    ds = p * (dp - d[..., None])
    dq = jnp.einsum("bkgqc,bckd->bqkgd", ds, k32).reshape(B, S, N, D) * scale
    dk = jnp.einsum("bkgqc,bqkgd->bckd", ds, qg) * scale
    dv = jnp.einsum("bkgqc,bqkgd->bckd", p, do)
    return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype)


def _cudnn_static(scale: float, window: int | None):
    from jax._src.cudnn import fused_attention_stablehlo as fa

    # the non-differentiable arguments of fa._dot_product_attention, as fa.dot_product_attention builds them for a
    # causal BTNH call without bias, mask, segments, dropout or pages
    return fa, (scale, 42, 0.0, (False, False), fa.MaskType.CAUSAL, fa._normalize_layout("BTNH").value, window,
                fa.check_cudnn_version())


def _cudnn_fwd(q, k, v, scale: float, window: int | None):
    fa, static = _cudnn_static(scale, window)
    nu = jnp.zeros(0, q.dtype)
    (o, lse), res = fa._dot_product_attention_fwd_rule(q, k, v, nu, nu, nu, nu, nu, nu, nu, *static, True)
    return o, lse, res


def _cudnn_bwd(res, scale: float, window: int | None, out, grad_o):
    fa, static = _cudnn_static(scale, window)
    res = (*res[:-1], out)  # the kernel's own output -> the rescaled one (module docstring)
    grads = fa._dot_product_attention_bwd_rule(*static, False, res, grad_o)
    return grads[0], grads[1], grads[2]


# ---- the rescale ---------------------------------------------------------------------------------------------------

@partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6))
def _sink_lse(q, k, v, sinks, scale: float, window: int | None, kernels: str):
    return _sink_lse_fwd(q, k, v, sinks, scale, window, kernels)[0]


def _sink_lse_fwd(q, k, v, sinks, scale, window, kernels):
    if kernels == "cudnn":
        o, lse, res = _cudnn_fwd(q, k, v, scale, window)
    else:
        o, lse, res = _reference_fwd(q, k, v, scale, window)
    w = jax.nn.sigmoid(lse - sinks.astype(_F32)[None, :, None])  # [B, N, S]
    w_BSN = jnp.swapaxes(w, 1, 2)
    out = (o.astype(_F32) * w_BSN[..., None]).astype(q.dtype)
    return out, (res, w_BSN, out, sinks)


def _sink_lse_bwd(scale, window, kernels, saved, dout):
    res, w, out, sinks = saved
    d32 = dout.astype(_F32)
    grad_o = (d32 * w[..., None]).astype(dout.dtype)
    if kernels == "cudnn":
        dq, dk, dv = _cudnn_bwd(res, scale, window, out, grad_o)
    else:
        dq, dk, dv = _reference_bwd(res, scale, out, grad_o)
    dsinks = -jnp.sum((1 - w) * jnp.sum(d32 * out.astype(_F32), axis=-1), axis=(0, 1))
    return dq, dk, dv, dsinks.astype(sinks.dtype)


_sink_lse.defvjp(_sink_lse_fwd, _sink_lse_bwd)


def sink_attention_lse(q_BSND: jax.Array, k_BSKD: jax.Array, v_BSKD: jax.Array, sinks_N: jax.Array, scale: float,
                       window: int | None = None, *, kernels: str = "cudnn") -> jax.Array:
    """softmax([q·kᵀ·scale | sink_n]) without the sink column, times v, causal and within `window` keys back (self
    included) when given: q [B, S, N, D], k, v [B, S, K, D] (K divides N; query head n reads kv head n // (N / K)),
    sinks [N] -> [B, S, N, D]. `kernels`: "cudnn" (bf16 / fp16 on an NVIDIA GPU) or "reference"."""
    if kernels not in ("cudnn", "reference"):
        raise ValueError(f"kernels must be 'cudnn' or 'reference', got {kernels!r}")
    S = q_BSND.shape[1]
    if window is not None and window >= S:
        window = None
    if kernels == "cudnn" and S % 2:
        # cuDNN's training kernels want even lengths (attention._even_lengths): one zero query and key appended,
        # after every real query, so causally unseen; its row is dropped (and gets no gradient)
        pad = [(0, 0), (0, 1), (0, 0), (0, 0)]
        out = _sink_lse(jnp.pad(q_BSND, pad), jnp.pad(k_BSKD, pad), jnp.pad(v_BSKD, pad), sinks_N, scale, window,
                        kernels)
        return out[:, :S]
    return _sink_lse(q_BSND, k_BSKD, v_BSKD, sinks_N, scale, window, kernels)
