"""How many H200s a split-LoRA run needs: per-GPU memory and an estimated step time for a model on N GPUs.

`plan(cfg, parallel, seq, rank)` returns a `Plan`; `auto_plan` finds the smallest power of two up to 64 that
fits; `format_table` renders the rows `splitmoe plan --gpus` prints. Everything is counted from the model's config
(`ModelConfig`), tensor by tensor, never from a table of sizes. Memory is a model of what torch_impl allocates;
the step time is an ESTIMATE from FLOP counts at calibrated rates (attention; the linear part of eager or of compiled
layers), good to a stated factor, not a measurement.

Layout. N = data × fsdp × expert GPUs. Every GPU trains on its own sequence of S tokens (batch 1 per GPU, as in the
h200-anchors.md rows), so a step consumes N·S tokens; `data` replicates parameters (HSDP replicas), `fsdp` shards
them (FSDP2, one unit per decoder layer plus embeddings and lm_head), `expert` shards the routed experts (each
expert rank holds E/expert whole experts; tokens reach them by all-to-all). Sizes below are per GPU; bf16 = 2 B,
fp32 = 4 B; P_x is a parameter count from `param_counts` (every canonical tensor: embeddings, attention incl. MLA
and its norms, biases and sinks, routers and correction biases, routed experts incl. gpt-oss biases, shared
experts, dense MLPs, norms, lm_head unless tied; the same set as `checkpoint.expected_shapes`, counted
independently). r = LoRA rank, L layers, H hidden, V vocab, E experts, K per token, I expert width, M = S·K.

Memory (bytes per GPU):
  weights   2·(P_experts / (fsdp·expert) + P_rest / fsdp)                  frozen bf16 base, sharded
  gather    2·max_unit(P_unit_rest + P_unit_experts/expert) + 8·(its LoRA)  FSDP2 all-gathers one unit at a time
            (bf16 weights + fp32 LoRA params and their unsharded grads before reduce-scatter); 0 when fsdp = 1.
            Assumes no prefetch of the next unit; torch's default prefetch would add up to one more unit.
  lora      16·(Q_experts / (fsdp·expert) + Q_attn / fsdp)                  fp32 LoRA A and B (attention targets of
            benchmarks/step.py's ATTENTION_TARGETS, both expert tensors), fp32 grads, two fp32 AdamW moments.
            Q_attn = Σ r·(in + out) per attention target; Q_experts = E·r·(H + 2I) + E·r·(I + H) per MoE layer.
            12·Q with optim_in_backward (--optim-in-backward, torch_impl.optim): AdamW steps each tensor inside the
            backward and frees its gradient at once, so no gradient outlives its layer's backward (see total).
  saved     N·2·S·H  (0 with --offload: the layer inputs live in pinned host memory)   checkpointed layer inputs,
            N = checkpoint_layers (the first N decoder layers are checkpointed; default all L); with the "attention"
            policy (--checkpoint-policy attention) each of them also keeps its attention output and fp32 log-sum-exp,
            + N·S·(2·nh·d_v + 4·nh) (layers.keep_attention_contexts; the policy refuses --offload, as torch_impl does)
  kept      Σ over the L − N un-checkpointed layers of what each keeps from its forward for its backward (torch_impl's
            ctx.save_for_backward, tensor by tensor), per token, bf16 = 2 B, fp32 = 4 B:
              2·2·H + 8        the two norms' inputs (the layer input, the post-attention residual) and fp32 rstd
              + 4·(the distinct inputs of the attention LoRA targets: H for those reading the normed input, q_lora_rank
                and kv_lora_rank for MLA's q_b and kv_b, nh·d_v for o_proj)   LoRALinear's fp32 copy of x
              + 4·r per attention target                                      z = x·A (fp32)
              + GQA: 2·(q + 2·kv widths) (q, k rotated, v as the attention kernel reads them), with q/k norms
                     2·(q + kv widths) + 4·(nh + nkv) (their inputs, the projection outputs, and rstd);
                MLA: 2·(q_lora_rank + kv_a width) + rstd (q_a and kv_a outputs: the inputs of their norms)
                     + 2·(2·nh·d_qk + kv_b width) (q and k concatenated per head; v, a view of kv_b's output)
              + 2·nh·d_v + 4·nh (the attention output and its fp32 log-sum-exp) [+ 4·nh: gpt-oss's sink weights]
              + MoE: 4·E + 14·K (router probabilities fp32; top-K ids int64, weights fp32 and bf16) + 2·H (the
                     experts' input) + K·(2·(2I + 2r) + 4 + 40) per routed row: gu [2I], z1, z2 [r] in bf16, what
                     SplitLoraExpertsFunction saves (torch_impl/kernels/split_lora.py: the gathered x rows, h and
                     the down output are not saved; the triton backend re-gathers from x), its fp32 routing weight
                     and the expert sort's int64 row indices (five [M] tensors compiled, 17 B a row eager; with an
                     expert axis a rank's rows vary with the routing, K·S on average); + 2·3·I_shared (the shared
                     experts' gate, silu(gate), up: no LoRA on them). With the experts tiled (--expert-chunk C_e < S,
                     torch_impl/tiled_experts.py) the per-row term is 0: the tiled Function keeps only x, the ids and
                     the weights, and its backward recomputes chunk by chunk (the one chunk's rows are in `work`).
                dense layers: 2·3·I_dense (the MLP's gate, silu(gate), up: no LoRA on them)
            plus, per MoE layer, not per token, in eager layers (not --compile): 2·(E/expert)·r·(2H + 3I), the bf16
            copies of the four expert LoRA factors the kernels' Function saves (`_kernel_operands`); compiled layers
            run the experts as a custom op (torch_impl/moe_op.py) that saves the fp32 factors themselves.
            This is Liger's fused RMSNorm (torch_impl's eager default on CUDA with liger-kernel, the torch extra) and
            the compiled layers' choice alike: the norms keep their bf16 inputs; eager norms without Liger keep an
            fp32 copy instead (+2·H per decoder norm, +2·(q + kv widths) for q/k norms: not modelled). Left out:
            the attention LoRA A factors' concatenation (`layers.project`: 4·H·3r, 1.5 MiB per Qwen3 layer), the
            router logits an aux-loss family collects until the forward's end (2·S·E per layer, gone before the
            backward). Checked on CPU (torch.autograd.graph.saved_tensors_hooks over one un-checkpointed Qwen3-shaped
            layer, fp16, triton backend interpreted): the compiled layer's saved tensors are this count to the byte
            but for the A concatenation, the sort's per-expert counts and the fp32 routing weight it does not keep;
            the eager layer's likewise, with the CPU's fp32 norm copies, and its sort held outside save_for_backward.
            Qwen3-30B-A3B at r=64: 93.4 KB per token compiled (0.36 GiB per layer at 4K, 1.43 at 16K), + 0.10 GiB
            per layer eager.
  work      2·S·H (dh of the loss, kept for the backward)  +  max(loss chunk, one layer's backward), where
            loss chunk = 4·min(S, C)·V with C = the rows of a 2^28-element fp32 block (shared_math/loss_chunks.py), and
            a checkpointed layer's backward is its recompute + backward working set:
                        residual/norm tensors 2·8·S·H (four [S, H] tensors and their grads)
                      + attention (flash kernel: no [S, S] scores): 2·2·S·(q + k + v + o widths [MLA: + q_a, kv_a
                        and kv_b outputs]) for the outputs and their grads, + 4·S·nh (fp32 log-sum-exp),
                        + 2·2·S·r per attention LoRA target (z and dz)
                      + MoE: 2·M·(2I + I + 2I + H + 4r) (gate_up out, activation, d gate_up, dX rows, z/dz of both
                        LoRA pairs: torch_impl/kernels/split_lora.py), M = K·S, or K·min(S, C_e) with the experts
                        tiled in C_e-token chunks (--expert-chunk, `tile_experts`: one chunk's rows at a time),
                        + 12·S·E (router logits, probs, grads, fp32)
                        + shared experts 2·5·S·I_shared;  dense layers: 2·5·S·I_dense,
            and an un-checkpointed layer's backward is that less what it kept (already in `kept`).
            With optim_in_backward, + one layer's LoRA gradients 4·Q_layer (+ foreach: one tensor's sqrt(v)).
  a2a       4·2·M·H when expert > 1                     dispatch + combine buffers, send + receive, bf16
  opt tmp   4·Q_local with foreach AdamW (its sqrt(v) temporary), 0 with fused AdamW (torch_impl's default on CUDA)
  total     the peak over the step's phases, each beside weights + 12·Q (LoRA params and AdamW moments):
              the loss (the forward's end)  gather + a2a + saved + kept + 2·S·H + loss chunk   (no gradient yet)
              layer l's backward, l = L−1 down to 0: gather + a2a + the saved tensors of the checkpointed layers
                <= l + the kept activations of the un-checkpointed layers <= l + 2·S·H + layer l's backward + the
                LoRA gradients that exist: those of layers >= l, or with optim_in_backward layer l's alone (its
                tensors are updated and freed as made)
              the optimizer step after the backward: 4·Q (every gradient) + opt tmp (none with optim_in_backward)
            A checkpointed layer's saved input (and kept attention) dies with its backward, so the gradients that
            pile up in the backward take the place of inputs already freed. Until session 22 every saved input was
            counted through the whole backward; that put gpt-oss-20b's 16K step (24 layers, compiled, "attention"
            policy, H100) at 58.70 GiB, where it measured 55.21, as it did with AdamW in backward: the peak is the
            last layer's backward, before most gradients exist (now 56.06; tests/shared/test_plan.py).
            One micro-batch per step, gradients set to None after the optimizer step (torch_impl's Trainer,
            benchmarks/step.py); with grad_accum > 1 the gradients of the earlier micro-batches live through every
            phase.
  fits      total <= 139 GiB (an H200's 141 GB less the CUDA context and allocator slack), or --budget-gib

Step time (seconds per GPU, batch 1 of S tokens on every GPU):
  linear FLOPs  Σ_l c_l·A_base,l·S + 4·H·V·S + Σ_l (c_l + 2)·A_lora,l·S, where A_base,l = weights one token
                multiplies through in decoder layer l (attention projections, router, K of E experts, shared experts,
                dense MLPs) and A_lora,l the LoRA params it touches there (attention LoRA + K/E of the expert LoRA).
                The base is frozen: forward 2, recompute 2 and dX 2 FLOPs per weight, no weight gradient (c_l = 6,
                not the 8 of full training); LoRA also gets dA, dB (8). A layer that is not checkpointed (l >= N, N =
                checkpoint_layers; None checkpoints all) keeps its activations and skips the recompute: c_l = 4, LoRA
                6; with its experts tiled (expert_chunk < S) its backward still recomputes them chunk by chunk, so
                their K·3·H·I weights and LoRA keep 6 and 8. lm_head runs once, logits and dh (4), however the layers
                are checkpointed. With every layer checkpointed this is 6·A_base·S + 4·H·V·S + 8·A_lora·S. With the
                8·N·T rule of full training the rates below would read 8/6 higher and the times would be the same.
                Not modelled: the experts' recompute (a checkpointed layer's, or the tiled backward's) skips their
                down GEMM (`output_unread`, torch_impl since 2026-12-05: a third of it); the compiled rate below,
                measured with it, absorbs it, the eager rate predates it.
  attn FLOPs    Σ_l a_l · 2·P·nh·(d_qk + d_v): causal pairs P = S(S+1)/2 (a flash kernel skips the masked half),
                S·W − W(W−1)/2 on gpt-oss's sliding layers (window W); a_l = forward 1 + backward 2.5 (dQ, dK, dV
                and the scores again) + recompute 1 = 4.5 in a checkpointed layer, 3.5 where the kernel is not rerun:
                a layer that is not checkpointed, or any layer under checkpoint_policy "attention" (it keeps the
                attention output and log-sum-exp; its recompute still reruns the linear parts, c_l = 6).
  optimizer     bytes_per_param·Q_local / 3.75 TB/s  (fused AdamW 28 B: read p, g, m, v, write p, m, v; foreach 84 B)
  comm          fsdp: 2 all-gathers (forward, backward) of the bf16 unit weights + fp32 LoRA, 1 reduce-scatter of
                fp32 LoRA grads; data: all-reduce of the local LoRA grads; expert: 6 all-to-alls of M·H bf16 rows per
                checkpointed MoE layer (dispatch + combine in forward, recompute, backward), 4 per one that is not.
                Bus bandwidth 360 GB/s on NVLink when the axis stays inside an 8-GPU node (mesh [data, fsdp, expert],
                expert innermost), else 45 GB/s (400 Gb/s InfiniBand per GPU). These two are typical NCCL figures,
                NOT measured here.
  step          optimizer + max(linear/R + attn/R_ATTN, comm), R = R_LIN for eager layers, R_LIN_COMPILED with
                compiled=True (--compile): communication assumed fully overlapped.

Calibration. Eager layers (h200-anchors.md; `splitmoe plan --gpus 1 --optimizer foreach --preset
qwen3_moe:30b-a3b`), rows with every layer checkpointed and policy "nothing", so the count above is the one they had:
  R_ATTN = 495 TFLOP/s: the cuDNN flash attention of the torch_impl profile (12 Qwen3 layers at 4K: 15 ms for
           forward + recompute + backward = 7.42 TFLOP by the count above).
  R_LIN  = 155 TFLOP/s: from the torch_impl eager rows of Qwen3-30B-A3B on one H200 (699.7 ms at 4K, 2752 ms at
           16K, foreach AdamW): after attention and the optimizer, the linear part runs at 136 TFLOP/s at 4K and
           182 TFLOP/s at 16K (grouped GEMMs fill better with more rows per expert; the glue is a fixed share), and
           155 is the rate that balances the two errors. The plan gives 628 ms at 4K (×0.90 the measurement) and
           3.06 s at 16K (×1.11): within the stated factor of 1.25, which tests/shared/test_plan.py checks. Out of
           sample, gpt-oss-20b: 0.60 s at 4K (measured 0.531, ×1.13) and 2.53 s at 16K (measured 2.264, ×1.12).
  3.75 TB/s: AdamW foreach in the same profile, 14.4 ms for 0.64B LoRA params at 84 B each.
Compiled layers (compiled=True: torch.compile of the decoder layers, the project's fast path). Rows on ONE NVIDIA H100
80GB HBM3 (benchmarks/results/session10..16_2026-12-06; torch 2.11, batch 1, r=64 alpha 128 on q/k/v/o and both
expert tensors, bf16 weights, fp32 LoRA + fused AdamW; Qwen3-30B-A3B truncated to its first 24 of 48 layers, what
an 80 GB card holds, gpt-oss-20b whole at 24). The card is an H100, not the H200 the plan speaks of: the same 132
SMs and bf16 dense rate, 3.35 against 4.8 TB/s of memory bandwidth, so the GEMMs and attention should run alike and
the bandwidth-bound glue faster on an H200, where these estimates lean high (not measured). The eager R_LIN would put
them 2.4× high (gpt-oss 16K, attention kept: 2.46 s against 1.04).
  R_ATTN   kept at 495: compiled layers run the same attention kernels (cuDNN, FA2, the sink op; inductor does not
           fuse into them). The H100 profiles at 16K with the attention kept (session 15) agree as a pool: Qwen3
           (head dim 128; cuDNN forward 645, backward 575 TFLOP/s) 184.7 TFLOP in 311.2 ms, 594 TFLOP/s; gpt-oss
           (head dim 64, sinks, its sliding layers on FA2) 93.8 TFLOP in 252.5 ms, 371; together 278.5 TFLOP in
           563.7 ms, 494. One rate puts Qwen3's attention 62 ms high and gpt-oss's 63 ms low at 16K.
  R_LIN_COMPILED = 395 TFLOP/s: after attention at R_ATTN and the optimizer, the linear part of the 16K rows runs at
             gpt-oss-20b, --compile --checkpoint-policy attention (session 16)     1039.6 ms  416 TFLOP/s  plan ×1.043
             gpt-oss-20b, --compile (session 10; session 15: 1090-1110 ms)         1098.4 ms  414 TFLOP/s  plan ×1.037
             Qwen3 24 L, --compile --cuda-graph --optim-in-backward --checkpoint-policy attention
               --checkpoint-layers 22 (session 14)                                   835.4 ms  363 TFLOP/s  plan ×0.956
           and 395 balances gpt-oss's rows against Qwen3's, all three within 1.05. Part of the two models' gap is the
           attention's (with their profiled attention times the linear parts run at about 450 and 320 TFLOP/s: at 16K
           a gpt-oss expert, H = I = 2880, gets 2048 rows, a Qwen3 one, H = 2048 and I = 768, 1024), and the one
           R_ATTN's errors above offset much of it. The same sessions' other 16K rows: Qwen3 --compile 937.6 ms
           (×0.977), the Qwen3 row above with every layer checkpointed 844.2 ms (×0.958), gpt-oss --compile
           --cuda-graph --optim-in-backward 1102.3 ms, 1080.7 with 22 layers checkpointed (×1.033, ×1.029).
           Out of sample at 4K (the graphed rows of session 13: without a CUDA graph the 4K step is host-bound)
           the plan is low: Qwen3 24 L --compile --cuda-graph --checkpoint-layers 0, 147.9 ms, plan 109.0 (×0.737);
           gpt-oss --checkpoint-layers 18, 252.3 ms, plan 226.6 (×0.898). With 256 rows per Qwen3 expert and a step
           under a fifth as long, what does not scale with FLOPs (the router's top-k, the LoRA casts, the launches,
           AdamW at the H100's bandwidth) weighs more, as the eager rate's 136 at 4K against 182 at 16K said: the
           stated factor is 1.05 at 16K and 1.4 at 4K (tests/shared/test_plan.py checks every row above). The
           recompute's own share holds at either length: Qwen3 4K from 14 checkpointed layers to none measured
           −22.2 ms (plan −21.7), gpt-oss 4K from 18 to 12 −14.9 ms (plan −17.2), gpt-oss 16K from 24 to 22
           −21.6 ms (plan −26.3), Qwen3 16K (attention kept) −8.8 ms (plan −10.2).
Other models, lengths and every multi-GPU figure are extrapolations of these calibrations.

Memory check: single-GPU Qwen3-30B-A3B at 4K with foreach AdamW gives 104.7 GiB against the measured 104.8 GiB
(torch_impl eager row): the peak is the optimizer step, 57 GiB of weights + 38 GiB of LoRA state + foreach's
9.6 GiB sqrt(v) temporary; with today's fused AdamW the plan says 96.6 GiB, the backward's peak (7.8% under the
row, for the reason just given). Out of sample, gpt-oss-20b at 1K with foreach: 52.7 GiB, measured 52.9 GiB.
The measured 16K row (116.7 GiB) and the 32K / 64K out-of-memory asks (18.6 / 37.1 GiB = 4·S·V bytes, exactly
[S, V] fp32 logits) come from the torch_impl of that day, which materialised the logits; its chunked loss
(torch_impl/loss.py, landed the same day) is what this model assumes, so the plan's 16K figure (100.8 GiB) is
below that row by design, not by error.

Partial checkpointing check (session 12, one H100, benchmarks/results/session12_2026-12-06; Qwen3-30B-A3B truncated
to 24 layers, r=64, bf16 weights, fp32 LoRA, fused AdamW, compiled layers, torch.cuda.max_memory_allocated;
`memory(..., compiled=True)`; tests/shared/test_plan.py checks each within 2%):
  4K,  every layer checkpointed, AdamW after the backward          measured 48.92 GiB   plan 49.20   ×1.006
  4K,  no layer checkpointed (N = 0), AdamW in backward            measured 52.57 GiB   plan 52.92   ×1.007
  16K, every layer checkpointed, "attention", AdamW in backward    measured 50.56 GiB   plan 50.79   ×1.005
  16K, first 20 of 24 checkpointed, "attention", in backward       measured 54.26 GiB   plan 54.31   ×1.001
The same model replayed from a CUDA graph (session 13, `step.py --compile --cuda-graph --checkpoint-layers N`, AdamW
after the backward), whose peak is the reserved memory (the graph's pool holds the activations; benchmarks/step.py):
N = 14 / 8 / 4 / 0 measured 50.05 / 50.55 / 51.53 / 52.87 GiB, plan 49.05 / 50.20 / 51.56 / 52.92 (×0.980 to
×1.001): the pool's segment rounding is in the reserved figure and not in the plan, which is why N = 14 reads 1 GiB
over it.
The resident part is the rows' own: weights + LoRA params 33.80 GiB (measured 33.87: 0.06 GiB of buffers and
workspaces the plan does not count) and AdamW's moments 9.57 GiB (measured 9.57). The two rows with un-checkpointed
layers (24 at 4K; 4 at 16K beside 20 checkpointed ones), solved for a per-layer cost and a backward transient that
both scale with S, give about 0.37 GiB per kept layer at 4K; the formula's is 0.36. At 4K with N = 0 the plan's
peak is the loss phase, with the chunk loop's 1 GiB block; the rows ran Liger's loss (~0.04 GiB there; torch_impl's
`auto` on CUDA until session 13, now its own kernel, 0.24 GiB), and the plan's next phase, the last layer's backward,
gives 52.44 GiB (×0.998): the row agrees either way, and the plan stays the upper bound of the three losses. Eager
layers (no --compile) are not measured without checkpointing; their formula adds the bf16 expert LoRA copies, 0.10
GiB per un-checkpointed layer here (55.27 GiB for the N = 0 row).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Literal

from shared_math.config import ModelConfig
from shared_math.loss_chunks import default_chunk_rows
from shared_math.train_config import CHECKPOINT_POLICIES as TRAIN_CHECKPOINT_POLICIES
from shared_math.train_config import is_checkpoint_layers

__all__ = ["GIB", "H200_USABLE_GIB", "R_LIN", "R_LIN_COMPILED", "R_ATTN", "HBM_BW", "POWERS_OF_TWO", "Parallel",
           "ParamCounts", "Memory", "Plan", "LayoutError", "check_layout", "param_counts", "lora_counts",
           "attention_targets", "plan", "auto_plan", "least_checkpointed", "format_table", "CHECKPOINT_POLICIES"]

Optimizer = Literal["fused", "foreach"]
CheckpointPolicy = Literal["nothing", "attention"]

GIB = 1 << 30
H200_USABLE_GIB = 139.0  # nvidia-smi shows 143,771 MiB (140.4 GiB); less the CUDA context and allocator slack
# Calibrated rates and bandwidths: see the module docstring for the measurement behind each.
R_ATTN = 495e12  # FLOP/s, cuDNN flash attention, torch_impl profile (12 layers, 4K: 15 ms); the H100 16K profiles
# of Qwen3 and gpt-oss pooled give 494, so compiled layers (the same attention kernels) keep it
R_LIN = 155e12  # FLOP/s, Qwen3-30B-A3B torch_impl eager 4K / 16K rows: the rate that balances both ratios
R_LIN_COMPILED = 395e12  # FLOP/s, compiled layers (compiled=True): the H100 16K rows of gpt-oss-20b and Qwen3 (24 L)
HBM_BW = 3.75e12  # B/s, AdamW foreach in the same profile (14.4 ms, 0.64B params × 84 B)
NVLINK_BW = 360e9  # B/s NCCL bus bandwidth inside an 8-GPU H200 node (typical, not measured here)
IB_BW = 45e9  # B/s per GPU across nodes, 400 Gb/s InfiniBand (typical, not measured here)
GPUS_PER_NODE = 8
POWERS_OF_TWO = (1, 2, 4, 8, 16, 32, 64)
OPT_BYTES = {"fused": 28, "foreach": 84}  # bytes moved per LoRA param by one AdamW step (docstring)
CHECKPOINT_POLICIES = TRAIN_CHECKPOINT_POLICIES["torch"]  # torch_impl.models.layers.REMAT_POLICIES
FLASH_BWD_OVER_FWD = 2.5  # flash backward: dQ, dK, dV and the recomputed scores, 5 GEMMs to the forward's 2

# Attention LoRA targets per family: benchmarks/step.py's ATTENTION_TARGETS (the recipe of the anchor rows)
_GQA = ("q_proj", "k_proj", "v_proj", "o_proj")
_MLA = ("q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj")


def attention_targets(cfg: ModelConfig) -> tuple[str, ...]:
    """The attention LoRA targets of the anchor recipe for `cfg` (MLA without a q LoRA rank has one q_proj)."""
    if cfg.attention != "mla":
        return _GQA
    return _MLA if cfg.q_lora_rank is not None else ("q_proj",) + _MLA[2:]


# ---- parameter counts -------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ParamCounts:
    """Parameters of a model by where they live. Per-layer lists have one entry per decoder layer."""

    embed: int
    lm_head: int  # 0 when tied
    final_norm: int
    layer_rest: tuple[int, ...]  # attention, norms, router, shared experts, dense MLP: sharded over fsdp only
    layer_experts: tuple[int, ...]  # routed experts (weights and biases): sharded over fsdp × expert
    layer_active: tuple[int, ...]  # matmul weights one token passes through in each decoder layer
    layer_active_experts: tuple[int, ...]  # the routed experts' share of it: K·3·H·I in a MoE layer, else 0

    @property
    def active_per_token(self) -> int:
        """Matmul weights one token passes through in the decoder (not embeddings, not lm_head)."""
        return sum(self.layer_active)

    @property
    def experts(self) -> int:
        return sum(self.layer_experts)

    @property
    def rest(self) -> int:
        return self.embed + self.lm_head + self.final_norm + sum(self.layer_rest)

    @property
    def total(self) -> int:
        return self.experts + self.rest


def _attention_params(cfg: ModelConfig) -> tuple[int, int, dict[str, tuple[int, int]]]:
    """(all attention params, matmul weights per token, {linear name: (in, out)}) of one layer."""
    H, nh = cfg.hidden_size, cfg.num_attention_heads
    if cfg.attention == "mla":
        q_out = nh * (cfg.qk_nope_head_dim + cfg.qk_rope_head_dim)
        kv_a = cfg.kv_lora_rank + cfg.qk_rope_head_dim
        lin: dict[str, tuple[int, int]] = {}
        if cfg.q_lora_rank is None:
            lin["q_proj"] = (H, q_out)
        else:
            lin["q_a_proj"] = (H, cfg.q_lora_rank)
            lin["q_b_proj"] = (cfg.q_lora_rank, q_out)
        lin["kv_a_proj_with_mqa"] = (H, kv_a)
        lin["kv_b_proj"] = (cfg.kv_lora_rank, nh * (cfg.qk_nope_head_dim + cfg.v_head_dim))
        lin["o_proj"] = (nh * cfg.v_head_dim, H)
        extra = cfg.kv_lora_rank  # kv_a_layernorm
        if cfg.q_lora_rank is not None:
            extra += cfg.q_lora_rank  # q_a_layernorm
            extra += cfg.q_lora_rank if cfg.attention_bias else 0  # q_a_proj bias
        extra += kv_a if cfg.attention_bias else 0
        extra += H if cfg.o_proj_bias else 0
    else:
        hd, nkv = cfg.head_dim, cfg.num_key_value_heads
        lin = {"q_proj": (H, nh * hd), "k_proj": (H, nkv * hd), "v_proj": (H, nkv * hd), "o_proj": (nh * hd, H)}
        extra = (nh + 2 * nkv) * hd if cfg.attention_bias else 0
        extra += H if cfg.o_proj_bias else 0
        extra += 2 * hd if cfg.use_qk_norm else 0
        extra += nh if cfg.attention_sinks else 0
    mm = sum(i * o for i, o in lin.values())
    return mm + extra, mm, lin


def param_counts(cfg: ModelConfig) -> ParamCounts:
    """Every parameter of `cfg`, tensor by tensor from the config (MTP layers excluded: training never loads them)."""
    H, V, E, K, I = (cfg.hidden_size, cfg.vocab_size, cfg.num_experts, cfg.num_experts_per_tok,
                     cfg.moe_intermediate_size)
    attn_all, attn_mm, _ = _attention_params(cfg)
    rest: list[int] = []
    experts: list[int] = []
    active: list[int] = []
    active_experts: list[int] = []
    for is_moe in cfg.moe_layers:
        r = attn_all + 2 * H  # attention + input and post-attention norms
        if is_moe:
            r += H * E + (E if cfg.router_bias else 0) + (E if cfg.routing.method == "sigmoid_group" else 0)
            ex = E * (H * 2 * I + I * H) + (E * (2 * I + H) if cfg.expert_bias else 0)
            shared = 3 * H * cfg.shared_intermediate_size
            r += shared
            routed = K * (3 * H * I)
            active.append(attn_mm + H * E + routed + shared)
        else:
            ex = routed = 0
            r += 3 * H * cfg.intermediate_size
            active.append(attn_mm + 3 * H * cfg.intermediate_size)
        rest.append(r)
        experts.append(ex)
        active_experts.append(routed)
    return ParamCounts(embed=V * H, lm_head=0 if cfg.tie_word_embeddings else H * V, final_norm=H,
                       layer_rest=tuple(rest), layer_experts=tuple(experts), layer_active=tuple(active),
                       layer_active_experts=tuple(active_experts))


@dataclass(frozen=True)
class LoraCounts:
    """LoRA parameters (A and B) per decoder layer: attention targets, experts; and those one token touches."""

    layer_attn: tuple[int, ...]
    layer_experts: tuple[int, ...]
    layer_active_experts: tuple[int, ...]  # the expert LoRA one token touches in each layer: K of its E experts'

    @property
    def total(self) -> int:
        return sum(self.layer_attn) + sum(self.layer_experts)

    @property
    def active_per_token(self) -> int:
        """LoRA params one token touches: every attention target, K of E experts' factors per MoE layer."""
        return sum(self.layer_attn) + sum(self.layer_active_experts)


def lora_counts(cfg: ModelConfig, rank: int, targets: Sequence[str] | None = None) -> LoraCounts:
    """LoRA params at rank `rank` on `targets` (default: the family's attention targets) and both expert tensors."""
    if rank < 1:
        raise ValueError(f"LoRA rank must be >= 1, got {rank}")
    _, _, lin = _attention_params(cfg)
    names = attention_targets(cfg) if targets is None else tuple(targets)
    unknown = [t for t in names if t not in lin]
    if unknown:
        raise ValueError(f"attention LoRA target(s) {unknown} not in a {cfg.family} layer ({', '.join(lin)})")
    attn = sum(rank * (i + o) for t, (i, o) in lin.items() if t in names)
    H, E, K, I = cfg.hidden_size, cfg.num_experts, cfg.num_experts_per_tok, cfg.moe_intermediate_size
    per_expert = rank * (H + 2 * I) + rank * (I + H)  # gate_up A [H, r], B [r, 2I]; down A [I, r], B [r, H]
    ex = tuple(E * per_expert if m else 0 for m in cfg.moe_layers)
    active = tuple(K * per_expert if m else 0 for m in cfg.moe_layers)
    return LoraCounts(layer_attn=(attn,) * cfg.num_hidden_layers, layer_experts=ex, layer_active_experts=active)


# ---- the parallel layout ----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Parallel:
    """A mesh data × fsdp × expert (expert innermost)."""

    data: int = 1
    fsdp: int = 1
    expert: int = 1

    @property
    def gpus(self) -> int:
        return self.data * self.fsdp * self.expert

    def __str__(self) -> str:
        return f"data={self.data},fsdp={self.fsdp},expert={self.expert}"

    @staticmethod
    def axes(spec: str | None) -> dict[str, int | None]:
        """The sizes a spec gives, None for the open axis (fsdp unless another is N); raises on bad syntax."""
        axes: dict[str, int | None] = {"data": 1, "fsdp": None, "expert": 1}
        given: set[str] = set()
        for part in filter(None, (spec or "").replace(" ", "").split(",")):
            name, _, value = part.partition("=")
            if name not in axes or not value:
                raise ValueError(f"bad --parallel entry {part!r}: write data=D,fsdp=F,expert=X (axes data, fsdp, "
                                 "expert; one of them may be N, meaning the GPUs the others leave)")
            if name in given:
                raise ValueError(f"--parallel names {name} twice")
            given.add(name)
            if value.upper() == "N":
                axes[name] = None
                continue
            if not value.isdigit() or int(value) < 1:
                raise ValueError(f"--parallel {name}={value}: a size must be an integer >= 1 (or N)")
            axes[name] = int(value)
        free = [k for k, v in axes.items() if v is None]
        if len(free) > 1:
            raise ValueError(f"--parallel leaves {' and '.join(free)} both open; give all but one axis a size")
        return axes

    @classmethod
    def parse(cls, spec: str | None, gpus: int) -> Parallel:
        """`data=D,fsdp=F,expert=X` for `gpus` GPUs; an axis left out, or given as N, takes what the others leave
        (fsdp by default): `expert=8` on 64 GPUs is data=1, fsdp=8, expert=8."""
        axes = cls.axes(spec)
        free = [k for k, v in axes.items() if v is None]
        fixed = math.prod(v for v in axes.values() if v is not None)
        if free:
            if gpus % fixed:
                raise ValueError(f"{gpus} GPUs cannot hold a mesh whose fixed axes multiply to {fixed}: "
                                 f"{free[0]} = {gpus}/{fixed} is not an integer")
            axes[free[0]] = gpus // fixed
        p = cls(**{k: int(v) for k, v in axes.items()})  # type: ignore[arg-type]
        if p.gpus != gpus:
            raise ValueError(f"--parallel {p} uses {p.gpus} GPUs, not the {gpus} of --gpus: data·fsdp·expert must "
                             "equal the GPU count")
        return p


class LayoutError(ValueError):
    """A mesh the model cannot take (an expert axis that does not divide the experts)."""


def check_layout(cfg: ModelConfig, par: Parallel) -> None:
    """Refuse a layout the model cannot take, saying which expert-axis sizes would: each expert rank holds whole
    experts, so `expert` must divide E. (FSDP2 pads uneven shards and no axis splits layers, so fsdp and data
    sizes are free.)"""
    E = cfg.num_experts
    if E % par.expert:
        ok = [x for x in range(1, par.gpus + 1) if E % x == 0 and par.gpus % x == 0]
        raise LayoutError(f"expert={par.expert} does not divide the {E} routed experts of this model; expert sizes "
                          f"that divide both {E} and {par.gpus} GPUs: {', '.join(map(str, ok))}")


# ---- memory -----------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Memory:
    """Per-GPU bytes by component (see the module docstring for each formula). The components are sizes, not all
    alive at once: `total` is the step's peak, the largest of its phases (module docstring), computed by `memory`."""

    weights: int
    gather: int
    lora: int
    saved: int
    work: int
    a2a: int
    opt_tmp: int
    kept: int  # the un-checkpointed layers' kept activations (checkpoint_layers); 0 when every layer is checkpointed
    total: int

    @property
    def activations(self) -> int:
        return self.saved + self.kept + self.work


def _layer_work(cfg: ModelConfig, S: int, r: int, is_moe: bool, n_attn_targets: int,
                expert_chunk: int | None = None) -> int:
    """Bytes of one decoder layer's recompute + backward working set at S tokens (flash attention, split LoRA;
    the routed experts' rows one chunk's at a time with `expert_chunk`)."""
    H, nh, E, K, I = (cfg.hidden_size, cfg.num_attention_heads, cfg.num_experts, cfg.num_experts_per_tok,
                      cfg.moe_intermediate_size)
    _, _, lin = _attention_params(cfg)
    if cfg.attention == "mla":  # q, k (nope + rope, per head), v, o; plus the low-rank q_a, kv_a, kv_b outputs
        dqk, dv = cfg.qk_nope_head_dim + cfg.qk_rope_head_dim, cfg.v_head_dim
        widths = 2 * nh * dqk + 2 * nh * dv + lin["kv_a_proj_with_mqa"][1] + lin["kv_b_proj"][1]
        widths += cfg.q_lora_rank or 0
    else:
        widths = sum(o for name, (_, o) in lin.items() if name != "o_proj") + nh * cfg.head_dim
    attn = 2 * 2 * S * widths + 4 * S * nh + 2 * 2 * S * r * n_attn_targets
    resid = 2 * 8 * S * H
    if is_moe:
        M = K * (S if expert_chunk is None else min(S, expert_chunk))
        mlp = 2 * M * (5 * I + H + 4 * r) + 12 * S * E + 2 * 5 * S * cfg.shared_intermediate_size
    else:
        mlp = 2 * 5 * S * cfg.intermediate_size
    return resid + attn + mlp


# projections that read the layer's normed input: their LoRA branches share one fp32 copy of it (`layers.project`)
_READS_X = frozenset({"q_proj", "k_proj", "v_proj", "q_a_proj", "kv_a_proj_with_mqa"})


def _attention_kept_width(cfg: ModelConfig) -> int:
    """Per-token bytes the "attention" checkpoint policy keeps in a checkpointed layer: the attention kernel's output
    (bf16, nh·d_v) and its fp32 log-sum-exp (nh)."""
    dv = cfg.v_head_dim if cfg.attention == "mla" else cfg.head_dim
    return 2 * cfg.num_attention_heads * dv + 4 * cfg.num_attention_heads


def _layer_kept(cfg: ModelConfig, S: int, r: int, is_moe: bool, *, expert: int = 1, expert_chunk: int | None = None,
                compiled: bool = False) -> int:
    """Bytes an un-checkpointed decoder layer keeps from its forward to its backward at S tokens (module docstring,
    "kept"): what torch_impl's forward saves for backward, tensor by tensor."""
    H, nh, E, K, I = (cfg.hidden_size, cfg.num_attention_heads, cfg.num_experts, cfg.num_experts_per_tok,
                      cfg.moe_intermediate_size)
    _, _, lin = _attention_params(cfg)
    targets = attention_targets(cfg)
    tok = 2 * 2 * H + 2 * 4  # the two norms' inputs (layer input, post-attention residual) and their fp32 rstd
    # LoRA: an fp32 copy of each distinct target input (one for the projections that read x), z = x·A fp32 per target
    inputs = {("x" if t in _READS_X else t): lin[t][0] for t in targets}
    tok += 4 * sum(inputs.values()) + 4 * r * len(targets)
    if cfg.attention == "mla":
        dqk, qr = cfg.qk_nope_head_dim + cfg.qk_rope_head_dim, cfg.q_lora_rank or 0
        # q_a and kv_a outputs (the inputs of their norms, + fp32 rstd); q and k as attention reads them (each
        # concatenated per head), v as a view of kv_b's output (its whole [S, nh·(d_nope + d_v)] storage)
        tok += 2 * (qr + lin["kv_a_proj_with_mqa"][1]) + 4 * (2 if qr else 1)
        tok += 2 * (2 * nh * dqk + lin["kv_b_proj"][1])
    else:
        q_w, kv_w = lin["q_proj"][1], lin["k_proj"][1]
        tok += 2 * (q_w + 2 * kv_w)  # q and k (rotated) and v as attention reads them
        if cfg.use_qk_norm:  # the per-head norms' inputs (the q and k projections' outputs) and their fp32 rstd
            tok += 2 * (q_w + kv_w) + 4 * (nh + cfg.num_key_value_heads)
    tok += _attention_kept_width(cfg)  # the attention output and its log-sum-exp
    tok += 4 * nh if cfg.attention_sinks else 0  # gpt-oss: the sink's fp32 rescale weights (lse_attention)
    fixed = 0
    if is_moe:
        tok += 4 * E + (8 + 4 + 2) * K  # router probabilities (fp32); top-K ids (int64), weights (fp32 and bf16)
        tok += 2 * H  # the experts' input (the normed hidden state; the shared experts read the same tensor)
        if expert_chunk is None or S <= expert_chunk:
            # per routed row: gu [2I], z1, z2 [r] (bf16), its routing weight (fp32), the sort's int64 row indices
            tok += K * (2 * (2 * I + 2 * r) + 4 + 40)
            if not compiled:  # the kernels' Function keeps bf16 copies of the four expert LoRA factors
                fixed = 2 * (E // expert) * r * (2 * H + 3 * I)
        tok += 2 * 3 * cfg.shared_intermediate_size  # gate, silu(gate), up of the shared experts (no LoRA)
    else:
        tok += 2 * 3 * cfg.intermediate_size  # the dense MLP's gate, silu(gate), up (no LoRA)
    return S * tok + fixed


def _check_checkpointing(cfg: ModelConfig, checkpoint_layers: int | None, checkpoint_policy: str) -> None:
    """Refuse a checkpoint_layers that is not None or an int from 0 to L, and an unknown checkpoint_policy."""
    L = cfg.num_hidden_layers
    if checkpoint_layers is not None and not is_checkpoint_layers(checkpoint_layers, L):
        raise ValueError(f"checkpoint_layers={checkpoint_layers!r}: how many of the first decoder layers are "
                         f"checkpointed, an int from 0 to {L} (this model has {L} layers), or None for all of them")
    if checkpoint_policy not in CHECKPOINT_POLICIES:
        raise ValueError(f"checkpoint_policy must be one of {', '.join(CHECKPOINT_POLICIES)}, got "
                         f"{checkpoint_policy!r}")


def memory(cfg: ModelConfig, par: Parallel, seq: int, rank: int, *, offload: bool = False,
           optimizer: Optimizer = "fused", expert_chunk: int | None = None, checkpoint_layers: int | None = None,
           checkpoint_policy: CheckpointPolicy = "nothing", optim_in_backward: bool = False,
           compiled: bool = False) -> Memory:
    """Per-GPU memory of a split-LoRA step (module docstring: formulas and assumptions). `checkpoint_layers`: how
    many of the first decoder layers are checkpointed (None: all; the rest keep their activations),
    `checkpoint_policy`: what a checkpointed layer keeps besides its input ("attention": its attention output),
    `optim_in_backward`: AdamW steps each LoRA tensor inside the backward and frees its gradient
    (torch_impl.optim), `compiled`: torch.compile'd decoder layers (what an un-checkpointed layer keeps differs)."""
    if seq < 1:
        raise ValueError(f"seq must be >= 1, got {seq}")
    if expert_chunk is not None and expert_chunk < 1:
        raise ValueError(f"expert_chunk must be a positive number of tokens, got {expert_chunk}")
    if optimizer not in OPT_BYTES:
        raise ValueError(f"optimizer must be one of {', '.join(OPT_BYTES)}, got {optimizer!r}")
    L = cfg.num_hidden_layers
    _check_checkpointing(cfg, checkpoint_layers, checkpoint_policy)
    if offload and checkpoint_policy != "nothing":
        raise ValueError(f"checkpoint policy {checkpoint_policy!r} keeps tensors on the GPU, which offload exists to "
                         "avoid (torch_impl refuses the pair): use one or the other")
    check_layout(cfg, par)
    pc, lc = param_counts(cfg), lora_counts(cfg, rank)
    f, x = par.fsdp, par.expert
    weights = 2 * (pc.experts / (f * x) + pc.rest / f)
    lora_local = sum(lc.layer_experts) / (f * x) + sum(lc.layer_attn) / f
    lora = (12 if optim_in_backward else 16) * lora_local
    if f > 1:  # FSDP2 unit: a decoder layer (its experts only E/expert of them), or embeddings, or lm_head
        units = [2 * (pr + pe / x) + 8 * (la + le / x) for pr, pe, la, le in
                 zip(pc.layer_rest, pc.layer_experts, lc.layer_attn, lc.layer_experts)]
        gather = max(units + [2 * pc.embed, 2 * pc.lm_head])
    else:
        gather = 0
    S, H, V = seq, cfg.hidden_size, cfg.vocab_size
    N = L if checkpoint_layers is None else checkpoint_layers
    keep = S * _attention_kept_width(cfg) if checkpoint_policy == "attention" else 0
    saved_layer = (0 if offload else 2 * S * H) + keep  # what each checkpointed layer holds until its backward
    saved = N * saved_layer
    chunk_rows = default_chunk_rows(V)  # the chunk loop's fp32 block (the plan's loss phase: an upper bound)
    loss_chunk = 4 * min(S, chunk_rows) * V
    n_t = len(attention_targets(cfg))
    moe = cfg.moe_layers
    lw = {m: _layer_work(cfg, S, rank, m, n_t, expert_chunk) for m in set(moe)}
    kp = {m: _layer_kept(cfg, S, rank, m, expert=x, expert_chunk=expert_chunk, compiled=compiled) for m in set(moe)}
    # each layer's own LoRA gradients (local), made in its backward
    grads = [4 * (la / f + le / (f * x)) for la, le in zip(lc.layer_attn, lc.layer_experts)]
    # layer l's backward working set beyond what stays from its forward: the whole recompute + backward of a
    # checkpointed layer, or that less the activations an un-checkpointed layer kept (held in `kept` until now)
    own = [lw[m] if l < N else max(0, lw[m] - kp[m]) for l, m in enumerate(moe)]
    kept = sum(kp[m] for m in moe[N:])
    in_flight = 0
    if optim_in_backward and optimizer == "foreach":  # one tensor's sqrt(v) temporary at a time
        _, _, lin = _attention_params(cfg)
        E_local, I = cfg.num_experts / (f * x), cfg.moe_intermediate_size
        largest = max([rank * max(lin[t]) / f for t in attention_targets(cfg)]
                      + ([E_local * rank * max(H, 2 * I)] if cfg.num_moe_layers else []))
        in_flight = 4 * largest
    work = 2 * S * H + max([loss_chunk] + own) + (max(grads) + in_flight if optim_in_backward else 0)
    a2a = 4 * 2 * S * cfg.num_experts_per_tok * H if x > 1 else 0
    opt_tmp = 4 * lora_local if optimizer == "foreach" and not optim_in_backward else 0
    # the step's phases (module docstring), each beside the weights, the LoRA params and AdamW moments (12·Q)
    base = gather + a2a + 2 * S * H
    phases = [base + saved + kept + loss_chunk]  # the forward's end, the loss: no LoRA gradient made yet
    live, made = kept, 0.0
    for l in reversed(range(L)):  # the backward, last layer first: its working set and the gradients that exist
        made = grads[l] + in_flight if optim_in_backward else made + grads[l]
        # the checkpointed layers' inputs (and kept attention) of layers l' > l died with their backward
        phases.append(base + min(l + 1, N) * saved_layer + live + own[l] + made)
        if l >= N:
            live -= kp[moe[l]]  # an un-checkpointed layer's kept activations die with its backward
    if not optim_in_backward:  # the optimizer step after the backward: every gradient, foreach's temporary
        phases.append(4 * lora_local + opt_tmp)
    total = weights + 12 * lora_local + max(phases)
    return Memory(*(int(math.ceil(v)) for v in (weights, gather, lora, saved, work, a2a, opt_tmp, kept, total)))


# ---- time -------------------------------------------------------------------------------------------------------
def flops(cfg: ModelConfig, seq: int, rank: int, *, checkpoint_layers: int | None = None,
          checkpoint_policy: CheckpointPolicy = "nothing", expert_chunk: int | None = None) -> tuple[float, float]:
    """(linear FLOPs, attention FLOPs) of one GPU's step on `seq` tokens (module docstring, "Step time"): every
    layer's forward and backward, and the recompute of what checkpointing drops. `checkpoint_layers`: how many of
    the first decoder layers are checkpointed (None: all); the others recompute nothing, but for their routed experts
    when `expert_chunk` tiles them (the tiled backward recomputes them chunk by chunk). `checkpoint_policy`
    "attention": a checkpointed layer keeps its attention output, so its recompute skips the attention kernel."""
    _check_checkpointing(cfg, checkpoint_layers, checkpoint_policy)
    S, L = seq, cfg.num_hidden_layers
    N = L if checkpoint_layers is None else checkpoint_layers
    tiled = expert_chunk is not None and expert_chunk < S
    pc, lc = param_counts(cfg), lora_counts(cfg, rank)
    # per token: base weights 2 forward + 2 dX (+ 2 recompute), LoRA params also dA, dB (8, or 6 without recompute);
    # integers until the end, so that every layer checkpointed gives 6·A_base·S + 8·A_lora·S to the last FLOP
    linear = 4 * cfg.hidden_size * cfg.vocab_size * S  # lm_head, once: logits and dh
    for l in range(L):
        base, lora = pc.layer_active[l], lc.layer_attn[l] + lc.layer_active_experts[l]
        if l < N:
            linear += (6 * base + 8 * lora) * S
        else:  # no layer recompute; tiled experts still recompute theirs
            linear += (4 * base + 6 * lora) * S
            if tiled:
                linear += (2 * pc.layer_active_experts[l] + 2 * lc.layer_active_experts[l]) * S
    if cfg.attention == "mla":
        dqk, dv = cfg.qk_nope_head_dim + cfg.qk_rope_head_dim, cfg.v_head_dim
    else:
        dqk = dv = cfg.head_dim
    attn = 0.0
    for l in range(L):
        W = cfg.sliding_window if cfg.layer_types and cfg.layer_types[l] == "sliding_attention" else None
        if W is not None and W < S:
            pairs = S * W - W * (W - 1) / 2
        else:
            pairs = S * (S + 1) / 2
        recompute = 1 if l < N and checkpoint_policy == "nothing" else 0
        attn += (1 + recompute + FLASH_BWD_OVER_FWD) * 2 * pairs * cfg.num_attention_heads * (dqk + dv)
    return float(linear), attn


def _bw(par: Parallel, axis: str) -> float:
    """Bus bandwidth of a collective over `axis`: NVLink while the axis and those inside it fit in one node."""
    span = {"expert": par.expert, "fsdp": par.fsdp * par.expert, "data": par.gpus}[axis]
    return NVLINK_BW if span <= GPUS_PER_NODE else IB_BW


def comm_seconds(cfg: ModelConfig, par: Parallel, seq: int, rank: int, *,
                 checkpoint_layers: int | None = None) -> float:
    """Seconds of communication per step per GPU, before overlap (module docstring); a MoE layer past
    `checkpoint_layers` (None: all checkpointed) has no recompute, so two all-to-alls fewer."""
    pc, lc = param_counts(cfg), lora_counts(cfg, rank)
    f, x, d = par.fsdp, par.expert, par.data
    t = 0.0
    if f > 1:
        w = 2 * (pc.experts / x + pc.rest)
        lo = 4 * (sum(lc.layer_experts) / x + sum(lc.layer_attn))
        t += (f - 1) / f * (2 * w + 2 * lo + lo) / _bw(par, "fsdp")
    if d > 1:
        local = 4 * (sum(lc.layer_experts) / (f * x) + sum(lc.layer_attn) / f)
        t += 2 * (d - 1) / d * local / _bw(par, "data")
    if x > 1:
        rows = 2 * seq * cfg.num_experts_per_tok * cfg.hidden_size
        N = cfg.num_hidden_layers if checkpoint_layers is None else checkpoint_layers
        a2a = sum(6 if l < N else 4 for l, m in enumerate(cfg.moe_layers) if m)
        t += a2a * (x - 1) / x * rows / _bw(par, "expert")
    return t


@dataclass(frozen=True)
class Plan:
    """One row of the table: a model on `parallel.gpus` GPUs at `seq` tokens per GPU."""

    name: str
    parallel: Parallel
    seq: int
    memory: Memory
    compute_s: float
    comm_s: float
    optimizer_s: float
    usable_gib: float = H200_USABLE_GIB
    notes: tuple[str, ...] = field(default=())
    checkpoint_layers: int | None = None  # the first N decoder layers checkpointed; None: all

    @property
    def gpus(self) -> int:
        return self.parallel.gpus

    @property
    def fits(self) -> bool:
        return self.memory.total <= self.usable_gib * GIB

    @property
    def step_s(self) -> float:
        return self.optimizer_s + max(self.compute_s, self.comm_s)

    @property
    def tokens_per_s(self) -> float:
        return self.gpus * self.seq / self.step_s


def plan(cfg: ModelConfig, parallel: Parallel, seq: int, rank: int = 64, *, name: str = "", offload: bool = False,
         optimizer: Optimizer = "fused", usable_gib: float = H200_USABLE_GIB, expert_chunk: int | None = None,
         checkpoint_layers: int | None = None, checkpoint_policy: CheckpointPolicy = "nothing",
         optim_in_backward: bool = False, compiled: bool = False) -> Plan:
    """Memory and estimated step time of split-LoRA training of `cfg` on `parallel` (module docstring). The time
    counts the recompute that `checkpoint_layers` and `checkpoint_policy` leave (`flops`), and runs the linear part
    at R_LIN_COMPILED with `compiled` (torch.compile'd decoder layers), else at the eager R_LIN. Under checkpointing
    `expert_chunk` changes no FLOP (the tiled experts do the untiled ones); in an un-checkpointed layer it adds the
    routed experts' recompute."""
    mem = memory(cfg, parallel, seq, rank, offload=offload, optimizer=optimizer, expert_chunk=expert_chunk,
                 checkpoint_layers=checkpoint_layers, checkpoint_policy=checkpoint_policy,
                 optim_in_backward=optim_in_backward, compiled=compiled)
    lin, attn = flops(cfg, seq, rank, checkpoint_layers=checkpoint_layers, checkpoint_policy=checkpoint_policy,
                      expert_chunk=expert_chunk)
    lc = lora_counts(cfg, rank)
    lora_local = sum(lc.layer_experts) / (parallel.fsdp * parallel.expert) + sum(lc.layer_attn) / parallel.fsdp
    r_lin = R_LIN_COMPILED if compiled else R_LIN
    return Plan(name or cfg.family, parallel, seq, mem, compute_s=lin / r_lin + attn / R_ATTN,
                comm_s=comm_seconds(cfg, parallel, seq, rank, checkpoint_layers=checkpoint_layers),
                optimizer_s=OPT_BYTES[optimizer] * lora_local / HBM_BW, usable_gib=usable_gib,
                checkpoint_layers=checkpoint_layers)


def least_checkpointed(cfg: ModelConfig, parallel: Parallel, seq: int, rank: int = 64, **kw) -> Plan | None:
    """The plan with the fewest checkpointed layers that fits its `usable_gib` (`plan`'s keywords in `kw`, the
    budget among them): the first N of the decoder layers checkpointed, the smallest such N from 0 (none) to L (all),
    so that as many layers as the budget allows keep their activations and skip the recompute; None when not even
    N = L fits."""
    if "checkpoint_layers" in kw:
        raise ValueError("least_checkpointed chooses checkpoint_layers itself; leave it out")
    for n in range(cfg.num_hidden_layers + 1):
        p = plan(cfg, parallel, seq, rank, checkpoint_layers=n, **kw)
        if p.fits:
            return p
    return None


def auto_plan(cfg: ModelConfig, seq: int, rank: int = 64, spec: str | None = None, *,
              name: str = "", sizes: Iterable[int] = POWERS_OF_TWO, **kw) -> tuple[list[Plan], Plan | None]:
    """Plans at each size of `sizes` up to the first that fits: (the rows tried, the fitting plan or None). Sizes
    the `spec` cannot take (an expert axis that does not divide E or the size) are skipped; a spec that no size can
    take raises its error (the model's `LayoutError` first: it says which sizes would do)."""
    sizes = list(sizes)
    expert = Parallel.axes(spec)["expert"]
    if expert is not None and cfg.num_experts % expert:  # refused at every size: say which sizes would do
        ok = [x for x in sizes if cfg.num_experts % x == 0]
        raise LayoutError(f"expert={expert} does not divide the {cfg.num_experts} routed experts of this model; "
                          f"expert sizes among {', '.join(map(str, sizes))} that do: {', '.join(map(str, ok))}")
    rows: list[Plan] = []
    error: ValueError | None = None
    for n in sizes:
        try:
            par = Parallel.parse(spec, n)
            p = plan(cfg, par, seq, rank, name=name, **kw)
        except ValueError as e:
            error = e if not isinstance(error, LayoutError) else error
            continue
        rows.append(p)
        if p.fits:
            return rows, p
    if not rows and error is not None:
        raise error
    return rows, None


def format_table(plans: Sequence[Plan]) -> str:
    """Markdown table: GPUs, layout, per-GPU GiB by component (sizes; the total is the peak of the step's phases),
    total, fits, step seconds, tokens/s."""
    head = ("| GPUs | layout | weights | FSDP gather | LoRA+AdamW | saved acts | kept acts | work | a2a | opt tmp "
            "| total GiB | fits | compute s | comm s | step s (est.) | tokens/s (est.) |")
    lines = [head, "| ---: | --- |" + " ---: |" * 8 + " ---: | :---: | ---: | ---: | ---: | ---: |"]
    for p in plans:
        m = p.memory
        g = [f"{v / GIB:.1f}" for v in (m.weights, m.gather, m.lora, m.saved, m.kept, m.work, m.a2a, m.opt_tmp,
                                         m.total)]
        lines.append(f"| {p.gpus} | {p.parallel} | " + " | ".join(g) + f" | {'yes' if p.fits else 'no'} "
                     f"| {p.compute_s:.2f} | {p.comm_s:.2f} | {p.step_s:.2f} | {p.tokens_per_s:,.0f} |")
    return "\n".join(lines)
