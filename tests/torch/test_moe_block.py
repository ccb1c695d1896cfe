"""Each expert backend against the float64 oracle `shared_math.reference`: forward and every gradient.

One suite parametrised over backends and shape cases: fp32 on CPU over `cases("ci")`, bf16 on CUDA over
`cases("gpu")` (marked `gpu`). Gradients checked: x, expert_weights, both LoRA pairs, biases, and the base weights
(made to require grad here only to check them; in training they are frozen and get none).
"""

from __future__ import annotations

import os

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from shared_math import reference as ref  # noqa: E402
from shared_math.cases import cases, make_moe_inputs  # noqa: E402
from shared_math.numerics import assert_close  # noqa: E402
from torch_impl.backends import BACKENDS, resolve_backend, why_unavailable  # noqa: E402
from torch_impl.moe import sort_by_expert, split_lora_experts  # noqa: E402


def _run(backend: str, inp: dict, dtype: torch.dtype, device: str, dy: np.ndarray, base_grad: bool,
         experts=split_lora_experts):
    """Forward + backward through `experts` (`split_lora_experts` or a function with its signature); returns (y,
    grads dict shaped like the reference's)."""
    def t(a, grad=True):
        return torch.tensor(a, dtype=dtype, device=device).requires_grad_(grad)

    x, w = t(inp["x"]), t(inp["expert_weights"])
    wgu, wd = t(inp["w_gate_up"], base_grad), t(inp["w_down"], base_grad)
    lgu, ld = tuple(map(t, inp["lora_gate_up"])), tuple(map(t, inp["lora_down"]))
    b = None if inp["biases"] is None else tuple(map(t, inp["biases"]))
    ids = torch.tensor(inp["expert_ids"], device=device)
    y = experts(x, ids, w, wgu, wd, lgu, ld, scale=inp["scale"], biases=b, activation=inp["activation"],
                swiglu_limit=inp["swiglu_limit"], backend=backend)
    y.backward(torch.tensor(dy, dtype=dtype, device=device))
    grads = {"x": x.grad, "expert_weights": w.grad, "lora_gate_up": (lgu[0].grad, lgu[1].grad),
             "lora_down": (ld[0].grad, ld[1].grad), "w_gate_up": wgu.grad, "w_down": wd.grad,
             "biases": None if b is None else (b[0].grad, b[1].grad)}
    return y, grads


def _compare(backend, case, dtype, device, seed, experts=split_lora_experts):
    if (why := why_unavailable(backend, device, dtype)) is not None:
        pytest.skip(f"{backend} unavailable on {device} {dtype}: {why}")
    inp = make_moe_inputs(case, seed=seed % 1000)
    dy = np.random.default_rng(seed).standard_normal((case.T, case.H))
    # inputs rounded to the test dtype first, so the oracle sees exactly what the backend sees
    rounded = {k: (torch.tensor(v).to(dtype).double().numpy() if isinstance(v, np.ndarray) and k != "expert_ids"
                   else (tuple(torch.tensor(a).to(dtype).double().numpy() for a in v) if isinstance(v, tuple) else v))
               for k, v in inp.items()}
    dy = torch.tensor(dy).to(dtype).double().numpy()
    y, grads = _run(backend, rounded, dtype, device, dy, base_grad=True, experts=experts)
    dname = str(dtype).replace("torch.", "")
    assert_close(y, ref.split_lora_experts(**rounded), dtype=dname, quantity="moe_block", name=f"{backend} y")
    expected = ref.split_lora_experts_vjp(**rounded, dy=dy)
    for key, exp in expected.items():
        if exp is None:
            assert grads[key] is None, f"{backend}: {key} should have no gradient"
            continue
        got = grads[key]
        for i, (g, e) in enumerate(zip(got, exp) if isinstance(exp, tuple) else [(got, exp)]):
            assert g is not None, f"{backend}: no gradient for {key}[{i}]"
            assert_close(g, e, dtype=dname, quantity="moe_grad", name=f"{backend} d{key}[{i}]")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", cases("ci"), ids=lambda c: c.name)
def test_backend_matches_reference_fp32(backend, case, seed):
    _compare(backend, case, torch.float32, "cpu", seed)


# oai_biases clamps at limit 1.0, so many gate/up values sit at the clamp; in bf16 the pre-activation rounds across
# it, which switches that entry's gradient on or off (an O(1) change the fp32 oracle cannot mirror). Measured on CPU
# bf16: dx off by 8.6 % of max for both backends alike. The clamps themselves are checked in fp32 above.
_GPU_CASES = [pytest.param(c, marks=pytest.mark.xfail(reason="bf16 rounding crosses the clamp at limit 1.0",
                                                      strict=False))
              if c.name == "oai_biases" else c for c in cases("gpu")]


@pytest.mark.gpu
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", _GPU_CASES, ids=lambda c: c.name)
def test_backend_matches_reference_bf16_cuda(backend, case, seed):
    _compare(backend, case, torch.bfloat16, "cuda", seed)


def _skip_unless_cpu_fp32(backend: str) -> None:
    """The triton backend runs on CPU only in the interpreter; test_triton_kernels.py covers it there."""
    reason = why_unavailable(backend, "cpu", torch.float32)
    if reason:
        pytest.skip(f"{backend} unavailable in fp32 on CPU: {reason}")


@pytest.mark.parametrize("backend", BACKENDS)
def test_frozen_base_gets_no_gradient(backend, seed):
    """requires_grad False on the base weights: no gradient is computed or stored for them."""
    _skip_unless_cpu_fp32(backend)
    case = cases("ci")[0]
    inp = make_moe_inputs(case, seed=seed % 1000)
    y, grads = _run(backend, inp, torch.float32, "cpu", np.ones((case.T, case.H)), base_grad=False)
    assert grads["w_gate_up"] is None and grads["w_down"] is None
    assert grads["lora_gate_up"][0] is not None and grads["x"] is not None


@pytest.mark.parametrize("backend", BACKENDS)
def test_without_lora_equals_reference(backend, seed):
    """No LoRA pairs at all: the plain routed experts."""
    _skip_unless_cpu_fp32(backend)
    case = cases("ci")[1]
    inp = make_moe_inputs(case, seed=seed % 1000)
    inp32 = {k: (v.astype(np.float32) if isinstance(v, np.ndarray) and v.dtype == np.float64 else v)
             for k, v in inp.items()}
    t = torch.tensor
    y = split_lora_experts(t(inp32["x"]), t(inp["expert_ids"]), t(inp32["expert_weights"]), t(inp32["w_gate_up"]),
                           t(inp32["w_down"]), backend=backend)
    expected = ref.split_lora_experts(inp32["x"], inp["expert_ids"], inp32["expert_weights"], inp32["w_gate_up"],
                                      inp32["w_down"])
    assert_close(y, expected, dtype="float32", quantity="moe_block")


def test_backends_agree_bitwise_in_fp32_forward(seed):
    """native and grouped_mm run the same GEMMs on the same sorted rows; on CPU fp32 they agree to rounding."""
    if why_unavailable("grouped_mm", "cpu", torch.float32):
        pytest.skip("grouped_mm unavailable")
    case = cases("ci")[-1]
    inp = make_moe_inputs(case, seed=seed % 1000)
    args = [torch.tensor(inp[k], dtype=torch.float32) for k in ("x", "expert_weights", "w_gate_up", "w_down")]
    ids = torch.tensor(inp["expert_ids"])
    ys = [split_lora_experts(args[0], ids, *args[1:], backend=b) for b in ("native", "grouped_mm")]
    assert_close(ys[0], ys[1], dtype="float32", quantity="moe_block", name="native vs grouped_mm")


def test_sort_by_expert_is_stable_and_consistent():
    ids = torch.tensor([[2, 0], [0, 2], [1, 0]])
    srt = sort_by_expert(ids, 4)
    assert srt.expert_M.tolist() == [0, 0, 0, 1, 2, 2]
    assert srt.order_M.tolist() == [1, 2, 5, 4, 0, 3]  # (token, slot) order within an expert
    assert srt.group_sizes_E.tolist() == [3, 1, 2, 0]
    assert srt.offsets_E.tolist() == [3, 4, 6, 6] and srt.offsets_E.dtype == torch.int32
    assert (srt.order_M[srt.inverse_M] == torch.arange(6)).all()
    with pytest.raises(ValueError, match=r"expert ids must lie in \[0, 4\)"):
        sort_by_expert(torch.tensor([[4, 0]]), 4)


@pytest.mark.parametrize("num_experts", [1, 7, 256, 257, 40000])
def test_sort_by_expert_narrow_keys_give_the_int64_order(num_experts):
    """The sort runs on uint8 / int16 keys where the ids fit (fewer radix passes on a GPU): the same stable order,
    expert ids (int64) and groups as sorting the int64 ids, at each width's edges (E = 256: id 255 in uint8; E = 257:
    int16; E = 40000: int64)."""
    g = torch.Generator().manual_seed(num_experts)
    ids = torch.randint(0, num_experts, (301, 3), generator=g)
    ids[0, 0], ids[-1, -1] = num_experts - 1, 0
    srt = sort_by_expert(ids, num_experts)
    order = torch.argsort(ids.reshape(-1), stable=True)
    assert torch.equal(srt.order_M, order) and srt.expert_M.dtype == torch.int64
    assert torch.equal(srt.expert_M, ids.reshape(-1)[order])
    assert torch.equal(srt.group_sizes_E, torch.bincount(ids.reshape(-1), minlength=num_experts))


def test_resolve_backend(monkeypatch):
    monkeypatch.delenv("SPLITMOE_MOE_BACKEND", raising=False)
    assert resolve_backend("native") == "native"
    assert resolve_backend("auto", device="cpu", dtype=torch.float32) in ("grouped_mm", "native")  # never triton on CPU
    monkeypatch.setenv("SPLITMOE_MOE_BACKEND", "native")
    assert resolve_backend("auto") == "native"
    assert resolve_backend("grouped_mm", dtype=torch.float32) == "grouped_mm"  # an explicit name beats the env
    monkeypatch.setenv("SPLITMOE_MOE_BACKEND", "nonsense")
    with pytest.raises(ValueError, match="SPLITMOE_MOE_BACKEND.*known: triton_hopper, triton, grouped_mm, native"):
        resolve_backend("auto")
    with pytest.raises(ValueError, match="unknown MoE backend 'cutlass'"):
        resolve_backend("cutlass")
    if os.environ.get("TRITON_INTERPRET") != "1":  # triton on CPU runs only in the interpreter, and says so
        with pytest.raises(RuntimeError, match="triton.*TRITON_INTERPRET=1"):
            resolve_backend("triton", device="cpu", dtype=torch.float32)
    # float64 has no grouped_mm kernel: a clear error naming why and what is available, before any work
    with pytest.raises(RuntimeError, match=r"grouped_mm.*float64.*Available here: native"):
        resolve_backend("grouped_mm", device="cpu", dtype=torch.float64)


def test_bad_shapes_raise_clearly():
    x = torch.zeros(3, 8)
    with pytest.raises(ValueError, match="expert weights do not fit"):
        split_lora_experts(x, torch.zeros(3, 1, dtype=torch.long), torch.ones(3, 1), torch.zeros(2, 9, 8),
                           torch.zeros(2, 4, 8))
