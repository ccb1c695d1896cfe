"""Routing analytics of MoE layers: what the statistics mean, their float64 reference, and how they are reported.

SPEC.md section 11 is the prose version. For one MoE layer and one forward pass over T tokens, with a token mask
m_t in {0, 1} (1 everywhere unless the caller masks padding):

- the routing distribution p_t [E] of the family: `softmax(logits_t)` over all E for the softmax-routed families
  (Qwen3-MoE `softmax_topk`; gpt-oss `topk_softmax`, whose router softmaxes only its top-K, but whose aux loss uses
  the full softmax too), and the sigmoid scores normalised to sum 1, `s_t / Σ_e s_te` with `s = sigmoid(logits)`
  (without `e_score_correction_bias`, which steers selection only), for `sigmoid_group` (DeepSeek-V3, GLM-4.x);
- `load[e]` = Σ_t m_t · #{k : ids[t, k] = e}, the routed (token, slot) pairs of expert e (`route`'s ids);
- `tokens` = Σ_t m_t;  `entropy_sum` = Σ_t m_t · H(p_t), H(p) = -Σ_e p_e ln p_e in nats (0 · ln 0 = 0);
- `aux_loss_sum` (softmax-routed families, the ones with HF's load-balancing loss): this layer's own Switch loss
  `E · Σ_e (load[e] / tokens) · (Σ_t m_t p_te / tokens)` (HF's `load_balancing_loss_func` on this layer alone; 0
  when tokens = 0);
- `groups[g]` (sigmoid_group) = Σ_t m_t · [group g is among the topk_group groups kept for token t].

A logging window adds these up over its forward passes (`add_stats`); `summarize_layer` reports `load`,
`imbalance` = max_e load / mean_e load, `cv` = std_e load / mean_e load (population std), `entropy` =
entropy_sum / tokens, `aux_loss` = aux_loss_sum / passes (the mean over the window's forward passes) and `groups`;
imbalance, cv and entropy are None when no token was routed.

Both frameworks compute the per-pass statistics on the device in fp32 (counts as integers) and add them up there
(torch_impl.routing_stats, jax_impl.routing_stats); this module is the oracle and the host-side summary, plus the
plots (`plot_routing` for a run's metrics rows, `plot_routing_summary` for one summary) and `format_table`.
numpy only; matplotlib is imported by the plots.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from shared_math.config import RoutingConfig
from shared_math.reference import _topk_ids, route, sigmoid, softmax

# Keys of the per-pass statistics (and of their sums over a window); aux_loss_sum and groups only where defined.
STAT_KEYS = ("load", "tokens", "entropy_sum", "aux_loss_sum", "groups")

__all__ = ["STAT_KEYS", "add_stats", "format_table", "forward_stats", "group_choice", "has_aux_loss",
           "plot_routing", "plot_routing_summary", "routing_distribution", "summarize", "summarize_layer"]


def has_aux_loss(routing: RoutingConfig) -> bool:
    """Whether the family has HF's load-balancing loss: the softmax-routed ones (Qwen3-MoE, gpt-oss); DeepSeek-V3
    and GLM (sigmoid_group, 'noaux_tc') have none (the same split as `ModelConfig.has_aux_loss`)."""
    return routing.method != "sigmoid_group"


def routing_distribution(logits_TE: np.ndarray, routing: RoutingConfig) -> np.ndarray:
    """The family's routing distribution p [T, E] in float64 (rows sum to 1): softmax of the logits, or the
    sigmoid scores normalised to sum 1 for sigmoid_group (module docstring)."""
    logits_TE = np.asarray(logits_TE, np.float64)
    if routing.method == "sigmoid_group":
        s_TE = sigmoid(logits_TE)
        return s_TE / s_TE.sum(-1, keepdims=True)
    return softmax(logits_TE)


def group_choice(logits_TE: np.ndarray, routing: RoutingConfig,
                 correction_bias_E: np.ndarray | None = None) -> np.ndarray:
    """The groups kept per token by sigmoid_group routing, as a bool mask [T, G] (SPEC.md section 3, steps 1-3:
    group score = sum of the top-2 biased scores of the group, the topk_group best kept, ties to the lower index)."""
    if routing.method != "sigmoid_group":
        raise ValueError(f"group choice exists for sigmoid_group routing only, not {routing.method!r}")
    logits_TE = np.asarray(logits_TE, np.float64)
    T, E = logits_TE.shape
    G = routing.n_group
    bias_E = np.zeros(E) if correction_bias_E is None else np.asarray(correction_bias_E, np.float64)
    choice_TGe = (sigmoid(logits_TE) + bias_E).reshape(T, G, E // G)
    group_score_TG = -np.sort(-choice_TGe, axis=-1)[..., :2].sum(-1)
    mask_TG = np.zeros((T, G), dtype=bool)
    np.put_along_axis(mask_TG, _topk_ids(group_score_TG, routing.topk_group), True, axis=-1)
    return mask_TG


def forward_stats(logits_TE: np.ndarray, routing: RoutingConfig, correction_bias_E: np.ndarray | None = None,
                  token_mask_T: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """The statistics of one forward pass of one MoE layer from its router logits [T, E], in float64 / int64.

    `token_mask_T` (1 = count the token, 0 = padding) weights every token; None counts all of them. Returns
    {"load" [E], "tokens" [], "entropy_sum" [], "aux_loss_sum" [] (softmax-routed families), "groups" [G]
    (sigmoid_group)}."""
    logits_TE = np.asarray(logits_TE, np.float64)
    if logits_TE.ndim != 2 or logits_TE.shape[1] != routing.num_experts:
        raise ValueError(f"router logits must be [T, E={routing.num_experts}], got {logits_TE.shape}")
    T, E = logits_TE.shape
    m_T = np.ones(T) if token_mask_T is None else np.asarray(token_mask_T, np.float64).reshape(-1)
    if m_T.shape != (T,):
        raise ValueError(f"token mask has {m_T.size} entries for {T} tokens")
    ids_TK, _ = route(logits_TE, routing, correction_bias_E)
    m_int_T = m_T.astype(np.int64)
    load_E = np.zeros(E, np.int64)
    np.add.at(load_E, ids_TK.reshape(-1), np.repeat(m_int_T, ids_TK.shape[1]))
    p_TE = routing_distribution(logits_TE, routing)
    plogp_TE = np.where(p_TE > 0, p_TE * np.log(np.where(p_TE > 0, p_TE, 1.0)), 0.0)
    tokens = m_T.sum()
    out = {"load": load_E, "tokens": np.asarray(m_int_T.sum(), np.int64),
           "entropy_sum": np.asarray(-(plogp_TE.sum(-1) * m_T).sum())}
    if has_aux_loss(routing):
        n = max(tokens, 1.0)  # no token: load is 0 everywhere, so the loss is 0
        out["aux_loss_sum"] = np.asarray(E * np.sum((load_E / n) * ((p_TE * m_T[:, None]).sum(0) / n)))
    if routing.method == "sigmoid_group":
        out["groups"] = (group_choice(logits_TE, routing, correction_bias_E) * m_int_T[:, None]).sum(0)
    return out


def add_stats(a: Mapping[str, Any] | None, b: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """Element-wise sum of two statistics dicts with the same keys (a None `a` is the empty window)."""
    if a is None:
        return {k: np.asarray(v).copy() for k, v in b.items()}
    if set(a) != set(b):
        raise ValueError(f"routing statistics with different keys: {sorted(a)} vs {sorted(b)}")
    return {k: np.asarray(a[k]) + np.asarray(b[k]) for k in a}


def _num(x: float) -> float | None:
    """A float for JSON, None where it is undefined (NaN)."""
    return None if not math.isfinite(x) else float(x)


def summarize_layer(sums: Mapping[str, Any], passes: int) -> dict[str, Any]:
    """One layer's summed statistics over a window of `passes` forward passes -> its JSON object: `load` (ints),
    `imbalance`, `cv`, `entropy`, `aux_loss` (where defined), `groups` (ints, where defined)."""
    load = np.asarray(sums["load"], np.float64).reshape(-1)
    tokens = float(np.asarray(sums["tokens"]))
    mean = load.mean() if load.size else 0.0
    row: dict[str, Any] = {
        "load": [int(round(v)) for v in load],
        "imbalance": _num(load.max() / mean) if mean > 0 else None,
        "cv": _num(load.std() / mean) if mean > 0 else None,
        "entropy": _num(float(np.asarray(sums["entropy_sum"])) / tokens) if tokens > 0 else None,
    }
    if "aux_loss_sum" in sums:
        row["aux_loss"] = _num(float(np.asarray(sums["aux_loss_sum"])) / max(passes, 1))
    if "groups" in sums:
        row["groups"] = [int(round(v)) for v in np.asarray(sums["groups"], np.float64).reshape(-1)]
    return row


def summarize(per_layer: Mapping[int, Mapping[str, Any]], passes: int) -> dict[str, dict[str, Any]]:
    """{layer index: summed statistics} over `passes` forward passes -> the `routing` object of a metrics row,
    keyed by the layer index as a string (JSON object keys), in layer order."""
    return {str(l): summarize_layer(per_layer[l], passes) for l in sorted(per_layer)}


# ---- reporting ---------------------------------------------------------------------------------------------------

def format_table(summary: Mapping[str, Mapping[str, Any]]) -> str:
    """The per-layer table `splitmoe inspect --routing` prints: tokens routed, imbalance, cv, entropy (and its share
    of ln E), aux loss, the busiest and idlest experts, the group counts."""
    def f(v: Any, spec: str) -> str:
        return "-" if v is None else format(v, spec)

    lines = [f"{'layer':>5}  {'routed':>8}  {'imbalance':>9}  {'cv':>6}  {'entropy':>8}  {'/ln E':>6}  "
             f"{'aux loss':>9}  {'idle':>4}  busiest experts (share of routed)"]
    for layer, s in summary.items():
        load = np.asarray(s["load"], np.float64)
        total = load.sum()
        top = np.argsort(-load, kind="stable")[:3]
        busiest = ", ".join(f"{e}: {load[e] / total:.1%}" for e in top) if total > 0 else "-"
        ent = s.get("entropy")
        rel = None if ent is None or load.size < 2 else ent / math.log(load.size)
        line = (f"{layer:>5}  {int(total):>8}  {f(s.get('imbalance'), '.3f'):>9}  {f(s.get('cv'), '.3f'):>6}  "
                f"{f(ent, '.4f'):>8}  {f(rel, '.3f'):>6}  {f(s.get('aux_loss'), '.4f'):>9}  "
                f"{int((load == 0).sum()):>4}  {busiest}")
        if "groups" in s:
            line += f"; groups {s['groups']}"
        lines.append(line)
    return "\n".join(lines)


def _routing_rows(rows: Sequence[Mapping[str, Any]]) -> tuple[list[int], list[str]]:
    steps = [int(r["step"]) for r in rows if isinstance(r.get("routing"), Mapping) and r["routing"]]
    layers = sorted({k for r in rows if isinstance(r.get("routing"), Mapping) for k in r["routing"]}, key=int)
    return steps, layers


def plot_routing(rows: Sequence[Mapping[str, Any]], png: Path, title: str = "") -> Path | None:
    """The routing plot of a run from its metrics rows (those with a `routing` object): per MoE layer a heatmap of
    each expert's share of the routed tokens over the logged steps, then the imbalance (max / mean load) and the
    entropy (dotted: ln E, uniform routing) of every layer against the step. None when no row has routing data."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in rows if isinstance(r.get("routing"), Mapping) and r["routing"]]
    steps, layers = _routing_rows(rows)
    if not steps:
        return None
    ncols = min(len(layers), 4)
    nrows = -(-len(layers) // ncols)
    gcols = max(ncols, 2)  # the bottom row always holds two plots side by side
    fig = plt.figure(figsize=(4.2 * gcols, 2.8 * nrows + 3.4))
    grid = fig.add_gridspec(nrows + 1, gcols, height_ratios=[1.0] * nrows + [1.25])
    for i, layer in enumerate(layers):
        ax = fig.add_subplot(grid[i // ncols, i % ncols] if ncols > 1 else grid[i, :])
        loads = [np.asarray(r["routing"][layer]["load"], np.float64) if layer in r["routing"] else None
                 for r in rows]
        E = max(len(x) for x in loads if x is not None)
        share = np.full((E, len(rows)), np.nan)
        for j, x in enumerate(loads):
            if x is not None and x.sum() > 0:
                share[:, j] = x / x.sum()
        im = ax.imshow(share, aspect="auto", origin="lower", interpolation="nearest", cmap="viridis",
                       extent=(-0.5, len(rows) - 0.5, -0.5, E - 0.5))
        ticks = np.unique(np.linspace(0, len(rows) - 1, min(len(rows), 5)).round().astype(int))
        ax.set_xticks(ticks, [str(steps[t]) for t in ticks])
        ax.set_title(f"layer {layer}: expert share of routed tokens", fontsize=9)
        ax.set_xlabel("step", fontsize=8)
        ax.set_ylabel("expert", fontsize=8)
        fig.colorbar(im, ax=ax, fraction=0.046, pad=0.02)
    half = gcols // 2
    ax_imb, ax_ent = fig.add_subplot(grid[nrows, :half]), fig.add_subplot(grid[nrows, half:])
    for layer in layers:
        sub = [(s, r["routing"][layer]) for s, r in zip(steps, rows) if layer in r["routing"]]
        xs = [s for s, _ in sub]
        ax_imb.plot(xs, [np.nan if v["imbalance"] is None else v["imbalance"] for _, v in sub], lw=1,
                    label=f"layer {layer}")
        line, = ax_ent.plot(xs, [np.nan if v["entropy"] is None else v["entropy"] for _, v in sub], lw=1,
                            label=f"layer {layer}")
        if sub and len(sub[0][1]["load"]) > 1:
            ax_ent.axhline(math.log(len(sub[0][1]["load"])), color=line.get_color(), ls=":", lw=0.8)
    ax_imb.axhline(1.0, color="grey", ls=":", lw=0.8)
    ax_imb.set_xlabel("step")
    ax_imb.set_ylabel("imbalance (max / mean load)")
    ax_ent.set_xlabel("step")
    ax_ent.set_ylabel("router entropy (nats; dotted: ln E)")
    if len(layers) <= 12:
        ax_imb.legend(fontsize=7)
    fig.suptitle(title or "routing", fontsize=10)
    fig.tight_layout()
    fig.savefig(png, dpi=100)
    plt.close(fig)
    return png


def plot_routing_summary(summary: Mapping[str, Mapping[str, Any]], png: Path, title: str = "") -> Path:
    """One summary (`splitmoe inspect --routing`): a heatmap of each expert's share of the routed tokens per MoE
    layer, and the imbalance and entropy (dotted: ln E) per layer."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    layers = list(summary)
    if not layers:
        raise ValueError("no MoE layer in the routing summary: nothing to plot")
    E = max(len(s["load"]) for s in summary.values())
    share = np.full((len(layers), E), np.nan)
    for i, s in enumerate(summary.values()):
        load = np.asarray(s["load"], np.float64)
        if load.sum() > 0:
            share[i, :load.size] = load / load.sum()
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(12, max(3.0, 0.25 * len(layers) + 2)),
                                  gridspec_kw={"width_ratios": [2, 1]})
    im = ax.imshow(share, aspect="auto", origin="lower", interpolation="nearest", cmap="viridis")
    ax.set_yticks(range(len(layers)), layers if len(layers) <= 48 else None)
    ax.set_xlabel("expert")
    ax.set_ylabel("layer")
    ax.set_title("expert share of routed tokens", fontsize=10)
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.02)
    idx = np.arange(len(layers))
    imb, = ax2.plot(idx, [np.nan if s["imbalance"] is None else s["imbalance"] for s in summary.values()], "o-",
                    label="imbalance (max / mean load)")
    ax2.set_xticks(idx, layers if len(layers) <= 24 else None)
    ax2.set_xlabel("layer")
    ax2.set_ylabel("imbalance")
    ax3 = ax2.twinx()
    ent, = ax3.plot(idx, [np.nan if s["entropy"] is None else s["entropy"] for s in summary.values()], "s--",
                    color="tab:red", label="router entropy")
    ln_e = ax3.axhline(math.log(E), color="tab:red", ls=":", lw=0.8, label="ln E (uniform routing)")
    ax3.set_ylabel("router entropy (nats)", color="tab:red")
    ax2.legend(handles=[imb, ent, ln_e], fontsize=7, loc="best")
    ax2.set_title("imbalance and entropy per layer", fontsize=10)
    fig.suptitle(title or "routing", fontsize=10)
    fig.tight_layout()
    fig.savefig(png, dpi=100)
    plt.close(fig)
    return png
