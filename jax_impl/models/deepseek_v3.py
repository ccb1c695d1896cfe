"""DeepSeek-V3 and GLM-4.7-Flash (`glm4_moe_lite`) in Flax NNX with split LoRA, mirroring HF transformers v5.

Shape legend: B batch · S sequence · T = B·S tokens · H hidden · N heads · Dn qk_nope_head_dim · Dr qk_rope_head_dim ·
Dv v_head_dim · C kv_lora_rank · E experts · V vocab.

Both families share HF's code: MLA attention (`MLAttention`), sigmoid group-limited routing with an fp32 router and
`e_score_correction_bias`, a shared SwiGLU expert added to the routed output, and dense first layers
(`ModelConfig.moe_layers`). `DeepseekV3DecoderLayer` also serves GLM-4.x (`glm4_moe.py`) with GQA attention. No aux
loss (HF has none here). Module paths equal the canonical tensor names (docs/CONTRACTS.md).
"""

from __future__ import annotations

from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jax_impl.lora import Frozen, LoRALinear
from jax_impl.models.layers import (
    Attention,
    CausalLMOutput,
    DenseMLP,
    LayerCheckpointing,
    RMSNorm,
    RotaryEmbedding,
    apply_rotary,
    apply_rotary_interleave,
    causal_mask,
    lm_output,
    masked_softmax,
    prepare_attention_mask,
    prepare_position_ids,
)
from jax_impl.moe import Experts, MoEBlock, Router
from shared_math.config import ModelConfig
from shared_math.rope import mla_softmax_scale

_F32 = jnp.float32
# HF builds q_a_layernorm and kv_a_layernorm with RMSNorm's default eps, not config.rms_norm_eps
MLA_NORM_EPS = 1e-6


def _arr(t: np.ndarray, dtype) -> jax.Array:
    return jnp.asarray(np.asarray(t), dtype=dtype)


def _linear(layer: Mapping[str, np.ndarray], name: str, dtype) -> LoRALinear:
    bias = layer.get(name + ".bias")
    return LoRALinear(_arr(layer[name + ".weight"], dtype), None if bias is None else _arr(bias, dtype))


def _norm(layer: Mapping[str, np.ndarray], name: str, eps: float, dtype) -> RMSNorm:
    return RMSNorm(_arr(layer[name + ".weight"], dtype), eps)


class MLAttention(nnx.Module):
    """Multi-head latent attention (HF `DeepseekV3Attention`):

    q = q_b_proj(q_a_layernorm(q_a_proj(x))) (or q_proj(x)) -> per head [nope Dn | rope Dr];
    kv_a_proj_with_mqa(x) -> [latent C | k_rope Dr]; kv_b_proj(kv_a_layernorm(latent)) -> per head [k_nope | v];
    k_rope is shared by all heads; RoPE (interleaved when rope_interleave); softmax(q·kᵀ·scale)·v with scale =
    (Dn + Dr)^-0.5 · YaRN mscale²; o_proj. Rounds where HF's eager attention rounds (scores in the model dtype,
    softmax in fp32).
    """

    def __init__(self, cfg: ModelConfig, layer: Mapping[str, np.ndarray], *, dtype):
        if cfg.q_lora_rank is None:
            self.q_proj = _linear(layer, "self_attn.q_proj", dtype)
        else:
            self.q_a_proj = _linear(layer, "self_attn.q_a_proj", dtype)
            self.q_a_layernorm = _norm(layer, "self_attn.q_a_layernorm", MLA_NORM_EPS, dtype)
            self.q_b_proj = _linear(layer, "self_attn.q_b_proj", dtype)
        self.kv_a_proj_with_mqa = _linear(layer, "self_attn.kv_a_proj_with_mqa", dtype)
        self.kv_a_layernorm = _norm(layer, "self_attn.kv_a_layernorm", MLA_NORM_EPS, dtype)
        self.kv_b_proj = _linear(layer, "self_attn.kv_b_proj", dtype)
        self.o_proj = _linear(layer, "self_attn.o_proj", dtype)
        self.has_q_lora = cfg.q_lora_rank is not None
        self.num_heads, self.nope, self.rope, self.v_dim = (cfg.num_attention_heads, cfg.qk_nope_head_dim,
                                                            cfg.qk_rope_head_dim, cfg.v_head_dim)
        self.kv_lora_rank, self.interleave = cfg.kv_lora_rank, cfg.rope_interleave
        self.scaling = mla_softmax_scale(cfg)

    def __call__(self, x_BSH: jax.Array, cos: jax.Array, sin: jax.Array, mask_BSS: jax.Array) -> jax.Array:
        B, S, _ = x_BSH.shape
        N, Dn, Dr, Dv = self.num_heads, self.nope, self.rope, self.v_dim
        q = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x_BSH))) if self.has_q_lora else self.q_proj(x_BSH)
        q_BSND = q.reshape(B, S, N, Dn + Dr)
        ckv = self.kv_a_proj_with_mqa(x_BSH)
        latent, k_rot_BS1D = ckv[..., :self.kv_lora_rank], ckv[..., self.kv_lora_rank:].reshape(B, S, 1, Dr)
        kv_BSND = self.kv_b_proj(self.kv_a_layernorm(latent)).reshape(B, S, N, Dn + Dv)
        rotary = apply_rotary_interleave if self.interleave else apply_rotary
        q_BSND = jnp.concatenate([q_BSND[..., :Dn], rotary(q_BSND[..., Dn:], cos, sin)], axis=-1)
        k_rot_BS1D = rotary(k_rot_BS1D, cos, sin)
        k_BSND = jnp.concatenate([kv_BSND[..., :Dn], jnp.broadcast_to(k_rot_BS1D, (B, S, N, Dr))], axis=-1)
        v_BSND = kv_BSND[..., Dn:]
        cd = x_BSH.dtype
        scores = jnp.einsum("bqnd,bknd->bnqk", q_BSND, k_BSND, preferred_element_type=_F32).astype(cd)
        scores = scores * jnp.asarray(self.scaling, cd)
        probs = masked_softmax(scores, mask_BSS[:, None], cd)
        out_BSND = jnp.einsum("bnqk,bknd->bqnd", probs, v_BSND, preferred_element_type=_F32).astype(cd)
        return self.o_proj(out_BSND.reshape(B, S, N * Dv))


def _gqa_attention(cfg: ModelConfig, layer: Mapping[str, np.ndarray], *, dtype) -> Attention:
    """GLM-4.x's GQA attention (q/k/v biases, optional q/k norm) from canonical tensors."""
    norms = {}
    if cfg.use_qk_norm:
        norms = dict(q_norm=_norm(layer, "self_attn.q_norm", cfg.rms_norm_eps, dtype),
                     k_norm=_norm(layer, "self_attn.k_norm", cfg.rms_norm_eps, dtype))
    return Attention(cfg, *(_linear(layer, f"self_attn.{p}", dtype) for p in ("q_proj", "k_proj", "v_proj", "o_proj")),
                     **norms)


class DeepseekV3DecoderLayer(nnx.Module):
    """Pre-norm decoder layer: MLA (or GQA for GLM-4.x) attention, then an MoE block with a shared expert or a dense
    SwiGLU MLP, each with a residual connection."""

    def __init__(self, cfg: ModelConfig, layer: Mapping[str, np.ndarray], l: int, *, dtype, moe_backend: str):
        eps = cfg.rms_norm_eps
        self.input_layernorm = _norm(layer, "input_layernorm", eps, dtype)
        self.post_attention_layernorm = _norm(layer, "post_attention_layernorm", eps, dtype)
        self.self_attn = (MLAttention(cfg, layer, dtype=dtype) if cfg.attention == "mla"
                          else _gqa_attention(cfg, layer, dtype=dtype))
        self.is_moe = bool(cfg.moe_layers[l])
        if self.is_moe:
            experts = Experts(_arr(layer["mlp.experts.gate_up_proj"], dtype),
                              _arr(layer["mlp.experts.down_proj"], dtype), activation=cfg.activation,
                              backend=moe_backend)
            # HF keeps the router weight and correction bias in fp32 in bf16 models (_keep_in_fp32_modules_strict)
            router = Router(_arr(layer["mlp.router.weight"], _F32),
                            e_score_correction_bias_E=_arr(layer["mlp.router.e_score_correction_bias"], _F32))
            shared = None
            if cfg.n_shared_experts:
                shared = DenseMLP(*(_linear(layer, f"mlp.shared_experts.{p}", dtype)
                                    for p in ("gate_proj", "up_proj", "down_proj")))
            self.mlp = MoEBlock(router, experts, cfg.routing, shared)
        else:
            self.mlp = DenseMLP(*(_linear(layer, f"mlp.{p}", dtype) for p in ("gate_proj", "up_proj", "down_proj")))

    def __call__(self, h_BSH, cos, sin, mask_BSS) -> jax.Array:
        h_BSH = h_BSH + self.self_attn(self.input_layernorm(h_BSH), cos, sin, mask_BSS)
        x_BSH = self.post_attention_layernorm(h_BSH)
        if not self.is_moe:
            return h_BSH + self.mlp(x_BSH)
        B, S, H = x_BSH.shape
        y_TH, _ = self.mlp(x_BSH.reshape(B * S, H))
        return h_BSH + y_TH.reshape(B, S, H)


class DeepseekV3ForCausalLM(LayerCheckpointing, nnx.Module):
    """DeepSeek-V3 with split LoRA; build with `jax_impl.load_model` (or from canonical tensors directly).
    `__call__(input_ids, labels=None, position_ids=None, *, attention_mask=None) -> CausalLMOutput` (aux_loss
    always None)."""

    family = "deepseek_v3"

    def __init__(self, cfg: ModelConfig, tensors: Mapping[str, np.ndarray], *, dtype=jnp.float32,
                 moe_backend: str = "auto"):
        if cfg.family != self.family:
            raise ValueError(f"{type(self).__name__} needs a {self.family} config, got {cfg.family}")
        self.config = cfg
        self.lora_config = None
        self.dtype = jnp.dtype(dtype)
        self.embed_tokens = Frozen(_arr(tensors["embed_tokens.weight"], dtype))
        self.rotary_emb = RotaryEmbedding(cfg)
        layer_of = tensors.layer if hasattr(tensors, "layer") else (
            lambda l: {k[len(f"layers.{l}."):]: v for k, v in tensors.items() if k.startswith(f"layers.{l}.")})
        self.layers = nnx.List([DeepseekV3DecoderLayer(cfg, layer_of(l), l, dtype=dtype, moe_backend=moe_backend)
                                for l in range(cfg.num_hidden_layers)])
        self.norm = RMSNorm(_arr(tensors["norm.weight"], dtype), cfg.rms_norm_eps)
        self.lm_head = None if cfg.tie_word_embeddings else LoRALinear(_arr(tensors["lm_head.weight"], dtype))

    def __call__(self, input_ids: jax.Array, labels: jax.Array | None = None,
                 position_ids: jax.Array | None = None, *, attention_mask: jax.Array | None = None
                 ) -> CausalLMOutput:
        """input_ids [B, S] -> CausalLMOutput; position_ids [B, S] (restarting at 0 per packed sequence) or None
        (0..S-1, even with padding, as HF's forward). attention_mask [B, S] (HF's: 1 = token, 0 = padding) masks
        the attention (`causal_mask`); the loss is masked by labels = -100 only, as HF's."""
        position_ids = prepare_position_ids(input_ids, position_ids, self.config.vocab_size)
        attention_mask = prepare_attention_mask(input_ids, attention_mask)
        h_BSH = jnp.take(self.embed_tokens[...], input_ids, axis=0)
        cos, sin = self.rotary_emb(position_ids, self.dtype)
        mask_BSS = causal_mask(position_ids, attention_mask)
        for layer in self.layers:
            h_BSH = self._run_layer(layer, h_BSH, cos, sin, mask_BSS)
        # DeepSeek-V3 and GLM define no load-balancing loss in HF (their routers carry a bias instead)
        return lm_output(self.norm(h_BSH), self.embed_tokens[...], self.lm_head, labels, [], self.config, False)


class Glm4MoeLiteForCausalLM(DeepseekV3ForCausalLM):
    """GLM-4.7-Flash: DeepSeek-V3's code (HF's modeling_glm4_moe_lite is a copy); dense layers from
    `mlp_layer_types`."""

    family = "glm4_moe_lite"
