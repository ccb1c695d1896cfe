"""Split LoRA: adapters attached to a model, never merged into its weights, and their import/export.

Shape legend: R rank · E experts · H hidden · I expert intermediate. A Linear with LoRA computes
`x @ W (+ b) + s · (x @ A) @ B` with A `[in, R]`, B `[R, out]`; experts hold `A [E, in, R]`, `B [E, R, out]` pairs on
the fused gate_up and on down (`torch_impl.moe.Experts`). R and s are per target (`LoraConfig.rank_of` /
`scale_of`: PEFT's rank_pattern / alpha_pattern). B starts at zero and A is kaiming-uniform as in PEFT
(U(±1/sqrt(in))), so a fresh adapter changes nothing.

LoRA parameters are fp32 whatever the model dtype (PEFT keeps adapter weights in fp32 too). Expert LoRA factors are
cast to the activation dtype where they are used (the experts' LoRA GEMMs run in the model's dtype); a Linear's LoRA
branch runs in fp32 and is rounded once with the base output, as PEFT's Linear does (on CUDA through
`kernels.lora_linear`: the same sums, without the fp32 copies of x, z @ B, dy and dx; `fused_lora_linear`;
SPLITMOE_LORA_LINEAR=torch keeps the unfused ops).
Only LoRA parameters require grad; `LoraConfig.train_router` also unfreezes the router weights.

Names: `lora_state_dict` and `load_lora_state_dict` use the canonical LoRA names of docs/CONTRACTS.md;
`save_adapter` / `load_adapter` write and read PEFT's format through `shared_math.adapter`.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
import torch
from torch import nn

from shared_math.adapter import read_peft_adapter, write_peft_adapter
from shared_math.config import EXPERT_TARGETS, LoraConfig
from torch_impl.models.layers import Linear
from torch_impl.moe import Experts, MoEBlock

_EXPERT_PARAMS = {"gate_up_proj": ("gate_up_lora_A", "gate_up_lora_B"), "down_proj": ("down_lora_A", "down_lora_B")}


def lora_z(x: torch.Tensor, lora_a: torch.Tensor) -> torch.Tensor:
    """z = x @ A in A's dtype, on x cast to it (PEFT's Linear runs its LoRA branch so), or fused without the cast's
    copy where `fused_lora_linear` says so (`kernels.lora_linear.lora_z`: the same sums); A [in, R] or the
    concatenated factors of projections that share x (`models.layers.project`). jax_impl.lora.lora_z's twin."""
    if fused_lora_linear(x, lora_a):
        from torch_impl.kernels import lora_linear  # imports triton: only where it is asked for

        return lora_linear.lora_z(x, lora_a)
    return x.to(lora_a.dtype) @ lora_a


class LoRALinear(nn.Module):
    """`x @ weight (+ bias) + scale · (x @ lora_A) @ lora_B`; weight [in, out] and bias frozen, lora_A [in, R],
    lora_B [R, out] trainable. Built from a `Linear` (sharing its weight and bias tensors)."""

    def __init__(self, base: Linear, rank: int, scale: float, *, generator: torch.Generator | None = None,
                 lora_dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight, self.bias = base.weight, base.bias
        self.scale = scale
        dev = base.weight.device
        self.lora_A = nn.Parameter(_kaiming_a((self.in_features, rank), self.in_features, generator, lora_dtype, dev))
        self.lora_B = nn.Parameter(torch.zeros(rank, self.out_features, dtype=lora_dtype, device=dev))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # PEFT's Linear: the LoRA branch runs in the factors' dtype (fp32) on x cast to it, is added to the rounded
        # base output, and the sum is rounded once to x's dtype (as jax_impl's LoRALinear). In bf16 the cheaper
        # all-bf16 branch measured 2x HF's own bf16 error on MLA's chained q_a -> q_b LoRA (tiny DeepSeek-V3).
        return self.forward_with_z(x, lora_z(x, self.lora_A))

    def forward_with_z(self, x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """The forward given z = x @ lora_A in lora_A's dtype (`models.layers.project` computes it for several
        projections of one x at once)."""
        y = x @ self.weight
        if self.bias is not None:
            y = y + self.bias
        if z.dtype == self.lora_B.dtype and fused_lora_linear(y, self.lora_B):
            from torch_impl.kernels import lora_linear

            # the same sum in one Triton kernel, the fp32 z @ B never written (`kernels.lora_linear`)
            return lora_linear.lora_add(y, z, self.lora_B, self.scale)
        delta = z @ self.lora_B.to(z.dtype)
        if y.dtype == delta.dtype:
            return y + self.scale * delta
        # y + s·delta in fp32, rounded once into y's storage: one kernel where the literal form takes four (y cast
        # up, the scale, the add, the cast down), with the same result (TensorIterator computes a mixed-dtype
        # in-place add in the promoted dtype, fp32, and casts once). y is free to overwrite: x @ W saves x, not y.
        return y.add_(delta, alpha=self.scale)


LORA_LINEAR_ENV = "SPLITMOE_LORA_LINEAR"
_LORA_LINEAR_CHOICES = ("auto", "torch", "triton")


def lora_linear_mode() -> str:
    """`SPLITMOE_LORA_LINEAR`: "auto" (unset: the fused kernels on CUDA, the torch ops elsewhere), "torch" (the
    unfused ops everywhere) or "triton" (`torch_impl.kernels.lora_linear` on CUDA, and on the CPU under the Triton
    interpreter, for tests); anything else is refused with the choices."""
    value = os.environ.get(LORA_LINEAR_ENV, "") or "auto"
    if value not in _LORA_LINEAR_CHOICES:
        raise ValueError(f"{LORA_LINEAR_ENV}={value!r}: use one of {', '.join(_LORA_LINEAR_CHOICES)} (or leave it "
                         "unset: auto)")
    return value


def fused_lora_linear(act: torch.Tensor, factor: torch.Tensor) -> bool:
    """Whether a LoRA Linear's branch runs through `kernels.lora_linear` (`lora_z`, `lora_add`): not switched off
    (`lora_linear_mode()`), low-precision activations `act` (x or y) with fp32 factors (the mixed case those kernels
    fuse; equal dtypes run the torch ops as before), and a device the kernels run on: CUDA, or, when "triton" is asked
    for, the CPU under the Triton interpreter. The default since 2026-12-07 (benchmarks/REPORT.md, session 20, H100):
    with grouped_gemm_tn's split mode it took Qwen3-30B-A3B's 16K step from 831.8 to 795.2 ms; alone, on gpt-oss-20b's
    16K step, it saved 1.4 ms and 0.34 GiB of peak memory."""
    mode = lora_linear_mode()
    if mode == "torch":
        return False
    if act.dtype not in (torch.bfloat16, torch.float16) or factor.dtype != torch.float32:
        return False
    return act.device.type == "cuda" or (mode == "triton" and act.device.type == "cpu"
                                         and os.environ.get("TRITON_INTERPRET") == "1")


def _kaiming_a(shape: tuple[int, ...], fan_in: int, generator, dtype, device) -> torch.Tensor:
    """PEFT's kaiming_uniform_(a=sqrt(5)) on its [R, in] weight: U(-1/sqrt(in), 1/sqrt(in))."""
    bound = 1.0 / math.sqrt(fan_in)
    a = torch.rand(shape, generator=generator, dtype=torch.float32) * (2 * bound) - bound
    return a.to(dtype=dtype, device=device)


def _expert_blocks(model: nn.Module) -> list[tuple[str, Experts]]:
    return [(name, m) for name, m in model.named_modules() if isinstance(m, Experts)]


def attach_lora(model: nn.Module, lora_cfg: LoraConfig, *, seed: int | None = None,
                lora_dtype: torch.dtype = torch.float32) -> nn.Module:
    """Attach fresh split-LoRA adapters (A random, B zero) for `lora_cfg.targets` to `model`, in place; returns it.

    Each target gets its own rank and scale (`lora_cfg.rank_of` / `scale_of`). Raises ValueError naming any target
    the model does not have (`LoraConfig.validate_for`), or when the model already has adapters. Afterwards only
    LoRA parameters (and the router weights with `train_router`) require grad.
    """
    lora_cfg.validate_for(model.config)
    if getattr(model, "lora_config", None) is not None:
        raise ValueError(f"the model already has LoRA adapters ({model.lora_config}); build a fresh model to attach "
                         "different ones, or load weights with load_lora_state_dict")
    gen = torch.Generator().manual_seed(seed) if seed is not None else None
    for p in model.parameters():
        p.requires_grad_(False)
    module_targets = set(lora_cfg.module_targets)
    for name, mod in list(model.named_modules()):
        for child_name, child in list(mod.named_children()):
            if isinstance(child, Linear) and child_name in module_targets and name.startswith("layers."):
                setattr(mod, child_name, LoRALinear(child, lora_cfg.rank_of(child_name), lora_cfg.scale_of(child_name),
                                                    generator=gen, lora_dtype=lora_dtype))
    gate_up, down = EXPERT_TARGETS
    for _, experts in _expert_blocks(model):
        # Experts hold one scale (down's, or gate_up's alone) and gate_up's own where it differs
        experts.lora_scale = lora_cfg.scale_of(down if down in lora_cfg.targets else gate_up)
        s_gu = lora_cfg.scale_of(gate_up)
        experts.gate_up_lora_scale = s_gu if gate_up in lora_cfg.targets and s_gu != experts.lora_scale else None
        for param, (a_name, b_name) in _EXPERT_PARAMS.items():
            if "experts." + param not in lora_cfg.targets:
                continue
            R = lora_cfg.rank_of("experts." + param)
            E, d_in, d_out = getattr(experts, param).shape
            dev = getattr(experts, param).device
            setattr(experts, a_name, nn.Parameter(_kaiming_a((E, d_in, R), d_in, gen, lora_dtype, dev)))
            setattr(experts, b_name, nn.Parameter(torch.zeros(E, R, d_out, dtype=lora_dtype, device=dev)))
    if lora_cfg.train_router:
        for m in model.modules():
            if isinstance(m, MoEBlock):
                m.router.weight.requires_grad_(True)
    model.lora_config = lora_cfg
    return model


def _lora_params(model: nn.Module) -> dict[str, nn.Parameter]:
    """Canonical LoRA name -> parameter."""
    out: dict[str, nn.Parameter] = {}
    for name, mod in model.named_modules():
        if isinstance(mod, LoRALinear):
            out[f"{name}.lora_A"], out[f"{name}.lora_B"] = mod.lora_A, mod.lora_B
        elif isinstance(mod, Experts):
            for param, (a_name, b_name) in _EXPERT_PARAMS.items():
                if getattr(mod, a_name) is not None:
                    out[f"{name}.{param}.lora_A"] = getattr(mod, a_name)
                    out[f"{name}.{param}.lora_B"] = getattr(mod, b_name)
    return out


def lora_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """Canonical LoRA name -> the model's parameter (sharded ones under `torch_impl.parallel`)."""
    return _lora_params(model)


def lora_state_dict(model: nn.Module) -> dict[str, np.ndarray]:
    """Every LoRA tensor of `model` as float32 numpy, under its canonical name (docs/CONTRACTS.md): copies, as
    jax_impl's are (for fp32 CPU parameters `.float().cpu().numpy()` returned views that later steps changed)."""
    return {n: p.detach().to(device="cpu", dtype=torch.float32, copy=True).numpy()
            for n, p in _lora_params(model).items()}


def load_lora_state_dict(model: nn.Module, tensors: dict[str, np.ndarray]) -> nn.Module:
    """Copy canonical LoRA tensors into `model`'s adapters (which must be attached); every adapter tensor must be
    given, with its shape, and no other."""
    params = _lora_params(model)
    if not params:
        raise ValueError("the model has no LoRA adapters; call attach_lora(model, lora_cfg) first")
    missing = sorted(set(params) - set(tensors))
    extra = sorted(set(tensors) - set(params))
    if missing or extra:
        raise ValueError(f"LoRA tensors do not match the model's adapters: {len(missing)} missing "
                         f"(e.g. {missing[:5]}), {len(extra)} unexpected (e.g. {extra[:5]})")
    # every shape checked before the first copy: a mismatch found half-way left the adapters half overwritten
    arrays = {name: np.asarray(tensors[name]) for name in params}
    for name, p in params.items():
        if tuple(arrays[name].shape) != tuple(p.shape):
            raise ValueError(f"LoRA tensor {name} has shape {tuple(arrays[name].shape)}, the model needs "
                             f"{tuple(p.shape)}")
    with torch.no_grad():
        for name, p in params.items():
            p.copy_(torch.as_tensor(arrays[name]).to(p.dtype))
    return model


def save_adapter(model: nn.Module, path: str | Path) -> Path:
    """Write the model's adapters as a PEFT adapter folder that `peft.PeftModel.from_pretrained` loads onto HF."""
    lora_cfg = getattr(model, "lora_config", None)
    if lora_cfg is None:
        raise ValueError("the model has no LoRA adapters to save")
    return write_peft_adapter(path, lora_cfg, lora_state_dict(model), model.config)


def load_adapter(model: nn.Module, path: str | Path) -> nn.Module:
    """Load a PEFT adapter folder into `model`: attaches adapters with the adapter's config if the model has none;
    if it has some, their config must match the adapter's."""
    lora_cfg, tensors = read_peft_adapter(path, model.config)
    current = getattr(model, "lora_config", None)
    if current is None:
        attach_lora(model, lora_cfg)
    elif _layout(current) != _layout(lora_cfg):
        raise ValueError(f"adapter at {path} is {lora_cfg}, but the model has {current} attached")
    return load_lora_state_dict(model, tensors)


def _layout(lora_cfg: LoraConfig) -> dict[str, tuple[int, float]]:
    """target -> (rank, scale): what must agree for an adapter to load into attached LoRA."""
    return {t: (lora_cfg.rank_of(t), lora_cfg.scale_of(t)) for t in lora_cfg.targets}
