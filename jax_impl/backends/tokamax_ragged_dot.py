"""Backend `tokamax`: the `ragged_dot` backend's split-LoRA math (same forward, same custom VJP, same roundings) with
every grouped GEMM done by `tokamax.ragged_dot_general`, Google's Pallas kernel library for JAX: on Hopper a
Mosaic-GPU grouped GEMM (its `mosaic` implementation), a Pallas-Triton one elsewhere on CUDA, XLA's `ragged_dot` on
CPU. The JAX user's off-the-shelf alternative to this project's own Pallas kernels (issue 16 asks for the two side by
side); `benchmarks/moe_block.py --impls jax_tokamax` times it.

All three dot forms of `ragged_dot.py` go through tokamax: rows x W (its default dimension numbers), rows x Wᵀ
(tokamax transposes the weight for the Mosaic kernel, a copy per call: part of what the benchmark measures) and the
per-expert weight-shaped products of the LoRA gradients (its ragged-contracting kernel; on a GPU not Mosaic's, which
gave wrong products on the H100: see `_per_group_implementation`). Which implementation runs:
- CUDA, bf16 / fp16: ("mosaic", "triton"), tokamax's order: Mosaic where it has a kernel, else Triton;
- CUDA, fp32: "xla" (exact; the Mosaic kernels take 16-bit operands and a Triton dot in fp32 may round to TF32, so
  the fp32 tests stay exact);
- CPU: "xla" (`lax.ragged_dot_general`; the tests check the wiring against the float64 oracle there);
- `SPLITMOE_TOKAMAX_IMPL=mosaic|triton|xla` forces one (to time each on the GPU).

On a GPU each kernel implementation is first traced once on a tiny problem (`_trace_error`, cached): only those that
trace are asked for, and with none the backend is unavailable, saying why, before any work. Measured on an H100 with
jax 0.11.2 (2026-12-06, session 14): tokamax 0.0.12's Mosaic kernel fails with "Mesh.__init__() got an unexpected
keyword argument 'out_shape'" and its Triton kernel with "pl.dot was deprecated in JAX v0.11.0": neither runs on that
stack, where a step would otherwise have died inside its trace. tokamax 0.0.14, which `benchmarks/tokamax-wheels.sh`
now brings, lowers both for CUDA with jax 0.11.2 (checked on a CPU with `jax.export`, the device stood in for by an
H100, where 0.0.12 fails with the same two errors). On the H100 (session 26) its Mosaic kernels then refused
operands that are not whole 128-byte tiles, so those are padded (`_pad_for_mosaic`; `benchmarks/tokamax_lower.py`
lowers every case for CUDA on a CPU, which checks that without a GPU). From 0.0.15 tokamax's Triton kernel needs
jax-triton 0.4 and triton >= 3.7, which that machine lacks (torch's triton 3.6.0): there "triton" is an unknown
implementation, which the probe reports like a failed trace, and only Mosaic runs.
"""

from __future__ import annotations

import functools
import os

import jax
import jax.numpy as jnp

from jax_impl.backends.ragged_dot import _PER_GROUP, _ROWS, build_expert_mlp

IMPL_ENV_VAR = "SPLITMOE_TOKAMAX_IMPL"
_IMPLS = ("mosaic", "triton", "xla")


def unavailable_reason(dtype=None) -> str | None:
    """Why the backend cannot run in this process (in `dtype`, when given), or None."""
    try:
        import tokamax
    except ImportError as e:
        return f"tokamax is not installed ({e}); pip install 'splitmoe[tokamax]' (or 'tokamax>=0.0.12')"
    forced = os.environ.get(IMPL_ENV_VAR, "").strip()
    if forced and forced not in _IMPLS:
        return f"${IMPL_ENV_VAR}={forced!r} is not one of {', '.join(_IMPLS)}"
    errors = _trace_errors(jnp.bfloat16 if dtype is None else dtype)
    if all(errors.values()):
        found = "; ".join(f"{impl}: {err}" for impl, err in errors.items())
        return (f"tokamax {getattr(tokamax, '__version__', '?')}'s kernels do not trace with jax {jax.__version__} "
                f"here ({found}); ${IMPL_ENV_VAR}=xla runs its XLA path (dense on a GPU, as backend ragged_dot)")
    return None


def _wanted(dtype) -> tuple[str, ...]:
    forced = os.environ.get(IMPL_ENV_VAR, "").strip()
    if forced:
        return (forced,)
    if jax.default_backend() == "gpu" and jnp.dtype(dtype).itemsize == 2:
        return ("mosaic", "triton")
    return ("xla",)


def _trace_errors(dtype) -> dict[str, str | None]:
    """{implementation wanted for `dtype` here: the error its trace raised, or None}."""
    return {impl: _trace_error(impl, jnp.dtype(dtype).name) for impl in _wanted(dtype)}


def implementation(dtype) -> str | tuple[str, ...]:
    """The tokamax implementation(s) a dot of operands in `dtype` asks for here (the module docstring's table), less
    those that do not trace on this GPU."""
    errors = _trace_errors(dtype)
    working = tuple(i for i, err in errors.items() if err is None) or tuple(errors)
    return working[0] if len(working) == 1 else working


@functools.cache
def _trace_error(impl: str, dtype_name: str) -> str | None:
    """The error tracing tokamax's `impl` raises on a tiny grouped GEMM of the row form in `dtype_name` here (None:
    it traces). XLA's path is jax's own ragged_dot: not probed."""
    return _probe(impl, dtype_name, (128, 128), (2, 128, 128), _ROWS)


def _probe(impl: str, dtype_name: str, lhs_shape: tuple[int, ...], rhs_shape: tuple[int, ...], dims) -> str | None:
    """The error lowering tokamax's `impl` raises on one ragged dot of these shapes and dimension numbers."""
    if impl == "xla":
        return None
    import tokamax

    mark_absl_flags_parsed()
    dt = jnp.dtype(dtype_name)
    lhs, rhs = jax.ShapeDtypeStruct(lhs_shape, dt), jax.ShapeDtypeStruct(rhs_shape, dt)
    sizes = jax.ShapeDtypeStruct((2,), jnp.int32)
    try:
        jax.jit(lambda a, b, g: tokamax.ragged_dot_general(a, b, g, dims, preferred_element_type=jnp.float32,
                                                           implementation=impl)).lower(lhs, rhs, sizes)
    except Exception as e:  # noqa: BLE001 - whatever the library raises while tracing is the reason it cannot run
        return f"{type(e).__name__}: {str(e).splitlines()[0][:160]}"
    return None


def mark_absl_flags_parsed() -> None:
    """tokamax keeps its options as absl flags and, on first reading one, parses `sys.argv` as absl flags if nobody
    has: under pytest or `splitmoe train ...` that fails on the first option it does not know. Mark them parsed
    (tokamax's defaults), as an absl program's `app.run` would have."""
    from absl import flags

    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()


# tokamax's Mosaic GPU kernels read their operands through swizzled shared-memory tiles of 128 bytes (64 bf16
# elements) and copy with 16-byte strides, and refuse other shapes while lowering: "dimension 1 must have size
# smaller or a multiple of its tiling 64, but got 4000" (the weight-gradient kernel with T·K = 1000·4 rows: every bf16
# gpu test failed on it, H100, tokamax 0.0.14, jax 0.11.2, session 26), "... tiling 8, but got 10", "async_copy
# requires all GMEM strides except the last one to be a multiple of 16 bytes" (lowered for CUDA on the CPU). So for
# Mosaic every axis but the group axis is zero-padded to a whole number of tiles and the result sliced back: zero rows
# and zero columns add nothing to any product, and padded rows join the last group. Full-size shapes (T·K, H, I and
# R=64 all multiples of 64) are not copied. Powers of two below a tile (r=16, 32) are left as they are: 0.0.14
# takes them with a narrower swizzle (0.0.12 refuses them next to a 128-byte one, "WGMMA rhs swizzle must match lhs
# swizzle", but 0.0.12 does not trace with jax 0.11.2 at all).
_TILE_BYTES = 128


def _padded(size: int, tile: int) -> int:
    """`size` rounded up to whole `tile`s, unless a power of two below the tile of at least 16 bytes (tile // 8)."""
    if size % tile == 0 or (tile // 8 <= size < tile and size & (size - 1) == 0):
        return size
    return -(-size // tile) * tile


def _pad_for_mosaic(lhs, rhs, group_sizes_E, dims):
    """(lhs, rhs, group_sizes_E) padded as the comment above says, and the slices that cut the result back."""
    tile = _TILE_BYTES // jnp.dtype(lhs.dtype).itemsize
    out = jax.eval_shape(lambda a, b, g: jax.lax.ragged_dot_general(a, b, g, dims), lhs, rhs, group_sizes_E).shape
    (lc, rc), _ = dims.dot_dimension_numbers
    m_axis = dims.lhs_ragged_dimensions[0]
    rhs_m_axis = rc[list(lc).index(m_axis)] if m_axis in lc else None  # the per-group form contracts the rows
    m = _padded(lhs.shape[m_axis], tile)
    lhs_to = [m if ax == m_axis else _padded(d, tile) for ax, d in enumerate(lhs.shape)]
    rhs_to = [d if ax in dims.rhs_group_dimensions else m if ax == rhs_m_axis else _padded(d, tile)
              for ax, d in enumerate(rhs.shape)]
    if lhs_to == list(lhs.shape) and rhs_to == list(rhs.shape):
        return lhs, rhs, group_sizes_E, None
    group_sizes_E = group_sizes_E.at[-1].add(m - lhs.shape[m_axis])
    lhs = jnp.pad(lhs, [(0, t - d) for t, d in zip(lhs_to, lhs.shape)])
    rhs = jnp.pad(rhs, [(0, t - d) for t, d in zip(rhs_to, rhs.shape)])
    return lhs, rhs, group_sizes_E, tuple(slice(0, d) for d in out)


# tokamax 0.0.14's Mosaic kernel for the per-group form (the ragged rows contracted: every LoRA and weight gradient,
# `ragged_contracting_dim_dot_sm90`) gave wrong products on the H100 with jax 0.11.2 (session 28, `gpu_session.sh
# session26tk`): in the bf16 gpu tests the forward, dx and the routing weights' gradient matched the float64 oracle,
# dW did not (15.7 % and 16.4 % of its elements within tolerance, gpu_medium and gpu_oai: 4000 and 3108 rows, groups
# of about 250 and 390), while every case whose groups each fit in one of the kernel's 128-row K blocks passed.
# tokamax's own vjp test has groups of exactly 128 rows. The padding above is not the cause: the same padded
# operands through lax.ragged_dot_general match the oracle at both cases (test_moe_block.py). So, unless
# SPLITMOE_TOKAMAX_IMPL forces one, that form asks for tokamax's other kernels that trace here, else XLA's path.
# tokamax's Triton kernel for it (0.0.12 and 0.0.14) leaves an empty group's product as whatever its last, fully
# unmasked K step read from the rows before the group (or before the array), not zeros: run under Pallas's
# interpreter on the CPU, groups [100, 0, 156] gave the middle product off by 25.6 and [0, 100, 156] NaN. Experts
# that get no rows are common at small T, so `_dot` zeroes empty groups' products in this form, whatever ran.
def _per_group_implementation(impl: str | tuple[str, ...], dtype) -> str | tuple[str, ...]:
    """`impl` (what `implementation` chose) for a dot of the per-group form in `dtype`: without Mosaic, and without
    a kernel that does not trace this form here (`_per_group_trace_error`), unless forced."""
    if os.environ.get(IMPL_ENV_VAR, "").strip():
        return impl
    rest = tuple(i for i in ((impl,) if isinstance(impl, str) else impl)
                 if i != "mosaic" and _per_group_trace_error(i, jnp.dtype(dtype).name) is None)
    return rest[0] if len(rest) == 1 else rest or "xla"


@functools.cache
def _per_group_trace_error(impl: str, dtype_name: str) -> str | None:
    """`_trace_error` for the per-group form (`implementation`'s probe traces the row form only): the Triton kernel
    that form now asks for has a kernel of its own in tokamax."""
    return _probe(impl, dtype_name, (256, 128), (256, 128), _PER_GROUP)


def _is_per_group(dims) -> bool:
    """True when the ragged (row) axis is contracted: out[g] = lhs[rows of g]ᵀ · rhs[rows of g]."""
    return dims.lhs_ragged_dimensions[0] in dims.dot_dimension_numbers[0][0]


def _dot(lhs, rhs, group_sizes_E, dims):
    """One ragged dot on tokamax, operands in lhs's dtype, fp32 accumulation and output (as `ragged_dot._dot`)."""
    import tokamax

    mark_absl_flags_parsed()
    impl = implementation(lhs.dtype)
    if _is_per_group(dims):
        impl = _per_group_implementation(impl, lhs.dtype)
    rhs, cut = rhs.astype(lhs.dtype), None
    if "mosaic" in ((impl,) if isinstance(impl, str) else impl):
        lhs, rhs, group_sizes_E, cut = _pad_for_mosaic(lhs, rhs, group_sizes_E, dims)
    y = tokamax.ragged_dot_general(lhs, rhs, group_sizes_E, dims, preferred_element_type=jnp.float32,
                                   implementation=impl)
    if _is_per_group(dims):  # the group axis leads the output of this form
        y = jnp.where((group_sizes_E > 0).reshape((-1,) + (1,) * (y.ndim - 1)), y, 0.0)
    return y if cut is None else y[cut]


expert_mlp_sorted = build_expert_mlp(_dot)
