"""Qwen3-MoE (Qwen3-30B-A3B, Qwen3-235B-A22B) as HF transformers 5.x computes it, with split LoRA.

Shape legend: B batch · S sequence · T = B·S tokens · H hidden · E experts · K experts per token · V vocab.
Module paths equal the canonical tensor names of docs/CONTRACTS.md (`embed_tokens`, `layers.{l}.self_attn.q_proj`,
`layers.{l}.mlp.router`, `layers.{l}.mlp.experts`, `norm`, `lm_head`), so loading is a name-for-name copy.

Layer l holds an MoE block iff `cfg.moe_layers[l]` (HF: not in mlp_only_layers and (l+1) % decoder_sparse_step
== 0), else a dense SwiGLU MLP. The aux loss follows HF: computed when the config's `output_router_logits` is true
(HF's default is false), and added to the loss as `router_aux_loss_coef · aux` only when labels are given.
"""

from __future__ import annotations

import torch
from torch import nn

from shared_math.config import ModelConfig
from torch_impl.models.layers import (
    Attention,
    CausalLMOutput,
    DenseMLP,
    LayerCheckpointing,
    Linear,
    RMSNorm,
    RotaryEmbedding,
    causal_mask,
    lm_output,
    prepare_attention_mask,
    prepare_position_ids,
)
from torch_impl.moe import MoEBlock


class Qwen3MoeDecoderLayer(nn.Module):
    """x + attn(norm(x)), then h + mlp(norm(h)); `mlp` is an MoEBlock or a DenseMLP."""

    def __init__(self, cfg: ModelConfig, layer_idx: int, *, moe_backend: str = "auto", dtype=None,
                 device=None) -> None:
        super().__init__()
        kw = dict(dtype=dtype, device=device)
        self.self_attn = Attention(cfg, **kw)
        self.is_moe = cfg.moe_layers[layer_idx]
        if self.is_moe:
            self.mlp = MoEBlock(cfg.hidden_size, cfg.moe_intermediate_size, cfg.routing, backend=moe_backend, **kw)
        else:
            self.mlp = DenseMLP(cfg.hidden_size, cfg.intermediate_size, **kw)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, **kw)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, **kw)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """-> (hidden [B, S, H], router_logits [T, E] or None for a dense layer)."""
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask)
        h = self.post_attention_layernorm(x)
        if self.is_moe:
            out, logits = self.mlp(h)
            return x + out, logits
        return x + self.mlp(h), None


class Qwen3MoeForCausalLM(LayerCheckpointing, nn.Module):
    """The whole model.
    `forward(input_ids [B, S], labels=None, position_ids=None, return_logits=True, *, attention_mask=None)
    -> CausalLMOutput`.

    Parameters are created uninitialised (`torch_impl.load.load_model` fills them). With tied embeddings
    `lm_head` is None and the logits use `embed_tokens.weight`ᵀ.
    """

    def __init__(self, cfg: ModelConfig, *, moe_backend: str = "auto", dtype: torch.dtype = torch.float32,
                 device: torch.device | str = "cpu") -> None:
        super().__init__()
        if cfg.family != "qwen3_moe":
            raise ValueError(f"Qwen3MoeForCausalLM needs a qwen3_moe config, got {cfg.family}")
        if cfg.sliding_window is not None:
            raise NotImplementedError("Qwen3-MoE with use_sliding_window=true is not supported yet")
        kw = dict(dtype=dtype, device=device)
        self.config = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size, **kw)
        self.embed_tokens.weight.requires_grad_(False)
        self.layers = nn.ModuleList(Qwen3MoeDecoderLayer(cfg, l, moe_backend=moe_backend, **kw)
                                    for l in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, **kw)
        self.lm_head = None if cfg.tie_word_embeddings else Linear(cfg.hidden_size, cfg.vocab_size, **kw)
        self.rotary_emb = RotaryEmbedding(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling, device=device)
        # HF's Qwen3MoeConfig.output_router_logits (default False) decides whether aux_loss exists at all
        self.output_router_logits = bool(cfg.hf_config.get("output_router_logits", False))

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None, return_logits: bool = True, *,
                attention_mask: torch.Tensor | None = None) -> CausalLMOutput:
        """input_ids [B, S] -> CausalLMOutput. position_ids [B, S] (restarting at 0 per packed document; 0..S-1 when
        None, even with padding, as HF's forward). attention_mask [B, S] (HF's: 1 = token, 0 = padding) masks the
        attention (`causal_mask`) and the aux loss's router statistics; the loss is masked by labels = -100 only,
        as HF's, so padded positions need labels -100."""
        position_ids = prepare_position_ids(input_ids, position_ids, self.config.vocab_size)
        attention_mask = prepare_attention_mask(input_ids, attention_mask)
        x = self.embed_tokens(input_ids)
        cos, sin = self.rotary_emb(x, position_ids)
        mask = causal_mask(position_ids, attention_mask)
        router_logits = []
        for layer in self.layers:
            x, logits = self._run_layer(layer, x, cos, sin, mask)
            if logits is not None:
                router_logits.append(logits)
        return lm_output(self.norm(x), self.embed_tokens.weight, self.lm_head, labels, router_logits, self.config,
                         self.output_router_logits, return_logits, attention_mask)
