"""Fused kernels for the glue of a decoder layer on CUDA: RMSNorm and RoPE, forward and backward, one kernel each.

In eager PyTorch an RMSNorm is eight kernels (cast up, square, mean, add, rsqrt, multiply, cast down, weight) and
RoPE ten (two products, two half-rotations with their negation and concatenation, two sums, for q and k), each
reading and writing the whole activation; their backwards are as long. In a Qwen3-30B-A3B step at 4K tokens they are
a large part of the `copy_` / `mul` / elementwise time the profile shows (benchmarks/REPORT.md). Liger-Kernel's
Triton kernels do each in one pass with the same rounding as HF's:

- `rms_norm(x, weight, eps, rounding)`: `"llama"` (statistics in fp32, rounded to x's dtype, then times the weight:
  `layers.RMSNorm`, HF Llama/Qwen/DeepSeek/GLM) or `"weight_fp32"` (the weight multiplied in fp32, then rounded:
  `gpt_oss.GptOssRMSNorm`; Liger's "gemma" casting mode with offset 0). The mean of squares is a sum in another
  order than torch's `mean`, so an output may differ from the eager one by one bf16 rounding step, rarely.
- `rotary(q, k, cos, sin)`: HF's NeoX rotation (`layers.apply_rotary`), full or partial (cos/sin of the rotated
  width); computed in place into q's and k's storage (Liger's kernel), which is safe here because no operation
  before it saves its output for backward (the projections' outputs and the norms' outputs are not saved).

`glue_mode(x)` decides per call: the fused kernels for a CUDA tensor of a 16-bit dtype when the mode is `auto` (the
default) or `fused` and liger-kernel is importable; the eager formulas otherwise (CPU, fp32 reference runs, inside
`torch.compile`, which fuses the eager formulas itself). `set_glue_mode("eager")` (or the environment variable
`SPLITMOE_GLUE=eager`) keeps the eager formulas everywhere, for A/B timings and bisecting a numerical question.
"""

from __future__ import annotations

import functools
import importlib.util
import os
from typing import Literal

import torch

GlueMode = Literal["auto", "fused", "eager"]
_MODES = ("auto", "fused", "eager")
_mode: GlueMode = "auto"

__all__ = ["glue_mode", "liger_glue_available", "rms_norm", "rotary", "set_glue_mode"]


@functools.cache
def liger_glue_available() -> bool:
    """liger-kernel importable (the `torch` extra installs it)."""
    return importlib.util.find_spec("liger_kernel") is not None


def set_glue_mode(mode: GlueMode) -> None:
    """`auto`: fused kernels where they apply (a CUDA tensor in bf16/fp16) and liger-kernel is installed; `fused`:
    the same, but an error where liger-kernel is missing; `eager`: the eager formulas everywhere."""
    global _mode
    if mode not in _MODES:
        raise ValueError(f"glue mode must be one of {', '.join(_MODES)}, got {mode!r}")
    if mode == "fused" and not liger_glue_available():
        raise ValueError("glue mode 'fused' needs liger-kernel (pip install 'splitmoe[torch]' or liger-kernel); "
                         "'auto' falls back to the eager formulas without it")
    _mode = mode


def glue_mode(x: torch.Tensor) -> Literal["fused", "eager"]:
    """The path for an activation `x` (module docstring)."""
    env = os.environ.get("SPLITMOE_GLUE")
    mode = env if env in _MODES else _mode
    if mode == "eager" or not x.is_cuda or x.dtype not in (torch.bfloat16, torch.float16):
        return "eager"
    if torch.compiler.is_compiling() or not liger_glue_available():
        return "eager"
    return "fused"


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float,
             rounding: Literal["llama", "weight_fp32"]) -> torch.Tensor:
    """Liger's fused RMSNorm over the last dim of `x` (module docstring); the weight is frozen (no weight gradient
    is computed). `in_place=False`: the incoming gradient may be shared with the residual branch."""
    from liger_kernel.ops.rms_norm import LigerRMSNormFunction

    mode = "llama" if rounding == "llama" else "gemma"
    return LigerRMSNormFunction.apply(x, weight, eps, 0.0, mode, False)


def rotary(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
           ) -> tuple[torch.Tensor, torch.Tensor]:
    """q [B, N, S, D], k [B, Nkv, S, D] (views of [B, S, heads, D] storage, as the attention modules make them);
    cos, sin [B, S, Dr] -> rotated q, k, through Liger's fused kernel (module docstring)."""
    from liger_kernel.ops.rope import LigerRopeFunction

    return LigerRopeFunction.apply(q, k, cos, sin)
