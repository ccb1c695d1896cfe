"""Block-size configs for the grouped-GEMM kernels: untuned defaults, and an opt-in autotuner with an on-disk cache.

`get_config(kind, shape_key, dtype, device, bench)` returns a dict of BLOCK_* sizes, num_warps and num_stages.
- Interpreter (CPU, TRITON_INTERPRET=1): tiny blocks (16/32) so the CPU tests stay fast; they also cross block edges
  on the small test shapes, which is what the masking tests need.
- CUDA, tuning off (the default): the entry of the shipped table `tuned_configs.json` (winners of
  `benchmarks/triton_sweep.py` on the GPU named in the key) for this key, or for the same pass and shape at the
  nearest row-count bucket; else the same lookup for a sibling card (`shared_math.tuning.SIBLING_DEVICES`: the
  H100's entries serve an H200 and back; SPLITMOE_TUNED_SIBLINGS=0 turns that off); else `GPU_DEFAULTS`.
- CUDA with `SPLITMOE_TRITON_AUTOTUNE=1`: the first call for a key times a pruned config space with
  `triton.testing.do_bench` on the real arguments (every kernel here is a pure function of its inputs, so re-running
  it is harmless) and stores the winner in a JSON cache keyed by kernel kind, shape, dtype, device name and
  `KERNEL_VERSION`. Tuning runs on the first call only: benchmarks must warm up before they time (they do), so
  tuning never lands inside a timed region. Bump `KERNEL_VERSION` whenever a kernel changes in a way that could move
  its best config. `SPLITMOE_TRITON_AUTOTUNE_SPACE=sweep` narrows the space to the short list the sweep script
  times; `SPLITMOE_TRITON_AUTOTUNE_LOG=path` appends every timing as a JSON line.
- Kinds "hopper_gemm" / "hopper_gemm_act" are the persistent TMA kernel's (hopper.py): their space adds GROUP_M,
  FLATTEN, PRE_GATHER and EPI_SPLIT (the epilogue in column halves), and warp specialisation only with
  `SPLITMOE_HOPPER_WS=1`; their GPU defaults are untuned until `benchmarks/triton_sweep.py --backend
  triton_hopper` has run on the GPU.
- `SPLITMOE_TRITON_COMPILE_SHARD=i/n` (used by the sweep script only): launch each candidate of shard i once, time
  nothing and store nothing, so n processes can fill Triton's on-disk compile cache in parallel before the timing
  process runs.
"""

from __future__ import annotations

import functools
import itertools
import json
import os
from collections.abc import Callable
from pathlib import Path

import torch

from shared_math.tuning import nearest_entry

KERNEL_VERSION = 2  # 2: Z_PRE (precomputed LoRA z) joins the gemm configs

# kind: "gemm" (plain / act-backward epilogue), "gemm_act" (gate_up with two accumulators), "tn" (ragged-K grads);
# "hopper_gemm" / "hopper_gemm_act": the same passes on the persistent TMA kernel (hopper.py).
INTERPRETER_CONFIGS: dict[str, dict] = {
    "gemm": dict(BLOCK_M=16, BLOCK_N=32, BLOCK_D=32),
    "gemm_act": dict(BLOCK_M=16, BLOCK_N=16, BLOCK_D=32),
    "tn": dict(BLOCK_M=16, BLOCK_P=32, BLOCK_Q=32),
    # GROUP_M=2 so the grouped tile order has several groups even on the tiny test shapes
    "hopper_gemm": dict(BLOCK_M=16, BLOCK_N=32, BLOCK_D=32, GROUP_M=2),
    "hopper_gemm_act": dict(BLOCK_M=16, BLOCK_N=16, BLOCK_D=32, GROUP_M=2),
}
# UNTUNED defaults until measured on the H200. 128x128 output tiles with a 64-deep reduction step are the usual
# Hopper starting point for bf16; the gate_up pass holds two accumulators plus the LoRA z tile, so it starts at
# BLOCK_N=64 to stay within registers.
GPU_DEFAULTS: dict[str, dict] = {
    "gemm": dict(BLOCK_M=128, BLOCK_N=128, BLOCK_D=64, num_warps=8, num_stages=3),
    "gemm_act": dict(BLOCK_M=128, BLOCK_N=64, BLOCK_D=64, num_warps=8, num_stages=3),
    "tn": dict(BLOCK_M=64, BLOCK_P=128, BLOCK_Q=64, num_warps=8, num_stages=3),
    # UNTUNED, from the H200 prototype of shared/reference/hopper-grouped-gemm.md section 5 (gate_up shape, W by
    # TMA, gathered X): 128x256x64 / 3 stages / 8 warps ran at 564 TFLOP/s, which two 128x128 accumulators (gate and
    # up) match in size; the plain and dh passes start at 128x128, 4 stages (442 in the prototype without warp
    # specialisation) because the dh epilogue holds gate, up and the accumulator at once. FLATTEN and warp
    # specialisation stay off until the sweep measures them.
    "hopper_gemm": dict(BLOCK_M=128, BLOCK_N=128, BLOCK_D=64, GROUP_M=8, num_warps=8, num_stages=4),
    "hopper_gemm_act": dict(BLOCK_M=128, BLOCK_N=128, BLOCK_D=64, GROUP_M=8, num_warps=8, num_stages=3),
}

_memory_cache: dict[str, dict] = {}
TUNED_TABLE = Path(__file__).with_name("tuned_configs.json")


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def autotune_enabled() -> bool:
    return os.environ.get("SPLITMOE_TRITON_AUTOTUNE", "0") == "1"


def cache_path() -> Path:
    default = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "splitmoe" / "triton_autotune.json"
    return Path(os.environ.get("SPLITMOE_TRITON_AUTOTUNE_CACHE", default))


def _candidates(kind: str, rows_per_expert: float, smem_bytes: int, elem_bytes: int,
                space: str = "full") -> list[dict]:
    """The pruned search space: drop configs whose pipelined tiles overflow shared memory, and row blocks far taller
    than an average expert group (they would mostly compute masked rows). `space="sweep"`: the short list that
    `benchmarks/triton_sweep.py` times (64-deep reduction steps, 3-4 stages)."""
    out = []
    small = space == "sweep"
    if kind == "tn":
        # SPLIT_ROWS (grouped_gemm_tn's split mode, untimed on the GPU so far): N rows per chunk of an expert, offered
        # only where an expert may hold more than N rows (N < 4x the mean: the step's random router loads its busiest
        # expert 1.5-2.4x the mean, session 17). The sweep's short list takes 2048 alone (twice Qwen3-30B's mean at
        # T=16384: uniform routing splits nothing and pays no partials), which at most doubles its "tn" space.
        splits = (0,) + tuple(n for n in ((2048,) if small else (512, 2048)) if n < 4 * rows_per_expert)
        for bm, bp, bq, warps, stages, split in itertools.product(
                (32, 64, 128), (64, 128), (32, 64, 128) if not small else (64, 128), (4, 8),
                (2, 3, 4) if not small else (3,), splits):
            if stages * bm * (bp + bq) * elem_bytes > smem_bytes:
                continue
            cfg = dict(BLOCK_M=bm, BLOCK_P=bp, BLOCK_Q=bq, num_warps=warps, num_stages=stages)
            out.append(dict(cfg, SPLIT_ROWS=split) if split else cfg)
        return out
    if kind.startswith("hopper_"):
        return _hopper_candidates(kind, rows_per_expert, smem_bytes, elem_bytes, small)
    halves = 2 if kind == "gemm_act" else 1
    for bm, bn, bd, warps, stages, zpre in itertools.product(
            (64, 128), (64, 128, 256), (32, 64, 128) if not small else (64,), (4, 8),
            (2, 3, 4) if not small else (3, 4), (False, True)):
        if stages * (bm * bd + halves * bd * bn) * elem_bytes > smem_bytes:
            continue
        if bm > max(64, 2 * rows_per_expert):
            continue
        if halves * bm * bn > 2 * 128 * 128:  # fp32 accumulators beyond ~2 128x128 tiles spill registers
            continue
        if warps == 4 and halves * bm * bn > 128 * 128:  # 4 warps cannot hold that accumulator without spills
            continue
        out.append(dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=bd, num_warps=warps, num_stages=stages, Z_PRE=zpre))
    return out


def _hopper_candidates(kind: str, rows_per_expert: float, smem_bytes: int, elem_bytes: int,
                       small: bool) -> list[dict]:
    """The persistent TMA kernel's space: tiles, stages, warps, FLATTEN, PRE_GATHER (a no-op on passes without a
    gather, which then time the same kernel twice), and warp specialisation only with SPLITMOE_HOPPER_WS=1 (a
    compiler abort on sm_90 kills the tuning process instead of raising; see hopper.py)."""
    halves = 2 if kind == "hopper_gemm_act" else 1
    ws_options = (False, True) if os.environ.get("SPLITMOE_HOPPER_WS", "0") == "1" else (False,)
    out = []
    if small:  # the sweep's short list: 128-row tiles (64 where experts average < 64 rows), 64-deep steps, 8 warps;
        # 64-wide column tiles for the plain passes too: the dh pass's epilogue holds gate, up and the accumulator
        axes = ((128,) if rows_per_expert >= 64 else (64,), (64, 128) if halves == 2 else (64, 128, 256), (64,), (8,),
                (3, 4))
    else:
        axes = ((64, 128), (64, 128, 256), (64, 128), (4, 8), (2, 3, 4, 5))
    for bm, bn, bd, warps, stages, flatten, pre, ws in itertools.product(*axes, (False, True), (False, True),
                                                                         ws_options):
        # pipelined A and W tiles, plus a 32 KB margin (an estimate, not measured) for the epilogue's layout
        # conversions through shared memory
        if stages * (bm * bd + halves * bd * bn) * elem_bytes + 32 * 1024 > smem_bytes:
            continue
        if bm > max(64, 2 * rows_per_expert):
            continue
        if halves * bm * bn > 2 * 128 * 128 or (warps == 4 and halves * bm * bn > 128 * 128):
            continue  # fp32 accumulators past these sizes spill (same rule as the pointer kernel's space)
        if ws and flatten:
            continue  # Hopper warp specialisation rejects flatten (triton tutorial 09)
        # EPI_SPLIT=2 runs the epilogue on one column half at a time (gate, up and h of half a tile live at once):
        # offered from 128-wide tiles up, where the activation epilogue's registers are what a 64-wide tile avoids;
        # quarters (4) in the full space only, for the plain kernel's passes (dh's epilogue is the one that spills)
        for epi in ((1, 2, 4) if bn >= 128 and not small and halves == 1 else (1, 2) if bn >= 128 else (1,)):
            out.append(dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=bd, GROUP_M=8, num_warps=warps, num_stages=stages,
                            FLATTEN=flatten, PRE_GATHER=pre, WS=ws, EPI_SPLIT=epi))
    return out


def cache_key(kind: str, shape_key: tuple, dtype: torch.dtype, device_name: str) -> str:
    return f"v{KERNEL_VERSION}|{device_name}|{str(dtype).replace('torch.', '')}|{kind}|{','.join(map(str, shape_key))}"


def shipped_config(key: str, table: dict | None = None) -> dict | None:
    """The shipped table's entry for `key`, or for the same pass and shape at the nearest row-count bucket, on this
    card or else a sibling card (`shared_math.tuning.nearest_entry`); None when there is none."""
    if table is None:
        try:
            table = json.loads(TUNED_TABLE.read_text())
        except (OSError, ValueError):
            return None
    found = nearest_entry(table, key)
    return None if found is None else dict(found)


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
    """The config for one kernel launch; see the module docstring for the regimes."""
    if kind not in INTERPRETER_CONFIGS:
        raise KeyError(f"unknown kernel kind {kind!r}")
    if device.type != "cuda":
        return dict(INTERPRETER_CONFIGS[kind])
    key = cache_key(kind, shape_key, dtype, _device_name(device))
    shard = os.environ.get("SPLITMOE_TRITON_COMPILE_SHARD")
    if shard and bench is not None:
        _compile_shard(kind, shard, rows_per_expert, dtype, device, bench)
        return dict(GPU_DEFAULTS[kind])
    if not autotune_enabled() or bench is None:
        if key not in _memory_cache:
            _memory_cache[key] = shipped_config(key) or dict(GPU_DEFAULTS[kind])
        return dict(_memory_cache[key])
    tuned_key = "tuned|" + key
    if tuned_key in _memory_cache:
        return dict(_memory_cache[tuned_key])
    disk = _load_disk()
    if key in disk:
        _memory_cache[tuned_key] = disk[key]
        return dict(disk[key])
    import triton.testing

    log = os.environ.get("SPLITMOE_TRITON_AUTOTUNE_LOG")
    best, best_ms = dict(GPU_DEFAULTS[kind]), float("inf")
    for cfg in _space(kind, rows_per_expert, dtype, device):
        try:
            ms = triton.testing.do_bench(lambda cfg=cfg: bench(cfg), warmup=5, rep=20)
        except Exception as e:  # noqa: BLE001 - a config that fails to compile (resources) is not a candidate
            ms, err = float("inf"), f"{type(e).__name__}: {str(e)[:200]}"
        else:
            err = None
        if log:
            with open(log, "a") as f:
                f.write(json.dumps(dict(key=key, config=cfg, ms=None if err else ms, error=err)) + "\n")
        if ms < best_ms:
            best, best_ms = cfg, ms
    _memory_cache[tuned_key] = best
    _store_disk(key, best)
    return dict(best)


@functools.cache
def _device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device)


def _space(kind: str, rows_per_expert: float, dtype: torch.dtype, device: torch.device) -> list[dict]:
    props = torch.cuda.get_device_properties(device)
    smem = getattr(props, "shared_memory_per_block_optin", 163 * 1024)
    elem = torch.tensor([], dtype=dtype).element_size()
    return _candidates(kind, rows_per_expert, smem, elem, os.environ.get("SPLITMOE_TRITON_AUTOTUNE_SPACE", "full"))


def _compile_shard(kind: str, shard: str, rows_per_expert: float, dtype: torch.dtype, device: torch.device,
                   bench: Callable[[dict], None]) -> None:
    i, n = (int(v) for v in shard.split("/"))
    for j, cfg in enumerate(_space(kind, rows_per_expert, dtype, device)):
        if j % n == i:
            try:
                bench(cfg)
            except Exception:  # noqa: BLE001 - the timing process skips it as well
                pass
