"""gpt-oss (gpt-oss-20b, gpt-oss-120b) in Flax NNX with split LoRA, mirroring HF transformers v5's `GptOssForCausalLM`
and torch_impl/models/gpt_oss.py (same class and function names).

Shape legend: B batch · S sequence · T = B·S tokens · H hidden · N query heads · Nkv kv heads · D head_dim ·
E experts · K experts per token · V vocab. Module paths equal the canonical tensor names (docs/CONTRACTS.md).

The decoder is `models.decoder`'s; this file supplies what differs from Qwen3-MoE (hf-moe-formats.md §2): attention
(`GptOssAttention`, built per layer index) with q/k/v/o biases, no q/k norm, a learned logit per head (`sinks [N]`)
that joins every softmax row and is then dropped, sliding-window layers (keys with `q_idx - window < kv_idx <=
q_idx`) and full layers from `layer_types`; YaRN RoPE (attention factor on cos and sin); RMSNorm with the weight
product in fp32 (`GptOssRMSNorm`, the decoder's `norm_class`); router with bias, top-K logits then softmax over K;
experts with biases and the clamped SwiGLU; HF's aux loss only when `output_router_logits`.
Packed sequences: documents never attend across their boundary (HF's gpt-oss has no packed mask; see the torch twin).
Padded batches (`attention_mask`): HF's padding mask on full and sliding layers (`layers.causal_mask`); a query with
no key left (left padding) puts all weight on the sink and gets 0, exactly as HF's eager path.
"""

from __future__ import annotations

from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jax_impl.lora import Frozen, LoRALinear
from jax_impl.models.decoder import CausalLM, load_array, load_linear
from jax_impl.models.layers import RMSNorm, apply_rotary, causal_mask
from jax_impl.moe import Experts, MoEBlock, Router
from shared_math.config import ModelConfig

_F32 = jnp.float32
# extra q/k coordinates that carry the sink logit; 8 keeps D + 8 a multiple of 8 for fused attention kernels
_SINK_PAD = 8


class GptOssRMSNorm(RMSNorm):
    """(weight · x_f32 · rsqrt(mean(x_f32²) + eps)).astype(x.dtype): unlike Llama, the weight multiplies in fp32."""

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(_F32)
        normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return (self.weight[...].astype(_F32) * normed).astype(x.dtype)


def attention_mask(position_ids: jax.Array, window: int | None) -> jax.Array:
    """Bool mask [B, 1, S, S] (True = attend): causal, within `window` keys back (self included) when given, and within
    one packed document (a document starts wherever position_ids do not grow by 1): `layers.causal_mask` without
    padding."""
    return causal_mask(position_ids, None, window)[:, None]


def _with_sink(q: jax.Array, k: jax.Array, v: jax.Array, sinks: jax.Array, scale: float
               ) -> tuple[jax.Array, jax.Array, jax.Array]:
    """q [..., L, N, D], k, v [..., Lk, Nkv, D] -> width D + 8 with the sink key at key index 0: q's coordinate D is
    sink_n / scale (per query head, so one sink key serves a GQA group), the sink key's is 1 (its logit is sink_n),
    every other extra entry 0; v gets a zero row for the sink and zero columns (sliced off after)."""
    *lead, L, N, D = q.shape
    dt = q.dtype
    sink_q = jnp.broadcast_to((sinks.astype(_F32) / scale).astype(dt)[:, None], (*lead, L, N, 1))
    q_x = jnp.concatenate([q, sink_q, jnp.zeros((*lead, L, N, _SINK_PAD - 1), dt)], axis=-1)
    pad = [(0, 0)] * (k.ndim - 1)
    sink_key = jnp.zeros((*k.shape[:-3], 1, k.shape[-2], D + _SINK_PAD), dt).at[..., D].set(1)
    k_x = jnp.concatenate([sink_key, jnp.pad(k, pad + [(0, _SINK_PAD)])], axis=-3)
    v_x = jnp.pad(v, [(0, 0)] * (v.ndim - 3) + [(1, 0), (0, 0), (0, _SINK_PAD)])
    return q_x, k_x, v_x


def _sliding_blocks(q: jax.Array, k: jax.Array, v: jax.Array, sinks: jax.Array, mask: jax.Array, window: int,
                    scale: float) -> jax.Array:
    """Sliding-window attention with sinks in query blocks of `window` rows, each against its W + C - 1 keys (as
    torch_impl): logits O(S · W), never [S, S]. The packed-document mask is gathered per block."""
    B, S, N, D = q.shape
    C = W = window
    nC = -(-S // C)
    Sp, L = nC * C, C + W - 1
    q_blk = jnp.pad(q, [(0, 0), (0, Sp - S), (0, 0), (0, 0)]).reshape(B, nC, C, N, D)
    key_idx = jnp.arange(nC)[:, None] * C + jnp.arange(L)[None, :]  # padded key index of block c, slot j
    k_blk = jnp.pad(k, [(0, 0), (W - 1, Sp - S), (0, 0), (0, 0)])[:, key_idx]  # [B, nC, L, Nkv, D]
    v_blk = jnp.pad(v, [(0, 0), (W - 1, Sp - S), (0, 0), (0, 0)])[:, key_idx]
    q_pos = jnp.arange(nC)[:, None] * C + jnp.arange(C)[None, :]  # [nC, C]
    k_pos = key_idx - (W - 1)  # [nC, L]
    band = ((k_pos[:, None, :] <= q_pos[:, :, None]) & (k_pos[:, None, :] > q_pos[:, :, None] - W)
            & (k_pos[:, None, :] >= 0))
    doc = mask[:, 0][:, jnp.clip(q_pos, 0, S - 1)[:, :, None], jnp.clip(k_pos, 0, S - 1)[:, None, :]]
    allowed = jnp.concatenate([jnp.ones((B, nC, C, 1), bool), band[None] & doc], axis=-1)
    q_x, k_x, v_x = _with_sink(q_blk, k_blk, v_blk, sinks, scale)
    out = jax.nn.dot_product_attention(q_x.reshape(B * nC, C, N, -1), k_x.reshape(B * nC, L + 1, *k_x.shape[-2:]),
                                       v_x.reshape(B * nC, L + 1, *v_x.shape[-2:]),
                                       mask=allowed.reshape(B * nC, 1, C, L + 1), scale=scale)
    return out[..., :D].reshape(B, Sp, N, D)[:, :S]


def sink_attention(q: jax.Array, k: jax.Array, v: jax.Array, sinks: jax.Array, mask: jax.Array, scale: float,
                   window: int | None = None) -> jax.Array:
    """softmax([q·kᵀ·scale | sink_n]) without the sink column, times v: q [B, S, N, D], k, v [B, S, Nkv, D] (GQA:
    query head n·G + g reads kv head n), sinks [N], mask [B, 1, S, S] bool (causal, packed documents, padding), `window`
    (sliding layers: keys with q_idx - window < kv_idx <= q_idx) -> [B, S, N, D].

    As in torch_impl: the sink is one extra key (index 0, value 0) whose logit is the sink for every query, which
    equals the log-sum-exp correction `out_plain · sigmoid(lse − sink)`, all through `jax.nn.dot_product_attention`
    (differentiable as is). Sliding layers run in query blocks of one window (`_sliding_blocks`: logits O(S·W));
    full layers pass the [B, 1, S, S+1] mask (XLA forms the [S, S+1] logits; `implementation="cudnn"` on GPU
    would not).
    """
    S, D = q.shape[1], q.shape[-1]
    if window is not None and window < S:
        return _sliding_blocks(q, k, v, sinks, mask, window, scale)
    q_x, k_x, v_x = _with_sink(q, k, v, sinks, scale)
    mask_x = jnp.concatenate([jnp.ones((*mask.shape[:-1], 1), bool), mask], axis=-1)
    return jax.nn.dot_product_attention(q_x, k_x, v_x, mask=mask_x, scale=scale)[..., :D]


class GptOssAttention(nnx.Module):
    """GQA self-attention with biases, YaRN RoPE, sinks and an optional sliding window (this layer's, from
    `layer_types`); canonical module names `q_proj`, `k_proj`, `v_proj`, `o_proj` (LoRA targets) and the frozen
    `sinks`. Takes the decoder's mask [B, S, S] (causal, packed documents, padding) as every family's attention."""

    def __init__(self, cfg: ModelConfig, layer_idx: int, q_proj: LoRALinear, k_proj: LoRALinear,
                 v_proj: LoRALinear, o_proj: LoRALinear, sinks: jax.Array):
        self.q_proj, self.k_proj, self.v_proj, self.o_proj = q_proj, k_proj, v_proj, o_proj
        self.sinks = Frozen(sinks)
        self.num_heads, self.num_kv_heads, self.head_dim = (cfg.num_attention_heads, cfg.num_key_value_heads,
                                                            cfg.head_dim)
        self.sliding_window = cfg.sliding_window if cfg.layer_types[layer_idx] == "sliding_attention" else None

    def __call__(self, x_BSH: jax.Array, cos: jax.Array, sin: jax.Array, mask_BSS: jax.Array) -> jax.Array:
        B, S, _ = x_BSH.shape
        N, Nkv, D = self.num_heads, self.num_kv_heads, self.head_dim
        q = apply_rotary(self.q_proj(x_BSH).reshape(B, S, N, D), cos, sin)
        k = apply_rotary(self.k_proj(x_BSH).reshape(B, S, Nkv, D), cos, sin)
        v = self.v_proj(x_BSH).reshape(B, S, Nkv, D)
        out = sink_attention(q, k, v, self.sinks[...], mask_BSS[:, None], D ** -0.5, self.sliding_window)
        return self.o_proj(out.reshape(B, S, N * D))


class GptOssForCausalLM(CausalLM):
    """gpt-oss: `__call__(input_ids, labels=None, position_ids=None, *, attention_mask=None) -> CausalLMOutput`
    (`models.decoder.CausalLM`): its attention (sinks, the layer's sliding window), its MoE block and
    `GptOssRMSNorm` on the shared decoder."""

    family = "gpt_oss"
    norm_class = GptOssRMSNorm

    def build_attention(self, cfg: ModelConfig, layer: Mapping[str, np.ndarray], layer_idx: int, *,
                        dtype) -> nnx.Module:
        projs = (load_linear(layer, f"self_attn.{p}", dtype) for p in ("q_proj", "k_proj", "v_proj", "o_proj"))
        return GptOssAttention(cfg, layer_idx, *projs, sinks=load_array(layer["self_attn.sinks"], dtype))

    def build_moe(self, cfg: ModelConfig, layer: Mapping[str, np.ndarray], layer_idx: int, *, moe_backend: str,
                  dtype) -> nnx.Module:
        e = "mlp.experts."
        experts = Experts(load_array(layer[e + "gate_up_proj"], dtype), load_array(layer[e + "down_proj"], dtype),
                          load_array(layer[e + "gate_up_proj_bias"], dtype),
                          load_array(layer[e + "down_proj_bias"], dtype), activation=cfg.activation,
                          swiglu_limit=cfg.swiglu_limit, swiglu_alpha=cfg.swiglu_alpha, backend=moe_backend)
        router = Router(load_array(layer["mlp.router.weight"], dtype), load_array(layer["mlp.router.bias"], dtype))
        return MoEBlock(router, experts, cfg.routing)
