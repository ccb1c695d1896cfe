"""benchmarks/loss_bench.py's --chunk-rows rows (CPU): the chunk size reaches torch_impl's loss, and changes how the
loss is computed, not what."""

import pytest

torch = pytest.importorskip("torch")

from benchmarks import loss_bench  # noqa: E402
from torch_impl.loss import default_chunk_rows  # noqa: E402


def _problem():
    g = torch.Generator().manual_seed(0)
    S, H, V = 300, 32, 1000
    h = torch.randn(1, S, H, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn(V, H, generator=g, dtype=torch.float64) * 0.1
    labels = torch.randint(0, V, (1, S), generator=g)
    labels[:, :5] = -100
    assert default_chunk_rows(V) > S  # the default is one chunk here, so every chunk size below splits the rows
    return h, w, labels


@pytest.mark.parametrize("impl", loss_bench.CHUNKED)
def test_chunk_rows_reach_the_loss(impl, monkeypatch):
    seen = []
    monkeypatch.setattr(loss_bench, "fused_linear_cross_entropy", lambda *a, **kw: seen.append(kw))
    fn = getattr(loss_bench, "_" + impl)
    fn(*_problem(), chunk_rows=128)
    fn(*_problem())
    assert [kw["chunk_rows"] for kw in seen] == [128, None]  # None: torch_impl.loss picks its default


@pytest.mark.parametrize("chunk", [64, 128, 320])
def test_chunk_rows_give_the_one_chunk_loss_and_gradient(chunk):
    h, w, labels = _problem()
    loss = loss_bench._splitmoe(h, w, labels)
    (dh,) = torch.autograd.grad(loss, h)
    loss_c = loss_bench._splitmoe(h, w, labels, chunk_rows=chunk)
    (dh_c,) = torch.autograd.grad(loss_c, h)
    torch.testing.assert_close(loss_c, loss, rtol=1e-12, atol=0)  # float64: only the summation order differs
    torch.testing.assert_close(dh_c, dh, rtol=1e-12, atol=1e-15)
