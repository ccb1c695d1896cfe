"""Plots of full-model step rows (benchmarks/step.py; older rows of gpt_oss_step.py / glm_flash_step.py too).

Bars (default): one panel per model preset, one group of bars per context length, one bar per implementation and
variant (CUDA graph, compile, offload, the checkpoint policy; `_variant`). `--lines`: step time and peak memory
against context length, one line per implementation and variant, one column per model (`--max-context` probes
included: their single-step times are marked hollow), a failed length (out of memory, error) as a cross. When
several files hold the same row, the last one wins.

    python benchmarks/plot_steps.py --out benchmarks/results/steps_2026-11-28.png a.jsonl b.jsonl ...
    python benchmarks/plot_steps.py --lines --out benchmarks/results/step_lines.png step_*.jsonl
    python benchmarks/plot_steps.py --spread --out spread.png step_*.jsonl   # each process's steps, per variant
"""

from __future__ import annotations

import argparse
import json
import textwrap
from pathlib import Path

TITLES = {"20b": "gpt-oss-20b (random weights), r=64", "flash": "GLM-4.7-Flash-sized (random weights), r=64",
          "30b-a3b": "Qwen3-30B-A3B (random weights), r=64"}
COLORS = {"torch_impl": "tab:blue", "hf_peft": "tab:orange", "unsloth": "tab:purple", "jax_impl": "tab:olive",
          "torch_impl + cuda_graph": "tab:green", "hf_peft + cuda_graph": "tab:red", "torch_impl + compile": "tab:cyan",
          "torch_impl + compile + keep attention": "tab:brown", "torch_impl + keep attention": "tab:pink",
          "torch_impl + cuda_graph + keep attention": "tab:gray"}


# variants COLORS does not name take these in turn: never a named implementation's colour, so an unnamed torch_impl
# variant cannot share HF + PEFT's orange or Unsloth's purple
SPARE_COLORS = [c for c in ("tab:blue", "tab:green", "tab:red", "tab:brown", "tab:pink", "tab:gray", "tab:cyan",
                            "tab:olive", "black", "gold", "navy", "teal", "magenta", "sienna", "darkgreen",
                            "slateblue") if c not in COLORS.values()]


def _color(variant: str, unnamed: list[str]) -> str:
    """`variant`'s colour: COLORS' own, else the next spare colour for each new unnamed variant (in `unnamed`)."""
    if variant in COLORS:
        return COLORS[variant]
    if variant not in unnamed:
        unnamed.append(variant)
    return SPARE_COLORS[unnamed.index(variant) % len(SPARE_COLORS)]


def _reason(r: dict) -> str:
    e = str(r.get("error", ""))
    return "out of memory" if e.startswith("OOM") else ("capture failed" if "CUDA graph" in e else e[:40])


def load(paths: list[Path]) -> dict[tuple, dict]:
    rows = {}
    for p in paths:
        for line in p.read_text().splitlines():
            if line.strip():
                r = json.loads(line)
                if r.get("mode", "step") == "step":
                    rows[(r["preset"], r["seq"], _variant(r))] = r
    return rows


def plot(rows: dict[tuple, dict], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    presets = sorted({k[0] for k in rows})
    n_series = max(len({k[2] for k in rows if k[0] == p}) for p in presets)
    fig, axes = plt.subplots(1, len(presets), figsize=(6.5 * len(presets), 4.5 + 0.35 * n_series), squeeze=False)
    unnamed: list[str] = []  # one colour per variant across the panels
    for ax, preset in zip(axes[0], presets):
        seqs = sorted({k[1] for k in rows if k[0] == preset})
        series = sorted({k[2] for k, r in rows.items() if k[0] == preset and r.get("step_ms") is not None},
                        key=lambda v: (not v.startswith("torch_impl"), v))
        missing = sorted({f"{k[2]} at {k[1]}: {_reason(r)}"
                          for k, r in rows.items() if k[0] == preset and r.get("step_ms") is None})
        width = 0.8 / max(len(series), 1)
        for j, variant in enumerate(series):
            xs, ys = [], []
            for i, s in enumerate(seqs):
                r = rows.get((preset, s, variant))
                if r is None or r.get("step_ms") is None:
                    continue
                xs.append(i + (j - (len(series) - 1) / 2) * width)
                ys.append(r["step_ms"])
            # long variants (switches, checkpointing) wrap, so the legend below the bars shows every one whole
            bars = ax.bar(xs, ys, width, label=textwrap.fill(variant, 70), color=_color(variant, unnamed))
            ax.bar_label(bars, fmt="%.0f", fontsize=7)
        ax.set_xticks(range(len(seqs)), [str(s) for s in seqs])
        depths = sorted({str(r.get("layers")) for k, r in rows.items() if k[0] == preset and r.get("layers")})
        title = TITLES.get(preset, preset) + (f", {'/'.join(depths)} layers" if depths else "")
        ax.set(xlabel="context length (tokens)", ylabel="ms per LoRA training step", title=title)
        top = max((r["step_ms"] for k, r in rows.items() if k[0] == preset and r.get("step_ms")), default=1.0)
        ax.set_ylim(0, 1.15 * top)
        if missing:
            ax.set_xlabel("context length (tokens)\n" + "\n".join(f"no time: {m}" for m in missing), fontsize=7)
        ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.14 - 0.04 * len(missing)), ncol=1)
    fig.tight_layout()
    fig.savefig(out, dpi=120)


def _variant(r: dict) -> str:
    parts = [r["impl"]] + [name for name in ("cuda_graph", "compile", "offload", "optim_in_backward") if r.get(name)]
    if r.get("compile_mode") not in (None, "default"):
        parts.append(r["compile_mode"])
    if r.get("compile_cpp_wrapper"):
        parts.append("cpp_wrapper")
    if r.get("checkpoint_policy") not in (None, "nothing"):
        parts.append(f"keep {r['checkpoint_policy']}")
    if r.get("grad_ckpt") is False or r.get("checkpoint_layers") == 0:
        parts.append("no checkpointing")
    elif r.get("checkpoint_layers") is not None:
        parts.append(f"first {r['checkpoint_layers']} of {r.get('layers', '?')} layers checkpointed")
    if r.get("expert_chunk"):
        parts.append(f"experts in {r['expert_chunk']}-token chunks")
    # the path switches a row ran with (SPLITMOE_SINK_LSE=0, ...): rows that differ only in them stay apart
    parts += [f"{k}={v}" for k, v in sorted((r.get("switches") or {}).items())]
    return " + ".join(parts)


def plot_lines(paths: list[Path], out: Path) -> None:
    """Step time and peak memory against context length per (model, implementation + variant)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows: dict[tuple, dict] = {}
    for p in paths:
        for line in p.read_text().splitlines():
            r = json.loads(line) if line.strip() else {}
            if r.get("seq") and r.get("mode", "step") in ("step", "max_context_probe"):
                model = f"{r.get('family', '')} {r['preset']} L{r.get('layers', '')}".strip()
                rows[(model, _variant(r), r["seq"])] = r
    models = sorted({k[0] for k in rows})
    fig, axes = plt.subplots(2, len(models), figsize=(6 * len(models), 8.5), squeeze=False)
    unnamed: list[str] = []
    for col, model in enumerate(models):
        for variant in sorted({k[1] for k in rows if k[0] == model}):
            pts = sorted((k[2], r) for k, r in rows.items() if k[0] == model and k[1] == variant)
            for ax, key in zip(axes[:, col], ("step_ms", "peak_gib")):
                ok = [(s, r[key]) for s, r in pts if r.get(key) is not None]
                line = ax.plot([s for s, _ in ok], [v for _, v in ok], "o-", label=variant,
                               color=_color(variant, unnamed))[0]
                probes = [(s, r[key]) for s, r in pts if r.get(key) is not None and r.get("mode") != "step"]
                ax.plot([s for s, _ in probes], [v for _, v in probes], "o", mfc="white", color=line.get_color())
                failed = [s for s, r in pts if r.get("error")]
                if failed:
                    top = max((v for _, v in ok), default=1.0)
                    ax.plot(failed, [top] * len(failed), "x", ms=10, color=line.get_color())
        seqs = sorted({k[2] for k in rows if k[0] == model})
        for ax, label in zip(axes[:, col], ("ms per LoRA training step", "peak GiB allocated")):
            ax.set(xscale="log", xlabel="context length (tokens); x: failed (out of memory)", ylabel=label)
            # close lengths on the log axis (160K, 192K) would run their labels together
            ax.set_xticks(seqs, [f"{s / 1024:g}K" for s in seqs], rotation=45)
            ax.minorticks_off()
            ax.set_title(model, fontsize=10)
            ax.grid(alpha=0.3)
        axes[0, col].set_yscale("log")
        # one legend, under the memory panel: inside a panel it hid the longest lengths' points
        axes[1, col].legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.3), ncol=1)
    fig.tight_layout()
    fig.savefig(out, dpi=120)


def plot_spread(paths: list[Path], out: Path) -> None:
    """Per variant, one column of points per process (row): its timed steps (`step_ms_runs`; the median alone for
    rows from before they were recorded), with the row's peak memory in a second panel. For host-bound steps whose
    time moves from one process to the next: every row of a variant is kept, not the last one."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups: dict[tuple, list[dict]] = {}
    for p in paths:
        for line in p.read_text().splitlines():
            r = json.loads(line) if line.strip() else {}
            if r.get("mode", "step") == "step" and r.get("step_ms") is not None:
                model = (f"{r.get('family', '')} {r['preset']} L{r.get('layers', '')}".strip(), r["seq"])
                groups.setdefault((model, _variant(r)), []).append(r)
    models = sorted({m for m, _ in groups})  # by model, then length
    most = max(len({v for m, v in groups if m == model}) for model in models)
    width = max(7.0, 1.3 * most)  # a column of ten variants needs room for ten labels
    fig, axes = plt.subplots(2, len(models), figsize=(width * len(models), 9), squeeze=False)
    unnamed: list[str] = []
    for col, model in enumerate(models):
        variants = sorted({v for m, v in groups if m == model}, key=lambda v: (not v.startswith("torch_impl"), v))
        for i, variant in enumerate(variants):
            rows = groups[(model, variant)]
            color = _color(variant, unnamed)
            for j, r in enumerate(rows):
                x = i + (j - (len(rows) - 1) / 2) * 0.12  # the processes of a variant side by side
                runs = r.get("step_ms_runs") or [r["step_ms"]]
                axes[0, col].plot([x] * len(runs), runs, "o", ms=4, alpha=0.6, color=color)
                axes[0, col].plot([x], [r["step_ms"]], "_", ms=14, color=color)
                # a graph's peak is the reserved memory (step.py: its activations live in the graph's pool), which
                # the allocated count does not see: drawn hollow, so the two measures are told apart
                reserved = r.get("peak_measure") == "reserved"
                axes[1, col].plot([x], [r["peak_gib"]], "s", color=color, mfc="none" if reserved else color)
        for ax, label in zip(axes[:, col], ("ms per step (dash: a process's median)",
                                            "peak GiB (hollow: reserved, a graph's pool counted)")):
            ax.set_xticks(range(len(variants)), [v.replace(" + ", "\n+ ") for v in variants], fontsize=7,
                          rotation=30 if len(variants) > 5 else 0, ha="right" if len(variants) > 5 else "center")
            ax.set(ylabel=label, title=f"{model[0]}, {model[1] / 1024:g}K tokens")
            ax.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    fig.savefig(out, dpi=120)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("files", nargs="+", type=Path)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--lines", action="store_true", help="time and memory against context length")
    p.add_argument("--spread", action="store_true", help="every process's timed steps per variant and length")
    a = p.parse_args(argv)
    if a.lines:
        plot_lines(a.files, a.out)
    elif a.spread:
        plot_spread(a.files, a.out)
    else:
        plot(load(a.files), a.out)
    print(a.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
