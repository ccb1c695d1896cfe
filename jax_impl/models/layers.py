"""Transformer building blocks of jax_impl's models, rounding where HF's PyTorch code rounds.

- `RMSNorm`: `w * (x_f32 * rsqrt(mean(x_f32²) + eps)).astype(x.dtype)`: statistics in fp32, cast, then the weight.
- `RotaryEmbedding`: HF's default RoPE or YaRN (`shared_math.rope`): angles = position · inv_freq in fp32, cos/sin of
  `[angles, angles]` cast to the activation dtype; applied in NeoX `rotate_half` form (partial over the first dims)
  or as DeepSeek's interleaved pairs (`apply_rotary_interleave`).
- `packed_causal_mask`: causal, and block-diagonal over packed sequences: as HF's `find_packed_sequence_indices`, a new
  sequence starts wherever position_ids do not increase by exactly 1 (so wherever they restart at 0).
- `causal_mask`: that, over real tokens only (`attention_mask`, HF's padding mask) and within an optional sliding
  window; `prepare_attention_mask` checks a [B, S] padding mask (HF's `attention_mask`: 1 = token, 0 = padding).
- `Attention`: GQA with optional per-head q/k RMSNorm before RoPE (Qwen3), through `models.attention`'s
  `dot_product_attention` (`attn_implementation`: None = the literal softmax in fp32 as HF's eager path, 0 for a
  query with no key, a left-padding position, as torch's SDPA; "xla"; "cudnn" flash attention on the GPU).
- `DenseMLP`: SwiGLU `down(silu(gate(x)) * up(x))` (dense layers and shared experts).
- `Linear` (frozen, `x @ W (+ b)`) is `jax_impl.lora.LoRALinear` without factors attached.
- `CausalLMOutput`, `causal_lm_loss`, `load_balancing_loss`: model outputs and HF's losses (the aux loss masked by
  `attention_mask` as HF's `load_balancing_loss_func`; the LM loss masked by labels = -100 only, as HF's);
  `lm_output(..., return_logits=False)` takes the loss from `jax_impl.loss` without the [B, S, V] logits.
- `LayerCheckpointing`: `gradient_checkpointing_enable(policy=..., layers=...)` (HF's and torch_impl's name) for the
  decoder-layer loop, with a `jax.checkpoint` policy (`REMAT_POLICIES`: what the backward may keep) and how many of
  the first layers are checkpointed (`layers=N`: the rest keep their activations and skip the recompute).

Shapes: B batch, S sequence, H hidden, N query heads, Nkv key/value heads, D head dim.
"""

from __future__ import annotations

import itertools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from jax_impl.lora import Frozen, LoRALinear, lora_z
from jax_impl.models.attention import dot_product_attention, masked_softmax  # noqa: F401 - masked_softmax re-exported
from jax_impl.moe import RoutingStats
from shared_math.config import ModelConfig
from shared_math.rope import rope_inv_freq
from shared_math.train_config import validate_checkpoint_layers

_F32 = jnp.float32


# Per token, a dot whose output is at most this wide is kept for the backward by the "small_dots" policy: the LoRA
# down-projections x·A, one product for the projections that share x (`project`: q, k, v together are 3R wide,
# 192 at R = 64, 384 at R = 128: 1.5 KB in fp32), and the router logits (E <= 256), next to the layer input's H
# values. The narrowest projection output it must not keep is k/v's (4 or 8 heads x 128 or 64 = 512).
_SMALL_DOT_WIDTH = 384


def save_small_dots(prim, *avals, **params) -> bool:
    """A `jax.checkpoint` policy that keeps what is cheap to keep: the outputs of matmuls without batch dimensions
    (projections) at most `_SMALL_DOT_WIDTH` wide per token (LoRA's x·A, router logits), so the backward does not
    re-read a layer's activations to recompute them. Everything wider (q/k/v/o outputs, LoRA's fp32 B products,
    the experts, the attention) is recomputed, as with nothing saved: on Qwen3-30B-A3B the kept values are about a
    third of the layer input's bytes, where `dots_with_no_batch_dims_saveable` would keep ~10x them."""
    if prim is not jax.lax.dot_general_p:
        return False
    (lhs_contract, rhs_contract), (lhs_batch, rhs_batch) = params["dimension_numbers"]
    if lhs_batch or rhs_batch:
        return False

    def free(aval, contract) -> int:
        return math.prod(s for axis, s in enumerate(aval.shape) if axis not in contract)

    # the narrower operand's free size is the per-token width (einsum may pass the weight as either operand)
    return min(free(avals[0], lhs_contract), free(avals[1], rhs_contract)) <= _SMALL_DOT_WIDTH


# what a checkpointed decoder layer keeps for its backward, by name (`gradient_checkpointing_enable(policy=...)`)
REMAT_POLICIES = {
    "nothing": jax.checkpoint_policies.nothing_saveable,  # the layer input only (torch_impl's checkpointing)
    "small_dots": save_small_dots,
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,  # every projection output (MaxText "minimal")
}


class LayerCheckpointing:
    """Mixin of the models (`models.decoder.CausalLM`), as torch_impl's: with `gradient_checkpointing_enable()`
    each decoder layer keeps only its inputs for the backward and recomputes its forward there (`jax.checkpoint`);
    `policy` (a name of `REMAT_POLICIES` or any `jax.checkpoint_policies` callable) lets it keep more: "small_dots"
    keeps what is cheap to keep (`save_small_dots`). JAX has no training flag: rematerialisation only changes what
    differentiation saves, so a forward without gradients is unaffected.

    `layers=N`, as torch_impl's: only the first N decoder layers (in forward order) run under `jax.checkpoint`, the
    others plainly, so the backward keeps their activations instead of recomputing them (Megatron's
    `recompute_num_layers`: a step with memory to spare saves those layers' recompute). None, the default: all."""

    gradient_checkpointing: bool = False
    checkpoint_policy = None
    checkpoint_layers: int | None = None  # how many of the first decoder layers are checkpointed; None: all

    def gradient_checkpointing_enable(self, policy=None, layers: int | None = None) -> None:
        if isinstance(policy, str):
            if policy not in REMAT_POLICIES:
                raise ValueError(f"unknown checkpoint policy {policy!r}; choose one of {', '.join(REMAT_POLICIES)} "
                                 "or pass a jax.checkpoint_policies callable")
            policy = REMAT_POLICIES[policy]
        if layers is not None:
            validate_checkpoint_layers(layers, len(self.layers))
        self.gradient_checkpointing = True
        self.checkpoint_policy = policy
        self.checkpoint_layers = layers

    def gradient_checkpointing_disable(self) -> None:
        self.gradient_checkpointing = False
        self.checkpoint_policy = None
        self.checkpoint_layers = None

    def _run_layer(self, layer_idx: int, layer: nnx.Module, *args):
        """Decoder layer `layer_idx` (its position in the forward) on `args`, under `jax.checkpoint` if it is one of
        the first `checkpoint_layers`."""
        checkpointed = self.checkpoint_layers is None or layer_idx < self.checkpoint_layers
        if not (self.gradient_checkpointing and checkpointed):
            return layer(*args)
        # functional form (split, then jax.checkpoint over merge-and-call): nnx.remat would write the layer's
        # variables back across trace levels, which the frozen base weights refuse inside an outer jit
        graphdef, state = nnx.split(layer)

        def run(st, *a):
            m = nnx.merge(graphdef, st)
            return m(*a), nnx.state(m, RoutingStats)

        out, stats = jax.checkpoint(run, policy=self.checkpoint_policy)(state, *args)
        # the routing statistics an MoE block wrote inside the checkpointed call (jax_impl.routing_stats) go back to
        # the layer: they are the only variables a forward changes
        nnx.update(layer, stats)
        return out


class RMSNorm(nnx.Module):
    """RMSNorm over the last axis, HF (Llama/Qwen) rounding: normalise in fp32, cast to x's dtype, times weight."""

    def __init__(self, weight: jax.Array, eps: float):
        self.weight = Frozen(weight)
        self.eps = float(eps)

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(_F32)
        normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return self.weight[...] * normed.astype(x.dtype)


class RotaryEmbedding(nnx.Module):
    """HF's RoPE tables, default or YaRN (`shared_math.rope`): (cos, sin) [B, S, Dr] from position_ids [B, S], times
    YaRN's attention_factor in fp32, in the requested dtype; Dr = `cfg.rotary_dim`."""

    def __init__(self, cfg: ModelConfig):
        inv_freq, self.attention_scaling = rope_inv_freq(cfg.rotary_dim, cfg.rope_theta, cfg.rope_scaling)
        self.inv_freq = Frozen(jnp.asarray(inv_freq, _F32))

    def __call__(self, position_ids_BS: jax.Array, dtype) -> tuple[jax.Array, jax.Array]:
        freqs_BSd = position_ids_BS.astype(_F32)[..., None] * self.inv_freq[...]
        emb_BSD = jnp.concatenate([freqs_BSd, freqs_BSd], axis=-1)
        cos, sin = jnp.cos(emb_BSD) * self.attention_scaling, jnp.sin(emb_BSD) * self.attention_scaling
        return cos.astype(dtype), sin.astype(dtype)


def _rotate_half(x: jax.Array) -> jax.Array:
    half = x.shape[-1] // 2
    return jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)


def apply_rotary(x_BSND: jax.Array, cos_BSD: jax.Array, sin_BSD: jax.Array) -> jax.Array:
    """NeoX RoPE on every head: x·cos + rotate_half(x)·sin over the first Dr = cos.shape[-1] dims (partial RoPE,
    GLM-4.x); the rest passes through. The tables broadcast over heads."""
    cos, sin = cos_BSD[:, :, None, :], sin_BSD[:, :, None, :]
    r = cos.shape[-1]
    if r == x_BSND.shape[-1]:
        return x_BSND * cos + _rotate_half(x_BSND) * sin
    x_rot = x_BSND[..., :r]
    return jnp.concatenate([x_rot * cos + _rotate_half(x_rot) * sin, x_BSND[..., r:]], axis=-1)


def apply_rotary_interleave(x_BSND: jax.Array, cos_BSD: jax.Array, sin_BSD: jax.Array) -> jax.Array:
    """DeepSeek's interleaved RoPE as HF applies it: pairs (x0, x1), (x2, x3), ... rotate by one angle each, output
    laid out `[rotated evens | rotated odds]` (q and k alike, so q·k equals the interleaved form's)."""
    half = cos_BSD.shape[-1] // 2
    cos, sin = cos_BSD[:, :, None, :half], sin_BSD[:, :, None, :half]
    x1, x2 = x_BSND[..., 0::2], x_BSND[..., 1::2]
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)


def packed_causal_mask(position_ids_BS: jax.Array) -> jax.Array:
    """[B, S, S] boolean: query i may attend key j iff j <= i and both lie in the same packed sequence
    (`causal_mask` without padding or window)."""
    return causal_mask(position_ids_BS)


def causal_mask(position_ids_BS: jax.Array, attention_mask_BS: jax.Array | None = None,
                window: int | None = None) -> jax.Array:
    """[B, S, S] boolean (True = attend), as torch_impl's `causal_mask` (always materialised here): query i may
    attend key j iff j <= i (by index, as HF), both lie in the same packed sequence, j is a real token
    (`attention_mask_BS` bool from `prepare_attention_mask`: HF's padding mask) and, with `window`, i - window < j.

    A left-padding query's row is empty; attention gives it 0 (`masked_softmax`; gpt-oss's sink does it itself), as
    HF's SDPA path and its gpt-oss do (HF's eager path averages all keys there); see torch_impl's twin. HF builds
    its packed mask only without an attention mask; here documents and padding combine (they agree on HF's own
    position_ids for padded rows)."""
    B, S = position_ids_BS.shape
    prev = jnp.concatenate([position_ids_BS[:, :1] - 1, position_ids_BS[:, :-1]], axis=1)
    seq_BS = jnp.cumsum(position_ids_BS - prev != 1, axis=1)
    idx = jnp.arange(S)
    allowed_SS = idx[None, :] <= idx[:, None]
    if window is not None and window < S:
        allowed_SS = allowed_SS & (idx[None, :] > idx[:, None] - window)
    allowed_BSS = allowed_SS[None] & (seq_BS[:, :, None] == seq_BS[:, None, :])
    if attention_mask_BS is not None:
        allowed_BSS = allowed_BSS & attention_mask_BS.astype(bool)[:, None, :]
    return allowed_BSS


class Attention(nnx.Module):
    """GQA self-attention `o_proj(softmax(q·kᵀ/√D + mask)·v)` with optional q/k RMSNorm before RoPE, through
    `models.attention.dot_product_attention` (`attn_implementation`, set by `CausalLM.set_attn_implementation`).
    `mask_BSS` None means plain causal attention."""

    def __init__(self, cfg: ModelConfig, q_proj: LoRALinear, k_proj: LoRALinear, v_proj: LoRALinear,
                 o_proj: LoRALinear, q_norm: RMSNorm | None = None, k_norm: RMSNorm | None = None):
        if cfg.attention != "gqa" or cfg.attention_sinks or cfg.sliding_window is not None:
            raise NotImplementedError(
                f"{cfg.family}: jax_impl's Attention covers full GQA attention (no MLA, sinks or sliding window)")
        self.q_proj, self.k_proj, self.v_proj, self.o_proj = q_proj, k_proj, v_proj, o_proj
        self.q_norm, self.k_norm = q_norm, k_norm
        self.num_heads, self.num_kv_heads = cfg.num_attention_heads, cfg.num_key_value_heads
        self.head_dim = cfg.head_dim
        self.scaling = cfg.head_dim ** -0.5
        self.attn_implementation: str | None = None

    def __call__(self, x_BSH: jax.Array, cos: jax.Array, sin: jax.Array, mask_BSS: jax.Array | None) -> jax.Array:
        B, S, _ = x_BSH.shape
        N, Nkv, D = self.num_heads, self.num_kv_heads, self.head_dim
        q, k, v = project(x_BSH, self.q_proj, self.k_proj, self.v_proj)
        q_BSND, k_BSND, v_BSND = q.reshape(B, S, N, D), k.reshape(B, S, Nkv, D), v.reshape(B, S, Nkv, D)
        if self.q_norm is not None:
            q_BSND, k_BSND = self.q_norm(q_BSND), self.k_norm(k_BSND)
        q_BSND, k_BSND = apply_rotary(q_BSND, cos, sin), apply_rotary(k_BSND, cos, sin)
        out_BSND = dot_product_attention(q_BSND, k_BSND, v_BSND, scale=self.scaling, mask_BSS=mask_BSS,
                                         implementation=self.attn_implementation)
        return self.o_proj(out_BSND.reshape(B, S, N * D))


def project(x: jax.Array, *projections: LoRALinear) -> list[jax.Array]:
    """[p(x) for p in projections] for projections that read the same x (q, k, v; gate and up), where those with
    LoRA share their LoRA input: one cast of x to the adapters' dtype and one product x·[A1 | A2 | ...] instead of
    one per projection; each z column is the same dot product, the rest as `LoRALinear.forward_with_z` (torch_impl's
    `models.layers.project`)."""
    lora = [i for i, p in enumerate(projections) if p.lora_A is not None]
    if len(lora) < 2 or len({projections[i].lora_A[...].dtype for i in lora}) > 1:
        return [p(x) for p in projections]
    a_cat = jnp.concatenate([projections[i].lora_A[...] for i in lora], axis=1)
    bounds = list(itertools.accumulate(projections[i].lora_A[...].shape[1] for i in lora))[:-1]
    zs = iter(jnp.split(lora_z(x, a_cat), bounds, axis=-1))
    return [p.forward_with_z(x, next(zs)) if i in lora else p(x) for i, p in enumerate(projections)]


class DenseMLP(nnx.Module):
    """SwiGLU MLP `down(silu(gate(x)) * up(x))` (HF rounds silu's output before the product)."""

    def __init__(self, gate_proj: LoRALinear, up_proj: LoRALinear, down_proj: LoRALinear):
        self.gate_proj, self.up_proj, self.down_proj = gate_proj, up_proj, down_proj

    def __call__(self, x: jax.Array) -> jax.Array:
        g, up = project(x, self.gate_proj, self.up_proj)
        g32 = g.astype(_F32)
        return self.down_proj((g32 * jax.nn.sigmoid(g32)).astype(g.dtype) * up)


Linear = LoRALinear  # frozen unless attach_lora gives it factors


class CausalLMOutput(NamedTuple):
    """logits [B, S, V] in the model dtype (None when the forward was asked for the loss alone:
    `return_logits=False`); loss (fp32 scalar) when labels were given; aux_loss (fp32 scalar) when the config asks
    for router logits (HF's `output_router_logits`), else None."""

    logits: jax.Array | None
    loss: jax.Array | None = None
    aux_loss: jax.Array | None = None


def causal_lm_loss(logits: jax.Array, labels: jax.Array, ignore_index: int = -100) -> jax.Array:
    """HF's ForCausalLMLoss: fp32 logits; logits[:, s] predicts labels[:, s+1]; mean cross-entropy over the
    non-ignored positions. Packed documents are not separated (HF does not either: mask boundaries in labels), and
    padding is not masked here: as in HF, the attention mask never enters the loss, so label padding -100."""
    logits_f = logits[:, :-1].astype(_F32)
    target = labels[:, 1:]
    valid = target != ignore_index
    logz = jax.nn.logsumexp(logits_f, axis=-1)
    picked = jnp.take_along_axis(logits_f, jnp.where(valid, target, 0)[..., None], axis=-1)[..., 0]
    return jnp.sum(jnp.where(valid, logz - picked, 0.0)) / jnp.maximum(valid.sum(), 1)


def load_balancing_loss(router_logits: list[jax.Array], num_experts: int, top_k: int,
                        attention_mask: jax.Array | None = None) -> jax.Array:
    """HF's load_balancing_loss_func: softmax over E, top-K; the pooled fraction of assignments f_e and mean
    probability P_e over all MoE layers and tokens; E · Σ_e f_e · P_e (fp32).

    With attention_mask ([B, S], the router logits' T = B·S rows in order) padding tokens count for nothing: every
    assignment and probability is weighted by the mask, and the token count is L · Σ mask (HF's masked branch)."""
    logits_NE = jnp.concatenate([lg.astype(_F32) for lg in router_logits], axis=0)
    probs_NE = jax.nn.softmax(logits_NE, axis=-1)
    _, ids_NK = jax.lax.top_k(probs_NE, top_k)
    if attention_mask is None:
        f_E = jax.nn.one_hot(ids_NK, num_experts, dtype=_F32).sum(1).mean(0)
        return num_experts * jnp.sum(f_E * probs_NE.mean(0))
    m_N = jnp.tile(attention_mask.reshape(-1).astype(_F32), len(router_logits))  # layer-major, as the concat
    rows = m_N.sum()
    f_E = (jax.nn.one_hot(ids_NK, num_experts, dtype=_F32).sum(1) * m_N[:, None]).sum(0) / rows
    return num_experts * jnp.sum(f_E * (probs_NE * m_N[:, None]).sum(0) / rows)


def prepare_position_ids(input_ids: jax.Array, position_ids: jax.Array | None, vocab_size: int) -> jax.Array:
    """Check input_ids [B, S] (ids in [0, vocab_size) whenever they are concrete, i.e. outside jit) and
    position_ids, and return position_ids as [B, S] (0..S-1 when None, also with an attention mask: HF's forward
    defaults them so; HF's `generate` passes cumsum(mask) - 1 itself); mirrors torch_impl's checks."""
    if input_ids.ndim != 2:
        raise ValueError(f"input_ids must be [batch, seq], got shape {tuple(input_ids.shape)}")
    if not isinstance(input_ids, jax.core.Tracer) and input_ids.size:
        lo, hi = int(input_ids.min()), int(input_ids.max())
        if lo < 0 or hi >= vocab_size:
            raise ValueError(f"token ids must lie in [0, vocab_size={vocab_size}), got range [{lo}, {hi}]")
    B, S = input_ids.shape
    if position_ids is None:
        return jnp.broadcast_to(jnp.arange(S, dtype=jnp.int32), (B, S))
    if position_ids.shape[-1] != S:
        raise ValueError(f"position_ids {tuple(position_ids.shape)} do not match input_ids {(B, S)}")
    return jnp.broadcast_to(position_ids, (B, S))


def prepare_attention_mask(input_ids: jax.Array, attention_mask: jax.Array | None) -> jax.Array | None:
    """Check attention_mask (HF's meaning: [B, S], nonzero = real token, 0 = padding) against input_ids [B, S] and
    return it as bool [B, S] (None when absent). Unlike torch_impl an all-ones mask is kept: under jit its values
    are unknown, and the mask is materialised here in any case."""
    if attention_mask is None:
        return None
    if tuple(attention_mask.shape) != tuple(input_ids.shape):
        raise ValueError(f"attention_mask must be [batch, seq] like input_ids {tuple(input_ids.shape)} (1 = token, "
                         f"0 = padding; 4-D masks are not accepted), got {tuple(attention_mask.shape)}")
    return attention_mask.astype(bool)


def lm_output(h_BSH: jax.Array, embed_tokens_VH: jax.Array, lm_head, labels: jax.Array | None,
              router_logits: list[jax.Array], cfg: ModelConfig, output_router_logits: bool,
              return_logits: bool = True, attention_mask: jax.Array | None = None) -> CausalLMOutput:
    """Normed hidden states -> logits (tied embeddings when lm_head is None, fp32 accumulation, one rounding),
    HF's causal-LM loss (labels = -100 masks it; attention_mask does not, as in HF), and the load-balancing aux loss
    when the config asks for router logits, over the real tokens of `attention_mask` [B, S] (added to the loss,
    times router_aux_loss_coef, only when labels are given: HF's rule). Mirrors torch_impl.

    `return_logits=False` with labels: the loss comes from `jax_impl.loss.fused_linear_cross_entropy` (a scan over
    row chunks, the same rounding points) and the `[B, S, V]` logits never exist (`logits` is None): what a
    training step wants."""
    if labels is not None and not return_logits:
        from jax_impl.loss import fused_linear_cross_entropy

        if lm_head is not None and lm_head.bias is not None:
            raise NotImplementedError("the fused loss has no output bias; pass return_logits=True")
        if lm_head is not None and lm_head.lora_A is not None:
            raise NotImplementedError("the fused loss uses the frozen output weight; lm_head has LoRA attached: pass "
                                      "return_logits=True")
        weight, hv = (embed_tokens_VH, False) if lm_head is None else (lm_head.weight[...], True)
        logits_BSV, loss = None, fused_linear_cross_entropy(h_BSH, weight.astype(h_BSH.dtype), labels,
                                                            weight_is_HV=hv)
    else:
        if lm_head is None:
            logits_BSV = jnp.einsum("bsh,vh->bsv", h_BSH, embed_tokens_VH,
                                    preferred_element_type=_F32).astype(h_BSH.dtype)
        else:
            logits_BSV = lm_head(h_BSH)
        loss = None if labels is None else causal_lm_loss(logits_BSV, labels)
    aux = None
    if output_router_logits and router_logits:
        aux = load_balancing_loss(router_logits, cfg.num_experts, cfg.num_experts_per_tok, attention_mask)
        if loss is not None:
            loss = loss + cfg.router_aux_loss_coef * aux
    return CausalLMOutput(logits_BSV, loss, aux)
