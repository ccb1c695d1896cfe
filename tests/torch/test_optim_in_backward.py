"""`torch_impl.optim.AdamWInBackward` (AdamW stepped per tensor inside backward) gives exactly the update of
`torch.optim.AdamW` over all LoRA tensors, frees every gradient as soon as it is used, reports the pre-update global
gradient norm, works through (offloaded, reentrant) activation checkpointing, and shares AdamW's state layout; in
its capturable form (what a CUDA graph holds: device learning rate, state created before the capture, warm-up runs
that update nothing) the same, bit for bit, on the CPU's fused AdamW."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from shared_math.config import LoraConfig  # noqa: E402
from shared_math.tiny import write_tiny_checkpoint  # noqa: E402
from torch_impl import load_model  # noqa: E402
from torch_impl.lora import _lora_params  # noqa: E402
from torch_impl.optim import AdamWInBackward, check_in_backward  # noqa: E402

TARGETS = ("q_proj", "o_proj", "experts.gate_up_proj", "experts.down_proj")
HYPER = dict(betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
LRS = (1e-2, 5e-3, 2e-3)  # a schedule: set_lr must reach every per-tensor optimizer


def _model(path, seed, ckpt=None, **kw):
    model = load_model(path, lora=LoraConfig(rank=4, alpha=8.0, targets=TARGETS), moe_backend="grouped_mm",
                       lora_seed=seed, **kw)
    with torch.no_grad():
        for name, p in _lora_params(model).items():
            if "lora_B" in name:  # drawn on the CPU (one generator for every device), then copied
                g = torch.Generator().manual_seed(seed + len(name))
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    if ckpt is not None:
        model.gradient_checkpointing_enable(offload_to_cpu=ckpt == "offload")
    return model.train()


def _batches(vocab, n, seed):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (2, 13), generator=g) for _ in range(n)]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    # an expert with no tokens is likely at 2x13 tokens over 8 experts, top-2; prime E covers odd group sizes
    return write_tiny_checkpoint("qwen3_moe", tmp_path_factory.mktemp("tiny") / "m", seed=3, num_experts=7)


@pytest.mark.parametrize("ckpt", [None, "recompute", "offload"])
def test_equals_adamw_bit_for_bit(tiny, ckpt):
    _check_equal(_model(tiny, 5), _model(tiny, 5, ckpt), fused=None, device="cpu")


@pytest.mark.gpu
@pytest.mark.parametrize("capturable", [False, True])
@pytest.mark.parametrize("ckpt", [None, "offload"])
def test_equals_fused_adamw_on_cuda_bf16(tiny, ckpt, capturable):
    """What the Trainer and bench step run on the H200: bf16 weights, fp32 LoRA, torch's fused AdamW kernel; the
    capturable form with its fp32 device learning rate (the CUDA kernel's math is fp32 either way)."""
    kw = dict(dtype=torch.bfloat16, device="cuda")
    _check_equal(_model(tiny, 5, **kw), _model(tiny, 5, ckpt, **kw), fused=True, device="cuda",
                 capturable=capturable)


@pytest.mark.parametrize("ckpt", [None, "recompute"])
def test_capturable_form_equals_adamw_bit_for_bit(tiny, ckpt):
    """As GraphedLoss drives it: the state created up front, then two warm-up backwards under `paused` (they free
    the gradients and update nothing), then the steps, the learning rate through the shared device tensor."""
    _check_equal(_model(tiny, 5), _model(tiny, 5, ckpt), fused=True, device="cpu", capturable=True)


def _check_equal(ref, ours, fused, device, capturable=False):
    ref_params = [p for p in ref.parameters() if p.requires_grad]
    our_params = [p for p in ours.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(ref_params, lr=LRS[0], fused=fused, **HYPER)
    inb = AdamWInBackward(our_params, lr=LRS[0], fused=fused, capturable=capturable, **HYPER)
    if capturable:
        before = [p.detach().clone() for p in our_params]
        inb.init_state()
        with inb.paused():
            for ids in _batches(ours.config.vocab_size, 2, 99):
                ids = ids.to(device)
                ours(ids, labels=ids).loss.backward()
        assert all(p.grad is None for p in our_params), "a warm-up gradient outlived its backward"
        assert all(torch.equal(a, b) for a, b in zip(before, our_params)), "a paused backward updated a tensor"
        assert float(inb.grad_norm()) == 0.0
    for lr, ids in zip(LRS, _batches(ref.config.vocab_size, len(LRS), 11)):
        ids = ids.to(device)
        for g in opt.param_groups:
            g["lr"] = lr
        ref(ids, labels=ids).loss.backward()
        norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(p.grad) for p in ref_params]))
        opt.step()
        opt.zero_grad(set_to_none=True)
        inb.set_lr(lr)
        ours(ids, labels=ids).loss.backward()
        assert all(p.grad is None for p in our_params), "a gradient outlived its update"
        torch.testing.assert_close(inb.grad_norm(), norm, rtol=1e-6, atol=0)  # summation order differs
    for a, b in zip(ref_params, our_params):
        assert torch.equal(a, b)


def test_gradients_are_freed_one_at_a_time(tiny):
    model = _model(tiny, 2)
    params = [p for p in model.parameters() if p.requires_grad]
    inb = AdamWInBackward(params, lr=1e-3)
    alive = []
    for p in params:  # registered after the optimizer's hooks, so these see the state after each update
        p.register_post_accumulate_grad_hook(lambda _: alive.append(sum(q.grad is not None for q in params)))
    ids = _batches(model.config.vocab_size, 1, 1)[0]
    model(ids, labels=ids).loss.backward()
    assert len(alive) == len(params) and max(alive) == 0
    assert float(inb.grad_norm()) > 0 and float(inb.grad_norm()) == 0  # the second read sees a fresh accumulator


@pytest.mark.parametrize("capturable", [False, True])
def test_state_moves_to_and_from_adamw(tiny, capturable):
    """AdamW's state into an in-backward optimizer and the reverse, then a step at a new learning rate each: the same
    tensors. The capturable form writes AdamW's layout too (the learning rate a number) and, loading one, keeps its
    shared device learning rate, so a later set_lr still reaches every tensor."""
    ids = _batches(1000, 3, 4)
    a, b = _model(tiny, 7), _model(tiny, 7)
    pa = [p for p in a.parameters() if p.requires_grad]
    pb = [p for p in b.parameters() if p.requires_grad]
    kw = dict(HYPER, fused=True if capturable else None)  # the capturable form runs on the CPU's fused AdamW
    inb = AdamWInBackward(pa, lr=1e-2, capturable=capturable, **kw)
    opt = torch.optim.AdamW(pb, lr=1e-2, **kw)
    for x in ids[:2]:
        a(x % a.config.vocab_size, labels=x % a.config.vocab_size).loss.backward()
        b(x % b.config.vocab_size, labels=x % b.config.vocab_size).loss.backward()
        opt.step()
        opt.zero_grad()
    sd = inb.state_dict()
    assert isinstance(sd["param_groups"][0]["lr"], float) and not sd["param_groups"][0]["capturable"]
    inb2 = AdamWInBackward(pb, lr=1e-3, capturable=capturable, **kw)
    inb2.load_state_dict(opt.state_dict())
    opt2 = torch.optim.AdamW(pa, lr=1e-2, **kw)
    opt2.load_state_dict(sd)
    inb.remove()
    for g in opt2.param_groups:
        g["lr"] = 5e-3
    inb2.set_lr(5e-3)
    x = ids[2] % a.config.vocab_size
    a(x, labels=x).loss.backward()
    opt2.step()
    b(x, labels=x).loss.backward()
    for p, q in zip(pa, pb):
        assert torch.equal(p, q)
    with pytest.raises(ValueError, match="holds 3 tensors"):
        inb2.load_state_dict({"state": {}, "param_groups": [{"params": [0, 1, 2]}]})


def test_refuses_what_it_cannot_compute():
    check_in_backward(0.0, 1)
    with pytest.raises(ValueError, match="max_grad_norm=1.0.*set optim.max_grad_norm=0"):
        check_in_backward(1.0, 1)
    with pytest.raises(ValueError, match="grad_accum=4"):
        check_in_backward(0.0, 4)
    p = torch.nn.Parameter(torch.zeros(2))
    with pytest.raises(ValueError, match="listed twice"):
        AdamWInBackward([p, p], lr=1e-3)
