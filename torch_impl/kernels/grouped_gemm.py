"""Two generic grouped-GEMM Triton kernels over expert-sorted rows, and their host launchers.

Shape legend: T tokens, H hidden, I expert intermediate, E experts, K experts per token, R LoRA rank, M = T·K routed
rows (sorted by expert; expert e owns sorted rows offsets[e]:offsets[e+1]). Below, `D` is the reduction width and
`N` the output width of one call (e.g. D=H, N=I for the fused gate_up pass).

`grouped_gemm` (NN, one output tile [BLOCK_M rows of one expert, BLOCK_N columns] per program):
    acc[m, n] = Σ_d A[src(m), d] · W[e, d, n]                    src(m) = row_index[m] (fused gather) or m
    LoRA:      z[m]  = z_scale · Σ_d A[src(m), d] · LA[e, d, :R]   (FUSE_Z: in the same d-loop, one read of A;
               the n-tile-0 program stores it) or z = Z[m] (given); acc += lora_scale · z @ LB[e, :R, n]
    bias:      acc += bias[e, n]
    act="fwd": two accumulators, columns n (gate) and N_HALF+n (up) of W/LB/bias; out[m, n] = act(gate, up) -> h
               [M, I]; the pre-activation gate/up may be stored to `gu` [M, 2I] for the backward.
    act="bwd": epilogue of dh' = dy@Wd^T + dZ2'@A2^T: loads gu (gate n, up N_HALF+n), h = act(gu), writes the
               per-tile partial <h, acc>[m] into dot[m, pid_n] (for d expert_weights), then dh = row_scale·acc and
               out[m, n], out[m, N_HALF+n] = act_vjp(gu, dh) -> dgu [M, 2I].
    row_scale: out rows multiplied by row_scale[m] (the routing weight), applied after the partial dot.
    out_rows:  scatter-store: row m goes to out[out_rows[m]] (its flat (token, slot) position), so the sum over K
               is a deterministic `view(T, K, N).sum(1)` by the caller: no atomics anywhere.

`grouped_gemm_tn` (ragged reduction over each expert's rows, for dA, dB, dW and bias grads):
    out[e, p, q] = alpha · Σ_{m in rows(e)} Lrow(m)[p] · row_scale[m] · Rrow(m)[q]
    Lrow(m) = L[l_index[m] or m] | act(gu[m]) (h recomputed on load from the saved pre-activation) | 1 (bias grads:
    only p = 0 is one, a column sum through the same dot); Rrow likewise gathered or direct. fp32 accumulation,
    one program per (expert, p-tile, q-tile): deterministic, and empty experts write zeros.
    Split mode, config["SPLIT_ROWS"] = N > 0 (a multiple of BLOCK_M; 0 or absent: the above, unchanged). Each
    program above walks all of its expert's rows, so one crowded expert sets the launch's length. Measured on the
    GPU, session 17 (benchmarks/results/session17_2026-12-06, benchmarks/tn_probe.py): the four launches of a
    Qwen3-30B layer (T=16384, K=8, E=128, H=2048, I=768, R=64) took 0.83 ms with uniform routing, near cuBLAS, and
    1.56 ms with one expert at 16x the mean rows (--skew 2); the training step's profile (random-weight router,
    busiest expert 1.5-2.4x the mean) had them at 1.9 ms. Dispatching the heaviest expert's programs first gave
    nothing (presumably, at skew 2, because one of its programs alone runs longer than the rest of the launch
    wherever it starts). So split mode cuts each expert's rows into chunks of N, in expert order, the last chunk
    taking the remainder too (`shared_math.tuning.split_chunks`: N to 2N - 1 rows a chunk, rows // N chunks; an
    expert of fewer than 2N rows is one chunk). Slots: the row-block schedule for block N (slot -> (expert, first
    row), static length cdiv(M, N) + E, surplus slots expert -1, built on the device), where a remainder's slot gets
    no rows. Two launches, no atomics:
      pass 1, one program per (slot, p-tile, q-tile): the chunk's rows reduced as above into an fp32 partial
        [cdiv(M, N) + E, p, q] (dA1 at Qwen3-30B, T=16384: 192 MiB at N=512, 128 MiB at N=1024); an expert of one
        chunk is finished here instead (alpha applied, out_dtype; the same row blocks in the same order as the
        unsplit kernel: the same bits), so only experts of two or more chunks write and read partials (2·p·q·4
        bytes of traffic per chunk).
      pass 2 (`_grouped_gemm_tn_sum_kernel`), one program per (expert, p-tile, q-tile): alpha · the sum of the
        expert's partials in chunk order (fixed: deterministic; its first slot is the exclusive prefix sum of
        cdiv(rows, N), rebuilt in registers from the offsets), zeros for experts with no rows.
    (Why the remainder rides in the last chunk, and what that measured: `split_chunks`' docstring.)
    The shipped tuned table has no SPLIT_ROWS: `split_lora.tn_split_rows` sets it on CUDA (DEFAULT_TN_SPLIT_ROWS,
    or `SPLITMOE_TN_SPLIT_ROWS`), off in the interpreter; `benchmarks/tn_probe.py --split-rows` times it alone.

Every operand is passed with explicit strides, so transposed views (W^T, LoRA factors transposed in the backward)
cost no copy. Row indices are widened to int64 before they meet a stride (M·H passes 2^31 at real sizes).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from torch_impl.kernels.launch import launch
from torch_impl.kernels.layout import cast_transpose_into
from torch_impl.kernels.schedule import row_block_schedule

ACT_NONE, ACT_SWIGLU, ACT_SWIGLU_OAI = 0, 1, 2
MODE_PLAIN, MODE_ACT_FWD, MODE_ACT_BWD = 0, 1, 2
LORA_NONE, LORA_GIVEN_Z, LORA_FUSE_Z = 0, 1, 2
LEFT_ROWS, LEFT_ACT, LEFT_ONES = 0, 1, 2


def act_code(activation: str | None) -> int:
    if activation is None:
        return ACT_NONE
    codes = {"swiglu": ACT_SWIGLU, "swiglu_oai": ACT_SWIGLU_OAI}
    if activation not in codes:
        raise ValueError(f"unknown activation {activation!r}; expected 'swiglu' or 'swiglu_oai'")
    return codes[activation]


@triton.jit
def _act_fwd(g, u, ACT: tl.constexpr, limit, alpha):
    """h from gate g and up u (fp32). swiglu: silu(g)·u; swiglu_oai: (clip(u)+1)·min(g)·sigmoid(alpha·min(g))."""
    if ACT == 1:
        h = g * tl.sigmoid(g) * u
    else:
        gc = tl.minimum(g, limit)
        uc = tl.minimum(tl.maximum(u, -limit), limit)
        h = (uc + 1.0) * gc * tl.sigmoid(alpha * gc)
    return h


@triton.jit
def _act_bwd(g, u, dh, ACT: tl.constexpr, limit, alpha):
    """(dgate, dup) = act'(g, u)·dh. Clamped entries get zero gradient; at exactly the limit it passes (as
    torch.clamp's backward and the reference do)."""
    if ACT == 1:
        sg = tl.sigmoid(g)
        dg = dh * u * sg * (1.0 + g * (1.0 - sg))
        du = dh * g * sg
    else:
        gc = tl.minimum(g, limit)
        uc = tl.minimum(tl.maximum(u, -limit), limit)
        sa = tl.sigmoid(alpha * gc)
        dg = tl.where(g <= limit, dh * (uc + 1.0) * sa * (1.0 + alpha * gc * (1.0 - sa)), 0.0)
        du = tl.where(tl.abs(u) <= limit, dh * gc * sa, 0.0)
    return dg, du


@triton.jit
def _gate_up_act(acc, acc2, gu_ptr, rows64, stride_gum, stride_gun, offs_n, N_HALF, mask_mn, limit, alpha,
                 cdt: tl.constexpr, ACT: tl.constexpr, STORE_GU: tl.constexpr):
    """The gate_up pass's activation epilogue (both NN kernels, columns `offs_n` of gate and N_HALF + `offs_n` of up):
    gate and up rounded to the storage dtype `cdt` first (the rounding point of a separate-GEMM implementation, and
    the exact values the backward reloads from `gu`), stored to gu's rows `rows64` where STORE_GU, then act(gate, up)
    in fp32."""
    g = acc.to(cdt)
    u = acc2.to(cdt)
    if STORE_GU:
        gu_rows = gu_ptr + rows64[:, None] * stride_gum
        tl.store(gu_rows + offs_n[None, :] * stride_gun, g, mask=mask_mn)
        tl.store(gu_rows + (offs_n + N_HALF)[None, :] * stride_gun, u, mask=mask_mn)
    return _act_fwd(g.to(tl.float32), u.to(tl.float32), ACT, limit, alpha)


@triton.jit
def _grouped_gemm_kernel(
    a_ptr, stride_am, stride_ad, row_index_ptr,
    w_ptr, stride_we, stride_wd, stride_wn,
    tile_expert_ptr, tile_row_ptr, offsets_ptr,
    la_ptr, stride_lae, stride_lad, stride_lar,
    z_ptr, stride_zm, stride_zr,
    lb_ptr, stride_lbe, stride_lbr, stride_lbn,
    bias_ptr, stride_be, stride_bn,
    row_scale_ptr,
    gu_ptr, stride_gum, stride_gun,
    out_ptr, stride_om, stride_on, out_rows_ptr,
    dot_ptr, stride_dotm, stride_dotn,
    N, D, R, N_HALF, z_scale, lora_scale, out_scale, limit, alpha,
    GATHER_A: tl.constexpr, LORA: tl.constexpr, STORE_Z: tl.constexpr, HAS_BIAS: tl.constexpr,
    ROW_SCALE: tl.constexpr, MODE: tl.constexpr, ACT: tl.constexpr,
    STORE_GU: tl.constexpr, SCATTER_OUT: tl.constexpr, DOT_PREC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_R: tl.constexpr,
):
    pid_t = tl.program_id(0)
    pid_n = tl.program_id(1)
    # The grid has an upper bound of tiles (no host sync to count them); surplus tiles have expert -1 and no rows.
    e_raw = tl.load(tile_expert_ptr + pid_t)
    row0 = tl.load(tile_row_ptr + pid_t)
    e = tl.maximum(e_raw, 0).to(tl.int64)
    row_end = tl.where(e_raw >= 0, tl.load(offsets_ptr + e + 1), row0)
    offs_m = row0 + tl.arange(0, BLOCK_M)
    mask_m = offs_m < row_end
    if GATHER_A:
        src = tl.load(row_index_ptr + offs_m, mask=mask_m, other=0).to(tl.int64)
    else:
        src = offs_m.to(tl.int64)
    rows64 = offs_m.to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    offs_d = tl.arange(0, BLOCK_D)
    offs_r = tl.arange(0, BLOCK_R)
    mask_r = offs_r < R
    cdt = lb_ptr.dtype.element_ty  # compute dtype of the operands (LB is always passed, a dummy when unused)

    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    acc2 = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)  # up half (MODE_ACT_FWD only; dead code otherwise)
    zacc = tl.zeros([BLOCK_M, BLOCK_R], dtype=tl.float32)
    w_base = w_ptr + e * stride_we
    # An empty (surplus) tile runs no reduction steps instead of branching around the whole body.
    d_hi = tl.where(e_raw >= 0, D, 0)
    for d0 in range(0, d_hi, BLOCK_D):
        dd = d0 + offs_d
        mask_d = dd < D
        a = tl.load(a_ptr + src[:, None] * stride_am + dd[None, :] * stride_ad,
                    mask=mask_m[:, None] & mask_d[None, :], other=0.0)
        w = tl.load(w_base + dd[:, None] * stride_wd + offs_n[None, :] * stride_wn,
                    mask=mask_d[:, None] & mask_n[None, :], other=0.0)
        acc = tl.dot(a, w, acc, input_precision=DOT_PREC)
        if MODE == 1:
            w2 = tl.load(w_base + dd[:, None] * stride_wd + (offs_n + N_HALF)[None, :] * stride_wn,
                         mask=mask_d[:, None] & mask_n[None, :], other=0.0)
            acc2 = tl.dot(a, w2, acc2, input_precision=DOT_PREC)
        if LORA == 2:
            # The skinny LoRA-A product rides on the A tile already in registers: no second pass over A.
            la = tl.load(la_ptr + e * stride_lae + dd[:, None] * stride_lad + offs_r[None, :] * stride_lar,
                         mask=mask_d[:, None] & mask_r[None, :], other=0.0)
            zacc = tl.dot(a, la, zacc, input_precision=DOT_PREC)

    if LORA > 0:
        if LORA == 2:
            z = (zacc * z_scale).to(cdt)
            if STORE_Z:
                # Every n-tile computes the same z (same data, same order); only the first one writes it.
                z_rows = tl.where(pid_n == 0, row_end, row0)
                tl.store(z_ptr + rows64[:, None] * stride_zm + offs_r[None, :] * stride_zr, z,
                         mask=(offs_m < z_rows)[:, None] & mask_r[None, :])
        else:
            z = tl.load(z_ptr + rows64[:, None] * stride_zm + offs_r[None, :] * stride_zr,
                        mask=mask_m[:, None] & mask_r[None, :], other=0.0)
        lb = tl.load(lb_ptr + e * stride_lbe + offs_r[:, None] * stride_lbr + offs_n[None, :] * stride_lbn,
                     mask=mask_r[:, None] & mask_n[None, :], other=0.0)
        acc += lora_scale * tl.dot(z, lb, input_precision=DOT_PREC)
        if MODE == 1:
            lb2 = tl.load(lb_ptr + e * stride_lbe + offs_r[:, None] * stride_lbr
                          + (offs_n + N_HALF)[None, :] * stride_lbn,
                          mask=mask_r[:, None] & mask_n[None, :], other=0.0)
            acc2 += lora_scale * tl.dot(z, lb2, input_precision=DOT_PREC)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + e * stride_be + offs_n * stride_bn, mask=mask_n, other=0.0).to(tl.float32)[None, :]
        if MODE == 1:
            acc2 += tl.load(bias_ptr + e * stride_be + (offs_n + N_HALF) * stride_bn, mask=mask_n,
                            other=0.0).to(tl.float32)[None, :]

    mask_mn = mask_m[:, None] & mask_n[None, :]
    if MODE == 1:
        res = _gate_up_act(acc, acc2, gu_ptr, rows64, stride_gum, stride_gun, offs_n, N_HALF, mask_mn, limit, alpha,
                           cdt, ACT, STORE_GU)
    elif MODE == 2:
        gu_rows = gu_ptr + rows64[:, None] * stride_gum
        g = tl.load(gu_rows + offs_n[None, :] * stride_gun, mask=mask_mn, other=0.0).to(tl.float32)
        u = tl.load(gu_rows + (offs_n + N_HALF)[None, :] * stride_gun, mask=mask_mn, other=0.0).to(tl.float32)
        # h is recomputed from the saved pre-activation, exactly as the forward rounded it.
        h = _act_fwd(g, u, ACT, limit, alpha).to(cdt).to(tl.float32)
        part = tl.sum(tl.where(mask_mn, h * acc, 0.0), axis=1)
        tl.store(dot_ptr + rows64 * stride_dotm + pid_n * stride_dotn, part, mask=mask_m)
        res = acc
    else:
        res = acc * out_scale

    if ROW_SCALE:
        rs = tl.load(row_scale_ptr + offs_m, mask=mask_m, other=0.0).to(tl.float32)
        res = res * rs[:, None]
    if SCATTER_OUT:
        dst = tl.load(out_rows_ptr + offs_m, mask=mask_m, other=0).to(tl.int64)
    else:
        dst = rows64
    out_rows = out_ptr + dst[:, None] * stride_om
    if MODE == 2:
        dg, du = _act_bwd(g, u, res, ACT, limit, alpha)
        tl.store(out_rows + offs_n[None, :] * stride_on, dg.to(out_ptr.dtype.element_ty), mask=mask_mn)
        tl.store(out_rows + (offs_n + N_HALF)[None, :] * stride_on, du.to(out_ptr.dtype.element_ty), mask=mask_mn)
    else:
        tl.store(out_rows + offs_n[None, :] * stride_on, res.to(out_ptr.dtype.element_ty), mask=mask_mn)


@triton.jit
def _grouped_gemm_tn_kernel(
    l_ptr, stride_lm, stride_lp, l_index_ptr,
    r_ptr, stride_rm, stride_rq, r_index_ptr,
    row_scale_ptr, offsets_ptr, chunk_expert_ptr, chunk_row_ptr,
    out_ptr, stride_oe, stride_op, stride_oq,
    part_ptr, stride_pc, stride_pp, stride_pq,
    P, Q, P_HALF, alpha, limit, act_alpha, split_rows,
    GATHER_L: tl.constexpr, GATHER_R: tl.constexpr, LEFT: tl.constexpr, ACT: tl.constexpr,
    ROW_SCALE: tl.constexpr, DOT_PREC: tl.constexpr, SPLIT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_Q: tl.constexpr,
):
    pid = tl.program_id(1)
    n_q = tl.cdiv(Q, BLOCK_Q)
    offs_p = (pid // n_q) * BLOCK_P + tl.arange(0, BLOCK_P)
    offs_q = (pid % n_q) * BLOCK_Q + tl.arange(0, BLOCK_Q)
    mask_p = offs_p < P
    mask_q = offs_q < Q
    if SPLIT:
        # Program (slot c, tile): rows chunk_row[c] : +split_rows of expert chunk_expert[c], where the expert's last
        # full chunk also takes the remainder (fewer than split_rows rows) up to the expert's end and the remainder's
        # own slot gets no rows (shared_math.tuning.split_chunks). Surplus slots (expert -1) get no rows either: no
        # reduction steps, and both stores masked off.
        c = tl.program_id(0)
        e_raw = tl.load(chunk_expert_ptr + c)
        e = tl.maximum(e_raw, 0).to(tl.int64)
        start = tl.load(chunk_row_ptr + c)
        e_start = tl.load(offsets_ptr + e)
        e_end = tl.load(offsets_ptr + e + 1)
        last = e_start + tl.maximum((e_end - e_start) // split_rows - 1, 0) * split_rows
        end = tl.where(start < last, start + split_rows, tl.where(start == last, e_end, start))
        end = tl.where(e_raw >= 0, end, start)
    else:
        e = tl.program_id(0).to(tl.int64)
        start = tl.load(offsets_ptr + e)
        end = tl.load(offsets_ptr + e + 1)
    cdt = r_ptr.dtype.element_ty
    acc = tl.zeros([BLOCK_P, BLOCK_Q], dtype=tl.float32)
    for m0 in range(start, end, BLOCK_M):
        offs_m = m0 + tl.arange(0, BLOCK_M)
        mask_m = offs_m < end
        if GATHER_R:
            r_src = tl.load(r_index_ptr + offs_m, mask=mask_m, other=0).to(tl.int64)
        else:
            r_src = offs_m.to(tl.int64)
        r = tl.load(r_ptr + r_src[:, None] * stride_rm + offs_q[None, :] * stride_rq,
                    mask=mask_m[:, None] & mask_q[None, :], other=0.0)
        if ROW_SCALE:
            rs = tl.load(row_scale_ptr + offs_m, mask=mask_m, other=0.0).to(tl.float32)
            r = (r.to(tl.float32) * rs[:, None]).to(cdt)
        if LEFT == 0:
            if GATHER_L:
                l_src = tl.load(l_index_ptr + offs_m, mask=mask_m, other=0).to(tl.int64)
            else:
                l_src = offs_m.to(tl.int64)
            lt = tl.load(l_ptr + l_src[:, None] * stride_lm + offs_p[None, :] * stride_lp,
                         mask=mask_m[:, None] & mask_p[None, :], other=0.0)
        elif LEFT == 1:
            # h = act(gu) recomputed on load from the saved pre-activation: h [M, I] is never stored.
            rows = l_ptr + offs_m.to(tl.int64)[:, None] * stride_lm
            mask_mp = mask_m[:, None] & mask_p[None, :]
            g = tl.load(rows + offs_p[None, :] * stride_lp, mask=mask_mp, other=0.0).to(tl.float32)
            u = tl.load(rows + (offs_p + P_HALF)[None, :] * stride_lp, mask=mask_mp, other=0.0).to(tl.float32)
            lt = tl.where(mask_mp, _act_fwd(g, u, ACT, limit, act_alpha), 0.0).to(cdt)
        else:
            # A column of ones (p = 0 only): the column sum rides through the same dot (bias grads; tiny).
            lt = tl.where(mask_m[:, None] & (offs_p == 0)[None, :], 1.0, 0.0).to(cdt)
        acc = tl.dot(tl.trans(lt), r, acc, input_precision=DOT_PREC)
    mask_pq = mask_p[:, None] & mask_q[None, :]
    out_tile = out_ptr + e * stride_oe + offs_p[:, None] * stride_op + offs_q[None, :] * stride_oq
    if SPLIT:
        # An expert of one chunk (fewer than 2·split_rows rows) is finished here, as the unsplit kernel would (the
        # same row blocks in the same order: the same bits), and the chunk sum skips it: only crowded experts pay
        # for partials; a remainder's empty slot stores nothing. (the conditions become p bounds of the masks: a
        # scalar bool ANDed into a mask is refused by the interpreter)
        whole = (e_raw >= 0) & (start == e_start) & (e_end - e_start < 2 * split_rows)
        p_out = tl.where(whole, P, 0)
        p_part = tl.where((e_raw >= 0) & (start <= last), P, 0) - p_out
        tl.store(out_tile, (acc * alpha).to(out_ptr.dtype.element_ty),
                 mask=(offs_p < p_out)[:, None] & mask_q[None, :])
        tl.store(part_ptr + c.to(tl.int64) * stride_pc + offs_p[:, None] * stride_pp + offs_q[None, :] * stride_pq,
                 acc, mask=(offs_p < p_part)[:, None] & mask_q[None, :])
    else:
        acc = acc * alpha
        tl.store(out_tile, acc.to(out_ptr.dtype.element_ty), mask=mask_pq)


@triton.jit
def _grouped_gemm_tn_sum_kernel(
    part_ptr, stride_pc, stride_pp, stride_pq, offsets_ptr,
    out_ptr, stride_oe, stride_op, stride_oq,
    P, Q, E, alpha, split_rows,
    BLOCK_E: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_Q: tl.constexpr,
):
    """Pass 2 of `grouped_gemm_tn`'s split mode: out[e] = alpha·Σ partials of e's chunks, in chunk order (fixed:
    deterministic), for experts of two chunks or more (rows // split_rows of them: shared_math.tuning.split_chunks);
    zeros for experts with no rows; one-chunk experts were stored by pass 1. Expert e's slots are contiguous in the
    schedule from the exclusive prefix sum of cdiv(rows, split_rows), rebuilt here in registers from the E+1 offsets
    (E is at most a few hundred); its chunks are the first rows // split_rows of them."""
    e = tl.program_id(0)
    pid = tl.program_id(1)
    n_q = tl.cdiv(Q, BLOCK_Q)
    offs_p = (pid // n_q) * BLOCK_P + tl.arange(0, BLOCK_P)
    offs_q = (pid % n_q) * BLOCK_Q + tl.arange(0, BLOCK_Q)
    mask_pq = (offs_p < P)[:, None] & (offs_q < Q)[None, :]
    lanes = tl.arange(0, BLOCK_E)
    in_e = lanes < E
    lo = tl.load(offsets_ptr + lanes, mask=in_e, other=0)
    hi = tl.load(offsets_ptr + lanes + 1, mask=in_e, other=0)
    slots = (hi - lo + (split_rows - 1)) // split_rows  # 0 past E
    first = tl.sum(tl.where(lanes < e, slots, 0), 0)
    rows = tl.sum(tl.where(lanes == e, hi - lo, 0), 0)
    n = rows // split_rows  # partials to sum where >= 2 (a remainder rides in the last chunk)
    acc = tl.zeros([BLOCK_P, BLOCK_Q], dtype=tl.float32)
    ptrs = part_ptr + first.to(tl.int64) * stride_pc + offs_p[:, None] * stride_pp + offs_q[None, :] * stride_pq
    # one-chunk experts were finished by pass 1 (their partial was never written): no loads, and no store below
    for _ in range(0, tl.where(n > 1, n, 0)):
        acc += tl.load(ptrs, mask=mask_pq, other=0.0)
        ptrs += stride_pc  # pointer arithmetic: no int32 chunk·stride product
    acc = acc * alpha
    p_out = tl.where((n > 1) | (rows == 0), P, 0)  # one-chunk experts: pass 1 stored them
    tl.store(out_ptr + e.to(tl.int64) * stride_oe + offs_p[:, None] * stride_op + offs_q[None, :] * stride_oq,
             acc.to(out_ptr.dtype.element_ty), mask=(offs_p < p_out)[:, None] & (offs_q < Q)[None, :])


# ---- host side -------------------------------------------------------------------------------------------------------

def cdiv(a: int, b: int) -> int:
    """ceil(a / b) for the host. triton.cdiv is a ConstexprFunction in newer Triton (~10 µs a call through its
    argument unwrapping), and the launch path calls this a few dozen times per step."""
    return -(-a // b)


def next_pow2(n: int) -> int:
    """Smallest power of two >= n (n >= 1), for the host (see cdiv)."""
    return 1 << (n - 1).bit_length()


def _dot_prec(dtype: torch.dtype) -> str:
    # fp32 mode is for equivalence: never let tl.dot drop to TF32 (ARCHITECTURE.md numerics policy).
    return "ieee" if dtype == torch.float32 else "tf32"


def _strides3(t: torch.Tensor | None) -> tuple[int, int, int]:
    return (0, 0, 0) if t is None else tuple(t.stride())


def _strides2(t: torch.Tensor | None) -> tuple[int, int]:
    return (0, 0) if t is None else tuple(t.stride())


def z_config(config: dict, rank: int) -> dict:
    """The config of a pass's LoRA z launch (z = x·A, output width R) from the pass's own: R-wide column tiles, the
    rest as the pass (so the z of a separate launch sums like the pass's), no z pre-pass of its own, rows read as
    given (both NN kernel families take the same dict), and the epilogue whole: an R-wide tile with a plain store
    has nothing to split (EPI_SPLIT is the Hopper kernel's, for wide tiles with heavy epilogues)."""
    return dict(config, BLOCK_N=max(16, next_pow2(rank)), Z_PRE=False, PRE_GATHER=False, EPI_SPLIT=1)


def reduction_major(t_EDR: torch.Tensor, dtype: torch.dtype | None = None, kernel: bool | None = None) -> torch.Tensor:
    """The same [E, D, R] values stored as [E, R, D] (D contiguous), returned as the [E, D, R] view; one copy that
    also casts to `dtype`: on a GPU (or with `kernel=True`, e.g. interpreted) by `layout.cast_transpose_into`, a
    tiled kernel coalesced on both sides (`Tensor.copy_` between these layouts is a strided element-wise copy, see
    layout.py); elsewhere by `copy_`.

    The in-loop LoRA-A operand is loaded as [BLOCK_D, BLOCK_R] tiles. With R contiguous, each of its rows is only
    R elements long (6 bytes at R=3 in bf16): poorly coalesced, and on the H200 with Triton 3.6 such a bf16 operand
    gave wrong results (odd_dims case: z off by 10x) while fp32 was right. With D contiguous every tile row is a full
    BLOCK_D run, the same layout as the transposed B factors the backward feeds to the same slot.
    """
    E, D, R = t_EDR.shape
    # allocated with the [E, R, D] storage's strides, so the copy lands in place and no transpose views are made
    out = torch.empty_strided((E, D, R), (R * D, 1, D), device=t_EDR.device, dtype=dtype or t_EDR.dtype)
    if t_EDR.is_cuda if kernel is None else kernel:
        return cast_transpose_into(t_EDR, out)
    return out.copy_(t_EDR)


def grouped_gemm(a: torch.Tensor, w_EDN: torch.Tensor, schedule, offsets_E1: torch.Tensor, *, n: int,
                 out: torch.Tensor, config: dict, row_index: torch.Tensor | None = None,
                 lora_a_EDR: torch.Tensor | None = None, z_MR: torch.Tensor | None = None, store_z: bool = False,
                 lora_b_ERN: torch.Tensor | None = None, z_scale: float = 1.0, lora_scale: float = 1.0,
                 bias_EN: torch.Tensor | None = None,
                 row_scale_M: torch.Tensor | None = None, mode: int = MODE_PLAIN, act: int = ACT_NONE,
                 gu_M2I: torch.Tensor | None = None, store_gu: bool = False, out_rows_M: torch.Tensor | None = None,
                 dot_MT: torch.Tensor | None = None, limit: float = 7.0, alpha: float = 1.702,
                 out_scale: float = 1.0) -> torch.Tensor:
    """Launch `_grouped_gemm_kernel` (see the module docstring). `schedule` = (tile_expert, tile_row) for
    config["BLOCK_M"]; `n` is the output width per half (I in the act modes). `out_scale` multiplies the output of
    the plain mode. Returns `out`.

    config["Z_PRE"] (LoRA with an A factor only): compute z = z_scale·A[src]@LA first, in one skinny launch of the
    same kernel (output width R, read of A once), then run the main pass with that z given. The in-loop product is
    otherwise recomputed by every one of the cdiv(n, BLOCK_N) column tiles: at Qwen3-30B shapes about +50% FLOPs
    per pass, while the separate launch costs one more read of the A rows. The tuner picks per pass.
    """
    d = w_EDN.shape[1]
    if lora_a_EDR is not None and lora_a_EDR.stride(1) != 1:
        lora_a_EDR = reduction_major(lora_a_EDR)
    if lora_a_EDR is not None and lora_b_ERN is not None and config.get("Z_PRE", False):
        rank = lora_b_ERN.shape[1]
        if z_MR is None:
            z_MR = torch.empty((a.shape[0] if row_index is None else row_index.shape[0], rank), device=a.device,
                               dtype=lora_b_ERN.dtype)
        grouped_gemm(a, lora_a_EDR, schedule, offsets_E1, n=rank, out=z_MR, config=z_config(config, rank),
                     row_index=row_index, out_scale=z_scale)
        return grouped_gemm(a, w_EDN, schedule, offsets_E1, n=n, out=out, config=dict(config, Z_PRE=False),
                            row_index=row_index, z_MR=z_MR, lora_b_ERN=lora_b_ERN, lora_scale=lora_scale,
                            bias_EN=bias_EN, row_scale_M=row_scale_M, mode=mode, act=act, gu_M2I=gu_M2I,
                            store_gu=store_gu, out_rows_M=out_rows_M, dot_MT=dot_MT, limit=limit, alpha=alpha,
                            out_scale=out_scale)
    lora = LORA_NONE if lora_b_ERN is None else (LORA_FUSE_Z if lora_a_EDR is not None else LORA_GIVEN_Z)
    rank = 0 if lora_b_ERN is None else lora_b_ERN.shape[1]
    lb = lora_b_ERN if lora_b_ERN is not None else w_EDN  # dummy pointers carry the compute dtype
    z = z_MR if z_MR is not None else lb
    tile_expert, tile_row = schedule
    bm, bn, bd = config["BLOCK_M"], config["BLOCK_N"], config["BLOCK_D"]
    grid = (tile_expert.numel(), cdiv(n, bn))
    dummy = offsets_E1
    launch(_grouped_gemm_kernel, grid, (
        a, *_strides2(a), row_index if row_index is not None else dummy,
        w_EDN, *_strides3(w_EDN),
        tile_expert, tile_row, offsets_E1,
        lora_a_EDR if lora_a_EDR is not None else lb, *_strides3(lora_a_EDR),
        z, *_strides2(z_MR),
        lb, *_strides3(lora_b_ERN),
        bias_EN if bias_EN is not None else lb, *_strides2(bias_EN),
        row_scale_M if row_scale_M is not None else dummy,
        gu_M2I if gu_M2I is not None else lb, *_strides2(gu_M2I),
        out, *out.stride(), out_rows_M if out_rows_M is not None else dummy,
        dot_MT if dot_MT is not None else dummy, *_strides2(dot_MT),
        n, d, rank, n, float(z_scale), float(lora_scale), float(out_scale), float(limit), float(alpha),
    ), dict(
        GATHER_A=row_index is not None, LORA=lora, STORE_Z=bool(store_z and lora == LORA_FUSE_Z),
        HAS_BIAS=bias_EN is not None, ROW_SCALE=row_scale_M is not None,
        MODE=mode, ACT=act, STORE_GU=bool(store_gu), SCATTER_OUT=out_rows_M is not None,
        DOT_PREC=_dot_prec(a.dtype), BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=bd,
        BLOCK_R=max(16, next_pow2(max(rank, 1))),
    ), num_warps=config.get("num_warps", 4), num_stages=config.get("num_stages", 2))
    return out


def grouped_gemm_tn(left: torch.Tensor | None, right: torch.Tensor, offsets_E1: torch.Tensor, *, num_experts: int,
                    p: int, config: dict, left_index: torch.Tensor | None = None,
                    right_index: torch.Tensor | None = None, row_scale_M: torch.Tensor | None = None,
                    left_act: int = ACT_NONE, alpha: float = 1.0, limit: float = 7.0, act_alpha: float = 1.702,
                    out_dtype: torch.dtype = torch.float32,
                    schedule: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """Per-expert `alpha·Lrows^T diag(row_scale) Rrows` -> [E, p, Q] (see the module docstring).

    left=None: a column of ones (p must be 1). left_act != ACT_NONE: `left` is gu [M, 2I] and Lrows = act(gu),
    p = I. Accumulates in fp32; `out_dtype` float32 by default (LoRA grads feed fp32 master weights).

    config["SPLIT_ROWS"] = N > 0 (a multiple of BLOCK_M; 0 or absent: one program per expert and tile, as always):
    an expert's rows are reduced in chunks of N to 2N - 1 rows (`shared_math.tuning.split_chunks`) by separate
    programs, then summed per expert in chunk order by a second launch (deterministic, no atomics). Each program of
    the unsplit kernel walks all of its expert's rows, so one crowded expert sets the launch's length: on the GPU in
    session 17 (benchmarks/results/session17_2026-12-06, benchmarks/tn_probe.py) the four launches of a Qwen3-30B
    layer at T=16384 took 0.83 ms with uniform routing (near cuBLAS) and 1.56 ms when one expert got 16x the mean
    rows (--skew 2), and the training step's profile had them at 1.9 ms (random-weight router, busiest expert
    1.5-2.4x the mean); dispatching the heaviest expert first gave nothing. The shipped table has no SPLIT_ROWS;
    `split_lora.tn_split_rows` sets it on CUDA (its default, or SPLITMOE_TN_SPLIT_ROWS; tn_probe.py --split-rows).
    `schedule` = (chunk_expert, chunk_row) of the split, the row-block schedule for block N
    (`split_lora.KernelSort.schedule(N)`: the Function passes its sort's, built once per layer and shared by the
    four launches, instead of each launch rebuilding it); None: built here by `schedule.row_block_schedule` (one
    launch, the same values as the sort's; not a second copy of its torch ops), so direct callers need no sort
    object. Unused when not splitting.
    """
    q = right.shape[1]
    out = torch.empty((num_experts, p, q), device=right.device, dtype=out_dtype)
    if left is None:
        mode, lft = LEFT_ONES, right
    else:
        mode, lft = (LEFT_ACT if left_act != ACT_NONE else LEFT_ROWS), left
    bm, bp, bq = config["BLOCK_M"], config["BLOCK_P"], config["BLOCK_Q"]
    split = int(config.get("SPLIT_ROWS", 0) or 0)
    if split < 0 or split % bm:
        raise ValueError(f"config SPLIT_ROWS={split}: want 0 (off) or a positive multiple of BLOCK_M={bm}")
    tiles = cdiv(p, bp) * cdiv(q, bq)
    dummy = offsets_E1
    part = None
    if split:
        if schedule is None:
            rows = (right_index if right_index is not None else right).shape[0]
            schedule = row_block_schedule(offsets_E1.to(torch.int32), split, rows)[:2]
        chunk_expert, chunk_row = schedule
        # partials of every chunk the schedule can hold (its static upper length cdiv(M, N) + E: no host sync);
        # only the chunks of experts with two or more are written and read
        part = torch.empty((chunk_expert.numel(), p, q), device=right.device, dtype=torch.float32)
        grid = (chunk_expert.numel(), tiles)
    else:
        chunk_expert = chunk_row = dummy
        grid = (num_experts, tiles)
    launch(_grouped_gemm_tn_kernel, grid, (
        lft, *lft.stride(), left_index if left_index is not None else dummy,
        right, *right.stride(), right_index if right_index is not None else dummy,
        row_scale_M if row_scale_M is not None else dummy, offsets_E1, chunk_expert, chunk_row,
        out, *out.stride(),
        part if part is not None else out, *_strides3(part),
        p, q, p, float(alpha), float(limit), float(act_alpha), split,
    ), dict(
        GATHER_L=left_index is not None, GATHER_R=right_index is not None, LEFT=mode, ACT=left_act,
        ROW_SCALE=row_scale_M is not None, DOT_PREC=_dot_prec(right.dtype), SPLIT=bool(split),
        BLOCK_M=bm, BLOCK_P=bp, BLOCK_Q=bq,
    ), num_warps=config.get("num_warps", 4), num_stages=config.get("num_stages", 2))
    if split:
        launch(_grouped_gemm_tn_sum_kernel, (num_experts, tiles), (
            part, *part.stride(), offsets_E1, out, *out.stride(), p, q, num_experts, float(alpha), split,
        ), dict(BLOCK_E=max(16, next_pow2(num_experts)), BLOCK_P=bp, BLOCK_Q=bq),
            num_warps=4, num_stages=2)  # untuned: a small memory-bound sum, Triton's default warps
    return out
