"""The MoE block: router -> routing -> expert-sorted rows -> routed experts with split LoRA -> weighted sum over K.

Shape legend: T tokens · H hidden · I expert intermediate · E experts · K experts per token · R LoRA rank ·
M = T·K routed rows. Expert weights are canonical, applied as x @ W: `w_gate_up [E, H, 2I]` (gate in columns 0:I,
up in I:2I) and `w_down [E, I, H]`; expert LoRA pairs are `(A [E, in, R], B [E, R, out])`; the router weight is
`[H, E]`.

Split LoRA: every expert computes `x·W + s·(x·A)·B` on its routed rows only; `W + s·B·A` is never formed. The rows
are sorted by expert once per layer (`sort_by_expert`), and the base GEMMs, the LoRA GEMMs and the backward share
that permutation and its group sizes. The backend (`torch_impl.backends`) does the GEMMs. Under torch.compile (or
with `use_custom_op(True)`), `Experts` calls the same path as the custom op `splitmoe::split_lora_experts`
(`torch_impl.moe_op`), which hides the data-dependent group sizes from Dynamo.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from shared_math.config import RoutingConfig
from shared_math.shapes import check_expert_args, check_lora_scale
from torch_impl.backends import get_backend, resolve_backend
from torch_impl.backends.common import Activation, ExpertSort
from torch_impl.models.layers import DenseMLP, in_layer_recompute
from torch_impl.moe_op import custom_op_active, split_lora_experts_op, use_custom_op

LoraPair = tuple[torch.Tensor, torch.Tensor]

__all__ = ["ExpertSort", "Experts", "MoEBlock", "Router", "forward_routing_stats", "route", "sort_by_expert",
           "split_lora_experts", "use_custom_op"]


# ---- routing ---------------------------------------------------------------------------------------------------------

def route(logits: torch.Tensor, routing: RoutingConfig,
          correction_bias: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Router logits [T, E] -> (expert_ids [T, K] int64, expert_weights [T, K]), with HF's dtypes and rounding.

    softmax_topk  (Qwen3-MoE): softmax over E in fp32, top-K, renormalise (fp32) iff norm_topk_prob, cast to the
                  logits' dtype.
    topk_softmax  (gpt-oss): top-K of the logits, softmax over those K in the logits' dtype.
    sigmoid_group (DeepSeek-V3, GLM-4.x): fp32 sigmoid; `+ correction_bias` for selection only; group score = sum of
                  the top-2 per group; keep `topk_group` groups (others -inf); top-K; weights from the unbiased
                  scores, renormalised (+1e-20) iff norm_topk_prob, times routed_scaling_factor; stays fp32.
    """
    ids_TK, weights_TK, _ = _route(logits, routing, correction_bias)
    return ids_TK, weights_TK


def _route(logits: torch.Tensor, routing: RoutingConfig, correction_bias: torch.Tensor | None = None
           ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """`route`, plus the groups kept per token (bool [T, G]) for sigmoid_group routing (None for the others), which
    the routing statistics count."""
    if logits.ndim != 2 or logits.shape[1] != routing.num_experts:
        raise ValueError(f"router logits must be [T, E={routing.num_experts}], got {tuple(logits.shape)}")
    K = routing.top_k
    if routing.method == "softmax_topk":
        probs_TE = F.softmax(logits, dim=-1, dtype=torch.float32)
        weights_TK, ids_TK = torch.topk(probs_TE, K, dim=-1)
        if routing.norm_topk_prob:
            weights_TK = weights_TK / weights_TK.sum(dim=-1, keepdim=True)
        return ids_TK, weights_TK.to(logits.dtype), None
    if routing.method == "topk_softmax":
        top_TK, ids_TK = torch.topk(logits, K, dim=-1)
        return ids_TK, F.softmax(top_TK, dim=-1, dtype=top_TK.dtype), None
    if routing.method == "sigmoid_group":
        T, E = logits.shape
        G = routing.n_group
        scores_TE = torch.sigmoid(logits.float())
        choice_TE = scores_TE if correction_bias is None else scores_TE + correction_bias.float()
        group_TG = choice_TE.view(T, G, E // G).topk(2, dim=-1)[0].sum(dim=-1)
        keep_TG = torch.topk(group_TG, routing.topk_group, dim=-1, sorted=False)[1]
        mask_TG = torch.zeros_like(group_TG, dtype=torch.bool).scatter_(1, keep_TG, True)
        mask_TE = mask_TG.unsqueeze(-1).expand(T, G, E // G).reshape(T, E)
        ids_TK = torch.topk(choice_TE.masked_fill(~mask_TE, float("-inf")), K, dim=-1, sorted=False)[1]
        weights_TK = scores_TE.gather(1, ids_TK)
        if routing.norm_topk_prob:
            weights_TK = weights_TK / (weights_TK.sum(dim=-1, keepdim=True) + 1e-20)
        return ids_TK, weights_TK * routing.routed_scaling_factor, mask_TG
    raise ValueError(f"unknown routing method {routing.method!r}")


def sort_by_expert(expert_ids: torch.Tensor, num_experts: int, *, check: bool = True) -> ExpertSort:
    """One stable sort of the T·K routed rows by expert id (rows of one expert stay in (token, slot) order).

    Group sizes come from `histc` and offsets from a cumsum, so nothing here waits on the GPU; `check=True` adds one
    host sync to reject ids outside [0, E) (route() cannot produce those, so MoEBlock passes check=False).
    """
    if expert_ids.ndim != 2:
        raise ValueError(f"expert_ids must be [T, K], got shape {tuple(expert_ids.shape)}")
    check_ids_dtype(expert_ids)
    T, K = expert_ids.shape
    flat_M = expert_ids.reshape(-1)
    if check:
        check_expert_ids(flat_M, num_experts)
    # Sorted as the narrowest integer that holds every id: a GPU radix sort makes one pass per digit of the key's
    # width, so uint8 keys (E <= 256) take a fraction of the 8 passes (and launches) int64 keys take; a stable sort
    # of the same values gives the same order whatever their width.
    key_dtype = torch.uint8 if num_experts <= 256 else torch.int16 if num_experts <= 32768 else torch.int64
    keys_M, order_M = torch.sort(flat_M.to(key_dtype), stable=True)
    # histc needs floats on CPU (HF does the same); float64 keeps its bin arithmetic id·E/(E-1) exact for any E
    # (in float32 it rounds ids into the neighbouring bin once id·E passes 2^24); MPS has no float64
    dev = keys_M.device.type
    hist_in = keys_M.double() if dev == "cpu" else keys_M.float() if dev == "mps" else keys_M.int()
    group_sizes_E = torch.histc(hist_in, bins=num_experts, min=0, max=num_experts - 1).long()
    offsets_E = torch.cumsum(group_sizes_E, dim=0, dtype=torch.int32)
    # inverse_M, slot_M and expert_M are made when a backend first reads them (see ExpertSort)
    return ExpertSort(order_M, order_M // K, group_sizes_E, offsets_E, T, K, keys_M=keys_M)


def check_ids_dtype(expert_ids: torch.Tensor) -> None:
    """Raise ValueError unless expert_ids has an integer dtype (metadata only, no sync): float ids would be
    truncated to other experts and bool ids read as experts 0 and 1, silently."""
    if expert_ids.is_floating_point() or expert_ids.is_complex() or expert_ids.dtype == torch.bool:
        raise ValueError(f"expert_ids must be an integer tensor (a router's top-k indices), got {expert_ids.dtype}")


def check_expert_ids(expert_ids: torch.Tensor, num_experts: int) -> None:
    """Raise ValueError unless every expert id lies in [0, num_experts): one host sync for both bounds."""
    if expert_ids.numel():
        lo, hi = torch.aminmax(expert_ids.reshape(-1))
        lo, hi = torch.stack([lo, hi]).tolist()
        if lo < 0 or hi >= num_experts:
            raise ValueError(f"expert ids must lie in [0, {num_experts}), got range [{lo}, {hi}]")


def _in_backward() -> bool:
    """True while autograd runs a backward pass (where activation checkpointing recomputes a layer's forward).

    In a layer being compiled, autograd's query (`torch._C._current_graph_task_id`, no tensor) would break the
    graph; there the checkpointing's own mark is read instead (`models.layers.in_layer_recompute`, set by
    `LayerCheckpointing._run_layer` around the recompute, offloaded or not): a global that Dynamo guards on, so the
    forward and the recompute get one graph each, the recompute's without the statistics. Checkpointing of
    one's own around a compiled layer would then recompute the statistics too: the same values again."""
    if torch.compiler.is_compiling():
        return in_layer_recompute()
    return torch._C._current_graph_task_id() != -1


def forward_routing_stats(logits_TE: torch.Tensor, expert_ids_TK: torch.Tensor, routing: RoutingConfig, *,
                          group_mask_TG: torch.Tensor | None = None, load_E: torch.Tensor | None = None,
                          token_mask_T: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """One forward pass's routing statistics of one MoE layer (`shared_math.routing_stats` defines them), computed
    on the logits' device without a host sync and without autograd: {"load" [E] int64, "tokens" [] int64,
    "entropy_sum" [] fp32, "aux_loss_sum" [] fp32 (softmax-routed families), "groups" [G] int64 (sigmoid_group)}.

    `group_mask_TG`: the groups `_route` kept (sigmoid_group); `load_E`: the expert group sizes when already counted
    (`sort_by_expert`'s, used only without a token mask); `token_mask_T`: 1 for the tokens to count, 0 for padding.
    The distribution is formed in fp32 from the logits whatever their dtype, through log-softmax (of the logits, or
    of log-sigmoid for the normalised sigmoid scores) so that p·ln p never meets ln 0."""
    with torch.no_grad():
        logits = logits_TE.detach().float()
        T, E = logits.shape
        K = expert_ids_TK.shape[1]
        if routing.method == "sigmoid_group":
            log_s_TE = F.logsigmoid(logits)
            logp_TE = log_s_TE - torch.logsumexp(log_s_TE, dim=-1, keepdim=True)
        else:
            logp_TE = F.log_softmax(logits, dim=-1)
        p_TE = logp_TE.exp()
        entropy_T = -(p_TE * logp_TE).sum(dim=-1)
        if token_mask_T is None:
            tokens = torch.full((), T, dtype=torch.long, device=logits.device)
            if load_E is None:
                ones_M = torch.ones(T * K, dtype=torch.long, device=logits.device)
                load_E = torch.zeros(E, dtype=torch.long, device=logits.device).index_add_(
                    0, expert_ids_TK.reshape(-1), ones_M)
            stats = {"load": load_E.long(), "tokens": tokens, "entropy_sum": entropy_T.sum()}
            p_sum_E = p_TE.sum(dim=0)
            group_counts = None if group_mask_TG is None else group_mask_TG.long().sum(dim=0)
        else:
            m_T = token_mask_T.reshape(-1).to(device=logits.device)
            if m_T.shape[0] != T:
                raise ValueError(f"token mask has {m_T.shape[0]} entries for {T} tokens")
            m_long_T, m_float_T = (m_T != 0).long(), (m_T != 0).float()
            load_E = torch.zeros(E, dtype=torch.long, device=logits.device).index_add_(
                0, expert_ids_TK.reshape(-1), m_long_T.repeat_interleave(K))
            stats = {"load": load_E, "tokens": m_long_T.sum(), "entropy_sum": (entropy_T * m_float_T).sum()}
            p_sum_E = (p_TE * m_float_T[:, None]).sum(dim=0)
            group_counts = None if group_mask_TG is None else (group_mask_TG.long() * m_long_T[:, None]).sum(dim=0)
        if routing.method != "sigmoid_group":  # the families with HF's load-balancing loss
            n = stats["tokens"].clamp(min=1).float()
            stats["aux_loss_sum"] = E * (stats["load"].float() * p_sum_E).sum() / (n * n)
        if group_counts is not None:
            stats["groups"] = group_counts
        return stats


# ---- the routed experts ----------------------------------------------------------------------------------------------

def _check_shapes(x, expert_ids, expert_weights, w_gate_up, w_down, lora_gate_up, lora_down, biases) -> None:
    for name, t in (("x", x), ("expert_ids", expert_ids), ("expert_weights", expert_weights),
                    ("w_gate_up", w_gate_up), ("w_down", w_down)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    check_expert_args(x, expert_ids, expert_weights, w_gate_up, w_down, lora_gate_up, lora_down, biases)
    # dtypes (metadata only, no sync): an integer x would run integer GEMMs or fail deep in a backend
    if not x.is_floating_point():
        raise ValueError(f"x must be a floating-point tensor (bf16, fp16 or fp32), got {x.dtype}")
    check_ids_dtype(expert_ids)
    if w_gate_up.dtype != x.dtype or w_down.dtype != x.dtype:
        raise ValueError(f"expert weights ({w_gate_up.dtype}, {w_down.dtype}) must have x's dtype {x.dtype}: "
                         "cast them once at load, not on every call")


def split_lora_experts(x: torch.Tensor, expert_ids: torch.Tensor, expert_weights: torch.Tensor,
                       w_gate_up: torch.Tensor, w_down: torch.Tensor, lora_gate_up: LoraPair | None = None,
                       lora_down: LoraPair | None = None, *, scale: float = 1.0,
                       biases: tuple[torch.Tensor, torch.Tensor] | None = None, activation: str = "swiglu",
                       swiglu_limit: float = 7.0, swiglu_alpha: float = 1.702, backend: str = "auto",
                       sort: ExpertSort | None = None, check_ids: bool = True,
                       output_unread: bool = False) -> torch.Tensor:
    """Routed experts with split LoRA -> y [T, H], in x's dtype.

    y[t] = Σ_k w[t,k] · expert_{ids[t,k]}(x[t]),
    expert_e(x) = act(x@Wgu[e] + s·(x@A1[e])@B1[e] + bgu[e]) @ Wd[e] + s·(h@A2[e])@B2[e] + bd[e].
    x [T, H]; expert_ids, expert_weights [T, K]; w_gate_up [E, H, 2I]; w_down [E, I, H]; LoRA pairs
    (A [E, in, R], B [E, R, out]); biases (b_gate_up [E, 2I], b_down [E, H]); activation "swiglu" or "swiglu_oai".
    LoRA factors, biases and routing weights are cast to x's dtype (LoRA parameters may live in fp32, as PEFT keeps
    them); base weights must already be in x's dtype. Differentiable in x, expert_weights, the LoRA tensors, the
    biases and the base weights when they require grad. `backend`: "auto", "native" or "grouped_mm"
    (`torch_impl.backends.resolve_backend`). `sort`: a precomputed `sort_by_expert(expert_ids, E)` to reuse.
    `check_ids=False` skips the range check of expert_ids, the one host sync of this call (on a GPU it stops the
    CPU from queueing work ahead); for ids a router produced, which are in range by construction, as `MoEBlock` does.
    `output_unread=True` promises that nothing reads y, not even an op that saves it for its backward: activation
    checkpointing's recompute of a decoder layer, where y only feeds the residual add (`Experts` passes
    `in_layer_recompute()` unless its `output_unread_in_recompute` says otherwise). Backends with their own
    autograd Function (triton, triton_hopper, grouped_mm) then compute only what their backward saves (gu, z1, z2),
    skipping the down GEMM, a third of the forward's FLOPs, and return NaN, so that a broken promise shows as NaN
    gradients instead of quietly wrong ones; native ignores it.
    The gradients are those of the full forward (the recompute's saved values are).
    """
    _check_shapes(x, expert_ids, expert_weights, w_gate_up, w_down, lora_gate_up, lora_down, biases)
    scale = check_lora_scale(scale)
    act = Activation(activation, swiglu_limit, swiglu_alpha)
    impl = get_backend(resolve_backend(backend, device=x.device, dtype=x.dtype))
    srt = sort if sort is not None else sort_by_expert(expert_ids, w_gate_up.shape[0], check=check_ids)
    weights, lora_gu, lora_d, bias_pair = backend_operands(impl, x, expert_weights, lora_gate_up, lora_down, biases)
    return impl.experts_forward(x, weights, srt, w_gate_up, w_down, lora_gu, lora_d, float(scale), bias_pair, act,
                                output_unread=output_unread)


def backend_operands(impl, x: torch.Tensor, expert_weights: torch.Tensor, lora_gate_up: LoraPair | None,
                     lora_down: LoraPair | None, biases: tuple[torch.Tensor, torch.Tensor] | None):
    """(expert_weights, lora_gate_up, lora_down, biases) as backend `impl` takes them: routing weights, biases and
    LoRA pairs cast to x's dtype, except the LoRA pairs of a backend that takes fp32 LoRA masters itself (triton: one
    cast inside, fp32 gradients straight from its fp32 accumulators), which skips a bf16 round trip of every LoRA
    gradient and its copies. Autograd's gradient of such a cast is the gradient cast back; the custom op's backward
    (`torch_impl.moe_op`) calls this too and does the same."""
    dt = x.dtype

    def cast(pair):
        return None if pair is None else (pair[0].to(dt), pair[1].to(dt))

    lora_cast = (lambda pair: pair) if getattr(impl, "TAKES_FP32_LORA", False) else cast
    return expert_weights.to(dt), lora_cast(lora_gate_up), lora_cast(lora_down), cast(biases)


# ---- modules ---------------------------------------------------------------------------------------------------------

class Router(nn.Module):
    """Router linear: logits [T, E] = x @ weight [H, E] (+ bias [E], gpt-oss), in the wider of the activation and
    weight dtypes: DeepSeek-V3/GLM keep `weight` and `e_score_correction_bias [E]` (selection only, never trained)
    in fp32 in bf16 models (HF `_keep_in_fp32_modules_strict`), so their logits are fp32; others as the model."""

    def __init__(self, hidden_size: int, num_experts: int, *, bias: bool = False, correction_bias: bool = False,
                 dtype: torch.dtype | None = None, device: torch.device | str | None = None) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(hidden_size, num_experts, dtype=dtype, device=device),
                                   requires_grad=False)
        self.bias = (nn.Parameter(torch.empty(num_experts, dtype=dtype, device=device), requires_grad=False)
                     if bias else None)
        self.e_score_correction_bias = (
            nn.Parameter(torch.empty(num_experts, dtype=torch.float32, device=device), requires_grad=False)
            if correction_bias else None)

    def forward(self, x_TH: torch.Tensor) -> torch.Tensor:
        logits_TE = x_TH.to(torch.promote_types(x_TH.dtype, self.weight.dtype)) @ self.weight
        return logits_TE if self.bias is None else logits_TE + self.bias


class Experts(nn.Module):
    """E routed experts with optional split LoRA on the fused gate_up and on down.

    Parameters (canonical layouts): `gate_up_proj [E, H, 2I]`, `down_proj [E, I, H]`, `gate_up_proj_bias [E, 2I]`
    and `down_proj_bias [E, H]` (None without biases), and after `torch_impl.lora.attach_lora`:
    `gate_up_lora_A [E, H, R]`, `gate_up_lora_B [E, R, 2I]`, `down_lora_A [E, I, R]`, `down_lora_B [E, R, H]`
    with `lora_scale` (and `gate_up_lora_scale` where gate_up's differs; each pair may have its own R). Base weights
    are frozen.

    `output_unread_in_recompute`: whether, in activation checkpointing's recompute of the layer, nothing reads this
    module's output (true in every decoder layer here: it feeds the residual add); a subclass whose caller saves the
    output for a backward (expert parallelism weights it after the all-to-all) sets it False.

    `token_chunk`: None, or a number of tokens: calls with more tokens run `tiled_experts.tiled_split_lora_experts`
    (chunk by chunk, recomputed chunk by chunk in the backward: the experts' activation memory of one chunk; set
    for a whole model with `CausalLM.tile_experts`).
    """

    output_unread_in_recompute = True
    token_chunk: int | None = None

    def __init__(self, num_experts: int, hidden_size: int, intermediate_size: int, *, bias: bool = False,
                 activation: str = "swiglu", swiglu_limit: float = 7.0, swiglu_alpha: float = 1.702,
                 backend: str = "auto", dtype: torch.dtype | None = None,
                 device: torch.device | str | None = None) -> None:
        super().__init__()
        E, H, I = num_experts, hidden_size, intermediate_size
        kw = dict(dtype=dtype, device=device)
        self.num_experts = E
        self.gate_up_proj = nn.Parameter(torch.empty(E, H, 2 * I, **kw), requires_grad=False)
        self.down_proj = nn.Parameter(torch.empty(E, I, H, **kw), requires_grad=False)
        self.gate_up_proj_bias = nn.Parameter(torch.empty(E, 2 * I, **kw), requires_grad=False) if bias else None
        self.down_proj_bias = nn.Parameter(torch.empty(E, H, **kw), requires_grad=False) if bias else None
        for name in ("gate_up_lora_A", "gate_up_lora_B", "down_lora_A", "down_lora_B"):
            self.register_parameter(name, None)  # set by torch_impl.lora.attach_lora
        self.lora_scale = 1.0
        self.gate_up_lora_scale: float | None = None  # None: lora_scale (per-target alpha/rank can make them differ)
        self.activation = Activation(activation, swiglu_limit, swiglu_alpha)
        self.backend = backend

    def lora_pairs(self) -> tuple[LoraPair | None, LoraPair | None]:
        gu = None if self.gate_up_lora_A is None else (self.gate_up_lora_A, self.gate_up_lora_B)
        down = None if self.down_lora_A is None else (self.down_lora_A, self.down_lora_B)
        return gu, down

    def forward(self, x_TH: torch.Tensor, expert_ids_TK: torch.Tensor, expert_weights_TK: torch.Tensor,
                sort: ExpertSort | None = None) -> torch.Tensor:
        biases = None if self.gate_up_proj_bias is None else (self.gate_up_proj_bias, self.down_proj_bias)
        lora_gate_up, lora_down = self.lora_pairs()
        s_gu = self.gate_up_lora_scale
        if lora_gate_up is not None and s_gu is not None and s_gu != self.lora_scale:
            # the backends take one LoRA scale: fold gate_up's own into its B here, where autograd sees it (B is
            # small, [E, R, 2I]), so values and gradients are those of scale s_gu
            lora_gate_up = (lora_gate_up[0], lora_gate_up[1] * (s_gu / self.lora_scale))
        a = self.activation
        if self.token_chunk is not None and x_TH.shape[0] > self.token_chunk:
            return self._tiled(x_TH, expert_ids_TK, expert_weights_TK, lora_gate_up, lora_down, biases,
                               self.output_unread_in_recompute and in_layer_recompute())
        # in a checkpointed layer's recompute the output feeds only the residual add, which saves nothing: the
        # backends then skip the down GEMM (`split_lora_experts`' output_unread)
        if custom_op_active():
            # one opaque op (torch_impl.moe_op): torch.compile traces the layer around it without a graph break,
            # the caller's sort included (the op takes its tensors). Ids from a router (sort given) skip the range
            # check, as below.
            return split_lora_experts_op(x_TH, expert_ids_TK, expert_weights_TK, self.gate_up_proj, self.down_proj,
                                         lora_gate_up, lora_down, scale=self.lora_scale, biases=biases,
                                         activation=a.name, swiglu_limit=a.limit, swiglu_alpha=a.alpha,
                                         backend=self.backend, sort=sort, check_ids=sort is None,
                                         output_unread_in_recompute=self.output_unread_in_recompute)
        return split_lora_experts(x_TH, expert_ids_TK, expert_weights_TK, self.gate_up_proj, self.down_proj,
                                  lora_gate_up, lora_down, scale=self.lora_scale, biases=biases, activation=a.name,
                                  swiglu_limit=a.limit, swiglu_alpha=a.alpha, backend=self.backend, sort=sort,
                                  output_unread=self.output_unread_in_recompute and in_layer_recompute())

    # a compiled layer runs the tiled experts eagerly (a graph break): their backward runs autograd itself
    @torch._dynamo.disable
    def _tiled(self, x_TH, expert_ids_TK, expert_weights_TK, lora_gate_up, lora_down, biases, unread: bool):
        from torch_impl.tiled_experts import tiled_split_lora_experts  # here: it imports this module

        a = self.activation
        return tiled_split_lora_experts(x_TH, expert_ids_TK, expert_weights_TK, self.gate_up_proj, self.down_proj,
                                        lora_gate_up, lora_down, chunk=self.token_chunk, biases=biases,
                                        output_unread=unread, scale=self.lora_scale, activation=a.name,
                                        swiglu_limit=a.limit, swiglu_alpha=a.alpha, backend=self.backend)


class MoEBlock(nn.Module):
    """router -> route -> experts on normed hidden states [..., H]; returns (y [..., H], router_logits [T, E]).

    Attributes: `router` (`weight [H, E]`, canonical `mlp.router.weight`), `experts` (`Experts`), `routing`, and
    `shared_experts` (DeepSeek-V3/GLM: a SwiGLU `DenseMLP` of width `shared_intermediate_size` on every token,
    added to the routed output; None without). sigmoid_group routing keeps the router in fp32 (see `Router`).
    """

    def __init__(self, hidden_size: int, intermediate_size: int, routing: RoutingConfig, *,
                 router_bias: bool = False, expert_bias: bool = False, activation: str = "swiglu",
                 swiglu_limit: float = 7.0, swiglu_alpha: float = 1.702, backend: str = "auto",
                 shared_intermediate_size: int = 0, dtype: torch.dtype | None = None,
                 device: torch.device | str | None = None) -> None:
        super().__init__()
        self.routing = routing
        sigmoid = routing.method == "sigmoid_group"
        self.router = Router(hidden_size, routing.num_experts, bias=router_bias, correction_bias=sigmoid,
                             dtype=torch.float32 if sigmoid else dtype, device=device)
        self.experts = Experts(routing.num_experts, hidden_size, intermediate_size, bias=expert_bias,
                               activation=activation, swiglu_limit=swiglu_limit, swiglu_alpha=swiglu_alpha,
                               backend=backend, dtype=dtype, device=device)
        self.shared_experts = (DenseMLP(hidden_size, shared_intermediate_size, dtype=dtype, device=device)
                               if shared_intermediate_size else None)
        # routing analytics (torch_impl.routing_stats switches them on): each forward then leaves its statistics in
        # `routing_stats` (overwritten, never added to); a checkpointed layer's recompute inside the backward skips
        # them (`_in_backward`: the same routing again, and the kernels cost a logged step ~1% each time);
        # `routing_token_mask` [T] excludes padding from them
        self.collect_routing_stats = False
        self.routing_stats: dict[str, torch.Tensor] | None = None
        self.routing_token_mask: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        shape = x.shape
        x_TH = x.reshape(-1, shape[-1])
        logits_TE = self.router(x_TH)
        ids_TK, weights_TK, group_mask_TG = _route(logits_TE, self.routing, self.router.e_score_correction_bias)
        srt = sort_by_expert(ids_TK, self.routing.num_experts, check=False)
        if self.collect_routing_stats and not _in_backward():
            self.routing_stats = forward_routing_stats(logits_TE, ids_TK, self.routing, group_mask_TG=group_mask_TG,
                                                       load_E=srt.group_sizes_E,
                                                       token_mask_T=self.routing_token_mask)
        y_TH = self.experts(x_TH, ids_TK, weights_TK, sort=srt)
        if self.shared_experts is not None:
            y_TH = y_TH + self.shared_experts(x_TH)
        return y_TH.view(shape), logits_TE
