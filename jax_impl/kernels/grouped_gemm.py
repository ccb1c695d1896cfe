"""Two generic grouped-GEMM Pallas kernels (Triton lowering) over expert-sorted rows, and their launchers.

Shape legend: T tokens, H hidden, I expert intermediate, E experts, K experts per token, R LoRA rank, M = T·K routed
rows, sorted by expert once per call (expert e owns sorted rows offsets[e]:offsets[e+1]). Below, D is the reduction
width and N the output width of one call (D=H, N=I for the gate_up pass). The kernel decomposition mirrors
torch_impl/kernels/grouped_gemm.py (same passes, same flags), so one design serves both frameworks.

`grouped_gemm` (NN; one program per [block_m rows of one expert] x [block_n columns] output tile):
    acc[m, n] = Σ_d A[src(m), d] · W[e, d, n]               src(m) = row_index[m] (gather fused in the load) or m
    LoRA:      z[m] = z_scale · Σ_d A[src(m), d] · LA[e, d, :R] in the same d-loop (one read of A; the program
               of n-tile 0 stores z); then acc += lora_scale · z @ LB[e, :R, n] (with SPLITMOE_JAX_LORA_ACC=1:
               acc += (lora_scale · z) @ LB, one accumulating dot; `lora_acc`)
    given z:   z [M, R] (sorted rows, already scaled and rounded) is an input instead of LA: only the epilogue
               acc += lora_scale · z @ LB remains. `cfg.z_pre` makes the launcher compute z this way first, by a
               skinny launch of this same kernel in plain mode (W = LA, N = R, out_scale = z_scale): the in-loop
               z is recomputed by every one of the cdiv(N, block_n) n-tile programs, the skinny launch once.
               Same values: the same products summed over the same block_d steps, scaled and rounded alike.
    out_scale: plain mode: out = out_scale · acc (before row_scale and the rounding to the output dtype).
    bias:      acc += bias[e, n]
    mode "act_fwd": two accumulators, columns n (gate) and N+n (up) of W, LB and bias; out = act(gate, up) -> h
               [M, I]; the pre-activation gu [M, 2I] can be stored for the backward.
    mode "act_bwd": epilogue of dh' = dy@Wdᵀ + dZ2'@A2ᵀ: loads gu, recomputes h = act(gu), writes the per-tile
               partial <h, acc>[m] into dots[m, pid_n] (d expert_weights without the down output), then
               dh = row_scale·acc and out = act_vjp(gu, dh) -> dgu [M, 2I].
    row_scale: output rows times row_scale[m] (the routing weight).
    out_rows:  row m is stored to out[out_rows[m]] (its (token, slot) position t·K+k), so the caller sums over K
               with a reshape: deterministic, no atomics.
    Transposed operands (`*_t`): W given as [E, N, D], LA as [E, R, D], LB as [E, N, R]: the backward contracts the
    weights' output axis without materialising a transpose.

`grouped_gemm_tn` (ragged contraction: one program per (expert, P tile, Q tile), looping over that expert's rows):
    out[e, p, q] = alpha · Σ_{m in rows(e)} L(m)[p] · row_scale[m] · R(m)[q]         (fp32 accumulation and output)
    L(m) = L[l_index[m] or m] | act(gu[m]) (h recomputed on load from the saved pre-activation) | 1 (only p = 0:
    bias gradients as a column sum through the same dot). Empty experts write zeros.
    Split mode, split_rows = N > 0 (a multiple of block_m; 0: the above, unchanged): the twin of torch_impl's
    SPLIT_ROWS (torch_impl/kernels/grouped_gemm.py, which has the motivation: each program above walks all of its
    expert's rows, so one crowded expert sets the launch's length; on the GPU in session 17 a Qwen3-30B layer's four
    launches went from 0.83 to 1.56 ms with one expert at 16x the mean rows). Each expert's rows are cut into chunks
    of N, in expert order, the last chunk taking the remainder too (`shared_math.tuning.split_chunks`: N to 2N - 1
    rows a chunk; an expert of fewer than 2N rows is one chunk). Slots: slot -> (expert, first row) is
    `tile_schedule` for block N (static length cdiv(M, N) + E, surplus slots expert -1), where a remainder's slot
    gets no rows. Two launches, no atomics:
      pass 1 (`_tn_kernel`), one program per (slot, P tile, Q tile): the chunk's rows reduced as above into an fp32
        partial [cdiv(M, N) + E, P, Q]; an expert of one chunk is finished here instead (scale, out_dtype; the same
        row blocks in the same order as the unsplit kernel: the same bits), so only experts of two or more chunks
        write and read partials.
      pass 2 (`_tn_sum_kernel`), one program per (expert, P tile, Q tile): scale · the sum of the expert's partials
        in chunk order (fixed: deterministic; its first slot and chunk count are built with jnp before the call),
        zeros for experts with no rows; one-chunk experts keep pass 1's tile (the output is aliased through).
    Off by default and untimed on the GPU: SPLITMOE_JAX_TN_SPLIT_ROWS (`tn_split_rows`) sets it for the backward's
    launches when a step is traced.

Both kernels see whole arrays in memory (no BlockSpecs: the row offsets are data-dependent) and index them with
int-array indexers built from `start + iota`, which is what both the Triton lowering (contiguous pointer offsets,
masked loads) and interpret mode (gathers) accept; slices and array indexers cannot be mixed in interpret mode.
Row schedules are built with jnp before the call (`tile_schedule`) and the grid has the static upper bound
cdiv(M, block_m) + E row tiles, so shapes are static under jit: no recompilation per batch.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from functools import partial

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from jax_impl.kernels.autotune import BlockConfig
from shared_math.numerics import scales_exactly
from shared_math.tuning import env_split_rows

_F32 = jnp.float32
ACTIVATIONS = ("swiglu", "swiglu_oai")


# ---- schedule --------------------------------------------------------------------------------------------------------

def tile_schedule(offsets_E1: jax.Array, M: int, block_m: int) -> tuple[jax.Array, jax.Array]:
    """(tile_expert, tile_row) [cdiv(M, block_m) + E] for row tiles that never straddle two experts.

    Expert e gets cdiv(size_e, block_m) consecutive tiles starting at its first row; the remaining (surplus) tiles
    get expert -1 and do no work. The length is an upper bound known without looking at the data.
    """
    E = offsets_E1.shape[0] - 1
    sizes = offsets_E1[1:] - offsets_E1[:-1]
    tiles = (sizes + block_m - 1) // block_m
    tile_end = jnp.cumsum(tiles)
    i = jnp.arange(pl.cdiv(M, block_m) + E, dtype=jnp.int32)
    e = jnp.searchsorted(tile_end, i, side="right").astype(jnp.int32)
    valid = e < E
    ec = jnp.minimum(e, E - 1)
    row = offsets_E1[ec] + (i - (tile_end[ec] - tiles[ec])) * block_m
    return jnp.where(valid, e, -1).astype(jnp.int32), jnp.where(valid, row, 0).astype(jnp.int32)


# ---- in-kernel helpers -----------------------------------------------------------------------------------------------

def _iota(n: int) -> jax.Array:
    return lax.broadcasted_iota(jnp.int32, (n,), 0)


def _load(ref, idx, mask, other=0):
    return plgpu.load(ref.at[idx], mask=mask, other=other)


def _dot(a, b, prec, contract=((1,), (0,))):
    """fp32-accumulating dot; `prec` HIGHEST keeps fp32 operands out of TF32 (the fp32 equivalence mode)."""
    return lax.dot_general(a, b, (contract, ((), ())), precision=prec, preferred_element_type=_F32)


def act_fwd(g, u, activation: str, limit: float, alpha: float):
    """h from gate g and up u (fp32). swiglu: silu(g)·u; swiglu_oai: (clip(u)+1)·min(g)·sigmoid(alpha·min(g))."""
    if activation == "swiglu":
        return g * jax.nn.sigmoid(g) * u
    gc = jnp.minimum(g, limit)
    uc = jnp.clip(u, -limit, limit)
    return (uc + 1.0) * gc * jax.nn.sigmoid(alpha * gc)


def act_bwd(g, u, dh, activation: str, limit: float, alpha: float):
    """(dgate, dup) = act'(g, u)·dh in fp32. Clamped entries get no gradient; at exactly the limit it passes, as
    torch.clamp's backward and the reference do."""
    if activation == "swiglu":
        sg = jax.nn.sigmoid(g)
        return dh * u * sg * (1.0 + g * (1.0 - sg)), dh * g * sg
    gc = jnp.minimum(g, limit)
    uc = jnp.clip(u, -limit, limit)
    sa = jax.nn.sigmoid(alpha * gc)
    dg = jnp.where(g <= limit, dh * (uc + 1.0) * sa * (1.0 + alpha * gc * (1.0 - sa)), 0.0)
    du = jnp.where(jnp.abs(u) <= limit, dh * gc * sa, 0.0)
    return dg, du


def _precision(dtype) -> lax.Precision:
    return lax.Precision.HIGHEST if jnp.dtype(dtype) == jnp.float32 else lax.Precision.DEFAULT


def _block_r(rank: int) -> int:
    # tl.dot needs every dimension >= 16
    return max(16, pl.next_power_of_2(max(rank, 1)))


# ---- NN kernel -------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class _NNSpec:
    """Everything static about one NN launch (flags select code paths at trace time, like tl.constexpr)."""

    N: int
    D: int
    R: int
    gather: bool
    w_t: bool
    lora: bool
    la_t: bool
    lb_t: bool
    z_in: bool
    store_z: bool
    bias: bool
    row_scale: bool
    mode: str  # "plain" | "act_fwd" | "act_bwd"
    activation: str | None
    store_gu: bool
    scatter: bool
    z_scale: float
    lora_scale: float
    lora_acc: bool  # the LoRA term as (lora_scale·z) @ LB accumulated into acc (`lora_acc`)
    out_scale: float
    limit: float
    alpha: float
    cfg: BlockConfig
    cdt: str


def _nn_kernel(*refs, s: _NNSpec):
    it = iter(refs)
    tile_expert_ref, tile_row_ref, offsets_ref, a_ref = next(it), next(it), next(it), next(it)
    row_index_ref = next(it) if s.gather else None
    w_ref = next(it)
    la_ref = next(it) if s.lora and not s.z_in else None
    z_in_ref = next(it) if s.z_in else None
    lb_ref = next(it) if s.lora else None
    bias_ref = next(it) if s.bias else None
    row_scale_ref = next(it) if s.row_scale else None
    gu_in_ref = next(it) if s.mode == "act_bwd" else None
    out_rows_ref = next(it) if s.scatter else None
    out_ref = next(it)
    z_out_ref = next(it) if s.store_z else None
    gu_out_ref = next(it) if s.store_gu else None
    dots_ref = next(it) if s.mode == "act_bwd" else None

    BM, BN, BD = s.cfg.block_m, s.cfg.block_n, s.cfg.block_d
    BR = _block_r(s.R)
    cdt = jnp.dtype(s.cdt)
    prec = _precision(cdt)
    two = s.mode == "act_fwd"
    pid_t, pid_n = pl.program_id(0), pl.program_id(1)
    e_raw = tile_expert_ref[pid_t]

    # surplus tiles (expert -1) skip everything: a branch around the whole tile keeps the reduction loop's trip
    # count static, so the Triton lowering emits a plain scf.for it can software-pipeline
    @pl.when(e_raw >= 0)
    def _tile():
        row0 = tile_row_ref[pid_t]
        e = e_raw
        row_end = offsets_ref[e + 1]
        rows = row0 + _iota(BM)
        mask_m = rows < row_end
        src = _load(row_index_ref, rows, mask_m) if s.gather else rows
        cols = pid_n * BN + _iota(BN)
        mask_n = cols < s.N
        rr = _iota(BR)
        mask_r = rr < s.R

        def w_tile(ref, dd, mask_d, nn, transposed, mask_nn):
            # [BD, BN] in either storage order; the transposed one is returned as loaded ([BN, BD]) with a flag
            if transposed:
                return _load(ref, (e, nn[:, None], dd[None, :]), mask_nn[:, None] & mask_d[None, :])
            return _load(ref, (e, dd[:, None], nn[None, :]), mask_d[:, None] & mask_nn[None, :])

        def mm(a, w, transposed):
            return _dot(a, w, prec, ((1,), (1,)) if transposed else ((1,), (0,)))

        def body(i, carry):
            carry = dict(carry)
            dd = i * BD + _iota(BD)
            mask_d = dd < s.D
            a = _load(a_ref, (src[:, None], dd[None, :]), mask_m[:, None] & mask_d[None, :])
            carry["acc"] += mm(a, w_tile(w_ref, dd, mask_d, cols, s.w_t, mask_n), s.w_t)
            if two:
                carry["acc2"] += mm(a, w_tile(w_ref, dd, mask_d, cols + s.N, s.w_t, mask_n), s.w_t)
            if s.lora and not s.z_in:
                # the skinny LoRA-A product rides on the A tile already loaded: no second pass over A
                carry["zacc"] += mm(a, w_tile(la_ref, dd, mask_d, rr, s.la_t, mask_r), s.la_t)
            return carry

        init = {"acc": jnp.zeros((BM, BN), _F32)}
        if two:
            init["acc2"] = jnp.zeros((BM, BN), _F32)
        if s.lora and not s.z_in:
            init["zacc"] = jnp.zeros((BM, BR), _F32)
        c = lax.fori_loop(0, pl.cdiv(s.D, BD), body, init)
        acc, acc2 = c["acc"], c.get("acc2")

        if s.z_in:
            z = _load(z_in_ref, (rows[:, None], rr[None, :]), mask_m[:, None] & mask_r[None, :])
        elif s.lora:
            z = (c["zacc"] * s.z_scale).astype(cdt)
            if s.store_z:
                # every n-tile computes the same z (same data, same order); only n-tile 0 writes it
                z_rows = jnp.where(pid_n == 0, row_end, row0)
                plgpu.store(z_out_ref.at[rows[:, None], rr[None, :]], z,
                            mask=(rows < z_rows)[:, None] & mask_r[None, :])
        if s.lora and s.lora_acc:
            # z·s exact (s a power of two); acc + dot folds into one accumulating dot (Triton's dot-add combine):
            # no second fp32 tile of registers, as torch_impl/kernels/hopper.py's LORA == 2
            zs = (z.astype(_F32) * s.lora_scale).astype(z.dtype)
            acc += mm(zs, w_tile(lb_ref, rr, mask_r, cols, s.lb_t, mask_n), s.lb_t)
            if two:
                acc2 += mm(zs, w_tile(lb_ref, rr, mask_r, cols + s.N, s.lb_t, mask_n), s.lb_t)
        elif s.lora:
            acc += s.lora_scale * mm(z, w_tile(lb_ref, rr, mask_r, cols, s.lb_t, mask_n), s.lb_t)
            if two:
                acc2 += s.lora_scale * mm(z, w_tile(lb_ref, rr, mask_r, cols + s.N, s.lb_t, mask_n), s.lb_t)
        if s.bias:
            acc += _load(bias_ref, (e, cols), mask_n).astype(_F32)[None, :]
            if two:
                acc2 += _load(bias_ref, (e, cols + s.N), mask_n).astype(_F32)[None, :]

        mask_mn = mask_m[:, None] & mask_n[None, :]
        if s.row_scale:
            rs = _load(row_scale_ref, rows, mask_m).astype(_F32)[:, None]
        if s.scatter:
            # masked lanes get an out-of-range row: Triton never touches it, and interpret mode's masked store (a
            # read-modify-write scatter) drops it instead of writing a stale value over a real row
            dst = jnp.where(mask_m, _load(out_rows_ref, rows, mask_m), out_ref.shape[0])
        else:
            dst = rows
        odt = out_ref.dtype
        if s.mode == "act_fwd":
            # round gate/up to the storage dtype before the activation: the rounding point of a separate-GEMM
            # implementation, and exactly the values the backward reloads from gu
            g, u = acc.astype(cdt), acc2.astype(cdt)
            if s.store_gu:
                plgpu.store(gu_out_ref.at[rows[:, None], cols[None, :]], g, mask=mask_mn)
                plgpu.store(gu_out_ref.at[rows[:, None], (cols + s.N)[None, :]], u, mask=mask_mn)
            res = act_fwd(g.astype(_F32), u.astype(_F32), s.activation, s.limit, s.alpha)
            plgpu.store(out_ref.at[dst[:, None], cols[None, :]], res.astype(odt), mask=mask_mn)
        elif s.mode == "act_bwd":
            g = _load(gu_in_ref, (rows[:, None], cols[None, :]), mask_mn).astype(_F32)
            u = _load(gu_in_ref, (rows[:, None], (cols + s.N)[None, :]), mask_mn).astype(_F32)
            # h recomputed from the saved pre-activation and rounded as the forward stored it
            h = act_fwd(g, u, s.activation, s.limit, s.alpha).astype(cdt).astype(_F32)
            part = jnp.sum(jnp.where(mask_mn, h * acc, 0.0), axis=1)
            plgpu.store(dots_ref.at[rows, pid_n], part, mask=mask_m)
            dh = acc * rs if s.row_scale else acc
            dg, du = act_bwd(g, u, dh, s.activation, s.limit, s.alpha)
            plgpu.store(out_ref.at[dst[:, None], cols[None, :]], dg.astype(odt), mask=mask_mn)
            plgpu.store(out_ref.at[dst[:, None], (cols + s.N)[None, :]], du.astype(odt), mask=mask_mn)
        else:
            if s.out_scale != 1.0:
                acc = acc * s.out_scale
            if s.row_scale:
                # round the expert output first, then weight it: HF's grouped path rounds at the same two points
                acc = acc.astype(cdt).astype(_F32) * rs
            plgpu.store(out_ref.at[dst[:, None], cols[None, :]], acc.astype(odt), mask=mask_mn)


def check_nn_args(lora_a, z, lora_b, mode: str, activation: str | None, out_scale: float) -> None:
    """The argument rules of an NN pass, shared by every implementation of `grouped_gemm`'s contract."""
    if (lora_b is not None) != (lora_a is not None or z is not None) or (lora_a is not None and z is not None):
        raise ValueError("the LoRA epilogue needs lora_b and exactly one of lora_a (z computed here) or z (given)")
    if mode != "plain" and activation not in ACTIVATIONS:
        raise ValueError(f"unknown activation {activation!r}; expected one of {ACTIVATIONS}")
    if out_scale != 1.0 and mode != "plain":
        raise ValueError("out_scale applies to the plain mode only")


def lora_acc(lora_scale: float) -> bool:
    """Whether the NN kernels (these and mosaic_gemm.py's) add the LoRA term as (lora_scale·z) @ LB accumulated into
    the base accumulator rather than as lora_scale·(z @ LB) from a second fp32 tile: with SPLITMOE_JAX_LORA_ACC=1
    (read when a step is traced), where lora_scale is a power of two so that z·s is exact in z's dtype. The sums
    round in another order. torch_impl's twin is `torch_impl.kernels.hopper.lora_acc` (SPLITMOE_LORA_ACC), which made
    the gpt-oss 16K step 25 % slower on the H100 (session 17); this one is not timed yet (`gpu_session.sh
    session17j`)."""
    value = os.environ.get("SPLITMOE_JAX_LORA_ACC", "")
    if value not in ("", "0", "1"):
        raise ValueError(f"SPLITMOE_JAX_LORA_ACC={value!r}: use 1 (accumulate) or 0 (add; the default), or leave it "
                         "unset")
    return value == "1" and scales_exactly(lora_scale)


def grouped_gemm(a: jax.Array, w: jax.Array, offsets_E1: jax.Array, *, n: int, cfg: BlockConfig, interpret: bool,
                 w_t: bool = False, row_index: jax.Array | None = None, out_rows_total: int | None = None,
                 lora_a: jax.Array | None = None, la_t: bool = False, z: jax.Array | None = None,
                 store_z: bool = False, lora_b: jax.Array | None = None, lb_t: bool = False, z_scale: float = 1.0,
                 lora_scale: float = 1.0, out_scale: float = 1.0, bias: jax.Array | None = None,
                 row_scale: jax.Array | None = None, mode: str = "plain", activation: str | None = None,
                 gu: jax.Array | None = None, store_gu: bool = False, out_rows: jax.Array | None = None,
                 limit: float = 7.0, alpha: float = 1.702, out_dtype=None, name: str = "grouped_gemm"):
    """Launch the NN kernel (module docstring). M = sorted rows = offsets_E1[-1] (static: the row count of
    row_index, or of a when not gathering). `n` is the output width per half (I in the act modes).
    LoRA: lora_b with either lora_a (z computed in the main launch, or by a first skinny launch when cfg.z_pre) or
    z [M, R] given (sorted rows, scaled: z_scale is then ignored). `out_scale`: plain mode only.

    Returns a tuple: (out, z if store_z, gu if store_gu, dots if mode == "act_bwd"); a given z is returned as is.
    """
    M = (row_index if row_index is not None else a).shape[0]
    D = w.shape[2] if w_t else w.shape[1]
    cdt = a.dtype
    lora = lora_b is not None
    check_nn_args(lora_a, z, lora_b, mode, activation, out_scale)
    R = 0 if lora_b is None else (lora_b.shape[2] if lb_t else lora_b.shape[1])
    if lora and z is None and cfg.z_pre:
        # z first, by one skinny launch of output width R (the same kernel, plain mode, W = LA): see the docstring
        zcfg = BlockConfig(cfg.block_m, _block_r(R), cfg.block_d, cfg.num_warps, cfg.num_stages)
        z = grouped_gemm(a, lora_a, offsets_E1, n=R, cfg=zcfg, interpret=interpret, w_t=la_t, row_index=row_index,
                         out_scale=z_scale, name=f"{name}_z")[0]
        lora_a = None
    if z is not None and z.shape != (M, R):
        raise ValueError(f"z has shape {z.shape}; expected (M, R) = {(M, R)}")
    s = _NNSpec(N=n, D=D, R=R, gather=row_index is not None, w_t=w_t, lora=lora, la_t=la_t, lb_t=lb_t,
                z_in=z is not None, store_z=bool(store_z and lora and z is None), bias=bias is not None,
                row_scale=row_scale is not None, mode=mode, activation=activation,
                store_gu=bool(store_gu and mode == "act_fwd"), scatter=out_rows is not None,
                z_scale=float(z_scale), lora_scale=float(lora_scale), lora_acc=lora and lora_acc(lora_scale),
                out_scale=float(out_scale),
                limit=float(limit), alpha=float(alpha), cfg=cfg, cdt=jnp.dtype(cdt).name)
    tile_expert, tile_row = tile_schedule(offsets_E1, M, cfg.block_m)
    n_tiles = pl.cdiv(n, cfg.block_n)

    def c(x):  # operands in the compute dtype (fp32 LoRA master weights are small copies)
        return x.astype(cdt)

    ins = [tile_expert, tile_row, offsets_E1, a]
    ins += [row_index] if s.gather else []
    ins += [c(w)]
    if lora:
        ins += [c(z), c(lora_b)] if s.z_in else [c(lora_a), c(lora_b)]
    ins += [bias] if s.bias else []
    ins += [row_scale] if s.row_scale else []
    ins += [gu] if mode == "act_bwd" else []
    ins += [out_rows] if s.scatter else []
    width = 2 * n if mode == "act_bwd" else n
    out_shape = [jax.ShapeDtypeStruct((out_rows_total or M, width), out_dtype or cdt)]
    if s.store_z:
        out_shape.append(jax.ShapeDtypeStruct((M, R), cdt))
    if s.store_gu:
        out_shape.append(jax.ShapeDtypeStruct((M, 2 * n), cdt))
    if mode == "act_bwd":
        out_shape.append(jax.ShapeDtypeStruct((M, n_tiles), _F32))
    outs = list(pl.pallas_call(
        lambda *refs: _nn_kernel(*refs, s=s), out_shape=out_shape, grid=(tile_expert.shape[0], n_tiles),
        interpret=interpret, name=name,
        compiler_params=plgpu.CompilerParams(num_warps=cfg.num_warps, num_stages=cfg.num_stages),
    )(*ins))
    if store_z and s.z_in:
        outs.insert(1, z.astype(cdt))
    return tuple(outs)


# ---- TN kernel -------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class _TNSpec:
    P: int
    Q: int
    left: str  # "rows" | "act" | "ones"
    gather_l: bool
    gather_r: bool
    row_scale: bool
    activation: str | None
    scale: float
    limit: float
    alpha: float
    cfg: BlockConfig
    cdt: str
    split_rows: int = 0  # > 0: pass 1 of the split mode (one program per chunk of split_rows rows of one expert)


def _tn_kernel(*refs, s: _TNSpec):
    it = iter(refs)
    chunk_expert_ref, chunk_row_ref = (next(it), next(it)) if s.split_rows else (None, None)
    offsets_ref = next(it)
    l_ref = next(it) if s.left != "ones" else None
    l_index_ref = next(it) if s.gather_l else None
    r_ref = next(it)
    r_index_ref = next(it) if s.gather_r else None
    row_scale_ref = next(it) if s.row_scale else None
    out_ref = next(it)
    part_ref = next(it) if s.split_rows else None

    BM, BP, BQ = s.cfg.block_m, s.cfg.block_n, s.cfg.block_d
    cdt = jnp.dtype(s.cdt)
    prec = _precision(cdt)
    pp = pl.program_id(1) * BP + _iota(BP)
    qq = pl.program_id(2) * BQ + _iota(BQ)
    mask_p, mask_q = pp < s.P, qq < s.Q
    mask_pq = mask_p[:, None] & mask_q[None, :]

    def reduce(start, end):
        def body(i, acc):
            rows = start + i * BM + _iota(BM)
            mask_m = rows < end
            r_src = _load(r_index_ref, rows, mask_m) if s.gather_r else rows
            r = _load(r_ref, (r_src[:, None], qq[None, :]), mask_m[:, None] & mask_q[None, :])
            if s.row_scale:
                rs = _load(row_scale_ref, rows, mask_m).astype(_F32)
                r = (r.astype(_F32) * rs[:, None]).astype(cdt)
            mask_mp = mask_m[:, None] & mask_p[None, :]
            if s.left == "rows":
                l_src = _load(l_index_ref, rows, mask_m) if s.gather_l else rows
                lt = _load(l_ref, (l_src[:, None], pp[None, :]), mask_mp)
            elif s.left == "act":
                # h = act(gu) recomputed on load from the saved pre-activation: h [M, I] is never stored
                g = _load(l_ref, (rows[:, None], pp[None, :]), mask_mp).astype(_F32)
                u = _load(l_ref, (rows[:, None], (pp + s.P)[None, :]), mask_mp).astype(_F32)
                lt = jnp.where(mask_mp, act_fwd(g, u, s.activation, s.limit, s.alpha), 0.0).astype(cdt)
            else:
                lt = jnp.where(mask_m[:, None] & (pp == 0)[None, :], 1.0, 0.0).astype(cdt)
            return acc + _dot(lt, r, prec, ((0,), (0,)))

        return lax.fori_loop(0, pl.cdiv(end - start, BM), body, jnp.zeros((BP, BQ), _F32))

    def store_out(e, acc):
        plgpu.store(out_ref.at[e, pp[:, None], qq[None, :]], (acc * s.scale).astype(out_ref.dtype), mask=mask_pq)

    if not s.split_rows:
        e = pl.program_id(0)
        store_out(e, reduce(offsets_ref[e], offsets_ref[e + 1]))
        return

    # pass 1 of the split mode: program (slot c, tile) reduces rows chunk_row[c] : +split_rows of expert
    # chunk_expert[c], where the expert's last full chunk also takes the remainder up to the expert's end and the
    # remainder's own slot does nothing (shared_math.tuning.split_chunks); surplus slots (expert -1) do nothing
    c = pl.program_id(0)
    e_raw = chunk_expert_ref[c]

    @pl.when(e_raw >= 0)
    def _chunk():
        e = e_raw
        start = chunk_row_ref[c]
        e_start, e_end = offsets_ref[e], offsets_ref[e + 1]
        last = e_start + jnp.maximum((e_end - e_start) // s.split_rows - 1, 0) * s.split_rows
        acc = reduce(start, jnp.where(start < last, start + s.split_rows, jnp.where(start == last, e_end, start)))
        # an expert of one chunk (fewer than 2·split_rows rows) is finished here, as the unsplit kernel would (the
        # same row blocks in the same order: the same bits), and pass 2 leaves it alone: only crowded experts pay
        # for partials
        whole = (start == e_start) & (e_end - e_start < 2 * s.split_rows)

        @pl.when(whole)
        def _finish():
            store_out(e, acc)

        @pl.when(jnp.logical_not(whole) & (start <= last))
        def _partial():
            plgpu.store(part_ref.at[c, pp[:, None], qq[None, :]], acc, mask=mask_pq)


def _tn_sum_kernel(chunk_first_ref, chunk_count_ref, part_ref, out_in_ref, out_ref, *, P: int, Q: int,
                   block_p: int, block_q: int, scale: float):
    """Pass 2 of `grouped_gemm_tn`'s split mode: out[e] = scale·Σ partials of e's chunks, in chunk order (fixed:
    deterministic), for experts of two chunks or more (`chunk_count`, from their first slot `chunk_first`); zeros for
    experts with no rows (count 0); one-chunk experts (count 1) keep the tile pass 1 stored (out_in_ref is the same
    buffer as out_ref, aliased, and never read here)."""
    del out_in_ref
    e = pl.program_id(0)
    pp = pl.program_id(1) * block_p + _iota(block_p)
    qq = pl.program_id(2) * block_q + _iota(block_q)
    mask_pq = (pp < P)[:, None] & (qq < Q)[None, :]
    first, n = chunk_first_ref[e], chunk_count_ref[e]

    @pl.when(n != 1)
    def _sum():
        def body(i, acc):
            return acc + _load(part_ref, (first + i, pp[:, None], qq[None, :]), mask_pq)

        acc = lax.fori_loop(0, n, body, jnp.zeros((block_p, block_q), _F32))
        plgpu.store(out_ref.at[e, pp[:, None], qq[None, :]], (acc * scale).astype(out_ref.dtype), mask=mask_pq)


TN_SPLIT_ROWS_ENV = "SPLITMOE_JAX_TN_SPLIT_ROWS"


def tn_split_rows(cfg: BlockConfig) -> int:
    """`split_rows` of a backward ragged-K launch with config `cfg`: SPLITMOE_JAX_TN_SPLIT_ROWS=N (read when a step
    is traced) > 0 turns `grouped_gemm_tn`'s split mode on with chunks of N rows, 0 or unset leaves it off (the
    default; BlockConfig has no split field and the tuned tables none). torch_impl's twin is
    `torch_impl.kernels.split_lora.tn_split_rows` (SPLITMOE_TN_SPLIT_ROWS). Untimed on the GPU. N must be a multiple
    of cfg.block_m (chunks start on the row blocks the kernel walks): ValueError otherwise, naming the variable."""
    return env_split_rows(TN_SPLIT_ROWS_ENV, cfg.block_m, "block_m") or 0


def grouped_gemm_tn(left: jax.Array | None, right: jax.Array, offsets_E1: jax.Array, *, p: int, cfg: BlockConfig,
                    interpret: bool, left_index: jax.Array | None = None, right_index: jax.Array | None = None,
                    row_scale: jax.Array | None = None, left_act: str | None = None, scale: float = 1.0,
                    limit: float = 7.0, alpha: float = 1.702, out_dtype=_F32, split_rows: int = 0,
                    name: str = "grouped_gemm_tn"):
    """Per-expert `scale · Lrowsᵀ diag(row_scale) Rrows` -> [E, p, Q] (module docstring), fp32 by default.

    left=None: a column of ones (p must be 1). left_act: `left` is gu [M, 2I] and Lrows = act(gu), p = I.
    split_rows = N > 0 (a multiple of cfg.block_m; 0: one program per expert and tile, as always): each expert's
    rows reduced in chunks of N to 2N - 1 rows (`shared_math.tuning.split_chunks`) by separate programs into fp32
    partials, then summed per expert in chunk order by a second launch (`{name}_sum`; deterministic, no atomics);
    experts of one chunk get the unsplit kernel's bits.
    The twin of torch_impl's config SPLIT_ROWS, off by default and untimed on the GPU (`tn_split_rows`).
    """
    E = offsets_E1.shape[0] - 1
    Q = right.shape[1]
    cdt = right.dtype
    split = int(split_rows)
    if split < 0 or split % cfg.block_m:
        raise ValueError(f"split_rows={split_rows}: want 0 (off) or a positive multiple of block_m={cfg.block_m}")
    left_mode = "ones" if left is None else ("act" if left_act is not None else "rows")
    s = _TNSpec(P=p, Q=Q, left=left_mode, gather_l=left_index is not None, gather_r=right_index is not None,
                row_scale=row_scale is not None, activation=left_act, scale=float(scale), limit=float(limit),
                alpha=float(alpha), cfg=cfg, cdt=jnp.dtype(cdt).name, split_rows=split)
    ins = [offsets_E1]
    ins += [left.astype(cdt)] if left is not None else []
    ins += [left_index] if left_index is not None else []
    ins += [right]
    ins += [right_index] if right_index is not None else []
    ins += [row_scale] if row_scale is not None else []
    tiles = (pl.cdiv(p, cfg.block_n), pl.cdiv(Q, cfg.block_d))
    params = plgpu.CompilerParams(num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    out_shape = jax.ShapeDtypeStruct((E, p, Q), out_dtype)
    if not split:
        return pl.pallas_call(
            lambda *refs: _tn_kernel(*refs, s=s), out_shape=out_shape, grid=(E, *tiles),
            interpret=interpret, name=name, compiler_params=params,
        )(*ins)
    M = (right_index if right_index is not None else right).shape[0]
    # chunk -> (expert, first row): the row-tile schedule for block N, static length cdiv(M, N) + E (no recompile
    # per routing); partials for every chunk it can hold, written and read only for experts of two or more chunks
    chunk_expert, chunk_row = tile_schedule(offsets_E1, M, split)
    n_chunks = chunk_expert.shape[0]
    out, part = pl.pallas_call(
        lambda *refs: _tn_kernel(*refs, s=s),
        out_shape=[out_shape, jax.ShapeDtypeStruct((n_chunks, p, Q), _F32)], grid=(n_chunks, *tiles),
        interpret=interpret, name=name, compiler_params=params,
    )(chunk_expert, chunk_row, *ins)
    rows = offsets_E1[1:] - offsets_E1[:-1]
    slots = (rows + (split - 1)) // split
    first = (jnp.cumsum(slots) - slots).astype(jnp.int32)
    count = jnp.maximum(rows // split, jnp.minimum(rows, 1))  # chunks: shared_math.tuning.split_chunks
    return pl.pallas_call(
        partial(_tn_sum_kernel, P=p, Q=Q, block_p=cfg.block_n, block_q=cfg.block_d, scale=float(scale)),
        out_shape=out_shape, grid=(E, *tiles), input_output_aliases={3: 0}, interpret=interpret,
        name=f"{name}_sum", compiler_params=plgpu.CompilerParams(num_warps=4, num_stages=2),  # untuned: a small sum
    )(first, count.astype(jnp.int32), part, out)
