"""gpt-oss (gpt-oss-20b, gpt-oss-120b) as HF transformers 5.x computes it, with split LoRA.

Shape legend: B batch · S sequence · T = B·S tokens · H hidden · N query heads · Nkv kv heads · D head_dim ·
E experts · K experts per token · V vocab. Module paths equal the canonical tensor names (docs/CONTRACTS.md).

The decoder is `models.decoder`'s; this file supplies what differs from Qwen3-MoE (hf-moe-formats.md §2):
- attention (`GptOssAttention`, built per layer index): q/k/v/o biases, no q/k norm, a learned logit per head
  (`sinks [N]`) that joins every softmax row and is then dropped, and per-layer `layer_types`: "sliding_attention"
  layers see keys with `q_idx - window < kv_idx <= q_idx` (the window includes self), "full_attention" layers are
  causal;
- RoPE: YaRN, whose attention factor multiplies cos and sin (`RotaryEmbedding` with the config's rope_scaling);
- RMSNorm: `(weight · x_normed_f32).to(dtype)`, the product in fp32 (`GptOssRMSNorm`, the decoder's `norm_class`);
- MoE: router with bias, top-K on the logits and softmax over the K; experts with biases and the clamped SwiGLU
  (`activation="swiglu_oai"`), through the same backends as every family;
- aux loss: HF's load_balancing_loss_func on the full router logits (with bias), only when `output_router_logits`.

Packed sequences (position_ids restarting): documents do not attend across their boundary (as for Qwen3). HF's
gpt-oss does not build a packed mask (its `create_causal_mask` gets no position_ids), so its packed rows attend
across documents; the tests compare packed rows against each document run alone instead.
Padded batches (`attention_mask`): HF's padding mask on every layer, full and sliding (`layers.causal_mask`); a
query with no key left (left padding) puts all weight on the sink and gets 0, exactly as HF's eager path.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention.bias import causal_lower_right
from torch.utils._python_dispatch import _disable_current_modes

from shared_math.config import ModelConfig
from torch_impl.models.decoder import CausalLM
from torch_impl.models.layers import (
    Attention,
    RMSNorm,
    apply_rotary,
    causal_mask,
    keeps_attention,
    project,
    repeat_kv,
)
from torch_impl.models.lse_attention import sink_attention_lse, sink_attention_lse_supported
from torch_impl.moe import MoEBlock

# extra q/k coordinates that carry the sink logit; 8 keeps D + 8 a multiple of 8 for the fused SDPA kernels
_SINK_PAD = 8


class GptOssRMSNorm(RMSNorm):
    """(weight · x_f32 · rsqrt(mean(x_f32²) + eps)).to(x.dtype): unlike Llama, the weight multiplies in fp32."""

    rounding = "weight_fp32"

    def eager(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return (self.weight * x32).to(x.dtype)


def attention_mask(position_ids: torch.Tensor, window: int | None) -> torch.Tensor | None:
    """Bool mask [B, 1, S, S] (True = attend): causal, within `window` keys back (self included) when given, and
    within one packed document (a document starts wherever position_ids do not grow by 1). None when that is plain
    causal attention (one document per row and no window shorter than the row). `layers.causal_mask` without
    padding."""
    return causal_mask(position_ids, None, window)


def _with_sink(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, sinks: torch.Tensor, scale: float
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q [..., N, L, D], k, v [..., N, Lk, D] -> q, k, v of width D + 8 with the sink key at key index 0: q's
    coordinate D is 1, the sink key's is sink_n / scale (so its logit is sink_n), every other extra entry 0; v gets
    a zero row for the sink and zero columns (SDPA's fused kernels want one head width; sliced off after)."""
    D, dt = q.shape[-1], q.dtype
    extra = [0, _SINK_PAD]
    q_x = F.pad(q, extra)
    q_x[..., D] = 1
    sink_key = q.new_zeros(*k.shape[:-2], 1, D + _SINK_PAD)
    sink_key[..., 0, D] = (sinks.float() / scale).to(dt).view(-1, *([1] * (k.ndim - 4)))  # N is axis 1
    k_x = torch.cat([sink_key, F.pad(k, extra)], dim=-2)
    v_x = F.pad(v, extra + [1, 0])
    return q_x, k_x, v_x


def _sliding_blocks(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, sinks: torch.Tensor, window: int,
                    scale: float) -> torch.Tensor:
    """Sliding-window attention with sinks in query blocks of `window` rows, each against its W + C - 1 keys:
    memory O(S · W), never [S, S]. Block c holds queries [cC, cC + C) and keys [cC - W + 1, cC + C) (zero keys
    before position 0, masked); the band mask [C, W + C - 1] is the same for every block but the first."""
    B, N, S, D = q.shape
    C = W = window
    nC = -(-S // C)
    Sp = nC * C
    L = C + W - 1
    q_blk = F.pad(q, [0, 0, 0, Sp - S]).view(B, N, nC, C, D)
    k_pad = F.pad(k, [0, 0, W - 1, Sp - S])  # key index j of block c is padded index cC + j
    v_pad = F.pad(v, [0, 0, W - 1, Sp - S])
    k_blk = k_pad.unfold(2, L, C).transpose(-1, -2)  # [B, N, nC, L, D]
    v_blk = v_pad.unfold(2, L, C).transpose(-1, -2)
    i = torch.arange(C, device=q.device)[:, None]
    j = torch.arange(L, device=q.device)[None, :]
    band_CL = (j >= i) & (j <= i + W - 1)  # key global cC - W + 1 + j in (query global - W, query global]
    first = torch.arange(nC, device=q.device)[:, None, None] * C - (W - 1) + j >= 0  # not before position 0
    mask = torch.cat([band_CL.new_ones(nC, C, 1), band_CL & first], dim=-1)  # sink column first
    q_x, k_x, v_x = _with_sink(q_blk, k_blk, v_blk, sinks, scale)
    out = F.scaled_dot_product_attention(q_x.reshape(B * N, nC, C, -1), k_x.reshape(B * N, nC, L + 1, -1),
                                         v_x.reshape(B * N, nC, L + 1, -1), attn_mask=mask, scale=scale)
    return out[..., :D].reshape(B, N, Sp, D)[:, :, :S]


def _causal_with_sink_compiled(q_x: torch.Tensor, k_x: torch.Tensor, v_x: torch.Tensor, scale: float
                               ) -> torch.Tensor:
    """The full layers' causal attention with the sink key (`_with_sink`: S queries, S + 1 keys, lower-right causal)
    in a form Dynamo traces, for compiled layers only: a zero query row is put before the S queries, so the problem
    is square and plain `is_causal=True` (upper left = lower right) gives every real query the sink and keys 0..i;
    the extra row (sees the sink alone) is dropped, so it gets no gradient. Still no mask tensor, and on CUDA still
    the flash / memory-efficient kernels, for one more query row of work.

    Why not everywhere: `causal_lower_right` builds a `CausalBias` tensor subclass, which Dynamo cannot construct
    (a graph break in every compiled full layer). Eager mode keeps it: the flash kernel's own lower-right causal
    mode on CUDA, numerics exactly as before. An explicit [S, S + 1] bool mask would trace too, but is O(S²) memory
    and keeps the flash kernel off (on CUDA, SDPA's flash backend takes no mask)."""
    q_sq = F.pad(q_x, [0, 0, 1, 0])  # [..., S + 1, D + 8], query row 0 all zero
    return F.scaled_dot_product_attention(q_sq, k_x, v_x, is_causal=True, scale=scale)[..., 1:, :]


def sink_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, sinks: torch.Tensor,
                   mask: torch.Tensor | None, scale: float, window: int | None = None) -> torch.Tensor:
    """softmax([q·kᵀ·scale | sink_n]) without the sink column, times v: q [B, N, S, D], k, v [B, Nkv, S, D] (each kv
    head serves N / Nkv consecutive query heads, HF's repeat_kv), sinks [N], mask [B, 1, S, S] bool (packed
    documents, padding: `layers.causal_mask`) or None (causal), `window` (sliding layers: keys with
    q_idx - window < kv_idx <= q_idx) -> [B, N, S, D].

    Without a mask (causal, or causal within the window), wherever `lse_attention` takes it (CUDA in bf16 / fp16;
    CPU for full layers), the sink rescales the plain attention by its log-sum-exp at the model's head width
    (`lse_attention.sink_attention_lse`: cuDNN for full layers, the flash kernel's window for sliding ones), and the
    kernels read the kv heads as they are (GQA). The paths below repeat K and V to N heads first.

    Otherwise (a mask, or an fp32 model on CUDA) the sink is realised as one extra key at index 0 with value 0 and a
    logit equal to the sink for every query (`_with_sink`, head width D + 8, `_sink_attention_padded`). Then
    `out = Σ_j p_j v_j` with p the softmax over [sink, keys] is exactly the log-sum-exp correction
    `out_plain · sigmoid(lse − sink)`, and all of it runs through `F.scaled_dot_product_attention`, forward and
    backward, so on CUDA the flash / memory-efficient kernels do the work and no [S, S] probabilities are ever
    materialised:
    - full layers: a lower-right causal bias (`causal_lower_right`, no mask tensor; query i sees the sink and keys
      0..i), which the flash kernel takes; in a compiled layer the same through `is_causal`
      (`_causal_with_sink_compiled`, which says why);
    - sliding layers: query blocks of `window` rows against their 2·window − 1 keys (`_sliding_blocks`): O(S·W);
    - packed documents or padding: a bool mask [B, 1, S, S+1] (O(S²) bits, never probabilities), window applied
      inside it (so a padded batch's sliding layers do not take the O(S·W) blocks).
    """
    # under the "attention" checkpoint policy the log-sum-exp path keeps its kernels' outputs itself
    # (`lse_attention._kernel_forward`: no graph break in a compiled layer); the padded path through `keeps_attention`
    if mask is None and sink_attention_lse_supported(q, window):
        return sink_attention_lse(q, k, v, sinks, scale, window)
    return _sink_attention_padded(q, k, v, sinks, mask, scale, window)


@keeps_attention
def _sink_attention_padded(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, sinks: torch.Tensor,
                           mask: torch.Tensor | None, scale: float, window: int | None) -> torch.Tensor:
    """`sink_attention` with the sink as an extra key of head width D + 8 (`_with_sink`): its docstring's list."""
    B, N, S, D = q.shape
    k, v = repeat_kv(k, v, N)
    if mask is None and window is not None and window < S:
        return _sliding_blocks(q, k, v, sinks, window, scale)
    q_x, k_x, v_x = _with_sink(q, k, v, sinks, scale)
    if mask is None and torch.compiler.is_compiling():
        return _causal_with_sink_compiled(q_x, k_x, v_x, scale)[..., :D]
    if mask is None:
        # built outside any Python dispatch mode (the "attention" checkpoint policy's, a test's op counter): under
        # one, constructing the CausalBias subclass fails ("raw Tensor object is already associated to a python
        # object"); it holds no data, so no op of the layer is missed
        with _disable_current_modes():
            bias = causal_lower_right(S, S + 1)
    else:
        if window is not None and window < S:
            idx = torch.arange(S, device=q.device)
            mask = mask & (idx[None, :] > idx[:, None] - window)
        bias = torch.cat([mask.new_ones(*mask.shape[:-1], 1), mask], dim=-1)
    return F.scaled_dot_product_attention(q_x, k_x, v_x, attn_mask=bias, scale=scale)[..., :D]


class GptOssAttention(Attention):
    """GQA self-attention with biases, YaRN RoPE (tables from the model), sinks and an optional sliding window: the
    shared `Attention`'s projections (gpt-oss has no q/k norm) with its own forward. Module names are canonical:
    `q_proj`, `k_proj`, `v_proj`, `o_proj` (LoRA targets) and the `sinks` parameter."""

    def __init__(self, cfg: ModelConfig, layer_idx: int, *, dtype=None, device=None) -> None:
        super().__init__(cfg, dtype=dtype, device=device)
        self.sinks = nn.Parameter(torch.empty(cfg.num_attention_heads, dtype=dtype, device=device),
                                  requires_grad=False)
        self.sliding_window = cfg.sliding_window if cfg.layer_types[layer_idx] == "sliding_attention" else None

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                mask: torch.Tensor | None) -> torch.Tensor:
        B, S, _ = x.shape
        q, k, v = project(x, self.q_proj, self.k_proj, self.v_proj)
        q = q.view(B, S, self.num_heads, self.head_dim).transpose(1, 2)
        k = k.view(B, S, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v = v.view(B, S, self.num_kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rotary(q, k, cos, sin)
        out = sink_attention(q, k, v, self.sinks, mask, self.head_dim ** -0.5, self.sliding_window)
        return self.o_proj(out.transpose(1, 2).reshape(B, S, -1))


class GptOssForCausalLM(CausalLM):
    """gpt-oss: `forward(input_ids [B, S], labels=None, position_ids=None, return_logits=True, *,
    attention_mask=None) -> CausalLMOutput` (`models.decoder.CausalLM`): its attention (sinks, the layer's sliding
    window), its MoE block and `GptOssRMSNorm` on the shared decoder."""

    family = "gpt_oss"
    norm_class = GptOssRMSNorm

    def build_attention(self, cfg: ModelConfig, layer_idx: int, *, dtype=None, device=None) -> nn.Module:
        return GptOssAttention(cfg, layer_idx, dtype=dtype, device=device)

    def build_moe(self, cfg: ModelConfig, layer_idx: int, *, moe_backend: str, dtype=None,
                  device=None) -> nn.Module:
        return MoEBlock(cfg.hidden_size, cfg.moe_intermediate_size, cfg.routing, router_bias=cfg.router_bias,
                        expert_bias=cfg.expert_bias, activation=cfg.activation, swiglu_limit=cfg.swiglu_limit,
                        swiglu_alpha=cfg.swiglu_alpha, backend=moe_backend, dtype=dtype, device=device)
