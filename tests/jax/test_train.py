"""jax_impl.train: the shared training suite (tests/shared/train_suite.py) on JAX + Flax NNX."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("jax")
pytest.importorskip("flax")

from tests.shared.train_suite import *  # noqa: E402,F403  (the suite's tests and fixtures)
from tests.shared.train_suite import make_impl  # noqa: E402


@pytest.fixture(scope="module")
def impl():
    import jax.numpy as jnp

    from jax_impl import train
    from jax_impl.load import load_model
    from jax_impl.lora import load_adapter

    def logits_of(model, ids: np.ndarray) -> np.ndarray:
        return np.asarray(model(jnp.asarray(ids)).logits)

    return make_impl(train, load_model, load_adapter, logits_of)
