"""The N-PWLU backends: their typed Protocol and :class:`~pwlu.ops.dispatch.BackendTable`.

The setting (``auto``, ``torch``, ``cpu``, ``triton``, ``reference``; :func:`pwlu.use_backend`,
``PWLU_BACKEND``) is the one of :mod:`pwlu.ops.dispatch`, shared with PWLU.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol, runtime_checkable

from torch import Tensor

from .dispatch import Backend, BackendTable


@runtime_checkable
class NPWLUBackend(Backend, Protocol):
    """An N-PWLU backend. The semantics are those of ``npwlu_torch_backend.py``; the tables are
    those of :func:`pwlu.ops.npwlu_folding.npwlu_fold_tables` (channel form, compute dtype,
    ``C = 1`` and ``channel_dim = None`` layer-wise):

    * ``forward(x, slopes, intercepts, breakpoints, shift, channel_dim) -> y``
    * ``backward(grad, x, slopes, breakpoints, inv_widths, channel_dim) -> (dx, hist)``, ``hist``
      a ``Tensor[C, N+2, 2]`` of per-region ``sum(g)`` and ``sum(g * r)``;
    * ``make_plan(x, params, channel_dim) -> plan | None`` (``None`` where a backend has none):
      a gradient-free forward prepared for repeated calls, as PWLU's (:mod:`pwlu.ops.plans`);
    * optionally ``forward_from_params(x, *params, channel_dim) -> y | None`` and
      ``backward_from_params(grad, x, *params, channel_dim) -> (dx, grads) | None``: the folding
      (and the gradient epilogue) in native code around the kernels, from the six parameters
      (``None``: use the tables path). The CPU backend has them.
    """

    forward: Callable[..., Tensor]
    backward: Callable[..., tuple[Tensor, Tensor]]
    make_plan: Callable[..., Callable[[Tensor], Tensor | None] | None] | None


NPWLU_BACKENDS: BackendTable[NPWLUBackend] = BackendTable(
    "NPWLU",
    {
        "torch": "pwlu.ops.npwlu_torch_backend",
        "cpu": "pwlu.ops.npwlu_cpu_backend",
        "triton": "pwlu.ops.npwlu_triton_backend",
    },
)
