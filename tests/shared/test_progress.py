"""Progress bars (shared_math/progress.py): quiet when stderr is not a terminal (CI logs get the eval lines and no
bar redraws), drawn on a terminal or when SPLITMOE_PROGRESS=1 forces them; the checkpoint loaders of both frameworks
count every tensor they read.
"""

from __future__ import annotations

import io

import pytest

from shared_math import progress
from tests.shared.train_suite import tiny_cfg


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.mark.parametrize("env, tty, enabled, expected", [
    (None, False, True, False),  # a log file or a pipe: quiet
    (None, True, True, True),  # a terminal: drawn
    (None, True, False, False),  # --quiet / progress=False wins
    ("1", False, True, True),  # forced on (e.g. Jupyter)
    ("0", True, True, False),  # forced off
])
def test_bars_draw_only_on_a_terminal_unless_forced(monkeypatch, env, tty, enabled, expected):
    if env is None:
        monkeypatch.delenv(progress.ENV, raising=False)
    else:
        monkeypatch.setenv(progress.ENV, env)
    stream = _Terminal() if tty else io.StringIO()
    assert progress.bars_enabled(stream, enabled) is expected
    bar = progress.progress_bar(range(3), total=3, desc="t", stream=stream, enabled=enabled)
    assert list(bar) == [0, 1, 2]  # a quiet bar still iterates
    assert ("3/3" in stream.getvalue()) is expected


def test_a_bad_setting_is_refused(monkeypatch):
    monkeypatch.setenv(progress.ENV, "maybe")
    with pytest.raises(ValueError, match="SPLITMOE_PROGRESS='maybe': use 1"):
        progress.bars_enabled(io.StringIO())


@pytest.mark.parametrize("force", [False, True], ids=["not-a-terminal", "forced-on"])
def test_training_output_off_a_terminal_has_eval_lines_and_no_bar(tmp_path, monkeypatch, capfd, force):
    pytest.importorskip("torch")
    from torch_impl import train

    if force:
        monkeypatch.setenv(progress.ENV, "1")
    else:
        monkeypatch.delenv(progress.ENV, raising=False)
    train.train(tiny_cfg(tmp_path, "torch", "train.steps=3", "train.save_every=0"), progress=True)
    out, err = capfd.readouterr()
    assert "torch step 0 eval: held-out loss" in err and "torch step 3 eval: held-out loss" in err
    if force:
        assert "\r" in err and "3/3" in err and "tok/s" in err
    else:
        assert "\r" not in err and "3/3" not in err and "tensor/s" not in err and "step/s" not in err


@pytest.mark.parametrize("framework", ["torch", "jax"])
def test_loaders_count_every_tensor_they_read(tmp_path, monkeypatch, framework):
    from shared_math.checkpoint import read_checkpoint, write_tiny_checkpoint

    path = write_tiny_checkpoint("qwen3_moe", tmp_path / "tiny", seed=0, num_hidden_layers=2)
    n = len(read_checkpoint(path)[1])
    wrappers = []
    real = progress.with_load_progress

    def spy(tensors, desc, **kw):
        wrappers.append(real(tensors, desc, **kw))
        return wrappers[-1]

    if framework == "torch":
        pytest.importorskip("torch")
        import torch_impl.load as load
    else:
        pytest.importorskip("jax")
        pytest.importorskip("flax")
        import jax_impl.load as load
    monkeypatch.setattr(load, "with_load_progress", spy)
    load.load_model(path)
    assert len(wrappers) == 1 and wrappers[0].read == n and wrappers[0].bar.total == n
    assert wrappers[0].desc == "loading tiny"


def test_load_progress_keeps_the_mapping(tmp_path):
    from shared_math.checkpoint import read_checkpoint, write_tiny_checkpoint

    _, tensors = read_checkpoint(write_tiny_checkpoint("qwen3_moe", tmp_path / "tiny", seed=0, num_hidden_layers=2))
    stream = _Terminal()
    wrapped = progress._LoadProgress(tensors, progress.progress_bar(total=len(tensors), stream=stream, desc="load"))
    assert wrapped.shapes == tensors.shapes and wrapped.config is tensors.config and len(wrapped) == len(tensors)
    layer = wrapped.layer(1)
    assert layer.keys() == tensors.layer(1).keys() and wrapped.read == wrapped.bar.n == len(layer)
    with pytest.raises(IndexError, match="layer 2 out of range"):
        wrapped.layer(2)
    for name in tensors:
        if not name.startswith("layers.1."):
            wrapped[name]
    assert wrapped.read == len(tensors) and f"{len(tensors)}/{len(tensors)}" in stream.getvalue()
