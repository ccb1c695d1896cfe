"""jax_impl's training state in orbax (jax_impl/train.py): the orbax folder tree sits inside the atomically written
step folder and is covered by meta.json's size + SHA-256 manifest; a kill at any point of a save, inside orbax or
around it (raised in-process, and a real SIGKILL of a subprocess), keeps the last good checkpoint, which restores
exactly (that resumed runs equal uninterrupted ones bit for bit is the train suite's test, and this file's for the
old format); restore goes into the abstract target of the current trainer, refusing a state of another adapter
layout with a ConfigError; damaged orbax files are CheckpointDamaged in one line, with nothing else printed; and run
folders holding the pre-orbax `state.npz` still resume, exactly.

The run folders are the train suite's tiny ones (tests/shared/train_suite.py): one 4-step base run with checkpoints
at steps 2 and 4, copied and altered by each test.
"""

from __future__ import annotations

import gc
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

jax = pytest.importorskip("jax")
pytest.importorskip("flax")
ocp = pytest.importorskip("orbax.checkpoint")

from jax_impl import train as jt  # noqa: E402
from shared_math import training  # noqa: E402
from shared_math.train_config import ConfigError  # noqa: E402
from shared_math.training import (  # noqa: E402
    CheckpointDamaged,
    checkpoint_meta,
    latest_checkpoint,
    verify_checkpoint,
    write_checkpoint_atomic,
)
from tests.shared.train_suite import tiny_cfg  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
BASE = ["train.steps=4", "train.save_every=2"]  # checkpoints step_2 and step_4 (TINY keeps 3)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    from shared_math.training import build_model_checkpoint

    root = tmp_path_factory.mktemp("tiny")
    return build_model_checkpoint(tiny_cfg(root, "jax"), root)


def _cfg(model_dir: Path, out: Path, *extra: str):
    return tiny_cfg(out, "jax", f"model.path={model_dir}", *BASE, *extra)


@pytest.fixture(scope="module")
def base_run(model_dir, tmp_path_factory):
    """An uninterrupted 4-step run with checkpoints at steps 2 and 4: (its folder, its losses)."""
    out = tmp_path_factory.mktemp("base")
    res = jt.train(_cfg(model_dir, out), progress=False)
    return out, res.losses


@pytest.fixture(scope="module")
def trainer(model_dir, tmp_path_factory):
    """A trainer after 2 steps (its own run folder; tests point `run.out_dir` at theirs)."""
    tr = jt.Trainer(_cfg(model_dir, tmp_path_factory.mktemp("trainer")))
    tr.train_step()
    tr.train_step()
    return tr


@pytest.fixture(scope="module")
def fresh(trainer):
    """A second trainer of the same config and data, at step 0: restores are checked into it."""
    return jt.Trainer(trainer.cfg, run=trainer.run)


def _ckpt(run: Path, step: int) -> Path:
    return run / "checkpoints" / f"step_{step:08d}"


def _copy(base_run, tmp_path) -> Path:
    run = tmp_path / "run"
    shutil.copytree(base_run[0], run)
    return run


def _files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file())


def _largest(folder: Path) -> Path:
    return max(_files(folder), key=lambda p: p.stat().st_size)


def _assert_same_state(a: jt.Trainer, b: jt.Trainer) -> None:
    """Equal values, dtypes and tree structure of the whole training state, and equal steps."""
    sa, sb = a._state_tree(), b._state_tree()
    assert jax.tree.structure(sa) == jax.tree.structure(sb)
    for x, y in zip(jax.tree.leaves(sa), jax.tree.leaves(sb), strict=True):
        assert np.asarray(x).dtype == np.asarray(y).dtype
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    assert a.step == b.step


# ---- layout and manifest ---------------------------------------------------------------------------------------------

def test_checkpoint_is_an_orbax_tree_covered_by_the_manifest(base_run):
    ckpt = _ckpt(base_run[0], 4)
    assert (ckpt / jt.STATE_DIR).is_dir() and not (ckpt / jt.LEGACY_STATE_FILE).exists()
    assert not [p for p in ckpt.rglob("*") if "orbax-checkpoint-tmp" in p.name]  # orbax finished its own commit
    files = json.loads((ckpt / "meta.json").read_text())["files"]
    on_disk = {p.relative_to(ckpt).as_posix() for p in _files(ckpt)} - {"meta.json"}
    assert set(files) == on_disk and all(name.startswith("state/") for name in files)
    assert any(name.count("/") >= 2 for name in files)  # sub-folders of state/ too (ocdbt.process_0/d/...)
    assert verify_checkpoint(ckpt)["step"] == 4


def test_save_fsyncs_every_file_and_folder_before_the_rename(trainer, tmp_path, monkeypatch):
    synced, renames = [], []
    real_fsync, real_rename = training._fsync_path, os.rename

    def fsync(path):
        synced.append(Path(path))
        real_fsync(path)

    def rename(src, dst, *a, **k):
        renames.append((Path(src), Path(dst), len(synced)))
        return real_rename(src, dst, *a, **k)

    monkeypatch.setattr(trainer.run, "out_dir", tmp_path)
    monkeypatch.setattr(training, "_fsync_path", fsync)
    monkeypatch.setattr(os, "rename", rename)
    final = trainer.save_checkpoint()
    tmp, _, n_before = next(r for r in renames if r[1] == final)  # the step folder's rename (orbax renames too)
    before = {p.relative_to(tmp) for p in synced[:n_before] if p.is_relative_to(tmp)}
    tree = {p.relative_to(final) for p in final.rglob("*")} | {Path(".")}
    assert tree <= before  # every file and folder of the step folder, at any depth, then the folder itself
    assert synced[n_before] == final.parent  # and the parent after the rename


# ---- restore -------------------------------------------------------------------------------------------------------

def test_restore_into_a_fresh_trainer_is_exact(trainer, fresh, tmp_path, monkeypatch):
    monkeypatch.setattr(trainer.run, "out_dir", tmp_path)
    ckpt = trainer.save_checkpoint()
    fresh.restore(ckpt)
    _assert_same_state(fresh, trainer)
    assert float(fresh.opt_state.hyperparams["learning_rate"]) == float(trainer.opt_state.hyperparams["learning_rate"])
    # and the module view (evaluate, save_adapter) holds the restored adapters
    from jax_impl.lora import lora_state_dict

    for name, value in lora_state_dict(trainer.model).items():
        np.testing.assert_array_equal(lora_state_dict(fresh.model)[name], value)
    # placed as the trainer's own arrays (uncommitted): the next step reuses the compiled step, no recompilation
    compiled = jt._loss_and_grad._cache_size(), jt._apply._cache_size()
    fresh.train_step()
    assert (jt._loss_and_grad._cache_size(), jt._apply._cache_size()) == compiled


def test_a_relative_run_folder_saves_and_restores(trainer, fresh, tmp_path, monkeypatch):
    """`train.out_dir = "runs/demo"` (the demo's, and the shipped configs' kind): orbax refuses a relative path
    ("Checkpoint path should be absolute"), so `splitmoe demo --framework jax` failed at its first save (session 23)."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(trainer.run, "out_dir", Path("runs") / "demo")
    ckpt = trainer.save_checkpoint()
    assert (tmp_path / ckpt / jt.STATE_DIR).is_dir()
    fresh.restore(ckpt)  # a relative folder to restore from, as `--resume runs/demo/...` gives
    _assert_same_state(fresh, trainer)


def test_a_state_of_another_adapter_layout_is_a_config_error(base_run, model_dir, tmp_path, monkeypatch):
    """Restore goes into the abstract target of this trainer: a checkpoint whose arrays differ (here rank 4 into a
    rank-2 trainer, past check_resume as code that changed under an equal config would be) is refused, naming the
    arrays, before anything changes."""
    other = jt.Trainer(_cfg(model_dir, tmp_path, "lora.rank=2"))
    before = jax.tree.map(np.asarray, other._state_tree())
    monkeypatch.setattr(jt, "check_resume", lambda folder, cfg, fw: verify_checkpoint(folder))
    with pytest.raises(ConfigError, match=r"does not fit this trainer's model and adapters \(\d+ array\(s\) differ, "
                                          r"e\.g\. .*: saved float32\[.*4.*\], this trainer float32\[.*2.*\]"):
        other.restore(_ckpt(base_run[0], 4))
    for x, y in zip(jax.tree.leaves(before), jax.tree.leaves(other._state_tree()), strict=True):
        np.testing.assert_array_equal(x, np.asarray(y))  # refused before the first change
    assert other.step == 0


@pytest.mark.parametrize("damage", ["bit_flip", "missing_file", "forged_manifest"])
def test_damaged_orbax_state_is_one_clear_error(base_run, fresh, tmp_path, capfd, caplog, monkeypatch, damage):
    run = _copy(base_run, tmp_path)
    ckpt = _ckpt(run, 4)
    victim = _largest(ckpt / jt.STATE_DIR)  # the array data
    data = victim.read_bytes()
    if damage == "bit_flip":  # orbax alone would restore wrong numbers: zstd chunks carry no checksum
        victim.write_bytes(data[:len(data) // 2] + bytes([data[len(data) // 2] ^ 0x10]) + data[len(data) // 2 + 1:])
        match = f"{victim} does not match the SHA-256"
    elif damage == "missing_file":
        victim.unlink()
        match = f"{victim} is missing"
    else:  # damaged, and the manifest rewritten to match: orbax itself has to fail, in one line. Every OCDBT data
        # file is cut, not only the largest: which of them the manifest still references varies between runs (one
        # CI run cut an unreferenced one, and orbax rightly read the state)
        for f in _files(ckpt / jt.STATE_DIR):
            if f.parent.name == "d":
                f.write_bytes(f.read_bytes()[:f.stat().st_size // 2])
        meta = json.loads((ckpt / "meta.json").read_text())
        meta["files"] = {p.relative_to(ckpt).as_posix(): training._file_record(p) for p in _files(ckpt)
                         if p.name != "meta.json"}
        (ckpt / "meta.json").write_text(json.dumps(meta))
        match = f"{ckpt / jt.STATE_DIR} cannot be read by orbax"
    # everything orbax's failure could print besides the exception, watched here rather than left to pytest's own
    # capture (which would intercept log records and unraisable reports before they reach stderr)
    unraisable = []
    monkeypatch.setattr(sys, "unraisablehook", unraisable.append)
    capfd.readouterr()
    with pytest.raises(CheckpointDamaged) as e:
        fresh.restore(ckpt)
    assert match in str(e.value) and "\n" not in str(e.value) and "tensorstore_spec" not in str(e.value)
    if damage == "forged_manifest":  # orbax read: reports of reads still in flight would arrive now
        time.sleep(0.5)
        gc.collect()
    assert unraisable == [] and [r for r in caplog.records if r.levelno >= logging.WARNING] == []
    err = capfd.readouterr().err
    assert "Traceback" not in err and "Exception ignored" not in err and "never retrieved" not in err, err


# ---- kills during a save --------------------------------------------------------------------------------------------

class Killed(BaseException):
    """A kill: BaseException, so no `except Exception` on the way can swallow it."""


def _kill_at(point: str, monkeypatch) -> None:
    """Make the next save die at `point`: inside orbax (array data written, orbax's own commit not done), while
    hashing the files, during the fsyncs, or at the step folder's rename."""
    def die(*a, **k):
        raise Killed(point)

    if point == "orbax_wrote_data":
        real = ocp.StandardCheckpointHandler.save

        def save(self, *a, **k):
            real(self, *a, **k)
            die()
        monkeypatch.setattr(ocp.StandardCheckpointHandler, "save", save)
    elif point == "orbax_finalize":
        monkeypatch.setattr(ocp.StandardCheckpointHandler, "finalize", die)
    elif point == "manifest":
        monkeypatch.setattr(training, "_file_record", die)
    elif point == "fsync":
        real_fsync = training._fsync_path
        monkeypatch.setattr(training, "_fsync_path",
                            lambda p: die() if Path(p).name.startswith(".tmp-step") else real_fsync(p))
    elif point == "rename":
        real_rename = os.rename
        monkeypatch.setattr(os, "rename",
                            lambda s, d, *a, **k: die() if Path(s).name.startswith(".tmp-step") else
                            real_rename(s, d, *a, **k))


@pytest.mark.parametrize("point", ["orbax_wrote_data", "orbax_finalize", "manifest", "fsync", "rename"])
def test_kill_at_any_point_of_a_save_keeps_the_last_checkpoint(trainer, fresh, tmp_path, monkeypatch, point):
    monkeypatch.setattr(trainer.run, "out_dir", tmp_path)
    good = trainer.save_checkpoint()  # step 2
    monkeypatch.setattr(trainer, "step", 3)
    with monkeypatch.context() as m:
        _kill_at(point, m)
        with pytest.raises(Killed):
            trainer.save_checkpoint()
    assert latest_checkpoint(tmp_path) == good
    assert [p.name for p in (tmp_path / "checkpoints").iterdir() if p.name.startswith(".tmp-step_00000003")]
    fresh.restore(good)
    monkeypatch.setattr(trainer, "step", 2)
    _assert_same_state(fresh, trainer)
    training.clean_partial_checkpoints(tmp_path)  # what the next run does first
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step_00000002"]


_KILLED_SAVE = textwrap.dedent("""
    import os, signal, sys
    import orbax.checkpoint as ocp
    from jax_impl import train as jt
    from tests.shared.train_suite import tiny_cfg

    tr = jt.Trainer(tiny_cfg(sys.argv[1], "jax", *sys.argv[2:]))
    tr.save_checkpoint()  # step 0: the last good checkpoint
    real = ocp.StandardCheckpointHandler.save

    def save(self, directory, *a, **k):  # orbax has written the arrays into its own temporary folder: kill -9
        real(self, directory, *a, **k)
        os.kill(os.getpid(), signal.SIGKILL)

    ocp.StandardCheckpointHandler.save = save
    tr.step = 2
    tr.save_checkpoint()
    sys.exit("not killed")
""")


def test_sigkill_inside_orbax_keeps_the_last_checkpoint(trainer, fresh, model_dir, tmp_path):
    """A real kill -9 (no exception handler, no cleanup runs) in the middle of orbax's save of step 2, after it wrote
    the arrays: the step-0 checkpoint before it stays the latest and restores exactly (that resumed runs then equal
    uninterrupted ones is the train suite's kill test, tests/jax/test_train.py)."""
    args = [f"model.path={model_dir}", *BASE]
    proc = subprocess.run([sys.executable, "-c", _KILLED_SAVE, str(tmp_path), *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=300, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    assert latest_checkpoint(tmp_path).name == "step_00000000"
    (partial,) = [p for p in (tmp_path / "checkpoints").iterdir() if p.name.startswith(".tmp-step_00000002")]
    assert _files(partial) and not (partial / "meta.json").exists()  # orbax had written data; nothing committed

    fresh.restore(latest_checkpoint(tmp_path))
    _assert_same_state(fresh, jt.Trainer(trainer.cfg, run=trainer.run))  # the initial state, from train.seed
    training.clean_partial_checkpoints(tmp_path)  # what the next run does first
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == ["step_00000000"]


# ---- the format before orbax ---------------------------------------------------------------------------------------

def _write_legacy_npz(tr: jt.Trainer, tmp: Path) -> None:
    """The writer of splitmoe before orbax (jax_impl/train.py at af967e0): LoRA by canonical name, the optax
    state's leaves in tree order, the key's data, the step."""
    from jax_impl.lora import lora_state_dict

    arrays = {f"lora/{k}": v for k, v in lora_state_dict(tr.model).items()}
    for i, leaf in enumerate(jax.tree.leaves(tr.opt_state)):
        arrays[f"opt/{i:05d}"] = np.asarray(leaf)
    arrays["rng"] = np.asarray(jax.random.key_data(tr.rng))
    arrays["step"] = np.asarray(tr.step)
    with open(tmp / jt.LEGACY_STATE_FILE, "wb") as f:
        np.savez(f, **arrays)


def test_a_run_folder_of_state_npz_checkpoints_still_resumes_exactly(base_run, model_dir, fresh, tmp_path):
    """An old run folder (its step-2 checkpoint in the npz format, written as the old code did) resumes to the
    uninterrupted run's losses; the checkpoints it writes from then on are orbax's."""
    run = tmp_path / "run"
    cfg = _cfg(model_dir, run)
    fresh.restore(_ckpt(base_run[0], 2))  # the state at step 2, written out in the old format
    shutil.copytree(base_run[0], run, ignore=shutil.ignore_patterns("checkpoints"))
    write_checkpoint_atomic(run, 2, checkpoint_meta(cfg, 2, "jax"), lambda tmp: _write_legacy_npz(fresh, tmp))
    old = _ckpt(run, 2)
    assert sorted(p.name for p in old.iterdir()) == ["meta.json", "state.npz"]

    res = jt.train(cfg, resume=True, progress=False)
    assert res.start_step == 2 and res.skipped_checkpoints == []
    np.testing.assert_array_equal(res.losses, base_run[1][2:])
    assert (_ckpt(run, 4) / jt.STATE_DIR).is_dir() and (old / "state.npz").is_file()
