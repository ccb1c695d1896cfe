"""config.json hardening: every field that changes the math is either computed as HF does or refused up front, and
a config with fewer layers than its checkpoint is refused instead of dropping layers.

- The audit (`shared_math.config.MATH_FIELDS`) is checked against `AUDIT` below, a literal list written
  independently: the same fields per family, each refused value refused by `ModelConfig.from_hf` with an error
  naming the field, each accepted value (HF's default among them) built, and each default equal to what
  transformers' own configuration class resolves for a config.json without the key.
- `hidden_act`: transformers computes a different model with `gelu` (except gpt-oss, which ignores the key), so
  both frameworks refuse it at load for the four families whose MLPs read it, and load gpt-oss unchanged.
- Layers: `num_hidden_layers` <= 0 is refused; a 1-layer config against a 2-layer checkpoint is refused by both
  loaders naming the tensors and the fix; only DeepSeek-V3 / GLM skip MTP layers, by num_nextn_predict_layers.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from shared_math import safetensors_io as sio
from shared_math.checkpoint import CheckpointError, read_checkpoint, write_tiny_checkpoint
from shared_math.config import (
    MATH_FIELDS,
    SUPPORTED_MODEL_TYPES,
    Derived,
    ModelConfig,
    ModelConfigError,
    field_value,
)
from shared_math.tiny import tiny_hf_config
from tests.conftest import HAS_JAX, HAS_TORCH, requires_torch, requires_transformers

FAMILIES = SUPPORTED_MODEL_TYPES
MTP_FAMILIES = ("deepseek_v3", "glm4_moe", "glm4_moe_lite")
FRAMEWORKS = [pytest.param("torch", marks=pytest.mark.skipif(not HAS_TORCH, reason="torch is not installed")),
              pytest.param("jax", marks=pytest.mark.skipif(not HAS_JAX, reason="jax/flax are not installed"))]


@dataclasses.dataclass(frozen=True)
class With:
    """A value of the audited field together with other config.json keys it needs (or that make it refusable)."""

    value: Any
    extra: tuple[tuple[str, Any], ...]

    def __init__(self, value: Any, **extra: Any) -> None:
        object.__setattr__(self, "value", value)
        object.__setattr__(self, "extra", tuple(extra.items()))

    def __repr__(self) -> str:
        return f"{self.value!r}+{dict(self.extra)}"


# ---- the audit, written out independently of shared_math.config ----------------------------------------------------
# family -> field -> (accepted values, refused values). HF's default is among the accepted values; fields implemented
# for every value have no refused values. Keep in step with MATH_FIELDS on purpose: a field dropped from (or added
# to) the table without this list changing fails test_the_audit_lists_the_same_fields.
_COMMON: dict[str, tuple[list, list]] = {
    "num_hidden_layers": ([1, 2, 3], [0, -1, 1.5, "2"]),
    "hidden_act": (["silu", "swish"], ["gelu", "relu", "gelu_pytorch_tanh", "tanh"]),
    "attention_dropout": ([0.0, 0], [0.1, 1e-3, "0"]),
    "rope_parameters.rope_type": (["default", "yarn"], ["linear", "dynamic", "longrope", "llama3"]),
    "rope_theta": ([10000.0, 150000.0, 1e6, 500], [0.0, -1.0]),
    "partial_rotary_factor": ([1.0], [0.5, 0.25]),
    "rms_norm_eps": ([1e-6, 1e-5], [0.0, -1e-6]),
    "max_position_embeddings": ([256, 4096, 32768, 131072, 202752], [0, -1]),
    "tie_word_embeddings": ([False, True], []),
    "attention_bias": ([False, True], []),
}
_GQA_HEAD_DIM = {"head_dim": ([32, 16], [0, -8])}
_MLA = {"head_dim": ([8], [16, 4]),  # = qk_rope_head_dim (8 in the tiny configs)
        "q_lora_rank": ([24, None, 1536, 768], [0, -1]),
        "rope_interleave": ([True, False], [])}
_AUX = {"router_aux_loss_coef": ([0.001, 0.0, 0.9], ["0.1", math.nan]),
        "output_router_logits": ([False, True], [])}


def _sigmoid_routing(n_group: list, topk_group: list, scale: list, first_dense: tuple[list, list]) -> dict:
    return {"norm_topk_prob": ([True, False], []),
            "n_group": (n_group, [0, -1]),
            "topk_group": (topk_group, [0]),
            "routed_scaling_factor": (scale, ["2.5"]),
            "n_shared_experts": ([1, 0, 2], [-1]),
            "scoring_func": (["sigmoid"], ["softmax"]),
            "topk_method": (["noaux_tc"], ["greedy", "group_limited_greedy"]),
            "moe_layer_freq": ([1], [2, 0]),
            "first_k_dense_replace": first_dense}


AUDIT: dict[str, dict[str, tuple[list, list]]] = {
    "qwen3_moe": {
        **_COMMON, **_GQA_HEAD_DIM, **_AUX,
        "use_sliding_window": ([False, With(True, sliding_window=None)],
                               [With(True, sliding_window=8), With(True, sliding_window=4096)]),
        "decoder_sparse_step": ([1, 2], [0, -1]),
        "mlp_only_layers": ([[], [0], [0, 1]], ["0", [0.5]]),
        "norm_topk_prob": ([True, False], []),
    },
    "gpt_oss": {
        **_COMMON, **_GQA_HEAD_DIM, **_AUX,
        "hidden_act": (["silu", "swish", "gelu", "relu"], []),  # HF's gpt-oss reads it nowhere
        "head_dim": ([16, 8], [0]),
        "swiglu_limit": ([7.0, 10.0], ["7", math.inf]),
        "swiglu_alpha": ([1.702, 2.0], ["x", math.nan]),
        "layer_types": ([["sliding_attention", "full_attention"], ["full_attention", "full_attention"]],
                        [["sliding_attention", "chunked_attention"], "full_attention"]),
        "sliding_window": ([8, 1, 128, With(None, layer_types=["full_attention", "full_attention"])], [None, 0, -4]),
    },
    "deepseek_v3": {
        **_COMMON, **_MLA,
        **_sigmoid_routing([4, 2, With(1, topk_group=1), With(8, n_routed_experts=16)], [2, 1, With(4, n_group=8,
                           n_routed_experts=16)], [2.5, 1.0], ([1, 0, 2, 3], ["1", 1.5])),
    },
    "glm4_moe": {
        **_COMMON, **_GQA_HEAD_DIM,
        # int(32 · f) must be even and > 0: 0.03125 leaves 1 dim, 0.0 none
        "partial_rotary_factor": ([0.5, 1.0, 0.25, 0.4], [0.0, 1.5, 0.03125, -0.5]),
        "use_qk_norm": ([True, False], []),
        **_sigmoid_routing([1, With(2, n_routed_experts=8)], [1], [1.0, 2.5], ([1, 0], ["1"])),
    },
    "glm4_moe_lite": {
        **_COMMON, **_MLA,
        "mlp_layer_types": ([["dense", "sparse"], ["sparse", "sparse"]], [["dense", "moe"], "sparse"]),
        **_sigmoid_routing([1, With(2, n_routed_experts=8)], [1], [1.8, 1.0], ([None, 1, 5, "x"], [])),
    },
}


def _config(family: str, field: str, value: Any) -> dict[str, Any]:
    """The tiny config.json of `family` with `field` set to `value` (a With adds its other keys)."""
    extra: dict[str, Any] = {}
    if isinstance(value, With):
        value, extra = value.value, dict(value.extra)
    hf = tiny_hf_config(family)
    if field == "num_hidden_layers" and isinstance(value, int) and value >= 1:
        hf = tiny_hf_config(family, num_hidden_layers=value)  # per-layer lists resized
    elif field == "rope_parameters.rope_type":
        params = {"rope_type": value, "rope_theta": hf["rope_parameters"]["rope_theta"]}
        if value != "default":  # what these types need, so that only the type itself is wrong
            params.update(factor=4.0, original_max_position_embeddings=64)
        hf["rope_parameters"] = params
    elif field in ("rope_theta", "partial_rotary_factor"):
        hf["rope_parameters"] = {**hf["rope_parameters"], field: value}
    else:
        hf[field] = value
    hf.update(extra)
    return hf


def _cases(which: int) -> list:
    return [pytest.param(fam, field, v, id=f"{fam}-{field}-{v!r}")
            for fam, fields in AUDIT.items() for field, values in fields.items() for v in values[which]]


# ---- the audit table ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", FAMILIES)
def test_the_audit_lists_the_same_fields(family):
    assert set(MATH_FIELDS[family]) == set(AUDIT[family]), (
        f"{family}: fields only in MATH_FIELDS {sorted(set(MATH_FIELDS[family]) - set(AUDIT[family]))}, "
        f"only in this test's AUDIT {sorted(set(AUDIT[family]) - set(MATH_FIELDS[family]))}")


@pytest.mark.parametrize("family,field", [(f, n) for f in FAMILIES for n in MATH_FIELDS[f]])
def test_every_rule_is_described_and_its_default_accepted(family, field):
    """Enumerates the table itself: a rule that refuses values has refused values here (and vice versa), says what
    it accepts and why, and HF's default is one of the accepted values."""
    rule = MATH_FIELDS[family][field]
    accepted, refused = AUDIT[family][field]
    assert (rule.ok is None) == (not refused), f"{family}.{field}: the table and AUDIT disagree on refusing values"
    assert rule.name == field and rule.accepts and rule.why.endswith(".")
    if isinstance(rule.default, Derived) or rule.default == "<required>":
        return
    plain = [v.value if isinstance(v, With) else v for v in accepted]
    default = list(rule.default) if isinstance(rule.default, tuple) else rule.default  # () stands for HF's []
    assert any(type(v) is type(default) and v == default for v in plain), (
        f"{family}.{field}: HF's default {rule.default!r} is not among the accepted values {plain}")


@pytest.mark.parametrize("family,field,value", _cases(1))
def test_unsupported_value_is_refused_naming_the_field(family, field, value):
    hf = _config(family, field, value)
    with pytest.raises(ModelConfigError) as err:
        ModelConfig.from_hf(hf)
    msg = str(err.value)
    shown = value.value if isinstance(value, With) else value
    assert f"{field}={shown!r}" in msg or f"{field}={float(shown)!r}" in msg, msg
    assert MATH_FIELDS[family][field].accepts in msg and "changes the math" in msg
    assert f"model_type {family!r}" in msg


@pytest.mark.parametrize("family,field,value", _cases(0))
def test_supported_value_builds(family, field, value):
    hf = _config(family, field, value)
    cfg = ModelConfig.from_hf(hf)
    shown = value.value if isinstance(value, With) else value
    if shown is not None or MATH_FIELDS[family][field].null_is_value:  # null otherwise means HF's default
        assert field_value(hf, family, field) == shown
    assert cfg.family == family


# ---- defaults: what transformers resolves for a config.json without the key ------------------------------------------
def _without(hf: dict[str, Any], field: str) -> dict[str, Any]:
    """`hf` without `field` (for RoPE fields: without them in rope_parameters, or without rope_parameters)."""
    hf = copy.deepcopy(hf)
    if field == "rope_parameters.rope_type":
        hf.pop("rope_parameters")
        hf["rope_theta"] = 10000.0
    elif field in ("rope_theta", "partial_rotary_factor"):
        hf["rope_parameters"].pop(field, None)
        hf.pop(field, None)
    else:
        hf.pop(field, None)
    return hf


def _hf_resolved(config: Any, field: str) -> Any:
    """The value transformers' model computes with, read off its configuration object."""
    if field == "rope_parameters.rope_type":
        return config.rope_parameters["rope_type"]
    if field in ("rope_theta", "partial_rotary_factor"):
        return config.rope_parameters.get(field, 1.0 if field == "partial_rotary_factor" else None)
    if field == "head_dim":  # modeling_*.py: getattr(config, "head_dim", hidden_size // num_attention_heads)
        return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    if not hasattr(config, field):
        pytest.skip(f"transformers' {type(config).__name__} has no {field}: HF reads it nowhere")
    return getattr(config, field)


@requires_transformers
@pytest.mark.parametrize("family,field", [(f, n) for f in FAMILIES for n in AUDIT[f] if n != "num_hidden_layers"])
def test_default_is_what_transformers_resolves(family, field):
    """A config.json without the key means, in splitmoe, what it means in transformers' configuration class."""
    from transformers import AutoConfig

    hf = _without(tiny_hf_config(family), field)
    kw = {k: v for k, v in hf.items() if k != "model_type"}
    theirs = _hf_resolved(AutoConfig.for_model(family, **kw), field)
    ours = field_value(hf, family, field)
    if isinstance(ours, (list, tuple)):
        ours, theirs = list(ours), list(theirs)
    assert ours == theirs, f"{family}.{field}: splitmoe resolves {ours!r}, transformers {theirs!r}"


# ---- hidden_act through both loaders -------------------------------------------------------------------------------
def _set_config(path: Path, **changes: Any) -> None:
    hf = json.loads((path / "config.json").read_text())
    hf.update(changes)
    (path / "config.json").write_text(json.dumps(hf))


def _load(framework: str, path: Path) -> Any:
    if framework == "torch":
        from torch_impl.load import load_model
    else:
        from jax_impl.load import load_model
    return load_model(path)


def _logits(framework: str, model: Any, ids: np.ndarray) -> np.ndarray:
    if framework == "torch":
        import torch

        with torch.no_grad():
            return model(torch.as_tensor(ids)).logits.float().numpy()
    import jax.numpy as jnp

    return np.asarray(model(jnp.asarray(ids)).logits, np.float32)


@pytest.mark.parametrize("framework", FRAMEWORKS)
@pytest.mark.parametrize("family", FAMILIES)
def test_unsupported_activation_is_refused_at_load(tmp_path, framework, family):
    """Before the fix both frameworks loaded a `gelu` config and computed SiLU; now the four families whose MLPs
    read hidden_act refuse it naming the field, and gpt-oss (which HF computes the same whatever it says) loads."""
    path = write_tiny_checkpoint(family, tmp_path)
    _set_config(path, hidden_act="gelu")
    if family == "gpt_oss":
        ids = np.random.default_rng(0).integers(0, 128, (1, 8))
        gelu = _logits(framework, _load(framework, path), ids)
        _set_config(path, hidden_act="silu")
        np.testing.assert_array_equal(gelu, _logits(framework, _load(framework, path), ids))
        return
    with pytest.raises(CheckpointError, match=r"hidden_act='gelu'.*'silu'") as err:
        _load(framework, path)
    assert isinstance(err.value.__cause__, ModelConfigError)
    assert "changes the math" in str(err.value)


@requires_torch
@requires_transformers
@pytest.mark.parametrize("family", FAMILIES)
def test_transformers_computes_hidden_act_except_for_gpt_oss(family):
    """Why the table refuses hidden_act for four families and accepts any value for gpt-oss: with the same weights,
    transformers' logits change with gelu for the former and stay bit-identical for gpt-oss."""
    import torch

    from tests.shared.hf_helpers import hf_model_from_config

    ids = torch.as_tensor(np.random.default_rng(0).integers(0, 128, (1, 8)))
    logits = {}
    for act in ("silu", "gelu"):
        model = hf_model_from_config(tiny_hf_config(family, hidden_act="silu") | {"hidden_act": act}, seed=0)
        with torch.no_grad():
            logits[act] = model(input_ids=ids).logits
    same = torch.equal(logits["silu"], logits["gelu"])
    assert same == (family == "gpt_oss")


# ---- layer counts ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("n", [0, -1])
@pytest.mark.parametrize("family", FAMILIES)
def test_nonpositive_layer_count_is_refused(family, n):
    hf = {**tiny_hf_config(family), "num_hidden_layers": n}
    hf.pop("layer_types", None)
    hf.pop("mlp_layer_types", None)
    with pytest.raises(ModelConfigError, match=rf"num_hidden_layers={n}.*integer >= 1"):
        ModelConfig.from_hf(hf)
    cfg = ModelConfig.from_hf(tiny_hf_config(family))  # nor can a config be made one by hand
    with pytest.raises(ModelConfigError, match="num_hidden_layers"):
        dataclasses.replace(cfg, num_hidden_layers=n, moe_layers=(), layer_types=())


def _layer_keys(path: Path, layers: set[int]) -> list[str]:
    keys = sio.SafetensorsFile(path / "model.safetensors").keys()
    return sorted(k for k in keys if (m := re.match(r"model\.layers\.(\d+)\.", k)) and int(m.group(1)) in layers)


@pytest.mark.parametrize("framework", FRAMEWORKS)
@pytest.mark.parametrize("family", FAMILIES)
def test_fewer_layers_than_the_checkpoint_is_refused(tmp_path, framework, family):
    """The issue's reproduction: `num_hidden_layers: 1` against a 2-layer checkpoint used to load (layer 1 dropped as
    if it were an MTP layer, for every family) and train; both loaders now refuse it, naming tensors, their count and
    the fix. Layer 1 is an ordinary decoder layer, so not even DeepSeek-V3 / GLM may skip it as an MTP layer."""
    path = write_tiny_checkpoint(family, tmp_path)  # 2 layers
    (path / "config.json").write_text(json.dumps(tiny_hf_config(family, num_hidden_layers=1)))
    dropped = _layer_keys(path, {1})
    with pytest.raises(CheckpointError) as err:
        _load(framework, path)
    msg = str(err.value)
    assert "num_hidden_layers=1" in msg and f"({len(dropped)} tensor(s)" in msg and dropped[0] in msg
    assert "set num_hidden_layers to 2 in config.json" in msg


def _add_mtp_layer(family: str, root: Path, n_layers: int = 2) -> Path:
    """A checkpoint of `n_layers` decoder layers plus one layer holding an MTP module after them, as DeepSeek-V3 and
    GLM ship it: a decoder block with enorm, hnorm, eh_proj and shared_head.norm (HF's MtpLayer, hub layers.61)."""
    path = write_tiny_checkpoint(family, root, num_hidden_layers=n_layers + 1)
    f = sio.SafetensorsFile(path / "model.safetensors")
    tensors = {k: f.read(k) for k in f.keys()}
    f.close()
    H, p = 64, f"model.layers.{n_layers}."
    tensors.update({p + "enorm.weight": np.ones(H, np.float32), p + "hnorm.weight": np.ones(H, np.float32),
                    p + "eh_proj.weight": np.zeros((H, 2 * H), np.float32),
                    p + "shared_head.norm.weight": np.ones(H, np.float32)})
    sio.write_safetensors(path / "model.safetensors", tensors)
    (path / "config.json").write_text(json.dumps(tiny_hf_config(family, num_hidden_layers=n_layers)))
    return path


@pytest.mark.parametrize("framework", FRAMEWORKS)
@pytest.mark.parametrize("family", FAMILIES)
def test_mtp_layers_are_skipped_only_by_their_count(tmp_path, framework, family):
    path = _add_mtp_layer(family, tmp_path)
    mtp = _layer_keys(path, {2})
    if family not in MTP_FAMILIES:
        with pytest.raises(CheckpointError, match=rf"num_hidden_layers=2.*\({len(mtp)} tensor\(s\).*no multi-token"
                                                  r".*set num_hidden_layers to 3"):
            _load(framework, path)
        return
    model = _load(framework, path)  # num_nextn_predict_layers: HF's default of 1
    assert len(model.layers) == 2
    _set_config(path, num_nextn_predict_layers=0)
    with pytest.raises(CheckpointError, match=rf"holds layer 2 \({len(mtp)} tensor\(s\).*num_nextn_predict_layers=0"):
        _load(framework, path)
    _set_config(path, num_nextn_predict_layers=1)
    read_checkpoint(path)


@pytest.mark.parametrize("family", MTP_FAMILIES)
def test_mtp_count_bounds_the_skipped_layers(tmp_path, family):
    """An MTP module past num_hidden_layers + num_nextn_predict_layers is refused, and so is a decoder layer (no
    eh_proj) inside that range; raising the count (or num_hidden_layers) as the message says loads it."""
    path = _add_mtp_layer(family, tmp_path, n_layers=1)  # layer 1 an MTP module; config says 1 decoder layer
    (path / "config.json").write_text(json.dumps(tiny_hf_config(family, num_hidden_layers=1)))
    read_checkpoint(path)
    path = _add_mtp_layer(family, tmp_path / "gap")  # layers 0-1 decoder, 2 MTP; config says 1 decoder layer
    (path / "config.json").write_text(json.dumps(tiny_hf_config(family, num_hidden_layers=1)))
    with pytest.raises(CheckpointError, match=r"holds layers 1, 2 .*set num_hidden_layers to 2"):
        read_checkpoint(path)
    _set_config(path, num_nextn_predict_layers=2)  # layer 1 is in range now, but it is a decoder layer
    with pytest.raises(CheckpointError, match=r"holds layer 1 \(.*this is not one"):
        read_checkpoint(path)
    (path / "config.json").write_text(json.dumps(tiny_hf_config(family, num_hidden_layers=2)))
    assert read_checkpoint(path)[0].num_hidden_layers == 2
    for bad in (-1, 1.5):
        _set_config(path, num_nextn_predict_layers=bad)
        with pytest.raises(CheckpointError, match="num_nextn_predict_layers must be an integer >= 0"):
            read_checkpoint(path)
