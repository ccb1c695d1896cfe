# ---
# jupyter:
#   jupytext:
#     formats: py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # Ablation: LoRA rank × targets
#
# A small grid through `splitmoe.sweep`, the library behind `splitmoe sweep`: rank 4 or 16, LoRA on the attention
# projections only or on the experts only, each point an ordinary run folder trained one after another. The sweep
# writes `sweep.md` / `sweep.jsonl` (one row per point: held-out loss, exact-match, ms/step, peak memory, trainable
# parameters) and `sweep.png`; re-running the same grid skips the finished points. The command-line form:
#
#     splitmoe sweep --out runs/sweep --grid lora.rank=4,16 \
#         --grid "lora.targets=[q_proj,k_proj,v_proj,o_proj],[experts.gate_up_proj,experts.down_proj]" train.steps=60

# %%
import json
import os
import shutil
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np

from shared_math.train_config import REPO_ROOT
from splitmoe.sweep import plan_sweep, run_sweep

OUT = Path(os.environ.get("SPLITMOE_NOTEBOOK_OUT", REPO_ROOT / "runs" / "notebooks")) / "ablation"
shutil.rmtree(OUT, ignore_errors=True)  # remove this line to resume an earlier sweep instead

ATTENTION = "[q_proj,k_proj,v_proj,o_proj]"
EXPERTS = "[experts.gate_up_proj,experts.down_proj]"
grid = ["lora.rank=4,16", f"lora.targets={ATTENTION},{EXPERTS}"]
# every point: the default job, short (60 steps of 8 rows) so the 4 points take seconds each on a CPU; with the
# default job's 400 steps of 32 rows the points separate further (exact-match rises from 0 there)
common = ["train.steps=60", "data.batch_size=8", "optim.warmup_steps=5", "train.eval_every=0", "train.save_every=0",
          "data.synthetic.num_eval=16", "lora.alpha=32"]
points = plan_sweep(REPO_ROOT / "configs" / "runs" / "default.yaml", OUT, grid, common)  # every point checked first
for p in points:
    print(p.index, p.name)

# %%
rows = run_sweep(points, OUT, progress=False)
assert [r["status"] for r in rows] == ["done"] * len(points), [r["error"] for r in rows]

# %% [markdown]
# ## The table (`sweep.md`)

# %%
print((OUT / "sweep.md").read_text())

# %% [markdown]
# ## The sweep's own plot (`sweep.png`): final held-out loss and exact-match per point, every point's loss curve

# %%
fig, ax = plt.subplots(figsize=(12, 3.8))
ax.imshow(plt.imread(OUT / "sweep.png"))
ax.axis("off")
plt.show()

# %% [markdown]
# ## Rank against targets
# The same rows (`sweep.jsonl`) read back as an ablation figure: held-out loss by rank, one line per target set,
# and what each point trains.

# %%
table = [json.loads(line) for line in (OUT / "sweep.jsonl").read_text().splitlines()]
fig, axes = plt.subplots(1, 2, figsize=(10, 3.5))
for targets, label in ((["q_proj", "k_proj", "v_proj", "o_proj"], "attention only"),
                       (["experts.gate_up_proj", "experts.down_proj"], "experts only")):
    sel = sorted((r for r in table if r["overrides"]["lora.targets"] == targets),
                 key=lambda r: r["overrides"]["lora.rank"])
    ranks = [r["overrides"]["lora.rank"] for r in sel]
    axes[0].plot(ranks, [r["final_eval_loss"] for r in sel], "o-", label=label)
    axes[1].plot(ranks, [r["trainable_params"] for r in sel], "o-", label=label)
for ax, what in ((axes[0], "final held-out loss"), (axes[1], "trainable LoRA parameters")):
    ax.set_xscale("log", base=2)
    ax.set_xticks([4, 16], ["4", "16"])
    ax.set_xlabel("LoRA rank")
    ax.set_ylabel(what)
    ax.legend()
fig.tight_layout()
plt.show()
best = min(table, key=lambda r: r["final_eval_loss"])
print(f"lowest held-out loss: {best['point']} ({best['final_eval_loss']:.3f}); ms/step per point:",
      np.round([r["mean_step_ms"] for r in table], 1))
