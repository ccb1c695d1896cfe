"""One rank of tests/torch/test_parallel.py: `main(JOB.json)` runs the job's checks in order on every rank (one process
start for many checks); rank 0 writes each check's results under the job's `out` folder, and the test compares them
with single-device runs. The test forks its ranks with torchrun's environment; by hand:
`torchrun --standalone --nproc-per-node N -m tests.torch.parallel_worker JOB.json`.

Checks (`kind`):
- `experts`: `ExpertParallelExperts` against the whole `Experts` module on crafted routing where every token goes to
  the first expert rank's block, so the other ranks receive no rows and half the experts get no token: outputs and
  the gradients of x, the routing weights and every LoRA tensor.
- `grads`: one `Trainer._backward()` of a config (optionally with activation checkpointing, or with some rows'
  labels blanked so a rank has no valid token) -> loss, grad norm and every whole LoRA gradient (`{name}.npz`).
- `train`: `torch_impl.train.train` (stop / resume as given) -> losses and grad norms (`{name}.json`).
- `cli`: `splitmoe train ...` through the CLI, as `torchrun -m splitmoe train` runs it -> each rank's exit code and
  printed output (`{name}.json`).
- `cut`: a copy of a run folder cut back to an earlier checkpoint (`cut_run`), for a `train` check to resume.
"""

from __future__ import annotations

import contextlib
import io
import json
import shutil
import sys
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist


def _write_json(out: Path, name: str, data: dict) -> None:
    if dist.get_rank() == 0:
        (out / f"{name}.json").write_text(json.dumps(data))


def _experts(check: dict, out: Path) -> None:
    from torch import nn

    from torch_impl.moe import Experts
    from torch_impl.parallel import ExpertParallelExperts

    rank, world = dist.get_rank(), dist.get_world_size()
    E, H, I, R, T = 2 * world, 8, 6, 3, 5
    g = torch.Generator().manual_seed(0)  # the same module on every rank
    ref = Experts(E, H, I, bias=True, activation="swiglu_oai", backend="native")
    with torch.no_grad():
        for p in ref.parameters():
            p.copy_(torch.randn(p.shape, generator=g))
    for name, shape in (("gate_up_lora_A", (E, H, R)), ("gate_up_lora_B", (E, R, 2 * I)),
                        ("down_lora_A", (E, I, R)), ("down_lora_B", (E, R, H))):
        setattr(ref, name, nn.Parameter(torch.randn(shape, generator=g)))
    ref.lora_scale, ref.gate_up_lora_scale = 0.5, 0.75
    ep = ExpertParallelExperts(ref, rank=rank, size=world, group=dist.group.WORLD)

    gr = torch.Generator().manual_seed(100 + rank)  # each rank its own tokens
    x = torch.randn(T, H, generator=gr)
    # every token of every rank goes to experts 0 and 1 (rank 0's block): the other ranks receive no rows
    ids = torch.tensor([[0, 1], [1, 0]] * T)[:T]
    w = torch.softmax(torch.randn(T, 2, generator=gr), -1)
    upstream = torch.randn(T, H, generator=gr)

    def run(module):
        xr, wr = x.clone().requires_grad_(), w.clone().requires_grad_()
        y = module(xr, ids, wr)
        (y * upstream).sum().backward()
        return y.detach(), xr.grad, wr.grad

    y_ref, dx_ref, dw_ref = run(ref)
    y_ep, dx_ep, dw_ep = run(ep)
    lo, hi = rank * ep.num_experts, (rank + 1) * ep.num_experts
    errs = {"y": (y_ep - y_ref).abs().max().item() / y_ref.abs().max().item(),
            "dx": (dx_ep - dx_ref).abs().max().item() / dx_ref.abs().max().item(),
            "dw": (dw_ep - dw_ref).abs().max().item() / dw_ref.abs().max().item()}
    missing = []
    for name, p in ref.named_parameters():
        if not p.requires_grad:  # the frozen base weights and biases
            continue
        full = p.grad.clone()
        dist.all_reduce(full)  # the whole-module gradient is the sum of every rank's tokens' gradients
        mine = getattr(ep, name).grad
        if mine is None:
            missing.append(name)
            continue
        scale = max(full.abs().max().item(), 1e-30)
        errs[name] = (mine - full[lo:hi]).abs().max().item() / scale
    # rows this rank's experts receive: every rank routes alike, so world × its own rows for this block
    received = int(((ids >= lo) & (ids < hi)).sum()) * world
    report = {"rank": rank, "errs": errs, "missing_grads": missing, "rows_received": received}
    reports = [None] * world
    dist.all_gather_object(reports, report)
    _write_json(out, check["name"], {"ranks": reports})


def _config(check: dict):
    from shared_math.train_config import load_run_config

    return load_run_config(None, check["overrides"])


def _grads(check: dict, out: Path) -> None:
    from torch_impl.train import Trainer

    tr = Trainer(_config(check))
    if check.get("checkpointing"):
        tr.model.gradient_checkpointing_enable(offload_to_cpu=check["checkpointing"] == "offload")
    blank = check.get("blank_rows")
    if blank:
        batch = tr.run.train_data.batch

        def blanked(i: int) -> dict:
            b = {k: v.copy() for k, v in batch(i).items()}
            b["labels"][blank] = -100
            return b

        tr.run.train_data.batch = blanked
    loss = tr._backward()
    norm = tr._grad_norm()
    grads = tr._lora_grads()
    if tr.is_main:
        np.savez(out / f"{check['name']}.npz", __loss__=np.float64(loss), __grad_norm__=np.float64(norm), **grads)


def _train(check: dict, out: Path) -> None:
    from torch_impl.train import train

    res = train(_config(check), resume=check.get("resume", False), stop_after=check.get("stop_after"),
                progress=False)
    _write_json(out, check["name"], {"losses": res.losses, "grad_norms": res.grad_norms,
                                     "start": res.start_step, "final": res.final_step})


def cut_run(src: Path, dst: Path, step: int) -> Path:
    """A copy of run folder `src` cut back to its checkpoint at `step` (later checkpoints and the adapter gone), to
    be resumed from there."""
    shutil.copytree(src, dst)
    for p in (dst / "checkpoints").glob("step_*"):
        if int(p.name.split("_")[1]) > step:
            shutil.rmtree(p)
    shutil.rmtree(dst / "adapter", ignore_errors=True)
    return dst


def _cut(check: dict, out: Path) -> None:
    if dist.get_rank() == 0:
        cut_run(Path(check["src"]), Path(check["dst"]), check["step"])
    dist.barrier()


def _cli(check: dict, out: Path) -> None:
    from splitmoe.cli import main

    with contextlib.redirect_stdout(io.StringIO()) as printed:
        rc = main(check["args"])
    ranks = [None] * dist.get_world_size()
    dist.all_gather_object(ranks, {"rc": rc, "stdout": printed.getvalue()})
    _write_json(out, check["name"], {"ranks": ranks})


def main(job_path: str) -> None:
    job = json.loads(Path(job_path).read_text())
    out = Path(job["out"])
    dist.init_process_group("gloo")  # the trainers join this group (torch_impl.parallel.init_distributed)
    torch.set_num_threads(1)
    for check in job["checks"]:
        {"experts": _experts, "grads": _grads, "train": _train, "cut": _cut, "cli": _cli}[check["kind"]](check, out)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
