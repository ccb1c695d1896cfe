"""The multi-device checks of jax_impl.parallel, run by tests/jax/test_parallel.py as ONE subprocess with 4 CPU host
devices (`XLA_FLAGS=--xla_force_host_platform_device_count=4`: jax fixes its device count when it starts, and the
pytest process has started it with one). One process does every check so that jax starts once and each compiled
step is shared by the checks that use the same mesh (CI time).

`python -m tests.jax.parallel_checks ROOT` writes ROOT/results.json: numbers, not verdicts; the test file asserts on
them, so a failure names the check and the tensor.

The model: a one-layer tiny gpt-oss (routed experts with biases, swiglu_oai) whose router biases make experts 3-7
unreachable: with expert=2 the second expert rank receives no row at all (its all-to-all blocks are all padding)
and the first holds an expert that gets no token.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

import jax
import numpy as np

TINY = ["data.batch_size=4", "data.seq_len=32", "data.synthetic.num_train=64", "data.synthetic.num_eval=0",
        "lora.rank=4", "lora.alpha=8", "optim.warmup_steps=1", "train.eval_every=0", "train.log_every=1",
        "train.keep_checkpoints=3", "framework=jax"]
UNREACHABLE = {0: [3, 4, 5, 6, 7]}  # layer -> experts whose router bias keeps them out of every top-K
FOUR = ["parallel.fsdp=2", "parallel.expert=2"]
# (a sharded layout, its devices): each axis alone on 2 devices, and expert parallelism inside FSDP on 4
LAYOUTS = [(["parallel.fsdp=2"], 2), (["parallel.expert=2"], 2), (["parallel.data=2"], 2), (FOUR, 4)]
STEPS = ["train.steps=3", "train.save_every=1"]


def build_model(root: Path) -> Path:
    """The tiny gpt-oss checkpoint (one layer) with the unreachable experts of `UNREACHABLE` (router bias -30: the
    tiny model's router logits are O(1), so those experts never reach a top-2)."""
    from shared_math.checkpoint import write_checkpoint
    from shared_math.config import ModelConfig
    from shared_math.tiny import random_canonical_tensors, tiny_hf_config

    hf = tiny_hf_config("gpt_oss", num_hidden_layers=1)
    tensors = random_canonical_tensors(ModelConfig.from_hf(hf), seed=0)
    for layer, experts in UNREACHABLE.items():
        tensors[f"layers.{layer}.mlp.router.bias"][experts] = -30.0
    return write_checkpoint(root / "model", hf, tensors)


def _cfg(out: Path, model: Path, *extra: str):
    """The run config `splitmoe train` would use: configs/runs/default.yaml with TINY and `extra` over it."""
    from shared_math.train_config import load_run_config
    from splitmoe.train_cli import DEFAULT_RUN_YAML

    return load_run_config(DEFAULT_RUN_YAML, [*TINY, f"train.out_dir={out}", f"model.path={model}", *extra])


def _grads(tr, grads) -> dict[str, np.ndarray]:
    """LoRA gradients (an nnx.State like tr.params) by canonical name, gathered to host."""
    from flax import nnx

    from jax_impl.lora import lora_state_dict

    return lora_state_dict(nnx.merge(tr.graphdef, grads, tr.rest))


def _diff(actual: dict[str, np.ndarray], expected: dict[str, np.ndarray]) -> dict[str, list[float]]:
    """name -> [max|actual - expected|, max|expected|]."""
    assert actual.keys() == expected.keys(), sorted(actual.keys() ^ expected.keys())
    return {k: [float(np.abs(actual[k] - expected[k]).max()), float(np.abs(expected[k]).max())] for k in expected}


def _state(tr) -> dict[str, np.ndarray]:
    """Every array of a trainer's training state, by tree path, on host."""
    tree = {"params": tr.params, "opt_state": tr.opt_state}
    return {jax.tree_util.keystr(p): np.asarray(x) for p, x in jax.tree_util.tree_leaves_with_path(tree)}


def _specs(tr) -> dict[str, str]:
    """tree path -> PartitionSpec of an expert LoRA factor, an attention one, and their AdamW moments."""
    wanted = ("['mlp']['experts']['gate_up_lora_A']", "['self_attn']['q_proj']['lora_A']")
    return {jax.tree_util.keystr(p): str(getattr(x.sharding, "spec", "one device"))
            for p, x in jax.tree_util.tree_leaves_with_path({"params": tr.params, "opt_state": tr.opt_state})
            if any(w in jax.tree_util.keystr(p) for w in wanted)}


def check_moe_block(out: dict[str, Any]) -> None:
    """split_lora_experts_sharded == moe.split_lora_experts (value and every gradient) on 4 devices, T not a multiple
    of the devices (padded tokens), tokens only on experts {0, 1, 2, 4}: with expert=4 rank 3 gets nothing and
    ranks 1, 2 hold an idle expert next to a busy one."""
    import jax.numpy as jnp

    from jax_impl.moe import split_lora_experts
    from jax_impl.parallel import make_mesh, split_lora_experts_sharded
    from shared_math.train_config import ParallelSection

    rng = np.random.default_rng(0)
    T, H, I, E, K, R = 13, 10, 6, 8, 3, 2

    def arr(*shape, s=1.0):
        return jnp.asarray(s * rng.standard_normal(shape), jnp.float32)

    ids = jnp.asarray(np.stack([rng.choice([0, 1, 2, 4], size=K, replace=False) for _ in range(T)]), jnp.int32)
    x, w = arr(T, H), jnp.asarray(rng.random((T, K)), jnp.float32)
    w_gate_up, w_down = arr(E, H, 2 * I, s=0.3), arr(E, I, H, s=0.3)
    lora = ((arr(E, H, R), arr(E, R, 2 * I)), (arr(E, I, R), arr(E, R, H)))
    biases = (arr(E, 2 * I), arr(E, H))
    probe = arr(T, H)

    def value_and_grads(fn):
        def loss(x, w, lora):
            y = fn(x, ids, w, w_gate_up, w_down, *lora, scale=0.5, biases=biases, activation="swiglu_oai")
            return (y * probe).sum()
        return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))

    names = ["loss", "dx", "d_expert_weights", "dA_gate_up", "dB_gate_up", "dA_down", "dB_down"]
    ref = jax.tree.leaves(value_and_grads(split_lora_experts)(x, w, lora))
    # the last: every device tiles its own 4 tokens (13 padded to 16) in chunks of 3, the second one short
    for layout, chunk in ((ParallelSection(expert=4), None), (ParallelSection(data=2, expert=2), None),
                          (ParallelSection(data=2, fsdp=2), 3)):
        mesh = make_mesh(layout)
        got = value_and_grads(lambda *a, mesh=mesh, chunk=chunk, **k: split_lora_experts_sharded(
            mesh, *a, chunk=chunk, **k))(x, w, lora)
        out[f"moe_block {layout.describe()}" + (f" chunk={chunk}" if chunk else "")] = {
            n: [float(np.abs(np.asarray(a) - np.asarray(b)).max()), float(np.abs(np.asarray(b)).max())]
            for n, a, b in zip(names, jax.tree.leaves(got), ref, strict=True)}


def check_run_and_resume(root: Path, model: Path, out: dict[str, Any]) -> Path:
    """`splitmoe train --framework jax parallel.fsdp=2 parallel.expert=2` for 3 steps with a checkpoint after each,
    uninterrupted (the CLI), and the same run stopped after 2 steps and resumed (train()). Returns the CLI run's
    step-2 checkpoint, written by 4 devices."""
    from jax_impl import train as jt
    from splitmoe.cli import main as cli

    full = root / "full"
    rc = cli(["train", "--framework", "jax", "--out", str(full), "--quiet", *TINY, f"model.path={model}", *STEPS,
              *FOUR])
    rows = [json.loads(line) for line in (full / "metrics.jsonl").read_text().splitlines()]
    out["cli"] = {"rc": rc, "losses": [r["loss"] for r in rows if "loss" in r],
                  "grad_norms": [r["grad_norm"] for r in rows if "loss" in r],
                  "adapter": (full / "adapter" / "adapter_model.safetensors").is_file()}
    cfg = _cfg(root / "part", model, *STEPS, *FOUR)
    first = jt.train(cfg, stop_after=2, progress=False)
    second = jt.train(cfg, resume=True, progress=False)
    out["resume"] = {"losses": first.losses + second.losses, "grad_norms": first.grad_norms + second.grad_norms,
                     "start": second.start_step, "end": second.final_step}
    return full / "checkpoints" / "step_00000002"


def check_layouts(root: Path, model: Path, ckpt: Path, out: dict[str, Any]) -> None:
    """The 4-device checkpoint `ckpt` restored by one device, by each 2-device layout and by 4 devices: every array
    of the training state equal to what 4 devices hold; then the loss and LoRA gradients of the next micro-batch on
    every layout against one device's (LoRA B is no longer 0 at step 2, so every LoRA A has a gradient too)."""
    from jax_impl import train as jt

    four = jt.Trainer(_cfg(root / "four", model, *STEPS, *FOUR))
    four.restore(ckpt)
    want = _state(four)
    single = jt.Trainer(_cfg(root / "single", model, *STEPS))
    batch = single.run.train_data.batch(2)
    trainers = [("single", single)] + [
        (" ".join(extra), jt.Trainer(_cfg(root / "-".join(extra), model, *STEPS, *extra), devices=jax.devices()[:n])
         if n < 4 else four) for extra, n in LAYOUTS]
    ref = None
    for name, tr in trainers:
        if tr is not four:
            tr.restore(ckpt)
        got = _state(tr)
        loss, grads = tr.loss_and_grads(batch)
        grads = _grads(tr, grads)
        if ref is None:
            ref = grads
        out[name] = {"devices": sorted({d.id for x in jax.tree.leaves(tr.params) for d in x.devices()}),
                     "restored_names_equal": sorted(got) == sorted(want),
                     "restored_max_abs_diff": max(float(np.abs(got[k] - want[k]).max()) for k in want),
                     "loss": float(loss), "grads": _diff(grads, ref), "specs": _specs(tr)}
    # no token reaches them, so their LoRA gradients are exactly zero: the idle experts really were idle
    out["unreachable_grad_max"] = {
        f"{layer}/{e}": max(float(np.abs(ref[f"layers.{layer}.mlp.experts.{p}"][e]).max())
                            for p in ("gate_up_proj.lora_A", "gate_up_proj.lora_B", "down_proj.lora_A",
                                      "down_proj.lora_B"))
        for layer, es in UNREACHABLE.items() for e in es}


def check_refusals(root: Path, model: Path, out: dict[str, Any]) -> None:
    """Expert counts that do not divide, and a layout that does not match the devices, refused before any weight
    is loaded."""
    from jax_impl import train as jt
    from shared_math.train_config import ConfigError

    loads = []
    real_load = jt.load_model
    jt.load_model = lambda *a, **k: loads.append(a) or real_load(*a, **k)  # counts weight loads
    try:
        for name, extra, devices in (("uneven_experts", ["parallel.expert=3", "data.batch_size=6"],
                                      jax.devices()[:3]), ("device_mismatch", ["parallel.fsdp=2"], None)):
            loads.clear()
            try:
                jt.Trainer(_cfg(root / name, model, *extra), devices=devices)
                out[name] = {"error": None}
            except ConfigError as e:
                out[name] = {"error": str(e), "weights_loaded": len(loads)}
    finally:
        jt.load_model = real_load


def main(root: Path) -> None:
    out: dict[str, Any] = {"devices": jax.device_count(), "seconds": {}}
    model = build_model(root)

    def timed(name, check):
        t0, c0 = time.perf_counter(), time.process_time()
        result = check()
        out["seconds"][name] = {"wall": round(time.perf_counter() - t0, 2), "cpu": round(time.process_time() - c0, 2)}
        return result

    timed("moe_block", lambda: check_moe_block(out))
    ckpt = timed("run_and_resume", lambda: check_run_and_resume(root, model, out))
    timed("layouts", lambda: check_layouts(root, model, ckpt, out))
    timed("refusals", lambda: check_refusals(root, model, out))
    (root / "results.json").write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
