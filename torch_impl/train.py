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
from torch_impl.backends import resolve_backend
from torch_impl.load import load_model
from torch_impl.lora import load_lora_state_dict, lora_state_dict, save_adapter

FRAMEWORK = "torch"
STATE_FILE = "state.safetensors"  # every tensor of the training state
STATE_JSON = "state.json"  # the rest: AdamW hyper-parameters, numpy's RNG state
LEGACY_STATE_FILE = "state.pt"  # a pickle, written by older versions: refused, never loaded
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


class Trainer:
    """A model with split LoRA, its AdamW optimizer and data, stepping one optimizer step at a time.

    `Trainer(cfg)` builds the checkpoint (tiny preset) and data of `cfg`, loads the model, attaches LoRA and loads
    the shared numpy initial adapter. `train_step()`, `evaluate()`, `save_checkpoint()`, `restore(folder)`,
    `save_adapter(folder)`.
    """

    framework = FRAMEWORK

    def __init__(self, cfg: RunConfig, *, out_dir: str | Path | None = None, run: PreparedRun | None = None,
                 device: str = "cpu", cuda_graph: bool = False) -> None:
        """`cuda_graph`: capture each micro-batch's forward + backward in a CUDA graph at the first step and replay
        it after (`torch_impl.cuda_graph`; CUDA only, every batch of the run with the first one's shape and
        packing): removes the host's per-op cost, which dominates short-context steps on a GPU."""
        if cuda_graph and torch.device(device).type != "cuda":
            raise ValueError(f"cuda_graph=True needs a CUDA device; this trainer is on {device!r}: pass "
                             "device='cuda' or leave cuda_graph off")
        self.cfg = cfg
        self.device = torch.device(device)
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise ConfigError(f"device {device!r}: torch sees no CUDA GPU here; train on device 'cpu' (--device cpu)")
        # a backend that cannot run here says why before the data and the checkpoint are built
        resolve_backend(cfg.model.moe_backend, device=self.device, dtype=_DTYPES[cfg.model.dtype])
        self.run = run if run is not None else prepare_run(cfg, out_dir)
        if self.device.type == "cpu" and cfg.train.threads > 0:
            torch.set_num_threads(cfg.train.threads)
        if cfg.model.dtype == "float32":  # fp32 means fp32 (numerics policy): no TF32 on GPUs
            torch.backends.cuda.matmul.allow_tf32 = False
            torch.backends.cudnn.allow_tf32 = False
        self.model = load_model(self.run.checkpoint, lora=cfg.lora, dtype=_DTYPES[cfg.model.dtype],
                                device=self.device, moe_backend=cfg.model.moe_backend)
        load_lora_state_dict(self.model, init_lora_tensors(cfg.lora, self.run.model_cfg, cfg.train.seed))
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        o = cfg.optim
        # fused on CUDA: one kernel over every LoRA tensor instead of a foreach chain (14 ms of a 227 ms Qwen3 step
        # in the 2026-12-05 profile, h200-anchors.md); the same update rule, so CPU and GPU runs agree
        self.optimizer = torch.optim.AdamW(self.params, lr=o.lr, betas=(o.beta1, o.beta2), eps=o.eps,
                                           weight_decay=o.weight_decay, fused=self.device.type == "cuda" or None)
        self.step = 0  # optimizer steps taken
        self.cuda_graph = cuda_graph
        self._graphed = None  # the captured micro-step (torch_impl.cuda_graph.graph_model), built at the first step
        self._accum_grads: list[torch.Tensor] | None = None

    # ---- one step ------------------------------------------------------------------------------------------------
    def _tensors(self, batch: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
        return {k: torch.from_numpy(v).long().to(self.device) for k, v in batch.items()}

    def train_step(self) -> tuple[float, float]:
        """One optimizer step over `grad_accum` micro-batches -> (mean micro-batch loss, pre-clip grad norm)."""
        self.model.train()
        accum = self.cfg.train.grad_accum
        losses = []
        for i in range(accum):
            b = self._tensors(self.run.train_data.batch(self.step * accum + i))
            if self.cuda_graph:
                losses.append(self._graphed_micro_step(b, i, accum))
                continue
            # the loss without [B, S, V] logits (torch_impl.loss): training never needs them
            out = self.model(b["input_ids"], labels=b["labels"], position_ids=b["position_ids"], return_logits=False)
            (out.loss / accum).backward()
            losses.append(float(out.loss.detach()))
        loss = float(np.mean(losses))
        grads = [p.grad for p in self.params if p.grad is not None]
        norm = float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.float()) for g in grads])))
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
        # max |x| per tensor in one multi-tensor kernel: inf or NaN exactly when a tensor holds one (a sum of squares
        # would overflow for huge but finite weights, which the loss check reports more precisely at the next step)
        finite = bool(torch.stack(torch._foreach_norm(self.params, math.inf)).isfinite().all())
        check_params_finite(self.step, finite, self.run.out_dir)
        self.step += 1
        return loss, norm

    def _graphed_micro_step(self, b: dict[str, torch.Tensor], i: int, accum: int) -> float:
        """One micro-batch through the captured forward + backward; its gradients (overwritten by every replay) are
        summed into buffers of our own when there are several micro-batches per step."""
        from torch_impl.cuda_graph import graph_model

        if self._graphed is None:
            self._graphed = graph_model(self.model, b["input_ids"], b["labels"], b["position_ids"],
                                        loss_scale=1.0 / accum)
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
                n = int((b["labels"][:, 1:] != -100).sum())
                t = self._tensors(b)
                loss = self.model(t["input_ids"], labels=t["labels"], position_ids=t["position_ids"]).loss
                total, count = total + float(loss) * n, count + n
            row["eval_loss"] = total / max(count, 1)
        em = exact_match_eval(self.run, self.logits)
        if em is not None:
            row["exact_match"] = em
        return row

    # ---- state -------------------------------------------------------------------------------------------------------
    def save_checkpoint(self) -> Path:
        """Write the training state at this step atomically under `<out_dir>/checkpoints/step_XXXXXXXX`: tensors in
        `state.safetensors`, the rest in `state.json` (no pickle)."""
        def write(tmp: Path) -> None:
            tensors = {f"lora/{k}": torch.from_numpy(v) for k, v in lora_state_dict(self.model).items()}
            opt = self.optimizer.state_dict()
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

        meta = checkpoint_meta(self.cfg, self.step, FRAMEWORK)
        return write_checkpoint_atomic(self.run.out_dir, self.step, meta, write, keep=self.cfg.train.keep_checkpoints)

    def restore(self, folder: str | Path) -> None:
        """Load a checkpoint written by `save_checkpoint` (same framework and an equivalent config). Its files are
        verified and read completely before anything is changed; a damaged folder raises CheckpointDamaged."""
        folder = Path(folder)
        meta = check_resume(folder, self.cfg, FRAMEWORK)
        lora, opt_state, torch_rng, numpy_rng = _read_state(folder)
        try:
            load_lora_state_dict(self.model, lora)
            self.optimizer.load_state_dict(opt_state)
        except ValueError as e:
            raise ConfigError(f"{folder}: its training state does not fit this model's adapters ({e})") from e
        torch.set_rng_state(torch_rng)
        np.random.set_state(numpy_rng)
        self.step = int(meta["step"])

    def save_adapter(self, folder: str | Path) -> Path:
        """The adapter in PEFT format (loads with peft.PeftModel.from_pretrained onto the HF model)."""
        return save_adapter(self.model, folder)


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
