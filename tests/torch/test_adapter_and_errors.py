"""PEFT adapter round trips in both directions (logits equal), and clear errors for bad input."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from shared_math.checkpoint import CheckpointError  # noqa: E402
from shared_math.config import LoraConfig, ModelConfig  # noqa: E402
from shared_math.numerics import assert_close  # noqa: E402
from shared_math.tiny import write_tiny_checkpoint  # noqa: E402
from torch_impl import load_model  # noqa: E402
from torch_impl.lora import load_adapter, load_lora_state_dict, lora_state_dict, save_adapter  # noqa: E402

LORA = LoraConfig(rank=4, alpha=8.0)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return write_tiny_checkpoint("qwen3_moe", tmp_path_factory.mktemp("tiny"), seed=3)


def _ids(seed=0):
    return torch.as_tensor(np.random.default_rng(seed).integers(0, 128, size=(2, 10)))


@pytest.mark.parametrize("direction", ["ours_to_peft", "peft_to_ours"])
def test_adapter_round_trip_with_peft(ckpt, tmp_path, direction):
    pytest.importorskip("peft")
    import peft

    from tests.shared import hf_helpers as H

    cfg = ModelConfig.from_hf(ckpt)
    tensors = H.random_lora_tensors(cfg, LORA, seed=5)
    ids = _ids()
    adapter_dir = tmp_path / "adapter"
    if direction == "ours_to_peft":
        ours = load_model(ckpt, lora=LORA)
        load_lora_state_dict(ours, tensors)
        save_adapter(ours, adapter_dir)
        pm = peft.PeftModel.from_pretrained(H.load_hf_model(ckpt), str(adapter_dir)).eval()
    else:
        pm = H.build_peft_model(H.load_hf_model(ckpt), LORA, tensors)
        pm.save_pretrained(str(adapter_dir))
        ours = load_model(ckpt)
        load_adapter(ours, adapter_dir)
        got = lora_state_dict(ours)
        assert set(got) == set(tensors)
        for name in tensors:  # float32 through the file: exact
            np.testing.assert_array_equal(got[name], tensors[name], err_msg=name)
    with torch.no_grad():
        assert_close(ours(ids).logits, H.hf_logits(pm, ids.numpy()), dtype="float32", quantity="logits")


def test_adapter_round_trip_ours(ckpt, tmp_path):
    """save_adapter then load_adapter onto a fresh model gives the same logits (no PEFT needed)."""
    ours = load_model(ckpt, lora=LORA, lora_seed=1)
    with torch.no_grad():
        for p in ours.parameters():
            if p.requires_grad:
                p.normal_(0, 0.1)  # B non-zero
    save_adapter(ours, tmp_path)
    fresh = load_model(ckpt)
    load_adapter(fresh, tmp_path)
    with torch.no_grad():
        assert torch.equal(ours(_ids()).logits, fresh(_ids()).logits)


def test_unsupported_family_names_what_is_supported(tmp_path, monkeypatch):
    import torch_impl.load as L

    monkeypatch.delitem(L._FAMILIES, "gpt_oss")  # every family in shared_math is implemented: pretend one is not
    path = write_tiny_checkpoint("gpt_oss", tmp_path)
    with pytest.raises(NotImplementedError, match=r"gpt_oss.*supported: qwen3_moe"):
        load_model(path)


def test_damaged_checkpoint_raises_checkpoint_error(tmp_path):
    path = write_tiny_checkpoint("qwen3_moe", tmp_path)
    f = next(path.glob("*.safetensors"))
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2])  # truncated download
    with pytest.raises(CheckpointError):
        load_model(path)


def test_token_ids_out_of_range(ckpt):
    model = load_model(ckpt)
    with pytest.raises(ValueError, match=r"token ids must lie in \[0, vocab_size=128\).*128\]"):
        model(torch.tensor([[1, 2, 128]]))
    with pytest.raises(ValueError, match=r"token ids must lie in"):
        model(torch.tensor([[-1, 2]]))


def test_lora_target_the_model_lacks(ckpt):
    # the tiny Qwen3-MoE has MoE in every layer: there is no dense gate_proj to put LoRA on
    with pytest.raises(ValueError, match=r"\['gate_proj'\] do not exist in a qwen3_moe model"):
        load_model(ckpt, lora=LoraConfig(rank=4, alpha=8.0, targets=("q_proj", "gate_proj")))


def test_unavailable_backend_fails_before_loading(ckpt):
    with pytest.raises(RuntimeError, match=r"grouped_mm.*float64.*Available here: native"):
        load_model(ckpt, dtype=torch.float64, moe_backend="grouped_mm")
    with pytest.raises(ValueError, match="unknown MoE backend 'fast'"):
        load_model(ckpt, moe_backend="fast")


def test_float64_model_runs_with_native(ckpt):
    """auto picks a backend that runs: grouped_mm has no float64 kernel, so auto falls back to native."""
    model = load_model(ckpt, dtype=torch.float64)
    with torch.no_grad():
        assert model(_ids()).logits.dtype == torch.float64
