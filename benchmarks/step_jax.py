"""The `jax_impl` row of the step benchmark (`benchmarks/step.py --impls jax_impl`): one LoRA training step of a
jax_impl model, as the torch rows run it (same recipe: random bf16 weights N(0, 0.02), norms 1; LoRA fp32 with B
non-zero N(0, 0.01) on the attention projections and both expert tensors; batch 1 of S random tokens, labels =
inputs; checkpointing per decoder layer).

The step is one `jax.jit` of forward (the loss without logits, `return_logits=False`), backward over the LoRA state
and optax AdamW (fp32 moments), with the LoRA tensors and the optimizer state donated (their buffers are reused by
the updated ones). The frozen bf16 weights are arguments, never constants baked into the program. Each decoder layer
runs under `jax.checkpoint` with a policy (`--jax-remat`, `models.layers.REMAT_POLICIES`; default "small_dots": keep
the narrow projections LoRA's x·A and the router logits, recompute everything else); with `--checkpoint-layers N`
only the first N layers do, the others keep their activations. Attention through
`--jax-attn` ("auto": cuDNN flash attention on a GPU, the literal softmax on a CPU), MoE through `--jax-backend`.

Reported per length: `step_ms` (median of `--iters` steps after `--warmup`; `step_ms_runs` has each), `first_step_s`
(lowering, XLA compilation and the first step: what a notebook user waits for), `compiled_peak_gib` (XLA's buffer
assignment for the step: arguments + temporaries + outputs not aliased to donated inputs; the same number on every
device) and `peak_gib`: on a GPU the allocator's `peak_bytes_in_use`, which JAX cannot reset, so lengths run in
ascending order and each row's peak is the largest so far (the untimed first step runs the shortest); on a CPU, where
XLA keeps no allocator statistics, `compiled_peak_gib`. `XLA_PYTHON_CLIENT_PREALLOCATE=false` (set before JAX is
imported, unless the caller set it) makes the allocator take memory as the step needs it instead of 75 % of the GPU up
front, and `XLA_PYTHON_CLIENT_MEM_FRACTION=0.95` lets a long context use nearly all of it.
"""

from __future__ import annotations

import os
import statistics
import time
import zlib
from collections.abc import Iterator, Mapping
from typing import Any

# what the allocator may take: set before the first `import jax` of the process (step.py imports this module lazily)
JAX_ENV = {"XLA_PYTHON_CLIENT_PREALLOCATE": "false", "XLA_PYTHON_CLIENT_MEM_FRACTION": "0.95"}


def configure_jax(device: str) -> dict[str, str]:
    """Set the allocator variables (and `JAX_PLATFORMS=cpu` for `--device cpu`) unless already set; returns what
    the process runs with. Without effect once JAX is imported (a test process), which is fine on a CPU."""
    for k, v in JAX_ENV.items():
        os.environ.setdefault(k, v)
    if device == "cpu":
        os.environ.setdefault("JAX_PLATFORMS", "cpu")
    # the allocator switches are recorded when a caller set them: XLA_PYTHON_CLIENT_ALLOCATOR (platform: cudaMalloc
    # per buffer), TF_GPU_ALLOCATOR (which jax 0.11.2 did not honour on an H100, session 13: its log still named
    # the BFC allocator)
    keys = (*JAX_ENV, "JAX_PLATFORMS", "XLA_PYTHON_CLIENT_ALLOCATOR", "TF_GPU_ALLOCATOR")
    return {k: os.environ[k] for k in keys if k in os.environ}


class RandomTensors(Mapping[str, Any]):
    """A config's canonical tensors drawn on the device, one at a time as the model asks for them (no host copy):
    norms 1, everything else (biases, sinks and the correction bias included) N(0, 0.02) in `dtype`, as the torch
    rows' `_randomise`; each keyed by its name, so the draw does not depend on build order."""

    def __init__(self, cfg, dtype, seed: int = 0):
        from shared_math.checkpoint import expected_shapes

        self.config = cfg
        self.shapes = expected_shapes(cfg)
        self._dtype, self._seed = dtype, seed

    def __getitem__(self, name: str):
        shape = self.shapes[name]
        if name.endswith("norm.weight"):
            return _filled(shape, self._dtype)
        return _normal(self._seed, name, shape, 0.02, self._dtype)

    def __iter__(self) -> Iterator[str]:
        return iter(self.shapes)

    def __len__(self) -> int:
        return len(self.shapes)

    def layer(self, l: int) -> dict[str, Any]:
        p = f"layers.{l}."
        return {n[len(p):]: self[n] for n in self.shapes if n.startswith(p)}


def _normal(seed: int, name: str, shape: tuple[int, ...], std: float, dtype):
    """std · N(0, 1) of `shape` on the default device, keyed by (seed, name). On a GPU it is drawn there, one compiled
    program per (shape, dtype), so a 30B model never passes through host memory; on a CPU (the tiny preset), by
    numpy: every jax.random draw compiles per shape, a third of a second each there."""
    import jax
    import numpy as np

    salt = zlib.crc32(name.encode()) & 0x7FFFFFFF
    if jax.default_backend() == "cpu":
        rng = np.random.default_rng([seed, salt])
        return jax.device_put((std * rng.standard_normal(shape, np.float32)).astype(np.dtype(dtype)))
    global _NORMAL
    if _NORMAL is None:
        import jax.numpy as jnp

        _NORMAL = jax.jit(lambda key, std, shape, dtype: (std * jax.random.normal(key, shape, jnp.float32)).astype(
            dtype), static_argnums=(2, 3))
    return _NORMAL(jax.random.fold_in(jax.random.PRNGKey(seed), salt), std, tuple(shape), dtype)


_NORMAL = None


def _filled(shape: tuple[int, ...], dtype, value: float = 1.0):
    import jax
    import numpy as np

    return jax.device_put(np.full(shape, value, np.dtype(dtype)))


def build_model(cfg, lora, tensors: Mapping[str, Any], *, backend: str, attn: str | None, remat: str | None,
                expert_chunk: int | None = None, checkpoint_layers: int | None = None, seed: int = 0):
    """The step's bf16 jax_impl model of `cfg` from `tensors` (RandomTensors; `jax_memory_plan` passes zeros under
    `nnx.eval_shape`, so nothing is allocated), with LoRA attached (A drawn, B zero), each decoder layer checkpointed
    with the `remat` policy (None: no checkpointing; `checkpoint_layers`: the first N only) and the experts tiled in
    `expert_chunk` tokens."""
    import jax.numpy as jnp

    from jax_impl.backends import resolve_backend
    from jax_impl.load import _model_class
    from jax_impl.lora import attach_lora

    dtype = jnp.bfloat16
    model = _model_class(cfg.family)(cfg, tensors, dtype=dtype, moe_backend=resolve_backend(backend, dtype=dtype),
                                     attn_implementation=attn)
    attach_lora(model, lora, seed=seed)
    if remat is not None:
        model.gradient_checkpointing_enable(policy=remat, layers=checkpoint_layers)
    model.tile_experts(expert_chunk)
    return model


def train_step(graphdef, tx):
    """The jitted training step `step(lora, opt_state, frozen, ids) -> (lora, opt_state, loss)`: forward with the loss
    without logits, backward over the LoRA state, optax `tx`; the LoRA and optimizer buffers donated."""
    import jax
    import optax
    from flax import nnx

    def step(lora, opt_state, frozen, ids):
        def loss_fn(lora):
            model = nnx.merge(graphdef, lora, frozen, copy=True)
            return model(ids, labels=ids, return_logits=False).loss

        loss, grads = jax.value_and_grad(loss_fn)(lora)
        updates, opt_state = tx.update(grads, opt_state, lora)
        return optax.apply_updates(lora, updates), opt_state, loss

    return jax.jit(step, donate_argnums=(0, 1))


class JaxStep:
    """A jax_impl model with LoRA and its jitted training step; `run(ids)` returns the loss. `compile(S)` lowers and
    compiles the step for S tokens (timed into `first_step_s` by the caller)."""

    def __init__(self, hf: dict, lora, *, backend: str, attn: str | None, remat: str | None, seed: int = 0,
                 expert_chunk: int | None = None, checkpoint_layers: int | None = None):
        import jax.numpy as jnp
        import optax
        from flax import nnx

        from jax_impl.backends import resolve_backend
        from shared_math.config import ModelConfig

        cfg = ModelConfig.from_hf(hf)
        model = build_model(cfg, lora, RandomTensors(cfg, jnp.bfloat16, seed), backend=backend, attn=attn,
                            remat=remat, expert_chunk=expert_chunk, checkpoint_layers=checkpoint_layers, seed=seed)
        self.model = model
        self.backend, self.attn = resolve_backend(backend, dtype=jnp.bfloat16), model.attn_implementation
        self.graphdef, lora_state, self.frozen = nnx.split(model, nnx.LoRAParam, ...)
        self.tx = optax.adamw(1e-4)
        self.lora = self._random_lora(lora_state, seed, only_b=True)
        nnx.update(model, self.lora)  # the model holds these too, not attach_lora's zero B (GBs on a 30B model)
        self.opt_state = self.tx.init(self.lora)
        self._step = train_step(self.graphdef, self.tx)
        self._compiled: dict[int, Any] = {}

    @staticmethod
    def _random_lora(lora_state, seed: int, only_b: bool):
        """LoRA B ~ N(0, 0.01) (non-zero, as the torch rows: the B-path GEMMs then do real work); with
        `only_b=False` A too (a state redrawn after a failed step)."""
        import jax

        def draw(path, x):
            name = jax.tree_util.keystr(path)
            if only_b and "lora_B" not in name:
                return x
            return _normal(seed + 1, name, x.shape, 0.01, x.dtype)

        return jax.tree_util.tree_map_with_path(draw, lora_state)

    @property
    def lora_params(self) -> int:
        import jax

        return sum(x.size for x in jax.tree.leaves(self.lora))

    def restore_if_donated(self) -> None:
        """A step that failed after dispatch (out of memory) has consumed its donated buffers: draw fresh ones so the
        next length can run (their values do not matter to a timing)."""
        import jax

        if any(x.is_deleted() for x in jax.tree.leaves((self.lora, self.opt_state))):
            template = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), self.lora)
            self.lora = self._random_lora(jax.tree.map(lambda s: jax.numpy.zeros(s.shape, s.dtype), template), 0,
                                          only_b=False)
            self.opt_state = self.tx.init(self.lora)

    def compile(self, S: int):
        """The step for batch 1 of S tokens, lowered and compiled once per length (the executable is run directly,
        so it is compiled exactly once)."""
        import jax
        import jax.numpy as jnp

        if S not in self._compiled:
            ids = jax.ShapeDtypeStruct((1, S), jnp.int32)
            self._compiled[S] = self._step.lower(self.lora, self.opt_state, self.frozen, ids).compile()
        return self._compiled[S]

    def run(self, ids):
        self.lora, self.opt_state, loss = self.compile(ids.shape[1])(self.lora, self.opt_state, self.frozen, ids)
        return loss


def _gib(n: float | None) -> float | None:
    return None if n is None else n / 2**30


def compiled_peak_bytes(compiled) -> int:
    """XLA's buffer assignment for one step: arguments + temporaries + outputs, less outputs written into donated
    arguments (aliases)."""
    m = compiled.memory_analysis()
    return m.argument_size_in_bytes + m.temp_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes


def compiled_plan(runner: JaxStep, S: int) -> dict:
    """XLA's buffer assignment for the step compiled at S tokens, in GiB (empty if it did not compile): the whole
    (`compiled_peak_gib`), its temporaries (activations, residuals kept for the backward, scratch) and arguments
    (weights, LoRA, optimizer state). A length that compiles but runs out of memory is explained by these."""
    compiled = getattr(runner, "_compiled", {}).get(S)
    if compiled is None:
        return {}
    m = compiled.memory_analysis()
    return dict(compiled_peak_gib=_gib(compiled_peak_bytes(compiled)), compiled_temp_gib=_gib(m.temp_size_in_bytes),
                compiled_argument_gib=_gib(m.argument_size_in_bytes))


def measure_jax(runner: JaxStep, S: int, vocab: int, warmup: int, iters: int, seed: int = 0) -> dict:
    """One length's row: first_step_s (compile + first step), median step_ms, peak_gib, compiled_peak_gib."""
    import jax
    import numpy as np

    device = jax.devices()[0]
    ids = jax.device_put(np.random.default_rng(seed).integers(0, vocab, (1, S), dtype=np.int32), device)
    runner.restore_if_donated()
    stats = device.memory_stats()  # None on a CPU
    resident = stats["bytes_in_use"] if stats else None
    t0 = time.perf_counter()
    compiled = runner.compile(S)
    compile_s = time.perf_counter() - t0
    first_s = None
    for i in range(max(warmup, 1)):  # at least one untimed step: the first one includes allocation
        t0 = time.perf_counter()
        runner.run(ids).block_until_ready()
        if i == 0:
            first_s = compile_s + time.perf_counter() - t0
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        runner.run(ids).block_until_ready()
        times.append((time.perf_counter() - t0) * 1e3)
    planned = compiled_peak_bytes(compiled)
    stats = device.memory_stats()
    peak = stats.get("peak_bytes_in_use") if stats else planned
    row = dict(step_ms=statistics.median(times) if times else None, step_ms_runs=[round(t, 2) for t in times],
               peak_gib=_gib(peak), first_step_s=first_s,
               compile_s=compile_s, **compiled_plan(runner, S),
               peak_source="memory_stats peak_bytes_in_use (process lifetime)" if stats else
               "compiled.memory_analysis (XLA buffer assignment)", lora_params=runner.lora_params)
    if stats:
        row.update(model_gib=_gib(resident), step_resident_gib=_gib(stats["bytes_in_use"]))
    return row


def jax_versions() -> dict:
    """Versions and device of the row (not benchmarks.common.versions: it asks torch for the GPU's name, which
    creates a CUDA context in this process and takes GPU memory away from JAX)."""
    import datetime
    import platform

    import jax

    out = {"python": platform.python_version(), "jax": jax.__version__, "jax_backend": jax.default_backend(),
           "date": datetime.date.today().isoformat()}
    try:
        import flax
        import optax

        out.update(flax=flax.__version__, optax=optax.__version__)
    except ImportError:  # pragma: no cover - the jax extra brings both
        pass
    dev = jax.devices()[0]
    if dev.platform == "gpu":
        out["jax_device"] = dev.device_kind
    from benchmarks.common import switches  # torch-free: imports nothing of torch

    return out | switches()
