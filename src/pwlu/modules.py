"""The :class:`PWLU` module and :class:`LazyPWLU`, which takes its channel count from its first input."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules.lazy import LazyModuleMixin
from torch.nn.parameter import UninitializedBuffer, UninitializedParameter

from .distributed import assign_, full, op_params
from .functional import pwlu
from .ops.folded import pwlu_folded
from .ops.folding import fold_tables
from .running_stats import update_running_stats

INITS: dict[str, Callable[[Tensor], Tensor]] = {
    "relu": F.relu,
    "identity": lambda x: x,
    "leaky_relu": F.leaky_relu,
    "silu": F.silu,
    "gelu": F.gelu,
    "tanh": torch.tanh,
}


def _resolve_init(init: str | Callable[[Tensor], Tensor]) -> Callable[[Tensor], Tensor]:
    if callable(init):
        return init
    if isinstance(init, str) and init in INITS:
        return INITS[init]
    raise ValueError(f"PWLU: unknown init {init!r}; expected one of {sorted(INITS)} or a callable")


def _outer_slopes(fn: Callable[[Tensor], Tensor], left: Tensor, right: Tensor) -> tuple[Tensor, Tensor]:
    """Slopes of ``fn`` at the two boundaries, in float64 (autograd, else one-sided differences)."""
    try:
        at = torch.stack([left, right]).detach().clone().requires_grad_(True)
        (grad,) = torch.autograd.grad(fn(at).sum(), at)
        if torch.isfinite(grad).all():
            return grad[0], grad[1]
    except (RuntimeError, TypeError):
        pass
    h = 1e-6 * torch.clamp((right - left).abs(), min=1.0)
    with torch.no_grad():
        return (fn(left) - fn(left - h)) / h, (fn(right + h) - fn(right)) / h


def _checked_values(fn: Callable[[Tensor], Tensor], name: str, breakpoints: Tensor, dtype: torch.dtype) -> Tensor:
    """``fn(breakpoints)``, checked: a tensor of their shape, finite in ``dtype``."""
    values = fn(breakpoints)
    if not isinstance(values, Tensor):
        raise TypeError(
            f"PWLU: init function {name} must return a tensor (it is called on a tensor of breakpoints), "
            f"but returned {type(values).__name__}"
        )
    if values.shape != breakpoints.shape:
        raise ValueError(
            f"PWLU: init function {name} must act elementwise: given the breakpoints, shape "
            f"{tuple(breakpoints.shape)}, it returned shape {tuple(values.shape)}"
        )
    values = values.detach()
    bad = ~torch.isfinite(values.to(dtype))
    if bool(bad.any()):
        i = tuple(torch.nonzero(bad)[0].tolist())
        lo, hi = breakpoints.min().item(), breakpoints.max().item()
        raise ValueError(
            f"PWLU: init function {name} gives non-finite values on [{lo:.6g}, {hi:.6g}]: {values[i].item()!r} at "
            f"breakpoint {breakpoints[i].item()!r} ({int(bad.sum())} of {bad.numel()} values"
            f"{'' if dtype == torch.float64 else ' in ' + str(dtype).replace('torch.', '')}); choose a function "
            "defined on the whole range, or other boundaries"
        )
    return values


def _recomputing() -> bool:
    """Whether this forward runs inside a backward pass: the recomputation of
    ``torch.utils.checkpoint`` (either variant), whose batch was already counted."""
    return not torch.compiler.is_compiling() and torch._C._current_graph_task_id() != -1


def check_module_args(owner: str, num_channels: Any, num_intervals: Any, channel_dim: Any, bound: Any) -> None:
    """The constructor arguments shared by :class:`PWLU` and :class:`pwlu.PWLU2D`, checked with
    errors that name ``owner`` and the offending value."""
    if isinstance(num_intervals, bool) or not isinstance(num_intervals, int) or num_intervals < 1:
        raise ValueError(f"{owner}: num_intervals must be an int >= 1, but got {num_intervals!r}")
    if num_channels is not None and (
        isinstance(num_channels, bool) or not isinstance(num_channels, int) or num_channels < 1
    ):
        raise ValueError(f"{owner}: num_channels must be None or an int >= 1, but got {num_channels!r}")
    if isinstance(channel_dim, bool) or not isinstance(channel_dim, int):
        raise TypeError(f"{owner}: channel_dim must be an int, but got {channel_dim!r}")
    if isinstance(bound, bool) or not isinstance(bound, (int, float)) or not (math.isfinite(bound) and bound > 0):
        raise ValueError(f"{owner}: bound must be a finite number > 0, but got {bound!r}")


class PWLU(nn.Module):
    """Piecewise Linear Unit: a learnable activation (https://arxiv.org/abs/2104.03693).

    ``N`` uniform intervals on a learnable range ``[B_L, B_R]``, learnable values at the
    ``N + 1`` breakpoints and learnable outer slopes, shared by the whole layer
    (``num_channels=None``) or one set per channel.

    Args:
        num_channels (int, optional): ``None`` for layer-wise, else the number of channels.
        num_intervals (int): ``N`` (default 16).
        channel_dim (int): channel axis of the input, negative allowed (1 for NCHW, -1 for
            ``(B, T, C)`` or NHWC). Ignored layer-wise.
        bound (float): initial range ``[-bound, bound]``.
        init (str or callable): ``"relu"``, ``"identity"``, ``"leaky_relu"``, ``"silu"``,
            ``"gelu"``, ``"tanh"`` or any callable on tensors; the PWLU equals it at every
            breakpoint and takes its outer slopes from it.

    Shape:
        Input ``(*)`` with ``num_channels`` channels on ``channel_dim``; output the same.
    """

    # Attributes that pwlu.BoundaryRealigner sets (declared here, with class defaults for
    # modules pickled by older versions; no class annotation, which TorchScript would parse):
    #: Eq. 5 momentum of the running statistics, a float or ``None`` (cumulative average).
    stats_momentum = 0.1
    #: ``torch.distributed`` group the statistics are merged over (``None``: the world, when
    #: one is initialised).
    stats_process_group = None
    #: Set by ``convert_activations(init="match")``: the name of the function this PWLU was
    #: fitted to (it starts in phase II; :class:`~pwlu.BoundaryRealigner` skips its phase I).
    #: ``None`` otherwise, and after a reset to ReLU. Not in the state dict.
    matched = None

    def __init__(
        self,
        num_channels: int | None = None,
        num_intervals: int = 16,
        channel_dim: int = 1,
        bound: float = 3.0,
        init: str | Callable[[Tensor], Tensor] = "relu",
    ) -> None:
        super().__init__()
        check_module_args("PWLU", num_channels, num_intervals, channel_dim, bound)
        self.init_fn = _resolve_init(init)
        self.init_name = init if isinstance(init, str) else getattr(init, "__name__", type(init).__name__)
        self.num_channels = num_channels
        self.num_intervals = num_intervals
        self.channel_dim = channel_dim
        self.bound = float(bound)
        shape = () if num_channels is None else (num_channels,)
        self.points = nn.Parameter(torch.empty(*shape, num_intervals + 1))
        self.left_bound = nn.Parameter(torch.empty(shape))
        self.right_bound = nn.Parameter(torch.empty(shape))
        self.left_slope = nn.Parameter(torch.empty(shape))
        self.right_slope = nn.Parameter(torch.empty(shape))
        # running input statistics for realignment (SPEC Eq. 5; see pwlu.running_stats)
        self.stats_momentum: float | None = 0.1
        self.stats_process_group: Any = None
        self.register_buffer("running_mean", torch.zeros(shape))
        self.register_buffer("running_std", torch.ones(shape))
        self.register_buffer("num_batches_tracked", torch.tensor(0, dtype=torch.long))
        self.register_buffer("collecting", torch.tensor(False))
        self._collecting = False  # host mirror of the buffer: no device sync per forward
        self.reset_parameters()

    @property
    def channel_wise(self) -> bool:
        return self.num_channels is not None

    def reset_parameters(self) -> None:
        """Back to the initial function ``init`` on ``[-bound, bound]``, with fresh running
        statistics (as batch norm's ``reset_parameters``; this also initialises a module built on
        the meta device after ``to_empty()``). The collecting flag is kept."""
        self.init_from_function(self.init_fn, -self.bound, self.bound)
        with torch.no_grad():
            self.running_mean.zero_()
            self.running_std.fill_(1.0)
            self.num_batches_tracked.zero_()
            self.collecting.fill_(self._collecting)

    @torch.no_grad()
    def init_from_function(
        self,
        fn: Callable[[Tensor], Tensor],
        left_bound: float | Tensor | None = None,
        right_bound: float | Tensor | None = None,
    ) -> None:
        """Set the boundaries (scalars or per channel; default: keep) and make the PWLU equal
        ``fn`` at every breakpoint, with ``fn``'s slopes at the boundaries as outer slopes.

        Computed in float64 and rounded once to the parameter dtype, so a ReLU with N even
        is represented exactly whenever the breakpoints are. ``fn`` must act elementwise (a
        tensor of the breakpoints' shape back) and be finite, with finite slopes at the
        boundaries, wherever it is evaluated; otherwise ``ValueError`` (``TypeError`` if it does
        not return a tensor) says what was wrong, and nothing is changed. On the meta device
        there are no values to set: nothing is computed (``to_empty()`` then
        :meth:`reset_parameters` initialises such a module).
        """
        if self.points.is_meta:
            return
        shape = self.left_bound.shape
        dtype = self.points.dtype
        f64 = dict(dtype=torch.float64, device=self.points.device)
        # full(): the whole value of an FSDP2-sharded (DTensor) parameter; assign_() writes one back
        left = full(self.left_bound).to(**f64) if left_bound is None else torch.as_tensor(left_bound, **f64)
        right = full(self.right_bound).to(**f64) if right_bound is None else torch.as_tensor(right_bound, **f64)
        left, right = torch.broadcast_tensors(left.expand(shape), right.expand(shape))
        if not bool((torch.isfinite(left.to(dtype)) & torch.isfinite(right.to(dtype))).all()):
            raise ValueError(
                f"PWLU: need finite boundaries that {str(dtype).replace('torch.', '')} holds, but got "
                f"{left.tolist()} and {right.tolist()}"
            )
        if not bool((right > left).all()):
            raise ValueError(f"PWLU: need left_bound < right_bound, but got {left.tolist()} and {right.tolist()}")
        breakpoints = left.unsqueeze(-1) + self._breakpoint_fractions() * (right - left).unsqueeze(-1)
        name = getattr(fn, "__name__", type(fn).__name__)
        values = _checked_values(fn, name, breakpoints, dtype)
        with torch.enable_grad():
            slope_l, slope_r = _outer_slopes(fn, left, right)
        for side, slope, at in (("left", slope_l, left), ("right", slope_r, right)):
            bad = ~torch.isfinite(slope.detach().to(dtype))
            if bool(bad.any()):
                i = tuple(torch.nonzero(bad)[0].tolist())
                raise ValueError(
                    f"PWLU: init function {name} has no finite slope at the {side} boundary {at[i].item()!r} "
                    f"(got {slope[i].item()!r}); the outer slopes come from it. Choose a function that is "
                    "differentiable there, or other boundaries"
                )
        assign_(self.points, values)
        assign_(self.left_bound, left)
        assign_(self.right_bound, right)
        assign_(self.left_slope, slope_l.detach())
        assign_(self.right_slope, slope_r.detach())

    def _breakpoint_fractions(self) -> Tensor:
        """``(B_i - B_L) / (B_R - B_L)`` for the ``N + 1`` breakpoints, in float64: ``i / N`` here
        (:class:`pwlu.NPWLU` overrides it with its learned fractions)."""
        n = self.num_intervals
        return torch.arange(n + 1, dtype=torch.float64, device=self.points.device) / n

    def forward(self, x: Tensor) -> Tensor:
        # torch.jit.script, torch.jit.trace (and the TorchScript-based ONNX exporter), the
        # torch.export-based ONNX exporter: the pure-torch folded path
        if torch.jit.is_scripting() or torch.jit.is_tracing():
            return self._forward_folded(x)
        if torch.compiler.is_compiling() and torch.onnx.is_in_onnx_export():
            return self._forward_folded(x)
        return self._forward(x)

    def _forward_folded(self, x: Tensor) -> Tensor:
        """Pure-torch folded forward, the path taken under ``torch.jit.script``/``trace`` and
        ONNX export, where the custom op cannot go (no running-statistics update)."""
        cd: int | None = None
        if self.num_channels is not None:
            cd = self.channel_dim % x.dim()
        return pwlu_folded(
            x, self.points, self.left_bound, self.right_bound, self.left_slope, self.right_slope, cd
        )

    @torch.jit.unused
    def _forward(self, x: Tensor) -> Tensor:
        """Eager and ``torch.compile``: :func:`pwlu.pwlu`, then the statistics update while collecting."""
        found = self._parameters  # read directly: nn.Module.__getattr__ per name shows on small tensors
        try:
            params = (found["points"], found["left_bound"], found["right_bound"], found["left_slope"], found["right_slope"])  # fmt: skip
        except KeyError:  # e.g. under torch.nn.utils.parametrize
            params = (self.points, self.left_bound, self.right_bound, self.left_slope, self.right_slope)
        y = pwlu(x, *op_params(params, self.num_channels is None), self.channel_dim)
        if self.training and self._collecting and not _recomputing():
            cd = None if self.num_channels is None else self.channel_dim % x.dim()
            self._update_statistics(x, cd)
        return y

    def _update_statistics(self, x: Tensor, channel_dim: int | None) -> None:
        """Fold batch ``x`` into ``running_mean``/``running_std`` (all-reduced under DDP)."""
        update_running_stats(
            self.running_mean, self.running_std, self.num_batches_tracked, x, channel_dim, self.stats_momentum,
            self.stats_process_group,
        )  # fmt: skip

    def set_collecting(self, collecting: bool) -> None:
        """Switch the running-statistics update of training forward passes on or off."""
        self._collecting = bool(collecting)
        self.collecting.fill_(self._collecting)

    @torch.no_grad()
    def reset_running_stats(self) -> None:
        """Forget the running statistics (mean 0, std 1, no batches seen)."""
        self.running_mean.zero_()
        self.running_std.fill_(1.0)
        self.num_batches_tracked.zero_()

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):
        # checkpoints from before realignment lack the statistics buffers: keep the defaults
        for name in ("running_mean", "running_std", "num_batches_tracked", "collecting"):
            state_dict.setdefault(prefix + name, getattr(self, name).detach().clone())
        # layer-wise scalars: shape () here and (1,) after pwlu.prepare_fully_shard, either way round
        for name in ("left_bound", "right_bound", "left_slope", "right_slope"):
            saved, own = state_dict.get(prefix + name), self._parameters.get(name)
            if isinstance(saved, Tensor) and isinstance(own, Tensor) and not isinstance(own, UninitializedParameter):
                if saved.shape != own.shape and saved.numel() == own.numel() == 1 and saved.dim() + own.dim() == 1:
                    state_dict[prefix + name] = saved.reshape(own.shape)
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )
        self._collecting = bool(self.collecting)

    def inference_tables(self) -> tuple[Tensor, Tensor]:
        """Folded ``(slopes, intercepts)``, each ``Tensor[N+2]`` (layer-wise) or ``Tensor[C, N+2]``.

        Entry 0 is ``x < B_L``, entry ``k`` in ``1..N`` interval ``k-1``, entry ``N+1`` is
        ``x >= B_R``; region ``k = clamp(floor((x - B_L) / d) + 1, 0, N+1)`` and
        ``y = slopes[k] * x + intercepts[k]``. Derived from the current parameters on every
        call (and on every forward), so they never go stale.
        """
        params = (self.points, self.left_bound, self.right_bound, self.left_slope, self.right_slope)
        two_d = [p.reshape(-1, p.shape[-1]) if i == 0 else p.reshape(-1) for i, p in enumerate(params)]
        slopes, intercepts, *_, shift = fold_tables(*two_d)
        intercepts = intercepts - slopes * shift.unsqueeze(-1)  # SPEC form: y = a * x + b
        if not self.channel_wise:
            slopes, intercepts = slopes[0], intercepts[0]
        return slopes, intercepts

    def extra_repr(self) -> str:
        mode = "channel" if self.channel_wise else "layer"
        text = f"mode={mode}, num_intervals={self.num_intervals}"
        if self.channel_wise:
            text += f", num_channels={self.num_channels}, channel_dim={self.channel_dim}"
        if self.left_bound.is_meta:  # no values to show
            return text + f", device=meta, init={self.init_name}"
        with torch.no_grad():
            lo, hi = self.left_bound.min().item(), self.right_bound.max().item()
        return text + f", range=[{lo:.4g}, {hi:.4g}], init={self.init_name}"


class LazyPWLU(LazyModuleMixin, PWLU):
    """A channel-wise PWLU that takes ``num_channels`` from its first input
    (https://arxiv.org/abs/2104.03693); it becomes a plain :class:`~pwlu.PWLU` after that.

    Made to be timm's ``act_layer``: timm calls ``act_layer()`` or ``act_layer(inplace=True)``,
    and ``inplace`` is accepted and ignored. For example
    ``timm.create_model("resnet18", act_layer=pwlu.TimmPWLU)`` or, with options,
    ``act_layer=functools.partial(pwlu.TimmPWLU, num_intervals=8)``. As with every lazy module,
    run one forward pass before creating the optimizer (or loading a state dict, which also
    materialises the parameters).

    Args:
        num_intervals (int): ``N``.
        channel_dim (int, optional): channel axis; default 1 for 2-D, 4-D and 5-D inputs, -1 for
            3-D ``(B, T, C)`` inputs. Use ``-1`` for NHWC models such as timm's ConvNeXt MLPs.
        inplace (bool): ignored (timm's calling convention).
        **kwargs: ``bound``, ``init`` as for :class:`~pwlu.PWLU`.
    """

    cls_to_become = PWLU

    def __init__(
        self, num_intervals: int = 16, channel_dim: int | None = None, inplace: bool = False, **kwargs: Any
    ) -> None:
        super().__init__(None, num_intervals=num_intervals, channel_dim=1 if channel_dim is None else channel_dim,
                         **kwargs)  # fmt: skip
        self._auto_channel_dim = channel_dim is None
        for pname in ("points", "left_bound", "right_bound", "left_slope", "right_slope"):
            setattr(self, pname, UninitializedParameter())
        # per-channel statistics: shaped with the parameters
        self.running_mean = UninitializedBuffer()
        self.running_std = UninitializedBuffer()

    def reset_parameters(self) -> None:
        if not self.has_uninitialized_params():
            super().reset_parameters()

    def _load_from_state_dict(self, state_dict, prefix, *args: Any, **kwargs: Any) -> None:
        # the statistics buffers take their shape from the checkpoint (or from its points, for
        # checkpoints without them), before PWLU fills in missing ones
        points = state_dict.get(prefix + "points")
        for name, default in (("running_mean", 0.0), ("running_std", 1.0)):
            buf = getattr(self, name)
            if not isinstance(buf, UninitializedBuffer):
                continue
            saved = state_dict.get(prefix + name)
            if saved is not None:
                buf.materialize(saved.shape)  # on the module's device, in its dtype
            elif points is not None:
                buf.materialize(points.shape[:-1])
                with torch.no_grad():
                    buf.fill_(default)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def initialize_parameters(self, x: Tensor, *args: Any, **kwargs: Any) -> None:
        if not self.has_uninitialized_params():  # materialised by load_state_dict
            self.num_channels = self.points.shape[0] if self.points.dim() == 2 else None
            return
        if not isinstance(x, Tensor) or x.dim() < 2:
            raise ValueError(f"LazyPWLU: needs a tensor with a channel axis, but got {x!r}")
        if self._auto_channel_dim:
            self.channel_dim = -1 if x.dim() == 3 else 1
        channels = x.shape[self.channel_dim]
        with torch.no_grad():
            kw = dict(device=x.device, dtype=x.dtype if x.is_floating_point() else None)
            self.points.materialize((channels, self.num_intervals + 1), **kw)
            for pname in ("left_bound", "right_bound", "left_slope", "right_slope"):
                getattr(self, pname).materialize((channels,), **kw)
            for bname in ("running_mean", "running_std"):
                getattr(self, bname).materialize((channels,), device=x.device)
        self.num_channels = channels
        self.reset_parameters()

    def extra_repr(self) -> str:
        if self.has_uninitialized_params():
            return f"num_intervals={self.num_intervals}, num_channels=<lazy>"
        return super().extra_repr()


TimmPWLU = LazyPWLU
"""Alias of :class:`LazyPWLU`, the name to pass as timm's ``act_layer=``."""
