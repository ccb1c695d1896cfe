"""Experiment tracking (shared_math/tracking.py): a run with `train.loggers: [tensorboard, trackio]` writes TensorBoard
event files and a trackio run that hold exactly the numbers of metrics.jsonl, also across an interrupted and resumed
run (TensorBoard drops the events after the resume point, as metrics.jsonl does); a logger whose package is missing
is refused before any work with the pip extra named; unknown names are config errors; what a row's scalars are.
"""

from __future__ import annotations

import importlib.util
import json
import sys
import uuid
from pathlib import Path

import numpy as np
import pytest

from shared_math import tracking
from shared_math.train_config import ConfigError, load_run_config
from tests.shared.train_suite import tiny_cfg


def test_scalars_flatten_nested_numbers_and_leave_out_the_rest():
    row = {"step": 7, "loss": 1.5, "grad_norm": 2, "ok": True, "note": "x", "nan": float("nan"),
           "exact_match": {"all": 0.5, "copy": 1.0},
           "routing": {"0": {"load": [3, 5], "imbalance": 1.25, "entropy": 0.7, "cv": None}}}
    assert tracking.scalars(row) == {"loss": 1.5, "grad_norm": 2.0, "exact_match/all": 0.5, "exact_match/copy": 1.0,
                                     "routing/0/imbalance": 1.25, "routing/0/entropy": 0.7}


@pytest.mark.parametrize("value, message", [
    ("[wandb]", "unknown logger 'wandb'; known: tensorboard, trackio"),
    ("[tensorboard,tensorboard]", "'tensorboard' is listed twice"),
])
def test_bad_logger_names_are_config_errors(value, message):
    with pytest.raises(ConfigError, match=message):
        load_run_config(None, [f"train.loggers={value}"])


def test_loggers_are_not_part_of_the_trajectory():
    from shared_math.train_config import trajectory_dict

    a = load_run_config(None, ["train.loggers=[tensorboard]", "train.tracker_project=x"])
    assert trajectory_dict(a) == trajectory_dict(load_run_config(None, []))  # resumable with other loggers


def test_missing_package_is_refused_before_any_work_naming_the_extra(tmp_path, monkeypatch, capsys):
    torch = pytest.importorskip("torch")  # noqa: F841 - the CLI's train path loads torch_impl
    real = tracking.importlib.util.find_spec
    monkeypatch.setattr(tracking.importlib.util, "find_spec",
                        lambda name, *a: None if name == "trackio" else real(name, *a))
    from splitmoe.cli import main

    rc = main(["train", "--out", str(tmp_path / "run"), "train.loggers=[tensorboard,trackio]", "train.steps=2"])
    err = capsys.readouterr().err
    assert rc == 2, err
    assert "train.loggers ['trackio'] need the package(s) trackio" in err
    assert 'pip install "splitmoe[track]"' in err
    assert not (tmp_path / "run" / "model").exists()  # refused before the checkpoint was built


def _tensorboard_scalars(log_dir: Path) -> dict[str, dict[int, float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(log_dir))
    acc.Reload()
    out: dict[str, dict[int, float]] = {}
    for tag in acc.Tags()["scalars"]:
        events = acc.Scalars(tag)
        steps = [e.step for e in events]
        assert len(steps) == len(set(steps)), f"{tag}: a step logged twice {steps}"
        out[tag] = {e.step: e.value for e in events}
    return out


def _jsonl_scalars(path: Path) -> dict[str, dict[int, float]]:
    out: dict[str, dict[int, float]] = {}
    for line in path.read_text().splitlines():
        row = json.loads(line)
        for tag, v in tracking.scalars(row).items():
            out.setdefault(tag, {})[row["step"]] = v
    return out


def test_tensorboard_and_trackio_hold_the_metrics_rows_across_a_resume(tmp_path, monkeypatch):
    pytest.importorskip("torch")
    pytest.importorskip("tensorboard")
    if importlib.util.find_spec("trackio") is None:
        pytest.skip("trackio is not installed (pip install -e '.[track]')")
    if "trackio" not in sys.modules:  # trackio reads TRACKIO_DIR once, at its import: keep its store in tmp_path
        monkeypatch.setenv("TRACKIO_DIR", str(tmp_path / "trackio"))
    from trackio.sqlite_storage import SQLiteStorage

    from torch_impl import train

    project = f"splitmoe-test-{uuid.uuid4().hex[:8]}"  # its own project, removed at the end, wherever trackio stores
    out = tmp_path / "run"
    cfg = tiny_cfg(out, "torch", "train.steps=6", "train.save_every=4", "train.eval_every=3",
                   "train.loggers=[tensorboard,trackio]", f"train.tracker_project={project}")
    try:
        # interrupted after step 5: the newest checkpoint is step 4, so the resumed run recomputes step 5
        first = train.train(cfg, stop_after=5, progress=False)
        assert first.final_step == 5
        assert max(_tensorboard_scalars(out / "tensorboard")["loss"]) == 5
        res = train.train(cfg, resume=True, progress=False)
        assert res.final_step == 6

        expected = _jsonl_scalars(out / "metrics.jsonl")
        assert sorted(expected["loss"]) == [1, 2, 3, 4, 5, 6] and sorted(expected["eval_loss"]) == [0, 3, 6]
        board = _tensorboard_scalars(out / "tensorboard")
        assert set(board) == set(expected)
        for tag, by_step in expected.items():
            assert sorted(board[tag]) == sorted(by_step), tag  # the first run's step 5 was purged, not doubled
            # TensorBoard stores float32 scalars
            np.testing.assert_array_equal([board[tag][s] for s in sorted(by_step)],
                                          np.float32([by_step[s] for s in sorted(by_step)]), err_msg=tag)

        name = f"{out.parent.name}/{out.name}"
        records = SQLiteStorage.get_logs(project, name)
        config = SQLiteStorage.get_run_config(project, name)
        assert config["lora.rank"] == cfg.lora.rank and config["train.loggers"] == ["tensorboard", "trackio"]
        logged: dict[str, dict[int, float]] = {}
        for rec in records:  # in log order: the resumed run's step 5 comes after the first run's
            for tag in expected:
                if tag in rec:
                    logged.setdefault(tag, {})[rec["step"]] = rec[tag]
        assert logged == expected
    finally:
        import trackio

        trackio.delete_project(project, force=True)
