"""The non-uniform PWLU module, :class:`NPWLU`: learnable interval widths (SPEC section 9).

The authors' extension of PWLU (journal version, TPAMI 2023; "N-PWLU", ICPR 2022) learns
the widths of the ``N`` intervals as well: width logits ``θ`` (``Tensor[N]`` per layer or per
channel), relative widths ``ω = softmax(θ)``, breakpoints ``b_j = B_L + (B_R - B_L)·c_j`` with
``c_j = ω_0 + … + ω_{j-1}``. ``θ = 0`` is the uniform PWLU.

The module is a :class:`~pwlu.PWLU` with one more parameter, so everything written for
PWLUs takes it as it is: running statistics, :class:`~pwlu.BoundaryRealigner` (whose
phase-I freeze covers ``width_logits``), :func:`~pwlu.realign_boundaries` (the Eq. 6 reset
sets ``θ`` back to 0; ``preserve_function=True`` keeps ``θ`` and refits the values at the
non-uniform breakpoints), :func:`~pwlu.fix_init`, :func:`~pwlu.boundary_iou`,
:func:`~pwlu.parameter_groups`, :func:`~pwlu.convert_activations` (``activation="npwlu"``)
and the exporters. The kernels are :func:`pwlu.npwlu`; :func:`npwlu_folded` here is the
pure-torch folded path taken under ``torch.jit.script``/``trace`` and ONNX export.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

from .distributed import full, op_params
from .functional import npwlu
from .modules import PWLU, _recomputing
from .ops.folded import channel_view
from .ops.folding import compute_dtype, effective_bounds
from .ops.npwlu_reference import MIN_INTERVAL_WIDTH

__all__ = ["NPWLU", "npwlu_folded"]


def _breakpoints(
    logits: Tensor, left: Tensor, right: Tensor, min_interval_width: float = MIN_INTERVAL_WIDTH
) -> tuple[Tensor, Tensor]:
    """``(breakpoints Tensor[C, N+1], floored widths Tensor[C, N])``: the same values as
    :func:`pwlu.ops.npwlu_reference.npwlu_breakpoints`, written so that TorchScript compiles it
    (the floor is an argument, not a global)."""
    n = logits.shape[-1]
    right_eff, range_width, _ = effective_bounds(left, right, n)
    fractions = torch.cumsum(torch.softmax(logits, dim=-1)[:, :-1], dim=-1)  # c_1 .. c_{N-1}
    inner = left.unsqueeze(-1) + range_width.unsqueeze(-1) * fractions
    b = torch.cat([left.unsqueeze(-1), inner, right_eff.unsqueeze(-1)], -1)
    raw = b[:, 1:] - b[:, :-1]
    # not `raw >= ...`: NaN widths (NaN width_logits) stay NaN, they are not floored to valid ones
    return b, torch.where(raw < min_interval_width, torch.full_like(raw, min_interval_width), raw)


def _tables(
    ys: Tensor, logits: Tensor, left: Tensor, right: Tensor, left_slope: Tensor, right_slope: Tensor
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Per-region ``(slopes, anchor_x, anchor_y)``, each ``Tensor[C, N+2]``, and the breakpoints
    ``Tensor[C, N+1]`` of channel-form parameters: in region ``k``, ``y = anchor_y[k] + slopes[k]·(x - anchor_x[k])``.

    Region 0 is anchored at ``(B_L, Y_P[0])`` with slope ``K_L``, region ``k`` in ``1..N`` (interval
    ``k-1``) at ``(b_{k-1}, Y_P[k-1])`` with slope ``(Y_P[k] - Y_P[k-1]) / w_{k-1}`` (the floored
    width of SPEC section 9), region ``N+1`` at ``(B_R, Y_P[N])``
    with slope ``K_R``. Anchoring every piece at its own left end keeps it exact at the breakpoints
    and free of the cancellation of ``Y - b·K`` far from 0.
    """
    n = ys.shape[-1] - 1
    b, widths = _breakpoints(logits, left, right)
    inner = (ys[:, 1:] - ys[:, :-1]) / widths
    slopes = torch.cat([left_slope.unsqueeze(-1), inner, right_slope.unsqueeze(-1)], -1)
    anchor_x = torch.cat([left.unsqueeze(-1), b[:, :n], b[:, n:]], -1)
    anchor_y = torch.cat([ys[:, :1], ys[:, :n], ys[:, n:]], -1)
    return slopes, anchor_x, anchor_y, b


def npwlu_folded(
    x: Tensor,
    points: Tensor,
    width_logits: Tensor,
    left_bound: Tensor,
    right_bound: Tensor,
    left_slope: Tensor,
    right_slope: Tensor,
    channel_dim: int | None,
) -> Tensor:
    """N-PWLU forward in plain, exportable torch ops (TorchScript-compatible; standard ONNX only).

    Every element's region ``k`` in ``0..N+1`` is the number of breakpoints ``b_0..b_N`` at or
    below it (intervals closed on the left, as in SPEC section 9); then
    ``y = Y[k] + s[k]·(x - a[k])`` with the region's anchor ``(a[k], Y[k])`` (``(B_L, Y_P[0])``
    left of the range, ``(b_j, Y_P[j])`` in interval ``j``, ``(B_R, Y_P[N])`` right of it) and
    slope ``s[k]`` (``K_L``, ``(Y_P[j+1] - Y_P[j]) / w_j``, ``K_R``): the same function as
    :func:`pwlu.npwlu_reference`, with the same two floors (the range at least
    :data:`pwlu.MIN_WIDTH`, interval widths at least
    :data:`pwlu.ops.npwlu_reference.MIN_INTERVAL_WIDTH` as divisors). Forward only: training
    should use :func:`pwlu.npwlu`.

    Args:
        x (Tensor[...]): input, any floating dtype (float16/bfloat16 computed in float32).
        points (Tensor[C, N+1] or Tensor[N+1]), width_logits (Tensor[C, N] or Tensor[N]),
        left_bound, right_bound, left_slope, right_slope (Tensor[C] or Tensor[]).
        channel_dim (int, optional): the non-negative channel axis, ``None`` layer-wise.

    Returns:
        Tensor: same shape and dtype as ``x``; NaN gives NaN, ``±inf`` on a flat outer piece
        gives that piece's value.
    """
    dtype = compute_dtype(x.dtype)
    n = points.shape[-1] - 1
    slopes, anchor_x, anchor_y, b = _tables(
        points.to(dtype).reshape(-1, n + 1), width_logits.to(dtype).reshape(-1, n), left_bound.to(dtype).reshape(-1),
        right_bound.to(dtype).reshape(-1), left_slope.to(dtype).reshape(-1), right_slope.to(dtype).reshape(-1),
    )  # fmt: skip
    xc = x.to(dtype)
    k = torch.zeros(xc.shape, dtype=torch.long, device=xc.device)
    for j in range(n + 1):  # the region: how many breakpoints lie at or below x (NaN: none)
        k = k + (xc >= channel_view(b[:, j], xc.dim(), channel_dim)).long()
    if channel_dim is not None:
        channel = torch.arange(b.shape[0], device=xc.device)
        k = k + channel_view(channel, xc.dim(), channel_dim) * (n + 2)
    s = slopes.reshape(-1)[k]
    d = xc - anchor_x.reshape(-1)[k]
    y = anchor_y.reshape(-1)[k] + s * d
    # a flat piece maps ±inf to its value, and so a finite x whose x - anchor overflows
    y = torch.where(torch.isinf(d) & (s == 0), anchor_y.reshape(-1)[k], y)
    return y.to(x.dtype)


def _fractions64(width_logits: Tensor) -> Tensor:
    """``c_0 = 0, c_1, …, c_{N-1}, c_N = 1`` from ``θ`` (``Tensor[..., N]``), in float64, detached."""
    omega = torch.softmax(width_logits.detach().to(torch.float64), -1)
    inner = torch.cumsum(omega, -1)[..., :-1]
    zero = torch.zeros_like(omega[..., :1])
    return torch.cat([zero, inner, zero + 1.0], -1)


class NPWLU(PWLU):
    """Non-uniform Piecewise Linear Unit: a PWLU whose interval widths are learned (SPEC section 9).

    Paper: https://arxiv.org/abs/2104.03693 and its extension (TPAMI 2023; N-PWLU, ICPR 2022).
    ``N`` intervals on a learnable range ``[B_L, B_R]`` with learnable widths
    ``(B_R - B_L)·softmax(θ)``, learnable values at the ``N + 1`` breakpoints and learnable outer
    slopes, shared by the whole layer (``num_channels=None``) or one set per channel. With
    ``θ = 0`` (the initial value) it is the uniform :class:`~pwlu.PWLU` with the same parameters.

    Parameters: ``points`` (``Tensor[N+1]`` or ``Tensor[C, N+1]``), ``width_logits`` (``Tensor[N]``
    or ``Tensor[C, N]``), ``left_bound``, ``right_bound``, ``left_slope``, ``right_slope``
    (``Tensor[]`` or ``Tensor[C]``). It is a :class:`~pwlu.PWLU` subclass: realignment, conversion,
    the optimizer groups and the exporters treat it as one (see :mod:`pwlu.nonuniform`).

    Args:
        num_channels (int, optional): ``None`` for layer-wise, else the number of channels.
        num_intervals (int): ``N`` (default 4: the extension's point is that few learned
            intervals do as well as many uniform ones).
        channel_dim (int): channel axis of the input, negative allowed. Ignored layer-wise.
        bound (float): initial range ``[-bound, bound]``.
        init (str or callable): the initial function at the (uniform) initial breakpoints, as
            for :class:`~pwlu.PWLU` (default ``"relu"``, exact).

    Shape:
        Input ``(*)`` with ``num_channels`` channels on ``channel_dim``; output the same.

    Example::

        act = pwlu.NPWLU(64, num_intervals=4)
        y = act(torch.randn(8, 64, 14, 14))
    """

    #: Every learned parameter (what the phase-I freeze and :func:`pwlu.parameter_groups` cover).
    parameter_names = ("points", "width_logits", "left_bound", "right_bound", "left_slope", "right_slope")

    def __init__(
        self,
        num_channels: int | None = None,
        num_intervals: int = 4,
        channel_dim: int = 1,
        bound: float = 3.0,
        init: str | Callable[[Tensor], Tensor] = "relu",
    ) -> None:
        if isinstance(num_intervals, bool) or not isinstance(num_intervals, int) or num_intervals < 1:
            raise ValueError(f"NPWLU: num_intervals must be an int >= 1, but got {num_intervals!r}")
        super().__init__(num_channels, num_intervals, channel_dim, bound, init)
        shape = () if num_channels is None else (num_channels,)
        self.width_logits = nn.Parameter(torch.zeros(*shape, num_intervals))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Uniform widths (``θ = 0``) and the initial function ``init`` on ``[-bound, bound]``, with
        fresh running statistics (see :meth:`pwlu.PWLU.reset_parameters`)."""
        if "width_logits" not in self._parameters:  # PWLU.__init__ calls this before θ exists
            return
        self.reset_widths()
        super().reset_parameters()

    @torch.no_grad()
    def reset_widths(self) -> None:
        """``θ = 0``: uniform intervals again (the values at the breakpoints are not refitted; the
        Eq. 6 reset of :func:`pwlu.realign_boundaries` calls this before it sets the ReLU shape)."""
        if not self.width_logits.is_meta:
            self.width_logits.zero_()

    def _breakpoint_fractions(self) -> Tensor:
        # init_from_function evaluates the function at the current, non-uniform breakpoints
        # (full(): the whole value of an FSDP2-sharded parameter; a collective, as in realignment)
        return _fractions64(full(self.width_logits)).to(self.points.device)

    @torch.no_grad()
    def breakpoints(self) -> Tensor:
        """The current breakpoints ``b_0 = B_L, …, b_N = B_R`` in float64 (for plots and inspection).

        Returns:
            Tensor[N+1] (layer-wise) or Tensor[C, N+1].
        """
        left = full(self.left_bound).to(torch.float64)
        right, _, _ = effective_bounds(left, full(self.right_bound).to(torch.float64), self.num_intervals)
        return left.unsqueeze(-1) + _fractions64(full(self.width_logits)) * (right - left).unsqueeze(-1)

    def _forward_folded(self, x: Tensor) -> Tensor:
        """Pure-torch folded forward (:func:`npwlu_folded`), the path taken under
        ``torch.jit.script``/``trace`` and ONNX export (no running-statistics update)."""
        cd: int | None = None
        if self.num_channels is not None:
            cd = self.channel_dim % x.dim()
        return npwlu_folded(
            x, self.points, self.width_logits, self.left_bound, self.right_bound, self.left_slope,
            self.right_slope, cd,
        )  # fmt: skip

    @torch.jit.unused
    def _forward(self, x: Tensor) -> Tensor:
        """Eager and ``torch.compile``: :func:`pwlu.npwlu`, then the statistics update while collecting."""
        found = self._parameters
        try:
            params = (found["points"], found["width_logits"], found["left_bound"], found["right_bound"],
                      found["left_slope"], found["right_slope"])  # fmt: skip
        except KeyError:  # e.g. under torch.nn.utils.parametrize
            params = (self.points, self.width_logits, self.left_bound, self.right_bound, self.left_slope,
                      self.right_slope)  # fmt: skip
        y = npwlu(x, *op_params(params, self.num_channels is None, tensors=2), self.channel_dim)
        if self.training and self._collecting and not _recomputing():
            cd = None if self.num_channels is None else self.channel_dim % x.dim()
            self._update_statistics(x, cd)
        return y

    def inference_tables(self) -> tuple[Tensor, Tensor, Tensor]:
        """Folded ``(slopes, intercepts, breakpoints)`` of SPEC sections 5 and 9.

        ``slopes`` and ``intercepts`` are ``Tensor[N+2]`` (layer-wise) or ``Tensor[C, N+2]``:
        entry 0 is ``x < B_L``, entry ``k`` in ``1..N`` interval ``k-1``, entry ``N+1`` is
        ``x >= B_R``, and ``y = slopes[k] * x + intercepts[k]``. ``breakpoints`` is ``Tensor[N+1]``
        or ``Tensor[C, N+1]``; the region ``k`` of ``x`` is the number of breakpoints ``<= x``.
        Derived from the current parameters on every call, in the parameters' dtype.
        """
        n = self.num_intervals
        slopes, anchor_x, anchor_y, b = _tables(
            self.points.reshape(-1, n + 1), self.width_logits.reshape(-1, n), self.left_bound.reshape(-1),
            self.right_bound.reshape(-1), self.left_slope.reshape(-1), self.right_slope.reshape(-1),
        )  # fmt: skip
        intercepts = anchor_y - slopes * anchor_x
        if not self.channel_wise:
            slopes, intercepts, b = slopes[0], intercepts[0], b[0]
        return slopes, intercepts, b

    def extra_repr(self) -> str:
        text = super().extra_repr()
        if self.width_logits.is_meta:
            return text
        with torch.no_grad():
            omega = torch.softmax(self.width_logits.detach().to(torch.float64), -1)
        return text + f", widths=[{omega.min().item():.3g}, {omega.max().item():.3g}] of the range"
