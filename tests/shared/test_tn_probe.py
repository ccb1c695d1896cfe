"""benchmarks/tn_probe.py on the CPU (Triton interpreter): every LoRA-gradient launch it times computes the product
its reference says, gathered, pre-sorted and (with --split-rows) split, on the small cases (odd dims, gpt-oss's
clamped activation, experts with no rows, skewed loads). Runs in a fresh process: TRITON_INTERPRET must be set before
Triton is imported."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("torch")
pytest.importorskip("triton")

ROOT = Path(__file__).resolve().parents[2]


def test_probe_launches_match_the_reference(tmp_path):
    out = tmp_path / "tn.jsonl"
    env = dict(os.environ, TRITON_INTERPRET="1")
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "tn_probe.py"), "--device", "cpu",
                        "--cases", "odd_dims,oai_biases,empty_experts", "--out", str(out)],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    # 3 cases x 4 launches x the two kernel variants (the cuBLAS yardsticks are GPU-only)
    expect = {(n, v) for n in ("dB2", "dA2", "dB1", "dA1") for v in ("shipped", "sorted")}
    assert {(x["launch"], x["variant"]) for x in rows} == expect
    assert len(rows) == 3 * len(expect)
    # fp32 operands against float64: sums of up to ~60 products of O(1) values, a few ulps of fp32 at most
    assert all("error" not in x and x["err"] < 1e-5 for x in rows), rows


def test_unknown_variant_is_refused():
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "tn_probe.py"), "--variants", "shipped,fast"],
                       cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "unknown variant(s) fast" in r.stderr


def test_split_variant_needs_split_rows():
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "tn_probe.py"), "--variants", "shipped,split"],
                       cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "needs --split-rows" in r.stderr


def test_skews_rerun_each_case_with_its_own_routing(tmp_path):
    """--skew reruns the case per skew; --split-rows adds the split variant (the shipped config with SPLIT_ROWS,
    16 = one interpreter row block, so the skewed case's busiest expert spans several chunks) next to shipped."""
    out = tmp_path / "tn.jsonl"
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "tn_probe.py"), "--device", "cpu", "--cases",
                        "skewed", "--skew", "0,1.5", "--variants", "shipped", "--split-rows", "16", "--out", str(out)],
                       cwd=ROOT, env=dict(os.environ, TRITON_INTERPRET="1"), capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [x["skew"] for x in rows] == [0.0] * 8 + [1.5] * 8
    assert [x["variant"] for x in rows] == ["shipped", "split"] * 8
    assert all(x["config"].get("SPLIT_ROWS") == (16 if x["variant"] == "split" else None) for x in rows), rows
    assert all("error" not in x and x["err"] < 1e-5 for x in rows), rows
    # the skewed routing does load one expert more: the probe says by how much
    loads = [line for line in r.stdout.splitlines() if "rows per expert" in line]
    assert len(loads) == 2 and loads[0] != loads[1]
