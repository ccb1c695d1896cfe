"""Where a profiled step's device time goes, by kind of kernel: attention, expert GEMMs, dense GEMMs, loss, optimizer,
compiled (Inductor) fusions, copies, routing and other glue.

`step.py --profile` writes the full kernel list (every kernel name with its device time and call count) and these
category totals next to its operator tables, so a profile answers "how much of the step is attention?" without
reading a 30-row table whose rows overlap (an operator row carries its kernels' time too).

As a command it prints the totals of profiles and plots them side by side:

    python3 benchmarks/kernel_categories.py A.kernels.json B.txt --plot breakdown.png

A `.kernels.json` has every kernel. An older profile's text (`step.py --profile` before session 15) has only the
kernel rows of its 30-row device-time table (`kernels_from_table`), so its totals are lower bounds, and the
summary says how much of the profile's busy time they cover.

The categories go by kernel name, first match wins (`CATEGORIES`); a kernel no rule names is "other", and the
summary lists the largest of those so that a new kernel shows up instead of hiding in a total.
"""

from __future__ import annotations

import argparse
import json
import re
from collections.abc import Iterable
from pathlib import Path

# (category, regex on the kernel name), first match wins. Expert kernels before the generic GEMM rules (their names
# contain "gemm"); attention before copies (cuDNN's dO·O preprocessing kernel is attention work).
CATEGORIES: tuple[tuple[str, str], ...] = (
    ("attention", r"sdpa|flash|fmha|attention|compute_dot_do_o|convert_dq|cudnn_generated"),
    ("experts", r"_hopper_gemm_kernel|_grouped_gemm|_z_kernel|_schedule_kernel|split_lora"),
    ("loss", r"cross_entropy"),
    ("optimizer", r"adam|multi_tensor"),
    ("dense_gemm", r"nvjet|gemm|cutlass|xmma|cublas|s1688|sm90_"),
    ("routing", r"topk|[sS]ort|radix|scan|histc|[hH]istogram|bincount|cumsum"),
    ("norm_rope", r"rms_norm|rope|rotary|swiglu|liger"),
    ("inductor_fused", r"^triton_"),
    ("copies", r"copy|cat_|CatArray|transpose|Memcpy"),
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
    rows = [(n, float(ms), int(c), category(n)) for n, ms, c in kernels if n not in NOT_KERNELS]
    total = sum(ms for _, ms, _, _ in rows)
    cats: dict[str, dict] = {}
    for _, ms, c, cat in rows:
        entry = cats.setdefault(cat, {"ms": 0.0, "calls": 0})
        entry["ms"] += ms
        entry["calls"] += c
    for entry in cats.values():
        entry["share"] = entry["ms"] / total if total else 0.0
    ordered = dict(sorted(cats.items(), key=lambda kv: -kv[1]["ms"]))
    other = sorted((r[:3] for r in rows if r[3] == "other"), key=lambda r: -r[1])[:top_other]
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


def _ms(cell: str) -> float:
    """A profiler table's time cell ("239.919ms", "760.928us", "1.134s") in ms."""
    for unit, scale in (("ms", 1.0), ("us", 1e-3), ("s", 1e3)):
        if cell.endswith(unit):
            return float(cell[: -len(unit)]) * scale
    raise ValueError(f"not a time: {cell!r}")


def kernels_from_table(text: str) -> tuple[list[tuple[str, float, int]], float | None]:
    """(kernel rows, the profile's busy ms or None) from the first table of a `step.py --profile` text file, the one
    sorted by device time. Kernel rows are those with no host time (both CPU-time columns 0): operators have host
    time. GPU ranges of annotations ("## Call CompiledFxGraph", "Optimizer.step#...") have none either and span
    kernels already counted, so they are left out by name."""
    lines = text.splitlines()
    busy = None
    m = re.search(r"device busy ([0-9.]+) ms", lines[0]) if lines else None
    if m:
        busy = float(m.group(1))
    header = next(i for i, line in enumerate(lines) if line.strip().startswith("Name") and "Self CUDA" in line)
    name_width = lines[header].index("Name") + len("Name")
    rows = []
    for line in lines[header + 2:]:
        if line.startswith("---") or not line.strip():
            break
        name, cols = line[:name_width].strip(), line[name_width:].split()
        if name.startswith("## ") or ".step#" in name or len(cols) < 10:
            continue
        self_cpu, cpu_total, self_cuda, calls = cols[1], cols[3], cols[5], cols[-1]
        if _ms(self_cpu) == 0 and _ms(cpu_total) == 0 and _ms(self_cuda) > 0:
            rows.append((name, _ms(self_cuda), int(calls)))
    return rows, busy


def load(path: Path) -> dict:
    """A profile's summary (`summarise`) from its `.kernels.json` or its text tables, with "name", and "busy_ms"
    (the profile's own kernel-time total, which a text table's 30 rows cover only in part)."""
    if path.suffix == ".json":
        data = json.loads(path.read_text())
        summary = summarise(data["kernels"])
        summary["busy_ms"] = data.get("total_ms", summary["total_ms"])
    else:
        rows, busy = kernels_from_table(path.read_text())
        summary = summarise(rows)
        summary["busy_ms"] = busy if busy is not None else summary["total_ms"]
    summary["name"] = path.name.removesuffix(".kernels.json").removesuffix(".txt")
    return summary


def plot(summaries: list[dict], out: Path) -> None:
    """Stacked horizontal bars, one per profile: device ms by category (the uncovered part of a text table's busy
    time as "not in the table")."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cats = [c for c, _ in CATEGORIES] + ["other", "not in the table"]
    fig, ax = plt.subplots(figsize=(10, 0.9 * len(summaries) + 1.6))
    colours = plt.get_cmap("tab20").colors
    for i, s in enumerate(summaries):
        left = 0.0
        values = {c: e["ms"] for c, e in s["categories"].items()}
        values["not in the table"] = max(0.0, s["busy_ms"] - s["total_ms"])
        for j, c in enumerate(cats):
            v = values.get(c, 0.0)
            if v > 0:
                ax.barh(i, v, left=left, color=colours[j % len(colours)], label=c if c not in
                        ax.get_legend_handles_labels()[1] else None)
                left += v
    ax.set_yticks(range(len(summaries)), [s["name"][:48] for s in summaries], fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("device time in the profiled step (ms)")
    ax.legend(fontsize=7, ncol=4, loc="upper center", bbox_to_anchor=(0.5, -0.18))
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("profiles", nargs="+", type=Path, help="step.py --profile outputs: .kernels.json or .txt")
    p.add_argument("--plot", type=Path, default=None, help="write the stacked bars to this PNG")
    a = p.parse_args(argv)
    summaries = []
    for path in a.profiles:
        try:
            summaries.append(load(path))
        except (OSError, ValueError, KeyError, StopIteration) as e:
            p.error(f"{path}: not a step.py --profile output ({type(e).__name__}: {e})")
    for s in summaries:
        print(s["name"])
        print(format_summary(s), end="")
        if s["busy_ms"] > s["total_ms"] + 0.05:
            print(f"(these rows cover {s['total_ms'] / s['busy_ms']:.0%} of the profile's {s['busy_ms']:.1f} ms)")
        print()
    if a.plot:
        plot(summaries, a.plot)
        print(f"plot -> {a.plot}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
