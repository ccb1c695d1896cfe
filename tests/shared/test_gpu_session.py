"""benchmarks/gpu_session.sh, checked on the CPU before it costs device time: the script parses, its usage line names
exactly its parts, and every `benchmarks/step.py` command in it is one that step.py's own argument checks accept.

A device session has 30 minutes; a misspelt flag or a refused combination found on the GPU costs a machine start and
a call (session 13 lost part of a call to two step.py rows that could not run). The commands' shell variables are
filled with stand-ins of the right kind: a number for `$L`, `$((...))` and the like, a path for `$R/...`, the
part's own assignments (`Q="..."`) for `$Q`; a command built from loop variables (`$fam`) is left out.
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import shlex
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "gpu_session.sh"
# A part kept as the record of what ran, whose command step.py now refuses because of what it found: session 13's
# reduce-overhead rows with checkpointed layers failed on the H100 (pytorch/pytorch#154306), and step.py refuses that
# combination since.
REFUSED_ON_RECORD = {("session13ro", "--compile-mode reduce-overhead")}


def _parts(text: str) -> list[str]:
    return re.findall(r"^  ([a-z0-9_]+)\)", text, flags=re.M)


def _step_commands(text: str) -> list[tuple[str, list[str]]]:
    """(part, step.py's arguments) of every step.py command, variables filled with stand-ins."""
    commands, part, assigned = [], None, {}
    for line in text.replace("\\\n", " ").splitlines():
        if m := re.match(r"^  ([a-z0-9_]+)\)", line):
            part, assigned = m.group(1), {}
        for a in re.finditer(r'(?:^|\s)([A-Z][A-Z0-9_]*)="([^"]*)"', line):
            assigned[a.group(1)] = a.group(2)
        if re.match(r'\s*[A-Z][A-Z0-9_]*="[^"]*benchmarks/step\.py', line):
            continue  # STEP="benchmarks/step.py ...": checked where `python3 $STEP ...` runs it
        for name, value in assigned.items():  # `python3 $STEP --seq ...`: the command is in the variable
            if "benchmarks/step.py" in value:
                line = line.replace(f"${name} ", value + " ")
        if part is None or "benchmarks/step.py" not in line:
            continue
        cmd = re.split(r"\s(?:>|>>|2>&1|;|\|\||&&)\s", " " + line.split("benchmarks/step.py", 1)[1])[0]
        if re.search(r"\$[a-z]", cmd):
            continue  # built from a shell loop's variables

        def fill(m: re.Match, assigned: dict = assigned) -> str:
            value = assigned.get(m.group(1) or m.group(3), "24")
            if m.group(2):  # ${VAR/old/new}
                old, new = m.group(2).split("/", 1)
                value = value.replace(old, new)
            return value

        cmd = re.sub(r'"\$R[^"]*"|\$R/\S*', "/tmp/out", cmd)
        cmd = re.sub(r"\$\(\([^)]*\)\)|\$\([^)]*\)", "24", cmd)
        for _ in range(2):  # twice: an assigned value may name another variable (Q="--layers $L ...")
            cmd = re.sub(r"\$\{([A-Z][A-Z0-9_]*)/?([^}]*)\}|\$([A-Z][A-Z0-9_]*)", fill, cmd)
        commands.append((part, shlex.split(cmd)))
    return commands


def test_the_script_parses_and_its_usage_names_every_part():
    if shutil.which("bash") is None:
        pytest.skip("no bash")
    subprocess.run(["bash", "-n", str(SCRIPT)], check=True)
    text = SCRIPT.read_text()
    usage = re.search(r"usage: gpu_session\.sh ([a-z0-9_|]+)\}", text)
    assert usage, "the PART=${1:?usage: ...} line is missing"
    parts = _parts(text)
    assert len(parts) == len(set(parts)), "a part is defined twice"
    assert set(usage.group(1).split("|")) == set(parts)


def test_every_step_command_passes_steps_own_checks():
    pytest.importorskip("torch")
    from benchmarks.step import parse_args

    commands = _step_commands(SCRIPT.read_text())
    assert len(commands) > 50  # the stand-ins reach the commands (96 when this was written)
    refused = set()
    for part, args in commands:
        err = io.StringIO()
        try:
            with contextlib.redirect_stderr(err):
                parse_args(args)
        except SystemExit:
            why = err.getvalue().strip().splitlines()[-1]
            known = [flag for p, flag in REFUSED_ON_RECORD if p == part and flag in " ".join(args)]
            assert known, f"gpu_session.sh {part}: step.py {' '.join(args)}\n  -> {why}"
            refused.add((part, known[0]))
    assert refused == REFUSED_ON_RECORD  # the record still holds what it says



def test_a_part_cut_short_still_leaves_what_it_finished(tmp_path):
    """A call stopped at the device's limit returns only what is under $OUT, and the part's .tgz is written when the
    part ends: the snapshot copier must have put the finished files there, and a part that ends leaves only its .tgz
    and no copier running. (The script's preamble imports torch and jax, so the cut comes once the first file has
    reached $OUT, however long that takes, not after a fixed time.)"""
    if shutil.which("bash") is None:
        pytest.skip("no bash")
    text = SCRIPT.read_text()
    assert "case $PART in\n" in text
    tag = f"fake{os.getpid()}"  # the script works in /tmp/<part>: a name no other run uses
    fake = (f'case $PART in\n  {tag}cut) echo first > "$R/first.txt"; sleep 120; echo second > "$R/second.txt" ;;\n'
            f'  {tag}whole) echo first > "$R/first.txt" ;;\n')
    script = tmp_path / "gpu_session.sh"
    script.write_text(text.replace("case $PART in\n", fake, 1))
    env = {**os.environ, "SNAPSHOT_EVERY": "1"}
    cut, whole = tmp_path / "cut", tmp_path / "whole"
    try:
        proc = subprocess.Popen(["bash", str(script), f"{tag}cut"], cwd=tmp_path, env={**env, "OUT": str(cut)},
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        first = cut / f"{tag}cut.partial" / "first.txt"
        deadline = time.monotonic() + 120
        while not first.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
        os.killpg(proc.pid, signal.SIGKILL)  # the device's cut: nothing of the script runs after it
        proc.wait()
        assert first.read_text() == "first\n"
        assert not (cut / f"{tag}cut.partial" / "second.txt").exists() and not (cut / f"{tag}cut.tgz").exists()
        log = tmp_path / "whole.log"  # a file, not a pipe: a copier left running would hold a pipe open
        with log.open("w") as f:
            done = subprocess.run(["bash", str(script), f"{tag}whole"], cwd=tmp_path, stdout=f, stderr=f,
                                  env={**env, "OUT": str(whole)}, timeout=300)
        assert done.returncode == 0, log.read_text()
        assert sorted(p.name for p in whole.iterdir()) == [f"{tag}whole.tgz"]
        time.sleep(1.5)  # a copier still running would recreate the .partial folder within SNAPSHOT_EVERY
        assert sorted(p.name for p in whole.iterdir()) == [f"{tag}whole.tgz"]
    finally:
        for part in ("cut", "whole"):
            shutil.rmtree(f"/tmp/{tag}{part}", ignore_errors=True)
