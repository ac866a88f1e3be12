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
