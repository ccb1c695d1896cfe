"""The cached launch path of the Triton kernels (`torch_impl/kernels/launch.py`).

On CPU: its bookkeeping against a stand-in for a JIT function and its compiled kernel (what is keyed, what misses,
the order of the values a direct launch passes, what is never cached). On the GPU (`gpu`): the real kernels give
bitwise the same forward and gradients through the cached path as through Triton's own, for both NN kernel
families, including an operand whose address is not 16-byte aligned (a key Triton specialises on).
"""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("triton")

from torch_impl.kernels import launch as L  # noqa: E402


class _Compiled:
    """Stands in for triton's CompiledKernel: records direct launches."""

    function, packed_metadata = "fn-handle", "packed"

    def __init__(self, log):
        self.log = log

    def launch_metadata(self, grid, stream, *values):
        return ("meta", grid)

    def run(self, g0, g1, g2, stream, function, packed, meta, enter, leave, *values):
        self.log.append(("direct", (g0, g1, g2), stream, meta, values))


class _Future:
    """An asynchronous compile's result: has `result`, must not be cached."""

    def __init__(self, log):
        self.log = log

    def result(self):  # pragma: no cover - never called by launch
        raise AssertionError

    def run(self, *a):  # pragma: no cover
        raise AssertionError


class _JIT:
    """Stands in for a JITFunction with parameters (p, n, f, BLOCK, MODE)."""

    arg_names = ["p", "n", "f", "BLOCK", "MODE"]

    def __init__(self, returns=_Compiled):
        self.log = []
        self.returns = returns

    def __getitem__(self, grid):
        def run(*args, **kw):
            self.log.append(("triton", grid, args, kw))
            return self.returns(self.log)
        return run


@pytest.fixture(autouse=True)
def _fresh():
    L.clear()
    yield
    L.clear()


def _go(fn, args, constexprs=None, grid=(4, 2), **kw):
    L.cached_launch(fn, grid, args, constexprs or {"MODE": 1, "BLOCK": 64}, num_warps=kw.get("num_warps", 4),
                    num_stages=2, device=0, stream=7)


def test_second_identical_call_launches_directly_with_values_in_signature_order():
    fn, t = _JIT(), torch.zeros(8)
    _go(fn, (t, 5, 1.5))
    _go(fn, (t, 5, 2.5))  # a float's value is not specialised: the same kernel
    assert [e[0] for e in fn.log] == ["triton", "direct"]
    kind, grid, stream, meta, values = fn.log[1]
    assert grid == (4, 2, 1) and stream == 7 and meta == ("meta", (4, 2))
    # constexprs given as {"MODE", "BLOCK"} go in the signature's order (BLOCK, MODE) after the runtime args
    assert values[1:] == (5, 2.5, 64, 1) and values[0] is t
    assert fn.log[0][3] == {"MODE": 1, "BLOCK": 64, "num_warps": 4, "num_stages": 2}


@pytest.mark.parametrize("change", ["int", "constexpr", "dtype", "alignment", "num_warps", "bool_for_int"])
def test_a_change_triton_specialises_on_misses(change):
    fn = _JIT()
    t = torch.zeros(64, dtype=torch.float16)
    base = dict(args=(t, 32, 1.0), constexprs={"BLOCK": 64, "MODE": 1})
    _go(fn, **base)
    other = {
        "int": dict(base, args=(t, 33, 1.0)),  # 32 % 16 == 0, 33 not: another Triton specialisation
        "constexpr": dict(base, constexprs={"BLOCK": 128, "MODE": 1}),
        "dtype": dict(base, args=(t.float(), 32, 1.0)),
        "alignment": dict(base, args=(t[1:], 32, 1.0)),  # 2 bytes past a 16-byte boundary
        "num_warps": dict(base, num_warps=8),
        "bool_for_int": dict(base, args=(t, True, 1.0)),
    }[change]
    _go(fn, other["args"], other["constexprs"], num_warps=other.get("num_warps", 4))
    assert [e[0] for e in fn.log] == ["triton", "triton"]


def test_an_aligned_view_at_another_address_hits():
    fn = _JIT()
    t = torch.zeros(64, dtype=torch.float16)
    _go(fn, (t, 32, 1.0))
    _go(fn, (t[8:], 32, 1.0))  # 16 bytes on: the same alignment class
    assert [e[0] for e in fn.log] == ["triton", "direct"]


def test_unkeyable_arguments_and_futures_always_take_tritons_path():
    fn = _JIT()
    for _ in range(2):
        _go(fn, (torch.zeros(4), (1, 2), 1.0))  # a tuple argument: not keyed
    fut = _JIT(returns=_Future)
    for _ in range(2):
        _go(fut, (torch.zeros(4), 1, 1.0))
    assert [e[0] for e in fn.log] == ["triton", "triton"]
    assert [e[0] for e in fut.log] == ["triton", "triton"]


def test_missing_constexpr_names_are_not_cached():
    fn = _JIT()
    for _ in range(2):
        _go(fn, (torch.zeros(4), 1, 1.0), {"BLOCK": 64})  # MODE left to a default: a direct launch could not pass it
    assert [e[0] for e in fn.log] == ["triton", "triton"]


def test_the_cache_is_bounded(monkeypatch):
    monkeypatch.setattr(L, "MAX_ENTRIES", 2)
    fn, t = _JIT(), torch.zeros(4)
    for n in (16, 32, 48, 16):  # the third entry clears the first two: 16 misses again
        _go(fn, (t, n, 1.0))
    assert [e[0] for e in fn.log] == ["triton"] * 4
    _go(fn, (t, 16, 1.0))
    assert fn.log[-1][0] == "direct"


class _OtherLauncher(_Compiled):
    def run(self, *args):
        raise TypeError("function takes exactly 9 arguments")


def test_a_launcher_that_refuses_the_arguments_falls_back_for_good():
    """A Triton whose launcher signature differs: the first direct launch raises TypeError before launching; the
    call goes through Triton's path with a warning, and so does every later call of that kernel."""
    fn, t = _JIT(returns=_OtherLauncher), torch.zeros(4)
    _go(fn, (t, 1, 1.0))
    with pytest.warns(RuntimeWarning, match="does not fit this Triton's launcher"):
        _go(fn, (t, 1, 1.0))
    _go(fn, (t, 1, 1.0))
    assert [e[0] for e in fn.log] == ["triton", "triton", "triton"]


def test_cpu_tensors_always_take_tritons_path():
    fn = _JIT()
    for _ in range(2):
        L.launch(fn, (1,), (torch.zeros(4), 1, 1.0), {"BLOCK": 64, "MODE": 1}, num_warps=4, num_stages=2)
    assert [e[0] for e in fn.log] == ["triton", "triton"]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
@pytest.mark.parametrize("backend", ["triton", "triton_hopper"])
def test_gpu_cached_launches_equal_tritons_bitwise(backend, monkeypatch):
    """The expert Function's forward and every gradient, bf16, through Triton's path (SPLITMOE_FAST_LAUNCH=0), then
    twice through the cached one (the second call hits for every launch), on inputs whose x is a view one row of
    odd width past a 16-byte boundary and on aligned inputs."""
    if backend == "triton_hopper" and torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("the Hopper kernels need sm_90+")
    from torch_impl.moe import split_lora_experts

    g = torch.Generator("cuda").manual_seed(0)
    T, H, I, E, K, R = 300, 136, 72, 7, 2, 16
    dt = torch.bfloat16

    def rnd(*shape, s=0.1):
        return (torch.randn(*shape, generator=g, device="cuda") * s).to(dt)

    x_store = rnd(T * H + 1, s=1.0)
    w_gu, w_d = rnd(E, H, 2 * I), rnd(E, I, H)
    lora = [rnd(E, H, R), rnd(E, R, 2 * I), rnd(E, I, R), rnd(E, R, H)]
    ids = torch.randint(0, E - 1, (T, K), generator=g, device="cuda")  # the last expert gets no tokens
    wts = torch.rand(T, K, generator=g, device="cuda").to(dt)
    dy = rnd(T, H, s=1.0)

    def run(offset):
        x = x_store[offset:offset + T * H].view(T, H).detach().requires_grad_(True)
        w = wts.clone().requires_grad_(True)
        lo = [a.clone().requires_grad_(True) for a in lora]
        y = split_lora_experts(x, ids, w, w_gu, w_d, tuple(lo[:2]), tuple(lo[2:]), scale=2.0, backend=backend)
        y.backward(dy)
        torch.cuda.synchronize()
        return [y.detach(), x.grad, w.grad] + [a.grad for a in lo]

    for offset in (0, 1):  # 1: x starts 2 bytes past an aligned address
        monkeypatch.setenv("SPLITMOE_FAST_LAUNCH", "0")
        L.clear()
        want = run(offset)
        monkeypatch.setenv("SPLITMOE_FAST_LAUNCH", "1")
        first, second = run(offset), run(offset)
        assert any(L._CACHES.values()), "nothing was cached"
        for name, a, b, c in zip(("y", "dx", "dw", "dA1", "dB1", "dA2", "dB2"), want, first, second):
            assert torch.equal(a, b) and torch.equal(a, c), f"{backend} {name} differs through the cached launch"
