"""The input-boundary alignment metric (SPEC section 6, paper Sec. 4.4, Eq. 7 and Fig. 6).

* :func:`interval_iou` -- IOU of two intervals.
* :func:`boundary_iou` -- per-channel IOU of every PWLU's ``[B_L, B_R]`` with its input range.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
from torch import Tensor, nn

from .distributed import full
from .merge import merge_modules
from .modules import PWLU
from .ops.folding import effective_bounds
from .realign import pwlu_modules

__all__ = ["boundary_iou", "interval_iou"]


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
            tuples/lists as a ``DataLoader`` yields them (only ``batch[0]`` is fed); an input
            that is a mapping (a dict of ``input_ids``..., a transformers ``BatchEncoding``) is
            fed as keyword arguments, as ``convert_activations``' calibration batches.
        lower, upper (float): quantile levels, ``0 <= lower < upper <= 1`` (default the
            0.1% and 99.9% quantiles).
        reservoir_size (int): samples kept per channel.
        seed (int): seed of the reservoir's random keys.
        forward (callable, optional): ``forward(model, batch)`` runs one batch, for models
            that take several inputs (default: the rule above).

    Returns:
        dict[str, Tensor[C]]: module name to per-channel IOU (``Tensor[1]`` layer-wise); a
        :class:`pwlu.PWLU2D` named ``m`` gives ``"m.x"`` and ``"m.y"``, one per input and range.
    """
    if not (isinstance(lower, (int, float)) and isinstance(upper, (int, float)) and 0 <= lower < upper <= 1):
        raise ValueError(f"boundary_iou: need 0 <= lower < upper <= 1, but got lower={lower!r}, upper={upper!r}")
    if isinstance(reservoir_size, bool) or not isinstance(reservoir_size, int) or reservoir_size < 1:
        raise ValueError(f"boundary_iou: reservoir_size must be an int >= 1, but got {reservoir_size!r}")
    modules = pwlu_modules(model)
    merges = merge_modules(model)  # a PWLU2D has two inputs and two ranges: "<name>.x", "<name>.y"
    if not modules and not merges:
        raise ValueError(f"boundary_iou: no PWLU (or PWLU2D) module in {type(model).__name__}")
    generator = torch.Generator().manual_seed(seed)
    reservoirs = {name: _ChannelReservoir(reservoir_size, generator) for name, _ in modules}
    reservoirs.update({f"{name}.{a}": _ChannelReservoir(reservoir_size, generator) for name, _ in merges for a in "xy"})

    def make_hook(name: str, module: PWLU, index: int = 0):
        def hook(_: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            # the input, passed by position or by name (``merge(a, y=b)``)
            x = args[index] if len(args) > index else kwargs.get("xy"[index])
            if not isinstance(x, torch.Tensor):
                return
            if module.channel_wise:
                cd = module.channel_dim % x.dim()
                flat = x.movedim(cd, 0).reshape(x.shape[cd], -1)
            else:
                flat = x.reshape(1, -1)
            reservoirs[name].add(flat)

        return hook

    was_training = {m: m.training for m in model.modules()}
    handles = [m.register_forward_pre_hook(make_hook(name, m), with_kwargs=True) for name, m in modules]
    handles += [
        m.register_forward_pre_hook(make_hook(f"{name}.{a}", m, i), with_kwargs=True)
        for name, m in merges
        for i, a in enumerate("xy")
    ]
    try:
        model.eval()
        for batch in batches:
            if forward is not None:
                forward(model, batch)
            else:
                inputs = batch[0] if isinstance(batch, (tuple, list)) else batch
                model(**inputs) if isinstance(inputs, Mapping) else model(inputs)
    finally:
        for h in handles:
            h.remove()
        for m, mode in was_training.items():
            m.train(mode)
    result = {}
    for name, module in modules:
        res = reservoirs[name]
        # full(): the whole value of an FSDP2-sharded parameter (a collective: before any skip)
        left = full(module.left_bound).to(torch.float64).reshape(-1)
        right, _, _ = effective_bounds(left, full(module.right_bound).to(torch.float64).reshape(-1), 1)
        if res.values is None or res.values.shape[1] == 0:
            warnings.warn(f"boundary_iou: PWLU {name!r} saw no input", stacklevel=2)
            continue
        lo, hi = res.quantiles(float(lower), float(upper))
        result[name] = interval_iou(left.to(lo.device), right.to(lo.device), lo, hi)
    for name, module in merges:
        for a in "xy":
            res = reservoirs[f"{name}.{a}"]
            left = full(getattr(module, f"{a}_left_bound")).to(torch.float64).reshape(-1)
            right, _, _ = effective_bounds(left, full(getattr(module, f"{a}_right_bound")).to(torch.float64).reshape(-1), 1)
            if res.values is None or res.values.shape[1] == 0:
                warnings.warn(f"boundary_iou: PWLU2D {name!r} saw no input", stacklevel=2)
                continue
            lo, hi = res.quantiles(float(lower), float(upper))
            result[f"{name}.{a}"] = interval_iou(left.to(lo.device), right.to(lo.device), lo, hi)
    return result
