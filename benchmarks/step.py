"""The harness of the full-model step benchmarks (gpt_oss_step.py, glm_flash_step.py): build torch_impl's model and
HF v5 + PEFT's from one config.json dict with random bf16 weights, each in its own process (so peak memory is its own),
and time one LoRA training step (forward with labels, backward, AdamW on the LoRA parameters; batch 1 of S random
tokens) per context length: median step time after warm-up and peak allocated memory. The recipe defaults to
h200-anchors.md's: LoRA r=64, alpha=128 (fp32 LoRA weights), non-reentrant activation checkpointing per decoder layer
in both implementations. The scripts supply the config, the LoRA targets and their defaults; everything else is here.
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path

import torch

from benchmarks.common import versions, write_jsonl
from shared_math.config import LoraConfig, ModelConfig


@torch.no_grad()
def _randomise(model: torch.nn.Module) -> None:
    """In place, tensor by tensor (no second copy): norms 1, everything else N(0, 0.02) (incl. the correction bias,
    a parameter in torch_impl and a buffer in HF)."""
    tensors = list(model.named_parameters()) + [(n, b) for n, b in model.named_buffers()
                                                 if n.endswith("e_score_correction_bias")]
    for name, p in tensors:
        if "lora_" in name:
            continue
        if name.endswith("norm.weight"):
            p.fill_(1.0)
        else:
            p.normal_(0.0, 0.02)


@torch.no_grad()
def _lora_b_nonzero(model: torch.nn.Module) -> None:
    for name, p in model.named_parameters():
        if "lora_B" in name:  # torch_impl: *.lora_B, *_lora_B; PEFT: lora_B.default.weight
            p.normal_(0.0, 0.01)


def build_ours(hf: dict, device: str, backend: str, lora: LoraConfig, grad_ckpt: bool):
    from torch_impl.load import build_model
    from torch_impl.lora import attach_lora

    model = build_model(ModelConfig.from_hf(hf), dtype=torch.bfloat16, device=device, moe_backend=backend)
    _randomise(model)
    attach_lora(model, lora, seed=0)
    _lora_b_nonzero(model)
    if grad_ckpt:
        model.gradient_checkpointing_enable()
    model.train()
    return model, lambda ids: model(ids, labels=ids).loss


def graph_context(impl: str):
    """What a CUDA-graph capture of this implementation's step runs inside: torch_impl's forward without its host
    syncs (one unpacked document per row here); HF's as it is (if it syncs, the capture fails and the row says so)."""
    if impl == "torch_impl":
        from torch_impl.models.layers import static_batch

        return lambda: static_batch(packed=False)
    return nullcontext


def build_hf(hf: dict, device: str, attn: str, lora: LoraConfig, grad_ckpt: bool):
    import peft
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(hf["model_type"], **{k: v for k, v in hf.items() if k != "model_type"})
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16, attn_implementation=attn)
    _randomise(model)
    pm = peft.get_peft_model(model, peft.LoraConfig(
        r=lora.rank, lora_alpha=lora.alpha, lora_dropout=0.0, target_modules=list(lora.module_targets),
        target_parameters=list(lora.expert_targets)))
    _lora_b_nonzero(pm)
    if grad_ckpt:
        pm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    pm.train()
    return pm, lambda ids: pm(input_ids=ids, labels=ids, use_cache=False).loss


def measure(model, loss_fn, S: int, vocab: int, device: str, warmup: int, iters: int, graph_ctx=None) -> dict:
    """Median step time and peak memory. `graph_ctx` (a context factory, see graph_context): forward + backward
    captured once in a CUDA graph (torch_impl.cuda_graph.GraphedLoss, its own warm-up included) and replayed per
    step; AdamW runs eagerly after it in both modes."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    ids = torch.randint(0, vocab, (1, S), device=device)
    cuda = device.startswith("cuda")
    if graph_ctx is not None:
        from torch_impl.cuda_graph import GraphedLoss

        graphed = GraphedLoss(loss_fn, {"ids": ids}, params, context=graph_ctx)

        def fwd_bwd():
            graphed.step(ids=ids)
    else:
        def fwd_bwd():
            loss_fn(ids).backward()

    def step():
        opt.zero_grad(set_to_none=True)
        fwd_bwd()
        opt.step()

    for _ in range(warmup):
        step()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        step()
        if cuda:
            torch.cuda.synchronize()
        times.append((time.perf_counter() - t0) * 1e3)
    peak = torch.cuda.max_memory_allocated() / 2**30 if cuda else float("nan")
    return dict(step_ms=statistics.median(times), peak_gib=peak, lora_params=sum(p.numel() for p in params))


def profile_step(model, loss_fn, S: int, vocab: int, device: str, path: Path) -> None:
    """One more step (after `measure` warmed everything up) under torch.profiler; writes the op tables sorted by
    device time and by host time, with the step's wall time and busy device time, to `path` (where does a step's
    time go: kernels, or the host issuing them)."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    ids = torch.randint(0, vocab, (1, S), device=device)
    cuda = device.startswith("cuda")
    for _ in range(2):  # the optimizer's state, then a steady step
        opt.zero_grad(set_to_none=True)
        loss_fn(ids).backward()
        opt.step()
    if cuda:
        torch.cuda.synchronize()
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=acts) as prof:
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        loss_fn(ids).backward()
        opt.step()
        if cuda:
            torch.cuda.synchronize()
        wall = (time.perf_counter() - t0) * 1e3
    ka = prof.key_averages()
    # kernels only: operator rows carry their kernels' time too (the table's "Self CUDA time total" counts it so)
    busy = sum(e.self_device_time_total for e in ka if e.device_type != DeviceType.CPU) / 1e3 if cuda else float("nan")
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        f.write(f"S={S}: wall {wall:.1f} ms under the profiler; device busy {busy:.1f} ms (sum of kernel times)\n\n")
        if cuda:
            f.write(ka.table(sort_by="self_device_time_total", row_limit=30) + "\n\n")
        f.write(ka.table(sort_by="self_cpu_time_total", row_limit=30) + "\n")
    print(f"profile of S={S}: wall {wall:.1f} ms, device busy {busy:.1f} ms -> {path}", flush=True)


def run(argv: list[str] | None, *, doc: str, hf_config: Callable[[str, int | None], dict], targets: tuple[str, ...],
        presets: tuple[str, ...], seq: str, hf_attn: str, script: str) -> int:
    """Parse the command line (defaults from the calling script, whose path is `script`) and measure every
    (implementation, S) row."""
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default=presets[0], choices=list(presets))
    p.add_argument("--layers", type=int, default=None, help="truncate the depth (for quick checks)")
    p.add_argument("--seq", default=seq)
    p.add_argument("--impls", default="torch_impl,hf_peft")
    p.add_argument("--backend", default="auto", help="torch_impl MoE backend")
    p.add_argument("--hf-attn", default=hf_attn, help="HF attention implementation (eager, sdpa, flex_attention, ...)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--out", type=Path, default=None, help="append one JSON line per row")
    p.add_argument("--rank", type=int, default=64)
    p.add_argument("--alpha", type=float, default=128.0)
    p.add_argument("--cuda-graph", action="store_true",
                   help="capture forward + backward in a CUDA graph and replay it (both implementations; a capture "
                        "that fails is recorded in the row)")
    p.add_argument("--profile", type=Path, default=None, metavar="DIR",
                   help="after the timed rows, profile one step at the first length: "
                        "DIR/<script>_<preset>_L<layers>_<impl>_S<seq>.txt")
    p.add_argument("--no-grad-ckpt", dest="grad_ckpt", action="store_false",
                   help="keep every layer's activations (default: non-reentrant activation checkpointing per decoder "
                        "layer in both implementations, the h200-anchors.md recipe)")
    a = p.parse_args(argv)
    impls = a.impls.split(",")
    if len(impls) > 1:
        # One process per implementation: peak memory is then that implementation's alone, whatever the other one
        # left cached or referenced (a first run kept the torch_impl model alive into HF's rows: +42 GiB there).
        args = list(sys.argv[1:] if argv is None else argv)
        rc = 0
        for impl in impls:
            rc |= subprocess.run([sys.executable, script, *args, "--impls", impl]).returncode
        return rc
    torch.backends.cuda.matmul.allow_tf32 = True
    hf = hf_config(a.preset, a.layers)
    lora = LoraConfig(rank=a.rank, alpha=a.alpha, targets=targets)
    env = versions()
    cuda = a.device.startswith("cuda")
    for impl in impls:
        model, loss_fn = (build_ours(hf, a.device, a.backend, lora, a.grad_ckpt) if impl == "torch_impl"
                          else build_hf(hf, a.device, a.hf_attn, lora, a.grad_ckpt))
        seqs = [int(s) for s in a.seq.split(",")]
        # One untimed step before the first length: on the H200 the first length of a process still carried
        # one-time work after a one-step warm-up (gpt-oss 1K: 1325 ms, then 4K: 536 ms in the same process).
        measure(model, loss_fn, min(seqs), hf["vocab_size"], a.device, warmup=0, iters=1)
        ctx = graph_context(impl) if a.cuda_graph else None
        for S in seqs:
            row = dict(impl=impl, preset=a.preset, layers=hf["num_hidden_layers"], seq=S, backend=a.backend,
                       hf_attn=a.hf_attn, rank=a.rank, alpha=a.alpha, grad_ckpt=a.grad_ckpt,
                       cuda_graph=a.cuda_graph, **env)
            try:
                row.update(measure(model, loss_fn, S, hf["vocab_size"], a.device, a.warmup, a.iters, ctx))
            except torch.OutOfMemoryError as e:
                row.update(step_ms=None, peak_gib=None, error=f"OOM: {str(e)[:120]}")
            except RuntimeError as e:
                if not a.cuda_graph:
                    raise
                row.update(step_ms=None, peak_gib=None, error=f"CUDA graph: {str(e)[:300]}")
            gc.collect()
            if cuda:
                torch.cuda.empty_cache()
            print(json.dumps({k: row[k] for k in ("impl", "seq", "cuda_graph", "step_ms", "peak_gib", "error")
                              if k in row}), flush=True)
            if a.out:
                write_jsonl(a.out, [row])
        if a.profile:
            name = f"{Path(script).stem}_{a.preset}_L{hf['num_hidden_layers']}_{impl}_S{seqs[0]}.txt"
            profile_step(model, loss_fn, seqs[0], hf["vocab_size"], a.device, a.profile / name)
        del model, loss_fn
        gc.collect()
        if cuda:
            torch.cuda.empty_cache()
    return 0
