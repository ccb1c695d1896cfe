"""`shared_math.tuning.nearest_entry`: the tuned-config lookup both autotuners share, in particular its fallback to a
sibling card's entries (the H100's for an H200 and back), and what the shipped torch table gives an H200."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from shared_math import tuning

ROOT = Path(__file__).resolve().parents[2]
H100, H200 = "NVIDIA H100 80GB HBM3", "NVIDIA H200"


def _key(device: str, m: int, rest: str = "dh,2048,768,64,1", kind: str = "hopper_gemm") -> str:
    return f"v2|{device}|bfloat16|{kind}|{m},{rest}"


def test_a_card_without_entries_takes_its_siblings(monkeypatch):
    """Own card first (exact, then nearest bucket), then each sibling (exact, then nearest bucket); never an unrelated
    card, another kind or shape; SPLITMOE_TUNED_SIBLINGS=0 leaves the sibling out."""
    monkeypatch.delenv("SPLITMOE_TUNED_SIBLINGS", raising=False)
    table = {_key(H100, 131072): {"on": "h100_131072"}, _key(H100, 16384): {"on": "h100_16384"},
             _key(H200, 524288): {"on": "h200_524288"}}
    assert tuning.nearest_entry(table, _key(H100, 131072)) == {"on": "h100_131072"}
    # the H200 has an entry for this pass and shape, at another bucket: its own card wins over the sibling's exact one
    assert tuning.nearest_entry(table, _key(H200, 131072)) == {"on": "h200_524288"}
    # no H200 entry for this shape: the H100's, at the nearest bucket
    other = "down,2048,768,64"
    table[_key(H100, 16384, other)] = {"on": "h100_down"}
    assert tuning.nearest_entry(table, _key(H200, 32768, other)) == {"on": "h100_down"}
    assert tuning.nearest_entry(table, _key(H200, 32768, other), siblings=False) is None
    assert tuning.nearest_entry(table, _key("NVIDIA A100-SXM4-80GB", 16384, other)) is None
    assert tuning.nearest_entry(table, _key(H200, 16384, other, kind="hopper_gemm_act")) is None
    assert tuning.nearest_entry(table, _key(H200, 16384, "down,2048,768,16")) is None
    monkeypatch.setenv("SPLITMOE_TUNED_SIBLINGS", "0")
    assert tuning.nearest_entry(table, _key(H200, 32768, other)) is None
    assert tuning.nearest_entry(table, _key(H100, 16384, other)) == {"on": "h100_down"}  # own entries still found


def test_jax_device_kinds_have_siblings_too():
    """jax_impl keys its table by `device_kind` (lower case, underscores): the same pairs under those names."""
    table = {"v3|nvidia_h200|bfloat16|gemm|16384,2048,768,64": {"on": "h200"}}
    assert tuning.nearest_entry(table, "v3|nvidia_h100_80gb_hbm3|bfloat16|gemm|16384,2048,768,64",
                                siblings=True) == {"on": "h200"}
    for name, sibs in tuning.SIBLING_DEVICES.items():
        assert all(name in tuning.SIBLING_DEVICES[s] for s in sibs), f"{name}'s siblings must list it back"


@pytest.mark.parametrize("value", ["2", "yes", "off"])
def test_siblings_env_refuses_other_values(value, monkeypatch):
    monkeypatch.setenv("SPLITMOE_TUNED_SIBLINGS", value)
    with pytest.raises(ValueError, match="SPLITMOE_TUNED_SIBLINGS"):
        tuning.nearest_entry({}, _key(H200, 16384))


@pytest.mark.parametrize("rest,kind", [("dh,2048,768,64,1", "hopper_gemm"), ("gu,2048,768,64,1", "hopper_gemm_act"),
                                       ("dh,2880,2880,64,2", "hopper_gemm"), ("down,2880,2880,64", "hopper_gemm"),
                                       ("dx,5760,2880,64", "hopper_gemm")])
def test_the_h200_runs_the_hopper_kernels_on_the_h100s_tuned_entries(rest, kind, monkeypatch):
    """The shipped torch table has the persistent Hopper kernels tuned on the H100 only. At the step's 16K rows
    (Qwen3-30B-A3B's M = 131072, gpt-oss-20b's 65536) an H200 now gets those entries, not the untuned defaults."""
    monkeypatch.delenv("SPLITMOE_TUNED_SIBLINGS", raising=False)
    table = json.loads((ROOT / "torch_impl/kernels/tuned_configs.json").read_text())
    m = 131072 if "768" in rest else 65536
    h200 = tuning.nearest_entry(table, _key(H200, m, rest, kind))
    assert h200 is not None and h200 == tuning.nearest_entry(table, _key(H100, m, rest, kind))
    assert not any(k.split("|")[1] == H200 and k.split("|")[3] == kind for k in table), \
        "the H200 has hopper entries of its own now: this test's premise (and the fallback's reason) changed"


@pytest.mark.parametrize("split", [16, 64, 1024])
def test_split_chunks_cover_the_rows_with_no_sliver(split):
    """The ragged-K split mode's chunks of an expert: contiguous from row 0 to its last row, in order; rows // N of
    them (one below N rows, none for an empty expert); every chunk N to 2N - 1 rows long, except an expert's only
    chunk, which may be shorter. So evenly routed experts of just over N rows (Qwen3 at T=16384: 1,024-1,116 rows
    against N = 1024) are one chunk each, not a chunk and a sliver."""
    for rows in [0, 1, split - 1, split, split + 1, 2 * split - 1, 2 * split, 2 * split + 1, 5 * split + 7,
                 16 * split - 1, 1116 * split // 1024]:
        chunks = tuning.split_chunks(rows, split)
        assert len(chunks) == max(rows // split, min(rows, 1)), rows
        assert [c[0] for c in chunks] == [k * split for k in range(len(chunks))], rows
        assert all(a[1] == b[0] for a, b in zip(chunks, chunks[1:])) and (chunks[-1][1] if chunks else 0) == rows
        if len(chunks) > 1:
            assert all(split <= end - start < 2 * split for start, end in chunks), (rows, chunks)
    assert tuning.split_chunks(1116, 1024) == [(0, 1116)]
    assert tuning.split_chunks(3000, 1024) == [(0, 1024), (1024, 3000)]
