"""The embedded synthetic task set: small string tasks generated deterministically, with a held-out split and an
exact-match metric, that a tiny MoE with split LoRA learns visibly within minutes on a CPU.

Each example is a chat record `{"messages": [{"role": "user", "content": "<task><arg>"}, {"role": "assistant",
"content": <answer>}]}` (shared_math.data renders and masks it: loss on the answer only). Tasks:

  copy   `c` + a string of `alphabet` letters  -> the same string      ("cabd"  -> "abd")
  rev    `r` + a string                         -> the string reversed  ("rabd"  -> "dba")
  add    `a` + `x+y` with 0 <= x, y < add_max    -> the decimal sum      ("a3+4"  -> "7")

The split is by content, not by draw: an example is held out iff crc32 of its user prompt falls in the held-out
fraction, so no held-out prompt ever appears in training, whatever the sizes and seed. `exact_match` compares the
greedy completion (up to EOS) with the answer, per task and overall.
"""

from __future__ import annotations

import functools
import itertools
import zlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

TASKS = ("copy", "rev", "add")
_TAG = {"copy": "c", "rev": "r", "add": "a"}


@dataclass(frozen=True)
class TaskSpec:
    """What to generate. `tasks` is a subset of TASKS; strings have `min_len..max_len` letters of `alphabet`."""

    # copy + rev by default: the tiny model learns both within minutes; add is learnt far more slowly (about 15%
    # held-out exact-match after 1000 steps at rank 32, against >95% for copy and rev)
    tasks: tuple[str, ...] = ("copy", "rev")
    alphabet: str = "abcdef"
    min_len: int = 2
    max_len: int = 5
    add_max: int = 30
    num_train: int = 4000
    num_eval: int = 100  # per task
    heldout_fraction: float = 0.2
    seed: int = 0

    def __post_init__(self) -> None:
        bad = [t for t in self.tasks if t not in TASKS]
        if bad or not self.tasks:
            raise ValueError(f"unknown synthetic task(s) {bad or '(none)'}; tasks are {', '.join(TASKS)}")
        if not 1 <= self.min_len <= self.max_len:
            raise ValueError(f"need 1 <= min_len <= max_len, got {self.min_len}, {self.max_len}")
        if not 0 < self.heldout_fraction < 1:
            raise ValueError(f"heldout_fraction must be in (0, 1), got {self.heldout_fraction}")
        if not self.alphabet:
            raise ValueError("alphabet is empty: give the letters the copy / rev strings are drawn from, e.g. abcdef")
        if self.add_max < 1:
            raise ValueError(f"add_max must be >= 1 (the add task draws 0 <= x, y < add_max), got {self.add_max}")
        if self.seed < 0:  # numpy's own error ("expected non-negative integer") named no key, after the model was built
            raise ValueError(f"seed must be an integer >= 0, got {self.seed}")
        if self.num_train < 1 or self.num_eval < 0:
            raise ValueError(f"need num_train >= 1 and num_eval >= 0, got {self.num_train}, {self.num_eval}")
        for task in self.tasks:
            # a held-out set larger than the task's space of prompts would be drawn for, in vain, hundreds of millions
            # of times (minutes) before generate() gave up: refused here, with the number that fits
            have = _heldout_prompts(task, "".join(sorted(set(self.alphabet))), self.min_len, self.max_len,
                                    self.add_max, self.heldout_fraction)
            if have is not None and self.num_eval > have:
                raise ValueError(f"num_eval={self.num_eval} held-out examples per task, but task {task} has only "
                                 f"{have} distinct held-out prompts with this alphabet / lengths / add_max: lower "
                                 f"num_eval to at most {have} or widen the space")


def _is_heldout(prompt: str, fraction: float) -> bool:
    return (zlib.crc32(prompt.encode()) % 10_000) < fraction * 10_000


_ENUMERABLE = 200_000  # prompt spaces up to this size are counted exactly (tens of ms); larger ones are not


@functools.lru_cache(maxsize=64)
def _heldout_prompts(task: str, letters: str, min_len: int, max_len: int, add_max: int, fraction: float) -> int | None:
    """How many distinct prompts of `task` are held out, or None when the space is too large to count."""
    if task == "add":
        if add_max * add_max > _ENUMERABLE:
            return None
        prompts: Iterator[str] = (f"{_TAG[task]}{x}+{y}" for x in range(add_max) for y in range(add_max))
    else:
        if sum(len(letters) ** n for n in range(min_len, max_len + 1)) > _ENUMERABLE:
            return None
        prompts = (_TAG[task] + "".join(t) for n in range(min_len, max_len + 1)
                   for t in itertools.product(letters, repeat=n))
    return sum(_is_heldout(p, fraction) for p in prompts)


def _draw(task: str, spec: TaskSpec, rng: np.random.Generator) -> tuple[str, str]:
    """One (prompt, answer) of `task`."""
    if task == "add":
        x, y = (int(v) for v in rng.integers(0, spec.add_max, 2))
        return f"{_TAG[task]}{x}+{y}", str(x + y)
    n = int(rng.integers(spec.min_len, spec.max_len + 1))
    s = "".join(spec.alphabet[int(i)] for i in rng.integers(0, len(spec.alphabet), n))
    return _TAG[task] + s, (s if task == "copy" else s[::-1])


def _record(prompt: str, answer: str, task: str) -> dict[str, Any]:
    return {"messages": [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}],
            "task": task}


def generate(spec: TaskSpec = TaskSpec()) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(train records, held-out records): `num_train` training examples drawn over the tasks in turn (repeats
    allowed, as in any sampled dataset), and up to `num_eval` distinct held-out examples per task."""
    rng = np.random.default_rng(spec.seed)
    train: list[dict[str, Any]] = []
    heldout: dict[str, dict[str, str]] = {t: {} for t in spec.tasks}
    attempts = 0
    while len(train) < spec.num_train or any(len(h) < spec.num_eval for h in heldout.values()):
        attempts += 1
        if attempts > 200 * (spec.num_train + spec.num_eval * len(spec.tasks)):
            raise ValueError(f"cannot draw {spec.num_eval} distinct held-out examples per task from this space; "
                             "lower num_eval or widen alphabet / lengths / add_max")
        task = spec.tasks[attempts % len(spec.tasks)]
        prompt, answer = _draw(task, spec, rng)
        if _is_heldout(prompt, spec.heldout_fraction):
            if len(heldout[task]) < spec.num_eval:
                heldout[task][prompt] = answer
        elif len(train) < spec.num_train:
            train.append(_record(prompt, answer, task))
    evals = [_record(p, a, t) for t in spec.tasks for p, a in heldout[t].items()]
    return train, evals


def exact_match(records: Sequence[dict[str, Any]], complete: Callable[[list[dict[str, Any]]], list[str]]
                ) -> dict[str, float]:
    """Fraction of records whose completion equals the assistant answer: `{"all": ..., "<task>": ...}`.

    `complete(records)` returns one greedy completion string per record (the prompt is the record minus its last
    message)."""
    preds = complete(list(records))
    hits: dict[str, list[bool]] = {}
    for rec, pred in zip(records, preds):
        ok = pred == rec["messages"][-1]["content"]
        hits.setdefault("all", []).append(ok)
        hits.setdefault(rec.get("task", "data"), []).append(ok)
    return {k: float(np.mean(v)) for k, v in hits.items()}


def greedy_complete(logits_fn: Callable[[np.ndarray, np.ndarray], np.ndarray], prompts: Sequence[list[int]], *,
                    eos_id: int | None, max_new_tokens: int, pad_id: int = 0, batch_size: int = 64
                    ) -> list[list[int]]:
    """Greedy decoding without a cache: each step runs the model on the whole right-padded buffer and reads the
    logits at each row's last token (causal attention: padding after a row's tokens cannot change them). Every
    call has the same shape [batch_size, max prompt + max_new_tokens] (short chunks are padded with empty rows), so
    a jitted model compiles once.

    `logits_fn(input_ids [B, W], position_ids [B, W]) -> logits [B, W, V]` (numpy) is the only framework hook.
    Returns the new tokens of each prompt, without the EOS.
    """
    outs: list[list[int]] = []
    if not prompts:
        return outs
    W = max(len(p) for p in prompts) + max_new_tokens
    B = min(batch_size, len(prompts))
    for start in range(0, len(prompts), B):
        chunk = prompts[start:start + B]
        ids = np.full((B, W), pad_id, np.int32)
        for r, p in enumerate(chunk):
            ids[r, :len(p)] = p
        lens = np.array([len(p) for p in chunk] + [1] * (B - len(chunk)))
        pos = np.broadcast_to(np.arange(W, dtype=np.int32), ids.shape).copy()
        done = np.arange(B) >= len(chunk)  # padding rows are done from the start
        new: list[list[int]] = [[] for _ in range(B)]
        for _ in range(max_new_tokens):
            logits = logits_fn(ids, pos)
            nxt = np.asarray(logits)[np.arange(B), lens - 1].argmax(-1)
            for r in np.flatnonzero(~done):
                if eos_id is not None and nxt[r] == eos_id:
                    done[r] = True
                else:
                    new[r].append(int(nxt[r]))
                    ids[r, lens[r]] = nxt[r]
                    lens[r] += 1
            if done.all():
                break
        outs.extend(new[:len(chunk)])
    return outs
