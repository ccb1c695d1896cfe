"""Qwen3-MoE (Qwen3-30B-A3B, Qwen3-235B-A22B) as HF transformers 5.x computes it, with split LoRA.

Shape legend: B batch · S sequence · T = B·S tokens · H hidden · E experts · K experts per token · V vocab.
Module paths equal the canonical tensor names of docs/CONTRACTS.md (`embed_tokens`, `layers.{l}.self_attn.q_proj`,
`layers.{l}.mlp.router`, `layers.{l}.mlp.experts`, `norm`, `lm_head`), so loading is a name-for-name copy.

The decoder is `models.decoder`'s, with its defaults: GQA attention with per-head q/k RMSNorm (`layers.Attention`),
Llama-rounding RMSNorm. This file supplies the MoE block (softmax top-K routing, SwiGLU experts) and the config
check. Layer l holds an MoE block iff `cfg.moe_layers[l]` (HF: not in mlp_only_layers and
(l+1) % decoder_sparse_step == 0), else a dense SwiGLU MLP. The aux loss follows HF: computed when the config's
`output_router_logits` is true (HF's default is false), and added to the loss as `router_aux_loss_coef · aux` only
when labels are given.
"""

from __future__ import annotations

from torch import nn

from shared_math.config import ModelConfig
from torch_impl.models.decoder import CausalLM
from torch_impl.moe import MoEBlock


class Qwen3MoeForCausalLM(CausalLM):
    """Qwen3-MoE: `forward(input_ids [B, S], labels=None, position_ids=None, return_logits=True, *,
    attention_mask=None) -> CausalLMOutput` (`models.decoder.CausalLM`)."""

    family = "qwen3_moe"

    def check_config(self, cfg: ModelConfig) -> None:
        super().check_config(cfg)
        if cfg.sliding_window is not None:
            raise NotImplementedError("Qwen3-MoE with use_sliding_window=true is not supported yet")

    def build_moe(self, cfg: ModelConfig, layer_idx: int, *, moe_backend: str, dtype=None,
                  device=None) -> nn.Module:
        return MoEBlock(cfg.hidden_size, cfg.moe_intermediate_size, cfg.routing, backend=moe_backend, dtype=dtype,
                        device=device)
