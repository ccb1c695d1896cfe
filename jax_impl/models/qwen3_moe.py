"""Qwen3-MoE causal LM in Flax NNX with split LoRA, mirroring HF transformers v5's `Qwen3MoeForCausalLM`.

Module paths equal the canonical tensor names (docs/CONTRACTS.md): `embed_tokens`, `layers[l].{input_layernorm,
self_attn, post_attention_layernorm, mlp}`, `norm`, `lm_head`; an MoE layer's `mlp` is a `MoEBlock` (`router`,
`experts`), a dense layer's (`mlp_only_layers`) a `DenseMLP`.

Forward: h = embed(ids); per layer h += attn(norm(h)); h += mlp(norm(h)); logits = lm_head(norm(h)).
Loss: mean next-token cross-entropy in fp32 over labels != -100 (HF's ForCausalLMLoss). As in HF, `aux_loss` exists
only when config.json sets `output_router_logits`, and then `router_aux_loss_coef · aux_loss` joins the loss.
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
    causal_mask,
    lm_output,
    prepare_attention_mask,
    prepare_position_ids,
)
from jax_impl.moe import Experts, MoEBlock, Router
from shared_math.config import ModelConfig


def _arr(t: np.ndarray, dtype) -> jax.Array:
    return jnp.asarray(np.asarray(t), dtype=dtype)


def _linear(layer: Mapping[str, np.ndarray], name: str, dtype) -> LoRALinear:
    bias = layer.get(name + ".bias")
    return LoRALinear(_arr(layer[name + ".weight"], dtype), None if bias is None else _arr(bias, dtype))


class Qwen3MoeDecoderLayer(nnx.Module):
    """Pre-norm decoder layer: attention then MoE (or dense) MLP, each with a residual connection."""

    def __init__(self, cfg: ModelConfig, layer: Mapping[str, np.ndarray], l: int, *, dtype, moe_backend: str):
        eps = cfg.rms_norm_eps
        self.input_layernorm = RMSNorm(_arr(layer["input_layernorm.weight"], dtype), eps)
        self.post_attention_layernorm = RMSNorm(_arr(layer["post_attention_layernorm.weight"], dtype), eps)
        self.self_attn = Attention(
            cfg, *(_linear(layer, f"self_attn.{p}", dtype) for p in ("q_proj", "k_proj", "v_proj", "o_proj")),
            q_norm=RMSNorm(_arr(layer["self_attn.q_norm.weight"], dtype), eps),
            k_norm=RMSNorm(_arr(layer["self_attn.k_norm.weight"], dtype), eps))
        self.is_moe = bool(cfg.moe_layers[l])
        if self.is_moe:
            experts = Experts(_arr(layer["mlp.experts.gate_up_proj"], dtype),
                              _arr(layer["mlp.experts.down_proj"], dtype), activation=cfg.activation,
                              backend=moe_backend)
            self.mlp = MoEBlock(Router(_arr(layer["mlp.router.weight"], dtype)), experts, cfg.routing)
        else:
            self.mlp = DenseMLP(*(_linear(layer, f"mlp.{p}", dtype) for p in ("gate_proj", "up_proj", "down_proj")))

    def __call__(self, h_BSH, cos, sin, mask_BSS) -> tuple[jax.Array, jax.Array | None]:
        h_BSH = h_BSH + self.self_attn(self.input_layernorm(h_BSH), cos, sin, mask_BSS)
        x_BSH = self.post_attention_layernorm(h_BSH)
        if not self.is_moe:
            return h_BSH + self.mlp(x_BSH), None
        B, S, H = x_BSH.shape
        y_TH, router_logits_TE = self.mlp(x_BSH.reshape(B * S, H))
        return h_BSH + y_TH.reshape(B, S, H), router_logits_TE


class Qwen3MoeForCausalLM(LayerCheckpointing, nnx.Module):
    """Qwen3-MoE with split LoRA; build with `jax_impl.load_model` (or from canonical tensors directly)."""

    def __init__(self, cfg: ModelConfig, tensors: Mapping[str, np.ndarray], *, dtype=jnp.float32,
                 moe_backend: str = "auto"):
        if cfg.family != "qwen3_moe":
            raise ValueError(f"Qwen3MoeForCausalLM needs a qwen3_moe config, got {cfg.family}")
        self.config = cfg
        self.lora_config = None
        self.dtype = jnp.dtype(dtype)
        self.embed_tokens = Frozen(_arr(tensors["embed_tokens.weight"], dtype))
        self.rotary_emb = RotaryEmbedding(cfg)
        # one layer's tensors at a time (CheckpointTensors.layer reads lazily), so host memory holds one layer
        layer_of = tensors.layer if hasattr(tensors, "layer") else (
            lambda l: {k[len(f"layers.{l}."):]: v for k, v in tensors.items() if k.startswith(f"layers.{l}.")})
        self.layers = nnx.List([Qwen3MoeDecoderLayer(cfg, layer_of(l), l, dtype=dtype, moe_backend=moe_backend)
                                for l in range(cfg.num_hidden_layers)])
        self.norm = RMSNorm(_arr(tensors["norm.weight"], dtype), cfg.rms_norm_eps)
        # tied embeddings: no lm_head module, the logits use embed_tokens.T (as torch_impl)
        self.lm_head = None if cfg.tie_word_embeddings else LoRALinear(_arr(tensors["lm_head.weight"], dtype))
        # HF's output_router_logits (default False) decides whether aux_loss exists at all
        self.output_router_logits = bool(cfg.hf_config.get("output_router_logits", False))

    def __call__(self, input_ids: jax.Array, labels: jax.Array | None = None,
                 position_ids: jax.Array | None = None, *, attention_mask: jax.Array | None = None
                 ) -> CausalLMOutput:
        """input_ids [B, S] -> CausalLMOutput; position_ids [B, S] (restarting at 0 per packed sequence) or None
        (0..S-1, even with padding, as HF's forward). attention_mask [B, S] (HF's: 1 = token, 0 = padding) masks
        the attention (`causal_mask`) and the aux loss's router statistics; the loss is masked by labels = -100
        only, as HF's, so padded positions need labels -100."""
        position_ids = prepare_position_ids(input_ids, position_ids, self.config.vocab_size)
        attention_mask = prepare_attention_mask(input_ids, attention_mask)
        h_BSH = jnp.take(self.embed_tokens[...], input_ids, axis=0)
        cos, sin = self.rotary_emb(position_ids, self.dtype)
        mask_BSS = causal_mask(position_ids, attention_mask)
        router_logits = []
        for layer in self.layers:
            h_BSH, logits_TE = self._run_layer(layer, h_BSH, cos, sin, mask_BSS)
            if logits_TE is not None:
                router_logits.append(logits_TE)
        return lm_output(self.norm(h_BSH), self.embed_tokens[...], self.lm_head, labels, router_logits, self.config,
                         self.output_router_logits, attention_mask)
