"""torch_impl vs jax_impl for DeepSeek-V3, GLM-4.x and GLM-4.7-Flash on the same tiny checkpoint and adapter.

fp32, packed sequences, LoRA on every target each family has, with B non-zero everywhere: attention (MLA's
q_a/q_b/kv_a/kv_b/o or GQA's q/k/v/o), the dense first layer's and the shared experts' gate/up/down Linears (which
PEFT cannot adapt on these v5 models, so torch vs jax is their external check beside
tests/torch's merged-weight chain rule), and both expert tensors. Logits, loss and every LoRA gradient agree to the
fp32 rows of shared_math.numerics. The adapter (MLA and shared-expert names included) crosses torch -> adapter
file -> jax unchanged. The jax step is the one compiled for tests/jax (shared per session).
"""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest

_MISSING = [m for m in ("torch", "jax", "flax", "transformers", "peft") if importlib.util.find_spec(m) is None]
if _MISSING:
    pytest.skip(f"missing {', '.join(_MISSING)}", allow_module_level=True)

import torch  # noqa: E402

import jax_impl  # noqa: E402
import jax_impl.lora as jlora  # noqa: E402
import torch_impl  # noqa: E402
import torch_impl.lora as tlora  # noqa: E402
from shared_math.config import ModelConfig  # noqa: E402
from shared_math.numerics import assert_close  # noqa: E402
from tests.shared.hf_helpers import random_lora_tensors  # noqa: E402
from tests.shared.sigmoid_families import (  # noqa: E402
    FAMILIES,
    all_lora,
    checkpoint,
    jax_runner,
    make_batch,
    set_jax_lora,
)


@pytest.mark.parametrize("family", FAMILIES)
def test_fp32_torch_and_jax_agree_with_every_target(family):
    path = checkpoint(family)
    cfg = ModelConfig.from_hf(path)
    lora = all_lora(cfg)
    tensors = random_lora_tensors(cfg, lora, seed=21)
    ids, labels, pos = make_batch(22, packed=True)

    tm = torch_impl.load_model(path, lora=lora, moe_backend="native")
    tlora.load_lora_state_dict(tm, tensors)
    out = tm(torch.as_tensor(ids), labels=torch.as_tensor(labels), position_ids=torch.as_tensor(pos))
    out.loss.backward()
    t_grads = {n: p.grad.numpy() for n, p in tlora._lora_params(tm).items()}

    model, runner = jax_runner(path, lora)
    set_jax_lora(model, runner, tensors)
    got = runner.run(ids, labels, pos)
    assert_close(got["logits"], out.logits.detach(), dtype="float32", quantity="logits", name="logits")
    assert_close(got["loss"], out.loss.detach(), dtype="float32", quantity="loss", name="loss")
    assert set(got["grads"]) == set(t_grads)
    assert any(".shared_experts." in n for n in t_grads) and any(n.startswith("layers.0.mlp.") for n in t_grads)
    for name in sorted(t_grads):
        assert np.abs(t_grads[name]).max() > 0, f"zero gradient for {name}"
        assert_close(got["grads"][name], t_grads[name], dtype="float32", quantity="lora_grad", name=name)


def test_adapter_crosses_torch_to_jax(tmp_path):
    """A torch_impl adapter on every DeepSeek-V3 target crosses to jax_impl unchanged through the adapter file
    (the dense/shared-expert Linears named by their weights in target_parameters, as PEFT also loads them:
    tests/shared/test_peft_remap.py)."""
    path = checkpoint("deepseek_v3")
    cfg = ModelConfig.from_hf(path)
    lora = all_lora(cfg)
    tensors = random_lora_tensors(cfg, lora, seed=23)
    tm = torch_impl.load_model(path, lora=lora)
    tlora.load_lora_state_dict(tm, tensors)
    tlora.save_adapter(tm, tmp_path / "adapter")
    jm = jax_impl.load_model(path)
    jlora.load_adapter(jm, tmp_path / "adapter")
    assert set(jm.lora_config.targets) == set(lora.targets)
    got = jlora.lora_state_dict(jm)
    assert set(got) == set(tensors)
    for name, want in tensors.items():
        np.testing.assert_array_equal(got[name], want, err_msg=name)
