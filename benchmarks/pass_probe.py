"""Where the Hopper dh pass loses its time: the pass timed with parts of its work left out, config knobs flipped, and
the compiled kernels' register and spill counts (issue 16; the device has no time for guesses, so one call measures
every difference at once).

The dh pass (`SplitLoraExpertsFunction`'s backward, `MODE_ACT_BWD`) is dh = rs·(dy[token]@W_down[e]^T + s·dz@A2^T)
followed in its epilogue by the SwiGLU backward on the saved gate/up (`gu`, [M, 2I]: read) into dgu ([M, 2I]:
written) and the routing-weight partials sum(h·dh). It ran at 29 % (Qwen3) and 39 % (gpt-oss) of the dense rate on
the H100 where the dx pass, the same GEMM shape without that epilogue, ran at 57-70 % (benchmarks/REPORT.md, session
10). Variants, each with the shipped (tuned) config unless it names a change:

  fused          the pass as the Function runs it (z pre-pass + main launch)
  index_select   fused, a PRE_GATHER config's sorted rows copied by an index_select instead of written by the z
                 launch (SPLITMOE_Z_GATHER=0; the same kernels otherwise)
  fused_nolora   no LoRA: no z pre-pass, no z / LB loads and no z@LB dot in the epilogue
  plain          the same GEMM with a plain epilogue (row scale, LoRA, bf16 store of dh [M, I]): no gu read, no
                 activation backward, no routing partials, half the bytes written
  plain_nolora   the bare gathered GEMM with the row scale
  z_only         the LoRA z pre-pass alone (dy[token]@B2^T, [M, R])
  pregather      fused with PRE_GATHER flipped (the rows copied into expert order, then read by TMA)
  flatten        fused with FLATTEN flipped
  bn64           fused with 64-wide column tiles, EPI_SPLIT=1
  warps4         fused with 4 warps
  es4            fused with the epilogue by column quarters (EPI_SPLIT=4: no register spills on the shipped tile,
                 compiled for sm_90 on the CPU)
  bn256          fused with 256-wide column tiles (the dx pass's), halves, 3 stages
  bn256es4       the same by quarters
  ws             fused with PRE_GATHER and warp specialisation (every loop load a descriptor): run it in its own
                 process (`--variants ws`), since an sm_90 autoWS compiler abort kills the process. Triton 3.6 and
                 3.9 compile this kernel with WS=True into the same PTX as without (no producer / consumer split;
                 benchmarks/kernel_resources.py reports it), so the variant times the fused pass again there

    python3 benchmarks/pass_probe.py --cases qwen3_30b_T16384,gpt_oss_20b_T16384 --out probe.jsonl
Prints one line per variant (ms, base TFLOP/s, registers, spills, shared memory) and appends JSON rows to --out.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import write_jsonl  # noqa: E402

VARIANTS = ("fused", "index_select", "plain", "fused_nolora", "plain_nolora", "z_only", "pregather", "flatten",
            "bn64", "warps4", "es4", "bn256", "bn256es4", "ws")
DEFAULT_VARIANTS = tuple(v for v in VARIANTS if v != "ws")


def config_for(variant: str, tuned: dict) -> dict:
    """The tuned config with the variant's change."""
    cfg = dict(tuned)
    if variant == "pregather":
        cfg["PRE_GATHER"] = not cfg.get("PRE_GATHER", False)
    elif variant == "flatten":
        cfg["FLATTEN"] = not cfg.get("FLATTEN", False)
    elif variant == "bn64":
        cfg.update(BLOCK_N=64, EPI_SPLIT=1)
    elif variant == "warps4":
        cfg["num_warps"] = 4
    elif variant == "es4":
        cfg["EPI_SPLIT"] = 4
    elif variant in ("bn256", "bn256es4"):
        cfg.update(BLOCK_N=256, EPI_SPLIT=4 if variant == "bn256es4" else 2, num_stages=3)
    elif variant == "ws":
        cfg.update(PRE_GATHER=True, WS=True, FLATTEN=False)
    elif variant not in VARIANTS:
        raise ValueError(f"unknown variant {variant!r}; choose from {', '.join(VARIANTS)}")
    return cfg


def _kernel_stats(seen: set) -> list[dict]:
    """Registers, spills and shared memory of the Hopper kernels compiled since `seen` (ids of cached entries)."""
    from torch_impl.kernels import hopper, launch

    out = []
    for entry in launch._CACHES.get(id(hopper._hopper_gemm_kernel), {}).values():
        if id(entry) in seen:
            continue
        seen.add(id(entry))
        k = entry.kernel
        out.append(dict(regs=getattr(k, "n_regs", None), spills=getattr(k, "n_spills", None),
                        smem=getattr(getattr(k, "metadata", None), "shared", None)))
    return out


def probe_case(case_name: str, variants: list[str], iters: int) -> list[dict]:
    import torch

    from benchmarks.common import time_cuda
    from benchmarks.moe_block import _sorted_inputs, pass_flops
    from shared_math.cases import get_case
    from torch_impl.kernels import autotune
    from torch_impl.kernels import grouped_gemm as gg
    from torch_impl.kernels.split_lora import _NN, _bucket, _t

    c = get_case(case_name)
    inp, srt = _sorted_inputs(c, 0)
    nn = _NN("hopper")
    dev, bf, M, H, I, R = inp["x"].device, torch.bfloat16, c.M, c.H, c.I, c.R
    act = gg.act_code(c.activation)
    a2 = gg.reduction_major(inp["A2"].detach(), bf)
    b2 = inp["B2"].detach().to(bf)
    w_sorted = inp["expert_weights"].reshape(-1)[srt.flat_M.long()].float()
    gu = torch.randn(M, 2 * I, device=dev).to(bf)
    dy, w_down = inp["dy"], inp["w_down"]
    key = (_bucket(M), "dh", H, I, R, act)
    tuned = autotune.get_config("hopper_gemm", key, bf, dev, rows_per_expert=M / srt.num_experts)
    flops = pass_flops(c, "dh")
    seen: set = set()
    _kernel_stats(seen)
    rows = []
    for variant in variants:
        cfg = config_for(variant, tuned)
        os.environ["SPLITMOE_Z_GATHER"] = "0" if variant == "index_select" else "1"  # read at each launch
        sched = nn.schedule(srt, cfg["BLOCK_M"])
        lora = variant not in ("fused_nolora", "plain_nolora")
        plain = variant.startswith("plain")
        if variant == "z_only":
            def step(cfg=cfg, sched=sched):
                z = torch.empty((M, R), device=dev, dtype=bf)
                return nn.gemm(dy, _t(b2), sched, srt.offsets_E1, n=R, out=z, config=gg.z_config(cfg, R),
                               row_index=srt.token_M, out_scale=inp["scale"])
        else:
            def step(cfg=cfg, sched=sched, lora=lora, plain=plain):
                out = torch.empty((M, I if plain else 2 * I), device=dev, dtype=bf)
                kw = dict(lora_a_EDR=_t(b2), z_MR=torch.empty((M, R), device=dev, dtype=bf), store_z=True,
                          lora_b_ERN=_t(a2), z_scale=inp["scale"], lora_scale=1.0) if lora else {}
                if not plain:
                    kw.update(mode=gg.MODE_ACT_BWD, act=act, gu_M2I=gu, limit=c.swiglu_limit,
                              dot_MT=torch.empty((M, gg.cdiv(I, cfg["BLOCK_N"])), device=dev, dtype=torch.float32))
                return nn.gemm(dy, _t(w_down), sched, srt.offsets_E1, n=I, out=out, config=cfg,
                               row_index=srt.token_M, row_scale_M=w_sorted, **kw)
        row = dict(case=case_name, variant=variant, config=cfg)
        try:
            ms = time_cuda(step, warmup=3, iters=iters)
            row.update(ms=ms, tflops=flops / (ms * 1e-3) / 1e12, kernels=_kernel_stats(seen))
        except Exception as e:  # a config this Triton cannot compile (e.g. too much shared memory): recorded
            row["error"] = f"{type(e).__name__}: {str(e)[:300]}"
            torch.cuda.synchronize()
        rows.append(row)
        ks = ", ".join(f"{k['regs']} regs / {k['spills']} spills / {k['smem']} B smem" for k in row.get("kernels", []))
        print(f"{case_name} {variant:13s} " + (f"{row['ms']:.3f} ms, {row['tflops']:.0f} TFLOP/s  [{ks}]"
                                                if "ms" in row else row["error"]), flush=True)
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cases", default="qwen3_30b_T16384,gpt_oss_20b_T16384")
    p.add_argument("--variants", default=",".join(DEFAULT_VARIANTS))
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--out", type=Path, default=None)
    a = p.parse_args(argv)
    variants = a.variants.split(",")
    for v in variants:
        config_for(v, {})  # unknown names fail before any GPU work
    rows = [r for case in a.cases.split(",") for r in probe_case(case, variants, a.iters)]
    if a.out:
        write_jsonl(a.out, rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
