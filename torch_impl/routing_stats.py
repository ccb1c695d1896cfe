"""Routing analytics in torch_impl: per MoE layer, the statistics of `shared_math.routing_stats` (load per expert,
tokens, entropy, the layer's own aux loss, group choices), accumulated on the device and read at log steps.

How the accumulation works (what a timing of a logged step measures):
1. `enable_routing_stats(model)` sets `MoEBlock.collect_routing_stats`; every forward of such a block then computes
   its statistics from the router logits it already has (`torch_impl.moe.forward_routing_stats`: a log-softmax
   and a few reductions over [T, E], the load being `sort_by_expert`'s group sizes) and leaves them, a handful of
   small device tensors, in `block.routing_stats`. Nothing waits on the GPU.
2. `RoutingStatsAccumulator.add(routing_stats_of(model))`, once per micro-batch after its forward (and
   backward), adds every block's tensors into the window's buffers with one `torch._foreach_add_` (a few
   multi-tensor kernels for all layers): no host sync. Overwriting in the forward and adding afterwards, rather
   than adding inside the forward, keeps a checkpointed layer (recomputed in the backward) from counting its batch
   twice, and works unchanged when the forward + backward is replayed from a CUDA graph (the blocks' tensors are
   the graph's, refreshed by each replay).
3. `RoutingStatsAccumulator.pop()`, at a log step, copies the buffers to the host in one transfer (the only sync),
   summarises them (`shared_math.routing_stats.summarize`) and starts an empty window.

`set_token_mask(model, attention_mask)` makes the next forwards count only the tokens where the mask is 1 (padding
excluded), as the aux loss does with an attention_mask; the trainers' packed batches have none to exclude.
Mirrors `jax_impl.routing_stats` (same names).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np
import torch
from torch import nn

from shared_math.routing_stats import summarize
from torch_impl.moe import MoEBlock

__all__ = ["RoutingStatsAccumulator", "collect_routing_stats", "enable_routing_stats", "moe_blocks",
           "routing_stats_of", "set_token_mask"]


def moe_blocks(model: nn.Module) -> list[tuple[int, MoEBlock]]:
    """(layer index, MoE block) of every MoE layer of a torch_impl causal LM, in layer order; a lone `MoEBlock` is
    layer 0."""
    if isinstance(model, MoEBlock):
        return [(0, model)]
    layers = getattr(model, "layers", None)
    if not isinstance(layers, nn.ModuleList):
        raise ValueError(f"{type(model).__name__} has no decoder layers (`model.layers`): routing statistics need a "
                         "torch_impl causal LM")
    return [(l, layer.mlp) for l, layer in enumerate(layers) if isinstance(getattr(layer, "mlp", None), MoEBlock)]


def enable_routing_stats(model: nn.Module, on: bool = True) -> list[tuple[int, MoEBlock]]:
    """Switch the routing statistics of every MoE block on (or off: then a forward computes none) -> the blocks."""
    blocks = moe_blocks(model)
    for _, block in blocks:
        block.collect_routing_stats = on
        if not on:
            block.routing_stats = None
    return blocks


def routing_stats_of(model: nn.Module) -> list[dict[str, torch.Tensor] | None]:
    """The statistics every MoE block left at its last forward (`MoEBlock.routing_stats`), in layer order."""
    return [block.routing_stats for _, block in moe_blocks(model)]


def set_token_mask(model: nn.Module, attention_mask: torch.Tensor | None) -> None:
    """Count only the tokens where `attention_mask` [B, S] (HF's meaning: 1 = token, 0 = padding) is 1 in the next
    forwards' statistics; None counts every token again. The mask must be on the model's device."""
    mask_T = None if attention_mask is None else attention_mask.reshape(-1)
    for _, block in moe_blocks(model):
        block.routing_token_mask = mask_T


class RoutingStatsAccumulator:
    """The routing statistics of a logging window, summed on the device over the forward passes since the last
    `pop()` (module docstring). Creating one switches the statistics on in `model`'s MoE blocks."""

    def __init__(self, model: nn.Module) -> None:
        self.blocks = enable_routing_stats(model)
        if not self.blocks:
            raise ValueError(f"{type(model).__name__} has no MoE layer: there is no routing to analyse")
        self._keys: list[list[str]] | None = None  # per block, its statistics' names (sorted)
        self._sums: list[torch.Tensor] | None = None  # flat over blocks and names
        self.passes = 0

    def add(self, stats: list[dict[str, torch.Tensor] | None]) -> None:
        """Add one forward pass's statistics (`routing_stats_of(model)` after it) into the window: device work
        only. Call it exactly once per forward."""
        if len(stats) != len(self.blocks) or any(s is None for s in stats):
            raise RuntimeError("no routing statistics to add: pass routing_stats_of(model) after a forward of the "
                               "model whose statistics are switched on")
        if self._sums is None:
            self._keys = [sorted(s) for s in stats]
            self._sums = [s[k].detach().clone() for s, keys in zip(stats, self._keys) for k in keys]
        else:
            torch._foreach_add_(self._sums, [s[k] for s, keys in zip(stats, self._keys) for k in keys])
        self.passes += 1

    def pop(self) -> dict[str, dict[str, Any]] | None:
        """The window's `routing` object (`shared_math.routing_stats.summarize`), read with one device-to-host copy,
        then an empty window; None when nothing was added since the last pop.

        Under torch.distributed (torch_impl.parallel: each rank routes its own rows) the sums are added over the
        ranks first, so every rank must call it at the same steps; `aux_loss` is then the mean over ranks and passes
        of each rank's own per-layer aux loss."""
        if self._sums is None:
            return None
        # float64 holds every count exactly (< 2^53) and the fp32 sums without loss: one tensor, one transfer
        flat = torch.cat([t.reshape(-1).double() for t in self._sums])
        passes = self.passes
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(flat)
            passes *= torch.distributed.get_world_size()
        host = flat.cpu().numpy()
        shapes = iter([tuple(t.shape) for t in self._sums])
        per_layer, i = {}, 0
        for (layer, _), keys in zip(self.blocks, self._keys):
            per_layer[layer] = {}
            for k in keys:
                shape = next(shapes)
                n = int(np.prod(shape))
                per_layer[layer][k] = host[i:i + n].reshape(shape)
                i += n
        self._keys, self._sums, self.passes = None, None, 0
        return summarize(per_layer, passes)


@torch.no_grad()
def collect_routing_stats(model: nn.Module, batches: Iterable[Mapping[str, np.ndarray]], *,
                          device: torch.device | str | None = None) -> dict[str, dict[str, Any]]:
    """Run `model` (eval mode, no grad) over `batches` (each `input_ids` [B, S], optional `position_ids` and
    `attention_mask` [B, S]; numpy) and return the routing summary of all of them: the statistics of
    `splitmoe inspect --routing`. Tokens where `attention_mask` is 0 are not counted. The statistics are left
    switched off afterwards."""
    device = torch.device(device) if device is not None else next(model.parameters()).device
    model.eval()
    acc = RoutingStatsAccumulator(model)
    try:
        for b in batches:
            t = {k: torch.from_numpy(np.asarray(v)).long().to(device) for k, v in b.items()}
            set_token_mask(model, t.get("attention_mask"))
            model(t["input_ids"], position_ids=t.get("position_ids"), attention_mask=t.get("attention_mask"))
            acc.add(routing_stats_of(model))
    finally:
        set_token_mask(model, None)
        enable_routing_stats(model, on=False)
    summary = acc.pop()
    if summary is None:
        raise ValueError("no batch to run: the routing statistics need at least one batch")
    return summary
