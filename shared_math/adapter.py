r"""PEFT LoRA adapters <-> canonical LoRA tensors (docs/CONTRACTS.md, "Canonical LoRA names"), in numpy.

Canonical: `<module path>.lora_A [in, R]`, `.lora_B [R, out]` for Linear modules; for experts
`layers.{l}.mlp.experts.{gate_up_proj,down_proj}.lora_A [E, in, R]` / `.lora_B [E, R, out]`, gate_up's out
columns de-interleaved (gate 0:I, up I:2I) for every family; `y = x @ W + scale · (x @ A) @ B`. R and scale are
per target (`LoraConfig.rank_of` / `scale_of`).

PEFT 0.21 and 0.22 (`adapter_model.safetensors`, keys `base_model.model.model.<module path>.lora_{A,B}.weight`):
- Linear: A `[R, in]`, B `[out, R]`, whether PEFT wraps the module (`target_modules`) or its weight
  (`target_parameters: ["gate_proj.weight"]`, a ParamWrapper of a 2-D parameter).
- Experts (`target_parameters`, `ParamWrapper`): A `[R·E, in]`, expert e in rows e·R:(e+1)·R; B `[out, R·E]`,
  (rank j, expert e) in column j·E + e. in/out follow the math (`x @ A @ B`) for every family: PEFT swaps them
  for `[E, out, in]` parameters and keeps them for gpt-oss's `[E, in, out]`. gpt-oss's gate_up out columns are
  interleaved (gate even, up odd), so B's rows are permuted to and from the canonical order here.
- With both expert tensors targeted PEFT nests two ParamWrappers: down_proj's is outer and is saved as
  `mlp.experts.lora_*`, gate_up's inner one as `mlp.experts.base_layer.lora_*` (observed with peft 0.21.2 for
  Qwen3-MoE and gpt-oss, whatever the order of target_parameters). With one expert target it is `mlp.experts.lora_*`.
  The reader does not rely on this nesting: it identifies the two by their shapes.
- `rank_pattern` / `alpha_pattern`: regexes matched against PEFT's key of each adapted module
  (`model.layers.0.self_attn.q_proj`) or parameter (`model.layers.1.mlp.experts.gate_up_proj`,
  `model.layers.0.mlp.gate_proj.weight`); the first key with `re.match(rf"(.*\.)?({key})$", name)` wins.
- transformers v5 families whose v4 experts were `gate_proj`/`up_proj`/`down_proj` Linears (PEFT_REWRITES_MLP_TARGETS)
  get their adapter config rewritten by PEFT before it adapts anything (`_convert_peft_config_moe`, meant for v4
  adapters): those three names also target the expert parameters, gate_proj + up_proj fused into `gate_up_proj` at
  rank 2r and alpha 2α (`rank_pattern`/`alpha_pattern` `.*\.gate_up_proj`); PEFT saves the rewritten config.
  - PEFT 0.21 moves the names out of `target_modules`, so they never reach the dense MLPs or shared experts there.
  - PEFT 0.22 keeps a name in `target_modules` too where the model has Linears of that name (dense MLPs, shared
    experts): LoRA on those Linears and on the experts. 0.21 silently dropped such an adapter's dense tensors.
  The reader applies 0.22's rewrite, which reads every config 0.21 saved the same way (0.21 never saves these names
  in `target_modules`). The writer names the dense/shared Linears by their weights in `target_parameters`
  (`gate_proj.weight`, ...), which both versions leave alone and apply to exactly those modules.
"""

from __future__ import annotations

import json
import os
import re
import warnings
from collections.abc import Iterator, Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from shared_math.checkpoint import expected_shapes
from shared_math.config import (
    ALL_TARGETS,
    ATTENTION_TARGETS_GQA,
    ATTENTION_TARGETS_MLA,
    DENSE_MLP_TARGETS,
    EXPERT_TARGETS,
    LoraConfig,
    ModelConfig,
    available_targets,
)
from shared_math.safetensors_io import SafetensorsError, SafetensorsFile, fsync_path, write_safetensors

Shape = tuple[int, ...]
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
_PREFIX = "base_model.model.model."
_LINEAR_TARGETS = frozenset(ATTENTION_TARGETS_GQA + ATTENTION_TARGETS_MLA + DENSE_MLP_TARGETS)

# transformers v5 families that `transformers.conversion_mapping` maps to the "qwen2_moe" recipe, for which PEFT
# (`peft/utils/transformers_weight_conversion.py`, 0.21 and 0.22) turns target_modules gate_proj/up_proj/down_proj into
# the expert parameters as well (pinned against the installed PEFT in tests/shared/test_peft_remap.py).
PEFT_REWRITES_MLP_TARGETS = ("qwen3_moe", "deepseek_v3", "glm4_moe", "glm4_moe_lite")

__all__ = ["AdapterError", "PEFT_REWRITES_MLP_TARGETS", "expected_lora_shapes", "read_peft_adapter",
           "write_peft_adapter"]


class AdapterError(ValueError):
    """A PEFT adapter is missing, damaged, unsupported or does not fit the model; the message says which."""


def _lora_sites(model: ModelConfig) -> Iterator[tuple[str, str, Shape]]:
    """(target, canonical module/parameter stem, base weight shape) of every place LoRA can go, in model order."""
    for name, shape in expected_shapes(model).items():
        if _is_expert(name):
            yield "experts." + name.rsplit(".", 1)[1], name, shape
        elif (name.startswith("layers.") and name.endswith(".weight") and len(shape) == 2
              and name.split(".")[-2] in _LINEAR_TARGETS):
            yield name.split(".")[-2], name[: -len(".weight")], shape


def expected_lora_shapes(lora: LoraConfig, model: ModelConfig) -> dict[str, Shape]:
    """Every canonical LoRA tensor name that `lora` implies for `model`, with its shape (per-target ranks)."""
    lora.validate_for(model)
    out: dict[str, Shape] = {}
    for target, stem, shape in _lora_sites(model):
        if target not in lora.targets:
            continue
        R = lora.rank_of(target)
        if len(shape) == 3:
            E, d_in, d_out = shape
            out[stem + ".lora_A"], out[stem + ".lora_B"] = (E, d_in, R), (E, R, d_out)
        else:
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


def _as_peft_parameter(target: str) -> bool:
    """Whether PEFT adapts `target` through `target_parameters` (experts; dense/shared Linears by their weight)."""
    return target in EXPERT_TARGETS or target in DENSE_MLP_TARGETS


def _peft_name(target: str, stem: str, as_parameter: bool) -> str:
    """PEFT's name of one adapted module or parameter, which rank_pattern/alpha_pattern keys are matched against."""
    linear_weight = as_parameter and target not in EXPERT_TARGETS
    return "model." + stem + (".weight" if linear_weight else "")


def _peft_pattern(target: str) -> str:
    """A rank_pattern/alpha_pattern key that matches `target`'s PEFT names (`_peft_name`) and no others."""
    return r".*\." + re.escape(target + (".weight" if target in DENSE_MLP_TARGETS else ""))


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


def write_peft_adapter(path: str | Path, lora: LoraConfig, tensors: Mapping[str, np.ndarray],
                       model: ModelConfig) -> Path:
    """Write canonical LoRA `tensors` as a PEFT adapter folder (adapter_config.json + adapter_model.safetensors)
    that `peft.PeftModel.from_pretrained` loads onto the HF model of `model`, adapting exactly the modules `lora`
    targets with the same numbers. Tensors are written as float32.

    Attention Linears go in `target_modules`; the experts and the dense-MLP / shared-expert Linears in
    `target_parameters` (`mlp.experts.gate_up_proj`, `gate_proj.weight`, ...): PEFT points target_modules
    `gate_proj`/`up_proj`/`down_proj` at the experts (module docstring). Per-target ranks and alphas become
    `rank_pattern`/`alpha_pattern` keys that match only that target's modules.
    """
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
    dense = [t for t in lora.module_targets if t in DENSE_MLP_TARGETS]
    config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": lora.rank, "lora_alpha": lora.alpha,
        "use_rslora": lora.rslora,
        "target_modules": sorted(t for t in lora.module_targets if t not in dense) or None,
        "target_parameters": sorted(lora.expert_targets + tuple(t + ".weight" for t in dense)) or None,
        "lora_dropout": 0.0, "bias": "none", "use_dora": False, "fan_in_fan_out": False, "init_lora_weights": True,
        "inference_mode": True,
        "rank_pattern": {_peft_pattern(t): lora.rank_of(t) for t in lora.targets if lora.rank_of(t) != lora.rank},
        "alpha_pattern": {_peft_pattern(t): lora.alpha_of(t) for t in lora.targets
                          if lora.alpha_of(t) != lora.alpha},
        "modules_to_save": None, "layers_to_transform": None, "layers_pattern": None,
        "base_model_name_or_path": model.hf_config.get("_name_or_path") or None,
    }
    # An adapter already in `root` (the last run's, or the previous save of this one) is replaced only once both new
    # files are complete on disk: each is written beside it under a temporary name, fsynced and renamed over it
    # (rename is atomic on POSIX), weights first. A crash or kill while writing leaves the old adapter whole; one
    # between the two renames leaves new weights under the old config, which the reader refuses by shape if the
    # ranks changed.
    tmp_weights, tmp_config = (root / f".{name}.tmp{os.getpid()}" for name in (ADAPTER_WEIGHTS, ADAPTER_CONFIG))
    try:
        write_safetensors(tmp_weights, out, dtype="float32")
        tmp_config.write_text(json.dumps(config, indent=2) + "\n")
        for tmp in (tmp_weights, tmp_config):
            fsync_path(tmp)
        os.replace(tmp_weights, root / ADAPTER_WEIGHTS)
        os.replace(tmp_config, root / ADAPTER_CONFIG)
    finally:
        for tmp in (tmp_weights, tmp_config):
            tmp.unlink(missing_ok=True)
    fsync_path(root)
    return root


# ---- reading -------------------------------------------------------------------------------------------------------
_UNSUPPORTED = {  # adapter_config.json field -> (value that we support, why)
    "use_dora": (False, "DoRA is not split LoRA"),
    "bias": ("none", "LoRA biases are not supported"),
    "fan_in_fan_out": (False, "fan_in_fan_out (Conv1D layers) does not occur in these models"),
    "modules_to_save": (None, "fully trained extra modules are not part of a split-LoRA adapter"),
    "layers_to_transform": (None, "LoRA on a subset of layers is not supported"),
    "exclude_modules": (None, "LoRA on a subset of a target's modules is not supported"),
}
_PEFT_V5_RENAMES = {"gate_proj": "gate_up_proj", "up_proj": "gate_up_proj", "down_proj": "down_proj"}


def _peft_v5_rewrite(family: str, modules: list[str], params: list[str], r: int, alpha: float,
                     rank_pattern: dict[str, Any], alpha_pattern: dict[str, Any], linears: set[str],
                     where: Path) -> tuple[list[str], list[str], list[str]]:
    """PEFT 0.22's rewrite of an adapter config for transformers v5 MoE families (`_convert_peft_config_moe`), which
    it applies to every adapter it loads: target_modules gate_proj/up_proj/down_proj (or names ending in
    `.gate_proj`, ...) also target the expert parameters, gate + up fused at rank 2r and alpha 2α; a name stays in
    target_modules where the model has Linears of that name (`linears`: its dense MLPs and shared experts), else it
    leaves them (PEFT 0.21 always moved it). Updates the patterns in place; returns (target_modules,
    target_parameters, the target_modules that target the experts)."""
    if family not in PEFT_REWRITES_MLP_TARGETS:
        return modules, params, []
    keep, mapped = [], {}
    for t in modules:
        old = next((o for o in _PEFT_V5_RENAMES if t == o or t.endswith("." + o)), None)
        if old is None or old in linears:
            keep.append(t)
        if old is not None:
            mapped[old] = t
    fused = {"gate_proj", "up_proj"} & set(mapped)
    if len(fused) == 1:
        raise AdapterError(f"{where}: target_modules {sorted(mapped.values())} cannot be loaded on {family}: PEFT "
                           f"fuses gate_proj and up_proj into the experts' gate_up_proj and refuses one without "
                           f"the other. For the dense MLP / shared-expert Linears alone, list them in "
                           f"target_parameters as gate_proj.weight / up_proj.weight / down_proj.weight")
    if len(fused) == 2:  # a dict assignment, as in PEFT: an existing key keeps its place (first match wins)
        rank_pattern[r".*\.gate_up_proj"], alpha_pattern[r".*\.gate_up_proj"] = 2 * r, 2 * alpha
    experts = [n for n in ("gate_up_proj", "down_proj") if n in {_PEFT_V5_RENAMES[o] for o in mapped}]
    return keep, params + [n for n in experts if n not in params], sorted(mapped.values())


def _parameter_target(entry: str) -> str | None:
    """The LoRA target a PEFT `target_parameters` entry names: an expert tensor (`gate_up_proj`,
    `mlp.experts.down_proj`, ...) or a Linear's weight (`gate_proj.weight`), else None."""
    if entry.endswith(".weight"):
        leaf = entry[: -len(".weight")].rsplit(".", 1)[-1]
        return leaf if leaf in _LINEAR_TARGETS else None
    leaf = entry.rsplit(".", 1)[-1]
    if leaf in ("gate_up_proj", "down_proj") and entry in (leaf, "experts." + leaf, "mlp.experts." + leaf):
        return "experts." + leaf
    return None


def _pattern_value(patterns: Mapping[str, Any], name: str, where: Path, field: str) -> Any | None:
    """PEFT's `get_pattern_key`: the value of the first pattern that matches `name` as a dotted suffix, else None."""
    for key, value in patterns.items():
        try:
            if re.match(rf"(.*\.)?({key})$", name):
                return value
        except re.error as e:
            raise AdapterError(f"{where}: {field} key {key!r} is not a valid regex: {e}") from e
    return None


def _lora_config(cfg: Mapping[str, Any], where: Path, model: ModelConfig) -> tuple[LoraConfig, list[str]]:
    """The LoraConfig that PEFT would apply to `model` from adapter_config.json `cfg`, and the target_modules that
    PEFT's v5 rewrite points at the experts (for error messages)."""
    if cfg.get("peft_type") != "LORA":
        raise AdapterError(f"{where}: peft_type is {cfg.get('peft_type')!r}; only LORA adapters are supported")
    for field, (ok, why) in _UNSUPPORTED.items():
        val = cfg.get(field, ok)
        if val != ok and not (ok is None and val in ([], {})):
            raise AdapterError(f"{where}: {field}={val!r} is not supported: {why}")
    if float(cfg.get("lora_dropout") or 0.0) != 0.0:
        # dropout only acts in training; the forward of a loaded adapter is the same, so reading is fine
        warnings.warn(f"{where}: lora_dropout={cfg['lora_dropout']} is ignored (splitmoe LoRA has no dropout)",
                      stacklevel=3)
    modules, params = cfg.get("target_modules") or [], cfg.get("target_parameters") or []
    if isinstance(modules, str) or isinstance(params, str):
        raise AdapterError(f"{where}: regex target_modules/target_parameters ({modules or params!r}) are not "
                           "supported; list module names")
    rank_pattern, alpha_pattern = dict(cfg.get("rank_pattern") or {}), dict(cfg.get("alpha_pattern") or {})
    try:
        r, alpha, rslora = int(cfg["r"]), float(cfg["lora_alpha"]), bool(cfg.get("use_rslora", False))
    except (KeyError, TypeError, ValueError) as e:
        raise AdapterError(f"{where}: r / lora_alpha missing or not numbers: {e}") from e
    present = set(available_targets(model))
    modules, params, rewritten = _peft_v5_rewrite(model.family, list(modules), list(params), r, alpha,
                                                  rank_pattern, alpha_pattern, present & set(DENSE_MLP_TARGETS),
                                                  where)

    # target -> whether PEFT adapts it as a parameter (that decides the names rank_pattern keys are matched against)
    as_param: dict[str, bool] = {}
    for t in modules:
        as_param[t] = False
    for entry in params:
        t = _parameter_target(entry)
        if t is None:
            raise AdapterError(f"{where}: target_parameters entry {entry!r} is not supported: splitmoe adapts the "
                               "expert tensors (mlp.experts.gate_up_proj, mlp.experts.down_proj) and Linear weights "
                               "(gate_proj.weight, ...)")
        if as_param.get(t) is False:
            raise AdapterError(f"{where}: {t} is in both target_modules and target_parameters ({entry!r})")
        as_param[t] = True
    # PEFT skips a target that matches nothing (gate_proj on gpt-oss, which has no dense MLP) if another one matches
    absent = [t for t in ALL_TARGETS if t in as_param and t not in present]  # one order: PEFT saves sets
    if absent and len(absent) < len(as_param):
        warnings.warn(f"{where}: LoRA targets {absent} match no module of this {model.family} model and are "
                      "ignored, as PEFT ignores them", stacklevel=3)
        as_param = {t: v for t, v in as_param.items() if t not in absent}
    try:
        lora = LoraConfig(rank=r, alpha=alpha, targets=tuple(as_param), rslora=rslora)
        lora.validate_for(model)
    except ValueError as e:
        raise AdapterError(f"{where}: {e}") from e

    # per-target rank / alpha, from PEFT's patterns applied to each adapted module's PEFT name
    ranks: dict[str, int] = {}
    alphas: dict[str, float] = {}
    for target in lora.targets:
        names = [_peft_name(target, stem, as_param.get(target, _as_peft_parameter(target)))
                 for t, stem, _ in _lora_sites(model) if t == target]
        for field, patterns, default, out in (("rank_pattern", rank_pattern, r, ranks),
                                              ("alpha_pattern", alpha_pattern, alpha, alphas)):
            values = {n: _pattern_value(patterns, n, where, field) for n in names}
            values = {n: default if v is None else v for n, v in values.items()}
            if len(set(values.values())) > 1:
                raise AdapterError(f"{where}: {field} gives the {target} modules different values "
                                   f"({', '.join(f'{n}: {v}' for n, v in values.items())}); splitmoe supports one "
                                   "rank and one alpha per target")
            value = next(iter(values.values()))
            if value != default:
                out[target] = value
    try:
        lora = LoraConfig(rank=r, alpha=alpha, targets=lora.targets, rslora=rslora, target_ranks=ranks,
                          target_alphas=alphas)
    except ValueError as e:
        raise AdapterError(f"{where}: {e}") from e
    # PEFT saves targets as sets (any order); report them in one fixed order so equal adapters compare equal
    return replace(lora, targets=tuple(t for t in ALL_TARGETS if t in lora.targets)), rewritten


def read_peft_adapter(path: str | Path, model: ModelConfig) -> tuple[LoraConfig, dict[str, np.ndarray]]:
    """Read a PEFT LoRA adapter folder for `model` into (LoraConfig, canonical float32 LoRA tensors), as PEFT 0.22
    would apply it to the HF model: its transformers-v5 rewrite of gate_proj/up_proj/down_proj targets included,
    rank_pattern / alpha_pattern as per-target ranks and alphas.

    Raises AdapterError for missing files, unsupported PEFT options (DoRA, biases, ranks that differ between layers
    of one target, ...), keys that name no LoRA target of the model, wrong shapes and missing tensors. lora_dropout
    is ignored (with a warning): it does not change the forward of a trained adapter.
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
        lora, rewritten = _lora_config(json.loads(cfg_path.read_text()), cfg_path, model)
    except json.JSONDecodeError as e:
        raise AdapterError(f"{cfg_path}: not valid JSON: {e}") from e
    try:
        f = SafetensorsFile(w_path)
    except (ValueError, SafetensorsError) as e:
        raise AdapterError(f"{root}: {e}") from e
    shapes = expected_lora_shapes(lora, model)

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
            stem = _identify_expert(stem, a_shape, b_shape, shapes, w_path)
            A_s, B_s = shapes[stem + ".lora_A"], shapes[stem + ".lora_B"]
            E, R = A_s[0], A_s[2]
            a, b = f.read(ab["lora_A"]), f.read(ab["lora_B"])
            A = a.reshape(E, R, A_s[1]).transpose(0, 2, 1)
            if model.family == "gpt_oss" and stem.endswith("gate_up_proj"):
                b = _deinterleave(b, 0)
            B = b.reshape(B_s[2], R, E).transpose(2, 1, 0)
        else:
            if stem + ".lora_A" not in shapes:
                hint = ""
                if re.search(r"\.experts\.\d+\.", stem):
                    hint = (" (a per-expert adapter from transformers v4; load it with PEFT on transformers v5 and "
                            "save it again)")
                raise AdapterError(f"{w_path}: {ab['lora_A']} names module {stem}, which is not a LoRA target of "
                                   f"this {model.family} model with targets {list(lora.targets)}{hint}")
            A_s, B_s = shapes[stem + ".lora_A"], shapes[stem + ".lora_B"]
            want = ((A_s[1], A_s[0]), (B_s[1], B_s[0]))
            if (a_shape, b_shape) != want:
                raise AdapterError(f"{w_path}: {module} lora_A/lora_B have shapes {list(a_shape)}/{list(b_shape)}, "
                                   f"the model and r={A_s[1]} imply {list(want[0])}/{list(want[1])}")
            A, B = f.read(ab["lora_A"]).T, f.read(ab["lora_B"]).T
        if stem + ".lora_A" in out:
            raise AdapterError(f"{w_path}: two tensor pairs map to {stem}")
        out[stem + ".lora_A"] = np.ascontiguousarray(A, dtype=np.float32)
        out[stem + ".lora_B"] = np.ascontiguousarray(B, dtype=np.float32)
    missing = [n for n in shapes if n not in out]
    if missing:
        hint = ""
        if rewritten and all(_is_expert(n.rsplit(".", 1)[0]) for n in missing):
            hint = (f" (PEFT on transformers v5 makes target_modules {rewritten} of a {model.family} model target "
                    "the experts as well, and this file has no expert tensors: it was written for transformers v4 "
                    "or by an older splitmoe. To load only the dense Linears it names, move those names in "
                    "adapter_config.json from target_modules to target_parameters as gate_proj.weight, "
                    "up_proj.weight, down_proj.weight)")
        raise AdapterError(f"{w_path}: missing LoRA tensors for {len(missing) // 2} target(s) of the adapter "
                           f"config, e.g. {missing[0]} {list(shapes[missing[0]])}{hint}")
    return lora, {n: out[n] for n in shapes}


def _identify_expert(module: str, a_shape: Shape, b_shape: Shape, shapes: Mapping[str, Shape], where: Path) -> str:
    """Which expert parameter a PEFT `mlp.experts` LoRA pair belongs to, by its shapes (A [R·E, in], B [out, R·E]).

    The two candidates can never both match: that would need in = H = I and out = H = 2I."""
    seen = []
    for which in ("gate_up_proj", "down_proj"):
        stem = f"{module}.{which}"
        if stem + ".lora_A" not in shapes:
            continue
        (E, d_in, R), (_, _, d_out) = shapes[stem + ".lora_A"], shapes[stem + ".lora_B"]
        want = ((R * E, d_in), (d_out, R * E))
        seen.append(f"{which}: {list(want[0])}/{list(want[1])}")
        if (a_shape, b_shape) == want:
            return stem
    raise AdapterError(f"{where}: {module} LoRA shapes {list(a_shape)}/{list(b_shape)} match no targeted expert "
                       f"tensor of this model ({'; '.join(seen) or 'no expert targets in adapter_config.json'})")
