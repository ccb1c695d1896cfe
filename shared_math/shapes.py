"""Argument-shape validation of the expert path, shared by the float64 oracle and both implementations.

`check_expert_args` takes numpy, torch or jax arrays (it only reads `.shape`), so `split_lora_experts` raises the
same clear error, with the same words, whichever implementation a researcher calls.
Shape letters: T tokens, H hidden, I expert intermediate, E experts, K experts per token, R LoRA rank.
"""

from __future__ import annotations

import math
from typing import Any


def _shape(t: Any) -> tuple[int, ...]:
    return tuple(int(d) for d in t.shape)


def check_expert_args(x, expert_ids, expert_weights, w_gate_up, w_down, lora_gate_up=None, lora_down=None,
                      biases=None) -> tuple[int, int, int, int, int]:
    """Raise ValueError naming the first argument whose shape does not fit; return (T, H, I, E, K).

    x [T, H]; expert_ids, expert_weights [T, K]; w_gate_up [E, H, 2I]; w_down [E, I, H]; LoRA pairs
    (A [E, in, R], B [E, R, out]); biases ([E, 2I], [E, H]).
    """
    xs, gus, ds = _shape(x), _shape(w_gate_up), _shape(w_down)
    if len(xs) != 2:
        raise ValueError(f"x must be [T, H], got {xs}")
    T, H = xs
    if len(gus) != 3 or len(ds) != 3:
        raise ValueError(f"w_gate_up must be [E, H, 2I] and w_down [E, I, H], got {gus}, {ds}")
    E, _, I2 = gus
    if E < 1:
        raise ValueError(f"w_gate_up {gus} and w_down {ds} hold no experts: E must be >= 1")
    if gus[1] != H or I2 % 2 or ds != (E, I2 // 2, H):
        raise ValueError(f"expert weights do not fit x [T={T}, H={H}]: w_gate_up {gus} (want [E, H, 2I]), "
                         f"w_down {ds} (want [E, I, H])")
    ids, ws = _shape(expert_ids), _shape(expert_weights)
    if ids != ws or len(ids) != 2 or ids[0] != T:
        raise ValueError(f"expert_ids {ids} and expert_weights {ws} must both be [T={T}, K]")
    if ids[1] < 1:  # K = 0 routes no row: torch's sort divides by K, and no router yields it
        raise ValueError(f"expert_ids and expert_weights must be [T, K] with K >= 1 experts per token, got {ids}")
    for name, pair in (("lora_gate_up", lora_gate_up), ("lora_down", lora_down), ("biases", biases)):
        # a 3-tuple would be read as its first two and a 1-tuple fail with an IndexError: both say nothing
        if pair is not None and (not isinstance(pair, (tuple, list)) or len(pair) != 2):
            raise ValueError(f"{name} must be a pair (tuple of 2 arrays) or None, got "
                             f"{type(pair).__name__}{f' of {len(pair)}' if isinstance(pair, (tuple, list)) else ''}")
    for name, pair, n_in, n_out in (("lora_gate_up", lora_gate_up, H, I2), ("lora_down", lora_down, I2 // 2, H)):
        if pair is None:
            continue
        a, b = _shape(pair[0]), _shape(pair[1])
        if len(a) != 3 or len(b) != 3 or a[:2] != (E, n_in) or b != (E, a[2], n_out):
            raise ValueError(f"{name} must be (A [E, {n_in}, R], B [E, R, {n_out}]), got {a}, {b}")
    if biases is not None:
        bg, bd = _shape(biases[0]), _shape(biases[1])
        if bg != (E, I2) or bd != (E, H):
            raise ValueError(f"biases must be ([E, 2I]={(E, I2)}, [E, H]={(E, H)}), got {bg}, {bd}")
    return T, H, I2 // 2, E, ids[1]


def check_lora_scale(scale: Any) -> float:
    """`scale` as a float; ValueError unless it is finite (a NaN or inf scale makes every output NaN, silently)."""
    try:
        s = float(scale)
    except (TypeError, ValueError):
        raise ValueError(f"scale must be a finite number (LoRA alpha/R), got {scale!r}") from None
    if not math.isfinite(s):
        raise ValueError(f"scale must be a finite number (LoRA alpha/R), got {s}")
    return s
