"""`load_model`: a HF checkpoint folder -> a jax_impl Flax NNX model, optionally with fresh split-LoRA adapters.

Reads through `shared_math.checkpoint.read_checkpoint` (canonical names and layouts, lazily, one layer at a time),
casts to `dtype`, builds the family's model, and attaches LoRA (`nnx.LoRAParam`, fp32) when `lora` is given.
"""

from __future__ import annotations

from pathlib import Path

import jax.numpy as jnp
from flax import nnx

from jax_impl.backends import resolve_backend
from jax_impl.lora import attach_lora
from shared_math.checkpoint import read_checkpoint
from shared_math.config import LoraConfig


def _model_class(family: str):
    if family == "qwen3_moe":
        from jax_impl.models.qwen3_moe import Qwen3MoeForCausalLM

        return Qwen3MoeForCausalLM
    if family in ("deepseek_v3", "glm4_moe_lite"):
        from jax_impl.models.deepseek_v3 import DeepseekV3ForCausalLM, Glm4MoeLiteForCausalLM

        return DeepseekV3ForCausalLM if family == "deepseek_v3" else Glm4MoeLiteForCausalLM
    if family == "glm4_moe":
        from jax_impl.models.glm4_moe import Glm4MoeForCausalLM

        return Glm4MoeForCausalLM
    if family == "gpt_oss":
        from jax_impl.models.gpt_oss import GptOssForCausalLM

        return GptOssForCausalLM
    raise NotImplementedError(f"jax_impl has no {family} model; supported: qwen3_moe, deepseek_v3, glm4_moe, "
                              "glm4_moe_lite, gpt_oss")


def load_model(path: str | Path, *, lora: LoraConfig | None = None, dtype=jnp.float32,
               moe_backend: str = "auto", lora_seed: int | None = None) -> nnx.Module:
    """Load the checkpoint at `path` as a jax_impl model in `dtype`; with `lora`, attach fresh adapters (B = 0).

    The MoE backend is resolved (and refused with a reason if it cannot run here) before any tensor is read.
    Raises shared_math.checkpoint.CheckpointError, from `read_checkpoint` (shared with torch_impl) before anything
    is built, for a damaged checkpoint, for one with layers past config.json's num_hidden_layers other than
    DeepSeek-V3 / GLM MTP layers, and for a config.json that asks for math not implemented (its cause a
    ModelConfigError naming the field: `shared_math.config.MATH_FIELDS`).
    """
    backend = resolve_backend(moe_backend, dtype=dtype)
    cfg, tensors = read_checkpoint(path)
    model_class = _model_class(cfg.family)
    if lora is not None:
        lora.validate_for(cfg)
    model = model_class(cfg, tensors, dtype=dtype, moe_backend=backend)
    if lora is not None:
        attach_lora(model, lora, seed=lora_seed)
    return model
