"""The `splitmoe` command line: make-tiny (by family and by YAML), demo, plan, bench, and its errors."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from shared_math.checkpoint import read_checkpoint

ROOT = Path(__file__).resolve().parents[2]
MODEL_YAMLS = sorted((ROOT / "configs" / "models").glob("*.yaml"))


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "splitmoe", *args], capture_output=True, text=True, cwd=ROOT)


def test_make_tiny_by_family(tmp_path):
    p = run_cli("make-tiny", "--family", "gpt_oss", "--out", str(tmp_path / "g"), "--seed", "3")
    assert p.returncode == 0, p.stderr
    cfg, tensors = read_checkpoint(tmp_path / "g")
    assert cfg.family == "gpt_oss" and "layers.0.mlp.experts.gate_up_proj_bias" in tensors


@pytest.mark.parametrize("yaml_path", MODEL_YAMLS, ids=lambda p: p.stem)
def test_every_shipped_model_yaml_builds_a_readable_checkpoint(yaml_path, tmp_path):
    p = run_cli("make-tiny", "--config", str(yaml_path), "--out", str(tmp_path / "m"))
    assert p.returncode == 0, p.stderr
    cfg, tensors = read_checkpoint(tmp_path / "m")
    assert yaml_path.stem.startswith(cfg.family)
    assert all(v.size for v in tensors.layer(0).values())


def test_default_yaml_has_a_dense_layer(tmp_path):
    """The embedded default exercises both MoE and dense-MLP layers."""
    assert run_cli("make-tiny", "--config", str(MODEL_YAMLS[-1].parent / "qwen3_moe_tiny.yaml"),
                   "--out", str(tmp_path / "q")).returncode == 0
    cfg, _ = read_checkpoint(tmp_path / "q")
    assert True in cfg.moe_layers and False in cfg.moe_layers


@pytest.mark.parametrize("framework", ["torch", "jax"])
def test_demo_job_runs_in_a_relative_folder(framework, tmp_path, monkeypatch):
    """`make demo`'s job (`splitmoe demo [--framework jax]`: run_default_job), cut to 4 steps with a save at step 2,
    in its default relative folder runs/demo: the JAX demo failed at its first save in session 23 (orbax refuses a
    relative path), which no test had run."""
    if framework == "jax":
        pytest.importorskip("jax")
        pytest.importorskip("orbax.checkpoint")
    from splitmoe.train_cli import run_default_job

    monkeypatch.chdir(tmp_path)
    summary = run_default_job("runs/demo", framework=framework, progress=False,
                              overrides=["train.steps=4", "train.save_every=2", "train.eval_every=2"])
    run = tmp_path / "runs" / "demo"
    assert summary["steps"] == 4 and summary["before"] is not None and summary["after"] is not None
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step_00000002", "step_00000004"]
    assert (run / "adapter" / "adapter_model.safetensors").is_file()
    assert json.loads((run / "summary.json").read_text())["framework"] == framework


def test_inspect_runs_and_writes_a_summary(tmp_path):
    p = run_cli("inspect", "--out", str(tmp_path))
    assert p.returncode == 0, p.stderr
    summary = json.loads((tmp_path / "inspect_summary.json").read_text())
    assert len(summary["layers"]) == 2  # the default has 3 layers, one of them dense
    assert all(sum(layer["expert_load"]) == 64 * 2 for layer in summary["layers"])
    assert "merged GFLOP" in p.stdout


def test_plan_prints_the_cost_table():
    p = run_cli("plan", "--tokens", "1024,16384")
    assert p.returncode == 0, p.stderr
    assert "| 16384 | bwd |" in p.stdout and "crossover" in p.stdout


def test_bad_inputs_give_clear_errors(tmp_path):
    p = run_cli("make-tiny", "--out", str(tmp_path / "x"))
    assert p.returncode == 2 and "needs --family or --config" in p.stderr
    bad = tmp_path / "bad.yaml"
    bad.write_text("family: qwen3_moe\nlayers: 3\n")
    p = run_cli("make-tiny", "--config", str(bad), "--out", str(tmp_path / "y"))
    assert p.returncode == 2 and "unknown keys ['layers']" in p.stderr
    bad.write_text("family: mixtral\n")
    p = run_cli("make-tiny", "--config", str(bad), "--out", str(tmp_path / "z"))
    assert p.returncode == 2 and "family must be one of" in p.stderr
    p = run_cli("make-tiny", "--family", "mixtral", "--out", str(tmp_path / "w"))
    assert p.returncode == 2 and "invalid choice" in p.stderr


def test_bench_runs_a_benchmark_script_by_name(tmp_path):
    """`splitmoe bench NAME ARGS` forwards ARGS to benchmarks/NAME's main: here one tiny gpt-oss step on CPU."""
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    from splitmoe.cli import main

    out = tmp_path / "step.jsonl"
    assert main(["bench", "step", "--family", "gpt_oss", "--preset", "tiny", "--device", "cpu", "--seq", "16",
                 "--iters", "1", "--warmup", "1", "--impls", "torch_impl", "--out", str(out)]) == 0
    (row,) = [json.loads(line) for line in out.read_text().splitlines()]
    assert row["impl"] == "torch_impl" and row["seq"] == 16 and row["step_ms"] > 0 and row["rank"] == 64
    assert row["family"] == "gpt_oss" and row["first_step_s"] > 0 and "error" not in row
    with pytest.raises(SystemExit):
        main(["bench", "no-such-benchmark"])
