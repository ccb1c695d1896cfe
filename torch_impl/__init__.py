"""PyTorch implementation of splitmoe: MoE models with split LoRA (`x·W + s·(x·A)·B` on routed rows only)."""

from torch_impl.moe import split_lora_experts


def load_model(*args, **kwargs):
    """`torch_impl.load.load_model` (imported lazily: it pulls in the checkpoint reader)."""
    from torch_impl.load import load_model as _load_model

    return _load_model(*args, **kwargs)


__all__ = ["load_model", "split_lora_experts"]
