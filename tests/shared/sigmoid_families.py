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


_JAX_RUNNERS: dict = {}


def jax_runner(path, lora: LoraConfig, dtype_name: str = "float32"):
    """(jax_impl model with `lora` attached, its `LoraRunner`), cached per (checkpoint, targets, dtype) for the whole
    test session: the jitted value-and-grad compiles once (~10 s on CPU) and serves every adapter of that structure
    (tests/jax and tests/cross share it). Set adapter values with `set_jax_lora`."""
    import jax.numpy as jnp

    from jax_impl import load_model
    from tests.jax.jax_helpers import LoraRunner

    key = (str(path), lora, dtype_name)
    if key not in _JAX_RUNNERS:
        model = load_model(path, lora=lora, dtype=getattr(jnp, dtype_name))
        _JAX_RUNNERS[key] = (model, LoraRunner(model))
    return _JAX_RUNNERS[key]


def set_jax_lora(model, runner, tensors) -> None:
    """Load canonical LoRA tensors into `model` and hand the runner the new LoRA state (no retrace)."""
    from flax import nnx

    from jax_impl.lora import load_lora_state_dict

    load_lora_state_dict(model, tensors)
    runner.lora_state = nnx.state(model, nnx.LoRAParam)


_CHECKPOINTS: dict = {}


def checkpoint(family: str, **overrides):
    """A tiny checkpoint of `family` (seeded per family), written once per session under a temporary folder."""
    import atexit
    import shutil
    import tempfile
    from pathlib import Path

    from shared_math.tiny import write_tiny_checkpoint

    key = (family, tuple(sorted(overrides.items())))
    if key not in _CHECKPOINTS:
        root = Path(tempfile.mkdtemp(prefix=f"splitmoe-{family}-"))
        atexit.register(shutil.rmtree, root, ignore_errors=True)
        _CHECKPOINTS[key] = write_tiny_checkpoint(family, root, seed=FAMILIES.index(family) + 5, **overrides)
    return _CHECKPOINTS[key]
