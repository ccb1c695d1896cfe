"""Routing analytics in jax_impl: per MoE layer, the statistics of `shared_math.routing_stats` (load per expert,
tokens, entropy, the layer's own aux loss, group choices), accumulated on the device and read at log steps.
Mirrors `torch_impl.routing_stats` (same names).

How the accumulation works:
1. `enable_routing_stats(model)` gives every `MoEBlock` a `RoutingStats` variable; each forward of the block
   overwrites it with its statistics (`jax_impl.moe.forward_routing_stats`: a log-softmax and a few reductions over
   the [T, E] router logits it already has). Enable it before `nnx.split`, so the variables are part of the state.
2. A jitted step that merges the model returns `routing_stats_of(model)` (a list of dicts of arrays, one per MoE
   layer) next to its loss, as part of its outputs (the trainer's `_loss_fn`); a layer under `jax.checkpoint` hands
   its statistics out explicitly (`models.layers.LayerCheckpointing._run_layer`).
3. `RoutingStatsAccumulator.add(stats)` adds them into the window's sums with one jitted call (asynchronous
   dispatch: no host sync); `pop()`, at a log step, fetches the sums in one `jax.device_get` (the only sync),
   summarises them and starts an empty window.

`set_token_mask(model, attention_mask)` makes the next forwards count only the tokens where the mask is 1 (padding
excluded); inside a jitted function set it on the merged model before calling it, as `collect_routing_stats` does.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jax_impl.moe import MoEBlock, RoutingStats
from shared_math.routing_stats import has_aux_loss, summarize

__all__ = ["RoutingStatsAccumulator", "collect_routing_stats", "enable_routing_stats", "moe_blocks",
           "routing_stats_of", "set_token_mask"]


def moe_blocks(model: nnx.Module) -> list[tuple[int, MoEBlock]]:
    """(layer index, MoE block) of every MoE layer of a jax_impl causal LM, in layer order; a lone `MoEBlock` is
    layer 0."""
    if isinstance(model, MoEBlock):
        return [(0, model)]
    layers = getattr(model, "layers", None)
    if layers is None:
        raise ValueError(f"{type(model).__name__} has no decoder layers (`model.layers`): routing statistics need a "
                         "jax_impl causal LM")
    return [(l, layer.mlp) for l, layer in enumerate(layers) if isinstance(getattr(layer, "mlp", None), MoEBlock)]


def _zeros(block: MoEBlock) -> dict[str, jax.Array]:
    """The statistics of no token: the structure (keys, shapes, dtypes) every forward of `block` fills."""
    r = block.routing
    zeros = {"load": jnp.zeros((r.num_experts,), jnp.int32), "tokens": jnp.zeros((), jnp.int32),
             "entropy_sum": jnp.zeros((), jnp.float32)}
    if has_aux_loss(r):
        zeros["aux_loss_sum"] = jnp.zeros((), jnp.float32)
    if r.method == "sigmoid_group":
        zeros["groups"] = jnp.zeros((r.n_group,), jnp.int32)
    return zeros


def enable_routing_stats(model: nnx.Module, on: bool = True) -> list[tuple[int, MoEBlock]]:
    """Switch the routing statistics of every MoE block on (a `RoutingStats` variable each) or off (none: a forward
    computes nothing) -> the blocks. Call it outside jit, before splitting the model."""
    blocks = moe_blocks(model)
    for _, block in blocks:
        block.routing_stats = RoutingStats(_zeros(block)) if on else None
    return blocks


def routing_stats_of(model: nnx.Module) -> list[dict[str, jax.Array]]:
    """The statistics every MoE block left at its last forward, in layer order ([] when they are off): what a jitted
    step returns."""
    return [block.routing_stats.get_value() for _, block in moe_blocks(model) if block.routing_stats is not None]


def set_token_mask(model: nnx.Module, attention_mask: jax.Array | None) -> None:
    """Count only the tokens where `attention_mask` [B, S] (HF's meaning: 1 = token, 0 = padding) is 1 in the next
    forwards' statistics; None counts every token again."""
    for _, block in moe_blocks(model):
        block.routing_token_mask = None if attention_mask is None else RoutingStats(attention_mask.reshape(-1))


@jax.jit
def _add(a: list[dict[str, jax.Array]], b: list[dict[str, jax.Array]]) -> list[dict[str, jax.Array]]:
    return jax.tree.map(jnp.add, a, b)


class RoutingStatsAccumulator:
    """The routing statistics of a logging window, summed on the device over the forward passes since the last
    `pop()` (module docstring). Creating one switches the statistics on in `model`'s MoE blocks."""

    def __init__(self, model: nnx.Module) -> None:
        self.blocks = enable_routing_stats(model)
        if not self.blocks:
            raise ValueError(f"{type(model).__name__} has no MoE layer: there is no routing to analyse")
        self._sums: list[dict[str, jax.Array]] | None = None
        self.passes = 0

    def add(self, stats: list[dict[str, jax.Array]]) -> None:
        """Add one forward pass's statistics (what the jitted step returned from `routing_stats_of`) into the
        window: one asynchronous jitted call. Call it exactly once per forward."""
        if len(stats) != len(self.blocks):
            raise RuntimeError(f"routing statistics of {len(stats)} MoE layers for a model of {len(self.blocks)}: "
                               "pass routing_stats_of(model) after a forward of the model whose statistics are on")
        self._sums = stats if self._sums is None else _add(self._sums, stats)
        self.passes += 1

    def pop(self) -> dict[str, dict[str, Any]] | None:
        """The window's `routing` object (`shared_math.routing_stats.summarize`), fetched in one `jax.device_get`,
        then an empty window; None when nothing was added since the last pop. (On a mesh the statistics are
        already global: the jitted step computes them over the whole batch.)"""
        if self._sums is None:
            return None
        host = jax.device_get(self._sums)
        per_layer = {layer: {k: np.asarray(v) for k, v in s.items()} for (layer, _), s in zip(self.blocks, host)}
        summary = summarize(per_layer, self.passes)
        self._sums, self.passes = None, 0
        return summary


def _forward_stats(graphdef: Any, state: Any, input_ids: jax.Array, position_ids: jax.Array | None,
                   attention_mask: jax.Array | None) -> list[dict[str, jax.Array]]:
    model = nnx.merge(graphdef, state, copy=True)  # a copy: its variables are written inside this trace
    set_token_mask(model, attention_mask)
    model(input_ids, position_ids=position_ids, attention_mask=attention_mask)  # its logits are dead code to XLA
    return routing_stats_of(model)


_forward_stats_jit = jax.jit(_forward_stats, static_argnums=0)


def collect_routing_stats(model: nnx.Module, batches: Iterable[Mapping[str, np.ndarray]]
                          ) -> dict[str, dict[str, Any]]:
    """Run `model` (jitted, no gradient) over `batches` (each `input_ids` [B, S], optional `position_ids` and
    `attention_mask` [B, S]; numpy) and return the routing summary of all of them: the statistics of
    `splitmoe inspect --routing`. Tokens where `attention_mask` is 0 are not counted. The statistics are left
    switched off afterwards."""
    from jax_impl.models.layers import prepare_position_ids

    acc = RoutingStatsAccumulator(model)
    try:
        graphdef, state = nnx.split(model)
        for b in batches:
            ids = np.asarray(b["input_ids"])
            pos = b.get("position_ids")
            prepare_position_ids(ids, pos, model.config.vocab_size)  # the eager checks: ids in range, shapes
            mask = b.get("attention_mask")
            acc.add(_forward_stats_jit(graphdef, state, jnp.asarray(ids), None if pos is None else jnp.asarray(pos),
                                       None if mask is None else jnp.asarray(mask)))
    finally:
        enable_routing_stats(model, on=False)
    summary = acc.pop()
    if summary is None:
        raise ValueError("no batch to run: the routing statistics need at least one batch")
    return summary
