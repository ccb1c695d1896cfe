"""Lower the `tokamax` backend's split-LoRA block gradient for CUDA on a CPU, with tokamax's device stood in for by an
H100: which cases Mosaic GPU lowers, and how long tracing and lowering take, with no GPU.

This is how session 26 found why every tokamax bf16 gpu test failed on the H100 (Mosaic's rule that operands be
whole 128-byte tiles, now met by `jax_impl.backends.tokamax_ragged_dot._pad_for_mosaic`) and how session 27 showed
that the full-size T=16384 blocks, whose rows outlasted 240 s on the GPU, lower in seconds: their time goes to
XLA's compile or the first run, not to tokamax's lowering.

What is stood in for: tokamax asks `backend.get_default_device()` which GPU it targets (to pick a kernel for the
card); here it gets an H100 (platform "gpu", compute capability 9.0). The backend's one-time trace probe
(`_trace_error`) and jax_impl's availability check are skipped, since both would look for a real GPU. The graph is
`jax.jit(jax.grad(loss)).trace(...).lower(lowering_platforms=("cuda",))` on shape-only arguments: nothing is
allocated, compiled to PTX or run.

Needs tokamax >= 0.0.14 with jax 0.11.2 (the GPU machine's pair: `benchmarks/tokamax-wheels.sh`, Python 3.12):

    PYTHONPATH=<tokamax>:<jax 0.11.2>:. python3.12 benchmarks/tokamax_lower.py --cases gpu,qwen3_30b_T16384

One JSON line per case: {"case", "ok", "trace_s", "lower_s", "mosaic_kernels"} or {"case", "ok": false, "error"}.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import re
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


class StandInH100:
    """What tokamax reads of its default device to choose a kernel: an H100's platform, kind and capability. A class,
    not a SimpleNamespace: tokamax keys caches by the device, so it must be hashable."""

    platform, device_kind, compute_capability, id = "gpu", "NVIDIA H100 80GB HBM3", "9.0", 0


def stand_in_h100() -> None:
    """Point tokamax's device lookups at a stand-in H100, and skip the GPU-only probes of jax_impl's backend."""
    from tokamax._src import gpu_utils
    from tokamax._src.ops.ragged_dot import api

    import jax_impl.backends as backends
    import jax_impl.backends.tokamax_ragged_dot as tk

    gpu_utils.backend.get_default_device = lambda *a, **k: StandInH100
    api.backend.get_default_device = lambda *a, **k: StandInH100
    tk._trace_error = lambda impl, dtype: None
    backends.why_unavailable = lambda *a, **k: None


def lower_case(name: str) -> dict:
    """Trace and lower d(loss)/d(x, LoRA) of the split-LoRA block of case `name` in bf16 for CUDA -> its row."""
    import jax
    import jax.numpy as jnp

    from jax_impl.moe import split_lora_experts
    from shared_math.cases import get_case

    row = {"case": name}
    try:
        c = get_case(name)
        bf, f32, S = jnp.bfloat16, jnp.float32, jax.ShapeDtypeStruct

        def loss(x, ids, w, wgu, wd, dy, lora, biases):
            a1, b1, a2, b2 = (t.astype(bf) for t in lora)
            y = split_lora_experts(x, ids, w, wgu, wd, (a1, b1), (a2, b2), scale=2.0, biases=biases,
                                   activation=c.activation, swiglu_limit=c.swiglu_limit, backend="tokamax")
            return jnp.vdot(y.astype(f32), dy.astype(f32))

        args = (S((c.T, c.H), bf), S((c.T, c.K), jnp.int32), S((c.T, c.K), bf), S((c.E, c.H, 2 * c.I), bf),
                S((c.E, c.I, c.H), bf), S((c.T, c.H), bf),
                (S((c.E, c.H, c.R), f32), S((c.E, c.R, 2 * c.I), f32), S((c.E, c.I, c.R), f32),
                 S((c.E, c.R, c.H), f32)),
                (S((c.E, 2 * c.I), bf), S((c.E, c.H), bf)) if c.biases else None)
        t0 = time.perf_counter()
        traced = jax.jit(jax.grad(loss, argnums=(0, 6))).trace(*args)
        row["trace_s"] = round(time.perf_counter() - t0, 2)
        t0 = time.perf_counter()
        text = traced.lower(lowering_platforms=("cuda",)).as_text()
        row["lower_s"] = round(time.perf_counter() - t0, 2)
    except Exception as e:  # the row says why this case does not lower; the next case still runs
        return {**row, "ok": False, "error": f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"}
    # one custom call per Mosaic GPU kernel launch in the lowered module
    row.update(ok=True, mosaic_kernels=len(re.findall(r"stablehlo\.custom_call @mosaic_gpu", text)))
    return row


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cases", default="gpu,qwen3_30b_T16384,gpt_oss_20b_T16384",
                   help="comma-separated case names or tags (ci, gpu, bench) of shared_math.cases")
    args = p.parse_args(argv)
    if importlib.util.find_spec("tokamax") is None:
        print("tokamax is not installed: pip install 'splitmoe[tokamax]', or put benchmarks/tokamax-wheels.sh's "
              "wheels on PYTHONPATH (see this script's docstring)", file=sys.stderr)
        return 2
    # every dot on Mosaic, the per-group form's included (which the backend now sends to tokamax's Triton kernel on
    # a GPU, `tokamax_ragged_dot._per_group_implementation`): Pallas's Triton lowering asks for a real GPU device
    # ("No supported GPU devices found"), which this stand-in is not
    os.environ["SPLITMOE_TOKAMAX_IMPL"] = "mosaic"
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    from shared_math.cases import CASES

    names: list[str] = []
    for item in filter(None, (s.strip() for s in args.cases.split(","))):
        names += [c.name for c in CASES if item in c.tags] or [item]
    stand_in_h100()
    failed = 0
    for name in names:
        row = lower_case(name)
        failed += not row["ok"]
        print(json.dumps(row), flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
