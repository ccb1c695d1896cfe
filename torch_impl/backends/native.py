"""`native` backend: a Python loop over experts with plain autograd; reference-grade, runs on any device and dtype.

Shapes: T tokens, H hidden, I expert intermediate, E experts, K experts per token, R LoRA rank, M = T·K routed rows.

Rows are gathered once in expert order (`ExpertSort`); each expert with rows computes
`gu = x@Wgu + s·(x@A1)@B1 (+ bgu)`, `h = act(gu)`, `o = h@Wd + s·(h@A2)@B2 (+ bd)` on its slice, base and LoRA on
the same rows. The routing-weight multiply and the sum over K happen once, after the loop: weight the sorted rows,
gather them back to [T, K, H] and sum over K (HF's grouped_mm order and rounding; no atomics, so deterministic).
Autograd computes no weight gradient for a frozen base weight (requires_grad False).
"""

from __future__ import annotations

import torch

from torch_impl.backends.common import Activation, ExpertSort

NAME = "native"


def available(device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> str | None:
    """None: runs everywhere torch runs."""
    return None


def gather_rows(x_TH: torch.Tensor, srt: ExpertSort) -> torch.Tensor:
    """x [T, H] -> x_sorted [M, H]. Expand-then-permute rather than `x[token_M]`: the backward of a gather with
    repeated indices is an atomic index_add on CUDA (run-to-run different in fp32); this one is a sum over K plus a
    permutation, both deterministic."""
    T, H = x_TH.shape
    return x_TH.unsqueeze(1).expand(T, srt.top_k, H).reshape(T * srt.top_k, H)[srt.order_M]


def combine_rows(o_MH: torch.Tensor, weights_TK: torch.Tensor, srt: ExpertSort) -> torch.Tensor:
    """Sorted expert outputs [M, H] -> y [T, H] = Σ_k w[t,k]·o[t,k]: weight, un-permute, sum over K (HF order)."""
    w_M = weights_TK.reshape(-1)[srt.order_M]
    y_MH = (o_MH * w_M.unsqueeze(-1))[srt.inverse_M]
    return y_MH.view(srt.num_tokens, srt.top_k, -1).sum(dim=1)


def experts_forward(x_TH, weights_TK, srt: ExpertSort, w_gate_up, w_down, lora_gate_up, lora_down, scale: float,
                    biases, act: Activation, output_unread: bool = False) -> torch.Tensor:
    """Routed experts with split LoRA -> y [T, H]; see the module docstring. `output_unread` is ignored: plain
    autograd saves what each op needs, and the down GEMM's graph is the way back to h, so nothing can be skipped."""
    x_MH = gather_rows(x_TH, srt)
    sizes = srt.group_sizes_E.tolist()  # the loop needs group sizes on the host: one sync per layer
    outs, start = [], 0
    for e, n in enumerate(sizes):
        if n == 0:
            continue
        xe = x_MH[start:start + n]
        start += n
        gu = xe @ w_gate_up[e]
        if lora_gate_up is not None:
            gu = gu + scale * ((xe @ lora_gate_up[0][e]) @ lora_gate_up[1][e])
        if biases is not None:
            gu = gu + biases[0][e]
        h = act(gu)
        o = h @ w_down[e]
        if lora_down is not None:
            o = o + scale * ((h @ lora_down[0][e]) @ lora_down[1][e])
        if biases is not None:
            o = o + biases[1][e]
        outs.append(o)
    o_MH = torch.cat(outs) if outs else x_MH.new_zeros(0, w_down.shape[-1])
    return combine_rows(o_MH, weights_TK, srt)
