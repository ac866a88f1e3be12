"""Test-session set-up.

Triton fixes its interpreter mode when ``triton`` is first imported. On a machine without
CUDA, switch the interpreter on before any test module imports it, so every Triton kernel
test runs here (on the CPU) case by case; on a GPU machine the kernels run natively.
"""

from __future__ import annotations

import os

if "TRITON_INTERPRET" not in os.environ:
    import torch

    if not torch.cuda.is_available():
        os.environ["TRITON_INTERPRET"] = "1"


import pytest  # noqa: E402


@pytest.fixture(autouse=True)
def _seed_torch():
    """Every test starts from the same global RNG state, so a run is reproducible (tests that
    sweep randomness draw from their own seeded generators)."""
    import torch

    torch.manual_seed(0)


@pytest.fixture
def one_thread():
    """torch on one thread during the test (the conversion tests share a small CPU), restored after.
    Use with ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def fresh_build(tmp_path, monkeypatch):
    """A fresh CPU-kernel cache directory and no loaded library; restores the real one afterwards."""
    from pwlu.ops.cpu import build as cpu_build

    monkeypatch.setenv("PWLU_CPU_BUILD_DIR", str(tmp_path))
    cpu_build._reset_for_tests()
    yield tmp_path
    monkeypatch.undo()
    cpu_build._reset_for_tests()
