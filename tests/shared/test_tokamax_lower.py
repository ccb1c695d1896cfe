"""benchmarks/tokamax_lower.py (CPU): the `tokamax` backend's block gradient lowered for CUDA with an H100 stood in for
tokamax's device. Runs in a fresh process: the tool replaces tokamax's device lookup and the backend's GPU probes for
the rest of its process.

Which cases lower depends on the tokamax and jax versions. With the GPU machine's pair (tokamax 0.0.14, jax 0.11.2)
every gpu case lowers (session 26). CI's tokamax 0.0.12 with jax 0.10.2 refuses the narrow LoRA widths ("WGMMA rhs
swizzle must match lhs swizzle"), a version that never runs on that GPU. The benchmark shapes lower with both, so
this test uses one of them."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("jax")
pytest.importorskip("tokamax")

ROOT = Path(__file__).resolve().parents[2]


def _rows(*args: str) -> tuple[int, list[dict]]:
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(ROOT)}
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "tokamax_lower.py"), *args], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=600)
    rows = [json.loads(line) for line in r.stdout.splitlines() if line.startswith("{")]
    return r.returncode, rows


def test_benchmark_shape_lowers_every_grouped_gemm_to_mosaic():
    code, rows = _rows("--cases", "qwen3_30b_T16384")
    assert code == 0 and [r["case"] for r in rows] == ["qwen3_30b_T16384"], rows
    # Forward and backward of split LoRA on both projections: 14 grouped GEMMs (jax_impl/backends/ragged_dot.py), every
    # one a Mosaic GPU kernel; an XLA ragged_dot left among them would lower to no custom call and lower the count
    assert rows[0]["ok"] and rows[0]["mosaic_kernels"] == 14, rows


def test_a_case_that_does_not_lower_is_a_row_with_its_error_and_a_failing_exit():
    code, rows = _rows("--cases", "no_such_case,qwen3_30b_T1024")
    assert code == 1
    assert rows[0]["case"] == "no_such_case" and not rows[0]["ok"] and "no case named" in rows[0]["error"], rows
    assert rows[1]["ok"], rows  # the next case still ran
