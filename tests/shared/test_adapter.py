"""PEFT adapter I/O: canonical LoRA tensors against PEFT's saved files, PEFT's loader, and the merged-weight math."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pytest

from shared_math.adapter import AdapterError, expected_lora_shapes, read_peft_adapter, write_peft_adapter
from shared_math.checkpoint import read_checkpoint, write_tiny_checkpoint
from shared_math.config import SUPPORTED_MODEL_TYPES, LoraConfig, ModelConfig, available_targets
from shared_math.tiny import tiny_hf_config
from tests.conftest import requires_transformers

BOTH = ("q_proj", "k_proj", "v_proj", "o_proj", "experts.gate_up_proj", "experts.down_proj")
CASES = [  # (family, targets, rslora)
    ("qwen3_moe", BOTH, False),
    ("qwen3_moe", ("q_proj", "experts.gate_up_proj"), False),
    ("qwen3_moe", ("v_proj", "experts.down_proj"), True),
    ("gpt_oss", BOTH, False),
    ("gpt_oss", ("o_proj", "experts.gate_up_proj"), False),
    ("gpt_oss", ("experts.down_proj",), False),
    # MLA attention and experts
    ("deepseek_v3", ("q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj", "experts.gate_up_proj",
                     "experts.down_proj"), False),
    # the dense first layer's and the shared experts' Linears, which PEFT reaches only through target_parameters
    # (`gate_proj.weight`, ...; tests/shared/test_peft_remap.py)
    ("deepseek_v3", ("o_proj", "gate_proj", "up_proj", "down_proj", "experts.gate_up_proj", "experts.down_proj"),
     False),
    ("glm4_moe", ("q_proj", "gate_proj", "up_proj", "down_proj", "experts.down_proj"), True),
]
IDS = [f"{f}-{'+'.join(t.split('.')[-1] for t in ts)}{'-rslora' if r else ''}" for f, ts, r in CASES]
INPUT_IDS = np.array([[3, 17, 99, 5, 64, 2, 127, 40, 8, 11, 90, 33]])


def _random_lora(cfg: ModelConfig, lora: LoraConfig, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    # A and B of O(1/sqrt(fan_in)) with alpha/R ~ 1: the adapter moves logits by O(0.1-1), far above fp32 noise
    return {n: (rng.standard_normal(s) / np.sqrt(s[-2])).astype(np.float32)
            for n, s in expected_lora_shapes(lora, cfg).items()}


@pytest.fixture
def tiny(tmp_path):
    def make(family: str, seed: int = 0) -> tuple[Path, ModelConfig]:
        path = write_tiny_checkpoint(family, tmp_path / "base", seed=seed)
        return path, read_checkpoint(path)[0]

    return make


# ---- against PEFT --------------------------------------------------------------------------------------------------
@requires_transformers
@pytest.mark.parametrize("family,targets,rslora", CASES, ids=IDS)
def test_adapter_matches_peft(tmp_path, tiny, family, targets, rslora, seed):
    pytest.importorskip("peft")
    from peft import PeftModel

    from tests.shared.hf_helpers import (
        build_peft_model,
        hf_logits,
        load_canonical_into,
        load_hf_model,
        merge_lora,
        peft_to_canonical_lora,
    )

    path, cfg = tiny(family, seed % 100)
    lora = LoraConfig(rank=3, alpha=4.0, targets=targets, rslora=rslora)
    tensors = _random_lora(cfg, lora, seed)
    base_model = load_hf_model(path)
    pm = build_peft_model(copy.deepcopy(base_model), lora, tensors)
    peft_logits = hf_logits(pm, INPUT_IDS)

    # 1. PEFT's own save_pretrained reads back as exactly the canonical tensors we put in
    pm.save_pretrained(tmp_path / "peft")
    lora_read, got = read_peft_adapter(tmp_path / "peft", cfg)
    assert (lora_read.rank, lora_read.alpha, set(lora_read.targets), lora_read.rslora) == (
        lora.rank, lora.alpha, set(lora.targets), lora.rslora)
    assert sorted(got) == sorted(tensors)
    for k in tensors:
        np.testing.assert_array_equal(got[k], tensors[k], err_msg=k)

    # 2. our writer's adapter loads in PEFT onto a fresh base and gives the same model, bit for bit
    write_peft_adapter(tmp_path / "ours", lora, tensors, cfg)
    loaded = PeftModel.from_pretrained(copy.deepcopy(base_model), str(tmp_path / "ours")).eval()
    back = peft_to_canonical_lora(loaded)
    for k in tensors:
        np.testing.assert_array_equal(back[k], tensors[k], err_msg=k)
    np.testing.assert_array_equal(hf_logits(loaded, INPUT_IDS), peft_logits)

    # 3. semantics: PEFT == the HF model with W + scale·A@B merged by hand from the canonical tensors
    base = dict(read_checkpoint(path)[1])
    base_logits = hf_logits(base_model, INPUT_IDS)
    merged_model = load_canonical_into(base_model, merge_lora(base, lora, tensors))
    assert np.abs(peft_logits - base_logits).max() > 0.05  # the adapter matters, so the next check means something
    np.testing.assert_allclose(hf_logits(merged_model, INPUT_IDS), peft_logits, rtol=1e-4, atol=2e-5)


# ---- numpy-only round trips and errors -----------------------------------------------------------------------------
@pytest.mark.parametrize("family", SUPPORTED_MODEL_TYPES)
def test_write_read_roundtrip_all_targets(tmp_path, family, seed):
    cfg = ModelConfig.from_hf(tiny_hf_config(family))
    lora = LoraConfig(rank=2, alpha=8.0, targets=available_targets(cfg))
    tensors = _random_lora(cfg, lora, seed)
    write_peft_adapter(tmp_path, lora, tensors, cfg)
    lora2, got = read_peft_adapter(tmp_path, cfg)
    assert (lora2.rank, lora2.alpha, set(lora2.targets)) == (lora.rank, lora.alpha, set(lora.targets))
    for k in tensors:
        np.testing.assert_array_equal(got[k], tensors[k], err_msg=k)


@pytest.mark.parametrize("fail_at", ["weights", "config", "rename"])
def test_a_save_that_fails_part_way_leaves_the_previous_adapter_whole(tmp_path, monkeypatch, fail_at):
    """Overwriting an adapter: a crash while writing either file (or at the first rename) keeps the old one
    readable with its old numbers, and leaves no temporary files behind."""
    import shared_math.adapter as adapter_mod

    cfg = ModelConfig.from_hf(tiny_hf_config("qwen3_moe"))
    old_lora, new_lora = LoraConfig(rank=2, alpha=4.0), LoraConfig(rank=4, alpha=8.0)
    old = _random_lora(cfg, old_lora, 0)
    write_peft_adapter(tmp_path, old_lora, old, cfg)
    before = sorted(p.name for p in tmp_path.iterdir())

    def boom(*a, **k):
        raise OSError("disk full")

    if fail_at == "weights":  # half a file written, then the error
        def partial(path, *a, **k):
            Path(path).write_bytes(b"\x00" * 16)
            boom()
        monkeypatch.setattr(adapter_mod, "write_safetensors", partial)
    elif fail_at == "config":
        monkeypatch.setattr(Path, "write_text", boom)
    else:
        monkeypatch.setattr(adapter_mod.os, "replace", boom)
    with pytest.raises(OSError, match="disk full"):
        write_peft_adapter(tmp_path, new_lora, _random_lora(cfg, new_lora, 1), cfg)
    monkeypatch.undo()
    assert sorted(p.name for p in tmp_path.iterdir()) == before
    lora2, got = read_peft_adapter(tmp_path, cfg)
    assert (lora2.rank, lora2.alpha) == (2, 4.0)
    for k in old:
        np.testing.assert_array_equal(got[k], old[k], err_msg=k)


def test_peft_key_layout(tmp_path):
    """The documented PEFT facts, pinned on our own output (gpt-oss: interleaved B rows; nested expert keys)."""
    from safetensors.numpy import load_file

    cfg = ModelConfig.from_hf(tiny_hf_config("gpt_oss"))
    lora = LoraConfig(rank=2, alpha=2.0, targets=("experts.gate_up_proj", "experts.down_proj"))
    t = _random_lora(cfg, lora, 0)
    write_peft_adapter(tmp_path, lora, t, cfg)
    saved = load_file(str(tmp_path / "adapter_model.safetensors"))
    p = "base_model.model.model.layers.0.mlp.experts."
    E, I, R = cfg.num_experts, cfg.moe_intermediate_size, 2
    a, b = saved[p + "base_layer.lora_A.weight"], saved[p + "base_layer.lora_B.weight"]  # gate_up: inner wrapper
    A, B = t["layers.0.mlp.experts.gate_up_proj.lora_A"], t["layers.0.mlp.experts.gate_up_proj.lora_B"]
    assert a.shape == (R * E, 64) and b.shape == (2 * I, R * E)
    np.testing.assert_array_equal(a[3 * R + 1], A[3, :, 1])  # expert 3, rank 1: row e·R + j
    np.testing.assert_array_equal(b[0::2, 1 * E + 3], B[3, 1, :I])  # gate at even out rows, column j·E + e
    np.testing.assert_array_equal(b[1::2, 1 * E + 3], B[3, 1, I:])
    assert saved[p + "lora_B.weight"].shape == (64, R * E)  # down_proj: outer wrapper


def _adapter(tmp_path: Path, family: str = "qwen3_moe", **lora_kw) -> tuple[Path, ModelConfig, LoraConfig]:
    cfg = ModelConfig.from_hf(tiny_hf_config(family))
    lora = LoraConfig(**{"rank": 2, "alpha": 4.0, **lora_kw})
    write_peft_adapter(tmp_path, lora, _random_lora(cfg, lora, 0), cfg)
    return tmp_path, cfg, lora


def _edit_config(path: Path, **changes) -> None:
    c = json.loads((path / "adapter_config.json").read_text())
    c.update(changes)
    (path / "adapter_config.json").write_text(json.dumps(c))


def test_missing_files(tmp_path):
    path, cfg, _ = _adapter(tmp_path)
    (path / "adapter_model.safetensors").unlink()
    with pytest.raises(AdapterError, match="no adapter_model.safetensors"):
        read_peft_adapter(path, cfg)
    (path / "adapter_config.json").unlink()
    with pytest.raises(AdapterError, match="no adapter_config.json"):
        read_peft_adapter(path, cfg)


@pytest.mark.parametrize("change,match", [
    ({"use_dora": True}, "use_dora=True is not supported: DoRA"),
    ({"bias": "all"}, "bias='all' is not supported"),
    ({"rank_pattern": {r"layers\.1\.self_attn\.q_proj": 4}}, "one rank and one alpha per target"),
    ({"exclude_modules": ["layers.0.self_attn.q_proj"]}, "exclude_modules.* is not supported"),
    ({"peft_type": "IA3"}, "only LORA"),
    ({"target_modules": ".*q_proj"}, "regex"),
    ({"target_modules": ["lm_head"]}, "unknown LoRA target"),
])
def test_unsupported_options(tmp_path, change, match):
    path, cfg, _ = _adapter(tmp_path)
    _edit_config(path, **change)
    with pytest.raises(AdapterError, match=match):
        read_peft_adapter(path, cfg)


def test_dropout_is_ignored_with_a_warning(tmp_path):
    path, cfg, lora = _adapter(tmp_path)
    _edit_config(path, lora_dropout=0.1)
    with pytest.warns(UserWarning, match="lora_dropout=0.1 is ignored"):
        assert read_peft_adapter(path, cfg)[0] == lora


def test_shape_and_key_mismatches(tmp_path):
    path, cfg, _ = _adapter(tmp_path / "q", targets=("q_proj",))
    _edit_config(path, r=3)  # tensors are rank 2
    with pytest.raises(AdapterError, match=r"q_proj lora_A/lora_B have shapes \[2, 64\]/\[128, 2\].*r=3 imply "
                                           r"\[3, 64\]/\[128, 3\]"):
        read_peft_adapter(path, cfg)
    path, cfg, _ = _adapter(tmp_path / "all")
    _edit_config(path, r=3)
    with pytest.raises(AdapterError, match=r"shapes \[2, 64\]/\[128, 2\].*imply \[3, 64\]/\[128, 3\]|"
                                           r"mlp\.experts LoRA shapes \[16, \d+\]/\[64, 16\] match no targeted "
                                           r"expert tensor .*gate_up_proj: \[24, 64\]/\[64, 24\]"):
        read_peft_adapter(path, cfg)
    _edit_config(path, r=2, target_modules=["q_proj"])  # the file still holds k/v/o LoRA
    with pytest.raises(AdapterError, match=r"names module layers\.\d\.self_attn\.[kvo]_proj, which is not a LoRA "
                                           "target"):
        read_peft_adapter(path, cfg)
    # an adapter for a model with more experts does not fit this one
    other = ModelConfig.from_hf(tiny_hf_config("qwen3_moe", num_experts=4))
    _edit_config(path, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"])
    with pytest.raises(AdapterError, match=r"mlp\.experts LoRA shapes .* match no targeted expert tensor"):
        read_peft_adapter(path, other)
    # too few layers in the file
    bigger = ModelConfig.from_hf(tiny_hf_config("qwen3_moe", num_hidden_layers=3))
    with pytest.raises(AdapterError, match=r"missing LoRA tensors .* layers\.2\."):
        read_peft_adapter(path, bigger)


def test_writer_errors(tmp_path):
    cfg = ModelConfig.from_hf(tiny_hf_config("qwen3_moe"))
    lora = LoraConfig(rank=2, alpha=4.0)
    t = _random_lora(cfg, lora, 0)
    with pytest.raises(AdapterError, match="train_router"):
        write_peft_adapter(tmp_path, LoraConfig(rank=2, alpha=4.0, train_router=True), t, cfg)
    bad = dict(t)
    bad.pop("layers.1.self_attn.o_proj.lora_B")
    with pytest.raises(AdapterError, match=r"missing \['layers\.1\.self_attn\.o_proj\.lora_B'\]"):
        write_peft_adapter(tmp_path, lora, bad, cfg)
    bad = {**t, "layers.0.mlp.experts.down_proj.lora_A": np.zeros((8, 32, 3), np.float32)}
    with pytest.raises(AdapterError, match=r"down_proj\.lora_A has shape \[8, 32, 3\], expected \[8, 32, 2\]"):
        write_peft_adapter(tmp_path, lora, bad, cfg)
    with pytest.raises(ValueError, match="do not exist in a qwen3_moe model"):
        write_peft_adapter(tmp_path, LoraConfig(rank=2, alpha=4.0, targets=("kv_b_proj",)), {}, cfg)
