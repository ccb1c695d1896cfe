"""Cross-framework check at full width (issue #17): torch_impl and jax_impl train the same bf16 Qwen3-30B-A3B-shaped
model (random weights, depth truncated to 4 layers) for 20 steps, and their loss curves must agree within
`shared_math.numerics.tolerance("bfloat16", "train_loss")` (3e-2 relative per step: each framework rounds its own
bf16 forward and backward differently, and the two runs drift apart over the AdamW steps).

    python3 benchmarks/cross_full.py --out RESULTS.jsonl                       # the H200: full width, 4 layers
    python3 benchmarks/cross_full.py --preset tiny --layers 2 --steps 3 --seq-len 32   # CPU (tests/cross)

1. Checkpoint: a HF-format bf16 checkpoint of `--family`'s `--preset` (shared_math.presets; default the family's
   first full-size preset, qwen3_moe 30b-a3b) truncated to `--layers`, in the hub's per-expert layout, 1 GiB
   shards, under `--workdir` (default /dev/shm/splitmoe_cross_full, else the temp folder). Weights follow
   `shared_math.tiny.random_canonical_tensors`' scheme, fan-in scaled so activations stay O(1) and the loss starts
   near ln(V) and falls (N(0, 0.02²) everywhere would leave the residual stream near zero and the loss flat):
   Linear and expert weights N(0, 1/fan_in), embeddings N(0, 1), norm weights 1 + N(0, 0.1²). They are drawn
   lazily, one tensor at a time in float32 (`lazy_random_canonical_tensors`), and `write_checkpoint` writes each
   shard as it fills, so a 4-layer 30B-A3B (3.1 B parameters, 5.8 GiB bf16) is written holding about one shard
   and one tensor (~4 GB) of host memory. A `.complete` marker holding the request lets a later run reuse it.
2. Training: `splitmoe.train_cli.compare` (the engine of `splitmoe compare`) with model.dtype bfloat16, split LoRA
   r=64 alpha=128 on q/k/v/o_proj and both expert tensors, the synthetic copy/reverse data packed into
   `--batch-size` rows of `--seq-len` tokens, AdamW lr `--lr` (1e-3: warmup 5 steps, cosine to 0), weight decay
   0.01, clipping at 1.0, MoE backends `auto`. torch trains on CUDA when torch sees a GPU (else the CPU), jax on
   its default device; a run where the two would land on different kinds of device is refused (exit 2). JAX does
   not preallocate (XLA_PYTHON_CLIENT_PREALLOCATE=false): both frameworks share the one GPU.
3. Results: compare.jsonl and compare.png in `<workdir>/compare` (`report_compare`, as `splitmoe compare`), the
   step table and a verdict line on stdout, and with `--out` one JSON row appended: family, preset, layers, seq,
   steps, per-step losses, max relative loss / grad-norm differences, tolerance, pass, load / first-step / median
   step seconds and peak device memory per framework, versions. Exit 1 when a step's loss is over tolerance.

Extra `key=value` arguments are run-config overrides laid over these settings (e.g. train.gradient_checkpointing=
recompute, model.moe_backend=native).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

# before jax is imported anywhere: a preallocating XLA client would take 75 % of the GPU that torch shares
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import versions, write_jsonl  # noqa: E402
from shared_math.config import DEFAULT_TARGETS, ModelConfig  # noqa: E402
from shared_math.presets import preset_hf_config, preset_names  # noqa: E402

GiB = 2**30
SHARD_BYTES = GiB  # bf16 bytes per shard: bounds the host memory the writer holds


def default_workdir() -> Path:
    shm = Path("/dev/shm")
    return (shm if shm.is_dir() else Path(tempfile.gettempdir())) / "splitmoe_cross_full"


def ensure_checkpoint(root: Path, family: str, preset: str, layers: int, *, seed: int = 0) -> tuple[Path, float]:
    """The random bf16 checkpoint of (family, preset, layers, seed) under `root`, written unless a complete one is
    there; returns its folder and the seconds spent writing (0 when reused)."""
    from shared_math.checkpoint import write_checkpoint
    from shared_math.progress import with_load_progress
    from shared_math.tiny import lazy_random_canonical_tensors

    spec = {"family": family, "preset": preset, "layers": layers, "seed": seed, "dtype": "bfloat16",
            "scheme": "lazy_random_canonical_tensors"}
    folder = root / f"{family}-{preset}-L{layers}-s{seed}"
    marker = folder / ".complete"
    if marker.is_file() and json.loads(marker.read_text()) == spec:
        return folder, 0.0
    shutil.rmtree(folder, ignore_errors=True)  # a partial or different write: start over
    hf = preset_hf_config(family, preset, layers)
    cfg = ModelConfig.from_hf(hf)
    t0 = time.perf_counter()
    tensors = with_load_progress(lazy_random_canonical_tensors(cfg, seed), f"writing {folder.name}")
    write_checkpoint(folder, hf, tensors, dtype="bfloat16", max_shard_bytes=SHARD_BYTES)
    marker.write_text(json.dumps(spec))
    return folder, time.perf_counter() - t0


def checkpoint_gib(folder: Path) -> float:
    return sum(f.stat().st_size for f in folder.glob("*.safetensors")) / GiB


def pick_devices(requested: str) -> tuple[str, str]:
    """(torch device, jax default backend). `requested` auto: cuda when torch sees a GPU. Raises ValueError when
    the two frameworks would train on different kinds of device (a jax run on the CPU at full size would take hours
    and compare nothing the GPU run cares about)."""
    import jax
    import torch

    device = requested if requested != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    jax_backend = jax.default_backend()  # "gpu" / "cuda" or "cpu"
    if (torch.device(device).type == "cuda") != (jax_backend in ("gpu", "cuda")):
        raise ValueError(f"torch would train on {device} but jax on {jax_backend} (jax.default_backend()); install "
                         "jax with CUDA (or torch without) so both use the same kind of device, or pass --device")
    return device, jax_backend


def run_overrides(args: argparse.Namespace, checkpoint: Path, run_dir: Path) -> list[str]:
    """The run config of the comparison, as `key=value` overrides of the defaults (RunConfig)."""
    targets = ",".join(DEFAULT_TARGETS)  # q/k/v/o_proj, experts.gate_up_proj, experts.down_proj
    # enough synthetic records that the packed rows of all steps are mostly distinct (~20 tokens a record)
    num_train = max(400, args.steps * args.batch_size * args.grad_accum * args.seq_len // 20)
    return [f"model.path={checkpoint}", "model.dtype=bfloat16",
            f"lora.rank={args.rank}", f"lora.alpha={args.alpha}", f"lora.targets=[{targets}]",
            "data.source=synthetic", "data.synthetic.tasks=[copy,rev]", f"data.synthetic.num_train={num_train}",
            "data.synthetic.num_eval=10", f"data.seq_len={args.seq_len}", f"data.batch_size={args.batch_size}",
            f"optim.lr={args.lr}", "optim.weight_decay=0.01", f"optim.warmup_steps={min(5, args.steps)}",
            "optim.max_grad_norm=1.0", f"train.grad_accum={args.grad_accum}", "train.eval_every=0",
            "train.save_every=0", f"train.out_dir={run_dir}", *args.overrides]


def peak_memory_gib(torch_device: str) -> dict[str, float | None]:
    """Each framework's peak device memory in this process (None on the CPU, where neither tracks it)."""
    import jax
    import torch

    out: dict[str, float | None] = {"torch": None, "jax": None}
    if torch.device(torch_device).type == "cuda":
        out["torch"] = torch.cuda.max_memory_allocated(torch_device) / GiB
    stats = jax.devices()[0].memory_stats() or {}
    if "peak_bytes_in_use" in stats:
        out["jax"] = stats["peak_bytes_in_use"] / GiB
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--family", default="qwen3_moe")
    p.add_argument("--preset", help="a shared_math.presets preset or tiny (default: the family's first full-size)")
    p.add_argument("--layers", type=int, default=4, help="decoder layers kept (default 4)")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--seq-len", type=int, default=1024)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--grad-accum", type=int, default=1)
    p.add_argument("--rank", type=int, default=64)
    p.add_argument("--alpha", type=float, default=128.0)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--seed", type=int, default=0, help="seed of the random weights")
    p.add_argument("--device", default="auto", help="torch's device (auto: cuda when torch sees a GPU)")
    p.add_argument("--workdir", type=Path, default=None,
                   help=f"checkpoint and compare outputs (default {default_workdir()})")
    p.add_argument("--out", type=Path, help="JSONL file to append the summary row to")
    p.add_argument("overrides", nargs="*", help="run-config key=value overrides, e.g. model.moe_backend=native")
    args = p.parse_args(argv)
    preset = args.preset or preset_names(args.family)[0]
    workdir = args.workdir or default_workdir()

    from shared_math.numerics import tolerance
    from shared_math.train_config import load_run_config
    from shared_math.training import TrainingDiverged
    from splitmoe.train_cli import compare, report_compare

    try:
        device, jax_backend = pick_devices(args.device)
    except ValueError as e:
        print(f"cross_full: error: {e}", file=sys.stderr)
        return 2
    print(f"cross_full: {args.family} {preset}, {args.layers} layers, bf16; torch on {device}, jax on {jax_backend}; "
          f"workdir {workdir}", flush=True)
    checkpoint, write_s = ensure_checkpoint(workdir, args.family, preset, args.layers, seed=args.seed)
    print(f"checkpoint {checkpoint} ({checkpoint_gib(checkpoint):.2f} GiB"
          f"{f', written in {write_s:.0f} s' if write_s else ', reused'})", flush=True)

    cfg = load_run_config(None, run_overrides(args, checkpoint, workdir / "compare"))
    try:
        res = compare(cfg, args.steps, out_dir=workdir / "compare", device=device)
    except TrainingDiverged as e:  # as `splitmoe compare`: 3 for a run that diverged
        print(f"cross_full: error: {e}", file=sys.stderr)
        return 3
    ok = report_compare(res, cfg.model.dtype)  # table, verdict, compare.jsonl, compare.png

    rows, tol = res["rows"], tolerance(cfg.model.dtype, "train_loss")
    timing = {k: {"load_s": res["load_seconds"][k], "first_step_s": rows[0][f"seconds_{k}"],
                  # later steps: the first one compiles (jax's jit, torch's Triton autotuning)
                  "median_step_s": statistics.median(r[f"seconds_{k}"] for r in rows[1:]) if len(rows) > 1
                  else math.nan} for k in ("torch", "jax")}
    summary: dict[str, Any] = {
        "bench": "cross_full", "family": args.family, "preset": preset, "layers": args.layers,
        "seq_len": args.seq_len, "batch_size": args.batch_size, "grad_accum": args.grad_accum, "steps": args.steps,
        "lora": {"rank": args.rank, "alpha": args.alpha, "targets": list(cfg.lora.targets)}, "lr": args.lr,
        "dtype": cfg.model.dtype, "moe_backend": cfg.model.moe_backend, "overrides": args.overrides,
        "torch_device": device, "jax_backend": jax_backend,
        "loss_torch": [r["loss_torch"] for r in rows], "loss_jax": [r["loss_jax"] for r in rows],
        "max_loss_rel": res["max_loss_rel"], "max_grad_norm_rel": res["max_grad_norm_rel"],
        "tolerance": tol.rtol, "pass": ok, "timing": timing, "peak_gib": peak_memory_gib(device),
        "checkpoint_gib": checkpoint_gib(checkpoint), "checkpoint_write_s": write_s,
        "compare_dir": str(res["out_dir"]), "versions": versions()}
    print(f"cross_full {'PASS' if ok else 'FAIL'}: max relative loss difference {res['max_loss_rel']:.2e} "
          f"over {args.steps} steps vs bf16 tolerance {tol.rtol:g}; loss {rows[0]['loss_torch']:.4f} -> "
          f"{rows[-1]['loss_torch']:.4f} (torch), {rows[0]['loss_jax']:.4f} -> {rows[-1]['loss_jax']:.4f} (jax)")
    if args.out:
        write_jsonl(args.out, [summary])
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
