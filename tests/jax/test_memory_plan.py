"""The memory plan of the jax_impl training step (`benchmarks/jax_memory_plan.py`: step.py's step compiled from
abstract weights on the CPU, GPU kernels as stand-ins, jax.checkpoint's barriers kept as the GPU pipeline keeps
them): what each checkpointed layer keeps until its backward must be its input and nothing more that grows with the
sequence (issue 17: gpt-oss-20b at 64K held 24 zero-initialised dx buffers of the tiled experts, allocated at the
start of the step, on top of the 24 saved inputs), and the plan's own read-out of the peak works.
"""

from __future__ import annotations

import pytest

pytest.importorskip("jax")
pytest.importorskip("flax")

from benchmarks.jax_memory_plan import (  # noqa: E402
    GIB,
    abstract_step,
    compile_plan,
    fit_layers,
    group_buffers,
    memory_numbers,
    peak_buffers,
)
from shared_math.config import EXPERT_TARGETS, LoraConfig, ModelConfig  # noqa: E402
from shared_math.plan import attention_targets  # noqa: E402
from shared_math.tiny import tiny_hf_config  # noqa: E402

S, H, CHUNK = 4096, 256, 512  # 8 expert chunks; H large enough that [S, H] dominates what grows with S per layer


def _plan(layers: int, tmp_path) -> dict:
    hf = tiny_hf_config("gpt_oss", num_hidden_layers=layers, hidden_size=H, intermediate_size=128)
    lora = LoraConfig(rank=4, alpha=8.0, targets=attention_targets(ModelConfig.from_hf(hf)) + EXPERT_TARGETS)
    step = abstract_step(hf, lora, backend="ragged_dot", remat="nothing", expert_chunk=CHUNK,
                         checkpoint_layers=None, kernels="standin")
    dump = tmp_path / f"L{layers}"
    compiled, _, _ = compile_plan(*step, S, kernels="standin", keep_barriers=True, dump=dump)
    return dict(layers=layers, seq=S, hidden=H, **memory_numbers(compiled), peak=peak_buffers(dump))


def test_each_layer_keeps_only_its_input(tmp_path):
    """The step's temporaries at 2 and 6 layers (tiny gpt-oss, H=256, 4096 tokens, experts in chunks of 512, every
    layer checkpointed with nothing saved): their growth per layer is what one layer keeps until its backward.

    Bound: 1.25 x S·H·2 bytes, the layer's bf16 input, the only thing a checkpointed layer has to keep. The 25% is
    for what else grows per layer and is small: the router's top-k index and gradient buffers ([S, E] int32 and
    fp32: 2·S·8·4 bytes, an eighth of the input here) and each layer's LoRA gradients (a few KB). Measured
    2026-12-06 (jax 0.10.2): 1.13x; 2.19x with the tiled experts' chunk loop as JAX transposed it (a zero dx buffer
    and zero LoRA gradient sums per layer, copied from one shared zero constant and scheduled at the start of the
    step, so every layer's were allocated at the last layer's backward)."""
    rows = [_plan(layers, tmp_path) for layers in (2, 6)]
    (fit,) = fit_layers(rows)
    per_layer_bytes = fit["per_layer_gib"] * GIB
    assert per_layer_bytes <= 1.25 * S * H * 2, (fit, [r["temp_gib"] for r in rows])

    # the read-out of the peak: temporaries only (no argument among them), within the allocation
    peak = rows[1]["peak"]
    assert peak is not None and 0 < peak["bytes"] <= rows[1]["temp_gib"] * GIB
    assert not any(b["name"].startswith(("lora_", "frozen_", "opt_state")) for b in peak["buffers"])
    groups = group_buffers(peak["buffers"])
    assert sum(g["bytes"] for g in groups) == peak["bytes"] and groups[0]["bytes"] >= groups[-1]["bytes"]
