"""config.json dicts of the full-size models of every family, by preset name, for benchmarks and memory plans.

No weights: these are the shapes (hf-moe-formats.md gives the sources; the values it marks unverified are marked
so here too). `preset_hf_config(family, preset, layers=None)` returns a dict that `ModelConfig.from_hf` and
transformers' `AutoConfig.for_model` both accept; `layers` truncates the depth (per-layer lists follow), and the
preset `tiny` is `shared_math.tiny.tiny_hf_config(family)`, which runs on a CPU.
"""

from __future__ import annotations

import copy
from typing import Any

from shared_math.tiny import tiny_hf_config

_COMMON: dict[str, Any] = dict(initializer_range=0.02, hidden_act="silu", attention_dropout=0.0, use_cache=False,
                               tie_word_embeddings=False)

_QWEN3_30B: dict[str, Any] = dict(
    model_type="qwen3_moe", architectures=["Qwen3MoeForCausalLM"], vocab_size=151936, hidden_size=2048,
    intermediate_size=6144, moe_intermediate_size=768, num_hidden_layers=48, num_attention_heads=32,
    num_key_value_heads=4, head_dim=128, num_experts=128, num_experts_per_tok=8, norm_topk_prob=True,
    decoder_sparse_step=1, mlp_only_layers=[], router_aux_loss_coef=0.001, rms_norm_eps=1e-6, attention_bias=False,
    use_sliding_window=False, sliding_window=None, max_position_embeddings=40960,
    rope_parameters={"rope_type": "default", "rope_theta": 1000000.0})

_GPT_OSS_20B: dict[str, Any] = dict(
    model_type="gpt_oss", architectures=["GptOssForCausalLM"], vocab_size=201088, hidden_size=2880,
    intermediate_size=2880, num_hidden_layers=24, num_attention_heads=64, num_key_value_heads=8, head_dim=64,
    num_local_experts=32, num_experts_per_tok=4, sliding_window=128, rms_norm_eps=1e-5, attention_bias=True,
    swiglu_limit=7.0, router_aux_loss_coef=0.9, max_position_embeddings=131072,
    rope_parameters={"rope_type": "yarn", "rope_theta": 150000.0, "factor": 32.0, "beta_fast": 32.0,
                     "beta_slow": 1.0, "original_max_position_embeddings": 4096, "truncate": False})

_DEEPSEEK_V3: dict[str, Any] = dict(
    model_type="deepseek_v3", architectures=["DeepseekV3ForCausalLM"], vocab_size=129280, hidden_size=7168,
    intermediate_size=18432, moe_intermediate_size=2048, num_hidden_layers=61, num_attention_heads=128,
    num_key_value_heads=128, q_lora_rank=1536, kv_lora_rank=512, qk_nope_head_dim=128, qk_rope_head_dim=64,
    v_head_dim=128, rope_interleave=True, attention_bias=False, n_routed_experts=256, n_shared_experts=1,
    num_experts_per_tok=8, n_group=8, topk_group=4, first_k_dense_replace=3, routed_scaling_factor=2.5,
    norm_topk_prob=True, rms_norm_eps=1e-6, max_position_embeddings=163840,
    rope_parameters={"rope_type": "yarn", "rope_theta": 10000.0, "factor": 40.0, "mscale": 1.0,
                     "mscale_all_dim": 1.0, "original_max_position_embeddings": 4096, "beta_fast": 32.0,
                     "beta_slow": 1.0})

# GLM-4.5 (about 355B) and -Air: hf-moe-formats.md §4 marks these values as from memory, unverified.
_GLM45: dict[str, Any] = dict(
    model_type="glm4_moe", architectures=["Glm4MoeForCausalLM"], vocab_size=151552, hidden_size=5120,
    intermediate_size=12288, moe_intermediate_size=1536, num_hidden_layers=92, num_attention_heads=96,
    num_key_value_heads=8, head_dim=128, n_routed_experts=160, n_shared_experts=1, num_experts_per_tok=8,
    n_group=1, topk_group=1, first_k_dense_replace=3, use_qk_norm=True, attention_bias=True,
    routed_scaling_factor=2.5, norm_topk_prob=True, rms_norm_eps=1e-5, max_position_embeddings=131072,
    rope_parameters={"rope_type": "default", "rope_theta": 1000000.0, "partial_rotary_factor": 0.5})

_GLM_FLASH: dict[str, Any] = dict(
    model_type="glm4_moe_lite", architectures=["Glm4MoeLiteForCausalLM"], vocab_size=154880, hidden_size=2048,
    num_hidden_layers=47, num_attention_heads=20, num_key_value_heads=20, q_lora_rank=768, kv_lora_rank=512,
    qk_nope_head_dim=192, qk_rope_head_dim=64, v_head_dim=256, n_routed_experts=64, n_shared_experts=1,
    num_experts_per_tok=4, moe_intermediate_size=1536, intermediate_size=10240, routed_scaling_factor=1.8,
    n_group=1, topk_group=1, norm_topk_prob=True, rope_interleave=True, attention_bias=False, rms_norm_eps=1e-5,
    max_position_embeddings=202752, rope_parameters={"rope_type": "default", "rope_theta": 1000000.0})

PRESETS: dict[str, dict[str, dict[str, Any]]] = {
    "qwen3_moe": {
        "30b-a3b": _QWEN3_30B,
        # hf-moe-formats.md §1: H 4096, 94 layers, 64/4 heads, I 1536 (unverified)
        "235b-a22b": {**_QWEN3_30B, "hidden_size": 4096, "num_hidden_layers": 94, "num_attention_heads": 64,
                      "moe_intermediate_size": 1536, "intermediate_size": 12288},
    },
    "gpt_oss": {"20b": _GPT_OSS_20B, "120b": {**_GPT_OSS_20B, "num_hidden_layers": 36, "num_local_experts": 128}},
    "deepseek_v3": {"v3": _DEEPSEEK_V3},
    "glm4_moe": {
        "4.5": _GLM45,
        "4.5-air": {**_GLM45, "hidden_size": 4096, "num_hidden_layers": 46, "n_routed_experts": 128,
                    "moe_intermediate_size": 1408, "intermediate_size": 10944, "first_k_dense_replace": 1,
                    "routed_scaling_factor": 1.0, "use_qk_norm": False},
    },
    "glm4_moe_lite": {"flash": _GLM_FLASH},
}


def preset_names(family: str) -> list[str]:
    """The presets of `family`, the full-size ones first, then `tiny`."""
    if family not in PRESETS:
        raise ValueError(f"unknown family {family!r}; choose one of {', '.join(PRESETS)}")
    return [*PRESETS[family], "tiny"]


def preset_hf_config(family: str, preset: str, layers: int | None = None) -> dict[str, Any]:
    """config.json of `family`'s `preset` (or `tiny`), with the depth truncated to `layers` when given."""
    names = preset_names(family)
    if preset not in names:
        raise ValueError(f"unknown preset {preset!r} for {family}; choose one of {', '.join(names)}")
    if layers is not None and layers < 1:
        raise ValueError(f"layers must be >= 1, got {layers}")
    if preset == "tiny":
        return tiny_hf_config(family, **({"num_hidden_layers": layers} if layers else {}))
    hf = {**copy.deepcopy(_COMMON), **copy.deepcopy(PRESETS[family][preset])}
    if layers:
        hf["num_hidden_layers"] = layers
    n = hf["num_hidden_layers"]
    if family == "gpt_oss":  # sliding and full attention alternate, sliding first (the hub's layer_types)
        hf["layer_types"] = ["sliding_attention" if l % 2 == 0 else "full_attention" for l in range(n)]
    if family == "glm4_moe_lite":  # dense first layer, as the hub's mlp_layer_types
        hf["mlp_layer_types"] = ["dense"] + ["sparse"] * (n - 1)
    return hf
