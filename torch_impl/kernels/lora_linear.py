"""A Linear's split-LoRA branch in PEFT's precision, fused in Triton: `z = x @ A` and `out = round(y + s·(z @ B))`,
forward and backward, without the fp32 copies the torch ops write.

Shapes: M rows (tokens), K input features, N output features, R rank. `x` [M, K] and the base output `y = x @ W (+ b)`
[M, N] are in the model's dtype (bf16 / fp16); `A` [K, R], `B` [R, N] and `z` [M, R] in the adapters' dtype (fp32);
`s` the LoRA scale.

PEFT's Linear (and `torch_impl.lora.LoRALinear`) runs the LoRA branch in fp32 on x cast to fp32 and rounds once with
the base output. With torch ops that writes, per projection: an fp32 copy of x ([16384, 2048] at 16K tokens on
Qwen3-30B, which the GEMM's autograd also keeps for the backward), `delta = z @ B` in fp32 ([16384, 4096] for q_proj:
256 MiB) before a kernel adds it to y, and in the backward an fp32 copy of the bf16 output gradient for its two GEMMs
and an fp32 dx that another kernel rounds. The session-15 profile of a compiled Qwen3-30B-A3B step at 16K
(benchmarks/REPORT.md) put these and the GEMMs around them at about 6 % of the step. Here every operand is read in
its stored dtype and upcast in registers (bf16 / fp16 -> fp32 is exact), and every result is written once:

- `lora_z` (`z = x @ A`): row tiles walking K. Backward: dx = round(dz @ Aᵀ) straight into x's dtype (the rounding
  the torch path's cast makes), dA = xᵀ @ dz over row chunks.
- `lora_add` (`round(y + s·(z @ B))`): one [BLOCK_M, BLOCK_N] tile per program, the K = R product and the add in fp32,
  rounded once. Backward: the gradient of y is the output's; dz = s·dy @ Bᵀ by row tiles walking N, dB = s·zᵀ @ dy
  over row chunks.

Two kernels do all six products: `_mm_kernel` (out = round([y +] s·a @ b) over row and column tiles, walking the
inner dimension, for x @ A, y + s·z @ B, dy @ Bᵀ and dz @ Aᵀ: strides for every operand, so Aᵀ, Bᵀ and the column
slices of one z (`layers.project`) need no copy) and `_mm_tn_kernel` (s·aᵀ @ b reduced over row chunks into fp32
partials [C, P, Q] that one torch sum adds in chunk order: deterministic, no atomics; for dB and dA).

Block sizes and warps are first choices, not yet timed on a GPU. Compiled for sm_90 on the CPU (Triton 3.6's ptxas,
TF32, each launch with the unit strides and divisibilities Triton specialises at run time), they take 80-108
registers a thread and spill nothing. TF32 wgmma reads both operands K-major from shared memory, and the PTX shows
an fp32 operand stored the other way reaching it in 4-byte `cp.async` copies against 16-byte ones: so every fp32
operand goes in K-major (`_k_major`: a transposed copy of A, B, z or dz where needed, each a few MB at most).

The dots take fp32 values at the precision torch's own fp32 GEMMs would use: TF32 where
`torch.backends.cuda.matmul.allow_tf32` is on (as `benchmarks/step.py` sets for every implementation), IEEE fp32
otherwise and under the interpreter. So the results are the torch path's up to the order of the fp32 additions.

`splitmoe::lora_z` and `splitmoe::lora_add` are torch custom ops (fake and autograd registered), so a compiled decoder
layer stays one graph. `torch_impl.lora` uses them where `torch_impl.lora.fused_lora_linear` says so: on CUDA by
default since 2026-12-07 (`SPLITMOE_LORA_LINEAR=torch` keeps the unfused ops), after the 16K steps of session 20
(benchmarks/REPORT.md; `benchmarks/lora_linear_bench.py` times the branch alone).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from torch_impl.kernels.launch import launch

# the tn kernel's row chunks: at least this many rows each, and about this many programs in all (an H100 has 132 SMs)
_MIN_CHUNK_ROWS = 256
_TARGET_PROGRAMS = 264


@triton.jit
def _mm_kernel(y_ptr, stride_ym, a_ptr, stride_am, stride_ak, b_ptr, stride_bk, stride_bn, out_ptr, stride_om,
                   M, N, K, scale,
                   HAS_Y: tl.constexpr, DOT_PREC: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """out[m, n] = round(y[m, n] + scale·Σ_k a[m, k]·b[k, n]) (y omitted without HAS_Y); the sum in fp32."""
    # column tiles fastest: the programs running together share a's row tile
    n_n = tl.cdiv(N, BLOCK_N)
    pid_m = tl.program_id(0) // n_n
    pid_n = tl.program_id(0) % n_n
    offs_m = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m = offs_m < M
    mask_n = offs_n < N
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k < K
        a = tl.load(a_ptr + offs_m[:, None] * stride_am + offs_k[None, :] * stride_ak,
                    mask=mask_m[:, None] & mask_k[None, :], other=0.0).to(tl.float32)
        b = tl.load(b_ptr + offs_k[:, None] * stride_bk + offs_n[None, :] * stride_bn,
                    mask=mask_k[:, None] & mask_n[None, :], other=0.0).to(tl.float32)
        acc = tl.dot(a, b, acc, input_precision=DOT_PREC)
    mask = mask_m[:, None] & mask_n[None, :]
    out = scale * acc
    if HAS_Y:
        out += tl.load(y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :], mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + offs_m[:, None] * stride_om + offs_n[None, :], out.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _mm_tn_kernel(a_ptr, stride_am, stride_ap, b_ptr, stride_bm, stride_bq, part_ptr, stride_pc, stride_pp,
                  M, P, Q, chunk_rows, scale,
                  DOT_PREC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_Q: tl.constexpr):
    """part[c, p, q] = scale·Σ_{m in chunk c} a[m, p]·b[m, q]: one program per (chunk, P tile, Q tile); each
    partial's last dimension contiguous."""
    c = tl.program_id(0)
    n_q = tl.cdiv(Q, BLOCK_Q)
    offs_p = (tl.program_id(1) // n_q) * BLOCK_P + tl.arange(0, BLOCK_P)
    offs_q = (tl.program_id(1) % n_q) * BLOCK_Q + tl.arange(0, BLOCK_Q)
    mask_p = offs_p < P
    mask_q = offs_q < Q
    start = c * chunk_rows
    end = tl.minimum(start + chunk_rows, M)
    acc = tl.zeros([BLOCK_P, BLOCK_Q], dtype=tl.float32)
    for m0 in range(start, end, BLOCK_M):
        offs_m = (m0 + tl.arange(0, BLOCK_M)).to(tl.int64)
        mask_m = offs_m < end
        a_t = tl.load(a_ptr + offs_p[:, None] * stride_ap + offs_m[None, :] * stride_am,
                      mask=mask_p[:, None] & mask_m[None, :], other=0.0).to(tl.float32)  # [BLOCK_P, BLOCK_M]: aᵀ
        b = tl.load(b_ptr + offs_m[:, None] * stride_bm + offs_q[None, :] * stride_bq,
                    mask=mask_m[:, None] & mask_q[None, :], other=0.0).to(tl.float32)
        acc = tl.dot(a_t, b, acc, input_precision=DOT_PREC)
    tl.store(part_ptr + c.to(tl.int64) * stride_pc + offs_p[:, None] * stride_pp + offs_q[None, :], scale * acc,
             mask=mask_p[:, None] & mask_q[None, :])


# ---- host side: the six products ---------------------------------------------------------------------------------

def _dot_prec(device: torch.device) -> str:
    """What torch's fp32 GEMMs would do on this device: TF32 where allowed on CUDA, IEEE otherwise."""
    return "tf32" if device.type == "cuda" and torch.backends.cuda.matmul.allow_tf32 else "ieee"


def _narrow_block(n: int) -> int:
    """A tile side for a narrow dimension (a rank): its next power of two, between 16 (the dot's minimum) and 64."""
    return max(16, min(64, triton.next_power_of_2(n)))


def _rows(t: torch.Tensor) -> torch.Tensor:
    """`t` [..., F] as [M, F] with a unit last stride; a view where its rows are evenly strided (a matmul output, a
    column slice of one), else a copy."""
    t2 = t.reshape(-1, t.shape[-1])
    return t2 if t2.stride(-1) == 1 or t2.shape[-1] == 1 else t2.contiguous()


def _k_major(t_KN: torch.Tensor) -> torch.Tensor:
    """t [K, N] with K (the dot's reduction) contiguous, by a transposed copy where it is not. TF32 wgmma reads its
    operands K-major, and in the PTX an fp32 operand stored N-major reaches shared memory in 4-byte copies, K-major
    in 16-byte ones. For the fp32 operands only (the factors, 1-2 MB; z and dz in the two reductions, 4-13 MB at 16K
    tokens): bf16 ones are converted in registers on their way to the dot, so their layout does not matter."""
    return t_KN if t_KN.stride(0) == 1 else t_KN.t().contiguous().t()


def mm(a: torch.Tensor, b_KN: torch.Tensor, scale: float, out_dtype: torch.dtype,
       y: torch.Tensor | None = None) -> torch.Tensor:
    """round_{out_dtype}([y +] scale·(a @ b)) for a [M, K] and b [K, N] (any strides; y [M, N] with a unit last
    stride): [M, N]."""
    M, K = a.shape
    N = b_KN.shape[1]
    out = torch.empty((M, N), device=a.device, dtype=out_dtype)
    if M and N:
        if K > N:  # a narrow output over a long inner dimension (x @ A, dy @ Bᵀ): row tiles walking K
            bm, bn, bk, warps, stages = 64, _narrow_block(N), 32, 4, 3
        else:  # a wide output over a short inner dimension (z @ B, dz @ Aᵀ): K fits a tile or a few
            bm, bn, bk, warps, stages = 64, 128, _narrow_block(K), 8, 2
        launch(_mm_kernel, (triton.cdiv(M, bm) * triton.cdiv(N, bn),),
               (y if y is not None else out, y.stride(0) if y is not None else 0, a, *a.stride(), b_KN, *b_KN.stride(),
                out, out.stride(0), M, N, K, float(scale)),
               dict(HAS_Y=y is not None, DOT_PREC=_dot_prec(a.device), BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk),
               num_warps=warps, num_stages=stages)
    return out


def chunk_rows(M: int, n_tiles: int, block_m: int) -> int:
    """Rows per chunk of `mm_tn`'s reduction: enough chunks that chunks × tiles is about `_TARGET_PROGRAMS`, each at
    least `_MIN_CHUNK_ROWS` rows (smaller chunks make more partials to add than they spread work), a multiple of
    `block_m`."""
    want = max(1, _TARGET_PROGRAMS // max(n_tiles, 1))
    rows = max(_MIN_CHUNK_ROWS, triton.cdiv(M, want))
    return triton.cdiv(rows, block_m) * block_m


def mm_tn(a: torch.Tensor, b: torch.Tensor, scale: float) -> torch.Tensor:
    """scale·(aᵀ @ b) in fp32 for a [M, P] and b [M, Q] (any strides): [P, Q], reduced over row chunks in a fixed
    order. An fp32 operand is best given M-contiguous (`_k_major`: M is the dots' K here)."""
    M, P = a.shape
    Q = b.shape[1]
    bm, bq = 64, 128
    bp = _narrow_block(P)
    tiles = triton.cdiv(P, bp) * triton.cdiv(Q, bq)
    rows = chunk_rows(M, tiles, bm)
    chunks = max(1, triton.cdiv(M, rows))
    part = torch.empty((chunks, P, Q), device=a.device, dtype=torch.float32)
    if P and Q:
        launch(_mm_tn_kernel, (chunks, tiles),
               (a, *a.stride(), b, *b.stride(), part, part.stride(0), part.stride(1), M, P, Q, rows, float(scale)),
               dict(DOT_PREC=_dot_prec(a.device), BLOCK_M=bm, BLOCK_P=bp, BLOCK_Q=bq), num_warps=8, num_stages=2)
    return part[0] if chunks == 1 else part.sum(0)  # chunk order is fixed: the same sum every run


def _check_same_device(*ts: torch.Tensor) -> None:
    if len({t.device for t in ts}) > 1:
        raise ValueError(f"tensors on {', '.join(str(t.device) for t in ts)}; put them on one device")


def lora_z_forward(x: torch.Tensor, lora_a: torch.Tensor) -> torch.Tensor:
    """x @ A in fp32 from x [..., K] in its own dtype: [..., R]."""
    if lora_a.dim() != 2 or x.shape[-1] != lora_a.shape[0]:
        raise ValueError(f"lora_z: x {tuple(x.shape)} and A {tuple(lora_a.shape)} do not fit x [..., K], A [K, R]")
    _check_same_device(x, lora_a)
    return mm(_rows(x), _k_major(lora_a), 1.0, torch.float32).view(*x.shape[:-1], lora_a.shape[1])


def lora_z_backward(dz: torch.Tensor, x: torch.Tensor, lora_a: torch.Tensor, need_dx: bool = True,
                    need_da: bool = True) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """(dx, dA) of `lora_z_forward` for dz [..., R]: dx = round_{x.dtype}(dz @ Aᵀ) shaped like x, dA = xᵀ @ dz in A's
    dtype."""
    dz2 = _rows(dz)
    dx = mm(dz2, lora_a.t(), 1.0, x.dtype).view(x.shape) if need_dx else None
    da = mm_tn(_rows(x), _k_major(dz2), 1.0).to(lora_a.dtype) if need_da else None
    return dx, da


def _check_add(y: torch.Tensor, z: torch.Tensor, lora_b: torch.Tensor) -> None:
    if lora_b.dim() != 2 or z.shape[-1] != lora_b.shape[0] or y.shape[-1] != lora_b.shape[1]:
        raise ValueError(f"lora_add: y {tuple(y.shape)}, z {tuple(z.shape)} and B {tuple(lora_b.shape)} do not "
                         "fit y [..., N], z [..., R], B [R, N]")
    if y.shape[:-1] != z.shape[:-1]:
        raise ValueError(f"lora_add: y {tuple(y.shape)} and z {tuple(z.shape)} have different leading dimensions")
    _check_same_device(y, z, lora_b)


def lora_add_forward(y: torch.Tensor, z: torch.Tensor, lora_b: torch.Tensor, scale: float) -> torch.Tensor:
    """round_{y.dtype}(y + scale·(z @ B)), the sum in fp32, as a new tensor shaped like y."""
    _check_add(y, z, lora_b)
    return mm(z.reshape(-1, z.shape[-1]), _k_major(lora_b), scale, y.dtype, y=_rows(y)).view(y.shape)


def lora_add_backward(dy: torch.Tensor, z: torch.Tensor, lora_b: torch.Tensor, scale: float,
                      need_dz: bool = True, need_db: bool = True) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """(dz, dB) of `lora_add_forward` for the output gradient dy: dz = scale·dy @ Bᵀ in fp32 shaped like z, dB =
    scale·zᵀ @ dy in B's dtype. The gradient of y is dy."""
    _check_add(dy, z, lora_b)
    dy2 = _rows(dy)
    dz = mm(dy2, lora_b.t(), scale, torch.float32).view(z.shape) if need_dz else None
    db = mm_tn(_k_major(z.reshape(-1, z.shape[-1])), dy2, scale).to(lora_b.dtype) if need_db else None
    return dz, db


# ---- the custom ops ------------------------------------------------------------------------------------------------

@torch.library.custom_op("splitmoe::lora_z", mutates_args=())
def lora_z(x: torch.Tensor, lora_a: torch.Tensor) -> torch.Tensor:
    """`x.float() @ lora_a` without the fp32 copy of x, with autograd to x (rounded to x's dtype) and lora_a."""
    return lora_z_forward(x, lora_a)


@lora_z.register_fake
def _lora_z_fake(x, lora_a):
    return x.new_empty((*x.shape[:-1], lora_a.shape[1]), dtype=torch.float32)


@torch.library.custom_op("splitmoe::lora_z_backward", mutates_args=())
def _lora_z_backward_op(dz: torch.Tensor, x: torch.Tensor, lora_a: torch.Tensor, need_dx: bool,
                        need_da: bool) -> list[torch.Tensor]:
    return [t for t in lora_z_backward(dz, x, lora_a, need_dx, need_da) if t is not None]


@_lora_z_backward_op.register_fake
def _lora_z_backward_fake(dz, x, lora_a, need_dx, need_da):
    return [x.new_empty(x.shape)] * need_dx + [lora_a.new_empty(lora_a.shape)] * need_da


def _lora_z_setup(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _lora_z_grad(ctx, dz):
    x, lora_a = ctx.saved_tensors
    need_dx, need_da = ctx.needs_input_grad
    grads = iter(_lora_z_backward_op(dz, x, lora_a, need_dx, need_da) if need_dx or need_da else [])
    return (next(grads) if need_dx else None), (next(grads) if need_da else None)


lora_z.register_autograd(_lora_z_grad, setup_context=_lora_z_setup)


@torch.library.custom_op("splitmoe::lora_add", mutates_args=())
def lora_add(y: torch.Tensor, z: torch.Tensor, lora_b: torch.Tensor, scale: float) -> torch.Tensor:
    """`round(y + scale·(z @ lora_b))` with autograd to z and lora_b (and y, whose gradient is the output's)."""
    return lora_add_forward(y, z, lora_b, scale)


@lora_add.register_fake
def _lora_add_fake(y, z, lora_b, scale):
    _check_add(y, z, lora_b)
    return torch.empty_like(y, memory_format=torch.contiguous_format)


@torch.library.custom_op("splitmoe::lora_add_backward", mutates_args=())
def _lora_add_backward_op(dy: torch.Tensor, z: torch.Tensor, lora_b: torch.Tensor, scale: float,
                          need_dz: bool, need_db: bool) -> list[torch.Tensor]:
    return [t for t in lora_add_backward(dy, z, lora_b, scale, need_dz, need_db) if t is not None]


@_lora_add_backward_op.register_fake
def _lora_add_backward_fake(dy, z, lora_b, scale, need_dz, need_db):
    return [z.new_empty(z.shape)] * need_dz + [lora_b.new_empty(lora_b.shape)] * need_db


def _lora_add_setup(ctx, inputs, output):
    y, z, lora_b, scale = inputs
    ctx.save_for_backward(z, lora_b)
    ctx.scale = scale


def _lora_add_grad(ctx, grad):
    z, lora_b = ctx.saved_tensors
    _, need_dz, need_db, _ = ctx.needs_input_grad
    grads = iter(_lora_add_backward_op(grad, z, lora_b, ctx.scale, need_dz, need_db) if need_dz or need_db else [])
    return grad, (next(grads) if need_dz else None), (next(grads) if need_db else None), None


lora_add.register_autograd(_lora_add_grad, setup_context=_lora_add_setup)
