"""Routed experts over token chunks, recomputed chunk by chunk in the backward: the MoE block's activation memory
bounded by one chunk instead of the whole sequence (long-context training).

`tiled_split_lora_experts(x, expert_ids, expert_weights, ..., chunk=C)` computes `moe.split_lora_experts` on the token
rows [0, C), [C, 2C), ... one after another and concatenates the outputs. Each token's output depends on its own row
alone, so the result is the same function. What changes is what is alive at once: the untiled op holds the backward's
residuals of all M = T·K routed rows (the pre-activation gu [M, 2I] and the LoRA z's), and in its backward dgu
[M, 2I] and the [M, H] row outputs besides. At gpt-oss-20b's shapes and 128K tokens that is about 6 GB of gu, 6 GB
of dgu and 3 GB of rows in the one layer being differentiated. Tiled, the forward keeps only its inputs (x, the
routing, the parameters: tensors that exist anyway) and the backward recomputes one chunk's residuals, takes its
gradients and frees them before the next chunk, so those buffers are a chunk's (the tiling of ALST's TiledMLP,
applied to routed experts, with each chunk sorted by expert on its own).

Cost: the backward recomputes each chunk's gate_up pass, a third of the expert forward (the recompute asks the
backends for residuals only, `output_unread=True`, which skips the down GEMM). Inside an activation-checkpointed
decoder layer that recompute replaces the layer recompute's own: in the layer recompute nothing reads the experts'
output (`Experts.output_unread_in_recompute`), so the tiled forward there computes nothing at all and returns NaN
(as the backends' `output_unread` does: a broken promise shows as NaN gradients, never quietly wrong ones). So with
checkpointing the tiled experts do the untiled FLOPs, in more and smaller launches; without it, one extra gate_up
pass. Gradients flow to x, the routing weights, the LoRA factors and any other input that requires grad (biases and
base weights in full fine-tuning), summed over chunks in fp32 where the parameter is fp32.
"""

from __future__ import annotations

import torch

from torch_impl.moe import LoraPair, split_lora_experts

__all__ = ["tiled_split_lora_experts"]


def _flat(lora_gate_up: LoraPair | None, lora_down: LoraPair | None, biases) -> list[torch.Tensor | None]:
    return [*(lora_gate_up or (None, None)), *(lora_down or (None, None)), *(biases or (None, None))]


def _unflat(t: list[torch.Tensor | None]):
    pair = lambda a, b: None if a is None else (a, b)  # noqa: E731
    return pair(t[0], t[1]), pair(t[2], t[3]), pair(t[4], t[5])


class _TiledExperts(torch.autograd.Function):
    """Inputs: x, expert_ids, expert_weights, w_gate_up, w_down, then A1, B1, A2, B2, b_gate_up, b_down (None where
    absent), then the keyword options of `split_lora_experts`, the chunk and `unread`."""

    @staticmethod
    def forward(ctx, x, expert_ids, expert_weights, w_gate_up, w_down, a1, b1, a2, b2, b_gu, b_d, options: dict,
                chunk: int, unread: bool):
        tensors = [a1, b1, a2, b2, b_gu, b_d]
        ctx.save_for_backward(x, expert_ids, expert_weights, w_gate_up, w_down, *tensors)
        ctx.options, ctx.chunk = options, chunk
        if unread:  # a checkpointed layer's recompute: nothing reads y, and the backward recomputes each chunk
            return torch.full_like(x, float("nan"))
        lora_gu, lora_d, biases = _unflat(tensors)
        out = torch.empty_like(x)
        for t0 in range(0, x.shape[0], chunk):
            c = slice(t0, t0 + chunk)
            out[c] = split_lora_experts(x[c], expert_ids[c], expert_weights[c], w_gate_up, w_down, lora_gu, lora_d,
                                        biases=biases, check_ids=False, **options)
        return out

    @staticmethod
    def backward(ctx, dy):
        x, expert_ids, expert_weights, w_gate_up, w_down, *tensors = ctx.saved_tensors
        wanted = [ctx.needs_input_grad[i] for i in (0, 2, 3, 4, 5, 6, 7, 8, 9, 10)]
        params = [w_gate_up, w_down, *tensors]
        # the parameters as leaves of each chunk's graph (detached: their .grad is this Function's output to fill,
        # not autograd's to accumulate into, so hooks on them fire once, with the sum over chunks)
        leaves = [None if p is None else p.detach().requires_grad_(w) for p, w in zip(params, wanted[2:])]
        sums: list[torch.Tensor | None] = [None] * len(params)
        dx = torch.zeros_like(x) if wanted[0] else None
        dw = torch.zeros_like(expert_weights) if wanted[1] else None
        for t0 in range(0, x.shape[0], ctx.chunk):
            c = slice(t0, t0 + ctx.chunk)
            x_c = x[c].detach().requires_grad_(wanted[0])
            w_c = expert_weights[c].detach().requires_grad_(wanted[1])
            with torch.enable_grad():
                lora_gu, lora_d, biases = _unflat(leaves[2:])
                # residuals only: the gradients are the full forward's, y_c itself is NaN
                y_c = split_lora_experts(x_c, expert_ids[c], w_c, leaves[0], leaves[1], lora_gu, lora_d,
                                         biases=biases, check_ids=False, output_unread=True, **ctx.options)
                inputs = [t for t in (x_c, w_c, *leaves) if t is not None and t.requires_grad]
                grads = iter(torch.autograd.grad(y_c, inputs, dy[c], allow_unused=True))
            if wanted[0]:
                dx[c] = next(grads)
            if wanted[1]:
                dw[c] = next(grads)
            for i, leaf in enumerate(leaves):
                if leaf is not None and leaf.requires_grad:
                    g = next(grads)
                    if g is not None:
                        sums[i] = g if sums[i] is None else sums[i].add_(g)
        for i, leaf in enumerate(leaves):  # a parameter no chunk reached (no LoRA path to it) gets zeros
            if leaf is not None and leaf.requires_grad and sums[i] is None:
                sums[i] = torch.zeros_like(leaf)
        return (dx, None, dw, *sums, None, None, None)


def tiled_split_lora_experts(x: torch.Tensor, expert_ids: torch.Tensor, expert_weights: torch.Tensor,
                             w_gate_up: torch.Tensor, w_down: torch.Tensor, lora_gate_up: LoraPair | None = None,
                             lora_down: LoraPair | None = None, *, chunk: int,
                             biases: tuple[torch.Tensor, torch.Tensor] | None = None, output_unread: bool = False,
                             **options) -> torch.Tensor:
    """`moe.split_lora_experts` (same arguments, same y [T, H] and gradients) over token chunks of `chunk` rows, the
    backward recomputing one chunk at a time (module docstring). `output_unread=True` (a checkpointed layer's
    recompute) computes nothing and returns NaN. `options`: split_lora_experts' keywords scale, activation,
    swiglu_limit, swiglu_alpha, backend. Expert ids must be in range (a router's are): chunks skip the check."""
    if isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1:
        raise ValueError(f"chunk must be a positive number of tokens, got {chunk!r}")
    return _TiledExperts.apply(x, expert_ids, expert_weights, w_gate_up, w_down,
                               *_flat(lora_gate_up, lora_down, biases), options, chunk, bool(output_unread))
