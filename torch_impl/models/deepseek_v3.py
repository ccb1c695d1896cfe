"""DeepSeek-V3 and GLM-4.7-Flash (`glm4_moe_lite`) as HF transformers 5.x computes them, with split LoRA.

Shape legend: B batch · S sequence · T = B·S tokens · H hidden · N heads · Dn qk_nope_head_dim · Dr qk_rope_head_dim ·
Dv v_head_dim · C kv_lora_rank · E experts · K experts per token · V vocab.

Both families share HF's code: MLA attention (`MLAttention`), sigmoid group-limited routing with an fp32 router and
`e_score_correction_bias`, a shared SwiGLU expert added to the routed output, and dense first layers
(`first_k_dense_replace` for DeepSeek-V3, `mlp_layer_types` for GLM-4.7-Flash; both in `ModelConfig.moe_layers`).
`DeepseekV3DecoderLayer` also serves GLM-4.x (`glm4_moe.py`), which swaps MLA for GQA attention. No aux loss: HF
has none for these families. Module paths equal the canonical tensor names (docs/CONTRACTS.md).
"""

from __future__ import annotations

import torch
from torch import nn

from shared_math.config import ModelConfig
from shared_math.rope import mla_softmax_scale
from torch_impl.models.layers import (
    Attention,
    CausalLMOutput,
    DenseMLP,
    LayerCheckpointing,
    Linear,
    RMSNorm,
    RotaryEmbedding,
    apply_rotary,
    apply_rotary_interleave,
    causal_mask,
    lm_output,
    prepare_attention_mask,
    prepare_position_ids,
    sdpa_attention,
)
from torch_impl.moe import MoEBlock

# HF builds q_a_layernorm and kv_a_layernorm with RMSNorm's default eps, not config.rms_norm_eps (GLM-4.7-Flash's
# 1e-5 applies to the decoder norms only)
MLA_NORM_EPS = 1e-6


class MLAttention(nn.Module):
    """Multi-head latent attention (DeepSeek-V2/V3), HF's `DeepseekV3Attention`:

    q = q_b_proj(q_a_layernorm(q_a_proj(x))) (or q_proj(x) when q_lora_rank is None) -> per head [nope Dn | rope Dr];
    kv_a_proj_with_mqa(x) -> [latent C | k_rope Dr]; kv_b_proj(kv_a_layernorm(latent)) -> per head [k_nope Dn | v Dv];
    k_rope is one head shared by all; RoPE (interleaved pairs when rope_interleave) on q_rope and k_rope;
    softmax(q·kᵀ · scale) · v with scale = (Dn + Dr)^-0.5 · YaRN mscale²; o_proj.
    """

    def __init__(self, cfg: ModelConfig, *, dtype=None, device=None) -> None:
        super().__init__()
        kw = dict(dtype=dtype, device=device)
        H, N = cfg.hidden_size, cfg.num_attention_heads
        self.num_heads, self.nope, self.rope, self.v_dim = N, cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim
        self.kv_lora_rank, self.interleave = cfg.kv_lora_rank, cfg.rope_interleave
        q_out = N * cfg.qk_head_dim
        eps = MLA_NORM_EPS
        if cfg.q_lora_rank is None:
            self.q_proj = Linear(H, q_out, **kw)
        else:
            self.q_a_proj = Linear(H, cfg.q_lora_rank, bias=cfg.attention_bias, **kw)
            self.q_a_layernorm = RMSNorm(cfg.q_lora_rank, eps, **kw)
            self.q_b_proj = Linear(cfg.q_lora_rank, q_out, **kw)
        self.kv_a_proj_with_mqa = Linear(H, cfg.kv_lora_rank + cfg.qk_rope_head_dim, bias=cfg.attention_bias, **kw)
        self.kv_a_layernorm = RMSNorm(cfg.kv_lora_rank, eps, **kw)
        self.kv_b_proj = Linear(cfg.kv_lora_rank, N * (cfg.qk_nope_head_dim + cfg.v_head_dim), **kw)
        self.o_proj = Linear(N * cfg.v_head_dim, H, bias=cfg.o_proj_bias, **kw)
        self.scaling = mla_softmax_scale(cfg)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                mask: torch.Tensor | None = None) -> torch.Tensor:
        B, S, _ = x.shape
        N, Dn, Dr, Dv = self.num_heads, self.nope, self.rope, self.v_dim
        q = self.q_proj(x) if hasattr(self, "q_proj") else self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x)))
        q_nope, q_rot = q.view(B, S, N, Dn + Dr).transpose(1, 2).split([Dn, Dr], dim=-1)
        latent, k_rot = self.kv_a_proj_with_mqa(x).split([self.kv_lora_rank, Dr], dim=-1)
        kv = self.kv_b_proj(self.kv_a_layernorm(latent)).view(B, S, N, Dn + Dv).transpose(1, 2)
        k_nope, v = kv.split([Dn, Dv], dim=-1)
        k_rot = k_rot.view(B, 1, S, Dr)
        rotary = apply_rotary_interleave if self.interleave else apply_rotary
        q_rot, k_rot = rotary(q_rot, k_rot, cos, sin)
        q = torch.cat([q_nope, q_rot], dim=-1)
        k = torch.cat([k_nope, k_rot.expand(B, N, S, Dr)], dim=-1)
        out = sdpa_attention(q, k, v, mask, self.scaling)
        return self.o_proj(out.transpose(1, 2).reshape(B, S, N * Dv))


class DeepseekV3DecoderLayer(nn.Module):
    """x + attn(norm(x)), then h + mlp(norm(h)); attn is MLA (or GQA for GLM-4.x), mlp an MoEBlock with a shared
    expert or a DenseMLP of width `intermediate_size`."""

    def __init__(self, cfg: ModelConfig, layer_idx: int, *, moe_backend: str = "auto", dtype=None,
                 device=None) -> None:
        super().__init__()
        kw = dict(dtype=dtype, device=device)
        self.self_attn = MLAttention(cfg, **kw) if cfg.attention == "mla" else Attention(cfg, **kw)
        self.is_moe = cfg.moe_layers[layer_idx]
        if self.is_moe:
            self.mlp = MoEBlock(cfg.hidden_size, cfg.moe_intermediate_size, cfg.routing, backend=moe_backend,
                                shared_intermediate_size=cfg.shared_intermediate_size, **kw)
        else:
            self.mlp = DenseMLP(cfg.hidden_size, cfg.intermediate_size, **kw)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, **kw)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, **kw)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                mask: torch.Tensor | None) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask)
        h = self.post_attention_layernorm(x)
        return x + (self.mlp(h)[0] if self.is_moe else self.mlp(h))


class DeepseekV3ForCausalLM(LayerCheckpointing, nn.Module):
    """The whole model.
    `forward(input_ids [B, S], labels=None, position_ids=None, return_logits=True, *, attention_mask=None)
    -> CausalLMOutput` (aux_loss is always None: HF has no load-balancing loss for these families). Parameters are
    created uninitialised (`torch_impl.load.load_model` fills them); `lm_head` is None with tied embeddings."""

    family = "deepseek_v3"

    def __init__(self, cfg: ModelConfig, *, moe_backend: str = "auto", dtype: torch.dtype = torch.float32,
                 device: torch.device | str = "cpu") -> None:
        super().__init__()
        if cfg.family != self.family:
            raise ValueError(f"{type(self).__name__} needs a {self.family} config, got {cfg.family}")
        kw = dict(dtype=dtype, device=device)
        self.config = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size, **kw)
        self.embed_tokens.weight.requires_grad_(False)
        self.layers = nn.ModuleList(DeepseekV3DecoderLayer(cfg, l, moe_backend=moe_backend, **kw)
                                    for l in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, **kw)
        self.lm_head = None if cfg.tie_word_embeddings else Linear(cfg.hidden_size, cfg.vocab_size, **kw)
        self.rotary_emb = RotaryEmbedding(cfg.rotary_dim, cfg.rope_theta, cfg.rope_scaling, device=device)

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None, return_logits: bool = True, *,
                attention_mask: torch.Tensor | None = None) -> CausalLMOutput:
        """input_ids [B, S] -> CausalLMOutput. position_ids [B, S] (restarting at 0 per packed document; 0..S-1 when
        None, even with padding, as HF's forward). attention_mask [B, S] (HF's: 1 = token, 0 = padding) masks the
        attention (`causal_mask`); the loss is masked by labels = -100 only, as HF's."""
        position_ids = prepare_position_ids(input_ids, position_ids, self.config.vocab_size)
        attention_mask = prepare_attention_mask(input_ids, attention_mask)
        x = self.embed_tokens(input_ids)
        cos, sin = self.rotary_emb(x, position_ids)
        mask = causal_mask(position_ids, attention_mask)
        for layer in self.layers:
            x = self._run_layer(layer, x, cos, sin, mask)
        # DeepSeek-V3 and GLM define no load-balancing loss in HF (their routers carry a bias instead)
        return lm_output(self.norm(x), self.embed_tokens.weight, self.lm_head, labels, [], self.config, False,
                         return_logits)


class Glm4MoeLiteForCausalLM(DeepseekV3ForCausalLM):
    """GLM-4.7-Flash: DeepSeek-V3's code (HF's modeling_glm4_moe_lite is a copy); dense layers from
    `mlp_layer_types`."""

    family = "glm4_moe_lite"
