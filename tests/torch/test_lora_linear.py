"""A Linear's fused LoRA branch (`torch_impl.kernels.lora_linear`: `splitmoe::lora_z`, z = x @ A, and
`splitmoe::lora_add`, round(y + s·(z @ B))): each product and its backward against float64, the custom ops'
registration, `LoRALinear` and whole models with the switch on against the torch ops (and under activation
checkpointing, and compiled), the switch itself, and the kernels compiled for sm_90.

On CPU the kernels run in the Triton interpreter with IEEE fp32 dots and activations in fp16 or fp32: the interpreter
rounds fp32 to bf16 toward zero (measured: 48 % of 1,024 random values differ from torch's round-to-nearest-even,
each equal to the truncated value), so bf16 outputs are checked only on the GPU, and the CPU's model tests run in
fp16. The `gpu` test compares on CUDA in bf16 with TF32 dots, as `benchmarks/step.py` runs them. Interpreter mode is
fixed at triton's first import, so this module imports the kernels interpreted where it can
(`tests.torch.interpreter`), else a fresh process runs its CPU tests.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
CUDA = torch.cuda.is_available()

from tests.torch.interpreter import import_interpreted  # noqa: E402

IN_PROCESS = import_interpreted("torch_impl.kernels.lora_linear") is None
pytest.importorskip("triton")

from shared_math.numerics import assert_close  # noqa: E402
from torch_impl import lora as lora_mod  # noqa: E402
from torch_impl.kernels import lora_linear as ll  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
cpu_only = pytest.mark.skipif(not IN_PROCESS, reason="Triton interpreter tests: CPU only, and only where triton was "
                              "not imported compiled before this module (else the fresh-process test runs them)")


@pytest.fixture(autouse=True)
def _interpreter_env(monkeypatch):
    if IN_PROCESS:
        monkeypatch.setenv("TRITON_INTERPRET", "1")


@pytest.mark.skipif(CUDA or IN_PROCESS, reason="only needed when triton was imported compiled before this module")
def test_cpu_tests_in_a_fresh_interpreter_process():
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    proc = subprocess.run([sys.executable, "-m", "pytest", str(Path(__file__).resolve()), "-q", "-x",
                           "-p", "no:cacheprovider", "-m", "not gpu"], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=1200)
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-2000:]


def _within_one_rounding(out: torch.Tensor, exact: torch.Tensor, fp32_err: torch.Tensor | float = 0.0) -> None:
    """`out` (dtype d) is `exact` (float64) rounded to d, up to the error of the fp32 sum before that rounding
    (`fp32_err`, a bound per element): |out - exact| <= one unit in the last place of d at |exact| (at least d's
    smallest step) plus `fp32_err`; and for fp16, nearly every element is the exactly rounded value."""
    d = out.dtype
    info = torch.finfo(d)
    ulp = torch.exp2(torch.floor(torch.log2(exact.abs().clamp_min(info.tiny)))) * info.eps
    ulp = ulp.clamp_min(info.tiny * info.eps)  # the subnormal step
    err = (out.double() - exact).abs()
    assert bool((err <= ulp + fp32_err).all()), f"{d}: max error {(err / ulp).max():.2f} ulp"
    if d != torch.float32:
        exact_share = (out == exact.to(d)).double().mean().item()
        assert exact_share > 0.97, f"{d}: only {exact_share:.3f} of the elements are the exactly rounded sum"


def _sum_error(y: torch.Tensor, z: torch.Tensor, b: torch.Tensor, scale: float) -> torch.Tensor:
    """A bound on the fp32 rounding error of y + s·(z @ B) summed in fp32 (R products and two more operations, each
    off by at most 2^-24 of the magnitudes it combines)."""
    R = z.shape[-1]
    return (R + 2) * 2.0 ** -24 * (y.double().abs() + abs(scale) * (z.double().abs() @ b.double().abs()))


# (M rows, N features, R rank): odd sizes, a rank of 1, one above a rank block (70 > 64: two rank blocks), fewer
# features than a tile, more rows than one dB chunk (600 > 256: partials summed), an empty row set
SHAPES = [(37, 130, 5), (64, 128, 64), (300, 72, 1), (5, 16, 70), (600, 48, 8), (0, 32, 4)]


@cpu_only
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=lambda d: str(d)[6:])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_forward_is_the_rounded_fp32_sum(shape, dtype):
    M, N, R = shape
    g = torch.Generator().manual_seed(M * 1000 + N + R)
    y = torch.randn(M, N, generator=g).to(dtype)
    z, b = torch.randn(M, R, generator=g), torch.randn(R, N, generator=g) * 0.5
    scale = 1.5  # not a power of two: s·acc is an fp32 product like torch's add_(alpha=s)
    out = ll.lora_add_forward(y, z, b, scale)
    assert out.shape == y.shape and out.dtype == dtype
    exact = y.double() + scale * (z.double() @ b.double())
    if M:
        bound = _sum_error(y, z, b, scale)
        _within_one_rounding(out, exact, bound)
        # and the torch path it replaces (`LoRALinear`: y.add_(z @ B, alpha=s) in fp32, rounded once)
        _within_one_rounding(y.clone().add_(z @ b, alpha=scale), exact, bound)


@cpu_only
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=lambda d: str(d)[6:])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_backward_is_fp32_against_float64(shape, dtype):
    M, N, R = shape
    g = torch.Generator().manual_seed(M + N * 7 + R)
    dy = torch.randn(M, N, generator=g).to(dtype)
    z, b = torch.randn(M, R, generator=g), torch.randn(R, N, generator=g)
    dz, db = ll.lora_add_backward(dy, z, b, 0.75)
    assert dz.dtype == db.dtype == torch.float32 and dz.shape == z.shape and db.shape == b.shape
    # the exact sums of the bf16 / fp16 values in float64: the kernels upcast dy exactly and add in fp32 (IEEE dots
    # here), so fp32 round-off over N (dz) or M (dB) terms is all that separates them
    assert_close(dz, 0.75 * dy.double() @ b.double().T, dtype="float32", quantity="moe_grad", name="dz")
    assert_close(db, 0.75 * z.double().T @ dy.double(), dtype="float32", quantity="moe_grad", name="dB")
    only_dz, none = ll.lora_add_backward(dy, z, b, 0.75, need_db=False)
    none2, only_db = ll.lora_add_backward(dy, z, b, 0.75, need_dz=False)
    assert none is None and none2 is None
    assert torch.equal(only_dz, dz) and torch.equal(only_db, db)


# (M rows, K input features, R rank): odd sizes, one rank, two rank tiles (70 > 64), K under one tile, several dA chunks
Z_SHAPES = [(37, 130, 5), (64, 128, 64), (300, 72, 1), (5, 16, 70), (600, 48, 8), (0, 32, 4)]


@cpu_only
@pytest.mark.parametrize("shape", Z_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_lora_z_and_its_backward_against_float64(shape):
    """z = x @ A in fp32 from fp16 x (upcast exactly), dx = dz @ Aᵀ rounded once to fp16, dA = xᵀ @ dz in fp32."""
    M, K, R = shape
    g = torch.Generator().manual_seed(M + 3 * K + R)
    x = torch.randn(M, K, generator=g).to(torch.float16)
    a = torch.randn(K, R, generator=g) * 0.3
    dz = torch.randn(M, R, generator=g)
    z = ll.lora_z_forward(x, a)
    assert z.dtype == torch.float32 and z.shape == (M, R)
    assert_close(z, x.double() @ a.double(), dtype="float32", quantity="moe_block", name="z")
    dx, da = ll.lora_z_backward(dz, x, a)
    assert dx.dtype == torch.float16 and dx.shape == x.shape and da.dtype == torch.float32 and da.shape == a.shape
    if M:
        bound = (R + 1) * 2.0 ** -24 * (dz.double().abs() @ a.double().abs().T)
        _within_one_rounding(dx, dz.double() @ a.double().T, bound)
    assert_close(da, x.double().T @ dz.double(), dtype="float32", quantity="moe_grad", name="dA")
    only_dx, none = ll.lora_z_backward(dz, x, a, need_da=False)
    none2, only_da = ll.lora_z_backward(dz, x, a, need_dx=False)
    assert none is None and none2 is None and torch.equal(only_dx, dx) and torch.equal(only_da, da)


@cpu_only
def test_db_chunks_sum_in_a_fixed_order():
    """dB over several row chunks: the partials are added in chunk order, so two runs agree bit for bit, and the
    chunking is what `chunk_rows` says (more than one chunk here: the sum path runs)."""
    M, N, R = 1000, 40, 16
    g = torch.Generator().manual_seed(3)
    dy, z, b = torch.randn(M, N, generator=g).to(torch.float16), torch.randn(M, R, generator=g), torch.randn(R, N)
    rows = ll.chunk_rows(M, 1, 64)
    assert rows % 64 == 0 and rows >= ll._MIN_CHUNK_ROWS and -(-M // rows) > 1
    first = ll.lora_add_backward(dy, z, b, 2.0, need_dz=False)[1]
    second = ll.lora_add_backward(dy, z, b, 2.0, need_dz=False)[1]
    assert torch.equal(first, second)
    assert_close(first, 2.0 * z.double().T @ dy.double(), dtype="float32", quantity="moe_grad")


@cpu_only
def test_strided_z_and_leading_dimensions():
    """z as a column slice of a wider tensor (how `layers.project` hands each projection its part of x @ [A1|A2|A3])
    and [B, S, N] activations: the kernels read z through its strides, no copy needed."""
    g = torch.Generator().manual_seed(5)
    y = torch.randn(2, 9, 24, generator=g).to(torch.float16)
    wide = torch.randn(2, 9, 3 + 6 + 2, generator=g)
    z = wide[..., 3:9]
    assert not z.is_contiguous()
    b = torch.randn(6, 24, generator=g)
    out = ll.lora_add_forward(y, z, b, 2.0)
    _within_one_rounding(out, y.double() + 2.0 * (z.double() @ b.double()), _sum_error(y, z, b, 2.0))
    dy = torch.randn(2, 9, 24, generator=g).to(torch.float16)
    dz, db = ll.lora_add_backward(dy, z, b, 2.0)
    assert dz.shape == z.shape
    assert_close(dz, 2.0 * dy.double() @ b.double().T, dtype="float32", quantity="moe_grad")
    assert_close(db, 2.0 * torch.einsum("bsr,bsn->rn", z.double(), dy.double()), dtype="float32", quantity="moe_grad")


def test_bad_shapes_are_refused_with_what_they_were():
    y, z, b = torch.zeros(4, 8), torch.zeros(4, 3), torch.zeros(3, 8)
    with pytest.raises(ValueError, match=r"B \(2, 8\)"):
        ll.lora_add_forward(y, z, torch.zeros(2, 8), 1.0)
    with pytest.raises(ValueError, match="leading dimensions"):
        ll.lora_add_forward(y, torch.zeros(5, 3), b, 1.0)
    with pytest.raises(ValueError, match="one device"):
        ll.lora_add_forward(y, z, b.to("meta"), 1.0)


@cpu_only
def test_custom_op_registration():
    """torch.library's checks of `splitmoe::lora_add` and `splitmoe::lora_z`: the schema, the fake implementation
    against the real one, and the autograd registration (what torch.compile and AOT autograd rely on)."""
    g = torch.Generator().manual_seed(1)
    y = torch.randn(6, 20, generator=g).to(torch.float16).requires_grad_(True)
    z = torch.randn(6, 4, generator=g).requires_grad_(True)
    b = torch.randn(4, 20, generator=g).requires_grad_(True)
    checks = ("test_schema", "test_autograd_registration", "test_faketensor")
    torch.library.opcheck(ll.lora_add, (y, z, b, 0.5), test_utils=checks)
    x = torch.randn(6, 16, generator=g).to(torch.float16).requires_grad_(True)
    a = torch.randn(16, 4, generator=g).requires_grad_(True)
    torch.library.opcheck(ll.lora_z, (x, a), test_utils=checks)


@cpu_only
def test_op_gradients_and_the_torch_path_it_replaces():
    """Through autograd: y's gradient is dy itself, z's and B's are the fp32 sums, as the torch ops of
    `LoRALinear`'s unfused path give them (the same formulas: equal to fp32 round-off)."""
    g = torch.Generator().manual_seed(2)
    y0 = torch.randn(3, 7, 40, generator=g).to(torch.float16)
    z0, b0 = torch.randn(3, 7, 12, generator=g), torch.randn(12, 40, generator=g)
    dy = torch.randn(3, 7, 40, generator=g).to(torch.float16)

    def grads(fn):
        y, z, b = (t.clone().requires_grad_(True) for t in (y0, z0, b0))
        out = fn(y, z, b)
        return (out, *torch.autograd.grad(out, (y, z, b), dy))

    fused = grads(lambda y, z, b: ll.lora_add(y, z, b, 2.0))
    plain = grads(lambda y, z, b: (y.float() + 2.0 * (z @ b)).to(torch.float16))
    assert torch.equal(fused[1], dy)
    _within_one_rounding(fused[0], y0.double() + 2.0 * (z0.double() @ b0.double()), _sum_error(y0, z0, b0, 2.0))
    for name, a, e in zip(("dz", "dB"), fused[2:], plain[2:]):
        assert a.dtype == e.dtype == torch.float32
        assert_close(a, e, dtype="float32", quantity="moe_grad", name=name)


@cpu_only
def test_lora_z_op_gradients_and_the_torch_path_it_replaces():
    """`lora_z` through autograd against `x.to(fp32) @ A` (the torch path): z and dA equal to fp32 round-off, dx the
    same fp32 sum rounded once to x's dtype."""
    g = torch.Generator().manual_seed(6)
    x0 = torch.randn(2, 9, 40, generator=g).to(torch.float16)
    a0 = torch.randn(40, 12, generator=g) * 0.2
    dz = torch.randn(2, 9, 12, generator=g)

    def grads(fn):
        x, a = (t.clone().requires_grad_(True) for t in (x0, a0))
        z = fn(x, a)
        return (z, *torch.autograd.grad(z, (x, a), dz))

    fused = grads(ll.lora_z)
    plain = grads(lambda x, a: x.to(torch.float32) @ a)
    assert fused[1].dtype == plain[1].dtype == torch.float16
    assert_close(fused[0], plain[0], dtype="float32", quantity="moe_block", name="z")
    bound = 13 * 2.0 ** -24 * (dz.double().abs() @ a0.double().abs().T)
    _within_one_rounding(fused[1], dz.double() @ a0.double().T, bound)
    assert_close(fused[2], plain[2], dtype="float32", quantity="moe_grad", name="dA")


def test_switch_defaults_to_auto_and_names_bad_values(monkeypatch):
    """Unset is "auto": the kernels on CUDA (the gpu tests run them so), the torch ops on the CPU even under the
    interpreter, which runs them only when "triton" asks; "torch" turns them off; other values are refused."""
    x, a = torch.zeros(2, 4, dtype=torch.bfloat16), torch.zeros(4, 3)
    monkeypatch.delenv(lora_mod.LORA_LINEAR_ENV, raising=False)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert lora_mod.lora_linear_mode() == "auto" and not lora_mod.fused_lora_linear(x, a)
    monkeypatch.setenv(lora_mod.LORA_LINEAR_ENV, "fused")
    with pytest.raises(ValueError, match="SPLITMOE_LORA_LINEAR='fused': use one of auto, torch, triton"):
        lora_mod.fused_lora_linear(x, a)
    monkeypatch.setenv(lora_mod.LORA_LINEAR_ENV, "torch")
    assert not lora_mod.fused_lora_linear(x, a)
    monkeypatch.setenv(lora_mod.LORA_LINEAR_ENV, "triton")
    assert lora_mod.fused_lora_linear(x, a) and lora_mod.fused_lora_linear(x.half(), a)
    # fp32 activations (equal dtypes run the torch ops as before) and bf16 factors are not the case it fuses
    assert not lora_mod.fused_lora_linear(x.float(), a)
    assert not lora_mod.fused_lora_linear(x, a.bfloat16())
    monkeypatch.delenv("TRITON_INTERPRET")
    assert lora_mod.fused_lora_linear(x, a) == (x.device.type == "cuda")  # a CPU tensor without the interpreter


def _tiny_model(tmp_path, family: str, dtype=torch.float16):
    from shared_math.checkpoint import write_tiny_checkpoint
    from shared_math.config import ModelConfig
    from tests.shared.sigmoid_families import attn_expert_lora
    from torch_impl import load_model

    # K = E: every token through every expert, so a rounding difference cannot flip a routing choice (which moves
    # the expert gradients by whole tokens' contributions, as tests/torch/test_qwen3_parity.py explains)
    k_eq_e = dict(num_experts_per_tok=8, topk_group=4) if family == "deepseek_v3" else dict(num_experts_per_tok=8)
    path = write_tiny_checkpoint(family, tmp_path / family, dtype="float32", **k_eq_e)
    lora = attn_expert_lora(ModelConfig.from_hf(path))  # every attention projection and both expert tensors
    model = load_model(path, lora=lora, dtype=dtype, lora_seed=0)
    g = torch.Generator().manual_seed(11)
    with torch.no_grad():  # B starts at zero, which would make every LoRA term vanish
        for name, p in model.named_parameters():
            if name.endswith("lora_B"):
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    return model


@cpu_only
@pytest.mark.parametrize("family", ["qwen3_moe", "deepseek_v3"])
def test_a_model_with_the_switch_on_matches_the_torch_ops(tmp_path, monkeypatch, family):
    """A tiny fp16 model (fp32 adapters on q/k/v/o, or on MLA's chained low-rank projections) with
    SPLITMOE_LORA_LINEAR=triton against the same model with the torch ops: the same sums in another order, so the
    loss and every LoRA gradient agree to fp16 rounding flips (numerics "same_math_grad"), and both kernels ran. In
    fp16 because the interpreter rounds bf16 toward zero (module docstring), which would need the bf16 model's loose
    tolerance; a 1 % error in z shows here as 1.3e-2 of the largest gradient."""
    model = _tiny_model(tmp_path, family)
    ids = torch.randint(0, model.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))
    calls = []
    for name in ("lora_add_forward", "lora_z_forward"):
        real = getattr(ll, name)
        monkeypatch.setattr(ll, name, lambda *a, _real=real, _name=name: calls.append(_name) or _real(*a))

    def run(mode):
        monkeypatch.setenv(lora_mod.LORA_LINEAR_ENV, mode)
        model.zero_grad(set_to_none=True)
        loss = model(ids, labels=ids).loss
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    loss_t, grads_t = run("torch")
    assert not calls
    loss_f, grads_f = run("triton")
    assert {"lora_add_forward", "lora_z_forward"} <= set(calls)  # the model's LoRA Linears ran through the kernels
    assert_close(loss_f, loss_t, dtype="float16", quantity="same_math_grad", name="loss")
    for name, grad in grads_t.items():
        assert_close(grads_f[name], grad, dtype="float16", quantity="same_math_grad", name=name)


@cpu_only
@pytest.mark.parametrize("mode", [{}, {"policy": "attention"}, {"offload_to_cpu": True}],
                         ids=["on_device", "keep_attention", "offloaded"])
def test_checkpointed_layers_recompute_the_same_numbers(tmp_path, monkeypatch, mode):
    """With the switch on, activation checkpointing (each mode of `gradient_checkpointing_enable`) gives the loss
    and every gradient bit for bit as without it: the op recomputes the same deterministic kernels (dB's chunk sum
    in a fixed order) and the policies treat it as any other op."""
    monkeypatch.setenv(lora_mod.LORA_LINEAR_ENV, "triton")
    model = _tiny_model(tmp_path, "qwen3_moe")
    model.train()
    ids = torch.randint(0, model.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(1))

    def run():
        model.zero_grad(set_to_none=True)
        loss = model(ids, labels=ids).loss
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    loss, grads = run()
    model.gradient_checkpointing_enable(**mode)
    loss_ck, grads_ck = run()
    assert torch.equal(loss, loss_ck) and grads.keys() == grads_ck.keys()
    for name in grads:
        assert torch.equal(grads_ck[name], grads[name]), name


@cpu_only
def test_compiles_into_one_graph(monkeypatch):
    """A LoRALinear with the switch on under torch.compile(fullgraph=True): the op enters the graph (no break), and
    forward and gradients equal eager's (aot_eager: the same kernels, run through AOT autograd)."""
    from torch_impl.lora import LoRALinear
    from torch_impl.models.layers import Linear

    monkeypatch.setenv(lora_mod.LORA_LINEAR_ENV, "triton")
    g = torch.Generator().manual_seed(4)
    base = Linear(16, 24, bias=True, dtype=torch.bfloat16)
    with torch.no_grad():
        base.weight.copy_(torch.randn(16, 24, generator=g) * 0.2)
        base.bias.copy_(torch.randn(24, generator=g))
    m = LoRALinear(base, 4, 2.0, generator=g)
    with torch.no_grad():
        m.lora_B.normal_(0.0, 0.1, generator=g)
    x = torch.randn(2, 5, 16, generator=g).to(torch.bfloat16).requires_grad_(True)
    dy = torch.randn(2, 5, 24, generator=g).to(torch.bfloat16)

    def run(fn):
        out = fn(x)
        return (out, *torch.autograd.grad(out, (x, m.lora_A, m.lora_B), dy))

    eager = run(m)
    torch._dynamo.reset()
    compiled = run(torch.compile(m, fullgraph=True, backend="aot_eager"))
    for a, e in zip(compiled, eager):
        assert torch.equal(a, e)


# Compiled ahead of time for an H100 (sm_90) with Triton's own ptxas, no GPU needed: what the interpreter accepts
# and the GPU compiler refuses fails here, not on the next device call.
_HOPPER_COMPILE = r"""
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from torch_impl.kernels import lora_linear as ll
# each launch as lora_linear makes it (mm: narrow or wide output; mm_tn): operand dtypes, blocks, warps, stages, and
# what Triton specialises at run time: unit strides as constants, other ints and pointers divisible by 16
NARROW, WIDE = (dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=32), 4, 3), (dict(BLOCK_M=64, BLOCK_N=128, BLOCK_K=64), 8, 2)
TN = (dict(BLOCK_M=64, BLOCK_P=64, BLOCK_Q=128), 8, 2)
MM_IN, MM_OUT = dict(a_ptr="*bf16", b_ptr="*fp32", out_ptr="*fp32", y_ptr="*fp32"), \
    dict(a_ptr="*fp32", b_ptr="*fp32", out_ptr="*bf16", y_ptr="*bf16")
launches = [
    (ll._mm_kernel, MM_IN, NARROW, dict(HAS_Y=False, stride_ak=1, stride_bk=1)),  # x @ A, dy @ Bᵀ (K-major)
    (ll._mm_kernel, MM_OUT, WIDE, dict(HAS_Y=True, stride_ak=1, stride_bk=1)),  # y + s·z @ B
    (ll._mm_kernel, MM_OUT, WIDE, dict(HAS_Y=False, stride_ak=1, stride_bk=1)),  # dz @ Aᵀ
    (ll._mm_tn_kernel, dict(a_ptr="*fp32", b_ptr="*bf16", part_ptr="*fp32"), TN, dict(stride_am=1, stride_bq=1)),  # dB
    (ll._mm_tn_kernel, dict(a_ptr="*bf16", b_ptr="*fp32", part_ptr="*fp32"), TN, dict(stride_ap=1, stride_bm=1)),  # dA
]
for kernel, ptrs, (block, warps, stages), fixed in launches:
    for prec in ("tf32", "ieee"):
        const = dict(block, DOT_PREC=prec, **fixed)
        sig = {n: (ptrs.get(n) or ("fp32" if n == "scale" else "constexpr" if n in const else "i32"))
               for n in kernel.arg_names}
        attrs = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(kernel.arg_names)
                 if sig[n] != "constexpr" and n != "scale"}
        out = triton.compile(ASTSource(fn=kernel, signature=sig, constexprs=const, attrs=attrs),
                             target=GPUTarget("cuda", 90, 32), options={"num_warps": warps, "num_stages": stages})
        assert out.asm.get("cubin"), (kernel, fixed, prec)
print("COMPILED")
"""


def test_kernels_compile_for_hopper():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = str(ROOT)
    r = subprocess.run([sys.executable, "-c", _HOPPER_COMPILE], capture_output=True, text=True, env=env, timeout=600)
    if r.returncode and ("ptxas" in r.stderr and "not found" in r.stderr.lower()):
        pytest.skip("this triton has no ptxas to compile with")
    assert r.returncode == 0 and "COMPILED" in r.stdout, r.stderr[-3000:]


@pytest.mark.gpu
@pytest.mark.parametrize("tf32", [True, False], ids=["tf32", "ieee"])
def test_gpu_lora_linear_bf16_matches_the_torch_ops(monkeypatch, tf32):
    """On CUDA in bf16 at a Qwen3-30B q_proj's width: the fused forward and gradients against the torch ops in the
    same precision (TF32 dots on both sides, or IEEE on both)."""
    from torch_impl.lora import LoRALinear
    from torch_impl.models.layers import Linear

    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", tf32)
    g = torch.Generator(device="cuda").manual_seed(0)
    base = Linear(2048, 4096, bias=False, dtype=torch.bfloat16, device="cuda")
    with torch.no_grad():
        base.weight.copy_(torch.randn(2048, 4096, generator=g, device="cuda") * 0.02)
    m = LoRALinear(base, 64, 2.0)
    with torch.no_grad():
        m.lora_B.normal_(0.0, 0.02, generator=g)
    x = torch.randn(1, 3000, 2048, generator=g, device="cuda").to(torch.bfloat16).requires_grad_(True)
    dy = torch.randn(1, 3000, 4096, generator=g, device="cuda").to(torch.bfloat16)

    def run(mode):
        monkeypatch.setenv(lora_mod.LORA_LINEAR_ENV, mode)
        out = m(x)
        return (out, *torch.autograd.grad(out, (x, m.lora_A, m.lora_B), dy))

    plain, fused = run("torch"), run("triton")
    assert_close(fused[0], plain[0], dtype="bfloat16", quantity="moe_block", name="y")
    assert_close(fused[1], plain[1], dtype="bfloat16", quantity="moe_grad", name="dx")
    # fp32 sums over 3000 rows (dA, dB) or 4096 features (dz, inside dA): TF32 rounds the inputs to 10 bits on both
    # sides, differently ordered, so the fp32 table's tolerance does not apply there; bf16's does
    for name, a, e in zip(("dA", "dB"), fused[2:], plain[2:]):
        assert_close(a, e, dtype="float32" if not tf32 else "bfloat16", quantity="moe_grad", name=name)
