"""2-D PWLU (SPEC section 10): argument checks and the plain-PyTorch reference.

``z = F(clamp(x), clamp(y)) + K_XL min(x - X_L, 0) + K_XR max(x - X_R, 0)
+ K_YL min(y - Y_L, 0) + K_YR max(y - Y_R, 0)``, with ``F`` linear on the two triangles of
every cell of an ``N x N`` grid (split along the diagonal from ``(i, j)`` to ``(i+1, j+1)``).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from . import validation
from .folding import compute_dtype, effective_bounds
from .reference import _OuterTerm
from .validation import check_input, normalize_channel_dim

#: the nine parameters, in argument order
PWLU2D_PARAMETER_NAMES = (
    "values",
    "x_left_bound",
    "x_right_bound",
    "y_left_bound",
    "y_right_bound",
    "x_left_slope",
    "x_right_slope",
    "y_left_slope",
    "y_right_slope",
)


def check_pwlu2d_params(x: Tensor, y: Tensor, *params: Tensor, channel_dim: int) -> int | None:
    """Validate the inputs and the nine parameters (types, devices, shapes, finite values);
    return the normalised channel axis (``None`` for layer-wise parameters)."""
    check_input(x)
    if not isinstance(y, Tensor):
        raise TypeError(f"pwlu2d: expected y to be a torch.Tensor, but got {type(y).__name__}")
    if tuple(y.shape) != tuple(x.shape):
        raise ValueError(
            f"pwlu2d: x and y must have the same shape, but got x.shape={tuple(x.shape)} and y.shape={tuple(y.shape)}"
        )
    if y.dtype != x.dtype:
        raise TypeError(f"pwlu2d: x and y must have the same dtype, but got x.dtype={x.dtype} and y.dtype={y.dtype}")
    if y.device != x.device:
        raise ValueError(f"pwlu2d: y is on {y.device} but x is on {x.device}")
    if len(params) != 9:
        raise TypeError(
            f"pwlu2d: expected 9 parameter tensors ({', '.join(PWLU2D_PARAMETER_NAMES)}), got {len(params)}"
        )
    device = x.device
    for name, p in zip(PWLU2D_PARAMETER_NAMES, params):
        if not isinstance(p, Tensor):
            raise TypeError(f"pwlu2d: expected {name} to be a torch.Tensor, but got {type(p).__name__}")
        if not p.is_floating_point():
            raise TypeError(f"pwlu2d: expected {name} to be floating point, but got dtype {p.dtype}")
        if p.device != device:
            raise ValueError(f"pwlu2d: {name} is on {p.device} but x is on {device}")
    values = params[0]
    if values.dim() not in (2, 3) or values.shape[-1] != values.shape[-2] or values.shape[-1] < 2:
        raise ValueError(
            "pwlu2d: values must have shape (N+1, N+1) (layer-wise) or (C, N+1, N+1) (channel-wise) "
            f"with N >= 1, but got shape {tuple(values.shape)}"
        )
    expected = () if values.dim() == 2 else (values.shape[0],)
    for name, p in zip(PWLU2D_PARAMETER_NAMES[1:], params[1:]):
        if tuple(p.shape) != expected:
            mode = "layer-wise" if values.dim() == 2 else "channel-wise"
            raise ValueError(
                f"pwlu2d: inconsistent parameter shapes: values has shape {tuple(values.shape)} ({mode}), "
                f"so {name} must have shape {expected}, but got {tuple(p.shape)}"
            )
    check_pwlu2d_finite(x, params)
    if values.dim() == 2:
        return None
    if x.dim() == 0:
        raise ValueError("pwlu2d: channel-wise parameters need inputs with a channel axis, got 0-d x and y")
    cd = normalize_channel_dim(channel_dim, x.dim())
    if x.shape[cd] != values.shape[0]:
        raise ValueError(
            f"pwlu2d: x and y have {x.shape[cd]} channels on axis {channel_dim} (shape {tuple(x.shape)}), "
            f"but the parameters have num_channels={values.shape[0]}"
        )
    return cd


def check_pwlu2d_finite(x: Tensor, params: tuple[Tensor, ...]) -> None:
    """:func:`pwlu.ops.validation.check_finite` for the nine parameters (and both ranges),
    sharing its cache of ``nn.Parameter`` sets that passed."""
    if torch.compiler.is_compiling():
        return
    key = tuple(map(id, params))
    state = validation._CHECKED.get(key)
    if state is not None and state == (x.dtype, *(p._version for p in params), *(p.data_ptr() for p in params)):
        return
    if not validation._readable(params):
        return
    _check_values(compute_dtype(x.dtype), params)
    if all(type(p) is nn.Parameter for p in params):
        validation._remember(key, params, x.dtype)


def _pwlu2d_library():
    from .pwlu2d_cpu_backend import PWLU2D_CPU  # here: that module imports this package's others

    return PWLU2D_CPU.loaded()  # never a build here: the backend's selection builds it


def _check_values(dtype: torch.dtype, params: tuple[Tensor, ...]) -> None:
    pairs = ((1, 2), (3, 4))  # the x and the y range
    summary = validation.native_summary(dtype, params, pairs, _pwlu2d_library(), "pwlu2d_param_summary_f32")
    # the kernels' tables hold differences of neighbouring vertex values (at most 2 M for values
    # of magnitude M): below half the dtype's largest value nothing overflows
    if summary is not None and summary[0] and 2 * summary[1] < torch.finfo(dtype).max:
        return
    with torch.no_grad():
        values = [p.detach().to(dtype) for p in params]
        widths = (("x", values[2] - values[1], 1, 2), ("y", values[4] - values[3], 3, 4))
        flat = torch.cat([v.reshape(-1) for v in values] + [w.reshape(-1) for _, w, _, _ in widths])
        short = str(dtype).replace("torch.", "")
        if bool(torch.isfinite(flat).all()):
            _check_differences(values[0], short)
            return
        for name, original, v in zip(PWLU2D_PARAMETER_NAMES, params, values):
            bad = ~torch.isfinite(v)
            if bool(bad.any()):
                index = tuple(torch.nonzero(bad)[0].tolist())
                value = original.detach()[index].item()
                where = f" at index {index}" if index else ""
                if math.isfinite(value):
                    raise ValueError(
                        f"pwlu2d: {name} holds {value!r}{where}, which overflows {short} (the compute dtype "
                        "of this input); 2-D PWLU parameters must be finite in it"
                    )
                raise ValueError(
                    f"pwlu2d: {name} holds {value!r}{where} ({int(bad.sum())} non-finite value(s) in all); "
                    "2-D PWLU parameters must be finite (an infinite or NaN bound, slope or vertex value "
                    "defines no function)"
                )
        for axis, width, lo, hi in widths:
            bad = ~torch.isfinite(width)
            if bool(bad.any()):
                index = tuple(torch.nonzero(bad)[0].tolist())
                where = f" at index {index}" if index else ""
                raise ValueError(
                    f"pwlu2d: the range {axis}_right_bound - {axis}_left_bound = {values[hi][index].item()!r} - "
                    f"{values[lo][index].item()!r}{where} overflows {short} (the compute dtype of this input); "
                    "keep the bounds within half the dtype's largest value"
                )


def _check_differences(values: Tensor, short: str) -> None:
    """Reject finite vertex values whose differences along a cell's edges or diagonal (the kernels'
    tables, SPEC section 10's triangles) overflow the compute dtype: the fast paths would return
    NaN or inf from finite inputs inside the grid."""
    v = values.reshape(-1, values.shape[-2], values.shape[-1])
    corner = v[:, :-1, :-1]
    for name, (di, dj), other in (
        ("x", (1, 0), v[:, 1:, :-1]),
        ("y", (0, 1), v[:, :-1, 1:]),
        ("diagonal", (1, 1), v[:, 1:, 1:]),
    ):
        bad = ~torch.isfinite(other - corner)
        if bool(bad.any()):
            c, i, j = torch.nonzero(bad)[0].tolist()
            where = f" of channel {c}" if values.dim() == 3 else ""
            raise ValueError(
                f"pwlu2d: values{where} hold {v[c, i, j].item():.6g} at vertex ({i}, {j}) and "
                f"{v[c, i + di, j + dj].item():.6g} at its {name} neighbour ({i + di}, {j + dj}), whose difference "
                f"overflows {short} (the compute dtype of this input); keep the vertex values within half the "
                "dtype's largest value"
            )


def _channel_view(p: Tensor, ndim: int, channel_dim: int | None) -> Tensor:
    """A ``Tensor[C]`` (or scalar) viewed to broadcast against an ``ndim``-D input."""
    if channel_dim is None:
        return p
    shape = [1] * ndim
    shape[channel_dim] = p.shape[0]
    return p.reshape(shape)


def _axis(a: Tensor, left: Tensor, right: Tensor, n: int, view):
    """Per element of one input: ``(u, index, frac, is_left, is_right, right_eff)`` with
    ``u`` the grid coordinate of the clamped input (``N`` right of the range), ``index =
    clamp(floor(u), 0, N-1)`` (0 for NaN) and ``frac = u - index`` in ``[0, 1]``."""
    right_eff, _, inv_d = effective_bounds(left, right, n)
    lo, hi, inv = view(left), view(right_eff), view(inv_d)
    is_left = a < lo
    is_right = a >= hi
    inner = torch.where(is_left | is_right, lo, a)
    # nan_one is 1, or NaN for a NaN input (whose parameter gradients are NaN, as in the kernels)
    nan_one = inner.detach() * 0 + 1
    u = (inner - lo * nan_one) * inv
    u = torch.where(is_right, torch.full_like(u, float(n)), u)  # clamped to X_R: u = N exactly
    index = torch.nan_to_num(torch.floor(u.detach()), nan=0.0).clamp(0, n - 1)
    return u - index, index.long(), is_left, is_right, lo, hi


def pwlu2d_reference(
    x: Tensor,
    y: Tensor,
    values: Tensor,
    x_left_bound: Tensor,
    x_right_bound: Tensor,
    y_left_bound: Tensor,
    y_right_bound: Tensor,
    x_left_slope: Tensor,
    x_right_slope: Tensor,
    y_left_slope: Tensor,
    y_right_slope: Tensor,
    channel_dim: int = 1,
) -> Tensor:
    """2-D Piecewise Linear Unit ``z = F(x, y)``, reference implementation (plain torch ops).

    The learnable merge of two branches (SPEC section 10; PWLU: https://arxiv.org/abs/2104.03693).
    With ``N`` intervals per axis, ``x̄ = clamp(x, X_L, X_R)``, ``u = (x̄ - X_L) N / (X_R - X_L)``,
    ``i = min(floor(u), N-1)``, ``s = u - i`` (likewise ``v``, ``j``, ``t`` for ``y``)::

        s >= t:  F = V[i,j] + s (V[i+1,j] - V[i,j]) + t (V[i+1,j+1] - V[i+1,j])
        s <  t:  F = V[i,j] + t (V[i,j+1] - V[i,j]) + s (V[i+1,j+1] - V[i,j+1])
        z = F + K_XL min(x - X_L, 0) + K_XR max(x - X_R, 0) + K_YL min(y - Y_L, 0) + K_YR max(y - Y_R, 0)

    Conventions (as :func:`pwlu.pwlu_reference`): cells are closed on the left; ``x = X_R``
    belongs to the right outer region (its ``dz/dx`` is ``K_XR``); a width below
    :data:`pwlu.MIN_WIDTH` is raised to it (the right bound moves). ±inf inputs map to the
    function's limits, NaN in either input gives NaN. With ``V[i, j] = X_i + Y_j`` and all
    slopes 1, ``z = x + y`` up to rounding.

    Args:
        x, y (Tensor[...]): the two inputs, same shape and floating dtype (float16/bfloat16
            compute in float32).
        values (Tensor[N+1, N+1] or Tensor[C, N+1, N+1]): vertex values ``V[i, j]`` at
            ``(X_i, Y_j)``; ``i`` indexes the x axis.
        x_left_bound, x_right_bound, y_left_bound, y_right_bound (Tensor[] or Tensor[C]): the
            grid's range ``[X_L, X_R] x [Y_L, Y_R]``.
        x_left_slope, x_right_slope, y_left_slope, y_right_slope (Tensor[] or Tensor[C]): the
            outer slopes ``K_XL, K_XR, K_YL, K_YR``.
        channel_dim (int): axis of x and y holding the ``C`` channels (channel-wise only).

    Returns:
        Tensor: same shape and dtype as x.
    """
    params = (
        values,
        x_left_bound,
        x_right_bound,
        y_left_bound,
        y_right_bound,
        x_left_slope,
        x_right_slope,
        y_left_slope,
        y_right_slope,
    )
    cd = check_pwlu2d_params(x, y, *params, channel_dim=channel_dim)
    return pwlu2d_composite(x, y, *params, cd)


def pwlu2d_composite(
    x: Tensor,
    y: Tensor,
    values: Tensor,
    x_left_bound: Tensor,
    x_right_bound: Tensor,
    y_left_bound: Tensor,
    y_right_bound: Tensor,
    x_left_slope: Tensor,
    x_right_slope: Tensor,
    y_left_slope: Tensor,
    y_right_slope: Tensor,
    channel_dim: int | None,
) -> Tensor:
    """:func:`pwlu2d_reference` on validated arguments (``channel_dim`` normalised, ``None``
    layer-wise): what higher-order, forward-mode and ``torch.func`` derivatives are taken of."""
    out_dtype = x.dtype
    dt = compute_dtype(x.dtype)
    xc, yc = x.to(dt), y.to(dt)
    vals = values.to(dt)
    xl, xr, yl, yr, kxl, kxr, kyl, kyr = (
        p.to(dt)
        for p in (
            x_left_bound,
            x_right_bound,
            y_left_bound,
            y_right_bound,
            x_left_slope,
            x_right_slope,
            y_left_slope,
            y_right_slope,
        )
    )
    n = vals.shape[-1] - 1
    view = lambda p: _channel_view(p, x.dim(), channel_dim)  # noqa: E731
    s, i, x_left, x_right, xl_v, xr_v = _axis(xc, xl, xr, n, view)
    t, j, y_left, y_right, yl_v, yr_v = _axis(yc, yl, yr, n, view)
    flat = vals.reshape(-1)
    base = i * (n + 1) + j
    if channel_dim is not None:
        channel = torch.arange(vals.shape[0], device=x.device)
        base = base + _channel_view(channel, x.dim(), channel_dim) * (n + 1) ** 2
    v00, v10, v01, v11 = flat[base], flat[base + (n + 1)], flat[base + 1], flat[base + (n + 2)]
    lower = s.detach() >= t.detach()  # the triangle below the diagonal (s >= t)
    # each triangle's formula reads the coordinates only where it is the one selected (0
    # elsewhere): the other passes its vertices no 0 * NaN, so a NaN input makes NaN exactly the
    # vertex gradients whose weights involve it (the kernels' per-triangle sums); same values
    zero = torch.zeros_like(s)
    s_lo, t_lo, s_up, t_up = (torch.where(lower, s, zero), torch.where(lower, t, zero),
                              torch.where(lower, zero, s), torch.where(lower, zero, t))  # fmt: skip
    inner = torch.where(
        lower, v00 + s_lo * (v10 - v00) + t_lo * (v11 - v10), v00 + t_up * (v01 - v00) + s_up * (v11 - v01)
    )

    def outer(selected: Tensor, a: Tensor, bound: Tensor, slope: Tensor) -> Tensor:
        # K (a - B) where selected, else 0; a flat piece maps ±inf to 0 (not inf * 0 = NaN)
        return _OuterTerm.apply(view(slope), torch.where(selected, a, bound) - bound)

    z = (
        inner
        + outer(x_left, xc, xl_v, kxl)
        + outer(x_right, xc, xr_v, kxr)
        + outer(y_left, yc, yl_v, kyl)
        + outer(y_right, yc, yr_v, kyr)
    )
    return z.to(out_dtype)
