"""jax_impl on several devices (jax_impl/parallel.py): the sharded train step equals one device's, a resumed sharded
run equals an uninterrupted one, a checkpoint written by 4 devices restores on 1 and 2, bad layouts are refused.

jax fixes its device count when it starts and this process started it with one CPU device, so the multi-device
checks run in ONE subprocess with `XLA_FLAGS=--xla_force_host_platform_device_count=4` (tests/jax/parallel_checks.py,
which reports numbers; the assertions are here). It also sets `--xla_backend_optimization_level=0`: LLVM's
optimisation of the CPU code was half of the compile time, and both sides of every comparison run under the same
flags. ~30 s of CPU in all (2-core machine).

Tolerances (shared_math.numerics, fp32): a sharded step computes the same terms as one device, summed in another
order (each device's partial sums, then the all-reduce of the gradients and of the loss's token counts; XLA's SPMD
splits of the dense matmuls), so the fp32 sum-order entries apply: `loss` (1e-6 of the value) and `lora_grad` (5e-5
of max|grad|) for the model, `moe_block` / `moe_grad` for the MoE layer alone. Measured: <= 1e-6 relative.
Where the order is the same (a resumed run against an uninterrupted one on the same mesh, a restored state against
the saved one) the values must be equal bit for bit.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

jax = pytest.importorskip("jax")
pytest.importorskip("flax")
pytest.importorskip("orbax.checkpoint")

from jax.sharding import PartitionSpec as P  # noqa: E402

from shared_math.numerics import tolerance  # noqa: E402
from shared_math.train_config import ConfigError  # noqa: E402
from tests.jax.parallel_checks import FOUR, LAYOUTS, UNREACHABLE  # noqa: E402
from tests.shared.train_suite import tiny_cfg  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
LAYOUT_NAMES = ["single"] + [" ".join(extra) for extra, _ in LAYOUTS]


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> dict:
    """Run tests/jax/parallel_checks.py once on 4 CPU host devices; its results.json."""
    root = tmp_path_factory.mktemp("parallel")
    env = dict(os.environ)
    flags = [f for f in env.get("XLA_FLAGS", "").split() if "xla_force_host_platform_device_count" not in f]
    env["XLA_FLAGS"] = " ".join(flags + ["--xla_force_host_platform_device_count=4",
                                         "--xla_backend_optimization_level=0"])
    env["JAX_PLATFORMS"] = "cpu"  # host devices, also on a GPU machine
    for var in ("SPLITMOE_MOE_BACKEND", "SPLITMOE_PALLAS_INTERPRET"):  # auto = ragged_dot on CPU: fast to compile
        env.pop(var, None)
    proc = subprocess.run([sys.executable, "-m", "tests.jax.parallel_checks", str(root)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, f"parallel_checks failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    out = json.loads((root / "results.json").read_text())
    assert out["devices"] == 4
    return out


def _within(diff: list[float], quantity: str, what: str) -> None:
    """diff = [max|actual - expected|, max|expected|] within the fp32 `quantity` tolerance (norm-wise)."""
    tol = tolerance("float32", quantity)
    bound = tol.atol + tol.rtol * diff[1]
    assert diff[0] <= bound, f"{what}: max|diff| {diff[0]:.3e} > {bound:.3e} ({quantity}: {tol.why})"


@pytest.mark.parametrize("layout", ["data=1,fsdp=1,expert=4", "data=2,fsdp=1,expert=2",
                                    "data=2,fsdp=2,expert=1 chunk=3"])
def test_moe_layer_under_shard_map_equals_one_device(results, layout):
    """The MoE layer alone, T not a multiple of the devices, an expert rank with no token and idle experts next to
    busy ones: value and every gradient (x, routing weights, both LoRA pairs); without an expert axis also with
    each device's tokens in chunks of 3 (`tiled_experts`)."""
    got = results[f"moe_block {layout}"]
    _within(got["loss"], "moe_block", f"{layout} value")
    for name, diff in got.items():
        if name != "loss":
            _within(diff, "moe_grad", f"{layout} {name}")


@pytest.mark.parametrize("layout", LAYOUT_NAMES[1:])
def test_sharded_step_equals_one_device(results, layout):
    """Loss and every LoRA gradient of one micro-batch, on 2 devices (fsdp=2, expert=2, data=2) and 4 (fsdp=2 with
    expert=2), against one device, from the same state."""
    ref, got = results["single"], results[layout]
    tol = tolerance("float32", "loss")
    assert abs(got["loss"] - ref["loss"]) <= tol.atol + tol.rtol * abs(ref["loss"]), (got["loss"], ref["loss"])
    assert set(got["grads"]) == set(ref["grads"]) and len(got["grads"]) == 12  # 4 attention + 2 expert pairs
    for name, diff in got["grads"].items():
        _within(diff, "lora_grad", f"{layout} {name}")
    n = 4 if layout == " ".join(FOUR) else 2
    assert got["devices"] == list(range(n))


@pytest.mark.parametrize("layout", LAYOUT_NAMES[1:])
def test_lora_and_adamw_state_are_sharded_as_the_rule_says(results, layout):
    """Expert LoRA factors over `expert` on E and over `fsdp` on their largest other axis; attention LoRA over
    `fsdp`; AdamW's moments exactly as their factor (the test reads back each array's actual sharding)."""
    specs = results[layout]["specs"]
    fsdp = "fsdp=2" in layout
    # A [E, H, R]: E is always over "expert" (an axis of size 1 splits nothing)
    want_expert = str(P("expert", "fsdp" if fsdp else None, None))
    want_attn = str(P("fsdp" if fsdp else None, None))  # A [H, R]
    assert len(specs) == 6, specs
    for path, spec in specs.items():
        assert spec == (want_expert if "experts" in path else want_attn), (path, spec)


def test_an_expert_that_gets_no_token(results):
    """The model's unreachable experts (router bias) really got no token: their LoRA gradients are exactly zero
    (and the sharded layouts, compared above, agree, including the expert rank that received nothing)."""
    assert results["unreachable_grad_max"] == {f"{layer}/{e}": 0.0 for layer, es in UNREACHABLE.items() for e in es}


def test_resumed_sharded_run_equals_uninterrupted(results):
    """`splitmoe train --framework jax parallel.fsdp=2 parallel.expert=2` for 3 steps, and the same run stopped
    after 2 and resumed: the same losses and gradient norms bit for bit (same mesh, same programs)."""
    cli, resumed = results["cli"], results["resume"]
    assert cli["rc"] == 0 and cli["adapter"] and len(cli["losses"]) == 3 and all(np.isfinite(cli["losses"]))
    assert (resumed["start"], resumed["end"]) == (2, 3)
    assert resumed["losses"] == cli["losses"] and resumed["grad_norms"] == cli["grad_norms"]


@pytest.mark.parametrize("layout", LAYOUT_NAMES)
def test_checkpoint_of_4_devices_restores_on_any_layout(results, layout):
    """The 4-device run's step-2 checkpoint restored with 1 device and with each 2-device layout (and 4): every
    LoRA and AdamW array equal to what the 4 devices held."""
    got = results[layout]
    assert got["restored_names_equal"] and got["restored_max_abs_diff"] == 0.0


def test_uneven_experts_refused_before_loading(results):
    got = results["uneven_experts"]
    assert got["weights_loaded"] == 0
    assert "parallel.expert=3 does not divide the 8 routed experts" in got["error"]
    assert "expert sizes that divide 8: 1, 2, 4, 8" in got["error"]


def test_layout_that_does_not_match_the_devices_refused(results):
    got = results["device_mismatch"]
    assert got["weights_loaded"] == 0
    assert "needs 2 devices, but 4 cpu device(s) are visible" in got["error"]
    assert "XLA_FLAGS=--xla_force_host_platform_device_count=2" in got["error"]


# ---- in this process (one device is enough) -----------------------------------------------------------------------

def test_layout_larger_than_the_visible_devices_refused_before_any_work(tmp_path):
    from jax_impl.train import Trainer

    n = jax.device_count()
    cfg = tiny_cfg(tmp_path, "jax", f"data.batch_size={4 * (n + 1)}", f"parallel.data={n + 1}")
    with pytest.raises(ConfigError, match=rf"needs {n + 1} devices, but {n} .*device\(s\) are visible to jax"):
        Trainer(cfg)
    assert not (tmp_path / "model").exists()  # refused before the checkpoint was even built


def test_param_spec_rule():
    from jax_impl.parallel import param_spec

    assert param_spec((8, 64, 32), 2, expert_axis=True) == P("expert", "fsdp", None)  # E, then the largest axis
    assert param_spec((8, 4, 64), 2, expert_axis=True) == P("expert", None, "fsdp")  # LoRA B [E, R, out]
    assert param_spec((8, 4, 64), 1, expert_axis=True) == P("expert", None, None)
    assert param_spec((64, 4), 2) == P("fsdp", None) and param_spec((4, 32), 4) == P(None, "fsdp")
    assert param_spec((6, 6), 4) == P(None, None)  # nothing divides: replicated over fsdp
    assert param_spec((), 2) == P()
