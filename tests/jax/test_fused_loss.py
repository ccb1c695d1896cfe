"""The causal-LM loss without logits (`jax_impl.loss.fused_linear_cross_entropy`), mirroring the torch suite.

Unit level: the loss, dh and dW of the chunked custom-VJP scan equal a float64 numpy reference of HF's loss on the
materialised logits (fp32 tolerance: JAX runs in fp32 at precision highest), for both weight layouts, chunk sizes
that do and do not divide the rows, ignored positions and a row with no valid label; under `jit` too; no valid label
at all gives NaN, as HF's mean does. The same function in torch and JAX gives the same loss and gradients.
Model level: Qwen3-MoE (tied embeddings) and gpt-oss (lm_head, aux loss) forwards with `return_logits=False` give
the loss and every LoRA gradient of the materialised forward in fp32, and no logits; that loss is HF's, recomputed
in float64 from the materialised logits (labels shifted left, -100 ignored, mean over the valid positions, plus
router_aux_loss_coef · aux_loss).
"""

from __future__ import annotations

import math
from functools import partial

import numpy as np
import pytest

jax = pytest.importorskip("jax")
jnp = jax.numpy

from jax_impl.loss import default_chunk_rows, fused_linear_cross_entropy  # noqa: E402
from shared_math.numerics import assert_close  # noqa: E402


def _reference(h, w, labels, weight_is_HV):
    """float64 numpy: HF's shifted mean cross-entropy over `h @ W`, its dh and dW."""
    h, w = h.astype(np.float64), w.astype(np.float64)
    w_HV = w if weight_is_HV else w.T
    B, S, H = h.shape
    h_NH = h.reshape(-1, H)
    t = np.concatenate([labels[:, 1:], np.full((B, 1), -100)], axis=1).reshape(-1)
    z = h_NH @ w_HV
    valid = t != -100
    lse = np.log(np.exp(z - z.max(-1, keepdims=True)).sum(-1)) + z.max(-1)
    safe = np.where(valid, t, 0)
    n = valid.sum()
    loss = np.where(valid, lse - z[np.arange(len(t)), safe], 0).sum() / n
    dz = np.exp(z - lse[:, None])
    dz[np.arange(len(t)), safe] -= 1
    dz *= (valid / n)[:, None]
    dh = (dz @ w_HV.T).reshape(B, S, H)
    dw_HV = h_NH.T @ dz
    return loss, dh, dw_HV if weight_is_HV else dw_HV.T


@pytest.mark.parametrize("weight_is_HV", [True, False], ids=["lm_head", "tied"])
@pytest.mark.parametrize("chunk_rows", [1, 7, 1000])
@pytest.mark.parametrize("ignored", ["none", "some", "whole_row"])
def test_fused_loss_matches_float64_reference(weight_is_HV, chunk_rows, ignored):
    rng = np.random.default_rng(chunk_rows)
    B, S, H, V = 3, 11, 13, 37
    h = rng.standard_normal((B, S, H)).astype(np.float32)
    w = rng.standard_normal((H, V) if weight_is_HV else (V, H)).astype(np.float32)
    labels = rng.integers(0, V, (B, S))
    if ignored == "some":
        labels[:, :3] = -100
    elif ignored == "whole_row":
        labels[1] = -100

    def f(h, w):
        return 3.0 * fused_linear_cross_entropy(h, w, jnp.asarray(labels), weight_is_HV=weight_is_HV,
                                                chunk_rows=chunk_rows)

    with jax.default_matmul_precision("highest"):
        loss, (dh, dw) = jax.jit(jax.value_and_grad(f, argnums=(0, 1)))(jnp.asarray(h), jnp.asarray(w))
        eager = f(jnp.asarray(h), jnp.asarray(w))  # the primal path (no VJP) gives the same loss
    ref_loss, ref_dh, ref_dw = _reference(h, w, labels, weight_is_HV)
    assert_close(np.asarray(loss), 3 * ref_loss, dtype="float32", quantity="loss", name="loss")
    assert_close(np.asarray(eager), 3 * ref_loss, dtype="float32", quantity="loss", name="primal loss")
    assert_close(np.asarray(dh), 3 * ref_dh, dtype="float32", quantity="moe_grad", name="dh")
    assert_close(np.asarray(dw), 3 * ref_dw, dtype="float32", quantity="moe_grad", name="dW")


def test_no_valid_label_gives_nan_like_hf():
    h = jnp.ones((1, 4, 8))
    w = jnp.ones((8, 16))
    assert math.isnan(float(fused_linear_cross_entropy(h, w, jnp.full((1, 4), -100))))


def test_chunk_rows_bound_the_logits_block():
    assert default_chunk_rows(151_936) * 151_936 <= 1 << 28
    assert default_chunk_rows(151_936) % 64 == 0 and default_chunk_rows(10**9) == 64


def test_same_numbers_as_torch_impl():
    torch = pytest.importorskip("torch")
    from torch_impl.loss import fused_linear_cross_entropy as torch_flce

    rng = np.random.default_rng(5)
    h = rng.standard_normal((2, 9, 16)).astype(np.float32)
    w = rng.standard_normal((16, 41)).astype(np.float32)
    labels = rng.integers(0, 41, (2, 9))
    labels[0, :2] = -100
    with jax.default_matmul_precision("highest"):
        loss, dh = jax.value_and_grad(lambda h: fused_linear_cross_entropy(h, jnp.asarray(w), jnp.asarray(labels),
                                                                           chunk_rows=5))(jnp.asarray(h))
    th = torch.from_numpy(h).requires_grad_()
    tl = torch_flce(th, torch.from_numpy(w), torch.from_numpy(labels), chunk_rows=5)
    tl.backward()
    assert_close(np.asarray(loss), tl.detach().numpy(), dtype="float32", quantity="loss", name="loss")
    assert_close(np.asarray(dh), th.grad.numpy(), dtype="float32", quantity="moe_grad", name="dh")


# Both output-weight layouts (tied embeddings [V, H], lm_head [H, V]) and the aux loss, over the two families; one
# decoder layer each (the loss sits after them; compiling a second layer's backward costs seconds per case on CPU).
# gpt-oss's one layer is a sliding one, and the sequence (10) is longer than its window (8).
FAMILIES = {
    "qwen3_moe_tied": ("qwen3_moe", dict(num_hidden_layers=1, tie_word_embeddings=True)),
    "gpt_oss_aux": ("gpt_oss", dict(num_hidden_layers=1, output_router_logits=True, router_aux_loss_coef=0.5)),
}


@pytest.mark.parametrize("case", list(FAMILIES))
def test_model_loss_without_logits_equals_materialised(case, tmp_path):
    from flax import nnx

    from jax_impl import load_model
    from jax_impl.lora import load_lora_state_dict, lora_state_dict
    from shared_math.config import EXPERT_TARGETS, LoraConfig
    from shared_math.tiny import write_tiny_checkpoint

    family, overrides = FAMILIES[case]
    path = write_tiny_checkpoint(family, tmp_path / case, seed=3, **overrides)
    model = load_model(path, lora=LoraConfig(rank=4, alpha=8, targets=("q_proj", "v_proj") + EXPERT_TARGETS),
                       lora_seed=1)
    rng = np.random.default_rng(0)
    # B non-zero, so the LoRA path is part of the loss and every LoRA tensor gets a gradient
    load_lora_state_dict(model, {n: rng.normal(0, 0.05, t.shape).astype(np.float32) if "lora_B" in n else t
                                 for n, t in lora_state_dict(model).items()})
    ids = jnp.asarray(rng.integers(0, 128, (2, 10)), jnp.int32)
    labels = ids.at[:, :3].set(-100)
    graphdef, lora, rest = nnx.split(model, nnx.LoRAParam, ...)

    def loss(lora, ids, labels, return_logits):
        out = nnx.merge(graphdef, lora, rest)(ids, labels=labels, return_logits=return_logits)
        return out.loss, out

    @jax.jit  # ids as arguments: token ids are range-checked only when concrete (outside jit)
    def both(lora, ids, labels):
        return (jax.value_and_grad(partial(loss, return_logits=False), has_aux=True)(lora, ids, labels),
                jax.value_and_grad(partial(loss, return_logits=True), has_aux=True)(lora, ids, labels))

    with jax.default_matmul_precision("highest"):
        ((fused_loss, fused), fused_grads), ((full_loss, full), full_grads) = both(lora, ids, labels)
    assert fused.logits is None and full.logits is not None
    assert_close(fused_loss, full_loss, dtype="float32", quantity="loss", name="loss")
    assert (full.aux_loss is not None) == ("router_aux_loss_coef" in overrides)
    if full.aux_loss is not None:
        assert float(fused.aux_loss) == float(full.aux_loss)
    got, want = jax.tree.leaves(fused_grads), jax.tree.leaves(full_grads)
    assert len(got) == len(want) == 4 * 2  # (q, v, experts gate_up, experts down) x (A, B)
    for i, (g, w) in enumerate(zip(got, want)):
        assert float(jnp.abs(w).max()) > 0, i
        assert_close(g, w, dtype="float32", quantity="lora_grad", name=f"LoRA grad {i}")
    # HF's ForCausalLMLoss on the materialised logits, in float64, plus the aux loss by HF's rule
    z = np.asarray(full.logits, np.float64)[:, :-1]
    t = np.asarray(labels)[:, 1:]
    valid = t != -100
    lse = np.log(np.exp(z - z.max(-1, keepdims=True)).sum(-1)) + z.max(-1)
    picked = np.take_along_axis(z, np.where(valid, t, 0)[..., None], axis=-1)[..., 0]
    hf = np.where(valid, lse - picked, 0.0).sum() / valid.sum()
    if full.aux_loss is not None:
        hf += overrides["router_aux_loss_coef"] * float(full.aux_loss)
    assert_close(fused_loss, hf, dtype="float32", quantity="loss", name="loss vs HF's rule in float64")
