"""RoPE tables and attention scales as HF transformers computes them, framework-free (numpy float32).

- `rope_inv_freq(dim, theta, scaling)`: the inverse frequencies [dim/2] (float32) and the cos/sin `attention_factor`
  for default RoPE and YaRN (`modeling_rope_utils._compute_yarn_parameters`: a ramp between interpolated
  `1/(factor·θ^(2i/d))` and extrapolated `1/θ^(2i/d)` frequencies over the correction range of beta_fast/beta_slow).
- `mla_softmax_scale(cfg)`: MLA's softmax scale, `qk_head_dim^-0.5`, times `m²` with `m = 0.1·mscale_all_dim·ln(factor)
  + 1` when the RoPE is scaled and `mscale_all_dim` is set (HF `yarn_apply_mscale`).

Both frameworks build their tables from these numbers, so their RoPE agrees to the bit.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np

from shared_math.config import ModelConfig

_F32 = np.float32


def _yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def rope_inv_freq(dim: int, theta: float, scaling: Mapping[str, Any] | None = None) -> tuple[np.ndarray, float]:
    """(inv_freq [dim/2] float32, attention_factor) for RoPE over `dim` dims; `scaling` is ModelConfig.rope_scaling
    (None or rope_type "default": plain RoPE; "yarn": YaRN). Other rope types raise NotImplementedError."""
    # fp32 as HF: arange -> float32, pow and reciprocal in float32
    exponents = np.arange(0, dim, 2, dtype=np.int64).astype(_F32) / _F32(dim)
    pos_freqs = _F32(theta) ** exponents
    rope_type = (scaling or {}).get("rope_type", "default")
    if rope_type == "default":
        return (_F32(1.0) / pos_freqs).astype(_F32), 1.0
    if rope_type != "yarn":
        raise NotImplementedError(f"rope_type {rope_type!r} is not implemented (default and yarn are)")
    factor = float(scaling["factor"])
    orig = float(scaling["original_max_position_embeddings"])
    mscale, mscale_all_dim = scaling.get("mscale"), scaling.get("mscale_all_dim")
    attention_factor = scaling.get("attention_factor")
    if attention_factor is None:
        attention_factor = (_yarn_mscale(factor, mscale) / _yarn_mscale(factor, mscale_all_dim)
                            if mscale and mscale_all_dim else _yarn_mscale(factor))
    beta_fast = scaling.get("beta_fast") or 32
    beta_slow = scaling.get("beta_slow") or 1

    def correction_dim(rotations: float) -> float:
        return (dim * math.log(orig / (rotations * 2 * math.pi))) / (2 * math.log(theta))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if scaling.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # HF: avoid a zero-width ramp
    ramp = np.clip((np.arange(dim // 2, dtype=_F32) - _F32(low)) / _F32(high - low), 0, 1).astype(_F32)
    extrapolation = _F32(1) - ramp
    inv_extra = _F32(1) / pos_freqs
    inv_inter = _F32(1) / (_F32(factor) * pos_freqs)
    inv_freq = inv_inter * (_F32(1) - extrapolation) + inv_extra * extrapolation
    return inv_freq.astype(_F32), float(attention_factor)


def mla_softmax_scale(cfg: ModelConfig) -> float:
    """HF DeepseekV3Attention.scaling: qk_head_dim^-0.5, times mscale(factor, mscale_all_dim)² for scaled RoPE."""
    scale = cfg.qk_head_dim ** -0.5
    s = cfg.rope_scaling or {}
    if s.get("rope_type", "default") != "default" and s.get("mscale_all_dim"):
        m = _yarn_mscale(float(s["factor"]), float(s["mscale_all_dim"]))
        scale = scale * m * m
    return scale
