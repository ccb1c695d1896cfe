"""Float64 numpy oracle for the MoE math of every supported family (SPEC.md is the prose version of this file).

What it computes, all in float64 whatever the input dtype:
- `router_logits`, `route`: router logits and the three routing methods of `RoutingConfig`
  (`softmax_topk` Qwen3-MoE, `topk_softmax` gpt-oss, `sigmoid_group` DeepSeek-V3 / GLM-4.x).
- `swiglu`, `swiglu_oai` and their vector-Jacobian products `swiglu_vjp`, `swiglu_oai_vjp`.
- `split_lora_experts`: the routed experts with split LoRA, `x·W + s·(x·A)·B` on routed rows only, and
  `split_lora_experts_vjp`: its analytic gradients with respect to every input.
- `moe_block`: router -> route -> experts (+ shared experts) for one layer, from canonical tensor names.
- `load_balancing_loss`: HF's Switch-style auxiliary loss (`load_balancing_loss_func`), pooled over layers.

It is the oracle both implementations are tested against, so it favours obviousness over speed: rows are sorted by
expert once (as the real kernels do) and each expert is a plain loop iteration. numpy only: never torch or jax.

Shapes: T tokens, H hidden, I expert intermediate, E experts, K experts per token, R LoRA rank, M = T·K routed rows,
G router groups. Expert weights are canonical: `w_gate_up [E, H, 2I]` (gate in columns 0:I, up in I:2I) and
`w_down [E, I, H]`, applied as `x @ W`; LoRA pairs are `(A [E, in, R], B [E, R, out])`.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np

from shared_math.config import ModelConfig, RoutingConfig
from shared_math.shapes import check_expert_args

LoraPair = tuple[np.ndarray, np.ndarray]
BiasPair = tuple[np.ndarray, np.ndarray]
ActivationName = Literal["swiglu", "swiglu_oai"]

__all__ = [
    "router_logits", "route", "sigmoid", "softmax",
    "swiglu", "swiglu_vjp", "swiglu_oai", "swiglu_oai_vjp",
    "sort_by_expert", "expert_mlp", "split_lora_experts", "split_lora_experts_vjp",
    "dense_mlp", "moe_block", "load_balancing_loss",
]


# ---- small numerics --------------------------------------------------------------------------------------------------

def _f64(a: np.ndarray | None) -> np.ndarray | None:
    return None if a is None else np.asarray(a, dtype=np.float64)


def sigmoid(x: np.ndarray) -> np.ndarray:
    """Logistic function, exact for large |x| (exp(-log(1+exp(-x))) never overflows, unlike 1/(1+exp(-x)))."""
    return np.exp(-np.logaddexp(0.0, -x))


def softmax(x: np.ndarray, axis: int = -1) -> np.ndarray:
    """Softmax with the row max subtracted first, so large logits do not overflow."""
    z = np.exp(x - np.max(x, axis=axis, keepdims=True))
    return z / np.sum(z, axis=axis, keepdims=True)


def _topk_ids(scores: np.ndarray, k: int) -> np.ndarray:
    """Indices of the k largest entries along the last axis, in descending score order.

    Ties go to the lower index: a stable sort of the negated scores keeps equal scores in index order. This is the
    project's pinned tie rule (SPEC.md, Routing); torch.topk makes no promise about ties, so tests never rely on it.
    """
    return np.argsort(-scores, axis=-1, kind="stable")[..., :k]


# ---- routing ---------------------------------------------------------------------------------------------------------

def router_logits(x_TH: np.ndarray, w_HE: np.ndarray, b_E: np.ndarray | None = None) -> np.ndarray:
    """Router logits `x @ W (+ b)` in float64; `w_HE` is canonical [H, E] (HF stores [E, H])."""
    logits_TE = _f64(x_TH) @ _f64(w_HE)
    return logits_TE if b_E is None else logits_TE + _f64(b_E)


def route(logits_TE: np.ndarray, routing: RoutingConfig,
          correction_bias_E: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Router logits -> `(expert_ids_TK int64, weights_TK float64)`, slots in descending selection-score order.

    softmax_topk  (Qwen3-MoE): p = softmax(logits) over E; top-K of p; renormalise iff norm_topk_prob.
    topk_softmax  (gpt-oss):   top-K of the logits (the router bias is already in them); softmax over those K.
    sigmoid_group (DeepSeek-V3, GLM-4.x): s = sigmoid(logits); c = s + correction_bias, used for selection only;
                  group score = sum of the top-2 c of each of n_group groups; keep the topk_group best groups
                  (the others -> -inf); top-K of the masked c; weights = s at those ids (unbiased);
                  if norm_topk_prob divide by (sum + 1e-20); always times routed_scaling_factor.
    Ties (in scores or group scores) go to the lower index.
    """
    logits_TE = _f64(logits_TE)
    if logits_TE.ndim != 2 or logits_TE.shape[1] != routing.num_experts:
        raise ValueError(f"logits must be [T, E={routing.num_experts}], got {logits_TE.shape}")
    K = routing.top_k
    if routing.method == "softmax_topk":
        probs_TE = softmax(logits_TE)
        ids_TK = _topk_ids(probs_TE, K)
        weights_TK = np.take_along_axis(probs_TE, ids_TK, axis=-1)
        if routing.norm_topk_prob:
            weights_TK = weights_TK / weights_TK.sum(-1, keepdims=True)
    elif routing.method == "topk_softmax":
        ids_TK = _topk_ids(logits_TE, K)
        weights_TK = softmax(np.take_along_axis(logits_TE, ids_TK, axis=-1))
    elif routing.method == "sigmoid_group":
        ids_TK, weights_TK = _route_sigmoid_group(logits_TE, routing, correction_bias_E)
    else:
        raise ValueError(f"unknown routing method {routing.method!r}")
    return ids_TK.astype(np.int64), weights_TK


def _route_sigmoid_group(logits_TE: np.ndarray, routing: RoutingConfig,
                         correction_bias_E: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    T, E = logits_TE.shape
    G = routing.n_group
    scores_TE = sigmoid(logits_TE)
    bias_E = np.zeros(E) if correction_bias_E is None else _f64(correction_bias_E)
    # The correction bias balances load by steering *selection*; the weights must stay the unbiased scores.
    choice_TE = scores_TE + bias_E
    grouped_TGe = choice_TE.reshape(T, G, E // G)
    group_score_TG = -np.sort(-grouped_TGe, axis=-1)[..., :2].sum(-1)
    keep_groups_TG = _topk_ids(group_score_TG, routing.topk_group)
    group_mask_TG = np.zeros((T, G), dtype=bool)
    np.put_along_axis(group_mask_TG, keep_groups_TG, True, axis=-1)
    expert_mask_TE = np.repeat(group_mask_TG, E // G, axis=-1)
    # -inf (HF v5), not 0.0 (v4): with a negative correction bias a 0.0 mask could beat a kept expert.
    masked_TE = np.where(expert_mask_TE, choice_TE, -np.inf)
    ids_TK = _topk_ids(masked_TE, routing.top_k)
    weights_TK = np.take_along_axis(scores_TE, ids_TK, axis=-1)
    if routing.norm_topk_prob:
        weights_TK = weights_TK / (weights_TK.sum(-1, keepdims=True) + 1e-20)
    return ids_TK, weights_TK * routing.routed_scaling_factor


# ---- activations -----------------------------------------------------------------------------------------------------

def _split_gate_up(gu_M2I: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    if gu_M2I.shape[-1] % 2:
        raise ValueError(f"gate_up width must be even (gate 0:I, up I:2I), got {gu_M2I.shape[-1]}")
    I = gu_M2I.shape[-1] // 2
    return gu_M2I[..., :I], gu_M2I[..., I:]


def swiglu(gu_M2I: np.ndarray) -> np.ndarray:
    """SwiGLU `silu(gate) * up` with gate in columns 0:I and up in I:2I -> [M, I]."""
    g, u = _split_gate_up(_f64(gu_M2I))
    return g * sigmoid(g) * u


def swiglu_vjp(gu_M2I: np.ndarray, dh_MI: np.ndarray) -> np.ndarray:
    """d(swiglu)/d(gu) applied to dh -> [M, 2I]; silu'(g) = sig(g)·(1 + g·(1 - sig(g)))."""
    g, u = _split_gate_up(_f64(gu_M2I))
    sg = sigmoid(g)
    dg = dh_MI * u * sg * (1.0 + g * (1.0 - sg))
    du = dh_MI * g * sg
    return np.concatenate([dg, du], axis=-1)


def swiglu_oai(gu_M2I: np.ndarray, limit: float = 7.0, alpha: float = 1.702) -> np.ndarray:
    """gpt-oss clamped SwiGLU: g = min(gate, limit), u = clip(up, ±limit), h = (u + 1)·g·sigmoid(alpha·g)."""
    gate, up = _split_gate_up(_f64(gu_M2I))
    g = np.minimum(gate, limit)
    u = np.clip(up, -limit, limit)
    return (u + 1.0) * g * sigmoid(alpha * g)


def swiglu_oai_vjp(gu_M2I: np.ndarray, dh_MI: np.ndarray, limit: float = 7.0, alpha: float = 1.702) -> np.ndarray:
    """VJP of `swiglu_oai`. Clamped entries get zero gradient; at exactly the limit the gradient passes, as
    torch.clamp's backward does (it masks with `min <= x <= max`)."""
    gate, up = _split_gate_up(_f64(gu_M2I))
    g = np.minimum(gate, limit)
    u = np.clip(up, -limit, limit)
    sa = sigmoid(alpha * g)
    dglu_dg = sa * (1.0 + alpha * g * (1.0 - sa))  # d/dg [g·sigmoid(alpha·g)]
    dgate = np.where(gate <= limit, dh_MI * (u + 1.0) * dglu_dg, 0.0)
    dup = np.where(np.abs(up) <= limit, dh_MI * g * sa, 0.0)
    return np.concatenate([dgate, dup], axis=-1)


def _activation(name: str, limit: float, alpha: float):
    """(forward, vjp) for an activation name; a clear error for anything else."""
    if name == "swiglu":
        return swiglu, swiglu_vjp
    if name == "swiglu_oai":
        return (lambda gu: swiglu_oai(gu, limit, alpha)), (lambda gu, dh: swiglu_oai_vjp(gu, dh, limit, alpha))
    raise ValueError(f"unknown activation {name!r}; expected 'swiglu' or 'swiglu_oai'")


# ---- routed experts with split LoRA ----------------------------------------------------------------------------------

@dataclass(frozen=True)
class ExpertSort:
    """The one permutation of routed rows by expert that forward and backward share.

    Row m of the flattened [T, K] routing (m = t·K + k) lands at sorted position `order_M.argsort()[m]`;
    `token_M[j]`, `slot_M[j]` say which token and slot sorted row j came from; expert e owns sorted rows
    `offsets_E1[e]:offsets_E1[e+1]` (`group_sizes_E[e]` of them, possibly zero).
    """

    order_M: np.ndarray
    token_M: np.ndarray
    slot_M: np.ndarray
    group_sizes_E: np.ndarray
    offsets_E1: np.ndarray

    def rows(self, e: int) -> slice:
        return slice(int(self.offsets_E1[e]), int(self.offsets_E1[e + 1]))


def sort_by_expert(expert_ids_TK: np.ndarray, num_experts: int) -> ExpertSort:
    """Stable sort of the T·K routed rows by expert id (rows of one expert stay in (token, slot) order)."""
    ids = np.asarray(expert_ids_TK)
    if ids.ndim != 2:
        raise ValueError(f"expert_ids must be [T, K], got shape {ids.shape}")
    flat_M = ids.reshape(-1).astype(np.int64)
    if flat_M.size and (flat_M.min() < 0 or flat_M.max() >= num_experts):
        raise ValueError(f"expert ids must lie in [0, {num_experts}), got range [{flat_M.min()}, {flat_M.max()}]")
    K = ids.shape[1]
    order_M = np.argsort(flat_M, kind="stable")
    group_sizes_E = np.bincount(flat_M, minlength=num_experts)
    offsets_E1 = np.concatenate([[0], np.cumsum(group_sizes_E)])
    return ExpertSort(order_M, order_M // K, order_M % K, group_sizes_E, offsets_E1)


def _lora(x: np.ndarray, pair: LoraPair | None, e: int, scale: float) -> tuple[np.ndarray, np.ndarray | None]:
    """(s·(x@A[e])@B[e], z = x@A[e]) for one expert, or (0, None) without LoRA."""
    if pair is None:
        return np.zeros(()), None
    z = x @ pair[0][e]
    return scale * (z @ pair[1][e]), z


def _check_args(x_TH, ids_TK, w_TK, w_gate_up_EH2I, w_down_EIH, lora_gate_up, lora_down, biases) -> None:
    check_expert_args(x_TH, ids_TK, w_TK, w_gate_up_EH2I, w_down_EIH, lora_gate_up, lora_down, biases)


def _as_f64_pair(pair):
    return None if pair is None else (_f64(pair[0]), _f64(pair[1]))


def _expert_forward(x_MH, e, w_gate_up_EH2I, w_down_EIH, lora_gate_up, lora_down, scale, biases, act):
    """One expert on its rows, keeping what the backward needs: (z1 = x@A1, gu, h, z2 = h@A2, o)."""
    delta_gu, z1_MR = _lora(x_MH, lora_gate_up, e, scale)
    gu_M2I = x_MH @ w_gate_up_EH2I[e] + delta_gu
    if biases is not None:
        gu_M2I = gu_M2I + biases[0][e]
    h_MI = act(gu_M2I)
    delta_o, z2_MR = _lora(h_MI, lora_down, e, scale)
    o_MH = h_MI @ w_down_EIH[e] + delta_o
    if biases is not None:
        o_MH = o_MH + biases[1][e]
    return z1_MR, gu_M2I, h_MI, z2_MR, o_MH


def expert_mlp(x_MH: np.ndarray, e: int, w_gate_up_EH2I: np.ndarray, w_down_EIH: np.ndarray,
               lora_gate_up: LoraPair | None = None, lora_down: LoraPair | None = None, *, scale: float = 1.0,
               biases: BiasPair | None = None, activation: ActivationName = "swiglu",
               swiglu_limit: float = 7.0, swiglu_alpha: float = 1.702) -> np.ndarray:
    """Expert `e` applied to rows x [M, H] -> [M, H]: act(x@Wgu + s(x@A)@B + bgu) @ Wd + s(h@A2)@B2 + bd."""
    act, _ = _activation(activation, swiglu_limit, swiglu_alpha)
    return _expert_forward(_f64(x_MH), e, _f64(w_gate_up_EH2I), _f64(w_down_EIH), _as_f64_pair(lora_gate_up),
                           _as_f64_pair(lora_down), scale, _as_f64_pair(biases), act)[-1]


def _prepare(x, expert_ids, expert_weights, w_gate_up, w_down, lora_gate_up, lora_down, biases):
    x_TH, w_TK = _f64(x), _f64(expert_weights)
    ids_TK = np.asarray(expert_ids).astype(np.int64)
    wgu, wd = _f64(w_gate_up), _f64(w_down)
    lgu, ld, b = _as_f64_pair(lora_gate_up), _as_f64_pair(lora_down), _as_f64_pair(biases)
    _check_args(x_TH, ids_TK, w_TK, wgu, wd, lgu, ld, b)
    return x_TH, ids_TK, w_TK, wgu, wd, lgu, ld, b


def split_lora_experts(x: np.ndarray, expert_ids: np.ndarray, expert_weights: np.ndarray, w_gate_up: np.ndarray,
                       w_down: np.ndarray, lora_gate_up: LoraPair | None = None, lora_down: LoraPair | None = None,
                       *, scale: float = 1.0, biases: BiasPair | None = None, activation: ActivationName = "swiglu",
                       swiglu_limit: float = 7.0, swiglu_alpha: float = 1.702) -> np.ndarray:
    """Routed experts with split LoRA -> y [T, H] (float64).

    y[t] = Σ_k w[t,k] · expert_{ids[t,k]}(x[t]), expert(x) = act(x@Wgu + s(x@A)@B + bgu) @ Wd + s(h@A2)@B2 + bd.
    `W + s·A@B` is never formed. Rows are sorted by expert once; per-(token, slot) outputs are weighted and summed
    over K in slot order, as HF's grouped_mm path does (order is immaterial in float64, but mirrors the real code).
    """
    x_TH, ids_TK, w_TK, wgu, wd, lgu, ld, b = _prepare(
        x, expert_ids, expert_weights, w_gate_up, w_down, lora_gate_up, lora_down, biases)
    act, _ = _activation(activation, swiglu_limit, swiglu_alpha)
    T, K = ids_TK.shape
    srt = sort_by_expert(ids_TK, wgu.shape[0])
    out_TKH = np.zeros((T, K, x_TH.shape[1]))
    for e in np.flatnonzero(srt.group_sizes_E):
        r = srt.rows(e)
        tok, slot = srt.token_M[r], srt.slot_M[r]
        out_TKH[tok, slot] = _expert_forward(x_TH[tok], e, wgu, wd, lgu, ld, scale, b, act)[-1]
    return np.einsum("tk,tkh->th", w_TK, out_TKH)


def split_lora_experts_vjp(x: np.ndarray, expert_ids: np.ndarray, expert_weights: np.ndarray, w_gate_up: np.ndarray,
                           w_down: np.ndarray, lora_gate_up: LoraPair | None = None,
                           lora_down: LoraPair | None = None, *, scale: float = 1.0,
                           biases: BiasPair | None = None, activation: ActivationName = "swiglu",
                           swiglu_limit: float = 7.0, swiglu_alpha: float = 1.702,
                           dy: np.ndarray) -> dict[str, object]:
    """Analytic gradients of `sum(split_lora_experts(...) * dy)` with respect to every input.

    Returns {"x": [T,H], "expert_weights": [T,K], "lora_gate_up": (dA [E,H,R], dB [E,R,2I]) | None,
    "lora_down": (dA [E,I,R], dB [E,R,H]) | None, "w_gate_up": [E,H,2I], "w_down": [E,I,H],
    "biases": (db_gate_up [E,2I], db_down [E,H]) | None}. Per sorted row (token t, slot k, expert e):
    do = w·dy[t]; dw[t,k] = <o, dy[t]>; dh = do@Wd^T + s(do@B2^T)@A2^T; dgu = act'(gu)·dh;
    dx[t] += dgu@Wgu^T + s(dgu@B1^T)@A1^T; weight-shaped grads are per-expert sums over that expert's rows.
    `w_gate_up` / `w_down` grads are returned for checking only: training never computes them (frozen base).
    """
    x_TH, ids_TK, w_TK, wgu, wd, lgu, ld, b = _prepare(
        x, expert_ids, expert_weights, w_gate_up, w_down, lora_gate_up, lora_down, biases)
    dy_TH = _f64(dy)
    if dy_TH.shape != x_TH.shape:
        raise ValueError(f"dy must match y [T, H]={x_TH.shape}, got {dy_TH.shape}")
    act, act_vjp = _activation(activation, swiglu_limit, swiglu_alpha)
    srt = sort_by_expert(ids_TK, wgu.shape[0])

    dx_TH, dw_TK = np.zeros_like(x_TH), np.zeros_like(w_TK)
    dwgu, dwd = np.zeros_like(wgu), np.zeros_like(wd)
    dlgu = None if lgu is None else (np.zeros_like(lgu[0]), np.zeros_like(lgu[1]))
    dld = None if ld is None else (np.zeros_like(ld[0]), np.zeros_like(ld[1]))
    db = None if b is None else (np.zeros_like(b[0]), np.zeros_like(b[1]))

    for e in np.flatnonzero(srt.group_sizes_E):
        r = srt.rows(e)
        tok, slot = srt.token_M[r], srt.slot_M[r]
        x_MH, dy_MH = x_TH[tok], dy_TH[tok]
        z1_MR, gu_M2I, h_MI, z2_MR, o_MH = _expert_forward(x_MH, e, wgu, wd, lgu, ld, scale, b, act)
        dw_TK[tok, slot] = np.einsum("mh,mh->m", o_MH, dy_MH)
        do_MH = w_TK[tok, slot][:, None] * dy_MH
        # down projection: base weight grad (for checks), LoRA grads, and dh through W and through B then A
        dwd[e] = h_MI.T @ do_MH
        dh_MI = do_MH @ wd[e].T
        if ld is not None:
            dz2_MR = scale * (do_MH @ ld[1][e].T)
            dld[1][e] = scale * (z2_MR.T @ do_MH)
            dld[0][e] = h_MI.T @ dz2_MR
            dh_MI = dh_MI + dz2_MR @ ld[0][e].T
        dgu_M2I = act_vjp(gu_M2I, dh_MI)
        # gate_up projection, the same pattern one layer down
        dwgu[e] = x_MH.T @ dgu_M2I
        dx_MH = dgu_M2I @ wgu[e].T
        if lgu is not None:
            dz1_MR = scale * (dgu_M2I @ lgu[1][e].T)
            dlgu[1][e] = scale * (z1_MR.T @ dgu_M2I)
            dlgu[0][e] = x_MH.T @ dz1_MR
            dx_MH = dx_MH + dz1_MR @ lgu[0][e].T
        if db is not None:
            db[0][e] = dgu_M2I.sum(0)
            db[1][e] = do_MH.sum(0)
        # a token routed to the same expert twice is impossible (top-K ids are distinct), but several slots of one
        # token land in different experts' loops, so accumulate with add.at rather than assignment
        np.add.at(dx_TH, tok, dx_MH)

    return {"x": dx_TH, "expert_weights": dw_TK, "lora_gate_up": dlgu, "lora_down": dld,
            "w_gate_up": dwgu, "w_down": dwd, "biases": db}


# ---- one MoE layer ---------------------------------------------------------------------------------------------------

def dense_mlp(x_TH: np.ndarray, w_gate_HI: np.ndarray, w_up_HI: np.ndarray, w_down_IH: np.ndarray,
              lora: Mapping[str, LoraPair] | None = None, scale: float = 1.0) -> np.ndarray:
    """SwiGLU MLP `down(silu(gate(x)) * up(x))` with [in, out] weights (shared experts, dense layers).

    `lora` maps "gate_proj"/"up_proj"/"down_proj" to an optional (A [in, R], B [R, out]) pair.
    """
    lora = lora or {}

    def lin(v, w, name):
        out = v @ _f64(w)
        if name in lora:
            a, b = lora[name]
            out = out + scale * (v @ _f64(a)) @ _f64(b)
        return out

    x_TH = _f64(x_TH)
    g, u = lin(x_TH, w_gate_HI, "gate_proj"), lin(x_TH, w_up_HI, "up_proj")
    return lin(g * sigmoid(g) * u, w_down_IH, "down_proj")


_LAYER_PREFIX = re.compile(r"^(model\.)?layers\.\d+\.")


def _strip_layer(tensors: Mapping[str, np.ndarray] | None) -> dict[str, np.ndarray]:
    """Accept keys with or without the `layers.{l}.` prefix (callers pass `CheckpointTensors.layer(l)` or slices)."""
    return {} if tensors is None else {_LAYER_PREFIX.sub("", k): v for k, v in tensors.items()}


def moe_block(x_TH: np.ndarray, layer: Mapping[str, np.ndarray], cfg: ModelConfig,
              lora: Mapping[str, np.ndarray] | None = None, scale: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """One MoE block on normed hidden states x [T, H] -> (y [T, H], router_logits [T, E]), float64.

    Canonical names (docs/CONTRACTS.md): `mlp.router.weight` [H, E], `mlp.router.bias` [E] (gpt-oss),
    `mlp.router.e_score_correction_bias` [E] (DeepSeek/GLM), `mlp.experts.{gate_up_proj, down_proj}` and their
    `_bias` (gpt-oss), `mlp.shared_experts.{gate,up,down}_proj.weight` [in, out]. LoRA names:
    `mlp.experts.{gate_up_proj,down_proj}.lora_{A,B}` and, for shared experts, `mlp.shared_experts.*.lora_{A,B}`.
    """
    t = _strip_layer(layer)
    lo = _strip_layer(lora)
    x_TH = _f64(x_TH)
    logits_TE = router_logits(x_TH, t["mlp.router.weight"], t.get("mlp.router.bias") if cfg.router_bias else None)
    ids_TK, weights_TK = route(logits_TE, cfg.routing, t.get("mlp.router.e_score_correction_bias"))

    def pair(prefix: str) -> LoraPair | None:
        a, b = lo.get(prefix + ".lora_A"), lo.get(prefix + ".lora_B")
        if (a is None) != (b is None):
            raise ValueError(f"LoRA for {prefix} has only one of lora_A / lora_B")
        return None if a is None else (a, b)

    biases = None
    if cfg.expert_bias:
        biases = (t["mlp.experts.gate_up_proj_bias"], t["mlp.experts.down_proj_bias"])
    y_TH = split_lora_experts(
        x_TH, ids_TK, weights_TK, t["mlp.experts.gate_up_proj"], t["mlp.experts.down_proj"],
        pair("mlp.experts.gate_up_proj"), pair("mlp.experts.down_proj"), scale=scale, biases=biases,
        activation=cfg.activation, swiglu_limit=cfg.swiglu_limit, swiglu_alpha=cfg.swiglu_alpha)
    if cfg.n_shared_experts:
        names = ("gate_proj", "up_proj", "down_proj")
        shared_lora = {n: p for n in names if (p := pair(f"mlp.shared_experts.{n}")) is not None}
        y_TH = y_TH + dense_mlp(x_TH, *(t[f"mlp.shared_experts.{n}.weight"] for n in names),
                                lora=shared_lora, scale=scale)
    return y_TH, logits_TE


# ---- auxiliary loss --------------------------------------------------------------------------------------------------

def load_balancing_loss(router_logits_per_layer: Sequence[np.ndarray], top_k: int, num_experts: int,
                        attention_mask: np.ndarray | None = None) -> float:
    """HF's `load_balancing_loss_func` (Switch Transformer eqs. 4-6), pooled over all MoE layers.

    For every layer: p = softmax(logits) over all E (also for gpt-oss, whose router softmaxes only the top-K);
    the top-K ids of p. Then f_e = (top-K assignments to e over layers and tokens) / (L·T) (so Σ f = K) and
    P_e = Σ p_e / (L·T), and the loss is E · Σ_e f_e · P_e: a product of pooled averages, not a per-layer mean.
    With attention_mask ([B, S], rows of the logits are B·S tokens) every count and probability is weighted by the
    mask and L·T becomes L·Σ mask.
    """
    if not router_logits_per_layer:
        return 0.0
    counts_E, prob_sum_E, rows = np.zeros(num_experts), np.zeros(num_experts), 0.0
    mask_T = None if attention_mask is None else np.asarray(attention_mask, dtype=np.float64).reshape(-1)
    for logits in router_logits_per_layer:
        probs_TE = softmax(_f64(logits))
        ids_TK = _topk_ids(probs_TE, top_k)
        m_T = np.ones(probs_TE.shape[0]) if mask_T is None else mask_T
        if m_T.shape[0] != probs_TE.shape[0]:
            raise ValueError(f"attention_mask has {m_T.shape[0]} tokens, router logits {probs_TE.shape[0]}")
        np.add.at(counts_E, ids_TK.reshape(-1), np.repeat(m_T, top_k))
        prob_sum_E += (probs_TE * m_T[:, None]).sum(0)
        rows += m_T.sum()
    return float(num_experts * np.sum((counts_E / rows) * (prob_sum_E / rows)))
