"""Routed mixture-of-experts with split LoRA: router -> route -> sort by expert -> experts -> weighted sum over K.

Shapes: T tokens, H hidden, I expert intermediate, E experts, K experts per token, R LoRA rank, M = T·K routed rows.

- `route`: router logits [T, E] -> (expert_ids [T, K], expert_weights [T, K]) for the three routing methods of
  `shared_math.config.RoutingConfig`, rounding where HF rounds.
- `sort_by_expert`: the one stable permutation of the M routed rows by expert, and `group_sizes_E`, that the base
  and LoRA GEMMs, forward and backward, all share.
- `split_lora_experts`: `Σ_k w[t,k]·expert_{ids[t,k]}(x[t])` with expert(x) = act(x·Wgu + s·(x·A1)·B1) · Wd +
  s·(h·A2)·B2, on routed rows only (`W + s·B·A` is never formed). Per-row outputs are weighted, un-permuted and
  summed over K in fp32 with a single rounding, as HF's grouped_mm path does.
- `Router`, `Experts`, `MoEBlock`: the Flax NNX modules (module paths equal the canonical tensor names).

Both permutations (rows into expert order, and back) are gathers whose backward is the inverse gather: no
scatter-add anywhere in the sort, as in MaxText's `_sort_activations`.
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
from flax import nnx

from jax_impl.backends import get_backend, resolve_backend
from jax_impl.backends.common import ExpertSort
from jax_impl.lora import Frozen
from shared_math.config import RoutingConfig
from shared_math.shapes import check_expert_args, check_lora_scale

_F32 = jnp.float32
LoraPair = tuple[jax.Array, jax.Array]


# ---- routing ---------------------------------------------------------------------------------------------------------

def route(logits: jax.Array, routing: RoutingConfig,
          correction_bias: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
    """Router logits [T, E] -> (expert_ids [T, K] int32, expert_weights [T, K]); slots in descending score order.

    softmax_topk  (Qwen3-MoE): softmax over E in fp32, top-K, renormalise iff norm_topk_prob, cast to logits dtype.
    topk_softmax  (gpt-oss):   top-K of the logits, softmax over those K (in fp32, cast to logits dtype).
    sigmoid_group (DeepSeek-V3, GLM-4.x): sigmoid in fp32, bias-corrected group-limited top-K for selection, unbiased
                  weights, optional renormalise, times routed_scaling_factor; weights stay fp32 as in HF.
    Ties go to the lower expert index (lax.top_k is stable).
    """
    ids_TK, weights_TK, _ = _route(logits, routing, correction_bias)
    return ids_TK, weights_TK


def _route(logits: jax.Array, routing: RoutingConfig, correction_bias: jax.Array | None = None
           ) -> tuple[jax.Array, jax.Array, jax.Array | None]:
    """`route`, plus the groups kept per token (bool [T, G]) for sigmoid_group routing (None for the others), which
    the routing statistics count."""
    K = routing.top_k
    if logits.shape[-1] != routing.num_experts:
        raise ValueError(f"router logits must be [T, E={routing.num_experts}], got {logits.shape}")
    if routing.method == "softmax_topk":
        probs_TE = jax.nn.softmax(logits.astype(_F32), axis=-1)
        weights_TK, ids_TK = jax.lax.top_k(probs_TE, K)
        if routing.norm_topk_prob:
            weights_TK = weights_TK / weights_TK.sum(-1, keepdims=True)
        return ids_TK, weights_TK.astype(logits.dtype), None
    if routing.method == "topk_softmax":
        top_TK, ids_TK = jax.lax.top_k(logits, K)
        return ids_TK, jax.nn.softmax(top_TK.astype(_F32), axis=-1).astype(logits.dtype), None
    if routing.method == "sigmoid_group":
        return _route_sigmoid_group(logits, routing, correction_bias)
    raise ValueError(f"unknown routing method {routing.method!r}")


def _route_sigmoid_group(logits_TE, routing: RoutingConfig, correction_bias_E):
    T, E = logits_TE.shape
    G = routing.n_group
    scores_TE = jax.nn.sigmoid(logits_TE.astype(_F32))
    # the correction bias steers selection only; the weights are the unbiased scores
    choice_TE = scores_TE if correction_bias_E is None else scores_TE + correction_bias_E.astype(_F32)
    choice_TE = jax.lax.stop_gradient(choice_TE)
    group_score_TG = jax.lax.top_k(choice_TE.reshape(T, G, E // G), 2)[0].sum(-1)
    _, keep_TG = jax.lax.top_k(group_score_TG, routing.topk_group)
    group_mask_TG = jnp.zeros((T, G), bool).at[jnp.arange(T)[:, None], keep_TG].set(True)
    masked_TE = jnp.where(jnp.repeat(group_mask_TG, E // G, axis=-1), choice_TE, -jnp.inf)
    _, ids_TK = jax.lax.top_k(masked_TE, routing.top_k)
    weights_TK = jnp.take_along_axis(scores_TE, ids_TK, axis=-1)
    if routing.norm_topk_prob:
        weights_TK = weights_TK / (weights_TK.sum(-1, keepdims=True) + 1e-20)
    return ids_TK, weights_TK * routing.routed_scaling_factor, group_mask_TG


def forward_routing_stats(logits_TE: jax.Array, expert_ids_TK: jax.Array, routing: RoutingConfig, *,
                          group_mask_TG: jax.Array | None = None, token_mask_T: jax.Array | None = None
                          ) -> dict[str, jax.Array]:
    """One forward pass's routing statistics of one MoE layer (`shared_math.routing_stats` defines them), without
    gradient: {"load" [E] int32, "tokens" [] int32, "entropy_sum" [] fp32, "aux_loss_sum" [] fp32 (softmax-routed
    families), "groups" [G] int32 (sigmoid_group)}. Mirrors torch_impl.moe.forward_routing_stats.

    `group_mask_TG`: the groups `_route` kept (sigmoid_group); `token_mask_T`: 1 for the tokens to count, 0 for
    padding. The distribution is formed in fp32 through log-softmax (of the logits, or of log-sigmoid for the
    normalised sigmoid scores), so that p·ln p never meets ln 0."""
    logits = jax.lax.stop_gradient(logits_TE).astype(_F32)
    T, E = logits.shape
    K = expert_ids_TK.shape[1]
    if routing.method == "sigmoid_group":
        log_s_TE = jax.nn.log_sigmoid(logits)
        logp_TE = log_s_TE - jax.nn.logsumexp(log_s_TE, axis=-1, keepdims=True)
    else:
        logp_TE = jax.nn.log_softmax(logits, axis=-1)
    p_TE = jnp.exp(logp_TE)
    entropy_T = -(p_TE * logp_TE).sum(-1)
    if token_mask_T is None:
        m_T = jnp.ones((T,), jnp.int32)
    else:
        if token_mask_T.size != T:
            raise ValueError(f"token mask has {token_mask_T.size} entries for {T} tokens")
        m_T = (token_mask_T.reshape(-1) != 0).astype(jnp.int32)
    load_E = jnp.zeros((E,), jnp.int32).at[expert_ids_TK.reshape(-1)].add(jnp.repeat(m_T, K))
    tokens = m_T.sum()
    m_f_T = m_T.astype(_F32)
    stats = {"load": load_E, "tokens": tokens, "entropy_sum": (entropy_T * m_f_T).sum()}
    if routing.method != "sigmoid_group":  # the families with HF's load-balancing loss
        n = jnp.maximum(tokens, 1).astype(_F32)
        stats["aux_loss_sum"] = E * (load_E.astype(_F32) * (p_TE * m_f_T[:, None]).sum(0)).sum() / (n * n)
    if group_mask_TG is not None:
        stats["groups"] = (group_mask_TG.astype(jnp.int32) * m_T[:, None]).sum(0)
    return stats


# ---- the shared permutation ------------------------------------------------------------------------------------------

def sort_by_expert(expert_ids: jax.Array, num_experts: int, *, check: bool = True) -> ExpertSort:
    """Stable sort of the T·K routed rows by expert id (rows of one expert stay in (token, slot) order).

    `check=True` rejects ids outside [0, E) when they are concrete (outside jit); route() cannot produce those.
    """
    if expert_ids.ndim != 2:
        raise ValueError(f"expert_ids must be [T, K], got shape {expert_ids.shape}")
    check_ids_dtype(expert_ids)
    T, K = expert_ids.shape
    flat_M = expert_ids.reshape(-1).astype(jnp.int32)
    if check:
        check_expert_ids(flat_M, num_experts)
    order_M = jnp.argsort(flat_M, stable=True).astype(jnp.int32)
    M = flat_M.shape[0]
    # inverse permutation by a scatter of distinct indices (a set, not an add)
    inverse_M = jnp.zeros((M,), jnp.int32).at[order_M].set(jnp.arange(M, dtype=jnp.int32), unique_indices=True)
    expert_M = flat_M[order_M]
    # group boundaries by binary search in the sorted ids: no scatter-add (bincount) anywhere in the sort
    offsets_E = jnp.searchsorted(expert_M, jnp.arange(1, num_experts + 1, dtype=jnp.int32), side="left")
    offsets_E = offsets_E.astype(jnp.int32)
    group_sizes_E = jnp.diff(offsets_E, prepend=0).astype(jnp.int32)
    return ExpertSort(order_M, inverse_M, order_M // K, order_M % K, expert_M, group_sizes_E, offsets_E, T, K)


def check_ids_dtype(expert_ids: jax.Array) -> None:
    """Raise ValueError unless expert_ids has an integer dtype (trace-time metadata): float ids would be truncated to
    other experts and bool ids read as experts 0 and 1, silently."""
    if not jnp.issubdtype(expert_ids.dtype, jnp.integer):
        raise ValueError(f"expert_ids must be an integer array (a router's top-k indices), got {expert_ids.dtype}")


def check_expert_ids(expert_ids: jax.Array, num_experts: int) -> None:
    """Raise ValueError unless every expert id lies in [0, num_experts), when the ids are concrete (outside jit;
    under jit there are no values to read, and route() cannot produce such ids)."""
    if not expert_ids.size:
        return
    try:
        lo, hi = int(expert_ids.min()), int(expert_ids.max())
    except jax.errors.ConcretizationTypeError:  # traced (under jit): no values to check
        return
    if lo < 0 or hi >= num_experts:
        raise ValueError(f"expert ids must lie in [0, {num_experts}), got range [{lo}, {hi}]")


def _poison_out_of_range(expert_ids: jax.Array, expert_weights: jax.Array, num_experts: int) -> jax.Array:
    """expert_weights with NaN in every slot of a token that has an id outside [0, num_experts), for traced ids
    (concrete ones were checked): its output row is then NaN, not other experts' rows. An elementwise pass over
    [T, K]; concrete ids return the weights as they are."""
    if not isinstance(expert_ids, jax.core.Tracer):
        return expert_weights
    bad_T1 = ((expert_ids < 0) | (expert_ids >= num_experts)).any(axis=-1, keepdims=True)
    return jnp.where(bad_T1, jnp.asarray(jnp.nan, expert_weights.dtype), expert_weights)


@jax.custom_vjp
def permute_rows(x_MD: jax.Array, perm_M: jax.Array, inverse_M: jax.Array) -> jax.Array:
    """`x[perm]` for a permutation `perm` whose inverse is `inverse_M`; the backward is the gather `ct[inverse]`."""
    return jnp.take(x_MD, perm_M, axis=0, unique_indices=True)


def _permute_fwd(x_MD, perm_M, inverse_M):
    return permute_rows(x_MD, perm_M, inverse_M), (perm_M, inverse_M)


def _permute_bwd(res, ct_MD):
    perm_M, inverse_M = res
    return jnp.take(ct_MD, inverse_M, axis=0, unique_indices=True), None, None


permute_rows.defvjp(_permute_fwd, _permute_bwd)


# ---- routed experts --------------------------------------------------------------------------------------------------

def _check(x, expert_ids, expert_weights, w_gate_up, w_down, lora_gate_up, lora_down, biases) -> None:
    check_expert_args(x, expert_ids, expert_weights, w_gate_up, w_down, lora_gate_up, lora_down, biases)
    # dtypes (trace-time metadata): an integer x would run integer GEMMs (a silent all-zero int y)
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise ValueError(f"x must be a floating-point array (bf16, fp16 or fp32), got {x.dtype}")
    check_ids_dtype(expert_ids)


def split_lora_experts(x: jax.Array, expert_ids: jax.Array, expert_weights: jax.Array, w_gate_up: jax.Array,
                       w_down: jax.Array, lora_gate_up: LoraPair | None = None, lora_down: LoraPair | None = None,
                       *, scale: float = 1.0, biases: tuple[jax.Array, jax.Array] | None = None,
                       activation: str = "swiglu", swiglu_limit: float = 7.0, swiglu_alpha: float = 1.702,
                       backend: str = "auto", sort: ExpertSort | None = None,
                       check_ids: bool = True) -> jax.Array:
    """Routed experts with split LoRA -> y [T, H] in x's dtype (same semantics as shared_math.reference).

    x [T, H]; expert_ids, expert_weights [T, K]; w_gate_up [E, H, 2I] (gate 0:I, up I:2I); w_down [E, I, H];
    LoRA pairs (A [E, in, R], B [E, R, out]) or None; biases (b_gate_up [E, 2I], b_down [E, H]) or None.
    Differentiable in x, expert_weights, the LoRA factors, and (when differentiated) weights and biases.
    `sort`: a precomputed `sort_by_expert(expert_ids, E)` to reuse.
    `check_ids` (as torch_impl's): ids outside [0, E) raise ValueError when they are concrete; under jit, where
    there are no values to read, the rows of a token with such an id come out NaN (its routing weights are
    poisoned), where they would silently hold other experts' rows. `Experts` passes False: a router's ids are in
    range by construction.
    """
    _check(x, expert_ids, expert_weights, w_gate_up, w_down, lora_gate_up, lora_down, biases)
    scale = check_lora_scale(scale)
    if check_ids:
        check_expert_ids(expert_ids, w_gate_up.shape[0])
        expert_weights = _poison_out_of_range(expert_ids, expert_weights, w_gate_up.shape[0])
    resolved = resolve_backend(backend)
    if resolved in ("pallas", "pallas_triton", "pallas_mosaic"):
        # the fused entry gathers x, weights the rows and un-permutes inside its kernels, where the generic path
        # below builds the [M, H] x[perm] copy and does the weighting outside (benchmarks/REPORT.md times the fused
        # entry). It sorts by itself, so `sort` is not used on this path (the ids' range was checked above)
        import importlib

        fused = importlib.import_module(f"jax_impl.backends.{resolved}").split_lora_experts

        return fused(x, expert_ids, expert_weights, w_gate_up, w_down, lora_gate_up, lora_down, scale=scale,
                     biases=biases, activation=activation, swiglu_limit=swiglu_limit, swiglu_alpha=swiglu_alpha)
    expert_mlp_sorted = get_backend(resolved)
    T, H = x.shape
    K = expert_ids.shape[1]
    srt = sort_by_expert(expert_ids, w_gate_up.shape[0], check=False) if sort is None else sort
    # repeat (backward: a reshape-sum over K), then permute (backward: the inverse gather)
    x_sorted_MH = permute_rows(jnp.repeat(x, K, axis=0), srt.order_M, srt.inverse_M)
    out_sorted_MH = expert_mlp_sorted(
        x_sorted_MH, srt.group_sizes_E, srt.expert_M, w_gate_up, w_down,
        None if lora_gate_up is None else tuple(lora_gate_up), None if lora_down is None else tuple(lora_down),
        None if biases is None else tuple(biases), float(scale), activation, float(swiglu_limit),
        float(swiglu_alpha))
    w_sorted_M1 = permute_rows(expert_weights.reshape(T * K, 1), srt.order_M, srt.inverse_M)
    # HF grouped path: weight each row in the promoted dtype, restore (token, slot) order, sum over K in fp32, round
    weighted_MH = out_sorted_MH * w_sorted_M1
    out_TKH = permute_rows(weighted_MH, srt.inverse_M, srt.order_M).reshape(T, K, H)
    return out_TKH.sum(axis=1, dtype=_F32).astype(x.dtype)


# ---- modules ---------------------------------------------------------------------------------------------------------

def _var(value: jax.Array | None, trainable: bool) -> nnx.Variable | None:
    if value is None:
        return None
    return nnx.Param(value) if trainable else Frozen(value)


class Router(nnx.Module):
    """Router linear `logits = x·W (+ b)` in the activation dtype, W [H, E]; frozen unless `trainable`."""

    def __init__(self, weight_HE: jax.Array, bias_E: jax.Array | None = None,
                 e_score_correction_bias_E: jax.Array | None = None, *, trainable: bool = False):
        self.weight = _var(weight_HE, trainable)
        self.bias = _var(bias_E, trainable)
        self.e_score_correction_bias = _var(e_score_correction_bias_E, False)  # a buffer in HF, never trained

    def __call__(self, x_TH: jax.Array) -> jax.Array:
        w = self.weight[...]
        # DeepSeek/GLM keep the router in fp32 (HF `_keep_in_fp32_modules_strict`): compute in the wider dtype
        cd = jnp.promote_types(x_TH.dtype, w.dtype)
        logits_TE = jnp.einsum("th,he->te", x_TH.astype(cd), w.astype(cd), preferred_element_type=_F32)
        if self.bias is not None:
            logits_TE = logits_TE + self.bias[...].astype(_F32)
        return logits_TE.astype(cd)


class Experts(nnx.Module):
    """E expert MLPs with optional split LoRA on the fused gate_up and on down (canonical `mlp.experts.*`).

    Base weights are `Frozen` (never differentiated by nnx.grad); LoRA factors are `nnx.LoRAParam`, set by
    `jax_impl.lora.attach_lora`, with `lora_scale` = alpha/R (or alpha/sqrt(R)), and `gate_up_lora_scale` where
    gate_up's differs (per-target alpha/rank; each pair may have its own R).

    `token_chunk`: None, or a number of tokens: calls with more tokens run `tiled_experts.tiled_split_lora_experts`
    (chunk by chunk, recomputed chunk by chunk in the backward; set for a whole model with `CausalLM.tile_experts`);
    on a mesh without an expert axis, each device's tokens (`parallel.split_lora_experts_sharded(chunk=)`).
    """

    def __init__(self, gate_up_proj: jax.Array, down_proj: jax.Array, gate_up_proj_bias: jax.Array | None = None,
                 down_proj_bias: jax.Array | None = None, *, activation: str = "swiglu", swiglu_limit: float = 7.0,
                 swiglu_alpha: float = 1.702, backend: str = "auto"):
        self.gate_up_proj = Frozen(gate_up_proj)
        self.down_proj = Frozen(down_proj)
        self.gate_up_proj_bias = _var(gate_up_proj_bias, False)
        self.down_proj_bias = _var(down_proj_bias, False)
        # nnx.data: empty LoRA slots that attach_lora fills with arrays (None alone would be a static attribute)
        self.gate_up_lora_A, self.gate_up_lora_B = nnx.data(None), nnx.data(None)
        self.down_lora_A, self.down_lora_B = nnx.data(None), nnx.data(None)
        self.lora_scale = 1.0
        self.gate_up_lora_scale: float | None = None  # None: lora_scale (per-target alpha/rank can make them differ)
        self.activation, self.swiglu_limit, self.swiglu_alpha = activation, float(swiglu_limit), float(swiglu_alpha)
        self.backend = resolve_backend(backend)
        # static: None on one device; jax_impl.parallel.shard_model sets its mesh dispatch (same arguments)
        self.expert_parallel = None
        self.token_chunk: int | None = None  # static (a Python int): a new value retraces

    @property
    def num_experts(self) -> int:
        return self.gate_up_proj.shape[0]

    def __call__(self, x_TH: jax.Array, expert_ids_TK: jax.Array, expert_weights_TK: jax.Array) -> jax.Array:
        def pair(a, b):
            return None if a is None else (a[...], b[...])

        biases = None
        if self.gate_up_proj_bias is not None:
            biases = (self.gate_up_proj_bias[...], self.down_proj_bias[...])
        lora_gate_up = pair(self.gate_up_lora_A, self.gate_up_lora_B)
        s_gu = self.gate_up_lora_scale
        if lora_gate_up is not None and s_gu is not None and s_gu != self.lora_scale:
            # the backends take one LoRA scale: fold gate_up's own into its B here, where autodiff sees it (B is
            # small, [E, R, 2I]), so values and gradients are those of scale s_gu
            lora_gate_up = (lora_gate_up[0], lora_gate_up[1] * (s_gu / self.lora_scale))
        run = split_lora_experts if self.expert_parallel is None else self.expert_parallel
        if self.token_chunk is not None and self.expert_parallel is not None:
            # on a mesh each device tiles its own tokens (jax_impl.parallel.split_lora_experts_sharded)
            run = partial(self.expert_parallel, chunk=self.token_chunk)
        elif self.token_chunk is not None and x_TH.shape[0] > self.token_chunk:
            from jax_impl.tiled_experts import tiled_split_lora_experts  # here: it imports this module

            run = partial(tiled_split_lora_experts, chunk=self.token_chunk)
        return run(
            x_TH, expert_ids_TK, expert_weights_TK, self.gate_up_proj[...], self.down_proj[...],
            lora_gate_up, pair(self.down_lora_A, self.down_lora_B),
            scale=self.lora_scale, biases=biases, activation=self.activation, swiglu_limit=self.swiglu_limit,
            swiglu_alpha=self.swiglu_alpha, backend=self.backend,
            # a router's ids are in range: no check (the sharded dispatch has no such option)
            **({} if self.expert_parallel is not None else {"check_ids": False}))


class RoutingStats(nnx.Variable):
    """Routing analytics state of one MoE block (`jax_impl.routing_stats`): the statistics of its last forward (a
    dict of arrays, `forward_routing_stats`), or the token mask that the next forwards count by. Never trained."""


class MoEBlock(nnx.Module):
    """One MoE layer: `router` -> `route` -> `experts` (canonical `mlp.router.*`, `mlp.experts.*`), plus
    `shared_experts` (DeepSeek-V3/GLM: a SwiGLU `DenseMLP` on every token, added to the routed output) when given.

    Returns (y [T, H], router_logits [T, E]); the logits feed the auxiliary loss.
    """

    def __init__(self, router: Router, experts: Experts, routing: RoutingConfig,
                 shared_experts: nnx.Module | None = None):
        self.router = router
        self.experts = experts
        self.routing = routing
        self.shared_experts = shared_experts
        # routing analytics (jax_impl.routing_stats switches them on): a RoutingStats variable that each forward
        # overwrites with its statistics, returned by a jitted step as part of its outputs; `routing_token_mask`, a
        # RoutingStats holding [T], excludes padding from them
        self.routing_stats = nnx.data(None)
        self.routing_token_mask = nnx.data(None)

    def __call__(self, x_TH: jax.Array) -> tuple[jax.Array, jax.Array]:
        logits_TE = self.router(x_TH)
        corr = self.router.e_score_correction_bias
        ids_TK, weights_TK, group_mask_TG = _route(logits_TE, self.routing, None if corr is None else corr[...])
        if self.routing_stats is not None:
            mask = None if self.routing_token_mask is None else self.routing_token_mask.get_value()
            self.routing_stats.set_value(forward_routing_stats(logits_TE, ids_TK, self.routing,
                                                               group_mask_TG=group_mask_TG, token_mask_T=mask))
        # (ids come from route, so sort_by_expert's range check would be redundant; it is skipped under jit anyway)
        y_TH = self.experts(x_TH, ids_TK, weights_TK)
        if self.shared_experts is not None:
            y_TH = y_TH + self.shared_experts(x_TH)
        return y_TH, logits_TE
