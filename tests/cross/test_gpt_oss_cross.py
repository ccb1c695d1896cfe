"""gpt-oss: torch_impl vs jax_impl on the same tiny checkpoint, adapter (B non-zero) and packed batch (documents of
13 and 7 tokens, one longer than the sliding window), fp32: logits, loss with the aux loss, every LoRA gradient.
(HF builds no packed mask for gpt-oss, so HF is compared on unpacked batches in tests/{torch,jax}/test_gpt_oss_parity.)
And an adapter crossing torch -> jax -> PEFT (gpt-oss interleaves gate/up in LoRA B's columns) with equal logits.
"""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest

_MISSING = [m for m in ("torch", "jax", "flax", "transformers", "peft") if importlib.util.find_spec(m) is None]
if _MISSING:
    pytest.skip(f"missing {', '.join(_MISSING)}", allow_module_level=True)

import jax.numpy as jnp  # noqa: E402
import torch  # noqa: E402

import jax_impl  # noqa: E402
import jax_impl.lora as jlora  # noqa: E402
import torch_impl  # noqa: E402
import torch_impl.lora as tlora  # noqa: E402
from shared_math.checkpoint import read_checkpoint, write_tiny_checkpoint  # noqa: E402
from shared_math.config import LoraConfig  # noqa: E402
from shared_math.numerics import assert_close  # noqa: E402
from tests.cross.test_cross_framework import torch_run  # noqa: E402
from tests.jax.jax_helpers import LoraRunner  # noqa: E402
from tests.shared.hf_helpers import load_hf_model, random_lora_tensors  # noqa: E402

LORA = LoraConfig(rank=4, alpha=8.0, targets=("q_proj", "k_proj", "v_proj", "o_proj", "experts.gate_up_proj",
                                              "experts.down_proj"))
B, S = 2, 20


def test_torch_and_jax_agree_on_packed_gpt_oss(tmp_path):
    path = write_tiny_checkpoint("gpt_oss", tmp_path, seed=21, output_router_logits=True)
    cfg, _ = read_checkpoint(path)
    tensors = random_lora_tensors(cfg, LORA, seed=22)
    rng = np.random.default_rng(23)
    ids = rng.integers(0, 128, (B, S))
    labels = ids.copy()
    labels[:, [0, 13]] = -100
    pos = np.tile(np.r_[np.arange(13), np.arange(7)], (B, 1))
    jm = jax_impl.load_model(path, lora=LORA)
    jlora.load_lora_state_dict(jm, tensors)
    tm = torch_impl.load_model(path, lora=LORA, moe_backend="native")
    tlora.load_lora_state_dict(tm, tensors)
    jx, tr = LoraRunner(jm).run(ids, labels, pos), torch_run(tm, ids, labels, pos)
    assert_close(jx["logits"], tr["logits"], dtype="float32", quantity="logits", name="logits")
    assert_close(jx["loss"], tr["loss"], dtype="float32", quantity="loss", name="loss (with aux)")
    with torch.no_grad():
        torch_aux = float(tm(torch.as_tensor(ids), position_ids=torch.as_tensor(pos)).aux_loss)
    assert jx["aux_loss"] is not None and torch_aux > 0
    assert_close(jx["aux_loss"], torch_aux, dtype="float32", quantity="loss", name="aux_loss")
    assert set(jx["grads"]) == set(tr["grads"])
    for name in sorted(tr["grads"]):
        assert_close(jx["grads"][name], tr["grads"][name], dtype="float32", quantity="lora_grad", name=name)


def test_gpt_oss_adapter_crosses_torch_jax_peft(tmp_path):
    import peft

    path = write_tiny_checkpoint("gpt_oss", tmp_path / "ckpt", seed=24)
    cfg, _ = read_checkpoint(path)
    tensors = random_lora_tensors(cfg, LORA, seed=25)
    ids = np.random.default_rng(26).integers(0, 128, (1, S))
    tm = torch_impl.load_model(path, lora=LORA, moe_backend="native")
    tlora.load_lora_state_dict(tm, tensors)
    with torch.no_grad():
        torch_logits = tm(torch.as_tensor(ids)).logits.numpy()
    tlora.save_adapter(tm, tmp_path / "from_torch")
    jm = jax_impl.load_model(path)
    jlora.load_adapter(jm, tmp_path / "from_torch")
    for name, want in tensors.items():
        np.testing.assert_array_equal(jlora.lora_state_dict(jm)[name], want, err_msg=name)
    jax_logits = np.asarray(jm(jnp.asarray(ids)).logits)
    assert_close(jax_logits, torch_logits, dtype="float32", quantity="logits", name="jax(torch adapter)")
    jlora.save_adapter(jm, tmp_path / "from_jax")
    pm = peft.PeftModel.from_pretrained(load_hf_model(path), str(tmp_path / "from_jax")).eval()
    with torch.no_grad():
        peft_logits = pm(input_ids=torch.as_tensor(ids), use_cache=False).logits.numpy()
    assert_close(peft_logits, jax_logits, dtype="float32", quantity="logits", name="PEFT(jax adapter)")
