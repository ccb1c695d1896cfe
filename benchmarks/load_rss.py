"""Peak host memory while `jax_impl.load_model` loads a Qwen3-30B-A3B-sized checkpoint (random bf16 weights).

    python3 benchmarks/load_rss.py --layers 48 --dir /dev/shm/q30b            # full depth: a 61 GB checkpoint
    python3 benchmarks/load_rss.py --layers 4 --device cpu --out results/load_rss.jsonl

Writes the checkpoint first (unless `--dir` already holds a complete one): the hub's layout (per-expert
`gate_proj` / `up_proj` / `down_proj` tensors, which the reader stacks into the canonical [E, in, out]), BF16, one
safetensors shard per decoder layer plus one for the embeddings, norm and lm_head, with its index. The writer streams
tensor by tensor (`write_safetensors` would hold a shard's arrays at once), drawing random bf16 bit patterns of
magnitude 2^-7..2^-6 (norms 1): loading does not depend on the values.

Then loads it in a fresh process (`--measure`): the resident set before `load_model` (interpreter, JAX, the modules),
its peak during the load (VmHWM, reset just before; `ru_maxrss` where that cannot be reset), the bytes of the
loaded arrays, the largest tensor and the seconds. On a GPU the loaded arrays are device memory, so the host peak
above the baseline is what loading itself holds (`DeviceTensors`: about one tensor); on a CPU the arrays are host
memory, and `host_beyond_model_gib` subtracts them. One JSON line on stdout, appended to `--out`.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import struct
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402

GiB = 2**30


def _random_bf16_bits(rng: np.random.Generator, n: int) -> np.ndarray:
    """n random bf16 bit patterns: random sign and 7-bit mantissa, exponent 2^-7 (|x| in [0.0078, 0.0156))."""
    bits = rng.integers(0, 1 << 16, n, dtype=np.uint16)
    return (bits & np.uint16(0x807F)) | np.uint16(120 << 7)


def _write_shard(path: Path, entries: list[tuple[str, tuple[int, ...], bool]], rng: np.random.Generator) -> int:
    """Write a BF16 safetensors file of `entries` (name, shape, is_norm) tensor by tensor; returns its bytes."""
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for name, shape, _ in entries:
        n = int(np.prod(shape)) * 2
        header[name] = {"dtype": "BF16", "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as fh:
        fh.write(struct.pack("<Q", len(raw)))
        fh.write(raw)
        for _, shape, is_norm in entries:
            n = int(np.prod(shape))
            data = np.full(n, 0x3F80, np.uint16) if is_norm else _random_bf16_bits(rng, n)  # 0x3F80 = 1.0
            fh.write(data.astype("<u2").tobytes())
    return 8 + len(raw) + offset


def write_random_checkpoint(root: Path, layers: int, seed: int = 0) -> Path:
    """Qwen3-30B-A3B's config truncated to `layers`, random BF16 weights in the hub layout, one shard per layer."""
    from shared_math.checkpoint import expected_shapes, hf_keys_for
    from shared_math.config import ModelConfig
    from shared_math.presets import preset_hf_config

    if (root / ".complete").is_file():
        return root
    root.mkdir(parents=True, exist_ok=True)
    hf = {**preset_hf_config("qwen3_moe", "30b-a3b", layers), "dtype": "bfloat16"}
    cfg = ModelConfig.from_hf(hf)
    groups: dict[str, list[tuple[str, tuple[int, ...], bool]]] = {}
    for name, shape in expected_shapes(cfg).items():
        shard = name.split(".")[1] if name.startswith("layers.") else "rest"
        recipe = hf_keys_for(cfg, name, shape, "hub")
        groups.setdefault(shard, []).extend((k, s, name.endswith("norm.weight"))
                                            for k, s in zip(recipe.keys, recipe.shapes))
    rng = np.random.default_rng(seed)
    weight_map, total = {}, 0
    for i, (shard, entries) in enumerate(groups.items()):
        fname = f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors"
        total += _write_shard(root / fname, entries, rng)
        weight_map.update({k: fname for k, _, _ in entries})
        print(f"wrote {fname} ({shard}): {total / GiB:.1f} GiB so far", file=sys.stderr, flush=True)
    (root / "config.json").write_text(json.dumps(hf, indent=2) + "\n")
    (root / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2) + "\n")
    (root / ".complete").write_text("")
    return root


def _status_bytes(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def measure(path: Path, device: str) -> dict:
    """Load `path` with jax_impl in this (fresh) process; the host memory figures of the module docstring."""
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    if device == "cpu":
        os.environ.setdefault("JAX_PLATFORMS", "cpu")
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from jax_impl import load_model
    from shared_math.checkpoint import read_checkpoint

    _, tensors = read_checkpoint(path)
    largest = max(int(np.prod(s)) for s in tensors.shapes.values()) * 2
    del tensors
    jnp.zeros(1).block_until_ready()  # the backend is up before the baseline
    try:
        Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
        peak_of = "VmHWM"
    except OSError:
        peak_of = "ru_maxrss"
    base = _status_bytes("VmRSS") or resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    t0 = time.perf_counter()
    model = load_model(path, dtype=jnp.bfloat16)
    arrays = jax.tree.leaves(nnx.state(model))
    jax.block_until_ready(arrays)
    seconds = time.perf_counter() - t0
    peak = (_status_bytes("VmHWM") if peak_of == "VmHWM" else None) or \
        resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    model_bytes = sum(x.nbytes for x in arrays)
    on_host = jax.default_backend() == "cpu"
    above = peak - base
    return dict(bench="load_rss", layers=model.config.num_hidden_layers, device=jax.devices()[0].device_kind,
                file_gib=sum(f.stat().st_size for f in path.glob("*.safetensors")) / GiB,
                model_gib=model_bytes / GiB, largest_tensor_gib=largest / GiB, baseline_rss_gib=base / GiB,
                peak_rss_gib=peak / GiB, peak_above_baseline_gib=above / GiB,
                host_beyond_model_gib=(above - model_bytes if on_host else above) / GiB, load_s=seconds,
                peak_source=peak_of, jax=jax.__version__)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, default=48, help="decoder layers (48 = Qwen3-30B-A3B's full depth)")
    p.add_argument("--dir", type=Path, default=None, help="where the checkpoint is (written unless complete there)")
    p.add_argument("--device", default=None, choices=["cpu", "gpu"], help="default: JAX's default backend")
    p.add_argument("--out", type=Path, default=None, help="append the JSON row here")
    p.add_argument("--measure", type=Path, default=None, help=argparse.SUPPRESS)  # the child process
    a = p.parse_args(argv)
    if a.measure is not None:
        print(json.dumps(measure(a.measure, a.device or "")), flush=True)
        return 0
    root = a.dir or Path("/tmp") / f"splitmoe_qwen3_30b_L{a.layers}"
    write_random_checkpoint(root, a.layers)
    cmd = [sys.executable, __file__, "--measure", str(root)] + (["--device", a.device] if a.device else [])
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1]
    row = json.loads(out)
    print(json.dumps(row), flush=True)
    if a.out:
        a.out.parent.mkdir(parents=True, exist_ok=True)
        with a.out.open("a") as f:
            f.write(json.dumps(row) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
