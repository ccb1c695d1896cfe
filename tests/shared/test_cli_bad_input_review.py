"""Bad input to the `splitmoe` commands, found by an adversarial review of the CLI (session 28) and kept here so it
stays fixed: each was a traceback, a value accepted in silence, a hang or a folder overwritten.

- A corrupt tokenizer.json / tokenizer_config.json beside a checkpoint, and a malformed `--device`, are one line.
- A model YAML (make-tiny --config, model.tiny) that is not valid YAML, not a mapping, has a bad seed or a misspelt
  override key is refused naming the file and the key (the misspelt key was written into config.json and ignored).
- The synthetic task spec refuses an empty alphabet, add_max 0 and a held-out set larger than its task's space (that
  one drew for minutes before giving up).
- A JSONL file that is not UTF-8 names its line; a folder given as the dataset says so.
- `key=value` overrides after an option are overrides, not "unrecognized arguments".
- make-tiny refuses an --out folder it did not write (a downloaded model's files were overwritten); demo refuses a
  folder holding another run's adapter (it was deleted); plan refuses --budget-gib nan; inspect and make-tiny name a
  bad --tokens / --seed.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from shared_math.data import DataError, load_tokenizer, read_jsonl
from shared_math.train_config import ConfigError, load_run_config
from shared_math.training import read_model_config
from splitmoe.cli import main


def _model_yaml(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "model.yaml"
    path.write_text(text)
    return path


def test_a_corrupt_tokenizer_beside_a_checkpoint_is_one_line(tmp_path):
    pytest.importorskip("tokenizers")
    (tmp_path / "tokenizer.json").write_text("garbage")
    with pytest.raises(DataError, match=r"tokenizer\.json is not a tokenizer the `tokenizers` package can load"):
        load_tokenizer(tmp_path, 128)
    # a valid tokenizer.json with a corrupt tokenizer_config.json beside it
    (tmp_path / "tokenizer.json").write_text(json.dumps({
        "version": "1.0", "truncation": None, "padding": None, "added_tokens": [], "normalizer": None,
        "pre_tokenizer": None, "post_processor": None, "decoder": None,
        "model": {"type": "WordLevel", "vocab": {"a": 0, "b": 1}, "unk_token": "a"}}))
    (tmp_path / "tokenizer_config.json").write_text("{bad")
    with pytest.raises(DataError, match=r"tokenizer_config\.json is not valid JSON"):
        load_tokenizer(tmp_path, 128)


@pytest.mark.parametrize("device", ["nonsense", "cuda:x"])
def test_a_malformed_device_is_one_line_before_any_work(device, tmp_path, capsys):
    pytest.importorskip("torch")
    from torch_impl.backends import resolve_backend

    with pytest.raises(ConfigError, match=f"device '{device}' is not a torch device"):
        resolve_backend("auto", device=device)
    out = tmp_path / "run"
    assert main(["train", "--quiet", "--device", device, "--out", str(out), "train.steps=1"]) == 2
    err = capsys.readouterr().err
    assert f"device '{device}' is not a torch device" in err and "Traceback" not in err and not out.exists()


@pytest.mark.parametrize("text, message", [
    ("family: [\n", "is not valid YAML"),
    ("5\n", "a model YAML is a mapping of family, seed, overrides"),
    ("family: qwen3_moe\nseed: abc\n", "seed must be an integer >= 0, got 'abc'"),
    ("family: qwen3_moe\nseed: -1\n", "seed must be an integer >= 0, got -1"),
    ("family: qwen3_moe\noverrides: {hidden_sizee: 8}\n", "'hidden_sizee' (did you mean 'hidden_size'?)"),
])
def test_a_bad_model_yaml_is_refused_naming_the_file(text, message, tmp_path, capsys):
    path = _model_yaml(tmp_path, text)
    out = tmp_path / "tiny"
    assert main(["make-tiny", "--config", str(path), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert message in err and str(path) in err and "Traceback" not in err and not out.exists()
    # the same preset as a run's model.tiny: a ConfigError naming the key, before anything is built
    with pytest.raises(ConfigError, match=r"model\.tiny: .*" + message.replace("(", r"\(").replace(")", r"\)")
                       .replace("[", r"\[").replace("?", r"\?")):
        read_model_config(load_run_config(None, [f"model.tiny={path}", f"train.out_dir={tmp_path / 'run'}"]))


def test_every_shipped_model_yaml_passes_the_override_check():
    root = Path(__file__).resolve().parents[2] / "configs" / "models"
    from shared_math.tiny import read_model_yaml

    for path in sorted(root.glob("*.yaml")):
        read_model_yaml(path)


@pytest.mark.parametrize("override, message", [
    ("data.synthetic.alphabet=", "alphabet is empty"),
    ("data.synthetic.add_max=0", "add_max must be >= 1"),
    ("data.synthetic.num_train=-5", "need num_train >= 1 and num_eval >= 0"),
    ("data.synthetic.num_eval=100000", "num_eval=100000 held-out examples per task, but task copy has only 1803"),
])
def test_an_impossible_synthetic_task_is_refused_at_once(override, message):
    t0 = time.perf_counter()
    with pytest.raises(ConfigError, match=f"data.synthetic: {message}"):
        load_run_config(None, [override])
    assert time.perf_counter() - t0 < 5  # num_eval=100000 drew for minutes before its error


def test_a_dataset_that_is_not_utf8_names_its_line(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_bytes(b'{"text": "ok"}\n\xff\xfe{"text": "x"}\n')
    with pytest.raises(DataError, match=rf"{path}:2: not UTF-8 text \(byte 0xff at column 1\)"):
        read_jsonl(path)
    with pytest.raises(DataError, match="is a folder: give a JSONL file"):
        read_jsonl(tmp_path)


def test_overrides_after_an_option_are_overrides(tmp_path, capsys):
    out = tmp_path / "run"
    # the last override is bad on purpose: it must be read (and refused) as an override, not as an unknown argument
    assert main(["train", "train.steps=1", "--out", str(out), "--quiet", "optim.lr=-1"]) == 2
    err = capsys.readouterr().err
    assert "optim.lr must be a finite number > 0, got -1.0" in err and "unrecognized" not in err
    with pytest.raises(SystemExit):  # what is neither an option nor key=value is still refused by argparse
        main(["train", "train.steps=1", "--out", str(out), "--quiet", "bogus"])
    assert "unrecognized arguments: bogus" in capsys.readouterr().err


def test_make_tiny_refuses_a_folder_it_did_not_write(tmp_path, capsys):
    model = tmp_path / "downloaded"
    model.mkdir()
    (model / "config.json").write_text("keep me")
    (model / "model.safetensors").write_text("my weights")
    assert main(["make-tiny", "--family", "qwen3_moe", "--out", str(model)]) == 2
    assert "is a folder that make-tiny did not write" in capsys.readouterr().err
    assert (model / "config.json").read_text() == "keep me"
    assert (model / "model.safetensors").read_text() == "my weights"
    # its own earlier output is replaced (README's quickstart run twice)
    ours = tmp_path / "tiny"
    assert main(["make-tiny", "--family", "gpt_oss", "--out", str(ours)]) == 0
    assert main(["make-tiny", "--family", "qwen3_moe", "--out", str(ours)]) == 0
    assert json.loads((ours / "config.json").read_text())["model_type"] == "qwen3_moe"


def test_demo_refuses_a_folder_holding_another_runs_adapter(tmp_path):
    from splitmoe.train_cli import run_default_job

    out = tmp_path / "finished"  # a run with train.save_every=0: an adapter, no checkpoint
    (out / "adapter").mkdir(parents=True)
    (out / "adapter" / "adapter_model.safetensors").write_text("trained")
    with pytest.raises(ConfigError, match="holds another run's adapter .*pass --out NEW_DIR"):
        run_default_job(out, progress=False, overrides=["train.steps=1", "data.synthetic.num_train=8",
                                                        "data.synthetic.num_eval=2", "data.batch_size=4"])
    assert (out / "adapter" / "adapter_model.safetensors").read_text() == "trained"


@pytest.mark.parametrize("argv, flag", [
    (["inspect", "--tokens", "0"], "--tokens"), (["inspect", "--seed", "-1"], "--seed"),
    (["make-tiny", "--family", "qwen3_moe", "--seed", "-5", "--out", "x"], "--seed"),
    # plan's own message added "it fits on no power of two <= 64 with fsdp only", which is beside the point
    (["plan", "--gpus", "auto", "--expert-chunk", "-5"], "--expert-chunk"),
    (["plan", "--gpus", "auto", "--seq", "0"], "--seq"),
])
def test_bad_numbers_name_their_flag(argv, flag, capsys):
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2 and f"argument {flag}" in capsys.readouterr().err


def test_plan_refuses_a_budget_that_is_not_a_number(capsys):
    assert main(["plan", "--gpus", "1", "--preset", "qwen3_moe:30b-a3b", "--budget-gib", "nan"]) == 2
    assert "--budget-gib must be positive (a finite number of GiB), got nan" in capsys.readouterr().err


def test_train_refuses_a_folder_holding_a_finished_runs_adapter(tmp_path, capsys):
    """A run with train.save_every=0 leaves its adapter and no checkpoint. A fresh `train --out` on that folder
    emptied its metrics.jsonl at once and replaced the adapter at the end; now it is refused before either."""
    out = tmp_path / "finished"
    (out / "adapter").mkdir(parents=True)
    (out / "adapter" / "adapter_model.safetensors").write_text("trained")
    (out / "metrics.jsonl").write_text('{"step": 1, "loss": 1.0}\n')
    assert main(["train", "train.steps=1", "data.synthetic.num_train=8", "data.synthetic.num_eval=2",
                 "data.batch_size=4", "--out", str(out)]) != 0
    assert "already holds a trained adapter" in capsys.readouterr().err
    assert (out / "adapter" / "adapter_model.safetensors").read_text() == "trained"
    assert (out / "metrics.jsonl").read_text() == '{"step": 1, "loss": 1.0}\n'


@pytest.mark.parametrize("override, named", [("hidden_size: -8", "hidden_size=-8 (a whole number >= 0)"),
                                             ("hidden_size: big", "hidden_size='big' (a whole number >= 0)"),
                                             ("rms_norm_eps: tiny", "rms_norm_eps='tiny' (a number)")])
def test_a_model_yaml_override_of_the_wrong_kind_is_named(tmp_path, override, named, capsys):
    """A size the preset holds as an int given as a negative number or a word (numpy's "negative dimensions are not
    allowed" / "invalid literal for int()" named no key), a float given as a word: refused naming the key."""
    path = _model_yaml(tmp_path, f"family: qwen3_moe\noverrides:\n  {override}\n")
    assert main(["make-tiny", "--config", str(path), "--out", str(tmp_path / "m")]) != 0
    assert named in capsys.readouterr().err
    assert not (tmp_path / "m").exists()
