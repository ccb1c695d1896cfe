"""jax_impl: split-LoRA MoE fine-tuning in JAX + Flax NNX (ragged_dot now, Pallas kernels later)."""

from jax_impl.load import load_model

__all__ = ["load_model"]
