"""MoE expert block benchmark: forward + backward of split-LoRA experts against HF v5 + PEFT, in one run, on the GPU.

What is timed (the h200-anchors.md setup): the routed expert block of one layer, bf16 weights and activations, LoRA
on gate_up and down of every expert, frozen base weights, routing fixed (top-K of a random softmax), gradients with
respect to the input and the LoRA weights only. LoRA master weights are fp32 for every implementation (PEFT's
default) and each step includes their cast to bf16 (torch_impl rows get the fp32 masters, as `Experts` passes them,
and cast where their backend does: `torch_impl.moe` for grouped_mm/native, inside the Function for triton; runs 1-3
cast them in the benchmark before the call).

Implementations (rows):
  torch_grouped_mm   torch_impl split LoRA, `grouped_mm` backend (torch._grouped_mm)
  torch_native       torch_impl split LoRA, per-expert loop
  torch_triton       torch_impl split LoRA, the project's Triton kernels (when that backend exists)
  torch_triton_hopper the same Function with its four NN passes on the persistent TMA kernels (`triton_hopper`
                     backend, torch_impl/kernels/hopper.py; sm_90+, opt-in)
  torch_triton_graph the same, forward + backward captured once in a CUDA graph (torch_impl.cuda_graph.GraphedLoss)
                     and replayed: no per-op host cost. Its loss is sum(y·dy), whose gradient is exactly dy; its
                     peak extra is the memory the graph holds (reserved across the capture) plus a replay's peak
  merged_grouped_mm  W' = W + s·A·B for all experts, then torch._grouped_mm (PEFT's math without HF's wrapper)
  hf_peft            HF transformers v5 experts (grouped_mm) + PEFT target_parameters
  hf_peft_eager      HF v5 eager per-expert loop + PEFT
  jax_ragged_dot     jax_impl split LoRA on stock jax.lax.ragged_dot (own subprocess: see moe_block_jax.py)
  jax_pallas_triton_fused, jax_pallas_mosaic_fused, jax_pallas_fused
                     jax_impl's Pallas backends through their fused entry: every pass on Triton, the NN passes on
                     Mosaic GPU, or per pass the lowering the tuning tables measured faster (`auto`'s choice)
  jax_tokamax        the ragged_dot backend's math on tokamax.ragged_dot (Google's Pallas kernels: Mosaic GPU on
                     Hopper; SPLITMOE_TOKAMAX_IMPL=triton|xla forces another), the JAX user's off-the-shelf option

Kernel rows (one GEMM launch chain timed alone, forward only; TFLOP/s from that launch's own FLOPs, next to the
dense bf16 rate of the same run; no ratio against HF):
  gemm_gate_up_grouped_mm   torch._grouped_mm (CUTLASS) on x rows already sorted by expert: x_sorted @ Wgu -> [M, 2I]
  gemm_gate_up_hopper       the hopper kernel's base-only mode (no LoRA, no activation), x rows gathered in the load
  gemm_gate_up_hopper_sorted the same on the pre-sorted rows (all loads by TMA): the same data as grouped_mm
  gemm_gate_up_triton       the `triton` kernel's plain mode, rows gathered in the load
  pass_{gate_up,down,dh,dx}_{triton,hopper}
                            one NN pass of the split-LoRA Function as it runs there (LoRA z pre-pass included, the
                            same config choice), on random operands of the real shapes; TFLOP/s of the base GEMM
`--impls hopper_suite` expands to torch_triton, torch_triton_hopper, every gemm_* row and every pass_* row.

Usage (on the GPU machine):
  python benchmarks/moe_block.py --cases qwen3_30b_T1024,qwen3_30b_T16384 --out benchmarks/results/moe_block.jsonl
  python benchmarks/moe_block.py --cases qwen3_30b_T16384,gpt_oss_20b_T16384 --impls hf_peft,hopper_suite
Prints a markdown table (ratios against hf_peft from the same run) and writes JSONL rows; --plot writes a PNG.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import dense_matmul_tflops, peak_extra_bytes, time_cuda, versions, write_jsonl  # noqa: E402
from shared_math.cases import CASES, MoECase, get_case  # noqa: E402

GiB = 2**30


def base_flops(c: MoECase) -> float:
    """Forward and dX GEMMs of gate_up and down on the M routed rows: 12·M·H·I (h200-anchors.md's count)."""
    return 12.0 * c.M * c.H * c.I


def lora_flops(c: MoECase) -> float:
    """Split LoRA, both projections: forward 2·M·R·(in+out), backward 4·M·R·(in+out) (SPEC.md, cost)."""
    return 6.0 * c.M * c.R * ((c.H + 2 * c.I) + (c.I + c.H))


PASSES = ("gate_up", "down", "dh", "dx")
GEMM_IMPLS = tuple(f"gemm_gate_up_{k}" for k in ("grouped_mm", "triton", "hopper", "hopper_sorted"))
PASS_IMPLS = tuple(f"pass_{p}_{k}" for p in PASSES for k in ("triton", "hopper"))
IMPL_GROUPS = {"hopper_suite": ("torch_triton", "torch_triton_hopper") + GEMM_IMPLS + PASS_IMPLS}
# run_case's names besides the families (GEMM_IMPLS, PASS_IMPLS, torch_BACKEND, jax_BACKEND)
NAMED_IMPLS = ("hf_peft", "hf_peft_eager", "merged_grouped_mm", "torch_triton_graph")


def pass_flops(c: MoECase, name: str) -> float:
    """Base-GEMM FLOPs of one NN pass (or of the base-only gate_up GEMM, name "gate_up") on the M routed rows."""
    width = {"gate_up": (c.H, 2 * c.I), "down": (c.I, c.H), "dh": (c.H, c.I), "dx": (2 * c.I, c.H)}[name]
    return 2.0 * c.M * width[0] * width[1]


def make_inputs(c: MoECase, seed: int = 0):
    """bf16 CUDA inputs: x, routing (top-K of a random softmax, renormalised), base weights, fp32 LoRA, dy."""
    import torch

    g = torch.Generator(device="cuda").manual_seed(seed)
    dev, bf, f32 = "cuda", torch.bfloat16, torch.float32

    def rnd(*shape, fan_in=1.0, dtype=bf):
        return (torch.randn(*shape, generator=g, device=dev) / fan_in**0.5).to(dtype)

    logits = torch.randn(c.T, c.E, generator=g, device=dev)
    w, ids = torch.softmax(logits, -1).topk(c.K, dim=-1)
    w = (w / w.sum(-1, keepdim=True)).to(bf)
    inp = dict(
        x=rnd(c.T, c.H), expert_ids=ids, expert_weights=w,
        w_gate_up=rnd(c.E, c.H, 2 * c.I, fan_in=c.H), w_down=rnd(c.E, c.I, c.H, fan_in=c.I),
        A1=rnd(c.E, c.H, c.R, fan_in=c.H, dtype=f32), B1=rnd(c.E, c.R, 2 * c.I, fan_in=c.R, dtype=f32),
        A2=rnd(c.E, c.I, c.R, fan_in=c.I, dtype=f32), B2=rnd(c.E, c.R, c.H, fan_in=c.R, dtype=f32),
        biases=(rnd(c.E, 2 * c.I), rnd(c.E, c.H)) if c.biases else None,
        dy=rnd(c.T, c.H), scale=2.0,
    )
    for k in ("A1", "B1", "A2", "B2"):
        inp[k].requires_grad_(True)
    inp["x"].requires_grad_(True)
    return inp


def _split_step(c: MoECase, inp: dict, backend: str):
    from torch_impl.moe import split_lora_experts

    leaves = [inp["x"], inp["A1"], inp["B1"], inp["A2"], inp["B2"]]

    def step():
        for t in leaves:
            t.grad = None
        y = split_lora_experts(
            inp["x"], inp["expert_ids"], inp["expert_weights"], inp["w_gate_up"], inp["w_down"],
            (inp["A1"], inp["B1"]), (inp["A2"], inp["B2"]),  # fp32 masters, as Experts passes them
            scale=inp["scale"], biases=inp["biases"], activation=c.activation, swiglu_limit=c.swiglu_limit,
            backend=backend, check_ids=False)  # ids come from a router, as in MoEBlock: no host sync per step
        y.backward(inp["dy"])

    return step


def _graphed_split_step(c: MoECase, inp: dict):
    """(step, bytes held by the graph): torch_triton's forward + backward captured in a CUDA graph."""
    import torch

    from torch_impl.cuda_graph import GraphedLoss
    from torch_impl.moe import split_lora_experts

    leaves = [inp["x"], inp["A1"], inp["B1"], inp["A2"], inp["B2"]]

    def loss_fn():
        y = split_lora_experts(
            inp["x"], inp["expert_ids"], inp["expert_weights"], inp["w_gate_up"], inp["w_down"],
            (inp["A1"], inp["B1"]), (inp["A2"], inp["B2"]), scale=inp["scale"], biases=inp["biases"],
            activation=c.activation, swiglu_limit=c.swiglu_limit, backend="triton", check_ids=False)
        return (y * inp["dy"]).sum()

    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    before = torch.cuda.memory_reserved()
    graphed = GraphedLoss(loss_fn, {}, leaves)
    torch.cuda.synchronize()
    torch.cuda.empty_cache()  # the warm-up's cached blocks; the graph's private pool stays
    return graphed.step, torch.cuda.memory_reserved() - before


def _merged_step(c: MoECase, inp: dict):
    """PEFT's math on our grouped_mm path: materialise W' = W + s·A·B for every expert, no LoRA GEMMs."""
    import torch

    from torch_impl.moe import split_lora_experts

    bf = torch.bfloat16
    leaves = [inp["x"], inp["A1"], inp["B1"], inp["A2"], inp["B2"]]

    def step():
        for t in leaves:
            t.grad = None
        wgu = torch.baddbmm(inp["w_gate_up"], inp["A1"].to(bf), inp["B1"].to(bf), alpha=inp["scale"])
        wd = torch.baddbmm(inp["w_down"], inp["A2"].to(bf), inp["B2"].to(bf), alpha=inp["scale"])
        y = split_lora_experts(inp["x"], inp["expert_ids"], inp["expert_weights"], wgu, wd,
                               scale=inp["scale"], biases=inp["biases"], activation=c.activation,
                               swiglu_limit=c.swiglu_limit, backend="grouped_mm", check_ids=False)
        y.backward(inp["dy"])

    return step


def _hf_peft_step(c: MoECase, inp: dict, experts_impl: str):
    """HF transformers v5 experts module of the family, wrapped by PEFT target_parameters (PEFT 0.21's merge)."""
    import peft
    import torch
    from torch import nn

    bf = torch.bfloat16
    if c.activation == "swiglu_oai":
        from transformers import GptOssConfig
        from transformers.models.gpt_oss.modeling_gpt_oss import GptOssExperts as Experts

        cfg = GptOssConfig(hidden_size=c.H, intermediate_size=c.I, num_local_experts=c.E, num_experts_per_tok=c.K,
                           swiglu_limit=c.swiglu_limit)
    else:
        from transformers import Qwen3MoeConfig
        from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeExperts as Experts

        cfg = Qwen3MoeConfig(hidden_size=c.H, moe_intermediate_size=c.I, num_experts=c.E, num_experts_per_tok=c.K)
    cfg._experts_implementation = experts_impl

    class Holder(nn.Module):
        def __init__(self):
            super().__init__()
            self.experts = Experts(cfg)

    holder = Holder().to(device="cuda", dtype=bf)
    with torch.no_grad():
        for p in holder.parameters():
            p.normal_(0, 0.02)
    lcfg = peft.LoraConfig(r=c.R, lora_alpha=2 * c.R, target_modules=[],
                           target_parameters=["experts.gate_up_proj", "experts.down_proj"])
    holder = peft.inject_adapter_in_model(lcfg, holder)
    holder.requires_grad_(False)
    lora = [p for n, p in holder.named_parameters() if "lora_" in n]
    for p in lora:
        p.data = p.data.float()  # PEFT keeps adapter weights fp32 on a bf16 base (autocast_adapter_dtype)
        p.requires_grad_(True)
        with torch.no_grad():
            p.normal_(0, 0.02)
    x = inp["x"]

    def step():
        x.grad = None
        for p in lora:
            p.grad = None
        y = holder.experts(x, inp["expert_ids"], inp["expert_weights"])
        y.backward(inp["dy"])

    return step


def _sorted_inputs(c: MoECase, seed: int):
    """(inputs, KernelSort) for the kernel rows: make_inputs plus the one expert sort every pass shares."""
    from torch_impl.kernels.split_lora import KernelSort

    inp = make_inputs(c, seed)
    return inp, KernelSort.from_ids(inp["expert_ids"], c.E)


def _tuned(nn, kind: str, key: tuple, srt, ref, launch):
    """`launch(cfg, schedule)` bound to the config the Function would use for this pass (shipped table, or the
    autotuner when SPLITMOE_TRITON_AUTOTUNE=1), as a no-argument step."""
    from torch_impl.kernels import autotune
    from torch_impl.kernels.split_lora import _bucket

    cfg = autotune.get_config(nn.prefix + kind, (_bucket(srt.M),) + key, ref.dtype, ref.device,
                              bench=lambda cf: launch(cf, nn.schedule(srt, cf["BLOCK_M"])),
                              rows_per_expert=srt.M / srt.num_experts)
    sched = nn.schedule(srt, cfg["BLOCK_M"])
    return lambda: launch(cfg, sched)


def gate_up_gemm_runner(c: MoECase, impl: str, seed: int = 0):
    """A step computing the base gate_up GEMM x[token]@Wgu[e] -> [M, 2I] in expert-sorted row order with `impl`:
    grouped_mm (torch._grouped_mm on pre-sorted rows), triton, hopper (rows gathered in the load) or hopper_sorted."""
    import torch

    from torch_impl.kernels.split_lora import _NN

    inp, srt = _sorted_inputs(c, seed)
    x, w = inp["x"].detach(), inp["w_gate_up"]
    del inp
    x_sorted = x.index_select(0, srt.token_M.long())  # outside the timed step: grouped_mm cannot gather
    if impl == "grouped_mm":
        gmm = getattr(torch.nn.functional, "grouped_mm", None) or torch._grouped_mm
        offs = srt.offsets_E1[1:].contiguous()
        return lambda: gmm(x_sorted, w, offs=offs)
    if impl not in ("triton", "hopper", "hopper_sorted"):
        raise ValueError(f"unknown gate_up GEMM impl {impl!r}")
    nn = _NN("triton" if impl == "triton" else "hopper")
    a, rows = (x_sorted, None) if impl == "hopper_sorted" else (x, srt.token_M)

    def launch(cfg, sched):
        out = torch.empty((c.M, 2 * c.I), device=x.device, dtype=x.dtype)
        return nn.gemm(a, w, sched, srt.offsets_E1, n=2 * c.I, out=out, config=cfg, row_index=rows)

    tag = "base_gu_sorted" if impl == "hopper_sorted" else "base_gu"
    return _tuned(nn, "gemm", (tag, c.H, 2 * c.I), srt, x, launch)


def pass_runner(c: MoECase, name: str, kernels: str, seed: int = 0):
    """A step running one NN pass of `SplitLoraExpertsFunction` (torch_impl/kernels/split_lora.py) with the same
    arguments, config key and LoRA z pre-pass, on random operands of the case's shapes (make_inputs' dtype and
    device; LoRA r=c.R)."""
    import torch

    from torch_impl.kernels import grouped_gemm as gg
    from torch_impl.kernels.split_lora import _NN, _t

    inp, srt = _sorted_inputs(c, seed)
    nn = _NN(kernels)
    x, s = inp["x"].detach(), inp["scale"]
    dev, bf, M, H, I, R = x.device, x.dtype, c.M, c.H, c.I, c.R
    g = torch.Generator(device=dev).manual_seed(seed + 1)
    act = gg.act_code(c.activation)
    a1, a2 = (gg.reduction_major(inp[k].detach(), bf) for k in ("A1", "A2"))
    b1, b2 = inp["B1"].detach().to(bf), inp["B2"].detach().to(bf)
    b_gu, b_d = inp["biases"] if inp["biases"] is not None else (None, None)
    w_sorted = inp["expert_weights"].reshape(-1)[srt.flat_M.long()].float()

    def rows(n_cols):
        return torch.randn(M, n_cols, generator=g, device=dev).to(bf)

    if name == "gate_up":
        def launch(cfg, sched):
            h, gu, z1 = (torch.empty((M, n), device=dev, dtype=bf) for n in (I, 2 * I, R))
            return nn.gemm(x, inp["w_gate_up"], sched, srt.offsets_E1, n=I, out=h, config=cfg, row_index=srt.token_M,
                           lora_a_EDR=a1, z_MR=z1, store_z=True, lora_b_ERN=b1, lora_scale=s, bias_EN=b_gu,
                           mode=gg.MODE_ACT_FWD, act=act, gu_M2I=gu, store_gu=True, limit=c.swiglu_limit)
        return _tuned(nn, "gemm_act", ("gu", H, I, R, act), srt, x, launch)
    if name == "down":
        h = rows(I)

        def launch(cfg, sched):
            out, z2 = torch.empty((M, H), device=dev, dtype=bf), torch.empty((M, R), device=dev, dtype=bf)
            return nn.gemm(h, inp["w_down"], sched, srt.offsets_E1, n=H, out=out, config=cfg, lora_a_EDR=a2, z_MR=z2,
                           store_z=True, lora_b_ERN=b2, lora_scale=s, bias_EN=b_d, row_scale_M=w_sorted,
                           out_rows_M=srt.flat_M)
        return _tuned(nn, "gemm", ("down", I, H, R), srt, x, launch)
    if name == "dh":
        gu, dy = rows(2 * I), inp["dy"]

        def launch(cfg, sched):
            dgu, dz2 = torch.empty((M, 2 * I), device=dev, dtype=bf), torch.empty((M, R), device=dev, dtype=bf)
            dots = torch.empty((M, gg.cdiv(I, cfg["BLOCK_N"])), device=dev, dtype=torch.float32)
            return nn.gemm(dy, _t(inp["w_down"]), sched, srt.offsets_E1, n=I, out=dgu, config=cfg,
                           row_index=srt.token_M, lora_a_EDR=_t(b2), z_MR=dz2, store_z=True, lora_b_ERN=_t(a2),
                           z_scale=s, lora_scale=1.0, row_scale_M=w_sorted, mode=gg.MODE_ACT_BWD, act=act,
                           gu_M2I=gu, dot_MT=dots, limit=c.swiglu_limit)
        return _tuned(nn, "gemm", ("dh", H, I, R, act), srt, x, launch)
    if name == "dx":
        dgu = rows(2 * I)

        def launch(cfg, sched):
            dx, dz1 = torch.empty((M, H), device=dev, dtype=bf), torch.empty((M, R), device=dev, dtype=bf)
            return nn.gemm(dgu, _t(inp["w_gate_up"]), sched, srt.offsets_E1, n=H, out=dx, config=cfg,
                           lora_a_EDR=_t(b1), z_MR=dz1, store_z=True, lora_b_ERN=_t(a1), z_scale=s, lora_scale=1.0,
                           out_rows_M=srt.flat_M)
        return _tuned(nn, "gemm", ("dx", 2 * I, H, R), srt, x, launch)
    raise ValueError(f"unknown pass {name!r}; expected one of {', '.join(PASSES)}")


def _kernel_row(c: MoECase, impl: str):
    """(step, base FLOPs) of a gemm_* or pass_* row."""
    if impl in GEMM_IMPLS:
        return gate_up_gemm_runner(c, impl.removeprefix("gemm_gate_up_")), pass_flops(c, "gate_up")
    name, kernels = impl.removeprefix("pass_").rsplit("_", 1)
    return pass_runner(c, name, kernels), pass_flops(c, name)


def _jax_row(c: MoECase, backend: str, timeout: float = 900) -> dict:
    """Run the JAX rows in their own process: JAX and torch must not share (or pre-grab) the GPU's memory. The child's
    stage lines ("[hh:mm:ss] lowered / compiled / first run") reach this log as they come, so a row cut by a time
    limit still shows which stage it was in."""
    env = dict(os.environ, XLA_PYTHON_CLIENT_PREALLOCATE="false")
    cmd = [sys.executable, str(Path(__file__).with_name("moe_block_jax.py")), "--case", c.name, "--backend", backend]
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    err: list[str] = []
    out: list[str] = []

    def relay() -> None:
        for line in p.stderr:
            err.append(line)
            if line.lstrip().startswith("["):
                print(line, end="", file=sys.stderr, flush=True)

    readers = [threading.Thread(target=relay, daemon=True),
               threading.Thread(target=lambda: out.append(p.stdout.read()), daemon=True)]
    for t in readers:
        t.start()
    try:
        p.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        p.kill()
        p.wait()
        return {"error": f"timed out after {timeout:g} s"}
    finally:
        for t in readers:
            t.join(timeout=5)
    lines = [l for l in "".join(out).splitlines() if l.startswith("{")]
    if p.returncode or not lines:
        text = ("".join(err) or "".join(out)).strip().splitlines()
        errors = [l for l in text if "Error" in l or "error" in l] or text[-1:] or [f"exit status {p.returncode}"]
        return {"error": errors[-1].strip()[:300]}
    return json.loads(lines[-1])


def run_case(c: MoECase, impls: list[str], *, iters: int, on_row=None) -> list[dict]:
    """Time each implementation on case `c`; `on_row(row)` gets every row as soon as it is measured (or has
    failed), so that a run cut short by a time limit keeps every row it finished (session 26 lost two finished
    rows of a case to a later row that outlasted the call)."""
    import torch

    rows = []
    for impl in impls:
        row = {"case": c.name, "impl": impl, "T": c.T, "H": c.H, "I": c.I, "E": c.E, "K": c.K, "R": c.R,
               "activation": c.activation}
        print(f"  {c.name:>22} {impl:<18}", end=" ", flush=True)
        try:
            if impl == "jax_ragged_dot" and c.T > 4096:
                # stock ragged_dot is expanded into a dense masked dot on GPU (jax-moe-on-gpu.md): it asks for
                # 55 GiB at T=4096 already, so larger T only burns device time on the compile before the OOM.
                row["error"] = "skipped: stock ragged_dot is dense on GPU and out of memory beyond T=4096"
            elif impl.startswith("jax_"):
                row.update(_jax_row(c, impl.removeprefix("jax_")))
            elif impl in GEMM_IMPLS or impl in PASS_IMPLS:
                step, row["flops"] = _kernel_row(c, impl)
                step()  # compile (and tune, when asked) outside the timed region
                row["ms"] = time_cuda(step, warmup=3, iters=iters)
                row["peak_extra_gib"] = peak_extra_bytes(step) / GiB
                del step
            else:
                inp = make_inputs(c)
                held = 0
                if impl == "torch_triton_graph":
                    step, held = _graphed_split_step(c, inp)
                elif impl.startswith("torch_"):
                    step = _split_step(c, inp, impl.removeprefix("torch_"))
                elif impl == "merged_grouped_mm":
                    step = _merged_step(c, inp)
                elif impl in ("hf_peft", "hf_peft_eager"):
                    step = _hf_peft_step(c, inp, "eager" if impl.endswith("eager") else "grouped_mm")
                else:
                    raise ValueError(f"unknown impl {impl}")
                n = max(3, iters // 10) if impl in ("torch_native", "hf_peft_eager") else iters
                row["ms"] = time_cuda(step, warmup=3, iters=n)
                row["peak_extra_gib"] = (held + peak_extra_bytes(step)) / GiB
                del inp, step
        except torch.cuda.OutOfMemoryError as e:
            row["error"] = f"out of memory: {str(e).splitlines()[0][:120]}"
        except Exception as e:  # noqa: BLE001 - a failing row is reported, the sweep goes on
            row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
        torch.cuda.empty_cache()
        if "ms" in row and "flops" in row:  # a kernel row: its own GEMM's FLOPs
            row["tflops_base"] = row["flops"] / (row["ms"] * 1e-3) / 1e12
            print(f"{row['ms']:9.3f} ms  {row['tflops_base']:6.1f} TFLOP/s (kernel)  +{row['peak_extra_gib']:.2f} GiB")
        elif "ms" in row:
            row["tflops_base"] = base_flops(c) / (row["ms"] * 1e-3) / 1e12
            row["tflops_total"] = (base_flops(c) + lora_flops(c)) / (row["ms"] * 1e-3) / 1e12
            print(f"{row['ms']:9.3f} ms  {row['tflops_base']:6.1f} TFLOP/s  +{row['peak_extra_gib']:.2f} GiB")
        else:
            print(row.get("error"))
        rows.append(row)
        # the ratio goes on every row measured once hf_peft has run (first in the default --impls); rows
        # timed before it get theirs here in memory, and --merge recomputes them all from the file
        base = next((r for r in rows if r["impl"] == "hf_peft" and "ms" in r), None)
        for r in rows:
            if base and "ms" in r and "flops" not in r:
                r["speedup_vs_hf_peft"] = base["ms"] / r["ms"]
        if on_row is not None:
            on_row(row)
    return rows


def markdown(rows: list[dict], dense: float) -> str:
    out = [f"dense bf16 matmul 8192^3 in this run: {dense:.0f} TFLOP/s", "",
           "| case | impl | ms | x vs HF+PEFT | base TFLOP/s | % of dense | peak extra GiB |",
           "| --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        if "ms" in r:
            out.append(f"| {r['case']} | {r['impl']} | {r['ms']:.3f} | {r.get('speedup_vs_hf_peft', float('nan')):.2f} "
                       f"| {r['tflops_base']:.0f} | {100 * r['tflops_base'] / dense:.0f}% | "
                       f"{r.get('peak_extra_gib', float('nan')):.2f} |")
        else:
            out.append(f"| {r['case']} | {r['impl']} | — | — | — | — | {r.get('error', '')[:60]} |")
    return "\n".join(out)


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    families = sorted({r["case"].rsplit("_T", 1)[0] for r in rows})
    fig, axes = plt.subplots(1, len(families), figsize=(6 * len(families), 4.5), squeeze=False)
    for ax, fam in zip(axes[0], families):
        for impl in dict.fromkeys(r["impl"] for r in rows):
            pts = sorted((r["T"], r["ms"]) for r in rows
                         if r["impl"] == impl and r["case"].startswith(fam + "_T") and "ms" in r)
            if pts:
                ax.plot(*zip(*pts), marker="o", label=impl)
        ranks = sorted({r["R"] for r in rows if r["case"].startswith(fam + "_T")})
        ax.set(xscale="log", yscale="log", xlabel="tokens T", ylabel="fwd+bwd ms",
               title=f"{fam} expert block, r={'/'.join(map(str, ranks))}")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> int:
    # named as `splitmoe bench block` when that command calls with its arguments (argv None: run as a script)
    p = argparse.ArgumentParser(prog=None if argv is None else "splitmoe bench block", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cases", default="qwen3_30b_T1024,qwen3_30b_T4096,qwen3_30b_T16384")
    p.add_argument("--impls", default="hf_peft,merged_grouped_mm,torch_grouped_mm,jax_ragged_dot")
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/moe_block.jsonl"))
    p.add_argument("--plot", type=Path, default=None)
    p.add_argument("--markdown", type=Path, default=None)
    p.add_argument("--merge", default=None,
                   help="comma-separated JSONL files of one device command (e.g. torch rows on one GPU and JAX rows on "
                        "the other): no timing, recompute the ratios per case and write --markdown / --plot")
    args = p.parse_args(argv)
    if args.iters < 1:
        p.error(f"--iters must be >= 1, got {args.iters}")
    if args.merge:
        rows = _merge_rows(p, args)
        base = {r["case"]: r["ms"] for r in rows if r["impl"] == "hf_peft" and "ms" in r}
        for r in rows:
            if "ms" in r and r["case"] in base and "flops" not in r:
                r["speedup_vs_hf_peft"] = base[r["case"]] / r["ms"]
        order = {c.name: i for i, c in enumerate(CASES)}
        rows.sort(key=lambda r: (order.get(r["case"], 1e9), r["impl"] != "hf_peft"))
        return _report(rows, max(r.get("dense_tflops", 0.0) for r in rows), args)

    import torch

    cases, impls = _cases_and_impls(p, args)  # before the GPU check: a typo is found on any machine
    if not torch.cuda.is_available():
        print("moe_block.py needs a CUDA GPU", file=sys.stderr)
        return 2
    meta = versions()
    print(json.dumps(meta))
    dense = dense_matmul_tflops()
    print(f"dense bf16 matmul: {dense:.0f} TFLOP/s")
    rows = []

    def keep(row: dict) -> None:
        row.update(meta, dense_tflops=dense)
        write_jsonl(args.out, [row])

    for c in cases:
        rows += run_case(c, impls, iters=args.iters, on_row=keep)
    return _report(rows, dense, args)


def _merge_rows(p: argparse.ArgumentParser, args: argparse.Namespace) -> list[dict]:
    """The rows of the --merge files, or a usage error naming the file and line: a line that was not JSON, or a row
    without this script's fields, stopped the merge with a message naming neither (or a KeyError traceback). Refuses
    a --markdown / --plot that is one of the inputs, which the report would overwrite."""
    paths = [Path(f) for f in args.merge.split(",") if f]
    outputs = [o for o in (args.markdown, args.plot) if o is not None]
    for o in outputs:
        if any(o.resolve() == f.resolve() for f in paths):
            p.error(f"{o} is one of the --merge inputs: --markdown / --plot would overwrite it; name another file")
    rows = []
    for f in paths:
        if not f.is_file():
            p.error(f"--merge: {f} is not a file")
        for n, line in enumerate(f.read_text().splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                p.error(f"--merge: {f}:{n} is not JSON ({e.msg})")
            need = ["case", "impl"] + (["tflops_base"] if isinstance(row, dict) and "ms" in row else [])
            if not isinstance(row, dict) or any(k not in row for k in need):
                p.error(f"--merge: {f}:{n} is not a row of moe_block.py's --out (it needs {', '.join(need)})")
            rows.append(row)
    if not rows:
        p.error(f"--merge: no rows in {args.merge}")
    return rows


def _cases_and_impls(p: argparse.ArgumentParser, args: argparse.Namespace) -> tuple[list[MoECase], list[str]]:
    """--cases and --impls checked before any row: an unknown case stopped the run with a KeyError traceback after
    the earlier cases' rows were written, and an unknown implementation became an error row in --out. Names of jax
    backends (jax_*) are checked by moe_block_jax.py's own process, which imports jax (this one does not)."""
    from torch_impl.backends import BACKENDS

    known_cases = [c.name for c in CASES]
    bad_cases = [n for n in args.cases.split(",") if n not in known_cases]
    if bad_cases:
        p.error(f"unknown case(s) {bad_cases} in --cases; known: {', '.join(known_cases)}")
    impls = [i for name in args.impls.split(",") for i in IMPL_GROUPS.get(name, (name,))]
    known = {*NAMED_IMPLS, *GEMM_IMPLS, *PASS_IMPLS, *(f"torch_{b}" for b in BACKENDS)}
    bad = [i for i in impls if i not in known and not i.startswith("jax_")]
    if bad:
        p.error(f"unknown implementation(s) {bad} in --impls; known: {', '.join(sorted(known))}, jax_BACKEND, or "
                f"the group(s) {', '.join(IMPL_GROUPS)}")
    return [get_case(n) for n in args.cases.split(",")], impls


def _report(rows: list[dict], dense: float, args: argparse.Namespace) -> int:
    """Print the markdown table; write it to --markdown and the plot to --plot when given."""
    table = markdown(rows, dense)
    print(table)
    if args.markdown:
        args.markdown.write_text(table + "\n")
    if args.plot:
        plot(rows, args.plot)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
