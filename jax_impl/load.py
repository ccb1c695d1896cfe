"""`load_model`: a HF checkpoint folder -> a jax_impl Flax NNX model, optionally with fresh split-LoRA adapters.

Reads through `shared_math.checkpoint.read_checkpoint` (canonical names and layouts, lazily), builds the family's
model in `dtype`, and attaches LoRA (`nnx.LoRAParam`, fp32) when `lora` is given.

Host memory stays near one tensor (`DeviceTensors`): each canonical tensor is read from the safetensors memory map
(BF16 kept as bfloat16, exactly: a view of the file where the layout is already canonical, else one converted
copy), copied to the device, and its file pages dropped from the process before the next tensor is read; the model
casts it to `dtype` on the device. Reading a Qwen3-30B-A3B checkpoint thus holds at most its largest tensor (the
experts' gate_up, 0.8 GB in bf16) a few times over, not the 61 GB file (`benchmarks/load_rss.py` measures it).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jax_impl.backends import resolve_backend
from jax_impl.lora import attach_lora
from jax_impl.models.attention import resolve_attn_implementation
from shared_math.checkpoint import CheckpointTensors, read_checkpoint
from shared_math.config import LoraConfig
from shared_math.progress import with_load_progress


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


class DeviceTensors(Mapping[str, jax.Array]):
    """A checkpoint's canonical tensors as device arrays, read one at a time (`__getitem__` is the per-tensor
    loop): memory map -> host array in the stored precision (BF16 as bfloat16) -> `jax.device_put` -> wait for the
    copy -> drop the tensor's file pages (`CheckpointTensors.release`). Nothing is cached: the model keeps what it
    built. `layer(l)` is layer l's tensors keyed within the layer, as `CheckpointTensors.layer`."""

    def __init__(self, tensors: CheckpointTensors, device: jax.Device | None = None):
        self._tensors = tensors
        self._device = device
        self.config = tensors.config
        self.shapes = tensors.shapes

    def __getitem__(self, name: str) -> jax.Array:
        host = self._tensors.read(name, bf16=np.dtype(jnp.bfloat16))
        if host.dtype == np.float64:  # JAX keeps 64-bit floats off (jax_enable_x64): what it would make of them
            host = host.astype(np.float32)
        arr = jax.device_put(host, self._device)
        arr.block_until_ready()  # the copy is done: the host array and its file pages can go
        del host
        self._tensors.release(name)
        return arr

    def __iter__(self) -> Iterator[str]:
        return iter(self._tensors)

    def __len__(self) -> int:
        return len(self._tensors)

    def layer(self, l: int) -> dict[str, jax.Array]:
        if not 0 <= l < self.config.num_hidden_layers:
            raise IndexError(f"layer {l} out of range for {self.config.num_hidden_layers} layers")
        p = f"layers.{l}."
        return {n[len(p):]: self[n] for n in self._tensors if n.startswith(p)}


def model_dtype(dtype) -> jnp.dtype:
    """`dtype` (a jnp dtype or its name) as the floating dtype the weights are cast to; ValueError otherwise (an
    integer dtype rounded every weight to an integer, silently)."""
    try:
        dt = jnp.dtype(dtype)
    except TypeError:
        raise ValueError(f"dtype must be a floating-point dtype such as jnp.bfloat16 or 'float32', got {dtype!r}"
                         ) from None
    if not jnp.issubdtype(dt, jnp.floating):
        raise ValueError(f"dtype must be a floating-point dtype such as jnp.bfloat16 or 'float32', got {dt}")
    return dt


def load_model(path: str | Path, *, lora: LoraConfig | None = None, dtype=jnp.float32,
               moe_backend: str = "auto", lora_seed: int | None = None,
               attn_implementation: str | None = None) -> nnx.Module:
    """Load the checkpoint at `path` as a jax_impl model in `dtype`; with `lora`, attach fresh adapters (B = 0).

    The MoE backend and the attention implementation (None = the literal softmax, "xla", "cudnn", "auto":
    `models.attention`) are resolved, and refused with a reason if they cannot run here, before any tensor is read.
    Tensors go to the default device one at a time (`DeviceTensors`). Raises shared_math.checkpoint.CheckpointError,
    from `read_checkpoint` (shared with torch_impl) before anything is built, for a damaged checkpoint, for one with
    layers past config.json's num_hidden_layers other than DeepSeek-V3 / GLM MTP layers, and for a config.json that
    asks for math not implemented (its cause a ModelConfigError naming the field: `shared_math.config.MATH_FIELDS`).
    """
    dtype = model_dtype(dtype)
    backend = resolve_backend(moe_backend, dtype=dtype)
    attn = resolve_attn_implementation(attn_implementation, dtype)
    cfg, tensors = read_checkpoint(path)
    model_class = _model_class(cfg.family)
    if lora is not None:
        lora.validate_for(cfg)
    # a bar per tensor read (on a terminal), around the per-tensor device loop
    tensors = with_load_progress(DeviceTensors(tensors), f"loading {Path(path).name}")
    model = model_class(cfg, tensors, dtype=dtype, moe_backend=backend, attn_implementation=attn)
    if lora is not None:
        attach_lora(model, lora, seed=lora_seed)
    return model
