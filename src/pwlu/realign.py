"""Statistic-based realignment (SPEC section 4) and the boundary IOU metric (SPEC section 6).

Paper: https://arxiv.org/abs/2104.03693, Sec. 3.3 (two-phase learning) and Sec. 4.4 (IOU).

* :class:`BoundaryRealigner` -- the two-phase schedule, one ``.step()`` per optimizer step.
* :func:`realign_boundaries` -- the Eq. 6 reset (or a function-preserving re-bound).
* :func:`fix_init` -- the fix-init-X ablation baseline.
* :func:`boundary_iou` / :func:`interval_iou` -- the input-boundary alignment metric.
* :func:`parameter_groups` -- optimizer parameter groups with separate PWLU weight decay.

The running statistics themselves live in every :class:`~pwlu.PWLU` as buffers
(``running_mean``, ``running_std``, ``num_batches_tracked``, ``collecting``); their
conventions are in :mod:`pwlu.statistics`.
"""

from __future__ import annotations

import math
import warnings
import weakref
from collections.abc import Callable, Iterable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.optim.optimizer import register_optimizer_step_pre_hook

from .modules import PWLU
from .ops.common import MIN_WIDTH, effective_bounds
from .ops.validation import PARAMETER_NAMES

__all__ = [
    "DEFAULT_MIN_WIDTH",
    "BoundaryRealigner",
    "boundary_iou",
    "fix_init",
    "interval_iou",
    "parameter_groups",
    "pwlu_modules",
    "realign_boundaries",
]

#: Smallest ``B_R - B_L`` that :func:`realign_boundaries` sets (a dead channel, std 0, is
#: centred on its mean with this width). Ten times :data:`pwlu.MIN_WIDTH`, so the width
#: stays above the forward pass's clamp after rounding to the parameter dtype.
DEFAULT_MIN_WIDTH = 10 * MIN_WIDTH

_PARAM_NAMES = PARAMETER_NAMES


def pwlu_modules(model: nn.Module) -> list[tuple[str, PWLU]]:
    """Every :class:`~pwlu.PWLU` in ``model`` (the model itself included), with its name."""
    return [(name, m) for name, m in model.named_modules() if isinstance(m, PWLU)]


def _params(module: PWLU) -> list[nn.Parameter]:
    return [getattr(module, name) for name in _PARAM_NAMES]


def _check_positive(name: str, value: Any, allow_zero: bool = False) -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or value < 0 or (value == 0 and not allow_zero):
        bound = ">= 0" if allow_zero else "> 0"
        raise ValueError(f"{name} must be a finite number {bound}, but got {value!r}")


# ----------------------------------------------------------------------------------------
# the reset (Eq. 6) and the function-preserving re-bound
# ----------------------------------------------------------------------------------------


def _data_bounds(module: PWLU, num_sigmas: float, min_width: float) -> tuple[Tensor, Tensor]:
    """``mean ± num_sigmas·std`` from the buffers, widened to ``min_width``, in float64.

    The bounds are rounded to the parameter dtype before they are returned, so the caller
    computes breakpoints from exactly the values that will be stored.
    """
    mean = module.running_mean.to(torch.float64)
    std = module.running_std.to(torch.float64)
    dtype = module.left_bound.dtype
    # half-width: num_sigmas·std, at least min_width / 2, and wide enough that rounding
    # mean ± half to the parameter dtype cannot shrink the width below min_width / 2
    eps = torch.finfo(dtype).eps
    half = torch.maximum(num_sigmas * std, torch.full_like(std, min_width / 2))
    half = torch.maximum(half, 8 * eps * mean.abs())
    left = (mean - half).to(dtype).to(torch.float64)
    right = (mean + half).to(dtype).to(torch.float64)
    return left, right


def _relu_reset(module: PWLU, left: Tensor, right: Tensor) -> None:
    """Eq. 6: ``K_L = 0``, ``K_R = 1``, ``Y_P[i] = max(0, B_L + i·d)`` on ``[left, right]``."""
    module.init_from_function(F.relu, left, right)
    with torch.no_grad():
        module.left_slope.fill_(0.0)
        module.right_slope.fill_(1.0)


def _hat_design(grid: Tensor, left: Tensor, right: Tensor, n: int) -> Tensor:
    """Design matrix of a PWLU in its linear parameters ``(Y_P[0..N], K_L, K_R)``.

    Args:
        grid (Tensor[C, G]): sample points; left, right (Tensor[C]): the boundaries.

    Returns:
        Tensor[C, G, N+3]: ``PWLU(grid) = A @ [Y_P, K_L, K_R]`` for fixed boundaries.
    """
    d = ((right - left) / n).unsqueeze(-1)
    u = (grid - left.unsqueeze(-1)) / d
    i = torch.floor(u).clamp(0, n - 1)
    t = (u - i).clamp(0, 1)  # outer regions: t = 0 (left) or 1 (right) picks Y_P[0] / Y_P[N]
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
        p = getattr(module, name).detach().to(torch.float64)
        out.append(p.reshape(-1, p.shape[-1]) if name == "points" else p.reshape(-1))
    return out


def _refit(module: PWLU, left: Tensor, right: Tensor, grid_size: int) -> None:
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
    # the old function on the grid, through its own design matrix (exact PWLU evaluation)
    old_theta = torch.cat([points, k_l.unsqueeze(-1), k_r.unsqueeze(-1)], -1)
    target = _hat_design(grid, old_l, old_r, n) @ old_theta.unsqueeze(-1)
    theta = torch.linalg.lstsq(_hat_design(grid, left, right, n), target, driver="gelsd").solution.squeeze(-1)
    theta = theta.to(module.points.device)
    shape = module.left_bound.shape
    with torch.no_grad():
        module.points.copy_(theta[:, : n + 1].reshape(module.points.shape))
        module.left_bound.copy_(left.reshape(shape))
        module.right_bound.copy_(right.reshape(shape))
        module.left_slope.copy_(theta[:, n + 1].reshape(shape))
        module.right_slope.copy_(theta[:, n + 2].reshape(shape))


@torch.no_grad()
def realign_boundaries(
    model: nn.Module,
    num_sigmas: float = 3.0,
    preserve_function: bool = False,
    min_width: float = DEFAULT_MIN_WIDTH,
    grid_size: int = 2048,
) -> list[str]:
    """Reset every PWLU's range to its input statistics (SPEC Eq. 6, the 3-sigma rule).

    Paper: https://arxiv.org/abs/2104.03693, Sec. 3.3. For each PWLU (per channel in
    channel-wise mode) the new range is::

        B_L = running_mean - num_sigmas·running_std
        B_R = running_mean + num_sigmas·running_std

    widened symmetrically to at least ``min_width`` (a dead channel with std 0 is centred
    on its mean; never a zero-length interval, never NaN).

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

    Modules whose running statistics have seen no batch are left unchanged, with a warning.

    Args:
        model (nn.Module): a model containing PWLU modules (or a PWLU itself).
        num_sigmas (float): half-width of the range in standard deviations (default 3).
        preserve_function (bool): refit the shape instead of resetting it to ReLU.
        min_width (float): smallest ``B_R - B_L``, ``>= pwlu.MIN_WIDTH`` (default ``1e-2``).
        grid_size (int): least-squares sample points per channel (``preserve_function``).

    Returns:
        list[str]: the names of the realigned modules.

    Raises:
        ValueError: bad arguments, no PWLU in ``model``, or non-finite running statistics
            (the inputs contained NaN or inf).
    """
    _check_positive("realign_boundaries: num_sigmas", num_sigmas, allow_zero=True)
    _check_positive("realign_boundaries: min_width", min_width)
    if min_width < MIN_WIDTH:
        raise ValueError(f"realign_boundaries: min_width must be >= pwlu.MIN_WIDTH={MIN_WIDTH}, but got {min_width}")
    if isinstance(grid_size, bool) or not isinstance(grid_size, int) or grid_size < 16:
        raise ValueError(f"realign_boundaries: grid_size must be an int >= 16, but got {grid_size!r}")
    modules = pwlu_modules(model)
    if not modules:
        raise ValueError(f"realign_boundaries: no PWLU module in {type(model).__name__}")
    done = []
    for name, module in modules:
        if int(module.num_batches_tracked) == 0:
            warnings.warn(
                f"realign_boundaries: PWLU {name or '<model>'!r} has seen no training batch while "
                "collecting statistics; its boundaries are left unchanged",
                stacklevel=2,
            )
            continue
        stats = torch.stack([module.running_mean.reshape(-1), module.running_std.reshape(-1)])
        if not bool(torch.isfinite(stats).all()):
            raise ValueError(
                f"realign_boundaries: PWLU {name or '<model>'!r} has non-finite running statistics "
                f"(mean {module.running_mean.tolist()}, std {module.running_std.tolist()}); "
                "its inputs contained NaN or inf"
            )
        left, right = _data_bounds(module, float(num_sigmas), float(min_width))
        if preserve_function:
            _refit(module, left, right, grid_size)
        else:
            _relu_reset(module, left, right)
        done.append(name)
    return done


@torch.no_grad()
def fix_init(model: nn.Module, bound: float) -> None:
    """The paper's fix-init-X ablation: every PWLU becomes ReLU on ``[-bound, bound]``.

    Paper: https://arxiv.org/abs/2104.03693, Sec. 4.2 (X in {3, 6, 10}). ``K_L = 0``,
    ``K_R = 1``, ``Y_P[i] = max(0, B_i)``; statistics collection is switched off and the
    running statistics are reset. There is no phase I and no realignment: train such a
    model *without* a :class:`BoundaryRealigner` (a realigner would freeze the PWLUs for
    its warm-up and then overwrite this range at ``warmup_steps``).
    """
    _check_positive("fix_init: bound", bound)
    modules = pwlu_modules(model)
    if not modules:
        raise ValueError(f"fix_init: no PWLU module in {type(model).__name__}")
    for _, module in modules:
        _relu_reset(module, torch.tensor(-float(bound)), torch.tensor(float(bound)))
        module.reset_running_stats()
        module.set_collecting(False)


# ----------------------------------------------------------------------------------------
# the two-phase schedule
# ----------------------------------------------------------------------------------------


class BoundaryRealigner:
    """Two-phase statistic-based realignment, a one-line addition to a training loop.

    Paper: https://arxiv.org/abs/2104.03693, Sec. 3.3 and SPEC section 4.

    * **Phase I** (steps ``0 .. warmup_steps - 1``): every PWLU in ``model`` collects running
      statistics of its input in training-mode forward passes (Eq. 5, all-reduced across
      ranks under ``torch.distributed``), and its parameters stay bit-identical: their
      gradients are zeroed as they are computed (so gradient clipping and DDP see zeros)
      and set to ``None`` just before every ``torch.optim`` optimizer step (a global
      optimizer step pre-hook), so the optimizer skips them entirely -- no weight decay, no
      momentum, no Adam state. The optimizer is not rebuilt and its state stays clean, so
      phase II starts as if the PWLU parameters were new to it.
    * **At step** ``warmup_steps``: :func:`realign_boundaries` (Eq. 6), then phase II.
    * **Phase II**: all PWLU parameters train. With ``rebound_every=k``, statistics keep
      being collected and every ``k`` steps the boundaries move to them with
      ``realign_boundaries(preserve_function=True)`` (beyond the paper). The optimizer's
      state (momentum, Adam moments) for the PWLU parameters is kept across a re-bound.

    Call :meth:`step` once per optimizer step, after ``optimizer.step()``. With gradient
    accumulation that is once per ``accumulation`` micro-batches; every micro-batch's
    forward pass counts towards the statistics. For a warm-up in epochs use
    :meth:`from_epochs` or ``warmup_steps = warmup_epochs * steps_per_epoch`` with
    ``steps_per_epoch = ceil(len(loader) / accumulation)``. ``warmup_steps=0`` means no
    phase I and no reset.

    Checkpoints: save ``model.state_dict()`` (which holds the statistics buffers and the
    collecting flag), ``optimizer.state_dict()`` and ``realigner.state_dict()`` (step
    counter and settings); load all three into a fresh model, optimizer and realigner to
    continue exactly.

    Args:
        model (nn.Module): the model (may be wrapped in DDP) containing PWLU modules.
        warmup_steps (int): ``T_s``, the number of phase-I optimizer steps.
        momentum (float, optional): Eq. 5 momentum ``m`` (default 0.1, as batch norm);
            ``None`` for a cumulative average over all phase-I batches.
        num_sigmas (float): half-width of the realigned range in standard deviations.
        rebound_every (int, optional): in phase II, re-bound every this many steps.
        min_width (float): smallest realigned width (see :func:`realign_boundaries`).
        process_group: the ``torch.distributed`` group to all-reduce statistics over
            (default: the world).

    Example::

        realigner = pwlu.BoundaryRealigner(model, warmup_steps=5 * len(loader))
        for x, y in loader:
            loss = F.cross_entropy(model(x), y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            realigner.step()
    """

    def __init__(
        self,
        model: nn.Module,
        warmup_steps: int,
        momentum: float | None = 0.1,
        num_sigmas: float = 3.0,
        rebound_every: int | None = None,
        min_width: float = DEFAULT_MIN_WIDTH,
        process_group: Any = None,
    ) -> None:
        if isinstance(warmup_steps, bool) or not isinstance(warmup_steps, int) or warmup_steps < 0:
            raise ValueError(f"BoundaryRealigner: warmup_steps must be an int >= 0, but got {warmup_steps!r}")
        if momentum is not None:
            _check_positive("BoundaryRealigner: momentum", momentum)
            if momentum > 1:
                raise ValueError(f"BoundaryRealigner: momentum must be in (0, 1] or None, but got {momentum!r}")
        _check_positive("BoundaryRealigner: num_sigmas", num_sigmas)
        if rebound_every is not None and (
            isinstance(rebound_every, bool) or not isinstance(rebound_every, int) or rebound_every < 1
        ):
            raise ValueError(f"BoundaryRealigner: rebound_every must be None or an int >= 1, but got {rebound_every!r}")
        if min_width < MIN_WIDTH:
            raise ValueError(f"BoundaryRealigner: min_width must be >= pwlu.MIN_WIDTH={MIN_WIDTH}, but got {min_width}")
        self.model = model
        self.modules = pwlu_modules(model)
        if not self.modules:
            raise ValueError(f"BoundaryRealigner: no PWLU module in {type(model).__name__}")
        self.warmup_steps = warmup_steps
        self.momentum = momentum
        self.num_sigmas = float(num_sigmas)
        self.rebound_every = rebound_every
        self.min_width = float(min_width)
        self.process_group = process_group
        self.num_steps = 0
        self._hooks: list[Any] = []
        for _, module in self.modules:
            module.stats_momentum = momentum
            module.stats_process_group = process_group
        self._apply_phase()

    @classmethod
    def from_epochs(
        cls, model: nn.Module, warmup_epochs: float, steps_per_epoch: int, **kwargs: Any
    ) -> BoundaryRealigner:
        """A realigner with ``warmup_steps = round(warmup_epochs * steps_per_epoch)``.

        ``steps_per_epoch`` counts optimizer steps: ``ceil(len(loader) / accumulation)``.
        The paper uses ``warmup_epochs=5``.
        """
        _check_positive("BoundaryRealigner.from_epochs: warmup_epochs", warmup_epochs, allow_zero=True)
        if isinstance(steps_per_epoch, bool) or not isinstance(steps_per_epoch, int) or steps_per_epoch < 1:
            raise ValueError(
                f"BoundaryRealigner.from_epochs: steps_per_epoch must be an int >= 1, but got {steps_per_epoch!r}"
            )
        return cls(model, int(round(warmup_epochs * steps_per_epoch)), **kwargs)

    # -- phase ---------------------------------------------------------------------------

    @property
    def in_warmup(self) -> bool:
        """Whether phase I (collecting, PWLU parameters frozen) is in force."""
        return self.num_steps < self.warmup_steps

    @property
    def phase(self) -> str:
        """``"collecting"`` (phase I) or ``"learning"`` (phase II)."""
        return "collecting" if self.in_warmup else "learning"

    def _apply_phase(self) -> None:
        """Put every PWLU and the hooks in the state that ``num_steps`` implies."""
        warm = self.in_warmup
        collect = warm or self.rebound_every is not None
        for _, module in self.modules:
            module.set_collecting(collect)
        if warm and not self._hooks:
            self._freeze()
        elif not warm and self._hooks:
            self.remove_hooks()

    def _freeze(self) -> None:
        params = [p for _, m in self.modules for p in _params(m)]
        for p in params:
            if p.requires_grad:
                self._hooks.append(p.register_hook(torch.zeros_like))
        ref = weakref.ref(self)
        holder: list[Any] = []

        def drop_pwlu_grads(optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
            # an optimizer skips a parameter whose .grad is None: no decay, no state
            realigner = ref()
            if realigner is None:
                holder[0].remove()
                return
            for p in params:
                p.grad = None

        handle = register_optimizer_step_pre_hook(drop_pwlu_grads)
        holder.append(handle)
        self._hooks.append(handle)

    def __del__(self) -> None:
        # a realigner dropped during phase I must not leave the PWLUs frozen
        try:
            self.remove_hooks()
        except Exception:  # noqa: BLE001  (interpreter shutdown)
            pass

    def remove_hooks(self) -> None:
        """Unfreeze the PWLU parameters (remove the gradient and optimizer hooks)."""
        for handle in self._hooks:
            handle.remove()
        self._hooks.clear()

    # -- schedule ------------------------------------------------------------------------

    def step(self) -> None:
        """Advance one optimizer step; realign at ``warmup_steps``, re-bound in phase II."""
        self.num_steps += 1
        if self.num_steps == self.warmup_steps:
            realign_boundaries(self.model, self.num_sigmas, min_width=self.min_width)
        elif (
            self.rebound_every is not None
            and self.num_steps > self.warmup_steps
            and (self.num_steps - self.warmup_steps) % self.rebound_every == 0
        ):
            realign_boundaries(self.model, self.num_sigmas, preserve_function=True, min_width=self.min_width)
        self._apply_phase()

    # -- checkpoints ---------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """Step counter and settings (the statistics are in ``model.state_dict()``)."""
        return {
            "num_steps": self.num_steps,
            "warmup_steps": self.warmup_steps,
            "momentum": self.momentum,
            "num_sigmas": self.num_sigmas,
            "rebound_every": self.rebound_every,
            "min_width": self.min_width,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore the step counter and settings, and the phase they imply."""
        missing = {"num_steps", "warmup_steps"} - set(state_dict)
        if missing:
            raise KeyError(f"BoundaryRealigner.load_state_dict: missing keys {sorted(missing)}")
        self.num_steps = int(state_dict["num_steps"])
        self.warmup_steps = int(state_dict["warmup_steps"])
        self.momentum = state_dict.get("momentum", self.momentum)
        self.num_sigmas = float(state_dict.get("num_sigmas", self.num_sigmas))
        self.rebound_every = state_dict.get("rebound_every", self.rebound_every)
        self.min_width = float(state_dict.get("min_width", self.min_width))
        for _, module in self.modules:
            module.stats_momentum = self.momentum
        self._apply_phase()

    def __repr__(self) -> str:
        return (
            f"BoundaryRealigner(step={self.num_steps}, warmup_steps={self.warmup_steps}, phase={self.phase}, "
            f"momentum={self.momentum}, num_sigmas={self.num_sigmas}, rebound_every={self.rebound_every}, "
            f"modules={len(self.modules)})"
        )


# ----------------------------------------------------------------------------------------
# optimizer groups
# ----------------------------------------------------------------------------------------


def parameter_groups(model: nn.Module, weight_decay: float, pwlu_weight_decay: float = 0.0) -> list[dict[str, Any]]:
    """Optimizer parameter groups: PWLU parameters apart from the rest.

    Recommended: ``pwlu_weight_decay=0`` (the default). Weight decay pulls every PWLU
    parameter towards 0: the breakpoint values and outer slopes towards the zero function,
    and both boundaries towards 0, which shrinks the learnable range that realignment has
    just fitted to the data. Like batch-norm scales and biases, PWLU parameters are few
    and shape the function rather than adding capacity, so decay regularises little and
    distorts much.

    Args:
        model (nn.Module): the model.
        weight_decay (float): decay for every non-PWLU parameter.
        pwlu_weight_decay (float): decay for the PWLU parameters.

    Returns:
        list[dict]: ``[{"params": others, "weight_decay": weight_decay},
        {"params": pwlu_params, "weight_decay": pwlu_weight_decay}]``, empty groups left
        out; pass to any ``torch.optim`` optimizer.
    """
    _check_positive("parameter_groups: weight_decay", weight_decay, allow_zero=True)
    _check_positive("parameter_groups: pwlu_weight_decay", pwlu_weight_decay, allow_zero=True)
    pwlu_ids = {id(p) for _, m in pwlu_modules(model) for p in _params(m)}
    seen: set[int] = set()
    pwlu_params, others = [], []
    for p in model.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        (pwlu_params if id(p) in pwlu_ids else others).append(p)
    groups = [
        {"params": others, "weight_decay": float(weight_decay)},
        {"params": pwlu_params, "weight_decay": float(pwlu_weight_decay)},
    ]
    return [g for g in groups if g["params"]]


# ----------------------------------------------------------------------------------------
# the IOU metric (SPEC section 6)
# ----------------------------------------------------------------------------------------


def interval_iou(a_lo: Tensor | float, a_hi: Tensor | float, b_lo: Tensor | float, b_hi: Tensor | float) -> Tensor:
    """Intersection over union of the intervals ``[a_lo, a_hi]`` and ``[b_lo, b_hi]`` (broadcast).

    ``|A ∩ B| / |A ∪ B|`` with lengths; disjoint intervals give 0. Two identical
    zero-length intervals give 1; a zero-length interval and a different one give 0. NaN
    in gives NaN out.

    Returns:
        Tensor: float64, the broadcast shape of the inputs.
    """
    tensors = [torch.as_tensor(v, dtype=torch.float64) for v in (a_lo, a_hi, b_lo, b_hi)]
    device = next((t.device for t in tensors if t.device.type != "cpu"), torch.device("cpu"))
    a_lo, a_hi, b_lo, b_hi = torch.broadcast_tensors(*(t.to(device) for t in tensors))
    dtype = torch.float64
    if bool(((a_hi < a_lo) | (b_hi < b_lo)).any()):
        raise ValueError("interval_iou: expected lo <= hi for both intervals, but got an interval with lo > hi")
    inter = torch.clamp(torch.minimum(a_hi, b_hi) - torch.maximum(a_lo, b_lo), min=0)
    union = torch.maximum(a_hi, b_hi) - torch.minimum(a_lo, b_lo)
    same = (a_lo == b_lo) & (a_hi == b_hi)
    iou = inter / torch.where(union > 0, union, torch.ones_like(union))
    return torch.where(union == 0, same.to(dtype), iou)  # NaN stays NaN


class _ChannelReservoir:
    """A uniform random sample of at most ``size`` values per channel, of all values seen.

    Each value gets a uniform random key; the ``size`` smallest keys are kept (a priority
    reservoir), so memory is ``O(C·size)`` whatever the number of batches.
    """

    def __init__(self, size: int, generator: torch.Generator) -> None:
        self.size = size
        self.generator = generator
        self.values: Tensor | None = None  # (C, k), float32
        self.keys: Tensor | None = None

    def add(self, x: Tensor) -> None:
        """Add ``x`` of shape ``(C, n)``."""
        x = x.detach().float()
        keys = torch.rand(x.shape, generator=self.generator, device="cpu").to(x.device)
        if self.values is not None:
            x = torch.cat([self.values, x], 1)
            keys = torch.cat([self.keys, keys], 1)
        if x.shape[1] > self.size:
            keys, idx = torch.topk(keys, self.size, dim=1, largest=False)
            x = torch.gather(x, 1, idx)
        self.values, self.keys = x, keys

    def quantiles(self, lower: float, upper: float) -> tuple[Tensor, Tensor]:
        q = torch.tensor([lower, upper], dtype=torch.float64, device=self.values.device)
        lo, hi = torch.quantile(self.values.to(torch.float64), q, dim=1)
        return lo, hi


@torch.no_grad()
def boundary_iou(
    model: nn.Module,
    batches: Iterable[Any],
    lower: float = 0.001,
    upper: float = 0.999,
    reservoir_size: int = 16384,
    seed: int = 0,
    forward: Callable[[nn.Module, Any], Any] | None = None,
) -> dict[str, Tensor]:
    """Input-boundary alignment of every PWLU (SPEC section 6, paper Eq. 7 and Fig. 6).

    Runs ``model`` in eval mode (under ``torch.no_grad``) over ``batches``, estimates each PWLU's per-channel input range
    ``[lo, hi]`` as the ``lower`` / ``upper`` quantiles of its inputs, and returns the IOU
    of ``[B_L, B_R]`` with it. The quantiles come from a uniform random sample of at most
    ``reservoir_size`` inputs per channel (a priority reservoir; exact when fewer inputs
    were seen, linear interpolation between order statistics), so memory does not grow
    with the number of batches. The model's training mode is restored afterwards.

    Args:
        model (nn.Module): a model containing PWLU modules.
        batches (Iterable): the evaluation batches: input tensors, or ``(input, target, ...)``
            tuples/lists as a ``DataLoader`` yields them (only ``batch[0]`` is fed).
        lower, upper (float): quantile levels, ``0 <= lower < upper <= 1`` (default the
            0.1% and 99.9% quantiles).
        reservoir_size (int): samples kept per channel.
        seed (int): seed of the reservoir's random keys.
        forward (callable, optional): ``forward(model, batch)`` runs one batch, for models
            that take several inputs (default: the rule above).

    Returns:
        dict[str, Tensor[C]]: module name to per-channel IOU (``Tensor[1]`` layer-wise).
    """
    if not (isinstance(lower, (int, float)) and isinstance(upper, (int, float)) and 0 <= lower < upper <= 1):
        raise ValueError(f"boundary_iou: need 0 <= lower < upper <= 1, but got lower={lower!r}, upper={upper!r}")
    if isinstance(reservoir_size, bool) or not isinstance(reservoir_size, int) or reservoir_size < 1:
        raise ValueError(f"boundary_iou: reservoir_size must be an int >= 1, but got {reservoir_size!r}")
    modules = pwlu_modules(model)
    if not modules:
        raise ValueError(f"boundary_iou: no PWLU module in {type(model).__name__}")
    generator = torch.Generator().manual_seed(seed)
    reservoirs = {name: _ChannelReservoir(reservoir_size, generator) for name, _ in modules}

    def make_hook(name: str, module: PWLU):
        def hook(_: nn.Module, args: tuple[Any, ...]) -> None:
            x = args[0]
            if module.channel_wise:
                cd = module.channel_dim % x.dim()
                flat = x.movedim(cd, 0).reshape(x.shape[cd], -1)
            else:
                flat = x.reshape(1, -1)
            reservoirs[name].add(flat)

        return hook

    was_training = {m: m.training for m in model.modules()}
    handles = [m.register_forward_pre_hook(make_hook(name, m)) for name, m in modules]
    try:
        model.eval()
        for batch in batches:
            if forward is not None:
                forward(model, batch)
            else:
                model(batch[0] if isinstance(batch, (tuple, list)) else batch)
    finally:
        for h in handles:
            h.remove()
        for m, mode in was_training.items():
            m.train(mode)
    result = {}
    for name, module in modules:
        res = reservoirs[name]
        if res.values is None or res.values.shape[1] == 0:
            warnings.warn(f"boundary_iou: PWLU {name!r} saw no input", stacklevel=2)
            continue
        lo, hi = res.quantiles(float(lower), float(upper))
        left = module.left_bound.detach().to(torch.float64).reshape(-1)
        right, _, _ = effective_bounds(left, module.right_bound.detach().to(torch.float64).reshape(-1), 1)
        result[name] = interval_iou(left.to(lo.device), right.to(lo.device), lo, hi)
    return result
