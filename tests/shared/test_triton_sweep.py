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
