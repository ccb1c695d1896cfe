"""torch_impl.parallel on the CPU: FSDP2 + expert parallelism over gloo processes give the single-device step.

Two jobs, 2 and 4 ranks, each rank a process with torchrun's environment, start once and run several checks each
(tests/torch/parallel_worker.py); the single-device references run in this process. Meshes: fsdp=2, expert=2 and
data=2 on 2 ranks; fsdp=2 × expert=2 with activation checkpointing on 4. Models: the default tiny Qwen3-MoE (a dense
layer between two MoE layers) and a tiny gpt-oss (expert biases, clamped SwiGLU) whose router bias keeps expert 0 of
layer 0 and expert 5 of layer 1 from ever being chosen. Also: meshes that do not fit the launch or the experts are
refused before any work; a resumed sharded run equals the uninterrupted one; checkpoints move between 1 and 2 ranks;
`splitmoe train ... parallel.expert=2` (what `torchrun -m splitmoe` runs) writes one set of outputs.

Tolerances (shared_math.numerics): the sharded loss and gradients are the same fp32 sums taken in another order
(per-rank partial sums, FSDP2's reduce-scatter and all-reduce, GEMMs over other row blocks): "sharded_grad"; runs
continued on another device count drift like any reordered fp32 run: "train_loss". A run resumed on the same mesh is
bit-identical: the same reductions in the same order.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from shared_math.numerics import assert_close  # noqa: E402
from shared_math.train_config import ConfigError, load_run_config  # noqa: E402
from tests.torch import parallel_worker  # noqa: E402

pytestmark = pytest.mark.skipif(not (torch.distributed.is_available() and torch.distributed.is_gloo_available()),
                                reason="torch.distributed with gloo is not available")

# 4 rows of 32 tokens per micro-batch, 2 micro-batches a step: every rank gets rows on up to 4 ranks. LoRA rank 3:
# B [3, out] splits unevenly over fsdp=2 (FSDP2 pads the shards; checkpoints must not see it)
RUN = ["data.batch_size=4", "data.seq_len=32", "data.synthetic.num_train=64", "data.synthetic.num_eval=4",
       "lora.rank=3", "lora.alpha=6", "optim.warmup_steps=1", "train.grad_accum=2", "train.eval_every=0",
       "train.log_every=1", "train.max_new_tokens=3", "train.eval_batch_size=6", "train.keep_checkpoints=3"]
TRAIN = [*RUN, "train.steps=4", "train.save_every=2"]


def _rank(rank: int, world: int, port: int, job: str) -> None:
    """One rank, with the environment torchrun gives its processes."""
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), LOCAL_WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1")
    parallel_worker.main(job)


def _run_ranks(nproc: int, out: Path, checks: list[dict], timeout: float = 300.0) -> None:
    """Run `checks` on `nproc` gloo ranks, each a process with torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK,
    MASTER_ADDR/PORT), forked from this one: torch and the trainer are imported already, which saves each rank
    the ~5 s of CPU an import costs on the 2-core CI machine. A rank that fails stops the others."""
    import multiprocessing
    import socket
    import time

    import torch.distributed.fsdp  # noqa: F401  (imported before the fork, for the same reason)
    import torch.distributed.tensor  # noqa: F401

    job = out / f"job{nproc}.json"
    job.write_text(json.dumps({"out": str(out), "checks": checks}))
    with socket.socket() as sock:  # a free port for the rendezvous
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    ctx = multiprocessing.get_context("fork")
    procs = [ctx.Process(target=_rank, args=(r, nproc, port, str(job)), daemon=True) for r in range(nproc)]
    for proc in procs:
        proc.start()
    deadline = time.monotonic() + timeout
    while any(proc.is_alive() for proc in procs):
        failed = [proc for proc in procs if proc.exitcode not in (None, 0)]
        if failed or time.monotonic() > deadline:
            for proc in procs:
                proc.kill()
            break
        time.sleep(0.05)
    for proc in procs:
        proc.join()
    codes = [proc.exitcode for proc in procs]
    assert codes == [0] * nproc, f"ranks exited with {codes} (a traceback above; -9: stopped after another failed " \
                                 f"or after {timeout:.0f} s)"


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    """The default tiny Qwen3-MoE, and a tiny gpt-oss with experts that no token reaches."""
    from shared_math.checkpoint import write_checkpoint
    from shared_math.config import ModelConfig
    from shared_math.tiny import random_canonical_tensors, tiny_hf_config
    from shared_math.training import build_model_checkpoint

    root = tmp_path_factory.mktemp("models")
    qwen = build_model_checkpoint(load_run_config(None, [f"train.out_dir={root / 'q'}"]), root / "q")
    hf = tiny_hf_config("gpt_oss")
    tensors = random_canonical_tensors(ModelConfig.from_hf(hf), seed=3)
    # gpt-oss takes the top-K of the logits (+ bias): -1e4 keeps an expert out of every top-K (logits are O(1))
    tensors["layers.0.mlp.router.bias"][0] = -1e4
    tensors["layers.1.mlp.router.bias"][5] = -1e4
    return {"qwen": qwen, "gpt_oss": write_checkpoint(root / "g", hf, tensors)}


def _grads_check(out: Path, name: str, model: Path, parallel: list[str], **extra) -> dict:
    return {"kind": "grads", "name": name, "overrides": [*RUN, f"model.path={model}", f"train.out_dir={out / name}",
                                                          *parallel], **extra}


def _check_grads(out: Path, name: str, ref: str) -> None:
    """The sharded step's loss and every whole LoRA gradient against the single-device step's."""
    got, want = np.load(out / f"{name}.npz"), np.load(out / f"{ref}.npz")
    assert sorted(got.files) == sorted(want.files)
    assert_close(got["__loss__"], want["__loss__"], dtype="float32", quantity="loss", name=f"{name} loss")
    assert_close(got["__grad_norm__"], want["__grad_norm__"], dtype="float32", quantity="loss",
                 name=f"{name} grad norm")  # a norm: a sum of squares, reduced like the loss
    assert any(np.abs(want[k]).max() > 0 for k in want.files if k.endswith("lora_B"))  # B = 0: only A would be
    for k in want.files:
        if not k.startswith("__"):
            assert_close(got[k], want[k], dtype="float32", quantity="sharded_grad", name=f"{name}: {k}")


def _losses(run: Path) -> tuple[list[float], list[float]]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in rows if "loss" in r]
    assert [r["step"] for r in train] == list(range(1, len(train) + 1)), "metrics.jsonl: each step once, in order"
    return [r["loss"] for r in train], [r["grad_norm"] for r in train]


def test_two_ranks_equal_one_device(models, tmp_path):
    """2 gloo ranks: the expert all-to-all module (a rank without rows, experts without tokens); one step's loss and
    LoRA gradients for fsdp=2 (also with tiled experts in recomputed layers), expert=2 (a rank without valid
    labels), data=2; `torchrun -m splitmoe train`; a resumed run bit-equal to the uninterrupted one; a 1-rank
    checkpoint resumed on 2 ranks and a 2-rank one on 1."""
    from torch_impl.train import train

    out = tmp_path
    q, g = models["qwen"], models["gpt_oss"]
    # single-device references: one step's gradients, an uninterrupted run, that run cut back to its step 2
    parallel_worker._grads(_grads_check(out, "ref_qwen", q, []), out)
    parallel_worker._grads(_grads_check(out, "ref_gpt_oss_blank", g, [], blank_rows=[2, 3]), out)
    ref = train(load_run_config(None, [*TRAIN, f"model.path={q}", f"train.out_dir={out / 'single'}"]),
                progress=False)
    from_one = parallel_worker.cut_run(out / "single", out / "from_one", 2)

    common = [*TRAIN, f"model.path={q}"]
    _run_ranks(2, out, [
        {"kind": "experts", "name": "experts"},
        _grads_check(out, "fsdp2", q, ["parallel.fsdp=2"]),
        # FSDP2 around tiled experts in recomputed layers (the tiled backward runs autograd on the unsharded
        # parameters that FSDP2 gathers for the layer's backward): 32 tokens per rank in 4 chunks of 8
        _grads_check(out, "fsdp2_tiled", q, ["parallel.fsdp=2", "train.expert_chunk=8",
                                             "train.gradient_checkpointing=recompute"]),
        # rows 2-3 are rank 1's: it has no valid label, yet runs its experts for rank 0 and gets zero gradients
        _grads_check(out, "expert2_blank", g, ["parallel.expert=2"], blank_rows=[2, 3]),
        _grads_check(out, "data2", q, ["parallel.data=2"]),
        {"kind": "cli", "name": "cli", "args": ["train", "--quiet", "--framework", "torch", "--out", str(out / "cli"),
                                                *common, "parallel.expert=2"]},
        {"kind": "cut", "src": str(out / "cli"), "dst": str(out / "again"), "step": 2},
        {"kind": "train", "name": "again", "resume": True,
         "overrides": [*common, "parallel.expert=2", f"train.out_dir={out / 'again'}"]},
        {"kind": "train", "name": "from_one", "resume": True,
         "overrides": [*common, "parallel.fsdp=2", f"train.out_dir={from_one}"]},
    ])

    for r in json.loads((out / "experts.json").read_text())["ranks"]:
        assert not r["missing_grads"], r  # a rank without rows still has (zero) gradients for FSDP2's collectives
        for k, err in r["errs"].items():  # max|diff| / max|expected|: sums over ranks in another order only
            assert err <= 1e-6, (r["rank"], k, err)
    assert [r["rows_received"] for r in json.loads((out / "experts.json").read_text())["ranks"]] == [20, 0]
    _check_grads(out, "fsdp2", "ref_qwen")
    _check_grads(out, "fsdp2_tiled", "ref_qwen")
    _check_grads(out, "expert2_blank", "ref_gpt_oss_blank")
    _check_grads(out, "data2", "ref_qwen")

    # the CLI under torchrun: one set of outputs, by rank 0
    ranks = json.loads((out / "cli.json").read_text())["ranks"]
    assert [r["rc"] for r in ranks] == [0, 0]
    assert "splitmoe train (torch): steps 0 -> 4" in ranks[0]["stdout"] and ranks[1]["stdout"] == ""
    cli_losses, cli_norms = _losses(out / "cli")
    assert_close(cli_losses, ref.losses, dtype="float32", quantity="train_loss", name="2-rank losses")
    assert_close(cli_norms, ref.grad_norms, dtype="float32", quantity="train_loss", name="2-rank grad norms")
    assert (out / "cli" / "loss.png").is_file() and (out / "cli" / "adapter" / "adapter_config.json").is_file()
    # resumed from its step-2 checkpoint on the same mesh: the uninterrupted run's steps 3-4, bit for bit
    again = json.loads((out / "again.json").read_text())
    assert (again["start"], again["final"]) == (2, 4)
    assert again["losses"] == cli_losses[2:] and again["grad_norms"] == cli_norms[2:]
    # a single-device checkpoint resumed on 2 ranks (fsdp=2: each takes its shard of every tensor, B's uneven)
    one_to_two = json.loads((out / "from_one.json").read_text())
    assert one_to_two["start"] == 2
    assert_close(one_to_two["losses"], ref.losses[2:], dtype="float32", quantity="train_loss", name="1 -> 2 ranks")
    assert_close(one_to_two["grad_norms"], ref.grad_norms[2:], dtype="float32", quantity="train_loss",
                 name="1 -> 2 ranks, grad norms")

    # a 2-rank checkpoint (the CLI run's step 2) resumed on one device; its adapter loads in PEFT's format
    two_to_one = parallel_worker.cut_run(out / "cli", out / "to_one", 2)
    cfg = load_run_config(None, [*common, f"train.out_dir={two_to_one}"])
    res = train(cfg, resume=True, progress=False)
    assert res.start_step == 2
    assert_close(res.losses, ref.losses[2:], dtype="float32", quantity="train_loss", name="2 ranks -> 1")
    # the 2-rank adapter: PEFT's files with whole tensors. Against the single-device run's adapter after 4 AdamW
    # steps: AdamW divides each gradient element by its running RMS, so a small element's update carries its
    # gradient's relative reduction-order error (measured up to 2.5e-5·max here); 1e-3 would still catch a misplaced
    # shard or expert block, which is O(1) off.
    from shared_math.adapter import read_peft_adapter
    from shared_math.config import ModelConfig

    model_cfg = ModelConfig.from_hf(q)
    _, got = read_peft_adapter(out / "cli" / "adapter", model_cfg)
    _, want = read_peft_adapter(ref.adapter_dir, model_cfg)
    assert sorted(got) == sorted(want)
    for k in want:
        assert_close(got[k], want[k], dtype="float32", quantity="train_loss", rtol=1e-3, name=f"adapter {k}")


def test_four_ranks_fsdp_times_expert(models, tmp_path):
    """4 gloo ranks, fsdp=2 × expert=2: one step with activation checkpointing (gpt-oss, experts without tokens)
    equals the single-device step; two optimizer steps equal the single-device run's."""
    from torch_impl.train import train

    out = tmp_path
    q, g = models["qwen"], models["gpt_oss"]
    parallel_worker._grads(_grads_check(out, "ref_gpt_oss", g, []), out)
    ref = train(load_run_config(None, [*TRAIN, f"model.path={q}", f"train.out_dir={out / 'single'}"]),
                stop_after=2, progress=False)
    mesh = ["parallel.fsdp=2", "parallel.expert=2"]
    _run_ranks(4, out, [
        _grads_check(out, "fsdp2_expert2", g, mesh, checkpointing=True),
        {"kind": "train", "name": "train", "stop_after": 2,
         "overrides": [*TRAIN, f"model.path={q}", f"train.out_dir={out / 'run'}", *mesh]},
    ])
    _check_grads(out, "fsdp2_expert2", "ref_gpt_oss")
    run = json.loads((out / "train.json").read_text())
    assert_close(run["losses"], ref.losses, dtype="float32", quantity="train_loss", name="losses")
    assert_close(run["grad_norms"], ref.grad_norms, dtype="float32", quantity="train_loss", name="grad norms")
    assert (out / "run" / "checkpoints" / "step_00000002" / "state.safetensors").is_file()


# ---- refused before any work (no process is started) ---------------------------------------------------------------

def test_launch_that_does_not_fit_is_refused(models, tmp_path, monkeypatch):
    from torch_impl.train import Trainer

    cfg = load_run_config(None, [*RUN, f"model.path={models['qwen']}", f"train.out_dir={tmp_path}",
                                 "parallel.fsdp=2"])
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    with pytest.raises(ConfigError, match=r"asks for 2 devices: run it under torchrun.*--nproc-per-node 2"):
        Trainer(cfg)
    monkeypatch.setenv("WORLD_SIZE", "4")
    with pytest.raises(ConfigError, match=r"torchrun started 4 processes but parallel .* spans 2 devices.*"
                                          r"parallel.data=4"):
        Trainer(cfg)
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ValueError, match="cuda_graph=True cannot run under parallel"):
        Trainer(cfg, cuda_graph=True)
    assert not (tmp_path / "model").exists() and not list(tmp_path.iterdir())  # nothing was written


def test_uneven_experts_and_aux_loss_are_refused(models, tmp_path, monkeypatch):
    from shared_math.config import ModelConfig
    from shared_math.tiny import tiny_hf_config
    from shared_math.train_config import ParallelSection
    from torch_impl.parallel import check_experts
    from torch_impl.train import Trainer

    monkeypatch.setenv("WORLD_SIZE", "6")
    cfg = load_run_config(None, [*RUN, "data.batch_size=6", f"model.path={models['qwen']}",
                                 f"train.out_dir={tmp_path}", "parallel.data=2", "parallel.expert=3"])
    with pytest.raises(ConfigError, match=r"parallel.expert=3 does not divide the 8 routed experts of this model; "
                                          r"expert sizes that divide both 8 and 6 GPUs: 1, 2; set parallel.expert"):
        Trainer(cfg)
    aux = ModelConfig.from_hf(tiny_hf_config("qwen3_moe", output_router_logits=True))
    with pytest.raises(ConfigError, match="load-balancing aux loss"):
        check_experts(ParallelSection(data=2), aux)
    check_experts(ParallelSection(), aux)  # one device: the aux loss is the single-device one


def test_sharded_model_refuses_compile_and_cuda_graph(models):
    from torch_impl.compile import compile_decoder_layers
    from torch_impl.cuda_graph import check_capturable
    from torch_impl.load import load_model
    from torch_impl.parallel import ExpertParallelExperts, is_sharded

    model = load_model(models["qwen"])
    assert not is_sharded(model)
    mlp = model.layers[0].mlp
    mlp.experts = ExpertParallelExperts(mlp.experts, rank=1, size=2, group=None)  # what shard_model installs
    assert mlp.experts.num_experts == 4 and tuple(mlp.experts.down_proj.shape)[0] == 4
    for refuse in (compile_decoder_layers, check_capturable):
        with pytest.raises(ValueError, match="cannot run a model sharded over several devices"):
            refuse(model)
