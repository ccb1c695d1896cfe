"""benchmarks/triton_sweep.py's compile shards: a case that runs out of GPU memory beside the other compile
processes is skipped (phase 2 compiles its kernels), while out of memory in the tuning process itself is an error."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")


def _oom(*_args):
    raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 9.38 GiB")


def test_compile_shard_skips_a_case_that_runs_out_of_memory(monkeypatch, capsys):
    import benchmarks.triton_sweep as sweep

    ran = []

    def step_of(name, _backend):
        if name == "big":
            _oom()
        return lambda: ran.append(name)

    monkeypatch.setattr(sweep, "_step", step_of)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda: None)
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)
    monkeypatch.setenv("SPLITMOE_TRITON_COMPILE_SHARD", "3/12")
    assert sweep._child(["small", "big", "after"], "triton_hopper") == 0
    assert ran == ["small", "after"]  # the shard went on past the case that did not fit
    assert "big: skipped, out of memory" in capsys.readouterr().out


def test_tuning_process_out_of_memory_is_an_error(monkeypatch):
    import benchmarks.triton_sweep as sweep

    monkeypatch.setattr(sweep, "_step", lambda name, backend: _oom())
    monkeypatch.delenv("SPLITMOE_TRITON_COMPILE_SHARD", raising=False)
    with pytest.raises(torch.OutOfMemoryError):
        sweep._child(["big"], "triton_hopper")


def test_base_only_phase_times_default_and_tuned_configs_next_to_grouped_mm(monkeypatch):
    """`--backend hopper_base`'s phase 3: each Hopper variant once on the untuned defaults (the shipped table hidden,
    then restored) and once on the tuner's pick, which the row records, next to `_grouped_mm` (faked launches: the
    bookkeeping is what runs on the CPU)."""
    import benchmarks.moe_block as moe_block
    import benchmarks.triton_sweep as sweep
    from shared_math.cases import get_case
    from torch_impl.kernels import autotune

    shipped = autotune.TUNED_TABLE
    ms = {"grouped_mm": 2.0, ("hopper", "0"): 4.0, ("hopper", "1"): 2.5, ("hopper_sorted", "0"): 3.0,
          ("hopper_sorted", "1"): 1.9}
    seen_tables = []

    def runner(c, impl, seed=0):
        import os

        if impl == "grouped_mm":
            return lambda: ms["grouped_mm"]
        tuned = os.environ["SPLITMOE_TRITON_AUTOTUNE"]
        seen_tables.append((impl, tuned, autotune.TUNED_TABLE))
        if tuned == "1":
            autotune._memory_cache["tuned|v2|dev|bfloat16|hopper_gemm|" + impl] = {"BLOCK_N": 256, "impl": impl}
        return lambda: ms[(impl, tuned)]

    monkeypatch.setattr(moe_block, "gate_up_gemm_runner", runner)
    monkeypatch.setattr("benchmarks.common.time_cuda", lambda step, **kw: step())
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)
    monkeypatch.setenv("SPLITMOE_TRITON_AUTOTUNE", "1")
    (row,) = sweep._time_base_only(["qwen3_30b_T16384"])
    flops = moe_block.pass_flops(get_case("qwen3_30b_T16384"), "gate_up")
    assert row["grouped_mm_tflops"] == pytest.approx(flops / 2.0 / 1e9)
    assert row["hopper_default_ms"] == 4.0 and row["hopper_tuned_ms"] == 2.5
    assert row["hopper_sorted_tuned_tflops"] == pytest.approx(flops / 1.9 / 1e9)
    assert row["hopper_config"] == {"BLOCK_N": 256, "impl": "hopper"}
    assert row["hopper_sorted_config"]["impl"] == "hopper_sorted"
    # the default rows ran without the shipped table, the tuned ones with it, and it is back afterwards
    assert [(i, t, str(tab) == "/nonexistent") for i, t, tab in seen_tables] == [
        ("hopper", "0", True), ("hopper", "1", False), ("hopper_sorted", "0", True), ("hopper_sorted", "1", False)]
    assert autotune.TUNED_TABLE == shipped
