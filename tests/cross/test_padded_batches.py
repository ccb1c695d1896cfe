"""Padded batches: `attention_mask` ([B, S], HF's meaning: 1 = token, 0 = padding) in both frameworks, every family,
against HF transformers + PEFT built from the same tiny checkpoint and adapter (fp32).

Rows of different lengths (14, 9, 5 of S = 14; gpt-oss's sliding window is 8, so its sliding layers see padding
inside the window), padded on the right or on the left, with HF's default position_ids (0..S-1) or generation's
(cumsum of the mask - 1, 0 at pads). Compared: logits, loss, aux loss (Qwen3-MoE and gpt-oss with
`output_router_logits`; HF's masked `load_balancing_loss_func`) and every LoRA gradient.

- `test_padded_batch_matches_hf`: against HF's SDPA path (eager for gpt-oss, which has no SDPA path and gives the
  same numbers there): labels as a collator writes them (-100 at pads only, so left padding's first real token is
  predicted from a padding position), every position's logits (with default positions, where the masks are the
  same), loss, aux loss, LoRA gradients.
- `test_real_tokens_match_hf_eager`: against HF's eager path (the literal code the other parity tests use), which
  gives a left-padding query (no key left) the average of all values where SDPA gives 0: real tokens' logits and a
  loss that never reads a padding row, aux loss, LoRA gradients.
- a padded row's real logits equal that row run alone; an all-ones mask equals no mask; the mask and the masked aux
  loss on their own against HF's functions and the float64 reference; the CUDA-graph path (`static_batch`,
  `graph_model`) with a mask.
"""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest

_MISSING = [m for m in ("torch", "transformers", "peft") if importlib.util.find_spec(m) is None]
if _MISSING:
    pytest.skip(f"missing {', '.join(_MISSING)} (the HF reference)", allow_module_level=True)

import torch  # noqa: E402

from shared_math.config import DENSE_MLP_TARGETS, LoraConfig, ModelConfig, available_targets  # noqa: E402
from shared_math.numerics import assert_close  # noqa: E402
from tests.shared import hf_helpers as H  # noqa: E402

HAS_JAX = importlib.util.find_spec("jax") is not None and importlib.util.find_spec("flax") is not None
FAMILIES = ("qwen3_moe", "gpt_oss", "deepseek_v3", "glm4_moe", "glm4_moe_lite")
FRAMEWORKS = ("torch", pytest.param("jax", marks=pytest.mark.skipif(not HAS_JAX, reason="jax/flax not installed")))
AUX_FAMILIES = ("qwen3_moe", "gpt_oss")  # the families whose HF model has a load-balancing loss
B, S = 3, 14
LENGTHS = (14, 9, 5)
PAD_ID = 0
# the tiny checkpoints' seeds of the unpadded parity tests (tests/torch/test_qwen3_parity.py's module fixture,
# test_gpt_oss_parity.py, tests/shared/sigmoid_families.py), whose fp32 agreement with HF is known unpadded: MLA's
# LoRA gradients on some other seeds sit at 1/2 of the fp32 bound with or without padding (measured 2.4e-5 of max
# on glm4_moe_lite seed 35, no padding), so a padding defect would be hard to tell from noise there
CKPT_SEEDS = {"qwen3_moe": 3, "gpt_oss": 11, "deepseek_v3": 5, "glm4_moe": 6, "glm4_moe_lite": 7}


# ---- batches -------------------------------------------------------------------------------------------------------

def padded_batch(side: str, seed: int = 0, vocab: int = 128) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(input_ids, labels, attention_mask) [B, S]: rows of LENGTHS tokens, padded with PAD_ID on `side`; labels
    are the ids with -100 at pads (a collator's), so HF's loss reads every real token but the first of each row."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(1, vocab, (B, S))
    mask = np.zeros((B, S), np.int64)
    for b, n in enumerate(LENGTHS):
        mask[b, :n] = 1
        if side == "left":
            mask[b] = mask[b, ::-1]
    ids = np.where(mask == 1, ids, PAD_ID)
    return ids, np.where(mask == 1, ids, -100), mask


def generation_positions(mask: np.ndarray) -> np.ndarray:
    """HF generate's position_ids for a padded batch: cumsum(mask) - 1, 0 at the pads."""
    return np.where(mask == 1, np.cumsum(mask, axis=1) - 1, 0)


def no_label_from_padding(labels: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Labels with -100 wherever the token before is padding: a loss that never reads a padding row's logits
    (left padding's first real token), the only part of a padded batch whose value HF leaves to the attention
    implementation."""
    out = labels.copy()
    out[:, 1:][mask[:, :-1] == 0] = -100
    return out


# ---- models ----------------------------------------------------------------------------------------------------------

_CKPTS: dict = {}


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    """family -> (checkpoint path, LoraConfig on attention + experts (what PEFT can adapt), canonical LoRA tensors
    with B non-zero); written once per module."""
    from shared_math.tiny import write_tiny_checkpoint

    def get(family: str):
        if family not in _CKPTS:
            extra = dict(output_router_logits=True, router_aux_loss_coef=0.5) if family in AUX_FAMILIES else {}
            path = write_tiny_checkpoint(family, tmp_path_factory.mktemp(family), seed=CKPT_SEEDS[family], **extra)
            cfg = ModelConfig.from_hf(path)
            lora = LoraConfig(rank=4, alpha=8.0,
                              targets=tuple(t for t in available_targets(cfg) if t not in DENSE_MLP_TARGETS))
            _CKPTS[family] = (path, lora, H.random_lora_tensors(cfg, lora, seed=FAMILIES.index(family) + 41))
        return _CKPTS[family]

    return get


def _result(logits, loss, aux, grads) -> dict:
    return dict(logits=np.asarray(logits, np.float32), loss=None if loss is None else float(loss),
                aux_loss=None if aux is None else float(aux), grads=grads)


def run_hf(path, lora, tensors, ids, labels, mask, pos, attn: str) -> dict:
    """HF + PEFT forward and backward (attn_implementation `attn`), LoRA gradients in canonical names."""
    pm = H.build_peft_model(H.load_hf_model(path, attn_implementation=attn), lora, tensors)
    t = torch.as_tensor
    kw = {} if pos is None else {"position_ids": t(pos)}
    out = pm(input_ids=t(ids), labels=t(labels), attention_mask=t(mask), use_cache=False, **kw)
    out.loss.backward()
    for p in pm.parameters():
        if p.requires_grad:
            p.data = p.grad.detach().clone()
    return _result(out.logits.detach(), out.loss.detach(), None if out.aux_loss is None else out.aux_loss.detach(),
                   H.peft_to_canonical_lora(pm))


_HF: dict = {}


def hf_cached(ckpt_fn, family, side, positions, attn, labels_fn=None) -> dict:
    """One HF run per (family, padding, positions, attention path, labels): both frameworks compare against it."""
    key = (family, side, positions, attn, labels_fn)
    if key not in _HF:
        path, lora, tensors = ckpt_fn(family)
        ids, labels, mask = padded_batch(side)
        labels = labels if labels_fn is None else labels_fn(labels, mask)
        pos = generation_positions(mask) if positions == "generate" else None
        _HF[key] = run_hf(path, lora, tensors, ids, labels, mask, pos, attn)
    return _HF[key]


class TorchRunner:
    """torch_impl's model with the adapter; `run` does forward + backward, `logits` a forward."""

    def __init__(self, path, lora, tensors):
        from torch_impl import load_model
        from torch_impl.lora import load_lora_state_dict

        self.model = load_model(path, lora=lora, moe_backend="native")
        load_lora_state_dict(self.model, tensors)

    def run(self, ids, labels, mask, pos=None) -> dict:
        from torch_impl.lora import _lora_params

        t = lambda a: None if a is None else torch.as_tensor(a)  # noqa: E731
        for p in self.model.parameters():
            p.grad = None
        out = self.model(t(ids), labels=t(labels), position_ids=t(pos), attention_mask=t(mask))
        out.loss.backward()
        grads = {n: p.grad.numpy() for n, p in _lora_params(self.model).items()}
        return _result(out.logits.detach(), out.loss.detach(), None if out.aux_loss is None else out.aux_loss.detach(),
                       grads)

    def logits(self, ids, mask=None, pos=None) -> np.ndarray:
        t = lambda a: None if a is None else torch.as_tensor(a)  # noqa: E731
        with torch.no_grad():
            return self.model(t(ids), position_ids=t(pos), attention_mask=t(mask)).logits.numpy()


class JaxRunner:
    """jax_impl's model with the adapter; `run` is one jitted value-and-grad over the LoRA state (traced once per
    argument structure: with or without position_ids / attention_mask), `logits` an eager forward (any shape)."""

    def __init__(self, path, lora, tensors):
        import jax
        from flax import nnx

        from jax_impl import load_model
        from jax_impl.lora import load_lora_state_dict

        self.model = load_model(path, lora=lora)
        load_lora_state_dict(self.model, tensors)
        graphdef, lora_state, frozen = nnx.split(self.model, nnx.LoRAParam, ...)
        self._split = (graphdef, lora_state, frozen)

        def loss_fn(lora_state, frozen, ids, labels, pos, mask):
            out = nnx.merge(graphdef, lora_state, frozen)(ids, labels=labels, position_ids=pos, attention_mask=mask)
            return out.loss, out

        self._fn = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))

    def run(self, ids, labels, mask, pos=None) -> dict:
        import jax.numpy as jnp
        from flax import nnx

        from jax_impl.lora import lora_state_dict

        graphdef, lora_state, frozen = self._split
        j = lambda a: None if a is None else jnp.asarray(a, jnp.int32)  # noqa: E731
        (loss, out), grads = self._fn(lora_state, frozen, j(ids), j(labels), j(pos), j(mask))
        return _result(out.logits, loss, out.aux_loss, lora_state_dict(nnx.merge(graphdef, grads, frozen)))

    def logits(self, ids, mask=None, pos=None) -> np.ndarray:
        import jax.numpy as jnp

        j = lambda a: None if a is None else jnp.asarray(a, jnp.int32)  # noqa: E731
        return np.asarray(self.model(j(ids), position_ids=j(pos), attention_mask=j(mask)).logits, np.float32)


_RUNNERS: dict = {}


def runner(framework: str, ckpt_fn, family: str):
    """One runner per (framework, family) for the module: jax_impl's jitted step compiles once per family."""
    key = (framework, family)
    if key not in _RUNNERS:
        _RUNNERS[key] = (TorchRunner if framework == "torch" else JaxRunner)(*ckpt_fn(family))
    return _RUNNERS[key]


# ---- checks -------------------------------------------------------------------------------------------------------

def compare(got: dict, want: dict, family: str, rows: np.ndarray | None = None) -> None:
    """Logits (at `rows` [B, S] bool, or everywhere), loss, aux loss (present exactly where HF has one) and every
    LoRA gradient (non-zero), fp32 tolerances."""
    sel = (lambda a: a) if rows is None else (lambda a: a[rows])
    assert np.isfinite(got["logits"]).all(), "non-finite logits (padding positions included)"
    assert_close(sel(got["logits"]), sel(want["logits"]), dtype="float32", quantity="logits", name="logits")
    assert_close(got["loss"], want["loss"], dtype="float32", quantity="loss", name="loss")
    if family in AUX_FAMILIES:
        assert want["aux_loss"] is not None and got["aux_loss"] is not None
        assert_close(got["aux_loss"], want["aux_loss"], dtype="float32", quantity="loss", name="aux_loss")
    else:
        assert got["aux_loss"] is None
    assert set(got["grads"]) == set(want["grads"])
    for name in sorted(want["grads"]):
        assert np.abs(got["grads"][name]).max() > 0, f"zero gradient for {name}"
        assert_close(got["grads"][name], want["grads"][name], dtype="float32", quantity="lora_grad", name=name)


@pytest.mark.parametrize("positions", ["default", "generate"])
@pytest.mark.parametrize("side", ["right", "left"])
@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("framework", FRAMEWORKS)
def test_padded_batch_matches_hf(ckpt, framework, family, side, positions):
    """Against HF's SDPA path (gpt-oss: eager), labels as a collator writes them. With default positions our mask is
    HF's, so every position's logits agree (a left-padding query gets 0 from attention in both). With generation's
    positions each pad starts a new document for our packing detection, so a right pad attends nothing here where
    HF lets it read the real tokens before it: real tokens only then (a pad's logits feed no label)."""
    want = hf_cached(ckpt, family, side, positions, "eager" if family == "gpt_oss" else "sdpa")
    ids, labels, mask = padded_batch(side)
    pos = generation_positions(mask) if positions == "generate" else None
    got = runner(framework, ckpt, family).run(ids, labels, mask, pos)
    compare(got, want, family, rows=None if positions == "default" else mask == 1)


@pytest.mark.parametrize("side", ["right", "left"])
@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("framework", FRAMEWORKS)
def test_real_tokens_match_hf_eager(ckpt, framework, family, side):
    """Against HF's eager path, which differs from its SDPA path on left-padding queries (uniform weights over all
    keys, from adding dtype-min to every logit, where SDPA gives 0): real tokens' logits, and a loss whose labels
    are never predicted from a padding position."""
    want = hf_cached(ckpt, family, side, "default", "eager", no_label_from_padding)
    ids, labels, mask = padded_batch(side)
    got = runner(framework, ckpt, family).run(ids, no_label_from_padding(labels, mask), mask)
    compare(got, want, family, rows=mask == 1)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("framework", FRAMEWORKS)
def test_padded_rows_equal_rows_alone(ckpt, framework, family):
    """Every real token's logits in a padded batch (right and left, default positions: a left-padded row starts at
    position n_pad, which RoPE's relative form makes the same as 0 up to rounding) equal that row run alone."""
    r = runner(framework, ckpt, family)
    for side in ("right", "left"):
        ids, _, mask = padded_batch(side)
        padded = r.logits(ids, mask)
        for b in range(B):
            real = mask[b] == 1
            alone = r.logits(ids[b:b + 1, real])[0]
            assert_close(padded[b, real], alone, dtype="float32", quantity="logits", name=f"{side} row {b}")


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("framework", FRAMEWORKS)
def test_all_ones_mask_is_no_mask(ckpt, framework, family):
    """A mask of ones changes nothing: torch_impl drops it (the same kernels, bit for bit), jax_impl runs the masked
    path (the same numbers to rounding), for logits, loss, aux loss and gradients."""
    r = runner(framework, ckpt, family)
    ids = np.random.default_rng(1).integers(0, 128, (B, S))
    labels = ids.copy()
    labels[:, :2] = -100
    ones = np.ones_like(ids)
    with_mask = r.run(ids, labels, ones)
    if framework == "torch":
        t = torch.as_tensor
        with torch.no_grad():
            plain = r.model(t(ids), labels=t(labels))
            masked = r.model(t(ids), labels=t(labels), attention_mask=t(ones))
        assert torch.equal(plain.logits, masked.logits) and torch.equal(plain.loss, masked.loss)
        assert (plain.aux_loss is None) == (family not in AUX_FAMILIES)
        if plain.aux_loss is not None:
            assert torch.equal(plain.aux_loss, masked.aux_loss)
    without = r.run(ids, labels, None)
    compare(with_mask, without, family)


# ---- the pieces: mask, aux loss, argument checks ------------------------------------------------------------------

def _hf_mask(mask: np.ndarray, window: int | None = None) -> np.ndarray:
    """HF's own 4-D bool mask (`sdpa_mask`) for a 2-D padding mask, causal or sliding: [B, S, S]."""
    from transformers.masking_utils import causal_mask_function, sdpa_mask, sliding_window_causal_mask_function

    fn = causal_mask_function if window is None else sliding_window_causal_mask_function(window)
    m = sdpa_mask(batch_size=mask.shape[0], q_length=mask.shape[1], kv_length=mask.shape[1], mask_function=fn,
                  attention_mask=torch.as_tensor(mask).bool(), allow_is_causal_skip=False)
    return m[:, 0].numpy()


@pytest.mark.parametrize("window", [None, 4])
def test_causal_mask_is_hfs_and_the_same_in_both_frameworks(window):
    from torch_impl.models.layers import causal_mask

    for side in ("right", "left"):
        _, _, mask = padded_batch(side)
        pos = torch.arange(S).expand(B, S)
        ours = causal_mask(pos, torch.as_tensor(mask).bool(), window)[:, 0].numpy()
        np.testing.assert_array_equal(ours, _hf_mask(mask, window))
        if HAS_JAX:
            import jax.numpy as jnp

            from jax_impl.models.layers import causal_mask as jax_causal_mask

            np.testing.assert_array_equal(np.asarray(jax_causal_mask(jnp.asarray(pos.numpy()), jnp.asarray(mask),
                                                                     window)), ours)
    # packed documents and padding combine: [doc 0..3 | doc 0..4 | 3 pads]; documents stay apart, pads are keys to none
    pos = torch.tensor([[0, 1, 2, 3, 0, 1, 2, 3, 4, 0, 0, 0]])
    pad = torch.tensor([[1] * 9 + [0] * 3]).bool()
    m = causal_mask(pos, pad)[0, 0]
    assert m[5, :4].sum() == 0 and m[5, 4:6].all() and m[:, 9:].sum() == 0 and m[10].sum() == 0


def test_masked_aux_loss_is_hfs(seed):
    """`load_balancing_loss` with a mask, both frameworks, against HF's `load_balancing_loss_func` and the float64
    reference; the mask matters (the unmasked loss differs)."""
    from transformers.models.qwen3_moe.modeling_qwen3_moe import load_balancing_loss_func

    from shared_math.reference import load_balancing_loss as reference_loss
    from torch_impl.models.layers import load_balancing_loss

    rng = np.random.default_rng(seed)
    E, K = 7, 2
    _, _, mask = padded_batch("left")
    logits = [rng.standard_normal((B * S, E)).astype(np.float32) * 2 for _ in range(3)]
    hf = float(load_balancing_loss_func(tuple(torch.as_tensor(lg) for lg in logits), E, K, torch.as_tensor(mask)))
    ours = float(load_balancing_loss([torch.as_tensor(lg) for lg in logits], E, K, torch.as_tensor(mask)))
    assert_close(ours, hf, dtype="float32", quantity="loss", name="torch aux")
    assert_close(ours, reference_loss(logits, K, E, mask), dtype="float32", quantity="loss", name="vs reference")
    assert ours != pytest.approx(float(load_balancing_loss([torch.as_tensor(lg) for lg in logits], E, K)), rel=1e-3)
    if HAS_JAX:
        import jax.numpy as jnp

        from jax_impl.models.layers import load_balancing_loss as jax_loss

        got = float(jax_loss([jnp.asarray(lg) for lg in logits], E, K, jnp.asarray(mask)))
        assert_close(got, hf, dtype="float32", quantity="loss", name="jax aux")


@pytest.mark.parametrize("framework", FRAMEWORKS)
def test_bad_mask_shapes_are_refused(ckpt, framework):
    r = runner(framework, ckpt, "qwen3_moe")
    ids, _, mask = padded_batch("right")
    for bad in (mask[:, :-1], mask[None, None]):
        with pytest.raises(ValueError, match="attention_mask must be \\[batch, seq\\]"):
            r.logits(ids, bad)


# ---- the CUDA-graph path ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("family", ["qwen3_moe", "gpt_oss"])
def test_static_batch_forward_with_a_mask(ckpt, family):
    """Inside `static_batch` (what a CUDA-graph capture runs) a mask is kept whatever its values: a padded batch
    gives the eager numbers, and an all-ones mask takes the explicit-mask path, which equals the causal one."""
    from torch_impl.models.layers import static_batch

    model = runner("torch", ckpt, family).model
    t = torch.as_tensor
    ids, labels, mask = padded_batch("left")
    with torch.no_grad():
        eager = model(t(ids), labels=t(labels), attention_mask=t(mask))
        with static_batch(packed=False):
            static = model(t(ids), labels=t(labels), attention_mask=t(mask))
            ones = model(t(ids), attention_mask=torch.ones_like(t(mask))).logits
        plain = model(t(ids)).logits
    assert torch.equal(static.logits, eager.logits) and torch.equal(static.loss, eager.loss)
    assert_close(ones, plain, dtype="float32", quantity="logits", name="all-ones mask, static")


@pytest.mark.gpu
def test_graphed_step_with_a_mask_matches_eager_cuda(tmp_path):
    """A step captured with an attention mask replays other paddings: loss and LoRA gradients against eager steps
    (fp32, triton backend, activation checkpointing on)."""
    from shared_math.tiny import write_tiny_checkpoint
    from torch_impl import load_model
    from torch_impl.cuda_graph import graph_model
    from torch_impl.lora import _lora_params, load_lora_state_dict

    path = write_tiny_checkpoint("qwen3_moe", tmp_path / "q", seed=3, output_router_logits=True)
    cfg = ModelConfig.from_hf(path)
    lora = LoraConfig(rank=4, alpha=8.0, targets=available_targets(cfg))
    model = load_model(path, lora=lora, device="cuda", moe_backend="triton")
    load_lora_state_dict(model, H.random_lora_tensors(cfg, lora, seed=5))
    model.gradient_checkpointing_enable()
    model.train()
    c = lambda a: torch.as_tensor(a, device="cuda")  # noqa: E731
    batches = [tuple(map(c, padded_batch(side, seed))) for side, seed in (("right", 0), ("left", 1), ("right", 2))]
    step = graph_model(model, batches[0][0], batches[0][1], attention_mask=batches[0][2])
    for i, (ids, labels, mask) in enumerate(batches):
        loss = step(ids, labels, attention_mask=mask).clone()
        got = {n: p.grad.detach().clone() for n, p in _lora_params(model).items()}
        for p in _lora_params(model).values():
            p.grad = None
        out = model(ids, labels=labels, attention_mask=mask)
        out.loss.backward()
        assert_close(loss, out.loss, dtype="float32", quantity="loss", name=f"batch {i} loss")
        for n, p in _lora_params(model).items():
            assert_close(got[n], p.grad, dtype="float32", quantity="lora_grad", name=f"batch {i} d {n}")
    with pytest.raises(ValueError, match="attention_mask in every step"):
        step(*batches[0][:2])
