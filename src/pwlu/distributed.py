"""PWLU parameters under FSDP2 (``torch.distributed.fsdp.fully_shard``) and DDP.

FSDP2 stores every parameter as a ``DTensor`` sharded on dim 0 between forward passes. The
library's code that reads or writes PWLU parameters outside a forward pass (realignment,
``fix_init``, ``reset_parameters``, the boundary IOU) goes through the two helpers here:

* :func:`full` -- the whole value of a parameter as a plain tensor (an all-gather for a
  ``DTensor``, so every rank must call it, in the same order; the tensor itself otherwise).
* :func:`assign_` -- write a whole value (identical on every rank) into a parameter: into the
  local shard of a ``DTensor`` (no communication), in place otherwise.

FSDP2 cannot shard 0-d parameters, which a layer-wise PWLU has (``left_bound``, ...);
:func:`prepare_fully_shard` gives them shape ``(1,)`` before ``fully_shard`` is applied (the
module reshapes them back for the op; state dicts of either shape load into either).

Running statistics (buffers, which FSDP2 does not shard) are merged across ranks in the
forward pass by :mod:`pwlu.running_stats`, under FSDP2 as under DDP.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

__all__ = ["assign_", "full", "is_dtensor", "prepare_fully_shard"]

try:  # torch.distributed may be built without DTensor support
    from torch.distributed.tensor import DTensor, distribute_tensor
except ImportError:  # pragma: no cover
    DTensor = None  # type: ignore[assignment,misc]
    distribute_tensor = None  # type: ignore[assignment]

#: the four per-channel (or, layer-wise, scalar) parameters; ``points`` has a trailing N+1 axis
SCALAR_NAMES = ("left_bound", "right_bound", "left_slope", "right_slope")


def is_dtensor(t: Any) -> bool:
    """Whether ``t`` is a ``torch.distributed.tensor.DTensor`` (e.g. a parameter sharded by FSDP2)."""
    return DTensor is not None and isinstance(t, DTensor)


def full(t: Tensor) -> Tensor:
    """The whole value of ``t`` as a plain tensor, detached.

    Args:
        t (Tensor): a tensor or a ``DTensor`` (any placement).

    Returns:
        Tensor: ``t``'s global shape. For a ``DTensor`` this is a collective (every rank of its
        mesh must call it, in the same order); otherwise ``t.detach()`` itself, no copy.
    """
    if is_dtensor(t):
        return t.detach().full_tensor()
    return t.detach()


@torch.no_grad()
def assign_(param: Tensor, value: Tensor | float) -> None:
    """Write ``value`` into ``param`` in place, whatever its placement.

    Args:
        param (Tensor): a tensor or parameter, or a ``DTensor`` one (FSDP2-sharded or replicated).
        value (Tensor or float): the whole new value, identical on every rank; broadcast to
            ``param``'s global shape, or reshaped to it when it has as many elements
            (``()`` and ``(1,)`` alike). Cast to ``param``'s dtype.

    For a ``DTensor`` each rank copies its own part of ``value`` into its local shard (no
    communication), so ``value`` must be the same on every rank.
    """
    device = param.device if not is_dtensor(param) else param.to_local().device
    value = torch.as_tensor(value).detach().to(device=device, dtype=param.dtype)
    shape = param.shape
    value = value.reshape(shape) if value.numel() == param.numel() else value.expand(shape)
    if is_dtensor(param):
        part = distribute_tensor(value, param.device_mesh, param.placements, src_data_rank=None)
        param.to_local().copy_(part.to_local())
    else:
        param.copy_(value)


def prepare_fully_shard(model: nn.Module) -> list[str]:
    """Make every layer-wise PWLU, N-PWLU and 2-D PWLU in ``model`` shardable by FSDP2; call
    before ``fully_shard``.

    ``fully_shard`` refuses 0-d parameters. This gives the scalar parameters of each layer-wise
    module (a PWLU's or N-PWLU's four bounds and slopes, a :class:`~pwlu.PWLU2D`'s eight) shape
    ``(1,)`` (same values, same ``requires_grad``); the module reshapes them back to scalars for
    the op, so the function and its gradients are unchanged. Channel-wise modules need nothing.
    Call it before creating the optimizer (the parameters are new tensors). Idempotent.

    Args:
        model (nn.Module): a model containing PWLU (or PWLU2D) modules, or one such module.

    Returns:
        list[str]: the names of the modules whose parameters were reshaped.
    """
    from .merge import PWLU2D_PARAMETER_NAMES, merge_modules  # (these import this module)
    from .realign import check_materialised, pwlu_modules

    modules = pwlu_modules(model) + merge_modules(model)
    check_materialised(modules, "prepare_fully_shard")
    for name, module in modules:
        if any(is_dtensor(p) for p in module.parameters(recurse=False)):
            raise ValueError(
                f"prepare_fully_shard: {type(module).__name__} {name or '<model>'!r} is already sharded; call "
                "pwlu.prepare_fully_shard(model) before fully_shard"
            )
    done = []
    for name, module in modules:
        names = SCALAR_NAMES if hasattr(module, "points") else PWLU2D_PARAMETER_NAMES[1:]
        if module._parameters[names[0]].dim() != 0:  # channel-wise, or prepared already
            continue
        for pname in names:
            p = module._parameters[pname]
            module._parameters[pname] = nn.Parameter(p.detach().reshape(1), requires_grad=p.requires_grad)
        done.append(name)
    return done


def op_params(params: tuple[Tensor, ...], layer_wise: bool, tensors: int = 1) -> tuple[Tensor, ...]:
    """The parameters in the op's shapes: a layer-wise module prepared for FSDP2 holds
    ``(1,)``-shaped scalars, which go to the op as 0-d views. The first ``tensors`` parameters
    (``points``; ``points, width_logits``; ``values``) are never scalars."""
    if layer_wise and params[tensors].dim() == 1:
        return (*params[:tensors], *(p.reshape(()) for p in params[tensors:]))
    return params
