"""Routed experts with split LoRA on the fused Triton kernels: one expert sort, four grouped GEMMs forward and backward.

Computes what `shared_math.reference.split_lora_experts` does (y [T, H]), with an autograd.Function whose backward
gives every gradient (x, expert_weights, both LoRA pairs, biases, and the base weights in full fine-tuning mode).
Shapes: T tokens, H hidden, I expert intermediate, E experts, K experts per token, R LoRA rank, M = T·K rows.

Forward (s = scale; rows sorted by expert once, `token[m]` = source token of sorted row m, `flat[m]` = its t·K+k):
  1. gate_up pass (`grouped_gemm`, act="fwd"): x rows gathered in the load; z1 = x@A1 in the same reduction loop;
     gu = x@Wgu + s·z1@B1 + b_gu with gate and up columns of one tile in one program; h = act(gu) -> [M, I].
     Saved for backward: gu [M, 2I] (pre-activation) and z1 [M, R].
  2. down pass (`grouped_gemm`): z2 = h@A2 in-loop; o = h@Wd + s·z2@B2 + b_d; times w[m]; stored to row flat[m],
     y = out.view(T, K, H).sum(1) (deterministic). Saved: z2 [M, R]. h, o, x[perm] are never saved.
Backward (dy [T, H]; dh' and dZ2' are per unit routing weight):
  3. dh pass (`grouped_gemm`, act="bwd"): dh' = dy[token]@Wd^T + dZ2'@A2^T with dZ2' = s·dy[token]@B2^T in-loop;
     epilogue: d expert_weights partials <h, dh'> (h recomputed from gu; + <b_d, dy> from a [T,H]x[H,E] GEMM),
     dh = w·dh', dgu = act_vjp(gu, dh) -> [M, 2I]. d expert_weights = partials.sum(1): <o, dy> without o.
  4. dx pass (`grouped_gemm`): dZ1 = s·dgu@B1^T in-loop; dx rows = dgu@Wgu^T + dZ1@A1^T scattered to flat[m],
     summed over K.
  Ragged-K products (`grouped_gemm_tn`, fp32): dB2 = s·Z2^T(w·dy), dA2 = h^T(w·dZ2'), dB1 = s·Z1^T dgu,
     dA1 = x_rows^T dZ1; only when asked (needs_input_grad): dWd = h^T(w·dy), dWgu = x_rows^T dgu, bias grads.
     A crowded expert's rows may be split over several programs (SPLIT_ROWS; SPLITMOE_TN_SPLIT_ROWS, `tn_split_rows`).
Why save gu rather than h or recompute the gate_up GEMM: gu [M, 2I] is everything the backward needs (h = act(gu) is
recomputed elementwise inside the kernels that read it), one GEMM's worth of FLOPs cheaper than recomputing gu, and
less memory than saving gu and h (3I) as a plain grouped_mm implementation does, plus its x[perm] and o copies.
"""

from __future__ import annotations

import os
from types import SimpleNamespace

import torch
import torch.nn.functional as F

from shared_math.tuning import env_split_rows
from torch_impl.backends.common import capture_residuals, capturing_residuals, gu_z1_z2, replayed_residuals
from torch_impl.kernels import autotune
from torch_impl.kernels import grouped_gemm as gg
from torch_impl.kernels.schedule import row_block_schedule


class KernelSort:
    """The one stable sort of the T·K routed rows by expert, shared by every pass of forward and backward.

    `flat_M[m]` is sorted row m's position t·K+k in the flattened routing, `token_M[m] = flat_M[m] // K`, expert e
    owns sorted rows `offsets_E1[e]:offsets_E1[e+1]` (int32, E+1 entries). The kernels read the two row indices in
    either integer width: `from_ids` makes them int32, `from_expert_sort` takes the backends' `ExpertSort` int64
    tensors as they are (a layer sorts once, and every forward spends no casts on them). Neither waits on the GPU.
    Row-block schedules for the NN kernel are cached per BLOCK_M.
    """

    def __init__(self, flat_M: torch.Tensor, token_M: torch.Tensor, offsets_E1: torch.Tensor, T: int, K: int):
        self.flat_M, self.token_M, self.offsets_E1 = flat_M, token_M, offsets_E1
        self.num_experts, self.T, self.K, self.M = offsets_E1.numel() - 1, T, K, T * K
        self._schedules: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self._tile_counts: dict[int, torch.Tensor] = {}

    @classmethod
    def from_ids(cls, expert_ids_TK: torch.Tensor, num_experts: int) -> KernelSort:
        T, K = expert_ids_TK.shape
        flat_ids = expert_ids_TK.reshape(-1)
        perm = torch.argsort(flat_ids, stable=True)
        bounds = torch.arange(num_experts + 1, device=flat_ids.device, dtype=flat_ids.dtype)
        # searchsorted on the sorted ids, not bincount: bincount syncs with the host to size its output
        offsets_E1 = torch.searchsorted(flat_ids[perm], bounds).to(torch.int32)
        return cls(perm.to(torch.int32), (perm // K).to(torch.int32), offsets_E1, T, K)

    @classmethod
    def from_expert_sort(cls, srt) -> KernelSort:
        """From `torch_impl.backends.common.ExpertSort` (order_M, token_M, offsets_E = int32 cumulative group ends),
        with one op: the leading 0 of the offsets."""
        offsets_E1 = F.pad(srt.offsets_E, (1, 0))
        return cls(srt.order_M, srt.token_M, offsets_E1, srt.num_tokens, srt.top_k)

    def schedule(self, block_m: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(tile_expert, tile_row) for row blocks of `block_m` that never straddle two experts, int32.

        The length is the upper bound cdiv(M, block_m) + E, known without a sync; surplus tiles get expert -1 (and a
        row the kernels never read). All int32, 16 small torch ops; the schedule is built in every layer's forward.
        On a GPU one launch instead (`kernels.schedule.row_block_schedule`: the same values, in the interpreter
        tests and compiled on an H100, 2026-12-06); SPLITMOE_SCHEDULE_KERNEL=0 keeps the torch ops.
        """
        if (block_m not in self._schedules and self.offsets_E1.is_cuda
                and os.environ.get("SPLITMOE_SCHEDULE_KERNEL", "1") != "0"):
            tile_expert, tile_row, count = row_block_schedule(self.offsets_E1.to(torch.int32), block_m, self.M)
            self._schedules[block_m], self._tile_counts[block_m] = (tile_expert, tile_row), count
        if block_m not in self._schedules:
            E, bm = self.num_experts, block_m
            offs = self.offsets_E1.to(torch.int32)  # a no-op on the int32 offsets every constructor makes
            tiles = (offs.diff() + (bm - 1)).div_(bm, rounding_mode="floor")
            tile_end = tiles.cumsum(0, dtype=torch.int32)
            i = torch.arange(gg.cdiv(self.M, bm) + E, device=offs.device, dtype=torch.int32)
            e = torch.searchsorted(tile_end, i, right=True, out_int32=True)  # E for the surplus tiles
            # tile i's first sorted row: offs[e] + (i - tile_start[e])·bm = base[e] + i·bm
            base = F.pad(offs[:-1] - (tile_end - tiles) * bm, (0, 1))
            row = base[e].add_(i, alpha=bm)
            self._schedules[block_m] = (e.masked_fill_(e == E, -1), row)
            self._tile_counts[block_m] = tile_end[-1:]
        return self._schedules[block_m]

    def row_tile_count(self, block_m: int) -> torch.Tensor:
        """The number of valid row tiles of `schedule(block_m)` (they come first), as a [1] int32 device tensor:
        what the persistent Hopper kernel loops to, read on the device (no host sync)."""
        self.schedule(block_m)
        return self._tile_counts[block_m]


def _bucket(m: int) -> int:
    return gg.next_pow2(max(m, 1))


KERNELS = ("triton", "hopper")


class _NN:
    """The NN grouped-GEMM family that runs the four passes: "triton" (`grouped_gemm.grouped_gemm`, one program per
    tile, any sm80+ GPU) or "hopper" (`hopper.grouped_gemm`, persistent with TMA weights, sm_90+). Both take the
    same arguments; each has its own autotune kinds ("gemm" vs "hopper_gemm") and schedule form."""

    def __init__(self, name: str):
        if name not in KERNELS:
            raise ValueError(f"unknown kernels {name!r}; expected one of {', '.join(KERNELS)}")
        self.name = name
        if name == "hopper":
            from torch_impl.kernels import hopper

            self.gemm, self.prefix = hopper.grouped_gemm, "hopper_"
        else:
            self.gemm, self.prefix = gg.grouped_gemm, ""

    def schedule(self, srt: KernelSort, block_m: int) -> tuple:
        if self.name == "hopper":
            return srt.schedule(block_m) + (srt.row_tile_count(block_m),)
        return srt.schedule(block_m)


def _gemm(nn: _NN, kind: str, key: tuple, srt: KernelSort, ref: torch.Tensor, launch):
    """Pick a config (autotune.get_config) and run `launch(cfg, schedule)`, which allocates and returns its outputs."""
    cfg = autotune.get_config(nn.prefix + kind, (_bucket(srt.M),) + key, ref.dtype, ref.device,
                              bench=lambda c: launch(c, nn.schedule(srt, c["BLOCK_M"])),
                              rows_per_expert=srt.M / srt.num_experts)
    return launch(cfg, nn.schedule(srt, cfg["BLOCK_M"]))


def _z_only(nn: _NN, key: tuple, srt: KernelSort, a_MD: torch.Tensor, lora_a: torch.Tensor, rank: int
            ) -> torch.Tensor:
    """z = a@A per expert [M, R] on its own: the LoRA z of the pass named by `key` without that pass's GEMM. The
    config is the pass's (never tuned on this launch: no bench) with R-wide column tiles, as the pass's own z launch
    runs it (Z_PRE; always on the Hopper kernels): the same values. A pass that computes z in its loop instead sums
    the same products per BLOCK_D step in the same order; its tile shape may still round differently."""
    cfg = gg.z_config(autotune.get_config(nn.prefix + "gemm", (_bucket(srt.M),) + key, a_MD.dtype, a_MD.device),
                      rank)
    z = torch.empty((srt.M, rank), device=a_MD.device, dtype=a_MD.dtype)
    nn.gemm(a_MD, lora_a, nn.schedule(srt, cfg["BLOCK_M"]), srt.offsets_E1, n=rank, out=z, config=cfg)
    return z


TN_SPLIT_ROWS_ENV = "SPLITMOE_TN_SPLIT_ROWS"


# grouped_gemm_tn's split size on CUDA where the config names none (the shipped table names none). With the fused
# attention LoRA branch it took Qwen3-30B-A3B's 16K step (24 layers, H100) from 831.8 to 795.2 ms and gpt-oss-20b's
# from 1020.8 to 1017.1 (benchmarks/REPORT.md, session 20): the step benchmark's random routers crowd a few experts.
# An expert of fewer than twice this many rows runs as in the unsplit kernel (the same bits); only crowded ones
# split, into chunks of this many rows with the remainder in the last (shared_math.tuning.split_chunks).
# 2048, not session 20's 1024. On the evenly routed 16K block (H100, one call, session 28: `gpu_session.sh
# session24tn`) 1024-row chunks cost 0.28 ms on Qwen3 (8.660 against 8.383 ms unsplit) and 0.50 on gpt-oss (16.440
# against 15.938), 2048 nothing (8.384, 15.880): no expert splits there, but the grid has cdiv(rows, N) + E chunk
# slots per tile (most exit at once) and as many fp32 partial tiles allocated. With crowded experts (`tn_probe.py
# --skew 1 / 2`, a layer's four launches) 2048 is as fast: gpt-oss 1.267 / 1.310 ms against 1.264 / 1.287 at 1024,
# Qwen3 1.083 / 1.089 against 1.152 / 1.145 (sessions 28 and 23); 4096 is slower (Qwen3 1.375 / 1.371, gpt-oss
# 1.510 / 1.505). Qwen3's 16K step (24 layers, H100, session 29) does not see the size: 804.5 ms at 2048, 804.4 at
# 1024.
DEFAULT_TN_SPLIT_ROWS = 2048


def tn_split_rows(config: dict, device: torch.device | None = None) -> dict:
    """`config` of a ragged-K launch with SPLITMOE_TN_SPLIT_ROWS applied: N > 0 sets SPLIT_ROWS=N (grouped_gemm_tn's
    split mode: a crowded expert's rows over several programs), 0 turns it off; unset keeps the config's own, else
    on CUDA `DEFAULT_TN_SPLIT_ROWS` where it is a multiple of BLOCK_M (off elsewhere: the interpreter's tests keep
    their launches). Lets the GPU step benchmark time split sizes (its rows record the SPLITMOE_* variables). N must
    be a multiple of the config's BLOCK_M (chunks start on the row blocks the kernel walks): ValueError otherwise,
    naming the variable."""
    n = env_split_rows(TN_SPLIT_ROWS_ENV, config["BLOCK_M"], "BLOCK_M")
    if n is None:
        if "SPLIT_ROWS" in config or device is None or device.type != "cuda" \
                or DEFAULT_TN_SPLIT_ROWS % config["BLOCK_M"]:
            return config
        n = DEFAULT_TN_SPLIT_ROWS
    return dict(config, SPLIT_ROWS=n)


def _tn(key: tuple, srt: KernelSort, ref: torch.Tensor, **kw) -> torch.Tensor:
    def launch(c):
        n = c.get("SPLIT_ROWS", 0)
        # a split's chunk schedule is the sort's row-block schedule for block n: cached per sort, so the four
        # launches of a layer build it once (one launch on the GPU)
        return gg.grouped_gemm_tn(offsets_E1=srt.offsets_E1, num_experts=srt.num_experts, config=c,
                                  schedule=srt.schedule(n) if n else None, **kw)
    cfg = autotune.get_config("tn", (_bucket(srt.M),) + key, ref.dtype, ref.device, bench=launch,
                              rows_per_expert=srt.M / srt.num_experts)
    return launch(tn_split_rows(cfg, ref.device))


def _t(t: torch.Tensor | None) -> torch.Tensor | None:
    """[E, a, b] -> [E, b, a] as a strided view: the kernels take strides, so transposes are free."""
    return None if t is None else t.transpose(1, 2)


def _dtypes(*tensors) -> list[torch.dtype | None]:
    """The dtypes the backward returns its gradients in (None for an absent input)."""
    return [None if t is None else t.dtype for t in tensors]


def _kernel_operands(x, expert_weights, a1, b1, a2, b2, b_gu, b_d, srt: KernelSort):
    """What the kernels read besides x and the base weights: the LoRA factors and biases in x's dtype (they may be
    fp32 masters: tiny copies), the A factors stored reduction-major in the same copy (see gg.reduction_major for
    why), and the routing weight of each sorted row in fp32. The forward and `backward_from_residuals` both build
    them here, so both hand the backward the same values."""
    dt = x.dtype
    b1, b2, b_gu, b_d = (None if t is None else t.to(dt) for t in (b1, b2, b_gu, b_d))
    a1, a2 = (None if t is None else gg.reduction_major(t, dt) for t in (a1, a2))
    w_sorted = expert_weights.reshape(-1)[srt.flat_M].float()
    return a1, b1, a2, b2, b_gu, b_d, w_sorted


class SplitLoraExpertsFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, expert_weights, w_gate_up, w_down, a1, b1, a2, b2, b_gu, b_d, srt: KernelSort, scale, act,
                limit, alpha, kernels="triton", output_unread=False):
        T, H = x.shape
        I2 = w_gate_up.shape[2]
        I, K = I2 // 2, srt.K
        dt = x.dtype
        ctx.param_dtypes = _dtypes(x, expert_weights, w_gate_up, w_down, a1, b1, a2, b2, b_gu, b_d)
        a1, b1, a2, b2, b_gu, b_d, w_sorted = _kernel_operands(x, expert_weights, a1, b1, a2, b2, b_gu, b_d, srt)
        M = srt.M
        # the custom op keeps gu, z1, z2 even without grad (common.op_residuals), for its backward
        grad = any(ctx.needs_input_grad[:10]) or capturing_residuals()
        r1 = 0 if b1 is None else b1.shape[1]
        r2 = 0 if b2 is None else b2.shape[1]
        nn = _NN(kernels)
        replay = replayed_residuals()
        if replay is not None:  # the custom op's backward: gu, z1, z2 of its forward, no GEMMs
            gu, z1, z2 = gu_z1_z2(replay, r1 > 0, r2 > 0)
            y = x.new_empty((T, H))  # a placeholder: only the graph is used
        else:
            def gate_up(cfg, sched):
                h = torch.empty((M, I), device=x.device, dtype=dt)
                gu = torch.empty((M, I2), device=x.device, dtype=dt) if grad else None
                z1 = torch.empty((M, r1), device=x.device, dtype=dt) if grad and r1 else None
                nn.gemm(x, w_gate_up, sched, srt.offsets_E1, n=I, out=h, config=cfg, row_index=srt.token_M,
                        lora_a_EDR=a1, z_MR=z1, store_z=z1 is not None, lora_b_ERN=b1, lora_scale=scale,
                        bias_EN=b_gu, mode=gg.MODE_ACT_FWD, act=act, gu_M2I=gu, store_gu=gu is not None,
                        limit=limit, alpha=alpha)
                return h, gu, z1

            h, gu, z1 = _gemm(nn, "gemm_act", ("gu", H, I, r1, act), srt, x, gate_up)

            if output_unread and grad:
                # activation checkpointing's recompute: the backward reads gu, z1, z2 and never y, so the down GEMM
                # (a third of the forward's FLOPs) is skipped; z2 = h@A2 runs alone, as the down pass's z launch would
                z2 = _z_only(nn, ("down", I, H, r2), srt, h, a2, r2) if r2 else None
                # never read (see split_lora_experts); NaN, so that a caller who breaks that promise gets NaN
                # gradients, not quietly wrong ones
                y = x.new_full((T, H), float("nan"))
            else:
                def down(cfg, sched):
                    out = torch.empty((M, H), device=x.device, dtype=dt)
                    z2 = torch.empty((M, r2), device=x.device, dtype=dt) if grad and r2 else None
                    nn.gemm(h, w_down, sched, srt.offsets_E1, n=H, out=out, config=cfg, lora_a_EDR=a2, z_MR=z2,
                            store_z=z2 is not None, lora_b_ERN=b2, lora_scale=scale, bias_EN=b_d,
                            row_scale_M=w_sorted, out_rows_M=srt.flat_M)
                    return out, z2

                out_MH, z2 = _gemm(nn, "gemm", ("down", I, H, r2), srt, x, down)
                y = out_MH.view(T, K, H).sum(1)  # rows in (token, slot) order: the sum over K is deterministic
            capture_residuals(gu, z1, z2)

        ctx.save_for_backward(x, expert_weights, w_gate_up, w_down, a1, b1, a2, b2, b_gu, b_d, gu, z1, z2,
                              w_sorted)
        ctx.srt, ctx.scale, ctx.act, ctx.limit, ctx.alpha, ctx.nn = srt, scale, act, limit, alpha, nn
        return y

    @staticmethod
    def backward(ctx, dy):
        x, ew, w_gate_up, w_down, a1, b1, a2, b2, b_gu, b_d, gu, z1, z2, w_sorted = ctx.saved_tensors
        srt, s, act, limit, alpha, nn = ctx.srt, ctx.scale, ctx.act, ctx.limit, ctx.alpha, ctx.nn
        g_x, g_w, g_wgu, g_wd, g_a1, g_b1, g_a2, g_b2, g_bgu, g_bd = ctx.needs_input_grad[:10]
        T, H = x.shape
        I2 = w_gate_up.shape[2]
        I, K, M, dt = I2 // 2, srt.K, srt.M, x.dtype
        dy = dy.to(dt)
        lora1, lora2 = b1 is not None, b2 is not None
        grads: dict[str, torch.Tensor | None] = {}
        need_dgu = g_x or g_a1 or g_b1 or g_wgu or g_bgu

        dgu = dz2 = None
        if need_dgu or g_w or (g_a2 and lora2):
            def dh_pass(cfg, sched):
                dgu = torch.empty((M, I2), device=x.device, dtype=dt)
                dots = torch.empty((M, gg.cdiv(I, cfg["BLOCK_N"])), device=x.device, dtype=torch.float32)
                dz2 = torch.empty((M, b2.shape[1]), device=x.device, dtype=dt) if g_a2 and lora2 else None
                nn.gemm(dy, _t(w_down), sched, srt.offsets_E1, n=I, out=dgu, config=cfg,
                        row_index=srt.token_M, lora_a_EDR=_t(b2), z_MR=dz2, store_z=dz2 is not None,
                        lora_b_ERN=_t(a2), z_scale=s, lora_scale=1.0,
                        row_scale_M=w_sorted, mode=gg.MODE_ACT_BWD,
                        act=act, gu_M2I=gu, dot_MT=dots, limit=limit, alpha=alpha)
                return dgu, dots, dz2

            dgu, dots, dz2 = _gemm(nn, "gemm", ("dh", H, I, b2.shape[1] if lora2 else 0, act), srt, x, dh_pass)
            if g_w:
                dw = torch.empty(M, device=x.device, dtype=torch.float32)
                dw_sorted = dots.sum(1)
                if b_d is not None:
                    # <b_d[e], dy[t]> for every (token, expert) is one small [T, H]x[H, E] GEMM, then a gather;
                    # kept out of the kernel: fusing it as an elementwise row dot in the pipelined loop miscompiled
                    # in bf16 on the H200 (Triton 3.6: gpu_oai's dz2' off by 7%), and it is tiny here.
                    expert_M = torch.searchsorted(srt.offsets_E1[1:], torch.arange(M, device=x.device,
                                                  dtype=torch.int32), right=True)
                    dw_sorted += (dy.float() @ b_d.float().t())[srt.token_M, expert_M]
                dw[srt.flat_M] = dw_sorted  # a permutation: unique indices, deterministic
                grads["w"] = dw.view(T, K)

        tok = srt.token_M
        if g_b2 and lora2:
            grads["b2"] = _tn(("dB2", b2.shape[1], H), srt, x, left=z2, right=dy, p=b2.shape[1], right_index=tok,
                              row_scale_M=w_sorted, alpha=s)
        if g_a2 and lora2:
            grads["a2"] = _tn(("dA2", I, b2.shape[1], act), srt, x, left=gu, right=dz2, p=I, left_act=act,
                              row_scale_M=w_sorted, limit=limit, act_alpha=alpha)
        if g_wd:
            grads["wd"] = _tn(("dWd", I, H, act), srt, x, left=gu, right=dy, p=I, left_act=act, right_index=tok,
                              row_scale_M=w_sorted, limit=limit, act_alpha=alpha)
        if g_bd and b_d is not None:
            grads["bd"] = _tn(("db", 1, H), srt, x, left=None, right=dy, p=1, right_index=tok,
                              row_scale_M=w_sorted)[:, 0]

        dz1 = None
        if g_x:
            def dx_pass(cfg, sched):
                dx_MH = torch.empty((M, H), device=x.device, dtype=dt)
                dz1 = torch.empty((M, b1.shape[1]), device=x.device, dtype=dt) if g_a1 and lora1 else None
                nn.gemm(dgu, _t(w_gate_up), sched, srt.offsets_E1, n=H, out=dx_MH, config=cfg,
                        lora_a_EDR=_t(b1), z_MR=dz1, store_z=dz1 is not None, lora_b_ERN=_t(a1),
                        z_scale=s, lora_scale=1.0, out_rows_M=srt.flat_M)
                return dx_MH, dz1

            dx_MH, dz1 = _gemm(nn, "gemm", ("dx", I2, H, b1.shape[1] if lora1 else 0), srt, x, dx_pass)
            grads["x"] = dx_MH.view(T, K, H).sum(1)
        elif g_a1 and lora1:
            # x needs no grad (rare): dZ1 alone is a skinny N=R pass instead of the whole dx GEMM.
            def dz1_pass(cfg, sched):
                dz1 = torch.empty((M, b1.shape[1]), device=x.device, dtype=dt)
                nn.gemm(dgu, _t(b1), sched, srt.offsets_E1, n=b1.shape[1], out=dz1, config=cfg)
                return dz1.mul_(s)

            dz1 = _gemm(nn, "gemm", ("dz1", I2, b1.shape[1]), srt, x, dz1_pass)
        if g_b1 and lora1:
            grads["b1"] = _tn(("dB1", b1.shape[1], I2), srt, x, left=z1, right=dgu, p=b1.shape[1], alpha=s)
        if g_a1 and lora1:
            grads["a1"] = _tn(("dA1", H, b1.shape[1]), srt, x, left=x, right=dz1, p=H, left_index=tok)
        if g_wgu:
            grads["wgu"] = _tn(("dWgu", H, I2), srt, x, left=x, right=dgu, p=H, left_index=tok)
        if g_bgu and b_gu is not None:
            grads["bgu"] = _tn(("db", 1, I2), srt, x, left=None, right=dgu, p=1)[:, 0]

        names = ("x", "w", "wgu", "wd", "a1", "b1", "a2", "b2", "bgu", "bd")
        out = [None if grads.get(n) is None else grads[n].to(dtype)
               for n, dtype in zip(names, ctx.param_dtypes)]
        return (*out, None, None, None, None, None, None, None)


def backward_from_residuals(dy: torch.Tensor, x: torch.Tensor, expert_weights: torch.Tensor,
                            w_gate_up: torch.Tensor, w_down: torch.Tensor, a1, b1, a2, b2, b_gu, b_d,
                            srt: KernelSort, residuals: list[torch.Tensor], scale: float, activation: str,
                            swiglu_limit: float, swiglu_alpha: float, kernels: str,
                            needs_input_grad: list[bool]) -> list[torch.Tensor | None]:
    """`SplitLoraExpertsFunction`'s backward on the residuals of its forward (gu, z1, z2, as `op_residuals`
    captured them), without running that forward again or going through autograd: the gradients of (x,
    expert_weights, w_gate_up, w_down, a1, b1, a2, b2, b_gu, b_d) for those flagged in `needs_input_grad` (None for
    the rest), in the dtypes of these arguments. The same backward code on the same values as the Function's own,
    so the same bits; the custom op's backward (`torch_impl.moe_op`) calls it where it would otherwise rebuild the
    Function's graph to differentiate it. Needs T > 0 (with no tokens the Function never runs)."""
    a1c, b1c, a2c, b2c, bguc, bdc, w_sorted = _kernel_operands(x, expert_weights, a1, b1, a2, b2, b_gu, b_d, srt)
    gu, z1, z2 = gu_z1_z2(residuals, b1 is not None, b2 is not None)
    ctx = SimpleNamespace(
        saved_tensors=(x, expert_weights, w_gate_up, w_down, a1c, b1c, a2c, b2c, bguc, bdc, gu, z1, z2, w_sorted),
        srt=srt, scale=float(scale), act=gg.act_code(activation), limit=float(swiglu_limit),
        alpha=float(swiglu_alpha), nn=_NN(kernels), needs_input_grad=tuple(bool(n) for n in needs_input_grad),
        param_dtypes=_dtypes(x, expert_weights, w_gate_up, w_down, a1, b1, a2, b2, b_gu, b_d))
    return list(SplitLoraExpertsFunction.backward(ctx, dy)[:10])


def split_lora_experts(x: torch.Tensor, expert_ids: torch.Tensor | None, expert_weights: torch.Tensor,
                       w_gate_up: torch.Tensor, w_down: torch.Tensor,
                       lora_gate_up: tuple[torch.Tensor, torch.Tensor] | None = None,
                       lora_down: tuple[torch.Tensor, torch.Tensor] | None = None, *, scale: float = 1.0,
                       biases: tuple[torch.Tensor | None, torch.Tensor | None] | None = None,
                       activation: str = "swiglu", swiglu_limit: float = 7.0,
                       swiglu_alpha: float = 1.702, sort: KernelSort | None = None,
                       kernels: str = "triton", output_unread: bool = False) -> torch.Tensor:
    """Routed experts with split LoRA on the Triton kernels -> y [T, H] in x's dtype (differentiable).

    Same arguments and meaning as `shared_math.reference.split_lora_experts`; tensors on one device (CUDA, or CPU
    under TRITON_INTERPRET=1). x [T, H], expert_ids [T, K] (int), expert_weights [T, K], w_gate_up [E, H, 2I],
    w_down [E, I, H], LoRA pairs (A [E, in, R], B [E, R, out]), biases (b_gate_up [E, 2I], b_down [E, H]).
    `sort`: a `KernelSort` of expert_ids to reuse (built here otherwise; expert_ids may then be None).
    `kernels`: the NN grouped-GEMM family, "triton" (any sm80+ GPU) or "hopper" (`hopper.py`: persistent, TMA
    weights; sm_90+, opt-in until measured); the ragged-K gradient kernels are the same for both.
    `output_unread=True` promises that nothing reads y, not even through an op that saves it for its own backward:
    activation checkpointing's recompute of a decoder layer (`torch_impl.moe.Experts` passes it there). The forward
    then computes only what its backward saves (gu, z1, z2: the gate_up pass and z2 = h@A2) and returns NaN (loud
    if read after all); the gradients are those of the full forward.
    """
    if kernels not in KERNELS:
        raise ValueError(f"unknown kernels {kernels!r}; expected one of {', '.join(KERNELS)}")
    if x.ndim != 2 or w_gate_up.ndim != 3 or w_down.ndim != 3:
        raise ValueError(f"want x [T, H], w_gate_up [E, H, 2I], w_down [E, I, H]; got {tuple(x.shape)}, "
                         f"{tuple(w_gate_up.shape)}, {tuple(w_down.shape)}")
    T, H = x.shape
    E, H2, I2 = w_gate_up.shape
    if H2 != H or I2 % 2 or tuple(w_down.shape) != (E, I2 // 2, H):
        raise ValueError(f"expert weights do not fit x [T={T}, H={H}]: w_gate_up {tuple(w_gate_up.shape)}, "
                         f"w_down {tuple(w_down.shape)}")
    ids_shape = tuple(expert_ids.shape) if expert_ids is not None else (sort.T, sort.K)
    if ids_shape != tuple(expert_weights.shape) or len(ids_shape) != 2 or ids_shape[0] != T:
        raise ValueError(f"expert_ids {ids_shape} and expert_weights {tuple(expert_weights.shape)} "
                         f"must both be [T={T}, K]")
    for name, pair, (n_in, n_out) in (("lora_gate_up", lora_gate_up, (H, I2)), ("lora_down", lora_down, (I2 // 2, H))):
        if pair is not None and (pair[0].shape[:2] != (E, n_in) or pair[1].shape[0] != E or pair[1].shape[2] != n_out
                                 or pair[0].shape[2] != pair[1].shape[1]):
            raise ValueError(f"{name} must be (A [E, {n_in}, R], B [E, R, {n_out}]), got "
                             f"{tuple(pair[0].shape)}, {tuple(pair[1].shape)}")
    devices = {t.device for t in (x, expert_ids, expert_weights, w_gate_up, w_down) if t is not None}
    if len(devices) != 1:
        raise ValueError(f"all tensors must be on one device, got {sorted(map(str, devices))}")
    a1, b1 = lora_gate_up if lora_gate_up is not None else (None, None)
    a2, b2 = lora_down if lora_down is not None else (None, None)
    b_gu, b_d = biases if biases is not None else (None, None)
    if T == 0:
        return x.new_zeros((0, H))
    srt = sort if sort is not None else KernelSort.from_ids(expert_ids, E)
    return SplitLoraExpertsFunction.apply(
        x, expert_weights, w_gate_up, w_down, a1, b1, a2, b2, b_gu, b_d, srt, float(scale),
        gg.act_code(activation), float(swiglu_limit), float(swiglu_alpha), kernels, bool(output_unread))
