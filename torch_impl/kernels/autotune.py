"""Block-size configs for the grouped-GEMM kernels: untuned defaults, and an opt-in autotuner with an on-disk cache.

`get_config(kind, shape_key, dtype, device, bench)` returns a dict of BLOCK_* sizes, num_warps and num_stages.
- Interpreter (CPU, TRITON_INTERPRET=1): tiny blocks (16/32) so the CPU tests stay fast; they also cross block edges
  on the small test shapes, which is what the masking tests need.
- CUDA, tuning off (the default): `GPU_DEFAULTS`. These are UNTUNED defaults until measured on the H200.
- CUDA with `SPLITMOE_TRITON_AUTOTUNE=1`: the first call for a key times a pruned config space with
  `triton.testing.do_bench` on the real arguments (every kernel here is a pure function of its inputs, so re-running
  it is harmless) and stores the winner in a JSON cache keyed by kernel kind, shape, dtype, device name and
  `KERNEL_VERSION`. Tuning runs on the first call only: benchmarks must warm up before they time (they do), so
  tuning never lands inside a timed region. Bump `KERNEL_VERSION` whenever a kernel changes in a way that could move
  its best config.
"""

from __future__ import annotations

import itertools
import json
import os
from collections.abc import Callable
from pathlib import Path

import torch

KERNEL_VERSION = 1

# kind: "gemm" (plain / act-backward epilogue), "gemm_act" (gate_up with two accumulators), "tn" (ragged-K grads).
INTERPRETER_CONFIGS: dict[str, dict] = {
    "gemm": dict(BLOCK_M=16, BLOCK_N=32, BLOCK_D=32),
    "gemm_act": dict(BLOCK_M=16, BLOCK_N=16, BLOCK_D=32),
    "tn": dict(BLOCK_M=16, BLOCK_P=32, BLOCK_Q=32),
}
# UNTUNED defaults until measured on the H200. 128x128 output tiles with a 64-deep reduction step are the usual
# Hopper starting point for bf16; the gate_up pass holds two accumulators plus the LoRA z tile, so it starts at
# BLOCK_N=64 to stay within registers.
GPU_DEFAULTS: dict[str, dict] = {
    "gemm": dict(BLOCK_M=128, BLOCK_N=128, BLOCK_D=64, num_warps=8, num_stages=3),
    "gemm_act": dict(BLOCK_M=128, BLOCK_N=64, BLOCK_D=64, num_warps=8, num_stages=3),
    "tn": dict(BLOCK_M=64, BLOCK_P=128, BLOCK_Q=64, num_warps=8, num_stages=3),
}

_memory_cache: dict[str, dict] = {}


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def autotune_enabled() -> bool:
    return os.environ.get("SPLITMOE_TRITON_AUTOTUNE", "0") == "1"


def cache_path() -> Path:
    default = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "splitmoe" / "triton_autotune.json"
    return Path(os.environ.get("SPLITMOE_TRITON_AUTOTUNE_CACHE", default))


def _candidates(kind: str, rows_per_expert: float, smem_bytes: int, elem_bytes: int) -> list[dict]:
    """The pruned search space: drop configs whose pipelined tiles overflow shared memory, and row blocks far taller
    than an average expert group (they would mostly compute masked rows)."""
    out = []
    if kind == "tn":
        for bm, bp, bq, warps, stages in itertools.product((32, 64, 128), (64, 128), (32, 64, 128), (4, 8), (2, 3, 4)):
            if stages * bm * (bp + bq) * elem_bytes > smem_bytes:
                continue
            out.append(dict(BLOCK_M=bm, BLOCK_P=bp, BLOCK_Q=bq, num_warps=warps, num_stages=stages))
        return out
    halves = 2 if kind == "gemm_act" else 1
    for bm, bn, bd, warps, stages in itertools.product((64, 128), (64, 128, 256), (32, 64, 128), (4, 8), (2, 3, 4)):
        if stages * (bm * bd + halves * bd * bn) * elem_bytes > smem_bytes:
            continue
        if bm > max(64, 2 * rows_per_expert):
            continue
        if halves * bm * bn > 2 * 128 * 128:  # fp32 accumulators beyond ~2 128x128 tiles spill registers
            continue
        out.append(dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=bd, num_warps=warps, num_stages=stages))
    return out


def _load_disk() -> dict:
    p = cache_path()
    try:
        return json.loads(p.read_text())
    except (OSError, ValueError):
        return {}


def _store_disk(key: str, cfg: dict) -> None:
    p = cache_path()
    p.parent.mkdir(parents=True, exist_ok=True)
    data = _load_disk()
    data[key] = cfg
    tmp = p.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data, indent=1, sort_keys=True))
    tmp.replace(p)  # atomic: concurrent processes never see a half-written cache


def get_config(kind: str, shape_key: tuple, dtype: torch.dtype, device: torch.device,
               bench: Callable[[dict], None] | None = None, rows_per_expert: float = 1e9) -> dict:
    """The config for one kernel launch; see the module docstring for the three regimes."""
    if kind not in INTERPRETER_CONFIGS:
        raise KeyError(f"unknown kernel kind {kind!r}")
    if device.type != "cuda":
        return dict(INTERPRETER_CONFIGS[kind])
    if not autotune_enabled() or bench is None:
        return dict(GPU_DEFAULTS[kind])
    name = torch.cuda.get_device_name(device)
    key = f"v{KERNEL_VERSION}|{name}|{str(dtype).replace('torch.', '')}|{kind}|{','.join(map(str, shape_key))}"
    if key in _memory_cache:
        return dict(_memory_cache[key])
    disk = _load_disk()
    if key in disk:
        _memory_cache[key] = disk[key]
        return dict(disk[key])
    import triton.testing

    props = torch.cuda.get_device_properties(device)
    smem = getattr(props, "shared_memory_per_block_optin", 163 * 1024)
    elem = torch.tensor([], dtype=dtype).element_size()
    best, best_ms = dict(GPU_DEFAULTS[kind]), float("inf")
    for cfg in _candidates(kind, rows_per_expert, smem, elem):
        try:
            ms = triton.testing.do_bench(lambda cfg=cfg: bench(cfg), warmup=5, rep=20)
        except Exception:  # noqa: BLE001 - a config that fails to compile (resources) is simply not a candidate
            continue
        if ms < best_ms:
            best, best_ms = cfg, ms
    _memory_cache[key] = best
    _store_disk(key, best)
    return dict(best)
