"""JAX's persistent compilation cache for the jitted training step: a run whose step has the shapes of an earlier
run (a restarted notebook, the next run of a sweep) loads the compiled executable from disk instead of compiling it.

A full-size step compiles for about a minute on a GPU (benchmarks/REPORT.md, 2026-12-05 session 5: 52-67 s per
length for 24 decoder layers), a cost every run of an ablation sweep otherwise pays again. JAX keys each entry by
the program, the device and the jax/jaxlib versions, so a hit is the executable this process would have compiled.

`enable_compile_cache(setting)`: "auto" (the trainer's default, `train.jax_compile_cache`) uses the folder in
`JAX_COMPILATION_CACHE_DIR` when set, else `$XDG_CACHE_HOME/splitmoe/jax` (`~/.cache/...`), and only where JAX's
default backend is a GPU: tiny CPU steps (tests, CI) compile in seconds and gain less than the disk costs; "off"
leaves JAX as it is; any other value is the folder to use (created; it must be writable), on any backend.
"""

from __future__ import annotations

import os
from pathlib import Path

import jax
from jax.experimental.compilation_cache import compilation_cache as _cc

from shared_math.train_config import ConfigError

__all__ = ["default_cache_dir", "enable_compile_cache"]

# JAX's own default: programs that compile faster than this are not worth a disk write and read
MIN_COMPILE_TIME_S = 1.0


def default_cache_dir() -> Path:
    """`JAX_COMPILATION_CACHE_DIR` when set, else `$XDG_CACHE_HOME/splitmoe/jax` (XDG default `~/.cache`)."""
    env = os.environ.get("JAX_COMPILATION_CACHE_DIR")
    if env:
        return Path(env).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "splitmoe" / "jax"


def enable_compile_cache(setting: str = "auto", *, min_compile_time_s: float = MIN_COMPILE_TIME_S) -> Path | None:
    """Point JAX's persistent compilation cache at a folder -> that folder, or None when the cache stays off
    ("off", or "auto" on a CPU backend). Raises ConfigError when the folder cannot be used; nothing is compiled or
    written here, so a refused setting loses nothing."""
    if not isinstance(setting, str) or not setting.strip():
        raise ConfigError(f"train.jax_compile_cache={setting!r}: expected auto, off or a folder path")
    setting = setting.strip()
    if setting == "off":
        return None
    if setting == "auto":
        if jax.default_backend() == "cpu":
            return None
        path = default_cache_dir()
    else:
        path = Path(setting).expanduser()
    if path.exists() and not path.is_dir():
        raise ConfigError(f"train.jax_compile_cache: {path} exists and is not a folder; give a folder path, or off")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ConfigError(f"train.jax_compile_cache: cannot create {path} ({e.strerror}); give a writable folder, "
                          "or off") from None
    if not os.access(path, os.W_OK):
        raise ConfigError(f"train.jax_compile_cache: {path} is not writable; give a writable folder, or off")
    if jax.config.jax_compilation_cache_dir != str(path):
        # JAX opens its cache once per process, at the first compile: a process that compiled before (a notebook,
        # a test) must drop that handle for the new folder to take effect
        _cc.reset_cache()
        _cc.set_cache_dir(str(path))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", float(min_compile_time_s))
    return path
