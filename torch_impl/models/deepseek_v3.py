"""DeepSeek-V3 and GLM-4.7-Flash (`glm4_moe_lite`) as HF transformers 5.x computes them, with split LoRA.

Shape legend: B batch · S sequence · T = B·S tokens · H hidden · N heads · Dn qk_nope_head_dim · Dr qk_rope_head_dim ·
Dv v_head_dim · C kv_lora_rank · E experts · K experts per token · V vocab.

Both families share HF's code, on the decoder of `models.decoder`: MLA attention (`MLAttention`, the
`build_attention` hook), sigmoid group-limited routing with an fp32 router and `e_score_correction_bias` and a shared
SwiGLU expert added to the routed output (`build_moe`), and dense first layers (`first_k_dense_replace` for
DeepSeek-V3, `mlp_layer_types` for GLM-4.7-Flash; both in `ModelConfig.moe_layers`, which the decoder follows). The
RoPE tables cover the rope part of each head only (`cfg.rotary_dim`). `DeepseekV3ForCausalLM` also serves GLM-4.x
(`glm4_moe.py`), which swaps MLA for GQA attention. No aux loss: HF has none for these families
(`cfg.has_aux_loss` is false). Module paths equal the canonical tensor names (docs/CONTRACTS.md).
"""

from __future__ import annotations

import torch
from torch import nn

from shared_math.config import ModelConfig
from shared_math.rope import mla_softmax_scale
from torch_impl.models.decoder import CausalLM
from torch_impl.models.layers import (
    Linear,
    RMSNorm,
    apply_rotary,
    apply_rotary_interleave,
    project,
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
        direct_q = hasattr(self, "q_proj")  # q_lora_rank None: q in one projection
        q_in, kv_a = project(x, self.q_proj if direct_q else self.q_a_proj, self.kv_a_proj_with_mqa)
        q = q_in if direct_q else self.q_b_proj(self.q_a_layernorm(q_in))
        q_nope, q_rot = q.view(B, S, N, Dn + Dr).transpose(1, 2).split([Dn, Dr], dim=-1)
        latent, k_rot = kv_a.split([self.kv_lora_rank, Dr], dim=-1)
        kv = self.kv_b_proj(self.kv_a_layernorm(latent)).view(B, S, N, Dn + Dv).transpose(1, 2)
        k_nope, v = kv.split([Dn, Dv], dim=-1)
        k_rot = k_rot.view(B, 1, S, Dr)
        rotary = apply_rotary_interleave if self.interleave else apply_rotary
        q_rot, k_rot = rotary(q_rot, k_rot, cos, sin)
        q = torch.cat([q_nope, q_rot], dim=-1)
        k = torch.cat([k_nope, k_rot.expand(B, N, S, Dr)], dim=-1)
        out = sdpa_attention(q, k, v, mask, self.scaling)
        return self.o_proj(out.transpose(1, 2).reshape(B, S, N * Dv))


class DeepseekV3ForCausalLM(CausalLM):
    """DeepSeek-V3: `forward(input_ids [B, S], labels=None, position_ids=None, return_logits=True, *,
    attention_mask=None) -> CausalLMOutput` (`models.decoder.CausalLM`; aux_loss is always None: HF has no
    load-balancing loss for these families). MLA attention (GQA for GLM-4.x configs), the MoE block with a shared
    expert; dense layers of width `intermediate_size` where `cfg.moe_layers` says so."""

    family = "deepseek_v3"

    def build_attention(self, cfg: ModelConfig, layer_idx: int, *, dtype=None, device=None) -> nn.Module:
        if cfg.attention == "mla":
            return MLAttention(cfg, dtype=dtype, device=device)
        return super().build_attention(cfg, layer_idx, dtype=dtype, device=device)  # GLM-4.x: GQA

    def build_moe(self, cfg: ModelConfig, layer_idx: int, *, moe_backend: str, dtype=None,
                  device=None) -> nn.Module:
        return MoEBlock(cfg.hidden_size, cfg.moe_intermediate_size, cfg.routing, backend=moe_backend,
                        shared_intermediate_size=cfg.shared_intermediate_size, dtype=dtype, device=device)


class Glm4MoeLiteForCausalLM(DeepseekV3ForCausalLM):
    """GLM-4.7-Flash: DeepSeek-V3's code (HF's modeling_glm4_moe_lite is a copy); dense layers from
    `mlp_layer_types`."""

    family = "glm4_moe_lite"
