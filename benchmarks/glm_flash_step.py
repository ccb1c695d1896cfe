"""One LoRA training step of a GLM-4.7-Flash-sized model (`glm4_moe_lite`, ~30B, random weights, no hub) in torch_impl
next to HF transformers v5 + PEFT in the same command: step time (median after warm-up) and peak memory per context
length (issue 9's H200 figures).

A step is forward with labels, backward, and AdamW on the LoRA parameters, batch 1 of S random tokens. LoRA: rank 64
(alpha 128) on the MLA projections (q_a, q_b, kv_a_proj_with_mqa, kv_b, o) and both expert tensors, B non-zero, for
both implementations (PEFT cannot put LoRA on the dense/shared-expert Linears of this v5 model, so neither does ours
here). Weights are N(0, 0.02) built on the device in bf16, `e_score_correction_bias` N(0, 0.02) so routing is
group-limited as in training; each implementation runs in its own process, so peak memory is its own. HF runs
its default experts (grouped_mm) and `--hf-attn` attention (sdpa by default, as torch_impl uses SDPA).

    python benchmarks/glm_flash_step.py --seq 1024,2048,4096 --out benchmarks/results/glm_flash_step.jsonl
    python benchmarks/glm_flash_step.py --preset tiny --device cpu --seq 32 --iters 1 --warmup 0   # smoke test
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.train_step import run  # noqa: E402
from shared_math.config import EXPERT_TARGETS  # noqa: E402
from shared_math.tiny import tiny_hf_config  # noqa: E402

TARGETS = ("q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj") + EXPERT_TARGETS


def hf_config(preset: str, layers: int | None) -> dict:
    """config.json of GLM-4.7-Flash (hf-moe-formats.md §5) or the tiny preset; `layers` truncates the depth."""
    if preset == "tiny":
        hf = tiny_hf_config("glm4_moe_lite")
    else:
        hf = dict(model_type="glm4_moe_lite", architectures=["Glm4MoeLiteForCausalLM"], vocab_size=154880,
                  hidden_size=2048, num_hidden_layers=47, num_attention_heads=20, num_key_value_heads=20,
                  q_lora_rank=768, kv_lora_rank=512, qk_nope_head_dim=192, qk_rope_head_dim=64, v_head_dim=256,
                  n_routed_experts=64, n_shared_experts=1, num_experts_per_tok=4, moe_intermediate_size=1536,
                  intermediate_size=10240, routed_scaling_factor=1.8, n_group=1, topk_group=1, norm_topk_prob=True,
                  rope_interleave=True, attention_bias=False, rms_norm_eps=1e-5, max_position_embeddings=202752,
                  tie_word_embeddings=False, initializer_range=0.02, hidden_act="silu", attention_dropout=0.0,
                  use_cache=False, rope_parameters={"rope_type": "default", "rope_theta": 1000000.0})
    if layers:
        hf["num_hidden_layers"] = layers
    hf["mlp_layer_types"] = ["dense"] + ["sparse"] * (hf["num_hidden_layers"] - 1)
    return hf


def main(argv: list[str] | None = None) -> int:
    return run(argv, doc=__doc__, hf_config=hf_config, targets=TARGETS,
               presets=("flash", "tiny"), seq="1024,2048,4096", hf_attn="sdpa", script=__file__)


if __name__ == "__main__":
    raise SystemExit(main())
