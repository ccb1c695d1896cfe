"""`splitmoe sweep`: a 2x3 grid end to end (run folders, sweep.md / .jsonl / .png, progress lines), resuming an
interrupted sweep (finished point skipped and untouched, interrupted point resumed from its checkpoint), a failing
point recorded while the sweep goes on, and bad grids refused before any point runs.

Points are tiny (4 rows per micro-batch, a few steps, 4 held-out records) so each trains in about a second on CPU.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from shared_math.train_config import ConfigError, load_run_config, trajectory_dict
from splitmoe.cli import main
from splitmoe.sweep import MARKER, plan_sweep, point_name, split_values

pytest.importorskip("torch")

# no lora.rank here: the tests put it on a grid axis, and a key on an axis and in the overrides is refused
TINY = ["data.batch_size=4", "data.synthetic.num_train=300", "data.synthetic.num_eval=4", "optim.warmup_steps=2",
        "train.eval_every=0", "train.log_every=1", "train.max_new_tokens=3", "framework=torch"]


def sweep(out: Path, *args: str) -> int:
    return main(["sweep", "--out", str(out), "--quiet", *args])


def rows_of(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "sweep.jsonl").read_text().splitlines()]


def table_rows(out: Path) -> list[str]:
    return [line for line in (out / "sweep.md").read_text().splitlines() if line.startswith("| ") and
            not line.startswith("| #")]


def test_grid_of_six_points_writes_run_folders_table_and_plot(tmp_path, capsys):
    out = tmp_path / "sweep"
    rc = sweep(out, "--grid", "lora.rank=2,4", "--grid", "model.moe_backend=native,grouped_mm,auto", *TINY,
               "train.steps=3", "train.save_every=0")
    err = capsys.readouterr().err
    assert rc == 0, err
    rows = rows_of(out)
    assert [r["overrides"] for r in rows] == [{"lora.rank": r, "model.moe_backend": b}
                                             for r in (2, 4) for b in ("native", "grouped_mm", "auto")]
    assert rows[0]["point"] == "lora.rank=2__model.moe_backend=native"
    assert all(r["status"] == "done" and r["error"] is None for r in rows)
    assert all(r["final_eval_loss"] > 0 and 0 <= r["exact_match"] <= 1 for r in rows)
    assert all(r["mean_step_ms"] > 0 and r["peak_memory_mb"] > 0 for r in rows)
    assert rows[3]["trainable_params"] == 2 * rows[0]["trainable_params"] > 0  # LoRA size is linear in the rank
    # the MoE backend does not change the math: the same rank gives the same held-out loss on every backend
    assert rows[0]["final_eval_loss"] == pytest.approx(rows[1]["final_eval_loss"], rel=1e-4)
    for r in rows:  # each point is an ordinary, complete run folder
        folder = Path(r["run_dir"])
        assert folder.parent == out and (folder / "adapter" / "adapter_config.json").is_file()
        assert [m["step"] for m in map(json.loads, (folder / "metrics.jsonl").read_text().splitlines())
                if "loss" in m] == [1, 2, 3]
    md = table_rows(out)
    assert len(md) == 6 and md[2].startswith("| 3 | 2 | auto | done |")
    assert (out / "sweep.png").stat().st_size > 10_000
    assert "point 3/6: lora.rank=2 model.moe_backend=auto (training, torch)" in err
    assert err.count(": done in ") == 6


def test_interrupted_sweep_resumes_skipping_finished_points(tmp_path, capsys, monkeypatch):
    import torch_impl.train as torch_train

    out = tmp_path / "sweep"
    args = ["--grid", "lora.rank=2,4", *TINY, "train.steps=4", "train.save_every=2"]
    real_step = torch_train.Trainer.train_step

    def killed_at_step_3_of_point_2(self):
        if self.cfg.lora.rank == 4 and self.step == 2:  # after point 2's checkpoint at step 2: Ctrl-C
            raise KeyboardInterrupt
        return real_step(self)

    monkeypatch.setattr(torch_train.Trainer, "train_step", killed_at_step_3_of_point_2)
    assert sweep(out, *args) == 130
    monkeypatch.undo()
    first, second = out / "lora.rank=2", out / "lora.rank=4"
    assert json.loads((first / MARKER).read_text())["status"] == "done"
    assert not (second / MARKER).exists() and (second / "checkpoints" / "step_00000002").is_dir()
    assert [r["status"] for r in rows_of(out)] == ["done", "pending"]  # the report was written on the way out
    finished = (first / "metrics.jsonl").read_bytes(), (first / "metrics.jsonl").stat().st_mtime_ns
    capsys.readouterr()

    calls = []
    real_train = torch_train.train

    def spy(cfg, **kw):
        calls.append((cfg.lora.rank, kw["resume"]))
        return real_train(cfg, **kw)

    monkeypatch.setattr(torch_train, "train", spy)
    assert sweep(out, *args) == 0
    err = capsys.readouterr().err
    assert calls == [(4, True)]  # the finished point is not retrained; the interrupted one resumes
    assert "point 1/2: lora.rank=2: done already" in err
    assert "point 2/2: lora.rank=4 (resuming from step_00000002" in err
    assert ((first / "metrics.jsonl").read_bytes(), (first / "metrics.jsonl").stat().st_mtime_ns) == finished
    steps = [m["step"] for m in map(json.loads, (second / "metrics.jsonl").read_text().splitlines()) if "loss" in m]
    assert steps == [1, 2, 3, 4]  # steps 1-2 kept from before the interruption, 3-4 trained once
    rows = rows_of(out)
    assert [r["status"] for r in rows] == ["done", "done"] and len(table_rows(out)) == 2
    assert all(r["final_eval_loss"] is not None for r in rows)


def test_failing_point_is_recorded_and_the_sweep_goes_on(tmp_path, capsys):
    out = tmp_path / "sweep"
    # lr 1e30 without clipping: the first update overflows the LoRA weights and the run diverges at step 2
    rc = sweep(out, "--grid", "optim.lr=1e30,1e-3", "lora.rank=2", *TINY, "train.steps=3", "train.save_every=0",
               "optim.warmup_steps=0", "optim.max_grad_norm=0")
    err = capsys.readouterr().err
    assert rc == 1
    bad, good = rows_of(out)
    assert bad["status"] == "failed" and "TrainingDiverged" in bad["error"] and bad["final_eval_loss"] is None
    assert good["status"] == "done" and good["final_eval_loss"] > 0
    assert "point 1/2: FAILED" in err and "point 2/2: done in" in err
    md = (out / "sweep.md").read_text()
    assert "| 1 | 1e30 | failed |" in md and "Failed points:" in md and "diverged" in md


@pytest.mark.parametrize("args, message", [
    (["--grid", "lora.rnak=4,8"], "unknown key(s) ['lora.rnak']"),
    (["--grid", "lora.rank=4,abc"], "point 2 (lora.rank=abc): lora.rank must be an integer"),
    (["--grid", "lora.rank=4,8,4"], "lora.rank: the value '4' is given twice"),
    (["--grid", "lora.rank=4", "--grid", "lora.rank=8"], "--grid lora.rank is given twice"),
    (["--grid", "model.moe_backend=native,bogus"], "unknown MoE backend 'bogus'"),
    (["--grid", "lora.rank=4,8", "lora.rank=16"], "--grid lora.rank is also set by the override 'lora.rank=16'"),
    (["--grid", "train.out_dir=a,b"], "train.out_dir is set by the sweep"),
    (["--grid", "lora.rank=4,,8"], "has an empty value"),
    ([], "at least one --grid"),
], ids=["unknown-key", "bad-value", "duplicate-value", "duplicate-axis", "bad-backend", "override-conflict",
        "out-dir", "empty-value", "no-grid"])
def test_bad_grid_is_refused_before_any_point_runs(tmp_path, capsys, args, message):
    out = tmp_path / "sweep"
    assert sweep(out, *args) == 2
    err = capsys.readouterr().err
    assert message in err and err.startswith("splitmoe sweep: error:")
    assert not out.exists()  # nothing trained, nothing written


def test_folder_of_a_different_config_is_refused(tmp_path):
    out = tmp_path / "sweep"
    (p,) = plan_sweep(None, out, ["lora.rank=2"], TINY)
    (out / p.name).mkdir(parents=True)
    other = load_run_config(None, [*TINY, "lora.rank=2", "optim.lr=1e-4"])
    (out / p.name / MARKER).write_text(json.dumps({"status": "done", "trajectory": trajectory_dict(other)}))
    with pytest.raises(ConfigError, match=r"point 1 \(lora.rank=2\).*different config \(optim.lr: 0.0001 -> 0.005\)"):
        plan_sweep(None, out, ["lora.rank=2"], TINY)


def test_point_names_and_grid_values():
    assert split_values("[q_proj,v_proj], [o_proj] ,x") == ["[q_proj,v_proj]", "[o_proj]", "x"]
    assert point_name(("lora.rank=8", "model.moe_backend=native")) == "lora.rank=8__model.moe_backend=native"
    a, b = point_name(("lora.targets=[q_proj]",)), point_name(("lora.targets=(q_proj)",))
    assert a.startswith("lora.targets=_q_proj_-") and a != b  # unsafe characters replaced, names kept apart
    assert "/" not in point_name(("model.path=/ckpt/a",)) and len(point_name(("x=" + "9" * 500,))) < 140
