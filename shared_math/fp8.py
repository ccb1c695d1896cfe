"""Block-FP8 dequantisation (DeepSeek-V3's checkpoint format), numpy only.

A quantised Linear is stored as `weight [out, in]` in F8_E4M3 plus `weight_scale_inv [⌈out/bm⌉, ⌈in/bn⌉]` in fp32,
with blocks of `quantization_config.weight_block_size` = [bm, bn] (128×128 on the hub). The real weight is
`W[i, j] = weight[i, j] · weight_scale_inv[⌊i/bm⌋, ⌊j/bn⌋]`; the last block row/column may be partial (e.g.
kv_a_proj_with_mqa's 576 rows), as in transformers' `integrations/finegrained_fp8._dequantize_fp8_weight`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

SCALE_SUFFIX = "_scale_inv"  # `<linear>.weight_scale_inv` next to `<linear>.weight`
DEFAULT_BLOCK = (128, 128)


def block_size(hf_config: Mapping[str, Any]) -> tuple[int, int]:
    """[bm, bn] from config.json's quantization_config (DeepSeek-V3's default 128×128 when absent)."""
    block = (hf_config.get("quantization_config") or {}).get("weight_block_size") or DEFAULT_BLOCK
    if len(block) != 2 or min(block) < 1:
        raise ValueError(f"quantization_config.weight_block_size must be two positive ints, got {block}")
    return int(block[0]), int(block[1])


def scale_shape(weight_shape: Sequence[int], block: tuple[int, int]) -> tuple[int, ...]:
    """The `weight_scale_inv` shape that a `weight` of this shape needs: one scale per (partial) block."""
    *lead, rows, cols = weight_shape
    return (*lead, -(-rows // block[0]), -(-cols // block[1]))


def dequantize_block_fp8(weight: np.ndarray, scale_inv: np.ndarray, block: tuple[int, int]) -> np.ndarray:
    """float32 `weight · scale_inv[⌊i/bm⌋, ⌊j/bn⌋]` over the last two axes; `weight` is already decoded from FP8
    to float (exactly: every E4M3 value is a float32)."""
    want = scale_shape(weight.shape, block)
    if tuple(scale_inv.shape) != want:
        raise ValueError(f"weight_scale_inv has shape {list(scale_inv.shape)}, but a weight of shape "
                         f"{list(weight.shape)} in {block[0]}x{block[1]} blocks needs {list(want)}")
    rows, cols = weight.shape[-2:]
    s = np.repeat(np.repeat(scale_inv.astype(np.float32), block[0], axis=-2), block[1], axis=-1)
    return weight.astype(np.float32) * s[..., :rows, :cols]
