"""benchmarks/lora_linear_bench.py on the CPU (Triton interpreter, tiny widths): both modes run one layer's attention
LoRA forward + backward and agree (the script asserts it), the rows say which mode ran, and with --ops each piece of
one projection's branch agrees between the torch ops and the kernels. Runs in a fresh
process: TRITON_INTERPRET must be set before Triton is imported."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("torch")
pytest.importorskip("triton")

ROOT = Path(__file__).resolve().parents[2]


def test_both_modes_run_and_agree_on_tiny_widths(tmp_path):
    out = tmp_path / "ll.jsonl"
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "lora_linear_bench.py"), "--device", "cpu",
                        "--preset", "tiny", "--family", "qwen3_moe,gpt_oss", "--seq", "37", "--rank", "4",
                        "--alpha", "8", "--ops", "--out", str(out)],
                       cwd=ROOT, env=dict(os.environ, TRITON_INTERPRET="1"), capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    assert r.stdout.count("agrees") == 2 * 4  # --ops: each piece of the branch, both ways, per family
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [(x["family"], x["mode"]) for x in rows] == [("qwen3_moe", "torch"), ("qwen3_moe", "triton"),
                                                       ("gpt_oss", "torch"), ("gpt_oss", "triton")]


def test_ops_at_each_projections_widths(tmp_path):
    """--ops-proj k,o: the pieces at k_proj's (hidden -> kv heads) and o_proj's (q heads -> hidden) widths, each
    compared both ways on the CPU; an unknown projection is refused."""
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "lora_linear_bench.py"), "--device", "cpu",
                        "--preset", "tiny", "--family", "qwen3_moe", "--seq", "19", "--rank", "4", "--alpha", "8",
                        "--ops", "--ops-proj", "k,o"],
                       cwd=ROOT, env=dict(os.environ, TRITON_INTERPRET="1"), capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    assert r.stdout.count("k_proj") == 4 and r.stdout.count("o_proj") == 4 and r.stdout.count("agrees") == 8
    bad = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "lora_linear_bench.py"), "--device", "cpu",
                          "--ops", "--ops-proj", "q,gate"], cwd=ROOT, env=dict(os.environ, TRITON_INTERPRET="1"),
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "--ops-proj 'q,gate'" in bad.stderr


def test_projection_widths_follow_the_config():
    from benchmarks.lora_linear_bench import projection_widths
    from shared_math.presets import preset_hf_config

    hf = preset_hf_config("qwen3_moe", "30b-a3b")  # 32 q heads and 4 kv heads of 128 over a 2048-wide hidden state
    assert [projection_widths(hf, p) for p in "qkvo"] == [(2048, 4096), (2048, 512), (2048, 512), (4096, 2048)]
    hf = preset_hf_config("gpt_oss", "20b")  # 64 q heads and 8 kv heads of 64 over 2880
    assert [projection_widths(hf, p) for p in "qkvo"] == [(2880, 4096), (2880, 512), (2880, 512), (4096, 2880)]


def test_cpu_without_the_interpreter_is_refused():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "lora_linear_bench.py"), "--device", "cpu"],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "TRITON_INTERPRET=1" in r.stderr
