"""benchmarks/plot_steps.py: the variant a step row is drawn as, and the --spread plot of every process's steps."""

from __future__ import annotations

import json

import pytest


def _row(**kw) -> dict:
    return {"impl": "torch_impl", "family": "qwen3_moe", "preset": "30b-a3b", "layers": 24, "mode": "step",
            "seq": 4096, "step_ms": 200.0, "peak_gib": 50.0, "grad_ckpt": True, "checkpoint_layers": None, **kw}


def test_variant_names_partial_and_absent_checkpointing():
    from benchmarks.plot_steps import _variant

    assert _variant(_row(compile=True)) == "torch_impl + compile"
    assert _variant(_row(checkpoint_layers=20)) == "torch_impl + first 20 of 24 layers checkpointed"
    # no checkpointing said two ways (--no-grad-ckpt, --checkpoint-layers 0) is one variant
    assert _variant(_row(checkpoint_layers=0)) == _variant(_row(grad_ckpt=False)) == "torch_impl + no checkpointing"


def test_spread_keeps_every_process_of_a_variant(tmp_path, monkeypatch):
    pytest.importorskip("matplotlib")
    import benchmarks.plot_steps as plot_steps

    rows = [_row(step_ms=210.0, step_ms_runs=[205.0, 210.0, 230.0]), _row(step_ms=270.0), _row(impl="unsloth"),
            _row(mode="build", step_ms=None, peak_gib=None, error="OOM")]
    f = tmp_path / "rows.jsonl"
    f.write_text("".join(json.dumps(r) + "\n" for r in rows))
    import matplotlib.axes

    drawn = []
    real_axes_plot = matplotlib.axes.Axes.plot

    def record(self, xs, ys, *args, **kw):
        drawn.append((list(xs), list(ys)))
        return real_axes_plot(self, xs, ys, *args, **kw)

    monkeypatch.setattr(matplotlib.axes.Axes, "plot", record)
    out = tmp_path / "spread.png"
    assert plot_steps.main(["--spread", "--out", str(out), str(f)]) == 0 and out.stat().st_size > 0
    times = sorted(y for _, ys in drawn for y in ys if y > 100)
    # both torch_impl processes (three timed steps of one, the median of the other) and Unsloth's, each with its
    # median dash; the failed row draws nothing
    assert times == sorted([205.0, 210.0, 230.0, 210.0, 270.0, 270.0, 200.0, 200.0])


def test_unnamed_variants_never_take_a_named_implementations_colour():
    from benchmarks.plot_steps import COLORS, _color

    unnamed: list[str] = []
    variants = [f"torch_impl + cuda_graph + compile + first {n} of 24 layers checkpointed" for n in range(12)]
    colours = [_color(v, unnamed) for v in variants]
    # session 23's plot drew such a variant in HF + PEFT's orange: matplotlib's cycle knows nothing of COLORS
    assert not set(colours) & set(COLORS.values())
    assert _color(variants[3], unnamed) == colours[3]  # the same variant keeps its colour from panel to panel
    assert len(set(colours[:4])) == 4
    assert _color("hf_peft", unnamed) == COLORS["hf_peft"]
