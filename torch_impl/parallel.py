"""Training over several devices: the run config's `parallel:` mesh (data × fsdp × expert), FSDP2 sharding of the
model, and expert parallelism for the MoE layers.

Shape legend: T tokens · H hidden · E experts (E_loc = E / expert on one expert rank) · K experts per token ·
M = T·K routed rows · N rows a rank receives for its own experts · X expert ranks.

Launch: one process per device under `torchrun` (RANK / WORLD_SIZE / LOCAL_RANK), `init_process_group` with NCCL on
CUDA and gloo on CPU. `make_mesh` builds `init_device_mesh(("data", "fsdp", "expert"))`, expert innermost: rank
r = (d·F + f)·X + x. Every rank trains on its own rows of the global batch.

Who holds what, and how each gradient is summed (every rank's loss is its tokens' summed cross-entropy over the
*global* valid-token count, so the true gradient is the plain sum of the ranks' gradients):

- routed experts (`mlp.experts`: W_gate_up, W_down, biases, expert LoRA A/B): expert rank x keeps experts
  x·E_loc:(x+1)·E_loc (`ExpertParallelExperts`), whole, sharded by FSDP2 over `fsdp` and replicated over `data`
  (HSDP on the mesh ["data", "fsdp"]). Expert e's gradient is complete within one expert group (the X ranks that
  share data and fsdp coordinates: all-to-all brings it every routed row of that group), so FSDP2 sums it by
  reduce-scatter over fsdp and all-reduce over data: nothing is summed over `expert`.
- everything else (attention and its LoRA, norms, router, shared experts, dense MLPs, embeddings, lm_head):
  sharded by FSDP2 over `fsdp`, replicated over data × expert (HSDP, replicate dim = data·expert): every rank
  contributes, so it is summed over all of them.
FSDP2 averages by default; here every unit sums (`set_gradient_divide_factor(1)`, sum-only collectives, which gloo
also supports), because the loss is already normalised globally.

Expert parallelism (`ExpertParallelExperts.forward`): the routed rows, sorted by expert once, go to the rank owning
their expert by `all_to_all_single`, after the per-expert row counts were exchanged (an all-to-all of E integers)
so that every rank knows its split sizes; the local experts run through the same `Experts.forward` (split-LoRA
backends) on the received rows; a second all-to-all returns the outputs, and the source rank applies the routing
weights, restores the token order and sums over K (`backends.native.combine_rows`, the single-device rule). Both
all-to-alls are an autograd Function whose backward is the reverse all-to-all.

Checkpoints and adapters hold full tensors in the single-device format (`full_tensor`, `local_part`), so a run
saved on N devices resumes on M. `torch_impl.cuda_graph` and `torch_impl.compile` refuse a sharded model.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.utils.checkpoint
from torch import nn

from shared_math.config import ModelConfig
from shared_math.train_config import ConfigError, ParallelSection
from torch_impl.backends.native import combine_rows, gather_rows
from torch_impl.moe import Experts, MoEBlock, sort_by_expert

AXES = ("data", "fsdp", "expert")
IGNORE_INDEX = -100

__all__ = ["AXES", "ExpertParallelExperts", "ParallelMesh", "all_finite", "all_gather_rows", "all_to_all",
           "check_experts", "check_launch", "expert_sharded", "full_lora", "full_optimizer_state", "full_shape",
           "full_tensor", "grad_norm", "init_distributed", "is_sharded", "launched_world_size", "load_full_lora",
           "local_part", "local_rows", "loss_rows", "make_mesh", "no_early_stop", "refuse_sharded", "shard_model",
           "shard_optimizer_state", "valid_tokens"]


def _fsdp():
    """FSDP2's (FSDPModule, MixedPrecisionPolicy, fully_shard), imported on first use: torch.distributed's FSDP and
    DTensor add 0.7 s to every import of the trainer otherwise."""
    try:  # public since torch 2.6; torch 2.4/2.5 had it under _composable
        from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
    except ImportError:  # pragma: no cover - older torch
        from torch.distributed._composable.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
    return FSDPModule, MixedPrecisionPolicy, fully_shard


def _is_dtensor(t: torch.Tensor) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(t, DTensor)


# ---- launch and validation -------------------------------------------------------------------------------------------

def launched_world_size() -> int | None:
    """WORLD_SIZE as torchrun set it, or None outside torchrun."""
    w = os.environ.get("WORLD_SIZE")
    return int(w) if w else None


def _layouts(devices: int) -> str:
    return ", ".join(f"parallel.{k}={devices}" for k in AXES)


def check_launch(par: ParallelSection) -> None:
    """Refuse (ConfigError), before any work, a mesh that does not match the processes torchrun started."""
    world = launched_world_size()
    if world is None:
        if par.devices > 1:
            raise ConfigError(
                f"parallel ({par.describe()}) asks for {par.devices} devices: run it under torchrun, one process per "
                f"device: `torchrun --standalone --nproc-per-node {par.devices} -m splitmoe train ...` (gloo on CPU, "
                "NCCL on GPUs), or set the parallel sizes to 1 to train in this one process")
        return
    if world != par.devices:
        raise ConfigError(
            f"torchrun started {world} processes but parallel ({par.describe()}) spans {par.devices} devices: "
            f"data·fsdp·expert must equal the process count; set e.g. {_layouts(world)} (the others 1), or start "
            f"torchrun with --nproc-per-node {par.devices}")


def check_experts(par: ParallelSection, model_cfg: ModelConfig) -> None:
    """Refuse (ConfigError) a mesh this model cannot take: an expert axis that does not divide the routed experts
    (each expert rank holds whole experts), or the load-balancing aux loss, whose per-expert statistics are over
    all tokens of a batch and would be taken per device here."""
    from shared_math.plan import LayoutError, Parallel, check_layout

    if par.expert > 1 and model_cfg.num_experts:
        try:
            check_layout(model_cfg, Parallel(par.data, par.fsdp, par.expert))
        except LayoutError as e:
            raise ConfigError(f"parallel.{e}; set parallel.expert to one of those sizes") from None
    if par.devices > 1 and model_cfg.has_aux_loss and model_cfg.hf_config.get("output_router_logits", False):
        raise ConfigError("this model's config.json sets output_router_logits: its load-balancing aux loss is a "
                          "statistic over the whole batch, which the sharded step does not gather yet; train it on "
                          "one device, or set output_router_logits to false")


def init_distributed(device: str | torch.device) -> torch.device:
    """Join torchrun's process group (NCCL on CUDA, gloo on CPU; already joined: reused) -> this rank's device
    (`cuda:LOCAL_RANK` for a CUDA request, else the CPU)."""
    dev = torch.device(device)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"device {str(device)!r}: torch sees no CUDA GPU here; train on device 'cpu' (gloo)")
        dev = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(dev)
    elif dev.type != "cpu":
        raise ConfigError(f"parallel training runs on CUDA (NCCL) or the CPU (gloo), not on {dev.type}")
    if not dist.is_initialized():
        # a generous timeout: a rank stuck in a collective fails the run instead of hanging it forever
        kw: dict[str, Any] = {"timeout": timedelta(minutes=30)}
        if dev.type == "cuda":
            kw["device_id"] = dev
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo", **kw)
    return dev


# ---- the mesh --------------------------------------------------------------------------------------------------------

@dataclass
class ParallelMesh:
    """The device meshes of one run: `mesh` (data, fsdp, expert); `expert_mesh` (data, fsdp) on which the routed
    experts are HSDP-sharded; `dense_mesh` (replicate = data·expert, fsdp) for every other parameter; the process
    group of this rank's expert axis (None when expert = 1)."""

    par: ParallelSection
    device: torch.device
    mesh: Any  # torch.distributed.device_mesh.DeviceMesh (imported on first use, as FSDP2)
    expert_mesh: Any
    dense_mesh: Any
    expert_group: dist.ProcessGroup | None
    rank: int
    world: int

    @property
    def expert_rank(self) -> int:
        return self.mesh.get_local_rank("expert")

    @property
    def data_rank(self) -> int:
        return self.mesh.get_local_rank("data")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def all_sum(self, values: list[float]) -> list[float]:
        """Each value summed over every rank (float64; one all-reduce)."""
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return t.tolist()

    def all_true(self, flag: bool) -> bool:
        t = torch.tensor([int(flag)], dtype=torch.int32, device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MIN)
        return bool(t.item())

    def barrier(self) -> None:
        dist.barrier()

    def rank0_first(self, fn: Callable[[], Any]) -> Any:
        """`fn()` on rank 0, then on the other ranks (rank 0 builds files, e.g. a tiny checkpoint, that the others
        then read); an error on rank 0 is raised on every rank, so none waits forever."""
        result, error = None, None
        if self.rank == 0:
            try:
                result = fn()
            except Exception as e:  # noqa: BLE001 - re-raised below, after telling the other ranks
                error = e
        msg = [None if error is None else f"{type(error).__name__}: {error}"]
        dist.broadcast_object_list(msg, src=0)
        if error is not None:
            raise error
        if msg[0] is not None:
            raise ConfigError(f"rank 0 failed to prepare the run: {msg[0]}")
        return fn() if self.rank != 0 else result


def make_mesh(par: ParallelSection, device: torch.device) -> ParallelMesh:
    """The meshes of `par` over the joined process group (whose size must be par.devices)."""
    from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

    world = dist.get_world_size()
    if world != par.devices:
        raise ConfigError(f"the process group has {world} ranks, parallel ({par.describe()}) needs {par.devices}")
    D, F, X = par.data, par.fsdp, par.expert
    mesh = init_device_mesh(device.type, (D, F, X), mesh_dim_names=AXES)
    ranks = torch.arange(world).view(D, F, X)
    # every rank is in this 2-D mesh once: rows = (data, expert) pairs, columns = fsdp; built from its rank table
    # (slicing a flattened data·expert dim out of the root mesh is deprecated from torch 2.11)
    dense = DeviceMesh(device.type, ranks.permute(0, 2, 1).reshape(D * X, F), mesh_dim_names=("replicate", "fsdp"))
    return ParallelMesh(par=par, device=device, mesh=mesh, expert_mesh=mesh["data", "fsdp"], dense_mesh=dense,
                        expert_group=mesh["expert"].get_group() if X > 1 else None, rank=dist.get_rank(),
                        world=world)


# ---- expert parallelism ----------------------------------------------------------------------------------------------

class _AllToAll(torch.autograd.Function):
    """Rows [n, ...] -> rows [sum(out_splits), ...] by `all_to_all_single`; backward: the reverse all-to-all."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, out_splits: list[int], in_splits: list[int],
                group: dist.ProcessGroup) -> torch.Tensor:
        ctx.out_splits, ctx.in_splits, ctx.group = out_splits, in_splits, group
        out = x.new_empty((sum(out_splits), *x.shape[1:]))
        dist.all_to_all_single(out, x.contiguous(), out_splits, in_splits, group=group)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        dx = grad.new_empty((sum(ctx.in_splits), *grad.shape[1:]))
        dist.all_to_all_single(dx, grad.contiguous(), ctx.in_splits, ctx.out_splits, group=ctx.group)
        return dx, None, None, None


def all_to_all(x: torch.Tensor, out_splits: list[int], in_splits: list[int],
               group: dist.ProcessGroup) -> torch.Tensor:
    """Differentiable `all_to_all_single`: send `in_splits[j]` rows of `x` (in order) to rank j of `group`, receive
    `out_splits[j]` rows from it."""
    return _AllToAll.apply(x, out_splits, in_splits, group)


class ExpertParallelExperts(Experts):
    """`Experts` holding E_loc = E / X of the routed experts (this expert rank's contiguous block), reached by
    all-to-all from every rank of the expert group. Same parameter names as `Experts` (each with E_loc rows), so
    LoRA names, FSDP units and the optimizer see the usual model; `global_experts` is E."""

    # the local experts' output comes back by all-to-all and is weighted there (`combine_rows`), which saves it for
    # the routing weights' gradient: the recompute must compute it
    output_unread_in_recompute = False

    def __init__(self, experts: Experts, *, rank: int, size: int, group: dist.ProcessGroup) -> None:
        E = experts.num_experts
        if E % size:
            raise ConfigError(f"parallel.expert={size} does not divide the {E} routed experts")
        nn.Module.__init__(self)
        for k, v in vars(experts).items():  # lora_scale, activation, backend, training, ... (not the registries)
            if not k.startswith("_"):
                setattr(self, k, v)
        self.global_experts, self.num_experts = E, E // size
        self.expert_rank, self.group_size, self.group = rank, size, group
        lo, hi = rank * self.num_experts, (rank + 1) * self.num_experts
        for name, p in experts._parameters.items():  # same names, same order (optimizer state is by position)
            self.register_parameter(name, None if p is None else
                                    nn.Parameter(p.detach()[lo:hi].clone(), requires_grad=p.requires_grad))

    def forward(self, x_TH: torch.Tensor, expert_ids_TK: torch.Tensor, expert_weights_TK: torch.Tensor,
                sort=None) -> torch.Tensor:
        X, E_loc = self.group_size, self.num_experts
        srt = sort if sort is not None else sort_by_expert(expert_ids_TK, self.global_experts)
        x_MH = gather_rows(x_TH, srt)  # sorted by expert: the rows for rank j are one contiguous block
        # exchange the row counts per expert, so that each rank knows what it receives from every other
        recv_XE = torch.empty(X * E_loc, dtype=srt.group_sizes_E.dtype, device=x_TH.device)
        dist.all_to_all_single(recv_XE, srt.group_sizes_E.contiguous(), group=self.group)
        counts = torch.cat([srt.group_sizes_E.view(X, E_loc).sum(1), recv_XE.view(X, E_loc).sum(1)])
        counts = counts.tolist()  # the one host sync: all_to_all_single takes its split sizes on the host
        send, recv = counts[:X], counts[X:]
        x_NH = all_to_all(x_MH, recv, send, self.group)
        N = x_NH.shape[0]
        if N:
            # rows arrive grouped by source rank, then by local expert: label each with its local expert and let
            # Experts.forward sort them (K = 1, weight 1: the routing weights are applied at the source, below)
            local_E = torch.arange(E_loc, device=x_NH.device).repeat(X)
            ids_N1 = torch.repeat_interleave(local_E, recv_XE, output_size=N)[:, None]
            y_NH = super().forward(x_NH, ids_N1, torch.ones(N, 1, dtype=x_NH.dtype, device=x_NH.device),
                                   sort=sort_by_expert(ids_N1, E_loc, check=False))
        else:
            y_NH = self._no_rows(x_NH)
        o_MH = all_to_all(y_NH, send, recv, self.group)
        return combine_rows(o_MH, expert_weights_TK.to(x_TH.dtype), srt)

    def _no_rows(self, x_NH: torch.Tensor) -> torch.Tensor:
        """The [0, H] output of a rank that received no rows, still connected to the received rows and to every
        trainable parameter (with zero gradients): every rank must run the reverse all-to-alls in backward, and
        FSDP2 reduce-scatters a unit's gradients only where they exist, so a rank without them would desynchronise
        the collectives."""
        H = self.down_proj.shape[-1]
        y = (x_NH[:, :1] * 0).expand(0, H)
        for p in self.parameters():
            if p.requires_grad:
                y = y + p.sum() * 0
        return y


# ---- sharding --------------------------------------------------------------------------------------------------------

def shard_model(model: nn.Module, pm: ParallelMesh, *, moe_backend: str | None = None) -> nn.Module:
    """Shard a torch_impl causal LM in place for `pm` and return it: the routed experts of every MoE layer replaced
    by this expert rank's `ExpertParallelExperts` (expert > 1), then FSDP2 units for each layer's experts
    (`expert_mesh`), its router when trained, each decoder layer and the root (`dense_mesh`), all summing their
    gradients. `moe_backend`: the experts' backend from now on (a model loaded on the CPU for a GPU run)."""
    FSDPModule, MixedPrecisionPolicy, fully_shard = _fsdp()
    if moe_backend is not None:
        for m in model.modules():
            if isinstance(m, Experts):
                m.backend = moe_backend
    # gradients reduced in fp32 whatever the parameter dtype (a trained bf16 router's too), then cast back
    kw = dict(mp_policy=MixedPrecisionPolicy(reduce_dtype=torch.float32))
    for layer in model.layers:
        mlp = layer.mlp
        if isinstance(mlp, MoEBlock):
            if pm.par.expert > 1:
                mlp.experts = ExpertParallelExperts(mlp.experts, rank=pm.expert_rank, size=pm.par.expert,
                                                    group=pm.expert_group)
            fully_shard(mlp.experts, mesh=pm.expert_mesh, **kw)
            if any(p.requires_grad for p in mlp.router.parameters()):
                # its own unit: FSDP2 wants one dtype among a unit's trainable parameters, and a trained router
                # keeps the model's dtype (bf16) beside the fp32 LoRA tensors (lora.train_router)
                fully_shard(mlp.router, mesh=pm.dense_mesh, **kw)
        fully_shard(layer, mesh=pm.dense_mesh, **kw)
    fully_shard(model, mesh=pm.dense_mesh, **kw)
    for m in model.modules():
        if isinstance(m, FSDPModule):
            m.set_gradient_divide_factor(1.0)
            # sums through plain SUM collectives (gloo has no PREMUL_SUM / AVG); with factor 1 nothing is divided
            m.set_force_sum_reduction_for_comms(True)
    return model


def is_sharded(model: nn.Module) -> bool:
    """Whether `shard_model` (FSDP2, expert parallelism) has been applied to `model`."""
    FSDPModule = _fsdp()[0]
    return any(isinstance(m, FSDPModule | ExpertParallelExperts) for m in model.modules())


def refuse_sharded(model: nn.Module, what: str) -> None:
    """Raise ValueError when `model` is sharded: `what` (a CUDA graph, torch.compile) does not compose with it."""
    if is_sharded(model):
        raise ValueError(f"{what} cannot run a model sharded over several devices (parallel: FSDP2 units, and "
                         "expert-parallel all-to-alls whose split sizes come from the router on the host); train "
                         "without it when parallel has more than one device")


def expert_sharded(model: nn.Module) -> set[int]:
    """ids of the parameters that hold only this expert rank's experts (after `shard_model`)."""
    return {id(p) for m in model.modules() if isinstance(m, ExpertParallelExperts) for p in m.parameters()}


def no_early_stop() -> AbstractContextManager:
    """Activation checkpointing recomputes a layer in full under expert parallelism: its early stop ends the
    recomputation at the last tensor it needs, which differs between ranks (their experts get different rows), and a
    rank stopping before an all-to-all would leave the others waiting in it."""
    ctx = getattr(torch.utils.checkpoint, "set_checkpoint_early_stop", None)
    return ctx(False) if ctx is not None else nullcontext()


# ---- full tensors <-> this rank's part -------------------------------------------------------------------------------

def full_tensor(t: torch.Tensor, expert: bool, pm: ParallelMesh) -> torch.Tensor:
    """The whole tensor of a sharded parameter, gradient or optimizer state (a collective: every rank calls it),
    on the CPU: FSDP2's shards gathered, then, for `expert` (expert-sharded) tensors, the expert blocks of the
    expert group concatenated along E."""
    full = (t.full_tensor() if _is_dtensor(t) else t).detach()
    if expert and pm.expert_group is not None:
        parts = [torch.empty_like(full) for _ in range(pm.par.expert)]
        dist.all_gather(parts, full.contiguous(), group=pm.expert_group)
        full = torch.cat(parts)
    return full.cpu()


def _chunk(t: torch.Tensor, n: int, dim: int, i: int) -> torch.Tensor:
    """Chunk i of n along `dim` as DTensor's Shard places it (torch.chunk; trailing chunks may be empty)."""
    chunks = list(torch.chunk(t, n, dim=dim))
    return chunks[i] if i < len(chunks) else t.narrow(dim, 0, 0)


def local_part(full: torch.Tensor, like: torch.Tensor, expert: bool, pm: ParallelMesh) -> torch.Tensor:
    """This rank's part of the whole tensor `full`, shaped and placed like `like` (a sharded parameter, or a DTensor
    of its layout): the inverse of `full_tensor`. Plain tensor for a plain `like`, else a DTensor."""
    if expert and pm.expert_group is not None:
        full = full.chunk(pm.par.expert)[pm.expert_rank]
    from torch.distributed.tensor import DTensor

    if not isinstance(like, DTensor):
        return full.to(device=like.device, dtype=like.dtype)
    part = full
    for i, pl in enumerate(like.placements):
        if pl.is_shard():
            part = _chunk(part, like.device_mesh.size(i), pl.dim, like.device_mesh.get_local_rank(i))
    part = part.to(device=like.device, dtype=like.dtype).contiguous()
    return DTensor.from_local(part, like.device_mesh, like.placements, run_check=False, shape=like.shape,
                              stride=like.stride())


def full_shape(p: torch.Tensor, expert: bool, pm: ParallelMesh) -> tuple[int, ...]:
    """The whole tensor's shape of a sharded parameter (FSDP2's DTensor shape, times the expert ranks along E)."""
    shape = tuple(p.shape)
    return (shape[0] * pm.par.expert, *shape[1:]) if expert else shape


# ---- rows ------------------------------------------------------------------------------------------------------------

def valid_tokens(labels: np.ndarray) -> int:
    """Positions that count in the causal-LM loss (HF's shift: position t is scored against labels[t + 1])."""
    return int((labels[:, 1:] != IGNORE_INDEX).sum())


def local_rows(batch: dict[str, np.ndarray], pm: ParallelMesh, *, pad: bool = False
               ) -> tuple[dict[str, np.ndarray], int]:
    """This rank's rows of a batch -> (rows, rows in the padded batch). Rank r takes rows r·b:(r+1)·b of B = W·b.
    `pad` (evaluation): a batch whose rows do not split evenly is padded with copies of its first row, labelled
    -100 so they add nothing to a loss; the caller drops their outputs. Training batches split evenly (the config
    refuses a batch size that does not)."""
    B = next(iter(batch.values())).shape[0]
    if B % pm.world:
        if not pad:
            raise ValueError(f"a batch of {B} rows does not split over {pm.world} ranks")
        extra = pm.world - B % pm.world
        batch = {k: np.concatenate([v, np.repeat(v[:1], extra, axis=0)]) for k, v in batch.items()}
        if "labels" in batch:
            batch["labels"][B:] = IGNORE_INDEX
    total = next(iter(batch.values())).shape[0]
    b = total // pm.world
    return {k: v[pm.rank * b:(pm.rank + 1) * b] for k, v in batch.items()}, total


def loss_rows(rows: dict[str, np.ndarray], n_global: int) -> tuple[dict[str, np.ndarray], float]:
    """(rows to run, weight) such that `weight · model(rows).loss` is this rank's share of the batch's mean loss:
    its tokens' summed cross-entropy over the global valid-token count `n_global` (the same for every rank, so the
    shares and their gradients add up to the single-device loss and gradients).

    A rank whose rows hold no valid target still runs the forward and backward (its experts serve the other ranks,
    and every collective needs it): one position is labelled with its own next token, so the model's mean is finite,
    and the weight is 0, so it contributes nothing."""
    n_local = valid_tokens(rows["labels"])
    if n_local:
        return rows, n_local / n_global if n_global else float("nan")  # no valid token at all: NaN, as on 1 device
    labels = rows["labels"].copy()
    labels[0, -1] = rows["input_ids"][0, -1]
    return {**rows, "labels": labels}, 0.0


def all_gather_rows(t: torch.Tensor, pm: ParallelMesh) -> torch.Tensor:
    """Every rank's rows of `t` (the same shape on every rank), concatenated in rank order on every rank."""
    parts = [torch.empty_like(t) for _ in range(pm.world)]
    dist.all_gather(parts, t.contiguous())
    return torch.cat(parts)


# ---- training state: whole tensors in, whole tensors out -------------------------------------------------------------

def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if _is_dtensor(t) else t


def grad_norm(params: list[torch.Tensor], expert_ids: set[int], pm: ParallelMesh) -> float:
    """Global L2 norm of the whole gradients of `params` from their shards, each element counted once: the routed
    experts' gradients from the ranks of data replica 0 (fsdp shards × expert blocks), every other gradient from the
    ranks of data replica 0 and expert rank 0 (its fsdp shards; the other ranks hold the same values again)."""
    mine = [p.grad for p in params if p.grad is not None
            and pm.data_rank == 0 and (id(p) in expert_ids or pm.expert_rank == 0)]
    local = [_local(g) for g in mine]
    sq = float(torch.stack([torch.linalg.vector_norm(g.float()) for g in local]).double().square().sum()) \
        if local else 0.0
    return pm.all_sum([sq])[0] ** 0.5


def all_finite(params: list[torch.Tensor], pm: ParallelMesh) -> bool:
    """Whether every shard of every tensor on every rank is finite (one max-|x| kernel, one all-reduce)."""
    local = [t for t in (_local(p) for p in params) if t.numel()]
    ok = bool(torch.stack(torch._foreach_norm(local, float("inf"))).isfinite().all()) if local else True
    return pm.all_true(ok)


def full_lora(named: dict[str, torch.Tensor], expert_ids: set[int], pm: ParallelMesh, *,
              grads: bool = False) -> dict[str, np.ndarray]:
    """Whole LoRA tensors (or their gradients, zero where there is none) as float32 numpy on every rank, from the
    canonical name -> sharded parameter map (`torch_impl.lora.lora_parameters`). A collective."""
    out = {}
    for name, p in named.items():
        t = p if not grads else (p.grad if p.grad is not None else torch.zeros_like(p))
        out[name] = full_tensor(t, id(p) in expert_ids, pm).float().numpy()
    return out


def load_full_lora(named: dict[str, torch.Tensor], tensors: dict[str, np.ndarray], expert_ids: set[int],
                   pm: ParallelMesh) -> None:
    """Copy whole canonical LoRA tensors into the sharded parameters (each rank its part; no communication).
    ValueError when names or whole shapes differ."""
    missing, extra = sorted(set(named) - set(tensors)), sorted(set(tensors) - set(named))
    if missing or extra:
        raise ValueError(f"LoRA tensors do not match the model's adapters: {len(missing)} missing (e.g. "
                         f"{missing[:5]}), {len(extra)} unexpected (e.g. {extra[:5]})")
    with torch.no_grad():
        for name, p in named.items():
            expert = id(p) in expert_ids
            full = torch.as_tensor(np.asarray(tensors[name]))
            if tuple(full.shape) != full_shape(p, expert, pm):
                raise ValueError(f"LoRA tensor {name} has shape {tuple(full.shape)}, the model needs "
                                 f"{full_shape(p, expert, pm)}")
            _local(p).copy_(_local(local_part(full, p, expert, pm)))


def full_optimizer_state(sd: dict[str, Any], params: list[torch.Tensor], expert_ids: set[int],
                         pm: ParallelMesh) -> dict[str, Any]:
    """An optimizer state_dict over sharded `params` (its state keyed by position in `params`) with every sharded
    tensor made whole on the CPU: the single-device layout. A collective."""
    state = {i: {k: full_tensor(v, id(params[i]) in expert_ids, pm) if _is_dtensor(v) else v
                 for k, v in st.items()} for i, st in sd["state"].items()}
    return {"state": state, "param_groups": sd["param_groups"]}


def shard_optimizer_state(sd: dict[str, Any], params: list[torch.Tensor], expert_ids: set[int],
                          pm: ParallelMesh) -> dict[str, Any]:
    """The inverse of `full_optimizer_state`: whole-tensor state (e.g. from a single-device checkpoint) cut to this
    rank's shards, laid out like each parameter, for `optimizer.load_state_dict`."""
    state = {}
    for i, st in sd["state"].items():
        if not 0 <= int(i) < len(params):
            raise ValueError(f"optimizer state for tensor #{i}, but the model has {len(params)} trainable tensors")
        p = params[int(i)]
        expert = id(p) in expert_ids
        state[i] = {}
        for k, v in st.items():
            if torch.is_tensor(v) and v.ndim:  # moments: shaped like the parameter; `step` is a scalar, kept
                if tuple(v.shape) != full_shape(p, expert, pm):
                    raise ValueError(f"optimizer state {k} of tensor #{i} has shape {tuple(v.shape)}, the model's "
                                     f"tensor is {full_shape(p, expert, pm)}")
                v = local_part(v, p, expert, pm)
            state[i][k] = v
    return {"state": state, "param_groups": sd["param_groups"]}
