"""jax_impl's `gradient_checkpointing_enable()` (jax.checkpoint per decoder layer) changes what the backward saves, not
the numbers: for every family, loss and LoRA gradients equal those without it, and the traced gradient really
contains a rematerialised region (with `layers=N`, one for each of the first N layers only). Mirrors
tests/torch/test_checkpointing.py. The "small_dots" policy keeps exactly the narrow projections."""

from __future__ import annotations

import numpy as np
import pytest

jax = pytest.importorskip("jax")
pytest.importorskip("flax")

from jax_impl import load_model  # noqa: E402
from jax_impl.lora import load_lora_state_dict  # noqa: E402
from shared_math.config import LoraConfig, ModelConfig  # noqa: E402
from shared_math.numerics import assert_close  # noqa: E402
from shared_math.tiny import write_tiny_checkpoint  # noqa: E402
from tests.jax.jax_helpers import LoraRunner  # noqa: E402
from tests.shared.hf_helpers import random_lora_tensors  # noqa: E402
from tests.torch.test_checkpointing import TARGETS  # noqa: E402 - one target list for both frameworks


def _primitives(jaxpr) -> set[str]:
    out = set()
    for eqn in jaxpr.eqns:
        out.add(eqn.primitive.name)
        for p in eqn.params.values():
            for sub in p if isinstance(p, (list, tuple)) else (p,):
                inner = getattr(sub, "jaxpr", None)
                if inner is not None:
                    out |= _primitives(inner if hasattr(inner, "eqns") else inner.jaxpr)
    return out


def _plain_and_checkpointed(path, family: str, seed: int, enable: dict, keep_model: bool = False):
    """The same LoRA step of the checkpoint at `path` without and with `gradient_checkpointing_enable(**enable)`:
    (their `LoraRunner.run` results, the gradient's jaxprs); with `keep_model` the checkpointed model rides along
    in its result as "model"."""
    lora = LoraConfig(rank=4, alpha=8.0, targets=TARGETS[family])
    tensors = random_lora_tensors(ModelConfig.from_hf(path), lora, seed=seed % 991)
    ids = np.random.default_rng(seed).integers(0, 64, size=(2, 19))
    results, jaxprs = [], []
    for ckpt in (False, True):
        model = load_model(path, lora=lora, moe_backend="ragged_dot")
        load_lora_state_dict(model, tensors)
        if ckpt:
            model.gradient_checkpointing_enable(**enable)
        runner = LoraRunner(model)
        results.append(runner.run(ids, ids) | ({"model": model} if keep_model and ckpt else {}))
        jaxprs.append(jax.make_jaxpr(runner._fn)(runner.lora_state, runner.frozen_state, ids, ids, None).jaxpr)
    return results, jaxprs


@pytest.mark.parametrize("family", sorted(TARGETS))
def test_checkpointed_layers_give_the_same_loss_and_grads(family, tmp_path, seed):
    path = write_tiny_checkpoint(family, tmp_path / family, seed=seed % 1000)
    (plain, ck), jaxprs = _plain_and_checkpointed(path, family, seed, {})
    prims = [_primitives(j) for j in jaxprs]
    remat = {p for p in prims[1] if p.startswith(("remat", "checkpoint"))}  # jax 0.4+: "remat2"
    assert remat and not {p for p in prims[0] if p.startswith(("remat", "checkpoint"))}
    # the same ops on the same inputs, but XLA fuses the rematerialised program differently: fp32 sum-order
    # differences only (loss 1.8e-7, o_proj LoRA-A grad 3e-6 relative on qwen3_moe), so the fp32 table's
    # tolerances for those quantities apply rather than bitwise equality as in torch
    assert_close(ck["loss"], plain["loss"], dtype="float32", quantity="loss", name="loss")
    assert plain["grads"].keys() == ck["grads"].keys() and plain["grads"]
    for name, g in plain["grads"].items():
        assert_close(ck["grads"][name], g, dtype="float32", quantity="lora_grad", name=f"d {name}")


def _remat_regions(jaxpr) -> list[set[str]]:
    """The primitives inside each rematerialised region (a `jax.checkpoint` call) of `jaxpr`, nested ones included."""
    out = []
    for eqn in jaxpr.eqns:
        if eqn.primitive.name.startswith(("remat", "checkpoint")):
            out.append(_primitives(eqn.params["jaxpr"]))
        for p in eqn.params.values():
            for sub in p if isinstance(p, (list, tuple)) else (p,):
                inner = getattr(sub, "jaxpr", None)
                if inner is not None:
                    out += _remat_regions(inner if hasattr(inner, "eqns") else inner.jaxpr)
    return out


@pytest.mark.parametrize("layers", [0, 1, 3, None], ids=["none", "first", "all", "default"])
def test_checkpointing_the_first_layers_gives_the_same_loss_and_grads(layers, tmp_path, seed):
    """`gradient_checkpointing_enable(layers=N)` on a 3-layer Qwen3 whose first layer is dense: the gradient's jaxpr
    has exactly N rematerialised regions, the first one the dense layer's (no ragged_dot: the first layers are the
    checkpointed ones), and loss and LoRA gradients equal those without checkpointing (fp32 tolerance, as above)."""
    path = write_tiny_checkpoint("qwen3_moe", tmp_path / "q", seed=seed % 1000, num_hidden_layers=3,
                                 mlp_only_layers=[0])
    results, jaxprs = _plain_and_checkpointed(path, "qwen3_moe", seed, {"layers": layers}, keep_model=True)
    model = results[1].pop("model")
    regions = [_remat_regions(j) for j in jaxprs]
    n = 3 if layers is None else layers
    assert not regions[0] and len(regions[1]) == n
    moe = ["ragged_dot_general" in r for r in regions[1]]
    assert sorted(moe) == [False] * (n > 0) + [True] * (n - 1)  # layer 0 dense, layers 1 and 2 MoE
    plain, ck = results
    assert_close(ck["loss"], plain["loss"], dtype="float32", quantity="loss", name="loss")
    assert plain["grads"].keys() == ck["grads"].keys() and plain["grads"]
    for name, g in plain["grads"].items():
        assert_close(ck["grads"][name], g, dtype="float32", quantity="lora_grad", name=f"d {name}")
    model.gradient_checkpointing_disable()
    assert model.checkpoint_layers is None and not model.gradient_checkpointing


def test_small_dots_policy_keeps_only_narrow_projections():
    """The "small_dots" policy (`layers.save_small_dots`) keeps a matmul's output for the backward only when it is a
    projection (no batch dimensions) at most 256 wide per token, whichever operand is the weight: LoRA's x·A and
    router logits are kept; q_proj-wide outputs and the attention's batched einsums are recomputed. Unknown policy
    names are refused with the known ones."""
    jnp = jax.numpy
    from jax_impl.models.layers import REMAT_POLICIES, save_small_dots

    T, H = 1024, 2048

    def f(x, w_q, a, s_q, s_k):
        return (x @ w_q, jnp.einsum("ti,ir->tr", x, a), jnp.einsum("ir,ti->tr", a, x),
                jnp.einsum("bqnd,bknd->bnqk", s_q, s_k))

    args = (jnp.zeros((T, H)), jnp.zeros((H, 4096)), jnp.zeros((H, 64)), jnp.zeros((1, 8, 2, 16)),
            jnp.zeros((1, 8, 2, 16)))
    dots = [e for e in jax.make_jaxpr(f)(*args).jaxpr.eqns if e.primitive.name == "dot_general"]
    kept = [save_small_dots(e.primitive, *[v.aval for v in e.invars], **e.params) for e in dots]
    assert kept == [False, True, True, False]
    assert not save_small_dots(jax.lax.exp_p, args[0])
    assert REMAT_POLICIES["small_dots"] is save_small_dots
    from jax_impl.models.layers import LayerCheckpointing

    with pytest.raises(ValueError, match="small_dots"):
        LayerCheckpointing().gradient_checkpointing_enable(policy="save_everything")
