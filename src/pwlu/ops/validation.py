"""Argument checks for the functional API: errors at the edge, naming the offending value."""

from __future__ import annotations

from torch import Tensor

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
    """Validate shapes; return the normalised channel axis (``None`` for layer-wise)."""
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
            f"pwlu: points must hold N+1 >= 2 values (N >= 1 intervals), but got "
            f"shape {tuple(points.shape)}"
        )
    expected = () if points.dim() == 1 else (points.shape[0],)
    for name, p in zip(_PARAM_NAMES, params):
        if tuple(p.shape) != expected:
            mode = "layer-wise" if points.dim() == 1 else "channel-wise"
            raise ValueError(
                f"pwlu: inconsistent parameter shapes: points has shape {tuple(points.shape)} "
                f"({mode}), so {name} must have shape {expected}, but got {tuple(p.shape)}"
            )
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
