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
# # Quickstart: fine-tune a tiny MoE with split LoRA, evaluate, reload the adapter in PEFT
#
# The embedded default job, smaller: build the tiny Qwen3-MoE (3 layers, 8 experts, random weights), train split
# LoRA on attention and experts on the synthetic copy / reverse tasks, evaluate held-out loss and exact-match, look
# at the loss curve and the router's expert loads, then load the saved adapter onto the Hugging Face model with PEFT
# and check that it computes the same logits and answers. About 30 s on a 2-core CPU.
#
# Open it in Jupyter with `pip install -e ".[notebooks]"` (jupytext opens this `.py` file as a notebook); CI runs it
# as a script (`tests/shared/test_notebooks.py`). Outputs go to `runs/notebooks/quickstart` (or
# `$SPLITMOE_NOTEBOOK_OUT/quickstart`).

# %%
import json
import os
import shutil
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np

from shared_math.train_config import REPO_ROOT, load_run_config
from torch_impl.train import Trainer, train

OUT = Path(os.environ.get("SPLITMOE_NOTEBOOK_OUT", REPO_ROOT / "runs" / "notebooks")) / "quickstart"
shutil.rmtree(OUT, ignore_errors=True)  # a fresh run folder: the notebook can be re-run from the top

# the default job (configs/runs/default.yaml), shortened to 150 steps of 16 rows so it runs in seconds on a CPU
cfg = load_run_config(REPO_ROOT / "configs" / "runs" / "default.yaml", [
    f"train.out_dir={OUT}", "train.steps=150", "data.batch_size=16", "optim.warmup_steps=10",
    "train.eval_every=50", "train.save_every=0", "data.synthetic.num_eval=32"])
print(f"LoRA rank {cfg.lora.rank} (scale {cfg.lora.scale:g}) on {', '.join(cfg.lora.targets)}")

# %% [markdown]
# `Trainer(cfg)` writes the tiny checkpoint into the run folder, loads it, attaches LoRA to every target (one `A, B`
# pair per expert on the fused gate_up and on down) and loads the initial adapter that both frameworks share.

# %%
tr = Trainer(cfg)
mc = tr.run.model_cfg
trainable = sum(p.numel() for p in tr.params)
frozen = sum(p.numel() for p in tr.model.parameters() if not p.requires_grad)
print(f"{mc.family}: {mc.num_hidden_layers} layers, H={mc.hidden_size}, {mc.num_experts} experts, top-"
      f"{mc.num_experts_per_tok}; {trainable:,} trainable LoRA parameters next to {frozen:,} frozen ones")

# %% [markdown]
# `train(cfg, trainer=tr)` is what `splitmoe train` runs: eval at step 0, every `eval_every` and at the end, the
# PEFT adapter, `metrics.jsonl` and `loss.png` in the run folder.

# %%
result = train(cfg, trainer=tr, progress=False)
before, after = result.evals[0], result.evals[-1]
print(f"held-out loss {before['eval_loss']:.3f} -> {after['eval_loss']:.3f}; exact-match "
      f"{before['exact_match']['all']:.2f} -> {after['exact_match']['all']:.2f} in {result.seconds:.1f}s")
assert after["eval_loss"] < 0.5 * before["eval_loss"], "the held-out loss should fall well below the untrained one"

# %% [markdown]
# ## The loss curve
# Every row of `metrics.jsonl`: training loss per step, held-out loss and exact-match at the evals.

# %%
rows = [json.loads(line) for line in (OUT / "metrics.jsonl").read_text().splitlines()]
train_rows = [r for r in rows if "loss" in r]
eval_rows = [r for r in rows if "eval_loss" in r]
fig, ax = plt.subplots(figsize=(7, 3.5))
ax.plot([r["step"] for r in train_rows], [r["loss"] for r in train_rows], lw=1, label="training loss")
ax.plot([r["step"] for r in eval_rows], [r["eval_loss"] for r in eval_rows], "o-", label="held-out loss")
ax.set_yscale("log")
ax.set_xlabel("optimizer step")
ax.set_ylabel("loss")
ax2 = ax.twinx()
ax2.plot([r["step"] for r in eval_rows], [r["exact_match"]["all"] for r in eval_rows], "s--", color="tab:green",
         label="held-out exact-match")
ax2.set_ylim(0, 1)
ax2.set_ylabel("exact-match")
fig.legend(loc="upper center", ncol=3, fontsize=8)
fig.tight_layout()
plt.show()

# %% [markdown]
# ## What the router does
# Every logged step's metrics row carries a `routing` object: per MoE layer the tokens per expert (`load`), the
# imbalance (max / mean load), the coefficient of variation and the router entropy (`train.routing_stats`,
# shared_math/routing_stats.py). The run plots them into `routing.png`: expert load over steps per layer, imbalance
# and entropy curves.

# %%
from shared_math.routing_stats import format_table  # noqa: E402

assert result.routing_plot is not None and result.routing_plot.is_file()
fig, ax = plt.subplots(figsize=(9, 6.5))
ax.imshow(plt.imread(result.routing_plot))
ax.axis("off")
plt.show()
last = [r for r in rows if "routing" in r][-1]
print(f"routing at step {last['step']}:")
print(format_table(last["routing"]))

# %% [markdown]
# ## The adapter in PEFT
# `adapter/` is a PEFT adapter folder: the Hugging Face model with `PeftModel.from_pretrained` computes the same
# logits (fp32 tolerance of `shared_math.numerics`) and the same held-out answers.

# %%
import torch  # noqa: E402
from peft import PeftModel  # noqa: E402
from transformers import AutoModelForCausalLM  # noqa: E402

from shared_math import tasks  # noqa: E402
from shared_math.data import render_prompt  # noqa: E402
from shared_math.numerics import diff_summary, tolerance  # noqa: E402
from shared_math.training import exact_match_eval  # noqa: E402

print(sorted(p.name for p in result.adapter_dir.iterdir()))
hf = AutoModelForCausalLM.from_pretrained(str(tr.run.checkpoint), dtype=torch.float32)
peft_model = PeftModel.from_pretrained(hf, str(result.adapter_dir)).eval()


def peft_logits(input_ids: np.ndarray, position_ids: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return peft_model(torch.from_numpy(input_ids).long(),
                          position_ids=torch.from_numpy(position_ids).long()).logits.float().numpy()


# whole held-out conversations, one per row (packed rows need a document mask that HF builds only for some attention
# implementations; one document per row means the same thing to both)
tok = tr.run.tokenizer
convs = [render_prompt(r["messages"], tok) for r in tr.run.eval_records[:8]]
ids = np.full((len(convs), max(map(len, convs))), tok.pad_id, np.int64)
for i, c in enumerate(convs):
    ids[i, :len(c)] = c
pos = np.broadcast_to(np.arange(ids.shape[1]), ids.shape).copy()
ours, theirs = tr.logits(ids, pos), peft_logits(ids, pos)
valid = ids != tok.pad_id  # compare where each row has real tokens (padding is after them: causal, so unaffected)
d, tol = diff_summary(ours[valid], theirs[valid]), tolerance("float32", "logits")
print(f"torch_impl vs PEFT logits: max|diff| / max|logit| = {d.max_abs / d.max_abs_expected:.1e} "
      f"(tolerance {tol.rtol:g}: {tol.why})")
assert d.max_abs <= tol.atol + tol.rtol * d.max_abs_expected

# held-out exact-match by greedy decoding through the PEFT model, as the trainer's own evaluation does it
peft_em = exact_match_eval(tr.run, peft_logits)
print(f"held-out exact-match through PEFT {peft_em['all']:.2f} (torch_impl: {after['exact_match']['all']:.2f})")
recs = tr.run.eval_records[:4]
answers = tasks.greedy_complete(peft_logits, [render_prompt(r["messages"][:-1], tok) for r in recs],
                                eos_id=tok.eos_id, pad_id=tok.pad_id, max_new_tokens=cfg.train.max_new_tokens)
for rec, answer in zip(recs, answers):
    print(f"  {rec.get('task', '')}: {rec['messages'][-2]['content']!r} -> {tok.decode(answer)!r} "
          f"(expected {rec['messages'][-1]['content']!r})")
assert peft_em == after["exact_match"]
