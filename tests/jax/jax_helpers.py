"""Test helpers for jax_impl models: one jitted (loss, logits, LoRA grads) function per model, LoRA grads by name.

`lora_value_and_grad(model)` splits the model once into (graphdef, LoRA state, frozen state) and jits
`value_and_grad` with respect to the LoRA state only; `run(...)` returns numpy logits, loss, aux loss and the LoRA
gradients under canonical names (the gradient state is merged into the graph and read with `lora_state_dict`, so
names come from the same code that names the parameters).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jax_impl.lora import lora_state_dict


class LoraRunner:
    def __init__(self, model: nnx.Module):
        self.graphdef, self.lora_state, self.frozen_state = nnx.split(model, nnx.LoRAParam, ...)
        self.traces = 0

        def loss_fn(lora_state, frozen_state, input_ids, labels, position_ids):
            self.traces += 1
            out = nnx.merge(self.graphdef, lora_state, frozen_state)(input_ids, labels=labels,
                                                                      position_ids=position_ids)
            return out.loss, out

        self._fn = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))

    def run(self, input_ids, labels, position_ids=None) -> dict:
        pos = None if position_ids is None else jnp.asarray(position_ids, jnp.int32)
        (loss, out), grads = self._fn(self.lora_state, self.frozen_state, jnp.asarray(input_ids, jnp.int32),
                                      jnp.asarray(labels, jnp.int32), pos)
        grad_model = nnx.merge(self.graphdef, grads, self.frozen_state)
        return dict(logits=np.asarray(out.logits.astype(jnp.float32)), loss=float(loss),
                    aux_loss=None if out.aux_loss is None else float(out.aux_loss),
                    grads=lora_state_dict(grad_model))


def routing_margins(router_logits, top_k: int, batch_shape: tuple[int, int]) -> np.ndarray:
    """[L_moe, B, S]: per MoE layer and token, the router-probability gap between the K-th and (K+1)-th expert
    (fp32 softmax), from a list of per-layer router logits [B·S, E] (e.g. HF's `output_router_logits`)."""
    out = []
    for logits in router_logits:
        lg = np.asarray(logits, np.float64)
        p = np.exp(lg - lg.max(-1, keepdims=True))
        p = np.sort(p / p.sum(-1, keepdims=True), axis=-1)[:, ::-1]
        nxt = p[:, top_k] if top_k < p.shape[1] else 0.0
        out.append((p[:, top_k - 1] - nxt).reshape(batch_shape))
    return np.stack(out)


def bf16_comparable(margins: np.ndarray, position_ids, threshold: float) -> np.ndarray:
    """[B, S] bool: tokens whose output does not depend on a routing decision that bf16 rounding may flip.

    A token whose top-K margin is below `threshold` in some MoE layer may legitimately pick another expert in bf16
    (a near-tie in fp32); it is not comparable, and if that layer is not the last, neither is any later token of its
    packed sequence (they attend to its changed hidden state in the next layer).
    """
    L, B, S = margins.shape
    pos = np.tile(np.arange(S), (B, 1)) if position_ids is None else np.asarray(position_ids)
    seq = np.cumsum(np.diff(pos, axis=1, prepend=pos[:, :1] - 1) != 1, axis=1)
    ok = np.ones((B, S), bool)
    for l in range(L):
        for b, s in zip(*np.nonzero(margins[l] < threshold)):
            ok[b, s] = False
            if l < L - 1:
                ok[b, (seq[b] == seq[b, s]) & (np.arange(S) > s)] = False
    return ok


def mask_labels(labels: np.ndarray, comparable: np.ndarray) -> np.ndarray:
    """Labels with -100 wherever the prediction comes from a non-comparable position (logits[s] predicts s+1)."""
    out = labels.copy()
    out[:, 1:][~comparable[:, :-1]] = -100
    return out


# differentiable inputs of split_lora_experts, in argument order
DIFF_ARGS = ("x", "expert_weights", "w_gate_up", "w_down", "lora_gate_up", "lora_down", "biases")


def moe_inputs_to_jax(inp: dict, dtype) -> dict:
    """`shared_math.cases.make_moe_inputs` output -> jax arrays in `dtype` (expert ids as int32)."""
    def cast(v):
        if v is None:
            return None
        if isinstance(v, tuple):
            return tuple(jnp.asarray(a, dtype) for a in v)
        return jnp.asarray(v, dtype)

    out = {k: cast(inp[k]) for k in DIFF_ARGS}
    out["expert_ids"] = jnp.asarray(inp["expert_ids"], jnp.int32)
    return out

