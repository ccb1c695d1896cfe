"""Bad input to the notebook API and to `splitmoe bench step | block` (an adversarial review): each gets a clear
error naming the argument, never a silent wrong answer, a half-overwritten adapter or a junk row in --out.

- split_lora_experts (torch_impl and jax_impl): float or bool expert ids (truncated to other experts), an integer x
  (jax: an all-zero int y), a NaN / inf LoRA scale (all-NaN y), K = 0 or E = 0 (torch: ZeroDivisionError /
  histc), LoRA pairs of 1 or 3 tensors (IndexError / the third ignored), and in jax_impl the fused Pallas entry,
  which skipped the range check of eager ids (rows of other experts, or NaN).
- load_model (both): a non-float dtype (jax: every weight rounded to an integer, silently; torch: errors naming
  neither the argument nor the fix).
- load_lora_state_dict (both): a shape mismatch found half-way left the adapters half overwritten.
- benchmarks/step.py: --seq 0 (traceback), negative --seq / --iters 0 / unknown --backend (error rows in --out,
  exit 0), --seq abc (a message naming no option), --warmup -1 (accepted).
- benchmarks/moe_block.py: unknown --cases (KeyError traceback after earlier rows were written) and --impls
  (error rows), malformed --merge files (messages naming no file, KeyError), a --markdown that is a --merge input.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from tests.conftest import requires_jax, requires_torch

T, H, I, E, K, R = 5, 16, 16, 4, 2, 4
IDS = np.array([[0, 1], [2, 3], [1, 2], [3, 0], [0, 2]])


def _args(rng: np.random.Generator) -> dict[str, np.ndarray]:
    def f(*s):
        return rng.standard_normal(s).astype(np.float32)

    return dict(x=f(T, H), expert_ids=IDS, expert_weights=rng.random((T, K)).astype(np.float32),
                w_gate_up=f(E, H, 2 * I), w_down=f(E, I, H), lora_gate_up=(f(E, H, R), f(E, R, 2 * I)),
                lora_down=(f(E, I, R), f(E, R, H)))


def _torch():
    import torch

    from torch_impl.moe import split_lora_experts

    return split_lora_experts, lambda a, dt=None: torch.as_tensor(a if dt is None else a.astype(dt))


def _jax():
    import jax.numpy as jnp

    from jax_impl.moe import split_lora_experts

    return split_lora_experts, lambda a, dt=None: jnp.asarray(a if dt is None else a.astype(dt))


FRAMEWORKS = [pytest.param(_torch, id="torch", marks=requires_torch),
              pytest.param(_jax, id="jax", marks=requires_jax)]

BAD = {  # name -> (change of the numpy arguments, the error's words)
    "float ids": (lambda a: {"expert_ids": a["expert_ids"].astype(np.float32) + 0.5}, "expert_ids must be an integer"),
    "bool ids": (lambda a: {"expert_ids": a["expert_ids"] > 1}, "expert_ids must be an integer"),
    "integer x": (lambda a: {"x": a["x"].astype(np.int32), "w_gate_up": a["w_gate_up"].astype(np.int32),
                             "w_down": a["w_down"].astype(np.int32)}, "x must be a floating-point"),
    "K = 0": (lambda a: {"expert_ids": a["expert_ids"][:, :0], "expert_weights": a["expert_weights"][:, :0]},
              "K >= 1"),
    "E = 0": (lambda a: {"w_gate_up": a["w_gate_up"][:0], "w_down": a["w_down"][:0], "lora_gate_up": None,
                         "lora_down": None}, "E must be >= 1"),
    "LoRA pair of one": (lambda a: {"lora_gate_up": a["lora_gate_up"][:1]}, "lora_gate_up must be a pair"),
    "LoRA pair of three": (lambda a: {"lora_down": (*a["lora_down"], a["lora_down"][1])}, "lora_down must be a pair"),
}


def _call(fw, changes: dict, **kw):
    fn, conv = fw()
    a = {**_args(np.random.default_rng(0)), **changes}

    def c(v):
        return None if v is None else tuple(conv(t) for t in v) if isinstance(v, tuple) else conv(v)

    return fn(c(a["x"]), c(a["expert_ids"]), c(a["expert_weights"]), c(a["w_gate_up"]), c(a["w_down"]),
              c(a["lora_gate_up"]), c(a["lora_down"]), **kw)


@pytest.mark.parametrize("fw", FRAMEWORKS)
@pytest.mark.parametrize("what", list(BAD))
def test_split_lora_experts_names_bad_dtypes_and_sizes(fw, what):
    change, words = BAD[what]
    with pytest.raises(ValueError, match=words):
        _call(fw, change(_args(np.random.default_rng(0))))


@pytest.mark.parametrize("fw", FRAMEWORKS)
@pytest.mark.parametrize("scale", [float("nan"), float("inf"), "two"])
def test_split_lora_experts_refuses_a_scale_that_is_not_a_finite_number(fw, scale):
    with pytest.raises(ValueError, match="scale must be a finite number"):
        _call(fw, {}, scale=scale)


@pytest.mark.parametrize("fw", FRAMEWORKS)
def test_an_empty_batch_still_gives_an_empty_output(fw):
    a = _args(np.random.default_rng(0))
    y = _call(fw, {"x": a["x"][:0], "expert_ids": a["expert_ids"][:0], "expert_weights": a["expert_weights"][:0]})
    assert tuple(y.shape) == (0, H)


@requires_jax
@pytest.mark.parametrize("shift", [1, -1])
def test_jax_fused_pallas_entry_checks_the_range_of_eager_ids(monkeypatch, shift):
    """The fused entry sorts by itself; it skipped sort_by_expert's check and gave other experts' rows or NaN."""
    monkeypatch.setenv("SPLITMOE_PALLAS_INTERPRET", "1")
    with pytest.raises(ValueError, match=r"expert ids must lie in \[0, 4\)"):
        _call(_jax, {"expert_ids": IDS + shift}, backend="pallas_triton")


@requires_jax
@pytest.mark.parametrize("backend", ["ragged_dot", "pallas_triton"])
def test_jax_out_of_range_ids_under_jit_give_nan_rows_not_other_experts_rows(monkeypatch, backend):
    """Under jit there are no values to check: a token with an id outside [0, E) gets a NaN row (its weights are
    poisoned), every other token its exact row; before, the bad token silently got other experts' rows (or NaN
    from the fused entry). Gradients of the good tokens stay finite."""
    import jax
    import jax.numpy as jnp

    from jax_impl.moe import split_lora_experts

    monkeypatch.setenv("SPLITMOE_PALLAS_INTERPRET", "1")
    a = {k: (tuple(map(jnp.asarray, v)) if isinstance(v, tuple) else jnp.asarray(v))
         for k, v in _args(np.random.default_rng(0)).items()}
    bad = a["expert_ids"].at[1, 0].set(E).at[3, 1].set(-1)  # tokens 1 and 3

    def f(ids, x):
        return split_lora_experts(x, ids, a["expert_weights"], a["w_gate_up"], a["w_down"], a["lora_gate_up"],
                                  a["lora_down"], backend=backend)

    good_y, bad_y = jax.jit(f)(a["expert_ids"], a["x"]), jax.jit(f)(bad, a["x"])
    assert bool(jnp.isnan(bad_y[jnp.array([1, 3])]).all())
    keep = jnp.array([0, 2, 4])
    np.testing.assert_array_equal(np.asarray(bad_y[keep]), np.asarray(good_y[keep]))
    dx = jax.jit(jax.grad(lambda x: f(bad, x)[keep].sum(), argnums=0))(a["x"])
    assert bool(jnp.isfinite(dx[keep]).all())
    # a router's ids skip the check (Experts passes check_ids=False): the same jitted call with good ids is exact
    np.testing.assert_array_equal(np.asarray(jax.jit(lambda ids, x: split_lora_experts(
        x, ids, a["expert_weights"], a["w_gate_up"], a["w_down"], a["lora_gate_up"], a["lora_down"],
        backend=backend, check_ids=False))(a["expert_ids"], a["x"])), np.asarray(good_y))


# ---- model loading and adapters ----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_path(tmp_path_factory):
    from shared_math.checkpoint import write_tiny_checkpoint

    return write_tiny_checkpoint("qwen3_moe", tmp_path_factory.mktemp("tiny") / "q", seed=0)


def _loaders(which: str):
    if which == "torch":
        import torch

        from torch_impl.load import load_model
        from torch_impl.lora import load_lora_state_dict, lora_state_dict

        return load_model, lora_state_dict, load_lora_state_dict, torch.int32
    import jax.numpy as jnp

    from jax_impl.load import load_model
    from jax_impl.lora import load_lora_state_dict, lora_state_dict

    return load_model, lora_state_dict, load_lora_state_dict, jnp.int32


WHICH = [pytest.param("torch", marks=requires_torch), pytest.param("jax", marks=requires_jax)]


@pytest.mark.parametrize("which", WHICH)
@pytest.mark.parametrize("bad", ["int32", "no_such_dtype"])
def test_load_model_refuses_a_dtype_that_is_not_floating(tiny_path, which, bad):
    load_model, _, _, int32 = _loaders(which)
    with pytest.raises(ValueError, match="dtype must be a floating-point dtype"):
        load_model(tiny_path, dtype=int32 if bad == "int32" else bad)


@pytest.mark.parametrize("which", WHICH)
def test_load_model_takes_a_dtype_name(tiny_path, which):
    load_model = _loaders(which)[0]
    load_model(tiny_path, dtype="bfloat16")


@pytest.mark.parametrize("which", WHICH)
def test_a_refused_lora_state_dict_leaves_the_adapters_untouched(tiny_path, which):
    from shared_math.config import LoraConfig

    load_model, lora_state_dict, load_lora_state_dict, _ = _loaders(which)
    lora = LoraConfig(rank=4, alpha=8, targets=("q_proj", "experts.gate_up_proj", "experts.down_proj"))
    model = load_model(tiny_path, lora=lora, lora_seed=0)
    before = {n: v.copy() for n, v in lora_state_dict(model).items()}  # torch: views of the parameters
    names = list(before)  # the order both implementations copy in
    bad = {n: np.full_like(v, 7.0) for n, v in before.items()}
    bad[names[-1]] = np.zeros((1, 2, 3), np.float32)  # found after every other tensor was (once) copied
    with pytest.raises(ValueError, match="shape"):
        load_lora_state_dict(model, bad)
    after = lora_state_dict(model)
    assert [n for n in names if not np.array_equal(after[n], before[n])] == []


@pytest.mark.parametrize("which", WHICH)
def test_lora_state_dict_is_a_snapshot_not_a_view(tiny_path, which):
    """torch_impl's were views of fp32 CPU parameters: a state dict kept as a snapshot changed with the model."""
    from shared_math.config import LoraConfig

    load_model, lora_state_dict, load_lora_state_dict, _ = _loaders(which)
    model = load_model(tiny_path, lora=LoraConfig(rank=4, alpha=8, targets=("q_proj",)), lora_seed=0)
    snap = lora_state_dict(model)
    kept = {n: v.copy() for n, v in snap.items()}
    load_lora_state_dict(model, {n: np.full_like(v, 3.0) for n, v in snap.items()})
    assert all(np.array_equal(snap[n], kept[n]) for n in snap)


# ---- benchmarks/step.py and benchmarks/moe_block.py --------------------------------------------------------------
STEP_BAD = {  # arguments -> the usage error's words
    "--seq 0": "--seq lengths must be >= 1",
    "--seq -5": "--seq lengths must be >= 1",
    "--seq abc": "--seq takes comma-separated whole numbers",
    "--seq 64,": "--seq takes comma-separated whole numbers",
    "--seq 64 --iters 0": "--iters must be >= 1",
    "--seq 64 --warmup -1": "--warmup must be >= 0",
    "--seq 64 --expert-chunk 0": "--expert-chunk must be >= 1",
    "--seq 64 --context-step 0": "--context-step must be >= 1",
    "--seq 64 --backend bogus": "--backend 'bogus' is not a torch_impl MoE backend",
    "--seq 64 --device bogus": "--device 'bogus' is not a torch device",
}


@requires_torch
@pytest.mark.parametrize("argv", list(STEP_BAD))
def test_bench_step_refuses_bad_numbers_before_writing_a_row(tmp_path, capsys, argv):
    from splitmoe.cli import main

    out = tmp_path / "rows.jsonl"
    out.write_text('{"earlier": "row"}\n')
    with pytest.raises(SystemExit) as e:
        main(["bench", "step", "--preset", "tiny", "--device", "cpu", "--impls", "torch_impl", *argv.split(),
              "--out", str(out)])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert STEP_BAD[argv] in err and "Traceback" not in err
    assert "splitmoe bench step: error:" in err
    assert out.read_text() == '{"earlier": "row"}\n'


@requires_jax
@requires_torch
def test_bench_step_refuses_an_unknown_jax_backend(capsys):
    from benchmarks.step import parse_args

    with pytest.raises(SystemExit):
        parse_args(["--preset", "tiny", "--impls", "jax_impl", "--jax-backend", "bogus", "--device", "cpu"])
    assert "--jax-backend 'bogus' is not a jax_impl MoE backend" in capsys.readouterr().err


BLOCK_BAD = {
    "--cases nope": "unknown case(s) ['nope'] in --cases",
    "--cases tiny --impls torch_foo": "unknown implementation(s) ['torch_foo'] in --impls",
    "--iters 0": "--iters must be >= 1",
}


@requires_torch
@pytest.mark.parametrize("argv", list(BLOCK_BAD))
def test_bench_block_refuses_unknown_cases_and_impls_on_any_machine(capsys, argv):
    from splitmoe.cli import main

    with pytest.raises(SystemExit) as e:
        main(["bench", "block", *argv.split()])
    assert e.value.code == 2
    assert BLOCK_BAD[argv] in capsys.readouterr().err


MERGE_BAD = {  # file content -> the usage error's words
    "not json\n": "rows.jsonl:1 is not JSON",
    '{"foo": 1}\n': "rows.jsonl:1 is not a row of moe_block.py's --out",
    '{"case": "tiny", "impl": "hf_peft", "ms": 1.0}\n': "it needs case, impl, tflops_base",
    "": "no rows in",
}


@pytest.mark.parametrize("content", list(MERGE_BAD), ids=["not-json", "no-fields", "no-tflops", "empty"])
def test_bench_block_merge_names_the_bad_file_and_line(tmp_path, capsys, content):
    from benchmarks.moe_block import main

    f = tmp_path / "rows.jsonl"
    f.write_text(content)
    with pytest.raises(SystemExit):
        main(["--merge", str(f)])
    assert MERGE_BAD[content] in capsys.readouterr().err


def test_bench_block_merge_never_overwrites_an_input(tmp_path, capsys):
    from benchmarks.moe_block import main

    f = tmp_path / "rows.jsonl"
    row = json.dumps({"case": "tiny", "impl": "hf_peft", "ms": 1.0, "tflops_base": 3.0, "dense_tflops": 10.0})
    f.write_text(row + "\n")
    with pytest.raises(SystemExit):
        main(["--merge", str(f), "--markdown", str(f)])
    assert "would overwrite it" in capsys.readouterr().err
    assert f.read_text() == row + "\n"

