"""jax_impl's routed experts (`split_lora_experts`) against the float64 oracle, forward and every gradient.

One suite for every jax backend (Pallas backends slot into BACKEND_PARAMS). fp32 runs on CPU with matmul precision
`highest` (tests/conftest.py); the bf16 variant over cases("gpu") runs on the GPU. Also checked here: the backward
forms no base-weight gradient unless asked, the sort's backward has no scatter-add, and jit does not retrace for a
new batch of the same shape.
"""

from __future__ import annotations

import numpy as np
import pytest

jax = pytest.importorskip("jax")
jnp = pytest.importorskip("jax.numpy")
pytest.importorskip("flax")

from jax_impl.backends import BACKENDS, ENV_VAR, resolve_backend, why_unavailable  # noqa: E402
from jax_impl.moe import sort_by_expert, split_lora_experts  # noqa: E402
from shared_math import reference as ref  # noqa: E402
from shared_math.cases import cases, get_case, make_moe_inputs  # noqa: E402
from shared_math.numerics import assert_close  # noqa: E402
from tests.jax.jax_helpers import DIFF_ARGS, moe_inputs_to_jax  # noqa: E402


def _backend_param(name: str):
    try:
        resolve_backend(name)
        return pytest.param(name)
    except (RuntimeError, ValueError) as e:
        return pytest.param(name, marks=pytest.mark.skip(reason=str(e)))


BACKEND_PARAMS = [_backend_param(n) for n in BACKENDS]

_DIFF = DIFF_ARGS  # differentiable inputs of split_lora_experts, in argument order
_STATIC = ("scale", "activation", "swiglu_limit")


def _as_f64(j: dict) -> dict:
    """The jax inputs back in float64: the reference sees exactly the (rounded) numbers the backend sees."""
    def back(v):
        if v is None:
            return None
        if isinstance(v, tuple):
            return tuple(np.asarray(a.astype(jnp.float32), np.float64) for a in v)
        return np.asarray(v.astype(jnp.float32) if v.dtype != jnp.int32 else v, np.float64)

    return {k: back(v) for k, v in j.items()}


_COMPILED: dict = {}


def _value_and_grads(backend: str, static: tuple, experts=split_lora_experts):
    """jit(value_and_grad) of <y, dy> w.r.t. every differentiable input, one compiled function per static args
    (jit's own cache then keys on shapes), so parametrisations of one shape reuse the compilation. `experts`:
    `split_lora_experts` or a function with its signature."""
    key = (backend, static, experts)
    if key not in _COMPILED:
        scale, activation, limit = static

        def f(diff, expert_ids, dy):
            y = experts(diff["x"], expert_ids, diff["expert_weights"], diff["w_gate_up"], diff["w_down"],
                        diff["lora_gate_up"], diff["lora_down"], scale=scale, biases=diff["biases"],
                        activation=activation, swiglu_limit=limit, backend=backend)
            return jnp.sum(y.astype(jnp.float32) * dy), y

        _COMPILED[key] = jax.jit(jax.value_and_grad(f, has_aux=True))
    return _COMPILED[key]


def _check_case(case, backend: str, dtype, dtype_name: str, seed: int, experts=split_lora_experts) -> None:
    inp = make_moe_inputs(case, seed=seed)
    j = moe_inputs_to_jax(inp, dtype)
    r = _as_f64(j)
    dy = np.random.default_rng(seed + 1).standard_normal((case.T, case.H))
    fn = _value_and_grads(backend, tuple(inp[k] for k in _STATIC), experts)
    (_, y), g = fn({k: j[k] for k in _DIFF}, j["expert_ids"], jnp.asarray(dy, jnp.float32))

    kw = dict(scale=inp["scale"], biases=r["biases"], activation=inp["activation"], swiglu_limit=inp["swiglu_limit"])
    args = (r["x"], r["expert_ids"].astype(np.int64), r["expert_weights"], r["w_gate_up"], r["w_down"],
            r["lora_gate_up"], r["lora_down"])
    assert y.dtype == dtype
    assert_close(y, ref.split_lora_experts(*args, **kw), dtype=dtype_name, quantity="moe_block", name="y")
    want = ref.split_lora_experts_vjp(*args, **kw, dy=dy)
    for name in _DIFF:
        if want[name] is None:
            assert g[name] is None
            continue
        got, exp = (g[name], want[name]) if isinstance(want[name], tuple) else ((g[name],), (want[name],))
        for i, (a, e) in enumerate(zip(got, exp)):
            assert_close(a, e, dtype=dtype_name, quantity="moe_grad", name=f"d{name}[{i}]")


@pytest.mark.parametrize("backend", BACKEND_PARAMS)
@pytest.mark.parametrize("case", cases("ci"), ids=lambda c: c.name)
def test_split_lora_experts_fp32(case, backend, seed):
    reason = why_unavailable(backend, None, jnp.float32)  # pallas_mosaic on a GPU: wgmma would run fp32 as TF32
    if reason:
        pytest.skip(reason)
    _check_case(case, backend, jnp.float32, "float32", seed)


# oai_biases clamps at limit 1.0: in bf16 the pre-activation rounds across the clamp, which switches that entry's
# gradient on or off, an O(1) change the float64 oracle cannot mirror (the torch suite marks it the same way). On
# the H200 (2026-11-28) ragged_dot passed it and pallas_triton did not; the clamps are checked in fp32 on CPU.
_GPU_CASES = [pytest.param(c, marks=pytest.mark.xfail(reason="bf16 rounding crosses the clamp at limit 1.0",
                                                      strict=False))
              if c.name == "oai_biases" else c for c in cases("gpu")]


@pytest.mark.gpu
@pytest.mark.parametrize("backend", BACKEND_PARAMS)
@pytest.mark.parametrize("case", _GPU_CASES, ids=lambda c: getattr(c, "name", None))
def test_split_lora_experts_bf16_gpu(case, backend, seed):
    _check_case(case, backend, jnp.bfloat16, "bfloat16", seed)


# ---- structure of the computation ------------------------------------------------------------------------------------

def _jaxpr_eqns(jaxpr):
    """Every equation of a closed jaxpr, recursing into sub-jaxprs (custom_vjp, pjit)."""
    for eqn in jaxpr.eqns:
        yield eqn
        for p in eqn.params.values():
            subs = p if isinstance(p, (list, tuple)) else (p,)
            for s in subs:
                inner = getattr(s, "jaxpr", None)
                if inner is not None:
                    yield from _jaxpr_eqns(inner if hasattr(inner, "eqns") else inner.jaxpr)
                elif hasattr(s, "eqns"):
                    yield from _jaxpr_eqns(s)


def _lora_grad_jaxpr(wrt: tuple[str, ...]):
    case = get_case("prime_e")  # E=7, H=32, 2I=48, R=4: weight shapes distinct from every other array
    j = moe_inputs_to_jax(make_moe_inputs(case), jnp.float32)

    def loss(diff, frozen):
        a = {**frozen, **diff}
        return split_lora_experts(a["x"], j["expert_ids"], a["expert_weights"], a["w_gate_up"], a["w_down"],
                                  a["lora_gate_up"], a["lora_down"], scale=0.5, backend="ragged_dot").sum()

    diff = {k: j[k] for k in wrt}
    frozen = {k: j[k] for k in _DIFF if k not in wrt}
    return jax.make_jaxpr(jax.grad(loss))(diff, frozen), j


def test_frozen_base_weights_get_no_gradient_gemm():
    """Differentiating LoRA and x forms no [E, H, 2I] / [E, I, H] array; asking for dW forms both."""
    lora_only, j = _lora_grad_jaxpr(("x", "expert_weights", "lora_gate_up", "lora_down"))
    with_w, _ = _lora_grad_jaxpr(("x", "expert_weights", "lora_gate_up", "lora_down", "w_gate_up", "w_down"))
    weight_shapes = {tuple(j["w_gate_up"].shape), tuple(j["w_down"].shape)}

    def produced(jaxpr):
        return {tuple(v.aval.shape) for e in _jaxpr_eqns(jaxpr.jaxpr) for v in e.outvars} & weight_shapes

    assert produced(lora_only) == set()
    assert produced(with_w) == weight_shapes


def test_sort_backward_is_gather_only():
    """No scatter-add anywhere in forward + backward w.r.t. x, weights and LoRA (the sort's VJP is a gather)."""
    jaxpr, _ = _lora_grad_jaxpr(("x", "expert_weights", "lora_gate_up", "lora_down"))
    prims = {e.primitive.name for e in _jaxpr_eqns(jaxpr.jaxpr)}
    assert "scatter-add" not in prims and "scatter_add" not in prims, sorted(prims)
    assert "ragged_dot_general" in prims


def test_no_retrace_for_new_batch_of_same_shape():
    case = get_case("tiny")
    traces = []

    @jax.jit
    def f(j):
        traces.append(1)
        return jax.grad(lambda lg: split_lora_experts(j["x"], j["expert_ids"], j["expert_weights"], j["w_gate_up"],
                                                      j["w_down"], lg, j["lora_down"], scale=0.5).sum())(
            j["lora_gate_up"])

    for seed in (0, 1, 2):
        inp = make_moe_inputs(case, seed=seed)
        j = moe_inputs_to_jax(inp, jnp.float32)
        j["biases"] = None
        jax.block_until_ready(f(j))
    assert len(traces) == 1


def test_sort_by_expert_matches_reference():
    case = get_case("empty_experts")
    ids = make_moe_inputs(case)["expert_ids"]
    srt = sort_by_expert(jnp.asarray(ids, jnp.int32), case.E)
    want = ref.sort_by_expert(ids, case.E)
    np.testing.assert_array_equal(np.asarray(srt.order_M), want.order_M)
    np.testing.assert_array_equal(np.asarray(srt.group_sizes_E), want.group_sizes_E)
    np.testing.assert_array_equal(np.asarray(srt.inverse_M), np.argsort(want.order_M))
    assert [int(g) for g in np.asarray(srt.group_sizes_E)[[0, 3, 4, 7]]] == [0, 0, 0, 0]


def test_resolve_backend(monkeypatch):
    monkeypatch.delenv(ENV_VAR, raising=False)
    assert resolve_backend("auto") in BACKENDS
    assert resolve_backend("ragged_dot") == "ragged_dot"
    with pytest.raises(ValueError, match="not a jax MoE backend"):
        resolve_backend("grouped_mm")
    if jax.default_backend() != "gpu":
        with pytest.raises(RuntimeError, match="Hopper"):
            resolve_backend("pallas_mosaic")
    monkeypatch.setenv(ENV_VAR, "nope")
    with pytest.raises(ValueError, match=ENV_VAR):
        resolve_backend("auto")
    assert resolve_backend("ragged_dot") == "ragged_dot"  # an explicit name beats the environment
    monkeypatch.setenv(ENV_VAR, "ragged_dot")
    assert resolve_backend("auto") == "ragged_dot"


def test_tokamax_backend_says_which_implementation_and_refuses_bad_input(monkeypatch):
    """The `tokamax` backend asks tokamax for XLA on CPU and in fp32 (exact), for Mosaic then Triton on a GPU in 16
    bits; SPLITMOE_TOKAMAX_IMPL forces one and a wrong value is refused with the choices; a missing package is
    refused with the pip command, not an ImportError from inside a jitted step."""
    import builtins

    from jax_impl.backends import tokamax_ragged_dot as tk

    monkeypatch.delenv(tk.IMPL_ENV_VAR, raising=False)
    gpu = jax.default_backend() == "gpu"
    assert tk.implementation(jnp.float32) == "xla"
    assert tk.implementation(jnp.bfloat16) == (("mosaic", "triton") if gpu else "xla")
    monkeypatch.setenv(tk.IMPL_ENV_VAR, "triton")
    assert tk.implementation(jnp.bfloat16) == "triton"
    monkeypatch.setenv(tk.IMPL_ENV_VAR, "cutlass")
    with pytest.raises(RuntimeError, match="SPLITMOE_TOKAMAX_IMPL='cutlass' is not one of mosaic, triton, xla"):
        resolve_backend("tokamax")
    monkeypatch.delenv(tk.IMPL_ENV_VAR)

    real_import = builtins.__import__

    def no_tokamax(name, *args, **kwargs):
        if name == "tokamax":
            raise ImportError("No module named 'tokamax'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_tokamax)
    with pytest.raises(RuntimeError, match="pip install 'splitmoe\\[tokamax\\]'"):
        resolve_backend("tokamax")


def test_tokamax_backend_asks_only_for_kernels_that_trace(monkeypatch):
    """On a GPU the backend probes each of tokamax's kernels once and asks only for those that trace; with none (the
    H100 with jax 0.11.2 and tokamax 0.0.12: both failed inside their trace) it is unavailable, naming each error and
    the XLA path, instead of failing inside a step's trace. The GPU and the probe's answers are stood in for."""
    from jax_impl.backends import tokamax_ragged_dot as tk

    monkeypatch.delenv(tk.IMPL_ENV_VAR, raising=False)
    monkeypatch.setattr(tk.jax, "default_backend", lambda: "gpu")
    errors = {"mosaic": "TypeError: Mesh.__init__() got an unexpected keyword argument 'out_shape'", "triton": None}
    monkeypatch.setattr(tk, "_trace_error", lambda impl, dtype_name: errors.get(impl))
    assert tk.implementation(jnp.bfloat16) == "triton" and tk.unavailable_reason(jnp.bfloat16) is None
    errors["triton"] = "AttributeError: pl.dot was deprecated in JAX v0.11.0"
    reason = tk.unavailable_reason(jnp.bfloat16)
    assert "mosaic: TypeError: Mesh" in reason and "triton: AttributeError: pl.dot" in reason
    assert "SPLITMOE_TOKAMAX_IMPL=xla" in reason
    assert tk.unavailable_reason(jnp.float32) is None  # fp32 asks for XLA's path, which is not probed


# gpu_medium (4000 rows, groups of about 250): the case whose dW came out wrong on the H100 from tokamax's Mosaic
# per-group kernel (session 28); here it shows the padding is not why (about 5 s in fp32 on the CPU).
@pytest.mark.parametrize("case", [get_case(n) for n in ("odd_dims", "empty_experts", "k1", "skewed", "gpu_medium")],
                         ids=lambda c: c.name)
def test_tokamax_mosaic_operands_are_padded_to_whole_tiles(case, monkeypatch, seed):
    """tokamax's Mosaic kernels refuse operands that are not whole 128-byte tiles (on the H100 in session 26 every
    bf16 gpu test failed on "dimension 1 must have size smaller or a multiple of its tiling 64, but got 4000"). With
    Mosaic asked for, the backend pads every non-group axis and cuts the result back: here tokamax's entry point is
    stood in for by a checker of that rule around lax.ragged_dot_general (what the kernel computes), and forward and
    every gradient still match the float64 oracle, empty experts and odd widths included. The per-group form (the
    gradients' products) asks for Triton instead, unpadded."""
    tokamax = pytest.importorskip("tokamax")
    from jax_impl.backends import tokamax_ragged_dot as tk

    seen = []

    def mosaic_stand_in(lhs, rhs, group_sizes, dims, *, preferred_element_type, implementation):
        if "mosaic" in implementation:
            tile = tk._TILE_BYTES // lhs.dtype.itemsize
            sizes = [d for ax, d in enumerate(rhs.shape) if ax not in dims.rhs_group_dimensions] + list(lhs.shape)
            bad = [d for d in sizes if d % tile and not (d < tile and d & (d - 1) == 0)]
            assert not bad, f"{implementation} given axes {bad}, not whole {tile}-element tiles"
        seen.append((tk._is_per_group(dims), implementation))
        return jax.lax.ragged_dot_general(lhs, rhs, group_sizes, dims, preferred_element_type=preferred_element_type)

    monkeypatch.delenv(tk.IMPL_ENV_VAR, raising=False)
    monkeypatch.setattr(tk, "implementation", lambda dtype: ("mosaic", "triton"))
    monkeypatch.setattr(tk, "_per_group_trace_error", lambda impl, dtype_name: None)  # a GPU where Triton traces
    monkeypatch.setattr(tokamax, "ragged_dot_general", mosaic_stand_in)
    _COMPILED.clear()  # compiled with the real entry point by other tests
    try:
        _check_case(case, "tokamax", jnp.float32, "float32", seed)
    finally:
        _COMPILED.clear()
    assert set(seen) == {(False, ("mosaic", "triton")), (True, "triton")}


def test_tokamax_triton_per_group_kernel_leaves_no_garbage_in_empty_experts(monkeypatch, seed):
    """tokamax's own Triton kernel for the per-group form (what that form asks for on a GPU now), run under Pallas's
    interpreter on the CPU: an empty group's product comes back as rows from before the group, not zeros, so the
    backend zeroes empty groups' products. Forward and every gradient of `empty_experts` (experts 0, 3, 4 and 7 get no
    rows, first and last included) match the float64 oracle."""
    tokamax = pytest.importorskip("tokamax")
    pt = pytest.importorskip("tokamax._src.ops.ragged_dot.pallas_triton")
    block = pytest.importorskip("tokamax._src.pallas.block")
    kernel = getattr(pt, "_ragged_contracting_dim_dot", None)  # private: this test follows tokamax's layout
    if kernel is None:
        pytest.skip("this tokamax has no _ragged_contracting_dim_dot")
    from tokamax._src.ops.ragged_dot import base

    from jax_impl.backends import tokamax_ragged_dot as tk

    pallas_call = block.pl.pallas_call
    monkeypatch.setattr(block.pl, "pallas_call", lambda *a, **k: pallas_call(*a, **{**k, "interpret": True}))
    ran = []

    def stand_in(lhs, rhs, group_sizes, dims, *, preferred_element_type, implementation):
        if implementation == "triton" and dims == base.RAGGED_CONTRACTING_DOT_DIM_NUMS:
            ran.append(implementation)
            return kernel(lhs, rhs, group_sizes=group_sizes, ragged_dot_dimension_numbers=dims,
                          precision=jax.lax.Precision.HIGHEST, out_dtype=jnp.dtype(preferred_element_type),
                          config=pt.Config(block_m=32, block_n=32, block_k=16, split_k=1, num_warps=4, num_stages=2))
        return jax.lax.ragged_dot_general(lhs, rhs, group_sizes, dims, preferred_element_type=preferred_element_type)

    monkeypatch.delenv(tk.IMPL_ENV_VAR, raising=False)
    monkeypatch.setattr(tk, "implementation", lambda dtype: "triton")
    monkeypatch.setattr(tk, "_per_group_trace_error", lambda impl, dtype_name: None)  # a GPU where Triton traces
    monkeypatch.setattr(tokamax, "ragged_dot_general", stand_in)
    _COMPILED.clear()
    try:
        _check_case(get_case("empty_experts"), "tokamax", jnp.float32, "float32", seed)
    finally:
        _COMPILED.clear()
    assert ran  # the LoRA and weight gradients' products went through tokamax's kernel


def test_tokamax_per_group_form_is_not_asked_of_mosaic(monkeypatch):
    """The per-group form (rows contracted) leaves Mosaic out unless SPLITMOE_TOKAMAX_IMPL forces it: the next
    kernel that traces, else XLA's path; the two row forms are not per-group."""
    from jax_impl.backends import ragged_dot as rd
    from jax_impl.backends import tokamax_ragged_dot as tk

    assert tk._is_per_group(rd._PER_GROUP) and not tk._is_per_group(rd._ROWS) and not tk._is_per_group(rd._ROWS_T)
    monkeypatch.delenv(tk.IMPL_ENV_VAR, raising=False)
    errors = {"mosaic": None, "triton": None}  # the per-group probe's answers, stood in for (it needs a GPU)
    monkeypatch.setattr(tk, "_per_group_trace_error", lambda impl, dtype_name: errors.get(impl))
    bf = jnp.bfloat16
    assert tk._per_group_implementation(("mosaic", "triton"), bf) == "triton"
    assert tk._per_group_implementation("mosaic", bf) == "xla"
    assert tk._per_group_implementation("triton", bf) == "triton" and tk._per_group_implementation("xla", bf) == "xla"
    errors["triton"] = "AttributeError: the per-group kernel does not trace"  # then XLA's path, not a failing step
    assert tk._per_group_implementation(("mosaic", "triton"), bf) == "xla"
    monkeypatch.setenv(tk.IMPL_ENV_VAR, "mosaic")  # forced: every form, to time or reproduce it
    assert tk._per_group_implementation("mosaic", bf) == "mosaic"


def test_tokamax_mosaic_padding_leaves_full_size_shapes_alone():
    """The padding above costs a copy per dot: at the benchmark shapes (Qwen3-30B-A3B and gpt-oss-20b, T=16384,
    r=64) every operand is already whole tiles, so none is made and tokamax is timed as it is."""
    pytest.importorskip("tokamax")
    from jax_impl.backends import ragged_dot as rd
    from jax_impl.backends import tokamax_ragged_dot as tk

    S = jax.ShapeDtypeStruct
    for name in ("qwen3_30b_T16384", "gpt_oss_20b_T16384"):
        c = get_case(name)
        M, bf, g = c.T * c.K, jnp.bfloat16, S((c.E,), jnp.int32)
        forms = [(S((M, c.H), bf), S((c.E, c.H, 2 * c.I), bf), rd._ROWS),
                 (S((M, c.R), bf), S((c.E, c.R, c.H), bf), rd._ROWS),
                 (S((M, c.H), bf), S((c.E, c.I, c.H), bf), rd._ROWS_T),
                 (S((M, c.H), bf), S((M, c.R), bf), rd._PER_GROUP)]
        for lhs, rhs, dims in forms:
            assert tk._pad_for_mosaic(lhs, rhs, g, dims)[3] is None, (name, lhs.shape, rhs.shape)
    assert tk._padded(4000, 64) == 4032 and tk._padded(16, 64) == 16 and tk._padded(4, 64) == 64


@pytest.mark.gpu
@pytest.mark.parametrize("name", ["qwen3_30b_T1024", "gpt_oss_20b_T1024", "gpt_oss_20b_T4096"])
def test_pallas_benchmark_shapes_agree_with_ragged_dot_bf16_gpu(name, seed):
    """At the real expert shapes, with the shipped tuned configs (jax_impl/kernels/tuned_configs.json: tiles and
    z_pre choices the small cases do not reach), the fused Pallas path agrees with stock ragged_dot in bf16.
    gpt-oss shapes run with swiglu_limit=100, for the reason given in the torch twin of this test
    (tests/torch/test_triton_kernels.py: bf16 rounding crossing the clamp in ~20M entries)."""
    if "pallas_triton" not in BACKENDS or jax.default_backend() != "gpu":
        pytest.skip("needs the pallas_triton backend on a GPU")
    c = get_case(name)
    k = iter(jax.random.split(jax.random.PRNGKey(seed % 2**31), 12))
    bf = jnp.bfloat16

    def rnd(shape, fan_in=1.0):
        return (jax.random.normal(next(k), shape) / fan_in**0.5).astype(bf)

    w, ids = jax.lax.top_k(jax.nn.softmax(jax.random.normal(next(k), (c.T, c.E))), c.K)
    diff = dict(x=rnd((c.T, c.H)), ew=(w / w.sum(-1, keepdims=True)).astype(bf),
                lora=(rnd((c.E, c.H, c.R), c.H), rnd((c.E, c.R, 2 * c.I), c.R), rnd((c.E, c.I, c.R), c.I),
                      rnd((c.E, c.R, c.H), c.R)))
    frozen = dict(wgu=rnd((c.E, c.H, 2 * c.I), c.H), wd=rnd((c.E, c.I, c.H), c.I),
                  b=(rnd((c.E, 2 * c.I)), rnd((c.E, c.H))) if c.biases else None)
    dy = rnd((c.T, c.H))

    def run(backend):
        def f(d):
            a1, b1, a2, b2 = d["lora"]
            return split_lora_experts(d["x"], ids, d["ew"], frozen["wgu"], frozen["wd"], (a1, b1), (a2, b2),
                                      scale=2.0, biases=frozen["b"], activation=c.activation,
                                      swiglu_limit=100.0, backend=backend)
        y, vjp = jax.vjp(jax.jit(f), diff)
        return y, vjp(dy)[0]

    (y0, g0), (y1, g1) = run("pallas_triton"), run("ragged_dot")
    assert_close(np.asarray(y0, np.float64), np.asarray(y1, np.float64), dtype="bfloat16", quantity="moe_block",
                 name=f"{name} y")
    for path, a in jax.tree_util.tree_leaves_with_path(g0):
        b = g1
        for p in path:
            b = b[p.key] if hasattr(p, "key") else b[p.idx]
        assert_close(np.asarray(a, np.float64), np.asarray(b, np.float64), dtype="bfloat16", quantity="moe_grad",
                     name=f"{name} d{jax.tree_util.keystr(path)}")
