"""Helpers that put HF transformers (and PEFT) models next to splitmoe's canonical tensors, for parity tests.

Everything here maps HF's *in-memory* parameters (v5: experts fused as `gate_up_proj [E, 2I, H]`, or gpt-oss's
interleaved `[E, H, 2I]`; PEFT's flattened expert LoRA) to and from the canonical names and layouts of
docs/CONTRACTS.md. It is written independently of `shared_math.checkpoint` / `shared_math.adapter` (which map the
*on-disk* names), so comparing the two is a real check of both.

Typical use in a parity test::

    path = write_tiny_checkpoint("qwen3_moe", tmp_path)
    model = load_hf_model(path)                       # fp32, eager attention and experts
    ref_logits = hf_logits(model, input_ids)
    peft_model = build_peft_model(model, lora_cfg, lora_tensors)   # canonical LoRA -> PEFT
    ref_lora_logits = hf_logits(peft_model, input_ids)

Import only where torch and transformers are installed (tests skip otherwise).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from shared_math.config import LoraConfig, ModelConfig

PEFT_PREFIX = "base_model.model."


# ---- base model ----------------------------------------------------------------------------------------------------
def load_hf_model(path: str | Path, *, dtype: torch.dtype = torch.float32, experts_implementation: str = "eager",
                  attn_implementation: str = "eager", return_info: bool = False) -> Any:
    """`AutoModelForCausalLM.from_pretrained(path)` in eval mode, with eager attention and experts (the most
    literal implementations). With `return_info`, returns `(model, loading_info)` where loading_info lists missing,
    unexpected and mismatched keys."""
    from transformers import AutoModelForCausalLM

    model, info = AutoModelForCausalLM.from_pretrained(
        str(path), dtype=dtype, output_loading_info=True, experts_implementation=experts_implementation,
        attn_implementation=attn_implementation)
    model.eval()
    return (model, info) if return_info else model


def hf_model_from_config(hf_config: Mapping[str, Any], *, seed: int = 0, dtype: torch.dtype = torch.float32) -> Any:
    """A randomly initialised HF model (`torch.manual_seed(seed)`) from a config.json dict, eval mode, eager.

    HF initialises `e_score_correction_bias` to zero, which would hide it; it is set to N(0, 0.1²) here."""
    from transformers import AutoConfig, AutoModelForCausalLM

    kw = {k: v for k, v in hf_config.items() if k not in ("model_type", "transformers_version")}
    config = AutoConfig.for_model(hf_config["model_type"], **kw)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype, experts_implementation="eager",
                                             attn_implementation="eager")
    with torch.no_grad():
        for name, buf in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                buf.copy_(0.1 * torch.randn(buf.shape))
    return model.eval()


def _is_gpt_oss(model: Any) -> bool:
    return model.config.model_type == "gpt_oss"


def _model_state(model: Any) -> dict[str, torch.Tensor]:
    """Parameters and persistent buffers, without PEFT wrappers (works on a PeftModel's base too)."""
    state = dict(model.state_dict())
    if model.config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    return state


def hf_name_to_canonical(name: str, gpt_oss: bool) -> str:
    """HF in-memory parameter name -> canonical name (`model.` dropped, router renamed to `mlp.router`)."""
    if name.startswith("model."):
        name = name[len("model."):]
    if not gpt_oss:
        name = name.replace(".mlp.gate.", ".mlp.router.")
    return name


def _deinterleave(x: np.ndarray) -> np.ndarray:
    return np.concatenate([x[..., 0::2], x[..., 1::2]], axis=-1)


def _interleave(x: np.ndarray) -> np.ndarray:
    half = x.shape[-1] // 2
    out = np.empty_like(x)
    out[..., 0::2], out[..., 1::2] = x[..., :half], x[..., half:]
    return out


def hf_to_canonical(model: Any) -> dict[str, np.ndarray]:
    """Every HF parameter and persistent buffer of `model` as canonical float32 numpy tensors.

    2-D Linear weights are transposed to `[in, out]`; experts become `gate_up_proj [E, H, 2I]` (gate 0:I, up I:2I)
    and `down_proj [E, I, H]`; gpt-oss's interleaved gate/up columns (and bias) are de-interleaved.
    """
    gpt_oss = _is_gpt_oss(model)
    out: dict[str, np.ndarray] = {}
    for name, t in _model_state(model).items():
        if "rotary_emb" in name:
            continue
        a = t.detach().to(torch.float32).cpu().numpy()
        cname = hf_name_to_canonical(name, gpt_oss)
        if cname.endswith((".mlp.experts.gate_up_proj", ".mlp.experts.gate_up_proj_bias")) and gpt_oss:
            a = _deinterleave(a)
        elif cname.endswith((".mlp.experts.gate_up_proj", ".mlp.experts.down_proj")) and not gpt_oss:
            a = a.transpose(0, 2, 1)  # [E, out, in] -> [E, in, out]; gpt-oss is [E, in, out] already
        elif a.ndim == 2 and cname.endswith(".weight") and cname != "embed_tokens.weight":
            a = a.T
        out[cname] = np.ascontiguousarray(a)
    return out


def canonical_to_hf(model: Any, tensors: Mapping[str, np.ndarray]) -> dict[str, torch.Tensor]:
    """The inverse of `hf_to_canonical`: a state dict for `model` (its dtype) built from canonical tensors."""
    gpt_oss = _is_gpt_oss(model)
    out: dict[str, torch.Tensor] = {}
    for name, t in _model_state(model).items():
        if "rotary_emb" in name:
            continue
        a = np.asarray(tensors[hf_name_to_canonical(name, gpt_oss)])
        cname = hf_name_to_canonical(name, gpt_oss)
        if cname.endswith((".mlp.experts.gate_up_proj", ".mlp.experts.gate_up_proj_bias")) and gpt_oss:
            a = _interleave(a)
        elif cname.endswith((".mlp.experts.gate_up_proj", ".mlp.experts.down_proj")) and not gpt_oss:
            a = a.transpose(0, 2, 1)
        elif a.ndim == 2 and cname.endswith(".weight") and cname != "embed_tokens.weight":
            a = a.T
        out[name] = torch.from_numpy(np.ascontiguousarray(a)).to(t.dtype)
    return out


def load_canonical_into(model: Any, tensors: Mapping[str, np.ndarray]) -> Any:
    """Overwrite `model`'s parameters (and persistent buffers) with canonical tensors, in place; returns it."""
    state = canonical_to_hf(model, tensors)
    with torch.no_grad():
        own = model.state_dict()
        for name, t in state.items():
            own[name].copy_(t)
    return model


@torch.no_grad()
def hf_logits(model: Any, input_ids: np.ndarray | torch.Tensor) -> np.ndarray:
    """Logits `[B, T, V]` as float32 numpy for integer `input_ids` `[B, T]` (no cache)."""
    ids = torch.as_tensor(np.asarray(input_ids), dtype=torch.long)
    return model(input_ids=ids, use_cache=False).logits.to(torch.float32).cpu().numpy()


# ---- PEFT --------------------------------------------------------------------------------------------------------
def peft_lora_config(lora: LoraConfig) -> Any:
    """The `peft.LoraConfig` equivalent to splitmoe's LoraConfig (dropout 0, as PEFT's expert LoRA requires).

    Dense-MLP / shared-expert Linears are named by their weights in target_parameters (`gate_proj.weight`): PEFT
    points target_modules gate_proj/up_proj/down_proj at the experts of transformers v5 MoE models (0.21 onto the
    experts alone, 0.22 at the experts as well as those Linears; shared_math/adapter.py). A
    per-target rank or alpha becomes a rank_pattern / alpha_pattern key spelled as the target is (it matches PEFT's
    names of that target's modules as a dotted suffix, and no others)."""
    import peft

    from shared_math.config import DENSE_MLP_TARGETS

    spelled = {t: t + ".weight" if t in DENSE_MLP_TARGETS else t for t in lora.module_targets}
    spelled.update({t: "mlp." + t for t in lora.targets if t not in spelled})  # experts
    return peft.LoraConfig(
        r=lora.rank, lora_alpha=lora.alpha, use_rslora=lora.rslora, lora_dropout=0.0,
        target_modules=[t for t in lora.module_targets if t not in DENSE_MLP_TARGETS] or None,
        target_parameters=[spelled[t] for t in lora.targets if spelled[t] != t] or None,
        rank_pattern={spelled[t]: r for t, r in lora.target_ranks},
        alpha_pattern={spelled[t]: a for t, a in lora.target_alphas})


def _lora_modules(peft_model: Any) -> list[tuple[str, Any, str | None]]:
    """(canonical module path, PEFT LoRA layer, expert parameter name or None for a Linear) for every LoRA layer."""
    from peft.tuners.lora.layer import LoraLayer, ParamWrapper

    found = []
    for name, mod in peft_model.named_modules():
        if not isinstance(mod, LoraLayer):
            continue
        path = name[len(PEFT_PREFIX):] if name.startswith(PEFT_PREFIX) else name
        path = path.removeprefix("model.").replace(".base_layer", "")  # nested ParamWrappers wrap base_layer
        # a ParamWrapper of a 2-D Linear weight (`target_parameters: ["gate_proj.weight"]`) is laid out as a Linear
        expert = isinstance(mod, ParamWrapper) and mod.get_param().ndim == 3
        found.append((path, mod, mod.parameter_name if expert else None))
    return found


def _expert_transposed(peft_model: Any) -> bool:
    return peft_model.get_base_model().config.model_type == "gpt_oss"


def set_peft_lora(peft_model: Any, lora_tensors: Mapping[str, np.ndarray], adapter: str = "default") -> Any:
    """Copy canonical LoRA tensors (CONTRACTS.md names) into a PEFT model's LoRA weights, in place.

    Linear: PEFT A `[R, in]` = canonical A.T, B `[out, R]` = canonical B.T. Experts: PEFT A `[R·E, in]` with expert
    e in rows e·R:(e+1)·R, B `[out, R·E]` with (rank j, expert e) in column j·E + e; for gpt-oss's gate_up the out
    columns are interleaved (gate even, up odd), so canonical B is interleaved on the way in.
    """
    gpt_oss = _expert_transposed(peft_model)
    seen = set()
    with torch.no_grad():
        for path, mod, param in _lora_modules(peft_model):
            name = f"{path}.{param}" if param else path
            A, B = np.asarray(lora_tensors[name + ".lora_A"]), np.asarray(lora_tensors[name + ".lora_B"])
            if param is None:
                a, b = A.T, B.T
            else:
                E, _, R = A.shape
                if gpt_oss and param == "gate_up_proj":
                    B = _interleave(B)
                a = A.transpose(0, 2, 1).reshape(E * R, -1)
                b = B.transpose(2, 1, 0).reshape(B.shape[2], R * E)
            wa, wb = mod.lora_A[adapter].weight, mod.lora_B[adapter].weight
            wa.copy_(torch.from_numpy(np.ascontiguousarray(a)).to(wa.dtype))
            wb.copy_(torch.from_numpy(np.ascontiguousarray(b)).to(wb.dtype))
            seen.update((name + ".lora_A", name + ".lora_B"))
    unused = set(lora_tensors) - seen
    if unused:
        raise KeyError(f"canonical LoRA tensors with no PEFT module: {sorted(unused)[:5]}")
    return peft_model


def peft_to_canonical_lora(peft_model: Any, adapter: str = "default") -> dict[str, np.ndarray]:
    """A PEFT model's LoRA weights as canonical float32 tensors (the inverse of `set_peft_lora`)."""
    gpt_oss = _expert_transposed(peft_model)
    out: dict[str, np.ndarray] = {}
    for path, mod, param in _lora_modules(peft_model):
        a = mod.lora_A[adapter].weight.detach().float().cpu().numpy()
        b = mod.lora_B[adapter].weight.detach().float().cpu().numpy()
        if param is None:
            out[path + ".lora_A"], out[path + ".lora_B"] = a.T.copy(), b.T.copy()
            continue
        E = mod.num_experts
        R = a.shape[0] // E
        A = a.reshape(E, R, -1).transpose(0, 2, 1)
        B = b.reshape(b.shape[0], R, E).transpose(2, 1, 0)
        if gpt_oss and param == "gate_up_proj":
            B = _deinterleave(B)
        out[f"{path}.{param}.lora_A"], out[f"{path}.{param}.lora_B"] = (np.ascontiguousarray(A),
                                                                        np.ascontiguousarray(B))
    return out


def build_peft_model(model: Any, lora: LoraConfig, lora_tensors: Mapping[str, np.ndarray] | None = None) -> Any:
    """Wrap a HF model with PEFT LoRA as `lora` describes and, if given, set its weights from canonical tensors.

    Note that PEFT modifies `model` in place (it becomes the PeftModel's base)."""
    import peft

    pm = peft.get_peft_model(model, peft_lora_config(lora))
    if lora_tensors is not None:
        set_peft_lora(pm, lora_tensors)
    return pm.eval()


def random_lora_tensors(model_cfg: ModelConfig, lora: LoraConfig, seed: int = 0) -> dict[str, np.ndarray]:
    """Random non-zero canonical LoRA tensors (A and B ~ N(0, 1/fan_in)) for every target of `lora` in the model,
    so adapters change the outputs by O(scale)."""
    from shared_math.adapter import expected_lora_shapes

    rng = np.random.default_rng(seed)
    return {n: (rng.standard_normal(s) / np.sqrt(s[-2])).astype(np.float32)
            for n, s in expected_lora_shapes(lora, model_cfg).items()}


def merge_lora(base: Mapping[str, np.ndarray], lora: LoraConfig, lora_tensors: Mapping[str, np.ndarray]
               ) -> dict[str, np.ndarray]:
    """Canonical base tensors with every LoRA merged by hand: W' = W + scale · A @ B (float64, then float32), with
    each target's own scale (`lora.scale_of`).

    This is the semantics the canonical layout promises; a PEFT model must give the logits of the merged model."""
    out = {k: np.asarray(v) for k, v in base.items()}
    for name in lora_tensors:
        if not name.endswith(".lora_A"):
            continue
        stem = name[: -len(".lora_A")]
        A = np.asarray(lora_tensors[name], np.float64)
        B = np.asarray(lora_tensors[stem + ".lora_B"], np.float64)
        expert = stem.endswith((".mlp.experts.gate_up_proj", ".mlp.experts.down_proj"))
        wname, target = (stem, "experts." + stem.rsplit(".", 1)[1]) if expert else (stem + ".weight",
                                                                                    stem.rsplit(".", 1)[1])
        out[wname] = (out[wname].astype(np.float64) + lora.scale_of(target) * (A @ B)).astype(np.float32)
    return out
