"""Lookup in a table of tuned kernel configs, shared by the Triton and Pallas autotuners (framework-free).

Keys look like `v{version}|{device}|{dtype}|{kind}|{M bucket},{rest of the shape key}`: a config tuned at one row
count serves other row counts of the same pass and shape, the nearest bucket on a log scale.
"""

from __future__ import annotations

import math
import os


def nearest_entry(table: dict, key: str) -> dict | None:
    """`table[key]`, else the entry whose key differs only in the leading M bucket (same version, device, dtype, kind
    and rest of the shape key) with the bucket nearest on a log scale (ties: the larger bucket); None if none."""
    if key in table:
        return table[key]
    head, _, shape = key.rpartition("|")
    m, _, rest = shape.partition(",")
    try:
        m = int(m)
    except ValueError:
        return None
    best, best_d = None, math.inf
    for k, entry in table.items():
        h, _, sh = k.rpartition("|")
        km, _, krest = sh.partition(",")
        if h != head or krest != rest:
            continue
        try:
            km = int(km)
        except ValueError:
            continue
        if km <= 0 or m <= 0:
            continue
        d = abs(math.log(km / m))
        if d < best_d or (d == best_d and best is not None and km > best[0]):
            best, best_d = (km, entry), d
    return None if best is None else best[1]


def env_split_rows(name: str, block_m: int, block_name: str) -> int | None:
    """The ragged-K kernels' split size from environment variable `name` (torch_impl's SPLITMOE_TN_SPLIT_ROWS and
    jax_impl's SPLITMOE_JAX_TN_SPLIT_ROWS): None when unset or blank, 0 for off, else N > 0, which must be a multiple
    of the launch's row block (chunks start on the row blocks the kernel walks); anything else is a ValueError naming
    the variable and the block (`block_name`: how the framework's config spells it)."""
    raw = os.environ.get(name, "").strip()
    if not raw:
        return None
    try:
        n = int(raw)
    except ValueError:
        n = -1
    if n < 0 or n % block_m:
        raise ValueError(f"{name}={raw!r}: want 0 (off) or a positive multiple of the ragged-K kernel's "
                         f"{block_name} ({block_m} for this launch), e.g. 512 or 1024")
    return n
