"""Qwen3-MoE causal LM in Flax NNX with split LoRA, mirroring HF transformers v5's `Qwen3MoeForCausalLM` and
torch_impl/models/qwen3_moe.py.

Module paths equal the canonical tensor names (docs/CONTRACTS.md): `embed_tokens`, `layers[l].{input_layernorm,
self_attn, post_attention_layernorm, mlp}`, `norm`, `lm_head`; an MoE layer's `mlp` is a `MoEBlock` (`router`,
`experts`), a dense layer's (`mlp_only_layers`) a `DenseMLP`.

The decoder is `models.decoder`'s, with its defaults (GQA attention with q/k RMSNorm, Llama-rounding RMSNorm); this
file supplies the MoE block (softmax top-K routing, SwiGLU experts).
Forward: h = embed(ids); per layer h += attn(norm(h)); h += mlp(norm(h)); logits = lm_head(norm(h)).
Loss: mean next-token cross-entropy in fp32 over labels != -100 (HF's ForCausalLMLoss). As in HF, `aux_loss` exists
only when config.json sets `output_router_logits`, and then `router_aux_loss_coef · aux_loss` joins the loss.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
from flax import nnx

from jax_impl.models.decoder import CausalLM, load_array
from jax_impl.moe import Experts, MoEBlock, Router
from shared_math.config import ModelConfig


class Qwen3MoeForCausalLM(CausalLM):
    """Qwen3-MoE: `__call__(input_ids, labels=None, position_ids=None, return_logits=True, *, attention_mask=None)
    -> CausalLMOutput` (`models.decoder.CausalLM`)."""

    family = "qwen3_moe"

    def build_moe(self, cfg: ModelConfig, layer: Mapping[str, np.ndarray], layer_idx: int, *, moe_backend: str,
                  dtype) -> nnx.Module:
        experts = Experts(load_array(layer["mlp.experts.gate_up_proj"], dtype),
                          load_array(layer["mlp.experts.down_proj"], dtype), activation=cfg.activation,
                          backend=moe_backend)
        return MoEBlock(Router(load_array(layer["mlp.router.weight"], dtype)), experts, cfg.routing)
