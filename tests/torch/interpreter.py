"""The Triton interpreter for the CPU kernel tests: it is fixed when triton and a module's kernels are first imported
(`@triton.jit` reads TRITON_INTERPRET at decoration), so a test module calls `import_interpreted` at collection,
before anything imports triton compiled (torch.compile and opcheck do)."""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys


def import_interpreted(*modules: str) -> str | None:
    """Import triton and `modules` (the kernel modules a test file runs) with the Triton interpreter on, while this
    process still allows it. None when they run interpreted here, else why not: triton is absent, CUDA is present (the
    kernels are tested compiled there), or triton was imported compiled first. TRITON_INTERPRET is restored after,
    so it is set again around the tests that need it only."""
    if importlib.util.find_spec("triton") is None:
        return "triton is not installed"
    import torch

    if torch.cuda.is_available():
        return "CUDA is present: the kernels are tested compiled"
    old = os.environ.get("TRITON_INTERPRET")
    if "triton" not in sys.modules:
        os.environ["TRITON_INTERPRET"] = "1"
    try:
        import triton.language as tl

        if type(tl.sigmoid).__name__ != "InterpretedFunction":
            return "triton was imported compiled before this module (a fresh interpreter process runs these tests)"
        os.environ["TRITON_INTERPRET"] = "1"  # the kernels are decorated by these imports
        for name in modules:
            importlib.import_module(name)
    finally:
        if old is None:
            os.environ.pop("TRITON_INTERPRET", None)
        else:
            os.environ["TRITON_INTERPRET"] = old
    return None
