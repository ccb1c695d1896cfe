"""`splitmoe sweep`: an ablation grid of ordinary training runs, one after another on one device.

    splitmoe sweep --config RUN.yaml --out DIR --grid lora.rank=8,16,64
                   --grid model.moe_backend=native,grouped_mm [key=value ...] [--framework torch|jax]

The points are the cartesian product of the `--grid` axes (the first axis varies slowest); the extra `key=value`
overrides apply to every point. Each point is a run folder `DIR/<name>`, its name made of the point's grid overrides
(`lora.rank=8__model.moe_backend=native`; characters unsafe in a file name become `_`, and a short hash then keeps
names apart), trained by the framework's `train()` exactly as `splitmoe train` does.

Before any point runs, every point's RunConfig is built and checked (unknown key, bad value, a backend that cannot
run here, a value given twice on one axis, a folder left by a different config), so a typo costs seconds, not hours.

Resumable: a point that finished has `DIR/<name>/sweep_point.json` with status "done" and is skipped on a re-run; a
point whose folder holds checkpoints resumes from the newest; a failed point is retried. A failing point is recorded
(status "failed" and the error) and the sweep goes on. After each point `DIR/sweep.md`, `DIR/sweep.jsonl` and
`DIR/sweep.png` are rewritten from the records of all points (pending ones included while the sweep runs).
On a terminal a bar counts the points, with each point's training bar under it (shared_math.progress); the one-line
record of each point is printed in any case.
"""

from __future__ import annotations

import argparse
import hashlib
import itertools
import json
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from shared_math.progress import progress_bar, write_line
from shared_math.tracking import check_loggers
from shared_math.train_config import ConfigError, RunConfig, diff_configs, load_run_config, trajectory_dict
from shared_math.training import check_optim_range, checkpoints, latest_checkpoint, read_meta, read_metrics

MARKER = "sweep_point.json"  # written into a point's run folder once it finished (or failed)
_SAFE = re.compile(r"[^A-Za-z0-9._=+,-]")
_MAX_NAME = 120  # file names may have 255 bytes; leave room for the hash and for tools that add suffixes


@dataclass(frozen=True)
class SweepPoint:
    """One grid point: its 1-based index, its grid overrides (axis order), its folder name and its config."""

    index: int
    overrides: tuple[str, ...]
    name: str
    cfg: RunConfig

    @property
    def label(self) -> str:
        return " ".join(self.overrides)


# ---- planning: parse and validate the whole grid before anything runs ----------------------------------------------

def split_values(raw: str) -> list[str]:
    """`8,16,64` -> ['8', '16', '64']; commas inside [...] or {...} belong to the value (`[q_proj,v_proj],[o_proj]`)."""
    parts, cur, depth = [], [], 0
    for ch in raw:
        depth += (ch in "[{") - (ch in "]}")
        if ch == "," and depth == 0:
            parts.append("".join(cur).strip())
            cur = []
        else:
            cur.append(ch)
    parts.append("".join(cur).strip())
    return parts


def parse_grid(specs: list[str]) -> list[tuple[str, list[str]]]:
    """`--grid key=v1,v2,...` strings -> [(key, [v1, v2, ...])]; ConfigError naming the axis for a malformed one."""
    import yaml

    if not specs:
        raise ConfigError("a sweep needs at least one --grid key=v1,v2,... axis")
    axes: list[tuple[str, list[str]]] = []
    for spec in specs:
        key, sep, raw = spec.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ConfigError(f"--grid {spec!r} is not key=v1,v2,... (e.g. --grid lora.rank=8,16,64)")
        if any(key == k for k, _ in axes):
            raise ConfigError(f"--grid {key} is given twice; put all its values on one axis")
        values = split_values(raw)
        if any(not v for v in values):
            raise ConfigError(f"--grid {spec!r} has an empty value")
        parsed = [yaml.safe_load(v) for v in values]
        for i, j in itertools.combinations(range(len(values)), 2):
            if parsed[i] == parsed[j]:  # compared as parsed values: 8 and 8.0 are the same run
                raise ConfigError(f"--grid {key}: the value {values[j]!r} is given twice (as {values[i]!r} and "
                                  f"{values[j]!r}); each point must be a different run")
        axes.append((key, values))
    return axes


def point_name(overrides: tuple[str, ...]) -> str:
    """The run folder name of a point: its overrides joined by `__`, made safe for any file system."""
    raw = "__".join(overrides)
    safe = _SAFE.sub("_", raw)
    if safe != raw or len(safe) > _MAX_NAME:
        # replaced characters or a cut could make two points' names equal: a hash of the exact overrides keeps
        # them apart, deterministically, so a re-run finds the same folders
        safe = f"{safe[:_MAX_NAME]}-{hashlib.sha1(raw.encode()).hexdigest()[:8]}"
    return safe


def _check_backend(cfg: RunConfig, device: str | None) -> None:
    """The framework's own backend resolution (unknown name: ValueError; cannot run here: BackendUnavailable)."""
    if cfg.framework == "torch":
        import torch

        from torch_impl.backends import resolve_backend

        resolve_backend(cfg.model.moe_backend, device=device or "cpu", dtype=getattr(torch, cfg.model.dtype))
    else:
        import jax.numpy as jnp

        from jax_impl.backends import resolve_backend

        resolve_backend(cfg.model.moe_backend, dtype=jnp.dtype(cfg.model.dtype))


def _check_folder(point: SweepPoint, folder: Path) -> None:
    """Refuse a point folder left by a different config: skipping it (done) or resuming it would mix two runs."""
    current = trajectory_dict(point.cfg)
    marker = read_marker(folder)
    saved, what = None, ""
    if marker is not None and marker.get("status") == "done":
        saved, what = marker.get("trajectory", {}), f"{folder / MARKER} (a finished point)"
    elif (ckpt := latest_checkpoint(folder)) is not None:
        saved, what = read_meta(ckpt).get("trajectory", {}), f"{ckpt}"
    if saved is not None and (diffs := diff_configs(saved, current)):
        raise ConfigError(f"point {point.index} ({point.label}): {what} was written by a different config ("
                          + "; ".join(diffs) + "). Use another --out, or remove that folder to rerun the point.")


def plan_sweep(config: str | Path | None, out: str | Path, grid: list[str], overrides: list[str] | None = None, *,
               framework: str | None = None, device: str | None = None) -> list[SweepPoint]:
    """Every point of the grid with its validated RunConfig; raises ConfigError (naming the axis, the point and the
    key) before anything is trained if any point is invalid."""
    out = Path(out)
    axes = parse_grid(grid)
    extra = list(overrides or [])
    if framework:
        extra.append(f"framework={framework}")
    fixed = {o.partition("=")[0].strip(): o for o in extra}
    for key, _ in axes:
        if key in fixed:
            given = "--framework" if key == "framework" and framework else f"the override {fixed[key]!r}"
            raise ConfigError(f"--grid {key} is also set by {given}; set it in one place")
    if "train.out_dir" in fixed or any(k == "train.out_dir" for k, _ in axes):
        raise ConfigError("train.out_dir is set by the sweep (DIR/<point>); use --out DIR instead")
    points: list[SweepPoint] = []
    for i, values in enumerate(itertools.product(*(vals for _, vals in axes)), start=1):
        over = tuple(f"{key}={v}" for (key, _), v in zip(axes, values, strict=True))
        name = point_name(over)
        try:
            cfg = load_run_config(config, [*extra, *over, f"train.out_dir={out / name}"])
            check_optim_range(cfg)
            check_loggers(cfg.train.loggers)  # a tracker's missing package fails the plan, not point 1
            if device and cfg.framework != "torch":
                raise ConfigError("--device is a torch option (jax trains on its default device)")
            _check_backend(cfg, device)
        except ValueError as e:  # ConfigError, and the backends' ValueError for an unknown name
            raise ConfigError(f"point {i} ({' '.join(over)}): {e}") from None
        points.append(SweepPoint(i, over, name, cfg))
    for p in points:
        _check_folder(p, out / p.name)
    return points


# ---- running -------------------------------------------------------------------------------------------------------

def read_marker(folder: Path) -> dict[str, Any] | None:
    """The point record in `folder`, or None if there is none (or it is unreadable: the point then runs again)."""
    try:
        return json.loads((Path(folder) / MARKER).read_text())
    except (OSError, ValueError):
        return None


def _write_json_atomic(path: Path, data: Any) -> None:
    # the marker decides whether a point is skipped, so a kill while writing must not leave half a file
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(data, indent=1))
    os.replace(tmp, path)


def _reset_peak_memory(cfg: RunConfig, device: str | None) -> str:
    """Start a fresh peak for this point; returns what the peak measures."""
    if cfg.framework == "torch" and device and device.startswith("cuda"):
        import torch

        torch.cuda.reset_peak_memory_stats(device)
        return "cuda"
    try:
        # "5" resets the process's peak RSS (VmHWM, and getrusage's ru_maxrss with it): without this every point
        # after the first would report the largest point before it
        Path("/proc/self/clear_refs").write_text("5")
        return "host"
    except OSError:
        return "host (process peak)"


def _peak_memory_mb(source: str, device: str | None) -> float:
    if source == "cuda":
        import torch

        return torch.cuda.max_memory_allocated(device) / 2**20
    from shared_math.training import peak_memory_mb

    return peak_memory_mb()


def _trainable_parameters(trainer: Any) -> int:
    """Number of trained scalars: torch's trainer keeps a list of parameters, jax's an nnx.State of LoRAParams."""
    import numpy as np

    if trainer.framework == "torch":
        return int(sum(p.numel() for p in trainer.params))
    import jax

    return int(sum(np.prod(x.shape) for x in jax.tree_util.tree_leaves(trainer.params)))


def _metrics_rows(folder: Path) -> list[dict[str, Any]]:
    path = folder / "metrics.jsonl"
    if not path.is_file():
        return []
    return read_metrics(path)


def _run_point(point: SweepPoint, folder: Path, *, resume: bool, device: str | None, progress: bool
               ) -> dict[str, Any]:
    """Train one point through the framework's `train()` (the `splitmoe train` path) -> its record."""
    from splitmoe.train_cli import _trainer_module

    cfg = point.cfg
    record: dict[str, Any] = {"index": point.index, "name": point.name, "overrides": list(point.overrides),
                              "framework": cfg.framework, "trajectory": trajectory_dict(cfg)}
    t0 = time.perf_counter()
    step_seconds: list[float] = []
    try:
        mod = _trainer_module(cfg.framework)
        memory = _reset_peak_memory(cfg, device)
        trainer = mod.Trainer(cfg, device=device) if device else mod.Trainer(cfg)
        record["trainable_params"] = _trainable_parameters(trainer)
        step = trainer.train_step

        def timed_step() -> tuple[float, float]:
            # timed here rather than read from metrics.jsonl: its tokens/s also covers evals and checkpoint saves
            s = time.perf_counter()
            r = step()
            step_seconds.append(time.perf_counter() - s)
            return r

        trainer.train_step = timed_step
        result = mod.train(cfg, resume=resume, progress=progress, trainer=trainer)
        if result.adapter_dir is None:
            raise RuntimeError(f"training stopped at step {result.final_step} of {cfg.train.steps}")
        record.update(status="done", error=None, peak_memory_mb=_peak_memory_mb(memory, device),
                      memory_source=memory, final_step=result.final_step)
    except Exception as e:  # a failing point is recorded and the sweep goes on (KeyboardInterrupt stops it)
        record.update(status="failed", error=f"{type(e).__name__}: {e}")
    record["seconds"] = time.perf_counter() - t0
    record["resumed"] = resume
    # the first step carries one-off costs (jax compilation, allocator warm-up): left out of the mean when possible
    timed = step_seconds[1:] or step_seconds
    record["mean_step_s"] = sum(timed) / len(timed) if timed else None
    record["timed_steps"] = len(timed)
    evals = [r for r in _metrics_rows(folder) if "eval_loss" in r or "exact_match" in r]
    if record["status"] == "done" and evals:
        record["final_eval_loss"] = evals[-1].get("eval_loss")
        record["exact_match"] = (evals[-1].get("exact_match") or {}).get("all")
    return record


def _log(text: str) -> None:
    write_line(text)  # above the sweep's bar when one is drawing


def run_sweep(points: list[SweepPoint], out: str | Path, *, device: str | None = None, progress: bool = True,
              header: str = "") -> list[dict[str, Any]]:
    """Train every point not yet done, one after another; returns the table rows (one per point, in grid order).
    The report files are rewritten after each point, and once more if the sweep is interrupted."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    n = len(points)
    # points done / all, under which each point's training bar runs (a terminal only: shared_math.progress)
    bar = progress_bar(total=n, desc="sweep", unit="point", enabled=progress)
    try:
        for p in points:
            folder = out / p.name
            marker = read_marker(folder)
            if marker is not None and marker.get("status") == "done":
                _log(f"point {p.index}/{n}: {p.label}: done already ({folder}), skipped")
                bar.update(1)
                continue
            ckpt = next(iter(checkpoints(folder)), None)  # a damaged one too: the resume reports it as it skips it
            how = f"resuming from {ckpt.name}" if ckpt is not None else "training"
            _log(f"point {p.index}/{n}: {p.label} ({how}, {p.cfg.framework}) -> {folder}")
            record = _run_point(p, folder, resume=ckpt is not None, device=device, progress=progress)
            folder.mkdir(parents=True, exist_ok=True)  # a point that failed before prepare_run has no folder yet
            _write_json_atomic(folder / MARKER, record)
            if record["status"] == "done":
                _log(f"point {p.index}/{n}: done in {record['seconds']:.1f}s: {_fmt_result(record)}")
            else:
                _log(f"point {p.index}/{n}: FAILED after {record['seconds']:.1f}s: {record['error']}")
            write_report(points, out, header=header)
            bar.update(1)
    finally:
        bar.close()
        rows = write_report(points, out, header=header)
    return rows


def _fmt_result(r: dict[str, Any]) -> str:
    parts = []
    if r.get("final_eval_loss") is not None:
        parts.append(f"held-out loss {r['final_eval_loss']:.4f}")
    if r.get("exact_match") is not None:
        parts.append(f"exact-match {r['exact_match']:.3f}")
    if r.get("mean_step_s") is not None:
        parts.append(f"{r['mean_step_s'] * 1e3:.0f} ms/step")
    return ", ".join(parts) or "(no eval data)"


# ---- the report ----------------------------------------------------------------------------------------------------

def report_rows(points: list[SweepPoint], out: str | Path) -> list[dict[str, Any]]:
    """One row per point from its record (status "pending" where there is none yet)."""
    import yaml

    rows = []
    for p in points:
        rec = read_marker(Path(out) / p.name) or {}
        rows.append({
            "point": p.name,
            "overrides": {o.partition("=")[0]: yaml.safe_load(o.partition("=")[2]) for o in p.overrides},
            "status": rec.get("status", "pending"),
            "final_eval_loss": rec.get("final_eval_loss"),
            "exact_match": rec.get("exact_match"),
            "mean_step_ms": None if rec.get("mean_step_s") is None else rec["mean_step_s"] * 1e3,
            "peak_memory_mb": rec.get("peak_memory_mb"),
            "memory_source": rec.get("memory_source"),
            "trainable_params": rec.get("trainable_params"),
            "seconds": rec.get("seconds"),
            "error": rec.get("error"),
            "run_dir": str(Path(out) / p.name),
        })
    return rows


def _cell(v: Any, fmt: str = "") -> str:
    if v is None:
        return "–"
    s = format(v, fmt) if fmt else str(v)
    return s.replace("|", "\\|").replace("\n", " ")


def write_report(points: list[SweepPoint], out: str | Path, *, header: str = "") -> list[dict[str, Any]]:
    """Write DIR/sweep.jsonl, DIR/sweep.md and DIR/sweep.png from every point's record; returns the rows."""
    out = Path(out)
    rows = report_rows(points, out)
    with (out / "sweep.jsonl").open("w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    keys = [o.partition("=")[0] for o in points[0].overrides] if points else []
    head = ["#", *keys, "status", "held-out loss", "exact-match", "ms/step", "peak MiB", "trainable params"]
    lines = [f"# Sweep: {len(rows)} points", ""]
    if header:
        lines += [header, ""]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for p, r in zip(points, rows, strict=True):
        cells = [str(p.index), *(_cell(r["overrides"][k]) for k in keys), r["status"],
                 _cell(r["final_eval_loss"], ".4f"), _cell(r["exact_match"], ".3f"), _cell(r["mean_step_ms"], ".1f"),
                 _cell(r["peak_memory_mb"], ".0f"), _cell(r["trainable_params"], ",")]
        lines.append("| " + " | ".join(cells) + " |")
    failed = [(p, r) for p, r in zip(points, rows, strict=True) if r["status"] == "failed"]
    if failed:
        lines += ["", "Failed points:", ""]
        lines += [f"- {p.index} ({p.label}): {_cell(r['error'])}" for p, r in failed]
    sources = {r["memory_source"] for r in rows if r["memory_source"]}
    lines += ["", "ms/step: mean optimizer-step time, first step excluded (compilation, warm-up); peak MiB: "
              + (", ".join(sorted(sources)) or "host") + " peak memory during the point."]
    (out / "sweep.md").write_text("\n".join(lines) + "\n")
    plot_sweep(points, rows, out / "sweep.png")
    return rows


def plot_sweep(points: list[SweepPoint], rows: list[dict[str, Any]], png: Path) -> Path:
    """Final held-out loss and exact-match per point as bars, and every finished point's training loss curve."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [", ".join(o.partition("=")[2] for o in p.overrides) for p in points]
    x = list(range(len(points)))
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.5))
    for ax, key, title in ((axes[0], "final_eval_loss", "final held-out loss"),
                           (axes[1], "exact_match", "final held-out exact-match")):
        vals = [r[key] if r["status"] == "done" and r[key] is not None else 0.0 for r in rows]
        bars = ax.bar(x, vals, color=["tab:blue" if r["status"] == "done" else "lightgrey" for r in rows])
        ax.bar_label(bars, [f"{v:.3g}" if r["status"] == "done" else "" for v, r in zip(vals, rows, strict=True)],
                     fontsize=7)
        for b, r in zip(bars, rows, strict=True):
            if r["status"] != "done":  # say why there is no bar rather than draw a misleading zero
                ax.text(b.get_x() + b.get_width() / 2, 0, r["status"], ha="center", va="bottom", rotation=90)
        ax.set_xticks(x, labels, rotation=30, ha="right", fontsize=8)
        ax.set_title(title)
    if points:
        axes[0].set_xlabel(" / ".join(o.partition("=")[0] for o in points[0].overrides), fontsize=8)
    axes[1].set_ylim(0, 1)
    ax = axes[2]
    for r, label in zip(rows, labels, strict=True):
        if r["status"] != "done":
            continue
        train = [m for m in _metrics_rows(Path(r["run_dir"])) if "loss" in m]
        ax.plot([m["step"] for m in train], [m["loss"] for m in train], lw=1, label=label)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("training loss")
    ax.set_yscale("log")
    ax.set_title("training loss")
    if ax.lines:
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)
    return png


# ---- command line --------------------------------------------------------------------------------------------------

def _sweep(args: argparse.Namespace) -> int:
    points = plan_sweep(args.config, args.out, args.grid, args.overrides, framework=args.framework,
                        device=args.device)
    header = (f"config {args.config}; overrides: {' '.join(args.overrides) or '(none)'}; framework "
              f"{args.framework or 'from the config'}")
    _log(f"splitmoe sweep: {len(points)} points in {args.out}")
    try:
        rows = run_sweep(points, args.out, device=args.device, progress=not args.quiet, header=header)
    except KeyboardInterrupt:
        _log(f"splitmoe sweep: interrupted; run the same command again to resume (table: {args.out}/sweep.md)")
        return 130
    failed = [r for r in rows if r["status"] != "done"]
    print(f"splitmoe sweep: {len(rows) - len(failed)}/{len(rows)} points done; table {Path(args.out) / 'sweep.md'}, "
          f"plot {Path(args.out) / 'sweep.png'}")
    for r in failed:
        print(f"  failed: {r['point']}: {r['error']}")
    return 1 if failed else 0


def add_sweep_parser(sub: argparse._SubParsersAction) -> None:
    """Register `sweep` on the `splitmoe` sub-parser set."""
    from splitmoe.train_cli import DEFAULT_RUN_YAML

    s = sub.add_parser("sweep", help="train a grid of run configs one after another; table + plot (resumable)",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    s.add_argument("--config", default=str(DEFAULT_RUN_YAML),
                   help="configs/runs/*.yaml every point starts from (default: the embedded synthetic task)")
    s.add_argument("--out", required=True, help="sweep folder: one run folder per point, sweep.md/.jsonl/.png")
    s.add_argument("--grid", action="append", default=[], metavar="KEY=V1,V2,...",
                   help="one axis of the grid (repeat for more axes; the points are their cartesian product)")
    s.add_argument("--framework", choices=("torch", "jax"), help="default: the config's `framework`")
    s.add_argument("--device", help="torch: where to train (cpu, cuda, cuda:1; default cpu)")
    s.add_argument("--quiet", action="store_true", help="no per-step progress bar (the per-point lines remain)")
    s.add_argument("overrides", nargs="*", help="key=value overrides applied to every point, e.g. train.steps=100")
    s.set_defaults(func=_sweep)
