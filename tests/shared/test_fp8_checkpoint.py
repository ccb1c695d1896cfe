"""DeepSeek-V3 block-FP8 checkpoints and bad sigmoid-routing configs through `read_checkpoint` / `load_model`.

The FP8 checkpoint is made here from a tiny float32 one: every Linear weight HF quantises (attention, dense MLP,
shared and routed experts; not the router, embeddings, norms or lm_head) becomes F8_E4M3 with per-block
`weight_scale_inv`, in 16×16 blocks so the tiny shapes have several blocks and partial ones. Expected values come
from transformers' own dequantisation (`integrations/finegrained_fp8._dequantize_fp8_weight`).
"""

from __future__ import annotations

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
safetensors_torch = pytest.importorskip("safetensors.torch")

from shared_math.checkpoint import CheckpointError, read_checkpoint, write_tiny_checkpoint  # noqa: E402

BLOCK = [16, 16]
_E4M3_MAX = 448.0


def _is_quantised(key: str, t: torch.Tensor) -> bool:
    skip = ("embed_tokens", "lm_head", "mlp.gate.weight", "norm")
    return t.ndim == 2 and key.endswith(".weight") and not any(s in key for s in skip)


def _quantise(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-block amax scaling to E4M3 (DeepSeek's recipe): returns (fp8 weight, fp32 scale_inv [⌈r/16⌉, ⌈c/16⌉])."""
    rows, cols = w.shape
    sr, sc = -(-rows // BLOCK[0]), -(-cols // BLOCK[1])
    scale = torch.empty(sr, sc)
    q = torch.empty_like(w)
    for i in range(sr):
        for j in range(sc):
            blk = w[i * 16:(i + 1) * 16, j * 16:(j + 1) * 16]
            scale[i, j] = blk.abs().max().clamp_min(1e-12) / _E4M3_MAX
            q[i * 16:(i + 1) * 16, j * 16:(j + 1) * 16] = blk / scale[i, j]
    return q.to(torch.float8_e4m3fn), scale


@pytest.fixture(scope="module")
def fp8_pair(tmp_path_factory):
    """(fp8 checkpoint, float32 checkpoint holding HF's dequantisation of it, number of quantised tensors)."""
    from transformers.integrations.finegrained_fp8 import _dequantize_fp8_weight

    root = tmp_path_factory.mktemp("fp8")
    src = write_tiny_checkpoint("deepseek_v3", root / "src", seed=2, num_hidden_layers=3)
    state = safetensors_torch.load_file(str(src / "model.safetensors"))
    config = json.loads((src / "config.json").read_text())
    # an MTP layer (HF ignores model.layers.{num_hidden_layers}.*; so must we)
    state["model.layers.3.eh_proj.weight"] = torch.zeros(4, 4)
    fp8, deq = {}, {}
    n = 0
    for k, t in state.items():
        if _is_quantised(k, t) and not k.startswith("model.layers.3."):
            q, s = _quantise(t)
            fp8[k], fp8[k + "_scale_inv"] = q, s
            deq[k] = _dequantize_fp8_weight(q, s, BLOCK, torch.float32)
            n += 1
        else:
            fp8[k] = deq[k] = t
    out = {}
    for name, tensors, qc in (("fp8", fp8, True), ("deq", deq, False)):
        d = root / name
        d.mkdir()
        cfg = dict(config)
        if qc:
            cfg["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                                          "weight_block_size": BLOCK}
        (d / "config.json").write_text(json.dumps(cfg))
        safetensors_torch.save_file({k: v.contiguous() for k, v in tensors.items()}, str(d / "model.safetensors"))
        out[name] = d
    return out["fp8"], out["deq"], n


def test_block_fp8_dequantised_as_transformers_does(fp8_pair):
    fp8_dir, deq_dir, n = fp8_pair
    cfg, got = read_checkpoint(fp8_dir)
    _, want = read_checkpoint(deq_dir)
    assert set(got) == set(want)
    fp8_sourced = [name for name in got if got.source_dtype(name) == "F8_E4M3"]
    # per-expert tensors count once per canonical name; attention, dense, shared and expert weights are all in
    assert any("kv_a_proj_with_mqa" in s for s in fp8_sourced) and any("experts" in s for s in fp8_sourced)
    assert any("shared_experts" in s for s in fp8_sourced) and any("layers.0.mlp." in s for s in fp8_sourced)
    assert n > len(fp8_sourced)
    for name in got:
        a, b = got[name], want[name]
        assert a.dtype == np.float32 and a.shape == b.shape
        np.testing.assert_array_equal(a, b, err_msg=name)  # both are fp8 value × fp32 scale, exactly


def test_block_fp8_loads_into_torch_model(fp8_pair):
    from torch_impl import load_model

    fp8_dir, deq_dir, _ = fp8_pair
    ids = torch.as_tensor(np.random.default_rng(0).integers(0, 128, (1, 8)))
    with torch.no_grad():
        a = load_model(fp8_dir, moe_backend="native")(ids).logits
        b = load_model(deq_dir, moe_backend="native")(ids).logits
    assert torch.equal(a, b)


def test_block_fp8_bad_scale_shape_is_named(fp8_pair, tmp_path):
    fp8_dir, _, _ = fp8_pair
    cfg = json.loads((fp8_dir / "config.json").read_text())
    cfg["quantization_config"]["weight_block_size"] = [8, 8]  # the stored scales are for 16×16 blocks
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    (tmp_path / "model.safetensors").symlink_to(fp8_dir / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"weight_scale_inv has shape .* in 8x8 blocks needs"):
        read_checkpoint(tmp_path)


@pytest.mark.parametrize("family, bad, match", [
    ("deepseek_v3", dict(n_group=3), "not divisible by n_group=3"),
    ("deepseek_v3", dict(n_group=8), "at least 2 experts"),
    ("glm4_moe_lite", dict(topk_group=1, n_group=4, num_experts_per_tok=3), "fewer than num_experts_per_tok=3"),
])
def test_bad_group_routing_config_is_a_clear_error(tmp_path, family, bad, match):
    """A checkpoint whose config.json cannot route (experts not divisible into groups, ...) fails in
    read_checkpoint and load_model (both frameworks share it) with the config's own message."""
    from torch_impl import load_model

    path = write_tiny_checkpoint(family, tmp_path)
    cfg = json.loads((path / "config.json").read_text())
    cfg.update(bad)
    (path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=match):
        read_checkpoint(path)
    with pytest.raises(CheckpointError, match=match):
        load_model(path)
