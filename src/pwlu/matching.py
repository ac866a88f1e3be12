"""Function matching (SPEC sections 11-12): a PWLU fitted to the activation it replaces.

Used by :func:`pwlu.convert_activations` with ``init="match"``. Three steps per call site:

1. :class:`Calibration` records the per-channel statistics of the activation's input on the
   calibration batches (the mean and standard deviation of all of them, pooled over the batches
   in float64; :meth:`Calibration.finish` writes them into the PWLU's running statistics) and
   keeps a uniform random sample of the inputs of every channel.
2. The range is ``mean ± 3·std`` (Eq. 6, :func:`pwlu.realign._data_bounds`).
3. :func:`fit_pwlu` sets the breakpoint values ``Y_P`` with the outer slopes fixed to those of
   the replaced function far from the origin (:func:`activation_target`): either by
   interpolation (``Y_P[i] = f(B_i)``) or by least squares under the recorded inputs, per
   channel (the design matrix of :func:`pwlu.realign._hat_design`).

Which fit is the default was decided by measurement (README, "Converting a trained model"):
least squares gives the converted model the smaller error at every N measured.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .baselines import APL, Swish
from .baselines import PReLU as ChannelPReLU
from .modules import PWLU
from .realign import DEFAULT_MIN_WIDTH, _data_bounds, _hat_design
from .running_stats import batch_moments, merge_moments

__all__ = ["FITS", "Calibration", "MatchTarget", "activation_target", "fit_pwlu"]

#: The fits of :func:`fit_pwlu`; the first is the default of ``convert_activations(init="match")``.
FITS = ("lstsq", "interpolate")

# Transformers' (transformers.activations) and timm's (timm.layers.activations*) classes that are
# matched, by class name: all have outer slopes 0 (left) and 1 (right), except the clipped GELU.
HF_ACTIVATION_NAMES = frozenset(
    {"GELUActivation", "NewGELUActivation", "FastGELUActivation", "QuickGELUActivation", "AccurateGELUActivation",
     "GELUTanh", "PytorchGELUTanh", "SiLUActivation", "MishActivation", "ClippedGELUActivation"}
)  # fmt: skip
TIMM_ACTIVATION_NAMES = frozenset(
    {"Swish", "SwishMe", "Mish", "MishMe", "HardSwish", "HardSwishMe", "HardMish", "HardMishMe", "GELU", "GELUTanh",
     "QuickGELU", "PReLU"}
)  # fmt: skip


@dataclass
class MatchTarget:
    """The function a PWLU is fitted to, with its outer slopes.

    Attributes:
        name (str): for messages and the PWLU's ``matched`` attribute (e.g. ``"GELU(approximate='tanh')"``).
        fn (callable): ``fn(x)`` for ``x`` of shape ``(C, G)`` in float64, channel ``c`` on row
            ``c`` (``C = 1`` layer-wise); elementwise except for per-channel parameters (PReLU).
        left_slope, right_slope (float or Tensor[C]): the slopes of ``fn`` far left and far right
            (its asymptotes: 0 and 1 for GELU, the negative slope for LeakyReLU, 0 and 0 for ReLU6).
    """

    name: str
    fn: Callable[[Tensor], Tensor]
    left_slope: float | Tensor
    right_slope: float | Tensor


def _module_fn(module: nn.Module) -> Callable[[Tensor], Tensor]:
    """The module itself, on a float64 copy in eval mode (RReLU: its mean slope), applied to the
    transposed ``(G, C)`` input so that a per-channel PReLU finds its channels on dim 1; the input
    is cloned, as some activations work in place."""
    clone = copy.deepcopy(module).to(torch.float64).eval()
    if hasattr(clone, "inplace"):
        clone.inplace = False

    def fn(x: Tensor) -> Tensor:
        with torch.no_grad():
            return clone(x.t().contiguous().clone()).t()

    return fn


def activation_target(module: nn.Module, num_channels: int | None) -> MatchTarget | None:
    """What a PWLU replacing ``module`` is fitted to, or ``None`` for a module that cannot be matched.

    Matched: ReLU, ReLU6, LeakyReLU, PReLU, RReLU (its eval-mode mean slope), SiLU, Hardswish,
    GELU (both approximations), ELU, CELU, SELU, Mish, Softplus; the transformers classes in
    :data:`HF_ACTIVATION_NAMES` and timm's in :data:`TIMM_ACTIVATION_NAMES`; this package's
    baselines :class:`~pwlu.baselines.Swish` (any beta), :class:`~pwlu.baselines.PReLU` and
    :class:`~pwlu.baselines.APL` (what ``pwlu train --activation swish|prelu|apl`` builds).

    Args:
        module (nn.Module): the activation.
        num_channels (int, optional): channels of the PWLU (``None`` layer-wise): a PReLU with one
            slope per channel needs them to match.
    """
    cls = type(module)
    name = cls.__name__
    extra = module.extra_repr()
    label = f"{name}({extra})" if extra else name
    if isinstance(module, (ChannelPReLU, APL)):  # pwlu.baselines' own: piecewise linear, per channel on any axis
        return _baseline_target(module, label, num_channels)
    fn = _module_fn(module)
    if isinstance(module, Swish):  # x sigmoid(beta x): slopes 0 and 1 for beta > 0, 1 and 0 for beta < 0
        beta = float(module.beta)
        left, right = (0.0, 1.0) if beta > 0 else (1.0, 0.0) if beta < 0 else (0.5, 0.5)
        return MatchTarget(label, fn, left, right)
    if isinstance(module, nn.ReLU6):
        return MatchTarget(label, fn, 0.0, 0.0)
    if isinstance(module, nn.ReLU):
        return MatchTarget(label, fn, 0.0, 1.0)
    if isinstance(module, nn.LeakyReLU):
        return MatchTarget(label, fn, float(module.negative_slope), 1.0)
    if isinstance(module, nn.RReLU):
        return MatchTarget(label, fn, (module.lower + module.upper) / 2, 1.0)
    if isinstance(module, nn.PReLU):
        weight = module.weight.detach().to(torch.float64).cpu().reshape(-1)
        if weight.numel() != 1 and weight.numel() != (num_channels or 1):
            return None  # a per-channel PReLU replaced layer-wise, or on another channel axis
        return MatchTarget(label, fn, weight.clone(), 1.0)
    if isinstance(module, nn.SELU):
        return MatchTarget(label, fn, 0.0, 1.0507009873554804934193349852946)
    if isinstance(module, (nn.SiLU, nn.Hardswish, nn.GELU, nn.ELU, nn.CELU, nn.Mish, nn.Softplus)):
        return MatchTarget(label, fn, 0.0, 1.0)
    if cls.__module__.startswith("transformers.") and name in HF_ACTIVATION_NAMES:
        if name == "ClippedGELUActivation":
            return MatchTarget(label, fn, 0.0, 0.0)
        return MatchTarget(label, fn, 0.0, 1.0)
    if cls.__module__.startswith("timm.") and name in TIMM_ACTIVATION_NAMES:
        return MatchTarget(label, fn, 0.0, 1.0)
    return None


def _baseline_target(module: nn.Module, label: str, num_channels: int | None) -> MatchTarget | None:
    """:class:`pwlu.baselines.PReLU` (``x`` or ``w x``) and :class:`pwlu.baselines.APL`
    (``max(0, x) + sum_s a_s max(0, b_s - x)``), evaluated on rows of channels: their own
    ``channel_dim`` refers to the model's layout, not to the ``(C, G)`` rows of the fit."""
    channels = num_channels or 1
    if isinstance(module, ChannelPReLU):
        w = module.weight.detach().to(torch.float64).cpu().reshape(-1, 1)
        if w.shape[0] not in (1, channels):
            return None  # a per-channel PReLU replaced layer-wise, or on another channel axis
        return MatchTarget(label, lambda x: torch.where(x > 0, x, w * x), w.reshape(-1).clone(), 1.0)
    a = module.a.detach().to(torch.float64).cpu()
    b = module.b.detach().to(torch.float64).cpu()
    a, b = (a.unsqueeze(0), b.unsqueeze(0)) if a.dim() == 1 else (a, b)  # (1 or C, S)
    if a.shape[0] not in (1, channels):
        return None

    def apl_rows(x: Tensor) -> Tensor:
        y = x.clamp_min(0.0)
        for s in range(a.shape[1]):
            y = y + a[:, s : s + 1] * (b[:, s : s + 1] - x).clamp_min(0.0)
        return y

    return MatchTarget(label, apl_rows, -a.sum(1), 1.0)


class Calibration:
    """Per-channel input statistics and a uniform sample of the inputs of one call site.

    The statistics are those of all the inputs recorded, pooled: count, mean and sum of squared
    deviations merged batch by batch in float64 (Chan et al.), so that batches of one sample,
    or batches whose means differ, give the spread of the inputs themselves (the running average
    of per-batch standard deviations of Eq. 5 is 0 for batches of one sample of a ``(B, C)``
    input, and leaves out the spread between batch means). :meth:`finish` writes them into the
    PWLU's ``running_mean``/``running_std`` (unbiased) and ``num_batches_tracked``.

    Args:
        pwlu (PWLU): the replacement.
        max_samples (int): inputs kept per channel, a uniform random sample without replacement
            of all the inputs seen (random keys, the smallest kept).
        generator (torch.Generator): for the sample.
    """

    def __init__(self, pwlu: PWLU, max_samples: int, generator: torch.Generator) -> None:
        self.pwlu = pwlu
        self.max_samples = max_samples
        self.generator = generator
        self.samples: Tensor | None = None  # (C, S) float64, C = 1 layer-wise
        self.keys: Tensor | None = None  # (S,)
        self.calls = 0  # inputs recorded, empty ones included
        self.batches = 0  # non-empty inputs
        self.moments: tuple[Tensor, Tensor, Tensor] | None = None  # pooled (count, mean, m2), float64

    @torch.no_grad()
    def record(self, x: Tensor) -> None:
        """Fold one input ``x`` (the activation's input at this call site) in."""
        m = self.pwlu
        cd = None if m.num_channels is None else m.channel_dim % x.dim()
        self.calls += 1
        if x.numel() == 0:
            return
        self.batches += 1
        moments = batch_moments(x, cd)  # reduced in float32 (float64 input: float64)
        if not bool(torch.isfinite(moments[2]).all()) and bool(torch.isfinite(x).all()):
            moments = batch_moments(x.detach().to(torch.float64), cd)  # x^2 overflowed float32
        if self.moments is not None:
            moments = merge_moments(*(torch.stack([a, b]) for a, b in zip(self.moments, moments)))
        self.moments = moments
        flat = x.detach().reshape(1, -1) if cd is None else x.detach().movedim(cd, 0).reshape(x.shape[cd], -1)
        keys = torch.rand(flat.shape[1], generator=self.generator)
        if flat.shape[1] > self.max_samples:
            keys, idx = torch.topk(keys, self.max_samples, largest=False)
            flat = flat[:, idx.to(flat.device)]
        flat = flat.to(device="cpu", dtype=torch.float64)
        if self.samples is not None:
            flat = torch.cat([self.samples, flat], 1)
            keys = torch.cat([self.keys, keys])
            if keys.numel() > self.max_samples:
                keys, idx = torch.topk(keys, self.max_samples, largest=False)
                flat = flat[:, idx]
        self.samples, self.keys = flat, keys

    @torch.no_grad()
    def finish(self) -> list[int]:
        """Write the pooled statistics into the PWLU's buffers; returns the channels whose
        recorded inputs are all equal (std 0: their range gets the minimum width)."""
        if self.moments is None:
            raise ValueError("Calibration.finish: no non-empty input was recorded")
        count, mean, m2 = self.moments
        std = torch.sqrt(m2 / (count - 1).clamp_min(1.0))
        m = self.pwlu
        m.running_mean.copy_(mean.reshape(m.running_mean.shape))
        m.running_std.copy_(std.reshape(m.running_std.shape))
        m.num_batches_tracked.fill_(self.batches)
        return torch.nonzero(std.reshape(-1) == 0).reshape(-1).tolist()


def _head(t: Tensor, k: int = 8) -> str:
    """The first ``k`` values of ``t`` for a message (``...`` and the count when there are more)."""
    flat = t.detach().reshape(-1)
    values = ", ".join(f"{v:.6g}" for v in flat[:k].tolist())
    return f"[{values}, ... ({flat.numel()} values)]" if flat.numel() > k else f"[{values}]"


def _solve_points(design: Tensor, target: Tensor, weight: Tensor) -> Tensor:
    """Weighted least squares per channel: ``design`` (C, G, K), ``target`` (C, G), ``weight`` (G,).

    Through the normal equations, ``(K, K)`` per channel, in float64: the hat basis is local and
    the regularising grid puts weight in every interval, so they are well conditioned (and the
    ``gelsd`` solve of them is minimum-norm if ever rank-deficient). Much faster than a solve of the
    ``(G, K)`` system when G is thousands of samples.
    """
    weighted = design * weight.unsqueeze(-1)
    gram = weighted.transpose(-1, -2) @ design
    rhs = weighted.transpose(-1, -2) @ target.unsqueeze(-1)
    return torch.linalg.lstsq(gram, rhs, driver="gelsd").solution.squeeze(-1)


@torch.no_grad()
def fit_pwlu(
    module: PWLU,
    target: MatchTarget,
    samples: Tensor | None,
    fit: str = "lstsq",
    num_sigmas: float = 3.0,
    grid_weight: float = 1e-3,
    name: str = "",
) -> None:
    """Fit ``module`` to ``target`` on the range its running statistics give; it is then in phase II.

    Range: ``running_mean ± num_sigmas·running_std`` per channel (Eq. 6, widened to
    :data:`pwlu.realign.DEFAULT_MIN_WIDTH`). Outer slopes: ``target``'s asymptotic slopes, fixed.
    Breakpoint values ``Y_P``:

    * ``fit="interpolate"``: ``Y_P[i] = f(B_L + i·d)``;
    * ``fit="lstsq"``: ``argmin sum_x (PWLU(x) - f(x))^2`` over the recorded inputs ``x`` of the
      channel (those outside the range included: they fit ``Y_P[0]`` and ``Y_P[N]`` under the fixed
      outer slopes), plus ``8·N + 1`` uniform points over the range with weight ``grid_weight`` each,
      so that an interval without samples is still determined (by interpolation-like values).
      Solved in float64 on the CPU.

    Computed in float64, rounded once to the parameter dtype. Sets ``module.matched`` to the
    target's name.

    Args:
        module (PWLU): with its statistics recorded (``num_batches_tracked > 0``).
        target (MatchTarget): see :func:`activation_target`.
        samples (Tensor[C, S], optional): recorded inputs (``C = 1`` layer-wise); needed for ``"lstsq"``.
        fit (str): ``"lstsq"`` or ``"interpolate"``.
        num_sigmas (float): half-width of the range in standard deviations.
        grid_weight (float): weight of each regularising grid point (a sample weighs 1).
        name (str): the call site, for messages.

    Raises:
        ValueError: unknown ``fit``, no statistics, non-finite recorded inputs (NaN or inf in the
            calibration batches), or a fit that is not finite in the parameter dtype.
    """
    if fit not in FITS:
        raise ValueError(f"fit_pwlu: fit must be one of {FITS}, but got {fit!r}")
    if int(module.num_batches_tracked) == 0:
        raise ValueError(
            "fit_pwlu: the PWLU has no recorded statistics (no calibration batch reached it, or "
            "Calibration.finish() was not called after Calibration.record())"
        )
    where = f"PWLU {name!r} ({target.name})" if name else f"the PWLU ({target.name})"
    finite = torch.isfinite(module.running_mean).all() and torch.isfinite(module.running_std).all()
    if not bool(finite) or (samples is not None and not bool(torch.isfinite(samples).all())):
        raise ValueError(
            f"fit_pwlu: the inputs recorded for {where} are not finite (mean {_head(module.running_mean)}, std "
            f"{_head(module.running_std)}): the calibration batches produced NaN or inf there, or values whose "
            "square overflows float64"
        )
    n = module.num_intervals
    left, right = (t.cpu().reshape(-1) for t in _data_bounds(module, float(num_sigmas), DEFAULT_MIN_WIDTH))
    channels = left.numel()
    f64 = dict(dtype=torch.float64)
    k_l = torch.as_tensor(target.left_slope, **f64).reshape(-1).expand(channels).clone()
    k_r = torch.as_tensor(target.right_slope, **f64).reshape(-1).expand(channels).clone()
    steps = torch.arange(n + 1, **f64) / n
    breakpoints = left.unsqueeze(-1) + steps * (right - left).unsqueeze(-1)  # (C, N+1)
    if fit == "interpolate":
        points = target.fn(breakpoints)
    else:
        if samples is None or samples.numel() == 0:
            raise ValueError("fit_pwlu: fit='lstsq' needs the recorded samples")
        grid = left.unsqueeze(-1) + torch.linspace(0, 1, 8 * n + 1, **f64) * (right - left).unsqueeze(-1)
        xs = torch.cat([samples.to(**f64).expand(channels, -1), grid], 1)  # (C, S + G)
        weight = torch.cat([torch.ones(samples.shape[1], **f64), torch.full((grid.shape[1],), grid_weight, **f64)])
        design = _hat_design(xs, left, right, n)
        rhs = target.fn(xs) - design[..., n + 1] * k_l.unsqueeze(-1) - design[..., n + 2] * k_r.unsqueeze(-1)
        points = _solve_points(design[..., : n + 1], rhs, weight)
    dtype = module.points.dtype
    if not bool(torch.isfinite(points.to(dtype)).all()):
        raise ValueError(
            f"fit_pwlu: the fit of {where} on [{left.min().item():.6g}, {right.max().item():.6g}] is not finite "
            f"in {str(dtype).replace('torch.', '')}"
        )
    shape = module.left_bound.shape
    dev = module.points.device
    module.points.copy_(points.reshape(module.points.shape).to(dev))
    module.left_bound.copy_(left.reshape(shape).to(dev))
    module.right_bound.copy_(right.reshape(shape).to(dev))
    module.left_slope.copy_(k_l.reshape(shape).to(dev))
    module.right_slope.copy_(k_r.reshape(shape).to(dev))
    module.matched = target.name
    module.init_name = f"match:{target.name}"


def max_abs_error(module: PWLU, target: MatchTarget, samples: Tensor) -> float:
    """Largest ``|PWLU(x) - f(x)|`` over ``samples`` (Tensor[C, S]), for tests and reports."""
    with torch.no_grad():
        x = samples.to(torch.float64)
        theta = torch.cat(
            [module.points.detach().reshape(x.shape[0] if module.channel_wise else 1, -1).to(torch.float64).cpu(),
             module.left_slope.detach().reshape(-1, 1).to(torch.float64).cpu(),
             module.right_slope.detach().reshape(-1, 1).to(torch.float64).cpu()], -1)  # fmt: skip
        left = module.left_bound.detach().reshape(-1).to(torch.float64).cpu()
        right = module.right_bound.detach().reshape(-1).to(torch.float64).cpu()
        y = (_hat_design(x, left, right, module.num_intervals) @ theta.unsqueeze(-1)).squeeze(-1)
        err = (y - target.fn(x)).abs().max().item()
    return err if math.isfinite(err) else math.inf
