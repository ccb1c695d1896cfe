"""`jax_impl.models.attention.dot_product_attention`: every implementation against the literal softmax.

Unit level (CPU, fp32): the "xla" implementation (jax.nn.dot_product_attention) equals the literal softmax forward
and backward (dq, dk, dv and, with sinks, dsinks) for GQA, MLA head dims (D ≠ Dv), sliding windows (blocks with a
partial last one), gpt-oss sinks (full and sliding layers), packed documents and left padding (a query with no key
gives 0). The sink as an extra key is the log-sum-exp rescale `out · sigmoid(lse − sink)`; the lse that
`jax.nn.dot_product_attention(return_residual=True)` returns carries no gradient (the reason the rescale is not
built on it), checked so that a JAX release that changes it is noticed. bf16 on CPU: the literal and xla paths are
within the bf16 attention tolerance of the fp32 truth (the size the cuDNN test uses). The "cudnn" path's
bookkeeping (head-dim padding, even lengths under a mask, the sinks' dummy query, blocks, the fallback when cuDNN
refuses a shape) runs on a CPU against a stand-in that enforces cuDNN's shape rules and computes with XLA.
Model level: tiny gpt-oss (sinks, window) gives the same logits and loss with attn_implementation "xla" as with
the literal reference, on a packed, left-padded batch. Selection: "cudnn" is
refused on a CPU with the reason, "auto" picks the reference there.
GPU (`gpu` marker): cuDNN flash attention in bf16 against the fp32 literal softmax of the same bf16 inputs, forward
and backward, on Qwen3-30B-A3B, gpt-oss-20b (sinks, window 128) and DeepSeek-V3 (MLA) head shapes, plain causal and
with a packed/padded mask, and tiny models end to end.
"""

from __future__ import annotations

import numpy as np
import pytest

jax = pytest.importorskip("jax")
pytest.importorskip("flax")
jnp = jax.numpy

from jax_impl.models import lse_attention  # noqa: E402
from jax_impl.models.attention import (  # noqa: E402
    dot_product_attention,
    literal_attention,
    resolve_attn_implementation,
    sink_attention,
)
from jax_impl.models.layers import causal_mask  # noqa: E402
from shared_math.numerics import assert_close  # noqa: E402

# name: (B, S, N, K, D, Dv, window, sinks, mask) with mask "causal" (None: plain causal) or "packed_padded"
CASES = {
    "gqa_window_packed_padded": (2, 12, 4, 2, 16, 16, 5, False, "packed_padded"),
    "mla_dims": (2, 10, 3, 3, 24, 16, None, False, "causal"),
    "sinks_full": (2, 11, 4, 2, 16, 16, None, True, "packed_padded"),
    "sinks_window": (2, 13, 4, 2, 16, 16, 4, True, "causal"),
    "sinks_window_packed_padded": (2, 14, 4, 2, 16, 16, 5, True, "packed_padded"),
}
# only for the cuDNN stand-in: wider than cuDNN's 256
STAND_IN_CASES = {"head_dim_264": (1, 6, 2, 1, 264, 264, None, False, "causal"),
                  # the unmasked full-attention sink problem is [S+1, S+1]: odd here, as gpt-oss's 1025 at S=1024
                  "sinks_full_causal": (1, 10, 4, 2, 16, 16, None, True, "causal")}


def _inputs(case: str, dtype=jnp.float32, seed: int = 0):
    B, S, N, K, D, Dv, window, sinks, mask = {**CASES, **STAND_IN_CASES}[case]
    rng = np.random.default_rng(seed)
    q, k, v = (jnp.asarray(rng.standard_normal(s), dtype) for s in ((B, S, N, D), (B, S, K, D), (B, S, K, Dv)))
    s = jnp.asarray(rng.standard_normal(N), dtype) if sinks else None
    m = None
    if mask == "packed_padded":  # row 0: two documents; row 1: three left-padding positions
        pos = np.tile(np.r_[np.arange(S // 2), np.arange(S - S // 2)], (B, 1))
        pad = np.ones((B, S), bool)
        pad[1, :3] = False
        m = causal_mask(jnp.asarray(pos), jnp.asarray(pad))
    dy = jnp.asarray(rng.standard_normal((B, S, N, Dv)), dtype)
    return (q, k, v, s), dict(scale=D ** -0.5, mask_BSS=m, window=window), dy


def _fn(impl, kw, has_sinks):
    def f(q, k, v, s):
        return dot_product_attention(q, k, v, sinks_N=s if has_sinks else None, implementation=impl, **kw)
    return f


def _fwd_bwd(f, args, dy, has_sinks):
    out, vjp = jax.vjp(f, *args) if has_sinks else jax.vjp(lambda q, k, v: f(q, k, v, None), *args[:3])
    return out, vjp(dy)


@pytest.mark.parametrize("case", list(CASES))
def test_xla_matches_literal_forward_and_backward(case):
    args, kw, dy = _inputs(case)
    has_sinks = args[3] is not None

    @jax.jit  # one compilation for both paths (eager JAX dispatches every op on its own: seconds per case)
    def both(*a):
        return _fwd_bwd(_fn(None, kw, has_sinks), a, dy, has_sinks), _fwd_bwd(_fn("xla", kw, has_sinks), a, dy,
                                                                               has_sinks)

    (want, want_grads), (got, got_grads) = both(*args)
    assert_close(got, want, dtype="float32", quantity="attention", name=f"{case} out")
    for name, g, w in zip("qkvs", got_grads, want_grads):
        assert float(jnp.abs(w).max()) > 0, name
        assert_close(g, w, dtype="float32", quantity="attention_grad", name=f"{case} d{name}")
    if kw["mask_BSS"] is not None:  # left padding: the query rows with no key are exactly 0
        assert float(jnp.abs(got[1, :3]).max()) == 0.0 and float(jnp.abs(want[1, :3]).max()) == 0.0


def test_literal_reference_is_the_softmax_with_a_sink_column():
    """The reference itself, against numpy float64: softmax([scores | sink]) without the sink column, GQA heads
    mapped as HF's repeat_kv, a sliding window and a padded row."""
    args, kw, _ = _inputs("sinks_window_packed_padded")
    q, k, v, s = (np.asarray(a, np.float64) for a in args)
    B, S, N, D = q.shape
    G = N // k.shape[2]
    kr, vr = np.repeat(k, G, axis=2), np.repeat(v, G, axis=2)
    scores = np.einsum("bqnd,bknd->bnqk", q, kr) * kw["scale"]
    idx = np.arange(S)
    allowed = np.asarray(kw["mask_BSS"])[:, None] & (idx[None, :] > idx[:, None] - kw["window"])
    scores = np.where(allowed, scores, -np.inf)
    full = np.concatenate([scores, np.broadcast_to(s[None, :, None, None], (B, N, S, 1))], axis=-1)
    p = np.exp(full - full.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    want = np.einsum("bnqk,bknd->bqnd", p[..., :-1], vr)
    got = jax.jit(lambda q, k, v, s: literal_attention(q, k, v, sinks_N=s, **kw))(*args)
    assert_close(got, want, dtype="float32", quantity="attention", name="literal")


def test_extra_key_sink_is_the_lse_rescale():
    """softmax over [sink | keys] without the sink equals the plain attention times sigmoid(lse − sink), lse the
    log-sum-exp of the plain scores: the identity `sink_attention` realises."""
    args, kw, _ = _inputs("sinks_full")

    @jax.jit
    def both(q, k, v, s):
        plain = literal_attention(q, k, v, scale=kw["scale"], mask_BSS=kw["mask_BSS"])
        scores = jnp.einsum("bqnd,bknd->bnqk", q, jnp.repeat(k, 2, axis=2)) * kw["scale"]
        lse = jax.nn.logsumexp(jnp.where(kw["mask_BSS"][:, None], scores, -jnp.inf), axis=-1).transpose(0, 2, 1)
        rescaled = plain * jax.nn.sigmoid(lse - s)[..., None]  # [B, S, N, 1]
        rescaled = jnp.where(jnp.isfinite(lse)[..., None], rescaled, 0.0)  # a query with no key: 0 either way
        return sink_attention(q, k, v, s, kw["mask_BSS"][:, None], kw["scale"]), rescaled

    got, rescaled = both(*args)
    assert_close(got, rescaled, dtype="float32", quantity="attention", name="extra key vs lse rescale")


def test_public_residual_lse_carries_no_gradient():
    """Why sinks are an extra key and not `out · sigmoid(lse − sink)` on jax.nn.dot_product_attention's residual:
    its lse is stop_gradient-ed (xla; cuDNN's VJP drops its cotangent), so the rescale would lose d lse / d(q, k).
    If a JAX release makes it differentiable, this fails: the rescale could then be built on it."""
    rng = np.random.default_rng(1)
    q = jnp.asarray(rng.standard_normal((1, 6, 2, 8)), jnp.float32)
    k = jnp.asarray(rng.standard_normal((1, 6, 2, 8)), jnp.float32)
    dq = jax.jit(jax.grad(lambda q: jax.nn.dot_product_attention(q, k, k, is_causal=True, return_residual=True,
                                                                  implementation="xla")[1].sum()))(q)
    assert float(jnp.abs(dq).max()) == 0.0


@pytest.mark.parametrize("case", ["sinks_window", "sinks_full_causal"])
def test_sink_lse_rescale_and_its_backward_match_literal(case):
    """`lse_attention.sink_attention_lse` on its reference kernels (the cuDNN path's computations written out: the
    plain attention and its log-sum-exp, the rescale by sigmoid(lse − sink), and the flash backward fed w·dout and
    the rescaled output) against the literal softmax with a sink column, fp32, GQA, a window and an odd length:
    output and the q, k, v and sink gradients. This is the derivation the cuDNN path relies on."""
    from jax_impl.models.lse_attention import sink_attention_lse

    args, kw, dy = _inputs(case)

    @jax.jit
    def both(*a):
        want = _fwd_bwd(_fn(None, kw, True), a, dy, True)
        f = lambda q, k, v, s: sink_attention_lse(q, k, v, s, kw["scale"], kw["window"], kernels="reference")  # noqa: E731
        return want, _fwd_bwd(f, a, dy, True)

    (want, want_grads), (got, got_grads) = both(*args)
    assert_close(got, want, dtype="float32", quantity="attention", name=f"{case} out")
    for name, g, w in zip("qkvs", got_grads, want_grads):
        assert float(jnp.abs(w).max()) > 0, name
        assert_close(g, w, dtype="float32", quantity="attention_grad", name=f"{case} d{name}")


@pytest.mark.parametrize("case", ["sinks_window_packed_padded"])
def test_bf16_within_the_attention_tolerance(case):
    """The bf16 tolerance the cuDNN test uses, met by the paths that run here (they round the probabilities and
    the output as the flash kernel does): bf16 inputs, against the fp32 literal softmax of the same values."""
    args, kw, dy = _inputs(case, jnp.bfloat16, seed=2)
    has_sinks = args[3] is not None

    @jax.jit
    def run(*a):
        up = tuple(None if x is None else x.astype(jnp.float32) for x in a)
        truth = _fwd_bwd(_fn(None, kw, has_sinks), up, dy.astype(jnp.float32), has_sinks)
        return truth, {str(impl): _fwd_bwd(_fn(impl, kw, has_sinks), a, dy, has_sinks) for impl in (None, "xla")}

    (want, want_grads), runs = run(*args)
    for impl, (got, got_grads) in runs.items():
        assert got.dtype == jnp.bfloat16
        assert_close(got.astype(jnp.float32), want, dtype="bfloat16", quantity="attention", name=f"{impl} out")
        for name, g, w in zip("qkv", got_grads, want_grads):
            assert_close(g.astype(jnp.float32), w, dtype="bfloat16", quantity="attention_grad",
                         name=f"{impl} d{name}")


@pytest.mark.parametrize("case, cudnn_runs", [("gqa_window_packed_padded", True), ("mla_dims", True),
                                              ("sinks_full", True), ("sinks_window_packed_padded", True),
                                              ("sinks_full_causal", True), ("head_dim_264", False)])
def test_cudnn_path_bookkeeping_on_cpu(case, cudnn_runs, monkeypatch):
    """What the "cudnn" path hands cuDNN, checked on a CPU: a stand-in for jax.nn.dot_product_attention that
    enforces cuDNN's shape rules (head dim a multiple of 8 and at most 256; both lengths even: jax 0.11.2 asks that
    of a bias in training, and refused the unmasked causal [1025, 1025] sink problem on an H100 too) and then
    computes with XLA. Head dims padded (MLA), odd lengths evened (with a mask or, causal, without), the sink's
    dummy query and windows must give the literal softmax's result, forward and backward (5-row sink blocks against
    10 keys: the query length evened); a shape cuDNN refuses (head dim 264) falls back to XLA with a warning."""
    import warnings

    real = jax.nn.dot_product_attention
    used = []

    def cudnn_stand_in(q, k, v, bias=None, mask=None, *, implementation=None, **kw):
        if implementation == "cudnn":
            D, T, S = q.shape[-1], q.shape[1], k.shape[1]
            if D % 8 or D > 256 or T % 2 or S % 2:
                raise NotImplementedError(f"stand-in cuDNN refuses D={D}, T={T}, S={S}")
            used.append((q.shape, mask is not None))
        return real(q, k, v, bias, mask, implementation="xla", **kw)

    monkeypatch.setattr(jax.nn, "dot_product_attention", cudnn_stand_in)
    # the sink cases without a mask would take the log-sum-exp route, which calls JAX's private cuDNN rules that
    # this stand-in does not replace (its CPU test runs it on reference kernels): here, the padded-key route
    monkeypatch.setattr(lse_attention, "ENABLED", False)
    args, kw, dy = _inputs(case, jnp.bfloat16, seed=5)
    has_sinks = args[3] is not None
    up = tuple(None if a is None else a.astype(jnp.float32) for a in args)
    truth, truth_grads = jax.jit(lambda *a: _fwd_bwd(_fn(None, kw, has_sinks), a, dy.astype(jnp.float32),
                                                     has_sinks))(*up)
    with warnings.catch_warnings(record=True) as caught:  # the choice is made while tracing
        warnings.simplefilter("always")
        got, grads = jax.jit(lambda *a: _fwd_bwd(_fn("cudnn", kw, has_sinks), a, dy, has_sinks))(*args)
    assert bool(used) == cudnn_runs and any("refused" in str(w.message) for w in caught) != cudnn_runs
    assert_close(got.astype(jnp.float32), truth, dtype="bfloat16", quantity="attention", name=case)
    for name, g, w in zip("qkv", grads, truth_grads):
        assert_close(g.astype(jnp.float32), w, dtype="bfloat16", quantity="attention_grad", name=f"{case} d{name}")


def test_implementation_selection_on_cpu():
    if jax.default_backend() == "gpu":
        pytest.skip("checks the CPU refusals")
    with pytest.raises(ValueError, match="needs an NVIDIA GPU"):
        resolve_attn_implementation("cudnn", jnp.bfloat16)
    with pytest.raises(ValueError, match="not one of"):
        resolve_attn_implementation("flash", jnp.bfloat16)
    assert resolve_attn_implementation("auto", jnp.bfloat16) is None
    assert resolve_attn_implementation("xla", jnp.float32) == "xla"


# ---- model level ----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("family", ["gpt_oss"])  # sinks and windows: the most the attention call passes
def test_models_give_the_same_numbers_with_xla_attention(family, tmp_path):
    """The implementation reaches every layer: logits and loss of a packed, left-padded batch with "xla" equal the
    reference's (forward only: the gradients of both paths are compared above, at the attention itself)."""
    from jax_impl import load_model
    from shared_math.checkpoint import write_tiny_checkpoint

    model = load_model(write_tiny_checkpoint(family, tmp_path / family, seed=4))
    rng = np.random.default_rng(0)
    B, S = 2, 20  # longer than gpt-oss's tiny window (8): blocks, with a partial last one
    ids = jnp.asarray(rng.integers(0, 128, (B, S)), jnp.int32)
    labels = ids.at[1, :4].set(-100)
    pos = jnp.asarray(np.tile(np.r_[np.arange(12), np.arange(8)], (B, 1)), jnp.int32)
    pad = jnp.ones((B, S), jnp.int32).at[1, :4].set(0)

    def run():
        from flax import nnx

        graphdef, state = nnx.split(model)  # again after set_attn_implementation: the choice is in the graph
        out = jax.jit(lambda st, *a: nnx.merge(graphdef, st)(a[0], labels=a[1], position_ids=a[2],
                                                             attention_mask=a[3]))(state, ids, labels, pos, pad)
        return out.logits, out.loss

    want = run()
    model.set_attn_implementation("xla")
    assert all(layer.self_attn.attn_implementation == "xla" for layer in model.layers)
    got = run()
    assert_close(got[0], want[0], dtype="float32", quantity="logits", name="logits")
    assert_close(got[1], want[1], dtype="float32", quantity="loss", name="loss")


def test_cudnn_is_refused_before_any_work_on_cpu(tmp_path):
    if jax.default_backend() == "gpu":
        pytest.skip("checks the CPU refusal")
    from jax_impl import load_model
    from shared_math.checkpoint import write_tiny_checkpoint

    path = write_tiny_checkpoint("qwen3_moe", tmp_path / "q")
    with pytest.raises(ValueError, match="needs an NVIDIA GPU"):
        load_model(path, dtype=jnp.bfloat16, attn_implementation="cudnn")


# ---- GPU: cuDNN ---------------------------------------------------------------------------------------------------

# name: (B, S, N, K, D, Dv, window, sinks, packed/padded mask) at full-size head shapes
GPU_CASES = {
    "qwen3_30b_causal": (1, 1024, 32, 4, 128, 128, None, False, False),
    "qwen3_30b_packed_padded_odd": (2, 777, 32, 4, 128, 128, None, False, True),
    "gpt_oss_full_sinks": (1, 1024, 64, 8, 64, 64, None, True, False),
    "gpt_oss_full_sinks_padded": (2, 512, 64, 8, 64, 64, None, True, True),
    "gpt_oss_sliding_sinks": (1, 1000, 64, 8, 64, 64, 128, True, False),
    "deepseek_v3_mla": (1, 512, 16, 16, 192, 128, None, False, False),
}


def _gpu_inputs(case):
    B, S, N, K, D, Dv, window, sinks, masked = GPU_CASES[case]
    rng = np.random.default_rng(3)
    q, k, v = (jnp.asarray(rng.standard_normal(s), jnp.bfloat16) for s in ((B, S, N, D), (B, S, K, D),
                                                                            (B, S, K, Dv)))
    s = jnp.asarray(rng.standard_normal(N), jnp.bfloat16) if sinks else None
    m = None
    if masked:
        pos = np.tile(np.r_[np.arange(S // 3), np.arange(S - S // 3)], (B, 1))
        pad = np.ones((B, S), bool)
        pad[-1, :17] = False
        m = causal_mask(jnp.asarray(pos), jnp.asarray(pad))
    dy = jnp.asarray(rng.standard_normal((B, S, N, Dv)), jnp.bfloat16)
    return (q, k, v, s), dict(scale=D ** -0.5, mask_BSS=m, window=window), dy


# A shape cuDNN refuses falls back to xla with a RuntimeWarning, which this test turns into a failure (the unmasked
# sink problem at S=1024, [1025, 1025], did until odd lengths were evened without a mask too).
@pytest.mark.gpu
@pytest.mark.parametrize("case", list(GPU_CASES))
def test_cudnn_matches_literal_in_bf16(case):
    """cuDNN in bf16 vs the literal softmax in fp32 of the same bf16 inputs, forward and dq, dk, dv, within the bf16
    attention tolerance (1e-2 / 3e-2 of max|expected|: one rounding of the probabilities and the output, and of
    dP / dS in the backward); the literal bf16 path must meet the same bound, so a failure is cuDNN's."""
    if jax.default_backend() != "gpu":
        pytest.skip("needs JAX on a CUDA GPU")
    args, kw, dy = _gpu_inputs(case)
    has_sinks = args[3] is not None
    up = tuple(None if a is None else a.astype(jnp.float32) for a in args)
    truth, truth_grads = jax.jit(lambda *a: _fwd_bwd(_fn(None, kw, has_sinks), a, dy.astype(jnp.float32),
                                                     has_sinks))(*up)
    import warnings

    for impl in ("cudnn", None):
        with warnings.catch_warnings():
            warnings.simplefilter("error", RuntimeWarning)  # a fallback to xla would not test cuDNN
            got, grads = jax.jit(lambda *a, impl=impl: _fwd_bwd(_fn(impl, kw, has_sinks), a, dy, has_sinks))(*args)
        assert_close(got.astype(jnp.float32), truth, dtype="bfloat16", quantity="attention", name=f"{impl} out")
        for name, g, w in zip("qkv", grads, truth_grads):
            assert_close(g.astype(jnp.float32), w, dtype="bfloat16", quantity="attention_grad",
                         name=f"{impl} d{name}")


@pytest.mark.gpu
@pytest.mark.parametrize("family", ["qwen3_moe", "gpt_oss", "deepseek_v3"])
def test_tiny_models_with_cudnn_match_the_literal_path(family, tmp_path):
    """A whole tiny bf16 model with cuDNN attention against the same model with the literal softmax: logits and
    loss within the bf16 model tolerances (both round differently inside attention only)."""
    if jax.default_backend() != "gpu":
        pytest.skip("needs JAX on a CUDA GPU")
    import warnings

    from jax_impl import load_model
    from shared_math.checkpoint import write_tiny_checkpoint

    # every expert routed (K = E, all groups): a tiny random router has near-ties, and with top-2 of 8 a change in the
    # last bf16 bit of the attention output flips expert choices (measured on the H100: logits 0.34-1.6 apart between
    # the literal path and XLA's, not cuDNN's doing); with no choice to flip, the models differ by roundings only
    experts = {"qwen3_moe": dict(num_experts_per_tok=8), "gpt_oss": dict(num_experts_per_tok=8),
               "deepseek_v3": dict(num_experts_per_tok=8, topk_group=4)}[family]
    path = write_tiny_checkpoint(family, tmp_path / family, seed=4, **experts)
    model = load_model(path, dtype=jnp.bfloat16)
    ids = jnp.asarray(np.random.default_rng(0).integers(0, 128, (2, 64)), jnp.int32)
    want = model(ids, labels=ids)
    model.set_attn_implementation("cudnn")
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # a silent fallback to xla would not test cuDNN
        got = model(ids, labels=ids)
    assert_close(got.logits.astype(jnp.float32), want.logits.astype(jnp.float32), dtype="bfloat16",
                 quantity="logits", name="logits")
    assert_close(got.loss, want.loss, dtype="bfloat16", quantity="loss", name="loss")


@pytest.mark.gpu
@pytest.mark.parametrize("window, S", [(None, 300), (128, 300), (None, 301)], ids=["full", "sliding", "odd_length"])
def test_cudnn_sink_lse_matches_literal_in_bf16(window, S):
    """The log-sum-exp sink on JAX's cuDNN kernels (`lse_attention`, the default since this passed on an H100 on
    2026-12-06): gpt-oss's head width 64 and 8 / 2 GQA heads in bf16 against the literal softmax with a sink column in
    fp32 of the same inputs, forward and the q, k, v and sink gradients, within the bf16 attention tolerance."""
    if jax.default_backend() != "gpu":
        pytest.skip("needs JAX on a CUDA GPU")
    from jax_impl.models.lse_attention import sink_attention_lse

    rng = np.random.default_rng(3)
    B, N, K, D = 2, 8, 2, 64
    q, k, v = (jnp.asarray(rng.standard_normal(sh), jnp.bfloat16) for sh in ((B, S, N, D), (B, S, K, D), (B, S, K, D)))
    s = jnp.asarray(rng.standard_normal(N), jnp.bfloat16)
    dy = jnp.asarray(rng.standard_normal((B, S, N, D)), jnp.bfloat16)
    kw = dict(scale=D ** -0.5, mask_BSS=None, window=window)
    up = tuple(a.astype(jnp.float32) for a in (q, k, v, s))
    truth, truth_grads = jax.jit(lambda *a: _fwd_bwd(_fn(None, kw, True), a, dy.astype(jnp.float32), True))(*up)
    f = lambda q, k, v, s: sink_attention_lse(q, k, v, s, kw["scale"], window, kernels="cudnn")  # noqa: E731
    got, grads = jax.jit(lambda *a: _fwd_bwd(f, a, dy, True))(q, k, v, s)
    assert_close(got.astype(jnp.float32), truth, dtype="bfloat16", quantity="attention", name="out")
    for name, g, w in zip("qkvs", grads, truth_grads):
        assert_close(g.astype(jnp.float32), w, dtype="bfloat16", quantity="attention_grad", name=f"d{name}")


def test_attention_bench_jax_rows_on_cpu(tmp_path):
    """benchmarks/attention_bench_jax.py (the JAX side of gpt-oss's attention timings) runs its CPU rows: both
    layer kinds, both CPU paths, a time each, appended to --out."""
    import json

    from benchmarks import attention_bench_jax

    out = tmp_path / "rows.jsonl"
    assert attention_bench_jax.main(["--device", "cpu", "--seq", "64", "--iters", "1", "--out", str(out)]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert {(r["model"], r["impl"]) for r in rows} == {(m, i) for m in ("gpt_oss_20b_full", "gpt_oss_20b_sliding")
                                                       for i in ("sink_reference", "sink_xla")}
    assert all(r["ms"] > 0 and "error" not in r for r in rows)
