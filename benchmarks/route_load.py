"""How unevenly the step benchmark's random model routes: each MoE layer's busiest experts' row counts over the mean.

`benchmarks/step.py` times a model whose weights are drawn at random (`_randomise`: N(0, 0.02), norms 1). Kernels
that give one program all of an expert's rows (the backward's LoRA-gradient launches, `grouped_gemm_tn`) take as long
as their busiest expert, so how the random router spreads S random tokens decides part of the step's time, and a
kernel benchmark with uniform routing can miss it (session 17: those launches ran 2.4x their uniform time in a Qwen3
step profile). This runs the forward of that randomised model (`step.build_ours`'s weights, no LoRA, no grad) and
records the top-K choice of every router.

    python3 benchmarks/route_load.py --family gpt_oss --preset 20b --layers 3 --seq 4096     # ~1 min on 2 CPU cores
    python3 benchmarks/route_load.py --family qwen3_moe --preset tiny --seq 64 --device cpu
Prints per layer: the busiest experts' rows over the mean, and how many experts got none; --out appends JSON rows.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import write_jsonl  # noqa: E402


def expert_loads(family: str, preset: str, layers: int | None, seq: int, device: str, seed: int = 0
                 ) -> list[list[int]]:
    """Rows per expert of every MoE layer, in layer order, for one forward of `seq` random tokens."""
    import torch

    from benchmarks.step import _randomise
    from shared_math.config import ModelConfig
    from shared_math.presets import preset_hf_config
    from torch_impl.load import build_model
    from torch_impl.moe import Router

    hf = preset_hf_config(family, preset, layers)
    cfg = ModelConfig.from_hf(hf)
    torch.manual_seed(seed)
    model = build_model(cfg, dtype=torch.bfloat16, device=device, moe_backend="native")
    _randomise(model)
    k = cfg.num_experts_per_tok
    loads: list[list[int]] = []

    def record(_module, _inputs, logits_TE):
        # the top-K of the router's logits: which experts the layer's rows go to (every family's routing ranks by its
        # logits; a correction bias, where a family has one, is drawn N(0, 0.02) here and left out of this count)
        ids = logits_TE.float().topk(k, dim=-1).indices
        loads.append(torch.bincount(ids.reshape(-1), minlength=logits_TE.shape[-1]).tolist())

    for m in model.modules():
        if isinstance(m, Router):
            m.register_forward_hook(record)
    ids = torch.randint(0, hf["vocab_size"], (1, seq), generator=torch.Generator().manual_seed(seed)).to(device)
    with torch.no_grad():
        model(ids, return_logits=False)
    return loads


def summarise(counts: list[int], top: int = 4) -> dict:
    mean = sum(counts) / len(counts)
    busiest = sorted(counts, reverse=True)[:top]
    return dict(mean=mean, max=busiest[0], busiest_over_mean=[round(c / mean, 3) for c in busiest],
                empty=sum(c == 0 for c in counts))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--family", default="gpt_oss")
    p.add_argument("--preset", default="20b")
    p.add_argument("--layers", type=int, default=3, help="the first N decoder layers (0: all)")
    p.add_argument("--seq", type=int, default=4096)
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", type=Path, default=None)
    a = p.parse_args(argv)
    loads = expert_loads(a.family, a.preset, a.layers or None, a.seq, a.device)
    rows = []
    for layer, counts in enumerate(loads):
        s = summarise(counts)
        rows.append(dict(family=a.family, preset=a.preset, seq=a.seq, layer=layer, **s, counts=counts))
        print(f"{a.family} {a.preset} layer {layer}: busiest experts {s['busiest_over_mean']} x the mean "
              f"({s['mean']:.0f} rows), {s['empty']} empty", flush=True)
    if a.out:
        write_jsonl(a.out, rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
