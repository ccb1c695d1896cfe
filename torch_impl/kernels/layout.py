"""One-pass cast + transpose of a stacked LoRA factor into the layout the grouped-GEMM kernels read.

    out[e, r, d] = cast(t[e, d, r])        t [E, D, R] (any strides) -> out stored [E, R, D], D contiguous

The kernels take each LoRA-A factor reduction-major (`grouped_gemm.reduction_major` says why) in the activation
dtype, while the masters are fp32 [E, D, R] with R contiguous. `Tensor.copy_` between those layouts is a strided
TensorIterator copy: each thread reads one element of a different R-row and nothing is vectorised. On an H100 the
profile of a 24-layer Qwen3-30B-A3B step (benchmarks/results/session5_2026-12-05) shows it as the largest glue kernel:
144 launches, 13.2 ms, about 130 µs for one [128, 2048, 64] factor (0.8 TB/s), run for every layer in the forward,
the recompute and, compiled, the backward. Here each program loads a [BLOCK_D, BLOCK_R] tile along R (coalesced) and
stores it along D (coalesced); Triton moves the tile between the two register layouts through shared memory.
Measured on an H100 (`benchmarks/glue_bench.py`, 2026-12-05, the same bits as `copy_`): Qwen3's [128, 2048, 64]
factor 140.7 -> 59.7 µs, its [128, 768, 64] 60.9 -> 33.4 µs, gpt-oss's [32, 2880, 64] 59.6 -> 33.5 µs.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from torch_impl.kernels.launch import launch

BLOCK_D, BLOCK_R = 64, 64


@triton.jit
def _cast_transpose_kernel(src_ptr, dst_ptr, D, R, stride_se, stride_sd, stride_sr,
                           BLOCK_D: tl.constexpr, BLOCK_R: tl.constexpr):
    pid_d, pid_r, e = tl.program_id(0), tl.program_id(1), tl.program_id(2).to(tl.int64)
    d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    r = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    mask = (d[:, None] < D) & (r[None, :] < R)
    tile = tl.load(src_ptr + e * stride_se + d[:, None] * stride_sd + r[None, :] * stride_sr, mask=mask)
    # the destination is [E, R, D] contiguous: element (e, d, r) at e·R·D + r·D + d
    tl.store(dst_ptr + e * R * D + r[None, :] * D + d[:, None], tile.to(dst_ptr.dtype.element_ty), mask=mask)


def cast_transpose_into(t_EDR: torch.Tensor, out_EDR: torch.Tensor) -> torch.Tensor:
    """out_EDR (an [E, D, R] view of [E, R, D] contiguous storage, as `reduction_major` allocates it) = t_EDR cast
    to out's dtype; one launch. Returns out_EDR."""
    E, D, R = t_EDR.shape
    if out_EDR.shape != t_EDR.shape or out_EDR.stride() != (R * D, 1, D):
        raise ValueError(f"out must be the [E, D, R] = {tuple(t_EDR.shape)} view of contiguous [E, R, D] storage "
                         f"(strides {(R * D, 1, D)}); got shape {tuple(out_EDR.shape)}, strides {out_EDR.stride()}")
    if out_EDR.numel():
        grid = (triton.cdiv(D, BLOCK_D), triton.cdiv(R, BLOCK_R), E)
        # num_warps / num_stages: Triton's defaults on CUDA, stated because the cached launch keys on them
        launch(_cast_transpose_kernel, grid, (t_EDR, out_EDR, D, R, *t_EDR.stride()),
               dict(BLOCK_D=BLOCK_D, BLOCK_R=BLOCK_R), num_warps=4, num_stages=3)
    return out_EDR
