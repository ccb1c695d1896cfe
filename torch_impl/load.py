"""`load_model`: a HF checkpoint folder -> a torch_impl model with its weights, optionally with fresh split LoRA.

Reads through `shared_math.checkpoint.read_checkpoint` (canonical names and layouts, validated shapes, lazy per
tensor), builds the family's model with uninitialised parameters on the target device, then copies the weights in
one layer at a time, cast to `dtype`, so peak host memory is about one layer.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn

from shared_math.checkpoint import read_checkpoint
from shared_math.config import LoraConfig, ModelConfig
from shared_math.progress import with_load_progress
from torch_impl.backends import resolve_backend
from torch_impl.lora import attach_lora
from torch_impl.models.deepseek_v3 import DeepseekV3ForCausalLM, Glm4MoeLiteForCausalLM
from torch_impl.models.glm4_moe import Glm4MoeForCausalLM
from torch_impl.models.gpt_oss import GptOssForCausalLM
from torch_impl.models.qwen3_moe import Qwen3MoeForCausalLM

_FAMILIES = {"qwen3_moe": Qwen3MoeForCausalLM, "deepseek_v3": DeepseekV3ForCausalLM,
             "glm4_moe": Glm4MoeForCausalLM, "glm4_moe_lite": Glm4MoeLiteForCausalLM, "gpt_oss": GptOssForCausalLM}


def build_model(cfg: ModelConfig, *, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu",
                moe_backend: str = "auto") -> nn.Module:
    """The family's model with uninitialised parameters; raises for a family torch_impl does not implement yet."""
    if cfg.family not in _FAMILIES:
        raise NotImplementedError(
            f"torch_impl does not implement model_type {cfg.family!r}; supported: {', '.join(_FAMILIES)}")
    return _FAMILIES[cfg.family](cfg, moe_backend=moe_backend, dtype=dtype, device=device)


def model_dtype(dtype: torch.dtype | str) -> torch.dtype:
    """`dtype` (a torch dtype or its name, as jax_impl takes) as the floating dtype the weights are cast to;
    ValueError otherwise (a string or an integer dtype failed deep in the build with a message naming neither)."""
    dt = getattr(torch, dtype, None) if isinstance(dtype, str) else dtype
    if not isinstance(dt, torch.dtype) or not dt.is_floating_point:
        raise ValueError(f"dtype must be a floating-point dtype such as torch.bfloat16 or 'float32', got {dtype!r}")
    return dt


def load_model(path: str | Path, *, lora: LoraConfig | None = None, dtype: torch.dtype = torch.float32,
               device: torch.device | str = "cpu", moe_backend: str = "auto", lora_seed: int | None = None
               ) -> nn.Module:
    """Load the checkpoint folder `path` as a torch_impl model in `dtype` on `device`, in eval mode.

    `lora`: attach fresh split-LoRA adapters for these targets (raises for a target the model lacks).
    `moe_backend`: "auto", "native" or "grouped_mm"; checked here, before any weight is read.
    Raises shared_math.checkpoint.CheckpointError for a damaged checkpoint, for one with layers past config.json's
    num_hidden_layers other than DeepSeek-V3 / GLM MTP layers, and for a config.json that asks for math not
    implemented (its cause a ModelConfigError naming the field: `shared_math.config.MATH_FIELDS`); all of it from
    `read_checkpoint`, shared with jax_impl, before anything is built. NotImplementedError for a family that
    torch_impl does not implement yet.
    """
    dtype = model_dtype(dtype)
    cfg, tensors = read_checkpoint(path)
    if cfg.family not in _FAMILIES:
        build_model(cfg)  # raises the clear error
    if lora is not None:
        lora.validate_for(cfg)
    resolve_backend(moe_backend, device=device, dtype=dtype)  # fail before reading weights
    model = build_model(cfg, dtype=dtype, device=device, moe_backend=moe_backend)
    params = dict(model.named_parameters())  # module paths are the canonical names
    expected = set(params)
    loaded: set[str] = set()
    tensors = with_load_progress(tensors, f"loading {Path(path).name}")  # a bar per tensor read (on a terminal)
    with torch.no_grad():
        names = [n for n in tensors if not n.startswith("layers.")]
        groups = [("", lambda: {n: tensors[n] for n in names})] + [
            (f"layers.{l}.", lambda l=l: tensors.layer(l)) for l in range(cfg.num_hidden_layers)]
        for prefix, read in groups:  # one layer in host memory at a time
            for sub, arr in read().items():
                name = prefix + sub
                if name not in params:
                    raise ValueError(f"checkpoint tensor {name} has no parameter in {type(model).__name__}")
                p = params[name]
                if tuple(p.shape) != tuple(arr.shape):
                    raise ValueError(f"{name}: checkpoint shape {tuple(arr.shape)}, model needs {tuple(p.shape)}")
                # p.dtype, not dtype: routers that HF keeps in fp32 stay fp32 in a bf16 model
                p.copy_(torch.from_numpy(np.ascontiguousarray(arr)).to(dtype=p.dtype))
                loaded.add(name)
    missing = sorted(expected - loaded)
    if missing:
        raise ValueError(f"checkpoint {path} lacks {len(missing)} tensor(s) the model needs, e.g. {missing[:5]}")
    if lora is not None:
        attach_lora(model, lora, seed=lora_seed)
    return model.eval()
