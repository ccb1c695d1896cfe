"""Backend `pallas_triton`: the routed experts with split LoRA on the project's Pallas kernels, Triton lowering.

Two entry points over the same kernels (jax_impl/kernels/):
- `split_lora_experts(x [T, H], expert_ids, expert_weights [T, K], ...)`: the fused path, same arguments as
  `jax_impl.moe.split_lora_experts` (minus `backend`). The gather of x rows is fused into the first GEMM's load and
  the routing-weight multiply into the last GEMM's epilogue, which stores rows in (token, slot) order for a
  deterministic sum over K. This is the fast path; `moe.split_lora_experts` should call it when the backend module
  has it (`FUSED = True`).
- `expert_mlp_sorted(x_MH, group_sizes_E, expert_M, ...)`: the backend interface shared with `ragged_dot`
  (rows already sorted by expert, output before routing weights). It runs the same custom_vjp with K = 1, unit
  weights and the already-sorted ids (the stable sort is then the identity), so every jax backend is
  interchangeable under `moe.split_lora_experts(..., backend="pallas_triton")`.

Availability: a CUDA GPU with compute capability >= 8.0 (the Triton lowering's floor), or interpret mode forced with
`SPLITMOE_PALLAS_INTERPRET=1` (CPU tests: the kernels run through Pallas' interpreter, slowly).
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp

from jax_impl.kernels import split_lora as sl

INTERPRET_ENV = "SPLITMOE_PALLAS_INTERPRET"
FUSED = True
TRITON_PASSES = sl.Passes()  # every pass on the Triton kernels


def interpret_forced() -> bool:
    return os.environ.get(INTERPRET_ENV, "0") == "1"


def unavailable_reason() -> str | None:
    """Why this backend cannot run in this process, or None when it can."""
    if interpret_forced():
        return None
    try:
        from jax.experimental.pallas import triton  # noqa: F401
    except ImportError as e:  # pragma: no cover - depends on the jax build
        return f"this jax has no Pallas Triton lowering ({e})"
    if jax.default_backend() != "gpu":
        return (f"needs a CUDA GPU (sm80+); jax's default backend is {jax.default_backend()!r} "
                f"(set {INTERPRET_ENV}=1 to run the kernels in Pallas interpret mode, for tests)")
    dev = jax.devices()[0]
    cc = getattr(dev, "compute_capability", None)
    if cc is None:
        return f"device {dev.device_kind!r} is not a CUDA GPU (the Triton lowering targets NVIDIA sm80+)"
    if float(cc) < 8.0:
        return f"{dev.device_kind} has compute capability {cc}; the Pallas Triton lowering needs 8.0 or newer"
    return None


def _options(scale, activation, swiglu_limit, swiglu_alpha, passes: sl.Passes) -> sl.Options:
    return sl.Options(scale=float(scale), activation=activation, limit=float(swiglu_limit),
                      alpha=float(swiglu_alpha), interpret=interpret_forced(), passes=passes)


def split_lora_experts(x: jax.Array, expert_ids: jax.Array, expert_weights: jax.Array, w_gate_up: jax.Array,
                       w_down: jax.Array, lora_gate_up=None, lora_down=None, *, scale: float = 1.0, biases=None,
                       activation: str = "swiglu", swiglu_limit: float = 7.0, swiglu_alpha: float = 1.702,
                       passes: sl.Passes = TRITON_PASSES) -> jax.Array:
    """Fused routed experts -> y [T, H] (see the module docstring); shapes as `jax_impl.moe.split_lora_experts`.
    `passes`: the kernel of each pass (the `pallas_mosaic` backend swaps in its NN GEMM)."""
    if activation not in ("swiglu", "swiglu_oai"):
        raise ValueError(f"unknown activation {activation!r}; expected 'swiglu' or 'swiglu_oai'")
    return sl.split_lora_experts(
        x, expert_ids.astype(jnp.int32), expert_weights, w_gate_up, w_down,
        None if lora_gate_up is None else tuple(lora_gate_up), None if lora_down is None else tuple(lora_down),
        None if biases is None else tuple(biases), _options(scale, activation, swiglu_limit, swiglu_alpha, passes))


def expert_mlp_sorted(x_MH: jax.Array, group_sizes_E: jax.Array, expert_M: jax.Array, w_gate_up_EH2I: jax.Array,
                      w_down_EIH: jax.Array, lora_gate_up, lora_down, biases, scale: float, activation: str,
                      swiglu_limit: float, swiglu_alpha: float, passes: sl.Passes = TRITON_PASSES) -> jax.Array:
    """The `ragged_dot` backend's interface: expert-sorted rows [M, H] -> [M, H] before routing weights.

    `group_sizes_E` is implied by the sorted `expert_M` (the kernels re-derive the offsets from it).
    """
    del group_sizes_E
    ones_M1 = jnp.ones((x_MH.shape[0], 1), x_MH.dtype)  # a constant: no d expert_weights pass is traced
    return split_lora_experts(x_MH, expert_M[:, None], ones_M1, w_gate_up_EH2I, w_down_EIH, lora_gate_up, lora_down,
                              scale=scale, biases=biases, activation=activation, swiglu_limit=swiglu_limit,
                              swiglu_alpha=swiglu_alpha, passes=passes)
