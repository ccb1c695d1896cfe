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
# # Cross-framework: the same run in PyTorch and JAX, and the float64 oracle
#
# One prepared run (checkpoint, tokenizer, batches, initial adapter) drives a `torch_impl` and a `jax_impl` trainer in
# lockstep, in fp32: their loss curves lie on top of each other. Then, from the same LoRA tensors and batch, every
# LoRA gradient of one framework against the other's, and each MoE block of the trained model against the float64
# numpy oracle (`shared_math.reference`). The tolerances are `shared_math.numerics`', each with its reason.
# `splitmoe compare` is the command-line form of the first part.

# %%
import os
import shutil
from pathlib import Path

import jax
import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np
import torch
from flax import nnx

import jax_impl.lora as jlora
import torch_impl.lora as tlora
from jax_impl.train import Trainer as JaxTrainer
from shared_math import reference
from shared_math.checkpoint import read_checkpoint
from shared_math.numerics import diff_summary, tolerance
from shared_math.train_config import REPO_ROOT, load_run_config
from shared_math.training import prepare_run
from torch_impl.train import Trainer as TorchTrainer

OUT = Path(os.environ.get("SPLITMOE_NOTEBOOK_OUT", REPO_ROOT / "runs" / "notebooks")) / "cross_framework"
shutil.rmtree(OUT, ignore_errors=True)

# configs/runs/compare_tiny.yaml: fp32, 4 rows per micro-batch, 2 micro-batches per step, weight decay on
cfg = load_run_config(REPO_ROOT / "configs" / "runs" / "compare_tiny.yaml", [f"train.out_dir={OUT}",
                                                                              "train.steps=8"])
run = prepare_run(cfg)  # one checkpoint, one tokenizer, one batch order for both
trainers = {"torch": TorchTrainer(cfg, run=run), "jax": JaxTrainer(cfg, run=run)}

# %% [markdown]
# ## Loss curves, step by step
# Each framework steps from the same adapter on the same batches with the same learning rates; the relative loss
# difference stays at fp32 summation-order noise, far under the tolerance of a short fp32 run.

# %%
losses = {k: [] for k in trainers}
norms = {k: [] for k in trainers}
for _ in range(cfg.train.steps):
    for name, t in trainers.items():
        loss, norm = t.train_step()
        losses[name].append(loss)
        norms[name].append(norm)
steps = np.arange(1, cfg.train.steps + 1)
rel = np.abs(np.subtract(losses["torch"], losses["jax"])) / np.abs(losses["torch"])
tol = tolerance("float32", "train_loss")
fig, axes = plt.subplots(1, 2, figsize=(10, 3.5))
axes[0].plot(steps, losses["torch"], "o-", label="torch_impl")
axes[0].plot(steps, losses["jax"], "x--", label="jax_impl")
axes[0].set_xlabel("optimizer step")
axes[0].set_ylabel("training loss")
axes[0].legend()
axes[1].semilogy(steps, np.maximum(rel, 1e-12), "o-", label="|loss torch - loss jax| / loss")
axes[1].axhline(tol.rtol, color="red", ls=":", label=f"tolerance {tol.rtol:g}")
axes[1].set_xlabel("optimizer step")
axes[1].legend(fontsize=8)
fig.tight_layout()
plt.show()
print(f"max relative loss difference {rel.max():.1e}, grad-norm "
      f"{np.max(np.abs(np.subtract(norms['torch'], norms['jax'])) / np.abs(norms['torch'])):.1e}")
assert rel.max() <= tol.rtol, tol.why

# %% [markdown]
# ## Per-tensor LoRA gradients
# Both models get torch's current LoRA tensors, then one forward + backward on the next training batch. Each bar is
# one LoRA tensor: `max|g_jax - g_torch| / max|g_torch|`.

# %%
tt, jt = trainers["torch"], trainers["jax"]
lora_now = tlora.lora_state_dict(tt.model)
jlora.load_lora_state_dict(jt.model, lora_now)
b = run.train_data.batch(tt.step * cfg.train.grad_accum)

tt.model.train()
tt.model.zero_grad(set_to_none=True)
tb = {k: torch.from_numpy(v).long() for k, v in b.items()}
tt.model(tb["input_ids"], labels=tb["labels"], position_ids=tb["position_ids"]).loss.backward()
grads_torch = {n: p.grad.numpy().copy() for n, p in tlora.lora_parameters(tt.model).items()}
tt.model.zero_grad(set_to_none=True)


def loss_of(model, ids, labels, pos):
    return model(ids, labels=labels, position_ids=pos).loss


# gradients with respect to the LoRA parameters only (nnx.DiffState), compiled once
grad_fn = nnx.jit(nnx.grad(loss_of, argnums=nnx.DiffState(0, nnx.LoRAParam)))
g_state = grad_fn(jt.model, *(jnp.asarray(b[k]) for k in ("input_ids", "labels", "position_ids")))
graphdef, _, rest = nnx.split(jt.model, nnx.LoRAParam, ...)
grads_jax = jlora.lora_state_dict(nnx.merge(graphdef, g_state, rest))  # the gradients under canonical names
assert grads_jax.keys() == grads_torch.keys()

names = sorted(grads_torch)
rel_grad = []
for n in names:
    d = diff_summary(grads_jax[n], grads_torch[n])
    rel_grad.append(d.max_abs / max(d.max_abs_expected, 1e-30))
gtol = tolerance("float32", "lora_grad")
fig, ax = plt.subplots(figsize=(10, 3.8))
ax.bar(range(len(names)), np.maximum(rel_grad, 1e-12))
ax.axhline(gtol.rtol, color="red", ls=":", label=f"tolerance {gtol.rtol:g}")
ax.set_yscale("log")
ax.set_xticks(range(len(names)), [n.replace("layers.", "L").replace(".lora_", " ") for n in names], rotation=90,
              fontsize=6)
ax.set_ylabel("max|diff| / max|torch|")
ax.set_title("LoRA gradients, jax_impl vs torch_impl (fp32)")
ax.legend()
fig.tight_layout()
plt.show()
worst = int(np.argmax(rel_grad))
print(f"{len(names)} LoRA tensors; worst {names[worst]}: {rel_grad[worst]:.1e} ({gtol.why})")
assert max(rel_grad) <= gtol.rtol

# %% [markdown]
# ## The float64 oracle
# Every MoE block of the trained model (frozen weights + torch's trained expert LoRA) on the same normed hidden
# states, in each framework (fp32) against `shared_math.reference.moe_block` (float64 numpy, written for obviousness
# rather than speed).

# %%
model_cfg, tensors = read_checkpoint(run.checkpoint)
rng = np.random.default_rng(0)
x = rng.standard_normal((48, model_cfg.hidden_size))
btol = tolerance("float32", "moe_block")
print(f"{'layer':>5}  {'torch vs float64':>16}  {'jax vs float64':>14}   (tolerance {btol.rtol:g})")
for l, is_moe in enumerate(model_cfg.moe_layers):
    if not is_moe:
        continue
    prefix = f"layers.{l}."
    lora_l = {k[len(prefix):]: v for k, v in lora_now.items() if k.startswith(prefix + "mlp.")}
    y64, _ = reference.moe_block(x, tensors.layer(l), model_cfg, lora=lora_l, scale=cfg.lora.scale)
    with torch.no_grad():
        y_t = tt.model.layers[l].mlp(torch.from_numpy(x).float())[0].numpy()
    y_j = np.asarray(jt.model.layers[l].mlp(jnp.asarray(x, jnp.float32))[0])
    d_t, d_j = diff_summary(y_t, y64), diff_summary(y_j, y64)
    r_t, r_j = d_t.max_abs / d_t.max_abs_expected, d_j.max_abs / d_j.max_abs_expected
    print(f"{l:>5}  {r_t:>16.1e}  {r_j:>14.1e}")
    assert max(r_t, r_j) <= btol.rtol, btol.why
print(f"jax default backend: {jax.default_backend()}; torch MoE backend {cfg.model.moe_backend}")
