"""Block sizes for the Pallas grouped-GEMM kernels: defaults, and a JSON cache keyed by shape, dtype and device kind.

`get_config(kind, shape_key, dtype, interpret=...)` returns a hashable `BlockConfig` (it becomes part of the static
arguments of a jitted kernel, so it must be a plain value known at trace time):
- interpret mode (CPU tests): tiny 16/32 blocks, so the interpreter runs few, small programs and the small test
  shapes cross block edges (which is what the masking needs to be tested against);
- GPU, first match wins: (1) the user's tuning cache (`cache_path()`, written by `record`/`sweep`) at the exact key
  (kind, shape, dtype, device kind, KERNEL_VERSION); (2) the shipped table `tuned_configs.json` next to this file
  (same format; benchmarks/pallas_sweep.py writes one) at the exact key, else its entry with the same version, device
  kind, dtype, kind and shape key apart from the leading M bucket whose bucket is nearest on a log scale, else the
  same lookup for a sibling card (`shared_math.tuning.SIBLING_DEVICES`: the H100 for the H200 and back); (3)
  `GPU_DEFAULTS`, UNTUNED starting points.

Kinds: "gemm" (plain NN passes: down, dx, and the skinny dZ1 pass), "gemm_act" (the gate_up pass: two fp32
accumulators, gate and up, plus the LoRA z tile), "gemm_act_bwd" (the dh pass: the act-backward epilogue), "tn"
(ragged-contracting weight gradients). Shape keys start with the M bucket (next power of two of the routed rows).

`BlockConfig.z_pre` (NN kinds with LoRA): compute z = x·A in its own skinny launch first instead of inside the main
reduction loop, where every n-tile program recomputes it (grouped_gemm.py).
`BlockConfig.impl` (NN kinds): the lowering of that pass under the `pallas` backend, "triton" (grouped_gemm.py) or
"mosaic" (mosaic_gemm.py), as measured by benchmarks/pallas_sweep.py for that key; "triton" where unmeasured.
"""

from __future__ import annotations

import itertools
import json
import os
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import jax

from shared_math.tuning import nearest_entry

KERNEL_VERSION = 2  # bump when a kernel changes in a way that could move its best config
CACHE_ENV = "SPLITMOE_PALLAS_TUNE_CACHE"
TUNED_TABLE = Path(__file__).with_name("tuned_configs.json")  # shipped tuned configs (may be absent or {})


@dataclass(frozen=True)
class BlockConfig:
    """Tile sizes. NN kernels: block_m rows x block_n columns, block_d reduction step. TN kernel: block_m rows per
    reduction step, block_n x block_d output tile (P x Q). num_warps/num_stages are Triton compiler parameters.
    z_pre (NN passes with LoRA only): z = x·A by a separate skinny launch (tiles block_m x next_pow2(R), block_d
    steps, same warps/stages) rather than in the main reduction loop; same values, fewer FLOPs when N > block_n."""

    block_m: int
    block_n: int
    block_d: int
    num_warps: int = 4
    num_stages: int = 2
    z_pre: bool = False
    impl: str = "triton"  # NN kinds, under the `pallas` backend: the lowering measured faster ("triton" | "mosaic")


KINDS = ("gemm", "gemm_act", "gemm_act_bwd", "tn")
NN_KINDS = ("gemm", "gemm_act", "gemm_act_bwd")
INTERPRET_CONFIGS: dict[str, BlockConfig] = {
    "gemm": BlockConfig(16, 32, 32),
    "gemm_act": BlockConfig(16, 16, 32),
    "gemm_act_bwd": BlockConfig(16, 32, 32),
    "tn": BlockConfig(16, 32, 32),
}
# UNTUNED starting points for sm90 bf16 (the torch twin starts at the same tiles): 128x128 output tiles with a
# 64-deep reduction step; the gate_up pass holds two accumulators plus the z tile, so it starts at block_n=64.
GPU_DEFAULTS: dict[str, BlockConfig] = {
    "gemm": BlockConfig(128, 128, 64, num_warps=8, num_stages=3),
    "gemm_act": BlockConfig(128, 64, 64, num_warps=8, num_stages=3),
    "gemm_act_bwd": BlockConfig(128, 128, 64, num_warps=8, num_stages=3),
    "tn": BlockConfig(64, 128, 64, num_warps=8, num_stages=3),
}

_memory: dict[tuple, BlockConfig] = {}  # (cache file, shipped table, key) -> config


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
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _config(entry: dict) -> BlockConfig:
    # unknown fields (a newer writer) are ignored; missing ones (an older writer) take their defaults
    return BlockConfig(**{f.name: entry[f.name] for f in fields(BlockConfig) if f.name in entry})


def record(kind: str, shape_key: tuple, dtype, config: BlockConfig, *, dev_kind: str | None = None,
           path: Path | None = None) -> None:
    """Store `config` as the best for this key (atomic rewrite of the JSON file)."""
    path = path or cache_path()
    key = cache_key(kind, shape_key, dtype, dev_kind or device_kind())
    data = _load_disk(path)
    data[key] = asdict(config)
    write_table(path, data)
    for mk in [mk for mk in _memory if mk[0] == str(path)]:
        del _memory[mk]  # the next lookup through this cache file sees the new entry


def write_table(path: Path, data: dict) -> None:
    """Atomically (re)write a config table {cache_key: asdict(BlockConfig)} as JSON."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data, indent=1, sort_keys=True))
    tmp.replace(path)


def get_config(kind: str, shape_key: tuple, dtype, *, interpret: bool, dev_kind: str | None = None,
               path: Path | None = None, tuned_path: Path | None = None) -> BlockConfig:
    """The config for one kernel launch (see the module docstring for the lookup order). `path` overrides the user
    cache file, `tuned_path` the shipped table (tests)."""
    if kind not in KINDS:
        raise KeyError(f"unknown kernel kind {kind!r}; known: {KINDS}")
    if interpret:
        return INTERPRET_CONFIGS[kind]
    path, tuned_path = path or cache_path(), tuned_path or TUNED_TABLE
    key = cache_key(kind, shape_key, dtype, dev_kind or device_kind())
    mk = (str(path), str(tuned_path), key)
    if mk not in _memory:
        found = _load_disk(path).get(key) or nearest_entry(_load_disk(tuned_path), key)
        _memory[mk] = _config(found) if found else GPU_DEFAULTS[kind]
    return _memory[mk]


def candidates(kind: str, elem_bytes: int = 2, smem_bytes: int = 227 * 1024) -> list[BlockConfig]:
    """The sweep space, pruned of configs whose pipelined tiles overflow shared memory (sm90: 227 KiB per block)
    or whose fp32 accumulators exceed ~2 128x128 tiles (register spills)."""
    out = []
    for bm, bn, bd, warps, stages in itertools.product((64, 128), (64, 128, 256), (32, 64, 128), (4, 8), (2, 3, 4)):
        cfg = BlockConfig(bm, bn, bd, warps, stages)
        if fits(kind, cfg, elem_bytes=elem_bytes, smem_bytes=smem_bytes):
            out.append(cfg)
    return out


def fits(kind: str, cfg: BlockConfig, *, rank: int = 64, elem_bytes: int = 2, smem_bytes: int = 227 * 1024) -> bool:
    """Whether `cfg` plausibly compiles for `kind`: its pipelined operand tiles (stages x per-step tiles, plus the
    LoRA-A tile of the in-loop z when not z_pre) fit in shared memory (sm90: 227 KiB per block) and its fp32
    accumulators stay within ~2 128x128 tiles (register spills)."""
    bm, bn, bd = cfg.block_m, cfg.block_n, cfg.block_d
    halves = 2 if kind == "gemm_act" else 1
    if kind == "tn":
        smem = cfg.num_stages * bm * (bn + bd) * elem_bytes
        acc = bn * bd
    else:
        br = 0 if cfg.z_pre else max(16, 1 << max(rank - 1, 0).bit_length())
        smem = cfg.num_stages * (bm * bd + halves * bd * bn + bd * br) * elem_bytes
        acc = halves * bm * bn + bm * br
    return smem <= smem_bytes and acc <= 2 * 128 * 128 + 128 * 64


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
