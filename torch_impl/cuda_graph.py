"""CUDA-graph capture of a training forward + backward, replayed per batch (torch only: jax_impl's jitted step is
one compiled executable already).

Why: at short context a LoRA training step is host-bound. On the H200, GLM-4.7-Flash cut to 12 layers at 1024
tokens ran 243 ms per step while its kernels took 73 ms: the host issued ~6,400 launches and ~1,200 dtype casts per
step (benchmarks/REPORT.md, "where a short step's time goes"). Captured once, the same work replays as one graph
launch.

- `GraphedLoss(loss_fn, inputs, params)`: captures `(loss_fn(**inputs) · loss_scale).backward()` on static copies
  of `inputs`; `step(**new_inputs)` copies the new tensors in, replays, and returns the loss. After a step every
  parameter in `params` has `.grad` = loss_scale · d loss / d p of that batch: overwritten, not accumulated (the
  graph owns those buffers; `optimizer.zero_grad(set_to_none=True)` is fine, the next step re-attaches them).
- `GraphedLoss(..., optimizer_in_backward=opt)` with a capturable `torch_impl.optim.AdamWInBackward`: the AdamW
  updates the backward makes are captured too (a replay is a whole training step, the learning rate read from the
  optimizer's device tensor), its warm-up runs update nothing, and no parameter keeps a gradient between steps: the
  gradients live in the graph's pool only while their tensor is updated, instead of in static buffers for the whole
  step (4.97 GiB on 24 Qwen3-30B-A3B layers).
- `graph_model(model, input_ids, labels, position_ids=None, attention_mask=None)`: the same for a torch_impl
  causal-LM model, with the forward's host syncs removed (`torch_impl.models.layers.static_batch`) and, per step,
  one host sync that checks what the graph cannot: token ids in range and the capture-time packing (documents per
  row). A padded batch (attention_mask) is captured on the explicit-mask path, which serves any padding.

What a captured step needs: a CUDA device; MoE layers on a Triton backend (`CAPTURABLE_BACKENDS`, checked
first by `graph_model`, which moves layers left on "auto" there: `choose_capturable_backends`); every step with
the capture-time shapes and dtypes; parameters updated in place (optimizer.step), never replaced; nothing in the
forward that syncs with the host or draws random numbers.
The first calls run eagerly on a side stream (`warmup`), so lazy initialisation, Triton compilation and any kernel
autotuning happen before the capture, never inside it.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext

import torch

from torch_impl.models.layers import (
    document_ids,
    is_packed,
    prepare_attention_mask,
    prepare_position_ids,
    static_batch,
)
from torch_impl.optim import AdamWInBackward

# MoE backends whose forward and backward a CUDA graph can hold. Not `grouped_mm`: torch._grouped_mm copies from
# pageable host memory inside (torch 2.11 on the H200: "Cannot copy between CPU and CUDA tensors during CUDA graph
# capture"); not `native`: it reads the group sizes on the host. `triton_hopper` since its replays matched the eager
# steps of Qwen3 and gpt-oss in bf16 on an H100 (test_graphed_hopper_step_matches_eager_bf16_cuda, 2026-12-06).
CAPTURABLE_BACKENDS = ("triton", "triton_hopper")


class GraphedLoss:
    """A loss function's forward and backward captured in one CUDA graph (module docstring)."""

    def __init__(self, loss_fn: Callable[..., torch.Tensor], inputs: dict[str, torch.Tensor],
                 params: list[torch.nn.Parameter], *, loss_scale: float = 1.0, warmup: int = 2,
                 context: Callable[[], AbstractContextManager] = nullcontext,
                 optimizer_in_backward: AdamWInBackward | None = None) -> None:
        opt = optimizer_in_backward
        if opt is not None and not opt.capturable:
            raise ValueError("a CUDA graph holds the in-backward AdamW only in its capturable form: build it with "
                             "AdamWInBackward(..., capturable=True)")
        bad = {k: str(v.device) for k, v in inputs.items() if v.device.type != "cuda"}
        if bad:
            raise RuntimeError(f"CUDA graphs need CUDA tensors; these inputs are not on a CUDA device: {bad}")
        self.params = list(params)
        self.static = {k: v.detach().clone() for k, v in inputs.items()}
        self._specs = {k: (v.shape, v.dtype) for k, v in self.static.items()}

        def run() -> torch.Tensor:
            loss = loss_fn(**self.static)
            (loss * loss_scale).backward()
            return loss.detach()

        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        paused = opt.paused() if opt is not None else nullcontext()
        with torch.cuda.stream(side), context(), paused:
            for _ in range(warmup):
                self._drop_grads()
                run()
        torch.cuda.current_stream().wait_stream(side)
        self._drop_grads()
        if opt is not None:
            opt.init_state()  # allocated and zeroed now: created inside the capture, every replay would re-zero it
        self.graph = torch.cuda.CUDAGraph()
        try:
            with context(), torch.cuda.graph(self.graph):
                self._loss = run()
        except RuntimeError as e:
            raise RuntimeError(capture_failure_message(e)) from e
        self._grads = [p.grad for p in self.params]

    def _drop_grads(self) -> None:
        for p in self.params:
            p.grad = None

    def step(self, **inputs: torch.Tensor) -> torch.Tensor:
        """Copy `inputs` (the capture-time names, shapes and dtypes) into the graph's buffers and replay: the loss of
        this batch (a tensor the next step overwrites), and `.grad` of every parameter set."""
        if inputs.keys() != self.static.keys():
            raise ValueError(f"a captured step takes exactly the inputs {sorted(self.static)}; got {sorted(inputs)}")
        for k, v in inputs.items():
            shape, dtype = self._specs[k]
            if v.shape != shape or v.dtype != dtype:
                raise ValueError(f"input {k!r} is {tuple(v.shape)} {v.dtype}; the graph was captured for "
                                 f"{tuple(shape)} {dtype}: capture another GraphedLoss for this shape")
            self.static[k].copy_(v, non_blocking=True)
        self.graph.replay()
        for p, g in zip(self.params, self._grads):
            if p.grad is not g:
                p.grad = g
        return self._loss


def graph_model(model: torch.nn.Module, input_ids: torch.Tensor, labels: torch.Tensor,
                position_ids: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None, *,
                loss_scale: float = 1.0, warmup: int = 2, check: bool = True,
                optimizer_in_backward: AdamWInBackward | None = None) -> Callable[..., torch.Tensor]:
    """Capture a torch_impl causal-LM model's training forward + backward (`model(input_ids, labels=labels,
    position_ids=position_ids, attention_mask=attention_mask).loss`, times loss_scale, backpropagated into every
    trainable parameter) for batches shaped like the example. Returns
    `step(input_ids, labels, position_ids=None, attention_mask=None) -> loss`; a step gives position_ids and
    attention_mask exactly when the example did (the mask's values may change from step to step).

    `check`: each step first reads, in one host sync, the new batch's token-id range and whether it holds packed
    documents, and raises if the ids are out of range or the packing differs from the example's (the attention path
    was fixed at capture). The model should be in training mode (`model.train()`), as it is captured.
    `optimizer_in_backward`: a capturable `AdamWInBackward` over the trainable parameters, whose updates the graph
    then holds (`GraphedLoss`).
    """
    choose_capturable_backends(model)
    check_capturable(model)
    vocab = model.config.vocab_size
    prepare_position_ids(input_ids, position_ids, vocab)  # the example's ids and positions, checked eagerly once
    if attention_mask is not None:
        with static_batch(packed=False):  # the shape check alone: an all-ones example mask is kept, not dropped
            prepare_attention_mask(input_ids, attention_mask)
    packed = position_ids is not None and is_packed(position_ids)
    params = [p for p in model.parameters() if p.requires_grad]
    inputs = {"input_ids": input_ids, "labels": labels}
    if position_ids is not None:
        inputs["position_ids"] = position_ids
    if attention_mask is not None:
        inputs["attention_mask"] = attention_mask

    def loss_fn(input_ids, labels, position_ids=None, attention_mask=None):
        return model(input_ids, labels=labels, position_ids=position_ids, return_logits=False,
                     attention_mask=attention_mask).loss

    graphed = GraphedLoss(loss_fn, inputs, params, loss_scale=loss_scale, warmup=warmup,
                          context=lambda: static_batch(packed), optimizer_in_backward=optimizer_in_backward)

    def step(input_ids: torch.Tensor, labels: torch.Tensor, position_ids: torch.Tensor | None = None,
             attention_mask: torch.Tensor | None = None):
        if (position_ids is None) != ("position_ids" not in graphed.static):
            raise ValueError("give position_ids in every step exactly when the example had them")
        if (attention_mask is None) != ("attention_mask" not in graphed.static):
            raise ValueError("give attention_mask in every step exactly when the example had it")
        if check:
            lo, hi, pk = _batch_facts(input_ids, position_ids)
            if lo < 0 or hi >= vocab:
                raise ValueError(f"token ids must lie in [0, vocab_size={vocab}), got range [{lo}, {hi}]")
            if pk != packed:
                raise ValueError(f"this batch {'holds' if pk else 'does not hold'} packed documents and the graph "
                                 f"was captured for a batch that {'did' if packed else 'did not'}: capture "
                                 "another graph for it (or pack every batch alike)")
        kw = {} if position_ids is None else {"position_ids": position_ids}
        if attention_mask is not None:
            kw["attention_mask"] = attention_mask
        return graphed.step(input_ids=input_ids, labels=labels, **kw)

    step.graphed = graphed  # the GraphedLoss (its graph, buffers and parameters), for inspection
    return step


def capture_failure_message(e: BaseException) -> str:
    """What a failed capture most likely means, for the error a user sees. The capture's own error is often the
    generic "operation failed due to a previous error during capture"; the first error, chained as its context,
    names the cause."""
    errors = f"{e} {e.__context__ or ''}"
    if "legacy stream" in errors or "cudaErrorStreamCaptureImplicit" in errors:
        # measured on an H100 (2026-12-06): an eager step whose loss was still referenced kept the parameters'
        # gradient-accumulation nodes on the default stream, and the captured backward had to wait on that stream
        return ("capturing the forward + backward in a CUDA graph failed: the capture had to wait on the default "
                "stream, most likely because the autograd graph of an earlier eager step is still alive (a loss or "
                "output tensor kept from it holds the parameters' gradient-accumulation nodes): delete those "
                f"references (`del loss`) before capturing, or capture before any eager step. Original error: {e}")
    return ("capturing the forward + backward in a CUDA graph failed: something in it syncs with the host (.item(), "
            ".tolist(), bool(tensor), bincount, nonzero, boolean indexing) or copies from pageable host memory; run "
            f"it eagerly instead. Original error: {e}")


def choose_capturable_backends(model: torch.nn.Module) -> int:
    """Move every MoE layer left on "auto" whose automatic choice a CUDA graph cannot hold to the first of
    `CAPTURABLE_BACKENDS` that runs on its device and dtype; returns how many layers moved. On a GPU in fp32 "auto"
    picks `grouped_mm` or `native` (on a Hopper GPU in bf16 `triton_hopper`, capturable), so without this
    `--cuda-graph` with the default backend would be refused there. "auto" promises the fastest
    backend that does the job, and under a graph only a capturable one does. A backend named explicitly (the model's
    `moe_backend`, or the SPLITMOE_MOE_BACKEND variable) stays as named, and `check_capturable` refuses it."""
    from torch_impl.backends import ENV_VAR, resolve_backend, why_unavailable
    from torch_impl.moe import Experts

    if os.environ.get(ENV_VAR, "").strip() not in ("", "auto"):
        return 0
    moved = 0
    for m in model.modules():
        if not isinstance(m, Experts) or m.backend not in (None, "", "auto"):
            continue
        device, dtype = m.gate_up_proj.device, m.gate_up_proj.dtype
        if resolve_backend(m.backend, device=device, dtype=dtype) in CAPTURABLE_BACKENDS:
            continue
        for name in CAPTURABLE_BACKENDS:
            if why_unavailable(name, device, dtype) is None:
                m.backend, moved = name, moved + 1
                break
    return moved


def check_capturable(model: torch.nn.Module) -> None:
    """Raise ValueError, before any work, when a MoE layer of `model` runs a backend a CUDA graph cannot hold, its
    checkpointing offloads to host memory (a failed capture inside activation checkpointing can leave autograd's
    saved-tensor hooks behind in the process), or it is sharded over several devices (`torch_impl.parallel`)."""
    from torch_impl.backends import resolve_backend
    from torch_impl.moe import Experts
    from torch_impl.parallel import refuse_sharded

    refuse_sharded(model, "a CUDA graph (torch_impl.cuda_graph)")
    if getattr(model, "checkpoint_offload", False):
        # the offloaded checkpoint allocates pinned host buffers and runs a reentrant backward: neither is capturable
        raise ValueError("activation checkpointing with offload_to_cpu=True cannot run inside a CUDA graph; call "
                         "gradient_checkpointing_enable() without offload, or train without cuda_graph")
    found = {resolve_backend(m.backend, device=m.gate_up_proj.device, dtype=m.gate_up_proj.dtype)
             for m in model.modules() if isinstance(m, Experts)}
    bad = sorted(found - set(CAPTURABLE_BACKENDS))
    if bad:
        raise ValueError(f"MoE backend(s) {bad} cannot run inside a CUDA graph (see CAPTURABLE_BACKENDS); load the "
                         f"model with moe_backend='triton' or train without cuda_graph")


def _batch_facts(input_ids: torch.Tensor, position_ids: torch.Tensor | None) -> tuple[int, int, bool]:
    """(min id, max id, packed) read back in one sync."""
    packed = (torch.zeros((), dtype=torch.long, device=input_ids.device) if position_ids is None
              else (document_ids(position_ids)[:, -1] != 0).any().long())
    lo, hi, pk = torch.stack([input_ids.min().long(), input_ids.max().long(), packed]).tolist()
    return lo, hi, bool(pk)
