"""The one place that chooses which backend computes PWLU.

``auto`` (the default) picks Triton for CUDA tensors and the compiled CPU kernel for CPU
tensors, each when available, and the vectorised-torch backend otherwise. The choice can
be forced globally with the ``PWLU_BACKEND`` environment variable (``auto``, ``torch``,
``cpu``, ``triton`` or ``reference``) or locally with the :func:`use_backend` context
manager. ``reference`` makes :func:`pwlu.pwlu` call :func:`pwlu.pwlu_reference`, for
debugging.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import os
from collections.abc import Iterator
from types import ModuleType

import torch

BACKENDS = ("auto", "torch", "cpu", "triton", "reference")
_MODULES = {
    "torch": "pwlu.ops.torch_backend",
    "cpu": "pwlu.ops.cpu.backend",
    "triton": "pwlu.ops.triton_backend",
}


def _check_name(name: str, source: str) -> str:
    if name not in BACKENDS:
        raise ValueError(f"unknown PWLU backend {name!r} from {source}; expected one of {BACKENDS}")
    return name


_backend = _check_name(os.environ.get("PWLU_BACKEND", "auto"), "the PWLU_BACKEND environment variable")


def get_backend_name() -> str:
    """The backend setting in force (``auto`` unless forced)."""
    return _backend


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Force a backend inside a ``with`` block, e.g. ``with pwlu.use_backend("reference"):``."""
    global _backend
    previous, _backend = _backend, _check_name(name, "use_backend()")
    try:
        yield
    finally:
        _backend = previous


@functools.cache
def _load(name: str) -> ModuleType | None:
    try:
        module = importlib.import_module(_MODULES[name])
    except ImportError:
        return None
    return module


def is_available(name: str, device: torch.device) -> bool:
    """Whether backend ``name`` can run on ``device`` here."""
    if name == "reference":
        return True
    module = _load(name)
    if module is None:
        return False
    check = getattr(module, "is_available", None)
    return True if check is None else bool(check(device))


#: ``(setting, device type) -> backend module``; cleared by :func:`forget_selection`.
_selected: dict[tuple[str, str], ModuleType] = {}


def forget_selection() -> None:
    """Drop the cached choices (after a backend's availability changed, e.g. a failed build)."""
    _selected.clear()


def select(device: torch.device) -> ModuleType:
    """The backend module that computes a PWLU on ``device`` (never ``reference``)."""
    key = (_backend, device.type)
    module = _selected.get(key)
    if module is None:
        module = _selected[key] = _select(device)
    return module


def _select(device: torch.device) -> ModuleType:
    name = _backend
    if name == "auto":
        preferred = "triton" if device.type == "cuda" else "cpu"
        name = preferred if is_available(preferred, device) else "torch"
    elif name == "reference":
        name = "torch"
    elif not is_available(name, device):
        raise RuntimeError(f"PWLU backend {name!r} was forced but is not available for {device} tensors")
    module = _load(name)
    assert module is not None
    return module
