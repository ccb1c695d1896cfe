"""The Mosaic-GPU NN passes (jax_impl/kernels/mosaic_gemm.py) and the `pallas_mosaic` backend built on them.

CPU (Pallas' Mosaic-GPU interpreter, fp32): every NN pass form the split-LoRA composition launches (gate_up with
the activation epilogue, down with bias, routing weight and row scatter, the dh pass with the activation VJP and the
routing-weight dots, dx with transposed weights, the skinny z launch) against the Triton kernel of grouped_gemm.py on
the same arguments, with an empty expert and experts straddling row blocks; the block-padded row layout; the whole
backend (forward and every gradient, base weights included) against the float64 oracle; the `pallas` backend's
per-pass choice (a config's impl="mosaic" moves exactly that pass). GPU (`gpu`): bf16 against `pallas_triton` at a
benchmark shape, compiled by the Mosaic-GPU lowering (Hopper only).
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

jax = pytest.importorskip("jax")
jnp = pytest.importorskip("jax.numpy")
pytest.importorskip("flax")

from jax_impl.backends import pallas_mosaic as pm  # noqa: E402
from jax_impl.backends import resolve_backend  # noqa: E402
from jax_impl.kernels import autotune  # noqa: E402
from jax_impl.kernels import grouped_gemm as gg  # noqa: E402
from jax_impl.kernels import mosaic_gemm as mg  # noqa: E402
from shared_math.cases import get_case  # noqa: E402
from shared_math.numerics import assert_close  # noqa: E402
from tests.jax.test_pallas_kernels import _DIFF, _check_against_reference, _inputs, _value_and_grads  # noqa: E402

_ON_GPU = jax.default_backend() == "gpu"


@pytest.fixture
def interpret(monkeypatch):
    monkeypatch.setenv("SPLITMOE_PALLAS_INTERPRET", "1")
    monkeypatch.delenv("SPLITMOE_MOE_BACKEND", raising=False)


def _pass_args(name: str):
    """(a, w, offsets, kwargs) of one NN pass as split_lora.py launches it: E=5 with two empty experts and groups of
    50 and 67 rows (not multiples of the 64-row blocks), T=60 tokens, K=2, H=40, I=12, R=4."""
    rng = np.random.default_rng(7)
    E, T, K, H, I, R = 5, 60, 2, 40, 12, 4
    M = T * K
    off = jnp.asarray(np.r_[0, np.cumsum([0, 50, 3, 67, 0])], jnp.int32)

    def f(*s):
        return jnp.asarray(rng.standard_normal(s), jnp.float32)

    tok = jnp.asarray(rng.integers(0, T, M), jnp.int32)
    flat = jnp.asarray(rng.permutation(M), jnp.int32)
    rs = f(M)
    if name == "gate_up":
        return f(T, H), f(E, H, 2 * I), off, dict(
            n=I, row_index=tok, lora_a=f(E, H, R), lora_b=f(E, R, 2 * I), store_z=True, lora_scale=2.0,
            bias=f(E, 2 * I), mode="act_fwd", activation="swiglu_oai", store_gu=True, limit=1.5)
    if name == "down":
        return f(M, I), f(E, I, H), off, dict(n=H, lora_a=f(E, I, R), lora_b=f(E, R, H), store_z=True,
                                              lora_scale=2.0, bias=f(E, H), row_scale=rs, out_rows=flat)
    if name == "dh":
        return f(T, H), f(E, I, H), off, dict(
            n=I, w_t=True, row_index=tok, lora_a=f(E, R, H), la_t=True, store_z=True, lora_b=f(E, I, R), lb_t=True,
            z_scale=2.0, row_scale=rs, mode="act_bwd", activation="swiglu", gu=f(M, 2 * I))
    if name == "dx":
        return f(M, 2 * I), f(E, H, 2 * I), off, dict(n=H, w_t=True, lora_a=f(E, R, 2 * I), la_t=True,
                                                      lora_b=f(E, H, R), lb_t=True, z_scale=2.0, store_z=True,
                                                      out_rows=flat)
    return f(M, 2 * I), f(E, R, 2 * I), off, dict(n=R, w_t=True, out_scale=2.0)  # the skinny dZ1-only launch


# the default tiles, and the smallest ones a tuning table may name (one 64-row wgmma tile, a two-step pipeline)
_SMALL_TILES = autotune.BlockConfig(64, 64, 64, num_stages=2, impl="mosaic")


@pytest.mark.parametrize("name,cfg", [("gate_up", None), ("gate_up", _SMALL_TILES), ("down", None),
                                      ("dh", _SMALL_TILES), ("dh", None), ("dx", None), ("z_only", None)])
def test_nn_pass_matches_the_triton_kernel(name, cfg):
    a, w, off, kw = _pass_args(name)
    want = gg.grouped_gemm(a, w, off, cfg=autotune.INTERPRET_CONFIGS["gemm"], interpret=True, **kw)
    got = mg.grouped_gemm(a, w, off, cfg=cfg, interpret=True, **kw)
    if kw.get("mode") == "act_bwd":  # the Triton kernel returns per-column-tile partial dots, summed by the caller
        want = (*want[:-1], want[-1].sum(axis=1, keepdims=True))
    assert len(got) == len(want)
    for i, (g, e) in enumerate(zip(got, want)):
        assert g.shape == e.shape and g.dtype == e.dtype, (i, g.shape, e.shape, g.dtype, e.dtype)
        assert_close(g, e, dtype="float32", quantity="moe_block", name=f"{name} output {i}")


@pytest.mark.parametrize("name", ["gate_up", "down", "dh", "dx"])
def test_lora_accumulated_into_the_base_tile_matches(name, monkeypatch):
    """SPLITMOE_JAX_LORA_ACC=1 (gg.lora_acc; these passes' LoRA scales are 2 and 1): both kernels add the LoRA term as
    (s·z) @ LB into the base accumulator, against the Triton kernel's default s·(z @ LB): fp32 rounding apart."""
    a, w, off, kw = _pass_args(name)
    monkeypatch.delenv("SPLITMOE_JAX_LORA_ACC", raising=False)
    want = gg.grouped_gemm(a, w, off, cfg=autotune.INTERPRET_CONFIGS["gemm"], interpret=True, **kw)
    monkeypatch.setenv("SPLITMOE_JAX_LORA_ACC", "1")
    assert gg.lora_acc(kw.get("lora_scale", 1.0))
    for label, got in (("triton", gg.grouped_gemm(a, w, off, cfg=autotune.INTERPRET_CONFIGS["gemm"], interpret=True,
                                                  **kw)),
                       ("mosaic", mg.grouped_gemm(a, w, off, cfg=None, interpret=True, **kw))):
        want_i = want
        if label == "mosaic" and kw.get("mode") == "act_bwd":  # Mosaic sums the Triton kernel's per-tile dots
            want_i = (*want[:-1], want[-1].sum(axis=1, keepdims=True))
        for i, (g, e) in enumerate(zip(got, want_i)):
            assert_close(g, e, dtype="float32", quantity="moe_block", name=f"{label} {name} output {i}")


def test_lora_acc_needs_the_switch_and_a_power_of_two_scale(monkeypatch):
    monkeypatch.delenv("SPLITMOE_JAX_LORA_ACC", raising=False)
    assert not gg.lora_acc(2.0)
    monkeypatch.setenv("SPLITMOE_JAX_LORA_ACC", "1")
    assert all(gg.lora_acc(v) for v in (1.0, 2.0, 0.5, 0.125))
    assert not any(gg.lora_acc(v) for v in (1.5, 0.3, 3.0, 0.0, -2.0))
    monkeypatch.setenv("SPLITMOE_JAX_LORA_ACC", "on")
    with pytest.raises(ValueError, match="SPLITMOE_JAX_LORA_ACC='on'"):
        gg.lora_acc(2.0)


def test_tiles_from_the_tuning_table():
    assert mg.tiles_of(None) == mg.DEFAULT_TILES
    assert mg.tiles_of(autotune.GPU_DEFAULTS["gemm"]) == mg.DEFAULT_TILES  # a Triton tile names no Mosaic tiles
    assert mg.tiles_of(_SMALL_TILES) == mg.MosaicTiles(64, 64, 2)
    with pytest.raises(ValueError, match="block_m in"):
        mg.tiles_of(replace(_SMALL_TILES, block_m=32))


def test_padded_rows_layout():
    """Every sorted row has one padded slot, inside a block of its own expert; padding slots read row M."""
    off = jnp.asarray([0, 0, 70, 73, 150, 150], jnp.int32)
    M, bm = 150, 64
    pad = mg.padded_rows(off, M, bm)
    src, pos, be = (np.asarray(v) for v in (pad.src_P, pad.pos_M, pad.block_expert))
    assert len(src) == len(be) * bm
    np.testing.assert_array_equal(src[pos], np.arange(M))
    assert sorted(src[src < M].tolist()) == list(range(M))
    e_of = np.searchsorted(np.asarray(off)[1:], np.arange(M), side="right")
    np.testing.assert_array_equal(be[pos // bm], e_of)
    assert (be[np.asarray([b for b in range(len(be)) if not (src[b * bm:(b + 1) * bm] < M).any()])] == -1).all()


@pytest.mark.parametrize("case_name", ["empty_experts", "oai_biases"])
def test_backend_full_finetune_fp32(case_name, seed, interpret):
    """The whole backend through jax_impl.moe: forward and the gradient of every input against float64."""
    case = get_case(case_name)
    _, j, static, dy = _inputs(case, seed, jnp.float32)
    y, g = _value_and_grads("pallas_mosaic", _DIFF, static, j)(j, dy)
    _check_against_reference(case, j, static, dy, y, g, _DIFF, "float32")


def test_availability(monkeypatch):
    monkeypatch.delenv("SPLITMOE_PALLAS_INTERPRET", raising=False)
    if not _ON_GPU:
        assert "Hopper" in pm.unavailable_reason()
        with pytest.raises(RuntimeError, match="Hopper"):
            resolve_backend("pallas_mosaic")
    monkeypatch.setenv("SPLITMOE_PALLAS_INTERPRET", "1")
    assert pm.unavailable_reason() is None
    # auto takes `pallas`: per pass the lowering the tuning tables measured faster, Triton where nothing was measured
    monkeypatch.delenv("SPLITMOE_MOE_BACKEND", raising=False)
    assert resolve_backend("auto") == "pallas"


def _mosaic_for(monkeypatch, kinds):
    """The interpret configs of `kinds` say impl="mosaic", as a sweep that found Mosaic faster there would."""
    monkeypatch.setattr(autotune, "INTERPRET_CONFIGS", {
        k: replace(c, impl="mosaic", block_m=64, block_n=64, num_stages=2) if k in kinds else c
        for k, c in autotune.INTERPRET_CONFIGS.items()})


def test_pallas_backend_follows_the_measured_choice_per_pass(seed, interpret, monkeypatch):
    """Under `pallas`, exactly the passes whose config says impl="mosaic" run the Mosaic GEMM (here gate_up and dh),
    the others the Triton kernel, and the mixed composition still matches the float64 oracle."""
    calls = []
    real = mg.grouped_gemm

    def counting(*a, name, **kw):
        calls.append(name)
        return real(*a, name=name, **kw)

    monkeypatch.setattr(mg, "grouped_gemm", counting)
    _mosaic_for(monkeypatch, ("gemm_act", "gemm_act_bwd"))
    case = get_case("oai_biases")
    _, j, static, dy = _inputs(case, seed, jnp.float32)
    y, g = _value_and_grads("pallas", _DIFF, static, j)(j, dy)
    assert sorted(set(calls)) == ["moe_dh", "moe_gate_up"], calls
    _check_against_reference(case, j, static, dy, y, g, _DIFF, "float32")


def test_pallas_backend_without_measurements_is_pallas_triton(seed, interpret):
    case = get_case("prime_e")
    _, j, static, dy = _inputs(case, seed, jnp.float32)
    y0, g0 = _value_and_grads("pallas_triton", _DIFF, static, j)(j, dy)
    y1, g1 = _value_and_grads("pallas", _DIFF, static, j)(j, dy)
    for a, b in zip(jax.tree_util.tree_leaves((y1, g1)), jax.tree_util.tree_leaves((y0, g0))):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_tuning_table_carries_the_lowering(tmp_path):
    """A shipped-table entry with impl="mosaic" comes back from get_config (older entries without it: Triton)."""
    key = (131072, 2048, 768, 64)
    table = {autotune.cache_key("gemm_act", key, jnp.bfloat16, "nvidia_h200"):
             dict(block_m=128, block_n=128, block_d=64, num_warps=8, num_stages=3, impl="mosaic"),
             autotune.cache_key("gemm", key, jnp.bfloat16, "nvidia_h200"):
             dict(block_m=128, block_n=128, block_d=64, num_warps=8, num_stages=3)}
    autotune.write_table(tmp_path / "t.json", table)
    kw = dict(interpret=False, dev_kind="nvidia_h200", path=tmp_path / "none.json", tuned_path=tmp_path / "t.json")
    assert autotune.get_config("gemm_act", key, jnp.bfloat16, **kw).impl == "mosaic"
    assert autotune.get_config("gemm", key, jnp.bfloat16, **kw).impl == "triton"


@pytest.mark.gpu
@pytest.mark.skipif(not _ON_GPU, reason="needs jax with a CUDA GPU")
@pytest.mark.parametrize("lora_acc", ["0", "1"], ids=["lora_add", "LORA_ACC"])
def test_benchmark_shape_agrees_with_pallas_triton_bf16_gpu(lora_acc, seed, monkeypatch):
    """Qwen3-30B-A3B expert shapes at T=1024, bf16, LoRA training gradients: pallas_mosaic against pallas_triton, with
    the LoRA term added from its own tile (the default) and accumulated into the base one (SPLITMOE_JAX_LORA_ACC=1,
    both kernels)."""
    if pm.unavailable_reason(jnp.bfloat16):
        pytest.skip(pm.unavailable_reason(jnp.bfloat16))
    from tests.jax.test_pallas_kernels import _LORA_TRAINING, _assert_outputs_close

    monkeypatch.setenv("SPLITMOE_JAX_LORA_ACC", lora_acc)

    _, j, static, dy = _inputs(get_case("qwen3_30b_T1024"), seed, jnp.bfloat16)
    y, g = _value_and_grads("pallas_mosaic", _LORA_TRAINING, static, j)(j, dy)
    y_t, g_t = _value_and_grads("pallas_triton", _LORA_TRAINING, static, j)(j, dy)
    _assert_outputs_close((y, g), (y_t, g_t), _LORA_TRAINING, "bfloat16")


def test_probe_script_checks_the_kernel(interpret):
    """benchmarks/mosaic_probe.py (the GPU probe of the kernel's forms) runs its checks in the interpreter too: a
    LoRA form with both weights transposed agrees with its XLA reference on the rows the kernel writes."""
    from benchmarks import mosaic_probe

    row = mosaic_probe.probe("lora, transposed", 300, 128, 192, 5, 16, w_t=True, lora=True, lb_t=True,
                             tiles=mg.MosaicTiles(64, 64, 2), smem_transpose=False, interpret=True)
    assert "error" not in row, row.get("error")
    assert row["rel_max_err"] < 1e-5, row  # fp32 operands, fp32 accumulation in both: only summation order differs
