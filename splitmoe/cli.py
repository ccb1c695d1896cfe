"""`splitmoe demo | train | compare | sweep | make-tiny | inspect | plan | bench`: argument parsing only; the work
happens in shared_math and the frameworks (train/compare live in splitmoe/train_cli.py, sweep in splitmoe/sweep.py).

make-tiny  writes a small random HF-format checkpoint of one family (transformers loads it with from_pretrained).
demo       the embedded default job: builds the tiny Qwen3-MoE checkpoint, trains split LoRA on the synthetic tasks,
           evaluates held-out exact-match before and after, saves the PEFT adapter and the loss curve.
inspect    reads a tiny checkpoint back and runs the float64 reference MoE block of every MoE layer on it (routing
           loads, output scale), then prints the merged-vs-split cost plan. `inspect --routing --model DIR
           [--adapter DIR] --data FILE.jsonl [--framework torch|jax] [--out DIR]`: the routing analytics of a
           checkpoint over a data file (splitmoe/inspect_routing.py), a per-layer table (and routing.png).
plan       the merged-vs-split LoRA cost model (FLOPs, bytes, memory, forward and backward) for a model's shapes;
           with --gpus N|auto, per-GPU memory and an estimated step time of full-size presets on H200s;
           --checkpoint-layers N prices checkpointing only the first N decoder layers (the rest keep their
           activations), and `--checkpoint-layers auto --budget-gib X` finds the fewest that fit X GiB per GPU.
bench      the benchmark scripts of a source checkout (benchmarks/), by name: `splitmoe bench block --cases ...`
           runs benchmarks/moe_block.py with those arguments (`splitmoe bench NAME --help` lists them).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

from shared_math.config import SUPPORTED_MODEL_TYPES

DEFAULT_MODEL_YAML = Path(__file__).resolve().parent.parent / "configs" / "models" / "qwen3_moe_tiny.yaml"


def load_model_yaml(path: str | Path) -> dict:
    """A configs/models/*.yaml file: `family` (a tiny preset), optional `seed` and `overrides` (config.json fields)."""
    from shared_math.tiny import read_model_yaml

    return read_model_yaml(path)


MAKE_TINY_MARKER = "splitmoe_make_tiny.json"  # written beside a checkpoint make-tiny wrote: it may be replaced


def _refuse_foreign_folder(out: Path) -> None:
    """make-tiny overwrites config.json and model.safetensors: an --out folder that holds anything but an earlier
    make-tiny checkpoint (a downloaded model, a run folder: a mistyped path) is refused, not overwritten."""
    if out.is_dir() and any(out.iterdir()) and not (out / MAKE_TINY_MARKER).is_file():
        names = sorted(p.name for p in out.iterdir())
        held = ", ".join(names[:4]) + (", ..." if len(names) > 4 else "")
        raise ValueError(f"--out {out} is a folder that make-tiny did not write (it holds {held}); its files would be "
                         "overwritten: give a new or empty folder")


def _make_tiny(args: argparse.Namespace) -> int:
    from shared_math.checkpoint import write_tiny_checkpoint

    if args.config:
        spec = load_model_yaml(args.config)
        if args.family and args.family != spec["family"]:
            raise ValueError(f"--family {args.family} contradicts {args.config} (family {spec['family']})")
    elif args.family:
        spec = {"family": args.family, "seed": 0, "overrides": {}}
    else:
        raise ValueError("make-tiny needs --family or --config")
    seed = spec["seed"] if args.seed is None else args.seed
    _refuse_foreign_folder(Path(args.out))
    path = write_tiny_checkpoint(spec["family"], args.out, seed=seed, dtype=args.dtype, layout=args.layout,
                                 **spec["overrides"])
    (path / MAKE_TINY_MARKER).write_text(json.dumps({**spec, "seed": seed, "dtype": args.dtype,
                                                     "layout": args.layout}, sort_keys=True))
    print(f"wrote tiny {spec['family']} checkpoint ({args.dtype}, {args.layout} layout, seed {seed}) to {path}")
    return 0


def _inspect(args: argparse.Namespace) -> int:
    if args.routing:
        from splitmoe.inspect_routing import inspect_routing

        return inspect_routing(args)
    routing_only = [f"--{k.replace('_', '-')}" for k in ("model", "adapter", "data", "max_records")
                    if getattr(args, k) is not None]
    if routing_only:
        raise ValueError(f"{', '.join(routing_only)} {'is an option' if len(routing_only) == 1 else 'are options'} "
                         "of inspect --routing (the routing analytics of a checkpoint over a data file); add "
                         "--routing")
    import numpy as np

    from shared_math import cost, reference
    from shared_math.checkpoint import read_checkpoint, write_tiny_checkpoint

    t0 = time.perf_counter()
    out = Path(args.out or "runs/inspect")
    spec = load_model_yaml(args.config)
    ckpt = write_tiny_checkpoint(spec["family"], out / f"tiny-{spec['family']}", seed=spec["seed"],
                                 **spec["overrides"])
    cfg, tensors = read_checkpoint(ckpt)
    print(f"[1/3] tiny {cfg.family} checkpoint ({args.config}) at {ckpt}: {cfg.num_hidden_layers} layers, "
          f"H={cfg.hidden_size}, E={cfg.num_experts}, K={cfg.num_experts_per_tok}, I={cfg.moe_intermediate_size}")
    rng = np.random.default_rng(args.seed)
    x = rng.standard_normal((args.tokens, cfg.hidden_size))
    summary = {"checkpoint": str(ckpt), "layers": []}
    for l, is_moe in enumerate(cfg.moe_layers):
        if not is_moe:
            print(f"[2/3] layer {l}: dense MLP layer")
            continue
        layer = tensors.layer(l)
        y, logits = reference.moe_block(x, layer, cfg)
        ids, _ = reference.route(logits, cfg.routing)
        load = np.bincount(ids.ravel(), minlength=cfg.num_experts)
        summary["layers"].append({"layer": l, "expert_load": load.tolist(), "out_rms": float(np.sqrt((y**2).mean()))})
        print(f"[2/3] layer {l}: float64 reference MoE block on {args.tokens} tokens; rows per expert "
              f"{load.tolist()}; output rms {np.sqrt((y ** 2).mean()):.4g}")
    print("[3/3] merged (PEFT) vs split LoRA for one Qwen3-30B-A3B MoE layer, r=64 (shared_math.cost):")
    print(cost.summary_table("Qwen3-30B-A3B", 2048, 768, 128, 8, 64, (1024, 4096, 16384, 65536)))
    (out / "inspect_summary.json").write_text(json.dumps(summary, indent=1))
    print(f"done in {time.perf_counter() - t0:.1f}s; summary in {out / 'inspect_summary.json'}")
    return 0


def _demo(args: argparse.Namespace) -> int:
    from splitmoe.train_cli import run_default_job

    summary = run_default_job(args.out, framework=args.framework)
    # the job's promise: held-out exact-match over all tasks rises over the untrained model's
    before, after = summary["before"]["all"], summary["after"]["all"]
    if after <= before:
        print(f"splitmoe demo: held-out exact-match did not rise ({before:.2f} -> {after:.2f})", file=sys.stderr)
        return 1
    return 0


def _n_gpus(n: int) -> str:
    return f"{n} GPU" + ("s" if n > 1 else "")


def _gpu_plan(args: argparse.Namespace) -> int:
    """`plan --gpus N|auto`: per-GPU memory and estimated step time of presets on H200s (shared_math/plan.py)."""
    from shared_math import plan as P
    from shared_math.config import ModelConfig
    from shared_math.presets import PRESETS, preset_hf_config

    names = args.preset or [f"{f}:{p}" for f in PRESETS for p in PRESETS[f]]
    auto = str(args.gpus).lower() == "auto"
    if not auto and (not str(args.gpus).isdigit() or int(args.gpus) < 1):
        raise ValueError(f"--gpus must be a positive integer or auto, got {args.gpus!r}")
    seq = args.seq or 16384
    if seq < 1:
        raise ValueError(f"--seq must be >= 1, got {seq}")
    if args.layers is not None and args.layers < 1:
        raise ValueError(f"--layers must be >= 1, got {args.layers}")
    ckpt = args.checkpoint_layers
    auto_ckpt = ckpt is not None and str(ckpt).lower() == "auto"
    if ckpt is not None and not auto_ckpt and not str(ckpt).isdigit():
        raise ValueError(f"--checkpoint-layers must be a number of layers (0 or more) or auto, got {ckpt!r}")
    budget = P.H200_USABLE_GIB if args.budget_gib is None else args.budget_gib
    if not (math.isfinite(budget) and budget > 0):  # nan compares false: it "fit" nowhere, with no error
        raise ValueError(f"--budget-gib must be positive (a finite number of GiB), got {args.budget_gib}")
    if args.offload and args.checkpoint_policy != "nothing":
        raise ValueError(f"--checkpoint-policy {args.checkpoint_policy} keeps tensors on the GPU, which --offload "
                         "exists to avoid (torch_impl refuses the pair): use one or the other")
    kw = dict(offload=args.offload, optimizer=args.optimizer, expert_chunk=args.expert_chunk,
              checkpoint_policy=args.checkpoint_policy, optim_in_backward=args.optim_in_backward,
              compiled=args.compile, usable_gib=budget)
    if ckpt is not None and not auto_ckpt:
        kw["checkpoint_layers"] = int(ckpt)
    results = []
    for name in names:  # every name and layout checked before anything is printed
        family, _, preset = name.partition(":")
        if family not in PRESETS or not preset:
            raise ValueError(f"--preset {name!r}: write FAMILY:PRESET, one of "
                             + ", ".join(f"{f}:{p}" for f in PRESETS for p in PRESETS[f]))
        cfg = ModelConfig.from_hf(preset_hf_config(family, preset, layers=args.layers))
        if "checkpoint_layers" in kw and kw["checkpoint_layers"] > cfg.num_hidden_layers:
            raise ValueError(f"{name}: --checkpoint-layers {ckpt} is more than its {cfg.num_hidden_layers} decoder "
                             "layers (it counts the first layers checkpointed: 0 to the number of layers)")
        try:
            if auto:
                rows, fit = P.auto_plan(cfg, seq, args.rank, args.parallel, name=name, **kw)
            else:
                rows = [P.plan(cfg, P.Parallel.parse(args.parallel, int(args.gpus)), seq, args.rank, name=name,
                               **kw)]
                fit = rows[0] if rows[0].fits else P.auto_plan(cfg, seq, args.rank, args.parallel, name=name,
                                                               **kw)[1]
        except ValueError as e:
            try:  # say what would fit: the default layout (fsdp only) at the smallest power of two
                _, default_fit = P.auto_plan(cfg, seq, args.rank, None, name=name, **kw)
            except ValueError:
                default_fit = None
            where = (f"with fsdp only it fits on {_n_gpus(default_fit.gpus)}" if default_fit
                     else "it fits on no power of two <= 64 with fsdp only")
            raise ValueError(f"{name}: {e}; {where}") from None
        least = None
        if auto_ckpt and fit is not None and (auto or fit is rows[0]):
            # on the layout that fits with every layer checkpointed: the fewest checkpointed layers that still do
            least = P.least_checkpointed(cfg, fit.parallel, seq, args.rank, name=name, **kw)
        results.append((name, cfg, rows, fit, least))
    ckpt_note = ("" if ckpt is None else ", the fewest checkpointed layers that fit" if auto_ckpt
                 else ", no layer checkpointed" if int(ckpt) == 0
                 else f", the first {int(ckpt)} decoder layers checkpointed (the rest keep their activations)")
    print(f"per-GPU memory (GiB) and estimated step time against {budget:g} GiB per GPU"
          f"{' (an H200, usable)' if args.budget_gib is None else ''}: {seq} tokens per GPU, LoRA r={args.rank} on "
          f"attention + both expert tensors, {args.optimizer} AdamW"
          f"{' in the backward' if args.optim_in_backward else ''}"
          f"{', layer inputs offloaded to host' if args.offload else ''}"
          f"{f', experts in {args.expert_chunk}-token chunks' if args.expert_chunk else ''}{ckpt_note}"
          f"{', checkpointed layers keep their attention' if args.checkpoint_policy == 'attention' else ''}"
          f"{', compiled layers' if args.compile else ''}. Times are estimates (shared_math/plan.py says how they are "
          "calibrated: eager layers on one H200, compiled layers on one H100), not measurements.")
    for name, cfg, rows, fit, least in results:
        pc, lc = P.param_counts(cfg), P.lora_counts(cfg, args.rank)
        print(f"\n{name}: {cfg.num_hidden_layers} layers, {pc.total / 1e9:.2f}B params ({pc.experts / 1e9:.2f}B in "
              f"routed experts), {lc.total / 1e9:.2f}B LoRA")
        if auto_ckpt and least is not None:
            L, n = cfg.num_hidden_layers, least.checkpoint_layers
            print(P.format_table([least]))
            print(f"-> --checkpoint-layers {n}: the first {n} of {L} layers checkpointed, {L - n} keep their "
                  f"activations ({least.memory.total / P.GIB:.1f} of {budget:g} GiB on {_n_gpus(least.gpus)}, "
                  f"{least.parallel})")
            continue
        print(P.format_table(rows))
        if auto:
            print(f"-> smallest fit: {_n_gpus(fit.gpus)} ({fit.parallel})" if fit else
                  f"-> does not fit on {P.POWERS_OF_TWO[-1]} GPUs or fewer with this layout (try --parallel "
                  "expert=8, --offload or a shorter --seq)")
        elif not rows[0].fits:
            print(f"-> does not fit; smallest fit with this layout: {_n_gpus(fit.gpus)} ({fit.parallel})" if fit
                  else f"-> does not fit, nor on {P.POWERS_OF_TWO[-1]} GPUs or fewer with this layout")
    return 0


def _int_at_least(minimum: int, text: str) -> int:
    """argparse type: an int >= `minimum` (argparse names the flag in its error)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < minimum:
        raise argparse.ArgumentTypeError(f"{value} must be at least {minimum}")
    return value


def _positive_int(text: str) -> int:
    """argparse type: an int >= 1."""
    return _int_at_least(1, text)


def _non_negative_int(text: str) -> int:
    """argparse type: an int >= 0 (a seed: numpy refuses negative ones with a message that names no flag)."""
    return _int_at_least(0, text)


def _positive_ints(text: str) -> tuple[int, ...]:
    """argparse type: comma-separated ints >= 1, e.g. 1024,4096."""
    parts = [p.strip() for p in str(text).split(",")]
    if not all(parts):
        raise argparse.ArgumentTypeError(f"{text!r}: give comma-separated token counts such as 1024,4096")
    return tuple(_positive_int(p) for p in parts)


def _plan(args: argparse.Namespace) -> int:
    from shared_math import cost

    gpu_options = (args.preset, args.seq, args.parallel, args.expert_chunk, args.checkpoint_layers, args.budget_gib,
                   args.layers)
    gpu_flags = (args.offload, args.optim_in_backward, args.compile, args.checkpoint_policy != "nothing")
    if args.gpus is not None or any(o is not None for o in gpu_options) or any(gpu_flags):
        if args.gpus is None:
            args.gpus = "auto"
        return _gpu_plan(args)
    print(cost.summary_table("MoE layer", args.hidden, args.intermediate, args.experts, args.top_k, args.rank,
                             args.tokens))
    H, I, E, K, r = args.hidden, args.intermediate, args.experts, args.top_k, args.rank
    crossover = cost.crossover_tokens(H, 2 * I, E, K, r)
    bound = min(cost.backward_rank_bound(H, 2 * I), cost.backward_rank_bound(I, H))
    print(f"\nforward-only crossover (fused gate_up): {crossover:.0f} tokens; with the backward counted, split needs "
          f"fewer FLOPs at every T while r <= {bound:.0f}")
    return 0


BENCHMARKS = {
    "block": "moe_block",  # MoE block fwd+bwd vs HF v5 + PEFT (GPU)
    "step": "step",  # one full-model LoRA step, any family: torch_impl, jax_impl, HF v5 + PEFT, Unsloth (tiny on CPU)
    "sweep-triton": "triton_sweep",  # block-size tuning of the Triton kernels (GPU)
    "sweep-pallas": "pallas_sweep",  # block-size tuning of the Pallas kernels (GPU)
}


def _bench(args: argparse.Namespace) -> int:
    import importlib

    root = Path(__file__).resolve().parent.parent
    if not (root / "benchmarks" / f"{BENCHMARKS[args.name]}.py").is_file():
        raise FileNotFoundError(f"splitmoe bench runs the scripts in benchmarks/ of a source checkout, and {root} "
                                "has none: clone the repository and `pip install -e .` there")
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))
    module = importlib.import_module(f"benchmarks.{BENCHMARKS[args.name]}")
    return module.main(args.args)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="splitmoe", description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("make-tiny", help="write a small random HF-format checkpoint")
    t.add_argument("--family", choices=SUPPORTED_MODEL_TYPES)
    t.add_argument("--config", help="a configs/models/*.yaml file (family + overrides) instead of --family")
    t.add_argument("--out", required=True, help="folder to write (config.json + model.safetensors)")
    t.add_argument("--seed", type=_non_negative_int, default=None, help="default: the YAML's seed, else 0")
    t.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    t.add_argument("--layout", default="hub", choices=("hub", "fused"),
                   help="hub: per-expert tensors as on the Hub; fused: transformers v5's stacked experts")
    t.set_defaults(func=_make_tiny)

    j = sub.add_parser("demo", help="the embedded default job: tiny model, split-LoRA training, held-out exact-match")
    j.add_argument("--out", default="runs/demo")
    j.add_argument("--framework", default="torch", choices=("torch", "jax"))
    j.set_defaults(func=_demo)

    d = sub.add_parser("inspect", help="float64 reference MoE blocks on a tiny checkpoint + the cost plan; with "
                                       "--routing, the routing analytics of a checkpoint over a data file")
    d.add_argument("--out", help="output folder (default runs/inspect; with --routing: routing.json and routing.png "
                                 "there, nothing written without it)")
    d.add_argument("--config", default=str(DEFAULT_MODEL_YAML),
                   help="model YAML (default: the embedded tiny Qwen3-MoE)")
    d.add_argument("--seed", type=_non_negative_int, default=0, help="seed of the demo's hidden states")
    d.add_argument("--tokens", type=_positive_int, default=64)
    from splitmoe.inspect_routing import add_routing_arguments

    add_routing_arguments(d)
    d.set_defaults(func=_inspect)

    c = sub.add_parser("plan", help="merged vs split LoRA cost of one MoE layer (defaults: Qwen3-30B-A3B)")
    c.add_argument("--hidden", type=_positive_int, default=2048)
    c.add_argument("--intermediate", type=_positive_int, default=768)
    c.add_argument("--experts", type=_positive_int, default=128)
    c.add_argument("--top-k", type=_positive_int, default=8)
    c.add_argument("--tokens", type=_positive_ints, default=(1024, 4096, 16384, 65536),
                   help="comma-separated token counts")
    c.add_argument("--rank", type=_positive_int, default=64)
    g = c.add_argument_group("GPU plan", "per-GPU memory and estimated step time of full-size presets on H200s "
                                         "(or against --budget-gib)")
    g.add_argument("--gpus", help="N, or auto: the smallest power of two up to 64 that fits")
    g.add_argument("--preset", action="append", metavar="FAMILY:PRESET",
                   help="e.g. qwen3_moe:30b-a3b (repeatable; default: every full-size preset)")
    g.add_argument("--seq", type=_positive_int, help="tokens per GPU (one sequence each; default 16384)")
    g.add_argument("--parallel", help="data=D,fsdp=F,expert=X; one axis may be N or left out: it takes the "
                                      "GPUs the others leave (default data=1,fsdp=N,expert=1)")
    g.add_argument("--offload", action="store_true", help="checkpointed layer inputs in host memory")
    g.add_argument("--expert-chunk", type=_positive_int, metavar="TOKENS",
                   help="routed experts in chunks of TOKENS tokens, recomputed chunk by chunk (tile_experts)")
    g.add_argument("--optimizer", default="fused", choices=("fused", "foreach"),
                   help="AdamW implementation (foreach keeps a sqrt(v) temporary; torch_impl uses fused on CUDA)")
    g.add_argument("--optim-in-backward", action="store_true",
                   help="AdamW steps each LoRA tensor inside the backward and frees its gradient at once "
                        "(torch_impl.optim.AdamWInBackward: optim.in_backward=true in the torch trainer, step.py "
                        "--optim-in-backward): no step holds every LoRA gradient")
    g.add_argument("--checkpoint-layers", metavar="N|auto",
                   help="checkpoint only the first N decoder layers (train.checkpoint_layers, step.py "
                        "--checkpoint-layers); the others keep their activations and skip the recompute. auto: the "
                        "smallest N that fits --budget-gib on the layout that fits with every layer checkpointed")
    g.add_argument("--checkpoint-policy", default="nothing", choices=("nothing", "attention"),
                   help="what a checkpointed layer keeps besides its input: attention keeps its attention output "
                        "and log-sum-exp, and its recompute skips the attention kernel (train.checkpoint_policy)")
    g.add_argument("--compile", action="store_true",
                   help="torch.compile'd decoder layers (train --compile): an un-checkpointed MoE layer keeps no "
                        "bf16 copies of its expert LoRA factors, and the step time takes the compiled layers' "
                        "linear rate (shared_math/plan.py's R_LIN_COMPILED)")
    g.add_argument("--budget-gib", type=float, metavar="GIB",
                   help="usable memory per GPU, what fits means (default 139: an H200's 140.4 less the CUDA context "
                        "and allocator slack; an 80 GB H100 by the same margin about 78)")
    g.add_argument("--layers", type=int, metavar="N",
                   help="truncate each preset to its first N decoder layers (as benchmarks/step.py --layers)")
    c.set_defaults(func=_plan)

    b = sub.add_parser("bench", help="run a benchmark script of the source checkout by name (most need a GPU)",
                       description=f"splitmoe bench NAME [ARGS...]: NAME one of {', '.join(BENCHMARKS)}; "
                                   "ARGS go to the script (NAME --help lists them).")
    b.add_argument("name", choices=list(BENCHMARKS))
    b.add_argument("args", nargs=argparse.REMAINDER, help="arguments of the benchmark script")
    b.set_defaults(func=_bench)

    from splitmoe.train_cli import add_train_parsers

    add_train_parsers(sub)
    from splitmoe.sweep import add_sweep_parser

    add_sweep_parser(sub)
    return p


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The parsed command line. `key=value` overrides may come before, between and after the options
    (`train train.steps=2 --out X optim.lr=1e-3`): argparse takes the first run of them as the positional and
    leaves later ones over, which it would report as "unrecognized arguments" although they are valid."""
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:
        if isinstance(getattr(args, "overrides", None), list) and all(
                "=" in a and not a.startswith("-") for a in extra):
            args.overrides = [*args.overrides, *extra]  # command-line order kept: the last of one key still wins
        else:
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError) as e:
        print(f"splitmoe {args.command}: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # a path the command could not write or read (an --out that is a file, no permission)
        where = f": {e.filename}" if e.filename else ""
        print(f"splitmoe {args.command}: error: {e.strerror or e}{where} (check the paths given, e.g. --out must "
              "be a folder)", file=sys.stderr)
        return 2
