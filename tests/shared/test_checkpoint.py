"""Checkpoint I/O: safetensors codec, canonical layouts against HF transformers, round trips, laziness, damage."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np
import pytest

from shared_math import safetensors_io as sio
from shared_math.checkpoint import (
    CheckpointError,
    UnsupportedCheckpointError,
    expected_shapes,
    read_checkpoint,
    write_checkpoint,
    write_tiny_checkpoint,
)
from shared_math.config import SUPPORTED_MODEL_TYPES, ModelConfig
from shared_math.tiny import random_canonical_tensors, tiny_hf_config
from tests.conftest import requires_transformers

FAMILIES = SUPPORTED_MODEL_TYPES


def _files_bits(root: Path) -> dict[str, tuple[str, tuple[int, ...], bytes]]:
    """Every tensor of a checkpoint folder as (safetensors dtype, shape, raw bytes), whatever the sharding."""
    out = {}
    for f in sorted(root.glob("*.safetensors")):
        sf = sio.SafetensorsFile(f)
        for k in sf.keys():
            info = sf.info(k)
            out[k] = (info.dtype, info.shape, sf.read_raw(k).tobytes())
    return out


# ---- safetensors codec ---------------------------------------------------------------------------------------------
def test_bf16_rounding_is_nearest_even(seed):
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(seed)
    x = np.concatenate([
        rng.standard_normal(10000).astype(np.float32) * 10.0 ** rng.integers(-30, 30, 10000),
        np.array([0.0, -0.0, np.inf, -np.inf, 3.3895314e38, 3.4028235e38, 1e-40, -1e-45], np.float32),
        # exact ties: 1 + 2^-8 (rounds down to even 1.0) and 1 + 3·2^-8 (rounds up to even)
        np.array([1 + 2**-8, 1 + 3 * 2**-8, -(1 + 2**-8)], np.float32)])
    ours = sio.float32_to_bf16_bits(x)
    theirs = torch.from_numpy(x).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
    np.testing.assert_array_equal(ours, theirs)
    assert np.isnan(sio.bf16_round(np.array([np.nan], np.float32)))[0]


def test_f8_tables_match_torch():
    torch = pytest.importorskip("torch")
    codes = torch.arange(256, dtype=torch.uint8)
    for table, dt in ((sio.F8_E4M3_TABLE, torch.float8_e4m3fn), (sio.F8_E5M2_TABLE, torch.float8_e5m2)):
        theirs = codes.view(dt).float().numpy()
        np.testing.assert_array_equal(table, theirs)  # assert_array_equal treats NaN == NaN


def test_reader_decodes_every_dtype_written_by_safetensors(tmp_path, seed):
    torch = pytest.importorskip("torch")
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(seed)
    ref = {
        "f64": torch.randn(3, 5, generator=g, dtype=torch.float64), "f32": torch.randn(7, generator=g),
        "f16": torch.randn(2, 3, generator=g).half(), "bf16": torch.randn(4, 9, generator=g).bfloat16(),
        "i64": torch.arange(-5, 5), "i32": torch.arange(6, dtype=torch.int32).reshape(2, 3),
        "u8": torch.arange(250, 256, dtype=torch.uint8), "i8": torch.arange(-3, 3, dtype=torch.int8),
        "f8": torch.randn(17, generator=g).to(torch.float8_e4m3fn), "empty": torch.zeros(0, 4),
    }
    save_file(ref, str(tmp_path / "x.safetensors"))
    f = sio.SafetensorsFile(tmp_path / "x.safetensors")
    for k, t in ref.items():
        got = f.read(k)
        want = t.float().numpy() if t.dtype in (torch.bfloat16, torch.float8_e4m3fn) else t.numpy()
        assert got.dtype == want.dtype and got.shape == want.shape, k
        np.testing.assert_array_equal(got, want, err_msg=k)


def test_writer_output_loads_in_safetensors(tmp_path, seed):
    torch = pytest.importorskip("torch")
    from safetensors.torch import load_file

    rng = np.random.default_rng(seed)
    x = {"a": rng.standard_normal((3, 4)).astype(np.float32), "b": rng.standard_normal(5).astype(np.float32),
         "i": np.arange(3, dtype=np.int64)}
    for dtype, tdt in (("float32", torch.float32), ("float16", torch.float16), ("bfloat16", torch.bfloat16)):
        sio.write_safetensors(tmp_path / f"{dtype}.safetensors", x, dtype=dtype)
        got = load_file(str(tmp_path / f"{dtype}.safetensors"))
        for k in ("a", "b"):
            assert got[k].dtype == tdt
            np.testing.assert_array_equal(got[k].float().numpy(), torch.from_numpy(x[k]).to(tdt).float().numpy())
        np.testing.assert_array_equal(got["i"].numpy(), x["i"])


# ---- tiny checkpoints load in HF, and equal HF's in-memory parameters ------------------------------------------------
TINY_VARIANTS = [(f, "hub", "float32", {}) for f in FAMILIES] + [
    (f, "fused", "float32", {}) for f in FAMILIES] + [(f, "hub", "bfloat16", {}) for f in FAMILIES] + [
    ("qwen3_moe", "hub", "float32", {"tie_word_embeddings": True, "mlp_only_layers": [0]}),
    ("glm4_moe", "fused", "float32", {"use_qk_norm": False, "attention_bias": False}),
    ("deepseek_v3", "hub", "float32", {"q_lora_rank": None, "num_hidden_layers": 3}),
]


@requires_transformers
@pytest.mark.parametrize("family,layout,dtype,overrides", TINY_VARIANTS,
                         ids=[f"{f}-{l}-{d}{'-' + '-'.join(o) if o else ''}" for f, l, d, o in TINY_VARIANTS])
def test_tiny_checkpoint_loads_in_hf(tmp_path, family, layout, dtype, overrides, seed):
    from tests.shared.hf_helpers import hf_to_canonical, load_hf_model

    path = write_tiny_checkpoint(family, tmp_path, seed=seed, dtype=dtype, layout=layout, **overrides)
    model, info = load_hf_model(path, return_info=True)
    assert not any(info.values()), info  # missing, unexpected, mismatched keys, error messages
    cfg, ckpt = read_checkpoint(path)
    ours = dict(ckpt)
    want = random_canonical_tensors(cfg, seed)
    if dtype == "bfloat16":
        want = {k: sio.bf16_round(v) for k, v in want.items()}
    theirs = hf_to_canonical(model)
    assert sorted(theirs) == sorted(ours) == sorted(want)
    for k in ours:
        np.testing.assert_array_equal(theirs[k], ours[k], err_msg=k)
        np.testing.assert_array_equal(ours[k], want[k], err_msg=k)


@requires_transformers
def test_tiny_gpt_oss_layout_is_deinterleaved(tmp_path):
    """The canonical gate is HF's even columns: a check of the layout rule itself, not only a round trip."""
    from tests.shared.hf_helpers import load_hf_model

    path = write_tiny_checkpoint("gpt_oss", tmp_path)
    _, ckpt = read_checkpoint(path)
    experts = load_hf_model(path).model.layers[1].mlp.experts
    I = ckpt.config.moe_intermediate_size
    gu, b = ckpt["layers.1.mlp.experts.gate_up_proj"], ckpt["layers.1.mlp.experts.gate_up_proj_bias"]
    np.testing.assert_array_equal(gu[..., :I], experts.gate_up_proj.detach().numpy()[..., 0::2])
    np.testing.assert_array_equal(gu[..., I:], experts.gate_up_proj.detach().numpy()[..., 1::2])
    np.testing.assert_array_equal(b[..., :I], experts.gate_up_proj_bias.detach().numpy()[..., 0::2])


# ---- HF save_pretrained reads back; our writer reproduces HF's files bit for bit -------------------------------------
HF_SAVES = [(f, orig, None) for f in FAMILIES for orig in (True, False)] + [
    ("qwen3_moe", True, "40KB"), ("deepseek_v3", False, "40KB")]


@requires_transformers
@pytest.mark.parametrize("family,original,shard", HF_SAVES,
                         ids=[f"{f}-{'orig' if o else 'fused'}{'-sharded' if s else ''}" for f, o, s in HF_SAVES])
def test_hf_save_pretrained_reads_back(tmp_path, family, original, shard, seed):
    from tests.shared.hf_helpers import hf_model_from_config, hf_to_canonical

    hf = tiny_hf_config(family)
    model = hf_model_from_config(hf, seed=seed % 1000)
    kw = {"max_shard_size": shard} if shard else {}
    model.save_pretrained(tmp_path / "hf", save_original_format=original, **kw)
    assert (tmp_path / "hf" / "model.safetensors.index.json").is_file() == bool(shard)
    cfg, ckpt = read_checkpoint(tmp_path / "hf")
    theirs = hf_to_canonical(model)
    assert sorted(ckpt) == sorted(theirs)
    for k in theirs:
        np.testing.assert_array_equal(ckpt[k], theirs[k], err_msg=k)
    # write_checkpoint is the exact inverse of HF's own files (names, dtypes, shapes, bits)
    layout = "hub" if original else "fused"
    write_checkpoint(tmp_path / "ours", cfg.hf_config, ckpt, layout=layout, max_shard_bytes=40_000 if shard else None)
    assert _files_bits(tmp_path / "ours") == _files_bits(tmp_path / "hf")


# ---- round trips -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("layout", ["hub", "fused"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
@pytest.mark.parametrize("family", FAMILIES)
def test_write_read_roundtrip_is_bit_exact(tmp_path, family, layout, dtype, seed):
    src = write_tiny_checkpoint(family, tmp_path / "a", seed=seed, dtype=dtype, layout=layout)
    cfg, ckpt = read_checkpoint(src)
    if dtype == "float16":
        assert ckpt["norm.weight"].dtype == np.float16
    write_checkpoint(tmp_path / "b", cfg.hf_config, ckpt, layout=layout, dtype=dtype)
    assert _files_bits(tmp_path / "b") == _files_bits(src)
    # and re-sharded: same tensors, several files, an index naming each one's file
    write_checkpoint(tmp_path / "c", cfg.hf_config, ckpt, layout=layout, dtype=dtype, max_shard_bytes=30_000)
    index = json.loads((tmp_path / "c" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    assert _files_bits(tmp_path / "c") == _files_bits(src)
    _, again = read_checkpoint(tmp_path / "c")
    for k in ckpt:
        np.testing.assert_array_equal(again[k], ckpt[k], err_msg=k)


@requires_transformers
def test_sharded_checkpoint_loads_in_hf(tmp_path):
    from tests.shared.hf_helpers import hf_to_canonical, load_hf_model

    src = write_tiny_checkpoint("glm4_moe", tmp_path / "a", seed=3)
    cfg, ckpt = read_checkpoint(src)
    write_checkpoint(tmp_path / "b", cfg.hf_config, ckpt, max_shard_bytes=50_000)
    model, info = load_hf_model(tmp_path / "b", return_info=True)
    assert not any(info.values()), info
    theirs = hf_to_canonical(model)
    for k in ckpt:
        np.testing.assert_array_equal(theirs[k], ckpt[k], err_msg=k)


def test_tiny_config_overrides_and_shapes():
    hf = tiny_hf_config("gpt_oss", num_hidden_layers=3, num_local_experts=4)
    cfg = ModelConfig.from_hf(hf)
    assert hf["layer_types"] == ["sliding_attention", "full_attention", "sliding_attention"]
    assert cfg.num_experts == 4 and expected_shapes(cfg)["layers.2.mlp.experts.gate_up_proj"] == (4, 64, 64)
    lite = ModelConfig.from_hf(tiny_hf_config("glm4_moe_lite", num_hidden_layers=3))
    assert lite.moe_layers == (False, True, True)
    ds = ModelConfig.from_hf(tiny_hf_config("deepseek_v3"))
    assert "layers.0.mlp.gate_proj.weight" in expected_shapes(ds) and ds.moe_layers == (False, True)
    with pytest.raises(ValueError, match="unknown family"):
        tiny_hf_config("llama")


# ---- laziness ----------------------------------------------------------------------------------------------------
def test_shapes_read_no_data_and_getitem_reads_only_its_sources(tmp_path, monkeypatch):
    path = write_tiny_checkpoint("qwen3_moe", tmp_path)
    reads: list[str] = []
    real = sio.SafetensorsFile.read_raw

    def spy(self, name):
        reads.append(name)
        return real(self, name)

    monkeypatch.setattr(sio.SafetensorsFile, "read_raw", spy)
    cfg, ckpt = read_checkpoint(path)
    assert ckpt.shapes == expected_shapes(cfg) and len(ckpt) == len(ckpt.shapes) and sorted(ckpt) == sorted(
        ckpt.shapes)
    assert reads == []
    w = ckpt["layers.1.mlp.experts.gate_up_proj"]
    assert w.shape == ckpt.shapes["layers.1.mlp.experts.gate_up_proj"]
    E = cfg.num_experts
    assert sorted(reads) == sorted(f"model.layers.1.mlp.experts.{e}.{p}_proj.weight" for e in range(E)
                                   for p in ("gate", "up"))
    reads.clear()
    layer = ckpt.layer(0)
    assert set(layer) == {k[len("layers.0."):] for k in ckpt.shapes if k.startswith("layers.0.")}
    assert all(r.startswith("model.layers.0.") for r in reads)


def test_lazy_tensors_are_drawn_once_each_and_shards_written_as_they_fill(tmp_path, monkeypatch):
    """write_checkpoint reads a lazy mapping once per tensor (no `in` draws) and writes each shard when it is full,
    before the next tensors are drawn; what it wrote is the drawn tensors, rounded to bf16."""
    from shared_math.tiny import lazy_random_canonical_tensors

    hf = tiny_hf_config("qwen3_moe")
    lazy = lazy_random_canonical_tensors(ModelConfig.from_hf(hf), seed=1)
    drawn: list[str] = []
    shards_at_draw: list[int] = []

    class Spy(dict):  # records every read, and how many shards were on disk at the time
        def __getitem__(self, name):
            drawn.append(name)
            shards_at_draw.append(len(list(tmp_path.glob("ckpt/.shard-*.tmp"))))
            return lazy[name]

    spy = Spy.fromkeys(lazy)
    write_checkpoint(tmp_path / "ckpt", hf, spy, dtype="bfloat16", max_shard_bytes=40_000)
    assert drawn == list(lazy)  # once each, in model order
    assert shards_at_draw[-1] > 1  # earlier shards were on disk before the last tensor was drawn
    assert not list((tmp_path / "ckpt").glob(".shard-*"))  # all renamed
    _, back = read_checkpoint(tmp_path / "ckpt")
    for k in lazy:
        np.testing.assert_array_equal(back[k], sio.bf16_round(lazy[k]), err_msg=k)


def test_corrupt_data_is_not_touched_until_asked(tmp_path):
    """Overwrite one tensor's bytes with NaNs: opening and `.shapes` still work, only that tensor is damaged."""
    path = write_tiny_checkpoint("deepseek_v3", tmp_path)
    f = sio.SafetensorsFile(path / "model.safetensors")
    info = f.info("model.layers.1.mlp.shared_experts.up_proj.weight")
    f.close()
    with open(path / "model.safetensors", "r+b") as fh:
        fh.seek(info.begin)
        fh.write(np.full((info.end - info.begin) // 4, np.nan, np.float32).tobytes())
    _, ckpt = read_checkpoint(path)
    assert ckpt.shapes["layers.1.mlp.shared_experts.up_proj.weight"] == (64, 32)
    assert np.isfinite(ckpt["layers.1.mlp.shared_experts.gate_proj.weight"]).all()
    assert np.isnan(ckpt["layers.1.mlp.shared_experts.up_proj.weight"]).all()


# ---- damaged checkpoints -------------------------------------------------------------------------------------------
def _rewrite(path: Path, edit) -> None:
    """Rewrite path/model.safetensors with `edit(dict of raw-decoded tensors)` applied."""
    f = sio.SafetensorsFile(path / "model.safetensors")
    tensors = {k: f.read(k) for k in f.keys()}
    f.close()
    edit(tensors)
    sio.write_safetensors(path / "model.safetensors", tensors)


def test_missing_tensor_is_named(tmp_path):
    path = write_tiny_checkpoint("qwen3_moe", tmp_path)
    _rewrite(path, lambda t: t.pop("model.layers.1.mlp.experts.3.up_proj.weight"))
    with pytest.raises(CheckpointError, match=r"model\.layers\.1\.mlp\.experts\.3\.up_proj\.weight.*\[32, 64\].*"
                                              r"missing"):
        read_checkpoint(path)


def test_wrong_shape_is_named(tmp_path):
    path = write_tiny_checkpoint("glm4_moe", tmp_path, layout="fused")

    def edit(t):
        t["model.layers.1.mlp.experts.down_proj"] = t["model.layers.1.mlp.experts.down_proj"][:, :, :-1]

    _rewrite(path, edit)
    with pytest.raises(CheckpointError, match=r"model\.safetensors: tensor model\.layers\.1\.mlp\.experts\.down_proj "
                                              r"has shape \[8, 64, 31\].*implies \[8, 64, 32\]"):
        read_checkpoint(path)


def test_unknown_tensor_is_named_but_mtp_layers_are_ignored(tmp_path):
    path = write_tiny_checkpoint("deepseek_v3", tmp_path)
    # layer 2 = num_hidden_layers is the MTP layer (an MTP module: it has an eh_proj), which HF ignores too
    _rewrite(path, lambda t: t.update({"model.layers.2.mlp.gate.weight": np.zeros((8, 64), np.float32),
                                       "model.layers.2.eh_proj.weight": np.zeros((64, 128), np.float32)}))
    read_checkpoint(path)
    _rewrite(path, lambda t: t.update({"model.layers.1.mlp.extra.weight": np.zeros(3, np.float32)}))
    with pytest.raises(CheckpointError, match=r"model\.layers\.1\.mlp\.extra\.weight"):
        read_checkpoint(path)


def test_truncated_file_is_named(tmp_path):
    path = write_tiny_checkpoint("gpt_oss", tmp_path)
    data = (path / "model.safetensors").read_bytes()
    (path / "model.safetensors").write_bytes(data[:-100])
    with pytest.raises(CheckpointError, match=r"model\.safetensors.*truncated"):
        read_checkpoint(path)
    (path / "model.safetensors").write_bytes(data[:5])
    with pytest.raises(CheckpointError, match=r"model\.safetensors.*too short"):
        read_checkpoint(path)


def test_garbage_header_is_named(tmp_path):
    path = write_tiny_checkpoint("qwen3_moe", tmp_path)
    data = bytearray((path / "model.safetensors").read_bytes())
    data[8:20] = b"\x00garbage!!!!"
    (path / "model.safetensors").write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=r"model\.safetensors: corrupt header"):
        read_checkpoint(path)
    (path / "model.safetensors").write_bytes(struct.pack("<Q", 1 << 40) + bytes(data[8:]))
    with pytest.raises(CheckpointError, match=r"model\.safetensors: header length"):
        read_checkpoint(path)


def test_missing_config_and_unsupported_model_type(tmp_path):
    path = write_tiny_checkpoint("qwen3_moe", tmp_path)
    hf = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**hf, "model_type": "llama"}))
    with pytest.raises(CheckpointError, match=r"config\.json.*unsupported model_type 'llama'"):
        read_checkpoint(path)
    (path / "config.json").unlink()
    with pytest.raises(CheckpointError, match=r"config\.json"):
        read_checkpoint(path)
    with pytest.raises(CheckpointError, match="not a checkpoint folder"):
        read_checkpoint(tmp_path / "nowhere")


def test_missing_shard_and_quantised_checkpoints(tmp_path):
    src = write_tiny_checkpoint("gpt_oss", tmp_path / "a")
    cfg, ckpt = read_checkpoint(src)
    write_checkpoint(tmp_path / "b", cfg.hf_config, ckpt, max_shard_bytes=40_000)
    shards = sorted((tmp_path / "b").glob("model-*.safetensors"))
    shards[-1].unlink()
    with pytest.raises(CheckpointError, match=shards[-1].name):
        read_checkpoint(tmp_path / "b")
    # gpt-oss decodes MXFP4 experts (tests/shared/test_mxfp4.py): a malformed blocks tensor is named with its shape
    _rewrite(src, lambda t: t.update({"model.layers.0.mlp.experts.gate_up_proj_blocks": np.zeros(4, np.uint8)}))
    with pytest.raises(CheckpointError, match=r"gate_up_proj_blocks has shape \[4\]"):
        read_checkpoint(src)
    src = write_tiny_checkpoint("qwen3_moe", tmp_path / "q")  # other families have no MXFP4 format
    _rewrite(src, lambda t: t.update({"model.layers.0.mlp.experts.gate_up_proj_blocks": np.zeros(4, np.uint8)}))
    with pytest.raises(UnsupportedCheckpointError, match="MXFP4"):
        read_checkpoint(src)
    src = write_tiny_checkpoint("deepseek_v3", tmp_path / "c")
    # block FP8 is dequantised (tests/shared/test_fp8_checkpoint.py), but only on FP8 weights; per-tensor FP8 scales
    # are another format
    _rewrite(src, lambda t: t.update({"model.layers.0.mlp.up_proj.weight_scale_inv": np.ones((1, 1), np.float32)}))
    with pytest.raises(CheckpointError, match="up_proj.weight is F32, but it has a .*weight_scale_inv"):
        read_checkpoint(src)
    src = write_tiny_checkpoint("deepseek_v3", tmp_path / "d")
    _rewrite(src, lambda t: t.update({"model.layers.0.mlp.up_proj.weight_scale": np.ones((1, 1), np.float32)}))
    with pytest.raises(NotImplementedError, match="FP8 with per-tensor scales"):
        read_checkpoint(src)


def test_writer_rejects_tensors_that_do_not_fit_the_config(tmp_path):
    hf = tiny_hf_config("qwen3_moe")
    tensors = random_canonical_tensors(ModelConfig.from_hf(hf), 0)
    bad = dict(tensors)
    bad.pop("norm.weight")
    with pytest.raises(CheckpointError, match="norm.weight"):
        write_checkpoint(tmp_path, hf, bad)
    bad = {**tensors, "layers.0.mlp.experts.down_proj": np.zeros((8, 32, 63), np.float32)}
    with pytest.raises(CheckpointError, match=r"down_proj has shape \[8, 32, 63\].*\[8, 32, 64\]"):
        write_checkpoint(tmp_path, hf, bad)
