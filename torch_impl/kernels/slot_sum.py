"""The sum over a token's K expert slots, y[t] = Σ_k out[t·K + k], as one bandwidth-bound Triton launch.

The routed-experts path writes its per-slot rows in (token, slot) order, [M = T·K, H], and reduces them over K twice
a layer (the forward's y and the backward's dx; `split_lora.py`). `out.view(T, K, H).sum(1)` does that in torch's
generic reduce kernel, which reduces over the strided middle axis: in the 16K Qwen3-30B step profile of session 15
(H100, `benchmarks/results/session15_2026-12-06/call1_profile_qwen3_L24_16k.txt`) its 48 launches took 10.7 ms,
223 µs each for 268 MB read, about 1.2 TB/s of the card's 3.35.

Here each program owns a [BLOCK_T tokens, BLOCK_H columns] tile, reads its K slot rows (contiguous, vector loads)
and adds them in fp32 in slot order k = 0..K-1, then rounds once to the output dtype, as torch's sum does (fp32
accumulation for bf16/fp16): the same value up to the order of an fp32 sum of K terms. Opt-in until timed on the
GPU: SPLITMOE_SLOT_SUM=triton (`benchmarks/glue_bench.py`'s `slot_sum` rows time both).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from torch_impl.kernels.launch import launch

BLOCK_T, BLOCK_H, NUM_WARPS = 8, 512, 4  # 8 x 512 bf16 = 8 KiB per slot row block: 16-byte loads on every lane


def enabled() -> bool:
    """Whether split_lora's K-sums run here (SPLITMOE_SLOT_SUM=triton) rather than in torch's reduce (default)."""
    mode = os.environ.get("SPLITMOE_SLOT_SUM", "torch")
    if mode not in ("torch", "triton"):
        raise ValueError(f"SPLITMOE_SLOT_SUM={mode!r}: expected 'torch' (torch's reduce, the default) or 'triton'")
    return mode == "triton"


@triton.jit
def _slot_sum_kernel(x_ptr, y_ptr, T, H, K: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_H: tl.constexpr):
    pid_t = tl.program_id(0)
    pid_h = tl.program_id(1)
    offs_t = (pid_t * BLOCK_T + tl.arange(0, BLOCK_T)).to(tl.int64)  # T·K·H passes 2^31 at real sizes
    offs_h = pid_h * BLOCK_H + tl.arange(0, BLOCK_H)
    mask = (offs_t < T)[:, None] & (offs_h < H)[None, :]
    src = x_ptr + (offs_t * K)[:, None] * H + offs_h[None, :]
    acc = tl.zeros([BLOCK_T, BLOCK_H], dtype=tl.float32)
    for k in tl.static_range(K):  # slot order: a fixed sum, the same bits every run
        acc += tl.load(src + k * H, mask=mask, other=0.0).to(tl.float32)
    tl.store(y_ptr + offs_t[:, None] * H + offs_h[None, :], acc.to(y_ptr.dtype.element_ty), mask=mask)


def slot_sum(out_MH: torch.Tensor, K: int) -> torch.Tensor:
    """y [T, H] = out_MH.view(T, K, H).sum(1) for a contiguous out_MH [T·K, H] of rows in (token, slot) order."""
    M, H = out_MH.shape
    if M % K:
        raise ValueError(f"slot_sum: {M} rows are not a whole number of tokens of K={K} slots")
    if not out_MH.is_contiguous():
        raise ValueError("slot_sum: out_MH must be contiguous (rows in (token, slot) order, H innermost)")
    T = M // K
    y = torch.empty((T, H), device=out_MH.device, dtype=out_MH.dtype)
    if T and H:
        grid = (triton.cdiv(T, BLOCK_T), triton.cdiv(H, BLOCK_H))
        launch(_slot_sum_kernel, grid, (out_MH, y, T, H), {"K": K, "BLOCK_T": BLOCK_T, "BLOCK_H": BLOCK_H},
               num_warps=NUM_WARPS, num_stages=1)
    return y


def sum_slots(out_MH: torch.Tensor, T: int, K: int) -> torch.Tensor:
    """The K-sum split_lora calls: the kernel above when SPLITMOE_SLOT_SUM=triton, else torch's reduce."""
    if enabled():
        return slot_sum(out_MH, K)
    return out_MH.view(T, K, -1).sum(1)
