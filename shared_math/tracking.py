"""Experiment tracking through kept libraries, next to `metrics.jsonl`: TensorBoard event files and a trackio run,
fed the very rows that `training.MetricsLog` writes (metrics.jsonl stays the source of truth: resume, sweeps and the
plots read it; the trackers are views of it).

Chosen by the run config, `train.loggers: [tensorboard, trackio]` (a non-trajectory key: a run may be resumed with
other loggers), and `train.tracker_project` (trackio's project, default "splitmoe"). Both need the optional extra
`track` (`pip install "splitmoe[track]"`); `check_loggers` refuses a logger whose package is missing before anything
is built, naming that extra.

What a row becomes: every number in it, nested objects flattened with "/" (`exact_match/copy`,
`routing/0/imbalance`: layer 0's), logged at the row's `step`; strings and lists (per-expert loads) are left to
metrics.jsonl, whose plots show them. A resumed run drops the rows after the resumed step as metrics.jsonl does:
TensorBoard through a SessionLog START event at the next step (its readers then purge the older events from that step
on, as torch's `SummaryWriter(purge_step=...)` does); trackio continues the same run (`resume="allow"`), and the
steps repeated after the resume point appear twice there.

- tensorboard: `<out_dir>/tensorboard/events.out.tfevents.*`, written with the `tensorboard` package's own
  EventFileWriter and protos (what torch.utils.tensorboard writes through; no torch here, shared_math stays
  framework-free, and the package is the one that shows the files anyway: `tensorboard --logdir runs/`; tensorboardX
  would be a second package for the same files). Read back with tensorboard's EventAccumulator.
- trackio, the local-first tracker. Why trackio over MLflow and Aim (measured on this project's 2-core machine,
  2026-12-05, with the test extra already installed):
  install: trackio 0.43 adds 12 small wheels (gradio_client, httpx, uvicorn, ...); mlflow-skinny 3.18 adds 20
  (databricks-sdk, opentelemetry, fastapi, google-auth, ...) and still cannot store locally by default: since MLflow
  3.7 its default store is SQLite through SQLAlchemy + alembic, which skinny lacks, and the file store refuses to open
  without MLFLOW_ALLOW_FILE_STORE; full mlflow brings pandas, scikit-learn, flask and more. Aim needs aimrocks (a C++
  extension) and has had no release since 2025-05.
  offline: trackio writes one SQLite file per project under `TRACKIO_DIR` (default ~/.cache/huggingface/trackio) and
  contacts no server unless a Space is named; `trackio show --project splitmoe` serves the dashboard locally.
  CI time: `import trackio` 0.6 s; init, 5 rows and finish 30 ms.
  The run is named after the run folder (`<parent>/<name>`, e.g. `sweep/lora.rank=8`), grouped by the parent folder
  (a sweep's points share a group), with the flattened run config as its config. trackio's own console lines go to
  stderr, so stdout keeps only the run's results.
"""

from __future__ import annotations

import contextlib
import importlib.util
import math
import sys
import time
import weakref
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from shared_math.train_config import ConfigError, RunConfig, flatten, to_dict

EXTRA = "track"  # the pyproject extra that installs every logger's package
# logger name -> the module it imports (its pip package has the same name)
LOGGERS = {"tensorboard": "tensorboard", "trackio": "trackio"}
TENSORBOARD_DIR = "tensorboard"


def check_logger_names(names: Sequence[str]) -> None:
    """ConfigError for an unknown or repeated logger name (the config's own check, no import)."""
    for i, name in enumerate(names):
        if name not in LOGGERS:
            raise ConfigError(f"train.loggers: unknown logger {name!r}; known: {', '.join(LOGGERS)} (metrics.jsonl "
                              "is always written)")
        if name in names[:i]:
            raise ConfigError(f"train.loggers: {name!r} is listed twice")


def check_loggers(names: Sequence[str]) -> None:
    """Before any work: every logger in `names` is known and its package importable; otherwise a ConfigError that
    names the package and the pip extra that installs it."""
    check_logger_names(names)
    missing = [n for n in names if importlib.util.find_spec(LOGGERS[n]) is None]
    if missing:
        pkgs = ", ".join(LOGGERS[n] for n in missing)
        raise ConfigError(f"train.loggers {list(missing)} need the package(s) {pkgs}, not installed here; install the "
                          f"extra: pip install \"splitmoe[{EXTRA}]\" (in a checkout: pip install -e \".[{EXTRA}]\"), "
                          "or leave them out of train.loggers")


def scalars(row: dict[str, Any]) -> dict[str, float]:
    """The numbers of a metrics row keyed by their path ("/"-joined), without `step`; booleans, strings, lists and
    non-finite values are left out (TensorBoard and trackio plot finite scalars)."""
    out: dict[str, float] = {}

    def walk(prefix: str, value: Any) -> None:
        if isinstance(value, dict):
            for k, v in value.items():
                walk(f"{prefix}/{k}" if prefix else str(k), v)
        elif isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value):
            out[prefix] = float(value)

    walk("", {k: v for k, v in row.items() if k != "step"})
    return out


class TensorBoardLogger:
    """Scalars of every row as one TensorBoard event per row under `log_dir`."""

    name = "tensorboard"

    def __init__(self, log_dir: str | Path, *, purge_step: int | None = None) -> None:
        from tensorboard.compat.proto.event_pb2 import Event, SessionLog
        from tensorboard.compat.proto.summary_pb2 import Summary
        from tensorboard.summary.writer.event_file_writer import EventFileWriter

        self._Event, self._Summary = Event, Summary
        self.log_dir = Path(log_dir)
        self.log_dir.mkdir(parents=True, exist_ok=True)
        # flushed every 10 s (tensorboard's default 120 s would leave a live dashboard two minutes behind) and at close
        self._writer = EventFileWriter(str(self.log_dir), flush_secs=10)
        if purge_step is not None:
            # the rows from purge_step on are recomputed by the resumed run: readers drop the older ones
            self._writer.add_event(Event(step=purge_step, wall_time=time.time(),
                                         session_log=SessionLog(status=SessionLog.START)))

    def log(self, step: int, values: dict[str, float]) -> None:
        summary = self._Summary(value=[self._Summary.Value(tag=k, simple_value=v) for k, v in values.items()])
        self._writer.add_event(self._Event(step=step, wall_time=time.time(), summary=summary))

    def close(self) -> None:
        self._writer.close()


class TrackioLogger:
    """One trackio run (local SQLite under TRACKIO_DIR) per training run; rows logged at their step."""

    name = "trackio"

    def __init__(self, project: str, run_name: str, *, group: str | None, config: dict[str, Any],
                 resume: bool) -> None:
        import trackio

        with contextlib.redirect_stdout(sys.stderr):  # trackio prints its banner; stdout carries the run's results
            # no CPU/GPU sampling thread: memory and throughput are in the rows already
            self._run = trackio.init(project=project, name=run_name, group=group, config=config,
                                     resume="allow" if resume else "never", embed=False, auto_log_cpu=False,
                                     auto_log_gpu=False)

    def log(self, step: int, values: dict[str, float]) -> None:
        self._run.log(values, step=step)

    def close(self) -> None:
        import trackio

        with contextlib.redirect_stdout(sys.stderr):
            # trackio.finish() also clears trackio's current run (run.finish() alone leaves it set, and trackio's
            # exit hook would finish it again, printing on stdout); our run is the current one, trackio.init made it
            trackio.finish()


class Trackers:
    """The loggers of one run: `log(row)` sends a metrics row's scalars to each; `close()` flushes and closes them
    (also run at garbage collection or interpreter exit, so a run that raises still leaves complete files)."""

    def __init__(self, loggers: Iterable[Any] = ()) -> None:
        self.loggers = list(loggers)
        self._finalizer = weakref.finalize(self, _close_all, self.loggers)

    def log(self, row: dict[str, Any]) -> None:
        if not self.loggers or "step" not in row:
            return
        values = scalars(row)
        if values:
            for lg in self.loggers:
                lg.log(int(row["step"]), values)

    def close(self) -> None:
        self._finalizer()


def _close_all(loggers: list[Any]) -> None:
    for lg in loggers:
        lg.close()


def open_trackers(cfg: RunConfig, out_dir: str | Path, *, resume_step: int | None = None) -> Trackers:
    """The loggers `cfg.train.loggers` names for the run folder `out_dir` (`resume_step`: the step this run resumes
    from, None for a fresh run); checks them first (`check_loggers`)."""
    names = list(cfg.train.loggers)
    check_loggers(names)
    out = Path(out_dir)
    loggers: list[Any] = []
    try:
        for name in names:
            if name == "tensorboard":
                loggers.append(TensorBoardLogger(out / TENSORBOARD_DIR,
                                                 purge_step=None if resume_step is None else resume_step + 1))
            else:
                full = out.resolve()
                loggers.append(TrackioLogger(cfg.train.tracker_project, f"{full.parent.name}/{full.name}",
                                             group=full.parent.name, config=flatten(to_dict(cfg)),
                                             resume=resume_step is not None))
    except BaseException:
        _close_all(loggers)
        raise
    return Trackers(loggers)
