"""Lookup in a table of tuned kernel configs, shared by the Triton and Pallas autotuners (framework-free).

Keys look like `v{version}|{device}|{dtype}|{kind}|{M bucket},{rest of the shape key}`: a config tuned at one row
count serves other row counts of the same pass and shape, the nearest bucket on a log scale. A card with no entry for
a pass and shape takes the entry tuned on a sibling card (`SIBLING_DEVICES`: the same streaming multiprocessor, so
the same registers, shared memory and tensor-core instructions), before the autotuners' untuned defaults.
"""

from __future__ import annotations

import math
import os

# Cards whose streaming multiprocessors are the same (compute capability, SM count, registers and shared memory per
# SM), by the names torch (`torch.cuda.get_device_name`) and jax_impl (`device_kind`, lower-case with underscores)
# give them. The H100 SXM and the H200 are both sm_90 with 132 SMs and 228 KiB of shared memory per SM; the H200
# differs in its memory (141 GB at 4.8 TB/s against 80 GB at 3.35). So a block config tuned on one fits the other's
# resources, and is a better first choice there than an untuned default: the shipped torch table holds the
# persistent Hopper kernels' entries for the H100 only, and until this fallback an H200 ran those kernels on
# `GPU_DEFAULTS` (session 17's H200 step rows, 2026-12-06), without the EPI_SPLIT / 256-wide tiles / PRE_GATHER the
# H100 sweeps picked (1.06-1.13x on the block, benchmarks/REPORT.md session 10). SPLITMOE_TUNED_SIBLINGS=0 turns the
# fallback off, to time both.
SIBLING_DEVICES: dict[str, tuple[str, ...]] = {
    "NVIDIA H100 80GB HBM3": ("NVIDIA H200",),
    "NVIDIA H200": ("NVIDIA H100 80GB HBM3",),
    "nvidia_h100_80gb_hbm3": ("nvidia_h200",),
    "nvidia_h200": ("nvidia_h100_80gb_hbm3",),
}


def siblings_enabled() -> bool:
    """Whether a lookup may fall back to a sibling card's entry (SPLITMOE_TUNED_SIBLINGS, default 1)."""
    raw = os.environ.get("SPLITMOE_TUNED_SIBLINGS", "1").strip()
    if raw not in ("0", "1"):
        raise ValueError(f"SPLITMOE_TUNED_SIBLINGS={raw!r}: want 1 (a card without tuned entries takes a sibling "
                         "card's, the default) or 0 (it takes the untuned defaults)")
    return raw == "1"


def nearest_entry(table: dict, key: str, siblings: bool | None = None) -> dict | None:
    """The entry for `key` on its own card (`_nearest_bucket`), else, when `siblings` (default: SPLITMOE_TUNED_SIBLINGS)
    allows, the same lookup on each sibling card of `SIBLING_DEVICES` in turn; None if none has one."""
    found = _nearest_bucket(table, key)
    if found is not None or not (siblings_enabled() if siblings is None else siblings):
        return found
    parts = key.split("|")
    if len(parts) < 3:
        return None
    for sibling in SIBLING_DEVICES.get(parts[1], ()):
        found = _nearest_bucket(table, "|".join([parts[0], sibling, *parts[2:]]))
        if found is not None:
            return found
    return None


def _nearest_bucket(table: dict, key: str) -> dict | None:
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


def split_chunks(rows: int, split_rows: int) -> list[tuple[int, int]]:
    """The chunks [start, end) that the ragged-K kernels' split mode reduces an expert of `rows` rows in, with
    `split_rows` = N > 0: chunks of N rows from the expert's first row, where the last one also takes the remainder
    (fewer than N rows) instead of leaving it to a chunk of its own. So every chunk holds N to 2N - 1 rows, an expert
    of fewer than 2N rows is one chunk (finished without partials, with the unsplit kernel's bits) and there are
    rows // N chunks (one for 0 < rows < N; none for an empty expert).

    Why: with the remainder as its own chunk (session 20's rule), evenly routed experts of just over N rows (Qwen3 at
    T=16384 has 1,024-1,116 rows an expert against N = 1024) each split into a full chunk and a sliver, and every
    split expert pays a program per sliver and fp32 partials: the four launches of a layer then took 1.078 ms
    against 0.850 unsplit (H100, benchmarks/results/session23_2026-12-07). With this rule, in one call (H100,
    results/session24_2026-12-07): 0.935 ms against 0.799 unsplit, where the old rule's process ran 1.203 against
    0.899; skewed routing within the spread between processes. The kernels walk the schedule of cdiv(rows, N) slots
    per expert (the row-block schedule for block N); a remainder's slot gets no rows."""
    n = max(rows // split_rows, min(rows, 1))
    return [(k * split_rows, rows if k == n - 1 else (k + 1) * split_rows) for k in range(n)]


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
