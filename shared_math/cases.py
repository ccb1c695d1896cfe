"""Named shape cases for the expert path, shared by tests and benchmarks, and a deterministic input generator.

Each case says why it exists. Tags: `ci` (small: CPU, float64 reference, Triton/Pallas interpreters), `gpu` (bf16
on the GPU, sizes that cross block boundaries), `bench` (the model shapes the benchmarks time).
`make_moe_inputs` draws the same numbers for every framework from one seed.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class MoECase:
    name: str
    T: int  # tokens
    H: int  # hidden
    I: int  # expert intermediate
    E: int  # experts
    K: int  # experts per token
    R: int  # LoRA rank
    tags: tuple[str, ...]
    why: str
    activation: str = "swiglu"  # or "swiglu_oai" (gpt-oss: clamped, with biases)
    biases: bool = False
    swiglu_limit: float = 7.0
    empty_experts: tuple[int, ...] = ()  # experts that receive no tokens
    skew: float = 0.0  # 0: uniform routing; >0: Zipf-like skew towards low expert ids (realistic loads)

    @property
    def M(self) -> int:
        return self.T * self.K


CASES: tuple[MoECase, ...] = (
    MoECase("tiny", 5, 32, 16, 4, 2, 4, ("ci", "gpu"), "T smaller than any block (5 rows, 10 routed rows)"),
    MoECase("odd_dims", 37, 45, 27, 6, 2, 3, ("ci", "gpu"), "odd H, I and R: masking on every GEMM dimension"),
    MoECase("prime_e", 29, 32, 24, 7, 3, 4, ("ci", "gpu"), "prime E: no power-of-two assumptions on experts"),
    MoECase("k1", 23, 32, 16, 5, 1, 4, ("ci", "gpu"), "K=1: one expert per token, sum over K is a copy"),
    MoECase("k_eq_e", 11, 32, 16, 4, 4, 2, ("ci", "gpu"), "K=E: every token visits every expert"),
    MoECase("empty_experts", 19, 32, 16, 8, 2, 4, ("ci", "gpu"),
            "experts 0, 3, 4 and 7 get no tokens: zero-size groups, first and last included",
            empty_experts=(0, 3, 4, 7)),
    MoECase("rank1", 13, 32, 16, 4, 2, 1, ("ci",), "R=1: the skinniest LoRA GEMM"),
    MoECase("oai_biases", 21, 32, 16, 6, 2, 4, ("ci", "gpu"),
            "gpt-oss clamped SwiGLU with biases; limit 1.0 so the clamps are exercised",
            activation="swiglu_oai", biases=True, swiglu_limit=1.0),
    MoECase("skewed", 64, 48, 32, 8, 2, 8, ("ci", "gpu"), "skewed expert loads as real routers produce", skew=1.5),
    MoECase("gpu_medium", 1000, 512, 256, 16, 4, 16, ("gpu",), "crosses 128-row blocks with ragged group ends"),
    MoECase("gpu_oai", 777, 384, 192, 8, 4, 16, ("gpu",), "gpt-oss activation at GPU block sizes",
            activation="swiglu_oai", biases=True),
    # The benchmark shapes (shared/reference/h200-anchors.md): expert dims of the real models.
    *(MoECase(f"qwen3_30b_T{T}", T, 2048, 768, 128, 8, 64, ("bench",), "Qwen3-30B-A3B experts, r=64")
      for T in (1024, 4096, 16384, 65536)),
    *(MoECase(f"gpt_oss_20b_T{T}", T, 2880, 2880, 32, 4, 64, ("bench",), "gpt-oss-20b experts, r=64",
              activation="swiglu_oai", biases=True) for T in (1024, 4096, 16384, 65536)),
    # Rank 16 at the same shapes (issue 6 asks for both ranks).
    *(MoECase(f"qwen3_30b_r16_T{T}", T, 2048, 768, 128, 8, 16, ("bench",), "Qwen3-30B-A3B experts, r=16")
      for T in (1024, 4096, 16384, 65536)),
    *(MoECase(f"gpt_oss_20b_r16_T{T}", T, 2880, 2880, 32, 4, 16, ("bench",), "gpt-oss-20b experts, r=16",
              activation="swiglu_oai", biases=True) for T in (1024, 4096, 16384, 65536)),
    # Ranks 32 and 128, and the GLM expert shapes (hf-moe-formats.md: GLM-4.5 H 5120, I 1536, E 160, K 8;
    # GLM-4.7-Flash H 2048, I 1536, E 64, K 4) at r=16/32/64/128: the shapes of the Hopper kernels' tuning sweep
    # (issue 16; benchmarks/triton_sweep.py --backend triton_hopper).
    *(MoECase(f"qwen3_30b_r{R}_T{T}", T, 2048, 768, 128, 8, R, ("bench",), f"Qwen3-30B-A3B experts, r={R}")
      for R in (32, 128) for T in (1024, 16384)),
    *(MoECase(f"gpt_oss_20b_r{R}_T{T}", T, 2880, 2880, 32, 4, R, ("bench",), f"gpt-oss-20b experts, r={R}",
              activation="swiglu_oai", biases=True) for R in (32, 128) for T in (1024, 16384)),
    *(MoECase(f"glm45_{'' if R == 64 else f'r{R}_'}T{T}", T, 5120, 1536, 160, 8, R, ("bench",),
              f"GLM-4.5 experts, r={R}") for R in (16, 32, 64, 128) for T in (1024, 16384)),
    *(MoECase(f"glm47_flash_{'' if R == 64 else f'r{R}_'}T{T}", T, 2048, 1536, 64, 4, R, ("bench",),
              f"GLM-4.7-Flash experts, r={R}") for R in (16, 32, 64, 128) for T in (1024, 16384)),
)


def cases(tag: str) -> list[MoECase]:
    """The cases carrying `tag` (ci, gpu or bench)."""
    found = [c for c in CASES if tag in c.tags]
    if not found:
        raise ValueError(f"no case tagged {tag!r}; tags: ci, gpu, bench")
    return found


def get_case(name: str) -> MoECase:
    for c in CASES:
        if c.name == name:
            return c
    raise KeyError(f"no case named {name!r}; known: {', '.join(c.name for c in CASES)}")


def routing_for(case: MoECase, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """(expert_ids [T,K] int64, expert_weights [T,K]): K distinct experts per token, never an empty expert.

    Weights are positive and sum to 1 per token, like a renormalised softmax top-K.
    """
    allowed = np.array([e for e in range(case.E) if e not in case.empty_experts])
    if len(allowed) < case.K:
        raise ValueError(f"case {case.name}: {len(allowed)} non-empty experts cannot serve K={case.K}")
    # Gumbel top-K over per-expert log-popularity gives K distinct experts per token with the intended skew.
    log_pop = -case.skew * np.log1p(np.arange(len(allowed)))
    scores = log_pop[None, :] + rng.gumbel(size=(case.T, len(allowed)))
    ids = allowed[np.argsort(-scores, axis=1, kind="stable")[:, : case.K]]
    w = rng.uniform(0.1, 1.0, size=(case.T, case.K))
    return ids.astype(np.int64), w / w.sum(axis=1, keepdims=True)


def make_moe_inputs(case: MoECase, seed: int = 0, dtype=np.float64) -> dict:
    """All inputs of `split_lora_experts` for `case`, drawn from `seed`, cast to `dtype` (ids stay int64).

    Scales keep every intermediate O(1): weights ~ N(0, 1/fan_in), so the activations neither vanish nor blow up
    and a relative tolerance means the same thing at every size. LoRA B is non-zero so the LoRA path is tested.
    """
    rng = np.random.default_rng(seed)
    T, H, I, E, R = case.T, case.H, case.I, case.E, case.R

    def normal(shape, fan_in):
        return (rng.standard_normal(shape) / np.sqrt(fan_in)).astype(dtype)

    ids, w = routing_for(case, rng)
    out = dict(
        x=rng.standard_normal((T, H)).astype(dtype),
        expert_ids=ids,
        expert_weights=w.astype(dtype),
        w_gate_up=normal((E, H, 2 * I), H),
        w_down=normal((E, I, H), I),
        lora_gate_up=(normal((E, H, R), H), normal((E, R, 2 * I), R)),
        lora_down=(normal((E, I, R), I), normal((E, R, H), R)),
        biases=(normal((E, 2 * I), 4.0), normal((E, H), 4.0)) if case.biases else None,
        scale=0.5,
        activation=case.activation,
        swiglu_limit=case.swiglu_limit,
    )
    return out
