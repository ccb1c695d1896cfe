"""The causal-LM loss from the final hidden states and the output weight, without ever holding the `[S, V]` logits.

Shape legend: N = B·S token rows · H hidden · V vocab · C rows per chunk. Mirrors `torch_impl.loss` name for name.

HF's `ForCausalLMLoss` computes `logits = h @ W` for every token, copies them to fp32, shifts the labels left by one
and takes the mean cross-entropy over the non-ignored positions. `fused_linear_cross_entropy` gives the same number
and gradients from a `lax.scan` over chunks of C rows under a `custom_vjp`:

    forward (primal):  per chunk z = (h_c @ W) rounded to the model dtype, then fp32; loss += Σ (lse(z) − z[label])
    forward (for vjp): the same scan also forms dz = (softmax(z) − onehot) / n_valid, rounds it to the model dtype
                       (HF's rounding of the logits' gradient) and keeps dh_c = dz @ Wᵀ and dW += h_cᵀ dz
    backward:          scales the kept dh, dW by the incoming cotangent

so the logits GEMM runs once, and the peak extra memory is one chunk's `[C, V]` fp32 block plus dh. Under `jit`, a
weight that is not differentiated (the frozen output projection of every recipe here) has its dW carry removed by
dead-code elimination. Rows are padded to a multiple of C with ignored labels (they add nothing).
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp

from shared_math.loss_chunks import default_chunk_rows  # the chunk rule, shared with torch_impl and the plan

IGNORE_INDEX = -100


def shift_labels(labels_BS: jax.Array, ignore_index: int = IGNORE_INDEX) -> jax.Array:
    """HF's label shift: position t is scored against labels[t + 1]; the last position of each row is ignored."""
    pad = jnp.full(labels_BS.shape[:-1] + (1,), ignore_index, labels_BS.dtype)
    return jnp.concatenate([labels_BS[..., 1:], pad], axis=-1)


def _acc(dtype) -> jnp.dtype:
    return jnp.promote_types(dtype, jnp.float32)  # fp32, or float64 for the oracle tests


def _chunk_logits(h_CH: jax.Array, w: jax.Array, weight_is_HV: bool) -> jax.Array:
    """One chunk's logits in the model dtype (one rounding of an fp32-accumulated product), then fp32."""
    spec = "ch,hv->cv" if weight_is_HV else "ch,vh->cv"
    acc = _acc(h_CH.dtype)
    return jnp.einsum(spec, h_CH, w, preferred_element_type=acc).astype(h_CH.dtype).astype(acc)


def _chunks(h_NH: jax.Array, target_N: jax.Array, rows: int, ignore_index: int):
    n = h_NH.shape[0]
    pad = -n % rows
    h = jnp.pad(h_NH, ((0, pad), (0, 0))).reshape(-1, rows, h_NH.shape[1])
    t = jnp.pad(target_N, (0, pad), constant_values=ignore_index).reshape(-1, rows)
    return h, t


def _loss_terms(z_CV: jax.Array, t_C: jax.Array, ignore_index: int):
    valid = t_C != ignore_index
    safe = jnp.where(valid, t_C, 0)
    lse = jax.nn.logsumexp(z_CV, axis=-1)
    picked = jnp.take_along_axis(z_CV, safe[:, None], axis=-1)[:, 0]
    return jnp.where(valid, lse - picked, 0.0), lse, safe, valid


@partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5))
def _flce(h_NH, weight, target_N, weight_is_HV: bool, rows: int, ignore_index: int):
    h_c, t_c = _chunks(h_NH, target_N, rows, ignore_index)
    acc = _acc(h_NH.dtype)

    def body(total, xs):
        h, t = xs
        per_row, *_ = _loss_terms(_chunk_logits(h, weight, weight_is_HV), t, ignore_index)
        return total + per_row.sum(), None

    total, _ = jax.lax.scan(body, jnp.zeros((), acc), (h_c, t_c))
    # HF's mean over valid rows (0/0 = NaN with none, as F.cross_entropy and torch_impl give)
    return total / (target_N != ignore_index).sum().astype(acc)


def _flce_fwd(h_NH, weight, target_N, weight_is_HV, rows, ignore_index):
    h_c, t_c = _chunks(h_NH, target_N, rows, ignore_index)
    acc = _acc(h_NH.dtype)
    n_valid = (target_N != ignore_index).sum().astype(acc)

    def body(carry, xs):
        total, dw = carry
        h, t = xs
        z = _chunk_logits(h, weight, weight_is_HV)
        per_row, lse, safe, valid = _loss_terms(z, t, ignore_index)
        dz = jnp.exp(z - lse[:, None]) - jax.nn.one_hot(safe, z.shape[-1], dtype=acc)
        dz = (dz * (valid.astype(acc) / n_valid)[:, None]).astype(h_NH.dtype)  # HF: cast back to the logits' dtype
        dh = jnp.einsum("cv,hv->ch" if weight_is_HV else "cv,vh->ch", dz, weight,
                        preferred_element_type=acc).astype(h_NH.dtype)
        dw_c = jnp.einsum("ch,cv->hv" if weight_is_HV else "ch,cv->vh", h, dz, preferred_element_type=acc)
        return (total + per_row.sum(), dw + dw_c), dh

    (total, dw), dh_c = jax.lax.scan(body, (jnp.zeros((), acc), jnp.zeros(weight.shape, acc)), (h_c, t_c))
    dh = dh_c.reshape(-1, h_NH.shape[1])[: h_NH.shape[0]]
    return total / n_valid, (dh, dw.astype(weight.dtype), target_N)


def _flce_bwd(weight_is_HV, rows, ignore_index, res, g):
    dh, dw, target_N = res
    # integer labels get a float0 cotangent (JAX's rule for non-differentiable integer inputs)
    zero_t = jnp.zeros(target_N.shape, jax.dtypes.float0)
    return (dh * g.astype(dh.dtype)).astype(dh.dtype), (dw * g.astype(dw.dtype)).astype(dw.dtype), zero_t


_flce.defvjp(_flce_fwd, _flce_bwd)


def fused_linear_cross_entropy(h_BSH: jax.Array, weight: jax.Array, labels_BS: jax.Array, *,
                               weight_is_HV: bool = True, chunk_rows: int | None = None,
                               ignore_index: int = IGNORE_INDEX) -> jax.Array:
    """HF's causal-LM loss of logits `h_BSH @ W` without materialising them: labels shifted left by one, positions
    labelled `ignore_index` skipped, mean over the rest (fp32 scalar). `weight` is the output projection as
    `[H, V]` (`weight_is_HV`, the canonical `lm_head.weight`) or `[V, H]` (tied input embeddings)."""
    if h_BSH.shape[:-1] != labels_BS.shape:
        raise ValueError(f"hidden states {tuple(h_BSH.shape)} and labels {tuple(labels_BS.shape)} disagree on [B, S]")
    vocab = weight.shape[1] if weight_is_HV else weight.shape[0]
    rows = chunk_rows or default_chunk_rows(vocab)
    h_NH = h_BSH.reshape(-1, h_BSH.shape[-1])
    rows = min(rows, max(h_NH.shape[0], 1))
    target_N = shift_labels(labels_BS, ignore_index).reshape(-1)
    return _flce(h_NH, weight, target_N, weight_is_HV, rows, ignore_index)
