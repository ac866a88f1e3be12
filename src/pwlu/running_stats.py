"""Running input statistics of a PWLU (SPEC section 4, Eq. 5), distributed-aware.

Conventions (also in the README, "Training with realignment"):

* **Batch moments.** ``mean(x)`` and ``std(x)`` of one batch are taken over every element
  of the layer (layer-wise) or every element of one channel (channel-wise). ``std`` is the
  *unbiased* (Bessel-corrected) standard deviation ``sqrt(sum((x - mean)^2) / (n - 1))``,
  as for batch norm's running variance; a batch of one element has ``std = 0``.
* **Accumulation.** float16/bfloat16 inputs are upcast to float32 and reduced with
  :func:`torch.var_mean`, a one-pass Welford reduction (no ``E[x^2] - E[x]^2``
  cancellation); the per-batch moments, the cross-rank merge and the running update are
  done in float64, then rounded once into the buffers.
* **Distributed.** Inside an initialised ``torch.distributed`` process group with more
  than one rank, every rank all-gathers ``(count, mean, M2)`` per channel and merges them
  in rank order (Chan et al.), so every rank holds bit-identical statistics of the union
  of the ranks' batches. Outside a process group nothing extra happens.
* **Running update.** The first batch sets the running values; every later batch applies
  Eq. 5, ``r <- (1 - m) r + m b``, to ``running_mean`` and ``running_std`` alike
  (``momentum=None``: cumulative average, ``m = 1 / num_batches``). Unlike batch norm's
  ``0 / 1`` start, this leaves no bias from the initial value when the warm-up is short.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

__all__ = ["batch_moments", "merge_moments", "sync_moments", "update_running_stats"]


def batch_moments(x: Tensor, channel_dim: int | None) -> tuple[Tensor, Tensor, Tensor]:
    """Count, mean and sum of squared deviations of one batch, in float64.

    Args:
        x (Tensor[...]): the batch, any floating dtype (float16/bfloat16 reduce in float32).
        channel_dim (int, optional): normalised channel axis, or ``None`` for layer-wise.

    Returns:
        ``(count, mean, m2)``: ``Tensor[]`` (layer-wise) or ``Tensor[C]`` each, float64.
        ``count`` is the number of elements per channel; with ``count == 0`` the mean and
        ``m2`` are 0.
    """
    x = x.detach()
    if x.dtype in (torch.float16, torch.bfloat16):
        x = x.float()
    if channel_dim is None:
        dims: list[int] = list(range(x.dim()))
        num_channels: tuple[int, ...] = ()
    else:
        dims = [d for d in range(x.dim()) if d != channel_dim]
        num_channels = (x.shape[channel_dim],)
    count = x.numel() // max(1, (num_channels[0] if num_channels else 1))
    f64 = dict(dtype=torch.float64, device=x.device)
    if count == 0:
        zeros = torch.zeros(num_channels, **f64)
        return zeros.clone(), zeros.clone(), zeros
    if not dims:  # a 1-d channel-wise input: one element per channel
        var, mean = torch.zeros_like(x), x
    else:
        # one-pass Welford reduction in the compute dtype (float32 or float64)
        var, mean = torch.var_mean(x, dim=dims, correction=0)
    mean = mean.to(torch.float64)
    m2 = var.to(torch.float64) * count
    return torch.full(num_channels, float(count), **f64), mean, m2


def merge_moments(count: Tensor, mean: Tensor, m2: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Merge per-part moments stacked on dim 0 (``Tensor[P, ...]``) into one (Chan et al.)."""
    total = count.sum(0)
    safe = torch.where(total > 0, total, torch.ones_like(total))
    merged_mean = (count * mean).sum(0) / safe
    merged_m2 = (m2 + count * (mean - merged_mean) ** 2).sum(0)
    return total, merged_mean, merged_m2


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def sync_moments(count: Tensor, mean: Tensor, m2: Tensor, group=None) -> tuple[Tensor, Tensor, Tensor]:
    """Moments of the union of all ranks' batches; identity outside a process group.

    Every rank receives the same gathered tensors and merges them in rank order, so the
    result is bit-identical across ranks. Works with gloo (CPU) and nccl (GPU).
    """
    if not _distributed():
        return count, mean, m2
    packed = torch.stack([count, mean, m2])
    if dist.get_backend(group) == "nccl" and packed.device.type != "cuda":
        packed = packed.cuda()
    gathered = [torch.empty_like(packed) for _ in range(dist.get_world_size(group))]
    dist.all_gather(gathered, packed, group=group)
    parts = torch.stack(gathered).to(mean.device)  # (world, 3, ...)
    return merge_moments(parts[:, 0], parts[:, 1], parts[:, 2])


@torch.no_grad()
def update_running_stats(
    running_mean: Tensor,
    running_std: Tensor,
    num_batches_tracked: Tensor,
    x: Tensor,
    channel_dim: int | None,
    momentum: float | None,
    group=None,
) -> None:
    """Apply SPEC Eq. 5 in place with the (all-ranks) moments of batch ``x``.

    No host synchronisation: a batch with no elements (on every rank) changes nothing.
    """
    count, mean, m2 = sync_moments(*batch_moments(x, channel_dim), group=group)
    dev = running_mean.device
    count, mean, m2 = count.to(dev), mean.to(dev), m2.to(dev)
    # unbiased batch std; a single element gives 0
    std = torch.sqrt(m2 / torch.clamp(count - 1, min=1))
    seen = num_batches_tracked.to(device=dev, dtype=torch.float64)
    rate = 1.0 / (seen + 1) if momentum is None else torch.full_like(seen, float(momentum))
    m = torch.where(seen == 0, torch.ones_like(seen), rate)  # the first batch sets the values
    new_mean = (1.0 - m) * running_mean.to(torch.float64) + m * mean
    new_std = (1.0 - m) * running_std.to(torch.float64) + m * std
    has_data = count > 0
    running_mean.copy_(torch.where(has_data, new_mean, running_mean.to(torch.float64)))
    running_std.copy_(torch.where(has_data, new_std, running_std.to(torch.float64)))
    num_batches_tracked.add_(has_data.reshape(-1)[:1].sum().to(num_batches_tracked.dtype))
