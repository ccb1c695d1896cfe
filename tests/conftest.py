"""Shared test set-up: offline HF, markers, framework skips, per-test seeds.

- `gpu` tests run only where CUDA is present (the H200); elsewhere they skip with that reason.
- `torch` / `jax` fixtures skip a test cleanly when that framework is not installed.
- `seed` is derived from the test's node id, so each test draws its own reproducible random inputs.
"""

from __future__ import annotations

import importlib.util
import os
import zlib

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# fp32 equivalence needs full-precision matmuls in JAX (SPEC.md, numerics policy).
os.environ.setdefault("JAX_DEFAULT_MATMUL_PRECISION", "highest")

HAS_TORCH = importlib.util.find_spec("torch") is not None
HAS_JAX = importlib.util.find_spec("jax") is not None and importlib.util.find_spec("flax") is not None
HAS_TRANSFORMERS = importlib.util.find_spec("transformers") is not None


def _has_cuda() -> bool:
    if not HAS_TORCH:
        return False
    import torch

    return torch.cuda.is_available()


def pytest_collection_modifyitems(config, items):
    if _has_cuda():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU (run with `make test-gpu` on the H200)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture
def seed(request) -> int:
    """A reproducible seed unique to this test (crc32 of its node id)."""
    return zlib.crc32(request.node.nodeid.encode()) & 0x7FFFFFFF


requires_torch = pytest.mark.skipif(not HAS_TORCH, reason="torch is not installed (pip install -e '.[torch]')")
requires_jax = pytest.mark.skipif(not HAS_JAX, reason="jax/flax are not installed (pip install -e '.[jax]')")
requires_transformers = pytest.mark.skipif(not HAS_TRANSFORMERS,
                                           reason="transformers is not installed (pip install -e '.[test]')")
