"""Routing analytics (shared_math.routing_stats) in both frameworks: each MoE block's per-forward statistics against
the float64 reference for every family (prime E, K=1, K=E, an expert with no tokens, masked tokens), torch and JAX
equal for the same training run (and in the metrics rows and routing.png of `train`), and `splitmoe inspect
--routing` in both frameworks.

Tolerance: the load, token and group counts are integers and must be equal: both frameworks and the reference pick
the same experts from the same fp32 inputs (a near-tie that fp32 rounding could flip would change one count by one;
these seeds have none). The entropy and aux-loss sums use `shared_math.numerics`' ("float32", "routing_stats").
"""

from __future__ import annotations

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
jax = pytest.importorskip("jax")

import jax.numpy as jnp  # noqa: E402
from flax import nnx  # noqa: E402

from shared_math import reference as ref  # noqa: E402
from shared_math.config import ModelConfig  # noqa: E402
from shared_math.numerics import assert_close  # noqa: E402
from shared_math.routing_stats import forward_stats, summarize_layer  # noqa: E402
from shared_math.tiny import tiny_hf_config  # noqa: E402

FAMILIES = ("qwen3_moe", "gpt_oss", "deepseek_v3", "glm4_moe")
_E_KEY = {"qwen3_moe": "num_experts", "gpt_oss": "num_local_experts", "deepseek_v3": "n_routed_experts",
          "glm4_moe": "n_routed_experts"}
# name -> (E, K, n_group, topk_group) for the sigmoid_group families (the others ignore the groups; GLM-4.x routes
# with one group, as its checkpoints do), the expert that gets no token, whether some tokens are masked (padding)
CASES = {
    "prime_e_masked": ((7, 3, 1, 1), None, True),
    "k1": ((8, 1, 4, 2), None, False),
    "k_eq_e": ((6, 6, 3, 3), None, False),
    "empty_expert_masked": ((8, 2, 4, 2), 5, True),
}
T, H, I = 37, 16, 8


def _routing_setup(family: str, case: str, seed: int):
    (E, K, G, TG), empty, masked = CASES[case]
    over = {_E_KEY[family]: E, "num_experts_per_tok": K}
    if family == "deepseek_v3":
        over.update(n_group=G, topk_group=TG)
    cfg = ModelConfig.from_hf(tiny_hf_config(family, **over))
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((T, H)).astype(np.float32)
    w = (2.0 * rng.standard_normal((H, E)) / np.sqrt(H)).astype(np.float32)
    if empty is not None:  # a feature that is 1 on every token, weighted -30 for one expert: never among the top-K
        x[:, 0] = 1.0
        w[0, empty] = -30.0
    t = {"w": w, "b": (0.5 * rng.standard_normal(E)).astype(np.float32) if cfg.router_bias else None,
         "corr": (rng.uniform(-0.1, 0.1, E).astype(np.float32) if cfg.routing.method == "sigmoid_group" else None),
         "gate_up": (rng.standard_normal((E, H, 2 * I)) / np.sqrt(H)).astype(np.float32),
         "down": (rng.standard_normal((E, I, H)) / np.sqrt(I)).astype(np.float32)}
    mask = (rng.uniform(size=T) > 0.3).astype(np.int32) if masked else None
    return cfg, x, t, mask, empty


def _torch_stats(cfg, x, t, mask):
    from torch_impl.moe import MoEBlock
    from torch_impl.routing_stats import enable_routing_stats, routing_stats_of, set_token_mask

    block = MoEBlock(H, I, cfg.routing, router_bias=cfg.router_bias, backend="native")
    with torch.no_grad():
        block.router.weight.copy_(torch.from_numpy(t["w"]))
        if t["b"] is not None:
            block.router.bias.copy_(torch.from_numpy(t["b"]))
        if t["corr"] is not None:
            block.router.e_score_correction_bias.copy_(torch.from_numpy(t["corr"]))
        block.experts.gate_up_proj.copy_(torch.from_numpy(t["gate_up"]))
        block.experts.down_proj.copy_(torch.from_numpy(t["down"]))
        enable_routing_stats(block)
        set_token_mask(block, None if mask is None else torch.from_numpy(mask))
        block(torch.from_numpy(x))
    (stats,) = routing_stats_of(block)
    return {k: v.numpy() for k, v in stats.items()}


def _jax_stats(cfg, x, t, mask):
    from jax_impl.moe import Experts, MoEBlock, Router
    from jax_impl.routing_stats import enable_routing_stats, set_token_mask

    def arr(a):
        return None if a is None else jnp.asarray(a)

    block = MoEBlock(Router(arr(t["w"]), arr(t["b"]), arr(t["corr"])),
                     Experts(arr(t["gate_up"]), arr(t["down"]), backend="ragged_dot"), cfg.routing)
    enable_routing_stats(block)
    set_token_mask(block, arr(mask))
    (stats,) = _jax_block_forward(block, jnp.asarray(x))
    return {k: np.asarray(v) for k, v in stats.items()}


@nnx.jit  # jitted: a fifth of the eager call's time on CPU, where eager JAX compiles every operation by itself
def _jax_block_forward(block, x):
    from jax_impl.routing_stats import routing_stats_of

    block(x)
    return routing_stats_of(block)


def _check_equal(got: dict, want: dict, what: str) -> None:
    assert sorted(got) == sorted(want), what
    for k in ("load", "tokens", "groups"):
        if k in want:
            np.testing.assert_array_equal(got[k], want[k], err_msg=f"{what}: {k}")
    for k in ("entropy_sum", "aux_loss_sum"):
        if k in want:
            assert_close(got[k], want[k], dtype="float32", quantity="routing_stats", name=f"{what}: {k}")
    # the reported row: imbalance and cv come from the (equal) integer loads
    a, b = summarize_layer(got, 1), summarize_layer(want, 1)
    assert (a["imbalance"], a["cv"]) == pytest.approx((b["imbalance"], b["cv"]), rel=1e-12), what


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("family", FAMILIES)
def test_block_statistics_match_the_float64_reference(family, case, seed):
    """One MoE block's forward in each framework (fp32, its own router, biases and grouping) against
    `forward_stats` of the float64 router logits of the same inputs."""
    cfg, x, t, mask, empty = _routing_setup(family, case, seed)
    logits = ref.router_logits(x, t["w"], t["b"])
    want = forward_stats(logits, cfg.routing, t["corr"], mask)
    E, K = cfg.num_experts, cfg.num_experts_per_tok
    n = T if mask is None else int(mask.sum())
    assert int(want["load"].sum()) == n * K and int(want["tokens"]) == n
    if empty is not None:
        assert want["load"][empty] == 0  # the case is what it says
    if K == E:
        assert (want["load"] == n).all()
    assert ("aux_loss_sum" in want) == (family in ("qwen3_moe", "gpt_oss"))
    assert ("groups" in want) == (family in ("deepseek_v3", "glm4_moe"))
    _check_equal(_torch_stats(cfg, x, t, mask), want, f"torch {family} {case}")
    _check_equal(_jax_stats(cfg, x, t, mask), want, f"jax {family} {case}")


def test_reference_statistics_by_hand():
    """The definitions on a case small enough to work out: two tokens, E=2, K=1, softmax routing."""
    from shared_math.config import RoutingConfig

    r = RoutingConfig("softmax_topk", num_experts=2, top_k=1)
    logits = np.array([[0.0, 0.0], [np.log(3.0), 0.0]])  # p = (1/2, 1/2), (3/4, 1/4)
    s = forward_stats(logits, r)
    assert s["load"].tolist() == [2, 0]  # the tie goes to the lower index
    h = np.log(2.0) + -(0.75 * np.log(0.75) + 0.25 * np.log(0.25))
    assert float(s["entropy_sum"]) == pytest.approx(h, rel=1e-14)
    # E · Σ_e f_e P_e with f = (1, 0), P = (5/8, 3/8)
    assert float(s["aux_loss_sum"]) == pytest.approx(2 * 1.0 * 0.625, rel=1e-14)
    row = summarize_layer(s, passes=1)
    assert row["imbalance"] == 2.0 and row["cv"] == 1.0 and row["entropy"] == pytest.approx(h / 2)
    masked = forward_stats(logits, r, token_mask_T=np.array([0, 1]))
    assert masked["load"].tolist() == [1, 0] and int(masked["tokens"]) == 1
    empty = summarize_layer(forward_stats(logits, r, token_mask_T=np.zeros(2)), passes=1)
    assert empty["imbalance"] is None and empty["entropy"] is None and empty["aux_loss"] == 0.0


# ---- a training run in both frameworks -------------------------------------------------------------------------------

def _run_config(tmp_path, **train):
    from shared_math.train_config import load_run_config

    model_yaml = tmp_path / "model.yaml"
    # one MoE layer: JAX compiles the training step of a one-layer model in a fraction of a deeper one's time
    model_yaml.write_text("family: qwen3_moe\nseed: 3\noverrides: {num_hidden_layers: 1}\n")
    over = [f"model.tiny={model_yaml}", "lora.rank=4", "lora.alpha=8", "data.synthetic.tasks=[copy]",
            "data.synthetic.num_train=64", "data.synthetic.num_eval=2", "data.seq_len=32", "data.batch_size=4",
            "train.steps=3", "train.grad_accum=2", "train.log_every=2", "train.eval_every=0", "train.save_every=0",
            "train.max_new_tokens=2", f"train.out_dir={tmp_path / 'run'}"]
    return load_run_config(None, over + [f"train.{k}={v}" for k, v in train.items()])


def test_torch_and_jax_report_equal_statistics_for_the_same_run(tmp_path):
    """`train` (torch) writes a `routing` object at every logged step (2 and 3) and routing.png; a JAX trainer on the
    same run reports equal statistics at the same steps."""
    from jax_impl.train import Trainer as JaxTrainer
    from torch_impl.train import train

    cfg = _run_config(tmp_path)
    result = train(cfg, progress=False)
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    logged = {r["step"]: r["routing"] for r in rows if "routing" in r}
    assert sorted(logged) == [2, 3] and list(logged[2]) == ["0"]
    tokens_per_step = cfg.data.batch_size * cfg.data.seq_len * cfg.train.grad_accum
    assert sum(logged[2]["0"]["load"]) == 2 * tokens_per_step * 2  # two steps since the last log, K = 2
    assert sum(logged[3]["0"]["load"]) == tokens_per_step * 2
    assert result.routing_plot == tmp_path / "run" / "routing.png" and result.routing_plot.stat().st_size > 10_000

    jt = JaxTrainer(cfg, out_dir=tmp_path / "jax")
    for step in (1, 2, 3):
        jt.train_step()
        if step in logged:
            got, want = jt.pop_routing_stats(), logged[step]
            assert list(got) == list(want)
            for layer in want:
                g, w = got[layer], want[layer]
                assert g["load"] == w["load"] and g["imbalance"] == w["imbalance"] and g["cv"] == w["cv"], step
                for k in ("entropy", "aux_loss"):
                    assert_close(g[k], w[k], dtype="float32", quantity="routing_stats", name=f"step {step} {k}")
    assert jt.pop_routing_stats() is None  # an empty window after a read


def test_statistics_off_compute_nothing(tmp_path):
    """train.routing_stats=false: no MoE block computes statistics, no row has a `routing` object, no routing.png."""
    from torch_impl.routing_stats import moe_blocks
    from torch_impl.train import Trainer, train

    tr = Trainer(_run_config(tmp_path, routing_stats="false", steps=1))
    result = train(tr.cfg, progress=False, trainer=tr)
    assert all(not b.collect_routing_stats and b.routing_stats is None for _, b in moe_blocks(tr.model))
    rows = (tmp_path / "run" / "metrics.jsonl").read_text()
    assert '"routing"' not in rows and tr.pop_routing_stats() is None
    assert result.routing_plot is None and not (tmp_path / "run" / "routing.png").exists()


@pytest.mark.parametrize("offload", [False, True])
def test_torch_checkpointed_layers_count_each_batch_once(offload, seed):
    """With activation checkpointing (recomputed in the backward, on the device or offloaded) a training forward +
    backward adds each batch once: the statistics equal those without checkpointing."""
    from shared_math.tiny import random_canonical_tensors
    from torch_impl.load import build_model
    from torch_impl.routing_stats import RoutingStatsAccumulator, routing_stats_of

    cfg = ModelConfig.from_hf(tiny_hf_config("qwen3_moe"))
    model = build_model(cfg)
    tensors = random_canonical_tensors(cfg, seed=seed % 1000)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(torch.from_numpy(tensors[name]))
    model.layers[1].mlp.router.weight.requires_grad_(True)  # a backward that reaches into the MoE layer
    acc = RoutingStatsAccumulator(model)
    ids = torch.randint(0, cfg.vocab_size, (2, 13), generator=torch.Generator().manual_seed(seed))
    stats = []
    for ckpt in (False, True):
        if ckpt:
            model.gradient_checkpointing_enable(offload_to_cpu=offload)
        model.train()
        model(ids, labels=ids).loss.backward()
        acc.add(routing_stats_of(model))
        stats.append(acc.pop())
    assert stats[0] == stats[1]
    assert sum(stats[0]["1"]["load"]) == ids.numel() * cfg.num_experts_per_tok


def test_jax_checkpointed_layers_hand_their_statistics_out(seed):
    """Under `jax.checkpoint` (gradient_checkpointing_enable) the MoE block writes its statistics inside the
    checkpointed call, and `_run_layer` hands them back: a jitted JAX forward of a padded batch reports what the torch
    model reports for the same weights (and the padding is not counted)."""
    from jax_impl.models.qwen3_moe import Qwen3MoeForCausalLM
    from jax_impl.routing_stats import collect_routing_stats as jax_collect
    from shared_math.tiny import random_canonical_tensors
    from torch_impl.load import build_model
    from torch_impl.routing_stats import collect_routing_stats as torch_collect

    cfg = ModelConfig.from_hf(tiny_hf_config("qwen3_moe", num_hidden_layers=1))
    tensors = random_canonical_tensors(cfg, seed=seed % 1000)
    jax_model = Qwen3MoeForCausalLM(cfg, tensors)
    jax_model.gradient_checkpointing_enable()
    torch_model = build_model(cfg)
    with torch.no_grad():
        for name, p in torch_model.named_parameters():
            p.copy_(torch.from_numpy(tensors[name]))
    rng = np.random.default_rng(seed)
    batch = {"input_ids": rng.integers(0, cfg.vocab_size, (2, 16)).astype(np.int32),
             "attention_mask": np.array([[1] * 16, [1] * 11 + [0] * 5], np.int32)}
    got, want = jax_collect(jax_model, [batch]), torch_collect(torch_model, [batch])
    assert got["0"]["load"] == want["0"]["load"]
    assert sum(want["0"]["load"]) == 27 * cfg.num_experts_per_tok  # the 5 padded positions are not counted
    for k in ("entropy", "aux_loss"):
        assert_close(got["0"][k], want["0"][k], dtype="float32", quantity="routing_stats", name=k)


# ---- splitmoe inspect --routing --------------------------------------------------------------------------------------

def test_inspect_routing_in_both_frameworks(tmp_path, capsys):
    """A tiny checkpoint + a PEFT adapter over a JSONL file: torch and JAX print and write the same analytics, the
    padding of the batches is not counted, the adapter changes the routing, and routing.png is written."""
    from shared_math.checkpoint import write_tiny_checkpoint
    from shared_math.config import LoraConfig
    from splitmoe.cli import main
    from torch_impl.load import load_model
    from torch_impl.lora import lora_parameters, save_adapter

    ckpt = write_tiny_checkpoint("qwen3_moe", tmp_path / "model", seed=4, num_hidden_layers=1)
    model = load_model(ckpt, lora=LoraConfig(rank=4, alpha=8.0, targets=("q_proj", "v_proj")), lora_seed=0)
    with torch.no_grad():
        for name, p in lora_parameters(model).items():
            if name.endswith("lora_B"):
                p.normal_(0.0, 0.5, generator=torch.Generator().manual_seed(len(name)))
    save_adapter(model, tmp_path / "adapter")
    data = tmp_path / "data.jsonl"
    texts = ["copy: abc -> abc", "reverse the word banana", "x", "a longer line of text, to pad the others"] * 3
    data.write_text("".join(json.dumps({"text": s}) + "\n" for s in texts))

    summaries = {}
    for fw, adapter in (("torch", True), ("jax", True), ("torch", False)):
        out = tmp_path / f"out_{fw}_{adapter}"
        args = ["inspect", "--routing", "--model", str(ckpt), "--data", str(data), "--framework", fw,
                "--batch-size", "5", "--out", str(out)] + (["--adapter", str(tmp_path / "adapter")] if adapter else [])
        assert main(args) == 0
        printed = capsys.readouterr().out
        assert "imbalance" in printed and "entropy" in printed
        written = json.loads((out / "routing.json").read_text())
        summaries[fw, adapter] = written["routing"]
        assert (out / "routing.png").stat().st_size > 5_000
        # every real token routed K times, none of the padding (3 batches padded to multiples of 16)
        assert sum(written["routing"]["0"]["load"]) == written["tokens"] * 2
    t, j = summaries["torch", True], summaries["jax", True]
    assert t["0"]["load"] == j["0"]["load"]
    assert_close(j["0"]["entropy"], t["0"]["entropy"], dtype="float32", quantity="routing_stats")
    assert summaries["torch", False]["0"]["load"] != t["0"]["load"]  # the adapter was loaded and matters


def test_inspect_routing_refuses_bad_input(tmp_path, capsys):
    from splitmoe.cli import main

    assert main(["inspect", "--routing", "--data", str(tmp_path / "d.jsonl")]) == 2
    assert "needs --model DIR" in capsys.readouterr().err
    assert main(["inspect", "--routing", "--model", str(tmp_path), "--data", str(tmp_path / "d.jsonl")]) == 2
    assert "no config.json" in capsys.readouterr().err
    assert main(["inspect", "--model", str(tmp_path)]) == 2
    assert "add --routing" in capsys.readouterr().err


def test_framework_modules_mirror_each_other():
    """The same public names on both sides (ARCHITECTURE.md: mirror names across the implementations)."""
    import jax_impl.routing_stats as j
    import torch_impl.routing_stats as t

    assert t.__all__ == j.__all__
