"""`gradient_checkpointing_enable(layers=N)` refuses the same bad values with the same message in both frameworks
(one check, `shared_math.train_config.validate_checkpoint_layers`), and a refused call changes nothing. What the
argument does (the first N layers recomputed, losses and gradients unchanged) is each framework's
test_checkpointing.py."""

from __future__ import annotations

import importlib

import pytest

from shared_math.config import LoraConfig
from shared_math.tiny import write_tiny_checkpoint

MESSAGE = (r"layers={bad!r}\): layers is how many of the first decoder layers to checkpoint, an int from 0 to 3 "
           r"\(this model has 3\); pass one of those, or None to checkpoint every layer")


@pytest.mark.parametrize("framework", ["torch_impl", "jax_impl"])
def test_checkpoint_layers_errors_say_what_to_use(framework, tmp_path):
    pytest.importorskip("torch" if framework == "torch_impl" else "jax")
    load_model = importlib.import_module(framework).load_model
    path = write_tiny_checkpoint("qwen3_moe", tmp_path / "q", seed=3, num_hidden_layers=3)
    model = load_model(path, lora=LoraConfig(rank=4, alpha=8.0, targets=("q_proj", "v_proj")))
    for bad in (4, -1, True, 1.5, "1"):
        with pytest.raises(ValueError, match=MESSAGE.format(bad=bad)):
            model.gradient_checkpointing_enable(layers=bad)
    assert not model.gradient_checkpointing and model.checkpoint_layers is None  # a refused call changes nothing
    model.gradient_checkpointing_enable(layers=3)
    assert model.gradient_checkpointing and model.checkpoint_layers == 3
