"""Tests of the merged-vs-split LoRA cost model `shared_math.cost`: hand counts for small shapes, the source
document's crossover (about 9K tokens for Qwen3-30B-A3B, not 16K), the backward rank bound, monotonicity."""

from __future__ import annotations

import itertools
import math
from pathlib import Path

import pytest

from shared_math import cost as C


def _gemm_flops(*shapes: tuple[int, int, int]) -> int:
    """2·a·b·c per GEMM [a, b] @ [b, c]: an independent recount of the model's GEMM list."""
    return sum(2 * a * b * c for a, b, c in shapes)


# m=2 in, n=3 out, E=4 experts, K=2, T=3 tokens (M=6 routed rows, all 4 experts can be hit), rank 1, bf16
m, n, E, K, T, r = 2, 3, 4, 2, 3, 1
M = T * K


def test_merged_projection_by_hand():
    c = C.projection_cost("merged", m, n, E, K, T, r, dtype_bytes=2)
    # forward: A@B per expert [m,r]@[r,n], W + sΔ (E·m·n adds), X·W' over the routed rows
    assert c.forward.flops == E * _gemm_flops((m, r, n)) + E * m * n + _gemm_flops((M, m, n)) == 144
    # backward: dX = dY·W'^T, dW' = X^T·dY, dA = dW'·B^T and dB = A^T·dW' per expert
    assert c.backward.flops == _gemm_flops((M, n, m), (m, M, n)) + E * _gemm_flops((m, n, r), (r, m, n)) == 240
    # bytes, in elements: baddbmm reads W, A, B and writes W' (4·(6+2+3+6) = 68); X·W' reads X (12), W' (24),
    # writes Y (18)
    assert c.forward.bytes_moved == 2 * (68 + 12 + 24 + 18)
    # dX: dY 18 + W' 24 + dX 12; dW': X 12 + dY 18 + dW' 24; dA: dW' 24 + B 12 + dA 8; dB: A 8 + dW' 24 + dB 12
    assert c.backward.bytes_moved == 2 * (54 + 54 + 44 + 44)
    # W' (E·m·n = 24) is saved for backward; dW' (24) lives in backward; dA + dB = 20
    assert (c.saved, c.transient, c.grads) == (48, 48, 40)
    assert c.forward.peak_bytes == 48 and c.backward.peak_bytes == 48 + 48 + 40


def test_split_projection_by_hand():
    c = C.projection_cost("split", m, n, E, K, T, r, dtype_bytes=2)
    # forward: X·W, Z = X·A, Z·B, all on the routed rows only
    assert c.forward.flops == _gemm_flops((M, m, n), (M, m, r), (M, r, n)) == 132
    # backward: dZ = dY·B^T, dB = Z^T·dY, dA = X^T·dZ, dX = dY·W^T + dZ·A^T; nothing for the frozen W
    assert c.backward.flops == _gemm_flops((M, n, r), (r, M, n), (m, M, r), (M, n, m), (M, r, m)) == 192
    # forward bytes: X 12, W 24, A 8, B 12, write Z 6 and Y 18
    assert c.forward.bytes_moved == 2 * 80
    # dZ: dY 18 + B 12 + dZ 6; dB: Z 6 + dY 18 + dB 12; dA: X 12 + dZ 6 + dA 8; dX: dY 18 + W 24 + dZ 6 + A 8 + dX 12
    assert c.backward.bytes_moved == 2 * (36 + 36 + 26 + 68)
    assert (c.saved, c.transient, c.grads) == (12, 12, 40)  # Z, dZ (M·r = 6 each), dA + dB
    assert c.backward.peak_bytes == 12 + 12 + 40


def test_split_reads_only_experts_that_can_be_hit():
    # T=1, K=2: at most 2 of the 4 experts are hit, so split reads 2 experts' W, A, B; merged still builds all 4 W'
    s1, s3 = C.projection_cost("split", m, n, E, K, 1, r, 1), C.projection_cost("split", m, n, E, K, 3, r, 1)
    assert s1.forward.bytes_moved == 1 * 2 * (m + r + n) + 2 * (m * n + r * (m + n)) == 34
    assert s3.forward.bytes_moved == 80
    mg = C.projection_cost("merged", m, n, E, K, 1, r, 1)
    assert mg.forward.bytes_moved == E * (2 * m * n + r * (m + n)) + 2 * m + 2 * m * n + 2 * n == 90


def test_layer_is_gate_up_plus_down():
    H, I = 5, 3
    for way in ("merged", "split"):
        lc = C.layer_cost(way, H, I, E, K, T, r, dtype_bytes=2)
        gu, dn = C.projection_cost(way, H, 2 * I, E, K, T, r, 2), C.projection_cost(way, I, H, E, K, T, r, 2)
        assert lc.gate_up == gu and lc.down == dn
        assert lc.forward.flops == gu.forward.flops + dn.forward.flops
        assert lc.backward.bytes_moved == gu.backward.bytes_moved + dn.backward.bytes_moved
        assert lc.forward.peak_bytes == gu.saved + dn.saved
        # backward peak: the down phase holds both saved sets plus its own transient and grads
        assert lc.backward.peak_bytes >= gu.saved + dn.saved + dn.transient + dn.grads
        assert lc.backward.peak_bytes >= gu.saved + gu.transient + gu.grads + dn.grads


def test_crossover_is_9k_for_qwen3_not_16k():
    t = C.crossover_tokens(2048, 768, 128, 8, 64)
    # Emn/(K(m+n)) = 8936.7, times (1 + 1/128): the document's own formula gives ~9.0K where it states 16K
    assert t == pytest.approx(128 * 2048 * 768 / (8 * (2048 + 768)) * (1 + 1 / 128), rel=1e-12)
    assert 8900 < t < 9100
    assert abs(t - 16384) > 7000


@pytest.mark.parametrize("shape", [(2048, 768, 128, 8, 64), (2048, 1536, 128, 8, 64), (2880, 5760, 32, 4, 64),
                                   (2880, 2880, 32, 4, 16), (7168, 2048, 256, 8, 8)])
def test_forward_flops_cross_at_crossover(shape):
    mm, nn, EE, KK, rr = shape
    t = C.crossover_tokens(mm, nn, EE, KK, rr)
    below, above = math.ceil(t) - 1, math.floor(t) + 1  # the nearest whole token counts on either side
    fwd = lambda way, T_: C.projection_cost(way, mm, nn, EE, KK, T_, rr).forward.flops  # noqa: E731
    if t == int(t):  # an exact crossover: equal FLOPs there
        assert fwd("split", int(t)) == fwd("merged", int(t))
    assert fwd("split", below) < fwd("merged", below)
    assert fwd("split", above) > fwd("merged", above)


def test_backward_rank_bound_formula_and_claim():
    """With the backward, merged - split = E·m·n(6r+1) + M(2mn - 6r(m+n)): split wins at every T iff
    r <= mn/(3(m+n)). Check the identity, then the claim just below and the failure just above the bound."""
    for mm, nn, EE, KK in [(2048, 768, 128, 8), (768, 2048, 128, 8), (2880, 5760, 32, 4), (64, 48, 7, 3)]:
        bound = C.backward_rank_bound(mm, nn)
        assert bound == pytest.approx(mm * nn / (3 * (mm + nn)), rel=1e-15)
        tokens = [0, 1, 7, 1000, 10**5, 10**8, 10**12]
        for rr in (1, math.floor(bound)):
            for T_ in tokens:
                mg, sp = (C.projection_cost(w, mm, nn, EE, KK, T_, rr) for w in ("merged", "split"))
                diff = mg.flops - sp.flops
                assert diff == EE * mm * nn * (6 * rr + 1) + T_ * KK * (2 * mm * nn - 6 * rr * (mm + nn))
                assert diff > 0, (mm, nn, rr, T_)
        rr = math.floor(bound) + 1  # above the bound, merged wins once T is large enough
        mg, sp = (C.projection_cost(w, mm, nn, EE, KK, 10**12, rr) for w in ("merged", "split"))
        assert mg.flops < sp.flops


def test_qwen3_and_gpt_oss_ranks_are_below_the_bound():
    # r=64 on Qwen3-30B-A3B (gate_up 2048x1536, down 768x2048) and gpt-oss-20b (2880x5760, 2880x2880)
    for mm, nn in [(2048, 1536), (768, 2048), (2048, 768), (2880, 5760), (2880, 2880)]:
        assert 64 < C.backward_rank_bound(mm, nn)


def test_monotonicity():
    args = dict(m=64, n=48, E=8, K=2, r=4)
    for way in ("merged", "split"):
        prev = None
        for T_ in (1, 2, 5, 40, 300):
            c = C.projection_cost(way, **args, T=T_)
            if prev is not None:
                assert c.forward.flops > prev.forward.flops and c.backward.flops > prev.backward.flops
                assert c.forward.bytes_moved > prev.forward.bytes_moved
                assert c.backward.bytes_moved > prev.backward.bytes_moved
                if way == "merged":  # W' and dW' do not depend on T
                    assert c.backward.peak_bytes == prev.backward.peak_bytes
                else:  # Z and dZ grow with the routed rows
                    assert c.backward.peak_bytes > prev.backward.peak_bytes
            prev = c
        for r_lo, r_hi in itertools.pairwise((1, 2, 8, 16)):
            lo = C.projection_cost(way, 64, 48, 8, 2, 50, r_lo)
            hi = C.projection_cost(way, 64, 48, 8, 2, 50, r_hi)
            assert hi.flops > lo.flops and hi.bytes_moved > lo.bytes_moved
            assert hi.backward.peak_bytes > lo.backward.peak_bytes


def test_split_never_materialises_weight_sized_tensors():
    # Qwen3-30B-A3B layer at 4K tokens: merged holds W' of both projections (E·H·2I + E·I·H elements, 1.2 GB bf16);
    # split's extra is Z = M·r per projection (a few MB)
    mg = C.layer_cost("merged", 2048, 768, 128, 8, 4096, 64)
    sp = C.layer_cost("split", 2048, 768, 128, 8, 4096, 64)
    assert mg.forward.peak_bytes == 2 * (128 * 2048 * 1536 + 128 * 768 * 2048)
    assert sp.forward.peak_bytes == 2 * 2 * (4096 * 8 * 64)
    assert sp.backward.peak_bytes < mg.backward.peak_bytes / 10


def test_rejects_bad_arguments():
    with pytest.raises(ValueError, match="way"):
        C.projection_cost("fused", 2, 3, 4, 2, 3, 1)
    with pytest.raises(ValueError, match="K=5"):
        C.projection_cost("split", 2, 3, 4, 5, 3, 1)
    with pytest.raises(ValueError, match="r must"):
        C.projection_cost("split", 2, 3, 4, 2, 3, 0)
    with pytest.raises(ValueError, match="T must"):
        C.projection_cost("split", 2, 3, 4, 2, -1, 1)


def test_summary_table_lists_every_token_count():
    table = C.summary_table("tiny", 8, 4, 4, 2, 2, (16, 64))
    rows = [ln for ln in table.splitlines() if ln.startswith("| 16 ") or ln.startswith("| 64 ")]
    assert len(rows) == 4  # fwd and bwd for each T


def test_spec_numbers_come_from_this_model():
    """SPEC.md's cost tables and crossovers are cost.py's output; this keeps them in sync when either changes."""
    spec = (Path(C.__file__).parent / "SPEC.md").read_text()
    for name, H, I, E_, K_ in (("Qwen3-30B-A3B", 2048, 768, 128, 8), ("gpt-oss-20b", 2880, 2880, 32, 4)):
        table = C.summary_table(name, H, I, E_, K_, 64, (1024, 4096, 16384, 65536))
        for row in table.splitlines()[2:]:
            assert row in spec, f"SPEC.md lacks (or has a stale) row: {row}"
    for value in (C.crossover_tokens(2048, 768, 128, 8, 64), C.crossover_tokens(2048, 1536, 128, 8, 64),
                  C.crossover_tokens(2880, 5760, 32, 4, 64), C.crossover_tokens(2880, 2880, 32, 4, 64)):
        assert f"{value:.0f}" in spec
