"""The causal-LM loss of a training step, forward + backward, four ways in one command (GPU, bf16):

- `materialised`: HF's path, `logits = h @ W` (bf16 [S, V]), `.float()`, F.cross_entropy (what torch_impl did);
- `splitmoe`: `torch_impl.loss.fused_linear_cross_entropy` (chunked torch, no logits);
- `splitmoe_triton`: the same chunk loop with its own loss kernel per chunk (`impl="triton"`);
- `liger`: Liger-Kernel's `LigerFusedLinearCrossEntropyLoss` (Triton);
- `cce`: Apple's cut-cross-entropy `linear_cross_entropy` (Triton; what Unsloth installs).

Per row: median ms (CUDA events) of loss + dh (the frozen output weight gets no gradient, as in every recipe here),
peak extra memory over the inputs, and the loss and dh of each against the materialised path computed in fp32 from
the same bf16 inputs (relative L2; the chunk loop in fp32 where that does not fit, named in `reference`). An
implementation that is not installed or fails gets a row with its error.

    python3 benchmarks/loss_bench.py --seq 4096,16384,65536 --hidden 2048 --vocab 151936 --out results/loss.jsonl
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from benchmarks.common import peak_extra_bytes, time_cuda, versions, write_jsonl  # noqa: E402
from torch_impl.loss import default_chunk_rows, fused_linear_cross_entropy, shift_labels  # noqa: E402


def _materialised(h, w_VH, labels):
    logits = h @ w_VH.t()
    return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), shift_labels(labels).reshape(-1))


def _splitmoe(h, w_VH, labels, chunk_rows=None):
    return fused_linear_cross_entropy(h, w_VH, labels, weight_is_HV=False, chunk_rows=chunk_rows)


def _splitmoe_triton(h, w_VH, labels, chunk_rows=None):
    return fused_linear_cross_entropy(h, w_VH, labels, weight_is_HV=False, impl="triton", chunk_rows=chunk_rows)


# the implementations whose chunk size --chunk-rows sets (the others have their own) -> torch_impl.loss's impl name
CHUNKED = {"splitmoe": "chunked", "splitmoe_triton": "triton"}


def _liger():
    from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

    fn = LigerFusedLinearCrossEntropyLoss(ignore_index=-100)
    # Liger takes (lin_weight [V, H], input [N, H], target [N]); the shift is the caller's, as in HF's integration
    return lambda h, w_VH, labels: fn(w_VH, h.reshape(-1, h.shape[-1]), shift_labels(labels).reshape(-1))


def _cce():
    from cut_cross_entropy import linear_cross_entropy

    return lambda h, w_VH, labels: linear_cross_entropy(h, w_VH, labels, shift=True, reduction="mean")


def _reference(h, w_VH, labels):
    """-> (loss, dh, name): the fp32 loss and gradient from the same bf16 inputs, by the materialised path, or where
    its [S, V] fp32 logits and their gradient do not fit (64K tokens: 37 GiB each at V = 151,936; it ran out of
    memory on an H100 in session 13) by the chunk loop in fp32, which equals it to fp32 rounding (the float64 oracle
    tests of tests/torch/test_fused_loss.py hold both to that)."""
    for name in ("materialised_fp32", "chunked_fp32"):
        h32 = h.float().requires_grad_()
        try:
            if name == "materialised_fp32":
                ref = _materialised(h32, w_VH.float(), labels)
            else:
                ref = fused_linear_cross_entropy(h32, w_VH.float(), labels, weight_is_HV=False, impl="chunked")
            (ref_dh,) = torch.autograd.grad(ref, (h32,))
            return ref.detach(), ref_dh, name
        except torch.OutOfMemoryError:
            pass  # the handled exception's traceback holds the failed attempt's tensors until the handler ends
        del h32
        torch.cuda.empty_cache()
    raise torch.OutOfMemoryError("neither fp32 reference fits on this device")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seq", default="4096,16384,65536")
    p.add_argument("--hidden", type=int, default=2048)
    p.add_argument("--vocab", type=int, default=151936)
    p.add_argument("--impls", default="materialised,splitmoe,splitmoe_triton,liger,cce")
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--chunk-rows", default="0",
                   help="comma-separated rows per chunk for the splitmoe implementations, a row each (0: the "
                        "default, torch_impl.loss.default_chunk_rows): whether a larger chunk's GEMMs run faster")
    p.add_argument("--out", type=Path, default=None)
    a = p.parse_args(argv)
    chunks = [int(c) for c in a.chunk_rows.split(",")]
    env = versions()
    makers = {"materialised": lambda: _materialised, "splitmoe": lambda: _splitmoe,
              "splitmoe_triton": lambda: _splitmoe_triton, "liger": _liger, "cce": _cce}
    g = torch.Generator(device="cuda").manual_seed(0)
    for S in (int(s) for s in a.seq.split(",")):
        h = (torch.randn(1, S, a.hidden, device="cuda", generator=g) * 2).to(torch.bfloat16)
        w = (torch.randn(a.vocab, a.hidden, device="cuda", generator=g) * 0.02).to(torch.bfloat16)
        labels = torch.randint(0, a.vocab, (1, S), device="cuda", generator=g)
        labels[:, :16] = -100
        ref, ref_dh, reference = _reference(h, w, labels)
        runs = [(name, c) for name in a.impls.split(",") for c in (chunks if name in CHUNKED else [0])]
        for name, chunk in runs:
            row = dict(impl=name, seq=S, hidden=a.hidden, vocab=a.vocab, reference=reference, **env)
            if name in CHUNKED:
                row["chunk_rows"] = chunk or default_chunk_rows(a.vocab, CHUNKED[name], S)
            try:
                fn = makers[name]()
                if chunk:
                    fn = functools.partial(fn, chunk_rows=chunk)
                hh = h.clone().requires_grad_()

                def step(fn=fn, hh=hh, w=w, labels=labels):
                    hh.grad = None
                    fn(hh, w, labels).backward()

                loss = fn(hh, w, labels)
                (dh,) = torch.autograd.grad(loss, (hh,))
                row["loss_rel"] = float((loss.float() - ref).abs() / ref.abs())
                row["dh_rel_l2"] = float((dh.float() - ref_dh).norm() / ref_dh.norm())
                del loss, dh
                row["ms"] = time_cuda(step, warmup=2, iters=a.iters)
                row["peak_extra_gib"] = peak_extra_bytes(step) / 2**30
                row["tflops"] = 2 * 2 * S * a.hidden * a.vocab / (row["ms"] * 1e-3) / 1e12  # logits + dh GEMMs
            except Exception as e:  # noqa: BLE001 - a missing or failing implementation is a row, not a crash
                oom = isinstance(e, torch.OutOfMemoryError)
                row["error"] = "OOM" if oom else f"{type(e).__name__}: {str(e)[:200]}"
            torch.cuda.empty_cache()
            print(json.dumps({k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items()
                              if k in ("impl", "seq", "chunk_rows", "ms", "peak_extra_gib", "tflops", "loss_rel",
                                       "dh_rel_l2", "error")}), flush=True)
            if a.out:
                write_jsonl(a.out, [row])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
