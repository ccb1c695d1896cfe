"""Backend `pallas_mosaic`: the `pallas_triton` composition (jax_impl/kernels/split_lora.py: one sort, four NN
passes, ragged-contracting weight gradients, one custom_vjp) with the NN passes on a Pallas Mosaic-GPU grouped GEMM
(jax_impl/kernels/mosaic_gemm.py: TMA loads and wgmma, Hopper) and the ragged-contracting passes on the Triton
kernels, where Mosaic is the slower lowering (`shared/reference`: about 110 TF/s against Triton's 470-595 for the
weight gradient).

Same entry points as `pallas_triton` (`split_lora_experts`, the fused path, and `expert_mlp_sorted`). What the
Triton NN kernel fuses (the row gather into its loads, the epilogue arithmetic, the scatter of output rows) is XLA
around the Mosaic kernel here; see mosaic_gemm.py for why (Hopper TMA cannot gather rows).

Availability: a Hopper GPU (compute capability 9.0: the kernel is written for wgmma; Blackwell's tensor cores take
other instructions) in bf16 or fp16 (wgmma runs fp32 operands as TF32, which would break the fp32 equivalence mode:
use `pallas_triton` or `ragged_dot` for fp32), or interpret mode forced with `SPLITMOE_PALLAS_INTERPRET=1` (CPU
tests, any dtype). `auto` picks the `pallas` backend, which runs a pass on Mosaic only where the tuning tables say
it was measured faster.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jax_impl.backends import pallas_triton as _pt
from jax_impl.kernels import grouped_gemm as gg
from jax_impl.kernels import mosaic_gemm
from jax_impl.kernels import split_lora as sl

FUSED = True
PASSES = sl.Passes(nn=mosaic_gemm.grouped_gemm, tn=gg.grouped_gemm_tn)


def unavailable_reason(dtype=None) -> str | None:
    """Why this backend cannot run in this process (in `dtype`, when given), or None when it can."""
    if _pt.interpret_forced():
        try:
            mosaic_gemm.interpret_params(True)
        except ImportError as e:  # pragma: no cover - depends on the jax version
            return f"this jax has no Mosaic-GPU interpret mode ({e})"
        return None
    if jax.default_backend() != "gpu":
        return (f"needs a Hopper GPU (sm_90); jax's default backend is {jax.default_backend()!r} (set "
                f"{_pt.INTERPRET_ENV}=1 to run the kernels in Pallas interpret mode, for tests)")
    dev = jax.devices()[0]
    cc = getattr(dev, "compute_capability", None)
    if cc is None or str(cc) not in ("9.0", "90"):
        return f"{dev.device_kind} (compute capability {cc}): the Mosaic-GPU kernel is written for Hopper (9.0)"
    if dtype is not None and jnp.dtype(dtype) == jnp.float32:
        return "wgmma computes fp32 operands as TF32; use bfloat16/float16, or pallas_triton / ragged_dot in fp32"
    return None


def split_lora_experts(x: jax.Array, expert_ids: jax.Array, expert_weights: jax.Array, w_gate_up: jax.Array,
                       w_down: jax.Array, lora_gate_up=None, lora_down=None, *, scale: float = 1.0, biases=None,
                       activation: str = "swiglu", swiglu_limit: float = 7.0,
                       swiglu_alpha: float = 1.702) -> jax.Array:
    """Fused routed experts -> y [T, H]; shapes as `jax_impl.moe.split_lora_experts`."""
    reason = unavailable_reason(x.dtype)
    if reason:
        raise RuntimeError(f"MoE backend 'pallas_mosaic' cannot run here: {reason}")
    return _pt.split_lora_experts(x, expert_ids, expert_weights, w_gate_up, w_down, lora_gate_up, lora_down,
                                  scale=scale, biases=biases, activation=activation, swiglu_limit=swiglu_limit,
                                  swiglu_alpha=swiglu_alpha, passes=PASSES)


def expert_mlp_sorted(x_MH: jax.Array, group_sizes_E: jax.Array, expert_M: jax.Array, w_gate_up_EH2I: jax.Array,
                      w_down_EIH: jax.Array, lora_gate_up, lora_down, biases, scale: float, activation: str,
                      swiglu_limit: float, swiglu_alpha: float) -> jax.Array:
    """The `ragged_dot` backend's interface (sorted rows [M, H] -> [M, H] before routing weights)."""
    reason = unavailable_reason(x_MH.dtype)
    if reason:
        raise RuntimeError(f"MoE backend 'pallas_mosaic' cannot run here: {reason}")
    return _pt.expert_mlp_sorted(x_MH, group_sizes_E, expert_M, w_gate_up_EH2I, w_down_EIH, lora_gate_up, lora_down,
                                 biases, scale, activation, swiglu_limit, swiglu_alpha, passes=PASSES)
