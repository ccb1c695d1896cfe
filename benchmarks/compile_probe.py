"""Eager vs regionally compiled torch_impl training steps: per-step wall time and how much host work a step dispatches.

    python benchmarks/compile_probe.py --preset 30b-a3b --layers 4 --seq 4096                  # GPU, < 60 s
    python benchmarks/compile_probe.py --preset tiny --layers 8 --seq 64 --device cpu --dtype float32 --threads 1

The step is benchmarks/step.py's torch_impl row (random weights, LoRA r=64 on the attention projections and both
expert tensors, non-reentrant activation checkpointing per decoder layer, the loss without logits, AdamW), run on one
model in two variants: `eager`, and `compiled` (`torch_impl.compile.compile_decoder_layers` with `--dynamic`). The
variants alternate for `--rounds` rounds of `--iters` steps each on the same model (the compiled layers are switched
off and on between rounds), so a noisy host biases neither. Lengths run in the order given, in one process, as
step.py runs them (a second length recompiles the layers with a dynamic length under the default `--dynamic none`).

One JSON line per variant and length:
- `step_ms`: the lowest of the rounds' median step times (`step_ms_rounds`: every round's), synchronised on CUDA;
  `queue_ms`: the median time until the step returns to Python, before synchronising: where it is close to step_ms,
  the step is host-bound (the CPU queues kernels no faster than the GPU runs them);
- `first_step_s`: the first step at this length (compilation included);
- from one profiled step: `aten_ops` (every aten op, nested ones included), `top_level_aten_ops` (those dispatched
  from Python or a compiled graph, not from inside another aten op: the host's share of the work), `cuda_kernels`
  (kernels launched, on CUDA), `compiled_region_calls` (calls into compiled layer graphs, forward, checkpoint
  recompute and backward), `expert_op_calls` (the experts' custom op and its backward op), `top_ops` (the most
  frequent top-level aten ops);
- `dynamo`: frames compiled, graphs, graph breaks so far, and `recompiles_while_timed` (frames compiled during the
  timed rounds; anything but 0 means a recompile per step).
"""

from __future__ import annotations

import argparse
import collections
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from benchmarks.common import versions  # noqa: E402
from benchmarks.step import ATTENTION_TARGETS, _lora_b_nonzero, _randomise, make_adamw  # noqa: E402
from shared_math.config import EXPERT_TARGETS, LoraConfig, ModelConfig  # noqa: E402
from shared_math.presets import PRESETS, preset_hf_config, preset_names  # noqa: E402

VARIANTS = ("eager", "compiled")


def build(a: argparse.Namespace) -> torch.nn.Module:
    """step.py's torch_impl model (`build_ours`) in `--dtype`, checkpointed, uncompiled."""
    from torch_impl.load import build_model
    from torch_impl.lora import attach_lora

    hf = preset_hf_config(a.family, a.preset, a.layers)
    model = build_model(ModelConfig.from_hf(hf), dtype=getattr(torch, a.dtype), device=a.device,
                        moe_backend=a.backend)
    _randomise(model)
    attach_lora(model, LoraConfig(rank=a.rank, alpha=a.alpha, targets=ATTENTION_TARGETS[a.family] + EXPERT_TARGETS),
                seed=0)
    _lora_b_nonzero(model)
    if a.grad_ckpt:
        model.gradient_checkpointing_enable()
    return model.train()


class Switch:
    """The model's decoder layers compiled (`compile_decoder_layers`) or not, switchable between rounds: an
    `nn.Module.compile()`d module calls its `_compiled_call_impl`, and None there restores the plain call."""

    def __init__(self, model: torch.nn.Module, **compile_kwargs) -> None:
        from torch_impl.compile import compile_decoder_layers

        self.layers = list(model.layers)
        compile_decoder_layers(model, **compile_kwargs)
        self.compiled = [layer._compiled_call_impl for layer in self.layers]

    def use(self, variant: str) -> None:
        for layer, fn in zip(self.layers, self.compiled):
            layer._compiled_call_impl = fn if variant == "compiled" else None


def dynamo_state() -> dict:
    from torch._dynamo.utils import counters

    return dict(frames=counters["frames"]["total"], graphs=counters["stats"]["unique_graphs"],
                graph_breaks=sum(counters["graph_break"].values()))


def profile_counts(step, cuda: bool) -> dict:
    """Op and kernel counts of one `step()` (see the module docstring)."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        step()
        if cuda:
            torch.cuda.synchronize()
    events = prof.events()
    cpu = [e for e in events if e.device_type == torch.autograd.DeviceType.CPU]
    aten = [e for e in cpu if e.name.startswith("aten::")]
    top = [e for e in aten if e.cpu_parent is None or not e.cpu_parent.name.startswith("aten::")]
    return dict(
        aten_ops=len(aten), top_level_aten_ops=len(top),
        cuda_kernels=sum(e.device_type == torch.autograd.DeviceType.CUDA for e in events) if cuda else None,
        compiled_region_calls=sum(e.name in ("CompiledFunction", "CompiledFunctionBackward") for e in cpu),
        expert_op_calls=sum(e.name.startswith("splitmoe::") for e in cpu),
        top_ops=dict(collections.Counter(e.name for e in top).most_common(8)))


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--family", default="qwen3_moe", choices=list(PRESETS))
    p.add_argument("--preset", default=None, help="a full-size preset of the family (default: its first) or tiny")
    p.add_argument("--layers", type=int, default=4, help="decoder layers (default 4)")
    p.add_argument("--seq", default="4096", help="comma-separated lengths, run in this order in one process")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    p.add_argument("--backend", default="auto", help="MoE backend")
    p.add_argument("--rank", type=int, default=64)
    p.add_argument("--alpha", type=float, default=128.0)
    p.add_argument("--no-grad-ckpt", dest="grad_ckpt", action="store_false",
                   help="no activation checkpointing (default: per decoder layer, as step.py)")
    p.add_argument("--dynamic", default="none", choices=["none", "false", "true"],
                   help="torch.compile's `dynamic` for the compiled variant (none: torch's default)")
    p.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated, of {', '.join(VARIANTS)}")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per variant and length")
    p.add_argument("--iters", type=int, default=5, help="timed steps per round")
    p.add_argument("--rounds", type=int, default=3, help="alternating rounds per length")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (1: steadier host timings on CPU)")
    a = p.parse_args(argv)
    a.preset = a.preset or preset_names(a.family)[0]
    a.seqs = [int(s) for s in a.seq.split(",")]
    a.variants = a.variants.split(",")
    if unknown := [v for v in a.variants if v not in VARIANTS]:
        p.error(f"unknown variant(s) {unknown}; choose from {', '.join(VARIANTS)}")
    return a


def measure_length(a: argparse.Namespace, model: torch.nn.Module, switch: Switch, S: int, base: dict) -> None:
    """Warm-up, the alternating timed rounds and one profiled step per variant at length S; prints the rows."""
    cuda = a.device.startswith("cuda")
    params = [p for p in model.parameters() if p.requires_grad]
    ids = torch.randint(0, model.config.vocab_size, (1, S), device=a.device)
    opts = {v: make_adamw(params, "torch_impl") for v in a.variants}  # one AdamW state per variant

    def step(variant: str) -> None:
        model(ids, labels=ids, return_logits=False).loss.backward()
        opts[variant].step()
        opts[variant].zero_grad(set_to_none=True)

    rows = {v: dict(base, variant=v, seq=S) for v in a.variants}
    for v in a.variants:
        switch.use(v)
        t0 = time.perf_counter()
        step(v)
        if cuda:
            torch.cuda.synchronize()
        rows[v]["first_step_s"] = round(time.perf_counter() - t0, 3)
        for _ in range(a.warmup - 1):
            step(v)
    before = dynamo_state()
    medians: dict[str, list[float]] = {v: [] for v in a.variants}
    queued: dict[str, list[float]] = {v: [] for v in a.variants}
    for _ in range(a.rounds):
        for v in a.variants:
            switch.use(v)
            times = []
            for _ in range(a.iters):
                if cuda:
                    torch.cuda.synchronize()
                t0 = time.perf_counter()
                step(v)
                queued[v].append((time.perf_counter() - t0) * 1e3)
                if cuda:
                    torch.cuda.synchronize()
                times.append((time.perf_counter() - t0) * 1e3)
            medians[v].append(statistics.median(times))
    recompiles = dynamo_state()["frames"] - before["frames"]
    for v in a.variants:
        switch.use(v)
        row = rows[v]
        row.update(step_ms=round(min(medians[v]), 2), step_ms_rounds=[round(t, 2) for t in medians[v]],
                   queue_ms=round(statistics.median(queued[v]), 2), **profile_counts(lambda v=v: step(v), cuda))
        row["dynamo"] = dict(dynamo_state(), recompiles_while_timed=recompiles)
        print(json.dumps(row), flush=True)


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    torch.backends.cuda.matmul.allow_tf32 = True
    model = build(a)
    switch = Switch(model, dynamic={"none": None, "false": False, "true": True}[a.dynamic])
    base = dict(family=a.family, preset=a.preset, layers=model.config.num_hidden_layers, device=a.device,
                dtype=a.dtype, backend=a.backend, rank=a.rank, grad_ckpt=a.grad_ckpt, dynamic=a.dynamic,
                threads=torch.get_num_threads(), **versions())
    for S in a.seqs:
        measure_length(a, model, switch, S, base)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
