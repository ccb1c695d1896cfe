"""The NN passes of split_lora.py on a Pallas Mosaic-GPU grouped GEMM (Hopper: TMA loads, wgmma), for the
`pallas_mosaic` backend.

Shape legend as grouped_gemm.py: M sorted rows, D reduction width, N output width, E experts, R LoRA rank.

`block_gemm` (the kernel): rows in a *block-padded* layout, where every expert's rows start on a multiple of
block_m (at most E - 1 + cdiv(M, block_m) blocks of block_m rows; `PaddedRows`), so each row block belongs to one
expert and every load and store is a whole aligned TMA tile. Persistent programs (one per SM) walk the
(row block, column block) tiles; per tile:
    acc = A[rows] @ W[e]           (D in BLOCK_D steps through `plgpu.emit_pipeline`, fp32 accumulator)
    acc += lora_scale · (Z[rows] @ LB[e])   (a second accumulator over R, the LoRA epilogue of grouped_gemm.py; with
                                             SPLITMOE_JAX_LORA_ACC=1 (lora_scale·Z) @ LB into the same one)
and acc is stored in the requested dtype. W and LB may come transposed ([E, N, D], [E, N, R]: the backward contracts
the weights' output axis), read through a transposed SMEM view on the GPU; tiles of padding rows only (expert -1)
are never written. Tile sizes are `MosaicTiles`, named by the tuning table. Hopper TMA cannot gather rows, hence
the padded copy of the left operand made by XLA before the call (it replaces the gather the Triton kernel fuses
into its load).

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
BLOCK_D = 64  # 128 bytes of bf16: the widest TMA swizzle
BLOCK_MS = (64, 128)  # wgmma row tiles of one warpgroup (64 rows per instruction)
BLOCK_NS = (64, 128, 256)


class MosaicTiles(NamedTuple):
    """The Mosaic kernel's tiles: row block (also the padding unit of `PaddedRows`), column block, pipeline depth."""

    block_m: int = 128
    block_n: int = 128
    stages: int = 4  # plgpu.emit_pipeline's max_concurrent_steps (one step is held back for the in-flight wgmma)


DEFAULT_TILES = MosaicTiles()


def tiles_of(cfg: BlockConfig | None) -> MosaicTiles:
    """A tuning-table config with impl="mosaic" names its Mosaic tiles (block_m, block_n, num_stages); any other
    config (a Triton tile) means the defaults."""
    if cfg is None or cfg.impl != "mosaic":
        return DEFAULT_TILES
    if cfg.block_m not in BLOCK_MS or cfg.block_n not in BLOCK_NS or cfg.num_stages < 2:
        raise ValueError(f"Mosaic tiles need block_m in {BLOCK_MS}, block_n in {BLOCK_NS} and num_stages >= 2; got "
                         f"{cfg}. Fix or delete that entry of the tuning table (benchmarks/pallas_sweep.py writes it).")
    return MosaicTiles(cfg.block_m, cfg.block_n, cfg.num_stages)


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


def padded_rows(offsets_E1: jax.Array, M: int, block_m: int) -> PaddedRows:
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


def _block_n(n: int, want: int) -> int:
    """The widest column block <= want dividing n (n is padded to a multiple of 16 first)."""
    for b in (256, 128, 64, 32, 16):
        if b <= want and n % b == 0:
            return b
    return 16


def _num_programs(interpret: bool) -> int:
    """Persistent programs: one per SM on the GPU (a few in the interpreter, which runs them in turn)."""
    if interpret:
        return 3
    return int(getattr(jax.devices()[0], "core_count", 132))


def block_gemm(a_P: jax.Array, w: jax.Array, block_expert: jax.Array, *, w_t: bool, z_P: jax.Array | None = None,
               lb: jax.Array | None = None, lb_t: bool = False, lora_scale: float = 1.0, out_dtype=_F32,
               tiles: MosaicTiles = DEFAULT_TILES, interpret: bool = False,
               smem_transpose: bool | None = None) -> jax.Array:
    """The kernel (module docstring): a_P [P, D] in the padded layout of `tiles.block_m`, w [E, D, N] (or [E, N, D]
    with w_t), optional z_P [P, R] and lb [E, R, N] (or [E, N, R] with lb_t) -> [P, N] in out_dtype (fp32
    accumulation either way). D, N and R are padded here to the tile sizes when they are not multiples (a copy only
    for odd shapes).

    Transposed weights are read through a transposed SMEM view on the GPU (smem_transpose, the default there); the
    Mosaic-GPU interpreter cannot run wgmma on such a view, so in interpret mode XLA transposes them first (a
    weight-sized copy). The GPU tests check the SMEM-view form against the Triton kernel."""
    bm = tiles.block_m
    P = a_P.shape[0]
    if P % bm:
        raise ValueError(f"a_P has {P} rows, not a multiple of block_m={bm}: build it with padded_rows(..., {bm})")
    lora = z_P is not None
    smem_t = (not interpret) if smem_transpose is None else smem_transpose
    N = w.shape[1] if w_t else w.shape[2]

    def prep(m: jax.Array, t: bool) -> tuple[jax.Array, bool]:
        """Pad (reduction to BLOCK_D, output to 16) and, unless read transposed in SMEM, transpose to [E, D, N]."""
        if t and not smem_t:
            m, t = jnp.swapaxes(m, 1, 2), False
        return _pad_to(_pad_to(m, 2 if t else 1, BLOCK_D), 1 if t else 2, 16), t

    w, w_t = prep(w, w_t)
    a_P = _pad_to(a_P, 1, BLOCK_D)
    Dp, Np = a_P.shape[1], (w.shape[1] if w_t else w.shape[2])
    bn = _block_n(Np, tiles.block_n)
    # gg.lora_acc: (lora_scale·z) @ LB accumulated into the base tile (z·s exact: s a power of two), not a second
    # accumulator added in registers
    acc_lora = lora and gg.lora_acc(lora_scale)
    if lora:
        lb, lb_t = prep(lb, lb_t)
        if acc_lora:
            z_P = (z_P.astype(_F32) * lora_scale).astype(z_P.dtype)
        z_P = _pad_to(z_P, 1, BLOCK_D)
        Rp = z_P.shape[1]
    nb, nn = P // bm, Np // bn

    def pipeline(acc_ref, lhs, rhs, rhs_t: bool, steps: int, mi, ni):
        # a one-step pipeline (the LoRA part at R <= 64) refills nothing, and emit_pipeline needs
        # max_concurrent_steps (which it caps at the step count) above delay_release
        dr = 1 if min(steps, tiles.stages) > 1 else 0

        def step(_, l_smem, r_smem):
            plgpu.wgmma(acc_ref, l_smem, plgpu.transpose_ref(r_smem, (1, 0)) if rhs_t else r_smem)
            plgpu.wgmma_wait(1)  # this step's wgmma may still run; the previous step's has finished

        # wgmma is asynchronous: with delay_release=1 the pipeline refills a step's buffers only after the next step
        # has waited for it (wgmma_wait(1) above), so a TMA load never overwrites the operands of a wgmma in flight.
        # (The first GPU run, which refilled a buffer right after its own step, raced: wrong values.)
        plgpu.emit_pipeline(
            step, grid=(steps,), max_concurrent_steps=tiles.stages,
            in_specs=[plgpu.BlockSpec((bm, BLOCK_D), lambda k: (mi, k), delay_release=dr),
                      plgpu.BlockSpec((bn, BLOCK_D) if rhs_t else (BLOCK_D, bn),
                                      (lambda k: (ni, k)) if rhs_t else (lambda k: (k, ni)), delay_release=dr)],
        )(lhs, rhs)

    def body(expert_ref, a_ref, w_ref, *rest):
        z_ref, lb_ref, out_ref = rest if lora else (None, None, rest[0])

        # persistent programs walk the tiles column-fastest: the tiles in flight at once share their row blocks
        # and the weights of one or two experts
        @plgpu.nd_loop((nb * nn,), collective_axes="sm")
        def _tile(info):
            mi, ni = info.index[0] // nn, info.index[0] % nn
            e = expert_ref[mi]

            @pl.when(e >= 0)
            def _():
                def main(acc_ref):
                    pipeline(acc_ref, a_ref, w_ref.at[e], w_t, Dp // BLOCK_D, mi, ni)
                    if acc_lora:  # z_P arrives times lora_scale: the LoRA steps accumulate into the same tile
                        # the base pipeline's last wgmma may still read its SMEM buffers, which the LoRA pipeline's
                        # scope may reuse: let it finish first
                        plgpu.wgmma_wait(0)
                        pipeline(acc_ref, z_ref, lb_ref.at[e], lb_t, Rp // BLOCK_D, mi, ni)
                    return acc_ref[...]

                acc = pl.run_scoped(main, plgpu.ACC((bm, bn)))
                if lora and not acc_lora:
                    def lora_part(acc_ref):
                        pipeline(acc_ref, z_ref, lb_ref.at[e], lb_t, Rp // BLOCK_D, mi, ni)
                        return acc_ref[...]

                    acc = acc + lora_scale * pl.run_scoped(lora_part, plgpu.ACC((bm, bn)))

                @functools.partial(pl.run_scoped, o_smem=plgpu.SMEM((bm, bn), out_dtype))
                def _store(o_smem):
                    o_smem[...] = acc.astype(out_dtype)
                    plgpu.commit_smem()
                    plgpu.copy_smem_to_gmem(o_smem, out_ref.at[pl.ds(mi * bm, bm), pl.ds(ni * bn, bn)])
                    plgpu.wait_smem_to_gmem(0, wait_read_only=True)  # o_smem is reused by the next tile

        plgpu.wait_smem_to_gmem(0)  # every store has landed before the program exits

    ins = [block_expert, a_P, w] + ([z_P, lb] if lora else [])
    kw = {} if not interpret else {"interpret": interpret_params(True)}
    out = plgpu.kernel(
        body, out_type=jax.ShapeDtypeStruct((P, Np), out_dtype), grid=(_num_programs(interpret),),
        grid_names=("sm",),
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
    """grouped_gemm.grouped_gemm's contract (same arguments, same returned tuple) on `block_gemm`, with the tiles
    `tiles_of(cfg)`; `name` is unused (plgpu.kernel takes none in this jax)."""
    del name
    tiles = tiles_of(cfg)
    M = (row_index if row_index is not None else a).shape[0]
    cdt = a.dtype
    lora = lora_b is not None
    gg.check_nn_args(lora_a, z, lora_b, mode, activation, out_scale)
    pad = padded_rows(offsets_E1, M, tiles.block_m)
    src = pad.src_P if row_index is None else jnp.take(row_index, pad.src_P, mode="fill", fill_value=a.shape[0])
    a_P = jnp.take(a, src, axis=0, mode="fill", fill_value=0)

    def unpad(v_P):
        return v_P[pad.pos_M]

    z_P = None
    if lora:
        if z is None:
            # z = z_scale · A @ LA, rounded as grouped_gemm.py's z (fp32 product, scaled, then the storage dtype)
            z_P = (block_gemm(a_P, lora_a.astype(cdt), pad.block_expert, w_t=la_t, tiles=tiles,
                              interpret=interpret) * z_scale).astype(cdt)
            z = unpad(z_P)
        else:
            z_P = jnp.take(z.astype(cdt), pad.src_P, axis=0, mode="fill", fill_value=0)
    # The kernel stores the storage dtype where grouped_gemm.py's first rounding is of the bare product (half the
    # bytes written and read back); fp32 where a bias, a scale or the act_bwd epilogue comes first.
    plain = bias is None and out_scale == 1.0
    if plain and mode == "act_fwd":
        acc_dtype = cdt
    elif plain and mode == "plain":
        acc_dtype = cdt if row_scale is not None else (out_dtype or cdt)
    else:
        acc_dtype = _F32
    acc_P = block_gemm(a_P, w.astype(cdt), pad.block_expert, w_t=w_t, z_P=z_P,
                       lb=None if not lora else lora_b.astype(cdt), lb_t=lb_t, lora_scale=lora_scale,
                       out_dtype=acc_dtype, tiles=tiles, interpret=interpret)
    acc = unpad(acc_P).astype(_F32)  # [M, N'] in sorted rows
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
