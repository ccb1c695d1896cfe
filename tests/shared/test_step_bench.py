"""The step benchmark's own logic (benchmarks/step.py): presets of every family, the longest-context search, and
rows that record a failure instead of dropping it."""

from __future__ import annotations

import json

import numpy as np
import pytest

from shared_math.config import ModelConfig
from shared_math.presets import PRESETS, preset_hf_config, preset_names


@pytest.mark.parametrize("family", list(PRESETS))
def test_every_preset_is_a_valid_config_and_truncates(family):
    for preset in preset_names(family):
        cfg = ModelConfig.from_hf(preset_hf_config(family, preset, layers=2))
        assert cfg.num_hidden_layers == 2 and cfg.family == family
    with pytest.raises(ValueError, match="unknown preset"):
        preset_hf_config(family, "no-such-size")


def _search(limit: int, start: int, cap: int, step: int):
    torch = pytest.importorskip("torch")  # noqa: F841 - benchmarks.step imports torch
    from benchmarks.step import max_context

    tried = []

    def probe(S):
        tried.append(S)
        return {"seq": S, **({"error": "OOM"} if S > limit else {})}

    best, rows = max_context(probe, start, cap, step)
    return best, tried, rows


@pytest.mark.parametrize("limit", [4096, 5000, 12288, 40000, 10**9])
def test_max_context_doubles_then_bisects_to_the_step(limit):
    best, tried, rows = _search(limit, start=4096, cap=65536, step=1024)
    expected = min(limit, 65536) // 1024 * 1024
    assert best == expected and len(rows) == len(tried)
    assert tried[:2] == [4096, 8192] and len(tried) <= 4 + 6  # log2(cap/start) doublings + log2(range/step) halvings


@pytest.mark.parametrize("limit", [1000, 1024, 3000, 40000])
def test_max_context_halves_when_the_first_length_fails(limit):
    """A start that does not train: halving down to one step until a length does, then bisecting up to the step;
    None when not even one step of tokens trains."""
    best, tried, _ = _search(limit, start=65536 if limit == 40000 else 4096, cap=262144, step=1024)
    expected = limit // 1024 * 1024 or None
    assert best == expected
    if limit == 1000:
        assert tried == [4096, 2048, 1024]
    if limit == 40000:
        assert tried[:2] == [65536, 32768] and 32768 < max(S for S in tried if S <= limit) == 39936


def test_a_row_that_cannot_build_is_recorded(tmp_path):
    """unsloth is not installed on the CI machine: its row says so instead of disappearing."""
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    import importlib.util

    if importlib.util.find_spec("unsloth") is not None:
        pytest.skip("unsloth is installed here")
    from benchmarks.step import main

    out = tmp_path / "rows.jsonl"
    assert main(["--family", "qwen3_moe", "--preset", "tiny", "--device", "cpu", "--seq", "16", "--impls", "unsloth",
                 "--out", str(out)]) == 1
    (row,) = [json.loads(line) for line in out.read_text().splitlines()]
    assert row["impl"] == "unsloth" and row["step_ms"] is None and "unsloth-wheels.sh" in row["error"]


def _torch_rows(tmp_path, args: list[str]):
    """step.main(args + a torch_impl row to a file) -> (the rows, the model the row built)."""
    import benchmarks.step as step

    built = {}
    real_build = step.build_ours

    def build_and_keep(*a, **kw):
        built["model"], loss_fn = real_build(*a, **kw)
        return built["model"], loss_fn

    out = tmp_path / "rows.jsonl"
    step.build_ours = build_and_keep
    try:
        assert step.main([*args, "--impls", "torch_impl", "--out", str(out)]) == 0
    finally:
        step.build_ours = real_build
    return [json.loads(line) for line in out.read_text().splitlines()], built["model"]


def test_torch_max_context_warms_up_before_the_first_probe(tmp_path, monkeypatch):
    """An in-process search runs one untimed step at min(start, 4096) tokens before its first probe (a fresh
    process's first step carries one-time work: 5.4 GiB more at 196,608 tokens on an H100), and emits only probes
    and the result."""
    pytest.importorskip("torch")
    import benchmarks.step as step

    seen = []
    real = step._try_step
    monkeypatch.setattr(step, "_try_step", lambda model, loss_fn, S, *a, **kw: seen.append(S)
                        or real(model, loss_fn, S, *a, **kw))
    monkeypatch.setattr(step, "MAX_CONTEXT_WARMUP_TOKENS", 16)
    out = tmp_path / "rows.jsonl"
    assert step.main(["--family", "qwen3_moe", "--preset", "tiny", "--layers", "1", "--device", "cpu",
                      "--max-context", "--seq", "32", "--max-seq", "64", "--context-step", "16",
                      "--impls", "torch_impl", "--out", str(out)]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert seen == [16, 32, 64]  # the warm-up at min(32, 16), then the probes
    assert [r["mode"] for r in rows] == ["max_context_probe", "max_context_probe", "max_context"]
    assert rows[-1]["max_context"] == 64


def test_in_backward_optimizer_rows_leave_no_hooks_behind(tmp_path):
    """--optim-in-backward: each measurement registers its per-tensor hooks and removes them, so the second length
    (and the untimed first step) do not update the LoRA tensors twice per backward."""
    torch = pytest.importorskip("torch")
    rows, model = _torch_rows(tmp_path, ["--family", "qwen3_moe", "--preset", "tiny", "--device", "cpu", "--seq",
                                         "16,24", "--iters", "1", "--warmup", "1", "--optim-in-backward"])
    assert [r["seq"] for r in rows] == [16, 24] and all(r["optim_in_backward"] and r["step_ms"] > 0 for r in rows)
    assert all(len(r["step_ms_runs"]) == 1 and r["step_ms"] == pytest.approx(r["step_ms_runs"][0], abs=0.01)
               for r in rows)  # every timed step is kept beside the median
    params = [p for p in model.parameters() if p.requires_grad]
    assert params and all(not p._post_accumulate_grad_hooks for p in params)
    assert all(p.grad is None for p in params) and all(torch.isfinite(p).all() for p in params)


def test_expert_chunk_rows_tile_the_experts(tmp_path):
    """--expert-chunk N: the torch_impl row's experts run in N-token chunks (every MoE layer's `token_chunk`), and
    the row says so."""
    pytest.importorskip("torch")
    from torch_impl.moe import Experts

    rows, model = _torch_rows(tmp_path, ["--family", "gpt_oss", "--preset", "tiny", "--device", "cpu", "--seq", "24",
                                         "--iters", "1", "--warmup", "1", "--expert-chunk", "8"])
    assert len(rows) == 1 and rows[0]["expert_chunk"] == 8 and rows[0]["step_ms"] > 0
    experts = [m for m in model.modules() if isinstance(m, Experts)]
    assert experts and all(m.token_chunk == 8 for m in experts)


@pytest.mark.parametrize("impl", ["torch_impl", "jax_impl"])
def test_checkpoint_layers_rows_checkpoint_the_first_layers(impl, tmp_path, monkeypatch):
    """--checkpoint-layers N: the row's model checkpoints only its first N decoder layers, and the row says so."""
    pytest.importorskip("torch")
    if impl == "jax_impl":
        pytest.importorskip("jax")
        pytest.importorskip("optax")
    import benchmarks.step as step

    built = {}
    if impl == "torch_impl":
        real_build = step.build_ours

        def build_and_keep(*a, **kw):
            built["model"], loss_fn = real_build(*a, **kw)
            return built["model"], loss_fn

        monkeypatch.setattr(step, "build_ours", build_and_keep)
    else:
        from benchmarks.step_jax import JaxStep

        real_init = JaxStep.__init__

        def init_and_keep(self, *a, **kw):
            real_init(self, *a, **kw)
            built["model"] = self.model

        monkeypatch.setattr(JaxStep, "__init__", init_and_keep)
    out = tmp_path / "rows.jsonl"
    assert step.main(["--family", "qwen3_moe", "--preset", "tiny", "--layers", "2", "--device", "cpu", "--seq", "16",
                      "--iters", "1", "--warmup", "0", "--checkpoint-layers", "1", "--impls", impl,
                      "--out", str(out)]) == 0
    (row,) = [json.loads(line) for line in out.read_text().splitlines()]
    assert row["checkpoint_layers"] == 1 and row["step_ms"] > 0 and not row.get("error")
    assert built["model"].gradient_checkpointing and built["model"].checkpoint_layers == 1


def test_compile_arguments_reach_torch_compile(tmp_path, monkeypatch, capsys):
    """--compile-mode / --compile-cpp-wrapper: the layers are compiled with that mode or inductor option and the row
    records it (compilation stood in for: the arguments are all this checks); each is refused without --compile, and
    the two together (torch.compile takes a mode or options); a mode that records CUDA graphs is refused with any
    layer checkpointed."""
    pytest.importorskip("torch")
    import benchmarks.step as step
    import torch_impl.compile

    seen = []

    def record(model, **kwargs):
        seen.append(kwargs)
        return model

    monkeypatch.setattr(torch_impl.compile, "compile_decoder_layers", record)
    out = tmp_path / "rows.jsonl"
    args = ["--family", "qwen3_moe", "--preset", "tiny", "--layers", "1", "--device", "cpu", "--seq", "16", "--iters",
            "1", "--warmup", "0", "--impls", "torch_impl", "--out", str(out), "--compile"]
    assert step.main([*args, "--compile-mode", "reduce-overhead", "--checkpoint-layers", "0"]) == 0
    assert step.main(args) == 0
    assert step.main([*args, "--compile-cpp-wrapper"]) == 0
    assert seen == [{"mode": "reduce-overhead"}, {}, {"options": {"cpp_wrapper": True}}]
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["compile_mode"] for r in rows] == ["reduce-overhead", None, None] and all(r["step_ms"] > 0 for r in rows)
    assert [r["compile_cpp_wrapper"] for r in rows] == [False, False, True]
    for bad, why in ((["--compile-mode", "reduce-overhead"], "it needs --compile"),
                     (["--compile-cpp-wrapper"], "give --compile and no --compile-mode"),
                     (["--compile", "--compile-cpp-wrapper", "--compile-mode", "max-autotune"], "not beside one"),
                     # cudagraph modes inside checkpointing's recompute: pytorch#154306, on the H100 in session 13
                     (["--compile", "--compile-mode", "reduce-overhead"], "pytorch/pytorch#154306"),
                     (["--compile", "--compile-mode", "max-autotune", "--checkpoint-layers", "3"], "--cuda-graph")):
        with pytest.raises(SystemExit):
            step.parse_args(["--family", "qwen3_moe", *bad])
        assert why in capsys.readouterr().err


def test_checkpoint_layers_needs_checkpointing(capsys):
    pytest.importorskip("torch")
    from benchmarks.step import parse_args

    with pytest.raises(SystemExit):
        parse_args(["--checkpoint-layers", "1", "--no-grad-ckpt"])
    assert ("--checkpoint-layers 1 says how many decoder layers are checkpointed, and --no-grad-ckpt checkpoints "
            "none: drop one of them") in capsys.readouterr().err
    with pytest.raises(SystemExit):
        parse_args(["--checkpoint-layers", "-1"])
    assert "--checkpoint-layers must be >= 0" in capsys.readouterr().err
    assert parse_args([]).checkpoint_layers is None


def test_jax_row_trains_the_tiny_preset_on_cpu(tmp_path, monkeypatch):
    """--impls jax_impl on the CPU (one layer, one length: compiling the step takes ~8 s of a CPU): the row has its
    step time, compile time, XLA's planned peak and the SPLITMOE_* switches it ran with; the jitted step donates the
    LoRA and optimizer buffers (the old ones are gone), updates every LoRA tensor and returns the loss of the model's
    own forward."""
    pytest.importorskip("torch")  # benchmarks.step imports torch
    jax = pytest.importorskip("jax")
    pytest.importorskip("optax")
    import benchmarks.step as step
    from benchmarks.step_jax import JaxStep

    built = {}
    real_init = JaxStep.__init__

    def init_and_keep(self, *args, **kwargs):
        real_init(self, *args, **kwargs)
        built["runner"] = self

    out = tmp_path / "rows.jsonl"
    monkeypatch.setenv("SPLITMOE_JAX_SINK_LSE", "0")  # no effect on CPU (a cuDNN path): only recorded
    JaxStep.__init__ = init_and_keep
    try:
        assert step.main(["--family", "gpt_oss", "--preset", "tiny", "--layers", "1", "--device", "cpu", "--seq",
                          "16", "--iters", "2", "--warmup", "1", "--impls", "jax_impl", "--out", str(out)]) == 0
    finally:
        JaxStep.__init__ = real_init
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["seq"] for r in rows] == [16] and not any(r.get("error") for r in rows)
    for r in rows:
        assert r["impl"] == "jax_impl" and r["step_ms"] > 0 and r["compile_s"] > 0
        assert len(r["step_ms_runs"]) == 2 and min(r["step_ms_runs"]) <= r["step_ms"] <= max(r["step_ms_runs"])
        assert r["first_step_s"] >= r["compile_s"] and r["peak_gib"] == r["compiled_peak_gib"] > 0
        assert r["jax_attn"] == "literal" and r["jax_remat"] == "small_dots" and r["backend"] == "ragged_dot"
        assert r["switches"]["SPLITMOE_JAX_SINK_LSE"] == "0"
    runner = built["runner"]
    assert runner.model.gradient_checkpointing and runner.model.checkpoint_policy is not None
    from flax import nnx

    from shared_math.numerics import assert_close

    ids = jax.numpy.asarray(np.arange(16, dtype=np.int32)[None] * 7 % 128)
    before = runner.lora
    # copies (np.asarray of a CPU array is a view, which would pin the buffer and stop its donation)
    before_host = jax.tree.map(lambda x: np.array(x, copy=True), before)
    want = jax.jit(lambda lora, frozen, ids: nnx.merge(runner.graphdef, lora, frozen, copy=True)(
        ids, labels=ids).loss)(before, runner.frozen, ids)  # the materialised-logits loss of the same state
    loss = runner.run(ids)
    assert_close(loss, want, dtype="bfloat16", quantity="loss", name="the step's loss vs the model's forward")
    assert all(x.is_deleted() for x in jax.tree.leaves(before))  # donated: the update reused the old buffers
    changed = [not np.array_equal(a, np.asarray(b)) for a, b in zip(jax.tree.leaves(before_host),
                                                                   jax.tree.leaves(runner.lora))]
    assert all(changed) and runner.lora_params == rows[0]["lora_params"] > 0


def test_jax_max_context_probes_each_length_in_its_own_process(tmp_path, monkeypatch):
    """`--max-context --impls jax_impl` runs every probe in a fresh process (an allocator that ran out of memory at
    one length failed a shorter one on the GPU): this process builds no JaxStep, and the probe rows carry the child's
    measurement and XLA's plan."""
    pytest.importorskip("torch")
    pytest.importorskip("jax")
    pytest.importorskip("optax")
    import benchmarks.step as step
    from benchmarks.step_jax import JaxStep

    def refuse(self, *args, **kwargs):
        raise AssertionError("a probe ran in the searching process")

    monkeypatch.setattr(JaxStep, "__init__", refuse)
    out = tmp_path / "rows.jsonl"
    assert step.main(["--family", "qwen3_moe", "--preset", "tiny", "--layers", "1", "--device", "cpu",
                      "--max-context", "--seq", "16", "--max-seq", "32", "--context-step", "16", "--impls", "jax_impl",
                      "--out", str(out)]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    probes = [r for r in rows if r["mode"] == "max_context_probe"]
    assert [r["seq"] for r in probes] == [16, 32] and rows[-1]["max_context"] == 32
    assert all(r["step_ms"] > 0 and r["compiled_temp_gib"] > 0 and not r.get("error") for r in probes)



def test_jax_row_records_that_offload_is_not_its_own(tmp_path):
    """`--offload` is the torch rows': a jax_impl row of the same command runs without it and says offload=false."""
    pytest.importorskip("torch")
    pytest.importorskip("jax")
    pytest.importorskip("optax")
    import benchmarks.step as step

    out = tmp_path / "rows.jsonl"
    assert step.main(["--family", "qwen3_moe", "--preset", "tiny", "--layers", "1", "--device", "cpu", "--seq", "16",
                      "--iters", "1", "--warmup", "0", "--offload", "--impls", "jax_impl", "--out", str(out)]) == 0
    (row,) = [json.loads(line) for line in out.read_text().splitlines()]
    assert row["offload"] is False and row["step_ms"] > 0


def test_graph_rows_report_the_reserved_peak(monkeypatch):
    """A step replayed from CUDA graphs keeps its activations in the graphs' private pool, which the allocated count
    misses (session 13: 48.35 GiB read for both 24- and 14-layer checkpointing); its peak is the reserved one, named
    as such, and every row carries both. The allocator's statistics are stood in for on the CPU."""
    pytest.importorskip("torch")
    import torch

    import benchmarks.step as step

    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda *a, **k: 48 * 2**30)
    monkeypatch.setattr(torch.cuda, "max_memory_reserved", lambda *a, **k: 52 * 2**30)
    assert step.step_peak(False) == dict(peak_gib=48.0, peak_reserved_gib=52.0, peak_measure="allocated")
    assert step.step_peak(True) == dict(peak_gib=52.0, peak_reserved_gib=52.0, peak_measure="reserved")
