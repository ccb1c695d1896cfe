"""jax_impl's gpt-oss against HF transformers `GptOssForCausalLM` + PEFT: logits, loss, aux loss and every LoRA
gradient (B non-zero) on the tiny preset (sliding window 8 on layer 0, YaRN active) with S = 20 > window; packed rows
against each document alone. fp32 at JAX precision highest; bf16 within the numerics table. One jitted function per
model (tests.jax.jax_helpers.LoraRunner), reused across batches.
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

from jax_impl import load_model  # noqa: E402
from jax_impl.lora import load_lora_state_dict  # noqa: E402
from jax_impl.models.gpt_oss import attention_mask  # noqa: E402
from shared_math.checkpoint import read_checkpoint, write_tiny_checkpoint  # noqa: E402
from shared_math.config import LoraConfig  # noqa: E402
from shared_math.numerics import assert_close  # noqa: E402
from tests.jax.jax_helpers import LoraRunner  # noqa: E402
from tests.shared.hf_helpers import build_peft_model, hf_logits, load_hf_model, random_lora_tensors  # noqa: E402

LORA = LoraConfig(rank=4, alpha=8.0, targets=("q_proj", "k_proj", "v_proj", "o_proj", "experts.gate_up_proj",
                                              "experts.down_proj"))
B, S = 2, 20


def make_batch(seed: int):
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, 128, (B, S))
    labels = ids.copy()
    labels[:, :2] = -100
    return ids, labels


def hf_run(pm, ids, labels) -> dict:
    from tests.shared.hf_helpers import peft_to_canonical_lora

    pm.zero_grad()
    out = pm(input_ids=torch.as_tensor(ids), labels=torch.as_tensor(labels), use_cache=False)
    out.loss.backward()
    lora_params = [p for n, p in pm.named_parameters() if "lora_" in n]
    saved = [p.data.clone() for p in lora_params]
    for p in lora_params:
        p.data.copy_(p.grad)
    grads = peft_to_canonical_lora(pm)
    for p, s in zip(lora_params, saved):
        p.data.copy_(s)
    return dict(logits=out.logits.detach().float().numpy(), loss=float(out.loss.detach()),
                aux_loss=None if out.aux_loss is None else float(out.aux_loss.detach()), grads=grads)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    # output_router_logits: the aux loss joins the loss, so its gradient path is compared too
    path = write_tiny_checkpoint("gpt_oss", tmp_path_factory.mktemp("gpt_oss"), seed=11, output_router_logits=True)
    cfg, _ = read_checkpoint(path)
    return path, random_lora_tensors(cfg, LORA, seed=5)


def _compare(got: dict, want: dict, dtype: str, grad_quantity: str = "lora_grad") -> None:
    assert_close(got["logits"], want["logits"], dtype=dtype, quantity="logits", name="logits")
    assert_close(got["loss"], want["loss"], dtype=dtype, quantity="loss", name="loss")
    assert_close(got["aux_loss"], want["aux_loss"], dtype=dtype, quantity="loss", name="aux_loss")
    assert set(got["grads"]) == set(want["grads"]) and len(got["grads"]) == 2 * 4 * 2 + 2 * 2 * 2
    for name in sorted(want["grads"]):
        assert np.abs(got["grads"][name]).max() > 0, name
        assert_close(got["grads"][name], want["grads"][name], dtype=dtype, quantity=grad_quantity, name=name)


def test_gpt_oss_matches_hf_peft_fp32(setup):
    path, lora_tensors = setup
    model = load_model(path, lora=LORA)
    load_lora_state_dict(model, lora_tensors)
    pm = build_peft_model(load_hf_model(path), LORA, lora_tensors)
    runner = LoraRunner(model)
    # position_ids always given, so the packed batch below reuses the one compiled function
    _compare(runner.run(*make_batch(1), np.tile(np.arange(S), (B, 1))), hf_run(pm, *make_batch(1)), "float32")
    # packed: documents of 13 and 7 tokens; HF has no packed mask, so HF runs each document alone (the loss differs:
    # it is a mean over the packed row, so only logits are compared here; tests/cross compares the packed loss and
    # gradients against torch_impl)
    ids, labels = make_batch(3)
    pos = np.tile(np.r_[np.arange(13), np.arange(7)], (B, 1))
    packed = runner.run(ids, labels, pos)["logits"]
    assert runner.traces == 1
    for a, b in ((0, 13), (13, 20)):
        assert_close(packed[:, a:b], hf_logits(pm, ids[:, a:b]), dtype="float32", quantity="logits",
                     name=f"doc {a}:{b} vs HF + PEFT alone")


def test_gpt_oss_matches_hf_peft_bf16(setup):
    """K = E (no routing near-ties) and B / 4 (tests/torch/test_gpt_oss_parity.py::bf16_lora_tensors says why);
    logits/loss vs HF + PEFT bf16, LoRA grads vs HF + PEFT fp32."""
    path, _ = setup
    bf = write_tiny_checkpoint("gpt_oss", path.parent / "bf16", seed=11, num_experts_per_tok=8,
                               output_router_logits=True)
    from tests.torch.test_gpt_oss_parity import bf16_lora_tensors

    lora_tensors = bf16_lora_tensors(bf)
    model = load_model(bf, lora=LORA, dtype=jnp.bfloat16)
    load_lora_state_dict(model, lora_tensors)
    got = LoraRunner(model).run(*make_batch(4))
    want = hf_run(build_peft_model(load_hf_model(bf, dtype=torch.bfloat16), LORA, lora_tensors), *make_batch(4))
    want32 = hf_run(build_peft_model(load_hf_model(bf), LORA, lora_tensors), *make_batch(4))
    want["grads"] = want32["grads"]
    _compare(got, want, "bfloat16", grad_quantity="model_lora_grad")


def test_attention_mask_window_includes_self():
    m = np.asarray(attention_mask(jnp.arange(6)[None], 3))[0, 0]
    assert m[5].tolist() == [False, False, False, True, True, True]
    packed = np.asarray(attention_mask(jnp.array([[0, 1, 2, 0, 1, 2]]), None))[0, 0]
    assert packed[4].tolist() == [False, False, False, True, True, False]


@pytest.mark.parametrize("S_, window, packed", [(17, 3, True)])  # a partial last block, packing, GQA
def test_sink_attention_paths_agree(S_, window, packed):
    """The blocked sliding path and the full-mask path equal a literal softmax over [scores | sink], forward and
    backward (GQA: 4 query heads on 2 kv heads), fp32."""
    import jax

    from jax_impl.models.gpt_oss import sink_attention

    rng = np.random.default_rng(S_ + window)
    q, k, v = (jnp.asarray(rng.standard_normal(s), jnp.float32) for s in ((2, S_, 4, 16), (2, S_, 2, 16),
                                                                           (2, S_, 2, 16)))
    sinks = jnp.asarray(rng.standard_normal(4), jnp.float32)
    pos = np.tile(np.r_[np.arange(S_ // 2), np.arange(S_ - S_ // 2)] if packed else np.arange(S_), (2, 1))
    mask = attention_mask(jnp.asarray(pos), None)
    windowed = attention_mask(jnp.asarray(pos), window)
    scale = 0.25

    def literal(q, k, v):
        kr, vr = jnp.repeat(k, 2, axis=2), jnp.repeat(v, 2, axis=2)
        s = jnp.einsum("bqnd,bknd->bnqk", q, kr) * scale
        s = jnp.where(windowed, s, -jnp.inf)
        full = jnp.concatenate([s, jnp.broadcast_to(sinks[None, :, None, None], (2, 4, S_, 1))], axis=-1)
        return jnp.einsum("bnqk,bknd->bqnd", jax.nn.softmax(full, axis=-1)[..., :-1], vr)

    def blocked(q, k, v):
        return sink_attention(q, k, v, sinks, mask, scale, window)

    def full(q, k, v):
        return sink_attention(q, k, v, sinks, windowed, scale)

    dy = jnp.asarray(rng.standard_normal((2, S_, 4, 16)), jnp.float32)
    want, vjp = jax.vjp(literal, q, k, v)
    for name, f in (("blocked", blocked), ("full mask", full)):
        got, vjp_got = jax.jit(lambda *a, f=f: jax.vjp(f, *a))(q, k, v)
        assert_close(got, want, dtype="float32", quantity="moe_block", name=name)
        for a, b in zip(vjp_got(dy), vjp(dy)):
            assert_close(a, b, dtype="float32", quantity="moe_grad", name=f"d {name}")
