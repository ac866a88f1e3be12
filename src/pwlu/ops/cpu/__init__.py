"""The compiled CPU backend of PWLU: ``build`` (compiler, cache, loading), ``backend`` (kernel
calls), ``plan`` (inference plans), declared here as :data:`BACKEND`."""

from __future__ import annotations

import torch

from . import backend as _kernels
from . import plan as _plans


class CPUBackend:
    """The C/AVX-512 PWLU backend (:class:`pwlu.ops.dispatch.PWLUBackend`)."""

    name = "cpu"
    forward = staticmethod(_kernels.forward)
    backward = staticmethod(_kernels.backward)
    fold = staticmethod(_kernels.fold_tables)
    forward_from_params = staticmethod(_kernels.forward_from_params)
    backward_from_params = staticmethod(_kernels.backward_from_params)
    make_plan = staticmethod(_plans.make_plan)

    @staticmethod
    def is_available(device: torch.device) -> bool:
        return _kernels.is_available(device)


BACKEND = CPUBackend()
