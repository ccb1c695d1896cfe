"""Building blocks shared by the model families, rounding where HF rounds.

Shape legend: B batch · S sequence · H hidden · N query heads · Nkv key/value heads · D head_dim · V vocab.
Linear weights are canonical `[in, out]`, applied as `x @ W` (HF stores `[out, in]` and calls F.linear).

- `Linear`: `x @ W (+ b)`, frozen.
- `RMSNorm`: normalise in fp32, cast back to the input dtype, times the weight (HF Llama/Qwen rounding).
- `RotaryEmbedding`: HF's default RoPE or YaRN (`shared_math.rope`): inv_freq in fp32, angles in fp32, cos/sin cast
  to the activation dtype; NeoX half-split rotation (`rotate_half`), partial over the first dims, or DeepSeek's
  interleaved pairs (`apply_rotary_interleave`).
- `causal_mask`: the attention mask of a batch: causal, within one packed document (as HF builds it from
  position_ids), over real tokens only (`attention_mask`, HF's padding mask), within a sliding window;
  `packed_causal_mask` is its packed-documents-only form.
- `prepare_attention_mask`: checks a [B, S] padding mask (HF's `attention_mask`: 1 = token, 0 = padding).
- `Attention`: GQA with optional per-head q/k RMSNorm before RoPE, through `scaled_dot_product_attention`
  (`sdpa_attention`: 0 for a query with no key, a left-padding position, as torch's SDPA).
- `DenseMLP`: `down(silu(gate(x)) * up(x))`.
- `CausalLMOutput`, `causal_lm_loss`, `load_balancing_loss`: model outputs and HF's losses (the aux loss masked by
  `attention_mask` as HF's `load_balancing_loss_func`; the LM loss masked by labels = -100 only, as HF's).
- `LayerCheckpointing`: HF's `gradient_checkpointing_enable()` switch for the decoder-layer loop, with what a layer
  keeps (`REMAT_POLICIES`: nothing, or its attention kernels' outputs through `keeps_attention`) and how many of the
  first layers are checkpointed (`layers=N`: the rest keep their activations and skip the recompute).
- `static_batch`, `is_packed`, `documents`: the host syncs of a forward (token-id range check, "are these packed
  documents?") and how `static_batch` removes them so the forward can be captured in a CUDA graph
  (`torch_impl.cuda_graph`).
"""

from __future__ import annotations

import collections
import functools
import threading
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager, nullcontext
from typing import NamedTuple

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from shared_math.config import ModelConfig
from shared_math.rope import rope_inv_freq
from shared_math.train_config import validate_checkpoint_layers
from torch_impl.models import fused_glue


class LayerCheckpointing:
    """Mixin of the models (`models.decoder.CausalLM`): with `gradient_checkpointing_enable()` (HF's name) each
    decoder layer keeps only its input for the backward and recomputes its forward there (non-reentrant
    `torch.utils.checkpoint`), trading one more forward for the layer activations; only while training with grad
    enabled, as HF does.

    `gradient_checkpointing_enable(offload_to_cpu=True)` moves even the kept layer inputs to pinned host memory
    (`offloaded_checkpoint`; what Unsloth calls gradient offloading): at 128K tokens a Qwen3-30B-A3B layer input is
    0.5 GiB, 24 GiB over 48 layers, and the copies overlap the layers' compute.

    `policy` (a name of `REMAT_POLICIES`, as jax_impl's `gradient_checkpointing_enable(policy=...)`) says what
    else a layer keeps: "nothing" (the default) or "attention", which keeps the attention kernel's outputs (its
    output and log-sum-exp) so that the recompute skips the attention forward (`keep_attention_contexts`). With
    compiled layers (`compile_decoder_layers`) that policy breaks each layer's graph at its attention
    (`keeps_attention`), so it does not combine with `fullgraph=True`.

    `layers=N` checkpoints only the first N decoder layers (in forward order; on device or offloaded, with the
    policy) and runs the others plainly, keeping their activations (Megatron's `recompute_num_layers`). None, the
    default, checkpoints them all. Why: when a step has memory to spare (a Qwen3-30B-A3B step at 4K peaks GiBs below
    Unsloth's), each layer left un-checkpointed saves its forward's recompute in the backward for one layer's
    activations. The first N, as Megatron: the backward reaches the last layers first and frees their kept
    activations before any recompute needs working memory."""

    gradient_checkpointing: bool = False
    checkpoint_offload: bool = False
    checkpoint_policy: str = "nothing"
    checkpoint_layers: int | None = None  # how many of the first decoder layers are checkpointed; None: all

    def gradient_checkpointing_enable(self, offload_to_cpu: bool = False, policy: str = "nothing",
                                      layers: int | None = None) -> None:
        if policy not in REMAT_POLICIES:
            raise ValueError(f"unknown checkpoint policy {policy!r}; choose one of {', '.join(REMAT_POLICIES)}")
        if offload_to_cpu and policy != "nothing":
            # the offloaded checkpoint is reentrant (no context_fn) and exists to keep nothing on the GPU
            raise ValueError(f"checkpoint policy {policy!r} keeps tensors on the GPU, which offload_to_cpu=True "
                             "exists to avoid: use one or the other")
        if layers is not None:
            validate_checkpoint_layers(layers, len(self.layers))
        self.gradient_checkpointing = True
        self.checkpoint_offload = bool(offload_to_cpu)
        self.checkpoint_policy = policy
        self.checkpoint_layers = layers

    def gradient_checkpointing_disable(self) -> None:
        self.gradient_checkpointing = False
        self.checkpoint_offload = False
        self.checkpoint_policy = "nothing"
        self.checkpoint_layers = None

    def _run_layer(self, layer_idx: int, layer: nn.Module, *args):
        """Decoder layer `layer_idx` (its position in the forward) on `args`, checkpointed if it is one of the first
        `checkpoint_layers` while training with grad enabled."""
        checkpointed = self.checkpoint_layers is None or layer_idx < self.checkpoint_layers
        if self.gradient_checkpointing and checkpointed and self.training and torch.is_grad_enabled():
            if self.checkpoint_offload:
                return offloaded_checkpoint(layer, *args)
            # no RNG state to restore: nothing in these forwards draws random numbers (no dropout anywhere), and
            # saving it would read the CUDA generator, which a CUDA-graph capture forbids
            return torch.utils.checkpoint.checkpoint(layer, *args, use_reentrant=False, preserve_rng_state=False,
                                                     context_fn=REMAT_POLICIES[self.checkpoint_policy])
        return layer(*args)


# True while a checkpointed decoder layer's forward is recomputed in the backward (`layer_recompute`). A plain
# module global on purpose: a compiled layer that reads it (`in_layer_recompute`, the MoE block's routing
# statistics) gets a Dynamo guard on its value, so the forward and the recompute each get their own graph, where
# autograd's own "in a backward?" query (`torch._C._current_graph_task_id`) is a graph break.
_RECOMPUTING = False


@contextmanager
def layer_recompute() -> Iterator[None]:
    """Mark the forwards run inside as activation checkpointing's recompute (`in_layer_recompute()` is True)."""
    global _RECOMPUTING
    previous, _RECOMPUTING = _RECOMPUTING, True
    try:
        yield
    finally:
        _RECOMPUTING = previous


def in_layer_recompute() -> bool:
    """True inside `layer_recompute()`: a checkpointed layer's forward run again in the backward (traceable by
    torch.compile: a guarded global, no graph break)."""
    return _RECOMPUTING


def _recompute_contexts():
    """`torch.utils.checkpoint`'s context_fn: nothing around the forward, `layer_recompute()` around the recompute."""
    return nullcontext(), layer_recompute()


# SDPA's kernels as the dispatcher sees them below `F.scaled_dot_product_attention` (a composite op): each returns
# the attention output and its log-sum-exp (and, for some, RNG state), all that its backward reads besides q, k, v
# (and `_flash_attention_forward`, the flash kernel with a window argument, which `lse_attention` calls for gpt-oss's
# sliding layers)
_ATTENTION_OP_NAMES = ("_scaled_dot_product_flash_attention", "_scaled_dot_product_cudnn_attention",
                       "_scaled_dot_product_efficient_attention", "_scaled_dot_product_flash_attention_for_cpu",
                       "_flash_attention_forward")


@functools.cache
def _attention_ops() -> frozenset:
    return frozenset(getattr(torch.ops.aten, n).default for n in _ATTENTION_OP_NAMES if hasattr(torch.ops.aten, n))


class _KeepAttention(TorchDispatchMode):
    """Below autograd, in a checkpointed layer's first forward, around its attention functions: runs every op, and
    keeps (detached) what the SDPA kernels return, in call order."""

    def __init__(self, kept: collections.deque):
        super().__init__()
        self.kept = kept

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func in _attention_ops():
            self.kept.append(tuple(o.detach() if isinstance(o, torch.Tensor) else o for o in out))
        return out


class _ReuseAttention(TorchDispatchMode):
    """Below autograd, in the layer's recompute: an SDPA kernel call returns what the forward's call at the same
    position returned instead of running (autograd above still records its backward node, which saves q, k, v and
    these outputs); every other op runs."""

    def __init__(self, kept: collections.deque):
        super().__init__()
        self.kept = kept

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func not in _attention_ops():
            return func(*args, **(kwargs or {}))
        q = args[0]
        if not self.kept or self.kept[0][0].shape[:-1] != q.shape[:-1] or self.kept[0][0].dtype != q.dtype:
            # the recompute must replay the forward's attention calls in order: anything else is a bug, never a
            # silently wrong gradient
            raise RuntimeError(f"the recompute called {func} (query {tuple(q.shape)}, {q.dtype}) where the "
                               "checkpointed forward kept no matching attention output; train with "
                               "gradient_checkpointing_enable(policy='nothing') and report this")
        return self.kept.popleft()


# The dispatch mode the attention call sites (`keeps_attention`) enter, per thread (a layer's recompute runs in
# autograd's backward thread): set by the "attention" policy's contexts for the span of one checkpointed layer call.
_ATTENTION = threading.local()
# True for that same span. A plain module global, as `_RECOMPUTING`: a compiled layer reads it at trace time and gets a
# Dynamo guard on it, so its graph breaks around the attention only under the policy (a thread-local read does not
# trace).
_KEEPING = False


@contextmanager
def _attention_mode(mode: TorchDispatchMode) -> Iterator[None]:
    global _KEEPING
    previous, previous_keeping = getattr(_ATTENTION, "mode", None), _KEEPING
    _ATTENTION.mode, _KEEPING = mode, True
    try:
        yield
    finally:
        _ATTENTION.mode, _KEEPING = previous, previous_keeping


def attention_policy_mode() -> TorchDispatchMode | None:
    """The "attention" policy's dispatch mode for this thread's current span (`_KeepAttention` in a checkpointed
    layer's forward, `_ReuseAttention` in its recompute), None outside one. For attention code that enters it around
    its kernel calls itself (`lse_attention`, whose kernels are a custom op inside compiled layers) instead of through
    `keeps_attention`."""
    return getattr(_ATTENTION, "mode", None)


def keeps_outputs(mode: TorchDispatchMode | None) -> bool:
    """Whether `mode` (an `attention_policy_mode()`) keeps the attention kernels' outputs: a checkpointed layer's
    forward under the "attention" policy, not its recompute."""
    return isinstance(mode, _KeepAttention)


def keeps_attention(fn):
    """Decorates an attention function (`sdpa_attention`, gpt-oss's `_sink_attention_padded`; its log-sum-exp path
    enters the mode itself, `attention_policy_mode`): inside a checkpointed layer under the "attention" policy its
    ops run under that policy's dispatch mode, which keeps (forward) or hands back (recompute) the SDPA kernels'
    outputs; elsewhere it is `fn` itself. Only these few ops pass through Python's
    dispatch: a mode around the whole layer costs every aten op of it host time (about 19 µs an op on the 2-core CI
    machine), which the host-bound short-sequence steps would feel.

    In a compiled layer (`compile_decoder_layers`) under the policy the attention is a graph break: it runs eagerly
    between the layer's two graphs, where a dispatch mode works (one inside a graph would not be traced). Without
    the policy the compiled layer traces `fn` whole, as before."""

    def in_mode(*args, **kwargs):
        mode = getattr(_ATTENTION, "mode", None)
        if mode is None:
            return fn(*args, **kwargs)
        with mode:
            return fn(*args, **kwargs)

    eager = torch._dynamo.disable(in_mode)  # the graph break: Dynamo calls it as Python, outside any graph

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        if torch.compiler.is_compiling():
            return eager(*args, **kwargs) if _KEEPING else fn(*args, **kwargs)
        return in_mode(*args, **kwargs)

    return wrapper


def keep_attention_contexts():
    """The "attention" policy's context_fn: the layer's forward keeps the outputs of its SDPA kernel calls (output,
    log-sum-exp, RNG state where a kernel has one) and the recompute hands them back in the same order instead of
    running the kernels (q, k, v are recomputed, as the backward needs them), inside `layer_recompute()` as the
    plain policy's recompute. Not torch's selective checkpointing: that requires the recompute to dispatch exactly the
    forward's ops, and this one does not (`Experts` skips the down GEMM there, `output_unread_in_recompute`).

    Why: the recompute of a causal attention forward grows with S² while the rest of a layer grows with S; on a
    24-layer Qwen3-30B-A3B step it is 0.26 ms per layer at 4K on an H100 (session 5's profile: 2% of the step) and
    about 16x that at 16K. The cost: a layer keeps [B, S, N·D] activations and an fp32 [B, N, S] log-sum-exp until its
    backward (128 MiB + 2 MiB per Qwen3 layer at 16K)."""
    kept: collections.deque = collections.deque()
    return _attention_mode(_KeepAttention(kept)), _entered(_attention_mode(_ReuseAttention(kept)), layer_recompute())


@contextmanager
def _entered(*managers) -> Iterator[None]:
    with ExitStack() as stack:
        for m in managers:
            stack.enter_context(m)
        yield


# what a checkpointed decoder layer keeps besides its input, by name -> the checkpoint's context_fn (jax_impl's twin,
# `jax_impl.models.layers.REMAT_POLICIES`, maps its names to jax.checkpoint policies; "nothing" means the same in both)
REMAT_POLICIES = {"nothing": _recompute_contexts, "attention": keep_attention_contexts}


class _OffloadedCheckpoint(torch.autograd.Function):
    """A decoder layer run without grad, its input copied to pinned host memory; the backward copies it back,
    recomputes the layer with grad and back-propagates through it (reentrant checkpointing: the LoRA parameters
    inside the layer get their gradients from that inner backward). `anchor` is an empty tensor that requires grad,
    so the outputs require grad even when the layer input does not (the first layer's input is a frozen embedding).
    """

    @staticmethod
    def forward(ctx, layer: nn.Module, anchor: torch.Tensor, x: torch.Tensor, *args):
        ctx.layer, ctx.args, ctx.device, ctx.x_requires_grad = layer, args, x.device, x.requires_grad
        ctx.x_host = torch.empty(x.shape, dtype=x.dtype, device="cpu", pin_memory=x.is_cuda)
        ctx.x_host.copy_(x, non_blocking=True)  # ordered on the stream before anything can reuse x's memory
        with torch.no_grad():
            out = layer(x, *args)
        return out if isinstance(out, tuple) else (out,)  # a dense layer's router logits stay None

    @staticmethod
    def backward(ctx, *grads):
        x = ctx.x_host.to(ctx.device, non_blocking=True).requires_grad_(True)
        with torch.enable_grad(), layer_recompute():
            out = ctx.layer(x, *ctx.args)
        outs = out if isinstance(out, tuple) else (out,)
        pairs = [(o, g) for o, g in zip(outs, grads) if o is not None and g is not None and o.requires_grad]
        if pairs:
            torch.autograd.backward([o for o, _ in pairs], [g for _, g in pairs])
        ctx.x_host = None
        return (None, None, x.grad if ctx.x_requires_grad else None, *([None] * len(ctx.args)))


def offloaded_checkpoint(layer: nn.Module, x: torch.Tensor, *args):
    """`layer(x, *args)` with activation checkpointing whose saved input lives in host memory (see
    `_OffloadedCheckpoint`); returns what the layer returns (a tensor, or a tuple that may hold None)."""
    anchor = torch.empty(0, device=x.device, requires_grad=True)
    outs = _OffloadedCheckpoint.apply(layer, anchor, x, *args)
    return outs if len(outs) > 1 else outs[0]


def _frozen(*shape: int, dtype=None, device=None) -> nn.Parameter:
    return nn.Parameter(torch.empty(*shape, dtype=dtype, device=device), requires_grad=False)


class Linear(nn.Module):
    """y = x @ weight [in, out] (+ bias [out]); frozen (LoRA goes through `torch_impl.lora.LoRALinear`)."""

    def __init__(self, in_features: int, out_features: int, *, bias: bool = False, dtype=None, device=None) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight = _frozen(in_features, out_features, dtype=dtype, device=device)
        self.bias = _frozen(out_features, dtype=dtype, device=device) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = x @ self.weight
        return y if self.bias is None else y + self.bias


class RMSNorm(nn.Module):
    """weight * (x_f32 · rsqrt(mean(x_f32²) + eps)).to(x.dtype): statistics in fp32, one rounding, then the weight."""

    def __init__(self, dim: int, eps: float = 1e-6, *, dtype=None, device=None) -> None:
        super().__init__()
        self.eps = eps
        self.weight = _frozen(dim, dtype=dtype, device=device)

    rounding = "llama"  # fused_glue.rms_norm's name for where this class rounds

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if fused_glue.glue_mode(x) == "fused":  # one Triton kernel each way on CUDA (models.fused_glue)
            return fused_glue.rms_norm(x, self.weight, self.eps, self.rounding)
        return self.eager(x)

    def eager(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


class RotaryEmbedding(nn.Module):
    """cos, sin [B, S, D] for position_ids [B, S]: HF's default RoPE or YaRN (`shared_math.rope`), D = rotated dims;
    cos/sin are multiplied by YaRN's attention_factor (1 for default RoPE) in fp32, then cast, as HF does."""

    def __init__(self, head_dim: int, theta: float, rope_scaling=None, device=None) -> None:
        super().__init__()
        inv_freq, self.attention_scaling = rope_inv_freq(head_dim, theta, rope_scaling)
        self.register_buffer("inv_freq", torch.from_numpy(inv_freq).to(device), persistent=False)

    def forward(self, x: torch.Tensor, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        freqs = position_ids[..., None].float() * self.inv_freq.float()
        emb = torch.cat((freqs, freqs), dim=-1)
        cos, sin = emb.cos(), emb.sin()
        if self.attention_scaling != 1.0:
            cos, sin = cos * self.attention_scaling, sin * self.attention_scaling
        return cos.to(x.dtype), sin.to(x.dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """q [B, N, S, D], k [B, Nkv, S, D]; cos, sin [B, S, Dr]. NeoX rotation of the first Dr dims (partial RoPE,
    GLM-4.x: Dr < D); the rest passes through."""
    if fused_glue.glue_mode(q) == "fused":  # one Triton kernel each way on CUDA, in place (models.fused_glue)
        return fused_glue.rotary(q, k, cos, sin)
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    r = cos.shape[-1]
    if r == q.shape[-1]:
        return q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin
    q_rot, k_rot = q[..., :r] * cos + _rotate_half(q[..., :r]) * sin, k[..., :r] * cos + _rotate_half(k[..., :r]) * sin
    return torch.cat([q_rot, q[..., r:]], dim=-1), torch.cat([k_rot, k[..., r:]], dim=-1)


def apply_rotary_interleave(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
                            ) -> tuple[torch.Tensor, torch.Tensor]:
    """DeepSeek's interleaved RoPE as HF applies it: pairs (x0, x1), (x2, x3), ... rotate by one angle each, and the
    result is laid out `[rotated evens | rotated odds]` (for q and k alike, so q·k equals the interleaved form's)."""
    half = cos.shape[-1] // 2
    cos, sin = cos[..., :half].unsqueeze(1), sin[..., :half].unsqueeze(1)

    def rot(x: torch.Tensor) -> torch.Tensor:
        x1, x2 = x[..., 0::2], x[..., 1::2]
        return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)

    return rot(q), rot(k)


_STATIC = threading.local()  # .packed: the declared packing inside static_batch(), absent outside


@contextmanager
def static_batch(packed: bool) -> Iterator[None]:
    """Forward passes inside do no host syncs, so they can be captured in a CUDA graph: the token-id range check of
    `prepare_position_ids` is skipped (the caller checks the ids), and whether the rows hold packed documents is
    taken from `packed` instead of being read from position_ids (`documents`), so the attention path chosen at
    capture is the one every replay runs. `torch_impl.cuda_graph` enters it for the warm-up and the capture."""
    prev = getattr(_STATIC, "packed", None)
    _STATIC.packed = bool(packed)
    try:
        yield
    finally:
        if prev is None:
            del _STATIC.packed
        else:
            _STATIC.packed = prev


def in_static_batch() -> bool:
    return getattr(_STATIC, "packed", None) is not None


def documents(position_ids: torch.Tensor) -> tuple[torch.Tensor, bool]:
    """(doc_BS, packed): the document index of every position (a document starts wherever position_ids do not grow by
    exactly 1, as HF's `find_packed_sequence_indices`), and whether any row holds more than one document. `packed`
    is read on the host (one sync), or taken from `static_batch`."""
    doc_BS = document_ids(position_ids)
    packed = getattr(_STATIC, "packed", None)
    return doc_BS, (not bool((doc_BS[:, -1] == 0).all())) if packed is None else packed


def is_packed(position_ids: torch.Tensor) -> bool:
    """Whether any row of position_ids [B, S] holds more than one document (read on the host: a sync on a GPU)."""
    return not bool((document_ids(position_ids)[:, -1] == 0).all())


def document_ids(position_ids: torch.Tensor) -> torch.Tensor:
    """[B, S] index of each position's document within its row (0 for the first)."""
    return (torch.diff(position_ids, prepend=position_ids[:, :1] - 1, dim=-1) != 1).cumsum(-1)


def packed_causal_mask(position_ids: torch.Tensor) -> torch.Tensor | None:
    """Bool mask [B, 1, S, S] (True = attend) for packed documents, or None for plain causal attention.

    As HF 5.x does when position_ids are given without an attention mask (`find_packed_sequence_indices`): a new
    document starts wherever the position does not grow by exactly 1 (so restarting at 0 starts one); a query sees
    the keys at or before it in its own document only. None when every row is one document: then SDPA's
    `is_causal` path runs, as in HF. (`causal_mask` without padding or window.)
    """
    return causal_mask(position_ids)


def causal_mask(position_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                window: int | None = None) -> torch.Tensor | None:
    """Bool mask [B, 1, S, S] (True = attend) of a batch, or None when that is plain causal attention (one document
    per row, no padding, no window shorter than the row: SDPA's `is_causal` path, as HF skips its mask then).

    Query i may attend key j iff j <= i (by index, as HF's `causal_mask_function`), both lie in the same packed
    document of position_ids (`documents`), j is a real token (`attention_mask` [B, S] bool from
    `prepare_attention_mask`: HF's padding mask) and, with `window`, i - window < j (gpt-oss's sliding layers).

    A row may be empty: a left-padding query has no real key at or before it. What attention then gives is not
    HF's to define either: its eager path adds dtype-min to every logit (uniform weights over all keys), its SDPA
    path gives 0 (torch's softmax of an empty row), gpt-oss's sink takes all the weight (0). Here it is 0
    (`sdpa_attention`; the sink does it for gpt-oss): HF's default SDPA and its gpt-oss numbers, never NaN. No real
    token reads such a row; only a label predicted from it (left padding's first real token) does, so mask that
    label (-100) where the padding implementation must not matter.

    HF builds its packed-document mask only when no attention_mask is given; here documents and padding combine.
    With HF's own position_ids for padded rows (default arange, or generation's cumsum of the mask) every row's
    real tokens form one document, so the two agree on real tokens; truly packed rows plus padding stay separated
    by document here (what packing promises), where HF would let them attend across.
    """
    B, S = position_ids.shape
    doc_BS, packed = documents(position_ids)
    windowed = window is not None and window < S
    if not packed and not windowed and attention_mask is None:
        return None
    idx = torch.arange(S, device=position_ids.device)
    allowed_SS = idx[None, :] <= idx[:, None]
    if windowed:
        allowed_SS = allowed_SS & (idx[None, :] > idx[:, None] - window)
    allowed = allowed_SS[None] & (doc_BS[:, :, None] == doc_BS[:, None, :]) if packed else allowed_SS[None]
    if attention_mask is not None:
        allowed = allowed & attention_mask.to(torch.bool)[:, None, :]
    return allowed.unsqueeze(1)


@keeps_attention
def sdpa_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
                   scale: float) -> torch.Tensor:
    """softmax(q·kᵀ·scale, masked)·v through `F.scaled_dot_product_attention`: q [B, N, S, D], k, v [B, Nkv, S, D]
    (each kv head serves N / Nkv consecutive query heads, HF's repeat_kv), mask [B, 1, S, S] bool from `causal_mask`,
    or None for causal attention (the `is_causal` kernels).

    Causal attention takes the kv heads as they are (`enable_gqa`): the cuDNN and CPU flash kernels read each kv head
    for its query heads, with no repeated copy of K and V in the forward, the recompute and the backward's sum over
    the copies (H100, Qwen3-30B-A3B shapes, fwd+bwd: 1.15 against 1.20 ms at 4K, 14.4 against 14.6 ms at 16K;
    benchmarks/results/session9_2026-12-06/call2_attention.jsonl). A masked batch and an fp32 model on CUDA repeat
    them (`_gqa_kernels`): SDPA's memory-efficient kernel, the one that takes a mask or fp32, has no GQA, and without
    it SDPA would fall back to its math path, which materialises the [S, S] probabilities.

    A query whose mask row is empty (left padding) gets 0, as torch's SDPA math gives for an empty row; here it is
    explicit (the row attends everywhere, then is zeroed, forward and backward), because what a kernel returns for
    an empty row has changed across torch versions (NaN before 2.5), and a NaN in a padding row would reach real
    tokens through 0 · NaN."""
    if mask is None:
        # a branch, not the comparison itself: under torch.compile with a dynamic length (a compiled layer's second
        # sequence length) the comparison is a SymBool, which SDPA rejects (a graph break in every layer); a branch
        # makes it one guard and a constant
        is_causal = True if q.shape[-2] > 1 else False
        if k.shape[1] == q.shape[1] or _gqa_kernels(q):
            gqa = True if k.shape[1] != q.shape[1] else False  # a branch, as above (heads are static anyway)
            return F.scaled_dot_product_attention(q, k, v, is_causal=is_causal, scale=scale, enable_gqa=gqa)
        k, v = repeat_kv(k, v, q.shape[1])
        return F.scaled_dot_product_attention(q, k, v, is_causal=is_causal, scale=scale)
    k, v = repeat_kv(k, v, q.shape[1])
    has_key = mask.any(-1, keepdim=True)  # [B, 1, S, 1]
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask | ~has_key, scale=scale)
    return out.masked_fill(~has_key, 0)


def _gqa_kernels(q: torch.Tensor) -> bool:
    """Whether SDPA's causal kernels for q read unrepeated kv heads: CPU flash (any float dtype) and CUDA's cuDNN and
    flash kernels (bf16 / fp16). An fp32 model on CUDA gets the memory-efficient kernel, which has no GQA: with
    `enable_gqa` SDPA would fall back to its O(S²) math path there."""
    return q.device.type == "cpu" or q.dtype in (torch.bfloat16, torch.float16)


def repeat_kv(k: torch.Tensor, v: torch.Tensor, heads: int) -> tuple[torch.Tensor, torch.Tensor]:
    """HF's repeat_kv: k, v [B, Nkv, S, D] -> [B, heads, S, D], kv head j serving query heads j·r .. j·r + r − 1."""
    rep = heads // k.shape[1]
    if rep == 1:
        return k, v
    return k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)


def prepare_attention_mask(input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor | None:
    """Check attention_mask (HF's meaning: [B, S], nonzero = real token, 0 = padding; int, bool or float) against
    input_ids [B, S] and return it as bool [B, S], or None when absent or all ones.

    An all-ones mask is dropped (one host sync, outside `static_batch`), so it takes exactly the path of no mask:
    SDPA's causal kernel and the unmasked aux loss (HF computes the same numbers through its masked branch). Inside
    `static_batch` the mask is kept whatever its values, so the capture-time attention path serves every replay."""
    if attention_mask is None:
        return None
    if tuple(attention_mask.shape) != tuple(input_ids.shape):
        raise ValueError(f"attention_mask must be [batch, seq] like input_ids {tuple(input_ids.shape)} (1 = token, "
                         f"0 = padding; 4-D masks are not accepted), got {tuple(attention_mask.shape)}")
    real_BS = attention_mask.to(torch.bool)
    if not in_static_batch() and bool(real_BS.all()):
        return None
    return real_BS


def project(x: torch.Tensor, *projections: nn.Module) -> list[torch.Tensor]:
    """[p(x) for p in projections] for projections that read the same x (q, k, v; gate and up), where those with
    split LoRA (`torch_impl.lora.LoRALinear`, fp32 adapters) share their LoRA input: one copy of x in the adapters'
    dtype and one GEMM x @ [A1 | A2 | ...] instead of one of each per projection, forward and backward (the
    backward then casts one gradient of that copy back instead of several). Per projection the same math, each z
    column still one dot product over x's row; the rest as `LoRALinear.forward_with_z`. It reads the factors
    outside the projections' own forward, so a sharding unit must hold the whole block (as
    `torch_impl.parallel.shard_model`'s per-layer FSDP units do), not each projection alone."""
    lora = [i for i, p in enumerate(projections) if getattr(p, "lora_A", None) is not None]
    if len(lora) < 2 or len({projections[i].lora_A.dtype for i in lora}) > 1:
        return [p(x) for p in projections]
    from torch_impl.lora import lora_z  # torch_impl.lora imports this module

    a_cat = torch.cat([projections[i].lora_A for i in lora], dim=1)
    zs = iter(lora_z(x, a_cat).split([projections[i].lora_A.shape[1] for i in lora], dim=-1))
    return [p.forward_with_z(x, next(zs)) if i in lora else p(x) for i, p in enumerate(projections)]


class Attention(nn.Module):
    """GQA self-attention: q/k/v projections, optional per-head RMSNorm of q and k (before RoPE), RoPE, SDPA with
    scale D^-0.5, o projection. Module names are the canonical ones (`q_proj`, ..., `q_norm`, `k_norm`)."""

    def __init__(self, cfg: ModelConfig, *, dtype=None, device=None) -> None:
        super().__init__()
        H, N, Nkv, D = cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        kw = dict(dtype=dtype, device=device)
        self.num_heads, self.num_kv_heads, self.head_dim = N, Nkv, D
        self.q_proj = Linear(H, N * D, bias=cfg.attention_bias, **kw)
        self.k_proj = Linear(H, Nkv * D, bias=cfg.attention_bias, **kw)
        self.v_proj = Linear(H, Nkv * D, bias=cfg.attention_bias, **kw)
        self.o_proj = Linear(N * D, H, bias=cfg.o_proj_bias, **kw)
        self.q_norm = RMSNorm(D, cfg.rms_norm_eps, **kw) if cfg.use_qk_norm else None
        self.k_norm = RMSNorm(D, cfg.rms_norm_eps, **kw) if cfg.use_qk_norm else None

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                mask: torch.Tensor | None = None) -> torch.Tensor:
        B, S, _ = x.shape
        q, k, v = project(x, self.q_proj, self.k_proj, self.v_proj)
        q = q.view(B, S, self.num_heads, self.head_dim)
        k = k.view(B, S, self.num_kv_heads, self.head_dim)
        v = v.view(B, S, self.num_kv_heads, self.head_dim).transpose(1, 2)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = apply_rotary(q.transpose(1, 2), k.transpose(1, 2), cos, sin)
        out = sdpa_attention(q, k, v, mask, self.head_dim ** -0.5)
        return self.o_proj(out.transpose(1, 2).reshape(B, S, -1))


class DenseMLP(nn.Module):
    """down(silu(gate(x)) * up(x)), with canonical `gate_proj`, `up_proj`, `down_proj`."""

    def __init__(self, hidden_size: int, intermediate_size: int, *, dtype=None, device=None) -> None:
        super().__init__()
        kw = dict(dtype=dtype, device=device)
        self.gate_proj = Linear(hidden_size, intermediate_size, **kw)
        self.up_proj = Linear(hidden_size, intermediate_size, **kw)
        self.down_proj = Linear(intermediate_size, hidden_size, **kw)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = project(x, self.gate_proj, self.up_proj)
        return self.down_proj(F.silu(gate) * up)


# ---- outputs and losses ------------------------------------------------------------------------------------------

class CausalLMOutput(NamedTuple):
    """logits [B, S, V] in the model dtype (None when the forward was asked for the loss alone:
    `return_logits=False`); loss (fp32 scalar) when labels were given; aux_loss when the config asks for router
    logits (HF's `output_router_logits`), else None."""

    logits: torch.Tensor | None
    loss: torch.Tensor | None = None
    aux_loss: torch.Tensor | None = None


def causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    """HF's ForCausalLMLoss: fp32 logits; labels shifted left by one (the last position gets ignore_index); mean
    cross-entropy over the non-ignored positions. Packed documents are not separated (HF does not either), and
    padding is not masked here: as in HF, the attention mask never enters the loss, so label padding -100."""
    shifted = F.pad(labels, (0, 1), value=ignore_index)[..., 1:]
    return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), shifted.reshape(-1),
                           ignore_index=ignore_index)


def load_balancing_loss(router_logits: list[torch.Tensor], num_experts: int, top_k: int,
                        attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """HF's load_balancing_loss_func: softmax over E in the logits' dtype, top-K; the pooled fraction of
    assignments f_e and mean probability P_e over all MoE layers and tokens; E · Σ f_e · P_e.

    With attention_mask ([B, S], the router logits' T = B·S rows in order) padding tokens count for nothing: every
    assignment and probability is weighted by the mask, and the token count is L · Σ mask (HF's masked branch)."""
    counts_E = router_logits[0].new_zeros(num_experts, dtype=torch.float32)
    prob_sum_E = torch.zeros_like(counts_E)
    m_T = None if attention_mask is None else attention_mask.reshape(-1).to(device=counts_E.device,
                                                                            dtype=torch.float32)
    rows = 0
    for logits_TE in router_logits:
        probs_TE = F.softmax(logits_TE, dim=-1)
        ids_TK = torch.topk(probs_TE, top_k, dim=-1)[1]
        w_M = (torch.ones_like(ids_TK, dtype=torch.float32) if m_T is None
               else m_T[:, None].expand(ids_TK.shape)).reshape(-1)
        # a scatter-add, not bincount: bincount sizes its output on the host (a sync; not capturable)
        counts_E = counts_E.scatter_add(0, ids_TK.reshape(-1), w_M)
        if m_T is None:
            prob_sum_E = prob_sum_E + probs_TE.float().sum(0)
            rows += logits_TE.shape[0]
        else:
            prob_sum_E = prob_sum_E + (probs_TE.float() * m_T[:, None]).sum(0)
            rows = rows + m_T.sum()  # a tensor: no host sync
    return num_experts * torch.sum((counts_E / rows) * (prob_sum_E / rows))


def prepare_position_ids(input_ids: torch.Tensor, position_ids: torch.Tensor | None,
                         vocab_size: int) -> torch.Tensor:
    """Check input_ids [B, S] (ids in [0, vocab_size)) and position_ids, and return position_ids as [B, S]
    (0..S-1 when None). A bad id raises here with its range, not as an index error deep inside the embedding.

    0..S-1 also with an attention mask, as HF's forward defaults them (`arange`, whatever the padding): a
    left-padded row's first real token then sits at position n_pad, which RoPE's relative form makes (up to
    rounding) the same as 0. HF's `generate` instead passes `cumsum(mask) - 1` (0 at pads); pass those explicitly
    to get them."""
    if input_ids.ndim != 2:
        raise ValueError(f"input_ids must be [batch, seq], got shape {tuple(input_ids.shape)}")
    if input_ids.numel() and not in_static_batch() and (int(input_ids.min()) < 0
                                                       or int(input_ids.max()) >= vocab_size):
        raise ValueError(f"token ids must lie in [0, vocab_size={vocab_size}), got range "
                         f"[{int(input_ids.min())}, {int(input_ids.max())}]")
    B, S = input_ids.shape
    if position_ids is None:
        return torch.arange(S, device=input_ids.device).expand(B, S)
    if position_ids.shape[-1] != S:
        raise ValueError(f"position_ids {tuple(position_ids.shape)} do not match input_ids {(B, S)}")
    return position_ids.expand(B, S)


def lm_output(h_BSH: torch.Tensor, embed_tokens_VH: torch.Tensor, lm_head: nn.Module | None,
              labels: torch.Tensor | None, router_logits: list[torch.Tensor], cfg: ModelConfig,
              output_router_logits: bool, return_logits: bool = True,
              attention_mask: torch.Tensor | None = None) -> CausalLMOutput:
    """Normed hidden states -> logits (tied embeddings when lm_head is None), HF's causal-LM loss (labels = -100
    masks it; attention_mask does not, as in HF), and the load-balancing aux loss when the config asks for router
    logits, over the real tokens of `attention_mask` [B, S] (added to the loss, times router_aux_loss_coef, only
    when labels are given: HF's rule).

    `return_logits=False` with labels: the loss comes from `torch_impl.loss.fused_linear_cross_entropy`, chunk by
    chunk, and the `[B, S, V]` logits never exist (`logits` is None): what a training step wants."""
    if labels is not None and not return_logits:
        from torch_impl.loss import fused_linear_cross_entropy

        weight, hv = (embed_tokens_VH, False) if lm_head is None else (lm_head.weight, True)
        if lm_head is not None and lm_head.bias is not None:
            raise NotImplementedError("the fused loss has no output bias; pass return_logits=True")
        logits, loss = None, fused_linear_cross_entropy(h_BSH, weight, labels, weight_is_HV=hv)
    else:
        logits = h_BSH @ embed_tokens_VH.T if lm_head is None else lm_head(h_BSH)
        loss = None if labels is None else causal_lm_loss(logits, labels)
    aux = None
    if output_router_logits and router_logits:
        aux = load_balancing_loss(router_logits, cfg.num_experts, cfg.num_experts_per_tok, attention_mask)
        if loss is not None:
            loss = loss + cfg.router_aux_loss_coef * aux
    return CausalLMOutput(logits, loss, aux)

