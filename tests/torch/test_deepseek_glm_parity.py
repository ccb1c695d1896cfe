"""torch_impl DeepSeek-V3, GLM-4.x and GLM-4.7-Flash against HF transformers (+ PEFT) on the same tiny checkpoint.

- fp32, every backend that runs on CPU: logits, loss and every LoRA gradient (attention incl. MLA projections, both
  expert tensors; B non-zero) against HF + PEFT; packed sequences for one family.
- Routing: our `route` on the router of a loaded model against HF's own router module, per token as sets (HF uses
  topk(sorted=False)), weights matched per expert.
- LoRA on dense-layer and shared-expert Linears (PEFT cannot place it on these v5 models): logits against HF with
  the merged weights `W + s·A·B`, and every LoRA gradient against the chain rule through HF's merged-weight
  gradient (dA = s·dW·Bᵀ, dB = s·Aᵀ·dW).
- bf16 with K = E (DeepSeek-V3's MLA and GLM-4.x's GQA): logits and loss against HF + PEFT bf16, LoRA gradients
  against HF + PEFT fp32; the router stays fp32 as in HF.
"""

from __future__ import annotations

import json
import zlib

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("peft")

from shared_math.config import ModelConfig  # noqa: E402
from shared_math.numerics import assert_close  # noqa: E402
from shared_math.tiny import write_tiny_checkpoint  # noqa: E402
from tests.shared import hf_helpers as H  # noqa: E402
from tests.shared.sigmoid_families import FAMILIES, K_EQ_E, all_lora, attn_expert_lora, make_batch  # noqa: E402
from torch_impl import load_model  # noqa: E402
from torch_impl.backends import BACKENDS, why_unavailable  # noqa: E402
from torch_impl.lora import _lora_params, load_lora_state_dict  # noqa: E402
from torch_impl.moe import route  # noqa: E402

_CACHE: dict = {}


def _ckpt(root, family: str, **overrides):
    key = (family, json.dumps(overrides, sort_keys=True))
    if key not in _CACHE:
        sub = root / f"{family}-{zlib.crc32(key[1].encode())}"
        path = write_tiny_checkpoint(family, sub, seed=FAMILIES.index(family) + 5, **overrides)
        _CACHE[key] = path
    return _CACHE[key]


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return tmp_path_factory.mktemp("sigmoid_families")


def _ours(path, lora, tensors, batch, dtype=torch.float32, backend="native", device="cpu"):
    ids, labels, pos = batch
    model = load_model(path, lora=lora, dtype=dtype, moe_backend=backend, device=device)
    load_lora_state_dict(model, tensors)
    t = lambda a: None if a is None else torch.as_tensor(a, device=device)  # noqa: E731
    out = model(t(ids), labels=t(labels), position_ids=t(pos))
    out.loss.backward()
    return model, out, {n: p.grad for n, p in _lora_params(model).items()}


def _hf_peft(path, lora, tensors, batch, dtype=torch.float32, device="cpu"):
    """HF + PEFT output and canonical LoRA grads, cached; eager experts on CPU, grouped_mm (HF's default) on CUDA."""
    key = ("peft", str(path), dtype, batch[2] is not None, device)
    if key not in _CACHE:
        ids, labels, pos = batch
        experts = "grouped_mm" if device == "cuda" else "eager"
        hf = H.load_hf_model(path, dtype=dtype, experts_implementation=experts).to(device)
        pm = H.build_peft_model(hf, lora, tensors)
        t = lambda a: torch.as_tensor(a, device=device)  # noqa: E731
        kw = {} if pos is None else {"position_ids": t(pos)}
        ref = pm(input_ids=t(ids), labels=t(labels), use_cache=False, **kw)
        ref.loss.backward()
        for p in pm.parameters():
            if p.requires_grad:
                p.data = p.grad.detach().clone()
        _CACHE[key] = (ref, H.peft_to_canonical_lora(pm))
    return _CACHE[key]


def _compare(out, ref, grads, ref_grads, dname, grad_quantity="lora_grad"):
    assert_close(out.logits, ref.logits, dtype=dname, quantity="logits", name="logits")
    assert_close(out.loss, ref.loss, dtype=dname, quantity="loss", name="loss")
    assert out.aux_loss is None  # HF has no load-balancing loss for these families
    assert set(grads) == set(ref_grads)
    for name, g in grads.items():
        assert float(g.abs().max()) > 0, f"zero gradient for {name}"
        assert_close(g, ref_grads[name], dtype=dname, quantity=grad_quantity, name=f"d {name}")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("family", FAMILIES)
def test_parity_fp32(root, family, backend):
    if why_unavailable(backend, "cpu", torch.float32):
        pytest.skip(f"{backend} unavailable in fp32 on CPU")
    path = _ckpt(root, family)
    cfg = ModelConfig.from_hf(path)
    lora = attn_expert_lora(cfg)
    tensors = H.random_lora_tensors(cfg, lora, seed=7)
    batch = make_batch(11, packed=family == "glm4_moe_lite")
    _, out, grads = _ours(path, lora, tensors, batch, backend=backend)
    ref, ref_grads = _hf_peft(path, lora, tensors, batch)
    _compare(out, ref, grads, ref_grads, "float32")


@pytest.mark.parametrize("family", FAMILIES)
def test_routing_matches_hf_router(root, family):
    """Selected experts (as sets per token) and their weights equal HF's router on the same hidden states; the
    correction bias changes the selection for some tokens (so the test exercises it)."""
    path = _ckpt(root, family)
    hf = H.load_hf_model(path)
    ours = load_model(path)
    layer = next(l for l, m in enumerate(ours.config.moe_layers) if m)
    hf_router, router = hf.model.layers[layer].mlp.gate, ours.layers[layer].mlp.router
    x = torch.randn(64, ours.config.hidden_size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        _, hf_w, hf_ids = hf_router(x)
        ids, w = route(router(x), ours.config.routing, router.e_score_correction_bias)
        unbiased, _ = route(router(x), ours.config.routing, None)
    assert w.dtype == hf_w.dtype == torch.float32
    for t in range(x.shape[0]):
        assert set(ids[t].tolist()) == set(hf_ids[t].tolist()), f"token {t}"
        ours_by_e = dict(zip(ids[t].tolist(), w[t].tolist()))
        hf_by_e = dict(zip(hf_ids[t].tolist(), hf_w[t].tolist()))
        assert_close(np.array([ours_by_e[e] for e in sorted(ours_by_e)]),
                     np.array([hf_by_e[e] for e in sorted(hf_by_e)]),
                     dtype="float32", quantity="routing_weights", name=f"token {t}")
    changed = sum(set(a) != set(b) for a, b in zip(ids.tolist(), unbiased.tolist()))
    assert changed > 0, "the correction bias never changed a selection: routing is not exercised"


@pytest.mark.parametrize("family", FAMILIES)
def test_dense_and_shared_expert_lora_vs_merged_hf(root, family):
    """All targets incl. dense-layer and shared-expert Linears: logits equal HF's with merged weights, and every
    LoRA gradient equals the chain rule through HF's gradient of the merged weight."""
    path = _ckpt(root, family)
    cfg = ModelConfig.from_hf(path)
    lora = all_lora(cfg)
    assert "gate_proj" in lora.targets
    tensors = H.random_lora_tensors(cfg, lora, seed=8)
    batch = make_batch(12)
    _, out, grads = _ours(path, lora, tensors, batch)
    assert any(".mlp.shared_experts." in n for n in grads) and any(n.startswith("layers.0.mlp.") for n in grads)
    from shared_math.checkpoint import read_checkpoint

    _, base = read_checkpoint(path)
    hf = H.load_canonical_into(H.load_hf_model(path), H.merge_lora(dict(base), lora, tensors))
    weights = {}
    for name, p in hf.named_parameters():
        p.requires_grad_(True)
        weights[H.hf_name_to_canonical(name, False)] = p
    ids, labels, _ = batch
    ref = hf(input_ids=torch.as_tensor(ids), labels=torch.as_tensor(labels), use_cache=False)
    ref.loss.backward()
    assert_close(out.logits, ref.logits, dtype="float32", quantity="logits", name="logits")
    assert_close(out.loss, ref.loss, dtype="float32", quantity="loss", name="loss")
    for name, g in grads.items():
        stem, ab = name.rsplit(".", 1)
        expert = stem.endswith((".experts.gate_up_proj", ".experts.down_proj"))
        dW = weights[stem if expert else stem + ".weight"].grad.double().numpy()
        dW = dW.transpose(0, 2, 1) if expert else dW.T  # HF [.., out, in] -> canonical [.., in, out]
        A = tensors[stem + ".lora_A"].astype(np.float64)
        Bm = tensors[stem + ".lora_B"].astype(np.float64)
        want = lora.scale * (dW @ np.swapaxes(Bm, -1, -2) if ab == "lora_A" else np.swapaxes(A, -1, -2) @ dW)
        assert_close(g, want, dtype="float32", quantity="lora_grad", name=f"d {name}")


def _check_bf16(root, family, device, backend):
    path = _ckpt(root, family, **K_EQ_E[family])
    cfg = ModelConfig.from_hf(path)
    lora = attn_expert_lora(cfg)
    tensors = H.random_lora_tensors(cfg, lora, seed=9)
    batch = make_batch(13)
    model, out, grads = _ours(path, lora, tensors, batch, dtype=torch.bfloat16, backend=backend, device=device)
    moe = next(layer.mlp for layer in model.layers if layer.is_moe)
    assert moe.router.weight.dtype == moe.router.e_score_correction_bias.dtype == torch.float32
    assert moe.experts.gate_up_proj.dtype == torch.bfloat16
    ref, _ = _hf_peft(path, lora, tensors, batch, dtype=torch.bfloat16, device=device)
    _, ref_grads32 = _hf_peft(path, lora, tensors, batch, dtype=torch.float32, device=device)
    assert_close(out.logits, ref.logits, dtype="bfloat16", quantity="logits", name="logits")
    assert_close(out.loss, ref.loss, dtype="bfloat16", quantity="loss", name="loss")
    assert set(grads) == set(ref_grads32)
    for name, g in grads.items():
        mla = cfg.attention == "mla" and ".self_attn." in name
        assert_close(g, ref_grads32[name], dtype="bfloat16", quantity="mla_model_lora_grad" if mla else
                     "model_lora_grad", name=f"d {name}")


def test_glm4_moe_partial_rotary_default_is_hfs(root):
    """A GLM-4.x config.json without partial_rotary_factor rotates half of each head, as HF's Glm4MoeConfig."""
    path = _ckpt(root, "glm4_moe", rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
    assert ModelConfig.from_hf(path).rotary_dim == ModelConfig.from_hf(path).head_dim // 2
    ids = torch.as_tensor(make_batch(14)[0])
    with torch.no_grad():
        ours = load_model(path, moe_backend="native")(ids).logits
        ref = H.load_hf_model(path)(input_ids=ids, use_cache=False).logits
    assert_close(ours, ref, dtype="float32", quantity="logits", name="logits")


# GLM-4.7-Flash runs DeepSeek-V3's code (MLA, routing, shared expert); on CPU bf16 covers the two distinct code paths
@pytest.mark.parametrize("family", ["deepseek_v3", "glm4_moe"])
def test_parity_bf16(root, family):
    _check_bf16(root, family, "cpu", "native")


@pytest.mark.gpu
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("family", FAMILIES)
def test_parity_bf16_cuda(root, family, backend):
    if why_unavailable(backend, "cuda", torch.bfloat16):
        pytest.skip(f"{backend} unavailable in bf16 on CUDA")
    _check_bf16(root, family, "cuda", backend)
