"""Frozen configuration dataclasses shared by both implementations.

`ModelConfig.from_hf` turns a Hugging Face `config.json` (v4 or v5 spelling) of any supported MoE family into one
flat, validated description of everything the math needs: attention variant, routing variant, expert MLP variant,
which layers are MoE. `LoraConfig` describes split-LoRA adapters with PEFT's target names. `RoutingConfig` is the
slice of `ModelConfig` the router needs, so routing code never sees the whole model config.

No torch, no jax: numpy-free even, so it imports anywhere.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

SUPPORTED_MODEL_TYPES = ("qwen3_moe", "gpt_oss", "deepseek_v3", "glm4_moe", "glm4_moe_lite")

Family = Literal["qwen3_moe", "gpt_oss", "deepseek_v3", "glm4_moe", "glm4_moe_lite"]
RoutingMethod = Literal["softmax_topk", "topk_softmax", "sigmoid_group"]
Activation = Literal["swiglu", "swiglu_oai"]


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
    # the raw config.json, for writers and for transformers; not part of equality
    hf_config: Mapping[str, Any] = field(default_factory=dict, repr=False, compare=False, hash=False)

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


def _rope(hf: Mapping[str, Any]) -> tuple[float, dict[str, Any] | None, float]:
    """(theta, scaling-without-theta or None, partial_rotary_factor) from the v5 `rope_parameters` or v4 fields."""
    params = dict(hf.get("rope_parameters") or {})
    legacy = hf.get("rope_scaling") or {}
    theta = float(params.pop("rope_theta", hf.get("rope_theta", 10000.0)))
    partial = float(params.pop("partial_rotary_factor", hf.get("partial_rotary_factor", 1.0)))
    scaling = params or dict(legacy)
    if "type" in scaling and "rope_type" not in scaling:
        scaling["rope_type"] = scaling.pop("type")
    if scaling.get("rope_type", "default") == "default":
        scaling = None
    return theta, scaling, partial


def _common(hf: Mapping[str, Any], head_dim: int) -> dict[str, Any]:
    theta, scaling, partial = _rope(hf)
    n_layers = int(_req(hf, "num_hidden_layers"))
    return dict(
        vocab_size=int(_req(hf, "vocab_size")),
        hidden_size=int(_req(hf, "hidden_size")),
        num_hidden_layers=n_layers,
        num_attention_heads=int(_req(hf, "num_attention_heads")),
        num_key_value_heads=int(hf.get("num_key_value_heads") or hf["num_attention_heads"]),
        head_dim=head_dim,
        rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        max_position_embeddings=int(hf.get("max_position_embeddings", 4096)),
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
        rope_theta=theta,
        rope_scaling=scaling,
        partial_rotary_factor=partial,
        hf_config=dict(hf),
    )


def _build_qwen3_moe(hf: Mapping[str, Any]) -> ModelConfig:
    heads = int(_req(hf, "num_attention_heads"))
    head_dim = int(hf.get("head_dim") or int(hf["hidden_size"]) // heads)
    n_layers = int(_req(hf, "num_hidden_layers"))
    step = int(hf.get("decoder_sparse_step", 1) or 1)
    mlp_only = set(hf.get("mlp_only_layers") or [])
    moe = tuple(l not in mlp_only and (l + 1) % step == 0 for l in range(n_layers))
    E = int(_req(hf, "num_experts", "num_local_experts"))
    K = int(_req(hf, "num_experts_per_tok"))
    c = _common(hf, head_dim)
    return ModelConfig(
        family="qwen3_moe", **c,
        intermediate_size=int(hf.get("intermediate_size", 0)),
        moe_intermediate_size=int(_req(hf, "moe_intermediate_size")),
        num_experts=E, num_experts_per_tok=K, moe_layers=moe,
        routing=RoutingConfig("softmax_topk", E, K, norm_topk_prob=bool(hf.get("norm_topk_prob", False))),
        router_aux_loss_coef=float(hf.get("router_aux_loss_coef", 0.0)), has_aux_loss=True,
        attention_bias=bool(hf.get("attention_bias", False)), o_proj_bias=bool(hf.get("attention_bias", False)),
        use_qk_norm=True,
        sliding_window=hf.get("sliding_window") if hf.get("use_sliding_window") else None,
    )


def _build_gpt_oss(hf: Mapping[str, Any]) -> ModelConfig:
    heads = int(_req(hf, "num_attention_heads"))
    head_dim = int(hf.get("head_dim") or int(hf["hidden_size"]) // heads)
    n_layers = int(_req(hf, "num_hidden_layers"))
    E = int(_req(hf, "num_local_experts", "num_experts"))
    K = int(_req(hf, "num_experts_per_tok", "experts_per_token"))
    layer_types = tuple(hf.get("layer_types") or
                        ["sliding_attention" if l % 2 == 0 else "full_attention" for l in range(n_layers)])
    if len(layer_types) != n_layers:
        raise ValueError(f"layer_types has {len(layer_types)} entries for {n_layers} layers")
    I = int(_req(hf, "intermediate_size"))
    c = _common(hf, head_dim)
    return ModelConfig(
        family="gpt_oss", **c,
        intermediate_size=0, moe_intermediate_size=I,
        num_experts=E, num_experts_per_tok=K, moe_layers=(True,) * n_layers,
        routing=RoutingConfig("topk_softmax", E, K),
        activation="swiglu_oai", expert_bias=True, router_bias=True,
        swiglu_limit=float(hf.get("swiglu_limit", 7.0)), swiglu_alpha=float(hf.get("swiglu_alpha", 1.702)),
        router_aux_loss_coef=float(hf.get("router_aux_loss_coef", 0.0)), has_aux_loss=True,
        attention_bias=bool(hf.get("attention_bias", True)), o_proj_bias=bool(hf.get("attention_bias", True)),
        attention_sinks=True, layer_types=layer_types, sliding_window=int(hf.get("sliding_window") or 128),
    )


def _sigmoid_routing(hf: Mapping[str, Any]) -> RoutingConfig:
    return RoutingConfig(
        "sigmoid_group", int(_req(hf, "n_routed_experts")), int(_req(hf, "num_experts_per_tok")),
        norm_topk_prob=bool(hf.get("norm_topk_prob", True)),
        n_group=int(hf.get("n_group") or 1), topk_group=int(hf.get("topk_group") or 1),
        routed_scaling_factor=float(hf.get("routed_scaling_factor", 1.0)),
    )


def _mla_fields(hf: Mapping[str, Any]) -> dict[str, Any]:
    q_lora = hf.get("q_lora_rank")
    return dict(
        attention="mla", q_lora_rank=int(q_lora) if q_lora else None,
        kv_lora_rank=int(_req(hf, "kv_lora_rank")), qk_nope_head_dim=int(_req(hf, "qk_nope_head_dim")),
        qk_rope_head_dim=int(_req(hf, "qk_rope_head_dim")), v_head_dim=int(_req(hf, "v_head_dim")),
        rope_interleave=bool(hf.get("rope_interleave", True)), attention_bias=bool(hf.get("attention_bias", False)),
        # MLA's attention_bias puts biases on q_a_proj, kv_a_proj_with_mqa and o_proj (HF modeling_deepseek_v3)
        o_proj_bias=bool(hf.get("attention_bias", False)),
    )


def _build_deepseek_like(hf: Mapping[str, Any], family: Family) -> ModelConfig:
    n_layers = int(_req(hf, "num_hidden_layers"))
    if family == "glm4_moe_lite":
        types = hf.get("mlp_layer_types") or (["dense"] + ["sparse"] * (n_layers - 1))
        if len(types) != n_layers:
            raise ValueError(f"mlp_layer_types has {len(types)} entries for {n_layers} layers")
        moe = tuple(t == "sparse" for t in types)
    else:
        first_dense = int(hf.get("first_k_dense_replace", 0))
        moe = tuple(l >= first_dense for l in range(n_layers))
    routing = _sigmoid_routing(hf)
    extra = _mla_fields(hf) if family != "glm4_moe" else dict(
        attention_bias=bool(hf.get("attention_bias", False)), use_qk_norm=bool(hf.get("use_qk_norm", False)))
    heads = int(_req(hf, "num_attention_heads"))
    head_dim = (int(_req(hf, "qk_rope_head_dim")) if family != "glm4_moe"
                else int(hf.get("head_dim") or int(hf["hidden_size"]) // heads))
    c = _common(hf, head_dim)
    if family == "glm4_moe" and "partial_rotary_factor" not in {**hf, **(hf.get("rope_parameters") or {})}:
        c["partial_rotary_factor"] = 0.5  # HF Glm4MoeConfig's default when config.json does not say
    return ModelConfig(
        family=family, **c,
        intermediate_size=int(_req(hf, "intermediate_size")),
        moe_intermediate_size=int(_req(hf, "moe_intermediate_size")),
        num_experts=routing.num_experts, num_experts_per_tok=routing.top_k, moe_layers=moe, routing=routing,
        n_shared_experts=int(hf.get("n_shared_experts") or 0), **extra,
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
