"""Registers, spills and shared memory of the Hopper GEMM kernel, compiled for sm_90 on a machine without a GPU.

Triton compiles ahead of time for any target (`triton.compile` on an `ASTSource` with a `GPUTarget`), and the ptxas
it ships reports, per thread, the registers and the bytes spilled to local memory (`ptxas -v` on the kernel's PTX). A
kernel at the 255-register ceiling that spills keeps live values in local memory and reads them back through L1 / L2,
in the epilogue here. That is a property of the config, the pass and the Triton version (the reported bytes move
with ptxas's version too), so a config can be screened here before the GPU times it (device time is scarce; the CPU
is not).

The pass is compiled as `hopper.grouped_gemm` launches it in the split-LoRA Function (bf16, LoRA, row scale, TMA
weights as K-major views where the pass reads a transposed weight): gate_up (act_fwd, two accumulators), down,
dh (act_bwd epilogue) and dx, with the rows gathered by pointer loads or, with
PRE_GATHER, read by TMA.

    python3 benchmarks/kernel_resources.py --model gpt_oss_20b --passes dh --configs shipped [--lora-acc]
    python3 benchmarks/kernel_resources.py --model qwen3_30b --passes gate_up,dh \
        --configs '{"BLOCK_M": 128, "BLOCK_N": 64, "BLOCK_D": 64, "num_warps": 8, "num_stages": 4}'
Prints one line per (pass, config): registers, spill bytes, shared memory, and a digest of the PTX that
changes only when the compiled code does (`ptx_digest`).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import re
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

PASSES = ("gate_up", "down", "dh", "dx")
# the pointer operands' element types (compute dtype bf16; fp32 routing weights and partial dots; int32 indices)
_POINTERS = dict(a_ptr="*bf16", a_out_ptr="*bf16", row_index_ptr="*i32", w_ptr="*bf16", tile_expert_ptr="*i32",
                 tile_row_ptr="*i32", n_row_tiles_ptr="*i32", offsets_ptr="*i32", z_ptr="*bf16", lb_ptr="*bf16",
                 bias_ptr="*bf16", row_scale_ptr="*fp32", gu_ptr="*bf16", out_ptr="*bf16", out_rows_ptr="*i32",
                 dot_ptr="*fp32")
_FLOATS = ("lora_scale", "out_scale", "limit", "alpha")
# strides of contiguous last dimensions: Triton specialises an int argument equal to 1 into a constant
_UNIT_STRIDES = ("stride_ad", "stride_zr", "stride_lbn", "stride_bn", "stride_gun", "stride_on")


@dataclass(frozen=True)
class Usage:
    regs: int
    spill_stores: int  # bytes per thread ptxas spills to local memory and reads back
    spill_loads: int
    smem: int  # bytes of dynamic shared memory Triton asks for at launch
    warp_specialized: bool  # the PTX splits producer and consumer warps (setmaxnreg), as WS asks
    digest: str  # `ptx_digest` of the kernel's PTX: equal digests, the same code (a refactor's check)

    def __str__(self) -> str:
        spills = f", spills {self.spill_stores} B stored / {self.spill_loads} B loaded" if self.spill_stores else ""
        ws = ", warp-specialised" if self.warp_specialized else ""
        return f"{self.regs} regs{spills}, {self.smem} B smem{ws}, ptx {self.digest}"


def pass_constexprs(pass_name: str, config: dict, *, rank: int = 64, act: int = 1, gathered: bool = True,
                    lora_acc: bool = False) -> dict:
    """The constexpr switches `hopper._launch` passes for one NN pass of the split-LoRA Function (bf16, LoRA on,
    TMA-addressable operands); `gathered`: the pass reads its rows through the sort's index (gate_up and dh) and
    the config does not PRE_GATHER them; `lora_acc`: the LoRA term accumulated into the base accumulator
    (`hopper.lora_acc`)."""
    from torch_impl.kernels import grouped_gemm as gg

    if pass_name not in PASSES:
        raise ValueError(f"unknown pass {pass_name!r}; choose from {', '.join(PASSES)}")
    gather = gathered and pass_name in ("gate_up", "dh") and not config.get("PRE_GATHER", False)
    mode = {"gate_up": gg.MODE_ACT_FWD, "dh": gg.MODE_ACT_BWD}.get(pass_name, gg.MODE_PLAIN)
    return dict(GATHER_A=gather, A_DESC=not gather, W_DESC=True, W_KMAJOR=pass_name in ("dh", "dx"),
                GU_DESC=mode == gg.MODE_ACT_BWD, LORA=2 if lora_acc else 1, HAS_BIAS=False,
                ROW_SCALE=pass_name in ("down", "dh"), MODE=mode, ACT=act if mode != gg.MODE_PLAIN else gg.ACT_NONE,
                STORE_GU=mode == gg.MODE_ACT_FWD, SCATTER_OUT=pass_name in ("down", "dx"), DOT_PREC="tf32",
                EVEN_D=True, BLOCK_M=config["BLOCK_M"], BLOCK_N=config["BLOCK_N"], BLOCK_D=config["BLOCK_D"],
                BLOCK_R=max(16, gg.next_pow2(rank)), GROUP_M=config.get("GROUP_M", 8), NUM_PROGS=132,
                FLATTEN=bool(config.get("FLATTEN", False)), WARP_SPECIALIZE=bool(config.get("WS", False)),
                EPI_SPLIT=config.get("EPI_SPLIT", 1), STORE_A=False)


def compile_sm90(constexprs: dict, num_warps: int, num_stages: int):
    """`hopper._hopper_gemm_kernel` compiled for sm_90 with these switches (no GPU needed)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from torch_impl.kernels import hopper

    fn = hopper._hopper_gemm_kernel
    signature, constants = {}, {}
    for name in fn.arg_names:
        if name in constexprs or name in _UNIT_STRIDES:
            signature[name] = "constexpr"
            constants[name] = constexprs.get(name, 1)
        else:
            signature[name] = _POINTERS.get(name, "fp32" if name in _FLOATS else "i32")
    # every runtime pointer and size a multiple of 16, as the real launches' are (R aside: the rank)
    attrs = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(fn.arg_names)
             if signature[n] != "constexpr" and n not in _FLOATS and n != "R"}
    return triton.compile(ASTSource(fn=fn, signature=signature, constexprs=constants, attrs=attrs),
                          target=GPUTarget("cuda", 90, 32), options=dict(num_warps=num_warps, num_stages=num_stages))


def _ptxas_report(ptx: str) -> str:
    """`ptxas -v` of the kernel's PTX for sm_90a, by the first of Triton's bundled ptxas binaries that accepts its
    PTX version (Triton 3.9 ships a CUDA 12.9 ptxas and a CUDA 13 `ptxas-blackwell`; its PTX may need the newer)."""
    import triton

    bin_dir = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
    errors = []
    with tempfile.TemporaryDirectory() as d:
        src = Path(d) / "kernel.ptx"
        src.write_text(ptx)
        for tool in sorted(bin_dir.glob("ptxas*")):
            r = subprocess.run([str(tool), "-arch=sm_90a", "-v", str(src), "-o", str(Path(d) / "kernel.cubin")],
                               capture_output=True, text=True)
            if r.returncode == 0:
                return r.stdout + r.stderr
            errors.append(f"{tool.name}: {r.stderr.strip()[-200:]}")
    raise RuntimeError("no bundled ptxas assembled the kernel: " + "; ".join(errors))


def ptx_digest(ptx: str) -> str:
    """The first 12 hex digits of the sha1 of the PTX without its debug information (the `.loc` / `.file` lines, the
    `$L__tmp` / `$L__func` labels, the `.debug_*` sections), which names source lines: a change that moves code
    without changing what it compiles to keeps the digest. Session 22 checked the EPI_SPLIT helper this way: every
    shipped config's PTX the same before and after."""
    cut = ptx.find(".section\t.debug")
    lines = [line for line in (ptx if cut < 0 else ptx[:cut]).splitlines()
             if not re.match(r"\s*(\.loc|\.file|\$L__tmp|\$L__func)", line) and "debug" not in line]
    return hashlib.sha1("\n".join(lines).encode()).hexdigest()[:12]


def usage(kernel) -> Usage:
    """Registers and spill bytes per thread (ptxas -v), shared memory from Triton's metadata, and
    whether the PTX is warp-specialised (its register reallocation between producer and consumer warps)."""
    text = _ptxas_report(kernel.asm["ptx"])
    regs = re.search(r"Used (\d+) registers", text)
    frame = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", text)
    if regs is None or frame is None:
        raise RuntimeError(f"unexpected ptxas report: {text[-400:]}")
    return Usage(regs=int(regs[1]), spill_stores=int(frame[1]), spill_loads=int(frame[2]),
                 smem=int(kernel.metadata.shared), warp_specialized="setmaxnreg" in kernel.asm["ptx"],
                 digest=ptx_digest(kernel.asm["ptx"]))


def pass_usage(pass_name: str, config: dict, **kw) -> Usage:
    return usage(compile_sm90(pass_constexprs(pass_name, config, **kw), config.get("num_warps", 4),
                              config.get("num_stages", 2)))


# the split-LoRA Function's autotune key of each pass (split_lora.py), without the row bucket
def _shape_key(pass_name: str, H: int, I: int, R: int, act: int) -> tuple[str, tuple]:
    return {"gate_up": ("hopper_gemm_act", ("gu", H, I, R, act)), "down": ("hopper_gemm", ("down", I, H, R)),
            "dh": ("hopper_gemm", ("dh", H, I, R, act)),
            "dx": ("hopper_gemm", ("dx", 2 * I, H, R))}[pass_name]


def shipped_configs(model: str, pass_name: str, device_name: str = "NVIDIA H100 80GB HBM3") -> dict[str, dict]:
    """{row bucket: config} of the shipped table's entries for one pass of a model's experts on `device_name`."""
    from shared_math.cases import get_case
    from torch_impl.kernels import autotune
    from torch_impl.kernels import grouped_gemm as gg

    c = get_case(f"{model}_T16384")
    kind, key = _shape_key(pass_name, c.H, c.I, c.R, gg.act_code(c.activation))
    import torch

    table = json.loads(autotune.TUNED_TABLE.read_text())
    # the table's keys are autotune.cache_key's, with the row bucket first in the shape key: split one around it
    prefix, tail = autotune.cache_key(kind, ("\0",) + key, torch.bfloat16, device_name).split("\0")
    return {k[len(prefix):-len(tail)]: v for k, v in table.items() if k.startswith(prefix) and k.endswith(tail)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="qwen3_30b", help="a case family of shared_math.cases (qwen3_30b, gpt_oss_20b, "
                   "glm45, glm47_flash)")
    p.add_argument("--passes", default=",".join(PASSES))
    p.add_argument("--lora-acc", action="store_true", help="the LoRA term accumulated into the base accumulator "
                   "(SPLITMOE_LORA_ACC=1, hopper.lora_acc)")
    p.add_argument("--configs", default="shipped",
                   help="'shipped' (the table's H100 entries for each pass) or a JSON config / list of configs")
    a = p.parse_args(argv)
    from shared_math.cases import get_case
    from torch_impl.kernels import grouped_gemm as gg

    c = get_case(f"{a.model}_T16384")
    act = gg.act_code(c.activation)
    for pass_name in a.passes.split(","):
        if a.configs == "shipped":
            configs = shipped_configs(a.model, pass_name)
        else:
            given = json.loads(a.configs)
            configs = {f"given {i}": cfg for i, cfg in enumerate(given if isinstance(given, list) else [given])}
        if not configs:
            print(f"{a.model} {pass_name}: no shipped entry")
        for label, cfg in configs.items():
            u = pass_usage(pass_name, cfg, rank=c.R, act=act, lora_acc=a.lora_acc)
            print(f"{a.model} {pass_name:8s} [{label}] {json.dumps(cfg, sort_keys=True)}: {u}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
