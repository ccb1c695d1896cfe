"""jax_impl checks model inputs as torch_impl does: token ids out of range and mismatched position_ids are named."""

import numpy as np
import pytest

jnp = pytest.importorskip("jax.numpy")
pytest.importorskip("flax")

from jax_impl.load import load_model  # noqa: E402
from shared_math.checkpoint import write_tiny_checkpoint  # noqa: E402


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return load_model(write_tiny_checkpoint("qwen3_moe", tmp_path_factory.mktemp("q")))


def test_token_ids_out_of_range_are_named(model):
    with pytest.raises(ValueError, match=r"token ids must lie in \[0, vocab_size=128\), got range \[0, 128\]"):
        model(jnp.asarray(np.array([[0, 5, 128]])))
    with pytest.raises(ValueError, match=r"got range \[-1, 5\]"):
        model(jnp.asarray(np.array([[-1, 5]])))


def test_input_shape_errors(model):
    with pytest.raises(ValueError, match=r"input_ids must be \[batch, seq\]"):
        model(jnp.asarray(np.array([1, 2, 3])))
    with pytest.raises(ValueError, match="position_ids .* do not match input_ids"):
        model(jnp.asarray(np.array([[1, 2, 3]])), position_ids=jnp.asarray(np.array([[0, 1]])))
