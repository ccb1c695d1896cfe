"""Bar chart of full-model step times (rows written by gpt_oss_step.py / glm_flash_step.py): one panel per model
preset, one group of bars per context length, one bar per (implementation, eager or CUDA graph). When several files
hold the same (preset, length, implementation, mode), the last one wins; rows without a time (out of memory, a
capture that failed) are left out and listed under the panel.

    python benchmarks/plot_steps.py --out benchmarks/results/steps_2026-11-28.png a.jsonl b.jsonl ...
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

TITLES = {"20b": "gpt-oss-20b (random weights), r=64", "flash": "GLM-4.7-Flash-sized (random weights), r=64"}
COLORS = {("torch_impl", False): "tab:blue", ("hf_peft", False): "tab:orange", ("torch_impl", True): "tab:green",
          ("hf_peft", True): "tab:red"}


def _reason(r: dict) -> str:
    e = str(r.get("error", ""))
    return "out of memory" if e.startswith("OOM") else ("capture failed" if "CUDA graph" in e else e[:40])


def load(paths: list[Path]) -> dict[tuple, dict]:
    rows = {}
    for p in paths:
        for line in p.read_text().splitlines():
            if line.strip():
                r = json.loads(line)
                rows[(r["preset"], r["seq"], r["impl"], bool(r.get("cuda_graph", False)))] = r
    return rows


def plot(rows: dict[tuple, dict], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    presets = sorted({k[0] for k in rows})
    fig, axes = plt.subplots(1, len(presets), figsize=(6.5 * len(presets), 4.5), squeeze=False)
    for ax, preset in zip(axes[0], presets):
        seqs = sorted({k[1] for k in rows if k[0] == preset})
        series = sorted({(k[2], k[3]) for k, r in rows.items() if k[0] == preset and r.get("step_ms") is not None},
                        key=lambda s: (s[1], s[0] != "torch_impl"))
        missing = sorted({f"{k[2]}{' (CUDA graph)' if k[3] else ''} at {k[1]}: {_reason(r)}"
                          for k, r in rows.items() if k[0] == preset and r.get("step_ms") is None})
        width = 0.8 / max(len(series), 1)
        for j, (impl, graph) in enumerate(series):
            xs, ys = [], []
            for i, s in enumerate(seqs):
                r = rows.get((preset, s, impl, graph))
                if r is None:
                    continue
                if r.get("step_ms") is None:
                    continue
                xs.append(i + (j - (len(series) - 1) / 2) * width)
                ys.append(r["step_ms"])
            bars = ax.bar(xs, ys, width, label=f"{impl} ({'CUDA graph' if graph else 'eager'})",
                          color=COLORS.get((impl, graph)))
            ax.bar_label(bars, fmt="%.0f", fontsize=7)
        ax.set_xticks(range(len(seqs)), [str(s) for s in seqs])
        ax.set(xlabel="context length (tokens)", ylabel="ms per LoRA training step", title=TITLES.get(preset, preset))
        top = max((r["step_ms"] for k, r in rows.items() if k[0] == preset and r.get("step_ms")), default=1.0)
        ax.set_ylim(0, 1.3 * top)  # room for the legend above the bars
        ax.legend(fontsize=8, loc="upper left", ncol=2)
        if missing:
            ax.set_xlabel("context length (tokens)\n" + "\n".join(f"no time: {m}" for m in missing), fontsize=7)
    fig.tight_layout()
    fig.savefig(out, dpi=120)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("files", nargs="+", type=Path)
    p.add_argument("--out", type=Path, required=True)
    a = p.parse_args(argv)
    plot(load(a.files), a.out)
    print(a.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
