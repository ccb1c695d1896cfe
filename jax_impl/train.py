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

Several devices (`parallel:` data / fsdp / expert, product > 1; jax_impl/parallel.py): one process over the devices
jax sees (`devices=` picks them), a layout that does not match them or does not divide the routed experts refused
before any weight is read. The weights are read into host memory and placed in their shards, the MoE layers dispatch
over the mesh, batches are split by rows, and the same jitted functions run with the layout as a static argument
that pins the gradients and the updated state to the placement of the LoRA tensors; the loss is the same mean over
the batch's valid tokens as on one device. Checkpoints are the same orbax trees: each array is saved from its
shards, and restored straight onto this trainer's placement, whatever layout wrote it (N devices -> M, 1 included).

Training state: orbax-checkpoint's standard PyTree checkpoint (OCDBT + zarr, no pickle) of {"params": the LoRA
`nnx.State`, "opt_state": the optax state with its injected hyper-parameters, "rng": the PRNG key's data, "step"},
written into `<step folder>/state/` by a synchronous `ocp.Checkpointer(ocp.StandardCheckpointHandler())` (the
blocking form of `ocp.StandardCheckpointer`), inside the atomically written step folder that torch's state also uses
(shared_math.training.write_checkpoint_atomic). `save` returns only once orbax has written every file and renamed its
own temporary folder to `state/`; only then are all files under the step folder hashed into meta.json (size and
SHA-256 of each, nested paths included), fsynced with their folders, and the step folder renamed into place. A kill
at any point therefore leaves either the complete new step folder or only a `.tmp-step_*` folder, which the next run
removes; the previous checkpoint is never touched before the new one is in place.

Why not orbax's CheckpointManager: it owns the step folders (its own names, commit protocol, retention and step
discovery) and commits each by renaming its temporary folder, which on a local file system does not fsync (orbax
0.12.8); its saves are asynchronous by default. Here meta.json (config, trajectory, manifest) must appear in the same
atomic rename as the state, and resume falls back past damaged checkpoints by the project's own rule: one commit
protocol, the project's, keeps both guarantees; orbax provides what it is good at, the arrays' format.

Why the SHA-256 manifest still matters with orbax: OCDBT checksums its manifest, but a flipped bit in a zstd-compressed
data chunk restores silently wrong values (measured with orbax 0.12.8); a truncated file raises one of many exception
types (ValueError, KeyError, JSONDecodeError, FileNotFoundError, bare Exception) after logging asyncio tracebacks.
verify_checkpoint catches all of these before orbax reads anything, and an orbax state whose meta.json records no
files is refused (every one is saved with its manifest), so orbax only reads bytes as they were written. Should it
fail still (a manifest rewritten to match damaged files), its failure becomes CheckpointDamaged, in one line with
its tracebacks silenced, and resume falls back to an older checkpoint either way.

Restore builds the abstract target (shape, dtype, sharding) from this trainer's own params / opt_state / key and
compares it with the checkpoint's metadata first: a checkpoint of another model or LoRA layout is a ConfigError that
names the differing arrays (orbax itself would cast a differing dtype silently), never a half-restored trainer.
Run folders from before orbax hold `state.npz` (LoRA by canonical name, optax leaves in tree order, the key's data):
those are still read, with `allow_pickle=False` (an object array planted in a run folder is refused, never
unpickled), and the next save writes the orbax format.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import sys
import time
import warnings
import zipfile
from collections.abc import Callable, Iterator, Sequence
from functools import partial
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from jax_impl.backends import resolve_backend
from jax_impl.compile_cache import enable_compile_cache
from jax_impl.load import load_model
from jax_impl.lora import load_lora_state_dict, save_adapter
from jax_impl.models.layers import prepare_position_ids
from jax_impl.routing_stats import RoutingStatsAccumulator, routing_stats_of
from shared_math.train_config import ConfigError, RunConfig, check_checkpoint_layers
from shared_math.training import (
    CheckpointDamaged,
    PreparedRun,
    TrainResult,
    check_finite,
    check_params_finite,
    check_resume,
    check_same_data,
    checkpoint_meta,
    clip_coefficient,
    data_record,
    exact_match_eval,
    init_lora_tensors,
    lr_at,
    prepare_run,
    run_training,
    write_checkpoint_atomic,
)

FRAMEWORK = "jax"
STATE_DIR = "state"  # orbax's PyTree checkpoint of the training state, inside the step folder
LEGACY_STATE_FILE = "state.npz"  # the format before orbax: read as a fallback, never written
_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


# AdamW with every hyper-parameter injected (set in the state, per run and per step): one optax transformation and
# one compiled update for all runs of a process, so a second Trainer (resume, compare, tests) compiles nothing new.
_TX = optax.inject_hyperparams(optax.adamw)(learning_rate=0.0, b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.0)


def _loss_fn(graphdef, params, rest, input_ids, labels, position_ids, scale):
    """(loss · scale, (loss, routing statistics)): the gradient is taken of the scaled loss, as torch's
    (loss / accum).backward(); the statistics are those the MoE blocks wrote in this forward ([] when off)."""
    # a copy: the MoE blocks' routing statistics are variables written inside this trace (under value_and_grad,
    # nnx refuses writes to the variables of a merge that shares them with the caller's state)
    model = nnx.merge(graphdef, params, rest, copy=True)
    # the loss without [B, S, V] logits (jax_impl.loss): logits stay available to evaluation through _logits
    loss = model(input_ids, labels=labels, position_ids=position_ids, return_logits=False).loss
    return loss * scale, (loss, routing_stats_of(model))


def _loss_and_grad_fn(graphdef, params, rest, input_ids, labels, position_ids, scale, layout=None):
    """((loss · scale, loss), LoRA gradients, routing statistics); on a mesh (`layout`) the gradients are placed as
    the LoRA tensors themselves (XLA reduces them over the devices that hold other rows)."""
    (scaled, (loss, routing)), grads = jax.value_and_grad(_loss_fn, argnums=1, has_aux=True)(
        graphdef, params, rest, input_ids, labels, position_ids, scale)
    if layout is not None:
        grads = layout.params.constrain(grads)
    return (scaled, loss), grads, routing


# graphdef (the model's structure) and the layout are static and hashable: models of the same structure (and mesh)
# share compilations
_loss_and_grad = jax.jit(_loss_and_grad_fn, static_argnums=0, static_argnames="layout")
_loss = jax.jit(lambda graphdef, params, rest, ids, labels, pos: _loss_fn(graphdef, params, rest, ids, labels, pos,
                                                                          1.0)[1][0], static_argnums=0)
_logits = jax.jit(lambda graphdef, params, rest, ids, pos: nnx.merge(graphdef, params, rest)(
    ids, position_ids=pos).logits.astype(jnp.float32), static_argnums=0)


# The pre-clip global norm as one program. Eagerly, optax.tree.norm dispatches one reduction and one add per LoRA
# tensor; on a mesh each is an SPMD program with an all-reduce, and on XLA:CPU host devices these many small
# collective programs deadlocked (XLA aborts after its 40 s rendezvous timeout, Python stack in tree_norm): 8 of 9
# 30-step 4-device runs on the loaded 2-core CI machine, 0 of 6 with this one jitted program.
_grad_norm = jax.jit(optax.tree.norm)


@partial(jax.jit, static_argnames="layout")
def _apply(params, opt_state, grads, coef, lr, layout=None):
    """Scale the gradients by the clipping coefficient, one AdamW update at learning rate `lr` -> (params, opt_state,
    whether every updated LoRA tensor is finite). On a mesh (`layout`) the new state keeps the old one's placement."""
    grads = jax.tree.map(lambda g: g * coef, grads)
    opt_state.hyperparams["learning_rate"] = lr
    updates, opt_state = _TX.update(grads, opt_state, params)
    params = optax.apply_updates(params, updates)
    if layout is not None:
        params, opt_state = layout.params.constrain(params), layout.opt_state.constrain(opt_state)
    finite = jnp.all(jnp.stack([jnp.isfinite(x).all() for x in jax.tree.leaves(params)]))
    return params, opt_state, finite


class Trainer:
    """A model with split LoRA, its optax AdamW state and data, stepping one optimizer step at a time.

    `Trainer(cfg)` builds the checkpoint (tiny preset) and data of `cfg`, loads the model, attaches LoRA and loads
    the shared numpy initial adapter. `train_step()`, `evaluate()`, `save_checkpoint()`, `restore(folder)`,
    `save_adapter(folder)`, `pop_routing_stats()` (the routing analytics since the last call).
    """

    framework = FRAMEWORK

    def __init__(self, cfg: RunConfig, *, out_dir: str | Path | None = None, run: PreparedRun | None = None,
                 devices: Sequence[Any] | None = None) -> None:
        """`devices`: the devices the mesh of `cfg.parallel` spans (default: all that jax sees). Without it, a
        layout of one device (`parallel` all 1, the default) trains on jax's default device, no mesh; with it, even
        one device gets the mesh path (to check that path where only one device is at hand)."""
        if cfg.lora.train_router:
            raise ConfigError("lora.train_router is not supported by jax_impl yet (its attach_lora keeps routers "
                              "frozen); train it with --framework torch")
        if cfg.train.gradient_checkpointing == "offload":
            # tried (commit 477d606: the layer inputs as jax.checkpoint residuals offloaded to pinned_host): on an
            # H100 with jax 0.11.2 XLA planned more device memory with it, not less (benchmarks/REPORT.md)
            raise ConfigError("train.gradient_checkpointing=offload keeps layer inputs in host memory in torch_impl "
                              "only; with --framework jax use train.gradient_checkpointing=recompute (and "
                              "train.expert_chunk for long context)")
        self.cfg = cfg
        # a backend that cannot run here says why before the data and the checkpoint are built
        resolve_backend(cfg.model.moe_backend, dtype=_DTYPES[cfg.model.dtype])
        self.compile_cache = enable_compile_cache(cfg.train.jax_compile_cache)  # before the first compile
        self.mesh, self.layout = None, None
        if cfg.parallel.devices > 1 or devices is not None:  # a layout that does not match the devices is
            from jax_impl import parallel  # refused before any work

            self.mesh = parallel.make_mesh(cfg.parallel, devices)
        self.run = run if run is not None else prepare_run(cfg, out_dir)
        check_checkpoint_layers(cfg, self.run.model_cfg.num_hidden_layers)  # before the weights are read
        if self.mesh is not None:  # before any weight is read
            parallel.check_experts(cfg.parallel, self.run.model_cfg)
        if cfg.model.dtype == "float32":  # fp32 means fp32 (numerics policy): full-precision matmuls
            jax.config.update("jax_default_matmul_precision", "highest")
        # on a mesh, the weights are read into host memory and then placed in their shards, so no one device ever
        # holds the whole model
        with jax.default_device(jax.devices("cpu")[0]) if self.mesh is not None else contextlib.nullcontext():
            self.model = load_model(self.run.checkpoint, lora=cfg.lora, dtype=_DTYPES[cfg.model.dtype],
                                    moe_backend=cfg.model.moe_backend)
            load_lora_state_dict(self.model, init_lora_tensors(cfg.lora, self.run.model_cfg, cfg.train.seed))
            if cfg.train.gradient_checkpointing == "recompute":  # layer inputs kept, layers recomputed (as torch)
                self.model.gradient_checkpointing_enable(cfg.train.checkpoint_policy,
                                                         layers=cfg.train.checkpoint_layers)
            # per-layer routing analytics (train.routing_stats): variables of the MoE blocks, so before the split
            self.routing = RoutingStatsAccumulator(self.model) if cfg.train.routing_stats else None
            if self.mesh is not None:
                parallel.shard_model(self.model, self.mesh)  # the MoE layers dispatch over the mesh
            if cfg.train.expert_chunk:  # after sharding: expert parallelism refuses the tiling (the config does too)
                self.model.tile_experts(cfg.train.expert_chunk)
            self.graphdef, self.params, self.rest = nnx.split(self.model, nnx.LoRAParam, ...)
            o = cfg.optim
            self.opt_state = _TX.init(self.params)
            for k, v in {"b1": o.beta1, "b2": o.beta2, "eps": o.eps, "weight_decay": o.weight_decay}.items():
                self.opt_state.hyperparams[k] = jnp.asarray(v, jnp.float32)
        if self.mesh is not None:
            self.layout = parallel.layout_of(self.model, self.mesh, self.params, self.rest, self.opt_state)
            self.rest = self.layout.rest.put(self.rest)
            nnx.update(self.model, self.rest)  # the module view holds the shards too (no host copy kept alive)
            self._place_state()
        self.rng = jax.random.key(cfg.train.seed)  # carried in the state for future stochastic layers (dropout)
        self.step = 0  # optimizer steps taken

    def _place_state(self) -> None:
        """On a mesh: the LoRA tensors and the optimizer state put on their shardings (after init or a restore
        that produced them elsewhere); the module view updated."""
        if self.layout is not None:
            self.params = self.layout.params.put(self.params)
            self.opt_state = self.layout.opt_state.put(self.opt_state)
        nnx.update(self.model, self.params)

    def _put(self, a: np.ndarray, fill: int | None = None) -> jax.Array:
        """A batch array on the device(s): jax's default device, or rows split over the mesh (padded to a multiple
        of the devices, `Layout.batch`: `fill`, or copies of the last row)."""
        return jnp.asarray(a) if self.layout is None else self.layout.batch(a, fill)

    # ---- one step ------------------------------------------------------------------------------------------------
    def _check_ids(self, input_ids: np.ndarray, position_ids: np.ndarray | None) -> None:
        """The eager model's input checks (token ids in [0, V), shapes; the same ValueError), run on the concrete
        arrays before a jitted call: inside jit the ids are tracers, which the model cannot check."""
        prepare_position_ids(input_ids, position_ids, self.model.config.vocab_size)

    def loss_and_grads(self, batch: dict[str, np.ndarray], scale: float = 1.0) -> tuple[jax.Array, Any]:
        """One micro-batch (a `PackedDataset.batch`): its loss (the mean over its valid tokens, on any mesh) and the
        gradients of `scale · loss` with respect to the LoRA tensors (an nnx.State shaped as `params`)."""
        self._check_ids(batch["input_ids"], batch["position_ids"])
        (_, loss), grads, routing = _loss_and_grad(self.graphdef, self.params, self.rest,
                                                   self._put(batch["input_ids"]), self._put(batch["labels"]),
                                                   self._put(batch["position_ids"]), scale, layout=self.layout)
        if self.routing is not None:  # into the routing statistics' window: an asynchronous device add
            self.routing.add(routing)
        return loss, grads

    def pop_routing_stats(self) -> dict[str, Any] | None:
        """The routing statistics of the micro-batches since the last call (the `routing` object of a metrics row:
        shared_math.routing_stats), read from the device; None with train.routing_stats off."""
        return None if self.routing is None else self.routing.pop()

    def train_step(self) -> tuple[float, float]:
        """One optimizer step over `grad_accum` micro-batches -> (mean micro-batch loss, pre-clip grad norm)."""
        accum = self.cfg.train.grad_accum
        losses, grads = [], None
        for i in range(accum):
            loss, g = self.loss_and_grads(self.run.train_data.batch(self.step * accum + i), 1.0 / accum)
            losses.append(float(loss))
            grads = g if grads is None else jax.tree.map(jnp.add, grads, g)
        loss = float(np.mean(losses))
        norm = float(_grad_norm(grads))
        check_finite(self.step, loss, norm, self.run.out_dir, vocab_size=self.run.model_cfg.vocab_size)
        coef = clip_coefficient(norm, self.cfg.optim.max_grad_norm)
        params, opt_state, finite = _apply(self.params, self.opt_state, grads, jnp.float32(coef),
                                           jnp.float32(lr_at(self.step, self.cfg)), layout=self.layout)
        check_params_finite(self.step, bool(finite), self.run.out_dir)  # before adopting the update
        self.params, self.opt_state = params, opt_state
        nnx.update(self.model, self.params)  # keep the module view current (evaluate, save_adapter)
        self.step += 1
        return loss, norm

    # ---- evaluation ------------------------------------------------------------------------------------------------
    def logits(self, input_ids: np.ndarray, position_ids: np.ndarray) -> np.ndarray:
        """Logits [B, S, V] as float32 numpy."""
        self._check_ids(input_ids, position_ids)
        return np.asarray(_logits(self.graphdef, self.params, self.rest, self._put(input_ids),
                                  self._put(position_ids)))[:len(input_ids)]  # (rows a mesh padded dropped)

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
                loss = _loss(self.graphdef, self.params, self.rest, self._put(b["input_ids"]),
                             self._put(b["labels"], fill=-100), self._put(b["position_ids"]))
                total, count = total + float(loss) * n, count + n
            row["eval_loss"] = total / max(count, 1)
        em = exact_match_eval(self.run, self.logits)
        if em is not None:
            row["exact_match"] = em
        return row

    # ---- state -------------------------------------------------------------------------------------------------------
    def _state_tree(self) -> dict[str, Any]:
        """The training state as one pytree: what orbax saves, and (as shapes) what a restore must fit. The key and
        the step are numpy, so orbax stores and returns them as numpy; the rest keeps its device and sharding."""
        return {"params": self.params, "opt_state": self.opt_state,
                "rng": np.asarray(jax.random.key_data(self.rng)), "step": np.asarray(self.step, np.int64)}

    def save_checkpoint(self) -> Path:
        """Write the training state at this step atomically under `<out_dir>/checkpoints/step_XXXXXXXX`."""
        def write(tmp: Path) -> None:
            # synchronous: when save returns, orbax has written every file and renamed its own temporary folder to
            # state/, so the manifest and the fsyncs that follow (write_checkpoint_atomic) see the final files
            # absolute: orbax refuses a relative path, and train.out_dir may be one ("runs/demo")
            with _orbax_checkpointer() as ckptr:
                ckptr.save((tmp / STATE_DIR).absolute(), self._state_tree())

        meta = checkpoint_meta(self.cfg, self.step, FRAMEWORK, train_data=data_record(self.run))
        return write_checkpoint_atomic(self.run.out_dir, self.step, meta, write, keep=self.cfg.train.keep_checkpoints)

    def restore(self, folder: str | Path) -> None:
        """Load a checkpoint written by `save_checkpoint` (same framework and an equivalent config), or a legacy
        `state.npz` one. Its files are verified and read before anything is changed; a damaged folder raises
        CheckpointDamaged, a state that does not fit this trainer's adapters ConfigError."""
        folder = Path(folder)
        meta = check_resume(folder, self.cfg, FRAMEWORK)
        check_same_data(folder, meta, self.run)  # before the state is read
        if (folder / STATE_DIR).is_dir():
            if not meta.get("files"):  # so orbax only ever reads bytes checked against their SHA-256
                raise CheckpointDamaged(f"{folder / 'meta.json'} records no files, but every orbax state is saved "
                                        "with its files' sizes and SHA-256: the checkpoint was altered after its save")
            state = _read_state(folder / STATE_DIR, self._state_tree())
            if int(state["step"]) != meta["step"]:
                raise CheckpointDamaged(f"{folder / STATE_DIR} holds the state of step {int(state['step'])}, its "
                                        f"meta.json says step {meta['step']} (files from different saves)")
            self.params, self.opt_state = state["params"], state["opt_state"]
            nnx.update(self.model, self.params)  # (restored straight onto this trainer's shardings, see _read_state)
            self.rng = jax.random.wrap_key_data(jnp.asarray(state["rng"]))
        elif (folder / LEGACY_STATE_FILE).is_file():
            self._restore_legacy_npz(folder / LEGACY_STATE_FILE)
        else:
            raise CheckpointDamaged(f"{folder} holds no training state: neither {STATE_DIR}/ (orbax) nor "
                                    f"{LEGACY_STATE_FILE} (older splitmoe)")
        self.step = int(meta["step"])

    def _restore_legacy_npz(self, path: Path) -> None:
        """The pre-orbax format: LoRA tensors by canonical name, the optax state's leaves in tree order, the key."""
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
            raise ConfigError(f"{path}: its optimizer state does not fit this model's adapters")
        load_lora_state_dict(self.model, {k[5:]: v for k, v in arrays.items() if k.startswith("lora/")})
        _, self.params, _ = nnx.split(self.model, nnx.LoRAParam, ...)
        self.opt_state = jax.tree.unflatten(treedef, [jnp.asarray(a, dtype=jnp.asarray(b).dtype)
                                                      for a, b in zip(saved, leaves)])
        self._place_state()
        self.rng = jax.random.wrap_key_data(jnp.asarray(arrays["rng"]))

    def save_adapter(self, folder: str | Path) -> Path:
        """The adapter in PEFT format (loads with peft.PeftModel.from_pretrained onto the HF model)."""
        return save_adapter(self.model, folder)


# ---- orbax ---------------------------------------------------------------------------------------------------------

def _orbax_checkpointer() -> Any:
    """orbax's standard PyTree checkpointing, synchronous (`ocp.Checkpointer`, not the asynchronous
    `StandardCheckpointer`): the atomic step-folder protocol needs every file on disk before it hashes and renames.
    Imported here: its 0.3 s import is paid by the runs that save or resume, not by every `import jax_impl.train`."""
    import orbax.checkpoint as ocp

    return ocp.Checkpointer(ocp.StandardCheckpointHandler())


def _read_state(path: Path, current: dict[str, Any]) -> dict[str, Any]:
    """The training state saved under `path` (orbax), restored into the abstract target of `current` (this
    trainer's `_state_tree()`: shapes, dtypes and placement, not its values or Python objects).

    The checkpoint's metadata is compared with the target first: a missing, extra or differently shaped or typed
    array is a ConfigError naming them (orbax would cast a differing dtype silently). Anything orbax cannot read is
    CheckpointDamaged. Each array comes back placed as this trainer's own: one committed to a sharding is restored
    straight onto it; one left to JAX's default device (uncommitted, as the trainer creates them) is read to host
    and put back uncommitted, because jit caches on committedness: committed copies recompiled the train step and
    the evaluation on every resume (the train suite's kill-and-resume test took 10.6 s instead of 2.2 s on CPU)."""
    import orbax.checkpoint as ocp

    path = Path(path).absolute()  # orbax refuses a relative path (a relative train.out_dir or --resume folder)

    def placed(x: Any) -> bool:
        return isinstance(x, jax.Array) and x.committed

    def spec(x: Any) -> Any:
        if placed(x):
            return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding)
        return np.broadcast_to(np.zeros((), x.dtype), np.shape(x))  # "restore as numpy", allocating nothing

    target = jax.tree.map(spec, current)
    names = jax.tree.leaves(ocp.tree.get_param_names(target, include_empty_nodes=False))
    want = {n: (tuple(x.shape), np.dtype(x.dtype)) for n, x in zip(names, jax.tree.leaves(target), strict=True)}
    saved = _orbax_read(path, lambda ckptr: _saved_specs(ckptr.metadata(path)))
    missing, extra = sorted(want.keys() - saved.keys()), sorted(saved.keys() - want.keys())
    differ = [f"{n}: saved {_fmt_spec(saved[n])}, this trainer {_fmt_spec(want[n])}"
              for n in sorted(want.keys() & saved.keys()) if saved[n] != want[n]]
    if missing or extra or differ:
        parts = ([f"{len(differ)} array(s) differ, e.g. " + "; ".join(differ[:3])] if differ else []) + \
                ([f"{len(missing)} missing, e.g. {missing[:3]}"] if missing else []) + \
                ([f"{len(extra)} not in this trainer, e.g. {extra[:3]}"] if extra else [])
        raise ConfigError(f"{path}: this training state does not fit this trainer's model and adapters ("
                          + "; ".join(parts) + "). Resume with the config and code that wrote it, or start a fresh "
                          "train.out_dir.")
    state = _orbax_read(path, lambda ckptr: ckptr.restore(path, target))
    return jax.tree.map(lambda r, c: jnp.asarray(r) if isinstance(c, jax.Array) and not placed(c) else r,
                        state, current)


def _saved_specs(metadata: Any) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    """{orbax parameter name: (shape, dtype)} of every array in a checkpoint's metadata (orbax 0.12: StepMetadata
    whose item_metadata.tree holds one ArrayMetadata per array)."""
    tree = getattr(getattr(metadata, "item_metadata", metadata), "tree", None)
    if tree is None:
        raise ValueError(f"no array metadata in {type(metadata).__name__}")
    return {m.name: (tuple(m.shape), np.dtype(m.dtype)) for m in jax.tree.leaves(tree) if hasattr(m, "shape")}


def _fmt_spec(s: tuple[tuple[int, ...], np.dtype]) -> str:
    return f"{s[1]}{list(s[0])}"


def _orbax_read(path: Path, read: Callable[[Any], Any]) -> Any:
    """`read(checkpointer)`, with any failure of orbax or tensorstore turned into CheckpointDamaged naming `path`.

    They raise ValueError, KeyError, JSONDecodeError, FileNotFoundError or a bare Exception depending on which file
    is damaged, hence `except Exception`; it wraps nothing but orbax's read of that folder."""
    why = None
    with _orbax_failures_quiet() as reports, _orbax_checkpointer() as ckptr:
        try:
            return read(ckptr)
        except Exception as e:  # broad on purpose: see the docstring
            why = _short_error(e)
        # After a failure only, with the reports still off: leaving the except clause dropped `e` and its traceback,
        # so the failed asyncio tasks they held are collected here rather than during some later step; tensorstore
        # threads still finishing reads of the failed restore then find orbax's event loop closed and report it
        # (hundreds of tracebacks without this wait; none once they had 0.2 s in the damage experiments on 2 cores):
        # wait until 0.1 s pass without a new report, at most 2 s.
        gc.collect()
        deadline, seen = time.monotonic() + 2.0, -1
        while seen != reports[0] and time.monotonic() < deadline:
            seen = reports[0]
            time.sleep(0.1)
            gc.collect()
    raise CheckpointDamaged(f"{path} cannot be read by orbax ({why}): the checkpoint is damaged or incomplete")


@contextlib.contextmanager
def _orbax_failures_quiet() -> Iterator[list[int]]:
    """Silence what a failed orbax read leaves behind besides its exception, each with a full traceback or
    tensorstore spec: "Task exception was never retrieved" (asyncio's logger), "Exception ignored in: ..." from
    failed coroutines and from tensorstore threads finishing reads after orbax closed its event loop
    (sys.unraisablehook), "coroutine ... was never awaited" (RuntimeWarning), and absl's log lines. The caller's
    CheckpointDamaged says it all, in one line. Yields [number of unraisable reports swallowed so far]."""
    loggers = [logging.getLogger(name) for name in ("asyncio", "absl")]
    levels, hook = [log.level for log in loggers], sys.unraisablehook
    reports = [0]

    def swallow(unraisable: Any) -> None:
        reports[0] += 1

    for log in loggers:
        log.setLevel(logging.CRITICAL)
    sys.unraisablehook = swallow
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            yield reports
    finally:
        for log, level in zip(loggers, levels):
            log.setLevel(level)
        sys.unraisablehook = hook


def _short_error(e: BaseException) -> str:
    """`Type: message` of `e` and its causes, each cut before the tensorstore spec dump that follows the message."""
    parts = []
    while e is not None and len(parts) < 3:
        msg = str(e).splitlines()[0] if str(e) else ""
        for cut in (" [tensorstore_spec=", " See full TensorStore details"):
            msg = msg.split(cut)[0]
        parts.append(f"{type(e).__name__}: {msg[:300]}")
        e = e.__cause__
    return " <- ".join(parts)


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
