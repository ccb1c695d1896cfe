"""AdamW applied inside the backward pass: each trainable tensor is updated the moment its gradient is complete, and
the gradient is freed at once, so a step never holds the gradients of all LoRA tensors together.

Why: at r=64 on attention and both expert tensors, Qwen3-30B-A3B has 2.5 G fp32 LoRA parameters; their gradients
are 10 GB that the usual `loss.backward(); opt.step()` keeps alive at the end of backward, on top of the activations.
Here the peak holds one tensor's gradient (plus those autograd has not finished). The update is torch's own AdamW
(one optimizer per tensor, the same `fused` / foreach choice), so it equals `torch.optim.AdamW` over all tensors
element for element (tests/torch/test_optim_in_backward.py checks bit equality).

What it cannot do: clip by the global gradient norm (the norm is known only after every tensor was updated) and
accumulate micro-batches (each backward would update). `check_in_backward` refuses both. The pre-update global norm
is still measured: each hook adds its tensor's squared norm into a device scalar (no host sync), read with
`grad_norm()` after backward for logging and the divergence check.

Mechanism: `Tensor.register_post_accumulate_grad_hook` (torch >= 2.2), which fires when autograd has written a leaf's
`.grad` for this backward, also inside reentrant activation checkpointing.

Inside a CUDA graph (`capturable=True`, what `torch_impl.cuda_graph.GraphedLoss(optimizer_in_backward=...)` uses):
the hooks run once, at capture, and the graph replays their kernels, so everything a step changes must live on the
device: torch's AdamW with `capturable=True` (its step count a device tensor), one shared 0-d learning-rate tensor
that `set_lr` fills in place (a float would be frozen into the graph at its capture value), and the norm accumulated
into a persistent buffer. The state must exist before the capture (`init_state`: zeros, as AdamW's own lazy
initialisation, which inside a capture would be re-zeroed by every replay), and the capture's warm-up runs must not
update (`paused`). Why it matters: a graphed step otherwise holds every LoRA gradient in static buffers for the whole
step (4.97 GiB on a 24-layer Qwen3-30B-A3B), which at 16K tokens put the graphed step over Unsloth's peak.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any

import torch

# the config check (optim.in_backward with a clip or accumulation), framework-free so the run config applies it
from shared_math.train_config import check_in_backward

__all__ = ["AdamWInBackward", "check_in_backward"]


class AdamWInBackward:
    """`torch.optim.AdamW` over `params`, stepped per tensor from a post-accumulate-grad hook.

    Call `set_lr(lr)` before the backward of a step; after it, `grad_norm()` is the pre-update global L2 norm of the
    gradients (a 0-d fp32 device tensor; resets the accumulator). `state_dict()` / `load_state_dict()` use the layout
    of one `torch.optim.AdamW(params)`, so checkpoints move between the two. `remove()` detaches the hooks.
    `capturable=True`: the form a CUDA graph can hold (module docstring; needs `fused=True` on a CPU).
    """

    def __init__(self, params: Iterable[torch.nn.Parameter], *, lr: float, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0.0, fused: bool | None = None,
                 capturable: bool = False) -> None:
        self.params = list(params)
        if len({id(p) for p in self.params}) != len(self.params):
            raise ValueError("a parameter is listed twice; each tensor gets one optimizer")
        self.defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, fused=fused)
        self.capturable = capturable
        device = self.params[0].device if self.params else None
        # the learning rate every per-tensor AdamW reads: a float, or under capture one device tensor set in place, in
        # the precision torch's fused AdamW applies a float one: double on the CPU, fp32 in the CUDA kernel's math
        lr_dtype = torch.float64 if device is None or device.type == "cpu" else torch.float32
        self._lr = torch.tensor(float(lr), dtype=lr_dtype, device=device) if capturable else None
        per_tensor = dict(self.defaults, capturable=True, lr=self._lr) if capturable else self.defaults
        self._opts = [torch.optim.AdamW([p], **per_tensor) for p in self.params]
        self._index = {id(p): i for i, p in enumerate(self.params)}
        # sum of squared gradient norms since the last grad_norm(), in place on the device (a capture records the adds)
        self._sq = torch.zeros((), dtype=torch.float32, device=device)
        self._paused = False
        self._handles = [p.register_post_accumulate_grad_hook(self._step_one) for p in self.params]

    def _step_one(self, p: torch.Tensor) -> None:
        if not self._paused:
            # the norm before the update, accumulated on the device: no .item() in backward
            self._sq.add_(torch.linalg.vector_norm(p.grad, dtype=torch.float32).square())
            self._opts[self._index[id(p)]].step()
        p.grad = None  # the point of it all: the gradient dies here

    def set_lr(self, lr: float) -> None:
        if self._lr is not None:
            self._lr.fill_(lr)
            return
        for opt in self._opts:
            for g in opt.param_groups:
                g["lr"] = lr

    @contextmanager
    def paused(self) -> Iterator[None]:
        """Backwards run inside free each gradient without updating anything (a CUDA-graph capture's warm-up runs)."""
        previous, self._paused = self._paused, True
        try:
            yield
        finally:
            self._paused = previous

    def init_state(self) -> None:
        """Create AdamW's state (step 0, zero moments) for every tensor that has none, as its first step would, so
        that a CUDA-graph capture finds it allocated: created inside the capture it would be zeroed at every replay.
        Equal to the lazy initialisation: the first update afterwards is the first step's, bit for bit."""
        # where and in which dtype torch's AdamW keeps its step count (`_init_group`): on the parameter's device when
        # fused or capturable, else on the CPU; float32 when fused, else the default float dtype's width
        fused = bool(self.defaults["fused"])
        on_device = self.capturable or fused
        step_dtype = torch.float64 if torch.get_default_dtype() == torch.float64 and not fused else torch.float32
        for p, opt in zip(self.params, self._opts):
            if opt.state[p]:
                continue
            opt.state[p] = {"step": torch.zeros((), dtype=step_dtype, device=p.device if on_device else "cpu"),
                            "exp_avg": torch.zeros_like(p, memory_format=torch.preserve_format),
                            "exp_avg_sq": torch.zeros_like(p, memory_format=torch.preserve_format)}

    def grad_norm(self) -> torch.Tensor:
        """Global L2 norm of the gradients seen since the last call (0 when there were none)."""
        norm = self._sq.sqrt()
        self._sq.zero_()
        return norm

    def step(self) -> None:
        """Nothing left to do: backward updated every tensor that got a gradient. There for drop-in use in a loop
        written for `torch.optim.AdamW` (`backward(); opt.step(); opt.zero_grad()`)."""

    def zero_grad(self, set_to_none: bool = True) -> None:
        """For drop-in use: gradients never outlive their hook, but a failed step may leave the accumulator."""
        self._sq.zero_()
        for p in self.params:
            p.grad = None

    def state_dict(self) -> dict[str, Any]:
        """The state of one AdamW over all `params` (param ids 0..n-1, one param group)."""
        state = {}
        for i, opt in enumerate(self._opts):
            s = opt.state_dict()["state"]
            if 0 in s:
                state[i] = s[0]
        group = dict(self._opts[0].state_dict()["param_groups"][0]) if self._opts else dict(self.defaults)
        group["params"] = list(range(len(self.params)))
        if self._lr is not None:  # torch.optim.AdamW's layout: the learning rate as a number, capturable as built
            group.update(lr=float(self._lr), capturable=False)
        return {"state": state, "param_groups": [group]}

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        """Load a state written by `state_dict()` or by `torch.optim.AdamW(params).state_dict()`."""
        groups = sd["param_groups"]
        if len(groups) != 1 or len(groups[0]["params"]) != len(self.params):
            raise ValueError(f"optimizer state holds {sum(len(g['params']) for g in groups)} tensors in "
                             f"{len(groups)} groups; this optimizer has {len(self.params)} tensors in one group")
        ids = groups[0]["params"]
        for pid, opt in zip(ids, self._opts):
            group = {k: v for k, v in groups[0].items() if k != "params"} | {"params": [0]}
            if self._lr is not None:
                group["capturable"] = True
            opt.load_state_dict({"state": {0: sd["state"][pid]} if pid in sd["state"] else {},
                                 "param_groups": [group]})
            if self._lr is not None:  # load_state_dict set a copy: share the one device learning rate again
                opt.param_groups[0]["lr"] = self._lr
        if self._lr is not None:
            self._lr.fill_(float(groups[0]["lr"]))

    @property
    def param_groups(self) -> list[dict[str, Any]]:
        """The per-tensor groups (read-only view; use set_lr to change the learning rate)."""
        return [g for opt in self._opts for g in opt.param_groups]

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []
