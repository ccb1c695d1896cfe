"""Timing, memory and reporting helpers shared by the benchmarks (torch side; JAX rows run in a subprocess).

Timing follows the device METHOD: warm up (compilation and autotuning stay out of the numbers), then the median of
many runs between CUDA events. Peak extra memory is the allocator's peak during one step minus what was allocated
before it (weights and inputs), which is what a layer adds to a training step.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import statistics
from collections.abc import Callable
from pathlib import Path


def versions() -> dict:
    out = {"python": platform.python_version()}
    for mod in ("torch", "triton", "transformers", "peft", "jax", "flax"):
        try:
            out[mod] = __import__(mod).__version__
        except Exception:  # noqa: BLE001 - absent or broken packages are simply not reported
            pass
    try:
        import torch

        if torch.cuda.is_available():
            out["device"] = torch.cuda.get_device_name()
    except Exception:  # noqa: BLE001
        pass
    out["date"] = _dt.date.today().isoformat()
    return out | switches()


def switches() -> dict:
    """{"switches": the project's on/off switches set in the environment (SPLITMOE_SINK_LSE=0,
    SPLITMOE_JAX_SINK_LSE=0, SPLITMOE_FAST_LAUNCH=0, ...)}, or {} when none is: a row says which path it timed."""
    found = {k: v for k, v in sorted(os.environ.items()) if k.startswith("SPLITMOE_")}
    return {"switches": found} if found else {}


def time_cuda(step: Callable[[], None], *, warmup: int = 3, iters: int = 20) -> float:
    """Median milliseconds of `step` between CUDA events, after `warmup` untimed calls."""
    import torch

    for _ in range(warmup):
        step()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        step()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def peak_extra_bytes(step: Callable[[], None]) -> int:
    """Allocator peak during one `step` minus the memory allocated before it."""
    import torch

    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    step()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - base


def dense_matmul_tflops(n: int = 8192, iters: int = 20) -> float:
    """The dense bf16 matmul rate measured in this run: the ceiling the grouped GEMMs are compared against."""
    import torch

    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    ms = time_cuda(lambda: a @ b, warmup=3, iters=iters)
    return 2 * n**3 / (ms * 1e-3) / 1e12


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
