"""The training test suite, written once and collected by tests/torch/test_train.py and tests/jax/test_train.py,
each of which provides the `impl` fixture (`make_impl`: its train module, load_model, load_adapter, logits).

Runs are tiny (4 rows of 64 tokens per micro-batch, a handful of steps) so both frameworks stay within CI time.
"""

from __future__ import annotations

import json
import shutil
import types

import numpy as np
import pytest

from shared_math import training
from shared_math.train_config import ConfigError, load_run_config
from shared_math.training import TrainingDiverged, latest_checkpoint

TINY = ["data.batch_size=4", "data.synthetic.num_train=300", "data.synthetic.num_eval=4", "lora.rank=4",
        "lora.alpha=8", "optim.warmup_steps=2", "train.eval_every=0", "train.log_every=1",
        "train.max_new_tokens=3", "train.keep_checkpoints=3"]


def make_impl(module, load_model, load_adapter, logits_of) -> types.SimpleNamespace:
    """What the suite needs of a framework: its train module and model loading / logits helpers."""
    return types.SimpleNamespace(module=module, FRAMEWORK=module.FRAMEWORK, Trainer=module.Trainer,
                                 train=module.train, load_model=load_model, load_adapter=load_adapter,
                                 logits_of=logits_of)


def tiny_cfg(out_dir, framework, *extra):
    return load_run_config(None, [*TINY, f"train.out_dir={out_dir}", f"framework={framework}", *extra])


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """One tiny checkpoint for the whole module (prepare_run writes it into <out_dir>/model otherwise)."""
    from shared_math.training import build_model_checkpoint

    root = tmp_path_factory.mktemp("tiny")
    return build_model_checkpoint(load_run_config(None, [f"train.out_dir={root}"]), root)


@pytest.fixture(scope="module")
def reference_run(impl, model_dir, tmp_path_factory):
    """An uninterrupted 6-step run with grad accumulation and a checkpoint every 2 steps."""
    out = tmp_path_factory.mktemp("ref")
    cfg = tiny_cfg(out, impl.FRAMEWORK, f"model.path={model_dir}", "train.steps=6", "train.save_every=2",
                   "train.grad_accum=2", "optim.weight_decay=0.01")
    return cfg, impl.train(cfg, progress=False)


def test_loss_decreases_and_outputs(impl, model_dir, tmp_path):
    cfg = tiny_cfg(tmp_path, impl.FRAMEWORK, f"model.path={model_dir}", "train.steps=16",
                   "train.save_every=0")
    res = impl.train(cfg, progress=False)
    assert len(res.losses) == 16 and all(np.isfinite(res.losses))
    assert np.mean(res.losses[-3:]) < 0.75 * np.mean(res.losses[:3]), res.losses
    assert res.evals[-1]["eval_loss"] < 0.75 * res.evals[0]["eval_loss"]
    assert set(res.evals[0]["exact_match"]) == {"all", "copy", "rev"}
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == list(range(1, 17))
    assert all("tokens_per_s" in r and "memory_mb" in r for r in rows if "loss" in r)
    assert (tmp_path / "loss.png").stat().st_size > 1000
    assert (res.adapter_dir / "adapter_config.json").is_file()


def test_kill_during_save_keeps_last_checkpoint_and_resume_equals_uninterrupted(impl, model_dir, reference_run,
                                                                               tmp_path, monkeypatch):
    ref_cfg, ref = reference_run
    cfg = tiny_cfg(tmp_path, impl.FRAMEWORK, f"model.path={model_dir}", "train.steps=6", "train.save_every=2",
                   "train.grad_accum=2", "optim.weight_decay=0.01")

    class Killed(Exception):
        pass

    real = training.write_checkpoint_atomic

    def dying_save(out_dir, step, meta, write_files, **kw):
        if step == 4:  # write the real files into the temporary folder, damage one, then "die" before the rename
            def partial(tmp):
                write_files(tmp)
                # the largest file at any depth: torch's state.safetensors, an array chunk of jax's orbax state/
                victim = max((p for p in tmp.rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
                victim.write_bytes(victim.read_bytes()[:10])
                raise Killed
            return real(out_dir, step, meta, partial, **kw)
        return real(out_dir, step, meta, write_files, **kw)

    monkeypatch.setattr(impl.module, "write_checkpoint_atomic", dying_save)
    with pytest.raises(Killed):
        impl.train(cfg, progress=False)
    monkeypatch.undo()
    assert latest_checkpoint(tmp_path).name == "step_00000002"  # the previous good checkpoint survives
    assert any(p.name.startswith(".tmp-step_00000004") for p in (tmp_path / "checkpoints").iterdir())

    res = impl.train(cfg, resume=True, progress=False)
    assert res.start_step == 2 and res.final_step == 6
    np.testing.assert_array_equal(res.losses, ref.losses[2:])  # bit-for-bit: same state, same batches
    np.testing.assert_array_equal(res.grad_norms, ref.grad_norms[2:])
    assert not any(p.name.startswith(".tmp") for p in (tmp_path / "checkpoints").iterdir())
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == [1, 2, 3, 4, 5, 6]  # steps 3-4 logged once, not twice


def test_stop_and_resume_equals_uninterrupted(impl, model_dir, reference_run, tmp_path):
    ref_cfg, ref = reference_run
    cfg = tiny_cfg(tmp_path, impl.FRAMEWORK, f"model.path={model_dir}", "train.steps=6", "train.save_every=2",
                   "train.grad_accum=2", "optim.weight_decay=0.01")
    first = impl.train(cfg, stop_after=4, progress=False)
    assert first.final_step == 4 and first.adapter_dir is None
    # resuming may change what does not affect the losses (eval cadence) but nothing else
    res = impl.train(load_run_config(None, [*TINY, f"train.out_dir={tmp_path}", f"framework={impl.FRAMEWORK}",
                                            f"model.path={model_dir}", "train.steps=6", "train.save_every=2",
                                            "train.grad_accum=2", "optim.weight_decay=0.01", "train.eval_every=3"]),
                     resume=True, progress=False)
    np.testing.assert_array_equal(first.losses + res.losses, ref.losses)
    # the resumed run's evaluations are the whole run's: its summary reads from step 0 (the first process's), not
    # from the final evaluation twice
    assert res.evals[0] == first.evals[0] and res.evals[0]["step"] == 0 and res.evals[-1]["step"] == 6
    assert [r["step"] for r in res.evals] == sorted({r["step"] for r in res.evals})


@pytest.mark.parametrize("mode", ["recompute", "offload", "recompute_keeping"])
def test_gradient_checkpointing_changes_memory_not_losses(impl, model_dir, reference_run, tmp_path, mode):
    """train.gradient_checkpointing: the first steps of the reference run again with each decoder layer recomputed in
    the backward (and, in torch, its input kept in host memory; "recompute_keeping": with the implementation's
    checkpoint policy that keeps the most, torch's attention outputs, jax's "dots"). torch recomputes the same
    kernels: equal bit for bit; XLA may fuse a rematerialised layer differently: fp32 rounding (1e-6 relative over 3
    steps)."""
    extra = ["train.steps=6", "train.save_every=0", "train.grad_accum=2", "optim.weight_decay=0.01",
             f"train.gradient_checkpointing={mode.removesuffix('_keeping')}"]
    if mode == "recompute_keeping":
        extra.append(f"train.checkpoint_policy={'attention' if impl.FRAMEWORK == 'torch' else 'dots'}")
    cfg = tiny_cfg(tmp_path, impl.FRAMEWORK, f"model.path={model_dir}", *extra)
    if impl.FRAMEWORK == "jax" and mode == "offload":
        with pytest.raises(ConfigError, match="torch_impl only; with --framework jax use "
                                              r"train.gradient_checkpointing=recompute \(and train.expert_chunk"):
            impl.Trainer(cfg)
        return
    res = impl.train(cfg, stop_after=3, progress=False)
    ref = reference_run[1].losses[:3]
    if impl.FRAMEWORK == "torch":
        np.testing.assert_array_equal(res.losses, ref)
    else:
        np.testing.assert_allclose(res.losses, ref, rtol=1e-6, atol=0)


def test_checkpoint_layers_reaches_the_model_and_is_checked_against_its_depth(impl, model_dir, tmp_path):
    """train.checkpoint_layers: the trainer checkpoints that many of the first decoder layers (its model's
    `checkpoint_layers`; the numbers are the models' tests/*/test_checkpointing.py), and a count above the tiny
    model's 3 layers is refused when the trainer is built."""
    cfg = tiny_cfg(tmp_path, impl.FRAMEWORK, f"model.path={model_dir}", "train.gradient_checkpointing=recompute",
                   "train.checkpoint_layers=1")
    model = impl.Trainer(cfg).model
    assert model.gradient_checkpointing and model.checkpoint_layers == 1
    cfg = tiny_cfg(tmp_path / "deep", impl.FRAMEWORK, f"model.path={model_dir}",
                   "train.gradient_checkpointing=recompute", "train.checkpoint_layers=4")
    with pytest.raises(ConfigError, match="train.checkpoint_layers=4 is more than this model's 3 decoder layers; "
                                          "set it to at most 3, or null to checkpoint every layer"):
        impl.Trainer(cfg)


def test_adamw_in_backward_changes_memory_not_losses(impl, model_dir, tmp_path):
    """optim.in_backward (torch): each LoRA tensor updated inside the backward gives the losses, gradient norms and
    adapter of the ordinary step bit for bit (no clip, one micro-batch, as it requires); its checkpoint resumes with
    the ordinary optimizer (one AdamW state layout), so the key may change on resume. jax_impl refuses it by name."""
    common = [f"model.path={model_dir}", "train.steps=4", "train.save_every=2", "optim.max_grad_norm=0",
              "optim.weight_decay=0.01"]
    if impl.FRAMEWORK == "jax":
        with pytest.raises(ConfigError, match="optim.in_backward is torch_impl's"):
            tiny_cfg(tmp_path, "jax", *common, "optim.in_backward=true")
        return
    plain = impl.train(tiny_cfg(tmp_path / "plain", "torch", *common), progress=False)
    first = impl.train(tiny_cfg(tmp_path / "inb", "torch", *common, "optim.in_backward=true"), stop_after=2,
                       progress=False)
    rest = impl.train(tiny_cfg(tmp_path / "inb", "torch", *common), resume=True, progress=False)
    np.testing.assert_array_equal(first.losses + rest.losses, plain.losses)
    # the norm is summed per tensor in the hooks instead of over a stack of norms: fp32 rounding of the same sum
    np.testing.assert_allclose(first.grad_norms + rest.grad_norms, plain.grad_norms, rtol=1e-6, atol=0)
    for name, t in _adapter_tensors(plain.adapter_dir).items():
        np.testing.assert_array_equal(_adapter_tensors(rest.adapter_dir)[name], t, err_msg=name)
    for bad, why in (("optim.max_grad_norm=1.0", "optim.max_grad_norm=1.0, which clips by the global norm"),
                     ("train.grad_accum=2", "train.grad_accum=2, which sums micro-batches"),
                     ("parallel.data=2", "before the gradients are reduced over the 2 devices")):
        with pytest.raises(ConfigError, match=why):
            tiny_cfg(tmp_path / "bad", "torch", *common, "optim.in_backward=true", bad)


def _adapter_tensors(folder) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    return load_file(str(folder / "adapter_model.safetensors"))


def test_expert_chunk_changes_memory_not_losses(impl, model_dir, reference_run, tmp_path):
    """train.expert_chunk: the first steps of the reference run again with every MoE layer's experts tiled in
    16-token chunks (a micro-batch of 4 rows of 64 tokens: 16 chunks), layers recomputed. Each chunk sorts and sums
    its own rows, so the LoRA gradients differ from untiled ones in fp32 reduction order only: held to 1e-6
    relative over 3 steps, as the JAX remat test above."""
    cfg = tiny_cfg(tmp_path, impl.FRAMEWORK, f"model.path={model_dir}", "train.steps=6", "train.save_every=0",
                   "train.grad_accum=2", "optim.weight_decay=0.01", "train.gradient_checkpointing=recompute",
                   "train.expert_chunk=16")
    res = impl.train(cfg, stop_after=3, progress=False)
    np.testing.assert_allclose(res.losses, reference_run[1].losses[:3], rtol=1e-6, atol=0)


def test_resume_refuses_other_config_and_fresh_run_refuses_existing(impl, model_dir, reference_run, tmp_path):
    ref_cfg, _ = reference_run
    shutil.copytree(ref_cfg.train.out_dir, tmp_path / "run")
    other = tiny_cfg(tmp_path / "run", impl.FRAMEWORK, f"model.path={model_dir}", "train.steps=6",
                     "train.save_every=2", "train.grad_accum=2", "optim.weight_decay=0.01", "optim.lr=1e-4")
    with pytest.raises(ConfigError, match=r"different config \(optim.lr: 0.005 -> 0.0001\)"):
        impl.train(other, resume=True, progress=False)
    with pytest.raises(ConfigError, match="already holds checkpoints"):
        impl.train(other, progress=False)
    with pytest.raises(ConfigError, match="nothing to resume"):
        impl.train(tiny_cfg(tmp_path / "empty", impl.FRAMEWORK, f"model.path={model_dir}"), resume=True,
                   progress=False)


def test_nan_loss_stops_and_keeps_last_good_checkpoint(impl, model_dir, tmp_path):
    # lr 1e30: the first AdamW step moves every LoRA weight by ~1e30, so the next forward overflows to inf/NaN
    cfg = tiny_cfg(tmp_path, impl.FRAMEWORK, f"model.path={model_dir}", "train.steps=5", "train.save_every=1",
                   "optim.lr=1e30", "optim.warmup_steps=0", "optim.max_grad_norm=0")
    with pytest.raises(TrainingDiverged, match=r"diverged at step 2: loss=(nan|inf).*step_00000001"):
        impl.train(cfg, progress=False)
    last = latest_checkpoint(tmp_path)
    assert last.name == "step_00000001" and json.loads((last / "meta.json").read_text())["step"] == 1


def test_adapter_loads_in_peft_onto_hf(impl, model_dir, reference_run):
    """The trained adapter, loaded by PEFT onto the HF model, gives the logits of this framework's model with the
    same adapter loaded back (so the saved file means what the trainer trained)."""
    peft = pytest.importorskip("peft")
    import torch

    from shared_math.adapter import read_peft_adapter
    from shared_math.numerics import assert_close
    from tests.shared import hf_helpers as H

    _, res = reference_run
    model = impl.load_model(model_dir)
    impl.load_adapter(model, res.adapter_dir)
    _, tensors = read_peft_adapter(res.adapter_dir, model.config)
    assert all(np.abs(v).max() > 0 for k, v in tensors.items() if k.endswith("lora_B"))  # it did train
    ids = np.array([[1, 33, 70, 71, 72, 45, 50]], np.int32)
    pm = peft.PeftModel.from_pretrained(H.load_hf_model(model_dir), str(res.adapter_dir)).eval()
    with torch.no_grad():
        ref = pm(torch.from_numpy(ids).long()).logits.numpy()
    assert_close(impl.logits_of(model, ids), ref, dtype="float32", quantity="logits", name="trained-adapter logits")
