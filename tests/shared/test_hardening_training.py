"""Training hardening, in both frameworks: resuming never unpickles anything from a run folder; a damaged newest
checkpoint is skipped (with a message) for the newest intact one, and none intact is one clear error; a backend that
cannot run here and an overflowing learning rate end in one line and exit 2, before any work; a collapsed run
(grad-norm 0 at loss ln V) and an update that makes the LoRA tensors non-finite stop as TrainingDiverged with nothing
saved; out-of-range token ids are refused before JAX's jitted calls as in the eager model.

Runs are the train suite's tiny ones (tests/shared/train_suite.py): one 4-step base run per framework, copied and
damaged by each test.
"""

from __future__ import annotations

import hashlib
import json
import math
import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest

from shared_math.train_config import BackendUnavailable, ConfigError
from shared_math.training import CheckpointDamaged, TrainingDiverged, latest_checkpoint
from tests.shared.train_suite import TINY, tiny_cfg

BASE = ["train.steps=4", "train.save_every=2"]  # checkpoints step_2 and step_4 (TINY keeps 3)
# the GPU-only backend of each framework, and what runs on this CPU machine instead
GPU_ONLY = {"torch": ("triton", "native"), "jax": ("pallas_triton", "ragged_dot")}


@pytest.fixture(scope="module", params=["torch", "jax"])
def fw(request):
    """The framework's train module (skips when that framework is not installed)."""
    if request.param == "torch":
        pytest.importorskip("torch")
        from torch_impl import train
    else:
        pytest.importorskip("jax")
        pytest.importorskip("flax")
        from jax_impl import train
    return train


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    """One tiny checkpoint for the whole module."""
    from shared_math.training import build_model_checkpoint

    root = tmp_path_factory.mktemp("tiny")
    return build_model_checkpoint(tiny_cfg(root, "torch"), root)


@pytest.fixture(scope="module")
def base_run(fw, model_dir, tmp_path_factory):
    """An uninterrupted 4-step run with checkpoints at steps 2 and 4: (its folder, its losses)."""
    out = tmp_path_factory.mktemp(f"base-{fw.FRAMEWORK}")
    res = fw.train(_cfg(fw, model_dir, out), progress=False)
    assert [p.name for p in sorted((out / "checkpoints").iterdir())] == ["step_00000002", "step_00000004"]
    return out, res.losses


def _cfg(fw, model_dir, out, *extra):
    return tiny_cfg(out, fw.FRAMEWORK, f"model.path={model_dir}", *BASE, *extra)


def _copy(base_run, tmp_path) -> Path:
    run = tmp_path / "run"
    shutil.copytree(base_run[0], run)
    return run


def _ckpt(run: Path, step: int) -> Path:
    return run / "checkpoints" / f"step_{step:08d}"


def _rewrite_manifest(ckpt: Path) -> None:
    """What an attacker with write access to the run folder can do: make meta.json's file records match (every file
    at any depth, by its path relative to the step folder, as the trainers record jax's orbax state/ tree)."""
    meta = json.loads((ckpt / "meta.json").read_text())
    meta["files"] = {p.relative_to(ckpt).as_posix(): {"bytes": p.stat().st_size,
                                                      "sha256": hashlib.sha256(p.read_bytes()).hexdigest()}
                     for p in sorted(ckpt.rglob("*")) if p.is_file() and p.name != "meta.json"}
    (ckpt / "meta.json").write_text(json.dumps(meta))


def _state_file(fw, ckpt: Path) -> Path:
    """The file of a checkpoint's training state to damage: torch's state.safetensors; for jax the largest file of
    its orbax state/ folder (the array data)."""
    if fw.FRAMEWORK == "torch":
        return ckpt / fw.STATE_FILE
    return max((p for p in (ckpt / fw.STATE_DIR).rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)


def _unreadable(fw, ckpt: Path, state: Path) -> str:
    """How the loader refuses a damaged state that no manifest caught: torch cannot read the file; jax never lets
    orbax read a state whose meta.json records no files (tests/jax/test_orbax_state.py covers orbax's own errors)."""
    return f"{state} cannot be read" if fw.FRAMEWORK == "torch" else f"{ckpt / 'meta.json'} records no files"


class _Payload:
    """Unpickling this creates the file `path`: the stand-in for arbitrary code in a planted checkpoint."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)

    def __reduce__(self):
        return open, (self.path, "w")


def _plant_pickle(fw, path: Path, marker: Path) -> None:
    """Overwrite `path` with a pickle that the old loader would have run: torch.load(weights_only=False) of a
    state.pt, or an npz with an object array."""
    if fw.FRAMEWORK == "torch":
        import torch

        torch.save({"lora": _Payload(marker)}, path)
    else:
        with open(path, "wb") as f:
            np.savez(f, rng=np.array([_Payload(marker)], dtype=object))


def _assert_resumed_from_step_2(fw, res, base_losses, run: Path, skipped: str, capsys) -> None:
    assert res.start_step == 2 and res.final_step == 4
    np.testing.assert_array_equal(res.losses, base_losses[2:])  # bit-for-bit from the older checkpoint
    assert len(res.skipped_checkpoints) == 1 and "step_00000004" in res.skipped_checkpoints[0]
    assert skipped in res.skipped_checkpoints[0]
    err = capsys.readouterr().err
    assert f"{fw.FRAMEWORK} warning: skipped damaged checkpoint step_00000004" in err and skipped in err
    assert "Traceback" not in err and "Exception ignored" not in err  # the loader's failure is one message
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "skipped_checkpoint" in r] == [2]
    assert [r["step"] for r in rows if "loss" in r] == [1, 2, 3, 4]


# ---- 1. no pickle on resume ----------------------------------------------------------------------------------------

def test_resume_never_unpickles_a_planted_state(fw, base_run, model_dir, tmp_path, capsys, monkeypatch):
    probe = tmp_path / "probe"
    pickle.loads(pickle.dumps(_Payload(probe))).close()  # what it returns is the file it opened
    assert probe.exists()  # the payload is live: unpickling it runs code

    run, marker = _copy(base_run, tmp_path), tmp_path / "pwned"
    newest = _ckpt(run, 4)
    if fw.FRAMEWORK == "jax":  # orbax's formats hold no pickle: plant one in the legacy state.npz it falls back to
        shutil.rmtree(newest / fw.STATE_DIR)
        planted = newest / fw.LEGACY_STATE_FILE
    else:
        planted = newest / fw.STATE_FILE
    _plant_pickle(fw, planted, marker)
    _rewrite_manifest(newest)  # so the loader itself, not the checksum, has to refuse it
    if fw.FRAMEWORK == "torch":
        import torch

        _plant_pickle(fw, _ckpt(run, 2) / "state.pt", marker)  # the old format's file, beside the real state
        monkeypatch.setattr(torch, "load", lambda *a, **k: pytest.fail("resume called torch.load"))
    res = fw.train(_cfg(fw, model_dir, run), resume=True, progress=False)
    assert not marker.exists()
    _assert_resumed_from_step_2(fw, res, base_run[1], run, f"{planted} cannot be read", capsys)


@pytest.mark.parametrize("fw", ["torch"], indirect=True)  # state.pt is torch's old format
def test_torch_refuses_an_old_pickled_state_pt(fw, base_run, model_dir, tmp_path):
    run, marker = _copy(base_run, tmp_path), tmp_path / "pwned"
    for step in (2, 4):  # every checkpoint in the old format: nothing to fall back to
        ckpt = _ckpt(run, step)
        for name in (fw.STATE_FILE, fw.STATE_JSON):
            (ckpt / name).unlink()
        _plant_pickle(fw, ckpt / "state.pt", marker)
        _rewrite_manifest(ckpt)
    with pytest.raises(CheckpointDamaged, match=r"every checkpoint .* damaged.*state\.pt is a pickle written by an "
                                                r"older splitmoe and is never loaded"):
        fw.train(_cfg(fw, model_dir, run), resume=True, progress=False)
    assert not marker.exists()


# ---- 2. damaged checkpoints ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("damage", ["truncated", "truncated_no_manifest", "meta_json", "meta_json_removed"])
def test_damaged_newest_checkpoint_falls_back_to_the_newest_intact(fw, base_run, model_dir, tmp_path, capsys, damage):
    run = _copy(base_run, tmp_path)
    newest = _ckpt(run, 4)
    state, meta = _state_file(fw, newest), newest / "meta.json"
    if damage == "meta_json":
        meta.write_text('{"step": 4, "framework": ')  # cut short mid-write by a broken disk
        skipped = f"{meta} is corrupt or unreadable"
    elif damage == "meta_json_removed":  # the folder was listed only with a meta.json: skipped without a word
        meta.unlink()
        skipped = f"{meta} is corrupt or unreadable"
    else:
        size = state.stat().st_size
        state.write_bytes(state.read_bytes()[: size // 2])
        skipped = f"{state} has {size // 2} bytes, {size} were written"
        if damage == "truncated_no_manifest":  # a checkpoint without file records: the loader's error is caught
            m = json.loads(meta.read_text())
            del m["files"]
            meta.write_text(json.dumps(m))
            skipped = _unreadable(fw, newest, state)
    res = fw.train(_cfg(fw, model_dir, run), resume=True, progress=False)
    _assert_resumed_from_step_2(fw, res, base_run[1], run, skipped, capsys)
    assert (res.adapter_dir / "adapter_config.json").is_file()
    # the run re-saved step 4 over the damaged folder: resuming again needs no fallback
    again = fw.train(_cfg(fw, model_dir, run), resume=True, progress=False)
    assert again.start_step == 4 and again.skipped_checkpoints == []


def test_no_intact_checkpoint_left_is_one_clear_error(fw, base_run, model_dir, tmp_path, capsys):
    from splitmoe.cli import main

    run = _copy(base_run, tmp_path)
    state = _state_file(fw, _ckpt(run, 4))
    state.write_bytes(state.read_bytes()[:100])
    (_ckpt(run, 2) / "meta.json").write_bytes(b"\x00\xff not json")
    with pytest.raises(CheckpointDamaged, match="every checkpoint") as e:
        fw.train(_cfg(fw, model_dir, run), resume=True, progress=False)
    assert isinstance(e.value, ConfigError)
    msg = str(e.value)
    assert "step_00000004" in msg and str(state) in msg and str(_ckpt(run, 2) / "meta.json") in msg
    assert main(["train", "--framework", fw.FRAMEWORK, "--resume", "--out", str(run), "--quiet",
                 f"model.path={model_dir}", *TINY, *BASE]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("splitmoe train: error: cannot resume: every checkpoint") and "\n" not in err


def test_manifest_records_stay_inside_the_checkpoint_folder(tmp_path):
    """meta.json records files in sub-folders by relative path (jax's orbax state/ tree); a tampered record that
    points outside the step folder, or through a symbolic link, is damage, never a file to read."""
    from shared_math.training import verify_checkpoint

    ckpt, outside = tmp_path / "step_00000001", tmp_path / "outside"
    (ckpt / "state" / "d").mkdir(parents=True)
    for f in (ckpt / "state" / "d" / "x", outside):
        f.write_bytes(b"abc")
    rec = {"bytes": 3, "sha256": hashlib.sha256(b"abc").hexdigest()}

    def manifest(name: str) -> None:
        (ckpt / "meta.json").write_text(json.dumps({"step": 1, "files": {name: rec}}))

    manifest("state/d/x")
    assert verify_checkpoint(ckpt)["step"] == 1
    for bad in ["../outside", "/abs/x", "state/../../outside", "state//d/x", "./state/d/x", "state\\d\\x", ""]:
        manifest(bad)
        with pytest.raises(CheckpointDamaged, match="bad file record"):
            verify_checkpoint(ckpt)
    (ckpt / "link").symlink_to(outside)
    (ckpt / "state" / "up").symlink_to(tmp_path, target_is_directory=True)
    for linked in ["link", "state/up/outside"]:
        manifest(linked)
        with pytest.raises(CheckpointDamaged, match="is a symbolic link"):
            verify_checkpoint(ckpt)


# ---- 3. errors before any work, one line and exit 2 -----------------------------------------------------------------

def test_backend_that_cannot_run_here_is_one_line_before_any_work(fw, tmp_path, capsys):
    from splitmoe.cli import main

    name, fallback = GPU_ONLY[fw.FRAMEWORK]
    if fw.FRAMEWORK == "torch":
        from torch_impl.backends import why_unavailable
    else:
        from jax_impl.backends import why_unavailable
    if why_unavailable(name) is None:
        pytest.skip(f"{name} runs here (a GPU, or its interpreter is switched on)")
    out = tmp_path / "run"
    assert main(["train", "--framework", fw.FRAMEWORK, "--out", str(out), "--quiet", "train.steps=1",
                 f"model.moe_backend={name}"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "Traceback" not in err
    assert err.startswith(f"splitmoe train: error: MoE backend '{name}'") and "cannot run" in err
    assert "Available here: " in err and fallback in err and "model.moe_backend" in err
    assert not (out / "model").exists()  # refused before the checkpoint and the data were built
    with pytest.raises(BackendUnavailable) as e:  # a ConfigError for the CLI, still a RuntimeError for callers
        fw.Trainer(tiny_cfg(out, fw.FRAMEWORK, f"model.moe_backend={name}"))
    assert isinstance(e.value, ConfigError) and isinstance(e.value, RuntimeError)


def test_overflowing_learning_rate_is_one_line_before_any_work(fw, tmp_path, capsys):
    from splitmoe.cli import main

    out = tmp_path / "run"
    # torch's AdamW used to fail inside optimizer.step: "value cannot be converted to type float without overflow"
    assert main(["train", "--framework", fw.FRAMEWORK, "--out", str(out), "--quiet", *TINY, "train.steps=2",
                 "optim.lr=1e38", "optim.warmup_steps=0"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and err.startswith("splitmoe train: error: optim.lr=1e+38 is too large")
    assert "use a learning rate below 3.4e+37" in err
    assert not (out / "model").exists()


# ---- 4. silent numerical failure -------------------------------------------------------------------------------------

def test_collapsed_run_stops_as_diverged_and_saves_nothing_more(fw, model_dir, tmp_path, capsys):
    """lr 1e9: the first update saturates the adapters (B ~ 3e9), after which the loss sits at ln V with a gradient
    of exactly 0; the run used to go on and save that adapter with exit 0."""
    from splitmoe.cli import main

    v = 128  # the tiny Qwen3-MoE's vocabulary
    cfg = _cfg(fw, model_dir, tmp_path / "run", "train.save_every=1", "optim.lr=1e9")
    with pytest.raises(TrainingDiverged, match=rf"diverged at step 2: loss=4\.85\d* = ln\(V={v}\) with "
                                               r"grad_norm=0.*step_00000001.*Lower optim\.lr"):
        fw.train(cfg, progress=False)
    assert latest_checkpoint(tmp_path / "run").name == "step_00000001"  # nothing written after the collapse
    assert not (tmp_path / "run" / "adapter").exists()
    # the CLI: one line, the divergence exit code (3; 2 is for bad input)
    assert main(["train", "--framework", fw.FRAMEWORK, "--out", str(tmp_path / "cli"), "--quiet",
                 f"model.path={model_dir}", *TINY, *BASE, "optim.lr=1e9"]) == 3
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and err.startswith("splitmoe train: error: training diverged at step 2")
    assert not (tmp_path / "cli" / "adapter").exists()


def test_non_finite_update_stops_before_anything_is_saved(fw, model_dir, tmp_path, monkeypatch):
    # an infinite learning rate makes the first AdamW update inf/NaN in both frameworks, with a finite loss and
    # gradient: only the check of the updated tensors can see it
    cfg = _cfg(fw, model_dir, tmp_path, "train.save_every=1")
    tr = fw.Trainer(cfg)
    monkeypatch.setattr(fw, "lr_at", lambda step, cfg: math.inf)
    with pytest.raises(TrainingDiverged, match="diverged at step 1: the AdamW update made LoRA tensors non-finite"):
        fw.train(cfg, trainer=tr, progress=False)
    assert latest_checkpoint(tmp_path) is None and not (tmp_path / "adapter").exists()


def test_out_of_range_token_ids_are_refused_before_the_jitted_call(fw, model_dir, tmp_path):
    tr = fw.Trainer(_cfg(fw, model_dir, tmp_path))
    msg = r"token ids must lie in \[0, vocab_size=128\), got range \[1, 131\]"
    ids = np.array([[1, 5, 131]], np.int32)
    pos = np.arange(3, dtype=np.int32)[None]
    with pytest.raises(ValueError, match=msg):  # JAX's jitted logits used to be NaN here, silently
        tr.logits(ids, pos)
    good = tr.run.train_data.batch(0)
    bad = {**good, "input_ids": good["input_ids"].copy()}
    bad["input_ids"][0, :2] = [-1, 0]
    tr.run.train_data.batch = lambda i: bad
    with pytest.raises(ValueError, match=r"token ids must lie in \[0, vocab_size=128\), got range \[-1, "):
        tr.train_step()
    assert tr.step == 0
