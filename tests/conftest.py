"""Shared test set-up: offline HF, markers, framework skips, per-test seeds.

- `gpu` tests run only where CUDA is present (the H200); elsewhere they skip with that reason.
- `torch` / `jax` fixtures skip a test cleanly when that framework is not installed.
- `seed` is derived from the test's node id, so each test draws its own reproducible random inputs.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
import zlib

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# fp32 equivalence needs full-precision matmuls in JAX (SPEC.md, numerics policy).
os.environ.setdefault("JAX_DEFAULT_MATMUL_PRECISION", "highest")

# One JAX persistent compilation cache for the whole run, every program cached (threshold 0). Many tests build the
# same tiny models and jit the same programs afresh; measured on the 2-core CI machine (2026-12-07), the JAX
# checkpointing + training suites ran 109 s without it and 90 s with it from an empty folder. JAX keys entries by
# program, backend and versions, so a hit is the executable the test would have compiled. The folder is made by the
# first process that loads this file (the xdist controller, which loads it before starting its workers, or a plain
# pytest), inherited by workers and subprocesses through the environment, and removed at that process's end; a
# folder the user set is left to them.
_JAX_CACHE_OWNER = "JAX_COMPILATION_CACHE_DIR" not in os.environ and "PYTEST_XDIST_WORKER" not in os.environ
if _JAX_CACHE_OWNER:
    os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="splitmoe-tests-jax-cache-")
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")

HAS_TORCH = importlib.util.find_spec("torch") is not None
HAS_JAX = importlib.util.find_spec("jax") is not None and importlib.util.find_spec("flax") is not None
HAS_TRANSFORMERS = importlib.util.find_spec("transformers") is not None


def _has_cuda() -> bool:
    if not HAS_TORCH:
        return False
    import torch

    return torch.cuda.is_available()


def pytest_unconfigure(config):
    if _JAX_CACHE_OWNER:
        shutil.rmtree(os.environ["JAX_COMPILATION_CACHE_DIR"], ignore_errors=True)


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
