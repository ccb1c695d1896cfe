"""`triton` backend: the routed experts with split LoRA on the project's fused Triton kernels (`torch_impl.kernels`).

Shapes: T tokens, H hidden, I expert intermediate, E experts, K experts per token, R LoRA rank, M = T·K routed rows.
Same interface as `native` and `grouped_mm`: `available(device, dtype)` and `experts_forward(...) -> y [T, H]`.
What the kernels fuse and what the backward saves is described in `torch_impl/kernels/split_lora.py`.

Where it runs: CUDA (sm80+; bf16, fp16, fp32 with IEEE dots), and CPU only through the Triton interpreter
(TRITON_INTERPRET=1, set before `torch_impl.kernels` is first imported; slow, for tests; its bf16 dot is wrong, so
CPU accepts fp32 and fp16 only). The kernels are imported on first use, not when the backend registry is imported, so
choosing the interpreter later in a process still works as long as nothing ran the kernels before.
"""

from __future__ import annotations

import importlib.util
import os

import torch

from torch_impl.backends.common import Activation, ExpertSort

NAME = "triton"
# LoRA factors may arrive as fp32 masters: the Function casts them once for the kernels and returns their gradients
# in fp32 from the fp32 accumulators of the ragged-K kernels (torch_impl.moe skips its own cast for this backend).
TAKES_FP32_LORA = True
_SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def available(device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> str | None:
    """None when the Triton kernels run on `device` in `dtype` (defaults: cpu, bfloat16), else the reason."""
    if importlib.util.find_spec("triton") is None:
        return "triton is not installed (pip install -e '.[torch]')"
    device = torch.device(device or "cpu")
    dtype = dtype or torch.bfloat16
    if dtype not in _SUPPORTED_DTYPES:
        return f"the Triton kernels support float32, bfloat16 and float16, not {dtype}"
    if device.type == "cuda":
        if not torch.cuda.is_available():
            return "CUDA is not available"
        cap = torch.cuda.get_device_capability(device)
        if cap < (8, 0):
            return f"the Triton kernels need CUDA compute capability >= 8.0, this GPU has {cap[0]}.{cap[1]}"
        return None
    if device.type == "cpu":
        if os.environ.get("TRITON_INTERPRET", "0") != "1":
            return "on CPU the Triton kernels run only in the interpreter: set TRITON_INTERPRET=1 (slow; for tests)"
        if dtype == torch.bfloat16:
            return "the Triton interpreter's bf16 dot is wrong; use float32 or float16 on CPU"
        return None
    return f"no Triton support for device type {device.type!r}"


def residual_shapes(x_TH: torch.Tensor, expert_ids_TK: torch.Tensor, w_down: torch.Tensor,
                    lora_gate_up_a: torch.Tensor | None, lora_down_a: torch.Tensor | None) -> list[tuple[int, ...]]:
    """What the kernels' Function saves beyond its inputs (`common.op_residuals`), as the custom op's fake gives
    it: gu [M, 2I], z1 [M, R1] and z2 [M, R2] (each only with its LoRA pair), in x's dtype."""
    M = expert_ids_TK.shape[0] * expert_ids_TK.shape[1]
    return [(M, 2 * w_down.shape[1])] + [(M, a.shape[-1]) for a in (lora_gate_up_a, lora_down_a) if a is not None]


def experts_forward(x_TH, weights_TK, srt: ExpertSort, w_gate_up, w_down, lora_gate_up, lora_down, scale: float,
                    biases, act: Activation, output_unread: bool = False) -> torch.Tensor:
    """Routed experts with split LoRA -> y [T, H], reusing the caller's sort (`torch_impl.moe.sort_by_expert`);
    `output_unread`: only the backward's residuals are needed (`split_lora.split_lora_experts`)."""
    from torch_impl.kernels import split_lora  # deferred: kernels are decorated (and TRITON_INTERPRET read) here

    return split_lora.split_lora_experts(
        x_TH, None, weights_TK, w_gate_up, w_down, lora_gate_up, lora_down, scale=scale, biases=biases,
        activation=act.name, swiglu_limit=act.limit, swiglu_alpha=act.alpha,
        sort=split_lora.KernelSort.from_expert_sort(srt), output_unread=output_unread)


def experts_backward(dy_TH, x_TH, weights_TK, srt: ExpertSort, w_gate_up, w_down, lora_gate_up, lora_down,
                     scale: float, biases, act: Activation, residuals: list[torch.Tensor],
                     needs_grad: list[bool], kernels: str = "triton") -> list[torch.Tensor | None]:
    """The gradients of `experts_forward`'s differentiable inputs (x, weights, w_gate_up, w_down, A1, B1, A2, B2,
    b_gate_up, b_down; None where `needs_grad` is False) from dy and the residuals its Function saved
    (`common.op_residuals`), without its forward: the custom op's backward (`torch_impl.moe_op`). Needs T > 0.
    `kernels`: the NN kernel family that ran the forward ("hopper" for the `triton_hopper` backend)."""
    from torch_impl.kernels import split_lora

    a1, b1 = lora_gate_up if lora_gate_up is not None else (None, None)
    a2, b2 = lora_down if lora_down is not None else (None, None)
    b_gu, b_d = biases if biases is not None else (None, None)
    return split_lora.backward_from_residuals(
        dy_TH, x_TH, weights_TK, w_gate_up, w_down, a1, b1, a2, b2, b_gu, b_d,
        split_lora.KernelSort.from_expert_sort(srt), residuals, scale, act.name, act.limit, act.alpha,
        kernels, needs_input_grad=needs_grad)

