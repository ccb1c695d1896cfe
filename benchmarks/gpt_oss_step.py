"""One LoRA training step of gpt-oss (random weights, no hub) in torch_impl next to HF transformers v5 + PEFT, in the
same command: step time (median, after warm-up) and peak memory, per context length (issue 8's H200 figures).

A step is forward with labels, backward, and AdamW on the LoRA parameters, batch 1 of S random tokens. LoRA:
rank 64 (alpha 128) on q/k/v/o and both expert tensors, B non-zero, for both implementations. Weights are random
(N(0, 0.02), biases 0.02·N) and built directly on the device in bf16; each implementation runs in its own process,
so peak memory is its own; both use activation checkpointing per decoder layer (the anchors' recipe). HF runs its
default experts (grouped_mm) and `--hf-attn` attention (gpt-oss supports eager, flash and flex, not SDPA); eager
materialises [N, S, S] logits, so it runs out of memory at long S: such rows are recorded as OOM, as the
baseline's 16K was.

    python benchmarks/gpt_oss_step.py --preset 20b --seq 1024,4096,8192,16384 --out benchmarks/results/x.jsonl
    python benchmarks/gpt_oss_step.py --preset tiny --device cpu --seq 64 --iters 1   # smoke test
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.train_step import run  # noqa: E402
from shared_math.tiny import tiny_hf_config  # noqa: E402

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "experts.gate_up_proj", "experts.down_proj")


def hf_config(preset: str, layers: int | None) -> dict:
    """config.json of gpt-oss-20b (hf-moe-formats.md §2) or the tiny preset; `layers` truncates the depth."""
    if preset == "tiny":
        hf = tiny_hf_config("gpt_oss")
    else:
        hf = dict(model_type="gpt_oss", architectures=["GptOssForCausalLM"], vocab_size=201088, hidden_size=2880,
                  intermediate_size=2880, num_hidden_layers=24, num_attention_heads=64, num_key_value_heads=8,
                  head_dim=64, num_local_experts=32, num_experts_per_tok=4, sliding_window=128,
                  rms_norm_eps=1e-5, attention_bias=True, swiglu_limit=7.0, router_aux_loss_coef=0.9,
                  max_position_embeddings=131072, tie_word_embeddings=False, initializer_range=0.02,
                  hidden_act="silu", attention_dropout=0.0, use_cache=False,
                  rope_parameters={"rope_type": "yarn", "rope_theta": 150000.0, "factor": 32.0, "beta_fast": 32.0,
                                   "beta_slow": 1.0, "original_max_position_embeddings": 4096, "truncate": False})
        if preset == "120b":
            hf.update(num_hidden_layers=36, num_local_experts=128)
    if layers:
        hf["num_hidden_layers"] = layers
    n = hf["num_hidden_layers"]
    hf["layer_types"] = ["sliding_attention" if l % 2 == 0 else "full_attention" for l in range(n)]
    return hf


def main(argv: list[str] | None = None) -> int:
    return run(argv, doc=__doc__, hf_config=hf_config, targets=TARGETS,
               presets=("20b", "120b", "tiny"), seq="1024,4096,8192,16384", hf_attn="eager", script=__file__)


if __name__ == "__main__":
    raise SystemExit(main())
