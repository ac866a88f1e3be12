"""Statistic-based realignment (SPEC section 4): moving the boundaries of trained or warming-up PWLUs.

Paper: https://arxiv.org/abs/2104.03693, Sec. 3.3 (two-phase learning).

* :func:`realign_boundaries` -- the Eq. 6 reset (or a function-preserving re-bound).
* :func:`fix_init` -- the fix-init-X ablation baseline.
* :func:`pwlu_modules` -- every PWLU of a model.

The two-phase schedule that calls them is :class:`pwlu.schedule.BoundaryRealigner`; the
boundary IOU metric is in :mod:`pwlu.metrics`.

The running statistics themselves live in every :class:`~pwlu.PWLU` as buffers
(``running_mean``, ``running_std``, ``num_batches_tracked``, ``collecting``); their
conventions are in :mod:`pwlu.running_stats`.
"""

from __future__ import annotations

import math
import warnings
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules.lazy import LazyModuleMixin

from .distributed import assign_, full
from .merge import merge_modules, realign_merges
from .modules import PWLU
from .ops.folding import MIN_WIDTH, effective_bounds
from .ops.validation import PARAMETER_NAMES

__all__ = ["DEFAULT_MIN_WIDTH", "fix_init", "pwlu_modules", "realign_boundaries"]

#: Smallest ``B_R - B_L`` that :func:`realign_boundaries` sets (a dead channel, std 0, is
#: centred on its mean with this width). Ten times :data:`pwlu.MIN_WIDTH`, so the width
#: stays above the forward pass's clamp after rounding to the parameter dtype.
DEFAULT_MIN_WIDTH = 10 * MIN_WIDTH

_PARAM_NAMES = PARAMETER_NAMES


def pwlu_modules(model: nn.Module) -> list[tuple[str, PWLU]]:
    """Every :class:`~pwlu.PWLU` in ``model`` (the model itself included), with its name."""
    return [(name, m) for name, m in model.named_modules() if isinstance(m, PWLU)]


def check_materialised(modules: list[tuple[str, PWLU]], who: str) -> None:
    """Raise if a :class:`~pwlu.LazyPWLU` among ``modules`` has not been materialised yet."""
    for name, module in modules:
        if isinstance(module, LazyModuleMixin) and module.has_uninitialized_params():
            raise ValueError(
                f"{who}: LazyPWLU {name or '<model>'!r} is not materialised yet (its channel count comes from "
                "its first input); run one forward pass, e.g. model(example_batch), before this (and before "
                "creating the optimizer)"
            )


def _params(module: PWLU) -> list[nn.Parameter]:
    # every learned parameter: the five of PWLU, and the width logits of an N-PWLU (SPEC section 9)
    return [getattr(module, name) for name in getattr(module, "parameter_names", _PARAM_NAMES)]


def _check_positive(name: str, value: Any, allow_zero: bool = False) -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or value < 0 or (value == 0 and not allow_zero):
        bound = ">= 0" if allow_zero else "> 0"
        raise ValueError(f"{name} must be a finite number {bound}, but got {value!r}")


# ----------------------------------------------------------------------------------------
# the reset (Eq. 6) and the function-preserving re-bound
# ----------------------------------------------------------------------------------------


def _representable_limit(dtype: torch.dtype) -> float:
    """Largest ``|B|`` a boundary of a ``dtype`` PWLU may take: what the dtype holds, and at most
    a quarter of what its compute dtype holds (float32 for float16/bfloat16), so that the range
    ``B_R - B_L`` and the folded tables stay finite."""
    compute = torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype
    return min(torch.finfo(dtype).max, torch.finfo(compute).max / 4)


def _data_bounds(module: PWLU, num_sigmas: float, min_width: float) -> tuple[Tensor, Tensor]:
    """``mean ± num_sigmas·std`` from the buffers, widened to ``min_width``, in float64.

    Computed in float64 and clamped to what the parameter dtype holds
    (:func:`_representable_limit`, e.g. ±65504 for float16): a range that would overflow is cut
    at the largest finite value, keeping at least ``min_width`` (a running std of +inf, a
    float16 buffer that overflowed, means the whole representable range). The bounds are
    rounded to the parameter dtype before they are returned, so the caller computes
    breakpoints from exactly the values that will be stored.
    """
    mean = module.running_mean.to(torch.float64)
    std = module.running_std.to(torch.float64)
    dtype = module.left_bound.dtype
    limit = _representable_limit(dtype)
    # half-width: num_sigmas·std, at least min_width / 2, and wide enough that rounding
    # mean ± half to the parameter dtype cannot shrink the width below min_width / 2
    eps = torch.finfo(dtype).eps
    half = torch.maximum(num_sigmas * std, torch.full_like(std, min_width / 2))
    half = torch.maximum(half, 8 * eps * mean.abs()).clamp(max=2 * limit)  # no inf - inf below
    left, right = mean - half, mean + half
    # cut at ±limit, keeping a width of at least min_width there, and 16 ulps of the limit
    # (so that rounding to the dtype cannot close it)
    least = max(min_width, 16 * eps * limit)
    over = right > limit
    left = torch.where(over, torch.clamp(left, max=limit - least), left)
    right = torch.where(over, torch.full_like(right, limit), right)
    under = left < -limit
    right = torch.where(under, torch.clamp(right, min=-limit + least), right)
    left = torch.where(under, torch.full_like(left, -limit), left)
    return left.to(dtype).to(torch.float64), right.to(dtype).to(torch.float64)


def _relu_reset(module: PWLU, left: Tensor, right: Tensor) -> None:
    """Eq. 6: ``K_L = 0``, ``K_R = 1``, ``Y_P[i] = max(0, B_L + i·d)`` on ``[left, right]``
    (an N-PWLU gets uniform intervals again first, ``θ = 0``: SPEC section 9)."""
    reset_widths = getattr(module, "reset_widths", None)
    if reset_widths is not None:
        reset_widths()
    module.init_from_function(F.relu, left, right)
    assign_(module.left_slope, 0.0)
    assign_(module.right_slope, 1.0)
    module.matched = None  # no longer the function it was matched to


def _hat_design(grid: Tensor, left: Tensor, right: Tensor, n: int, fractions: Tensor | None = None) -> Tensor:
    """Design matrix of a PWLU in its linear parameters ``(Y_P[0..N], K_L, K_R)``.

    Args:
        grid (Tensor[C, G]): sample points; left, right (Tensor[C]): the boundaries.
        fractions (Tensor[C, N+1], optional): the breakpoints' ``(b_j - B_L) / (B_R - B_L)`` of an
            N-PWLU (SPEC section 9); ``None``: uniform.

    Returns:
        Tensor[C, G, N+3]: ``PWLU(grid) = A @ [Y_P, K_L, K_R]`` for fixed boundaries.
    """
    if fractions is None:
        d = ((right - left) / n).unsqueeze(-1)
        u = (grid - left.unsqueeze(-1)) / d
        i = torch.floor(u).clamp(0, n - 1)
        t = (u - i).clamp(0, 1)  # outer regions: t = 0 (left) or 1 (right) picks Y_P[0] / Y_P[N]
    else:  # interval i: how many interior breakpoints lie at or below the point
        b = left.unsqueeze(-1) + fractions * (right - left).unsqueeze(-1)
        i = (grid.unsqueeze(-1) >= b[:, None, 1:n]).sum(-1)
        lo, hi = b.gather(-1, i), b.gather(-1, i + 1)
        t = ((grid - lo) / torch.clamp(hi - lo, min=torch.finfo(b.dtype).tiny)).clamp(0, 1)
    a = grid.new_zeros(*grid.shape, n + 3)
    a.scatter_add_(-1, i.long().unsqueeze(-1), (1 - t).unsqueeze(-1))
    a.scatter_add_(-1, (i.long() + 1).unsqueeze(-1), t.unsqueeze(-1))
    a[..., n + 1] = torch.clamp(grid - left.unsqueeze(-1), max=0.0)  # (x - B_L) for x < B_L
    a[..., n + 2] = torch.clamp(grid - right.unsqueeze(-1), min=0.0)  # (x - B_R) for x >= B_R
    return a


def _channel_params(module: PWLU) -> list[Tensor]:
    """The five parameters as float64 ``Tensor[C, N+1]`` / ``Tensor[C]`` (C = 1 layer-wise)."""
    out = []
    for name in _PARAM_NAMES:
        p = full(getattr(module, name)).to(torch.float64)  # the whole value of an FSDP2 DTensor
        out.append(p.reshape(-1, p.shape[-1]) if name == "points" else p.reshape(-1))
    return out


def _refit(module: PWLU, left: Tensor, right: Tensor, grid_size: int, name: str = "") -> None:
    """Move the boundaries to ``[left, right]`` and refit ``Y_P``, ``K_L``, ``K_R`` by least squares.

    The fit grid has ``grid_size`` uniform points per channel over the union of the old
    and the new range, widened by one new interval ``d_new`` on each side so both new outer
    slopes are determined, plus ``8·(N + 2) + 1`` points over the new range (so every new
    interval has samples even when it is tiny next to the old range). Solved in float64
    on the CPU (rank-revealing ``gelsd``: a minimum-norm solution if ever rank-deficient).
    """
    n = module.num_intervals
    points, old_l, old_r, k_l, k_r = (p.cpu() for p in _channel_params(module))
    old_r, _, _ = effective_bounds(old_l, old_r, n)
    # an N-PWLU keeps its widths: the breakpoints move with the range, at the same fractions of it
    fractions = module._breakpoint_fractions().cpu().reshape(-1, n + 1) if hasattr(module, "width_logits") else None
    left = left.cpu().reshape(-1).expand_as(old_l)
    right = right.cpu().reshape(-1).expand_as(old_l)
    d_new = (right - left) / n
    lo = torch.minimum(old_l, left) - d_new
    hi = torch.maximum(old_r, right) + d_new
    f64 = dict(dtype=torch.float64)
    coarse = torch.linspace(0.0, 1.0, grid_size, **f64)
    fine = torch.linspace(0.0, 1.0, 8 * (n + 2) + 1, **f64)
    grid = torch.cat(
        [
            lo.unsqueeze(-1) + coarse * (hi - lo).unsqueeze(-1),
            (left - d_new).unsqueeze(-1) + fine * (right - left + 2 * d_new).unsqueeze(-1),
        ],
        -1,
    )  # (C, G)
    if fractions is not None:  # an N-PWLU: 8 samples inside every new interval, however narrow
        steps = torch.arange(8, **f64) / 8
        inside = fractions[:, :-1, None] + steps * (fractions[:, 1:] - fractions[:, :-1]).unsqueeze(-1)
        grid = torch.cat([grid, left.unsqueeze(-1) + inside.flatten(1) * (right - left).unsqueeze(-1)], -1)
    # the old function on the grid, through its own design matrix (exact PWLU evaluation)
    old_theta = torch.cat([points, k_l.unsqueeze(-1), k_r.unsqueeze(-1)], -1)
    target = _hat_design(grid, old_l, old_r, n, fractions) @ old_theta.unsqueeze(-1)
    design = _hat_design(grid, left, right, n, fractions)
    theta = torch.linalg.lstsq(design, target, driver="gelsd").solution.squeeze(-1)
    dtype = module.points.dtype
    if not bool(torch.isfinite(theta.to(dtype)).all()):  # checked before anything changes
        raise ValueError(
            f"realign_boundaries: the refitted shape of PWLU {name or '<model>'!r} on its new range "
            f"[{left.min().item():.6g}, {right.max().item():.6g}] overflows its {str(dtype).replace('torch.', '')} "
            "parameters; use preserve_function=False, or a wider dtype"
        )
    theta = theta.to(module.points.device)
    shape = module.left_bound.shape
    assign_(module.points, theta[:, : n + 1].reshape(module.points.shape))
    assign_(module.left_bound, left.reshape(shape))
    assign_(module.right_bound, right.reshape(shape))
    assign_(module.left_slope, theta[:, n + 1].reshape(shape))
    assign_(module.right_slope, theta[:, n + 2].reshape(shape))


@torch.no_grad()
def realign_boundaries(
    model: nn.Module,
    num_sigmas: float = 3.0,
    preserve_function: bool = False,
    min_width: float = DEFAULT_MIN_WIDTH,
    grid_size: int = 2048,
    *,
    skip_matched: bool = False,
) -> list[str]:
    """Reset every PWLU's range to its input statistics (SPEC Eq. 6, the 3-sigma rule).

    Paper: https://arxiv.org/abs/2104.03693, Sec. 3.3. For each PWLU (per channel in
    channel-wise mode) the new range is::

        B_L = running_mean - num_sigmas·running_std
        B_R = running_mean + num_sigmas·running_std

    widened symmetrically to at least ``min_width`` (a dead channel with std 0 is centred
    on its mean; never a zero-length interval, never NaN). Computed in float64 and cut at
    the largest value the parameter dtype holds (±65504 for float16), keeping at least
    ``min_width``; a running std of +inf (a float16 buffer that overflowed) means the whole
    range. The bounds are never ±inf.

    * ``preserve_function=False`` (the paper): the shape becomes ReLU, ``K_L = 0``,
      ``K_R = 1``, ``Y_P[i] = max(0, B_L + i·d)``.
    * ``preserve_function=True`` (beyond the paper): the boundaries move to the data, and
      ``Y_P``, ``K_L`` and ``K_R`` are refitted by least squares to the current function on
      a dense grid of ``grid_size`` points covering the old range ``[B_L, B_R]`` and the
      new one (plus one new interval either side), equally weighted. The fit is exact
      wherever the new breakpoints can represent the old function (unchanged boundaries,
      a linear shape); otherwise it is the L2-best piecewise-linear approximation on the
      new breakpoints, ``O(d_new^2·|f''|)`` for smooth shapes. Documented (and tested)
      tolerance: for a shifted or wider range the max error on the old range stays below
      2% of the function's range there. A *narrower* range makes the function linear
      outside it, so curvature there is lost (the error is then bounded only by how far
      the old function is from linear outside the new range).
      An N-PWLU (:class:`pwlu.NPWLU`) keeps its width logits ``θ``: the new breakpoints sit at
      the same fractions of the new range, the values are refitted there, and with few
      intervals a kink that no new breakpoint meets is smoothed (exact again wherever the
      new breakpoints can represent the old function). The Eq. 6 reset sets ``θ`` to 0.

    Modules whose running statistics have seen no batch are left unchanged, with a warning.

    Args:
        model (nn.Module): a model containing PWLU modules (or a PWLU itself).
        num_sigmas (float): half-width of the range in standard deviations (default 3).
        preserve_function (bool): refit the shape instead of resetting it to ReLU.
        min_width (float): smallest ``B_R - B_L``, ``>= pwlu.MIN_WIDTH`` (default ``1e-2``).
        grid_size (int): least-squares sample points per channel (``preserve_function``).
        skip_matched (bool): leave function-matched PWLUs (``module.matched`` set by
            ``convert_activations(init="match")``) unchanged; :class:`~pwlu.BoundaryRealigner`'s
            Eq. 6 reset passes ``True``. A matched PWLU that is reset to ReLU loses its ``matched``.

    Returns:
        list[str]: the names of the realigned modules.

    Raises:
        ValueError: bad arguments, no PWLU in ``model``, a ``LazyPWLU`` not materialised yet,
            or non-finite running statistics (a NaN or infinite mean, a NaN std: the inputs
            contained NaN or inf).
    """
    _check_positive("realign_boundaries: num_sigmas", num_sigmas, allow_zero=True)
    _check_positive("realign_boundaries: min_width", min_width)
    if min_width < MIN_WIDTH:
        raise ValueError(f"realign_boundaries: min_width must be >= pwlu.MIN_WIDTH={MIN_WIDTH}, but got {min_width}")
    if isinstance(grid_size, bool) or not isinstance(grid_size, int) or grid_size < 16:
        raise ValueError(f"realign_boundaries: grid_size must be an int >= 16, but got {grid_size!r}")
    modules = pwlu_modules(model)
    merges = merge_modules(model)  # 2-D PWLUs (SPEC section 10): both ranges, V back to addition
    if not modules and not merges:
        raise ValueError(f"realign_boundaries: no PWLU (or PWLU2D) module in {type(model).__name__}")
    check_materialised(modules + merges, "realign_boundaries")
    done = []
    for name, module in modules:
        if skip_matched and module.matched is not None:
            continue
        if int(module.num_batches_tracked) == 0:
            warnings.warn(
                f"realign_boundaries: PWLU {name or '<model>'!r} has seen no training batch while "
                "collecting statistics; its boundaries are left unchanged",
                stacklevel=2,
            )
            continue
        # a running std of +inf (a float16 buffer that overflowed) is usable: the whole range
        std = module.running_std.reshape(-1)
        if not bool(torch.isfinite(module.running_mean).all() and (torch.isfinite(std) | (std == math.inf)).all()):
            raise ValueError(
                f"realign_boundaries: PWLU {name or '<model>'!r} has non-finite running statistics "
                f"(mean {module.running_mean.tolist()}, std {module.running_std.tolist()}); "
                "its inputs contained NaN or inf"
            )
        left, right = _data_bounds(module, float(num_sigmas), float(min_width))
        if preserve_function:
            _refit(module, left, right, grid_size, name)
        else:
            _relu_reset(module, left, right)
        done.append(name)
    return done + realign_merges(merges, float(num_sigmas), float(min_width), preserve_function)


@torch.no_grad()
def fix_init(model: nn.Module, bound: float) -> None:
    """The paper's fix-init-X ablation: every PWLU becomes ReLU on ``[-bound, bound]`` (every
    :class:`~pwlu.PWLU2D` its init, addition by default, on ``[-bound, bound]²``).

    Paper: https://arxiv.org/abs/2104.03693, Sec. 4.2 (X in {3, 6, 10}). ``K_L = 0``,
    ``K_R = 1``, ``Y_P[i] = max(0, B_i)``; statistics collection is switched off and the
    running statistics are reset. There is no phase I and no realignment: train such a
    model *without* a :class:`BoundaryRealigner` (a realigner would freeze the PWLUs for
    its warm-up and then overwrite this range at ``warmup_steps``).
    """
    _check_positive("fix_init: bound", bound)
    modules = pwlu_modules(model)
    merges = merge_modules(model)  # a PWLU2D becomes its init (addition by default) on [-bound, bound]^2
    if not modules and not merges:
        raise ValueError(f"fix_init: no PWLU (or PWLU2D) module in {type(model).__name__}")
    check_materialised(modules + merges, "fix_init")
    for name, module in modules:
        dtype = module.left_bound.dtype
        if bound >= _representable_limit(dtype):
            raise ValueError(
                f"fix_init: PWLU {name or '<model>'!r} has {str(dtype).replace('torch.', '')} parameters, which "
                f"cannot hold bound={bound!r} (at most {_representable_limit(dtype):.6g})"
            )
    for name, merge in merges:
        if bound >= _representable_limit(merge.values.dtype):
            raise ValueError(f"fix_init: PWLU2D {name or '<model>'!r} cannot hold bound={bound!r} in its {merge.values.dtype}")
    for _, module in modules:
        _relu_reset(module, torch.tensor(-float(bound)), torch.tensor(float(bound)))
        module.reset_running_stats()
        module.set_collecting(False)
    for _, merge in merges:
        merge.init_from_function(
            merge.init_fn, -float(bound), float(bound), -float(bound), float(bound), require_min_width=False
        )
        merge.reset_running_stats()
        merge.set_collecting(False)


_MOVED = {
    "BoundaryRealigner": "schedule",
    "parameter_groups": "schedule",
    "boundary_iou": "metrics",
    "interval_iou": "metrics",
}


def __getattr__(name: str):
    """Names that lived here before the schedule and the metric got modules of their own."""
    if name in _MOVED:
        import importlib

        return getattr(importlib.import_module(f"pwlu.{_MOVED[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
