"""Split LoRA for jax_impl models: `y = x·W + scale·(x·A)·B`, adapters in PEFT's on-disk format.

- `Frozen`: the nnx.Variable type of every frozen base weight. It is not an `nnx.Param`, so `nnx.grad` (whose
  default filter is Param) can never differentiate base weights by accident; LoRA factors are `nnx.LoRAParam`.
- `LoRALinear`: a Linear (`weight [in, out]`, optional bias) with optional LoRA `lora_A [in, R]`, `lora_B [R, out]`.
  The LoRA branch runs in the factors' dtype (fp32) and is added to the base output before one rounding to x's
  dtype, as PEFT's `Linear.forward` does.
- `attach_lora(model, cfg)`: A ~ PEFT's kaiming-uniform U(±1/sqrt(in)), B = 0 on every target of `cfg`.
- `lora_state_dict` / `load_lora_state_dict`: canonical LoRA names (docs/CONTRACTS.md) <-> numpy arrays.
- `save_adapter` / `load_adapter`: a PEFT adapter folder via `shared_math.adapter`, which PEFT and torch_impl load.

Rank and scale are per target (`LoraConfig.rank_of` / `scale_of`: alpha/R, or alpha/sqrt(R) with rsLoRA; PEFT's
rank_pattern / alpha_pattern), the scale applied explicitly (nnx.LoRA has none).
"""

from __future__ import annotations

import zlib
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from shared_math.config import EXPERT_TARGETS, LoraConfig

_F32 = jnp.float32
LORA_DTYPE = jnp.float32  # PEFT keeps adapters in fp32 on bf16 models (autocast_adapter_dtype)


class Frozen(nnx.Variable):
    """A frozen base weight or buffer: state of the model, never a differentiated parameter."""


def lora_z(x: jax.Array, a: jax.Array) -> jax.Array:
    """z = x·A in A's dtype (fp32 adapters: x cast up, as PEFT's Linear runs its LoRA branch); A [in, R] or the
    concatenated factors of projections that share x (`models.layers.project`)."""
    return jnp.einsum("...i,ir->...r", x.astype(a.dtype), a, preferred_element_type=_F32).astype(a.dtype)


class LoRALinear(nnx.Module):
    """`x·W (+ b) (+ scale·(x·A)·B)` with W [in, out] frozen and A [in, R], B [R, out] `LoRAParam`s (or None)."""

    def __init__(self, weight: jax.Array, bias: jax.Array | None = None):
        self.weight = Frozen(weight)
        self.bias = None if bias is None else Frozen(bias)
        # nnx.data: the slots start empty but hold arrays once attach_lora fills them (None alone would be static)
        self.lora_A: nnx.LoRAParam | None = nnx.data(None)
        self.lora_B: nnx.LoRAParam | None = nnx.data(None)
        self.lora_scale = 1.0

    @property
    def in_features(self) -> int:
        return self.weight.shape[0]

    @property
    def out_features(self) -> int:
        return self.weight.shape[1]

    def __call__(self, x: jax.Array) -> jax.Array:
        if self.lora_A is None:
            return self._base(x)
        return self.forward_with_z(x, lora_z(x, self.lora_A[...]))

    def forward_with_z(self, x: jax.Array, z: jax.Array) -> jax.Array:
        """The call given z = x·A in A's dtype (`models.layers.project` computes it for several projections of one
        x at once), as torch_impl's `LoRALinear.forward_with_z`."""
        y = self._base(x)
        delta = jnp.einsum("...r,ro->...o", z, self.lora_B[...], preferred_element_type=_F32)
        return (y.astype(_F32) + self.lora_scale * delta).astype(x.dtype)

    def _base(self, x: jax.Array) -> jax.Array:
        y = jnp.einsum("...i,io->...o", x, self.weight[...].astype(x.dtype), preferred_element_type=_F32)
        if self.bias is not None:
            y = y + self.bias[...].astype(_F32)
        return y.astype(x.dtype)  # the base layer's output is rounded on its own, as nn.Linear's is


# ---- walking a model -------------------------------------------------------------------------------------------------

def _expert_modules(model: nnx.Module):
    from jax_impl.moe import Experts  # moe imports Frozen from here

    for path, m in nnx.iter_modules(model):
        if isinstance(m, Experts):
            yield ".".join(map(str, path)), m


def _linear_modules(model: nnx.Module):
    for path, m in nnx.iter_modules(model):
        if isinstance(m, LoRALinear):
            yield ".".join(map(str, path)), m


# canonical expert LoRA suffix -> Experts attribute
_EXPERT_ATTRS = {"gate_up_proj.lora_A": "gate_up_lora_A", "gate_up_proj.lora_B": "gate_up_lora_B",
                 "down_proj.lora_A": "down_lora_A", "down_proj.lora_B": "down_lora_B"}


def _slots(model: nnx.Module) -> dict[str, tuple[nnx.Module, str]]:
    """Every place a LoRA factor can live: canonical name -> (module, attribute)."""
    out: dict[str, tuple[nnx.Module, str]] = {}
    for name, m in _linear_modules(model):
        out[name + ".lora_A"], out[name + ".lora_B"] = (m, "lora_A"), (m, "lora_B")
    for name, m in _expert_modules(model):
        for suffix, attr in _EXPERT_ATTRS.items():
            out[f"{name}.{suffix}"] = (m, attr)
    return out


def _kaiming_uniform(rng: np.random.Generator, shape: tuple[int, ...], fan_in: int, dtype) -> jax.Array:
    # PEFT: nn.init.kaiming_uniform_(A, a=sqrt(5)) -> U(-1/sqrt(fan_in), 1/sqrt(fan_in)). Drawn in numpy: eager
    # jax.random compiles once per shape, which cost seconds per model on CPU.
    bound = 1.0 / np.sqrt(fan_in)
    return jnp.asarray(rng.uniform(-bound, bound, size=shape), dtype)


def attach_lora(model: nnx.Module, lora_cfg: LoraConfig, *, seed: int | None = None,
                lora_dtype=LORA_DTYPE) -> nnx.Module:
    """Give every target of `lora_cfg` fresh LoRA factors (A random, B zero) and the scale; returns `model`.

    Linear targets match by module name (`q_proj`, ..., dense/shared `gate_proj`); expert targets
    (`experts.gate_up_proj`, `experts.down_proj`) put one (A [E, in, R], B [E, R, out]) pair on every MoE layer.
    Each factor's random draw is keyed by (seed, canonical name), so it does not depend on traversal order;
    `seed=None` draws fresh entropy. Factors are stored in `lora_dtype` (fp32, as PEFT keeps them). Each target
    gets its own rank and scale (`lora_cfg.rank_of` / `scale_of`).
    """
    if getattr(model, "config", None) is not None:
        lora_cfg.validate_for(model.config)

    def key_for(name: str) -> np.random.Generator:
        return np.random.default_rng(None if seed is None else [seed, zlib.crc32(name.encode())])

    n_attached = 0
    for name, m in _linear_modules(model):
        target = name.rsplit(".", 1)[-1]
        if target not in lora_cfg.module_targets:
            continue
        R = lora_cfg.rank_of(target)
        m.lora_A = nnx.LoRAParam(
            _kaiming_uniform(key_for(name + ".lora_A"), (m.in_features, R), m.in_features, lora_dtype))
        m.lora_B = nnx.LoRAParam(jnp.zeros((R, m.out_features), lora_dtype))
        m.lora_scale = float(lora_cfg.scale_of(target))
        n_attached += 1
    gate_up, down = EXPERT_TARGETS
    for name, m in _expert_modules(model):
        E, H, I2 = m.gate_up_proj.shape
        for target, (n_in, n_out), prefix in ((gate_up, (H, I2), "gate_up"), (down, (I2 // 2, H), "down")):
            if target not in lora_cfg.targets:
                continue
            R = lora_cfg.rank_of(target)
            a_name = f"{name}.{target.split('.')[1]}.lora_A"
            setattr(m, prefix + "_lora_A",
                    nnx.LoRAParam(_kaiming_uniform(key_for(a_name), (E, n_in, R), n_in, lora_dtype)))
            setattr(m, prefix + "_lora_B", nnx.LoRAParam(jnp.zeros((E, R, n_out), lora_dtype)))
            n_attached += 1
        # Experts hold one scale (down's, or gate_up's alone) and gate_up's own where it differs
        m.lora_scale = float(lora_cfg.scale_of(down if down in lora_cfg.targets else gate_up))
        s_gu = float(lora_cfg.scale_of(gate_up))
        m.gate_up_lora_scale = s_gu if gate_up in lora_cfg.targets and s_gu != m.lora_scale else None
    if n_attached == 0:
        raise ValueError(f"no module of this model matches LoRA targets {lora_cfg.targets}")
    model.lora_config = lora_cfg
    return model


def lora_state_dict(model: nnx.Module) -> dict[str, np.ndarray]:
    """Every attached LoRA factor under its canonical name, as float32 numpy (A [in, R] / [E, in, R], ...)."""
    out = {}
    for name, (m, attr) in _slots(model).items():
        v = getattr(m, attr)
        if v is not None:
            out[name] = np.asarray(jax.device_get(v[...]), dtype=np.float32)
    return out


def load_lora_state_dict(model: nnx.Module, tensors: dict[str, np.ndarray]) -> None:
    """Overwrite attached LoRA factors from canonical names; every attached factor must be given, with its shape."""
    slots = _slots(model)
    attached = {n for n, (m, a) in slots.items() if getattr(m, a) is not None}
    unknown = sorted(set(tensors) - set(slots))
    if unknown:
        raise KeyError(f"{len(unknown)} LoRA tensor name(s) match no module of this model, e.g. {unknown[:3]}")
    not_attached = sorted(set(tensors) - attached)
    if not_attached:
        raise KeyError(f"LoRA tensors for modules without attached LoRA (call attach_lora first with matching "
                       f"targets): {not_attached[:3]}")
    missing = sorted(attached - set(tensors))
    if missing:
        raise KeyError(f"{len(missing)} attached LoRA factor(s) missing from the tensors, e.g. {missing[:3]}")
    # every shape checked before the first write: a mismatch found half-way left the adapters half overwritten
    arrays = {name: np.asarray(value) for name, value in tensors.items()}
    for name, value in arrays.items():
        m, attr = slots[name]
        if tuple(value.shape) != tuple(getattr(m, attr).shape):
            raise ValueError(f"{name}: shape {tuple(value.shape)} does not match the model's "
                             f"{tuple(getattr(m, attr).shape)}")
    for name, value in arrays.items():
        m, attr = slots[name]
        var = getattr(m, attr)
        var[...] = jnp.asarray(value, var[...].dtype)


def save_adapter(model: nnx.Module, path: str | Path) -> Path:
    """Write the model's LoRA as a PEFT adapter folder (adapter_config.json + adapter_model.safetensors)."""
    from shared_math.adapter import write_peft_adapter

    lora_cfg = getattr(model, "lora_config", None)
    if lora_cfg is None:
        raise ValueError("this model has no LoRA attached: call attach_lora or load_model(..., lora=...) first")
    write_peft_adapter(path, lora_cfg, lora_state_dict(model), model.config)
    return Path(path)


def load_adapter(model: nnx.Module, path: str | Path) -> nnx.Module:
    """Load a PEFT adapter folder into `model`, attaching LoRA with the adapter's config if none is attached."""
    from shared_math.adapter import read_peft_adapter

    lora_cfg, tensors = read_peft_adapter(path, model.config)
    current = getattr(model, "lora_config", None)
    if current is None:
        attach_lora(model, lora_cfg)
    elif _layout(current) != _layout(lora_cfg):
        raise ValueError(f"adapter at {path} (target: (rank, scale) {_layout(lora_cfg)}) does not match the "
                         f"attached LoRA ({_layout(current)})")
    load_lora_state_dict(model, tensors)
    return model


def _layout(lora_cfg: LoraConfig) -> dict[str, tuple[int, float]]:
    """target -> (rank, scale): what must agree for an adapter to load into attached LoRA."""
    return {t: (lora_cfg.rank_of(t), lora_cfg.scale_of(t)) for t in lora_cfg.targets}
