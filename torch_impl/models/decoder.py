"""The decoder skeleton every family shares: one `DecoderLayer` and one causal-LM shell (`CausalLM`).

Shape legend: B batch · S sequence · T = B·S tokens · H hidden · E experts · V vocab.

`DecoderLayer`: `x + self_attn(input_layernorm(x))`, then `h + mlp(post_attention_layernorm(h))`, for whatever
attention module, MLP / MoE module and norm class the family gives it; returns (hidden, router logits or None).

`CausalLM`: embedding -> rotary tables -> attention mask (`layers.causal_mask`: packed documents, padding) ->
the decoder layers (each through `LayerCheckpointing._run_layer`, so activation checkpointing, on device or
offloaded, of every layer or of the first N, covers every family alike) collecting router logits -> final norm ->
`layers.lm_output` (logits, or the loss without logits with `return_logits=False`; the aux loss). A family
subclasses it and supplies only what differs, through these hooks:

- `family`: the `ModelConfig.family` it builds; `check_config(cfg)`: that, and what else the family refuses;
- `build_attention(cfg, layer_idx, ...)`: its attention module (default: `layers.Attention`, GQA with optional q/k
  norm; gpt-oss's sinks and per-layer sliding window, MLA live in the family's module);
- `build_moe(cfg, layer_idx, ...)`: its `MoEBlock` variant (router, experts, shared experts); `build_mlp` picks it or
  a dense `DenseMLP` per layer from `cfg.moe_layers`;
- `norm_class`: the RMSNorm rounding of its decoder norms and final norm.

What the config already says needs no hook: partial RoPE and MLA's rotary width (`cfg.rotary_dim`), tied embeddings
(`lm_head` is None), and whether HF defines the load-balancing loss (`cfg.has_aux_loss`; then it is computed when
config.json sets `output_router_logits`, HF's default false).

Module paths are the canonical tensor names (`embed_tokens`, `layers.{l}.self_attn.*`, `layers.{l}.mlp.*`,
`layers.{l}.input_layernorm`, `layers.{l}.post_attention_layernorm`, `norm`, `lm_head`): loading is name-for-name.
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


class DecoderLayer(nn.Module):
    """x + self_attn(input_layernorm(x)), then h + mlp(post_attention_layernorm(h)).

    `self_attn(x, cos, sin, mask) -> [B, S, H]` is the family's attention; `mlp` an `MoEBlock` (returning
    `(y, router_logits [T, E])`) where `cfg.moe_layers[layer_idx]`, else a dense MLP; both norms are `norm_class`.
    Router logits are returned only where the family has an aux loss (`cfg.has_aux_loss`), so that no [T, E]
    tensor outlives a DeepSeek-V3 / GLM layer."""

    def __init__(self, cfg: ModelConfig, layer_idx: int, self_attn: nn.Module, mlp: nn.Module, *,
                 norm_class: type[nn.Module] = RMSNorm, dtype=None, device=None) -> None:
        super().__init__()
        kw = dict(dtype=dtype, device=device)
        self.self_attn = self_attn
        self.mlp = mlp
        self.is_moe = bool(cfg.moe_layers[layer_idx])
        self.returns_router_logits = self.is_moe and cfg.has_aux_loss
        self.input_layernorm = norm_class(cfg.hidden_size, cfg.rms_norm_eps, **kw)
        self.post_attention_layernorm = norm_class(cfg.hidden_size, cfg.rms_norm_eps, **kw)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """-> (hidden [B, S, H], router_logits [T, E], or None for a dense layer or a family without aux loss)."""
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask)
        h = self.post_attention_layernorm(x)
        if not self.is_moe:
            return x + self.mlp(h), None
        out, logits = self.mlp(h)
        return x + out, logits if self.returns_router_logits else None


class CausalLM(LayerCheckpointing, nn.Module):
    """The whole model (subclassed per family, see the module docstring for the hooks).
    `forward(input_ids [B, S], labels=None, position_ids=None, return_logits=True, *, attention_mask=None)
    -> CausalLMOutput`.

    Parameters are created uninitialised (`torch_impl.load.load_model` fills them). With tied embeddings `lm_head`
    is None and the logits use `embed_tokens.weight`ᵀ. `output_router_logits` (HF's config field, default False,
    and only for families with an aux loss) decides whether `aux_loss` is computed at all.
    """

    family: str = ""  # the ModelConfig.family this class builds
    norm_class: type[nn.Module] = RMSNorm

    def __init__(self, cfg: ModelConfig, *, moe_backend: str = "auto", dtype: torch.dtype = torch.float32,
                 device: torch.device | str = "cpu") -> None:
        super().__init__()
        self.check_config(cfg)
        kw = dict(dtype=dtype, device=device)
        self.config = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size, **kw)
        self.embed_tokens.weight.requires_grad_(False)
        self.layers = nn.ModuleList(self.decoder_layer(cfg, l, moe_backend=moe_backend, **kw)
                                    for l in range(cfg.num_hidden_layers))
        self.norm = self.norm_class(cfg.hidden_size, cfg.rms_norm_eps, **kw)
        self.lm_head = None if cfg.tie_word_embeddings else Linear(cfg.hidden_size, cfg.vocab_size, **kw)
        self.rotary_emb = RotaryEmbedding(cfg.rotary_dim, cfg.rope_theta, cfg.rope_scaling, device=device)
        self.output_router_logits = cfg.has_aux_loss and bool(cfg.hf_config.get("output_router_logits", False))

    # ---- hooks ---------------------------------------------------------------------------------------------------
    def check_config(self, cfg: ModelConfig) -> None:
        """Raise for a config this class cannot build (another family; families add what they refuse)."""
        if cfg.family != self.family:
            raise ValueError(f"{type(self).__name__} needs a {self.family} config, got {cfg.family}")

    def build_attention(self, cfg: ModelConfig, layer_idx: int, *, dtype=None, device=None) -> nn.Module:
        """Layer `layer_idx`'s attention, called as `(x [B, S, H], cos, sin, mask) -> [B, S, H]`."""
        return Attention(cfg, dtype=dtype, device=device)

    def build_moe(self, cfg: ModelConfig, layer_idx: int, *, moe_backend: str, dtype=None,
                  device=None) -> nn.Module:
        """Layer `layer_idx`'s `MoEBlock` (the family's router and experts)."""
        raise NotImplementedError(f"{type(self).__name__} must define build_moe")

    def build_mlp(self, cfg: ModelConfig, layer_idx: int, *, moe_backend: str, dtype=None,
                  device=None) -> nn.Module:
        """The MoE block where `cfg.moe_layers[layer_idx]`, else a dense SwiGLU MLP of width `intermediate_size`."""
        if cfg.moe_layers[layer_idx]:
            return self.build_moe(cfg, layer_idx, moe_backend=moe_backend, dtype=dtype, device=device)
        return DenseMLP(cfg.hidden_size, cfg.intermediate_size, dtype=dtype, device=device)

    def decoder_layer(self, cfg: ModelConfig, layer_idx: int, *, moe_backend: str, dtype=None,
                      device=None) -> DecoderLayer:
        kw = dict(dtype=dtype, device=device)
        self_attn = self.build_attention(cfg, layer_idx, **kw)
        mlp = self.build_mlp(cfg, layer_idx, moe_backend=moe_backend, **kw)
        return DecoderLayer(cfg, layer_idx, self_attn, mlp, norm_class=self.norm_class, **kw)

    # ---- memory ----------------------------------------------------------------------------------------------------
    def tile_experts(self, tokens: int | None) -> None:
        """Run every MoE layer's routed experts over chunks of `tokens` tokens, recomputed chunk by chunk in the
        backward (`torch_impl.tiled_experts`: their activation memory is one chunk's, for long contexts), or untiled
        again with None. Sequences of at most `tokens` tokens (batch · length) run untiled either way."""
        from torch_impl.moe import Experts

        if tokens is not None and (isinstance(tokens, bool) or not isinstance(tokens, int) or tokens < 1):
            raise ValueError(f"tile_experts takes a positive number of tokens per chunk or None, got {tokens!r}")
        experts = [m for m in self.modules() if isinstance(m, Experts)]
        if tokens is not None and any(type(m).forward is not Experts.forward for m in experts):
            # expert parallelism's experts exchange tokens by all-to-all inside their forward, which the chunks
            # would cut into one exchange per chunk: not built
            raise ValueError("tile_experts: this model's experts are sharded over ranks (expert parallelism), "
                             "which does not tile; use parallel.expert=1 or leave the experts untiled")
        for m in experts:
            m.token_chunk = tokens

    # ---- forward -------------------------------------------------------------------------------------------------
    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None, return_logits: bool = True, *,
                attention_mask: torch.Tensor | None = None) -> CausalLMOutput:
        """input_ids [B, S] -> CausalLMOutput. position_ids [B, S] (restarting at 0 per packed document; 0..S-1 when
        None, even with padding, as HF's forward). attention_mask [B, S] (HF's: 1 = token, 0 = padding) masks the
        attention of every layer, full and sliding (`causal_mask`), and the aux loss's router statistics; the loss
        is masked by labels = -100 only, as HF's, so padded positions need labels -100. `return_logits=False` with
        labels: the loss without the [B, S, V] logits (`lm_output`)."""
        position_ids = prepare_position_ids(input_ids, position_ids, self.config.vocab_size)
        attention_mask = prepare_attention_mask(input_ids, attention_mask)
        x = self.embed_tokens(input_ids)
        cos, sin = self.rotary_emb(x, position_ids)
        # None unless packed or padded (SDPA's causal path); a sliding window is the attention module's (gpt-oss)
        mask = causal_mask(position_ids, attention_mask)
        router_logits = []
        for layer_idx, layer in enumerate(self.layers):  # the index: `checkpoint_layers` counts from the first
            x, logits = self._run_layer(layer_idx, layer, x, cos, sin, mask)
            if logits is not None:
                router_logits.append(logits)
        return lm_output(self.norm(x), self.embed_tokens.weight, self.lm_head, labels, router_logits, self.config,
                         self.output_router_logits, return_logits, attention_mask)
