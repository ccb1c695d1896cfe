"""benchmarks/route_load.py (CPU): every router of the step benchmark's randomised model is counted, K rows per
token, and the summary reads its counts right."""

import sys
from pathlib import Path

import pytest

pytest.importorskip("torch")
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from benchmarks.route_load import expert_loads, summarise  # noqa: E402
from shared_math.presets import preset_hf_config  # noqa: E402


@pytest.mark.parametrize("family", ["qwen3_moe", "gpt_oss"])
def test_every_router_counts_k_rows_per_token(family):
    hf = preset_hf_config(family, "tiny")
    loads = expert_loads(family, "tiny", None, 40, "cpu")
    assert len(loads) == hf["num_hidden_layers"]
    experts = hf.get("num_local_experts") or hf["num_experts"]
    assert all(len(c) == experts and sum(c) == 40 * hf["num_experts_per_tok"] for c in loads)


def test_summary():
    s = summarise([0, 2, 6, 4, 8], top=2)
    assert s == dict(mean=4.0, max=8, busiest_over_mean=[2.0, 1.5], empty=1)
