"""Expert backends and their selection.

`BACKENDS` lists the backends in order of preference (fastest first); `resolve_backend` turns a requested name into
one that runs here, or raises before any work starts. Precedence: an explicit name (argument or config) wins; `auto`
defers to the `SPLITMOE_MOE_BACKEND` environment variable when it is set, and otherwise picks the first backend in
`BACKENDS` that is available for the device and dtype.

Each backend module provides `available(device, dtype) -> str | None` (None, or why it cannot run) and
`experts_forward(x_TH, weights_TK, srt, w_gate_up, w_down, lora_gate_up, lora_down, scale, biases, act,
output_unread=False) -> y_TH` (`output_unread`: see `torch_impl.moe.split_lora_experts`).
A backend whose autograd Function saves residuals (grouped_mm, triton, triton_hopper) also gives their shapes,
`residual_shapes(x_TH, expert_ids_TK, w_down, lora_gate_up_a, lora_down_a)`, so that the custom op keeps them for its
backward instead of recomputing the forward (`common.op_residuals`, `torch_impl.moe_op`).
"""

from __future__ import annotations

import os
from types import ModuleType

import torch

from shared_math.train_config import BackendUnavailable, ConfigError
from torch_impl.backends import grouped_mm, native, triton, triton_hopper

ENV_VAR = "SPLITMOE_MOE_BACKEND"
_MODULES: dict[str, ModuleType] = {"grouped_mm": grouped_mm, "native": native, "triton": triton,
                                   "triton_hopper": triton_hopper}
# Preference order for `auto`: on a Hopper GPU (sm_90+) in bf16/fp16 the persistent TMA kernels (`triton_hopper`: in
# whole training steps on an H100, same call, 2026-12-05, 5-15% faster than `triton` on Qwen3-30B-A3B at 4K/16K and
# 12% on gpt-oss-20b at 4K, same peak memory; benchmarks/REPORT.md), elsewhere on CUDA the fused Triton kernels
# (tuned on the H200; fastest and leanest there from T=4096 up), then torch._grouped_mm, then the per-expert loop.
# On CPU the Triton backends run only in the interpreter (tests), so `auto` never picks them there, nor in fp32
# (IEEE fp32 dots: for equivalence runs).
BACKENDS: tuple[str, ...] = ("triton_hopper", "triton", "grouped_mm", "native")
_CUDA_HALF_ONLY = ("triton", "triton_hopper")


def as_device(device: torch.device | str | None) -> torch.device:
    """`device` (a `--device` string such as cpu, cuda, cuda:1) as a torch.device; a ConfigError naming it when
    torch cannot parse it (torch's own RuntimeError would reach the user as a traceback)."""
    try:
        return torch.device(device or "cpu")
    except (RuntimeError, TypeError, ValueError):
        raise ConfigError(f"device {device!r} is not a torch device: give cpu, cuda or cuda:N (e.g. --device "
                          "cuda:1)") from None


def _auto_allows(name: str, device: torch.device | str | None, dtype: torch.dtype | None) -> bool:
    if name not in _CUDA_HALF_ONLY:
        return True
    return as_device(device).type == "cuda" and dtype in (torch.bfloat16, torch.float16)


def get_backend(name: str) -> ModuleType:
    """The backend module for a resolved name."""
    if name not in _MODULES:
        raise ValueError(f"unknown MoE backend {name!r}; known: {', '.join(BACKENDS)} (or 'auto')")
    return _MODULES[name]


def why_unavailable(name: str, device: torch.device | str | None = None,
                    dtype: torch.dtype | None = None) -> str | None:
    """None if backend `name` runs on `device` in `dtype`, else the reason."""
    return get_backend(name).available(device, dtype)


def resolve_backend(name: str = "auto", *, device: torch.device | str | None = None,
                    dtype: torch.dtype | None = None) -> str:
    """The backend to use for `name` on `device` in `dtype` (defaults: cpu, float32 for the check).

    Raises ValueError for an unknown name and BackendUnavailable (a ConfigError and a RuntimeError), naming the
    reason and what is available, for a backend that cannot run here.
    """
    source = "requested"
    device = None if device is None else as_device(device)  # a malformed --device is named before anything else
    if name in (None, "", "auto"):
        env = os.environ.get(ENV_VAR, "").strip()
        if env and env != "auto":
            name, source = env, f"set by the environment variable {ENV_VAR}"
        else:
            for candidate in BACKENDS:
                if _auto_allows(candidate, device, dtype) and why_unavailable(candidate, device, dtype) is None:
                    return candidate
            raise BackendUnavailable(f"no MoE backend runs on {device or 'cpu'} in {dtype}")  # native always runs
    if name not in _MODULES:
        raise ValueError(f"unknown MoE backend {name!r} ({source}); known: {', '.join(BACKENDS)} or 'auto'")
    reason = why_unavailable(name, device, dtype)
    if reason is not None:
        ok = [b for b in BACKENDS if why_unavailable(b, device, dtype) is None]
        raise BackendUnavailable(f"MoE backend {name!r} ({source}) cannot run on {device or 'cpu'} in {dtype}: "
                                 f"{reason}. Available here: {', '.join(ok)} (set model.moe_backend to one of them, "
                                 "or to auto)")
    return name


__all__ = ["BACKENDS", "ENV_VAR", "as_device", "get_backend", "resolve_backend", "why_unavailable"]
