"""The :class:`PWLU2D` module: a learnable merge ``z = F(x, y)`` of two branches (SPEC section 10).

A 2-D PWLU replaces the addition where two branches meet (``out + identity`` in a residual
block): a continuous piecewise-linear surface on a triangulated ``N x N`` grid over
``[X_L, X_R] x [Y_L, Y_R]``, with four outer slopes, initialised as addition. It is called
``m(x, y)``; :func:`pwlu.convert_merges` puts one in place of every residual addition of a model.

Like :class:`pwlu.PWLU` it carries running statistics (SPEC Eq. 5), here of *both* inputs, which
:class:`pwlu.BoundaryRealigner` collects in phase I (while the merge stays addition) and uses at
the end of the warm-up to set both ranges to ``mean ± 3 std`` and ``V`` back to addition.
"""

from __future__ import annotations

import math
import types
import warnings
from collections.abc import Callable
from typing import Any, List, Optional

import torch
from torch import Tensor, nn
from torch.nn.modules.lazy import LazyModuleMixin
from torch.nn.parameter import UninitializedBuffer, UninitializedParameter

from .distributed import assign_, full, op_params
from .functional import pwlu2d
from .modules import _recomputing, check_module_args
from .ops.folding import MIN_WIDTH, effective_bounds
from .ops.pwlu2d_reference import PWLU2D_PARAMETER_NAMES, pwlu2d_reference
from .running_stats import update_running_stats

__all__ = ["INITS_2D", "LazyPWLU2D", "PWLU2D", "merge_modules", "pwlu2d_export", "realign_merges"]

#: named initial functions of two tensors (``init=`` of :class:`PWLU2D`)
INITS_2D: dict[str, Callable[[Tensor, Tensor], Tensor]] = {
    "add": torch.add,
    "max": torch.maximum,
    "mean": lambda x, y: 0.5 * (x + y),
}


def _resolve_init(init: str | Callable[[Tensor, Tensor], Tensor]) -> Callable[[Tensor, Tensor], Tensor]:
    if isinstance(init, str):
        if init in INITS_2D:
            return INITS_2D[init]
        raise ValueError(
            f"PWLU2D: unknown init {init!r}; expected one of {sorted(INITS_2D)} or a callable of two tensors"
        )
    if callable(init):
        return init
    raise TypeError(f"PWLU2D: init must be a name or a callable of two tensors, but got {type(init).__name__}")


def _outer(selected: Tensor, a: Tensor, bound: Tensor, slope: Tensor) -> Tensor:
    """``K (a - B)`` where ``selected``, else 0 (a flat piece maps ±inf to 0, not NaN)."""
    keep = selected & (slope != 0)
    return torch.where(keep, slope * (torch.where(keep, a, bound) - bound), torch.zeros_like(a))


def _view(p: Tensor, dt: torch.dtype, shape: List[int]) -> Tensor:  # noqa: UP006
    return p.to(dt).reshape(shape)


def pwlu2d_export(
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
    channel_dim: Optional[int],  # noqa: UP045 - TorchScript reads this annotation
    min_width: float = MIN_WIDTH,
) -> Tensor:
    """2-D PWLU in standard operators only: the path a :class:`PWLU2D` takes under
    ``torch.jit.script``/``trace`` and ONNX export (TorchScript-compilable; no argument checks,
    no custom op). Same values as :func:`pwlu.pwlu2d_reference` on validated arguments.

    Args:
        x, y (Tensor[...]): same shape and dtype; float16/bfloat16 compute in float32.
        values (Tensor[N+1, N+1] or Tensor[C, N+1, N+1]) and the eight ``Tensor[]`` /
            ``Tensor[C]`` bounds and slopes, as for :func:`pwlu.pwlu2d`.
        channel_dim (int, optional): normalised channel axis, ``None`` layer-wise.
        min_width (float): :data:`pwlu.MIN_WIDTH` (an argument so that TorchScript compiles this).

    Returns:
        Tensor: same shape and dtype as x.
    """
    out_dtype = x.dtype
    dt = torch.float32 if x.dtype == torch.float16 or x.dtype == torch.bfloat16 else x.dtype
    xc = x.to(dt)
    yc = y.to(dt)
    n = values.shape[-1] - 1
    shape = [1] * x.dim()
    if channel_dim is not None:
        shape[channel_dim] = values.shape[0]

    xr_eff, _, inv_x = effective_bounds(x_left_bound.to(dt), x_right_bound.to(dt), n, min_width)
    yr_eff, _, inv_y = effective_bounds(y_left_bound.to(dt), y_right_bound.to(dt), n, min_width)
    xl, xr, ix = _view(x_left_bound, dt, shape), _view(xr_eff, dt, shape), _view(inv_x, dt, shape)
    yl, yr, iy = _view(y_left_bound, dt, shape), _view(yr_eff, dt, shape), _view(inv_y, dt, shape)
    x_left, x_right = xc < xl, xc >= xr
    y_left, y_right = yc < yl, yc >= yr
    # n in tensor arithmetic only: under tracing it is a traced size, and float(n) would warn
    u = torch.where(x_right, torch.zeros_like(xc) + n, (torch.where(x_left, xl, xc) - xl) * ix)
    w = torch.where(y_right, torch.zeros_like(yc) + n, (torch.where(y_left, yl, yc) - yl) * iy)
    i = torch.clamp_max(torch.clamp_min(torch.floor(torch.nan_to_num(u, 0.0, 0.0, 0.0)), 0.0), n - 1)
    j = torch.clamp_max(torch.clamp_min(torch.floor(torch.nan_to_num(w, 0.0, 0.0, 0.0)), 0.0), n - 1)
    s = u - i
    t = w - j
    base = (i * (n + 1) + j).to(torch.long)
    if channel_dim is not None:
        channel = torch.arange(values.shape[0], device=x.device).reshape(shape)
        base = base + channel * (n + 1) * (n + 1)
    flat = values.to(dt).reshape(-1)
    v00 = flat[base]
    v10 = flat[base + (n + 1)]
    v01 = flat[base + 1]
    v11 = flat[base + (n + 2)]
    inner = torch.where(s >= t, v00 + s * (v10 - v00) + t * (v11 - v10), v00 + t * (v01 - v00) + s * (v11 - v01))
    z = (
        inner
        + _outer(x_left, xc, xl, _view(x_left_slope, dt, shape))
        + _outer(x_right, xc, xr, _view(x_right_slope, dt, shape))
        + _outer(y_left, yc, yl, _view(y_left_slope, dt, shape))
        + _outer(y_right, yc, yr, _view(y_right_slope, dt, shape))
    )
    return z.to(out_dtype)


class PWLU2D(nn.Module):
    """2-D Piecewise Linear Unit: a learnable binary operator ``z = F(x, y)`` for branch merges.

    SPEC section 10 (the journal extension of https://arxiv.org/abs/2104.03693). ``N`` uniform
    intervals per axis on learnable ranges ``[X_L, X_R]`` and ``[Y_L, Y_R]``, learnable vertex
    values ``V`` (each grid cell split into two triangles along its diagonal, ``F`` linear on
    each), clamped inputs plus four learnable outer slopes; shared by the whole layer
    (``num_channels=None``) or one set per channel. With ``init="add"`` it is ``x + y`` (up to
    rounding) everywhere, inside and outside the grid.

    Args:
        num_channels (int, optional): ``None`` for layer-wise, else the number of channels.
        num_intervals (int): ``N`` per axis (default 8: ``(N + 1)^2 = 81`` values per channel).
        channel_dim (int): channel axis of the inputs, negative allowed (1 for NCHW, -1 for
            ``(B, T, C)`` tokens). Ignored layer-wise.
        bound (float): initial ranges ``[-bound, bound]`` on both axes.
        init (str or callable): ``"add"`` (default), ``"max"``, ``"mean"``, or a callable
            ``f(x, y)`` of two tensors (elementwise, broadcasting): ``V[i, j] = f(X_i, Y_j)``, and
            each outer slope is ``f``'s partial derivative across that edge of the grid,
            averaged along it.

    Shape:
        ``x`` and ``y``: ``(*)``, the same shape, with ``num_channels`` channels on
        ``channel_dim``; output the same. Different floating dtypes are promoted as ``x + y``
        would be.

    Parameters: ``values`` (``(N+1, N+1)`` or ``(C, N+1, N+1)``; ``values[..., i, j]`` is ``F``
    at ``(X_i, Y_j)``), ``x_left_bound``, ``x_right_bound``, ``y_left_bound``, ``y_right_bound``,
    ``x_left_slope``, ``x_right_slope``, ``y_left_slope``, ``y_right_slope`` (``()`` or ``(C,)``).

    Buffers: ``x_running_mean``, ``x_running_std``, ``y_running_mean``, ``y_running_std``
    (running statistics of each input, SPEC Eq. 5), ``num_batches_tracked``, ``collecting``.

    Example::

        merge = pwlu.PWLU2D(64)               # per channel, NCHW
        out = merge(branch, identity)         # == branch + identity at init
    """

    #: the nine parameters, in :func:`pwlu.pwlu2d`'s argument order
    parameter_names = PWLU2D_PARAMETER_NAMES
    #: Eq. 5 momentum (set by :class:`pwlu.BoundaryRealigner`); ``None``: cumulative average.
    stats_momentum = 0.1
    #: ``torch.distributed`` group the statistics are merged over (``None``: the world).
    stats_process_group = None

    def __init__(
        self,
        num_channels: int | None = None,
        num_intervals: int = 8,
        channel_dim: int = 1,
        bound: float = 3.0,
        init: str | Callable[[Tensor, Tensor], Tensor] = "add",
    ) -> None:
        super().__init__()
        check_module_args("PWLU2D", num_channels, num_intervals, channel_dim, bound)
        self.init_fn = _resolve_init(init)
        self.init_name = init if isinstance(init, str) else getattr(init, "__name__", type(init).__name__)
        self.num_channels = num_channels
        self.num_intervals = num_intervals
        self.channel_dim = channel_dim
        self.bound = float(bound)
        shape = () if num_channels is None else (num_channels,)
        self.values = nn.Parameter(torch.empty(*shape, num_intervals + 1, num_intervals + 1))
        for name in PWLU2D_PARAMETER_NAMES[1:]:
            setattr(self, name, nn.Parameter(torch.empty(shape)))
        self.stats_momentum: float | None = 0.1
        self.stats_process_group: Any = None
        for axis in ("x", "y"):
            self.register_buffer(f"{axis}_running_mean", torch.zeros(shape))
            self.register_buffer(f"{axis}_running_std", torch.ones(shape))
        self.register_buffer("num_batches_tracked", torch.tensor(0, dtype=torch.long))
        self.register_buffer("collecting", torch.tensor(False))
        self._collecting = False
        self.reset_parameters()

    @property
    def channel_wise(self) -> bool:
        return self.num_channels is not None

    def _parameter_list(self) -> tuple[Tensor, ...]:
        found = self._parameters
        try:
            return tuple(found[name] for name in PWLU2D_PARAMETER_NAMES)  # type: ignore[misc]
        except KeyError:  # e.g. under torch.nn.utils.parametrize
            return tuple(getattr(self, name) for name in PWLU2D_PARAMETER_NAMES)

    def _op_parameters(self) -> tuple[Tensor, ...]:
        # layer-wise scalars prepared for FSDP2 (shape (1,), pwlu.prepare_fully_shard) go to the op as 0-d
        return op_params(self._parameter_list(), self.num_channels is None)

    # -- initialisation --------------------------------------------------------------------

    def reset_parameters(self) -> None:
        """Back to ``init`` on ``[-bound, bound]^2`` with fresh running statistics (the collecting
        flag is kept)."""
        self.init_from_function(self.init_fn, -self.bound, self.bound, -self.bound, self.bound)
        if self.values.is_meta:
            return
        self.reset_running_stats()
        with torch.no_grad():
            self.collecting.fill_(self._collecting)

    @torch.no_grad()
    def init_from_function(
        self,
        fn: Callable[[Tensor, Tensor], Tensor],
        x_left_bound: float | Tensor | None = None,
        x_right_bound: float | Tensor | None = None,
        y_left_bound: float | Tensor | None = None,
        y_right_bound: float | Tensor | None = None,
        *,
        require_min_width: bool = True,
    ) -> None:
        """Set the ranges (scalars or per channel; ``None`` keeps one) and make ``F`` equal ``fn`` at
        every grid vertex, with outer slopes from ``fn``'s partial derivatives across the grid's
        edges (averaged along each edge). Computed in float64 and rounded once to the parameter
        dtype; for ``fn = torch.add`` the slopes are exactly 1 and ``V[i, j] = X_i + Y_j``.

        ``require_min_width``: refuse a range narrower than :data:`pwlu.MIN_WIDTH` as stored in the
        parameter dtype (the ops widen it, so ``F`` would not be ``fn``). Realignment and
        :func:`pwlu.fix_init` pass ``False``: their ranges follow their own ``min_width`` and bound.

        Raises:
            ValueError: non-finite or empty ranges, a range narrower than ``MIN_WIDTH`` (see
                above), or ``fn`` non-finite on the grid (nothing is changed then). TypeError:
                ``fn`` does not return a tensor of the grid's shape.
        """
        if self.values.is_meta:
            return
        shape = self.x_left_bound.shape
        dtype = self.values.dtype
        f64 = dict(dtype=torch.float64, device=self.values.device)
        given = (x_left_bound, x_right_bound, y_left_bound, y_right_bound)
        current = (self.x_left_bound, self.x_right_bound, self.y_left_bound, self.y_right_bound)
        xl, xr, yl, yr = (
            (full(c).to(**f64) if g is None else torch.as_tensor(g, **f64)).expand(shape).clone()
            for g, c in zip(given, current)
        )
        for axis, lo, hi in (("x", xl, xr), ("y", yl, yr)):
            if not bool((torch.isfinite(lo.to(dtype)) & torch.isfinite(hi.to(dtype))).all()):
                raise ValueError(
                    f"PWLU2D: need finite {axis} bounds that {str(dtype).replace('torch.', '')} holds, but got "
                    f"{axis}_left_bound={lo.tolist()} and {axis}_right_bound={hi.tolist()}"
                )
            if not bool((hi > lo).all()):
                raise ValueError(
                    f"PWLU2D: need {axis}_left_bound < {axis}_right_bound, but got {lo.tolist()} and {hi.tolist()}"
                )
        # the parameter dtype's bounds, so that the grid below is exactly the stored one
        xl, xr, yl, yr = (b.to(dtype).to(torch.float64) for b in (xl, xr, yl, yr))
        for axis, lo, hi in (("x", xl, xr), ("y", yl, yr)):
            if require_min_width and not bool((hi - lo >= MIN_WIDTH).all()):  # the ops would widen it
                raise ValueError(
                    f"PWLU2D: the {axis} range [{axis}_left_bound, {axis}_right_bound] must be at least "
                    f"pwlu.MIN_WIDTH={MIN_WIDTH} wide in {str(dtype).replace('torch.', '')} (narrower ranges "
                    f"are widened to it, so F would not equal {getattr(fn, '__name__', 'fn')}), but got "
                    f"{lo.tolist()} and {hi.tolist()}"
                )
        n = self.num_intervals
        frac = torch.arange(n + 1, **f64) / n
        gx = xl.unsqueeze(-1) + frac * (xr - xl).unsqueeze(-1)  # (..., N+1)
        gy = yl.unsqueeze(-1) + frac * (yr - yl).unsqueeze(-1)
        gx[..., n], gy[..., n] = xr, yr
        name = getattr(fn, "__name__", type(fn).__name__)
        if fn is torch.add:  # exact: no autograd slopes, no rounding beyond X_i + Y_j
            values = gx.unsqueeze(-1) + gy.unsqueeze(-2)
            slopes = [torch.ones(shape, **f64)] * 4
        else:
            values = self._checked(fn, name, gx.unsqueeze(-1).expand(*shape, n + 1, n + 1),
                                   gy.unsqueeze(-2).expand(*shape, n + 1, n + 1), dtype)  # fmt: skip
            slopes = self._edge_slopes(fn, name, gx, gy, dtype)
        assign_(self.values, values)  # (assign_: also into an FSDP2-sharded parameter)
        for pname, b in zip(PWLU2D_PARAMETER_NAMES[1:5], (xl, xr, yl, yr)):
            assign_(getattr(self, pname), b)
        for pname, k in zip(PWLU2D_PARAMETER_NAMES[5:], slopes):
            assign_(getattr(self, pname), k)

    @staticmethod
    def _checked(fn, name: str, gx: Tensor, gy: Tensor, dtype: torch.dtype) -> Tensor:
        values = fn(gx, gy)
        if not isinstance(values, Tensor):
            raise TypeError(
                f"PWLU2D: init function {name} must return a tensor (it is called on two tensors of grid "
                f"coordinates), but returned {type(values).__name__}"
            )
        if values.shape != gx.shape:
            raise TypeError(
                f"PWLU2D: init function {name} must act elementwise: given two tensors of shape {tuple(gx.shape)}, "
                f"it returned shape {tuple(values.shape)}"
            )
        if not values.is_floating_point():  # a comparison (bool) or an integer function: no slopes
            raise TypeError(
                f"PWLU2D: init function {name} must return a floating-point tensor (F's values, and its slopes "
                f"from autograd), but returned {str(values.dtype).replace('torch.', '')}"
            )
        values = values.detach().to(torch.float64)
        bad = ~torch.isfinite(values.to(dtype))
        if bool(bad.any()):
            k = tuple(torch.nonzero(bad)[0].tolist())
            raise ValueError(
                f"PWLU2D: init function {name} gives non-finite values on the grid: {values[k].item()!r} at "
                f"(x, y) = ({gx[k].item()!r}, {gy[k].item()!r}); choose a function defined on the whole grid, or "
                "other bounds"
            )
        return values

    @staticmethod
    def _edge_slopes(fn, name: str, gx: Tensor, gy: Tensor, dtype: torch.dtype) -> list[Tensor]:
        """``(K_XL, K_XR, K_YL, K_YR)``: the mean partial derivative of ``fn`` along each edge."""
        n = gx.shape[-1] - 1
        out = []
        for axis, edge in (("x", 0), ("x", n), ("y", 0), ("y", n)):
            if axis == "x":
                a = gx[..., edge : edge + 1].expand(gy.shape).clone()
                b = gy.clone()
            else:
                a = gx.clone()
                b = gy[..., edge : edge + 1].expand(gx.shape).clone()
            a.requires_grad_(True)
            b.requires_grad_(True)
            with torch.enable_grad():
                try:
                    ga, gb = torch.autograd.grad(fn(a, b).sum(), (a, b), allow_unused=True)
                except (RuntimeError, TypeError):
                    ga = gb = None
            grad = ga if axis == "x" else gb
            if grad is None:  # not differentiable by autograd: one-sided differences
                h = 1e-6 * torch.clamp((gx[..., -1:] - gx[..., :1]).abs(), min=1.0)
                with torch.no_grad():
                    a, b = a.detach(), b.detach()
                    sign = -1.0 if edge == 0 else 1.0
                    if axis == "x":
                        grad = sign * (fn(a + sign * h, b) - fn(a, b)) / h
                    else:
                        grad = sign * (fn(a, b + sign * h) - fn(a, b)) / h
            slope = grad.detach().to(torch.float64).mean(-1)
            if not bool(torch.isfinite(slope.to(dtype)).all()):
                side = "left" if edge == 0 else "right"
                raise ValueError(
                    f"PWLU2D: init function {name} has no finite slope across the {axis} {side} edge of the grid "
                    f"(got {slope.tolist()}); the outer slopes come from it"
                )
            out.append(slope)
        return out

    # -- forward ---------------------------------------------------------------------------

    def forward(self, x: Tensor, y: Tensor) -> Tensor:
        if torch.jit.is_scripting() or torch.jit.is_tracing():
            return self._forward_export(x, y)
        if torch.compiler.is_compiling() and torch.onnx.is_in_onnx_export():
            return self._forward_export(x, y)
        return self._forward(x, y)

    def _forward_export(self, x: Tensor, y: Tensor) -> Tensor:
        """Standard operators only (:func:`pwlu2d_export`): TorchScript, tracing, ONNX."""
        if x.dtype != y.dtype:
            dt = torch.promote_types(x.dtype, y.dtype)
            x, y = x.to(dt), y.to(dt)
        cd: Optional[int] = None  # noqa: UP045
        if self.num_channels is not None:
            cd = self.channel_dim % x.dim()
        return pwlu2d_export(
            x, y, self.values, self.x_left_bound, self.x_right_bound, self.y_left_bound, self.y_right_bound,
            self.x_left_slope, self.x_right_slope, self.y_left_slope, self.y_right_slope, cd,
        )  # fmt: skip

    @torch.jit.unused
    def _forward(self, x: Tensor, y: Tensor) -> Tensor:
        """Eager and ``torch.compile``: :func:`pwlu.pwlu2d`, then the statistics update while collecting."""
        if not isinstance(x, Tensor) or not isinstance(y, Tensor):
            raise TypeError(f"PWLU2D: x and y must be tensors, but got {type(x).__name__} and {type(y).__name__}")
        if x.shape != y.shape:
            raise ValueError(
                f"PWLU2D: x and y must have the same shape (the two branches of a merge), but got "
                f"x.shape={tuple(x.shape)} and y.shape={tuple(y.shape)}"
            )
        if x.dtype != y.dtype and x.is_floating_point() and y.is_floating_point():
            dt = torch.promote_types(x.dtype, y.dtype)  # as x + y would (autocast mixes dtypes)
            x, y = x.to(dt), y.to(dt)
        z = pwlu2d(x, y, *self._op_parameters(), channel_dim=self.channel_dim)
        if self.training and self._collecting and not _recomputing():
            cd = None if self.num_channels is None else self.channel_dim % x.dim()
            seen = self.num_batches_tracked.clone()  # both inputs count the same batches
            update_running_stats(self.x_running_mean, self.x_running_std, seen, x, cd, self.stats_momentum,
                                 self.stats_process_group)  # fmt: skip
            update_running_stats(self.y_running_mean, self.y_running_std, self.num_batches_tracked, y, cd,
                                 self.stats_momentum, self.stats_process_group)  # fmt: skip
        return z

    def reference(self, x: Tensor, y: Tensor) -> Tensor:
        """:func:`pwlu.pwlu2d_reference` with this module's parameters (no statistics update)."""
        return pwlu2d_reference(x, y, *self._op_parameters(), channel_dim=self.channel_dim)

    # -- statistics and realignment --------------------------------------------------------

    def set_collecting(self, collecting: bool) -> None:
        """Switch the running-statistics update of training forward passes on or off."""
        self._collecting = bool(collecting)
        self.collecting.fill_(self._collecting)

    @torch.no_grad()
    def reset_running_stats(self) -> None:
        """Forget the running statistics of both inputs (mean 0, std 1, no batches seen)."""
        for axis in ("x", "y"):
            getattr(self, f"{axis}_running_mean").zero_()
            getattr(self, f"{axis}_running_std").fill_(1.0)
        self.num_batches_tracked.zero_()

    def _stats(self, axis: str) -> types.SimpleNamespace:
        """One input's statistics in the form :func:`pwlu.realign._data_bounds` reads."""
        return types.SimpleNamespace(
            running_mean=getattr(self, f"{axis}_running_mean"),
            running_std=getattr(self, f"{axis}_running_std"),
            left_bound=getattr(self, f"{axis}_left_bound"),
        )

    @torch.no_grad()
    def realign(self, num_sigmas: float = 3.0, min_width: float = 1e-2, preserve_function: bool = False) -> None:
        """SPEC section 10's reset: both ranges to ``running_mean ± num_sigmas * running_std`` of their
        input (widened to ``min_width``, cut to what the dtype holds, as :func:`pwlu.realign_boundaries`
        does for PWLU), ``V`` back to the module's init on the new grid: addition with all four slopes
        1 by default (SPEC section 10), or ``init="max"``, ``"mean"`` or the callable it was made with.

        With ``preserve_function=True`` (beyond the SPEC) the ranges move the same way but ``V``
        becomes the current surface sampled at the new vertices and the outer slopes are kept:
        exact wherever the current ``F`` is linear on every new triangle (addition, for one),
        otherwise the vertex interpolation of ``F`` on the new grid.

        Callers check ``num_batches_tracked > 0`` and finite statistics first
        (:func:`pwlu.realign_boundaries` does).
        """
        from .realign import _data_bounds

        xl, xr = _data_bounds(self._stats("x"), float(num_sigmas), float(min_width))
        yl, yr = _data_bounds(self._stats("y"), float(num_sigmas), float(min_width))
        if not preserve_function:
            self.init_from_function(self.init_fn, xl, xr, yl, yr, require_min_width=False)
            return
        n = self.num_intervals
        f64 = torch.float64
        old = op_params(tuple(full(p).to(f64) for p in self._parameter_list()), self.num_channels is None)
        frac = torch.arange(n + 1, dtype=f64, device=xl.device) / n
        gx = xl.unsqueeze(-1) + frac * (xr - xl).unsqueeze(-1)
        gy = yl.unsqueeze(-1) + frac * (yr - yl).unsqueeze(-1)
        gx[..., n], gy[..., n] = xr, yr
        shape = (*xl.shape, n + 1, n + 1)
        px = gx.unsqueeze(-1).expand(shape)
        py = gy.unsqueeze(-2).expand(shape)
        # the vertices as a (C, N+1, N+1) input, channels first (layer-wise: (N+1, N+1))
        new_values = pwlu2d_reference(px.contiguous(), py.contiguous(), *old, channel_dim=0)
        if not bool(torch.isfinite(new_values.to(self.values.dtype)).all()):
            raise ValueError(
                "realign_boundaries: the resampled surface of a PWLU2D on its new ranges overflows its "
                f"{str(self.values.dtype).replace('torch.', '')} parameters; use preserve_function=False"
            )
        assign_(self.values, new_values)
        for pname, b in zip(PWLU2D_PARAMETER_NAMES[1:5], (xl, xr, yl, yr)):
            assign_(getattr(self, pname), b)

    # -- state dict, repr ------------------------------------------------------------------

    def _load_from_state_dict(
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
    ):
        # layer-wise scalars: shape () here and (1,) after pwlu.prepare_fully_shard, either way round
        for name in PWLU2D_PARAMETER_NAMES[1:]:
            saved, own = state_dict.get(prefix + name), self._parameters.get(name)
            if isinstance(saved, Tensor) and isinstance(own, Tensor) and not isinstance(own, UninitializedParameter):
                if saved.shape != own.shape and saved.numel() == own.numel() == 1 and saved.dim() + own.dim() == 1:
                    state_dict[prefix + name] = saved.reshape(own.shape)
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )
        self._collecting = bool(self.collecting)

    def extra_repr(self) -> str:
        mode = "channel" if self.channel_wise else "layer"
        text = f"mode={mode}, num_intervals={self.num_intervals}"
        if self.channel_wise:
            text += f", num_channels={self.num_channels}, channel_dim={self.channel_dim}"
        if self.x_left_bound.is_meta or isinstance(self.x_left_bound, UninitializedParameter):
            return text + f", init={self.init_name}"
        with torch.no_grad():
            ranges = [
                f"{a}_range=[{getattr(self, f'{a}_left_bound').min().item():.4g}, "
                f"{getattr(self, f'{a}_right_bound').max().item():.4g}]"
                for a in ("x", "y")
            ]
        return text + ", " + ", ".join(ranges) + f", init={self.init_name}"


class LazyPWLU2D(LazyModuleMixin, PWLU2D):
    """A channel-wise :class:`PWLU2D` that takes ``num_channels`` from its first input (it becomes
    a plain :class:`PWLU2D` after that). Run one forward pass before creating the optimizer.

    Args:
        num_intervals (int): ``N`` per axis.
        channel_dim (int, optional): channel axis; default 1, or -1 for 3-D ``(B, T, C)`` inputs.
        **kwargs: ``bound``, ``init`` as for :class:`PWLU2D`.
    """

    cls_to_become = PWLU2D

    def __init__(self, num_intervals: int = 8, channel_dim: int | None = None, **kwargs: Any) -> None:
        super().__init__(None, num_intervals=num_intervals, channel_dim=1 if channel_dim is None else channel_dim,
                         **kwargs)  # fmt: skip
        self._auto_channel_dim = channel_dim is None
        for pname in PWLU2D_PARAMETER_NAMES:
            setattr(self, pname, UninitializedParameter())
        for axis in ("x", "y"):
            setattr(self, f"{axis}_running_mean", UninitializedBuffer())
            setattr(self, f"{axis}_running_std", UninitializedBuffer())

    def reset_parameters(self) -> None:
        if not self.has_uninitialized_params():
            super().reset_parameters()

    def initialize_parameters(self, x: Tensor, y: Tensor | None = None, *args: Any, **kwargs: Any) -> None:
        if not self.has_uninitialized_params():  # materialised by load_state_dict: its channels
            self.num_channels = self.values.shape[0] if self.values.dim() == 3 else None
            if self._auto_channel_dim and isinstance(x, Tensor) and x.dim() >= 2:
                self.channel_dim = -1 if x.dim() == 3 else 1
            return
        if not isinstance(x, Tensor) or x.dim() < 2:
            raise ValueError(f"LazyPWLU2D: needs tensors with a channel axis, but got {x!r}")
        if self._auto_channel_dim:
            self.channel_dim = -1 if x.dim() == 3 else 1
        channels = x.shape[self.channel_dim]
        n = self.num_intervals
        kw = dict(device=x.device, dtype=x.dtype if x.is_floating_point() else None)
        with torch.no_grad():
            self.values.materialize((channels, n + 1, n + 1), **kw)
            for pname in PWLU2D_PARAMETER_NAMES[1:]:
                getattr(self, pname).materialize((channels,), **kw)
            for axis in ("x", "y"):
                getattr(self, f"{axis}_running_mean").materialize((channels,), device=x.device)
                getattr(self, f"{axis}_running_std").materialize((channels,), device=x.device)
        self.num_channels = channels
        self.reset_parameters()

    def extra_repr(self) -> str:
        if self.has_uninitialized_params():
            return f"num_intervals={self.num_intervals}, num_channels=<lazy>"
        return super().extra_repr()


def merge_modules(model: nn.Module) -> list[tuple[str, PWLU2D]]:
    """Every :class:`PWLU2D` in ``model`` (the model itself included), with its name."""
    return [(name, m) for name, m in model.named_modules() if isinstance(m, PWLU2D)]


def realign_merges(
    merges: list[tuple[str, PWLU2D]], num_sigmas: float, min_width: float, preserve_function: bool = False
) -> list[str]:
    """:func:`pwlu.realign_boundaries` for the :class:`PWLU2D` modules among ``merges``: each one
    that has seen a batch while collecting gets :meth:`PWLU2D.realign`; one that has not is left
    unchanged, with a warning. Returns the names of the realigned modules.

    Raises:
        ValueError: non-finite running statistics (NaN or inf among the inputs), before anything
            changes.
    """
    ready = []
    for name, module in merges:
        if int(module.num_batches_tracked) == 0:
            warnings.warn(
                f"realign_boundaries: PWLU2D {name or '<model>'!r} has seen no training batch while "
                "collecting statistics; its ranges are left unchanged",
                stacklevel=3,
            )
            continue
        for axis in ("x", "y"):
            mean = getattr(module, f"{axis}_running_mean")
            std = getattr(module, f"{axis}_running_std").reshape(-1)
            if not bool(torch.isfinite(mean).all() and (torch.isfinite(std) | (std == math.inf)).all()):
                raise ValueError(
                    f"realign_boundaries: PWLU2D {name or '<model>'!r} has non-finite running statistics of "
                    f"its {axis} input (mean {mean.tolist()}, std {std.tolist()}); its inputs contained NaN or inf"
                )
        ready.append((name, module))
    for _, module in ready:
        module.realign(num_sigmas, min_width, preserve_function)
    return [name for name, _ in ready]
