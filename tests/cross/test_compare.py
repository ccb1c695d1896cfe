"""`splitmoe compare`: torch and jax trained side by side from one checkpoint, adapter init and batches agree."""

from __future__ import annotations

import pytest

pytest.importorskip("torch")
pytest.importorskip("jax")


def test_compare_20_steps_fp32_within_tolerance(tmp_path, capsys):
    from shared_math.numerics import tolerance
    from splitmoe.cli import main

    rc = main(["compare", "--steps", "20", "--out", str(tmp_path)])
    out = capsys.readouterr().out
    assert rc == 0, out
    rows = [line.split() for line in out.splitlines() if line.strip()[:1].isdigit()]
    assert len(rows) == 20
    rtol = tolerance("float32", "train_loss").rtol
    for r in rows:  # step, loss torch, loss jax, rel, ...
        lt, lj = float(r[1]), float(r[2])
        assert abs(lt - lj) <= rtol * abs(lt), r
    assert float(rows[-1][1]) < 0.8 * float(rows[0][1])  # and it is a real training run: the loss fell
    # --out is the folder of the files themselves (before session 23 they went to <--out>/compare/)
    assert (tmp_path / "compare.png").stat().st_size > 1000
    assert len((tmp_path / "compare.jsonl").read_text().splitlines()) == 20


def test_compare_fails_past_tolerance(tmp_path, monkeypatch, capsys):
    """A real disagreement (jax's learning rate doubled) must fail the comparison with exit status 1."""
    from jax_impl import train as jax_train
    from splitmoe.cli import main

    real = jax_train.lr_at
    monkeypatch.setattr(jax_train, "lr_at", lambda step, cfg: 2 * real(step, cfg))
    assert main(["compare", "--steps", "3", "--out", str(tmp_path)]) == 1
    assert "FAIL" in capsys.readouterr().out
