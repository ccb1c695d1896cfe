"""Multi-device training for jax_impl over one `jax.sharding.Mesh` (the twin of torch_impl/parallel.py): the mesh of
the run config's `parallel:` section, where every array lives on it, and the MoE layer's dispatch across the expert
axis under `shard_map`. The models stay unaware of it except through `Experts.expert_parallel` (jax_impl/moe.py).

Mesh axes ("data", "fsdp", "expert"), sizes `parallel.data/fsdp/expert`, product = the devices used (one process sees
them all: GPUs, or CPU host devices with `XLA_FLAGS=--xla_force_host_platform_device_count=N`).

Placement (`NamedSharding`, `param_spec`):
- batch rows over all three axes (every device its own B / devices rows);
- frozen weights over `fsdp` on their largest axis that `fsdp` divides (replicated over fsdp when none does);
  routed expert tensors (`Experts`' [E, ...] weights, biases and LoRA factors) also over `expert` on E;
- LoRA factors by the same rule as any tensor (each factor's E axis over `expert`, its largest other axis over
  `fsdp`), AdamW's moments exactly as the factor they belong to, scalars (step count, hyper-parameters) replicated.
Everything outside the MoE dispatch is left to XLA's SPMD partitioner: sharded inputs to one `jit`, and the LoRA
gradients and updated state constrained to the placements above (`TreeSharding.constrain`), so the step is sharded
end to end and its outputs stay where its inputs were. The loss is the model's own: a mean over the global valid
tokens, the same number as on one device.

MoE under `shard_map` (`split_lora_experts_sharded`): tokens are split over all axes; expert rank r (its index on
the "expert" axis) holds experts [r·E/ep, (r+1)·E/ep). Each device sorts its M = T·K routed rows by expert once,
sends every row to the rank that owns its expert, runs its local experts on what it received through the same
backend `expert_mlp_sorted` as one device does (ragged_dot / Pallas), sends the outputs back, and weights and sums
over K as `moe.split_lora_experts`. With expert = 1 nothing is exchanged: each device runs
`moe.split_lora_experts` (any backend, the fused Pallas entry included) on its own tokens.

The exchange is `jax.lax.all_to_all` on buffers padded to a static capacity C = M per (sender, receiver) pair: a
sender never has more than its M rows for one receiver, so no token is ever dropped, whatever the routing. Why not
`jax.lax.ragged_all_to_all` (sends only the real rows): on jax 0.10.2's CPU backend it does not compile
("UNIMPLEMENTED: HLO opcode `ragged-all-to-all` is not supported by XLA:CPU ThunkEmitter"), so it could not be
tested in CI here; it is the GPU follow-up, where the padded buffers cost ep× the exchanged bytes and ep× the expert
GEMM rows (padding rows join the last local expert's group with x = 0: their outputs are dropped and they add exactly
zero to every LoRA gradient, since each LoRA gradient term has x, x·A or the zero cotangent of a dropped row as a
factor). GPU timings of either exchange are pending.

Gradients flow through the same construction: the row moves are gathers whose backward is the inverse gather
(`_move_rows`, as `moe.permute_rows`), the all-to-alls transpose to all-to-alls, and the expert tensors enter the
manual region as varying over the token axes (`pcast`), whose transpose sums their gradients over data and fsdp.

Limits, known: outside the MoE layer the models carry no sharding annotations, so how the dense layers are split is
XLA's choice from the weights' and the batch's placement (FSDP in effect, not a per-layer all-gather schedule we
set); for some shapes (e.g. an odd sequence length in evaluation) it logs "Involuntary full rematerialization" and
replicates an activation, correct but slower. Activation constraints at the decoder-layer boundary
(models/decoder.py) would pin them; GPU measurements of all of this are pending (the multi-GPU machines are not
lent). The weights are read into host memory, then placed shard by shard (`TreeSharding.put`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from jax_impl.backends import get_backend, resolve_backend
from jax_impl.moe import Experts, _check, permute_rows, sort_by_expert
from jax_impl.moe import split_lora_experts as _split_lora_experts_local
from jax_impl.tiled_experts import tiled_split_lora_experts
from shared_math.config import ModelConfig
from shared_math.train_config import ConfigError, ParallelSection

AXES = ("data", "fsdp", "expert")
BATCH = P(AXES)  # rows of a batch (and tokens inside the MoE layer) over every device
_F32 = jnp.float32


# ---- the mesh ----------------------------------------------------------------------------------------------------

def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def make_mesh(par: ParallelSection, devices: Sequence[Any] | None = None) -> Mesh:
    """The ("data", "fsdp", "expert") mesh of `par` over `devices` (default: every device jax sees).

    Refuses, before any work, a layout whose product is not the number of devices, saying how many are visible and
    how to get more (CPU host devices are fixed when jax starts, so XLA_FLAGS must be set before python does)."""
    devs = list(jax.devices() if devices is None else devices)
    if par.devices != len(devs):
        platform = devs[0].platform if devs else jax.default_backend()
        n = len(devs)
        fits = f"parallel.fsdp={n}, or parallel.data={n}" + (f", or parallel.fsdp={n // 2} parallel.expert=2"
                                                                if n >= 4 and n % 2 == 0 else "")
        how = (f"on CPU, start python with XLA_FLAGS=--xla_force_host_platform_device_count={par.devices} (jax fixes "
               "its device count at import)" if platform == "cpu" else
               "on GPUs, make that many visible (CUDA_VISIBLE_DEVICES) or change the parallel sizes")
        raise ConfigError(f"parallel ({par.describe()}) needs {par.devices} devices, but {len(devs)} {platform} "
                          f"device(s) are {'given' if devices is not None else 'visible to jax'}: {how}. Layouts that "
                          f"fit {n} device(s) have data·fsdp·expert = {n}, e.g. {fits}")
    # Auto axes: XLA's SPMD partitioner places everything outside shard_map (jax.make_mesh's default may be Explicit)
    auto = (jax.sharding.AxisType.Auto,) * len(AXES)
    return jax.make_mesh((par.data, par.fsdp, par.expert), AXES, axis_types=auto, devices=devs)


def check_experts(par: ParallelSection, model_cfg: ModelConfig) -> None:
    """ConfigError unless `parallel.expert` divides the routed expert count (each rank holds E / expert experts)."""
    E = model_cfg.num_experts
    if E % par.expert:
        fits = [d for d in _divisors(E) if d <= max(par.devices, E)]
        raise ConfigError(f"parallel.expert={par.expert} does not divide the {E} routed experts of this "
                          f"{model_cfg.family} model (each expert rank holds E / expert of them); expert sizes that "
                          f"divide {E}: {', '.join(map(str, fits))}")


# ---- placement ---------------------------------------------------------------------------------------------------

def param_spec(shape: Sequence[int], fsdp: int, *, expert_axis: bool = False) -> P:
    """The PartitionSpec of one parameter: E (axis 0 of a routed expert tensor) over "expert"; the largest other
    axis that `fsdp` divides (the first of equals) over "fsdp", none when no axis divides."""
    spec: list[Any] = [None] * len(shape)
    first = 1 if expert_axis else 0
    if expert_axis:
        spec[0] = "expert"
    if fsdp > 1:
        free = [(-shape[i], i) for i in range(first, len(shape)) if shape[i] % fsdp == 0]
        if free:
            spec[min(free)[1]] = "fsdp"
    return P(*spec)


def _expert_paths(model: nnx.Module) -> set[tuple]:
    return {tuple(path) for path, m in nnx.iter_modules(model) if isinstance(m, Experts)}


def state_shardings(state: Any, mesh: Mesh, expert_modules: set[tuple]) -> Any:
    """NamedShardings for every array of an nnx.State (`param_spec`); a variable is a routed expert tensor when
    it sits directly in an `Experts` module (paths from `nnx.iter_modules`)."""
    fsdp = mesh.shape["fsdp"]

    def one(path, x):
        keys = tuple(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k))) for k in path)
        if keys and keys[-1] == "value":  # the array inside an nnx.Variable
            keys = keys[:-1]
        is_expert = len(keys) > 1 and keys[:-1] in expert_modules and np.ndim(x) >= 1
        return NamedSharding(mesh, param_spec(np.shape(x), fsdp, expert_axis=is_expert))

    return jax.tree_util.tree_map_with_path(one, state)


def like_params(tree: Any, params: Any, param_shardings: Any, mesh: Mesh) -> Any:
    """Shardings for a tree holding copies of the parameter tree (an optax state: AdamW's mu and nu): every
    subtree shaped like `params` is placed as the parameters, any other leaf (counts, hyper-parameters) replicated."""
    pdef = jax.tree.structure(params)
    replicated = NamedSharding(mesh, P())

    def is_params(x):
        return jax.tree.structure(x) == pdef

    return jax.tree.map(lambda x: param_shardings if is_params(x) else replicated, tree, is_leaf=is_params)


class TreeSharding:
    """A pytree of NamedShardings that is hashable, so that it can be a static argument of `jax.jit` (jitted
    functions then compile once per model structure and layout, shared by every Trainer that has them)."""

    def __init__(self, tree: Any):
        self.tree = tree
        self._key = (jax.tree.structure(tree), tuple(jax.tree.leaves(tree)))

    def __hash__(self) -> int:
        return hash(self._key)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, TreeSharding) and self._key == other._key

    def constrain(self, tree: Any) -> Any:
        """`tree` (same structure) pinned to these shardings inside a jitted function."""
        return jax.lax.with_sharding_constraint(tree, self.tree)

    def put(self, tree: Any) -> Any:
        """`tree` placed on these shardings (outside jit). Each array goes through host memory: numpy is sliced
        into shards directly, where resharding a device array compiles one program per shape (34 of them, 1.2 s
        for the tiny Qwen3-MoE on CPU)."""
        return jax.device_put(jax.tree.map(np.asarray, tree), self.tree)


@dataclass(frozen=True)
class Layout:
    """Where a Trainer's arrays live on `mesh`: `params` (LoRA), `rest` (frozen weights and buffers), `opt_state`
    (optax), and batches (`batch(array)`)."""

    mesh: Mesh
    params: TreeSharding
    rest: TreeSharding
    opt_state: TreeSharding

    def batch(self, a: np.ndarray, fill: int | None = None) -> jax.Array:
        """A batch array [B, ...] placed with its rows over every device. Rows that do not split evenly
        (evaluation and generation batches) are padded up to a multiple of the devices: with `fill`, or copies of
        the last row when None (valid ids and positions); the caller drops the padded rows' results (labels
        filled with -100 add nothing to a loss)."""
        pad = -np.shape(a)[0] % self.mesh.size
        if pad:
            widths = [(0, pad)] + [(0, 0)] * (np.ndim(a) - 1)
            a = np.pad(a, widths, mode="edge") if fill is None else np.pad(a, widths, constant_values=fill)
        return jax.device_put(a, NamedSharding(self.mesh, BATCH))


def shard_model(model: nnx.Module, mesh: Mesh) -> nnx.Module:
    """Route every `Experts` module of `model` through `split_lora_experts_sharded` on `mesh` (refusing an expert
    count the expert axis does not divide); returns `model`. Placing its arrays is `layout_of` + `TreeSharding.put`."""
    ep = mesh.shape["expert"]
    for path, m in nnx.iter_modules(model):
        if isinstance(m, Experts):
            if m.num_experts % ep:
                where = ".".join(map(str, path))
                raise ConfigError(f"{where}: {m.num_experts} experts do not split over parallel.expert={ep}; expert "
                                  f"sizes that divide them: {', '.join(map(str, _divisors(m.num_experts)))}")
            m.expert_parallel = ExpertParallel(mesh)
    return model


def layout_of(model: nnx.Module, mesh: Mesh, params: Any, rest: Any, opt_state: Any) -> Layout:
    """The Layout of a model split as `nnx.split(model, nnx.LoRAParam, ...)` -> (params, rest) and its optax
    state."""
    experts = _expert_paths(model)
    p = state_shardings(params, mesh, experts)
    return Layout(mesh, TreeSharding(p), TreeSharding(state_shardings(rest, mesh, experts)),
                  TreeSharding(like_params(opt_state, params, p, mesh)))


# ---- the MoE layer across devices --------------------------------------------------------------------------------

@jax.custom_vjp
def _move_rows(x_ND: jax.Array, index_R: jax.Array, inverse_N: jax.Array) -> jax.Array:
    """y[r] = x[index[r]], a zero row where index[r] is out of range (a padding slot). `index` takes every row of x
    at most once and `inverse` is its inverse (inverse[n] = the r with index[r] = n, out of range for rows no slot
    takes), so the backward is the gather ct[inverse] (no scatter-add), as moe.permute_rows."""
    return jnp.take(x_ND, index_R, axis=0, mode="fill", fill_value=0)


def _move_fwd(x_ND, index_R, inverse_N):
    return _move_rows(x_ND, index_R, inverse_N), (index_R, inverse_N)


def _move_bwd(res, ct_RD):
    index_R, inverse_N = res
    return jnp.take(ct_RD, inverse_N, axis=0, mode="fill", fill_value=0), None, None


_move_rows.defvjp(_move_fwd, _move_bwd)


def _varying(x: Any, axes: tuple[str, ...]) -> Any:
    """`x` marked as varying over `axes` inside shard_map (jax >= 0.8: lax.pcast; before: lax.pvary). Its transpose
    sums the cotangent over `axes`: the gradient of a tensor every device of those axes used."""
    if x is None or not axes:
        return x
    if hasattr(jax.lax, "pcast"):
        return jax.tree.map(lambda a: jax.lax.pcast(a, axes, to="varying"), x)
    return jax.tree.map(lambda a: jax.lax.pvary(a, axes), x)  # pragma: no cover - older jax


def _dispatch_compute_combine(x_TH, ids_TK, weights_TK, w_gate_up, w_down, lora_gate_up, lora_down, biases, *,
                              ep: int, scale: float, activation: str, swiglu_limit: float, swiglu_alpha: float,
                              backend: str):
    """One device's part of the routed experts (inside shard_map): its T tokens, its E_loc = E / ep experts."""
    T, H = x_TH.shape
    K = ids_TK.shape[1]
    E_loc = w_gate_up.shape[0]
    M = C = T * K  # C: rows per (sender, receiver) pair; a sender has only M rows, so no row is ever dropped
    i32 = jnp.int32
    # sort by global expert id: the rows for rank r are then one contiguous run (its experts are contiguous)
    srt = sort_by_expert(ids_TK, E_loc * ep, check=False)
    x_sorted_MH = permute_rows(jnp.repeat(x_TH, K, axis=0), srt.order_M, srt.inverse_M)
    sizes_R = srt.group_sizes_E.reshape(ep, E_loc).sum(axis=1)
    starts_R = jnp.cumsum(sizes_R) - sizes_R
    dest_M = srt.expert_M // E_loc
    slot_M = (dest_M * C + jnp.arange(M, dtype=i32) - starts_R[dest_M]).astype(i32)  # where row m is sent from
    n_N = jnp.arange(ep * C, dtype=i32)
    rank_N, pos_N = n_N // C, n_N % C
    used_N = pos_N < sizes_R[rank_N]
    src_N = jnp.where(used_N, starts_R[rank_N] + pos_N, M).astype(i32)  # the row in send slot n (M: padding)
    send_x = _move_rows(x_sorted_MH, src_N, slot_M)
    # each slot's expert id local to its receiver; E_loc marks padding
    send_e = jnp.where(used_N, jnp.take(srt.expert_M, src_N, mode="fill", fill_value=0) - rank_N * E_loc, E_loc)

    # exchange: recv[s] = what sender s put in my slot block
    def exchange(a):
        return jax.lax.all_to_all(a.reshape(ep, C, *a.shape[1:]), "expert", 0, 0).reshape(a.shape)

    recv_x, recv_e = exchange(send_x), exchange(send_e.astype(i32))
    # local sort by expert; padding (id E_loc) sorts last and joins the last expert's group (x = 0: no effect)
    loc = sort_by_expert(recv_e[:, None], E_loc + 1, check=False)
    gs = loc.group_sizes_E
    group_sizes_E = jnp.concatenate([gs[:E_loc - 1], gs[E_loc - 1:E_loc] + gs[E_loc:]]).astype(i32)
    expert_N = jnp.minimum(loc.expert_M, E_loc - 1)
    x_loc = permute_rows(recv_x, loc.order_M, loc.inverse_M)
    out_loc = get_backend(backend)(
        x_loc, group_sizes_E, expert_N, w_gate_up, w_down, lora_gate_up, lora_down, biases, float(scale),
        activation, float(swiglu_limit), float(swiglu_alpha))
    back = exchange(permute_rows(out_loc, loc.inverse_M, loc.order_M))  # each output to the sender of its row
    y_sorted_MH = _move_rows(back, slot_M, src_N)
    # as moe.split_lora_experts: weight each row, restore (token, slot) order, sum over K in fp32, round once
    w_sorted_M1 = permute_rows(weights_TK.reshape(M, 1), srt.order_M, srt.inverse_M)
    out_TKH = permute_rows(y_sorted_MH * w_sorted_M1, srt.inverse_M, srt.order_M).reshape(T, K, H)
    return out_TKH.sum(axis=1, dtype=_F32).astype(x_TH.dtype)


def split_lora_experts_sharded(mesh: Mesh, x: jax.Array, expert_ids: jax.Array, expert_weights: jax.Array,
                               w_gate_up: jax.Array, w_down: jax.Array, lora_gate_up=None, lora_down=None, *,
                               scale: float = 1.0, biases=None, activation: str = "swiglu",
                               swiglu_limit: float = 7.0, swiglu_alpha: float = 1.702,
                               backend: str = "auto", chunk: int | None = None) -> jax.Array:
    """`moe.split_lora_experts` (same arguments and result, global shapes) computed over `mesh`: tokens split over
    every device, experts over the "expert" axis (see the module docstring). T need not divide the device count:
    tokens are padded with zero-weight rows (K distinct experts each, so the padding obeys the same bounds).
    `chunk`: each device runs its own tokens through `tiled_experts.tiled_split_lora_experts` in chunks of that
    many (`Experts.token_chunk`); only without an expert axis, whose all-to-all exchanges a layer's tokens whole."""
    _check(x, expert_ids, expert_weights, w_gate_up, w_down, lora_gate_up, lora_down, biases)
    resolved = resolve_backend(backend)
    ep = mesh.shape["expert"]
    E, T, K = w_gate_up.shape[0], x.shape[0], expert_ids.shape[1]
    if E % ep:
        raise ValueError(f"{E} experts do not split over the mesh's expert axis of {ep}")
    if chunk is not None and ep > 1:
        raise ValueError(f"tiled experts (chunk={chunk}) need a mesh without an expert axis (it has {ep}): the "
                         "all-to-all exchanges a layer's tokens whole")
    local = _split_lora_experts_local if chunk is None else partial(tiled_split_lora_experts, chunk=chunk)
    pad = -T % mesh.size
    if pad:
        x = jnp.concatenate([x, jnp.zeros((pad, x.shape[1]), x.dtype)])
        expert_ids = jnp.concatenate([expert_ids, jnp.broadcast_to(jnp.arange(K, dtype=expert_ids.dtype),
                                                                   (pad, K))])
        expert_weights = jnp.concatenate([expert_weights, jnp.zeros((pad, K), expert_weights.dtype)])
    lora_gate_up = None if lora_gate_up is None else tuple(lora_gate_up)
    lora_down = None if lora_down is None else tuple(lora_down)
    biases = None if biases is None else tuple(biases)
    experts = (w_gate_up, w_down, lora_gate_up, lora_down, biases)
    opts = dict(scale=scale, activation=activation, swiglu_limit=swiglu_limit, swiglu_alpha=swiglu_alpha)

    def body(x_TH, ids_TK, weights_TK, experts):
        # the expert tensors are the same on every device of the token axes: varying there, so that their
        # gradients are summed over those devices (pcast's transpose)
        experts = _varying(experts, ("data", "fsdp"))
        if ep == 1:  # every device holds every expert: no exchange, the single-device path on its own tokens
            return local(x_TH, ids_TK, weights_TK, *experts[:4], biases=experts[4], backend=resolved, **opts)
        return _dispatch_compute_combine(x_TH, ids_TK, weights_TK, *experts, ep=ep, backend=resolved, **opts)

    expert_specs = jax.tree.map(lambda _: P("expert"), experts)
    y = jax.shard_map(body, mesh=mesh, in_specs=(BATCH, BATCH, BATCH, expert_specs), out_specs=BATCH)(
        x, expert_ids, expert_weights, experts)
    if pad:  # (evaluation / generation batches): gathered before the cut, which XLA cannot partition cleanly
        y = jax.lax.with_sharding_constraint(y, NamedSharding(mesh, P()))[:T]
    return y


@dataclass(frozen=True)
class ExpertParallel:
    """The hook `shard_model` sets on `Experts.expert_parallel`: called with `moe.split_lora_experts`' arguments,
    runs them over `mesh`. Static (hashable) model structure, so a model's graphdef names its mesh."""

    mesh: Mesh

    def __call__(self, *args: Any, **kwargs: Any) -> jax.Array:
        return split_lora_experts_sharded(self.mesh, *args, **kwargs)


__all__ = ["AXES", "BATCH", "ExpertParallel", "Layout", "TreeSharding", "check_experts", "layout_of", "like_params",
           "make_mesh", "param_spec", "shard_model", "split_lora_experts_sharded", "state_shardings"]
