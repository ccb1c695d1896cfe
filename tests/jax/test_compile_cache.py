"""JAX's persistent compilation cache (`jax_impl.compile_cache`, `train.jax_compile_cache`): a second process with
the same program loads it from the folder instead of compiling it; "off" and "auto" on a CPU leave JAX as it is; a
folder that cannot be used is a ConfigError before the trainer builds or writes anything."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("jax")

import jax  # noqa: E402

from jax_impl.compile_cache import default_cache_dir, enable_compile_cache  # noqa: E402
from shared_math.train_config import ConfigError, load_run_config  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]

# one process: cache in argv[1] (every compile cached: threshold 0), one jitted program, the cache hits it saw
_PROBE = """
import json, sys
import jax, jax.numpy as jnp
from jax_impl.compile_cache import enable_compile_cache
hits = []
jax.monitoring.register_event_listener(lambda e, **kw: hits.append(e) if e.endswith("/cache_hits") else None)
enable_compile_cache(sys.argv[1], min_compile_time_s=0.0)
f = jax.jit(lambda x: jnp.tanh(x @ x.T).sum(axis=0) * 3.0 + 1.0)
print(json.dumps({"value": float(f(jnp.arange(12.0).reshape(3, 4)).sum()), "hits": len(hits)}))
"""


def _probe(folder: Path) -> dict:
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(ROOT)}
    env.pop("JAX_COMPILATION_CACHE_DIR", None)
    out = subprocess.run([sys.executable, "-c", _PROBE, str(folder)], env=env, capture_output=True, text=True,
                         timeout=120, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def test_second_process_loads_the_compiled_program(tmp_path):
    folder = tmp_path / "cache"
    first = _probe(folder)
    assert first["hits"] == 0
    assert any(folder.iterdir()), "the first process wrote no cache entry"
    second = _probe(folder)
    assert second["hits"] >= 1, "the second process compiled again instead of loading the cached program"
    assert second["value"] == first["value"]


def test_off_and_auto_on_cpu_leave_jax_as_it_is():
    before = jax.config.jax_compilation_cache_dir
    assert enable_compile_cache("off") is None
    assert jax.default_backend() == "cpu"
    assert enable_compile_cache("auto") is None
    assert jax.config.jax_compilation_cache_dir == before


def test_default_folder(monkeypatch, tmp_path):
    monkeypatch.delenv("JAX_COMPILATION_CACHE_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert default_cache_dir() == tmp_path / "splitmoe" / "jax"
    monkeypatch.setenv("JAX_COMPILATION_CACHE_DIR", str(tmp_path / "mine"))
    assert default_cache_dir() == tmp_path / "mine"


@pytest.mark.parametrize("setting", ["file", "under_file", ""])
def test_unusable_folder_is_a_config_error(tmp_path, setting):
    a_file = tmp_path / "a_file"
    a_file.write_text("not a folder")
    value = {"file": str(a_file), "under_file": str(a_file / "cache"), "": "  "}[setting]
    with pytest.raises(ConfigError, match="jax_compile_cache"):
        enable_compile_cache(value)


def test_trainer_refuses_an_unusable_cache_before_writing_anything(tmp_path):
    from jax_impl.train import Trainer

    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    out = tmp_path / "run"
    cfg = load_run_config(None, [f"train.out_dir={out}", "framework=jax", f"train.jax_compile_cache={a_file}"])
    with pytest.raises(ConfigError, match="is not a folder"):
        Trainer(cfg)
    assert not out.exists()
    assert a_file.read_text() == "x"
