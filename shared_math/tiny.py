"""Tiny random checkpoints of every supported family, for tests and demos (no Hub access needed).

`tiny_hf_config(family)` is a complete config.json dict (vocab 128, H 64, 2 layers, 4 heads; hf-moe-formats.md §8)
that transformers loads as is, with a dense first layer where the family has dense layers.
`random_canonical_tensors(cfg, seed)` draws canonical tensors whose activations stay O(1) through the model, so a
layout or norm bug changes the outputs visibly instead of hiding under near-zero signals;
`lazy_random_canonical_tensors(cfg, seed)` draws the same distributions one tensor at a time, for full-size shapes.
`write_tiny_checkpoint(family, dir)` writes both as a HF checkpoint.
"""

from __future__ import annotations

import copy
import zlib
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from shared_math.config import SUPPORTED_MODEL_TYPES, ModelConfig

if TYPE_CHECKING:
    from shared_math.checkpoint import Layout

_COMMON: dict[str, Any] = dict(vocab_size=128, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                               max_position_embeddings=256, initializer_range=0.02, tie_word_embeddings=False,
                               hidden_act="silu", attention_dropout=0.0, use_cache=True)

# MLA sizes shared by deepseek_v3 and glm4_moe_lite: q_lora 24, kv_lora 16, q/k head = 16 nope + 8 rope, v 16.
_MLA: dict[str, Any] = dict(num_key_value_heads=4, q_lora_rank=24, kv_lora_rank=16, qk_nope_head_dim=16,
                            qk_rope_head_dim=8, v_head_dim=16, rope_interleave=True, attention_bias=False)

_FAMILY: dict[str, dict[str, Any]] = {
    "qwen3_moe": dict(
        architectures=["Qwen3MoeForCausalLM"], num_key_value_heads=2, head_dim=32, intermediate_size=96,
        moe_intermediate_size=32, num_experts=8, num_experts_per_tok=2, norm_topk_prob=True,
        decoder_sparse_step=1, mlp_only_layers=[], router_aux_loss_coef=0.001, rms_norm_eps=1e-6,
        attention_bias=False, use_sliding_window=False, sliding_window=None,
        rope_parameters={"rope_type": "default", "rope_theta": 1000000.0}),
    "gpt_oss": dict(
        architectures=["GptOssForCausalLM"], num_key_value_heads=2, head_dim=16, intermediate_size=32,
        num_local_experts=8, num_experts_per_tok=2, sliding_window=8,
        layer_types=["sliding_attention", "full_attention"], attention_bias=True, rms_norm_eps=1e-5,
        router_aux_loss_coef=0.9, swiglu_limit=7.0,
        # yarn as on the hub, but with an original length below max_position_embeddings so it is active
        rope_parameters={"rope_type": "yarn", "rope_theta": 150000.0, "factor": 4.0, "beta_fast": 32.0,
                         "beta_slow": 1.0, "original_max_position_embeddings": 64, "truncate": False}),
    "deepseek_v3": dict(
        architectures=["DeepseekV3ForCausalLM"], **_MLA, intermediate_size=96, moe_intermediate_size=32,
        n_routed_experts=8, n_shared_experts=1, num_experts_per_tok=2, n_group=4, topk_group=2,
        first_k_dense_replace=1, routed_scaling_factor=2.5, norm_topk_prob=True, rms_norm_eps=1e-6,
        rope_parameters={"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "mscale": 1.0,
                         "mscale_all_dim": 1.0, "original_max_position_embeddings": 64, "beta_fast": 32.0,
                         "beta_slow": 1.0}),
    "glm4_moe": dict(
        architectures=["Glm4MoeForCausalLM"], num_key_value_heads=2, head_dim=32, intermediate_size=96,
        moe_intermediate_size=32, n_routed_experts=8, n_shared_experts=1, num_experts_per_tok=2, n_group=1,
        topk_group=1, first_k_dense_replace=1, use_qk_norm=True, attention_bias=True, routed_scaling_factor=2.5,
        norm_topk_prob=True, rms_norm_eps=1e-5,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5}),
    "glm4_moe_lite": dict(
        architectures=["Glm4MoeLiteForCausalLM"], **_MLA, intermediate_size=96, moe_intermediate_size=32,
        n_routed_experts=8, n_shared_experts=1, num_experts_per_tok=2, n_group=1, topk_group=1,
        mlp_layer_types=["dense", "sparse"], routed_scaling_factor=1.8, norm_topk_prob=True, rms_norm_eps=1e-5,
        rope_parameters={"rope_type": "default", "rope_theta": 1000000.0}),
}


def tiny_hf_config(family: str, **overrides: Any) -> dict[str, Any]:
    """A complete config.json dict for a tiny `family` model; `overrides` replace top-level keys.

    Changing `num_hidden_layers` also resizes the per-layer lists (`layer_types`, `mlp_layer_types`) unless they
    are overridden too.
    """
    if family not in _FAMILY:
        raise ValueError(f"unknown family {family!r}; choose one of {', '.join(SUPPORTED_MODEL_TYPES)}")
    hf = {"model_type": family, **copy.deepcopy(_COMMON), **copy.deepcopy(_FAMILY[family])}
    n = int(overrides.get("num_hidden_layers", hf["num_hidden_layers"]))
    if "layer_types" in hf and "layer_types" not in overrides:
        hf["layer_types"] = ["sliding_attention" if l % 2 == 0 else "full_attention" for l in range(n)]
    if "mlp_layer_types" in hf and "mlp_layer_types" not in overrides:
        hf["mlp_layer_types"] = ["dense"] + ["sparse"] * (n - 1)
    hf.update(copy.deepcopy(overrides))
    ModelConfig.from_hf(hf)  # fail here, with the config's own message, rather than in the writer
    return hf


# config.json keys a model YAML's `overrides` may set besides the preset's own keys and the audited ones
# (shared_math.config.MATH_FIELDS): the builders' alternative spellings, and HF fields that change nothing splitmoe
# computes (config.py's audit lists them). Any other key is a typo that tiny_hf_config would write in silence.
_OVERRIDE_ALIASES = frozenset({"num_experts", "num_local_experts", "experts_per_token", "num_nextn_predict_layers",
                               "num_mtp_layers", "rope_scaling", "rope_theta", "bos_token_id", "eos_token_id",
                               "pad_token_id", "dtype", "torch_dtype", "max_window_layers", "aux_loss_alpha",
                               "seq_aux", "ep_size", "pretraining_tp", "num_key_value_heads", "head_dim"})


def check_override_keys(family: str, overrides: Mapping[str, Any], where: str) -> None:
    """ValueError naming every key of `overrides` that no `family` config.json field has (with the nearest known
    key): a misspelt key would otherwise be written into config.json and ignored, building the preset unchanged."""
    import difflib

    from shared_math.config import MATH_FIELDS

    known = (set(_COMMON) | set(_FAMILY[family]) | {"model_type"} | _OVERRIDE_ALIASES
             | {name.split(".")[0] for name in MATH_FIELDS[family]})
    unknown = [k for k in overrides if k not in known]
    if unknown:
        hints = [f"{k!r}" + (f" (did you mean {m[0]!r}?)" if (m := difflib.get_close_matches(str(k), known, 1)) else "")
                 for k in unknown]
        raise ValueError(f"{where}: overrides sets {', '.join(hints)}, not a config.json field of {family}; known "
                         f"fields: {', '.join(sorted(known))}")
    # a size or count the preset holds as an int must stay a whole number >= 0, a float a number: otherwise numpy
    # fails later with a message that names no key ("negative dimensions are not allowed", "invalid literal")
    preset = {**_COMMON, **_FAMILY[family]}
    bad = []
    for k, v in overrides.items():
        want = preset.get(k)
        if isinstance(want, bool) or want is None:
            continue
        if isinstance(want, int) and (isinstance(v, bool) or not isinstance(v, int) or v < 0):
            bad.append(f"{k}={v!r} (a whole number >= 0)")
        elif isinstance(want, float) and (isinstance(v, bool) or not isinstance(v, (int, float))):
            bad.append(f"{k}={v!r} (a number)")
    if bad:
        raise ValueError(f"{where}: overrides sets {', '.join(bad)}")


def read_model_yaml(path: str | Path) -> dict[str, Any]:
    """A configs/models/*.yaml preset -> {"family", "seed", "overrides"}; ValueError (a ConfigError for the file
    itself) naming the file and the key for anything wrong, before a checkpoint is written."""
    from shared_math.train_config import read_yaml_mapping

    spec = read_yaml_mapping(path, "model YAML", "configs/models/qwen3_moe_tiny.yaml",
                             "a mapping of family, seed, overrides")
    unknown = set(spec) - {"family", "seed", "overrides"}
    if unknown:
        raise ValueError(f"{path}: unknown keys {sorted(map(str, unknown))}; a model YAML has family, seed, overrides")
    if spec.get("family") not in SUPPORTED_MODEL_TYPES:
        raise ValueError(f"{path}: family must be one of {', '.join(SUPPORTED_MODEL_TYPES)}, "
                         f"got {spec.get('family')!r}")
    seed = spec.get("seed", 0)
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"{path}: seed must be an integer >= 0, got {seed!r}")
    overrides = spec.get("overrides") or {}
    if not isinstance(overrides, dict):
        raise ValueError(f"{path}: overrides must be a mapping of config.json fields, got {overrides!r}")
    check_override_keys(spec["family"], overrides, str(path))
    return {"family": spec["family"], "seed": seed, "overrides": overrides}


def random_canonical_tensors(cfg: ModelConfig, seed: int = 0) -> dict[str, np.ndarray]:
    """float32 canonical tensors for `cfg` (names and shapes of `expected_shapes`).

    Linear weights ~ N(0, 1/fan_in) (variance-preserving, so signals stay O(1)), embeddings ~ N(0, 1), norm
    weights 1 + N(0, 0.1²) (a norm applied wrongly or not at all shows), biases and sinks ~ N(0, 0.1²) / N(0, 1),
    `e_score_correction_bias` ~ N(0, 0.1²) (HF initialises it to 0, which would hide its effect on routing).
    """
    from shared_math.checkpoint import expected_shapes  # checkpoint.py re-exports this module's functions

    rng = np.random.default_rng(seed)
    # drawn in float64 from one generator in model order, then rounded: the tiny checkpoints the tests were
    # written against
    return {name: _random_tensor(name, shape, rng, np.float64).astype(np.float32)
            for name, shape in expected_shapes(cfg).items()}


def _random_tensor(name: str, shape: tuple[int, ...], rng: np.random.Generator, dtype: type) -> np.ndarray:
    """One tensor of random_canonical_tensors' scheme, drawn in `dtype` (arithmetic in place: no second copy)."""
    if name == "embed_tokens.weight" or name.endswith(".sinks"):
        return rng.standard_normal(shape, dtype=dtype)
    a = rng.standard_normal(shape, dtype=dtype)
    if name.endswith("norm.weight"):  # input/post_attention_layernorm, norm, q/k_norm, q_a/kv_a_layernorm
        a *= 0.1
        a += 1.0
    elif name.endswith(("bias", "e_score_correction_bias")):
        a *= 0.1
    else:  # [in, out] or [E, in, out] linear weights: fan_in is the second-to-last axis
        a /= a.dtype.type(np.sqrt(shape[-2]))
    return a


class _LazyRandomTensors(Mapping[str, np.ndarray]):
    """`name -> tensor` of random_canonical_tensors' scheme, drawn when asked for and not kept."""

    def __init__(self, cfg: ModelConfig, seed: int) -> None:
        from shared_math.checkpoint import expected_shapes

        self.shapes = expected_shapes(cfg)
        self.seed = seed

    def __getitem__(self, name: str) -> np.ndarray:
        shape = self.shapes[name]  # KeyError for an unknown name, as a Mapping should
        rng = np.random.default_rng([self.seed, zlib.crc32(name.encode())])
        return _random_tensor(name, shape, rng, np.float32)

    def __contains__(self, name: object) -> bool:  # without drawing (Mapping's default would call __getitem__)
        return name in self.shapes

    def __iter__(self) -> Iterator[str]:
        return iter(self.shapes)

    def __len__(self) -> int:
        return len(self.shapes)


def lazy_random_canonical_tensors(cfg: ModelConfig, seed: int = 0) -> Mapping[str, np.ndarray]:
    """random_canonical_tensors' distributions as a lazy mapping, for full-size models: each tensor is drawn in
    float32 when it is asked for, from its own generator seeded by (seed, crc32(name)), so it does not depend on the
    order of reads, and it is not kept. With `write_checkpoint(..., max_shard_bytes=...)` a multi-GB checkpoint is
    written holding about one shard in memory. (Other values than random_canonical_tensors at the same seed.)"""
    return _LazyRandomTensors(cfg, seed)


def write_tiny_checkpoint(family: str, path: str | Path, *, seed: int = 0, dtype: str = "float32",
                          layout: Layout = "hub", **overrides: Any) -> Path:
    """Write a tiny random `family` checkpoint to folder `path` and return it. `overrides` go to tiny_hf_config."""
    from shared_math.checkpoint import write_checkpoint

    hf = tiny_hf_config(family, **overrides)
    cfg = ModelConfig.from_hf(hf)
    return write_checkpoint(path, hf, random_canonical_tensors(cfg, seed), layout=layout, dtype=dtype)
