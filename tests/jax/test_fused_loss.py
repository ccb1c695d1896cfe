"""The causal-LM loss without logits (`jax_impl.loss.fused_linear_cross_entropy`), mirroring the torch suite.

Unit level: the loss, dh and dW of the chunked custom-VJP scan equal a float64 numpy reference of HF's loss on the
materialised logits (fp32 tolerance: JAX runs in fp32 at precision highest), for both weight layouts, chunk sizes
that do and do not divide the rows, ignored positions and a row with no valid label; under `jit` too; no valid label
at all gives NaN, as HF's mean does. The same function in torch and JAX gives the same loss and gradients.
"""

from __future__ import annotations

import math

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
