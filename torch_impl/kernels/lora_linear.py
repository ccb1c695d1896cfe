"""A Linear's split-LoRA term in PEFT's precision, fused: `out = round(y + s·(z @ B))` and its backward, in Triton.

Shapes: M rows (tokens), N output features, R rank. `y` [M, N] is the base output `x @ W (+ b)` in the model's dtype
(bf16 / fp16), `z` [M, R] = x @ A and `B` [R, N] in the adapters' dtype (fp32), `s` the LoRA scale.

PEFT's Linear (and `torch_impl.lora.LoRALinear`) runs the LoRA branch in fp32 and rounds once with the base output.
With torch ops that is a GEMM writing `delta = z @ B` in fp32 ([16384, 4096] for Qwen3-30B's q_proj at 16K tokens:
256 MiB), then a kernel reading y and delta to write the rounded sum; in the backward the bf16 output gradient is
cast to an fp32 copy that two GEMMs read (dz = s·dy @ Bᵀ, dB = s·zᵀ @ dy). The session-15 profile of a compiled
Qwen3-30B-A3B step at 16K (benchmarks/REPORT.md) put these fp32 round trips and the GEMMs around them at about 6 %
of the step. Here:

- `lora_add`: one kernel per [BLOCK_M, BLOCK_N] tile: acc = z_tile @ B_tile (K = R, fp32 accumulate), then
  `y + s·acc` in fp32, rounded once to y's dtype. delta is never written: y is read and the output written once.
- `lora_add_backward`: dz = s·dy @ Bᵀ by row tiles (each program reads its rows of dy once, upcast to fp32 in
  registers: exact), and dB = s·zᵀ @ dy reduced over row chunks into fp32 partials [C, R, N] that one torch sum
  adds in chunk order (deterministic; no atomics). The gradient of y is dy itself.

The dots take the operands' fp32 values at the precision torch's own GEMMs would use: TF32 where
`torch.backends.cuda.matmul.allow_tf32` is on (as `benchmarks/step.py` sets for every implementation), IEEE fp32
otherwise (and under the interpreter), so the sums are those of the torch path up to the order of the fp32 adds.

`splitmoe::lora_add` is a torch custom op (with its fake and autograd), so a compiled decoder layer stays one graph.
`torch_impl.lora.LoRALinear` calls it where `torch_impl.lora.fused_lora_add` says so (`SPLITMOE_LORA_LINEAR=triton`;
the default, `torch`, keeps the unfused ops: this path has not been timed on a GPU yet, and
`benchmarks/gpu_session.sh session19l` times both).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from torch_impl.kernels.launch import launch

# dB's row chunks: at least this many rows each, and about this many programs in all (an H100 has 132 SMs)
_MIN_CHUNK_ROWS = 256
_TARGET_PROGRAMS = 264


@triton.jit
def _lora_add_kernel(y_ptr, stride_ym, z_ptr, stride_zm, stride_zr, b_ptr, stride_br, out_ptr, stride_om,
                     M, N, R, scale,
                     DOT_PREC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr):
    # column tiles fastest: the programs running together share z's row tile
    n_n = tl.cdiv(N, BLOCK_N)
    pid_m = tl.program_id(0) // n_n
    pid_n = tl.program_id(0) % n_n
    offs_m = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m = offs_m < M
    mask_n = offs_n < N
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for r0 in range(0, R, BLOCK_R):
        offs_r = r0 + tl.arange(0, BLOCK_R)
        mask_r = offs_r < R
        z = tl.load(z_ptr + offs_m[:, None] * stride_zm + offs_r[None, :] * stride_zr,
                    mask=mask_m[:, None] & mask_r[None, :], other=0.0).to(tl.float32)
        b = tl.load(b_ptr + offs_r[:, None] * stride_br + offs_n[None, :], mask=mask_r[:, None] & mask_n[None, :],
                    other=0.0).to(tl.float32)
        acc = tl.dot(z, b, acc, input_precision=DOT_PREC)
    mask = mask_m[:, None] & mask_n[None, :]
    y = tl.load(y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :], mask=mask, other=0.0).to(tl.float32)
    out = y + scale * acc
    tl.store(out_ptr + offs_m[:, None] * stride_om + offs_n[None, :], out.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _lora_dz_kernel(dy_ptr, stride_dym, b_ptr, stride_br, dz_ptr, stride_dzm, M, N, R, scale,
                    DOT_PREC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr):
    # dz[m, r] = s·Σ_n dy[m, n]·B[r, n]: one program per (row tile, rank tile), walking the output features
    n_r = tl.cdiv(R, BLOCK_R)
    pid_m = tl.program_id(0) // n_r
    pid_r = tl.program_id(0) % n_r
    offs_m = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    offs_r = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    mask_m = offs_m < M
    mask_r = offs_r < R
    acc = tl.zeros([BLOCK_M, BLOCK_R], dtype=tl.float32)
    for n0 in range(0, N, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        mask_n = offs_n < N
        dy = tl.load(dy_ptr + offs_m[:, None] * stride_dym + offs_n[None, :], mask=mask_m[:, None] & mask_n[None, :],
                     other=0.0).to(tl.float32)
        b_t = tl.load(b_ptr + offs_r[None, :] * stride_br + offs_n[:, None], mask=mask_r[None, :] & mask_n[:, None],
                      other=0.0).to(tl.float32)  # [BLOCK_N, BLOCK_R]: Bᵀ
        acc = tl.dot(dy, b_t, acc, input_precision=DOT_PREC)
    tl.store(dz_ptr + offs_m[:, None] * stride_dzm + offs_r[None, :], (scale * acc).to(dz_ptr.dtype.element_ty),
             mask=mask_m[:, None] & mask_r[None, :])


@triton.jit
def _lora_db_kernel(z_ptr, stride_zm, stride_zr, dy_ptr, stride_dym, part_ptr, stride_pc, stride_pr,
                    M, N, R, chunk_rows, scale,
                    DOT_PREC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr):
    # part[c, r, n] = s·Σ_{m in chunk c} z[m, r]·dy[m, n]: one program per (chunk, rank tile, column tile)
    c = tl.program_id(0)
    n_n = tl.cdiv(N, BLOCK_N)
    pid_r = tl.program_id(1) // n_n
    pid_n = tl.program_id(1) % n_n
    offs_r = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_r = offs_r < R
    mask_n = offs_n < N
    start = c * chunk_rows
    end = tl.minimum(start + chunk_rows, M)
    acc = tl.zeros([BLOCK_R, BLOCK_N], dtype=tl.float32)
    for m0 in range(start, end, BLOCK_M):
        offs_m = (m0 + tl.arange(0, BLOCK_M)).to(tl.int64)
        mask_m = offs_m < end
        z_t = tl.load(z_ptr + offs_r[:, None] * stride_zr + offs_m[None, :] * stride_zm,
                      mask=mask_r[:, None] & mask_m[None, :], other=0.0).to(tl.float32)  # [BLOCK_R, BLOCK_M]: zᵀ
        dy = tl.load(dy_ptr + offs_m[:, None] * stride_dym + offs_n[None, :], mask=mask_m[:, None] & mask_n[None, :],
                     other=0.0).to(tl.float32)
        acc = tl.dot(z_t, dy, acc, input_precision=DOT_PREC)
    tl.store(part_ptr + c.to(tl.int64) * stride_pc + offs_r[:, None] * stride_pr + offs_n[None, :], scale * acc,
             mask=mask_r[:, None] & mask_n[None, :])


# ---- host side -------------------------------------------------------------------------------------------------------

def _dot_prec(device: torch.device) -> str:
    """What torch's fp32 GEMMs would do on this device: TF32 where allowed on CUDA, IEEE otherwise."""
    return "tf32" if device.type == "cuda" and torch.backends.cuda.matmul.allow_tf32 else "ieee"


def _block_r(R: int) -> int:
    return max(16, min(64, triton.next_power_of_2(R)))


def _rows(t: torch.Tensor, name: str) -> torch.Tensor:
    """`t` [..., F] as [M, F] without a copy where its rows are evenly strided (a matmul output, a split of one)."""
    if t.dim() < 1:
        raise ValueError(f"{name} must have a feature dimension; got a scalar")
    try:
        return t.view(-1, t.shape[-1])
    except RuntimeError:
        return t.reshape(-1, t.shape[-1])


def _check(y: torch.Tensor, z: torch.Tensor, lora_b: torch.Tensor) -> None:
    if lora_b.dim() != 2 or z.shape[-1] != lora_b.shape[0] or y.shape[-1] != lora_b.shape[1]:
        raise ValueError(f"lora_add: y {tuple(y.shape)}, z {tuple(z.shape)} and B {tuple(lora_b.shape)} do not "
                         "fit y [..., N], z [..., R], B [R, N]")
    if y.shape[:-1] != z.shape[:-1]:
        raise ValueError(f"lora_add: y {tuple(y.shape)} and z {tuple(z.shape)} have different leading dimensions")
    if not (y.device == z.device == lora_b.device):
        raise ValueError(f"lora_add: tensors on {y.device}, {z.device} and {lora_b.device}; put them on one device")


def lora_add_forward(y: torch.Tensor, z: torch.Tensor, lora_b: torch.Tensor, scale: float) -> torch.Tensor:
    """`round_{y.dtype}(y + scale·(z @ lora_b))`, the sum in fp32, as a new tensor shaped like y."""
    _check(y, z, lora_b)
    y2, z2 = _rows(y, "y"), _rows(z, "z")
    if y2.stride(-1) != 1:
        y2 = y2.contiguous()
    b = lora_b if lora_b.stride(-1) == 1 else lora_b.contiguous()
    M, N = y2.shape
    R = b.shape[0]
    out = torch.empty((M, N), device=y.device, dtype=y.dtype)
    if M and N:
        bm, bn = 64, 128
        launch(_lora_add_kernel, (triton.cdiv(M, bm) * triton.cdiv(N, bn),),
               (y2, y2.stride(0), z2, z2.stride(0), z2.stride(1), b, b.stride(0), out, out.stride(0),
                M, N, R, float(scale)),
               dict(DOT_PREC=_dot_prec(y.device), BLOCK_M=bm, BLOCK_N=bn, BLOCK_R=_block_r(R)),
               num_warps=4, num_stages=2)
    return out.view(y.shape)


def chunk_rows(M: int, n_tiles: int, block_m: int) -> int:
    """Rows per chunk of dB's reduction: enough chunks that chunks × tiles is about `_TARGET_PROGRAMS`, each at least
    `_MIN_CHUNK_ROWS` rows (fewer, larger partials otherwise cost more to add than they spread), a multiple of
    `block_m`."""
    want = max(1, _TARGET_PROGRAMS // max(n_tiles, 1))
    rows = max(_MIN_CHUNK_ROWS, triton.cdiv(M, want))
    return triton.cdiv(rows, block_m) * block_m


def lora_add_backward(dy: torch.Tensor, z: torch.Tensor, lora_b: torch.Tensor, scale: float,
                      need_dz: bool = True, need_db: bool = True) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """(dz, dB) of `lora_add_forward` for the output gradient `dy`: dz = scale·dy @ Bᵀ in z's dtype, shaped like z;
    dB = scale·zᵀ @ dy in B's dtype (module docstring). The gradient of y is dy."""
    _check(dy, z, lora_b)
    dy2, z2 = _rows(dy, "dy"), _rows(z, "z")
    if dy2.stride(-1) != 1:
        dy2 = dy2.contiguous()
    b = lora_b if lora_b.stride(-1) == 1 else lora_b.contiguous()
    M, N = dy2.shape
    R = b.shape[0]
    prec, br = _dot_prec(dy.device), _block_r(R)
    dz = db = None
    if need_dz:
        dz = torch.empty((M, R), device=dy.device, dtype=z.dtype)
        if M and R:
            bm, bn = 64, 64
            launch(_lora_dz_kernel, (triton.cdiv(M, bm) * triton.cdiv(R, br),),
                   (dy2, dy2.stride(0), b, b.stride(0), dz, dz.stride(0), M, N, R, float(scale)),
                   dict(DOT_PREC=prec, BLOCK_M=bm, BLOCK_N=bn, BLOCK_R=br), num_warps=4, num_stages=2)
        dz = dz.view(z.shape)
    if need_db:
        bm, bn = 64, 128
        tiles = triton.cdiv(R, br) * triton.cdiv(N, bn)
        rows = chunk_rows(M, tiles, bm)
        chunks = max(1, triton.cdiv(M, rows))
        part = torch.empty((chunks, R, N), device=dy.device, dtype=torch.float32)
        if R and N:
            launch(_lora_db_kernel, (chunks, tiles),
                   (z2, z2.stride(0), z2.stride(1), dy2, dy2.stride(0), part, part.stride(0), part.stride(1),
                    M, N, R, rows, float(scale)),
                   dict(DOT_PREC=prec, BLOCK_M=bm, BLOCK_N=bn, BLOCK_R=br), num_warps=4, num_stages=2)
        # chunk order is fixed: the same sum every run
        db = (part[0] if chunks == 1 else part.sum(0)).to(lora_b.dtype)
    return dz, db


# ---- the custom op ---------------------------------------------------------------------------------------------------

@torch.library.custom_op("splitmoe::lora_add", mutates_args=())
def lora_add(y: torch.Tensor, z: torch.Tensor, lora_b: torch.Tensor, scale: float) -> torch.Tensor:
    """`round(y + scale·(z @ lora_b))` with autograd to z and lora_b (and y, whose gradient is the output's)."""
    return lora_add_forward(y, z, lora_b, scale)


@lora_add.register_fake
def _lora_add_fake(y, z, lora_b, scale):
    _check(y, z, lora_b)
    return torch.empty_like(y, memory_format=torch.contiguous_format)


@torch.library.custom_op("splitmoe::lora_add_backward", mutates_args=())
def _lora_add_backward_op(dy: torch.Tensor, z: torch.Tensor, lora_b: torch.Tensor, scale: float,
                          need_dz: bool, need_db: bool) -> list[torch.Tensor]:
    dz, db = lora_add_backward(dy, z, lora_b, scale, need_dz, need_db)
    return [t for t in (dz, db) if t is not None]


@_lora_add_backward_op.register_fake
def _lora_add_backward_fake(dy, z, lora_b, scale, need_dz, need_db):
    out = []
    if need_dz:
        out.append(z.new_empty(z.shape))
    if need_db:
        out.append(lora_b.new_empty(lora_b.shape))
    return out


def _setup_context(ctx, inputs, output):
    y, z, lora_b, scale = inputs
    ctx.save_for_backward(z, lora_b)
    ctx.scale = scale


def _backward(ctx, grad):
    z, lora_b = ctx.saved_tensors
    _, need_dz, need_db, _ = ctx.needs_input_grad
    grads = iter(_lora_add_backward_op(grad, z, lora_b, ctx.scale, need_dz, need_db) if need_dz or need_db else [])
    dz = next(grads) if need_dz else None
    db = next(grads) if need_db else None
    return grad, dz, db, None


lora_add.register_autograd(_backward, setup_context=_setup_context)

