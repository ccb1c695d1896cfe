"""MoE expert backends for jax_impl and their selection.

Every backend provides `expert_mlp_sorted(x_MH, group_sizes_E, expert_M, w_gate_up, w_down, lora_gate_up,
lora_down, biases, scale, activation, swiglu_limit, swiglu_alpha) -> out_MH` on expert-sorted rows, with a VJP that
computes base-weight gradients only when they are differentiated.

`resolve_backend(name)` turns "auto" (or an explicit name) into a backend that runs here (an explicit name beats the
`SPLITMOE_MOE_BACKEND` environment variable, which beats auto), and raises a clear error (BackendUnavailable: a
ConfigError and a RuntimeError) for one that cannot run, before any work.
"""

from __future__ import annotations

import os
from collections.abc import Callable

import jax

from shared_math.train_config import BackendUnavailable

ENV_VAR = "SPLITMOE_MOE_BACKEND"

# name -> what it is. Order is the preference of "auto" (fastest first) among those that can run: `pallas` takes
# the measured lowering per pass (pallas_triton wherever nothing was measured); the single-lowering backends are
# there to force one.
BACKENDS: dict[str, str] = {
    "pallas": "Pallas grouped GEMMs, per NN pass the lowering measured faster (Triton or Mosaic GPU); CUDA sm80+",
    "pallas_triton": "Pallas grouped GEMMs, Triton lowering (CUDA sm80+; interpret=True on CPU)",
    "pallas_mosaic": "NN passes on a Pallas Mosaic-GPU grouped GEMM, weight gradients on Triton (Hopper; bf16/fp16)",
    "ragged_dot": "jax.lax.ragged_dot under custom_vjp; the JAX reference (any device; dense and slow on GPU)",
    # last: not measured against the others yet, so auto does not pick it (benchmarks/moe_block.py --impls jax_tokamax)
    "tokamax": "ragged_dot's math on tokamax.ragged_dot (Mosaic-GPU grouped GEMM on Hopper, Triton on other CUDA, "
               "XLA on CPU); needs the tokamax package",
}


def _unavailable_reason(name: str, dtype=None) -> str | None:
    """Why `name` cannot run in this process (in `dtype`, when given), or None when it can."""
    if name == "ragged_dot":
        return None
    if name in ("pallas", "pallas_triton"):  # `pallas` needs the Triton lowering for every pass it does not move
        from jax_impl.backends.pallas_triton import unavailable_reason

        return unavailable_reason()
    if name == "pallas_mosaic":
        from jax_impl.backends.pallas_mosaic import unavailable_reason

        return unavailable_reason(dtype)
    if name == "tokamax":
        from jax_impl.backends.tokamax_ragged_dot import unavailable_reason

        return unavailable_reason(dtype)
    return f"unknown MoE backend {name!r}; known: {', '.join(BACKENDS)} or 'auto'"


def available_backends() -> list[str]:
    """Backends that can run here, in `auto`'s order of preference."""
    return [n for n in BACKENDS if _unavailable_reason(n) is None]


def why_unavailable(name: str, device=None, dtype=None) -> str | None:
    """Why backend `name` cannot run here (None when it can); `dtype` matters to pallas_mosaic (no fp32 on the GPU),
    `device` is accepted for symmetry with torch_impl."""
    return _unavailable_reason(name, dtype)


def resolve_backend(name: str = "auto", *, device=None, dtype=None) -> str:
    """The backend to use. Precedence: an explicit `name` > `$SPLITMOE_MOE_BACKEND` > auto (the fastest that runs
    here), as in torch_impl. Raises ValueError (unknown name) or BackendUnavailable (cannot run here; a RuntimeError)
    with the reason and the backends that do run.
    """
    env = os.environ.get(ENV_VAR, "").strip()
    chosen, src = (name, "moe_backend") if name != "auto" else ((env, f"${ENV_VAR}") if env else ("auto", ""))
    if chosen == "auto":
        return available_backends()[0]
    if chosen not in BACKENDS:
        raise ValueError(f"{src}={chosen!r} is not a jax MoE backend; known: {', '.join(BACKENDS)} or 'auto'")
    reason = why_unavailable(chosen, device, dtype)
    if reason is not None:
        raise BackendUnavailable(f"MoE backend {chosen!r} cannot run on {jax.default_backend()}: {reason}. Available "
                                 f"here: {', '.join(available_backends())} (set model.moe_backend to one of them, or "
                                 "to auto)")
    return chosen


def get_backend(name: str) -> Callable:
    """The `expert_mlp_sorted` function of a resolved backend name."""
    if name == "ragged_dot":
        from jax_impl.backends.ragged_dot import expert_mlp_sorted

        return expert_mlp_sorted
    if name == "pallas":
        from jax_impl.backends.pallas import expert_mlp_sorted

        return expert_mlp_sorted
    if name == "pallas_triton":
        from jax_impl.backends.pallas_triton import expert_mlp_sorted

        return expert_mlp_sorted
    if name == "pallas_mosaic":
        from jax_impl.backends.pallas_mosaic import expert_mlp_sorted

        return expert_mlp_sorted
    if name == "tokamax":
        from jax_impl.backends.tokamax_ragged_dot import expert_mlp_sorted

        return expert_mlp_sorted
    raise RuntimeError(f"MoE backend {name!r} cannot run here: {_unavailable_reason(name) or 'not wired in'}")
