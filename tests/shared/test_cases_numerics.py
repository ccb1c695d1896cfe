"""Invariants of the shared shape cases and of the tolerance/diff helpers."""

import numpy as np
import pytest

from shared_math import cases, numerics


@pytest.mark.parametrize("case", cases.CASES, ids=lambda c: c.name)
def test_case_routing_invariants(case):
    """K distinct experts per token, empty experts never chosen, weights positive and summing to one."""
    rng = np.random.default_rng(0)
    ids, w = cases.routing_for(case, rng)
    assert ids.shape == (case.T, case.K) and w.shape == (case.T, case.K)
    assert all(len(set(row)) == case.K for row in ids.tolist())
    assert not np.isin(ids, case.empty_experts).any()
    assert (ids >= 0).all() and (ids < case.E).all()
    np.testing.assert_allclose(w.sum(1), 1.0, rtol=1e-12)
    assert (w > 0).all()


def test_required_coverage_is_present():
    """The shapes ARCHITECTURE.md requires: T below a block, odd H and I, prime E, K=1, K=E, empty experts."""
    ci = cases.cases("ci")
    assert any(c.T < 16 for c in ci)
    assert any(c.H % 2 and c.I % 2 for c in ci)
    assert any(c.E in (5, 7, 11, 13) for c in ci)
    assert any(c.K == 1 for c in ci) and any(c.K == c.E for c in ci)
    assert any(c.empty_experts for c in ci)
    assert any(c.activation == "swiglu_oai" and c.biases for c in ci)


def test_inputs_are_deterministic_and_typed():
    c = cases.get_case("odd_dims")
    a, b = cases.make_moe_inputs(c, seed=3), cases.make_moe_inputs(c, seed=3)
    np.testing.assert_array_equal(a["x"], b["x"])
    assert a["w_gate_up"].shape == (c.E, c.H, 2 * c.I) and a["lora_down"][1].shape == (c.E, c.R, c.H)
    f32 = cases.make_moe_inputs(c, seed=3, dtype=np.float32)
    assert f32["x"].dtype == np.float32 and f32["expert_ids"].dtype == np.int64
    assert not np.array_equal(cases.make_moe_inputs(c, seed=4)["x"], a["x"])


def test_skew_makes_loads_uneven():
    rng = np.random.default_rng(0)
    ids, _ = cases.routing_for(cases.get_case("skewed"), rng)
    counts = np.bincount(ids.ravel(), minlength=8)
    assert counts[0] > 2 * counts[-1]


def test_assert_close_passes_and_fails_with_a_useful_message():
    e = np.linspace(-1, 1, 101)
    numerics.assert_close(e + 1e-7, e, dtype="float32", quantity="moe_block")
    with pytest.raises(AssertionError, match=r"max\|diff\|=1\.000e-03 at \(50,\)"):
        bad = e.copy()
        bad[50] += 1e-3
        numerics.assert_close(bad, e, dtype="float32", quantity="moe_block", name="y")


def test_nan_never_passes():
    e = np.ones(4)
    a = e.copy()
    a[2] = np.nan
    with pytest.raises(AssertionError, match="non-finite mismatches=1"):
        numerics.assert_close(a, e, dtype="bfloat16", quantity="logits")
    assert numerics.diff_summary(np.array([np.nan]), np.array([np.nan])).nonfinite == 0


def test_unknown_tolerance_key_is_clear():
    with pytest.raises(KeyError, match="quantities"):
        numerics.tolerance("float32", "nonsense")


def test_every_tolerance_has_a_reason():
    for key, tol in numerics.TOLERANCES.items():
        assert tol.why and tol.rtol > 0 and tol.atol >= 0, key
