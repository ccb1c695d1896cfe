"""The `triton` backend's kernels and autograd.Function against the float64 oracle `shared_math.reference`.

On CPU everything runs in the Triton interpreter, in fp32 and fp16 over `cases("ci")` (its bf16 dot is wrong);
tests marked `gpu` run the compiled kernels in bf16 over `cases("gpu")` against the reference and the `grouped_mm`
backend. Checked: each kernel mode on its own (fused gather, in-loop LoRA-A, LoRA/bias/activation epilogues, the
activation-backward epilogue with the routing-weight partial dots, scatter stores, the ragged-K TN kernel), then the
whole Function: forward and every gradient (x, expert_weights, both LoRA pairs, biases, base weights in full-FT mode).

Interpreter mode is fixed when a function is decorated with `@triton.jit`, and triton's own library functions
(`tl.sigmoid`, `tl.sum`, ...) are decorated when triton is imported; triton also reads TRITON_INTERPRET at launch
(lazy imports). So on CPU the variable must be set before the first `import triton` in the process, and while the
kernels run. Under pytest another module may have imported triton first (transformers does). This module therefore
sets the variable before importing triton when it can, restores it once the kernels are imported, and sets it again
only around its own tests, so no other test sees it. When triton was already imported in compiled mode, the
interpreter tests skip here and `test_cpu_kernels_in_a_fresh_interpreter_process` runs this file in a new process.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"

from tests.torch.interpreter import import_interpreted  # noqa: E402

IN_PROCESS = import_interpreted("torch_impl.kernels.split_lora") is None
pytest.importorskip("triton")

from shared_math import reference as ref  # noqa: E402
from shared_math.cases import cases, get_case, make_moe_inputs  # noqa: E402
from shared_math.numerics import assert_close  # noqa: E402
from shared_math.tuning import split_chunks  # noqa: E402
from torch_impl.kernels import grouped_gemm as gg  # noqa: E402
from torch_impl.kernels import split_lora as sl  # noqa: E402

cpu_only = pytest.mark.skipif(not IN_PROCESS, reason="Triton interpreter tests: CPU only, and only where triton was "
                              "not imported compiled before this module (else the fresh-process test runs them)")
# Kernel-by-kernel tests run in fp32 on either side: interpreted on CPU, compiled (IEEE fp32 dots) on CUDA.
kernel_test = pytest.mark.skipif(not (IN_PROCESS or CUDA), reason="needs CUDA or the Triton interpreter in-process")
CPU_DTYPES = [torch.float32, torch.float16]


@pytest.fixture(autouse=True)
def _interpreter_env(monkeypatch):
    """Triton also reads TRITON_INTERPRET at launch (lazy imports), so keep it on during this module's tests only."""
    if IN_PROCESS:
        monkeypatch.setenv("TRITON_INTERPRET", "1")


def _dname(dtype) -> str:
    return str(dtype).replace("torch.", "")


def _rounded_inputs(case, seed: int, dtype) -> dict:
    """make_moe_inputs rounded to `dtype` (kept as float64 numpy), so the oracle sees exactly what the kernels see."""
    inp = make_moe_inputs(case, seed=seed % 1000)

    def r(a):
        return torch.tensor(a).to(dtype).double().numpy()

    return {k: (r(v) if isinstance(v, np.ndarray) and k != "expert_ids"
                else (tuple(r(a) for a in v) if isinstance(v, tuple) else v)) for k, v in inp.items()}


def _run(inp: dict, dtype, dy: np.ndarray, base_grad: bool = True, lora_dtype=None, kernels: str = "triton",
         output_unread: bool = False):
    """Forward + backward through the kernels' `split_lora_experts` (NN kernel family `kernels`: "triton" or
    "hopper", see tests/torch/test_hopper_kernels.py; `output_unread` passed on); grads shaped like the reference's
    dict."""
    def t(a, grad=True, dt=dtype):
        return torch.tensor(a, dtype=dt, device=DEVICE).requires_grad_(grad)

    x, w = t(inp["x"]), t(inp["expert_weights"])
    wgu, wd = t(inp["w_gate_up"], base_grad), t(inp["w_down"], base_grad)
    ldt = lora_dtype or dtype
    lgu = tuple(t(a, dt=ldt) for a in inp["lora_gate_up"])
    ld = tuple(t(a, dt=ldt) for a in inp["lora_down"])
    b = None if inp["biases"] is None else tuple(map(t, inp["biases"]))
    ids = torch.tensor(inp["expert_ids"], device=DEVICE)
    y = sl.split_lora_experts(x, ids, w, wgu, wd, lgu, ld, scale=inp["scale"], biases=b,
                              activation=inp["activation"], swiglu_limit=inp["swiglu_limit"], kernels=kernels,
                              output_unread=output_unread)
    y.backward(torch.tensor(dy, dtype=dtype, device=DEVICE))
    grads = {"x": x.grad, "expert_weights": w.grad, "lora_gate_up": (lgu[0].grad, lgu[1].grad),
             "lora_down": (ld[0].grad, ld[1].grad), "w_gate_up": wgu.grad, "w_down": wd.grad,
             "biases": None if b is None else (b[0].grad, b[1].grad)}
    return y, grads


def _check_against_reference(case, dtype, seed, base_grad: bool = True, lora_dtype=None, kernels: str = "triton"):
    inp = _rounded_inputs(case, seed, dtype)
    dy = torch.tensor(np.random.default_rng(seed).standard_normal((case.T, case.H))).to(dtype).double().numpy()
    y, grads = _run(inp, dtype, dy, base_grad=base_grad, lora_dtype=lora_dtype, kernels=kernels)
    assert y.dtype == dtype and y.shape == (case.T, case.H)
    dn = _dname(dtype)
    assert_close(y, ref.split_lora_experts(**inp), dtype=dn, quantity="moe_block", name="triton y")
    expected = ref.split_lora_experts_vjp(**inp, dy=dy)
    if not base_grad:
        expected["w_gate_up"] = expected["w_down"] = None
    for key, exp in expected.items():
        if exp is None:
            assert grads[key] is None or all(g is None for g in grads[key]), f"{key} should have no gradient"
            continue
        got = grads[key]
        for i, (g, e) in enumerate(zip(got, exp) if isinstance(exp, tuple) else [(got, exp)]):
            assert g is not None, f"no gradient for {key}[{i}]"
            assert_close(g, e, dtype=dn, quantity="moe_grad", name=f"triton d{key}[{i}]")
    return grads


# ---- the whole autograd.Function -------------------------------------------------------------------------------------

@cpu_only
@pytest.mark.parametrize("dtype", CPU_DTYPES, ids=_dname)
@pytest.mark.parametrize("case", cases("ci"), ids=lambda c: c.name)
def test_split_lora_experts_matches_reference(case, dtype, seed):
    _check_against_reference(case, dtype, seed)


@cpu_only
@pytest.mark.parametrize("dtype", CPU_DTYPES, ids=_dname)
@pytest.mark.parametrize("case", [get_case(n) for n in ("odd_dims", "k1", "empty_experts", "oai_biases")],
                         ids=lambda c: c.name)
def test_precomputed_z_matches_reference_and_in_loop_z(case, dtype, seed, monkeypatch):
    """Z_PRE (z = x·A in its own skinny launch, then the base pass with z given) gives every output and gradient of
    the reference, and exactly the in-loop z's numbers: same tiles, same reduction order, same rounding of z."""
    from torch_impl.kernels import autotune

    in_loop = _check_against_reference(case, dtype, seed)
    pre = {k: dict(v, Z_PRE=True) for k, v in autotune.INTERPRETER_CONFIGS.items()}
    monkeypatch.setattr(autotune, "INTERPRETER_CONFIGS", pre)
    calls = []
    real = gg._grouped_gemm_kernel

    class Spy:
        def __getitem__(self, grid):
            def launch(*args, **kw):
                calls.append(kw["LORA"])
                return real[grid](*args, **kw)
            return launch

    monkeypatch.setattr(gg, "_grouped_gemm_kernel", Spy())
    grads = _check_against_reference(case, dtype, seed)
    assert gg.LORA_FUSE_Z not in calls and calls.count(gg.LORA_GIVEN_Z) == 4  # gate_up, down, dh, dx
    for key, g in in_loop.items():
        for a, b in zip(*(v if isinstance(v, tuple) else (v,) for v in (g, grads[key]))):
            assert (a is None and b is None) or torch.equal(a, b), f"d{key} differs between in-loop and precomputed z"


@cpu_only
def test_fp32_lora_master_weights_with_fp16_activations(seed):
    """LoRA parameters kept in fp32 (as PEFT does) with fp16 activations: grads come back in fp32 and correct."""
    grads = _check_against_reference(get_case("odd_dims"), torch.float16, seed, lora_dtype=torch.float32)
    assert all(g.dtype == torch.float32 for g in (*grads["lora_gate_up"], *grads["lora_down"]))


@cpu_only
def test_model_path_passes_fp32_lora_masters_through(seed, monkeypatch):
    """torch_impl.moe.split_lora_experts(backend="triton") hands fp32 LoRA masters to the kernels uncast: the
    gradients come back fp32 without a round trip through the activation dtype, and match the float64 oracle."""
    from torch_impl.moe import split_lora_experts

    case = get_case("odd_dims")
    inp = _rounded_inputs(case, seed, torch.float16)
    dy = torch.tensor(np.random.default_rng(seed).standard_normal((case.T, case.H))).to(torch.float16)
    seen = []
    real = sl.SplitLoraExpertsFunction.apply
    monkeypatch.setattr(sl.SplitLoraExpertsFunction, "apply",
                        staticmethod(lambda *a: seen.append([t.dtype for t in a[4:8]]) or real(*a)))
    h = dict(dtype=torch.float16)
    x = torch.tensor(inp["x"], **h).requires_grad_(True)
    lora = [torch.tensor(a, dtype=torch.float32).requires_grad_(True)
            for a in (*inp["lora_gate_up"], *inp["lora_down"])]
    y = split_lora_experts(x, torch.tensor(inp["expert_ids"]), torch.tensor(inp["expert_weights"], **h),
                           torch.tensor(inp["w_gate_up"], **h), torch.tensor(inp["w_down"], **h), tuple(lora[:2]),
                           tuple(lora[2:]), scale=inp["scale"], backend="triton")
    y.backward(dy)
    assert seen == [[torch.float32] * 4], "the LoRA factors were cast before reaching the kernels"
    expected = ref.split_lora_experts_vjp(**inp, dy=dy.double().numpy())
    for g, e, label in zip([t.grad for t in lora], (*expected["lora_gate_up"], *expected["lora_down"]),
                           ("A1", "B1", "A2", "B2")):
        assert g.dtype == torch.float32
        assert_close(g, e, dtype="float16", quantity="moe_grad", name=f"d{label}")


@cpu_only
def test_frozen_base_launches_no_weight_gradient(seed, monkeypatch):
    """Frozen base weights: no dW is computed (the TN kernel runs only for the four LoRA factors), none returned."""
    calls = []
    real = gg.grouped_gemm_tn

    def spy(*args, **kw):
        out = real(*args, **kw)
        calls.append(tuple(out.shape))
        return out

    monkeypatch.setattr(gg, "grouped_gemm_tn", spy)
    case = get_case("prime_e")
    _check_against_reference(case, torch.float32, seed, base_grad=False)
    E, H, I, R = case.E, case.H, case.I, case.R
    assert sorted(calls) == sorted([(E, H, R), (E, R, 2 * I), (E, I, R), (E, R, H)])


@cpu_only
def test_backend_entry_point_matches_kernels(seed):
    """`backends.triton.experts_forward` (what the registry calls) reuses the caller's sort, gives the kernels' numbers,
    and, once "triton" is registered, `torch_impl.moe.split_lora_experts(backend="triton")` does too."""
    from torch_impl.backends import _MODULES
    from torch_impl.backends import triton as tb
    from torch_impl.backends.common import Activation
    from torch_impl.moe import sort_by_expert, split_lora_experts

    case = get_case("oai_biases")
    inp = _rounded_inputs(case, seed, torch.float32)
    t = torch.tensor
    f = dict(dtype=torch.float32)
    x, ids, w = t(inp["x"], **f), t(inp["expert_ids"]), t(inp["expert_weights"], **f)
    wgu, wd = t(inp["w_gate_up"], **f), t(inp["w_down"], **f)
    lgu, ld = (tuple(t(a, **f) for a in inp[k]) for k in ("lora_gate_up", "lora_down"))
    biases = tuple(t(a, **f) for a in inp["biases"])
    act = Activation(inp["activation"], inp["swiglu_limit"])
    y_backend = tb.experts_forward(x, w, sort_by_expert(ids, case.E), wgu, wd, lgu, ld, inp["scale"], biases, act)
    kw = dict(scale=inp["scale"], biases=biases, activation=inp["activation"], swiglu_limit=inp["swiglu_limit"])
    y_kernels = sl.split_lora_experts(x, ids, w, wgu, wd, lgu, ld, **kw)
    assert torch.equal(y_backend, y_kernels)
    assert_close(y_backend, ref.split_lora_experts(**inp), dtype="float32", quantity="moe_block")
    if "triton" in _MODULES:
        assert torch.equal(split_lora_experts(x, ids, w, wgu, wd, lgu, ld, **kw, backend="triton"), y_kernels)


def test_available_says_why_not(monkeypatch):
    from torch_impl.backends import triton as tb

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert "TRITON_INTERPRET=1" in tb.available("cpu", torch.float32)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert tb.available("cpu", torch.float32) is None
    assert "bf16" in tb.available("cpu", torch.bfloat16)
    assert "float64" in tb.available("cpu", torch.float64)


@pytest.mark.skipif(CUDA or IN_PROCESS, reason="only needed when triton was imported compiled before this module")
def test_cpu_kernels_in_a_fresh_interpreter_process():
    """Run this file's CPU tests in a new process that sets TRITON_INTERPRET=1 before triton is imported."""
    root = Path(__file__).resolve().parents[2]
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    proc = subprocess.run([sys.executable, "-m", "pytest", str(Path(__file__).resolve()), "-q", "-x",
                           "-p", "no:cacheprovider", "-m", "not gpu"], cwd=root, env=env, capture_output=True,
                          text=True, timeout=1200)
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-2000:]


# ---- kernel by kernel, against float64 torch on the same rounded inputs ----------------------------------------------

KERNEL_CASES = [get_case(n) for n in ("odd_dims", "empty_experts", "oai_biases")]
KERNEL_DTYPES = [torch.float32] + ([torch.bfloat16] if CUDA else [])


def _setup(case, seed, dtype=torch.float32, repeat: int = 1):
    """(sort, expert of each sorted row, random-tensor maker) for `case`'s routing; `repeat` > 1 stacks that routing
    `repeat` times over (T·repeat tokens: every expert's rows times `repeat`, empty experts still empty)."""
    g = torch.Generator().manual_seed(seed)
    inp = make_moe_inputs(case, seed=seed % 1000)
    ids = torch.tensor(np.tile(inp["expert_ids"], (repeat, 1)), device=DEVICE)
    srt = sl.KernelSort.from_ids(ids, case.E)
    offs = srt.offsets_E1.long().cpu()
    expert_M = torch.repeat_interleave(torch.arange(case.E), offs[1:] - offs[:-1])

    def rnd(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale).to(dtype).to(DEVICE)

    return srt, expert_M, rnd


def _per_row(a_MD: torch.Tensor, w_EDN: torch.Tensor, expert_M: torch.Tensor) -> torch.Tensor:
    """float64 reference of a grouped NN GEMM: row m times w[expert of m]."""
    return torch.einsum("md,mdn->mn", a_MD.double().cpu(), w_EDN.double().cpu()[expert_M])


def _act_ref(gu: torch.Tensor, case) -> torch.Tensor:
    return torch.from_numpy(ref._activation(case.activation, case.swiglu_limit, 1.702)[0](gu.numpy()))


def _close(actual, expected, name, dtype=torch.float32):
    assert_close(actual, expected, dtype=_dname(dtype), quantity="moe_block", name=name)


@kernel_test
@pytest.mark.parametrize("dtype", KERNEL_DTYPES, ids=_dname)
@pytest.mark.parametrize("case", KERNEL_CASES, ids=lambda c: c.name)
def test_grouped_gemm_gather_lora_given_z_rowscale_scatter(case, dtype, seed):
    """out[flat[m]] = w[m]·(x[token[m]]@W[e] + s·Z[m]@B[e] + b[e]): gather, given-Z LoRA, bias, scale, scatter."""
    srt, expert_M, rnd = _setup(case, seed, dtype)
    x, W, B = rnd(case.T, case.H), rnd(case.E, case.H, case.I, scale=0.2), rnd(case.E, case.R, case.I)
    Z, bias, ws = rnd(srt.M, case.R), rnd(case.E, case.I), rnd(srt.M).abs() + 0.1
    cfg = sl.autotune.get_config("gemm", (), dtype, x.device)
    out = torch.full((srt.M, case.I), float("nan"), device=DEVICE, dtype=dtype)
    gg.grouped_gemm(x, W, srt.schedule(cfg["BLOCK_M"]), srt.offsets_E1, n=case.I, out=out, config=cfg,
                    row_index=srt.token_M, z_MR=Z, lora_b_ERN=B, lora_scale=0.5, bias_EN=bias, row_scale_M=ws,
                    out_rows_M=srt.flat_M)
    tok = srt.token_M.long().cpu()
    rows = (_per_row(x.cpu()[tok], W, expert_M) + 0.5 * _per_row(Z, B, expert_M)
            + bias.double().cpu()[expert_M]) * ws.double().cpu()[:, None]
    expected = torch.empty_like(rows)
    expected[srt.flat_M.long().cpu()] = rows
    _close(out, expected, "scattered rows", dtype)  # NaN-filled out: every row must have been written


@kernel_test
@pytest.mark.parametrize("dtype", KERNEL_DTYPES, ids=_dname)
@pytest.mark.parametrize("case", KERNEL_CASES, ids=lambda c: c.name)
def test_grouped_gemm_gate_up_fused_lora_a_and_activation(case, dtype, seed):
    """h = act(x[token]@Wgu + s·(x[token]@A)@B + b): in-loop z = x@A stored once, gu stored, gate/up paired."""
    srt, expert_M, rnd = _setup(case, seed, dtype)
    x = rnd(case.T, case.H)
    W, A, B = rnd(case.E, case.H, 2 * case.I, scale=0.2), rnd(case.E, case.H, case.R, scale=0.2), rnd(
        case.E, case.R, 2 * case.I)
    bias = rnd(case.E, 2 * case.I)
    cfg = sl.autotune.get_config("gemm_act", (), dtype, x.device)
    h = torch.empty((srt.M, case.I), device=DEVICE, dtype=dtype)
    gu = torch.empty((srt.M, 2 * case.I), device=DEVICE, dtype=dtype)
    z = torch.empty((srt.M, case.R), device=DEVICE, dtype=dtype)
    gg.grouped_gemm(x, W, srt.schedule(cfg["BLOCK_M"]), srt.offsets_E1, n=case.I, out=h, config=cfg,
                    row_index=srt.token_M, lora_a_EDR=A, z_MR=z, store_z=True, lora_b_ERN=B, lora_scale=0.5,
                    bias_EN=bias, mode=gg.MODE_ACT_FWD, act=gg.act_code(case.activation), gu_M2I=gu, store_gu=True,
                    limit=case.swiglu_limit)
    xs = x.cpu()[srt.token_M.long().cpu()]
    z_ref = _per_row(xs, A, expert_M)
    gu_ref = _per_row(xs, W, expert_M) + 0.5 * _per_row(z_ref, B, expert_M) + bias.double().cpu()[expert_M]
    _close(z, z_ref, "z = x@A", dtype)
    _close(gu, gu_ref, "gu", dtype)
    _close(h, _act_ref(gu_ref, case), "h", dtype)


@kernel_test
@pytest.mark.parametrize("dtype", KERNEL_DTYPES, ids=_dname)
@pytest.mark.parametrize("case", KERNEL_CASES, ids=lambda c: c.name)
def test_grouped_gemm_activation_backward_epilogue(case, dtype, seed):
    """dh' = dy[token]@Wd^T + (s·dy[token]@B2^T)@A2^T; partial dots sum to <h, dh'>; dgu = act'·(w·dh')."""
    srt, expert_M, rnd = _setup(case, seed, dtype)
    dy, gu = rnd(case.T, case.H), rnd(srt.M, 2 * case.I, scale=2.0)
    Wd, A2, B2 = rnd(case.E, case.I, case.H, scale=0.2), rnd(case.E, case.I, case.R), rnd(case.E, case.R, case.H)
    ws = rnd(srt.M).abs() + 0.1
    cfg = sl.autotune.get_config("gemm", (), dtype, dy.device)
    dgu = torch.empty((srt.M, 2 * case.I), device=DEVICE, dtype=dtype)
    dots = torch.empty((srt.M, -(-case.I // cfg["BLOCK_N"])), device=DEVICE)
    dz = torch.empty((srt.M, case.R), device=DEVICE, dtype=dtype)
    gg.grouped_gemm(dy, Wd.transpose(1, 2), srt.schedule(cfg["BLOCK_M"]), srt.offsets_E1, n=case.I, out=dgu,
                    config=cfg, row_index=srt.token_M, lora_a_EDR=B2.transpose(1, 2), z_MR=dz, store_z=True,
                    lora_b_ERN=A2.transpose(1, 2), z_scale=0.5, row_scale_M=ws,
                    mode=gg.MODE_ACT_BWD, act=gg.act_code(case.activation), gu_M2I=gu, dot_MT=dots,
                    limit=case.swiglu_limit)
    dys = dy.cpu()[srt.token_M.long().cpu()]
    tr = lambda t: t.transpose(1, 2)  # noqa: E731
    dz_ref = 0.5 * _per_row(dys, tr(B2), expert_M)
    dh_ref = _per_row(dys, tr(Wd), expert_M) + _per_row(dz_ref, tr(A2), expert_M)
    h_ref = _act_ref(gu.double().cpu(), case)
    dot_ref = (h_ref * dh_ref).sum(1)
    vjp = ref._activation(case.activation, case.swiglu_limit, 1.702)[1]
    dgu_ref = torch.from_numpy(vjp(gu.double().cpu().numpy(), (dh_ref * ws.double().cpu()[:, None]).numpy()))
    _close(dz, dz_ref, "dz2'", dtype)
    _close(dots.sum(1), dot_ref, "<h, dh'>", dtype)
    _close(dgu, dgu_ref, "dgu", dtype)


@kernel_test
@pytest.mark.parametrize("dtype", KERNEL_DTYPES, ids=_dname)
@pytest.mark.parametrize("case", KERNEL_CASES, ids=lambda c: c.name)
def test_grouped_gemm_tn_variants(case, dtype, seed):
    """Ragged-K per-expert Lrows^T·diag(w)·Rrows: gathered left, act(gu) left, ones left; empty experts give 0."""
    srt, expert_M, rnd = _setup(case, seed, dtype)
    x, dz, gu, dy = rnd(case.T, case.H), rnd(srt.M, case.R), rnd(srt.M, 2 * case.I, scale=2.0), rnd(case.T, case.H)
    ws = rnd(srt.M).abs() + 0.1
    cfg = sl.autotune.get_config("tn", (), dtype, x.device)
    common = dict(offsets_E1=srt.offsets_E1, num_experts=case.E, config=cfg)
    tok = srt.token_M.long().cpu()

    def seg(lhs, rhs):  # float64 per-expert lhs^T rhs
        out = torch.zeros(case.E, lhs.shape[1], rhs.shape[1], dtype=torch.float64)
        out.index_add_(0, expert_M, torch.einsum("mp,mq->mpq", lhs.double(), rhs.double()))
        return out

    da = gg.grouped_gemm_tn(x, dz, p=case.H, left_index=srt.token_M, alpha=0.5, **common)
    _close(da, 0.5 * seg(x.cpu()[tok], dz.cpu()), "x_rows^T dz", dtype)
    dwd = gg.grouped_gemm_tn(gu, dy, p=case.I, left_act=gg.act_code(case.activation), right_index=srt.token_M,
                             row_scale_M=ws, limit=case.swiglu_limit, **common)
    _close(dwd, seg(_act_ref(gu.double().cpu(), case), dy.cpu()[tok] * ws.double().cpu()[:, None]), "h^T (w dy)", dtype)
    db = gg.grouped_gemm_tn(None, dy, p=1, right_index=srt.token_M, row_scale_M=ws, **common)
    _close(db[:, 0], seg(torch.ones(srt.M, 1), dy.cpu()[tok] * ws.double().cpu()[:, None])[:, 0], "bias grad", dtype)
    for e in case.empty_experts:
        assert torch.count_nonzero(da[e]) == 0 and torch.count_nonzero(dwd[e]) == 0


SPLIT_CASES = [get_case(n) for n in ("skewed", "empty_experts", "prime_e", "oai_biases", "odd_dims")]


def _tn_split_config(dtype, device, multiple: int) -> dict:
    """The "tn" config with 16-row blocks on either side (the interpreter's; on CUDA too, so that the small cases
    split into as many chunks as on CPU) and SPLIT_ROWS = `multiple` blocks."""
    cfg = dict(sl.autotune.get_config("tn", (), dtype, device), BLOCK_M=16)
    return dict(cfg, SPLIT_ROWS=multiple * cfg["BLOCK_M"])


def _seg(expert_M, num_experts, lhs, rhs):
    """float64 per-expert lhs^T rhs over the sorted rows."""
    out = torch.zeros(num_experts, lhs.shape[1], rhs.shape[1], dtype=torch.float64)
    out.index_add_(0, expert_M, torch.einsum("mp,mq->mpq", lhs.double().cpu(), rhs.double().cpu()))
    return out


@kernel_test
@pytest.mark.parametrize("dtype", KERNEL_DTYPES, ids=_dname)
@pytest.mark.parametrize("multiple", [1, 2], ids=["split1blk", "split2blk"])
@pytest.mark.parametrize("case", SPLIT_CASES, ids=lambda c: c.name)
def test_grouped_gemm_tn_split_rows_matches_reference(case, multiple, dtype, seed):
    """Split mode (SPLIT_ROWS = one or two 16-row blocks; the routing stacked 8x so that every case has experts of
    several chunks, at least 2·SPLIT_ROWS rows): gathered left, act(gu) left with a gathered right and row scale,
    ones left, plain rows, alpha and a narrower out_dtype, against float64; experts with no rows give exact zeros."""
    srt, expert_M, rnd = _setup(case, seed, dtype, repeat=8)
    cfg = _tn_split_config(dtype, torch.device(DEVICE), multiple)
    n = cfg["SPLIT_ROWS"]
    rows_E = srt.offsets_E1.diff().cpu()
    assert int(rows_E.max()) >= 2 * n, "the premise: some expert spans several chunks"
    T, M, E = srt.T, srt.M, case.E
    x, dz, gu, dy = rnd(T, case.H), rnd(M, case.R), rnd(M, 2 * case.I, scale=2.0), rnd(T, case.H)
    z, dgu, ws = rnd(M, case.R), rnd(M, 2 * case.I), rnd(M).abs() + 0.1
    common = dict(offsets_E1=srt.offsets_E1, num_experts=E, config=cfg)
    tok = srt.token_M.long().cpu()
    wcol = ws.double().cpu()[:, None]

    da = gg.grouped_gemm_tn(x, dz, p=case.H, left_index=srt.token_M, alpha=0.5, **common)
    _close(da, 0.5 * _seg(expert_M, E, x.cpu()[tok], dz), "split x_rows^T dz", dtype)
    dwd = gg.grouped_gemm_tn(gu, dy, p=case.I, left_act=gg.act_code(case.activation), right_index=srt.token_M,
                             row_scale_M=ws, limit=case.swiglu_limit, **common)
    _close(dwd, _seg(expert_M, E, _act_ref(gu.double().cpu(), case), dy.cpu()[tok] * wcol), "split h^T (w dy)",
           dtype)
    db = gg.grouped_gemm_tn(None, dy, p=1, right_index=srt.token_M, row_scale_M=ws, alpha=2.0, **common)
    _close(db[:, 0], 2.0 * _seg(expert_M, E, torch.ones(M, 1), dy.cpu()[tok] * wcol)[:, 0], "split bias grad", dtype)
    db1 = gg.grouped_gemm_tn(z, dgu, p=case.R, alpha=0.5, **common)
    _close(db1, 0.5 * _seg(expert_M, E, z, dgu), "split z^T dgu", dtype)
    # out_dtype: both passes store alpha·sum rounded once, as the fp32 result's cast
    da16 = gg.grouped_gemm_tn(x, dz, p=case.H, left_index=srt.token_M, alpha=0.5, out_dtype=torch.float16, **common)
    assert da16.dtype == torch.float16 and torch.equal(da16.cpu(), da.cpu().to(torch.float16))
    for e in case.empty_experts:
        for out in (da, dwd, db, db1, da16):
            assert torch.count_nonzero(out[e]) == 0, f"expert {e} has no rows: its gradient must be exactly 0"


@kernel_test
@pytest.mark.parametrize("case", [get_case("skewed"), get_case("empty_experts")], ids=lambda c: c.name)
def test_grouped_gemm_tn_split_rows_is_deterministic(case, seed):
    """Split mode gives the same bits on every call, with the schedule given (as the Function passes its sort's) or
    built by the launcher; experts of one chunk (fewer than 2·SPLIT_ROWS rows, those between one and two chunks'
    worth included: the remainder rides in the last chunk, `split_chunks`) get the unsplit kernel's bits (same row
    blocks, same order), and with chunks longer than any expert the whole output is the unsplit kernel's."""
    srt, _, rnd = _setup(case, seed, repeat=4)
    x, dz, gu, dy = rnd(srt.T, case.H), rnd(srt.M, case.R), rnd(srt.M, 2 * case.I), rnd(srt.T, case.H)
    ws = rnd(srt.M).abs() + 0.1
    rows_E = srt.offsets_E1.diff().cpu()
    for kw in (dict(left=x, right=dz, p=case.H, left_index=srt.token_M, alpha=0.5),
               dict(left=gu, right=dy, p=case.I, left_act=gg.act_code(case.activation), right_index=srt.token_M,
                    row_scale_M=ws, limit=case.swiglu_limit)):
        for multiple in (1, 1000):
            cfg = _tn_split_config(torch.float32, x.device, multiple)
            n = cfg["SPLIT_ROWS"]
            common = dict(offsets_E1=srt.offsets_E1, num_experts=case.E, **kw)
            first = gg.grouped_gemm_tn(config=cfg, **common)
            again = gg.grouped_gemm_tn(config=cfg, **common)
            given = gg.grouped_gemm_tn(config=cfg, schedule=srt.schedule(n), **common)
            assert torch.equal(first, again) and torch.equal(first, given), "split mode is not deterministic"
            unsplit = gg.grouped_gemm_tn(config=dict(cfg, SPLIT_ROWS=0), **common)
            one_chunk = torch.tensor([len(split_chunks(int(r), n)) <= 1 for r in rows_E])
            assert torch.equal(first[one_chunk.to(first.device)], unsplit[one_chunk.to(first.device)])
            if multiple == 1000:
                assert bool(one_chunk.all()) and torch.equal(first, unsplit)
            else:  # the premises: an expert of one chunk and a remainder, and one of several chunks and a remainder
                assert bool(((rows_E > n) & one_chunk).any()), "no expert of between one and two chunks' rows"
                assert bool(((rows_E % n > 0) & ~one_chunk).any()), "no expert of several chunks with a remainder"


@kernel_test
@pytest.mark.parametrize("split", [24, -16])
def test_grouped_gemm_tn_split_rows_must_be_a_multiple_of_block_m(split, seed):
    srt, _, rnd = _setup(get_case("odd_dims"), seed)
    cfg = dict(_tn_split_config(torch.float32, torch.device(DEVICE), 1), SPLIT_ROWS=split)
    with pytest.raises(ValueError, match="SPLIT_ROWS=.*multiple of BLOCK_M=16"):
        gg.grouped_gemm_tn(rnd(srt.M, 4), rnd(srt.M, 3), srt.offsets_E1, num_experts=srt.num_experts, p=4,
                           config=cfg)


@pytest.mark.parametrize("value", ["24", "-32", "abc", "1.5e3"])
def test_tn_split_rows_env_refuses_bad_values(value, monkeypatch):
    """SPLITMOE_TN_SPLIT_ROWS must be 0 or a positive multiple of the launch's BLOCK_M: anything else is a
    ValueError that names the variable, the value and the block size."""
    monkeypatch.setenv("SPLITMOE_TN_SPLIT_ROWS", value)
    with pytest.raises(ValueError, match=rf"SPLITMOE_TN_SPLIT_ROWS='{value}'.*multiple.*BLOCK_M \(16 "):
        sl.tn_split_rows(dict(BLOCK_M=16, BLOCK_P=32, BLOCK_Q=32))


def test_tn_split_rows_env_sets_or_clears_the_config(monkeypatch):
    """Unset: the config's own split, else on CUDA the measured default (2048 rows, where BLOCK_M divides it), else
    off (the interpreter's launches unchanged); the variable overrides both ways."""
    cfg = dict(BLOCK_M=16, BLOCK_P=32, BLOCK_Q=32)
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    monkeypatch.delenv("SPLITMOE_TN_SPLIT_ROWS", raising=False)
    assert sl.tn_split_rows(cfg) == cfg and sl.tn_split_rows(cfg, cpu) == cfg
    assert sl.tn_split_rows(cfg, cuda) == dict(cfg, SPLIT_ROWS=sl.DEFAULT_TN_SPLIT_ROWS) == dict(cfg, SPLIT_ROWS=2048)
    assert sl.tn_split_rows(dict(cfg, SPLIT_ROWS=0), cuda) == dict(cfg, SPLIT_ROWS=0)  # a config's own choice stands
    assert sl.tn_split_rows(dict(cfg, BLOCK_M=96), cuda) == dict(cfg, BLOCK_M=96)  # 2048 is no multiple of 96: off
    monkeypatch.setenv("SPLITMOE_TN_SPLIT_ROWS", "32")
    assert sl.tn_split_rows(cfg) == dict(cfg, SPLIT_ROWS=32) == sl.tn_split_rows(cfg, cuda)
    monkeypatch.setenv("SPLITMOE_TN_SPLIT_ROWS", "0")
    assert sl.tn_split_rows(dict(cfg, SPLIT_ROWS=512)) == dict(cfg, SPLIT_ROWS=0) == sl.tn_split_rows(cfg, cuda)


@cpu_only
@pytest.mark.parametrize("case", [get_case("skewed"), get_case("empty_experts")], ids=lambda c: c.name)
def test_split_lora_experts_backward_with_tn_split_rows(case, seed, monkeypatch):
    """SPLITMOE_TN_SPLIT_ROWS=16 reaches every ragged-K launch of the Function's backward (the four LoRA grads,
    both base-weight grads, the bias grads where there are biases), each with its sort's chunk schedule, and every
    gradient still matches the float64 reference."""
    monkeypatch.setenv("SPLITMOE_TN_SPLIT_ROWS", "16")
    seen = []
    real = gg.grouped_gemm_tn

    def spy(*args, **kw):
        seen.append((kw["config"].get("SPLIT_ROWS"), kw.get("schedule") is not None))
        return real(*args, **kw)

    monkeypatch.setattr(gg, "grouped_gemm_tn", spy)
    _check_against_reference(case, torch.float32, seed)
    assert len(seen) == 6 + 2 * case.biases and set(seen) == {(16, True)}


@kernel_test
# bf16 on the GPU only: the interpreter truncates fp32 -> bf16 casts (triton's interpreter ignores the rounding mode)
@pytest.mark.parametrize("out_dtype", [*CPU_DTYPES, pytest.param(torch.bfloat16, marks=pytest.mark.gpu)], ids=_dname)
@pytest.mark.parametrize("shape", [(1, 3, 3), (5, 130, 65), (3, 64, 64), (2, 1, 1), (7, 200, 16)],
                         ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("layout", ["contiguous", "transposed_view"])
def test_reduction_major_kernel_is_a_bitwise_cast(shape, out_dtype, layout):
    """`reduction_major`'s tiled cast + transpose kernel stores the same bits as `Tensor.copy_` (a cast rounds to
    nearest even either way), in the [E, R, D] storage the NN kernels read: partial tiles on both axes (130 = 2·64
    + 2, R = 65), single rows, prime E, and a source that is itself a strided view."""
    E, D, R = shape
    g = torch.Generator().manual_seed(E * 1000 + D + R)
    src = torch.randn(shape, generator=g, dtype=torch.float32)
    if layout == "transposed_view":  # [E, D, R] view of [E, R, D] storage, as a stored-transposed factor would be
        src = src.transpose(1, 2).contiguous().transpose(1, 2)
    src = src.to(DEVICE)
    got = gg.reduction_major(src, out_dtype, kernel=True)
    want = gg.reduction_major(src, out_dtype, kernel=False)
    assert got.shape == shape and got.stride() == (R * D, 1, D) and got.dtype == out_dtype
    assert torch.equal(got.cpu(), want.cpu()) and torch.equal(got.cpu(), src.cpu().to(out_dtype))


def test_cast_transpose_rejects_a_wrong_destination():
    """A destination that is not the [E, R, D]-storage view is refused with the strides it needs."""
    from torch_impl.kernels.layout import cast_transpose_into

    with pytest.raises(ValueError, match="strides"):
        cast_transpose_into(torch.zeros(2, 3, 4), torch.zeros(2, 3, 4))


@kernel_test
@pytest.mark.parametrize("block_m", [16, 64, 128])
@pytest.mark.parametrize("sizes", [[5], [0, 3, 0, 17, 1, 0, 64], [0] * 6 + [200], [33] * 13, [0, 0, 0],
                                   [3, 0] * 8],
                         ids=["E1", "empty_experts", "one_full", "prime_E", "no_rows", "E16_no_padding_lane"])
def test_schedule_kernel_equals_the_torch_ops(sizes, block_m):
    """`kernels.schedule.row_block_schedule` (the GPU's one launch) gives exactly the torch ops' schedule and count:
    one expert, empty experts between full ones, every row in the last expert, prime E, no rows at all, and E a
    power of two (no padding lane in the kernel's expert vector)."""
    from torch_impl.kernels.schedule import row_block_schedule

    offsets = torch.tensor([0] + list(np.cumsum(sizes)), dtype=torch.int32)
    srt = sl.KernelSort(torch.zeros(0, dtype=torch.int32), torch.zeros(0, dtype=torch.int32), offsets,
                        int(offsets[-1]), 1)  # only the offsets and M matter for the schedule
    want_e, want_r = srt.schedule(block_m)
    got_e, got_r, got_n = row_block_schedule(offsets.to(DEVICE), block_m, srt.M)
    assert torch.equal(got_e.cpu(), want_e) and torch.equal(got_r.cpu(), want_r)
    assert torch.equal(got_n.cpu(), srt.row_tile_count(block_m))


def test_schedule_covers_every_row_once():
    """Row blocks never straddle experts, cover each sorted row exactly once, and surplus tiles are marked -1."""
    ids = torch.tensor([[2, 0], [0, 2], [1, 0], [4, 2], [2, 1]])
    srt = sl.KernelSort.from_ids(ids, 6)
    assert srt.offsets_E1.tolist() == [0, 3, 5, 9, 9, 10, 10]
    assert srt.flat_M.tolist() == [1, 2, 5, 4, 9, 0, 3, 7, 8, 6]
    tile_e, tile_row = srt.schedule(2)
    seen = []
    for e, r0 in zip(tile_e.tolist(), tile_row.tolist()):
        if e < 0:
            continue
        end = srt.offsets_E1[e + 1].item()
        assert srt.offsets_E1[e].item() <= r0 < end
        seen += list(range(r0, min(r0 + 2, end)))
    assert sorted(seen) == list(range(10))
    assert (tile_e < 0).sum().item() == len(tile_e) - 6  # tiles: 2 + 1 + 2 + 0 + 1 + 0
    # the persistent Hopper kernel loops over the valid tiles only: they come first, and it reads their count
    assert tile_e.dtype == tile_row.dtype == torch.int32 and (tile_e[:6] >= 0).all() and (tile_e[6:] < 0).all()
    assert srt.row_tile_count(2).tolist() == [6]
    # a layer's ExpertSort gives the same schedule (its int64 row indices are taken as they are)
    from torch_impl.moe import sort_by_expert

    srt64 = sl.KernelSort.from_expert_sort(sort_by_expert(ids, 6))
    assert srt64.flat_M.tolist() == srt.flat_M.tolist() and srt64.token_M.tolist() == srt.token_M.tolist()
    assert torch.equal(srt64.offsets_E1, srt.offsets_E1) and srt64.offsets_E1.dtype == torch.int32
    e64, row64 = srt64.schedule(2)
    valid = tile_e >= 0
    assert torch.equal(e64, tile_e) and torch.equal(row64[valid], tile_row[valid])


def test_autotune_candidates_are_pruned(tmp_path, monkeypatch):
    from torch_impl.kernels import autotune

    cands = autotune._candidates("gemm_act", rows_per_expert=40, smem_bytes=228 * 1024, elem_bytes=2)
    assert cands and all(c["BLOCK_M"] <= 80 for c in cands)
    assert all(c["num_stages"] * (c["BLOCK_M"] * c["BLOCK_D"] + 2 * c["BLOCK_D"] * c["BLOCK_N"]) * 2 <= 228 * 1024
               for c in cands)
    monkeypatch.setenv("SPLITMOE_TRITON_AUTOTUNE_CACHE", str(tmp_path / "cache.json"))
    autotune._store_disk("k", {"BLOCK_M": 64})
    assert autotune._load_disk() == {"k": {"BLOCK_M": 64}}


def test_autotune_tn_space_offers_split_rows_where_experts_are_large():
    """The "tn" space offers SPLIT_ROWS (multiples of every BLOCK_M) only where an expert may hold more rows than a
    chunk: none at 64 rows per expert, 512 from 256, 2048 too from 1024; the sweep's short list takes 2048 alone,
    at most doubling its size."""
    from torch_impl.kernels import autotune

    def splits(rpe, space="full"):
        cands = autotune._candidates("tn", rpe, 228 * 1024, 2, space)
        assert all(c.get("SPLIT_ROWS", 0) % c["BLOCK_M"] == 0 for c in cands)
        return cands, {c.get("SPLIT_ROWS", 0) for c in cands}

    assert splits(64)[1] == {0} and splits(256)[1] == {0, 512} and splits(1024)[1] == {0, 512, 2048}
    base, small = splits(64, "sweep"), splits(1024, "sweep")
    assert base[1] == {0} and small[1] == {0, 2048} and len(small[0]) == 2 * len(base[0])


def test_shipped_table_lookup_exact_then_nearest_bucket():
    from torch_impl.kernels import autotune

    key = autotune.cache_key("gemm", (8192, "down", 768, 2048, 64), torch.bfloat16, "NVIDIA H200")
    near = autotune.cache_key("gemm", (131072, "down", 768, 2048, 64), torch.bfloat16, "NVIDIA H200")
    far = autotune.cache_key("gemm", (524288, "down", 768, 2048, 64), torch.bfloat16, "NVIDIA H200")
    other_rank = autotune.cache_key("gemm", (8192, "down", 768, 2048, 16), torch.bfloat16, "NVIDIA H200")
    table = {near: {"BLOCK_M": 128}, far: {"BLOCK_M": 64}, other_rank: {"BLOCK_M": 32}}
    assert autotune.shipped_config(other_rank, table) == {"BLOCK_M": 32}
    assert autotune.shipped_config(key, table) == {"BLOCK_M": 128}  # 8192 is nearer 131072 than 524288 (log2)
    assert autotune.shipped_config(key.replace("H200", "H100"), table) is None
    assert autotune.shipped_config(key.replace("bfloat16", "float16"), table) is None
    assert autotune.shipped_config(key, {}) is None


# ---- GPU: compiled kernels in bf16 -----------------------------------------------------------------------------------

def _torch_inputs(inp, dtype, base_grad=False):
    def t(a, grad=True):
        return torch.tensor(a, dtype=dtype, device="cuda").requires_grad_(grad)

    return dict(x=t(inp["x"]), expert_ids=torch.tensor(inp["expert_ids"], device="cuda"),
                expert_weights=t(inp["expert_weights"]), w_gate_up=t(inp["w_gate_up"], base_grad),
                w_down=t(inp["w_down"], base_grad), lora_gate_up=tuple(map(t, inp["lora_gate_up"])),
                lora_down=tuple(map(t, inp["lora_down"])),
                biases=None if inp["biases"] is None else tuple(map(t, inp["biases"])))


def _flat_grads(args) -> dict:
    out = {}
    for k, v in args.items():
        for i, tt in enumerate(v if isinstance(v, tuple) else (v,)):
            if tt is not None and tt.grad is not None:
                out[f"{k}[{i}]"] = tt.grad
    return out


@pytest.mark.gpu
@pytest.mark.parametrize("case", cases("gpu"), ids=lambda c: c.name)
def test_bf16_gpu_matches_reference(case, seed):
    _check_against_reference(case, torch.bfloat16, seed)


@pytest.mark.gpu
@pytest.mark.parametrize("case", cases("gpu"), ids=lambda c: c.name)
def test_bf16_gpu_agrees_with_grouped_mm_and_is_deterministic(case, seed):
    """triton vs the grouped_mm backend (same rounding points) within bf16 tolerance; triton bitwise run-to-run."""
    from torch_impl.backends import why_unavailable
    from torch_impl.moe import split_lora_experts

    dtype = torch.bfloat16
    inp = _rounded_inputs(case, seed, dtype)
    dy = torch.randn(case.T, case.H, device="cuda", generator=torch.Generator("cuda").manual_seed(seed)).to(dtype)
    kw = dict(scale=inp["scale"], activation=inp["activation"], swiglu_limit=inp["swiglu_limit"])
    results = []
    backends = ["triton", "triton"] + ([] if why_unavailable("grouped_mm", "cuda", dtype) else ["grouped_mm"])
    for backend in backends:
        args = _torch_inputs(inp, dtype)
        y = split_lora_experts(**args, **kw, backend=backend)
        y.backward(dy)
        results.append((y.detach(), _flat_grads(args)))
    (y0, g0), (y1, g1) = results[:2]
    assert torch.equal(y0, y1) and all(torch.equal(g0[k], g1[k]) for k in g0), "triton is not deterministic"
    if len(results) == 3:
        y2, g2 = results[2]
        assert_close(y0, y2, dtype="bfloat16", quantity="moe_block", name="triton vs grouped_mm y")
        assert g0.keys() == g2.keys()
        for k in g0:
            assert_close(g0[k], g2[k], dtype="bfloat16", quantity="moe_grad", name=f"triton vs grouped_mm d{k}")


@pytest.mark.gpu
def test_bf16_gpu_autotune_cache(tmp_path, monkeypatch, seed):
    """SPLITMOE_TRITON_AUTOTUNE=1 tunes once, writes versioned keys to the cache, and the results stay correct."""
    from torch_impl.kernels import autotune

    monkeypatch.setenv("SPLITMOE_TRITON_AUTOTUNE", "1")
    monkeypatch.setenv("SPLITMOE_TRITON_AUTOTUNE_CACHE", str(tmp_path / "tune.json"))
    monkeypatch.setattr(autotune, "_memory_cache", {})
    real = autotune._candidates
    # Two candidates per kind (one with Z_PRE): the mechanism, not the search; the full space compiles for minutes.
    monkeypatch.setattr(autotune, "_candidates", lambda *a, **kw: [c for c in real(*a, **kw)
                                                                   if c["num_stages"] == 3][:1] + real(*a, **kw)[-1:])
    _check_against_reference(get_case("gpu_oai"), torch.bfloat16, seed)
    keys = list(autotune._load_disk())
    assert keys and all(k.startswith(f"v{autotune.KERNEL_VERSION}|") for k in keys)
    assert {k.split("|")[3] for k in keys} == {"gemm", "gemm_act", "tn"}


# oai_biases clamps at limit 1.0: bf16 rounding of the pre-activation crosses the clamp and switches that entry's
# gradient on or off (see tests/torch/test_moe_block.py, where the same case is xfail for every backend). The H200
# run of 2026-11-28 passed it with in-loop z and failed it with Z_PRE, whose z rounds through other wgmma tiles.
_GPU_CASES_CLAMP_XFAIL = [
    pytest.param(c, marks=pytest.mark.xfail(reason="bf16 rounding crosses the clamp at limit 1.0", strict=False))
    if c.name == "oai_biases" else c for c in cases("gpu")]


@pytest.mark.gpu
@pytest.mark.parametrize("case", _GPU_CASES_CLAMP_XFAIL, ids=lambda c: getattr(c, "name", None))
def test_bf16_gpu_precomputed_z_matches_reference(case, seed, monkeypatch):
    """The Z_PRE variant of every gemm pass, compiled in bf16 (the tuner may pick it per pass)."""
    from torch_impl.kernels import autotune

    monkeypatch.delenv("SPLITMOE_TRITON_AUTOTUNE", raising=False)
    monkeypatch.setattr(autotune, "_memory_cache", {})
    monkeypatch.setattr(autotune, "TUNED_TABLE", Path("/nonexistent"))
    monkeypatch.setattr(autotune, "GPU_DEFAULTS", {k: dict(v, Z_PRE=True) if k != "tn" else v
                                                   for k, v in autotune.GPU_DEFAULTS.items()})
    _check_against_reference(case, torch.bfloat16, seed)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "triton_hopper"])
@pytest.mark.parametrize("name", ["qwen3_30b_T1024", "qwen3_30b_r16_T4096", "gpt_oss_20b_T1024", "gpt_oss_20b_T16384"])
def test_bf16_gpu_benchmark_shapes_agree_with_grouped_mm(name, backend, seed):
    """At the real expert shapes, with the shipped tuned configs (torch_impl/kernels/tuned_configs.json: other tiles
    and Z_PRE choices than the small cases above use), triton (and triton_hopper, the persistent TMA kernels of
    tests/torch/test_hopper_kernels.py) agrees with grouped_mm in bf16, forward and grads.

    gpt-oss shapes run with swiglu_limit=100 (biases and the (up+1)·g·sigmoid(alpha·g) form kept): with the real
    limit 7 and ~20M gate/up entries, bf16 rounding puts thousands of them on opposite sides of the clamp in two
    correct implementations, and each such entry's gradient jumps between 0 and O(1) (H200, 2026-11-28: this test
    failed that way at T=1024 and 16384 with limit 7). The clamps are checked exactly in fp32 on the small cases."""
    from torch_impl.backends import why_unavailable
    from torch_impl.moe import split_lora_experts

    for b in ("grouped_mm", backend):
        if why := why_unavailable(b, "cuda", torch.bfloat16):
            pytest.skip(f"{b} unavailable: {why}")
    c = get_case(name)
    g = torch.Generator("cuda").manual_seed(seed)
    bf = torch.bfloat16

    def rnd(*shape, fan_in=1.0):
        return (torch.randn(*shape, generator=g, device="cuda") / fan_in**0.5).to(bf)

    w, ids = torch.softmax(torch.randn(c.T, c.E, generator=g, device="cuda"), -1).topk(c.K, dim=-1)
    base = dict(x=rnd(c.T, c.H), expert_weights=(w / w.sum(-1, keepdim=True)).to(bf),
                w_gate_up=rnd(c.E, c.H, 2 * c.I, fan_in=c.H), w_down=rnd(c.E, c.I, c.H, fan_in=c.I))
    lora = (rnd(c.E, c.H, c.R, fan_in=c.H), rnd(c.E, c.R, 2 * c.I, fan_in=c.R),
            rnd(c.E, c.I, c.R, fan_in=c.I), rnd(c.E, c.R, c.H, fan_in=c.R))
    biases = (rnd(c.E, 2 * c.I), rnd(c.E, c.H)) if c.biases else None
    dy = rnd(c.T, c.H)
    results = []
    for impl in (backend, "grouped_mm"):
        leaves = [t.detach().clone().requires_grad_(True) for t in (base["x"], base["expert_weights"], *lora)]
        x, ew, a1, b1, a2, b2 = leaves
        y = split_lora_experts(x, ids, ew, base["w_gate_up"], base["w_down"], (a1, b1), (a2, b2), scale=2.0,
                               biases=biases, activation=c.activation, swiglu_limit=100.0, backend=impl)
        y.backward(dy)
        results.append((y.detach(), [t.grad for t in leaves]))
    (y0, g0), (y1, g1) = results
    assert_close(y0, y1, dtype="bfloat16", quantity="moe_block", name=f"{name} y")
    for label, a, b in zip(("x", "expert_weights", "A1", "B1", "A2", "B2"), g0, g1):
        assert_close(a, b, dtype="bfloat16", quantity="moe_grad", name=f"{name} d{label}")
