"""Host cost of one MoE layer's expert path, eager: what the CPU spends per forward and backward call, and on what.

    python benchmarks/host_probe.py --out host_probe.jsonl --profile-out host_probe_cprofile.txt   # GPU, < 60 s
    python benchmarks/host_probe.py --device cpu --dtype float32 --seq 64 --backends native         # CPU smoke run

The whole-step profiles (benchmarks/REPORT.md, 2026-12-05) say the Qwen3-30B-A3B step at 4K is host-bound: the
expert Function alone takes about 1.7 ms of host time per forward call and 2.1 ms per backward call, against
0.9 / 1.6 ms of GPU time. This probe takes the path a decoder layer runs (`torch_impl.moe.sort_by_expert`, then
`torch_impl.moe.split_lora_experts` with fp32 LoRA masters, then the backward of sum(y·dy)) on Qwen3-30B-A3B's
expert shapes and reports, per backend and length:
- `fwd_host_us` / `bwd_host_us`: the median time until the call returns to Python, with the GPU's queue kept short
  (one synchronise per iteration, before the timer starts): where the GPU work is small (short sequences) this is the
  host's own cost; `iter_ms`: the synchronised time of forward + backward;
- `aten_ops_fwd` / `aten_ops_bwd`: aten ops dispatched from Python per call (counted by a TorchDispatchMode, so
  ops inside other ops are not counted), and `triton_launches_fwd` / `_bwd`: Triton kernel launches;
- `launch_us`: the host time of one launch of the persistent Hopper GEMM alone (gate_up pass's arguments), and
  `aten_op_us` of one small aten op (an in-place add), as units.
`--profile-out` writes cProfile's top functions by own time over the timed iterations of the first backend/length.

`--host-only` (CPU): the Triton launches of the `triton` / `triton_hopper` paths become no-ops (under the
interpreter, which this sets), so their host code (sorts, schedules, casts, allocations, autograd) is timed and
counted on a machine without a GPU; the values computed are meaningless, the op counts and host times are not.

    python benchmarks/host_probe.py --host-only --device cpu --dtype float16 --backends triton_hopper \
        --seq 16 --experts 8 --hidden 32 --inter 16 --top-k 2 --rank 4 --iters 2000
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import cProfile
import io
import json
import pstats
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402

from benchmarks.common import versions  # noqa: E402


class _CountOps(TorchDispatchMode):
    """Counts the aten ops dispatched while active (top level only: a mode sees what Python dispatches)."""

    def __init__(self) -> None:
        super().__init__()
        self.counts: collections.Counter[str] = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.counts[str(func.overloadpacket.__name__)] += 1
        return func(*args, **(kwargs or {}))


@contextlib.contextmanager
def _count_triton_launches():
    """Counts `JITFunction.run` calls (every `kernel[grid](...)` goes through it) while active."""
    box = [0]
    try:
        from triton.runtime.jit import JITFunction
    except ImportError:
        yield box
        return
    original = JITFunction.run

    def counted(self, *args, **kwargs):
        box[0] += 1
        return original(self, *args, **kwargs)

    JITFunction.run = counted
    try:
        yield box
    finally:
        JITFunction.run = original


def make_inputs(T: int, a: argparse.Namespace) -> dict:
    """Qwen3-30B-A3B expert shapes (or --hidden/--inter/--experts/--top-k), random routing, fp32 LoRA masters."""
    g = torch.Generator(device="cpu").manual_seed(0)
    dev, dt = torch.device(a.device), getattr(torch, a.dtype)
    E, H, I, K, R = a.experts, a.hidden, a.inter, a.top_k, a.rank

    def rnd(*shape, scale=0.02, dtype=dt, grad=False):
        t = (torch.randn(*shape, generator=g) * scale).to(device=dev, dtype=dtype)
        return t.requires_grad_(grad)

    logits = torch.randn(T, E, generator=g)
    weights, ids = torch.topk(logits.softmax(-1), K, dim=-1)
    return dict(x=rnd(T, H, scale=1.0, grad=True), ids=ids.to(dev), w=weights.to(device=dev, dtype=dt),
                w_gu=rnd(E, H, 2 * I), w_d=rnd(E, I, H),
                lora_gu=(rnd(E, H, R, dtype=torch.float32, grad=True),
                         rnd(E, R, 2 * I, dtype=torch.float32, grad=True)),
                lora_d=(rnd(E, I, R, dtype=torch.float32, grad=True), rnd(E, R, H, dtype=torch.float32, grad=True)),
                dy=rnd(T, H, scale=1.0), num_experts=E)


def layer_forward(inp: dict, backend: str) -> torch.Tensor:
    """What `MoEBlock` + `Experts` run for the routed experts of one layer: the sort, then the split-LoRA experts."""
    from torch_impl.moe import sort_by_expert, split_lora_experts

    srt = sort_by_expert(inp["ids"], inp["num_experts"], check=False)
    return split_lora_experts(inp["x"], inp["ids"], inp["w"], inp["w_gu"], inp["w_d"], inp["lora_gu"],
                              inp["lora_d"], scale=2.0, backend=backend, sort=srt)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def probe(T: int, backend: str, a: argparse.Namespace, profiler: cProfile.Profile | None) -> dict:
    dev = torch.device(a.device)
    inp = make_inputs(T, a)
    for _ in range(a.warmup):
        layer_forward(inp, backend).backward(inp["dy"])
    fwd_us, bwd_us, iter_ms = [], [], []
    for _ in range(a.iters):
        _sync(dev)
        t0 = time.perf_counter()
        if profiler:
            profiler.enable()
        y = layer_forward(inp, backend)
        t1 = time.perf_counter()
        y.backward(inp["dy"])
        t2 = time.perf_counter()
        if profiler:
            profiler.disable()
        _sync(dev)
        t3 = time.perf_counter()
        fwd_us.append((t1 - t0) * 1e6)
        bwd_us.append((t2 - t1) * 1e6)
        iter_ms.append((t3 - t0) * 1e3)
    counts = {}
    for phase in ("fwd", "bwd"):
        with _count_triton_launches() as launches:
            if phase == "fwd":
                with _CountOps() as mode:
                    y = layer_forward(inp, backend)
            else:
                y = layer_forward(inp, backend)
                with _CountOps() as mode:  # the autograd engine carries the mode to its device thread
                    y.backward(inp["dy"])
        counts[f"aten_ops_{phase}"] = sum(mode.counts.values())
        counts[f"top_ops_{phase}"] = dict(mode.counts.most_common(12))
        counts[f"triton_launches_{phase}"] = launches[0]
    return dict(backend=backend, seq=T, fwd_host_us=round(statistics.median(fwd_us), 1),
                bwd_host_us=round(statistics.median(bwd_us), 1), iter_ms=round(statistics.median(iter_ms), 3),
                **counts)


def unit_costs(a: argparse.Namespace) -> dict:
    """Host time of one small aten op, and of one launch of the Hopper GEMM (gate_up arguments) where it runs."""
    dev = torch.device(a.device)
    t = torch.zeros(16, device=dev)
    for _ in range(10):
        t.add_(1)
    _sync(dev)
    n = 2000
    t0 = time.perf_counter()
    for _ in range(n):
        t.add_(1)
    out = dict(aten_op_us=round((time.perf_counter() - t0) / n * 1e6, 2))
    _sync(dev)
    if dev.type != "cuda":
        return out
    from torch_impl.backends import triton_hopper
    if triton_hopper.available(dev, getattr(torch, a.dtype)) is not None:
        return out
    from torch_impl.kernels import autotune, hopper
    from torch_impl.kernels import grouped_gemm as gg
    from torch_impl.kernels.split_lora import KernelSort

    inp = make_inputs(256, a)
    srt = KernelSort.from_ids(inp["ids"], a.experts)
    x = inp["x"].detach()
    # the gate_up pass's own key (split_lora's `_gemm`), without LoRA: the config a layer's launch gets
    cfg = autotune.get_config("hopper_gemm_act", (gg.next_pow2(srt.M), "gu", a.hidden, a.inter, 0, gg.ACT_SWIGLU),
                              x.dtype, dev)
    sched = srt.schedule(cfg["BLOCK_M"]) + (srt.row_tile_count(cfg["BLOCK_M"]),)
    h = torch.empty((srt.M, a.inter), device=dev, dtype=x.dtype)

    def launch():
        hopper._launch(x, inp["w_gu"], sched, srt.offsets_E1, n=a.inter, out=h, config=cfg, row_index=srt.token_M,
                       mode=gg.MODE_ACT_FWD, act=gg.ACT_SWIGLU)

    for _ in range(5):
        launch()
    _sync(dev)
    n = 200
    t0 = time.perf_counter()
    for _ in range(n):
        launch()
    out["launch_us"] = round((time.perf_counter() - t0) / n * 1e6, 2)
    _sync(dev)
    return out


def _host_only() -> None:
    """Make every Triton launch of the expert path a no-op that returns its (unwritten) output: see the docstring."""
    import os

    os.environ["TRITON_INTERPRET"] = "1"  # before the kernels are imported: the backends' CPU availability check
    from torch_impl.kernels import grouped_gemm as gg
    from torch_impl.kernels import hopper

    hopper._launch = lambda a, w, sched, offs, *, n, out, **kw: out
    gg.grouped_gemm = lambda a, w, sched, offs, *, n, out, **kw: out

    def tn(left, right, offsets_E1, *, num_experts, p, config, out_dtype=torch.float32, **kw):
        return torch.empty((num_experts, p, right.shape[1]), device=right.device, dtype=out_dtype)

    gg.grouped_gemm_tn = tn


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seq", default="256,4096", help="token counts T, comma-separated")
    p.add_argument("--backends", default="triton_hopper,triton,grouped_mm")
    p.add_argument("--device", default="cuda")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--hidden", type=int, default=2048)
    p.add_argument("--inter", type=int, default=768)
    p.add_argument("--experts", type=int, default=128)
    p.add_argument("--top-k", type=int, default=8)
    p.add_argument("--rank", type=int, default=64)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--out", help="JSONL file to append rows to")
    p.add_argument("--profile-out", help="cProfile's top functions (first backend, first length) to this file")
    p.add_argument("--host-only", action="store_true", help="CPU: Triton launches become no-ops (see above)")
    a = p.parse_args(argv)
    if a.host_only:
        _host_only()
    from torch_impl.backends import get_backend

    meta = dict(versions(), **unit_costs(a))
    print(json.dumps(meta), flush=True)
    rows = []
    for bi, backend in enumerate(a.backends.split(",")):
        reason = get_backend(backend).available(torch.device(a.device), getattr(torch, a.dtype))
        for si, T in enumerate(int(s) for s in a.seq.split(",")):
            if reason is not None:
                row = dict(backend=backend, seq=T, skipped=reason)
            else:
                prof = cProfile.Profile() if a.profile_out and bi == 0 and si == 0 else None
                row = probe(T, backend, a, prof)
                if prof is not None:
                    s = io.StringIO()
                    pstats.Stats(prof, stream=s).sort_stats("tottime").print_stats(40)
                    Path(a.profile_out).write_text(f"# {backend}, T={T}, {a.iters} iterations fwd+bwd\n"
                                                   + s.getvalue())
            row = dict(row, **{k: meta[k] for k in ("aten_op_us", "launch_us") if k in meta})
            rows.append(row)
            print(json.dumps(row), flush=True)
    if a.out:
        with open(a.out, "a") as f:
            for row in rows:
                f.write(json.dumps(dict(row, versions=versions())) + "\n")


if __name__ == "__main__":
    main()
