"""Lookup in a table of tuned kernel configs, shared by the Triton and Pallas autotuners (framework-free).

Keys look like `v{version}|{device}|{dtype}|{kind}|{M bucket},{rest of the shape key}`: a config tuned at one row
count serves other row counts of the same pass and shape, the nearest bucket on a log scale.
"""

from __future__ import annotations

import math


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
