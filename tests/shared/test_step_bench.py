"""The step benchmark's own logic (benchmarks/step.py): presets of every family, the longest-context search, and
rows that record a failure instead of dropping it."""

from __future__ import annotations

import json

import pytest

from shared_math.config import ModelConfig
from shared_math.presets import PRESETS, preset_hf_config, preset_names


@pytest.mark.parametrize("family", list(PRESETS))
def test_every_preset_is_a_valid_config_and_truncates(family):
    for preset in preset_names(family):
        cfg = ModelConfig.from_hf(preset_hf_config(family, preset, layers=2))
        assert cfg.num_hidden_layers == 2 and cfg.family == family
    with pytest.raises(ValueError, match="unknown preset"):
        preset_hf_config(family, "no-such-size")


def _search(limit: int, start: int, cap: int, step: int):
    torch = pytest.importorskip("torch")  # noqa: F841 - benchmarks.step imports torch
    from benchmarks.step import max_context

    tried = []

    def probe(S):
        tried.append(S)
        return {"seq": S, **({"error": "OOM"} if S > limit else {})}

    best, rows = max_context(probe, start, cap, step)
    return best, tried, rows


@pytest.mark.parametrize("limit", [4096, 5000, 12288, 40000, 10**9])
def test_max_context_doubles_then_bisects_to_the_step(limit):
    best, tried, rows = _search(limit, start=4096, cap=65536, step=1024)
    expected = min(limit, 65536) // 1024 * 1024
    assert best == expected and len(rows) == len(tried)
    assert tried[:2] == [4096, 8192] and len(tried) <= 4 + 6  # log2(cap/start) doublings + log2(range/step) halvings


def test_max_context_when_even_the_first_length_fails():
    best, tried, _ = _search(1000, start=4096, cap=65536, step=1024)
    assert best is None and tried == [4096]


def test_a_row_that_cannot_build_is_recorded(tmp_path):
    """unsloth is not installed on the CI machine: its row says so instead of disappearing."""
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    import importlib.util

    if importlib.util.find_spec("unsloth") is not None:
        pytest.skip("unsloth is installed here")
    from benchmarks.step import main

    out = tmp_path / "rows.jsonl"
    assert main(["--family", "qwen3_moe", "--preset", "tiny", "--device", "cpu", "--seq", "16", "--impls", "unsloth",
                 "--out", str(out)]) == 1
    (row,) = [json.loads(line) for line in out.read_text().splitlines()]
    assert row["impl"] == "unsloth" and row["step_ms"] is None and "unsloth-wheels.sh" in row["error"]


def test_in_backward_optimizer_rows_leave_no_hooks_behind(tmp_path):
    """--optim-in-backward: each measurement registers its per-tensor hooks and removes them, so the second length
    (and the untimed first step) do not update the LoRA tensors twice per backward."""
    torch = pytest.importorskip("torch")
    import benchmarks.step as step

    built = {}
    real_build = step.build_ours

    def build_and_keep(*args, **kwargs):
        built["model"], loss_fn = real_build(*args, **kwargs)
        return built["model"], loss_fn

    out = tmp_path / "rows.jsonl"
    step.build_ours = build_and_keep
    try:
        assert step.main(["--family", "qwen3_moe", "--preset", "tiny", "--device", "cpu", "--seq", "16,24",
                          "--iters", "1", "--warmup", "1", "--impls", "torch_impl", "--optim-in-backward",
                          "--out", str(out)]) == 0
    finally:
        step.build_ours = real_build
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["seq"] for r in rows] == [16, 24] and all(r["optim_in_backward"] and r["step_ms"] > 0 for r in rows)
    params = [p for p in built["model"].parameters() if p.requires_grad]
    assert params and all(not p._post_accumulate_grad_hooks for p in params)
    assert all(p.grad is None for p in params) and all(torch.isfinite(p).all() for p in params)
