"""Bad input to training and resuming, found by an adversarial review of `splitmoe train` / `demo`, run configs, run
folders and checkpoints in both frameworks, and kept here so it stays fixed: each was a silent wrong answer, an error
naming nothing, a run that could not be resumed, or a folder's data deleted.

- A negative train.seed / data.seed / data.synthetic.seed failed as numpy's "expected non-negative integer", naming
  no key, after the model was built into the run folder: now refused naming the key, before any write.
- optim.max_grad_norm=nan turned clipping off in silence (NaN passes every `< 0` check, and min(1, nan) is 1),
  optim.eps=inf made every update zero (the adapter never moved), and a NaN eps / weight_decay failed inside torch's
  AdamW naming no key: refused as finite numbers, naming the key.
- An empty train.out_dir (`train.out_dir=$UNSET`) trained into the working directory, as did `demo --out ""`, and
  `train --out ""` was dropped for the config's own folder: refused.
- train.jax_compile_cache (where JAX keeps compiled programs) counted as part of the run's trajectory: a run could not
  be resumed with the cache in another folder (another machine) or off; and README's `train.jax_compile_cache=off`
  was refused ("must be a string, got False": YAML reads a bare off as a boolean).
- Resuming a run whose metrics.jsonl ends in a row cut short (the run was killed while writing it) failed with a bare
  JSONDecodeError ("Expecting ',' delimiter"), and one whose metrics.jsonl was removed with "No such file": the run
  could not be resumed at all. The torn row is dropped (the resume recomputes it), a missing file starts afresh, and
  a bad line elsewhere is one error naming the file and line.
- The resume check compared the config, which names the data but not their contents: a data file edited or
  regenerated since, or a relative data.path read from another working directory, resumed in silence on other
  batches. Checkpoints record the packed rows' SHA-256 (meta.json "train_data"), and a resume on other data is refused.
- A model.tiny run deleted a `<out_dir>/model` that no preset built (a downloaded model in a project folder given as
  --out) to build its preset there: now refused, the folder left as it was.
- A fresh run refused because its folder holds a finished run's adapter had first replaced that run's `model/` (the
  adapter's base) with its own preset's model.
- A resume that skipped a damaged newer checkpoint, with keep_checkpoints=1: its next save pruned by name, deleting
  the checkpoint just written and keeping the damaged one, so a kill before the following save left nothing to
  resume from.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from shared_math.train_config import ConfigError, diff_configs, load_run_config, trajectory_dict, with_overrides
from shared_math.training import TINY_SPEC_FILE, MetricsLog, build_model_checkpoint
from splitmoe.cli import main
from tests.conftest import HAS_TORCH, requires_jax, requires_torch

ROOT = Path(__file__).resolve().parents[2]
GPT_OSS_TINY = str(ROOT / "configs" / "models" / "gpt_oss_tiny.yaml")


# ---- the config ----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("override, message", [
    ("train.seed=-1", "train.seed must be >= 0, got -1"),
    ("data.seed=-2", "data.seed must be >= 0, got -2"),
    ("data.synthetic.seed=-3", "data.synthetic: seed must be an integer >= 0, got -3"),
    ("train.out_dir=", "train.out_dir is empty"),
    ("optim.max_grad_norm=.nan", r"optim.max_grad_norm must be a finite number, got nan \(0 turns clipping off\)"),
    ("optim.eps=.inf", "optim.eps must be a finite number, got inf"),
    ("optim.eps=.nan", "optim.eps must be a finite number, got nan"),
    ("optim.weight_decay=.nan", "optim.weight_decay must be a finite number, got nan"),
])
def test_bad_seeds_optim_numbers_and_an_empty_out_dir_are_refused_naming_the_key(override, message):
    with pytest.raises(ConfigError, match=message):
        load_run_config(None, [override])


def test_a_negative_seed_is_refused_before_anything_is_written(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", "--quiet", "--out", str(out), "train.seed=-1"]) == 2
    err = capsys.readouterr().err
    assert "train.seed must be >= 0, got -1" in err and not out.exists()


def test_an_empty_out_flag_is_refused_not_dropped(tmp_path, monkeypatch):
    from splitmoe.train_cli import _cli_overrides, run_default_job

    # `--out "$OUT"` with OUT unset: train dropped it and trained in the config's own folder, demo in the working one
    with pytest.raises(ConfigError, match="train.out_dir is empty"):
        load_run_config(None, _cli_overrides([], "", None))
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError, match="the demo's run folder is empty: pass --out DIR"):
        run_default_job("", progress=False, overrides=["train.steps=1", "data.synthetic.num_train=8",
                                                       "data.synthetic.num_eval=2", "data.batch_size=4"])
    assert not list(tmp_path.iterdir())


def test_the_jax_compile_cache_can_be_turned_off_and_changed_on_resume():
    cfg = load_run_config(None, ["framework=jax"])
    # README's `train.jax_compile_cache=auto|off|FOLDER`: YAML reads a bare off as false ("must be a string")
    assert load_run_config(None, ["train.jax_compile_cache=off"]).train.jax_compile_cache == "off"
    for setting in ("off", "/elsewhere/jax-cache"):
        other = with_overrides(cfg, f"train.jax_compile_cache={setting}")
        assert diff_configs(trajectory_dict(cfg), trajectory_dict(other)) == []


# ---- the run folder's model/ ---------------------------------------------------------------------------------------

def _family(model_dir: Path) -> str:
    return json.loads((model_dir / "config.json").read_text())["model_type"]


def test_a_model_no_preset_built_is_refused_not_deleted(tmp_path):
    from shared_math.tiny import write_tiny_checkpoint

    out = tmp_path / "project"
    mine = write_tiny_checkpoint("gpt_oss", out / "model")  # a downloaded model: more than a preset writes
    (mine / "README.md").write_text("my model")
    (mine / "generation_config.json").write_text("{}")
    cfg = load_run_config(None, [f"train.out_dir={out}"])  # the default model.tiny (Qwen3-MoE)
    with pytest.raises(ConfigError, match=r"holds a model that no model.tiny preset built \(it has README.md, "
                                          r"generation_config.json\).*set model.path="):
        build_model_checkpoint(cfg, out)
    assert (mine / "README.md").read_text() == "my model" and _family(mine) == "gpt_oss"
    # a preset's own folder, even one from before the preset marker, is still rebuilt for another preset
    ours = build_model_checkpoint(cfg, tmp_path / "run")
    (ours / TINY_SPEC_FILE).unlink()
    oss = load_run_config(None, [f"train.out_dir={tmp_path / 'run'}", f"model.tiny={GPT_OSS_TINY}"])
    assert _family(build_model_checkpoint(oss, tmp_path / "run")) == "gpt_oss"


def test_a_refused_fresh_run_keeps_the_finished_runs_model(tmp_path, capsys):
    out = tmp_path / "finished"
    qwen = load_run_config(None, [f"train.out_dir={out}"])
    model = build_model_checkpoint(qwen, out)
    (out / "adapter").mkdir()  # a run with train.save_every=0: its adapter, trained on model/, and no checkpoint
    (out / "adapter" / "adapter_model.safetensors").write_text("trained")
    oss = load_run_config(None, [f"train.out_dir={out}", f"model.tiny={GPT_OSS_TINY}"])
    assert build_model_checkpoint(oss, out) == model and _family(model) == "qwen3_moe"
    if HAS_TORCH:  # end to end: the run is refused, and model/ is still the adapter's base
        assert main(["train", "--quiet", "--out", str(out), f"model.tiny={GPT_OSS_TINY}", "train.steps=1",
                     "data.synthetic.num_train=8", "data.synthetic.num_eval=2", "data.batch_size=4"]) == 2
        assert "already holds a trained adapter" in capsys.readouterr().err and _family(model) == "qwen3_moe"


# ---- metrics.jsonl and resume ----------------------------------------------------------------------------------------

def test_a_bad_metrics_line_is_named(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 0, "eval_loss": 1.0}\nnot json\n{"step": 1, "loss": 2.0}\n')
    with pytest.raises(ConfigError, match=r"metrics.jsonl:2 is not a JSON row of metrics \('not json'\)"):
        MetricsLog(path, resume_step=1)
    # a last row cut short is dropped, the rows up to the resumed step kept
    path.write_text('{"step": 0, "eval_loss": 1.0}\n{"step": 1, "loss": 2.0}\n{"step": 2, "lo')
    log = MetricsLog(path, resume_step=1)
    assert log.rows() == [{"step": 0, "eval_loss": 1.0}, {"step": 1, "loss": 2.0}]


FRAMEWORKS = [pytest.param("torch", marks=requires_torch), pytest.param("jax", marks=requires_jax)]
RECORDS = [{"text": f"record {i}: {'ab' * (i % 5)}"} for i in range(16)]


def _train_module(framework: str):
    if framework == "torch":
        from torch_impl import train
    else:
        from jax_impl import train
    return train


def _cfg(framework: str, model_dir: Path, out: Path):
    # data.path relative: read from the working directory, which each test sets to its copy of the run folder
    return load_run_config(None, [
        f"framework={framework}", f"model.path={model_dir}", f"train.out_dir={out}", "data.source=jsonl",
        "data.path=data.jsonl", "data.batch_size=4", "lora.rank=2", "lora.alpha=4", "optim.warmup_steps=1",
        "train.steps=2", "train.save_every=1", "train.eval_every=0", "train.log_every=1", "train.keep_checkpoints=3"])


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("tiny")
    return build_model_checkpoint(load_run_config(None, [f"train.out_dir={root}"]), root)


@pytest.fixture(scope="module", params=FRAMEWORKS)
def base_run(request, model_dir, tmp_path_factory) -> tuple[str, Path]:
    """A finished 2-step run on a JSONL file inside its folder, checkpoints at steps 1 and 2: (framework, folder)."""
    out = tmp_path_factory.mktemp(f"base-{request.param}")
    (out / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in RECORDS))
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(out)
        _train_module(request.param).train(_cfg(request.param, model_dir, out), progress=False)
    return request.param, out


def _resume(base_run, model_dir, run: Path, monkeypatch):
    framework, _ = base_run
    monkeypatch.chdir(run)
    return _train_module(framework).train(_cfg(framework, model_dir, run), resume=True, progress=False)


def _copy(base_run, tmp_path) -> Path:
    run = tmp_path / "run"
    shutil.copytree(base_run[1], run)
    return run


@pytest.mark.parametrize("damage", ["torn last row", "removed"])
def test_a_run_resumes_past_a_torn_or_removed_metrics_file(base_run, model_dir, tmp_path, monkeypatch, damage):
    run = _copy(base_run, tmp_path)
    metrics = run / "metrics.jsonl"
    if damage == "removed":
        metrics.unlink()
    else:  # killed while writing the row of a step after the newest checkpoint
        with metrics.open("a") as f:
            f.write('{"step": 3, "loss": 1.')
    res = _resume(base_run, model_dir, run, monkeypatch)
    assert res.start_step == res.final_step == 2 and (run / "adapter" / "adapter_model.safetensors").is_file()
    rows = [json.loads(line) for line in metrics.read_text().splitlines()]  # every line a row again
    assert rows[-1]["step"] == 2 and "loss" not in rows[-1]  # the final evaluation, made again
    assert [r["step"] for r in rows if "loss" in r] == ([] if damage == "removed" else [1, 2])


def test_resuming_on_other_data_is_refused(base_run, model_dir, tmp_path, monkeypatch):
    run = _copy(base_run, tmp_path)
    with (run / "data.jsonl").open("a") as f:  # the data file edited since
        f.write(json.dumps({"text": "one more record"}) + "\n")
    with pytest.raises(ConfigError, match=r"cannot resume from .*step_00000002: it was trained on other data \(16 "
                                          r"documents in \d+ packed rows then, 17 in \d+ now.*data.path data.jsonl"):
        _resume(base_run, model_dir, run, monkeypatch)
    # the same records in another order: other packed rows, other batches
    (run / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in reversed(RECORDS)))
    with pytest.raises(ConfigError, match="trained on other data"):
        _resume(base_run, model_dir, run, monkeypatch)
    # a checkpoint written before the record existed has nothing to compare: it resumes as before
    for ckpt in (run / "checkpoints").iterdir():
        meta = json.loads((ckpt / "meta.json").read_text())
        del meta["train_data"]
        (ckpt / "meta.json").write_text(json.dumps(meta))
    assert _resume(base_run, model_dir, run, monkeypatch).final_step == 2


def test_pruning_never_deletes_the_checkpoint_just_written(tmp_path):
    """Checkpoints 20 (intact) and 30 (damaged, so a resume took 20): the save at step 25 with keep=1 keeps 25."""
    from shared_math.training import CheckpointDamaged, verify_checkpoint, write_checkpoint_atomic

    def files(tmp):
        (tmp / "state.bin").write_bytes(b"x" * 8)

    for step in (20, 30):
        write_checkpoint_atomic(tmp_path, step, {"step": step}, files, keep=2)
    (tmp_path / "checkpoints" / "step_00000030" / "state.bin").write_bytes(b"damaged")
    write_checkpoint_atomic(tmp_path, 25, {"step": 25}, files, keep=1)
    left = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert left == ["step_00000025", "step_00000030"]  # 20 pruned; 30 stays until the run replaces it
    verify_checkpoint(tmp_path / "checkpoints" / "step_00000025")  # what the next resume takes
    with pytest.raises(CheckpointDamaged):
        verify_checkpoint(tmp_path / "checkpoints" / "step_00000030")
