"""The row-block schedule of the NN grouped-GEMM kernels in one launch.

Given the expert offsets `offsets_E1` (int32 [E+1], expert e owns sorted rows offsets[e]:offsets[e+1]) and a block
height `bm`, the kernels walk row tiles that never straddle two experts:

    tiles[e] = cdiv(offsets[e+1] - offsets[e], bm),  tile_end = cumsum(tiles),  tile_start = tile_end - tiles
    tile i (0 <= i < n = cdiv(M, bm) + E, an upper bound known without a sync):
        expert(i) = #{e : tile_end[e] <= i}             (E for the surplus tiles past the last valid one)
        tile_expert[i] = expert(i), or -1 when it is E
        tile_row[i]   = offsets[e] + (i - tile_start[e])·bm,  e = expert(i)   (i·bm for surplus tiles)
    count = tile_end[E-1], the number of valid tiles (they come first)

`split_lora.KernelSort.schedule` computes this with 16 small torch ops per forward; on the GPU each is a host
dispatch (about 6 µs on the H100 host of 2026-12-05) and a kernel. Here every program rebuilds the E-long prefix in
registers (E is at most a few hundred) and fills BLOCK_I tiles: one launch, the same int32 values (19 cases,
interpreted on CPU and compiled on an H100, 2026-12-06). The default on a GPU; SPLITMOE_SCHEDULE_KERNEL=0 keeps the
torch ops.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from torch_impl.kernels.launch import launch


@triton.jit
def _schedule_kernel(offsets_ptr, tile_expert_ptr, tile_row_ptr, count_ptr, E, N, BM: tl.constexpr,
                     BLOCK_E: tl.constexpr, BLOCK_I: tl.constexpr):
    e = tl.arange(0, BLOCK_E)
    in_e = e < E
    lo = tl.load(offsets_ptr + e, mask=in_e, other=0)
    hi = tl.load(offsets_ptr + e + 1, mask=in_e, other=0)
    tiles = (hi - lo + (BM - 1)) // BM  # 0 past E
    tile_end = tl.cumsum(tiles, 0)
    # tile i of expert e starts at row base[e] + i·BM; 0 in the lanes past E (the surplus tiles' expert E)
    base = tl.where(in_e, lo - (tile_end - tiles) * BM, 0)
    if tl.program_id(0) == 0:
        tl.store(count_ptr, tl.sum(tiles, 0))
    i = tl.program_id(0) * BLOCK_I + tl.arange(0, BLOCK_I)
    # expert(i): how many experts end at or before tile i (padding lanes past E never count)
    ends_before = (tile_end[None, :] <= i[:, None]) & in_e[None, :]
    ex = tl.sum(ends_before.to(tl.int32), 1)
    # base[ex] as a one-hot sum (a register vector cannot be indexed); 0 for the surplus tiles (ex == E)
    b = tl.sum(tl.where(e[None, :] == ex[:, None], base[None, :], 0), 1)
    in_i = i < N
    tl.store(tile_expert_ptr + i, tl.where(ex < E, ex, -1), mask=in_i)
    tl.store(tile_row_ptr + i, b + i * BM, mask=in_i)


def row_block_schedule(offsets_E1: torch.Tensor, block_m: int, num_rows: int
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(tile_expert [n], tile_row [n], count [1]), all int32, for `offsets_E1` (int32 [E+1]) and `num_rows` = M
    sorted rows in blocks of `block_m`; n = cdiv(M, block_m) + E (module docstring). One launch."""
    E = offsets_E1.numel() - 1
    n = triton.cdiv(num_rows, block_m) + E
    dev = offsets_E1.device
    tile_expert = torch.empty(n, device=dev, dtype=torch.int32)
    tile_row = torch.empty(n, device=dev, dtype=torch.int32)
    count = torch.empty(1, device=dev, dtype=torch.int32)
    block_e = max(16, triton.next_power_of_2(max(E, 1)))
    block_i = max(16, 8192 // block_e)  # a [BLOCK_I, BLOCK_E] comparison per program
    launch(_schedule_kernel, (max(1, triton.cdiv(n, block_i)),), (offsets_E1, tile_expert, tile_row, count, E, n),
           dict(BM=block_m, BLOCK_E=block_e, BLOCK_I=block_i), num_warps=4, num_stages=3)  # Triton's defaults
    return tile_expert, tile_row, count
