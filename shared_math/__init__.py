"""Framework-free layer of splitmoe: configs, checkpoints, the float64 oracle, cost model, shape cases, numerics.

Imports numpy and safetensors only, never torch or jax, so both implementations (and tools without either) can use
it. The math it implements is written down in SPEC.md beside this file.
"""

from shared_math.config import LoraConfig, ModelConfig, RoutingConfig

__all__ = ["LoraConfig", "ModelConfig", "RoutingConfig"]
