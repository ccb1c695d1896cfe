"""Backend `ragged_dot`: the routed experts with split LoRA on `jax.lax.ragged_dot`, under one `jax.custom_vjp`.

Input rows are already sorted by expert (`moe.sort_by_expert`); expert e owns the `group_sizes_E[e]` consecutive rows
after the rows of experts < e. One `group_sizes_E` drives every GEMM, base and LoRA, forward and backward:

  forward   z1 = x·A1            gu = x·Wgu + s·z1·B1 (+ bgu)     h = act(gu)
            z2 = h·A2            o  = h·Wd  + s·z2·B2 (+ bd)
  backward  dB2 = s·z2ᵀ·do       dz2 = s·do·B2ᵀ     dA2 = hᵀ·dz2     dh = do·Wdᵀ + dz2·A2ᵀ     dgu = act'(gu)·dh
            dB1 = s·z1ᵀ·dgu      dz1 = s·dgu·B1ᵀ    dA1 = xᵀ·dz1     dx = dgu·Wguᵀ + dz1·A1ᵀ

`W + s·A·B` is never formed. Row-shaped products (`x·W`, `do·Wᵀ`) are ragged-noncontracting dots; weight-shaped ones
(`zᵀ·do`) are ragged-contracting dots that return one [in, out] block per expert. Transposed weights are never
materialised: the dimension numbers contract the weight's output axis instead.

Frozen base weights cost nothing in the backward: the VJP is defined with `symbolic_zeros=True`, so it knows which
inputs are being differentiated (`perturbed`) and computes `dW` / `db` only for those. Training differentiates only
the LoRA factors (and x), so no base weight gradient is ever formed; a test that asks for `dW` gets it.

Numerics: operands are fed in the storage dtype of x (bf16 or fp32), every dot accumulates in fp32
(`preferred_element_type`), and the result of each projection is rounded once to the storage dtype, as HF's grouped
path rounds each `grouped_mm` output. Gradients come back in each input's own dtype (fp32 LoRA factors stay fp32).

On CPU, XLA lowers ragged_dot to a dense dot over a group-masked lhs (E times the FLOPs); on GPU the same, unless a
library path claims it (see shared/reference/jax-moe-on-gpu.md). It is the JAX correctness reference, not fast.

`build_expert_mlp(dot)` builds the same function (forward, custom VJP) on another implementation of the three ragged
dot forms: backend `tokamax` (`jax_impl.backends.tokamax_ragged_dot`) is this math on tokamax's grouped GEMMs.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import jax
import jax.numpy as jnp
from jax import lax

from jax_impl.backends.common import activation_fwd, activation_vjp

_F32 = jnp.float32
# [M, k] x [E, k, n] -> [M, n], the group given by the row (ragged lhs rows, one weight per group)
_ROWS = lax.RaggedDotDimensionNumbers(
    dot_dimension_numbers=(((1,), (1,)), ((), ())), lhs_ragged_dimensions=[0], rhs_group_dimensions=[0])
# [M, n] x [E, k, n] -> [M, k]: contracts the weight's output axis, i.e. times Wᵀ without transposing W
_ROWS_T = lax.RaggedDotDimensionNumbers(
    dot_dimension_numbers=(((1,), (2,)), ((), ())), lhs_ragged_dimensions=[0], rhs_group_dimensions=[0])
# [M, k] x [M, n] -> [E, k, n]: per-expert sums of outer products over that expert's rows (weight gradients)
_PER_GROUP = lax.RaggedDotDimensionNumbers(
    dot_dimension_numbers=(((0,), (0,)), ((), ())), lhs_ragged_dimensions=[0], rhs_group_dimensions=[])


# `dot(lhs, rhs, group_sizes_E, dims) -> fp32`: one ragged dot of the three forms above, operands in lhs's dtype
Dot = Callable[[jax.Array, jax.Array, jax.Array, lax.RaggedDotDimensionNumbers], jax.Array]


def _dot(lhs, rhs, group_sizes_E, dims):
    """One ragged dot with operands in lhs's dtype and fp32 accumulation/output."""
    return lax.ragged_dot_general(lhs, rhs.astype(lhs.dtype), group_sizes_E, dims, preferred_element_type=_F32)


def _forward(dot: Dot, x_MH, group_sizes_E, expert_M, w_gate_up_EH2I, w_down_EIH, lora_gate_up, lora_down, biases,
             scale, activation, limit, alpha):
    """The forward of the module docstring; returns the output and what the backward reuses."""
    cd = x_MH.dtype
    gu_M2I = dot(x_MH, w_gate_up_EH2I, group_sizes_E, _ROWS)
    z1_MR = None
    if lora_gate_up is not None:
        z1_MR = dot(x_MH, lora_gate_up[0], group_sizes_E, _ROWS).astype(cd)
        gu_M2I = gu_M2I + scale * dot(z1_MR, lora_gate_up[1], group_sizes_E, _ROWS)
    if biases is not None:
        gu_M2I = gu_M2I + biases[0][expert_M].astype(_F32)
    gu_M2I = gu_M2I.astype(cd)
    h_MI = activation_fwd(gu_M2I, activation, limit, alpha)
    o_MH = dot(h_MI, w_down_EIH, group_sizes_E, _ROWS)
    z2_MR = None
    if lora_down is not None:
        z2_MR = dot(h_MI, lora_down[0], group_sizes_E, _ROWS).astype(cd)
        o_MH = o_MH + scale * dot(z2_MR, lora_down[1], group_sizes_E, _ROWS)
    if biases is not None:
        o_MH = o_MH + biases[1][expert_M].astype(_F32)
    return o_MH.astype(cd), (z1_MR, gu_M2I, z2_MR)


def _value(p):
    return None if p is None else p.value


def _pair_value(pair):
    return None if pair is None else (pair[0].value, pair[1].value)


def _pair_perturbed(pair) -> bool:
    return pair is not None and (pair[0].perturbed or pair[1].perturbed)


@jax.tree_util.register_static
@dataclass(frozen=True)
class _Wants:
    """Which inputs are differentiated; static (pytree metadata) so the backward branches in Python, under jit."""

    x: bool
    w_gate_up: bool
    w_down: bool
    lora_gate_up: bool
    lora_down: bool
    biases: bool


def _fwd(dot: Dot, x, group_sizes, expert_M, w_gu, w_d, lora_gu, lora_d, biases, scale, activation, limit, alpha):
    # symbolic_zeros=True: differentiable args arrive as CustomVJPPrimal(value, perturbed)
    wants = _Wants(x=x.perturbed, w_gate_up=w_gu.perturbed, w_down=w_d.perturbed,
                   lora_gate_up=_pair_perturbed(lora_gu), lora_down=_pair_perturbed(lora_d),
                   biases=_pair_perturbed(biases))
    x_MH, gs_E, e_M = x.value, group_sizes.value, expert_M.value
    wgu, wd = w_gu.value, w_d.value
    lgu, ld, b = _pair_value(lora_gu), _pair_value(lora_d), _pair_value(biases)
    out_MH, (z1_MR, gu_M2I, z2_MR) = _forward(dot, x_MH, gs_E, e_M, wgu, wd, lgu, ld, b, scale, activation, limit,
                                              alpha)
    # residuals: inputs plus the two skinny LoRA activations and gu; h is recomputed from gu (cheap, elementwise)
    return out_MH, (x_MH, gs_E, e_M, wgu, wd, lgu, ld, b, z1_MR, gu_M2I, z2_MR, wants)


def _bwd(dot: Dot, scale, activation, limit, alpha, res, do_MH):
    x_MH, gs_E, e_M, wgu, wd, lgu, ld, b, z1_MR, gu_M2I, z2_MR, wants = res
    cd = x_MH.dtype
    E = wgu.shape[0]
    if isinstance(do_MH, jax.custom_derivatives.SymbolicZero):
        do_MH = jnp.zeros(do_MH.shape, do_MH.dtype)
    do_MH = do_MH.astype(cd)
    h_MI = activation_fwd(gu_M2I, activation, limit, alpha)

    # down projection
    dh_MI = dot(do_MH, wd, gs_E, _ROWS_T)
    d_lora_down = None
    if ld is not None:
        dz2_MR = (scale * dot(do_MH, ld[1], gs_E, _ROWS_T)).astype(cd)
        if wants.lora_down:
            d_lora_down = ((dot(h_MI, dz2_MR, gs_E, _PER_GROUP)).astype(ld[0].dtype),
                           (scale * dot(z2_MR, do_MH, gs_E, _PER_GROUP)).astype(ld[1].dtype))
        dh_MI = dh_MI + dot(dz2_MR, ld[0], gs_E, _ROWS_T)
    dgu_M2I = activation_vjp(gu_M2I, dh_MI.astype(cd), activation, limit, alpha)

    # gate_up projection: the same pattern one layer down
    d_lora_gate_up, dz1_MR = None, None
    if lgu is not None and (wants.x or wants.lora_gate_up):
        dz1_MR = (scale * dot(dgu_M2I, lgu[1], gs_E, _ROWS_T)).astype(cd)
        if wants.lora_gate_up:
            d_lora_gate_up = ((dot(x_MH, dz1_MR, gs_E, _PER_GROUP)).astype(lgu[0].dtype),
                              (scale * dot(z1_MR, dgu_M2I, gs_E, _PER_GROUP)).astype(lgu[1].dtype))
    dx = None
    if wants.x:
        dx_MH = dot(dgu_M2I, wgu, gs_E, _ROWS_T)
        if dz1_MR is not None:
            dx_MH = dx_MH + dot(dz1_MR, lgu[0], gs_E, _ROWS_T)
        dx = dx_MH.astype(cd)

    # base weights and biases: only when someone differentiates them (never in LoRA training)
    d_wgu = dot(x_MH, dgu_M2I, gs_E, _PER_GROUP).astype(wgu.dtype) if wants.w_gate_up else None
    d_wd = dot(h_MI, do_MH, gs_E, _PER_GROUP).astype(wd.dtype) if wants.w_down else None
    d_b = None
    if b is not None and wants.biases:
        seg = partial(jax.ops.segment_sum, segment_ids=e_M, num_segments=E, indices_are_sorted=True)
        d_b = (seg(dgu_M2I.astype(_F32)).astype(b[0].dtype), seg(do_MH.astype(_F32)).astype(b[1].dtype))
    if lgu is not None and d_lora_gate_up is None:
        d_lora_gate_up = (None, None)
    if ld is not None and d_lora_down is None:
        d_lora_down = (None, None)
    if b is not None and d_b is None:
        d_b = (None, None)
    return dx, None, None, d_wgu, d_wd, d_lora_gate_up, d_lora_down, d_b


def build_expert_mlp(dot: Dot) -> Callable:
    """`expert_mlp_sorted` (the module docstring's forward and VJP) with every ragged dot done by `dot`."""

    @partial(jax.custom_vjp, nondiff_argnums=(8, 9, 10, 11))
    def expert_mlp_sorted(x_MH: jax.Array, group_sizes_E: jax.Array, expert_M: jax.Array, w_gate_up_EH2I: jax.Array,
                          w_down_EIH: jax.Array, lora_gate_up: tuple[jax.Array, jax.Array] | None,
                          lora_down: tuple[jax.Array, jax.Array] | None, biases: tuple[jax.Array, jax.Array] | None,
                          scale: float, activation: str, swiglu_limit: float, swiglu_alpha: float) -> jax.Array:
        """Expert MLPs with split LoRA on expert-sorted rows x [M, H] -> [M, H] (before routing weights).

        `expert_M` is the expert id of each sorted row (only the biases need it). LoRA pairs are (A [E, in, R],
        B [E, R, out]); biases (b_gate_up [E, 2I], b_down [E, H]) or None.
        """
        return _forward(dot, x_MH, group_sizes_E, expert_M, w_gate_up_EH2I, w_down_EIH, lora_gate_up, lora_down,
                        biases, scale, activation, swiglu_limit, swiglu_alpha)[0]

    expert_mlp_sorted.defvjp(partial(_fwd, dot), partial(_bwd, dot), symbolic_zeros=True)
    return expert_mlp_sorted


expert_mlp_sorted = build_expert_mlp(_dot)
