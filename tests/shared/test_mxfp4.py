"""MXFP4 decoding (shared_math.mxfp4 and gpt-oss checkpoints in the hub's quantised layout) against transformers'
own dequantisation (`transformers.integrations.mxfp4._convert_moe_packed_tensors`), bit for bit."""

from __future__ import annotations

import numpy as np
import pytest

from shared_math.checkpoint import read_checkpoint, write_checkpoint
from shared_math.config import ModelConfig
from shared_math.mxfp4 import dequantize_mxfp4, quantize_mxfp4
from shared_math.safetensors_io import SafetensorsFile
from shared_math.tiny import random_canonical_tensors, tiny_hf_config, write_tiny_checkpoint


def _hf_dequant(blocks: np.ndarray, scales: np.ndarray) -> np.ndarray:
    """transformers' routine: [E, rows, G, 16] + [E, rows, G] -> bf16 [E, 32·G, rows] (transposed), as float32."""
    torch = pytest.importorskip("torch")
    mx = pytest.importorskip("transformers.integrations.mxfp4")
    out = mx._convert_moe_packed_tensors(torch.from_numpy(blocks.copy()), torch.from_numpy(scales.copy()),
                                         dtype=torch.bfloat16)
    return out.float().numpy()


def test_every_code_and_scale_decodes_like_transformers():
    rng = np.random.default_rng(0)
    # every byte value once per row; scales over a wide exponent range (2^-20 .. 2^20) including 127 (= 2^0)
    blocks = np.arange(256, dtype=np.uint8).reshape(1, 1, 16, 16).repeat(3, axis=1)
    scales = np.array([[[107 + 3 * g for g in range(14)] + [127, 147]] * 3], dtype=np.uint8)
    ours = dequantize_mxfp4(blocks, scales)
    np.testing.assert_array_equal(ours.swapaxes(1, 2), _hf_dequant(blocks, scales))
    # the low nibble is the even element: byte 0x21 decodes to (E2M1[1], E2M1[2]) = (0.5, 1.0) times the scale
    one = dequantize_mxfp4(np.full((1, 16), 0x21, np.uint8), np.array([128], np.uint8))
    np.testing.assert_array_equal(one[:2], [1.0, 2.0])
    blocks = rng.integers(0, 256, size=(2, 5, 3, 16), dtype=np.uint8)
    scales = rng.integers(115, 140, size=(2, 5, 3), dtype=np.uint8)
    np.testing.assert_array_equal(dequantize_mxfp4(blocks, scales).swapaxes(1, 2), _hf_dequant(blocks, scales))


def test_quantiser_round_trips_its_own_grid():
    """quantize(dequantize(b, s)) == (b, s) for codes whose group uses the full range (its max magnitude is 6)."""
    rng = np.random.default_rng(1)
    blocks = rng.integers(0, 256, size=(4, 2, 16), dtype=np.uint8)
    blocks[..., 0] = 0x77  # elements 0 and 1 are +6: the group's scale is determined
    scales = rng.integers(110, 140, size=(4, 2), dtype=np.uint8)
    b2, s2 = quantize_mxfp4(dequantize_mxfp4(blocks, scales))
    np.testing.assert_array_equal(s2, scales)
    np.testing.assert_array_equal(dequantize_mxfp4(b2, s2), dequantize_mxfp4(blocks, scales))  # -0 vs +0 aside


def test_mxfp4_checkpoint_reads_as_transformers_dequantises_it(tmp_path):
    hf = tiny_hf_config("gpt_oss")
    cfg = ModelConfig.from_hf(hf)
    tensors = random_canonical_tensors(cfg, seed=3)
    path = write_checkpoint(tmp_path, hf, tensors, layout="mxfp4")
    raw = SafetensorsFile(path / "model.safetensors")
    assert "model.layers.0.mlp.experts.gate_up_proj" not in raw.keys()
    _, ckpt = read_checkpoint(path)
    for l in range(cfg.num_hidden_layers):
        for which in ("gate_up_proj", "down_proj"):
            key = f"model.layers.{l}.mlp.experts.{which}"
            ref = _hf_dequant(raw.read(key + "_blocks"), raw.read(key + "_scales"))  # [E, in, out], interleaved
            if which == "gate_up_proj":
                ref = np.concatenate([ref[..., 0::2], ref[..., 1::2]], axis=-1)
            got = ckpt[f"layers.{l}.mlp.experts.{which}"]
            assert got.dtype == np.float32 and got.shape == tensors[f"layers.{l}.mlp.experts.{which}"].shape
            np.testing.assert_array_equal(got, ref)
            # and the quantisation is a faithful one: within half an E2M1 step (<= 1/4 of the group max) of the
            # weights written
            w = tensors[f"layers.{l}.mlp.experts.{which}"]
            assert np.abs(got - w).max() <= 0.25 * np.abs(w).max()
    # the non-expert tensors are untouched
    np.testing.assert_array_equal(ckpt["layers.0.self_attn.sinks"], tensors["layers.0.self_attn.sinks"])


def test_transformers_loads_our_mxfp4_checkpoint_to_the_same_weights(tmp_path):
    """HF's own loader (auto-dequantising MXFP4 to bf16 on CPU) gives the weights read_checkpoint gives."""
    pytest.importorskip("transformers")
    from tests.shared import hf_helpers as H

    path = write_tiny_checkpoint("gpt_oss", tmp_path / "bf", seed=4)
    cfg, ckpt = read_checkpoint(path)
    mx = write_checkpoint(tmp_path / "mx", cfg.hf_config, ckpt, layout="mxfp4")
    try:
        import torch
        model = H.load_hf_model(mx, dtype=torch.bfloat16)
    except Exception as e:  # pragma: no cover - depends on transformers' optional kernels
        pytest.skip(f"transformers cannot load an MXFP4 checkpoint here: {e}")
    hf = H.hf_to_canonical(model)
    _, ours = read_checkpoint(mx)
    for name in ("layers.1.mlp.experts.gate_up_proj", "layers.1.mlp.experts.down_proj"):
        np.testing.assert_array_equal(hf[name], ours[name])
