"""The expert path as the custom op `splitmoe::split_lora_experts` (`torch_impl.moe_op`) and regional compilation
(`torch_impl.compile`).

Checked: `torch.library.opcheck` on both ops and on gpt-oss's sink kernel op (schema, fake implementation under
dynamic shapes, autograd registration); the op's output and every gradient against the eager path's, per backend,
over the shape cases that matter here (odd dims, prime E, K=1, K=E, experts with no tokens, the clamped activation
with biases), in fp32 with the tolerances of `shared_math.numerics`; when the op is used (eager default off, on
under compile, the flag and the environment variable); and a tiny Qwen3 model whose decoder layers are compiled with
`fullgraph=True`, which raises on any graph break, giving eager's loss and LoRA gradients, checkpointed: without
recompiles, with eager's expert GEMMs per step (no recompute in the op's backward), and at a second sequence length
(dynamic) without graph breaks; the same fullgraph compile for gpt-oss's layers (sink attention, sliding and full)
and for Qwen3 with routing statistics on (eager's statistics, none computed by the checkpoint's recompute).
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

from tests.torch.interpreter import import_interpreted  # noqa: E402

TRITON_SKIP = import_interpreted("torch_impl.kernels.split_lora")

from shared_math.cases import get_case, make_moe_inputs  # noqa: E402
from shared_math.config import LoraConfig, ModelConfig  # noqa: E402
from shared_math.numerics import assert_close  # noqa: E402
from shared_math.tiny import random_canonical_tensors, tiny_hf_config  # noqa: E402
from torch_impl import moe_op  # noqa: E402
from torch_impl.backends import why_unavailable  # noqa: E402
from torch_impl.compile import compile_decoder_layers  # noqa: E402
from torch_impl.load import build_model  # noqa: E402
from torch_impl.lora import _lora_params, attach_lora  # noqa: E402
from torch_impl.moe import sort_by_expert, split_lora_experts  # noqa: E402

CASES = ["odd_dims", "prime_e", "k1", "k_eq_e", "empty_experts", "oai_biases"]
GRAD_NAMES = ("x", "expert_weights", "w_gate_up", "w_down", "a1", "b1", "a2", "b2", "b_gate_up", "b_down")


@pytest.fixture(autouse=True)
def _default_mode():
    """Each test starts from the default rule (op only under compile) and leaves it so."""
    previous = moe_op.use_custom_op(None)
    yield
    moe_op.use_custom_op(previous)


def _tensors(case_name: str, seed: int, base_grad: bool) -> dict:
    """The case's inputs as fp32 leaves: everything differentiable requires grad, the base weights iff base_grad."""
    case = get_case(case_name)
    inp = make_moe_inputs(case, seed=seed % 1000)

    def t(a, grad=True):
        return torch.tensor(a, dtype=torch.float32).requires_grad_(grad)

    biases = None if inp["biases"] is None else tuple(map(t, inp["biases"]))
    return dict(x=t(inp["x"]), expert_ids=torch.tensor(inp["expert_ids"]), expert_weights=t(inp["expert_weights"]),
                w_gate_up=t(inp["w_gate_up"], base_grad), w_down=t(inp["w_down"], base_grad),
                lora_gate_up=tuple(map(t, inp["lora_gate_up"])), lora_down=tuple(map(t, inp["lora_down"])),
                biases=biases, kw=dict(scale=inp["scale"], activation=inp["activation"],
                                       swiglu_limit=inp["swiglu_limit"]))


def _flat(tt: dict) -> list:
    b = tt["biases"] or (None, None)
    return [tt["x"], tt["expert_weights"], tt["w_gate_up"], tt["w_down"], *tt["lora_gate_up"], *tt["lora_down"], *b]


def _forward_backward(fn, case_name: str, seed: int, backend: str, base_grad: bool):
    """y and the gradients of every input (None where it has none) after `y.backward(dy)` through `fn`."""
    tt = _tensors(case_name, seed, base_grad)
    y = fn(tt["x"], tt["expert_ids"], tt["expert_weights"], tt["w_gate_up"], tt["w_down"], tt["lora_gate_up"],
           tt["lora_down"], biases=tt["biases"], backend=backend, **tt["kw"])
    dy = torch.randn(y.shape, generator=torch.Generator().manual_seed(seed))
    y.backward(dy)
    return y.detach(), [None if t is None else t.grad for t in _flat(tt)]


def _skip_unless_available(backend: str) -> None:
    if (why := why_unavailable(backend, "cpu", torch.float32)) is not None:
        pytest.skip(f"{backend} unavailable in fp32 on CPU: {why}")


def _compare_op_with_eager(case_name: str, seed: int, backend: str, base_grad: bool = False) -> None:
    _skip_unless_available(backend)
    y_ref, g_ref = _forward_backward(split_lora_experts, case_name, seed, backend, base_grad)
    y_op, g_op = _forward_backward(moe_op.split_lora_experts_op, case_name, seed, backend, base_grad)
    assert_close(y_op, y_ref, dtype="float32", quantity="moe_block", name=f"{backend} {case_name} y")
    for name, g, e in zip(GRAD_NAMES, g_op, g_ref):
        if e is None:
            assert g is None, f"{backend} {case_name}: d{name} should be None (eager has none)"
            continue
        assert g is not None, f"{backend} {case_name}: no gradient for {name}"
        assert_close(g, e, dtype="float32", quantity="moe_grad", name=f"{backend} {case_name} d{name}")


# ---- opcheck ---------------------------------------------------------------------------------------------------------

def _op_args(case_name: str, seed: int, backend: str, *, lora: bool = True, base_grad: bool = False) -> tuple:
    tt = _tensors(case_name, seed, base_grad)
    a1, b1 = tt["lora_gate_up"] if lora else (None, None)
    a2, b2 = tt["lora_down"] if lora else (None, None)
    b_gu, b_d = tt["biases"] or (None, None)
    kw = tt["kw"]
    sort = sort_by_expert(tt["expert_ids"], tt["w_gate_up"].shape[0]).tensors()
    return (tt["x"], tt["expert_ids"], tt["expert_weights"], tt["w_gate_up"], tt["w_down"], a1, b1, a2, b2, b_gu,
            b_d, sort, float(kw["scale"]), kw["activation"], float(kw["swiglu_limit"]), 1.702, backend, True, False)


@pytest.mark.parametrize("case_name, backend, lora, base_grad", [
    ("odd_dims", "grouped_mm", True, False),  # the training setting: LoRA on both, frozen base, padded shapes
    ("oai_biases", "native", True, True),  # biases, clamped activation, full fine-tuning gradients
    ("empty_experts", "grouped_mm", False, False),  # no LoRA at all (every optional None), empty groups
], ids=["odd_dims-grouped_mm", "oai_biases-native-base_grad", "empty_experts-no_lora"])
def test_opcheck_forward_op(case_name, backend, lora, base_grad, seed):
    _skip_unless_available(backend)
    args = _op_args(case_name, seed, backend, lora=lora, base_grad=base_grad)
    torch.library.opcheck(torch.ops.splitmoe.split_lora_experts.default, args)


@pytest.mark.parametrize("window", [None, 32], ids=["causal", "window_past_the_row"])
def test_opcheck_sink_attention_kernel(window, seed):
    """gpt-oss's sink kernel op (`lse_attention._kernel_op`, what compiled layers call under the "attention" policy):
    schema, fake implementation (the aten kernels' meta functions) under dynamic shapes; GQA heads, odd length."""
    import torch_impl.models.lse_attention  # noqa: F401 - registers the op

    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(1, h, 19, 8, generator=g) for h in (4, 2, 2))
    torch.library.opcheck(torch.ops.splitmoe.sink_attention_kernel.default, (q, k, v, 0.35, window))


def test_opcheck_backward_op(seed):
    _skip_unless_available("grouped_mm")
    args = _op_args("k_eq_e", seed, "grouped_mm")
    x = args[0]
    dy = torch.randn(x.shape, generator=torch.Generator().manual_seed(seed))
    tensors = [a.detach() if isinstance(a, torch.Tensor) else a for a in args[:11]]
    sort, scalars = args[11], args[12:17]  # less check_ids
    with torch.no_grad():
        residuals = torch.ops.splitmoe.split_lora_experts.default(*args)[1:]  # grouped_mm's gu, z1, z2
    assert len(residuals) == 3
    needs = [True, True, False, False, True, True, True, True, False, False]  # as for frozen base, no biases
    torch.library.opcheck(torch.ops.splitmoe.split_lora_experts_backward.default,
                          (dy, *tensors, sort, residuals, *scalars, needs))


# ---- the op equals the eager path ------------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", ["native", "grouped_mm"])
@pytest.mark.parametrize("case_name", CASES)
def test_op_matches_eager_fp32(backend, case_name, seed):
    _compare_op_with_eager(case_name, seed, backend)


@pytest.mark.parametrize("backend", ["native", "grouped_mm"])
def test_op_gives_base_weight_gradients_when_asked(backend, seed):
    """Full fine-tuning (base weights require grad): the op returns their gradients too, as eager does."""
    _compare_op_with_eager("oai_biases", seed, backend, base_grad=True)


@pytest.mark.parametrize("case_name", ["odd_dims", "empty_experts", "oai_biases"])
def test_op_matches_eager_triton_interpreter(case_name, seed, monkeypatch):
    if TRITON_SKIP is not None:
        pytest.skip(f"triton backend not in the interpreter here: {TRITON_SKIP}")
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # read again at launch
    _compare_op_with_eager(case_name, seed, "triton")


@pytest.mark.parametrize("backend, mixed, case_name", [
    *[("triton", m, c) for m in (False, True) for c in ("odd_dims", "k1", "empty_experts", "oai_biases")],
    ("triton_hopper", False, "odd_dims"), ("triton_hopper", True, "oai_biases")],
    ids=lambda v: {False: "fp32", True: "fp16_x_fp32_weights"}.get(v, v) if isinstance(v, bool) else v)
def test_op_backward_direct_equals_the_rebuilt_graph(backend, case_name, mixed, seed, monkeypatch):
    """The backward op's direct path (the Triton Function's backward on the residuals, `moe_op._direct_backward`)
    gives the same bits as the generic path it replaces (the Function's graph rebuilt on fresh leaves and
    differentiated), and is the path taken. `mixed`: x and the base weights in fp16 while the routing weights, LoRA
    masters and biases stay fp32, so the casts of `moe.backend_operands` and their gradients' casts back are
    exercised. Both Triton backends (the Hopper kernels run in the interpreter too)."""
    if TRITON_SKIP is not None:
        pytest.skip(f"triton backend not in the interpreter here: {TRITON_SKIP}")
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # read again at launch
    calls = []
    direct = moe_op._direct_backward

    def counted(*args):
        out = direct(*args)
        calls.append(out is not None)
        return out

    def run(path):
        monkeypatch.setattr(moe_op, "_direct_backward", counted if path == "direct" else lambda *a: None)
        tt = _tensors(case_name, seed, base_grad=False)
        if mixed:
            for k in ("x", "w_gate_up", "w_down"):
                tt[k] = tt[k].detach().half().requires_grad_(tt[k].requires_grad)
        y = moe_op.split_lora_experts_op(tt["x"], tt["expert_ids"], tt["expert_weights"], tt["w_gate_up"],
                                         tt["w_down"], tt["lora_gate_up"], tt["lora_down"], biases=tt["biases"],
                                         backend=backend, **tt["kw"])
        y.backward(torch.randn(y.shape, generator=torch.Generator().manual_seed(seed)).to(y.dtype))
        return [None if t is None else t.grad for t in _flat(tt)]

    rebuilt, fast = run("rebuilt"), run("direct")
    assert calls == [True], "the direct path was not taken"
    for name, g, e in zip(GRAD_NAMES, fast, rebuilt):
        assert (g is None) == (e is None), f"d{name}: {g is None} vs {e is None}"
        if e is not None:
            assert g.dtype == e.dtype and torch.equal(g, e), f"{case_name} d{name} differs from the rebuilt graph's"


@pytest.mark.skipif(TRITON_SKIP is None or torch.cuda.is_available() or importlib.util.find_spec("triton") is None,
                    reason="only needed when triton was imported compiled before this module")
def test_triton_op_tests_in_a_fresh_interpreter_process():
    """The triton tests above in a new process that sets TRITON_INTERPRET=1 before triton is imported (under
    pytest-xdist another module imports triton compiled first, and they would skip)."""
    root = Path(__file__).resolve().parents[2]
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    proc = subprocess.run([sys.executable, "-m", "pytest", str(Path(__file__).resolve()), "-q", "-x",
                           "-p", "no:cacheprovider", "-k", "triton_interpreter or direct_equals"], cwd=root, env=env,
                          capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-2000:]
    assert " passed" in proc.stdout and " skipped" not in proc.stdout, proc.stdout[-3000:]


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "triton_hopper"])
@pytest.mark.parametrize("case_name", ["odd_dims", "empty_experts", "oai_biases"])
def test_op_matches_eager_bf16_cuda(backend, case_name, seed):
    """On the GPU in bf16 (what `--compile` runs): the op's output and gradients, its backward taken straight from
    the Triton Function's backward (`_direct_backward`), against the eager path's on the same backend."""
    if (why := why_unavailable(backend, "cuda", torch.bfloat16)) is not None:
        pytest.skip(f"{backend} unavailable on this GPU: {why}")

    def run(fn):
        tt = _tensors(case_name, seed, base_grad=False)
        to = {k: (None if v is None else tuple(t.detach().cuda().bfloat16().requires_grad_() for t in v))
              for k, v in tt.items() if k in ("lora_gate_up", "lora_down", "biases")}
        x, ew = (tt[k].detach().cuda().bfloat16().requires_grad_() for k in ("x", "expert_weights"))
        wgu, wd = (tt[k].detach().cuda().bfloat16() for k in ("w_gate_up", "w_down"))
        y = fn(x, tt["expert_ids"].cuda(), ew, wgu, wd, to["lora_gate_up"], to["lora_down"], biases=to["biases"],
               backend=backend, **tt["kw"])
        y.backward(torch.randn(y.shape, generator=torch.Generator().manual_seed(seed)).cuda().bfloat16())
        leaves = [x, ew, *to["lora_gate_up"], *to["lora_down"], *(to["biases"] or ())]
        return y.detach(), [t.grad for t in leaves]

    (y_ref, g_ref), (y_op, g_op) = run(split_lora_experts), run(moe_op.split_lora_experts_op)
    assert_close(y_op.float(), y_ref.float(), dtype="bfloat16", quantity="moe_block", name=f"{backend} y")
    for i, (g, e) in enumerate(zip(g_op, g_ref)):
        assert_close(g.float(), e.float(), dtype="bfloat16", quantity="moe_grad", name=f"{backend} grad {i}")


# ---- when the op is used ---------------------------------------------------------------------------------------------

def test_custom_op_active_rule(monkeypatch):
    monkeypatch.delenv(moe_op.ENV_VAR, raising=False)
    assert not moe_op.custom_op_active(), "eager default: the plain path, numbers and cost unchanged"
    monkeypatch.setenv(moe_op.ENV_VAR, "1")
    assert moe_op.custom_op_active()
    monkeypatch.setenv(moe_op.ENV_VAR, "0")
    assert not moe_op.custom_op_active()
    moe_op.use_custom_op(True)  # the call beats the environment
    assert moe_op.custom_op_active()
    moe_op.use_custom_op(None)
    monkeypatch.setenv(moe_op.ENV_VAR, "sometimes")
    with pytest.raises(ValueError, match="SPLITMOE_MOE_CUSTOM_OP='sometimes': expected 1, 0 or auto"):
        moe_op.custom_op_active()


def test_op_reports_an_unavailable_backend_before_work():
    tt = _tensors("k1", 0, False)
    with pytest.raises(RuntimeError, match=r"grouped_mm.*float64"):
        moe_op.split_lora_experts_op(tt["x"].double(), tt["expert_ids"], tt["expert_weights"].double(),
                                     tt["w_gate_up"].double(), tt["w_down"].double(), backend="grouped_mm")


# ---- a whole model: eager, through the op, and with its decoder layers compiled --------------------------------------

def _tiny_qwen3(backend: str, **overrides):
    return _tiny_model("qwen3_moe", backend, **overrides)


def _tiny_model(family: str, backend: str, **overrides):
    cfg = ModelConfig.from_hf(tiny_hf_config(family, **overrides))
    model = build_model(cfg, moe_backend=backend)
    tensors = random_canonical_tensors(cfg, seed=3)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(torch.from_numpy(tensors[name]))
    lora = LoraConfig(rank=4, alpha=8.0, targets=("q_proj", "o_proj", "experts.gate_up_proj", "experts.down_proj"))
    attach_lora(model, lora, seed=3)
    with torch.no_grad():
        for name, p in _lora_params(model).items():
            if "lora_B" in name:
                p.normal_(0.0, 0.05, generator=torch.Generator().manual_seed(len(name)))  # B = 0 at init
    return model.train()


def _loss_and_grads(model, ids):
    for p in model.parameters():
        p.grad = None
    loss = model(ids, labels=ids).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in _lora_params(model).items()}


def _check_model(loss, grads, loss_ref, grads_ref, what: str) -> None:
    assert_close(loss, loss_ref, dtype="float32", quantity="loss", name=f"{what} loss")
    assert grads.keys() == grads_ref.keys() and any("experts" in n for n in grads)
    for name in grads:
        assert float(grads_ref[name].abs().max()) > 0, f"zero gradient for {name}: the test proves nothing"
        assert_close(grads[name], grads_ref[name], dtype="float32", quantity="lora_grad", name=f"{what} d {name}")


def test_model_through_the_op_equals_eager(seed):
    """Experts.forward routed through the op in eager mode (use_custom_op): the model's loss and LoRA gradients."""
    model = _tiny_qwen3("auto")
    ids = torch.randint(0, model.config.vocab_size, (2, 11), generator=torch.Generator().manual_seed(seed))
    loss_ref, grads_ref = _loss_and_grads(model, ids)
    moe_op.use_custom_op(True)
    _check_model(*_loss_and_grads(model, ids), loss_ref, grads_ref, "custom op")


@pytest.mark.parametrize("family", ["qwen3_moe", "gpt_oss"])
def test_compiled_decoder_layers_fullgraph_equal_eager(family, seed):
    """Regional compilation with fullgraph=True (a graph break raises) of both layers: loss and LoRA gradients as
    eager, with and without activation checkpointing around the compiled layers (the benchmark's --compile runs
    both). Dynamo and AOTAutograd are the parts that meet the op (its fake and its backward); the aot_eager backend
    runs them without inductor's C++ compile (30 s cold for the two graphs here, layer 0's input needing no grad).
    gpt-oss: a sliding layer (query blocks) and a full one, whose sink attention is causal over S queries and S + 1
    keys: `causal_lower_right`, the eager full layer's mask, once broke the graph in every full layer."""
    model = _tiny_model(family, "auto")
    if family == "gpt_oss":
        assert tuple(model.config.layer_types) == ("sliding_attention", "full_attention")
    ids = torch.randint(0, model.config.vocab_size, (2, 11), generator=torch.Generator().manual_seed(seed))
    loss_ref, grads_ref = _loss_and_grads(model, ids)
    torch._dynamo.reset()
    compile_decoder_layers(model, fullgraph=True, dynamic=False, backend="aot_eager")
    _check_model(*_loss_and_grads(model, ids), loss_ref, grads_ref, "compiled")
    model.gradient_checkpointing_enable()
    _check_model(*_loss_and_grads(model, ids), loss_ref, grads_ref, "compiled + checkpointed")


@pytest.mark.parametrize("offload", [False, True], ids=["checkpoint", "offloaded_checkpoint"])
def test_compiled_layers_with_routing_stats_fullgraph_equal_eager(offload, seed):
    """With routing statistics on (`enable_routing_stats`, what train.routing_stats does), a Qwen3 layer compiles
    with fullgraph=True (the in-backward check once broke the graph in every MoE layer) and leaves eager's
    statistics; checkpointed, the recompute in the backward computes none (the dict the forward left survives the
    backward, as in eager mode; it is a graph of its own, guarded on `in_layer_recompute`), and a second step
    recompiles nothing."""
    from torch_impl.routing_stats import enable_routing_stats, routing_stats_of

    model = _tiny_qwen3("auto")
    blocks = enable_routing_stats(model)
    ids = torch.randint(0, model.config.vocab_size, (2, 11), generator=torch.Generator().manual_seed(seed))
    loss_ref, grads_ref = _loss_and_grads(model, ids)
    stats_ref = routing_stats_of(model)
    assert all(s is not None for s in stats_ref)
    for _, b in blocks:
        b.routing_stats = None

    def step(what):
        _check_model(*_loss_and_grads(model, ids), loss_ref, grads_ref, what)
        for layer, (ref, got) in enumerate(zip(stats_ref, routing_stats_of(model))):
            assert got is not None and got.keys() == ref.keys(), (what, layer)
            for k in ref:
                assert_close(got[k], ref[k], dtype="float32", quantity="routing_stats", name=f"{what} {layer} {k}")

    torch._dynamo.reset()
    compile_decoder_layers(model, fullgraph=True, dynamic=False, backend="aot_eager")
    step("compiled")
    model.gradient_checkpointing_enable(offload_to_cpu=offload)
    step("compiled + checkpointed")
    # the whole recompute (no early stop): otherwise it ends once the backward has its tensors, before a compiled
    # graph's attribute writes are replayed, and statistics it computed would go unseen here
    for _ in range(2):  # the second step with no recompile
        with torch._dynamo.config.patch(error_on_recompile=_ > 0), \
                torch.utils.checkpoint.set_checkpoint_early_stop(False):
            for p in model.parameters():
                p.grad = None
            loss = model(ids, labels=ids).loss
            left = [b.routing_stats for _, b in blocks]
            loss.backward()  # recomputes each layer's forward
            assert all(b.routing_stats is s for (_, b), s in zip(blocks, left)), "the recompute computed statistics"


def _grouped_mm_calls(fn) -> int:
    """How many grouped GEMMs `fn()` runs: the experts' work, forward and backward."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        fn()
    return sum(e.name == "aten::_grouped_mm" for e in prof.events())


def test_compiled_checkpointed_step_does_eager_work_without_recompiles(seed):
    """A checkpointed model with compiled layers, as the benchmark's --compile and the Trainer run it (fullgraph=True,
    so that a graph break raises):
    - two graphs in all (layer 0, whose input needs no grad, and one for layers 1 and 2: a single code object), and
      none recompiled by a second step, across layers or by the checkpoint's recompute (error_on_recompile);
    - the experts run as many grouped GEMMs per step as in eager mode: the op's backward takes the residuals of its
      forward (it once recomputed the expert forward: three per layer and step against eager's two);
    - loss and LoRA gradients equal eager's."""
    _skip_unless_available("grouped_mm")
    model = _tiny_qwen3("grouped_mm", num_hidden_layers=3)
    model.gradient_checkpointing_enable()
    ids = torch.randint(0, model.config.vocab_size, (2, 11), generator=torch.Generator().manual_seed(seed))
    loss_ref, grads_ref = _loss_and_grads(model, ids)
    eager_gemms = _grouped_mm_calls(lambda: _loss_and_grads(model, ids))
    torch._dynamo.reset()
    counters = torch._dynamo.utils.counters
    counters.clear()
    compile_decoder_layers(model, fullgraph=True, backend="aot_eager")
    _check_model(*_loss_and_grads(model, ids), loss_ref, grads_ref, "compiled step 1")
    assert counters["stats"]["unique_graphs"] == 2, dict(counters["stats"])
    with torch._dynamo.config.patch(error_on_recompile=True):
        gemms = _grouped_mm_calls(lambda: _check_model(*_loss_and_grads(model, ids), loss_ref, grads_ref,
                                                       "compiled step 2"))
    assert gemms == eager_gemms, f"the compiled step ran {gemms} grouped GEMMs, eager {eager_gemms}"


def test_compiled_layer_takes_a_second_length_without_graph_break(seed):
    """A second sequence length in one process (the benchmark runs 4K, then 16K) recompiles the layer once, with a
    dynamic length, still in one graph (fullgraph=True): SDPA's `is_causal` from the symbolic length once broke it
    there, in every layer. Loss and LoRA gradients equal eager's at both lengths."""
    _skip_unless_available("grouped_mm")
    model = _tiny_qwen3("grouped_mm", num_hidden_layers=1)
    model.gradient_checkpointing_enable()
    gen = torch.Generator().manual_seed(seed)
    batches = [torch.randint(0, model.config.vocab_size, (2, S), generator=gen) for S in (11, 13)]
    refs = [_loss_and_grads(model, ids) for ids in batches]
    torch._dynamo.reset()
    compile_decoder_layers(model, fullgraph=True, backend="aot_eager")
    for ids, (loss_ref, grads_ref) in zip(batches, refs):
        _check_model(*_loss_and_grads(model, ids), loss_ref, grads_ref, f"compiled, length {ids.shape[1]}")


def test_inductor_compiled_layer_fullgraph_equals_eager(seed):
    """One decoder layer through inductor (`torch.compile`'s default backend, what the benchmark's --compile runs):
    the fused attention, norms and router around the op give eager's loss and LoRA gradients within fp32
    tolerance. ~17 s cold on 2 cores, mostly inductor's C++ compile of the forward and backward graphs."""
    model = _tiny_qwen3("auto", num_hidden_layers=1)
    ids = torch.randint(0, model.config.vocab_size, (2, 11), generator=torch.Generator().manual_seed(seed))
    loss_ref, grads_ref = _loss_and_grads(model, ids)
    torch._dynamo.reset()
    compile_decoder_layers(model, fullgraph=True, dynamic=False)  # the one layer
    _check_model(*_loss_and_grads(model, ids), loss_ref, grads_ref, "inductor")


def test_compile_decoder_layers_refuses_a_model_without_layers():
    with pytest.raises(ValueError, match="no decoder layers"):
        compile_decoder_layers(torch.nn.Linear(2, 2))


def test_trainer_compiles_its_decoder_layers_when_asked(tmp_path):
    """Trainer(compile=True) (`splitmoe train --compile`) compiles each decoder layer (the numbers of a compiled
    layer are test_compiled_decoder_layers_fullgraph_equal_eager's); with cuda_graph it is a configuration (the
    compiled layers captured in the graph, session 13's fastest 4K steps), not a conflict: on a CPU only the device is
    refused, with its fix; JAX (always jitted) refuses the flag."""
    from shared_math.train_config import load_run_config
    from splitmoe.cli import main
    from torch_impl.train import Trainer

    cfg = load_run_config(None, [f"train.out_dir={tmp_path / 'run'}", "train.steps=1"])
    tr = Trainer(cfg, compile=True)
    assert all(layer._compiled_call_impl is not None for layer in tr.model.layers)
    assert Trainer(cfg, run=tr.run).model.layers[0]._compiled_call_impl is None
    with pytest.raises(ValueError, match="cuda_graph=True needs a CUDA device.*pass device='cuda'"):
        Trainer(cfg, run=tr.run, compile=True, cuda_graph=True)
    assert main(["train", "--framework", "jax", "--compile", "--out", str(tmp_path / "jax")]) == 2
