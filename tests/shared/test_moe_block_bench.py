"""benchmarks/moe_block.py's bookkeeping on the CPU: rows are kept as they are measured and the JAX rows' processes
report their stages and errors (the timings themselves need the GPU)."""

import pytest
import torch


def test_block_benchmark_hands_over_each_row_as_soon_as_it_is_measured(monkeypatch):
    """moe_block.py writes every row when it is done, not at the end of its case: in session 26 a JAX row that
    outlasted the call's time limit took two finished rows of the same case with it. Here the second row's process
    is 'killed' (an exception no row handler catches); the first row must already have been handed over, error rows
    too."""
    import benchmarks.moe_block as moe_block
    from shared_math.cases import get_case

    def jax_row(c, backend):
        if backend == "killed":
            raise KeyboardInterrupt  # stands in for the call's timeout killing the run
        if backend == "broken":
            raise RuntimeError("no kernel for this shape")
        return {"ms": 3.0, "peak_extra_gib": 0.5}

    monkeypatch.setattr(moe_block, "_jax_row", jax_row)
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)
    kept = []
    with pytest.raises(KeyboardInterrupt):
        moe_block.run_case(get_case("qwen3_30b_T1024"), ["jax_pallas", "jax_broken", "jax_killed"], iters=1,
                           on_row=kept.append)
    assert [r["impl"] for r in kept] == ["jax_pallas", "jax_broken"]
    assert kept[0]["ms"] == 3.0 and kept[0]["tflops_base"] > 0
    assert kept[1]["error"] == "RuntimeError: no kernel for this shape"


def test_block_benchmark_jax_row_relays_its_stages_and_reports_errors(capsys):
    """A JAX row runs in its own process: its stage lines (lowered, compiled, first run) reach the log while it runs,
    so a row cut by the call's limit still says where it was, and its compile time is in the row; a backend that
    fails gives an error row naming the reason (CPU, the tiny case, the XLA ragged_dot backend)."""
    pytest.importorskip("jax")
    import benchmarks.moe_block as moe_block
    from shared_math.cases import get_case

    row = moe_block._jax_row(get_case("tiny"), "ragged_dot")
    assert row["ms"] > 0 and row["compile_s"] > 0, row
    err = capsys.readouterr().err
    assert "ragged_dot: lowered in" in err and "ragged_dot: compiled in" in err and "first run" in err
    bad = moe_block._jax_row(get_case("tiny"), "no_such_backend")
    assert "no_such_backend" in bad["error"] and "ms" not in bad
    assert moe_block._jax_row(get_case("tiny"), "ragged_dot", timeout=0.5) == {"error": "timed out after 0.5 s"}
