"""MXFP4 (OCP microscaling FP4) expert weights, as gpt-oss ships them on the hub: decode at load, and a small encoder
for writing tiny quantised test checkpoints.

Layout (hf-moe-formats.md §2): a weight `[..., rows, cols]` (HF's `[out, in]` order) is stored as
`*_blocks [..., rows, G, 16]` uint8 and `*_scales [..., rows, G]` uint8 with `G = cols / 32`. Each byte of a
block holds two E2M1 codes, the low nibble being the even element and the high nibble the odd one; each group of
32 elements shares one power-of-two scale `2^(scale - 127)`. Value = `ldexp(E2M1[code], scale - 127)`.

Decoding is exact in float32: an E2M1 value has at most 2 significant bits, and the scales of real checkpoints stay
far inside float32's exponent range, so float32 (and bf16, which has float32's exponent range) holds every decoded
value exactly; `dequantize_mxfp4` is therefore bit-identical to transformers' bf16 `_convert_moe_packed_tensors`.
"""

from __future__ import annotations

import numpy as np

__all__ = ["E2M1_VALUES", "dequantize_mxfp4", "quantize_mxfp4", "BLOCK"]

BLOCK = 32  # elements per shared scale
# E2M1 code -> value: sign bit 3, then 2 exponent bits and 1 mantissa bit (0 and 0.5 are the subnormals)
E2M1_VALUES = np.array([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0,
                        -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0], dtype=np.float32)

# Decode whole rows in chunks so the temporaries (int codes, float values) stay bounded for 120b-sized tensors.
_ROWS_PER_CHUNK = 1 << 16


def dequantize_mxfp4(blocks: np.ndarray, scales: np.ndarray) -> np.ndarray:
    """blocks [..., G, 16] uint8, scales [..., G] uint8 -> float32 [..., 32·G] (no transpose here)."""
    blocks = np.asarray(blocks)
    scales = np.asarray(scales)
    if blocks.dtype != np.uint8 or scales.dtype != np.uint8:
        raise ValueError(f"MXFP4 blocks and scales must be uint8, got {blocks.dtype} and {scales.dtype}")
    if blocks.ndim < 2 or blocks.shape[-1] != BLOCK // 2 or blocks.shape[:-1] != scales.shape:
        raise ValueError(f"MXFP4 blocks {blocks.shape} must be [..., G, 16] with scales [..., G]; "
                         f"got scales {scales.shape}")
    *prefix, G, half = blocks.shape
    rows = int(np.prod(prefix, dtype=np.int64)) * G
    flat_b = blocks.reshape(rows, half)
    flat_s = scales.reshape(rows).astype(np.int32) - 127
    out = np.empty((rows, 2 * half), dtype=np.float32)
    for r0 in range(0, rows, _ROWS_PER_CHUNK):
        r1 = min(r0 + _ROWS_PER_CHUNK, rows)
        b = flat_b[r0:r1]
        sub = out[r0:r1]
        sub[:, 0::2] = E2M1_VALUES[b & 0x0F]
        sub[:, 1::2] = E2M1_VALUES[b >> 4]
        # ldexp by a per-group exponent: exact (power-of-two scaling, no rounding inside float32's range)
        sub[:] = np.ldexp(sub, flat_s[r0:r1, None])
    return out.reshape(*prefix, G * 2 * half)


def quantize_mxfp4(w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """float [..., cols] (cols a multiple of 32) -> (blocks [..., G, 16] uint8, scales [..., G] uint8).

    Round-to-nearest E2M1 with a per-group scale `2^ceil(log2(max|x| / 6))` (so the group's largest element fits
    E2M1's largest magnitude, 6). For writing test checkpoints; decoding is what matters for loading.
    """
    w = np.asarray(w, dtype=np.float64)
    if w.shape[-1] % BLOCK:
        raise ValueError(f"the last axis ({w.shape[-1]}) must be a multiple of {BLOCK}")
    g = w.reshape(*w.shape[:-1], w.shape[-1] // BLOCK, BLOCK)
    amax = np.abs(g).max(axis=-1)
    exp = np.where(amax > 0, np.ceil(np.log2(np.maximum(amax, 1e-300) / 6.0)), 0.0)
    exp = np.clip(exp, -127, 128)
    scaled = g / np.ldexp(1.0, exp.astype(np.int32))[..., None]
    mags = E2M1_VALUES[:8].astype(np.float64)
    code = np.abs(np.abs(scaled)[..., None] - mags).argmin(axis=-1).astype(np.uint8)
    code = np.where(np.signbit(scaled), code | 0x8, code).astype(np.uint8)
    blocks = (code[..., 0::2] | (code[..., 1::2] << 4)).astype(np.uint8)
    return blocks, (exp + 127).astype(np.uint8)
