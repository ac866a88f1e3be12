"""Argument checks for the functional API: errors at the edge, naming the offending value."""

from __future__ import annotations

import ctypes
import math
import operator
import threading
import weakref

import torch
from torch import Tensor, nn
from torch._C import _functorch

from .folding import MIN_WIDTH, fold_tables

_PARAM_NAMES = ("left_bound", "right_bound", "left_slope", "right_slope")
PARAMETER_NAMES = ("points",) + _PARAM_NAMES  #: the five parameters, in argument order


def _bad_param(name: str, p, device) -> None:
    if not isinstance(p, Tensor):
        raise TypeError(f"pwlu: expected {name} to be a torch.Tensor, but got {type(p).__name__}")
    if not p.is_floating_point():
        raise TypeError(f"pwlu: expected {name} to be floating point, but got dtype {p.dtype}")
    raise ValueError(f"pwlu: {name} is on {p.device} but x is on {device}")


def check_input(x: Tensor) -> None:
    if not isinstance(x, Tensor):
        raise TypeError(f"pwlu: expected x to be a torch.Tensor, but got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(
            f"pwlu: expected a floating-point input (float16, bfloat16, float32 or float64), "
            f"but got x.dtype={x.dtype}; convert integer or bool tensors with x.float()"
        )


def normalize_channel_dim(channel_dim: int, ndim: int) -> int:
    if isinstance(channel_dim, bool) or not isinstance(channel_dim, int):
        raise TypeError(f"pwlu: channel_dim must be an int, but got {channel_dim!r}")
    if not -ndim <= channel_dim < ndim:
        raise ValueError(
            f"pwlu: channel_dim={channel_dim} is out of range for an input with {ndim} "
            f"dimensions (expected {-ndim} <= channel_dim < {ndim})"
        )
    return channel_dim % ndim


def check_params(
    x: Tensor,
    points: Tensor,
    left_bound: Tensor,
    right_bound: Tensor,
    left_slope: Tensor,
    right_slope: Tensor,
    channel_dim: int,
) -> int | None:
    """Validate types, devices, shapes and finite parameters (:func:`check_finite`); return
    the normalised channel axis (``None`` for layer-wise)."""
    check_input(x)
    params = (left_bound, right_bound, left_slope, right_slope)
    device = x.device
    for name, p in zip(PARAMETER_NAMES, (points,) + params):
        if not (isinstance(p, Tensor) and p.is_floating_point() and p.device == device):
            _bad_param(name, p, device)
    if points.dim() not in (1, 2):
        raise ValueError(
            f"pwlu: points must have shape (N+1,) (layer-wise) or (C, N+1) (channel-wise), "
            f"but got shape {tuple(points.shape)}"
        )
    if points.shape[-1] < 2:
        raise ValueError(
            f"pwlu: points must hold N+1 >= 2 values (N >= 1 intervals), but got shape {tuple(points.shape)}"
        )
    expected = () if points.dim() == 1 else (points.shape[0],)
    for name, p in zip(_PARAM_NAMES, params):
        if tuple(p.shape) != expected:
            mode = "layer-wise" if points.dim() == 1 else "channel-wise"
            raise ValueError(
                f"pwlu: inconsistent parameter shapes: points has shape {tuple(points.shape)} "
                f"({mode}), so {name} must have shape {expected}, but got {tuple(p.shape)}"
            )
    check_finite(x, points, *params)
    if points.dim() == 1:
        return None
    if x.dim() == 0:
        raise ValueError("pwlu: channel-wise parameters need an input with a channel axis, got a 0-d x")
    cd = normalize_channel_dim(channel_dim, x.dim())
    if x.shape[cd] != points.shape[0]:
        raise ValueError(
            f"pwlu: input has {x.shape[cd]} channels on axis {channel_dim} (shape "
            f"{tuple(x.shape)}), but the parameters have num_channels={points.shape[0]}"
        )
    return cd


# ----------------------------------------------------------------------------------------
# finite parameters


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


_version = operator.attrgetter("_version")
_data_ptr = Tensor.data_ptr
#: ``ids of the five parameters -> (compute dtype, their versions, their data pointers)`` for
#: ``nn.Parameter`` sets that passed :func:`check_finite`. An entry goes as soon as any of
#: its tensors is freed, so an id in a key is never one of a newer tensor.
_CHECKED: dict[tuple[int, ...], tuple] = {}
_lock = threading.RLock()


def check_finite(x: Tensor, *params: Tensor) -> None:
    """Reject parameters that are not finite in the compute dtype of ``x``, or whose range
    ``B_R - B_L`` overflows it: a PWLU with such parameters has no well-defined function (an
    infinite interval length, ``inf - inf`` intercepts), so every backend and the reference
    raise the same ``ValueError``, naming the parameter, instead of returning NaN.

    ``params`` are ``(points, left_bound, right_bound, left_slope, right_slope)``. Reading the
    values needs the host (a device synchronisation on CUDA), so a set of ``nn.Parameter``
    tensors that passed is remembered with the tensors' version counters and data pointers,
    and read again only after it changed (an optimizer step, ``load_state_dict``, an in-place
    write, a new ``.data``; not a write *through* ``.data``, which bumps no version counter).
    Skipped where values cannot be read: meta and fake tensors, tensor subclasses,
    ``torch.compile``/``torch.export`` tracing, ``torch.func`` transforms, CUDA graph capture.
    """
    if torch.compiler.is_compiling():
        return
    key = tuple(map(id, params))
    state = _CHECKED.get(key)  # only plain nn.Parameter sets are kept: their data pointers exist
    if state is not None and state == (x.dtype, *map(_version, params), *map(_data_ptr, params)):
        return
    if not _readable(params):
        return
    _check_values(_compute_dtype(x.dtype), params)
    if all(type(p) is nn.Parameter for p in params):
        _remember(key, params, x.dtype)


def _readable(params: tuple[Tensor, ...]) -> bool:
    if _functorch.maybe_current_level() is not None:
        return False
    for p in params:
        if type(p) not in (Tensor, nn.Parameter) or p.is_meta or _functorch.is_functorch_wrapped_tensor(p):
            return False
    if params[0].is_cuda and torch.cuda.is_current_stream_capturing():
        return False
    return True


def plain_f32_cpu(params: tuple[Tensor, ...]) -> bool:
    """Whether every tensor of ``params`` is a plain (not a subclass: no DTensor, no fake tensor),
    dense, contiguous float32 CPU tensor: what the compiled helpers read through ``data_ptr``."""
    return all(
        type(p) in (Tensor, nn.Parameter) and p.dtype == torch.float32 and p.is_cpu and p.is_contiguous()
        for p in params
    )


def native_summary(
    dtype: torch.dtype, params: tuple[Tensor, ...], pairs: tuple[tuple[int, int], ...], library, name: str
) -> tuple[bool, float, float] | None:
    """``(all finite, largest magnitude, smallest width floored at MIN_WIDTH)`` of ``params`` and
    of the widths ``params[hi] - params[lo]`` of ``pairs``, in one call of ``library``'s ``name``
    (``param_summary_f32`` in ``csrc/pwlu_common.h``): what :func:`_check_values` reads with some
    fifteen small torch ops, after every optimizer step. ``None`` where it does not apply (a compute
    dtype other than float32, parameters not plain dense float32 CPU tensors, a pair of unequal
    lengths, the library not loaded): the caller computes the same in torch."""
    if dtype != torch.float32 or library is None or not plain_f32_cpu(params):
        return None
    if any(params[lo].numel() != params[hi].numel() for lo, hi in pairs):
        return None
    count = len(params)
    out = (ctypes.c_float * 3)()
    getattr(library, name)(
        (ctypes.c_void_p * count)(*(p.data_ptr() for p in params)),
        (ctypes.c_int64 * count)(*(p.numel() for p in params)),
        count,
        (ctypes.c_int * (2 * len(pairs)))(*(i for pair in pairs for i in pair)),
        len(pairs),
        MIN_WIDTH,
        out,
    )
    return bool(out[0]), float(out[1]), float(out[2])


def _pwlu_library():
    from .cpu.build import PWLU_CPU  # here: the build module imports this package

    return PWLU_CPU.loaded()  # never a build here: the backend's selection builds it


def _check_values(dtype: torch.dtype, params: tuple[Tensor, ...]) -> None:
    if params[0].numel() == 0:  # no channels: nothing to fold
        return
    n = params[0].shape[-1] - 1
    summary = native_summary(dtype, params, ((1, 2),), _pwlu_library(), "pwlu_param_summary_f32")
    if summary is not None and _fold_fits(dtype, n, *summary):
        return
    with torch.no_grad():
        values = [p.detach().to(dtype) for p in params]
        left, right = values[1], values[2]
        width = right - left
        flat = torch.cat([v.reshape(-1) for v in values] + [width.reshape(-1)])
        points = values[0].reshape(-1, values[0].shape[-1])
        # Finite parameters whose fold overflows would give inf * 0 = NaN from finite input. One
        # read gives: all finite, the largest magnitude M, the smallest width w as the fold floors
        # it. The fold's slopes are at most 2 M N / w and its intercepts at most M (1 + 2 N + M)
        # (a width is at most M): below the dtype's largest value nothing can overflow, the case
        # of every sane PWLU; else the exact fold below decides.
        if summary is None:
            stacked = torch.stack(
                [torch.isfinite(flat).all().to(dtype), flat.abs().amax(), width.clamp(min=MIN_WIDTH).amin()]
            )
            if _fold_fits(dtype, n, *stacked.tolist()):
                return
        for name, original, v in zip(PARAMETER_NAMES, params, values):
            bad = ~torch.isfinite(v)
            if bool(bad.any()):
                index = tuple(torch.nonzero(bad)[0].tolist())
                value = original.detach()[index].item()
                where = f" at index {index}" if index else ""
                if math.isfinite(value):
                    raise ValueError(
                        f"pwlu: {name} holds {value!r}{where}, which overflows {str(dtype).replace('torch.', '')} "
                        "(the compute dtype of this input); PWLU parameters must be finite in it"
                    )
                raise ValueError(
                    f"pwlu: {name} holds {value!r}{where} ({int(bad.sum())} non-finite value(s) in all); "
                    "PWLU parameters must be finite (an infinite or NaN boundary, slope or breakpoint value "
                    "defines no function)"
                )
        dtype_name = str(dtype).replace("torch.", "")
        if not bool(torch.isfinite(width).all()):
            index = tuple(torch.nonzero(~torch.isfinite(width))[0].tolist())
            where = f" at index {index}" if index else ""
            raise ValueError(
                f"pwlu: the range right_bound - left_bound = {right[index].item()!r} - {left[index].item()!r}{where} "
                f"overflows {dtype_name} (the compute dtype of this input); keep the boundaries within half the "
                "dtype's largest value"
            )
        # the bound above is loose: fold exactly (the tables every backend computes) and name the
        # piece that overflows, an interval (the points) or an outer piece (its slope over the range)
        channels = points.shape[0]
        rest = [v.reshape(-1).expand(channels) for v in values[1:]]
        slopes, intercepts = fold_tables(points, *rest)[:2]
        bad = ~(torch.isfinite(slopes) & torch.isfinite(intercepts))
        if not bool(bad.any()):
            return
        channel, region = torch.nonzero(bad)[0].tolist()
        where = f" of channel {channel}" if channels > 1 else ""
        floored = max(rest[1][channel].item() - rest[0][channel].item(), MIN_WIDTH)
        if 1 <= region <= n:
            rise = (points[channel, 1:] - points[channel, :-1]).abs().max().item()
            raise ValueError(
                f"pwlu: the points{where} (largest {points[channel].abs().max().item():.6g}, steepest rise "
                f"{rise:.6g} over an interval of {floored / n:.6g}) give slopes or intercepts that overflow "
                f"{dtype_name} (the compute dtype of this input); scale the points down or widen the range"
            )
        side = "left" if region == 0 else "right"
        slope = rest[2 if side == "left" else 3][channel].item()
        raise ValueError(
            f"pwlu: {side}_slope{where} = {slope:.6g} over the range [{rest[0][channel].item():.6g}, "
            f"{rest[1][channel].item():.6g}] gives outer-piece intercepts that overflow {dtype_name} (the "
            f"compute dtype of this input); reduce {side}_slope or narrow the range"
        )


def _fold_fits(dtype: torch.dtype, n: int, finite: float, big: float, w: float) -> bool:
    """Whether parameters of this summary fold without overflow (see :func:`_check_values`)."""
    return bool(finite) and max(2 * big * n / w, big * (1 + 2 * n + big)) < torch.finfo(dtype).max


def cacheable(params: tuple[Tensor, ...]) -> bool:
    """Whether a check of ``params`` can be remembered by version counter: not for inference
    tensors (made under ``torch.inference_mode()``), which keep none; those are checked on every call."""
    return not any(p.is_inference() for p in params)


def _remember(key: tuple[int, ...], params: tuple[Tensor, ...], dtype: torch.dtype) -> None:
    if not cacheable(params):
        return
    state = (dtype, *map(_version, params), *map(_data_ptr, params))
    with _lock:
        fresh = key not in _CHECKED
        _CHECKED[key] = state
    if fresh:
        for p in params:
            weakref.finalize(p, _forget, key)


def _forget(key: tuple[int, ...]) -> None:
    with _lock:
        _CHECKED.pop(key, None)
