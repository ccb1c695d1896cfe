"""Cross-entropy over a chunk of logits rows in one Triton kernel, the gradient written over the logits in place.

`cross_entropy_rows_(z_CV, target_C, n_valid, ignore_index, write_grad)` takes a chunk of logits `z = h_c @ W` in the
model's dtype (HF's first rounding point), and per row, in fp32: the log-sum-exp (online max and sum, one pass over
the row), the row's loss `lse - z[target]` (0 for a row whose target is `ignore_index`), and with `write_grad` the
gradient of the mean loss, `(softmax(z) - onehot(target)) / n_valid` (0 on ignored rows), rounded to z's dtype (HF's
rounding of dz before `dz @ Wᵀ`) and stored over z. `n_valid` stays on the device (no host sync: a CUDA graph can
hold the kernel, which Liger's loss, reading its count with `.item()`, cannot).

Why its own kernel (`torch_impl.loss`, impl "triton"): the chunk loop's torch ops make five passes over an fp32 copy of
every chunk (cast, logsumexp, exp, scatter, scale, cast back), and Liger's fused kernel, one pass like this one, picks
its chunk from the token count: 64 rows at 4K tokens and V = 151,936, so its two GEMMs per chunk run with M = 64.
The profile of a compiled Qwen3-30B-A3B step at 4K on an H100 (benchmarks/results/session12_2026-12-06) spends 27.8 ms
in those 128 GEMMs (183 TFLOP/s for 5.1 TFLOP) out of the step's 202 ms of kernels. Here the caller picks the chunk
(`shared_math.loss_chunks.default_chunk_rows`: the rows whose logits fit 2^27 elements, 832 at that vocabulary, and
1920 rows from 8K tokens on), so the GEMMs are large and the loss kernel reads each logit twice and writes it once.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _cross_entropy_rows_kernel(z_ptr, stride_z, target_ptr, loss_ptr, n_valid_ptr, V, ignore_index,
                               WRITE_GRAD: tl.constexpr, BLOCK_V: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    z_row = z_ptr + row * stride_z
    target = tl.load(target_ptr + row)
    valid = target != ignore_index
    safe_target = tl.where(valid, target, 0)
    # online log-sum-exp in fp32: running max m and the sum s of exp(z - m)
    m = tl.full((), float("-inf"), tl.float32)
    s = tl.full((), 0.0, tl.float32)
    for start in range(0, V, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        z = tl.load(z_row + cols, mask=cols < V, other=float("-inf")).to(tl.float32)
        m_new = tl.maximum(m, tl.max(z, axis=0))
        s = s * tl.exp(m - m_new) + tl.sum(tl.exp(z - m_new), axis=0)
        m = m_new
    lse = m + tl.log(s)
    z_target = tl.load(z_row + safe_target).to(tl.float32)
    tl.store(loss_ptr + row, tl.where(valid, lse - z_target, 0.0))
    if WRITE_GRAD:
        # the mean's 1/n_valid folded in here; ignored rows get a zero gradient
        scale = tl.where(valid, 1.0 / tl.load(n_valid_ptr).to(tl.float32), 0.0)
        for start in range(0, V, BLOCK_V):
            cols = start + tl.arange(0, BLOCK_V)
            inside = cols < V
            z = tl.load(z_row + cols, mask=inside, other=0.0).to(tl.float32)
            g = (tl.exp(z - lse) - tl.where(cols == safe_target, 1.0, 0.0)) * scale
            tl.store(z_row + cols, g.to(z_ptr.dtype.element_ty), mask=inside)


def cross_entropy_rows_(z_CV: torch.Tensor, target_C: torch.Tensor, n_valid: torch.Tensor, ignore_index: int,
                        write_grad: bool) -> torch.Tensor:
    """Per-row fp32 losses of the logits `z_CV` (0 on ignored rows); with `write_grad`, `z_CV` is overwritten by the
    gradient of sum(losses) / n_valid, in z's dtype (module docstring). `z_CV` must have unit stride along V."""
    C, V = z_CV.shape
    if z_CV.stride(1) != 1:
        raise ValueError(f"cross_entropy_rows_ needs logits contiguous along the vocabulary; strides {z_CV.stride()}")
    if target_C.shape != (C,):
        raise ValueError(f"targets {tuple(target_C.shape)} for {C} logits rows")
    loss_C = torch.empty(C, dtype=torch.float32, device=z_CV.device)
    if C == 0:
        return loss_C
    # 4K-wide blocks of the row at 8 warps: 16 fp32 values a thread per block, two passes over the row
    block = min(triton.next_power_of_2(V), 4096)
    _cross_entropy_rows_kernel[(C,)](z_CV, z_CV.stride(0), target_C, loss_C, n_valid, V, ignore_index,
                                     WRITE_GRAD=write_grad, BLOCK_V=block, num_warps=8)
    return loss_C
