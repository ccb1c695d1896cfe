"""Split-LoRA fine-tuning in JAX + Flax NNX + optax: `Trainer` (one object a notebook can drive) and `train(cfg)`.

Mirrors `torch_impl.train` name for name. Everything that is not the forward/backward or the optimizer call lives in
`shared_math.training` (data, LoRA init, schedule, clipping rule, atomic checkpoints, metrics, plots), so both
frameworks see the same batches, start from the same adapter and apply the same learning rates.

One optimizer step: `grad_accum` micro-batches, each `value_and_grad(loss / grad_accum)` over the `nnx.LoRAParam`
state (jitted, the rest of the model closed over), gradients summed; the pre-clip global norm; NaN/inf and collapse
check (TrainingDiverged, no update); gradients scaled by `clip_coefficient`; `optax.adamw` (decoupled weight decay,
eps outside the square root: torch.optim.AdamW's semantics) with the learning rate injected per step from `lr_at`;
an update that would make a LoRA tensor non-finite is not kept (TrainingDiverged). Token ids are checked before
every jitted call, as the eager model does: under jit an out-of-range id would gather NaN embeddings silently.

Training state: numpy `.npz` files (LoRA tensors by canonical name, the optax state's leaves in tree order, the
PRNG key) inside the same atomically written checkpoint folder as torch's (shared_math.training, which also
records every file's size and SHA-256 in meta.json). Read with `allow_pickle=False`: an object array planted in a
run folder is refused, never unpickled. Not orbax: its save is asynchronous and its commit protocol (a temporary
folder renamed on finalisation) does not fsync on a local file system, while this protocol fsyncs every file and
the folder before the rename; the state is a few MB of LoRA and AdamW moments, for which npz is simple and exact.
"""

from __future__ import annotations

import time
import zipfile
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from jax_impl.backends import resolve_backend
from jax_impl.load import load_model
from jax_impl.lora import load_lora_state_dict, lora_state_dict, save_adapter
from jax_impl.models.layers import prepare_position_ids
from shared_math.train_config import ConfigError, RunConfig
from shared_math.training import (
    CheckpointDamaged,
    PreparedRun,
    TrainResult,
    check_finite,
    check_params_finite,
    check_resume,
    checkpoint_meta,
    clip_coefficient,
    exact_match_eval,
    init_lora_tensors,
    lr_at,
    prepare_run,
    run_training,
    write_checkpoint_atomic,
)

FRAMEWORK = "jax"
STATE_FILE = "state.npz"
_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


# AdamW with every hyper-parameter injected (set in the state, per run and per step): one optax transformation and
# one compiled update for all runs of a process, so a second Trainer (resume, compare, tests) compiles nothing new.
_TX = optax.inject_hyperparams(optax.adamw)(learning_rate=0.0, b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.0)


def _loss_fn(graphdef, params, rest, input_ids, labels, position_ids, scale):
    """(loss · scale, loss): the gradient is taken of the scaled loss, as torch's (loss / accum).backward()."""
    model = nnx.merge(graphdef, params, rest)
    loss = model(input_ids, labels=labels, position_ids=position_ids).loss
    return loss * scale, loss


# graphdef (the model's structure) is static and hashable: models of the same structure share compilations
_loss_and_grad = jax.jit(jax.value_and_grad(_loss_fn, argnums=1, has_aux=True), static_argnums=0)
_loss = jax.jit(lambda graphdef, params, rest, ids, labels, pos: _loss_fn(graphdef, params, rest, ids, labels, pos,
                                                                          1.0)[1], static_argnums=0)
_logits = jax.jit(lambda graphdef, params, rest, ids, pos: nnx.merge(graphdef, params, rest)(
    ids, position_ids=pos).logits.astype(jnp.float32), static_argnums=0)


@jax.jit
def _apply(params, opt_state, grads, coef, lr):
    """Scale the gradients by the clipping coefficient, one AdamW update at learning rate `lr` -> (params, opt_state,
    whether every updated LoRA tensor is finite)."""
    grads = jax.tree.map(lambda g: g * coef, grads)
    opt_state.hyperparams["learning_rate"] = lr
    updates, opt_state = _TX.update(grads, opt_state, params)
    params = optax.apply_updates(params, updates)
    finite = jnp.all(jnp.stack([jnp.isfinite(x).all() for x in jax.tree.leaves(params)]))
    return params, opt_state, finite


class Trainer:
    """A model with split LoRA, its optax AdamW state and data, stepping one optimizer step at a time.

    `Trainer(cfg)` builds the checkpoint (tiny preset) and data of `cfg`, loads the model, attaches LoRA and loads
    the shared numpy initial adapter. `train_step()`, `evaluate()`, `save_checkpoint()`, `restore(folder)`,
    `save_adapter(folder)`.
    """

    framework = FRAMEWORK

    def __init__(self, cfg: RunConfig, *, out_dir: str | Path | None = None, run: PreparedRun | None = None) -> None:
        if cfg.lora.train_router:
            raise ConfigError("lora.train_router is not supported by jax_impl yet (its attach_lora keeps routers "
                              "frozen); train it with --framework torch")
        self.cfg = cfg
        # a backend that cannot run here says why before the data and the checkpoint are built
        resolve_backend(cfg.model.moe_backend, dtype=_DTYPES[cfg.model.dtype])
        self.run = run if run is not None else prepare_run(cfg, out_dir)
        if cfg.model.dtype == "float32":  # fp32 means fp32 (numerics policy): full-precision matmuls
            jax.config.update("jax_default_matmul_precision", "highest")
        self.model = load_model(self.run.checkpoint, lora=cfg.lora, dtype=_DTYPES[cfg.model.dtype],
                                moe_backend=cfg.model.moe_backend)
        load_lora_state_dict(self.model, init_lora_tensors(cfg.lora, self.run.model_cfg, cfg.train.seed))
        self.graphdef, self.params, self.rest = nnx.split(self.model, nnx.LoRAParam, ...)
        o = cfg.optim
        self.opt_state = _TX.init(self.params)
        for k, v in {"b1": o.beta1, "b2": o.beta2, "eps": o.eps, "weight_decay": o.weight_decay}.items():
            self.opt_state.hyperparams[k] = jnp.asarray(v, jnp.float32)
        self.rng = jax.random.key(cfg.train.seed)  # carried in the state for future stochastic layers (dropout)
        self.step = 0  # optimizer steps taken

    # ---- one step ------------------------------------------------------------------------------------------------
    def _check_ids(self, input_ids: np.ndarray, position_ids: np.ndarray | None) -> None:
        """The eager model's input checks (token ids in [0, V), shapes; the same ValueError), run on the concrete
        arrays before a jitted call: inside jit the ids are tracers, which the model cannot check."""
        prepare_position_ids(input_ids, position_ids, self.model.config.vocab_size)

    def train_step(self) -> tuple[float, float]:
        """One optimizer step over `grad_accum` micro-batches -> (mean micro-batch loss, pre-clip grad norm)."""
        accum = self.cfg.train.grad_accum
        losses, grads = [], None
        for i in range(accum):
            b = self.run.train_data.batch(self.step * accum + i)
            self._check_ids(b["input_ids"], b["position_ids"])
            (_, loss), g = _loss_and_grad(self.graphdef, self.params, self.rest, jnp.asarray(b["input_ids"]),
                                          jnp.asarray(b["labels"]), jnp.asarray(b["position_ids"]), 1.0 / accum)
            losses.append(float(loss))
            grads = g if grads is None else jax.tree.map(jnp.add, grads, g)
        loss = float(np.mean(losses))
        norm = float(optax.tree.norm(grads))
        check_finite(self.step, loss, norm, self.run.out_dir, vocab_size=self.run.model_cfg.vocab_size)
        coef = clip_coefficient(norm, self.cfg.optim.max_grad_norm)
        params, opt_state, finite = _apply(self.params, self.opt_state, grads, jnp.float32(coef),
                                           jnp.float32(lr_at(self.step, self.cfg)))
        check_params_finite(self.step, bool(finite), self.run.out_dir)  # before adopting the update
        self.params, self.opt_state = params, opt_state
        nnx.update(self.model, self.params)  # keep the module view current (evaluate, save_adapter)
        self.step += 1
        return loss, norm

    # ---- evaluation ------------------------------------------------------------------------------------------------
    def logits(self, input_ids: np.ndarray, position_ids: np.ndarray) -> np.ndarray:
        """Logits [B, S, V] as float32 numpy."""
        self._check_ids(input_ids, position_ids)
        return np.asarray(_logits(self.graphdef, self.params, self.rest, jnp.asarray(input_ids),
                                  jnp.asarray(position_ids)))

    def evaluate(self) -> dict[str, Any]:
        """Held-out loss (token-weighted over the eval rows) and exact-match (greedy decoding), where available."""
        row: dict[str, Any] = {"step": self.step}
        ev = self.run.eval_data
        if ev is not None:
            total, count = 0.0, 0
            for k in range(ev.batches_per_epoch):
                b = ev.batch(k)
                n = int((b["labels"][:, 1:] != -100).sum())
                self._check_ids(b["input_ids"], b["position_ids"])
                loss = _loss(self.graphdef, self.params, self.rest, jnp.asarray(b["input_ids"]),
                             jnp.asarray(b["labels"]), jnp.asarray(b["position_ids"]))
                total, count = total + float(loss) * n, count + n
            row["eval_loss"] = total / max(count, 1)
        em = exact_match_eval(self.run, self.logits)
        if em is not None:
            row["exact_match"] = em
        return row

    # ---- state -------------------------------------------------------------------------------------------------------
    def save_checkpoint(self) -> Path:
        """Write the training state at this step atomically under `<out_dir>/checkpoints/step_XXXXXXXX`."""
        def write(tmp: Path) -> None:
            arrays = {f"lora/{k}": v for k, v in lora_state_dict(self.model).items()}
            for i, leaf in enumerate(jax.tree.leaves(self.opt_state)):
                arrays[f"opt/{i:05d}"] = np.asarray(leaf)
            arrays["rng"] = np.asarray(jax.random.key_data(self.rng))
            arrays["step"] = np.asarray(self.step)
            with open(tmp / STATE_FILE, "wb") as f:
                np.savez(f, **arrays)

        meta = checkpoint_meta(self.cfg, self.step, FRAMEWORK)
        return write_checkpoint_atomic(self.run.out_dir, self.step, meta, write, keep=self.cfg.train.keep_checkpoints)

    def restore(self, folder: str | Path) -> None:
        """Load a checkpoint written by `save_checkpoint` (same framework and an equivalent config). Its files are
        verified and read before anything is changed; a damaged folder raises CheckpointDamaged."""
        folder = Path(folder)
        meta = check_resume(folder, self.cfg, FRAMEWORK)
        path = folder / STATE_FILE
        try:
            # allow_pickle=False (numpy's default, spelled out): an object array is refused, never unpickled
            with np.load(path, allow_pickle=False) as z:
                arrays = {k: z[k] for k in z.files}
        except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
            raise CheckpointDamaged(f"{path} cannot be read ({type(e).__name__}: {e})") from e
        if "rng" not in arrays:
            raise CheckpointDamaged(f"{path} is incomplete: it has no 'rng' array")
        # every check before the first change, so a refused folder leaves this trainer as it was
        leaves, treedef = jax.tree.flatten(self.opt_state)
        saved = [arrays[k] for k in sorted(k for k in arrays if k.startswith("opt/"))]
        if len(saved) != len(leaves) or any(np.shape(a) != np.shape(b) for a, b in zip(saved, leaves)):
            raise ConfigError(f"{folder}: its optimizer state does not fit this model's adapters")
        load_lora_state_dict(self.model, {k[5:]: v for k, v in arrays.items() if k.startswith("lora/")})
        _, self.params, _ = nnx.split(self.model, nnx.LoRAParam, ...)
        self.opt_state = jax.tree.unflatten(treedef, [jnp.asarray(a, dtype=jnp.asarray(b).dtype)
                                                      for a, b in zip(saved, leaves)])
        self.rng = jax.random.wrap_key_data(jnp.asarray(arrays["rng"]))
        self.step = int(meta["step"])

    def save_adapter(self, folder: str | Path) -> Path:
        """The adapter in PEFT format (loads with peft.PeftModel.from_pretrained onto the HF model)."""
        return save_adapter(self.model, folder)


def train(cfg: RunConfig, *, out_dir: str | Path | None = None, resume: bool = False, stop_after: int | None = None,
          progress: bool = True, trainer: Trainer | None = None) -> TrainResult:
    """Run `cfg` to `train.steps` (or to step `stop_after`): eval before, every `eval_every` and after; checkpoints
    every `save_every`; metrics.jsonl, loss.png and the PEFT adapter (`adapter/`) in the run folder.

    `resume`: continue from the newest checkpoint in the run folder (refused if its config differs). Without it, a
    run folder that already holds checkpoints is refused, so a run is never overwritten by accident.
    """
    t0 = time.perf_counter()
    tr = trainer if trainer is not None else Trainer(cfg, out_dir=out_dir)
    return run_training(tr, resume=resume, stop_after=stop_after, progress=progress, t0=t0)
