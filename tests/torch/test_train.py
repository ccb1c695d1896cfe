"""torch_impl.train: the shared training suite (tests/shared/train_suite.py) on PyTorch."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("torch")

from tests.shared.train_suite import *  # noqa: E402,F403  (the suite's tests and fixtures)
from tests.shared.train_suite import make_impl  # noqa: E402


@pytest.fixture(scope="module")
def impl():
    import torch

    from torch_impl import train
    from torch_impl.load import load_model
    from torch_impl.lora import load_adapter

    def logits_of(model, ids: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return model.eval()(torch.from_numpy(ids).long()).logits.numpy()

    return make_impl(train, load_model, load_adapter, logits_of)


def test_cli_train_overrides_and_errors(tmp_path, model_dir, capsys):
    """`splitmoe train` end to end on the tiny task, plus its bad-input exits (2: config, 3: diverged)."""
    from splitmoe.cli import main
    from tests.shared.train_suite import TINY

    args = ["train", "--framework", "torch", "--out", str(tmp_path / "run"), "--quiet", f"model.path={model_dir}",
            "train.steps=3", *TINY]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "steps 0 -> 3" in out and (tmp_path / "run" / "adapter" / "adapter_model.safetensors").is_file()
    assert main([*args, "--resume"]) == 0 and "steps 3 -> 3" in capsys.readouterr().out
    assert main(["train", "--out", str(tmp_path / "x"), "optim.lrr=1"]) == 2
    assert "unknown key(s) ['optim.lrr']" in capsys.readouterr().err
    assert main(["train", "--out", str(tmp_path / "nan"), "--quiet", f"model.path={model_dir}", *TINY,
                 "optim.lr=1e30", "optim.warmup_steps=0", "optim.max_grad_norm=0"]) == 3
    assert "training diverged at step 2" in capsys.readouterr().err


def test_notebook_api(tmp_path, model_dir):
    """The README's notebook snippet: build, evaluate, step, save."""
    from shared_math.train_config import load_run_config
    from torch_impl.train import Trainer

    cfg = load_run_config("configs/runs/default.yaml", [f"train.out_dir={tmp_path}", f"model.path={model_dir}",
                                                        "lora.rank=4", "data.synthetic.num_eval=4"])
    tr = Trainer(cfg)
    before = tr.evaluate()
    losses = [tr.train_step()[0] for _ in range(5)]
    assert tr.step == 5 and losses[-1] < losses[0] and tr.evaluate()["eval_loss"] < before["eval_loss"]
    assert (tr.save_adapter(tmp_path / "adapter") / "adapter_config.json").is_file()
