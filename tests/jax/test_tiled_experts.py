"""Tiled routed experts in JAX (`jax_impl.tiled_experts`, `CausalLM.tile_experts`): tests/torch/test_tiled_experts.py's
twin. The same function and gradients as the untiled experts (float64 oracle over the `ci` cases: odd shapes, prime
E, K=1, K=E, experts with no tokens; chunks that divide T, leave a remainder, or exceed it), the same loss and LoRA
gradients in a checkpointed tiny model, as many expert GEMMs in the gradient as untiled (no extra forward), and,
measured by XLA on the CPU, a smaller working set for the backward.
"""

from __future__ import annotations

import functools

import numpy as np
import pytest

jax = pytest.importorskip("jax")
jnp = pytest.importorskip("jax.numpy")
pytest.importorskip("flax")

from jax_impl import load_model  # noqa: E402
from jax_impl.lora import load_lora_state_dict  # noqa: E402
from jax_impl.moe import split_lora_experts  # noqa: E402
from jax_impl.tiled_experts import tiled_split_lora_experts  # noqa: E402
from shared_math.cases import cases  # noqa: E402
from shared_math.config import LoraConfig, ModelConfig  # noqa: E402
from shared_math.numerics import assert_close  # noqa: E402
from shared_math.tiny import write_tiny_checkpoint  # noqa: E402
from tests.jax.jax_helpers import LoraRunner  # noqa: E402
from tests.jax.test_moe_block import _check_case  # noqa: E402
from tests.shared.hf_helpers import random_lora_tensors  # noqa: E402

# one function object per chunk, so the compiled value-and-grad is reused across cases of one shape
TILED = {c: functools.partial(tiled_split_lora_experts, chunk=c) for c in (4, 1000)}


@pytest.mark.parametrize("case", cases("ci"), ids=lambda c: c.name)
@pytest.mark.parametrize("chunk", sorted(TILED), ids=lambda c: f"chunk{c}")
def test_tiled_matches_reference_fp32(case, chunk, seed):
    _check_case(case, "ragged_dot", jnp.float32, "float32", seed, experts=TILED[chunk])


def test_tiled_backward_needs_less_memory():
    """XLA's own accounting of the compiled value-and-grad (CPU): at T=2048 tokens, K=2, I=64, the untiled experts'
    temporaries hold the gate/up rows of all 4096 routed rows and their gradients; in chunks of 256 tokens they hold
    one chunk's. Measured 2026-12-06 (jax 0.10.2): 5,700,456 against 40,390,816 bytes (6,093,616 with the chunk loop
    that JAX transposed, before the custom VJP)."""
    T, H, I, E, K, R = 2048, 32, 64, 8, 2, 4
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((T, H)), jnp.float32)
    ids = jnp.asarray(rng.integers(0, E, (T, K)), jnp.int32)
    w = jnp.full((T, K), 0.5, jnp.float32)
    wgu, wd = (jnp.asarray(rng.standard_normal(s) * 0.1, jnp.float32) for s in ((E, H, 2 * I), (E, I, H)))
    lora = [jnp.asarray(rng.standard_normal(s) * 0.1, jnp.float32) for s in ((E, H, R), (E, R, 2 * I), (E, I, R),
                                                                           (E, R, H))]

    def temp_bytes(experts):
        def loss(x, lora):
            y = experts(x, ids, w, wgu, wd, (lora[0], lora[1]), (lora[2], lora[3]), backend="ragged_dot")
            return jnp.sum(y * y)

        compiled = jax.jit(jax.grad(loss, argnums=(0, 1))).lower(x, lora).compile()
        return compiled.memory_analysis().temp_size_in_bytes

    untiled, tiled = temp_bytes(split_lora_experts), temp_bytes(functools.partial(tiled_split_lora_experts,
                                                                                  chunk=256))
    assert tiled * 3 < untiled, (tiled, untiled)


def test_tiled_experts_refuse_a_bad_chunk():
    with pytest.raises(ValueError, match="positive number of tokens"):
        tiled_split_lora_experts(jnp.zeros((2, 4)), jnp.zeros((2, 1), jnp.int32), jnp.ones((2, 1)),
                                 jnp.zeros((1, 4, 8)), jnp.zeros((1, 4, 4)), chunk=0)


def _runner(path, lora: LoraConfig, tensors, chunk: int | None) -> LoraRunner:
    """A checkpointed jax_impl model of `path` with these LoRA tensors, its experts tiled in `chunk` tokens."""
    model = load_model(path, lora=lora, moe_backend="ragged_dot")
    load_lora_state_dict(model, tensors)
    model.gradient_checkpointing_enable()
    model.tile_experts(chunk)
    return LoraRunner(model)


def _ragged_products(jaxpr, path=(), acc=None) -> dict:
    """{path of enclosing primitives: number of ragged_dot_general equations} over a jaxpr and all sub-jaxprs."""
    acc = {} if acc is None else acc
    for e in jaxpr.eqns:
        if e.primitive.name == "ragged_dot_general":
            acc[path] = acc.get(path, 0) + 1
        for p in e.params.values():
            for sub in p if isinstance(p, (list, tuple)) else (p,):
                inner = sub if hasattr(sub, "eqns") else getattr(sub, "jaxpr", None)
                if hasattr(inner, "eqns"):
                    _ragged_products(inner, path + (e.primitive.name,), acc)
    return acc


def test_tiled_gradient_has_the_untiled_expert_products(tmp_path):
    """A checkpointed 1-layer Qwen3 step's gradient runs as many expert GEMMs tiled as untiled: the layer
    recompute's forward of the chunk map is dropped (nothing in the backward reads its output), so the chunks'
    recompute inside the backward replaces it rather than adding to it. Untiled: 6 products in the forward, 16 in the
    layer's remat (6 recomputed, 10 backward); tiled: the forward's 6 in the chunk map, and the backward's 16 twice in
    the jaxpr, for the last chunk (outside the loop: its gradients start the sums) and in the loop over the others,
    so n chunks run n times 16."""
    path = write_tiny_checkpoint("qwen3_moe", tmp_path / "q", seed=3, num_hidden_layers=1)
    lora = LoraConfig(rank=4, alpha=8.0, targets=("o_proj", "experts.gate_up_proj", "experts.down_proj"))
    tensors = random_lora_tensors(ModelConfig.from_hf(path), lora, seed=3)
    ids = np.random.default_rng(0).integers(0, 64, size=(2, 16))
    counts = []
    for chunk in (None, 8):
        r = _runner(path, lora, tensors, chunk)
        counts.append(_ragged_products(jax.make_jaxpr(r._fn)(r.lora_state, r.frozen_state, ids, ids, None).jaxpr))
    untiled, tiled = counts
    assert sorted(untiled.values()) == [6, 16] and not any("scan" in p for p in untiled), untiled
    forward = {p: n for p, n in tiled.items() if "remat2" not in p}
    backward = {p[p.index("remat2"):]: n for p, n in tiled.items() if "remat2" in p}
    assert list(forward.values()) == [6] and all("scan" in p for p in forward), tiled
    assert backward == {("remat2",): 16, ("remat2", "scan"): 16}, tiled


@pytest.mark.parametrize("family", ["qwen3_moe", "gpt_oss", "deepseek_v3"])
def test_tiled_model_equals_untiled(family, tmp_path, seed):
    """A checkpointed tiny model (B=2, S=13: 26 tokens) with experts in chunks of 8: loss and LoRA gradients equal
    the untiled model's to fp32 reduction order; the chunk refuses nonsense."""
    path = write_tiny_checkpoint(family, tmp_path / family, seed=seed % 1000)
    lora = LoraConfig(rank=4, alpha=8.0, targets=("o_proj", "experts.gate_up_proj", "experts.down_proj"))
    tensors = random_lora_tensors(ModelConfig.from_hf(path), lora, seed=seed % 991)
    ids = np.random.default_rng(seed).integers(0, 64, size=(2, 13))
    plain, tiled = (_runner(path, lora, tensors, chunk).run(ids, ids) for chunk in (None, 8))
    assert_close(tiled["loss"], plain["loss"], dtype="float32", quantity="loss", name=f"{family} loss")
    for name, g in plain["grads"].items():
        assert float(np.abs(g).max()) > 0
        assert_close(tiled["grads"][name], g, dtype="float32", quantity="lora_grad", name=f"{family} {name}")
    with pytest.raises(ValueError, match="positive number of tokens"):
        load_model(path, lora=lora, moe_backend="ragged_dot").tile_experts(-3)
