"""DeepSeek-V3 and GLM-4.7-Flash (`glm4_moe_lite`) in Flax NNX with split LoRA, mirroring HF transformers v5.

Shape legend: B batch · S sequence · T = B·S tokens · H hidden · N heads · Dn qk_nope_head_dim · Dr qk_rope_head_dim ·
Dv v_head_dim · C kv_lora_rank · E experts · V vocab.

Both families share HF's code, on the decoder of `models.decoder`: MLA attention (`MLAttention`, the
`build_attention` hook), sigmoid group-limited routing with an fp32 router and `e_score_correction_bias` and a shared
SwiGLU expert added to the routed output (`build_moe`), and dense first layers (`ModelConfig.moe_layers`, which the
decoder follows). `DeepseekV3ForCausalLM` also serves GLM-4.x (`glm4_moe.py`) with GQA attention. No aux loss (HF
has none here: `cfg.has_aux_loss` is false). Module paths equal the canonical tensor names (docs/CONTRACTS.md).
"""

from __future__ import annotations

from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jax_impl.models.attention import dot_product_attention
from jax_impl.models.decoder import CausalLM, load_array, load_dense_mlp, load_linear, load_norm
from jax_impl.models.layers import apply_rotary, apply_rotary_interleave, project
from jax_impl.moe import Experts, MoEBlock, Router
from shared_math.config import ModelConfig
from shared_math.rope import mla_softmax_scale

_F32 = jnp.float32
# HF builds q_a_layernorm and kv_a_layernorm with RMSNorm's default eps, not config.rms_norm_eps
MLA_NORM_EPS = 1e-6


class MLAttention(nnx.Module):
    """Multi-head latent attention (HF `DeepseekV3Attention`):

    q = q_b_proj(q_a_layernorm(q_a_proj(x))) (or q_proj(x)) -> per head [nope Dn | rope Dr];
    kv_a_proj_with_mqa(x) -> [latent C | k_rope Dr]; kv_b_proj(kv_a_layernorm(latent)) -> per head [k_nope | v];
    k_rope is shared by all heads; RoPE (interleaved when rope_interleave); softmax(q·kᵀ·scale)·v with scale =
    (Dn + Dr)^-0.5 · YaRN mscale²; o_proj. The softmax is `models.attention.dot_product_attention` (q/k head dim
    Dn + Dr, v head dim Dv), with `attn_implementation`; its reference rounds where HF's eager attention rounds
    (scores in the model dtype, softmax in fp32).
    """

    def __init__(self, cfg: ModelConfig, layer: Mapping[str, np.ndarray], *, dtype):
        if cfg.q_lora_rank is None:
            self.q_proj = load_linear(layer, "self_attn.q_proj", dtype)
        else:
            self.q_a_proj = load_linear(layer, "self_attn.q_a_proj", dtype)
            self.q_a_layernorm = load_norm(layer, "self_attn.q_a_layernorm", MLA_NORM_EPS, dtype)
            self.q_b_proj = load_linear(layer, "self_attn.q_b_proj", dtype)
        self.kv_a_proj_with_mqa = load_linear(layer, "self_attn.kv_a_proj_with_mqa", dtype)
        self.kv_a_layernorm = load_norm(layer, "self_attn.kv_a_layernorm", MLA_NORM_EPS, dtype)
        self.kv_b_proj = load_linear(layer, "self_attn.kv_b_proj", dtype)
        self.o_proj = load_linear(layer, "self_attn.o_proj", dtype)
        self.has_q_lora = cfg.q_lora_rank is not None
        self.num_heads, self.nope, self.rope, self.v_dim = (cfg.num_attention_heads, cfg.qk_nope_head_dim,
                                                            cfg.qk_rope_head_dim, cfg.v_head_dim)
        self.kv_lora_rank, self.interleave = cfg.kv_lora_rank, cfg.rope_interleave
        self.scaling = mla_softmax_scale(cfg)
        self.attn_implementation: str | None = None

    def __call__(self, x_BSH: jax.Array, cos: jax.Array, sin: jax.Array, mask_BSS: jax.Array | None) -> jax.Array:
        B, S, _ = x_BSH.shape
        N, Dn, Dr, Dv = self.num_heads, self.nope, self.rope, self.v_dim
        q_in, ckv = project(x_BSH, self.q_a_proj if self.has_q_lora else self.q_proj, self.kv_a_proj_with_mqa)
        q = self.q_b_proj(self.q_a_layernorm(q_in)) if self.has_q_lora else q_in
        q_BSND = q.reshape(B, S, N, Dn + Dr)
        latent, k_rot_BS1D = ckv[..., :self.kv_lora_rank], ckv[..., self.kv_lora_rank:].reshape(B, S, 1, Dr)
        kv_BSND = self.kv_b_proj(self.kv_a_layernorm(latent)).reshape(B, S, N, Dn + Dv)
        rotary = apply_rotary_interleave if self.interleave else apply_rotary
        q_BSND = jnp.concatenate([q_BSND[..., :Dn], rotary(q_BSND[..., Dn:], cos, sin)], axis=-1)
        k_rot_BS1D = rotary(k_rot_BS1D, cos, sin)
        k_BSND = jnp.concatenate([kv_BSND[..., :Dn], jnp.broadcast_to(k_rot_BS1D, (B, S, N, Dr))], axis=-1)
        v_BSND = kv_BSND[..., Dn:]
        out_BSND = dot_product_attention(q_BSND, k_BSND, v_BSND, scale=self.scaling, mask_BSS=mask_BSS,
                                         implementation=self.attn_implementation)
        return self.o_proj(out_BSND.reshape(B, S, N * Dv))


class DeepseekV3ForCausalLM(CausalLM):
    """DeepSeek-V3: `__call__(input_ids, labels=None, position_ids=None, return_logits=True, *, attention_mask=None)
    -> CausalLMOutput`
    (`models.decoder.CausalLM`; aux_loss always None). MLA attention (GQA for GLM-4.x configs), the MoE block with a
    shared expert; dense layers where `cfg.moe_layers` says so."""

    family = "deepseek_v3"

    def build_attention(self, cfg: ModelConfig, layer: Mapping[str, np.ndarray], layer_idx: int, *,
                        dtype) -> nnx.Module:
        if cfg.attention == "mla":
            return MLAttention(cfg, layer, dtype=dtype)
        return super().build_attention(cfg, layer, layer_idx, dtype=dtype)  # GLM-4.x: GQA

    def build_moe(self, cfg: ModelConfig, layer: Mapping[str, np.ndarray], layer_idx: int, *, moe_backend: str,
                  dtype) -> nnx.Module:
        experts = Experts(load_array(layer["mlp.experts.gate_up_proj"], dtype),
                          load_array(layer["mlp.experts.down_proj"], dtype), activation=cfg.activation,
                          backend=moe_backend)
        # HF keeps the router weight and correction bias in fp32 in bf16 models (_keep_in_fp32_modules_strict)
        router = Router(load_array(layer["mlp.router.weight"], _F32),
                        e_score_correction_bias_E=load_array(layer["mlp.router.e_score_correction_bias"], _F32))
        shared = load_dense_mlp(layer, "mlp.shared_experts", dtype) if cfg.n_shared_experts else None
        return MoEBlock(router, experts, cfg.routing, shared)


class Glm4MoeLiteForCausalLM(DeepseekV3ForCausalLM):
    """GLM-4.7-Flash: DeepSeek-V3's code (HF's modeling_glm4_moe_lite is a copy); dense layers from
    `mlp_layer_types`."""

    family = "glm4_moe_lite"
