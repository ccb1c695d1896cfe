"""GLM-4.5 / 4.6 / 4.7 (`glm4_moe`) in Flax NNX with split LoRA, mirroring HF transformers v5.

HF's Glm4Moe is DeepSeek-V3's MoE (sigmoid group-limited routing with an fp32 router and `e_score_correction_bias`,
a shared expert, dense first `first_k_dense_replace` layers) on GQA attention: q/k/v biases when `attention_bias`
(o_proj never has one), per-head q/k RMSNorm when `use_qk_norm`, and NeoX RoPE over the first
`head_dim · partial_rotary_factor` dims (`cfg.rotary_dim`). So the model is `DeepseekV3ForCausalLM`, whose
`build_attention` hook gives GQA configs the decoder's default `layers.Attention`.
"""

from __future__ import annotations

from jax_impl.models.deepseek_v3 import DeepseekV3ForCausalLM


class Glm4MoeForCausalLM(DeepseekV3ForCausalLM):
    """GLM-4.x MoE: `__call__(input_ids, labels=None, position_ids=None, return_logits=True, *, attention_mask=None)
    -> CausalLMOutput` (no aux loss)."""

    family = "glm4_moe"
