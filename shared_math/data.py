"""Training data as numpy arrays, identical for both frameworks: tokenise, mask, pack, shuffle, batch.

- Tokenisers: `HFTokenizer` (a checkpoint's `tokenizer.json` through the `tokenizers` package) or `ByteTokenizer`
  (printable ASCII, tab and newline, mapped onto ids 3..99 after PAD=0, BOS=1, EOS=2, so it fits the tiny models'
  vocab of 128). `load_tokenizer(checkpoint_dir, vocab_size)` picks one.
- Records: JSONL lines `{"text": str}` (loss on every token) or `{"messages": [{"role", "content"}, ...]}` (loss on
  assistant contents and the EOS after each, labels -100 elsewhere). Messages are rendered with `CHAT_TEMPLATE`,
  the same for every tokenizer, so the byte and HF paths differ only in token ids.
- Packing: documents (BOS + tokens [+ EOS]) are laid end to end into rows of `seq_len` tokens, a document never
  split across rows; position_ids restart at 0 for each document (the models block attention across documents
  where they restart) and the first label of each document is -100, so no token is trained to predict the next
  document. The tail of a row is padding (PAD, label -100, positions 0.. as its own document).
- Order: documents are shuffled once by `seed` before packing; each epoch visits the rows in a fresh permutation
  drawn from `(seed, epoch)`. `PackedDataset.batch(k)` is a pure function of k, so the data position of a training
  run is one integer, and resuming needs nothing else.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np

IGNORE_INDEX = -100
PAD_ID, BOS_ID, EOS_ID = 0, 1, 2
# The chat rendering: `<role>` marker then the content, for every message; the assistant's content is followed by
# EOS. Short markers keep synthetic examples short (the tiny default job trains on a 2-core CPU).
CHAT_TEMPLATE = "<{role}>{content}"
ROLES = ("system", "user", "assistant")


class DataError(ValueError):
    """The dataset is missing, malformed, empty or does not fit the model; the message names the line."""


class Tokenizer(Protocol):
    vocab_size: int
    pad_id: int
    bos_id: int | None
    eos_id: int | None

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: Iterable[int]) -> str: ...


class ByteTokenizer:
    """Characters `\\t`, `\\n` and printable ASCII (space..~) -> ids 3..99; PAD=0, BOS=1, EOS=2.

    Needs a vocab of at least 100 ids; anything outside printable ASCII is refused with the character named.
    """

    CHARS = "\t\n" + "".join(chr(c) for c in range(32, 127))
    OFFSET = 3

    def __init__(self, vocab_size: int) -> None:
        need = self.OFFSET + len(self.CHARS)
        if vocab_size < need:
            raise DataError(f"the byte-level tokenizer needs a vocab of at least {need} ids (3 special + "
                            f"{len(self.CHARS)} characters), the model has {vocab_size}; ship a tokenizer.json "
                            "with the checkpoint or use a model with a larger vocab_size")
        self.vocab_size = vocab_size
        self.pad_id, self.bos_id, self.eos_id = PAD_ID, BOS_ID, EOS_ID
        self._to_id = {c: i + self.OFFSET for i, c in enumerate(self.CHARS)}

    def encode(self, text: str) -> list[int]:
        try:
            return [self._to_id[c] for c in text]
        except KeyError as e:
            raise DataError(f"character {e.args[0]!r} is outside the byte-level tokenizer's printable ASCII; "
                            "ship a tokenizer.json with the checkpoint for other text") from None

    def decode(self, ids: Iterable[int]) -> str:
        out = []
        for i in ids:
            i = int(i)
            if self.OFFSET <= i < self.OFFSET + len(self.CHARS):
                out.append(self.CHARS[i - self.OFFSET])
        return "".join(out)


class HFTokenizer:
    """A `tokenizer.json` loaded with the `tokenizers` package. BOS/EOS/PAD come from `tokenizer_config.json`
    next to it when present, else from common special-token spellings; no BOS is added when there is none."""

    _EOS = ("<|endoftext|>", "</s>", "<|im_end|>", "<eos>")
    _BOS = ("<s>", "<|begin_of_text|>", "<bos>")

    def __init__(self, path: str | Path) -> None:
        from tokenizers import Tokenizer as _Tok

        path = Path(path)
        try:
            self._tok = _Tok.from_file(str(path))
        except Exception as e:  # tokenizers raises a bare Exception for a file it cannot parse
            raise DataError(f"{path} is not a tokenizer the `tokenizers` package can load ({e}); replace it with the "
                            "model's own tokenizer.json, or remove it to use the byte-level tokenizer") from None
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
        cfg_path = path.parent / "tokenizer_config.json"
        try:
            cfg = json.loads(cfg_path.read_text()) if cfg_path.is_file() else {}
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise DataError(f"{cfg_path} is not valid JSON ({e}); replace it with the model's own") from None
        if not isinstance(cfg, dict):
            raise DataError(f"{cfg_path} must be a JSON object (the tokenizer's special tokens), got "
                            f"{type(cfg).__name__}")

        def special(key: str, fallbacks: Sequence[str]) -> int | None:
            tok = cfg.get(key)
            if isinstance(tok, dict):  # {"content": "<s>", ...}
                tok = tok.get("content")
            for t in ([tok] if tok else []) + list(fallbacks):
                i = self._tok.token_to_id(t)
                if i is not None:
                    return i
            return None

        self.eos_id = special("eos_token", self._EOS)
        self.bos_id = special("bos_token", self._BOS)
        pad = special("pad_token", ())
        self.pad_id = pad if pad is not None else (self.eos_id if self.eos_id is not None else 0)

    def encode(self, text: str) -> list[int]:
        return list(self._tok.encode(text, add_special_tokens=False).ids)

    def decode(self, ids: Iterable[int]) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=True)


def load_tokenizer(checkpoint_dir: str | Path | None, vocab_size: int) -> Tokenizer:
    """The checkpoint's `tokenizer.json` when it has one, else a `ByteTokenizer` for `vocab_size`."""
    if checkpoint_dir is not None and (Path(checkpoint_dir) / "tokenizer.json").is_file():
        tok = HFTokenizer(Path(checkpoint_dir) / "tokenizer.json")
        if tok.vocab_size > vocab_size:
            raise DataError(f"{checkpoint_dir}/tokenizer.json has {tok.vocab_size} tokens but the model's "
                            f"vocab_size is {vocab_size}")
        return tok
    return ByteTokenizer(vocab_size)


# ---- records -> token ids and labels ------------------------------------------------------------------------------

class Records(list):
    """A list of records that remembers where each came from (`names[i]`, e.g. `data.jsonl:12`) for errors."""

    def __init__(self, records: Iterable[dict[str, Any]], names: Sequence[str]) -> None:
        super().__init__(records)
        self.names = list(names)


def read_jsonl(path: str | Path) -> Records:
    """Every non-blank line of a JSONL file as a dict; a line that is not a JSON object is an error naming it."""
    path = Path(path)
    if path.is_dir():
        raise DataError(f"dataset {path} is a folder: give a JSONL file")
    if not path.is_file():
        raise DataError(f"dataset {path} does not exist")
    records, names = [], []
    with path.open("rb") as f:
        for n, raw in enumerate(f, 1):
            try:  # decoded line by line, so that the error names the line
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise DataError(f"{path}:{n}: not UTF-8 text (byte {raw[e.start]:#04x} at column {e.start + 1}); "
                                "a JSONL dataset is UTF-8") from None
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{n}: not valid JSON ({e.msg} at column {e.colno})") from None
            if not isinstance(rec, dict):
                raise DataError(f"{path}:{n}: each line must be a JSON object, got {type(rec).__name__}")
            records.append(rec)
            names.append(f"{path}:{n}")
    if not records:
        raise DataError(f"dataset {path} is empty: it needs lines of {{\"text\": ...}} or {{\"messages\": [...]}}")
    return Records(records, names)


def encode_record(rec: dict[str, Any], tok: Tokenizer, *, where: str = "record") -> tuple[list[int], list[int]]:
    """One record -> (input ids, labels), unshifted (the models shift). `where` names the record in errors.

    text: BOS + text + EOS, every token labelled. messages: BOS + rendered messages, labels on each assistant
    content and the EOS that ends it. The first token's label is always -100 (nothing predicts it).
    """
    bos = [tok.bos_id] if tok.bos_id is not None else []
    eos = [tok.eos_id] if tok.eos_id is not None else []
    if "text" in rec and "messages" in rec:
        raise DataError(f"{where}: has both \"text\" and \"messages\"; use one")
    if "text" in rec:
        if not isinstance(rec["text"], str) or not rec["text"]:
            raise DataError(f"{where}: \"text\" must be a non-empty string")
        ids = bos + _encode(tok, rec["text"], where) + eos
        labels = list(ids)
    elif "messages" in rec:
        msgs = rec["messages"]
        if not isinstance(msgs, list) or not msgs:
            raise DataError(f"{where}: \"messages\" must be a non-empty list of {{\"role\", \"content\"}}")
        ids, labels = list(bos), [IGNORE_INDEX] * len(bos)
        for i, m in enumerate(msgs):
            if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"),
                                                                                                 str):
                raise DataError(f"{where}: messages[{i}] must be an object with string \"role\" and \"content\"")
            if m["role"] not in ROLES:
                raise DataError(f"{where}: messages[{i}] has role {m['role']!r}; roles are {', '.join(ROLES)}")
            head = _encode(tok, CHAT_TEMPLATE.format(role=m["role"], content=""), where)
            body = _encode(tok, m["content"], where)
            ids += head + body
            labels += [IGNORE_INDEX] * len(head)
            if m["role"] == "assistant":
                ids += eos
                labels += body + eos
            else:
                labels += [IGNORE_INDEX] * len(body)
        if all(lab == IGNORE_INDEX for lab in labels):
            raise DataError(f"{where}: no assistant message, so nothing to train on")
    else:
        raise DataError(f"{where}: needs a \"text\" string or a \"messages\" list (keys present: {sorted(rec)})")
    labels[0] = IGNORE_INDEX
    return ids, labels


def _encode(tok: Tokenizer, text: str, where: str) -> list[int]:
    try:
        return tok.encode(text)
    except DataError as e:
        raise DataError(f"{where}: {e}") from None


def render_prompt(messages: Sequence[dict[str, str]], tok: Tokenizer) -> list[int]:
    """BOS + the messages rendered as in training (EOS after each assistant message) + the assistant marker: the
    prompt that greedy decoding continues."""
    ids = [tok.bos_id] if tok.bos_id is not None else []
    for m in messages:
        ids += tok.encode(CHAT_TEMPLATE.format(**m))
        if m["role"] == "assistant" and tok.eos_id is not None:
            ids.append(tok.eos_id)
    return ids + tok.encode(CHAT_TEMPLATE.format(role="assistant", content=""))


# ---- packing ------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class PackedRows:
    """Packed rows: input_ids, labels, position_ids, each int32/int64 [N, seq_len]."""

    input_ids: np.ndarray
    labels: np.ndarray
    position_ids: np.ndarray

    def __len__(self) -> int:
        return self.input_ids.shape[0]


def pack(docs: Sequence[tuple[list[int], list[int]]], seq_len: int, *, pad_id: int = PAD_ID,
         names: Sequence[str] | None = None) -> PackedRows:
    """Lay documents (ids, labels) end to end into rows of `seq_len`, in order, starting a new row when the next
    document does not fit; a document longer than `seq_len` is an error naming it."""
    if not docs:
        raise DataError("no documents to pack: the dataset is empty")
    rows: list[tuple[list[int], list[int], list[int]]] = []
    cur: tuple[list[int], list[int], list[int]] = ([], [], [])
    for i, (ids, labels) in enumerate(docs):
        if len(ids) > seq_len:
            name = names[i] if names is not None else f"document {i}"
            raise DataError(f"{name}: {len(ids)} tokens do not fit data.seq_len={seq_len}; raise seq_len (up to "
                            "the model's max_position_embeddings) or shorten the document")
        if len(cur[0]) + len(ids) > seq_len:
            rows.append(cur)
            cur = ([], [], [])
        cur[0].extend(ids)
        cur[1].extend(labels)
        cur[2].extend(range(len(ids)))
    rows.append(cur)
    N = len(rows)
    input_ids = np.full((N, seq_len), pad_id, np.int32)
    labels_arr = np.full((N, seq_len), IGNORE_INDEX, np.int32)
    pos = np.zeros((N, seq_len), np.int32)
    for r, (ids, labels, p) in enumerate(rows):
        n = len(ids)
        input_ids[r, :n], labels_arr[r, :n], pos[r, :n] = ids, labels, p
        pos[r, n:] = np.arange(seq_len - n)  # padding is its own document: no real token attends to it
    return PackedRows(input_ids, labels_arr, pos)


class PackedDataset:
    """Records -> packed rows -> micro-batches. `batch(k)` is the k-th micro-batch of the whole run (epochs
    follow each other), a pure function of (records, seed, k), so identical in every framework and on resume."""

    def __init__(self, records: Sequence[dict[str, Any]], tok: Tokenizer, *, seq_len: int, batch_size: int,
                 seed: int, max_positions: int, source: str = "record") -> None:
        if seq_len > max_positions:
            raise DataError(f"data.seq_len={seq_len} exceeds the model's max_position_embeddings={max_positions}")
        if batch_size < 1:
            raise DataError(f"batch_size must be >= 1, got {batch_size}")
        if not records:
            raise DataError(f"{source}: the dataset is empty")
        order = np.random.default_rng(seed).permutation(len(records))
        where = getattr(records, "names", None) or [f"{source} record {i}" for i in range(len(records))]
        names = [where[i] for i in order]
        docs = [encode_record(records[i], tok, where=n) for i, n in zip(order, names)]
        self.rows = pack(docs, seq_len, pad_id=tok.pad_id, names=names)
        self.seq_len, self.batch_size, self.seed = seq_len, batch_size, seed
        self.num_documents = len(docs)
        # an epoch is the whole rows taken batch_size at a time; the last partial batch wraps to the epoch's start
        self.batches_per_epoch = max(1, -(-len(self.rows) // batch_size))
        self._fingerprint: str | None = None

    def _epoch_order(self, epoch: int) -> np.ndarray:
        perm = np.random.default_rng([self.seed, epoch]).permutation(len(self.rows))
        need = self.batches_per_epoch * self.batch_size
        return np.resize(perm, need)  # repeats the permutation's start to fill the last batch

    def batch(self, k: int) -> dict[str, np.ndarray]:
        """Micro-batch number k: `input_ids`, `labels`, `position_ids`, each int32 [batch_size, seq_len]."""
        epoch, i = divmod(k, self.batches_per_epoch)
        idx = self._epoch_order(epoch)[i * self.batch_size:(i + 1) * self.batch_size]
        r = self.rows
        return {"input_ids": r.input_ids[idx], "labels": r.labels[idx], "position_ids": r.position_ids[idx]}

    def fingerprint(self) -> str:
        """SHA-256 of the packed rows (ids, labels, positions) and their order's seed: what the batches of a run are
        drawn from, so that a resume can check it continues on the data it trained on (a data file edited since,
        or another file at a relative path, or another tokenizer). Computed once."""
        if self._fingerprint is None:
            h = hashlib.sha256(json.dumps([list(self.rows.input_ids.shape), self.seed]).encode())
            for a in (self.rows.input_ids, self.rows.labels, self.rows.position_ids):
                h.update(np.ascontiguousarray(a, np.int32).data)  # int32 as packed: no copy
            self._fingerprint = h.hexdigest()
        return self._fingerprint

    @property
    def num_label_tokens(self) -> int:
        return int((self.rows.labels != IGNORE_INDEX).sum())
