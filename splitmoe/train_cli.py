"""`splitmoe train` and `splitmoe compare`, and `run_default_job` (the embedded default job behind `splitmoe demo`).

train    one run of a configs/runs/*.yaml (defaults: the embedded synthetic task on the tiny Qwen3-MoE) in torch or
         jax, with `key=value` overrides; `--resume` continues the run folder's newest checkpoint. torch on several
         devices: `torchrun --standalone --nproc-per-node N -m splitmoe train ... parallel.expert=2`
         (torch_impl.parallel).
compare  trains torch and jax side by side from the same checkpoint, initial adapter and batches for N steps (torch
         on `--device`, default cpu; jax on its default device) and prints a step-by-step table (loss, grad-norm,
         relative differences); writes compare.png and compare.jsonl; exits 1 when a loss differs by more than the
         shared_math.numerics tolerance.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any

from shared_math.train_config import ConfigError, RunConfig, load_run_config, with_overrides

DEFAULT_RUN_YAML = Path(__file__).resolve().parent.parent / "configs" / "runs" / "default.yaml"


def _trainer_module(framework: str):
    if framework == "torch":
        from torch_impl import train as mod
    elif framework == "jax":
        from jax_impl import train as mod
    else:
        raise ValueError(f"--framework must be torch or jax, got {framework!r}")
    return mod


def _summary(result: Any) -> str:
    lines = []
    if result.evals:
        first, last = result.evals[0], result.evals[-1]
        if "exact_match" in first and "exact_match" in last:
            for k in last["exact_match"]:
                lines.append(f"  held-out exact-match {k:>5}: step {first['step']} {first['exact_match'][k]:.3f}"
                             f" -> step {last['step']} {last['exact_match'][k]:.3f}")
        if "eval_loss" in first and "eval_loss" in last:
            lines.append(f"  held-out loss: {first['eval_loss']:.4f} -> {last['eval_loss']:.4f}")
    if result.adapter_dir:
        lines.append(f"  PEFT adapter: {result.adapter_dir}")
    if result.plot:
        lines.append(f"  loss curve:   {result.plot}")
    lines.append(f"  metrics:      {result.out_dir / 'metrics.jsonl'}; {result.seconds:.1f}s")
    return "\n".join(lines)


def _cli_overrides(overrides: list[str], out: str | None, framework: str | None) -> list[str]:
    """The user's `key=value` overrides plus --out (train.out_dir) and --framework. A flag and an override that set
    one key to two values (`--out a train.out_dir=b`) are a ConfigError: the flag would win in silence. Among the
    overrides themselves the last one wins, as in the train suite's `*TINY, "train.steps=6"`."""
    # `is not None`: an empty --out (an unset shell variable) reaches the config's check, not the default folder
    flags = [(key, str(value), flag) for key, value, flag in
             (("train.out_dir", out, "--out"), ("framework", framework, "--framework")) if value is not None]
    given = {k.strip(): (v.strip(), f"{k.strip()}={v.strip()}")
             for k, _, v in (o.partition("=") for o in overrides)}
    for key, value, flag in flags:
        if key in given and given[key][0] != value:
            raise ConfigError(f"{key} is given twice, as {given[key][1]} and as {flag} {value}: give it once")
    return list(overrides) + [f"{key}={value}" for key, value, _ in flags]


def _newest_checkpoint_hint(out_dir: str | Path) -> str:
    from shared_math.training import latest_checkpoint

    last = latest_checkpoint(Path(out_dir))
    if last is None:
        return f"no checkpoint was saved in {out_dir} yet: run the command again (without --resume) to start over"
    return f"the newest checkpoint is {last}: run the same command with --resume to continue from it"


def _train(args: argparse.Namespace) -> int:
    overrides = _cli_overrides(list(args.overrides), args.out, args.framework)
    cfg = load_run_config(args.config, overrides)
    from shared_math.training import CHECKPOINT_DIR, TrainingDiverged, checkpoints

    if args.resume and not checkpoints(Path(cfg.train.out_dir)):  # before a model is built into a new folder
        raise ConfigError(f"nothing to resume: no checkpoint under {Path(cfg.train.out_dir) / CHECKPOINT_DIR}; run "
                          "without --resume to start this run")
    mod = _trainer_module(cfg.framework)

    trainer = None
    if args.device or args.cuda_graph or args.compile:
        if cfg.framework != "torch":
            print("splitmoe train: error: --device, --cuda-graph and --compile are torch options (jax trains on its "
                  "default device, and its jitted step is one compiled executable already)", file=sys.stderr)
            return 2
        try:
            trainer = mod.Trainer(cfg, device=args.device or "cpu", cuda_graph=args.cuda_graph,
                                  compile=args.compile)
        except ValueError as e:
            print(f"splitmoe train: error: {e}", file=sys.stderr)
            return 2
    try:
        result = mod.train(cfg, resume=args.resume, progress=not args.quiet, trainer=trainer)
    except TrainingDiverged as e:
        print(f"splitmoe train: error: {e}", file=sys.stderr)
        return 3
    except KeyboardInterrupt:  # Ctrl-C: one line on where the run stands, not a traceback
        print(f"\nsplitmoe train: interrupted; {_newest_checkpoint_hint(cfg.train.out_dir)}", file=sys.stderr)
        return 130
    if os.environ.get("RANK", "0") == "0":  # under torchrun (parallel runs) rank 0 alone reports
        print(f"splitmoe train ({cfg.framework}): steps {result.start_step} -> {result.final_step} in "
              f"{cfg.train.out_dir}\n{_summary(result)}")
    return 0


def run_default_job(out_dir: str | Path = "runs/demo", *, framework: str = "torch", progress: bool = True,
                    overrides: list[str] | None = None) -> dict[str, Any]:
    """The embedded default end to end: build the tiny Qwen3-MoE checkpoint, train split LoRA on the synthetic
    copy/reverse tasks (configs/runs/default.yaml), evaluate held-out exact-match before and after, save the PEFT
    adapter, metrics and loss curve under `out_dir`. Replaces an earlier demo's outputs in `out_dir` (either
    framework's); a folder holding another run's checkpoints is refused (ConfigError), not emptied.
    Returns {"before": exact-match, "after": exact-match, "seconds", "adapter", "plot"}."""
    if not str(out_dir).strip():  # Path("") is the working directory: the demo would train and clean up there
        raise ConfigError("the demo's run folder is empty: pass --out DIR (default runs/demo)")
    out = Path(out_dir)
    cfg = load_run_config(DEFAULT_RUN_YAML, [f"train.out_dir={out}", f"framework={framework}", *(overrides or [])])
    _refuse_another_runs_folder(out, cfg)
    for name in ("checkpoints", "adapter"):
        shutil.rmtree(out / name, ignore_errors=True)
    t0 = time.perf_counter()
    result = _trainer_module(framework).train(cfg, progress=progress)
    summary = {"before": result.evals[0].get("exact_match"), "after": result.evals[-1].get("exact_match"),
               "held_out_loss": [result.evals[0].get("eval_loss"), result.evals[-1].get("eval_loss")],
               "seconds": time.perf_counter() - t0, "steps": result.final_step, "framework": framework,
               "adapter": str(result.adapter_dir), "plot": str(result.plot)}
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    print(f"embedded default job ({framework}, {cfg.train.steps} steps):\n{_summary(result)}")
    return summary


def _refuse_another_runs_folder(out: Path, cfg: RunConfig) -> None:
    """The demo replaces its own earlier outputs in `out` (either framework's: both default to runs/demo), known by
    the summary.json a finished demo writes (whatever version of the config wrote it) or, for an interrupted one,
    by its checkpoints' config; a folder whose checkpoints another config wrote is refused, not emptied."""
    from shared_math.train_config import diff_configs, trajectory_dict
    from shared_math.training import CheckpointDamaged, latest_checkpoint, read_meta

    last = latest_checkpoint(out)
    if _is_demo_summary(out / "summary.json"):
        return
    if last is None:
        # a run with train.save_every=0 leaves its adapter and no checkpoint: without a demo's summary.json it is
        # another run's trained adapter, which the demo would delete below
        if (out / "adapter").exists():
            raise ConfigError(f"{out} holds another run's adapter ({out / 'adapter'}) and no demo summary.json; the "
                              "demo replaces only its own earlier outputs, so it leaves it: pass --out NEW_DIR")
        return
    try:
        saved = read_meta(last).get("trajectory", {})
        diffs = [d for d in diff_configs(saved, trajectory_dict(cfg)) if not d.startswith("framework:")]
    except CheckpointDamaged:
        diffs = ["its meta.json is unreadable"]
    if diffs:
        raise ConfigError(f"{out} holds checkpoints of another run ({last.name}: " + "; ".join(diffs[:3])
                          + "); the demo replaces only its own earlier outputs, so it leaves them: pass --out NEW_DIR")


def _is_demo_summary(path: Path) -> bool:
    """Whether `path` is the summary.json a finished demo wrote (run_default_job's keys)."""
    try:
        summary = json.loads(path.read_text())
    except (OSError, ValueError):
        return False
    return isinstance(summary, dict) and {"before", "after", "framework", "steps"} <= summary.keys()


# ---- compare -------------------------------------------------------------------------------------------------------

def compare(cfg: RunConfig, steps: int, *, out_dir: str | Path | None = None, device: str = "cpu"
            ) -> dict[str, Any]:
    """Train torch and jax in lockstep for `steps` optimizer steps from one prepared run (same checkpoint, initial
    adapter, batches, learning rates); returns per-step losses, grad norms, relative differences and each
    framework's seconds for the step (`seconds_torch`, `seconds_jax`: the first includes compilation), and each
    framework's seconds to build its trainer, checkpoint load included (`load_seconds`).

    `device`: where torch trains (cpu, cuda, cuda:1); jax trains on its default device (its GPU where jax has one)."""
    from shared_math.numerics import tolerance
    from shared_math.progress import progress_bar
    from shared_math.training import prepare_run

    cfg = with_overrides(cfg, f"train.steps={steps}")
    run = prepare_run(cfg, out_dir if out_dir is not None else Path(cfg.train.out_dir) / "compare")
    from jax_impl.train import Trainer as JaxTrainer
    from torch_impl.train import Trainer as TorchTrainer

    builders = {"torch": lambda: TorchTrainer(cfg, run=run, device=device), "jax": lambda: JaxTrainer(cfg, run=run)}
    trainers, load_s = {}, {}
    for k, build in builders.items():
        t0 = time.perf_counter()
        trainers[k] = build()
        load_s[k] = time.perf_counter() - t0
    rows = []
    for _ in progress_bar(range(steps), desc="compare torch vs jax", unit="step"):
        out, secs = {}, {}
        for k in ("torch", "jax"):  # train_step returns host floats: the framework's work is done when timed
            t0 = time.perf_counter()
            out[k] = trainers[k].train_step()
            secs[k] = time.perf_counter() - t0
        (lt, gt), (lj, gj) = out["torch"], out["jax"]
        rows.append({"step": len(rows) + 1, "loss_torch": lt, "loss_jax": lj, "loss_rel": abs(lt - lj) / abs(lt),
                     "grad_norm_torch": gt, "grad_norm_jax": gj, "grad_norm_rel": abs(gt - gj) / max(abs(gt), 1e-30),
                     "seconds_torch": secs["torch"], "seconds_jax": secs["jax"]})
    tol = tolerance(cfg.model.dtype, "train_loss")
    return {"rows": rows, "rtol": tol.rtol, "why": tol.why, "out_dir": run.out_dir,
            "max_loss_rel": max(r["loss_rel"] for r in rows),
            "max_grad_norm_rel": max(r["grad_norm_rel"] for r in rows), "load_seconds": load_s}


def report_compare(res: dict[str, Any], dtype: str) -> bool:
    """Print `compare`'s step-by-step table and verdict line, write compare.jsonl and compare.png into its
    out_dir; True when every step's loss is within the `dtype` train_loss tolerance."""
    from shared_math.training import plot_compare

    rows, tol = res["rows"], res["rtol"]
    print(f"{'step':>4}  {'loss torch':>12}  {'loss jax':>12}  {'rel diff':>9}  {'grad-norm torch':>15}  "
          f"{'grad-norm jax':>13}  {'rel diff':>9}")
    for r in rows:
        flag = "" if r["loss_rel"] <= tol else "  <- over tolerance"
        print(f"{r['step']:>4}  {r['loss_torch']:>12.7f}  {r['loss_jax']:>12.7f}  {r['loss_rel']:>9.2e}  "
              f"{r['grad_norm_torch']:>15.7f}  {r['grad_norm_jax']:>13.7f}  {r['grad_norm_rel']:>9.2e}{flag}")
    out = Path(res["out_dir"])
    with (out / "compare.jsonl").open("w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    steps = [r["step"] for r in rows]
    png = plot_compare(steps, {"loss": ([r["loss_torch"] for r in rows], [r["loss_jax"] for r in rows])},
                       {"loss": [r["loss_rel"] for r in rows], "grad-norm": [r["grad_norm_rel"] for r in rows]},
                       out / "compare.png", tol)
    ok = res["max_loss_rel"] <= tol
    print(f"max relative loss difference {res['max_loss_rel']:.2e}, grad-norm {res['max_grad_norm_rel']:.2e}; "
          f"tolerance {tol:g} ({dtype}: {res['why']}) -> {'OK' if ok else 'FAIL'}; plot {png}")
    return ok


def _compare(args: argparse.Namespace) -> int:
    from shared_math.training import TrainingDiverged

    cfg = load_run_config(args.config, list(args.overrides))
    try:
        # --out is the folder of compare.jsonl / compare.png itself (its help's promise), not a train.out_dir that
        # compare() would put a compare/ folder under
        res = compare(cfg, args.steps, out_dir=args.out, device=args.device)
    except TrainingDiverged as e:  # the same exit as `train`'s: 3 for a run that diverged, 2 for bad input
        print(f"splitmoe compare: error: {e}", file=sys.stderr)
        return 3
    return 0 if report_compare(res, cfg.model.dtype) else 1


def add_train_parsers(sub: argparse._SubParsersAction) -> None:
    """Register `train` and `compare` on the `splitmoe` sub-parser set."""
    t = sub.add_parser("train", help="fine-tune with split LoRA (torch or jax) from a run config")
    t.add_argument("--config", default=str(DEFAULT_RUN_YAML),
                   help="configs/runs/*.yaml (default: the embedded synthetic task on the tiny Qwen3-MoE)")
    t.add_argument("--framework", choices=("torch", "jax"), help="default: the config's `framework`")
    t.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in train.out_dir")
    t.add_argument("--out", help="run folder (same as train.out_dir=...)")
    t.add_argument("--quiet", action="store_true", help="no progress bar")
    t.add_argument("--device", help="torch: where to train (cpu, cuda, cuda:1; default cpu); jax uses its default")
    t.add_argument("--cuda-graph", action="store_true",
                   help="torch on CUDA: capture each micro-step's forward + backward once and replay it "
                        "(torch_impl.cuda_graph; a Triton MoE backend and batches of one shape); with --compile the "
                        "compiled layers are captured, the fastest short-context step")
    t.add_argument("--compile", action="store_true",
                   help="torch: torch.compile each decoder layer (torch_impl.compile; regional, compiled once for "
                        "all layers; batches of varying shape allowed)")
    t.add_argument("overrides", nargs="*", help="key=value overrides, e.g. optim.lr=1e-3 train.steps=100")
    t.set_defaults(func=_train)

    c = sub.add_parser("compare", help="train torch and jax side by side; step-by-step loss / grad-norm table")
    c.add_argument("--config", default=str(DEFAULT_RUN_YAML.parent / "compare_tiny.yaml"))
    c.add_argument("--steps", type=int, default=20)
    c.add_argument("--out", help="folder for compare.jsonl / compare.png (default: <train.out_dir>/compare)")
    c.add_argument("--device", default="cpu", help="torch: where to train (cpu, cuda, cuda:1; default cpu); jax "
                                                   "trains on its default device")
    c.add_argument("overrides", nargs="*", help="key=value overrides, e.g. model.dtype=bfloat16")
    c.set_defaults(func=_compare)


def main(argv: list[str] | None = None) -> int:
    """`python -m splitmoe.train_cli train|compare ...`: the same as through `splitmoe` (splitmoe.cli.main, which
    prints the project's errors as one line and exits 2)."""
    from splitmoe.cli import main as cli_main

    return cli_main(argv)


if __name__ == "__main__":
    sys.exit(main())
