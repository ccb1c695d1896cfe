"""`triton_hopper` backend: the `triton` backend's split-LoRA Function with its four NN grouped GEMMs on the persistent
TMA kernel (`torch_impl/kernels/hopper.py`); the ragged-K gradient kernels are the `triton` backend's.

Shapes: T tokens, H hidden, I expert intermediate, E experts, K experts per token, R LoRA rank, M = T·K routed rows.
Same interface as the other backends: `available(device, dtype)` and `experts_forward(...) -> y [T, H]`.

`auto`'s first choice on a Hopper GPU in bf16/fp16 (faster than `triton` in whole steps on an H100,
benchmarks/REPORT.md, 2026-12-05 session 4); `moe_backend=triton` keeps the older kernels. Runs on CUDA sm_90+
(Hopper and newer: TMA tensor descriptors) with a Triton that has `tl.make_tensor_descriptor` (3.4+), and on CPU only
through the Triton interpreter (tests; fp32 and fp16, as `triton`).
"""

from __future__ import annotations

import torch

from torch_impl.backends import triton as _triton
from torch_impl.backends.common import Activation, ExpertSort

NAME = "triton_hopper"
TAKES_FP32_LORA = True  # as `triton`: the Function casts fp32 LoRA masters itself
residual_shapes = _triton.residual_shapes  # the same Function, so the same residuals (common.op_residuals)


def available(device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> str | None:
    """None when the Hopper kernels run on `device` in `dtype` (defaults: cpu, bfloat16), else the reason."""
    reason = _triton.available(device, dtype)
    if reason is not None:
        return reason
    import triton  # installed: `triton.available` checked it
    import triton.language as tl

    if not hasattr(tl, "make_tensor_descriptor"):
        return f"triton {triton.__version__} has no tl.make_tensor_descriptor (the Hopper kernels need 3.4+)"
    device = torch.device(device or "cpu")
    if device.type == "cuda":
        cap = torch.cuda.get_device_capability(device)
        if cap < (9, 0):
            return (f"the Hopper kernels need TMA (compute capability >= 9.0), this GPU has {cap[0]}.{cap[1]}; "
                    "use moe_backend=triton")
    return None


def experts_forward(x_TH, weights_TK, srt: ExpertSort, w_gate_up, w_down, lora_gate_up, lora_down, scale: float,
                    biases, act: Activation, output_unread: bool = False) -> torch.Tensor:
    """Routed experts with split LoRA -> y [T, H], reusing the caller's sort (`torch_impl.moe.sort_by_expert`);
    `output_unread`: only the backward's residuals are needed (`split_lora.split_lora_experts`)."""
    from torch_impl.kernels import split_lora  # deferred: kernels are decorated (and TRITON_INTERPRET read) here

    return split_lora.split_lora_experts(
        x_TH, None, weights_TK, w_gate_up, w_down, lora_gate_up, lora_down, scale=scale, biases=biases,
        activation=act.name, swiglu_limit=act.limit, swiglu_alpha=act.alpha,
        sort=split_lora.KernelSort.from_expert_sort(srt), kernels="hopper", output_unread=output_unread)


def experts_backward(dy_TH, x_TH, weights_TK, srt: ExpertSort, w_gate_up, w_down, lora_gate_up, lora_down,
                     scale: float, biases, act: Activation, residuals: list[torch.Tensor],
                     needs_grad: list[bool]) -> list[torch.Tensor | None]:
    """`triton.experts_backward` on the Hopper kernels (the custom op's backward, `torch_impl.moe_op`)."""
    return _triton.experts_backward(dy_TH, x_TH, weights_TK, srt, w_gate_up, w_down, lora_gate_up, lora_down, scale,
                                    biases, act, residuals, needs_grad, kernels="hopper")
