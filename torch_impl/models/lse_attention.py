"""Attention with a per-head sink logit (gpt-oss) through the log-sum-exp rescale, at the model's own head width.

gpt-oss adds one logit per head, `sink_n`, to every softmax row and drops its column afterwards. With `o, lse` the
plain causal (or sliding-window) attention and its log-sum-exp, the sink only rescales each row:

    out_i = o_i · w_i,   w_i = exp(lse_i) / (exp(lse_i) + exp(sink_n)) = sigmoid(lse_i − sink_n)

and the backward is the plain attention kernel's own backward with two substitutions (derivation: the sink's
softmax is p̃_ij = w_i·p_ij, so dS_ij = p̃_ij (dout_i·v_j − dout_i·out_i) = p_ij (dO_i·v_j − D_i) with dO = w·dout and
D_i = dO_i·out_i, the quantity the flash-style kernels compute from their `out` argument; dV = Σ_i p_ij dO_i):

    grad_out → w · dout,   out → out (the sink-rescaled output),   and dsink_n = −Σ_i (1 − w_i)(dout_i·out_i).

So the fused kernels run at head width D (64 for gpt-oss) instead of `_with_sink`'s D + 8, which the cuDNN and
flash kernels pad to their next tile width, and the sliding layers take the flash kernel's own window
(`window_size_left`) instead of masked query blocks. Measured motivation (H100, torch 2.11, gpt-oss-20b shapes,
16K tokens, fwd+bwd of one layer, benchmarks/attention_bench.py): the D + 8 path 45.6 ms on a full layer where
Qwen3's same-FLOP D = 128 attention takes 14.4 ms.

Kernels (`_forward`, `_backward`): on CUDA, cuDNN for causal layers (the fastest SDPA kernel on Hopper,
benchmarks/REPORT.md) and flash (FA2, the one with a window argument) for sliding ones; on CPU, the flash-for-CPU
kernel (a window as an [S, S] band bias, so the model's CPU sliding layers keep their padded O(S·W) blocks:
`sink_attention_lse_supported`). Each is called as the aten op that SDPA itself dispatches to, so the "attention"
checkpoint policy (`layers.keeps_attention`) keeps and hands back their outputs like SDPA's.

Tested against a literal softmax with the sink column: tests/torch/test_gpt_oss_parity.py, on CPU in fp32 and on
CUDA in bf16 (passed on an H100 on 2026-12-06: cuDNN, the FA2 window and GQA, q, k, v and sink gradients).
"""

from __future__ import annotations

import os
from contextlib import nullcontext

import torch

from torch_impl.models.layers import attention_policy_mode, keeps_outputs

_ATEN = torch.ops.aten
# read once, at import: a compiled layer then sees a constant, not an environment lookup
ENABLED = os.environ.get("SPLITMOE_SINK_LSE", "1") != "0"


def sink_attention_lse_supported(q: torch.Tensor, window: int | None = None) -> bool:
    """Whether `sink_attention_lse` is the path to take for q's device and dtype and this `window`: CUDA in bf16 /
    fp16 (the fused kernels' dtypes; an fp32 model on CUDA takes the padded-head path), or CPU in any float dtype for
    causal attention. A CPU window shorter than the row stays on the padded path's O(S·W) query blocks: the CPU
    kernel would take it as an O(S²) bias (`sink_attention_lse` still computes it, for tests and short rows).
    SPLITMOE_SINK_LSE=0 sends every call to the padded-head path (to time one against the other)."""
    if not ENABLED:
        return False
    if q.device.type == "cpu":
        return q.dtype in (torch.float32, torch.bfloat16, torch.float16) and (window is None or window >= q.shape[-2])
    return q.device.type == "cuda" and q.dtype in (torch.bfloat16, torch.float16)


def _band_bias(S: int, window: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """[S, S] additive bias in `dtype` (the CPU kernel's mask type): 0 where key j is visible to query i, that is
    i − window < j <= i (the window includes self), −inf elsewhere."""
    i = torch.arange(S, device=device)
    band = (i[None, :] <= i[:, None]) & (i[None, :] > i[:, None] - window)
    return torch.zeros(S, S, dtype=dtype, device=device).masked_fill_(~band, float("-inf"))


def _kernel(q: torch.Tensor, window: int | None) -> str:
    """Which kernel pair `_forward` / `_backward` run: "cpu" (flash for CPU), "cudnn" (causal) or "flash" (FA2, for
    its window)."""
    return "cpu" if q.device.type == "cpu" else ("cudnn" if window is None else "flash")


def _forward(q, k, v, scale: float, window: int | None):
    """(o [B, N, S, D], lse [B, N, S] fp32, the kernel's tensors its backward reads) of causal attention, within
    `window` if given. The backward's integers (the lengths) are q's and k's: only tensors cross to the backward,
    so a compiled layer's autograd context holds nothing Dynamo must rebuild. (A sentinel `object()` kept there is
    what Dynamo's error named, "NotImplementedError: ObjectVariable()", when compiled gpt-oss layers retraced at a
    second sequence length on an H100, 2026-12-06.)"""
    S = q.shape[-2]
    kind = _kernel(q, window)
    if kind == "cpu":
        mask = None if window is None else _band_bias(S, window, q.dtype, q.device)
        o, lse = _ATEN._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, mask is None, attn_mask=mask,
                                                                   scale=scale)
        return o, lse, ()
    if kind == "cudnn":
        out = _ATEN._scaled_dot_product_cudnn_attention(q, k, v, None, True, 0.0, True, False, scale=scale)
        o, lse, cum_q, cum_k, _, _, seed, offset = out[:8]
        return o, lse.view(lse.shape[:3]), (lse, cum_q, cum_k, seed, offset)
    # FA2 works on [B, S, N, D]; a transposed view of the heads-first layout is what it takes
    o, lse, rng, unused, _ = _ATEN._flash_attention_forward(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), None, None, S, S, 0.0, True, False, scale=scale,
        window_size_left=window - 1, window_size_right=0)
    return o.transpose(1, 2), lse, (rng, unused)


def _pack(kind: str, o: torch.Tensor, lse: torch.Tensor, tensors: tuple) -> list[torch.Tensor]:
    """`_forward`'s result as the custom op's flat list of distinct tensors (cuDNN's lse view and its None
    sequence-length tensors are rebuilt by `_unpack`)."""
    if kind == "cudnn":
        lse_raw, _, _, seed, offset = tensors
        return [o, lse_raw, seed, offset]
    return [o, lse, *tensors]


def _unpack(kind: str, outs: list[torch.Tensor]):
    """`_pack`'s inverse: (o, lse [B, N, S], the tensors `_backward` reads)."""
    if kind == "cudnn":
        o, lse_raw, seed, offset = outs
        return o, lse_raw.view(lse_raw.shape[:3]), (lse_raw, None, None, seed, offset)
    o, lse, *tensors = outs
    return o, lse, tuple(tensors)


@torch.library.custom_op("splitmoe::sink_attention_kernel", mutates_args=())
def _kernel_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, window: int | None
               ) -> list[torch.Tensor]:
    """`_forward` as one opaque op inside compiled layers (`_kernel_forward`), entering the "attention" checkpoint
    policy's mode when it runs, not when it is traced: one graph serves the forward (which keeps the kernel's
    outputs) and the recompute (which takes them back), as the experts' `output_unread` does."""
    (o, lse, tensors), mode = _forward_under_policy(q, k, v, scale, window)
    outs = _pack(_kernel(q, window), o, lse, tensors)
    if keeps_outputs(mode):
        # the policy keeps these tensors for the recompute, but inductor owns a custom op's outputs: once the graph
        # has read them it may hand their memory to a later buffer of the same size, overwriting what was kept
        # (wrong gradients, found on an H100 and reproduced by CPU inductor). The graph gets copies.
        outs = [t.clone() for t in outs]
    return outs


@_kernel_op.register_fake
def _kernel_op_fake(q, k, v, scale, window):
    # the aten kernels' own meta functions give every shape and dtype; no policy mode here (it would keep fakes)
    o, lse, tensors = _forward(q, k, v, scale, window)
    return _pack(_kernel(q, window), o, lse, tensors)


def _kernel_forward(q, k, v, scale: float, window: int | None):
    """`_forward` under the "attention" checkpoint policy (`layers.keep_attention_contexts`): inside a checkpointed
    layer's forward the kernel's outputs are kept, in its recompute they are handed back instead of running it.

    The policy's dispatch mode is entered around the kernel call alone. In a compiled layer the call is a custom op
    (`_kernel_op`), so the layer stays one graph under the policy: the sink's rescale around the kernel (sigmoid,
    products, casts; and their backward) is fused by inductor instead of running eagerly in a graph break, which is
    where the policy's break put the whole of `sink_attention` before."""
    if torch.compiler.is_compiling():
        return _unpack(_kernel(q, window), _kernel_op(q, k, v, scale, window))
    return _forward_under_policy(q, k, v, scale, window)[0]


def _forward_under_policy(q, k, v, scale: float, window: int | None):
    """(`_forward`'s result, the policy mode it ran under or None): the mode entered around the kernel call alone."""
    mode = attention_policy_mode()
    with mode if mode is not None else nullcontext():
        return _forward(q, k, v, scale, window), mode


def _backward(grad_o, q, k, v, o, lse, scale: float, window: int | None, tensors):
    """dq, dk, dv of `_forward`'s attention for output gradient `grad_o` and output argument `o` (the kernels read
    `o` only for D_i = grad_o_i·o_i, which is what the sink substitutes); `tensors` is what `_forward` returned
    third."""
    kind, S = _kernel(q, window), q.shape[-2]
    if kind == "cpu":
        mask = None if window is None else _band_bias(S, window, q.dtype, q.device)
        return _ATEN._scaled_dot_product_flash_attention_for_cpu_backward(
            grad_o, q, k, v, o, lse, 0.0, mask is None, attn_mask=mask, scale=scale)
    if kind == "cudnn":
        lse_raw, cum_q, cum_k, seed, offset = tensors
        return _ATEN._scaled_dot_product_cudnn_attention_backward(
            grad_o, q, k, v, o, lse_raw, seed, offset, None, cum_q, cum_k, S, k.shape[-2], 0.0, True, scale=scale)
    rng, unused = tensors
    dq, dk, dv = _ATEN._flash_attention_backward(
        grad_o.transpose(1, 2), q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), o.transpose(1, 2), lse,
        None, None, S, S, 0.0, True, rng, unused, scale=scale, window_size_left=window - 1, window_size_right=0)
    return dq.transpose(1, 2), dk.transpose(1, 2), dv.transpose(1, 2)


class _SinkAttention(torch.autograd.Function):
    """out = attention(q, k, v) · sigmoid(lse − sink), forward and backward through the plain kernels (module
    docstring)."""

    @staticmethod
    def forward(ctx, q, k, v, sinks, scale: float, window: int | None):
        o, lse, tensors = _kernel_forward(q, k, v, scale, window)
        w = torch.sigmoid(lse - sinks.float().view(1, -1, 1))  # [B, N, S] fp32
        out = (o.float() * w.unsqueeze(-1)).to(q.dtype)
        ctx.save_for_backward(q, k, v, out, lse, w, *tensors)
        ctx.scale, ctx.window = scale, window
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse, w, *tensors = ctx.saved_tensors
        d32 = dout.float()
        grad_o = (d32 * w.unsqueeze(-1)).to(dout.dtype)
        dq, dk, dv = _backward(grad_o, q, k, v, out, lse, ctx.scale, ctx.window, tensors)
        dsinks = None
        if ctx.needs_input_grad[3]:
            dsinks = -((1 - w) * (d32 * out.float()).sum(-1)).sum(dim=(0, 2))
        return dq, dk, dv, dsinks, None, None


def sink_attention_lse(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, sinks: torch.Tensor, scale: float,
                       window: int | None = None) -> torch.Tensor:
    """softmax([q·kᵀ·scale | sink_n]) without the sink column, times v, causal and within `window` keys back (self
    included) when given: q [B, N, S, D], k, v [B, Nkv, S, D] (Nkv divides N; each kv head serves N / Nkv
    consecutive query heads, which every kernel here reads without a repeated copy), sinks [N] -> [B, N, S, D].
    Needs `sink_attention_lse_supported(q)`."""
    if window is not None and window >= q.shape[-2]:
        window = None  # every key is inside the window: plain causal
    return _SinkAttention.apply(q, k, v, sinks, scale, window)
