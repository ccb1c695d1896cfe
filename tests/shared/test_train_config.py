"""shared_math.train_config (YAML + overrides, unknown keys, types) and the framework-free training helpers."""

from __future__ import annotations

import math

import numpy as np
import pytest

from shared_math.config import LoraConfig
from shared_math.train_config import (
    CHECKPOINT_POLICIES,
    ConfigError,
    RunConfig,
    diff_configs,
    load_run_config,
    to_dict,
    trajectory_dict,
    with_overrides,
)
from shared_math.training import clip_coefficient, init_lora_tensors, lr_at


def test_yaml_and_overrides(tmp_path):
    y = tmp_path / "run.yaml"
    y.write_text("framework: jax\nlora: {rank: 4, targets: [q_proj, experts.gate_up_proj]}\n"
                 "optim: {lr: 1.0e-3}\ntrain: {steps: 7}\n")
    cfg = load_run_config(y, ["optim.lr=2e-4", "lora.targets=[v_proj]", "data.synthetic.tasks=[copy]",
                              "model.dtype=bfloat16", "train.out_dir=/tmp/x"])
    assert cfg.framework == "jax" and cfg.train.steps == 7 and cfg.lora.rank == 4
    assert cfg.optim.lr == 2e-4 and cfg.lora.targets == ("v_proj",) and cfg.data.synthetic.tasks == ("copy",)
    assert cfg.model.dtype == "bfloat16" and cfg.train.out_dir == "/tmp/x"
    assert isinstance(cfg.lora, LoraConfig) and cfg.lora.scale == cfg.lora.alpha / 4
    # round trip through plain data
    assert with_overrides(cfg) == cfg and to_dict(cfg)["lora"]["targets"] == ["v_proj"]


def test_defaults_are_the_shipped_default_job():
    from splitmoe.train_cli import DEFAULT_RUN_YAML

    assert load_run_config(DEFAULT_RUN_YAML, ["train.out_dir=runs/default"]) == RunConfig()


@pytest.mark.parametrize("override, message", [
    ("optim.lrr=1", r"unknown key\(s\) \['optim.lrr'\] in optim; known keys: optim.lr"),
    ("trian.steps=3", r"unknown key\(s\) \['trian'\]"),
    ("train.steps=abc", "train.steps must be an integer"),
    ("train.steps=0", "train.steps must be >= 1"),
    ("model.dtype=fp8", r"model.dtype must be one of \['float32', 'bfloat16'\]"),
    ("lora.rank=0", "lora: LoRA rank must be an integer >= 1"),
    ("lora.targets=[nope]", "unknown LoRA target"),
    ("optim.lr=-1", "optim.lr must be a finite number > 0"),
    ("data.synthetic.tasks=[sort]", "unknown synthetic task"),
    ("steps", "is not key=value"),
    ("data.source=jsonl", "data.path is not set"),
    ("parallel.fsdp=0", r"parallel.fsdp must be >= 1, got 0 \(1 means the axis is not split\)"),
    ("parallel.expert=3", r"data.batch_size=32 does not split over the 3 devices .*multiple of 3"),
    ("train.expert_chunk=-1", "train.expert_chunk must be >= 0, got -1"),
])
def test_bad_overrides_are_clear(override, message):
    with pytest.raises(ConfigError, match=message):
        load_run_config(None, [override])


@pytest.mark.parametrize("overrides, message", [
    (["train.checkpoint_policy=attention"], "needs train.gradient_checkpointing=recompute \\(got none\\)"),
    (["train.gradient_checkpointing=offload", "train.checkpoint_policy=attention"], r"recompute \(got offload\)"),
    (["train.gradient_checkpointing=recompute", "train.checkpoint_policy=small_dots"],
     "not a torch policy; with --framework torch use one of nothing, attention"),
    (["framework=jax", "train.gradient_checkpointing=recompute", "train.checkpoint_policy=attention"],
     "not a jax policy; with --framework jax use one of nothing, small_dots, dots"),
    (["train.gradient_checkpointing=recompute", "train.checkpoint_policy=all"], "must be one of"),
])
def test_checkpoint_policy_is_checked_against_the_mode_and_the_framework(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_run_config(None, overrides)
    ok = load_run_config(None, ["train.gradient_checkpointing=recompute", "train.checkpoint_policy=attention"])
    assert ok.train.checkpoint_policy == "attention"


@pytest.mark.parametrize("overrides, message", [
    (["train.checkpoint_layers=2"], r"train.checkpoint_layers=2 says how many decoder layers are checkpointed: it "
                                    r"needs train.gradient_checkpointing=recompute or offload \(got none\)"),
    (["train.gradient_checkpointing=recompute", "train.checkpoint_layers=-1"],
     r"train.checkpoint_layers must be >= 0 \(how many of the first decoder layers to checkpoint; null for all of "
     r"them\), got -1"),
    (["train.gradient_checkpointing=recompute", "train.checkpoint_layers=all"], "must be an integer"),
])
def test_checkpoint_layers_needs_checkpointing_and_a_count(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_run_config(None, overrides)
    for mode in ("recompute", "offload"):
        ok = load_run_config(None, [f"train.gradient_checkpointing={mode}", "train.checkpoint_layers=0"])
        assert ok.train.checkpoint_layers == 0
    assert RunConfig().train.checkpoint_layers is None
    assert load_run_config(None, ["train.gradient_checkpointing=recompute",
                                  "train.checkpoint_layers=null"]).train.checkpoint_layers is None


def test_checkpoint_layers_is_checked_against_the_model_depth():
    from shared_math.train_config import check_checkpoint_layers

    cfg = load_run_config(None, ["train.gradient_checkpointing=recompute", "train.checkpoint_layers=4"])
    with pytest.raises(ConfigError, match="train.checkpoint_layers=4 is more than this model's 3 decoder layers; "
                                          "set it to at most 3, or null to checkpoint every layer"):
        check_checkpoint_layers(cfg, 3)
    check_checkpoint_layers(cfg, 4)
    check_checkpoint_layers(RunConfig(), 1)


def test_expert_chunk_refuses_expert_parallelism():
    with pytest.raises(ConfigError, match="train.expert_chunk=8 tiles experts that one rank holds whole; with "
                                          "parallel.expert=2 leave it 0"):
        load_run_config(None, ["parallel.expert=2", "train.expert_chunk=8"])
    assert load_run_config(None, ["train.expert_chunk=8"]).train.expert_chunk == 8


def test_checkpoint_policy_names_are_the_implementations_policies():
    pytest.importorskip("torch")
    pytest.importorskip("jax")
    from jax_impl.models.layers import REMAT_POLICIES as JAX_POLICIES
    from torch_impl.models.layers import REMAT_POLICIES as TORCH_POLICIES

    assert set(CHECKPOINT_POLICIES["torch"]) == set(TORCH_POLICIES)
    assert set(CHECKPOINT_POLICIES["jax"]) == set(JAX_POLICIES)


def test_bad_yaml(tmp_path):
    (tmp_path / "a.yaml").write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="mapping of sections"):
        load_run_config(tmp_path / "a.yaml")
    with pytest.raises(ConfigError, match="does not exist"):
        load_run_config(tmp_path / "missing.yaml")


def test_trajectory_ignores_logging_keys():
    a = RunConfig()
    b = with_overrides(a, "train.eval_every=7", "train.out_dir=elsewhere", "train.save_every=3")
    c = with_overrides(a, "optim.lr=1e-4")
    assert trajectory_dict(a) == trajectory_dict(b)
    assert diff_configs(trajectory_dict(a), trajectory_dict(c)) == ["optim.lr: 0.005 -> 0.0001"]


def test_parallel_section_counts_devices_and_leaves_the_trajectory_alone():
    cfg = load_run_config(None, ["parallel.fsdp=2", "parallel.expert=2", "parallel.data=2"])
    assert cfg.parallel.devices == 8 and cfg.parallel.describe() == "data=2,fsdp=2,expert=2"
    # a run saved on 8 devices resumes on 1: the mesh changes how a step is computed, not the losses it gives
    assert diff_configs(trajectory_dict(cfg), trajectory_dict(RunConfig())) == []
    # a run folder written before the section existed loads with the single-device defaults
    assert load_run_config(None, []).parallel.devices == 1


def test_lr_schedule_warmup_and_cosine():
    cfg = with_overrides(RunConfig(), "optim.lr=1.0", "optim.warmup_steps=4", "train.steps=14",
                         "optim.min_lr_ratio=0.1")
    lrs = [lr_at(s, cfg) for s in range(14)]
    np.testing.assert_allclose(lrs[:4], [0.25, 0.5, 0.75, 1.0])
    assert lrs[4] == 1.0 and all(x > y for x, y in zip(lrs[4:], lrs[5:]))  # monotone cosine decay
    assert lrs[9] == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert lr_at(14, cfg) == pytest.approx(0.1)


def test_clip_coefficient_matches_torch():
    torch = pytest.importorskip("torch")
    for norm_target, max_norm in ((3.0, 1.0), (0.5, 1.0), (2.0, 0.0)):
        p = torch.nn.Parameter(torch.zeros(4))
        p.grad = torch.full((4,), norm_target / 2)
        before = p.grad.clone()
        if max_norm > 0:
            torch.nn.utils.clip_grad_norm_([p], max_norm)
        coef = clip_coefficient(float(before.norm()), max_norm)
        torch.testing.assert_close(p.grad, before * coef, rtol=1e-7, atol=0)


def test_init_lora_tensors_shapes_and_determinism():
    from shared_math.checkpoint import tiny_hf_config
    from shared_math.config import ModelConfig

    mc = ModelConfig.from_hf(tiny_hf_config("qwen3_moe"))
    lora = LoraConfig(rank=4, alpha=8)
    a, b = init_lora_tensors(lora, mc, 0), init_lora_tensors(lora, mc, 0)
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
    A = a["layers.0.mlp.experts.gate_up_proj.lora_A"]
    assert A.shape == (8, 64, 4) and A.dtype == np.float32 and np.abs(A).max() <= 1 / 8
    assert not np.array_equal(A, init_lora_tensors(lora, mc, 1)["layers.0.mlp.experts.gate_up_proj.lora_A"])
    assert all(not v.any() for k, v in a.items() if k.endswith("lora_B"))
    # a target's init does not depend on which other targets exist
    only_q = init_lora_tensors(LoraConfig(rank=4, alpha=8, targets=("q_proj",)), mc, 0)
    np.testing.assert_array_equal(only_q["layers.1.self_attn.q_proj.lora_A"], a["layers.1.self_attn.q_proj.lora_A"])


def test_a_checkpoint_from_before_per_target_ranks_still_resumes():
    """Trajectories saved before `lora.target_ranks` / `target_alphas` existed lack those keys: absent means none
    (the default), while a real difference is still reported."""
    from shared_math.train_config import diff_configs, trajectory_dict

    current = trajectory_dict(load_run_config("configs/runs/default.yaml", []))
    old = {k: v for k, v in current.items() if not k.startswith("lora.target_")}
    assert diff_configs(old, current) == []
    changed = trajectory_dict(load_run_config("configs/runs/default.yaml", ["lora.rank=4"]))
    assert [d.split(":")[0] for d in diff_configs(old, changed)] == ["lora.rank"]


def test_unsloth_spelling_of_expert_targets_is_noted_or_refused():
    """Unsloth's docs write the experts as `gate_up_proj`, `down_proj`. gate_up_proj is unambiguous (only the fused
    experts have it): accepted with a note saying what it became. down_proj beside it would silently mean the dense
    MLPs under PEFT's names: refused, naming both PEFT spellings."""
    with pytest.warns(UserWarning, match="experts.gate_up_proj"):
        assert LoraConfig(targets=("q_proj", "gate_up_proj")).targets == ("q_proj", "experts.gate_up_proj")
    with pytest.raises(ValueError, match="experts.down_proj"):
        LoraConfig(targets=("q_proj", "gate_up_proj", "down_proj"))
    # PEFT's own spellings stay silent and mean what PEFT means
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert LoraConfig(targets=("experts.gate_up_proj", "experts.down_proj", "down_proj")).targets == (
            "experts.gate_up_proj", "experts.down_proj", "down_proj")
