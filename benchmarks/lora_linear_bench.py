"""One layer's attention LoRA (q, k, v through `layers.project`, then o) forward + backward with the torch ops against
the fused kernels (`torch_impl.kernels.lora_linear`, SPLITMOE_LORA_LINEAR=triton), at a full-size model's widths.

The step profiles of session 15 put the fp32 LoRA branch of the attention projections (PEFT's rounding points: x cast
to fp32, z @ B written in fp32, added and rounded in another kernel; the backward's fp32 copy of dy) at about 6 % of
Qwen3-30B-A3B's 16K step. This times what the fused path changes, projection GEMMs included, so the difference is
what a layer's forward + backward gains (a checkpointed step runs the forward twice: add one more forward's share).

    python3 benchmarks/lora_linear_bench.py --family qwen3_moe,gpt_oss --seq 4096,16384 [--ops] --out ll.jsonl
Prints one line per (family, seq, mode): ms, peak extra memory, and the ratio to the torch ops; with --ops, each
piece of one projection's branch alone as well (q_proj's widths; `--ops-proj q,k,v,o` for each projection's). On the CPU
(`--device cpu --preset tiny`, under TRITON_INTERPRET=1) it checks the two modes against each other instead of timing.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import versions, write_jsonl  # noqa: E402

PRESET = {"qwen3_moe": "30b-a3b", "gpt_oss": "20b"}
MODES = ("torch", "triton")
PROJECTIONS = ("q", "k", "v", "o")


def projection_widths(hf: dict, proj: str) -> tuple[int, int]:
    """(in, out) features of one attention projection of an HF config: q/k/v read the hidden state, o writes it."""
    H = hf["hidden_size"]
    head_dim = hf.get("head_dim") or H // hf["num_attention_heads"]
    n_q = hf["num_attention_heads"] * head_dim
    n_kv = hf.get("num_key_value_heads", hf["num_attention_heads"]) * head_dim
    return {"q": (H, n_q), "k": (H, n_kv), "v": (H, n_kv), "o": (n_q, H)}[proj]


def attention_projections(family: str, preset: str, rank: int, alpha: float, device: str):
    """q, k, v, o LoRALinears at the preset's widths (bf16 weights, fp32 factors, B random so the LoRA term is live)
    and the widths (H, q out, kv out)."""
    import torch

    from shared_math.presets import preset_hf_config
    from torch_impl.lora import LoRALinear
    from torch_impl.models.layers import Linear

    hf = preset_hf_config(family, preset)
    widths = [projection_widths(hf, proj) for proj in PROJECTIONS]
    g = torch.Generator(device=device).manual_seed(0)

    def lora_linear(n_in, n_out):
        base = Linear(n_in, n_out, bias=bool(hf.get("attention_bias")), dtype=torch.bfloat16, device=device)
        with torch.no_grad():
            base.weight.normal_(0.0, 0.02, generator=g)
            if base.bias is not None:
                base.bias.normal_(0.0, 0.02, generator=g)
        m = LoRALinear(base, rank, alpha / rank)
        with torch.no_grad():
            m.lora_B.normal_(0.0, 0.02, generator=g)
        return m

    (H, nq), (_, nkv) = widths[0], widths[1]
    return [lora_linear(n_in, n_out) for n_in, n_out in widths], (H, nq, nkv)


def layer_step(projs, x, attn_in, grads):
    """Forward + backward of the four projections as a decoder layer runs them (q, k, v share x's LoRA input)."""
    import torch

    from torch_impl.models.layers import project

    q, k, v = project(x, *projs[:3])
    o = projs[3](attn_in)
    torch.autograd.backward([q, k, v, o], grads)


def run(family: str, seq: int, preset: str, device: str, rank: int, alpha: float, warmup: int, iters: int
        ) -> list[dict]:
    import torch

    from benchmarks.common import peak_extra_bytes, time_cuda
    from shared_math.numerics import assert_close

    projs, (H, nq, nkv) = attention_projections(family, preset, rank, alpha, device)
    g = torch.Generator(device=device).manual_seed(1)

    def rand(*shape):
        return torch.randn(*shape, generator=g, device=device).to(torch.bfloat16)

    x = rand(1, seq, H).requires_grad_(True)
    attn_in = rand(1, seq, nq).requires_grad_(True)
    grads = [rand(1, seq, nq), rand(1, seq, nkv), rand(1, seq, nkv), rand(1, seq, H)]
    params = [x, attn_in] + [p for m in projs for p in (m.lora_A, m.lora_B)]
    rows, base_ms, results = [], None, {}
    for mode in MODES:
        os.environ["SPLITMOE_LORA_LINEAR"] = mode
        for p in params:
            p.grad = None
        layer_step(projs, x, attn_in, grads)
        results[mode] = [p.grad.clone() for p in params]
        # versions() names the GPU as "device" on CUDA: the run's device type is "on" (a repeated keyword argument
        # stopped this script on its first GPU run, session 20)
        row = dict(family=family, preset=preset, seq=seq, rank=rank, mode=mode, on=device) | versions()
        if device == "cuda":
            def step():
                for p in params:
                    p.grad = None
                layer_step(projs, x, attn_in, grads)

            row["ms"] = time_cuda(step, warmup=warmup, iters=iters)
            row["peak_extra_gib"] = peak_extra_bytes(step) / 2**30
            base_ms = base_ms or row["ms"]
            row["vs_torch"] = row["ms"] / base_ms
        rows.append(row)
        print(f"{family} seq={seq} {mode:6s} " + (f"{row['ms']:.3f} ms ({row['vs_torch']:.3f}x torch), peak extra "
              f"{row['peak_extra_gib']:.2f} GiB" if "ms" in row else "ran"), flush=True)
    os.environ.pop("SPLITMOE_LORA_LINEAR", None)
    # the two modes compute the same sums: gradients equal up to fp32 round-off (TF32 on a GPU: bf16's tolerance)
    dtype = "bfloat16" if device == "cuda" and torch.backends.cuda.matmul.allow_tf32 else "float32"
    for name, a, e in zip(["x", "attn_in"] + [f"{n}.{w}" for n in "qkvo" for w in ("A", "B")], *results.values()):
        quantity = "moe_grad" if e.dtype == torch.float32 else "moe_block"
        assert_close(a, e, dtype=dtype if e.dtype == torch.float32 else "bfloat16", quantity=quantity, name=name)
    return rows


def op_rows(family: str, seq: int, preset: str, device: str, rank: int, alpha: float, warmup: int, iters: int,
            proj: str = "q") -> list[dict]:
    """The four pieces of one projection's LoRA branch (`proj`'s widths) timed alone, the torch ops against the
    kernels: z = x @ A, y + s·z @ B, its backward (dz, dB) and lora_z's (dx, dA). What to tune if the layer rows
    disappoint: session 20 found each piece at q_proj's widths 0.37-0.58x the torch ops' time on the H100 while the
    whole layer ran at 1.04x on Qwen3-30B-A3B, so the other projections' widths are the suspects. On the CPU each
    piece runs once both ways and is compared instead."""
    import torch

    from benchmarks.common import time_cuda
    from shared_math.numerics import assert_close
    from shared_math.presets import preset_hf_config
    from torch_impl.kernels import lora_linear as ll

    hf = preset_hf_config(family, preset)
    H, N = projection_widths(hf, proj)  # H: the branch's input width here, N its output width
    g = torch.Generator(device=device).manual_seed(2)

    def rand(*shape, scale=1.0):
        return torch.randn(*shape, generator=g, device=device) * scale

    x, y, dy = rand(seq, H).to(torch.bfloat16), rand(seq, N).to(torch.bfloat16), rand(seq, N).to(torch.bfloat16)
    a, b, z = rand(H, rank, scale=H ** -0.5), rand(rank, N, scale=0.02), rand(seq, rank)
    s = alpha / rank
    pieces = {
        "z = x @ A": (lambda: x.to(torch.float32) @ a, lambda: ll.lora_z_forward(x, a)),
        "y + s z @ B": (lambda: y.add(z @ b, alpha=s), lambda: ll.lora_add_forward(y, z, b, s)),
        "dz, dB": (lambda: ((dy.float() * s) @ b.T, z.T @ (dy.float() * s)), lambda: ll.lora_add_backward(dy, z, b, s)),
        "dx, dA": (lambda: ((z @ a.T).to(torch.bfloat16), x.float().T @ z), lambda: ll.lora_z_backward(z, x, a)),
    }
    rows = []
    for name, (plain, fused) in pieces.items():
        if device != "cuda":
            for want, got in zip(*((f(),) if name.startswith(("z", "y")) else f() for f in (plain, fused))):
                assert_close(got, want, dtype="bfloat16", quantity="moe_block", name=name)
            print(f"{family} seq={seq} {proj}_proj {name:12s} agrees", flush=True)
            continue
        ms = [time_cuda(fn, warmup=warmup, iters=iters) for fn in (plain, fused)]
        rows.append(dict(family=family, preset=preset, seq=seq, rank=rank, proj=proj, in_features=H,
                         out_features=N, piece=name, torch_ms=ms[0], triton_ms=ms[1], **versions()))
        print(f"{family} seq={seq} {proj}_proj ({H} -> {N}) {name:12s} torch {ms[0]:.3f} ms, triton {ms[1]:.3f} ms "
              f"({ms[1] / ms[0]:.2f}x)", flush=True)
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--family", default="qwen3_moe,gpt_oss")
    p.add_argument("--seq", default="4096,16384")
    p.add_argument("--preset", default=None, help="a preset of each family (default: its full-size one); tiny on CPU")
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    p.add_argument("--rank", type=int, default=64)
    p.add_argument("--alpha", type=float, default=128.0)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--ops", action="store_true", help="also time the branch's four pieces alone (at the widths of "
                   "--ops-proj), the torch ops against the kernels (on the CPU: compare them)")
    p.add_argument("--ops-proj", default="q", help="comma-separated projections for --ops: q, k, v, o (default q)")
    p.add_argument("--out", type=Path, default=None)
    a = p.parse_args(argv)
    import torch

    if a.device == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True  # as benchmarks/step.py runs every implementation
    elif os.environ.get("TRITON_INTERPRET") != "1":
        p.error("--device cpu runs the kernels in the Triton interpreter: set TRITON_INTERPRET=1")
    projs = a.ops_proj.split(",")
    if any(pr not in PROJECTIONS for pr in projs):
        p.error(f"--ops-proj {a.ops_proj!r}: choose from {', '.join(PROJECTIONS)}")
    rows = []
    t0 = time.time()
    for family in a.family.split(","):
        for seq in (int(s) for s in a.seq.split(",")):
            rows += run(family, seq, a.preset or PRESET[family], a.device, a.rank, a.alpha, a.warmup, a.iters)
            for proj in projs if a.ops else ():
                rows += op_rows(family, seq, a.preset or PRESET[family], a.device, a.rank, a.alpha, a.warmup,
                                a.iters, proj)
    if a.out:
        write_jsonl(a.out, rows)
    print(f"done in {time.time() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
