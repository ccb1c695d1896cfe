"""The causal-LM loss without logits (`torch_impl.loss.fused_linear_cross_entropy`) against the materialised path.

Unit level: the loss, dh and dW of the chunked function equal `F.cross_entropy` of `h @ W` in float64 (the oracle),
for both weight layouts, chunk sizes that do and do not divide the rows (1 row a chunk, a prime, more than all rows),
ignored positions, a row with no valid label and a batch with none (NaN, as HF's mean gives).
Model level: every family's forward with `return_logits=False` gives the loss and every LoRA gradient of the
materialised forward in fp32 (tied embeddings and the aux loss included), and no logits.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
F = torch.nn.functional

from shared_math.config import EXPERT_TARGETS, LoraConfig  # noqa: E402
from shared_math.numerics import assert_close  # noqa: E402
from shared_math.tiny import write_tiny_checkpoint  # noqa: E402
from torch_impl import load_model  # noqa: E402
from torch_impl.loss import (  # noqa: E402
    default_chunk_rows,
    fused_linear_cross_entropy,
    liger_available,
    resolve_impl,
    shift_labels,
)


def _reference(h, w, labels, weight_is_HV):
    logits = h @ w if weight_is_HV else h @ w.t()
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), shift_labels(labels).reshape(-1), ignore_index=-100)


@pytest.mark.parametrize("weight_is_HV", [True, False], ids=["lm_head", "tied"])
@pytest.mark.parametrize("chunk_rows", [1, 7, 1000])
@pytest.mark.parametrize("ignored", ["none", "some", "whole_row"])
def test_fused_loss_matches_float64_reference(weight_is_HV, chunk_rows, ignored):
    g = torch.Generator().manual_seed(chunk_rows)
    B, S, H, V = 3, 11, 13, 37  # odd sizes: chunks straddle rows of the batch
    h = torch.randn(B, S, H, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn(*((H, V) if weight_is_HV else (V, H)), generator=g, dtype=torch.float64, requires_grad=True)
    labels = torch.randint(0, V, (B, S), generator=g)
    if ignored == "some":
        labels[:, :3] = -100
    elif ignored == "whole_row":
        labels[1] = -100
    loss = fused_linear_cross_entropy(h, w, labels, weight_is_HV=weight_is_HV, chunk_rows=chunk_rows)
    dh, dw = torch.autograd.grad(3.0 * loss, (h, w))  # a non-unit upstream gradient reaches both
    ref = _reference(h, w, labels, weight_is_HV)
    rdh, rdw = torch.autograd.grad(3.0 * ref, (h, w))
    assert_close(loss.detach(), ref.detach(), dtype="float64", quantity="moe_block", name="loss")
    assert_close(dh, rdh, dtype="float64", quantity="moe_grad", name="dh")
    assert_close(dw, rdw, dtype="float64", quantity="moe_grad", name="dW")


def test_no_valid_label_gives_nan_like_hf():
    h = torch.randn(1, 4, 8, dtype=torch.float64)
    w = torch.randn(8, 16, dtype=torch.float64)
    labels = torch.full((1, 4), -100)
    assert math.isnan(float(fused_linear_cross_entropy(h, w, labels)))
    assert math.isnan(float(_reference(h, w, labels, True)))


def test_frozen_weight_gets_no_gradient_and_eval_computes_none():
    h = torch.randn(2, 5, 8, requires_grad=True)
    w = torch.randn(8, 16)
    labels = torch.randint(0, 16, (2, 5))
    loss = fused_linear_cross_entropy(h, w, labels)
    (dh,) = torch.autograd.grad(loss, (h,))
    assert dh.shape == h.shape and w.grad is None
    with torch.no_grad():  # no gradient asked for: the same loss, nothing else computed
        assert torch.equal(fused_linear_cross_entropy(h, w, labels), loss.detach())


def test_bfloat16_rounds_where_hf_rounds():
    """bf16 inputs: the logits are rounded to bf16 before the fp32 log-sum-exp and dz is rounded to bf16 before the
    dh GEMM, as HF's `logits.float()` path does; what is left is GEMM summation order (bf16 tolerance)."""
    g = torch.Generator().manual_seed(0)
    h = torch.randn(2, 9, 32, generator=g).to(torch.bfloat16).requires_grad_()
    w = (torch.randn(32, 50, generator=g) / 6).to(torch.bfloat16)
    labels = torch.randint(0, 50, (2, 9), generator=g)
    loss = fused_linear_cross_entropy(h, w, labels, chunk_rows=4)
    (dh,) = torch.autograd.grad(loss, (h,))
    ref_logits = (h @ w).float()
    ref = F.cross_entropy(ref_logits.reshape(-1, 50), shift_labels(labels).reshape(-1))
    (rdh,) = torch.autograd.grad(ref, (h,))
    assert loss.dtype == torch.float32
    assert_close(loss.detach(), ref.detach(), dtype="bfloat16", quantity="loss", name="loss")
    assert_close(dh.float(), rdh.float(), dtype="bfloat16", quantity="moe_grad", name="dh")


def test_env_chunk_rows_sets_the_chunk_and_bad_values_are_refused(monkeypatch):
    import torch_impl.loss as L

    seen = []
    real = L._FusedLinearCE.apply
    monkeypatch.setattr(L._FusedLinearCE, "apply", lambda *a: seen.append(a[4]) or real(*a))
    h, w = torch.randn(1, 9, 8, dtype=torch.float64), torch.randn(8, 11, dtype=torch.float64)
    labels = torch.randint(0, 11, (1, 9))
    monkeypatch.setenv("SPLITMOE_LOSS_CHUNK_ROWS", "3")
    three = fused_linear_cross_entropy(h, w, labels)
    monkeypatch.delenv("SPLITMOE_LOSS_CHUNK_ROWS")
    default = fused_linear_cross_entropy(h, w, labels)
    assert seen == [3, default_chunk_rows(11)] and torch.allclose(three, default, rtol=1e-12)
    fused_linear_cross_entropy(h, w, labels, chunk_rows=5)  # an explicit chunk wins over the variable
    monkeypatch.setenv("SPLITMOE_LOSS_CHUNK_ROWS", "4")
    fused_linear_cross_entropy(h, w, labels, chunk_rows=5)
    assert seen[2:] == [5, 5]
    for bad in ("0", "-1", "1.5", "many"):
        monkeypatch.setenv("SPLITMOE_LOSS_CHUNK_ROWS", bad)
        with pytest.raises(ValueError, match="SPLITMOE_LOSS_CHUNK_ROWS"):
            fused_linear_cross_entropy(h, w, labels)


FAMILIES = {
    "qwen3_moe": {},
    "qwen3_moe_tied_aux": dict(tie_word_embeddings=True, output_router_logits=True, router_aux_loss_coef=0.5),
    "gpt_oss": {},
    "deepseek_v3": {},
    "glm4_moe": {},
    "glm4_moe_lite": {},
}


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
@pytest.mark.parametrize("case", list(FAMILIES))
def test_model_loss_without_logits_equals_materialised(case, device, tmp_path):
    """On the CPU `auto` is the chunk loop; on CUDA it is the loss kernel (`impl="triton"`, since session 13), here
    in fp32 inside every family's whole forward and backward, so the fp32 tolerance holds for both."""
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    family = case.split("_tied")[0]
    path = write_tiny_checkpoint(family, tmp_path / case, seed=3, **FAMILIES[case])
    attn = ("q_a_proj", "kv_b_proj", "o_proj") if family in ("deepseek_v3", "glm4_moe_lite") else ("q_proj", "v_proj")
    model = load_model(path, lora=LoraConfig(rank=4, alpha=8, targets=attn + EXPERT_TARGETS), lora_seed=1,
                       moe_backend="native", device=device)
    with torch.no_grad():  # B non-zero, so the LoRA path is part of the loss
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.empty_like(p, device="cpu").normal_(
                    0.0, 0.05, generator=torch.Generator().manual_seed(len(name))))
    model.train()
    rng = np.random.default_rng(0)
    ids = torch.from_numpy(rng.integers(0, 128, size=(2, 10))).to(device)
    labels = ids.clone()
    labels[:, :3] = -100

    def run(return_logits):
        model.zero_grad(set_to_none=True)
        out = model(ids, labels=labels, return_logits=return_logits)
        out.loss.backward()
        return out, {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}

    fused, fused_grads = run(False)
    full, full_grads = run(True)
    assert fused.logits is None and full.logits is not None
    assert_close(fused.loss.detach(), full.loss.detach(), dtype="float32", quantity="loss", name="loss")
    if full.aux_loss is not None:
        assert torch.equal(fused.aux_loss, full.aux_loss)
    assert fused_grads.keys() == full_grads.keys() and fused_grads
    for k in full_grads:
        assert_close(fused_grads[k], full_grads[k], dtype="float32", quantity="lora_grad", name=k)


@pytest.mark.gpu
@pytest.mark.parametrize("impl", ["chunked", "liger", "triton"])
@pytest.mark.parametrize("weight_is_HV", [True, False], ids=["lm_head", "tied"])
def test_fused_loss_bf16_on_gpu_matches_materialised(weight_is_HV, impl):
    """A Qwen3-sized vocabulary in bf16 on the GPU, several chunks: loss and dh against the materialised path, for
    the chunk loop, Liger's kernel and the chunk loop's own kernel (impl "triton", what `auto` picks there)."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    if impl == "liger" and not liger_available():
        pytest.skip("liger-kernel is not installed")
    g = torch.Generator(device="cuda").manual_seed(0)
    S, H, V = 3000, 2048, 151_936
    h = (torch.randn(1, S, H, device="cuda", generator=g) * 2).to(torch.bfloat16).requires_grad_()
    w = (torch.randn(*((H, V) if weight_is_HV else (V, H)), device="cuda", generator=g) * 0.02).to(torch.bfloat16)
    labels = torch.randint(0, V, (1, S), device="cuda", generator=g)
    labels[:, :100] = -100
    loss = fused_linear_cross_entropy(h, w, labels, weight_is_HV=weight_is_HV, impl=impl)
    (dh,) = torch.autograd.grad(loss, (h,))
    logits = (h @ w if weight_is_HV else h @ w.t()).float()
    ref = F.cross_entropy(logits.reshape(-1, V), shift_labels(labels).reshape(-1))
    (rdh,) = torch.autograd.grad(ref, (h,))
    assert_close(loss.detach(), ref.detach(), dtype="bfloat16", quantity="loss", name="loss")
    assert_close(dh.float(), rdh.float(), dtype="bfloat16", quantity="moe_grad", name="dh")


# Liger's kernels on CPU run only in the Triton interpreter, which triton enables at a kernel's definition: a fresh
# process with TRITON_INTERPRET=1 imports liger there (this process may have imported triton without it).
_LIGER_CHECK = r"""
import torch
from torch_impl.loss import fused_linear_cross_entropy
torch.manual_seed(0)
out = []
for weight_is_HV in (True, False):
    B, S, H, V = 2, 23, 16, 97
    h = torch.randn(B, S, H, requires_grad=True)
    w = torch.randn(*((H, V) if weight_is_HV else (V, H))) * 0.3
    labels = torch.randint(0, V, (B, S))
    labels[0, 5:9] = -100
    labels[1, :] = -100 if not weight_is_HV else labels[1, :]
    l1 = fused_linear_cross_entropy(h, w, labels, weight_is_HV=weight_is_HV, impl="liger")
    (g1,) = torch.autograd.grad(l1, (h,))
    l2 = fused_linear_cross_entropy(h, w, labels, weight_is_HV=weight_is_HV, impl="chunked")
    (g2,) = torch.autograd.grad(l2, (h,))
    out.append((float(l1), float(l2), float((g1 - g2).abs().max()), float(g2.abs().max())))
none = fused_linear_cross_entropy(torch.randn(1, 4, 16), torch.randn(16, 97), torch.full((1, 4), -100), impl="liger")
print("RESULT", out, float(none))
"""


def test_liger_kernel_gives_the_chunk_loops_loss_and_gradient():
    """impl='liger' (`auto`'s pick on CUDA until session 13) against the chunk loop in fp32, in the Triton
    interpreter: HF's label shift, ignored positions and a whole ignored row, both weight layouts, and NaN when
    nothing is labelled."""
    import os
    import subprocess
    import sys

    pytest.importorskip("triton")
    if not liger_available():
        pytest.skip("liger-kernel is not installed (the torch extra installs it)")
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    r = subprocess.run([sys.executable, "-c", _LIGER_CHECK], capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    rows, none = eval(r.stdout.split("RESULT", 1)[1].rsplit(" ", 1)[0]), r.stdout.rsplit(" ", 1)[1]
    for l1, l2, gdiff, gmax in rows:
        # fp32 on both sides; the sums run in other orders (Liger per kernel block, the loop per chunk): a few ulps
        assert math.isclose(l1, l2, rel_tol=1e-6) and gdiff <= 1e-6 * gmax
    assert none.strip() == "nan"


# impl="triton" on CPU: the kernel in the Triton interpreter, in a fresh process for the same reason as Liger's. In fp32
# against the float64 oracle (both layouts, chunks of 1 row, a prime and more than all rows, a vocabulary spanning
# two 4096-wide blocks, ignored positions, a trainable weight's dW, a non-unit upstream gradient), in fp16 against the
# chunk loop (the same rounding points: fp16 logits, fp16 dz), and NaN with nothing labelled.
_TRITON_CHECK = r"""
import torch
import torch.nn.functional as F
from torch_impl.loss import fused_linear_cross_entropy, shift_labels
out = []
g = torch.Generator().manual_seed(0)
for weight_is_HV in (True, False):
    for chunk in (1, 7, 1000):
        B, S, H, V = 2, 9, 16, 4099
        h = torch.randn(B, S, H, generator=g, requires_grad=True)
        w = (torch.randn(*((H, V) if weight_is_HV else (V, H)), generator=g) * 0.3).requires_grad_(True)
        labels = torch.randint(0, V, (B, S), generator=g)
        labels[0, 2:5] = -100
        labels[1, -3] = V - 1  # the last column, in the second block
        loss = fused_linear_cross_entropy(h, w, labels, weight_is_HV=weight_is_HV, impl="triton", chunk_rows=chunk)
        dh, dw = torch.autograd.grad(3.0 * loss, (h, w))
        h64, w64 = h.detach().double().requires_grad_(True), w.detach().double().requires_grad_(True)
        logits = h64 @ w64 if weight_is_HV else h64 @ w64.t()
        ref = F.cross_entropy(logits.reshape(-1, V), shift_labels(labels).reshape(-1))
        rdh, rdw = torch.autograd.grad(3.0 * ref, (h64, w64))
        rel = lambda a, b: float((a.double() - b).norm() / b.norm())
        out.append(("fp32", weight_is_HV, chunk, rel(loss.detach(), ref.detach()), rel(dh, rdh), rel(dw, rdw)))
h = torch.randn(1, 40, 16, generator=g).half().requires_grad_(True)
w = (torch.randn(16, 4099, generator=g) * 0.3).half()
labels = torch.randint(0, 4099, (1, 40), generator=g)
l1 = fused_linear_cross_entropy(h, w, labels, impl="triton", chunk_rows=16)
(d1,) = torch.autograd.grad(l1, (h,))
l2 = fused_linear_cross_entropy(h, w, labels, impl="chunked", chunk_rows=16)
(d2,) = torch.autograd.grad(l2, (h,))
out.append(("fp16", float((l1 - l2).abs()), float((d1.float() - d2.float()).abs().max()), float(d2.abs().max())))
none = fused_linear_cross_entropy(torch.randn(1, 4, 16), torch.randn(16, 97), torch.full((1, 4), -100),
                                  impl="triton")
print("RESULT", out, "NONE", float(none))
"""


def test_triton_loss_kernel_matches_the_oracle_in_the_interpreter():
    import os
    import subprocess
    import sys

    pytest.importorskip("triton")
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    r = subprocess.run([sys.executable, "-c", _TRITON_CHECK], capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    result, none = r.stdout.split("RESULT", 1)[1].split("NONE")
    rows = eval(result)
    fp32 = [row for row in rows if row[0] == "fp32"]
    assert len(fp32) == 6
    for _, weight_is_HV, chunk, rel_loss, rel_dh, rel_dw in fp32:
        # fp32 logits, fp32 log-sum-exp and softmax against float64: a few fp32 ulps (2^-24 = 6e-8) through sums of
        # at most 4099 terms
        assert rel_loss < 1e-6 and rel_dh < 1e-5 and rel_dw < 1e-5, (weight_is_HV, chunk, rel_loss, rel_dh, rel_dw)
    (_, dloss, ddh, dmax), = [row for row in rows if row[0] == "fp16"]
    # the same fp16 logits and fp16 dz on both sides, fp32 arithmetic between: the kernel's online sums differ from
    # torch's logsumexp by fp32 ulps, which can move a dz across one fp16 rounding step (2^-11 relative)
    assert dloss < 1e-5 and ddh <= 2 ** -10 * dmax
    assert none.strip() == "nan"


# Compiled ahead of time for an H100 (sm_90) with Triton's own ptxas, no GPU needed: what the interpreter cannot
# catch (a construct the interpreter accepts and the GPU compiler refuses) fails here, not on the next device call.
_HOPPER_COMPILE = r"""
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from torch_impl.kernels.cross_entropy import _cross_entropy_rows_kernel as kernel
for dtype in ("*bf16", "*fp16", "*fp32"):
    for write_grad in (True, False):
        sig = {"z_ptr": dtype, "stride_z": "i64", "target_ptr": "*i64", "loss_ptr": "*fp32", "n_valid_ptr": "*fp32",
               "V": "i32", "ignore_index": "i32", "WRITE_GRAD": "constexpr", "BLOCK_V": "constexpr"}
        src = ASTSource(fn=kernel, signature=sig, constexprs={"WRITE_GRAD": write_grad, "BLOCK_V": 4096})
        out = triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": 8})
        assert out.asm.get("cubin"), (dtype, write_grad)
print("COMPILED")
"""


def test_triton_loss_kernel_compiles_for_hopper():
    import os
    import subprocess
    import sys

    pytest.importorskip("triton")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = str(Path(__file__).resolve().parents[2])
    r = subprocess.run([sys.executable, "-c", _HOPPER_COMPILE], capture_output=True, text=True, env=env, timeout=600)
    if r.returncode and ("ptxas" in r.stderr and "not found" in r.stderr.lower()):
        pytest.skip("this triton has no ptxas to compile with")
    assert r.returncode == 0 and "COMPILED" in r.stdout, r.stderr[-3000:]


def test_loss_impl_switch_and_the_triton_kernels_place(monkeypatch):
    """SPLITMOE_LOSS_IMPL is what `auto` means when set (a benchmark row timing another path), a bad value is named;
    `triton` needs CUDA or the interpreter, and may run inside a CUDA-graph step (its count stays on the device)."""
    import types

    from torch_impl import loss as loss_mod
    from torch_impl.models.layers import static_batch

    cpu = torch.zeros(2, 3)
    monkeypatch.setenv(loss_mod.ENV_VAR, "chunked")
    assert resolve_impl("auto", cpu) == "chunked"
    monkeypatch.setenv(loss_mod.ENV_VAR, "cce")
    with pytest.raises(ValueError, match="SPLITMOE_LOSS_IMPL='cce'"):
        resolve_impl("auto", cpu)
    monkeypatch.setenv(loss_mod.ENV_VAR, "triton")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(ValueError, match="loss impl 'triton' runs on a CUDA device"):
        resolve_impl("auto", cpu)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert resolve_impl("auto", cpu) == "triton"
    with pytest.raises(ValueError, match="runs on a CUDA device"):
        resolve_impl("triton", cpu.double())
    monkeypatch.delenv(loss_mod.ENV_VAR)
    cuda = types.SimpleNamespace(is_cuda=True, dtype=torch.bfloat16)  # what resolve_impl reads of a CUDA tensor
    with static_batch(packed=False):
        assert resolve_impl("triton", cuda) == "triton"


def test_the_fused_loss_passes_its_row_count_to_the_chunk_rule(monkeypatch):
    """The chunk rule (shared_math.loss_chunks, tests/shared/test_loss_chunks.py) sees the loss's token rows, B·S."""
    import torch_impl.loss as L

    seen = []
    monkeypatch.setattr(L, "default_chunk_rows", lambda *a: seen.append(a) or 4)
    h, w = torch.randn(2, 9, 8, dtype=torch.float64), torch.randn(8, 11, dtype=torch.float64)
    fused_linear_cross_entropy(h, w, torch.randint(0, 11, (2, 9)))
    assert seen == [(11, "chunked", 18)]


def test_auto_is_the_kernel_on_cuda_graph_steps_included(monkeypatch):
    """On CUDA `auto` is the loss kernel (3.3x Liger at 4K on an H100, session 13), inside static_batch (a CUDA-graph
    capture's forward) as outside, since it keeps its count on the device; an explicit `liger`, whose forward syncs
    with the host, is refused there with the reason and allowed outside."""
    import types

    from torch_impl import loss as loss_mod
    from torch_impl.models.layers import static_batch

    monkeypatch.delenv(loss_mod.ENV_VAR, raising=False)
    monkeypatch.setattr(loss_mod, "liger_available", lambda: True)
    h = types.SimpleNamespace(is_cuda=True, dtype=torch.bfloat16)  # what resolve_impl reads of a CUDA tensor
    assert resolve_impl("auto", h) == "triton"
    assert resolve_impl("liger", h) == "liger"
    with static_batch(packed=False):
        assert resolve_impl("auto", h) == "triton"
        with pytest.raises(ValueError, match="CUDA-graph step"):
            resolve_impl("liger", h)
    h64 = types.SimpleNamespace(is_cuda=True, dtype=torch.float64)  # no float64 kernel: the chunk loop
    assert resolve_impl("auto", h64) == "chunked"


def test_auto_picks_the_chunk_loop_off_cuda():
    h = torch.zeros(2, 3)
    assert resolve_impl("auto", h) == "chunked"
    with pytest.raises(ValueError, match="one of auto, chunked, liger, triton"):
        resolve_impl("cce", h)
