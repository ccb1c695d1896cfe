"""jax_impl DeepSeek-V3, GLM-4.x and GLM-4.7-Flash against HF transformers + PEFT on the same tiny checkpoint.

fp32 (JAX precision highest): logits, loss and every LoRA gradient that PEFT can have (attention incl. MLA
projections, both expert tensors; B non-zero), packed sequences for GLM-4.7-Flash. The model carries LoRA on every
target (the compiled step is shared with tests/cross, which checks dense/shared-expert LoRA against torch_impl);
here the dense/shared-expert factors have B = 0, so the forward equals PEFT's.
bf16 (DeepSeek-V3: MLA + YaRN; GLM-4.x's GQA path is Qwen3's, checked in test_qwen3_parity) with K = E, so no top-K
near-tie can flip: logits and loss against HF + PEFT bf16, LoRA gradients against HF + PEFT fp32, with the router
kept fp32 as HF keeps it. Routing: `jax_impl.moe.route` on the loaded router against HF's router, per token as sets.
"""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("jax")
pytest.importorskip("flax")
torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("peft")

import jax.numpy as jnp  # noqa: E402

from jax_impl.moe import route  # noqa: E402
from shared_math.config import ModelConfig  # noqa: E402
from shared_math.numerics import assert_close  # noqa: E402
from tests.shared import hf_helpers as H  # noqa: E402
from tests.shared.sigmoid_families import (  # noqa: E402
    FAMILIES,
    K_EQ_E,
    all_lora,
    attn_expert_lora,
    checkpoint,
    jax_runner,
    make_batch,
    set_jax_lora,
)


def _hf_run(path, lora, tensors, batch, dtype):
    ids, labels, pos = batch
    pm = H.build_peft_model(H.load_hf_model(path, dtype=dtype), lora, tensors)
    kw = {} if pos is None else {"position_ids": torch.as_tensor(pos)}
    ref = pm(input_ids=torch.as_tensor(ids), labels=torch.as_tensor(labels), use_cache=False, **kw)
    ref.loss.backward()
    for p in pm.parameters():
        if p.requires_grad:
            p.data = p.grad.detach().clone()
    return dict(logits=ref.logits.detach().float().numpy(), loss=float(ref.loss), grads=H.peft_to_canonical_lora(pm))


def _run(path, dtype_name: str):
    """(cfg, PEFT-able LoRA config, its tensors, model, runner); the model has every target, with the dense and
    shared-expert LoRA B at zero."""
    cfg = ModelConfig.from_hf(path)
    lora = attn_expert_lora(cfg)
    tensors = H.random_lora_tensors(cfg, lora, seed=7)
    full = all_lora(cfg)
    padded = H.random_lora_tensors(cfg, full, seed=8)
    padded = {n: tensors[n] if n in tensors else (np.zeros_like(v) if n.endswith("lora_B") else v)
              for n, v in padded.items()}
    model, runner = jax_runner(path, full, dtype_name)
    set_jax_lora(model, runner, padded)
    return cfg, lora, tensors, model, runner


@pytest.mark.parametrize("family", FAMILIES)
def test_parity_fp32(family):
    path = checkpoint(family)
    cfg, lora, tensors, model, runner = _run(path, "float32")
    batch = make_batch(11, packed=family == "glm4_moe_lite")
    got, want = runner.run(*batch), _hf_run(path, lora, tensors, batch, torch.float32)
    assert_close(got["logits"], want["logits"], dtype="float32", quantity="logits", name="logits")
    assert_close(got["loss"], want["loss"], dtype="float32", quantity="loss", name="loss")
    assert got["aux_loss"] is None
    assert set(want["grads"]) < set(got["grads"])
    for name in sorted(want["grads"]):
        assert np.abs(got["grads"][name]).max() > 0, f"zero gradient for {name}"
        assert_close(got["grads"][name], want["grads"][name], dtype="float32", quantity="lora_grad", name=name)

    # routing of the first MoE layer against HF's router module on random hidden states
    layer = next(l for l, m in enumerate(cfg.moe_layers) if m)
    x = np.random.default_rng(0).standard_normal((64, cfg.hidden_size)).astype(np.float32)
    router = model.layers[layer].mlp.router
    ids, w = route(router(jnp.asarray(x)), cfg.routing, router.e_score_correction_bias[...])
    with torch.no_grad():
        _, hf_w, hf_ids = H.load_hf_model(path).model.layers[layer].mlp.gate(torch.as_tensor(x))
    assert w.dtype == jnp.float32
    ids, w, hf_ids, hf_w = map(np.asarray, (ids, w, hf_ids, hf_w))
    for t in range(len(x)):
        assert set(ids[t]) == set(hf_ids[t]), f"token {t}"
        assert_close(w[t][np.argsort(ids[t])], hf_w[t][np.argsort(hf_ids[t])], dtype="float32",
                     quantity="routing_weights", name=f"token {t}")


def test_parity_bf16():
    family = "deepseek_v3"
    path = checkpoint(family, **K_EQ_E[family])
    cfg, lora, tensors, model, runner = _run(path, "bfloat16")
    moe = next(layer.mlp for layer in model.layers if layer.is_moe)
    assert moe.router.weight[...].dtype == moe.router.e_score_correction_bias[...].dtype == jnp.float32
    batch = make_batch(13)
    got = runner.run(*batch)
    want = _hf_run(path, lora, tensors, batch, torch.bfloat16)
    want32 = _hf_run(path, lora, tensors, batch, torch.float32)
    assert_close(got["logits"], want["logits"], dtype="bfloat16", quantity="logits", name="logits")
    assert_close(got["loss"], want["loss"], dtype="bfloat16", quantity="loss", name="loss")
    for name in sorted(want32["grads"]):
        mla = cfg.attention == "mla" and ".self_attn." in name
        assert_close(got["grads"][name], want32["grads"][name], dtype="bfloat16",
                     quantity="mla_model_lora_grad" if mla else "model_lora_grad", name=name)


def test_graphdef_of_a_yarn_model_is_hashable():
    """nnx.jit / jax.jit with the graphdef static (jax_impl.train) hash the model's static attributes, the config
    among them; DeepSeek-V3's YaRN rope_scaling is a dict, which must not make that fail."""
    from flax import nnx

    from jax_impl import load_model

    path = checkpoint("deepseek_v3")
    assert ModelConfig.from_hf(path).rope_scaling["rope_type"] == "yarn"
    hash(nnx.graphdef(load_model(path)))
