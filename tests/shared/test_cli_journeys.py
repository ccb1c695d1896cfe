"""What a user meets around a run, outside the training math: found by walking the README's commands on the CPU
(session 23) and kept here so they stay fixed.

- A run folder's `model/` left by a run that saved nothing is rebuilt for another preset (it was reused in silence:
  a gpt-oss run trained the old Qwen3 model); one that checkpoints were trained on stays for their resume.
- `demo` replaces its own earlier outputs only: another run's checkpoints in its folder are refused, not deleted.
- `data.path` with the synthetic source is an error (the file was ignored in silence).
- A finished run resumed evaluates again without a second row for its last step in metrics.jsonl.
- Ctrl-C in `train` is one line naming the newest checkpoint; an `--out` that is a file is one line.
- `compare --out DIR` writes compare.jsonl / compare.png into DIR itself (its help's promise).
- `plan`'s numbers name their flag when they are bad; a flag and an override setting one key differently are
  refused.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from shared_math.train_config import ConfigError, load_run_config
from shared_math.training import build_model_checkpoint

ROOT = Path(__file__).resolve().parents[2]
GPT_OSS_TINY = str(ROOT / "configs" / "models" / "gpt_oss_tiny.yaml")


def _family(model_dir: Path) -> str:
    return json.loads((model_dir / "config.json").read_text())["model_type"]


def _fake_checkpoint(out: Path, step: int = 2) -> Path:
    ckpt = out / "checkpoints" / f"step_{step:08d}"
    ckpt.mkdir(parents=True)
    (ckpt / "meta.json").write_text(json.dumps({"step": step, "framework": "torch", "trajectory": {}}))
    return ckpt


def test_a_run_folder_model_of_another_preset_is_rebuilt_or_refused(tmp_path):
    out = tmp_path / "run"
    qwen = load_run_config(None, [f"train.out_dir={out}"])
    oss = load_run_config(None, [f"train.out_dir={out}", f"model.tiny={GPT_OSS_TINY}"])
    first = build_model_checkpoint(qwen, out)
    assert _family(first) == "qwen3_moe"
    stamp = (first / "config.json").stat().st_mtime_ns
    assert build_model_checkpoint(qwen, out) == first and (first / "config.json").stat().st_mtime_ns == stamp
    # another preset, nothing trained on the old model yet: rebuilt
    assert _family(build_model_checkpoint(oss, out)) == "gpt_oss"
    # a folder written before the preset marker: compared by its model config
    (first / "splitmoe_tiny.json").unlink()
    assert _family(build_model_checkpoint(oss, out)) == "gpt_oss"
    # checkpoints were trained on it: kept for a resume, which alone can use them (a fresh run into the folder is
    # refused by run_training, a resume under another model.tiny by check_resume)
    ckpt = _fake_checkpoint(out)
    assert _family(build_model_checkpoint(qwen, out)) == "gpt_oss" and ckpt.is_dir()


def test_a_fresh_run_into_a_folder_of_another_models_checkpoints_is_refused(tmp_path, capsys):
    pytest.importorskip("torch")
    from splitmoe.cli import main

    out = tmp_path / "run"
    assert main(["train", "--quiet", "--out", str(out), "train.steps=2", "train.save_every=2"]) == 0
    assert main(["train", "--quiet", "--out", str(out), f"model.tiny={GPT_OSS_TINY}", "train.steps=2"]) == 2
    assert "already holds checkpoints" in capsys.readouterr().err
    assert main(["train", "--quiet", "--resume", "--out", str(out), f"model.tiny={GPT_OSS_TINY}",
                 "train.steps=2", "train.save_every=2"]) == 2
    assert "written by a different config" in capsys.readouterr().err and _family(out / "model") == "qwen3_moe"


def test_demo_refuses_a_folder_of_another_runs_checkpoints(tmp_path):
    from splitmoe.train_cli import run_default_job

    out = tmp_path / "other"
    ckpt = _fake_checkpoint(out)
    (ckpt / "meta.json").write_text(json.dumps({"step": 2, "framework": "torch",
                                                "trajectory": {"model.tiny": GPT_OSS_TINY}}))
    with pytest.raises(ConfigError, match="holds checkpoints of another run .*pass --out NEW_DIR"):
        run_default_job(out, progress=False, overrides=["train.steps=2"])
    assert ckpt.is_dir()
    # a finished demo's folder is the demo's own whatever config wrote its checkpoints (an older version's): replaced
    (out / "summary.json").write_text(json.dumps({"before": {}, "after": {}, "framework": "torch", "steps": 400}))
    run_default_job(out, progress=False, overrides=["train.steps=2", "train.save_every=2", "train.eval_every=2"])
    meta = json.loads((ckpt / "meta.json").read_text())  # the demo's own step-2 checkpoint now
    assert meta["trajectory"]["model.tiny"] != GPT_OSS_TINY and meta["step"] == 2


def test_a_data_file_with_the_synthetic_source_is_refused(tmp_path):
    for key in ("data.path", "data.eval_path"):
        with pytest.raises(ConfigError, match=f"{key} is set but data.source is synthetic.*data.source=jsonl"):
            load_run_config(None, [f"{key}={tmp_path / 'my.jsonl'}"])


def test_resuming_a_finished_run_keeps_one_final_evaluation_row(tmp_path):
    pytest.importorskip("torch")
    from tests.shared.train_suite import tiny_cfg
    from torch_impl import train

    cfg = tiny_cfg(tmp_path, "torch", "train.steps=2", "train.save_every=2", "train.eval_every=1")
    train.train(cfg, progress=False)
    again = train.train(cfg, resume=True, progress=False)
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "eval_loss" in r] == [0, 1, 2]
    assert [r["step"] for r in again.evals] == [0, 1, 2]


def test_ctrl_c_in_train_is_one_line_naming_the_newest_checkpoint(tmp_path, monkeypatch, capsys):
    pytest.importorskip("torch")
    from splitmoe.cli import main
    from torch_impl import train

    def interrupted(cfg, **kw):
        _fake_checkpoint(Path(cfg.train.out_dir), 4)
        raise KeyboardInterrupt

    monkeypatch.setattr(train, "train", interrupted)
    assert main(["train", "--out", str(tmp_path), "train.steps=8"]) == 130
    err = capsys.readouterr().err
    assert "interrupted; the newest checkpoint is" in err and "step_00000004" in err and "--resume" in err
    assert "Traceback" not in err


def test_an_out_that_is_a_file_is_one_line(tmp_path, capsys):
    from splitmoe.cli import main

    afile = tmp_path / "afile"
    afile.write_text("keep me")
    assert main(["train", "--out", str(afile), "train.steps=1"]) == 2
    assert "is a file" in capsys.readouterr().err
    assert main(["make-tiny", "--family", "gpt_oss", "--out", str(afile)]) == 2
    assert "afile" in capsys.readouterr().err and afile.read_text() == "keep me"


def test_a_flag_and_an_override_of_one_key_are_refused(capsys):
    from splitmoe.cli import main

    assert main(["train", "--out", "runs/a", "train.out_dir=runs/b"]) == 2
    assert "train.out_dir is given twice, as train.out_dir=runs/b and as --out runs/a" in capsys.readouterr().err
    assert main(["train", "--framework", "jax", "framework=torch"]) == 2
    assert "framework is given twice" in capsys.readouterr().err
    assert main(["train", "--config", str(ROOT / "configs")]) == 2
    assert "is a folder: give a YAML file" in capsys.readouterr().err


@pytest.mark.parametrize("argv, flag", [(["--tokens", "abc"], "--tokens"), (["--tokens", "1024,"], "--tokens"),
                                        (["--tokens", "0"], "--tokens"), (["--hidden", "0"], "--hidden"),
                                        (["--rank", "-2"], "--rank")])
def test_plan_numbers_name_their_flag(argv, flag, capsys):
    from splitmoe.cli import main

    with pytest.raises(SystemExit) as e:
        main(["plan", *argv])
    assert e.value.code == 2 and f"argument {flag}" in capsys.readouterr().err


def test_resume_of_a_folder_without_checkpoints_writes_nothing(tmp_path, capsys):
    from splitmoe.cli import main

    out = tmp_path / "never_trained"
    assert main(["train", "--resume", "--out", str(out)]) == 2
    assert "nothing to resume" in capsys.readouterr().err and not out.exists()


def test_a_full_size_step_row_on_a_small_host_is_a_recorded_refusal(tmp_path):
    """`bench step --preset 30b-a3b --device cpu` was killed by the kernel on this 23 GiB machine: no row, no
    message. Now the row records why before any weight is allocated (available memory given, so the test does not
    depend on the host's)."""
    pytest.importorskip("torch")
    from benchmarks.step import check_host_memory, main
    from shared_math.presets import preset_hf_config

    hf = preset_hf_config("qwen3_moe", "30b-a3b")
    with pytest.raises(MemoryError, match=r"qwen3_moe 30b-a3b at 48 layers holds 5\d\.\d GiB of bf16 weights, more "
                                          r"than this host's 16\.0 GiB"):
        check_host_memory(hf, "qwen3_moe", "30b-a3b", available=16 * 2**30)
    check_host_memory(preset_hf_config("qwen3_moe", "tiny"), "qwen3_moe", "tiny", available=16 * 2**30)
    out = tmp_path / "rows.jsonl"
    # the real host has far less than the 4.2 TB of bf16 weights of a 2,000-layer Qwen3
    assert main(["--family", "qwen3_moe", "--preset", "30b-a3b", "--layers", "2000", "--device", "cpu",
                 "--seq", "64", "--impls", "torch_impl", "--out", str(out)]) == 1
    (row,) = [json.loads(line) for line in out.read_text().splitlines()]
    assert row["mode"] == "build" and "GiB of bf16 weights" in row["error"]
