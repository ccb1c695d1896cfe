"""Backend `pallas` (what `auto` picks where the Pallas kernels run): the split-LoRA composition of
jax_impl/kernels/split_lora.py with each NN pass on the lowering measured faster for that pass's shape on this
device kind, the per-pass choice of issue 7. The choice is `BlockConfig.impl` in the tuning tables (autotune.py),
written by benchmarks/pallas_sweep.py, which times every NN launch on both lowerings: "mosaic" runs the Mosaic-GPU
GEMM (mosaic_gemm.py), anything else, and every pass where Mosaic cannot run (not Hopper, fp32), the Triton kernel.
The weight gradients always run on Triton. Where a table has no "mosaic" entry for a pass this is exactly
`pallas_triton`; the shipped table has one, measured on the H200: gpt-oss's dh pass (act_bwd at I=2880), where
Mosaic took 4.05 ms against Triton's best 5.94 (benchmarks/REPORT.md, session 4).

Same entry points and availability as `pallas_triton` (it needs the Triton lowering for every pass it does not move).
"""

from __future__ import annotations

import jax

from jax_impl.backends import pallas_mosaic as _pm
from jax_impl.backends import pallas_triton as _pt
from jax_impl.kernels import grouped_gemm as gg
from jax_impl.kernels import mosaic_gemm
from jax_impl.kernels import split_lora as sl

FUSED = True
unavailable_reason = _pt.unavailable_reason


def per_pass_nn(a: jax.Array, *args, cfg, **kwargs):
    """One NN pass on the lowering its config names (decided at trace time; both take grouped_gemm's arguments)."""
    if cfg.impl == "mosaic" and _pm.unavailable_reason(a.dtype) is None:
        return mosaic_gemm.grouped_gemm(a, *args, cfg=cfg, **kwargs)
    return gg.grouped_gemm(a, *args, cfg=cfg, **kwargs)


PASSES = sl.Passes(nn=per_pass_nn, tn=gg.grouped_gemm_tn)


def split_lora_experts(x: jax.Array, expert_ids: jax.Array, expert_weights: jax.Array, w_gate_up: jax.Array,
                       w_down: jax.Array, lora_gate_up=None, lora_down=None, *, scale: float = 1.0, biases=None,
                       activation: str = "swiglu", swiglu_limit: float = 7.0,
                       swiglu_alpha: float = 1.702) -> jax.Array:
    """Fused routed experts -> y [T, H]; shapes as `jax_impl.moe.split_lora_experts`."""
    return _pt.split_lora_experts(x, expert_ids, expert_weights, w_gate_up, w_down, lora_gate_up, lora_down,
                                  scale=scale, biases=biases, activation=activation, swiglu_limit=swiglu_limit,
                                  swiglu_alpha=swiglu_alpha, passes=PASSES)


def expert_mlp_sorted(x_MH: jax.Array, group_sizes_E: jax.Array, expert_M: jax.Array, w_gate_up_EH2I: jax.Array,
                      w_down_EIH: jax.Array, lora_gate_up, lora_down, biases, scale: float, activation: str,
                      swiglu_limit: float, swiglu_alpha: float) -> jax.Array:
    """The `ragged_dot` backend's interface (sorted rows [M, H] -> [M, H] before routing weights)."""
    return _pt.expert_mlp_sorted(x_MH, group_sizes_E, expert_M, w_gate_up_EH2I, w_down_EIH, lora_gate_up, lora_down,
                                 biases, scale, activation, swiglu_limit, swiglu_alpha, passes=PASSES)
