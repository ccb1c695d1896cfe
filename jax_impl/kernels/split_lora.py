"""Routed experts with split LoRA on the Pallas kernels, under one `jax.custom_vjp`: one expert sort, four NN passes
(two forward, two backward) and ragged-contracting weight gradients.

Computes what `shared_math.reference.split_lora_experts` does, y [T, H], with every gradient (x, expert_weights, both
LoRA pairs, biases, and the base weights in full fine-tuning mode). Pallas has no reverse-mode rule, hence the
explicit backward. Shapes: T tokens, H hidden, I expert intermediate, E experts, K experts per token, R LoRA rank,
M = T·K routed rows; s = scale; sorted row m has flat position flat[m] = t·K+k and token[m] = flat[m] // K.

Forward:
  1. gate_up pass (NN, act_fwd): x rows gathered in the load (no x[perm] copy); z1 = x@A1 in the same reduction
     loop; gu = x@Wgu + s·z1@B1 + b_gu with gate and up columns in one program; h = act(gu) -> [M, I].
     Saved for the backward: gu [M, 2I] (pre-activation) and z1 [M, R].
  2. down pass (NN): z2 = h@A2 in-loop; o = h@Wd + s·z2@B2 + b_d, rounded, times w[m], stored to row flat[m];
     y = out.reshape(T, K, H).sum(1) in fp32 (deterministic). Saved: z2 [M, R]. h, o and x[perm] are never saved.
Backward (dy [T, H]; dh' and dZ2' are per unit routing weight):
  3. dh pass (NN, act_bwd): dh' = dy[token]@Wdᵀ + dZ2'@A2ᵀ with dZ2' = s·dy[token]@B2ᵀ in-loop; epilogue: partial
     <h, dh'> per tile for d expert_weights = <o, dy> without o (+ <b_d, dy>, a [T,H]x[H,E] product outside);
     dgu = act_vjp(gu, w·dh') -> [M, 2I].
  4. dx pass (NN): dZ1 = s·dgu@B1ᵀ in-loop; dx rows = dgu@Wguᵀ + dZ1@A1ᵀ stored to flat[m], summed over K.
  TN (fp32): dB2 = s·Z2ᵀ(w·dy[token]), dA2 = hᵀ(w·dZ2'), dB1 = s·Z1ᵀdgu, dA1 = x[token]ᵀdZ1; and only when those
  inputs are differentiated (`symbolic_zeros` tells us): dWd = hᵀ(w·dy[token]), dWgu = x[token]ᵀdgu, bias grads.
  A crowded expert's rows may be split over several programs (grouped_gemm_tn's split_rows; set by
  SPLITMOE_JAX_TN_SPLIT_ROWS, `grouped_gemm.tn_split_rows`).
In-loop z (steps 1-4): every n-tile program of a pass recomputes the same z; a config with `z_pre` (autotune.py)
computes it first by one skinny launch per pass instead (grouped_gemm.py), with the same values.
Block configs: autotune.get_config per pass, keyed by kind and (M bucket, reduction width, output width, R) for the NN
passes ("gemm_act" gate_up, "gemm" down/dx/dZ1, "gemm_act_bwd" dh) and (M bucket, P, Q, left operand) for each TN one.
Why save gu rather than h or recompute it: gu is all the backward needs (h = act(gu) is recomputed elementwise in the
kernels that read it); recomputing gu would cost a whole gate_up GEMM.

`Passes` names the kernel implementation of each pass, so a Mosaic-GPU variant of one pass (e.g. the forward NN
GEMMs) can replace the Triton one without touching this composition.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import NamedTuple

import jax
import jax.numpy as jnp

from jax_impl.kernels import autotune
from jax_impl.kernels import grouped_gemm as gg

_F32 = jnp.float32


class KernelSort(NamedTuple):
    """The one stable sort of the M routed rows by expert, shared by every pass of forward and backward."""

    flat_M: jax.Array  # sorted row -> t·K+k
    token_M: jax.Array  # sorted row -> t
    inverse_M: jax.Array  # t·K+k -> sorted row
    offsets_E1: jax.Array  # expert e owns sorted rows offsets[e]:offsets[e+1]


def sort_rows(expert_ids_TK: jax.Array, num_experts: int) -> KernelSort:
    """Stable argsort of the flat expert ids; group bounds by binary search (no bincount / scatter-add)."""
    T, K = expert_ids_TK.shape
    ids_M = expert_ids_TK.reshape(-1).astype(jnp.int32)
    flat_M = jnp.argsort(ids_M, stable=True).astype(jnp.int32)
    M = ids_M.shape[0]
    inverse_M = jnp.zeros((M,), jnp.int32).at[flat_M].set(jnp.arange(M, dtype=jnp.int32), unique_indices=True)
    offsets_E1 = jnp.searchsorted(ids_M[flat_M], jnp.arange(num_experts + 1, dtype=jnp.int32),
                                  side="left").astype(jnp.int32)
    return KernelSort(flat_M, flat_M // K, inverse_M, offsets_E1)


@jax.tree_util.register_static
@dataclass(frozen=True)
class Passes:
    """The kernel behind each pass: `nn(...)` (grouped_gemm's signature) and `tn(...)` (grouped_gemm_tn's)."""

    nn: object = gg.grouped_gemm
    tn: object = gg.grouped_gemm_tn


@jax.tree_util.register_static
@dataclass(frozen=True)
class Options:
    """Static options of one call (hashable: they key jit's cache)."""

    scale: float
    activation: str
    limit: float
    alpha: float
    interpret: bool
    passes: Passes = Passes()


def _cfg(kind: str, key: tuple, dtype, opts: Options) -> autotune.BlockConfig:
    return autotune.get_config(kind, key, dtype, interpret=opts.interpret)


def _bucket(m: int) -> int:
    # configs are keyed by the next power of two of M, so nearby batch sizes share a tuned entry
    return 1 << max(m - 1, 0).bit_length()


def _forward(x, expert_weights, w_gu, w_d, lora_gu, lora_d, biases, srt: KernelSort, opts: Options, save: bool):
    T, H = x.shape
    K = expert_weights.shape[1]
    M, I, dt = T * K, w_d.shape[1], x.dtype
    a1, b1 = lora_gu if lora_gu is not None else (None, None)
    a2, b2 = lora_d if lora_d is not None else (None, None)
    b_gu, b_d = biases if biases is not None else (None, None)
    w_sorted = expert_weights.reshape(M)[srt.flat_M]
    nn = opts.passes.nn
    r1 = 0 if b1 is None else b1.shape[1]
    r2 = 0 if b2 is None else b2.shape[1]
    out = nn(x, w_gu, srt.offsets_E1, n=I, cfg=_cfg("gemm_act", (_bucket(M), H, I, r1), dt, opts),
             interpret=opts.interpret, row_index=srt.token_M, lora_a=a1, lora_b=b1, store_z=save, lora_scale=opts.scale,
             bias=b_gu, mode="act_fwd", activation=opts.activation, store_gu=save, limit=opts.limit,
             alpha=opts.alpha, name="moe_gate_up")
    h = out[0]
    z1 = out[1] if save and b1 is not None else None
    gu = out[-1] if save else None
    out = nn(h, w_d, srt.offsets_E1, n=H, cfg=_cfg("gemm", (_bucket(M), I, H, r2), dt, opts),
             interpret=opts.interpret, lora_a=a2, lora_b=b2, store_z=save, lora_scale=opts.scale, bias=b_d,
             row_scale=w_sorted, out_rows=srt.flat_M, name="moe_down")
    z2 = out[1] if save and b2 is not None else None
    y = out[0].reshape(T, K, H).sum(axis=1, dtype=_F32).astype(dt)  # rows in (token, slot) order
    return y, (gu, z1, z2, w_sorted)


@partial(jax.custom_vjp, nondiff_argnums=(8,))
def split_lora_experts(x: jax.Array, expert_ids: jax.Array, expert_weights: jax.Array, w_gate_up: jax.Array,
                       w_down: jax.Array, lora_gate_up: tuple[jax.Array, jax.Array] | None,
                       lora_down: tuple[jax.Array, jax.Array] | None, biases: tuple[jax.Array, jax.Array] | None,
                       opts: Options) -> jax.Array:
    """Routed experts with split LoRA -> y [T, H] in x's dtype (differentiable; see the module docstring).

    x [T, H], expert_ids / expert_weights [T, K], w_gate_up [E, H, 2I], w_down [E, I, H], LoRA pairs (A [E, in, R],
    B [E, R, out]) or None, biases (b_gate_up [E, 2I], b_down [E, H]) or None. Shapes are checked by the caller.
    """
    srt = sort_rows(expert_ids, w_gate_up.shape[0])
    return _forward(x, expert_weights, w_gate_up, w_down, lora_gate_up, lora_down, biases, srt, opts, False)[0]


@jax.tree_util.register_static
@dataclass(frozen=True)
class _Wants:
    """Which inputs are differentiated (static, so the backward branches in Python under jit)."""

    x: bool
    expert_weights: bool
    w_gate_up: bool
    w_down: bool
    lora_gate_up: bool
    lora_down: bool
    biases: bool


def _pv(pair):
    return None if pair is None else (pair[0].value, pair[1].value)


def _pp(pair) -> bool:
    return pair is not None and (pair[0].perturbed or pair[1].perturbed)


def _fwd(x, expert_ids, expert_weights, w_gu, w_d, lora_gu, lora_d, biases, opts):
    # symbolic_zeros=True: differentiable args arrive as CustomVJPPrimal(value, perturbed)
    wants = _Wants(x.perturbed, expert_weights.perturbed, w_gu.perturbed, w_d.perturbed, _pp(lora_gu), _pp(lora_d),
                   _pp(biases))
    xv, ew, wgu, wd = x.value, expert_weights.value, w_gu.value, w_d.value
    lgu, ld, b = _pv(lora_gu), _pv(lora_d), _pv(biases)
    srt = sort_rows(expert_ids.value, wgu.shape[0])
    y, (gu, z1, z2, w_sorted) = _forward(xv, ew, wgu, wd, lgu, ld, b, srt, opts, True)
    # w_sorted carries expert_weights' dtype, and M = T·K gives K: residuals must be arrays (or static pytrees)
    return y, (xv, wgu, wd, lgu, ld, b, srt, gu, z1, z2, w_sorted, wants)


def _bwd(opts, res, dy):
    x, wgu, wd, lgu, ld, b, srt, gu, z1, z2, w_sorted, wants = res
    T, H = x.shape
    M, I, dt, s = w_sorted.shape[0], wd.shape[1], x.dtype, opts.scale
    K = M // T
    if isinstance(dy, jax.custom_derivatives.SymbolicZero):
        dy = jnp.zeros(dy.shape, dy.dtype)
    dy = dy.astype(dt)
    nn = opts.passes.nn
    kw = dict(interpret=opts.interpret)
    act = dict(activation=opts.activation, limit=opts.limit, alpha=opts.alpha)
    tok, off = srt.token_M, srt.offsets_E1
    r1 = 0 if lgu is None else lgu[1].shape[1]
    r2 = 0 if ld is None else ld[1].shape[1]
    g = {}

    def tn(left, right, offsets, *, p, **kw):
        mode = "ones" if left is None else ("act" if kw.get("left_act") else "rows")
        cfg = _cfg("tn", (_bucket(M), p, right.shape[1], mode), dt, opts)
        split = gg.tn_split_rows(cfg)  # SPLITMOE_JAX_TN_SPLIT_ROWS: the split mode, off unless set (untimed)
        if split:  # passed only when on, so a Passes.tn without the argument keeps working with it off
            kw["split_rows"] = split
        return opts.passes.tn(left, right, offsets, p=p, cfg=cfg, **kw)

    need_dgu = wants.x or wants.lora_gate_up or wants.w_gate_up or (wants.biases and b is not None)
    want_dz2 = wants.lora_down and ld is not None
    dgu = dz2 = None
    if need_dgu or wants.expert_weights or want_dz2:
        out = nn(dy, wd, off, n=I, cfg=_cfg("gemm_act_bwd", (_bucket(M), H, I, r2), dt, opts), w_t=True,
                 row_index=tok, lora_a=None if ld is None else ld[1], la_t=True, store_z=want_dz2,
                 lora_b=None if ld is None else ld[0], lb_t=True, z_scale=s, lora_scale=1.0,
                 row_scale=w_sorted,
                 mode="act_bwd", gu=gu, name="moe_dh", **act, **kw)
        dgu, dots = out[0], out[-1]
        dz2 = out[1] if want_dz2 else None
        if wants.expert_weights:
            # <o, dy> per sorted row, back to (token, slot) order by a gather with the inverse permutation
            dw = dots.sum(axis=1)[srt.inverse_M].reshape(T, K)
            if b is not None:
                # <b_d[e], dy[t]> for every (token, expert): one small [T, H]x[H, E] product and a gather, outside
                # the kernel. Fused as a row dot in the pipelined d-loop (the kernel's ROWDOT) it came out wrong on
                # the H200 with tuned gpt-oss-shape tiles (d expert_weights off by ~3σ of this term, H200
                # 2026-11-28), as the torch twin's in-loop version did before (torch_impl/kernels/split_lora.py).
                bias_TE = jnp.matmul(dy.astype(jnp.float32), b[1].astype(jnp.float32).T,
                                     precision=jax.lax.Precision.HIGHEST)
                expert_M = jnp.searchsorted(srt.offsets_E1[1:], jnp.arange(M, dtype=jnp.int32), side="right")
                dw = dw + jnp.take_along_axis(bias_TE, expert_M[srt.inverse_M].reshape(T, K), axis=1)
            g["expert_weights"] = dw.astype(w_sorted.dtype)

    if ld is not None and wants.lora_down:
        g["lora_down"] = (
            tn(gu, dz2, off, p=I, left_act=opts.activation, row_scale=w_sorted, limit=opts.limit,
               alpha=opts.alpha, name="moe_dA2", **kw).astype(ld[0].dtype),
            tn(z2, dy, off, p=r2, right_index=tok, row_scale=w_sorted, scale=s, name="moe_dB2",
               **kw).astype(ld[1].dtype))
    if wants.w_down:
        g["w_down"] = tn(gu, dy, off, p=I, left_act=opts.activation, right_index=tok,
                         row_scale=w_sorted, limit=opts.limit, alpha=opts.alpha, name="moe_dWd",
                         **kw).astype(wd.dtype)

    dz1 = None
    want_dz1 = wants.lora_gate_up and lgu is not None
    if wants.x:
        out = nn(dgu, wgu, off, n=H, cfg=_cfg("gemm", (_bucket(M), 2 * I, H, r1), dt, opts), w_t=True,
                 lora_a=None if lgu is None else lgu[1], la_t=True, store_z=want_dz1,
                 lora_b=None if lgu is None else lgu[0], lb_t=True, z_scale=s, lora_scale=1.0,
                 out_rows=srt.flat_M, name="moe_dx", **kw)
        g["x"] = out[0].reshape(T, K, H).sum(axis=1, dtype=_F32).astype(dt)
        dz1 = out[1] if want_dz1 else None
    elif want_dz1:
        # x needs no gradient (rare): dZ1 alone is a skinny N=R pass instead of the whole dx GEMM
        dz1 = nn(dgu, lgu[1], off, n=r1, cfg=_cfg("gemm", (_bucket(M), 2 * I, r1), dt, opts), w_t=True,
                 out_scale=s, name="moe_dz1", **kw)[0]
    if want_dz1:
        g["lora_gate_up"] = (
            tn(x, dz1, off, p=H, left_index=tok, name="moe_dA1", **kw).astype(lgu[0].dtype),
            tn(z1, dgu, off, p=r1, scale=s, name="moe_dB1", **kw).astype(lgu[1].dtype))
    if wants.w_gate_up:
        g["w_gate_up"] = tn(x, dgu, off, p=H, left_index=tok, name="moe_dWgu", **kw).astype(wgu.dtype)
    if b is not None and wants.biases:
        g["biases"] = (tn(None, dgu, off, p=1, name="moe_db_gate_up", **kw)[:, 0].astype(b[0].dtype),
                       tn(None, dy, off, p=1, right_index=tok, row_scale=w_sorted,
                          name="moe_db_down", **kw)[:, 0].astype(b[1].dtype))

    def pair(name, present):
        return g.get(name, (None, None)) if present else None

    return (g.get("x"), None, g.get("expert_weights"), g.get("w_gate_up"), g.get("w_down"),
            pair("lora_gate_up", lgu is not None), pair("lora_down", ld is not None), pair("biases", b is not None))


split_lora_experts.defvjp(_fwd, _bwd, symbolic_zeros=True)
