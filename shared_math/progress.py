"""Progress bars for training, sweeps, checkpoint loading and benchmarks, drawn by tqdm, quiet off a terminal.

Why tqdm rather than rich: it is one pure-Python wheel with no dependencies (rich brings markdown-it-py and pygments),
it already comes with transformers / peft / huggingface_hub, and its bars, nested positions and `tqdm.write` (a line
printed above the bars instead of through them) are all this project needs.

When a bar draws: only when the stream it writes to (stderr; stdout carries a command's results and never a bar) is a
terminal, so CI logs and files that stderr is redirected to get no carriage-return redraws; `SPLITMOE_PROGRESS=1`
forces the bars on (e.g. in Jupyter, whose output streams are not terminals), `SPLITMOE_PROGRESS=0` forces them off.
Lines meant to be kept (eval results, sweep points) are printed by `write_line` whatever the terminal, above any bar
that is drawing.

- `bars_enabled(stream, enabled)`: the rule above.
- `progress_bar(...)`: a tqdm bar on stderr following that rule.
- `TrainingBar`: the training loop's bar (step / steps, loss, lr, tokens/s, memory), used by `training.run_training`.
- `with_load_progress(tensors, desc)`: a checkpoint's lazy tensor mapping that advances a bar per tensor read, used
  by `torch_impl.load` and `jax_impl.load` (a 30B checkpoint takes minutes to load).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterable, Iterator, Mapping
from typing import IO, Any

from tqdm import tqdm

ENV = "SPLITMOE_PROGRESS"  # "1": bars on wherever they write; "0": off; unset: on only on a terminal


def _isatty(stream: IO[str] | None) -> bool:
    try:
        return bool(stream is not None and stream.isatty())
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        return False


def bars_enabled(stream: IO[str] | None = None, enabled: bool | None = True) -> bool:
    """Whether a bar on `stream` (default stderr) draws: never when `enabled` is False; otherwise as `SPLITMOE_PROGRESS`
    says (1 / 0), and without it only when `stream` is a terminal."""
    if enabled is False:
        return False
    forced = os.environ.get(ENV, "").strip().lower()
    if forced in ("1", "true", "yes", "on"):
        return True
    if forced in ("0", "false", "no", "off"):
        return False
    if forced:
        raise ValueError(f"{ENV}={os.environ[ENV]!r}: use 1 (bars on), 0 (off) or leave it unset (on a terminal only)")
    return _isatty(sys.stderr if stream is None else stream)


def progress_bar(iterable: Iterable[Any] | None = None, *, total: int | None = None, desc: str = "",
                 unit: str = "it", enabled: bool | None = True, leave: bool | None = True, initial: int = 0,
                 delay: float = 0.0, stream: IO[str] | None = None) -> tqdm:
    """A tqdm bar on `stream` (default stderr) that draws only where `bars_enabled` says; disabled, it is a no-op
    that still iterates `iterable`. `leave=None`: kept on screen only when it is not nested in another bar.
    `delay`: seconds before it first draws (a bar of something that ends sooner never shows)."""
    file = sys.stderr if stream is None else stream
    return tqdm(iterable, total=total, desc=desc, unit=unit, leave=leave, initial=initial, file=file, delay=delay,
                disable=not bars_enabled(file, enabled), dynamic_ncols=True)


def write_line(text: str, *, file: IO[str] | None = None) -> None:
    """Print `text` (default: on stderr) above any bar that is drawing, whatever the terminal."""
    tqdm.write(text, file=sys.stderr if file is None else file)
    (sys.stderr if file is None else file).flush()


class TrainingBar:
    """The training loop's bar: optimizer step out of `total`, with the last logged loss, learning rate, tokens/s and
    memory. `enabled=False` (`--quiet`, `progress=False`) silences it and its messages; off a terminal the bar is
    quiet but messages (eval results) are still printed."""

    def __init__(self, total: int, *, enabled: bool = True, label: str = "", initial: int = 0) -> None:
        self.enabled = enabled
        # leave=None: a run's own bar stays on screen at the end, one nested in a sweep's bar is cleared
        self.bar = progress_bar(total=total, desc=label.strip() or None, unit="step", enabled=enabled,
                                leave=None, initial=initial)

    def update(self, step: int) -> None:
        """Move to optimizer step `step` (tqdm redraws at most every 0.1 s, so calling this every step is cheap)."""
        if step != self.bar.n:
            self.bar.update(step - self.bar.n)

    def set_stats(self, loss: float, lr: float, tokens_per_s: float, mem_mb: float) -> None:
        self.bar.set_postfix_str(f"loss {loss:.4f} lr {lr:.2e} {tokens_per_s / 1e3:.1f}k tok/s mem {mem_mb:.0f} MiB",
                                 refresh=False)

    def message(self, text: str) -> None:
        if self.enabled:
            write_line(text)

    def close(self) -> None:
        self.bar.close()


class _LoadProgress(Mapping[str, Any]):
    """A checkpoint's lazy `name -> array` mapping (shared_math.checkpoint.CheckpointTensors) that advances a bar by
    one for every tensor read; `layer(l)` reads through it too, tensor by tensor. Everything else (shapes, config,
    hf_keys, ...) is the wrapped object's."""

    def __init__(self, tensors: Mapping[str, Any], bar: tqdm, desc: str = "") -> None:
        self._tensors = tensors
        self.bar, self.desc = bar, desc
        self.read = 0  # tensors read so far (a quiet tqdm bar does not count)

    def __getitem__(self, name: str) -> Any:
        value = self._tensors[name]
        self.read += 1
        self.bar.update(1)
        if self.read == len(self._tensors):
            self.bar.close()  # every tensor read: the bar ends with the load, not when this object is freed
        return value

    def __iter__(self) -> Iterator[str]:
        return iter(self._tensors)

    def __len__(self) -> int:
        return len(self._tensors)

    def layer(self, l: int) -> dict[str, Any]:
        """Layer `l`'s tensors keyed by their name within the layer, as CheckpointTensors.layer, one bar step each."""
        n_layers = getattr(getattr(self._tensors, "config", None), "num_hidden_layers", None)
        if n_layers is not None and not 0 <= l < n_layers:
            raise IndexError(f"layer {l} out of range for {n_layers} layers")
        prefix = f"layers.{l}."
        return {n[len(prefix):]: self[n] for n in self._tensors if n.startswith(prefix)}

    def __getattr__(self, name: str) -> Any:
        return getattr(self._tensors, name)


def with_load_progress(tensors: Mapping[str, Any], desc: str, *, enabled: bool | None = True,
                       delay: float = 1.0) -> _LoadProgress:
    """`tensors` with a per-tensor loading bar (tensors read / all tensors) named `desc`, drawn once the load has
    taken `delay` seconds (a tiny checkpoint loads in milliseconds and shows none; a 30B one takes minutes)."""
    bar = progress_bar(total=len(tensors), desc=desc, unit="tensor", enabled=enabled, delay=delay)
    return _LoadProgress(tensors, bar, desc)
