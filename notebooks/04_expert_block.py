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
# # The expert block on its own: every backend against the float64 reference, and the cost model
#
# `split_lora_experts(x, expert_ids, expert_weights, w_gate_up, w_down, (A1, B1), (A2, B2), scale=, backend=)` is
# the routed experts with split LoRA, `x·W + s·(x·A)·B` on the routed rows only. Here it runs on one shape case of
# `shared_math.cases` through every backend of both frameworks that can run on this machine, forward and backward,
# against `shared_math.reference` (float64 numpy, with its analytic backward). Then the cost model behind
# `splitmoe plan`: merged (PEFT) against split LoRA for a real model's shapes.
#
# Without a GPU the project's own kernels run in their interpreters (Triton's `TRITON_INTERPRET=1`, Pallas'
# interpret mode): slow, but the same kernel code.

# %%
import os

import torch

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
if DEVICE == "cpu":  # set before the kernels are first imported
    os.environ.setdefault("TRITON_INTERPRET", "1")
    os.environ.setdefault("SPLITMOE_PALLAS_INTERPRET", "1")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

import jax_impl.backends as jb  # noqa: E402
import torch_impl.backends as tb  # noqa: E402
from jax_impl.moe import split_lora_experts as jax_experts  # noqa: E402
from shared_math import reference  # noqa: E402
from shared_math.cases import get_case, make_moe_inputs  # noqa: E402
from shared_math.numerics import diff_summary, tolerance  # noqa: E402
from torch_impl.moe import split_lora_experts as torch_experts  # noqa: E402

case = get_case("odd_dims")  # odd H, I and R: every GEMM dimension is masked in the kernels
inp = make_moe_inputs(case, seed=0)  # float64, LoRA B non-zero
print(f"case {case.name}: T={case.T} H={case.H} I={case.I} E={case.E} K={case.K} R={case.R} ({case.why})")

# the oracle: output and the gradients of <y, dy> with respect to x and the four LoRA factors
dy = np.random.default_rng(1).standard_normal((case.T, case.H))
kw = dict(scale=inp["scale"], activation=inp["activation"], swiglu_limit=inp["swiglu_limit"])
args = (inp["x"], inp["expert_ids"], inp["expert_weights"], inp["w_gate_up"], inp["w_down"], inp["lora_gate_up"],
        inp["lora_down"])
y_ref = reference.split_lora_experts(*args, **kw)
g = reference.split_lora_experts_vjp(*args, **kw, dy=dy)
grads_ref = {"dx": g["x"], "dA1": g["lora_gate_up"][0], "dB1": g["lora_gate_up"][1], "dA2": g["lora_down"][0],
             "dB2": g["lora_down"][1]}

# %% [markdown]
# ## Every backend, forward and backward
# Each backend in the first dtype it runs in here (fp32 where it can; `grouped_mm` on a CPU only in bf16, the Triton
# interpreter only in fp32/fp16). `pallas` and `pallas_mosaic` are GPU kernel sets (per-pass lowering choice, Hopper
# Mosaic kernels): on a CPU `pallas` is `pallas_triton`, and interpreting the Mosaic kernels takes minutes, so both
# run only where a GPU is.

# %%
SKIP_ON_CPU = {"pallas": "same kernels as pallas_triton without a GPU",
               "pallas_mosaic": "Hopper kernels; interpreting them takes minutes"}
results = []  # (framework, backend, dtype, forward rel. error, worst gradient rel. error, or the reason it did not run)


def rel_err(actual, expected) -> float:
    d = diff_summary(actual, expected)
    return d.max_abs / d.max_abs_expected


def run_torch(backend: str, dtype: torch.dtype) -> tuple[float, float]:
    def t(a, grad=False, dt=dtype):
        return torch.tensor(np.asarray(a), dtype=dt, device=DEVICE, requires_grad=grad)

    x = t(inp["x"], True)
    lora = [t(a, True, torch.float32) for a in (*inp["lora_gate_up"], *inp["lora_down"])]  # fp32 masters, as PEFT
    y = torch_experts(x, torch.from_numpy(inp["expert_ids"]).to(DEVICE), t(inp["expert_weights"]), t(inp["w_gate_up"]),
                      t(inp["w_down"]), (lora[0], lora[1]), (lora[2], lora[3]), scale=inp["scale"], backend=backend)
    y.backward(t(dy))
    got = dict(zip(grads_ref, [x.grad] + [p.grad for p in lora], strict=True))
    return rel_err(y.float(), y_ref), max(rel_err(got[k].float(), grads_ref[k]) for k in grads_ref)


def run_jax(backend: str, dtype) -> tuple[float, float]:
    def f(x, a1, b1, a2, b2):
        return jax_experts(x, jnp.asarray(inp["expert_ids"]), jnp.asarray(inp["expert_weights"], dtype),
                           jnp.asarray(inp["w_gate_up"], dtype), jnp.asarray(inp["w_down"], dtype), (a1, b1),
                           (a2, b2), scale=inp["scale"], backend=backend)

    primals = [jnp.asarray(inp["x"], dtype)] + [jnp.asarray(a, jnp.float32)
                                                for a in (*inp["lora_gate_up"], *inp["lora_down"])]
    y, vjp = jax.vjp(f, *primals)
    got = dict(zip(grads_ref, vjp(jnp.asarray(dy, y.dtype)), strict=True))
    return rel_err(np.asarray(y, np.float64), y_ref), max(rel_err(np.asarray(got[k], np.float64), grads_ref[k])
                                                          for k in grads_ref)


for backend in tb.BACKENDS:
    why = "no dtype"
    for dtype in (torch.float32, torch.bfloat16):
        why = tb.why_unavailable(backend, DEVICE, dtype)
        if why is None:
            results.append(("torch", backend, str(dtype).removeprefix("torch."), *run_torch(backend, dtype)))
            break
    else:
        results.append(("torch", backend, "-", why, None))
gpu = jax.default_backend() == "gpu"
for backend in jb.BACKENDS:
    why = None if gpu else SKIP_ON_CPU.get(backend)
    why = why or jb.why_unavailable(backend, dtype=jnp.float32)
    if why is None:
        results.append(("jax", backend, "float32", *run_jax(backend, jnp.float32)))
    else:
        results.append(("jax", backend, "-", why, None))

print(f"{'framework':9} {'backend':14} {'dtype':9} {'forward':>9} {'gradients':>9}  (max|diff| / max|reference|)")
for fw, backend, dt, fwd, bwd in results:
    if bwd is None:
        print(f"{fw:9} {backend:14} {'-':9} not run here: {fwd}")
    else:
        ok = fwd <= tolerance(dt, "moe_block").rtol and bwd <= tolerance(dt, "moe_grad").rtol
        print(f"{fw:9} {backend:14} {dt:9} {fwd:9.1e} {bwd:9.1e}  {'ok' if ok else 'OVER TOLERANCE'}")
        assert ok, (fw, backend, tolerance(dt, "moe_block").why)

ran = [r for r in results if r[4] is not None]
fig, ax = plt.subplots(figsize=(9, 3.5))
xs = np.arange(len(ran))
ax.bar(xs - 0.2, [r[3] for r in ran], 0.4, label="forward")
ax.bar(xs + 0.2, [r[4] for r in ran], 0.4, label="gradients (worst of dx, dA, dB)")
for dt, ls in (("float32", ":"), ("bfloat16", "--")):
    if any(r[2] == dt for r in ran):
        ax.axhline(tolerance(dt, "moe_grad").rtol, color="red", ls=ls, lw=1, label=f"{dt} gradient tolerance")
ax.set_yscale("log")
ax.set_xticks(xs, [f"{r[0]} {r[1]}\n{r[2]}" for r in ran], fontsize=8)
ax.set_ylabel("max|diff| / max|float64|")
ax.legend(fontsize=8)
fig.tight_layout()
plt.show()

# %% [markdown]
# ## The cost model for a real model's shapes
# `shared_math.cost` counts FLOPs, bytes and extra peak memory of one MoE layer's experts, merged (PEFT: `W + s·B·A`
# materialised for every expert, and a weight-sized gradient) against split. Here with Qwen3-30B-A3B's shapes from
# its config.json (`shared_math.presets`), r = 64, bf16, forward + backward.

# %%
from shared_math import cost  # noqa: E402
from shared_math.config import ModelConfig  # noqa: E402
from shared_math.presets import preset_hf_config  # noqa: E402
from splitmoe.cli import main as splitmoe  # noqa: E402

mc = ModelConfig.from_hf(preset_hf_config("qwen3_moe", "30b-a3b"))
H, I, E, K, r = mc.hidden_size, mc.moe_intermediate_size, mc.num_experts, mc.num_experts_per_tok, 64
tokens = [2**k for k in range(8, 18)]
layer = {way: [cost.layer_cost(way, H, I, E, K, T, r) for T in tokens] for way in ("merged", "split")}
fig, axes = plt.subplots(1, 2, figsize=(10, 3.5))
for way, style in (("merged", "o-"), ("split", "s-")):
    axes[0].loglog(tokens, [c.flops / 1e12 for c in layer[way]], style, base=2, label=way)
    axes[1].loglog(tokens, [max(c.forward.peak_bytes, c.backward.peak_bytes) / 2**30 for c in layer[way]], style,
                   base=2, label=way)
axes[0].set_ylabel("TFLOP per MoE layer (fwd + bwd)")
axes[1].set_ylabel("extra peak memory per layer (GiB)")
for ax in axes:
    ax.set_xlabel("tokens T")
    ax.legend()
fig.suptitle(f"Qwen3-30B-A3B experts: H={H}, I={I}, E={E}, K={K}, r={r}")
fig.tight_layout()
plt.show()
bound = min(cost.backward_rank_bound(H, 2 * I), cost.backward_rank_bound(I, H))
print(f"with the backward counted, split needs fewer FLOPs at every T while r <= {bound:.0f}")
assert all(s.flops < m.flops for s, m in zip(layer["split"], layer["merged"], strict=True))

# %% [markdown]
# The same numbers from the command line (`splitmoe plan`), and how many H200s the whole model's LoRA step needs.

# %%
splitmoe(["plan", "--hidden", str(H), "--intermediate", str(I), "--experts", str(E), "--top-k", str(K),
          "--tokens", "1024,16384", "--rank", str(r)])
splitmoe(["plan", "--gpus", "auto", "--preset", "qwen3_moe:30b-a3b", "--seq", "16384"])
