"""Attention of a training step, forward + backward, the ways torch_impl could run it (GPU, bf16, one command):

Qwen3-30B-A3B shape (32 query heads, 4 kv heads, head dim 128, causal):
- `repeat_sdpa`: K and V repeated to 32 heads, then SDPA (what torch_impl and HF do), default backend choice;
- `gqa_sdpa`: SDPA with `enable_gqa=True` (no repeated K/V), default backend choice;
- `repeat_<backend>` / `gqa_<backend>`: the same with one SDPA backend forced (flash, cudnn, efficient);
- `gqa_flex`: FlexAttention (compiled) with a causal block mask and GQA.
gpt-oss-20b shape (64 / 8 heads, head dim 64, a learned sink per head; full layers and 128-token sliding layers):
- `sink_sdpa`: torch_impl's `sink_attention` (since 2026-12-06 the log-sum-exp rescale of the plain kernels at head
  width 64 with the 8 kv heads read as they are, `torch_impl.models.lse_attention`: cuDNN on full layers, the flash
  kernel's window on sliding ones);
- `sink_padded`: its earlier form, K and V repeated to 64 heads and the sink as an extra key of head width 64 + 8
  through SDPA (sliding layers in query blocks), still what a masked batch runs;
- `sink_flex`: FlexAttention with the window in the block mask and the sink by the log-sum-exp rescale
  `out · sigmoid(lse − sink)`.
MLA shapes (`--models mla_deepseek_v3,mla_glm47_flash`: q/k width 192 or 256, v width 128 or 256, 128 or 20 heads):
- `mla_sdpa` (what torch_impl runs), `mla_<backend>` forced, and `mla_v_padded[_<backend>]` with v zero-padded to the
  q/k width (for a kernel that wants one head width; the output sliced back).
Each row: median ms of forward + backward (CUDA events), TFLOP/s over the causal (or windowed) FLOPs, peak extra
memory, and the relative L2 error of out and dq against a float32 literal softmax on a slice of the heads.

    python3 benchmarks/attention_bench.py --seq 4096,16384 --out results/attention.jsonl
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch.nn.attention import SDPBackend, sdpa_kernel  # noqa: E402

from benchmarks.common import peak_extra_bytes, time_cuda, versions, write_jsonl  # noqa: E402

BACKENDS = {"flash": SDPBackend.FLASH_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION,
            "efficient": SDPBackend.EFFICIENT_ATTENTION}


def literal(q, k, v, sinks=None, window=None):
    """float32 softmax(q·kᵀ/sqrt(D) + causal/window mask [| sink]) · v, with K/V repeated per query head."""
    q, k, v = q.float(), k.float(), v.float()
    rep = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
    S = q.shape[2]
    s = q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5
    i, j = torch.arange(S, device=q.device)[:, None], torch.arange(S, device=q.device)[None, :]
    allowed = j <= i if window is None else (j <= i) & (j > i - window)
    s = s.masked_fill(~allowed, float("-inf"))
    if sinks is not None:
        s = torch.cat([sinks.float().view(1, -1, 1, 1).expand(*s.shape[:-1], 1), s], dim=-1)
        return torch.softmax(s, -1)[..., 1:] @ v
    return torch.softmax(s, -1) @ v


def kv_heads_of(n: int, heads: int, kv_heads: int) -> list[int]:
    """The kv head of each of the first `n` query heads, as grouped-query attention pairs them (query head i reads
    kv head i // (heads // kv_heads)), listed once each: `literal` repeats them back to the n query heads."""
    group = heads // kv_heads
    return sorted({i // group for i in range(n)})


def _forced(fn, backend):
    """`fn(q, k, v)` with SDPA restricted to one backend (an error row where that backend refuses the shape)."""
    def run(q, k, v):
        with sdpa_kernel(backend):
            return fn(q, k, v)
    return run


def qwen_variants():
    out = {}

    def repeat(q, k, v):
        rep = q.shape[1] // k.shape[1]
        return F.scaled_dot_product_attention(q, k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1),
                                              is_causal=True)

    def gqa(q, k, v):
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)

    out["repeat_sdpa"], out["gqa_sdpa"] = repeat, gqa
    for name, be in BACKENDS.items():
        out[f"repeat_{name}"], out[f"gqa_{name}"] = _forced(repeat, be), _forced(gqa, be)

    def flex(q, k, v):
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention

        S = q.shape[2]
        mask = create_block_mask(lambda b, h, qi, ki: ki <= qi, None, None, S, S, device=q.device)
        return torch.compile(flex_attention)(q, k, v, block_mask=mask, enable_gqa=True)

    out["gqa_flex"] = flex
    return out


def mla_variants():
    """MLA (DeepSeek-V3: q/k width 192, v width 128; GLM-4.7-Flash: 256 and 256), causal, one kv head per query head:
    SDPA's own choice, each backend forced, and v zero-padded to the q/k width (a kernel that wants one head width;
    the output sliced back)."""
    def sdpa(q, k, v):
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)

    def padded(q, k, v):
        Dv = v.shape[-1]
        return F.scaled_dot_product_attention(q, k, F.pad(v, [0, q.shape[-1] - Dv]), is_causal=True)[..., :Dv]

    out = {"mla_sdpa": sdpa, "mla_v_padded": padded}
    for name, be in BACKENDS.items():
        out[f"mla_{name}"], out[f"mla_v_padded_{name}"] = _forced(sdpa, be), _forced(padded, be)
    return out


def gpt_oss_variants(window):
    from torch_impl.models.gpt_oss import _sink_attention_padded, sink_attention

    def sdpa(q, k, v, sinks):
        return sink_attention(q, k, v, sinks, None, q.shape[-1] ** -0.5, window)

    def padded(q, k, v, sinks):
        return _sink_attention_padded(q, k, v, sinks, None, q.shape[-1] ** -0.5, window)

    def flex(q, k, v, sinks):
        from torch.nn.attention.flex_attention import AuxRequest, create_block_mask, flex_attention

        S = q.shape[2]
        if window is None:
            mask_mod = lambda b, h, qi, ki: ki <= qi  # noqa: E731
        else:
            mask_mod = lambda b, h, qi, ki: (ki <= qi) & (ki > qi - window)  # noqa: E731
        mask = create_block_mask(mask_mod, None, None, S, S, device=q.device)
        out, aux = torch.compile(flex_attention)(q, k, v, block_mask=mask, enable_gqa=True,
                                                 return_aux=AuxRequest(lse=True))
        # the sink joins each softmax row: out · Σexp(s) / (Σexp(s) + exp(sink)) = out · sigmoid(lse − sink)
        return out * torch.sigmoid(aux.lse - sinks.float().view(1, -1, 1)).unsqueeze(-1).to(out.dtype)

    return {"sink_sdpa": sdpa, "sink_padded": padded, "sink_flex": flex}


def bench(model, fn, q, k, v, extra, iters, flops):
    row = {}
    qq = q.clone().requires_grad_()
    kk, vv = k.clone().requires_grad_(), v.clone().requires_grad_()
    go = torch.randn(*q.shape[:-1], v.shape[-1], device=q.device, dtype=q.dtype)  # MLA: Dv may differ from D

    def step():
        qq.grad = kk.grad = vv.grad = None
        fn(qq, kk, vv, *extra).backward(go)

    out = fn(qq, kk, vv, *extra)
    (dq,) = torch.autograd.grad(out, (qq,), go)
    # accuracy on 2 query heads (and their kv heads): the literal softmax is O(S²) memory
    h = slice(0, 2)
    ql = q[:, h].float().requires_grad_()
    kv = kv_heads_of(2, q.shape[1], k.shape[1])
    ref = literal(ql, k[:, kv], v[:, kv], *([extra[0][h]] if extra else []),
                  **({"window": model["window"]} if extra else {}))
    (rdq,) = torch.autograd.grad(ref, (ql,), go[:, h].float())
    row["out_rel_l2"] = float((out[:, h].float() - ref).norm() / ref.norm())
    row["dq_rel_l2"] = float((dq[:, h].float() - rdq).norm() / rdq.norm())
    del out, dq, ref, rdq, ql
    row["ms"] = time_cuda(step, warmup=2, iters=iters)
    row["peak_extra_gib"] = peak_extra_bytes(step) / 2**30
    row["tflops"] = flops / (row["ms"] * 1e-3) / 1e12
    return row


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seq", default="4096,16384")
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("--models", default="qwen3_30b,gpt_oss_20b_full,gpt_oss_20b_sliding",
                   help="comma-separated subset of the shapes")
    p.add_argument("--impls", default=None, help="comma-separated subset of the variants (default: all)")
    a = p.parse_args(argv)
    env = versions()
    g = torch.Generator(device="cuda").manual_seed(0)
    models = [dict(model="qwen3_30b", N=32, Nkv=4, D=128, window=None),
              dict(model="gpt_oss_20b_full", N=64, Nkv=8, D=64, window=None),
              dict(model="gpt_oss_20b_sliding", N=64, Nkv=8, D=64, window=128),
              dict(model="mla_deepseek_v3", N=128, Nkv=128, D=192, Dv=128, window=None),
              dict(model="mla_glm47_flash", N=20, Nkv=20, D=256, Dv=256, window=None)]
    wanted = set(a.models.split(","))
    if unknown := wanted - {m["model"] for m in models}:
        p.error(f"unknown --models {sorted(unknown)}; choose from {[m['model'] for m in models]}")
    models = [m for m in models if m["model"] in wanted]
    for S in (int(s) for s in a.seq.split(",")):
        for m in models:
            q = torch.randn(1, m["N"], S, m["D"], device="cuda", generator=g, dtype=torch.bfloat16)
            k = torch.randn(1, m["Nkv"], S, m["D"], device="cuda", generator=g, dtype=torch.bfloat16)
            Dv = m.get("Dv", m["D"])
            v = torch.randn(1, m["Nkv"], S, Dv, device="cuda", generator=g, dtype=torch.bfloat16)
            keys = S * (S + 1) / 2 if m["window"] is None else S * min(m["window"], S)
            flops = 2 * m["N"] * (m["D"] + Dv) * keys * 3.5  # fwd QKᵀ + PV (2 GEMMs), bwd 2.5x the forward
            if m["model"] == "qwen3_30b":
                variants, extra = qwen_variants(), ()
            elif m["model"].startswith("mla_"):
                variants, extra = mla_variants(), ()
            else:
                variants = gpt_oss_variants(m["window"])
                extra = (torch.randn(m["N"], device="cuda", generator=g).to(torch.bfloat16),)
            for name, fn in variants.items():
                if a.impls and name not in a.impls.split(","):
                    continue
                row = dict(model=m["model"], impl=name, seq=S, **env)
                try:
                    row.update(bench(m, fn, q, k, v, extra, a.iters, flops))
                except Exception as e:  # noqa: BLE001 - an unsupported variant is a row with its error
                    oom = isinstance(e, torch.OutOfMemoryError)
                    row["error"] = "OOM" if oom else f"{type(e).__name__}: {str(e)[:160]}"
                torch.cuda.empty_cache()
                print(json.dumps({k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items()
                                  if k in ("model", "impl", "seq", "ms", "tflops", "peak_extra_gib", "out_rel_l2",
                                           "dq_rel_l2", "error")}), flush=True)
                if a.out:
                    write_jsonl(a.out, [row])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
