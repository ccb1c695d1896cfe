"""XLA's memory plan of the jax_impl training step, compiled ahead of time from abstract weights: what a step at S
tokens needs, and which buffers make up its peak, without a GPU and without allocating a byte of the model.

    python benchmarks/jax_memory_plan.py --family gpt_oss --seq 65536 --jax-remat nothing --expert-chunk 16384
    python benchmarks/jax_memory_plan.py --family gpt_oss --layers 2,4 --seq 16384,32768 --expert-chunk 4096

The step is `benchmarks/step.py --impls jax_impl`'s own (`step_jax.build_model` and `step_jax.train_step`: the bf16
model with r=64 LoRA on the attention projections and both expert tensors, per-layer `jax.checkpoint` with the
`--jax-remat` policy, experts tiled in `--expert-chunk` tokens, the loss without logits, optax AdamW, LoRA and
optimizer state donated), built under `nnx.eval_shape` from zero tensors, so every weight is a ShapeDtypeStruct,
then lowered for batch 1 of S tokens and compiled; a 20B model at 64K compiles in about half a minute on a CPU.

Reported per (layers, S): `compiled.memory_analysis()` (arguments, outputs, aliased outputs, temporaries, and the
peak arguments + temporaries + outputs - aliases, as step_jax's `compiled_peak_gib`), and from XLA's dump of the
compiled module (buffer assignment and live ranges) the temporaries live at the schedule's peak, grouped by shape and
the JAX operation that made them (`--top` groups, `--buffers` single buffers). With two or more `--layers` the
temporaries are fitted as a + b·layers per length: b is what each layer keeps until its backward (its checkpointed
input, whatever else it keeps), a is the rest (one layer's backward working set, the loss, the embedding).

On a CPU the plan approximates the GPU's (the same program; arguments and outputs are exact, temporaries are not):
- the GPU-only kernels run as stand-ins (`--kernels standin`, the default on a CPU): cuDNN flash attention (through
  `jax.nn.dot_product_attention` and `models.lse_attention`'s cuDNN rules) and the grouped GEMMs (each
  `lax.ragged_dot_general` of the `--backend`, ragged_dot by default: Pallas does not lower on a CPU) are replaced
  by cheap functions with the kernels' outputs and residuals, in shape and dtype (attention keeps q, k, v and the
  softmax statistics, as cuDNN's rule; a grouped GEMM's output is one dense GEMM's). What the model keeps around the
  kernels is planned as on the GPU; the kernels' own workspace is not (cuDNN's backward takes an fp32 dQ accumulator,
  B·S·N·D·4 bytes, 1 GiB for gpt-oss at 64K), nor the Pallas kernels' residuals, which differ from ragged_dot's.
  `--kernels real` compiles XLA's attention and ragged_dot's own lowering instead, which on a CPU hold [S, S]
  logits and E-times-expanded GEMM operands: only for small shapes.
- XLA's CPU pipeline removes the optimization barriers that `jax.checkpoint` puts on each recompute's inputs (with
  the layer's cotangent) early, before layout assignment (its `cse_barrier_expander` pass; the GPU pipeline runs it
  after scheduling). Without them a layer's recompute depends on the layer's input alone, the CPU schedule runs it
  inside the forward, and every checkpointed layer keeps its activations until its backward (gpt-oss-20b, 2 layers
  at 8K tokens, experts in 2K-token chunks: 3.63 GiB of temporaries, 1.87 with the barriers). The plan keeps them
  (`--keep-remat-barriers`, the default; the compile option `xla_disable_hlo_passes=cse_barrier_expander`).
- fusion and scheduling are the CPU's: XLA's CPU backend fuses less around dots (fp32 copies of activations
  materialise that a GPU GEMM fusion may read from bf16 instead: the LoRA inputs cast to fp32, a dot's fp32 output
  before its rounding), its scheduler is not the GPU's, and the GPU pipeline's rematerialisation pass, which runs
  under the device's memory limit, is absent.

What it found (issue 17; gpt-oss-20b, 24 layers, 64K tokens, experts in 16K-token chunks, "nothing" saved): 32.5
GiB of temporaries, 11 of them the tiled experts' backward loop buffers of every layer (24 x 360 MiB dx, 2.6 GiB of
fp32 LoRA gradient sums), all allocated at the start of the step: zero-initialised loop buffers that XLA copies per
loop from one shared zero constant, copies that nothing keeps late. `jax_impl.tiled_experts` now starts no loop from
zeros: 21.2 GiB, 7.7 of them the saved layer inputs and ~10 the last layer's backward working set. The GPU's own
plan (24.54 GiB for this step in session 13) grew by 11.1 GiB from 32K to 64K with "small_dots" (session 11) where
this plan grows by 7.1 after the fix and 13.8 before: 4 GiB more, about the 24 x 180 MiB of dx buffers that 32K
more tokens add, so the GPU very likely held them too.

"""

from __future__ import annotations

import argparse
import contextlib
import glob
import json
import re
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.step_jax import RandomTensors  # noqa: E402  (imports no jax at module level)

GIB = 2**30
REMAT = ("small_dots", "nothing", "dots")


def log(msg: str) -> None:
    """A progress line on stderr (stdout carries the results)."""
    print(msg, file=sys.stderr, flush=True)


class AbstractTensors(RandomTensors):
    """A config's canonical tensors as zeros of their shape and dtype: under `nnx.eval_shape` these are tracers, so
    the model built from them holds ShapeDtypeStructs and nothing is allocated (outside it they would be)."""

    def __getitem__(self, name: str):
        import jax.numpy as jnp

        return jnp.zeros(self.shapes[name], self._dtype)


# ---- stand-ins for the GPU-only kernels ---------------------------------------------------------------------------

def _standin_ragged_dot(lhs, rhs, group_sizes, ragged_dot_dimension_numbers, precision=None,
                        preferred_element_type=None, group_offset=None, **_):
    """`lax.ragged_dot_general`'s output shape and dtype from one dense GEMM: rows against group 0's weight (ragged
    rows), or one [k, n] product broadcast over the groups (ragged contraction: per-group weight gradients)."""
    import jax.numpy as jnp
    from jax import lax

    dims = ragged_dot_dimension_numbers
    (lc, rc), (lb, rb) = dims.dot_dimension_numbers
    if dims.rhs_group_dimensions:
        g = dims.rhs_group_dimensions[0]
        w = lax.index_in_dim(rhs, 0, g, keepdims=False)
        rc = tuple(c - (c > g) for c in rc)
        return lax.dot_general(lhs, w, ((lc, rc), (lb, rb)), preferred_element_type=preferred_element_type)
    out = lax.dot_general(lhs, rhs, ((lc, rc), (lb, rb)), preferred_element_type=preferred_element_type)
    return jnp.broadcast_to(out, (group_sizes.shape[-1], *out.shape))


def _standin_attention_fwd(q, k, v):
    """Flash attention's outputs in shape and dtype: o [B, S, N, D] (from q, k, v elementwise; query head n reads kv
    head n // (N / K)) and the softmax statistics [B, N, S] fp32."""
    import jax.numpy as jnp

    B, S, N, D = q.shape
    K = k.shape[2]
    kv = (k + v)[:, :, :, None, :]
    o = (q.reshape(B, S, K, N // K, D) * kv).reshape(B, S, N, D).astype(q.dtype)
    lse = jnp.swapaxes(o.astype(jnp.float32).sum(-1), 1, 2)
    return o, lse


def _standin_attention_bwd(q, k, v, lse, out, grad_o):
    """dq, dk, dv in shape and dtype from the residuals (q, k, v, the statistics), the output and its cotangent, in
    the activation dtype (elementwise, fused: the stand-in holds nothing of its own)."""
    B, S, N, D = q.shape
    K = k.shape[2]
    g = grad_o * out + _stats_BSN1(lse).astype(q.dtype)
    gk = g.reshape(B, S, K, N // K, D).sum(3)
    return g * q, gk * k, gk * v


def _stats_BSN1(lse):
    """[B, N, S] statistics -> [B, S, N, 1]."""
    import jax.numpy as jnp

    return jnp.swapaxes(lse, 1, 2)[..., None]


def _standin_cudnn_fwd(q, k, v, scale, window):
    o, lse = _standin_attention_fwd(q, k, v)
    return o, lse, (q, k, v, lse, o)  # the residuals of JAX's cuDNN rule: q, k, v, statistics, output


def _standin_cudnn_bwd(res, scale, window, out, grad_o):
    q, k, v, lse, _ = res  # the kernel's own output is replaced by `out`, as lse_attention._cudnn_bwd does
    return _standin_attention_bwd(q, k, v, lse, out, grad_o)


def _standin_dpa_factory():
    import jax

    @jax.custom_vjp
    def dpa(q, k, v):
        return _standin_attention_fwd(q, k, v)[0]

    def fwd(q, k, v):
        o, lse = _standin_attention_fwd(q, k, v)
        return o, (q, k, v, lse, o)

    def bwd(res, g):
        q, k, v, lse, o = res
        return _standin_attention_bwd(q, k, v, lse, o, g)

    dpa.defvjp(fwd, bwd)
    return dpa


@contextlib.contextmanager
def standin_kernels() -> Iterator[None]:
    """While tracing: `lax.ragged_dot_general`, cuDNN attention through `jax.nn.dot_product_attention` and
    `models.lse_attention`'s cuDNN rules replaced by the stand-ins (module docstring)."""
    import jax
    from jax import lax

    from jax_impl.models import lse_attention

    real = (lax.ragged_dot_general, jax.nn.dot_product_attention, lse_attention._cudnn_fwd, lse_attention._cudnn_bwd)
    dpa = _standin_dpa_factory()

    def dot_product_attention(query, key, value, *args, implementation=None, **kwargs):
        if implementation == "cudnn":  # a mask or bias, when given, is not read (the step passes none)
            return dpa(query, key, value)
        return real[1](query, key, value, *args, implementation=implementation, **kwargs)

    lax.ragged_dot_general = _standin_ragged_dot
    jax.nn.dot_product_attention = dot_product_attention
    lse_attention._cudnn_fwd, lse_attention._cudnn_bwd = _standin_cudnn_fwd, _standin_cudnn_bwd
    try:
        yield
    finally:
        (lax.ragged_dot_general, jax.nn.dot_product_attention, lse_attention._cudnn_fwd,
         lse_attention._cudnn_bwd) = real


# ---- the plan -----------------------------------------------------------------------------------------------------

def abstract_step(hf: dict, lora, *, backend: str, remat: str | None, expert_chunk: int | None,
                  checkpoint_layers: int | None, kernels: str):
    """(jitted step, abstract lora state, abstract optimizer state, abstract frozen weights) of step.py's jax_impl
    step for config.json `hf`, nothing allocated. With stand-in kernels every attention runs "cudnn" (the GPU's)."""
    import jax
    import jax.numpy as jnp
    import optax
    from flax import nnx

    from benchmarks.step_jax import build_model, train_step
    from shared_math.config import ModelConfig

    cfg = ModelConfig.from_hf(hf)
    attn = "auto" if jax.default_backend() == "gpu" else "xla"
    model = nnx.eval_shape(lambda: build_model(
        cfg, lora, AbstractTensors(cfg, jnp.bfloat16), backend=backend, attn=None if kernels == "standin" else attn,
        remat=remat, expert_chunk=expert_chunk, checkpoint_layers=checkpoint_layers))
    if kernels == "standin":
        # set directly: CausalLM.set_attn_implementation refuses "cudnn" off a GPU, and the stand-in is what runs
        for _, m in nnx.iter_modules(model):
            if hasattr(m, "attn_implementation"):
                m.attn_implementation = "cudnn"
    graphdef, lora_state, frozen = nnx.split(model, nnx.LoRAParam, ...)
    tx = optax.adamw(1e-4)
    return train_step(graphdef, tx), lora_state, jax.eval_shape(tx.init, lora_state), frozen


def compile_plan(step, lora_state, opt_state, frozen, seq: int, *, kernels: str, keep_barriers: bool,
                 dump: Path | None):
    """Lower and compile `step` for batch 1 of `seq` tokens (stand-ins while tracing), dumping XLA's buffer
    assignment and live ranges into `dump`. -> (compiled, lower seconds, compile seconds)."""
    import jax
    import jax.numpy as jnp

    options: dict[str, Any] = {}
    if keep_barriers and jax.default_backend() == "cpu":
        options["xla_disable_hlo_passes"] = "cse_barrier_expander"
    if dump is not None:
        options.update(xla_dump_to=str(dump), xla_dump_hlo_as_text=True)
    ids = jax.ShapeDtypeStruct((1, seq), jnp.int32)
    t0 = time.perf_counter()
    with standin_kernels() if kernels == "standin" else contextlib.nullcontext():
        lowered = step.lower(lora_state, opt_state, frozen, ids)
    t1 = time.perf_counter()
    compiled = lowered.compile(compiler_options=options)
    return compiled, t1 - t0, time.perf_counter() - t1


def memory_numbers(compiled) -> dict[str, float]:
    """`memory_analysis()` in GiB, with step_jax's peak (arguments + temporaries + outputs - aliases)."""
    m = compiled.memory_analysis()
    out = dict(argument_gib=m.argument_size_in_bytes / GIB, output_gib=m.output_size_in_bytes / GIB,
               alias_gib=m.alias_size_in_bytes / GIB, temp_gib=m.temp_size_in_bytes / GIB)
    out["peak_gib"] = out["argument_gib"] + out["temp_gib"] + out["output_gib"] - out["alias_gib"]
    return out


# ---- the peak's buffers, from XLA's dump --------------------------------------------------------------------------

def _one(dump: Path, suffix: str) -> str | None:
    files = sorted(glob.glob(str(dump / f"*after_optimizations{suffix}")))
    return Path(files[-1]).read_text() if files else None


def _op_names(hlo: str) -> dict[str, str]:
    """instruction name -> the JAX operation that made it (its op_name metadata, or for a fusion without one, the
    first op_name inside the fused computation)."""
    comp_op: dict[str, str] = {}
    inst_op: dict[str, str] = {}
    inst_calls: dict[str, str] = {}
    comp = None
    for line in hlo.splitlines():
        head = re.match(r"^(?:ENTRY )?%(\S+) .*\{$", line)
        if head:
            comp = head.group(1)
            continue
        m = re.match(r"\s+(?:ROOT )?%(\S+) = ", line)
        if not m:
            continue
        op = re.search(r'op_name="([^"]*)"', line)
        calls = re.search(r"calls=%([\w.\-]+)", line)
        if op:
            inst_op[m.group(1)] = op.group(1)
            if comp is not None:
                comp_op.setdefault(comp, op.group(1))
        if calls:
            inst_calls[m.group(1)] = calls.group(1)
    for name, called in inst_calls.items():
        if name not in inst_op and called in comp_op:
            inst_op[name] = comp_op[called]
    return {k: v.removeprefix("jit(step)/") for k, v in inst_op.items()}


def peak_buffers(dump: Path) -> dict | None:
    """The temporaries live at the peak of XLA's schedule, from the dumped live ranges and buffer assignment:
    {"time", "program_length", "bytes", "buffers": [{"name", "bytes", "shape", "op", "live"}]}; None without a
    live-range dump (the GPU backend may not write one)."""
    live, assignment, hlo = (_one(dump, s) for s in ("-live-range.txt", "-buffer-assignment.txt", ".txt"))
    if live is None or assignment is None or hlo is None:
        return None
    # the one temporary allocation and the shapes of its values
    temp = re.search(r"^allocation \d+: size \d+, preallocated-temp:\n((?: value: .*\n)+)", assignment, re.M)
    shapes = {}
    for name, shape in re.findall(r" value: <\d+ (\S+?)(?: \(phi\))? @\d+> \(size=\d+,offset=\d+\): (\S+)",
                                  temp.group(1) if temp else ""):
        shapes[name if "{" in name else name + "{}"] = re.sub(r"\{[\d,]*\}$", "", shape)
    if not shapes:
        return None
    ranges = dict(re.findall(r"^\s+(\S+\{[\d,]*\}):(\d+-\d+)$", live, re.M))
    length = re.search(r"HloLiveRange \(max (\d+)\)", live)
    peak = re.search(r"Live ranges at (\d+) \(peak\):\n((?:\s+\S+: \d+ bytes.*\n)+)", live)
    if peak is None:
        return None
    ops = _op_names(hlo)
    buffers = []
    for name, size in re.findall(r"^\s+(\S+): (\d+) bytes", peak.group(2), re.M):
        if name in shapes:  # a temporary (arguments and outputs live in their own allocations)
            buffers.append(dict(name=name, bytes=int(size), shape=shapes[name], op=ops.get(name.split("{")[0], ""),
                                live=ranges.get(name, "")))
    buffers.sort(key=lambda b: -b["bytes"])
    return dict(time=int(peak.group(1)), program_length=int(length.group(1)) if length else None,
                bytes=sum(b["bytes"] for b in buffers), buffers=buffers)


def group_buffers(buffers: list[dict]) -> list[dict]:
    """Buffers of one shape made by one operation, together (24 saved layer inputs are one line), largest first."""
    groups: dict[tuple[str, str], dict] = {}
    for b in buffers:
        g = groups.setdefault((b["shape"], b["op"]), dict(shape=b["shape"], op=b["op"], count=0, bytes=0))
        g["count"] += 1
        g["bytes"] += b["bytes"]
    return sorted(groups.values(), key=lambda g: -g["bytes"])


# ---- scaling with depth -------------------------------------------------------------------------------------------

def fit_layers(rows: list[dict]) -> list[dict]:
    """Per length with two or more layer counts: temporaries = a + b·layers through the smallest two counts (b: what
    each layer keeps; a: the rest), b also in bytes per token and in bf16 [S, H] tensors."""
    fits = []
    for seq in sorted({r["seq"] for r in rows}):
        pts = sorted((r["layers"], r["temp_gib"], r["hidden"]) for r in rows if r["seq"] == seq)
        if len(pts) < 2:
            continue
        (l0, t0, hidden), (l1, t1, _) = pts[:2]
        b = (t1 - t0) / (l1 - l0)
        fits.append(dict(seq=seq, per_layer_gib=b, rest_gib=t0 - b * l0, per_layer_bytes_per_token=b * GIB / seq,
                         per_layer_bf16_SH=b * GIB / (seq * hidden * 2)))
    return fits


# ---- the command --------------------------------------------------------------------------------------------------

def _ints(text: str | None) -> list[int | None]:
    return [None] if text is None else [int(s) for s in text.split(",")]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    from shared_math.presets import PRESETS

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--family", default="gpt_oss", choices=list(PRESETS))
    p.add_argument("--preset", default=None, help="a full-size preset of the family (default: its first) or tiny")
    p.add_argument("--layers", default=None, help="comma-separated depths (default: the preset's)")
    p.add_argument("--seq", default="65536", help="comma-separated context lengths")
    p.add_argument("--jax-remat", default="small_dots", choices=REMAT, help="the checkpointed layers' policy")
    p.add_argument("--no-grad-ckpt", dest="grad_ckpt", action="store_false", help="no per-layer checkpointing")
    p.add_argument("--checkpoint-layers", type=int, default=None, metavar="N", help="checkpoint the first N only")
    p.add_argument("--expert-chunk", type=int, default=None, metavar="TOKENS", help="tile the experts")
    p.add_argument("--backend", default=None,
                   help="MoE backend (default: ragged_dot with stand-in kernels, else auto)")
    p.add_argument("--kernels", default=None, choices=["standin", "real"],
                   help="GPU-only kernels as stand-ins (default on a CPU) or the real ones (default on a GPU)")
    p.add_argument("--keep-remat-barriers", action=argparse.BooleanOptionalAction, default=True,
                   help="CPU: keep jax.checkpoint's optimization barriers, as the GPU pipeline does")
    p.add_argument("--rank", type=int, default=64)
    p.add_argument("--alpha", type=float, default=128.0)
    p.add_argument("--top", type=int, default=12, help="groups of peak buffers to print")
    p.add_argument("--buffers", type=int, default=0, help="single peak buffers to print")
    p.add_argument("--dump", type=Path, default=None, help="keep XLA's dump here (default: a temporary folder)")
    p.add_argument("--out", type=Path, default=None, help="append one JSON line per (layers, seq)")
    a = p.parse_args(argv)
    a.layers, a.seqs = _ints(a.layers), _ints(a.seq)
    return a


def _describe(row: dict) -> str:
    return (f"{row['family']} {row['preset']} layers={row['layers']} S={row['seq']} remat={row['jax_remat']} "
            f"expert_chunk={row['expert_chunk']} kernels={row['kernels']} ({row['jax_backend']})")


def plan_one(a: argparse.Namespace, layers: int | None, seq: int, cache: dict) -> dict:
    """One (layers, seq) row: memory_analysis and the peak's buffers."""
    import jax

    from shared_math.config import EXPERT_TARGETS, LoraConfig, ModelConfig
    from shared_math.plan import attention_targets
    from shared_math.presets import preset_hf_config

    hf = preset_hf_config(a.family, a.preset, layers)
    cfg = ModelConfig.from_hf(hf)
    if layers not in cache:
        log(f"building the abstract {a.family} {a.preset} model ({cfg.num_hidden_layers} layers)")
        lora = LoraConfig(rank=a.rank, alpha=a.alpha, targets=attention_targets(cfg) + EXPERT_TARGETS)
        cache[layers] = abstract_step(hf, lora, backend=a.backend, remat=a.jax_remat if a.grad_ckpt else None,
                                      expert_chunk=a.expert_chunk, checkpoint_layers=a.checkpoint_layers,
                                      kernels=a.kernels)
    row = dict(family=a.family, preset=a.preset, layers=cfg.num_hidden_layers, seq=seq, hidden=cfg.hidden_size,
               jax_remat=a.jax_remat if a.grad_ckpt else None, checkpoint_layers=a.checkpoint_layers,
               expert_chunk=a.expert_chunk, backend=a.backend, kernels=a.kernels, jax=jax.__version__,
               jax_backend=jax.default_backend(), keep_remat_barriers=a.keep_remat_barriers)
    with contextlib.ExitStack() as stack:
        dump = a.dump / f"L{cfg.num_hidden_layers}_S{seq}" if a.dump else Path(stack.enter_context(
            tempfile.TemporaryDirectory(prefix="jax_memory_plan_")))
        log(f"compiling {_describe(row)}")
        compiled, lower_s, compile_s = compile_plan(*cache[layers], seq, kernels=a.kernels,
                                                    keep_barriers=a.keep_remat_barriers, dump=dump)
        row.update(memory_numbers(compiled), lower_s=round(lower_s, 1), compile_s=round(compile_s, 1))
        peak = peak_buffers(dump)
    if peak is not None:
        row.update(peak_live_temp_gib=peak["bytes"] / GIB, peak_time=peak["time"],
                   program_length=peak["program_length"], peak_groups=group_buffers(peak["buffers"])[:max(a.top, 20)],
                   peak_buffers=peak["buffers"][:a.buffers])
    return row


def print_row(row: dict, top: int) -> None:
    print(f"\n{_describe(row)}: lowered in {row['lower_s']} s, compiled in {row['compile_s']} s")
    print(f"  arguments {row['argument_gib']:.2f} GiB, temporaries {row['temp_gib']:.2f}, outputs "
          f"{row['output_gib']:.2f} (aliased to donated arguments {row['alias_gib']:.2f}): peak "
          f"{row['peak_gib']:.2f} GiB")
    if "peak_groups" not in row:
        print("  (no live-range dump: the peak's buffers are not listed)")
        return
    print(f"  temporaries live at the schedule's peak (point {row['peak_time']} of {row['program_length']}): "
          f"{row['peak_live_temp_gib']:.2f} GiB")
    print(f"  {'count':>5} {'GiB':>7} {'MiB each':>9}  {'shape':<28} operation")
    for g in row["peak_groups"][:top]:
        print(f"  {g['count']:>5} {g['bytes'] / GIB:>7.2f} {g['bytes'] / g['count'] / 2**20:>9.1f}  "
              f"{g['shape']:<28} {g['op'][-90:]}")
    for b in row.get("peak_buffers", []):
        print(f"    {b['bytes'] / 2**20:9.1f} MiB {b['shape']:<28} live {b['live']:<13} {b['name']:<30} "
              f"{b['op'][-70:]}")


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    import jax

    from shared_math.presets import preset_names

    a.preset = a.preset or preset_names(a.family)[0]
    if a.kernels is None:
        a.kernels = "real" if jax.default_backend() == "gpu" else "standin"
    if a.backend is None:
        a.backend = "ragged_dot" if a.kernels == "standin" else "auto"
    rows, cache = [], {}
    for layers in a.layers:
        for seq in a.seqs:
            row = plan_one(a, layers, seq, cache)
            print_row(row, a.top)
            rows.append(row)
            if a.out:
                with a.out.open("a") as f:
                    f.write(json.dumps(row) + "\n")
    for fit in fit_layers(rows):
        print(f"\nS={fit['seq']}: temporaries = {fit['rest_gib']:.2f} + {fit['per_layer_gib']:.3f} x layers GiB; a "
              f"layer keeps {fit['per_layer_bytes_per_token'] / 1024:.1f} KiB a token = "
              f"{fit['per_layer_bf16_SH']:.2f} bf16 [S, H] tensors")
    return 0


if __name__ == "__main__":
    sys.exit(main())
