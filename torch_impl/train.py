"""Split-LoRA fine-tuning in PyTorch: `Trainer` (one object a notebook can drive) and `train(cfg)` (the whole run).

Mirrors `jax_impl.train` name for name. Everything that is not the forward/backward or the optimizer call lives in
`shared_math.training` (data, LoRA init, schedule, clipping rule, atomic checkpoints, metrics, plots), so both
frameworks see the same batches, start from the same adapter and apply the same learning rates.

One optimizer step: `grad_accum` micro-batches, each `(loss / grad_accum).backward()`; the pre-clip global gradient
norm; NaN/inf and collapse check (the update is skipped and TrainingDiverged raised); gradients scaled by
`clip_coefficient`; torch.optim.AdamW (decoupled weight decay, eps outside the square root) at `lr_at(step)`; a
check that the updated LoRA tensors are finite (TrainingDiverged before anything is saved).

Training state, in an atomically written checkpoint folder (shared_math.training, which also records every file's
size and SHA-256 in meta.json): `state.safetensors` holds every tensor (LoRA by canonical name, AdamW's moments and
step counts, torch's CPU RNG state as uint8) and `state.json` the rest (AdamW's hyper-parameters, numpy's MT19937
state as ints). No pickle: resuming never runs code from a run folder (an older `state.pt` is refused, not loaded).
The data position is `step · grad_accum` micro-batches, since batches are a pure function of their index.

Several devices (`parallel:` data × fsdp × expert > 1, under `torchrun`; `torch_impl.parallel`): every rank builds the
same run, loads the model on the CPU and keeps its shards (FSDP2; its block of routed experts). Each micro-batch is
split by rows over the ranks, and each rank backpropagates its tokens' summed loss over the micro-batch's *global*
valid-token count (counted from the global batch every rank reads), so the summed gradients are the single-device
ones. The grad norm, clipping, AdamW and the finiteness check act on the shards with the same results on every rank.
Rank 0 alone writes metrics, plots, checkpoints and the adapter, from whole tensors gathered from all ranks, in the
single-device format: a run saved on N devices resumes on M.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from shared_math.adapter import write_peft_adapter
from shared_math.train_config import ConfigError, RunConfig, check_checkpoint_layers
from shared_math.training import (
    CHECKPOINT_DIR,
    CheckpointDamaged,
    PreparedRun,
    TrainResult,
    check_finite,
    check_params_finite,
    check_resume,
    check_same_data,
    checkpoint_meta,
    checkpoint_name,
    clip_coefficient,
    data_record,
    exact_match_eval,
    init_lora_tensors,
    lr_at,
    prepare_run,
    read_model_config,
    run_training,
    write_checkpoint_atomic,
)
from torch_impl import parallel
from torch_impl.backends import as_device, resolve_backend
from torch_impl.load import load_model
from torch_impl.lora import load_lora_state_dict, lora_parameters, lora_state_dict, save_adapter
from torch_impl.routing_stats import RoutingStatsAccumulator, routing_stats_of

FRAMEWORK = "torch"
STATE_FILE = "state.safetensors"  # every tensor of the training state
STATE_JSON = "state.json"  # the rest: AdamW hyper-parameters, numpy's RNG state
LEGACY_STATE_FILE = "state.pt"  # a pickle, written by older versions: refused, never loaded
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


class Trainer:
    """A model with split LoRA, its AdamW optimizer and data, stepping one optimizer step at a time.

    `Trainer(cfg)` builds the checkpoint (tiny preset) and data of `cfg`, loads the model, attaches LoRA and loads
    the shared numpy initial adapter. `train_step()`, `evaluate()`, `save_checkpoint()`, `restore(folder)`,
    `save_adapter(folder)`, `pop_routing_stats()` (the routing analytics since the last call).
    """

    framework = FRAMEWORK

    def __init__(self, cfg: RunConfig, *, out_dir: str | Path | None = None, run: PreparedRun | None = None,
                 device: str = "cpu", cuda_graph: bool = False, compile: bool = False) -> None:
        """`cuda_graph`: capture each micro-batch's forward + backward in a CUDA graph at the first step and replay
        it after (`torch_impl.cuda_graph`; CUDA only, every batch of the run with the first one's shape and
        packing): removes the host's per-op cost, which dominates short-context steps on a GPU. `compile`:
        `torch.compile` each decoder layer (`torch_impl.compile.compile_decoder_layers`), for batches whose shapes
        vary; not under `parallel`. Both together capture the compiled layers in the graph (they compile in the
        graph's eager warm-up): inductor's fused glue without its host cost, the fastest 4K steps measured
        (Qwen3-30B-A3B at 0.58x Unsloth's step on an H100, gpt-oss-20b at 0.55x; benchmarks/REPORT.md, session 13)."""
        self.cfg = cfg
        as_device(device)  # a malformed device string is one line, before any work
        self.mesh = None  # torch_impl.parallel.ParallelMesh when several processes train together
        sharded = cfg.parallel.devices > 1 or parallel.launched_world_size() is not None
        if sharded:  # refused before any work: a mesh that does not fit the processes or the model
            parallel.check_launch(cfg.parallel)
            parallel.check_experts(cfg.parallel, run.model_cfg if run is not None else read_model_config(cfg))
            if cuda_graph:
                raise ValueError(f"cuda_graph=True cannot run under parallel ({cfg.parallel.describe()}): a graph "
                                 "cannot hold the expert all-to-all's host-side split sizes nor FSDP2's hooks; train "
                                 "without --cuda-graph")
        if cuda_graph and torch.device(device).type != "cuda":
            raise ValueError(f"cuda_graph=True needs a CUDA device; this trainer is on {device!r}: pass "
                             "device='cuda' or leave cuda_graph off")
        if sharded:
            device = parallel.init_distributed(device)
        self.device = torch.device(device)
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise ConfigError(f"device {device!r}: torch sees no CUDA GPU here; train on device 'cpu' (--device cpu)")
        # a backend that cannot run here says why before the data and the checkpoint are built
        resolve_backend(cfg.model.moe_backend, device=self.device, dtype=_DTYPES[cfg.model.dtype])
        if sharded:
            self.mesh = parallel.make_mesh(cfg.parallel, self.device)
        if run is None:
            # under parallel, rank 0 builds the files (a tiny preset's checkpoint) before the others read them
            run = self.mesh.rank0_first(lambda: prepare_run(cfg, out_dir)) if self.mesh else prepare_run(cfg, out_dir)
        self.run = run
        check_checkpoint_layers(cfg, run.model_cfg.num_hidden_layers)  # before the weights are read
        if self.device.type == "cpu" and cfg.train.threads > 0:
            torch.set_num_threads(cfg.train.threads)
        if cfg.model.dtype == "float32":  # fp32 means fp32 (numerics policy): no TF32 on GPUs
            torch.backends.cuda.matmul.allow_tf32 = False
            torch.backends.cudnn.allow_tf32 = False
        # sharded: loaded whole on the CPU, then each rank keeps its shards, which FSDP2 moves to its device; the load
        # checks the MoE backend on the CPU, so it gets `native` (runs anywhere) and shard_model sets the configured
        # one, checked above for this rank's device (e.g. triton, which the CPU would refuse)
        self.model = load_model(self.run.checkpoint, lora=cfg.lora, dtype=_DTYPES[cfg.model.dtype],
                                device="cpu" if self.mesh else self.device,
                                moe_backend="native" if self.mesh else cfg.model.moe_backend)
        load_lora_state_dict(self.model, init_lora_tensors(cfg.lora, self.run.model_cfg, cfg.train.seed))
        if cfg.train.gradient_checkpointing != "none":  # per decoder layer; "offload": inputs kept in host memory
            self.model.gradient_checkpointing_enable(offload_to_cpu=cfg.train.gradient_checkpointing == "offload",
                                                     policy=cfg.train.checkpoint_policy,
                                                     layers=cfg.train.checkpoint_layers)
        # per-layer routing analytics (train.routing_stats): summed on the device per micro-batch, read at log steps
        self.routing = RoutingStatsAccumulator(self.model) if cfg.train.routing_stats else None
        self._expert_ids: set[int] = set()  # parameters holding only this rank's routed experts
        if self.mesh:
            parallel.shard_model(self.model, self.mesh, moe_backend=cfg.model.moe_backend)
            self._expert_ids = parallel.expert_sharded(self.model)
        if cfg.train.expert_chunk:  # after sharding: expert parallelism refuses the tiling (the config does too)
            self.model.tile_experts(cfg.train.expert_chunk)
        if compile:  # after sharding, which compile_decoder_layers refuses with a clear error
            from torch_impl.compile import compile_decoder_layers

            compile_decoder_layers(self.model)
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        o = cfg.optim
        # fused on CUDA: one kernel over every LoRA tensor instead of a foreach chain (14 ms of a 227 ms Qwen3 step
        # in the 2026-12-05 profile, h200-anchors.md); the same update rule, so CPU and GPU runs agree
        adamw = dict(lr=o.lr, betas=(o.beta1, o.beta2), eps=o.eps, weight_decay=o.weight_decay,
                     fused=self.device.type == "cuda" or None)
        if o.in_backward:  # each tensor updated in the backward, its gradient freed there (torch_impl.optim)
            from torch_impl.optim import AdamWInBackward

            # under a CUDA graph in the form a graph holds: the updates are captured with the backward, the learning
            # rate read from a device tensor (torch_impl.optim)
            self.optimizer = AdamWInBackward(self.params, **adamw, capturable=cuda_graph)
        else:
            self.optimizer = torch.optim.AdamW(self.params, **adamw)
        self.step = 0  # optimizer steps taken
        self.cuda_graph = cuda_graph
        self._graphed = None  # the captured micro-step (torch_impl.cuda_graph.graph_model), built at the first step
        self._accum_grads: list[torch.Tensor] | None = None

    # ---- one step ------------------------------------------------------------------------------------------------
    def _tensors(self, batch: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
        return {k: torch.from_numpy(v).long().to(self.device) for k, v in batch.items()}

    @property
    def is_main(self) -> bool:
        """Whether this process writes the run's files (always, but on torchrun's ranks other than 0)."""
        return self.mesh is None or self.mesh.is_main

    def train_step(self) -> tuple[float, float]:
        """One optimizer step over `grad_accum` micro-batches -> (mean micro-batch loss, pre-clip grad norm)."""
        if self.cfg.optim.in_backward:
            loss, norm = self._backward_in_backward()
        else:
            loss, norm = self._backward_and_update()
        # max |x| per tensor in one multi-tensor kernel: inf or NaN exactly when a tensor holds one (a sum of squares
        # would overflow for huge but finite weights, which the loss check reports more precisely at the next step)
        if self.mesh:
            finite = parallel.all_finite(self.params, self.mesh)
        else:
            finite = bool(torch.stack(torch._foreach_norm(self.params, math.inf)).isfinite().all())
        check_params_finite(self.step, finite, self.run.out_dir)
        self.step += 1
        return loss, norm

    def _backward_and_update(self) -> tuple[float, float]:
        """Backward, the checks, the clip and AdamW after it -> (loss, pre-clip grad norm)."""
        loss = self._backward()
        grads = [p.grad for p in self.params if p.grad is not None]
        norm = self._grad_norm()
        try:
            check_finite(self.step, loss, norm, self.run.out_dir, vocab_size=self.run.model_cfg.vocab_size)
        except Exception:
            self.optimizer.zero_grad(set_to_none=True)
            raise
        coef = clip_coefficient(norm, self.cfg.optim.max_grad_norm)
        if coef < 1.0:
            for g in grads:
                g.mul_(coef)
        for group in self.optimizer.param_groups:
            group["lr"] = lr_at(self.step, self.cfg)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return loss, norm

    def _backward_in_backward(self) -> tuple[float, float]:
        """With optim.in_backward: the learning rate set before the backward, which updates every tensor as its
        gradient completes (no clip, one micro-batch: the config checks both) -> (loss, grad norm). The checks come
        after the update, so a non-finite loss or norm stops the run with this step already applied to the tensors in
        memory; the checkpoints on disk, and the run folder's last good one, are untouched."""
        self.optimizer.set_lr(lr_at(self.step, self.cfg))
        try:
            loss = self._backward()
        except BaseException:
            self.optimizer.zero_grad(set_to_none=True)
            raise
        norm = float(self.optimizer.grad_norm())
        check_finite(self.step, loss, norm, self.run.out_dir, vocab_size=self.run.model_cfg.vocab_size)
        return loss, norm

    def _backward(self) -> float:
        """Forward + backward of the next step's `grad_accum` micro-batches (gradients summed into `.grad`) -> the
        mean micro-batch loss."""
        self.model.train()
        accum = self.cfg.train.grad_accum
        losses = []
        for i in range(accum):
            batch = self.run.train_data.batch(self.step * accum + i)
            if self.mesh:
                losses.append(self._sharded_micro_step(batch, accum))
                self._add_routing_stats()
                continue
            b = self._tensors(batch)
            if self.cuda_graph:
                losses.append(self._graphed_micro_step(b, i, accum))
                self._add_routing_stats()
                continue
            # the loss without [B, S, V] logits (torch_impl.loss): training never needs them
            out = self.model(b["input_ids"], labels=b["labels"], position_ids=b["position_ids"], return_logits=False)
            (out.loss / accum).backward()
            losses.append(float(out.loss.detach()))
            self._add_routing_stats()
        if self.mesh:
            losses = self.mesh.all_sum(losses)  # each rank held its share of every micro-batch's loss
        return float(np.mean(losses))

    def _grad_norm(self) -> float:
        """The global L2 norm of the gradients in `.grad` (of the whole tensors under parallel: every rank the same)."""
        if self.mesh:
            return parallel.grad_norm(self.params, self._expert_ids, self.mesh)
        grads = [p.grad for p in self.params if p.grad is not None]
        return float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.float()) for g in grads])))

    def _sharded_micro_step(self, batch: dict[str, np.ndarray], accum: int) -> float:
        """This rank's rows of one micro-batch, forward + backward of its share of the batch's mean loss (its
        tokens' summed loss over the global valid-token count) -> that share."""
        rows, _ = parallel.local_rows(batch, self.mesh)
        rows, weight = parallel.loss_rows(rows, parallel.valid_tokens(batch["labels"]))
        b = self._tensors(rows)
        with parallel.no_early_stop():
            out = self.model(b["input_ids"], labels=b["labels"], position_ids=b["position_ids"], return_logits=False)
        (out.loss * (weight / accum)).backward()
        return float(out.loss.detach()) * weight

    def _lora_grads(self) -> dict[str, np.ndarray]:
        """The LoRA gradients as `.grad` holds them now, whole, by canonical name (float32 numpy; zero where a tensor
        has none). Under parallel a collective: every rank calls it and gets them all."""
        named = lora_parameters(self.model)
        if self.mesh:
            return parallel.full_lora(named, self._expert_ids, self.mesh, grads=True)
        return {n: (p.grad if p.grad is not None else torch.zeros_like(p)).detach().float().cpu().numpy()
                for n, p in named.items()}

    def _lora_tensors(self) -> dict[str, np.ndarray]:
        """Every LoRA tensor, whole (gathered from the ranks under parallel: a collective)."""
        if self.mesh:
            return parallel.full_lora(lora_parameters(self.model), self._expert_ids, self.mesh)
        return lora_state_dict(self.model)

    def _add_routing_stats(self) -> None:
        """The micro-batch just run into the routing statistics' window (device work only, no host sync)."""
        if self.routing is not None:
            self.routing.add(routing_stats_of(self.model))

    def pop_routing_stats(self) -> dict[str, Any] | None:
        """The routing statistics of the micro-batches since the last call (the `routing` object of a metrics row:
        shared_math.routing_stats), read from the device; None with train.routing_stats off."""
        return None if self.routing is None else self.routing.pop()

    def _graphed_micro_step(self, b: dict[str, torch.Tensor], i: int, accum: int) -> float:
        """One micro-batch through the captured forward + backward; its gradients (overwritten by every replay) are
        summed into buffers of our own when there are several micro-batches per step."""
        from torch_impl.cuda_graph import graph_model

        if self._graphed is None:
            in_backward = self.optimizer if self.cfg.optim.in_backward else None
            self._graphed = graph_model(self.model, b["input_ids"], b["labels"], b["position_ids"],
                                        loss_scale=1.0 / accum, optimizer_in_backward=in_backward)
        loss = float(self._graphed(b["input_ids"], b["labels"], b["position_ids"]))
        if accum > 1:
            # parameters the graph gives no gradient (unused by this model) stay without one
            params = [p for p in self.params if p.grad is not None]
            grads = [p.grad for p in params]
            if self._accum_grads is None:
                self._accum_grads = [g.clone() for g in grads]
            elif i == 0:
                torch._foreach_copy_(self._accum_grads, grads)
            else:
                torch._foreach_add_(self._accum_grads, grads)
            if i == accum - 1:
                for p, g in zip(params, self._accum_grads):
                    p.grad = g
        return loss

    # ---- evaluation ------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def logits(self, input_ids: np.ndarray, position_ids: np.ndarray) -> np.ndarray:
        """Logits [B, S, V] as float32 numpy (eval mode, no grad)."""
        self.model.eval()
        if self.mesh:  # each rank its rows, then every rank all logits: the decoding loop runs alike on all ranks
            rows, _ = parallel.local_rows({"input_ids": input_ids, "position_ids": position_ids}, self.mesh, pad=True)
            b = self._tensors(rows)
            local = self.model(b["input_ids"], position_ids=b["position_ids"]).logits.float()
            return parallel.all_gather_rows(local, self.mesh)[:input_ids.shape[0]].cpu().numpy()
        b = self._tensors({"input_ids": input_ids, "position_ids": position_ids})
        return self.model(b["input_ids"], position_ids=b["position_ids"]).logits.float().cpu().numpy()

    @torch.no_grad()
    def evaluate(self) -> dict[str, Any]:
        """Held-out loss (token-weighted over the eval rows) and exact-match (greedy decoding), where available."""
        self.model.eval()
        row: dict[str, Any] = {"step": self.step}
        ev = self.run.eval_data
        if ev is not None:
            total, count = 0.0, 0
            for k in range(ev.batches_per_epoch):
                b = ev.batch(k)
                n = parallel.valid_tokens(b["labels"])
                if self.mesh:  # this rank's rows; their summed loss, added up over the ranks below
                    b, _ = parallel.local_rows(b, self.mesh, pad=True)
                t = self._tensors(b)
                loss = self.model(t["input_ids"], labels=t["labels"], position_ids=t["position_ids"]).loss
                n_here = parallel.valid_tokens(b["labels"])
                total, count = total + (float(loss) * n_here if n_here else 0.0), count + n
            if self.mesh:
                total = self.mesh.all_sum([total])[0]
            row["eval_loss"] = total / max(count, 1)
        em = exact_match_eval(self.run, self.logits)
        if em is not None:
            row["exact_match"] = em
        return row

    # ---- state -------------------------------------------------------------------------------------------------------
    def save_checkpoint(self) -> Path:
        """Write the training state at this step atomically under `<out_dir>/checkpoints/step_XXXXXXXX`: tensors in
        `state.safetensors`, the rest in `state.json` (no pickle). Under parallel every rank calls it (whole tensors
        are gathered), rank 0 writes, and all return once the folder is in place."""
        lora = self._lora_tensors()
        opt = self.optimizer.state_dict()
        if self.mesh:
            opt = parallel.full_optimizer_state(opt, self.params, self._expert_ids, self.mesh)

        def write(tmp: Path) -> None:
            tensors = {f"lora/{k}": torch.from_numpy(v) for k, v in lora.items()}
            per_param = {}
            for i, st in opt["state"].items():
                names = sorted(k for k, v in st.items() if torch.is_tensor(v))
                for k in names:
                    tensors[f"optimizer/{i}/{k}"] = st[k].detach().cpu().contiguous()
                per_param[str(i)] = {"tensors": names, "values": {k: v for k, v in st.items() if k not in names}}
            tensors["rng/torch"] = torch.get_rng_state()
            kind, keys, pos, has_gauss, gauss = np.random.get_state()
            save_file(tensors, tmp / STATE_FILE)
            # json writes floats with repr, which reads back to the same double: the hyper-parameters stay exact
            (tmp / STATE_JSON).write_text(json.dumps({
                "optimizer": {"param_groups": opt["param_groups"], "state": per_param},
                "numpy_rng": {"kind": kind, "keys": keys.tolist(), "pos": int(pos), "has_gauss": int(has_gauss),
                              "cached_gaussian": float(gauss)}}))

        meta = checkpoint_meta(self.cfg, self.step, FRAMEWORK, train_data=data_record(self.run))
        folder = self.run.out_dir / CHECKPOINT_DIR / checkpoint_name(self.step)
        if self.is_main:
            folder = write_checkpoint_atomic(self.run.out_dir, self.step, meta, write,
                                             keep=self.cfg.train.keep_checkpoints)
        if self.mesh:
            self.mesh.barrier()
        return folder

    def restore(self, folder: str | Path) -> None:
        """Load a checkpoint written by `save_checkpoint` (same framework and an equivalent config). Its files are
        verified and read completely before anything is changed; a damaged folder raises CheckpointDamaged."""
        folder = Path(folder)
        meta = check_resume(folder, self.cfg, FRAMEWORK)
        check_same_data(folder, meta, self.run)  # before the state is read
        lora, opt_state, torch_rng, numpy_rng = _read_state(folder)
        try:
            if self.mesh:  # whole tensors in the file, whatever the mesh that wrote them: each rank takes its part
                parallel.load_full_lora(lora_parameters(self.model), lora, self._expert_ids, self.mesh)
                opt_state = parallel.shard_optimizer_state(opt_state, self.params, self._expert_ids, self.mesh)
            else:
                load_lora_state_dict(self.model, lora)
            self.optimizer.load_state_dict(opt_state)
        except ValueError as e:
            raise ConfigError(f"{folder}: its training state does not fit this model's adapters ({e})") from e
        torch.set_rng_state(torch_rng)
        np.random.set_state(numpy_rng)
        self.step = int(meta["step"])

    def save_adapter(self, folder: str | Path) -> Path:
        """The adapter in PEFT format (loads with peft.PeftModel.from_pretrained onto the HF model). Under parallel:
        gathered by every rank, written by rank 0."""
        if not self.mesh:
            return save_adapter(self.model, folder)
        tensors = self._lora_tensors()
        if self.is_main:
            write_peft_adapter(folder, self.model.lora_config, tensors, self.model.config)
        self.mesh.barrier()
        return Path(folder)


def _read_state(folder: Path) -> tuple[dict[str, np.ndarray], dict[str, Any], torch.Tensor, tuple]:
    """(LoRA tensors, optimizer state_dict, torch RNG state, numpy RNG state) from `state.safetensors` and
    `state.json`; CheckpointDamaged, naming the file, if any of it is missing or unreadable."""
    path, json_path = folder / STATE_FILE, folder / STATE_JSON
    if not path.is_file():
        legacy = folder / LEGACY_STATE_FILE
        why = (f"; {legacy} is a pickle written by an older splitmoe and is never loaded, since unpickling a file "
               "can run arbitrary code: start a fresh run" if legacy.exists() else "")
        raise CheckpointDamaged(f"{path} is missing{why}")
    try:
        tensors = load_file(path)  # safetensors: raw tensor data and a JSON header, nothing executable
    except (OSError, SafetensorError) as e:
        raise CheckpointDamaged(f"{path} cannot be read ({e})") from e
    try:
        info = json.loads(json_path.read_text())
        per_param = info["optimizer"]["state"]
        # JSON has no tuples: give AdamW its betas back as the tuple it was built with
        groups = [{**g, **({"betas": tuple(g["betas"])} if "betas" in g else {})}
                  for g in info["optimizer"]["param_groups"]]
        state = {int(i): {**p["values"], **{k: tensors[f"optimizer/{i}/{k}"] for k in p["tensors"]}}
                 for i, p in per_param.items()}
        r = info["numpy_rng"]
        numpy_rng = (r["kind"], np.asarray(r["keys"], dtype=np.uint32), int(r["pos"]), int(r["has_gauss"]),
                     float(r["cached_gaussian"]))
        torch_rng = tensors["rng/torch"]
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, ValueError, AttributeError) as e:
        raise CheckpointDamaged(f"{folder}: {STATE_JSON} / {STATE_FILE} are incomplete or corrupt "
                                f"({type(e).__name__}: {e})") from e
    lora = {k[len("lora/"):]: v.numpy() for k, v in tensors.items() if k.startswith("lora/")}
    return lora, {"state": state, "param_groups": groups}, torch_rng, numpy_rng


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
