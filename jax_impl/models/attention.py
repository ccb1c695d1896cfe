"""The attention of every jax_impl model behind one function, `dot_product_attention`, in three implementations.

Shape legend: B batch · S sequence · N query heads · K kv heads (GQA: query head n reads kv head n // (N / K), HF's
`repeat_kv`) · D query/key head dim · Dv value head dim (MLA: D ≠ Dv).

    out [B, S, N, Dv] = softmax(q·kᵀ·scale + mask [| sink]) · v

- `None`, the reference (and what runs on CPU): the literal softmax, rounded where HF's eager attention rounds
  (fp32-accumulated scores rounded to the model dtype, scaled there, softmax in fp32, probabilities in the model
  dtype); a query with no key left (a left-padding position) gets 0, as torch's SDPA. It holds the [S, S] scores.
- `"xla"`: `jax.nn.dot_product_attention(implementation="xla")`: the same math in XLA's fused form (fp32 logits,
  never rounded), GQA without repeating K/V. Still [S, S] logits; a portable second path.
- `"cudnn"`: cuDNN's flash attention through `jax.nn.dot_product_attention(implementation="cudnn")` (bf16 / fp16 on
  an NVIDIA GPU): causal without a mask tensor (`is_causal`), sliding windows in the kernel (`local_window_size`),
  GQA without repeated K/V, nothing O(S²) in memory unless a mask is given.
- `"auto"` (resolved once, by `resolve_attn_implementation`): `"cudnn"` on a GPU in bf16/fp16, else `None`.

Masks: `mask_BSS` [B, S, S] bool (True = attend: causal, packed documents, padding; `layers.causal_mask`) or None,
which means plain causal attention (one document per row, no padding: what the model passes when neither
position_ids nor attention_mask are given, so cuDNN runs without a mask tensor). With a mask, cuDNN gets it as a
bias (O(S²) bf16: JAX's public API has no packed-segment form), and odd lengths are padded to even ones (cuDNN's
rule for a bias in training, which jax 0.11.2 also applied to the unmasked causal sink problem) with a trailing
query and a key that is masked, or, causal without a mask, after every real query. `window` W (gpt-oss's sliding
layers): key j is seen by query i iff i − W < j ≤ i.

Sinks (gpt-oss: a learned logit per head that joins every softmax row, then is dropped) are one extra key, at index
0, with value 0 and logit sink_n for every query: q gets 8 more coordinates, coordinate D holding sink_n / scale,
the sink key's coordinate D is 1 (one key serves a GQA group), v gets zero columns (`_with_sink`). That equals the
log-sum-exp rescale `out_plain · sigmoid(lse − sink)` exactly, and it differentiates through the attention's own
backward. The rescale itself cannot be used with `jax.nn.dot_product_attention`: its `return_residual` lse is
`stop_gradient`-ed in the xla path (and rounded to the input dtype) and its cuDNN VJP drops the residual's cotangent
(jax 0.10.2; `tests/jax/test_attention.py` keeps a canary on it), so a rescale through it would lose the lse's
gradient. (`lse_attention` does the rescale on the forward and backward rules of JAX's own cuDNN attention, whose
backward can be handed the rescaled output: the default under "cudnn" without a mask; SPLITMOE_JAX_SINK_LSE=0
turns it off, and then the rest of this paragraph applies there too.) Full
layers with cuDNN prepend one dummy query so that the [S+1, S+1] problem is plainly causal (query
i + 1 sees the sink and keys 0..i); sliding layers run in query blocks of one window against their 2W − 1 keys
plus the sink with an explicit O(S·W) mask (`_sliding_blocks`), in every implementation.

MLA (DeepSeek-V3: D = 192, Dv = 128): JAX's public API wants one head dim, so v is padded with zero columns to D
(and q, k with zeros when Dv > D) and the output sliced back; scores are unchanged. cuDNN also wants D a multiple of
8 and at most 256 (Hopper): a shape it refuses falls back to `"xla"` with a warning that says why.
"""

from __future__ import annotations

import warnings

import jax
import jax.numpy as jnp

from jax_impl.models import lse_attention

_F32 = jnp.float32
# extra q/k coordinates that carry the sink logit; 8 keeps D + 8 a multiple of 8 for the fused kernels
_SINK_PAD = 8
IMPLEMENTATIONS = (None, "xla", "cudnn")
_CUDNN_DTYPES = (jnp.bfloat16, jnp.float16)


def resolve_attn_implementation(name: str | None, dtype) -> str | None:
    """`None` | "xla" | "cudnn" | "auto" -> the implementation to run (`None`, "xla" or "cudnn") for a model in
    `dtype` on this machine; "cudnn" where it cannot run raises a ValueError that says why, before any work."""
    if name == "auto":
        gpu = jax.default_backend() == "gpu"
        return "cudnn" if gpu and jnp.dtype(dtype) in map(jnp.dtype, _CUDNN_DTYPES) else None
    if name not in IMPLEMENTATIONS:
        raise ValueError(f"attention implementation {name!r} is not one of None (the literal softmax), 'xla', "
                         "'cudnn' or 'auto'")
    if name == "cudnn":
        if jax.default_backend() != "gpu":
            raise ValueError(f"attention implementation 'cudnn' needs an NVIDIA GPU (JAX's backend here is "
                             f"{jax.default_backend()!r}); use None (the literal softmax) or 'xla'")
        if jnp.dtype(dtype) not in map(jnp.dtype, _CUDNN_DTYPES):
            raise ValueError(f"cuDNN flash attention runs bf16 / fp16 only, this model is {jnp.dtype(dtype)}; load "
                             "it in bfloat16 or use 'xla' / None")
    return name


def dot_product_attention(q_BSND: jax.Array, k_BSKD: jax.Array, v_BSKE: jax.Array, *, scale: float,
                          mask_BSS: jax.Array | None = None, window: int | None = None,
                          sinks_N: jax.Array | None = None, implementation: str | None = None) -> jax.Array:
    """Causal attention [B, S, N, Dv] of q [B, S, N, D], k [B, S, K, D], v [B, S, K, Dv] (see the module docstring
    for `mask_BSS` (None = plain causal), `window`, `sinks_N` [N] and `implementation`)."""
    B, S, N, D = q_BSND.shape
    K = k_BSKD.shape[2]
    if k_BSKD.shape != (B, S, K, D) or v_BSKE.shape[:3] != (B, S, K) or N % K:
        raise ValueError(f"attention needs q [B, S, N, D], k [B, S, K, D], v [B, S, K, Dv] with K dividing N; got "
                         f"{tuple(q_BSND.shape)}, {tuple(k_BSKD.shape)}, {tuple(v_BSKE.shape)}")
    if mask_BSS is not None and mask_BSS.shape != (B, S, S):
        raise ValueError(f"mask_BSS must be [B, S, S] = {(B, S, S)}, got {tuple(mask_BSS.shape)}")
    if window is not None and window >= S:
        window = None  # a window at least the row long is full causal attention
    if implementation is None:
        return literal_attention(q_BSND, k_BSKD, v_BSKE, scale=scale, mask_BSS=mask_BSS, window=window,
                                 sinks_N=sinks_N)
    if implementation not in ("xla", "cudnn"):
        raise ValueError(f"attention implementation {implementation!r} is not one of None, 'xla', 'cudnn'")
    if implementation == "cudnn" and q_BSND.dtype not in map(jnp.dtype, _CUDNN_DTYPES):
        raise ValueError(f"cuDNN flash attention runs bf16 / fp16 only, got {q_BSND.dtype}; use 'xla' or None")
    if sinks_N is not None:
        mask = None if mask_BSS is None else mask_BSS[:, None]
        return sink_attention(q_BSND, k_BSKD, v_BSKE, sinks_N, mask, scale, window, implementation=implementation)
    q, k, v, Dv = _same_head_dim(q_BSND, k_BSKD, v_BSKE, implementation)
    out = _dpa(q, k, v, mask_BSS, scale, window, implementation)
    return _zero_empty_rows(out[..., :Dv], mask_BSS)


# ---- the reference -------------------------------------------------------------------------------------------------

def literal_attention(q_BSND: jax.Array, k_BSKD: jax.Array, v_BSKE: jax.Array, *, scale: float,
                      mask_BSS: jax.Array | None = None, window: int | None = None,
                      sinks_N: jax.Array | None = None) -> jax.Array:
    """The literal softmax, HF eager's rounding points: scores = (q·kᵀ in fp32).to(dtype) · scale, [| sink_n],
    softmax in fp32 over the allowed keys (a row with none gives 0; with a sink it gives 0 by itself), probabilities
    in the model dtype, times v (fp32 accumulation, one rounding)."""
    B, S, N, D = q_BSND.shape
    K = k_BSKD.shape[2]
    cd = q_BSND.dtype
    q_BSKGD = q_BSND.reshape(B, S, K, N // K, D)  # query head k·G + g reads kv head k, as HF's repeat_kv
    scores = jnp.einsum("bqkgd,bckd->bkgqc", q_BSKGD, k_BSKD, preferred_element_type=_F32).astype(cd)
    scores = scores * jnp.asarray(scale, cd)
    idx = jnp.arange(S)
    allowed = idx[None, :] <= idx[:, None]
    if window is not None:
        allowed = allowed & (idx[None, :] > idx[:, None] - window)
    allowed = allowed[None, None, None] if mask_BSS is None else allowed & mask_BSS[:, None, None]
    if sinks_N is not None:
        sink = jnp.broadcast_to(sinks_N.astype(cd).reshape(1, K, N // K, 1, 1), scores.shape[:-1] + (1,))
        scores = jnp.concatenate([scores, sink], axis=-1)
        allowed = jnp.concatenate([jnp.broadcast_to(allowed, scores.shape[:-1] + (S,)),
                                   jnp.ones(scores.shape[:-1] + (1,), bool)], axis=-1)
    probs = masked_softmax(scores, allowed, cd)[..., :S]
    out = jnp.einsum("bkgqc,bcke->bqkge", probs, v_BSKE, preferred_element_type=_F32).astype(cd)
    return out.reshape(B, S, N, v_BSKE.shape[-1])


def masked_softmax(scores: jax.Array, mask: jax.Array, dtype) -> jax.Array:
    """softmax over the last axis in fp32 of `scores` where `mask` (broadcast to it) allows, cast to `dtype`; a row
    with nothing allowed (a left-padding query) gets all-zero weights, so its attention output is 0 (as torch's SDPA
    and torch_impl's `sdpa_attention`; without it the dtype-min fill would average every key)."""
    probs = jax.nn.softmax(jnp.where(mask, scores.astype(_F32), jnp.finfo(_F32).min), axis=-1)
    return jnp.where(mask.any(-1, keepdims=True), probs, 0.0).astype(dtype)


# ---- jax.nn.dot_product_attention ----------------------------------------------------------------------------------

def _same_head_dim(q, k, v, implementation: str):
    """q, k, v zero-padded to one head dim (JAX's API wants it; cuDNN a multiple of 8), and the true Dv. Zero
    columns change neither q·kᵀ nor the kept output columns."""
    D, Dv = q.shape[-1], v.shape[-1]
    width = max(D, Dv)
    if implementation == "cudnn":
        width = -(-width // 8) * 8

    def pad(x):
        extra = width - x.shape[-1]
        return x if extra == 0 else jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, extra)])

    return pad(q), pad(k), pad(v), Dv


def _zero_empty_rows(out_BSNE: jax.Array, mask_BSS: jax.Array | None) -> jax.Array:
    """0 for a query with no key (jax.nn.dot_product_attention averages every key there), as the literal path."""
    if mask_BSS is None:
        return out_BSNE
    return jnp.where(mask_BSS.any(-1)[:, :, None, None], out_BSNE, jnp.zeros((), out_BSNE.dtype))


def _even_lengths(q, k, v, mask_B1TS):
    """cuDNN refuses a bias in training unless both lengths are even (and only says so when differentiating, too
    late to fall back), and in jax 0.11.2 it refused the unmasked causal [1025, 1025] sink problem with the same
    message: append one query (zeros, dropped after) and / or one key (zeros) where a length is odd, the key masked
    out for every query where there is a mask, and with `is_causal` after every real query (so unseen without one)."""
    T, S = q.shape[1], k.shape[1]
    dq, dk = T % 2, S % 2
    if not (dq or dk):
        return q, k, v, mask_B1TS
    pad_k = [(0, 0), (0, dk), (0, 0), (0, 0)]
    mask = None if mask_B1TS is None else jnp.pad(mask_B1TS, [(0, 0), (0, 0), (0, dq), (0, dk)])  # False: unseen
    return jnp.pad(q, [(0, 0), (0, dq), (0, 0), (0, 0)]), jnp.pad(k, pad_k), jnp.pad(v, pad_k), mask


def _warn_fallback(reason: BaseException, shape) -> None:
    warnings.warn(f"cuDNN flash attention refused q {tuple(shape)} ({reason}); this call runs the 'xla' "
                  "implementation instead (same math, [S, S] logits in memory)", RuntimeWarning, stacklevel=3)


def _dpa(q, k, v, mask_BSS, scale: float, window: int | None, implementation: str) -> jax.Array:
    """Causal `jax.nn.dot_product_attention` of equal-head-dim q, k, v (no sinks)."""
    S = q.shape[1]
    mask = None if mask_BSS is None else mask_BSS[:, None]
    lws = None if window is None else (window - 1, 0)
    if implementation == "cudnn":
        try:
            # causal with T == S: an appended key lies after every real query, so no mask is needed to hide it
            qe, ke, ve, me = _even_lengths(q, k, v, mask)
            out = jax.nn.dot_product_attention(qe, ke, ve, mask=me, scale=scale, is_causal=True,
                                               local_window_size=lws, implementation="cudnn")
            return out[:, :S]
        except NotImplementedError as e:  # a shape cuDNN's flash kernel does not take (raised while tracing)
            _warn_fallback(e, q.shape)
    return jax.nn.dot_product_attention(q, k, v, mask=mask, scale=scale, is_causal=True, local_window_size=lws,
                                        implementation="xla")


def _masked_dpa(q, k, v, mask_BHTS, scale: float, implementation: str) -> jax.Array:
    """`jax.nn.dot_product_attention` with an explicit mask only (the sink blocks), cuDNN falling back to xla."""
    if implementation == "cudnn":
        try:
            qe, ke, ve, me = _even_lengths(q, k, v, mask_BHTS)
            return jax.nn.dot_product_attention(qe, ke, ve, mask=me, scale=scale,
                                                implementation="cudnn")[:, :q.shape[1]]
        except NotImplementedError as e:
            _warn_fallback(e, q.shape)
    return jax.nn.dot_product_attention(q, k, v, mask=mask_BHTS, scale=scale, implementation="xla")


# ---- sinks ---------------------------------------------------------------------------------------------------------

def _with_sink(q: jax.Array, k: jax.Array, v: jax.Array, sinks: jax.Array, scale: float
               ) -> tuple[jax.Array, jax.Array, jax.Array]:
    """q [..., L, N, D], k, v [..., Lk, K, D] -> width D + 8 with the sink key at key index 0: q's coordinate D is
    sink_n / scale (per query head, so one sink key serves a GQA group), the sink key's is 1 (its logit is sink_n),
    every other extra entry 0; v gets a zero row for the sink and zero columns (sliced off after)."""
    *lead, L, N, D = q.shape
    dt = q.dtype
    sink_q = jnp.broadcast_to((sinks.astype(_F32) / scale).astype(dt)[:, None], (*lead, L, N, 1))
    q_x = jnp.concatenate([q, sink_q, jnp.zeros((*lead, L, N, _SINK_PAD - 1), dt)], axis=-1)
    pad = [(0, 0)] * (k.ndim - 1)
    sink_key = jnp.zeros((*k.shape[:-3], 1, k.shape[-2], D + _SINK_PAD), dt).at[..., D].set(1)
    k_x = jnp.concatenate([sink_key, jnp.pad(k, pad + [(0, _SINK_PAD)])], axis=-3)
    v_x = jnp.pad(v, [(0, 0)] * (v.ndim - 3) + [(1, 0), (0, 0), (0, _SINK_PAD)])
    return q_x, k_x, v_x


def _sliding_blocks(q: jax.Array, k: jax.Array, v: jax.Array, sinks: jax.Array, mask: jax.Array | None,
                    window: int, scale: float, implementation: str = "xla") -> jax.Array:
    """Sliding-window attention with sinks in query blocks of `window` rows, each against its W + C - 1 keys (as
    torch_impl): logits O(S · W), never [S, S]. The packed-document / padding mask [B, 1, S, S] (None: causal only)
    is gathered per block."""
    B, S, N, D = q.shape
    C = W = window
    nC = -(-S // C)
    Sp, L = nC * C, C + W - 1
    q_blk = jnp.pad(q, [(0, 0), (0, Sp - S), (0, 0), (0, 0)]).reshape(B, nC, C, N, D)
    key_idx = jnp.arange(nC)[:, None] * C + jnp.arange(L)[None, :]  # padded key index of block c, slot j
    k_blk = jnp.pad(k, [(0, 0), (W - 1, Sp - S), (0, 0), (0, 0)])[:, key_idx]  # [B, nC, L, K, D]
    v_blk = jnp.pad(v, [(0, 0), (W - 1, Sp - S), (0, 0), (0, 0)])[:, key_idx]
    q_pos = jnp.arange(nC)[:, None] * C + jnp.arange(C)[None, :]  # [nC, C]
    k_pos = key_idx - (W - 1)  # [nC, L]
    band = ((k_pos[:, None, :] <= q_pos[:, :, None]) & (k_pos[:, None, :] > q_pos[:, :, None] - W)
            & (k_pos[:, None, :] >= 0))
    allowed = jnp.broadcast_to(band[None], (B, nC, C, L))
    if mask is not None:
        allowed = allowed & mask[:, 0][:, jnp.clip(q_pos, 0, S - 1)[:, :, None], jnp.clip(k_pos, 0, S - 1)[:, None, :]]
    allowed = jnp.concatenate([jnp.ones((B, nC, C, 1), bool), allowed], axis=-1)
    q_x, k_x, v_x = _with_sink(q_blk, k_blk, v_blk, sinks, scale)
    out = _masked_dpa(q_x.reshape(B * nC, C, N, -1), k_x.reshape(B * nC, L + 1, *k_x.shape[-2:]),
                      v_x.reshape(B * nC, L + 1, *v_x.shape[-2:]), allowed.reshape(B * nC, 1, C, L + 1), scale,
                      implementation)
    return out[..., :D].reshape(B, Sp, N, D)[:, :S]


def sink_attention(q: jax.Array, k: jax.Array, v: jax.Array, sinks: jax.Array, mask: jax.Array | None, scale: float,
                   window: int | None = None, *, implementation: str = "xla") -> jax.Array:
    """softmax([q·kᵀ·scale | sink_n]) without the sink column, times v: q [B, S, N, D], k, v [B, S, K, Dv] (GQA),
    sinks [N], mask [B, 1, S, S] bool (causal, packed documents, padding) or None (plain causal), `window` (sliding
    layers: keys with q_idx - window < kv_idx <= q_idx) -> [B, S, N, Dv], through `jax.nn.dot_product_attention`
    ("xla" or "cudnn") with the sink as an extra key (the module docstring says why, and why not the lse rescale).

    Sliding layers run in query blocks of one window (`_sliding_blocks`: logits O(S·W)); full layers prepend one
    dummy query, so that the [S+1, S+1] problem (sink key first) is plain causal: `is_causal` in the kernel, and a
    mask only where the model gave one (then [B, 1, S+1, S+1], with an even length for cuDNN)."""
    S = q.shape[1]
    if implementation == "cudnn" and mask is None and lse_attention.ENABLED and q.shape[-1] == v.shape[-1]:
        try:  # the log-sum-exp rescale at the model's head width (`lse_attention`'s docstring)
            return lse_attention.sink_attention_lse(q, k, v, sinks, scale, window, kernels="cudnn")
        except NotImplementedError as e:  # a shape cuDNN's flash kernel does not take (raised while tracing)
            _warn_fallback(e, q.shape)
    q, k, v, Dv = _same_head_dim(q, k, v, "xla")
    if window is not None and window < S:
        return _sliding_blocks(q, k, v, sinks, mask, window, scale, implementation)[..., :Dv]
    q_x, k_x, v_x = _with_sink(q, k, v, sinks, scale)
    q_x = jnp.pad(q_x, [(0, 0), (1, 0), (0, 0), (0, 0)])  # the dummy query 0 sees only the sink (value 0)
    mask_x = None
    if mask is not None:
        first = jnp.zeros((S + 1,), bool).at[0].set(True)  # the dummy row: the sink alone
        rows = jnp.concatenate([jnp.ones((*mask.shape[:-1], 1), bool), mask], axis=-1)
        mask_x = jnp.concatenate([jnp.broadcast_to(first, (mask.shape[0], 1, 1, S + 1)), rows], axis=-2)
    out = _dpa(q_x, k_x, v_x, None if mask_x is None else mask_x[:, 0], scale, None, implementation)
    return out[:, 1:, :, :Dv]
