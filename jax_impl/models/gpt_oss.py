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
The attention itself, sinks and windows included, is `models.attention.dot_product_attention` (the literal softmax
with the sink column by default; "xla" / "cudnn" with the sink as an extra key: `sink_attention`).
"""

from __future__ import annotations

from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jax_impl.lora import Frozen, LoRALinear
from jax_impl.models.attention import dot_product_attention, sink_attention  # noqa: F401 - sink_attention re-exported
from jax_impl.models.decoder import CausalLM, load_array, load_linear
from jax_impl.models.layers import RMSNorm, apply_rotary, causal_mask, project
from jax_impl.moe import Experts, MoEBlock, Router
from shared_math.config import ModelConfig

_F32 = jnp.float32


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


class GptOssAttention(nnx.Module):
    """GQA self-attention with biases, YaRN RoPE, sinks and an optional sliding window (this layer's, from
    `layer_types`); canonical module names `q_proj`, `k_proj`, `v_proj`, `o_proj` (LoRA targets) and the frozen
    `sinks`. Takes the decoder's mask [B, S, S] (causal, packed documents, padding; None = plain causal) as every
    family's attention, and runs `dot_product_attention` with `attn_implementation`."""

    def __init__(self, cfg: ModelConfig, layer_idx: int, q_proj: LoRALinear, k_proj: LoRALinear,
                 v_proj: LoRALinear, o_proj: LoRALinear, sinks: jax.Array):
        self.q_proj, self.k_proj, self.v_proj, self.o_proj = q_proj, k_proj, v_proj, o_proj
        self.sinks = Frozen(sinks)
        self.num_heads, self.num_kv_heads, self.head_dim = (cfg.num_attention_heads, cfg.num_key_value_heads,
                                                            cfg.head_dim)
        self.sliding_window = cfg.sliding_window if cfg.layer_types[layer_idx] == "sliding_attention" else None
        self.attn_implementation: str | None = None

    def __call__(self, x_BSH: jax.Array, cos: jax.Array, sin: jax.Array, mask_BSS: jax.Array | None) -> jax.Array:
        B, S, _ = x_BSH.shape
        N, Nkv, D = self.num_heads, self.num_kv_heads, self.head_dim
        q, k, v = project(x_BSH, self.q_proj, self.k_proj, self.v_proj)
        q = apply_rotary(q.reshape(B, S, N, D), cos, sin)
        k = apply_rotary(k.reshape(B, S, Nkv, D), cos, sin)
        v = v.reshape(B, S, Nkv, D)
        out = dot_product_attention(q, k, v, scale=D ** -0.5, mask_BSS=mask_BSS, window=self.sliding_window,
                                    sinks_N=self.sinks[...], implementation=self.attn_implementation)
        return self.o_proj(out.reshape(B, S, N * D))


class GptOssForCausalLM(CausalLM):
    """gpt-oss: `__call__(input_ids, labels=None, position_ids=None, return_logits=True, *, attention_mask=None)
    -> CausalLMOutput`
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
