"""One LoRA training step of gpt-oss (random weights, no hub) in torch_impl next to HF transformers v5 + PEFT, in the
same command: step time (median, after warm-up) and peak memory, per context length (issue 8's H200 figures).

A step is forward with labels, backward, and AdamW on the LoRA parameters, batch 1 of S random tokens. LoRA:
rank 16 (alpha 32) on q/k/v/o and both expert tensors, B non-zero, for both implementations. Weights are random
(N(0, 0.02), biases 0.02·N) and built directly on the device in bf16; the two models are built one after the other,
so peak memory is per implementation. HF runs its default experts (grouped_mm) and `--hf-attn` attention (gpt-oss
supports eager, flash and flex, not SDPA); eager materialises [N, S, S] logits, so it runs out of memory at long S:
such rows are recorded as OOM, as the baseline's 16K was.

    python benchmarks/gpt_oss_step.py --preset 20b --seq 1024,4096,8192,16384 --out benchmarks/results/x.jsonl
    python benchmarks/gpt_oss_step.py --preset tiny --device cpu --seq 64 --iters 1   # smoke test
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import versions  # noqa: E402
from shared_math.config import LoraConfig, ModelConfig  # noqa: E402
from shared_math.tiny import tiny_hf_config  # noqa: E402

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "experts.gate_up_proj", "experts.down_proj")


def hf_config(preset: str, layers: int | None) -> dict:
    """config.json of gpt-oss-20b (hf-moe-formats.md §2) or the tiny preset; `layers` truncates the depth."""
    if preset == "tiny":
        hf = tiny_hf_config("gpt_oss")
    else:
        hf = dict(model_type="gpt_oss", architectures=["GptOssForCausalLM"], vocab_size=201088, hidden_size=2880,
                  intermediate_size=2880, num_hidden_layers=24, num_attention_heads=64, num_key_value_heads=8,
                  head_dim=64, num_local_experts=32, num_experts_per_tok=4, sliding_window=128,
                  rms_norm_eps=1e-5, attention_bias=True, swiglu_limit=7.0, router_aux_loss_coef=0.9,
                  max_position_embeddings=131072, tie_word_embeddings=False, initializer_range=0.02,
                  hidden_act="silu", attention_dropout=0.0, use_cache=False,
                  rope_parameters={"rope_type": "yarn", "rope_theta": 150000.0, "factor": 32.0, "beta_fast": 32.0,
                                   "beta_slow": 1.0, "original_max_position_embeddings": 4096, "truncate": False})
        if preset == "120b":
            hf.update(num_hidden_layers=36, num_local_experts=128)
    if layers:
        hf["num_hidden_layers"] = layers
    n = hf["num_hidden_layers"]
    hf["layer_types"] = ["sliding_attention" if l % 2 == 0 else "full_attention" for l in range(n)]
    return hf


@torch.no_grad()
def _randomise(model: torch.nn.Module) -> None:
    """In place, parameter by parameter (no second copy): weights N(0, 0.02), 1-D tensors 1 + / 0.02·N."""
    for name, p in model.named_parameters():
        if "lora_" in name:
            continue
        if name.endswith("norm.weight"):
            p.fill_(1.0)
        else:
            p.normal_(0.0, 0.02)


def _lora_b_nonzero(model: torch.nn.Module) -> None:
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:  # torch_impl: *.lora_B, *_lora_B; PEFT: lora_B.default.weight
                p.normal_(0.0, 0.01)


def build_ours(hf: dict, device: str, backend: str, lora: LoraConfig):
    from torch_impl.load import build_model
    from torch_impl.lora import attach_lora

    model = build_model(ModelConfig.from_hf(hf), dtype=torch.bfloat16, device=device, moe_backend=backend)
    _randomise(model)
    attach_lora(model, lora, seed=0)
    _lora_b_nonzero(model)

    def loss(ids):
        return model(ids, labels=ids).loss

    return model, loss


def build_hf(hf: dict, device: str, attn: str, lora: LoraConfig):
    import peft
    from transformers import AutoConfig, AutoModelForCausalLM

    kw = {k: v for k, v in hf.items() if k != "model_type"}
    config = AutoConfig.for_model("gpt_oss", **kw)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16, attn_implementation=attn)
    _randomise(model)
    pm = peft.get_peft_model(model, peft.LoraConfig(
        r=lora.rank, lora_alpha=lora.alpha, lora_dropout=0.0, target_modules=list(lora.module_targets),
        target_parameters=list(lora.expert_targets)))
    _lora_b_nonzero(pm)
    pm.train()

    def loss(ids):
        return pm(input_ids=ids, labels=ids, use_cache=False).loss

    return pm, loss


def measure(model, loss_fn, S: int, vocab: int, device: str, warmup: int, iters: int) -> dict:
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    ids = torch.randint(0, vocab, (1, S), device=device)
    cuda = device.startswith("cuda")

    def step():
        opt.zero_grad(set_to_none=True)
        loss_fn(ids).backward()
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


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="20b", choices=["20b", "120b", "tiny"])
    p.add_argument("--layers", type=int, default=None, help="truncate the depth (for quick checks)")
    p.add_argument("--seq", default="1024,4096,8192,16384")
    p.add_argument("--impls", default="torch_impl,hf_peft")
    p.add_argument("--backend", default="auto", help="torch_impl MoE backend")
    p.add_argument("--hf-attn", default="eager", help="HF attention: eager (the baseline), flex_attention, ...")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--out", type=Path, default=None, help="append one JSON line per row")
    a = p.parse_args(argv)
    torch.backends.cuda.matmul.allow_tf32 = True
    hf = hf_config(a.preset, a.layers)
    lora = LoraConfig(rank=16, alpha=32.0, targets=TARGETS)
    env = versions()
    rows = []
    for impl in a.impls.split(","):
        model, loss_fn = (build_ours(hf, a.device, a.backend, lora) if impl == "torch_impl"
                          else build_hf(hf, a.device, a.hf_attn, lora))
        for S in (int(s) for s in a.seq.split(",")):
            row = dict(impl=impl, preset=a.preset, layers=hf["num_hidden_layers"], seq=S, backend=a.backend,
                       hf_attn=a.hf_attn, **env)
            try:
                row.update(measure(model, loss_fn, S, hf["vocab_size"], a.device, a.warmup, a.iters))
            except torch.OutOfMemoryError as e:
                row.update(step_ms=None, peak_gib=None, error=f"OOM: {str(e)[:120]}")
            gc.collect()
            if a.device.startswith("cuda"):
                torch.cuda.empty_cache()
            print(json.dumps({k: row[k] for k in ("impl", "seq", "step_ms", "peak_gib") if k in row}), flush=True)
            rows.append(row)
            if a.out:
                a.out.parent.mkdir(parents=True, exist_ok=True)
                with a.out.open("a") as f:
                    f.write(json.dumps(row) + "\n")
        del model, loss_fn
        gc.collect()
        if a.device.startswith("cuda"):
            torch.cuda.empty_cache()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
