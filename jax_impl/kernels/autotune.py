"""Block sizes for the Pallas grouped-GEMM kernels: defaults, and a JSON cache keyed by shape, dtype and device kind.

`get_config(kind, shape_key, dtype, interpret=...)` returns a hashable `BlockConfig` (it becomes part of the static
arguments of a jitted kernel, so it must be a plain value known at trace time):
- interpret mode (CPU tests): tiny 16/32 blocks, so the interpreter runs few, small programs and the small test
  shapes cross block edges (which is what the masking needs to be tested against);
- GPU: the entry of the tuning cache for (kind, shape, dtype, device kind, KERNEL_VERSION) if one was recorded by
  `sweep`, else `GPU_DEFAULTS`, which are UNTUNED until measured on the H200.

Kinds: "gemm" (plain NN pass and the act-backward epilogue pass), "gemm_act" (the gate_up pass: two fp32
accumulators, gate and up, plus the LoRA z tile), "tn" (ragged-contracting weight gradients).
"""

from __future__ import annotations

import itertools
import json
import os
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from pathlib import Path

import jax

KERNEL_VERSION = 1  # bump when a kernel changes in a way that could move its best config
CACHE_ENV = "SPLITMOE_PALLAS_TUNE_CACHE"


@dataclass(frozen=True)
class BlockConfig:
    """Tile sizes. NN kernels: block_m rows x block_n columns, block_d reduction step. TN kernel: block_m rows per
    reduction step, block_n x block_d output tile (P x Q). num_warps/num_stages are Triton compiler parameters."""

    block_m: int
    block_n: int
    block_d: int
    num_warps: int = 4
    num_stages: int = 2


KINDS = ("gemm", "gemm_act", "tn")
INTERPRET_CONFIGS: dict[str, BlockConfig] = {
    "gemm": BlockConfig(16, 32, 32),
    "gemm_act": BlockConfig(16, 16, 32),
    "tn": BlockConfig(16, 32, 32),
}
# UNTUNED starting points for sm90 bf16 (the torch twin starts at the same tiles): 128x128 output tiles with a
# 64-deep reduction step; the gate_up pass holds two accumulators plus the z tile, so it starts at block_n=64.
GPU_DEFAULTS: dict[str, BlockConfig] = {
    "gemm": BlockConfig(128, 128, 64, num_warps=8, num_stages=3),
    "gemm_act": BlockConfig(128, 64, 64, num_warps=8, num_stages=3),
    "tn": BlockConfig(64, 128, 64, num_warps=8, num_stages=3),
}

_memory: dict[str, BlockConfig] = {}


def device_kind() -> str:
    """e.g. 'nvidia_h200' (lower case, spaces to underscores), the key tokamax's caches use too."""
    return jax.devices()[0].device_kind.lower().replace(" ", "_").replace("-", "_")


def cache_path() -> Path:
    default = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "splitmoe" / "pallas_tuning.json"
    return Path(os.environ.get(CACHE_ENV, default))


def cache_key(kind: str, shape_key: tuple, dtype, dev_kind: str) -> str:
    return f"v{KERNEL_VERSION}|{dev_kind}|{jax.numpy.dtype(dtype).name}|{kind}|{','.join(map(str, shape_key))}"


def _load_disk(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def record(kind: str, shape_key: tuple, dtype, config: BlockConfig, *, dev_kind: str | None = None,
           path: Path | None = None) -> None:
    """Store `config` as the best for this key (atomic rewrite of the JSON file)."""
    path = path or cache_path()
    key = cache_key(kind, shape_key, dtype, dev_kind or device_kind())
    path.parent.mkdir(parents=True, exist_ok=True)
    data = _load_disk(path)
    data[key] = asdict(config)
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data, indent=1, sort_keys=True))
    tmp.replace(path)
    _memory[key] = config


def get_config(kind: str, shape_key: tuple, dtype, *, interpret: bool, dev_kind: str | None = None,
               path: Path | None = None) -> BlockConfig:
    """The config for one kernel launch (see the module docstring)."""
    if kind not in KINDS:
        raise KeyError(f"unknown kernel kind {kind!r}; known: {KINDS}")
    if interpret:
        return INTERPRET_CONFIGS[kind]
    key = cache_key(kind, shape_key, dtype, dev_kind or device_kind())
    if key not in _memory:
        found = _load_disk(path or cache_path()).get(key)
        _memory[key] = BlockConfig(**found) if found else GPU_DEFAULTS[kind]
    return _memory[key]


def candidates(kind: str, elem_bytes: int = 2, smem_bytes: int = 227 * 1024) -> list[BlockConfig]:
    """The sweep space, pruned of configs whose pipelined tiles overflow shared memory (sm90: 227 KiB per block)
    or whose fp32 accumulators exceed ~2 128x128 tiles (register spills)."""
    out = []
    halves = 2 if kind == "gemm_act" else 1
    for bm, bn, bd, warps, stages in itertools.product((64, 128), (64, 128, 256), (32, 64, 128), (4, 8), (2, 3, 4)):
        if kind == "tn":
            smem = stages * bm * (bn + bd) * elem_bytes
        else:
            smem = stages * (bm * bd + halves * bd * bn) * elem_bytes
        if smem > smem_bytes or halves * bm * bn > 2 * 128 * 128:
            continue
        out.append(BlockConfig(bm, bn, bd, warps, stages))
    return out


def sweep(kind: str, shape_key: tuple, dtype, run: Callable[[BlockConfig], object],
          configs: Iterable[BlockConfig] | None = None, reps: int = 10) -> tuple[BlockConfig, float]:
    """Time `run(config)` (a jitted call returning arrays) for each config on the GPU, record and return the best
    (config, seconds). Configs that fail to compile (resources) are skipped. Never call this inside jit."""
    best, best_s = GPU_DEFAULTS[kind], float("inf")
    for cfg in configs if configs is not None else candidates(kind):
        try:
            jax.block_until_ready(run(cfg))  # compile + warm up
            t0 = time.perf_counter()
            for _ in range(reps):
                out = run(cfg)
            jax.block_until_ready(out)
            s = (time.perf_counter() - t0) / reps
        except Exception:  # noqa: BLE001 - a config the compiler rejects is simply not a candidate
            continue
        if s < best_s:
            best, best_s = cfg, s
    record(kind, shape_key, dtype, best)
    return best, best_s
