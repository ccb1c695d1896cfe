"""jax_impl's Qwen3-MoE against HF transformers + PEFT: logits, loss and every LoRA gradient.

fp32 (JAX precision highest, torch TF32 off) must agree to ~1e-5 relative; bf16 within the bf16 rows of
shared_math.numerics (PEFT merges `W + s·B·A` in bf16, we never do, so bf16 agreement is a tolerance, not bits).
The adapter has non-zero B on every attention projection and both expert tensors, so every LoRA path shows.
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
from flax import nnx  # noqa: E402

from jax_impl import load_model  # noqa: E402
from jax_impl.lora import Frozen, load_lora_state_dict, lora_state_dict  # noqa: E402
from shared_math.checkpoint import read_checkpoint, write_tiny_checkpoint  # noqa: E402
from shared_math.config import LoraConfig  # noqa: E402
from shared_math.numerics import assert_close, tolerance  # noqa: E402
from tests.jax.jax_helpers import LoraRunner, bf16_comparable, mask_labels, routing_margins  # noqa: E402
from tests.shared.hf_helpers import build_peft_model, load_hf_model, random_lora_tensors  # noqa: E402

LORA = LoraConfig(rank=4, alpha=8.0, targets=("q_proj", "k_proj", "v_proj", "o_proj", "experts.gate_up_proj",
                                              "experts.down_proj"))
B, S = 2, 16
# Two experts whose fp32 router probabilities differ by less than bf16's routing-weight error budget can swap
# places under bf16 rounding (a legitimate near-tie, not a bug): such tokens are left out of bf16 comparisons.
_RW = tolerance("bfloat16", "routing_weights")
ROUTING_TIE = _RW.rtol + _RW.atol


def make_batch(seed: int, packed: bool, vocab: int = 128):
    """input_ids, labels (some -100) and position_ids ([0..5), [0..11) per row when packed, else None)."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, vocab, (B, S))
    labels = ids.copy()
    labels[:, :2] = -100
    pos = None
    if packed:
        pos = np.tile(np.concatenate([np.arange(5), np.arange(S - 5)]), (B, 1))
        labels[:, 5] = -100  # do not predict across the packing boundary
    return ids, labels, pos


def hf_run(pm, ids, labels, pos) -> dict:
    """PEFT model forward + backward -> logits, loss and canonical LoRA grads (PEFT layout mapped back)."""
    from tests.shared.hf_helpers import peft_to_canonical_lora

    pm.zero_grad()
    out = pm(input_ids=torch.as_tensor(ids), labels=torch.as_tensor(labels), use_cache=False,
             position_ids=None if pos is None else torch.as_tensor(pos))
    out.loss.backward()
    lora_params = [p for n, p in pm.named_parameters() if "lora_" in n]
    saved = [p.data.clone() for p in lora_params]
    # the PEFT -> canonical layout map is a permutation/transpose, so it maps gradients as it maps weights
    for p in lora_params:
        p.data.copy_(p.grad)
    grads = peft_to_canonical_lora(pm)
    for p, s in zip(lora_params, saved):
        p.data.copy_(s)
    return dict(logits=out.logits.detach().float().numpy(), loss=float(out.loss.detach()), grads=grads)


def hf_margins(path, lora_tensors, ids, pos) -> np.ndarray:
    """fp32 routing margins [L, B, S] of the HF+PEFT model (the same routing as jax_impl's fp32, to ~1e-6)."""
    pm = build_peft_model(load_hf_model(path), LORA, lora_tensors)
    with torch.no_grad():
        out = pm(input_ids=torch.as_tensor(ids), position_ids=None if pos is None else torch.as_tensor(pos),
                 use_cache=False, output_router_logits=True)
    return routing_margins([r.float().numpy() for r in out.router_logits], pm.config.num_experts_per_tok,
                           np.shape(ids))


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    torch.backends.cuda.matmul.allow_tf32 = False
    path = write_tiny_checkpoint("qwen3_moe", tmp_path_factory.mktemp("qwen3"), seed=3)
    cfg, _ = read_checkpoint(path)
    lora_tensors = random_lora_tensors(cfg, LORA, seed=4)
    return path, lora_tensors


def _models(path, lora_tensors, dtype_jax, dtype_torch):
    model = load_model(path, lora=LORA, dtype=dtype_jax)
    load_lora_state_dict(model, lora_tensors)
    pm = build_peft_model(load_hf_model(path, dtype=dtype_torch), LORA, lora_tensors)
    return model, pm


def _compare(got: dict, want: dict, dtype: str) -> None:
    assert_close(got["logits"], want["logits"], dtype=dtype, quantity="logits", name="logits")
    assert_close(got["loss"], want["loss"], dtype=dtype, quantity="loss", name="loss")
    assert set(got["grads"]) == set(want["grads"]) and len(got["grads"]) == 2 * 4 * 2 + 2 * 2 * 2
    for name in sorted(want["grads"]):
        assert_close(got["grads"][name], want["grads"][name], dtype=dtype, quantity="lora_grad", name=name)


def test_qwen3_matches_hf_peft_fp32(setup):
    path, lora_tensors = setup
    model, pm = _models(path, lora_tensors, jnp.float32, torch.float32)
    runner = LoraRunner(model)
    _compare(runner.run(*make_batch(10, packed=False)), hf_run(pm, *make_batch(10, packed=False)), "float32")
    # packed sequences; position_ids given, so the jitted function is traced a second time, once
    for seed in (11, 12):
        batch = make_batch(seed, packed=True)
        _compare(runner.run(*batch), hf_run(pm, *batch), "float32")
        assert runner.traces == 2, "a new batch of the same shape must not retrace"


def test_qwen3_matches_hf_peft_bf16(setup):
    """bf16 against HF+PEFT bf16 on the tokens whose routing is not a near-tie (see `bf16_comparable`)."""
    path, lora_tensors = setup
    ids, labels, pos = make_batch(20, packed=True)
    ok = bf16_comparable(hf_margins(path, lora_tensors, ids, pos), pos, ROUTING_TIE)
    assert ok.sum() >= ok.size // 2, f"only {ok.sum()} of {ok.size} tokens comparable: pick another batch seed"
    labels = mask_labels(labels, ok)
    model, pm = _models(path, lora_tensors, jnp.bfloat16, torch.bfloat16)
    got, want = LoraRunner(model).run(ids, labels, pos), hf_run(pm, ids, labels, pos)
    assert got["grads"]["layers.0.mlp.experts.gate_up_proj.lora_A"].dtype == np.float32  # fp32 adapters
    got["logits"], want["logits"] = got["logits"][ok], want["logits"][ok]
    _compare(got, want, "bfloat16")


def test_only_lora_is_differentiated(setup):
    """nnx.grad with DiffState(LoRAParam) and plain nnx.grad both return LoRA factors only: base weights are
    Frozen, not Params (checked on shapes with nnx.eval_shape: tracing is enough, no compile)."""
    path, _ = setup
    model = load_model(path, lora=LORA)
    ids, labels, _ = make_batch(0, packed=False)

    def loss(m):
        return m(jnp.asarray(ids), labels=jnp.asarray(labels)).loss

    g_filtered = nnx.eval_shape(lambda m: nnx.grad(loss, argnums=nnx.DiffState(0, nnx.LoRAParam))(m), model)
    g_plain = nnx.eval_shape(lambda m: nnx.grad(loss)(m), model)
    n_lora = len(lora_state_dict(model))
    for g in (g_filtered, g_plain):
        types = [type(v) for _, v in g.flat_state()]
        assert len(types) == n_lora and all(t is nnx.LoRAParam for t in types)
    assert len(nnx.state(model, Frozen).flat_state()) > 0
    names = set(lora_state_dict(model))
    assert "layers.1.mlp.experts.down_proj.lora_B" in names and "layers.0.self_attn.q_proj.lora_A" in names
