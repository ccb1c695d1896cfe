"""The NN passes of split_lora.py on a Pallas Mosaic-GPU grouped GEMM (Hopper: TMA loads, wgmma), for the
`pallas_mosaic` backend.

Shape legend as grouped_gemm.py: M sorted rows, D reduction width, N output width, E experts, R LoRA rank.

`block_gemm` (the kernel): rows in a *block-padded* layout, where every expert's rows start on a multiple of
block_m (at most E - 1 + cdiv(M, block_m) blocks of block_m rows; `PaddedRows`), so each row block belongs to one
expert and every load and store is a whole aligned TMA tile. One program per (row block, column block):
    acc = A[rows] @ W[e]           (D in block_d steps through `plgpu.emit_pipeline`, fp32 accumulator)
    acc += lora_scale · (Z[rows] @ LB[e])   (a second accumulator over R, the LoRA epilogue of grouped_gemm.py)
and acc is stored in fp32. W and LB may come transposed ([E, N, D], [E, N, R]: the backward contracts the weights'
output axis; XLA transposes them before the call); blocks of padding rows (expert -1) do nothing. Hopper TMA cannot
gather rows, hence the padded copy of the left operand made by XLA before the call (it replaces the gather the
Triton kernel fuses into its load).

`grouped_gemm` (the pass): grouped_gemm.py's signature and semantics (gather, z computed or given, bias, the
act_fwd / act_bwd epilogues, routing-weight scale, scatter to (token, slot) rows), so `split_lora.Passes(nn=...)`
swaps it in. The kernel computes the products; XLA fuses the epilogue arithmetic around it, rounding at the points
grouped_gemm.py rounds (gate/up rounded to the storage dtype before the activation, z scaled then rounded, the
expert output rounded before the routing weight).
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from jax_impl.kernels import grouped_gemm as gg
from jax_impl.kernels.autotune import BlockConfig

_F32 = jnp.float32
BLOCK_M = 64  # one warpgroup's wgmma row tile
BLOCK_D = 64  # 128 bytes of bf16: the widest TMA swizzle
MAX_BLOCK_N = 128


def interpret_params(interpret: bool):
    """Pallas' Mosaic-GPU interpreter settings for `interpret=True` (CPU tests), else None."""
    if not interpret:
        return None
    from jax._src.pallas.mosaic_gpu.interpret.params import InterpretGPUParams  # not exported by jax.experimental

    return InterpretGPUParams()


class PaddedRows(NamedTuple):
    """Sorted rows <-> the block-padded layout of `block_gemm`."""

    src_P: jax.Array  # padded row -> sorted row, or M for a padding row (reads a zero)
    pos_M: jax.Array  # sorted row -> padded row
    expert_M: jax.Array  # sorted row -> its expert
    block_expert: jax.Array  # [P / block_m] expert of each row block, -1 for blocks of padding only


def padded_rows(offsets_E1: jax.Array, M: int, block_m: int = BLOCK_M) -> PaddedRows:
    """Expert e's rows go to consecutive blocks from gg.tile_schedule's tile of its first row on: the padded position
    of sorted row m is tile(m)·block_m + (m - tile_row)."""
    E = offsets_E1.shape[0] - 1
    tile_expert, tile_row = gg.tile_schedule(offsets_E1, M, block_m)
    nb = tile_expert.shape[0]
    r = jnp.arange(block_m, dtype=jnp.int32)
    e_c = jnp.maximum(tile_expert, 0)
    src = tile_row[:, None] + r[None, :]
    valid = (tile_expert[:, None] >= 0) & (src < offsets_E1[e_c + 1][:, None])
    src_P = jnp.where(valid, src, M).reshape(nb * block_m)
    sizes = offsets_E1[1:] - offsets_E1[:-1]
    first_tile = jnp.cumsum((sizes + block_m - 1) // block_m) - (sizes + block_m - 1) // block_m
    m = jnp.arange(M, dtype=jnp.int32)
    e_m = jnp.clip(jnp.searchsorted(offsets_E1[1:], m, side="right"), 0, E - 1)
    pos_M = (first_tile[e_m] * block_m + (m - offsets_E1[e_m])).astype(jnp.int32)
    return PaddedRows(src_P.astype(jnp.int32), pos_M, e_m.astype(jnp.int32), tile_expert)


def _pad_to(x: jax.Array, axis: int, multiple: int) -> jax.Array:
    extra = -x.shape[axis] % multiple
    if not extra:
        return x  # the benchmark shapes: no copy
    pad = [(0, 0)] * x.ndim
    pad[axis] = (0, extra)
    return jnp.pad(x, pad)


def _block_n(n: int) -> int:
    for b in (MAX_BLOCK_N, 64, 32, 16):
        if n % b == 0:
            return b
    return 16  # n is padded to a multiple of 16 first


def block_gemm(a_P: jax.Array, w: jax.Array, block_expert: jax.Array, *, w_t: bool, z_P: jax.Array | None = None,
               lb: jax.Array | None = None, lb_t: bool = False, lora_scale: float = 1.0,
               interpret: bool = False) -> jax.Array:
    """The kernel (module docstring): a_P [P, D] in the padded layout, w [E, D, N] (or [E, N, D] with w_t), optional
    z_P [P, R] and lb [E, R, N] (or [E, N, R] with lb_t) -> [P, N] fp32. D, N and R are padded here to the tile
    sizes when they are not multiples (a copy only for odd shapes)."""
    P = a_P.shape[0]
    lora = z_P is not None
    # Transposed operands are transposed by XLA first (a weight-sized copy per call): Pallas' Mosaic-GPU interpreter
    # cannot run wgmma on a transposed SMEM view, and one kernel form tested everywhere beats a faster untested one.
    w = jnp.swapaxes(w, 1, 2) if w_t else w
    N = w.shape[2]
    a_P = _pad_to(a_P, 1, BLOCK_D)
    w = _pad_to(_pad_to(w, 1, BLOCK_D), 2, 16)
    Dp, Np = a_P.shape[1], w.shape[2]
    bn = _block_n(Np)
    if lora:
        lb = jnp.swapaxes(lb, 1, 2) if lb_t else lb
        z_P = _pad_to(z_P, 1, BLOCK_D)
        lb = _pad_to(_pad_to(lb, 1, BLOCK_D), 2, 16)
        Rp = z_P.shape[1]
    nb, nn = P // BLOCK_M, Np // bn

    def body(expert_ref, a_ref, w_ref, *rest):
        z_ref, lb_ref, out_ref = rest if lora else (None, None, rest[0])
        mi, ni = jax.lax.axis_index("m"), jax.lax.axis_index("n")
        e = expert_ref[mi]

        @pl.when(e >= 0)
        def _():
            def pipeline(acc_ref, lhs, rhs, steps):
                plgpu.emit_pipeline(
                    lambda _, l_smem, r_smem: plgpu.wgmma(acc_ref, l_smem, r_smem),
                    grid=(steps,),
                    in_specs=[plgpu.BlockSpec((BLOCK_M, BLOCK_D), lambda k: (mi, k)),
                              plgpu.BlockSpec((BLOCK_D, bn), lambda k: (k, ni))],
                    max_concurrent_steps=2,
                )(lhs, rhs)

            def main(acc_ref):
                pipeline(acc_ref, a_ref, w_ref.at[e], Dp // BLOCK_D)
                return acc_ref[...]

            acc = pl.run_scoped(main, plgpu.ACC((BLOCK_M, bn)))
            if lora:
                def lora_part(acc_ref):
                    pipeline(acc_ref, z_ref, lb_ref.at[e], Rp // BLOCK_D)
                    return acc_ref[...]

                acc = acc + lora_scale * pl.run_scoped(lora_part, plgpu.ACC((BLOCK_M, bn)))

            @functools.partial(pl.run_scoped, o_smem=plgpu.SMEM((BLOCK_M, bn), _F32))
            def _store(o_smem):
                o_smem[...] = acc
                plgpu.commit_smem()
                plgpu.copy_smem_to_gmem(o_smem, out_ref.at[pl.ds(mi * BLOCK_M, BLOCK_M), pl.ds(ni * bn, bn)])
                plgpu.wait_smem_to_gmem(0)

    ins = [block_expert, a_P, w] + ([z_P, lb] if lora else [])
    kw = {} if not interpret else {"interpret": interpret_params(True)}
    out = plgpu.kernel(
        body, out_type=jax.ShapeDtypeStruct((P, Np), _F32), grid=(nb, nn), grid_names=("m", "n"),
        compiler_params=plgpu.CompilerParams(lowering_semantics=plgpu.LoweringSemantics.Warpgroup), **kw)(*ins)
    return out[:, :N] if Np != N else out


def grouped_gemm(a: jax.Array, w: jax.Array, offsets_E1: jax.Array, *, n: int, cfg: BlockConfig, interpret: bool,
                 w_t: bool = False, row_index: jax.Array | None = None, out_rows_total: int | None = None,
                 lora_a: jax.Array | None = None, la_t: bool = False, z: jax.Array | None = None,
                 store_z: bool = False, lora_b: jax.Array | None = None, lb_t: bool = False, z_scale: float = 1.0,
                 lora_scale: float = 1.0, out_scale: float = 1.0, bias: jax.Array | None = None,
                 row_scale: jax.Array | None = None, mode: str = "plain", activation: str | None = None,
                 gu: jax.Array | None = None, store_gu: bool = False, out_rows: jax.Array | None = None,
                 limit: float = 7.0, alpha: float = 1.702, out_dtype=None, name: str = "grouped_gemm"):
    """grouped_gemm.grouped_gemm's contract (same arguments, same returned tuple) on `block_gemm`; `cfg` is unused
    (the Mosaic tiles are fixed here), and so is `name` (plgpu.kernel takes none in this jax)."""
    del cfg, name
    M = (row_index if row_index is not None else a).shape[0]
    cdt = a.dtype
    lora = lora_b is not None
    gg.check_nn_args(lora_a, z, lora_b, mode, activation, out_scale)
    pad = padded_rows(offsets_E1, M)
    src = pad.src_P if row_index is None else jnp.take(row_index, pad.src_P, mode="fill", fill_value=a.shape[0])
    a_P = jnp.take(a, src, axis=0, mode="fill", fill_value=0)

    def unpad(v_P):
        return v_P[pad.pos_M]

    z_P = None
    if lora:
        if z is None:
            # z = z_scale · A @ LA, rounded as grouped_gemm.py's z (fp32 product, scaled, then the storage dtype)
            z_P = (block_gemm(a_P, lora_a.astype(cdt), pad.block_expert, w_t=la_t, interpret=interpret)
                   * z_scale).astype(cdt)
            z = unpad(z_P)
        else:
            z_P = jnp.take(z.astype(cdt), pad.src_P, axis=0, mode="fill", fill_value=0)
    acc_P = block_gemm(a_P, w.astype(cdt), pad.block_expert, w_t=w_t, z_P=z_P,
                       lb=None if not lora else lora_b.astype(cdt), lb_t=lb_t, lora_scale=lora_scale,
                       interpret=interpret)
    acc = unpad(acc_P)  # [M, N'] fp32 in sorted rows
    expert_M = pad.expert_M
    rs = None if row_scale is None else row_scale.astype(_F32)[:, None]
    outs = []
    if mode == "act_fwd":
        if bias is not None:
            acc = acc + bias[expert_M].astype(_F32)
        g, u = acc[:, :n].astype(cdt), acc[:, n:].astype(cdt)
        out = gg.act_fwd(g.astype(_F32), u.astype(_F32), activation, limit, alpha)
        gu_M = jnp.concatenate([g, u], axis=1)
    elif mode == "act_bwd":
        g = gu[:, :n].astype(_F32)
        u = gu[:, n:].astype(_F32)
        h = gg.act_fwd(g, u, activation, limit, alpha).astype(cdt).astype(_F32)
        dots = jnp.sum(h * acc, axis=1, keepdims=True)
        dh = acc * rs if rs is not None else acc
        dg, du = gg.act_bwd(g, u, dh, activation, limit, alpha)
        out = jnp.concatenate([dg, du], axis=1)
    else:
        if bias is not None:
            acc = acc + bias[expert_M].astype(_F32)
        if out_scale != 1.0:
            acc = acc * out_scale
        out = acc.astype(cdt).astype(_F32) * rs if rs is not None else acc
    out = out.astype(out_dtype or cdt)
    if out_rows is not None:
        out = jnp.zeros((out_rows_total or M, out.shape[1]), out.dtype).at[out_rows].set(out, unique_indices=True)
    outs.append(out)
    if store_z and lora:
        outs.append(z.astype(cdt))
    if store_gu and mode == "act_fwd":
        outs.append(gu_M)
    if mode == "act_bwd":
        outs.append(dots)
    return tuple(outs)
