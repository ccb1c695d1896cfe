"""`grouped_mm` backend: every expert GEMM as one `torch.nn.functional.grouped_mm` (or `torch._grouped_mm`) call over
the expert-sorted rows, with a hand-written backward.

Shapes: T tokens, H hidden, I expert intermediate, E experts, K experts per token, R LoRA rank, M = T·K routed rows.

Forward (one `ExpertSort` for all of it): x_sorted = x[token_M]; gu = x_sorted@Wgu + s·(x_sorted@A1)@B1 (+ bgu);
h = act(gu); o = h@Wd + s·(h@A2)@B2 (+ bd); y = Σ_k w·o, summed after gathering back to [T, K, H] (HF's order and
rounding; deterministic). Every GEMM is the 2D×3D form with int32 cumulative group ends; the weight gradients are
the 2D×2D form (x_sortedᵀ·dY per group -> [E, in, out]).

Why a custom autograd.Function rather than autograd through grouped_mm:
- memory: it saves only gu [M, 2I] and the skinny z1, z2 [M, R] (x is the caller's tensor anyway). Autograd would
  also keep x_sorted [M, H], h [M, I], silu(gate) [M, I] and the expert outputs o [M, H] for the routing-weight
  gradient. h is recomputed from gu (elementwise, cheap) and x_sorted by a gather; the routing-weight gradient
  uses <o, dy> = <h, dy@Wdᵀ> + s·<z2, dy@B2ᵀ> + <bd, dy>, whose GEMM dy@Wdᵀ the backward needs anyway, so o is
  never stored: 2I + 2R values saved per routed row. Measured with saved_tensors_hooks (T 1024, H 512, I 192,
  E 16, K 4, R 16, fp32): 416 values (6.5 MiB) per routed row against 3003 (46.9 MiB) for autograd through the
  same ops (the native backend), 7.2x less.
- frozen base weights: dW is computed only when `needs_input_grad` says so (never for a frozen base).
- CPU: torch 2.13's own grouped_mm backward fails on CPU for stride-0 (expanded) gradients, e.g. from `.sum()`.

Alignment: grouped_mm wants every row stride to be a multiple of 16 bytes. The model shapes (H 2048, I 768, R 16,
...) already are; odd test shapes (H 45, I 27, R 3) are zero-padded outside the Function (gate and up halves
separately), which is differentiable and exact: padded columns stay zero through SwiGLU (silu(0)·0 = 0, and the
gpt-oss form gives (0+1)·0·σ(0) = 0).

CPU facts (torch 2.13.0+cpu, measured): forward works in float32, bfloat16 and float16 (float64 is rejected), results
equal a per-expert `mm` bit for bit in fp32; misaligned strides raise "strides should be multiple of 16 bytes".
Availability is decided by a tiny probe per (device, dtype), so `available()` is honest on any build.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from torch_impl.backends.common import Activation, ExpertSort, capture_residuals, gu_z1_z2, replayed_residuals

NAME = "grouped_mm"

_GROUPED_MM = getattr(F, "grouped_mm", None) or getattr(torch, "_grouped_mm", None)
_SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _gmm(a_MX: torch.Tensor, w_EXY: torch.Tensor, offs_E: torch.Tensor) -> torch.Tensor:
    """Per group e: a[rows of e] @ w[e] -> [M, Y]."""
    return _GROUPED_MM(a_MX, w_EXY, offs=offs_E)


def _gmm_w(a_MX: torch.Tensor, b_MY: torch.Tensor, offs_E: torch.Tensor) -> torch.Tensor:
    """Per group e: a[rows of e]ᵀ @ b[rows of e] -> [E, X, Y] (the weight-gradient form). Empty groups are zeroed
    explicitly: the kernels promise nothing about groups with no rows."""
    out_EXY = _GROUPED_MM(a_MX.contiguous().t(), b_MY.contiguous(), offs=offs_E)
    sizes_E = torch.diff(offs_E, prepend=offs_E.new_zeros(1))
    return torch.where((sizes_E > 0).view(-1, 1, 1), out_EXY, 0)


def _seg_sum(v_MN: torch.Tensor, offs_E: torch.Tensor) -> torch.Tensor:
    """Per-expert sum of rows -> [E, N], deterministic (a grouped GEMM with a ones column, not an atomic scatter)."""
    ones_M8 = v_MN.new_ones(v_MN.shape[0], 8)  # 8 columns keep the 16-byte stride rule in every dtype
    return _gmm_w(ones_M8, v_MN, offs_E)[:, 0]


@functools.cache
def _probe(device: str, dtype: torch.dtype) -> str | None:
    """Run a tiny grouped_mm in both forms; None if it works, else why not."""
    try:
        a_MX = torch.ones(4, 8, dtype=dtype, device=device)
        w_EXY = torch.ones(2, 8, 8, dtype=dtype, device=device)
        offs_E = torch.tensor([1, 4], dtype=torch.int32, device=device)
        y = _GROUPED_MM(a_MX, w_EXY, offs=offs_E)
        dw = _gmm_w(a_MX, y, offs_E)
        if not (bool((y == 8).all()) and float(dw[1, 0, 0]) == 24.0):
            return f"torch grouped_mm returned wrong values on {device} in {dtype}"
    except Exception as e:  # any failure means: not usable here
        return f"torch grouped_mm fails on {device} in {dtype}: {type(e).__name__}: {e}"
    return None


def available(device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> str | None:
    """None when grouped_mm runs on `device` in `dtype` (defaults: cpu, bfloat16), else the reason it cannot."""
    if _GROUPED_MM is None:
        return f"torch {torch.__version__} has neither torch.nn.functional.grouped_mm nor torch._grouped_mm"
    device = torch.device(device or "cpu")
    dtype = dtype or torch.bfloat16
    if dtype not in _SUPPORTED_DTYPES:
        return f"grouped_mm supports float32, bfloat16 and float16, not {dtype}"
    if device.type == "cuda":
        if not torch.cuda.is_available():
            return "CUDA is not available"
        cap = torch.cuda.get_device_capability(device)
        if cap < (8, 0):
            return f"grouped_mm needs CUDA compute capability >= 8.0, this GPU has {cap[0]}.{cap[1]}"
    return _probe(str(device), dtype)


# Rows per chunk for the fp32 elementwise passes (activation VJP, routing-weight gradient) and the un-permute sums:
# bounds their fp32 temporaries to a few hundred MB whatever M is (at H=2048, 32768 rows of [·, 2I=1536] fp32 are
# 200 MB), while each chunk stays large enough to keep the GPU's bandwidth busy.
_CHUNK_ROWS = 32768


def _unpermute_sum(v_MH: torch.Tensor, srt: ExpertSort, out_dtype: torch.dtype) -> torch.Tensor:
    """Sorted rows [M, H] -> [T, H] = Σ_k v[t, k], in K-slot order (HF's order; deterministic, no atomics), a token
    chunk at a time so the un-permuted copy never exists whole."""
    T, K = srt.num_tokens, srt.top_k
    out = v_MH.new_empty(T, v_MH.shape[1], dtype=out_dtype)
    step = max(1, _CHUNK_ROWS // K)
    for t0 in range(0, T, step):
        t1 = min(T, t0 + step)
        rows = v_MH.index_select(0, srt.inverse_M[t0 * K:t1 * K])
        out[t0:t1] = rows.view(t1 - t0, K, -1).sum(dim=1)
    return out


def _add_expert_bias_(v_MN: torch.Tensor, b_EN: torch.Tensor, expert_M: torch.Tensor) -> torch.Tensor:
    """v[m] += b[expert(m)] in place, a row chunk at a time (a whole `b[expert_M]` gather is a full [M, N] copy)."""
    for r0 in range(0, v_MN.shape[0], _CHUNK_ROWS):
        r1 = min(v_MN.shape[0], r0 + _CHUNK_ROWS)
        v_MN[r0:r1] += b_EN.index_select(0, expert_M[r0:r1])
    return v_MN


def _row_dot_expert_bias(dy_MH: torch.Tensor, b_EH: torch.Tensor, expert_M: torch.Tensor) -> torch.Tensor:
    """<b[expert(m)], dy[m]> per row in fp32, in row chunks (the bias part of the routing-weight gradient)."""
    out = torch.empty(dy_MH.shape[0], dtype=torch.float32, device=dy_MH.device)
    for r0 in range(0, dy_MH.shape[0], _CHUNK_ROWS):
        r1 = min(dy_MH.shape[0], r0 + _CHUNK_ROWS)
        out[r0:r1] = (b_EH.index_select(0, expert_M[r0:r1]).float() * dy_MH[r0:r1].float()).sum(-1)
    return out


def _act_vjp_and_row_dot(act: Activation, gu: torch.Tensor, g_MI: torch.Tensor, w_M1: torch.Tensor,
                         dh_lora_MI: torch.Tensor | None, want_dw: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """dgu = act'(gu)·dh with dh = w·g (+ the LoRA part dh_lora) -> [M, 2I] in gu's dtype, and, if asked,
    <act(gu), g> per row in fp32 (the base part of the routing-weight gradient). One pass in row chunks, so the
    fp32 intermediates stay small and h = act(gu) is recomputed chunk by chunk, never held whole."""
    dgu = torch.empty_like(gu)
    dw = torch.empty(gu.shape[0], dtype=torch.float32, device=gu.device) if want_dw else None
    for r0 in range(0, gu.shape[0], _CHUNK_ROWS):
        r1 = min(gu.shape[0], r0 + _CHUNK_ROWS)
        g = g_MI[r0:r1]
        if want_dw:
            dw[r0:r1] = (act(gu[r0:r1]).float() * g.float()).sum(-1)
        dh = g * w_M1[r0:r1]
        if dh_lora_MI is not None:
            dh += dh_lora_MI[r0:r1]
        dgu[r0:r1] = act.vjp(gu[r0:r1], dh)
    return dgu, dw


class _GroupedSplitLoRA(torch.autograd.Function):
    """The expert path on aligned shapes; see the module docstring for what is saved and why. Tensors created here
    are updated in place where that saves a full [M, ·] pass and copy (nothing else holds them)."""

    @staticmethod
    def forward(ctx, x_TH, weights_TK, w_gate_up, w_down, a1, b1, a2, b2, b_gu, b_d, srt: ExpertSort,
                scale: float, act: Activation, output_unread: bool = False):
        ctx.srt, ctx.scale, ctx.act = srt, scale, act
        replay = replayed_residuals()
        if replay is not None:  # the custom op's backward (common.op_residuals): gu, z1, z2 of its forward
            gu, z1, z2 = gu_z1_z2(replay, a1 is not None, a2 is not None)
            ctx.save_for_backward(x_TH, weights_TK, w_gate_up, w_down, a1, b1, a2, b2, b_d, gu, z1, z2)
            return x_TH.new_empty(srt.num_tokens, w_down.shape[2])  # a placeholder: only the graph is used
        offs = srt.offsets_E
        x_MH = x_TH[srt.token_M]
        gu = _gmm(x_MH, w_gate_up, offs)
        z1 = z2 = None
        if a1 is not None:
            z1 = _gmm(x_MH, a1, offs)
            gu.add_(_gmm(z1, b1, offs), alpha=scale)
        del x_MH
        if b_gu is not None:
            _add_expert_bias_(gu, b_gu, srt.expert_M)
        h = act(gu)
        if a2 is not None:
            z2 = _gmm(h, a2, offs)
        ctx.save_for_backward(x_TH, weights_TK, w_gate_up, w_down, a1, b1, a2, b2, b_d, gu, z1, z2)
        capture_residuals(gu, z1, z2)
        if output_unread:
            # a checkpoint's recompute: the backward reads gu, z1, z2 and never y; skip the down GEMM (see
            # torch_impl.moe.split_lora_experts)
            return x_TH.new_full((srt.num_tokens, w_down.shape[2]), float("nan"))  # never read: loud if it is
        o = _gmm(h, w_down, offs)
        if a2 is not None:
            o.add_(_gmm(z2, b2, offs), alpha=scale)
        del h
        if b_d is not None:
            _add_expert_bias_(o, b_d, srt.expert_M)
        # weight, un-permute, sum over K: HF's grouped_mm order and rounding (o·w rounded, then an fp32-free sum)
        o.mul_(weights_TK.reshape(-1)[srt.order_M].unsqueeze(-1))
        return _unpermute_sum(o, srt, o.dtype)

    @staticmethod
    def backward(ctx, dy_TH):
        x_TH, weights_TK, w_gate_up, w_down, a1, b1, a2, b2, b_d, gu, z1, z2 = ctx.saved_tensors
        srt, s, act = ctx.srt, ctx.scale, ctx.act
        need = ctx.needs_input_grad
        offs = srt.offsets_E
        T, K = weights_TK.shape
        grads = [None] * 13

        dy_MH = dy_TH.contiguous()[srt.token_M]  # dL/d(o) before the routing weight, per sorted row
        w_M1 = weights_TK.reshape(-1)[srt.order_M].unsqueeze(-1)
        g_MI = _gmm(dy_MH, w_down.transpose(1, 2), offs)  # dy @ Wdᵀ (unweighted)
        dz2_MR = dh_lora = None
        if a2 is not None:
            gz2 = _gmm(dy_MH, b2.transpose(1, 2), offs)  # dy @ B2ᵀ
            dz2_MR = gz2 * w_M1 * s  # s·do@B2ᵀ
            dh_lora = _gmm(dz2_MR, a2.transpose(1, 2), offs)
        dgu, dw_M = _act_vjp_and_row_dot(act, gu, g_MI, w_M1, dh_lora, want_dw=need[1])
        del g_MI, dh_lora
        if need[1]:
            # d weight = <o, dy>, with o = h@Wd + s·z2@B2 + bd expanded so that o need not be saved
            if a2 is not None:
                dw_M += s * (z2.float() * gz2.float()).sum(-1)  # [M, R]: small
            if b_d is not None:
                dw_M += _row_dot_expert_bias(dy_MH, b_d, srt.expert_M)
            grads[1] = dw_M[srt.inverse_M].view(T, K).to(weights_TK.dtype)

        do_MH = dy_MH.mul_(w_M1)  # dy rows are not needed unweighted any more
        if a2 is not None and (need[6] or need[7]):
            if need[6]:
                grads[6] = _gmm_w(act(gu), dz2_MR, offs)
            if need[7]:
                grads[7] = s * _gmm_w(z2, do_MH, offs)
        if need[3]:
            grads[3] = _gmm_w(act(gu), do_MH, offs)
        if need[9]:
            grads[9] = _seg_sum(do_MH, offs)
        del do_MH, dy_MH

        x_MH = x_TH[srt.token_M] if (need[2] or need[4]) else None
        dx_MH = _gmm(dgu, w_gate_up.transpose(1, 2), offs) if need[0] else None
        if a1 is not None:
            dz1_MR = s * _gmm(dgu, b1.transpose(1, 2), offs)
            if need[0]:
                dx_MH.add_(_gmm(dz1_MR, a1.transpose(1, 2), offs))
            if need[4]:
                grads[4] = _gmm_w(x_MH, dz1_MR, offs)
            if need[5]:
                grads[5] = s * _gmm_w(z1, dgu, offs)
        if need[2]:
            grads[2] = _gmm_w(x_MH, dgu, offs)
        if need[8]:
            grads[8] = _seg_sum(dgu, offs)
        if need[0]:
            grads[0] = _unpermute_sum(dx_MH, srt, dx_MH.dtype)
        return (*grads, None)


def _round_up(n: int, m: int) -> int:
    return -(-n // m) * m


def _pad_dim(t: torch.Tensor | None, dim: int, size: int) -> torch.Tensor | None:
    """Zero-pad `t` along `dim` to `size` (differentiable); no copy when already that size."""
    if t is None or t.shape[dim] == size:
        return t
    pad = [0, 0] * (t.ndim - dim % t.ndim)
    pad[-1] = size - t.shape[dim]
    return F.pad(t, pad)


def _pad_halves(t: torch.Tensor | None, I: int, Ip: int) -> torch.Tensor | None:
    """Pad the gate (0:I) and up (I:2I) halves of the last dim separately to Ip each."""
    if t is None or I == Ip:
        return t
    return torch.cat([_pad_dim(t[..., :I], -1, Ip), _pad_dim(t[..., I:], -1, Ip)], dim=-1)


def residual_shapes(x_TH: torch.Tensor, expert_ids_TK: torch.Tensor, w_down: torch.Tensor,
                    lora_gate_up_a: torch.Tensor | None, lora_down_a: torch.Tensor | None) -> list[tuple[int, ...]]:
    """What `_GroupedSplitLoRA` saves beyond its inputs (`common.op_residuals`), as the custom op's fake gives it:
    gu [M, 2I], z1 [M, R1] and z2 [M, R2] (each only with its LoRA pair), I and R padded as `experts_forward`
    pads them, in x's dtype."""
    align = 16 // x_TH.element_size()
    M = expert_ids_TK.shape[0] * expert_ids_TK.shape[1]
    return [(M, 2 * _round_up(w_down.shape[1], align))] + [
        (M, _round_up(a.shape[-1], align)) for a in (lora_gate_up_a, lora_down_a) if a is not None]


def experts_forward(x_TH, weights_TK, srt: ExpertSort, w_gate_up, w_down, lora_gate_up, lora_down, scale: float,
                    biases, act: Activation, output_unread: bool = False) -> torch.Tensor:
    """Routed experts with split LoRA -> y [T, H]; pads misaligned dims, then runs `_GroupedSplitLoRA`.
    `output_unread`: only the backward's residuals are needed, y is NaN (`torch_impl.moe.split_lora_experts`)."""
    H, I = x_TH.shape[1], w_down.shape[1]
    align = 16 // x_TH.element_size()
    Hp, Ip = _round_up(H, align), _round_up(I, align)
    a1, b1 = lora_gate_up if lora_gate_up is not None else (None, None)
    a2, b2 = lora_down if lora_down is not None else (None, None)
    b_gu, b_d = biases if biases is not None else (None, None)
    if Hp != H or Ip != I:
        x_TH = _pad_dim(x_TH, 1, Hp)
        w_gate_up = _pad_halves(_pad_dim(w_gate_up, 1, Hp), I, Ip)
        w_down = _pad_dim(_pad_dim(w_down, 1, Ip), 2, Hp)
        a1, b1 = _pad_dim(a1, 1, Hp), _pad_halves(b1, I, Ip)
        a2, b2 = _pad_dim(a2, 1, Ip), _pad_dim(b2, 2, Hp)
        b_gu, b_d = _pad_halves(b_gu, I, Ip), _pad_dim(b_d, 1, Hp)
    if a1 is not None and a1.shape[-1] % align:
        R1 = _round_up(a1.shape[-1], align)
        a1, b1 = _pad_dim(a1, 2, R1), _pad_dim(b1, 1, R1)
    if a2 is not None and a2.shape[-1] % align:
        R2 = _round_up(a2.shape[-1], align)
        a2, b2 = _pad_dim(a2, 2, R2), _pad_dim(b2, 1, R2)
    y_TH = _GroupedSplitLoRA.apply(x_TH, weights_TK, w_gate_up, w_down, a1, b1, a2, b2, b_gu, b_d, srt, scale, act,
                                   output_unread)
    return y_TH[:, :H] if Hp != H else y_TH
