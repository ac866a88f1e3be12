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
