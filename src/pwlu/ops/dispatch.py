"""The one place that chooses which backend computes an op.

``auto`` (the default) picks Triton for CUDA tensors and the compiled CPU kernel for CPU
tensors, each when available, and the vectorised-torch backend otherwise. The choice can
be forced globally with the ``PWLU_BACKEND`` environment variable (``auto``, ``torch``,
``cpu``, ``triton`` or ``reference``) or locally with the :func:`use_backend` context
manager. ``reference`` makes :func:`pwlu.pwlu` call :func:`pwlu.pwlu_reference`, for
debugging.

The setting is shared by every op. Each op has a :class:`BackendTable` that maps the backend
names to the modules implementing it and caches the choice per device type; a backend
module declares its implementation as one object (``BACKEND``) that satisfies the op's
typed Protocol (:class:`PWLUBackend` for PWLU). A new op writes its own Protocol and table
and reuses the rest.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import os
import threading
from collections.abc import Callable, Iterator
from typing import Generic, Protocol, TypeVar, runtime_checkable

import torch
from torch import Tensor

BACKENDS = ("auto", "torch", "cpu", "triton", "reference")


def _check_name(name: str, source: str) -> str:
    if name not in BACKENDS:
        raise ValueError(f"unknown PWLU backend {name!r} from {source}; expected one of {BACKENDS}")
    return name


_backend = _check_name(os.environ.get("PWLU_BACKEND", "auto"), "the PWLU_BACKEND environment variable")


#: Per-thread setting of a running backward (:func:`backward_setting`), over the global one.
_local = threading.local()


def get_backend_name() -> str:
    """The backend setting in force (``auto`` unless forced)."""
    setting = getattr(_local, "setting", None)
    return _backend if setting is None else setting


@contextlib.contextmanager
def backward_setting(name: str) -> Iterator[None]:
    """The setting ``name`` for this thread only, while a backward runs under its forward's setting
    (autograd may run backwards on several threads at once: the global one is not written)."""
    previous = getattr(_local, "setting", None)
    _local.setting = name
    try:
        yield
    finally:
        _local.setting = previous


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Force a backend inside a ``with`` block, e.g. ``with pwlu.use_backend("reference"):``."""
    global _backend
    previous, _backend = _backend, _check_name(name, "use_backend()")
    try:
        yield
    finally:
        _backend = previous


@runtime_checkable
class Backend(Protocol):
    """What every backend of every op declares."""

    name: str

    def is_available(self, device: torch.device) -> bool: ...


B = TypeVar("B", bound=Backend)

#: Every table, so that :func:`forget_selection` reaches them all.
_TABLES: list[BackendTable] = []


class BackendTable(Generic[B]):
    """The backends of one op: ``{"torch": module path, "cpu": ..., "triton": ...}``; each module
    has a ``BACKEND`` attribute (the implementation, of the op's Protocol type). A backend whose
    module cannot be imported (no triton installed) is unavailable."""

    def __init__(self, op: str, modules: dict[str, str]) -> None:
        if "torch" not in modules:
            raise ValueError(f"{op}: the torch backend is the fallback and must exist")
        self.op = op
        self.modules = dict(modules)
        self._selected: dict[tuple[str, str], B] = {}
        _TABLES.append(self)

    @functools.cache  # noqa: B019 - tables live as long as the process
    def load(self, name: str) -> B | None:
        """The implementation of backend ``name``, or ``None`` if its module cannot be imported."""
        try:
            module = importlib.import_module(self.modules[name])
        except ImportError:
            return None
        return module.BACKEND

    def is_available(self, name: str, device: torch.device) -> bool:
        """Whether backend ``name`` can run this op on ``device`` here."""
        if name == "reference":
            return True
        if name not in self.modules:
            return False
        backend = self.load(name)
        return backend is not None and bool(backend.is_available(device))

    def forget(self) -> None:
        self._selected.clear()

    def select(self, device: torch.device) -> B:
        """The backend that computes this op on ``device`` under the current setting (the torch
        backend stands in for ``reference``, whose routing is the caller's)."""
        key = (get_backend_name(), device.type)
        backend = self._selected.get(key)
        if backend is None:
            backend = self._selected[key] = self._select(device)
        return backend

    def _select(self, device: torch.device) -> B:
        name = get_backend_name()
        if name == "auto":
            preferred = "triton" if device.type == "cuda" else "cpu"
            name = preferred if self.is_available(preferred, device) else "torch"
        elif name == "reference":
            name = "torch"
        elif not self.is_available(name, device):
            raise RuntimeError(f"{self.op} backend {name!r} was forced but is not available for {device} tensors")
        backend = self.load(name)
        assert backend is not None, f"{self.op}: backend {name!r} vanished after its availability check"
        return backend


def forget_selection() -> None:
    """Drop every table's cached choices (after a backend's availability changed, e.g. a failed build)."""
    for table in _TABLES:
        table.forget()


# ----------------------------------------------------------------------------------- PWLU

#: ``(points, left_bound, right_bound, left_slope, right_slope)``
Params = tuple[Tensor, Tensor, Tensor, Tensor, Tensor]


@runtime_checkable
class PWLUBackend(Backend, Protocol):
    """A PWLU backend. The semantics are those of the torch backend (``torch_backend.py``).

    Required, on the folded tables of :func:`pwlu.ops.fold_tables` (channel form, compute
    dtype, ``C = 1`` and ``channel_dim = None`` layer-wise):

    * ``forward(x, slopes, intercepts, left, right, inv_d, channel_dim, shift) -> y``
    * ``backward(grad, x, slopes, left, right, inv_d, channel_dim) -> (dx, hist)``, ``hist``
      a ``Tensor[C, N+2, 2]`` of per-region ``sum(g)`` and ``sum(g * r)``.

    Optional entry points, declared (``None`` where a backend has none):

    * ``fold(points, left_bound, right_bound, left_slope, right_slope) -> tables``: the
      backend's own (non-differentiable) :func:`~pwlu.ops.fold_tables`;
    * ``forward_from_params(x, *params, channel_dim) -> y | None`` and
      ``backward_from_params(grad, x, *params, channel_dim) -> (dx, param_grads) | None``:
      fold and compute in one native call (``None``: not applicable to this call);
    * ``make_plan(x, params, channel_dim) -> plan | None``: a gradient-free forward prepared
      for repeated calls with these parameters and this input geometry (validated arguments,
      ``channel_dim`` normalised), kept and looked up by :mod:`pwlu.ops.plans`.
    """

    forward: Callable[..., Tensor]
    backward: Callable[..., tuple[Tensor, Tensor]]
    fold: Callable[..., tuple[Tensor, ...]] | None
    forward_from_params: Callable[..., Tensor | None] | None
    backward_from_params: Callable[..., tuple[Tensor, tuple[Tensor, ...]] | None] | None
    make_plan: Callable[..., Callable[[Tensor], Tensor | None] | None] | None


PWLU_BACKENDS: BackendTable[PWLUBackend] = BackendTable(
    "PWLU",
    {"torch": "pwlu.ops.torch_backend", "cpu": "pwlu.ops.cpu", "triton": "pwlu.ops.triton_backend"},
)


def is_available(name: str, device: torch.device) -> bool:
    """Whether PWLU backend ``name`` can run on ``device`` here."""
    return PWLU_BACKENDS.is_available(name, device)


def select(device: torch.device) -> PWLUBackend:
    """The PWLU backend for ``device`` under the current setting (never ``reference``)."""
    return PWLU_BACKENDS.select(device)


# ----------------------------------------------------------------------------- 2-D PWLU


@runtime_checkable
class PWLU2DBackend(Backend, Protocol):
    """A 2-D PWLU backend (SPEC section 10); semantics of ``pwlu2d_torch_backend.py``, on the
    packed per-channel ``values Tensor[C, N+1, N+1]`` and ``geometry Tensor[C, 10]`` of
    :func:`pwlu.ops.pwlu2d_grads.pwlu2d_geometry` (compute dtype, ``C = 1`` and
    ``channel_dim = None`` layer-wise):

    * ``forward(x, y, values, geometry, channel_dim) -> z``
    * ``backward(grad, x, y, values, geometry, channel_dim) -> (dx, dy, hist, sums)``, with
      ``hist Tensor[C, N, N, 2, 3]`` and ``sums Tensor[C, 12]`` as in :mod:`pwlu.ops.pwlu2d_grads`;
    * ``make_plan(x, y, params, channel_dim) -> plan | None`` (``None`` where a backend has
      none): a gradient-free forward prepared for repeated calls, as PWLU's, called as
      ``plan(x, y)`` and kept by :mod:`pwlu.ops.plans` (``y`` one of the key's inputs).
    """

    forward: Callable[..., Tensor]
    backward: Callable[..., tuple[Tensor, Tensor, Tensor, Tensor]]
    make_plan: Callable[..., Callable[[Tensor, Tensor], Tensor | None] | None] | None


PWLU2D_BACKENDS: BackendTable[PWLU2DBackend] = BackendTable(
    "PWLU2D",
    {
        "torch": "pwlu.ops.pwlu2d_torch_backend",
        "cpu": "pwlu.ops.pwlu2d_cpu_backend",
        "triton": "pwlu.ops.pwlu2d_triton_backend",
    },
)
