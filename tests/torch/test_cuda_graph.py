"""CUDA-graph capture of the training forward + backward (`torch_impl.cuda_graph`) and the sync-free forward it relies
on (`torch_impl.models.layers.static_batch`).

CPU: the static forward equals the ordinary one for every family (packed or not, sliding windows), the per-step
batch check, the refusal of backends a graph cannot hold, and the clear errors off CUDA. GPU (`gpu`): a replayed
step gives the eager step's loss and LoRA gradients, batch after batch, per family (triton backend), with activation
checkpointing; bad batches are refused; the Trainer's `cuda_graph` run follows the eager run's losses.
"""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from shared_math.config import LoraConfig, ModelConfig, available_targets  # noqa: E402
from shared_math.numerics import assert_close  # noqa: E402
from shared_math.tiny import write_tiny_checkpoint  # noqa: E402
from tests.shared import hf_helpers as H  # noqa: E402
from torch_impl import load_model  # noqa: E402
from torch_impl.cuda_graph import GraphedLoss, _batch_facts, graph_model  # noqa: E402
from torch_impl.lora import _lora_params, load_lora_state_dict  # noqa: E402
from torch_impl.models.layers import is_packed, static_batch  # noqa: E402

FAMILIES = ["qwen3_moe", "gpt_oss", "deepseek_v3", "glm4_moe_lite"]


def _model(tmp_path, family: str, device: str = "cpu", backend: str = "auto", dtype=torch.float32, **overrides):
    path = write_tiny_checkpoint(family, tmp_path / family, seed=3, **overrides)
    cfg = ModelConfig.from_hf(path)
    lora = LoraConfig(rank=4, alpha=8.0, targets=available_targets(cfg))  # every target: dense MLPs and MLA too
    model = load_model(path, lora=lora, dtype=dtype, device=device, moe_backend=backend)
    load_lora_state_dict(model, H.random_lora_tensors(cfg, lora, seed=5))
    return model


def _batch(seed: int, vocab: int, packed: bool, device: str = "cpu", B: int = 2, S: int = 24):
    """ids, labels (a 3-token prompt not trained on), position_ids (documents of 9, 8, 7 tokens when packed)."""
    rng = np.random.default_rng(seed)
    ids = torch.as_tensor(rng.integers(0, vocab, size=(B, S)), device=device)
    labels = ids.clone()
    labels[:, :3] = -100
    pos = None
    if packed:
        row = np.r_[np.arange(9), np.arange(8), np.arange(S - 17)]
        pos = torch.as_tensor(np.stack([row] * B), device=device)
    return ids, labels, pos


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("packed", [False, True])
def test_static_forward_equals_the_ordinary_one(tmp_path, family, packed):
    """Inside static_batch the forward takes the declared packing instead of reading it; declaring packed documents
    for unpacked rows runs the explicit-mask path, which must give the causal path's numbers (gpt-oss: also the
    sliding window, the tiny config's window being shorter than the rows)."""
    model = _model(tmp_path, family).eval()
    ids, _, pos = _batch(0, model.config.vocab_size, packed)
    with torch.no_grad():
        ref = model(ids, position_ids=pos).logits
        with static_batch(packed=True):
            masked = model(ids, position_ids=pos).logits
        with static_batch(packed=is_packed(pos) if pos is not None else False):
            same = model(ids, position_ids=pos).logits
    assert torch.equal(same, ref)
    assert_close(masked, ref, dtype="float32", quantity="logits", name="explicit-mask path")


def test_batch_facts_and_static_batch_nesting():
    ids = torch.tensor([[3, 7, 1], [0, 9, 4]])
    assert _batch_facts(ids, None) == (0, 9, False)
    assert _batch_facts(ids, torch.tensor([[0, 1, 2], [0, 1, 2]])) == (0, 9, False)
    assert _batch_facts(ids, torch.tensor([[0, 1, 0], [0, 1, 2]])) == (0, 9, True)
    from torch_impl.models.layers import in_static_batch

    assert not in_static_batch()
    with static_batch(packed=True):
        with static_batch(packed=False):
            assert in_static_batch()
        assert in_static_batch()
    assert not in_static_batch()


def test_check_capturable_names_the_backend(tmp_path):
    from torch_impl.cuda_graph import check_capturable

    with pytest.raises(ValueError, match="\\['native'\\] cannot run inside a CUDA graph"):
        check_capturable(_model(tmp_path, "gpt_oss", backend="native"))


def test_capture_failure_messages_name_the_likely_cause():
    """A failed capture's error says what to do: a capture that had to wait on the default stream (seen when an eager
    step's autograd graph was still alive, the original error chained as the capture error's context) asks to drop
    that step's references; any other failure names the host syncs a graph cannot hold."""
    from torch_impl.cuda_graph import capture_failure_message

    generic = RuntimeError("CUDA error: operation failed due to a previous error during capture")
    try:
        try:
            raise RuntimeError("CUDA error: operation would make the legacy stream depend on a capturing blocking "
                               "stream")
        except RuntimeError:
            raise generic  # noqa: B904 - chained implicitly, as torch.cuda.graph's __exit__ does
    except RuntimeError as e:
        stale = e
    msg = capture_failure_message(stale)
    assert "`del loss`" in msg and "syncs with the host" not in msg
    plain = capture_failure_message(RuntimeError("CUDA error: operation not permitted when stream is capturing"))
    assert "syncs with the host" in plain and "del loss" not in plain


def test_off_cuda_errors_are_clear(tmp_path):
    model = _model(tmp_path, "qwen3_moe")
    ids, labels, _ = _batch(0, model.config.vocab_size, False)
    with pytest.raises(RuntimeError, match="not on a CUDA device"):
        GraphedLoss(lambda ids: model(ids).logits.sum(), {"ids": ids}, list(model.parameters()))
    from torch_impl.optim import AdamWInBackward

    params = [p for p in model.parameters() if p.requires_grad]
    eager_only = AdamWInBackward(params, lr=1e-3)  # a float learning rate the graph would freeze: refused first
    with pytest.raises(ValueError, match="capturable=True"):
        GraphedLoss(lambda ids: model(ids).logits.sum(), {"ids": ids}, params, optimizer_in_backward=eager_only)
    eager_only.remove()
    from shared_math.train_config import load_run_config
    from torch_impl.train import Trainer

    with pytest.raises(ValueError, match="cuda_graph=True needs a CUDA device"):
        Trainer(load_run_config(None, [f"train.out_dir={tmp_path / 'run'}"]), cuda_graph=True)


def test_cli_device_options_errors(tmp_path, capsys):
    """`splitmoe train --cuda-graph` needs CUDA, and both options are torch-only: exit 2 with the reason, before any
    run folder is written."""
    from splitmoe.cli import main

    out = tmp_path / "run"
    assert main(["train", "--framework", "torch", "--cuda-graph", "--out", str(out), "--quiet"]) == 2
    assert "cuda_graph=True needs a CUDA device" in capsys.readouterr().err
    assert main(["train", "--framework", "jax", "--device", "cuda", "--out", str(out), "--quiet"]) == 2
    assert "torch options" in capsys.readouterr().err
    assert not (out / "checkpoints").exists()


def _grads(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.detach().clone() for n, p in _lora_params(model).items()}


@pytest.mark.gpu
@pytest.mark.parametrize("family", FAMILIES)
def test_graphed_step_matches_eager_cuda(tmp_path, family):
    """fp32 (IEEE dots): the replayed step's loss and every LoRA gradient against an eager step on the same batch,
    for the capture batch and two new ones; activation checkpointing on, so the recompute is captured too."""
    model = _model(tmp_path, family, "cuda", "triton")
    model.gradient_checkpointing_enable()
    model.train()
    packed = family == "qwen3_moe"  # one family through the packed-mask path inside the graph
    batches = [_batch(s, model.config.vocab_size, packed, "cuda") for s in (0, 1, 2)]
    _replays_match_eager(model, batches, "float32", ("loss", "lora_grad"))


def _replays_match_eager(model, batches, dtype: str, quantities: tuple[str, str]) -> None:
    """Capture on the first batch, then per batch: the replayed loss and LoRA gradients against an eager step's."""
    step = graph_model(model, *batches[0])
    for i, b in enumerate(batches):
        loss = step(*b).clone()
        got = _grads(model)
        for p in _lora_params(model).values():
            p.grad = None
        out = model(b[0], labels=b[1], position_ids=b[2])
        out.loss.backward()
        assert_close(loss, out.loss, dtype=dtype, quantity=quantities[0], name=f"batch {i} loss")
        for n, g in _grads(model).items():
            assert_close(got[n], g, dtype=dtype, quantity=quantities[1], name=f"batch {i} d {n}")


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.is_available() and torch.cuda.get_device_capability() < (9, 0),
                    reason="triton_hopper's TMA descriptors need compute capability >= 9.0")
@pytest.mark.parametrize("family", ["qwen3_moe", "gpt_oss"])
def test_graphed_hopper_step_matches_eager_bf16_cuda(tmp_path, family, monkeypatch):
    """The persistent TMA kernels (`triton_hopper`, what "auto" picks on a Hopper GPU in bf16) inside a captured
    step: session 9's `step.py --cuda-graph` rows captured them on an H100 without an error, but no replay had been
    checked against the eager step. CAPTURABLE_BACKENDS has listed triton_hopper since this passed on an H100
    (2026-12-06, Qwen3 and gpt-oss). bf16 (the kernels are half-precision only): the same kernels on the same
    inputs, so the replay differs from the eager step only where an atomic accumulation's order does; the bf16
    gradient tolerance is the bound, not the expectation."""
    model = _model(tmp_path, family, "cuda", "triton_hopper", dtype=torch.bfloat16)
    model.gradient_checkpointing_enable()
    model.train()
    batches = [_batch(s, model.config.vocab_size, False, "cuda") for s in (0, 1)]
    _replays_match_eager(model, batches, "bfloat16", ("moe_block", "moe_grad"))


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["grouped_mm", "native"])
def test_uncapturable_backends_are_refused_before_any_work_cuda(tmp_path, backend):
    """H200, torch 2.11: capturing with grouped_mm failed inside torch._grouped_mm (a copy from pageable host memory),
    and the failure inside checkpointed layers left saved-tensor hooks behind that broke later tests in the same
    process. Hence the refusal up front, which must leave the model usable eagerly."""
    model = _model(tmp_path, "qwen3_moe", "cuda", backend)
    model.gradient_checkpointing_enable()
    model.train()
    ids, labels, _ = _batch(0, model.config.vocab_size, False, "cuda")
    with pytest.raises(ValueError, match=f"MoE backend\\(s\\) \\['{backend}'\\] cannot run inside a CUDA graph"):
        graph_model(model, ids, labels)
    model(ids, labels=labels).loss.backward()


@pytest.mark.gpu
def test_graphed_step_rejects_what_it_cannot_replay_cuda(tmp_path):
    model = _model(tmp_path, "qwen3_moe", "cuda", "triton").train()
    V = model.config.vocab_size
    ids, labels, pos = _batch(0, V, True, "cuda")
    step = graph_model(model, ids, labels, pos)
    with pytest.raises(ValueError, match="packed documents"):
        step(ids, labels, torch.arange(ids.shape[1], device="cuda").expand_as(ids).contiguous())
    with pytest.raises(ValueError, match="token ids must lie"):
        step(torch.full_like(ids, V), labels, pos)
    with pytest.raises(ValueError, match="captured for"):
        step(ids[:, :12], labels[:, :12], pos[:, :12])


@pytest.mark.gpu
@pytest.mark.parametrize("compiled", [False, True], ids=["eager_layers", "compiled_layers"])
def test_trainer_cuda_graph_follows_the_eager_run_cuda(tmp_path, compiled):
    """Three optimizer steps with two micro-batches each (fp32): the graphed trainer's losses follow the eager
    trainer's (the micro-batch gradients are summed outside the graph, the update applied eagerly), with the decoder
    layers compiled inside the graph too (`--compile --cuda-graph`, session 13's fastest 4K steps). fp32: inductor's
    fusions reorder fp32 sums, which the fp32 loss tolerance covers."""
    from shared_math.train_config import load_run_config
    from torch_impl.train import Trainer

    overrides = ["data.batch_size=4", "data.synthetic.num_train=64", "data.synthetic.num_eval=4", "lora.rank=4",
                 "lora.alpha=8", "optim.warmup_steps=1", "train.grad_accum=2", "model.moe_backend=triton"]
    runs = {}
    for graphed in (False, True):
        cfg = load_run_config(None, [*overrides, f"train.out_dir={tmp_path / str(graphed)}"])
        tr = Trainer(cfg, device="cuda", cuda_graph=graphed, compile=compiled and graphed)
        runs[graphed] = [tr.train_step()[0] for _ in range(3)]
    assert_close(np.array(runs[True]), np.array(runs[False]), dtype="float32", quantity="train_loss",
                 name="losses of 3 steps")


@pytest.mark.gpu
def test_trainer_cuda_graph_with_adamw_in_backward_follows_the_eager_run_cuda(tmp_path):
    """optim.in_backward under a CUDA graph (the capturable AdamWInBackward: the updates captured with the backward,
    the learning rate from a device tensor, warm-up runs that update nothing): three steps of a warm-up + decay
    schedule follow the eager in-backward trainer's losses and gradient norms (the learning rate reached the
    graph: a frozen one would change the third step's loss), the warm-up did not train (the first loss is the
    eager first loss), and no gradient outlives a step. fp32 (IEEE dots)."""
    from shared_math.train_config import load_run_config
    from torch_impl.train import Trainer

    overrides = ["data.batch_size=4", "data.synthetic.num_train=64", "data.synthetic.num_eval=4", "lora.rank=4",
                 "lora.alpha=8", "optim.warmup_steps=1", "optim.in_backward=true", "optim.max_grad_norm=0",
                 "train.grad_accum=1", "model.moe_backend=triton"]
    runs = {}
    for graphed in (False, True):
        cfg = load_run_config(None, [*overrides, f"train.out_dir={tmp_path / str(graphed)}"])
        tr = Trainer(cfg, device="cuda", cuda_graph=graphed)
        runs[graphed] = np.array([tr.train_step() for _ in range(3)])
        assert all(p.grad is None for p in tr.params)
    assert_close(runs[True][:, 0], runs[False][:, 0], dtype="float32", quantity="train_loss", name="losses")
    assert_close(runs[True][:, 1], runs[False][:, 1], dtype="float32", quantity="train_loss", name="grad norms")


def test_auto_layers_move_to_a_capturable_backend(tmp_path, monkeypatch):
    """On a GPU in fp32 "auto" is grouped_mm, which CAPTURABLE_BACKENDS does not list: graph_model moves layers left
    on "auto" to triton (so `--cuda-graph` with the default backend is not refused there), leaves a backend named
    explicitly, or by SPLITMOE_MOE_BACKEND, as named, and a layer whose auto choice is capturable (triton_hopper, on
    a Hopper GPU in bf16) alone. The GPU's choices are stood in for on the CPU: resolve_backend answers as on a GPU
    in fp32, then as on an H100 in bf16."""
    import torch_impl.backends as backends
    from torch_impl.cuda_graph import CAPTURABLE_BACKENDS, check_capturable, choose_capturable_backends
    from torch_impl.moe import Experts

    auto_is = {"name": "grouped_mm"}

    def hopper_auto(name="auto", *, device=None, dtype=None):
        return auto_is["name"] if name in (None, "", "auto") else name

    monkeypatch.setattr(backends, "resolve_backend", hopper_auto)
    monkeypatch.setattr(backends, "why_unavailable", lambda name, device=None, dtype=None: None)
    monkeypatch.delenv(backends.ENV_VAR, raising=False)

    def experts(model):
        return [m for m in model.modules() if isinstance(m, Experts)]

    model = _model(tmp_path, "qwen3_moe")
    layers = experts(model)
    assert layers and all(m.backend == "auto" for m in layers)
    layers[0].backend = "grouped_mm"  # named explicitly: refused below, never swapped
    assert choose_capturable_backends(model) == len(layers) - 1
    assert layers[0].backend == "grouped_mm" and all(m.backend == CAPTURABLE_BACKENDS[0] for m in layers[1:])
    with pytest.raises(ValueError, match="\\['grouped_mm'\\] cannot run inside a CUDA graph"):
        check_capturable(model)
    layers[0].backend = "auto"
    assert choose_capturable_backends(model) == 1 and choose_capturable_backends(model) == 0  # settled once
    check_capturable(model)

    model = _model(tmp_path, "gpt_oss")
    monkeypatch.setenv(backends.ENV_VAR, "grouped_mm")  # the variable names a backend: as named, then refused
    assert choose_capturable_backends(model) == 0 and all(m.backend == "auto" for m in experts(model))

    monkeypatch.delenv(backends.ENV_VAR)
    auto_is["name"] = "triton_hopper"  # an H100 in bf16: auto's own choice is capturable, nothing moves
    assert choose_capturable_backends(model) == 0 and all(m.backend == "auto" for m in experts(model))
    check_capturable(model)
