"""Framework-free pieces of a training run, shared by `torch_impl.train` and `jax_impl.train` so that the two differ
only in the forward/backward and the optimizer call:

- `prepare_run(cfg)`: the checkpoint (a tiny preset is built into `<out_dir>/model`), tokenizer, packed training
  data, held-out records; `init_lora_tensors`: the initial adapter drawn in numpy from `train.seed` (A ~ PEFT's
  kaiming-uniform U(±1/sqrt(in)), B = 0), loaded into either framework so both start from the same adapter;
  `read_model_config(cfg)`: the model's config without building anything (to refuse a device mesh before any work).
- `lr_at(step)`: linear warmup then cosine decay, evaluated in Python for both frameworks.
- `clip_coefficient(norm)`: global-norm clipping as torch's clip_grad_norm_ computes it, applied in both.
- Divergence: `check_finite` (NaN/inf loss or grad norm, or a collapsed run: grad norm exactly 0 at loss ln V) and
  `check_params_finite` (an update made the LoRA tensors non-finite) raise TrainingDiverged before anything is saved;
  `check_optim_range` refuses a learning rate whose AdamW step cannot be represented in float32.
- Checkpoints: `write_checkpoint_atomic` writes a step folder into a temporary folder, records every file's size
  and SHA-256 in meta.json (files in sub-folders too, by relative path: jax's orbax state is a folder tree), fsyncs
  every file and folder, then renames it into place (rename is atomic on POSIX), so a crash or kill during a save
  leaves the previous checkpoint untouched; `latest_checkpoint`, `verify_checkpoint` (meta.json readable, every file
  as recorded), `check_resume` (verifies, and refuses a folder made by a different config), `check_same_data`
  (refuses one trained on other data: meta.json's "train_data", the packed rows' SHA-256). `run_training` resumes
  from the newest intact checkpoint, skipping damaged ones with a message. Checkpoints hold no pickles: torch writes
  safetensors + JSON, jax orbax's OCDBT / zarr + JSON (and reads an older npz without object arrays).
- `MetricsLog` (JSONL, the source of truth; each row also goes to the run's experiment trackers, shared_math.tracking),
  the progress bar (shared_math.progress.TrainingBar: tqdm on stderr, quiet off a terminal), `plot_run` /
  `plot_compare` (PNG, Agg).
- Routing analytics: at every logged step `pop_routing_stats(trainer)` adds the trainer's per-layer routing
  statistics (shared_math.routing_stats, `train.routing_stats`) to the row as `routing`; routing.png at the end.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import sys
import time
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from shared_math import data as data_mod
from shared_math import tasks as tasks_mod
from shared_math.config import LoraConfig, ModelConfig
from shared_math.progress import TrainingBar
from shared_math.routing_stats import plot_routing
from shared_math.safetensors_io import fsync_path as _fsync_path  # a module name: tests patch it
from shared_math.tracking import Trackers, check_loggers, open_trackers
from shared_math.train_config import (
    ConfigError,
    RunConfig,
    diff_configs,
    resolve_path,
    to_dict,
    trajectory_dict,
)

CHECKPOINT_DIR = "checkpoints"
META = "meta.json"


class TrainingDiverged(RuntimeError):
    """The loss, the gradient norm or the LoRA tensors became NaN/inf, or the run collapsed (no gradient at the loss
    of uniform predictions); nothing more is saved, so the last checkpoint written is the last one kept."""


class CheckpointDamaged(ConfigError):
    """A checkpoint folder is truncated, corrupt or unreadable (or holds a format that is never loaded, such as a
    pickle); the message names the folder and the file."""


# ---- run set-up ----------------------------------------------------------------------------------------------------

@dataclass
class PreparedRun:
    """Everything a trainer needs that does not depend on the framework."""

    cfg: RunConfig
    out_dir: Path
    checkpoint: Path
    model_cfg: ModelConfig
    tokenizer: data_mod.Tokenizer
    train_data: data_mod.PackedDataset
    eval_records: list[dict[str, Any]] = field(default_factory=list)
    eval_data: data_mod.PackedDataset | None = None


TINY_SPEC_FILE = "splitmoe_tiny.json"  # beside a tiny preset's checkpoint: the preset it was built from


def build_model_checkpoint(cfg: RunConfig, out_dir: Path) -> Path:
    """`model.path`, or the `model.tiny` preset written to `<out_dir>/model`.

    A `model/` already there is reused if it was built from the same preset (family, seed, overrides: its
    TINY_SPEC_FILE; a folder from before that file, by its model config), or if the run folder holds checkpoints or
    a finished run's adapter: they were trained on it (a fresh run is refused there, after this, and a resume under
    another model.tiny by its config check; one whose preset file changed since resumes on the model it trained).
    Otherwise another preset's model is rebuilt: it was left by a run that saved nothing (interrupted), and reusing
    it trained the wrong model in silence. A `model/` that no preset built (a downloaded model: files a tiny
    checkpoint does not have) is refused, never deleted."""
    if cfg.model.path is not None:
        p = resolve_path(cfg.model.path)
        if not (p / "config.json").is_file():
            raise ConfigError(f"model.path {cfg.model.path}: no config.json there (a HF checkpoint folder)")
        return p
    from shared_math.checkpoint import write_tiny_checkpoint

    spec = _load_model_yaml(resolve_path(cfg.model.tiny))
    dest = out_dir / "model"
    if (dest / "config.json").is_file() and (checkpoints(out_dir) or (out_dir / "adapter").exists()):
        return dest
    if dest.exists() or dest.is_symlink():
        _check_tiny_folder(dest)  # before anything reads it as a tiny checkpoint, or deletes it
        if (dest / "config.json").is_file() and _built_from(dest, spec):
            return dest
        shutil.rmtree(dest)  # nothing saved depends on it: this run's preset replaces it
    write_tiny_checkpoint(spec["family"], dest, seed=spec["seed"], **spec["overrides"])
    (dest / TINY_SPEC_FILE).write_text(json.dumps(spec, sort_keys=True))
    return dest


# what a tiny preset's build leaves in <out_dir>/model (write_checkpoint: one file or shards and their index; the
# preset marker; make-tiny's marker where make-tiny wrote it)
_TINY_FILES = ("config.json", "model.safetensors", "model.safetensors.index.json", "model-*-of-*.safetensors",
               TINY_SPEC_FILE, "splitmoe_make_tiny.json")


def _check_tiny_folder(dest: Path) -> None:
    """ConfigError unless `dest` holds only what a tiny preset's build writes, so that a run about to replace it
    never deletes a model it did not build (one downloaded into <out_dir>/model, or an --out that is a project
    folder with its model/)."""
    if dest.is_symlink() or not dest.is_dir():
        raise ConfigError(f"{dest} is not a folder of a tiny preset's model, which a model.tiny run builds there: "
                          "choose another train.out_dir")
    foreign = sorted(p.name for p in dest.iterdir() if p.is_dir() or not any(p.match(g) for g in _TINY_FILES))
    if foreign:
        held = ", ".join(foreign[:4]) + (", ..." if len(foreign) > 4 else "")
        raise ConfigError(f"{dest} holds a model that no model.tiny preset built (it has {held}); this run "
                          f"(model.tiny) would replace it. To train on that model set model.path={dest}; "
                          "otherwise choose another train.out_dir")


def _built_from(dest: Path, spec: dict[str, Any]) -> bool:
    """Whether the tiny checkpoint in `dest` is the one `spec` builds."""
    marker = dest / TINY_SPEC_FILE
    if marker.is_file():
        return json.loads(marker.read_text()) == json.loads(json.dumps(spec, sort_keys=True))
    # written before the marker existed: the model config is what can still be compared (not the seed)
    from shared_math.tiny import tiny_hf_config

    return ModelConfig.from_hf(dest) == ModelConfig.from_hf(tiny_hf_config(spec["family"], **spec["overrides"]))


def read_model_config(cfg: RunConfig) -> ModelConfig:
    """The ModelConfig of `cfg`'s model without writing anything (`model.path`'s config.json, or the config the
    `model.tiny` preset would be built with), so that a layout can be refused before any work."""
    if cfg.model.path is not None:
        p = resolve_path(cfg.model.path)
        if not (p / "config.json").is_file():
            raise ConfigError(f"model.path {cfg.model.path}: no config.json there (a HF checkpoint folder)")
        return ModelConfig.from_hf(p)
    from shared_math.tiny import tiny_hf_config

    spec = _load_model_yaml(resolve_path(cfg.model.tiny))
    return ModelConfig.from_hf(tiny_hf_config(spec["family"], **spec["overrides"]))


def _load_model_yaml(path: Path) -> dict[str, Any]:
    """A configs/models/*.yaml preset (`family`, `seed`, `overrides`), as `splitmoe make-tiny --config` reads it."""
    from shared_math.tiny import read_model_yaml

    if not path.is_file():
        raise ConfigError(f"model.tiny {path} does not exist (a configs/models/*.yaml preset)")
    try:
        return read_model_yaml(path)
    except ValueError as e:
        raise ConfigError(f"model.tiny: {e}") from None


def prepare_run(cfg: RunConfig, out_dir: str | Path | None = None) -> PreparedRun:
    """Build or find the checkpoint, the tokenizer and the datasets of `cfg` (errors name the bad input)."""
    check_optim_range(cfg)
    check_loggers(cfg.train.loggers)  # a tracker whose package is missing is refused before any work
    out = Path(out_dir if out_dir is not None else cfg.train.out_dir)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"train.out_dir {out} is a file: the run folder must be a folder (pass --out DIR)")
    out.mkdir(parents=True, exist_ok=True)
    ckpt = build_model_checkpoint(cfg, out)
    model_cfg = ModelConfig.from_hf(ckpt)
    cfg.lora.validate_for(model_cfg)
    tok = data_mod.load_tokenizer(ckpt, model_cfg.vocab_size)
    d = cfg.data
    if d.source == "synthetic":
        train_recs, eval_recs = tasks_mod.generate(d.synthetic)
        source = "synthetic"
    else:
        path = resolve_path(d.path)
        train_recs, source = data_mod.read_jsonl(path), str(path)
        eval_recs = data_mod.read_jsonl(resolve_path(d.eval_path)) if d.eval_path else []
    kw = dict(seq_len=d.seq_len, seed=d.seed, max_positions=model_cfg.max_position_embeddings)
    train_data = data_mod.PackedDataset(train_recs, tok, batch_size=d.batch_size, source=source, **kw)
    eval_data = None
    if eval_recs:
        eval_source = "synthetic held-out" if d.source == "synthetic" else str(resolve_path(d.eval_path))
        eval_data = data_mod.PackedDataset(eval_recs, tok, batch_size=cfg.train.eval_batch_size,
                                           source=eval_source, **kw)
    chat_evals = [r for r in eval_recs if "messages" in r and r["messages"][-1].get("role") == "assistant"]
    return PreparedRun(cfg, out, ckpt, model_cfg, tok, train_data, chat_evals, eval_data)


def init_lora_tensors(lora: LoraConfig, model_cfg: ModelConfig, seed: int) -> dict[str, np.ndarray]:
    """The initial adapter in canonical names: A ~ U(±1/sqrt(in)) (PEFT's kaiming_uniform(a=√5)), B = 0, float32.

    Each A is drawn from its own generator seeded by (seed, crc32(name)), so it does not depend on the order or the
    set of other targets."""
    from shared_math.adapter import expected_lora_shapes

    out = {}
    for name, shape in expected_lora_shapes(lora, model_cfg).items():
        if name.endswith(".lora_A"):
            bound = 1.0 / math.sqrt(shape[-2])
            rng = np.random.default_rng([seed, zlib.crc32(name.encode())])
            out[name] = rng.uniform(-bound, bound, shape).astype(np.float32)
        else:
            out[name] = np.zeros(shape, np.float32)
    return out


# ---- optimisation ---------------------------------------------------------------------------------------------------

def lr_at(step: int, cfg: RunConfig) -> float:
    """Learning rate of update number `step` (0-based): linear warmup over `warmup_steps` ((step+1)/warmup), then
    cosine from lr down to min_lr_ratio·lr at `train.steps`."""
    o, total = cfg.optim, cfg.train.steps
    if step < o.warmup_steps:
        return o.lr * (step + 1) / o.warmup_steps
    span = max(1, total - o.warmup_steps)
    progress = min(1.0, (step - o.warmup_steps) / span)
    return o.lr * (o.min_lr_ratio + (1 - o.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def clip_coefficient(grad_norm: float, max_norm: float) -> float:
    """torch.nn.utils.clip_grad_norm_'s factor, min(1, max_norm / (norm + 1e-6)); 1 when clipping is off. Both
    frameworks multiply their gradients by this number, so clipping is identical."""
    if max_norm <= 0:
        return 1.0
    return min(1.0, max_norm / (grad_norm + 1e-6))


_FLOAT32_MAX = float(np.finfo(np.float32).max)


def check_optim_range(cfg: RunConfig) -> None:
    """Refuse (ConfigError) a learning rate whose AdamW update cannot be represented in float32, before any work.

    torch's AdamW turns `lr / (1 - beta1^t)` (largest at t = 1) and `1 - lr·weight_decay` into float32 scalars and
    fails with a bare RuntimeError once they overflow (3.4e38); such a rate is a typo in any case."""
    o = cfg.optim
    step_size = o.lr / (1.0 - o.beta1)  # beta1 < 1 is checked by the config
    decay = o.lr * o.weight_decay
    if step_size > _FLOAT32_MAX or decay > _FLOAT32_MAX:
        what, value, bound = (("lr/(1-beta1)", step_size, _FLOAT32_MAX * (1.0 - o.beta1)) if step_size > _FLOAT32_MAX
                              else ("lr·weight_decay", decay, _FLOAT32_MAX / o.weight_decay))
        raise ConfigError(
            f"optim.lr={o.lr:g} is too large: AdamW's {what}={value:.3g} overflows float32 (max "
            f"{_FLOAT32_MAX:.3g}); use a learning rate below {bound:.3g} (LoRA runs typically use 1e-5 to 1e-2)")


# A collapsed run predicts the uniform distribution, whose loss is ln V: float32 log-softmax of equal logits gives
# ln V to ~1e-6 (4.8520303 for V=128, measured both frameworks at optim.lr=1e9); 1e-3 relative leaves room for bf16
# and for a few unequal logits, while a real run does not sit at ln V with a gradient of exactly zero.
_COLLAPSE_RTOL = 1e-3
_FIX = "Lower optim.lr, keep optim.max_grad_norm > 0, or train in float32."


def _diverged(step: int, what: str, out_dir: Path, fix: str = _FIX) -> TrainingDiverged:
    last = latest_checkpoint(out_dir)
    keep = f"the last good checkpoint is {last}" if last else "no checkpoint had been saved yet"
    return TrainingDiverged(f"training diverged at step {step + 1}: {what}; {keep}. {fix}")


def check_finite(step: int, loss: float, grad_norm: float, out_dir: Path, *, vocab_size: int | None = None) -> None:
    """Raise TrainingDiverged (naming the last good checkpoint) if the loss or the gradient norm is NaN/inf, or, with
    `vocab_size`, if the run collapsed: a gradient norm of exactly 0 at a loss of ln V. That is what a far too large
    learning rate leaves behind when it does not overflow (saturated logits, uniform predictions, no gradient): the
    run would go on silently at a constant loss and save an adapter of huge weights."""
    if not (math.isfinite(loss) and math.isfinite(grad_norm)):
        raise _diverged(step, f"loss={loss}, grad_norm={grad_norm}; the update was not applied", out_dir)
    if vocab_size and grad_norm == 0.0 and abs(loss - math.log(vocab_size)) <= _COLLAPSE_RTOL * math.log(vocab_size):
        raise _diverged(step, f"loss={loss} = ln(V={vocab_size}) with grad_norm=0: the model predicts uniformly and "
                              "no gradient flows (saturated weights after a far too large update); the update was not "
                              "applied", out_dir,
                        fix="Lower optim.lr: AdamW moves every weight by about lr per step, whatever the clipping.")


def check_params_finite(step: int, finite: bool, out_dir: Path) -> None:
    """Raise TrainingDiverged if the update of step `step` made a LoRA tensor NaN/inf (`finite` is False): caught
    here, before a checkpoint or an adapter could be written from that state."""
    if not finite:
        raise _diverged(step, "the AdamW update made LoRA tensors non-finite (inf/NaN); this trainer's state is not "
                              "usable any more", out_dir)


# ---- checkpoints ---------------------------------------------------------------------------------------------------

def checkpoint_name(step: int) -> str:
    return f"step_{step:08d}"


def write_checkpoint_atomic(out_dir: Path, step: int, meta: dict[str, Any], write_files: Callable[[Path], None],
                            *, keep: int = 2) -> Path:
    """Write checkpoint `step` under `<out_dir>/checkpoints/` so that it appears complete or not at all.

    `write_files(tmp)` writes the framework's files into a temporary folder (sub-folders allowed; it must return
    only once they are complete); then meta.json is written (last, so a folder with meta.json is complete) with every
    file's size and SHA-256 under "files", keyed by its path relative to the step folder (checked by
    `verify_checkpoint` before a resume); every file, then every folder from the deepest up, is fsynced (a file's
    directory entry is durable only once its folder is), the folder is renamed to `step_XXXXXXXX` and the parent
    fsynced. Older checkpoints beyond `keep` are removed only after that: among those up to this step, so that the
    one just written always stays. Newer ones are what a resume skipped as damaged (it resumes from the newest
    intact one); pruning by name alone deleted this save instead and kept those, so a kill before the next save
    left nothing to resume from. The run replaces each of them when it reaches its step.
    """
    root = out_dir / CHECKPOINT_DIR
    root.mkdir(parents=True, exist_ok=True)
    final = root / checkpoint_name(step)
    tmp = root / f".tmp-{checkpoint_name(step)}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    write_files(tmp)
    files, folders = _tree(tmp)
    files = [f for f in files if f != tmp / META]
    meta = {**meta, "files": {f.relative_to(tmp).as_posix(): _file_record(f) for f in files}}
    (tmp / META).write_text(json.dumps(meta, indent=1))
    for f in [*files, tmp / META]:
        _fsync_path(f)
    for d in sorted(folders, key=lambda d: len(d.parts), reverse=True):
        _fsync_path(d)
    _fsync_path(tmp)
    if final.exists():  # a re-save of the same step (e.g. after resume): replace it as a whole
        shutil.rmtree(final)
    os.rename(tmp, final)
    _fsync_path(root)
    for old in sorted(p for p in root.glob("step_*") if p.is_dir() and p.name <= final.name)[:-keep]:
        shutil.rmtree(old)
    return final


def _tree(folder: Path) -> tuple[list[Path], list[Path]]:
    """(files, sub-folders) under `folder` at any depth, sorted; symbolic links are refused (ValueError): a
    checkpoint holds its own bytes, and a link could point anywhere."""
    files, folders = [], []
    for p in sorted(folder.rglob("*")):
        if p.is_symlink():
            raise ValueError(f"{p} is a symbolic link: a checkpoint must hold only files and folders")
        (folders if p.is_dir() else files).append(p)
    return files, folders


def _file_record(path: Path) -> dict[str, Any]:
    """Size and SHA-256 of one checkpoint file (streamed: training states of large models are many GB)."""
    with open(path, "rb") as f:
        digest = hashlib.file_digest(f, "sha256").hexdigest()
    return {"bytes": path.stat().st_size, "sha256": digest}


def checkpoints(out_dir: Path) -> list[Path]:
    """The checkpoint folders (`step_*`), newest first; temporary folders of interrupted saves are ignored. A save
    renames its folder into place only after meta.json is written, so a step folder without one is damaged: it is
    listed, and a resume reports it as it skips it (it was passed over in silence, and a fresh run did not see it)."""
    root = Path(out_dir) / CHECKPOINT_DIR
    return sorted((p for p in root.glob("step_*") if p.is_dir()), reverse=True) if root.is_dir() else []


def latest_checkpoint(out_dir: Path) -> Path | None:
    """The newest complete checkpoint folder (with its meta.json; not yet verified), or None."""
    return next((c for c in checkpoints(out_dir) if (c / META).is_file()), None)


def read_meta(ckpt: Path) -> dict[str, Any]:
    """meta.json of checkpoint `ckpt`; CheckpointDamaged, naming the file, if it is unreadable or not a JSON object."""
    path = Path(ckpt) / META
    try:
        meta = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointDamaged(f"{path} is corrupt or unreadable ({e})") from e
    if not isinstance(meta, dict) or not isinstance(meta.get("step"), int):
        raise CheckpointDamaged(f"{path} is corrupt: expected a JSON object with an integer 'step'")
    return meta


def verify_checkpoint(ckpt: Path) -> dict[str, Any]:
    """meta.json of `ckpt` after checking every file it records against its size and SHA-256 (CheckpointDamaged,
    naming the file, otherwise). Checkpoints written before the manifest existed have none: their files are checked
    only by the loader."""
    ckpt = Path(ckpt)
    meta = read_meta(ckpt)
    files = meta.get("files", {})
    if not isinstance(files, dict):
        raise CheckpointDamaged(f"{ckpt / META} is corrupt: 'files' is not a mapping of file records")
    for name, rec in files.items():
        if not _is_relative_file_name(name) or not isinstance(rec, dict):
            raise CheckpointDamaged(f"{ckpt / META} is corrupt: bad file record {name!r}: {rec!r}")
        path = ckpt.joinpath(*name.split("/"))
        if any(p.is_symlink() for p in (path, *path.parents[:name.count("/")])):
            raise CheckpointDamaged(f"{path} is a symbolic link, not the file that was written")
        if not path.is_file():
            raise CheckpointDamaged(f"{path} is missing")
        size = path.stat().st_size
        if size != rec.get("bytes"):
            raise CheckpointDamaged(f"{path} has {size} bytes, {rec.get('bytes')} were written (truncated or "
                                    "overwritten)")
        if _file_record(path)["sha256"] != rec.get("sha256"):
            raise CheckpointDamaged(f"{path} does not match the SHA-256 recorded at save time (corrupt)")
    return meta


def _is_relative_file_name(name: Any) -> bool:
    """A manifest key as write_checkpoint_atomic writes it: a relative POSIX path inside the step folder (no empty,
    '.' or '..' component, no backslash), so a tampered meta.json cannot point the check outside the folder."""
    return (isinstance(name, str) and bool(name) and "\\" not in name and "\0" not in name
            and all(part not in ("", ".", "..") for part in name.split("/")))


def clean_partial_checkpoints(out_dir: Path) -> None:
    """Remove temporary folders left by saves that were interrupted."""
    root = Path(out_dir) / CHECKPOINT_DIR
    for p in root.glob(".tmp-step_*") if root.is_dir() else []:
        shutil.rmtree(p, ignore_errors=True)


def checkpoint_meta(cfg: RunConfig, step: int, framework: str, **extra: Any) -> dict[str, Any]:
    return {"step": step, "framework": framework, "data_position": step * cfg.train.grad_accum,
            "config": to_dict(cfg), "trajectory": trajectory_dict(cfg), **extra}


def data_record(run: PreparedRun) -> dict[str, Any]:
    """What a checkpoint's meta.json records of the run's training data ("train_data"), for `check_same_data`."""
    d = run.train_data
    return {"sha256": d.fingerprint(), "rows": len(d.rows), "documents": d.num_documents}


def check_same_data(ckpt: Path, meta: dict[str, Any], run: PreparedRun) -> None:
    """ConfigError if checkpoint `ckpt` (its `meta`) was trained on other data than `run` packs now. The config
    names the data (data.path, data.synthetic) but not their contents: a data file edited or regenerated since, a
    relative data.path read from another working directory, or another tokenizer beside the model resumed in
    silence on other batches. A checkpoint from before the record has nothing to compare."""
    saved = meta.get("train_data")
    now = data_record(run)
    if not isinstance(saved, dict) or saved.get("sha256") == now["sha256"]:
        return
    d = run.cfg.data
    source = (f"data.path {d.path} (read from {resolve_path(d.path).absolute()})" if d.source == "jsonl"
              else "the synthetic task generator")
    raise ConfigError(f"cannot resume from {ckpt}: it was trained on other data ({saved.get('documents')} documents "
                      f"in {saved.get('rows')} packed rows then, {now['documents']} in {now['rows']} now, or as many "
                      f"with other tokens): {source} or the model's tokenizer changed since. Resuming would go on with "
                      "other batches; restore those data, or start a fresh train.out_dir")


def check_resume(ckpt: Path, cfg: RunConfig, framework: str) -> dict[str, Any]:
    """meta.json of `ckpt` after checking that its files are intact (`verify_checkpoint`; CheckpointDamaged) and that
    it was written by this framework and an equivalent config (ConfigError)."""
    meta = verify_checkpoint(ckpt)
    if meta.get("framework") != framework:
        raise ConfigError(f"cannot resume: {ckpt} holds a {meta.get('framework')} training state, this run is "
                          f"{framework}")
    diffs = diff_configs(meta.get("trajectory", {}), trajectory_dict(cfg))
    if diffs:
        raise ConfigError(f"cannot resume from {ckpt}: it was written by a different config ("
                          + "; ".join(diffs) + "). Use a fresh train.out_dir, or the same config.")
    return meta


# ---- logging, progress, plots -------------------------------------------------------------------------------------

class MetricsLog:
    """Append-only JSONL of training and eval rows; on resume, rows after the resumed step are dropped (the run
    recomputes them), and a file removed since starts afresh. Every row written also goes to `trackers`
    (TensorBoard, trackio: the same rows)."""

    def __init__(self, path: Path, *, resume_step: int | None = None, trackers: Trackers | None = None) -> None:
        self.path = path
        self.trackers = trackers if trackers is not None else Trackers()
        if resume_step is None or not path.is_file():
            path.write_text("")
        else:
            keep = [r for r in read_metrics(path) if r.get("step", 0) <= resume_step]
            path.write_text("".join(json.dumps(r) + "\n" for r in keep))

    def write(self, row: dict[str, Any]) -> None:
        with self.path.open("a") as f:
            f.write(json.dumps(row) + "\n")
        self.trackers.log(row)

    def close(self) -> None:
        """Flush and close the trackers (the JSONL file is complete after every `write`)."""
        self.trackers.close()

    def rows(self) -> list[dict[str, Any]]:
        return read_metrics(self.path)

    def drop_evals_at(self, step: int) -> None:
        """Remove the evaluation rows of `step` (one that is about to be evaluated again)."""
        keep = [r for r in self.rows() if not (r.get("step") == step and _is_eval_row(r))]
        self.path.write_text("".join(json.dumps(r) + "\n" for r in keep))


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """The rows of a metrics.jsonl. A last line without its newline is a row cut short (the run was killed while
    writing it, or the machine lost the file's tail): dropped, as a resume drops the rows after its step anyway.
    Any other line that is not a JSON object is a ConfigError naming it (it raised a bare JSONDecodeError, and
    the run could not be resumed)."""
    lines = path.read_bytes().decode("utf-8", errors="replace").split("\n")  # the last: what follows the last newline
    rows = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            row = None
        if isinstance(row, dict):
            rows.append(row)
        elif n < len(lines):
            raise ConfigError(f"{path}:{n} is not a JSON row of metrics ({line[:60]!r}): the file was edited or "
                              "damaged; fix or delete that line, then resume again")
    return rows


def _is_eval_row(row: dict[str, Any]) -> bool:
    return "eval_loss" in row or "exact_match" in row


class _NoMetrics:
    """The metrics log of a rank that writes nothing (see run_training)."""

    def write(self, row: dict[str, Any]) -> None:
        pass

    def drop_evals_at(self, step: int) -> None:
        pass

    def close(self) -> None:
        pass


def peak_memory_mb() -> float:
    """Peak resident memory of this process in MiB (CPU runs; GPU trainers report device memory instead)."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def plot_run(rows: Sequence[dict[str, Any]], png: Path, title: str = "") -> Path:
    """Training loss per step (and eval loss / exact-match where logged) as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [r for r in rows if "loss" in r]
    evals = [r for r in rows if _is_eval_row(r)]
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot([r["step"] for r in train], [r["loss"] for r in train], label="train loss", lw=1)
    if any("eval_loss" in r for r in evals):
        ev = [r for r in evals if "eval_loss" in r]
        ax.plot([r["step"] for r in ev], [r["eval_loss"] for r in ev], "o-", label="held-out loss")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss")
    ax.set_yscale("log")
    if any("exact_match" in r for r in evals):
        ax2 = ax.twinx()
        em = [r for r in evals if "exact_match" in r]
        ax2.plot([r["step"] for r in em], [r["exact_match"]["all"] for r in em], "s--", color="tab:green",
                 label="held-out exact-match")
        ax2.set_ylim(0, 1)
        ax2.set_ylabel("exact-match")
        ax2.legend(loc="center right")
    ax.legend(loc="upper right")
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)
    return png


def plot_compare(steps: Sequence[int], series: dict[str, tuple[Sequence[float], Sequence[float]]],
                 rel: dict[str, Sequence[float]], png: Path, tol: float) -> Path:
    """Left: each quantity's torch and jax curves; right: their relative differences against the tolerance."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for name, (a, b) in series.items():
        axes[0].plot(steps, a, label=f"{name} torch", lw=1.5)
        axes[0].plot(steps, b, "--", label=f"{name} jax", lw=1.5)
    axes[0].set_xlabel("step")
    axes[0].legend()
    for name, r in rel.items():
        axes[1].semilogy(steps, np.maximum(np.asarray(r, float), 1e-12), "o-", label=f"{name} rel. diff")
    axes[1].axhline(tol, color="red", ls=":", label=f"loss tolerance {tol:g}")
    axes[1].set_xlabel("step")
    axes[1].legend()
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)
    return png


# ---- results and the run loop ---------------------------------------------------------------------------------------

@dataclass
class TrainResult:
    """What a run produced: per-step losses and grad norms (this process's steps), eval rows (the whole run's,
    those before a resume read back from metrics.jsonl), where files went."""

    out_dir: Path
    losses: list[float] = field(default_factory=list)
    grad_norms: list[float] = field(default_factory=list)
    evals: list[dict[str, Any]] = field(default_factory=list)
    start_step: int = 0
    final_step: int = 0
    adapter_dir: Path | None = None
    plot: Path | None = None
    seconds: float = 0.0
    skipped_checkpoints: list[str] = field(default_factory=list)  # damaged checkpoints passed over on resume: why
    routing_plot: Path | None = None  # routing.png (train.routing_stats), None without routing statistics


def exact_match_eval(run: PreparedRun, logits_fn: Callable[[np.ndarray, np.ndarray], np.ndarray]
                     ) -> dict[str, float] | None:
    """Held-out exact-match by greedy decoding through `logits_fn`, or None without chat eval records."""
    if not run.eval_records:
        return None
    tok = run.tokenizer

    def complete(recs: list[dict[str, Any]]) -> list[str]:
        prompts = [data_mod.render_prompt(r["messages"][:-1], tok) for r in recs]
        outs = tasks_mod.greedy_complete(logits_fn, prompts, eos_id=tok.eos_id, pad_id=tok.pad_id,
                                         max_new_tokens=run.cfg.train.max_new_tokens,
                                         batch_size=run.cfg.train.eval_batch_size)
        return [tok.decode(o) for o in outs]

    return tasks_mod.exact_match(run.eval_records, complete)


class Timer:
    """Tokens-per-second over the steps since the last `rate()` call."""

    def __init__(self) -> None:
        self.t, self.tokens = time.perf_counter(), 0

    def add(self, n: int) -> None:
        self.tokens += n

    def rate(self) -> float:
        now = time.perf_counter()
        r = self.tokens / max(now - self.t, 1e-9)
        self.t, self.tokens = now, 0
        return r


def restore_newest_intact(tr: Any, out_dir: Path) -> tuple[Path, list[str]]:
    """Restore `tr` from the newest checkpoint under `out_dir` that loads (`tr.restore` verifies it and raises
    CheckpointDamaged otherwise) -> (that folder, one line per damaged checkpoint skipped, newest first).

    A config or framework mismatch is not damage: it is raised at once (resuming an older checkpoint would not help).
    With no intact checkpoint left, CheckpointDamaged names every damaged one."""
    found = checkpoints(out_dir)
    if not found:
        raise ConfigError(f"nothing to resume: no checkpoint under {Path(out_dir) / CHECKPOINT_DIR}")
    damaged: list[str] = []  # "<folder name>: <what is wrong>"
    for ckpt in found:
        try:
            tr.restore(ckpt)
        except CheckpointDamaged as e:
            damaged.append(f"{ckpt.name}: {e}")
            continue
        return ckpt, [f"skipped damaged checkpoint {d}" for d in damaged]
    raise CheckpointDamaged(f"cannot resume: every checkpoint under {Path(out_dir) / CHECKPOINT_DIR} is damaged: "
                            + "; ".join(damaged) + ". Start the run again in a fresh train.out_dir.")


def run_training(tr: Any, *, resume: bool = False, stop_after: int | None = None, progress: bool = True,
                 t0: float | None = None) -> TrainResult:
    """The run loop both frameworks share, driving a framework `Trainer` (train_step, evaluate, save_checkpoint,
    restore, save_adapter): eval at step 0, every `eval_every` and at the end; a checkpoint every `save_every`;
    metrics.jsonl, loss.png and the PEFT adapter (`adapter/`) in the run folder. Stops at `stop_after` if given.

    `resume` restores the newest intact checkpoint; each damaged one passed over is reported on stderr (even with
    `progress` off), in `TrainResult.skipped_checkpoints` and as a {"step", "skipped_checkpoint"} row of
    metrics.jsonl.

    A trainer whose `is_main` is False (a torchrun rank other than 0, torch_impl.parallel) takes part in every step,
    evaluation and save (they are collective) but writes and prints nothing: no metrics, trackers, bar or plot.
    """
    t0 = time.perf_counter() if t0 is None else t0
    cfg, fw = tr.cfg, tr.framework
    out = tr.run.out_dir
    main = getattr(tr, "is_main", True)
    if main:
        clean_partial_checkpoints(out)
    skipped: list[str] = []
    if resume:
        _, skipped = restore_newest_intact(tr, out)
        for line in skipped if main else ():  # always shown: the run silently going back further would surprise
            sys.stderr.write(f"{fw} warning: {line}\n")
            sys.stderr.flush()
    elif found := checkpoints(out):  # damaged ones too: this run would replace them
        raise ConfigError(f"{out} already holds checkpoints ({found[0].name}); pass --resume to continue that run, or "
                          "choose another train.out_dir")
    elif (out / "adapter").exists():
        # a finished run with train.save_every=0 leaves its adapter and no checkpoint: this run would empty its
        # metrics.jsonl now and replace the adapter at the end
        raise ConfigError(f"{out} already holds a trained adapter ({out / 'adapter'}) from an earlier run; choose "
                          "another train.out_dir, or remove that folder to train there again")
    result = TrainResult(out_dir=out, start_step=tr.step, skipped_checkpoints=skipped)
    resume_step = tr.step if resume else None
    metrics = (MetricsLog(out / "metrics.jsonl", resume_step=resume_step,
                          trackers=open_trackers(cfg, out, resume_step=resume_step)) if main else _NoMetrics())
    if resume and tr.step == cfg.train.steps:
        # a finished run resumed: its final evaluation runs again below (on every rank: it is collective under
        # torchrun), so its earlier row goes rather than appearing twice
        metrics.drop_evals_at(tr.step)
    if resume and main:
        # the evaluations the run made before the resumed step (metrics.jsonl keeps them): a resumed run's summary
        # then reads from its step-0 evaluation, not from its last one ("step 20 0.000 -> step 20 0.000")
        result.evals = [r for r in metrics.rows() if _is_eval_row(r)]
    for line in skipped:
        metrics.write({"step": tr.step, "skipped_checkpoint": line})
    bar = TrainingBar(cfg.train.steps, enabled=progress and main, label=fw, initial=tr.step)
    if tr.step == 0:
        row = tr.evaluate()
        metrics.write(row)
        result.evals.append(row)
        bar.message(f"{fw} step 0 eval: {_fmt_eval(row)}")
    end = cfg.train.steps if stop_after is None else min(cfg.train.steps, stop_after)
    timer = Timer()
    tokens_per_step = cfg.data.batch_size * cfg.data.seq_len * cfg.train.grad_accum
    while tr.step < end:
        lr = lr_at(tr.step, cfg)
        loss, norm = tr.train_step()
        result.losses.append(loss)
        result.grad_norms.append(norm)
        timer.add(tokens_per_step)
        row = {"step": tr.step, "loss": loss, "grad_norm": norm, "lr": lr}
        if tr.step % cfg.train.log_every == 0 or tr.step == end:
            row["tokens_per_s"], row["memory_mb"] = timer.rate(), peak_memory_mb()
            if (routing := pop_routing_stats(tr)) is not None:
                row["routing"] = routing
            bar.set_stats(loss, lr, row["tokens_per_s"], row["memory_mb"])
        bar.update(tr.step)
        metrics.write(row)
        if cfg.train.eval_every and tr.step % cfg.train.eval_every == 0 and tr.step != cfg.train.steps:
            ev = tr.evaluate()
            metrics.write(ev)
            result.evals.append(ev)
            bar.message(f"{fw} step {tr.step} eval: {_fmt_eval(ev)}")
        if cfg.train.save_every and tr.step % cfg.train.save_every == 0:
            tr.save_checkpoint()
    if tr.step == cfg.train.steps:
        if cfg.train.save_every and tr.step % cfg.train.save_every and latest_checkpoint(out) != out / \
                CHECKPOINT_DIR / checkpoint_name(tr.step):
            tr.save_checkpoint()  # the final state, so a finished run can be resumed (e.g. to re-evaluate)
        ev = tr.evaluate()
        metrics.write(ev)
        result.evals.append(ev)
        bar.message(f"{fw} step {tr.step} eval: {_fmt_eval(ev)}")
        result.adapter_dir = tr.save_adapter(out / "adapter")
        result.plot = plot_run(metrics.rows(), out / "loss.png", title=f"{fw}: {out}") if main else None
        if main:
            result.routing_plot = plot_routing(metrics.rows(), out / "routing.png", title=f"{fw} routing: {out}")
    bar.close()
    metrics.close()
    result.final_step = tr.step
    result.seconds = time.perf_counter() - t0
    return result


def pop_routing_stats(tr: Any) -> dict[str, Any] | None:
    """The `routing` object of a logged metrics row: the trainer's routing statistics of the steps since the last
    logged one (`Trainer.pop_routing_stats`, shared_math.routing_stats), None when the run has them off. Every rank
    of a parallel run calls it at the same steps (the statistics are summed over the ranks)."""
    pop = getattr(tr, "pop_routing_stats", None)
    return None if pop is None else pop()


def _fmt_eval(row: dict[str, Any]) -> str:
    parts = []
    if "eval_loss" in row:
        parts.append(f"held-out loss {row['eval_loss']:.4f}")
    if "exact_match" in row:
        parts.append("exact-match " + ", ".join(f"{k} {v:.2f}" for k, v in row["exact_match"].items()))
    return "; ".join(parts) or "(no eval data)"
