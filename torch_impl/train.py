"""Split-LoRA fine-tuning in PyTorch: `Trainer` (one object a notebook can drive) and `train(cfg)` (the whole run).

Mirrors `jax_impl.train` name for name. Everything that is not the forward/backward or the optimizer call lives in
`shared_math.training` (data, LoRA init, schedule, clipping rule, atomic checkpoints, metrics, plots), so both
frameworks see the same batches, start from the same adapter and apply the same learning rates.

One optimizer step: `grad_accum` micro-batches, each `(loss / grad_accum).backward()`; the pre-clip global gradient
norm; NaN/inf check (the update is skipped and TrainingDiverged raised); gradients scaled by
`clip_coefficient`; torch.optim.AdamW (decoupled weight decay, eps outside the square root) at `lr_at(step)`.
Training state (LoRA tensors, AdamW state, step, RNG) is a `state.pt` in an atomically written checkpoint folder;
the data position is `step · grad_accum` micro-batches, since batches are a pure function of their index.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from shared_math.train_config import RunConfig
from shared_math.training import (
    PreparedRun,
    TrainResult,
    check_finite,
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
from torch_impl.load import load_model
from torch_impl.lora import load_lora_state_dict, lora_state_dict, save_adapter

FRAMEWORK = "torch"
STATE_FILE = "state.pt"
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
        self.run = run if run is not None else prepare_run(cfg, out_dir)
        self.device = torch.device(device)
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
            check_finite(self.step, loss, norm, self.run.out_dir)
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
        """Write the training state at this step atomically under `<out_dir>/checkpoints/step_XXXXXXXX`."""
        def write(tmp: Path) -> None:
            torch.save({"lora": {k: torch.from_numpy(v) for k, v in lora_state_dict(self.model).items()},
                        "optimizer": self.optimizer.state_dict(), "step": self.step,
                        "torch_rng": torch.get_rng_state(), "numpy_rng": np.random.get_state()}, tmp / STATE_FILE)

        meta = checkpoint_meta(self.cfg, self.step, FRAMEWORK)
        return write_checkpoint_atomic(self.run.out_dir, self.step, meta, write, keep=self.cfg.train.keep_checkpoints)

    def restore(self, folder: str | Path) -> None:
        """Load a checkpoint written by `save_checkpoint` (same framework and an equivalent config)."""
        folder = Path(folder)
        meta = check_resume(folder, self.cfg, FRAMEWORK)
        state = torch.load(folder / STATE_FILE, weights_only=False)  # our own file: it holds numpy RNG state
        load_lora_state_dict(self.model, {k: v.numpy() for k, v in state["lora"].items()})
        self.optimizer.load_state_dict(state["optimizer"])
        torch.set_rng_state(state["torch_rng"])
        np.random.set_state(state["numpy_rng"])
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
