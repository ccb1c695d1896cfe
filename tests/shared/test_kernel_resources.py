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


def test_passes_compile_for_sm90_and_report_their_resources():
    out = _run("--model", "gpt_oss_20b", "--passes", "dh,dx", "--configs", json.dumps(SMALL))
    regs = {m[1]: int(m[2]) for m in re.finditer(r"gpt_oss_20b (\w+)\s+\[given 0\].*?: (\d+) regs", out)}
    assert set(regs) == {"dh", "dx"} and all(0 < r <= 255 for r in regs.values()), out
    assert len(re.findall(r"\d+ B smem", out)) == 2, out


def test_shipped_configs_are_found_per_pass():
    sys.path.insert(0, str(ROOT))
    from benchmarks.kernel_resources import shipped_configs

    # the shipped table holds H100 entries of every NN pass of both models (sessions 7-12 sweeps)
    for model in ("qwen3_30b", "gpt_oss_20b"):
        for pass_name in ("gate_up", "down", "dh", "dx"):
            found = shipped_configs(model, pass_name)
            assert found and all("BLOCK_M" in c for c in found.values()), (model, pass_name)


def test_unknown_pass_is_refused():
    sys.path.insert(0, str(ROOT))
    from benchmarks.kernel_resources import pass_constexprs

    with pytest.raises(ValueError, match="unknown pass 'up'"):
        pass_constexprs("up", SMALL)


def test_ptx_digest_ignores_debug_lines_and_tells_configs_apart():
    """The digest of a config's PTX is the same on a second compile and differs for another epilogue split; source
    lines (`.loc`, debug labels and sections) do not enter it, so moving code keeps it."""
    sys.path.insert(0, str(ROOT))
    from benchmarks.kernel_resources import ptx_digest

    body = "\tld.global.u32 %r1, [%rd1];\n\tst.global.u32 [%rd2], %r1;\n"
    moved = "\t.loc\t1 120 7\n$L__tmp3:\n" + body + ".section\t.debug_info\n{ .b8 1 }\n"
    assert ptx_digest(body) == ptx_digest("\t.loc\t1 80 3\n" + moved)
    assert ptx_digest(body) != ptx_digest(body.replace("%r1", "%r2"))
    out = _run("--model", "qwen3_30b", "--passes", "down",
               "--configs", json.dumps([SMALL, SMALL, dict(SMALL, EPI_SPLIT=2)]))
    digests = re.findall(r"ptx ([0-9a-f]{12})", out)
    assert len(digests) == 3 and digests[0] == digests[1] != digests[2], out
