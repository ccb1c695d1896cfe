"""Rows per chunk of the fused linear + cross-entropy loss, framework-free: one rule for torch_impl.loss,
jax_impl.loss and the memory plan's loss phase (shared_math.plan), which each kept their own copy until session 22.

The chunk loop (both frameworks) holds one chunk's logits in fp32: at most `CHUNK_ELEMENTS` of them, 1 GiB, 1,766
rows at V = 151,936, large enough that the chunk's GEMMs run at the dense rate, small enough to be noise next to a 30B
model's weights. torch_impl's Triton loss kernel (`impl="triton"`) keeps the model-dtype logits alone, updated in
place, so it takes half that many elements: 832 rows at V = 151,936, a 256 MiB bf16 block, as large a GEMM at a
quarter of the memory.

On long sequences the kernel's chunk grows to `LONG_CHUNK_ROWS`. Each chunk costs a few launches and a pass over W
whatever its size, so a 16K-token step pays for 26 chunks of 640 rows at gpt-oss's vocabulary: 1920-row chunks took
7 ms off gpt-oss's compiled 16K step (1012.9 -> 1005.8 ms, the same 55.21 GiB peak; session 21, H100) and 6 ms off
Qwen3's graphed 16K step, whose peak fell (52.60 -> 52.12 GiB; session 22, H100). At 4K the step time did not move
(gpt-oss 252.2 -> 251.7 ms) and the peak rose 0.125 GiB, and Qwen3's 4K step peaks 0.17 GiB under Unsloth's, so
shorter losses keep the smaller chunk. The block is at most `LONG_CHUNK_ELEMENTS` (1 GiB in bf16) at any vocabulary.
"""

from __future__ import annotations

CHUNK_ELEMENTS = 1 << 28
LONG_ROWS = 8192
LONG_CHUNK_ROWS = 1920
LONG_CHUNK_ELEMENTS = 1 << 29


def _rows_within(elements: int, vocab: int) -> int:
    """The most rows of `vocab` logits within `elements`, down to a multiple of 64, at least 64."""
    return max(64, (elements // max(vocab, 1)) // 64 * 64)


def default_chunk_rows(vocab: int, impl: str = "chunked", rows: int | None = None) -> int:
    """Rows per loss chunk: the chunk loop's fp32 block within `CHUNK_ELEMENTS`; impl "triton" (torch_impl's loss
    kernel) half that many elements, and `LONG_CHUNK_ROWS` (within `LONG_CHUNK_ELEMENTS`, never fewer than the short
    chunk) once the loss has at least `LONG_ROWS` token rows (`rows`)."""
    if impl != "triton":
        return _rows_within(CHUNK_ELEMENTS, vocab)
    base = _rows_within(CHUNK_ELEMENTS // 2, vocab)
    if rows is not None and rows >= LONG_ROWS:
        return max(base, min(LONG_CHUNK_ROWS, _rows_within(LONG_CHUNK_ELEMENTS, vocab)))
    return base
