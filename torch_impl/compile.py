"""Regional compilation: `torch.compile` each decoder layer of a torch_impl model, not the whole model.

All layers of a model share one class and one forward, so Dynamo traces that code once and reuses the compiled
graph for every layer (the parameters are inputs, not constants): compile time is one layer's, whatever the depth,
where compiling the whole model would trace and compile every layer anew. The loss, the embedding and the layer loop
with its activation checkpointing stay eager around the compiled layers, as in torchtitan's per-block compilation.

A layer compiles without graph breaks because the routed experts enter its graph as one custom op
(`torch_impl.moe_op`, used automatically while compiling), whose fake implementation hides the data-dependent group
sizes; `tests/torch/test_custom_op.py` compiles a Qwen3 layer with `fullgraph=True` to prove it, and checks that a
checkpointed compiled step recompiles nothing (across layers, steps, the checkpoint's recompute), runs eager's
expert GEMMs and no more, and takes a second sequence length with one recompile (dynamic length) and no graph break.
`benchmarks/compile_probe.py` times eager against compiled steps and counts the host's ops per step.
"""

from __future__ import annotations

from typing import Any

from torch import nn

__all__ = ["compile_decoder_layers"]


def compile_decoder_layers(model: nn.Module, **compile_kwargs: Any) -> nn.Module:
    """Compile each decoder layer of `model` (its `layers`) in place with `nn.Module.compile(**compile_kwargs)`
    (e.g. `fullgraph=True`, `mode="max-autotune"`, `dynamic=False`) and return `model`. Compilation happens at the
    first forward; the state dict and the parameters are unchanged (no `_orig_mod.` prefixes). A model sharded over
    several devices (`torch_impl.parallel`) is refused (ValueError)."""
    from torch_impl.parallel import refuse_sharded

    # FSDP2's hooks around each layer and the expert all-to-all's host-side split sizes are not traced here
    refuse_sharded(model, "torch.compile (compile_decoder_layers)")
    layers = getattr(model, "layers", None)
    if not isinstance(layers, nn.ModuleList) or not len(layers):
        raise ValueError(f"{type(model).__name__} has no decoder layers (`model.layers`) to compile")
    for layer in layers:
        layer.compile(**compile_kwargs)
    return model
