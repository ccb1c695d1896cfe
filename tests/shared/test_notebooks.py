"""The notebooks in notebooks/ run from top to bottom on a CPU, as CI runs them, and show their figures.

Why jupytext percent-format `.py` sources executed as scripts, not `.ipynb` files through nbclient / nbmake: the
sources diff and review as code and ruff lints them; there are no stored outputs to go stale or bloat the repository;
and CI needs no Jupyter kernel (ipykernel, pyzmq, jupyter_client) nor its start-up per notebook. Each cell runs in
order in a fresh interpreter, as "Restart & Run All" does. In Jupyter (`pip install -e ".[notebooks]"`), jupytext
opens them as notebooks, and the inline backend shows each `plt.show()` figure under its cell; here the Agg backend
draws them and the runner below counts them instead.

Each notebook is a subprocess with `MPLBACKEND=Agg`, its outputs in a temporary folder (`SPLITMOE_NOTEBOOK_OUT`),
and the working tree first on `PYTHONPATH` (the tree under test, whatever an editable install points at). The
notebooks assert their own results (losses fall, frameworks and PEFT agree, every backend within tolerance), so a
notebook that runs is one whose claims held.
"""

from __future__ import annotations

import ast
import importlib.util
import os
import re
import resource
import subprocess
import sys
import time

import pytest

from shared_math.train_config import REPO_ROOT

NOTEBOOK_DIR = REPO_ROOT / "notebooks"
NOTEBOOKS = sorted(NOTEBOOK_DIR.glob("[0-9]*.py"))
# what each notebook imports beyond the core dependencies
NEEDS = {"01_quickstart": ("torch", "transformers", "peft"), "02_cross_framework": ("torch", "jax", "flax"),
         "03_ablation_sweep": ("torch",), "04_expert_block": ("torch", "jax", "flax")}
HEADER = "# ---\n# jupyter:\n#   jupytext:\n#     formats: py:percent\n"

# Runs the notebook as a script, recording how many figures are open at each plt.show() (then closing them, as the
# inline backend does once it has displayed them).
_RUNNER = """
import runpy, sys
import matplotlib
matplotlib.use("Agg")
import matplotlib.pyplot as plt
shown = []
def show(*args, **kwargs):
    shown.append(len(plt.get_fignums()))
    plt.close("all")
plt.show = show
runpy.run_path(sys.argv[1], run_name="__main__")
print("FIGURES_SHOWN", shown)
"""


def test_the_notebook_set():
    assert [p.stem for p in NOTEBOOKS] == list(NEEDS)
    readme = (REPO_ROOT / "README.md").read_text()
    for nb in NOTEBOOKS:
        assert f"notebooks/{nb.name}" in readme, f"README.md does not link {nb.name}"


@pytest.mark.parametrize("nb", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_is_a_percent_format_notebook(nb):
    text = nb.read_text()
    assert text.startswith(HEADER) and "format_name: percent" in text.split("# ---", 2)[1]
    cells = re.split(r"^# %%", text, flags=re.M)[1:]
    markdown = [c for c in cells if c.startswith(" [markdown]")]
    code = [c for c in cells if not c.startswith(" [markdown]")]
    assert markdown and code and cells[0].startswith(" [markdown]")  # it opens with its explanation
    for c in markdown:  # a markdown cell is comment lines only (jupytext would turn anything else into code)
        assert all(line.startswith("#") for line in c.splitlines()[1:] if line.strip()), c[:200]


@pytest.mark.parametrize("nb", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_runs_and_shows_its_figures(nb, tmp_path):
    missing = [m for m in NEEDS[nb.stem] if importlib.util.find_spec(m) is None]
    if missing:
        pytest.skip(f"{nb.name} needs {', '.join(missing)} (pip install -e '.[dev]')")
    env = {**os.environ, "MPLBACKEND": "Agg", "SPLITMOE_NOTEBOOK_OUT": str(tmp_path),
           "PYTHONPATH": os.pathsep.join([str(REPO_ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])}
    env.pop("SPLITMOE_PROGRESS", None)
    t0, cpu0 = time.perf_counter(), _children_cpu()
    # the timeout only stops a hung notebook: on the 2-core CI machine each takes 20-40 s (README)
    proc = subprocess.run([sys.executable, "-c", _RUNNER, str(nb)], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=600)
    seconds, cpu = time.perf_counter() - t0, _children_cpu() - cpu0
    assert proc.returncode == 0, f"{nb.name} failed after {seconds:.0f}s:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    shown = ast.literal_eval(proc.stdout.rsplit("FIGURES_SHOWN", 1)[1].strip())  # the runner's list of counts
    expected = len(re.findall(r"^plt\.show\(\)", nb.read_text(), flags=re.M))
    assert len(shown) == expected and all(n >= 1 for n in shown), (
        f"{nb.name}: plt.show() ran {len(shown)} times of {expected}, with {shown} figures open")
    print(f"{nb.name}: {seconds:.1f}s wall, {cpu:.1f}s CPU, {len(shown)} figures")


def _children_cpu() -> float:
    """CPU seconds (user + system) of this process's finished children: a notebook's cost whatever else shares the
    machine, unlike its wall time."""
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime
