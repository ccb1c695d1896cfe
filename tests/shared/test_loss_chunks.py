"""shared_math.loss_chunks: rows per chunk of the loss without logits (both frameworks' losses and the memory plan)."""

from shared_math.loss_chunks import default_chunk_rows


def test_chunk_rows_bound_the_logits_block():
    assert default_chunk_rows(151_936) * 151_936 <= 1 << 28
    assert default_chunk_rows(151_936) % 64 == 0 and default_chunk_rows(10**9) == 64


def test_triton_chunks_are_half_the_chunk_loops():
    # the kernel's chunk is the model-dtype logits alone: 2^27 elements, 832 rows at Qwen3's vocabulary
    assert default_chunk_rows(151_936, "triton") == 832 and default_chunk_rows(151_936) == 1728
    assert default_chunk_rows(10**9, "triton") == 64


def test_triton_chunks_grow_to_1920_rows_on_long_losses():
    """From 8K token rows the kernel's chunk is 1920 rows (measured in the step at 16K: 6-7 ms faster, no higher
    peak; the module docstring), capped at 2^29 elements for large vocabularies, never below the short-loss chunk; the
    chunk loop's chunk does not depend on the rows."""
    for V in (151_936, 201_088):
        assert default_chunk_rows(V, "triton", 16_384) == default_chunk_rows(V, "triton", 8192) == 1920
        assert default_chunk_rows(V, "triton", 8191) == default_chunk_rows(V, "triton") < 1920
        assert default_chunk_rows(V, "chunked", 16_384) == default_chunk_rows(V)
    assert default_chunk_rows(10**6, "triton", 16_384) == 512  # 2^29 // 10^6 = 536, down to a multiple of 64
    assert default_chunk_rows(10**9, "triton", 16_384) == 64
    assert default_chunk_rows(100, "triton", 16_384) == default_chunk_rows(100, "triton")  # small V: base is larger
