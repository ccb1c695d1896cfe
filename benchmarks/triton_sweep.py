"""Tune the Triton kernels' block sizes on the GPU and write the winners as `torch_impl/kernels/tuned_configs.json`.

For each benchmark case (shared_math.cases, "bench" tag) it runs the `triton` backend's forward + backward once with
the autotuner on (`SPLITMOE_TRITON_AUTOTUNE=1`, the short "sweep" space): every kernel launch of the step (gate_up,
down, dh, dx, and the ragged-K LoRA gradients) times its candidates on its real arguments, including whether the
LoRA z is computed in the base GEMM's loop or precomputed (Z_PRE). Then, per case, the whole step is timed with the
tuned configs and with the untuned GPU_DEFAULTS, and a CUDA-kernel profile of the tuned step is written.

Compilation dominates a cold sweep (hundreds of kernel variants), so phase 1 spreads it over `--compile-procs`
processes that launch each candidate once and time nothing (SPLITMOE_TRITON_COMPILE_SHARD) into a shared Triton
cache; phase 2, in one process, only loads them and times.

    python benchmarks/triton_sweep.py --out OUT_DIR [--cases qwen3_30b_T1024,...] [--compile-procs 12]
    python benchmarks/triton_sweep.py --backend triton_hopper --out OUT_DIR    # the Hopper kernels (issue 16)
    python benchmarks/triton_sweep.py --backend hopper_base --out OUT_DIR      # base-only gate_up vs _grouped_mm
Writes OUT_DIR/{tuned_configs.json, timings.jsonl, steps.jsonl, steps.md, profile_<case>.txt} (hopper_base:
base_only.jsonl in place of the steps and profiles). Copy
tuned_configs.json over torch_impl/kernels/tuned_configs.json to ship it (keys carry the device name); a
triton_hopper sweep writes "hopper_gemm*" and "tn" keys, so merge its entries into the shipped table rather than
replacing it. `--backend triton_hopper` defaults to HOPPER_CASES: Qwen3-30B-A3B, gpt-oss-20b, GLM-4.5 and
GLM-4.7-Flash experts at r=16/32/64/128, T=1024 and 16384. Warp-specialised candidates join only with
SPLITMOE_HOPPER_WS=1 (torch_impl/kernels/autotune.py says why).

`--backend hopper_base` tunes the Hopper kernel's base-only gate_up GEMM (no LoRA, no activation; moe_block's
`gemm_gate_up_hopper` rows gathered in the load, `gemm_gate_up_hopper_sorted` on pre-sorted rows: config keys
"base_gu" and "base_gu_sorted") on BASE_CASES, and phase 3 times both, default against tuned, next to
`torch._grouped_mm` on the same sorted rows in the same process: issue 16's "base-only gate_up at or above
`_grouped_mm`'s rate". Those keys have no shipped entry, so the rows so far ran the untuned 128x128x64 / 4-stage
default (Qwen3 427 TFLOP/s against `_grouped_mm`'s 639 on an H100, session 22), where the H200 prototype of
shared/reference/hopper-grouped-gemm.md ran 442 at that tile and 564 at 128x256x64 / 3 stages.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

DEFAULT_CASES = ("qwen3_30b_T1024,qwen3_30b_T4096,qwen3_30b_T16384,qwen3_30b_T65536,qwen3_30b_r16_T1024,"
                 "qwen3_30b_r16_T16384,gpt_oss_20b_T1024,gpt_oss_20b_T16384,gpt_oss_20b_r16_T16384")
HOPPER_CASES = ",".join(
    f"{fam}_{'' if r == 64 else f'r{r}_'}T{t}" for fam in ("qwen3_30b", "gpt_oss_20b", "glm45", "glm47_flash")
    for r in (16, 32, 64, 128) for t in (1024, 16384))
BASE_CASES = "qwen3_30b_T16384,gpt_oss_20b_T16384"
BACKENDS = ("triton", "triton_hopper", "hopper_base")
BASE_IMPLS = ("hopper", "hopper_sorted")  # moe_block.gate_up_gemm_runner's Hopper variants


def _step(case_name: str, backend: str):
    from benchmarks.moe_block import _split_step, gate_up_gemm_runner, make_inputs
    from shared_math.cases import get_case

    c = get_case(case_name)
    if backend == "hopper_base":
        # each runner's construction looks its config up (and with the autotuner on, tunes or compiles its key)
        runs = [gate_up_gemm_runner(c, impl) for impl in BASE_IMPLS]
        return lambda: [run() for run in runs]
    return _split_step(c, make_inputs(c), backend)


def _time_base_only(cases: list[str]) -> list[dict]:
    """Phase 3 of `--backend hopper_base`: per case, `torch._grouped_mm` and each base-only Hopper variant with the
    untuned default and with the tuned config (the tuner's cache), ms and TFLOP/s of the gate_up GEMM, and the
    config the tuner chose."""
    import torch

    from benchmarks.common import time_cuda
    from benchmarks.moe_block import gate_up_gemm_runner, pass_flops
    from shared_math.cases import get_case
    from torch_impl.kernels import autotune

    rows = []
    for name in cases:
        c = get_case(name)
        flops = pass_flops(c, "gate_up")
        gmm_ms = time_cuda(gate_up_gemm_runner(c, "grouped_mm"), warmup=3, iters=15)
        row = dict(case=name, backend="hopper_base", grouped_mm_ms=gmm_ms, grouped_mm_tflops=flops / gmm_ms / 1e9)
        for impl in BASE_IMPLS:
            for label in ("default", "tuned"):
                with _config_regime(label):
                    ms = time_cuda(gate_up_gemm_runner(c, impl), warmup=3, iters=15)
                row[f"{impl}_{label}_ms"] = ms
                row[f"{impl}_{label}_tflops"] = flops / ms / 1e9
                if label == "tuned":
                    row[f"{impl}_config"] = next((v for k, v in autotune._memory_cache.items()
                                                  if k.startswith("tuned|")), None)
        print(f"  {name}: _grouped_mm {row['grouped_mm_tflops']:.0f} TFLOP/s; " + "; ".join(
            f"{impl} {row[f'{impl}_default_tflops']:.0f} -> {row[f'{impl}_tuned_tflops']:.0f} tuned "
            f"({row[f'{impl}_tuned_tflops'] / row['grouped_mm_tflops']:.0%} of it)" for impl in BASE_IMPLS), flush=True)
        rows.append(row)
        torch.cuda.empty_cache()
    return rows


def _child(cases: list[str], backend: str) -> int:
    """One process of phase 1 (compile shard) or 2 (tune): a step per case; the env decides what get_config does."""
    import torch

    shard = os.environ.get("SPLITMOE_TRITON_COMPILE_SHARD")
    for name in cases:
        t0 = time.time()
        try:
            step = _step(name, backend)
            step()
        except torch.OutOfMemoryError:
            if shard is None:  # the tuning process has the GPU to itself: out of memory there is a real failure
                raise
            # phase 1 runs --compile-procs processes on one GPU, each holding a case's inputs (GLM-4.5's experts are
            # 15 GiB with the fp32 draw): on an 80 GB card some of them cannot. Their kernels are only compiled
            # ahead here; phase 2 compiles what is missing before it times it, so skip the case, keep the shard
            print(f"    [{shard}] {name}: skipped, out of memory beside the other compile processes (phase 2 "
                  "compiles its kernels)", flush=True)
            torch.cuda.empty_cache()
            continue
        torch.cuda.synchronize()
        print(f"    [{os.environ.get('SPLITMOE_TRITON_COMPILE_SHARD', 'tune')}] {name}: {time.time() - t0:.0f} s",
              flush=True)
        del step
        torch.cuda.empty_cache()
    return 0


@contextlib.contextmanager
def _config_regime(label: str):
    """Launches inside look their configs up as `label` says: "default", the untuned GPU_DEFAULTS (the shipped table
    hidden: it may hold an older sweep); "tuned", the tuner's cache of this sweep. The table is restored after."""
    from torch_impl.kernels import autotune

    os.environ["SPLITMOE_TRITON_AUTOTUNE"] = "1" if label == "tuned" else "0"
    os.environ.pop("SPLITMOE_TRITON_AUTOTUNE_LOG", None)
    autotune._memory_cache.clear()
    saved = autotune.TUNED_TABLE
    if label == "default":
        autotune.TUNED_TABLE = Path("/nonexistent")
    try:
        yield
    finally:
        autotune.TUNED_TABLE = saved


def _time_steps(cases: list[str], out: Path, backend: str) -> list[dict]:
    """Whole forward+backward with the tuned configs (the tuner's cache) and with GPU_DEFAULTS, plus a profile."""
    import torch

    from benchmarks.common import peak_extra_bytes, time_cuda
    from benchmarks.moe_block import base_flops
    from shared_math.cases import get_case

    rows = []
    for name in cases:
        c = get_case(name)
        step = _step(name, backend)
        row = dict(case=name, backend=backend)
        for label in ("default", "tuned"):
            with _config_regime(label):
                step()
                row[f"{label}_ms"] = time_cuda(step, warmup=3, iters=15)
                row[f"{label}_peak_gib"] = peak_extra_bytes(step) / 2**30
        row["tuned_tflops_base"] = base_flops(c) / (row["tuned_ms"] * 1e-3) / 1e12
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA,
                                                torch.profiler.ProfilerActivity.CPU]) as prof:
            for _ in range(3):
                step()
            torch.cuda.synchronize()
        (out / f"profile_{name}.txt").write_text(
            prof.key_averages().table(sort_by="cuda_time_total", row_limit=30, max_name_column_width=60))
        print(f"  {name}: default {row['default_ms']:.3f} ms, tuned {row['tuned_ms']:.3f} ms "
              f"({row['tuned_tflops_base']:.0f} TFLOP/s base), peak +{row['tuned_peak_gib']:.2f} GiB", flush=True)
        rows.append(row)
        del step
        torch.cuda.empty_cache()
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--cases", default=None, help="default: DEFAULT_CASES, HOPPER_CASES for triton_hopper, "
                                                   "BASE_CASES for hopper_base")
    p.add_argument("--backend", default="triton", choices=BACKENDS)
    p.add_argument("--compile-procs", type=int, default=12)
    p.add_argument("--space", default="sweep", choices=("sweep", "full"))
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    a.cases = a.cases or {"triton_hopper": HOPPER_CASES, "hopper_base": BASE_CASES}.get(a.backend, DEFAULT_CASES)
    cases = a.cases.split(",")
    if a.child:
        return _child(cases, a.backend)
    a.out.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, SPLITMOE_TRITON_AUTOTUNE="1", SPLITMOE_TRITON_AUTOTUNE_SPACE=a.space,
               SPLITMOE_TRITON_AUTOTUNE_CACHE=str(a.out / "tuned_configs.json"),
               SPLITMOE_TRITON_AUTOTUNE_LOG=str(a.out / "timings.jsonl"), PYTHONUNBUFFERED="1")
    for f in ("tuned_configs.json", "timings.jsonl"):
        (a.out / f).unlink(missing_ok=True)
    cmd = [sys.executable, __file__, "--out", str(a.out), "--cases", a.cases, "--backend", a.backend, "--child"]
    t0 = time.time()
    print(f"phase 1: compile the candidates in {a.compile_procs} processes", flush=True)
    procs = [subprocess.Popen(cmd, env=dict(env, SPLITMOE_TRITON_COMPILE_SHARD=f"{i}/{a.compile_procs}"))
             for i in range(a.compile_procs)]
    for proc in procs:
        proc.wait()
    print(f"phase 1 done in {time.time() - t0:.0f} s; phase 2: tune", flush=True)
    subprocess.run(cmd, env=env, check=True)
    print(f"phase 2 done at {time.time() - t0:.0f} s; phase 3: whole steps, default vs tuned", flush=True)
    os.environ.update(SPLITMOE_TRITON_AUTOTUNE_CACHE=env["SPLITMOE_TRITON_AUTOTUNE_CACHE"])
    if a.backend == "hopper_base":
        rows = _time_base_only(cases)
        with open(a.out / "base_only.jsonl", "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
        print(f"total {time.time() - t0:.0f} s", flush=True)
        return 0
    rows = _time_steps(cases, a.out, a.backend)
    with open(a.out / "steps.jsonl", "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    lines = ["| case | default ms | tuned ms | speed-up | tuned base TFLOP/s | peak extra GiB |",
             "| --- | --- | --- | --- | --- | --- |"]
    lines += [f"| {r['case']} | {r['default_ms']:.3f} | {r['tuned_ms']:.3f} | {r['default_ms'] / r['tuned_ms']:.2f} "
              f"| {r['tuned_tflops_base']:.0f} | {r['tuned_peak_gib']:.2f} |" for r in rows]
    (a.out / "steps.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    print(f"total {time.time() - t0:.0f} s", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
