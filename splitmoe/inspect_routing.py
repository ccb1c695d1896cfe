"""`splitmoe inspect --routing`: run a checkpoint (and a PEFT adapter) over a JSONL data file, in torch or JAX, and
report the routing analytics of every MoE layer (shared_math.routing_stats): a table on stdout, and with `--out`
routing.json (the summary) and routing.png.

Each document is its own row, right-padded to the longest row of its batch, and the padding is excluded from the
statistics through the attention mask. A token's routing is then the one it has in a packed training row, where
documents never attend to each other either (their position ids restart), so the analytics describe the data as
training sees it. Rows are sorted by length, so that little padding is computed, and padded to a multiple of 16
tokens, so that JAX compiles a few shapes only.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from shared_math import data as data_mod

_ROW_MULTIPLE = 16  # padded row lengths are multiples of this: few distinct shapes for jit, little wasted compute


def document_batches(docs: Sequence[list[int]], *, batch_size: int, pad_id: int) -> Iterator[dict[str, np.ndarray]]:
    """Token-id documents -> batches of `input_ids` and `attention_mask` [B, S] (int32), one document per row, by
    increasing length, each batch right-padded to its longest row rounded up to a multiple of 16."""
    if batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {batch_size}")
    order = sorted(range(len(docs)), key=lambda i: len(docs[i]))
    for start in range(0, len(order), batch_size):
        rows = [docs[i] for i in order[start:start + batch_size]]
        S = -(-max(len(r) for r in rows) // _ROW_MULTIPLE) * _ROW_MULTIPLE
        ids = np.full((len(rows), S), pad_id, np.int32)
        mask = np.zeros((len(rows), S), np.int32)
        for r, doc in enumerate(rows):
            ids[r, :len(doc)], mask[r, :len(doc)] = doc, 1
        yield {"input_ids": ids, "attention_mask": mask}


def read_documents(path: str | Path, tok: data_mod.Tokenizer, *, max_positions: int,
                   max_records: int | None = None) -> list[list[int]]:
    """The records of a JSONL file (`{"text"}` or `{"messages"}`, as for training) tokenised as training does;
    a document longer than the model's context is an error naming it."""
    records = data_mod.read_jsonl(path)
    names = records.names
    if max_records is not None:
        if max_records < 1:
            raise ValueError(f"--max-records must be >= 1, got {max_records}")
        records, names = records[:max_records], names[:max_records]
    docs = []
    for rec, name in zip(records, names):
        ids, _ = data_mod.encode_record(rec, tok, where=name)
        if len(ids) > max_positions:
            raise ValueError(f"{name}: {len(ids)} tokens exceed the model's max_position_embeddings={max_positions}; "
                             "shorten the record or leave it out")
        docs.append(ids)
    return docs


def _torch_summary(args: argparse.Namespace, batches: list[dict[str, np.ndarray]]) -> dict[str, Any]:
    import torch

    from torch_impl.load import load_model
    from torch_impl.lora import load_adapter
    from torch_impl.routing_stats import collect_routing_stats

    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[args.dtype]
    device = args.device or "cpu"
    model = load_model(args.model, dtype=dtype, device=device, moe_backend=args.moe_backend)
    if args.adapter:
        load_adapter(model, args.adapter)
    return collect_routing_stats(model, batches, device=device)


def _jax_summary(args: argparse.Namespace, batches: list[dict[str, np.ndarray]]) -> dict[str, Any]:
    import jax
    import jax.numpy as jnp

    from jax_impl.load import load_model
    from jax_impl.lora import load_adapter
    from jax_impl.routing_stats import collect_routing_stats

    if args.device:
        raise ValueError("--device is a torch option: jax runs on its default device")
    if args.dtype == "float32":  # fp32 means fp32 (numerics policy), as in the trainer
        jax.config.update("jax_default_matmul_precision", "highest")
    model = load_model(args.model, dtype={"float32": jnp.float32, "bfloat16": jnp.bfloat16}[args.dtype],
                       moe_backend=args.moe_backend)
    if args.adapter:
        load_adapter(model, args.adapter)
    return collect_routing_stats(model, batches)


def inspect_routing(args: argparse.Namespace) -> int:
    """The `inspect --routing` command (module docstring)."""
    from shared_math.checkpoint import read_checkpoint
    from shared_math.routing_stats import format_table, plot_routing_summary

    t0 = time.perf_counter()
    if not args.model or not args.data:
        raise ValueError("inspect --routing needs --model DIR (a HF checkpoint folder) and --data FILE.jsonl")
    model_dir = Path(args.model)
    if not (model_dir / "config.json").is_file():
        raise FileNotFoundError(f"--model {model_dir}: no config.json there (a HF checkpoint folder)")
    if args.adapter and not (Path(args.adapter) / "adapter_config.json").is_file():
        raise FileNotFoundError(f"--adapter {args.adapter}: no adapter_config.json there (a PEFT adapter folder)")
    cfg, _ = read_checkpoint(model_dir)
    tok = data_mod.load_tokenizer(model_dir, cfg.vocab_size)
    docs = read_documents(args.data, tok, max_positions=cfg.max_position_embeddings, max_records=args.max_records)
    batches = list(document_batches(docs, batch_size=args.batch_size, pad_id=tok.pad_id))
    tokens = sum(len(d) for d in docs)
    summary = (_torch_summary if args.framework == "torch" else _jax_summary)(args, batches)
    print(f"routing of {cfg.family} {model_dir}" + (f" + adapter {args.adapter}" if args.adapter else "")
          + f" ({args.framework}, {args.dtype}) over {len(docs)} documents, {tokens} tokens of {args.data}; "
          f"E={cfg.num_experts}, K={cfg.num_experts_per_tok} (shared_math/routing_stats.py defines the columns)")
    print(format_table(summary))
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "routing.json").write_text(json.dumps(
            {"model": str(model_dir), "adapter": args.adapter, "data": str(args.data), "framework": args.framework,
             "dtype": args.dtype, "documents": len(docs), "tokens": tokens, "routing": summary}, indent=1))
        png = plot_routing_summary(summary, out / "routing.png",
                                   title=f"{cfg.family} routing over {Path(args.data).name} ({args.framework})")
        print(f"wrote {out / 'routing.json'} and {png}")
    print(f"done in {time.perf_counter() - t0:.1f}s")
    return 0


def add_routing_arguments(p: argparse.ArgumentParser) -> None:
    """The `inspect --routing` options, on the `inspect` sub-parser."""
    g = p.add_argument_group("routing analytics (--routing)",
                             "a checkpoint (+ adapter) over a data file: per MoE layer, expert load, imbalance, "
                             "router entropy, aux loss, group choices")
    g.add_argument("--routing", action="store_true", help="the routing analytics of --model over --data")
    g.add_argument("--model", help="HF checkpoint folder (config.json + safetensors)")
    g.add_argument("--adapter", help="PEFT adapter folder to load onto the model")
    g.add_argument("--data", help="JSONL file of {\"text\"} or {\"messages\"} records, as for training")
    g.add_argument("--framework", default="torch", choices=("torch", "jax"))
    g.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    g.add_argument("--device", help="torch: cpu, cuda, cuda:1 (default cpu); jax uses its default device")
    g.add_argument("--moe-backend", default="auto", help="MoE backend (default auto)")
    g.add_argument("--batch-size", type=int, default=8, help="documents per forward (default 8)")
    g.add_argument("--max-records", type=int, help="only the first N records of --data")
