"""Set-up shared by the DeepSeek-V3 / GLM-4.x / GLM-4.7-Flash parity tests (torch, jax, cross).

The tiny presets (`shared_math.tiny`) carry a randomised `e_score_correction_bias`, so group-limited selection
differs from plain top-K of the scores. `ATTN_EXPERTS` is what PEFT can adapt on these v5 models (attention and
expert tensors; its v4-adapter conversion rewrites gate/up/down_proj targets on MoE models, see
tests/shared/test_adapter.py); `ALL_TARGETS` adds the dense-layer and shared-expert Linears.
"""

from __future__ import annotations

import numpy as np

from shared_math.config import DENSE_MLP_TARGETS, EXPERT_TARGETS, LoraConfig, ModelConfig, available_targets

FAMILIES = ("deepseek_v3", "glm4_moe", "glm4_moe_lite")
# K = E (every expert on every token): bf16 rounding then cannot flip a near-tie in the discrete top-K choice
K_EQ_E = {"deepseek_v3": dict(num_experts_per_tok=8, topk_group=4), "glm4_moe": dict(num_experts_per_tok=8),
          "glm4_moe_lite": dict(num_experts_per_tok=8)}
B, S = 2, 12


def attn_expert_lora(cfg: ModelConfig) -> LoraConfig:
    targets = tuple(t for t in available_targets(cfg) if t not in DENSE_MLP_TARGETS)
    assert set(EXPERT_TARGETS) <= set(targets)
    return LoraConfig(rank=4, alpha=8.0, targets=targets)


def all_lora(cfg: ModelConfig) -> LoraConfig:
    return LoraConfig(rank=4, alpha=8.0, targets=available_targets(cfg))


def make_batch(seed: int, packed: bool = False, vocab: int = 128):
    """input_ids, labels (first two -100) and position_ids (two packed documents per row, or None)."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, vocab, (B, S))
    labels = ids.copy()
    labels[:, :2] = -100
    pos = None
    if packed:
        pos = np.tile(np.concatenate([np.arange(5), np.arange(S - 5)]), (B, 1))
        labels[:, 5] = -100
    return ids, labels, pos
