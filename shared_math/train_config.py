"""The run-config schema shared by `torch_impl.train` and `jax_impl.train`: frozen dataclasses read from YAML, with
`key=value` overrides (`optim.lr=1e-3`, `lora.targets=[q_proj,v_proj]`); an unknown key is an error that lists the
known ones.

    model:  path (HF checkpoint folder) or tiny (a configs/models/*.yaml preset, built into the run folder),
            dtype float32 | bfloat16, moe_backend
    lora:   shared_math.config.LoraConfig (rank, alpha, targets, rslora, train_router)
    data:   source synthetic | jsonl; path / eval_path (JSONL); synthetic (shared_math.tasks.TaskSpec);
            seq_len, batch_size (rows per micro-batch), seed (shuffling)
    optim:  AdamW (lr, betas, eps, weight_decay), warmup + cosine to min_lr_ratio·lr, max_grad_norm, in_backward
    train:  steps (optimizer steps), grad_accum, seed (LoRA init), eval_every, save_every, log_every,
            max_new_tokens (greedy decoding for exact-match), keep_checkpoints, threads, out_dir, routing_stats
            (per-layer routing analytics in the metrics rows: shared_math/routing_stats.py),
            loggers (tensorboard, trackio: shared_math/tracking.py), tracker_project
    parallel: data, fsdp, expert: how many devices each mesh axis spans (defaults 1; their product is the number of
            devices). torch runs it under torchrun (one process per device), JAX over its visible devices.
    framework: torch | jax

`trajectory_dict(cfg)` is the part of a config that determines the sequence of losses; resuming from a folder whose
trajectory_dict differs is refused (`diff_configs` names the keys).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any, Literal, get_args, get_origin, get_type_hints

from shared_math.config import LoraConfig
from shared_math.tasks import TaskSpec

REPO_ROOT = Path(__file__).resolve().parent.parent


class ConfigError(ValueError):
    """A run config is invalid: unknown key, wrong type or value; the message names the key."""


class BackendUnavailable(ConfigError, RuntimeError):
    """The requested MoE backend cannot run on this device / dtype; the message says why and what runs here.
    A ConfigError (the CLI prints it as one line) and, as before, a RuntimeError."""


@dataclass(frozen=True)
class ModelSection:
    path: str | None = None  # HF checkpoint folder (config.json + safetensors [+ tokenizer.json])
    tiny: str | None = "configs/models/qwen3_moe_tiny.yaml"  # used when path is null: built into <out_dir>/model
    dtype: Literal["float32", "bfloat16"] = "float32"
    moe_backend: str = "auto"


@dataclass(frozen=True)
class DataSection:
    source: Literal["synthetic", "jsonl"] = "synthetic"
    path: str | None = None  # training JSONL (source jsonl)
    eval_path: str | None = None  # held-out JSONL: eval loss, and exact-match on chat records
    synthetic: TaskSpec = field(default_factory=TaskSpec)
    seq_len: int = 64
    batch_size: int = 32
    seed: int = 0


@dataclass(frozen=True)
class OptimSection:
    lr: float = 5e-3
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-8
    weight_decay: float = 0.0  # decoupled (AdamW): p <- p - lr·wd·p, on every trainable tensor
    warmup_steps: int = 20
    min_lr_ratio: float = 0.0  # cosine decays from lr to min_lr_ratio·lr at `train.steps`
    max_grad_norm: float = 1.0  # global-norm clipping; 0 disables
    # torch: AdamW applied to each LoRA tensor inside the backward, the moment its gradient is complete, which then
    # dies (torch_impl.optim.AdamWInBackward): the step never holds all gradients (4.8 GiB on a 24-layer
    # Qwen3-30B-A3B at r=64), the same update bit for bit. Needs max_grad_norm=0 and grad_accum=1 (a global-norm clip
    # and summed micro-batches both need every gradient first); one device; not in jax_impl
    in_backward: bool = False


@dataclass(frozen=True)
class TrainSection:
    steps: int = 400
    grad_accum: int = 1
    seed: int = 0  # LoRA init (drawn in numpy, identical in both frameworks)
    eval_every: int = 100  # 0: only before and after training
    save_every: int = 100  # 0: no training-state checkpoints (the adapter is still saved at the end)
    log_every: int = 10
    max_new_tokens: int = 8
    eval_batch_size: int = 64
    keep_checkpoints: int = 2
    # torch CPU threads (torch.set_num_threads; 0 keeps torch's default). 1 by default: on the shared 2-core CI
    # machine a tiny-model step took 0.26 s with 1 thread and 0.86 s with 2 (threads spin while others hold cores)
    threads: int = 1
    out_dir: str = "runs/default"
    # per MoE layer, expert load, imbalance, router entropy, aux loss, group choices in every logged metrics row and
    # routing.png (shared_math/routing_stats.py). On by default: per MoE layer a log-softmax and reductions over the
    # [T, E] router logits, against the experts' O(T·K·H·I) GEMMs, summed on the device, read once per logged step
    routing_stats: bool = True
    # experiment trackers fed the rows of metrics.jsonl (shared_math/tracking.py): tensorboard, trackio; they need
    # the `track` extra. tracker_project: trackio's project name
    loggers: tuple[str, ...] = ()
    tracker_project: str = "splitmoe"
    # activation checkpointing per decoder layer: "recompute" keeps each layer's input and recomputes the layer in
    # the backward, "offload" (torch only) keeps those inputs in host memory; memory, not numbers: the losses are
    # those of "none" (tests/shared/train_suite.py). Not on/off: YAML reads those as booleans
    gradient_checkpointing: Literal["none", "recompute", "offload"] = "none"
    # what a recomputed layer keeps besides its input (train.gradient_checkpointing=recompute), by the names of each
    # implementation's policies: torch "nothing" | "attention" (the SDPA kernels' outputs: the recompute skips the
    # attention forward; torch_impl.models.layers.REMAT_POLICIES); jax "nothing" | "small_dots" | "dots"
    # (jax_impl.models.layers.REMAT_POLICIES). Memory and speed, not numbers
    checkpoint_policy: Literal["nothing", "attention", "small_dots", "dots"] = "nothing"
    # how many of the first decoder layers are checkpointed (train.gradient_checkpointing recompute or offload); the
    # rest keep their activations and skip the recompute, for steps with memory to spare (Megatron's
    # recompute_num_layers; each implementation's gradient_checkpointing_enable(layers=...)). null: every layer.
    # Memory and speed, not numbers
    checkpoint_layers: int | None = None
    # tokens per chunk of the routed experts (0: untiled): each MoE layer runs its experts chunk by chunk and the
    # backward recomputes one chunk at a time, so the experts' activations are one chunk's (long contexts;
    # torch_impl.tiled_experts, jax_impl.tiled_experts). Memory, not numbers (fp32 reduction order)
    expert_chunk: int = 0
    # jax only: JAX's persistent compilation cache (jax_impl/compile_cache.py), so a run whose step has an earlier
    # run's shapes loads it instead of compiling it (about a minute for a full-size step on a GPU). "auto": on for a
    # GPU backend, in $JAX_COMPILATION_CACHE_DIR or ~/.cache/splitmoe/jax; "off"; or a folder (any backend)
    jax_compile_cache: str = "auto"


@dataclass(frozen=True)
class ParallelSection:
    """The device mesh, the same keys in both frameworks: `data` replicas (each its own rows), `fsdp` shards of the
    frozen weights, LoRA tensors and optimizer state (each its own rows too), `expert` ranks that each hold E/expert
    routed experts (tokens reach them by all-to-all). data·fsdp·expert devices in all; the global batch
    (`data.batch_size`) is split over all of them."""

    data: int = 1
    fsdp: int = 1
    expert: int = 1

    @property
    def devices(self) -> int:
        return self.data * self.fsdp * self.expert

    @property
    def batch_shards(self) -> int:
        """How many ways the rows of a micro-batch are split: every device takes its own rows (the expert axis also
        holds rows; its ranks differ in which experts they keep)."""
        return self.devices

    def describe(self) -> str:
        return f"data={self.data},fsdp={self.fsdp},expert={self.expert}"


@dataclass(frozen=True)
class RunConfig:
    model: ModelSection = field(default_factory=ModelSection)
    lora: LoraConfig = field(default_factory=lambda: LoraConfig(rank=16, alpha=32.0))
    data: DataSection = field(default_factory=DataSection)
    optim: OptimSection = field(default_factory=OptimSection)
    train: TrainSection = field(default_factory=TrainSection)
    parallel: ParallelSection = field(default_factory=ParallelSection)
    framework: Literal["torch", "jax"] = "torch"

    def __post_init__(self) -> None:
        _validate(self)


# Keys that do not change the loss sequence: a run may be resumed with other values for them.
NON_TRAJECTORY_KEYS = frozenset({"train.eval_every", "train.save_every", "train.log_every", "train.out_dir",
                                 "train.max_new_tokens", "train.eval_batch_size", "train.keep_checkpoints",
                                 "train.threads", "data.eval_path", "data.synthetic.num_eval",
                                 # the routing statistics only read the router's outputs
                                 "train.routing_stats",
                                 # trackers only watch the rows: a run may resume with other loggers
                                 "train.loggers", "train.tracker_project",
                                 # the mesh changes how a step is computed, not what: a run saved on N devices resumes
                                 # on M (equal to fp32 reduction-order tolerance, tests/*/test_parallel*.py)
                                 "parallel.data", "parallel.fsdp", "parallel.expert", "train.gradient_checkpointing",
                                 "train.checkpoint_policy", "train.checkpoint_layers", "train.expert_chunk",
                                 # the same AdamW update inside the backward, bit for bit, in the same state layout
                                 "optim.in_backward",
                                 # where JAX keeps compiled programs: a run resumes on another machine, or with it off
                                 "train.jax_compile_cache"})


# train.checkpoint_policy per framework (the names of each framework's models.layers.REMAT_POLICIES;
# tests/shared/test_train_config.py checks they agree)
CHECKPOINT_POLICIES = {"torch": ("nothing", "attention"), "jax": ("nothing", "small_dots", "dots")}


def _validate(cfg: RunConfig) -> None:
    positive = {"data.seq_len": cfg.data.seq_len, "data.batch_size": cfg.data.batch_size,
                "train.steps": cfg.train.steps, "train.grad_accum": cfg.train.grad_accum,
                "train.log_every": cfg.train.log_every, "train.keep_checkpoints": cfg.train.keep_checkpoints,
                "train.eval_batch_size": cfg.train.eval_batch_size, "train.max_new_tokens": cfg.train.max_new_tokens}
    for k, v in positive.items():
        if v < 1:
            raise ConfigError(f"{k} must be >= 1, got {v}")
    policy, ckpt = cfg.train.checkpoint_policy, cfg.train.gradient_checkpointing
    if policy != "nothing" and ckpt != "recompute":
        raise ConfigError(f"train.checkpoint_policy={policy} says what a recomputed layer keeps: it needs "
                          f"train.gradient_checkpointing=recompute (got {ckpt})")
    if cfg.optim.in_backward:
        if cfg.framework == "jax":
            raise ConfigError("optim.in_backward is torch_impl's (AdamW stepped per tensor from autograd hooks); "
                              "jax_impl's step is one jitted program whose buffers XLA schedules: set "
                              "optim.in_backward=false with --framework jax")
        if cfg.parallel.devices > 1:
            raise ConfigError(f"optim.in_backward updates each tensor as its local gradient completes, before the "
                              f"gradients are reduced over the {cfg.parallel.devices} devices of parallel "
                              "(parallel.data/fsdp/expert): set optim.in_backward=false or train on one device")
        check_in_backward(cfg.optim.max_grad_norm, cfg.train.grad_accum)
    layers = cfg.train.checkpoint_layers
    if layers is not None and layers < 0:
        raise ConfigError(f"train.checkpoint_layers must be >= 0 (how many of the first decoder layers to checkpoint; "
                          f"null for all of them), got {layers}")
    if layers is not None and ckpt == "none":
        raise ConfigError(f"train.checkpoint_layers={layers} says how many decoder layers are checkpointed: it needs "
                          "train.gradient_checkpointing=recompute or offload (got none)")
    if cfg.train.expert_chunk and cfg.parallel.expert > 1:
        # expert parallelism exchanges each layer's tokens by all-to-all inside the experts' forward
        raise ConfigError(f"train.expert_chunk={cfg.train.expert_chunk} tiles experts that one rank holds whole; with "
                          f"parallel.expert={cfg.parallel.expert} leave it 0")
    allowed = CHECKPOINT_POLICIES[cfg.framework]
    if policy not in allowed:
        raise ConfigError(f"train.checkpoint_policy={policy} is not a {cfg.framework} policy; with --framework "
                          f"{cfg.framework} use one of {', '.join(allowed)}")
    # the seeds too: numpy refuses a negative one only once the model is built, as "expected non-negative integer"
    for k, v in {"train.eval_every": cfg.train.eval_every, "train.save_every": cfg.train.save_every,
                 "optim.warmup_steps": cfg.optim.warmup_steps, "train.threads": cfg.train.threads,
                 "train.expert_chunk": cfg.train.expert_chunk, "train.seed": cfg.train.seed,
                 "data.seed": cfg.data.seed}.items():
        if v < 0:
            raise ConfigError(f"{k} must be >= 0, got {v}")
    if not cfg.train.out_dir.strip():
        # Path("") is the working directory: the run's model, checkpoints and adapter would land there
        raise ConfigError("train.out_dir is empty: give the run folder (--out DIR or train.out_dir=DIR)")
    o = cfg.optim
    if not (math.isfinite(o.lr) and o.lr > 0):
        raise ConfigError(f"optim.lr must be a finite number > 0, got {o.lr}")
    for k in ("beta1", "beta2"):
        if not 0 <= getattr(o, k) < 1:
            raise ConfigError(f"optim.{k} must be in [0, 1), got {getattr(o, k)}")
    # finite: NaN passes every comparison below (max_grad_norm=nan turned clipping off in silence) and eps=inf
    # makes every update zero
    for k in ("eps", "weight_decay", "max_grad_norm", "min_lr_ratio"):
        if not math.isfinite(getattr(o, k)):
            raise ConfigError(f"optim.{k} must be a finite number, got {getattr(o, k)}"
                              + (" (0 turns clipping off)" if k == "max_grad_norm" else ""))
    if o.eps <= 0 or o.weight_decay < 0 or o.max_grad_norm < 0 or not 0 <= o.min_lr_ratio <= 1:
        raise ConfigError("optim: need eps > 0, weight_decay >= 0, max_grad_norm >= 0, 0 <= min_lr_ratio <= 1")
    if cfg.model.path is None and cfg.model.tiny is None:
        raise ConfigError("model: set path (a HF checkpoint folder) or tiny (a configs/models/*.yaml preset)")
    from shared_math.tracking import check_logger_names  # imported here: tracking imports this module

    check_logger_names(cfg.train.loggers)
    if not cfg.train.tracker_project.strip():
        raise ConfigError("train.tracker_project must not be empty (trackio's project name, default splitmoe)")
    if cfg.data.source == "jsonl" and not cfg.data.path:
        raise ConfigError("data.source is jsonl but data.path is not set")
    if cfg.data.source == "synthetic" and (cfg.data.path or cfg.data.eval_path):
        # a file named here would otherwise be ignored in silence: the run would train on the synthetic tasks
        named = "data.path" if cfg.data.path else "data.eval_path"
        raise ConfigError(f"{named} is set but data.source is synthetic, which reads no file: add data.source=jsonl "
                          f"to train on {cfg.data.path or cfg.data.eval_path}, or drop {named}")
    par = cfg.parallel
    for k in ("data", "fsdp", "expert"):
        if getattr(par, k) < 1:
            raise ConfigError(f"parallel.{k} must be >= 1, got {getattr(par, k)} (1 means the axis is not split)")
    if cfg.data.batch_size % par.batch_shards:
        raise ConfigError(f"data.batch_size={cfg.data.batch_size} does not split over the {par.batch_shards} devices "
                          f"of parallel ({par.describe()}): every device takes batch_size / devices rows; set "
                          f"data.batch_size to a multiple of {par.batch_shards}")


def is_checkpoint_layers(layers: object, num_layers: int) -> bool:
    """Whether `layers` is a valid count of checkpointed first decoder layers: an int (not a bool) in 0..num_layers."""
    return not isinstance(layers, bool) and isinstance(layers, int) and 0 <= layers <= num_layers


def validate_checkpoint_layers(layers: int, num_layers: int) -> None:
    """ValueError unless `layers` (both frameworks' `gradient_checkpointing_enable(layers=...)`: how many of the first
    decoder layers to checkpoint) is an int in 0..num_layers."""
    if not is_checkpoint_layers(layers, num_layers):
        raise ValueError(f"gradient_checkpointing_enable(layers={layers!r}): layers is how many of the first decoder "
                         f"layers to checkpoint, an int from 0 to {num_layers} (this model has {num_layers}); pass "
                         "one of those, or None to checkpoint every layer")


def check_in_backward(max_grad_norm: float, grad_accum: int) -> None:
    """ConfigError when an in-backward optimizer (optim.in_backward) cannot give the configured update."""
    problems = []
    if max_grad_norm > 0:
        problems.append(f"optim.max_grad_norm={max_grad_norm}, which clips by the global norm, known only after "
                        "the backward (set optim.max_grad_norm=0)")
    if grad_accum > 1:
        problems.append(f"train.grad_accum={grad_accum}, which sums micro-batches before one update (set "
                        "train.grad_accum=1 and a larger data.batch_size)")
    if problems:
        raise ConfigError("optim.in_backward updates each tensor during the backward, so it cannot run with "
                          + "; nor with ".join(problems) + ". Or set optim.in_backward=false")


def check_checkpoint_layers(cfg: RunConfig, num_layers: int) -> None:
    """train.checkpoint_layers against the model's depth, which the config alone does not know: both trainers call
    it once the checkpoint's config is read, before the weights are."""
    layers = cfg.train.checkpoint_layers
    if layers is not None and layers > num_layers:
        raise ConfigError(f"train.checkpoint_layers={layers} is more than this model's {num_layers} decoder layers; "
                          f"set it to at most {num_layers}, or null to checkpoint every layer")


# ---- dict <-> dataclasses --------------------------------------------------------------------------------------------

def to_dict(obj: Any) -> Any:
    """A config (or section) as plain YAML/JSON-able data (tuples become lists)."""
    if is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in fields(obj)}
    if isinstance(obj, tuple | list):
        return [to_dict(v) for v in obj]
    return obj


# String keys whose documented values YAML 1.1 reads as booleans when unquoted (`train.jax_compile_cache=off` gave
# "must be a string, got False"): the boolean stands for the word
_YAML_BOOLEAN_WORDS = {(False, "train.jax_compile_cache"): "off"}


def _coerce(value: Any, hint: Any, key: str) -> Any:
    """Check/convert one leaf value against its type hint; raise ConfigError naming `key`."""
    origin = get_origin(hint)
    if origin is Literal:
        if value not in get_args(hint):
            raise ConfigError(f"{key} must be one of {list(get_args(hint))}, got {value!r}")
        return value
    args = [a for a in get_args(hint) if a is not type(None)]
    if type(None) in get_args(hint):
        if value is None:
            return None
        if len(args) == 1:
            return _coerce(value, args[0], key)
    if origin is tuple or hint is tuple:
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{key} must be a list, got {value!r}")
        return tuple(value)
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key} must be true or false, got {value!r}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key} must be an integer, got {value!r}")
        return value
    if hint is float:
        if isinstance(value, str):  # YAML 1.1 reads 2e-4 (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"{key} must be a number, got {value!r}")
        return float(value)
    if hint is str:
        if isinstance(value, bool) and (value, key) in _YAML_BOOLEAN_WORDS:
            return _YAML_BOOLEAN_WORDS[value, key]
        if not isinstance(value, str):
            raise ConfigError(f"{key} must be a string, got {value!r}")
        return value
    return value


def from_dict(cls: type, data: dict[str, Any] | None, prefix: str = "") -> Any:
    """Build dataclass `cls` from nested dicts; unknown keys and wrong types are ConfigErrors naming the key."""
    data = {} if data is None else data
    where = prefix.rstrip(".") or "the run config"
    if not isinstance(data, dict):
        raise ConfigError(f"{where} must be a mapping, got {data!r}")
    hints = get_type_hints(cls)
    names = [f.name for f in fields(cls)]
    unknown = sorted(set(data) - set(names))
    if unknown:
        raise ConfigError(f"unknown key(s) {[prefix + k for k in unknown]} in {where}; known keys: "
                          f"{', '.join(prefix + n for n in names)}")
    kwargs = {}
    for name in names:
        if name not in data:
            continue
        hint, key = hints[name], prefix + name
        if is_dataclass(hint):
            kwargs[name] = from_dict(hint, data[name], key + ".")
        else:
            kwargs[name] = _coerce(data[name], hint, key)
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except (ValueError, TypeError) as e:
        raise ConfigError(f"{where}: {e}") from None


def _set_dotted(data: dict[str, Any], key: str, value: Any) -> None:
    parts = key.split(".")
    node = data
    for p in parts[:-1]:
        child = node.setdefault(p, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override {key}: {p} is not a section")
        node = child
    node[parts[-1]] = value


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply `section.key=value` strings (values parsed as YAML: numbers, true/false, null, [lists]) to `data`."""
    import yaml

    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not key=value (e.g. optim.lr=1e-3)")
        key, raw = item.split("=", 1)
        key = key.strip()
        if not key:
            raise ConfigError(f"override {item!r} has an empty key")
        value = yaml.safe_load(raw) if raw.strip() else ""
        _set_dotted(data, key, value)
    return data


def read_yaml_mapping(path: str | Path, what: str, example: str, shape: str) -> dict[str, Any]:
    """The mapping the YAML file `path` holds (empty for an empty file); ConfigError naming the file when it is a
    folder, missing, not valid YAML or not a mapping (`what`: e.g. "run config"; `example`: a file that is one;
    `shape`: what the mapping holds)."""
    import yaml

    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"{what} {path} is a folder: give a YAML file, e.g. {example}")
    if not path.is_file():
        raise ConfigError(f"{what} {path} does not exist (e.g. {example})")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path} is not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a {what} is {shape}; got {data!r}"[:400])
    return data


def load_run_config(path: str | Path | None = None, overrides: list[str] | None = None) -> RunConfig:
    """RunConfig from a YAML file (None: the defaults, i.e. the embedded default job) plus `key=value` overrides."""

    data: dict[str, Any] = {}
    if path is not None:
        data = read_yaml_mapping(path, "run config", "configs/runs/default.yaml",
                                 "a mapping of sections (model, lora, data, optim, train)")
    apply_overrides(data, list(overrides or []))
    return from_dict(RunConfig, data)


def with_overrides(cfg: RunConfig, *overrides: str) -> RunConfig:
    """A copy of `cfg` with `key=value` overrides applied (handy in notebooks and tests)."""
    return from_dict(RunConfig, apply_overrides(to_dict(cfg), list(overrides)))


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(flatten(v, prefix + k + "."))
        else:
            out[prefix + k] = v
    return out


def trajectory_dict(cfg: RunConfig) -> dict[str, Any]:
    """The flattened config minus the keys that cannot change the losses (NON_TRAJECTORY_KEYS)."""
    return {k: v for k, v in flatten(to_dict(cfg)).items() if k not in NON_TRAJECTORY_KEYS}


# Keys added to the config after checkpoints were already written, with the value an older file meant by leaving them
# out: a run saved before per-target LoRA ranks existed resumes under a config that sets none.
_ABSENT_MEANS = {"lora.target_ranks": [], "lora.target_alphas": []}


def diff_configs(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """`key: saved -> current` for every key whose value differs (both flattened trajectory dicts); a key one side
    lacks counts as its `_ABSENT_MEANS` value there."""
    def get(d: dict[str, Any], k: str) -> Any:
        v = d.get(k, _ABSENT_MEANS.get(k, "<absent>"))
        return list(v) if isinstance(v, tuple) else v

    return [f"{k}: {get(saved, k)!r} -> {get(current, k)!r}"
            for k in sorted(set(saved) | set(current)) if get(saved, k) != get(current, k)]


def resolve_path(p: str | Path) -> Path:
    """A path as given if it exists relative to the working directory, else relative to the repository root
    (so `configs/...` works from anywhere)."""
    p = Path(p)
    if p.is_absolute() or p.exists():
        return p
    return REPO_ROOT / p if (REPO_ROOT / p).exists() else p


__all__ = ["ConfigError", "DataSection", "ModelSection", "OptimSection", "ParallelSection", "RunConfig",
           "TrainSection", "apply_overrides", "diff_configs", "from_dict", "load_run_config", "to_dict",
           "trajectory_dict", "with_overrides"]
