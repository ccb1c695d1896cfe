"""benchmarks/cross_full.py on the CPU: the tiny preset through the same path as the H200's full-width run (random
bf16 checkpoint written lazily, `compare` in bf16, summary row), with both frameworks' losses within tolerance."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("torch")
pytest.importorskip("jax")


def test_cross_full_tiny_bf16_within_tolerance(tmp_path, capsys):
    from benchmarks.cross_full import main
    from shared_math.numerics import tolerance

    out = tmp_path / "results.jsonl"
    argv = ["--preset", "tiny", "--layers", "2", "--steps", "3", "--seq-len", "32", "--workdir", str(tmp_path),
            "--out", str(out)]
    assert main(argv) == 0, capsys.readouterr().out
    (row,) = [json.loads(line) for line in out.read_text().splitlines()]
    rtol = tolerance("bfloat16", "train_loss").rtol
    got = (row["family"], row["preset"], row["layers"], row["seq_len"], row["steps"])
    assert got == ("qwen3_moe", "tiny", 2, 32, 3)
    assert row["dtype"] == "bfloat16" and row["tolerance"] == rtol and row["pass"] is True
    assert row["torch_device"] == "cpu" and row["jax_backend"] == "cpu"
    assert len(row["loss_torch"]) == len(row["loss_jax"]) == 3
    for lt, lj in zip(row["loss_torch"], row["loss_jax"]):
        assert abs(lt - lj) <= rtol * abs(lt), (lt, lj)
    assert row["max_loss_rel"] <= rtol and row["loss_torch"][-1] < row["loss_torch"][0]  # a real run: it learns
    assert set(row["timing"]) == {"torch", "jax"} and "torch" in row["versions"]
    assert len((tmp_path / "compare" / "compare.jsonl").read_text().splitlines()) == 3
    assert "PASS" in capsys.readouterr().out

    # a second run reuses the checkpoint (its marker matches) and appends a second row
    ckpt = tmp_path / "qwen3_moe-tiny-L2-s0"
    mtime = (ckpt / "config.json").stat().st_mtime_ns
    assert main([*argv[:5], "1", *argv[6:]]) == 0
    assert (ckpt / "config.json").stat().st_mtime_ns == mtime
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 2 and rows[1]["checkpoint_write_s"] == 0.0 and rows[1]["steps"] == 1
