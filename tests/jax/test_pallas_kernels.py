"""The Pallas split-LoRA kernels (backend `pallas_triton`) against the float64 oracle and the `ragged_dot` backend.

CPU: the kernels run in Pallas interpret mode (`SPLITMOE_PALLAS_INTERPRET=1`, set per test) in fp32, over
`cases("ci")`, forward and every gradient (x, expert_weights, both LoRA pairs, biases, and the base weights as in
full fine-tuning). Interpret mode is slow to compile, not to run: each case's value-and-grad is compiled once with
XLA's backend optimisations off (the kernels' arithmetic is unchanged; only the CPU code generation is plainer) and
reused for a second routing of the same shape. The same checks run with `z_pre` (LoRA z by its own skinny launch)
forced into the interpret configs, against the reference and against the in-loop z. GPU (`gpu` marker): the same
checks in bf16 over `cases("gpu")`, compiled by the Triton lowering, no interpret mode.
"""

from __future__ import annotations

import json
import os
from dataclasses import replace

import numpy as np
import pytest

jax = pytest.importorskip("jax")
jnp = pytest.importorskip("jax.numpy")
pytest.importorskip("flax")

from jax_impl.backends import pallas_triton as pt  # noqa: E402
from jax_impl.backends import resolve_backend  # noqa: E402
from jax_impl.kernels import autotune  # noqa: E402
from jax_impl.kernels import grouped_gemm as gg  # noqa: E402
from jax_impl.moe import split_lora_experts as moe_split_lora_experts  # noqa: E402
from shared_math import reference as ref  # noqa: E402
from shared_math.cases import cases, get_case, make_moe_inputs  # noqa: E402
from shared_math.numerics import assert_close  # noqa: E402
from shared_math.tuning import split_chunks  # noqa: E402
from tests.jax.jax_helpers import DIFF_ARGS, moe_inputs_to_jax  # noqa: E402

_DIFF = DIFF_ARGS
_LORA_TRAINING = ("x", "expert_weights", "lora_gate_up", "lora_down")
_ON_GPU = jax.default_backend() == "gpu"
# interpret mode only: XLA's CPU backend optimisations take ~20 s per case on the interpreted kernels and buy nothing
_FAST_COMPILE = {"xla_backend_optimization_level": 0}


@pytest.fixture
def interpret(monkeypatch):
    monkeypatch.setenv(pt.INTERPRET_ENV, "1")
    monkeypatch.delenv("SPLITMOE_MOE_BACKEND", raising=False)


def _force_z_pre(monkeypatch, on: bool = True):
    """Every NN pass with LoRA computes z by its own skinny launch (the interpret configs are what get_config
    returns in interpret mode)."""
    monkeypatch.setattr(autotune, "INTERPRET_CONFIGS", {
        k: replace(c, z_pre=on) if k in autotune.NN_KINDS else c for k, c in autotune.INTERPRET_CONFIGS.items()})


def _f64(v):
    if v is None:
        return None
    if isinstance(v, tuple):
        return tuple(_f64(a) for a in v)
    return np.asarray(jnp.asarray(v, jnp.float32), np.float64)


_COMPILED: dict = {}


def _value_and_grads(entry: str, wrt: tuple[str, ...], static: tuple, j: dict):
    """Compiled value_and_grad of <y, dy> w.r.t. `wrt`, cached per (entry point, wrt, static args, shapes)."""
    shapes = jax.tree_util.tree_map(lambda a: (a.shape, a.dtype), j)
    # configs and the SPLITMOE_JAX_* switches are read at trace time: a different table or switch is a different
    # executable
    switches = tuple(sorted((k, v) for k, v in os.environ.items() if k.startswith("SPLITMOE_JAX_")))
    key = (entry, wrt, static, str(shapes), tuple(sorted(autotune.INTERPRET_CONFIGS.items())), switches)
    if key not in _COMPILED:
        scale, activation, limit = static

        def f(diff, frozen, expert_ids, dy):
            a = {**frozen, **diff}
            kw = dict(scale=scale, biases=a["biases"], activation=activation, swiglu_limit=limit)
            args = (a["x"], expert_ids, a["expert_weights"], a["w_gate_up"], a["w_down"], a["lora_gate_up"],
                    a["lora_down"])
            if entry == "fused":
                y = pt.split_lora_experts(*args, **kw)
            else:  # the backend interface through jax_impl.moe (entry is the backend name)
                y = moe_split_lora_experts(*args, **kw, backend=entry)
            return jnp.sum(y.astype(jnp.float32) * dy), y

        diff = {k: j[k] for k in wrt}
        frozen = {k: j[k] for k in _DIFF if k not in wrt}
        dy = jnp.zeros(j["x"].shape, jnp.float32)
        lowered = jax.jit(jax.value_and_grad(f, has_aux=True)).lower(diff, frozen, j["expert_ids"], dy)
        _COMPILED[key] = lowered.compile(compiler_options=None if _ON_GPU else _FAST_COMPILE)

    def run(j, dy):
        (_, y), g = _COMPILED[key]({k: j[k] for k in wrt}, {k: j[k] for k in _DIFF if k not in wrt},
                                   j["expert_ids"], jnp.asarray(dy, jnp.float32))
        return y, g

    return run


def _inputs(case, seed: int, dtype):
    inp = make_moe_inputs(case, seed=seed)
    j = moe_inputs_to_jax(inp, dtype)
    static = (inp["scale"], inp["activation"], inp["swiglu_limit"])
    dy = np.random.default_rng(seed + 1).standard_normal((case.T, case.H))
    return inp, j, static, dy


def _check_against_reference(case, j, static, dy, y, g, wrt, dtype_name):
    scale, activation, limit = static
    r = {k: _f64(j[k]) for k in _DIFF}
    kw = dict(scale=scale, biases=r["biases"], activation=activation, swiglu_limit=limit)
    args = (r["x"], np.asarray(j["expert_ids"]).astype(np.int64), r["expert_weights"], r["w_gate_up"], r["w_down"],
            r["lora_gate_up"], r["lora_down"])
    assert_close(y, ref.split_lora_experts(*args, **kw), dtype=dtype_name, quantity="moe_block", name="y")
    want = ref.split_lora_experts_vjp(*args, **kw, dy=dy)
    for name in wrt:
        if want[name] is None:
            assert g[name] is None
            continue
        got, exp = (g[name], want[name]) if isinstance(want[name], tuple) else ((g[name],), (want[name],))
        inputs = j[name] if isinstance(j[name], tuple) else (j[name],)
        for i, (a, e) in enumerate(zip(got, exp)):
            assert a.dtype == inputs[i].dtype, f"d{name}[{i}] comes back in {a.dtype}, not its input's dtype"
            assert_close(a, e, dtype=dtype_name, quantity="moe_grad", name=f"d{name}[{i}]")


# ---- the fused custom_vjp against the float64 oracle -----------------------------------------------------------------

@pytest.mark.parametrize("case", cases("ci"), ids=lambda c: c.name)
def test_fused_full_finetune_fp32(case, seed, interpret):
    """Forward and the gradient of every input (base weights included) against the float64 reference."""
    inp, j, static, dy = _inputs(case, seed, jnp.float32)
    run = _value_and_grads("fused", _DIFF, static, j)
    y, g = run(j, dy)
    assert y.dtype == jnp.float32
    _check_against_reference(case, j, static, dy, y, g, _DIFF, "float32")


def _assert_same(a, b, name):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6 * max(1.0, float(np.abs(b).max(initial=0.0))), err_msg=name)


@pytest.mark.parametrize("case", cases("ci"), ids=lambda c: c.name)
def test_fused_z_pre_fp32(case, seed, interpret, monkeypatch):
    """z_pre (z = x·A by a skinny launch before each NN pass, then the given-z kernel): forward and every gradient
    against the float64 reference, and equal to the in-loop z (same products, same summation order, same rounding
    points), so the z saved for the backward means the same."""
    _, j, static, dy = _inputs(case, seed, jnp.float32)
    y0, g0 = _value_and_grads("fused", _DIFF, static, j)(j, dy)
    _force_z_pre(monkeypatch)
    y, g = _value_and_grads("fused", _DIFF, static, j)(j, dy)
    _check_against_reference(case, j, static, dy, y, g, _DIFF, "float32")
    _assert_same(y, y0, "y")
    for name in _DIFF:
        for i, (a, b) in enumerate(zip(jax.tree_util.tree_leaves(g[name]), jax.tree_util.tree_leaves(g0[name]))):
            _assert_same(a, b, f"d{name}[{i}]")


def test_z_pre_lora_only_and_backend_interface(seed, interpret, monkeypatch):
    """z_pre through the dZ1-only backward (x frozen) and through the sorted-rows backend interface."""
    _force_z_pre(monkeypatch)
    case = get_case("prime_e")
    _, j, static, dy = _inputs(case, seed, jnp.float32)
    wrt = ("lora_gate_up", "lora_down")
    y, g = _value_and_grads("fused", wrt, static, j)(j, dy)
    _check_against_reference(case, j, static, dy, y, g, wrt, "float32")
    case = get_case("oai_biases")
    _, j, static, dy = _inputs(case, seed, jnp.float32)
    y, g = _value_and_grads("pallas_triton", _LORA_TRAINING, static, j)(j, dy)
    y_rd, g_rd = _value_and_grads("ragged_dot", _LORA_TRAINING, static, j)(j, dy)
    _assert_outputs_close((y, g), (y_rd, g_rd), _LORA_TRAINING, "float32")


def _assert_outputs_close(got, want, names, dtype_name: str) -> None:
    """(y, grads) of one backend against another's: y as a block output, every gradient leaf of `names`."""
    (y, g), (y_ref, g_ref) = got, want
    assert_close(y, y_ref, dtype=dtype_name, quantity="moe_block", name="y")
    for name in names:
        for i, (a, b) in enumerate(zip(jax.tree_util.tree_leaves(g[name]), jax.tree_util.tree_leaves(g_ref[name]))):
            assert_close(a, b, dtype=dtype_name, quantity="moe_grad", name=f"d{name}[{i}]")


def test_given_z_equals_in_loop_z():
    """The launcher-level contract: z from the skinny launch (gathered rows, z_scale) is the z the in-loop path
    stores, and the given-z kernel adds lora_scale·z@B as the in-loop one does; z_pre and lora_a=None+z agree."""
    rng = np.random.default_rng(0)
    T, H, N, E, K, R = 13, 45, 27, 5, 2, 3
    x = jnp.asarray(rng.standard_normal((T, H)), jnp.float32)
    ids = rng.integers(0, E - 1, (T, K))  # the last expert stays empty
    from jax_impl.kernels import split_lora as sl
    srt = sl.sort_rows(jnp.asarray(ids, jnp.int32), E)
    w, la, lb = (jnp.asarray(rng.standard_normal(sh), jnp.float32) for sh in ((E, H, N), (E, H, R), (E, R, N)))
    cfg = autotune.INTERPRET_CONFIGS["gemm"]
    kw = dict(n=N, interpret=True, row_index=srt.token_M, lora_b=lb, store_z=True, z_scale=0.5, lora_scale=2.0)
    out0, z0 = gg.grouped_gemm(x, w, srt.offsets_E1, cfg=cfg, lora_a=la, **kw)
    out1, z1 = gg.grouped_gemm(x, w, srt.offsets_E1, cfg=replace(cfg, z_pre=True), lora_a=la, **kw)
    out2, z2 = gg.grouped_gemm(x, w, srt.offsets_E1, cfg=cfg, z=z0, **kw)
    for o, zz in ((out1, z1), (out2, z2)):
        _assert_same(zz, z0, "z")
        _assert_same(o, out0, "out")
    xs = np.asarray(x, np.float64)[np.asarray(srt.token_M)]
    e_of = np.searchsorted(np.asarray(srt.offsets_E1), np.arange(T * K), side="right") - 1
    z_ref = np.stack([0.5 * xs[m] @ np.asarray(la[e_of[m]], np.float64) for m in range(T * K)])
    np.testing.assert_allclose(np.asarray(z0), z_ref, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="exactly one"):
        gg.grouped_gemm(x, w, srt.offsets_E1, cfg=cfg, lora_a=la, z=z0, **kw)


def test_same_compiled_function_serves_a_new_routing(seed, interpret):
    """Static grid: the executable compiled for one routing is exact for another routing of the same shapes
    (different group sizes, empty experts moved), so there is nothing to recompile per batch."""
    case = get_case("skewed")
    _, j, static, dy = _inputs(case, seed, jnp.float32)
    run = _value_and_grads("fused", _DIFF, static, j)
    _, j2, _, dy2 = _inputs(case, seed + 7, jnp.float32)
    assert not np.array_equal(np.asarray(j["expert_ids"]), np.asarray(j2["expert_ids"]))
    y, g = run(j2, dy2)
    _check_against_reference(case, j2, static, dy2, y, g, _DIFF, "float32")


def test_lora_only_gradients_without_x(seed, interpret):
    """x not differentiated: dZ1 comes from its own skinny pass instead of the dx GEMM."""
    case = get_case("prime_e")
    _, j, static, dy = _inputs(case, seed, jnp.float32)
    wrt = ("lora_gate_up", "lora_down")
    y, g = _value_and_grads("fused", wrt, static, j)(j, dy)
    _check_against_reference(case, j, static, dy, y, g, wrt, "float32")


@pytest.mark.parametrize("case_name", ["odd_dims", "empty_experts", "oai_biases"])
def test_backend_interface_matches_ragged_dot(case_name, seed, interpret):
    """Through `jax_impl.moe.split_lora_experts(backend="pallas_triton")` (the sorted-rows backend interface), LoRA
    training gradients equal the ragged_dot backend's."""
    case = get_case(case_name)
    _, j, static, dy = _inputs(case, seed, jnp.float32)
    assert resolve_backend("pallas_triton") == "pallas_triton"
    y, g = _value_and_grads("pallas_triton", _LORA_TRAINING, static, j)(j, dy)
    y_rd, g_rd = _value_and_grads("ragged_dot", _LORA_TRAINING, static, j)(j, dy)
    assert_close(y, y_rd, dtype="float32", quantity="moe_block", name="y")
    for name in _LORA_TRAINING:
        got, exp = (g[name], g_rd[name]) if isinstance(g[name], tuple) else ((g[name],), (g_rd[name],))
        for i, (a, e) in enumerate(zip(got, exp)):
            assert_close(a, e, dtype="float32", quantity="moe_grad", name=f"d{name}[{i}]")


# ---- structure -------------------------------------------------------------------------------------------------------

def _kernel_names(wrt: tuple[str, ...]) -> list[str]:
    case = get_case("oai_biases")
    _, j, static, _ = _inputs(case, 0, jnp.float32)

    def loss(diff, frozen):
        a = {**frozen, **diff}
        return pt.split_lora_experts(a["x"], j["expert_ids"], a["expert_weights"], a["w_gate_up"], a["w_down"],
                                     a["lora_gate_up"], a["lora_down"], scale=0.5, biases=a["biases"],
                                     activation="swiglu_oai", swiglu_limit=1.0).sum()

    return _pallas_call_names(jax.make_jaxpr(jax.grad(loss))({k: j[k] for k in wrt},
                                                              {k: j[k] for k in _DIFF if k not in wrt}))


def _pallas_call_names(closed_jaxpr) -> list[str]:
    """The name of every pallas_call in a (closed) jaxpr, nested jaxprs included, in program order."""
    names = []

    def walk(jx):
        for eqn in jx.eqns:
            if eqn.primitive.name == "pallas_call":
                info = eqn.params.get("name", eqn.params.get("name_and_src_info"))  # renamed across jax versions
                names.append(str(info).split(" ")[0])
            for p in eqn.params.values():
                for sub in p if isinstance(p, (list, tuple)) else (p,):
                    inner = getattr(sub, "jaxpr", None)
                    if inner is not None:
                        walk(inner if hasattr(inner, "eqns") else inner.jaxpr)
                    elif hasattr(sub, "eqns"):
                        walk(sub)

    walk(closed_jaxpr.jaxpr)
    return names


def test_lora_training_launches_no_base_weight_gradient_kernel(interpret):
    lora = _kernel_names(_LORA_TRAINING)
    assert sorted(lora) == sorted(["moe_gate_up", "moe_down", "moe_dh", "moe_dx", "moe_dA2", "moe_dB2", "moe_dA1",
                                   "moe_dB1"]), lora
    full = _kernel_names(_DIFF)
    assert {"moe_dWgu", "moe_dWd", "moe_db_gate_up", "moe_db_down"} <= set(full), full


def test_z_pre_adds_one_skinny_launch_per_lora_pass(interpret, monkeypatch):
    _force_z_pre(monkeypatch)
    lora = _kernel_names(_LORA_TRAINING)
    nn = ["moe_gate_up", "moe_down", "moe_dh", "moe_dx"]
    assert sorted(lora) == sorted(nn + [f"{n}_z" for n in nn] + ["moe_dA2", "moe_dB2", "moe_dA1", "moe_dB1"]), lora


def test_tile_schedule_covers_each_row_once():
    sizes = np.array([0, 5, 16, 0, 33, 1, 0], np.int32)  # empty first/middle/last, exact multiple, odd remainders
    offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int32)
    M, bm = int(offsets[-1]), 16
    te, tr = (np.asarray(a) for a in gg.tile_schedule(jnp.asarray(offsets), M, bm))
    assert te.shape == (pl_cdiv(M, bm) + len(sizes),)
    covered = np.zeros(M, int)
    for e, r in zip(te, tr):
        if e < 0:
            continue
        end = min(r + bm, offsets[e + 1])
        assert offsets[e] <= r < offsets[e + 1]  # a tile starts inside its expert and never straddles the next
        covered[r:end] += 1
    np.testing.assert_array_equal(covered, 1)
    assert (te >= 0).sum() == sum(pl_cdiv(int(s), bm) for s in sizes)


def pl_cdiv(a: int, b: int) -> int:
    return -(-a // b)


# ---- grouped_gemm_tn's split mode (split_rows; SPLITMOE_JAX_TN_SPLIT_ROWS) ------------------------------------------

_TN_SPLIT_CASES = [get_case(n) for n in ("skewed", "empty_experts", "prime_e", "oai_biases", "odd_dims")]
_TN_LAUNCHES: dict = {}


def _tn_setup(case, seed: int, repeat: int = 8):
    """(sort, operands) for `case`'s routing stacked `repeat` times (T·repeat tokens: every expert's rows times
    `repeat`, empty experts still empty; as the torch twin's `_setup(repeat=)`), so that 16-row chunks split the
    small cases' experts into several."""
    from jax_impl.kernels import split_lora as sl
    ids = np.tile(make_moe_inputs(case, seed=seed % 1000)["expert_ids"], (repeat, 1))
    srt = sl.sort_rows(jnp.asarray(ids, jnp.int32), case.E)
    T, M = ids.shape[0], ids.size
    rng = np.random.default_rng(seed)

    def rnd(*shape, scale=1.0):
        return jnp.asarray(rng.standard_normal(shape) * scale, jnp.float32)

    o = dict(x=rnd(T, case.H), dz=rnd(M, case.R), gu=rnd(M, 2 * case.I, scale=2.0), dy=rnd(T, case.H),
             z=rnd(M, case.R), dgu=rnd(M, 2 * case.I))
    o["ws"] = jnp.abs(rnd(M)) + 0.1
    return srt, o


def _tn_launches(case, split_rows: int):
    """A jitted (offsets, token_M, operands) -> {launch: out} of five `grouped_gemm_tn` launches with `split_rows`,
    as the backward makes them: gathered rows left (dA1), act(gu) left with gathered right and row scale (dWd), a
    ones left (bias grads), plain rows (dB1), and the first again in float16 (out_dtype); one executable per case
    and split (XLA's CPU optimisations off, as `_value_and_grads`)."""
    key = (case, split_rows)
    if key not in _TN_LAUNCHES:
        cfg = autotune.INTERPRET_CONFIGS["tn"]

        def f(off, tok, o):
            kw = dict(cfg=cfg, interpret=True, split_rows=split_rows)
            tn = gg.grouped_gemm_tn
            return dict(
                rows_gather=tn(o["x"], o["dz"], off, p=case.H, left_index=tok, scale=0.5, **kw),
                act=tn(o["gu"], o["dy"], off, p=case.I, left_act=case.activation, right_index=tok, row_scale=o["ws"],
                       limit=case.swiglu_limit, **kw),
                ones=tn(None, o["dy"], off, p=1, right_index=tok, row_scale=o["ws"], scale=2.0, **kw),
                rows=tn(o["z"], o["dgu"], off, p=case.R, scale=0.5, **kw),
                rows_f16=tn(o["x"], o["dz"], off, p=case.H, left_index=tok, scale=0.5, out_dtype=jnp.float16, **kw))

        _TN_LAUNCHES[key] = f, jax.jit(f, compiler_options=None if _ON_GPU else _FAST_COMPILE)
    f, jitted = _TN_LAUNCHES[key]
    return lambda srt, o: {k: np.asarray(v) for k, v in jitted(srt.offsets_E1, srt.token_M, o).items()}


def _tn_reference(case, srt, o) -> dict:
    """float64 per-expert scale · Lrowsᵀ Rrows of the launches of `_tn_launches` (not the float16 one)."""
    off, tok = np.asarray(srt.offsets_E1), np.asarray(srt.token_M)
    f = {k: np.asarray(v, np.float64) for k, v in o.items()}
    h = ref._activation(case.activation, case.swiglu_limit, 1.702)[0](f["gu"])
    wdy = f["dy"][tok] * f["ws"][:, None]
    pairs = dict(rows_gather=(0.5, f["x"][tok], f["dz"]), act=(1.0, h, wdy), ones=(2.0, np.ones((len(tok), 1)), wdy),
                 rows=(0.5, f["z"], f["dgu"]))
    return {k: np.stack([s * (lt[off[e]:off[e + 1]].T @ r[off[e]:off[e + 1]]) for e in range(case.E)])
            for k, (s, lt, r) in pairs.items()}


# chunks of two 16-row blocks on every case, of one block (a partial per reduction step) on two: each is a compile
_TN_SPLIT_PARAMS = [pytest.param(c, 32, id=f"{c.name}-split2blk") for c in _TN_SPLIT_CASES] + [
    pytest.param(get_case(n), 16, id=f"{n}-split1blk") for n in ("skewed", "empty_experts")]


@pytest.mark.parametrize(("case", "split_rows"), _TN_SPLIT_PARAMS)
def test_grouped_gemm_tn_split_rows_matches_reference(case, split_rows, seed):
    """Split mode (chunks of one or two 16-row blocks; the routing stacked 8x so that every case has experts of
    several chunks, at least 2·split_rows rows), every left mode, gathers, row scale, scale and a float16 out_dtype,
    against float64; experts with no rows give exact zeros; one executable serves a second routing of the same
    shapes (static grids)."""
    run = _tn_launches(case, split_rows)
    for routing_seed in (seed, seed + 7):
        srt, o = _tn_setup(case, routing_seed)
        rows_E = np.diff(np.asarray(srt.offsets_E1))
        assert rows_E.max() >= 2 * split_rows, "the premise: some expert spans several chunks"
        got, want = run(srt, o), _tn_reference(case, srt, o)
        for name, exp in want.items():
            assert got[name].dtype == np.float32
            assert_close(got[name], exp, dtype="float32", quantity="moe_grad", name=f"split {name}")
        # float16: both passes store scale·sum rounded once, as the fp32 result's cast
        assert got["rows_f16"].dtype == np.float16
        np.testing.assert_array_equal(got["rows_f16"], got["rows_gather"].astype(np.float16))
        for e in np.flatnonzero(rows_E == 0):
            for name, out in got.items():
                assert not np.any(out[e]), f"expert {e} has no rows: its {name} must be exactly 0"
        assert set(case.empty_experts) <= set(np.flatnonzero(rows_E == 0))


@pytest.mark.parametrize("case", [get_case("skewed"), get_case("empty_experts")], ids=lambda c: c.name)
def test_grouped_gemm_tn_split_rows_is_deterministic_and_one_chunk_experts_keep_their_bits(case, seed):
    """Split mode gives the same bits on every call; experts of one chunk (fewer than 2·split_rows rows, those
    between one and two chunks' worth included: the remainder rides in the last chunk, `split_chunks`) get the
    unsplit kernel's bits (same row blocks, same order), and with chunks longer than any expert the whole output is
    the unsplit kernel's. A split launch is two pallas_calls (pass 1, then `_sum`), the unsplit one one."""
    srt, o = _tn_setup(case, seed, repeat=4)  # rows in multiples of 4: some between 16 and 32
    rows_E = np.diff(np.asarray(srt.offsets_E1))
    unsplit = _tn_launches(case, 0)(srt, o)
    for split_rows in (16, 1024):
        run = _tn_launches(case, split_rows)
        first, again = run(srt, o), run(srt, o)
        one_chunk = np.array([len(split_chunks(int(r), split_rows)) <= 1 for r in rows_E])
        for name in first:
            np.testing.assert_array_equal(first[name], again[name], err_msg=f"{name}: split mode is not deterministic")
            np.testing.assert_array_equal(first[name][one_chunk], unsplit[name][one_chunk], err_msg=name)
        if split_rows == 1024:
            assert one_chunk.all()
        else:  # the premises: an expert of one chunk and a remainder, and one of several chunks and a remainder
            assert ((rows_E > split_rows) & one_chunk).any(), "no expert of between one and two chunks' rows"
            assert ((rows_E % split_rows > 0) & ~one_chunk).any(), "no expert of several chunks with a remainder"
    for split_rows, per_launch in ((0, ["grouped_gemm_tn"]), (16, ["grouped_gemm_tn", "grouped_gemm_tn_sum"])):
        f = _TN_LAUNCHES[(case, split_rows)][0]
        assert _pallas_call_names(jax.make_jaxpr(f)(srt.offsets_E1, srt.token_M, o)) == per_launch * 5


def test_grouped_gemm_tn_split_rows_lowers_to_triton():
    """Both passes go through Pallas' Triton lowering (Triton IR built on the CPU for the cuda platform, with the GPU
    default config and bf16; no PTX, no GPU run): pass 1 with its two outputs, then the sum with the output aliased
    through, one kernel per launch unsplit."""
    cfg = autotune.GPU_DEFAULTS["tn"]
    E, T, K, H, I, R = 8, 256, 2, 256, 128, 16
    M = T * K
    args = (jnp.zeros((T, H), jnp.bfloat16), jnp.zeros((M, R), jnp.bfloat16), jnp.zeros((M, 2 * I), jnp.bfloat16),
            jnp.zeros((T, H), jnp.bfloat16), jnp.ones((M,), jnp.float32),
            jnp.linspace(0, M, E + 1).astype(jnp.int32), jnp.arange(M, dtype=jnp.int32) // K)
    for split_rows, kernels, aliased in ((0, 3, 0), (2 * cfg.block_m, 6, 3)):
        def f(x, dz, gu, dy, ws, off, tok, split_rows=split_rows):
            kw = dict(cfg=cfg, interpret=False, split_rows=split_rows)
            return (gg.grouped_gemm_tn(x, dz, off, p=H, left_index=tok, scale=0.5, **kw),
                    gg.grouped_gemm_tn(gu, dy, off, p=I, left_act="swiglu_oai", right_index=tok, row_scale=ws, **kw),
                    gg.grouped_gemm_tn(None, dy, off, p=1, right_index=tok, row_scale=ws, **kw))

        text = jax.jit(f).trace(*args).lower(lowering_platforms=("cuda",)).as_text()
        assert text.count("custom_call @__gpu$xla.gpu.triton") == kernels, split_rows
        assert text.count("output_operand_aliases") == aliased, split_rows


@pytest.mark.parametrize("split_rows", [24, -16, 8])
def test_grouped_gemm_tn_split_rows_must_be_a_multiple_of_block_m(split_rows):
    off = jnp.asarray([0, 3, 5], jnp.int32)
    with pytest.raises(ValueError, match=rf"split_rows={split_rows}: .*multiple of block_m=16"):
        gg.grouped_gemm_tn(jnp.ones((5, 4)), jnp.ones((5, 3)), off, p=4, cfg=autotune.INTERPRET_CONFIGS["tn"],
                           interpret=True, split_rows=split_rows)


@pytest.mark.parametrize("value", ["24", "-32", "abc", "1.5e3"])
def test_tn_split_rows_env_refuses_bad_values(value, monkeypatch):
    """SPLITMOE_JAX_TN_SPLIT_ROWS must be 0 or a positive multiple of the launch's block_m: anything else is a
    ValueError that names the variable, the value and the block size."""
    monkeypatch.setenv(gg.TN_SPLIT_ROWS_ENV, value)
    with pytest.raises(ValueError, match=rf"SPLITMOE_JAX_TN_SPLIT_ROWS='{value}'.*multiple.*block_m \(16 "):
        gg.tn_split_rows(autotune.INTERPRET_CONFIGS["tn"])


def test_tn_split_rows_env_sets_or_clears_the_split(monkeypatch):
    cfg = autotune.INTERPRET_CONFIGS["tn"]
    assert gg.TN_SPLIT_ROWS_ENV == "SPLITMOE_JAX_TN_SPLIT_ROWS"
    monkeypatch.delenv(gg.TN_SPLIT_ROWS_ENV, raising=False)
    assert gg.tn_split_rows(cfg) == 0  # unset: off (BlockConfig and the tuned tables have no split)
    for value, want in (("32", 32), (" 512 ", 512), ("0", 0), ("", 0)):
        monkeypatch.setenv(gg.TN_SPLIT_ROWS_ENV, value)
        assert gg.tn_split_rows(cfg) == want, value


def test_tn_split_rows_env_reaches_every_ragged_k_launch(interpret, monkeypatch):
    """Read when the step is traced: every ragged-K launch of the backward becomes pass 1 + `_sum`, the NN passes
    stay as they are, and a bad value fails the trace naming the variable."""
    monkeypatch.setenv(gg.TN_SPLIT_ROWS_ENV, "16")
    names = _kernel_names(_DIFF)
    tn = ["moe_dA2", "moe_dB2", "moe_dWd", "moe_dA1", "moe_dB1", "moe_dWgu", "moe_db_gate_up", "moe_db_down"]
    nn = ["moe_gate_up", "moe_down", "moe_dh", "moe_dx"]
    assert sorted(names) == sorted(nn + tn + [f"{n}_sum" for n in tn]), names
    monkeypatch.setenv(gg.TN_SPLIT_ROWS_ENV, "24")
    with pytest.raises(ValueError, match="SPLITMOE_JAX_TN_SPLIT_ROWS='24'"):
        _kernel_names(_LORA_TRAINING)


def test_fused_backward_with_tn_split_rows(seed, interpret, monkeypatch):
    """SPLITMOE_JAX_TN_SPLIT_ROWS=16 through the custom_vjp: forward and every gradient (base weights included, so
    the six ragged-K launches of a bias-free case split) against the float64 reference, on the skewed routing, whose
    busiest expert spans several chunks. (The bias launches split too: test_tn_split_rows_env_reaches_every_ragged_k_
    launch; the ones left against float64: test_grouped_gemm_tn_split_rows_matches_reference.)"""
    case = get_case("skewed")
    monkeypatch.setenv(gg.TN_SPLIT_ROWS_ENV, "16")
    _, j, static, dy = _inputs(case, seed, jnp.float32)
    assert np.bincount(np.asarray(j["expert_ids"]).ravel()).max() > 16, "the premise: some expert is split"
    y, g = _value_and_grads("fused", _DIFF, static, j)(j, dy)
    _check_against_reference(case, j, static, dy, y, g, _DIFF, "float32")


# ---- availability and tuning -----------------------------------------------------------------------------------------

def test_availability_is_honest(monkeypatch):
    monkeypatch.delenv(pt.INTERPRET_ENV, raising=False)
    monkeypatch.delenv("SPLITMOE_MOE_BACKEND", raising=False)
    reason = pt.unavailable_reason()
    if _ON_GPU:
        cc = float(jax.devices()[0].compute_capability)
        assert (reason is None) == (cc >= 8.0), reason
    else:
        assert reason is not None and "GPU" in reason and pt.INTERPRET_ENV in reason
        with pytest.raises(RuntimeError, match="pallas_triton"):
            resolve_backend("pallas_triton")
    monkeypatch.setenv(pt.INTERPRET_ENV, "1")
    assert pt.unavailable_reason() is None
    assert resolve_backend("pallas_triton") == "pallas_triton"


def test_tuning_cache_is_keyed_by_device_kind(tmp_path):
    path = tmp_path / "tune.json"
    best = autotune.BlockConfig(64, 128, 32, num_warps=4, num_stages=4)
    autotune.record("gemm", (1024, 2048, 768, 64), jnp.bfloat16, best, dev_kind="nvidia_h200", path=path)
    got = autotune.get_config("gemm", (1024, 2048, 768, 64), jnp.bfloat16, interpret=False, dev_kind="nvidia_h200",
                            path=path)
    assert got == best
    other = autotune.get_config("gemm", (1024, 2048, 768, 64), jnp.bfloat16, interpret=False, dev_kind="nvidia_h100",
                              path=path)
    assert other == autotune.GPU_DEFAULTS["gemm"]
    assert autotune.get_config("gemm", (1024, 2048, 768, 64), jnp.float32, interpret=False, dev_kind="nvidia_h200",
                             path=path) == autotune.GPU_DEFAULTS["gemm"]
    assert autotune.get_config("tn", (1,), jnp.float32, interpret=True) == autotune.INTERPRET_CONFIGS["tn"]
    assert all(c.block_m * c.block_n <= 2 * 128 * 128 for c in autotune.candidates("gemm_act"))


def test_shipped_table_nearest_m_bucket(tmp_path):
    """After the user cache and before GPU_DEFAULTS: the shipped table's exact key, else the entry that differs only
    in the leading M bucket, nearest on a log scale; never one of another device, dtype, kind or shape."""
    cache, table = tmp_path / "user.json", tmp_path / "tuned.json"
    dev, bf16 = "test_gpu_shipped", jnp.bfloat16
    c1k = autotune.BlockConfig(64, 64, 64, 4, 3, z_pre=True)
    c64k = autotune.BlockConfig(128, 256, 64, 8, 3, z_pre=True)
    ctn = autotune.BlockConfig(64, 64, 64, 4, 4)
    rest = (2048, 768, 64)
    data = {autotune.cache_key("gemm", (1024, *rest), bf16, dev): {"block_m": 64, "block_n": 64, "block_d": 64,
                                                                    "num_warps": 4, "num_stages": 3, "z_pre": True},
            autotune.cache_key("gemm", (65536, *rest), bf16, dev): {**vars(c64k), "some_future_field": 1},
            autotune.cache_key("tn", (8192, 768, 64, "act"), bf16, dev): vars(ctn)}
    table.write_text(json.dumps(data))

    def get(kind, key, dtype=bf16, dev_kind=dev):
        return autotune.get_config(kind, key, dtype, interpret=False, dev_kind=dev_kind, path=cache, tuned_path=table)

    assert get("gemm", (1024, *rest)) == c1k  # exact
    assert get("gemm", (2048, *rest)) == c1k  # 2x away from 1024, 32x from 65536
    assert get("gemm", (131072, *rest)) == c64k
    assert get("gemm", (16384, *rest)) == c64k  # 4x from 65536, 16x from 1024
    assert get("gemm", (8192, *rest)) == c64k  # 8x either way: the larger bucket
    assert get("tn", (131072, 768, 64, "act")) == ctn
    assert get("tn", (131072, 768, 64, "rows")) == autotune.GPU_DEFAULTS["tn"]  # another operand mode
    assert get("gemm", (1024, 2048, 768, 16)) == autotune.GPU_DEFAULTS["gemm"]  # another shape
    assert get("gemm_act", (1024, *rest)) == autotune.GPU_DEFAULTS["gemm_act"]  # another kind
    assert get("gemm", (1024, *rest), jnp.float32) == autotune.GPU_DEFAULTS["gemm"]  # another dtype
    assert get("gemm", (1024, *rest), dev_kind="test_gpu_other") == autotune.GPU_DEFAULTS["gemm"]
    # the user cache comes first, and record() is seen by the next lookup
    mine = autotune.BlockConfig(128, 128, 64, 8, 4)
    autotune.record("gemm", (2048, *rest), bf16, mine, dev_kind=dev, path=cache)
    assert get("gemm", (2048, *rest)) == mine
    assert get("gemm", (4096, *rest)) == c1k  # 4x from 1024, 16x from 65536; the user cache has no nearest rule
    # the shipped file parses (absent or {} are both fine) and holds only current-version entries
    shipped = autotune._load_disk(autotune.TUNED_TABLE)
    assert all(k.startswith(f"v{autotune.KERNEL_VERSION}|") for k in shipped), "stale entries in tuned_configs.json"


# ---- GPU: bf16, compiled by the Triton lowering ----------------------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.skipif(not _ON_GPU, reason="needs jax with a CUDA GPU")
@pytest.mark.parametrize("case", cases("gpu"), ids=lambda c: c.name)
def test_fused_full_finetune_bf16_gpu(case, seed, monkeypatch):
    monkeypatch.delenv(pt.INTERPRET_ENV, raising=False)
    _, j, static, dy = _inputs(case, seed, jnp.bfloat16)
    y, g = _value_and_grads("fused", _DIFF, static, j)(j, dy)
    assert y.dtype == jnp.bfloat16
    _check_against_reference(case, j, static, dy, y, g, _DIFF, "bfloat16")
