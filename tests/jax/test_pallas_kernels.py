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

    jaxpr = jax.make_jaxpr(jax.grad(loss))({k: j[k] for k in wrt}, {k: j[k] for k in _DIFF if k not in wrt})
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

    walk(jaxpr.jaxpr)
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
