"""PEFT's rewrite of gate_proj/up_proj/down_proj targets on transformers v5 MoE models, and adapters both ways.

What PEFT does when target_modules name gate_proj/up_proj/down_proj (pinned by `test_what_peft_does`, against the
installed PEFT):

- qwen3_moe, deepseek_v3, glm4_moe, glm4_moe_lite: the names become the expert parameters too; LoRA goes on the
  experts (gate_up at rank 2r and alpha 2α, B dense rather than block-diagonal; down at r). Saved:
  target_parameters [gate_up_proj, down_proj], rank_pattern and alpha_pattern {".*\\.gate_up_proj": 2r / 2α}.
  With rsLoRA, gate_up's scale is then √2 times down's.
  - PEFT 0.21 also takes the names out of target_modules: never LoRA on the dense MLPs or shared experts.
  - PEFT 0.22 keeps them where the model has such Linears (every tiny preset here has a dense layer or shared
    experts), so those get LoRA at r as well.
- gpt_oss: nothing is adapted for them (it has no such modules); target_modules are saved unchanged.

(a) An adapter PEFT made that way (random non-zero A and B) loads into torch_impl and jax_impl as PEFT applies it:
    per-target rank and alpha, rsLoRA's unequal gate_up / down scales included; logits equal HF + PEFT's.
(b) An adapter of ours with LoRA on every target (dense MLP and shared experts included) and per-target ranks and
    alphas loads in `peft.PeftModel.from_pretrained` onto exactly the modules we trained, with the same tensors and
    scales; logits equal ours.
"""

from __future__ import annotations

import copy
import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from shared_math.adapter import PEFT_REWRITES_MLP_TARGETS, AdapterError, read_peft_adapter, write_peft_adapter
from shared_math.checkpoint import read_checkpoint, write_tiny_checkpoint
from shared_math.config import (
    ATTENTION_TARGETS_GQA,
    ATTENTION_TARGETS_MLA,
    DENSE_MLP_TARGETS,
    SUPPORTED_MODEL_TYPES,
    LoraConfig,
    ModelConfig,
    available_targets,
)
from shared_math.numerics import assert_close
from shared_math.tiny import tiny_hf_config
from tests.conftest import HAS_JAX, requires_transformers

torch = pytest.importorskip("torch")
pytest.importorskip("peft")

MLP = ["gate_proj", "up_proj", "down_proj"]


def _peft_keeps_mlp_linears() -> bool:
    """Whether the installed PEFT keeps target_modules gate_proj/up_proj/down_proj on a v5 MoE model's dense MLPs and
    shared experts next to the experts (0.22 on) rather than moving them onto the experts alone (0.21)."""
    import peft

    return tuple(int(p) for p in peft.__version__.split(".")[:2]) >= (0, 22)
# a dense first layer for Qwen3-MoE too (the other families with dense MLPs have one in the tiny presets)
OVERRIDES = {"qwen3_moe": {"mlp_only_layers": [0]}}
IDS = np.array([[3, 17, 99, 5, 64, 2, 127, 40, 8, 11, 90, 33], [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12]])
IMPLS = ["torch", "jax"]


def _attention(cfg: ModelConfig) -> list[str]:
    return [t for t in available_targets(cfg) if t in ATTENTION_TARGETS_GQA + ATTENTION_TARGETS_MLA]


def _peft_layers(pm) -> dict[str, set[tuple[int, float, float]]]:
    """splitmoe target -> the (rank, alpha, scaling) of every PEFT LoRA layer of that target."""
    from peft.tuners.lora.layer import LoraLayer, ParamWrapper

    out: dict[str, set] = {}
    for name, m in pm.named_modules():
        if isinstance(m, LoraLayer):
            expert = isinstance(m, ParamWrapper) and m.get_param().ndim == 3
            target = "experts." + m.parameter_name if expert else name.replace(".base_layer", "").rsplit(".", 1)[1]
            out.setdefault(target, set()).add((m.r["default"], m.lora_alpha["default"], m.scaling["default"]))
    return out


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    made: dict[str, tuple[Path, ModelConfig]] = {}

    def make(family: str) -> tuple[Path, ModelConfig]:
        if family not in made:
            path = write_tiny_checkpoint(family, tmp_path_factory.mktemp(family), seed=7,
                                         **OVERRIDES.get(family, {}))
            made[family] = path, read_checkpoint(path)[0]
        return made[family]

    return make


def _randomize_lora(model, seed: int) -> None:
    """Non-zero A and B in every PEFT LoRA weight, ~N(0, 1/(4·fan_in)): the adapter still moves logits by 3-5.

    At the full N(0, 1/fan_in) some draws (tiny DeepSeek-V3 / GLM-4.7-Flash, 2 of 8) amplified fp32 rounding (PEFT
    merges W + s·B·A, we compute x·W + s·(x·A)·B) to 1.5e-5 of max|logit|, over the fp32 logits tolerance;
    at half that size every draw measured under 1e-6."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".lora_A." in name or ".lora_B." in name:
                p.copy_(0.5 * torch.randn(p.shape, generator=gen) / p.shape[1] ** 0.5)


def _impl_model(impl: str, path: Path, *, adapter: Path | None = None, lora: LoraConfig | None = None,
                tensors: dict | None = None) -> tuple[np.ndarray, object, object]:
    """(fp32 logits, model, its lora module) of `impl`'s model of `path`, with `adapter` loaded by load_adapter or
    with `lora` attached and `tensors` set."""
    if impl == "torch":
        import torch_impl
        from torch_impl import lora as L

        model = torch_impl.load_model(path, lora=lora)
        L.load_adapter(model, adapter) if adapter is not None else L.load_lora_state_dict(model, tensors)
        with torch.no_grad():
            return model(torch.as_tensor(IDS)).logits.numpy(), model, L
    if not HAS_JAX:
        pytest.skip("jax/flax are not installed")
    import jax.numpy as jnp

    import jax_impl
    from jax_impl import lora as L

    model = jax_impl.load_model(path, lora=lora)
    L.load_adapter(model, adapter) if adapter is not None else L.load_lora_state_dict(model, tensors)
    return np.asarray(model(jnp.asarray(IDS)).logits), model, L


# ---- what PEFT does ------------------------------------------------------------------------------------------------
@requires_transformers
@pytest.mark.filterwarnings("ignore:The following (rank|alpha)_pattern keys did not match")
@pytest.mark.filterwarnings("ignore:.*match no module of this gpt_oss model")
@pytest.mark.parametrize("family", SUPPORTED_MODEL_TYPES)
def test_what_peft_does(tmp_path, tiny, family):
    """PEFT_REWRITES_MLP_TARGETS is exactly the families where PEFT moves gate/up/down_proj onto the experts, and
    read_peft_adapter reports the targets, ranks, alphas and scales of the LoRA layers PEFT actually made."""
    import peft

    from tests.shared.hf_helpers import load_hf_model

    path, cfg = tiny(family)
    pm = peft.get_peft_model(load_hf_model(path), peft.LoraConfig(r=2, lora_alpha=4, target_modules=["o_proj"] + MLP))
    pc = pm.peft_config["default"]
    layers = _peft_layers(pm)
    if family in PEFT_REWRITES_MLP_TARGETS:
        # the dense MLPs / shared experts: from 0.22 on PEFT keeps their names (every tiny preset has one of them)
        linears = set(MLP) if _peft_keeps_mlp_linears() else set()
        assert set(pc.target_modules) == {"o_proj"} | linears
        assert set(pc.target_parameters) == {"gate_up_proj", "down_proj"}
        assert pc.rank_pattern == {r".*\.gate_up_proj": 4} and pc.alpha_pattern == {r".*\.gate_up_proj": 8}
        assert layers == {"o_proj": {(2, 4, 2.0)}, "experts.gate_up_proj": {(4, 8, 2.0)},
                          "experts.down_proj": {(2, 4, 2.0)}} | {t: {(2, 4, 2.0)} for t in linears}
    else:
        assert set(pc.target_modules) == {"o_proj"} | set(MLP) and not pc.target_parameters
        assert layers == {"o_proj": {(2, 4, 2.0)}}
    pm.save_pretrained(tmp_path)
    lora = read_peft_adapter(tmp_path, cfg)[0]
    assert {t: {(lora.rank_of(t), lora.alpha_of(t), lora.scale_of(t))} for t in lora.targets} == layers


# ---- (a) PEFT's adapter -> ours ------------------------------------------------------------------------------------
CASES_A = [(f, False) for f in SUPPORTED_MODEL_TYPES] + [("deepseek_v3", True), ("qwen3_moe", True)]


@requires_transformers
@pytest.mark.filterwarnings("ignore:The following (rank|alpha)_pattern keys did not match")
@pytest.mark.filterwarnings("ignore:.*match no module of this gpt_oss model")
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("family,rslora", CASES_A, ids=[f"{f}{'-rslora' if r else ''}" for f, r in CASES_A])
def test_peft_made_adapter_loads_as_peft_applies_it(tmp_path, tiny, family, rslora, impl):
    import peft

    from tests.shared.hf_helpers import hf_logits, load_hf_model, peft_to_canonical_lora

    path, cfg = tiny(family)
    base = load_hf_model(path)
    pm = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(
        r=2, lora_alpha=4, use_rslora=rslora, target_modules=_attention(cfg) + MLP)).eval()
    _randomize_lora(pm, seed=3)
    want = hf_logits(pm, IDS)
    assert np.abs(want - hf_logits(base, IDS)).max() > 0.05  # the adapter matters
    pm.save_pretrained(tmp_path)

    if family == "gpt_oss":  # PEFT ignores the MLP names there, and so do we (saying so)
        with pytest.warns(UserWarning, match=r"LoRA targets \['gate_proj', 'up_proj', 'down_proj'\] match no module"):
            lora, tensors = read_peft_adapter(tmp_path, cfg)
    else:
        lora, tensors = read_peft_adapter(tmp_path, cfg)
    if family in PEFT_REWRITES_MLP_TARGETS:
        linears = set(MLP) & set(available_targets(cfg)) if _peft_keeps_mlp_linears() else set()
        assert set(lora.targets) == set(_attention(cfg)) | {"experts.gate_up_proj", "experts.down_proj"} | linears
        assert (lora.rank, lora.alpha, lora.rslora) == (2, 4.0, rslora)
        assert dict(lora.target_ranks) == {"experts.gate_up_proj": 4}
        assert dict(lora.target_alphas) == {"experts.gate_up_proj": 8.0}
    else:
        assert set(lora.targets) == set(_attention(cfg)) and not lora.target_ranks
    expected = peft_to_canonical_lora(pm)
    assert set(tensors) == set(expected)
    for name, t in tensors.items():
        np.testing.assert_array_equal(t, expected[name], err_msg=name)

    got, model, _ = _impl_model(impl, path, adapter=tmp_path)
    assert model.lora_config == lora
    assert_close(got, want, dtype="float32", quantity="logits", name=f"{impl}(PEFT's adapter) vs HF+PEFT")


# ---- (b) our adapter -> PEFT ---------------------------------------------------------------------------------------
def _every_target(cfg: ModelConfig, rslora: bool) -> LoraConfig:
    """LoRA on every target of the model, with per-target ranks and alphas on a dense, an attention and an expert
    target (gate_up's scale then differs from down's, as with rsLoRA in PEFT's rewrite)."""
    targets = available_targets(cfg)
    dense = "gate_proj" if "gate_proj" in targets else "q_proj"
    attn = "o_proj"
    return LoraConfig(rank=2, alpha=4.0, targets=targets, rslora=rslora,
                      target_ranks={"experts.gate_up_proj": 3, dense: 4},
                      target_alphas={"experts.gate_up_proj": 5.0, attn: 7.0})


CASES_B = [(f, False) for f in SUPPORTED_MODEL_TYPES] + [("glm4_moe", True)]


@requires_transformers
@pytest.mark.filterwarnings("ignore:The following (rank|alpha)_pattern keys did not match")
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("family,rslora", CASES_B, ids=[f"{f}{'-rslora' if r else ''}" for f, r in CASES_B])
def test_our_adapter_loads_in_peft_onto_the_same_modules(tmp_path, tiny, family, rslora, impl):
    import peft

    from tests.shared.hf_helpers import hf_logits, load_hf_model, peft_to_canonical_lora, random_lora_tensors

    path, cfg = tiny(family)
    lora = _every_target(cfg, rslora)
    tensors = random_lora_tensors(cfg, lora, seed=11)
    ours, model, L = _impl_model(impl, path, lora=lora, tensors=tensors)
    L.save_adapter(model, tmp_path)

    base = load_hf_model(path)
    assert np.abs(ours - hf_logits(base, IDS)).max() > 0.05  # the adapter matters
    pm = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path)).eval()
    # PEFT adapted exactly our modules, with our tensors and each target's scale
    back = peft_to_canonical_lora(pm)
    assert set(back) == set(tensors)
    for name, t in tensors.items():
        np.testing.assert_array_equal(back[name], t, err_msg=name)
    assert _peft_layers(pm) == {t: {(lora.rank_of(t), lora.alpha_of(t), lora.scale_of(t))} for t in lora.targets}
    assert any(".shared_experts." in n or ".mlp.gate_proj" in n for n in back) == (family != "gpt_oss")
    assert_close(hf_logits(pm, IDS), ours, dtype="float32", quantity="logits", name=f"PEFT({impl}'s adapter)")
    # and back: the file reads as the same config and tensors
    lora2, tensors2 = read_peft_adapter(tmp_path, cfg)
    assert set(lora2.targets) == set(lora.targets) and replace(lora2, targets=lora.targets) == lora
    for name, t in tensors.items():
        np.testing.assert_array_equal(tensors2[name], t, err_msg=name)


# ---- file format and errors (numpy only) ---------------------------------------------------------------------------
def test_writer_names_dense_linears_by_their_weights(tmp_path):
    cfg = ModelConfig.from_hf(tiny_hf_config("deepseek_v3"))
    lora = LoraConfig(rank=2, alpha=4.0, targets=("o_proj", "gate_proj", "down_proj", "experts.gate_up_proj"),
                      target_ranks={"gate_proj": 3, "experts.gate_up_proj": 4}, target_alphas={"o_proj": 1.0})
    from tests.shared.hf_helpers import random_lora_tensors

    write_peft_adapter(tmp_path, lora, random_lora_tensors(cfg, lora), cfg)
    c = json.loads((tmp_path / "adapter_config.json").read_text())
    assert c["target_modules"] == ["o_proj"]
    assert c["target_parameters"] == ["down_proj.weight", "gate_proj.weight", "mlp.experts.gate_up_proj"]
    assert c["rank_pattern"] == {r".*\.gate_proj\.weight": 3, r".*\.experts\.gate_up_proj": 4}
    assert c["alpha_pattern"] == {r".*\.o_proj": 1.0}
    assert read_peft_adapter(tmp_path, cfg)[0] == lora


def _edit(path: Path, **changes) -> None:
    c = json.loads((path / "adapter_config.json").read_text())
    c.update(changes)
    (path / "adapter_config.json").write_text(json.dumps(c))


def test_reader_errors_for_what_peft_would_read_differently(tmp_path):
    from tests.shared.hf_helpers import random_lora_tensors

    cfg = ModelConfig.from_hf(tiny_hf_config("glm4_moe"))
    lora = LoraConfig(rank=2, alpha=4.0, targets=("q_proj",) + DENSE_MLP_TARGETS)
    write_peft_adapter(tmp_path, lora, random_lora_tensors(cfg, lora), cfg)
    # dense tensors under target_modules (transformers v4 / older splitmoe): PEFT points those names at the experts
    # too, for which the file has nothing
    _edit(tmp_path, target_modules=["q_proj"] + MLP, target_parameters=None)
    with pytest.raises(AdapterError, match=r"missing LoRA tensors for 2 target.*mlp\.experts\..*makes target_modules "
                                           r"\['down_proj', 'gate_proj', 'up_proj'\] of a glm4_moe model target the "
                                           r"experts as well.*target_parameters as gate_proj\.weight"):
        read_peft_adapter(tmp_path, cfg)
    _edit(tmp_path, target_modules=["q_proj", "gate_proj"])  # PEFT itself refuses gate without up
    with pytest.raises(AdapterError, match="fuses gate_proj and up_proj"):
        read_peft_adapter(tmp_path, cfg)
    # a per-layer rank: one rank per target only
    _edit(tmp_path, target_modules=["q_proj"], target_parameters=["gate_proj.weight", "up_proj.weight",
                                                                   "down_proj.weight"],
          rank_pattern={r"layers\.0\.self_attn\.q_proj": 4})
    with pytest.raises(AdapterError, match=r"rank_pattern gives the q_proj modules different values "
                                           r"\(model\.layers\.0\.self_attn\.q_proj: 4, model\.layers\.1\.self_attn"
                                           r"\.q_proj: 2\)"):
        read_peft_adapter(tmp_path, cfg)
    _edit(tmp_path, rank_pattern={}, target_parameters=["gate_proj.weight", "up_proj.weight", "mlp.down_proj.bias"])
    with pytest.raises(AdapterError, match=r"target_parameters entry 'mlp\.down_proj\.bias' is not supported"):
        read_peft_adapter(tmp_path, cfg)


def test_reader_takes_peft_0_22_saved_mlp_names_as_dense_linears_and_experts(tmp_path):
    """The config PEFT 0.22 saves for target_modules [q_proj, gate_proj, up_proj, down_proj] on a v5 MoE model with
    dense MLPs / shared experts: the three names stay in target_modules (those Linears, at r) and the experts are
    target_parameters (gate_up at 2r / 2α). It reads as LoRA on both, with the file's tensors (numpy only: the
    same whatever PEFT is installed; `test_what_peft_does` pins the saved form against PEFT itself)."""
    from tests.shared.hf_helpers import random_lora_tensors

    cfg = ModelConfig.from_hf(tiny_hf_config("glm4_moe"))
    targets = ("q_proj",) + DENSE_MLP_TARGETS + ("experts.gate_up_proj", "experts.down_proj")
    lora = LoraConfig(rank=2, alpha=4.0, targets=targets, target_ranks={"experts.gate_up_proj": 4},
                      target_alphas={"experts.gate_up_proj": 8.0})
    tensors = random_lora_tensors(cfg, lora, seed=5)
    write_peft_adapter(tmp_path, lora, tensors, cfg)
    _edit(tmp_path, target_modules=["q_proj"] + MLP, target_parameters=["gate_up_proj", "down_proj"],
          rank_pattern={r".*\.gate_up_proj": 4}, alpha_pattern={r".*\.gate_up_proj": 8.0})
    got, back = read_peft_adapter(tmp_path, cfg)
    assert set(got.targets) == set(targets) and replace(got, targets=lora.targets) == lora
    for name, t in tensors.items():
        np.testing.assert_array_equal(back[name], t, err_msg=name)
