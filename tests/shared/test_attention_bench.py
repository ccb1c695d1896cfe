"""benchmarks/attention_bench.py's accuracy columns: the literal softmax it checks each kernel against reads the kv
heads the checked query heads attend to, for grouped-query attention (several query heads per kv head) and for MLA
(one kv head per query head, v narrower than q/k). Until 2026-12-06 it read kv head 0 for both checked heads, so the
MLA rows reported a relative error near 1.0 for every kernel."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")


@pytest.mark.parametrize("heads,kv_heads,expected", [(64, 8, [0]), (32, 4, [0]), (4, 2, [0]), (20, 20, [0, 1]),
                                                     (128, 128, [0, 1]), (2, 1, [0])])
def test_kv_heads_of_the_checked_query_heads(heads, kv_heads, expected):
    from benchmarks.attention_bench import kv_heads_of

    assert kv_heads_of(2, heads, kv_heads) == expected


@pytest.mark.parametrize("heads,kv_heads,D,Dv", [(8, 2, 16, 16), (4, 4, 24, 16)], ids=["gqa", "mla"])
def test_literal_on_the_checked_heads_equals_sdpa(heads, kv_heads, D, Dv):
    from benchmarks.attention_bench import kv_heads_of, literal

    g = torch.Generator().manual_seed(0)
    q = torch.randn(1, heads, 12, D, generator=g, dtype=torch.float64)
    k = torch.randn(1, kv_heads, 12, D, generator=g, dtype=torch.float64)
    v = torch.randn(1, kv_heads, 12, Dv, generator=g, dtype=torch.float64)
    full = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    kv = kv_heads_of(2, heads, kv_heads)
    got = literal(q[:, :2], k[:, kv], v[:, kv])
    torch.testing.assert_close(got, full[:, :2].float(), rtol=1e-5, atol=1e-5)  # literal works in fp32
