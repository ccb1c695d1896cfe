"""Block-config sweep of the Pallas (Triton lowering) split-LoRA kernels, one kernel pass at a time, on the GPU.

For each case (Qwen3-30B-A3B experts at T=1024 and T=16384, gpt-oss-20b experts at T=16384; r=64, bf16, LoRA
training: gradients of x, expert_weights and both LoRA pairs) every distinct kernel launch of the fused forward +
backward (moe_gate_up, moe_down, moe_dh, moe_dx and the TN grads moe_dA2, moe_dB2, moe_dA1, moe_dB1) is recorded
once with its real arguments, then timed in isolation (one small jitted function per (pass, config), compiled ahead
of time, a few in parallel threads) over a short candidate list per kernel kind: Hopper bf16 tiles, `z_pre` on and
off for the NN passes, pruned of shared-memory overflow (autotune.fits). Then the whole fused forward + backward is
timed with the per-pass winners against GPU_DEFAULTS (both pinned per launch, whatever the caches hold). Every NN
launch is also timed on the Mosaic-GPU GEMM (pallas_mosaic's NN pass) where that lowering runs (Hopper, bf16); when
it beats the best Triton config, the winner is recorded with impl="mosaic", which the `pallas` backend (`auto`)
follows per pass.

Writes under --out:
  sweep.jsonl          one row per (case, pass, config): ms, or the error that ruled the config out
  tuned_configs.json   the winners, in the format of jax_impl/kernels/tuned_configs.json (copy it there to ship it)
  fused.jsonl          fused forward+backward ms with the defaults and with the winners, per case

GPU:   PYTHONPATH=. XLA_PYTHON_CLIENT_PREALLOCATE=false python benchmarks/pallas_sweep.py --out $OUT/pallas_sweep
CPU:   PYTHONPATH=. python benchmarks/pallas_sweep.py --smoke --out /tmp/pallas_sweep   (interpret mode, tiny shapes)
--budget-s bounds the whole run: the sweep stops early enough to leave --final-s for the fused comparison, and
writes what it has. Pass inputs between launches are random arrays of the right shapes (the recording does not run
the kernels); routing is a realistic top-K.
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import json
import math
import os
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

CASES = ("qwen3_30b_T1024", "qwen3_30b_T16384", "gpt_oss_20b_T16384")

# Hopper bf16 tiles (block_m, block_n, block_d, num_warps, num_stages), most promising first: when the budget runs
# short the tail is skipped. GPU_DEFAULTS[kind] is always timed first (in-loop z, then z_pre).
_NN_TILES = {
    "gemm": [(128, 256, 64, 8, 3), (128, 128, 64, 4, 4), (64, 128, 64, 4, 4), (128, 64, 64, 4, 4),
             (64, 256, 64, 8, 3), (128, 128, 64, 8, 4)],
    "gemm_act_bwd": [(128, 256, 64, 8, 3), (128, 128, 64, 4, 4), (64, 128, 64, 4, 4), (128, 64, 64, 4, 4),
                     (64, 256, 64, 8, 3), (128, 128, 64, 8, 4)],
    "gemm_act": [(128, 128, 64, 8, 3), (64, 128, 64, 4, 4), (128, 64, 64, 4, 4), (64, 64, 64, 4, 4),
                 (64, 128, 64, 8, 3), (128, 64, 64, 8, 4)],
}
_TN_TILES = [(128, 128, 64, 8, 3), (64, 64, 64, 4, 3), (128, 64, 64, 4, 4), (64, 256, 64, 8, 3), (128, 256, 64, 8, 3),
             (64, 128, 64, 4, 4), (128, 64, 128, 8, 3)]
_PASSES = ("moe_gate_up", "moe_down", "moe_dh", "moe_dx", "moe_dA2", "moe_dB2", "moe_dA1", "moe_dB1")


def log(*a) -> None:
    print(*a, flush=True)


def candidate_configs(kind: str, *, smoke: bool, max_configs: int, rank: int):
    from jax_impl.kernels import autotune

    if smoke:
        base = autotune.INTERPRET_CONFIGS[kind]
        return [base, replace(base, z_pre=True)] if kind in autotune.NN_KINDS else [base, replace(base, block_m=32)]
    default = autotune.GPU_DEFAULTS[kind]
    if kind == "tn":
        cands = [default] + [autotune.BlockConfig(*t) for t in _TN_TILES]
    else:
        tiles = [autotune.BlockConfig(*t) for t in _NN_TILES[kind]]
        # the default both ways, then the other tiles with z_pre (fewer FLOPs at N >> block_n), then in-loop
        cands = ([default, replace(default, z_pre=True)] + [replace(c, z_pre=True) for c in tiles]
                 + [replace(c, z_pre=False) for c in tiles])
    out = []
    for c in cands:
        if c not in out and autotune.fits(kind, c, rank=rank):
            out.append(c)
    return out[:max_configs]


@dataclass
class Launch:
    """One kernel launch of the fused forward+backward, with the arguments split_lora gave it."""

    name: str
    fn: object
    kind: str
    key: tuple
    dtype: object
    args: tuple
    kwargs: dict


def make_inputs(case, dtype, seed: int = 0):
    """Device arrays for `case`: weights ~ N(0, 1/fan_in) in `dtype`, fp32 LoRA master weights, top-K routing."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from shared_math.cases import routing_for

    ids, w = routing_for(case, np.random.default_rng(seed))
    T, H, I, E, R = case.T, case.H, case.I, case.E, case.R
    keys = iter(jax.random.split(jax.random.PRNGKey(seed), 16))

    def normal(shape, fan_in, dt=dtype):
        return (jax.random.normal(next(keys), shape, jnp.float32) / math.sqrt(fan_in)).astype(dt)

    return dict(
        x=normal((T, H), 1.0), expert_ids=jnp.asarray(ids, jnp.int32), expert_weights=jnp.asarray(w, dtype),
        w_gate_up=normal((E, H, 2 * I), H), w_down=normal((E, I, H), I),
        lora_gate_up=(normal((E, H, R), H, jnp.float32), normal((E, R, 2 * I), R, jnp.float32)),
        lora_down=(normal((E, I, R), I, jnp.float32), normal((E, R, H), R, jnp.float32)),
        biases=(normal((E, 2 * I), 4.0), normal((E, H), 4.0)) if case.biases else None,
        dy=normal((T, H), 1.0))


def options(case, *, interpret: bool, passes=None):
    from jax_impl.kernels import split_lora as sl

    kw = {} if passes is None else {"passes": passes}
    return sl.Options(scale=0.5, activation=case.activation, limit=float(case.swiglu_limit), alpha=1.702,
                      interpret=interpret, **kw)


def record_launches(case, inp, *, interpret: bool, defaults: dict) -> list[Launch]:
    """Run split_lora's forward (saving residuals) and backward eagerly with recording passes: each launch is
    captured with its real arguments and answered with random arrays of its output shapes, so no kernel runs. The
    kind and shape key of each launch are those split_lora asks autotune.get_config for just before it."""
    import jax
    import jax.numpy as jnp

    from jax_impl.kernels import autotune
    from jax_impl.kernels import grouped_gemm as gg
    from jax_impl.kernels import split_lora as sl

    lookups, launches = [], []
    keys = iter(jax.random.split(jax.random.PRNGKey(1), 64))

    def fake_get_config(kind, shape_key, dtype, **kw):
        lookups.append((kind, tuple(shape_key), dtype))
        return defaults[kind]

    def recorder(fn):
        def call(*args, cfg, name, **kwargs):
            assert len(lookups) == 1, f"{name}: expected one config lookup before the launch, saw {lookups}"
            kind, key, dtype = lookups.pop()
            launches.append(Launch(name, fn, kind, key, dtype, args, dict(kwargs, name=name)))
            shapes = jax.eval_shape(lambda *a: fn(*a, cfg=cfg, name=name, **kwargs), *args)
            return jax.tree_util.tree_map(
                lambda s: (jax.random.normal(next(keys), s.shape, jnp.float32).astype(s.dtype)
                           if jnp.issubdtype(s.dtype, jnp.floating) else jnp.zeros(s.shape, s.dtype)), shapes)
        return call

    opts = options(case, interpret=interpret, passes=sl.Passes(nn=recorder(gg.grouped_gemm),
                                                              tn=recorder(gg.grouped_gemm_tn)))
    real = autotune.get_config
    autotune.get_config = fake_get_config
    try:
        srt = sl.sort_rows(inp["expert_ids"], inp["w_gate_up"].shape[0])
        _, (gu, z1, z2, w_sorted) = sl._forward(inp["x"], inp["expert_weights"], inp["w_gate_up"], inp["w_down"],
                                                inp["lora_gate_up"], inp["lora_down"], inp["biases"], srt, opts, True)
        wants = sl._Wants(x=True, expert_weights=True, w_gate_up=False, w_down=False, lora_gate_up=True,
                          lora_down=True, biases=False)
        res = (inp["x"], inp["w_gate_up"], inp["w_down"], inp["lora_gate_up"], inp["lora_down"], inp["biases"], srt,
               gu, z1, z2, w_sorted, wants)
        sl._bwd(opts, res, inp["dy"])
    finally:
        autotune.get_config = real
    names = [la.name for la in launches]
    assert sorted(names) == sorted(_PASSES), names
    return launches


def compile_launch(launch: Launch, cfg, compiler_options):
    """AOT-compiled `launch` with `cfg`; array arguments stay arguments (never baked-in constants)."""
    import jax

    leaves, treedef = jax.tree_util.tree_flatten((launch.args, launch.kwargs))
    is_arr = [isinstance(v, jax.Array) for v in leaves]
    arrays = [v for v, a in zip(leaves, is_arr) if a]

    def f(*arrs):
        it = iter(arrs)
        args, kwargs = jax.tree_util.tree_unflatten(treedef, [next(it) if a else v for v, a in zip(leaves, is_arr)])
        return launch.fn(*args, cfg=cfg, **kwargs)

    exe = jax.jit(f).lower(*arrays).compile(compiler_options)
    return lambda: exe(*arrays)


def time_ms(call, *, target_s: float, rounds: int = 3) -> float:
    """Best-of-`rounds` mean milliseconds of back-to-back async calls (dispatch overlaps the device work)."""
    import jax

    jax.block_until_ready(call())
    t0 = time.perf_counter()
    jax.block_until_ready(call())
    reps = max(2, min(200, int(target_s / max(time.perf_counter() - t0, 1e-6))))
    best = math.inf
    for _ in range(rounds):
        t0 = time.perf_counter()
        for _ in range(reps):
            out = call()
        jax.block_until_ready(out)
        best = min(best, (time.perf_counter() - t0) / reps)
    return best * 1e3


def sweep_launch(launch: Launch, cands, *, deadline: float, hard_deadline: float, threads: int, compiler_options,
                 target_s: float, case_name: str, rows: list) -> tuple[object, float]:
    """Compile the candidates (a few threads), time each in order until `deadline` (this pass's share; the first
    config that runs is timed anyway, unless the whole sweep's `hard_deadline` has passed) -> (best cfg, best ms)."""
    best, best_ms = None, math.inf
    pool = cf.ThreadPoolExecutor(max_workers=max(1, threads))
    futs = [pool.submit(compile_launch, launch, c, compiler_options) for c in cands]
    try:
        for c, fut in zip(cands, futs):
            row = dict(case=case_name, pass_=launch.name, kind=launch.kind, key=list(launch.key), config=asdict(c))
            now = time.perf_counter()
            if (now > deadline and best is not None) or now > hard_deadline:
                row["skipped"] = "budget"
                rows.append(row)
                continue
            try:
                call = fut.result()
                ms = time_ms(call, target_s=target_s)
            except Exception as e:  # noqa: BLE001 - a config the compiler or the device rejects is no candidate
                row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
                rows.append(row)
                log(f"    {_fmt(c, launch.kind)}  error {row['error'][:100]}")
                continue
            row["ms"] = ms
            rows.append(row)
            mark = ""
            if ms < best_ms:
                best, best_ms, mark = c, ms, " *"
            log(f"    {_fmt(c, launch.kind)}  {ms:9.4f} ms{mark}")
    finally:
        for f in futs:
            f.cancel()
        pool.shutdown(wait=True)
    return best, best_ms


# Mosaic tiles (block_m, block_n, pipeline stages) tried per NN launch, most promising first (benchmarks/mosaic_probe.py
# on the H200, Qwen3 gate_up at T=16384: 128x64 s6 1.92 ms, 64x128 s4 2.45, 128x128 s4 2.57, 128x256 s3 6.16)
MOSAIC_TILES = ((128, 64, 6), (64, 128, 4), (128, 128, 4), (64, 64, 6))


def time_mosaic(launch: Launch, cfg, best_ms: float, *, compiler_options, target_s: float, case_name: str,
                sweep_path: Path, deadline: float, smoke: bool = False) -> tuple[object, float]:
    """The same NN launch on the Mosaic-GPU GEMM (jax_impl/kernels/mosaic_gemm.py) with each of MOSAIC_TILES (the
    first only with --smoke; none past `deadline`): one row each in sweep.jsonl, and (the fastest Mosaic config, its
    ms) when it beats the best Triton config, else (cfg, best_ms). The `pallas` backend then runs this pass on
    Mosaic for this key."""
    from jax_impl.kernels import mosaic_gemm
    from jax_impl.kernels.autotune import BlockConfig

    won = (cfg, best_ms)
    for bm, bn, stages in MOSAIC_TILES[:1] if smoke else MOSAIC_TILES:
        if time.perf_counter() > deadline:
            log("    mosaic GEMM  skipped: budget")
            break
        mcfg = BlockConfig(bm, bn, mosaic_gemm.BLOCK_D, num_stages=stages, impl="mosaic")
        row = dict(case=case_name, kind=launch.kind, key=list(launch.key), config=asdict(mcfg))
        try:
            ms = time_ms(compile_launch(replace(launch, fn=mosaic_gemm.grouped_gemm), mcfg, compiler_options),
                         target_s=target_s)
        except Exception as e:  # noqa: BLE001 - a lowering the compiler or the device rejects is no candidate
            row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
            log(f"    mosaic bm{bm:<4}bn{bn:<4}s{stages}  error {row['error'][:100]}")
            ms = math.inf
        else:
            row["ms"] = ms
            log(f"    mosaic bm{bm:<4}bn{bn:<4}s{stages}  {ms:9.4f} ms{' *' if ms < won[1] else ''}")
        row["pass"] = launch.name
        with sweep_path.open("a") as f:
            f.write(json.dumps(row) + "\n")
        if ms < won[1]:
            won = (mcfg, ms)
    return won


def _fmt(c, kind: str = "gemm") -> str:
    if getattr(c, "impl", "triton") == "mosaic":
        return f"mosaic bm{c.block_m:<4}bn{c.block_n:<4}s{c.num_stages}"
    z = "" if kind == "tn" else (" z_pre" if c.z_pre else " in-loop z")
    return f"bm{c.block_m:<4}bn{c.block_n:<4}bd{c.block_d:<4}w{c.num_warps} s{c.num_stages}{z}"


def pinned_passes(table: dict):
    """Passes whose launches use table[name] (every launch of the case), whatever the caches hold; an NN config with
    impl="mosaic" runs on the Mosaic GEMM, as under the `pallas` backend."""
    from jax_impl.backends.pallas import per_pass_nn
    from jax_impl.kernels import grouped_gemm as gg
    from jax_impl.kernels import split_lora as sl

    def nn(*a, cfg, name, **kw):
        return per_pass_nn(*a, cfg=table[name], name=name, **kw)

    def tn(*a, cfg, name, **kw):
        return gg.grouped_gemm_tn(*a, cfg=table[name], name=name, **kw)

    return sl.Passes(nn=nn, tn=tn)


def fused_step(case, inp, table: dict, *, interpret: bool, compiler_options):
    """Compiled value-and-grad of <y, dy> w.r.t. x, expert_weights and both LoRA pairs, configs pinned by `table`."""
    import jax
    import jax.numpy as jnp

    from jax_impl.kernels import split_lora as sl

    opts = options(case, interpret=interpret, passes=pinned_passes(table))
    wrt = ("x", "expert_weights", "lora_gate_up", "lora_down")

    def loss(diff, frozen, expert_ids, dy):
        a = {**frozen, **diff}
        y = sl.split_lora_experts(a["x"], expert_ids, a["expert_weights"], a["w_gate_up"], a["w_down"],
                                  a["lora_gate_up"], a["lora_down"], a["biases"], opts)
        return jnp.sum(y.astype(jnp.float32) * dy.astype(jnp.float32))

    diff = {k: inp[k] for k in wrt}
    frozen = {k: inp[k] for k in ("w_gate_up", "w_down", "biases")}
    exe = jax.jit(jax.value_and_grad(loss)).lower(diff, frozen, inp["expert_ids"], inp["dy"]).compile(
        compiler_options)
    return lambda: exe(diff, frozen, inp["expert_ids"], inp["dy"])


def _rel_diff(a, b) -> float:
    import jax
    import numpy as np

    worst = 0.0
    for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)):
        x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
        worst = max(worst, float(np.abs(x - y).max(initial=0.0) / max(np.abs(y).max(initial=0.0), 1e-30)))
    return worst


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, required=True, help="output folder")
    p.add_argument("--smoke", action="store_true", help="CPU: tiny shapes, interpret mode, 2 configs per kind")
    p.add_argument("--cases", default=",".join(CASES), help="comma-separated shared_math.cases names")
    p.add_argument("--budget-s", type=float, default=230.0, help="wall-clock bound for the whole run")
    p.add_argument("--final-s", type=float, default=75.0, help="part of the budget kept for the fused comparison")
    p.add_argument("--max-configs", type=int, default=12, help="candidates per pass at most")
    p.add_argument("--compile-threads", type=int, default=4, help="parallel AOT compiles (1: serial)")
    p.add_argument("--target-ms", type=float, default=30.0, help="timed work per round per config")
    args = p.parse_args(argv)
    t_start = time.perf_counter()

    import jax
    import jax.numpy as jnp

    from jax_impl.kernels import autotune
    from shared_math.cases import MoECase, get_case

    interpret = args.smoke
    from jax_impl.backends import pallas_mosaic, pallas_triton

    if args.smoke:
        os.environ[pallas_triton.INTERPRET_ENV] = "1"  # the Mosaic passes too run in the interpreter
        cases = [MoECase("smoke_swiglu", 24, 40, 24, 4, 2, 4, (), "tiny Qwen-like"),
                 MoECase("smoke_oai", 19, 32, 16, 3, 2, 4, (), "tiny gpt-oss-like", activation="swiglu_oai",
                         biases=True, swiglu_limit=1.0)]
        dtype, defaults = jnp.float32, dict(autotune.INTERPRET_CONFIGS)
        compiler_options = {"xla_backend_optimization_level": 0}
        target_s = 0.0
    else:
        if jax.default_backend() != "gpu":
            log(f"needs a GPU (jax backend is {jax.default_backend()!r}); use --smoke on CPU")
            return 2
        cases = [get_case(n) for n in args.cases.split(",") if n]
        dtype, defaults, compiler_options = jnp.bfloat16, dict(autotune.GPU_DEFAULTS), None
        target_s = args.target_ms / 1e3
    mosaic_ok = pallas_mosaic.unavailable_reason(dtype) is None
    dev = autotune.device_kind()
    log(f"pallas_sweep: jax {jax.__version__}, {jax.devices()[0].device_kind}, {len(cases)} cases, "
        f"budget {args.budget_s:.0f}s (final {args.final_s:.0f}s), KERNEL_VERSION {autotune.KERNEL_VERSION}")

    args.out.mkdir(parents=True, exist_ok=True)
    sweep_path, tuned_path, fused_path = (args.out / n for n in ("sweep.jsonl", "tuned_configs.json", "fused.jsonl"))
    sweep_path.write_text("")
    sweep_deadline = t_start + args.budget_s - args.final_s
    tuned: dict = {}
    winners: dict[str, dict] = {}
    state: dict[str, tuple] = {}

    for ci, case in enumerate(cases):
        t0 = time.perf_counter()
        inp = make_inputs(case, dtype)
        launches = record_launches(case, inp, interpret=interpret, defaults=defaults)
        state[case.name] = (inp, launches)
        log(f"[{time.perf_counter() - t_start:6.1f}s] {case.name}: T={case.T} H={case.H} I={case.I} E={case.E} "
            f"K={case.K} R={case.R} {case.activation}{' +biases' if case.biases else ''}: "
            f"{len(launches)} launches recorded in {time.perf_counter() - t0:.1f}s")
        win = winners.setdefault(case.name, {})
        for li, la in enumerate(launches):
            now = time.perf_counter()
            left_launches = (len(cases) - ci) * len(launches) - li
            deadline = now + max(0.0, sweep_deadline - now) / left_launches
            cands = candidate_configs(la.kind, smoke=args.smoke, max_configs=args.max_configs, rank=case.R)
            log(f"  [{now - t_start:6.1f}s] {la.name} ({la.kind} {la.key}): {len(cands)} configs, "
                f"{max(0.0, deadline - now):.1f}s")
            rows: list = []
            best, best_ms = sweep_launch(la, cands, deadline=deadline, hard_deadline=sweep_deadline,
                                         threads=args.compile_threads,
                                         compiler_options=compiler_options, target_s=target_s, case_name=case.name,
                                         rows=rows)
            with sweep_path.open("a") as f:
                for r in rows:
                    r["pass"] = r.pop("pass_")
                    f.write(json.dumps(r) + "\n")
            default_ms = next((r["ms"] for r in rows if "ms" in r and r["config"] == asdict(defaults[la.kind])),
                              None)
            if la.kind in autotune.NN_KINDS and mosaic_ok:
                best, best_ms = time_mosaic(la, best or defaults[la.kind], best_ms, compiler_options=compiler_options,
                                            target_s=target_s, case_name=case.name, sweep_path=sweep_path,
                                            deadline=sweep_deadline, smoke=args.smoke)
            if best is None:
                log(f"    no config ran for {la.name}; keeping the default")
                best = defaults[la.kind]
            else:
                tuned[autotune.cache_key(la.kind, la.key, la.dtype, dev)] = asdict(best)
                autotune.write_table(tuned_path, tuned)  # what we have so far survives a kill
            win[la.name] = dict(config=best, ms=best_ms, default_ms=default_ms, kind=la.kind)

    log(f"[{time.perf_counter() - t_start:6.1f}s] per-pass winners written to {tuned_path}")
    autotune.write_table(tuned_path, tuned)
    fused_path.write_text("")
    # the fused steps (defaults and winners per case) compile in parallel: this phase is compile-bound
    pool = cf.ThreadPoolExecutor(max_workers=max(1, args.compile_threads))
    steps = {}
    for case in cases:
        inp, launches = state[case.name]
        for label, table in (("defaults", {la.name: defaults[la.kind] for la in launches}),
                             ("tuned", {name: w["config"] for name, w in winners[case.name].items()})):
            steps[case.name, label] = pool.submit(fused_step, case, inp, table, interpret=interpret,
                                                  compiler_options=compiler_options)
    for case in cases:
        inp, launches = state[case.name]
        win = winners[case.name]
        sum_best = sum(w["ms"] for w in win.values() if math.isfinite(w["ms"]))
        sum_def = sum(w["default_ms"] or 0.0 for w in win.values())
        log(f"{case.name}: per-pass sums: defaults {sum_def:.3f} ms, winners {sum_best:.3f} ms")
        for name, w in win.items():
            dm = f"{w['default_ms']:.4f}" if w["default_ms"] is not None else "n/a"
            log(f"  {name:12s} default {dm:>9} ms  best {w['ms']:9.4f} ms  {_fmt(w['config'], w['kind'])}")
        row = dict(case=case.name, T=case.T, H=case.H, I=case.I, E=case.E, K=case.K, R=case.R,
                   device=jax.devices()[0].device_kind, jax=jax.__version__)
        outs = {}
        for label in ("defaults", "tuned"):
            t0 = time.perf_counter()
            try:
                step = steps[case.name, label].result()
                outs[label] = jax.block_until_ready(step())
                row[f"{label}_ms"] = time_ms(step, target_s=max(target_s, 0.0) * 3)
            except Exception as e:  # noqa: BLE001
                row[f"{label}_error"] = f"{type(e).__name__}: {str(e)[:300]}"
            log(f"  fused fwd+bwd, {label:8s}: {row.get(f'{label}_ms', float('nan')):9.3f} ms "
                f"(waited {time.perf_counter() - t0:.1f}s){' ' + row.get(label + '_error', '')}")
        if len(outs) == 2:
            row["max_rel_diff"] = _rel_diff(outs["tuned"], outs["defaults"])
            row["speedup"] = row["defaults_ms"] / row["tuned_ms"]
            log(f"  {case.name}: defaults {row['defaults_ms']:.3f} ms -> tuned {row['tuned_ms']:.3f} ms "
                f"(x{row['speedup']:.2f}); max rel diff of y/grads {row['max_rel_diff']:.2e}")
        row["winners"] = {n: asdict(w["config"]) for n, w in win.items()}
        with fused_path.open("a") as f:
            f.write(json.dumps(row) + "\n")
    pool.shutdown(wait=True)
    log(f"[{time.perf_counter() - t_start:6.1f}s] done: {sweep_path}, {tuned_path}, {fused_path}")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    sys.exit(main())
