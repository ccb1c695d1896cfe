"""Pallas kernels for the routed experts with split LoRA (see grouped_gemm.py for what each kernel computes,
split_lora.py for how the passes compose under `jax.custom_vjp`, autotune.py for block sizes)."""
