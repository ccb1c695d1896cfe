"""The decoder skeleton every family shares, in Flax NNX: one `DecoderLayer` and one causal-LM shell (`CausalLM`),
mirroring torch_impl/models/decoder.py (same names, hooks and argument order; the JAX side builds from canonical
tensors, so every builder also takes the layer's tensors `layer`, keyed without the `layers.{l}.` prefix).

Shape legend: B batch · S sequence · T = B·S tokens · H hidden · E experts · V vocab.

`DecoderLayer`: `h + self_attn(input_layernorm(h))`, then `h + mlp(post_attention_layernorm(h))`, for whatever
attention module, MLP / MoE module and norm class the family gives it; returns (hidden, router logits or None).

`CausalLM`: embedding -> rotary tables -> attention mask (`layers.causal_mask`: packed documents, padding,
materialised [B, S, S]; None, meaning plain causal, when neither position_ids nor attention_mask are given, so
flash attention runs without a mask tensor) -> the decoder layers (each through `LayerCheckpointing._run_layer`,
`jax.checkpoint` per layer when enabled, for every layer or the first N, with its policy) collecting router logits
-> final norm -> `layers.lm_output` (logits, loss, aux loss; the loss without logits with `return_logits=False`).
Every attention module runs `models.attention.dot_product_attention` with the model's `attn_implementation` (None =
the literal softmax, "xla", "cudnn"; `set_attn_implementation`). A family subclasses it and supplies only what
differs, through these hooks:

- `family`: the `ModelConfig.family` it builds; `check_config(cfg)`: that, and what else the family refuses;
- `build_attention(cfg, layer, layer_idx, ...)`: its attention module (default: `layers.Attention`, GQA with q/k
  norm when `cfg.use_qk_norm`; gpt-oss's sinks and per-layer sliding window, MLA live in the family's module);
- `build_moe(cfg, layer, layer_idx, ...)`: its `MoEBlock` variant (router, experts, shared experts); `build_mlp`
  picks it or a dense `DenseMLP` per layer from `cfg.moe_layers`;
- `norm_class`: the RMSNorm rounding of its decoder norms and final norm.

What the config already says needs no hook: partial RoPE and MLA's rotary width (`cfg.rotary_dim`), tied embeddings
(`lm_head` is None), and whether HF defines the load-balancing loss (`cfg.has_aux_loss`; then it is computed when
config.json sets `output_router_logits`, HF's default false).

Module paths are the canonical tensor names (`embed_tokens`, `layers[l].self_attn.*`, `layers[l].mlp.*`,
`layers[l].input_layernorm`, `layers[l].post_attention_layernorm`, `norm`, `lm_head`).
"""

from __future__ import annotations

from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jax_impl.lora import Frozen, LoRALinear
from jax_impl.models.attention import resolve_attn_implementation
from jax_impl.models.layers import (
    Attention,
    CausalLMOutput,
    DenseMLP,
    LayerCheckpointing,
    RMSNorm,
    RotaryEmbedding,
    causal_mask,
    lm_output,
    prepare_attention_mask,
    prepare_position_ids,
)
from shared_math.config import ModelConfig


def load_array(t: np.ndarray | jax.Array, dtype) -> jax.Array:
    """A canonical tensor as a jax array of `dtype`: a numpy one (possibly lazily read) is copied to the device, a
    jax array already there (`jax_impl.load.DeviceTensors`, random benchmark weights) is cast in place, never
    through host memory."""
    if isinstance(t, jax.Array):
        return t if t.dtype == jnp.dtype(dtype) else t.astype(dtype)
    return jnp.asarray(np.asarray(t), dtype=dtype)


def load_linear(layer: Mapping[str, np.ndarray], name: str, dtype) -> LoRALinear:
    """`name.weight` [in, out] (and `name.bias` when the checkpoint has one) as a frozen `LoRALinear`."""
    bias = layer.get(name + ".bias")
    return LoRALinear(load_array(layer[name + ".weight"], dtype), None if bias is None else load_array(bias, dtype))


def load_norm(layer: Mapping[str, np.ndarray], name: str, eps: float, dtype,
              norm_class: type[RMSNorm] = RMSNorm) -> RMSNorm:
    """`name.weight` as a `norm_class` (RMSNorm or a family's rounding of it)."""
    return norm_class(load_array(layer[name + ".weight"], dtype), eps)


def load_dense_mlp(layer: Mapping[str, np.ndarray], prefix: str, dtype) -> DenseMLP:
    """The SwiGLU MLP `prefix.{gate,up,down}_proj` (a dense layer's `mlp`, DeepSeek's `mlp.shared_experts`)."""
    return DenseMLP(*(load_linear(layer, f"{prefix}.{p}", dtype) for p in ("gate_proj", "up_proj", "down_proj")))


class DecoderLayer(nnx.Module):
    """h + self_attn(input_layernorm(h)), then h + mlp(post_attention_layernorm(h)).

    `self_attn(x, cos, sin, mask_BSS) -> [B, S, H]` is the family's attention; `mlp` an `MoEBlock` (on [T, H],
    returning `(y_TH, router_logits_TE)`) where `cfg.moe_layers[layer_idx]`, else a dense MLP; both norms are
    `norm_class`, read from `layer`. Router logits are returned only where the family has an aux loss
    (`cfg.has_aux_loss`), as torch_impl's twin."""

    def __init__(self, cfg: ModelConfig, layer: Mapping[str, np.ndarray], layer_idx: int, self_attn: nnx.Module,
                 mlp: nnx.Module, *, norm_class: type[RMSNorm] = RMSNorm, dtype):
        eps = cfg.rms_norm_eps
        self.input_layernorm = load_norm(layer, "input_layernorm", eps, dtype, norm_class)
        self.post_attention_layernorm = load_norm(layer, "post_attention_layernorm", eps, dtype, norm_class)
        self.self_attn = self_attn
        self.mlp = mlp
        self.is_moe = bool(cfg.moe_layers[layer_idx])
        self.returns_router_logits = self.is_moe and cfg.has_aux_loss

    def __call__(self, h_BSH, cos, sin, mask_BSS) -> tuple[jax.Array, jax.Array | None]:
        """-> (hidden [B, S, H], router_logits [T, E], or None for a dense layer or a family without aux loss);
        `mask_BSS` [B, S, S] bool or None (plain causal)."""
        h_BSH = h_BSH + self.self_attn(self.input_layernorm(h_BSH), cos, sin, mask_BSS)
        x_BSH = self.post_attention_layernorm(h_BSH)
        if not self.is_moe:
            return h_BSH + self.mlp(x_BSH), None
        B, S, H = x_BSH.shape
        y_TH, router_logits_TE = self.mlp(x_BSH.reshape(B * S, H))
        return h_BSH + y_TH.reshape(B, S, H), router_logits_TE if self.returns_router_logits else None


class CausalLM(LayerCheckpointing, nnx.Module):
    """The whole model (subclassed per family, see the module docstring for the hooks); build with
    `jax_impl.load_model` (or from canonical tensors directly).
    `__call__(input_ids [B, S], labels=None, position_ids=None, return_logits=True, *, attention_mask=None)
    -> CausalLMOutput`.

    With tied embeddings `lm_head` is None and the logits use `embed_tokens`ᵀ. `output_router_logits` (HF's config
    field, default False, and only for families with an aux loss) decides whether `aux_loss` is computed at all.
    `attn_implementation` (None, "xla", "cudnn" or "auto"; `models.attention`) picks every layer's attention."""

    family: str = ""  # the ModelConfig.family this class builds
    norm_class: type[RMSNorm] = RMSNorm

    def __init__(self, cfg: ModelConfig, tensors: Mapping[str, np.ndarray], *, dtype=jnp.float32,
                 moe_backend: str = "auto", attn_implementation: str | None = None):
        self.check_config(cfg)
        self.config = cfg
        self.lora_config = None
        self.dtype = jnp.dtype(dtype)
        self.embed_tokens = Frozen(load_array(tensors["embed_tokens.weight"], dtype))
        self.rotary_emb = RotaryEmbedding(cfg)
        # one layer's tensors at a time (CheckpointTensors.layer reads lazily), so host memory holds one layer
        layer_of = tensors.layer if hasattr(tensors, "layer") else (
            lambda l: {k[len(f"layers.{l}."):]: v for k, v in tensors.items() if k.startswith(f"layers.{l}.")})
        self.layers = nnx.List([self.decoder_layer(cfg, layer_of(l), l, moe_backend=moe_backend, dtype=dtype)
                                for l in range(cfg.num_hidden_layers)])
        self.norm = load_norm(tensors, "norm", cfg.rms_norm_eps, dtype, self.norm_class)
        self.lm_head = None if cfg.tie_word_embeddings else LoRALinear(load_array(tensors["lm_head.weight"], dtype))
        self.output_router_logits = cfg.has_aux_loss and bool(cfg.hf_config.get("output_router_logits", False))
        self.attn_implementation: str | None = None
        self.set_attn_implementation(attn_implementation)

    def set_attn_implementation(self, implementation: str | None) -> None:
        """Every layer's attention through `implementation` (None = the literal softmax, "xla", "cudnn", "auto";
        HF's method name). Checked here, before any work: "cudnn" needs a GPU and a bf16/fp16 model. A model
        split before (`nnx.split`) must be split again: the choice is part of its graph."""
        resolved = resolve_attn_implementation(implementation, self.dtype)
        for _, module in nnx.iter_modules(self):
            if module is not self and hasattr(module, "attn_implementation"):
                module.attn_implementation = resolved
        self.attn_implementation = resolved

    def tile_experts(self, tokens: int | None) -> None:
        """Run every MoE layer's routed experts over chunks of `tokens` tokens, recomputed chunk by chunk in the
        backward (`jax_impl.tiled_experts`: their activation memory is one chunk's, for long contexts), or untiled
        again with None; torch_impl's `CausalLM.tile_experts`. A model split before (`nnx.split`) must be split
        again: the chunk is part of its graph."""
        from jax_impl.moe import Experts

        if tokens is not None and (isinstance(tokens, bool) or not isinstance(tokens, int) or tokens < 1):
            raise ValueError(f"tile_experts takes a positive number of tokens per chunk or None, got {tokens!r}")
        experts = [m for _, m in nnx.iter_modules(self) if isinstance(m, Experts)]
        if tokens is not None and any(m.expert_parallel is not None and m.expert_parallel.mesh.shape["expert"] > 1
                                      for m in experts):
            # a data / fsdp mesh tiles each device's tokens; an expert axis exchanges a layer's tokens whole
            raise ValueError("tile_experts: this model's experts are sharded over ranks (expert parallelism), "
                             "which does not tile; use parallel.expert=1 or leave the experts untiled")
        for m in experts:
            m.token_chunk = tokens

    # ---- hooks ---------------------------------------------------------------------------------------------------
    def check_config(self, cfg: ModelConfig) -> None:
        """Raise for a config this class cannot build (another family; families add what they refuse)."""
        if cfg.family != self.family:
            raise ValueError(f"{type(self).__name__} needs a {self.family} config, got {cfg.family}")

    def build_attention(self, cfg: ModelConfig, layer: Mapping[str, np.ndarray], layer_idx: int, *,
                        dtype) -> nnx.Module:
        """Layer `layer_idx`'s attention, called as `(x [B, S, H], cos, sin, mask_BSS) -> [B, S, H]`."""
        norms = {}
        if cfg.use_qk_norm:
            norms = dict(q_norm=load_norm(layer, "self_attn.q_norm", cfg.rms_norm_eps, dtype),
                         k_norm=load_norm(layer, "self_attn.k_norm", cfg.rms_norm_eps, dtype))
        return Attention(cfg, *(load_linear(layer, f"self_attn.{p}", dtype)
                                for p in ("q_proj", "k_proj", "v_proj", "o_proj")), **norms)

    def build_moe(self, cfg: ModelConfig, layer: Mapping[str, np.ndarray], layer_idx: int, *, moe_backend: str,
                  dtype) -> nnx.Module:
        """Layer `layer_idx`'s `MoEBlock` (the family's router and experts)."""
        raise NotImplementedError(f"{type(self).__name__} must define build_moe")

    def build_mlp(self, cfg: ModelConfig, layer: Mapping[str, np.ndarray], layer_idx: int, *, moe_backend: str,
                  dtype) -> nnx.Module:
        """The MoE block where `cfg.moe_layers[layer_idx]`, else the dense SwiGLU MLP `mlp.{gate,up,down}_proj`."""
        if cfg.moe_layers[layer_idx]:
            return self.build_moe(cfg, layer, layer_idx, moe_backend=moe_backend, dtype=dtype)
        return load_dense_mlp(layer, "mlp", dtype)

    def decoder_layer(self, cfg: ModelConfig, layer: Mapping[str, np.ndarray], layer_idx: int, *,
                      moe_backend: str, dtype) -> DecoderLayer:
        self_attn = self.build_attention(cfg, layer, layer_idx, dtype=dtype)
        mlp = self.build_mlp(cfg, layer, layer_idx, moe_backend=moe_backend, dtype=dtype)
        return DecoderLayer(cfg, layer, layer_idx, self_attn, mlp, norm_class=self.norm_class, dtype=dtype)

    # ---- forward -------------------------------------------------------------------------------------------------
    def __call__(self, input_ids: jax.Array, labels: jax.Array | None = None,
                 position_ids: jax.Array | None = None, return_logits: bool = True, *,
                 attention_mask: jax.Array | None = None) -> CausalLMOutput:
        """input_ids [B, S] -> CausalLMOutput; position_ids [B, S] (restarting at 0 per packed sequence) or None
        (0..S-1, even with padding, as HF's forward). attention_mask [B, S] (HF's: 1 = token, 0 = padding) masks
        the attention of every layer, full and sliding (`causal_mask`), and the aux loss's router statistics; the
        loss is masked by labels = -100 only, as HF's, so padded positions need labels -100. `return_logits=False`
        with labels: the loss without the [B, S, V] logits (`lm_output`)."""
        # neither given: one unpadded document per row, plain causal attention with no mask tensor (flash kernels
        # then skip the masked half); under jit the values of given ones are unknown, so their mask is built
        plain_causal = position_ids is None and attention_mask is None
        position_ids = prepare_position_ids(input_ids, position_ids, self.config.vocab_size)
        attention_mask = prepare_attention_mask(input_ids, attention_mask)
        h_BSH = jnp.take(self.embed_tokens[...], input_ids, axis=0)
        cos, sin = self.rotary_emb(position_ids, self.dtype)
        # causal within documents, over real tokens; a sliding window is the attention module's (gpt-oss)
        mask_BSS = None if plain_causal else causal_mask(position_ids, attention_mask)
        router_logits = []
        for layer_idx, layer in enumerate(self.layers):  # the index: `checkpoint_layers` counts from the first
            h_BSH, logits_TE = self._run_layer(layer_idx, layer, h_BSH, cos, sin, mask_BSS)
            if logits_TE is not None:
                router_logits.append(logits_TE)
        return lm_output(self.norm(h_BSH), self.embed_tokens[...], self.lm_head, labels, router_logits, self.config,
                         self.output_router_logits, return_logits, attention_mask)
