"""Triton kernels of the `triton` backend and their autograd.Function.

- `grouped_gemm.py`: the two generic grouped-GEMM kernels (NN with fused gather / LoRA / bias / activation /
  routing weight / scatter epilogues, and the ragged-K TN kernel for weight-shaped gradients).
- `split_lora.py`: `ExpertSort`, `SplitLoraExpertsFunction` and `split_lora_experts` (the backend entry point).
- `hopper.py`: the persistent variant of the NN kernel for sm_90+ (weights by TMA tensor descriptors, a persistent
  grid over the tiles), run by the `triton_hopper` backend (`split_lora_experts(..., kernels="hopper")`).
- `lora_linear.py`: a Linear's LoRA branch in PEFT's precision (`z = x @ A`, `round(y + s·(z @ B))`, fp32 factors on
  bf16 activations) and its backward without fp32 copies (`splitmoe::lora_z`, `splitmoe::lora_add`;
  `torch_impl.lora.LoRALinear` on CUDA; SPLITMOE_LORA_LINEAR=torch turns it off).
- `layout.py`: the cast + transpose of LoRA-A factors into the reduction-major layout the NN kernels read.
- `schedule.py`: the NN kernels' row-block schedule (tiles that never straddle two experts) in one launch
  (SPLITMOE_SCHEDULE_KERNEL=0 keeps the torch ops).
- `launch.py`: the cached launch path of every kernel above on a GPU (Triton's per-call argument binding skipped
  once a call's key was seen; SPLITMOE_FAST_LAUNCH=0 turns it off).
- `autotune.py`: default block sizes and the opt-in autotuner with its on-disk cache.

Kernels are decorated with `triton.jit` when `grouped_gemm` is imported, and Triton reads TRITON_INTERPRET at that
moment: on a CPU-only machine set TRITON_INTERPRET=1 before importing this package (importing triton itself earlier
is fine).
"""
