"""Cost model of expert LoRA, merged (PEFT) versus split (this project): FLOPs, bytes moved, extra peak memory.

For one expert projection (in = m, out = n, stacked over E experts; T tokens, K experts per token, M = T·K routed
rows, LoRA rank r) and for a whole MoE layer (gate_up: m = H, n = 2I; down: m = I, n = H), forward and backward
separately. SPEC.md ("Cost of merged vs split") derives every term; `python -m shared_math.cost` prints the numbers
SPEC.md quotes.

merged (PEFT 0.21, `ParamWrapper`): forward  W' = W + s·A@B for all E experts (one baddbmm, materialised and saved
          for backward), Y = X·W' on routed rows; backward dX = dY·W'^T, the weight-sized dW' = X^T·dY for every
          expert, then dA = s·dW'·B^T, dB = s·A^T·dW'.
split:    forward  Z = X·A, Y = X·W + s·Z·B on routed rows (Z saved); backward dZ = s·dY·B^T, dB = s·Z^T·dY,
          dA = X^T·dZ, dX = dY·W^T + dZ·A^T; no dW for the frozen W.

Counting rules (so the numbers are reproducible by hand):
- FLOPs: 2 per multiply-add of every GEMM, plus E·m·n for merged's `W + s·Δ` (a separate weight-sized pass).
  Scales and the split's epilogue add are fused into GEMMs and not counted (they are O(M·n), vanishing next to
  the GEMMs). This is also the source document's rule, so `crossover_tokens` is its formula, exactly.
- Bytes: each pass reads each operand once and writes its result once, fused as SPEC.md designs the kernels
  (x·A in the pass that reads x; s·Z·B in the base GEMM's epilogue; dZ·A^T in the dX GEMM's epilogue). A GEMM
  over routed rows reads the weights of the min(E, M) experts that can be hit; weight-sized passes touch all E.
- Peak memory: extra bytes beyond what a frozen-base forward already holds (W, X, Y): tensors saved from forward
  for backward, transients alive during a projection's backward, and the adapter gradients.
All counts are exact Python ints; one element is `dtype_bytes` bytes (2 for bf16) for every tensor.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

Way = Literal["merged", "split"]

__all__ = ["Cost", "ProjectionCost", "LayerCost", "projection_cost", "layer_cost", "crossover_tokens",
           "backward_rank_bound", "summary_table"]


@dataclass(frozen=True)
class Cost:
    """One pass (forward or backward): FLOPs, bytes read+written, extra peak memory in bytes."""

    flops: int
    bytes_moved: int
    peak_bytes: int


@dataclass(frozen=True)
class ProjectionCost:
    """Cost of one stacked expert projection. `saved`, `transient`, `grads` (bytes) are the peak's ingredients:
    saved from forward to backward, alive only during this projection's backward, adapter gradients (kept)."""

    way: Way
    forward: Cost
    backward: Cost
    saved: int
    transient: int
    grads: int

    @property
    def flops(self) -> int:
        return self.forward.flops + self.backward.flops

    @property
    def bytes_moved(self) -> int:
        return self.forward.bytes_moved + self.backward.bytes_moved


@dataclass(frozen=True)
class LayerCost:
    """Cost of a MoE layer's experts: gate_up (m=H, n=2I) then down (m=I, n=H); backward runs down first."""

    way: Way
    gate_up: ProjectionCost
    down: ProjectionCost
    forward: Cost
    backward: Cost

    @property
    def flops(self) -> int:
        return self.forward.flops + self.backward.flops


def _check(m: int, n: int, E: int, K: int, T: int, r: int, dtype_bytes: int) -> None:
    for name, v in (("m", m), ("n", n), ("E", E), ("K", K), ("r", r), ("dtype_bytes", dtype_bytes)):
        if not isinstance(v, int) or v < 1:
            raise ValueError(f"{name} must be a positive int, got {v!r}")
    if not isinstance(T, int) or T < 0:
        raise ValueError(f"T must be an int >= 0, got {T!r}")
    if K > E:
        raise ValueError(f"K={K} experts per token exceeds E={E}")


def _merged(m: int, n: int, E: int, M: int, r: int) -> tuple[tuple[int, int, int], tuple[int, int, int], int, int, int]:
    """(fwd flops, bytes, peak), (bwd flops, bytes, peak), saved, transient, grads, in elements."""
    Eh = min(E, M)  # experts whose W' rows a routed GEMM can read
    fwd_flops = 2 * E * m * n * r + E * m * n + 2 * M * m * n        # A@B for all E, W + sΔ, X·W'
    fwd_bytes = (E * (m * n + r * (m + n) + m * n)                    # baddbmm: read W, A, B; write W'
                 + M * m + Eh * m * n + M * n)                       # X·W': read X, W'; write Y
    bwd_flops = 2 * M * m * n + 2 * M * m * n + 4 * E * m * n * r    # dX, dW' = X^T dY, dA and dB from dW'
    bwd_bytes = (M * n + Eh * m * n + M * m                           # dX = dY·W'^T
                 + M * m + M * n + E * m * n                          # dW' = X^T·dY, written for every expert
                 + 2 * (E * m * n + E * r * (m + n)))                 # dA = s·dW'·B^T, dB = s·A^T·dW'
    saved = E * m * n            # W' is saved by autograd for the backward GEMMs
    transient = E * m * n        # dW'
    grads = E * r * (m + n)      # dA, dB
    return (fwd_flops, fwd_bytes, saved), (bwd_flops, bwd_bytes, saved + transient + grads), saved, transient, grads


def _split(m: int, n: int, E: int, M: int, r: int) -> tuple[tuple[int, int, int], tuple[int, int, int], int, int, int]:
    Eh = min(E, M)
    fwd_flops = 2 * M * m * n + 2 * M * m * r + 2 * M * r * n        # X·W, Z = X·A, Z·B
    fwd_bytes = M * m + Eh * (m * n + r * (m + n)) + M * r + M * n  # read X, W, A, B; write Z (saved), Y
    bwd_flops = 2 * M * n * r + 2 * M * r * n + 2 * M * m * r + 2 * M * m * n + 2 * M * r * m
    #           dZ = dY·B^T    dB = Z^T·dY     dA = X^T·dZ     dX = dY·W^T      + dZ·A^T
    bwd_bytes = ((M * n + Eh * r * n + M * r)                         # dZ: read dY, B; write dZ
                 + (M * r + M * n + Eh * r * n)                       # dB: read Z, dY; write dB
                 + (M * m + M * r + Eh * m * r)                       # dA: read X, dZ; write dA
                 + (M * n + Eh * m * n + M * r + Eh * m * r + M * m))  # dX: read dY, W, dZ, A; write dX
    saved = M * r                # Z
    transient = M * r            # dZ
    grads = E * r * (m + n)      # dA, dB (allocated for every expert; rows of unhit experts stay zero)
    return (fwd_flops, fwd_bytes, saved), (bwd_flops, bwd_bytes, saved + transient + grads), saved, transient, grads


def projection_cost(way: Way, m: int, n: int, E: int, K: int, T: int, r: int, dtype_bytes: int = 2) -> ProjectionCost:
    """Cost of one stacked expert projection (in m, out n) over T tokens routed to K of E experts, rank r."""
    _check(m, n, E, K, T, r, dtype_bytes)
    if way not in ("merged", "split"):
        raise ValueError(f"way must be 'merged' or 'split', got {way!r}")
    fwd, bwd, saved, transient, grads = (_merged if way == "merged" else _split)(m, n, E, T * K, r)
    b = dtype_bytes
    return ProjectionCost(
        way, Cost(fwd[0], fwd[1] * b, fwd[2] * b), Cost(bwd[0], bwd[1] * b, bwd[2] * b),
        saved * b, transient * b, grads * b)


def layer_cost(way: Way, H: int, I: int, E: int, K: int, T: int, r: int, dtype_bytes: int = 2) -> LayerCost:
    """Cost of a MoE layer's routed experts (fused gate_up [H, 2I] and down [I, H]; the activation is not counted).

    Peak: the forward holds both projections' saved tensors; the backward runs down first (holding both saved
    sets, down's transient and grads), then gate_up (down's saved and transient freed, its grads kept).
    """
    gu = projection_cost(way, H, 2 * I, E, K, T, r, dtype_bytes)
    dn = projection_cost(way, I, H, E, K, T, r, dtype_bytes)
    fwd = Cost(gu.forward.flops + dn.forward.flops, gu.forward.bytes_moved + dn.forward.bytes_moved,
               gu.saved + dn.saved)
    bwd_peak = max(gu.saved + dn.saved + dn.transient + dn.grads,
                   gu.saved + gu.transient + gu.grads + dn.grads)
    bwd = Cost(gu.backward.flops + dn.backward.flops, gu.backward.bytes_moved + dn.backward.bytes_moved, bwd_peak)
    return LayerCost(way, gu, dn, fwd, bwd)


def crossover_tokens(m: int, n: int, E: int, K: int, r: int) -> float:
    """Tokens T* at which forward FLOPs of merged and split are equal; split is cheaper for T < T*.

    merged - split (forward) = 2Emnr + Emn - 2·T·K·r(m+n), so T* = E·m·n·(2r + 1) / (2·K·r·(m + n))
    = Emn/(K(m+n))·(1 + 1/(2r)): the source document's own formula. For Qwen3-30B-A3B (m=2048, n=768, E=128,
    K=8, r=64) it is about 9.0K tokens; the document states 16K.
    """
    return E * m * n * (2 * r + 1) / (2 * K * r * (m + n))


def backward_rank_bound(m: int, n: int) -> float:
    """With the backward included, split needs fewer FLOPs than merged at every T when r < m·n / (3(m + n)).

    merged - split (forward + backward) = E·m·n·(6r + 1) + M·(2mn - 6r(m + n)); the first term is positive and the
    second is non-negative for every M = T·K exactly when r <= mn/(3(m+n)). Merged's backward pays 2Mmn for the
    weight-sized dW' that split never forms, which is what outweighs split's 6Mr(m+n) of skinny GEMMs.
    """
    return m * n / (3 * (m + n))


def summary_table(name: str, H: int, I: int, E: int, K: int, r: int, tokens: tuple[int, ...],
                  dtype_bytes: int = 2) -> str:
    """Markdown table of one MoE layer's cost, merged vs split, at several token counts (numbers in SPEC.md)."""
    lines = [f"{name}: H={H}, I={I}, E={E}, K={K}, r={r}, {dtype_bytes}-byte elements, one MoE layer",
             "",
             "| T | pass | merged GFLOP | split GFLOP | merged GB moved | split GB moved "
             "| merged extra peak GB | split extra peak GB |",
             "| ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for T in tokens:
        mg, sp = layer_cost("merged", H, I, E, K, T, r, dtype_bytes), layer_cost("split", H, I, E, K, T, r, dtype_bytes)
        for label, a, b in (("fwd", mg.forward, sp.forward), ("bwd", mg.backward, sp.backward)):
            lines.append(f"| {T} | {label} | {a.flops / 1e9:.1f} | {b.flops / 1e9:.1f} | {a.bytes_moved / 1e9:.3f} "
                         f"| {b.bytes_moved / 1e9:.3f} | {a.peak_bytes / 1e9:.3f} | {b.peak_bytes / 1e9:.3f} |")
    return "\n".join(lines)


if __name__ == "__main__":  # the numbers SPEC.md quotes
    print(f"Qwen3-30B-A3B doc crossover (m=2048, n=768): {crossover_tokens(2048, 768, 128, 8, 64):.0f} tokens")
    for nm, (m, n) in {"Qwen3 gate_up": (2048, 1536), "Qwen3 down": (768, 2048), "Qwen3 gate or up": (2048, 768),
                       "gpt-oss gate_up": (2880, 5760), "gpt-oss down": (2880, 2880)}.items():
        print(f"{nm}: r bound mn/(3(m+n)) = {backward_rank_bound(m, n):.1f}")
    print(f"Qwen3 fused gate_up crossover: {crossover_tokens(2048, 1536, 128, 8, 64):.0f}; "
          f"down: {crossover_tokens(768, 2048, 128, 8, 64):.0f}")
    print(f"gpt-oss-20b gate_up crossover: {crossover_tokens(2880, 5760, 32, 4, 64):.0f}; "
          f"down: {crossover_tokens(2880, 2880, 32, 4, 64):.0f}")
    print()
    print(summary_table("Qwen3-30B-A3B", 2048, 768, 128, 8, 64, (1024, 4096, 16384, 65536)))
    print()
    print(summary_table("gpt-oss-20b", 2880, 2880, 32, 4, 64, (1024, 4096, 16384, 65536)))
