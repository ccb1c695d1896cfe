"""The routed experts with split LoRA as one torch custom op, `splitmoe::split_lora_experts`, so `torch.compile`
traces a whole decoder layer without graph breaks.

Shapes: T tokens, H hidden, I expert intermediate, E experts, K experts per token, R LoRA rank, M = T·K routed rows.

Why an op: the expert path is data-dependent by nature. Group sizes are data (the native loop reads them on the host,
grouped_mm's un-permute loops over row chunks, the Triton kernels pick configs by them), and the backend is chosen
by probing the device. Dynamo cannot trace host reads of tensor values, so it breaks the graph there. As an opaque op
with a fake (meta) implementation, which gives y's shape and dtype from the inputs' alone, the experts become one
node of the layer's graph and everything around them (attention, norms, router, the sort by expert, residuals)
compiles as one region.

Two ops, both dispatching to the eager path (`torch_impl.moe.split_lora_experts`, and through it the very backend
code eager mode runs; no math is duplicated here):
- `splitmoe::split_lora_experts(x, expert_ids, expert_weights, w_gate_up, w_down, a1?, b1?, a2?, b2?, b_gate_up?,
  b_down?, sort, scale, activation, swiglu_limit, swiglu_alpha, backend, check_ids, output_unread_in_recompute)
  -> [y [T, H], *residuals]`:
  the eager forward without grad on the rows as `sort` (`ExpertSort.tensors()`, made in the graph) orders them,
  plus what the backend's autograd Function saves for its backward beyond its inputs (its residuals,
  `torch_impl.backends.common.op_residuals`: gu [M, 2I], z1 [M, R1], z2 [M, R2] for grouped_mm and the Triton
  backends; none for native), which the fake gives by shape (the backend's `residual_shapes`).
- `splitmoe::split_lora_experts_backward(dy, <the same tensors>, sort, residuals, <the same scalars>, needs_grad)
  -> [grads]`: the gradients of the inputs flagged in `needs_grad` (x, expert_weights, the base weights, both LoRA
  factors, the biases, in that order; frozen base weights are not flagged, so they get none). A backend with an
  `experts_backward` (the Triton backends) computes them directly from the residuals: its Function's backward on
  the values its forward saved, called without autograd (`_direct_backward`; on the CPU host probe of a small
  layer, 935 -> 724 µs of host time per call). Otherwise the op rebuilds the backend Function's graph on the
  residuals, without its GEMMs, and returns `torch.autograd.grad` of it. Either way the gradients are those of
  eager mode, bit for bit on the same backend: the same backward code on the same saved values. Without residuals
  (native) it recomputes the eager forward with autograd instead.
`register_autograd` ties them together (the sort and the residual outputs take no gradient); double backward is not
supported (the backward op has no autograd).

Why residuals, where the op first saved only its inputs and recomputed the expert forward in its backward: a decoder
layer under activation checkpointing (how torch_impl trains) runs its forward twice already, and that recompute made
it three expert forwards per layer and step against eager's two, plus a third sort. On CPU (benchmarks/
compile_probe.py, tiny Qwen3 widths, 4 layers, bf16, 256 tokens) the compiled step took 155 ms against eager's 152;
with residuals 138 ms against 158. They take the memory eager's Function takes: under activation checkpointing none
between forward and backward (they are recomputed with the layer); without it, gu, z1, z2 per layer, as in eager.

When the op is used (`custom_op_active`): always under `torch.compile` (Dynamo's tracing), never in eager mode by
default, where it would only add its dispatch and the rebuilt graph, so eager numbers and costs stay as they were.
Override with `use_custom_op(True / False)` or the environment variable `SPLITMOE_MOE_CUSTOM_OP` (1: always, 0:
never, not even under compile, which brings the graph breaks back; auto or unset: the default); `use_custom_op`
beats the variable.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext

import torch

from torch_impl.backends.common import ExpertSort, op_residuals
from torch_impl.models.layers import in_layer_recompute

ENV_VAR = "SPLITMOE_MOE_CUSTOM_OP"
_MODE: bool | None = None  # set by use_custom_op; None: the environment variable, then auto, decides

# The op's differentiable tensor inputs, in the order of its schema and of the backward op's `needs_grad`.
GRAD_INPUTS = ("x", "expert_weights", "w_gate_up", "w_down", "lora_gate_up_a", "lora_gate_up_b", "lora_down_a",
               "lora_down_b", "bias_gate_up", "bias_down")
# their positions among the forward op's arguments (expert_ids, position 1, has no gradient, nor has the sort)
_GRAD_POSITIONS = (0, 2, 3, 4, 5, 6, 7, 8, 9, 10)
_NUM_TENSORS = 11  # x .. bias_down: the op's tensor arguments before the sort
_NUM_ARGS = 19

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


def _eager(x, expert_ids, expert_weights, w_gate_up, w_down, a1, b1, a2, b2, b_gu, b_d, sort, scale, activation,
           swiglu_limit, swiglu_alpha, backend, output_unread=False) -> torch.Tensor:
    """The eager path on the op's flat arguments (`sort`: `ExpertSort.tensors()`)."""
    from torch_impl.moe import split_lora_experts  # deferred: torch_impl.moe imports this module

    T, K = expert_ids.shape
    return split_lora_experts(x, expert_ids, expert_weights, w_gate_up, w_down, _pair(a1, b1), _pair(a2, b2),
                              scale=scale, biases=_pair(b_gu, b_d), activation=activation,
                              swiglu_limit=swiglu_limit, swiglu_alpha=swiglu_alpha, backend=backend,
                              sort=ExpertSort.from_tensors(sort, T, K), output_unread=output_unread)


def _residual_shapes(backend: str, x: torch.Tensor, expert_ids: torch.Tensor, w_down: torch.Tensor,
                     lora_gate_up_a: torch.Tensor | None, lora_down_a: torch.Tensor | None) -> list[tuple[int, ...]]:
    """The shapes of the residuals the op returns for a backend (none for native, nor for "auto" given to the op
    itself: the fake cannot tell which backend that becomes)."""
    from torch_impl.backends import get_backend

    shapes = None if backend == "auto" else getattr(get_backend(backend), "residual_shapes", None)
    return [] if shapes is None else shapes(x, expert_ids, w_down, lora_gate_up_a, lora_down_a)


@torch.library.custom_op("splitmoe::split_lora_experts", mutates_args=())
def _split_lora_experts(x: torch.Tensor, expert_ids: torch.Tensor, expert_weights: torch.Tensor,
                        w_gate_up: torch.Tensor, w_down: torch.Tensor, lora_gate_up_a: torch.Tensor | None,
                        lora_gate_up_b: torch.Tensor | None, lora_down_a: torch.Tensor | None,
                        lora_down_b: torch.Tensor | None, bias_gate_up: torch.Tensor | None,
                        bias_down: torch.Tensor | None, sort: list[torch.Tensor], scale: float, activation: str,
                        swiglu_limit: float, swiglu_alpha: float, backend: str,
                        check_ids: bool, output_unread_in_recompute: bool) -> list[torch.Tensor]:
    if check_ids:
        from torch_impl.moe import check_expert_ids

        check_expert_ids(expert_ids, w_gate_up.shape[0])
    shapes = _residual_shapes(backend, x, expert_ids, w_down, lora_gate_up_a, lora_down_a)
    # read when the op runs, not when it is traced: the forward and the checkpoint's recompute share one graph
    output_unread = output_unread_in_recompute and in_layer_recompute()
    # no graph here: the backend's Function hands its residuals to `op_residuals` instead
    with torch.no_grad(), op_residuals() if shapes else nullcontext() as residuals:
        y_TH = _eager(x, expert_ids, expert_weights, w_gate_up, w_down, lora_gate_up_a, lora_gate_up_b,
                      lora_down_a, lora_down_b, bias_gate_up, bias_down, sort, scale, activation, swiglu_limit,
                      swiglu_alpha, backend, output_unread)
    if shapes and not residuals:  # the backend never reached its Function (no tokens): stand-ins, never read
        residuals = [x.new_empty(shape) for shape in shapes]
    # grouped_mm returns a column slice for padded H; the fake promises a dense [T, H]
    return [y_TH.contiguous(), *(residuals or [])]


@_split_lora_experts.register_fake
def _split_lora_experts_fake(x, expert_ids, expert_weights, w_gate_up, w_down, lora_gate_up_a, lora_gate_up_b,
                             lora_down_a, lora_down_b, bias_gate_up, bias_down, sort, scale, activation,
                             swiglu_limit, swiglu_alpha, backend, check_ids, output_unread_in_recompute):
    # y [T, H] in x's dtype, whatever the routing: no data-dependent size escapes; residuals [M, ·] in x's dtype
    shapes = _residual_shapes(backend, x, expert_ids, w_down, lora_gate_up_a, lora_down_a)
    return [x.new_empty(x.shape), *(x.new_empty(shape) for shape in shapes)]


@torch.library.custom_op("splitmoe::split_lora_experts_backward", mutates_args=())
def _split_lora_experts_backward(dy: torch.Tensor, x: torch.Tensor, expert_ids: torch.Tensor,
                                 expert_weights: torch.Tensor, w_gate_up: torch.Tensor, w_down: torch.Tensor,
                                 lora_gate_up_a: torch.Tensor | None, lora_gate_up_b: torch.Tensor | None,
                                 lora_down_a: torch.Tensor | None, lora_down_b: torch.Tensor | None,
                                 bias_gate_up: torch.Tensor | None, bias_down: torch.Tensor | None,
                                 sort: list[torch.Tensor], residuals: list[torch.Tensor], scale: float,
                                 activation: str, swiglu_limit: float, swiglu_alpha: float, backend: str,
                                 needs_grad: list[bool]) -> list[torch.Tensor]:
    tensors = (x, expert_weights, w_gate_up, w_down, lora_gate_up_a, lora_gate_up_b, lora_down_a, lora_down_b,
               bias_gate_up, bias_down)
    direct = _direct_backward(dy, tensors, expert_ids, sort, residuals, scale, activation, swiglu_limit,
                              swiglu_alpha, backend, needs_grad)
    if direct is not None:
        return direct
    # fresh leaves, so the graph built here is this op's own and gradients land nowhere but in the result
    leaves = [None if t is None else t.detach().requires_grad_(bool(n)) for t, n in zip(tensors, needs_grad)]
    wanted = [t for t in leaves if t is not None and t.requires_grad]
    # with residuals the backend's Function takes them and skips its GEMMs; without (native), a full recompute
    with _autograd_inside_op(), op_residuals(list(residuals)) if residuals else nullcontext():
        lx, lw, lwgu, lwd, la1, lb1, la2, lb2, lbgu, lbd = leaves
        y_TH = _eager(lx, expert_ids, lw, lwgu, lwd, la1, lb1, la2, lb2, lbgu, lbd, sort, scale, activation,
                      swiglu_limit, swiglu_alpha, backend)
        grads = (torch.autograd.grad(y_TH, wanted, dy, allow_unused=True)
                 if wanted and y_TH.requires_grad else [None] * len(wanted))
    # an input the output does not depend on (no routed rows at all) has a zero gradient
    return [torch.zeros_like(t) if g is None else g.contiguous() for t, g in zip(wanted, grads)]


def _direct_backward(dy, tensors, expert_ids, sort, residuals, scale, activation, swiglu_limit, swiglu_alpha,
                     backend, needs_grad) -> list[torch.Tensor] | None:
    """The backward op's gradients straight from a backend's `experts_backward` (the Triton backends: their
    Function's backward on the residuals), or None where the generic path must run (a backend without one, no
    residuals, no tokens). The generic path rebuilds the Function's graph on fresh leaves and differentiates it:
    a second run of the eager path's host code per layer, an autograd graph and an engine run, on top of the same
    backward. Here the inputs pass through `moe.backend_operands` as in the forward, and each gradient is cast back
    to its input's dtype as autograd's backward of those casts does: the same values, bit for bit."""
    from torch_impl.backends import get_backend, resolve_backend
    from torch_impl.backends.common import Activation
    from torch_impl.moe import backend_operands

    x = tensors[0]
    if not residuals or x.shape[0] == 0:
        return None
    impl = get_backend(resolve_backend(backend, device=x.device, dtype=x.dtype))
    if not hasattr(impl, "experts_backward"):
        return None
    ew, w_gate_up, w_down, a1, b1, a2, b2, b_gu, b_d = tensors[1:]
    T, K = expert_ids.shape
    weights, lora_gu, lora_d, bias_pair = backend_operands(impl, x, ew, _pair(a1, b1), _pair(a2, b2),
                                                           _pair(b_gu, b_d))
    grads = impl.experts_backward(dy, x, weights, ExpertSort.from_tensors(sort, T, K), w_gate_up, w_down, lora_gu,
                                  lora_d, float(scale), bias_pair, Activation(activation, swiglu_limit, swiglu_alpha),
                                  list(residuals), [bool(n) and t is not None for t, n in zip(tensors, needs_grad)])
    out = []
    for t, n, g in zip(tensors, needs_grad, grads):
        if n and t is not None:  # as the generic path: zeros where the output does not depend on the input
            out.append(torch.zeros_like(t) if g is None else g.to(t.dtype).contiguous())
    return out


@_split_lora_experts_backward.register_fake
def _split_lora_experts_backward_fake(dy, x, expert_ids, expert_weights, w_gate_up, w_down, lora_gate_up_a,
                                      lora_gate_up_b, lora_down_a, lora_down_b, bias_gate_up, bias_down, sort,
                                      residuals, scale, activation, swiglu_limit, swiglu_alpha, backend, needs_grad):
    tensors = (x, expert_weights, w_gate_up, w_down, lora_gate_up_a, lora_gate_up_b, lora_down_a, lora_down_b,
               bias_gate_up, bias_down)
    return [t.new_empty(t.shape) for t, n in zip(tensors, needs_grad) if n and t is not None]


def _setup_context(ctx, inputs, output) -> None:
    sort = inputs[_NUM_TENSORS]
    _, *residuals = output
    # the tensors (None for an absent LoRA pair or bias), the sort and the residuals
    ctx.save_for_backward(*inputs[:_NUM_TENSORS], *sort, *residuals)
    ctx.num_sort = len(sort)
    ctx.scalars = inputs[_NUM_TENSORS + 1:_NUM_ARGS - 2]  # scale, activation, swiglu_limit, swiglu_alpha, backend
    # residuals are saved values, not results: no gradient flows into them, and none is made up as zeros
    ctx.mark_non_differentiable(*residuals)
    ctx.set_materialize_grads(False)


def _backward(ctx, grad_outputs):
    dy_TH = grad_outputs[0]
    saved = ctx.saved_tensors
    tensors = saved[:_NUM_TENSORS]
    sort, residuals = list(saved[_NUM_TENSORS:_NUM_TENSORS + ctx.num_sort]), list(saved[_NUM_TENSORS + ctx.num_sort:])
    needs = [bool(ctx.needs_input_grad[i]) and tensors[i] is not None for i in _GRAD_POSITIONS]
    grads: list = [None] * _NUM_ARGS
    grads[_NUM_TENSORS] = [None] * ctx.num_sort  # the structure of the inputs: one None per sort tensor
    if dy_TH is None or not any(needs):
        return tuple(grads)
    flat = _split_lora_experts_backward(dy_TH, *tensors, sort, residuals, *ctx.scalars, needs)
    it = iter(flat)
    for pos, need in zip(_GRAD_POSITIONS, needs):
        if need:
            grads[pos] = next(it)
    return tuple(grads)


_split_lora_experts.register_autograd(_backward, setup_context=_setup_context)


@torch.compiler.assume_constant_result
def _resolved_backend(name: str, device: torch.device, dtype: torch.dtype) -> str:
    """`resolve_backend`; under torch.compile Dynamo calls it while tracing instead of tracing it (it probes the
    device) and puts the name it returns into the graph as a constant."""
    from torch_impl.backends import resolve_backend

    return resolve_backend(name, device=device, dtype=dtype)


def split_lora_experts_op(x: torch.Tensor, expert_ids: torch.Tensor, expert_weights: torch.Tensor,
                          w_gate_up: torch.Tensor, w_down: torch.Tensor,
                          lora_gate_up: tuple[torch.Tensor, torch.Tensor] | None = None,
                          lora_down: tuple[torch.Tensor, torch.Tensor] | None = None, *, scale: float = 1.0,
                          biases: tuple[torch.Tensor, torch.Tensor] | None = None, activation: str = "swiglu",
                          swiglu_limit: float = 7.0, swiglu_alpha: float = 1.702, backend: str = "auto",
                          sort: ExpertSort | None = None, check_ids: bool = True,
                          output_unread_in_recompute: bool = False) -> torch.Tensor:
    """`torch_impl.moe.split_lora_experts` through the custom op: the same arguments and the same y [T, H] and
    gradients (see the module docstring). `sort` (`MoEBlock`'s, traced into the graph under torch.compile) is made
    here when not given; `check_ids` checks the ids inside the op (one host sync; the caller's sort is trusted);
    `output_unread_in_recompute`: nothing reads y in activation checkpointing's recompute (`Experts`' attribute of that
    name); the op then runs `torch_impl.moe.split_lora_experts` with output_unread there, reading the recompute's mark
    (`models.layers.in_layer_recompute`) when it runs, so the forward and the recompute keep one graph.

    The backend is resolved here, before the op: in eager mode so that a backend that cannot run says why before any
    work, and under torch.compile while tracing (`_resolved_backend`), so that the op's fake knows the backend's
    residuals. A change of `SPLITMOE_MOE_BACKEND` after compilation therefore needs `torch._dynamo.reset()`.
    """
    from torch_impl.moe import sort_by_expert  # deferred: torch_impl.moe imports this module

    backend = _resolved_backend(backend, x.device, x.dtype)
    if sort is None:
        sort = sort_by_expert(expert_ids, w_gate_up.shape[0], check=False)  # the op checks, without a graph break
    a1, b1 = lora_gate_up if lora_gate_up is not None else (None, None)
    a2, b2 = lora_down if lora_down is not None else (None, None)
    b_gu, b_d = biases if biases is not None else (None, None)
    return _split_lora_experts(x, expert_ids, expert_weights, w_gate_up, w_down, a1, b1, a2, b2, b_gu, b_d,
                               sort.tensors(), float(scale), activation, float(swiglu_limit), float(swiglu_alpha),
                               backend, bool(check_ids), bool(output_unread_in_recompute))[0]
