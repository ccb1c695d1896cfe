"""Persistent grouped-GEMM kernel for Hopper (sm_90+): weights by TMA tensor descriptors, one program per SM.

Computes exactly what `grouped_gemm._grouped_gemm_kernel` computes (its module docstring has the math: NN passes over
expert-sorted rows with a fused row gather, a LoRA z@B term, bias, the SwiGLU forward / backward epilogues, the
routing-weight row scale and scatter stores), with the memory path rebuilt for Hopper
(shared/reference/hopper-grouped-gemm.md):

- Persistent grid: `NUM_PROGS` programs (the SM count on a GPU) walk the output tiles
  `tile = (row tile, column tile)` with `tl.range(pid, n_tiles, NUM_PROGS)`. The row tiles are the device-side table
  of `KernelSort.schedule` (row blocks that never straddle two experts) and its device-side count: no host sync, and
  no program ever visits a surplus tile.
- Tile order: groups of GROUP_M row tiles walk every column tile together (`_tile_coords`), so the GROUP_M programs
  that run at once share one weight tile (consecutive row tiles mostly belong to one expert) and a row block stays
  in L2 while its column tiles go by.
- Weights through device-side tensor descriptors (TMA): one rank-3 descriptor over the stacked expert weights,
  block [1, BLOCK_D, BLOCK_N] (or [1, BLOCK_N, BLOCK_D] for transposed views, then transposed in registers for the
  dot: wgmma reads either major). Contiguous (non-gathered) rows, e.g. h in the down pass or dgu in the dx pass, by a
  rank-2 descriptor at [first row of the tile, d]: TMA takes any row offset, zero-fills past the tensor's end, and
  rows of the next expert that a tile's box covers only feed output rows that the masked stores drop.
- Gathered rows (x[token] in gate_up, dy[token] in dh) by ordinary pointer loads, which the pipeliner turns into
  cp.async: TMA gather (`desc.gather`) is sm_100+ only and does not compile for sm_90 (measured, the reference's
  section 5). `PRE_GATHER` (a config choice) instead copies the rows into expert order first and loads them by TMA;
  with LoRA the pass's z launch, which gathers every row once anyway, writes that copy as it goes (`STORE_A`,
  `z_gather`), so the copy costs its write and not a separate gather's read and write.
- LoRA: z = z_scale·A[rows]@LA is precomputed by a skinny launch of this same kernel (output width R) and added as
  lora_scale·z@LB[e] in the epilogue (the Z_PRE design the H200 sweep chose for 33 of 36 keys); with
  SPLITMOE_LORA_ACC=1 (`lora_acc`) as (lora_scale·z)@LB[e] accumulated into the base accumulator instead, which spares
  the epilogue a second fp32 tile of registers.
- `num_stages` software pipelining; `FLATTEN` (tl.range(flatten=True): the next tile's loads overlap this tile's
  epilogue) and `WARP_SPECIALIZE` (tl.range(warp_specialize=True)) as config choices. Warp specialisation is only
  allowed where every load of the loop is a descriptor load (sm_90 autoWS aborts the compiler on pointer-load dot
  loops, triton issue #9728), and only enters the tuning space with SPLITMOE_HOPPER_WS=1, because a compiler abort
  kills the process instead of raising. Compiled for sm_90 by Triton 3.6 and 3.9, this kernel with
  WARP_SPECIALIZE=True gives the same PTX as without (no setmaxnreg, the same TMA and wgmma instructions: the
  Hopper autoWS pass leaves its loop alone; `benchmarks/kernel_resources.py`, 2026-12-06).
- `EPI_SPLIT=2` (a config choice) runs the epilogue on one column half of the tile at a time (`_epilogue` twice on
  `tl.split` halves of the accumulators), so the activation math's gate, up and h live for half a tile: the dh
  pass's epilogue holds those next to the accumulator, which is what kept its tiles 64-128 wide. `EPI_SPLIT=4` runs
  it by quarters. Compiled for sm_90 by Triton 3.6 on the CPU (`benchmarks/kernel_resources.py`, 2026-12-07), the
  dh pass at gpt-oss-20b's shape spills 292 B a thread at the shipped 128 x 128 tile with halves and none with
  quarters; at 128 x 256 (the tile of the dx pass, 555 TFLOP/s on the H100 where dh's 128 x 128 ran 310) it spills
  2,600 B with halves and 952 B with quarters (Qwen3-30B-A3B: 448 B). Timed on an H100 (`pass_probe.py`, session
  20, T=16384): spill-free quarters at 128 x 128 are slower (Qwen3's dh 1.824 -> 2.050 ms, gpt-oss's 3.458 -> 3.691);
  at 128 x 256 they run Qwen3's dh 6 % faster (1.711 ms) and gpt-oss's 6 % slower. Not in the shipped table.
- Outputs by masked pointer stores: a TMA store writes its whole box, which would overwrite the next expert's rows.

Operands that TMA cannot address (a base or a leading stride not a multiple of 16 bytes, e.g. odd H in fp16, or a
last dimension that is not contiguous) fall back, per operand and decided on the host, to pointer loads in the same
kernel body (constexpr switches `A_DESC`, `W_DESC`, `GU_DESC`). The Triton interpreter runs both paths on CPU.

Triton API used (present in 3.6 and 3.9): `tl.make_tensor_descriptor`, `tensor_descriptor.load`,
`tl.range(..., flatten=, warp_specialize=)`, `triton.set_allocator` (device descriptors live in a global scratch
that Triton allocates through it at launch; it is a ContextVar, so it is set before every launch: autograd runs the
backward in another thread).
"""

from __future__ import annotations

import functools
import inspect
import os

import torch
import triton
import triton.language as tl

from shared_math.numerics import scales_exactly
from torch_impl.kernels import grouped_gemm as gg
from torch_impl.kernels.grouped_gemm import _act_bwd, _act_fwd, _gate_up_act
from torch_impl.kernels.launch import launch

MODE_PLAIN, MODE_ACT_FWD, MODE_ACT_BWD = gg.MODE_PLAIN, gg.MODE_ACT_FWD, gg.MODE_ACT_BWD
ACT_NONE = gg.ACT_NONE
HAS_TENSOR_DESCRIPTORS = hasattr(tl, "make_tensor_descriptor")
HAS_WARP_SPECIALIZE = "warp_specialize" in inspect.signature(tl.range.__init__).parameters
INTERPRETER_PROGRAMS = 3  # programs of the persistent grid under the interpreter: small, and > 1 so tiles stride


@triton.jit
def _tile_coords(tile, n_rt, n_n, GROUP_M: tl.constexpr):
    """Output tile -> (row tile, column tile): GROUP_M row tiles walk every column tile together."""
    per_group = GROUP_M * n_n
    first = (tile // per_group) * GROUP_M
    group_rows = tl.minimum(n_rt - first, GROUP_M)
    rt = first + (tile % per_group) % group_rows
    cn = (tile % per_group) // group_rows
    return rt, cn


@triton.jit
def _hopper_gemm_kernel(
    a_ptr, stride_am, stride_ad, row_index_ptr, A_ROWS, a_out_ptr, stride_aom,
    w_ptr, stride_we, stride_wd, stride_wn, W_N,
    tile_expert_ptr, tile_row_ptr, n_row_tiles_ptr, offsets_ptr,
    z_ptr, stride_zm, stride_zr,
    lb_ptr, stride_lbe, stride_lbr, stride_lbn,
    bias_ptr, stride_be, stride_bn,
    row_scale_ptr,
    gu_ptr, stride_gum, stride_gun, GU_ROWS,
    out_ptr, stride_om, stride_on, out_rows_ptr,
    dot_ptr, stride_dotm, stride_dotn,
    E, N, D, R, N_HALF, lora_scale, out_scale, limit, alpha,
    GATHER_A: tl.constexpr, A_DESC: tl.constexpr, W_DESC: tl.constexpr, W_KMAJOR: tl.constexpr,
    GU_DESC: tl.constexpr, LORA: tl.constexpr, HAS_BIAS: tl.constexpr, ROW_SCALE: tl.constexpr,
    MODE: tl.constexpr, ACT: tl.constexpr, STORE_GU: tl.constexpr, SCATTER_OUT: tl.constexpr,
    DOT_PREC: tl.constexpr, EVEN_D: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_R: tl.constexpr,
    GROUP_M: tl.constexpr, NUM_PROGS: tl.constexpr, FLATTEN: tl.constexpr, WARP_SPECIALIZE: tl.constexpr,
    EPI_SPLIT: tl.constexpr, STORE_A: tl.constexpr,
):
    pid = tl.program_id(0)
    n_rt = tl.load(n_row_tiles_ptr)
    n_n = tl.cdiv(N, BLOCK_N)
    n_tiles = n_rt * n_n
    k_tiles = tl.cdiv(D, BLOCK_D)
    cdt = lb_ptr.dtype.element_ty  # compute dtype (LB is always passed, a dummy when unused)
    offs_d = tl.arange(0, BLOCK_D)
    offs_r = tl.arange(0, BLOCK_R)
    mask_r = offs_r < R
    if A_DESC:
        a_desc = tl.make_tensor_descriptor(a_ptr, shape=[A_ROWS, D], strides=[stride_am, 1],
                                           block_shape=[BLOCK_M, BLOCK_D])
    if W_DESC:
        if W_KMAJOR:  # W[e] is a transposed view: its storage is [E, W_N, D] with D contiguous
            w_desc = tl.make_tensor_descriptor(w_ptr, shape=[E, W_N, D], strides=[stride_we, stride_wn, 1],
                                               block_shape=[1, BLOCK_N, BLOCK_D])
        else:
            w_desc = tl.make_tensor_descriptor(w_ptr, shape=[E, D, W_N], strides=[stride_we, stride_wd, 1],
                                               block_shape=[1, BLOCK_D, BLOCK_N])
    if GU_DESC:
        gu_desc = tl.make_tensor_descriptor(gu_ptr, shape=[GU_ROWS, 2 * N_HALF], strides=[stride_gum, 1],
                                            block_shape=[BLOCK_M, BLOCK_N // EPI_SPLIT])
    else:
        gu_desc = gu_ptr  # never loaded through: the epilogue reads gate and up by pointer

    # The epilogue recomputes its tile from its own counter (as triton's tutorial 09 does): no value is carried from
    # the loads of a tile to its epilogue, which lets the flattened loop overlap them.
    tile_c = pid - NUM_PROGS
    for tile in tl.range(pid, n_tiles, NUM_PROGS, flatten=FLATTEN, warp_specialize=WARP_SPECIALIZE):
        rt, cn = _tile_coords(tile, n_rt, n_n, GROUP_M)
        e = tl.load(tile_expert_ptr + rt)  # only valid tiles are visited: e >= 0
        row0 = tl.load(tile_row_ptr + rt)
        n0 = cn * BLOCK_N
        e64 = e.to(tl.int64)
        if not A_DESC:
            offs_m = row0 + tl.arange(0, BLOCK_M)
            mask_m = offs_m < tl.load(offsets_ptr + e + 1)
            if GATHER_A:
                src = tl.load(row_index_ptr + offs_m, mask=mask_m, other=0).to(tl.int64)
            else:
                src = offs_m.to(tl.int64)
        if not W_DESC:
            offs_n = n0 + tl.arange(0, BLOCK_N)
            mask_n = offs_n < N
            w_base = w_ptr + e64 * stride_we

        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        acc2 = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)  # up half (MODE_ACT_FWD only; dead code otherwise)
        for ki in range(k_tiles):
            d0 = ki * BLOCK_D
            dd = d0 + offs_d
            if A_DESC:
                a = a_desc.load([row0, d0])
            elif EVEN_D:
                a = tl.load(a_ptr + src[:, None] * stride_am + dd[None, :] * stride_ad, mask=mask_m[:, None],
                            other=0.0)
            else:
                a = tl.load(a_ptr + src[:, None] * stride_am + dd[None, :] * stride_ad,
                            mask=mask_m[:, None] & (dd < D)[None, :], other=0.0)
            if STORE_A:  # the gathered rows, written in expert order (a one-column-tile z launch: each row once)
                tl.store(a_out_ptr + offs_m.to(tl.int64)[:, None] * stride_aom + dd[None, :], a,
                         mask=mask_m[:, None] & (dd < D)[None, :])
            if W_DESC:
                if W_KMAJOR:
                    w = tl.trans(tl.reshape(w_desc.load([e, n0, d0]), [BLOCK_N, BLOCK_D]))
                else:
                    w = tl.reshape(w_desc.load([e, d0, n0]), [BLOCK_D, BLOCK_N])
            else:
                w = tl.load(w_base + dd[:, None] * stride_wd + offs_n[None, :] * stride_wn,
                            mask=(dd < D)[:, None] & mask_n[None, :], other=0.0)
            acc = tl.dot(a, w, acc, input_precision=DOT_PREC)
            if MODE == 1:
                if W_DESC:
                    if W_KMAJOR:
                        w2 = tl.trans(tl.reshape(w_desc.load([e, N_HALF + n0, d0]), [BLOCK_N, BLOCK_D]))
                    else:
                        w2 = tl.reshape(w_desc.load([e, d0, N_HALF + n0]), [BLOCK_D, BLOCK_N])
                else:
                    w2 = tl.load(w_base + dd[:, None] * stride_wd + (offs_n + N_HALF)[None, :] * stride_wn,
                                 mask=(dd < D)[:, None] & mask_n[None, :], other=0.0)
                acc2 = tl.dot(a, w2, acc2, input_precision=DOT_PREC)

        # ---- epilogue: LoRA, bias, activation forward / backward, routing weight, (scatter) store ----
        tile_c += NUM_PROGS
        rt_c, cn_c = _tile_coords(tile_c, n_rt, n_n, GROUP_M)
        e_c = tl.load(tile_expert_ptr + rt_c).to(tl.int64)
        row0_c = tl.load(tile_row_ptr + rt_c)
        offs_mc = row0_c + tl.arange(0, BLOCK_M)
        mask_mc = offs_mc < tl.load(offsets_ptr + e_c + 1)
        rows64 = offs_mc.to(tl.int64)
        z = tl.zeros([BLOCK_M, BLOCK_R], dtype=cdt)
        if LORA:
            z = tl.load(z_ptr + rows64[:, None] * stride_zm + offs_r[None, :] * stride_zr,
                        mask=mask_mc[:, None] & mask_r[None, :], other=0.0)
            if LORA == 2:  # lora_scale is a power of two (the host checks): z·s is exact in z's dtype
                z = (z.to(tl.float32) * lora_scale).to(cdt)
        rs = tl.zeros([BLOCK_M], dtype=tl.float32)
        if ROW_SCALE:
            rs = tl.load(row_scale_ptr + offs_mc, mask=mask_mc, other=0.0).to(tl.float32)
        if SCATTER_OUT:
            dst = tl.load(out_rows_ptr + offs_mc, mask=mask_mc, other=0).to(tl.int64)
        else:
            dst = rows64
        out_rows = out_ptr + dst[:, None] * stride_om
        n0_c = cn_c * BLOCK_N
        if EPI_SPLIT == 1:
            part = _epilogue(acc, acc2, z, rs, rows64, mask_mc, row0_c, e_c, n0_c, out_rows, gu_desc,
                             lb_ptr, stride_lbe, stride_lbr, stride_lbn, bias_ptr, stride_be, stride_bn,
                             gu_ptr, stride_gum, stride_gun, stride_on, N, R, N_HALF, lora_scale, out_scale, limit,
                             alpha, LORA, HAS_BIAS, ROW_SCALE, MODE, ACT, STORE_GU, GU_DESC, DOT_PREC, BLOCK_N,
                             BLOCK_R)
        else:
            # Column halves (EPI_SPLIT=2) or quarters (4) one after the other: the activation math holds gate, up and
            # h for that part of the tile at a time, so a wider tile (BLOCK_N=256) fits the registers (triton
            # tutorial 09's EPILOGUE_SUBTILE).
            half: tl.constexpr = BLOCK_N // 2
            if EPI_SPLIT == 2:
                part = _epilogue_halves(acc, acc2, z, rs, rows64, mask_mc, row0_c, e_c, n0_c, out_rows, gu_desc,
                                        lb_ptr, stride_lbe, stride_lbr, stride_lbn, bias_ptr, stride_be, stride_bn,
                                        gu_ptr, stride_gum, stride_gun, stride_on, N, R, N_HALF, lora_scale,
                                        out_scale, limit, alpha, LORA, HAS_BIAS, ROW_SCALE, MODE, ACT, STORE_GU,
                                        GU_DESC, DOT_PREC, BLOCK_M, half, BLOCK_R)
            else:
                quarter: tl.constexpr = half // 2
                acc_lo, acc_hi = _column_halves(acc, BLOCK_M, half)
                acc2_lo, acc2_hi = _column_halves(acc2, BLOCK_M, half)
                part = tl.zeros([BLOCK_M], dtype=tl.float32)
                for hi in tl.static_range(2):
                    if hi == 0:
                        a_h, a2_h = acc_lo, acc2_lo
                    else:
                        a_h, a2_h = acc_hi, acc2_hi
                    part += _epilogue_halves(a_h, a2_h, z, rs, rows64, mask_mc, row0_c, e_c, n0_c + hi * half,
                                             out_rows, gu_desc, lb_ptr, stride_lbe, stride_lbr, stride_lbn, bias_ptr,
                                             stride_be, stride_bn, gu_ptr, stride_gum, stride_gun, stride_on, N, R,
                                             N_HALF, lora_scale, out_scale, limit, alpha, LORA, HAS_BIAS, ROW_SCALE,
                                             MODE, ACT, STORE_GU, GU_DESC, DOT_PREC, BLOCK_M, quarter, BLOCK_R)
        if MODE == 2:
            # the tile's share of the routing-weight gradient: sum over its columns of h * dh
            tl.store(dot_ptr + rows64 * stride_dotm + cn_c * stride_dotn, part, mask=mask_mc)


@triton.jit
def _column_halves(t, BLOCK_M: tl.constexpr, HALF: tl.constexpr):
    """[BLOCK_M, 2·HALF] -> its columns [0, HALF) and [HALF, 2·HALF)."""
    return tl.split(tl.permute(tl.reshape(t, [BLOCK_M, 2, HALF]), [0, 2, 1]))


@triton.jit
def _epilogue_halves(acc, acc2, z, rs, rows64, mask_mc, row0_c, e_c, n0, out_rows, gu_desc,
                     lb_ptr, stride_lbe, stride_lbr, stride_lbn, bias_ptr, stride_be, stride_bn,
                     gu_ptr, stride_gum, stride_gun, stride_on, N, R, N_HALF, lora_scale, out_scale, limit, alpha,
                     LORA: tl.constexpr, HAS_BIAS: tl.constexpr, ROW_SCALE: tl.constexpr, MODE: tl.constexpr,
                     ACT: tl.constexpr, STORE_GU: tl.constexpr, GU_DESC: tl.constexpr, DOT_PREC: tl.constexpr,
                     BLOCK_M: tl.constexpr, HALF: tl.constexpr, BLOCK_R: tl.constexpr):
    """`_epilogue` on columns [n0, n0 + HALF) of `acc` / `acc2` ([BLOCK_M, 2·HALF]), then on [n0 + HALF, n0 + 2·HALF):
    returns the sum of the two parts' MODE-2 dots."""
    acc_lo, acc_hi = _column_halves(acc, BLOCK_M, HALF)
    acc2_lo, acc2_hi = _column_halves(acc2, BLOCK_M, HALF)
    for hi in tl.static_range(2):  # unrolled: `hi` is a compile-time constant, so the ifs below are resolved there
        if hi == 0:
            a_h, a2_h = acc_lo, acc2_lo
        else:
            a_h, a2_h = acc_hi, acc2_hi
        p = _epilogue(a_h, a2_h, z, rs, rows64, mask_mc, row0_c, e_c, n0 + hi * HALF, out_rows, gu_desc,
                      lb_ptr, stride_lbe, stride_lbr, stride_lbn, bias_ptr, stride_be, stride_bn,
                      gu_ptr, stride_gum, stride_gun, stride_on, N, R, N_HALF, lora_scale, out_scale, limit, alpha,
                      LORA, HAS_BIAS, ROW_SCALE, MODE, ACT, STORE_GU, GU_DESC, DOT_PREC, HALF, BLOCK_R)
        if hi == 0:  # the first half's dot as it is, not 0 + it: the same fp32 adds as two plain calls
            part = p
        else:
            part += p
    return part


@triton.jit
def _epilogue(acc, acc2, z, rs, rows64, mask_mc, row0_c, e_c, n0, out_rows, gu_desc,
              lb_ptr, stride_lbe, stride_lbr, stride_lbn, bias_ptr, stride_be, stride_bn,
              gu_ptr, stride_gum, stride_gun, stride_on, N, R, N_HALF, lora_scale, out_scale, limit, alpha,
              LORA: tl.constexpr, HAS_BIAS: tl.constexpr, ROW_SCALE: tl.constexpr, MODE: tl.constexpr,
              ACT: tl.constexpr, STORE_GU: tl.constexpr, GU_DESC: tl.constexpr, DOT_PREC: tl.constexpr,
              SUB_N: tl.constexpr, BLOCK_R: tl.constexpr):
    """The epilogue of output columns [n0, n0 + SUB_N) of one tile (the whole tile, or a half or quarter of it):
    LoRA, bias, activation forward / backward, routing weight, (scatter) store. Returns the rows' sum of h * dh over
    these columns in MODE 2 (the routing-weight gradient's share), zeros otherwise."""
    cdt = lb_ptr.dtype.element_ty
    offs_r = tl.arange(0, BLOCK_R)
    mask_r = offs_r < R
    offs_nc = n0 + tl.arange(0, SUB_N)
    mask_nc = offs_nc < N
    mask_mn = mask_mc[:, None] & mask_nc[None, :]
    if LORA:
        lb_rows = lb_ptr + e_c * stride_lbe + offs_r[:, None] * stride_lbr
        lb = tl.load(lb_rows + offs_nc[None, :] * stride_lbn, mask=mask_r[:, None] & mask_nc[None, :], other=0.0)
        if LORA == 2:  # into the accumulator: no second [BLOCK_M, SUB_N] fp32 tile of registers (z is pre-scaled)
            acc = tl.dot(z, lb, acc, input_precision=DOT_PREC)
        else:
            acc += lora_scale * tl.dot(z, lb, input_precision=DOT_PREC)
        if MODE == 1:
            lb2 = tl.load(lb_rows + (offs_nc + N_HALF)[None, :] * stride_lbn,
                          mask=mask_r[:, None] & mask_nc[None, :], other=0.0)
            if LORA == 2:
                acc2 = tl.dot(z, lb2, acc2, input_precision=DOT_PREC)
            else:
                acc2 += lora_scale * tl.dot(z, lb2, input_precision=DOT_PREC)
    if HAS_BIAS:
        b_row = bias_ptr + e_c * stride_be
        acc += tl.load(b_row + offs_nc * stride_bn, mask=mask_nc, other=0.0).to(tl.float32)[None, :]
        if MODE == 1:
            acc2 += tl.load(b_row + (offs_nc + N_HALF) * stride_bn, mask=mask_nc, other=0.0).to(tl.float32)[None, :]

    part = tl.zeros_like(rs)
    if MODE == 1:
        res = _gate_up_act(acc, acc2, gu_ptr, rows64, stride_gum, stride_gun, offs_nc, N_HALF, mask_mn, limit, alpha,
                           cdt, ACT, STORE_GU)
    elif MODE == 2:
        if GU_DESC:
            g = gu_desc.load([row0_c, n0]).to(tl.float32)
            u = gu_desc.load([row0_c, N_HALF + n0]).to(tl.float32)
        else:
            gu_rows = gu_ptr + rows64[:, None] * stride_gum
            g = tl.load(gu_rows + offs_nc[None, :] * stride_gun, mask=mask_mn, other=0.0).to(tl.float32)
            u = tl.load(gu_rows + (offs_nc + N_HALF)[None, :] * stride_gun, mask=mask_mn, other=0.0).to(tl.float32)
        # h recomputed from the saved pre-activation, exactly as the forward rounded it
        h = _act_fwd(g, u, ACT, limit, alpha).to(cdt).to(tl.float32)
        part = tl.sum(tl.where(mask_mn, h * acc, 0.0), axis=1)
        res = acc
    else:
        res = acc * out_scale

    if ROW_SCALE:
        res = res * rs[:, None]
    out_ty = out_rows.dtype.element_ty
    if MODE == 2:
        dg, du = _act_bwd(g, u, res, ACT, limit, alpha)
        tl.store(out_rows + offs_nc[None, :] * stride_on, dg.to(out_ty), mask=mask_mn)
        tl.store(out_rows + (offs_nc + N_HALF)[None, :] * stride_on, du.to(out_ty), mask=mask_mn)
    else:
        tl.store(out_rows + offs_nc[None, :] * stride_on, res.to(out_ty), mask=mask_mn)
    return part


# ---- host side -------------------------------------------------------------------------------------------------------

def _tma_ok(t: torch.Tensor, contiguous_dim: int) -> bool:
    """Whether TMA can address `t` with `contiguous_dim` as the descriptor's last dimension: that stride is 1, the
    base and every other stride are multiples of 16 bytes (the TMA rules; the hardware rejects the rest)."""
    es = t.element_size()
    strides = t.stride()
    if strides[contiguous_dim] != 1 or t.data_ptr() % 16:
        return False
    return all((s * es) % 16 == 0 for i, s in enumerate(strides) if i != contiguous_dim)


@functools.cache
def _num_sms(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def num_programs(device: torch.device) -> int:
    """The persistent grid: one program per SM on a GPU, a few under the interpreter."""
    if device.type == "cuda":
        return _num_sms(device.index if device.index is not None else torch.cuda.current_device())
    return INTERPRETER_PROGRAMS


def _alloc(size: int, alignment: int, stream: int | None) -> torch.Tensor:
    # Scratch for the device-side descriptors, on the current device (torch's caching allocator; graph-capturable).
    return torch.empty(size, device="cuda", dtype=torch.int8)


def _row_tile_count(tile_expert: torch.Tensor) -> torch.Tensor:
    """Number of valid row tiles of a schedule (valid tiles come first), on the device: [1] int32."""
    return (tile_expert >= 0).sum(dtype=torch.int32).reshape(1)


def grouped_gemm(a: torch.Tensor, w_EDN: torch.Tensor, schedule, offsets_E1: torch.Tensor, *, n: int,
                 out: torch.Tensor, config: dict, row_index: torch.Tensor | None = None,
                 lora_a_EDR: torch.Tensor | None = None, z_MR: torch.Tensor | None = None, store_z: bool = False,
                 lora_b_ERN: torch.Tensor | None = None, z_scale: float = 1.0, lora_scale: float = 1.0,
                 bias_EN: torch.Tensor | None = None,
                 row_scale_M: torch.Tensor | None = None, mode: int = MODE_PLAIN, act: int = ACT_NONE,
                 gu_M2I: torch.Tensor | None = None, store_gu: bool = False, out_rows_M: torch.Tensor | None = None,
                 dot_MT: torch.Tensor | None = None, limit: float = 7.0, alpha: float = 1.702,
                 out_scale: float = 1.0) -> torch.Tensor:
    """Drop-in for `grouped_gemm.grouped_gemm` (same arguments and results) on the persistent Hopper kernel.

    `schedule` = (tile_expert, tile_row[, n_row_tiles]) for config["BLOCK_M"] (`KernelSort.schedule` and
    `KernelSort.row_tile_count`; the count is computed here when absent). With LoRA A given, z = z_scale·A[rows]@LA
    runs first as its own skinny launch (into `z_MR` when given: the backward saves it), then the main pass adds
    lora_scale·z@LB. Config keys: BLOCK_M/N/D, GROUP_M, num_warps, num_stages, FLATTEN, WS (warp specialisation),
    PRE_GATHER (copy gathered rows into expert order first, then load them by TMA), EPI_SPLIT (1, 2 or 4: the
    epilogue by column halves or quarters), DESC (False: pointer loads only). `store_z` is accepted for the
    signature's sake: a given `z_MR` is always written.
    """
    # PRE_GATHER: one contiguous copy of the rows in expert order (M x D), so every A load of the pass is a TMA load.
    # With LoRA and `z_gather()` the z launch, which reads every gathered row once anyway, writes that copy on
    # the way (STORE_A); otherwise a plain index_select does.
    pre_gather = row_index is not None and config.get("PRE_GATHER", False)
    z_gathers = pre_gather and lora_a_EDR is not None and z_gather()
    if pre_gather and not z_gathers:
        a, row_index = a.index_select(0, row_index.long()), None
    if lora_a_EDR is not None:
        if lora_b_ERN is None:
            raise ValueError("lora_a_EDR without lora_b_ERN: the z-only product is a plain pass with w_EDN=A")
        if lora_a_EDR.stride(1) != 1:
            lora_a_EDR = gg.reduction_major(lora_a_EDR)  # D contiguous: a TMA-addressable K-major operand
        rank = lora_b_ERN.shape[1]
        rows = a.shape[0] if row_index is None else row_index.shape[0]
        if z_MR is None:
            z_MR = torch.empty((rows, rank), device=a.device, dtype=lora_b_ERN.dtype)
        a_sorted = torch.empty((rows, a.shape[1]), device=a.device, dtype=a.dtype) if z_gathers else None
        _launch(a, lora_a_EDR, schedule, offsets_E1, n=rank, out=z_MR, config=gg.z_config(config, rank),
                row_index=row_index, out_scale=z_scale, a_out=a_sorted)
        if a_sorted is not None:
            a, row_index = a_sorted, None
    return _launch(a, w_EDN, schedule, offsets_E1, n=n, out=out, config=config, row_index=row_index, z_MR=z_MR,
                   lora_b_ERN=lora_b_ERN, lora_scale=lora_scale, bias_EN=bias_EN, row_scale_M=row_scale_M,
                   mode=mode, act=act, gu_M2I=gu_M2I, store_gu=store_gu, out_rows_M=out_rows_M, dot_MT=dot_MT,
                   limit=limit, alpha=alpha, out_scale=out_scale)


def z_gather() -> bool:
    """Whether a PRE_GATHER pass with LoRA has its z launch write the sorted copy of the rows (STORE_A) instead of an
    index_select: yes unless SPLITMOE_Z_GATHER=0 (to time both). On an H100 it took 8-10 ms off a 16K gpt-oss step
    (benchmarks/REPORT.md, session 16)."""
    return _switch("SPLITMOE_Z_GATHER", "1 (the z launch writes the copy; the default) or 0 (index_select)") \
        is not False


def lora_acc(lora_scale: float) -> bool:
    """Whether the epilogue adds the LoRA term by accumulating z·s @ LB into the base accumulator (one MMA, no
    second fp32 tile of registers; `LORA == 2` in the kernel) rather than as s·(z @ LB) added to it: with
    SPLITMOE_LORA_ACC=1, where s is a power of two, so z·s is exact in z's dtype (up to overflow, as z @ LB·s has).
    The sums round in another order, so the two are not bitwise equal. Compiled for sm_90
    (benchmarks/kernel_resources.py --lora-acc) it removes the register spills of every shipped Qwen3 and gpt-oss
    pass but gpt-oss's dh under Triton 3.6, where they halve; yet on the H100 (session 17) it passed its gpu tests and
    made gpt-oss's 16K step 25 % slower (1279 against 1021 ms). Compiled for sm_90 under Triton 3.6 (gpt-oss's
    shipped dh and gate_up configs, session 18), the two forms' TTGIR differ only in how the LoRA dot reads z: from
    registers after a swizzled shared-memory round trip (z·s is computed in registers) instead of straight from
    NVMMA shared memory; the wgmma count, the TMA loads and the pipelining are the same. So the static code does not
    explain the step's 25 %. Off by default; `gpu_session.sh session17p` times the passes one by one to find where
    the time goes before it is kept or removed."""
    return _switch("SPLITMOE_LORA_ACC", "1 (accumulate) or 0 (add; the default)") is True and \
        scales_exactly(lora_scale)


def _switch(name: str, meaning: str) -> bool | None:
    """An on/off environment switch: True for 1, False for 0, None when unset; anything else is refused."""
    value = os.environ.get(name, "")
    if value not in ("", "0", "1"):
        raise ValueError(f"{name}={value!r}: use {meaning}, or leave it unset")
    return None if value == "" else value == "1"


def _launch(a, w_EDN, schedule, offsets_E1, *, n, out, config, row_index=None, z_MR=None, lora_b_ERN=None,
            lora_scale=1.0, bias_EN=None, row_scale_M=None, mode=MODE_PLAIN, act=ACT_NONE, gu_M2I=None,
            store_gu=False, out_rows_M=None, dot_MT=None, limit=7.0, alpha=1.702, out_scale=1.0, a_out=None):
    """One launch of `_hopper_gemm_kernel`; picks descriptor or pointer loads per operand. `a_out` [M, D]: also
    write the gathered rows there in sorted order (one column tile only: each row is loaded, so stored, once)."""
    if len(schedule) == 3:
        tile_expert, tile_row, n_row_tiles = schedule
    else:
        tile_expert, tile_row = schedule
        n_row_tiles = _row_tile_count(tile_expert)
    E, d, w_n = w_EDN.shape
    bm, bn, bd = config["BLOCK_M"], config["BLOCK_N"], config["BLOCK_D"]
    epi = config.get("EPI_SPLIT", 1)
    if epi not in (1, 2, 4) or bn % epi or bn // epi < 8:
        raise ValueError(f"EPI_SPLIT={epi} with BLOCK_N={bn}: the epilogue splits a tile into 1, 2 or 4 column "
                         "parts of at least 8 columns (16 where a compiled LoRA term's dot runs on them), e.g. "
                         "EPI_SPLIT=4 from BLOCK_N=64")
    gather = row_index is not None
    plan = launch_plan(a, w_EDN, config, gathered=gather, gu_M2I=gu_M2I if mode == MODE_ACT_BWD else None)
    if a_out is not None and (not gather or plan["a_desc"] or n > bn or a_out.stride(1) != 1):
        raise ValueError("a_out needs gathered rows read by pointer loads, one column tile (n <= BLOCK_N) and a "
                         "contiguous last dimension")
    ws = plan["ws"]
    flatten = bool(config.get("FLATTEN", False)) and not ws  # Hopper warp specialisation rejects flatten
    lora = lora_b_ERN is not None
    rank = lora_b_ERN.shape[1] if lora else 0
    lb = lora_b_ERN if lora else w_EDN  # dummy pointers carry the compute dtype
    dummy = offsets_E1
    progs = num_programs(a.device)
    if a.device.type == "cuda":
        triton.set_allocator(_alloc)
    launch(_hopper_gemm_kernel, (progs,), (
        a, *a.stride(), row_index if gather else dummy, a.shape[0], a_out if a_out is not None else a,
        a_out.stride(0) if a_out is not None else 0,
        w_EDN, *w_EDN.stride(), w_n,
        tile_expert, tile_row, n_row_tiles, offsets_E1,
        z_MR if lora else lb, *gg._strides2(z_MR if lora else None),
        lb, *gg._strides3(lora_b_ERN),
        bias_EN if bias_EN is not None else lb, *gg._strides2(bias_EN),
        row_scale_M if row_scale_M is not None else dummy,
        gu_M2I if gu_M2I is not None else lb, *gg._strides2(gu_M2I), 0 if gu_M2I is None else gu_M2I.shape[0],
        out, *out.stride(), out_rows_M if out_rows_M is not None else dummy,
        dot_MT if dot_MT is not None else dummy, *gg._strides2(dot_MT),
        E, n, d, rank, n, float(lora_scale), float(out_scale), float(limit), float(alpha),
    ), dict(
        GATHER_A=gather, A_DESC=plan["a_desc"], W_DESC=plan["w_desc"], W_KMAJOR=plan["w_kmajor"],
        GU_DESC=plan["gu_desc"], LORA=(2 if lora_acc(lora_scale) else 1) if lora else 0,
        HAS_BIAS=bias_EN is not None, ROW_SCALE=row_scale_M is not None, MODE=mode, ACT=act,
        STORE_GU=bool(store_gu), SCATTER_OUT=out_rows_M is not None, DOT_PREC=gg._dot_prec(a.dtype),
        EVEN_D=d % bd == 0, BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=bd, BLOCK_R=max(16, gg.next_pow2(max(rank, 1))),
        GROUP_M=config.get("GROUP_M", 8), NUM_PROGS=progs, FLATTEN=flatten, WARP_SPECIALIZE=ws,
        EPI_SPLIT=config.get("EPI_SPLIT", 1), STORE_A=a_out is not None,
    ), num_warps=config.get("num_warps", 4), num_stages=config.get("num_stages", 2))
    return out


def launch_plan(a: torch.Tensor, w_EDN: torch.Tensor, config: dict, *, gathered: bool,
                gu_M2I: torch.Tensor | None = None) -> dict[str, bool]:
    """Which operands one launch reads by TMA (a_desc, w_desc, gu_desc), whether W is a transposed (K-major) view,
    and whether warp specialisation stays on."""
    # A TMA box is at most 256 elements a side: larger blocks (a z pass at rank > 256) take the pointer path.
    boxes_ok = max(config["BLOCK_M"], config["BLOCK_N"], config["BLOCK_D"]) <= 256
    use_desc = HAS_TENSOR_DESCRIPTORS and config.get("DESC", True) and boxes_ok
    gathered = gathered and not config.get("PRE_GATHER", False)
    kmajor = w_EDN.stride(2) != 1 and w_EDN.stride(1) == 1
    plan = dict(a_desc=use_desc and not gathered and _tma_ok(a, 1),
                w_desc=use_desc and _tma_ok(w_EDN, 1 if kmajor else 2), w_kmajor=kmajor,
                gu_desc=use_desc and gu_M2I is not None and _tma_ok(gu_M2I, 1))
    # sm_90 autoWS handles only all-descriptor loops (a pointer-load dot loop aborts the compiler: triton #9728)
    plan["ws"] = bool(config.get("WS", False)) and HAS_WARP_SPECIALIZE and plan["a_desc"] and plan["w_desc"]
    return plan
