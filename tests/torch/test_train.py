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
