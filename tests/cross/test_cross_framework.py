"""torch_impl vs jax_impl vs HF transformers + PEFT on the same tiny checkpoint, adapter (B non-zero) and batch.

fp32 (torch TF32 off, JAX precision highest): logits, loss and every LoRA gradient agree to ~1e-5 relative, for
norm_topk_prob true/false, K=1 (with experts that get no tokens), K=E, a dense (mlp_only) layer, packed sequences.
bf16 (K=E, so no routing near-tie can flip between frameworks): within shared_math.numerics' bf16 rows.
An adapter crosses torch -> jax -> PEFT with equal logits.
"""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest

_MISSING = [m for m in ("torch", "jax", "flax", "transformers", "peft", "torch_impl", "jax_impl")
            if importlib.util.find_spec(m) is None]
pytestmark = pytest.mark.skipif(bool(_MISSING), reason=f"cross-framework tests need torch, jax, flax, transformers "
                                f"and peft; missing here: {', '.join(_MISSING)}")
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
from shared_math.numerics import assert_close, diff_summary  # noqa: E402
from tests.jax.jax_helpers import LoraRunner, routing_margins  # noqa: E402
from tests.shared.hf_helpers import build_peft_model, load_hf_model, random_lora_tensors  # noqa: E402

B, S = 2, 16
ATTN_EXPERTS = ("q_proj", "k_proj", "v_proj", "o_proj", "experts.gate_up_proj", "experts.down_proj")
# name -> (tiny_hf_config overrides, LoRA targets, packed batch?)
CONFIGS = {
    "k1_no_norm": (dict(num_experts=16, num_experts_per_tok=1, norm_topk_prob=False), ATTN_EXPERTS, True),
    "k_eq_e": (dict(num_experts=4, num_experts_per_tok=4, norm_topk_prob=True), ATTN_EXPERTS, True),
    # a dense (mlp_only) first layer. No LoRA on its gate/up/down_proj: PEFT rewrites gate_proj/up_proj targets on
    # MoE models into the experts' fused gate_up (its v4-adapter conversion; 0.21 then fails to load them).
    "dense_layer_norm": (dict(norm_topk_prob=True, mlp_only_layers=[0]), ATTN_EXPERTS, False),
}
MEASURED: dict[str, float] = {}  # max relative diffs, printed at the end of the module (pytest -s)


def make_batch(seed: int, packed: bool):
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, 128, (B, S))
    labels = ids.copy()
    labels[:, :2] = -100
    pos = np.tile(np.concatenate([np.arange(6), np.arange(S - 6)]), (B, 1)) if packed else None
    if packed:
        labels[:, 6] = -100
    return ids, labels, pos


def torch_run(model, ids, labels, pos) -> dict:
    """Forward + backward of a torch_impl model -> logits, loss, LoRA grads under canonical names (module paths
    are canonical; Experts hold `gate_up_lora_A` etc., CONTRACTS.md)."""
    model.zero_grad()
    out = model(torch.as_tensor(ids), labels=torch.as_tensor(labels),
                position_ids=None if pos is None else torch.as_tensor(pos))
    out.loss.backward()
    grads = {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            canon = name.replace("experts.gate_up_lora_", "experts.gate_up_proj.lora_")
            grads[canon.replace("experts.down_lora_", "experts.down_proj.lora_")] = p.grad.float().numpy()
    assert set(grads) == set(tlora.lora_state_dict(model))
    return dict(logits=out.logits.detach().float().numpy(), loss=float(out.loss.detach()), grads=grads)


def hf_run(pm, ids, labels, pos, router_logits: bool = False) -> dict:
    from tests.shared.hf_helpers import peft_to_canonical_lora

    kw = dict(input_ids=torch.as_tensor(ids), use_cache=False,
              position_ids=None if pos is None else torch.as_tensor(pos))
    res = {}
    if router_logits:  # a separate forward: with output_router_logits HF also adds the aux loss to the loss
        with torch.no_grad():
            res["router_logits"] = [r.float().numpy() for r in pm(**kw, output_router_logits=True).router_logits]
    pm.zero_grad()
    out = pm(**kw, labels=torch.as_tensor(labels))
    out.loss.backward()
    params = [p for n, p in pm.named_parameters() if "lora_" in n]
    saved = [p.data.clone() for p in params]
    for p in params:
        p.data.copy_(p.grad)
    grads = peft_to_canonical_lora(pm)
    for p, s in zip(params, saved):
        p.data.copy_(s)
    return dict(res, logits=out.logits.detach().float().numpy(), loss=float(out.loss.detach()), grads=grads)


def compare(a: dict, b: dict, dtype: str, label: str) -> None:
    assert set(a["grads"]) == set(b["grads"]) and a["grads"]
    assert_close(a["logits"], b["logits"], dtype=dtype, quantity="logits", name=f"{label} logits")
    assert_close(a["loss"], b["loss"], dtype=dtype, quantity="loss", name=f"{label} loss")
    worst = 0.0
    for name in sorted(b["grads"]):
        s = assert_close(a["grads"][name], b["grads"][name], dtype=dtype, quantity="lora_grad",
                         name=f"{label} {name}")
        worst = max(worst, s.max_abs / max(s.max_abs_expected, 1e-30))
    s = diff_summary(a["logits"], b["logits"])
    MEASURED[f"{label} logits"] = max(MEASURED.get(f"{label} logits", 0.0), s.max_abs / s.max_abs_expected)
    MEASURED[f"{label} lora_grad"] = max(MEASURED.get(f"{label} lora_grad", 0.0), worst)


@pytest.fixture(scope="module", autouse=True)
def _report():
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    yield
    print("\ncross-framework max |diff| / max |expected|:")
    for k, v in sorted(MEASURED.items()):
        print(f"  {k:40s} {v:.2e}")


def _setup(tmp_path, config: str, seed: int = 0):
    overrides, targets, packed = CONFIGS[config]
    path = write_tiny_checkpoint("qwen3_moe", tmp_path / config, seed=seed, **overrides)
    cfg, _ = read_checkpoint(path)
    lora = LoraConfig(rank=4, alpha=8.0, targets=targets)
    return path, cfg, lora, random_lora_tensors(cfg, lora, seed=seed + 1), packed


def _three(path, lora, tensors, jdtype, tdtype):
    jm = jax_impl.load_model(path, lora=lora, dtype=jdtype)
    jlora.load_lora_state_dict(jm, tensors)
    tm = torch_impl.load_model(path, lora=lora, dtype=tdtype)
    tlora.load_lora_state_dict(tm, tensors)
    pm = build_peft_model(load_hf_model(path, dtype=tdtype), lora, tensors)
    return jm, tm, pm


@pytest.mark.parametrize("config", list(CONFIGS))
def test_fp32_torch_jax_hf_agree(tmp_path, config):
    path, cfg, lora, tensors, packed = _setup(tmp_path, config)
    jm, tm, pm = _three(path, lora, tensors, jnp.float32, torch.float32)
    ids, labels, pos = make_batch(7, packed)
    hf = hf_run(pm, ids, labels, pos, router_logits=True)
    jx, tr = LoraRunner(jm).run(ids, labels, pos), torch_run(tm, ids, labels, pos)
    compare(jx, hf, "float32", "jax vs hf")
    compare(tr, hf, "float32", "torch vs hf")
    compare(jx, tr, "float32", "jax vs torch")
    if config == "k1_no_norm":  # the case must contain experts that receive no tokens
        counts = [np.bincount(r.argmax(-1), minlength=cfg.num_experts) for r in hf["router_logits"]]
        assert any((c == 0).any() for c in counts), counts


def test_bf16_torch_jax_hf_agree(tmp_path):
    path, cfg, lora, tensors, packed = _setup(tmp_path, "k_eq_e")
    jm, tm, pm = _three(path, lora, tensors, jnp.bfloat16, torch.bfloat16)
    ids, labels, pos = make_batch(8, packed)
    # K = E: every token visits every expert, so no routing decision can flip between frameworks in bf16
    hf = hf_run(pm, ids, labels, pos, router_logits=True)
    assert routing_margins(hf["router_logits"], cfg.num_experts_per_tok, (B, S)).min() > 0
    jx, tr = LoraRunner(jm).run(ids, labels, pos), torch_run(tm, ids, labels, pos)
    compare(jx, hf, "bfloat16", "bf16 jax vs hf")
    compare(jx, tr, "bfloat16", "bf16 jax vs torch")


def test_adapter_crosses_torch_jax_peft(tmp_path):
    """torch_impl saves, jax_impl loads (equal logits) and saves, PEFT loads jax's file (equal logits)."""
    import peft

    path, cfg, lora, tensors, packed = _setup(tmp_path, "dense_layer_norm", seed=5)
    ids, _, pos = make_batch(9, packed)
    tm = torch_impl.load_model(path, lora=lora)
    tlora.load_lora_state_dict(tm, tensors)
    with torch.no_grad():
        torch_logits = tm(torch.as_tensor(ids)).logits.numpy()
    tlora.save_adapter(tm, tmp_path / "from_torch")

    jm = jax_impl.load_model(path)  # no LoRA yet: load_adapter attaches it with the adapter's own config
    jlora.load_adapter(jm, tmp_path / "from_torch")
    assert jm.lora_config.scale == lora.scale
    for name, want in tensors.items():
        np.testing.assert_array_equal(jlora.lora_state_dict(jm)[name], want, err_msg=name)
    jax_logits = np.asarray(jm(jnp.asarray(ids)).logits)
    assert_close(jax_logits, torch_logits, dtype="float32", quantity="logits", name="jax(torch adapter)")
    jlora.save_adapter(jm, tmp_path / "from_jax")

    pm = peft.PeftModel.from_pretrained(load_hf_model(path), str(tmp_path / "from_jax")).eval()
    with torch.no_grad():
        peft_logits = pm(input_ids=torch.as_tensor(ids), use_cache=False).logits.numpy()
    assert_close(peft_logits, jax_logits, dtype="float32", quantity="logits", name="PEFT(jax adapter)")
    # and the reverse direction, jax -> torch, closes the loop
    tm2 = torch_impl.load_model(path)
    tlora.load_adapter(tm2, tmp_path / "from_jax")
    for name, want in tensors.items():
        np.testing.assert_array_equal(tlora.lora_state_dict(tm2)[name], want, err_msg=name)
