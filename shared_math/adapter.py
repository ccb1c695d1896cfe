"""PEFT LoRA adapters <-> canonical LoRA tensors (docs/CONTRACTS.md, "Canonical LoRA names"), in numpy.

Canonical: `<module path>.lora_A [in, R]`, `.lora_B [R, out]` for Linear modules; for experts
`layers.{l}.mlp.experts.{gate_up_proj,down_proj}.lora_A [E, in, R]` / `.lora_B [E, R, out]`, gate_up's out
columns de-interleaved (gate 0:I, up I:2I) for every family; `y = x @ W + scale · (x @ A) @ B`.

PEFT 0.21 (`adapter_model.safetensors`, keys `base_model.model.model.<module path>.lora_{A,B}.weight`):
- Linear: A `[R, in]`, B `[out, R]`.
- Experts (`target_parameters`, `ParamWrapper`): A `[R·E, in]`, expert e in rows e·R:(e+1)·R; B `[out, R·E]`,
  (rank j, expert e) in column j·E + e. in/out follow the math (`x @ A @ B`) for every family: PEFT swaps them
  for `[E, out, in]` parameters and keeps them for gpt-oss's `[E, in, out]`. gpt-oss's gate_up out columns are
  interleaved (gate even, up odd), so B's rows are permuted to and from the canonical order here.
- With both expert tensors targeted PEFT nests two ParamWrappers: down_proj's is outer and is saved as
  `mlp.experts.lora_*`, gate_up's inner one as `mlp.experts.base_layer.lora_*` (observed with peft 0.21.2 for
  Qwen3-MoE and gpt-oss, whatever the order of target_parameters). With one expert target it is `mlp.experts.lora_*`.
  The reader does not rely on this nesting: it identifies the two by their shapes.
"""

from __future__ import annotations

import json
import re
import warnings
from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from shared_math.checkpoint import expected_shapes
from shared_math.config import ALL_TARGETS, EXPERT_TARGETS, LoraConfig, ModelConfig
from shared_math.safetensors_io import SafetensorsError, SafetensorsFile, write_safetensors

Shape = tuple[int, ...]
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
_PREFIX = "base_model.model.model."

__all__ = ["AdapterError", "expected_lora_shapes", "read_peft_adapter", "write_peft_adapter"]


class AdapterError(ValueError):
    """A PEFT adapter is missing, damaged, unsupported or does not fit the model; the message says which."""


def expected_lora_shapes(lora: LoraConfig, model: ModelConfig) -> dict[str, Shape]:
    """Every canonical LoRA tensor name that `lora` implies for `model`, with its shape."""
    lora.validate_for(model)
    R = lora.rank
    modules = set(lora.module_targets)
    out: dict[str, Shape] = {}
    for name, shape in expected_shapes(model).items():
        if name.endswith((".mlp.experts.gate_up_proj", ".mlp.experts.down_proj")):
            if name.split(".mlp.", 1)[1] in lora.targets:  # "experts.gate_up_proj"
                E, d_in, d_out = shape
                out[name + ".lora_A"], out[name + ".lora_B"] = (E, d_in, R), (E, R, d_out)
        elif (name.startswith("layers.") and name.endswith(".weight") and len(shape) == 2
              and name.split(".")[-2] in modules and ".mlp.router." not in name):
            stem = name[: -len(".weight")]
            out[stem + ".lora_A"], out[stem + ".lora_B"] = (shape[0], R), (R, shape[1])
    return out


def _deinterleave(x: np.ndarray, axis: int) -> np.ndarray:
    x = np.moveaxis(x, axis, -1)
    return np.moveaxis(np.concatenate([x[..., 0::2], x[..., 1::2]], axis=-1), -1, axis)


def _interleave(x: np.ndarray, axis: int) -> np.ndarray:
    x = np.moveaxis(x, axis, -1)
    half = x.shape[-1] // 2
    out = np.empty_like(x)
    out[..., 0::2], out[..., 1::2] = x[..., :half], x[..., half:]
    return np.moveaxis(out, -1, axis)


def _is_expert(name: str) -> bool:
    return name.endswith((".mlp.experts.gate_up_proj", ".mlp.experts.down_proj"))


# ---- writing -------------------------------------------------------------------------------------------------------
def _expert_to_peft(A: np.ndarray, B: np.ndarray, interleaved_out: bool) -> tuple[np.ndarray, np.ndarray]:
    E, d_in, R = A.shape
    a = A.transpose(0, 2, 1).reshape(E * R, d_in)  # row e·R + j = A[e, :, j]
    b = B.transpose(2, 1, 0).reshape(B.shape[2], R * E)  # column j·E + e = B[e, j, :]
    return a, (_interleave(b, 0) if interleaved_out else b)


def _peft_key(stem: str, nested_inner: bool) -> str:
    """PEFT's saved key prefix for canonical module/parameter `stem`."""
    if _is_expert(stem):
        module = stem.rsplit(".", 1)[0]  # layers.l.mlp.experts
        return _PREFIX + module + (".base_layer" if nested_inner else "")
    return _PREFIX + stem


# transformers v5 families whose experts were nn.Linear gate/up/down_proj in v4: PEFT (0.21) rewrites the
# target_modules "gate_proj"/"up_proj"/"down_proj" of their adapters into the expert parameters (rank and alpha
# doubled for gate_up), so LoRA on their dense MLPs and shared experts cannot be loaded by PEFT.
PEFT_REWRITES_MLP_TARGETS = ("qwen3_moe", "deepseek_v3", "glm4_moe", "glm4_moe_lite")


def write_peft_adapter(path: str | Path, lora: LoraConfig, tensors: Mapping[str, np.ndarray],
                       model: ModelConfig, *, peft_compatible: bool = True) -> Path:
    """Write canonical LoRA `tensors` as a PEFT adapter folder (adapter_config.json + adapter_model.safetensors)
    that `peft.PeftModel.from_pretrained` loads onto the HF model of `model`. Tensors are written as float32.

    With `peft_compatible` (the default), LoRA on dense-MLP / shared-expert `gate_proj`, `up_proj`, `down_proj` of
    Qwen3-MoE, DeepSeek-V3 and GLM-4.x raises AdapterError: PEFT would silently retarget it to the experts (see
    PEFT_REWRITES_MLP_TARGETS). `peft_compatible=False` writes it anyway; `read_peft_adapter` reads it back.
    """
    mlp = [t for t in lora.module_targets if t in ("gate_proj", "up_proj", "down_proj")]
    if peft_compatible and mlp and model.family in PEFT_REWRITES_MLP_TARGETS:
        raise AdapterError(
            f"LoRA targets {mlp} (dense MLP / shared experts) cannot be exported for PEFT on {model.family}: PEFT "
            "0.21 with transformers v5 rewrites these target_modules to the expert parameters and would not load "
            "them. Drop them from the targets, or pass peft_compatible=False for a file only splitmoe reads.")
    if lora.train_router:
        raise AdapterError("train_router=True: a full router weight is not part of a PEFT LoRA adapter; "
                           "export the router separately (or save a full checkpoint)")
    shapes = expected_lora_shapes(lora, model)
    missing = [n for n in shapes if n not in tensors]
    extra = [n for n in tensors if n not in shapes]
    if missing or extra:
        raise AdapterError(f"LoRA tensors do not match {lora} for {model.family}: missing {missing[:5]}, "
                           f"unexpected {extra[:5]}")
    both_experts = all(t in lora.targets for t in EXPERT_TARGETS)
    out: dict[str, np.ndarray] = {}
    for name in shapes:
        if not name.endswith(".lora_A"):
            continue
        stem = name[: -len(".lora_A")]
        A, B = np.asarray(tensors[name], np.float32), np.asarray(tensors[stem + ".lora_B"], np.float32)
        for n, arr in ((name, A), (stem + ".lora_B", B)):
            if arr.shape != shapes[n]:
                raise AdapterError(f"{n} has shape {list(arr.shape)}, expected {list(shapes[n])}")
        if _is_expert(stem):
            is_gate_up = stem.endswith("gate_up_proj")
            a, b = _expert_to_peft(A, B, interleaved_out=model.family == "gpt_oss" and is_gate_up)
            key = _peft_key(stem, nested_inner=both_experts and is_gate_up)
        else:
            a, b, key = A.T, B.T, _peft_key(stem, False)
        out[key + ".lora_A.weight"], out[key + ".lora_B.weight"] = a, b

    root = Path(path)
    root.mkdir(parents=True, exist_ok=True)
    config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": lora.rank, "lora_alpha": lora.alpha,
        "use_rslora": lora.rslora, "target_modules": sorted(lora.module_targets) or None,
        "target_parameters": sorted(lora.expert_targets) or None, "lora_dropout": 0.0, "bias": "none",
        "use_dora": False, "fan_in_fan_out": False, "init_lora_weights": True, "inference_mode": True,
        "rank_pattern": {}, "alpha_pattern": {}, "modules_to_save": None, "layers_to_transform": None,
        "layers_pattern": None, "base_model_name_or_path": model.hf_config.get("_name_or_path") or None,
    }
    (root / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2) + "\n")
    write_safetensors(root / ADAPTER_WEIGHTS, out, dtype="float32")
    return root


# ---- reading -------------------------------------------------------------------------------------------------------
_UNSUPPORTED = {  # adapter_config.json field -> (value that we support, why)
    "use_dora": (False, "DoRA is not split LoRA"),
    "bias": ("none", "LoRA biases are not supported"),
    "fan_in_fan_out": (False, "fan_in_fan_out (Conv1D layers) does not occur in these models"),
    "modules_to_save": (None, "fully trained extra modules are not part of a split-LoRA adapter"),
    "layers_to_transform": (None, "LoRA on a subset of layers is not supported"),
    "rank_pattern": ({}, "per-module ranks are not supported"),
    "alpha_pattern": ({}, "per-module alphas are not supported"),
}


def _lora_config(cfg: Mapping[str, Any], where: Path) -> LoraConfig:
    if cfg.get("peft_type") != "LORA":
        raise AdapterError(f"{where}: peft_type is {cfg.get('peft_type')!r}; only LORA adapters are supported")
    for field, (ok, why) in _UNSUPPORTED.items():
        val = cfg.get(field, ok)
        if val != ok and not (ok is None and val in ([], {})) and not (ok == {} and val is None):
            raise AdapterError(f"{where}: {field}={val!r} is not supported: {why}")
    if float(cfg.get("lora_dropout") or 0.0) != 0.0:
        # dropout only acts in training; the forward of a loaded adapter is the same, so reading is fine
        warnings.warn(f"{where}: lora_dropout={cfg['lora_dropout']} is ignored (splitmoe LoRA has no dropout)",
                      stacklevel=3)
    modules, params = cfg.get("target_modules") or [], cfg.get("target_parameters") or []
    if isinstance(modules, str) or isinstance(params, str):
        raise AdapterError(f"{where}: regex target_modules/target_parameters ({modules or params!r}) are not "
                           "supported; list module names")
    try:
        lora = LoraConfig(rank=int(cfg["r"]), alpha=float(cfg["lora_alpha"]), targets=tuple(modules) + tuple(params),
                          rslora=bool(cfg.get("use_rslora", False)))
        # PEFT saves targets as sets (any order); report them in one fixed order so equal adapters compare equal
        return replace(lora, targets=tuple(t for t in ALL_TARGETS if t in lora.targets))
    except (KeyError, ValueError) as e:
        raise AdapterError(f"{where}: {e}") from e


def read_peft_adapter(path: str | Path, model: ModelConfig) -> tuple[LoraConfig, dict[str, np.ndarray]]:
    """Read a PEFT LoRA adapter folder for `model` into (LoraConfig, canonical float32 LoRA tensors).

    Raises AdapterError for missing files, unsupported PEFT options (DoRA, biases, per-module ranks, ...),
    keys that name no LoRA target of the model, wrong shapes and missing tensors. lora_dropout is ignored
    (with a warning): it does not change the forward of a trained adapter.
    """
    root = Path(path)
    cfg_path, w_path = root / ADAPTER_CONFIG, root / ADAPTER_WEIGHTS
    if not cfg_path.is_file():
        raise AdapterError(f"{root}: no {ADAPTER_CONFIG}; is this a PEFT adapter folder?")
    if not w_path.is_file():
        hint = " (adapter_model.bin is not supported; re-save with safe_serialization)" if (
            root / "adapter_model.bin").is_file() else ""
        raise AdapterError(f"{root}: no {ADAPTER_WEIGHTS}{hint}")
    try:
        lora = _lora_config(json.loads(cfg_path.read_text()), cfg_path)
    except json.JSONDecodeError as e:
        raise AdapterError(f"{cfg_path}: not valid JSON: {e}") from e
    try:
        lora.validate_for(model)
        f = SafetensorsFile(w_path)
    except (ValueError, SafetensorsError) as e:
        raise AdapterError(f"{root}: {e}") from e
    shapes = expected_lora_shapes(lora, model)
    R = lora.rank

    # group the saved keys by PEFT module (the part before .lora_A/.lora_B.weight)
    groups: dict[str, dict[str, str]] = {}
    for key in f.keys():
        for ab in ("lora_A", "lora_B"):
            suffix = f".{ab}.weight"
            if key.endswith(suffix) and key.startswith(_PREFIX):
                groups.setdefault(key[len(_PREFIX): -len(suffix)], {})[ab] = key
                break
        else:
            raise AdapterError(f"{w_path}: tensor {key} is not a LoRA weight of the form "
                               f"{_PREFIX}<module>.lora_{{A,B}}.weight")
    out: dict[str, np.ndarray] = {}
    for module, ab in groups.items():
        if set(ab) != {"lora_A", "lora_B"}:
            raise AdapterError(f"{w_path}: {module} has only {sorted(ab)}; LoRA needs both lora_A and lora_B")
        a_shape, b_shape = f.info(ab["lora_A"]).shape, f.info(ab["lora_B"]).shape
        stem = module.replace(".base_layer", "")
        if stem.endswith(".mlp.experts"):
            stem = _identify_expert(stem, a_shape, b_shape, shapes, R, w_path)
            A_s, B_s = shapes[stem + ".lora_A"], shapes[stem + ".lora_B"]
            E = A_s[0]
            a, b = f.read(ab["lora_A"]), f.read(ab["lora_B"])
            A = a.reshape(E, R, A_s[1]).transpose(0, 2, 1)
            if model.family == "gpt_oss" and stem.endswith("gate_up_proj"):
                b = _deinterleave(b, 0)
            B = b.reshape(B_s[2], R, E).transpose(2, 1, 0)
        else:
            if stem + ".lora_A" not in shapes:
                v4 = (" (a per-expert adapter from transformers v4; load it with PEFT on transformers v5 and "
                      "save it again)") if re.search(r"\.experts\.\d+\.", stem) else ""
                raise AdapterError(f"{w_path}: {ab['lora_A']} names module {stem}, which is not a LoRA target of "
                                   f"this {model.family} model with targets {list(lora.targets)}{v4}")
            A_s, B_s = shapes[stem + ".lora_A"], shapes[stem + ".lora_B"]
            want = ((A_s[1], A_s[0]), (B_s[1], B_s[0]))
            if (a_shape, b_shape) != want:
                raise AdapterError(f"{w_path}: {module} lora_A/lora_B have shapes {list(a_shape)}/{list(b_shape)}, "
                                   f"the model and r={R} imply {list(want[0])}/{list(want[1])}")
            A, B = f.read(ab["lora_A"]).T, f.read(ab["lora_B"]).T
        if stem + ".lora_A" in out:
            raise AdapterError(f"{w_path}: two tensor pairs map to {stem}")
        out[stem + ".lora_A"] = np.ascontiguousarray(A, dtype=np.float32)
        out[stem + ".lora_B"] = np.ascontiguousarray(B, dtype=np.float32)
    missing = [n for n in shapes if n not in out]
    if missing:
        raise AdapterError(f"{w_path}: missing LoRA tensors for {len(missing) // 2} target(s) of the adapter "
                           f"config, e.g. {missing[0]} {list(shapes[missing[0]])}")
    return lora, {n: out[n] for n in shapes}


def _identify_expert(module: str, a_shape: Shape, b_shape: Shape, shapes: Mapping[str, Shape], R: int,
                     where: Path) -> str:
    """Which expert parameter a PEFT `mlp.experts` LoRA pair belongs to, by its shapes (A [R·E, in], B [out, R·E]).

    The two candidates can never both match: that would need in = H = I and out = H = 2I."""
    seen = []
    for which in ("gate_up_proj", "down_proj"):
        stem = f"{module}.{which}"
        if stem + ".lora_A" not in shapes:
            continue
        (E, d_in, _), (_, _, d_out) = shapes[stem + ".lora_A"], shapes[stem + ".lora_B"]
        want = ((R * E, d_in), (d_out, R * E))
        seen.append(f"{which}: {list(want[0])}/{list(want[1])}")
        if (a_shape, b_shape) == want:
            return stem
    raise AdapterError(f"{where}: {module} LoRA shapes {list(a_shape)}/{list(b_shape)} match no targeted expert "
                       f"tensor of this model ({'; '.join(seen) or 'no expert targets in adapter_config.json'})")
