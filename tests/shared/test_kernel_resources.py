"""benchmarks/kernel_resources.py (CPU): the Hopper GEMM compiled for sm_90 without a GPU, its registers and spills
read back from ptxas. Runs in a fresh process: the kernel tests import hopper.py under the Triton interpreter, where
the kernel cannot be compiled."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("torch")
triton = pytest.importorskip("triton")

ROOT = Path(__file__).resolve().parents[2]
# small tiles and 4 warps: quick to compile on the CI's two cores
SMALL = {"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_D": 64, "num_warps": 4, "num_stages": 2}


def _run(*args: str) -> str:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "kernel_resources.py"), *args], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    return r.stdout


def test_dh_pass_compiles_for_sm90_and_its_split_gemm_needs_fewer_registers():
    """The fused dh epilogue holds gate, up and the accumulator at once; DH_SPLIT's GEMM stores the accumulator
    instead, so at the same tiles it must use fewer registers (the reason DH_SPLIT exists)."""
    out = _run("--model", "gpt_oss_20b", "--passes", "dh,dh_split", "--configs", json.dumps(SMALL))
    regs = {m[1]: int(m[2]) for m in re.finditer(r"gpt_oss_20b (\w+)\s+\[given 0\].*?: (\d+) regs", out)}
    assert set(regs) == {"dh", "dh_split"}, out
    assert 0 < regs["dh_split"] < regs["dh"] <= 255, out
    assert re.search(r"\d+ B smem", out), out


def test_unknown_pass_is_refused():
    sys.path.insert(0, str(ROOT))
    from benchmarks.kernel_resources import pass_constexprs

    with pytest.raises(ValueError, match="unknown pass 'up'"):
        pass_constexprs("up", SMALL)
