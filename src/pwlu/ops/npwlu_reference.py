"""Non-uniform PWLU (SPEC section 9): argument checks, the breakpoints, and the plain-PyTorch
reference :func:`npwlu_reference` (ground truth for every N-PWLU backend).

N-PWLU is PWLU with learnable interval widths: width logits ``theta`` (``N`` per layer or per
channel) give relative widths ``softmax(theta)`` and breakpoints cumulated from ``B_L``;
``theta = 0`` is the uniform PWLU with the same parameters.

Degenerate intervals. The definition is exact, with two floors, both documented here:

* the range ``B_R - B_L`` is raised to :data:`pwlu.MIN_WIDTH` (the right boundary moves, as
  for PWLU, so ``theta = 0`` stays PWLU in every case);
* an interval whose width ``w_j = b_{j+1} - b_j`` (of the breakpoints as rounded in the compute
  dtype) is below :data:`MIN_INTERVAL_WIDTH` is divided by :data:`MIN_INTERVAL_WIDTH` instead
  (``t = (x - b_j) / MIN_INTERVAL_WIDTH``, slope ``(Y[j+1] - Y[j]) / MIN_INTERVAL_WIDTH``):
  the forward stays finite, and only such an interval (which holds almost no inputs: none
  at all when its rounded width is 0) loses continuity at its right end. Above the floor,
  values and gradients are exactly those of SPEC section 9.
"""

from __future__ import annotations

import math
import weakref

import torch
from torch import Tensor, nn

from . import validation
from .folding import compute_dtype, effective_bounds
from .reference import _channel_view, _OuterTerm
from .validation import _readable, check_params

#: Interval widths below this are divided by it instead (see the module docstring): the
#: floor that keeps the forward finite when learned widths collapse.
MIN_INTERVAL_WIDTH = 1e-6

#: The seven tensors of an N-PWLU call after ``x``, in argument order.
NPWLU_PARAMETER_NAMES = ("points", "width_logits", "left_bound", "right_bound", "left_slope", "right_slope")


def check_npwlu_params(
    x: Tensor,
    points: Tensor,
    width_logits: Tensor,
    left_bound: Tensor,
    right_bound: Tensor,
    left_slope: Tensor,
    right_slope: Tensor,
    channel_dim: int,
) -> int | None:
    """Validate an N-PWLU call (the PWLU checks, then ``width_logits``); return the normalised
    channel axis (``None`` layer-wise). Errors name the offending value."""
    try:
        cd = check_params(x, points, left_bound, right_bound, left_slope, right_slope, channel_dim)
    except (TypeError, ValueError) as error:  # the same checks, named for this op
        message = str(error)
        if message.startswith("pwlu:"):
            message = "npwlu:" + message[len("pwlu:") :]
        raise type(error)(message) from None
    theta = width_logits
    if not isinstance(theta, Tensor):
        raise TypeError(f"npwlu: expected width_logits to be a torch.Tensor, but got {type(theta).__name__}")
    if not theta.is_floating_point():
        raise TypeError(f"npwlu: expected width_logits to be floating point, but got dtype {theta.dtype}")
    if theta.device != x.device:
        raise ValueError(f"npwlu: width_logits is on {theta.device} but x is on {x.device}")
    expected = (*points.shape[:-1], points.shape[-1] - 1)
    if tuple(theta.shape) != expected:
        mode = "layer-wise" if points.dim() == 1 else "channel-wise"
        raise ValueError(
            f"npwlu: width_logits must have shape {expected} (one logit per interval, {mode}: points has "
            f"shape {tuple(points.shape)}, so N={points.shape[-1] - 1}), but got shape {tuple(theta.shape)}"
        )
    dtype = compute_dtype(x.dtype)
    _check_logits_finite(theta, dtype)
    _check_fold(dtype, (points, theta, left_bound, right_bound, left_slope, right_slope))
    return cd


#: ``id(width_logits) -> (version, data pointer)`` of ``nn.Parameter`` logits that passed the
#: finiteness check (read again only after a change, as :func:`pwlu.ops.validation.check_finite`).
_CHECKED_LOGITS: dict[int, tuple[int, int]] = {}


def _check_logits_finite(theta: Tensor, dtype: torch.dtype) -> None:
    if torch.compiler.is_compiling():
        return
    if not _readable((theta,)):
        return
    key = id(theta)
    seen = _CHECKED_LOGITS.get(key)
    if seen is not None and seen == (theta._version, theta.data_ptr(), dtype):
        return
    with torch.no_grad():
        logits = theta.detach()
        bad = ~torch.isfinite(logits.to(dtype))
        if bool(bad.any()):
            index = tuple(torch.nonzero(bad)[0].tolist())
            value = logits[index].item()
            if math.isfinite(value):
                raise ValueError(
                    f"npwlu: width_logits holds {value!r} at index {index}, which overflows "
                    f"{str(dtype).replace('torch.', '')} (the compute dtype of this input); the width logits "
                    "must be finite in it"
                )
            raise ValueError(
                f"npwlu: width_logits holds {value!r} at index {index} ({int(bad.sum())} non-finite value(s) in "
                "all); the width logits must be finite"
            )
    if type(theta) is nn.Parameter and validation.cacheable((theta,)):
        if key not in _CHECKED_LOGITS:
            weakref.finalize(theta, _CHECKED_LOGITS.pop, key, None)
        _CHECKED_LOGITS[key] = (theta._version, theta.data_ptr(), dtype)


def _check_fold(dtype: torch.dtype, params: tuple[Tensor, ...]) -> None:
    """Reject finite parameters whose N-PWLU fold overflows ``dtype`` (an interval may be as narrow
    as :data:`MIN_INTERVAL_WIDTH`, so its slope ``(Y[j+1] - Y[j]) / w_j`` can overflow where
    PWLU's uniform intervals, which :func:`check_params` bounds, do not): the fast paths would
    return ``inf * 0 = NaN`` from finite input. One read bounds it (the largest magnitude M of the
    points, bounds and range: slopes at most 2 M / MIN_INTERVAL_WIDTH, intercepts at most M plus
    a slope times M); only past that bound are the tables folded and read. Cached as
    :func:`pwlu.ops.validation.check_finite` (``nn.Parameter`` sets, by version)."""
    if torch.compiler.is_compiling() or not _readable(params) or params[0].numel() == 0:
        return
    key = ("npwlu fold", *map(id, params))
    state = validation._CHECKED.get(key)
    if state is not None and state == (dtype, *map(validation._version, params), *map(validation._data_ptr, params)):
        return
    points, theta, left, right, k_left, k_right = params
    summary = validation.native_summary(
        dtype, (points, left, right), ((1, 2),), validation._pwlu_library(), "pwlu_param_summary_f32"
    )
    with torch.no_grad():
        if summary is None:
            pts, lo, hi = (p.detach().to(dtype) for p in (points, left, right))
            flat = torch.cat([pts.reshape(-1), lo.reshape(-1), hi.reshape(-1), (hi - lo).reshape(-1)])
            summary = (True, flat.abs().amax().item(), 0.0)
        big = summary[1]
        steepest = 2 * big / MIN_INTERVAL_WIDTH
        if big + steepest * big >= torch.finfo(dtype).max:
            from .npwlu_folding import npwlu_channel_form, npwlu_fold_tables  # here: it imports this module

            form = npwlu_channel_form(*(p.detach() for p in params), dtype)
            channels = form[0].shape[0]
            form = (*form[:2], *(p.expand(channels) for p in form[2:]))
            slopes, intercepts, b = npwlu_fold_tables(*form)[:3]
            bad = ~(torch.isfinite(slopes[:, 1:-1]) & torch.isfinite(intercepts[:, 1:-1]))
            if bool(bad.any()):
                channel, interval = torch.nonzero(bad)[0].tolist()
                where = f" of channel {channel}" if channels > 1 else ""
                pts = form[0][channel]
                width = (b[channel, interval + 1] - b[channel, interval]).item()
                raise ValueError(
                    f"npwlu: the points{where} (largest {pts.abs().max().item():.6g}, rise "
                    f"{(pts[interval + 1] - pts[interval]).item():.6g} over interval {interval} of width {width:.6g}, "
                    f"floored at {MIN_INTERVAL_WIDTH:g}) give slopes or intercepts that overflow "
                    f"{str(dtype).replace('torch.', '')} (the compute dtype of this input); scale the points down "
                    "or keep the intervals wider (width_logits)"
                )
    if all(type(p) is nn.Parameter for p in params):
        validation._remember(key, params, dtype)


def npwlu_breakpoints(width_logits: Tensor, left_bound: Tensor, right_bound: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """The breakpoints of SPEC section 9, differentiable.

    Args:
        width_logits (Tensor[..., N]): ``theta``.
        left_bound, right_bound (Tensor[...]): ``B_L`` and ``B_R`` (same leading shape).

    Returns:
        ``(breakpoints, widths, fractions)``: ``breakpoints`` ``Tensor[..., N+1]`` with
        ``b_0 = B_L`` and ``b_N`` the effective right boundary (``B_R`` bit for bit unless the
        range is below :data:`pwlu.MIN_WIDTH`), ``widths`` ``Tensor[..., N]`` the floored
        divisors ``max(b_{j+1} - b_j, MIN_INTERVAL_WIDTH)``, ``fractions`` ``Tensor[..., N-1]``
        the interior ``c_j``.
    """
    n = width_logits.shape[-1]
    right_eff, range_width, _ = effective_bounds(left_bound, right_bound, n)
    omega = torch.softmax(width_logits, dim=-1)
    fractions = torch.cumsum(omega[..., :-1], dim=-1)  # c_1 .. c_{N-1}
    inner = left_bound.unsqueeze(-1) + range_width.unsqueeze(-1) * fractions
    breakpoints = torch.cat([left_bound.unsqueeze(-1), inner, right_eff.unsqueeze(-1)], -1)
    raw = breakpoints[..., 1:] - breakpoints[..., :-1]
    # not `raw >= ...`: NaN widths stay NaN (NaN out), they are not floored to valid ones
    widths = torch.where(raw < MIN_INTERVAL_WIDTH, torch.full_like(raw, MIN_INTERVAL_WIDTH), raw)
    return breakpoints, widths, fractions


def npwlu_reference(
    x: Tensor,
    points: Tensor,
    width_logits: Tensor,
    left_bound: Tensor,
    right_bound: Tensor,
    left_slope: Tensor,
    right_slope: Tensor,
    channel_dim: int = 1,
) -> Tensor:
    """Non-uniform Piecewise Linear Unit, reference implementation (plain differentiable torch).

    SPEC section 9 (PWLU: https://arxiv.org/abs/2104.03693; the non-uniform extension is the
    authors' N-PWLU). With ``omega = softmax(theta)``, ``c_j = omega_0 + ... + omega_{j-1}`` and
    breakpoints ``b_0 = B_L``, ``b_j = B_L + (B_R - B_L) c_j``, ``b_N = B_R``::

        x <  B_L:            Y[0] + (x - B_L) * K_L
        b_j <= x < b_{j+1}:  (1 - t) * Y[j] + t * Y[j+1],   t = (x - b_j) / (b_{j+1} - b_j)
        x >= B_R:            Y[N] + (x - B_R) * K_R

    Intervals are closed on the left. ``theta = 0`` is :func:`pwlu.pwlu_reference` (up to
    rounding). Floors: the range is raised to :data:`pwlu.MIN_WIDTH` as for PWLU, and an
    interval narrower than :data:`MIN_INTERVAL_WIDTH` is divided by it (module docstring of
    :mod:`pwlu.ops.npwlu_reference`). ±inf inputs map to the function's limits; NaN to NaN.

    Args:
        x (Tensor[...]): input of any floating dtype (float16/bfloat16 compute in float32).
        points (Tensor[N+1] or Tensor[C, N+1]): ``Y_P``, the values at the breakpoints.
        width_logits (Tensor[N] or Tensor[C, N]): ``theta``; zeros give uniform intervals.
        left_bound, right_bound (Tensor[] or Tensor[C]): ``B_L`` and ``B_R``.
        left_slope, right_slope (Tensor[] or Tensor[C]): ``K_L`` and ``K_R``.
        channel_dim (int): axis of x holding the ``C`` channels (channel-wise only).

    Returns:
        Tensor: same shape and dtype as x.
    """
    cd = check_npwlu_params(x, points, width_logits, left_bound, right_bound, left_slope, right_slope, channel_dim)
    out_dtype = x.dtype
    dt = compute_dtype(x.dtype)
    xc = x.to(dt)
    pts, theta, bl, br, kl, kr = (
        p.to(dt) for p in (points, width_logits, left_bound, right_bound, left_slope, right_slope)
    )
    n = pts.shape[-1] - 1
    b, w, _ = npwlu_breakpoints(theta, bl, br)
    view = lambda p: _channel_view(p, x.dim(), cd)  # noqa: E731
    bl_v, kl_v, kr_v = (view(p) for p in (bl, kl, kr))
    br_v = view(b[..., n])  # the effective right boundary

    is_left = xc < bl_v
    is_right = xc >= br_v
    # unselected pieces see the left boundary, never ±inf (see pwlu_reference)
    x_inner = torch.where(is_left | is_right, bl_v, xc)
    nan_one = x_inner.detach() * 0 + 1  # NaN for a NaN input: its parameter gradients are NaN
    # interval index: how many interior breakpoints b_1 .. b_{N-1} are <= x (NaN: interval 0)
    with torch.no_grad():
        j = torch.zeros_like(x_inner, dtype=torch.long)
        for k in range(1, n):
            j = j + (x_inner >= view(b[..., k])).long()
    if cd is None:
        b_lo, w_j, y_lo, y_hi = b[j], w[j], pts[j], pts[j + 1]
    else:
        channel = torch.arange(pts.shape[0], device=x.device)
        chan = _channel_view(channel, x.dim(), cd)
        b_lo = b.reshape(-1)[chan * (n + 1) + j]
        w_j = w.reshape(-1)[chan * n + j]
        y_lo = pts.reshape(-1)[chan * (n + 1) + j]
        y_hi = pts.reshape(-1)[chan * (n + 1) + j + 1]
    t = (x_inner - b_lo * nan_one) / w_j
    inner = (1 - t) * y_lo + t * y_hi

    def outer(selected: Tensor, y_edge: Tensor, bound: Tensor, slope: Tensor) -> Tensor:
        return y_edge + _OuterTerm.apply(slope, torch.where(selected, xc, bound) - bound)

    y0 = view(pts[..., 0])
    yn = view(pts[..., n])
    out = torch.where(
        is_left, outer(is_left, y0, bl_v, kl_v), torch.where(is_right, outer(is_right, yn, br_v, kr_v), inner)
    )
    return out.to(out_dtype)
