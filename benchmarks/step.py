"""One LoRA training step of a full-size MoE model, for every family and every implementation, in one command.

    splitmoe bench step --family qwen3_moe --preset 30b-a3b --seq 4096,16384 --impls torch_impl,hf_peft,unsloth
    splitmoe bench step --family gpt_oss --preset 20b --max-context --impls torch_impl,unsloth
    splitmoe bench step --family glm4_moe_lite --preset tiny --device cpu --seq 64 --iters 1   # smoke test (CPU)

A step is forward with labels, backward and AdamW on the LoRA parameters, batch 1 of S random tokens, labels = inputs;
every implementation gets the same recipe (h200-anchors.md's): random bf16 weights (N(0, 0.02), norms 1), LoRA r=64,
alpha=128 (fp32 adapters and AdamW state) on the attention projections and both expert tensors, B non-zero, and
non-reentrant activation checkpointing per decoder layer. Rows:

- `torch_impl`: this project (`--backend` picks the MoE backend; `--cuda-graph` replays a captured forward + backward;
  `--compile` compiles each decoder layer; `--offload` keeps the checkpointed layer inputs in host memory;
  `--expert-chunk N`, also for `jax_impl`, runs the routed experts in N-token chunks, `CausalLM.tile_experts`;
  `--checkpoint-layers N`, also for `jax_impl`, checkpoints only the first N decoder layers);
  the loss through `torch_impl.loss` (no `[S, V]` logits) and torch's fused AdamW on CUDA;
- `jax_impl`: this project in JAX (`benchmarks/step_jax.py`): one jitted step (forward with the loss without
  logits, backward, optax AdamW) with the LoRA and optimizer buffers donated, `jax.checkpoint` per decoder layer with
  the `--jax-remat` policy, `--jax-attn` attention (cuDNN flash attention on a GPU), `--jax-backend` experts; its
  `peak_gib` is the allocator's peak on a GPU (lengths run in ascending order: JAX cannot reset it) and XLA's buffer
  assignment on a CPU (`compiled_peak_gib` on both); `first_step_s` is a cold compile unless `--jax-compile-cache
  DIR` names JAX's persistent cache (a second run with the same shapes then shows what the trainer's cache saves);
- `hf_peft`: HF transformers v5 with PEFT (`target_parameters` on the experts), `--hf-attn` attention;
- `unsloth`: Unsloth as its users run it (qwen3_moe and gpt_oss): the random model saved with save_pretrained (the
  expert tensors left out, so transformers draws them at load, which keeps a 30B save small), loaded with
  `FastLanguageModel.from_pretrained`, LoRA from `FastLanguageModel.get_peft_model` with
  `use_gradient_checkpointing="unsloth"`. Needs Unsloth's wheels on the path (shared/tools/unsloth-wheels.sh).

Each implementation runs in its own process (peak memory is its own; Unsloth patches transformers at import). A row
that fails (out of memory, an error) is recorded with its error, not dropped. `--max-context` finds the longest S
that trains for each implementation: doubling from the first `--seq` until a step fails or `--max-seq` is reached
(halving while the first fails), then bisecting to `--context-step` tokens; jax_impl's probes run in a process each
(XLA's allocator after an out-of-memory step can fail a shorter one). One JSON line per row (`step_ms`, the median,
with `step_ms_runs`, every timed step; `peak_gib`, `first_step_s`, versions) on stdout and appended to `--out`.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

# Unsloth must be imported before transformers (it patches it at import): nothing here imports transformers at the
# top, and the unsloth row's process imports unsloth first (`_import_unsloth`).
import torch  # noqa: E402

from benchmarks.common import versions, write_jsonl  # noqa: E402
from benchmarks.kernel_categories import format_summary, summarise  # noqa: E402
from shared_math.config import EXPERT_TARGETS, LoraConfig, ModelConfig  # noqa: E402
from shared_math.presets import PRESETS, preset_hf_config, preset_names  # noqa: E402
from shared_math.progress import progress_bar, write_line  # noqa: E402

IMPLS = ("torch_impl", "jax_impl", "hf_peft", "unsloth")
# attention projections with LoRA per family (MLA families have no q/k/v_proj); the experts always get both tensors
ATTENTION_TARGETS = {
    "qwen3_moe": ("q_proj", "k_proj", "v_proj", "o_proj"),
    "gpt_oss": ("q_proj", "k_proj", "v_proj", "o_proj"),
    "glm4_moe": ("q_proj", "k_proj", "v_proj", "o_proj"),
    "deepseek_v3": ("q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj"),
    "glm4_moe_lite": ("q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj"),
}
# gpt-oss in HF v5 has no SDPA path (sinks): eager is the attention its users get without extra kernels
DEFAULT_HF_ATTN = {"gpt_oss": "eager"}


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


# torch.compile modes that replay each compiled layer from CUDA graphs (inductor's cudagraph trees)
CUDAGRAPH_COMPILE_MODES = ("reduce-overhead", "max-autotune")


def compile_kwargs(a: argparse.Namespace) -> dict:
    """torch.compile's arguments for the decoder layers from --compile-mode / --compile-cpp-wrapper (torch takes a
    mode or options, not both; parse_args refuses both)."""
    if a.compile_cpp_wrapper:
        return {"options": {"cpp_wrapper": True}}
    return {"mode": a.compile_mode} if a.compile_mode else {}


def build_ours(hf: dict, device: str, backend: str, lora: LoraConfig, grad_ckpt: bool, offload: bool = False,
               compile_layers: bool = False, policy: str = "nothing", expert_chunk: int | None = None,
               checkpoint_layers: int | None = None, compile_kwargs: dict | None = None):
    from torch_impl.load import build_model
    from torch_impl.lora import attach_lora

    model = build_model(ModelConfig.from_hf(hf), dtype=torch.bfloat16, device=device, moe_backend=backend)
    _randomise(model)
    attach_lora(model, lora, seed=0)
    _lora_b_nonzero(model)
    if grad_ckpt:
        model.gradient_checkpointing_enable(offload_to_cpu=offload, policy=policy, layers=checkpoint_layers)
    model.tile_experts(expert_chunk)
    if compile_layers:  # regional compilation: each decoder layer through torch.compile (one code object, shared)
        from torch_impl.compile import compile_decoder_layers

        compile_decoder_layers(model, **(compile_kwargs or {}))
    model.train()
    # the training loss without logits (torch_impl.loss): what torch_impl's Trainer runs
    return model, lambda ids: model(ids, labels=ids, return_logits=False).loss


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


def make_adamw(params: list[torch.nn.Parameter], impl: str, in_backward: bool = False, capturable: bool = False):
    """torch_impl: torch's fused AdamW on CUDA (one kernel over all LoRA tensors, what its Trainer uses), or with
    `in_backward` the same AdamW stepped per tensor inside backward (torch_impl.optim: no step ever holds all LoRA
    gradients; `capturable`: in the form a CUDA graph holds, as the Trainer builds it with cuda_graph); the others:
    AdamW as their users construct it (torch's default, foreach)."""
    fused = impl == "torch_impl" and params[0].is_cuda
    if in_backward and impl == "torch_impl":
        from torch_impl.optim import AdamWInBackward

        return AdamWInBackward(params, lr=1e-4, fused=fused or None, capturable=capturable)
    return torch.optim.AdamW(params, lr=1e-4, fused=fused or None)


def with_routing_stats(model, loss_fn):
    """`--routing-stats`: every step a logged step, as the Trainer runs one with `train.routing_stats: true` and
    `log_every: 1`: the routing statistics of each forward summed on the device (`RoutingStatsAccumulator.add`), then
    read to the host with one transfer after the optimizer step (`pop`). -> (loss_fn, after_step)."""
    from torch_impl.routing_stats import RoutingStatsAccumulator, routing_stats_of

    acc = RoutingStatsAccumulator(model)

    def loss_with_stats(ids):
        loss = loss_fn(ids)
        acc.add(routing_stats_of(model))
        return loss

    return loss_with_stats, acc.pop


def _release(opt) -> None:
    """An in-backward optimizer's hooks must not outlive its measurement (the next one registers its own)."""
    if hasattr(opt, "remove"):
        opt.remove()


def measure(model, loss_fn, S: int, vocab: int, device: str, warmup: int, iters: int, graph_ctx=None,
            impl: str = "torch_impl", in_backward: bool = False, after_step=None, graph_pool: bool = False) -> dict:
    """Median step time and peak memory. `graph_ctx` (a context factory, see graph_context): forward + backward
    captured once in a CUDA graph (torch_impl.cuda_graph.GraphedLoss, its own warm-up included) and replayed per
    step; AdamW runs eagerly after it in both modes, except AdamW in backward (`in_backward`), whose per-tensor
    updates the graph captures with the backward (torch_impl.cuda_graph.GraphedLoss). `after_step` (no arguments)
    runs at the end of every step (the routing statistics' read-out, `with_routing_stats`). `first_step_s`: the first
    call's seconds (compilation, autotuning and allocation included), what a user waits for before the first loss.

    `peak_gib` is the allocator's peak of allocated memory over the timed steps, except where the step replays CUDA
    graphs (`graph_ctx`, or `graph_pool`: torch.compile's cudagraph modes): a replay allocates nothing, its
    activations live in the graphs' private memory pool, reserved at capture and invisible to the allocated count
    (session 13: every-layer and 14-layer checkpointing read the same 48.35 GiB). There `peak_gib` is the peak
    reserved memory with the unused cache released first (`peak_measure: "reserved"`): the graph pool plus the
    rest, what the process holds. `peak_reserved_gib` is on every CUDA row."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = make_adamw(params, impl, in_backward, capturable=graph_ctx is not None)
    graph_pool = graph_pool or graph_ctx is not None
    try:
        return _measure(model, params, opt, loss_fn, S, vocab, device, warmup, iters, graph_ctx, after_step,
                        graph_pool)
    finally:
        _release(opt)


def step_peak(graph_pool: bool) -> dict:
    """The timed steps' peak from the allocator's statistics (reset before them): `peak_gib` is the allocated peak,
    or for a step replayed from CUDA graphs (`graph_pool`) the reserved peak, which counts the graphs' private pool
    (see `measure`); `peak_reserved_gib` either way, and `peak_measure` naming the one `peak_gib` is."""
    reserved = torch.cuda.max_memory_reserved() / 2**30
    peak = reserved if graph_pool else torch.cuda.max_memory_allocated() / 2**30
    return dict(peak_gib=peak, peak_reserved_gib=reserved, peak_measure="reserved" if graph_pool else "allocated")


def _measure(model, params, opt, loss_fn, S, vocab, device, warmup, iters, graph_ctx, after_step,
             graph_pool) -> dict:
    ids = torch.randint(0, vocab, (1, S), device=device)
    cuda = device.startswith("cuda")
    # memory by component: the model with its adapters before any step (and before a graph's capture, which leaves
    # its static gradients allocated: session 13's graph rows counted 4.97 GiB of them as model), then AdamW's state
    # after the first
    model_gib = torch.cuda.memory_allocated() / 2**30 if cuda else None
    capture_s = 0.0  # a graph's warm-up and capture come before its first step: the user waits for them too
    if graph_ctx is not None:
        from torch_impl.cuda_graph import GraphedLoss
        from torch_impl.optim import AdamWInBackward

        t0 = time.perf_counter()
        in_backward = opt if isinstance(opt, AdamWInBackward) else None  # its updates go in the graph
        graphed = GraphedLoss(loss_fn, {"ids": ids}, params, context=graph_ctx, optimizer_in_backward=in_backward)
        if cuda:
            torch.cuda.synchronize()
        capture_s = time.perf_counter() - t0

        def fwd_bwd():
            graphed.step(ids=ids)
    else:
        def fwd_bwd():
            loss_fn(ids).backward()

    def step():  # gradients freed after the update, as a training loop does: between steps only AdamW state stays
        fwd_bwd()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if after_step is not None:
            after_step()

    first_s = None
    for i in range(warmup):
        t0 = time.perf_counter()
        step()
        if i == 0:
            if cuda:
                torch.cuda.synchronize()
            first_s = capture_s + time.perf_counter() - t0
    if cuda:
        torch.cuda.synchronize()
        resident_gib = torch.cuda.memory_allocated() / 2**30
        if graph_pool:  # the warm-up's unused cache: reserved memory from here on is what the steps hold
            torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        step()
        if cuda:
            torch.cuda.synchronize()
        times.append((time.perf_counter() - t0) * 1e3)
    memory = {}
    peak = None  # no allocator statistics on a CPU
    if cuda:
        memory = step_peak(graph_pool)
        peak = memory.pop("peak_gib")
    if cuda and warmup:  # weights + LoRA; AdamW state (and anything else a step keeps); a step's transient peak
        memory.update(model_gib=model_gib, optimizer_gib=resident_gib - model_gib, step_extra_gib=peak - resident_gib)
    # every timed step as well as the median: a host-bound step (Qwen3 at 4K) varied by a third from one process to
    # the next on one H100 in session 12, so a row says how far its own steps spread
    return dict(step_ms=statistics.median(times), step_ms_runs=[round(t, 2) for t in times], peak_gib=peak,
                first_step_s=first_s, lora_params=sum(p.numel() for p in params), **memory)


def profile_step(model, loss_fn, S: int, vocab: int, device: str, path: Path, impl: str = "torch_impl",
                 in_backward: bool = False) -> None:
    """One more step (after `measure` warmed everything up) under torch.profiler; writes the op tables sorted by
    device time and by host time, with the step's wall time and busy device time, to `path` (where does a step's
    time go: kernels, or the host issuing them)."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = make_adamw(params, impl, in_backward)
    try:
        _profile(opt, loss_fn, S, vocab, device, path)
    finally:
        _release(opt)


def _profile(opt, loss_fn, S: int, vocab: int, device: str, path: Path) -> None:
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    ids = torch.randint(0, vocab, (1, S), device=device)
    cuda = device.startswith("cuda")
    for _ in range(2):  # the optimizer's state, then a steady step
        opt.zero_grad(set_to_none=True)
        loss_fn(ids).backward()
        opt.step()
    if cuda:
        torch.cuda.synchronize()
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=acts, record_shapes=True) as prof:
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        loss_fn(ids).backward()
        opt.step()
        if cuda:
            torch.cuda.synchronize()
        wall = (time.perf_counter() - t0) * 1e3
    ka = prof.key_averages()
    # kernels only, as the table's "Self CUDA time total": operator rows carry their kernels' time too, and the GPU
    # ranges of user annotations (inductor's "## Call CompiledFxGraph", "Optimizer.step") span kernels already
    # counted (with them, session 12's 4K profile read 473 ms busy for 202 ms of kernels)
    kernels = [(e.key, e.self_device_time_total / 1e3, e.count) for e in ka if e.device_type != DeviceType.CPU
               and not getattr(e, "is_user_annotation", False) and e.self_device_time_total > 0]
    summary = summarise(kernels) if cuda else None
    busy = summary["total_ms"] if cuda else float("nan")
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        f.write(f"S={S}: wall {wall:.1f} ms under the profiler; device busy {busy:.1f} ms (sum of kernel times)\n\n")
        if cuda:
            f.write(format_summary(summary) + "\n")
            f.write(ka.table(sort_by="self_device_time_total", row_limit=30) + "\n\n")
        f.write(ka.table(sort_by="self_cpu_time_total", row_limit=30) + "\n")
        if cuda:  # which tensors the glue kernels move: the operators again, split by their input shapes
            f.write("\nby input shape (operators only, device time)\n")
            f.write(prof.key_averages(group_by_input_shape=True).table(
                sort_by="self_device_time_total", row_limit=60, max_name_column_width=40,
                max_shapes_column_width=90) + "\n")
    if cuda:  # every kernel (the tables stop at 30 rows) and the category totals, for plots and later diffs
        with open(path.with_suffix(".kernels.json"), "w") as f:
            json.dump(dict(S=S, wall_ms=wall, **summary,
                           kernels=sorted(([n, ms, c] for n, ms, c in kernels), key=lambda r: -r[1])), f)
    print(f"profile of S={S}: wall {wall:.1f} ms, device busy {busy:.1f} ms -> {path}", flush=True)




# ---- Unsloth --------------------------------------------------------------------------------------------------

UNSLOTH_ENV = {"UNSLOTH_DISABLE_STATISTICS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
               "HF_DATASETS_OFFLINE": "1", "HF_HUB_DISABLE_TELEMETRY": "1", "DO_NOT_TRACK": "1",
               "UNSLOTH_COMPILE_LOCATION": os.path.join(tempfile.gettempdir(), "unsloth_compiled_cache"),
               "TOKENIZERS_PARALLELISM": "false", "UNSLOTH_WARN_UNINITIALIZED": "0"}


def _import_unsloth():
    """Import unsloth offline (before transformers: it patches it at import) with its telemetry and downloads off."""
    for k, v in UNSLOTH_ENV.items():
        os.environ.setdefault(k, v)
    import importlib.util

    if "unsloth" in sys.modules:  # imported already (main() does it first; build_unsloth asks again)
        return sys.modules["unsloth"]
    if importlib.util.find_spec("unsloth") is None:
        raise ImportError("No module named 'unsloth'")
    if "transformers" in sys.modules:
        raise RuntimeError("the unsloth row must import unsloth before transformers (run it in its own process)")
    import unsloth

    return unsloth


def _write_byte_tokenizer(path: Path) -> None:
    """A minimal offline tokenizer for from_pretrained: byte-level BPE without merges (256 byte ids) and three special
    tokens; the benchmark feeds random ids, so only its presence matters."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tok = Tokenizer(models.BPE(vocab={ch: i for i, ch in enumerate(alphabet)}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(["<|endoftext|>", "<|im_start|>", "<|im_end|>"])
    PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|endoftext|>", eos_token="<|im_end|>",
                            pad_token="<|endoftext|>").save_pretrained(path)


def build_unsloth(hf: dict, family: str, device: str, lora: LoraConfig, max_seq: int, workdir: Path):
    """Unsloth's model as its users get it: save the random model (experts left out: drawn at load), load it with
    FastLanguageModel, LoRA on the attention projections and the experts, Unsloth's gradient checkpointing."""
    if family not in ("qwen3_moe", "gpt_oss"):
        raise NotImplementedError(f"the unsloth row covers qwen3_moe and gpt_oss (Unsloth's MoE LoRA docs), not "
                                  f"{family}")
    _import_unsloth()
    from transformers import AutoConfig, AutoModelForCausalLM
    from unsloth import FastLanguageModel

    path = workdir / f"{family}_L{hf['num_hidden_layers']}_H{hf['hidden_size']}"
    if not (path / ".complete").is_file():
        config = AutoConfig.for_model(hf["model_type"], **{k: v for k, v in hf.items() if k != "model_type"},
                                      bos_token_id=256, eos_token_id=258, pad_token_id=256)
        with torch.device(device):
            model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
        _randomise(model)
        state = {k: v for k, v in model.state_dict().items() if ".experts." not in k}
        model.save_pretrained(path, state_dict=state, max_shard_size="5GB")
        del model, state
        gc.collect()
        torch.cuda.empty_cache() if device.startswith("cuda") else None
        _write_byte_tokenizer(path)
        (path / ".complete").write_text("")
    model, _ = FastLanguageModel.from_pretrained(str(path), max_seq_length=max_seq, load_in_4bit=False,
                                                 dtype=torch.bfloat16)
    targets = [t.removeprefix("experts.") for t in lora.targets]  # Unsloth's docs: gate_up_proj, down_proj
    model = FastLanguageModel.get_peft_model(model, r=lora.rank, lora_alpha=lora.alpha, target_modules=targets,
                                             use_gradient_checkpointing="unsloth", random_state=0)
    FastLanguageModel.for_training(model)
    _lora_b_nonzero(model)
    return model, lambda ids: model(input_ids=ids, labels=ids).loss


# ---- the command ----------------------------------------------------------------------------------------------

def _error_text(e: BaseException) -> str:
    oom = isinstance(e, torch.OutOfMemoryError) or "out of memory" in str(e).lower()
    return "OOM" if oom else f"{type(e).__name__}: {str(e)[:300]}"


def _try_step(model, loss_fn, S: int, vocab: int, a: argparse.Namespace, impl: str, ctx, after_step=None) -> dict:
    """One row's measurement; a failure becomes the row's `error` (the memory it held is released first)."""
    try:
        return measure(model, loss_fn, S, vocab, a.device, a.warmup, a.iters, ctx, impl=impl,
                       in_backward=a.optim_in_backward, after_step=after_step,
                       graph_pool=impl == "torch_impl" and a.compile and a.compile_mode in CUDAGRAPH_COMPILE_MODES)
    except (torch.OutOfMemoryError, RuntimeError, NotImplementedError, ValueError) as e:
        return dict(step_ms=None, peak_gib=None, error=_error_text(e))
    finally:
        gc.collect()
        if a.device.startswith("cuda"):
            torch.cuda.empty_cache()


MAX_CONTEXT_WARMUP_TOKENS = 4096  # the in-process search's warm-up step (`main`)


def max_context(probe, start: int, cap: int, step: int) -> tuple[int | None, list[dict]]:
    """The longest S (a multiple of `step`) for which `probe(S)` returns a row without error: doubling from `start`
    until a failure or `cap` (halving, down to `step`, while `start` itself fails), then bisecting between the last
    success and the first failure. None when not even `step` tokens train."""
    rows, ok, bad = [], None, None
    S = start
    while True:
        row = probe(S)
        rows.append(row)
        if row.get("error"):
            bad = S
            break
        ok = S
        if S >= cap:
            return ok, rows
        S = min(2 * S, cap)
    while ok is None and S > step:  # the start failed: halve until a length trains
        S = max(step, S // 2 // step * step)
        row = probe(S)
        rows.append(row)
        if row.get("error"):
            bad = S
        else:
            ok = S
    while ok is not None and bad - ok > step:
        mid = (ok + bad) // 2 // step * step
        if mid <= ok:
            break
        row = probe(mid)
        rows.append(row)
        ok, bad = (ok, mid) if row.get("error") else (mid, bad)
    return ok, rows


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    # named as `splitmoe bench step` when that command calls with its arguments (argv None: run as a script)
    p = argparse.ArgumentParser(prog=None if argv is None else "splitmoe bench step", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--family", default="qwen3_moe", choices=list(PRESETS))
    p.add_argument("--preset", default=None, help="a full-size preset of the family (default: its first) or tiny")
    p.add_argument("--layers", type=int, default=None, help="truncate the depth (quick checks)")
    p.add_argument("--seq", default="4096,16384", help="comma-separated context lengths")
    p.add_argument("--impls", default="torch_impl,hf_peft", help=f"comma-separated, of {', '.join(IMPLS)}")
    p.add_argument("--backend", default="auto", help="torch_impl MoE backend")
    p.add_argument("--hf-attn", default=None, help="HF attention implementation (default: sdpa; eager for gpt_oss)")
    p.add_argument("--jax-backend", default="auto", help="jax_impl MoE backend")
    p.add_argument("--jax-attn", default="auto", choices=["auto", "cudnn", "xla", "literal"],
                   help="jax_impl attention: cuDNN flash attention, XLA's, or the literal softmax (auto: cudnn on a "
                        "GPU, literal on a CPU)")
    p.add_argument("--jax-remat", default="small_dots", choices=["small_dots", "nothing", "dots"],
                   help="jax_impl: what a checkpointed decoder layer keeps for the backward (jax_impl.models.layers."
                        "REMAT_POLICIES)")
    p.add_argument("--jax-compile-cache", default="off",
                   help="jax_impl: JAX's persistent compilation cache folder (jax_impl.compile_cache; default off, "
                        "so first_step_s is a cold compile)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--iters", type=int, default=3)
    p.add_argument("--rank", type=int, default=64)
    p.add_argument("--alpha", type=float, default=128.0)
    p.add_argument("--cuda-graph", action="store_true", help="torch_impl: replay a captured forward + backward")
    p.add_argument("--no-grad-ckpt", dest="grad_ckpt", action="store_false",
                   help="keep every layer's activations (default: activation checkpointing per decoder layer)")
    p.add_argument("--compile", action="store_true", help="torch_impl: torch.compile each decoder layer")
    p.add_argument("--compile-mode", default=None,
                   choices=["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"],
                   help="torch_impl with --compile: torch.compile's mode for the layers (reduce-overhead: inductor "
                        "replays each compiled layer from CUDA graphs it records per shape, so the host no longer "
                        "launches its kernels one by one, and batch shapes may still vary)")
    p.add_argument("--compile-cpp-wrapper", action="store_true",
                   help="torch_impl with --compile: inductor's C++ wrapper (options={'cpp_wrapper': True}), which "
                        "launches a compiled layer's kernels from C++ instead of generated Python: less host time a "
                        "step, where the 4K step waits on its host")
    p.add_argument("--optim-in-backward", action="store_true",
                   help="torch_impl: AdamW stepped per tensor inside backward (torch_impl.optim), gradients freed "
                        "at once")
    p.add_argument("--checkpoint-policy", default="nothing", choices=["nothing", "attention"],
                   help="torch_impl: what a checkpointed decoder layer keeps besides its input (torch_impl.models."
                        "layers.REMAT_POLICIES; attention: the SDPA kernels' outputs, not recomputed)")
    p.add_argument("--checkpoint-layers", type=int, default=None, metavar="N",
                   help="torch_impl, jax_impl: checkpoint only the first N decoder layers, the rest keep their "
                        "activations and skip the recompute (gradient_checkpointing_enable(layers=N); default all)")
    p.add_argument("--expert-chunk", type=int, default=None, metavar="TOKENS",
                   help="torch_impl, jax_impl: routed experts in chunks of TOKENS tokens, recomputed chunk by chunk "
                        "in the backward (CausalLM.tile_experts: long context)")
    p.add_argument("--offload", action="store_true",
                   help="torch_impl rows: keep the checkpointed layer inputs in pinned host memory (long context; "
                        "jax_impl rows run without it and record offload=false)")
    p.add_argument("--routing-stats", action="store_true",
                   help="torch_impl: every step logs the routing analytics (what train.routing_stats costs)")
    p.add_argument("--max-context", action=argparse.BooleanOptionalAction, default=False,
                   help="find the longest S that trains, per implementation")
    p.add_argument("--probe", action="store_true", help=argparse.SUPPRESS)  # a --max-context child: one step
    p.add_argument("--max-seq", type=int, default=262144, help="--max-context: the largest S tried")
    p.add_argument("--context-step", type=int, default=4096, help="--max-context: bisection granularity")
    p.add_argument("--profile", type=Path, default=None, metavar="DIR",
                   help="after the timed rows, profile one step at the first length into DIR")
    p.add_argument("--workdir", type=Path, default=None,
                   help="unsloth: where its random checkpoint is saved (default: /dev/shm or the temp folder)")
    p.add_argument("--out", type=Path, default=None, help="append one JSON line per row")
    a = p.parse_args(argv)
    a.argv = list(sys.argv[1:] if argv is None else argv)  # for the child processes (later flags override)
    a.preset = a.preset or preset_names(a.family)[0]
    a.hf_attn = a.hf_attn or DEFAULT_HF_ATTN.get(a.family, "sdpa")
    a.impls = a.impls.split(",")
    unknown = [i for i in a.impls if i not in IMPLS]
    if unknown:
        p.error(f"unknown implementation(s) {unknown}; choose from {', '.join(IMPLS)}")
    a.seqs = _seqs(p, a.seq)
    _check_numbers(p, a)
    if a.compile_mode is not None and not a.compile:
        p.error(f"--compile-mode {a.compile_mode} is torch.compile's mode: it needs --compile")
    if a.compile_cpp_wrapper and (not a.compile or a.compile_mode is not None):
        p.error("--compile-cpp-wrapper is an inductor option of --compile, which torch.compile takes instead of a "
                "--compile-mode, not beside one: give --compile and no --compile-mode")
    checkpointed = a.grad_ckpt and a.checkpoint_layers != 0
    if a.compile and a.compile_mode in CUDAGRAPH_COMPILE_MODES and checkpointed:
        p.error(f"--compile-mode {a.compile_mode} records CUDA graphs per compiled layer, which fail inside "
                "activation checkpointing's recompute (torch 2.11, pytorch/pytorch#154306: 'accessing tensor output "
                "of CUDAGraphs that has been overwritten', session 13 on an H100): add --checkpoint-layers 0 (with "
                "--optim-in-backward to make room), or use --cuda-graph, which captures the whole checkpointed step")
    if a.checkpoint_layers is not None and not a.grad_ckpt:
        p.error(f"--checkpoint-layers {a.checkpoint_layers} says how many decoder layers are checkpointed, and "
                "--no-grad-ckpt checkpoints none: drop one of them")
    if a.checkpoint_layers is not None and a.checkpoint_layers < 0:
        p.error(f"--checkpoint-layers must be >= 0 (how many of the first decoder layers to checkpoint), got "
                f"{a.checkpoint_layers}")
    return a


def _seqs(p: argparse.ArgumentParser, text: str) -> list[int]:
    """--seq as positive ints, or a usage error naming it: int('abc') gave a message naming no option, and 0 or a
    negative length a traceback or an error row in --out (with exit status 0)."""
    try:
        seqs = [int(s) for s in text.split(",")]
    except ValueError:
        p.error(f"--seq takes comma-separated whole numbers of tokens (e.g. 4096,16384), got {text!r}")
    if any(s < 1 for s in seqs):
        p.error(f"--seq lengths must be >= 1 token, got {text!r}")
    return seqs


def _check_numbers(p: argparse.ArgumentParser, a: argparse.Namespace) -> None:
    """Usage errors, before anything is built or written, for values that otherwise became error rows in --out (or
    a silent no-op): counts out of range, unknown backend names, a device string torch cannot parse."""
    for flag, value, least in (("--iters", a.iters, 1), ("--warmup", a.warmup, 0), ("--max-seq", a.max_seq, 1),
                               ("--context-step", a.context_step, 1), ("--expert-chunk", a.expert_chunk, 1)):
        if value is not None and value < least:
            p.error(f"{flag} must be >= {least}, got {value}")
    if "torch_impl" in a.impls and a.backend != "auto":
        # imported only for a run that uses it: the unsloth and hf_peft processes parse these arguments too
        from torch_impl.backends import BACKENDS

        if a.backend not in BACKENDS:
            p.error(f"--backend {a.backend!r} is not a torch_impl MoE backend; choose auto or one of "
                    f"{', '.join(BACKENDS)}")
    if "jax_impl" in a.impls and a.jax_backend != "auto":
        from jax_impl.backends import BACKENDS as JAX_BACKENDS  # imports jax: only for a run that uses it

        if a.jax_backend not in JAX_BACKENDS:
            p.error(f"--jax-backend {a.jax_backend!r} is not a jax_impl MoE backend; choose auto or one of "
                    f"{', '.join(JAX_BACKENDS)}")
    try:
        torch.device(a.device)
    except RuntimeError:
        p.error(f"--device {a.device!r} is not a torch device; e.g. cpu, cuda or cuda:1")


def _emitter(a: argparse.Namespace):
    """-> emit(row): the row's headline fields as one JSON line on stdout (through tqdm: a line printed while a bar
    is drawing goes above it, not through it), the whole row appended to `--out`."""
    def emit(row: dict) -> None:
        write_line(json.dumps({k: row.get(k) for k in ("impl", "mode", "seq", "step_ms", "peak_gib", "first_step_s",
                                                        "error", "max_context") if k in row}), file=sys.stdout)
        if a.out:
            write_jsonl(a.out, [row])

    return emit


def _search_max_context(a: argparse.Namespace, base: dict, emit, one_step) -> None:
    """`--max-context`: `one_step(S)` (one untimed step at S tokens -> its measurement or error) probed by
    `max_context`, every probe and the result emitted as rows."""
    def probe(S: int) -> dict:
        row = {**base, "mode": "max_context_probe", "seq": S, **one_step(S)}
        emit(row)
        return row

    best, _ = max_context(probe, a.seqs[0], a.max_seq, a.context_step)
    emit({**base, "mode": "max_context", "seq": best, "max_context": best, "max_seq": a.max_seq,
          "context_step": a.context_step})


def _jax_error_text(e: BaseException) -> str:
    msg = str(e)
    oom = "RESOURCE_EXHAUSTED" in msg or "out of memory" in msg.lower()
    return "OOM" if oom else f"{type(e).__name__}: {msg[:300]}"


def _jax_probe_in_child(a: argparse.Namespace, S: int) -> dict:
    """One jax_impl step at S tokens (`--max-context`'s probe), in a fresh process: after a length runs out of memory
    the process's XLA allocator failed a length that needed less (on an H100, 2026-12-06: gpt-oss at 32K after 64K,
    planned at 62 of 76 GiB), so each probe gets an allocator of its own. -> the child's row (versions, device,
    measurement or error) without its mode and length."""
    with tempfile.TemporaryDirectory() as d:
        out = Path(d) / "probe.jsonl"
        argv = [*a.argv, "--no-max-context", "--probe", "--seq", str(S), "--impls", "jax_impl", "--out", str(out)]
        done = subprocess.run([sys.executable, str(Path(__file__).resolve()), *argv], stdout=subprocess.DEVNULL)
        rows = [json.loads(line) for line in out.read_text().splitlines()] if out.exists() else []
    rows = [r for r in rows if r.get("seq") == S]
    if not rows:
        return dict(step_ms=None, peak_gib=None, error=f"the probe process exited with {done.returncode} and no row")
    return {k: v for k, v in rows[-1].items() if k not in ("mode", "seq")}


def _main_jax(a: argparse.Namespace) -> int:
    """The jax_impl row (benchmarks/step_jax.py), in this process: build, then the lengths or the longest context,
    emitting rows as main() does."""
    from benchmarks.step_jax import JaxStep, compiled_plan, configure_jax, jax_versions, measure_jax

    env = configure_jax(a.device)  # before the first import of jax
    hf = preset_hf_config(a.family, a.preset, a.layers)
    vocab = hf["vocab_size"]
    lora = LoraConfig(rank=a.rank, alpha=a.alpha, targets=ATTENTION_TARGETS[a.family] + EXPERT_TARGETS)
    base = dict(impl="jax_impl", family=a.family, preset=a.preset, layers=hf["num_hidden_layers"], rank=a.rank,
                alpha=a.alpha, grad_ckpt=a.grad_ckpt, jax_remat=a.jax_remat if a.grad_ckpt else None, jax_env=env,
                checkpoint_layers=a.checkpoint_layers, expert_chunk=a.expert_chunk,
                offload=False)  # --offload is the torch rows' (the row says so)

    emit = _emitter(a)
    if a.max_context:  # every probe in a child process; this one never touches the device
        _search_max_context(a, base, emit, lambda S: _jax_probe_in_child(a, S))
        return 0
    try:
        from jax_impl.compile_cache import enable_compile_cache

        base.update(jax_versions(), jax_compile_cache=str(enable_compile_cache(a.jax_compile_cache) or "off"))
        runner = JaxStep(hf, lora, backend=a.jax_backend, attn=None if a.jax_attn == "literal" else a.jax_attn,
                         remat=a.jax_remat if a.grad_ckpt else None, expert_chunk=a.expert_chunk,
                         checkpoint_layers=a.checkpoint_layers)
        base.update(backend=runner.backend, jax_attn=runner.attn or "literal")
    except Exception as e:  # noqa: BLE001 - a row that cannot even build is recorded, not dropped
        emit({**base, "mode": "build", "seq": None, "step_ms": None, "peak_gib": None, "error": _jax_error_text(e)})
        return 1

    def try_step(S: int, warmup: int, iters: int) -> dict:
        try:
            return measure_jax(runner, S, vocab, warmup, iters)
        except Exception as e:  # noqa: BLE001 - out of memory (XlaRuntimeError) or a refused shape: the row says so
            # a length that compiled but did not fit keeps XLA's plan of it: what the step would have needed
            return dict(step_ms=None, peak_gib=None, error=_jax_error_text(e), **compiled_plan(runner, S))

    if a.probe:  # one step at the one length, as the searching process's probes did before they moved here
        emit({**base, "mode": "step", "seq": a.seqs[0], **try_step(a.seqs[0], 0, 1)})
        return 0
    seqs = sorted(a.seqs)  # the allocator's peak is a process maximum: ascending, each row's peak is its own
    # untimed, as the torch rows: one-time work of the process stays out of the first row; it compiles the first
    # length, so that row's first_step_s (compilation included) is this step's
    first = try_step(seqs[0], 0, 1)
    for S in progress_bar(seqs, desc="jax_impl rows", unit="row"):
        row = try_step(S, a.warmup, a.iters)
        if S == seqs[0] and not first.get("error"):
            row.update(first_step_s=first["first_step_s"], compile_s=first["compile_s"])
        emit({**base, "mode": "step", "seq": S, **row})
    return 0


def available_host_bytes() -> int | None:
    """MemAvailable of /proc/meminfo in bytes (None where there is none: not Linux)."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def check_host_memory(hf: dict[str, Any], family: str, preset: str, available: int | None = None) -> None:
    """MemoryError naming the numbers when the model's bf16 weights alone exceed this host's available memory: a
    full-size preset on a CPU machine (Qwen3-30B-A3B: 61 GB) was killed by the kernel with no row and no message."""
    from shared_math.plan import param_counts

    available = available_host_bytes() if available is None else available
    need = 2 * param_counts(ModelConfig.from_hf(hf)).total
    if available is not None and need > available:
        raise MemoryError(f"{family} {preset} at {hf['num_hidden_layers']} layers holds {need / 2**30:.1f} GiB of bf16 "
                          f"weights, more than this host's {available / 2**30:.1f} GiB available: run it on a GPU "
                          "(--device cuda), or here with --preset tiny or fewer --layers")


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    if len(a.impls) > 1:
        # one process per implementation: its peak memory is its own, and Unsloth's import-time patches stay in it
        args = list(sys.argv[1:] if argv is None else argv)
        rc = 0
        for impl in a.impls:
            rc |= subprocess.run([sys.executable, __file__, *args, "--impls", impl]).returncode
        return rc
    impl = a.impls[0]
    if impl == "jax_impl":  # its own loop: JAX's allocator, compilation and buffer donation differ from torch's
        return _main_jax(a)
    unsloth_error = None
    if impl == "unsloth":
        try:
            _import_unsloth()  # first, before anything imports transformers
        except ImportError as e:
            unsloth_error = (f"unsloth is not importable ({e}); install it (pip install unsloth), or on an offline "
                             "machine put its wheels on the path (benchmarks/gpu_session.sh's `wheels` step does, "
                             "from a .whl folder built by the workspace's shared/tools/unsloth-wheels.sh)")
    torch.backends.cuda.matmul.allow_tf32 = True
    hf = preset_hf_config(a.family, a.preset, a.layers)
    vocab = hf["vocab_size"]
    lora = LoraConfig(rank=a.rank, alpha=a.alpha, targets=ATTENTION_TARGETS[a.family] + EXPERT_TARGETS)
    base = dict(impl=impl, family=a.family, preset=a.preset, layers=hf["num_hidden_layers"], rank=a.rank,
                alpha=a.alpha, grad_ckpt=a.grad_ckpt, offload=a.offload and impl == "torch_impl",
                compile=a.compile and impl == "torch_impl",
                compile_mode=a.compile_mode if a.compile and impl == "torch_impl" else None,
                compile_cpp_wrapper=a.compile_cpp_wrapper and a.compile and impl == "torch_impl",
                checkpoint_policy=a.checkpoint_policy if impl == "torch_impl" else None,
                checkpoint_layers=a.checkpoint_layers if impl == "torch_impl" else None,
                expert_chunk=a.expert_chunk if impl == "torch_impl" else None,
                cuda_graph=a.cuda_graph and impl == "torch_impl",
                optim_in_backward=a.optim_in_backward and impl == "torch_impl",
                routing_stats=a.routing_stats and impl == "torch_impl",
                backend=a.backend if impl == "torch_impl" else None,
                hf_attn=a.hf_attn if impl == "hf_peft" else None, **versions())
    max_seq = a.max_seq if a.max_context else max(a.seqs)

    emit = _emitter(a)

    after_step = None
    try:
        if unsloth_error:
            raise ImportError(unsloth_error)
        if not a.device.startswith("cuda"):
            check_host_memory(hf, a.family, a.preset)
        if impl == "torch_impl":
            model, loss_fn = build_ours(hf, a.device, a.backend, lora, a.grad_ckpt, a.offload, a.compile,
                                        a.checkpoint_policy, a.expert_chunk, a.checkpoint_layers, compile_kwargs(a))
            if a.routing_stats:
                loss_fn, after_step = with_routing_stats(model, loss_fn)
        elif impl == "hf_peft":
            model, loss_fn = build_hf(hf, a.device, a.hf_attn, lora, a.grad_ckpt)
        else:
            workdir = a.workdir or Path("/dev/shm" if os.path.isdir("/dev/shm") else tempfile.gettempdir())
            model, loss_fn = build_unsloth(hf, a.family, a.device, lora, max_seq, workdir / "splitmoe_unsloth")
    except Exception as e:  # noqa: BLE001 - a row that cannot even build is recorded, not dropped
        emit({**base, "mode": "build", "seq": None, "step_ms": None, "peak_gib": None, "error": _error_text(e)})
        return 1
    ctx = graph_context(impl) if base["cuda_graph"] else None
    if ctx is not None and a.max_context:
        raise SystemExit("--max-context with --cuda-graph: a graph is captured per shape; time the lengths instead")
    one_step = argparse.Namespace(**{**vars(a), "warmup": 0, "iters": 1})
    # one untimed step first, so that the process's one-time work is in no measured step: the first length of a
    # process still carried it after a one-step warm-up on the H200 (gpt-oss 1K: 1325 ms, then 536 ms), and on an
    # H100 (session 22) a fresh process's first step at 196,608 tokens peaked 67.39 GiB where the same length probed
    # after earlier steps took 62.03, enough to fail a length that trains. Rows warm up at their shortest length, a
    # --max-context search at its start or MAX_CONTEXT_WARMUP_TOKENS, whichever is shorter
    warm = min(a.seqs[0], MAX_CONTEXT_WARMUP_TOKENS) if a.max_context else min(a.seqs)
    _try_step(model, loss_fn, warm, vocab, one_step, impl, None, None if a.max_context else after_step)
    if a.max_context:  # one step: does it train at S (its time includes first-call work at S's shapes)
        _search_max_context(a, base, emit, lambda S: _try_step(model, loss_fn, S, vocab, one_step, impl, None))
        return 0
    # a full-size row takes minutes (warm-up and timed steps at S tokens): a bar of the rows on a terminal
    for S in progress_bar(a.seqs, desc=f"{impl} rows", unit="row"):
        emit({**base, "mode": "step", "seq": S, **_try_step(model, loss_fn, S, vocab, a, impl, ctx, after_step)})
    if a.profile:
        name = f"step_{a.family}_{a.preset}_L{hf['num_hidden_layers']}_{impl}_S{a.seqs[0]}.txt"
        profile_step(model, loss_fn, a.seqs[0], vocab, a.device, a.profile / name, impl, a.optim_in_backward)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
