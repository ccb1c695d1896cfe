"""HF safetensors checkpoints <-> canonical numpy tensors (docs/CONTRACTS.md, "Canonical tensor names").

`read_checkpoint(dir)` opens a single-file or sharded checkpoint of any supported family, in the per-expert hub
layout (`mlp.experts.{e}.{gate,up,down}_proj.weight`) or transformers v5's fused layout (`mlp.experts.gate_up_proj`
`[E, 2I, H]`, gpt-oss `[E, H, 2I]` interleaved), validates every tensor's presence and shape against the config
up front from the headers alone, and returns a lazy mapping that reads and converts a tensor only when asked:
2-D Linear weights transposed to `[in, out]`, the router renamed to `mlp.router`, experts as
`gate_up_proj [E, H, 2I]` (gate 0:I, up I:2I) and `down_proj [E, I, H]`. gpt-oss's MXFP4 experts (`*_blocks`,
`*_scales`) are decoded to float32 per tensor as they are read (`shared_math.mxfp4`), and so are DeepSeek-V3's
block-FP8 Linear weights (`weight` F8_E4M3 + `weight_scale_inv`, `shared_math.fp8`).

`write_checkpoint` is the exact inverse. `expected_shapes(cfg)` lists every canonical tensor a config implies.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

from shared_math.config import MTP_FAMILIES, ModelConfig
from shared_math.fp8 import SCALE_SUFFIX as FP8_SCALE_SUFFIX
from shared_math.fp8 import block_size as fp8_block_size
from shared_math.fp8 import dequantize_block_fp8
from shared_math.fp8 import scale_shape as fp8_scale_shape
from shared_math.mxfp4 import BLOCK as _MX_BLOCK
from shared_math.mxfp4 import dequantize_mxfp4, quantize_mxfp4
from shared_math.safetensors_io import SafetensorsError, SafetensorsFile, write_safetensors

Shape = tuple[int, ...]
Layout = Literal["hub", "fused", "mxfp4"]  # mxfp4: gpt-oss experts quantised as on the hub

__all__ = ["CheckpointError", "UnsupportedCheckpointError", "CheckpointTensors", "expected_shapes",
           "read_checkpoint", "write_checkpoint", "hf_keys_for", "check_unused_tensors", "tiny_hf_config",
           "write_tiny_checkpoint", "random_canonical_tensors"]


class CheckpointError(ValueError):
    """A checkpoint is missing, damaged or does not match its config; the message names the tensor and file."""


class UnsupportedCheckpointError(CheckpointError, NotImplementedError):
    """A valid checkpoint in a format not implemented yet (MXFP4 or FP8 quantised weights)."""


# ---- what a config implies ---------------------------------------------------------------------------------------
def expected_shapes(cfg: ModelConfig) -> dict[str, Shape]:
    """Every canonical tensor name of `cfg` with its canonical shape, in model order."""
    H, V, E, I = cfg.hidden_size, cfg.vocab_size, cfg.num_experts, cfg.moe_intermediate_size
    out: dict[str, Shape] = {"embed_tokens.weight": (V, H)}
    for l in range(cfg.num_hidden_layers):
        p = f"layers.{l}."
        out[p + "input_layernorm.weight"] = (H,)
        out.update({p + "self_attn." + k: s for k, s in _attention_shapes(cfg).items()})
        out[p + "post_attention_layernorm.weight"] = (H,)
        if cfg.moe_layers[l]:
            out[p + "mlp.router.weight"] = (H, E)
            if cfg.router_bias:
                out[p + "mlp.router.bias"] = (E,)
            if cfg.routing.method == "sigmoid_group":
                out[p + "mlp.router.e_score_correction_bias"] = (E,)
            out[p + "mlp.experts.gate_up_proj"] = (E, H, 2 * I)
            out[p + "mlp.experts.down_proj"] = (E, I, H)
            if cfg.expert_bias:
                out[p + "mlp.experts.gate_up_proj_bias"] = (E, 2 * I)
                out[p + "mlp.experts.down_proj_bias"] = (E, H)
            if cfg.n_shared_experts:
                out.update(_mlp_shapes(p + "mlp.shared_experts.", H, cfg.shared_intermediate_size))
        else:
            out.update(_mlp_shapes(p + "mlp.", H, cfg.intermediate_size))
    out["norm.weight"] = (H,)
    if not cfg.tie_word_embeddings:
        out["lm_head.weight"] = (H, V)
    return out


def _mlp_shapes(prefix: str, H: int, width: int) -> dict[str, Shape]:
    return {prefix + "gate_proj.weight": (H, width), prefix + "up_proj.weight": (H, width),
            prefix + "down_proj.weight": (width, H)}


def _attention_shapes(cfg: ModelConfig) -> dict[str, Shape]:
    H, nh = cfg.hidden_size, cfg.num_attention_heads
    s: dict[str, Shape] = {}
    if cfg.attention == "mla":
        q_out = nh * cfg.qk_head_dim
        if cfg.q_lora_rank is None:
            s["q_proj.weight"] = (H, q_out)
        else:
            s["q_a_proj.weight"] = (H, cfg.q_lora_rank)
            if cfg.attention_bias:
                s["q_a_proj.bias"] = (cfg.q_lora_rank,)
            s["q_a_layernorm.weight"] = (cfg.q_lora_rank,)
            s["q_b_proj.weight"] = (cfg.q_lora_rank, q_out)
        s["kv_a_proj_with_mqa.weight"] = (H, cfg.kv_lora_rank + cfg.qk_rope_head_dim)
        if cfg.attention_bias:
            s["kv_a_proj_with_mqa.bias"] = (cfg.kv_lora_rank + cfg.qk_rope_head_dim,)
        s["kv_a_layernorm.weight"] = (cfg.kv_lora_rank,)
        s["kv_b_proj.weight"] = (cfg.kv_lora_rank, nh * (cfg.qk_nope_head_dim + cfg.v_head_dim))
        s["o_proj.weight"] = (nh * cfg.v_head_dim, H)
        if cfg.o_proj_bias:
            s["o_proj.bias"] = (H,)
        return s
    hd, nkv = cfg.head_dim, cfg.num_key_value_heads
    widths = {"q_proj": nh * hd, "k_proj": nkv * hd, "v_proj": nkv * hd}
    for k, w in widths.items():
        s[k + ".weight"] = (H, w)
        if cfg.attention_bias:
            s[k + ".bias"] = (w,)
    s["o_proj.weight"] = (nh * hd, H)
    if cfg.o_proj_bias:
        s["o_proj.bias"] = (H,)
    if cfg.use_qk_norm:
        s["q_norm.weight"] = (hd,)
        s["k_norm.weight"] = (hd,)
    if cfg.attention_sinks:
        s["sinks"] = (nh,)
    return s


# ---- canonical name <-> HF tensors ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Recipe:
    """How one canonical tensor is stored in HF files: which keys, their shapes, and the two conversions."""

    keys: tuple[str, ...]
    shapes: tuple[Shape, ...]
    to_canon: Callable[[list[np.ndarray]], np.ndarray]
    from_canon: Callable[[np.ndarray], list[np.ndarray]]


def _one(key: str, shape: Shape, f: Callable[[np.ndarray], np.ndarray], g: Callable[[np.ndarray], np.ndarray]
         ) -> _Recipe:
    return _Recipe((key,), (shape,), lambda xs: f(xs[0]), lambda x: [g(x)])


def _ident(x: np.ndarray) -> np.ndarray:
    return x


def _swap_last(x: np.ndarray) -> np.ndarray:
    return np.swapaxes(x, -1, -2)


def _deinterleave(x: np.ndarray) -> np.ndarray:
    """gpt-oss: gate at even, up at odd columns -> gate 0:I, up I:2I."""
    return np.concatenate([x[..., 0::2], x[..., 1::2]], axis=-1)


def _interleave(x: np.ndarray) -> np.ndarray:
    half = x.shape[-1] // 2
    out = np.empty_like(x)
    out[..., 0::2], out[..., 1::2] = x[..., :half], x[..., half:]
    return out


_EXPERT_RE = re.compile(r"layers\.(\d+)\.mlp\.experts\.(gate_up_proj|down_proj)(_bias)?$")


def hf_keys_for(cfg: ModelConfig, name: str, shape: Shape, layout: Layout = "hub") -> _Recipe:
    """The HF on-disk recipe of canonical tensor `name` (of canonical `shape`) in `layout`.

    gpt-oss has one layout only (its experts are stored fused in both), so `layout` does not matter for it.
    """
    if name == "lm_head.weight":
        return _one(name, shape[::-1], _swap_last, _swap_last)
    hf = "model." + name
    if ".mlp.router." in name and cfg.family != "gpt_oss":
        hf = hf.replace(".mlp.router.", ".mlp.gate.")
    m = _EXPERT_RE.search(name)
    if m is None:
        if len(shape) == 2 and name.endswith(".weight") and name != "embed_tokens.weight":  # Linear weights
            return _one(hf, shape[::-1], _swap_last, _swap_last)
        return _one(hf, shape, _ident, _ident)
    which, is_bias = m.group(2), m.group(3) is not None
    if cfg.family == "gpt_oss" and layout == "mxfp4" and not is_bias:
        return _mxfp4_recipe(hf, shape, which)
    if cfg.family == "gpt_oss":
        if which == "gate_up_proj":
            return _one(hf, shape, _deinterleave, _interleave)
        return _one(hf, shape, _ident, _ident)
    if layout == "fused":
        return _one(hf, (shape[0], shape[2], shape[1]), _swap_last, _swap_last)
    if is_bias:
        raise CheckpointError(f"{cfg.family} has no expert biases, but got {name}")
    E, a, b = shape
    base = hf.rsplit(".", 1)[0]  # model.layers.l.mlp.experts
    if which == "down_proj":
        keys = tuple(f"{base}.{e}.down_proj.weight" for e in range(E))
        return _Recipe(keys, ((b, a),) * E, lambda xs: np.stack([x.T for x in xs]), lambda x: [w.T for w in x])
    I = b // 2
    keys = tuple(f"{base}.{e}.{p}_proj.weight" for e in range(E) for p in ("gate", "up"))
    return _Recipe(
        keys, ((I, a),) * (2 * E),
        lambda xs: np.stack([np.concatenate([xs[2 * e].T, xs[2 * e + 1].T], axis=1) for e in range(E)]),
        lambda x: [w for e in range(E) for w in (x[e, :, :I].T, x[e, :, I:].T)])


def _mxfp4_recipe(hf: str, shape: Shape, which: str) -> _Recipe:
    """gpt-oss hub MXFP4 experts: `{hf}_blocks [E, out, in/32, 16]` + `{hf}_scales [E, out, in/32]` (HF's [out, in]
    order) <-> canonical [E, in, out]; gate_up de-interleaved after decoding, like the BF16 layout. One tensor is
    decoded at a time (the mapping is lazy), so a checkpoint never sits in memory twice."""
    E, d_in, d_out = shape
    if d_in % _MX_BLOCK:
        raise CheckpointError(f"{hf}: MXFP4 needs the input width ({d_in}) to be a multiple of {_MX_BLOCK}")
    G = d_in // _MX_BLOCK
    fix, unfix = (_deinterleave, _interleave) if which == "gate_up_proj" else (_ident, _ident)

    def to_canon(xs: list[np.ndarray]) -> np.ndarray:
        return fix(np.swapaxes(dequantize_mxfp4(xs[0], xs[1]), 1, 2))

    def from_canon(x: np.ndarray) -> list[np.ndarray]:
        return list(quantize_mxfp4(np.swapaxes(unfix(x), 1, 2)))

    return _Recipe((hf + "_blocks", hf + "_scales"), ((E, d_out, G, _MX_BLOCK // 2), (E, d_out, G)),
                   to_canon, from_canon)


# ---- reading -------------------------------------------------------------------------------------------------------
class CheckpointTensors(Mapping[str, np.ndarray]):
    """Lazy `canonical name -> np.ndarray`: a tensor is read from disk and converted only when asked for.

    `.shapes` gives every canonical shape without reading data. `.layer(l)` reads one layer and returns it keyed by
    the name *within* the layer (`self_attn.q_proj.weight`, `mlp.experts.gate_up_proj`, ...), which are also the
    module paths under `layers[l]`. Values are float32 (BF16/F8 widened exactly), or float16/float64 as stored.
    """

    def __init__(self, cfg: ModelConfig, recipes: dict[str, _Recipe], files: dict[str, SafetensorsFile],
                 shapes: dict[str, Shape]):
        self.config = cfg
        self._recipes = recipes
        self._files = files  # HF key -> the file holding it
        self.shapes: dict[str, Shape] = shapes

    def __getitem__(self, name: str) -> np.ndarray:
        return self.read(name)

    def read(self, name: str, *, bf16: np.dtype | None = None) -> np.ndarray:
        """Canonical tensor `name` (as `self[name]`). With `bf16` (a numpy bfloat16 dtype, e.g. ml_dtypes') BF16
        tensors stay bfloat16, exactly, at half the bytes (`SafetensorsFile.read`); a tensor stored in its canonical
        layout is then a view of the mapped file, which `release(name)` drops from memory once it is copied."""
        recipe = self._recipes[name]
        try:
            parts = [self._files[k].read(k, bf16=bf16) for k in recipe.keys]
        except (SafetensorsError, OSError) as e:
            raise CheckpointError(f"reading {name} ({', '.join(recipe.keys[:2])}...): {e}") from e
        return np.ascontiguousarray(recipe.to_canon(parts))

    def release(self, name: str) -> None:
        """Drop the file pages canonical tensor `name` was read from out of this process's memory (see
        `SafetensorsFile.release`): what a loader calls once the tensor is copied where it is going."""
        for k in self._recipes[name].keys:
            self._files[k].release(k)

    def __iter__(self) -> Iterator[str]:
        return iter(self._recipes)

    def __len__(self) -> int:
        return len(self._recipes)

    def layer(self, l: int) -> dict[str, np.ndarray]:
        if not 0 <= l < self.config.num_hidden_layers:
            raise IndexError(f"layer {l} out of range for {self.config.num_hidden_layers} layers")
        p = f"layers.{l}."
        return {n[len(p):]: self[n] for n in self._recipes if n.startswith(p)}

    def hf_keys(self, name: str) -> tuple[str, ...]:
        """The HF on-disk tensor names that canonical `name` is built from."""
        return self._recipes[name].keys

    def source_dtype(self, name: str) -> str:
        """The safetensors dtype on disk (e.g. "BF16") of canonical `name`."""
        k = self._recipes[name].keys[0]
        return self._files[k].info(k).dtype

    def __repr__(self) -> str:
        return f"CheckpointTensors({self.config.family}, {len(self)} tensors)"


def _weight_files(root: Path) -> list[Path]:
    index = root / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise CheckpointError(f"{index}: not a valid safetensors index (needs a 'weight_map'): {e}") from e
        shards = sorted(set(weight_map.values()))
        missing = [s for s in shards if not (root / s).is_file()]
        if missing:
            raise CheckpointError(f"{index} names shard file(s) that do not exist: {missing}")
        return [root / s for s in shards]
    single = root / "model.safetensors"
    if single.is_file():
        return [single]
    found = sorted(root.glob("*.safetensors"))
    if not found:
        raise CheckpointError(f"{root}: no model.safetensors, model.safetensors.index.json or *.safetensors")
    return found


_IGNORED = re.compile(r"(rotary_emb\.inv_freq$)")
_LAYER_RE = re.compile(r"^model\.layers\.(\d+)\.")


def _check_quantisation(keys: list[str], hf: Mapping[str, Any], root: Path) -> None:
    mx = [k for k in keys if k.endswith(("_blocks", "_scales"))]
    # DeepSeek's block FP8 (`weight_scale_inv`) is dequantised at read; per-tensor FP8 scales are another format
    per_tensor = [k for k in keys if k.endswith(("weight_scale", "input_scale", "activation_scale"))]
    method = (hf.get("quantization_config") or {}).get("quant_method")
    if (mx or method == "mxfp4") and hf.get("model_type") != "gpt_oss":  # gpt-oss experts decode at load
        raise UnsupportedCheckpointError(
            f"{root}: MXFP4-quantised experts ({mx[0] if mx else 'quantization_config'}) are not supported yet; "
            "dequantise first (transformers Mxfp4Config(dequantize=True) then save_pretrained)")
    if per_tensor:
        raise UnsupportedCheckpointError(
            f"{root}: FP8 with per-tensor scales ({per_tensor[0]}) is not supported; only DeepSeek-style block FP8 "
            "(`weight_scale_inv`) is dequantised at load")


class _BlockFP8Tensor:
    """One block-FP8 Linear weight as a read source: `read` decodes the F8 weight and applies its scales."""

    def __init__(self, weight_file: SafetensorsFile, scale_file: SafetensorsFile, scale_key: str,
                 block: tuple[int, int]):
        self._weight_file, self._scale_file, self._scale_key, self._block = weight_file, scale_file, scale_key, block
        self.path = weight_file.path

    def info(self, key: str):
        return self._weight_file.info(key)

    def read(self, key: str, *, bf16: np.dtype | None = None) -> np.ndarray:
        """The dequantised float32 weight (`bf16` is accepted for `SafetensorsFile.read`'s signature; F8 data is
        never BF16)."""
        return dequantize_block_fp8(self._weight_file.read(key), self._scale_file.read(self._scale_key), self._block)

    def release(self, key: str) -> None:
        self._weight_file.release(key)
        self._scale_file.release(self._scale_key)


def _dequantising_sources(files: dict[str, SafetensorsFile], hf: Mapping[str, Any], root: Path) -> dict[str, Any]:
    """`files` with every `X.weight` that has an `X.weight_scale_inv` replaced by a dequantising source, and the
    scale tensors dropped; shapes checked from the headers. An FP8 tensor without scales is an error."""
    scales = [k for k in files if k.endswith(".weight" + FP8_SCALE_SUFFIX)]
    if not scales:
        f8 = [k for k, f in files.items() if f.info(k).dtype.startswith("F8")]
        if f8:
            raise CheckpointError(f"{root}: tensor {f8[0]} is FP8 but has no {f8[0]}{FP8_SCALE_SUFFIX}; only "
                                  "block-FP8 checkpoints with their scales can be read")
        return files
    try:
        block = fp8_block_size(hf)
    except ValueError as e:
        raise CheckpointError(f"{root / 'config.json'}: {e}") from e
    out: dict[str, Any] = dict(files)
    for sk in scales:
        wk = sk[: -len(FP8_SCALE_SUFFIX)]
        del out[sk]
        if wk not in files:
            raise CheckpointError(f"{files[sk].path}: scale tensor {sk} has no weight {wk} in the checkpoint")
        if not files[wk].info(wk).dtype.startswith("F8"):
            raise CheckpointError(f"{files[wk].path}: {wk} is {files[wk].info(wk).dtype}, but it has a {sk}; block "
                                  "scales belong to FP8 (F8_E4M3) weights")
        want = fp8_scale_shape(files[wk].info(wk).shape, block)
        got = files[sk].info(sk).shape
        if tuple(got) != tuple(want):
            raise CheckpointError(f"{files[sk].path}: {sk} has shape {list(got)}, but {wk} "
                                  f"{list(files[wk].info(wk).shape)} in {block[0]}x{block[1]} blocks needs "
                                  f"{list(want)}")
        out[wk] = _BlockFP8Tensor(files[wk], files[sk], sk, block)
    return out


def read_checkpoint(path: str | Path) -> tuple[ModelConfig, CheckpointTensors]:
    """Open a HF checkpoint folder (config.json + safetensors), validate it against its config, return it lazily.

    Raises CheckpointError naming the HF tensor, the file and the expectation for a missing tensor, a wrong shape,
    an unknown tensor, layers past config.json's num_hidden_layers that are not MTP layers (`check_unused_tensors`),
    a config that asks for math splitmoe does not compute (its cause a config.ModelConfigError naming the field),
    or a truncated/corrupt file; UnsupportedCheckpointError for MXFP4 and per-tensor FP8
    checkpoints. DeepSeek-style block FP8 (`weight_scale_inv`) is dequantised to float32 tensor by tensor as read.
    """
    root = Path(path)
    if not root.is_dir():
        raise CheckpointError(f"{root}: not a checkpoint folder (expected a directory with config.json)")
    try:
        cfg = ModelConfig.from_hf(root)
    except (FileNotFoundError, ValueError) as e:
        raise CheckpointError(f"{root / 'config.json'}: {e}") from e
    files: dict[str, SafetensorsFile] = {}
    for f in _weight_files(root):
        try:
            sf = SafetensorsFile(f)
        except SafetensorsError as e:
            raise CheckpointError(str(e)) from e
        for k in sf.keys():
            files[k] = sf
    _check_quantisation(list(files), cfg.hf_config, root)
    files = _dequantising_sources(files, cfg.hf_config, root)  # block FP8 -> float32, per tensor when read

    recipes: dict[str, _Recipe] = {}
    shapes = expected_shapes(cfg)
    for name, shape in shapes.items():
        m = _EXPERT_RE.search(name)
        fused = m is not None and f"model.layers.{m.group(1)}.mlp.experts.gate_up_proj" in files
        mxfp4 = m is not None and f"model.{name}_blocks" in files
        recipe = hf_keys_for(cfg, name, shape, "mxfp4" if mxfp4 else "fused" if fused else "hub")
        for key, want in zip(recipe.keys, recipe.shapes):
            if key not in files:
                raise CheckpointError(
                    f"{root}: tensor {key} (canonical {name}) with shape {list(want)} is missing from the "
                    f"checkpoint ({', '.join(sorted({f.path.name for f in files.values()})) or 'no files'})")
            info = files[key].info(key)
            if info.shape != want:
                raise CheckpointError(
                    f"{files[key].path}: tensor {key} has shape {list(info.shape)}, but the config implies "
                    f"{list(want)} (canonical {name} {list(shape)})")
            if info.dtype not in ("F32", "F16", "BF16", "F64", "F8_E4M3", "F8_E5M2") and not (
                    mxfp4 and info.dtype == "U8"):
                raise CheckpointError(f"{files[key].path}: tensor {key} has non-float dtype {info.dtype}")
        recipes[name] = recipe

    used = {k for r in recipes.values() for k in r.keys}
    check_unused_tensors(cfg, [k for k in files if k not in used], root,
                         file_of=lambda k: files[k].path.name)
    return cfg, CheckpointTensors(cfg, recipes, files, shapes)


_MTP_MARK = "eh_proj.weight"  # the projection every multi-token-prediction module has (DeepSeek-V3, GLM, HF MtpLayer)


def check_unused_tensors(cfg: ModelConfig, unused: list[str], root: str | Path,
                         file_of: Callable[[str], str] = lambda k: "?") -> None:
    """Raise CheckpointError unless every checkpoint tensor that `cfg`'s model does not load may be left out.

    Those are: RoPE buffers (`rotary_emb.inv_freq`), `lm_head.weight` of a tied model, and the multi-token-prediction
    layers of DeepSeek-V3 / GLM: layers `num_hidden_layers .. num_hidden_layers + num_nextn_predict_layers - 1` that
    hold an MTP module (`eh_proj.weight`), which no forward uses (HF ignores them too). Any other layer past the
    config's count means config.json's `num_hidden_layers` is smaller than the checkpoint's, which would drop layers
    silently; the error names a few tensors, counts them and says how to fix it. Both loaders see this through
    `read_checkpoint`.
    """
    L, mtp = cfg.num_hidden_layers, cfg.num_nextn_predict_layers
    by_layer: dict[int, list[str]] = {}
    unknown: list[str] = []
    for k in unused:
        if _IGNORED.search(k) or (k == "lm_head.weight" and cfg.tie_word_embeddings):
            continue
        m = _LAYER_RE.match(k)
        if m and int(m.group(1)) >= L:
            by_layer.setdefault(int(m.group(1)), []).append(k)
        else:
            unknown.append(k)
    has_mtp_module = {l for l, keys in by_layer.items() if f"model.layers.{l}.{_MTP_MARK}" in keys}
    mtp_layers = {l for l in has_mtp_module if l < L + mtp}
    extra = sorted(set(by_layer) - mtp_layers)
    if extra:
        names = [k for l in extra for k in sorted(by_layer[l])]
        layers = f"layer {extra[0]}" if len(extra) == 1 else f"layers {', '.join(map(str, extra))}"
        if cfg.family in MTP_FAMILIES:
            decoder_layers = max(by_layer) + 1 - len(has_mtp_module)  # MTP modules come after the decoder layers
            span = f"layer(s) {L}..{L + mtp - 1}, each with an {_MTP_MARK}" if mtp else "none"
            allowed = (f"a {cfg.family} checkpoint may add only its num_nextn_predict_layers={mtp} multi-token-"
                       f"prediction layer(s) after the decoder layers ({span}), and "
                       f"{'these are not' if len(extra) > 1 else 'this is not one'}")
            fix = (f"set num_hidden_layers to {decoder_layers} in config.json (the checkpoint's decoder layers), or "
                   f"raise num_nextn_predict_layers if the extra layers are all MTP modules")
        else:
            allowed = f"a {cfg.family} model has no multi-token-prediction layers that could be skipped"
            fix = f"set num_hidden_layers to {max(by_layer) + 1} in config.json (the checkpoint's layer count)"
        raise CheckpointError(
            f"{root}: config.json says num_hidden_layers={L}, but the checkpoint also holds {layers} "
            f"({len(names)} tensor(s), e.g. {names[:4]} in {file_of(names[0])}); {allowed}, so loading would drop "
            f"them silently. To load the whole model, {fix}; to load a truncated one on purpose, remove those "
            f"tensors from the checkpoint.")
    if unknown:
        raise CheckpointError(
            f"{root}: {len(unknown)} tensor(s) that a {cfg.family} model with this config does not have, e.g. "
            f"{unknown[:5]} in {file_of(unknown[0])}; is config.json the right one?")


# ---- writing -------------------------------------------------------------------------------------------------------
_ITEMSIZE = {"float32": 4, "bfloat16": 2, "float16": 2}


def write_checkpoint(path: str | Path, hf_config: Mapping[str, Any], tensors: Mapping[str, np.ndarray], *,
                     layout: Layout = "hub", dtype: str = "float32", max_shard_bytes: int | None = None) -> Path:
    """Write canonical `tensors` as a HF checkpoint: config.json + model.safetensors (or shards + index).

    The inverse of `read_checkpoint`. layout "hub" writes per-expert tensors (what HF's save_pretrained writes by
    default), "fused" the v5 in-memory layout; gpt-oss has one layout, or "mxfp4" (the hub's: experts quantised by
    `shared_math.mxfp4.quantize_mxfp4`, with the hub's `quantization_config`). Every floating tensor is written in
    `dtype` ("float32", "bfloat16" rounded to nearest even, or "float16"), and config.json's `dtype` says so.

    `tensors` is read once per name, in model order, and with `max_shard_bytes` each shard is written as soon as it
    is full: a lazy mapping (e.g. `shared_math.tiny.lazy_random_canonical_tensors`) then keeps about one shard and
    one tensor in memory, not the whole model. config.json comes last, so an interrupted write is no checkpoint.
    """
    if layout not in ("hub", "fused", "mxfp4"):
        raise ValueError(f"layout must be 'hub', 'fused' or 'mxfp4', got {layout!r}")
    if dtype not in _ITEMSIZE:
        raise ValueError(f"dtype must be one of {', '.join(_ITEMSIZE)}, got {dtype!r}")
    cfg = ModelConfig.from_hf(hf_config)
    if layout == "mxfp4" and cfg.family != "gpt_oss":
        raise ValueError(f"layout 'mxfp4' is gpt-oss's hub format; {cfg.family} has no MXFP4 checkpoints")
    shapes = expected_shapes(cfg)
    names = set(tensors)  # the keys only: `in` on a lazy mapping would read (or draw) the tensor
    missing = [n for n in shapes if n not in names]
    extra = [n for n in names if n not in shapes]
    if missing or extra:
        raise CheckpointError(f"tensors do not match the {cfg.family} config: missing {missing[:5]}, "
                              f"unexpected {extra[:5]}")
    root = Path(path)
    root.mkdir(parents=True, exist_ok=True)

    # shards are written under temporary names as they fill (their count is known only at the end), then renamed
    shard: dict[str, np.ndarray] = {}
    written: list[tuple[Path, list[str]]] = []
    size = total = 0

    def flush() -> None:
        nonlocal shard, size
        tmp = root / f".shard-{len(written):05d}.tmp"
        write_safetensors(tmp, shard, dtype=dtype)
        written.append((tmp, list(shard)))
        shard, size = {}, 0

    for name, shape in shapes.items():
        arr = np.asarray(tensors[name])
        if arr.shape != shape:
            raise CheckpointError(f"{name} has shape {list(arr.shape)}, the config implies {list(shape)}")
        recipe = hf_keys_for(cfg, name, shape, layout)
        for key, part in zip(recipe.keys, recipe.from_canon(arr)):
            nbytes = part.nbytes if part.dtype == np.uint8 else math.prod(part.shape) * _ITEMSIZE[dtype]
            if max_shard_bytes is not None and shard and size + nbytes > max_shard_bytes:
                flush()
            shard[key] = np.ascontiguousarray(part)
            size += nbytes
            total += nbytes
        del arr  # a lazily drawn tensor is freed here; its parts live on in `shard` until it is written

    config = dict(hf_config)
    config["dtype"] = dtype
    if layout == "mxfp4" and cfg.family == "gpt_oss":  # what the hub's gpt-oss config.json says
        config["quantization_config"] = {"quant_method": "mxfp4", "modules_to_not_convert": [
            "model.layers.*.self_attn", "model.layers.*.mlp.router", "model.embed_tokens", "lm_head"]}
    if max_shard_bytes is None:
        write_safetensors(root / "model.safetensors", shard, dtype=dtype)
    else:
        flush()
        weight_map: dict[str, str] = {}
        for i, (tmp, keys) in enumerate(written):
            fname = f"model-{i + 1:05d}-of-{len(written):05d}.safetensors"
            tmp.replace(root / fname)
            weight_map.update(dict.fromkeys(keys, fname))
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        (root / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    (root / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return root


# CONTRACTS.md names the tiny-checkpoint helpers here; tiny.py imports this module only inside its functions, so
# importing it at the bottom is not circular.
from shared_math.tiny import random_canonical_tensors, tiny_hf_config, write_tiny_checkpoint  # noqa: E402
