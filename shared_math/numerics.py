"""Tolerances and diff summaries: how close two implementations must be, and a readable report when they are not.

Every tolerance in the project lives in `TOLERANCES`, keyed by (dtype, quantity), with the reason for its size.
The check is norm-wise: `max|actual - expected| <= atol + rtol * max|expected|`. Element-wise relative error is
meaningless for GEMM outputs whose entries cancel to near zero; a GEMM's rounding error scales with the magnitude of
the whole row or tensor, so the max-norm of the expected tensor is the right yardstick.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Tolerance:
    rtol: float  # relative to max|expected|
    atol: float
    why: str


# fp32 unit roundoff is 6e-8; a K-term fp32 dot product accumulates about sqrt(K)·u relative error in practice.
# Our deepest chains (tiny models: 2 layers, attention + MoE + LoRA) stay under 1e-5 relative, ARCHITECTURE.md's
# fp32 target, with room for summation-order differences between frameworks.
_F32 = "fp32 (TF32 off / JAX precision highest): sum-order differences between libraries only; ~1e-5 relative"
# bf16 has 8 mantissa bits (u = 3.9e-3). One rounding of a GEMM output gives up to u/2 relative per element; the MoE
# block rounds the gate_up output, the activation and the down output, so ~3 roundings compound to ~1e-2.
_BF16_BLOCK = "bf16 storage, fp32 accumulation: ~3 bf16 roundings in the block (u=3.9e-3 each)"
# Gradients go through twice as many rounded GEMMs (forward recompute + backward), and LoRA weight gradients
# accumulate over all routed rows of an expert in bf16 inputs.
_BF16_GRAD = "bf16 backward: forward roundings plus ~3 more in dX/dA/dB GEMMs"
# A whole model stacks layers: rounding noise in the residual stream grows with depth; 2-layer tiny models measured
# at ~1-2e-2 of max|logit| against HF in bf16.
_BF16_MODEL = "bf16 whole model: roundings compound through residual stream and attention"

TOLERANCES: dict[tuple[str, str], Tolerance] = {
    # float64 vs float64 (e.g. reference vs finite differences handled in their own tests; here: re-ordered sums)
    ("float64", "moe_block"): Tolerance(1e-12, 1e-14, "float64: re-ordered sums only (u=1.1e-16)"),
    ("float64", "moe_grad"): Tolerance(1e-12, 1e-14, "float64: re-ordered sums only (u=1.1e-16)"),
    ("float32", "moe_block"): Tolerance(1e-5, 1e-7, _F32),
    ("float32", "moe_grad"): Tolerance(2e-5, 1e-7, _F32 + "; backward chains are twice as long"),
    ("float32", "routing_weights"): Tolerance(1e-6, 1e-7, "fp32 softmax/sigmoid of identical logits"),
    # Routing analytics (shared_math.routing_stats): entropy and per-layer aux-loss sums over T tokens, from fp32
    # router logits through an fp32 log-softmax. The logits of an fp32 router GEMM differ from float64 by ~1e-7
    # relative, and each token's term moves by as much: the sums stay within ~1e-6 (measured below 1e-6 on the
    # test cases); 1e-5 is ARCHITECTURE.md's fp32 target.
    ("float32", "routing_stats"): Tolerance(1e-5, 1e-6, _F32 + "; sums over tokens of fp32 log-softmax terms"),
    ("float32", "logits"): Tolerance(1e-5, 1e-6, _F32),
    ("float32", "loss"): Tolerance(1e-6, 1e-6, "fp32 cross-entropy is a mean over tokens: errors average out"),
    ("float32", "lora_grad"): Tolerance(5e-5, 1e-8, _F32 + "; LoRA grads sum over all routed rows and layers"),
    # One step sharded over 2-4 processes (torch_impl.parallel) against one device: the same fp32 terms summed in
    # another order (per-rank partial sums of the loss, FSDP2's reduce-scatter / all-reduce of the gradients, GEMMs
    # over other row blocks). Measured at most 6e-7·max on the tiny Qwen3-MoE and gpt-oss (tests/torch/
    # test_parallel.py) and DeepSeek-V3, GLM-4.5 (by hand, 4 ranks); 5e-6 leaves ~10x headroom.
    ("float32", "sharded_grad"): Tolerance(5e-6, 1e-9, _F32 + "; one step's reductions split over ranks"),
    # A short training run (splitmoe compare): each step's ~1e-7 loss/gradient difference moves the next step's
    # weights by AdamW updates of ~lr·(g/|g|), so differences compound over steps; measured at most 4e-7
    # relative over 20 steps of configs/runs/compare_tiny.yaml (CPU); ARCHITECTURE.md's fp32 target is 1e-5.
    ("float32", "train_loss"): Tolerance(1e-5, 0.0, _F32 + "; compounded over AdamW steps of a short run"),
    # fp16 is what the Triton interpreter tests use on CPU (its bf16 dot is broken): u = 4.9e-4.
    ("float16", "moe_block"): Tolerance(5e-3, 1e-3, "fp16 storage (u=4.9e-4), ~3 roundings, fp32 accumulation"),
    ("float16", "moe_grad"): Tolerance(1e-2, 1e-3, "fp16 backward: ~6 roundings"),
    # One fp16 model through two implementations of the same math (torch_impl.kernels.lora_linear against the torch
    # ops): fp32 sums in another order, rounded to fp16 at the same points, so an element rounds to the neighbouring
    # fp16 value now and then and the rest of the model carries it on. Measured on the tiny K = E models
    # (tests/torch/test_lora_linear.py): LoRA gradients 3e-7·max apart on Qwen3-MoE, 7e-4·max on DeepSeek-V3, whose
    # chained MLA projections amplify such a flip; 2e-3 leaves 3x headroom, and a 1 % error in z shows as 1.3e-2.
    ("float16", "same_math_grad"): Tolerance(2e-3, 1e-6, "fp16 model, the same sums in another order: rounding "
                                             "flips carried through the model"),
    # attention implementations (literal softmax, XLA's, cuDNN's flash kernel) against the literal softmax in fp32 of
    # the same inputs: fp32 differs by summation order (and the flash kernels' online softmax) only; in bf16 the
    # probabilities (or the flash kernel's P tile) and the output are rounded once each (u/2 = 2e-3 relative), and
    # the backward rounds dP / dS once more before the dq, dk, dv GEMMs.
    ("float32", "attention"): Tolerance(1e-5, 1e-7, _F32),
    ("float32", "attention_grad"): Tolerance(2e-5, 1e-7, _F32 + "; backward chains are twice as long"),
    ("bfloat16", "attention"): Tolerance(1e-2, 1e-3, "bf16 attention: probabilities and output rounded once each"),
    ("bfloat16", "attention_grad"): Tolerance(3e-2, 1e-3, "bf16 attention backward: dP and dS rounded before the "
                                                          "dq/dk/dv GEMMs, on top of the forward's roundings"),
    ("bfloat16", "moe_block"): Tolerance(2e-2, 1e-3, _BF16_BLOCK),
    ("bfloat16", "moe_grad"): Tolerance(4e-2, 1e-3, _BF16_GRAD),
    ("bfloat16", "routing_weights"): Tolerance(8e-3, 1e-4, "router weights rounded to bf16 once (u=3.9e-3)"),
    ("bfloat16", "logits"): Tolerance(4e-2, 1e-2, _BF16_MODEL),
    ("bfloat16", "loss"): Tolerance(1e-2, 1e-2, "bf16 model; the loss is a mean over tokens, so errors average"),
    # bf16 training: each framework rounds its own forward differently, and the runs drift apart step by step.
    ("bfloat16", "train_loss"): Tolerance(3e-2, 0.0, _BF16_MODEL + "; compounded over AdamW steps"),
    ("bfloat16", "lora_grad"): Tolerance(8e-2, 1e-4, _BF16_MODEL + "; plus the backward's roundings"),
    # A bf16 model's LoRA gradients against the fp32 model's (HF + PEFT in fp32): measured on the tiny 2-layer Qwen3-MoE
    # with K = E, HF + PEFT's own bf16 LoRA gradients are up to 0.105·max off its fp32 ones (torch_impl's 0.11), for
    # attention LoRA in the last layer whose gradient passes the whole bf16 backward; 0.15 leaves ~35 % headroom.
    ("bfloat16", "model_lora_grad"): Tolerance(1.5e-1, 1e-4, "bf16 model vs the fp32 model: every forward and "
                                               "backward rounding of the whole model (HF's own: 0.105·max)"),
    # The same for MLA attention LoRA (DeepSeek-V3, GLM-4.7-Flash): the chained low-rank projections (q_a -> RMSNorm
    # -> q_b, kv_a -> RMSNorm -> kv_b) amplify bf16 rounding in the backward. Measured on tiny DeepSeek-V3 (K = E,
    # checkpoint seeds 5-7): HF + PEFT's own bf16 MLA LoRA gradients are 0.16-0.47·max off its fp32 ones
    # (q_b_proj.lora_B worst), torch_impl's 0.20-0.25; 0.5 bounds HF's own worst case.
    ("bfloat16", "mla_model_lora_grad"): Tolerance(5e-1, 1e-4, "bf16 MLA attention LoRA vs the fp32 model: chained "
                                                   "low-rank projections (HF's own: up to 0.47·max)"),
}


def scales_exactly(s: float) -> bool:
    """Whether x·s is exact for every binary floating-point x (up to overflow and underflow): s is a positive power of
    two. The kernels' LoRA-accumulate form (torch_impl.kernels.hopper.lora_acc, jax_impl.kernels.grouped_gemm.lora_acc)
    pre-scales z by the LoRA scale only when this holds."""
    return s > 0 and math.frexp(s)[0] == 0.5


def tolerance(dtype: str, quantity: str) -> Tolerance:
    """The tolerance for comparing `quantity` computed in `dtype` against a more precise or equal reference."""
    key = (str(dtype).replace("torch.", ""), quantity)
    if key not in TOLERANCES:
        known = sorted({q for _, q in TOLERANCES})
        raise KeyError(f"no tolerance for {key}; dtypes: float64/float32/float16/bfloat16, quantities: {known}")
    return TOLERANCES[key]


@dataclass(frozen=True)
class DiffSummary:
    max_abs: float
    max_abs_expected: float
    where: tuple[int, ...]  # index of the largest absolute difference
    actual_there: float
    expected_there: float
    rel_l2: float  # ||a - e|| / ||e||
    pct_close: float  # % of elements within atol + rtol·|e| element-wise (rtol=1e-3, atol=1e-5): a shape hint
    nonfinite: int  # elements where exactly one side is NaN/inf, or both but different

    def __str__(self) -> str:
        return (f"max|diff|={self.max_abs:.3e} at {self.where} (actual {self.actual_there:.6g}, expected "
                f"{self.expected_there:.6g}); max|expected|={self.max_abs_expected:.3e}; "
                f"rel_l2={self.rel_l2:.3e}; {self.pct_close:.1f}% close; non-finite mismatches={self.nonfinite}")


def _to_numpy(a) -> np.ndarray:
    """Accept numpy, torch (any device/dtype) and jax arrays without importing either framework."""
    if hasattr(a, "detach"):  # torch.Tensor
        a = a.detach().float().cpu().numpy() if str(a.dtype) == "torch.bfloat16" else a.detach().cpu().numpy()
    return np.asarray(a, dtype=np.float64)


def diff_summary(actual, expected) -> DiffSummary:
    """Compare in float64; `expected` is the reference (second, as isclose is asymmetric)."""
    a, e = _to_numpy(actual), _to_numpy(expected)
    if a.shape != e.shape:
        raise ValueError(f"shape mismatch: actual {a.shape} vs expected {e.shape}")
    both_nan = np.isnan(a) & np.isnan(e)
    same_inf = np.isinf(a) & np.isinf(e) & (np.sign(a) == np.sign(e))
    finite = np.isfinite(a) & np.isfinite(e)
    nonfinite = int((~finite & ~both_nan & ~same_inf).sum())
    d = np.where(finite, np.abs(a - e), 0.0)
    if a.size == 0:
        return DiffSummary(0.0, 0.0, (), 0.0, 0.0, 0.0, 100.0, 0)
    idx = np.unravel_index(int(np.argmax(d)), d.shape)
    e_f = np.where(finite, e, 0.0)
    norm_e = float(np.linalg.norm(e_f))
    return DiffSummary(
        max_abs=float(d[idx]), max_abs_expected=float(np.abs(e_f).max()), where=tuple(int(i) for i in idx),
        actual_there=float(a[idx]), expected_there=float(e[idx]),
        rel_l2=float(np.linalg.norm(d) / norm_e) if norm_e > 0 else float(np.linalg.norm(d)),
        pct_close=float(100.0 * np.mean(d <= 1e-5 + 1e-3 * np.abs(e_f))), nonfinite=nonfinite)


def assert_close(actual, expected, *, dtype: str, quantity: str, name: str = "", rtol: float | None = None,
                 atol: float | None = None) -> DiffSummary:
    """Raise AssertionError with a diff summary unless `max|a-e| <= atol + rtol·max|e|` and no NaN/inf mismatch.

    rtol/atol override the table only for a documented reason at the call site.
    """
    tol = tolerance(dtype, quantity)
    rtol = tol.rtol if rtol is None else rtol
    atol = tol.atol if atol is None else atol
    s = diff_summary(actual, expected)
    bound = atol + rtol * s.max_abs_expected
    if s.nonfinite or not s.max_abs <= bound:
        raise AssertionError(f"{name or quantity} ({dtype}) not close: {s}; allowed {bound:.3e} "
                             f"(rtol={rtol:g}·max|expected| + atol={atol:g}: {tol.why})")
    return s
