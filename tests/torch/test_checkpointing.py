"""Activation checkpointing (`gradient_checkpointing_enable()`) changes memory, not numbers: for every family, the
loss and every LoRA gradient equal those of the plain forward, and the layer forward really runs twice; the same with
the kept layer inputs offloaded to host memory (`offload_to_cpu=True`) and with the "attention" policy (the SDPA
kernels' outputs kept, the recompute skipping them), an aux loss (router logits carry gradient back through the
recomputed layer) and a dense layer (whose router logits are None) included. With `layers=N` only the first N layers
run twice, with the same numbers."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from shared_math.config import LoraConfig  # noqa: E402
from shared_math.tiny import write_tiny_checkpoint  # noqa: E402
from torch_impl import load_model  # noqa: E402
from torch_impl.lora import _lora_params  # noqa: E402

TARGETS = {
    "qwen3_moe": ("q_proj", "o_proj", "experts.gate_up_proj", "experts.down_proj"),
    "gpt_oss": ("q_proj", "v_proj", "experts.gate_up_proj", "experts.down_proj"),
    "deepseek_v3": ("q_b_proj", "o_proj", "experts.gate_up_proj", "experts.down_proj"),
    "glm4_moe_lite": ("kv_b_proj", "experts.gate_up_proj", "experts.down_proj"),
}


def _loss_and_grads(model, ids):
    for p in model.parameters():
        p.grad = None
    loss = model(ids, labels=ids).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in _lora_params(model).items()}


def _trainable_model(family, tmp_path, seed, checkpoint_kw=None, **load_kw):
    """A tiny `family` checkpoint with rank-4 LoRA on `TARGETS`, B drawn non-zero (it is zero at init: every LoRA
    gradient non-trivial), in training mode."""
    path = write_tiny_checkpoint(family, tmp_path / family, seed=seed % 1000, **(checkpoint_kw or {}))
    model = load_model(path, lora=LoraConfig(rank=4, alpha=8.0, targets=TARGETS[family]), lora_seed=seed % 1000,
                       **load_kw)
    with torch.no_grad():
        for name, p in _lora_params(model).items():
            if "lora_B" in name:
                p.normal_(0.0, 0.05)
    model.train()
    return model


def _count_hand_backs(monkeypatch) -> list[bool]:
    """Patches the "attention" policy's recompute mode to log, per op it sees, whether it was an attention kernel
    call (handed back from the forward's outputs, not run): sum() of the returned list counts them."""
    from torch_impl.models import layers

    handed_back = []
    reuse = layers._ReuseAttention.__torch_dispatch__

    def counting(self, func, types, args=(), kwargs=None):
        handed_back.append(func in layers._attention_ops())
        return reuse(self, func, types, args, kwargs)

    monkeypatch.setattr(layers._ReuseAttention, "__torch_dispatch__", counting)
    return handed_back


OVERRIDES = {"qwen3_moe": dict(output_router_logits=True, router_aux_loss_coef=0.5, mlp_only_layers=[0]),
             "gpt_oss": dict(output_router_logits=True)}


MODES = {"on_device": {}, "offloaded": {"offload_to_cpu": True}, "keep_attention": {"policy": "attention"}}


@pytest.mark.parametrize("mode", sorted(MODES))
@pytest.mark.parametrize("family", sorted(TARGETS))
def test_checkpointed_layers_give_the_same_loss_and_grads(family, mode, tmp_path, seed):
    model = _trainable_model(family, tmp_path, seed, OVERRIDES.get(family), moe_backend="grouped_mm")
    ids = torch.randint(0, model.config.vocab_size, (2, 19), generator=torch.Generator().manual_seed(seed))
    loss, grads = _loss_and_grads(model, ids)

    calls = []  # a pre-hook: the recompute stops early, once it has what the backward needs, before forward hooks
    hook = model.layers[0].register_forward_pre_hook(lambda *_: calls.append(1))
    model.gradient_checkpointing_enable(**MODES[mode])
    attention_calls = _AttentionKernelCalls()
    with attention_calls:
        loss_ck, grads_ck = _loss_and_grads(model, ids)
    hook.remove()
    # the attention kernels run in the forward, and again in the recompute unless the policy keeps their outputs
    runs, base = (1 if mode == "keep_attention" else 2), _attention_kernels(model, ids)
    assert attention_calls.n == runs * base
    # on CPU, MLA's q and v head dims differ (deepseek_v3, glm4_moe_lite): SDPA takes its math path, decomposed into
    # matmuls above the dispatcher, so those families have no kernel to keep here (on CUDA the memory-efficient one)
    assert base or family in ("deepseek_v3", "glm4_moe_lite")
    assert len(calls) == 2, "the checkpointed layer should run its forward again in the backward"
    assert torch.equal(loss, loss_ck)
    assert grads.keys() == grads_ck.keys() and grads
    for name in grads:
        torch.testing.assert_close(grads_ck[name], grads[name], rtol=0, atol=0, msg=f"{name} differs")

    model.eval()  # like HF: no checkpointing outside training
    calls.clear()
    hook = model.layers[0].register_forward_pre_hook(lambda *_: calls.append(1))
    model(ids, labels=ids).loss.backward()
    assert len(calls) == 1


class _AttentionKernelCalls(torch.utils._python_dispatch.TorchDispatchMode):
    """Counts the SDPA kernel calls that reach the dispatcher (a kept output handed to the recompute never does)."""

    def __init__(self):
        super().__init__()
        self.n = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        from torch_impl.models.layers import _attention_ops

        self.n += func in _attention_ops()
        return func(*args, **(kwargs or {}))


def _attention_kernels(model, ids) -> int:
    """SDPA kernel calls of one forward without checkpointing."""
    calls = _AttentionKernelCalls()
    with calls, torch.no_grad():
        model(ids)
    return calls.n


@pytest.mark.parametrize("mode", sorted(MODES))
@pytest.mark.parametrize("layers", [0, 1, 3, None], ids=["none", "first", "all", "default"])
def test_checkpointing_the_first_layers_gives_the_same_loss_and_grads(layers, mode, tmp_path, seed):
    """`gradient_checkpointing_enable(layers=N)` on a 3-layer model (a dense first layer, an aux loss): only the first
    N layers run their forward again in the backward (on device, offloaded, keeping attention), the others once, and
    the loss and every LoRA gradient equal the plain forward's bit for bit."""
    model = _trainable_model("qwen3_moe", tmp_path, seed, {**OVERRIDES["qwen3_moe"], "num_hidden_layers": 3},
                             moe_backend="grouped_mm")
    ids = torch.randint(0, model.config.vocab_size, (2, 19), generator=torch.Generator().manual_seed(seed))
    loss, grads = _loss_and_grads(model, ids)

    calls = [0] * len(model.layers)  # forward pre-hooks, as above: one per run of a layer's forward
    hooks = [layer.register_forward_pre_hook(lambda *_, i=i: calls.__setitem__(i, calls[i] + 1))
             for i, layer in enumerate(model.layers)]
    model.gradient_checkpointing_enable(**MODES[mode], layers=layers)
    loss_ck, grads_ck = _loss_and_grads(model, ids)
    for h in hooks:
        h.remove()
    n = len(model.layers) if layers is None else layers
    assert calls == [2] * n + [1] * (len(model.layers) - n)
    assert torch.equal(loss, loss_ck)
    assert grads.keys() == grads_ck.keys() and grads
    for name in grads:
        torch.testing.assert_close(grads_ck[name], grads[name], rtol=0, atol=0, msg=f"{name} differs")
    model.gradient_checkpointing_disable()
    assert model.checkpoint_layers is None and not model.gradient_checkpointing


def test_checkpoint_policy_errors_say_what_to_use(tmp_path, seed):
    path = write_tiny_checkpoint("qwen3_moe", tmp_path / "q", seed=seed % 1000)
    model = load_model(path, lora=LoraConfig(rank=4, alpha=8.0, targets=TARGETS["qwen3_moe"]))
    with pytest.raises(ValueError, match="choose one of nothing, attention"):
        model.gradient_checkpointing_enable(policy="everything")
    with pytest.raises(ValueError, match="use one or the other"):
        model.gradient_checkpointing_enable(offload_to_cpu=True, policy="attention")
    assert not model.gradient_checkpointing  # a refused call changes nothing


@pytest.mark.parametrize("family", ["qwen3_moe", "gpt_oss"])
def test_keep_attention_in_compiled_layers(family, tmp_path, seed, monkeypatch):
    """Compiled decoder layers (`compile_decoder_layers`, as `--compile` and `Trainer(compile=True)` run them) under
    the "attention" policy: SDPA's attention (Qwen3; gpt-oss's padded sink path, which the CPU's sliding layers take
    here) runs eagerly between each layer's two graphs, its forward keeps the SDPA kernels' outputs and the compiled
    recompute takes them back (every kernel call of the forward) instead of running the kernels. The loss equals the
    eager plain policy's bit for bit and every LoRA gradient to fp32 rounding: the compiled plain policy's are
    bitwise equal too, but the graph break moves where the backward sums the residual stream's two gradients (a few
    ulps: 8e-9 on these O(1e-2) gradients)."""
    from torch_impl.compile import compile_decoder_layers

    model = _trainable_model(family, tmp_path, seed, dict(num_hidden_layers=2), moe_backend="grouped_mm")
    ids = torch.randint(0, model.config.vocab_size, (2, 19), generator=torch.Generator().manual_seed(seed))
    model.gradient_checkpointing_enable()
    loss, grads = _loss_and_grads(model, ids)

    handed_back = _count_hand_backs(monkeypatch)
    torch._dynamo.reset()
    compile_decoder_layers(model, backend="aot_eager")
    model.gradient_checkpointing_enable(policy="attention")
    for step in range(2):  # the second step runs the cached graphs
        handed_back.clear()
        loss_ck, grads_ck = _loss_and_grads(model, ids)
        assert sum(handed_back) == _attention_kernels(model, ids) > 0  # every kernel call of one forward
        assert torch.equal(loss, loss_ck), f"step {step}"
        assert grads.keys() == grads_ck.keys() and grads
        for name in grads:
            torch.testing.assert_close(grads_ck[name], grads[name], msg=f"{name} differs")  # fp32 defaults
    torch._dynamo.reset()


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_sink_attention_kept_inside_one_compiled_graph(backend, tmp_path, seed, monkeypatch):
    """gpt-oss on the log-sum-exp sink path everywhere (a window longer than the rows: the CPU's sliding layers
    take it too) under the "attention" policy, compiled: the sink's kernels are a custom op that keeps and hands back
    their outputs when it runs (`lse_attention._kernel_forward`), so no layer breaks its graph (each was two graphs
    with the sink's rescale eager between them), the recompute runs none of the forward's kernel calls, and the
    loss and gradients are the eager plain policy's (gradients to fp32 rounding, as above; the loss bitwise through
    aot_eager, to fp32 rounding through inductor, whose fused kernels round in their own order).

    Inductor is here because it reuses the memory of a custom op's outputs once its graph has read them: the kept
    outputs were overwritten and the gradients wrong (an H100 in bf16 found it, 2026-12-06; this test on the CPU
    fails the same way without the copies that `_kernel_op` now hands its graph)."""
    from torch._dynamo.utils import counters

    from torch_impl.compile import compile_decoder_layers

    model = _trainable_model("gpt_oss", tmp_path, seed, dict(num_hidden_layers=2, sliding_window=64),
                             moe_backend="grouped_mm")
    ids = torch.randint(0, model.config.vocab_size, (2, 19), generator=torch.Generator().manual_seed(seed))
    model.gradient_checkpointing_enable()
    loss, grads = _loss_and_grads(model, ids)

    handed_back = _count_hand_backs(monkeypatch)
    torch._dynamo.reset()
    counters.clear()
    compile_decoder_layers(model, backend=backend)
    model.gradient_checkpointing_enable(policy="attention")
    loss_ck, grads_ck = _loss_and_grads(model, ids)
    assert not counters["graph_break"], dict(counters["graph_break"])
    assert sum(handed_back) == _attention_kernels(model, ids) == 2  # one kernel call per layer, each handed back
    if backend == "aot_eager":
        assert torch.equal(loss, loss_ck)
    else:
        torch.testing.assert_close(loss_ck, loss)  # fp32 defaults
    assert grads.keys() == grads_ck.keys() and grads
    for name in grads:
        torch.testing.assert_close(grads_ck[name], grads[name], msg=f"{name} differs")  # fp32 defaults
    torch._dynamo.reset()


@pytest.mark.parametrize("offload", [False, True], ids=["on_device", "offloaded"])
def test_the_recompute_asks_the_experts_for_their_residuals_only(offload, tmp_path, seed, monkeypatch):
    """In a checkpointed layer's recompute the expert output only feeds the residual add, so `Experts` passes
    `output_unread` (the backend then skips the down GEMM; the gradients above stay bitwise equal): every MoE layer's
    first forward computes y, its recompute does not."""
    from torch_impl.backends import grouped_mm

    flags = []
    real = grouped_mm._GroupedSplitLoRA.forward

    def spy(ctx, *args):
        flags.append(args[-1])  # output_unread, the Function's last argument
        return real(ctx, *args)

    monkeypatch.setattr(grouped_mm._GroupedSplitLoRA, "forward", staticmethod(spy))
    path = write_tiny_checkpoint("qwen3_moe", tmp_path / "qwen3_moe", seed=seed % 1000)
    model = load_model(path, lora=LoraConfig(rank=4, alpha=8.0, targets=TARGETS["qwen3_moe"]),
                       moe_backend="grouped_mm", lora_seed=seed % 1000)
    model.train()
    model.gradient_checkpointing_enable(offload_to_cpu=offload)
    ids = torch.randint(0, model.config.vocab_size, (1, 11), generator=torch.Generator().manual_seed(seed))
    model(ids, labels=ids).loss.backward()
    n = sum(bool(m) for m in model.config.moe_layers)
    assert n and flags == [False] * n + [True] * n
    flags.clear()
    model.gradient_checkpointing_disable()
    model(ids, labels=ids).loss.backward()
    assert flags == [False] * n


def test_a_caller_that_reads_the_unread_output_gets_nan_gradients(tmp_path, seed, monkeypatch):
    """The promise behind output_unread, broken on purpose: with expert parallelism's experts treated as unread in
    the recompute (they are not: their output is weighted after the all-to-all), the recomputed output is NaN and so
    are the gradients, instead of quietly wrong ones. Single process: the module's weighting path without the
    all-to-all is `combine_rows` on the experts' output, as in `ExpertParallelExperts`."""
    from torch_impl.backends.native import combine_rows
    from torch_impl.moe import Experts, sort_by_expert

    path = write_tiny_checkpoint("qwen3_moe", tmp_path / "qwen3_moe", seed=seed % 1000)
    model = load_model(path, lora=LoraConfig(rank=4, alpha=8.0, targets=TARGETS["qwen3_moe"]),
                       moe_backend="grouped_mm", lora_seed=seed % 1000)
    real_forward = Experts.forward

    def weighted_after(self, x_TH, ids_TK, weights_TK, sort=None):  # the output saved by a product, as EP does
        srt = sort_by_expert(ids_TK, self.num_experts)
        y = real_forward(self, x_TH, ids_TK, torch.ones_like(weights_TK), sort=srt)
        T, K = ids_TK.shape
        o_MH = y.unsqueeze(1).expand(T, K, -1).reshape(T * K, -1)[srt.order_M]  # any op that saves y
        return combine_rows(o_MH, weights_TK, srt) / K

    monkeypatch.setattr(Experts, "forward", weighted_after)
    model.train()
    ids = torch.randint(0, model.config.vocab_size, (1, 9), generator=torch.Generator().manual_seed(seed))
    loss, grads = _loss_and_grads(model, ids)
    assert all(torch.isfinite(g).all() for g in grads.values())
    model.gradient_checkpointing_enable()
    _, grads_ck = _loss_and_grads(model, ids)
    assert any(torch.isnan(g).any() for g in grads_ck.values()), "a read of the unread output went unnoticed"
    monkeypatch.setattr(Experts, "output_unread_in_recompute", False)  # what such a module must declare
    _, grads_ok = _loss_and_grads(model, ids)
    for name in grads:
        torch.testing.assert_close(grads_ok[name], grads[name], rtol=0, atol=0, msg=f"{name} differs")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("family", ["qwen3_moe", "gpt_oss", "deepseek_v3"])
def test_gpu_keep_attention_equals_recompute_bf16(family, tmp_path, seed):
    """On CUDA in bf16, where SDPA runs its fused kernels (flash / cuDNN / memory-efficient, MLA's unequal head dims
    included): the "attention" policy gives the plain policy's loss and LoRA gradients, and its recompute runs no
    attention kernel."""
    model = _trainable_model(family, tmp_path, seed, OVERRIDES.get(family), dtype=torch.bfloat16, device="cuda")
    ids = torch.randint(0, model.config.vocab_size, (2, 300), generator=torch.Generator().manual_seed(seed)).cuda()
    model.gradient_checkpointing_enable()
    loss, grads = _loss_and_grads(model, ids)
    model.gradient_checkpointing_enable(policy="attention")
    calls = _AttentionKernelCalls()
    with calls:
        loss_k, grads_k = _loss_and_grads(model, ids)
    base = _attention_kernels(model, ids)
    assert base and calls.n == base
    assert torch.equal(loss, loss_k)  # the forward is the same kernels on the same inputs
    # the gradients within bf16 rounding, not bitwise: the fused attention backwards accumulate dq with atomics, so
    # two runs of even the same policy may differ in the last bits
    from shared_math.numerics import assert_close

    for name in grads:
        assert_close(grads_k[name], grads[name], dtype="bfloat16", quantity="moe_grad", name=f"{family} {name}")


def _bf16_model_and_fp32_reference(family, tmp_path, seed, device="cuda"):
    """One tiny 2-layer `family` checkpoint and one set of LoRA tensors as a bf16 model (bf16 weights, fp32 LoRA, as
    the benchmarks train) and as an fp32 model, both checkpointed: the fp32 one is the reference the bf16
    tolerances are written against. Every token routes to all 8 experts (K = E), as in the bf16 parity tests: with
    K < E a near-tie router score flips its choice between bf16 and fp32, and that token's expert gradients with
    it (measured on CPU, eager: 22% of the largest element on some LoRA tensors at K=2)."""
    kw = dict(num_hidden_layers=2, num_experts_per_tok=8)
    ref = _trainable_model(family, tmp_path, seed, kw, dtype=torch.float32, device=device)
    model = _trainable_model(family, tmp_path, seed, kw, dtype=torch.bfloat16, device=device)
    with torch.no_grad():
        theirs = _lora_params(ref)
        for name, p in _lora_params(model).items():
            p.copy_(theirs[name])
    ref.gradient_checkpointing_enable()
    model.gradient_checkpointing_enable()
    return model, ref


def _rel_l2_all(grads: dict, ref: dict) -> float:
    """‖grads − ref‖ / ‖ref‖ over all LoRA gradients together (one number: per tensor it would swing with each
    tensor's few large entries)."""
    num = sum(float((grads[n].float() - ref[n].float()).square().sum()) for n in ref)
    return (num / sum(float(ref[n].float().square().sum()) for n in ref)) ** 0.5


def _check_bf16_against_fp32(loss, grads, loss32, grads32, what: str) -> None:
    from shared_math.numerics import assert_close

    assert_close(loss, loss32, dtype="bfloat16", quantity="loss", name=f"{what} loss")
    for name in grads32:
        assert_close(grads[name], grads32[name], dtype="bfloat16", quantity="model_lora_grad", name=f"{what} {name}")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("family", ["qwen3_moe", "gpt_oss"])
def test_gpu_keep_attention_in_inductor_layers_bf16(family, tmp_path, seed, monkeypatch):
    """The benchmark's `--compile --checkpoint-policy attention` on CUDA in bf16: inductor-compiled layers (Qwen3's
    attention eager between their graphs, gpt-oss's sink kernels a custom op inside one graph); the recompute hands
    back every fused attention kernel call of the forward.
    Loss and LoRA gradients, with and without the policy, equal the fp32 model's within the bf16 model tolerance,
    and the policy's gradients are no further from fp32 than the plain policy's (at most 1.5x, over all LoRA
    tensors): two roundings of the same bf16 math sit at similar distances from fp32, while kept attention outputs
    that did not match the recompute's q, k, v would add an error of their own.

    History, both on an H100 (2026-12-06): the first version compared with the eager plain policy, the second with
    the compiled plain policy, each within the bf16 `lora_grad` bound (8% of the largest element) and with K=2 of 8
    experts, and both failed at 3-8% rel. L2 for Qwen3 and gpt-oss alike. The graph break moves inductor's fusion
    boundaries, so the two runs round differently, and at K < E a near-tie router score then picks other experts
    for a token (`_bf16_model_and_fp32_reference`). Now K = E and each run is held to fp32. On CPU in bf16 this
    test passes, and fails when the kept attention output is scaled by 1.03 (2.3% from fp32 against 1.1%). The
    eager policy test above is bitwise."""
    from torch_impl.compile import compile_decoder_layers

    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    model, ref = _bf16_model_and_fp32_reference(family, tmp_path, seed)
    ids = torch.randint(0, model.config.vocab_size, (2, 300), generator=torch.Generator().manual_seed(seed)).cuda()
    loss32, grads32 = _loss_and_grads(ref, ids)
    torch._dynamo.reset()
    compile_decoder_layers(model)
    loss, grads = _loss_and_grads(model, ids)
    handed_back = _count_hand_backs(monkeypatch)
    model.gradient_checkpointing_enable(policy="attention")
    loss_k, grads_k = _loss_and_grads(model, ids)
    assert sum(handed_back) == _attention_kernels(model, ids) > 0
    _check_bf16_against_fp32(loss, grads, loss32, grads32, f"{family} compiled")
    _check_bf16_against_fp32(loss_k, grads_k, loss32, grads32, f"{family} compiled, attention kept")
    plain, kept = _rel_l2_all(grads, grads32), _rel_l2_all(grads_k, grads32)
    assert kept <= 1.5 * plain, f"{family}: the policy's LoRA gradients are {kept:.3g} from fp32, plain {plain:.3g}"
    torch._dynamo.reset()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("family", ["qwen3_moe", "gpt_oss"])
def test_gpu_inductor_layers_take_a_second_length_bf16(family, tmp_path, seed, monkeypatch):
    """Inductor-compiled layers (the benchmark's --compile) at two sequence lengths in one process, the second a
    dynamic-shape retrace, as `benchmarks/step.py --seq 4096,16384` runs them. gpt-oss's compiled sink layers once
    failed there in Dynamo ("ObjectVariable()", H100, 2026-12-06: `lse_attention._forward` says why). At both
    lengths loss and LoRA gradients equal the fp32 model's within the bf16 model tolerance."""
    from torch_impl.compile import compile_decoder_layers

    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    model, ref = _bf16_model_and_fp32_reference(family, tmp_path, seed)
    torch._dynamo.reset()
    compile_decoder_layers(model)
    gen = torch.Generator().manual_seed(seed)
    for S in (300, 420):
        ids = torch.randint(0, model.config.vocab_size, (1, S), generator=gen).cuda()
        _check_bf16_against_fp32(*_loss_and_grads(model, ids), *_loss_and_grads(ref, ids), f"{family} S={S}")
    torch._dynamo.reset()
