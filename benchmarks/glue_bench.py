"""The glue of a decoder layer, forward + backward, the ways torch_impl could run it (what the whole-step profile
calls `copy_`, `mul` and the elementwise kernels), at the Qwen3-30B-A3B shapes:

- `norm_hidden` (RMSNorm of [S, 2048]) and `norm_qk` (per-head q-norm of [S, 32, 128]), Llama rounding (statistics
  in fp32, rounded, times the weight): `eager` (torch_impl.models.layers.RMSNorm), `compiled` (the same through
  torch.compile), `liger` (Liger-Kernel's fused RMSNorm, casting_mode="llama"), and `torch_rms_norm`
  (F.rms_norm: fused, but the weight is multiplied before the rounding, so not HF's numbers; for reference);
- `rope` (q [1, 32, S, 128], k [1, 4, S, 128]): `eager` (layers.apply_rotary), `compiled`, `liger` (in place);
- `lora_linear` (q_proj 2048 -> 4096 with r=64, fp32 LoRA branch): `literal` (the branch cast up, scaled, added,
  cast down: four elementwise kernels) and `fused_add` (torch_impl.lora.LoRALinear: one mixed-dtype in-place add);
- `lora_a_cast` (once, not per S: an fp32 LoRA-A factor [E, D, R] of Qwen3-30B-A3B and gpt-oss-20b cast to bf16 and
  stored reduction-major, as every expert call does with both A factors): `copy_` (`Tensor.copy_` between the
  layouts) and `kernel` (torch_impl.kernels.layout); forward only, its `ms` per cast.

Each row: median ms of forward + backward (CUDA events; the input is made by one multiply in every variant so that
it is not a leaf), and the largest difference of the output from the eager row in units of the output's bf16
spacing (0 = the same bits).

    python3 benchmarks/glue_bench.py --seq 4096,16384 --out results/glue.jsonl
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from benchmarks.common import time_cuda, versions, write_jsonl  # noqa: E402
from torch_impl.models.layers import RMSNorm, apply_rotary  # noqa: E402


def _ulps(out: torch.Tensor, ref: torch.Tensor) -> float:
    """max |out - ref| in units of ref's bf16 spacing at each element (2^(exponent - 7))."""
    ref32, out32 = ref.float(), out.float()
    spacing = torch.ldexp(torch.ones_like(ref32), torch.frexp(ref32.abs().clamp_min(1e-30))[1] - 8)
    return float(((out32 - ref32).abs() / spacing).max())


def norm_variants(shape: tuple[int, ...], device: str) -> dict:
    dim = shape[-1]
    norm = RMSNorm(dim, 1e-6, dtype=torch.bfloat16, device=device)
    with torch.no_grad():
        norm.weight.normal_(1.0, 0.1)
    variants = {"eager": norm, "torch_rms_norm": lambda x: F.rms_norm(x, (dim,), norm.weight, 1e-6)}
    if device == "cuda":
        variants["compiled"] = torch.compile(norm.forward, dynamic=False)
        try:
            from liger_kernel.ops.rms_norm import LigerRMSNormFunction

            variants["liger"] = lambda x: LigerRMSNormFunction.apply(x, norm.weight, 1e-6, 0.0, "llama", False)
        except ImportError:
            pass
    return variants


def rope_variants(device: str) -> dict:
    variants = {"eager": apply_rotary}
    if device == "cuda":
        variants["compiled"] = torch.compile(apply_rotary, dynamic=False)
        try:
            from liger_kernel.ops.rope import LigerRopeFunction

            variants["liger"] = lambda q, k, c, s: LigerRopeFunction.apply(q, k, c, s)
        except ImportError:
            pass
    return variants


def lora_variants() -> dict:
    def literal(x, w, a, b, s):
        y = x @ w
        delta = (x.to(a.dtype) @ a) @ b
        return (y.to(delta.dtype) + s * delta).to(x.dtype)

    def fused_add(x, w, a, b, s):
        y = x @ w
        delta = (x.to(a.dtype) @ a) @ b
        return y.add_(delta, alpha=s)

    return {"literal": literal, "fused_add": fused_add}


def run_case(name: str, variants: dict, make_inputs, device: str, iters: int) -> list[dict]:
    """Forward + backward of each variant on the same inputs; the first variant is the reference."""
    rows, ref = [], None
    leaves, grads = make_inputs()
    for vname, fn in variants.items():
        def fwd(fn=fn):
            xs = [t * 1 for t in leaves]  # not leaves: the in-place variants may write into them
            out = fn(*xs)
            return out if isinstance(out, tuple) else (out,)

        def step(fwd=fwd):
            outs = fwd()
            torch.autograd.backward(outs, grads[:len(outs)])
            for t in leaves:
                t.grad = None

        try:
            outs = [o.detach() for o in fwd()]
            ms = time_cuda(step, warmup=3, iters=iters) if device == "cuda" else float("nan")
            err = None if ref is None else max(_ulps(o, r) for o, r in zip(outs, ref))
            ref = ref or outs
            rows.append(dict(case=name, variant=vname, ms=ms, max_ulps_vs_first=err))
        except Exception as e:  # noqa: BLE001 - a variant that fails is recorded, not dropped
            rows.append(dict(case=name, variant=vname, ms=None, error=f"{type(e).__name__}: {str(e)[:200]}"))
    return rows


def cases_at(S: int, dev: str, rnd) -> list[tuple[str, dict, object]]:
    """(case, variants, make_inputs) at S tokens; `rnd(*shape, dtype=, scale=, grad=)` draws a tensor."""
    bf = torch.bfloat16
    cases = [
        ("norm_hidden", norm_variants((S, 2048), dev), lambda: ([rnd(S, 2048)], [rnd(S, 2048, grad=False)])),
        ("norm_qk", norm_variants((1, S, 32, 128), dev),
         lambda: ([rnd(1, S, 32, 128)], [rnd(1, S, 32, 128, grad=False)])),
    ]
    pos = torch.arange(S, device=dev, dtype=torch.float32)
    inv = 1.0 / (1e6 ** (torch.arange(0, 128, 2, device=dev, dtype=torch.float32) / 128))
    emb = torch.cat([pos[:, None] * inv, pos[:, None] * inv], -1)[None]
    cos, sin = emb.cos().to(bf), emb.sin().to(bf)

    def with_tables(f):
        return lambda q, k: f(q, k, cos, sin)

    cases.append(("rope", {k: with_tables(f) for k, f in rope_variants(dev).items()},
                  lambda: ([rnd(1, 32, S, 128), rnd(1, 4, S, 128)],
                           [rnd(1, 32, S, 128, grad=False), rnd(1, 4, S, 128, grad=False)])))
    w = rnd(2048, 4096, scale=0.02, grad=False)
    A = rnd(2048, 64, dtype=torch.float32, scale=0.02)
    B = rnd(64, 4096, dtype=torch.float32, scale=0.01)

    def with_weights(f):
        return lambda x: f(x, w, A, B, 2.0)

    cases.append(("lora_linear", {k: with_weights(f) for k, f in lora_variants().items()},
                  lambda: ([rnd(S, 2048)], [rnd(S, 4096, grad=False)])))
    return cases


def cast_rows(dev: str, iters: int) -> list[dict]:
    """`lora_a_cast`: grouped_gemm.reduction_major by copy_ and by the kernel, at the A-factor shapes of a layer."""
    from torch_impl.kernels import grouped_gemm as gg

    rows = []
    for E, D in ((128, 2048), (128, 768), (32, 2880)):  # Qwen3 A1, A2; gpt-oss A1 = A2
        src = torch.randn(E, D, 64, device=dev)
        outs = {}
        for variant, kernel in (("copy_", False), ("kernel", True)):
            try:
                outs[variant] = gg.reduction_major(src, torch.bfloat16, kernel=kernel)
                def cast(src=src, kernel=kernel):
                    return gg.reduction_major(src, torch.bfloat16, kernel=kernel)

                ms = time_cuda(cast, warmup=3, iters=iters) if dev == "cuda" else float("nan")
                same = None if variant == "copy_" else bool(torch.equal(outs[variant], outs["copy_"]))
                rows.append(dict(case=f"lora_a_cast_{E}x{D}x64", variant=variant, ms=ms, bitwise_equal=same))
            except Exception as e:  # noqa: BLE001 - a variant that fails is recorded, not dropped
                rows.append(dict(case=f"lora_a_cast_{E}x{D}x64", variant=variant, ms=None,
                                 error=f"{type(e).__name__}: {str(e)[:200]}"))
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seq", default="4096,16384")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--out", type=Path, default=None)
    a = p.parse_args(argv)
    dev, bf = a.device, torch.bfloat16
    g = torch.Generator(device=dev).manual_seed(0)

    def rnd(*shape, dtype=bf, scale=1.0, grad=True):
        return (torch.randn(*shape, generator=g, device=dev, dtype=torch.float32) * scale).to(dtype) \
            .requires_grad_(grad)

    rows = []
    gpu = torch.cuda.get_device_name() if dev == "cuda" else "cpu"

    def emit(row: dict) -> None:
        print(json.dumps({k: row[k] for k in ("seq", "case", "variant", "ms", "max_ulps_vs_first", "bitwise_equal",
                                              "error") if k in row}), flush=True)
        rows.append(row)

    for r in cast_rows(dev, a.iters):
        emit({**versions(), "seq": None, **r, "gpu": gpu})
    for S in [int(s) for s in a.seq.split(",")]:
        cases = cases_at(S, dev, rnd)
        for name, variants, make in cases:
            for r in run_case(name, variants, make, dev, a.iters):
                emit({**versions(), "seq": S, **r, "gpu": gpu})
    if a.out:
        write_jsonl(a.out, rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
