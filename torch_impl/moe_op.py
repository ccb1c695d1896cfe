"""The routed experts with split LoRA as one torch custom op, `splitmoe::split_lora_experts`, so `torch.compile`
traces a whole decoder layer without graph breaks.

Shapes: T tokens, H hidden, I expert intermediate, E experts, K experts per token, R LoRA rank, M = T·K routed rows.

Why an op: the expert path is data-dependent by nature. Group sizes are data (the native loop reads them on the host,
grouped_mm's un-permute loops over row chunks, the Triton kernels pick configs by them), and the backend is chosen
by probing the device. Dynamo cannot trace host reads of tensor values, so it breaks the graph there. As an opaque op
with a fake (meta) implementation, which gives y's shape and dtype from the inputs' alone, the experts become one
node of the layer's graph and everything around them (attention, norms, router, residuals) compiles as one region.

Two ops, both dispatching to the eager path (`torch_impl.moe.split_lora_experts`, and through it the very backend
code eager mode runs; no math is duplicated here):
- `splitmoe::split_lora_experts(x, expert_ids, expert_weights, w_gate_up, w_down, a1?, b1?, a2?, b2?, b_gate_up?,
  b_down?, scale, activation, swiglu_limit, swiglu_alpha, backend, check_ids) -> y [T, H]`: the eager forward,
  without grad (nothing is saved but the inputs).
- `splitmoe::split_lora_experts_backward(dy, <the same inputs>, needs_grad) -> [grads]`: recomputes the eager
  forward with autograd on and returns `torch.autograd.grad` of it for the inputs flagged in `needs_grad` (x,
  expert_weights, the base weights, both LoRA factors, the biases, in that order; frozen base weights are not
  flagged, so they get none). The gradients are therefore those of eager mode, bit for bit on the same backend.
  The price is one more expert forward in the backward (expert-level activation checkpointing: the op saves only its
  inputs, none of the backends' gu / z1 / z2). A backend that exposes its forward and backward pieces could save
  those instead and skip the recompute; measure it on the GPU first.
`register_autograd` ties them together; double backward is not supported (the backward op has no autograd).

When the op is used (`custom_op_active`): always under `torch.compile` (Dynamo's tracing), never in eager mode by
default, where it would only add that recompute, so eager numbers and costs stay exactly as they were. Override with
`use_custom_op(True / False)` or the environment variable `SPLITMOE_MOE_CUSTOM_OP` (1: always, 0: never, not even
under compile, which brings the graph breaks back; auto or unset: the default); `use_custom_op` beats the variable.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager

import torch

ENV_VAR = "SPLITMOE_MOE_CUSTOM_OP"
_MODE: bool | None = None  # set by use_custom_op; None: the environment variable, then auto, decides

# The op's differentiable tensor inputs, in the order of its schema and of the backward op's `needs_grad`.
GRAD_INPUTS = ("x", "expert_weights", "w_gate_up", "w_down", "lora_gate_up_a", "lora_gate_up_b", "lora_down_a",
               "lora_down_b", "bias_gate_up", "bias_down")
# their positions among the forward op's arguments (expert_ids, position 1, has no gradient)
_GRAD_POSITIONS = (0, 2, 3, 4, 5, 6, 7, 8, 9, 10)
_NUM_ARGS = 17

__all__ = ["ENV_VAR", "GRAD_INPUTS", "custom_op_active", "split_lora_experts_op", "use_custom_op"]


def use_custom_op(enabled: bool | None = True) -> bool | None:
    """Route `Experts.forward` through the custom op always (True), never (False), or only under torch.compile
    (None, the default). Returns the previous setting, so a caller can restore it."""
    global _MODE
    previous, _MODE = _MODE, enabled
    return previous


def custom_op_active() -> bool:
    """Whether `Experts.forward` calls the custom op now (see the module docstring for the rule)."""
    if _MODE is not None:
        return _MODE
    env = os.environ.get(ENV_VAR, "auto").strip().lower()
    if env in ("1", "true", "yes", "on"):
        return True
    if env in ("0", "false", "no", "off"):
        return False
    if env not in ("", "auto"):
        raise ValueError(f"{ENV_VAR}={env!r}: expected 1, 0 or auto")
    return torch.compiler.is_compiling()


@contextmanager
def _autograd_inside_op() -> Iterator[None]:
    """Let autograd record inside an op's kernel: the dispatcher runs a kernel below the op's autograd layer with the
    autograd keys excluded, so without this the recomputed forward would build no graph to differentiate. Private
    torch API (`_SetExcludeDispatchKeyGuard`); `test_custom_op.py` checks the gradients, so a change shows there."""
    keys = torch._C.DispatchKey
    with (torch._C._SetExcludeDispatchKeyGuard(keys.AutogradFunctionality, False),
          torch._C._SetExcludeDispatchKeyGuard(keys.ADInplaceOrView, False),
          torch.enable_grad()):
        yield


def _pair(a: torch.Tensor | None, b: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor] | None:
    return None if a is None else (a, b)


def _eager(x, expert_ids, expert_weights, w_gate_up, w_down, a1, b1, a2, b2, b_gu, b_d, scale, activation,
           swiglu_limit, swiglu_alpha, backend, check_ids) -> torch.Tensor:
    """The eager path on the op's flat arguments."""
    from torch_impl.moe import split_lora_experts  # deferred: torch_impl.moe imports this module

    return split_lora_experts(x, expert_ids, expert_weights, w_gate_up, w_down, _pair(a1, b1), _pair(a2, b2),
                              scale=scale, biases=_pair(b_gu, b_d), activation=activation,
                              swiglu_limit=swiglu_limit, swiglu_alpha=swiglu_alpha, backend=backend,
                              check_ids=check_ids)


@torch.library.custom_op("splitmoe::split_lora_experts", mutates_args=())
def _split_lora_experts(x: torch.Tensor, expert_ids: torch.Tensor, expert_weights: torch.Tensor,
                        w_gate_up: torch.Tensor, w_down: torch.Tensor, lora_gate_up_a: torch.Tensor | None,
                        lora_gate_up_b: torch.Tensor | None, lora_down_a: torch.Tensor | None,
                        lora_down_b: torch.Tensor | None, bias_gate_up: torch.Tensor | None,
                        bias_down: torch.Tensor | None, scale: float, activation: str, swiglu_limit: float,
                        swiglu_alpha: float, backend: str, check_ids: bool) -> torch.Tensor:
    with torch.no_grad():  # the backward op recomputes: no graph, nothing saved by the backend
        y_TH = _eager(x, expert_ids, expert_weights, w_gate_up, w_down, lora_gate_up_a, lora_gate_up_b,
                      lora_down_a, lora_down_b, bias_gate_up, bias_down, scale, activation, swiglu_limit,
                      swiglu_alpha, backend, check_ids)
    return y_TH.contiguous()  # grouped_mm returns a column slice for padded H; the fake promises a dense [T, H]


@_split_lora_experts.register_fake
def _split_lora_experts_fake(x, expert_ids, expert_weights, w_gate_up, w_down, lora_gate_up_a, lora_gate_up_b,
                             lora_down_a, lora_down_b, bias_gate_up, bias_down, scale, activation, swiglu_limit,
                             swiglu_alpha, backend, check_ids):
    return x.new_empty(x.shape)  # y [T, H] in x's dtype, whatever the routing: no data-dependent size escapes


@torch.library.custom_op("splitmoe::split_lora_experts_backward", mutates_args=())
def _split_lora_experts_backward(dy: torch.Tensor, x: torch.Tensor, expert_ids: torch.Tensor,
                                 expert_weights: torch.Tensor, w_gate_up: torch.Tensor, w_down: torch.Tensor,
                                 lora_gate_up_a: torch.Tensor | None, lora_gate_up_b: torch.Tensor | None,
                                 lora_down_a: torch.Tensor | None, lora_down_b: torch.Tensor | None,
                                 bias_gate_up: torch.Tensor | None, bias_down: torch.Tensor | None, scale: float,
                                 activation: str, swiglu_limit: float, swiglu_alpha: float, backend: str,
                                 needs_grad: list[bool]) -> list[torch.Tensor]:
    tensors = (x, expert_weights, w_gate_up, w_down, lora_gate_up_a, lora_gate_up_b, lora_down_a, lora_down_b,
               bias_gate_up, bias_down)
    # fresh leaves, so the recompute's graph is this op's own and gradients land nowhere but in the result
    leaves = [None if t is None else t.detach().requires_grad_(bool(n)) for t, n in zip(tensors, needs_grad)]
    wanted = [t for t in leaves if t is not None and t.requires_grad]
    with _autograd_inside_op():
        lx, lw, lwgu, lwd, la1, lb1, la2, lb2, lbgu, lbd = leaves
        y_TH = _eager(lx, expert_ids, lw, lwgu, lwd, la1, lb1, la2, lb2, lbgu, lbd, scale, activation,
                      swiglu_limit, swiglu_alpha, backend, False)  # ids were checked by the forward
        grads = (torch.autograd.grad(y_TH, wanted, dy, allow_unused=True)
                 if wanted and y_TH.requires_grad else [None] * len(wanted))
    # an input the output does not depend on (no routed rows at all) has a zero gradient
    return [torch.zeros_like(t) if g is None else g.contiguous() for t, g in zip(wanted, grads)]


@_split_lora_experts_backward.register_fake
def _split_lora_experts_backward_fake(dy, x, expert_ids, expert_weights, w_gate_up, w_down, lora_gate_up_a,
                                      lora_gate_up_b, lora_down_a, lora_down_b, bias_gate_up, bias_down, scale,
                                      activation, swiglu_limit, swiglu_alpha, backend, needs_grad):
    tensors = (x, expert_weights, w_gate_up, w_down, lora_gate_up_a, lora_gate_up_b, lora_down_a, lora_down_b,
               bias_gate_up, bias_down)
    return [t.new_empty(t.shape) for t, n in zip(tensors, needs_grad) if n and t is not None]


def _setup_context(ctx, inputs, output) -> None:
    ctx.save_for_backward(*inputs[:11])  # the tensors (None for an absent LoRA pair or bias)
    ctx.scalars = inputs[11:16]  # scale, activation, swiglu_limit, swiglu_alpha, backend


def _backward(ctx, dy_TH):
    tensors = ctx.saved_tensors
    needs = [bool(ctx.needs_input_grad[i]) and tensors[i] is not None for i in _GRAD_POSITIONS]
    grads: list[torch.Tensor | None] = [None] * _NUM_ARGS
    if not any(needs):
        return tuple(grads)
    flat = _split_lora_experts_backward(dy_TH, *tensors, *ctx.scalars, needs)
    it = iter(flat)
    for pos, need in zip(_GRAD_POSITIONS, needs):
        if need:
            grads[pos] = next(it)
    return tuple(grads)


_split_lora_experts.register_autograd(_backward, setup_context=_setup_context)


def split_lora_experts_op(x: torch.Tensor, expert_ids: torch.Tensor, expert_weights: torch.Tensor,
                          w_gate_up: torch.Tensor, w_down: torch.Tensor,
                          lora_gate_up: tuple[torch.Tensor, torch.Tensor] | None = None,
                          lora_down: tuple[torch.Tensor, torch.Tensor] | None = None, *, scale: float = 1.0,
                          biases: tuple[torch.Tensor, torch.Tensor] | None = None, activation: str = "swiglu",
                          swiglu_limit: float = 7.0, swiglu_alpha: float = 1.702, backend: str = "auto",
                          check_ids: bool = True) -> torch.Tensor:
    """`torch_impl.moe.split_lora_experts` through the custom op: the same arguments (less `sort`: the op sorts the
    rows itself, since an `ExpertSort` is no tensor) and the same y [T, H] and gradients (see the module docstring).

    In eager mode the backend is resolved here, so a backend that cannot run says why before any work; under
    torch.compile the name goes into the graph as it is and the op resolves it when it runs (the resolution probes
    the device, which Dynamo must not trace).
    """
    if not torch.compiler.is_compiling():
        from torch_impl.backends import resolve_backend

        backend = resolve_backend(backend, device=x.device, dtype=x.dtype)
    a1, b1 = lora_gate_up if lora_gate_up is not None else (None, None)
    a2, b2 = lora_down if lora_down is not None else (None, None)
    b_gu, b_d = biases if biases is not None else (None, None)
    return _split_lora_experts(x, expert_ids, expert_weights, w_gate_up, w_down, a1, b1, a2, b2, b_gu, b_d,
                               float(scale), activation, float(swiglu_limit), float(swiglu_alpha), backend,
                               bool(check_ids))
