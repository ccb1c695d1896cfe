"""The fused glue kernels (torch_impl.models.fused_glue: Liger's RMSNorm and RoPE on CUDA) against the eager formulas
they replace, forward and backward, and the switch that picks them.

On CPU only the switch is tested (the kernels run on CUDA; Liger's RMSNorm does not run in the Triton interpreter).
The `gpu` tests compare in bf16 on the H200: the eager formula is the reference (HF's rounding, tested against HF in
the parity suites, which on CUDA now run through the fused kernels too)."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402

from shared_math.numerics import assert_close  # noqa: E402
from torch_impl.models import fused_glue  # noqa: E402
from torch_impl.models.fused_glue import glue_mode, set_glue_mode  # noqa: E402
from torch_impl.models.gpt_oss import GptOssRMSNorm  # noqa: E402
from torch_impl.models.layers import RMSNorm, apply_rotary  # noqa: E402


@pytest.fixture(autouse=True)
def _restore_mode():
    yield
    set_glue_mode("auto")


def test_cpu_and_fp32_take_the_eager_formulas(monkeypatch):
    monkeypatch.delenv("SPLITMOE_GLUE", raising=False)
    assert glue_mode(torch.zeros(2, dtype=torch.bfloat16)) == "eager"  # a CPU tensor
    if torch.cuda.is_available():
        assert glue_mode(torch.zeros(2, device="cuda")) == "eager"  # fp32: the reference runs stay literal
        expected = "fused" if fused_glue.liger_glue_available() else "eager"
        assert glue_mode(torch.zeros(2, device="cuda", dtype=torch.bfloat16)) == expected
        monkeypatch.setenv("SPLITMOE_GLUE", "eager")
        assert glue_mode(torch.zeros(2, device="cuda", dtype=torch.bfloat16)) == "eager"


def test_set_glue_mode_refuses_unknown_modes():
    with pytest.raises(ValueError, match="auto, fused, eager"):
        set_glue_mode("fast")


def test_fused_mode_without_liger_says_how_to_get_it(monkeypatch):
    monkeypatch.setattr(fused_glue, "liger_glue_available", lambda: False)
    with pytest.raises(ValueError, match="liger-kernel"):
        set_glue_mode("fused")


def _needs_liger() -> None:
    if not fused_glue.liger_glue_available():
        pytest.skip("liger-kernel is not installed (pip install 'splitmoe[torch]'): the eager formulas run instead")


def _cuda_bf16(*shape, seed, scale=1.0, grad=True):
    g = torch.Generator(device="cuda").manual_seed(seed)
    t = (torch.randn(*shape, generator=g, device="cuda") * scale).to(torch.bfloat16)
    return t.requires_grad_(grad)


@pytest.mark.gpu
@pytest.mark.parametrize("norm_class", [RMSNorm, GptOssRMSNorm], ids=["llama", "weight_fp32"])
@pytest.mark.parametrize("shape", [(1, 37, 2048), (2, 13, 32, 128), (3, 5, 576)], ids=str)
def test_fused_rms_norm_matches_eager(norm_class, shape):
    _needs_liger()
    norm = norm_class(shape[-1], 1e-6, dtype=torch.bfloat16, device="cuda")
    with torch.no_grad():
        norm.weight.copy_(_cuda_bf16(shape[-1], seed=1, grad=False) * 0.1 + 1)
    x = _cuda_bf16(*shape, seed=2, scale=3.0)
    dy = _cuda_bf16(*shape, seed=3, grad=False)
    assert glue_mode(x) == "fused"
    y = norm(x * 1)  # through the switch: the fused kernel here
    (dx,) = torch.autograd.grad(y, x, dy)
    y_ref = norm.eager(x * 1)
    (dx_ref,) = torch.autograd.grad(y_ref, x, dy)
    # the mean of squares is summed in another order: an output may be one bf16 step off (u = 2^-8 relative)
    assert_close(y.float(), y_ref.float(), dtype="bfloat16", quantity="routing_weights", name="rms_norm out",
                 rtol=2 ** -7, atol=0.0)
    assert (y != y_ref).float().mean() < 0.01, "more than 1% of outputs differ from the eager rounding"
    assert_close(dx.float(), dx_ref.float(), dtype="bfloat16", quantity="moe_grad", name="rms_norm dx")


@pytest.mark.gpu
@pytest.mark.parametrize("heads,kv_heads,head_dim,rotary_dim", [(32, 4, 128, 128), (8, 8, 64, 64), (12, 2, 128, 64)],
                         ids=["qwen3", "mha", "partial"])
def test_fused_rotary_matches_eager(heads, kv_heads, head_dim, rotary_dim):
    _needs_liger()
    B, S = 2, 19
    # q, k as the attention modules make them: [B, S, heads, D] storage seen as [B, heads, S, D]
    q0 = _cuda_bf16(B, S, heads, head_dim, seed=4)
    k0 = _cuda_bf16(B, S, kv_heads, head_dim, seed=5)
    pos = torch.arange(S, device="cuda", dtype=torch.float32).expand(B, S)
    inv = 1.0 / (1e4 ** (torch.arange(0, rotary_dim, 2, device="cuda", dtype=torch.float32) / rotary_dim))
    freqs = pos[..., None] * inv
    emb = torch.cat([freqs, freqs], -1)
    cos, sin = emb.cos().to(torch.bfloat16), emb.sin().to(torch.bfloat16)
    dq = _cuda_bf16(B, heads, S, head_dim, seed=6, grad=False)
    dk = _cuda_bf16(B, kv_heads, S, head_dim, seed=7, grad=False)

    def run(fused: bool):
        set_glue_mode("auto" if fused else "eager")
        assert glue_mode(q0) == ("fused" if fused else "eager")
        q, k = apply_rotary((q0 * 1).transpose(1, 2), (k0 * 1).transpose(1, 2), cos, sin)
        grads = torch.autograd.grad((q, k), (q0, k0), (dq, dk))
        return q.detach().clone(), k.detach().clone(), grads

    q, k, (gq, gk) = run(True)
    q_ref, k_ref, (gq_ref, gk_ref) = run(False)
    for name, a, e in (("q", q, q_ref), ("k", k, k_ref), ("dq", gq, gq_ref), ("dk", gk, gk_ref)):
        # each output is a·cos ± b·sin of bf16 operands, rounded per product and sum in both: one bf16 step at most
        assert_close(a.float(), e.float(), dtype="bfloat16", quantity="routing_weights", name=f"rope {name}",
                     rtol=2 ** -7, atol=2 ** -7)
    if rotary_dim < head_dim:  # the dims past the rotary width pass through unchanged
        assert torch.equal(q[..., rotary_dim:], q0.transpose(1, 2)[..., rotary_dim:].detach())


# ---- projections that share their input (models.layers.project) ----------------------------------------------------

class _CountCasts(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.casts = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.casts += func.overloadpacket.__name__ == "_to_copy"
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("with_plain", [False, True], ids=["qkv", "qkv_and_a_plain_linear"])
def test_project_shares_the_lora_input_and_changes_no_number(with_plain, seed):
    """q, k, v (and a frozen Linear among them) through `project`: the outputs and the gradients of x and of every
    LoRA factor equal those of each projection called alone (bf16 activations, fp32 adapters, biases), while x is
    cast to the adapters' dtype once instead of once per LoRA projection."""
    from torch_impl.lora import LoRALinear
    from torch_impl.models.layers import Linear, project

    g = torch.Generator().manual_seed(seed)

    def linear(n_in, n_out, rank, bias):
        base = Linear(n_in, n_out, bias=bias, dtype=torch.bfloat16)
        with torch.no_grad():
            base.weight.copy_(torch.randn(n_in, n_out, generator=g) * 0.1)
            if bias:
                base.bias.copy_(torch.randn(n_out, generator=g))
        if rank is None:
            return base
        m = LoRALinear(base, rank, 2.0, generator=g)
        with torch.no_grad():
            m.lora_B.normal_(0.0, 0.1, generator=g)
        return m

    projs = [linear(24, 32, 4, True), linear(24, 8, 3, False), linear(24, 8, 4, True)]
    if with_plain:
        projs.insert(1, linear(24, 16, None, True))
    x = (torch.randn(2, 5, 24, generator=g)).to(torch.bfloat16).requires_grad_(True)
    dys = [torch.randn(2, 5, p.out_features, generator=g).to(torch.bfloat16) for p in projs]
    params = [t for p in projs if hasattr(p, "lora_A") for t in (p.lora_A, p.lora_B)]

    def run(fn):
        outs = fn()
        grads = torch.autograd.grad(outs, [x, *params], dys)
        return outs, grads

    with _CountCasts() as counted:
        fused, fused_grads = run(lambda: project(x, *projs))
    alone, alone_grads = run(lambda: [p(x) for p in projs])
    for a, b in zip([*fused, *fused_grads], [*alone, *alone_grads]):
        # each z column is the same fp32 dot product over x's row; the wider GEMM may only sum it in another order
        assert_close(a, b, dtype="float32" if a.dtype == torch.float32 else "bfloat16", quantity="moe_grad")
    assert [o.dtype for o in fused] == [torch.bfloat16] * len(projs)
    # forward: x once, each B factor as it is (fp32 no-op); backward: the one cast's gradient back to bf16
    n_lora = len(params) // 2
    alone_casts = _CountCasts()
    with alone_casts:
        run(lambda: [p(x) for p in projs])
    assert counted.casts == alone_casts.casts - 2 * (n_lora - 1)
