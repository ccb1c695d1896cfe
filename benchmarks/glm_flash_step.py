"""One LoRA training step of a GLM-4.7-Flash-sized model (`glm4_moe_lite`, ~30B, random weights, no hub) in torch_impl
next to HF transformers v5 + PEFT in the same command: step time (median after warm-up) and peak memory per context
length (issue 9's H200 figures).

A step is forward with labels, backward, and AdamW on the LoRA parameters, batch 1 of S random tokens. LoRA: rank 16
(alpha 32) on the MLA projections (q_a, q_b, kv_a_proj_with_mqa, kv_b, o) and both expert tensors, B non-zero, for
both implementations (PEFT cannot put LoRA on the dense/shared-expert Linears of this v5 model, so neither does ours
here). Weights are N(0, 0.02) built on the device in bf16, `e_score_correction_bias` N(0, 0.02) so routing is
group-limited as in training; the models are built one after the other, so peak memory is per implementation. HF runs
its default experts (grouped_mm) and `--hf-attn` attention (sdpa by default, as torch_impl uses SDPA).

    python benchmarks/glm_flash_step.py --seq 1024,2048,4096 --out benchmarks/results/glm_flash_step.jsonl
    python benchmarks/glm_flash_step.py --preset tiny --device cpu --seq 32 --iters 1 --warmup 0   # smoke test
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
from shared_math.config import EXPERT_TARGETS, LoraConfig, ModelConfig  # noqa: E402
from shared_math.tiny import tiny_hf_config  # noqa: E402

TARGETS = ("q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj") + EXPERT_TARGETS


def hf_config(preset: str, layers: int | None) -> dict:
    """config.json of GLM-4.7-Flash (hf-moe-formats.md §5) or the tiny preset; `layers` truncates the depth."""
    if preset == "tiny":
        hf = tiny_hf_config("glm4_moe_lite")
    else:
        hf = dict(model_type="glm4_moe_lite", architectures=["Glm4MoeLiteForCausalLM"], vocab_size=154880,
                  hidden_size=2048, num_hidden_layers=47, num_attention_heads=20, num_key_value_heads=20,
                  q_lora_rank=768, kv_lora_rank=512, qk_nope_head_dim=192, qk_rope_head_dim=64, v_head_dim=256,
                  n_routed_experts=64, n_shared_experts=1, num_experts_per_tok=4, moe_intermediate_size=1536,
                  intermediate_size=10240, routed_scaling_factor=1.8, n_group=1, topk_group=1, norm_topk_prob=True,
                  rope_interleave=True, attention_bias=False, rms_norm_eps=1e-5, max_position_embeddings=202752,
                  tie_word_embeddings=False, initializer_range=0.02, hidden_act="silu", attention_dropout=0.0,
                  use_cache=False, rope_parameters={"rope_type": "default", "rope_theta": 1000000.0})
    if layers:
        hf["num_hidden_layers"] = layers
    hf["mlp_layer_types"] = ["dense"] + ["sparse"] * (hf["num_hidden_layers"] - 1)
    return hf


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


def build_ours(hf: dict, device: str, backend: str, lora: LoraConfig):
    from torch_impl.load import build_model
    from torch_impl.lora import attach_lora

    model = build_model(ModelConfig.from_hf(hf), dtype=torch.bfloat16, device=device, moe_backend=backend)
    _randomise(model)
    attach_lora(model, lora, seed=0)
    _lora_b_nonzero(model)
    model.train()
    return model, lambda ids: model(ids, labels=ids).loss


def build_hf(hf: dict, device: str, attn: str, lora: LoraConfig):
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
    pm.train()
    return pm, lambda ids: pm(input_ids=ids, labels=ids, use_cache=False).loss


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
    p.add_argument("--preset", default="flash", choices=["flash", "tiny"])
    p.add_argument("--layers", type=int, default=None, help="truncate the depth (for quick checks)")
    p.add_argument("--seq", default="1024,2048,4096")
    p.add_argument("--impls", default="torch_impl,hf_peft")
    p.add_argument("--backend", default="auto", help="torch_impl MoE backend")
    p.add_argument("--hf-attn", default="sdpa", help="HF attention: sdpa, eager, flash_attention_2, ...")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--out", type=Path, default=None, help="append one JSON line per row")
    a = p.parse_args(argv)
    torch.backends.cuda.matmul.allow_tf32 = True
    hf = hf_config(a.preset, a.layers)
    lora = LoraConfig(rank=16, alpha=32.0, targets=TARGETS)
    env = versions()
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
