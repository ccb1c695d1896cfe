"""A cheaper host path for launching the project's Triton kernels on a GPU: the compiled kernel is cached per call
shape and launched directly.

`fn[grid](*args, **constexprs)` runs `JITFunction.run` on every call: it binds all (~60) parameters through a
generated function, specialises each runtime argument (`native_specialize_impl`: 32 calls per launch of the Hopper
GEMM), hashes the specialisation into Triton's cache key, builds the launch metadata and only then calls the
compiled kernel's launcher. On the H100 host of 2026-12-05 one launch of the persistent Hopper GEMM cost 50 µs of
host time (benchmarks/REPORT.md, session 7), a third of it in that binding, and a 4K Qwen3 step makes about 26
such launches per layer, with the GPU idle while the host queues them.

`launch(fn, grid, args, constexprs, ...)` keeps, per kernel, a dict from a key of the call to the `CompiledKernel`
Triton returned the first time, and on a hit calls `kernel.run` with the same arguments `JITFunction.run` would
pass. The key is finer than Triton's own, so a hit never picks a kernel Triton would not have picked:

- Triton specialises a tensor on its dtype and whether its address is a multiple of 16; the key holds both.
- It specialises an int on `== 1`, divisibility by 16 and its integer type (by range); the key holds the value.
- Floats are fp32 and bools i1 whatever their values: the key holds the type.
- Constexprs and the launch options (num_warps, num_stages) are part of the key by value.

A Triton whose launcher takes other arguments than 3.6's and 3.9's raises TypeError on the first direct launch
(before anything runs): that kernel then takes Triton's own path for good, with a warning.

Ints in the key by value mean one entry per distinct size (a new sequence length is one slow launch, then fast);
the dict is cleared past `MAX_ENTRIES` so varying shapes cannot grow it without bound. Anything else (an argument
of another type, a kernel still compiling asynchronously, the interpreter, `SPLITMOE_FAST_LAUNCH=0`) takes
Triton's path. Triton's global-value check (a kernel's globals changed since it compiled) is skipped on hits: the
project's kernels read no mutable globals.

The descriptor scratch of the Hopper kernels is Triton's allocator's business on both paths (the launcher asks for
it on every launch).
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Sequence
from typing import Any

import torch
from triton import knobs

MAX_ENTRIES = 1024  # distinct call shapes kept per kernel before the cache is cleared


def enabled() -> bool:
    """Whether GPU launches take the cached path (the default; SPLITMOE_FAST_LAUNCH=0 turns it off, e.g. to time
    both)."""
    return os.environ.get("SPLITMOE_FAST_LAUNCH", "1") != "0"


class _Unkeyed(Exception):
    """An argument this module does not know how to key: the call takes Triton's path."""


def _arg_key(a: Any) -> Any:
    # at least as fine as Triton's specialisation of the argument (module docstring)
    if isinstance(a, torch.Tensor):
        return a.dtype, a.data_ptr() & 15
    t = type(a)
    if t is int:
        return a
    if t is float or t is bool or a is None:
        return t
    raise _Unkeyed(type(a).__name__)


class _Entry:
    __slots__ = ("kernel", "tail_names")

    def __init__(self, kernel: Any, tail_names: tuple[str, ...]):
        self.kernel, self.tail_names = kernel, tail_names


_CACHES: dict[int, dict[tuple, _Entry]] = {}
_REFUSED: set[int] = set()  # kernels whose direct launch this Triton refused (see cached_launch)


def launch(fn: Any, grid: Sequence[int], args: Sequence[Any], constexprs: dict[str, Any], *, num_warps: int,
           num_stages: int) -> None:
    """`fn[grid](*args, **constexprs, num_warps=..., num_stages=...)`, through the cached compiled kernel when the
    arguments are CUDA tensors and this call's key was seen before (module docstring). `args` are the runtime
    parameters in signature order; `constexprs` name the rest, which must follow them in the signature."""
    first = next((a for a in args if isinstance(a, torch.Tensor)), None)
    if first is None or first.device.type != "cuda" or not enabled():
        _via_triton(fn, grid, args, constexprs, num_warps, num_stages)
        return
    # Triton launches on the current device and stream, whatever device the tensors are on: so do we
    device = torch.cuda.current_device()
    cached_launch(fn, grid, args, constexprs, num_warps=num_warps, num_stages=num_stages, device=device,
                  stream=torch._C._cuda_getCurrentRawStream(device))


def cached_launch(fn: Any, grid: Sequence[int], args: Sequence[Any], constexprs: dict[str, Any], *, num_warps: int,
                  num_stages: int, device: int, stream: int) -> None:
    """The cached path of `launch` on a given device and stream (separate so that its bookkeeping is testable
    without a GPU)."""
    if id(fn) in _REFUSED:
        _via_triton(fn, grid, args, constexprs, num_warps, num_stages)
        return
    try:
        key = (device, num_warps, num_stages, *constexprs.values(), *[_arg_key(a) for a in args])
    except _Unkeyed:
        _via_triton(fn, grid, args, constexprs, num_warps, num_stages)
        return
    cache = _CACHES.setdefault(id(fn), {})
    entry = cache.get(key)
    if entry is None:
        kernel = _via_triton(fn, grid, args, constexprs, num_warps, num_stages)
        tail = tuple(fn.arg_names[len(args):])
        # cache only what a direct launch can reproduce: a finished CompiledKernel (an asynchronous compile returns
        # a future with `result`), every parameter after `args` a constexpr given by name
        if hasattr(kernel, "run") and not hasattr(kernel, "result") and set(tail) == set(constexprs):
            if len(cache) >= MAX_ENTRIES:
                cache.clear()
            cache[key] = _Entry(kernel, tail)
        return
    kernel = entry.kernel
    # what JITFunction.run passes: every parameter's value in signature order, constexprs included
    values = (*args, *[constexprs[n] for n in entry.tail_names])
    grid = tuple(grid)
    try:
        kernel.run(grid[0], grid[1] if len(grid) > 1 else 1, grid[2] if len(grid) > 2 else 1, stream,
                   kernel.function, kernel.packed_metadata, kernel.launch_metadata(grid, stream, *values),
                   knobs.runtime.launch_enter_hook, knobs.runtime.launch_exit_hook, *values)
    except TypeError as e:
        # a Triton whose launcher takes other arguments (it parses them before launching anything): this kernel
        # takes Triton's own path from now on, slower on the host and otherwise the same
        _REFUSED.add(id(fn))
        cache.clear()
        warnings.warn(f"splitmoe's cached launch of {getattr(fn, '__name__', fn)} does not fit this Triton's "
                      f"launcher ({e}); launching it through Triton's own path", RuntimeWarning, stacklevel=2)
        _via_triton(fn, grid, args, constexprs, num_warps, num_stages)


def _via_triton(fn: Any, grid: Sequence[int], args: Sequence[Any], constexprs: dict[str, Any], num_warps: int,
                num_stages: int) -> Any:
    """Triton's own launch path (`JITFunction.run`); returns what it returns (the compiled kernel)."""
    return fn[tuple(grid)](*args, **constexprs, num_warps=num_warps, num_stages=num_stages)


def clear() -> None:
    """Forget every cached kernel and refusal (tests; a process that reloads kernels)."""
    _CACHES.clear()
    _REFUSED.clear()
