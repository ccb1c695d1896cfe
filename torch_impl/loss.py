"""The causal-LM loss from the final hidden states and the output weight, without ever holding the `[S, V]` logits.

Shape legend: N = B·S token rows · H hidden · V vocab · C rows per chunk.

HF's `ForCausalLMLoss` computes `logits = h @ W` for every token (bf16), copies them to fp32, shifts the labels left
by one and takes the mean cross-entropy over the non-ignored positions. At 64K tokens and V = 151,936 the fp32 copy
alone is 40 GB. `fused_linear_cross_entropy` gives the same number and the same gradients chunk by chunk:

    for each chunk of C rows:  z = (h_c @ W).float()              the logits of C rows, rounded where HF rounds
                               lse = logsumexp(z)                   fp32
                               loss += Σ (lse − z[label])           over the chunk's valid rows
                               dz = (softmax(z) − onehot) / n_valid dh_c = dz.to(h.dtype) @ Wᵀ (HF's rounding of dz)

The gradient is computed in the forward while the chunk's logits exist (so the logits matmul runs once, not twice)
and scaled by the incoming gradient in the backward; it is kept only when autograd asks for it (`ctx`'s
`needs_input_grad`), so eval pays for the loss alone. Peak extra memory is one chunk's `[C, V]` fp32 block plus
`dh [N, H]`, set by `chunk_rows`. A frozen output weight (every recipe here) gets no gradient; a trainable one gets
its fp32-accumulated `dW = Σ_c h_cᵀ dz_c`.

Cut-Cross-Entropy and Liger-Kernel's fused linear cross-entropy do the same in Triton. Measured on the H200
(benchmarks/loss_bench.py, 2026-12-05, V = 151,936, H = 2048, bf16; REPORT.md): at 4K / 16K / 64K tokens this chunk
loop takes 18.9 / 74.8 / 298 ms with 3.4 GiB of extra memory, Liger 22.7 / 38.3 / 140 ms with 0.02 / 0.07 / 0.29
GiB, Cut-Cross-Entropy 25.7 / 102 / 407 ms (and 5x their gradient error: it keeps bf16 gradients), materialised
logits 14.4 / 58.2 / 245 ms with 6.9 / 27.8 / 111 GiB. Liger was `auto`'s pick on CUDA until session 13: leaner
at every length, twice the chunk loop's speed from 16K on. Both give HF's loss and rounding points (the bf16 logits,
fp32 softmax, the gradient rounded to bf16 before `dz @ Wᵀ`).

Liger sizes its chunks from the token count: 64 rows at 4K tokens and V = 151,936, so its GEMMs run with M = 64 (27.8
ms for the 4K loss of a Qwen3 step on an H100, 183 TFLOP/s; session 12's profile). `impl="triton"` is the chunk loop
with each chunk's loss and gradient in one Triton kernel (`torch_impl.kernels.cross_entropy`) over the model-dtype
logits, in place: 832-row chunks there, a 256 MiB block in bf16 (from 8K tokens on 1920 rows, 0.54 GiB), no fp32
copy, and no host sync (a CUDA graph can hold it). Timed on an H100 (2026-12-06, `gpu_session.sh session13loss`;
benchmarks/results/session13_2026-12-06): 4K tokens 9.7 ms against Liger's 32.3 (3.3x), 16K 41.9 against 42.1, the
same gradient error against the fp32 materialised loss, 0.24 GiB of extra memory against Liger's 0.02-0.07; the
compiled Qwen3 24-layer 4K step 262 ms against 279 with Liger, the same peak. So `auto` is `triton` wherever the
kernel runs (CUDA, 16/32-bit), CUDA-graph steps included, and the chunk loop elsewhere (CPUs, float64); `liger` stays
selectable by name.
"""

from __future__ import annotations

import importlib.util
import os

import torch
import torch.nn.functional as F

from shared_math.loss_chunks import default_chunk_rows  # the chunk rule, shared with jax_impl and the plan

IGNORE_INDEX = -100


def shift_labels(labels_BS: torch.Tensor, ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """HF's label shift: position t is scored against labels[t + 1]; the last position of each row is ignored."""
    return F.pad(labels_BS, (0, 1), value=ignore_index)[..., 1:]


def _env_chunk_rows() -> int | None:
    """SPLITMOE_LOSS_CHUNK_ROWS=N: rows per chunk for every fused loss that is not given `chunk_rows`, so a step
    benchmark can time chunk sizes without a new option through every model (its rows record the variable); unset
    or empty: `default_chunk_rows`."""
    raw = os.environ.get("SPLITMOE_LOSS_CHUNK_ROWS", "")
    if not raw:
        return None
    if not raw.isdigit() or int(raw) < 1:
        raise ValueError(f"SPLITMOE_LOSS_CHUNK_ROWS={raw!r}: expected a positive number of rows per loss chunk "
                         "(e.g. 1280), or leave it unset for the default")
    return int(raw)


class _FusedLinearCE(torch.autograd.Function):
    """loss = mean over valid rows of CE(h @ W, target); W given as [H, V] (`weight_is_HV`) or [V, H]."""

    @staticmethod
    def forward(ctx, h_NH: torch.Tensor, weight: torch.Tensor, target_N: torch.Tensor, weight_is_HV: bool,
                chunk_rows: int, ignore_index: int, kernel: bool = False) -> torch.Tensor:
        N = h_NH.shape[0]
        w_HV = weight if weight_is_HV else weight.t()
        need_dh, need_dw = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        acc = torch.promote_types(h_NH.dtype, torch.float32)
        valid_N = target_N != ignore_index
        # HF's mean: sum over valid rows / their count (0/0 = NaN with no valid row, as F.cross_entropy gives)
        n_valid = valid_N.sum().to(acc)
        total = torch.zeros((), dtype=acc, device=h_NH.device)
        dh_NH = torch.empty_like(h_NH) if need_dh else None
        dw_HV = torch.zeros(w_HV.shape, dtype=acc, device=w_HV.device) if need_dw else None
        if kernel:  # impl "triton" (imported here: triton only where it is asked for)
            from torch_impl.kernels.cross_entropy import cross_entropy_rows_
        for s in range(0, N, chunk_rows):
            h_c = h_NH[s:s + chunk_rows]
            t_c = target_N[s:s + chunk_rows]
            if kernel:  # loss and dz of the chunk in one kernel, dz over the logits in place
                z_CV = h_c @ w_HV  # the model-dtype logits (HF's rounding point); the kernel reads them in fp32
                total = total + cross_entropy_rows_(z_CV, t_c, n_valid, ignore_index, need_dh or need_dw).sum()
                if need_dh:
                    dh_NH[s:s + chunk_rows] = z_CV @ w_HV.t()
                if need_dw:
                    dw_HV.add_(h_c.t().to(z_CV.dtype) @ z_CV)
                del z_CV
                continue
            v_c = valid_N[s:s + chunk_rows]
            # the model-dtype logits, then fp32 (HF's rounding points); float64 stays float64 for the oracle tests
            z_CV = (h_c @ w_HV).to(acc)
            lse_C = torch.logsumexp(z_CV, dim=-1)
            safe_t = torch.where(v_c, t_c, torch.zeros_like(t_c))
            z_t = z_CV.gather(1, safe_t[:, None]).squeeze(1)
            total = total + torch.where(v_c, lse_C - z_t, torch.zeros_like(lse_C)).sum()
            if need_dh or need_dw:
                # dz = (softmax − onehot) / n_valid on valid rows, 0 elsewhere; computed in place over z's buffer
                dz_CV = z_CV.sub_(lse_C[:, None]).exp_()
                dz_CV.scatter_add_(1, safe_t[:, None], -torch.ones_like(z_t)[:, None])
                dz_CV.mul_((v_c.to(acc) / n_valid)[:, None])
                dz_lo = dz_CV.to(h_NH.dtype)  # HF: the fp32 logits' gradient is cast back to the logits' dtype
                if need_dh:
                    dh_NH[s:s + chunk_rows] = dz_lo @ w_HV.t()
                if need_dw:
                    dw_HV.add_(h_c.t().to(dz_lo.dtype) @ dz_lo)
            del z_CV
        ctx.weight_is_HV, ctx.weight_dtype = weight_is_HV, weight.dtype
        ctx.save_for_backward(dh_NH if need_dh else None, dw_HV if need_dw else None)
        return total / n_valid

    @staticmethod
    def backward(ctx, grad_loss: torch.Tensor):
        dh_NH, dw_HV = ctx.saved_tensors
        dh = None if dh_NH is None else dh_NH * grad_loss.to(dh_NH.dtype)
        dw = None
        if dw_HV is not None:
            dw = dw_HV * grad_loss
            dw = (dw if ctx.weight_is_HV else dw.t()).to(ctx.weight_dtype)
        return dh, dw, None, None, None, None, None


IMPLS = ("auto", "chunked", "liger", "triton")
# `auto` is `SPLITMOE_LOSS_IMPL` when set (one of IMPLS but auto): how a benchmark row times another path unchanged
ENV_VAR = "SPLITMOE_LOSS_IMPL"


def liger_available() -> bool:
    """liger-kernel importable (it needs triton; its kernels run on CUDA, or in the Triton interpreter)."""
    return importlib.util.find_spec("liger_kernel") is not None


def triton_runs_here(h: torch.Tensor) -> bool:
    """The "triton" loss kernel can run on `h`: a CUDA tensor, or any with the Triton interpreter on
    (TRITON_INTERPRET=1, how the CPU tests run it); fp32 or 16-bit (no float64 kernel)."""
    if importlib.util.find_spec("triton") is None or h.dtype not in (torch.bfloat16, torch.float16, torch.float32):
        return False
    return h.is_cuda or os.environ.get("TRITON_INTERPRET") == "1"


def resolve_impl(impl: str, h: torch.Tensor) -> str:
    """`auto` -> `triton` for a CUDA tensor of a 16-bit or fp32 dtype (`torch_impl.kernels.cross_entropy`: the chunk
    loop with one kernel per chunk for the loss and its gradient; 3.3x Liger at 4K tokens on an H100, see the module
    docstring), else `chunked`; `SPLITMOE_LOSS_IMPL` (`ENV_VAR`), when set, is what `auto` means (a benchmark row
    timing another path).

    Inside `models.layers.static_batch` (a forward that a CUDA graph captures, `torch_impl.cuda_graph`) `liger` is
    refused: Liger's forward reads its count of valid labels on the host (`.item()`, liger-kernel 0.8.5), which stops
    a capture. `triton` and `chunked` keep every value on the device, so `auto` means the same there as outside.
    """
    from torch_impl.models.layers import in_static_batch  # deferred: models.layers imports this module's loss

    if impl not in IMPLS:
        raise ValueError(f"loss impl {impl!r}: one of {', '.join(IMPLS)}")
    if impl == "auto":
        env = os.environ.get(ENV_VAR, "").strip()
        if env and env != "auto":
            if env not in IMPLS:
                raise ValueError(f"{ENV_VAR}={env!r}: one of {', '.join(IMPLS)}")
            return resolve_impl(env, h)
        # the kernel, not the interpreter: under TRITON_INTERPRET=1 a CPU tensor still takes the chunk loop
        return "triton" if h.is_cuda and triton_runs_here(h) else "chunked"
    if impl == "liger" and not liger_available():
        raise ValueError("loss impl 'liger' needs liger-kernel (pip install 'splitmoe[torch]', or liger-kernel); "
                         "impl='chunked' runs everywhere")
    if impl == "liger" and in_static_batch():
        raise ValueError("loss impl 'liger' cannot run in a CUDA-graph step (static_batch): Liger's loss reads the "
                         "number of valid labels on the host, which a capture cannot contain; use impl='chunked' "
                         "(or 'auto', which picks it there)")
    if impl == "triton" and not triton_runs_here(h):
        raise ValueError(f"loss impl 'triton' runs on a CUDA device (or under TRITON_INTERPRET=1) in fp32 or 16-bit; "
                         f"these hidden states are {h.dtype} on {h.device}: use impl='chunked', which runs anywhere")
    return impl


def _liger_loss(h_NH: torch.Tensor, weight: torch.Tensor, target_N: torch.Tensor, weight_is_HV: bool,
                ignore_index: int) -> torch.Tensor:
    from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy

    # Liger multiplies by its weight as [V, H]; a transposed view of the canonical [H, V] lm_head works without a
    # copy (it only calls mm on it). Its mean is over the non-ignored rows, as HF's; with none it returns 0 where HF
    # gives NaN (0/0), so that one case goes to the chunk loop's rule below.
    w_VH = weight.t() if weight_is_HV else weight
    return liger_fused_linear_cross_entropy(h_NH, w_VH, target_N, ignore_index=ignore_index, reduction="mean")


def fused_linear_cross_entropy(h_BSH: torch.Tensor, weight: torch.Tensor, labels_BS: torch.Tensor, *,
                               weight_is_HV: bool = True, chunk_rows: int | None = None,
                               ignore_index: int = IGNORE_INDEX, impl: str = "auto") -> torch.Tensor:
    """HF's causal-LM loss of logits `h_BSH @ W` without materialising them: labels shifted left by one, positions
    labelled `ignore_index` skipped, mean over the rest (fp32 scalar). `weight` is the output projection as
    `[H, V]` (`weight_is_HV`, the canonical `lm_head.weight`) or `[V, H]` (tied input embeddings). `impl`: `auto`
    (`triton` on CUDA, else the chunk loop; `resolve_impl`), `chunked`, `liger` (Liger-Kernel's fused kernel),
    `triton` (the chunk loop with `torch_impl.kernels.cross_entropy` for each chunk's loss and gradient)."""
    if h_BSH.shape[:-1] != labels_BS.shape:
        raise ValueError(f"hidden states {tuple(h_BSH.shape)} and labels {tuple(labels_BS.shape)} disagree on [B, S]")
    vocab = weight.shape[1] if weight_is_HV else weight.shape[0]
    h_NH = h_BSH.reshape(-1, h_BSH.shape[-1])
    target_N = shift_labels(labels_BS, ignore_index).reshape(-1)
    impl = resolve_impl(impl, h_NH)
    rows = chunk_rows or _env_chunk_rows() or default_chunk_rows(vocab, impl, h_NH.shape[0])
    if impl == "liger":
        loss = _liger_loss(h_NH, weight, target_N, weight_is_HV, ignore_index)
        # HF's 0/0: no valid row gives NaN (Liger's 0 would hide a batch with nothing to learn from); a device-side
        # where, no host sync
        return torch.where((target_N != ignore_index).any(), loss.float(), torch.full_like(loss.float(), torch.nan))
    return _FusedLinearCE.apply(h_NH, weight, target_N, weight_is_HV, rows, ignore_index, impl == "triton")
