"""shared_math.data and shared_math.tasks: tokenisers, chat masking, packing, position ids, batches, bad input."""

from __future__ import annotations

import json

import numpy as np
import pytest

from shared_math import data, tasks
from shared_math.data import BOS_ID, EOS_ID, IGNORE_INDEX, ByteTokenizer, DataError, PackedDataset


def _write_jsonl(path, lines):
    path.write_text("".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines))
    return path


def test_byte_tokenizer_round_trip_and_range():
    tok = ByteTokenizer(128)
    text = "Hello, world!\n\t~ 0123"
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    assert min(ids) >= 3 and max(ids) < 100  # specials 0..2, characters 3..99: fits vocab 128
    assert len(set(tok.encode("".join(ByteTokenizer.CHARS)))) == len(ByteTokenizer.CHARS)


def test_byte_tokenizer_errors():
    with pytest.raises(DataError, match="at least 100"):
        ByteTokenizer(64)
    with pytest.raises(DataError, match="'é'"):
        ByteTokenizer(128).encode("café")


def test_text_record_labels_everything_but_first():
    tok = ByteTokenizer(128)
    ids, labels = data.encode_record({"text": "ab"}, tok)
    assert ids == [BOS_ID, *tok.encode("ab"), EOS_ID]
    assert labels == [IGNORE_INDEX, *tok.encode("ab"), EOS_ID]


def test_chat_masking_only_assistant_tokens():
    tok = ByteTokenizer(128)
    rec = {"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "hi"},
                        {"role": "assistant", "content": "yo"}, {"role": "user", "content": "again"},
                        {"role": "assistant", "content": "ok"}]}
    ids, labels = data.encode_record(rec, tok)
    assert len(ids) == len(labels)
    trained = [i for i, lab in zip(ids, labels) if lab != IGNORE_INDEX]
    assert tok.decode(trained) == "yook" and trained.count(EOS_ID) == 2  # each answer, then its EOS
    assert all(lab in (IGNORE_INDEX, i) for i, lab in zip(ids, labels))
    # the prompt used for generation is exactly the ids before the last answer
    prompt = data.render_prompt(rec["messages"][:-1], tok)
    assert ids[:len(prompt)] == prompt and tok.decode(ids[len(prompt):-1]) == "ok"


def test_packing_position_ids_restart_and_no_cross_document_label():
    docs = [([1, 5, 6], [-100, 5, 6]), ([1, 7], [-100, 7]), ([1, 8, 9, 10], [-100, 8, 9, 10])]
    rows = data.pack(docs, seq_len=6, pad_id=0)
    np.testing.assert_array_equal(rows.input_ids, [[1, 5, 6, 1, 7, 0], [1, 8, 9, 10, 0, 0]])
    np.testing.assert_array_equal(rows.position_ids, [[0, 1, 2, 0, 1, 0], [0, 1, 2, 3, 0, 1]])
    np.testing.assert_array_equal(rows.labels, [[-100, 5, 6, -100, 7, -100], [-100, 8, 9, 10, -100, -100]])


def test_packed_batches_deterministic_and_cover_every_row():
    recs = [{"text": "x" * (i % 7 + 1)} for i in range(50)]
    tok = ByteTokenizer(128)
    kw = dict(seq_len=16, batch_size=4, max_positions=256)
    a, b = PackedDataset(recs, tok, seed=3, **kw), PackedDataset(recs, tok, seed=3, **kw)
    c = PackedDataset(recs, tok, seed=4, **kw)
    for k in (0, 5, a.batches_per_epoch + 1):
        for key in ("input_ids", "labels", "position_ids"):
            np.testing.assert_array_equal(a.batch(k)[key], b.batch(k)[key])
    assert not np.array_equal(a.batch(0)["input_ids"], c.batch(0)["input_ids"])
    epoch = np.concatenate([a.batch(k)["input_ids"] for k in range(a.batches_per_epoch)])
    assert {r.tobytes() for r in epoch} == {r.tobytes() for r in a.rows.input_ids}  # one epoch sees every row
    assert a.batch(0)["input_ids"].shape == (4, 16)


def test_jsonl_errors_name_the_line(tmp_path):
    tok = ByteTokenizer(128)
    bad_json = _write_jsonl(tmp_path / "a.jsonl", [{"text": "ok"}, "{not json"])
    with pytest.raises(DataError, match=r"a.jsonl:2: not valid JSON"):
        data.read_jsonl(bad_json)
    missing = _write_jsonl(tmp_path / "b.jsonl", [{"text": "ok"}, "", {"prompt": "x"}])
    with pytest.raises(DataError, match=r"b.jsonl:3: needs a \"text\""):
        PackedDataset(data.read_jsonl(missing), tok, seq_len=32, batch_size=1, seed=0, max_positions=64)
    bad_role = _write_jsonl(tmp_path / "c.jsonl", [{"messages": [{"role": "bot", "content": "x"}]}])
    with pytest.raises(DataError, match=r"c.jsonl:1: messages\[0\] has role 'bot'"):
        PackedDataset(data.read_jsonl(bad_role), tok, seq_len=32, batch_size=1, seed=0, max_positions=64)
    with pytest.raises(DataError, match="empty"):
        data.read_jsonl(_write_jsonl(tmp_path / "d.jsonl", ["", "  "]))
    with pytest.raises(DataError, match="does not exist"):
        data.read_jsonl(tmp_path / "nope.jsonl")


def test_too_long_sequences(tmp_path):
    tok = ByteTokenizer(128)
    recs = data.read_jsonl(_write_jsonl(tmp_path / "l.jsonl", [{"text": "short"}, {"text": "y" * 40}]))
    with pytest.raises(DataError, match=r"l.jsonl:2: 42 tokens do not fit data.seq_len=32"):
        PackedDataset(recs, tok, seq_len=32, batch_size=1, seed=0, max_positions=64)
    with pytest.raises(DataError, match="max_position_embeddings=64"):
        PackedDataset(recs, tok, seq_len=128, batch_size=1, seed=0, max_positions=64)


def test_hf_tokenizer_path(tmp_path):
    """A checkpoint folder with tokenizer.json is tokenised by it (a word-level tokenizer built here)."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "hello": 3, "world": 4, "<user>": 5, "<assistant>": 6, "[UNK]": 7}
    t = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    t.pre_tokenizer = pre_tokenizers.Split(r"<[a-z]+>|\w+|\s", behavior="isolated")
    t.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>", "eos_token": "</s>",
                                                                "pad_token": "<pad>"}))
    tok = data.load_tokenizer(tmp_path, vocab_size=128)
    assert isinstance(tok, data.HFTokenizer) and (tok.bos_id, tok.eos_id, tok.pad_id) == (1, 2, 0)
    ids, labels = data.encode_record({"messages": [{"role": "user", "content": "hello"},
                                                   {"role": "assistant", "content": "world"}]}, tok)
    assert ids == [1, 5, 3, 6, 4, 2]
    assert labels == [-100, -100, -100, -100, 4, 2]
    with pytest.raises(DataError, match="vocab_size is 4"):
        data.load_tokenizer(tmp_path, vocab_size=4)
    assert isinstance(data.load_tokenizer(tmp_path / "elsewhere", 128), ByteTokenizer)


def test_synthetic_tasks_deterministic_split_and_answers():
    spec = tasks.TaskSpec(tasks=("copy", "rev", "add"), num_train=300, num_eval=20, seed=1)
    train, held = tasks.generate(spec)
    assert (train, held) == tasks.generate(spec)
    assert len(train) == 300 and len(held) == 60
    train_prompts = {r["messages"][0]["content"] for r in train}
    assert not train_prompts & {r["messages"][0]["content"] for r in held}  # held-out never trained on
    for r in train + held:
        p, a = r["messages"][0]["content"], r["messages"][1]["content"]
        expect = {"c": p[1:], "r": p[1:][::-1]}.get(p[0]) or str(sum(int(x) for x in p[1:].split("+")))
        assert a == expect, r


def test_greedy_complete_and_exact_match():
    """A fake model that always predicts `token + 1` (and EOS after 9): greedy decoding must follow it."""
    def logits_fn(ids, pos):
        out = np.zeros(ids.shape + (16,))
        nxt = np.where(ids >= 9, EOS_ID, ids + 1)
        out[np.arange(ids.shape[0])[:, None], np.arange(ids.shape[1]), nxt] = 1.0
        return out

    outs = tasks.greedy_complete(logits_fn, [[3], [5, 7], [8]], eos_id=EOS_ID, max_new_tokens=4, batch_size=2)
    assert outs == [[4, 5, 6, 7], [8, 9], [9]]
    recs = [{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": a}], "task": t}
            for a, t in (("x", "copy"), ("y", "copy"), ("z", "rev"))]
    em = tasks.exact_match(recs, lambda rs: ["x", "n", "z"])
    assert em == {"all": pytest.approx(2 / 3), "copy": 0.5, "rev": 1.0}
