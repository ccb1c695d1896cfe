"""The backward's four LoRA-gradient launches (the ragged-K kernel `grouped_gemm_tn`) timed one by one against the
bytes they must move and against cuBLAS doing the same products (issue 16).

In the 16K step profiles of session 15 these launches took 45.7 ms a step on Qwen3-30B-A3B (24 layers) and 34.4 ms
on gpt-oss-20b, 5 % and 3 % of the step, and one kernel name covers all four: this says which launch takes what, and
how far each is from the card. Each launch reduces over an expert's rows (the ragged K) into a small [R, D] or
[D, R] fp32 output, so it should run at the memory rate: `GB/s` counts every operand read once and the output
written once.

  dB2 = s·Z2^T (w·dy[token])      dA2 = act(gu)^T (w·dZ2')      dB1 = s·Z1^T dgu      dA1 = x[token]^T dZ1

Variants:
  shipped   as the backward runs it (`split_lora._tn`'s config: the shipped table's entry)
  sorted    the gathered operand (dy or x by token) given already in expert order: what the gather costs
  split     with --split-rows N: the shipped config with SPLIT_ROWS=N (grouped_gemm_tn's split mode: a crowded
            expert's rows over several programs, then a per-expert chunk sum), with the sort's chunk schedule as
            the backward passes it (built once per layer, outside the timed launches)
  cublas    torch.mm of the same products over all M rows at once, ignoring the expert boundaries, on sorted
            operands (act(gu) precomputed, untimed): the same FLOPs and bytes in one dense GEMM, a yardstick for the
            card's rate at this shape, not a result the kernel must equal
  grouped_mm  torch._grouped_mm with the ragged K (2-D x 2-D with offsets -> [E, p, q]), where this torch has it

    python3 benchmarks/tn_probe.py --cases qwen3_30b_T16384,gpt_oss_20b_T16384 [--skew 0,1,1.5] \
        [--split-rows 1024] --out tn.jsonl
On the CPU (`--device cpu`, under TRITON_INTERPRET=1) it runs the small test cases and checks each launch against
float64; on the GPU it checks them against float32 torch (printed as `err`, the max error over the max magnitude).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import write_jsonl  # noqa: E402

LAUNCHES = ("dB2", "dA2", "dB1", "dA1")
KERNEL_VARIANTS = ("shipped", "sorted", "split")
VARIANTS = ("shipped", "sorted", "cublas", "grouped_mm")  # the default set; "split" joins with --split-rows


def _operands(c, device: str, seed: int = 0) -> dict:
    """Random operands of the four launches at case `c`'s shapes, and the expert sort (compute dtype: bf16 on the
    GPU, fp32 under the interpreter, whose bf16 dots are not exact)."""
    import numpy as np
    import torch

    from shared_math.cases import routing_for
    from torch_impl.kernels.split_lora import KernelSort

    dt = torch.bfloat16 if device == "cuda" else torch.float32
    # drawn on the device: at gpt-oss T=16384 the CPU's draws of gu and dgu alone take seconds a case
    g = torch.Generator(device=device).manual_seed(seed)

    def rnd(*shape):
        return torch.randn(*shape, generator=g, device=device).to(dt)

    # make_moe_inputs(c, seed)'s routing (its first draws) without its float64 weights (35 s on the CPU at gpt-oss
    # T=16384, for every case and skew)
    ids = torch.as_tensor(routing_for(c, np.random.default_rng(seed))[0]).to(device)
    srt = KernelSort.from_ids(ids, c.E)
    M, H, I, R = c.M, c.H, c.I, c.R
    return dict(srt=srt, dt=dt, x=rnd(c.T, H), dy=rnd(c.T, H), gu=rnd(M, 2 * I), dgu=rnd(M, 2 * I),
                z1=rnd(M, R), z2=rnd(M, R), dz1=rnd(M, R), dz2=rnd(M, R),
                w=torch.rand(M, generator=g, device=device), s=2.0)


def _launch_args(name: str, op: dict, c, sorted_rows: bool) -> tuple[tuple, dict]:
    """(config key, keyword arguments) of `grouped_gemm_tn` for one launch, as `SplitLoraExpertsFunction.backward`
    passes them; `sorted_rows` gives the gathered operand pre-sorted instead."""
    from torch_impl.kernels import grouped_gemm as gg

    tok = op["srt"].token_M
    H, I, R, act = c.H, c.I, c.R, gg.act_code(c.activation)
    dy, x = (op["dy_sorted"], op["x_sorted"]) if sorted_rows else (op["dy"], op["x"])
    idx = None if sorted_rows else tok
    if name == "dB2":
        return ("dB2", R, H), dict(left=op["z2"], right=dy, p=R, right_index=idx, row_scale_M=op["w"], alpha=op["s"])
    if name == "dA2":
        return ("dA2", I, R, act), dict(left=op["gu"], right=op["dz2"], p=I, left_act=act, row_scale_M=op["w"],
                                        limit=c.swiglu_limit)
    if name == "dB1":
        return ("dB1", R, 2 * I), dict(left=op["z1"], right=op["dgu"], p=R, alpha=op["s"])
    return ("dA1", H, R), dict(left=x, right=op["dz1"], p=H, left_index=idx)


def _min_bytes(name: str, c, elem: int) -> int:
    """Each operand read once, the fp32 output written once."""
    M, H, I, R, E = c.M, c.H, c.I, c.R, c.E
    reads = {"dB2": M * (R + H) * elem + 4 * M, "dA2": M * (2 * I + R) * elem + 4 * M,
             "dB1": M * (R + 2 * I) * elem, "dA1": M * (H + R) * elem}[name]
    outs = {"dB2": R * H, "dA2": I * R, "dB1": R * 2 * I, "dA1": H * R}[name]
    return reads + 4 * E * outs


def _flops(name: str, c) -> int:
    M, H, I, R = c.M, c.H, c.I, c.R
    return 2 * M * R * {"dB2": H, "dA2": I, "dB1": 2 * I, "dA1": H}[name]


def _reference(name: str, op: dict, c) -> torch.Tensor:
    """The launch's product per expert in float64 (CPU) or float32 (GPU) torch, on the sorted operands."""
    import torch

    from torch_impl.backends.common import Activation

    acc = torch.float64 if op["dt"] == torch.float32 else torch.float32
    offs = op["srt"].offsets_E1.tolist()
    w = op["w"].to(acc)[:, None]
    if name == "dA2":
        left = Activation(c.activation, c.swiglu_limit)(op["gu"].to(acc))
    else:
        left = {"dB2": op["z2"], "dB1": op["z1"], "dA1": op["x_sorted"]}[name].to(acc)
    right = {"dB2": op["dy_sorted"].to(acc) * w, "dA2": op["dz2"].to(acc) * w, "dB1": op["dgu"].to(acc),
             "dA1": op["dz1"].to(acc)}[name]
    scale = op["s"] if name in ("dB2", "dB1") else 1.0
    return torch.stack([scale * left[a:b].t() @ right[a:b] for a, b in zip(offs[:-1], offs[1:])])


def probe_case(case_name: str, variants: list[str], iters: int, device: str, skew: float | None = None,
               split_rows: int = 0) -> list[dict]:
    import dataclasses

    import torch

    from shared_math.cases import get_case
    from torch_impl.kernels import autotune
    from torch_impl.kernels.split_lora import _bucket

    c = get_case(case_name)
    if skew is not None:
        c = dataclasses.replace(c, skew=skew)
    op = _operands(c, device)
    srt = op["srt"]
    load = srt.offsets_E1.diff().float()
    print(f"{case_name} skew {c.skew}: rows per expert max {load.max():.0f}, mean {load.mean():.0f}", flush=True)
    tok = srt.token_M.long()
    op["dy_sorted"], op["x_sorted"] = op["dy"].index_select(0, tok), op["x"].index_select(0, tok)
    elem = op["dt"].itemsize
    rows = []
    for name in LAUNCHES:
        key, kw = _launch_args(name, op, c, sorted_rows=False)
        cfg = autotune.get_config("tn", (_bucket(c.M),) + key, op["dt"], torch.device(device))
        ref = _reference(name, op, c)
        for variant in variants:
            vcfg = dict(cfg, SPLIT_ROWS=split_rows) if variant == "split" else cfg
            row = dict(case=case_name, skew=c.skew, launch=name, variant=variant,
                       config=vcfg if variant in KERNEL_VARIANTS else None)
            step = _variant_step(variant, name, op, c, kw, vcfg)
            if step is None:
                continue
            try:
                out = step()
                if variant in KERNEL_VARIANTS:  # the kernel's own values, against the reference
                    row["err"] = float((out.to(ref.dtype) - ref).abs().max() / ref.abs().max().clamp_min(1e-30))
                if device == "cuda":
                    from benchmarks.common import time_cuda
                    ms = time_cuda(step, warmup=3, iters=iters)
                    row.update(ms=ms, gbps=_min_bytes(name, c, elem) / (ms * 1e-3) / 1e9,
                               tflops=_flops(name, c) / (ms * 1e-3) / 1e12)
            except Exception as e:  # recorded, not dropped (e.g. a torch without _grouped_mm's ragged K)
                row["error"] = f"{type(e).__name__}: {str(e)[:300]}"
                if device == "cuda":
                    torch.cuda.synchronize()
            rows.append(row)
            print(_line(row), flush=True)
    if device == "cuda":
        for variant in variants:
            ms = [r["ms"] for r in rows if r["variant"] == variant and "ms" in r]
            if len(ms) == len(LAUNCHES):
                print(f"{case_name} skew {c.skew} all four {variant:10s} {sum(ms):.3f} ms a layer", flush=True)
    return rows


def _variant_step(variant: str, name: str, op: dict, c, kw: dict, cfg: dict):
    """A no-argument callable computing the launch's product the variant's way (None: not on this device)."""
    import torch

    from torch_impl.backends.common import Activation
    from torch_impl.kernels import grouped_gemm as gg

    srt = op["srt"]
    if variant == "shipped":
        return lambda: gg.grouped_gemm_tn(offsets_E1=srt.offsets_E1, num_experts=srt.num_experts, config=cfg, **kw)
    if variant == "split":
        sched = srt.schedule(cfg["SPLIT_ROWS"])
        return lambda: gg.grouped_gemm_tn(offsets_E1=srt.offsets_E1, num_experts=srt.num_experts, config=cfg,
                                          schedule=sched, **kw)
    if variant == "sorted":
        _, kws = _launch_args(name, op, c, sorted_rows=True)
        return lambda: gg.grouped_gemm_tn(offsets_E1=srt.offsets_E1, num_experts=srt.num_experts, config=cfg, **kws)
    if op["dt"] != torch.bfloat16:
        return None  # the yardsticks time cuBLAS's bf16 path: GPU only
    left = {"dB2": op["z2"], "dB1": op["z1"], "dA1": op["x_sorted"],
            "dA2": Activation(c.activation, c.swiglu_limit)(op["gu"].float()).to(op["dt"])}[name]
    right = {"dB2": op["dy_sorted"], "dA2": op["dz2"], "dB1": op["dgu"], "dA1": op["dz1"]}[name]
    if variant == "cublas":
        return lambda: torch.mm(left.t(), right)
    if variant == "grouped_mm":
        offs = srt.offsets_E1[1:].to(torch.int32).contiguous()
        return lambda: torch._grouped_mm(left.t(), right, offs=offs)
    raise ValueError(f"unknown variant {variant!r}; choose from {', '.join(VARIANTS)}")


def _line(row: dict) -> str:
    head = f"{row['case']} {row['launch']} {row['variant']:10s} "
    if "error" in row:
        return head + row["error"]
    timing = f"{row['ms']:.3f} ms, {row['gbps']:.0f} GB/s, {row['tflops']:.0f} TFLOP/s" if "ms" in row else "untimed"
    return head + timing + (f", err {row['err']:.1e}" if "err" in row else "")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cases", default="qwen3_30b_T16384,gpt_oss_20b_T16384")
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    p.add_argument("--skew", default=None,
                   help="comma-separated routing skews to run each case at (shared_math.cases: 0 uniform, >0 Zipf-like "
                        "towards low expert ids); default: the case's own")
    p.add_argument("--split-rows", type=int, default=0,
                   help="rows per chunk N > 0: adds the variant 'split' (the shipped config with SPLIT_ROWS=N; N a "
                        "multiple of every launch's BLOCK_M, e.g. 512 or 1024 on the GPU, 16 in the interpreter)")
    p.add_argument("--out", type=Path, default=None)
    a = p.parse_args(argv)
    variants = a.variants.split(",")
    known = (*VARIANTS, "split")
    unknown = sorted(set(variants) - set(known))
    if unknown:
        p.error(f"unknown variant(s) {', '.join(unknown)}; choose from {', '.join(known)}")
    if a.split_rows < 0:
        p.error("--split-rows must be positive (0: no split variant)")
    if "split" in variants and not a.split_rows:
        p.error("the variant 'split' needs --split-rows N")
    if a.split_rows and "split" not in variants:
        variants.insert(variants.index("shipped") + 1 if "shipped" in variants else 0, "split")
    skews = [None] if a.skew is None else [float(x) for x in a.skew.split(",")]
    for case in a.cases.split(","):
        for sk in skews:
            rows = probe_case(case, variants, a.iters, a.device, sk, a.split_rows)
            if a.out:  # case by case: a run cut short by a time limit keeps what finished
                write_jsonl(a.out, rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
