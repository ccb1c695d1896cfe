"""`jax_impl.models.layers.project` (projections that read the same x share their LoRA input: one cast of x, one
x·[A1 | A2 | ...]) changes no number: outputs and the gradients of x and of every LoRA factor equal those of each
projection called alone. Mirrors the torch test in tests/torch/test_fused_glue.py."""

from __future__ import annotations

import numpy as np
import pytest

jax = pytest.importorskip("jax")
pytest.importorskip("flax")

import jax.numpy as jnp  # noqa: E402
from flax import nnx  # noqa: E402

from jax_impl.lora import LoRALinear  # noqa: E402
from jax_impl.models.layers import project  # noqa: E402
from shared_math.numerics import assert_close  # noqa: E402


def _linear(rng, n_in, n_out, rank, bias):
    m = LoRALinear(jnp.asarray(rng.standard_normal((n_in, n_out)) * 0.1, jnp.bfloat16),
                   jnp.asarray(rng.standard_normal(n_out), jnp.bfloat16) if bias else None)
    if rank is not None:
        m.lora_A = nnx.LoRAParam(jnp.asarray(rng.standard_normal((n_in, rank)) * 0.2, jnp.float32))
        m.lora_B = nnx.LoRAParam(jnp.asarray(rng.standard_normal((rank, n_out)) * 0.1, jnp.float32))
        m.lora_scale = 2.0
    return m


@pytest.mark.parametrize("with_plain", [False, True], ids=["qkv", "qkv_and_a_plain_linear"])
def test_project_shares_the_lora_input_and_changes_no_number(with_plain, seed):
    rng = np.random.default_rng(seed)
    projs = [_linear(rng, 24, 32, 4, True), _linear(rng, 24, 8, 3, False), _linear(rng, 24, 8, 4, True)]
    if with_plain:
        projs.insert(1, _linear(rng, 24, 16, None, True))
    x = jnp.asarray(rng.standard_normal((2, 5, 24)), jnp.bfloat16)
    dys = [jnp.asarray(rng.standard_normal((2, 5, p.out_features)), jnp.bfloat16) for p in projs]
    graphdef, lora, rest = nnx.split(nnx.List(projs), nnx.LoRAParam, ...)

    def loss(x, lora, fused):
        mods = list(nnx.merge(graphdef, lora, rest))
        outs = project(x, *mods) if fused else [p(x) for p in mods]
        return sum(jnp.sum(o.astype(jnp.float32) * dy.astype(jnp.float32)) for o, dy in zip(outs, dys)), outs

    (_, fused), g_fused = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)(x, lora, True)
    (_, alone), g_alone = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)(x, lora, False)
    leaves_f, leaves_a = jax.tree.leaves((fused, g_fused)), jax.tree.leaves((alone, g_alone))
    assert len(leaves_f) == len(leaves_a) == len(projs) + 1 + 2 * 3  # outputs, dx, three (dA, dB)
    for a, b in zip(leaves_f, leaves_a):
        assert a.dtype == b.dtype
        # each z column is the same fp32 dot product over x's row; a wider product may only sum it in another order
        assert_close(np.asarray(a, np.float64), np.asarray(b, np.float64),
                     dtype="float32" if a.dtype == jnp.float32 else "bfloat16", quantity="moe_grad")
