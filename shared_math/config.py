"""Frozen configuration dataclasses shared by both implementations.

`ModelConfig.from_hf` turns a Hugging Face `config.json` (v4 or v5 spelling) of any supported MoE family into one
flat, validated description of everything the math needs: attention variant, routing variant, expert MLP variant,
which layers are MoE. `LoraConfig` describes split-LoRA adapters with PEFT's target names. `RoutingConfig` is the
slice of `ModelConfig` the router needs, so routing code never sees the whole model config.

`MATH_FIELDS` is the audit of every config.json field that changes the math, per family: HF's default, the values
torch_impl and jax_impl compute exactly as HF does, and why. `from_hf` refuses any other value up front
(`ModelConfigError`, naming the field), and the builders read those fields through `field_value`, so a key that
config.json leaves out means HF's default for that family.

No torch, no jax: numpy-free even, so it imports anywhere.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

SUPPORTED_MODEL_TYPES = ("qwen3_moe", "gpt_oss", "deepseek_v3", "glm4_moe", "glm4_moe_lite")

Family = Literal["qwen3_moe", "gpt_oss", "deepseek_v3", "glm4_moe", "glm4_moe_lite"]
RoutingMethod = Literal["softmax_topk", "topk_softmax", "sigmoid_group"]
Activation = Literal["swiglu", "swiglu_oai"]
# families whose checkpoints may carry multi-token-prediction layers after the decoder layers (num_nextn_predict_layers)
MTP_FAMILIES = ("deepseek_v3", "glm4_moe", "glm4_moe_lite")


class ModelConfigError(ValueError):
    """config.json describes a model that splitmoe would not compute as HF does: a value of a math-changing field
    that is not implemented (`MATH_FIELDS`), or an impossible one. The message names the field, the value found, the
    values supported and how to fix it. A ValueError, so `read_checkpoint` and the CLI report it as bad input."""


@dataclass(frozen=True)
class RoutingConfig:
    """How router logits `[T, E]` become `(expert_ids [T, K], expert_weights [T, K])` (SPEC.md, Routing).

    method:
      softmax_topk   Qwen3-MoE: softmax over E in fp32, top-K, optional renormalise.
      topk_softmax   gpt-oss: top-K on the (biased) logits, softmax over the K selected.
      sigmoid_group  DeepSeek-V3 / GLM-4.x: sigmoid, `+ correction bias` for selection only, group-limited top-K,
                     weights from the unbiased scores, optional renormalise, times `routed_scaling_factor`.
    """

    method: RoutingMethod
    num_experts: int
    top_k: int
    norm_topk_prob: bool = False
    n_group: int = 1
    topk_group: int = 1
    routed_scaling_factor: float = 1.0

    def __post_init__(self) -> None:
        if self.num_experts < 1:
            raise ValueError(f"num_experts must be >= 1, got {self.num_experts}")
        if not 1 <= self.top_k <= self.num_experts:
            raise ValueError(f"top_k must be in [1, num_experts={self.num_experts}], got {self.top_k}")
        if self.method == "sigmoid_group":
            if self.num_experts % self.n_group:
                raise ValueError(
                    f"n_routed_experts={self.num_experts} is not divisible by n_group={self.n_group}: "
                    "group-limited routing needs equal groups; fix n_group in config.json")
            per_group = self.num_experts // self.n_group
            if per_group < 2:
                raise ValueError(
                    f"each of the n_group={self.n_group} groups has {per_group} expert(s); the group score is "
                    "the sum of the top-2 scores in a group, so a group needs at least 2 experts")
            if not 1 <= self.topk_group <= self.n_group:
                raise ValueError(f"topk_group must be in [1, n_group={self.n_group}], got {self.topk_group}")
            if self.topk_group * per_group < self.top_k:
                raise ValueError(
                    f"topk_group={self.topk_group} groups of {per_group} experts hold fewer than "
                    f"num_experts_per_tok={self.top_k} experts; raise topk_group or lower num_experts_per_tok")


@dataclass(frozen=True)
class ModelConfig:
    """Everything the forward math needs, for every supported family. Built by `from_hf`; fields use HF names.

    Shape letters: V vocab, H hidden, I expert intermediate, E experts, K experts per token.
    """

    family: Family
    vocab_size: int
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    intermediate_size: int  # dense MLP width (dense layers); 0 when the family has none
    moe_intermediate_size: int  # I
    num_experts: int  # E (routed)
    num_experts_per_tok: int  # K
    rms_norm_eps: float
    max_position_embeddings: int
    tie_word_embeddings: bool
    # which layers hold an MoE block (the others a dense MLP), one entry per layer
    moe_layers: tuple[bool, ...]
    # routing and experts
    routing: RoutingConfig
    activation: Activation = "swiglu"
    expert_bias: bool = False  # gpt-oss: biases on gate_up and down
    swiglu_limit: float = 7.0
    swiglu_alpha: float = 1.702
    router_bias: bool = False  # gpt-oss: the router linear has a bias
    router_aux_loss_coef: float = 0.0
    has_aux_loss: bool = False  # HF computes a load-balancing loss for this family
    n_shared_experts: int = 0
    # attention
    attention: Literal["gqa", "mla"] = "gqa"
    attention_bias: bool = False  # q/k/v biases (and o for gpt-oss, see o_proj_bias)
    o_proj_bias: bool = False
    use_qk_norm: bool = False  # per-head RMSNorm on q and k before RoPE
    attention_sinks: bool = False  # gpt-oss learned per-head sinks
    layer_types: tuple[str, ...] = ()  # "full_attention" / "sliding_attention" per layer
    sliding_window: int | None = None
    rope_theta: float = 10000.0
    # HF rope_parameters minus rope_theta, None for default. A dict, so left out of the hash (equality still compares
    # it): jitted JAX steps hash the model's static attributes, the config among them (YaRN families)
    rope_scaling: Mapping[str, Any] | None = field(default=None, hash=False)
    partial_rotary_factor: float = 1.0
    rope_interleave: bool = False  # MLA: rotate interleaved pairs
    # MLA
    q_lora_rank: int | None = None
    kv_lora_rank: int = 0
    qk_nope_head_dim: int = 0
    qk_rope_head_dim: int = 0
    v_head_dim: int = 0
    # checkpoint layers right after the decoder layers that hold multi-token-prediction modules (DeepSeek-V3 / GLM:
    # config.json's num_nextn_predict_layers); no forward uses them, and read_checkpoint skips them (only them)
    num_nextn_predict_layers: int = 0
    # the raw config.json, for writers and for transformers; not part of equality
    hf_config: Mapping[str, Any] = field(default_factory=dict, repr=False, compare=False, hash=False)

    def __post_init__(self) -> None:
        # checked here too, not only in from_hf, so a config built by hand or by dataclasses.replace cannot describe
        # a model without layers (torch would build one of embeddings only; jax one with nothing to adapt)
        n = self.num_hidden_layers
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ModelConfigError(
                f"num_hidden_layers must be an integer >= 1, got {n!r}: a model needs at least one decoder layer; "
                "set num_hidden_layers in config.json to the checkpoint's number of decoder layers")
        if len(self.moe_layers) != n:
            raise ValueError(f"moe_layers has {len(self.moe_layers)} entries for num_hidden_layers={n}")
        if self.layer_types and len(self.layer_types) != n:
            raise ValueError(f"layer_types has {len(self.layer_types)} entries for num_hidden_layers={n}")
        if self.num_nextn_predict_layers < 0:
            raise ModelConfigError(f"num_nextn_predict_layers must be >= 0, got {self.num_nextn_predict_layers}")

    # ---- derived sizes -------------------------------------------------------------------------------------------
    @property
    def model_type(self) -> str:
        return self.family

    @property
    def num_moe_layers(self) -> int:
        return sum(self.moe_layers)

    @property
    def shared_intermediate_size(self) -> int:
        return self.moe_intermediate_size * self.n_shared_experts

    @property
    def qk_head_dim(self) -> int:
        """Per-head q/k width: head_dim for GQA, nope + rope dims for MLA."""
        return self.qk_nope_head_dim + self.qk_rope_head_dim if self.attention == "mla" else self.head_dim

    @property
    def rotary_dim(self) -> int:
        """How many leading dims of each q/k head RoPE rotates."""
        if self.attention == "mla":
            return self.qk_rope_head_dim
        return int(self.head_dim * self.partial_rotary_factor)

    # ---- construction --------------------------------------------------------------------------------------------
    @classmethod
    def from_hf(cls, source: str | Path | Mapping[str, Any]) -> ModelConfig:
        """Build from a checkpoint folder, a `config.json` path, or the parsed dict."""
        hf = _load_hf_dict(source)
        model_type = hf.get("model_type")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise ValueError(
                f"unsupported model_type {model_type!r}; splitmoe supports {', '.join(SUPPORTED_MODEL_TYPES)}")
        audit_hf_config(hf)  # refuse math that would be computed wrong before building anything
        return _BUILDERS[model_type](hf)

    def to_hf_dict(self) -> dict[str, Any]:
        """The config.json this config came from (for writers and for transformers)."""
        if not self.hf_config:
            raise ValueError("this ModelConfig was not built from a HF config; use ModelConfig.from_hf")
        return dict(self.hf_config)


def _load_hf_dict(source: str | Path | Mapping[str, Any]) -> dict[str, Any]:
    if isinstance(source, Mapping):
        return dict(source)
    path = Path(source)
    if path.is_dir():
        path = path / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"no config.json at {path}: pass a checkpoint folder, a config.json path or a dict")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from e


def _req(hf: Mapping[str, Any], *names: str) -> Any:
    """First present key among `names` (HF renamed fields between v4 and v5), else a clear error."""
    for n in names:
        if n in hf and hf[n] is not None:
            return hf[n]
    raise ValueError(f"config.json of model_type {hf.get('model_type')!r} lacks {' / '.join(names)}")


# ---- the audit: config.json fields that change the math --------------------------------------------------------------
# Every field of the five HF configuration classes (transformers 5.x configuration_*.py, and what modeling_*.py
# reads) that changes what the forward or the loss computes, per family, with HF's default, the values torch_impl and
# jax_impl compute exactly as HF does, and why. Left out on purpose:
# - fields that only set tensor sizes (vocab_size, hidden_size, intermediate_size, moe_intermediate_size, head and
#   expert counts, num_experts_per_tok, MLA ranks and head dims): every value is implemented, and read_checkpoint
#   checks each one against the checkpoint's tensor shapes;
# - fields that change nothing HF computes: initializer_range, use_cache, token ids, dtype, pretraining_tp,
#   max_window_layers (Qwen3; v5 reads it nowhere), DeepSeek's aux_loss_alpha / seq_aux / ep_size (its training
#   code's, which HF does not have), num_nextn_predict_layers (MTP modules no forward runs; read_checkpoint uses it).

_REQUIRED = "<required>"  # a default meaning config.json must give the field


@dataclass(frozen=True)
class Derived:
    """A default that HF derives from other fields: `text` says how, `fn` computes it from the config.json dict."""

    text: str
    fn: Callable[[Mapping[str, Any]], Any]

    def __repr__(self) -> str:
        return self.text


@dataclass(frozen=True)
class MathField:
    """One config.json field that changes the math, for one family.

    name      the config.json key (`rope_parameters.rope_type`: the type in rope_parameters, or v4's rope_scaling)
    default   HF's value when config.json leaves the key out (or sets it to null), for this family
    accepts   the values splitmoe computes as HF does, in words (the error quotes it)
    why       what the field changes, and why other values are refused (or why every value is fine)
    ok        value, whole config -> supported; None when every value is implemented
    null_is_value  null is a meaningful value (q_lora_rank: no q LoRA), not "use the default"
    """

    name: str
    default: Any
    accepts: str
    why: str
    ok: Callable[[Any, Mapping[str, Any]], bool] | None = None
    null_is_value: bool = False


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _int_at_least(low: int) -> Callable[[Any, Mapping[str, Any]], bool]:
    return lambda v, hf: _is_int(v) and v >= low


def _one_of(*values: Any) -> Callable[[Any, Mapping[str, Any]], bool]:
    # compared by type too, so True does not pass for 1 nor 0 for False
    return lambda v, hf: any(type(v) is type(x) and v == x for x in values)


def _positive(v: Any, hf: Mapping[str, Any]) -> bool:
    return _is_number(v) and v > 0


def _number(v: Any, hf: Mapping[str, Any]) -> bool:
    return _is_number(v)


def _list_of(*values: str) -> Callable[[Any, Mapping[str, Any]], bool]:
    return lambda v, hf: isinstance(v, Sequence) and not isinstance(v, str) and all(x in values for x in v)


def _gqa_head_dim(hf: Mapping[str, Any]) -> int:
    return int(_req(hf, "hidden_size")) // int(_req(hf, "num_attention_heads"))


def _even_rotary_dims(v: Any, hf: Mapping[str, Any]) -> bool:
    """GLM's partial RoPE: 0 < factor <= 1 leaving a non-zero, even number of rotated dims per head."""
    if not _is_number(v) or not 0 < v <= 1:
        return False
    head_dim = field_value(hf, "glm4_moe", "head_dim")
    if not _is_int(head_dim) or head_dim < 1:
        return True  # head_dim's own rule refuses it, naming head_dim
    rotary = int(head_dim * v)
    return rotary > 0 and rotary % 2 == 0


def _gpt_oss_layer_types(hf: Mapping[str, Any]) -> list[str]:
    n = int(_req(hf, "num_hidden_layers"))
    return ["sliding_attention" if l % 2 == 0 else "full_attention" for l in range(n)]


def _window_if_sliding(v: Any, hf: Mapping[str, Any]) -> bool:
    """gpt-oss: sliding layers need a window of >= 1 token (HF raises for none); without one the value is unused."""
    types = field_value(hf, "gpt_oss", "layer_types")
    return (_is_int(v) and v >= 1) or "sliding_attention" not in list(types)


_SILU = ("'silu' (or its alias 'swish')",
         "it is the activation of every expert, shared-expert and dense MLP, down(act(gate(x))·up(x)); torch_impl, "
         "jax_impl and their fused kernels compute SiLU only, so another value would give wrong logits with no "
         "error.")
_DROPOUT_WHY = ("HF drops attention probabilities at this rate in training mode; splitmoe's forward has no dropout "
                "(steps are deterministic and activation recompute keeps no RNG state), so fine-tuning would "
                "silently differ from HF + PEFT's. At evaluation the value changes nothing, so setting it to 0.0 "
                "in config.json loses only that regularisation.")
_ROPE_TYPE_WHY = ("it selects how the RoPE frequencies (and YaRN's attention factor) are computed; shared_math.rope "
                  "implements HF's 'default' and 'yarn' only (not linear, dynamic, longrope or llama3).")
_FULL_ROPE_WHY = ("it rotates only the first int(head_dim · factor) dims of each head; HF's {} rotates whole heads "
                  "(its apply_rotary_pos_emb fails for a factor < 1) and so do torch_impl and jax_impl.")
_MLA_ROPE_WHY = ("MLA rotates all qk_rope_head_dim dims of each head; HF's MLA fails for a factor < 1, and "
                 "torch_impl and jax_impl rotate the whole rope part.")
_BOTH = "true or false (both implemented)"


def _common_fields(*, layers_default: Any = _REQUIRED, eps: float, max_pos: int, theta: float = 10000.0,
                   rope_type: str = "default", attention_bias: bool = False, bias_what: str,
                   silu: bool = True, partial: MathField | None = None) -> list[MathField]:
    """The fields every family has, with this family's HF defaults."""
    act = (MathField("hidden_act", "silu", _SILU[0], _SILU[1], _one_of("silu", "swish")) if silu else
           MathField("hidden_act", "silu", "any value (HF ignores it for gpt-oss)",
                     "HF's gpt-oss experts apply their own clamped SwiGLU (swiglu_limit, swiglu_alpha) and nothing "
                     "reads hidden_act, so every value computes the same; the hub config says 'silu'."))
    return [
        MathField("num_hidden_layers", layers_default, "an integer >= 1",
                  "it is the number of decoder layers built and loaded; 0 would build a model without layers, and "
                  "checkpoint layers past it are refused by read_checkpoint (MTP layers excepted).",
                  _int_at_least(1)),
        act,
        MathField("attention_dropout", 0.0, "0 (no dropout)", _DROPOUT_WHY, lambda v, hf: _is_number(v) and v == 0),
        MathField("rope_parameters.rope_type", rope_type, "'default' or 'yarn'", _ROPE_TYPE_WHY,
                  _one_of("default", "yarn")),
        MathField("rope_theta", theta, "a number > 0 (implemented for every value)",
                  "the RoPE base wavelength.", _positive),
        partial or MathField("partial_rotary_factor", 1.0, "1.0", _MLA_ROPE_WHY, _one_of(1.0, 1)),
        MathField("rms_norm_eps", eps, "a number > 0 (implemented for every value)",
                  "the epsilon of every decoder RMSNorm.", _positive),
        MathField("max_position_embeddings", max_pos, "an integer >= 1 (implemented for every value)",
                  "YaRN's implicit original length and factor derive from it (as in HF), and data is packed into "
                  "sequences no longer than it.", _int_at_least(1)),
        MathField("tie_word_embeddings", False, _BOTH,
                  "with true the logits use embed_tokens.weightᵀ and the checkpoint has no lm_head."),
        MathField("attention_bias", attention_bias, _BOTH, f"it adds biases to {bias_what}; loaded and applied when "
                  "true."),
    ]


def _gqa_fields(family: str) -> list[MathField]:
    if family == "gpt-oss":  # GptOssConfig's field defaults to 64; only an explicit null derives it
        default = Derived("64 (hidden_size // num_attention_heads when null)",
                          lambda hf: _gqa_head_dim(hf) if "head_dim" in hf else 64)
    else:  # not a field of HF's config: modeling reads getattr(config, "head_dim", hidden_size // heads)
        default = Derived("hidden_size // num_attention_heads", _gqa_head_dim)
    return [MathField("head_dim", default, "an integer >= 1 (implemented for every value)",
                      f"the width of each attention head ({family} reads it when given).", _int_at_least(1))]


def _mla_fields_audit(q_lora_default: int) -> list[MathField]:
    return [
        MathField("head_dim", Derived("qk_rope_head_dim", lambda hf: hf.get("qk_rope_head_dim")),
                  "left out or equal to qk_rope_head_dim",
                  "HF's MLA configs set head_dim = qk_rope_head_dim (DeepseekV3Config overwrites it; "
                  "Glm4MoeLiteConfig aliases it to qk_rope_head_dim, so another value would change HF's RoPE "
                  "width); splitmoe takes the RoPE width from qk_rope_head_dim.",
                  lambda v, hf: v == hf.get("qk_rope_head_dim")),
        MathField("q_lora_rank", q_lora_default, "null or an integer >= 1 (both implemented)",
                  "null projects q with one q_proj; a rank projects it with q_a_proj, RMSNorm, q_b_proj.",
                  lambda v, hf: v is None or (_is_int(v) and v >= 1), null_is_value=True),
        MathField("rope_interleave", True, _BOTH, "true rotates interleaved (even, odd) pairs of the rope dims."),
    ]


def _sigmoid_routing_fields(*, n_group: int, topk_group: int, scale: float,
                            first_dense: int | None) -> list[MathField]:
    """DeepSeek-V3's router and MoE layout (HF shares it with GLM-4.x and GLM-4.7-Flash)."""
    ignored = ("HF computes sigmoid scores with e_score_correction_bias for selection and group-limited top-K "
               "('noaux_tc') whatever this key says (it is not a field of HF's config), and so does splitmoe; a "
               "checkpoint that names another method (DeepSeek-V2's softmax / greedy) was trained with routing "
               "that neither computes.")
    out = [
        MathField("norm_topk_prob", True, _BOTH, "true divides the K routing weights by their sum."),
        MathField("n_group", n_group, "an integer >= 1 (implemented for every value)",
                  "the experts form n_group groups for group-limited routing.", _int_at_least(1)),
        MathField("topk_group", topk_group, "an integer >= 1 (implemented for every value)",
                  "routing keeps the topk_group best groups.", _int_at_least(1)),
        MathField("routed_scaling_factor", scale, "a number (implemented for every value)",
                  "the routing weights are multiplied by it.", _number),
        MathField("n_shared_experts", 1, "an integer >= 0 (implemented for every value)",
                  "a shared SwiGLU expert of width moe_intermediate_size · n_shared_experts is added to every "
                  "MoE layer's output.", _int_at_least(0)),
        MathField("scoring_func", "sigmoid", "'sigmoid'", ignored, _one_of("sigmoid")),
        MathField("topk_method", "noaux_tc", "'noaux_tc'", ignored, _one_of("noaux_tc")),
        MathField("moe_layer_freq", 1, "1",
                  "DeepSeek's own code makes layer l an MoE layer only if l % moe_layer_freq == 0; HF (and "
                  "splitmoe) assume 1.", _one_of(1)),
    ]
    if first_dense is None:  # GLM-4.7-Flash: HF's Glm4MoeLite reads mlp_layer_types and ignores this key
        out.append(MathField("first_k_dense_replace", None, "any value (HF reads mlp_layer_types instead)",
                             "HF's Glm4MoeLite decides dense/sparse layers from mlp_layer_types alone."))
    else:
        out.append(MathField("first_k_dense_replace", first_dense, "an integer (implemented for every value)",
                             "layers 0 .. first_k_dense_replace-1 are dense MLPs, the rest MoE.",
                             lambda v, hf: _is_int(v)))
    return out


def _aux_fields() -> list[MathField]:
    return [
        MathField("router_aux_loss_coef", 0.001, "a number (implemented for every value)",
                  "the weight of the load-balancing loss added to the training loss.", _number),
        MathField("output_router_logits", False, _BOTH,
                  "true makes HF (and splitmoe) compute the load-balancing loss and add it to the loss."),
    ]


def _by_name(*groups: list[MathField]) -> dict[str, MathField]:
    return {f.name: f for group in groups for f in group}


MATH_FIELDS: Mapping[str, Mapping[str, MathField]] = {
    "qwen3_moe": _by_name(
        _common_fields(eps=1e-6, max_pos=32768, bias_what="q_proj, k_proj, v_proj and o_proj",
                       partial=MathField("partial_rotary_factor", 1.0, "1.0", _FULL_ROPE_WHY.format("Qwen3-MoE"),
                                         _one_of(1.0, 1))),
        _gqa_fields("Qwen3-MoE"),
        [MathField("use_sliding_window", False, "false (or true with sliding_window null, which HF treats as no "
                   "window)",
                   "with true HF limits every layer's attention to the last sliding_window keys; torch_impl and "
                   "jax_impl compute Qwen3-MoE's attention over the whole causal prefix.",
                   lambda v, hf: not v or hf.get("sliding_window") is None),
         MathField("decoder_sparse_step", 1, "an integer >= 1 (implemented for every value)",
                   "layer l is an MoE layer iff (l + 1) % decoder_sparse_step == 0 and l is not in mlp_only_layers "
                   "(0 divides by zero in HF).", _int_at_least(1)),
         MathField("mlp_only_layers", (), "a list of layer indices (implemented for every value)",
                   "the layers listed hold a dense MLP instead of an MoE block.",
                   lambda v, hf: isinstance(v, Sequence) and not isinstance(v, str) and all(map(_is_int, v))),
         MathField("norm_topk_prob", False, _BOTH, "true divides the K routing weights by their sum.")],
        _aux_fields()),
    "gpt_oss": _by_name(
        _common_fields(eps=1e-5, max_pos=131072, theta=150000.0, rope_type="yarn", attention_bias=True,
                       bias_what="q_proj, k_proj, v_proj and o_proj", silu=False,
                       partial=MathField("partial_rotary_factor", 1.0, "1.0", _FULL_ROPE_WHY.format("gpt-oss"),
                                         _one_of(1.0, 1))),
        _gqa_fields("gpt-oss"),
        [MathField("swiglu_limit", 7.0, "a number (implemented for every value)",
                   "the experts clamp gate (above) and up (both sides) to it before the SwiGLU.", _number),
         MathField("swiglu_alpha", 1.702, "a number (implemented for every value)",
                   "the sigmoid gain of the experts' SwiGLU, gate · sigmoid(alpha · gate).", _number),
         MathField("layer_types", Derived("sliding_attention on even layers, full_attention on odd",
                                          _gpt_oss_layer_types),
                   "a list of 'sliding_attention' / 'full_attention', one per layer",
                   "sliding layers see only the last sliding_window keys.",
                   _list_of("sliding_attention", "full_attention")),
         MathField("sliding_window", 128, "an integer >= 1 when any layer is sliding_attention",
                   "the number of keys a sliding layer sees (itself included); HF raises for none.",
                   _window_if_sliding, null_is_value=True)],
        _aux_fields()),
    "deepseek_v3": _by_name(
        _common_fields(eps=1e-6, max_pos=4096,
                       bias_what="q_a_proj, kv_a_proj_with_mqa and o_proj (MLA)"),
        _mla_fields_audit(1536),
        _sigmoid_routing_fields(n_group=8, topk_group=4, scale=2.5, first_dense=3)),
    "glm4_moe": _by_name(
        _common_fields(eps=1e-5, max_pos=131072, bias_what="q_proj, k_proj and v_proj (o_proj never has one)",
                       partial=MathField("partial_rotary_factor", 0.5,
                                         "a number in (0, 1] leaving an even, non-zero int(head_dim · factor)",
                                         "GLM rotates the first int(head_dim · factor) dims of each head (NeoX "
                                         "pairs); implemented for every factor that leaves whole pairs.",
                                         _even_rotary_dims)),
        _gqa_fields("GLM-4.x"),
        [MathField("use_qk_norm", False, _BOTH, "true applies a per-head RMSNorm to q and k before RoPE.")],
        _sigmoid_routing_fields(n_group=1, topk_group=1, scale=1.0, first_dense=1)),
    "glm4_moe_lite": _by_name(
        _common_fields(eps=1e-5, max_pos=202752,
                       bias_what="q_a_proj, kv_a_proj_with_mqa and o_proj (MLA)"),
        _mla_fields_audit(768),
        [MathField("mlp_layer_types", Derived("['dense'] + ['sparse'] * (num_hidden_layers - 1)",
                                              lambda hf: ["dense"] + ["sparse"] * (int(_req(hf, "num_hidden_layers"))
                                                                                   - 1)),
                   "a list of 'dense' / 'sparse', one per layer",
                   "'sparse' layers hold an MoE block, 'dense' ones a dense MLP (HF treats any other word as "
                   "dense, which would hide a typo).", _list_of("dense", "sparse"))],
        _sigmoid_routing_fields(n_group=1, topk_group=1, scale=1.8, first_dense=None)),
}
_ROPE_FIELDS = ("rope_parameters.rope_type", "rope_theta", "partial_rotary_factor")
# gpt-oss's RoPE when config.json gives neither rope_parameters nor rope_scaling (HF GptOssConfig.__post_init__)
_GPT_OSS_DEFAULT_ROPE = {"rope_type": "yarn", "factor": 32.0, "beta_fast": 32.0, "beta_slow": 1.0, "truncate": False,
                         "original_max_position_embeddings": 4096}


def field_value(hf: Mapping[str, Any], family: str, name: str) -> Any:
    """The value `family`'s model computes with for audited field `name` of config.json `hf`: the key's value, or
    HF's default for the family when it is left out (or null, unless null means something for that field)."""
    rule = MATH_FIELDS[family][name]
    if name in _ROPE_FIELDS:
        theta, scaling, partial = _rope(hf, family)
        return {"rope_theta": theta, "partial_rotary_factor": partial,
                "rope_parameters.rope_type": (scaling or {}).get("rope_type", "default")}[name]
    if name in hf and (hf[name] is not None or rule.null_is_value):
        return hf[name]
    if rule.default is _REQUIRED:
        raise ModelConfigError(f"config.json of model_type {family!r} lacks {name}")
    return rule.default.fn(hf) if isinstance(rule.default, Derived) else rule.default


def audit_hf_config(hf: Mapping[str, Any]) -> None:
    """Raise ModelConfigError for the first math-changing field of config.json `hf` whose value splitmoe does not
    compute as HF does (`MATH_FIELDS`), naming the field, the value, what is supported, and why it matters."""
    family = hf["model_type"]
    for rule in MATH_FIELDS[family].values():
        value = field_value(hf, family, rule.name)
        if rule.ok is not None and not rule.ok(value, hf):
            raise ModelConfigError(
                f"config.json of model_type {family!r} sets {rule.name}={value!r}, which splitmoe does not compute: "
                f"it supports {rule.accepts}. This field changes the math: {rule.why} If config.json is wrong, set "
                f"{rule.name} to a supported value (HF's default for {family} is {rule.default!r}); a model that "
                f"really uses {value!r} cannot be fine-tuned with splitmoe yet.")


def _rope(hf: Mapping[str, Any], family: str) -> tuple[float, dict[str, Any] | None, float]:
    """(theta, scaling-without-theta or None, partial_rotary_factor) from the v5 `rope_parameters` or v4 fields,
    with HF's defaults for `family` and YaRN's implicit values filled in (HF's standardize_rope_params)."""
    given = {k: hf.get(k) for k in ("rope_parameters", "rope_scaling")}
    for key, value in given.items():
        if value is not None and not isinstance(value, Mapping):
            raise ModelConfigError(f"config.json's {key} must be a mapping or null, got {value!r}")
        if isinstance(value, Mapping) and any(isinstance(v, Mapping) for v in value.values()):
            raise ModelConfigError(
                f"config.json's {key} holds one RoPE per layer type ({', '.join(value)}); {family} uses one RoPE "
                f"for every layer, which splitmoe implements: give one flat {key} (rope_type, rope_theta, ...)")
    params, legacy = dict(given["rope_parameters"] or {}), dict(given["rope_scaling"] or {})
    if not params and not legacy and family == "gpt_oss":
        params = dict(_GPT_OSS_DEFAULT_ROPE)

    def first(key: str, default: Any) -> Any:
        found = [d.pop(key, None) for d in (params, legacy)] + [hf.get(key)]
        return next((v for v in found if v is not None), default)

    rules = MATH_FIELDS[family]
    theta = first("rope_theta", rules["rope_theta"].default)
    partial = first("partial_rotary_factor", rules["partial_rotary_factor"].default)
    theta = float(theta) if _is_number(theta) else theta  # the audit names a non-number
    partial = float(partial) if _is_number(partial) else partial
    scaling = params or legacy
    if "type" in scaling and "rope_type" not in scaling:
        scaling["rope_type"] = scaling.pop("type")
    rope_type = scaling.get("rope_type", "default")
    if rope_type == "default":
        return theta, None, partial
    if rope_type == "yarn":  # HF's implicit values: the original length defaults to max_position_embeddings ...
        scaling.setdefault("original_max_position_embeddings", field_value(hf, family, "max_position_embeddings"))
        if scaling.get("factor") is None:  # ... and a missing factor is the ratio of the two (_compute_yarn_parameters)
            scaling["factor"] = (field_value(hf, family, "max_position_embeddings")
                                 / scaling["original_max_position_embeddings"])
    return theta, scaling, partial


def _common(hf: Mapping[str, Any], family: str, head_dim: int) -> dict[str, Any]:
    theta, scaling, partial = _rope(hf, family)
    return dict(
        vocab_size=int(_req(hf, "vocab_size")),
        hidden_size=int(_req(hf, "hidden_size")),
        num_hidden_layers=int(field_value(hf, family, "num_hidden_layers")),
        num_attention_heads=int(_req(hf, "num_attention_heads")),
        num_key_value_heads=int(hf.get("num_key_value_heads") or hf["num_attention_heads"]),
        head_dim=head_dim,
        rms_norm_eps=float(field_value(hf, family, "rms_norm_eps")),
        max_position_embeddings=int(field_value(hf, family, "max_position_embeddings")),
        tie_word_embeddings=bool(field_value(hf, family, "tie_word_embeddings")),
        rope_theta=theta,
        rope_scaling=scaling,
        partial_rotary_factor=partial,
        hf_config=dict(hf),
    )


def _build_qwen3_moe(hf: Mapping[str, Any]) -> ModelConfig:
    def f(name: str) -> Any:
        return field_value(hf, "qwen3_moe", name)

    n_layers = int(f("num_hidden_layers"))
    step = int(f("decoder_sparse_step"))
    mlp_only = set(f("mlp_only_layers"))
    moe = tuple(l not in mlp_only and (l + 1) % step == 0 for l in range(n_layers))
    E = int(_req(hf, "num_experts", "num_local_experts"))
    K = int(_req(hf, "num_experts_per_tok"))
    c = _common(hf, "qwen3_moe", int(f("head_dim")))
    return ModelConfig(
        family="qwen3_moe", **c,
        intermediate_size=int(hf.get("intermediate_size", 0)),
        moe_intermediate_size=int(_req(hf, "moe_intermediate_size")),
        num_experts=E, num_experts_per_tok=K, moe_layers=moe,
        routing=RoutingConfig("softmax_topk", E, K, norm_topk_prob=bool(f("norm_topk_prob"))),
        router_aux_loss_coef=float(f("router_aux_loss_coef")), has_aux_loss=True,
        attention_bias=bool(f("attention_bias")), o_proj_bias=bool(f("attention_bias")),
        use_qk_norm=True,
        # None for every config the audit lets through (a window is refused; the models refuse it too)
        sliding_window=hf.get("sliding_window") if f("use_sliding_window") else None,
    )


def _build_gpt_oss(hf: Mapping[str, Any]) -> ModelConfig:
    def f(name: str) -> Any:
        return field_value(hf, "gpt_oss", name)

    n_layers = int(f("num_hidden_layers"))
    E = int(_req(hf, "num_local_experts", "num_experts"))
    K = int(_req(hf, "num_experts_per_tok", "experts_per_token"))
    layer_types = tuple(f("layer_types"))
    if len(layer_types) != n_layers:
        raise ModelConfigError(f"layer_types has {len(layer_types)} entries for num_hidden_layers={n_layers}; "
                               "give one 'sliding_attention' / 'full_attention' per layer")
    window = f("sliding_window")
    I = int(_req(hf, "intermediate_size"))
    c = _common(hf, "gpt_oss", int(f("head_dim")))
    return ModelConfig(
        family="gpt_oss", **c,
        intermediate_size=0, moe_intermediate_size=I,
        num_experts=E, num_experts_per_tok=K, moe_layers=(True,) * n_layers,
        routing=RoutingConfig("topk_softmax", E, K),
        activation="swiglu_oai", expert_bias=True, router_bias=True,
        swiglu_limit=float(f("swiglu_limit")), swiglu_alpha=float(f("swiglu_alpha")),
        router_aux_loss_coef=float(f("router_aux_loss_coef")), has_aux_loss=True,
        attention_bias=bool(f("attention_bias")), o_proj_bias=bool(f("attention_bias")),
        attention_sinks=True, layer_types=layer_types, sliding_window=None if window is None else int(window),
    )


def _sigmoid_routing(hf: Mapping[str, Any], family: str) -> RoutingConfig:
    def f(name: str) -> Any:
        return field_value(hf, family, name)

    return RoutingConfig(
        "sigmoid_group", int(_req(hf, "n_routed_experts")), int(_req(hf, "num_experts_per_tok")),
        norm_topk_prob=bool(f("norm_topk_prob")), n_group=int(f("n_group")), topk_group=int(f("topk_group")),
        routed_scaling_factor=float(f("routed_scaling_factor")),
    )


def _mla_fields(hf: Mapping[str, Any], family: str) -> dict[str, Any]:
    q_lora = field_value(hf, family, "q_lora_rank")
    bias = bool(field_value(hf, family, "attention_bias"))
    return dict(
        attention="mla", q_lora_rank=None if q_lora is None else int(q_lora),
        kv_lora_rank=int(_req(hf, "kv_lora_rank")), qk_nope_head_dim=int(_req(hf, "qk_nope_head_dim")),
        qk_rope_head_dim=int(_req(hf, "qk_rope_head_dim")), v_head_dim=int(_req(hf, "v_head_dim")),
        rope_interleave=bool(field_value(hf, family, "rope_interleave")), attention_bias=bias,
        # MLA's attention_bias puts biases on q_a_proj, kv_a_proj_with_mqa and o_proj (HF modeling_deepseek_v3)
        o_proj_bias=bias,
    )


def _mtp_layers(hf: Mapping[str, Any]) -> int:
    """num_nextn_predict_layers (HF v5 attribute: num_mtp_layers). HF's default is 1 for DeepSeek-V3 and GLM-4.x,
    and its GLM-4.7-Flash ignores one layer after the decoder too (layers.47), so a missing key means 1; only layers
    that hold an MTP module (eh_proj) are ever skipped (read_checkpoint), so the default cannot hide a layer."""
    n = next((hf[k] for k in ("num_nextn_predict_layers", "num_mtp_layers") if hf.get(k) is not None), 1)
    if not _is_int(n) or n < 0:
        raise ModelConfigError(f"num_nextn_predict_layers must be an integer >= 0 (the checkpoint's MTP layers after "
                               f"the decoder layers), got {n!r}")
    return n


def _build_deepseek_like(hf: Mapping[str, Any], family: Family) -> ModelConfig:
    def f(name: str) -> Any:
        return field_value(hf, family, name)

    n_layers = int(f("num_hidden_layers"))
    if family == "glm4_moe_lite":
        types = list(f("mlp_layer_types"))
        if len(types) != n_layers:
            raise ModelConfigError(f"mlp_layer_types has {len(types)} entries for num_hidden_layers={n_layers}; "
                                   "give one 'dense' / 'sparse' per layer")
        moe = tuple(t == "sparse" for t in types)
    else:
        first_dense = int(f("first_k_dense_replace"))
        moe = tuple(l >= first_dense for l in range(n_layers))
    routing = _sigmoid_routing(hf, family)
    extra = _mla_fields(hf, family) if family != "glm4_moe" else dict(
        attention_bias=bool(f("attention_bias")), use_qk_norm=bool(f("use_qk_norm")))
    head_dim = int(_req(hf, "qk_rope_head_dim")) if family != "glm4_moe" else int(f("head_dim"))
    c = _common(hf, family, head_dim)
    return ModelConfig(
        family=family, **c,
        intermediate_size=int(_req(hf, "intermediate_size")),
        moe_intermediate_size=int(_req(hf, "moe_intermediate_size")),
        num_experts=routing.num_experts, num_experts_per_tok=routing.top_k, moe_layers=moe, routing=routing,
        n_shared_experts=int(f("n_shared_experts")), num_nextn_predict_layers=_mtp_layers(hf), **extra,
    )


_BUILDERS = {
    "qwen3_moe": _build_qwen3_moe,
    "gpt_oss": _build_gpt_oss,
    "deepseek_v3": lambda hf: _build_deepseek_like(hf, "deepseek_v3"),
    "glm4_moe": lambda hf: _build_deepseek_like(hf, "glm4_moe"),
    "glm4_moe_lite": lambda hf: _build_deepseek_like(hf, "glm4_moe_lite"),
}


# ---- LoRA ------------------------------------------------------------------------------------------------------------

# PEFT `target_modules` names (nn.Linear modules), by where they occur.
ATTENTION_TARGETS_GQA = ("q_proj", "k_proj", "v_proj", "o_proj")
ATTENTION_TARGETS_MLA = ("q_proj", "q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj")
DENSE_MLP_TARGETS = ("gate_proj", "up_proj", "down_proj")  # dense layers' MLP and shared experts
# PEFT `target_parameters` (3-D expert tensors). PEFT names them "mlp.experts.gate_up_proj"; we accept that spelling,
# "experts.gate_up_proj", and the bare "gate_up_proj" (only the experts have a fused gate_up).
EXPERT_TARGETS = ("experts.gate_up_proj", "experts.down_proj")
_ALIASES = {"gate_up_proj": "experts.gate_up_proj",
            "mlp.experts.gate_up_proj": "experts.gate_up_proj",
            "mlp.experts.down_proj": "experts.down_proj"}
ALL_TARGETS = tuple(dict.fromkeys(ATTENTION_TARGETS_GQA + ATTENTION_TARGETS_MLA + DENSE_MLP_TARGETS + EXPERT_TARGETS))
DEFAULT_TARGETS = ATTENTION_TARGETS_GQA + EXPERT_TARGETS


def _check_unsloth_spelling(targets: tuple[str, ...]) -> None:
    """Unsloth's MoE docs write the expert tensors as bare `gate_up_proj` and `down_proj`. `gate_up_proj` names only
    the fused experts here too (no Linear has that name), so it is accepted with a one-line note. `down_proj` beside
    it is ambiguous: in PEFT's names it is the dense and shared-expert MLPs' Linear, in Unsloth's the experts'
    tensor. That is refused with both PEFT spellings, never mapped silently to one module set."""
    import warnings

    if "gate_up_proj" not in targets:
        return
    if "down_proj" in targets and not {"gate_proj", "up_proj"} & set(targets):
        raise ValueError(
            "LoRA targets list gate_up_proj and down_proj (Unsloth's spelling of the expert tensors): in PEFT's names, "
            "which splitmoe uses, down_proj is the dense / shared-expert MLPs' Linear. Write experts.down_proj for "
            "the experts' down projection, and gate_proj, up_proj, down_proj for the dense MLPs if you want those too")
    warnings.warn("LoRA target gate_up_proj taken as experts.gate_up_proj (the fused expert tensor, PEFT's "
                  "target_parameters)", UserWarning, stacklevel=4)


@dataclass(frozen=True)
class LoraConfig:
    """Split-LoRA adapters: `y = x·W + scale·(x·A)·B`, A `[in, R]`, B `[R, out]` (per expert for the experts).

    targets use PEFT's names: Linear modules by their module name (`q_proj`, ..., `down_proj` of dense and shared
    MLPs), expert tensors as `experts.gate_up_proj` / `experts.down_proj` (PEFT's `target_parameters`).
    `scale` is alpha/rank, or alpha/sqrt(rank) with rsLoRA, as PEFT defines it.
    `target_ranks` / `target_alphas` override rank / alpha for single targets (PEFT's rank_pattern / alpha_pattern,
    keyed by target name: `{"experts.gate_up_proj": 32}`, as PEFT makes it when it fuses gate_proj + up_proj
    LoRA); given as a mapping, stored as sorted (target, value) pairs so the config stays hashable.
    """

    rank: int = 16
    alpha: float = 32.0
    targets: tuple[str, ...] = DEFAULT_TARGETS
    rslora: bool = False
    train_router: bool = False  # unfreeze the router weight (full parameter, not LoRA)
    target_ranks: Mapping[str, int] | tuple[tuple[str, int], ...] = ()
    target_alphas: Mapping[str, float] | tuple[tuple[str, float], ...] = ()

    def __post_init__(self) -> None:
        if isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank < 1:
            raise ValueError(f"LoRA rank must be an integer >= 1, got {self.rank!r}")
        if not (isinstance(self.alpha, (int, float)) and math.isfinite(self.alpha) and self.alpha > 0):
            raise ValueError(f"LoRA alpha must be a finite number > 0, got {self.alpha!r}")
        if isinstance(self.targets, str):
            raise ValueError(f"LoRA targets must be a list of names, got the string {self.targets!r}")
        if not self.targets:
            raise ValueError("LoRA targets is empty: name at least one of " + ", ".join(ALL_TARGETS))
        _check_unsloth_spelling(tuple(self.targets))
        canon = tuple(dict.fromkeys(_ALIASES.get(t, t) for t in self.targets))
        unknown = [t for t in canon if t not in ALL_TARGETS]
        if unknown:
            raise ValueError(f"unknown LoRA target(s) {unknown}; known targets: {', '.join(ALL_TARGETS)}")
        object.__setattr__(self, "targets", canon)
        for name in ("target_ranks", "target_alphas"):
            object.__setattr__(self, name, self._per_target(name, getattr(self, name)))

    def _per_target(self, name: str, given: Any) -> tuple[tuple[str, Any], ...]:
        pairs = list(given.items()) if isinstance(given, Mapping) else list(given or ())
        out: dict[str, Any] = {}
        for pair in pairs:
            if not (isinstance(pair, (tuple, list)) and len(pair) == 2 and isinstance(pair[0], str)):
                raise ValueError(f"LoRA {name} must map target names to values, got {given!r}")
            target, value = _ALIASES.get(pair[0], pair[0]), pair[1]
            if target not in self.targets:
                raise ValueError(f"LoRA {name} names {pair[0]!r}, which is not one of the targets {list(self.targets)}")
            if name == "target_ranks" and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ValueError(f"LoRA {name}[{target!r}] must be an integer >= 1, got {value!r}")
            if name == "target_alphas" and not (isinstance(value, (int, float)) and not isinstance(value, bool)
                                                and math.isfinite(value) and value > 0):
                raise ValueError(f"LoRA {name}[{target!r}] must be a finite number > 0, got {value!r}")
            out[target] = value if name == "target_ranks" else float(value)
        return tuple((t, out[t]) for t in self.targets if t in out)  # one order: equal configs compare equal

    @property
    def scale(self) -> float:
        """The scale of every target without its own rank or alpha (`scale_of` gives any target's)."""
        return self.alpha / (math.sqrt(self.rank) if self.rslora else self.rank)

    def rank_of(self, target: str) -> int:
        """The LoRA rank of `target` (a name of `targets`): its `target_ranks` entry, else `rank`."""
        return dict(self.target_ranks).get(_ALIASES.get(target, target), self.rank)

    def alpha_of(self, target: str) -> float:
        """The LoRA alpha of `target`: its `target_alphas` entry, else `alpha`."""
        return dict(self.target_alphas).get(_ALIASES.get(target, target), self.alpha)

    def scale_of(self, target: str) -> float:
        """alpha/rank (alpha/sqrt(rank) with rsLoRA) of `target`, as PEFT computes each module's scaling."""
        r = self.rank_of(target)
        return self.alpha_of(target) / (math.sqrt(r) if self.rslora else r)

    @property
    def module_targets(self) -> tuple[str, ...]:
        """PEFT `target_modules`: the Linear-module targets."""
        return tuple(t for t in self.targets if t not in EXPERT_TARGETS)

    @property
    def expert_targets(self) -> tuple[str, ...]:
        """PEFT `target_parameters`, spelled as PEFT saves them (`mlp.experts.gate_up_proj`)."""
        return tuple("mlp." + t for t in self.targets if t in EXPERT_TARGETS)

    def validate_for(self, model: ModelConfig) -> None:
        """Raise ValueError naming each target that this model has no module for."""
        present = set(available_targets(model))
        missing = [t for t in self.targets if t not in present]
        if missing:
            raise ValueError(
                f"LoRA target(s) {missing} do not exist in a {model.family} model; "
                f"its targets are: {', '.join(available_targets(model))}")


def available_targets(model: ModelConfig) -> tuple[str, ...]:
    """The LoRA targets that exist in `model` (attention variant, dense/shared MLPs, experts)."""
    if model.attention == "mla":
        attn = ("q_proj",) if model.q_lora_rank is None else ("q_a_proj", "q_b_proj")
        attn += ("kv_a_proj_with_mqa", "kv_b_proj", "o_proj")
    else:
        attn = ATTENTION_TARGETS_GQA
    has_dense = (not all(model.moe_layers)) or model.n_shared_experts > 0
    return attn + (DENSE_MLP_TARGETS if has_dense else ()) + EXPERT_TARGETS
