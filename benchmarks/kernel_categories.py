"""Where a profiled step's device time goes, by kind of kernel: attention, expert GEMMs, dense GEMMs, loss, optimizer,
compiled (Inductor) fusions, copies, routing and other glue.

`step.py --profile` writes the full kernel list (every kernel name with its device time and call count) and these
category totals next to its operator tables, so a profile answers "how much of the step is attention?" without
reading a 30-row table whose rows overlap (an operator row carries its kernels' time too).

The categories go by kernel name, first match wins (`CATEGORIES`); a kernel no rule names is "other", and the
summary lists the largest of those so that a new kernel shows up instead of hiding in a total.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

# (category, regex on the kernel name), first match wins. Expert kernels before the generic GEMM rules (their names
# contain "gemm"); attention before copies (cuDNN's dO·O preprocessing kernel is attention work).
CATEGORIES: tuple[tuple[str, str], ...] = (
    ("attention", r"sdpa|flash|fmha|attention|compute_dot_do_o|cudnn_generated"),
    ("experts", r"_hopper_gemm_kernel|_grouped_gemm|_z_kernel|_schedule_kernel|split_lora"),
    ("loss", r"cross_entropy"),
    ("optimizer", r"adam|multi_tensor"),
    ("dense_gemm", r"nvjet|gemm|cutlass|xmma|cublas|s1688|sm90_"),
    ("routing", r"topk|sort|radix|scan|histc|bincount|cumsum"),
    ("norm_rope", r"rms_norm|rope|rotary|swiglu|liger"),
    ("inductor_fused", r"^triton_"),
    ("copies", r"copy|cat_|CatArray|transpose"),
    ("gather_scatter", r"gather|scatter|index"),
    ("reductions", r"reduce_kernel|reduce"),
    ("elementwise", r"elementwise|vectorized|unrolled"),
    ("memset", r"memset|Memset|fill"),
)
_COMPILED = [(name, re.compile(rx)) for name, rx in CATEGORIES]


# CUPTI's own records that the profiler lists among device events but that are no kernel (host-side stalls of the
# launch queue): left out of every total
NOT_KERNELS = frozenset({"Command Buffer Full", "Activity Buffer Request"})


def category(kernel: str) -> str:
    """The category of a kernel name (`CATEGORIES`), "other" when no rule matches."""
    for name, rx in _COMPILED:
        if rx.search(kernel):
            return name
    return "other"


def summarise(kernels: Iterable[tuple[str, float, int]], top_other: int = 8) -> dict:
    """Totals by category of (kernel name, device ms, calls) rows: {"total_ms", "categories": {name: {"ms",
    "share", "calls"}} largest first, "other_top": the largest uncategorised kernels}."""
    rows = [(n, float(ms), int(c)) for n, ms, c in kernels if n not in NOT_KERNELS]
    total = sum(ms for _, ms, _ in rows)
    cats: dict[str, dict] = {}
    for n, ms, c in rows:
        entry = cats.setdefault(category(n), {"ms": 0.0, "calls": 0})
        entry["ms"] += ms
        entry["calls"] += c
    for entry in cats.values():
        entry["share"] = entry["ms"] / total if total else 0.0
    ordered = dict(sorted(cats.items(), key=lambda kv: -kv[1]["ms"]))
    other = sorted((r for r in rows if category(r[0]) == "other"), key=lambda r: -r[1])[:top_other]
    return {"total_ms": total, "categories": ordered,
            "other_top": [{"kernel": n, "ms": ms, "calls": c} for n, ms, c in other]}


def format_summary(summary: dict) -> str:
    """The category totals as a small text table (ms, share of the kernel time, calls)."""
    lines = [f"device time by kind of kernel (sum of kernel times {summary['total_ms']:.1f} ms)",
             f"{'category':<16} {'ms':>9} {'share':>7} {'calls':>7}"]
    for name, e in summary["categories"].items():
        lines.append(f"{name:<16} {e['ms']:>9.1f} {e['share']:>6.1%} {e['calls']:>7d}")
    if summary["other_top"]:
        lines.append("largest 'other' kernels: " + "; ".join(
            f"{o['kernel'][:60]} {o['ms']:.1f} ms" for o in summary["other_top"]))
    return "\n".join(lines) + "\n"
