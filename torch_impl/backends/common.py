"""What every expert backend shares: the sort of routed rows by expert and the expert activations.

Shapes: T tokens, H hidden, I expert intermediate, E experts, K experts per token, R LoRA rank, M = T·K routed rows.

`ExpertSort` is the one permutation of the M routed rows by expert id that the base GEMMs, the LoRA GEMMs and the
backward all share (built once per layer by `torch_impl.moe.sort_by_expert`). `Activation` is the expert
nonlinearity on the fused gate_up output `[M, 2I]` (gate in columns 0:I, up in I:2I) with its hand-written
vector-Jacobian product, so a custom backward can recompute `h = act(gu)` instead of saving it.

`op_residuals` is the channel through which the custom op (`torch_impl.moe_op`) takes what a backend's autograd
Function saves for its backward (its residuals: gu, z1, z2 for grouped_mm and the Triton kernels) out of the forward
and hands it back in the backward, so that the op's backward rebuilds the Function's graph without running the
expert GEMMs a second time. A backend with such a Function declares their shapes (`residual_shapes`) and calls
`replayed_residuals` / `capture_residuals` in its forward; outside `op_residuals` both do nothing.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F


class ExpertSort:
    """Routed row m = t·K + k sits at sorted position `inverse_M[m]`; sorted row j came from flat row `order_M[j]`,
    i.e. token `token_M[j]`, slot `slot_M[j]`, and belongs to expert `expert_M[j]`. Expert e owns the sorted rows
    `offsets_E[e-1]:offsets_E[e]` (`offsets_E` are int32 cumulative group ends, the form `grouped_mm` takes).

    `inverse_M`, `slot_M` and `expert_M` are derived from the others when first read (`expert_M` from `keys_M`,
    the sorted ids in the sort's own key dtype): the Triton backends read none of them, and a layer's forward then
    launches none of their five small ops, in the forward and again in the checkpoint's recompute.
    """

    def __init__(self, order_M: torch.Tensor, token_M: torch.Tensor, group_sizes_E: torch.Tensor,
                 offsets_E: torch.Tensor, num_tokens: int, top_k: int, *, keys_M: torch.Tensor | None = None,
                 inverse_M: torch.Tensor | None = None, slot_M: torch.Tensor | None = None,
                 expert_M: torch.Tensor | None = None) -> None:
        if expert_M is None and keys_M is None:
            raise ValueError("ExpertSort needs the sorted expert ids: expert_M or keys_M")
        self.order_M = order_M  # int64 [M]
        self.token_M = token_M  # int64 [M]
        self.group_sizes_E = group_sizes_E  # int64 [E]
        self.offsets_E = offsets_E  # int32 [E], cumulative ends
        self.num_tokens, self.top_k = num_tokens, top_k  # T, K
        self._keys_M, self._inverse_M, self._slot_M, self._expert_M = keys_M, inverse_M, slot_M, expert_M

    @property
    def inverse_M(self) -> torch.Tensor:
        """int64 [M]: the sorted position of each flat routed row."""
        if self._inverse_M is None:
            inverse = torch.empty_like(self.order_M)
            inverse[self.order_M] = torch.arange(self.order_M.numel(), device=self.order_M.device)
            self._inverse_M = inverse
        return self._inverse_M

    @property
    def slot_M(self) -> torch.Tensor:
        """int64 [M]: the routing slot k of each sorted row."""
        if self._slot_M is None:
            self._slot_M = self.order_M % self.top_k
        return self._slot_M

    @property
    def expert_M(self) -> torch.Tensor:
        """int64 [M], non-decreasing: the expert of each sorted row."""
        if self._expert_M is None:
            self._expert_M = self._keys_M.long()
        return self._expert_M

    @property
    def num_experts(self) -> int:
        return self.group_sizes_E.shape[0]

    def tensors(self) -> list[torch.Tensor]:
        """The tensors, in a fixed order (the derived ones made now): how the custom op (`torch_impl.moe_op`)
        carries a sort."""
        return [self.order_M, self.inverse_M, self.token_M, self.slot_M, self.expert_M, self.group_sizes_E,
                self.offsets_E]

    @classmethod
    def from_tensors(cls, tensors: list[torch.Tensor], num_tokens: int, top_k: int) -> ExpertSort:
        """The inverse of `tensors()`."""
        order_M, inverse_M, token_M, slot_M, expert_M, group_sizes_E, offsets_E = tensors
        return cls(order_M, token_M, group_sizes_E, offsets_E, num_tokens, top_k, inverse_M=inverse_M,
                   slot_M=slot_M, expert_M=expert_M)

    def __repr__(self) -> str:
        return (f"ExpertSort(T={self.num_tokens}, K={self.top_k}, E={self.num_experts}, "
                f"M={self.order_M.numel()}, device={self.order_M.device})")


@dataclass(frozen=True)
class Activation:
    """SwiGLU on `gu [M, 2I]`: `swiglu` = silu(gate)·up (Qwen3, DeepSeek, GLM); `swiglu_oai` = gpt-oss's clamped form
    (u + 1)·g·sigmoid(alpha·g) with g = min(gate, limit), u = clamp(up, ±limit).

    The forward uses the same torch ops as HF (so bf16 rounds at the same points); `vjp` is exact for both and, like
    torch.clamp's backward, lets the gradient through at exactly the limit.
    """

    name: str = "swiglu"
    limit: float = 7.0
    alpha: float = 1.702

    def __post_init__(self) -> None:
        if self.name not in ("swiglu", "swiglu_oai"):
            raise ValueError(f"unknown activation {self.name!r}; expected 'swiglu' or 'swiglu_oai'")

    def __call__(self, gu_M2I: torch.Tensor) -> torch.Tensor:
        gate, up = gu_M2I.chunk(2, dim=-1)
        if self.name == "swiglu":
            return F.silu(gate) * up
        g = gate.clamp(max=self.limit)
        u = up.clamp(min=-self.limit, max=self.limit)
        return (u + 1) * (g * torch.sigmoid(self.alpha * g))

    def vjp(self, gu_M2I: torch.Tensor, dh_MI: torch.Tensor) -> torch.Tensor:
        """d act / d gu applied to dh -> [M, 2I], computed in fp32 and cast back to gu's dtype once."""
        gate, up = gu_M2I.float().chunk(2, dim=-1)
        dh = dh_MI.float()
        if self.name == "swiglu":
            sg = torch.sigmoid(gate)
            dgate = dh * up * sg * (1 + gate * (1 - sg))
            dup = dh * gate * sg
        else:
            g = gate.clamp(max=self.limit)
            u = up.clamp(min=-self.limit, max=self.limit)
            sa = torch.sigmoid(self.alpha * g)
            dgate = torch.where(gate <= self.limit, dh * (u + 1) * sa * (1 + self.alpha * g * (1 - sa)), 0.0)
            dup = torch.where(up.abs() <= self.limit, dh * g * sa, 0.0)
        return torch.cat([dgate, dup], dim=-1).to(gu_M2I.dtype)


_CHANNEL = threading.local()  # .state: (captured list, tensors to replay or None) inside op_residuals


@contextmanager
def op_residuals(replay: list[torch.Tensor] | None = None) -> Iterator[list[torch.Tensor]]:
    """Around one expert forward (`torch_impl.moe.split_lora_experts`): without `replay`, the backend's Function
    appends its residuals to the yielded list (capture: the op's forward returns them as outputs); with `replay`
    (what a capture gave, in its order), the Function takes them instead of computing them and skips the GEMMs that
    made them, returning a placeholder output whose value is never read: the op's backward needs only its graph."""
    previous = getattr(_CHANNEL, "state", None)
    captured: list[torch.Tensor] = []
    _CHANNEL.state = (captured, replay)
    try:
        yield captured
    finally:
        _CHANNEL.state = previous


def replayed_residuals() -> list[torch.Tensor] | None:
    """The residuals a backend's forward must take instead of computing them (inside `op_residuals(replay)`), else
    None: compute as usual."""
    state = getattr(_CHANNEL, "state", None)
    return None if state is None else state[1]


def capturing_residuals() -> bool:
    """Inside `op_residuals()` without replay: the forward must keep its residuals even without grad."""
    state = getattr(_CHANNEL, "state", None)
    return state is not None and state[1] is None


def capture_residuals(*tensors: torch.Tensor | None) -> None:
    """Hand the forward's residuals (None for an absent LoRA pair's, skipped) to the capturing op, if any."""
    if capturing_residuals():
        _CHANNEL.state[0].extend(t for t in tensors if t is not None)


def gu_z1_z2(residuals: list[torch.Tensor], lora_gate_up: bool, lora_down: bool
             ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Residuals as captured (gu, then z1 and z2 where that LoRA pair exists) -> (gu, z1 or None, z2 or None)."""
    it = iter(residuals)
    gu = next(it)
    return gu, next(it) if lora_gate_up else None, next(it) if lora_down else None
